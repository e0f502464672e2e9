"""DefectFill's three losses (docs/method.md, "The losses").

Shapes: eps, eps_hat (B, C, h, w) latent-size; masks (B, 1, h, w) latent-size
unless noted. Masked means are taken per sample, then averaged over the batch,
so a sample with a small defect weighs as much as one with a large defect
(docs/method.md gives the per-sample formula and this reading for a batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from defectfill.model.attention import resize_map, token_attention_map, token_maps_by_scale


def masked_mse(eps: torch.Tensor, eps_hat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(W * (eps - eps_hat)^2) / (C * sum(W)) per sample, averaged over the batch."""
    channels = eps.shape[1]
    err = (eps.float() - eps_hat.float()) ** 2  # (B, C, h, w)
    num = (weight * err).sum(dim=(1, 2, 3))
    den = channels * weight.sum(dim=(1, 2, 3))
    # A defect too small to survive the latent resize has no weight: it contributes 0, not NaN.
    return (num / den.clamp_min(1e-8)).mean()


def defect_loss(eps: torch.Tensor, eps_hat: torch.Tensor, defect_mask: torch.Tensor) -> torch.Tensor:
    """L_def: mean squared error over the defect region M."""
    return masked_mse(eps, eps_hat, defect_mask)


def object_loss(eps: torch.Tensor, eps_hat: torch.Tensor, defect_mask: torch.Tensor, alpha: float,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_obj: error weighted by M' = M + alpha * (1 - M) over the whole image (M: the real defect mask).

    `valid` (B, 1, h, w), 0 on letterbox padding (a non-square reference in its training square): the
    padding is no part of the image, so its weight is 0 there (M' = M + alpha * (1 - M) * valid).
    """
    rest = 1.0 - defect_mask if valid is None else (1.0 - defect_mask) * valid
    return masked_mse(eps, eps_hat, defect_mask + alpha * rest)


def attention_target(defect_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) defect mask -> (B, s, s): area-resized, then divided by its maximum, like the map it is compared
    with. Without that, a 1 px line at 512 px covers at most 3 % of a 16 x 16 cell, so a max-normalised map
    (its peak is 1) could never reach the target and the loss rewards one hot cell."""
    target = F.interpolate(defect_mask.float(), size=size, mode="area")[:, 0]
    return target / target.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)


def attention_loss(attention_maps: torch.Tensor, defect_mask: torch.Tensor) -> torch.Tensor:
    """L_attn: mean((A - M)^2), A (B, s, s) in [0, 1], M (B, 1, H, W) as `attention_target` (max 1)."""
    target = attention_target(defect_mask, tuple(attention_maps.shape[-2:]))
    return ((attention_maps.float() - target) ** 2).mean()


def multi_scale_attention_loss(scale_maps: list[torch.Tensor], defect_mask: torch.Tensor) -> torch.Tensor:
    """L_attn over every decoder grid (`--attn-scales all`): the mean of `attention_loss` of each grid's map against
    the mask at that grid, so the finer layers are held to the mask at their own resolution, not only through
    their share of one coarse average."""
    return torch.stack([attention_loss(m, defect_mask) for m in scale_maps]).mean()


def attention_consistency(scale_maps: list[torch.Tensor]) -> torch.Tensor:
    """Agreement between scales: each grid's map area-resized to the coarsest grid and divided by its max, then the
    mean squared deviation from their mean. 0 when the scales agree (or there is one scale)."""
    coarsest = tuple(scale_maps[0].shape[-2:])
    resized = []
    for m in scale_maps:
        r = resize_map(m.float(), coarsest)
        resized.append(r / r.flatten(1).amax(1).clamp_min(1e-8)[:, None, None])
    stacked = torch.stack(resized)  # (S, B, h, w)
    return ((stacked - stacked.mean(0, keepdim=True)) ** 2).mean()


def attention_terms(token_maps: list[torch.Tensor], latent_hw: tuple[int, int], defect_mask: torch.Tensor,
                    scales: str, size: int, consistency: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_attn, the consistency term) from the token's per-layer decoder maps (B, Nq_l), as both training steps
    compute them. scales "coarsest": one map, every layer averaged on the `size` grid; "all": one per grid."""
    zero = torch.zeros((), device=defect_mask.device)
    by_scale = token_maps_by_scale(token_maps, latent_hw) if scales == "all" or consistency else None
    if scales == "all":
        l_attn = multi_scale_attention_loss(by_scale, defect_mask)
    else:
        l_attn = attention_loss(token_attention_map(token_maps, latent_hw, size), defect_mask)
    return l_attn, attention_consistency(by_scale) if consistency else zero


def decoded_pixel_loss(decoded: torch.Tensor, images: torch.Tensor, defect_mask: torch.Tensor) -> torch.Tensor:
    """The perceptual term (`--lambda-perceptual`): mean |decoded - image| inside the defect mask, per sample then
    over the batch; decoded (B, 3, H, W) is the VAE decoding of the predicted clean latents, images and the mask
    (B, 1, H, W) at pixel size. In pixels, not latents: a thin defect the latent loss spreads over a cell is
    judged where it is drawn."""
    err = (decoded.float() - images.float()).abs()
    m = defect_mask.float()
    return ((m * err).sum(dim=(1, 2, 3)) / (err.shape[1] * m.sum(dim=(1, 2, 3))).clamp_min(1e-8)).mean()


@dataclass
class LossTerms:
    defect: torch.Tensor
    object: torch.Tensor
    attention: torch.Tensor
    total: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the optional terms, each already in `total`

    def detached(self) -> dict[str, torch.Tensor]:
        """Every term by name, the optional ones that are on included (train.log and metrics.jsonl log them)."""
        named = {k: getattr(self, k).detach() for k in ("defect", "object", "attention", "total")}
        return {**named, **{k: v.detach() for k, v in self.extras.items()}}


def combine(
    l_def: torch.Tensor, l_obj: torch.Tensor, l_attn: torch.Tensor,
    lambda_def: float, lambda_obj: float, lambda_attn: float,
    extras: dict[str, tuple[torch.Tensor, float]] | None = None,
) -> LossTerms:
    """L = lambda_def * L_def + lambda_obj * L_obj + lambda_attn * L_attn (defaults 0.5, 0.2, 0.05), plus each
    optional term of `extras` (name -> (term, weight)) whose weight is positive; a 0 weight adds nothing, so the
    step is today's exactly."""
    total = lambda_def * l_def + lambda_obj * l_obj + lambda_attn * l_attn
    kept = {}
    for name, (term, weight) in (extras or {}).items():
        if weight > 0:
            total = total + weight * term
            kept[name] = term
    return LossTerms(l_def, l_obj, l_attn, total, kept)
