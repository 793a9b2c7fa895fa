"""Decoding images from files and shard bytes, with a pixel-count guard.

Pillow's own decompression-bomb limit (an error only above 179 megapixels) lets a 90-megapixel
image through, which costs gigabytes once decoded and resized; :data:`MAX_PIXELS` refuses such
images before any pixel is decoded, as a bad sample that batch stages skip and count.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

MAX_PIXELS = 40_000_000  # about 6,300 x 6,300; 120 MB of RGB once decoded
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what a bad image raises here


def load_rgb(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file or encoded bytes as RGB.

    Raises:
        ValueError: over ``max_pixels`` pixels (read from the header; nothing decoded).
        OSError / DecompressionBombError: not a readable image.
    """
    im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if im.width * im.height > max_pixels:
        size = f"{im.width}x{im.height}"
        im.close()
        raise ValueError(f"{size} image is over the {max_pixels:,}-pixel limit")
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
