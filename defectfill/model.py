"""The model side of DefectFill: loading the inpainting pipeline, LoRA, the defect
token, the UNet's 9-channel input and the decoder cross-attention recorder.

The UNet of an SD inpainting model takes 9 channels in this order, exactly as
`StableDiffusionInpaintPipeline.__call__` concatenates them:
    [noisy latent (4), mask (1), masked-image latent (4)]
`unet_input` is the only place this project builds that tensor.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import math
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from defectfill.errors import DefectFillError

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-inpainting"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TOKEN_WEIGHTS_NAME = "learned_embeds.safetensors"


# --------------------------------------------------------------------------- loading


def load_pipeline(model: str, torch_dtype: torch.dtype = torch.float32):
    """Load a diffusers inpainting pipeline from a hub id or a local folder.

    Refuses a model whose UNet does not take the 9 inpainting channels.
    """
    from diffusers import StableDiffusionInpaintPipeline

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


def encode_inpaint_condition(
    vae: nn.Module,
    image: torch.Tensor,  # (B, 3, H, W) in [-1, 1]
    mask: torch.Tensor,  # (B, 1, H, W) in {0, 1}, 1 = inpaint
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask and masked-image latents, built as StableDiffusionInpaintPipeline builds them.

    Returns mask_latents (B,1,H/f,W/f) (nearest resize of the binary mask) and
    masked_image_latents (B,4,H/f,W/f) (image zeroed inside the mask in [-1, 1],
    VAE-encoded, scaled by the VAE's scaling factor).
    """
    f = vae_scale_factor(vae)
    mask = (mask >= 0.5).to(image.dtype)
    masked_image = image * (mask < 0.5)
    latent_dist = vae.encode(masked_image.to(vae.dtype)).latent_dist
    masked_image_latents = latent_dist.sample(generator) * vae.config.scaling_factor
    mask_latents = F.interpolate(mask, size=(image.shape[-2] // f, image.shape[-1] // f))
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
    if tokenizer.add_tokens([token]) != 1:
        raise DefectFillError(f"--new-token {token!r} is already a word of the tokenizer; choose a new one, e.g. '<{token}>'.")
    new_id = tokenizer.convert_tokens_to_ids(token)
    embeddings = text_encoder.get_input_embeddings()
    if new_id != embeddings.num_embeddings:
        raise DefectFillError(f"tokenizer and text encoder disagree on the vocabulary size ({new_id} vs {embeddings.num_embeddings}).")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    with torch.no_grad():
        init = embeddings.weight[init_ids].float().mean(0, keepdim=True)
    module = TokenEmbedding(embeddings, init)
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


# --------------------------------------------------------------------------- attention recorder


class _RecordingCrossAttnProcessor:
    """Cross-attention with an explicit softmax, keeping the token's probability maps (with gradient).

    Only installed on decoder cross-attention layers: 77 keys make the explicit
    softmax cheap there, and every other layer keeps PyTorch SDPA.
    """

    def __init__(self, recorder: "AttentionRecorder"):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, Nq, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, 77, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Nq, 77), softmax over keys
        self.recorder._record(probs.view(batch, attn.heads, n_query, -1))

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def decoder_cross_attention_names(unet: nn.Module) -> list[str]:
    """Processor names of the cross-attention layers in the UNet's up blocks."""
    return [name for name in unet.attn_processors if name.startswith("up_blocks.") and ".attn2." in name]


class AttentionRecorder:
    """Records the [V*] token's cross-attention maps in the UNet decoder.

    Usage per forward pass:
        recorder.start(token_weights)   # (B', 77): weight of each text position, rows for the first B' samples
        unet(...)
        maps = recorder.aggregate(latent_hw, size)   # (B', size, size), each in [0, 1]
    The maps keep their autograd graph, so a loss on them trains the LoRA.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.names = decoder_cross_attention_names(unet)
        if not self.names:
            raise DefectFillError("this UNet has no cross-attention layers in its up blocks; cannot record attention.")
        self._original = dict(unet.attn_processors)
        processor = _RecordingCrossAttnProcessor(self)
        unet.set_attn_processor({n: (processor if n in self.names else p) for n, p in self._original.items()})
        self.token_weights: torch.Tensor | None = None
        self.maps: list[torch.Tensor] = []

    def start(self, token_weights: torch.Tensor | None) -> None:
        self.token_weights = token_weights
        self.maps = []

    def stop(self) -> None:
        """Drop the recorded maps. The token weights stay set: gradient checkpointing re-runs the
        forward during backward, and the recomputation must do exactly what the forward did."""
        self.maps = []

    def _record(self, probs: torch.Tensor) -> None:  # probs: (B, heads, Nq, 77)
        if self.token_weights is None:
            return
        w = self.token_weights.to(probs.dtype)
        # token column(s), mean over heads -> (B', Nq)
        self.maps.append(torch.einsum("bhqk,bk->bq", probs[: w.shape[0]], w) / probs.shape[1])

    def aggregate(self, latent_hw: tuple[int, int], size: int | tuple[int, int]) -> torch.Tensor:
        """Resize every recorded map to `size`, average over layers, normalise each sample by its max."""
        if not self.maps:
            raise RuntimeError("no attention maps recorded: call start(token_weights) before the UNet forward")
        size = (size, size) if isinstance(size, int) else size
        lh, lw = latent_hw
        resized = []
        for m in self.maps:
            factor = math.sqrt(lh * lw / m.shape[1])
            h, w = round(lh / factor), round(lw / factor)
            resized.append(F.interpolate(m.float().view(-1, 1, h, w), size=size, mode="bilinear", align_corners=False))
        mean = torch.stack(resized).mean(0)[:, 0]  # (B', *size)
        peak = mean.flatten(1).amax(1).clamp_min(1e-8)
        return mean / peak[:, None, None]

    def remove(self) -> None:
        """Put the original processors back (a copy: diffusers empties the dict it is given)."""
        self.unet.set_attn_processor(dict(self._original))


# --------------------------------------------------------------------------- tiny pipeline


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_folder() -> str:
    """Write the real CLIP BPE vocabulary (shipped in the open_clip_torch wheel) as vocab.json + merges.txt."""
    import importlib.util

    # Found, not imported: importing open_clip pulls in timm and more, and only its data file is needed.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DefectFillError("the tiny test pipeline needs the CLIP vocabulary from open_clip_torch: "
                              "pip install open_clip_torch")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    # byte-level alphabet, as CLIP defines it
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    alphabet = [chr(c) for c in cs]
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="defectfill-clip-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps({html.unescape(t): i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "!", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }))
    return str(folder)


def clip_tokenizer():
    """The CLIP BPE tokenizer (49408 tokens, pad "!", 77 positions), built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_clip_tokenizer_folder())


def build_tiny_pipeline(seed: int = 0):
    """A small SD-inpainting-shaped pipeline with random weights, built from configs (no download).

    Same structure as SD2 inpainting: 9-channel UNet with cross-attention in its
    decoder at two resolutions, a VAE with scaling factor 0.18215 (factor-4
    latents), a CLIP text encoder on the real CLIP vocabulary, DDIM with SD2's
    schedule. For tests, benchmarks and the demo: untrained, so its images are noise.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=9, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=(2, 4, 4), use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=49406,
            eos_token_id=49407, pad_token_id=0,
        ))
    return assemble_inpaint_pipeline(unet, vae, text_encoder)


def assemble_inpaint_pipeline(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module):
    """An inpainting pipeline of these networks with the CLIP tokenizer and SD2's DDIM schedule."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
    )
    return StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder that `--model` accepts."""
    folder = Path(folder)
    build_tiny_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder
