"""Which folders a job may write, and one writer at a time.

- `claim_folder`: a command writes only into a folder it made (marked by
  `.defectfill.json`) or an empty one; a file, or a folder holding anything
  else, is refused with the way out named. (`train` and `generate` recognise
  their own folders by `config.json` and `generate.json`.)
- `folder_lock`: an exclusive lock on a job's folder for as long as the job
  runs, so a second writer is refused instead of mixing its results in. The
  lock is `filelock`'s on `.defectfill.lock` (flock; on Windows msvcrt): the
  system drops it when the holder dies, so a killed job never leaves a stale lock.
- `contained`: a path read from a file (a manifest, a split) resolved and
  required to stay inside the folder it belongs to.
- `check_plain_name`: a name from settings or metadata that becomes a folder
  name (category, defect type) must be one plain name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import defectfill
from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError

MARKER = ".defectfill.json"
LOCK = ".defectfill.lock"
IGNORED = {MARKER, LOCK}  # our own bookkeeping: not "something else" in a folder


def folder_problem(folder: Path, command: str, flag: str = "--output") -> str | None:
    """Why `defectfill <command>` may not write into `folder`, or None. Writes nothing."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{flag} {folder}: is a file, not a folder. Choose a folder (a new one is made)."
    marker = folder / MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text()).get("command")
        except (ValueError, OSError, AttributeError):
            owner = None
        if owner == command:
            return None
        return (f"{flag} {folder}: holds the output of `defectfill {owner or 'another command'}`, not of "
                f"`defectfill {command}`. Choose another folder.")
    others = sorted(p.name for p in folder.iterdir() if p.name not in IGNORED)
    if others:
        return (f"{flag} {folder}: folder is not empty and was not written by `defectfill {command}` "
                f"({', '.join(others[:5])}). Choose an empty or new folder.")
    return None


def claim_folder(folder: str | Path, command: str, flag: str = "--output") -> Path:
    """Make `folder` (if needed) and mark it as `defectfill <command>`'s, or refuse as `folder_problem` says."""
    folder = Path(folder).expanduser()
    problem = folder_problem(folder, command, flag)
    if problem:
        raise DefectFillError(problem)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        write_json(folder / MARKER, {"command": command, "defectfill_version": defectfill.__version__})
    return folder


def _lock_refused(folder: str | Path, path: Path, name: str) -> DefectFillError:
    """The message for a lock another job holds, naming that job when its lock file says."""
    try:
        holder = path.read_text(errors="replace").strip()[:200]
    except OSError:  # Windows: the holder's locked bytes cannot be read
        holder = ""
    what = "writing here" if name == LOCK else f"holding {path.name}"
    return DefectFillError(f"{folder}: another defectfill job is {what} ({holder or 'another process'}). Wait for "
                           "it to finish, or choose another folder.")


def _name_holder(fd: int, holder: bytes) -> None:
    """Write who holds the lock into its file (the lock stays held; readers only name it in a message)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, holder)


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str, shared: bool = False, name: str = LOCK) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (which must exist); a second holder is refused at once.

    `shared`: many shared holders at once (the shards of one `run`), none beside an exclusive one.
    `name`: the lock file in `folder` (`.defectfill.lock`; `run` also locks each defect type by its own file).

    The exclusive lock is `filelock.FileLock`: `flock` on Unix, `msvcrt.locking` on Windows, both dropped by the
    system when the holder dies (a killed job leaves no stale lock), the file kept on release
    (`preserve_lock_file`: waiters and shared holders lock one inode) and never a soft marker file (which a
    killed job would leave behind). filelock has no shared lock of this kind, so the shared one is `flock`
    `LOCK_SH` on the same file, which excludes filelock's `LOCK_EX` and the other way round (on Windows there
    is no shared lock).
    """
    path = Path(folder) / name
    holder = f"defectfill {command}, pid {os.getpid()}\n".encode()
    if shared:
        with _shared_lock(folder, path, name, holder):
            yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(path, blocking=False, thread_local=False, preserve_lock_file=True,
                    on_acquired=lambda fd: _name_holder(fd, holder))
    try:
        lock.acquire()
    except Timeout:
        raise _lock_refused(folder, path, name) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _shared_lock(folder: str | Path, path: Path, name: str, holder: bytes) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run without the shared lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise _lock_refused(folder, path, name) from None
        _name_holder(fd, holder)  # shared holders: the latest one is named
        yield
    finally:
        os.close(fd)  # closing drops the lock


def contained(root: Path, relative: str | Path, source: Path | str) -> Path:
    """`root / relative`, refused unless it stays inside `root`: no `..` or absolute path escapes.

    Checked on the names, not on resolved links, so a dataset whose files are symbolic links still reads.
    """
    root_name = os.path.normpath(os.path.abspath(root))
    path_name = os.path.normpath(os.path.join(root_name, relative))
    if os.path.commonpath([root_name, path_name]) != root_name:
        raise DefectFillError(f"{source}: names {relative!s}, which lies outside {root}. The file has been edited "
                              "or is not a defectfill file; refusing to touch that path.")
    return Path(root) / relative


def check_plain_name(value: str, what: str, source: str = "") -> None:
    """A name that becomes one folder name: not empty, no path separator, not `.` or `..`."""
    where = f"{source}: " if source else ""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\x00" in value:
        raise DefectFillError(f"{where}{what} {value!r} must be one plain name (no '/', '\\\\', '..'), "
                              "since it names a folder.")
