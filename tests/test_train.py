"""The training loop: which weights change, the attention loss, warm-up, resume, saved LoRA, mixed precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from helpers import tiny_config
from PIL import Image
from safetensors.torch import load_file

import defectfill.train.trainer as train_module
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import LOCK
from defectfill.model.pipeline import load_pipeline
from defectfill.train.losses import LossTerms
from defectfill.train.trainer import (
    build_models,
    defectfill_losses,
    load_references,
    make_micro_batch,
    prompt_inputs,
    train,
    warmup_lambda,
)


def _state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the three networks, under names that survive PEFT's wrapping (base_layer)."""
    out = {}
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder), ("vae.", pipe.vae)):
        for name, tensor in module.state_dict().items():
            # PEFT renames x.weight to x.base_layer.weight; a new token moves the table to token_embedding.base
            name = name.replace(".base_layer", "").replace("token_embedding.base.", "token_embedding.")
            out[prefix + name] = tensor.detach().clone()
    return out


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if k not in before or not torch.equal(before[k], after[k])}


def test_one_step_changes_exactly_the_lora_weights(demo_root, tiny_model_dir, tmp_path):
    pipe = load_pipeline(str(tiny_model_dir))
    before = _state(pipe)
    train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=1), pipe=pipe)
    after = _state(pipe)
    changed = _changed(before, after)
    assert changed, "one step changed nothing"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)[:5]
    # lora_B starts at 0, so only a real gradient moves it (weight decay alone cannot)
    assert any(k.startswith("unet.") and "lora_B" in k for k in changed)
    assert any(k.startswith("text_encoder.") and "lora_B" in k for k in changed), "text-encoder LoRA did not train"


def test_new_token_row_trains_and_nothing_else_outside_lora(demo_root, tiny_model_dir, tmp_path):
    pipe = load_pipeline(str(tiny_model_dir))
    before = _state(pipe)
    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=1, new_token="<scratch>"), pipe=pipe)
    after = _state(pipe)
    emb = pipe.text_encoder.get_input_embeddings()
    init = before["text_encoder.embeddings.token_embedding.weight"][
        pipe.tokenizer("sks", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(emb.new_rows.detach()[0], init), "the new token's row did not train"
    changed = _changed(before, after)
    assert all("lora_" in k or k.endswith("new_rows") for k in changed)
    assert "text_encoder.embeddings.token_embedding.weight" not in changed  # the original table is untouched
    saved = load_file(str(run / "learned_embeds.safetensors"))
    assert set(saved) == {"<scratch>"}
    torch.testing.assert_close(saved["<scratch>"], emb.new_rows.detach()[0])
    # the stock pipeline reads it as a textual-inversion embedding, beside the LoRA
    fresh = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_model_dir))
    fresh.load_lora_weights(str(run))
    fresh.load_textual_inversion(str(run / "learned_embeds.safetensors"), token="<scratch>")
    new_id = fresh.tokenizer.convert_tokens_to_ids("<scratch>")
    torch.testing.assert_close(fresh.text_encoder.get_input_embeddings().weight[new_id], saved["<scratch>"])


def _losses_and_grads(models, config, batch, prompts):
    terms = defectfill_losses(models, batch, prompts, config, torch.device("cpu"))
    terms.total.backward()
    grads = {n: p.grad.clone() for module in (models.unet, models.text_encoder)
             for n, p in module.named_parameters() if p.grad is not None}
    for module in (models.unet, models.text_encoder):
        module.zero_grad(set_to_none=True)
    return terms, grads


@pytest.fixture
def models_and_batch(demo_root, tiny_model_dir, tmp_path):
    from defectfill.data import make_split, open_layout

    config = tiny_config(demo_root, tmp_path / "run", tiny_model_dir)
    models = build_models(config, torch.device("cpu"), torch.float32, pipe=load_pipeline(str(tiny_model_dir)))
    with torch.no_grad():  # non-zero LoRA so gradients reach both A and B
        for module in (models.unet, models.text_encoder):
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    images, masks, _ = load_references(make_split(open_layout(demo_root), "disc", "scratch"), 64)
    return config, models, images, masks, prompt_inputs(models.tokenizer, config)


def test_attention_loss_alone_has_gradient(models_and_batch):
    config, models, images, masks, prompts = models_and_batch
    config.lambda_def, config.lambda_obj, config.lambda_attn = 0.0, 0.0, 1.0
    terms, grads = _losses_and_grads(models, config, make_micro_batch(images, masks, config, 0, 0, 0, 1), prompts)
    assert terms.total > 0 and torch.equal(terms.total, terms.attention)
    up_k = [g for n, g in grads.items() if n.startswith("up_blocks") and "attn2.to_k.lora" in n]
    text = [g for n, g in grads.items() if "lora" in n and ("self_attn" in n)]
    assert up_k and all(g.abs().sum() > 0 for g in up_k), "attention maps are detached"
    assert text and any(g.abs().sum() > 0 for g in text), "attention loss does not reach the text encoder"


def test_a_scratch_thinner_than_a_latent_cell_still_weighs_in_both_branches(models_and_batch):
    """Pins the loss weights' mask reduction: a 1 px scratch off the pixel that nearest sampling keeps (the tiny
    VAE's cells are 4x4 px) lies in every latent cell it touches, so L_def sees it and M' of L_obj weights it
    fully. With the nearest resize it vanished: L_def was 0 and L_obj weighted the scratch by alpha."""
    from defectfill.train.trainer import MicroBatch

    config, models, images, _, prompts = models_and_batch
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 5:59, 13] = 1  # cell column 3; nearest keeps pixel column 12
    boxes = torch.zeros(2, 1, 64, 64)
    boxes[:, :, 40:60, 40:60] = 1

    def losses(alpha: float):
        config.alpha = alpha
        batch = MicroBatch(images[:2].clone(), masks, boxes, torch.Generator().manual_seed(0))
        with torch.no_grad():
            return defectfill_losses(models, batch, prompts, config, torch.device("cpu"))

    try:
        only_defect, everywhere = losses(0.0), losses(1.0)
    finally:
        config.alpha = 0.3
    assert only_defect.defect > 0
    # alpha = 0: L_obj is the object branch's error over the scratch's cells alone, a real (non-zero) mean
    assert only_defect.object > 0 and not torch.isclose(only_defect.object, everywhere.object)


def test_attention_loss_reaches_every_recorded_layer_and_every_cell(models_and_batch, monkeypatch):
    """Pins the gradient path of L_attn: every decoder cross-attention layer's token map gets gradient in every
    cell of every defect row (tiny model: four maps, of 16x16 and 8x8, shrunk to 4x4). With bilinear shrinking, 3 of 4
    cells of the 16x16 maps got none."""
    config, models, images, masks, prompts = models_and_batch
    config.lambda_def, config.lambda_obj, config.lambda_attn = 0.0, 0.0, 1.0
    recorded: list[torch.Tensor] = []

    class Retaining(list):
        def append(self, m):
            m.retain_grad()
            recorded.append(m)
            super().append(m)

    original_start = models.recorder.start

    def start(weights):
        original_start(weights)
        models.recorder.maps = Retaining()

    monkeypatch.setattr(models.recorder, "start", start)
    _losses_and_grads(models, config, make_micro_batch(images, masks, config, 0, 0, 0, 1), prompts)
    assert len(recorded) == len(models.recorder.names) == 4  # two layers at 8x8, two at 16x16
    assert sorted(m.shape[1] for m in recorded) == [64, 64, 256, 256]
    for m in recorded:
        assert m.grad is not None and m.shape[0] == config.batch_size
        assert bool((m.grad != 0).all()), f"{int((m.grad == 0).sum())} of {m.grad.numel()} cells get no gradient"


def test_each_branch_gets_its_own_prompt_and_the_token_map_comes_from_the_defect_rows(models_and_batch, monkeypatch):
    """Pins which prompt reaches which branch: UNet rows 0..B-1 (defect mask) see the defect prompt's encoding, rows
    B..2B-1 (box masks) the object prompt's, and the attention maps are read from the defect rows at the token's
    position in the defect prompt. (The token sits at position 4 in both default prompts, so swapped prompts went
    unseen.) Templates with the token at different positions tell the prompts apart everywhere."""
    import dataclasses

    from defectfill.model.attention import ExplicitAttnProcessor

    config, models, images, masks, _ = models_and_batch
    config = dataclasses.replace(config, defect_prompt="a close photo of {token} damage",
                                 object_prompt="{token} on a {object}")
    prompts = prompt_inputs(models.tokenizer, config)
    tok = models.tokenizer
    assert prompts.token_weights[0].nonzero().flatten().tolist() == [5]  # <start> a close photo of sks
    seen, probs, token_maps = {}, [], []
    unet_forward = models.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kwargs):
        seen["text"], seen["mask"] = encoder_hidden_states.detach().clone(), sample[:, 4:5].detach().clone()
        return unet_forward(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(models.unet, "forward", spy)
    processor = next(p for p in models.unet.attn_processors.values() if isinstance(p, ExplicitAttnProcessor))
    record = processor.on_probs

    def on_probs(p):
        probs.append(p.detach().clone())
        record(p)
        token_maps.append(models.recorder.maps[-1].detach().clone())

    monkeypatch.setattr(processor, "on_probs", on_probs)
    batch = make_micro_batch(images, masks, config, 0, 0, 0, 1)
    with torch.no_grad():
        defectfill_losses(models, batch, prompts, config, torch.device("cpu"))
        expected = {}
        for name in ("defect_prompt", "object_prompt"):
            ids = tok(config.prompt(getattr(config, name)), padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            expected[name] = models.text_encoder(ids)[0][0]
    b = config.batch_size
    for i in range(b):
        torch.testing.assert_close(seen["text"][i], expected["defect_prompt"])
        torch.testing.assert_close(seen["text"][b + i], expected["object_prompt"])
    # rows 0..B-1 carry the defect masks, rows B..2B-1 the box masks (tiny VAE: 4x4 px latent cells)
    assert torch.equal(seen["mask"][:b], torch.nn.functional.max_pool2d(batch.masks, 4))
    assert torch.equal(seen["mask"][b:], torch.nn.functional.max_pool2d(batch.box_masks, 4))
    # every recorded token map: the defect rows' probabilities at the token's position, mean over heads
    assert len(probs) == len(models.recorder.names) and all(p.shape[0] == 2 * b for p in probs)
    for p, m in zip(probs, token_maps, strict=True):
        torch.testing.assert_close(m, p[:b, :, :, 5].mean(1))


def test_attention_only_training_changes_lora(demo_root, tiny_model_dir, tmp_path):
    pipe = load_pipeline(str(tiny_model_dir))
    before = _state(pipe)
    train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=1, lambda_def=0.0, lambda_obj=0.0,
                      lambda_attn=1.0), pipe=pipe)
    changed = _changed(before, _state(pipe))
    assert any("lora_B" in k for k in changed)


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(models_and_batch):
    config, models, images, masks, prompts = models_and_batch
    batch = make_micro_batch(images, masks, config, 0, 0, 0, 1)
    terms, grads = _losses_and_grads(models, config, batch, prompts)
    models.unet.enable_gradient_checkpointing()
    batch = make_micro_batch(images, masks, config, 0, 0, 0, 1)
    terms_ckpt, grads_ckpt = _losses_and_grads(models, config, batch, prompts)
    for name in ("defect", "object", "attention", "total"):
        torch.testing.assert_close(getattr(terms_ckpt, name), getattr(terms, name))
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4)


def test_micro_batch_is_a_function_of_seed_and_step(models_and_batch):
    config, _, images, masks, _ = models_and_batch
    a = make_micro_batch(images, masks, config, 5, 0, 0, 1)
    b = make_micro_batch(images, masks, config, 5, 0, 0, 1)
    c = make_micro_batch(images, masks, config, 6, 0, 0, 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.box_masks, b.box_masks)
    assert not torch.equal(a.box_masks, c.box_masks)
    # the defect stays inside the crop
    for i in range(a.masks.shape[0]):
        assert a.masks[i].sum() > 0


def test_warmup_never_leaves_the_rate_at_zero(demo_root, tiny_model_dir, tmp_path):
    factor = warmup_lambda(100)
    assert factor(0) == pytest.approx(0.01) and factor(99) == 1.0 and factor(5000) == 1.0
    assert warmup_lambda(0)(0) == 1.0
    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=1, warmup_steps=100))
    line = next(line for line in (run / "train.log").read_text().splitlines() if " step 1 " in line)
    lr = float(line.split(" lr ")[1].split()[0])
    assert lr == pytest.approx(2e-4 / 100)


def _final_lora(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pytorch_lora_weights.safetensors"))


def test_resume_continues_the_same_run(demo_root, tiny_model_dir, tmp_path):
    straight = train(tiny_config(demo_root, tmp_path / "straight", tiny_model_dir, steps=4, grad_accum=2))
    first = tiny_config(demo_root, tmp_path / "resumed", tiny_model_dir, steps=2, save_every=2, grad_accum=2)
    train(first)
    assert (tmp_path / "resumed" / "checkpoint-2" / "trainer_state.json").is_file()
    second = tiny_config(demo_root, tmp_path / "resumed", tiny_model_dir, steps=4, save_every=2, grad_accum=2,
                         resume="latest")
    resumed = train(second)
    a, b = _final_lora(straight), _final_lora(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_saved_lora_loads_into_the_stock_pipeline_and_changes_its_output(demo_root, tiny_model_dir, tmp_path):
    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=3, warmup_steps=0, lr_unet=5e-2,
                            lr_text=5e-2))
    image = Image.open(demo_root / "disc" / "train" / "good" / "000.png").convert("RGB")
    mask = Image.fromarray((np.arange(64)[None, :] > 20).repeat(64, 0).astype(np.uint8) * 255)

    def inpaint(pipe):
        return pipe(prompt="A disc with sks", image=image, mask_image=mask, height=64, width=64,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_model_dir))
    plain = inpaint(pipe)
    pipe.load_lora_weights(str(run))
    n_unet = sum("lora_A" in n for n, _ in pipe.unet.named_parameters())
    n_text = sum("lora_A" in n for n, _ in pipe.text_encoder.named_parameters())
    assert n_unet > 0 and n_text > 0, "LoRA not loaded into both UNet and text encoder"
    with_lora = inpaint(pipe)
    assert np.abs(with_lora - plain).max() > 1e-3


def test_saved_lora_reproduces_the_trained_modules_exactly(demo_root, tiny_model_dir, tmp_path):
    """Pins the saved LoRA: the stock pipeline with `load_lora_weights(run)` computes what the trained modules
    computed (text encoder, UNet and a whole inpainting), not merely something different from the base model."""
    trained = load_pipeline(str(tiny_model_dir))
    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=3, warmup_steps=0, lr_unet=5e-2,
                            lr_text=5e-2), pipe=trained)
    trained.unet.eval()
    trained.text_encoder.eval()
    fresh = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_model_dir))
    base = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_model_dir))
    fresh.load_lora_weights(str(run))
    ids = trained.tokenizer("A disc with sks", padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(2, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        outs = {}
        for name, pipe in (("trained", trained), ("loaded", fresh), ("base", base)):
            text = pipe.text_encoder(ids)[0]
            outs[name] = (text, pipe.unet(x, t, encoder_hidden_states=text.expand(2, -1, -1)).sample)
    for a, b in zip(outs["loaded"], outs["trained"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (outs["base"][1] - outs["trained"][1]).abs().max() > 1e-3  # training did change the model
    image = Image.open(demo_root / "disc" / "train" / "good" / "000.png").convert("RGB")
    mask = Image.fromarray((np.arange(64)[None, :] > 20).repeat(64, 0).astype(np.uint8) * 255)

    def inpaint(pipe):
        return pipe(prompt="A disc with sks", image=image, mask_image=mask, height=64, width=64,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    np.testing.assert_allclose(inpaint(fresh), inpaint(trained), atol=1e-4)


def test_run_folder_contents(demo_root, tiny_model_dir, tmp_path):
    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=2, save_every=1, sample_every=2,
                            sample_steps=1))
    config = json.loads((run / "config.json").read_text())
    assert config["base_model"] == str(tiny_model_dir) and "defectfill_version" in config
    assert config["lambda_attn"] == 0.05 and config["steps"] == 2
    split = json.loads((run / "split.json").read_text())
    assert [r["image"] for r in split["reference"]] == ["disc/test/scratch/000.png", "disc/test/scratch/001.png"]
    assert len(split["held_out"]) == 4
    assert (run / "checkpoint-1").is_dir() and (run / "checkpoint-2").is_dir()
    # (the lock file stays: flock's lock lives on it and is dropped by the system when its holder ends)
    assert not any(p.name.startswith(".") and p.name != LOCK for p in run.iterdir()), "temporary files left behind"
    assert (run / "logs" / "samples" / "step-000002.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").iterdir())


def test_bf16_keeps_trainable_weights_fp32(demo_root, tiny_model_dir, tmp_path):
    config = tiny_config(demo_root, tmp_path / "run", tiny_model_dir, mixed_precision="bf16")
    models = build_models(config, torch.device("cpu"), torch.bfloat16, pipe=load_pipeline(str(tiny_model_dir)))
    trainable = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
    frozen = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    train(config, pipe=load_pipeline(str(tiny_model_dir)))  # runs end to end under bf16 autocast


@pytest.mark.parametrize("precision", ["no", "fp16"])  # fp16: the loss scaler must not unscale twice
def test_nonfinite_loss_skips_the_step_and_repeated_ones_stop_the_run(demo_root, tiny_model_dir, tmp_path, monkeypatch,
                                                                      precision):
    real = train_module.defectfill_losses
    calls = {"n": 0}

    def first_is_nan(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 1:
            nan = terms.total * float("nan")
            return LossTerms(terms.defect, terms.object, terms.attention, nan)
        return terms

    monkeypatch.setattr(train_module, "defectfill_losses", first_is_nan)
    pipe = load_pipeline(str(tiny_model_dir))
    before = _state(pipe)
    run = train(tiny_config(demo_root, tmp_path / "one", tiny_model_dir, steps=3, save_every=1,
                            mixed_precision=precision), pipe=pipe)
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1
    assert "non-finite" in (run / "train.log").read_text()
    # the NaN step went through backward (all ranks must) but reached no weight: lora_B is still 0
    first = load_file(str(run / "checkpoint-1" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in first.values())
    assert all(not v.any() for k, v in first.items() if "lora_B" in k)
    assert _changed(before, _state(pipe)), "the two good steps after it trained nothing"

    def always_nan(*args, **kwargs):
        terms = real(*args, **kwargs)
        return LossTerms(terms.defect, terms.object, terms.attention, terms.total * float("nan"))

    monkeypatch.setattr(train_module, "defectfill_losses", always_nan)
    with pytest.raises(DefectFillError, match="3 steps in a row with a non-finite loss"):
        train(tiny_config(demo_root, tmp_path / "many", tiny_model_dir, steps=10, max_nonfinite_steps=3,
                          mixed_precision=precision))


class _InfiniteGradient(torch.autograd.Function):
    """0 forward, inf backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


@pytest.mark.parametrize("precision", ["no", "fp16"])  # fp16: the loss scaler finds the inf and skips
def test_finite_loss_with_nonfinite_gradient_is_skipped(demo_root, tiny_model_dir, tmp_path, monkeypatch, precision):
    real = train_module.defectfill_losses

    def inf_gradient(models, *args, **kwargs):
        terms = real(models, *args, **kwargs)
        lora = next(p for n, p in models.unet.named_parameters() if "lora_A" in n)
        poison = _InfiniteGradient.apply(lora)
        return LossTerms(terms.defect, terms.object, terms.attention, terms.total + poison)

    monkeypatch.setattr(train_module, "defectfill_losses", inf_gradient)
    pipe = load_pipeline(str(tiny_model_dir))
    run = train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=2, max_nonfinite_steps=5,
                            mixed_precision=precision), pipe=pipe)
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["skipped_steps"] == 2
    weights = load_file(str(run / "checkpoint-2" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_two_processes_train_one_run_with_synchronised_weights(demo_root, tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes: one writer, and both ranks end with the same LoRA although each
    saw different images (so gradients were all-reduced). Rank 1's first loss is NaN: both ranks must
    skip that step together (neither hangs in an all-reduce the other never joins, nor drifts apart)."""
    import os
    import subprocess
    import sys

    config = tiny_config(demo_root, tmp_path / "run", tiny_model_dir, steps=3, batch_size=1, lr_unet=1e-2,
                         warmup_steps=0)
    script = tmp_path / "entry.py"
    script.write_text(
        "import json, os\n"
        "from safetensors.torch import save_file\n"
        "from defectfill.config.stages import TrainConfig\n"
        "from defectfill.model.pipeline import load_pipeline\n"
        "import defectfill.train.trainer as t\n"
        "from defectfill.train.losses import LossTerms\n"
        "real, calls = t.defectfill_losses, []\n"
        "def first_nan_on_rank1(*a, **k):\n"
        "    terms = real(*a, **k)\n"
        "    calls.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(calls) == 1:\n"
        "        return LossTerms(terms.defect, terms.object, terms.attention, terms.total * float('nan'))\n"
        "    return terms\n"
        "t.defectfill_losses = first_nan_on_rank1\n"
        "config = TrainConfig(**json.loads(os.environ['TRAIN_CONFIG']))\n"
        "pipe = load_pipeline(config.model)\n"
        "t.train(config, pipe=pipe)\n"
        "weights = {n: p.detach().contiguous() for n, p in pipe.unet.named_parameters() if p.requires_grad}\n"
        "save_file(weights, os.path.join(os.environ['RANK_DIR'], 'rank' + os.environ['RANK'] + '.safetensors'))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAIN_CONFIG": json.dumps(config.to_dict()),
           "RANK_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("training disc/scratch") == 1 and log.count("done:") == 1
    assert "(1 steps skipped)" in log, log
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], atol=1e-6, rtol=1e-5)


def test_optimizer_step_with_a_loss_scaler_skips_bad_steps_and_keeps_working():
    """The fp16-on-GPU path of `_optimizer_step` (accelerate makes no scaler on a CPU, so one is given here):
    an inf gradient is the scaler's to skip (it lowers its scale), a NaN loss is skipped before unscaling,
    and the steps after each still step (no 'unscale_() has already been called')."""
    from accelerate import Accelerator

    from defectfill.train.trainer import _optimizer_step

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    layer = torch.nn.Linear(3, 1)
    model, optimizer = accelerator.prepare(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    params = list(model.parameters())
    x = torch.ones(2, 3)

    def step(poison: str) -> bool:
        loss = model(x).pow(2).mean()
        if poison == "inf gradient":
            loss = loss + _InfiniteGradient.apply(params[0])
        elif poison == "nan loss":
            loss = loss * float("nan")
        accelerator.backward(loss)
        ok, _ = _optimizer_step(accelerator, optimizer, params, loss.detach(), 1.0)
        optimizer.zero_grad(set_to_none=True)
        return ok

    before = [p.detach().clone() for p in params]
    assert not step("inf gradient")
    assert accelerator.scaler.get_scale() < 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert not step("nan loss")
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert step("none")
    assert not all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
