"""`defectfill pretrain-base`: pretrain a small SD2-inpainting-shaped base (`defectfill-mini`, issue 10) on the world.

Two stages, both on images drawn by `defectfill.pretrain.world`:

1. the VAE (AutoencoderKL, factor-4 latents): L1 + L2 reconstruction and a small
   KL term, AdamW with a short warm-up and a cosine decay;
2. the 9-channel inpainting UNet (cross-attention in its decoder) and the CLIP
   text encoder, trained together with the epsilon objective under SD2's DDPM
   schedule, on (world image, inpainting mask, caption); the VAE frozen.
   The text encoder is trained, not frozen: a randomly initialised encoder
   carries no meaning to keep, and the fine-tune later learns a token and a
   LoRA in it, which needs an encoder whose output the UNet actually reads.
   Empty captions (the world's 10 %) teach the unconditional branch.

Between the stages the VAE's latent scaling factor is measured (1 / std of the
latents of 256 world images, as SD did), and written to its config.

The networks are `defectfill.model.networks`' builders on the arch's `NetworkShape`, the
objective's target its `diffusion_target`. Every random draw of step k of stage s comes from
generators seeded by (seed, s, k), and checkpoints (`outputs.checkpoints`' stage checkpoints:
safetensors + JSON, written to a temporary folder and renamed) hold the weights and the optimiser
state, so `--resume` continues
exactly where the last checkpoint was: a run stopped and resumed gives the
same weights as one uninterrupted. `--max-minutes` stops a run cleanly with a
checkpoint (for sessions whose commands have a time limit). At the end,
`assemble_inpaint_pipeline(unet, vae, text_encoder).save_pretrained(DIR)` writes
a folder that `defectfill.model.load_pipeline` (and so `--model`) loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectfill.config.settings import Settings, coerce, flag
from defectfill.config.stages import MAX_BATCH, MAX_SEED, MAX_SIDE, MAX_STEPS
from defectfill.core.atomic import replace_dir, write_json
from defectfill.core.errors import DefectFillError
from defectfill.model.networks import NetworkShape, build_text_encoder, build_unet, build_vae, diffusion_target
from defectfill.outputs.checkpoints import (
    STAGE_STATE,
    STAGE_WEIGHTS,
    latest_stage_checkpoint,
    load_optimizer,
    save_optimizer,
    stage_checkpoint_name,
    write_checkpoint_folder,
)

COMMAND = "pretrain-base"
STATE_NAME = "pretrain.json"


def _arch_field(default: Any, help_text: str, low: int = 1, high: int = 4096) -> Any:
    """A BaseArch field: its default, help and the bounds of its number (of each number, for a tuple)."""
    return field(default=default, metadata={"help": help_text, "min": low, "max": high})


@dataclass
class BaseArch:
    """The architecture of the base: small enough for a CPU pretraining, same structure as SD2 inpainting.

    The defaults make 26.6 MB of fp32 safetensors (VAE 3.8, UNet 13.2, text encoder 9.7), under the issue's
    30 MB; UNet (64, 128, 128) with text 64 would be 40 MB. `check` refuses a shape the networks cannot be
    built with (or would build narrower than asked) before any work.
    """

    vae_channels: tuple[int, ...] = _arch_field((32, 64, 64), "VAE width per level (levels: factor-4 latents "
                                                "for three)")
    vae_layers: int = _arch_field(1, "VAE blocks per level", high=64)
    vae_groups: int = _arch_field(16, "VAE norm groups (divides every VAE width)")
    unet_channels: tuple[int, ...] = _arch_field((48, 96, 96), "UNet width per level (at least two levels)")
    unet_layers: int = _arch_field(1, "UNet blocks per level", high=64)
    unet_groups: int = _arch_field(16, "UNet norm groups (divides every UNet width)")
    unet_heads: tuple[int, ...] = _arch_field((4, 8, 8), "attention heads per UNet level (each divides its width)")
    # also the UNet's cross_attention_dim
    text_hidden: int = _arch_field(128, "text encoder width (the UNet's cross-attention width)")
    text_layers: int = _arch_field(4, "text encoder layers", high=256)
    text_heads: int = _arch_field(4, "text encoder attention heads (divides its width)")
    # "mini": CLIP's BPE cut to the world's and the prompts' words (`mini_tokenizer_folder`, ~1k rows);
    # "clip": all 49408 rows, which at this width would be most of the text encoder's weights, untrained
    text_vocab: str = field(default="mini", metadata={"help": "tokenizer vocabulary", "choices": ("mini", "clip")})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseArch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DefectFillError(f"unknown architecture setting(s): {', '.join(unknown)}")
        arch = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        arch.check()
        return arch

    def check(self) -> None:
        """Each field's type and declared bounds, then what the builders need of them together: norm groups
        that divide every width, heads that divide theirs, one head count per UNet level."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if "choices" in meta:
                if value not in meta["choices"]:
                    raise DefectFillError(f"--arch {f.name} {value!r}: choose one of {', '.join(meta['choices'])}.")
                continue
            many = isinstance(f.default, tuple)
            numbers = value if many and isinstance(value, tuple) else (value,)
            wanted = "a list of whole numbers" if many else "a whole number"
            if (many and (not isinstance(value, tuple) or not value)) or \
                    any(isinstance(n, bool) or not isinstance(n, int) for n in numbers):
                raise DefectFillError(f"--arch {f.name}: expected {wanted}, got {value!r}.")
            bad = [n for n in numbers if not meta["min"] <= n <= meta["max"]]
            if bad:
                each = "each " if many else ""
                raise DefectFillError(f"--arch {f.name} {value!r}: {each}must be in [{meta['min']}, {meta['max']}].")
        problems = [
            (len(self.unet_channels) >= 2, f"unet_channels {self.unet_channels}: needs at least two levels (the "
                                           "decoder's cross-attention is in all but the lowest)"),
            (len(self.unet_heads) == len(self.unet_channels),
             f"unet_heads {self.unet_heads}: one head count per UNet level ({len(self.unet_channels)})"),
            (all(c % self.vae_groups == 0 for c in self.vae_channels),
             f"vae_channels {self.vae_channels}: each must be divisible by vae_groups {self.vae_groups}"),
            (all(c % self.unet_groups == 0 for c in self.unet_channels),
             f"unet_channels {self.unet_channels}: each must be divisible by unet_groups {self.unet_groups}"),
            (all(c % h == 0 for c, h in zip(self.unet_channels, self.unet_heads, strict=False)),
             f"unet_channels {self.unet_channels}: each must be divisible by its unet_heads {self.unet_heads} "
             "(otherwise attention is built narrower than the level)"),
            (self.text_hidden % self.text_heads == 0,
             f"text_hidden {self.text_hidden}: must be divisible by text_heads {self.text_heads}"),
        ]
        for ok, problem in problems:
            if not ok:
                raise DefectFillError(f"--arch {problem}.")


TINY_ARCH = BaseArch(vae_channels=(8, 16, 16), vae_groups=4, unet_channels=(16, 32, 32), unet_groups=8,
                     unet_heads=(2, 4, 4), text_hidden=16, text_layers=1, text_heads=2)

# Words a prompt is likely to hold beyond the world's captions: DefectFill's templates and tokens, MVTec AD's
# and VisA's objects and defect words. Each becomes one token as in CLIP (its embedding row untrained unless
# the world uses it); any other word still tokenizes, in smaller pieces.
PROMPT_WORDS = (
    "a an the photo of with and on in sks defect defects anomaly normal good object surface texture "
    "bottle cable capsule carpet grid hazelnut leather nut pill screw tile toothbrush transistor wood zipper "
    "candle capsules cashew chewinggum fryum macaroni pcb pipe weave disc part "
    "scratch scratches spot spots crack cracks hole holes stain dent cut broken bent missing color colour "
    "contamination fold glue poke print thread rough squeeze faulty misplaced damaged large small liquid"
)


def mini_tokenizer_folder() -> str:
    """The folder of the base's reduced CLIP tokenizer (`tiny.reduced_tokenizer_folder`) for the world's words
    and `PROMPT_WORDS`."""
    from defectfill.model.tiny import reduced_tokenizer_folder
    from defectfill.pretrain.world import caption_words

    return reduced_tokenizer_folder(tuple(sorted(set(caption_words()) | set(PROMPT_WORDS.split()))))


def tokenizer_folder(arch: BaseArch) -> str:
    from defectfill.model.tiny import _clip_tokenizer_folder

    return mini_tokenizer_folder() if arch.text_vocab == "mini" else _clip_tokenizer_folder()


@dataclass
class PretrainSettings(Settings):
    """`defectfill pretrain-base`'s settings; each bound declared on its field (`config.settings`), checked by
    `check` with the flag named, the architecture's by `BaseArch.check`."""

    output: str = field(default="", metadata={"help": "folder for checkpoints and the finished pipeline"})
    size: int = field(default=64, metadata={"help": "image side in pixels (multiple of 8, at least 32)", "min": 32,
                                            "max": MAX_SIDE})
    # measured on 2 CPU cores at 64 px, batch 16 (default BaseArch): stage 1 25-27 img/s, stage 2 34-41 img/s,
    # so about 20-21 + 46-55 minutes (plus checkpoints) for these defaults, inside the 90 minutes
    vae_steps: int = field(default=2000, metadata={"help": "stage 1 steps (VAE)", "min": 1, "max": MAX_STEPS})
    unet_steps: int = field(default=5000, metadata={"help": "stage 2 steps (UNet and text encoder)", "min": 1,
                                                    "max": MAX_STEPS})
    batch_size: int = field(default=16, metadata={"help": "images per step", "min": 1, "max": MAX_BATCH})
    seed: int = field(default=0, metadata={"help": "random seed (weights and every step's draws)", "min": 0,
                                           "max": MAX_SEED})
    vae_lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the VAE", "above": 0, "max": 1})
    unet_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of the UNet and text encoder",
                                                   "above": 0, "max": 1})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps", "min": 0, "max": MAX_STEPS})
    kl_weight: float = field(default=1e-6, metadata={"help": "weight of the VAE's KL term", "min": 0})
    edge_weight: float = field(default=1.0, metadata={"help": "weight of the VAE's image-gradient L1 term "
                                                              "(keeps thin lines)", "min": 0})
    # Min-SNR-gamma loss weighting (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction; it
    # down-weights the easy low-noise steps and converges faster, which matters on a CPU budget. 0 = off.
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR-gamma loss weighting (0: off)", "min": 0})
    # v-prediction (as SD 2's 768 px models): at high noise an epsilon-predicting UNet must get epsilon nearly
    # exact for its image estimate to hold the colours of the unmasked surround (errors grow by
    # sqrt((1 - abar) / abar), about 13 at t = 950); measured on this base at 3000 of 7000 UNet steps, the
    # epsilon objective still repainted whole images in other colours. With v the surround is read off directly.
    prediction_type: str = field(default="v_prediction", metadata={"help": "what the UNet predicts",
                                                                   "choices": ("v_prediction", "epsilon")})
    save_every: int = field(default=250, metadata={"help": "checkpoint every N steps", "min": 1, "max": MAX_STEPS})
    arch: BaseArch = field(default_factory=BaseArch, metadata={"help": "architecture (BaseArch fields)"})

    required = ("output",)

    def check(self) -> None:
        """Every setting before any work: `validate`, with a settings machinery message naming the flag."""
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # a hand-made instance gets the type checks a command line gets
            value = getattr(self, f.name)
            if f.name != "arch" and value is not None:
                coerce(flag(f.name), f, value)
        if not self.output:
            raise DefectFillError("--output is required: the folder for checkpoints and the finished pipeline.")
        if self.size % 8 or self.size < 32:
            raise DefectFillError(f"--size {self.size}: must be a multiple of 8 and at least 32 pixels.")
        self.check_declared()
        if not isinstance(self.arch, BaseArch):
            raise DefectFillError(f"--arch: expected the BaseArch fields, got {type(self.arch).__name__}.")
        self.arch.check()

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("output")
        return data


# --------------------------------------------------------------------------- networks


def network_shape(arch: BaseArch) -> NetworkShape:
    """The arch as `model.networks`' shape (the text encoder's feed-forward 4x and projection 1x its width)."""
    return NetworkShape(unet_channels=arch.unet_channels, unet_layers=arch.unet_layers, unet_heads=arch.unet_heads,
                        unet_groups=arch.unet_groups, vae_channels=arch.vae_channels, vae_layers=arch.vae_layers,
                        vae_groups=arch.vae_groups, text_hidden=arch.text_hidden,
                        text_intermediate=arch.text_hidden * 4, text_layers=arch.text_layers,
                        text_heads=arch.text_heads, text_projection=arch.text_hidden)


def build_networks(arch: BaseArch, size: int, seed: int):
    """(vae, unet, text_encoder) with seeded random weights (`model.networks`' builders); the text encoder sized
    to the arch's tokenizer. Drawn in this order, which decides the weights (it is not `networks.build_networks`'
    order), so a seed gives the base the weights it has always had."""
    vocab_size = len(json.loads((Path(tokenizer_folder(arch)) / "vocab.json").read_text()))
    shape = network_shape(arch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = build_vae(shape, size)
        unet = build_unet(shape, size)
        text_encoder = build_text_encoder(shape, vocab_size)
    return vae, unet, text_encoder


def ddpm_scheduler(prediction_type: str = "epsilon"):
    """SD2's training schedule: the tiny pipeline's scheduler config as a DDPMScheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type, steps_offset=1,
                         clip_sample=False)


# --------------------------------------------------------------------------- draws


def step_rngs(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The generators of one step: every draw of (seed, stage, step) comes from these."""
    rng = np.random.default_rng([seed, stage, step])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, gen


def world_batch(rng: np.random.Generator, n: int, size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images in [-1, 1] (n,3,H,W), captions, masks (n,1,H,W) float 1 = repaint."""
    from defectfill.pretrain.world import sample_batch

    images, captions, masks = sample_batch(rng, n, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions, torch.from_numpy(masks)[:, None].float()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def autoencoder_batch(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """The VAE stage's images in [-1, 1] (n,3,H,W): world images, a share with fine marks."""
    from defectfill.pretrain.world import sample_autoencoder_batch

    return torch.from_numpy(sample_autoencoder_batch(rng, n, size)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae, images: torch.Tensor, gen: torch.Generator, kl_weight: float,
             edge_weight: float = 0.0) -> torch.Tensor:
    """L1 + L2 reconstruction, a small KL term, and `edge_weight` x the L1 error of the images' horizontal and
    vertical differences: a 1 px line is a small share of the pixels but most of the differences, so the edge
    term is what makes the autoencoder keep it."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(gen)).sample
    loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * posterior.kl().mean()
    if edge_weight > 0:
        (rx, ry), (ix, iy) = _gradients(recon), _gradients(images)
        loss = loss + edge_weight * (F.l1_loss(rx, ix) + F.l1_loss(ry, iy))
    return loss


def unet_loss(unet, text_encoder, tokenizer, vae, scheduler, images, captions, masks, gen,
              min_snr_gamma: float = 0.0) -> torch.Tensor:
    """The objective of SD inpainting on one batch (VAE frozen): epsilon or v as the scheduler predicts, Min-SNR
    weighted when gamma > 0 (min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v)."""
    from defectfill.model.pipeline import unet_input

    sf = vae.config.scaling_factor
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        both = vae.encode(torch.cat([images, images * (masks < 0.5)])).latent_dist
        latents, masked = (both.sample(gen) * sf).chunk(2)
    mask_latents = F.interpolate(masks, size=latents.shape[-2:], mode="nearest") if factor > 1 else masks
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    hidden = text_encoder(ids)[0]
    pred = unet(unet_input(noisy, mask_latents, masked), t, encoder_hidden_states=hidden).sample
    target = diffusion_target(scheduler, latents, noise, t)
    if min_snr_gamma <= 0:
        return F.mse_loss(pred, target)
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_pred else snr)  # (B,)
    return (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()


# --------------------------------------------------------------------------- checkpoints


def _module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _save(folder: Path, stage: int, step: int, modules: dict[str, torch.nn.Module], optimizer,
          extra: dict[str, Any]) -> Path:
    """checkpoints/stage{stage}-{step}/ (`outputs.checkpoints`' stage checkpoint); only the newest of a stage kept."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            tensors.update(_module_tensors(name, module))
        save_file(tensors, str(tmp / STAGE_WEIGHTS))
        if optimizer is not None:
            save_optimizer(tmp, optimizer)
        (tmp / STAGE_STATE).write_text(json.dumps({"stage": stage, "step": step, **extra}, indent=2))

    ckpt = folder / "checkpoints"
    final = write_checkpoint_folder(ckpt, stage_checkpoint_name(stage, step), fill)
    for old in ckpt.glob(f"stage{stage}-*"):
        if old != final and old.is_dir() and not old.name.endswith(".tmp"):
            shutil.rmtree(old)
    return final


def _latest(folder: Path, stage: int) -> Path | None:
    return latest_stage_checkpoint(folder / "checkpoints", stage)


def _damaged(path: Path, why: str) -> DefectFillError:
    """A checkpoint that cannot be resumed from: named, with what to do; nothing of it is deleted."""
    return DefectFillError(f"{path}: checkpoint is damaged ({why}); move it aside and rerun with --resume (that "
                           "stage then starts again from its beginning), or start again in a new folder.")


def read_stage_state(path: Path, stage: int, total: int) -> dict[str, Any]:
    """A stage checkpoint's state.json, checked before a resume trusts it: a mapping whose stage is this one,
    whose step is the folder's and within the stage, and whose latent scale (stage 1's last) is a positive
    number."""
    state_file = path / STAGE_STATE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"{state_file.name} unreadable: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise _damaged(path, f"{state_file.name} is not a mapping")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total or \
            path.name != stage_checkpoint_name(stage, step) or state.get("stage") != stage:
        raise _damaged(path, f"{state_file.name} names stage {state.get('stage')!r}, step {step!r}, not this "
                             f"folder's step of stage {stage} (0..{total})")
    scale = state.get("scaling_factor")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise _damaged(path, f"{state_file.name}: scaling_factor {scale!r} is not a positive number")
    return state


def _load(path: Path, modules: dict[str, torch.nn.Module], optimizer, stage: int, total: int) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_stage_state(path, stage, total)
    try:
        tensors = load_file(str(path / STAGE_WEIGHTS))
        for name, module in modules.items():
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            module.load_state_dict(own)
        if optimizer is not None:
            load_optimizer(path, optimizer)
    # a damaged optimizer.json can hold any JSON: wrong types surface as TypeError/AttributeError
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError) as exc:
        raise _damaged(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return state


# --------------------------------------------------------------------------- the run


def _prepare_folder(settings: PretrainSettings, resume: bool) -> Path:
    from defectfill.core.folders import claim_folder

    folder = Path(settings.output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DefectFillError(f"--output {folder}: is a file, not a folder. Choose a folder (a new one is made).")
    state_file = folder / STATE_NAME
    if resume:
        if not state_file.is_file():
            raise DefectFillError(f"--output {folder}: --resume given but no pretraining was started there "
                                  f"(no {STATE_NAME}). Start without --resume.")
        try:
            saved = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            saved = exc
        if not isinstance(saved, dict):
            why = saved if isinstance(saved, Exception) else f"a {type(saved).__name__}, not the settings"
            raise DefectFillError(f"{state_file}: damaged ({why}); it records the run's settings. Restore it "
                                  "(each setting as the run was started, e.g. from a copy), or start again in a "
                                  "new folder; the checkpoints are left as they are.") from None
        mine = json.loads(json.dumps(settings.to_json()))
        changed = sorted(k for k in set(saved) | set(mine) if k not in ("vae_steps", "unet_steps")
                         and saved.get(k) != mine.get(k))
        if changed:
            raise DefectFillError(f"--resume: settings differ from the run in {folder}: {', '.join(changed)} "
                                  "(only --vae-steps and --unet-steps may change on resume).")
        for name in ("vae_steps", "unet_steps"):  # the LR schedule depends on the totals
            if saved.get(name) != mine.get(name):
                raise DefectFillError(f"--resume: --{name.replace('_', '-')} {mine.get(name)} differs from the "
                                      f"run's {saved.get(name)}; the learning-rate schedule depends on it.")
        return folder
    if state_file.exists():
        raise DefectFillError(f"--output {folder}: holds a pretraining already; add --resume to continue it, "
                              "or choose a new folder.")
    folder = claim_folder(folder, COMMAND)
    write_json(state_file, settings.to_json())
    return folder


def pretrain_base(settings: PretrainSettings, resume: bool = False, max_minutes: float | None = None,
                  stop_after_steps: int | None = None, progress: bool = True) -> Path | None:
    """Run (or continue) the two stages; returns the pipeline folder, or None if stopped early with a checkpoint.

    `stop_after_steps` stops after that many steps of this call (both stages counted), as if interrupted
    right after a checkpoint: for tests, and for running a long pretraining in pieces.
    """
    from defectfill.core.folders import folder_lock

    settings.check()  # 1. the settings
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes >= 0):
        raise DefectFillError(f"--max-minutes {max_minutes}: must be 0 or more (minutes before a clean stop).")
    folder = _prepare_folder(settings, resume)  # 2. the folder (new, or the run to continue)
    run = PretrainRun(settings, folder, stop_after_steps, max_minutes, progress)
    with folder_lock(folder, COMMAND):
        if not run.autoencoder_stage(resume):  # 3. stage 1: the VAE, its latent scale measured at the end
            return None
        if not run.unet_stage(resume):  # 4. stage 2: the UNet and the text encoder on the frozen VAE
            return None
        run.write_pipeline()  # 5. the finished pipeline folder, part by part, model_index.json last
    return folder


class PretrainRun:
    """The state of one `pretrain_base` call: its networks, where it stops, and the steps of its stages."""

    def __init__(self, settings: PretrainSettings, folder: Path, stop_after_steps: int | None,
                 max_minutes: float | None, progress: bool):
        self.settings, self.folder, self.progress = settings, folder, progress
        self.stop_after_steps, self.max_minutes = stop_after_steps, max_minutes
        self.start = time.monotonic()
        self.done_here = 0  # steps taken by this call, both stages counted
        self.vae, self.unet, self.text_encoder = build_networks(settings.arch, settings.size, settings.seed)
        self.tokenizer = None

    def should_stop(self) -> bool:
        if self.stop_after_steps is not None and self.done_here >= self.stop_after_steps:
            return True
        return self.max_minutes is not None and time.monotonic() - self.start > self.max_minutes * 60

    def run_stage(self, stage: int, step: int, total: int, peak_lr: float, modules: dict[str, torch.nn.Module],
                  opt, loss_at: Any, finish: Any, desc: str) -> bool:
        """Steps `step`..`total` of a stage, a checkpoint every --save-every steps and `finish()` at the end;
        False when stopped early (after writing a checkpoint to resume from)."""
        from tqdm.auto import tqdm

        settings = self.settings
        params = [p for m in modules.values() for p in m.parameters()]
        bar = tqdm(total=total, initial=step, desc=desc, disable=not self.progress)
        try:
            while step < total:
                if self.should_stop():
                    _save(self.folder, stage, step, modules, opt, {})
                    return False
                rng, gen = step_rngs(settings.seed, stage, step)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, peak_lr, settings.warmup_steps)
                loss = loss_at(rng, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                self.done_here += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if step == total:
                    finish()
                elif step % settings.save_every == 0:
                    _save(self.folder, stage, step, modules, opt, {})
        finally:
            bar.close()
        return True

    # ------------------------------------------------------------------ stage 1: the VAE

    def autoencoder_loss(self, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        images = autoencoder_batch(rng, self.settings.batch_size, self.settings.size)
        return vae_loss(self.vae, images, gen, self.settings.kl_weight, self.settings.edge_weight)

    def finish_autoencoder(self) -> None:
        """The last checkpoint of stage 1 holds the measured latent scale and no optimiser."""
        _save(self.folder, 1, self.settings.vae_steps, {"vae": self.vae}, None,
              {"scaling_factor": _measure_scaling(self.vae, self.settings)})

    def autoencoder_stage(self, resume: bool) -> bool:
        settings, vae = self.settings, self.vae
        opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
        step = 0
        last = _latest(self.folder, 1) if resume else None
        if last is not None:
            finished = "scaling_factor" in read_stage_state(last, 1, settings.vae_steps)
            step = _load(last, {"vae": vae}, None if finished else opt, 1, settings.vae_steps)["step"]
        vae.train()
        if not self.run_stage(1, step, settings.vae_steps, settings.vae_lr, {"vae": vae}, opt,
                              self.autoencoder_loss, self.finish_autoencoder, "pretrain: VAE"):
            return False
        last = _latest(self.folder, 1)
        final = _load(last, {"vae": vae}, None, 1, settings.vae_steps)
        if "scaling_factor" not in final:
            raise _damaged(last, f"{STAGE_STATE} of the finished stage has no scaling_factor")
        vae.register_to_config(scaling_factor=final["scaling_factor"])
        vae.eval().requires_grad_(False)
        return True

    # ------------------------------------------------------------------ stage 2: UNet + text encoder

    def unet_loss(self, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        images, captions, masks = world_batch(rng, self.settings.batch_size, self.settings.size)
        return unet_loss(self.unet, self.text_encoder, self.tokenizer, self.vae, self.scheduler, images, captions,
                         masks, gen, self.settings.min_snr_gamma)

    def unet_stage(self, resume: bool) -> bool:
        from defectfill.model.tiny import clip_tokenizer

        settings = self.settings
        self.tokenizer = clip_tokenizer(tokenizer_folder(settings.arch))
        self.scheduler = ddpm_scheduler(settings.prediction_type)
        networks = {"unet": self.unet, "text_encoder": self.text_encoder}
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=0.0)
        step = 0
        last = _latest(self.folder, 2) if resume else None
        if last is not None:
            step = _load(last, networks, opt, 2, settings.unet_steps)["step"]
        self.unet.train()
        self.text_encoder.train()
        return self.run_stage(2, step, settings.unet_steps, settings.unet_lr, networks, opt, self.unet_loss,
                              functools.partial(_save, self.folder, 2, settings.unet_steps, networks, opt, {}),
                              "pretrain: UNet")

    # ------------------------------------------------------------------ the pipeline folder

    def write_pipeline(self) -> None:
        from defectfill.model.tiny import assemble_inpaint_pipeline

        self.unet.eval()
        self.text_encoder.eval()
        pipe = assemble_inpaint_pipeline(self.unet, self.vae, self.text_encoder, self.settings.prediction_type,
                                         self.tokenizer)
        folder = self.folder
        tmp = folder / ".pipeline.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        add_slow_tokenizer_files(Path(tokenizer_folder(self.settings.arch)), tmp / "tokenizer")
        for item in sorted(tmp.iterdir()):  # each part replaced whole; model_index.json last
            if item.name != "model_index.json":
                target = folder / item.name
                if target.is_dir():
                    replace_dir(item, target)
                else:
                    item.replace(target)
        (tmp / "model_index.json").replace(folder / "model_index.json")
        shutil.rmtree(tmp)


def add_slow_tokenizer_files(source: Path, folder: Path) -> None:
    """Copy vocab.json and merges.txt from `source` beside tokenizer.json: transformers 4 reads a CLIPTokenizer
    from these (transformers 5 saves only tokenizer.json), and pyproject admits both."""
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)


def _measure_scaling(vae, settings: PretrainSettings) -> float:
    """1 / std of the latents of 256 world images (drawn from stage 1's own seed stream, step -1)."""
    rng = np.random.default_rng([settings.seed, 1, 2**31])
    images, _, _ = world_batch(rng, 256, settings.size)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
    std = float(latents.std())
    return 1.0 / std if std > 1e-6 else 1.0


# --------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--output", required=True, help="folder for checkpoints and the finished pipeline")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 8, at least 32)")
    p.add_argument("--vae-steps", type=int, default=PretrainSettings.vae_steps, help="stage 1 steps (VAE)")
    p.add_argument("--unet-steps", type=int, default=PretrainSettings.unet_steps,
                   help="stage 2 steps (UNet and text encoder)")
    p.add_argument("--batch-size", type=int, default=PretrainSettings.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=PretrainSettings.save_every, help="checkpoint every N steps")
    p.add_argument("--arch", default=None, help="architecture as a JSON file or inline JSON (BaseArch fields); "
                                                "'tiny' for a seconds-long test model")
    p.add_argument("--edge-weight", type=float, default=PretrainSettings.edge_weight,
                   help="weight of the VAE's image-gradient L1 term (keeps thin lines)")
    p.add_argument("--prediction-type", default=PretrainSettings.prediction_type,
                   choices=("v_prediction", "epsilon"), help="what the UNet predicts")
    p.add_argument("--resume", action="store_true", help="continue the pretraining in --output exactly")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly with a checkpoint after this long; continue with --resume")


def _arch_from_arg(value: str | None) -> BaseArch:
    if value is None:
        return BaseArch()
    if value == "tiny":
        return TINY_ARCH
    text = value
    path = Path(value).expanduser()
    if not value.lstrip().startswith(("{", "[")):  # inline JSON (a list is refused below), else a file
        try:
            text = path.read_text()
        except OSError as exc:
            raise DefectFillError(f"--arch {value}: cannot read ({exc.strerror}).") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DefectFillError(f"--arch: not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise DefectFillError("--arch: must be a JSON object of BaseArch fields.")
    return BaseArch.from_dict(data)


def pretrain_command(args) -> int:
    settings = PretrainSettings(output=args.output, size=args.size, vae_steps=args.vae_steps,
                                unet_steps=args.unet_steps, batch_size=args.batch_size, seed=args.seed,
                                save_every=args.save_every, prediction_type=args.prediction_type, edge_weight=args.edge_weight,
                                arch=_arch_from_arg(args.arch))
    out = pretrain_base(settings, resume=args.resume, max_minutes=args.max_minutes)
    if out is None:
        print(f"stopped with a checkpoint in {args.output}/checkpoints; rerun with --resume to continue.")
    else:
        print(f"base pipeline written to {out} (use it as --model {out})")
    return 0
