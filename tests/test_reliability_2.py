"""Reliability, part 2: pretrain-base's settings, architecture and resume records; the UI's unreadable folders;
generate's journal; 1cls split CSVs; seeds; and a battery of bad inputs and faults against every command."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from helpers import generate_config, write_run

from defectfill.cli import main
from defectfill.config.settings import _kind
from defectfill.config.stages import GenerateConfig
from defectfill.core.errors import DefectFillError
from defectfill.pretrain.base import TINY_ARCH, BaseArch, PretrainSettings, pretrain_base


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _tiny(output, **overrides) -> PretrainSettings:
    settings = dict(output=str(output), size=32, vae_steps=3, unet_steps=2, batch_size=1, seed=5, save_every=1,
                    warmup_steps=1, arch=TINY_ARCH)
    settings.update(overrides)
    return PretrainSettings(**settings)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("run") / "disc-scratch", tiny_model_dir, demo_root)


# --------------------------------------------------------------------------- pretrain-base: settings


def test_every_pretrain_number_declares_its_bounds():
    """Each numeric setting of pretrain-base and of its architecture has a least (and the architecture's a
    most) on its field, as the other stages' settings do."""
    for f in dataclasses.fields(PretrainSettings):
        if _kind(f) in ("int", "float"):
            assert "min" in f.metadata or "above" in f.metadata, f.name
    assert PretrainSettings.__dataclass_fields__["seed"].metadata["max"] == 2**32 - 1
    for f in dataclasses.fields(BaseArch):
        assert ("min" in f.metadata and "max" in f.metadata) or "choices" in f.metadata, f.name


@pytest.mark.parametrize("flags, message", [
    (["--seed", "4294967296"], r"--seed must be in \[0, 4294967295\] \(got 4294967296\)"),
    (["--seed", "-1"], r"--seed must be 0 or more"),
    (["--size", "8192"], r"--size must be in \[32, 4096\]"),
    (["--batch-size", "100000"], r"--batch-size must be in \[1, 4096\]"),
    (["--save-every", "0"], r"--save-every must be at least 1"),
    (["--unet-steps", "100000000"], r"--unet-steps must be in \[1, 10000000\]"),
    (["--edge-weight", "nan"], r"--edge-weight: expected a finite number"),
    (["--edge-weight", "-1"], r"--edge-weight must be 0 or more"),
    (["--max-minutes", "-1"], r"--max-minutes -1.0: must be 0 or more"),
    (["--arch", '{"unet_heads": [5, 8, 8]}'], r"--arch unet_channels \(48, 96, 96\): each must be divisible by "
                                               r"its unet_heads \(5, 8, 8\)"),
    (["--arch", '{"unet_groups": 5}'], r"each must be divisible by unet_groups 5"),
    (["--arch", '{"vae_groups": 7}'], r"--arch vae_channels \(32, 64, 64\): each must be divisible by vae_groups 7"),
    (["--arch", '{"unet_layers": 0}'], r"--arch unet_layers 0: must be in \[1, 64\]"),
    (["--arch", '{"text_heads": 3}'], r"--arch text_hidden 128: must be divisible by text_heads 3"),
    (["--arch", '{"unet_channels": [48], "unet_heads": [4]}'], r"needs at least two levels"),
    (["--arch", '{"unet_heads": [4, 8]}'], r"one head count per UNet level \(3\)"),
    (["--arch", '{"vae_channels": 32}'], r"--arch vae_channels: expected a list of whole numbers, got 32"),
    (["--arch", '{"text_vocab": "all"}'], r"--arch text_vocab 'all': choose one of mini, clip"),
])
def test_pretrain_refuses_bad_settings_before_any_work(capsys, tmp_path, flags, message):
    import re

    out = tmp_path / "base"
    code, err = _cli(capsys, "pretrain-base", "--output", out, "--size", "32", "--vae-steps", "1",
                     "--unet-steps", "1", "--batch-size", "1", *flags)
    assert code == 2 and re.search(message, err), err
    assert not out.exists()  # refused before the folder was made or a network built


def test_a_hand_made_pretrain_setting_is_type_checked_too():
    with pytest.raises(DefectFillError, match=r"--vae-lr: expected a finite number, got nan"):
        _tiny("x", vae_lr=float("nan")).check()
    with pytest.raises(DefectFillError, match=r"--vae-lr must be positive"):
        _tiny("x", vae_lr=0.0).check()
    with pytest.raises(DefectFillError, match=r"--vae-steps: expected a whole number, got 1.5"):
        _tiny("x", vae_steps=1.5).check()


# --------------------------------------------------------------------------- pretrain-base: resume records


@pytest.fixture(scope="module")
def stopped_pretrain(tmp_path_factory):
    """A tiny pretraining stopped after two steps of stage 1 (checkpoint stage1-2), to damage copies of."""
    out = tmp_path_factory.mktemp("pretrain") / "base"
    assert pretrain_base(_tiny(out), stop_after_steps=2, progress=False) is None
    assert (out / "checkpoints" / "stage1-2" / "state.json").is_file()
    return out


def _damage(folder, case):
    ckpt = folder / "checkpoints" / "stage1-2"
    if case == "truncated_record":
        text = (folder / "pretrain.json").read_text()
        (folder / "pretrain.json").write_text(text[: len(text) // 2])
        return folder / "pretrain.json"
    if case == "record_a_list":
        (folder / "pretrain.json").write_text("[1, 2]")
        return folder / "pretrain.json"
    if case == "truncated_state":
        (ckpt / "state.json").write_text('{"stage": 1, "st')
    elif case == "state_a_list":
        (ckpt / "state.json").write_text("[]")
    elif case == "state_step_text":
        (ckpt / "state.json").write_text('{"stage": 1, "step": "2"}')
    elif case == "state_step_other":
        (ckpt / "state.json").write_text('{"stage": 1, "step": 7}')
    elif case == "optimizer_meta":
        (ckpt / "optimizer.json").write_text('{"param_groups": 3, "scalars": []}')
    elif case == "weights_truncated":
        data = (ckpt / "weights.safetensors").read_bytes()
        (ckpt / "weights.safetensors").write_bytes(data[:100])
    return ckpt


@pytest.mark.parametrize("case", ["truncated_record", "record_a_list", "truncated_state", "state_a_list",
                                  "state_step_text", "state_step_other", "optimizer_meta", "weights_truncated"])
def test_a_damaged_resume_record_is_named_and_nothing_is_deleted(stopped_pretrain, tmp_path, case):
    folder = tmp_path / "base"
    shutil.copytree(stopped_pretrain, folder)
    named = _damage(folder, case)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(DefectFillError) as info:
        pretrain_base(_tiny(folder), resume=True, progress=False)
    message = str(info.value)
    assert str(named) in message and ("new folder" in message or "move it aside" in message), message
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # the checkpoints are all kept


# --------------------------------------------------------------------------- generate's .writing journal


def test_the_writing_journal_is_pruned_and_a_killed_jobs_journal_cleaned_on_resume(run_dir, tmp_path):
    from PIL import Image

    from defectfill.generate.writer import run_generate
    from defectfill.outputs.generated import WRITING_GLOB

    out = tmp_path / "out"
    run_generate(generate_config(run_dir, out, "--count", "4"), stop_after=2)
    assert not list(out.glob(WRITING_GLOB))  # each finished item took its journal entry with it
    # killed mid-item: item 2's files journalled and half written, no row; and a journal of an item
    # this resume will not draw (index 7 of a longer job)
    names = ["disc/test/scratch/002.png", "disc/ground_truth/scratch/002_mask.png", "disc/test/scratch/007.png"]
    (out / ".writing.part0.jsonl").write_text(json.dumps({"files": names[:2]}) + "\n")
    (out / ".writing.part1.jsonl").write_text(json.dumps({"files": names[2:]}) + "\n" + '{"files": ["di')
    for name in (names[0], names[2]):
        Image.new("RGB", (64, 64), (255, 0, 0)).save(out / name)
    (out / "notes.txt").write_text("mine")  # journals name item files only; anything else stays
    (out / ".writing.part2.jsonl").write_text(json.dumps({"files": ["notes.txt", "../outside.png"]}) + "\n")
    (tmp_path / "outside.png").write_text("not ours")
    run_generate(generate_config(run_dir, out, "--count", "4", "--resume"))
    assert not list(out.glob(WRITING_GLOB))
    assert not (out / names[2]).exists()  # the half-written item nobody redraws is gone with its journal
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside.png").read_text() == "not ours"
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- VisA's 1cls split CSV


@pytest.mark.parametrize("again", ["candle,test,normal,candle/Data/Images/Normal/0000.JPG,",  # train and test
                                   "candle,train,normal,./candle/Data/Images/Normal/0001.JPG,"])  # train twice
def test_a_1cls_split_csv_listing_an_image_twice_is_refused(tmp_path, again):
    from test_layouts import make_visa

    from defectfill.data import open_layout

    root = make_visa(tmp_path / "visa")
    with (root / "split_csv" / "1cls.csv").open("a") as fh:
        fh.write(again + "\n")
    layout = open_layout(root, "auto")
    with pytest.raises(DefectFillError, match=r"1cls.csv line 1\d: .*\.JPG is listed again \(first on line \d\)"):
        layout.good_images("candle")
    # the released file (each image once) still reads
    make_visa(tmp_path / "clean")
    assert len(open_layout(tmp_path / "clean", "auto").good_images("candle")) == 3


# --------------------------------------------------------------------------- seeds


def test_the_ui_takes_seeds_in_generates_range_and_records_them_there(run_dir, tmp_path):
    """The page's seed is generate's --seed (0..2**32-1): one outside is a message before any model loads."""
    import numpy as np
    from PIL import Image

    from defectfill.ui.backend import Source, Workspace

    ws = Workspace([run_dir], tmp_path / "datasets", device="cpu")
    (name,) = ws.runs()
    source = Source(Image.new("RGB", (64, 64), (90, 90, 90)), None, "upload")
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    for seed in (2**32, -1, 2**63):
        with pytest.raises(DefectFillError, match=rf"seed {seed}: choose a whole number in \[0, 4294967295\]"):
            ws.generate(name, source, mask, candidates=1, steps=1, seed=seed)
    assert ws._loaded is None  # refused before the model was loaded
    with pytest.raises(DefectFillError, match=r"--seed must be in \[0, 4294967295\]"):
        GenerateConfig.build({"run": "r", "output": "o", "count": 1, "seed": 2**32})


# --------------------------------------------------------------------------- the UI's unreadable folders


def test_the_uis_permission_errors_are_messages_naming_the_folder(run_dir, tmp_path, monkeypatch):
    """An unreadable dataset or an unwritable datasets folder (root ignores modes, so the refusals are made
    where the OS would make them) is a gr.Error naming the path and the fix, not a traceback."""
    import errno
    from pathlib import Path

    import gradio as gr

    import defectfill.ui.backend as backend
    from defectfill.ui.app import Handlers
    from defectfill.ui.backend import Workspace

    ws = Workspace([run_dir], tmp_path / "datasets", device="cpu")
    root = tmp_path / "datasets" / "ds"
    root.mkdir(parents=True)
    (root / "manifest.jsonl").write_text("")
    (root / "generate.json").write_text("{}")
    h = Handlers(ws)
    real_read = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self.name == "manifest.jsonl":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(gr.Error) as info:
        h.open_dataset("ds")
    assert str(root / "manifest.jsonl") in str(info.value) and "permissions" in str(info.value)
    monkeypatch.setattr(Path, "read_text", real_read)

    def unwritable(folder, command):
        raise PermissionError(errno.EROFS, "Read-only file system", str(folder / ".defectfill.lock"))

    monkeypatch.setattr(backend, "folder_lock", unwritable)
    with pytest.raises(gr.Error, match=rf"{root}.*Read-only file system.*must be able to read and write {root}"):
        h.reject("ds", 0, "")
    assert "Traceback" not in backend.os_error_message(OSError(errno.ENOSPC, "No space left on device"))


# --------------------------------------------------------------------------- a battery of bad inputs


@pytest.mark.parametrize("argv, message", [
    (["generate", "--run", "{empty}", "--output", "{tmp}/o", "--count", "1"], r"no config.json; this is not a "
                                                                              r"finished defectfill run folder"),
    (["evaluate", "--generated", "{garbage_gen}", "--output", "{tmp}/o"], r"Name what to compare with"),
    (["data", "--data", "{tmp}/nope"], r"nope: data folder not found"),
    (["data", "--data", "{garbage}"], r"cannot tell the dataset layout"),
    (["export", "--generated", "{tmp}/nope", "--to", "coco", "--output", "{tmp}/o"], r"--generated .*: folder not "
                                                                                     r"found"),
    (["run", "--data", "{tmp}/nope", "--output", "{tmp}/o", "--dry-run"], r"data folder not found"),
    (["pretrain-base", "--output", "{tmp}/o", "--arch", "{tmp}/nope.json"], r"--arch .*nope.json: cannot read"),
    (["pretrain-base", "--output", "{tmp}/o", "--arch", "[1, 2]"], r"--arch: must be a JSON object"),
    (["pretrain-base", "--output", "{tmp}/o", "--arch", "{empty}"], r"--arch .*: cannot read \(Is a directory\)"),
    (["pretrain-base", "--output", "{tmp}/o", "--arch", '{"vae_channels": ["a"]}'], r"expected a list of whole"),
    (["pretrain-base", "--output", "{file}", "--resume"], r"is a file, not a folder"),
    (["pretrain-base", "--output", "{tmp}/o", "--resume"], r"--resume given but no pretraining was started"),
])
def test_bad_input_to_each_command_is_a_message(capsys, tmp_path, argv, message):
    import re

    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "a.png").write_bytes(bytes(range(256)) * 2)  # not an image
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "manifest.jsonl").write_text("not json\n")
    (tmp_path / "gen" / "generate.json").write_text("[]")
    (tmp_path / "file").write_text("x")
    places = {"tmp": tmp_path, "empty": tmp_path / "empty", "garbage": tmp_path / "garbage",
              "garbage_gen": tmp_path / "gen", "file": tmp_path / "file"}
    argv = [a if a.startswith('{"') else a.format(**places) for a in argv]
    code, err = _cli(capsys, *argv)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "o").exists()  # refused before writing anything
