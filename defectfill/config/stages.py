"""Every stage's settings: defaults from docs/method.md, a YAML file, then command-line flags.

Each setting is a dataclass field; its kebab-case flag (`lr_unet` -> `--lr-unet`),
its YAML key (either spelling) and its recorded JSON key are derived from the
field name by `defectfill.config.settings.Settings`, so the three stay in step.

- `TrainConfig`: `defectfill train`; recorded as `config.json` in the run folder.
- `GenerateConfig`: `defectfill generate`; recorded in `generate.json`.
- `EvaluateConfig`: `defectfill evaluate`; recorded in `metrics.json`.
- `RunConfig`: `defectfill run`, which composes the three; recorded as `run.json`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from defectfill.config.sampling import (
    SCHEDULERS,  # noqa: F401 - also served as the old name defectfill.config.SCHEDULERS
    SamplingConfig,
    prompt_problem,
    resolve_sampling,
    sampling_field,
)
from defectfill.config.settings import PRECISIONS, Settings, check_all
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import check_plain_name
from defectfill.data.layouts import LAYOUTS as DATA_LAYOUTS
from defectfill.data.layouts import object_name
from defectfill.data.masks import SHAPES, parse_mask_scale, parse_shapes
from defectfill.model.names import DEFAULT_MODEL

# bounds shared by several settings (declared on each field): what numpy and torch seeds accept, and sizes past
# which a job would exhaust memory or run for years before its first result
MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
MAX_BATCH = 4096
MAX_STEPS = 10_000_000
MAX_COUNT = 1_000_000

LAYOUTS = ["auto", *DATA_LAYOUTS]
DOWNSTREAM = ["none", "classify", "localize", "both"]
COMPILE_CHOICES = ["auto", "yes", "no"]
EXECUTORS = ["local", "ray"]
REPORT_TO = ["tensorboard", "wandb", "mlflow", "none"]  # accelerate's trackers `train --report-to` offers
MULTI_DEFECT = ["sequential", "joint"]
ATTN_SCALES = ["coarsest", "all"]
EXPORT_FORMATS = ("coco", "hf", "labelstudio", "mvtec")  # `defectfill export --to`, `run --export`
COMPILE_HELP = "torch.compile (auto: on a GPU, where it pays; not on a CPU, where it was measured slower):"
PRECISION_HELP = ("precision: auto (bf16 on GPUs that support it, fp16 on other CUDA GPUs, full on a CPU), "
                  "no (full), fp16, bf16")


# --------------------------------------------------------------------------- train


@dataclass
class TrainConfig(Settings):
    data: str | None = field(default=None, metadata={"help": "dataset root folder", "identity": False})
    category: str | None = field(default=None, metadata={"help": "object category, e.g. hazelnut"})
    defect_type: str | None = field(default=None, metadata={"help": "defect type, e.g. hole; 'all' or a comma list (hole,crack) trains one model for the object, with a new token per type (<hole>, <crack>)"})
    output: str | None = field(default=None, metadata={"help": "run folder to write", "identity": False})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "diffusers inpainting pipeline: hub id, folder, or the built-in defectfill-mini"})
    layout: str = field(default="auto", metadata={"help": "dataset layout", "choices": LAYOUTS})
    good_images: str | None = field(default=None, metadata={"help": "folder of defect-free images for an annotation export (coco, yolo, cvat, labelstudio; relative: inside --data); default: good/, else the images without annotations"})
    resolution: int = field(default=512, metadata={"help": "training image side in pixels", "min": 8, "max": MAX_SIDE})
    steps: int = field(default=2000, metadata={"help": "optimiser steps", "min": 1, "max": MAX_STEPS, "identity": False})
    batch_size: int = field(default=4, metadata={"help": "reference images per micro-batch (UNet batch is twice this)", "min": 1, "max": MAX_BATCH})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step", "min": 1, "max": MAX_BATCH})
    lr_unet: float = field(default=2e-4, metadata={"help": "learning rate of the UNet LoRA", "min": 0})
    lr_text: float = field(default=4e-5, metadata={"help": "learning rate of the text-encoder LoRA (and a new token)", "min": 0})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps (rate is lr*(step+1)/warmup)", "min": 0})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (alpha = rank)", "min": 1, "max": 1024})
    lambda_def: float = field(default=0.5, metadata={"help": "weight of the defect loss", "min": 0})
    lambda_obj: float = field(default=0.2, metadata={"help": "weight of the object loss", "min": 0})
    lambda_attn: float = field(default=0.05, metadata={"help": "weight of the attention loss", "min": 0})
    alpha: float = field(default=0.3, metadata={"help": "object-loss weight outside the defect", "min": 0, "max": 1})
    token: str = field(default="sks", metadata={"help": "the rare word that stands for the defect, [V*]"})
    new_token: str | None = field(default=None, metadata={"help": "add this new word (e.g. '<hole>') with a trained embedding row instead of --token"})
    mixed_precision: str = field(default="auto", metadata={"help": "autocast " + PRECISION_HELP + "; trainable weights stay fp32", "choices": PRECISIONS, "identity": False})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations to save memory"})
    compile: str = field(default="auto", metadata={"help": COMPILE_HELP + " the UNet and the VAE encoder", "choices": COMPILE_CHOICES, "identity": False})
    save_every: int = field(default=500, metadata={"help": "write checkpoint-N every this many steps", "min": 1, "identity": False})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoint-* folders: the older ones are deleted once a new one is written (default: keep every one)", "min": 1, "identity": False})
    report_to: str = field(default="tensorboard", metadata={"help": "where the losses, rates and samples are logged, through accelerate's trackers: tensorboard (in logs/), wandb or mlflow (each when installed; mlflow's local store in logs/mlruns unless MLFLOW_TRACKING_URI says), none (metrics.jsonl and train.log only)", "choices": REPORT_TO, "identity": False})
    sample_every: int = field(default=250, metadata={"help": "log sample inpaintings every this many steps (0: never)", "min": 0, "identity": False})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of the logged samples", "min": 1, "max": 1000, "identity": False})
    token_check: bool = field(default=True, metadata={"help": "after training, the token self-check: paint a few held-out masks with and without the token and say whether the token carries the defect (token_check.json; --no-token-check: skip)", "identity": False})
    token_check_masks: int = field(default=4, metadata={"help": "masks the token self-check paints", "min": 1, "max": 100, "identity": False})
    token_check_steps: int = field(default=10, metadata={"help": "sampling steps of each token self-check painting", "min": 1, "max": 1000, "identity": False})
    log_every: int = field(default=10, metadata={"help": "log scalars every this many steps", "min": 1, "identity": False})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from", "identity": False})
    seed: int = field(default=0, metadata={"help": "random seed (data order, augmentation, noise)", "min": 0, "max": MAX_SEED})
    defect_prompt: str = field(default="A photo of {token}", metadata={"help": "prompt of the defect branch"})
    object_prompt: str = field(default="A {object} with {token}", metadata={"help": "prompt of the object branch"})
    attn_size: int | None = field(default=None, metadata={"help": "side of the attention-loss maps (default: the coarsest decoder cross-attention grid, 16 for SD2 at 512 px, 8 for defectfill-mini at 64 px)", "min": 1, "max": MAX_SIDE})
    attn_scales: str = field(default="coarsest", metadata={"help": "grids of L_attn: 'coarsest' (one map, every decoder cross-attention layer averaged on --attn-size) or 'all' (one map and one L_attn per decoder grid, averaged)", "choices": ATTN_SCALES})
    lambda_attn_consistency: float = field(default=0.0, metadata={"help": "weight of the agreement between the decoder grids' token maps, each resized to the coarsest (0: off)", "min": 0})
    lambda_perceptual: float = field(default=0.0, metadata={"help": "weight of the decoded pixel loss: the VAE-decoded x0 prediction of the defect branch against the reference, mean absolute error inside the defect mask (0: off; costs a VAE decode with gradient)", "min": 0})
    num_boxes: int = field(default=30, metadata={"help": "boxes in the object branch's random mask", "min": 0, "max": 10_000})
    box_min: float = field(default=0.03, metadata={"help": "smallest box side, fraction of the image side", "above": 0, "max": 1})
    box_max: float = field(default=0.25, metadata={"help": "largest box side, fraction of the image side", "above": 0, "max": 1})
    max_scale: float = field(default=1.125, metadata={"help": "largest random enlargement before cropping back", "min": 1})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay", "min": 0})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm", "above": 0})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "stop after this many steps in a row with a non-finite loss or gradient", "min": 1})

    required = ("data", "category", "defect_type", "output")
    help_default_group = "training"
    help_groups = {
        "data": ("data", "category", "defect_type", "layout", "good_images", "resolution"),
        "model": ("model", "lora_rank", "token", "new_token", "defect_prompt", "object_prompt"),
        "checkpoints and logging": ("output", "save_every", "checkpoints_total_limit", "sample_every", "sample_steps",
                                    "log_every", "report_to", "resume", "token_check", "token_check_masks",
                                    "token_check_steps"),
        "execution": ("mixed_precision", "gradient_checkpointing", "compile"),
    }

    @property
    def prompt_token(self) -> str:
        """The token of a per-type run (`--new-token` or `--token`); per-object runs have one per type (`type_token`)."""
        return self.new_token or self.token

    def prompt(self, template: str, token: str | None = None) -> str:
        """A prompt template filled with a token (default this run's) and the object name ("metal_nut" -> "metal nut")."""
        return template.format(token=token or self.prompt_token, object=object_name(self.category or ""))

    @property
    def per_object(self) -> bool:
        """One model for the object: `--defect-type all` or a comma list (as recorded: the resolved list)."""
        return per_object_types(self.defect_type)

    def defect_types(self) -> list[str]:
        """The types of `--defect-type` as written (one, a comma list, or ["all"] before `train` resolves it)."""
        return split_types(self.defect_type)

    def type_tokens(self) -> dict[str, str]:
        """Each trained type's prompt token: per-object runs `<type>`, a per-type run its one token."""
        if self.per_object:
            return {t: type_token(t) for t in self.defect_types()}
        return {self.defect_type or "": self.prompt_token}

    def validate(self) -> None:
        self.check_declared()  # the bounds in the fields' metadata
        check_all([
            (self.resolution >= 8 and self.resolution % 8 == 0, "--resolution must be a positive multiple of 8"),
            (self.lambda_def + self.lambda_obj + self.lambda_attn + self.lambda_attn_consistency
             + self.lambda_perceptual > 0, "at least one loss weight must be positive"),
            (self.attn_scales in ATTN_SCALES, f"--attn-scales {self.attn_scales!r}: choose one of "
             + ", ".join(ATTN_SCALES)),
            (0 < self.box_min <= self.box_max <= 1, "need 0 < --box-min <= --box-max <= 1"),
            (bool(self.token.strip()), "--token must not be empty"),
        ])
        for template, what in ((self.defect_prompt, "--defect-prompt"), (self.object_prompt, "--object-prompt")):
            problem = prompt_problem(template, what)
            if problem:
                raise DefectFillError(problem + ".")
        names = [(self.category, "--category")] + [(t, "--defect-type") for t in self.defect_types()]
        for name, what in names:
            if name is not None:  # each names a folder of the run, generated data and reports
                check_plain_name(name, what)
        if self.defect_type is not None and not self.defect_types():
            raise DefectFillError(f"--defect-type {self.defect_type!r}: name a defect type, 'all' or a comma list.")
        if self.new_token is not None and not self.new_token.strip():
            raise DefectFillError("--new-token must not be empty (leave it out to use --token).")
        if self.new_token is not None and self.per_object:
            raise DefectFillError(f"--new-token with --defect-type {self.defect_type}: one model per object gives "
                                  "each defect type its own new token (<type>); leave --new-token out.")


def split_types(value: str | None) -> list[str]:
    """`hole` -> [hole]; `hole, crack` -> [hole, crack] (order kept, repeats dropped); None -> []."""
    return list(dict.fromkeys(t.strip() for t in (value or "").split(",") if t.strip()))


def per_object_types(value: str | None) -> bool:
    """Whether a `--defect-type` value asks for one model per object: `all`, or two or more types."""
    types = split_types(value)
    return types == ["all"] or len(types) > 1


def type_token(defect_type: str) -> str:
    """The new word of a defect type in a per-object run: `<hole>`, `<chunk_of_wax_missing>`."""
    return f"<{defect_type}>"


# Settings that may differ between a run and its continuation (declared "identity": False on the field).
NON_IDENTITY_KEYS = TrainConfig.non_identity_names()


# --------------------------------------------------------------------------- generate


def sampling_checks(candidates: int, steps: int | None, guidance: float | None, feather: int,
                    batch_size: int | None) -> list[tuple[bool, str]]:
    """SamplingConfig's declared bounds as (ok, message) checks, for callers of the earlier API (None: not set,
    the base's recommendation applies)."""
    try:
        SamplingConfig(candidates=candidates, steps=steps, guidance=guidance, feather=feather,
                       batch_size=batch_size).check_declared()
    except DefectFillError as exc:
        return [(False, str(exc))]
    return []


@dataclass
class GenerateConfig(Settings):
    run: str | None = field(default=None, metadata={"help": "run folder written by `defectfill train`; with --defect-types, several per-type runs may be given, comma-separated"})
    output: str | None = field(default=None, metadata={"help": "output dataset folder (MVTec layout)"})
    count: int | None = field(default=None, metadata={"help": "number of defect images to write", "min": 1, "max": MAX_COUNT})
    defect_type: str | None = field(default=None, metadata={"help": "the defect type to draw from a run trained on several (one model per object); default: the run's one type"})
    defect_types: list[str] | None = field(default=None, metadata={"help": "several defects in one image, comma-separated (e.g. broken_large,contamination): painted one after the other, each in its own mask with its own token and Low-Fidelity Selection; written as the combined type a+b with the union mask"})
    images: str | None = field(default=None, metadata={"help": "folder of defect-free images (default: the category's train/good)"})
    masks: str = field(default="held-out", metadata={"help": "'held-out' (masks of the run's held-out defect images), 'shapes', or a folder of masks"})
    shapes: str = field(default=",".join(SHAPES), metadata={"help": "shapes for --masks shapes, comma-separated"})
    mask_scale: str = field(default="0.005,0.05", metadata={"help": "area range of shape masks, fractions MIN,MAX"})
    # the sampling settings, declared once in `config.sampling.SamplingConfig` (`sampling`: them as one)
    candidates: int = sampling_field("candidates")
    steps: int | None = sampling_field("steps")
    guidance: float | None = sampling_field("guidance")
    unconditional: str | None = sampling_field("unconditional")
    scheduler: str = sampling_field("scheduler")
    prompt: str | None = sampling_field("prompt")
    feather: int = sampling_field("feather")
    latent_blend: bool = sampling_field("latent_blend")
    multi_defect: str = field(default="sequential", metadata={"help": "with --defect-types: 'sequential' paints each defect into the result of the one before (its own prompt, its own LFS); 'joint' paints them all in one pass from one run trained on every type (one model per object), one prompt with every token, each token's cross-attention steered to its own mask", "choices": MULTI_DEFECT})
    seed: int = field(default=0, metadata={"help": "base seed; each item's seed derives from it and its index", "min": 0, "max": MAX_SEED})
    batch_size: int | None = sampling_field("batch_size")
    batch_images: int = sampling_field("batch_images")
    background_writes: bool = field(default=True, metadata={"help": "encode and write each item's PNG files on a writer thread while the next images sample (--no-background-writes: on the sampling thread); the same files either way", "identity": False})
    with_good: bool = field(default=True, metadata={"help": "link the defect-free source images into <category>/train/good, so anomalib's MVTec loaders can train on the folder (--no-with-good: leave them out)"})
    save_candidates: bool = field(default=False, metadata={"help": "also write every candidate to candidates/"})
    save_attention: bool = field(default=False, metadata={"help": "also write the token's cross-attention map of each chosen image to attention/"})
    lpips_weights: str | None = field(default=None, metadata={"help": "local AlexNet weights for LPIPS (offline machines)"})
    lpips_random_backbone: bool = field(default=False, metadata={"help": "LPIPS with an untrained AlexNet (no download): for offline demos and tests only, its scores do not measure perceptual difference"})
    preview_rows: int = field(default=8, metadata={"help": "rows of preview.png", "min": 0, "max": 1000})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, mps (default: accelerate's device)"})
    mixed_precision: str = field(default="auto", metadata={"help": "pipeline weights " + PRECISION_HELP, "choices": PRECISIONS})
    merge_lora: bool = field(default=True, metadata={"help": "merge the LoRA into the weights for sampling (the run's files stay as they are); --no-merge-lora keeps the LoRA layers"})
    compile: str = field(default="auto", metadata={"help": COMPILE_HELP + " the UNet", "choices": COMPILE_CHOICES})
    resume: bool = field(default=False, metadata={"help": "add to an output folder holding other results"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results in the output folder"})

    required = ("run", "output", "count")
    help_default_group = "generation"
    help_groups = {
        "sampling": (*(f.name for f in dataclasses.fields(SamplingConfig)), "seed"),
        "Low-Fidelity Selection": ("lpips_weights", "lpips_random_backbone"),
        "output": ("output", "with_good", "save_candidates", "save_attention", "preview_rows", "resume", "overwrite",
                   "background_writes"),
        "execution": ("device", "mixed_precision", "merge_lora", "compile"),
    }

    def validate(self) -> None:
        self.check_declared()  # the bounds in the fields' metadata
        check_all([
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other; pass one"),
            (not (self.defect_type and self.defect_types),
             "--defect-type and --defect-types exclude each other: one type, or several painted into each image"),
            (self.multi_defect in MULTI_DEFECT, f"--multi-defect {self.multi_defect!r}: choose one of "
             + ", ".join(MULTI_DEFECT)),
            (self.multi_defect == "sequential" or len(self.defect_types or []) > 1,
             "--multi-defect joint paints several defect types into each image: give them with --defect-types A,B"),
        ])
        self.sampling.validate()  # the prompt template (the bounds are checked above, as this class's)
        self.scale()
        if self.masks == "shapes":
            parse_shapes(self.shapes)

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling settings as one `SamplingConfig` (what `DefectGenerator` takes)."""
        return SamplingConfig(**{name: getattr(self, name) for name in SamplingConfig.__dataclass_fields__})

    def sampling_for(self, model: str) -> GenerateConfig:
        """A copy with the sampling settings left unset filled as the base `model` recommends (`config.sampling`)."""
        return dataclasses.replace(self, **resolve_sampling(
            model, prompt=self.prompt, guidance=self.guidance, steps=self.steps, unconditional=self.unconditional))

    def scale(self) -> tuple[float, float]:
        """The area range of shape masks, (min, max) fractions of the image."""
        return parse_mask_scale(self.mask_scale)

    def painted_types(self) -> list[str] | None:
        """The defect types asked for, in painting order (--defect-types, or --defect-type); None: the run's one."""
        if self.defect_types:
            return list(self.defect_types)
        return [self.defect_type] if self.defect_type else None

    def identity(self) -> dict[str, Any]:
        """The settings that decide what an output folder holds: another value means other results."""
        identity = {"masks": self.masks, "shapes": self.shapes, "mask_scale": list(self.scale()),
                    "candidates": self.candidates, "steps": self.steps, "guidance": self.guidance,
                    "scheduler": self.scheduler, "prompt": self.prompt, "feather": self.feather, "seed": self.seed,
                    "images": self.images}
        if self.unconditional not in (None, "tuned"):  # only when not stock CFG: older folders keep their identity
            identity["unconditional"] = self.unconditional
        if self.painted_types():  # only when asked: folders written before these settings keep their identity
            identity["defect_types"] = self.painted_types()
        if self.latent_blend:  # likewise: only the options that are on
            identity["latent_blend"] = True
        if self.multi_defect != "sequential":
            identity["multi_defect"] = self.multi_defect
        return identity


# --------------------------------------------------------------------------- evaluate


@dataclass
class DownstreamSettings:
    """The downstream inspection models' settings (`evaluate.metrics.downstream`), from `EvaluateConfig`."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    image_size: int = 256
    seed: int = 0
    pretrained: bool = True
    device: str = "cpu"
    # how the real dataset's mask files are read (`images.load_mask`): "half", or "nonzero" for VisA's
    # instance-id masks; generated masks are 0/255, which both rules read alike
    mask_rule: str = "half"

    def check(self) -> None:
        if self.epochs < 1:
            raise DefectFillError(f"--epochs must be at least 1 (got {self.epochs}).")
        if self.batch_size < 1:
            raise DefectFillError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if not self.lr > 0:
            raise DefectFillError(f"--lr must be positive (got {self.lr}).")
        if self.image_size < 32:
            raise DefectFillError(f"--image-size must be at least 32 (got {self.image_size}).")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvaluateConfig(Settings):
    generated: str | None = field(default=None, metadata={"help": "folder of generated images in the MVTec layout (as `defectfill generate` writes)"})
    output: str | None = field(default=None, metadata={"help": "folder for metrics.json, report.html, report.md"})
    run: str | None = field(default=None, metadata={"help": "training run folder: its category, defect type and held-out split"})
    data: str | None = field(default=None, metadata={"help": "real dataset root (instead of --run, or for --downstream)"})
    category: str | None = field(default=None, metadata={"help": "category to evaluate (with --data)"})
    defect_type: str | None = field(default=None, metadata={"help": "one defect type (with --data; or with --run of a model trained on several types, where it is needed); default: every type of the category"})
    layout: str = field(default="auto", metadata={"help": "layout of --data", "choices": LAYOUTS})
    downstream: str = field(default="none", metadata={"help": "also train the inspection models on generated data and test them on real data", "choices": DOWNSTREAM})
    kid: bool = field(default=True, metadata={"help": "compute KID (--no-kid: skip)"})
    ic_lpips: bool = field(default=True, metadata={"help": "compute IC-LPIPS (--no-ic-lpips: skip)"})
    token_check: bool = field(default=True, metadata={"help": "with --run: the token self-check, painting a few of the run's masks with and without its token (metrics.json, the report; --no-token-check: skip)"})
    token_check_masks: int = field(default=4, metadata={"help": "masks the token self-check paints", "min": 1, "max": 100})
    token_check_steps: int = field(default=10, metadata={"help": "sampling steps of each token self-check painting", "min": 1, "max": 1000})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID subset size (reduced to the smaller image set; the size used is reported)", "min": 2, "max": MAX_COUNT})
    kid_subsets: int = field(default=100, metadata={"help": "number of KID subsets", "min": 1, "max": 100_000})
    inception_weights: str | None = field(default=None, metadata={"help": "local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth"})
    lpips_weights: str | None = field(default=None, metadata={"help": "local torchvision AlexNet weights for LPIPS"})
    lpips_size: int = field(default=256, metadata={"help": "image size at which LPIPS is computed", "min": 32, "max": MAX_SIDE})
    grid_samples: int = field(default=8, metadata={"help": "samples per row of the report's grid", "min": 1, "max": 100})
    epochs: int = field(default=20, metadata={"help": "downstream training epochs", "min": 1, "max": 100_000})
    batch_size: int = field(default=16, metadata={"help": "downstream batch size", "min": 1, "max": MAX_BATCH})
    lr: float = field(default=1e-4, metadata={"help": "downstream learning rate (Adam)", "above": 0})
    image_size: int = field(default=256, metadata={"help": "downstream image size (multiple of 32)", "min": 32, "max": MAX_SIDE})
    seed: int = field(default=0, metadata={"help": "seed for KID subsets and downstream training", "min": 0, "max": MAX_SEED})
    pretrained: bool = field(default=True, metadata={"help": "ImageNet-pretrained downstream backbones (--no-pretrained: from scratch)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})

    required = ("generated", "output")
    help_default_group = "evaluation"
    help_groups = {
        "data": ("generated", "run", "data", "category", "defect_type", "layout"),
        "inspection models": ("downstream", "epochs", "batch_size", "lr", "image_size", "seed", "pretrained"),
        "output": ("output", "grid_samples"),
        "execution": ("device",),
    }

    def validate(self) -> None:
        self.check_declared()  # the bounds in the fields' metadata (the downstream models' too)
        check_all([
            (self.kid or self.ic_lpips or self.downstream != "none",
             "Nothing to evaluate: --no-kid and --no-ic-lpips without --downstream. Drop one"),
        ])

    def downstream_settings(self):
        """The downstream models' settings (device left as given: `auto` is resolved where they run)."""
        return DownstreamSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                  image_size=self.image_size, seed=self.seed, pretrained=self.pretrained,
                                  device=self.device)


# --------------------------------------------------------------------------- run


class TypeFolders(Protocol):
    """A defect type's folders in a `run` job folder (`outputs.job_folder.TypeFolders`)."""

    run: Path
    generated: Path
    eval: Path


# the folders validation derives each stage's settings with (nothing is written)
_PLACEHOLDER_FOLDERS = SimpleNamespace(run=Path("x"), generated=Path("x"), eval=Path("x"))


def _selection(names: list[str] | None, one: str | None) -> list[str] | None:
    """A list of names, one name, or None for all ("all" too)."""
    names = names or ([one] if one else None)
    return None if names in (None, ["all"]) else names


@dataclass
class RunConfig(Settings):
    """`defectfill run`: its own settings, and those of the three stages it runs for each defect type.

    The stage settings that are the same for every type are flat settings of `run` (the mapping
    in each stage field: stage name -> run's name). The rest (each type's category, folders,
    seed of generation) are filled per type by `train_config`, `generate_config` and
    `evaluate_config`.
    """

    output: str | None = field(default=None, metadata={"help": "folder of the whole run (runs/, generated/, synth/, eval/, report)"})
    categories: list[str] | None = field(default=None, metadata={"help": "comma-separated categories, or all (default: every category, or --category)"})
    defect_types: list[str] | None = field(default=None, metadata={"help": "comma-separated defect types, or all (default: every type, or --defect-type)"})
    category: str | None = field(default=None, metadata={"help": "one category (as --categories C)"})
    defect_type: str | None = field(default=None, metadata={"help": "one defect type (as --defect-types T)"})
    downstream: str = field(default="none", metadata={"help": "also train and test the inspection models per category", "choices": DOWNSTREAM})
    dry_run: bool = field(default=False, metadata={"help": "print the plan; load no model"})
    executor: str = field(default="local", metadata={"help": "where each defect type is trained, generated and evaluated: local (one after another in this process) or ray (one Ray task per type, over the cluster; pip install 'defectfill[ray]')", "choices": EXECUTORS, "identity": False})
    ray_address: str | None = field(default=None, metadata={"help": "with --executor ray: the Ray cluster to join ('auto': the one this machine is part of, or ADDRESS:PORT of its head); default: start a Ray on this machine for this run", "identity": False})
    gpus_per_task: float = field(default=1.0, metadata={"help": "with --executor ray: GPUs each defect type's task asks for (0: CPU only; 0.5: two types share a GPU)", "min": 0, "identity": False})
    task_retries: int = field(default=3, metadata={"help": "with --executor ray: times a task whose worker or node died is run again; it resumes from its last checkpoint", "min": 0, "identity": False})
    shard: str | None = field(default=None, metadata={"help": "I/N: process only the I-th of N disjoint slices of the plan (e.g. one Slurm array job each); writes no report, --report-only assembles it", "identity": False})
    report_only: bool = field(default=False, metadata={"help": "train, generate and evaluate nothing: assemble synth/, the report and summary.json from what the output folder holds (after --shard jobs); runs --downstream", "identity": False})
    one_model_per_object: bool = field(default=False, metadata={"help": "train one model per category (a new token per defect type, runs/<category>/) instead of one per defect type; every type is generated from it"})
    export: str | None = field(default=None, metadata={"help": "after synth/, also export every generated image as " + "|".join(EXPORT_FORMATS) + " (comma-separated, e.g. coco,hf) into <output>/export/<format>/, as `defectfill export` does"})
    export_prefix: str = field(default="synth_", metadata={"help": "start of every exported file name, so synthetic files never collide with the real ones"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"stage": {
        name: name for name in (f.name for f in dataclasses.fields(TrainConfig))
        if name not in ("category", "defect_type", "output", "resume")}})
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(count=100), metadata={"stage": {
        "count": "count", "images": "images", "masks": "masks", "shapes": "shapes", "mask_scale": "mask_scale",
        "candidates": "candidates", "steps": "generate_steps", "guidance": "guidance",
        "unconditional": "unconditional", "scheduler": "scheduler",
        "prompt": "prompt", "feather": "feather", "batch_size": "generate_batch_size", "latent_blend": "latent_blend",
        "batch_images": "batch_images",
        "with_good": "with_good", "save_candidates": "save_candidates", "save_attention": "save_attention", "lpips_weights": "lpips_weights",
        "lpips_random_backbone": "lpips_random_backbone", "preview_rows": "preview_rows", "device": "device",
        "merge_lora": "merge_lora"}})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"stage": {
        "kid_subset_size": "kid_subset_size", "kid_subsets": "kid_subsets", "inception_weights": "inception_weights",
        "lpips_size": "lpips_size", "grid_samples": "grid_samples", "epochs": "downstream_epochs",
        "batch_size": "downstream_batch_size", "lr": "downstream_lr", "image_size": "downstream_image_size",
        "pretrained": "downstream_pretrained", "seed": "downstream_seed", "kid": "kid", "ic_lpips": "ic_lpips"}})

    required = ("data", "output")
    help_default_group = "execution"
    help_groups = {
        "data": ("categories", "defect_types", "category", "defect_type"),
        "model": ("one_model_per_object",),
        "inspection models": ("downstream",),
        "output": ("output", "export", "export_prefix"),
    }

    def selected_categories(self) -> list[str] | None:
        """The categories to run; None for every category of the dataset."""
        return _selection(self.categories, self.category)

    def selected_defect_types(self) -> list[str] | None:
        """The defect types to run; None for every type of each category."""
        return _selection(self.defect_types, self.defect_type)

    def shard_slice(self) -> tuple[int, int] | None:
        """(I, N) of --shard I/N (1 <= I <= N), or None for the whole plan."""
        if self.shard is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.shard)
        if not match:
            raise DefectFillError(f"--shard {self.shard!r}: expected I/N, e.g. --shard 1/4 for the first of four "
                                  "slices (a Slurm array: --shard $SLURM_ARRAY_TASK_ID/N with --array=1-N).")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 1 <= index <= count:
            raise DefectFillError(f"--shard {self.shard}: I must be between 1 and N (N at least 1): --shard 1/{max(count, 1)} "
                                  f"... --shard {max(count, 1)}/{max(count, 1)}.")
        return index, count

    def recorded(self) -> dict[str, Any]:
        """run.json: every flat setting except those of the invocation (RUN_NON_IDENTITY_KEYS), so the local,
        Ray and sharded runs of one job record the same run."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_NON_IDENTITY_KEYS}

    # ------------------------------------------------------------------ each type's stage settings
    # `folders`: the type's folders in the job folder (`outputs.job_folder.JobFolder.type_folders`: its run,
    # generated and eval paths), which the layer that writes the job folder knows

    def train_config(self, category: str, defect_type: str, folders: TypeFolders,
                     object_types: list[str] | None = None) -> TrainConfig:
        """The training of `defect_type`; one model per object: of `object_types` (the category's planned types)
        together."""
        trained = ",".join(object_types) if self.one_model_per_object and object_types else defect_type
        return dataclasses.replace(self.train, category=category, defect_type=trained,
                                   output=str(folders.run)).named_as(self.stage_renames("train"))

    def generate_config(self, category: str, defect_type: str, folders: TypeFolders) -> GenerateConfig:
        # the run's precision and seed carry over, so one setting decides both stages
        return dataclasses.replace(self.generate, run=str(folders.run), output=str(folders.generated),
                                   seed=self.train.seed, mixed_precision=self.train.mixed_precision,
                                   compile=self.train.compile,
                                   defect_type=defect_type if self.one_model_per_object else None).named_as(
                                       self.stage_renames("generate"))

    def evaluate_config(self, category: str, defect_type: str, folders: TypeFolders) -> EvaluateConfig:
        return dataclasses.replace(
            self.evaluate, generated=str(folders.generated), output=str(folders.eval), run=str(folders.run),
            downstream="none", lpips_weights=self.generate.lpips_weights,
            lpips_size=min(self.evaluate.lpips_size, self.train.resolution),
            device=self.generate.device or "auto",
            defect_type=defect_type if self.one_model_per_object else self.evaluate.defect_type,
        ).named_as(self.stage_renames("evaluate"))

    def downstream_config(self, category: str, synth: Path, output: Path) -> EvaluateConfig:
        return dataclasses.replace(
            self.evaluate, generated=str(synth), output=str(output), data=self.train.data, category=category,
            layout=self.train.layout, downstream=self.downstream, kid=False, ic_lpips=False,
            device=self.generate.device or "auto",
        ).named_as(self.stage_renames("evaluate"))

    def validate(self) -> None:
        """Every stage's settings are checked here, before any work starts, each named by run's flag."""
        self.check_declared()  # the bounds in the fields' metadata, the stages' under run's names
        check_all([
            (self.ray_address is None or self.executor == "ray",
             f"--ray-address {self.ray_address}: only used with --executor ray; add --executor ray"),
            (not (self.report_only and self.shard),
             "--report-only assembles the report of every shard: pass it without --shard"),
            (not (self.report_only and self.dry_run), "--report-only and --dry-run exclude each other; pass one"),
            (self.export is None or (bool(self.export.strip()) and all(
                n.strip().lower() in EXPORT_FORMATS for n in self.export.split(",") if n.strip())),
             f"--export {self.export!r}: choose one or more of {', '.join(EXPORT_FORMATS)}, joined by commas (e.g. coco,hf)"),
            (re.fullmatch(r"[A-Za-z0-9._-]*", self.export_prefix) is not None,
             f"--export-prefix {self.export_prefix!r}: use letters, digits, '.', '_' or '-' only (it starts file names)"),
            # the types of a category share one training (runs/<category>): tasks or shards split per type
            # would train it side by side, so one model per object runs in one local job
            (not (self.one_model_per_object and (self.executor != "local" or self.shard)),
             "--one-model-per-object trains each category's types in one run, which per-type Ray tasks and "
             "--shard jobs would train side by side: run it with --executor local and without --shard, or drop "
             "--one-model-per-object (one model per defect type) to spread the work"),
        ])
        self.shard_slice()
        if self.train.resume:
            raise DefectFillError("--resume is not needed with `run`: finished stages are skipped and training "
                                  "resumes by itself.")
        self.train_config("x", "x", _PLACEHOLDER_FOLDERS).validate()
        self.generate_config("x", "x", _PLACEHOLDER_FOLDERS).validate()
        if self.evaluate.kid or self.evaluate.ic_lpips:  # run --no-kid --no-ic-lpips: no per-type evaluation
            self.evaluate_config("x", "x", _PLACEHOLDER_FOLDERS).validate()
        if self.downstream != "none":
            self.downstream_config("x", Path("."), Path(".")).validate()


# How `defectfill run` is carried out, not what it produces (declared "identity": False on run's own fields): left
# out of run.json, and free to differ between the shards, the Ray run and the local run of one job (the types' own
# settings decide their folders).
RUN_NON_IDENTITY_KEYS = RunConfig.non_identity_names(own_only=True)
