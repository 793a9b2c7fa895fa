"""Small shared helpers: device choice, file hashing, atomic writes, umask-respecting modes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from regionclip.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a config device string into a ``torch.device``.

    ``auto`` picks CUDA when available, else CPU; ``cuda``/``cuda:N`` fails clearly without a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; expected one of {DEVICE_CHOICES} (or cuda:N)")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weights files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def process_umask() -> int:
    """The process's umask (read without changing it where /proc allows; threads may be running)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain ``open`` would.

    Some writers create owner-only files (safetensors writes 0600, ``mkdtemp`` makes 0700
    folders); outputs should be readable by whoever the user's umask lets read them.
    """
    path = Path(path)
    mask = process_umask()
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` uses: hidden, beside it, and owned by this process
    (host and pid in the name), so that no other run takes it for a stale leftover."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def is_stale_temp(temp: str | os.PathLike) -> bool:
    """Whether a :func:`temp_path` file was left by a process of this host that no longer runs.
    Temps of other hosts (a shared file system) and of live processes are never stale."""
    host, _, pid = Path(temp).name.rpartition(".tmp-")[2].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def require_writable(folder: str | os.PathLike, key: str, error: type[Exception] = InputError) -> None:
    """Create ``folder`` and write a probe file in it now, so that a folder the run cannot write
    fails at the start with one line naming the config ``key``, not hours later at the first save."""
    folder = Path(folder)
    probe = temp_path(folder / ".write-probe")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise error(f"{key}={folder}: cannot write there ({e.strerror})") from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    Readers never see a half-written file: on error the temporary file is removed and an
    existing ``path`` is left untouched. The result gets the umask's mode whatever the writer
    chose (:func:`apply_umask`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, an earlier folder
    there is swapped out and deleted. Entries get the umask's mode; on error ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp and safetensors make owner-only entries
        if path.exists():
            # A folder cannot be replaced in one step: park the old one, swap, then delete it.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def parse_json(data: bytes | str) -> Any:
    """``json.loads`` that fails with ValueError only, also on hostile input: bytes that are not
    UTF-8, nesting deep enough for a RecursionError, an integer over Python's digit limit."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", error: type[ValueError] = InputError) -> Any:
    """Parsed JSON of ``path``; unreadable or invalid files raise ``error`` naming the file."""
    try:
        return parse_json(Path(path).read_bytes())
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except ValueError as e:
        raise error(f"{path}: invalid JSON: {e}") from None
