"""Region embeddings from a CLIP image tower: RoI pooling on full-image features, no crops.

ResNet (open_clip ``ModifiedResNet``), as RegionCLIP's teacher and student (docs/design.md):
stem -> layer1..layer3 (stride 16) -> RoIAlign (aligned, 2 x attnpool grid: 14 for RN50, 18 for
RN50x4) -> layer4 -> attention pool -> [R, D] in the joint image-text space.

ViT (open_clip ``VisionTransformer``): patch tokens of the whole image (positional embedding
resized bicubically to the input's token grid) -> RoIAlign on the token grid to the model's
training grid -> mean of the pooled tokens -> ``ln_post`` / ``proj`` exactly where the model's own
pooling applies them. For ``pool_type='avg'`` models the whole-image box at the training
resolution reproduces ``encode_image``; for class-token models (``'tok'``, e.g. OpenAI ViT-B/16)
the region embedding is the mean of projected patch tokens, which is not the class token.

Everything is differentiable: the student trains through this same path. Wrap calls in
``torch.no_grad()`` / ``.eval()`` where that is wanted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from regionclip.models.pos_embed import interpolate_pos_embed
from regionclip.models.preprocess import CLIP_MEAN, CLIP_STD, batch_images, resize_for_detection, scale_boxes
from regionclip.models.resnet_path import c4_features, region_head
from regionclip.models.roi_align import roi_align
from regionclip.models.towers import tower_kind


class RegionEncoder(nn.Module):
    """Region embeddings ``[sum R_i, D]`` for a batch of images and per-image boxes.

    Wraps (does not copy) an open_clip image tower, ``model.visual``. ``pooler_resolution`` is the
    RoIAlign output side; the default makes the pooled features match the tower's training grid
    (2 x attnpool grid for ResNets, the patch grid for ViTs).

    ``image_sizes`` (optional, from :func:`~regionclip.models.preprocess.batch_images`): when given,
    each image's features are computed on its own unpadded pixels and its boxes are pooled from its
    own feature window, so results do not depend on what else is in the batch. Without it the
    padded canvas is processed as a whole, as RegionCLIP does.
    """

    def __init__(self, visual: nn.Module, pooler_resolution: int | None = None):
        super().__init__()
        self.visual = visual
        self.kind = tower_kind(visual)
        if self.kind == "resnet":
            self.stride = 16
            grid = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)
            default_res = 2 * grid
            self.output_dim = visual.attnpool.c_proj.out_features
        else:
            if getattr(visual, "attn_pool", None) is not None:
                raise ValueError(
                    "ViT towers with an attentional pooler (CoCa) are not supported for region pooling"
                )
            ph, pw = visual.patch_size
            if ph != pw:
                raise ValueError(f"non-square patches {visual.patch_size} are not supported")
            self.stride = ph
            default_res = visual.grid_size[0]
            self.output_dim = (
                visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0]
            )
        self.pooler_resolution = int(pooler_resolution or default_res)
        if self.pooler_resolution <= 0:
            raise ValueError(f"pooler_resolution must be positive, got {self.pooler_resolution}")

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size ``(h, w)`` that :meth:`dense_features` gives for a ``height x width`` input."""
        if self.kind == "resnet":
            # stem conv stride 2 (padding 1) rounds up; the stem avgpool and the stride-2 stages round down
            return (-(-height // 2)) // 8, (-(-width // 2)) // 8
        return height // self.stride, width // self.stride

    def _backbone(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self.kind == "resnet":
            return c4_features(v, images)
        # Mirrors VisionTransformer._embeds + transformer with a resized positional embedding.
        # Patch dropout is not applied: it would punch holes in the token grid.
        x = v.conv1(images)  # [B, C, gh, gw]
        b, _, gh, gw = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(v.positional_embedding, v.grid_size, (gh, gw)).to(
            tokens.dtype
        )
        tokens = v.transformer(v.ln_pre(tokens))[:, 1:]
        # Where the model normalises tokens before pooling, normalise them here too: RoIAlign and
        # the mean are linear, so the whole-image box then reproduces the model's own avg pooling.
        if not v.final_ln_after_pool:
            tokens = v.ln_post(tokens)
        return tokens.transpose(1, 2).reshape(b, -1, gh, gw)

    def dense_features(
        self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """Images [B, 3, H, W] (normalised) -> features [B, C, h, w] that :meth:`pool_regions` takes.

        ResNet: layer3 output (stride 16). ViT: patch tokens (stride = patch size). With
        ``image_sizes`` images of equal size run together, each on its own pixels; the features
        are zero outside each image's window.
        """
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        b, _, height, width = images.shape
        if min(self.feature_size(height, width)) == 0:
            raise ValueError(f"images of {height}x{width} are smaller than the feature stride {self.stride}")
        if image_sizes is None:
            return self._backbone(images)
        if len(image_sizes) != b:
            raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {b} images")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(image_sizes):
            if not (0 < h <= height and 0 < w <= width):
                raise ValueError(f"image {i}: size {h}x{w} does not fit the {height}x{width} batch")
            if min(self.feature_size(h, w)) == 0:
                raise ValueError(f"image {i}: size {h}x{w} is smaller than the feature stride {self.stride}")
            groups.setdefault((int(h), int(w)), []).append(i)
        if len(groups) == 1 and next(iter(groups)) == (height, width):
            return self._backbone(images)
        fh, fw = self.feature_size(height, width)
        out = None
        for (h, w), idx in groups.items():
            crop = images[:, :, :h, :w] if len(idx) == b else images[idx, :, :h, :w]
            feats = self._backbone(crop)
            if out is None:
                out = feats.new_zeros(b, feats.shape[1], fh, fw)
            out[idx, :, : feats.shape[2], : feats.shape[3]] = feats
        return out

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self.kind == "resnet":
            return region_head(v, pooled)
        x = pooled.mean(dim=(2, 3))
        if v.final_ln_after_pool:
            x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x

    def pool_regions(
        self,
        features: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Features [B, C, h, w] + boxes (list of B tensors [R_i, 4], x0 y0 x1 y1 in the pixel
        coordinates of the images given to :meth:`dense_features`) -> embeddings [sum R_i, D],
        image 0's regions first."""
        if len(boxes) != features.shape[0]:
            raise ValueError(f"{len(boxes)} box tensors for a batch of {features.shape[0]} images")
        # Box coordinates stay in fp32 (bf16 would round an 800 px coordinate to a 4 px step);
        # RoIAlign then samples fp32 features and hands back the features' dtype.
        dtype = features.dtype
        work = torch.float64 if features.dtype == torch.float64 else torch.float32
        boxes = [_check_boxes(bx, i).to(device=features.device, dtype=work) for i, bx in enumerate(boxes)]
        if sum(len(bx) for bx in boxes) == 0:
            return features.new_zeros(0, self.output_dim)
        res = self.pooler_resolution
        kw = dict(output_size=(res, res), spatial_scale=1.0 / self.stride, sampling_ratio=0, aligned=True)
        features = features.to(work)
        if image_sizes is None:
            pooled = roi_align(features, boxes, **kw)
        else:
            if len(image_sizes) != features.shape[0]:
                raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {features.shape[0]} images")
            # Each image's own window: bilinear samples past its edge clamp as if it were alone.
            parts = []
            for i, ((h, w), bx) in enumerate(zip(image_sizes, boxes, strict=True)):
                if len(bx):
                    fh, fw = self.feature_size(h, w)
                    parts.append(roi_align(features[i : i + 1, :, :fh, :fw], [bx], **kw))
            pooled = torch.cat(parts)
        return self._head(pooled.to(dtype))

    def forward(
        self,
        images: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] + boxes (list of [R_i, 4] in image pixels) -> [sum R_i, D]."""
        return self.pool_regions(self.dense_features(images, image_sizes), boxes, image_sizes)


def _check_boxes(boxes: torch.Tensor, index: int) -> torch.Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {index}: boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"image {index}: boxes contain NaN or inf")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"image {index}: boxes must be x0 y0 x1 y1 with x1 >= x0 and y1 >= y0")
    return boxes


def encode_regions(
    model: nn.Module,
    images: Sequence[Image.Image],
    boxes: Sequence[torch.Tensor],
    short_side: int = 800,
    max_side: int = 1333,
    size_divisibility: int = 0,
    batch_size: int = 8,
    normalize: bool = False,
) -> list[torch.Tensor]:
    """Region embeddings for PIL images with boxes in ORIGINAL image pixels.

    ``model``: an open_clip model (its ``.visual`` is used) or a :class:`RegionEncoder`. Each image
    is resized to detection size (bicubic, CLIP normalisation from the tower's ``image_mean`` /
    ``image_std``), boxes are scaled alike, and images are batched ``batch_size`` at a time with
    per-image features, so results do not depend on batching. Returns one [R_i, D] tensor per image
    (L2-normalised rows when ``normalize``). Gradients flow; wrap in ``torch.no_grad()`` for inference.
    """
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box tensors")
    encoder = model if isinstance(model, RegionEncoder) else RegionEncoder(model.visual)
    mean = getattr(encoder.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(encoder.visual, "image_std", None) or CLIP_STD
    param = next(encoder.parameters())
    out: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        tensors, scaled = [], []
        for i in range(start, min(start + batch_size, len(images))):
            tensor, scale = resize_for_detection(images[i], short_side, max_side, mean=mean, std=std)
            # a very thin image (1 x 4000) resizes below one feature cell: pad it with the mean colour
            short_h, short_w = (
                max(0, encoder.stride - tensor.shape[1]),
                max(0, encoder.stride - tensor.shape[2]),
            )
            tensors.append(F.pad(tensor, (0, short_w, 0, short_h)))
            scaled.append(scale_boxes(_check_boxes(boxes[i], i).float(), scale))
        batch, sizes = batch_images(tensors, size_divisibility)
        emb = encoder(batch.to(device=param.device, dtype=param.dtype), scaled, sizes)
        if normalize:
            emb = F.normalize(emb, dim=-1)
        out.extend(emb.split([len(b) for b in scaled]))
    return out
