"""Offline perception networks made from a base model's own VAE encoder (for `defectfill-mini`).

KID and IC-LPIPS normally use Inception-V3 and AlexNet trained on ImageNet, which an offline machine
does not have. The VAE encoder of a pretrained base (for `defectfill-mini`: trained on the drawn world
to reconstruct images) is a feature network that is available wherever the base is. It is no
substitute for Inception on real photographs: numbers made with it compare methods on the same data,
and are not comparable to published KID or IC-LPIPS values.

- `EncoderFeatures`: KID features, the mean and standard deviation over space of each channel of the
  encoder's hidden state after its middle block (2 x channels numbers per image), scaled to norm sqrt(D).
- `encoder_distance`: an LPIPS-shaped distance without learned layer weights: at the output of every
  encoder down block and of the middle block, channels are unit-normalised per position, the squared
  difference is averaged over space and channels, and the levels are averaged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from defectfill.evaluate.metrics.ic_lpips import Distance


def base_metric_networks(model: str) -> tuple[nn.Module, Distance]:
    """(KID feature extractor, IC-LPIPS distance) from the VAE encoder of a base (a folder or `defectfill-mini`)."""
    from diffusers import AutoencoderKL

    from defectfill.model.pipeline import resolve_model

    vae = AutoencoderKL.from_pretrained(resolve_model(model), subfolder="vae")
    return EncoderFeatures(vae), encoder_distance(vae)


def _encoder_levels(vae: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """x in [-1, 1] (N, 3, H, W) -> the hidden state after each down block and after the middle block."""
    enc = vae.encoder
    h = enc.conv_in(x)
    levels = []
    for block in enc.down_blocks:
        h = block(h)
        levels.append(h)
    h = enc.mid_block(h)
    levels.append(h)
    return levels


class EncoderFeatures(nn.Module):
    """KID features from a VAE encoder: uint8 (N, 3, H, W) -> (N, 2C), resized to `size` first."""

    def __init__(self, vae: nn.Module, size: int = 64):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        h = _encoder_levels(self.vae, x.to(next(self.vae.parameters()).dtype))[-1]  # (N, C, h, w)
        feats = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1).float()  # (N, D)
        # each vector scaled to norm sqrt(D): KID's kernel (x.y / D + 1)^3 then sees dot products in [-1, 1],
        # as with Inception's pooled features; the raw encoder values are large enough to swamp it
        return F.normalize(feats, dim=1) * feats.shape[1] ** 0.5


def encoder_distance(vae: nn.Module) -> Distance:
    """The IC-LPIPS `Distance` from a VAE encoder: (N, 3, H, W) x2 in [-1, 1] -> (N,)."""
    vae = vae.eval().requires_grad_(False)

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = next(vae.parameters()).dtype
        total = torch.zeros(a.shape[0])
        levels = list(zip(_encoder_levels(vae, a.to(dtype)), _encoder_levels(vae, b.to(dtype)), strict=True))
        for fa, fb in levels:
            fa = F.normalize(fa.float(), dim=1, eps=1e-8)
            fb = F.normalize(fb.float(), dim=1, eps=1e-8)
            total += (fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2)).cpu()
        return total / len(levels)

    return distance
