"""Merging the LoRA into bf16 weights: a layer whose change bf16 cannot hold stays a LoRA layer."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from helpers import write_run
from peft.tuners.lora import LoraLayer

from defectfill.generate.generator import DefectGenerator, merge_lora_weights
from defectfill.model.pipeline import add_lora, load_pipeline, merge_lora_layers, save_lora_weights


def _scale_lora(model: torch.nn.Module, relative: float, seed: int = 1) -> None:
    """Every LoRA layer's change set to seeded noise of `relative` times its base weight (L2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                name = layer.active_adapters[0]
                b = layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=gen))
                delta = layer.get_delta_weight(name).float()
                b.mul_(relative * layer.get_base_layer().weight.float().norm() / delta.norm())


def _strip_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every LoRA layer replaced by its base layer, unchanged: the base model."""
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return model


def _naive_merge(model: torch.nn.Module) -> torch.nn.Module:
    """What `pipe.fuse_lora` does: PEFT adds the change to each weight in the weight's own dtype."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    return _strip_lora(model)


def _unet_output(unet: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 9, 16, 16, generator=gen).to(dtype)
    text = torch.randn(8, 77, unet.config.cross_attention_dim, generator=gen).to(dtype)
    with torch.no_grad():
        return unet(x, torch.full((8,), 500), encoder_hidden_states=text).sample.float()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def tiny_unet(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir))
    add_lora(pipe.unet, None, rank=4)
    return pipe.unet


def test_a_bf16_merge_of_a_small_change_changes_the_output_as_the_unmerged_lora_does(tiny_unet):
    """At a LoRA change of 0.1 % of the weights, bf16 rounds a naively merged weight (mostly) back to the base
    weight: the naive merge's output change from the base is not the unmerged LoRA's. The merge keeps those
    layers as LoRA layers, so its change is the unmerged one's."""
    unet = copy.deepcopy(tiny_unet)
    _scale_lora(unet, 0.001)
    unet = unet.to(torch.bfloat16)
    base = _unet_output(_strip_lora(unet))
    unmerged = _unet_output(unet) - base
    assert unmerged.abs().max() > 0, "the LoRA changes nothing: the test would prove nothing"

    naive = _unet_output(_naive_merge(unet)) - base
    assert (naive - unmerged).norm() > 0.3 * unmerged.norm(), "the naive merge kept the change: nothing to fix"

    merged_unet = copy.deepcopy(unet)
    merge = merge_lora_layers(merged_unet)
    assert merge.merged == 0 and len(merge.kept) == sum(isinstance(m, LoraLayer) for m in unet.modules())
    assert torch.equal(_unet_output(merged_unet) - base, unmerged)


def test_a_change_bf16_can_hold_is_merged_and_samples_as_the_lora_layers(tiny_unet):
    """At 10 % every layer is merged (no LoRA layer left), and its output change from the base is as close to the
    fp32 model's as the unmerged bf16 LoRA's is (bf16's own rounding is the rest); in fp32 even a 0.1 % change is
    merged, to fp32's precision."""
    unet = copy.deepcopy(tiny_unet)
    _scale_lora(unet, 0.1)
    exact = _unet_output(unet, torch.float32) - _unet_output(_strip_lora(unet), torch.float32)
    unet = unet.to(torch.bfloat16)
    base = _unet_output(_strip_lora(unet))
    unmerged = _unet_output(unet) - base
    merge = merge_lora_layers(unet)
    assert merge.kept == () and merge.merged > 0
    assert not any(isinstance(m, LoraLayer) for m in unet.modules())
    assert _cosine(unmerged, exact) > 0.8, "bf16 lost the 10 % change even unmerged: the test would prove nothing"
    assert _cosine(_unet_output(unet) - base, exact) > _cosine(unmerged, exact) - 0.05

    fp32 = copy.deepcopy(tiny_unet)
    _scale_lora(fp32, 0.001)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    layer = fp32.get_submodule(q)
    expected = layer.get_base_layer().weight.detach() + layer.get_delta_weight(layer.active_adapters[0]).detach()
    merge = merge_lora_layers(fp32)
    assert merge.kept == ()
    assert torch.allclose(fp32.get_submodule(q).weight, expected, rtol=0, atol=1e-7)


def test_from_run_in_bf16_keeps_the_small_change_and_says_how_many_layers(tiny_model_dir, demo_root, tmp_path, caplog):
    """A run whose LoRA changes its weights by 0.1 %, loaded in bf16: the merged generator samples exactly what
    merge_lora=False does, and the log says how many layers stayed LoRA layers."""
    run = write_run(tmp_path / "disc-scratch", tiny_model_dir, demo_root)
    pipe = load_pipeline(str(tiny_model_dir))
    add_lora(pipe.unet, pipe.text_encoder, rank=4)
    _scale_lora(pipe.unet, 0.001)
    _scale_lora(pipe.text_encoder, 0.001, seed=2)
    save_lora_weights(run, pipe.unet, pipe.text_encoder)
    layers = sum(isinstance(m, LoraLayer) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())

    image = np.zeros((64, 64, 3), np.uint8) + 128
    mask = np.zeros((64, 64), bool)
    mask[20:30, 24:40] = True
    from PIL import Image

    with caplog.at_level(logging.INFO, logger="defectfill.generate.generator"):
        merged = DefectGenerator.from_run(run, steps=2, candidates=1, mixed_precision="bf16")
    assert f"LoRA merged into 0 layers; {layers} kept as LoRA layers" in caplog.text
    unmerged = DefectGenerator.from_run(run, steps=2, candidates=1, mixed_precision="bf16", merge_lora=False)
    a = merged(Image.fromarray(image), mask, seed=3).candidates[0]
    b = unmerged(Image.fromarray(image), mask, seed=3).candidates[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_merge_lora_weights_on_an_fp32_pipeline_leaves_no_lora(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir))
    add_lora(pipe.unet, pipe.text_encoder, rank=4)
    _scale_lora(pipe.unet, 0.05)
    merge = merge_lora_weights(pipe)
    assert merge.kept == ()
    assert not any(isinstance(m, LoraLayer) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())
