"""One model per object and images with several defects, on the tiny pipeline.

One per-object run (disc: scratch and spot) is trained once for the module and shared."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from helpers import run_quick_generate, take_grads, tiny_config, write_run
from safetensors.torch import load_file

from defectfill.cli import main
from defectfill.config.stages import TrainConfig
from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, load_rgb, open_layout
from defectfill.data.split import make_object_split
from defectfill.generate.generator import DefectGenerator
from defectfill.model.pipeline import load_pipeline
from defectfill.outputs.generated import MANIFEST, row_file
from defectfill.train.trainer import (
    build_models,
    defectfill_losses,
    load_object_references,
    make_micro_batch,
    prompt_inputs,
    train,
)

TYPES = ["scratch", "spot"]


@pytest.fixture(scope="module")
def object_run(tmp_path_factory, demo_root, tiny_model_dir):
    """(run folder, the trained pipeline): `train --defect-type all` on disc, 2 steps at a high rate."""
    pipe = load_pipeline(str(tiny_model_dir))
    out = tmp_path_factory.mktemp("object") / "disc"
    run = train(tiny_config(demo_root, out, tiny_model_dir, defect_type="all", steps=2, warmup_steps=0,
                            lr_unet=5e-2, lr_text=5e-2, sample_every=2, sample_steps=1), pipe=pipe)
    return run, pipe


def _manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


# --------------------------------------------------------------------------- training


def test_object_run_records_its_types_and_one_token_file_per_type(object_run):
    run, pipe = object_run
    config = json.loads((run / "config.json").read_text())
    assert config["defect_type"] == "scratch,spot"  # `all` resolved, so a resume compares the same list
    split = json.loads((run / "split.json").read_text())
    assert split["per_object"] and list(split["types"]) == TYPES
    assert all(len(split["types"][t]["reference"]) == 2 for t in TYPES)
    emb = pipe.text_encoder.get_input_embeddings()
    assert emb.new_rows.shape[0] == 2
    for i, t in enumerate(TYPES):
        saved = load_file(str(run / f"learned_embeds-{t}.safetensors"))
        assert set(saved) == {f"<{t}>"}
        torch.testing.assert_close(saved[f"<{t}>"], emb.new_rows.detach()[i])
    assert not (run / "learned_embeds.safetensors").exists()
    assert (run / "logs" / "samples" / "step-000002.png").is_file()  # drawn with the first type's token


def test_stock_diffusers_reproduces_the_object_model(object_run, tiny_model_dir):
    """`load_lora_weights(run)` plus `load_textual_inversion` of the type files computes what the trained modules
    computed, for each type's prompt (text encoder and UNet)."""
    run, trained = object_run
    trained.unet.eval()
    trained.text_encoder.eval()
    fresh = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_model_dir))
    fresh.load_lora_weights(str(run))
    fresh.load_textual_inversion([str(run / f"learned_embeds-{t}.safetensors") for t in TYPES],
                                 token=[f"<{t}>" for t in TYPES])
    x = torch.randn(1, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = {}
    for t in TYPES:
        prompt = f"A disc with <{t}>"
        with torch.no_grad():
            outs = []
            for pipe in (trained, fresh):
                ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
                text = pipe.text_encoder(ids)[0]
                outs.append((text, pipe.unet(x, torch.tensor([500]), encoder_hidden_states=text).sample))
        for a, b in zip(outs[0], outs[1], strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        texts[t] = outs[0][0]
    assert (texts["scratch"] - texts["spot"]).abs().max() > 1e-4, "the two types' tokens encode alike"


@pytest.fixture
def object_models(demo_root, tiny_model_dir, tmp_path):
    """A per-object model (non-zero LoRA), its references, groups and prompts."""
    from helpers import perturb_lora

    config = tiny_config(demo_root, tmp_path / "run", tiny_model_dir, defect_type="scratch,spot")
    models = build_models(config, torch.device("cpu"), torch.float32, pipe=load_pipeline(str(tiny_model_dir)))
    perturb_lora(models.unet, models.text_encoder)
    with torch.no_grad():  # both rows start from the same word; apart, the two types' prompts encode apart
        models.token_embedding.new_rows.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    split = make_object_split(open_layout(demo_root), "disc", TYPES)
    refs = load_object_references(split, config, 64)
    return config, models, refs, prompt_inputs(models.tokenizer, config, refs.tokens)


def test_references_carry_their_own_types_group(object_models, demo_root):
    config, models, refs, prompts = object_models
    assert refs.tokens == ["<scratch>", "<spot>"] and refs.groups.tolist() == [0, 0, 1, 1]
    # the references of each group are its type's images, masks included
    from defectfill.data import make_split

    for g, t in enumerate(TYPES):
        expected = make_split(open_layout(demo_root), "disc", t).reference
        mask = load_mask(expected[0].mask)
        assert refs.references.masks[2 * g][0].sum() == pytest.approx(float(mask.sum()), rel=0.02)
    batch = make_micro_batch(*refs.references[:2], config, 0, 0, 0, 1, refs.references.valid, refs.groups)
    from defectfill.train.trainer import reference_indices

    picked = reference_indices(4, 0, config.batch_size, config.seed)
    assert batch.groups.tolist() == refs.groups[picked].tolist()


def test_each_row_gets_its_own_types_prompt_and_attention_token(object_models, monkeypatch):
    """Rows of a scratch and a spot reference: the defect rows see their own type's defect prompt, the object rows
    their own object prompt, and the attention loss reads each row at its own token. Training a row with another
    type's prompt, or reading its attention at another token, fails here."""
    from defectfill.train.trainer import MicroBatch

    config, models, refs, prompts = object_models
    images, masks = refs.references.images, refs.references.masks
    batch = MicroBatch(images[[0, 2]], masks[[0, 2]], torch.zeros(2, 1, 64, 64), torch.Generator().manual_seed(0),
                       groups=torch.tensor([0, 1]))
    batch.box_masks[:, :, 10:30, 10:30] = 1
    seen = {}
    forward = models.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kwargs):
        seen["text"] = encoder_hidden_states.detach().clone()
        seen["weights"] = models.recorder.token_weights.detach().clone()
        return forward(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(models.unet, "forward", spy)
    with torch.no_grad():
        defectfill_losses(models, batch, prompts, config, torch.device("cpu"))
        tok = models.tokenizer
        encode = {}
        for t in TYPES:
            for name in ("defect_prompt", "object_prompt"):
                ids = tok(config.prompt(getattr(config, name), f"<{t}>"), padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
                encode[t, name] = models.text_encoder(ids)[0][0]
    for row, t in enumerate(TYPES):
        torch.testing.assert_close(seen["text"][row], encode[t, "defect_prompt"])
        torch.testing.assert_close(seen["text"][2 + row], encode[t, "object_prompt"])
        own_id = tok.convert_tokens_to_ids(f"<{t}>")
        ids = tok(config.prompt(config.defect_prompt, f"<{t}>"), padding="max_length", max_length=77).input_ids
        assert seen["weights"][row].nonzero().flatten().tolist() == [ids.index(own_id)]
    assert not torch.equal(seen["text"][0], seen["text"][1])


def test_a_types_references_train_only_its_own_token_row(object_models):
    """A micro-batch of scratch references only: the <scratch> row gets gradient, the <spot> row none."""
    from defectfill.train.trainer import MicroBatch

    config, models, refs, prompts = object_models
    images, masks = refs.references.images, refs.references.masks
    for rows, trained in (([0, 1], 0), ([2, 3], 1)):
        batch = MicroBatch(images[rows], masks[rows], torch.ones(2, 1, 64, 64), torch.Generator().manual_seed(0),
                           groups=refs.groups[rows])
        defectfill_losses(models, batch, prompts, config, torch.device("cpu")).total.backward()
        grad = next(g for n, g in take_grads(models).items() if n.endswith("token_embedding.new_rows"))
        assert grad[trained].abs().sum() > 0, "a type's references do not train its token"
        assert grad[1 - trained].abs().sum() == 0, "a type's references train another type's token"


def test_visa_multi_type_images_train_with_all_their_tokens(tmp_path, tiny_model_dir):
    """An image labelled with two trained types joins as one reference with both tokens side by side (the attention
    averaged over both); one showing a type the model does not learn stays out."""
    from test_layouts import make_visa

    root = make_visa(tmp_path / "visa")
    layout = open_layout(root)
    types = ["chunk_of_wax_missing", "weird_candle_wick"]
    split = make_object_split(layout, "candle", types)
    assert [m.sample.image.name for m in split.multi_reference] == ["005.JPG"]  # 006 also shows a third type
    assert split.multi_reference[0].types == tuple(types)
    config = TrainConfig(data=str(root), category="candle", defect_type=",".join(types), resolution=32)
    refs = load_object_references(split, config, 32)
    assert refs.tokens[-1] == "<chunk_of_wax_missing> <weird_candle_wick>" and refs.groups[-1] == 2
    tokenizer = load_pipeline(str(tiny_model_dir)).tokenizer
    tokenizer.add_tokens([f"<{t}>" for t in types])
    prompts = prompt_inputs(tokenizer, config, refs.tokens)
    assert prompts.token_weights.shape == (3, 77)
    assert sorted(prompts.token_weights[2][prompts.token_weights[2] > 0].tolist()) == [0.5, 0.5]


def test_per_object_bad_input(demo_root, tiny_model_dir, tmp_path):
    with pytest.raises(DefectFillError, match="--new-token.*own new token"):
        tiny_config(demo_root, tmp_path / "r", tiny_model_dir, defect_type="all", new_token="<x>").validate()
    with pytest.raises(DefectFillError, match="unknown defect type 'dent'"):
        train(tiny_config(demo_root, tmp_path / "r", tiny_model_dir, defect_type="scratch,dent"))
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- generation


def test_generate_draws_each_type_from_the_object_run(object_run, tmp_path, capsys):
    run, _ = object_run
    gen = DefectGenerator.from_run(run, steps=1, candidates=1, defect_type="spot")
    assert gen.prompt == "A disc with <spot>" and gen.for_type("scratch").prompt == "A disc with <scratch>"
    assert run_quick_generate(run, tmp_path / "spot", "--count", "2", "--defect-type", "spot") == 0
    rows = _manifest(tmp_path / "spot")
    assert [r["image"] for r in rows] == ["disc/test/spot/000.png", "disc/test/spot/001.png"]
    assert all(r["prompt"] == "A disc with <spot>" and r["defect_type"] == "spot" for r in rows)
    held_out = json.loads((run / "split.json").read_text())["types"]["spot"]["held_out"]
    assert all(any(r["mask_source"].endswith(h["mask"]) for h in held_out) for r in rows)
    # without a type, or with one the run does not know: the run's types are named
    assert main(["generate", "--run", str(run), "--output", str(tmp_path / "x"), "--count", "1"]) == 2
    assert "scratch, spot" in capsys.readouterr().err
    assert main(["generate", "--run", str(run), "--output", str(tmp_path / "x"), "--count", "1",
                 "--defect-type", "dent"]) == 2
    err = capsys.readouterr().err
    assert "dent" in err and "scratch, spot" in err and "Traceback" not in err


def _check_several(out, types):
    """Every image: the union mask is the OR of each defect's own mask, each defect non-empty and painted, and the
    image equals its source outside the union."""
    rows = _manifest(out)
    combined = "+".join(types)
    for r in rows:
        assert r["image"].startswith(f"disc/test/{combined}/") and r["defect_type"] == combined
        assert [d["defect_type"] for d in r["defects"]] == types
        union = load_mask(out / r["mask"])
        own = [load_mask(out / d["mask"]) for d in r["defects"]]
        assert all(m.any() for m in own)
        assert np.array_equal(union, np.logical_or.reduce(own)), "the union mask is not every defect's mask"
        image, source = np.asarray(load_rgb(out / r["image"])), np.asarray(load_rgb(row_file(out, r["source_image"])))
        assert np.array_equal(image[~union], source[~union])
        assert all((image[m] != source[m]).any() for m in own), "a defect was not painted"
        for d, t in zip(r["defects"], types, strict=True):
            assert d["prompt"].endswith(f"<{t}>") or d["prompt"] == "A disc with sks"
            assert len(d["scores"]) == 2 and d["chosen"] == int(np.argmax(d["scores"]))
    return rows


def test_several_defects_from_one_object_run(object_run, tmp_path, monkeypatch):
    run, _ = object_run
    calls = []
    real_call = DefectGenerator.__call__

    def spy(self, image, mask, seed=0):
        result = real_call(self, image, mask, seed)
        calls.append((self.prompt, np.asarray(image).copy(), np.asarray(result.image).copy()))
        return result

    monkeypatch.setattr(DefectGenerator, "__call__", spy)
    out = tmp_path / "both"
    assert run_quick_generate(run, out, "--count", "2", "--defect-types", "spot,scratch") == 0
    rows = _check_several(out, ["spot", "scratch"])
    assert [c[0] for c in calls] == ["A disc with <spot>", "A disc with <scratch>"] * 2
    # one after the other: the second defect is painted into the first one's result
    assert np.array_equal(calls[1][1], calls[0][2]) and np.array_equal(calls[3][1], calls[2][2])
    assert all(r["defects"][0]["seed"] != r["defects"][1]["seed"] for r in rows)
    assert open_layout(out, "mvtec").defect_types("disc") == ["spot+scratch"]
    assert (out / "preview.png").is_file()


def test_several_defects_from_per_type_runs_and_unknown_types(tmp_path, tiny_model_dir, demo_root, capsys):
    runs = [write_run(tmp_path / f"disc-{t}", tiny_model_dir, demo_root, seed=i, defect_type=t)
            for i, t in enumerate(TYPES)]
    out = tmp_path / "both"
    assert run_quick_generate(",".join(map(str, runs)), out, "--count", "1", "--defect-types", "scratch,spot") == 0
    rows = _check_several(out, TYPES)
    assert [row_file(out, d["run"]) for d in rows[0]["defects"]] == runs  # each run, relative to the folder
    code = main(["generate", "--run", ",".join(map(str, runs)), "--output", str(tmp_path / "x"), "--count", "1",
                 "--defect-types", "scratch,dent"])
    err = capsys.readouterr().err
    assert code == 2 and "dent" in err and f"scratch ({runs[0]})" in err and f"spot ({runs[1]})" in err


# --------------------------------------------------------------------------- the whole job


def test_run_one_model_per_object_trains_once_and_draws_every_type(demo_root, tiny_model_dir, tmp_path, monkeypatch):
    from helpers import abs_distance

    import defectfill.train.trainer as train_module
    from defectfill.config.stages import RunConfig
    from defectfill.demo.job import UntrainedFeatures
    from defectfill.run.runner import run_all

    trained = []
    real_train = train_module.train

    def spy(config, pipe=None):
        trained.append(config.defect_type)
        return real_train(config, pipe)

    monkeypatch.setattr(train_module, "train", spy)
    config = RunConfig.from_settings(dict(
        data=str(demo_root), model=str(tiny_model_dir), output=str(tmp_path / "work"), resolution=64, steps=1,
        batch_size=1, warmup_steps=1, save_every=1, sample_every=0, categories=["disc"], count=1, candidates=1,
        generate_steps=1, kid_subsets=2, lpips_size=64, lpips_random_backbone=True, one_model_per_object=True))
    results = run_all(config, feature_extractor=UntrainedFeatures(), distance=abs_distance)
    assert trained == ["scratch,spot"]
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    work = tmp_path / "work"
    assert (work / "runs" / "disc" / "learned_embeds-spot.safetensors").is_file()
    for t in TYPES:
        rows = _manifest(work / "generated" / f"disc-{t}")
        assert rows[0]["prompt"] == f"A disc with <{t}>"
        assert (work / "eval" / f"disc-{t}" / "report.html").is_file()
        # the token self-check probes each type's own token and masks
        check = json.loads((work / "runs" / "disc" / f"token_check-{t}.json").read_text())
        assert check["defect_type"] == t and check["verdict"]
        assert all(f"<{t}>" in row["text"] for row in check["distances"] if "without" not in row["prompt"])
    assert json.loads((work / "run.json").read_text())["one_model_per_object"] is True


def test_dry_run_plans_one_model_per_object(demo_root, tmp_path, capsys):
    assert main(["run", "--data", str(demo_root), "--categories", "all", "--output", str(tmp_path / "w"),
                 "--steps", "30", "--one-model-per-object", "--dry-run",
                 # offline, the pre-flight needs networks that are here: the built-in base, no KID/IC-LPIPS/AlexNet
                 "--model", "defectfill-mini", "--no-kid", "--no-ic-lpips", "--lpips-random-backbone"]) == 0
    out = capsys.readouterr().out
    assert "3 defect type(s) in 2 model(s), one per object, 60 training steps in all" in out



def test_the_ui_draws_each_type_of_an_object_run_into_one_dataset(object_run, demo_root, tmp_path):
    """`defectfill ui` on a per-object run: each type is drawn with its own token and added under its own
    type in one dataset, with the type in the manifest row (the backend the page calls)."""
    from defectfill.ui.backend import Source, Workspace

    run, _ = object_run
    ws = Workspace([run.parent], tmp_path / "datasets", device="cpu", lpips_random_backbone=True)
    assert ws.defect_types(run.name) == ["scratch", "spot"]
    good = sorted((demo_root / "disc" / "train" / "good").glob("*.png"))[0]
    source = Source(load_rgb(good), good, good.name)
    mask = np.zeros((source.image.size[1], source.image.size[0]), bool)
    mask[20:30, 20:30] = True
    for t in ("spot", "scratch"):
        outcome = ws.generate(run.name, source, mask, candidates=1, steps=1, seed=0, defect_type=t)
        assert outcome.defect_type == t and f"<{t}>" in outcome.prompt
        row = ws.add_to_dataset(outcome, "disc")
        assert row["defect_type"] == t and row["image"].startswith(f"disc/test/{t}/")
    rows = _manifest(tmp_path / "datasets" / "disc")
    assert [(r["index"], r["defect_type"]) for r in rows] == [(0, "spot"), (1, "scratch")]
    with pytest.raises(DefectFillError, match="draws scratch, spot"):
        ws.generate(run.name, source, mask, candidates=1, steps=1, defect_type="dent")
