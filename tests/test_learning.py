"""Learning, not only running (issue 10): the built-in base `defectfill-mini` inpaints, and DefectFill on it
learns a defect type the base never saw, with an attention loss that localises the token.

The defect is the demo's "spot" (a flat dark ellipse on a disc): the pretraining world's stains are soft and
blurred and its captions never say "spot" (tests/test_world.py), so only the 3 references can teach it.
Generation samples as docs/method.md ("Sampling on defectfill-mini") says, and why: the defect prompt
"A photo of {token}" and guidance 1. The demo's 1-2 px scratches are not used: the base's factor-4 VAE
cannot represent them at 64 px (the real scratch images, encoded and decoded, are already 0.35 from the real
scratches in this feature space, against the base's 0.44), so no fine-tune could be told apart there.
Each measured value in a docstring was measured on this project's 2-core CPU machine (2026-11-30); the
thresholds leave margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from defectfill.evaluate.metrics.mask_stats import feature_distance, mask_region_features

MODEL = "defectfill-mini"
SIZE = 64
STEPS = 120  # DefectFill optimiser steps per fine-tune
DEFECT = "spot"
SAMPLING = dict(steps=20, guidance=1.0)  # docs/method.md, "Sampling on defectfill-mini"
PROMPT = "A photo of {token}"  # the defect branch's prompt


# --------------------------------------------------------------------------- the base inpaints


def _inpaint_error(pipe, images: np.ndarray, captions: list[str], masks: np.ndarray) -> float:
    """Mean absolute error (0..1) inside the mask between the pipeline's inpainting and the true image."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=captions, image=[Image.fromarray(i) for i in images],
               mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks], height=SIZE, width=SIZE,
               num_inference_steps=SAMPLING["steps"], guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images  # (N, H, W, 3) in [0, 1]
    truth = images.astype(np.float64) / 255.0
    return float(np.mean([np.abs(o - t)[m].mean() for o, t, m in zip(out, truth, masks, strict=True)]))


def test_the_base_inpaints_held_out_world_images_far_better_than_random_weights():
    """On 8 world images the base never saw (a seed outside pretraining's streams), its error inside the
    mask is far below that of the same networks with random weights, and below a random UNet behind the
    base's own trained VAE and text encoder (so the UNet learnt, not only the autoencoder).

    Measured (mean absolute error inside the mask, 0..1): base 0.077, random UNet with the base's VAE 0.297,
    random pipeline 0.268.
    """
    from defectfill.model.pipeline import load_pipeline
    from defectfill.model.tiny import assemble_inpaint_pipeline
    from defectfill.pretrain.base import BaseArch, build_networks
    from defectfill.pretrain.world import sample_batch

    images, captions, masks = sample_batch(np.random.default_rng([20261130]), 8, SIZE)
    masks = masks.astype(bool)
    base = load_pipeline(MODEL)
    vae, unet, text_encoder = build_networks(BaseArch(), SIZE, seed=1)
    random_pipe = assemble_inpaint_pipeline(unet, vae, text_encoder)
    random_unet = assemble_inpaint_pipeline(unet, base.vae, base.text_encoder)
    base_error = _inpaint_error(base, images, captions, masks)
    random_error = _inpaint_error(random_pipe, images, captions, masks)
    random_unet_error = _inpaint_error(random_unet, images, captions, masks)
    print(f"inpainting error: base {base_error:.4f}, random UNet {random_unet_error:.4f}, random {random_error:.4f}")
    assert base_error < 0.5 * random_error
    assert base_error < 0.6 * random_unet_error


# --------------------------------------------------------------------------- DefectFill learns a defect


@pytest.fixture(scope="module")
def spot_data(tmp_path_factory):
    """The demo's disc with 9 spots: 3 references, 6 held out; 9 defect-free discs to paint on."""
    from defectfill.demo.dataset import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("learning") / "mvtec", n_defect=9,
                             categories={"disc": ("object", (DEFECT,))})


def _fine_tune(data, out, seed: int, **overrides):
    from defectfill.config.stages import TrainConfig
    from defectfill.train.trainer import train

    settings = dict(data=str(data), category="disc", defect_type=DEFECT, output=str(out), model=MODEL,
                    resolution=SIZE, steps=STEPS, batch_size=3, lr_unet=1e-3, lr_text=2e-4, warmup_steps=10,
                    save_every=10**6, sample_every=0, log_every=1000, seed=seed, mixed_precision="no",
                    compile="no")
    settings.update(overrides)
    return train(TrainConfig(**settings))


@pytest.fixture(scope="module")
def runs(spot_data, tmp_path_factory):
    """Three fine-tunes: full DefectFill with seeds 0 and 1, and seed 0 without the attention loss."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "full0": _fine_tune(spot_data, root / "full0", seed=0),
        "full1": _fine_tune(spot_data, root / "full1", seed=1),
        "no_attn0": _fine_tune(spot_data, root / "no_attn0", seed=0, lambda_attn=0.0),
    }


def _targets(data):
    """(defect-free image, held-out real defect image, its mask) triples: each real mask placed on a new disc."""
    from defectfill.data import make_split, open_layout

    split = make_split(open_layout(data), "disc", DEFECT)
    goods = sorted((data / "disc" / "train" / "good").glob("*.png"))
    out = []
    for good, sample in zip(goods, split.held_out, strict=False):
        mask = np.asarray(Image.open(sample.mask).convert("L")) >= 128
        out.append((Image.open(good).convert("RGB"), np.asarray(Image.open(sample.image).convert("RGB")), mask))
    return out


def _generate(generator, targets):
    """-> (region features of each generated image (N, 5), the token's attention map of each (H, W))."""
    features, maps = [], []
    for i, (good, _, mask) in enumerate(targets):
        result = generator(good, mask, seed=i)
        features.append(mask_region_features(np.asarray(result.image), mask))
        maps.append(result.attention)
    return np.stack(features), maps


@pytest.fixture(scope="module")
def generated(runs, spot_data):
    """What the base and each fine-tune paint into the held-out masks on new discs (with attention maps)."""
    from defectfill.generate.generator import DefectGenerator
    from defectfill.model.pipeline import load_pipeline

    targets = _targets(spot_data)
    out = {"base": _generate(DefectGenerator(load_pipeline(MODEL), PROMPT.format(token="sks"), "sks", SIZE,
                                             candidates=1, save_attention=True, **SAMPLING), targets)}
    for name, run in runs.items():
        out[name] = _generate(DefectGenerator.from_run(run, candidates=1, save_attention=True, prompt=PROMPT,
                                                       **SAMPLING), targets)
    return out


def test_defectfill_learns_a_defect_the_base_never_saw(generated, spot_data):
    """In the mask-region feature space of `defectfill.evaluate.metrics.mask_stats` (colour, contrast, edge energy),
    what the fine-tuned model paints into 6 held-out spot masks on new discs is closer to the 6 held-out real
    spots than what the un-fine-tuned base paints there with the same prompt, for each seed.

    Measured distances to the real spots (2026-11-30, 120 steps): base 0.205; fine-tuned seed 0 0.069,
    seed 1 0.142 (seed 2, outside the test: 0.075). The real spots' mean colour is 0.30 (dark), the base
    paints 0.45. Sampled with the object prompt "A disc with {token}" instead, the same fine-tunes reached
    0.139, 0.245 and 0.232 against the base's 0.240, and with guidance 3 they moved away from the real
    spots (0.442, 0.487 against 0.377): docs/method.md, "Sampling on defectfill-mini".
    """
    targets = _targets(spot_data)
    real = np.stack([mask_region_features(defect, mask) for _, defect, mask in targets])
    base_distance = feature_distance(generated["base"][0], real)
    for name in ("full0", "full1"):
        distance = feature_distance(generated[name][0], real)
        print(f"{name}: distance to the real spots {distance:.4f} (base {base_distance:.4f})")
        assert distance < 0.8 * base_distance, name


def _mass_inside(maps: list[np.ndarray], targets) -> float:
    """Mean share of the token's attention that falls inside the target mask."""
    return float(np.mean([a[m].sum() / max(a.sum(), 1e-8) for a, (_, _, m) in zip(maps, targets, strict=True)]))


def test_the_attention_loss_puts_the_token_on_the_defect(generated, spot_data):
    """At generation, the share of the token's decoder cross-attention inside the target mask is clearly
    higher after fine-tuning with L_attn than after the same fine-tune without it (same seed and steps).

    Measured share inside the mask (the masks cover 2.2 % of the image): with L_attn 0.185, without 0.038,
    the base 0.041.
    """
    targets = _targets(spot_data)
    shares = {name: _mass_inside(generated[name][1], targets) for name in ("base", "full0", "no_attn0")}
    area = float(np.mean([m.mean() for _, _, m in targets]))
    print(f"attention share inside the mask: {shares} (mask area {area:.4f})")
    assert shares["full0"] > 1.5 * shares["no_attn0"]
