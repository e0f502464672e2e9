"""Measured throughput figures, and the protocol estimate `defectfill run --dry-run` prints from them.

Every figure the estimate uses is in `FIGURES`, with where and when it was measured (benchmarks/README.md has
the commands); a device and base with no row get "no figure for this device" rather than a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    """One measured setting: seconds per training step and per selected image on one kind of device and base."""

    device: str  # "cuda" or "cpu": the kind `resolve_device` gives
    base: str  # the base's architecture: "sd2", "mini" or "tiny" (`model.networks.SHAPES`)
    px: int
    train_step_s: float  # one optimiser step at batch `train_batch`
    train_batch: int
    image_s: float  # one selected image (sampling, LFS, paste-back, writing) with `candidates` and `steps`
    candidates: int
    steps: int
    unet_share: float  # of image_s, the part that grows with candidates x steps
    measured: str  # the machine, the settings and the date


FIGURES: tuple[Figure, ...] = (
    Figure("cuda", "sd2", 512, 0.390, 4, 3.51, 8, 50, 3.01 / 3.51,
           "an H200, SD2 inpainting's architecture, bf16, eager, 50 DDIM steps, 8 candidates batched; measured "
           "elsewhere, 2026-11-29 (issue 29)"),
    # benchmarks/train_step.py (ours, B = 4) and benchmarks/generate_command.py (today's path, 20 DDIM steps, 8
    # candidates, guidance 7.5, the command's time less its loading, per image); UNet share from generate.py
    Figure("cpu", "mini", 64, 0.2745, 4, 3.79, 8, 20, 0.93,
           "this project's 2-core CPU (Intel Xeon), one thread, fp32, defectfill-mini at 64 px, 20 DDIM steps, "
           "8 candidates, one image per call; other jobs running (load average 4-8); 2026-12-04"),
    Figure("cpu", "tiny", 64, 0.2452, 4, 3.57, 8, 20, 0.93,
           "this project's 2-core CPU (Intel Xeon), one thread, fp32, the tests' tiny pipeline at 64 px, 20 DDIM "
           "steps, 8 candidates, one image per call; other jobs running (load average 4-12); 2026-12-04"),
)


def find_figure(device: str, base: str | None) -> Figure | None:
    kind = device.split(":")[0]
    return next((f for f in FIGURES if f.device == kind and f.base == base), None)


def base_architecture(model: str) -> str | None:
    """The architecture of base `model` ("sd2", "mini", "tiny") read from its UNet's config.json: a local folder,
    a built-in name, or a hub id already in the Hugging Face cache (nothing is downloaded); None if unknown."""
    from defectfill.core.errors import DefectFillError
    from defectfill.model.networks import SHAPES
    from defectfill.model.pipeline import resolve_model

    try:
        config = Path(resolve_model(model)) / "unet" / "config.json"
    except DefectFillError:
        return None
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "unet/config.json")
        except Exception:  # not a hub id: no cached config
            cached = None
        if not isinstance(cached, str):
            return "sd2" if "stable-diffusion-2" in model else None
        config = Path(cached)
    try:
        channels = tuple(json.loads(config.read_text(encoding="utf-8"))["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((name for name, shape in SHAPES.items() if tuple(shape.unet_channels) == channels), None)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def protocol_estimate(device: str, base: str | None, models: int, train_steps: int, batch: int, px: int,
                      types: int, images: int, candidates: int, steps: int) -> str:
    """What `train_steps` steps (over `models` trainings) and `images` selected images (over `types` defect types)
    would take on `device`, scaled linearly from the measured figure (steps, batch, pixels, candidates x sampling
    steps); or why there is no estimate."""
    figure = find_figure(device, base)
    where = f"{device.split(':')[0]}, base {base or 'of unknown architecture'}"
    if figure is None:
        return f"protocol estimate ({where}): no figure for this device (benchmarks/README.md measures one)."
    pixels = (px / figure.px) ** 2
    step_s = figure.train_step_s * batch / figure.train_batch * pixels
    work = candidates * steps / (figure.candidates * figure.steps)
    image_s = figure.image_s * ((1 - figure.unet_share) + figure.unet_share * work) * pixels
    train_s, generate_s = train_steps * step_s, images * image_s
    return (f"protocol estimate ({where}): {models} training(s), {train_steps} steps x {step_s:.3g} s = "
            f"{_duration(train_s)}; {types} type(s), {images} images x {image_s:.3g} s = {_duration(generate_s)}; "
            f"in all {_duration(train_s + generate_s)} on one device. From {figure.measured}, scaled linearly "
            f"to batch {batch}, {px} px, {candidates} candidates x {steps} steps.")
