"""synth/ without leakage (issue 26, part 4): the defect-free images a defect was painted on are in neither
good folder; test/good holds defect-free images no test image shows, train/good the rest of the unpainted ones."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_with_stand_ins, tiny_run_config

from defectfill.data import open_layout
from defectfill.outputs.generated import row_file
from defectfill.run.runner import synth_good_split


def _file(path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_dev, st.st_ino


def test_synth_good_folders_leave_the_painted_sources_out(demo_root, tiny_model_dir, tmp_path):
    config = tiny_run_config(demo_root, tiny_model_dir, tmp_path / "work", defect_types=["scratch", "spot"], count=2)
    results = run_with_stand_ins(config)
    assert all(r.status == "done" for r in results)
    synth = tmp_path / "work" / "synth" / "disc"
    folders = [tmp_path / "work" / "generated" / f"disc-{t}" for t in ("scratch", "spot")]
    rows = [(f, json.loads(line)) for f in folders for line in (f / "manifest.jsonl").read_text().splitlines()]
    # the sources the test images were painted on (rows name them relative to their folder)
    painted = {_file(row_file(f, r["source_image"])) for f, r in rows}
    assert painted
    train_good = {_file(p) for p in (synth / "train" / "good").iterdir()}  # hard links: the same files
    test_good = {_file(p) for p in (synth / "test" / "good").iterdir()}
    layout = open_layout(demo_root)
    all_good = {_file(p) for p in layout.good_images("disc")}
    assert not painted & train_good and not painted & test_good  # no test background is a training image
    assert train_good == all_good - painted  # every unpainted one trains
    assert test_good == {_file(p) for p in layout.good_test_images("disc")}  # MVTec's own test/good
    split = json.loads((tmp_path / "work" / "synth" / "split.json").read_text())["disc"]
    assert {_file(p) for p in split["painted_sources"]} == painted
    assert {_file(p) for p in split["train_good"]} == train_good
    # the synthetic dataset reads back with good test images for an anomaly model's evaluation
    assert open_layout(tmp_path / "work" / "synth", "mvtec").good_test_images("disc")


def test_without_good_test_images_every_other_unpainted_one_is_held_out(tmp_path):
    good = [tmp_path / f"{k:03d}.png" for k in range(7)]
    for p in good:
        p.write_bytes(b"")
    painted = {str(good[0].resolve()), str(good[3].resolve())}
    split = synth_good_split(good, [], painted)
    names = {k: [Path(p).name for p in v] for k, v in split.items()}
    assert names["painted_sources"] == ["000.png", "003.png"]
    assert names["test_good"] == ["002.png", "005.png"] and names["train_good"] == ["001.png", "004.png", "006.png"]
    assert not set(names["test_good"]) & set(names["train_good"])
