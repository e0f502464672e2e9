"""Relocatable runs (issue 26, part 6): config.json and split.json record the data absolute and relative to the
run folder, resolved when read, so a run folder works from any directory and after it and its dataset move
together."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from defectfill.cli import main
from defectfill.data import read_split
from defectfill.outputs.generated import row_file
from defectfill.outputs.run_folder import read_trained_run

TRAIN = ["--category", "disc", "--defect-type", "spot", "--resolution", "64", "--steps", "1", "--batch-size", "1",
         "--warmup-steps", "1", "--save-every", "1000", "--sample-every", "0"]


def _generate(run, out):
    return main(["generate", "--run", str(run), "--output", str(out), "--count", "2", "--candidates", "1",
                 "--steps", "2", "--masks", "held-out", "--device", "cpu"])


@pytest.fixture
def project(tmp_path, demo_root, tiny_model_dir, monkeypatch):
    """A project folder with the data and a run trained from inside it with relative paths."""
    project = tmp_path / "project"
    shutil.copytree(demo_root, project / "data")
    monkeypatch.chdir(project)
    assert main(["train", "--data", "data", "--output", "runs/spot", "--model", str(tiny_model_dir), *TRAIN]) == 0
    recorded = json.loads((project / "runs" / "spot" / "config.json").read_text())
    assert recorded["data"] == "data"  # as given
    assert recorded["data_paths"] == {"absolute": str(project / "data"), "from_run": os.path.join("..", "..", "data")}
    return project


def test_a_run_works_from_another_directory(project, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = project / "runs" / "spot"
    assert read_trained_run(run).data == str(run / ".." / ".." / "data")
    assert _generate(run, elsewhere / "gen") == 0  # the defect-free images and the held-out masks are found
    assert len((elsewhere / "gen" / "manifest.jsonl").read_text().splitlines()) == 2


def test_a_run_works_after_it_and_its_data_moved_together(project, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "moved" / "project"
    moved.parent.mkdir()
    shutil.move(str(project), str(moved))
    monkeypatch.chdir(tmp_path)
    run = moved / "runs" / "spot"
    split = read_split(run / "split.json")
    assert all(s.image.is_file() and s.mask.is_file() for s in split.reference + split.held_out)
    assert _generate(run, tmp_path / "gen") == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert all(os.path.realpath(row_file(tmp_path / "gen", r["source_image"])).startswith(str(moved)) for r in rows)
    # the data moved away from the run: named, with the way out
    shutil.move(str(moved / "data"), str(tmp_path / "gone"))
    assert _generate(run, tmp_path / "gen2") == 2
    assert "moved or on another machine" in capsys.readouterr().err
