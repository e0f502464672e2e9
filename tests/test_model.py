"""Model side: loading, the 9-channel UNet input order, LoRA, the token, the attention recorder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from defectfill.core.errors import DefectFillError
from defectfill.model.attention import (
    AttentionRecorder,
    ExplicitAttnProcessor,
    decoder_cross_attention_names,
    layer_grid,
    token_attention_map,
)
from defectfill.model.pipeline import (
    add_lora,
    add_trainable_token,
    dilate_to_latent_cells,
    encode_inpaint_condition,
    latent_cell_mask,
    load_pipeline,
    token_positions,
    unet_input,
)
from defectfill.model.tiny import build_tiny_pipeline


def test_load_pipeline_from_saved_folder_offline(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(str(tiny_model_dir))
    assert isinstance(pipe, StableDiffusionInpaintPipeline)
    assert pipe.unet.config.in_channels == 9
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.pad_token == "!"


def _stock_unet_input(pipe, image: Image.Image, mask_np: np.ndarray, monkeypatch) -> torch.Tensor:
    """The 9-channel input StableDiffusionInpaintPipeline's own path gives its UNet at the first step."""
    seen = []
    original_forward = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(sample.detach().clone())
        return original_forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe(prompt="a", image=image, mask_image=Image.fromarray(mask_np), height=64, width=64,
         num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    monkeypatch.setattr(pipe.unet, "forward", original_forward)
    return seen[0]


def _as_tensors(image: Image.Image, mask_np: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    image_t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return image_t, torch.from_numpy(mask_np.astype(np.float32) / 255)[None, None]


def test_unet_input_order_matches_the_stock_pipeline(tiny_model_dir, monkeypatch):
    """The UNet sees [noisy latent, mask, masked-image latent], exactly as StableDiffusionInpaintPipeline builds it.

    The mask is made of whole latent cells (4x4 px in the tiny model), where the stock pipeline's nearest
    resize and this project's any-touched-pixel reduction agree (a thin mask: the next test)."""
    # The posterior's mean instead of a sample, so both paths are deterministic.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = load_pipeline(str(tiny_model_dir))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask_np = np.zeros((64, 64), dtype=np.uint8)
    mask_np[8:32, 20:48] = 255  # whole 4x4 cells
    stock = _stock_unet_input(pipe, image, mask_np, monkeypatch)  # (1, 9, 16, 16)
    image_t, mask_t = _as_tensors(image, mask_np)
    with torch.no_grad():
        mask_lat, masked_lat = encode_inpaint_condition(pipe.vae, image_t, mask_t)
    ours = unet_input(stock[:, :4], mask_lat, masked_lat)
    assert ours.shape == (1, 9, 16, 16)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    # and the mask channel really is the mask (a swapped order would put latents there)
    assert torch.equal(stock[:, 4:5], mask_lat)
    assert set(stock[:, 4].unique().tolist()) == {0.0, 1.0}


def test_thin_mask_covers_every_touched_latent_cell_and_matches_the_grown_mask_in_the_pipeline(tiny_model_dir,
                                                                                              monkeypatch):
    """Pins: a mask thinner than a latent cell is in the mask channel wherever it touches a cell, and the masked
    image is grey over those whole cells; generation reproduces it by giving the stock pipeline the mask grown to
    whole cells (`dilate_to_latent_cells`). Nearest sampling (the stock pipeline on the raw mask) keeps none of a
    1 px line off the sampled pixel column."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = load_pipeline(str(tiny_model_dir))
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask_np = np.zeros((64, 64), dtype=np.uint8)
    mask_np[5:59, 13] = 255  # a 1 px vertical scratch in cell column 3, off its sampled pixel (column 12)
    mask_np[30, 2:62] = 255  # a 1 px horizontal one in cell row 7, off row 28
    image_t, mask_t = _as_tensors(image, mask_np)
    touched = torch.nn.functional.max_pool2d(mask_t, 4)  # cells with any mask pixel
    assert touched.sum() == 14 + 16 - 1  # cell rows 1..14 of column 3, cell columns 0..15 of row 7
    with torch.no_grad():
        mask_lat, masked_lat = encode_inpaint_condition(pipe.vae, image_t, mask_t)
    assert torch.equal(mask_lat, touched)
    assert torch.equal(latent_cell_mask(mask_t, 4), touched)
    grown = dilate_to_latent_cells(mask_t, 4)
    assert torch.equal(grown >= mask_t, torch.ones_like(grown, dtype=torch.bool)) and grown.sum() == 16 * touched.sum()
    # the stock pipeline given the grown mask builds exactly this condition
    stock = _stock_unet_input(pipe, image, (grown[0, 0].numpy() * 255).astype(np.uint8), monkeypatch)
    torch.testing.assert_close(stock[:, 4:], torch.cat([mask_lat, masked_lat], 1), atol=1e-5, rtol=1e-5)
    # the raw thin mask in the stock pipeline: nearest sampling drops the whole scratch from the mask channel
    raw = _stock_unet_input(pipe, image, mask_np, monkeypatch)
    assert raw[:, 4].sum() == 0


def test_refuses_a_non_inpainting_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_pipeline()
    cfg = dict(pipe.unet.config)
    cfg["in_channels"] = 4
    pipe.unet = UNet2DConditionModel.from_config(cfg)
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(tmp_path / "text2img")
    with pytest.raises(DefectFillError, match="4 input channels.*inpainting UNet takes 9"):
        load_pipeline(str(tmp_path / "text2img"))


def test_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DefectFillError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))


def test_lora_targets_exactly_the_design_modules():
    """Pins the LoRA: every UNet attention layer (self and cross) carries it on exactly to_q, to_k, to_v and
    to_out.0, every text-encoder attention on exactly q_proj, k_proj, v_proj and out_proj, all of rank 8 with
    alpha = rank (scale 1), and nothing else trains. (The old test, `all(name ends with one of them)`, passed
    with a target missing.)"""
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    pipe = build_tiny_pipeline()
    add_lora(pipe.unet, pipe.text_encoder, rank=8)
    for model, kind, targets in ((pipe.unet, Attention, {"to_q", "to_k", "to_v", "to_out.0"}),
                                 (pipe.text_encoder, CLIPAttention, {"q_proj", "k_proj", "v_proj", "out_proj"})):
        attention = [n for n, m in model.named_modules() if isinstance(m, kind)]
        adapted = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                parent, _, leaf = name.rpartition(".")
                if leaf == "0" and parent.endswith(".to_out"):  # to_out is a ModuleList: [Linear, Dropout]
                    parent, leaf = parent[: -len(".to_out")], "to_out.0"
                adapted.setdefault(parent, set()).add(leaf)
                assert module.r["default"] == 8 and module.lora_alpha["default"] == 8, name
                assert module.scaling["default"] == 1.0, name
        assert attention and sorted(adapted) == sorted(attention)
        assert all(leaves == targets for leaves in adapted.values()), adapted
        assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_recorder_only_on_decoder_cross_attention():
    pipe = build_tiny_pipeline()
    names = decoder_cross_attention_names(pipe.unet)
    assert names and all(n.startswith("up_blocks.") and ".attn2." in n for n in names)
    recorder = AttentionRecorder(pipe.unet)
    processors = pipe.unet.attn_processors
    for name, processor in processors.items():
        recorded = isinstance(processor, ExplicitAttnProcessor) and processor.on_probs == recorder._record
        assert recorded == (name in names), name
    recorder.remove()
    assert not any(isinstance(p, ExplicitAttnProcessor) for p in pipe.unet.attn_processors.values())
    recorder.remove()  # idempotent: diffusers empties the dict it is given, so a copy must be passed
    assert len(pipe.unet.attn_processors) == len(processors)


def test_recorder_output_matches_sdpa_and_maps_carry_gradient():
    pipe = build_tiny_pipeline()
    add_lora(pipe.unet, pipe.text_encoder, rank=4)
    with torch.no_grad():  # make the LoRA non-zero so the gradient check is meaningful
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(2, 9, 16, 16)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        reference = pipe.unet(x, t, encoder_hidden_states=text).sample
    recorder = AttentionRecorder(pipe.unet)
    weights = torch.zeros(1, 77)
    weights[0, 4] = 1.0
    recorder.start(weights)
    out = pipe.unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    maps = recorder.aggregate((16, 16), 4)
    assert maps.shape == (1, 4, 4)
    assert torch.isclose(maps.amax(), torch.tensor(1.0))
    assert len(recorder.maps) == len(recorder.names)
    maps.sum().backward()
    to_k = [p.grad for n, p in pipe.unet.named_parameters() if "up_blocks" in n and "attn2.to_k.lora_B" in n]
    assert to_k and all(g is not None and g.abs().sum() > 0 for g in to_k)


def test_every_cell_of_a_64x64_map_moves_the_attention_loss():
    """Pins the map reduction at 512 px (latent 64, decoder maps 16, 32 and 64, loss maps 16x16): raising any one
    cell of the 64x64 map changes L_attn. Bilinear shrinking without antialiasing read only 2 of every 4 rows and
    columns, so 3 of 4 cells of that map took no part in the loss."""
    from defectfill.train.losses import attention_loss

    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, s * s, generator=gen) for s in (16, 32, 64)]
    mask = torch.zeros(1, 1, 512, 512)
    mask[..., 100:300, 200:260] = 1
    base = attention_loss(token_attention_map(maps, (64, 64), 16), mask)
    n = 64 * 64
    bumped = maps[2].expand(n, -1) + 0.5 * torch.eye(n)  # row i: cell i of the 64x64 map raised
    out = token_attention_map([maps[0].expand(n, -1), maps[1].expand(n, -1), bumped], (64, 64), 16)
    target = torch.nn.functional.interpolate(mask, size=(16, 16), mode="area")[:, 0]
    per_row = ((out - target) ** 2).mean(dim=(1, 2))  # attention_loss of each row on its own
    torch.testing.assert_close(attention_loss(out[:1], mask), per_row[0])
    moved = (per_row - base).abs() > 1e-7
    assert bool(moved.all()), f"{int((~moved).sum())} of {n} cells do not move L_attn"


def test_layer_grids_of_a_non_square_latent():
    """Maps of a non-square latent go back on their own grids (the UNet halves each side, rounding up)."""
    assert layer_grid((60, 100), 60 * 100) == (60, 100)
    assert layer_grid((60, 100), 30 * 50) == (30, 50)
    assert layer_grid((60, 100), 15 * 25) == (15, 25)
    assert layer_grid((60, 100), 8 * 13) == (8, 13)
    maps = [torch.rand(2, 30 * 50), torch.rand(2, 15 * 25)]
    out = token_attention_map(maps, (60, 100), (15, 25))
    assert out.shape == (2, 15, 25) and torch.allclose(out.flatten(1).amax(1), torch.ones(2))
    with pytest.raises(DefectFillError, match="no level"):
        layer_grid((60, 100), 7)


def test_token_positions_and_trainable_token_row():
    pipe = build_tiny_pipeline()
    tok = pipe.tokenizer
    assert token_positions(tok, "A photo of sks", "sks") == [4]
    assert token_positions(tok, "A metal nut with sks", "sks") == [5]
    with pytest.raises(DefectFillError, match="does not appear"):
        token_positions(tok, "A photo of a nut", "sks")
    base = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    emb = add_trainable_token(tok, pipe.text_encoder, "<hole>")
    ids = tok("A photo of <hole>").input_ids
    assert 49408 in ids and len(tok) == 49409
    out = pipe.text_encoder(torch.tensor([ids]))[0]
    # not out.sum(): the final LayerNorm makes that constant, so its gradient is 0
    (out * torch.randn_like(out)).sum().backward()
    assert emb.new_rows.grad is not None and emb.new_rows.grad.abs().sum() > 0
    assert not emb.base.weight.requires_grad
    assert torch.equal(emb.base.weight, base)
    with pytest.raises(DefectFillError, match="already a word"):
        add_trainable_token(tok, pipe.text_encoder, "<hole>")


# --------------------------------------------------------------------------- the built-in base


def test_defectfill_mini_is_shipped_as_safetensors_under_30_mb_and_loads_by_name():
    """`--model defectfill-mini` names the package's own folder, through the real from_pretrained path; the
    weights are safetensors only (nothing pickled) and at most 30 MB, so the wheel stays small."""
    from defectfill.model.pipeline import builtin_model_dir, resolve_model

    folder = builtin_model_dir("defectfill-mini")
    assert resolve_model("defectfill-mini") == str(folder)
    weights = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) <= 30e6
    assert not (folder / "checkpoints").exists()
    pipe = load_pipeline("defectfill-mini")
    assert pipe.unet.config.in_channels == 9 and pipe.vae.config.scaling_factor != 0.18215  # measured, not SD's


def test_a_missing_builtin_base_names_the_fix(tmp_path, monkeypatch):
    import defectfill.model.pipeline as model

    monkeypatch.setattr(model, "builtin_model_dir", lambda name: tmp_path / name)
    with pytest.raises(DefectFillError, match="pretrain-base --output DIR"):
        load_pipeline("defectfill-mini")
    assert model.resolve_model("some/hub-id") == "some/hub-id"  # other names pass through unchanged


def test_sampling_follows_the_base_unless_the_user_sets_it(tmp_path):
    """A base's defectfill_sampling.json fills what the user left unset; what the user sets wins; a base without
    one (SD2 from the hub) gets the paper's 50 steps, guidance 7.5, the object prompt and stock CFG."""
    from defectfill.config.sampling import PAPER_SAMPLING, read_base_sampling, resolve_sampling, write_base_sampling

    base = tmp_path / "base"
    base.mkdir()
    write_base_sampling(base, {"prompt": "A photo of {token}", "guidance": 3.0, "unconditional": "base"})
    assert resolve_sampling(str(base)) == {"prompt": "A photo of {token}", "guidance": 3.0, "steps": 50,
                                           "unconditional": "base"}
    assert resolve_sampling(str(base), guidance=1.0, prompt="A {object} with {token}", steps=None,
                            unconditional="tuned") == {"prompt": "A {object} with {token}", "guidance": 1.0,
                                                       "steps": 50, "unconditional": "tuned"}
    assert resolve_sampling("sd2-community/stable-diffusion-2-inpainting") == PAPER_SAMPLING
    assert read_base_sampling(str(tmp_path / "no-such-folder")) == {}
    assert read_base_sampling("defectfill-mini")  # the built-in base ships its recommendation


@pytest.mark.parametrize("content, words", [
    ('{"guidance": "high"}', "guidance 'high' must be a number"),
    ('{"prompt": "A photo of sks"}', "must be a prompt template with {token}"),
    ('{"cfg": 3}', "unknown key 'cfg'"),
    ('[1, 2]', "must be a JSON object"),
    ('{"steps": 0', "cannot read"),
])
def test_a_bad_base_sampling_file_is_named_with_the_fix(tmp_path, content, words):
    from defectfill.config.sampling import BASE_SAMPLING_NAME, read_base_sampling

    (tmp_path / BASE_SAMPLING_NAME).write_text(content)
    with pytest.raises(DefectFillError, match=re.escape(words)) as info:
        read_base_sampling(str(tmp_path))
    assert BASE_SAMPLING_NAME in str(info.value)


def test_generate_records_the_sampling_it_used_from_the_base(tmp_path, tiny_model_dir, demo_root):
    """`generate` with no sampling flags on a run whose base recommends guidance 2 and 3 steps samples so, and
    generate.json records those values, not None; a flag the user gives wins."""
    import json
    import shutil

    from helpers import write_run

    from defectfill.config.sampling import write_base_sampling
    from defectfill.config.stages import GenerateConfig
    from defectfill.generate.writer import run_generate

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    write_base_sampling(base, {"guidance": 2.0, "steps": 3, "prompt": "A photo of {token}"})
    run = write_run(tmp_path / "run", base, demo_root)
    for name, flags in (("unset", {}), ("set", {"guidance": 1.0, "steps": 2})):
        out = tmp_path / name
        settings = GenerateConfig(run=str(run), output=str(out), count=1, candidates=1, **flags)
        assert run_generate(settings) == 0
        recorded = json.loads((out / "generate.json").read_text())["config"]
        row = json.loads(next(out.rglob("manifest.jsonl")).read_text().splitlines()[0])
        expected = {"guidance": 2.0, "steps": 3} if name == "unset" else flags
        assert {k: recorded[k] for k in expected} == expected, name
        assert recorded["prompt"] == "A photo of {token}"
        assert row["prompt"] == "A photo of sks"


def test_one_network_builder_for_every_shape_and_the_tiny_pipeline_is_it():
    from defectfill.model.networks import SD2, TINY, build_networks

    pipe = build_tiny_pipeline(3)
    unet, vae, text_encoder = build_networks(TINY, 64, 3)
    for built, piped in ((unet, pipe.unet), (vae, pipe.vae), (text_encoder, pipe.text_encoder)):
        a, b = built.state_dict(), piped.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert SD2.latent_size(512) == 64 and TINY.latent_size(64) == 16


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_diffusion_target_follows_the_prediction_type(prediction):
    from diffusers import DDPMScheduler

    from defectfill.model.networks import diffusion_target

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    target = diffusion_target(sched, latents, noise, t)
    expected = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, t)
    assert torch.equal(target, expected)


def test_an_unknown_prediction_type_is_refused_before_training(demo_root, tiny_model_dir, tmp_path):
    from diffusers import DDPMScheduler

    from defectfill.model.networks import diffusion_target
    from defectfill.model.pipeline import load_pipeline
    from defectfill.train.trainer import train

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    with pytest.raises(DefectFillError, match=r"predicts 'sample'.*epsilon or v_prediction"):
        diffusion_target(sched, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    from helpers import tiny_config

    pipe = load_pipeline(str(tiny_model_dir))
    pipe.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(DefectFillError, match="predicts 'sample'"):
        train(tiny_config(demo_root, tmp_path / "run", tiny_model_dir), pipe=pipe)
    assert not (tmp_path / "run").exists()  # refused before anything was written
