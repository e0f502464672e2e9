"""The `defectfill train` command: settings, config files, and a clear message for every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from defectfill.cli import main
from defectfill.config.stages import TrainConfig


def test_defaults_are_the_design_values():
    c = TrainConfig()
    assert c.model == "sd2-community/stable-diffusion-2-inpainting"
    assert (c.resolution, c.steps, c.batch_size, c.grad_accum) == (512, 2000, 4, 1)
    assert (c.lr_unet, c.lr_text, c.warmup_steps, c.lora_rank) == (2e-4, 4e-5, 100, 8)
    assert (c.lambda_def, c.lambda_obj, c.lambda_attn, c.alpha) == (0.5, 0.2, 0.05, 0.3)
    assert (c.token, c.num_boxes, c.box_min, c.box_max, c.max_scale) == ("sks", 30, 0.03, 0.25, 1.125)
    assert c.defect_prompt == "A photo of {token}" and c.object_prompt == "A {object} with {token}"


def test_yaml_file_then_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: /d\ncategory: nut\ndefect-type: hole\noutput: /o\nsteps: 50\nlr_unet: 0.001\n")
    c = TrainConfig.from_settings({"steps": 7}, str(cfg))
    assert (c.data, c.category, c.defect_type, c.steps, c.lr_unet) == ("/d", "nut", "hole", 7, 0.001)


def test_yaml_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stepz: 5\n")
    with pytest.raises(Exception, match="c.yaml: unknown setting 'stepz'"):
        TrainConfig.from_settings({}, str(cfg))


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def base_args(demo_root, tiny_model_dir, tmp_path):
    return ["train", "--data", str(demo_root), "--category", "disc", "--defect-type", "scratch",
            "--output", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--resolution", "64",
            "--steps", "1", "--batch-size", "1", "--sample-every", "0"]


def _with(args, **changes):
    args = list(args)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        args[args.index(flag) + 1] = str(value)
    return args


def test_train_command_runs(capsys, base_args, tmp_path):
    code, err = _run(capsys, *base_args)
    assert code == 0, err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("case, pattern", [
    ("missing_root", "nowhere: data folder not found"),
    ("unknown_category", "unknown category 'hazelnut'.*Categories found: disc, weave"),
    ("unknown_type", "unknown defect type 'hole'.*Defect types found: scratch, spot"),
    ("missing_required", "missing required setting.*--defect-type"),
    ("bad_model", "not a diffusers pipeline folder"),
    ("resume_nothing", "--resume given but the folder does not exist"),
    ("bad_value", "--steps must be at least 1"),
])
def test_bad_input_gives_a_clear_message(capsys, base_args, tmp_path, case, pattern):
    args = base_args
    if case == "missing_root":
        args = _with(args, data=tmp_path / "nowhere")
    elif case == "unknown_category":
        args = _with(args, category="hazelnut")
    elif case == "unknown_type":
        args = _with(args, defect_type="hole")
    elif case == "missing_required":
        i = args.index("--defect-type")
        args = args[:i] + args[i + 2:]
    elif case == "bad_model":
        (tmp_path / "notamodel").mkdir()
        args = _with(args, model=tmp_path / "notamodel")
    elif case == "resume_nothing":
        args = args + ["--resume", "latest"]
    elif case == "bad_value":
        args = _with(args, steps=0)
    code, err = _run(capsys, *args)
    assert code == 2
    assert "Traceback" not in err
    import re
    assert re.search(pattern, err), err


def _broken_copy(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "disc", root / "disc")
    return root


@pytest.mark.parametrize("case, pattern", [
    ("no_mask", r"002.png: defect image has no mask"),
    ("mask_size", r"001_mask.png: mask is 32x32 but its image 001.png is 64x64"),
    ("all_empty", r"every mask of defect type 'scratch' in 'disc' is empty"),
    ("unreadable", r"004.png: cannot read this file as an image"),
])
def test_bad_data_gives_a_clear_message(capsys, base_args, demo_root, tmp_path, case, pattern):
    root = _broken_copy(demo_root, tmp_path)
    gt, imgs = root / "disc" / "ground_truth" / "scratch", root / "disc" / "test" / "scratch"
    if case == "no_mask":
        (gt / "002_mask.png").unlink()
    elif case == "mask_size":
        Image.open(gt / "001_mask.png").resize((32, 32)).save(gt / "001_mask.png")
    elif case == "all_empty":
        for p in gt.iterdir():
            Image.new("L", (64, 64)).save(p)
    elif case == "unreadable":
        (imgs / "004.png").write_bytes(b"\x89PNG broken")
    code, err = _run(capsys, *_with(base_args, data=root))
    assert code == 2 and "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists(), "nothing is written for bad data"


def test_output_with_another_run_is_refused_and_kept(capsys, base_args, tmp_path):
    assert _run(capsys, *base_args)[0] == 0
    config_before = (tmp_path / "run" / "config.json").read_text()
    weights_before = (tmp_path / "run" / "pytorch_lora_weights.safetensors").read_bytes()
    code, err = _run(capsys, *(base_args + ["--lora-rank", "4"]))
    assert code == 2 and "holds a run with a different config (lora_rank: 8 -> 4)" in err
    code, err = _run(capsys, *(base_args + ["--lora-rank", "4", "--resume", "latest"]))
    assert code == 2 and "different config" in err
    code, err = _run(capsys, *base_args)
    assert code == 2 and "already holds this run. Pass --resume latest" in err
    assert (tmp_path / "run" / "config.json").read_text() == config_before
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").read_bytes() == weights_before
    # continuing with more steps is allowed
    code, err = _run(capsys, *(_with(base_args, steps=2) + ["--resume", "latest"]))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2


def test_output_that_is_some_other_folder_is_refused(capsys, base_args, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.docx").write_text("precious")
    code, err = _run(capsys, *base_args)
    assert code == 2 and "is not a defectfill run" in err
    assert (tmp_path / "run" / "thesis.docx").read_text() == "precious"


def test_resume_with_no_checkpoint_in_a_run(capsys, base_args, tmp_path):
    (tmp_path / "run").mkdir()
    cfg = TrainConfig.from_settings({k.lstrip("-").replace("-", "_"): v for k, v in zip(base_args[1::2], base_args[2::2], strict=True)})
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    code, err = _run(capsys, *(base_args + ["--resume", "latest"]))
    assert code == 2 and "found no checkpoint-N folder" in err


# --------------------------------------------------------------------------- help and mistyped input


def _section(help_text: str, title: str) -> str:
    """One --help section: from its title line to the next section's."""
    start = help_text.index(f"\n{title}:\n")
    rest = help_text[start + len(title) + 3:]
    ends = [i for i in (rest.find("\n\n"),) if i >= 0]
    return rest[: ends[0]] if ends else rest


def test_run_help_is_in_sections_with_one_default_and_required_flags_marked(capsys):
    from defectfill.cli import build_parser

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: defectfill run --data DATA --output OUTPUT [options]")
    sections = {t: _section(text, t) for t in ("data", "model", "training", "checkpoints and logging", "sampling",
                                               "Low-Fidelity Selection", "evaluation", "inspection models", "output",
                                               "execution")}
    assert "--steps STEPS" in sections["training"] and "--lr-unet" in sections["training"]
    assert "--guidance" in sections["sampling"] and "--generate-steps" in sections["sampling"]
    assert "--lpips-random-backbone" in sections["Low-Fidelity Selection"]
    assert "--kid-subsets" in sections["evaluation"] and "--downstream-epochs" in sections["inspection models"]
    assert "--executor" in sections["execution"] and "--data DATA" in sections["data"]
    assert "(default: None)" not in text
    run = build_parser().subcommands["run"]
    run.format_help()  # its flags are complete
    for action in run._actions:
        assert (action.help or "").count("default") <= 1, action.option_strings
    helps = {a.dest: a.help for a in run._actions}
    assert helps["data"].endswith("(required)") and helps["output"].endswith("(required)")
    assert helps["steps"].endswith("(default: 2000)")


def test_a_mistyped_flag_names_the_closest_one_with_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--data", "d", "--output", "o", "--stpes", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: defectfill run --data DATA")  # the subcommand's usage, not the top level's
    assert "defectfill run: error: unrecognized arguments: --stpes 3; did you mean --steps?" in err
    with pytest.raises(SystemExit):
        main(["train", "--lr-unt=1"])
    assert "did you mean --lr-unet?" in capsys.readouterr().err


def test_a_mistyped_command_or_choice_names_the_closest_one(capsys):
    with pytest.raises(SystemExit):
        main(["rn", "--data", "d"])
    assert "invalid choice: 'rn'" in (err := capsys.readouterr().err) and "(did you mean run?)" in err
    with pytest.raises(SystemExit):
        main(["run", "--downstream", "bth"])
    err = capsys.readouterr().err
    assert err.startswith("usage: defectfill run") and "(did you mean both?)" in err
    with pytest.raises(SystemExit):
        main(["run", "--xyzzy"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess
