"""The three networks of an SD-inpainting-shaped pipeline, built from one shape: the offline tiny pipeline
(`TINY`: tests, benchmarks, the demo), the pretrained base defectfill-mini (`MINI`: `defectfill pretrain-base`'s
default architecture) and SD2 inpainting itself (`SD2`: its published configuration, for timings on the real
shapes without a download). Random weights; what differs between them is only the numbers of `NetworkShape`.

Every shape has SD2's structure: a 9-channel UNet (noisy latents, mask, masked-image latents) with
cross-attention in all but its lowest level, a VAE with scaling factor 0.18215, a CLIP text encoder.

The diffusion target of a noise scheduler (`diffusion_target`) lives here too: training and pretraining
regress the UNet's prediction on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkShape:
    """The numbers of the three networks; the structure is SD2 inpainting's."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_heads: tuple[int, ...]  # attention_head_dim per level
    vae_channels: tuple[int, ...]  # n levels: latents 2**(n-1) times smaller than the image
    vae_layers: int
    text_hidden: int  # also the UNet's cross_attention_dim
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_projection: int
    unet_groups: int = 32
    vae_groups: int = 32
    vocab_size: int = 49408  # CLIP's BPE; its last two rows are <|startoftext|> and <|endoftext|>

    def latent_size(self, image_size: int) -> int:
        return image_size // 2 ** (len(self.vae_channels) - 1)


TINY = NetworkShape(unet_channels=(32, 64, 64), unet_layers=1, unet_heads=(2, 4, 4), unet_groups=8,
                    vae_channels=(16, 32, 32), vae_layers=1, vae_groups=8, text_hidden=32, text_intermediate=64,
                    text_layers=2, text_heads=4, text_projection=32)
# `pretrain.base.BaseArch`'s defaults; the reduced tokenizer sets the vocabulary size (`vocab_size`)
MINI = NetworkShape(unet_channels=(48, 96, 96), unet_layers=1, unet_heads=(4, 8, 8), unet_groups=16,
                    vae_channels=(32, 64, 64), vae_layers=1, vae_groups=16, text_hidden=128, text_intermediate=512,
                    text_layers=4, text_heads=4, text_projection=128)
# docs/sd2-inpainting-architecture.md
SD2 = NetworkShape(unet_channels=(320, 640, 1280, 1280), unet_layers=2, unet_heads=(5, 10, 20, 20),
                   vae_channels=(128, 256, 512, 512), vae_layers=2, text_hidden=1024, text_intermediate=4096,
                   text_layers=23, text_heads=16, text_projection=512)
SHAPES = {"tiny": TINY, "mini": MINI, "sd2": SD2}


def build_unet(shape: NetworkShape, image_size: int):
    from diffusers import UNet2DConditionModel

    n = len(shape.unet_channels)
    return UNet2DConditionModel(
        sample_size=shape.latent_size(image_size), in_channels=9, out_channels=4,
        layers_per_block=shape.unet_layers, block_out_channels=shape.unet_channels,
        norm_num_groups=shape.unet_groups, cross_attention_dim=shape.text_hidden,
        attention_head_dim=shape.unet_heads, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )


def build_vae(shape: NetworkShape, image_size: int):
    from diffusers import AutoencoderKL

    n = len(shape.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=shape.vae_layers, norm_num_groups=shape.vae_groups, sample_size=image_size,
        scaling_factor=0.18215,
    )


def build_text_encoder(shape: NetworkShape, vocab_size: int | None = None):
    """CLIP's text model; `vocab_size` (default the shape's) is the tokenizer's, whose last two rows are the
    start and end tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = vocab_size or shape.vocab_size
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads, max_position_embeddings=77,
        projection_dim=shape.text_projection, hidden_act="gelu", bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=0,
    ))


def build_networks(shape: NetworkShape, image_size: int, seed: int = 0, vocab_size: int | None = None):
    """(unet, vae, text_encoder) of `shape` for `image_size` px images, with random weights drawn under `seed`
    (in this order: the order decides the weights), the global random state left as it was."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = build_unet(shape, image_size)
        vae = build_vae(shape, image_size)
        text_encoder = build_text_encoder(shape, vocab_size)
    return unet, vae, text_encoder


PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(scheduler) -> None:
    """Refuse a scheduler whose prediction type `diffusion_target` cannot train (before any work starts)."""
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTION_TYPES:
        from defectfill.core.errors import DefectFillError

        raise DefectFillError(f"the model's noise scheduler predicts {prediction!r}; defectfill trains "
                              f"{' or '.join(PREDICTION_TYPES)} models only.")


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet learns to predict for `latents` noised with `noise` at `timesteps`: the noise itself
    (epsilon prediction) or the velocity (v-prediction), as the scheduler's config says; any other prediction
    type (e.g. "sample") is refused, naming the supported ones, instead of being trained as epsilon."""
    check_prediction_type(scheduler)
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def predicted_clean_latents(scheduler, noisy, prediction, timesteps):
    """The clean latents x0 the UNet's `prediction` at `timesteps` implies for `noisy` (epsilon or v-prediction):
    eps: (x_t - sqrt(1 - a) eps) / sqrt(a); v: sqrt(a) x_t - sqrt(1 - a) v, with a the cumulative alpha."""
    import torch

    check_prediction_type(scheduler)
    alphas = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    a, s = alphas.sqrt(), (1.0 - alphas).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return a * noisy - s * prediction
    return (noisy - s * prediction) / a
