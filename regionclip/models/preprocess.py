"""Detection-size image preprocessing shared by the teacher, the student and the detector.

RegionCLIP feeds the whole image, not crops: shorter side 800, longer side at most 1333, bicubic
resampling, CLIP mean/std normalisation, and zero padding to the batch maximum (RegionCLIP's
test-time resize). Boxes travel in original-image pixels between stages and are scaled here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)


def detection_size(
    height: int, width: int, short_side: int = 800, max_side: int = 1333
) -> tuple[int, int, float]:
    """Target ``(new_h, new_w, scale)`` for a ``height x width`` image.

    The shorter side goes to ``short_side`` unless the longer side would then exceed ``max_side``,
    in which case the longer side goes to ``max_side`` (Detectron2 ``ResizeShortestEdge``). The new
    sides are ``round(side * scale)``, so pixel coordinates map with the single factor ``scale`` to
    within half a pixel.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if short_side <= 0 or max_side < short_side:
        raise ValueError(f"need 0 < short_side <= max_side, got short_side={short_side}, max_side={max_side}")
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)), scale


def normalize_image(
    image: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """``(image - mean) / std`` per channel; ``image``: [3, H, W] or [B, 3, H, W] in [0, 1]."""
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image - m) / s


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> float RGB tensor [3, H, W] in [0, 1]."""
    return TF.pil_to_tensor(image.convert("RGB")).float().div_(255.0)


def resize_for_detection(
    image: Image.Image,
    short_side: int = 800,
    max_side: int = 1333,
    normalize: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, float]:
    """Resize a PIL image to detection size with bicubic resampling (PIL, as RegionCLIP does).

    Returns ``(tensor [3, H, W], scale)``: floats in [0, 1], or CLIP-normalised when ``normalize``;
    ``scale`` maps original pixel coordinates to resized ones (see :func:`scale_boxes`).
    """
    new_h, new_w, scale = detection_size(image.height, image.width, short_side, max_side)
    rgb = image.convert("RGB")
    if (new_h, new_w) != (rgb.height, rgb.width):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    tensor = pil_to_tensor(rgb)
    if normalize:
        tensor = normalize_image(tensor, mean, std)
    return tensor, scale


def batch_images(
    images: Sequence[torch.Tensor], size_divisibility: int = 0
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack images of different sizes into one zero-padded batch (image at the top-left).

    ``images``: list of [3, H_i, W_i] (normalised: padding with 0 is padding with the mean colour).
    Returns ``(batch [B, 3, H, W], image_sizes [(H_i, W_i)])`` with H, W the maxima, rounded up to a
    multiple of ``size_divisibility`` when it is > 0 (so stride-32 feature maps align). Boxes keep
    their coordinates because nothing is shifted.
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    for i, im in enumerate(images):
        if im.dim() != 3:
            raise ValueError(f"image {i}: expected a [C, H, W] tensor, got shape {tuple(im.shape)}")
        if im.shape[0] != images[0].shape[0]:
            raise ValueError(f"image {i}: {im.shape[0]} channels, image 0 has {images[0].shape[0]}")
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    if size_divisibility > 0:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    # F.pad keeps the batch differentiable w.r.t. the images (unlike an in-place copy into zeros).
    batch = torch.stack([F.pad(im, (0, max_w - im.shape[2], 0, max_h - im.shape[1])) for im in images])
    return batch, sizes


def scale_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Boxes [N, 4] (x0, y0, x1, y1) multiplied by ``scale``.

    Original -> resized pixels with the ``scale`` from :func:`resize_for_detection`; resized ->
    original with ``1 / scale``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    return boxes * scale
