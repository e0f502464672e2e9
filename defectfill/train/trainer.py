"""DefectFill training: one LoRA (UNet + text encoder) per (object, defect type), or one per object.

One optimiser step = `grad_accum` micro-batches; one micro-batch = B reference
images, each seen by both branches in ONE batched UNet call of size 2B:
    rows 0..B-1   defect branch: inpaint mask M,       prompt "A photo of {token}"
    rows B..2B-1  object branch: inpaint mask M_rand,  prompt "A {object} with {token}"
Both branches share the image, the noise and the timestep. The token's
decoder cross-attention maps of the defect rows feed the attention loss.

One model per object (`--defect-type all` or a comma list): each defect type
gets its own new token `<type>` with a trained embedding row; each reference
row of a micro-batch gets its own type's prompts (and the attention loss on its
own token). A multi-type image (VisA) trains with all its types' tokens side by
side, their attention averaged, against its one mask.

Every random draw of a micro-batch comes from a generator seeded by
(seed, step, micro-batch, process), so a resumed run draws exactly what an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import defectfill
from defectfill.config.sampling import resolve_sampling
from defectfill.config.settings import compile_module, precision_dtype, resolve_compile, resolve_precision
from defectfill.config.stages import NON_IDENTITY_KEYS, TrainConfig
from defectfill.core.atomic import atomic_write, follow_umask, writing_into
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import folder_lock
from defectfill.data import Split, load_mask, load_rgb, make_split, open_layout
from defectfill.data.augment import random_box_mask, resize_crop_keep_defect
from defectfill.data.images import letterbox
from defectfill.data.layouts import Layout
from defectfill.data.split import ObjectSplit, make_object_split
from defectfill.model.attention import AttentionRecorder, coarsest_cross_attention_side
from defectfill.model.networks import check_prediction_type, diffusion_target, predicted_clean_latents
from defectfill.model.pipeline import (
    LORA_WEIGHTS_NAME,
    TOKEN_WEIGHTS_NAME,
    TokenEmbedding,
    add_lora,
    add_trainable_token,
    add_trainable_tokens,
    encode_inpaint_condition,
    latent_cell_mask,
    load_pipeline,
    save_lora_weights,
    token_positions,
    unet_input,
    vae_scale_factor,
)
from defectfill.outputs.checkpoints import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from defectfill.outputs.run_folder import (
    LOGS_DIR,
    TRAIN_LOG,
    append_metrics,
    read_recorded_config,
    sample_path,
    type_token_file,
    write_model_card,
    write_run_files,
)
from defectfill.train import losses as L

log = logging.getLogger("defectfill.train.trainer")


# --------------------------------------------------------------------------- models


@dataclass
class TrainingModels:
    unet: nn.Module
    text_encoder: nn.Module
    vae: nn.Module
    tokenizer: Any
    noise_scheduler: Any
    recorder: AttentionRecorder
    token_embedding: TokenEmbedding | None
    # What the step calls: the accelerate-wrapped modules (DDP syncs gradients only through these).
    unet_call: nn.Module | None = None
    text_encoder_call: nn.Module | None = None

    def callables(self) -> tuple[nn.Module, nn.Module]:
        """(UNet, text encoder) as the step calls them: the wrapped ones once prepared, else the plain ones.

        `is None`, not `or`: a torch.compile'd module (accelerate --dynamo_backend) has no len(), so no truth value.
        """
        unet = self.unet if self.unet_call is None else self.unet_call
        text_encoder = self.text_encoder if self.text_encoder_call is None else self.text_encoder_call
        return unet, text_encoder


def build_models(config: TrainConfig, device: torch.device, weight_dtype: torch.dtype, pipe=None) -> TrainingModels:
    """Load the pipeline, freeze it, add LoRA (and a trainable token), install the attention recorder.

    Frozen weights are cast to `weight_dtype`; every trainable tensor stays fp32.
    """
    from diffusers import DDPMScheduler

    pipe = pipe if pipe is not None else load_pipeline(config.model)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    for module in (vae, unet, text_encoder):
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    add_lora(unet, text_encoder, config.lora_rank)  # freezes both, then adds the LoRA tensors
    token_embedding = None
    if config.per_object:  # one new word per defect type, rows in the order of config.defect_types()
        token_embedding = add_trainable_tokens(tokenizer, text_encoder, list(config.type_tokens().values()),
                                               init_word=config.token, what="--defect-type token")
        token_embedding.to(device)
    elif config.new_token:  # after add_lora, which would freeze the new row
        token_embedding = add_trainable_token(tokenizer, text_encoder, config.new_token, init_word=config.token)
        token_embedding.to(device)
    for module in (unet, text_encoder):
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if token_embedding is not None:
        token_embedding.new_rows.data = token_embedding.new_rows.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    check_prediction_type(noise_scheduler)  # before any tensor is moved or any file written
    recorder = AttentionRecorder(unet)
    return TrainingModels(unet, text_encoder, vae, tokenizer, noise_scheduler, recorder, token_embedding)


def compile_models(models: TrainingModels) -> None:
    """torch.compile what the step calls: the (wrapped) UNet and the VAE encoder.

    The plain modules stay as they are, so parameter names, checkpoints and the saved LoRA do not
    change. The attention recorder compiles without a graph break (tests/test_compile.py counts them).
    """
    unet = models.unet if models.unet_call is None else models.unet_call
    models.unet_call = compile_module(unet)
    # the encoder runs under no_grad twice a micro-batch (B images, 2B masked images): two graphs, no recompiles
    models.vae.encoder = compile_module(models.vae.encoder)


def trainable_parameters(models: TrainingModels) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    text_params = [p for p in models.text_encoder.parameters() if p.requires_grad]
    return unet_params, text_params


def trainable_tensors(models: TrainingModels) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (("unet.", models.unet), ("text_encoder.", models.text_encoder)):
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[prefix + name] = p.detach().cpu().contiguous()
    return out


def load_trainable_tensors(models: TrainingModels, tensors: dict[str, torch.Tensor], source: Path) -> None:
    params = {}
    for prefix, module in (("unet.", models.unet), ("text_encoder.", models.text_encoder)):
        for name, p in module.named_parameters():
            if p.requires_grad:
                params[prefix + name] = p
    if set(params) != set(tensors):
        raise DefectFillError(f"{source}: checkpoint holds other trainable weights than this run's model "
                              "(different --lora-rank, --new-token or model?).")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))


# --------------------------------------------------------------------------- data


class References(NamedTuple):
    images: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    masks: torch.Tensor  # (N, 1, R, R) in {0, 1}
    valid: torch.Tensor  # (N, 1, R, R): 1 on the image, 0 on letterbox padding


def load_references(split: Split, resolution: int) -> References:
    """Reference images, masks and valid regions, letterboxed into `resolution` squares (`letterbox`).

    A non-square image is scaled, aspect kept, so its longer side is the training side, and padded (black):
    resizing it to the square would distort its defects' shapes. The padding is left out of the object loss
    (`defectfill_losses`) and of the object branch's boxes. Longer side at the training side is the scale
    generation samples at (`model.canvas.canvas_for`), so a defect is learnt at the size it is painted. A
    square image is only resized.
    """
    images, masks, valid = [], [], []
    for sample in split.reference:
        image, mask, inside = letterbox(load_rgb(sample.image), load_mask(sample.mask, sample.mask_rule), resolution)
        images.append(image)
        masks.append(mask)
        valid.append(inside)
    return References(torch.stack(images), torch.stack(masks), torch.stack(valid))


class ObjectReferences(NamedTuple):
    references: References  # every type's reference images, then the multi-type ones
    groups: torch.Tensor  # (N,) long: each reference's prompt group (index into `tokens`)
    tokens: list[str]  # each group's {token}: one type's "<hole>", or a multi-type image's "<crack> <hole>"


def load_object_references(split: ObjectSplit, config: TrainConfig, resolution: int) -> ObjectReferences:
    """Every type's references, each with the prompt group of its own type; multi-type images with the group of
    their types (their tokens side by side, in the run's type order)."""
    tokens = config.type_tokens()
    groups: list[str] = list(tokens.values())
    samples, ids = [], []
    for t, type_split in split.splits.items():
        samples += type_split.reference
        ids += [groups.index(tokens[t])] * len(type_split.reference)
    for multi in split.multi_reference:
        words = " ".join(tokens[t] for t in tokens if t in multi.types)
        if words not in groups:
            groups.append(words)
        samples.append(multi.sample)
        ids.append(groups.index(words))
    first = next(iter(split.splits.values()))
    references = load_references(dataclasses.replace(first, reference=samples), resolution)
    return ObjectReferences(references, torch.tensor(ids, dtype=torch.long), groups)


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def micro_batch_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, step, micro, rank))


def reference_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Indices `start..start+count` of an endless stream of shuffled passes over n references."""
    out = []
    for k in range(start, start + count):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(seed, "epoch", epoch)))
        out.append(int(perm[pos]))
    return out


@dataclass
class MicroBatch:
    images: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    masks: torch.Tensor  # (B, 1, R, R) real defect masks, {0, 1}
    box_masks: torch.Tensor  # (B, 1, R, R) object-branch inpaint masks, {0, 1}
    generator: torch.Generator  # for VAE sampling, noise and timesteps of this micro-batch
    valid: torch.Tensor | None = None  # (B, 1, R, R): 0 on letterbox padding; None: all image
    groups: torch.Tensor | None = None  # (B,) prompt group of each row (one model per object); None: all group 0


def _boxes_inside(valid: torch.Tensor, gen: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The object branch's box mask drawn inside the bounding box of the valid (non-padding) region."""
    ys, xs = torch.nonzero(valid[0] > 0.5, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    boxes = torch.zeros_like(valid)
    boxes[:, y0:y1, x0:x1] = random_box_mask(y1 - y0, x1 - x0, gen, config.num_boxes, config.box_min, config.box_max)
    return boxes


def make_micro_batch(
    ref_images: torch.Tensor, ref_masks: torch.Tensor, config: TrainConfig, step: int, micro: int, rank: int, world: int,
    ref_valid: torch.Tensor | None = None, ref_groups: torch.Tensor | None = None,
) -> MicroBatch:
    """B augmented references with their box masks; `ref_valid` (letterbox padding) follows the same crop,
    `ref_groups` (one model per object) gives each row its prompt group."""
    gen = micro_batch_generator(config.seed, step, micro, rank)
    b = config.batch_size
    start = ((step * config.grad_accum + micro) * world + rank) * b
    images, masks, boxes, valid = [], [], [], []
    indices = reference_indices(len(ref_images), start, b, config.seed)
    for i in indices:
        # the valid region rides along as a second mask channel: one crop for image, defect and padding
        stacked = ref_masks[i] if ref_valid is None else torch.cat([ref_masks[i], ref_valid[i]])
        image, stacked = resize_crop_keep_defect(ref_images[i], stacked, gen, config.max_scale)
        images.append(image)
        masks.append(stacked[:1])
        if ref_valid is None:
            boxes.append(random_box_mask(image.shape[1], image.shape[2], gen, config.num_boxes, config.box_min,
                                         config.box_max))
        else:
            valid.append(stacked[1:])
            boxes.append(_boxes_inside(valid[-1], gen, config))
    return MicroBatch(torch.stack(images), torch.stack(masks), torch.stack(boxes), gen,
                      torch.stack(valid) if valid else None,
                      ref_groups[torch.tensor(indices)] if ref_groups is not None else None)


# --------------------------------------------------------------------------- the step


@dataclass
class PromptInputs:
    """The prompts of G prompt groups (one: a per-type run; one per defect type: a per-object run)."""

    input_ids: torch.Tensor  # (2G, 77): [defect prompt of each group, object prompt of each group]
    token_weights: torch.Tensor  # (G, 77): 1/n at the n sub-tokens of the group's token in its defect prompt


def prompt_inputs(tokenizer, config: TrainConfig, tokens: list[str] | None = None) -> PromptInputs:
    """Each group's prompts; `tokens`: each group's {token} (default: the run's one token)."""
    tokens = tokens or [config.prompt_token]
    defect_prompts = [config.prompt(config.defect_prompt, t) for t in tokens]
    object_prompts = [config.prompt(config.object_prompt, t) for t in tokens]
    ids = tokenizer(defect_prompts + object_prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    weights = torch.zeros(len(tokens), ids.shape[1])
    for g, (prompt, token) in enumerate(zip(defect_prompts, tokens, strict=True)):
        positions = token_positions(tokenizer, prompt, token)
        weights[g, positions] = 1.0 / len(positions)
    return PromptInputs(ids, weights)


def valid_cells(valid: torch.Tensor | None, vae: nn.Module, device: torch.device) -> torch.Tensor | None:
    """(B,1,R,R) valid region -> (B,1,h,w): 1 on latent cells wholly on the image, 0 where padding touches."""
    if valid is None:
        return None
    return 1.0 - latent_cell_mask(1.0 - valid.to(device).float(), vae_scale_factor(vae))


def defectfill_losses(
    models: TrainingModels, batch: MicroBatch, prompts: PromptInputs, config: TrainConfig, device: torch.device,
    autocast=nullcontext,
) -> L.LossTerms:
    """All three DefectFill losses of one micro-batch, with ONE batched UNet call (batch 2B)."""
    vae, unet, sched = models.vae, models.unet, models.noise_scheduler
    b = batch.images.shape[0]
    images = batch.images.to(device, vae.dtype)
    masks = batch.masks.to(device)
    gen = batch.generator
    with torch.no_grad():  # the VAE is frozen: no graph for it
        latents = vae.encode(images).latent_dist.sample(gen) * vae.config.scaling_factor  # (B,4,h,w)
        # both branches' conditions in one VAE call: rows [defect mask M | box mask M_rand]
        mask_latents, masked_latents = encode_inpaint_condition(
            vae, torch.cat([images, images]), torch.cat([masks, batch.box_masks.to(device)]).to(vae.dtype), gen
        )  # (2B,1,h,w), (2B,4,h,w)
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=gen).to(device)  # shared by both branches
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = diffusion_target(sched, latents, noise, timesteps)
    lh, lw = latents.shape[-2:]

    with autocast():
        # The text encoder runs WITH grad: its LoRA (and a new token row) learn through it.
        unet_call, text_encoder = models.callables()
        text = text_encoder(prompts.input_ids.to(device))[0]  # (2G, 77, D)
        n_groups = prompts.token_weights.shape[0]
        if batch.groups is None or n_groups == 1:  # one prompt pair for every row (a per-type run)
            text = torch.cat([text[0:1].expand(b, -1, -1), text[1:2].expand(b, -1, -1)])  # (2B, 77, D)
            token_weights = prompts.token_weights.to(device).expand(b, -1)
        else:  # each row its own type's prompts, and its attention read at its own token
            g = batch.groups.to(device)
            text = torch.cat([text[g], text[n_groups + g]])  # (2B, 77, D)
            token_weights = prompts.token_weights.to(device)[g]  # (B, 77)
        consistency = config.lambda_attn_consistency > 0
        record = config.lambda_attn > 0 or consistency
        models.recorder.start(token_weights if record else None)
        model_in = unet_input(torch.cat([noisy, noisy]), mask_latents, masked_latents).to(unet.dtype)  # (2B,9,h,w)
        pred = unet_call(model_in, torch.cat([timesteps, timesteps]), encoder_hidden_states=text).sample  # (2B,4,h,w)
        if record:
            attn_size = config.attn_size or coarsest_cross_attention_side(unet, lh)
            l_attn, l_cons = L.attention_terms(models.recorder.maps, (lh, lw), masks, config.attn_scales, attn_size,
                                               consistency)
        models.recorder.stop()
        decoded = perceptual_decode(models, noisy, pred[:b], timesteps) if config.lambda_perceptual > 0 else None

    pred = pred.float()
    # the real defect mask at latent size: every cell it touches (max reduction), the cells the UNet is told to
    # inpaint; so a scratch thinner than a cell still weighs in L_def and in M' of L_obj
    m_lat = mask_latents[:b].float()
    l_def = L.defect_loss(target, pred[:b], m_lat)
    l_obj = L.object_loss(target, pred[b:], m_lat, config.alpha, valid_cells(batch.valid, vae, device))
    if not record:
        l_attn = l_cons = torch.zeros((), device=device)
    return L.combine(l_def, l_obj, l_attn, config.lambda_def, config.lambda_obj, config.lambda_attn,
                     optional_terms(config, l_cons, decoded, images, masks))


def perceptual_decode(models: TrainingModels, noisy: torch.Tensor, pred: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """The defect rows' predicted clean latents, decoded by the (frozen) VAE with their graph: the perceptual
    term's gradient reaches the LoRA through the decoder. (B, 3, H, W) in [-1, 1]."""
    vae = models.vae
    x0 = predicted_clean_latents(models.noise_scheduler, noisy.float(), pred.float(), timesteps)
    return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample


def optional_terms(config: TrainConfig, l_cons: torch.Tensor, decoded: torch.Tensor | None, images: torch.Tensor,
                   masks: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
    """The optional loss terms and their weights (a 0 weight: left out of the total)."""
    terms = {"attention_consistency": (l_cons, config.lambda_attn_consistency)}
    if decoded is not None:
        terms["perceptual"] = (L.decoded_pixel_loss(decoded, images, masks), config.lambda_perceptual)
    return terms


def _optimizer_step(accelerator, optimizer, params: list[nn.Parameter], loss_sum: torch.Tensor,
                    max_grad_norm: float) -> tuple[bool, torch.Tensor | None]:
    """Clip and step unless the loss (on any rank) or the gradient is non-finite. Returns (stepped, grad norm).

    One host-device sync per optimiser step, none per micro-batch. All ranks decide alike: the flag is
    all-reduced, and the gradient norm is taken after the gradient all-reduce.
    """
    def everywhere(flag: torch.Tensor) -> bool:
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag.float(), reduction="sum") == accelerator.num_processes
        return bool(flag)  # the step's one sync

    loss_ok = torch.isfinite(loss_sum)
    if accelerator.scaler is not None:  # fp16 on a GPU (accelerate makes no scaler for fp16 on a CPU)
        # The loss scaler must see every step with a finite loss (it lowers its scale on inf gradients and
        # skips that step itself), and must not unscale twice, so the loss is judged before clipping.
        if not everywhere(loss_ok):
            return False, None
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return not accelerator.optimizer_step_was_skipped, grad_norm
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    if not everywhere(loss_ok & torch.isfinite(grad_norm)):
        return False, None
    optimizer.step()
    return True, grad_norm


def warmup_lambda(warmup_steps: int):
    """Linear warm-up that starts above 0: step s (0-based) runs at (s+1)/warmup of the rate."""
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return factor


# Measured on a 2-core CPU with the SD2-inpainting UNet (random weights): one LoRA forward+backward
# of one image takes about 20 s at 512 px (docs/sd2-inpainting-architecture.md).
CPU_SECONDS_PER_IMAGE_512 = 20.0


def warn_if_slow(unet: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """On a CPU, a full-size UNet trains for hours: say so, with an estimate, before starting."""
    n_params = sum(p.numel() for p in unet.parameters())
    if device.type != "cpu" or n_params < 100_000_000:
        return
    per_step = CPU_SECONDS_PER_IMAGE_512 * (config.resolution / 512) ** 2 * 2 * config.batch_size * config.grad_accum
    hours = per_step * config.steps / 3600
    log.warning(
        "training a %.0fM-parameter UNet on the CPU: about %.0f s per step, %.1f hours for %d steps "
        "(estimate from a 2-core CPU). Use a GPU, or try `defectfill demo` to see the pipeline work.",
        n_params / 1e6, per_step, hours, config.steps,
    )


# --------------------------------------------------------------------------- run folder


def resolve_defect_types(layout, config: TrainConfig) -> str:
    """`--defect-type` in the layout's spelling (VisA: "chunk of wax missing" -> chunk_of_wax_missing), so
    config.json, split.json and the folders named after a type agree however it was written; `all` becomes
    the category's types. Two or more types (a comma list) mean one model for the object; `all` on a category
    with one type is that type's own (per-type) run."""
    names = config.defect_types()
    if names == ["all"]:
        layout.check_category(config.category)
        names = layout.defect_types(config.category)
        if not names:
            raise DefectFillError(f"{layout.root / config.category}: no defect types found for --defect-type all.")
    for name in names:
        layout.check_defect_type(config.category, name)
    canonical = list(dict.fromkeys(layout.canonical_defect_type(config.category, n) for n in names))
    return ",".join(canonical)


def _check_output(config: TrainConfig, out: Path) -> None:
    """Refuse to write into a folder that holds something else, or another run without --resume."""
    if not out.exists():
        if config.resume:
            raise DefectFillError(f"{out}: --resume given but the folder does not exist; nothing to resume.")
        return
    if not out.is_dir():
        raise DefectFillError(f"{out}: exists and is not a folder. Choose another --output.")
    old = read_recorded_config(out)
    if old is not None:
        new = config.to_dict()
        diff = sorted(k for k in new if k not in NON_IDENTITY_KEYS and old.get(k) != new[k])
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
            raise DefectFillError(f"{out}: holds a run with a different config ({shown}). "
                                  "Choose another --output, or rerun with the same settings.")
        if not config.resume and (list_checkpoints(out) or (out / LORA_WEIGHTS_NAME).exists()):
            raise DefectFillError(f"{out}: already holds this run. Pass --resume latest to continue it, "
                                  "or choose another --output.")
        return
    # without config.json (what marks a run folder as ours) only an empty folder is writable: a file of a run's
    # name (another tool's pytorch_lora_weights.safetensors) is not ours to replace
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others:
        raise DefectFillError(f"{out}: folder is not empty and is not a defectfill run (no config.json; holds "
                              f"{', '.join(others[:5])}). Choose an empty or new --output.")
    if config.resume:
        raise DefectFillError(f"{out}: no run to resume here (no config.json).")


def _check_checkpoint_settings(checkpoint: Path, config: TrainConfig) -> None:
    """Refuse to resume from a checkpoint made with other settings, naming each one that differs."""
    made_with = read_trainer_state(checkpoint).get("config")
    if not isinstance(made_with, dict):
        return  # a checkpoint that records no settings (older versions wrote none): nothing to compare
    new = config.to_dict()
    diff = sorted(k for k in new if k not in NON_IDENTITY_KEYS and k in made_with and made_with[k] != new[k])
    if diff:
        shown = ", ".join(f"{k}: {made_with[k]!r} -> {new[k]!r}" for k in diff)
        raise DefectFillError(f"{checkpoint}: was made with other settings ({shown}). Resume with the settings it was "
                              "made with, or start a new run in another --output.")


def _setup_logging(out: Path, is_main: bool) -> logging.Handler | None:
    if not is_main:
        return None
    handler = logging.FileHandler(out / TRAIN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("defectfill").addHandler(handler)
    logging.getLogger("defectfill").setLevel(logging.INFO)
    return handler


def write_weights(folder: Path, models: TrainingModels, config: TrainConfig) -> None:
    """The LoRA (and a new token's embedding) into `folder`, in the files diffusers loads."""
    from safetensors.torch import save_file

    save_lora_weights(folder, models.unet, models.text_encoder)
    follow_umask(folder / LORA_WEIGHTS_NAME)  # diffusers writes it 0600; every other file follows the umask
    if models.token_embedding is not None and config.per_object:
        rows = models.token_embedding.new_rows.detach().float().cpu()
        for i, (t, token) in enumerate(config.type_tokens().items()):
            # one file per token: diffusers' load_textual_inversion reads one token from a file
            save_file({token: rows[i].contiguous()}, str(folder / type_token_file(t)))
    elif models.token_embedding is not None:
        row = models.token_embedding.new_rows.detach().float().cpu()[0].contiguous()
        # textual-inversion format {token: (D,)}, read by pipe.load_textual_inversion(path, token=...)
        save_file({config.new_token: row}, str(folder / TOKEN_WEIGHTS_NAME))


def save_final_weights(out: Path, models: TrainingModels, config: TrainConfig) -> None:
    """`write_weights` into a temporary folder, then each file renamed into the run folder."""
    tmp = out / ".final-weights.tmp"
    with writing_into(out, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_weights(tmp, models, config)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()


# --------------------------------------------------------------------------- samples


@torch.no_grad()
def sample_inpaintings(models: TrainingModels, config: TrainConfig, split: Split | ObjectSplit,
                       autocast=nullcontext) -> Image.Image:
    """Inpaint the first reference image inside a held-out (or its own) mask; [source | mask | sample] strip.

    The image is prepared as generation prepares it (`model.canvas.prepare_canvas`: its own aspect, the mask grown to
    whole latent cells)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from defectfill.data.masks import fit_mask
    from defectfill.model.canvas import prepare_canvas

    if isinstance(split, ObjectSplit):  # one model per object: the first type's sample
        token = next(iter(config.type_tokens().values()))
        split = next(iter(split.splits.values()))
    else:
        token = None
    source = load_rgb(split.reference[0].image)
    mask_sample = (split.held_out or split.reference)[0]
    canvas, source, mask = prepare_canvas(source, fit_mask(load_mask(mask_sample.mask, mask_sample.mask_rule), source.size),
                                          config.resolution, vae_scale_factor(models.vae))
    pipe = StableDiffusionInpaintPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # the prompt and guidance the base recommends for sampling (config.sampling), as `generate` would use them
    sampling = resolve_sampling(config.model)
    prompt = config.prompt(sampling["prompt"] or config.object_prompt, token)
    models.recorder.start(None)  # plain cross-attention while sampling
    was_training = models.unet.training
    models.unet.eval()
    models.text_encoder.eval()
    try:
        with autocast():  # the training step's own precision
            result = pipe(prompt=prompt, image=source, mask_image=mask, height=canvas.size[1],
                          width=canvas.size[0], num_inference_steps=config.sample_steps,
                          guidance_scale=sampling["guidance"],
                          generator=torch.Generator().manual_seed(config.seed)).images[0]
    finally:
        models.unet.train(was_training)
        models.text_encoder.train(was_training)
    w, h = canvas.scaled  # the canvas's padding cut off
    strip = Image.new("RGB", (w * 3, h))
    for i, im in enumerate((source, mask.convert("RGB"), result)):
        strip.paste(im.crop((0, 0, w, h)), (i * w, 0))
    return strip


# --------------------------------------------------------------------------- training loop


@dataclass
class TrainingData:
    """The references a run trains on, and the split they came from."""

    split: Split | ObjectSplit
    references: References
    groups: torch.Tensor | None = None  # one model per object: each reference's prompt group
    group_tokens: list[str] | None = None  # ... and each group's {token}
    n_held_out: int = 0


@dataclass
class TrainingRun:
    """One training's state: what the steps read and update."""

    config: TrainConfig
    out: Path
    data: TrainingData
    accelerator: Any
    models: TrainingModels
    prompts: PromptInputs
    optimizer: Any  # torch.optim.AdamW, accelerate-wrapped once prepared
    lr_scheduler: Any
    params: list[nn.Parameter]  # every trainable parameter, for clipping
    start_step: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient, in all
    nonfinite_in_a_row: int = 0
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # loss sums since the last log
    n_sums: int = 0
    trackers: list[Any] = dataclasses.field(default_factory=list)  # --report-to's (accelerate), main process only

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def zero_sums(self) -> dict[str, torch.Tensor]:
        """A zero per logged loss: the three losses, the total, and each optional term that is on (its weight > 0,
        as `losses.combine` keeps it)."""
        optional = [name for name, weight in (("attention_consistency", self.config.lambda_attn_consistency),
                                              ("perceptual", self.config.lambda_perceptual)) if weight > 0]
        return {k: torch.zeros((), device=self.accelerator.device)
                for k in ("defect", "object", "attention", "total", *optional)}


def train(config: TrainConfig, pipe=None) -> Path:
    """Train one DefectFill LoRA as `config` says and return the run folder.

    `pipe`: an already loaded inpainting pipeline (tests, the demo); by default
    `config.model` is loaded.

    1. check the settings and the output folder, the defect types in the dataset's spelling;
    2. load the reference images (the split decides which);
    3. the accelerator at the resolved precision, the models with their LoRA, the prompts;
    4. the optimiser and its warm-up, restored from a checkpoint with --resume;
    5. prepare (and compile) for the device;
    6. open the run folder (its lock, config.json and split.json, the logs);
    7. each step: its micro-batches, the optimiser step, then logging, checkpoints and samples as set;
    8. the final weights.
    """
    config.validate()  # also when called from Python with a hand-made config
    out = Path(config.output).expanduser()
    config, layout = _checked_config(config, out)
    data = load_training_data(config, layout)
    accelerator, config = _make_accelerator(config)
    run = _make_run(config, out, data, accelerator, pipe)
    _resume(run)
    _prepare_for_device(run)
    with ExitStack() as job:
        _open_run_folder(run, job)
        progress = job.enter_context(_progress(run))
        for step in range(run.start_step, config.steps):
            grad_norm, step_lrs = _train_step(run, step)
            done = step + 1
            progress.update(1)
            if run.is_main and (done % config.log_every == 0 or done == config.steps) and run.n_sums:
                _log_step(run, done, step_lrs, grad_norm, progress)
            if done % config.save_every == 0 or done == config.steps:
                _checkpoint(run, done)
            if run.is_main and config.sample_every and (done % config.sample_every == 0 or done == config.steps):
                _log_sample(run, done)
        accelerator.wait_for_everyone()
        if run.is_main:
            save_final_weights(out, run.models, config)
            write_model_card(out, config)
            log.info("done: %s (%d steps skipped)", out / LORA_WEIGHTS_NAME, run.skipped)
    return out


def _checked_config(config: TrainConfig, out: Path) -> tuple[TrainConfig, Layout]:
    """(the settings with the defect types in the dataset's spelling, the dataset), once the output folder
    may take them."""
    check_tracker(config.report_to)  # before any model loads: a missing tracker package is named at once
    layout = open_layout(config.data, config.layout, config.good_images)
    config = dataclasses.replace(config, defect_type=resolve_defect_types(layout, config))
    _check_output(config, out)
    return config, layout


def load_training_data(config: TrainConfig, layout: Layout) -> TrainingData:
    """The split of the run's type(s) and its reference images at the training resolution."""
    if config.per_object:
        split = make_object_split(layout, config.category, config.defect_types())
        references, groups, tokens = load_object_references(split, config, config.resolution)
        return TrainingData(split, references, groups, tokens, sum(len(s.held_out) for s in split.splits.values()))
    split = make_split(layout, config.category, config.defect_type)
    return TrainingData(split, load_references(split, config.resolution), n_held_out=len(split.held_out))


def _make_accelerator(config: TrainConfig):
    """(the accelerator, the settings with the precision that runs recorded)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Several runs in one process (tests, `defectfill run`) may differ in precision; accelerate keeps
    # one global state, so forget the last run's (the distributed setup, PartialState, is kept).
    if getattr(AcceleratorState, "_shared_state", None) and hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()
    precision = resolve_precision(config.mixed_precision)
    config = dataclasses.replace(config, mixed_precision=precision)  # config.json records what ran
    # Several processes and no GPU (torchrun / accelerate launch on CPUs): accelerate only joins them
    # into one run (gloo) when told cpu=True; otherwise each would train alone and write the same files.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=1, cpu=multi_cpu), config


def _make_run(config: TrainConfig, out: Path, data: TrainingData, accelerator, pipe) -> TrainingRun:
    """The models with their LoRA (seeded), the prompts, the optimiser and its warm-up schedule."""
    from accelerate.utils import set_seed

    device = accelerator.device
    set_seed(config.seed)  # the LoRA's random init draws from the global generator
    models = build_models(config, device, precision_dtype(config.mixed_precision), pipe=pipe)
    warn_if_slow(models.unet, config, device)
    prompts = prompt_inputs(models.tokenizer, config, data.group_tokens)
    unet_params, text_params = trainable_parameters(models)
    optimizer = torch.optim.AdamW(
        [{"params": unet_params, "lr": config.lr_unet}, {"params": text_params, "lr": config.lr_text}],
        weight_decay=config.weight_decay,
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    run = TrainingRun(config, out, data, accelerator, models, prompts, optimizer, lr_scheduler,
                      unet_params + text_params)
    run.sums = run.zero_sums()
    return run


def _resume(run: TrainingRun) -> None:
    """With --resume: the checkpoint's weights, optimiser, schedule, random state and step count."""
    config = run.config
    resume_from = resolve_resume(run.out, config.resume) if config.resume else None
    if resume_from is None:
        return
    _check_checkpoint_settings(resume_from, config)  # before any tensor is copied
    tensors, state = load_checkpoint(resume_from, run.optimizer, run.lr_scheduler)
    load_trainable_tensors(run.models, tensors, resume_from)
    run.start_step, run.skipped = int(state["step"]), int(state.get("skipped_steps", 0))


def _prepare_for_device(run: TrainingRun) -> None:
    models = run.models
    models.unet_call, models.text_encoder_call, run.optimizer = run.accelerator.prepare(
        models.unet, models.text_encoder, run.optimizer)
    if resolve_compile(run.config.compile, run.accelerator.device.type):
        compile_models(models)
    models.unet.train()
    models.text_encoder.train()


def _open_run_folder(run: TrainingRun, job: ExitStack) -> None:
    """On the main process: the folder's lock (a second trainer is refused), config.json and split.json, the text
    log and TensorBoard. What is opened is closed by `job`, the lock last."""
    config, out = run.config, run.out
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        job.enter_context(folder_lock(out, "train"))
    job.callback(run.models.recorder.remove)  # the last thing training does, before the lock is released
    if not run.is_main:
        return
    write_run_files(out, config, run.data.split)
    handler = _setup_logging(out, run.is_main)
    job.callback(_remove_log_handler, handler)
    run.trackers = start_trackers(config.report_to, out, config)
    for tracker in run.trackers:
        job.callback(tracker.finish)
    log.info("training %s/%s on %d reference images (%d held out), steps %d -> %d", config.category,
             config.defect_type, len(run.data.references.images), run.data.n_held_out, run.start_step, config.steps)


TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(report_to: str) -> None:
    """--report-to names a tracker whose package is installed (tensorboard is a dependency; none needs none)."""
    package = TRACKER_PACKAGES.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise DefectFillError(f"--report-to {report_to}: the {package} package is not installed. Install it "
                              f"(pip install {package}), or choose --report-to tensorboard or none.")


def start_trackers(report_to: str, out: Path, config: TrainConfig) -> list[Any]:
    """accelerate's tracker for --report-to, started: TensorBoard's event files straight in logs/ (as before
    trackers: the same folder for tensorboard --logdir), wandb's run named after the run folder, mlflow's in
    logs/mlruns unless MLFLOW_TRACKING_URI names a server. wandb and mlflow get the settings; TensorBoard's
    hparams would add a folder per start, and config.json holds them."""
    if report_to == "none":
        return []
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    logs = out / LOGS_DIR
    if report_to == "tensorboard":
        tracker = TensorBoardTracker("", str(logs))
    elif report_to == "wandb":
        tracker = WandBTracker("defectfill", name=out.name, dir=str(logs))
    else:
        tracker = MLflowTracker(experiment_name="defectfill", logging_dir=str(logs / "mlruns"), run_name=out.name)
    tracker.start()
    if report_to != "tensorboard":
        tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                          for k, v in config.to_dict().items()})
    return [tracker]


def _remove_log_handler(handler: logging.Handler) -> None:
    logging.getLogger("defectfill").removeHandler(handler)
    handler.close()


def _progress(run: TrainingRun):
    from tqdm.auto import tqdm

    config = run.config
    return tqdm(total=config.steps, initial=run.start_step, desc=f"train {config.category}/{config.defect_type}",
                disable=not run.is_main, dynamic_ncols=True)


def _train_step(run: TrainingRun, step: int) -> tuple[torch.Tensor | None, list[float]]:
    """One optimiser step over `grad_accum` micro-batches; returns (the gradient norm, None when the step was
    skipped; the learning rates the step used). A step with a non-finite loss or gradient is skipped and counted;
    too many in a row stop the run."""
    config, accelerator, models = run.config, run.accelerator, run.models
    step_sums = run.zero_sums()
    for micro in range(config.grad_accum):
        refs = run.data.references
        batch = make_micro_batch(refs.images, refs.masks, config, step, micro, accelerator.process_index,
                                 accelerator.num_processes, refs.valid, run.data.groups)
        sync = micro == config.grad_accum - 1
        with ExitStack() as no_sync:
            if not sync:  # accumulate locally; gradients are all-reduced on the last micro-batch only
                no_sync.enter_context(accelerator.no_sync(models.unet_call))
                no_sync.enter_context(accelerator.no_sync(models.text_encoder_call))
            terms = defectfill_losses(models, batch, run.prompts, config, accelerator.device,
                                      autocast=accelerator.autocast)
            # Backward even through a non-finite loss: every rank must join every all-reduce, and
            # checking here would stall the device once per micro-batch. The step is judged below.
            accelerator.backward(terms.total / config.grad_accum)
        for k, v in terms.detached().items():
            step_sums[k] += v.float()
    step_lrs = [group["lr"] for group in run.optimizer.param_groups]  # the rates this step uses
    step_ok, grad_norm = _optimizer_step(accelerator, run.optimizer, run.params, step_sums["total"],
                                         config.max_grad_norm)
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # the schedule follows the step counter, skipped steps included
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
        run.lr_scheduler.step()
    if step_ok:
        run.nonfinite_in_a_row = 0
        for k, v in step_sums.items():  # skipped steps' losses stay out of the logged means
            run.sums[k] += v
        run.n_sums += config.grad_accum
        return grad_norm, step_lrs
    run.skipped += 1
    run.nonfinite_in_a_row += 1
    log.warning("step %d: non-finite loss or gradient; step skipped (%d skipped in all)", step, run.skipped)
    if run.nonfinite_in_a_row >= config.max_nonfinite_steps:
        raise DefectFillError(
            f"training stopped at step {step}: {run.nonfinite_in_a_row} steps in a row with a non-finite loss or "
            "gradient. Lower --lr-unet/--lr-text, or use --mixed-precision bf16 or no instead of fp16; "
            f"resume from the last good checkpoint in {run.out}."
        )
    return grad_norm, step_lrs


def _log_step(run: TrainingRun, done: int, step_lrs: list[float], grad_norm: torch.Tensor | None, progress) -> None:
    """The mean losses since the last log (and the step's rates, gradient norm, skipped steps) to TensorBoard,
    the progress bar, train.log (for people) and metrics.jsonl (for programs: the UI's curves)."""
    means = {k: float(v) / run.n_sums for k, v in run.sums.items()}
    skipped = run.skipped
    scalars = {**{f"loss/{k}": v for k, v in means.items()}, "lr/unet": step_lrs[0], "lr/text": step_lrs[1],
               "skipped_steps": skipped}
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    for tracker in run.trackers:
        tracker.log(scalars, step=done)
    progress.set_postfix(loss=f"{means['total']:.4f}", ldef=f"{means['defect']:.4f}",
                         lobj=f"{means['object']:.4f}", lattn=f"{means['attention']:.4f}")
    log.info("step %d loss %.5f def %.5f obj %.5f attn %.5f lr %.2e skipped %d", done, means["total"],
             means["defect"], means["object"], means["attention"], step_lrs[0], skipped)
    append_metrics(run.out, {"step": done, "loss": means, "lr": {"unet": step_lrs[0], "text": step_lrs[1]},
                             "grad_norm": None if grad_norm is None else float(grad_norm), "skipped_steps": skipped})
    run.sums = run.zero_sums()
    run.n_sums = 0


def _checkpoint(run: TrainingRun, step: int) -> None:
    """checkpoint-`step`, written by the main process once every process has finished the step."""
    run.accelerator.wait_for_everyone()
    if run.is_main:
        models, config = run.models, run.config
        save_checkpoint(run.out, step, trainable_tensors(models), run.optimizer.optimizer, run.lr_scheduler,
                        {"skipped_steps": run.skipped, "defectfill_version": defectfill.__version__,
                         "config": config.to_dict()},
                        functools.partial(write_weights, models=models, config=config))
        if config.checkpoints_total_limit is not None:  # the new one is in place: the oldest beyond N go
            for gone in prune_checkpoints(run.out, config.checkpoints_total_limit):
                log.info("removed %s (--checkpoints-total-limit %d)", gone.name, config.checkpoints_total_limit)


def _log_sample(run: TrainingRun, done: int) -> None:
    """A sample inpainting at this step, saved under logs/samples and shown in TensorBoard."""
    strip = sample_inpaintings(run.models, run.config, run.data.split, run.accelerator.autocast)
    sample_file = sample_path(run.out, done)
    sample_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(sample_file, functools.partial(strip.save, format="PNG"))
    for tracker in run.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(strip), done, dataformats="HWC")
        elif hasattr(tracker, "log_images"):  # wandb; mlflow has no images: they stay in logs/samples
            tracker.log_images({"samples": [np.asarray(strip)]}, step=done)
