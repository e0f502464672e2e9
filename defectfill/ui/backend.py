"""What the browser UI does, without gradio: runs, sources, masks, generation, datasets, rejection.

Everything here works on plain values (paths, PIL images, numpy masks), so it is tested without a
browser and the app module (`defectfill.ui.app`) is only layout and wiring. Every name that comes
from the page (a run, an image, a dataset, an item) is checked against the folders the app was
started with: a run must be one found under them, a dataset path must stay inside the datasets
folder (`core.folders.contained`), an image must be one of the run's defect-free images.

Items are written by `outputs.generated.write_item` and `finish_output`, the code behind
`defectfill generate`, so a folder the UI writes is one `evaluate`, `train --layout mvtec` and
anomalib read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectfill.config.sampling import SamplingConfig
from defectfill.core.atomic import atomic_write
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import IGNORED, contained, folder_lock
from defectfill.data.masks import DEFAULT_MASK_SCALE, SHAPES, estimate_foreground, fit_mask, shape_mask
from defectfill.model.device import resolve_device
from defectfill.model.lpips import ALEXNET_FILE
from defectfill.outputs.generated import MANIFEST, REJECTED_DIR, candidate_file, row_file
from defectfill.outputs.run_folder import LOGS_DIR, read_metrics

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"  # uploaded source images, inside the dataset that uses them
# generate.json of a dataset the UI writes: its settings are item 0's, each item's own are in its manifest row
UI_ITEM_SETTINGS = "written by `defectfill ui`: these settings are item 0's; each item's are its manifest row's"
_RUN_SCAN_DEPTH = 3  # runs/<name>, work/<cat>/runs/<name>: deep enough for `defectfill run` folders
_SKIP_DIRS = {LOGS_DIR, "__pycache__"}

ProgressFn = Callable[[float, str], None]


# --------------------------------------------------------------------------- binding and login


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_credential(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise DefectFillError(f"{where}: expected USER:PASSWORD (both non-empty).")
    return user, password


def read_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """The logins from `--auth USER:PASSWORD` and `--auth-file FILE` (one USER:PASSWORD a line, # comments)."""
    logins: list[tuple[str, str]] = []
    if auth:
        logins.append(_parse_credential(auth, "--auth"))
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise DefectFillError(f"--auth-file {path}: cannot read it ({exc.strerror or exc}).") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                logins.append(_parse_credential(line.strip(), f"--auth-file {path}, line {n}"))
        if not logins:
            raise DefectFillError(f"--auth-file {path}: no USER:PASSWORD line in it.")
    return logins or None


def check_bind(host: str, logins: list[tuple[str, str]] | None) -> None:
    """Refuse to serve beyond this machine without a login: the app writes files and runs the model."""
    if not is_loopback(host) and not logins:
        raise DefectFillError(
            f"--host {host} makes the app reachable from other machines, and it writes files there. "
            "Pass --auth USER:PASSWORD or --auth-file FILE, or keep the default --host 127.0.0.1."
        )


# --------------------------------------------------------------------------- masks from the page


def mask_from_layers(layers: list[np.ndarray | None], size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) at `size` (w, h): every pixel painted (alpha > 0) on any editor layer."""
    mask: np.ndarray | None = None
    for layer in layers:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.ndim == 3 and arr.shape[2] == 4 and (arr[..., 3] < 255).any():
            painted = arr[..., 3] > 0  # a painted layer: the strokes are its opaque pixels
        else:
            # a plain mask (an API client's black-and-white file, opaque once the editor made it RGBA): white is
            # the defect
            grey = arr[..., :3].max(axis=2) if arr.ndim == 3 else arr
            painted = grey > (127 if grey.dtype == np.uint8 else 0)
        mask = painted if mask is None else (mask | fit_mask(painted, (mask.shape[1], mask.shape[0])))
    if mask is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    return fit_mask(mask, size)


def mask_layer(mask: np.ndarray, colour: tuple[int, int, int] = (255, 0, 0), alpha: int = 160) -> Image.Image:
    """An RGBA editor layer showing `mask` in `colour`, transparent elsewhere."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask] = (*colour, alpha)
    return Image.fromarray(rgba, mode="RGBA")


def shape_scale(size: float) -> tuple[float, float]:
    """The area range of a shape placed with the size slider (a fraction of the image): +-20 % around it,
    since a shape's rasterised area only approximates its target."""
    if not 0 < size < 1:
        raise DefectFillError(f"shape size {size}: choose a fraction of the image area between 0 and 1.")
    return max(size * 0.8, 1e-6), min(size * 1.2, 0.99)


def place_shape(image: Image.Image, shape: str, size: float, seed: int) -> np.ndarray:
    """A `shape` mask of about `size` of the image area on the object's foreground, as `generate --masks
    shapes` places one (`data.masks.shape_mask` on `data.masks.estimate_foreground`); the seed decides where."""
    if shape not in SHAPES:
        raise DefectFillError(f"shape {shape!r}: choose one of {', '.join(SHAPES)}.")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    return shape_mask(shape, estimate_foreground(image.convert("RGB")), shape_scale(size), rng)


# --------------------------------------------------------------------------- runs


def _is_run(folder: Path) -> bool:
    from defectfill.model.names import LORA_WEIGHTS_NAME
    from defectfill.outputs.run_folder import CONFIG_NAME

    return (folder / CONFIG_NAME).is_file() and (folder / LORA_WEIGHTS_NAME).is_file()


def find_runs(roots: list[Path]) -> dict[str, Path]:
    """Finished runs under `roots` (a root may itself be a run), by a name relative to their root."""
    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        key, n = name, 2
        while key in found:  # two roots with runs of the same relative name
            key, n = f"{name} ({n})", n + 1
        found[key] = path

    for root in roots:
        if _is_run(root):
            add(root.name, root)
            continue
        if not root.is_dir():
            continue
        level = [root]
        for _ in range(_RUN_SCAN_DEPTH):
            below: list[Path] = []
            for folder in level:
                try:
                    children = sorted(p for p in folder.iterdir() if p.is_dir())
                except OSError:
                    continue
                for child in children:
                    if child.name.startswith(".") or child.name.startswith("checkpoint-") or child.name in _SKIP_DIRS:
                        continue
                    if _is_run(child):
                        add(str(child.relative_to(root)), child)
                    else:
                        below.append(child)
            level = below
    return found


def read_losses(run_dir: Path) -> list[dict[str, Any]]:
    """The loss curves of a run, from the metrics.jsonl training writes (`outputs.run_folder.read_metrics`):
    one row per (step, loss); a resumed run's repeated steps keep their last value, non-finite values are
    left out."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_metrics(run_dir):
        if isinstance(row.get("loss"), dict):
            by_step[row["step"]] = row["loss"]
    rows = []
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                rows.append({"step": step, "loss": name, "value": float(value)})
    return rows


# --------------------------------------------------------------------------- sources and outcomes


@dataclass
class Source:
    """The defect-free image a defect is painted on: one of the run's images (`path`) or an upload."""

    image: Image.Image
    path: Path | None
    label: str


@dataclass
class Outcome:
    """One generation, with everything needed to add it to a dataset."""

    run: str
    run_dir: Path
    source: Source
    result: Any  # generate.generator.GenerationResult
    mask_source: str  # "shape:<name>" (a placed shape, unedited) or "drawn"
    settings: dict[str, Any]  # candidates, steps, guidance, seed, attention, shape, mask_scale
    prompt: str
    defect_type: str | None = None  # the type drawn (a per-object run draws several; None: the run's one)
    added_to: list[str] = field(default_factory=list)  # datasets it was added to (one add per dataset)
    notes: list[str] = field(default_factory=list)  # what the person should know about this result (shown with it)


def attention_overlay(image: Image.Image, attention: np.ndarray, strength: float = 0.6) -> Image.Image:
    """The image with the token's attention map laid over it in red-yellow (brighter = more attention)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = np.clip(attention, 0, 1)[..., None]
    heat = np.concatenate([np.ones_like(a), a, np.zeros_like(a)], axis=2) * 255  # red -> yellow
    out = base * (1 - strength * a) + heat * strength * a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


VIEW_SIDE = 256  # px: results are shown at least this large (a 64 px base's output is unreadable at its size)


def upscaled(image: Image.Image, side: int = VIEW_SIDE) -> Image.Image:
    """`image` enlarged by a whole factor (nearest: the model's pixels stay visible as pixels) so its shorter
    side is at least `side`; a large image is returned as it is."""
    factor = max(1, math.ceil(side / max(1, min(image.size))))
    im = image.convert("RGB")
    return im if factor == 1 else im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)


def outlined(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 255),
             side: int = VIEW_SIDE) -> Image.Image:
    """`image` upscaled (`upscaled`) with the mask's contour drawn on it (torchvision's draw_segmentation_masks
    on the outline), so the defect's place is seen without hiding what was painted there."""
    import torch
    from torchvision.utils import draw_segmentation_masks

    big = upscaled(image, side)
    m = fit_mask(np.asarray(mask, dtype=bool), big.size)
    width = max(1, min(big.size) // 128)
    inner = m.copy()
    for _ in range(width):  # erode by one pixel per step: what is left of the outline is `width` px wide
        inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
    contour = m & ~inner
    pixels = torch.from_numpy(np.asarray(big).copy()).permute(2, 0, 1)
    drawn = draw_segmentation_masks(pixels, torch.from_numpy(contour), alpha=1.0, colors=colour)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def zoom_box(mask: np.ndarray, margin: float = 0.5, least: int = 16) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square around the mask's box, `margin` of its side added each way, at least
    `least` px, kept inside the image."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    if not len(xs):
        return 0, 0, w, h
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    half = min(max((max(xs.max() - xs.min(), ys.max() - ys.min()) + 1) * (1 + 2 * margin), least) / 2, w / 2, h / 2)
    left = int(round(min(max(cx - half, 0), w - 2 * half)))
    top = int(round(min(max(cy - half, 0), h - 2 * half)))
    return left, top, left + int(round(2 * half)), top + int(round(2 * half))


def zoomed(images: list[Image.Image], mask: np.ndarray, side: int = VIEW_SIDE) -> Image.Image:
    """The same crop around the defect's box of each image (source, chosen, ...), side by side, upscaled, the mask's
    contour on each."""
    box = zoom_box(mask)
    crop_mask = mask[box[1]:box[3], box[0]:box[2]]
    tiles = [outlined(im.convert("RGB").crop(box), crop_mask, side=side) for im in images]
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), max(t.height for t in tiles)),
                      (255, 255, 255))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 8
    return sheet


def framed(image: Image.Image, colour: tuple[int, int, int] = (0, 200, 0)) -> Image.Image:
    """A copy with a frame a few pixels wide, to mark the chosen candidate in the page."""
    from PIL import ImageDraw

    im = image.convert("RGB").copy()
    width = max(2, min(im.size) // 32)
    ImageDraw.Draw(im).rectangle([0, 0, im.width - 1, im.height - 1], outline=colour, width=width)
    return im


# --------------------------------------------------------------------------- the workspace


class Workspace:
    """The folders the app was started with, the loaded model, and every action of the page.

    One model is kept loaded (the last run used) between requests; `generate` holds a lock, so even
    outside gradio's queue two generations never run at once on the device.
    """

    def __init__(self, runs: list[str | Path], datasets: str | Path, device: str | None = None,
                 mixed_precision: str = "auto", lpips_weights: str | None = None,
                 lpips_random_backbone: bool = False, scheduler: str = "ddim"):
        self.run_roots = [Path(r).expanduser() for r in runs]
        self.datasets_root = Path(datasets).expanduser()
        self.device = resolve_device(device)
        from defectfill.config.settings import resolve_precision

        self.precision = resolve_precision(mixed_precision, self.device)
        self.lpips_weights, self.lpips_random_backbone = lpips_weights, lpips_random_backbone
        self.scheduler = scheduler
        self._loaded: tuple[tuple[Path, bool], Any] | None = None  # ((run folder, LoRA unmerged), DefectGenerator)
        self._scorer: Any = None
        self._provenances: dict[tuple[Path, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ runs

    def runs(self) -> dict[str, Path]:
        """Rescanned on each call, so a run that finishes while the app is open appears."""
        return find_runs(self.run_roots)

    def run_dir(self, name: str) -> Path:
        runs = self.runs()
        if name not in runs:
            where = ", ".join(str(r) for r in self.run_roots)
            raise DefectFillError(f"run {name!r} is not one of the finished runs under {where}. "
                                  "Choose one from the list (train one with `defectfill train`).")
        return runs[name]

    def run_config(self, name: str):
        from defectfill.outputs.run_folder import read_trained_run

        return read_trained_run(self.run_dir(name))

    def defect_types(self, name: str) -> list[str]:
        """The defect types a run draws: its one type, or each type of a per-object run (`--defect-type all`)."""
        return list(self.run_config(name).type_tokens())

    def good_images(self, name: str) -> list[Path]:
        """The defect-free images of the run's category in its data folder (what `generate` uses by default)."""
        from defectfill.data import open_layout

        config = self.run_config(name)
        data = Path(config.data).expanduser() if config.data else None
        if data is None or not data.is_dir():
            raise DefectFillError(f"the run's data folder {config.data} is not there (moved or on another "
                                  "machine); upload a defect-free image instead.")
        return open_layout(data, config.layout, config.good_images).good_images(config.category)

    def source(self, run: str, image_name: str) -> Source:
        """One of the run's defect-free images by file name (names from the page are never paths)."""
        from defectfill.data import load_rgb

        for path in self.good_images(run):
            if path.name == image_name:
                return Source(load_rgb(path), path, path.name)
        raise DefectFillError(f"image {image_name!r} is not one of the defect-free images of run {run!r}; "
                              "choose one from the list or upload one.")

    # ------------------------------------------------------------------ generation

    def generator(self, run: str, progress: ProgressFn | None = None, unconditional: str | None = None):
        """The run's DefectGenerator, loaded once and kept until another run is used. unconditional "base" needs
        the LoRA layers kept apart (not merged): asking for it reloads a merged model once."""
        from defectfill.generate.generator import DefectGenerator

        run_dir = self.run_dir(run)
        if unconditional is None:
            unconditional = self.recommended_sampling(run)["unconditional"]
        key = (run_dir, unconditional == "base")
        # an unmerged model samples either way; a merged one only with the tuned branch
        if self._loaded is None or self._loaded[0][0] != run_dir or (key[1] and not self._loaded[0][1]):
            if progress:
                progress(0.0, f"loading the model of {run}")
            self._loaded = None  # free the previous model first
            # loaded with its first type; a per-object run's other types share the pipeline (`for_type`)
            gen = DefectGenerator.from_run(run_dir, device=self.device, mixed_precision=self.precision,
                                           scheduler=self.scheduler, lpips_weights=self.lpips_weights,
                                           lpips_pretrained=not self.lpips_random_backbone,
                                           defect_type=self.defect_types(run)[0], unconditional=unconditional)
            # the pipeline's own step bar back on: gradio's Progress(track_tqdm=True) shows it in the page
            gen.pipe.set_progress_bar_config(disable=False, leave=False, desc="sampling")
            self._loaded = (key, gen)
        return self._loaded[1]

    def recommended_sampling(self, run: str) -> dict[str, Any]:
        """The sampling a run's base recommends, with the paper's values where it says nothing (`config.sampling`):
        the page's prompt, steps, guidance and unconditional branch start there. The prompt is a template; the
        base saying none is the run's object prompt."""
        from defectfill.config.sampling import resolve_sampling

        config = self.run_config(run)
        sampling = resolve_sampling(config.model)
        return {**sampling, "prompt": sampling["prompt"] or config.object_prompt}

    def sampling_note(self, run: str, prompt: str | None = None, steps: int | None = None,
                      guidance: float | None = None, unconditional: str | None = None) -> str:
        """What a person should know before sampling with these settings: each one that departs from what the
        run's base recommends (its defectfill_sampling.json), or "" when they follow it (or the base says nothing)."""
        from defectfill.config.sampling import read_base_sampling

        config = self.run_config(run)
        said = read_base_sampling(config.model)
        asked = {"prompt": prompt, "steps": None if steps is None else int(steps),
                 "guidance": None if guidance is None else float(guidance), "unconditional": unconditional}
        differs = [f"{key} {asked[key]!r} (recommended: {said[key]!r})" for key in ("prompt", "guidance", "steps",
                   "unconditional") if key in said and asked[key] is not None and asked[key] != said[key]]
        if not differs:
            return ""
        return (f"Sampling differs from what the base `{config.model}` was measured to want: {'; '.join(differs)}. "
                "Expect weaker defects (an object prompt or high guidance mostly repaints the part).")

    def generate(self, run: str, source: Source, mask: np.ndarray, candidates: int = SamplingConfig.candidates,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0, attention: bool = False,
                 shape: str | None = None, shape_size: float | None = None, progress: ProgressFn | None = None,
                 defect_type: str | None = None, prompt: str | None = None, unconditional: str | None = None,
                 lpips_fallback: bool = False, item: int = 0) -> Outcome:
        """Candidates for one (source, mask) with their LFS scores; the settings are checked as `generate`'s
        (`SamplingConfig`); those left None are what the run's base recommends. `prompt` is a template with {token}
        (and {object}). `defect_type`: the type to draw from a per-object run (default: the run's first).
        `lpips_fallback`: when the AlexNet weights cannot be fetched (offline), score with the untrained backbone
        (said in the outcome's notes and recorded with the item) instead of failing. `item`: draw as that item of
        `defectfill generate --seed <seed>` (its seed `derived_seed(seed, item)`)."""
        from defectfill.generate.generator import DefectGenerator, run_prompt

        candidates, seed = int(candidates), int(seed)
        from defectfill.config.stages import MAX_SEED
        from defectfill.generate.generator import derived_seed

        if not 0 <= seed <= MAX_SEED:  # the range of generate's --seed, which the dataset's generate.json records
            raise DefectFillError(f"seed {seed}: choose a whole number in [0, {MAX_SEED}].")
        item_seed = derived_seed(seed, int(item))  # item `item` of `defectfill generate --seed <seed>` (0: its first)
        steps = None if steps is None else int(steps)
        guidance = None if guidance is None else float(guidance)
        prompt = (prompt or "").strip() or None
        unconditional = unconditional or None
        SamplingConfig(candidates=candidates, steps=steps, guidance=guidance, prompt=prompt,
                       unconditional=unconditional).validate()
        mask = fit_mask(np.asarray(mask, dtype=bool), source.image.size)
        if not mask.any():
            raise DefectFillError("the mask is empty: paint where the defect goes, or place a shape.")
        notes: list[str] = []
        with self._lock:
            loaded = self.generator(run, progress, unconditional)
            drawer = loaded.for_type(defect_type) if defect_type else loaded  # that type's prompt and token
            prompt_text = drawer.prompt
            if prompt is not None:
                prompt_text, _ = run_prompt(self.run_config(run), prompt, drawer.defect_type)
            # a generator per request over the loaded pipeline: the settings are the request's, the model is kept
            steps = loaded.steps if steps is None else steps  # unset: as the run's base recommends
            guidance = loaded.guidance if guidance is None else guidance
            unconditional = loaded.unconditional if unconditional is None else unconditional
            sampling = dataclasses.replace(loaded.sampling, candidates=candidates, steps=steps, guidance=guidance,
                                           unconditional=unconditional)
            random_backbone = self.lpips_random_backbone

            def make(random: bool) -> DefectGenerator:
                return DefectGenerator(loaded.pipe, prompt_text, drawer.token, loaded.resolution, sampling,
                                       device=self.device, scorer=self._scorer,
                                       lpips_weights=self.lpips_weights, lpips_pretrained=not random,
                                       save_attention=bool(attention))

            gen = make(random_backbone)
            if candidates > 1:
                try:
                    gen.scorer  # noqa: B018 - LPIPS loaded before sampling: a failed download wastes no sampling
                except DefectFillError as exc:
                    if not lpips_fallback or random_backbone or self.lpips_weights:
                        raise DefectFillError(f"{exc} In the page: tick 'LPIPS: untrained AlexNet when offline' "
                                              "(its scores only approximate perceptual difference).") from None
                    random_backbone = True
                    self.lpips_random_backbone = True  # the weights stay out of reach: later requests skip the try
                    self._scorer = None
                    gen = make(True)
                    notes.append("The AlexNet weights for LPIPS could not be fetched, so Low-Fidelity Selection "
                                 f"scored with an untrained AlexNet: its choice is not a perceptual one. Put "
                                 f"{ALEXNET_FILE} in $TORCH_HOME/hub/checkpoints (or start with --lpips-weights) "
                                 "for real scores.")
            if progress:
                progress(0.1, f"sampling {candidates} candidate(s), {steps} steps")
            result = gen(source.image, mask, seed=item_seed)
            if candidates > 1:
                self._scorer = gen.scorer  # LPIPS loaded once, kept with the model
        if candidates > 1 and random_backbone and not notes:
            notes.append("LPIPS runs on an untrained AlexNet (--lpips-random-backbone): the LFS choice is not a "
                         "perceptual one.")
        note = self.sampling_note(run, prompt or self.recommended_sampling(run)["prompt"], steps, guidance,
                                  unconditional)
        if note:
            notes.insert(0, note)
        settings = {"candidates": candidates, "steps": steps, "guidance": guidance, "seed": seed, "item_seed": item_seed,
                    "attention": bool(attention), "prompt": prompt, "unconditional": unconditional,
                    "lpips_random_backbone": bool(random_backbone)}
        if shape:
            settings.update(shape=shape, mask_scale=list(shape_scale(float(shape_size or 0.02))))
        return Outcome(run, self.run_dir(run), source, result, f"shape:{shape}" if shape else "drawn", settings,
                       prompt_text, drawer.defect_type, notes=notes)

    # ------------------------------------------------------------------ datasets

    def dataset_path(self, name: str) -> Path:
        """A dataset folder named in the page: relative to the datasets folder and never outside it."""
        name = (name or "").strip()
        if not name:
            raise DefectFillError("name the dataset folder (e.g. disc-scratch).")
        return contained(self.datasets_root, name, "the dataset name")

    def datasets(self) -> list[str]:
        """Generated datasets under the datasets folder (a generate.json marks one), by relative name."""
        from defectfill.outputs.generated import STATE

        root = self.datasets_root
        if not root.is_dir():
            return []
        found = ["."] if (root / STATE).is_file() else []
        for path in sorted(root.rglob(STATE)):
            rel = path.parent.relative_to(root)
            if rel != Path(".") and len(rel.parts) <= 3 and not any(p.startswith(".") for p in rel.parts):
                found.append(str(rel))
        return found

    @contextlib.contextmanager
    def _writing(self, root: Path) -> Iterator[None]:
        root.mkdir(parents=True, exist_ok=True)
        with folder_lock(root, "ui"):  # a `defectfill generate` writing here is named, never mixed in
            yield

    def add_to_dataset(self, outcome: Outcome, dataset: str) -> dict[str, Any]:
        """Write the outcome as the next item of `dataset`, as `defectfill generate` writes an item."""
        from defectfill.config.stages import GenerateConfig
        from defectfill.outputs.generated import (
            STATE,
            Item,
            OutputFolder,
            finish_output,
            output_identity,
            prepare_output,
            write_item,
        )

        root = self.dataset_path(dataset)
        if dataset in outcome.added_to:
            raise DefectFillError(f"this result is already in {root}; generate again for another item.")
        config = self.run_config(outcome.run)
        if root.exists() and not root.is_dir():
            raise DefectFillError(f"{root}: is a file, not a folder. Choose another dataset name.")
        state = root / STATE
        if state.is_file():
            try:
                recorded_run = json.loads(state.read_text()).get("run")
            except (ValueError, AttributeError):
                recorded_run = None
            if recorded_run != str(outcome.run_dir.resolve()):
                raise DefectFillError(f"{root}: holds the results of another run ({recorded_run}). One dataset "
                                      f"folder per run: choose another name, such as {config.category}-"
                                      f"{config.defect_type}.")
        elif root.is_dir() and any(p.name not in IGNORED for p in root.iterdir()):
            raise DefectFillError(f"{root}: folder is not empty and was not written by defectfill. "
                                  "Choose another dataset name.")
        # a per-object run's items go under the type drawn (one dataset holds every type, as MVTec's layout does)
        drawn = outcome.defect_type if config.per_object else None
        with self._writing(root):
            # every finished row counts, rejected ones too: an index (and its file names) is never reused
            rows = OutputFolder(root, config.category, drawn or config.defect_type, 1).finished()
            index = max(rows, default=-1) + 1
            out = OutputFolder(root, config.category, drawn or config.defect_type, index + 1)
            source_path, png = outcome.source.path, b""
            if source_path is None:  # an upload: kept inside the dataset (written once the folder is ours)
                png = _png_bytes(outcome.source.image)
                source_path = root / UPLOADS_DIR / f"{hashlib.sha256(png).hexdigest()[:16]}.png"
            s = outcome.settings
            settings = GenerateConfig.build(dict(
                run=str(outcome.run_dir), output=str(root), count=index + 1,
                images=str(root / UPLOADS_DIR) if outcome.source.path is None else None,
                masks="shapes" if s.get("shape") else "drawn", shapes=s.get("shape") or ",".join(SHAPES),
                mask_scale=",".join(str(v) for v in s.get("mask_scale", DEFAULT_MASK_SCALE)),
                candidates=s["candidates"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"],
                prompt=s.get("prompt"), unconditional=s.get("unconditional"),
                scheduler=self.scheduler, save_candidates=True, save_attention=s["attention"],
                lpips_weights=self.lpips_weights,
                lpips_random_backbone=s.get("lpips_random_backbone", self.lpips_random_backbone),
                device=self.device, mixed_precision=self.precision, defect_type=drawn,
            ), require=False)
            identity = output_identity([outcome.run_dir], settings)
            if not state.is_file():
                # the UI adds item by item, each with its own settings (its manifest row's): generate.json is the
                # first item's and is not rewritten, so it stays true of item 0 and says where the others' are
                prepare_output(out, identity, resume=True, overwrite=False,
                               record={"config": {**settings.to_dict(), "mixed_precision": self.precision},
                                       "per_item_settings": UI_ITEM_SETTINGS})
            if png and not source_path.is_file():
                atomic_write(source_path, lambda p: p.write_bytes(png))
            item = Item(index, source_path, outcome.mask_source, s["item_seed"])
            row = write_item(out, item, outcome.source.image, outcome.result, outcome.prompt, identity["settings"],
                             out.part_path(0), save_candidates=True, preview_rows=settings.preview_rows,
                             defect_type=drawn, provenance=self._provenance(outcome.run_dir, config.model))
            finish_output(out, with_good=True)
        outcome.added_to.append(dataset)
        return row

    def _provenance(self, run_dir: Path, model: str) -> dict[str, Any]:
        """What the rows this app writes for a run were made with, as `defectfill generate` records it; hashed
        once per run (the base's weights are large)."""
        from defectfill.outputs.generated import generation_provenance

        key = (run_dir.resolve(), model)
        if key not in self._provenances:
            self._provenances[key] = generation_provenance(model, [run_dir], str(self.device), self.precision)
        return self._provenances[key]

    def dataset_rows(self, dataset: str) -> dict[int, dict[str, Any]]:
        from defectfill.outputs.generated import OutputFolder

        root = self.dataset_path(dataset)
        if not root.is_dir():
            raise DefectFillError(f"{root}: no such dataset folder.")
        return OutputFolder(root, "", "", 1).finished()

    def dataset_items(self, dataset: str, category: str | None = None, defect_type: str | None = None,
                      rejected: bool = False) -> list[dict[str, Any]]:
        """The dataset's items (manifest rows with `category`, `defect_type`, `rejected` added), filtered."""
        items = []
        for index, row in sorted(self.dataset_rows(dataset).items()):
            cat, kind = item_kind(row)
            is_rejected = bool(row.get("rejected"))
            if (category and cat != category) or (defect_type and kind != defect_type) or (is_rejected and not rejected):
                continue
            items.append({**row, "index": index, "category": cat, "defect_type": kind, "is_rejected": is_rejected,
                          "is_approved": bool(row.get("approved"))})
        return items

    def item_files(self, dataset: str, index: int) -> dict[str, Any]:
        """An item's row and its files: image, mask, source, candidates (saved ones), attention."""
        root = self.dataset_path(dataset)
        rows = self.dataset_rows(dataset)
        if int(index) not in rows:
            raise DefectFillError(f"{root}: no item {index} in its manifest.")
        row = rows[int(index)]
        image = contained(root, row["image"], root / MANIFEST)
        cat, kind = item_kind(row)
        stem = Path(row["image"]).stem
        candidates = []
        for c in range(len(row.get("candidate_seeds") or [])):
            path = candidate_file(root, cat, kind, stem, c)
            if path.is_file():
                candidates.append(path)
        attention = contained(root, row["attention"], root / MANIFEST) if row.get("attention") else None
        source = self._served_source(root, row.get("source_image"))
        return {"row": row, "image": image, "mask": contained(root, row["mask"], root / MANIFEST),
                "source": source, "candidates": candidates,
                "attention": attention if attention and attention.is_file() else None}

    def _served_source(self, root: Path, name: Any) -> Path | None:
        """A row's source image, only where it lies inside the dataset (uploads), a runs folder or the data
        folder of one of the runs: an edited manifest must not make the page show any file on the machine."""
        if not isinstance(name, str) or not name:
            return None
        source = row_file(root, name)  # relative to the dataset (absolute in rows written before)
        if source is None or not source.is_file():
            return None

        def inside(folder: Path) -> bool:
            folder_name = os.path.normpath(os.path.abspath(folder))
            return os.path.commonpath([folder_name, os.path.normpath(str(source))]) == folder_name

        if inside(root) or any(inside(r) for r in self.run_roots):
            return source
        for run in self.runs():
            try:
                data = self.run_config(run).data
            except (DefectFillError, OSError, ValueError):
                continue
            if data and inside(Path(data).expanduser()):
                return source
        log.warning("%s: the source image %s lies outside the dataset and the runs' data folders; not shown.",
                    root / MANIFEST, source)
        return None

    def reject(self, dataset: str, index: int, reason: str = "") -> dict[str, Any]:
        """Move an item's image, mask and attention map under rejected/ (same relative paths) and mark its
        manifest row; nothing is deleted. The MVTec tree no longer holds it, so evaluate and anomalib skip it."""
        from defectfill.outputs.generated import OutputFolder

        root = self.dataset_path(dataset)
        index = int(index)
        with self._writing(root):
            out = OutputFolder(root, "", "", 1)
            out.merge_manifest()  # one manifest to edit
            rows = out.finished()
            if index not in rows:
                raise DefectFillError(f"{root}: no item {index} in its manifest.")
            row = rows[index]
            if row.get("rejected"):
                raise DefectFillError(f"{root}: item {index} is already rejected ({row['image']}).")
            moved = {}
            for key in ("image", "mask", "attention"):
                if not row.get(key):
                    continue
                old = contained(root, row[key], root / MANIFEST)
                new_rel = str(Path(REJECTED_DIR) / row[key])
                new = contained(root, new_rel, root / MANIFEST)
                if old.is_file():
                    new.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(old, new)
                moved[key] = row[key]
                row[key] = new_rel
            row["rejected"] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": moved, "reason": reason}
            text = "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))
            atomic_write(root / MANIFEST, lambda p: p.write_text(text))
        return row

    def approve(self, dataset: str, indices: list[int], approved: bool = True) -> list[dict[str, Any]]:
        """Mark (or, with approved=False, unmark) items as approved by a person: `"approved": {"time"}` in their
        manifest rows, the manifest rewritten atomically under the folder's lock. A rejected item is refused (it
        was moved aside)."""
        from defectfill.outputs.generated import OutputFolder

        root = self.dataset_path(dataset)
        wanted = sorted({int(i) for i in indices})
        if not wanted:
            raise DefectFillError("choose an item first (click one in the grid), or show some to approve them all.")
        with self._writing(root):
            out = OutputFolder(root, "", "", 1)
            out.merge_manifest()  # one manifest to edit
            rows = out.finished()
            missing = [i for i in wanted if i not in rows]
            if missing:
                raise DefectFillError(f"{root}: no item {missing[0]} in its manifest.")
            rejected = [i for i in wanted if rows[i].get("rejected")]
            if rejected and approved:
                raise DefectFillError(f"{root}: item {rejected[0]} is rejected (moved under {REJECTED_DIR}/); "
                                      "it cannot be approved.")
            for i in wanted:
                if approved:
                    rows[i]["approved"] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                else:
                    rows[i].pop("approved", None)
            text = "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))
            atomic_write(root / MANIFEST, lambda p: p.write_text(text))
        return [rows[i] for i in wanted]

    def dataset_run(self, dataset: str) -> str | None:
        """The name of the finished run (one the app offers) that wrote `dataset` (its generate.json), or None."""
        from defectfill.outputs.generated import STATE

        try:
            recorded = json.loads((self.dataset_path(dataset) / STATE).read_text()).get("run")
        except (OSError, ValueError, AttributeError):
            return None
        for name, path in self.runs().items():
            if isinstance(recorded, str) and str(path.resolve()) in recorded.split(","):
                return name
        return None

    def references(self, run: str, defect_type: str | None = None) -> list[Path]:
        """The real defect images the run learnt from (its split's reference images) for `defect_type` (a
        per-object run's; default the run's type): what a generated item is judged against."""
        from defectfill.outputs.run_folder import read_run_split

        config = self.run_config(run)
        kind = defect_type if config.per_object else None
        try:
            split = read_run_split(self.run_dir(run), kind)
        except (DefectFillError, OSError, ValueError):
            return []
        return [s.image for s in split.reference if Path(s.image).is_file()]

    def generate_batch(self, run: str, names: list[str] | None, count: int, shape: str, size: float,
                       seed: int = 0, progress: ProgressFn | None = None, **sampling: Any) -> list[Outcome]:
        """`count` generations over the run's defect-free images `names` (all of them when empty), in turn: item
        i on image i mod len, with its own seed (`derived_seed(seed, i)`, as `defectfill generate --seed <seed>`
        gives item i) and its own `shape` placed on it with that seed. `sampling`: `generate`'s other settings."""
        from defectfill.generate.generator import derived_seed

        count = int(count)
        if not 1 <= count <= 1000:
            raise DefectFillError(f"count {count}: generate between 1 and 1000 images at a time.")
        paths = self.good_images(run)
        chosen = [p for p in paths if p.name in set(names)] if names else paths
        if names and len(chosen) != len(set(names)):
            unknown = sorted(set(names) - {p.name for p in chosen})
            raise DefectFillError(f"image {unknown[0]!r} is not one of the defect-free images of run {run!r}.")
        if not chosen:
            raise DefectFillError(f"run {run!r} has no defect-free images to paint on; upload one instead.")
        outcomes = []
        for i in range(count):
            source = self.source(run, chosen[i % len(chosen)].name)
            if progress:
                progress(i / count, f"image {i + 1} of {count}: {source.label}")
            mask = place_shape(source.image, shape, float(size), derived_seed(int(seed), i))
            outcomes.append(self.generate(run, source, mask, seed=int(seed), item=i, shape=shape, shape_size=size,
                                          **sampling))
        return outcomes

    # ------------------------------------------------------------------ the run tab

    def run_info(self, run: str) -> dict[str, Any]:
        """A run's settings (config.json), loss curves (metrics.jsonl) and logged sample inpaintings."""
        from defectfill.config.stages import per_object_types, split_types
        from defectfill.outputs.run_folder import logged_samples, read_recorded_config, read_token_check

        run_dir = self.run_dir(run)
        samples = logged_samples(run_dir)
        settings = read_recorded_config(run_dir) or {}
        types = settings.get("defect_type") if isinstance(settings.get("defect_type"), str) else None
        checks = ({t: read_token_check(run_dir, t) for t in split_types(types)} if per_object_types(types)
                  else {None: read_token_check(run_dir)})
        return {"settings": settings, "losses": read_losses(run_dir), "samples": samples, "folder": run_dir,
                "token_checks": {t: r for t, r in checks.items() if r}}


def item_kind(row: dict[str, Any]) -> tuple[str, str]:
    """(category, defect type) of a manifest row, from its image path <category>/test/<type>/<name>."""
    image = (row.get("rejected") or {}).get("from", {}).get("image") or row.get("image", "")
    parts = Path(image).parts
    return (parts[0], parts[2]) if len(parts) >= 4 else ("", "")


def os_error_message(exc: OSError) -> str:
    """What the page says when reading or writing a dataset, a run or an upload failed (permission denied, a
    read-only or full disk, a folder gone): the path and the fix; what was finished is kept (writes are atomic)."""
    path = exc.filename or "a file of the app's folders"
    reason = exc.strerror or type(exc).__name__
    folder = Path(path).parent if exc.filename and not Path(path).is_dir() else Path(path)
    return (f"{path}: {reason}. The app (running as this machine's user) must be able to read and write {folder}: "
            "fix its permissions, free disk space or choose another folder (`defectfill ui --runs/--datasets`), "
            "then try again; what was finished is kept.")


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
