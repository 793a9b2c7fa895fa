"""Text embeddings of class names / concepts with prompt ensembles, and their files.

RegionCLIP's concept embedding: for each name, the mean over templates of
the *un-normalised* CLIP text embeddings; rows are normalised only where they are used.

Embedding files are safetensors with one ``[K, D]`` float32 tensor under ``embeddings`` and
string metadata (model, weights identity, template set, ``normalized``, ``count``, ``dim``,
``names_sha256``); the K names lie beside it in ``<stem>.txt``, one per line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import safetensors
import safetensors.torch
import torch
from tqdm import tqdm

from regionclip.prompts import fill, get_templates
from regionclip.utils import atomic_output, atomic_write_text

if TYPE_CHECKING:
    from regionclip.models.loading import LoadedClip

log = logging.getLogger(__name__)

EMBEDDINGS_KEY = "embeddings"
PROGRESS_MIN_NAMES = 100  # fewer names finish too fast to need a progress bar


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=False)`` computed on the first L = (last EOT + 1) positions.

    CLIP's text transformer is causal and pools at the EOT token (the largest id), so positions
    after the batch's last EOT cannot change the result; prompts are ~10 of 77 tokens, so this
    skips most of the work. Models of another kind (custom text towers, other pooling) fall
    back to ``encode_text``.

    Args:
        tokens: LongTensor [N, context_length] from the model's tokenizer.

    Returns:
        [N, D] un-normalised text embeddings.
    """
    if not (
        isinstance(model, open_clip.CLIP)
        and model.text_pool_type == "argmax"
        and model.attn_mask is not None
        and tokens.shape[1] == model.positional_embedding.shape[0]
    ):
        return model.encode_text(tokens, normalize=False)
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def embed_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Prompt-ensembled text embeddings.

    Args:
        model: open_clip model with ``encode_text(tokens, normalize=False)``.
        tokenizer: open_clip tokenizer, list of K·T strings → LongTensor [K·T, context_length].
        names: K class/concept names.
        templates: T templates with a ``{}`` placeholder (filled by :func:`regionclip.prompts.fill`).
        batch_size: prompts per ``encode_text`` call.
        device: where to run; default the model's device.

    Returns:
        float32 CPU tensor [K, D]: row k = mean over templates of un-normalised embeddings.
    """
    names = list(names)
    templates = list(templates)
    if not names:
        raise ValueError("embed_texts: empty list of names")
    if not templates:
        raise ValueError("embed_texts: empty list of templates")
    if batch_size < 1:
        raise ValueError(f"embed_texts: batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompts = [fill(t, n) for n in names for t in templates]
    owner = torch.arange(len(names), device=device).repeat_interleave(len(templates))
    # Accumulate per-name sums instead of keeping all K·T embeddings (6.8k concepts × 81 × 1024 ≈ 2 GB).
    sums: torch.Tensor | None = None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    start_time = time.perf_counter()
    with (
        torch.no_grad(),
        autocast,
        tqdm(
            total=len(prompts), unit="prompt", desc="text embeddings", disable=len(names) < PROGRESS_MIN_NAMES
        ) as bar,
    ):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            tokens = tokenizer(batch).to(device)
            feats = encode_text_trimmed(model, tokens).float()
            if sums is None:
                sums = torch.zeros(len(names), feats.shape[1], dtype=torch.float32, device=device)
            sums.index_add_(0, owner[start : start + len(batch)], feats)
            bar.update(len(batch))
    seconds = time.perf_counter() - start_time
    log.info(
        "embedded %d names × %d templates in %.1f s (%.0f prompts/s)",
        len(names),
        len(templates),
        seconds,
        len(prompts) / max(seconds, 1e-9),
    )
    return (sums / len(templates)).cpu()


def embed_class_names(
    loaded: LoadedClip,
    names: Sequence[str],
    template_set: str = "ensemble",
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Un-normalised prompt-ensemble embeddings [K, D] of ``names`` with a loaded CLIP model."""
    return embed_texts(loaded.model, loaded.tokenizer, names, get_templates(template_set), batch_size, device)


def embedding_metadata(loaded: LoadedClip, template_set: str) -> dict[str, str]:
    """The metadata that identifies embeddings made by :func:`embed_class_names`."""
    return {
        "model": loaded.identity["model"],
        "pretrained": loaded.identity["pretrained"],
        "weights_id": loaded.weights_id,
        "weights_sha256": loaded.identity["sha256"],
        "template_set": template_set,
        "num_templates": str(len(get_templates(template_set))),
    }


def names_sha256(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def names_path(path: str | os.PathLike) -> Path:
    """The names file that goes with an embeddings file: ``<stem>.txt`` beside it."""
    return Path(path).with_suffix(".txt")


def _meta_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def save_embeddings(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    names: Sequence[str],
    metadata: dict[str, Any],
    normalized: bool = False,
) -> None:
    """Write ``[K, D]`` embeddings (safetensors) and their names (``<stem>.txt``), each atomically.

    Non-string metadata values are stored as JSON. ``normalized``, ``count``, ``dim`` and
    ``names_sha256`` are filled in here; the hash lets :func:`load_embeddings` detect a names
    file that does not belong to the embeddings.
    """
    names = list(names)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
        raise ValueError(
            f"{path}: embeddings of shape {tuple(embeddings.shape)} do not match {len(names)} names (need [K, D])"
        )
    bad = [n for n in names if not n or "\n" in n or "\r" in n or n != n.strip()]
    if bad:
        raise ValueError(
            f"{path}: names must be non-empty single lines without outer whitespace, got {bad[:5]!r}"
        )
    meta = {k: _meta_str(v) for k, v in metadata.items()}
    meta.update(
        normalized="true" if normalized else "false",
        count=str(len(names)),
        dim=str(embeddings.shape[1]),
        names_sha256=names_sha256(names),
    )
    tensor = embeddings.detach().to("cpu", torch.float32).contiguous()
    atomic_write_text(names_path(path), "".join(n + "\n" for n in names))
    with atomic_output(path) as tmp:
        safetensors.torch.save_file({EMBEDDINGS_KEY: tensor}, str(tmp), metadata=meta)


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Read what :func:`save_embeddings` wrote: ``(embeddings [K, D] float32, names, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if EMBEDDINGS_KEY not in f.keys():
                raise ValueError(f"{path}: no '{EMBEDDINGS_KEY}' tensor (keys: {list(f.keys())})")
            embeddings = f.get_tensor(EMBEDDINGS_KEY)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    txt = names_path(path)
    if not txt.is_file():
        raise FileNotFoundError(
            f"{path}: names file {txt} is missing (one name per line, K={embeddings.shape[0]})"
        )
    names = txt.read_text(encoding="utf-8").split("\n")
    if names[-1] == "":  # the final newline
        names.pop()
    if embeddings.ndim != 2 or len(names) != embeddings.shape[0]:
        raise ValueError(
            f"{path}: {txt} has {len(names)} names but the embeddings have shape {tuple(embeddings.shape)}"
        )
    expected = metadata.get("names_sha256")
    if expected and expected != names_sha256(names):
        raise ValueError(
            f"{path}: {txt} is not the names list these embeddings were saved with (names_sha256 differs)"
        )
    return embeddings.float(), names, metadata


def cached_class_embeddings(
    loaded: LoadedClip,
    names: Sequence[str],
    template_set: str,
    path: str | os.PathLike,
    batch_size: int = 256,
) -> torch.Tensor:
    """:func:`embed_class_names`, kept in ``path`` and read back while it holds exactly these names
    embedded by the same weights with the same templates (an unreadable file is replaced)."""
    names = list(names)
    meta = embedding_metadata(loaded, template_set)
    if Path(path).is_file():
        try:
            emb, cached, saved = load_embeddings(path)
            if cached == names and all(saved.get(k) == v for k, v in meta.items()):
                return emb
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable class-embedding cache %s: %s", path, e)
    emb = embed_class_names(loaded, names, template_set, batch_size)
    save_embeddings(path, emb, names, meta)
    return emb


# --------------------------------------------------------------------------------------------
# Class vocabularies
# --------------------------------------------------------------------------------------------


def read_names_file(path: str | os.PathLike) -> list[str]:
    """Class names, one per line; blank lines are skipped, whitespace collapsed, duplicates dropped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read vocabulary file {path}: {e.strerror}") from None
    names: list[str] = []
    for line in lines:
        name = " ".join(line.split())
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"vocabulary file {path} holds no class names")
    return names


def class_embeddings_for(
    loaded: LoadedClip,
    names: Sequence[str],
    template_set: str = "ensemble",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompt-ensembled class embeddings [C, D] (un-normalised) of ``names`` for ``loaded``.

    With ``cache_dir`` the result is kept in ``classes-<key>.safetensors`` there, the key made of
    the model weights identity, the names and the template set (:func:`cached_class_embeddings`).
    """
    names = list(names)
    if not names:
        raise ValueError("class_embeddings_for: empty list of class names")
    if not cache_dir:
        return embed_class_names(loaded, names, template_set, batch_size)
    key = hashlib.sha256(
        json.dumps([loaded.weights_id, names_sha256(names), template_set]).encode()
    ).hexdigest()[:16]
    return cached_class_embeddings(
        loaded, names, template_set, Path(cache_dir) / f"classes-{key}.safetensors", batch_size
    )


def check_class_embeddings(
    embeddings: torch.Tensor, embed_dim: int, num_classes: int, source: str, target: str
) -> None:
    """Fail clearly when ``embeddings`` [C, D] do not fit the model (D) or the class list (C).

    ``source`` names where the embeddings came from, ``target`` the class list (e.g. the json).
    """
    if embeddings.ndim != 2:
        raise ValueError(f"{source}: class embeddings must be [C, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != embed_dim:
        raise ValueError(
            f"{source}: class embeddings have dimension {embeddings.shape[1]} but the model embeds "
            f"to {embed_dim}; make them with the same model"
        )
    if embeddings.shape[0] != num_classes:
        raise ValueError(
            f"{source}: {embeddings.shape[0]} class embeddings but {target} has {num_classes} categories"
        )
