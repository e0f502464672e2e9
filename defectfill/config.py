"""Training settings: defaults from DESIGN.md, a YAML file, then command-line flags.

Each setting is a dataclass field; its kebab-case flag (`lr_unet` -> `--lr-unet`)
and its YAML key (either spelling) are derived from the field name, so the
three stay in step. `config.json` in every run folder holds all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from defectfill.data.layouts import object_name
from defectfill.errors import DefectFillError
from defectfill.model import DEFAULT_MODEL


@dataclass
class TrainConfig:
    data: str | None = field(default=None, metadata={"help": "dataset root folder"})
    category: str | None = field(default=None, metadata={"help": "object category, e.g. hazelnut"})
    defect_type: str | None = field(default=None, metadata={"help": "defect type, e.g. hole"})
    output: str | None = field(default=None, metadata={"help": "run folder to write"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "diffusers inpainting pipeline: hub id or folder"})
    layout: str = field(default="auto", metadata={"help": "dataset layout", "choices": ["auto", "mvtec", "defectfill2", "folder"]})
    resolution: int = field(default=512, metadata={"help": "training image side in pixels"})
    steps: int = field(default=2000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=4, metadata={"help": "reference images per micro-batch (UNet batch is twice this)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    lr_unet: float = field(default=2e-4, metadata={"help": "learning rate of the UNet LoRA"})
    lr_text: float = field(default=4e-5, metadata={"help": "learning rate of the text-encoder LoRA (and a new token)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps (rate is lr*(step+1)/warmup)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (alpha = rank)"})
    lambda_def: float = field(default=0.5, metadata={"help": "weight of the defect loss"})
    lambda_obj: float = field(default=0.2, metadata={"help": "weight of the object loss"})
    lambda_attn: float = field(default=0.05, metadata={"help": "weight of the attention loss"})
    alpha: float = field(default=0.3, metadata={"help": "object-loss weight outside the defect"})
    token: str = field(default="sks", metadata={"help": "the rare word that stands for the defect, [V*]"})
    new_token: str | None = field(default=None, metadata={"help": "add this new word (e.g. '<hole>') with a trained embedding row instead of --token"})
    mixed_precision: str = field(default="no", metadata={"help": "autocast dtype; trainable weights stay fp32; auto: bf16 on GPUs that support it, else no", "choices": ["no", "fp16", "bf16", "auto"]})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations to save memory"})
    save_every: int = field(default=500, metadata={"help": "write checkpoint-N every this many steps"})
    sample_every: int = field(default=250, metadata={"help": "log sample inpaintings every this many steps (0: never)"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of the logged samples"})
    log_every: int = field(default=10, metadata={"help": "log scalars every this many steps"})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, augmentation, noise)"})
    defect_prompt: str = field(default="A photo of {token}", metadata={"help": "prompt of the defect branch"})
    object_prompt: str = field(default="A {object} with {token}", metadata={"help": "prompt of the object branch"})
    attn_size: int | None = field(default=None, metadata={"help": "side of the attention-loss maps (default latent/4: 16 at 512 px)"})
    num_boxes: int = field(default=30, metadata={"help": "boxes in the object branch's random mask"})
    box_min: float = field(default=0.03, metadata={"help": "smallest box side, fraction of the image side"})
    box_max: float = field(default=0.25, metadata={"help": "largest box side, fraction of the image side"})
    max_scale: float = field(default=1.125, metadata={"help": "largest random enlargement before cropping back"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "stop after this many steps in a row with a non-finite loss or gradient"})

    @property
    def prompt_token(self) -> str:
        return self.new_token or self.token

    def prompt(self, template: str) -> str:
        """A prompt template filled with this run's token and object name ("metal_nut" -> "metal nut")."""
        return template.format(token=self.prompt_token, object=object_name(self.category or ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings that may differ between a run and its continuation.
NON_IDENTITY_KEYS = {"output", "resume", "steps", "save_every", "sample_every", "sample_steps", "log_every", "data"}
REQUIRED = ("data", "category", "defect_type", "output")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so a --config file can fill them."""
    parser.add_argument("--config", help="YAML file of settings; flags override it")
    for f in fields(TrainConfig):
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {f.default})"}
        if f.type in ("bool",) or isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("attn_size",):
                kwargs["type"] = int
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)


def load_yaml_settings(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise DefectFillError(f"{path}: config file not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DefectFillError(f"{path}: not valid YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise DefectFillError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}.")
    known = {f.name for f in fields(TrainConfig)}
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise DefectFillError(f"{path}: unknown setting {key!r}. Known settings: {', '.join(sorted(known))}.")
        settings[name] = value
    return settings


def make_config(settings: dict[str, Any], config_file: str | None = None, require: bool = True) -> TrainConfig:
    """Defaults <- YAML file <- explicit settings, type-checked, with required settings present."""
    merged = load_yaml_settings(config_file) if config_file else {}
    merged.update({k: v for k, v in settings.items() if k != "config"})
    types = {f.name: f for f in fields(TrainConfig)}
    for name, value in list(merged.items()):
        default = types[name].default
        if value is None or default is None and isinstance(value, str):
            continue
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                merged[name] = type(default)(value)
        except (TypeError, ValueError) as exc:
            raise DefectFillError(f"setting {name}: {exc}") from None
    config = TrainConfig(**merged)
    if require:
        missing = [_flag(n) for n in REQUIRED if getattr(config, n) in (None, "")]
        if missing:
            raise DefectFillError(f"missing required setting(s): {', '.join(missing)}.")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    checks = [
        (config.resolution >= 8 and config.resolution % 8 == 0, "--resolution must be a positive multiple of 8"),
        (config.steps >= 1, "--steps must be at least 1"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.grad_accum >= 1, "--grad-accum must be at least 1"),
        (config.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
        (config.lora_rank >= 1, "--lora-rank must be at least 1"),
        (config.save_every >= 1, "--save-every must be at least 1"),
        (config.sample_every >= 0, "--sample-every must be 0 or more"),
        (min(config.lambda_def, config.lambda_obj, config.lambda_attn) >= 0, "loss weights must be 0 or more"),
        (config.lambda_def + config.lambda_obj + config.lambda_attn > 0, "at least one loss weight must be positive"),
        (0 <= config.alpha <= 1, "--alpha must be in [0, 1]"),
        (0 < config.box_min <= config.box_max <= 1, "need 0 < --box-min <= --box-max <= 1"),
        (config.max_scale >= 1, "--max-scale must be 1 or more"),
        ("{token}" in config.defect_prompt and "{token}" in config.object_prompt, "prompts must contain {token}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DefectFillError(message + ".")
