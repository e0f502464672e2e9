"""The model side of DefectFill: loading the inpainting pipeline, LoRA, the defect
token and the UNet's 9-channel input. (The attention recorder is in `attention.py`,
the tiny offline pipeline in `tiny.py`, the sampling canvas in `canvas.py`, the
model and weight file names in `names.py`.)

The UNet of an SD inpainting model takes 9 channels in this order, exactly as
`StableDiffusionInpaintPipeline.__call__` concatenates them:
    [noisy latent (4), mask (1), masked-image latent (4)]
`unet_input` is the only place this project builds that tensor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from defectfill.core.errors import DefectFillError
from defectfill.model.names import BUILTIN_MODELS, DEFAULT_MODEL, LORA_WEIGHTS_NAME, TOKEN_WEIGHTS_NAME  # noqa: F401

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# --------------------------------------------------------------------------- loading


def builtin_model_dir(name: str) -> Path:
    """The package-data folder of a built-in base, e.g. `defectfill/models/defectfill-mini`."""
    return Path(__file__).resolve().parent.parent / "models" / name


def resolve_model(model: str) -> str:
    """A built-in name (`defectfill-mini`) becomes its package folder; anything else is returned as given.

    A local folder of that name wins, as a path always does.
    """
    if model in BUILTIN_MODELS and not Path(model).exists():
        folder = builtin_model_dir(model)
        if not (folder / "model_index.json").is_file():
            raise DefectFillError(
                f"--model {model}: the built-in base is not in this install ({folder} has no model_index.json). "
                f"Reinstall defectfill from a release or a full git checkout, or make one with "
                f"`defectfill pretrain-base --output DIR` and pass --model DIR."
            )
        return str(folder)
    return model


def load_pipeline(model: str, torch_dtype: torch.dtype = torch.float32):
    """Load a diffusers inpainting pipeline from a hub id, a local folder or a built-in name (`defectfill-mini`).

    Refuses a model whose UNet does not take the 9 inpainting channels.
    """
    from diffusers import StableDiffusionInpaintPipeline

    model = resolve_model(model)
    path = Path(model).expanduser()
    source = str(path) if path.exists() else model
    if path.exists() and not (path / "model_index.json").is_file():
        raise DefectFillError(
            f"{path}: not a diffusers pipeline folder (no model_index.json). Pass --model a folder saved with "
            "`save_pretrained`, or a hub id such as " + DEFAULT_MODEL + "."
        )
    # fp32 is the default of every diffusers version; only pass a dtype when another is wanted.
    dtype_kwargs = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionInpaintPipeline.from_pretrained(
                source, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **dtype_kwargs
            )
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DefectFillError(
            f"cannot load the inpainting pipeline {model!r}: {str(exc).splitlines()[0]}. "
            "Check the hub id and your network, or pass --model a local diffusers folder."
        ) from None
    check_inpainting_unet(pipe.unet, model)
    return pipe


def check_inpainting_unet(unet: nn.Module, name: str = "model") -> None:
    in_channels = unet.config.in_channels
    if in_channels != 9:
        raise DefectFillError(
            f"{name}: its UNet takes {in_channels} input channels, but an inpainting UNet takes 9 "
            "(noisy latent 4 + mask 1 + masked-image latent 4). Use an inpainting model such as "
            f"{DEFAULT_MODEL}."
        )


def vae_scale_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------- 9-channel input


def unet_input(noisy_latents: torch.Tensor, mask_latents: torch.Tensor, masked_image_latents: torch.Tensor) -> torch.Tensor:
    """(B,4,h,w), (B,1,h,w), (B,4,h,w) -> (B,9,h,w) in the order the inpainting UNet was trained on."""
    return torch.cat([noisy_latents, mask_latents, masked_image_latents], dim=1)


def latent_cell_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B,1,H,W) mask in {0,1} -> (B,1,H/f,W/f): 1 in every latent cell that any mask pixel touches.

    A max reduction over each f x f cell, not the stock pipeline's nearest resize, which keeps one
    pixel per cell: a scratch narrower than a cell would survive only where it crosses those pixels
    (at 512 px, 16 % of the cells a 2 px line touches, 46 % for 8 px lines).
    """
    h, w = mask.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"mask of {h}x{w} px is not a whole number of {factor}x{factor} latent cells")
    return F.max_pool2d(mask, kernel_size=factor, stride=factor)


def dilate_to_latent_cells(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B,1,H,W) mask in {0,1} -> the same mask grown to whole f x f latent cells, at pixel size.

    Given to the stock pipeline as its mask image, its nearest resize then yields exactly
    `latent_cell_mask(mask)` and its masked image is grey over the same cells, as in training.
    """
    return F.interpolate(latent_cell_mask(mask, factor), scale_factor=factor, mode="nearest")


def encode_inpaint_condition(
    vae: nn.Module,
    image: torch.Tensor,  # (B, 3, H, W) in [-1, 1]
    mask: torch.Tensor,  # (B, 1, H, W) in {0, 1}, 1 = inpaint
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask and masked-image latents, as StableDiffusionInpaintPipeline builds them from a mask
    grown to whole latent cells.

    Returns mask_latents (B,1,H/f,W/f) (1 in every cell the mask touches, `latent_cell_mask`) and
    masked_image_latents (B,4,H/f,W/f) (image zeroed over those whole cells in [-1, 1], VAE-encoded,
    scaled by the VAE's scaling factor). Departure from the stock pipeline, on purpose: it resizes the
    mask with nearest sampling, so a defect thinner than a cell mostly vanished from the mask channel
    while the masked image was still grey there. For a mask made of whole cells both agree
    (tests/test_model.py), and generation hands the pipeline the grown mask (`canvas.prepare_canvas`).
    """
    f = vae_scale_factor(vae)
    mask = (mask >= 0.5).to(image.dtype)
    mask_latents = latent_cell_mask(mask, f)
    masked_image = image * (F.interpolate(mask_latents, scale_factor=f, mode="nearest") < 0.5)
    latent_dist = vae.encode(masked_image.to(vae.dtype)).latent_dist
    masked_image_latents = latent_dist.sample(generator) * vae.config.scaling_factor
    return mask_latents, masked_image_latents


# --------------------------------------------------------------------------- LoRA


def add_lora(unet: nn.Module, text_encoder: nn.Module | None, rank: int = 8) -> None:
    """Add rank-`rank` LoRA to the UNet attention projections and the text encoder (alpha = rank, scale 1)."""
    from peft import LoraConfig

    # freeze first: afterwards exactly the LoRA tensors require grad
    unet.requires_grad_(False)
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    if text_encoder is not None:
        text_encoder.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TEXT_LORA_TARGETS)
        )


def save_lora_weights(directory: str | Path, unet: nn.Module, text_encoder: nn.Module | None) -> None:
    """Write ``pytorch_lora_weights.safetensors`` in the format `load_lora_weights(directory)` accepts."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = None
    if text_encoder is not None:
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    StableDiffusionInpaintPipeline.save_lora_weights(
        str(directory), unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        weight_name=LORA_WEIGHTS_NAME, safe_serialization=True,
    )


# a merged layer must carry its LoRA change to within this fraction of the change (relative L2 error of the
# weight change the stored merged weight holds); bf16 rounds a change under 0.2-0.4 % of a weight away
MERGE_TOLERANCE = 0.5


@dataclass(frozen=True)
class LoraMerge:
    """What `merge_lora_layers` did: the LoRA layers folded into their weights, and those kept as LoRA layers
    (by name) because their weights' dtype cannot hold the change."""

    merged: int
    kept: tuple[str, ...]


def _lora_delta(layer: nn.Module) -> torch.Tensor | None:
    """The fp32 weight change of a plain PEFT LoRA Linear with one active adapter; None for anything else
    (DoRA and other variants, several adapters, already merged), which then stays a LoRA layer."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear) or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
    delta = (b @ a) * layer.scaling[name]
    return delta.T if layer.fan_in_fan_out else delta


def merge_lora_layers(*models: nn.Module, tolerance: float = MERGE_TOLERANCE) -> LoraMerge:
    """Fold each LoRA layer of `models` into the weight it adapts, where that weight's dtype can hold the change.

    The change is added in fp32 and rounded once to the weight's dtype. Where the rounded weight misses the change
    by more than `tolerance` of it (relative L2; in bf16 a change of about 0.3 % of the weights or less mostly
    rounds back to the base weight), the layer stays a LoRA layer and adds the change at run time, as an unmerged model does.
    The merged layers are replaced by their base layers; with none kept, the models' LoRA bookkeeping is left to
    the caller (`unload_lora_weights`)."""
    from peft.tuners.lora import LoraLayer

    merged, kept = 0, []
    for model in models:
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
            delta = _lora_delta(layer)
            base = layer.get_base_layer()
            if delta is not None:
                weight = base.weight
                rounded = (weight.float() + delta).to(weight.dtype)
                error = (rounded.float() - weight.float() - delta).norm() / delta.norm().clamp_min(1e-30)
                if error <= tolerance or not delta.any():
                    with torch.no_grad():
                        weight.copy_(rounded)
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, base)
                    merged += 1
                    continue
            kept.append(f"{type(model).__name__}.{name}")
    return LoraMerge(merged, tuple(kept))


# --------------------------------------------------------------------------- defect token


class TokenEmbedding(nn.Module):
    """The text encoder's token embedding plus new rows that are trained on their own.

    The original table stays frozen; ids >= its size look up `new_rows`, a separate
    fp32 parameter. Only those rows can change, even under AdamW weight decay
    (which would otherwise shrink every row of a shared table).
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.base_size = base.num_embeddings
        self.new_rows = nn.Parameter(new_rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight for dtype/device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base_size - 1))
        # No early return when no id is new: `bool(is_new.any())` would stall a GPU once per text-encoder call.
        is_new = input_ids >= self.base_size
        new = self.new_rows[(input_ids - self.base_size).clamp(min=0)].to(out.dtype)
        return torch.where(is_new[..., None], new, out)


def add_trainable_token(tokenizer, text_encoder: nn.Module, token: str, init_word: str = "sks") -> TokenEmbedding:
    """Add `token` to the tokenizer as one new id and give it a trainable embedding row.

    The row starts from the mean embedding of `init_word`'s sub-tokens.
    """
    return add_trainable_tokens(tokenizer, text_encoder, [token], init_word)


def add_trainable_tokens(tokenizer, text_encoder: nn.Module, tokens: list[str], init_word: str = "sks",
                         what: str = "--new-token") -> TokenEmbedding:
    """Add each of `tokens` to the tokenizer as one new id, with one trainable embedding row each (row i: tokens[i]).

    Every row starts from the mean embedding of `init_word`'s sub-tokens (one model per object: each defect
    type's token starts alike and learns from its own references only).
    """
    for token in tokens:
        # A word the tokenizer already has (as an entry, or encoded as one existing token) is no new word:
        # adding it would either do nothing or shadow a trained row.
        known = tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id)
        if known or len(tokenizer(token, add_special_tokens=False).input_ids) == 1:
            raise DefectFillError(f"{what} {token!r} is already a word of the tokenizer; choose a new one, "
                                  f"e.g. '<{token.strip('<>')}>' (or use --token {token} to learn the existing word).")
    if len(set(tokens)) != len(tokens) or tokenizer.add_tokens(list(tokens)) != len(tokens):
        raise DefectFillError(f"{what}: the new words {', '.join(tokens)} are not all new and distinct.")
    embeddings = text_encoder.get_input_embeddings()
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    expected = list(range(embeddings.num_embeddings, embeddings.num_embeddings + len(tokens)))
    if new_ids != expected:
        raise DefectFillError(f"tokenizer and text encoder disagree on the vocabulary size ({new_ids[0]} vs "
                              f"{embeddings.num_embeddings}).")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    with torch.no_grad():
        init = embeddings.weight[init_ids].float().mean(0, keepdim=True)
    module = TokenEmbedding(embeddings, init.repeat(len(tokens), 1))
    text_encoder.set_input_embeddings(module)
    return module


def token_positions(tokenizer, prompt: str, token: str) -> list[int]:
    """Indices of `token`'s sub-tokens in the 77-token encoding of `prompt`."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    sub = tokenizer(token, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise DefectFillError(f"the token {token!r} does not appear in the prompt {prompt!r}; put {{token}} in the prompt.")
