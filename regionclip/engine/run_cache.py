"""The one run cache: a stage's outputs are reused when their recorded run hash matches.

A stage hashes what its outputs depend on (its config section, the files it reads, the outputs of
earlier stages it was given) with :func:`run_hash`, records the hash in its completion file (a
summary, a manifest, the metrics), and on the next run :func:`finished` returns that file when the
hash still matches, so the stage skips itself instead of redoing finished work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from regionclip.utils import parse_json, sha256_file


def run_hash(*parts: Any) -> str:
    """Short, stable hash of JSON-able ``parts`` (dict key order does not matter)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike | None) -> str:
    """sha256 of a file's content, or its path as given when there is no such file (a tag, a URL)."""
    if path and Path(path).is_file():
        return sha256_file(path)
    return str(path or "")


def file_stamp(path: str) -> dict[str, Any]:
    """Cheap identity of a possibly large input: absolute path, size and mtime; only the path for a
    URL or ``pipe:`` command."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path}
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = parse_json(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished(path: str | os.PathLike, expected: str, field: str = "run_hash") -> dict[str, Any] | None:
    """The completion record in ``path`` when its ``field`` equals ``expected``, else None."""
    record = read_record(path)
    return record if record is not None and record.get(field) == expected else None
