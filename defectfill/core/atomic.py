"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from defectfill.core.errors import DefectFillError

# a write that fails for one of these reasons is the disk's or the folder's fault, not a bug: a message, no traceback
_REASONS = {
    errno.ENOSPC: ("no space left on the disk", "free some space"),
    errno.EDQUOT: ("no space left on the disk (quota)", "free some space"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or choose another folder"),
    errno.EPERM: ("permission denied", "fix the folder's permissions or choose another folder"),
}
_SAFETENSORS_REASONS = {"StorageFull": errno.ENOSPC, "No space": errno.ENOSPC, "ReadOnlyFilesystem": errno.EROFS,
                        "Read-only": errno.EROFS, "PermissionDenied": errno.EACCES, "Permission denied": errno.EACCES}


def write_failure(folder: str | Path, exc: BaseException) -> DefectFillError | None:
    """The message for a write into `folder` that failed with `exc` (disk full, read-only, not permitted), or
    None for any other exception (a bug, which keeps its traceback). Every write is atomic, so what was finished
    is intact and the same command continues from it."""
    code = exc.errno if isinstance(exc, OSError) else None
    if type(exc).__name__ == "SafetensorError":  # safetensors reports the OS error in its text
        code = next((c for key, c in _SAFETENSORS_REASONS.items() if key in str(exc)), None)
    if code not in _REASONS:
        return None
    reason, fix = _REASONS[code]
    return DefectFillError(
        f"{folder}: cannot write there: {reason} ({exc}). What was finished is kept and nothing half-written is "
        f"left; {fix}, then rerun the same command to continue (`defectfill train`: with --resume latest).")


@contextmanager
def writing_into(folder: str | Path, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, a write that fails (disk full, read-only, not permitted) becomes the message naming
    `folder` (`write_failure`); `cleanup` first removes what the failed write left. Other errors pass unchanged."""
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            cleanup()
        failure = write_failure(folder, exc)
        if failure is not None:
            raise failure from exc
        raise


def follow_umask(path: str | Path) -> None:
    """Give `path` the mode any new file gets (0666 less the umask); for files a library writes 0600."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and rename the result to `path` (same filesystem, so atomic)."""
    path = Path(path)
    tmp: list[str] = []

    def remove_tmp() -> None:
        if tmp and os.path.exists(tmp[0]):
            os.remove(tmp[0])

    with writing_into(path.parent, remove_tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        tmp.append(name)
        os.close(fd)
        write(Path(name))
        follow_umask(name)  # mkstemp makes 0600; the result follows the umask like any file
        os.replace(name, path)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is removed first."""
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
