"""`defectfill ui` without a browser or gradio: binding and logins, the missing extra, path confinement,
run discovery, loss curves, shapes on the foreground. (The app itself: tests/test_ui_app.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config, write_run

from defectfill.cli import main
from defectfill.core.errors import DefectFillError
from defectfill.data.masks import estimate_foreground
from defectfill.outputs.run_folder import append_metrics
from defectfill.ui.backend import (
    Workspace,
    check_bind,
    find_runs,
    mask_from_layers,
    mask_layer,
    place_shape,
    read_auth,
    read_losses,
)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir, demo_root):
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "disc-scratch", tiny_model_dir, demo_root)
    return root


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.org", "::"])
def test_non_local_bind_needs_a_login(host):
    with pytest.raises(DefectFillError, match="--auth USER:PASSWORD"):
        check_bind(host, None)
    check_bind(host, [("u", "p")])


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_local_bind_needs_no_login(host):
    check_bind(host, None)


def test_auth_flag_and_file(tmp_path):
    assert read_auth("ann:pw:with:colons", None) == [("ann", "pw:with:colons")]
    good = tmp_path / "logins"
    good.write_text("# who may log in\nann:one\n\nbob:two\n")
    assert read_auth(None, str(good)) == [("ann", "one"), ("bob", "two")]
    bad = tmp_path / "bad"
    bad.write_text("ann:one\nbob\n")
    with pytest.raises(DefectFillError, match=r"bad, line 2: expected USER:PASSWORD"):
        read_auth(None, str(bad))
    with pytest.raises(DefectFillError, match="--auth: expected USER:PASSWORD"):
        read_auth(":nouser", None)


def test_cli_refuses_public_bind_before_loading_anything(runs_root, capsys):
    assert main(["ui", "--runs", str(runs_root), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "--auth" in err and "Traceback" not in err


def test_without_gradio_the_command_names_the_extra(runs_root):
    """The core imports and `defectfill ui` explains itself when gradio is not installed (blocked here)."""
    code = (
        "import sys; sys.modules['gradio'] = None; sys.modules['gradio_client'] = None\n"
        "import defectfill, defectfill.cli, defectfill.generate, defectfill.ui, defectfill.ui.backend\n"
        f"sys.exit(defectfill.cli.main(['ui', '--runs', {str(runs_root)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'defectfill[ui]'" in proc.stderr and "Traceback" not in proc.stderr


def test_dataset_names_typed_into_the_app_stay_inside_its_folder(tmp_path):
    ws = Workspace([tmp_path / "runs"], tmp_path / "datasets", device="cpu")
    assert ws.dataset_path("disc/scratch") == tmp_path / "datasets" / "disc" / "scratch"
    for name in ("../escape", "/tmp/escape", "a/../../escape", str(tmp_path)):
        with pytest.raises(DefectFillError, match="outside"):
            ws.dataset_path(name)


def test_run_and_image_names_stay_inside_the_runs(runs_root, tmp_path):
    ws = Workspace([runs_root], tmp_path / "datasets", device="cpu")
    with pytest.raises(DefectFillError, match="not one of the finished runs"):
        ws.run_dir("../runs/disc-scratch")
    for name in ("../../good/000.png", "/etc/passwd", "000_mask.png"):
        with pytest.raises(DefectFillError, match="not one of the defect-free images"):
            ws.source("disc-scratch", name)
    assert not (tmp_path / "escape").exists()


def test_runs_are_found_below_the_roots(runs_root, tmp_path):
    nested = tmp_path / "work" / "runs"
    nested.mkdir(parents=True)
    (nested / "unfinished").mkdir()
    (nested / "unfinished" / "config.json").write_text("{}")  # no LoRA yet: not offered
    assert find_runs([runs_root]) == {"disc-scratch": runs_root / "disc-scratch"}
    assert find_runs([runs_root / "disc-scratch"]) == {"disc-scratch": runs_root / "disc-scratch"}
    assert find_runs([tmp_path / "work"]) == {}


def test_loss_curves_from_the_metrics_training_writes(tmp_path):
    for row in ({"step": 1, "loss": {"total": 0.5, "defect": 0.4, "object": 0.3, "attention": 0.2}},
                {"step": 2, "loss": {"total": float("nan"), "defect": 0.1, "object": 0.1, "attention": 0.1}},
                {"step": 1, "loss": {"total": 0.25, "defect": 0.4, "object": 0.3, "attention": 0.2}}):
        append_metrics(tmp_path, {**row, "lr": {"unet": 2e-6, "text": 4e-7}, "grad_norm": 1.0, "skipped_steps": 0})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": {"tot')  # a killed run's torn last line
    rows = read_losses(tmp_path)
    assert {"step": 1, "loss": "total", "value": 0.25} in rows  # a resumed step keeps its last value
    assert [r for r in rows if r["step"] == 2 and r["loss"] == "total"] == []  # non-finite: not drawn
    assert len(rows) == 4 + 3
    assert read_losses(tmp_path / "none") == []


def test_the_run_tab_reads_the_curves_training_wrote(demo_root, tiny_model_dir, tmp_path):
    """The writer (training's metrics.jsonl) and the reader (the Run tab) agree: every logged step of the run,
    each of the four losses, equal to the text log's numbers."""
    from defectfill.train.trainer import train

    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=2, log_every=1))
    rows = read_losses(run)
    assert sorted({r["step"] for r in rows}) == [1, 2]
    assert {r["loss"] for r in rows} == {"total", "defect", "object", "attention"}
    logged = [line for line in (run / "train.log").read_text().splitlines() if " step 2 loss " in line][-1]
    total = float(logged.split(" loss ")[1].split()[0])
    assert next(r["value"] for r in rows if r["step"] == 2 and r["loss"] == "total") == pytest.approx(total, rel=1e-4)


def test_placed_shape_lies_on_the_foreground_and_survives_the_editor_layer(demo_root):
    from defectfill.data import load_rgb

    image = load_rgb(demo_root / "disc" / "train" / "good" / "000.png")
    for shape in ("ellipse", "square", "star", "line", "blob"):
        mask = place_shape(image, shape, 0.03, seed=4)
        assert mask.any() and not (mask & ~estimate_foreground(image)).any()
        assert 0.024 <= mask.mean() <= 0.036
        assert np.array_equal(mask_from_layers([np.asarray(mask_layer(mask))], image.size), mask)
    assert np.array_equal(place_shape(image, "star", 0.03, 4), place_shape(image, "star", 0.03, 4))
    with pytest.raises(DefectFillError, match="choose one of"):
        place_shape(image, "hexagon", 0.03, 0)


def test_missing_source_folder_is_named(runs_root, tmp_path):
    ws = Workspace([Path(runs_root)], tmp_path, device="cpu")
    assert [p.name for p in ws.good_images("disc-scratch")][:1] == ["000.png"]


def test_an_edited_manifest_cannot_make_the_page_show_a_file_outside(runs_root, demo_root, tmp_path):
    """Issue 28: the source image a row names is shown only from the dataset, the runs or a run's data."""
    import json

    from PIL import Image

    datasets = tmp_path / "datasets"
    root = datasets / "ds"
    for sub in ("disc/test/scratch", "disc/ground_truth/scratch", "uploads"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "disc/test/scratch/000.png")
    Image.new("L", (8, 8)).save(root / "disc/ground_truth/scratch/000_mask.png")
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    upload = root / "uploads" / "a.png"
    Image.new("RGB", (8, 8)).save(upload)
    good = sorted((demo_root / "disc" / "train" / "good").iterdir())[0]
    ws = Workspace([runs_root], datasets, device="cpu")
    for source, shown in ((secret, None), (upload, upload), (good, good), ("../../private/secret.png", None)):
        row = {"index": 0, "image": "disc/test/scratch/000.png", "mask": "disc/ground_truth/scratch/000_mask.png",
               "source_image": str(source)}
        (root / "manifest.jsonl").write_text(json.dumps(row) + "\n")
        assert ws.item_files("ds", 0)["source"] == shown, source


def test_a_plain_black_and_white_mask_is_read_as_white_is_the_defect():
    """An API client's mask file: opaque once the editor makes it RGBA, so white (not alpha) marks the defect."""
    plain = np.zeros((8, 8), dtype=np.uint8)
    plain[2:4, 3:6] = 255
    rgba = np.dstack([plain, plain, plain, np.full_like(plain, 255)])
    for layer in (plain, np.dstack([plain] * 3), rgba):
        assert np.array_equal(mask_from_layers([layer], (8, 8)), plain > 0)
    painted = np.zeros((8, 8, 4), dtype=np.uint8)
    painted[1, 1] = (255, 0, 0, 160)  # a brush stroke on a transparent layer
    assert mask_from_layers([painted], (8, 8)).sum() == 1


@pytest.fixture(scope="module")
def mini_like_run(tmp_path_factory, tiny_model_dir, demo_root):
    """A run on a copy of the tiny base that recommends its sampling as defectfill-mini does."""
    import shutil

    from defectfill.config.sampling import write_base_sampling

    root = tmp_path_factory.mktemp("mini-like")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    write_base_sampling(base, {"prompt": "A photo of {token}", "guidance": 5.0, "unconditional": "tuned"})
    write_run(root / "runs" / "disc-scratch", base, demo_root)
    return root


def test_the_page_samples_as_the_base_recommends_and_says_when_it_does_not(mini_like_run):
    ws = Workspace([mini_like_run / "runs"], mini_like_run / "datasets", device="cpu", lpips_random_backbone=True)
    recommended = ws.recommended_sampling("disc-scratch")
    assert recommended["prompt"] == "A photo of {token}" and recommended["guidance"] == 5.0
    assert ws.sampling_note("disc-scratch", "A photo of {token}", 50, 5.0, "tuned") == ""
    note = ws.sampling_note("disc-scratch", "A {object} with {token}", 50, 7.5, "tuned")
    assert "guidance 7.5 (recommended: 5.0)" in note and "'A {object} with {token}'" in note

    from defectfill.data import load_rgb

    image = load_rgb(ws.good_images("disc-scratch")[0])
    mask = place_shape(image, "ellipse", 0.05, 0)
    token = ws.run_config("disc-scratch").prompt_token
    from defectfill.ui.backend import Source

    source = Source(image, None, "upload")
    outcome = ws.generate("disc-scratch", source, mask, candidates=1, steps=1)
    assert outcome.prompt == f"A photo of {token}" and outcome.settings["guidance"] == 5.0 and not outcome.notes
    outcome = ws.generate("disc-scratch", source, mask, candidates=1, steps=1, guidance=7.5,
                          prompt="A {object} with {token}", unconditional="base")
    assert outcome.prompt == f"A disc with {token}" and outcome.settings["unconditional"] == "base"
    assert "guidance 7.5" in outcome.notes[0]
    with pytest.raises(DefectFillError, match="must contain {token}"):
        ws.generate("disc-scratch", source, mask, candidates=1, steps=1, prompt="A photo")


def test_offline_lpips_falls_back_to_the_untrained_backbone_when_asked(runs_root, tmp_path, monkeypatch):
    """No AlexNet download: with the page's checkbox the generation scores with the untrained backbone and says so
    (and the item records it); without it, the message names the checkbox. No restart either way."""
    import defectfill.model.lpips as lpips_module
    from defectfill.data import load_rgb
    from defectfill.ui.backend import Source

    real = lpips_module.load_lpips

    def offline(weights=None, pretrained_backbone=True, device="cpu"):
        if pretrained_backbone and weights is None:
            raise DefectFillError("LPIPS needs torchvision's ImageNet AlexNet weights, which could not be downloaded.")
        return real(weights, pretrained_backbone=pretrained_backbone, device=device)

    monkeypatch.setattr(lpips_module, "load_lpips", offline)
    ws = Workspace([runs_root], tmp_path / "datasets", device="cpu")
    image = load_rgb(ws.good_images("disc-scratch")[0])
    source, mask = Source(image, None, "upload"), place_shape(image, "ellipse", 0.05, 0)
    with pytest.raises(DefectFillError, match="untrained AlexNet when offline"):
        ws.generate("disc-scratch", source, mask, candidates=2, steps=1)
    outcome = ws.generate("disc-scratch", source, mask, candidates=2, steps=1, lpips_fallback=True)
    assert outcome.result.scores is not None and outcome.settings["lpips_random_backbone"] is True
    assert any("untrained AlexNet" in n and "could not be fetched" in n for n in outcome.notes)
    row = ws.add_to_dataset(outcome, "ds")
    state = json.loads((tmp_path / "datasets" / "ds" / "generate.json").read_text())
    assert state["config"]["lpips_random_backbone"] is True and row["settings"]["candidates"] == 2


def test_the_run_tab_says_the_token_self_check_of_each_type(runs_root, tmp_path):
    """The Run tab shows the verdict and numbers of the run's token_check.json, and of every type's own file
    in a per-object run (one type's record never stands for another's)."""
    pytest.importorskip("gradio")
    import shutil

    from defectfill.core.atomic import write_json
    from defectfill.ui.app import Handlers

    record = {"verdict": "the token carries the defect", "guidance": 5.0, "with_token": 0.1, "without_token": 0.3,
              "untouched": 0.5}
    runs = tmp_path / "runs"
    shutil.copytree(runs_root / "disc-scratch", runs / "disc-scratch")
    handlers = Handlers(Workspace([runs], tmp_path / "datasets", device="cpu"))
    assert "none recorded" in handlers.show_run("disc-scratch")[3]
    write_json(runs / "disc-scratch" / "token_check.json", record)
    text = handlers.show_run("disc-scratch")[3]
    assert "the token carries the defect" in text and "0.1000 with the token, 0.3000 without" in text

    per_object = runs / "disc"
    shutil.copytree(runs_root / "disc-scratch", per_object)
    config = json.loads((per_object / "config.json").read_text())
    config["defect_type"] = "scratch,spot"
    (per_object / "config.json").write_text(json.dumps(config))
    write_json(per_object / "token_check-spot.json", dict(record, verdict="nothing was learned"))
    text = handlers.show_run("disc")[3]
    assert "Token self-check (spot):** nothing was learned" in text
    assert "scratch" not in text.split("Run folder")[1].split("\n", 1)[1]
