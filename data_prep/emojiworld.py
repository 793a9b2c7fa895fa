"""EmojiWorld: a synthetic open-vocabulary detection world made of colour emoji (docs/design.md).

    python -m data_prep.emojiworld --config configs/demo.yaml [--force] [key=value ...]

Writes into ``emojiworld.out_dir``:

- ``pretrain/pretrain-%06d.tar``: image–caption shards (captions name only some objects and add
  scene words that are not drawn; the drawn objects are in the json metadata for analysis only);
- ``images/{det_train,val}/*.jpg`` with ``det_train.json`` (COCO, base-class boxes only: novel
  objects are drawn but not annotated) and ``val.json`` (COCO, all boxes);
- ``categories.json``, ``preview.png`` and ``manifest.json`` (counts, config hash, sha256 of every
  file). A re-run with the same config finds the manifest and skips; ``--force`` regenerates.

Every image has its own random generator seeded by ``(seed, split, index)``, so the same config
gives byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data_prep.emoji_categories import CATEGORIES, EMOJI, SCENE_PHRASES, plural
from regionclip.cli import config_from_argv, reports_errors
from regionclip.config import EmojiWorldConfig, ExperimentConfig, section_hash
from regionclip.data.shards import ShardInfo, ShardWriter, encode_image, image_text_sample

GENERATOR_VERSION = 1  # bump when the same config would produce different files
DEBIAN_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PIXEL_SIZE = 109  # CBDT bitmap font: its only strike; any other size raises "invalid pixel size"
SPLIT_IDS = {"pretrain": 0, "det_train": 1, "val": 2}
CATEGORY_SPLIT_STREAM = 100  # seed-sequence tag of the base/novel split (apart from the image splits)
PLACEMENT_TRIES = 30
ALPHA_BOX = 16  # alpha at or above this is part of the glyph's tight box
ALPHA_SOLID = 128  # alpha at or above this counts as covering the pixel (occlusion)
BASE_COLOR, NOVEL_COLOR = (40, 220, 40), (255, 140, 0)


class EmojiWorldError(RuntimeError):
    """EmojiWorld cannot run: missing font, bad category list, inconsistent settings."""


# --------------------------------------------------------------------------------------------
# Categories and glyphs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    id: int  # 1-based, COCO style; the same in every json
    name: str
    emoji: str
    split: str  # "base" | "novel"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "emoji": self.emoji, "split": self.split}


def build_categories(ew: EmojiWorldConfig) -> list[Category]:
    """The first ``num_categories`` names, split into base and novel (explicit list or seeded draw)."""
    names = list(ew.categories) or [name for name, _ in CATEGORIES]
    unknown = [n for n in names if n not in EMOJI]
    if unknown:
        raise EmojiWorldError(
            f"emojiworld.categories: unknown names {unknown}; choose from data_prep/emoji_categories.py"
        )
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise EmojiWorldError(f"emojiworld.categories: duplicate names {dup}")
    if not 2 <= ew.num_categories <= len(names):
        raise EmojiWorldError(f"emojiworld.num_categories={ew.num_categories}: must be in 2..{len(names)}")
    names = names[: ew.num_categories]
    if ew.novel:
        outside = [n for n in ew.novel if n not in names]
        if outside:
            raise EmojiWorldError(
                f"emojiworld.novel: {outside} are not among the {len(names)} categories in use"
            )
        novel = set(ew.novel)
    else:
        n_novel = math.ceil(len(names) * ew.novel_fraction - 1e-9)
        rng = np.random.default_rng([ew.seed, CATEGORY_SPLIT_STREAM])
        novel = {names[i] for i in rng.choice(len(names), size=n_novel, replace=False)}
    if len(novel) == len(names):
        raise EmojiWorldError("emojiworld: every category is novel; the detection train set would be empty")
    return [Category(i + 1, n, EMOJI[n], "novel" if n in novel else "base") for i, n in enumerate(names)]


def resolve_font(configured: str) -> Path:
    """``emojiworld.font``, else ``$EMOJI_FONT``, else the Debian location; clear error if absent."""
    if configured:
        path, source = configured, "emojiworld.font"
    elif os.environ.get("EMOJI_FONT"):
        path, source = os.environ["EMOJI_FONT"], "$EMOJI_FONT"
    else:
        path, source = DEBIAN_FONT, "the default location"
    if not Path(path).is_file():
        raise EmojiWorldError(
            f"EmojiWorld needs the Noto Color Emoji font, but {path} ({source}) does not exist. Install the "
            "Debian package fonts-noto-color-emoji (sudo apt-get install fonts-noto-color-emoji) or point "
            "emojiworld.font=... or the EMOJI_FONT environment variable at NotoColorEmoji.ttf"
        )
    return Path(path)


class Glyphs:
    """Renders each emoji once at the font's native size; serves tight, resized RGBA copies."""

    def __init__(self, font_path: Path):
        try:
            self.font = ImageFont.truetype(str(font_path), FONT_PIXEL_SIZE)
        except OSError as e:
            raise EmojiWorldError(
                f"{font_path}: cannot load as a colour emoji font at {FONT_PIXEL_SIZE} px: {e}"
            ) from e
        self.font_path = font_path
        self._native: dict[str, Image.Image] = {}
        self._sized: dict[tuple[str, int], tuple[Image.Image, np.ndarray]] = {}

    def native(self, emoji: str) -> Image.Image:
        if emoji not in self._native:
            canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), emoji, font=self.font, embedded_color=True)
            bbox = canvas.getchannel("A").getbbox()
            if bbox is None:
                raise EmojiWorldError(f"{self.font_path}: no glyph for {emoji!r} (U+{ord(emoji[0]):04X})")
            self._native[emoji] = canvas.crop(bbox)
        return self._native[emoji]

    def sized(self, emoji: str, size: int) -> tuple[Image.Image, np.ndarray]:
        """Glyph whose longer side is ``size`` px, cropped to its visible box; plus its solid mask [h, w]."""
        key = (emoji, size)
        if key not in self._sized:
            native = self.native(emoji)
            scale = size / max(native.size)
            w, h = max(1, round(native.width * scale)), max(1, round(native.height * scale))
            glyph = native.resize((w, h), Image.Resampling.LANCZOS)
            alpha = np.asarray(glyph.getchannel("A"))
            ys, xs = np.nonzero(alpha >= ALPHA_BOX)
            glyph = glyph.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            self._sized[key] = (glyph, np.asarray(glyph.getchannel("A")) >= ALPHA_SOLID)
        return self._sized[key]


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------

NAMED_COLORS = {
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 60),
    "green": (60, 160, 70),
    "blue": (50, 90, 200),
    "purple": (130, 60, 170),
    "pink": (240, 150, 190),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (120, 80, 40),
}
BACKGROUND_WORDS = {
    "gradient": "gradient",
    "radial": "colorful",
    "stripes": "striped",
    "checker": "checkered",
    "clouds": "blurry",
}


@dataclass
class DrawnObject:
    category: Category
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixel edges (x1, y1 exclusive)
    visible: float  # fraction of its solid pixels left uncovered by later objects


@dataclass
class Scene:
    image: Image.Image  # RGB
    objects: list[DrawnObject]
    background: str  # kind, see BACKGROUND_WORDS (or "plain")
    caption: str
    mentioned: list[str]  # category names the caption names
    distractors: list[str]  # scene words in the caption that are not drawn


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def make_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    """A textured background [size, size, 3] float32 in 0..255, its kind and a caption adjective."""
    kind = str(rng.choice(["plain", "gradient", "radial", "stripes", "checker", "clouds"]))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c0, c1 = _random_color(rng), _random_color(rng)
    word = BACKGROUND_WORDS.get(kind, "")
    if kind == "plain":
        word = str(rng.choice(list(NAMED_COLORS)))
        base = np.asarray(NAMED_COLORS[word], np.float32) + rng.uniform(-20, 20, size=3)
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "clouds":
        cells = int(rng.integers(2, 7))
        low = Image.fromarray(rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8))
        img = np.asarray(low.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    else:
        if kind == "radial":
            cy, cx = rng.uniform(0, size, size=2)
            t = np.hypot(yy - cy, xx - cx) / (size * 1.2)
        else:
            angle = rng.uniform(0, np.pi)
            proj = xx * np.cos(angle) + yy * np.sin(angle)
            if kind == "gradient":
                t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
            elif kind == "stripes":
                period = rng.uniform(size / 16, size / 4)
                t = (np.floor(proj / (period / 2)) % 2).astype(np.float32)
            else:  # checker
                cell = max(2, int(rng.integers(size // 24, size // 6 + 1)))
                t = ((xx // cell + yy // cell) % 2).astype(np.float32)
        img = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)
    # uniform pixel noise (std 0..12): far cheaper to draw than Gaussian and just as good a texture
    noise = rng.integers(0, 256, size=img.shape, dtype=np.uint8).astype(np.float32) - 127.5
    img += noise * np.float32(rng.uniform(0, 12) / 73.9)
    return np.clip(img, 0, 255), kind, word


def place_objects(
    rng: np.random.Generator,
    canvas: Image.Image,
    categories: list[Category],
    glyphs: Glyphs,
    ew: EmojiWorldConfig,
) -> list[DrawnObject]:
    """Paste min..max_objects glyphs onto ``canvas`` (RGBA, in place); occlusion capped by max_overlap.

    A new object is rejected at a position where it would leave an earlier object with less than
    ``1 - max_overlap`` of its solid pixels visible; after PLACEMENT_TRIES rejections it is dropped.
    """
    size = canvas.width
    owner = np.full((size, size), -1, np.int32)  # index of the topmost object at each solid pixel
    totals: list[int] = []
    visible: list[int] = []
    objects: list[DrawnObject] = []
    n = int(rng.integers(ew.min_objects, ew.max_objects + 1))
    for _ in range(n):
        if objects and rng.random() < ew.repeat_prob:
            cat = objects[int(rng.integers(len(objects)))].category
        else:
            cat = categories[int(rng.integers(len(categories)))]
        side = min(int(rng.integers(ew.min_object_size, ew.max_object_size + 1)), size)
        glyph, solid = glyphs.sized(cat.emoji, side)
        h, w = solid.shape
        for _try in range(PLACEMENT_TRIES):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            window = owner[y : y + h, x : x + w]
            under = window[solid]
            covered = np.bincount(under[under >= 0], minlength=len(objects))
            left = np.asarray(visible) - covered
            if np.all(left >= (1.0 - ew.max_overlap) * np.asarray(totals)):
                break
        else:
            continue
        visible[:] = left.tolist()
        window[solid] = len(objects)
        totals.append(int(solid.sum()))
        visible.append(totals[-1])
        canvas.alpha_composite(glyph, (x, y))
        objects.append(DrawnObject(cat, (x, y, x + w, y + h), 1.0))
    for obj, vis, tot in zip(objects, visible, totals, strict=True):
        obj.visible = vis / max(tot, 1)
    return objects


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CORE_TEMPLATES = (
    "{objs}",
    "a photo of {objs}",
    "a picture of {objs}",
    "an image of {objs}",
    "a close-up of {objs}",
    "a snapshot of {objs}",
    "{objs} in the picture",
    "look at {objs}",
    "my {objs}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, name: str, count: int) -> str:
    if count == 1:
        return f"{_article(name)} {name}"
    if count < len(NUMBER_WORDS) and rng.random() < 0.85:
        return f"{NUMBER_WORDS[count]} {plural(name)}"
    return f"{rng.choice(['some', 'several', 'a few'])} {plural(name)}"


def make_caption(
    rng: np.random.Generator, objects: list[DrawnObject], background_word: str, ew: EmojiWorldConfig
) -> tuple[str, list[str], list[str]]:
    """Alt-text-like caption of a scene; returns (caption, mentioned names, distractor words).

    Each drawn category is named with probability ``caption_completeness`` (with its count, so
    repeats read "two dogs"); when none is picked the largest object is named, so a caption
    always names at least one drawn object.
    """
    counts = Counter(o.category.name for o in objects)
    names = [n for n in counts if rng.random() < ew.caption_completeness]
    if not names:
        largest = max(objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
        names = [largest.category.name]
    names = [names[i] for i in rng.permutation(len(names))]
    phrases = [_noun_phrase(rng, n, counts[n]) for n in names]
    if len(phrases) == 1:
        objs = phrases[0]
    else:
        joiner = str(rng.choice([" and ", " with ", " next to "])) if len(phrases) == 2 else " and "
        objs = ", ".join(phrases[:-1]) + joiner + phrases[-1]
    template = str(rng.choice(CORE_TEMPLATES))
    if template.startswith("my ") and objs.startswith(("a ", "an ")):
        objs = objs.split(" ", 1)[1]  # "my a dog" -> "my dog"
    parts = [template.format(objs=objs)]
    if rng.random() < 0.3:
        parts.append(f"on {_article(background_word)} {background_word} background")
    distractors: list[str] = []
    if ew.max_distractors > 0 and rng.random() < ew.distractor_prob:
        k = int(rng.integers(1, ew.max_distractors + 1))
        for i in rng.choice(len(SCENE_PHRASES), size=min(k, len(SCENE_PHRASES)), replace=False):
            word, phrase = SCENE_PHRASES[int(i)]
            distractors.append(word)
            parts.append(phrase if rng.random() < 0.7 else f", {phrase}")
    caption = " ".join(parts).replace(" ,", ",") + str(rng.choice(["", ".", "!"]))
    if rng.random() < 0.5:
        caption = caption[0].upper() + caption[1:]
    return caption, names, distractors


def render_scene(
    ew: EmojiWorldConfig, categories: list[Category], glyphs: Glyphs, split: str, index: int
) -> Scene:
    """One scene; everything random comes from the generator seeded by (seed, split, index)."""
    rng = np.random.default_rng([ew.seed, SPLIT_IDS[split], index])
    background, kind, word = make_background(rng, ew.image_size)
    canvas = Image.fromarray(background.astype(np.uint8)).convert("RGBA")
    objects = place_objects(rng, canvas, categories, glyphs, ew)
    caption, mentioned, distractors = make_caption(rng, objects, word, ew)
    return Scene(canvas.convert("RGB"), objects, kind, caption, mentioned, distractors)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OutputFiles:
    """Atomic writes under one root; remembers the sha256 and size of everything written."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.files[rel] = {"sha256": _sha256(data), "bytes": len(data)}

    def write_json(self, rel: str, obj: Any, indent: int | None = None) -> None:
        self.write(rel, json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent).encode("utf-8"))

    def record(self, path: Path) -> None:
        """Account for a file another writer put in place (a closed shard)."""
        data = path.read_bytes()
        self.files[path.relative_to(self.root).as_posix()] = {"sha256": _sha256(data), "bytes": len(data)}


def _object_meta(o: DrawnObject) -> dict[str, Any]:
    return {
        "category_id": o.category.id,
        "name": o.category.name,
        "box": list(o.box),
        "visible": round(o.visible, 3),
    }


def write_pretrain(ew: EmojiWorldConfig, cfg: ExperimentConfig, categories, glyphs, out: OutputFiles) -> dict:
    stats = Counter()

    def on_close(info: ShardInfo) -> None:
        out.record(Path(info.path))

    with ShardWriter(
        out.root / "pretrain", "pretrain", cfg.shards.maxcount, cfg.shards.maxsize, on_close=on_close
    ) as writer:
        for i in tqdm(range(ew.n_pretrain), desc="emojiworld pretrain", unit="img", mininterval=1.0):
            scene = render_scene(ew, categories, glyphs, "pretrain", i)
            key = f"pt{i:06d}"
            meta = {
                "width": ew.image_size,
                "height": ew.image_size,
                "source_id": f"emojiworld/pretrain/{key}",
                "objects": [_object_meta(o) for o in scene.objects],
                "background": scene.background,
                "mentioned": scene.mentioned,
                "distractors": scene.distractors,
            }
            jpg = encode_image(scene.image, "jpg", ew.jpeg_quality)
            writer.write(image_text_sample(key, jpg, "jpg", scene.caption, meta))
            stats["objects"] += len(scene.objects)
    stats["shards"] = len(writer.shards)
    return dict(stats)


def write_coco_split(
    ew: EmojiWorldConfig, split: str, n: int, categories, glyphs, out: OutputFiles
) -> tuple[dict[str, Any], list[Scene], dict]:
    """Images of a detection split and its COCO json; det_train keeps base-class boxes only."""
    prefix = {"det_train": "dt", "val": "va"}[split]
    keep_novel = split == "val"
    images, annotations, previews = [], [], []
    stats = Counter()
    for i in tqdm(range(n), desc=f"emojiworld {split}", unit="img", mininterval=1.0):
        scene = render_scene(ew, categories, glyphs, split, i)
        file_name = f"{split}/{prefix}{i:06d}.jpg"
        out.write(f"images/{file_name}", encode_image(scene.image, "jpg", ew.jpeg_quality))
        image_id = i + 1
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": ew.image_size,
                "height": ew.image_size,
                "caption": scene.caption,
            }
        )
        stats["objects"] += len(scene.objects)
        for o in scene.objects:
            if o.category.split == "novel" and not keep_novel:
                continue
            x0, y0, x1, y1 = o.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": o.category.id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
        if len(previews) < ew.preview_samples:
            previews.append(scene)
    cats = [{**c.as_json(), "supercategory": "emoji"} for c in categories if keep_novel or c.split == "base"]
    coco = {
        "info": {"description": f"EmojiWorld {split} (seed {ew.seed})", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    out.write_json(f"{split}.json", coco)
    stats["annotations"] = len(annotations)
    return coco, previews, dict(stats)


def render_preview(scenes: list[Scene], image_size: int) -> Image.Image:
    """Grid of scenes with GT boxes (green = base, orange = novel), names and captions."""
    scale = max(1, 256 // image_size)
    tile = image_size * scale
    font = ImageFont.load_default(size=12)
    line_h = 14
    cap_lines = 4
    cell_w, cell_h = tile + 8, tile + cap_lines * line_h + 12
    cols = max(1, math.ceil(math.sqrt(len(scenes))))
    rows = max(1, math.ceil(len(scenes) / cols))
    header = 20
    sheet = Image.new("RGB", (cols * cell_w, header + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), "EmojiWorld val: green = base class, orange = novel class", fill=(0, 0, 0), font=font)
    chars = max(8, int(tile / 6.5))
    for k, scene in enumerate(scenes):
        ox, oy = (k % cols) * cell_w + 4, header + (k // cols) * cell_h + 4
        sheet.paste(scene.image.resize((tile, tile), Image.Resampling.NEAREST), (ox, oy))
        boxes = []
        for o in scene.objects:
            color = NOVEL_COLOR if o.category.split == "novel" else BASE_COLOR
            x0, x1 = (ox + v * scale for v in o.box[0::2])
            y0, y1 = (oy + v * scale for v in o.box[1::2])
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=2)
            boxes.append((o.category.name, color, x0, y0))
        for name, color, x0, y0 in boxes:  # labels last, so no box line crosses them
            tw = draw.textlength(name, font=font)
            ty = max(oy, y0 - line_h)
            draw.rectangle((x0, ty, x0 + tw + 3, ty + line_h - 1), fill=color)
            draw.text((x0 + 2, ty), name, fill=(0, 0, 0), font=font)
        lines = textwrap.wrap(scene.caption, chars)[:cap_lines]
        for j, line in enumerate(lines):
            draw.text((ox, oy + tile + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def check_config(ew: EmojiWorldConfig) -> None:
    """Reject settings that cannot produce a valid world, naming the key."""
    problems = []
    if ew.image_size < 16:
        problems.append(f"image_size={ew.image_size} (need >= 16)")
    if not 1 <= ew.min_objects <= ew.max_objects:
        problems.append(f"min_objects={ew.min_objects}, max_objects={ew.max_objects} (need 1 <= min <= max)")
    if not 4 <= ew.min_object_size <= ew.max_object_size <= ew.image_size:
        problems.append(
            f"min_object_size={ew.min_object_size}, max_object_size={ew.max_object_size} "
            f"(need 4 <= min <= max <= image_size={ew.image_size})"
        )
    if not 0.0 <= ew.max_overlap < 1.0:
        problems.append(f"max_overlap={ew.max_overlap} (need 0 <= x < 1)")
    for key in ("novel_fraction", "caption_completeness", "distractor_prob", "repeat_prob"):
        if not 0.0 <= getattr(ew, key) <= 1.0:
            problems.append(f"{key}={getattr(ew, key)} (need 0 <= x <= 1)")
    for key in ("n_pretrain", "n_det_train", "n_val", "max_distractors", "preview_samples"):
        if getattr(ew, key) < 0:
            problems.append(f"{key}={getattr(ew, key)} (need >= 0)")
    if not 1 <= ew.jpeg_quality <= 100:
        problems.append(f"jpeg_quality={ew.jpeg_quality} (need 1..100)")
    if problems:
        raise EmojiWorldError("invalid emojiworld config: " + "; ".join(f"emojiworld.{p}" for p in problems))


def config_hash(cfg: ExperimentConfig) -> str:
    """Hash of everything that shapes the files; out_dir is left out so copies elsewhere match."""
    return section_hash(dataclasses.replace(cfg.emojiworld, out_dir=""), cfg.shards)


def shard_pattern(num_shards: int) -> str:
    """Brace pattern (relative to out_dir) naming the pretrain shards, as webdataset expands it."""
    return f"pretrain/pretrain-{{000000..{max(num_shards - 1, 0):06d}}}.tar"


def _existing_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(root: Path, manifest: dict[str, Any]) -> bool:
    files = manifest.get("files", {})
    return bool(files) and all(
        (root / rel).is_file() and (root / rel).stat().st_size == info.get("bytes")
        for rel, info in files.items()
    )


def generate(cfg: ExperimentConfig, force: bool = False) -> dict[str, Any]:
    """Generate (or reuse) the EmojiWorld dataset of ``cfg``; returns its manifest."""
    ew = cfg.emojiworld
    check_config(ew)
    root = Path(ew.out_dir)
    chash = config_hash(cfg)
    old = _existing_manifest(root)
    if (
        not force
        and old is not None
        and old.get("config_hash") == chash
        and old.get("generator_version") == GENERATOR_VERSION
        and _is_complete(root, old)
    ):
        print(f"emojiworld: {root} is up to date (config hash {chash}); skipping (use --force to regenerate)")
        return old
    categories = build_categories(ew)
    glyphs = Glyphs(resolve_font(ew.font))
    for c in categories:  # fail on a missing glyph before writing anything
        glyphs.native(c.emoji)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    out = OutputFiles(root)
    t0 = time.perf_counter()

    pre = write_pretrain(ew, cfg, categories, glyphs, out)
    det, _, det_stats = write_coco_split(ew, "det_train", ew.n_det_train, categories, glyphs, out)
    val, previews, val_stats = write_coco_split(ew, "val", ew.n_val, categories, glyphs, out)
    out.write_json("categories.json", [c.as_json() for c in categories], indent=1)
    if previews:
        out.write("preview.png", encode_image(render_preview(previews, ew.image_size), "png"))
    seconds = time.perf_counter() - t0

    n_images = ew.n_pretrain + ew.n_det_train + ew.n_val
    n_objects = pre.get("objects", 0) + det_stats.get("objects", 0) + val_stats.get("objects", 0)
    n_novel = sum(c.split == "novel" for c in categories)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "config_hash": chash,
        "pretrain_shards": shard_pattern(pre["shards"]),
        "counts": {
            "categories": len(categories),
            "base_categories": len(categories) - n_novel,
            "novel_categories": n_novel,
            "pretrain_images": ew.n_pretrain,
            "pretrain_shards": pre["shards"],
            "det_train_images": len(det["images"]),
            "det_train_boxes": len(det["annotations"]),
            "val_images": len(val["images"]),
            "val_boxes": len(val["annotations"]),
            "objects_drawn": n_objects,
        },
        "files": dict(sorted(out.files.items())),
    }
    if old is not None:  # files of an earlier, larger world that this one did not overwrite
        for rel in set(old.get("files", {})) - set(out.files):
            (root / rel).unlink(missing_ok=True)
    out.write_json("manifest.json", manifest, indent=1)
    print(
        f"emojiworld: {n_images} images ({ew.n_pretrain} pretrain in {pre['shards']} shards, "
        f"{ew.n_det_train} det-train, {ew.n_val} val), {n_objects} objects, {len(categories)} categories "
        f"({len(categories) - n_novel} base / {n_novel} novel) in {seconds:.1f} s "
        f"({n_images / max(seconds, 1e-9):.0f} images/s) -> {root}"
    )
    expected = str(root / manifest["pretrain_shards"])
    if ew.n_pretrain and cfg.data.pretrain_shards != expected:
        print(
            f"emojiworld: note: data.pretrain_shards is {cfg.data.pretrain_shards} but the shards written are "
            f"{expected}; set data.pretrain_shards accordingly",
            file=sys.stderr,
        )
    return manifest


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if manifest.json matches the config"
    )


@reports_errors(EmojiWorldError)
def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done (or up to date), 1 cannot generate (e.g. no font), 2 bad config or arguments."""
    cfg, args = config_from_argv(argv, "Generate the EmojiWorld dataset (docs/design.md).", _flags)
    generate(cfg, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
