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


def test_a_stopped_run_leaves_the_stage_checkpoint_layout(capsys, tmp_path):
    """checkpoints/stage{N}-{step}/ holds the weights, the optimiser and state.json, so older folders resume."""
    import json

    out = tmp_path / "base"
    assert pretrain_base(_tiny(out, vae_steps=3), stop_after_steps=1, progress=False) is None
    (saved,) = (out / "checkpoints").iterdir()
    assert saved.name == "stage1-1"
    assert sorted(p.name for p in saved.iterdir()) == ["optimizer.json", "optimizer.safetensors", "state.json",
                                                      "weights.safetensors"]
    assert json.loads((saved / "state.json").read_text()) == {"stage": 1, "step": 1}
    assert all(k.startswith("vae.") for k in load_file(str(saved / "weights.safetensors")))


def _old_build_networks(arch, size: int, seed: int):
    """The builder pretrain had before it drew its networks from `model.networks`, as it was."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from defectfill.pretrain.base import tokenizer_folder

    vocab_size = len(json.loads((Path(tokenizer_folder(arch)) / "vocab.json").read_text()))
    n = len(arch.unet_channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=arch.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
            layers_per_block=arch.vae_layers, norm_num_groups=arch.vae_groups, sample_size=size,
            scaling_factor=0.18215,
        )
        unet = UNet2DConditionModel(
            sample_size=size // 2 ** (len(arch.vae_channels) - 1), in_channels=9, out_channels=4,
            layers_per_block=arch.unet_layers, block_out_channels=arch.unet_channels,
            norm_num_groups=arch.unet_groups, cross_attention_dim=arch.text_hidden,
            attention_head_dim=arch.unet_heads, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=arch.text_hidden * 4,
            num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads, max_position_embeddings=77,
            projection_dim=arch.text_hidden, hidden_act="gelu", bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1, pad_token_id=0,
        ))
    return vae, unet, text_encoder


def _config(module) -> dict:
    return module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)


@pytest.mark.parametrize("arch_name", ["base", "tiny"])
def test_networks_from_the_shared_builder_have_the_old_weights(arch_name):
    """pretrain's networks come from `model.networks`: same configs, same initial weights for a seed."""
    from defectfill.model.networks import MINI
    from defectfill.pretrain.base import BaseArch, build_networks, network_shape

    arch = BaseArch() if arch_name == "base" else TINY_ARCH
    if arch_name == "base":
        assert network_shape(arch) == MINI
    size = 64 if arch_name == "base" else 32
    for old, new in zip(_old_build_networks(arch, size, 7), build_networks(arch, size, 7), strict=True):
        assert type(old) is type(new)
        assert _config(old) == _config(new)
        old_state, new_state = old.state_dict(), new.state_dict()
        assert old_state.keys() == new_state.keys()
        for key in old_state:
            assert torch.equal(old_state[key], new_state[key]), key
