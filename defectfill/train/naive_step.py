"""The straightforward (slow) DefectFill step, kept to check and time the fast step of `trainer.py` against.

This is how the public re-implementations structure a step: one UNet call per
branch, one text-encoder call and one masked-image VAE call per branch, and an
attention store on EVERY attention layer (self and cross, explicit softmax,
full probability tensors kept). The token's maps are then read from the
decoder cross-attention entries of the store. The explicit-softmax processor
and the map aggregation are the ones the fast step uses (`attention.py`). Unlike those versions, the maps
keep their gradient here, so the three losses and their gradients must equal
`defectfill_losses` to float tolerance (tests/test_fast_path.py checks it) and
`benchmarks/train_step.py` can time it as the "naive" step.

Every random draw is taken from the micro-batch generator in the same order
and with the same shapes as `defectfill_losses`, so both see identical inputs.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import torch.nn as nn

from defectfill.model.attention import (
    ExplicitAttnProcessor,
    coarsest_cross_attention_side,
    is_decoder_cross_attention,
)
from defectfill.model.networks import diffusion_target, predicted_clean_latents
from defectfill.model.pipeline import dilate_to_latent_cells, latent_cell_mask, unet_input, vae_scale_factor
from defectfill.train import losses as L


class AttentionStore:
    """Keeps every attention layer's probabilities of every UNet call since the last `reset`.

        with AttentionStore(unet) as store:   # every processor replaced while inside
            store.reset(); unet(...); maps = store.maps["up_blocks.1....attn2.processor"]
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.maps: dict[str, list[torch.Tensor]] = {}
        self._previous: dict | None = None

    def __enter__(self) -> "AttentionStore":
        self._previous = dict(self.unet.attn_processors)
        self.unet.set_attn_processor({n: ExplicitAttnProcessor(functools.partial(self.add, n)) for n in self._previous})
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self._previous)
        self.maps = {}

    def add(self, name: str, probs: torch.Tensor) -> None:
        self.maps.setdefault(name, []).append(probs)

    def reset(self) -> None:
        self.maps = {}

    def decoder_cross_attention(self) -> list[torch.Tensor]:
        """The last call's probabilities of every up-block cross-attention layer, (B, heads, Nq, 77) each."""
        return [v[-1] for n, v in self.maps.items() if is_decoder_cross_attention(n)]


def token_maps(layer_probs: list[torch.Tensor], token_weights: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the weighted token column(s) averaged over heads: (B, heads, Nq, 77) -> (B, Nq)."""
    return [(probs * token_weights.to(probs.dtype)[:, None, None, :]).sum(-1).mean(1) for probs in layer_probs]


def naive_losses(models, batch, prompts, config, device: torch.device, store: AttentionStore,
                 autocast=nullcontext) -> L.LossTerms:
    """The three losses the slow way; `store` must be entered (installed on `models.unet`)."""
    from diffusers.utils.torch_utils import randn_tensor

    vae, unet, sched = models.vae, models.unet, models.noise_scheduler
    b = batch.images.shape[0]
    gen = batch.generator
    images = batch.images.to(device, vae.dtype)
    branch_masks = [batch.masks.to(device), batch.box_masks.to(device)]  # defect branch, object branch
    sf = vae.config.scaling_factor
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(gen) * sf
        f = vae_scale_factor(vae)
        lat_shape = (2 * b, latents.shape[1], images.shape[-2] // f, images.shape[-1] // f)
        # the fast path samples both branches' posteriors in one (2B) draw; draw the same tensor here
        post_noise = randn_tensor(lat_shape, generator=gen, device=device, dtype=vae.dtype)
        conds = []
        for i, m in enumerate(branch_masks):  # one VAE call per branch
            m = (m >= 0.5).to(images.dtype)
            # the mask grown to every latent cell it touches, for both the mask channel and the masked image
            cells = dilate_to_latent_cells(m, f)
            dist = vae.encode(images * (cells < 0.5)).latent_dist
            masked_latents = (dist.mean + dist.std * post_noise[i * b:(i + 1) * b]) * sf
            conds.append((latent_cell_mask(m, f), masked_latents))
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=gen).to(device)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = diffusion_target(sched, latents, noise, timesteps)
    lh, lw = latents.shape[-2:]
    unet_call, text_encoder = models.callables()

    preds, maps = [], None
    consistency = config.lambda_attn_consistency > 0
    with autocast():
        for i, (mask_lat, masked_lat) in enumerate(conds):  # one text call and one UNet call per branch
            text = text_encoder(prompts.input_ids[i:i + 1].to(device))[0].expand(b, -1, -1)
            store.reset()
            pred = unet_call(unet_input(noisy, mask_lat, masked_lat).to(unet.dtype), timesteps,
                             encoder_hidden_states=text).sample
            preds.append(pred.float())
            if i == 0 and (config.lambda_attn > 0 or consistency):
                weights = prompts.token_weights.to(device).expand(b, -1)
                maps = L.attention_terms(token_maps(store.decoder_cross_attention(), weights), (lh, lw),
                                         batch.masks.to(device), config.attn_scales,
                                         config.attn_size or coarsest_cross_attention_side(unet, lh), consistency)
        decoded = None
        if config.lambda_perceptual > 0:  # the defect branch's x0 prediction, decoded with its graph
            x0 = predicted_clean_latents(sched, noisy.float(), preds[0], timesteps)
            decoded = vae.decode((x0 / sf).to(vae.dtype)).sample
    m_lat = conds[0][0].float()
    l_def = L.defect_loss(target, preds[0], m_lat)
    valid = None
    if batch.valid is not None:  # latent cells wholly on the image (letterbox padding weighs 0 in L_obj)
        valid = 1.0 - latent_cell_mask(1.0 - batch.valid.to(device).float(), vae_scale_factor(vae))
    l_obj = L.object_loss(target, preds[1], m_lat, config.alpha, valid)
    zero = torch.zeros((), device=device)
    l_attn, l_cons = maps if maps is not None else (zero, zero)
    extras = {"attention_consistency": (l_cons, config.lambda_attn_consistency)}
    if decoded is not None:
        extras["perceptual"] = (L.decoded_pixel_loss(decoded, images, batch.masks.to(device)), config.lambda_perceptual)
    return L.combine(l_def, l_obj, l_attn, config.lambda_def, config.lambda_obj, config.lambda_attn, extras)
