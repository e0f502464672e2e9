"""`defectfill run` and `defectfill demo`: the whole job, skipping finished stages, the plan, the README commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import run_with_stand_ins, tiny_run_config

import defectfill.train.trainer as train_module
from defectfill.cli import main
from defectfill.config.stages import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _config(demo_root, tiny_model_dir, output, **overrides) -> RunConfig:
    return tiny_run_config(demo_root, tiny_model_dir, output, **overrides)


def _run_all(config: RunConfig):
    return run_with_stand_ins(config)


def test_demo_at_test_size_writes_a_report_of_every_type(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--size", "test"]) == 0
    out = capsys.readouterr().out
    # the default demo runs on the built-in pretrained base, and says what its metric networks are
    assert "defectfill-mini" in out and "VAE encoder" in out and "defectfill run --data" in out
    assert json.loads((tmp_path / "demo" / "work" / "run.json").read_text())["model"] == "defectfill-mini"
    work = tmp_path / "demo" / "work"
    report = (work / "report.html").read_text()
    summary = json.loads((work / "summary.json").read_text())
    types = {(r["category"], r["defect_type"]) for r in summary["results"]}
    assert types == {("disc", "scratch"), ("disc", "spot"), ("weave", "crack")}
    for r in summary["results"]:
        assert r["status"] == "done" and r["n_generated"] == 3
        assert r["kid_x1e3"] is not None and r["ic_lpips"] is not None
        assert abs(r["kid_x1e3"]) < 1e4  # the encoder features are scaled for KID's kernel
        assert f"<td>{r['defect_type']}</td>" in report
    assert "data:image/png;base64," in report and "defectfill-mini" in report
    # each type's own evaluation report carries the note too, and no downstream settings (none ran there)
    type_report = (work / "eval" / "disc-scratch" / "report.html").read_text()
    assert "defectfill-mini" in type_report and "downstream_epochs" not in type_report
    # LFS ran on an untrained AlexNet: the run's report, each type's report and the preview picture say so
    assert report.count("untrained (random) AlexNet") == 3 and "untrained (random) AlexNet" in type_report
    assert "real images (fewer than about 50) is unreliable" in report
    from PIL import Image

    preview = Image.open(work / "generated" / "disc-scratch" / "preview.png").convert("RGB")
    assert preview.getpixel((preview.width - 2, 2)) == (120, 20, 20)  # the banner over the strips
    # the combined synthetic dataset reads back with the project's own MVTec loader
    from defectfill.data import open_layout

    synth = open_layout(work / "synth", "mvtec")
    assert synth.defect_types("disc") == ["scratch", "spot"]
    assert all(s.mask is not None for s in synth.defect_samples("weave", "crack"))


def test_killed_run_continues_with_only_the_rest(demo_root, tiny_model_dir, tmp_path, monkeypatch):
    real_train = train_module.train
    trained: list[str] = []

    def interrupted_on_spot(config, pipe=None):
        if config.defect_type == "spot":
            raise KeyboardInterrupt
        trained.append(config.defect_type)
        return real_train(config, pipe)

    monkeypatch.setattr(train_module, "train", interrupted_on_spot)
    with pytest.raises(KeyboardInterrupt):
        _run_all(_config(demo_root, tiny_model_dir, tmp_path / "work"))
    assert trained == ["scratch"]

    trained.clear()

    def spy(config, pipe=None):
        trained.append(config.defect_type)
        return real_train(config, pipe)

    monkeypatch.setattr(train_module, "train", spy)
    results = _run_all(_config(demo_root, tiny_model_dir, tmp_path / "work"))
    assert trained == ["spot"], "the finished type was trained again"
    assert [r.stages for r in results][0] == {"train": "skipped", "generate": "skipped", "evaluate": "skipped"}
    assert all(r.status == "done" for r in results)

    trained.clear()  # a third run has nothing left to do
    results = _run_all(_config(demo_root, tiny_model_dir, tmp_path / "work"))
    assert trained == [] and all(set(r.stages.values()) == {"skipped"} for r in results)


def test_dry_run_loads_no_model_and_prints_the_plan(demo_root, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr("defectfill.model.pipeline.load_pipeline", no_model)
    monkeypatch.setattr("defectfill.train.trainer.load_pipeline", no_model)
    code = main(["run", "--data", str(demo_root), "--categories", "all", "--output", str(tmp_path / "work"),
                 "--steps", "30", "--dry-run",
                 # the pre-flight needs every network here or downloadable: offline, these are the built-in base
                 # and no KID, IC-LPIPS or ImageNet AlexNet
                 "--model", "defectfill-mini", "--no-kid", "--no-ic-lpips", "--lpips-random-backbone"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("disc/scratch", "disc/spot", "weave/crack"):
        assert re.search(rf"{name}\s+2\s+4\s+6\s+30\s+100", out), out
    assert "90 training steps" in out
    assert not (tmp_path / "work").exists()


def test_a_failing_type_is_reported_and_the_others_kept(demo_root, tiny_model_dir, tmp_path, monkeypatch, capsys):
    real_train = train_module.train

    def broken_for_spot(config, pipe=None):
        if config.defect_type == "spot":
            raise RuntimeError("simulated crash")
        return real_train(config, pipe)

    monkeypatch.setattr(train_module, "train", broken_for_spot)
    results = _run_all(_config(demo_root, tiny_model_dir, tmp_path / "work"))
    by_type = {r.defect_type: r for r in results}
    assert by_type["scratch"].status == "done" and by_type["scratch"].n_generated == 2
    assert by_type["spot"].status == "failed" and "simulated crash" in by_type["spot"].error
    assert "simulated crash" in capsys.readouterr().out
    report = (tmp_path / "work" / "report.html").read_text()
    assert "simulated crash" in report
    # the failed type has no evaluation: its row links to no report
    assert "eval/disc-scratch/report.html" in report and "eval/disc-spot/report.html" not in report


def test_run_command_exit_status_and_unknown_type(demo_root, tiny_model_dir, tmp_path, capsys):
    code = main(["run", "--data", str(demo_root), "--category", "disc", "--defect-types", "dent",
                 "--output", str(tmp_path / "w"), "--dry-run"])
    assert code == 2 and "unknown defect type 'dent'" in capsys.readouterr().err


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2, "the README opens with exactly two commands"
    main_job, test_command = block
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [test_command]
    assert main_job == "bash scripts/demo.sh"
    demo_script = (ROOT / "scripts" / "demo.sh").read_text()
    assert "scripts/setup.sh" in demo_script and "defectfill demo" in demo_script
    assert "scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
