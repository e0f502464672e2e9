"""The fast generation paths give what the slow ones give for the same seeds: several images' candidates in one
UNet call against one image per call, paste-back and LPIPS on tensors against the numpy path, PNG writes on a
writer thread against writes on the sampling thread, and the multistep solvers."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from helpers import write_run
from PIL import Image

from defectfill.config.stages import GenerateConfig
from defectfill.core.errors import DefectFillError
from defectfill.data import load_rgb
from defectfill.generate.generator import (
    DefectGenerator,
    LPIPSScorer,
    feather_alpha,
    paste_back,
    paste_back_tensor,
    select_low_fidelity,
)
from defectfill.generate.writer import BackgroundWriter, run_generate
from defectfill.outputs.generated import MANIFEST


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("run") / "disc-scratch", tiny_model_dir, demo_root)


@pytest.fixture(scope="module")
def lpips_scorer():
    from defectfill.model.lpips import load_lpips

    return LPIPSScorer(load_lpips(pretrained_backbone=False))


@pytest.fixture(scope="module")
def generator(run_dir, lpips_scorer):
    return DefectGenerator.from_run(run_dir, steps=3, candidates=3, scorer=lpips_scorer)


def _requests(demo_root):
    """Three (image, mask, seed) of one size, each with its own mask."""
    out = []
    for i, (y, x) in enumerate([(20, 24), (8, 30), (36, 10)]):
        mask = np.zeros((64, 64), bool)
        mask[y : y + 10 + 2 * i, x : x + 14] = True
        out.append((load_rgb(demo_root / "disc" / "train" / "good" / f"{i:03d}.png"), mask, 100 + i))
    return out


class _UNetInputs:
    """Records every UNet call's latent input (the 9 channels: noisy latents, mask, masked-image latents)."""

    def __init__(self, unet):
        self.calls: list[torch.Tensor] = []
        self._hook = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append((args[0] if args else kwargs["sample"]).detach().clone())

    def remove(self):
        self._hook.remove()


def test_images_in_one_call_equal_each_image_in_its_own_call(generator, demo_root):
    """3 images x 3 candidates in one pipeline call of 9 rows: each row's UNet input at every step (noise, mask,
    masked-image latents) is the row of its image's own call, and the images, seeds and LFS choices match."""
    requests = _requests(demo_root)
    rec = _UNetInputs(generator.pipe.unet)
    try:
        alone = [generator(*r) for r in requests]
        per_image_calls = list(rec.calls)
        rec.calls.clear()
        together = generator.generate_many(requests, images_per_call=3)
        batched_calls = list(rec.calls)
    finally:
        rec.remove()
    steps = generator.steps
    assert len(per_image_calls) == 3 * steps and len(batched_calls) == steps  # one call per step for all 9 rows
    for s in range(steps):
        batched = batched_calls[s]  # (2 * 9, 9, h, w): [unconditional 9 rows, conditional 9 rows]
        assert batched.shape[0] == 18
        for j in range(3):
            own = per_image_calls[j * steps + s]  # (2 * 3, ...)
            for half in (0, 1):
                got = batched[half * 9 + 3 * j : half * 9 + 3 * j + 3]
                want = own[half * 3 : half * 3 + 3]
                # the first step's input is exact (noise and conditioning); later ones carry the UNet's float noise
                tol = 0 if s == 0 else 1e-4
                assert torch.allclose(got, want, atol=tol, rtol=0), (s, j, half, (got - want).abs().max())
    for a, b in zip(alone, together, strict=True):
        assert a.seeds == b.seeds and a.chosen == b.chosen
        assert np.allclose(a.scores, b.scores, atol=1e-4)
        for x, y in zip(a.candidates, b.candidates, strict=True):
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
        assert np.array_equal(a.mask, b.mask)


def test_one_image_per_call_is_todays_path_bit_for_bit(generator, demo_root, monkeypatch):
    """generate_many with one image per call makes the calls `gen(image, mask, seed)` makes: the same images."""
    requests = _requests(demo_root)[:2]
    calls = []
    original = generator.pipe.__class__.__call__

    def spy(self, *a, **k):
        calls.append((type(k["image"]).__name__, k["num_images_per_prompt"]))
        return original(self, *a, **k)

    monkeypatch.setattr(generator.pipe.__class__, "__call__", spy)
    many = generator.generate_many(requests, images_per_call=1)
    single = [generator(*r) for r in requests]
    assert calls == [("Image", 3)] * 4
    for a, b in zip(many, single, strict=True):
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.candidates, b.candidates, strict=True))


def test_images_of_other_canvas_sizes_go_in_their_own_calls(generator, demo_root, monkeypatch):
    requests = _requests(demo_root)
    wide = Image.fromarray(np.asarray(requests[1][0])[:32])  # 64x32: another canvas
    mask = np.zeros((32, 64), bool)
    mask[8:20, 10:30] = True
    requests[1] = (wide, mask, 7)
    sizes = []
    original = generator.pipe.__class__.__call__

    def spy(self, *a, **k):
        sizes.append((k["width"], k["height"], k["num_images_per_prompt"]))
        return original(self, *a, **k)

    monkeypatch.setattr(generator.pipe.__class__, "__call__", spy)
    results = generator.generate_many(requests, images_per_call=4)
    assert sorted(sizes) == [(64, 32, 3), (64, 64, 6)]
    assert results[1].image.size == (64, 32) and results[0].image.size == results[2].image.size == (64, 64)
    alone = generator(*requests[1])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(alone.candidates, results[1].candidates,
                                                                                strict=True))


def test_candidate_chunks_with_several_images(generator, demo_root, monkeypatch):
    """--batch-size 2 of 3 candidates with 2 images per call: calls of 2 x 2 and 2 x 1 rows, the same images."""
    requests = _requests(demo_root)[:2]
    monkeypatch.setattr(generator, "batch_size", 2)
    alone = [generator(*r) for r in requests]
    together = generator.generate_many(requests, images_per_call=2)
    for a, b in zip(alone, together, strict=True):
        assert a.seeds == b.seeds
        for x, y in zip(a.candidates, b.candidates, strict=True):
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1


@pytest.mark.parametrize("feather", [0, 3])
def test_paste_back_on_tensors_gives_the_numpy_bytes(feather):
    rng = np.random.default_rng(feather)
    gen = rng.integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)
    src = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    mask = np.zeros((40, 56), bool)
    mask[5:30, 10:50] = True
    want = paste_back(gen, src, mask, feather)
    got = paste_back_tensor(torch.from_numpy(gen), torch.from_numpy(src), torch.from_numpy(mask),
                            torch.from_numpy(feather_alpha(mask, feather))).numpy()
    assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_lpips_pairs_of_several_images_score_as_each_image_alone(lpips_scorer):
    """One LPIPS call on the crops of two images (each against its own source) gives each image's own scores."""
    rng = np.random.default_rng(1)
    scores = []
    crops, sources = [], []
    for _ in range(2):
        source = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        cands = np.stack([np.clip(source.astype(int) + rng.integers(-40, 40, source.shape), 0, 255).astype(np.uint8)
                          for _ in range(3)])
        mask = np.zeros((48, 48), bool)
        mask[10:30, 12:40] = True
        scores.append(select_low_fidelity(cands, source, mask, lpips_scorer)[1])
        crop = torch.from_numpy(cands[:, 10:30, 12:40]).float().div(127.5).sub(1).permute(0, 3, 1, 2)
        ref = torch.from_numpy(source[None, 10:30, 12:40]).float().div(127.5).sub(1).permute(0, 3, 1, 2)
        crops.append(crop)
        sources.append(ref.expand_as(crop))
    together = lpips_scorer.score_pairs(torch.cat(crops), torch.cat(sources))
    assert np.allclose(together.numpy(), np.array(scores).reshape(-1), atol=1e-5)


def _args(run, out, *extra):
    parser = argparse.ArgumentParser()
    GenerateConfig.add_arguments(parser)
    args = parser.parse_args(["--run", str(run), "--output", str(out), "--steps", "2", "--candidates", "2",
                              "--lpips-random-backbone", "--masks", "shapes", *extra])
    return GenerateConfig.from_args(args)


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _rows(out):
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("settings", "provenance")} for r in rows]  # who and when, not what was drawn


def test_writes_on_the_writer_thread_give_the_same_files(run_dir, tmp_path):
    sync, threaded = tmp_path / "sync", tmp_path / "threaded"
    run_generate(_args(run_dir, sync, "--count", "3", "--no-background-writes", "--save-candidates"))
    run_generate(_args(run_dir, threaded, "--count", "3", "--save-candidates"))
    files = _files(sync)
    assert len(files) >= 3 * 4 and files == _files(threaded)  # byte-equal: images, masks, candidates, previews
    assert _rows(sync) == _rows(threaded)


def test_batch_images_in_the_writer_keeps_seeds_and_images(run_dir, tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    run_generate(_args(run_dir, one, "--count", "4"))
    run_generate(_args(run_dir, three, "--count", "4", "--batch-images", "3"))
    a, b = _rows(one), _rows(three)
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    assert [r["candidate_seeds"] for r in a] == [r["candidate_seeds"] for r in b]
    assert [r["chosen"] for r in a] == [r["chosen"] for r in b]
    for name in ("disc/test/scratch/000.png", "disc/test/scratch/003.png"):
        x = np.asarray(Image.open(one / name), dtype=int)
        y = np.asarray(Image.open(three / name), dtype=int)
        assert np.abs(x - y).max() <= 1


def test_a_failed_background_write_is_raised_and_the_run_resumes(run_dir, tmp_path, monkeypatch):
    import defectfill.generate.writer as writer

    out = tmp_path / "fails"
    real = writer.write_item
    seen = []

    def failing(out_, item, *a, **k):
        seen.append(item.index)
        if item.index == 1:
            raise DefectFillError(f"{out_.root}: disk full (simulated)")
        return real(out_, item, *a, **k)

    monkeypatch.setattr(writer, "write_item", failing)
    with pytest.raises(DefectFillError, match="disk full"):
        run_generate(_args(run_dir, out, "--count", "4"))
    assert 2 not in seen and 3 not in seen  # nothing written after the failure
    from defectfill.outputs.generated import OutputFolder

    assert sorted(OutputFolder(out, "disc", "scratch", 4).finished()) == [0]  # the item before it is kept
    monkeypatch.setattr(writer, "write_item", real)
    run_generate(_args(run_dir, out, "--count", "4", "--resume"))
    assert [r["index"] for r in _rows(out)] == [0, 1, 2, 3]
    assert not list(out.rglob("*.tmp*"))


def test_background_writer_orders_and_surfaces():
    done = []
    with BackgroundWriter() as w:
        for i in range(5):
            w.submit(done.append, i)
    assert done == [0, 1, 2, 3, 4]
    w = BackgroundWriter()
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.close()


@pytest.mark.parametrize("name,cls", [("dpm++", "DPMSolverMultistepScheduler"), ("unipc", "UniPCMultistepScheduler")])
def test_multistep_solvers_from_the_base_config(run_dir, demo_root, name, cls):
    """--scheduler dpm++ / unipc: that solver, built from the base's scheduler config (its v-prediction and betas
    kept), runs `steps` UNet calls and paints inside the mask only."""
    gen = DefectGenerator.from_run(run_dir, steps=4, candidates=1, scheduler=name)
    base = DefectGenerator.from_run(run_dir, steps=4, candidates=1).pipe.scheduler.config  # DDIM, the default
    assert type(gen.pipe.scheduler).__name__ == cls
    for key in ("prediction_type", "beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert gen.pipe.scheduler.config[key] == base[key], key
    rec = _UNetInputs(gen.pipe.unet)
    try:
        image, mask, seed = _requests(demo_root)[0]
        result = gen(image, mask, seed)
    finally:
        rec.remove()
    assert len(rec.calls) == 4
    src = np.asarray(image)
    assert np.array_equal(np.asarray(result.image)[~mask], src[~mask])
    assert (np.asarray(result.image)[mask] != src[mask]).any()


# --------------------------------------------------------------------------- the protocol estimate


def test_protocol_estimate_from_the_h200_figures():
    """MVTec AD's 73 types, 2000 steps of batch 4 and 1000 images of 8 candidates x 50 DDIM steps each, at 512 px
    on CUDA with SD2: 73 x (2000 x 0.390 s + 1000 x 3.51 s) = 3.6 days, from the issue's H200 figures."""
    from defectfill.run.figures import protocol_estimate

    text = protocol_estimate("cuda:0", "sd2", 73, 73 * 2000, 4, 512, 73, 73 * 1000, 8, 50)
    assert "146000 steps x 0.39 s = 15.8 h" in text and "73000 images x 3.51 s = 71.2 h" in text, text
    assert "in all 3.6 days" in text and "H200" in text and "2026-11-29" in text
    # half the sampling steps halve the UNet's share only; batch 8 doubles the step
    fewer = protocol_estimate("cuda", "sd2", 1, 2000, 8, 512, 1, 1000, 8, 25)
    assert "2000 steps x 0.78 s" in fewer and f"1000 images x {0.50 + 3.01 / 2:.3g} s" in fewer, fewer
    assert "no figure for this device" in protocol_estimate("mps", "sd2", 1, 10, 4, 512, 1, 10, 8, 50)
    assert "no figure for this device" in protocol_estimate("cuda", None, 1, 10, 4, 512, 1, 10, 8, 50)


def test_base_architecture_is_read_from_the_unet_config(tiny_model_dir, tmp_path):
    from defectfill.run.figures import base_architecture

    assert base_architecture("defectfill-mini") == "mini"
    assert base_architecture(str(tiny_model_dir)) == "tiny"
    assert base_architecture(str(tmp_path / "nothing-here")) is None
    assert base_architecture("stabilityai/stable-diffusion-2-inpainting") == "sd2"  # not cached: by its name


def test_dry_run_prints_the_protocol_estimate(demo_root, tmp_path, capsys):
    from defectfill.cli import main
    from defectfill.run.figures import FIGURES

    code = main(["run", "--data", str(demo_root), "--categories", "all", "--output", str(tmp_path / "work"),
                 "--steps", "30", "--count", "10", "--dry-run", "--device", "cpu",
                 "--model", "defectfill-mini", "--no-kid", "--no-ic-lpips", "--lpips-random-backbone"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("protocol estimate (cpu, base mini)"))
    if any(f.device == "cpu" and f.base == "mini" for f in FIGURES):
        assert "3 training(s), 90 steps x" in line and "3 type(s), 30 images x" in line, line
    else:
        assert "no figure for this device" in line


def test_several_images_per_call_with_the_base_unconditional_and_attention_maps(run_dir, demo_root, lpips_scorer):
    """unconditional='base' (LoRA on the conditional rows only) and save_attention with 2 images per call: each
    image's candidates and its chosen candidate's token map equal its own call's."""
    gen = DefectGenerator.from_run(run_dir, steps=2, candidates=2, scorer=lpips_scorer, unconditional="base",
                                   guidance=3.0, save_attention=True)
    requests = _requests(demo_root)[:2]
    alone = [gen(*r) for r in requests]
    together = gen.generate_many(requests, images_per_call=2)
    for a, b in zip(alone, together, strict=True):
        assert a.chosen == b.chosen and a.seeds == b.seeds
        for x, y in zip(a.candidates, b.candidates, strict=True):
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
        assert a.attention is not None and np.abs(a.attention - b.attention).max() < 1e-4
    assert np.abs(alone[0].attention - alone[1].attention).max() > 1e-3  # the maps are each image's own
