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
