"""Pre-flight of `run` and `run --dry-run` (issue 26, part 5): a plan of 0 types, a category of 0 defect-free
images and a network that is neither here nor downloadable are refused before anything trains, each with
advice that `run` itself accepts."""

from __future__ import annotations

import re
import shutil

import pytest
from helpers import run_with_stand_ins, tiny_run_config

from defectfill.cli import build_parser, main
from defectfill.run import preflight as preflight_module


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No weights cached (an empty TORCH_HOME and HF cache) and downloads off."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def _dry(demo_root, out, *extra):
    return main(["run", "--data", str(demo_root), "--category", "disc", "--output", str(out), "--dry-run", *extra])


def _advised_flags(message: str) -> list[str]:
    return sorted(set(re.findall(r"(--[a-z][a-z-]+)", message)))


def test_a_folder_dataset_without_defect_type_is_refused(tmp_path, demo_root, capsys):
    root = tmp_path / "folder"
    shutil.copytree(demo_root / "disc" / "test" / "spot", root / "images")
    shutil.copytree(demo_root / "disc" / "ground_truth" / "spot", root / "masks")
    shutil.copytree(demo_root / "disc" / "train" / "good", root / "good")
    for dry in (["--dry-run"], []):  # the run itself too: refused before its folder is made
        assert main(["run", "--data", str(root), "--category", "disc", "--output", str(tmp_path / "w"), *dry]) == 2
        err = capsys.readouterr().err
        assert "0 defect types" in err and "--defect-type NAME" in err
        assert not (tmp_path / "w").exists()


def test_a_category_without_good_images_is_refused_unless_images_are_given(tmp_path, demo_root, capsys, offline):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    shutil.rmtree(root / "disc" / "train" / "good")
    flags = ["--no-kid", "--no-ic-lpips", "--lpips-random-backbone", "--model", "defectfill-mini"]
    assert _dry(root, tmp_path / "w", *flags) == 2
    err = capsys.readouterr().err
    assert "category 'disc' has 0 defect-free images" in err and "--images DIR" in err
    assert _dry(root, tmp_path / "w", *flags, "--images", str(demo_root / "weave" / "train" / "good")) == 0


def test_missing_weights_are_named_with_flags_run_accepts(tmp_path, demo_root, capsys, offline, tiny_model_dir):
    code = _dry(demo_root, tmp_path / "w", "--model", "someone/not-cached-inpainting", "--downstream", "both")
    err = capsys.readouterr().err
    assert code == 2 and "nothing was started" in err
    for what in ("the base model someone/not-cached-inpainting", "KID's Inception-V3",
                 "LPIPS's AlexNet (Low-Fidelity Selection and IC-LPIPS)", "classifier's ImageNet ResNet-34",
                 "U-Net's ImageNet ResNet-34 encoder"):
        assert what in err, what
    assert "downloads are off (HF_HUB_OFFLINE)" in err
    advised = _advised_flags(err)
    assert {"--no-kid", "--inception-weights", "--lpips-weights", "--lpips-random-backbone", "--no-ic-lpips",
            "--no-downstream-pretrained", "--model"} <= set(advised)
    run_flags = {o for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
                 for o in a.option_strings}
    assert set(advised) <= run_flags, set(advised) - run_flags  # every advised flag is one `run` takes
    # following the advice: the dry run passes
    assert _dry(demo_root, tmp_path / "w", "--model", str(tiny_model_dir), "--downstream", "both", "--no-kid",
                "--no-ic-lpips", "--lpips-random-backbone", "--no-downstream-pretrained") == 0
    # a weight file where its loader looks counts as present
    offline.mkdir(parents=True)
    (offline / preflight_module.INCEPTION_FILE).write_bytes(b"x")
    assert _dry(demo_root, tmp_path / "w", "--model", str(tiny_model_dir), "--no-ic-lpips",
                "--lpips-random-backbone") == 0


def test_a_missing_weight_that_can_be_downloaded_passes(tmp_path, demo_root, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(preflight_module, "reachable", lambda url, timeout=5.0: asked.append(url) or True)
    config = tiny_run_config(demo_root, tmp_path / "m", tmp_path / "w", lpips_random_backbone=False)
    weights = preflight_module.needed_weights(config)
    assert preflight_module.weight_problems(weights, probe=preflight_module.reachable) == [
        f"the base model {tmp_path / 'm'} is not on this machine (looked in {tmp_path / 'm'}): pass --model a local "
        "diffusers inpainting folder, or --model defectfill-mini (the built-in base); a local folder must hold "
        "model_index.json (saved with save_pretrained)."]
    assert any(u.endswith(preflight_module.INCEPTION_FILE) for u in asked)


def test_run_with_no_kid_and_no_ic_lpips_finishes_without_evaluation(demo_root, tiny_model_dir, tmp_path):
    config = tiny_run_config(demo_root, tiny_model_dir, tmp_path / "w", defect_types=["spot"], kid=False,
                             ic_lpips=False)
    (result,) = run_with_stand_ins(config)
    assert result.status == "done" and result.stages["evaluate"] == "off" and result.n_generated == 2
    assert (tmp_path / "w" / "report.html").is_file()
