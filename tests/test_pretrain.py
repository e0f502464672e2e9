"""`defectfill pretrain-base`: a tiny two-stage run writes a loadable, fine-tunable base; resume is exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from defectfill.cli import main
from defectfill.pretrain.base import TINY_ARCH, PretrainSettings, pretrain_base


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _tiny(output, **overrides) -> PretrainSettings:
    settings = dict(output=str(output), size=32, vae_steps=2, unet_steps=3, batch_size=2, seed=5, save_every=1,
                    warmup_steps=1, arch=TINY_ARCH)
    settings.update(overrides)
    return PretrainSettings(**settings)


def _weights(folder):
    out = {}
    for part in ("vae", "unet", "text_encoder"):
        for file in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(str(file)).items()})
    return out


def test_pretrain_base_writes_a_base_that_loads_and_fine_tunes(capsys, tmp_path, demo_root):
    from defectfill.model.pipeline import load_pipeline

    base = tmp_path / "base"
    code, err = _run(capsys, "pretrain-base", "--output", base, "--arch", "tiny", "--size", "64",
                     "--vae-steps", "2", "--unet-steps", "2", "--batch-size", "2")
    assert code == 0, err
    pipe = load_pipeline(str(base))
    assert pipe.unet.config.in_channels == 9 and pipe.vae.config.scaling_factor != 0.18215  # measured
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    code, err = _run(capsys, "train", "--data", demo_root, "--category", "disc", "--defect-type", "scratch",
                     "--output", tmp_path / "run", "--model", base, "--resolution", "64", "--steps", "1",
                     "--batch-size", "1", "--sample-every", "0")
    assert code == 0, err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("stop_after", [1, 3])  # stopped in stage 1, and in stage 2
def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path, stop_after):
    whole = pretrain_base(_tiny(tmp_path / "whole"), progress=False)
    assert pretrain_base(_tiny(tmp_path / "pieces"), stop_after_steps=stop_after, progress=False) is None
    assert not (tmp_path / "pieces" / "model_index.json").exists()
    pieces = pretrain_base(_tiny(tmp_path / "pieces"), resume=True, progress=False)
    a, b = _weights(whole), _weights(pieces)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _weights(pretrain_base(_tiny(tmp_path / "other", seed=6), progress=False))
    assert not all(torch.equal(a[k], other[k]) for k in a)


@pytest.mark.parametrize("case, pattern", [
    ("file", "is a file, not a folder"),
    ("small", "--size 16: must be a multiple of 8 and at least 32"),
    ("odd", "--size 60: must be a multiple of 8"),
    ("steps", "--vae-steps must be at least 1"),
    ("batch", "--batch-size must be at least 1"),
    ("resume_nothing", "--resume given but no pretraining was started there"),
    ("again", "holds a pretraining already; add --resume"),
    ("resume_changed", "settings differ from the run.*seed"),
    ("other_folder", "folder is not empty"),
    ("arch", "unknown architecture setting"),
])
def test_bad_input_gives_a_clear_message(capsys, tmp_path, case, pattern):
    import re

    out = tmp_path / "base"
    args = ["pretrain-base", "--output", out, "--arch", "tiny", "--size", "32", "--vae-steps", "1",
            "--unet-steps", "1", "--batch-size", "1"]
    if case == "file":
        out.write_text("x")
    elif case == "small":
        args[args.index("--size") + 1] = "16"
    elif case == "odd":
        args[args.index("--size") + 1] = "60"
    elif case == "steps":
        args[args.index("--vae-steps") + 1] = "0"
    elif case == "batch":
        args[args.index("--batch-size") + 1] = "0"
    elif case == "resume_nothing":
        args.append("--resume")
    elif case in ("again", "resume_changed"):
        assert _run(capsys, *args)[0] == 0
        if case == "resume_changed":
            args += ["--resume", "--seed", "9"]
    elif case == "other_folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "arch":
        args[args.index("--arch") + 1] = '{"wings": 2}'
    code, err = _run(capsys, *args)
    assert code == 2
    assert re.search(pattern, err), err
    assert "Traceback" not in err


def test_max_minutes_stops_with_a_checkpoint_and_resume_finishes(capsys, tmp_path):
    out = tmp_path / "base"
    args = ["pretrain-base", "--output", out, "--arch", "tiny", "--size", "32", "--vae-steps", "1",
            "--unet-steps", "1", "--batch-size", "1", "--max-minutes", "0"]
    code, _ = _run(capsys, *args)
    assert code == 0
    assert (out / "checkpoints" / "stage1-0" / "weights.safetensors").is_file()
    assert not (out / "model_index.json").exists()
    code, err = _run(capsys, *args[:-2], "--resume")
    assert code == 0, err
    assert (out / "model_index.json").is_file()
