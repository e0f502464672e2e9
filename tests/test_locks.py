"""`core.folders.folder_lock` on filelock: one exclusive holder, shared holders beside each other but not beside
an exclusive one, the holder named, and a killed holder's lock free at once (no stale lock)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from defectfill.core.errors import DefectFillError
from defectfill.core.folders import LOCK, folder_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with folder_lock(tmp_path, "train"):
        with pytest.raises(DefectFillError, match=r"another defectfill job is writing here \(defectfill train, pid"):
            with folder_lock(tmp_path, "generate"):
                pass
    with folder_lock(tmp_path, "generate"):  # released: the next one gets it
        pass
    assert (tmp_path / LOCK).is_file()  # kept, so every holder locks one file


def test_shared_holders_exclude_an_exclusive_one_both_ways(tmp_path):
    with folder_lock(tmp_path, "run --shard 1/2", shared=True), folder_lock(tmp_path, "run --shard 2/2", shared=True):
        with pytest.raises(DefectFillError, match="run --shard 2/2"):
            with folder_lock(tmp_path, "run --report-only"):
                pass
    with folder_lock(tmp_path, "run"):
        with pytest.raises(DefectFillError, match=r"\(defectfill run, pid"):
            with folder_lock(tmp_path, "run --shard 1/2", shared=True):
                pass


@pytest.mark.parametrize("shared", [False, True])
def test_a_killed_holder_leaves_no_stale_lock(tmp_path, shared):
    """A job killed with SIGKILL (no cleanup runs) holds nothing: the next job gets the lock at once."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from defectfill.core.folders import folder_lock
        with folder_lock({str(tmp_path)!r}, "train", shared={shared}):
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DefectFillError, match="another defectfill job"):
            with folder_lock(tmp_path, "generate"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK).is_file()  # the file stays behind, the lock does not
    with folder_lock(tmp_path, "generate"):
        pass
