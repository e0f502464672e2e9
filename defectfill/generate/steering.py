"""Two sampling options that reach into the denoising loop: mask-guided latent blending, and several defects
painted in one pass with each token's cross-attention steered to its own mask.

Latent blending (`--latent-blend`, blended latent diffusion): after every sampler step the latents outside the
mask are replaced by the source's latents noised to the next step's level, and at the last step by the source's
clean latents; so the UNet always denoises the defect against the part as it is, and the border matches it.
`LatentBlend` is the pipeline's `callback_on_step_end`.

Joint painting (`--multi-defect joint`): one prompt with every type's token ("A bottle with <broken_large> and
<contamination>"), the union of the masks inpainted in one pipeline call, and at every cross-attention layer a
bias on the attention logits of each token's positions: 0 inside its own mask, STEER_OUTSIDE (no attention)
outside it, on the conditional rows only. Today's default paints the defects one after the other
(`writer._paint_several`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectfill.core.errors import DefectFillError
from defectfill.data.masks import fit_mask
from defectfill.model.attention import layer_grid
from defectfill.model.canvas import prepare_canvas
from defectfill.model.pipeline import token_positions, vae_scale_factor

STEER_OUTSIDE = -1e4  # a logit bias that leaves a token no attention at a query position (finite: fp16-safe)


# --------------------------------------------------------------------------- latent blending


def source_latents(pipe, images: Image.Image | Sequence[Image.Image], rows: int) -> torch.Tensor:
    """The clean latents of the canvas image(s) the pipeline inpaints, (rows, C, h, w): the VAE posterior's mean
    (one image: repeated for every row; a list: one per row)."""
    listed = [images] if isinstance(images, Image.Image) else list(images)
    device, dtype = pipe._execution_device, pipe.vae.dtype
    pixels = torch.cat([pipe.image_processor.preprocess(im, height=im.height, width=im.width) for im in listed])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(device, dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor
    if latents.shape[0] == 1 and rows > 1:
        latents = latents.expand(rows, -1, -1, -1)
    if latents.shape[0] != rows:
        raise RuntimeError(f"{latents.shape[0]} source images for {rows} rows")
    return latents


def copy_generators(generators: Sequence[torch.Generator]) -> list[torch.Generator]:
    """Generators in the same state: the pipeline's first draw (its initial noise) drawn again, without moving
    the pipeline's own generators."""
    copies = []
    for g in generators:
        c = torch.Generator(g.device)
        c.set_state(g.get_state())
        copies.append(c)
    return copies


class LatentBlend:
    """`callback_on_step_end` of a diffusers inpainting pipeline: latents outside the mask become the source's.

    `clean` (rows, C, h, w): the source's latents; `noise` (rows, C, h, w): the pipeline's initial noise (the
    same draw: `copy_generators`), so the outside follows the one trajectory x_t = add_noise(x_0, noise, t). The
    mask is the pipeline's own latent mask (its `mask` tensor: 1 where the UNet inpaints)."""

    tensor_inputs = ["latents", "mask"]

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor):
        self.clean, self.noise = clean, noise

    def __call__(self, pipe, i: int, t, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents, mask = kwargs["latents"], kwargs["mask"]
        rows = latents.shape[0]
        inside = mask[-rows:].to(latents.dtype)  # under guidance the mask is doubled; both halves are alike
        timesteps = pipe.scheduler.timesteps
        clean = self.clean.to(latents.device, latents.dtype)
        if i < len(timesteps) - 1:  # noised to the level the next step starts from
            outside = pipe.scheduler.add_noise(clean, self.noise.to(latents.device, latents.dtype),
                                               timesteps[i + 1 : i + 2].to(latents.device))
        else:
            outside = clean
        return {"latents": inside * latents + (1 - inside) * outside}


def latent_blend_kwargs(pipe, images: Image.Image | Sequence[Image.Image], generators: Sequence[torch.Generator],
                        height: int, width: int) -> dict[str, Any]:
    """The pipeline arguments that blend the latents outside the mask with the source's (`LatentBlend`)."""
    from diffusers.utils.torch_utils import randn_tensor

    rows = len(generators)
    factor = vae_scale_factor(pipe.vae)
    shape = (rows, pipe.vae.config.latent_channels, height // factor, width // factor)
    device = pipe._execution_device
    noise = randn_tensor(shape, generator=copy_generators(generators), device=device, dtype=pipe.unet.dtype)
    blend = LatentBlend(source_latents(pipe, images, rows), noise)
    return {"callback_on_step_end": blend, "callback_on_step_end_tensor_inputs": blend.tensor_inputs}


# --------------------------------------------------------------------------- attention steering


class SteeredCrossAttention:
    """Wraps a cross-attention processor: adds a bias to the logits of chosen text positions, per query cell.

    `columns`: per steered token, its text positions; `masks` (K, h, w) float: per token, 1 on the latent cells of
    its own mask. At a layer whose grid is (h_l, w_l), a cell is inside a token's mask when the mask touches it;
    outside, that token's columns get STEER_OUTSIDE. Only the last `rows` of the batch (the conditional rows under
    guidance) are steered; self-attention passes through unchanged."""

    def __init__(self, inner, columns: list[list[int]], masks: torch.Tensor, rows: int, n_keys: int):
        self.inner, self.columns, self.masks, self.rows, self.n_keys = inner, columns, masks, rows, n_keys
        self._bias: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    def bias(self, batch: int, n_query: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (batch, n_query, dtype)
        if key not in self._bias:
            h, w = layer_grid(tuple(self.masks.shape[-2:]), n_query)
            cells = F.adaptive_max_pool2d(self.masks[:, None].float(), (h, w))[:, 0].flatten(1) > 0  # (K, Nq)
            bias = torch.zeros(batch, n_query, self.n_keys)
            for k, cols in enumerate(self.columns):
                for c in cols:
                    bias[batch - self.rows :, :, c] = torch.where(cells[k], 0.0, STEER_OUTSIDE)
            self._bias[key] = bias.to(device, dtype)
        return self._bias[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == self.n_keys:
            n_query = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
            bias = self.bias(hidden_states.shape[0], n_query, hidden_states.dtype, hidden_states.device)
            attention_mask = bias if attention_mask is None else attention_mask + bias
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@contextmanager
def steered_cross_attention(unet: torch.nn.Module, columns: list[list[int]], masks: torch.Tensor, rows: int,
                            n_keys: int = 77) -> Iterator[None]:
    """Within the block, every cross-attention layer of `unet` (encoder, middle and decoder) steers each token's
    attention to its own mask (`SteeredCrossAttention`)."""
    original = dict(unet.attn_processors)
    steered = {name: SteeredCrossAttention(p, columns, masks, rows, n_keys) if ".attn2." in name else p
               for name, p in original.items()}
    unet.set_attn_processor(steered)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))  # a copy: diffusers empties the dict it is given


# --------------------------------------------------------------------------- several defects in one pass


def joint_prompt(generator, defect_types: list[str]) -> tuple[str, list[str]]:
    """The run's prompt template with every type's token in place of {token} ("A disc with <scratch> and
    <spot>"), and the tokens in order."""
    missing = [t for t in defect_types if t not in generator.type_prompts]
    if missing:
        raise DefectFillError(f"--multi-defect joint: the run draws {', '.join(generator.type_prompts)}, not "
                              f"{', '.join(missing)}; joint painting needs one run trained on every type "
                              "(one model per object).")
    tokens = [generator.type_prompts[t][1] for t in defect_types]
    prompt, token = generator.type_prompts[defect_types[0]]
    if prompt.count(token) != 1:
        raise DefectFillError(f"--multi-defect joint: the prompt {prompt!r} must name its token once.")
    return prompt.replace(token, " and ".join(tokens)), tokens


@torch.no_grad()
def paint_jointly(generator, image: Image.Image, masks: list[np.ndarray], defect_types: list[str],
                  seed: int = 0) -> tuple[Any, str]:
    """Every defect in one sampling pass: the union of `masks` inpainted with `joint_prompt`, each token steered
    to its own mask, N candidates, pasted back outside the union and chosen by Low-Fidelity Selection over the
    union. Returns (GenerationResult with the union mask, the prompt)."""
    from defectfill.generate.generator import (
        GenerationResult,
        derived_seed,
        paste_back,
        select_low_fidelity,
    )

    if len(masks) != len(defect_types) or len(masks) < 2:
        raise DefectFillError("--multi-defect joint paints two or more defect types, one mask each.")
    pipe = generator.pipe
    image = image.convert("RGB")
    own = [fit_mask(np.asarray(m, dtype=bool), image.size) for m in masks]
    if not all(m.any() for m in own):
        raise DefectFillError("a target mask is empty: draw each defect region in white.")
    union = np.logical_or.reduce(own)
    prompt, tokens = joint_prompt(generator, defect_types)
    columns = [token_positions(pipe.tokenizer, prompt, t) for t in tokens]
    factor = vae_scale_factor(pipe.vae)
    canvas, image_c, mask_c = prepare_canvas(image, union, generator.resolution, factor)
    own_c = [prepare_canvas(image, m, generator.resolution, factor)[2] for m in own]
    (sw, sh), (cw, ch) = canvas.scaled, canvas.size
    latent_masks = torch.stack([torch.from_numpy(np.asarray(m.convert("L"), dtype=np.float32) / 255.0)
                                for m in own_c])  # (K, ch, cw)
    latent_masks = F.adaptive_max_pool2d(latent_masks[:, None], (ch // factor, cw // factor))[:, 0]
    n = generator.candidates
    seeds = [derived_seed(seed, i) for i in range(n)]
    gen_device = "cpu" if generator.device.type == "mps" else generator.device
    generators = [torch.Generator(gen_device).manual_seed(s) for s in seeds]
    step_kwargs = latent_blend_kwargs(pipe, image_c, generators, ch, cw) if generator.sampling.latent_blend else {}
    joint = copy.copy(generator)  # the unconditional branch's helper encodes the generator's prompt
    joint.prompt = prompt
    with joint._unconditional_from_base(n) as prompt_kwargs, \
            steered_cross_attention(pipe.unet, columns, latent_masks.to(generator.device), n,
                                    pipe.tokenizer.model_max_length):
        out = pipe(image=image_c, mask_image=mask_c, height=ch, width=cw, num_images_per_prompt=n,
                   generator=generators, num_inference_steps=generator.steps,
                   guidance_scale=generator.guidance, output_type="np", **prompt_kwargs, **step_kwargs).images
    raw = np.clip(np.rint(out[:, :sh, :sw] * 255), 0, 255).astype(np.uint8)
    w, h = image.size
    resized = np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC))
                        if c.shape[:2] != (h, w) else c for c in raw])
    source = np.asarray(image)
    pasted = paste_back(resized, source, union, generator.feather)
    chosen, scores = (0, None) if n == 1 else select_low_fidelity(pasted, source, union, generator.scorer)
    result = GenerationResult(image=Image.fromarray(pasted[chosen]), mask=union,
                              candidates=[Image.fromarray(c) for c in pasted], scores=scores, chosen=chosen,
                              seeds=seeds)
    return result, prompt
