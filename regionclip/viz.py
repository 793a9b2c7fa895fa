"""All drawing: detections on images, pseudo-labels, grids of pictures, loss curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from regionclip.data.pseudo_labels import PseudoLabels
from regionclip.utils import atomic_output

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
PALETTE += [(240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def save_png(image: Image.Image, out: str | Path) -> None:
    with atomic_output(out) as tmp:
        image.save(tmp, format="PNG")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, names: Sequence[str]
) -> Image.Image:
    """A copy of ``image`` with each box, its class name and score drawn (lowest score first)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = _font(max(10, min(out.size) // 40))
    width = max(1, min(out.size) // 200)
    for i in reversed(range(len(boxes))):
        x0, y0, x1, y1 = boxes[i].tolist()
        colour = PALETTE[int(labels[i]) % len(PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names[int(labels[i])]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (bottom - top) if y0 - (bottom - top) >= 0 else y0
        draw.rectangle([x0, ty, x0 + right - left, ty + bottom - top], fill=colour)
        draw.text((x0, ty - (top - y0)), text, fill=(255, 255, 255), font=font)
    return out


def draw_pseudo_labels(
    labels: PseudoLabels, names: Sequence[str], cell: int, min_score: float, max_boxes: int
) -> Image.Image:
    """One grid cell: the image scaled to fit ``cell`` pixels with its best kept boxes and their
    concept names (grey canvas when the labels carry no image)."""
    w, h = labels.width, labels.height
    image = labels.image if labels.image is not None else Image.new("RGB", (w, h), (128, 128, 128))
    scale = cell / max(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (cell, cell + 14), (255, 255, 255))
    canvas.paste(image, (0, 14))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text(
        (2, 1), f"{labels.key}: {labels.num_kept}/{labels.num_proposals} kept", fill=(0, 0, 0), font=font
    )
    order = sorted(range(len(labels.score)), key=lambda i: -float(labels.score[i]))
    shown = [i for i in order if labels.score[i] >= min_score][:max_boxes]
    for n, i in enumerate(shown):
        colour = COLOURS[n % len(COLOURS)]
        x0, y0, x1, y1 = (float(v) * scale for v in labels.boxes[i])
        draw.rectangle([x0, y0 + 14, x1, y1 + 14], outline=colour, width=2)
        cid = int(labels.concept[i])
        label = f"{names[cid] if 0 <= cid < len(names) else cid} {float(labels.score[i]):.2f}"
        tw = draw.textlength(label, font=font)
        draw.rectangle([x0, y0 + 14, x0 + tw + 2, y0 + 26], fill=colour)
        draw.text((x0 + 1, y0 + 14), label, fill=(0, 0, 0), font=font)
    return canvas


CURVE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _panel(title: str, series: dict[str, list[tuple[int, float]]], size: tuple[int, int]) -> Image.Image:
    w, h = size
    left, right, top, bottom = 56, 12, 24, 30
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 5), title, fill=(0, 0, 0), font=font)
    points = [pt for s in series.values() for pt in s]
    x0, y0, x1, y1 = left, top, w - right, h - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    if not points:
        draw.text((x0 + 8, y0 + 8), "no losses logged", fill=(0, 0, 0), font=font)
        return img
    smin, smax = min(p[0] for p in points), max(p[0] for p in points)
    vmin, vmax = min(p[1] for p in points), max(p[1] for p in points)
    smax, vmax = (smax if smax > smin else smin + 1), (vmax if vmax > vmin else vmin + 1)

    def xy(step: int, value: float) -> tuple[float, float]:
        return (
            x0 + (x1 - x0) * (step - smin) / (smax - smin),
            y1 - (y1 - y0) * (value - vmin) / (vmax - vmin),
        )

    for k, (term, pts) in enumerate(series.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        coords = [xy(s, v) for s, v in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        else:
            cx, cy = coords[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.text((x1 - 90, y0 + 4 + 12 * k), term, fill=colour, font=font)
    draw.text((4, y0 - 4), f"{vmax:.3g}", fill=(0, 0, 0), font=font)
    draw.text((4, y1 - 8), f"{vmin:.3g}", fill=(0, 0, 0), font=font)
    draw.text((x0, y1 + 4), f"step {smin}", fill=(0, 0, 0), font=font)
    draw.text((x1 - 60, y1 + 4), f"step {smax}", fill=(0, 0, 0), font=font)
    return img


def draw_loss_curves(
    panels: Sequence[tuple[str, dict[str, list[tuple[int, float]]]]], size: tuple[int, int] = (480, 300)
) -> Image.Image:
    """One panel per training run (title, :func:`read_loss_log` series) side by side; each panel
    has its own axes (the teacher's and the student's losses have different scales)."""
    cells = [_panel(title, series, size) for title, series in panels]
    return image_grid(cells, cols=len(cells))


def image_grid(cells: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Cells (the size of the first) in rows of ``cols`` (default: a square-ish grid), white gaps."""
    if not cells:
        raise ValueError("no images for the grid")
    cols = cols or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    cw, ch = cells[0].size
    grid = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % cols) * cw, (i // cols) * ch))
    return grid
