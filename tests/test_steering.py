"""Latent blending and several defects painted in one pass (generate/steering.py), on the tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_quick_generate, tiny_config, write_run

from defectfill.core.errors import DefectFillError
from defectfill.data import load_rgb
from defectfill.generate.generator import DefectGenerator
from defectfill.generate.steering import (
    STEER_OUTSIDE,
    latent_blend_kwargs,
    paint_jointly,
    steered_cross_attention,
)
from defectfill.model.attention import ExplicitAttnProcessor
from defectfill.model.canvas import prepare_canvas
from defectfill.model.pipeline import token_positions, vae_scale_factor
from defectfill.outputs.generated import row_file


class _Scores:
    def __call__(self, candidates, source):
        return torch.arange(len(candidates), dtype=torch.float32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("run") / "disc-scratch", tiny_model_dir, demo_root)


def _disc_and_mask(demo_root):
    image = load_rgb(sorted((demo_root / "disc" / "train" / "good").glob("*.png"))[0])
    mask = np.zeros((image.size[1], image.size[0]), bool)
    mask[20:40, 16:36] = True
    return image, mask


def test_latent_blend_keeps_the_source_outside_the_mask(run_dir, demo_root):
    """With the blending callback, the final latents outside the pipeline's latent mask are exactly the source's
    clean latents and differ from them inside; without it, they differ outside too."""
    gen = DefectGenerator.from_run(run_dir, steps=3, candidates=2)
    pipe = gen.pipe
    image, mask = _disc_and_mask(demo_root)
    canvas, image_c, mask_c = prepare_canvas(image, mask, gen.resolution, vae_scale_factor(pipe.vae))
    (cw, ch) = canvas.size

    def final(blend: bool):
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        extra = latent_blend_kwargs(pipe, image_c, generators, ch, cw) if blend else {}
        clean = extra["callback_on_step_end"].clean if blend else None
        latents = pipe(image=image_c, mask_image=mask_c, height=ch, width=cw, num_images_per_prompt=2,
                       generator=generators, num_inference_steps=3, guidance_scale=gen.guidance,
                       prompt=gen.prompt, output_type="latent", **extra).images
        return latents, clean

    blended, clean = final(True)
    plain, _ = final(False)
    f = vae_scale_factor(pipe.vae)
    inside = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(mask_c.convert("L"), dtype=np.float32)[None, None] / 255.0),
        size=(ch // f, cw // f))[0, 0] >= 0.5  # the pipeline's own latent mask (nearest resize, as it makes it)
    assert inside.any() and (~inside).any()
    assert torch.equal(blended[:, :, ~inside], clean[:, :, ~inside])
    assert not torch.allclose(blended[:, :, inside], clean[:, :, inside], atol=1e-3)
    assert not torch.allclose(plain[:, :, ~inside], clean[:, :, ~inside], atol=1e-3)


def test_latent_blend_is_off_by_default_and_changes_the_defect_when_on(run_dir, demo_root, monkeypatch):
    """Off (the default): the pipeline gets no step callback, so the images are today's; on: the same seeds give
    other pixels inside the mask, and the source outside it (paste-back)."""
    gen = DefectGenerator.from_run(run_dir, steps=3, candidates=2, scorer=_Scores())
    assert gen.latent_blend is False
    image, mask = _disc_and_mask(demo_root)
    seen = []
    real = type(gen.pipe).__call__

    def spy(self, *args, **kwargs):
        seen.append(set(kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(gen.pipe), "__call__", spy)
    off = np.asarray(gen(image, mask, seed=3).image)
    assert seen and not any("callback_on_step_end" in keys for keys in seen)
    gen.latent_blend = True
    on = np.asarray(gen(image, mask, seed=3).image)
    assert "callback_on_step_end" in seen[-1]
    source = np.asarray(image)
    assert np.array_equal(on[~mask], source[~mask])
    assert not np.array_equal(on[mask], off[mask])


def _probe(unet, columns, masks, rows):
    """One UNet call with every cross-attention layer steered, each layer's probabilities recorded."""
    recorded = []
    original = dict(unet.attn_processors)
    unet.set_attn_processor({n: ExplicitAttnProcessor(recorded.append) if ".attn2." in n else p
                             for n, p in original.items()})
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2 * rows, 9, 16, 16, generator=gen)
    text = torch.randn(2 * rows, 77, unet.config.cross_attention_dim, generator=gen)
    try:
        with torch.no_grad(), steered_cross_attention(unet, columns, masks, rows):
            unet(sample, torch.tensor([500] * (2 * rows)), encoder_hidden_states=text)
    finally:
        unet.set_attn_processor(dict(original))
    return recorded


def test_each_token_attends_only_inside_its_own_mask(tiny_model_dir):
    """Steering: at every cross-attention layer (encoder, middle, decoder) each token's probabilities are 0
    outside its own mask on the conditional rows; inside they are what they were (up to the softmax's
    renormalisation, which raises them); the unconditional rows are untouched."""
    from defectfill.model.pipeline import load_pipeline

    unet = load_pipeline(str(tiny_model_dir)).unet
    masks = torch.zeros(2, 16, 16)
    masks[0, :8, :8] = 1  # token A: the top-left quarter
    masks[1, 8:, 8:] = 1  # token B: the bottom-right quarter
    columns = [[5], [8, 9]]
    steered = _probe(unet, columns, masks, rows=1)
    plain = _probe(unet, [], masks, rows=1)
    n_cross = sum(".attn2." in n for n in unet.attn_processors)
    assert len(steered) == n_cross and {p.shape[2] for p in steered} == {256, 64, 16}  # every grid
    for probs, before in zip(steered, plain, strict=True):  # (2 rows, heads, Nq, 77)
        side = int(probs.shape[2] ** 0.5)
        cells = torch.nn.functional.adaptive_max_pool2d(masks[:, None], (side, side))[:, 0].flatten(1) > 0
        for k, cols in enumerate(columns):
            outside = probs[1][:, ~cells[k]][..., cols]
            assert float(outside.max()) < 1e-6, "a token attends outside its own mask"
            inside, inside_before = probs[1][:, cells[k]][..., cols], before[1][:, cells[k]][..., cols]
            assert bool((inside >= inside_before - 1e-7).all()) and float(inside.min()) > 0
        torch.testing.assert_close(probs[0], before[0])  # the unconditional row is untouched
    assert STEER_OUTSIDE < -1e3


@pytest.fixture(scope="module")
def object_run(tmp_path_factory, demo_root, tiny_model_dir):
    from defectfill.model.pipeline import load_pipeline
    from defectfill.train.trainer import train

    out = tmp_path_factory.mktemp("object") / "disc"
    return train(tiny_config(demo_root, out, tiny_model_dir, defect_type="all", steps=2, warmup_steps=0,
                             lr_unet=5e-2, lr_text=5e-2), pipe=load_pipeline(str(tiny_model_dir)))


def test_two_defects_in_one_pass_from_an_object_run(object_run, demo_root, monkeypatch):
    """Joint painting: one pipeline call with "A disc with <scratch> and <spot>", both tokens steered (each to
    its own mask), the union inpainted, the source kept outside it; steering changes what is painted."""
    gen = DefectGenerator.from_run(object_run, steps=2, candidates=2, scorer=_Scores(), defect_type="scratch")
    image, _ = _disc_and_mask(demo_root)
    a = np.zeros((64, 64), bool)
    a[8:20, 8:30] = True
    b = np.zeros((64, 64), bool)
    b[40:56, 36:52] = True
    calls = []
    real = type(gen.pipe).__call__

    def spy(self, *args, **kwargs):
        steered = [p for n, p in self.unet.attn_processors.items() if ".attn2." in n]
        calls.append((kwargs.get("prompt"), steered))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(gen.pipe), "__call__", spy)
    result, prompt = paint_jointly(gen, image, [a, b], ["scratch", "spot"], seed=1)
    assert prompt == "A disc with <scratch> and <spot>" and len(calls) == 1 and calls[0][0] == prompt
    steering = calls[0][1]
    assert steering and all(type(p).__name__ == "SteeredCrossAttention" for p in steering)
    assert steering[0].columns == [token_positions(gen.pipe.tokenizer, prompt, t) for t in ("<scratch>", "<spot>")]
    out, source = np.asarray(result.image), np.asarray(image)
    union = a | b
    assert np.array_equal(result.mask, union) and np.array_equal(out[~union], source[~union])
    assert (out[a] != source[a]).any() and (out[b] != source[b]).any()
    assert result.chosen == 1 and len(result.candidates) == 2
    # the processors are put back, and the same call without steering paints other pixels
    assert not any(type(p).__name__ == "SteeredCrossAttention" for p in gen.pipe.unet.attn_processors.values())
    monkeypatch.setattr("defectfill.generate.steering.STEER_OUTSIDE", 0.0)
    unsteered, _ = paint_jointly(gen, image, [a, b], ["scratch", "spot"], seed=1)
    assert not np.array_equal(np.asarray(unsteered.image), out)


def test_joint_painting_refuses_what_it_cannot_do(object_run, run_dir, demo_root):
    gen = DefectGenerator.from_run(object_run, steps=1, candidates=1, defect_type="scratch")
    image, mask = _disc_and_mask(demo_root)
    with pytest.raises(DefectFillError, match="one model per object"):
        paint_jointly(gen, image, [mask, mask], ["scratch", "hole"])
    with pytest.raises(DefectFillError, match="two or more"):
        paint_jointly(gen, image, [mask], ["scratch"])
    with pytest.raises(DefectFillError, match="empty"):
        paint_jointly(gen, image, [mask, np.zeros_like(mask)], ["scratch", "spot"])
    single = DefectGenerator.from_run(run_dir, steps=1, candidates=1)
    with pytest.raises(DefectFillError, match="one model per object"):
        paint_jointly(single, image, [mask, mask], ["scratch", "spot"])


def test_generate_multi_defect_joint_writes_one_pass_per_image(object_run, tmp_path, monkeypatch):
    """`generate --defect-types scratch,spot --multi-defect joint`: one pipeline call per image with the joint
    prompt; each defect's own mask written, the union mask their OR, the source kept outside it."""
    import json

    from defectfill.data import load_mask
    from defectfill.outputs.generated import MANIFEST, STATE

    prompts = []
    real = DefectGenerator.__init__

    def track(self, *args, **kwargs):
        real(self, *args, **kwargs)
        call = type(self.pipe).__call__

        def spy(pipe, *a, **k):
            prompts.append(k.get("prompt"))
            return call(pipe, *a, **k)

        monkeypatch.setattr(type(self.pipe), "__call__", spy)

    monkeypatch.setattr(DefectGenerator, "__init__", track)
    out = tmp_path / "joint"
    assert run_quick_generate(object_run, out, "--count", "2", "--defect-types", "scratch,spot", "--multi-defect",
                     "joint") == 0
    assert prompts == ["A disc with <scratch> and <spot>"] * 2
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["multi_defect"] == "joint" and [d["defect_type"] for d in r["defects"]] == ["scratch", "spot"]
        own = [load_mask(out / d["mask"]) for d in r["defects"]]
        union = load_mask(out / r["mask"])
        assert all(m.any() for m in own) and np.array_equal(union, np.logical_or.reduce(own))
        image, source = np.asarray(load_rgb(out / r["image"])), np.asarray(load_rgb(row_file(out, r["source_image"])))
        assert np.array_equal(image[~union], source[~union])
    state = json.loads((out / STATE).read_text())
    assert '"multi_defect": "joint"' in json.dumps(state)  # the output's identity: a sequential rerun is refused


def test_generate_multi_defect_joint_refusals(object_run, run_dir, tmp_path, capsys, tiny_model_dir, demo_root):
    from defectfill.cli import main

    assert main(["generate", "--run", str(object_run), "--output", str(tmp_path / "a"), "--count", "1",
                 "--multi-defect", "joint"]) == 2
    assert "--defect-types A,B" in capsys.readouterr().err
    with pytest.raises(DefectFillError, match="one run trained on every type"):
        run_quick_generate(f"{run_dir},{write_run(tmp_path / 'spot', tiny_model_dir, demo_root, defect_type='spot')}",
                  tmp_path / "b", "--count", "1", "--defect-types", "scratch,spot",
                  "--multi-defect", "joint")


def test_latent_blend_in_a_call_of_several_images_keeps_each_rows_source(run_dir, demo_root):
    """With --batch-images, one pipeline call holds the candidates of several images: each row is blended with
    its own image's latents, so every image comes out as in a call of its own (within a level or two)."""
    gen = DefectGenerator.from_run(run_dir, steps=3, candidates=2, scorer=_Scores())
    gen.latent_blend = True
    goods = sorted((demo_root / "disc" / "train" / "good").glob("*.png"))[:2]
    _, mask = _disc_and_mask(demo_root)
    requests = [(load_rgb(g), mask, 5 + i) for i, g in enumerate(goods)]
    together = gen.generate_many(requests, images_per_call=2)
    for (image, m, seed), joint in zip(requests, together, strict=True):
        alone = np.asarray(gen(image, m, seed).image, dtype=np.int16)
        assert np.abs(np.asarray(joint.image, dtype=np.int16) - alone).max() <= 2
    swapped = gen.generate_many([(requests[1][0], mask, 5), (requests[0][0], mask, 6)], images_per_call=2)
    assert not np.array_equal(np.asarray(swapped[0].image), np.asarray(together[0].image))
