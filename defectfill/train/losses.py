"""DefectFill's three losses (docs/method.md, "The losses").

Shapes: eps, eps_hat (B, C, h, w) latent-size; masks (B, 1, h, w) latent-size
unless noted. Masked means are taken per sample, then averaged over the batch,
so a sample with a small defect weighs as much as one with a large defect
(docs/method.md gives the per-sample formula and this reading for a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


@dataclass
class LossTerms:
    defect: torch.Tensor
    object: torch.Tensor
    attention: torch.Tensor
    total: torch.Tensor

    def detached(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach() for k in ("defect", "object", "attention", "total")}


def combine(
    l_def: torch.Tensor, l_obj: torch.Tensor, l_attn: torch.Tensor,
    lambda_def: float, lambda_obj: float, lambda_attn: float,
) -> LossTerms:
    """L = lambda_def * L_def + lambda_obj * L_obj + lambda_attn * L_attn (defaults 0.5, 0.2, 0.05)."""
    total = lambda_def * l_def + lambda_obj * l_obj + lambda_attn * l_attn
    return LossTerms(l_def, l_obj, l_attn, total)
