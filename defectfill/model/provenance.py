"""What a generated image was made with, as digests a manifest row can record: the base model's weights and the
run's LoRA file (`weights_sha256`, `file_sha256`).

A base's digest is the SHA-256 over its weight files' own SHA-256s, each beside its path in the folder. A file in
the Hugging Face cache is a link to a blob named by its SHA-256 (the hub's LFS object id), so a cached SD2 is not
read again; a local folder's files are hashed once per process (by path, size and modification time).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_hashed: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256 (hex): the name of the Hugging Face cache blob it links to, else read and hashed."""
    path = Path(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
            return target.name
    stat = path.stat()
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashed:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _hashed[key] = digest.hexdigest()
    return _hashed[key]


def local_model_dir(model: str) -> Path | None:
    """The folder a model name loads from: a local folder as given (a built-in name resolved first), else the
    Hugging Face cache's snapshot of a hub id (no network is asked); None when neither is on this machine."""
    from defectfill.model.pipeline import resolve_model

    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached, or not a hub id: the row records no digest rather than failing the job
        return None


def weights_sha256(model: str) -> str | None:
    """The digest of a base model's weight files (module docstring), None when its folder is not on this machine
    or holds no weights."""
    folder = local_model_dir(model)
    if folder is None:
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(folder).as_posix()} {file_sha256(f)}\n".encode())
    return digest.hexdigest()
