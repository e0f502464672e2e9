"""Generation: candidates in one batch, paste-back, Low-Fidelity Selection, the resumable dataset writer."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_run
from PIL import Image

from defectfill.config.stages import GenerateConfig
from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, load_rgb, make_split, open_layout
from defectfill.data.masks import estimate_foreground
from defectfill.data.split import check_sample
from defectfill.generate.generator import DefectGenerator, LPIPSScorer, feather_alpha, paste_back, select_low_fidelity
from defectfill.generate.writer import plan_items, run_generate
from defectfill.outputs.generated import CAPTION_H, MANIFEST, row_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("run") / "disc-scratch", tiny_model_dir, demo_root)


@pytest.fixture(scope="module")
def generator(run_dir):
    return DefectGenerator.from_run(run_dir, steps=2, candidates=3, scorer=FixedScorer([0.1, 0.9, 0.3]))


@pytest.fixture
def random_lpips(monkeypatch):
    """The real LPIPS path with a random AlexNet backbone (no download)."""
    import defectfill.model.lpips as lp

    real = lp.load_lpips
    monkeypatch.setattr(lp, "load_lpips", lambda *a, **k: real(pretrained_backbone=False))


class FixedScorer:
    def __init__(self, scores):
        self.scores = scores
        self.calls = 0

    def __call__(self, candidates, source):
        self.calls += 1
        assert candidates.shape[0] == len(self.scores) and source.shape[0] == 1
        return torch.tensor(self.scores)


def _good(demo_root, i=0):
    return load_rgb(demo_root / "disc" / "train" / "good" / f"{i:03d}.png")


def _box_mask(size=64):
    mask = np.zeros((size, size), bool)
    mask[20:30, 24:40] = True
    return mask


def _args(run, out, *extra):
    """The settings of `defectfill generate --run RUN --output OUT --steps 2 --candidates 2 EXTRA...`."""
    parser = argparse.ArgumentParser()
    GenerateConfig.add_arguments(parser)
    args = parser.parse_args(["--run", str(run), "--output", str(out), "--steps", "2", "--candidates", "2", *extra])
    return GenerateConfig.from_args(args)


def _manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


# --------------------------------------------------------------------------- API


def test_run_weights_are_loaded(run_dir, generator):
    unmerged = DefectGenerator.from_run(run_dir, steps=2, candidates=1, merge_lora=False)
    names = [n for n, _ in unmerged.pipe.unet.named_parameters() if "lora" in n]
    text_names = [n for n, _ in unmerged.pipe.text_encoder.named_parameters() if "lora" in n]
    assert names and text_names
    assert generator.prompt == "A disc with sks"
    assert isinstance(generator.pipe.scheduler, __import__("diffusers").DDIMScheduler)


def test_merged_lora_samples_what_the_lora_layers_sample_and_leaves_the_run_alone(run_dir, tiny_model_dir, demo_root):
    """Generation folds the LoRA into the weights (no LoRA layers left, the base weights changed in memory only)
    and samples the same images as the unmerged LoRA layers."""
    from defectfill.model.pipeline import load_pipeline

    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    merged = DefectGenerator.from_run(run_dir, steps=2, candidates=2, scorer=FixedScorer([0.0, 1.0]))
    layers = DefectGenerator.from_run(run_dir, steps=2, candidates=2, scorer=FixedScorer([0.0, 1.0]), merge_lora=False)
    for module in (merged.pipe.unet, merged.pipe.text_encoder):
        assert not [n for n, _ in module.named_parameters() if "lora" in n], "LoRA layers left after merging"
    base = load_pipeline(str(tiny_model_dir))
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    assert not torch.equal(merged.pipe.unet.state_dict()[q], base.unet.state_dict()[q]), "LoRA not merged"
    image, mask = _good(demo_root), _box_mask()
    a, b = merged(image, mask, seed=3), layers(image, mask, seed=3)
    for x, y in zip(a.candidates, b.candidates, strict=True):
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files


def test_outside_mask_equals_input_and_inside_changes(generator, demo_root):
    image, mask = _good(demo_root), _box_mask()
    result = generator(image, mask, seed=1)
    src = np.asarray(image)
    for cand in [result.image] + result.candidates:
        arr = np.asarray(cand)
        assert arr.shape == src.shape
        assert np.array_equal(arr[~mask], src[~mask])
    assert (np.asarray(result.image)[mask] != src[mask]).any()
    assert len(result.candidates) == 3 and len(set(result.seeds)) == 3


def test_candidates_one_batched_call_and_reproducible(generator, demo_root, monkeypatch):
    calls = []
    original = generator.pipe.__class__.__call__

    def spy(self, *a, **k):
        calls.append(k["num_images_per_prompt"])
        return original(self, *a, **k)

    monkeypatch.setattr(generator.pipe.__class__, "__call__", spy)
    image, mask = _good(demo_root), _box_mask()
    a = generator(image, mask, seed=5)
    b = generator(image, mask, seed=5)
    c = generator(image, mask, seed=6)
    assert calls == [3, 3, 3]  # all candidates of an (image, mask) in one pipeline call
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.candidates, b.candidates, strict=True))
    assert not np.array_equal(np.asarray(a.candidates[0]), np.asarray(c.candidates[0]))


def test_batch_size_splits_candidates_into_calls(generator, demo_root, monkeypatch):
    image, mask = _good(demo_root), _box_mask()
    whole = generator(image, mask, seed=7)
    calls = []
    original = generator.pipe.__class__.__call__

    def spy(self, *a, **k):
        calls.append(k["num_images_per_prompt"])
        return original(self, *a, **k)

    monkeypatch.setattr(generator.pipe.__class__, "__call__", spy)
    monkeypatch.setattr(generator, "batch_size", 2)
    split = generator(image, mask, seed=7)
    assert calls == [2, 1] and split.seeds == whole.seeds and len(split.candidates) == 3
    for a, b in zip(whole.candidates[:2], split.candidates[:2], strict=True):  # same generators, same samples
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


def test_thin_mask_reaches_the_unet_in_every_latent_cell_it_touches(generator, demo_root, monkeypatch):
    """Pins generation's mask channel: the pipeline gets the mask grown to whole latent cells, so the UNet is told
    to inpaint every cell a 1 px scratch touches (nearest sampling of the raw mask dropped all of this one), and
    the masked image is grey over the same cells; paste-back still follows the exact pixel mask."""
    seen = []
    unet = generator.pipe.unet
    original = unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(sample.detach().clone())
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    image = _good(demo_root)
    mask = np.zeros((64, 64), bool)
    mask[6:50, 13] = True  # latent cell column 3 (4 px cells), off the pixel column nearest sampling keeps
    result = generator(image, mask, seed=0)
    touched = torch.nn.functional.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], 4)[0, 0]
    assert touched.sum() == 12  # cell rows 1..12
    for sample in seen:  # every step, unconditional and conditional rows alike
        assert all(torch.equal(row[4], touched) for row in sample)
    src = np.asarray(image)
    assert np.array_equal(np.asarray(result.image)[~mask], src[~mask])


def test_source_size_differs_from_resolution(generator):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    mask = np.zeros((48, 80), bool)
    mask[10:20, 30:50] = True
    result = generator(image, mask, seed=0)
    assert result.image.size == (80, 48)
    assert np.array_equal(np.asarray(result.image)[~mask], np.asarray(image)[~mask])


def test_non_square_image_is_sampled_at_its_own_aspect_never_stretched(generator, monkeypatch):
    """Pins generation's size: the image keeps its aspect, its longer side at the run's resolution, sides padded to
    whole latent cells (4 px in the tiny model) and cut off again; the square resize stretched a 96x48 image to
    64x64. The output is the source's size and equals it outside the mask."""
    calls = []
    original = generator.pipe.__class__.__call__

    def spy(self, *a, **k):
        calls.append((k["image"].size, k["mask_image"].size, k["width"], k["height"]))
        return original(self, *a, **k)

    monkeypatch.setattr(generator.pipe.__class__, "__call__", spy)
    rng = np.random.default_rng(0)
    for (w, h), scaled, canvas in [((96, 48), (64, 32), (64, 32)), ((48, 80), (38, 64), (40, 64))]:
        calls.clear()
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        mask = np.zeros((h, w), bool)
        mask[h // 4 : h // 2, w // 4 : w // 2] = True
        result = generator(image, mask, seed=0)
        assert calls == [(canvas, canvas, *canvas)]
        assert abs(scaled[0] / scaled[1] - w / h) < 0.02  # the aspect kept to a pixel
        assert result.image.size == (w, h)
        assert np.array_equal(np.asarray(result.image)[~mask], np.asarray(image)[~mask])
    from defectfill.model.canvas import canvas_for

    assert canvas_for((800, 600), 512, 8).scaled == (512, 384) and canvas_for((800, 600), 512, 8).size == (512, 384)
    assert canvas_for((1000, 333), 512, 8).scaled == (512, 170) and canvas_for((1000, 333), 512, 8).size == (512, 176)
    assert canvas_for((512, 512), 512, 8).size == (512, 512)


def test_ddim_settings_and_guidance_are_applied(generator, run_dir, demo_root, monkeypatch):
    """Pins what generation runs: DDIM built from the base model's scheduler config, exactly `steps` UNet calls at
    DDIM's timesteps, the UNet batch [unconditional, conditional] under guidance, and the scheduler stepped with
    uncond + guidance * (cond - uncond). (The old test only checked the scheduler's type.)"""
    from diffusers import DDIMScheduler

    from defectfill.model.pipeline import load_pipeline
    from defectfill.outputs.run_folder import read_trained_run

    pipe = generator.pipe
    base = load_pipeline(read_trained_run(run_dir).model).scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert pipe.scheduler.config[key] == base[key], key
    unet_calls, steps_taken = [], []
    unet_forward, scheduler_step = pipe.unet.forward, pipe.scheduler.step

    def unet_spy(sample, t, *a, **k):
        out = unet_forward(sample, t, *a, **k)
        pred = out[0] if isinstance(out, tuple) else out.sample  # the pipeline asks for a tuple
        unet_calls.append((sample.shape[0], float(t), pred.detach().clone()))
        return out

    def step_spy(model_output, t, *a, **k):
        steps_taken.append(model_output.detach().clone())
        return scheduler_step(model_output, t, *a, **k)

    monkeypatch.setattr(pipe.unet, "forward", unet_spy)
    monkeypatch.setattr(pipe.scheduler, "step", step_spy)
    for guidance in (7.5, 3.0):
        unet_calls.clear()
        steps_taken.clear()
        monkeypatch.setattr(generator, "guidance", guidance)
        generator(_good(demo_root), _box_mask(), seed=4)
        assert len(unet_calls) == generator.steps == 2 and len(pipe.scheduler.timesteps) == 2
        assert [t for _, t, _ in unet_calls] == [float(t) for t in pipe.scheduler.timesteps]
        for (rows, _, out), taken in zip(unet_calls, steps_taken, strict=True):
            assert rows == 2 * generator.candidates
            uncond, cond = out.chunk(2)
            torch.testing.assert_close(taken, uncond + guidance * (cond - uncond))


def test_save_attention_keeps_a_running_mean_at_latent_size(run_dir, demo_root, monkeypatch):
    """Pins --save-attention's memory: the recorder holds one latent-size map per UNet row however many layers
    and steps run (before, it kept every (layer, step) map and resized each to the image)."""
    from defectfill.model.attention import AttentionRecorder

    held = []
    original = AttentionRecorder._record

    def measure(self, probs):
        original(self, probs)
        running = self._sum.numel() if getattr(self, "_sum", None) is not None else 0
        held.append(sum(m.numel() for m in self.maps) + running)

    monkeypatch.setattr(AttentionRecorder, "_record", measure)
    gen = DefectGenerator.from_run(run_dir, steps=3, candidates=2, scorer=FixedScorer([0.0, 1.0]),
                                   save_attention=True)
    result = gen(_good(demo_root), _box_mask(), seed=3)
    rows, latent = 2 * 2, 16 * 16  # [uncond 2, cond 2] rows, the 16x16 latent grid
    assert len(held) == 3 * 4  # 3 steps x 4 decoder cross-attention layers
    assert max(held) == rows * latent
    assert result.attention.shape == (64, 64) and result.attention.max() == pytest.approx(1, abs=0.05)


def test_feather_stays_inside_mask(demo_root):
    mask = _box_mask()
    alpha = feather_alpha(mask, 3)
    assert (alpha[~mask] == 0).all()
    assert alpha[25, 32] == 1.0 and 0 < alpha[20, 32] < 1  # centre full, edge ramps
    src = np.asarray(_good(demo_root))
    gen = np.full_like(src, 255)
    out = paste_back(gen, src, mask, feather=3)
    assert np.array_equal(out[~mask], src[~mask])
    assert (out[25, 32] == 255).all()


def test_empty_mask_is_refused(generator, demo_root):
    with pytest.raises(DefectFillError, match="empty"):
        generator(_good(demo_root), np.zeros((64, 64), bool), seed=0)


def test_new_token_run_loads_its_embedding(run_dir, tmp_path, demo_root):
    from safetensors.torch import save_file

    run = tmp_path / "run-new-token"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["new_token"] = "<scr>"
    (run / "config.json").write_text(json.dumps(config))
    row = torch.randn(32, generator=torch.Generator().manual_seed(0))
    save_file({"<scr>": row}, str(run / "learned_embeds.safetensors"))
    gen = DefectGenerator.from_run(run, steps=2, candidates=1)
    assert gen.prompt == "A disc with <scr>"
    token_id = gen.pipe.tokenizer.convert_tokens_to_ids("<scr>")
    assert torch.allclose(gen.pipe.text_encoder.get_input_embeddings().weight[token_id], row)
    assert gen(_good(demo_root), _box_mask(), seed=0).image.size == (64, 64)
    (run / "learned_embeds.safetensors").unlink()
    with pytest.raises(DefectFillError, match="learned_embeds"):
        DefectGenerator.from_run(run)


def test_token_weights_only_on_conditional_rows(generator):
    w = generator._token_weights(3)  # guidance 7.5: UNet batch [uncond 3, cond 3]
    assert w.shape == (6, 77)
    assert (w[:3] == 0).all() and torch.allclose(w[3:].sum(1), torch.ones(3))
    assert w[3, 4] == 1.0  # "<start> a disc with sks": the token is position 4
    generator.guidance = 1.0  # no classifier-free guidance: the UNet batch is the n conditional rows
    try:
        w = generator._token_weights(3)
    finally:
        generator.guidance = 7.5
    assert w.shape == (3, 77) and torch.allclose(w.sum(1), torch.ones(3)) and (w[:, 4] == 1).all()


def test_lpips_scorer_on_thin_boxes():
    from defectfill.model.lpips import load_lpips

    scorer = LPIPSScorer(load_lpips(pretrained_backbone=False))
    rng = np.random.default_rng(1)
    source = rng.integers(0, 255, (64, 200, 3), dtype=np.uint8)
    mask = np.zeros((64, 200), bool)
    mask[30, 10:190] = True  # a 1-pixel scratch
    changed = source.copy()
    changed[mask] = 255 - changed[mask]
    chosen, scores = select_low_fidelity(np.stack([source, changed]), source, mask, scorer)
    assert chosen == 1 and scores[0] == pytest.approx(0, abs=1e-6) and scores[1] > 0


def test_save_attention_map(run_dir, demo_root):
    gen = DefectGenerator.from_run(run_dir, steps=2, candidates=2, scorer=FixedScorer([0.0, 1.0]),
                                   save_attention=True)
    processors = dict(gen.pipe.unet.attn_processors)
    result = gen(_good(demo_root), _box_mask(), seed=3)
    assert result.attention is not None and result.attention.shape == (64, 64)
    assert 0 <= result.attention.min() and result.attention.max() == pytest.approx(1, abs=0.05)
    assert result.attention.std() > 0
    assert all(type(p) is type(processors[n]) for n, p in gen.pipe.unet.attn_processors.items())  # restored
    plain = DefectGenerator.from_run(run_dir, steps=2, candidates=2, scorer=FixedScorer([0.0, 1.0]))
    other = plain(_good(demo_root), _box_mask(), seed=3)
    assert other.attention is None
    diff = np.abs(np.asarray(result.image, dtype=int) - np.asarray(other.image, dtype=int))
    assert diff.max() <= 3  # recording does not change the samples (explicit softmax vs SDPA rounding only)


# --------------------------------------------------------------------------- Low-Fidelity Selection


def test_lfs_keeps_highest_fixed_score(generator, demo_root):
    result = generator(_good(demo_root), _box_mask(), seed=2)
    assert result.chosen == 1 and result.scores == pytest.approx([0.1, 0.9, 0.3])
    assert np.array_equal(np.asarray(result.image), np.asarray(result.candidates[1]))
    generator._scorer = FixedScorer([0.7, 0.2, 0.1])
    try:
        assert generator(_good(demo_root), _box_mask(), seed=2).chosen == 0
    finally:
        generator._scorer = FixedScorer([0.1, 0.9, 0.3])


def test_lfs_real_lpips_scores_inside_bbox_only():
    from defectfill.model.lpips import load_lpips

    scorer = LPIPSScorer(load_lpips(pretrained_backbone=False))
    rng = np.random.default_rng(0)
    source = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    mask = _box_mask()
    same = source.copy()
    outside_only = source.copy()
    outside_only[:10] = 0  # changes outside the mask's bounding box must not count
    noisy = source.copy()
    noisy[mask] = rng.integers(0, 255, (mask.sum(), 3), dtype=np.uint8)
    chosen, scores = select_low_fidelity(np.stack([same, outside_only, noisy]), source, mask, scorer)
    assert scores[0] == pytest.approx(0, abs=1e-6) and scores[1] == pytest.approx(0, abs=1e-6)
    assert scores[2] > 1e-3 and chosen == 2


def test_candidates_one_skips_lpips(run_dir, demo_root):
    scorer = FixedScorer([1.0])
    gen = DefectGenerator.from_run(run_dir, steps=2, candidates=1, scorer=scorer)
    result = gen(_good(demo_root), _box_mask(), seed=0)
    assert scorer.calls == 0 and result.scores is None and result.chosen == 0


# --------------------------------------------------------------------------- dataset writer


def test_manifest_rows_say_what_made_them_with_paths_relative_to_the_folder(run_dir, demo_root, tmp_path,
                                                                            random_lpips):
    """Each row: the base and the SHA-256 of its weight files, the LoRA file's, the version, a UTC time, device and
    precision; every path relative to the output folder. A manifest written before (absolute sources, no
    provenance) still reads."""
    import hashlib
    import os
    from datetime import datetime

    import defectfill
    from defectfill.model.names import LORA_WEIGHTS_NAME
    from defectfill.outputs.generated import OutputFolder
    from defectfill.outputs.run_folder import read_trained_run

    out = tmp_path / "synth"
    assert run_generate(_args(run_dir, out, "--count", "2")) == 0
    rows = _manifest(out)
    base = Path(read_trained_run(run_dir).model)
    digest = hashlib.sha256()
    for f in sorted(p for p in base.rglob("*.safetensors")):
        digest.update(f"{f.relative_to(base).as_posix()} {hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    goods = {p.resolve() for p in open_layout(demo_root).good_images("disc")}
    for r in rows:
        prov = r["provenance"]
        assert prov["defectfill_version"] == defectfill.__version__ and prov["base_model"] == str(base)
        assert prov["base_model_sha256"] == digest.hexdigest()
        assert prov["lora_sha256"] == hashlib.sha256((run_dir / LORA_WEIGHTS_NAME).read_bytes()).hexdigest()
        assert (prov["device"], prov["precision"]) == ("cpu", "no")
        assert datetime.fromisoformat(prov["created_utc"]).utcoffset().total_seconds() == 0
        for key in ("image", "mask", "source_image", "mask_source"):
            parts = Path(r[key]).parts
            inner = parts[next((i for i, x in enumerate(parts) if x != ".."), len(parts)):]
            assert not os.path.isabs(r[key]) and ".." not in inner, (key, r[key])  # relative and normalised
        assert row_file(out, r["source_image"]).resolve() in goods and row_file(out, r["mask_source"]).is_file()
    # an older manifest: absolute source paths, no provenance; its sources are still found and linked
    shutil.rmtree(out / "disc" / "train" / "good")
    old = [{k: v for k, v in r.items() if k != "provenance"} | {"source_image": str(row_file(out, r["source_image"]))}
           for r in rows]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in old))
    assert OutputFolder(out, "disc", "scratch", 2).link_good_images() == 2


def test_writer_mvtec_layout_manifest_preview(run_dir, demo_root, tmp_path, random_lpips):
    out = tmp_path / "synth"
    assert run_generate(_args(run_dir, out, "--count", "3", "--save-candidates", "--save-attention")) == 0
    rows = _manifest(out)
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert len(r["scores"]) == 2 and r["chosen"] == int(np.argmax(r["scores"]))
        assert r["settings"]["steps"] == 2 and r["mask_source"].endswith("_mask.png")
        assert r["prompt"] == "A disc with sks"
        saved, src = np.asarray(load_rgb(out / r["image"])), np.asarray(load_rgb(row_file(out, r["source_image"])))
        mask = load_mask(out / r["mask"])
        assert mask.any() and np.array_equal(saved[~mask], src[~mask])
    assert (out / "preview.png").is_file() and Image.open(out / "preview.png").size == (128 * 4, (128 + CAPTION_H) * 3)
    # the settings that ran, precision resolved (auto is full precision on a CPU)
    recorded = json.loads((out / "generate.json").read_text())["config"]
    assert recorded["mixed_precision"] == "no" and recorded["candidates"] == 2 and recorded["count"] == 3
    assert len(list((out / "candidates").rglob("*.png"))) == 6
    assert all(Image.open(out / r["attention"]).size == (64, 64) for r in rows)
    # read back by the project's own MVTec loader
    layout = open_layout(out, "mvtec")
    assert layout.name == "mvtec" and layout.defect_types("disc") == ["scratch"]
    samples = layout.defect_samples("disc", "scratch")
    assert len(samples) == 3 and all(check_sample(s) for s in samples)
    split = make_split(layout, "disc", "scratch")  # what `train --layout mvtec` does with it
    assert len(split.reference) == 1 and len(split.held_out) == 2
    held_out = {s["mask"] for s in json.loads((run_dir / "split.json").read_text())["held_out"]}
    assert all(any(r["mask_source"].endswith(h) for h in held_out) for r in rows)


def test_writer_shapes_on_foreground(run_dir, demo_root, tmp_path):
    out = tmp_path / "shapes"
    args = _args(run_dir, out, "--count", "5", "--masks", "shapes", "--mask-scale", "0.01,0.05", "--candidates", "1",
                 "--feather", "2")
    run_generate(args)
    rows = _manifest(out)
    assert sorted(r["mask_source"] for r in rows) == sorted(f"shape:{s}" for s in
                                                           ["ellipse", "square", "star", "line", "blob"])
    for r in rows:
        mask = load_mask(out / r["mask"])
        source = load_rgb(row_file(out, r["source_image"]))
        fg = estimate_foreground(source)
        assert mask.any() and not (mask & ~fg).any() and 0.01 <= mask.mean() <= 0.05
        saved = np.asarray(load_rgb(out / r["image"]))
        assert np.array_equal(saved[~mask], np.asarray(source)[~mask])  # feathered, still exact outside


def test_killed_run_resumes_to_exact_count(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    args = _args(run_dir, out, "--count", "5", "--candidates", "1")
    run_generate(args, stop_after=2)
    assert [r["index"] for r in _manifest(out)] == [0, 1]
    # a kill between writing an image and its manifest row, and a torn last manifest line
    stray = out / "disc" / "test" / "scratch" / "002.png"
    with open(out / ".writing.part0.jsonl", "a") as fh:  # the item's files are journalled before they are written
        fh.write(json.dumps({"files": ["disc/test/scratch/002.png", "disc/ground_truth/scratch/002_mask.png"]}) + "\n")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(stray)
    with open(out / MANIFEST, "a") as fh:
        fh.write('{"index": 4, "ima')
    first = {r["index"]: r for r in _manifest_lines(out)}
    generated = []
    original = DefectGenerator.__call__

    def spy(self, image, mask, seed=0):
        generated.append(seed)
        return original(self, image, mask, seed)

    monkeypatch.setattr(DefectGenerator, "__call__", spy)
    run_generate(_args(run_dir, out, "--count", "5", "--candidates", "1"))
    rows = _manifest(out)
    assert len(generated) == 3 and set(generated) == {r["seed"] for r in rows[2:]}  # only the unfinished items
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == first[0] and rows[1] == first[1]  # finished items were kept, not redone
    assert np.asarray(load_rgb(stray)).reshape(-1, 3).tolist().count([255, 0, 0]) < 64 * 64  # redone
    assert len(list((out / "disc" / "test" / "scratch").glob("*.png"))) == 5
    assert len(list((out / "disc" / "ground_truth" / "scratch").glob("*.png"))) == 5
    assert not list(out.rglob("*.tmp*"))
    # same arguments again: nothing to do, nothing duplicated
    run_generate(_args(run_dir, out, "--count", "5", "--candidates", "1"))
    assert [r["index"] for r in _manifest(out)] == [0, 1, 2, 3, 4] and len(generated) == 3
    # a larger --count (4-digit names from 1000 on) keeps the finished items and adds the rest
    monkeypatch.setattr("defectfill.outputs.generated.OutputFolder.image_path",
                        lambda self, i: self.root / self.category / "test" / self.defect_type / f"{i:04d}.png")
    run_generate(_args(run_dir, out, "--count", "6", "--candidates", "1"))
    assert [r["index"] for r in _manifest(out)] == [0, 1, 2, 3, 4, 5] and len(generated) == 4


def _manifest_lines(out):
    rows = []
    for line in (out / MANIFEST).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def test_rerun_reproduces_an_image(run_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_generate(_args(run_dir, a, "--count", "2", "--candidates", "1"))
    run_generate(_args(run_dir, b, "--count", "2", "--candidates", "1"))
    for name in ("000.png", "001.png"):
        assert np.array_equal(np.asarray(Image.open(a / "disc/test/scratch" / name)),
                              np.asarray(Image.open(b / "disc/test/scratch" / name)))


def test_two_ranks_split_without_overlap(run_dir, tmp_path):
    out = tmp_path / "ranks"
    one = _args(run_dir, out, "--count", "5", "--candidates", "1")
    run_generate(one, rank=1, world_size=2)
    assert [r["index"] for r in _manifest(out)] == [1, 3]
    zero = _args(run_dir, out, "--count", "5", "--candidates", "1")
    run_generate(zero, rank=0, world_size=2)
    rows = _manifest(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert not list(out.glob("manifest.part*"))
    seeds = [r["seed"] for r in rows]
    assert len(set(seeds)) == 5


def test_plan_items_pairs_vary_and_are_deterministic(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(2)]
    items = plan_items(6, images, ["m0", "m1"], seed=0)
    assert {(it.image.name, it.mask_source) for it in items} == {(i.name, m) for i in images for m in ["m0", "m1"]}
    assert [it.seed for it in items] == [it.seed for it in plan_items(6, images, ["m0", "m1"], seed=0)]


# --------------------------------------------------------------------------- bad input


def test_refuses_other_runs_output_unless_told(run_dir, tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "out"
    run_generate(_args(run_dir, out, "--count", "1", "--candidates", "1"))
    other = write_run(tmp_path / "other", tiny_model_dir, demo_root, seed=1)
    with pytest.raises(DefectFillError, match="another run.*--resume.*--overwrite"):
        run_generate(_args(other, out, "--count", "2", "--candidates", "1"))
    assert [r["index"] for r in _manifest(out)] == [0]  # nothing written was lost
    with pytest.raises(DefectFillError, match="other settings"):
        run_generate(_args(run_dir, out, "--count", "1", "--candidates", "1", "--seed", "3"))
    run_generate(_args(other, out, "--count", "2", "--candidates", "1", "--overwrite"))
    rows = _manifest(out)
    assert [r["index"] for r in rows] == [0, 1]
    state = json.loads((out / "generate.json").read_text())
    assert state["run"] == str(other.resolve())


def test_refuses_foreign_nonempty_folder(run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DefectFillError, match="not empty"):
        run_generate(_args(run_dir, out, "--count", "1", "--candidates", "1"))
    assert (out / "thesis.tex").read_text() == "precious"


def test_run_folder_problems(run_dir, tmp_path):
    with pytest.raises(DefectFillError, match="not found"):
        run_generate(_args(tmp_path / "nope", tmp_path / "o", "--count", "1"))
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(DefectFillError, match="pytorch_lora_weights"):
        run_generate(_args(broken, tmp_path / "o", "--count", "1"))
    (broken / "config.json").unlink()
    with pytest.raises(DefectFillError, match="config.json"):
        run_generate(_args(broken, tmp_path / "o", "--count", "1"))


@pytest.mark.parametrize("flag", [("--candidates", "0"), ("--steps", "0"), ("--feather", "-1"), ("--batch-size", "0")])
def test_bad_settings_fail_before_writing(run_dir, tmp_path, flag):
    out = tmp_path / "o"
    with pytest.raises(DefectFillError, match=flag[0]):
        run_generate(_args(run_dir, out, "--count", "1", *flag))
    assert not out.exists()


@pytest.mark.parametrize("count", ["0", "-3"])
def test_bad_count(run_dir, tmp_path, count):
    with pytest.raises(DefectFillError, match="--count"):
        run_generate(_args(run_dir, tmp_path / "o", "--count", count))


def test_images_that_are_not_images(run_dir, tmp_path, monkeypatch):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "0.png")
    (images / "a.png").write_bytes(b"not a png")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(DefectGenerator, "from_run", no_model)
    with pytest.raises(DefectFillError, match="a.png.*cannot read"):
        run_generate(_args(run_dir, tmp_path / "o", "--count", "1", "--candidates", "1", "--images", str(images)))
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DefectFillError, match="no defect-free images"):
        run_generate(_args(run_dir, tmp_path / "o", "--count", "1", "--images", str(empty)))


def test_mask_folder_problems(run_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(DefectFillError, match="no mask images"):
        run_generate(_args(run_dir, tmp_path / "o", "--count", "1", "--masks", str(masks)))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / "a.png")
    with pytest.raises(DefectFillError, match="every mask is empty"):
        run_generate(_args(run_dir, tmp_path / "o", "--count", "1", "--masks", str(masks)))


def test_user_masks_resized_to_each_image(run_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((32, 32), np.uint8)
    m[8:16, 10:20] = 255
    Image.fromarray(m).save(masks / "m.png")
    out = tmp_path / "o"
    run_generate(_args(run_dir, out, "--count", "1", "--candidates", "1", "--masks", str(masks)))
    saved = load_mask(out / "disc/ground_truth/scratch/000_mask.png")
    assert saved.shape == (64, 64) and saved.sum() == 4 * 80


def test_moved_dataset_is_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["data"] = str(tmp_path / "gone")  # every recorded path of the data is stale: it has moved away
    config["data_paths"] = {"absolute": str(tmp_path / "gone"), "from_run": "../gone"}
    (run / "config.json").write_text(json.dumps(config))
    split = json.loads((run / "split.json").read_text())
    split["data_root"] = str(tmp_path / "gone")
    split["data_root_from_split"] = "../gone"
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(DefectFillError, match="data folder.*--images"):
        run_generate(_args(run, tmp_path / "o", "--count", "1"))
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(images / "0.png")
    with pytest.raises(DefectFillError, match="held-out mask not found.*--masks shapes"):
        run_generate(_args(run, tmp_path / "o", "--count", "1", "--images", str(images)))


def test_empty_held_out_suggests_shapes(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    split = json.loads((run / "split.json").read_text())
    split["held_out"] = []
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(DefectFillError, match="held-out set is empty.*--masks shapes"):
        run_generate(_args(run, tmp_path / "o", "--count", "1"))


def test_lpips_download_failure_names_the_way_out(run_dir, tmp_path, monkeypatch):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    out = tmp_path / "o"
    with pytest.raises(DefectFillError, match="--lpips-weights.*--candidates 1"):
        run_generate(_args(run_dir, out, "--count", "1"))
    assert not (out / "disc").exists()  # failed before sampling anything
    run_generate(_args(run_dir, out, "--count", "1", "--candidates", "1"))  # the way out works
    assert len(_manifest(out)) == 1


def test_cli_generate_prints_error_without_traceback(run_dir, tmp_path, capsys):
    from defectfill.cli import main

    code = main(["generate", "--run", str(run_dir), "--output", str(tmp_path / "o"), "--count", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--count" in err and "Traceback" not in err
    code = main(["generate", "--run", str(run_dir), "--output", str(tmp_path / "o"), "--count", "1",
                 "--steps", "2", "--candidates", "1"])
    assert code == 0 and (tmp_path / "o" / "disc" / "test" / "scratch" / "000.png").is_file()


def test_two_real_processes_under_torchrun(run_dir, tmp_path):
    """accelerate's CPU multi-process (gloo) under torchrun: disjoint items, one merged manifest."""
    import os
    import subprocess
    import sys

    out = tmp_path / "mp"
    script = tmp_path / "entry.py"
    # arguments travel in the environment: torchrun's own parser would take --run as its --run-path
    script.write_text("import os, shlex, sys\nfrom defectfill.cli import main\n"
                      "sys.exit(main(shlex.split(os.environ['GEN_ARGS'])))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "GEN_ARGS": f"generate --run {run_dir} --output {out} --count 5 --steps 2 --candidates 1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "process 0 of 2: 3 item(s)" in proc.stderr and "process 1 of 2: 2 item(s)" in proc.stderr
    assert [r["index"] for r in _manifest(out)] == [0, 1, 2, 3, 4]
    assert not list(out.glob("manifest.part*"))
    assert len(list((out / "disc" / "test" / "scratch").glob("*.png"))) == 5
