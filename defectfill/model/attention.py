"""Cross-attention maps of the defect token: one explicit-softmax processor and the map aggregation.

`ExplicitAttnProcessor` computes attention with an explicit softmax and hands
the probabilities (with their autograd graph) to a callback. Both the fast
training step (`AttentionRecorder`, decoder cross-attention only) and the
naive step (`naive_step.AttentionStore`, every layer) use it, so both read the
same probabilities. `token_attention_map` turns per-layer token maps into the
one map the attention loss compares with the mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defectfill.core.errors import DefectFillError

ProbsCallback = Callable[[torch.Tensor], None]  # (B, heads, Nq, Nk) attention probabilities


class ExplicitAttnProcessor:
    """diffusers attention with an explicit softmax whose probabilities go to `on_probs` (graph kept)."""

    def __init__(self, on_probs: ProbsCallback):
        self.on_probs = on_probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if encoder_hidden_states is None:  # self-attention
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, Nq, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, Nk, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Nq, Nk), softmax over keys
        self.on_probs(probs.view(batch, attn.heads, n_query, -1))

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_decoder_cross_attention(name: str) -> bool:
    """Whether a processor name is a cross-attention layer of the UNet's up blocks."""
    return name.startswith("up_blocks.") and ".attn2." in name


def decoder_cross_attention_names(unet: nn.Module) -> list[str]:
    """Processor names of the cross-attention layers in the UNet's up blocks."""
    return [name for name in unet.attn_processors if is_decoder_cross_attention(name)]


def coarsest_cross_attention_side(unet: nn.Module, latent_side: int) -> int:
    """The side of the coarsest grid among the UNet decoder's cross-attention layers at this latent side: up block
    i of n works at the latent grid halved n-1-i times (rounding up). 8 for defectfill-mini at 64 px, 16 for SD2
    at 512 px. The attention loss's maps default to it: a finer map only spreads the coarsest layers' cells."""
    types = list(unet.config.up_block_types)
    first = next((i for i, t in enumerate(types) if "CrossAttn" in t), len(types) - 1)
    side = latent_side
    for _ in range(len(types) - 1 - first):
        side = (side + 1) // 2
    return max(1, side)


def layer_grid(latent_hw: tuple[int, int], n_query: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with `n_query` positions: the latent grid halved (rounding up, as the
    UNet's stride-2 convolutions do) until it has that many cells."""
    h, w = latent_hw
    while h * w > n_query and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_query:
        raise DefectFillError(f"an attention map of {n_query} positions is no level of the {latent_hw} latent grid")
    return h, w


def resize_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, *size). Shrinking takes the mean over each target cell's area (every source cell
    counts once, and gets gradient); enlarging is bilinear (antialiased along a side that shrinks)."""
    h, w = maps.shape[-2:]
    if (h, w) == tuple(size):
        return maps
    if h >= size[0] and w >= size[1]:
        return F.interpolate(maps[:, None], size=size, mode="area")[:, 0]
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)[:, 0]


def token_attention_map(token_maps: list[torch.Tensor], latent_hw: tuple[int, int],
                        size: int | tuple[int, int]) -> torch.Tensor:
    """Per-layer token maps (B, Nq_l) -> one map (B, *size) in [0, 1].

    Each map is put back on its grid (the latent grid shrunk by the layer's factor), resized to
    `size` by `resize_map` (an area mean when shrinking), averaged over layers, and divided per
    sample by its max. An area mean, not a plain bilinear resize: bilinear without antialiasing reads
    2 of every 4 rows and columns when shrinking by 4 (a 64x64 map to 16x16 at 512 px), so only a
    quarter of that map's cells would take part in L_attn or get gradient.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = []
    for m in token_maps:
        h, w = layer_grid(latent_hw, m.shape[1])
        resized.append(resize_map(m.float().reshape(-1, h, w), size))
    mean = torch.stack(resized).mean(0)  # (B, *size)
    peak = mean.flatten(1).amax(1).clamp_min(1e-8)
    return mean / peak[:, None, None]


def token_maps_by_scale(token_maps: list[torch.Tensor], latent_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Per-layer token maps (B, Nq_l) -> one map per grid, coarsest first: (B, h_s, w_s), the mean of that grid's
    layers, divided per sample by its max (as `token_attention_map` does for the one map)."""
    by_grid: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in token_maps:
        h, w = layer_grid(latent_hw, m.shape[1])
        by_grid.setdefault((h, w), []).append(m.float().reshape(-1, h, w))
    out = []
    for grid in sorted(by_grid, key=lambda g: g[0] * g[1]):
        mean = torch.stack(by_grid[grid]).mean(0)
        out.append(mean / mean.flatten(1).amax(1).clamp_min(1e-8)[:, None, None])
    return out


class AttentionRecorder:
    """Records the [V*] token's cross-attention maps in the UNet decoder.

    Usage per forward pass:
        recorder.start(token_weights)   # (B', 77): weight of each text position, rows for the first B' samples
        unet(...)
        maps = recorder.aggregate(latent_hw, size)   # (B', size, size), each in [0, 1]
    The maps keep their autograd graph, so a loss on them trains the LoRA. Only decoder
    cross-attention gets the explicit-softmax processor (77 keys make it cheap there); every
    other layer keeps PyTorch SDPA.

    With `running_hw` (a latent grid; sampling, where the maps of every step are averaged), each
    map is instead added at once, resized to that grid, to a running sum, and `running_mean`
    returns the average: memory stays one latent-size map per row however many layers and steps
    run, where keeping them all (or resizing each to the image) grows with both.
    """

    def __init__(self, unet: nn.Module, running_hw: tuple[int, int] | None = None):
        self.unet = unet
        self.names = decoder_cross_attention_names(unet)
        if not self.names:
            raise DefectFillError("this UNet has no cross-attention layers in its up blocks; cannot record attention.")
        self._original = dict(unet.attn_processors)
        processor = ExplicitAttnProcessor(self._record)
        unet.set_attn_processor({n: (processor if n in self.names else p) for n, p in self._original.items()})
        self.token_weights: torch.Tensor | None = None
        self.maps: list[torch.Tensor] = []
        self.running_hw = running_hw
        self._sum: torch.Tensor | None = None  # (B', *running_hw), float32, running mode only
        self._count = 0

    def start(self, token_weights: torch.Tensor | None) -> None:
        self.token_weights = token_weights
        self.maps = []
        self._sum, self._count = None, 0

    def stop(self) -> None:
        """Drop the recorded maps. The token weights stay set: gradient checkpointing re-runs the
        forward during backward, and the recomputation must do exactly what the forward did."""
        self.maps = []
        self._sum, self._count = None, 0

    def _record(self, probs: torch.Tensor) -> None:  # probs: (B, heads, Nq, 77)
        if self.token_weights is None:
            return
        w = self.token_weights.to(probs.dtype)
        # token column(s), mean over heads -> (B', Nq)
        token_map = torch.einsum("bhqk,bk->bq", probs[: w.shape[0]], w) / probs.shape[1]
        if self.running_hw is None:
            self.maps.append(token_map)
            return
        h, w_ = layer_grid(self.running_hw, token_map.shape[1])
        on_grid = resize_map(token_map.float().reshape(-1, h, w_), self.running_hw)
        self._sum = on_grid if self._sum is None else self._sum + on_grid
        self._count += 1

    def aggregate(self, latent_hw: tuple[int, int], size: int | tuple[int, int]) -> torch.Tensor:
        """The recorded maps as one (B', *size) map per sample, see `token_attention_map`."""
        if not self.maps:
            raise RuntimeError("no attention maps recorded: call start(token_weights) before the UNet forward")
        return token_attention_map(self.maps, latent_hw, size)

    def by_scale(self, latent_hw: tuple[int, int]) -> list[torch.Tensor]:
        """The recorded maps as one map per decoder grid, coarsest first, see `token_maps_by_scale`."""
        if not self.maps:
            raise RuntimeError("no attention maps recorded: call start(token_weights) before the UNet forward")
        return token_maps_by_scale(self.maps, latent_hw)

    def running_mean(self) -> torch.Tensor:
        """Running mode: the mean of every map since `start`, (B', *running_hw), divided per row by its max."""
        if self._sum is None:
            raise RuntimeError("no attention maps recorded: call start(token_weights) before the UNet forward")
        mean = self._sum / self._count
        return mean / mean.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]

    def remove(self) -> None:
        """Put the original processors back (a copy: diffusers empties the dict it is given)."""
        self.unet.set_attn_processor(dict(self._original))
