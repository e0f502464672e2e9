"""torch.compile of the training step: same losses, gradients, checkpoints and LoRA as eager; `auto` only on a GPU.

On a CPU the tests compile with the `aot_eager` backend (TorchDynamo capture and AOTAutograd's forward and
backward graphs, run eagerly): the same graph capture as inductor, seconds instead of minutes to compile.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import perturb_lora, take_grads, tiny_config
from safetensors.torch import load_file

from defectfill.model.tiny import build_tiny_pipeline
from defectfill.train.trainer import (
    build_models,
    compile_models,
    defectfill_losses,
    load_references,
    make_micro_batch,
    prompt_inputs,
    train,
)


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.setenv("DEFECTFILL_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _models_and_data(demo_root, tmp_path):
    from defectfill.data import make_split, open_layout

    config = tiny_config(demo_root, tmp_path / "run", "unused")
    models = build_models(config, torch.device("cpu"), torch.float32, pipe=build_tiny_pipeline(0))
    perturb_lora(models.unet, models.text_encoder)  # every LoRA tensor gets a gradient
    refs = load_references(make_split(open_layout(demo_root), "disc", "scratch"), 64)
    return config, models, refs, prompt_inputs(models.tokenizer, config)


def _step(models, config, refs, prompts):
    batch = make_micro_batch(refs.images, refs.masks, config, 0, 0, 0, 1, refs.valid)  # same draws every call
    terms = defectfill_losses(models, batch, prompts, config, torch.device("cpu"))
    terms.total.backward()
    return {k: float(v) for k, v in terms.detached().items()}, take_grads(models)


def test_the_compiled_step_computes_the_eager_losses_and_gradients(demo_root, tmp_path):
    config, models, refs, prompts = _models_and_data(demo_root, tmp_path)
    eager_losses, eager_grads = _step(models, config, refs, prompts)
    compile_models(models)
    assert type(models.unet_call).__name__ == "OptimizedModule"
    compiled_losses, compiled_grads = _step(models, config, refs, prompts)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses["attention"] > 0  # the recorder's maps reached the loss through the compiled graph
    assert set(compiled_grads) == set(eager_grads) and len(eager_grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_attention_recorder_compiles_without_a_graph_break(demo_root, tmp_path):
    """Counted on the tiny UNet with the recorder on its 4 decoder cross-attention layers: one graph, 0 breaks."""
    config, models, refs, prompts = _models_and_data(demo_root, tmp_path)
    captured = {}
    forward = models.unet.forward

    def grab(*args, **kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        return forward(*args, **kwargs)

    models.unet.forward = grab
    _step(models, config, refs, prompts)
    del models.unet.forward
    models.recorder.start(prompts.token_weights.expand(config.batch_size, -1))
    explained = torch._dynamo.explain(models.unet)(*captured["args"], **captured["kwargs"])
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    assert len(models.recorder.maps) == len(models.recorder.names) == 4  # every layer recorded


def test_compiled_and_eager_training_write_the_same_checkpoints_and_lora(demo_root, tiny_model_dir, tmp_path):
    runs = {}
    for mode in ("yes", "no"):
        config = tiny_config(demo_root, tmp_path / mode, tiny_model_dir, save_every=1, compile=mode)
        runs[mode] = train(config)
        torch._dynamo.reset()
    for name in ("checkpoint-2/trainable.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(runs["yes"] / name)), load_file(str(runs["no"] / name))
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    # a compiled run resumes without compiling, and the other way round
    resumed = dataclasses.replace(tiny_config(demo_root, tmp_path / "yes", tiny_model_dir, save_every=1, compile="no"),
                                  steps=3, resume="latest")
    assert (train(resumed) / "checkpoint-3").is_dir()


def test_auto_compiles_on_a_gpu_only(demo_root, tiny_model_dir, tmp_path, monkeypatch):
    from defectfill.config.settings import resolve_compile

    assert resolve_compile("auto", "cpu") is False and resolve_compile("yes", "cpu") is True
    assert resolve_compile("no", "cuda") is False

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled on a CPU under --compile auto")

    monkeypatch.setattr(torch, "compile", no_compile)
    train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, compile="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_compile("auto") is True and resolve_compile("auto", "cuda:0") is True
