"""Detection training data shared by the RPN and the detector transfer: box maths, the image
dataset over a :class:`~regionclip.data.coco.CocoSet`, and the step-indexed sampler.

:class:`StepSampler` makes step ``s`` always get the same images, flips and scales: sample
position ``p = s * batch_size + j`` is entry ``p % N`` of epoch ``p // N``'s seeded draw, so a
resumed run needs no sampler state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from regionclip.data.coco import CocoImage
from regionclip.data.images import UNREADABLE, load_rgb
from regionclip.data.sample_errors import error_record


def flip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """Boxes [R, 4] (x0 y0 x1 y1, continuous pixel coordinates) of an image ``width`` wide, mirrored
    left-right: x -> width - x, so (x0, x1) -> (width - x1, width - x0)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def clip_boxes(boxes: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Boxes [R, 4] clamped into a ``width x height`` image, and the bool [R] of those with area left."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], keep


# (image, boxes, labels, flipped, short side, the json image) -> the training sample
Transform = Callable[[Image.Image, Tensor, Tensor, bool, int, CocoImage], dict[str, Any]]


class BoxImages(Dataset):
    """Items ``(index, flip, short_side)`` of :class:`StepSampler` → ``transform`` of the image (RGB,
    flipped when asked) with its boxes (clipped, flipped) and class labels; an error record
    (``unreadable_image``) for a file that cannot be read."""

    def __init__(self, images: Sequence[CocoImage], transform: Transform):
        self.images, self.transform = list(images), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, bool, int]) -> dict[str, Any]:
        index, flip, short_side = item
        rec = self.images[index]
        try:
            image = load_rgb(rec.path)
        except UNREADABLE as e:
            return error_record("unreadable_image", rec.file_name, str(rec.path), str(e))
        w, h = image.size
        boxes, keep = clip_boxes(rec.boxes, w, h)
        labels = rec.labels[keep]
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = flip_boxes(boxes, w)
        return self.transform(image, boxes, labels, flip, short_side, rec)


class StepSampler(Sampler):
    """Batches of ``(index, flip, short_side)`` for steps ``start..stop-1`` (see the module doc).

    Epoch ``e``'s draw, from a generator seeded by ``(seed, e)``: a permutation of the N images,
    then a flip per position (probability ``hflip_prob``), then — with several ``short_sides`` —
    a short side per position (``short_sides[0]`` otherwise).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        hflip_prob: float,
        start: int,
        stop: int,
        short_sides: Sequence[int] = (0,),
    ):
        self.n, self.batch_size, self.seed, self.hflip_prob = n, batch_size, seed, hflip_prob
        self.start, self.stop, self.short_sides = start, stop, list(short_sides)
        self._epoch = -1
        self._draw: tuple[Tensor, Tensor, Tensor | None] = (torch.empty(0), torch.empty(0), None)

    def __len__(self) -> int:
        return self.stop - self.start

    def _entry(self, p: int) -> tuple[int, bool, int]:
        epoch = p // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            flips = torch.rand(self.n, generator=g) < self.hflip_prob
            sides = (
                torch.randint(len(self.short_sides), (self.n,), generator=g)
                if len(self.short_sides) > 1
                else None
            )
            self._epoch, self._draw = epoch, (perm, flips, sides)
        perm, flips, sides = self._draw
        i = p % self.n
        side = self.short_sides[int(sides[i])] if sides is not None else self.short_sides[0]
        return int(perm[i]), bool(flips[i]), int(side)

    def batch(self, step: int) -> list[tuple[int, bool, int]]:
        return [self._entry(p) for p in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, bool, int]]]:
        for step in range(self.start, self.stop):
            yield self.batch(step)
