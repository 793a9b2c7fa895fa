"""CLIP models: loading/saving open_clip checkpoints (and, beside it, region pooling)."""

from regionclip.models.loading import LoadedClip, get_model_config, load_clip, save_clip_checkpoint

__all__ = ["LoadedClip", "get_model_config", "load_clip", "save_clip_checkpoint"]
