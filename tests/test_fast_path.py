"""The fast training step (one batched UNet call, recorder on decoder cross-attention only) computes
exactly what the straightforward step (two UNet calls, attention stored on every layer) computes."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb_lora, take_grads, tiny_config

from defectfill.model.attention import ExplicitAttnProcessor, decoder_cross_attention_names
from defectfill.model.tiny import build_tiny_pipeline
from defectfill.train.naive_step import AttentionStore, naive_losses
from defectfill.train.trainer import build_models, defectfill_losses, load_references, make_micro_batch, prompt_inputs

TERMS = ("defect", "object", "attention", "total")


@pytest.fixture(scope="module")
def setup(demo_root, tmp_path_factory):
    from defectfill.data import make_split, open_layout

    config = tiny_config(demo_root, tmp_path_factory.mktemp("run") / "run", "unused")
    models = build_models(config, torch.device("cpu"), torch.float32, pipe=build_tiny_pipeline(0))
    perturb_lora(models.unet, models.text_encoder)  # every LoRA tensor gets a gradient
    images, masks, _ = load_references(make_split(open_layout(demo_root), "disc", "scratch"), 64)
    return config, models, images, masks, prompt_inputs(models.tokenizer, config)


def _both(setup, step: int = 0):
    config, models, images, masks, prompts = setup
    cpu = torch.device("cpu")
    fast = defectfill_losses(models, make_micro_batch(images, masks, config, step, 0, 0, 1), prompts, config, cpu)
    fast.total.backward()
    fast_grads = take_grads(models)
    with AttentionStore(models.unet) as store:
        slow = naive_losses(models, make_micro_batch(images, masks, config, step, 0, 0, 1), prompts, config, cpu, store)
        slow.total.backward()
    return fast, fast_grads, slow, take_grads(models)


@pytest.mark.parametrize("step", [0, 3])
def test_fast_path_gives_the_reference_losses_and_gradients(setup, step):
    fast, fast_grads, slow, slow_grads = _both(setup, step)
    for name in TERMS:
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-6)
    assert fast.attention > 0 and fast.defect > 0 and fast.object > 0
    assert fast_grads.keys() == slow_grads.keys()
    assert any(n.startswith("text_encoder.") for n in fast_grads) and any(n.startswith("unet.") for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fast_path_equals_the_reference_on_letterboxed_references(setup):
    """Both steps leave letterbox padding out of L_obj alike: references with 12 padding rows above and below (as
    a 64x40 image letterboxed into 64 px) give the same losses and gradients in both, and differ from the
    same pixels read as image."""
    config, models, images, masks, prompts = setup
    valid = torch.zeros(len(images), 1, 64, 64)
    valid[:, :, 12:52] = 1
    images, masks = torch.where(valid > 0, images, -1.0), masks * valid
    assert masks.flatten(1).sum(1).min() > 0
    cpu = torch.device("cpu")
    fast = defectfill_losses(models, make_micro_batch(images, masks, config, 1, 0, 0, 1, valid), prompts, config, cpu)
    fast.total.backward()
    fast_grads = take_grads(models)
    with AttentionStore(models.unet) as store:
        slow = naive_losses(models, make_micro_batch(images, masks, config, 1, 0, 0, 1, valid), prompts, config, cpu,
                            store)
        slow.total.backward()
    slow_grads = take_grads(models)
    for name in TERMS:
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-6)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        as_image = defectfill_losses(models, make_micro_batch(images, masks, config, 1, 0, 0, 1, torch.ones_like(valid)),
                                     prompts, config, cpu)
    assert not torch.isclose(as_image.object, fast.object)


def test_attention_loss_alone_matches_the_reference(setup):
    config = setup[0]
    saved = (config.lambda_def, config.lambda_obj, config.lambda_attn)
    config.lambda_def, config.lambda_obj, config.lambda_attn = 0.0, 0.0, 1.0
    try:
        fast, fast_grads, slow, slow_grads = _both(setup)
    finally:
        config.lambda_def, config.lambda_obj, config.lambda_attn = saved
    torch.testing.assert_close(fast.total, slow.total, rtol=1e-5, atol=1e-7)
    up_k = [n for n in fast_grads if n.startswith("unet.up_blocks") and "attn2.to_k.lora" in n]
    assert up_k and all(fast_grads[n].abs().sum() > 0 for n in up_k)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fast_path_records_only_decoder_cross_attention(setup):
    models = setup[1]
    recording = {n for n, p in models.unet.attn_processors.items()
                 if isinstance(p, ExplicitAttnProcessor) and p.on_probs == models.recorder._record}
    assert recording == set(decoder_cross_attention_names(models.unet))
    # every self-attention and encoder/mid cross-attention layer keeps its stock (SDPA) processor
    others = [p for n, p in models.unet.attn_processors.items() if n not in recording]
    assert others and all(type(p).__name__ == "AttnProcessor2_0" for p in others)


def test_naive_store_covers_every_layer_and_is_removed(setup):
    config, models, images, masks, prompts = setup
    before = dict(models.unet.attn_processors)
    with AttentionStore(models.unet) as store:
        naive_losses(models, make_micro_batch(images, masks, config, 0, 0, 0, 1), prompts, config,
                     torch.device("cpu"), store)
        assert set(store.maps) == set(before)  # self- and cross-attention, encoder and decoder
    assert all(models.unet.attn_processors[n] is p for n, p in before.items())


class _NoTruthValue(torch.nn.Module):
    """Wraps a module as torch.compile does (what accelerate's prepare returns with a dynamo backend):
    calls pass through, but len() raises TypeError, so `wrapper or module` fails."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __len__(self):
        raise TypeError("no len()")


def test_both_steps_accept_wrapped_modules_without_truth_value(setup):
    config, models, images, masks, prompts = setup
    cpu = torch.device("cpu")
    plain = defectfill_losses(models, make_micro_batch(images, masks, config, 0, 0, 0, 1), prompts, config, cpu)
    models.unet_call, models.text_encoder_call = _NoTruthValue(models.unet), _NoTruthValue(models.text_encoder)
    try:
        wrapped = defectfill_losses(models, make_micro_batch(images, masks, config, 0, 0, 0, 1), prompts, config, cpu)
        with AttentionStore(models.unet) as store:
            naive_losses(models, make_micro_batch(images, masks, config, 0, 0, 0, 1), prompts, config, cpu, store)
    finally:
        models.unet_call = models.text_encoder_call = None
    torch.testing.assert_close(wrapped.total, plain.total)


def _with(config, **overrides):
    saved = {k: getattr(config, k) for k in overrides}
    for k, v in overrides.items():
        setattr(config, k, v)
    return saved


@pytest.mark.parametrize("overrides", [
    {"attn_scales": "all"},
    {"attn_scales": "all", "lambda_attn_consistency": 0.5},
    {"lambda_attn_consistency": 0.5},  # the consistency term with today's one-map L_attn
    {"lambda_perceptual": 0.5},
])
def test_optional_terms_match_the_reference(setup, overrides):
    """Multi-scale L_attn, the consistency term and the perceptual term: the fast step equals the naive one."""
    config = setup[0]
    saved = _with(config, **overrides)
    try:
        fast, fast_grads, slow, slow_grads = _both(setup, 2)
    finally:
        _with(config, **saved)
    for name in TERMS:
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-6)
    assert fast.extras.keys() == slow.extras.keys()
    for name in fast.extras:
        torch.testing.assert_close(fast.extras[name], slow.extras[name], rtol=1e-5, atol=1e-6)
        assert fast.extras[name] > 0
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _attention_only_grads(setup, **overrides):
    config = setup[0]
    saved = _with(config, lambda_def=0.0, lambda_obj=0.0, **overrides)
    try:
        fast, fast_grads, _, _ = _both(setup, 1)
    finally:
        _with(config, **saved)
    return fast, fast_grads


def test_all_scales_train_every_decoder_resolution(setup):
    """With --attn-scales all, each decoder grid's own map is compared with the mask: the gradient reaches the
    cross-attention keys of each up block (on the tiny UNet: up_blocks.1 at 8x8, up_blocks.2 at 16x16), the loss is
    the mean of the per-grid losses, and it differs from today's one-map L_attn."""
    from defectfill.model.attention import token_maps_by_scale
    from defectfill.train import losses as L

    config, models, images, masks, prompts = setup
    fast, grads = _attention_only_grads(setup, lambda_attn=1.0, attn_scales="all")
    for block in ("up_blocks.1.", "up_blocks.2."):
        keys = [n for n in grads if n.startswith("unet." + block) and "attn2.to_k.lora" in n]
        assert keys and all(grads[n].abs().sum() > 0 for n in keys), block
    # by hand: the recorded maps of the same micro-batch, per grid
    batch = make_micro_batch(images, masks, config, 1, 0, 0, 1)
    with torch.no_grad():
        saved = _with(config, lambda_def=0.0, lambda_obj=0.0, lambda_attn=1.0)
        try:
            recorded = []
            original = models.recorder.stop
            models.recorder.stop = lambda: (recorded.extend(models.recorder.maps), original())[1]
            try:
                defectfill_losses(models, batch, prompts, config, torch.device("cpu"))
            finally:
                models.recorder.stop = original
        finally:
            _with(config, **saved)
    from defectfill.model.pipeline import vae_scale_factor

    side = images.shape[-1] // vae_scale_factor(models.vae)
    scales = token_maps_by_scale(recorded, (side, side))
    assert [tuple(m.shape[-2:]) for m in scales] == [(side // 2, side // 2), (side, side)]
    per_grid = [L.attention_loss(m, batch.masks) for m in scales]
    torch.testing.assert_close(fast.attention, torch.stack(per_grid).mean(), rtol=1e-5, atol=1e-7)
    coarsest, _ = _attention_only_grads(setup, lambda_attn=1.0)
    assert not torch.isclose(coarsest.attention, fast.attention)


def test_consistency_alone_trains_the_finer_grid(setup):
    """The consistency term on its own (L_attn off) has a gradient on both grids' cross-attention keys."""
    fast, grads = _attention_only_grads(setup, lambda_attn=0.0, lambda_attn_consistency=1.0)
    assert fast.extras["attention_consistency"] > 0
    torch.testing.assert_close(fast.total, fast.extras["attention_consistency"])
    for block in ("up_blocks.1.", "up_blocks.2."):
        keys = [n for n in grads if n.startswith("unet." + block) and "attn2.to_k.lora" in n]
        assert keys and all(grads[n].abs().sum() > 0 for n in keys), block


def test_perceptual_term_trains_the_lora_and_zero_changes_nothing(setup):
    """--lambda-perceptual alone: its gradient reaches the UNet's and the text encoder's LoRA through the VAE
    decoder. At 0 (the default) the VAE decoder is never called and the step is the three-loss step."""
    config, models, images, masks, prompts = setup
    fast, grads = _attention_only_grads(setup, lambda_attn=0.0, lambda_perceptual=1.0)
    assert fast.extras["perceptual"] > 0
    torch.testing.assert_close(fast.total, fast.extras["perceptual"])
    unet_lora = [n for n in grads if n.startswith("unet.") and "lora" in n]
    assert unet_lora and sum(float(grads[n].abs().sum()) for n in unet_lora) > 0
    assert any(grads[n].abs().sum() > 0 for n in grads if n.startswith("text_encoder."))
    calls = []
    hook = models.vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            plain = defectfill_losses(models, make_micro_batch(images, masks, config, 1, 0, 0, 1), prompts, config,
                                      torch.device("cpu"))
    finally:
        hook.remove()
    assert not calls and not plain.extras
    torch.testing.assert_close(plain.total, config.lambda_def * plain.defect + config.lambda_obj * plain.object
                               + config.lambda_attn * plain.attention)


def test_a_training_with_the_optional_terms_logs_them(demo_root, tiny_model_dir, tmp_path):
    """A 2-step training with every option on runs end to end, records them in config.json, and logs each
    optional term beside the three losses in metrics.jsonl; a default run logs only the three and the total."""
    from defectfill.model.pipeline import load_pipeline
    from defectfill.outputs.run_folder import read_metrics, read_run_config
    from defectfill.train.trainer import train

    run = train(tiny_config(demo_root, tmp_path / "on", tiny_model_dir, attn_scales="all",
                            lambda_attn_consistency=0.1, lambda_perceptual=0.5), pipe=load_pipeline(str(tiny_model_dir)))
    config = read_run_config(run)
    assert (config.attn_scales, config.lambda_attn_consistency, config.lambda_perceptual) == ("all", 0.1, 0.5)
    logged = read_metrics(run)
    assert logged and all({"attention_consistency", "perceptual"} <= set(r["loss"]) for r in logged)
    assert all(r["loss"]["perceptual"] > 0 for r in logged)
    plain = train(tiny_config(demo_root, tmp_path / "off", tiny_model_dir), pipe=load_pipeline(str(tiny_model_dir)))
    assert all(set(r["loss"]) == {"defect", "object", "attention", "total"} for r in read_metrics(plain))
