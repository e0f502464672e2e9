"""Reliability and safety: a job touches only its own folder, refuses what it cannot do cleanly, one writer at a time."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import abs_distance, generate_config, tiny_config, write_run
from PIL import Image

from defectfill.cli import main
from defectfill.config.stages import EvaluateConfig, GenerateConfig, RunConfig
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import folder_lock
from defectfill.generate.writer import run_generate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("run") / "disc-scratch", tiny_model_dir, demo_root)


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# --------------------------------------------------------------------------- files outside the job's folder


@pytest.mark.parametrize("escape", ["../victim.png", "ABSOLUTE"])
def test_overwrite_never_deletes_what_an_edited_manifest_names_outside_the_folder(run_dir, tmp_path, escape):
    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "1"))
    victim = tmp_path / "victim.png"
    victim.write_text("precious")
    manifest = out / "manifest.jsonl"
    row = json.loads(manifest.read_text().splitlines()[0])
    row["image"] = str(victim) if escape == "ABSOLUTE" else escape
    manifest.write_text(json.dumps(row) + "\n")
    with pytest.raises(DefectFillError, match="outside"):
        run_generate(generate_config(run_dir, out, "--count", "1", "--overwrite"))
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("field, value", [("category", "../escape"), ("defect_type", "../../escape"),
                                          ("category", "ABSOLUTE")])
def test_a_run_config_naming_paths_cannot_make_generate_write_outside(run_dir, tmp_path, field, value):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config[field] = str(tmp_path / "abs") if value == "ABSOLUTE" else value
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DefectFillError, match=r"config.json.*must be one plain name"):
        run_generate(generate_config(run, tmp_path / "out", "--count", "1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_edited_split_cannot_point_reads_outside_the_dataset(run_dir, tmp_path):
    from defectfill.data import read_split

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    split = json.loads((run / "split.json").read_text())
    split["held_out"][0]["mask"] = "../../../../etc/hostname"
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(DefectFillError, match="split.json.*outside"):
        read_split(run / "split.json")


def _foreign(folder):
    folder.mkdir(parents=True)
    for name in ("report.html", "summary.json", "metrics.json"):
        (folder / name).write_text("precious")
    (folder / "synth" / "disc" / "test" / "scratch").mkdir(parents=True)
    (folder / "synth" / "disc" / "test" / "scratch" / "000.png").write_text("precious")
    return folder


def _intact(folder):
    assert all((folder / n).read_text() == "precious" for n in ("report.html", "summary.json", "metrics.json"))
    assert (folder / "synth" / "disc" / "test" / "scratch" / "000.png").read_text() == "precious"


def test_run_evaluate_and_demo_refuse_a_foreign_folder(demo_root, tmp_path, capsys):
    from defectfill.run.runner import run_all

    foreign = _foreign(tmp_path / "mine")
    with pytest.raises(DefectFillError, match="not empty and was not written by `defectfill run`"):
        run_all(RunConfig.from_settings({"data": str(demo_root), "output": str(foreign), "category": "disc"}))
    with pytest.raises(DefectFillError, match="not written by `defectfill evaluate`"):
        from defectfill.evaluate.evaluator import evaluate

        evaluate(EvaluateConfig.from_settings({"generated": str(demo_root), "output": str(foreign),
                                               "data": str(demo_root), "category": "disc"}))
    code, err = _run_cli(capsys, "demo", "--output", foreign, "--size", "test")
    assert code == 2 and "not written by `defectfill demo`" in err
    _intact(foreign)
    # a folder another command wrote is refused too (the marker names its owner)
    code, _ = _run_cli(capsys, "make-demo-data", tmp_path / "data")
    assert code == 0
    code, err = _run_cli(capsys, "demo", "--output", tmp_path / "data", "--size", "test")
    assert code == 2 and "holds the output of `defectfill make-demo-data`" in err


@pytest.mark.parametrize("command", ["generate", "evaluate", "make-demo-data"])
def test_an_output_that_is_a_file_gives_a_message(command, run_dir, demo_root, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("precious")
    argv = {
        "generate": ["generate", "--run", run_dir, "--output", target, "--count", "1", "--candidates", "1"],
        "evaluate": ["evaluate", "--generated", demo_root, "--output", target, "--data", demo_root,
                     "--category", "disc"],
        "make-demo-data": ["make-demo-data", target],
    }[command]
    code, err = _run_cli(capsys, *argv)
    assert code == 2 and "is a file, not a folder" in err
    assert target.read_text() == "precious"


# --------------------------------------------------------------------------- bad settings and damaged state


@pytest.fixture
def train_argv(demo_root, tiny_model_dir, tmp_path):
    return ["train", "--data", demo_root, "--category", "disc", "--defect-type", "scratch", "--output",
            tmp_path / "run", "--model", tiny_model_dir, "--resolution", "64", "--steps", "2", "--batch-size", "1",
            "--warmup-steps", "1", "--save-every", "1", "--sample-every", "0"]


@pytest.mark.parametrize("extra, pattern", [
    (["--lr-unet", "nan"], "lr_unet: expected a finite number"),
    (["--lr-text", "inf"], "lr_text: expected a finite number"),
    (["--lr-unet=-1e-4"], "--lr-unet must be 0 or more"),
    (["--object-prompt", "A {object with {token}"], "--object-prompt"),
    (["--defect-prompt", "A {color} photo of {token}"], "--defect-prompt.*'color'"),
    (["--token", ""], "--token must not be empty"),
    (["--new-token", ""], "--new-token must not be empty"),
    (["--category", "../disc"], "--category '../disc' must be one plain name"),
])
def test_bad_training_settings_are_refused_before_anything_is_written(capsys, train_argv, tmp_path, extra, pattern):
    code, err = _run_cli(capsys, *train_argv, *extra)
    assert code == 2 and __import__("re").search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_an_existing_word_as_new_token_gets_a_clear_message():
    from defectfill.model.pipeline import add_trainable_token
    from defectfill.model.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    for word in ("hole", "sks"):  # a vocabulary entry, and a word that encodes to one existing token
        with pytest.raises(DefectFillError, match=f"--new-token '{word}' is already a word.*'<{word}>'"):
            add_trainable_token(pipe.tokenizer, pipe.text_encoder, word)


def test_a_damaged_checkpoint_names_the_earlier_one(capsys, train_argv, tmp_path):
    assert _run_cli(capsys, *train_argv)[0] == 0
    weights = tmp_path / "run" / "checkpoint-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    argv = [a if a != "2" else "3" for a in train_argv]  # --steps 3
    code, err = _run_cli(capsys, *argv, "--resume", "latest")
    assert code == 2 and "checkpoint-2 is damaged" in err and "resume from checkpoint-1" in err


@pytest.mark.parametrize("changed, shown", [(["--lora-rank", "4"], "lora_rank: 8 -> 4"),
                                            (["--lr-unet", "1e-3"], "lr_unet: 0.0002 -> 0.001")])
def test_resume_from_a_checkpoint_made_with_other_settings_names_them(capsys, train_argv, tmp_path, changed, shown):
    """Before: another --lora-rank crashed in a tensor copy; another --lr-unet continued at the checkpoint's rate."""
    assert _run_cli(capsys, *train_argv)[0] == 0
    other = [a if a != tmp_path / "run" else tmp_path / "other" for a in train_argv] + changed
    assert _run_cli(capsys, *other)[0] == 0
    steps3 = [a if a != "2" else "3" for a in other]
    code, err = _run_cli(capsys, *steps3, "--resume", tmp_path / "run" / "checkpoint-1")
    assert code == 2 and "was made with other settings" in err and shown in err


def test_a_run_config_of_the_wrong_type_names_the_file(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["resolution"] = "abc"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DefectFillError, match=r"config.json: setting resolution: expected a whole number"):
        run_generate(generate_config(run, tmp_path / "out", "--count", "1"))


def test_a_decompression_bomb_gives_a_message(tmp_path, monkeypatch):
    from defectfill.data import load_rgb

    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px is over twice the limit: PIL refuses
    with pytest.raises(DefectFillError, match="huge.png: image is too large to read safely"):
        load_rgb(path)


def test_disk_full_gives_a_message_and_keeps_what_was_finished(capsys, run_dir, tmp_path, monkeypatch):
    import defectfill.outputs.generated

    out = tmp_path / "out"
    real_save = defectfill.outputs.generated.save_png
    saved = []

    def fills_up(image, path):
        if len(saved) >= 2:  # the first item's image and mask fit
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        real_save(image, path)

    monkeypatch.setattr(defectfill.outputs.generated, "save_png", fills_up)
    code, err = _run_cli(capsys, "generate", "--run", run_dir, "--output", out, "--count", "2", "--candidates", "1",
                         "--steps", "1")
    assert code == 2 and "no space left on the disk" in err and "rerun the same command" in err
    monkeypatch.setattr(defectfill.outputs.generated, "save_png", real_save)
    assert _run_cli(capsys, "generate", "--run", run_dir, "--output", out, "--count", "2", "--candidates", "1",
                    "--steps", "1")[0] == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]


def test_make_demo_data_size_zero(capsys, tmp_path):
    code, err = _run_cli(capsys, "make-demo-data", tmp_path / "d", "--size", "0")
    assert code == 2 and "--size 0" in err and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- two writers, reproducibility, modes


def test_a_second_generate_on_the_same_folder_is_refused(run_dir, tmp_path):
    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "1"))
    before = (out / "disc" / "test" / "scratch" / "000.png").read_bytes()
    with folder_lock(out, "generate"):  # as if another process were still writing here
        with pytest.raises(DefectFillError, match=r"another defectfill job is writing here \(defectfill generate"):
            run_generate(generate_config(run_dir, out, "--count", "1", "--seed", "5", "--overwrite"))
    assert (out / "disc" / "test" / "scratch" / "000.png").read_bytes() == before


@pytest.mark.parametrize("command", ["train", "evaluate", "run"])
def test_other_jobs_take_the_lock_too(command, demo_root, tiny_model_dir, tmp_path):
    from defectfill.evaluate.evaluator import evaluate
    from defectfill.run.runner import run_all
    from defectfill.train.trainer import train

    folder = tmp_path / "job"
    folder.mkdir()
    start = {
        "train": lambda: train(tiny_config(demo_root, folder, tiny_model_dir)),
        "evaluate": lambda: evaluate(EvaluateConfig.from_settings(
            {"generated": str(demo_root), "output": str(folder), "data": str(demo_root), "category": "disc",
             "ic_lpips": False, "kid_subsets": 2}), distance=abs_distance),
        "run": lambda: run_all(RunConfig.from_settings({"data": str(demo_root), "output": str(folder),
                                                        "model": str(tiny_model_dir), "category": "disc"})),
    }[command]
    with folder_lock(folder, "test"):
        with pytest.raises(DefectFillError, match="another defectfill job is writing here"):
            start()


def test_the_random_lpips_backbone_is_the_same_every_time():
    from defectfill.model.lpips import load_lpips

    a, b = load_lpips(pretrained_backbone=False), load_lpips(pretrained_backbone=False)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_written_files_follow_the_umask(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        run_generate(generate_config(run_dir, out, "--count", "1"))
    finally:
        os.umask(old)
    for path in (out / "generate.json", out / "manifest.jsonl", out / "disc" / "test" / "scratch" / "000.png",
                 out / "disc" / "ground_truth" / "scratch" / "000_mask.png"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_generated_dataset_links_its_good_sources_for_anomalib(run_dir, demo_root, tmp_path):
    from defectfill.data import open_layout

    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "3"))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    layout = open_layout(out, "mvtec")
    goods = layout.good_images("disc")
    assert sorted(p.name for p in goods) == sorted({os.path.basename(r["source_image"]) for r in rows})
    for p in goods:  # linked, not copied
        assert os.path.samefile(p, demo_root / "disc" / "train" / "good" / p.name)
    assert np.array_equal(np.asarray(Image.open(goods[0])),
                          np.asarray(Image.open(demo_root / "disc" / "train" / "good" / goods[0].name)))
    bare = tmp_path / "bare"
    run_generate(generate_config(run_dir, bare, "--count", "1", "--no-with-good"))
    assert not (bare / "disc" / "train").exists()


# --------------------------------------------------------------------------- issue 28: what is read back


@pytest.mark.parametrize("content, shown", [
    ({"category": "/tmp/elsewhere", "defect_type": "spot", "status": "done", "n_generated": 3}, "category"),
    ({"category": "disc", "defect_type": "../../x", "status": "done"}, "defect_type"),
    ([1, 2, 3], "holds a list"),
    ({"status": "done", "n_generated": "many"}, "n_generated"),
    ({"status": "done", "kid_x1e3": "low"}, "kid_x1e3"),
    ({"status": "rm -rf"}, "status"),
])
def test_report_only_takes_names_from_the_plan_and_checks_results_files(tmp_path, content, shown):
    from defectfill.outputs.job_folder import job_folder
    from defectfill.run.process import read_result

    config = RunConfig.from_settings({"data": "d", "output": str(tmp_path / "w")})
    path = job_folder(config).result_path("disc", "spot")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(content))
    result = read_result(config, "disc", "spot")
    assert (result.category, result.defect_type, result.status) == ("disc", "spot", "failed")
    assert shown in result.error and str(path) in result.error


def test_report_only_reads_a_good_results_file(tmp_path):
    from defectfill.outputs.job_folder import job_folder
    from defectfill.run.process import read_result

    config = RunConfig.from_settings({"data": "d", "output": str(tmp_path / "w")})
    path = job_folder(config).result_path("disc", "spot")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"category": "disc", "defect_type": "spot", "status": "done", "n_generated": 2,
                                "stages": {"train": "ran"}, "kid_x1e3": 1.5, "ic_lpips": None, "extra": 1}))
    result = read_result(config, "disc", "spot")
    assert (result.status, result.n_generated, result.kid_x1e3) == ("done", 2, 1.5)


# --------------------------------------------------------------------------- issue 28: files the job did not make


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_generate_never_writes_into_a_real_dataset_with_overwrite_or_resume(run_dir, tmp_path, flag):
    root = tmp_path / "mvtec"
    for sub, name in (("test", "000.png"), ("ground_truth", "000_mask.png")):
        (root / "disc" / sub / "scratch").mkdir(parents=True)
        (root / "disc" / sub / "scratch" / name).write_text("precious")
    with pytest.raises(DefectFillError, match="not written by `defectfill generate`") as caught:
        run_generate(generate_config(run_dir, root, "--count", "2", flag))
    assert "--overwrite" not in str(caught.value)
    assert (root / "disc" / "test" / "scratch" / "000.png").read_text() == "precious"
    assert sorted(p.name for p in root.iterdir()) == ["disc"]


def test_generate_never_writes_an_item_over_a_file_its_manifest_does_not_name(run_dir, tmp_path):
    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "1"))
    user = out / "disc" / "test" / "scratch" / "001.png"
    user.write_text("the user's own")
    for flag in ("--resume", "--overwrite"):
        with pytest.raises(DefectFillError, match=r"001\.png is not a file this folder's manifest names"):
            run_generate(generate_config(run_dir, out, "--count", "2", flag))
        assert user.read_text() == "the user's own"
    assert (out / "disc" / "test" / "scratch" / "000.png").is_file()  # refused before anything was removed


def test_overwrite_removes_only_its_own_files(run_dir, tmp_path):
    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "2", "--save-candidates"))
    kept = [out / "notes.txt", out / "rejected" / "001.png", out / "candidates" / "notes.txt",
            out / "candidates" / "disc" / "scratch" / "keep-me.png", out / "disc" / "test" / "scratch" / "notes.txt"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    # the user rejects item 1: its row leaves the manifest, its files move to rejected/
    manifest = out / "manifest.jsonl"
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")
    (out / "disc" / "test" / "scratch" / "001.png").unlink()
    run_generate(generate_config(run_dir, out, "--count", "1", "--overwrite", "--seed", "9"))
    for path in kept:
        assert path.read_text() == "mine", path
    assert not (out / "candidates" / "disc" / "scratch" / "001_0.png").exists()  # our own candidate went


@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "checkpoint-1"])
def test_train_never_writes_over_another_tools_weights(capsys, train_argv, tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("another tool's")
    code, err = _run_cli(capsys, *train_argv)
    assert code == 2 and "is not a defectfill run" in err and name in err
    assert (out / name).read_text() == "another tool's"
    assert sorted(p.name for p in out.iterdir()) == [name]


# --------------------------------------------------------------------------- issue 28: faults while writing


def test_disk_full_while_writing_a_checkpoint_names_the_folder_and_resumes(capsys, train_argv, tmp_path, monkeypatch):
    import defectfill.outputs.checkpoints as checkpoints

    real, calls = checkpoints.save_rng_state, []

    def fills_up(folder):
        calls.append(folder)
        if len(calls) == 2:  # checkpoint-1 fits, checkpoint-2 does not
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "rng_state.safetensors"))
        real(folder)

    monkeypatch.setattr(checkpoints, "save_rng_state", fills_up)
    old = os.umask(0o022)
    try:
        code, err = _run_cli(capsys, *train_argv)
        run = tmp_path / "run"
        assert code == 2 and f"{run}: cannot write there: no space left on the disk" in err, err
        assert "--resume latest" in err
        assert not list(run.rglob("*.tmp*")) and (run / "checkpoint-1").is_dir()
        monkeypatch.setattr(checkpoints, "save_rng_state", real)
        assert _run_cli(capsys, *train_argv, "--resume", "latest")[0] == 0
    finally:
        os.umask(old)
    # the LoRA file diffusers writes 0600 follows the umask like every other file
    for path in (run / "pytorch_lora_weights.safetensors", run / "checkpoint-2" / "pytorch_lora_weights.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


@pytest.mark.parametrize("fault", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_an_unwritable_output_names_the_folder_and_leaves_no_tmp(capsys, run_dir, tmp_path, monkeypatch, fault):
    out = tmp_path / "out"
    real = Image.Image.save

    def refuses(self, fp, *args, **kwargs):
        if str(fp).endswith(".tmp.png") and "test" in str(fp):
            exc = PermissionError if fault == errno.EACCES else OSError
            raise exc(fault, os.strerror(fault), str(fp))
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", refuses)
    code, err = _run_cli(capsys, "generate", "--run", run_dir, "--output", out, "--count", "1", "--candidates", "1",
                         "--steps", "1")
    assert code == 2 and f"{out / 'disc' / 'test' / 'scratch'}: cannot write there" in err, err
    assert not list(out.rglob("*.tmp*"))
    monkeypatch.setattr(Image.Image, "save", real)
    assert _run_cli(capsys, "generate", "--run", run_dir, "--output", out, "--count", "1", "--candidates", "1",
                    "--steps", "1")[0] == 0


def test_atomic_write_turns_a_refused_write_into_a_message(tmp_path):
    from defectfill.core.atomic import atomic_write

    def refused(path):
        path.write_text("half")
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with pytest.raises(DefectFillError, match=f"{tmp_path}: cannot write there: permission denied"):
        atomic_write(tmp_path / "a.json", refused)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        atomic_write(tmp_path / "a.json", lambda p: 1 / 0)


# --------------------------------------------------------------------------- issue 28: one safe image reader


def test_every_image_open_goes_through_the_one_reader():
    from pathlib import Path

    import defectfill

    package = Path(defectfill.__file__).parent
    opens = [str(p.relative_to(package)) for p in package.rglob("*.py") if "Image.open(" in p.read_text()]
    assert opens == ["data/images.py"], opens


def test_data_reports_a_truncated_png(demo_root, tmp_path, capsys):
    root = tmp_path / "mvtec"
    shutil.copytree(demo_root, root)
    image = sorted((root / "disc" / "test" / "scratch").glob("*.png"))[0]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(image)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    code = main(["data", "--data", str(root), "--category", "disc"])
    out = capsys.readouterr().out
    assert code == 1 and image.name in out and "cannot read this file as an image" in out, out


def test_a_decompression_bomb_in_images_gives_a_message(capsys, run_dir, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px is over twice the limit: PIL refuses
    code, err = _run_cli(capsys, "generate", "--run", run_dir, "--output", tmp_path / "out", "--images", images,
                         "--count", "1", "--candidates", "1", "--steps", "1")
    assert code == 2 and "huge.png: image is too large to read safely" in err


def test_an_unreadable_folder_is_named(capsys, demo_root, monkeypatch):
    from pathlib import Path

    real = Path.iterdir

    def refused(self):
        if self.name == "scratch" and self.parent.name == "test":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    code, err = _run_cli(capsys, "data", "--data", demo_root, "--category", "disc")
    assert code == 2 and "scratch: Permission denied" in err, err


# --------------------------------------------------------------------------- issue 28: bounded settings


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 10):
        prev, name = chr(ord("a") + k - 1), chr(ord("a") + k)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nseed: *j\n")
    with pytest.raises(DefectFillError, match=r"bomb.yaml: not valid YAML .*aliases"):
        GenerateConfig.from_settings({}, config_file=bomb, require=False)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000 + "seed: 1\n")
    with pytest.raises(DefectFillError, match="too large for a settings file"):
        GenerateConfig.from_settings({}, config_file=big, require=False)
    plain = tmp_path / "plain.yaml"
    plain.write_text("seed: 3\ncount: 2\n")
    assert GenerateConfig.from_settings({}, config_file=plain, require=False).seed == 3


@pytest.mark.parametrize("extra, pattern", [
    (["--seed=-1"], r"--seed must be 0 or more \(got -1\)"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 4294967295\]"),
    (["--log-every", "0"], r"--log-every must be at least 1"),
    (["--weight-decay=-1"], r"--weight-decay must be 0 or more"),
    (["--num-boxes=-1"], r"--num-boxes must be 0 or more"),
    (["--attn-size", "0"], r"--attn-size must be at least 1"),
    (["--sample-steps", "0"], r"--sample-steps must be at least 1"),
    (["--resolution", "100000"], r"--resolution must be in \[8, 4096\]"),
    (["--max-grad-norm", "0"], r"--max-grad-norm must be positive"),
    (["--box-min", "0"], r"--box-min must be positive"),
    (["--defect-prompt", "A photo of {token:>10}"], r"--defect-prompt .*\{token:>10\} has a format spec"),
    (["--defect-prompt", "{token} {object:>999999999999}"], r"--defect-prompt .*\{object:>999999999999\} has a"),
    (["--object-prompt", "A {object!r} with {token}"], r"--object-prompt .*\{object!r\} has a format spec"),
])
def test_unbounded_training_settings_are_refused_before_anything_is_written(capsys, train_argv, tmp_path, extra,
                                                                             pattern):
    code, err = _run_cli(capsys, *train_argv, *extra)
    assert code == 2 and __import__("re").search(pattern, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--seed=-1"], r"--seed must be 0 or more"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 4294967295\]"),
    (["--count", str(10**9)], r"--count must be in \[1, 1000000\]"),
    (["--preview-rows", str(10**9)], r"--preview-rows must be in \[0, 1000\]"),
])
def test_unbounded_generate_settings_are_refused_before_anything_is_written(capsys, run_dir, tmp_path, extra,
                                                                            pattern):
    argv = ["generate", "--run", run_dir, "--output", tmp_path / "out", "--count", "1", *extra]
    code, err = _run_cli(capsys, *argv)
    assert code == 2 and __import__("re").search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_make_demo_data_size_too_large(capsys, tmp_path):
    code, err = _run_cli(capsys, "make-demo-data", tmp_path / "d", "--size", "100000")
    assert code == 2 and "--size 100000: at most 2048" in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("state", ['{"step": "2"}', '{"step": -1}', '{"step": 2, "skipped_steps": "x"}',
                                   '{"skipped_steps": 0}', '{"step": 2, "config": [1]}', '[2]', '{"step": 2'])
def test_a_checkpoint_state_read_back_is_checked(tmp_path, state):
    from defectfill.outputs.checkpoints import read_trainer_state

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(state)
    with pytest.raises(DefectFillError, match="checkpoint-2: trainer_state.json is damaged"):
        read_trainer_state(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"step": 2, "skipped_steps": 1, "config": {}}')
    assert read_trainer_state(checkpoint)["step"] == 2


def test_overwrite_keeps_the_items_rejected_in_the_ui(run_dir, tmp_path):
    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "2"))
    manifest = out / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for key in ("image", "mask"):  # as the UI's reject moves them: rejected/<the same relative path>
        moved = out / "rejected" / rows[1][key]
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / rows[1][key], moved)
        rows[1][key] = str(moved.relative_to(out))
    rows[1]["rejected"] = {"reason": "blurry"}
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_generate(generate_config(run_dir, out, "--count", "1", "--overwrite", "--seed", "4"))
    assert (out / rows[1]["image"]).is_file() and (out / rows[1]["mask"]).is_file()
    assert [json.loads(line)["index"] for line in manifest.read_text().splitlines()] == [0]
