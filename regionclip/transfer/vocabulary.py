"""The detector's vocabulary: class-embedding rows picked by category name, for the torchvision
detector and the Detectron2 plugin alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from regionclip.errors import TransferError


def select_embeddings(
    embeddings: Tensor, names: Sequence[str], wanted: Sequence[str], source: str, json_path: str | Path
) -> Tensor:
    """Rows of ``embeddings`` [K, D] (named ``names``) for the category names ``wanted``, in order.

    Raises:
        TransferError: some categories of ``json_path`` have no embedding in ``source``.
    """
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise TransferError(
            f"class-count mismatch: {json_path} has {len(wanted)} categories but {source} holds "
            f"{len(names)} class embeddings without {len(missing)} of them: {missing[:5]}"
        )
    return embeddings[[index[n] for n in wanted]]
