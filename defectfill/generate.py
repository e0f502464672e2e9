"""Defect generation: a trained run turns defect-free images into defect images with exact masks.

`DefectGenerator` is the Python API: N candidates of one (image, mask) in one
pipeline batch, pasted back so that outside the mask the output is the input,
and Low-Fidelity Selection (the candidate least like the input inside the
mask's bounding box, by LPIPS). `run_generate` is the dataset writer behind
`defectfill generate`: MVTec layout, manifest, preview, resumable, split over
processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectfill.data import load_mask, load_rgb, object_name, open_layout, read_split
from defectfill.data.images import is_image_file
from defectfill.errors import DefectFillError
from defectfill.io import atomic_write, write_json
from defectfill.masks import (
    SHAPES,
    estimate_foreground,
    fit_mask,
    list_user_masks,
    parse_mask_scale,
    parse_shapes,
    shape_mask,
)
from defectfill.model import LORA_WEIGHTS_NAME, TOKEN_WEIGHTS_NAME, load_pipeline

log = logging.getLogger(__name__)

# (candidates (N,3,h,w) in [-1,1], source (1,3,h,w) in [-1,1]) -> (N,) scores, higher = less like the source
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULERS = ("ddim", "dpm", "euler", "pndm")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MANIFEST = "manifest.jsonl"
STATE = "generate.json"  # which run and settings produced this output folder
PREVIEW = "preview.png"
_PREVIEW_DIR = ".preview"  # one strip per early item, stacked into preview.png at the end
_LPIPS_MIN_SIDE = 64  # AlexNet's five stages need a few pixels left at the end


# --------------------------------------------------------------------------- selection


class LPIPSScorer:
    """LPIPS distance of bounding-box crops (each side stretched to >= 64 px for AlexNet's five stages)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        from defectfill.metrics.lpips import lpips_distance

        h, w = candidates.shape[-2:]
        # each side stretched on its own: a 1x800 scratch box becomes 64x800, not 64x51200
        size = (max(h, _LPIPS_MIN_SIDE), max(w, _LPIPS_MIN_SIDE))
        if size != (h, w):
            candidates = F.interpolate(candidates, size=size, mode="bilinear", align_corners=False)
            source = F.interpolate(source, size=size, mode="bilinear", align_corners=False)
        device = next(self.model.parameters()).device
        a = candidates.float().to(device)
        b = source.float().to(device).expand_as(a)
        return lpips_distance(self.model, a, b).cpu()


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bool HxW -> (y0, y1, x0, x1), half-open, of the True pixels."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.array(arr, dtype=np.float32)) / 127.5 - 1.0
    return t.movedim(-1, -3)


def select_low_fidelity(
    candidates: np.ndarray, source: np.ndarray, mask: np.ndarray, scorer: Scorer
) -> tuple[int, list[float]]:
    """Score (N,H,W,3) uint8 candidates against the (H,W,3) source inside the mask's bounding box.

    Returns the index of the highest score (least like the defect-free input) and every score.
    """
    y0, y1, x0, x1 = mask_bbox(mask)
    crops = _to_tensor(candidates[:, y0:y1, x0:x1])  # (N, 3, h, w)
    ref = _to_tensor(source[None, y0:y1, x0:x1])  # (1, 3, h, w)
    scores = torch.as_tensor(scorer(crops, ref)).reshape(-1).float()
    if scores.numel() != len(candidates):
        raise RuntimeError(f"scorer returned {scores.numel()} scores for {len(candidates)} candidates")
    return int(torch.argmax(scores)), [float(s) for s in scores]


# --------------------------------------------------------------------------- paste-back


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight (H,W) float32: 0 outside the mask, ramping to 1 over `feather` px inside its edge.

    The ramp lies inside the mask only, so pixels outside keep the input exactly.
    """
    alpha = mask.astype(np.float32)
    if feather <= 0:
        return alpha
    # depth of each mask pixel (chessboard distance to the outside, 1 at the edge), via repeated erosion
    depth = np.zeros(mask.shape, dtype=np.float32)
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    from PIL import ImageFilter

    current = mask
    for _ in range(feather):
        depth += current
        im = im.filter(ImageFilter.MinFilter(3))
        current = np.asarray(im) >= 128
    return np.where(mask, np.minimum(depth / feather, 1.0), 0.0).astype(np.float32)


def paste_back(generated: np.ndarray, source: np.ndarray, mask: np.ndarray, feather: int = 0) -> np.ndarray:
    """(…,H,W,3) uint8 generated, (H,W,3) uint8 source, (H,W) bool mask -> uint8, equal to source outside the mask."""
    alpha = feather_alpha(mask, feather)[..., None]  # (H, W, 1)
    blended = np.rint(alpha * generated.astype(np.float32) + (1 - alpha) * source.astype(np.float32))
    out = blended.clip(0, 255).astype(np.uint8)
    # exact copy outside the mask (not just numerically close): the guarantee users rely on
    return np.where(mask[..., None], out, source)


# --------------------------------------------------------------------------- generator


@dataclass
class GenerationResult:
    image: Image.Image  # chosen candidate, source size, pasted back
    mask: np.ndarray  # (H, W) bool at source size
    candidates: list[Image.Image]  # every candidate, pasted back
    scores: list[float] | None  # LFS score of each candidate (None with one candidate)
    chosen: int
    attention: np.ndarray | None = None  # (H, W) float in [0, 1]: the token's cross-attention for the chosen one
    seeds: list[int] = field(default_factory=list)


def candidate_seed(seed: int, index: int) -> int:
    """Seed of candidate `index` of an item: independent streams, reproducible, fits torch's range."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _scheduler(pipe, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
               "pndm": PNDMScheduler}
    if name not in classes:
        raise DefectFillError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}.")
    return classes[name].from_config(pipe.scheduler.config)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run folder, checked for what generation needs."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise DefectFillError(f"--run {run_dir}: folder not found. Pass the output folder of `defectfill train`.")
    path = run_dir / "config.json"
    if not path.is_file():
        raise DefectFillError(f"{run_dir}: no config.json; this is not a finished defectfill run folder.")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise DefectFillError(f"{path}: not valid JSON ({exc}).") from None
    missing = [k for k in ("category", "defect_type", "token", "resolution") if not config.get(k)]
    if not (config.get("base_model") or config.get("model")):
        missing.append("base_model")
    if missing:
        raise DefectFillError(f"{path}: missing setting(s) {', '.join(missing)}; was it written by `defectfill train`?")
    if not (run_dir / LORA_WEIGHTS_NAME).is_file():
        raise DefectFillError(
            f"{run_dir}: no {LORA_WEIGHTS_NAME}. Training has not finished; wait for it or pass a finished run "
            "(or a checkpoint folder holding the weights)."
        )
    if config.get("new_token") and not (run_dir / TOKEN_WEIGHTS_NAME).is_file():
        raise DefectFillError(f"{run_dir}: the run trained the token {config['new_token']!r} but {TOKEN_WEIGHTS_NAME} is missing.")
    return config


def run_prompt(config: dict[str, Any], template: str | None = None) -> tuple[str, str]:
    """(prompt, token) of a run: the template (default the run's object prompt) filled in."""
    token = config.get("new_token") or config["token"]
    template = template or config.get("object_prompt") or "A {object} with {token}"
    if "{token}" not in template:
        raise DefectFillError(f"--prompt {template!r} must contain {{token}} (the trained defect word).")
    try:
        prompt = template.format(object=object_name(config["category"]), token=token)
    except (KeyError, IndexError) as exc:
        raise DefectFillError(f"--prompt {template!r}: unknown placeholder {exc}; use {{object}} and {{token}}.") from None
    return prompt, token


class DefectGenerator:
    """Generate defect images on defect-free ones with a trained run.

        gen = DefectGenerator.from_run("runs/hazelnut-hole")
        result = gen(image, mask, seed=0)   # result.image, result.mask, result.scores, result.chosen
    """

    def __init__(
        self,
        pipe,
        prompt: str,
        token: str,
        resolution: int,
        candidates: int = 8,
        steps: int = 50,
        guidance: float = 7.5,
        feather: int = 0,
        batch_size: int | None = None,
        scorer: Scorer | None = None,
        lpips_weights: str | None = None,
        lpips_pretrained: bool = True,
        device: str | torch.device = "cpu",
        save_attention: bool = False,
    ):
        if candidates < 1:
            raise DefectFillError("--candidates must be at least 1.")
        if steps < 1:
            raise DefectFillError("--steps must be at least 1.")
        if feather < 0:
            raise DefectFillError("--feather must be 0 or more pixels.")
        if batch_size is not None and batch_size < 1:
            raise DefectFillError("--batch-size must be at least 1.")
        self.pipe = pipe
        self.prompt, self.token = prompt, token
        self.resolution = resolution
        self.candidates, self.steps, self.guidance, self.feather = candidates, steps, guidance, feather
        self.batch_size = batch_size or candidates
        self.device = torch.device(device)
        self._scorer = scorer
        self._lpips_weights = lpips_weights
        self._lpips_pretrained = lpips_pretrained
        self.save_attention = save_attention

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scorer: Scorer | None = None,
        prompt: str | None = None,
        scheduler: str = "ddim",
        **settings: Any,
    ) -> "DefectGenerator":
        """Load the run's base model, LoRA and (if trained) new token; settings go to __init__."""
        run_dir = Path(run_dir).expanduser()
        config = read_run_config(run_dir)
        prompt_text, token = run_prompt(config, prompt)
        pipe = load_pipeline(config.get("base_model") or config["model"], dtype)
        try:
            pipe.load_lora_weights(str(run_dir), weight_name=LORA_WEIGHTS_NAME)
            if config.get("new_token"):
                pipe.load_textual_inversion(str(run_dir / TOKEN_WEIGHTS_NAME), token=config["new_token"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DefectFillError(
                f"{run_dir}: cannot load the trained weights into {config.get('base_model') or config['model']} "
                f"({str(exc).splitlines()[0]}). Was the run trained on this base model?"
            ) from None
        pipe.scheduler = _scheduler(pipe, scheduler)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, prompt_text, token, int(config["resolution"]), scorer=scorer, device=device, **settings)

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:  # loaded on first use: --candidates 1 never needs LPIPS weights
            from defectfill.metrics.lpips import load_lpips

            self._scorer = LPIPSScorer(load_lpips(self._lpips_weights, pretrained_backbone=self._lpips_pretrained,
                                                  device=self.device))
        return self._scorer

    def _token_weights(self, n: int) -> torch.Tensor:
        """(B, 77) weights of the token's positions for a UNet batch of n candidates.

        Under classifier-free guidance the pipeline's UNet batch is [unconditional n, conditional n];
        only the conditional rows see the prompt, so the unconditional rows get zero weight.
        """
        from defectfill.model import token_positions

        positions = token_positions(self.pipe.tokenizer, self.prompt, self.token)
        cfg = self.guidance > 1.0
        weights = torch.zeros(2 * n if cfg else n, self.pipe.tokenizer.model_max_length)
        weights[n if cfg else 0 :, positions] = 1.0 / len(positions)
        return weights

    @torch.no_grad()
    def _sample(
        self, image: Image.Image, mask: np.ndarray, seed: int
    ) -> tuple[np.ndarray, list[int], np.ndarray | None]:
        """-> (N, R, R, 3) uint8 at the run's resolution, the candidate seeds, and with
        save_attention the token's cross-attention maps (N, R, R) in [0, 1] (else None)."""
        r = self.resolution
        image_r = image.resize((r, r), Image.Resampling.BICUBIC) if image.size != (r, r) else image
        # area-resize, any coverage counts: a thin mask never vanishes at the model's size
        m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
        m_r = (F.interpolate(m, size=(r, r), mode="area")[0, 0] > 0).numpy()
        mask_r = Image.fromarray(m_r.astype(np.uint8) * 255, mode="L")
        seeds = [candidate_seed(seed, i) for i in range(self.candidates)]
        gen_device = "cpu" if self.device.type == "mps" else self.device
        outputs, maps = [], []
        recorder = None
        if self.save_attention:
            from defectfill.model import AttentionRecorder, vae_scale_factor

            recorder = AttentionRecorder(self.pipe.unet)
            latent = r // vae_scale_factor(self.pipe.vae)
        try:
            for start in range(0, self.candidates, self.batch_size):
                chunk = seeds[start : start + self.batch_size]
                generators = [torch.Generator(gen_device).manual_seed(s) for s in chunk]
                if recorder is not None:
                    recorder.start(self._token_weights(len(chunk)).to(self.device))
                out = self.pipe(
                    prompt=self.prompt, image=image_r, mask_image=mask_r, height=r, width=r,
                    num_images_per_prompt=len(chunk), generator=generators,
                    num_inference_steps=self.steps, guidance_scale=self.guidance, output_type="np",
                ).images  # (n, R, R, 3) float in [0, 1]
                outputs.append(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
                if recorder is not None:
                    # mean over every decoder layer and step; the conditional rows are the last n
                    agg = recorder.aggregate((latent, latent), r)[-len(chunk) :]  # (n, R, R)
                    maps.append(agg.float().cpu().numpy())
                    recorder.stop()
        finally:
            if recorder is not None:
                recorder.remove()
        return np.concatenate(outputs), seeds, (np.concatenate(maps) if maps else None)

    def __call__(self, image: Image.Image, mask: np.ndarray, seed: int = 0) -> GenerationResult:
        """N candidates for one defect-free image and target mask (True = defect), the LFS choice among them."""
        image = image.convert("RGB")
        mask = fit_mask(np.asarray(mask, dtype=bool), image.size)
        if not mask.any():
            raise DefectFillError("the target mask is empty: draw the defect region in white.")
        source = np.asarray(image)  # (H, W, 3) uint8
        raw, seeds, maps = self._sample(image, mask, seed)
        w, h = image.size
        resized = np.stack([
            np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) if c.shape[:2] != (h, w) else c
            for c in raw
        ])  # (N, H, W, 3)
        pasted = paste_back(resized, source, mask, self.feather)  # (N, H, W, 3)
        if self.candidates == 1:
            chosen, scores = 0, None
        else:
            chosen, scores = select_low_fidelity(pasted, source, mask, self.scorer)
        attention = None
        if maps is not None:
            att = Image.fromarray(maps[chosen].astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR)
            attention = np.clip(np.asarray(att), 0.0, 1.0)  # (H, W)
        return GenerationResult(
            image=Image.fromarray(pasted[chosen]), mask=mask, candidates=[Image.fromarray(c) for c in pasted],
            scores=scores, chosen=chosen, attention=attention, seeds=seeds,
        )


# --------------------------------------------------------------------------- dataset writer


@dataclass
class Item:
    """One output image: its index, source image, mask source and seed."""

    index: int
    image: Path
    mask_source: str  # a mask file path, or "shape:<name>"
    seed: int


def _image_list(args: argparse.Namespace, config: dict[str, Any]) -> list[Path]:
    if args.images:
        folder = Path(args.images).expanduser()
        if not folder.is_dir():
            raise DefectFillError(f"--images {folder}: folder not found.")
        images = sorted(p for p in folder.iterdir() if is_image_file(p))
        where = f"--images {folder}"
    else:
        data = config.get("data")
        if not data:
            raise DefectFillError("the run's config.json names no data folder; pass --images DIR of defect-free images.")
        if not Path(data).expanduser().is_dir():
            raise DefectFillError(
                f"the run's data folder {data} is not there (moved or on another machine); "
                "pass --images DIR of defect-free images."
            )
        images = open_layout(data, config.get("layout") or "auto").good_images(config["category"])
        where = f"{data} (defect-free images of {config['category']!r})"
    if not images:
        raise DefectFillError(f"{where}: no defect-free images found; pass --images DIR.")
    for path in images:  # headers only: a bad file fails now, not after the model has loaded
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018
        except (OSError, ValueError) as exc:
            raise DefectFillError(f"{path}: cannot read this file as an image ({exc}). Replace or remove it.") from None
    return images


def _mask_sources(args: argparse.Namespace, run_dir: Path) -> list[str]:
    if args.masks == "shapes":
        return [f"shape:{s}" for s in parse_shapes(args.shapes)]
    if args.masks == "held-out":
        split = read_split(run_dir / "split.json")
        masks = [str(s.mask) for s in split.held_out if s.mask is not None]
        if not masks:
            raise DefectFillError(
                f"{run_dir / 'split.json'}: the held-out set is empty (every defect image was used for training), "
                "so there are no masks to reuse. Use --masks shapes or --masks DIR."
            )
        missing = [m for m in masks if not Path(m).is_file()]
        if missing:
            raise DefectFillError(
                f"{missing[0]}: held-out mask not found ({len(missing)} of {len(masks)} missing; has the dataset "
                f"moved since training?). Use --masks DIR or --masks shapes."
            )
        return masks
    return [str(p) for p in list_user_masks(args.masks)]


def plan_items(count: int, images: list[Path], mask_sources: list[str], seed: int) -> list[Item]:
    """Deterministic item list: image k cycles through the images, the mask shifts each cycle so pairs vary."""
    items = []
    for k in range(count):
        mask = mask_sources[(k + k // len(images)) % len(mask_sources)]
        item_seed = int(np.random.SeedSequence([seed, k]).generate_state(1, dtype=np.uint64)[0] >> 1)
        items.append(Item(k, images[k % len(images)], mask, item_seed))
    return items


def _item_mask(item: Item, image: Image.Image, scale: tuple[float, float]) -> np.ndarray:
    if item.mask_source.startswith("shape:"):
        rng = np.random.default_rng(np.random.SeedSequence([item.seed, 1]))
        return shape_mask(item.mask_source[len("shape:"):], estimate_foreground(image), scale, rng)
    mask = fit_mask(load_mask(item.mask_source), image.size)
    if not mask.any():
        raise DefectFillError(f"{item.mask_source}: empty after resizing to {image.size[0]}x{image.size[1]}.")
    return mask


class OutputFolder:
    """The files of one output folder: names, the finished-item manifest, the run identity."""

    def __init__(self, root: Path, category: str, defect_type: str, count: int):
        self.root = root
        self.category, self.defect_type = category, defect_type
        self.digits = max(3, len(str(max(count - 1, 0))))

    def image_path(self, index: int) -> Path:
        return self.root / self.category / "test" / self.defect_type / f"{index:0{self.digits}d}.png"

    def mask_path(self, index: int) -> Path:
        return self.root / self.category / "ground_truth" / self.defect_type / f"{index:0{self.digits}d}_mask.png"

    def candidate_path(self, index: int, c: int) -> Path:
        # outside the MVTec tree so dataset loaders never read candidates as test images
        return self.root / "candidates" / self.category / self.defect_type / f"{index:0{self.digits}d}_{c}.png"

    def attention_path(self, index: int) -> Path:
        return self.root / "attention" / self.category / self.defect_type / f"{index:0{self.digits}d}_attn.png"

    def part_path(self, rank: int) -> Path:
        return self.root / f"manifest.part{rank}.jsonl"

    def manifest_files(self) -> list[Path]:
        return [self.root / MANIFEST] + sorted(self.root.glob("manifest.part*.jsonl"))

    def finished(self) -> dict[int, dict]:
        """Manifest rows by index whose image and mask exist; a torn last line (killed mid-write) is ignored."""
        rows: dict[int, dict] = {}
        for path in self.manifest_files():
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    index = int(row["index"])
                    # the row's own paths: a later --count may change the width of the file names
                    files = (self.root / row["image"], self.root / row["mask"])
                except (ValueError, KeyError, TypeError):
                    continue
                if all(f.is_file() for f in files):
                    rows[index] = row
        return rows

    def merge_manifest(self) -> int:
        """Fold the per-process parts into one manifest.jsonl sorted by index; returns its row count."""
        rows = self.finished()
        text = "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))
        atomic_write(self.root / MANIFEST, lambda p: p.write_text(text))
        for part in self.root.glob("manifest.part*.jsonl"):
            part.unlink()
        return len(rows)


def _identity(run_dir: Path, config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return {"run": str(run_dir.resolve()), "run_config_sha256": config_hash, "settings": settings}


def _prepare_output(
    out: OutputFolder, identity: dict[str, Any], resume: bool, overwrite: bool, is_main: bool = True
) -> None:
    """Refuse a folder holding other results unless told; clear our own files for --overwrite."""
    state_path = out.root / STATE
    if overwrite and is_main and state_path.is_file():
        # only what this tool writes is removed; anything else the user keeps there stays
        for row in out.finished().values():
            for key in ("image", "mask"):
                (out.root / row[key]).unlink(missing_ok=True)
        for name in ("candidates", "attention", _PREVIEW_DIR):
            shutil.rmtree(out.root / name, ignore_errors=True)
        for p in out.manifest_files() + [out.root / PREVIEW, state_path]:
            p.unlink(missing_ok=True)
    if state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except ValueError:
            previous = None
        # a folder with no finished item holds nothing to protect (e.g. a first attempt that failed early)
        if previous != identity and not resume and out.finished():
            what = "another run" if previous is None or previous.get("run") != identity["run"] or \
                previous.get("run_config_sha256") != identity["run_config_sha256"] else "other settings"
            raise DefectFillError(
                f"--output {out.root}: holds results of {what} ({state_path}). Pass --resume to add to them, "
                "--overwrite to replace them, or choose another --output folder."
            )
    elif out.root.is_dir() and any(out.root.iterdir()) and not (resume or overwrite):
        raise DefectFillError(
            f"--output {out.root}: folder is not empty and was not written by `defectfill generate`. "
            "Choose an empty or new folder (or pass --overwrite to write into it anyway)."
        )
    if is_main:
        out.root.mkdir(parents=True, exist_ok=True)
        write_json(state_path, identity)


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def _thumb(image: Image.Image, side: int) -> Image.Image:
    return image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


_CAPTION_H = 14  # px under each tile for its label


def _preview_strip(source: Image.Image, result: GenerationResult, side: int = 128) -> Image.Image:
    """source | mask | chosen | other candidates, each `side` px, captioned with the LFS scores.

    The chosen candidate is framed in green, so a person sees at once what selection kept.
    """
    from PIL import ImageDraw

    order = [result.chosen] + [i for i in range(len(result.candidates)) if i != result.chosen]
    mask_im = Image.fromarray(result.mask.astype(np.uint8) * 255, mode="L")
    tiles = [(source, "source"), (mask_im, "mask")]
    for rank, i in enumerate(order):
        score = f" {result.scores[i]:.3f}" if result.scores else ""
        tiles.append((result.candidates[i], ("chosen" if rank == 0 else f"#{i}") + score))
    strip = Image.new("RGB", (side * len(tiles), side + _CAPTION_H), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for k, (tile, caption) in enumerate(tiles):
        strip.paste(_thumb(tile, side), (k * side, 0))
        draw.text((k * side + 3, side + 1), caption, fill=(230, 230, 230))
    draw.rectangle([2 * side, 0, 3 * side - 1, side - 1], outline=(0, 220, 0), width=2)
    return strip


def _write_preview(out: OutputFolder) -> None:
    strips = [Image.open(p).convert("RGB") for p in sorted((out.root / _PREVIEW_DIR).glob("*.png"))]
    if not strips:
        return
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (0, 0, 0))
    y = 0
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height
    _save_png(sheet, out.root / PREVIEW)


def _process_info(args: argparse.Namespace):
    """(rank, world size, real distributed?) from accelerate; tests may simulate rank/world via args."""
    from accelerate import PartialState

    # without cpu=True, accelerate treats a launch on a machine with no GPU as one process each,
    # and every process would generate every item
    device = getattr(args, "device", None) or ""
    state = PartialState(cpu=device.startswith("cpu") or not torch.cuda.is_available())
    rank = getattr(args, "rank", None)
    world = getattr(args, "world_size", None)
    if rank is not None and world is not None:
        return int(rank), int(world), state
    return state.process_index, state.num_processes, state


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `defectfill generate`."""
    parser.add_argument("--run", required=True, help="run folder written by `defectfill train`")
    parser.add_argument("--output", required=True, help="output dataset folder (MVTec layout)")
    parser.add_argument("--count", type=int, required=True, help="number of defect images to write")
    parser.add_argument("--images", default=None, help="folder of defect-free images (default: the category's train/good)")
    parser.add_argument("--masks", default="held-out",
                        help="'held-out' (masks of the run's held-out defect images), 'shapes', or a folder of masks")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="shapes for --masks shapes, comma-separated")
    parser.add_argument("--mask-scale", default="0.005,0.05", help="area range of shape masks, fractions MIN,MAX")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per image for Low-Fidelity Selection (1: no LPIPS)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler")
    parser.add_argument("--prompt", default=None, help="prompt template with {token} and {object} (default: the run's)")
    parser.add_argument("--feather", type=int, default=0, help="blend this many pixels inside the mask edge")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each item's seed derives from it and its index")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="candidates per pipeline call (default: all candidates of an image in one call)")
    parser.add_argument("--save-candidates", action="store_true", help="also write every candidate to candidates/")
    parser.add_argument("--save-attention", action="store_true",
                        help="also write the token's cross-attention map of each chosen image to attention/")
    parser.add_argument("--lpips-weights", default=None, help="local AlexNet weights for LPIPS (offline machines)")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="LPIPS with an untrained AlexNet (no download): for offline demos and tests only, "
                             "its scores do not measure perceptual difference")
    parser.add_argument("--preview-rows", type=int, default=8, help="rows of preview.png")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: accelerate's device)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="pipeline weights dtype")
    parser.add_argument("--resume", action="store_true", help="add to an output folder holding other results")
    parser.add_argument("--overwrite", action="store_true", help="replace the results in the output folder")


def run_generate(args: argparse.Namespace, stop_after: int | None = None) -> int:
    """Write the synthetic dataset; returns the exit code. `stop_after` (tests) ends after that many new items."""
    from tqdm.auto import tqdm

    if args.count is None or args.count < 1:
        raise DefectFillError(f"--count {args.count}: must be at least 1.")
    if args.resume and args.overwrite:
        raise DefectFillError("--resume and --overwrite exclude each other; pass one.")
    # checked before anything is written or loaded
    for ok, message in (
        (args.candidates >= 1, "--candidates must be at least 1"),
        (args.steps >= 1, "--steps must be at least 1"),
        (args.guidance >= 0, "--guidance must be 0 or more"),
        (args.feather >= 0, "--feather must be 0 or more pixels"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.preview_rows >= 0, "--preview-rows must be 0 or more"),
    ):
        if not ok:
            raise DefectFillError(message + ".")
    scale = parse_mask_scale(args.mask_scale)
    run_dir = Path(args.run).expanduser()
    config = read_run_config(run_dir)
    category, defect_type = config["category"], config["defect_type"]
    images = _image_list(args, config)
    mask_sources = _mask_sources(args, run_dir)
    items = plan_items(args.count, images, mask_sources, args.seed)

    rank, world, state = _process_info(args)
    distributed = state.num_processes > 1
    settings = {
        "masks": args.masks, "shapes": args.shapes, "mask_scale": list(scale), "candidates": args.candidates,
        "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler, "prompt": args.prompt,
        "feather": args.feather, "seed": args.seed, "images": args.images,
    }
    out = OutputFolder(Path(args.output).expanduser(), category, defect_type, args.count)
    identity = _identity(run_dir, config, settings)
    if rank == 0 or not distributed:
        # one process checks and prepares the folder; the others wait so they never see it half-prepared
        _prepare_output(out, identity, args.resume, args.overwrite, is_main=True)
    if distributed:
        state.wait_for_everyone()

    done = out.finished()
    mine = [it for it in items if it.index % world == rank and it.index not in done]
    log.info("process %d of %d: %d item(s) to generate, %d of %d already finished.",
             rank, world, len(mine), len(done), args.count)
    if mine:
        device = args.device or (str(state.device) if distributed else ("cuda" if torch.cuda.is_available() else "cpu"))
        generator = DefectGenerator.from_run(
            run_dir, device=device, dtype=DTYPES[args.dtype], prompt=args.prompt, scheduler=args.scheduler,
            candidates=args.candidates, steps=args.steps, guidance=args.guidance, feather=args.feather,
            batch_size=args.batch_size, lpips_weights=args.lpips_weights, save_attention=args.save_attention,
            lpips_pretrained=not getattr(args, "lpips_random_backbone", False),
        )
        if args.candidates > 1:
            generator.scorer  # noqa: B018 - load LPIPS now: a missing download fails before any sampling
        part = out.part_path(rank)
        bar = tqdm(mine, desc=f"generate [{rank}/{world}]" if world > 1 else "generate", unit="img",
                   position=rank if distributed else None, disable=None)
        for n, item in enumerate(bar):
            if stop_after is not None and n >= stop_after:
                break
            source = load_rgb(item.image)
            mask = _item_mask(item, source, scale)
            result = generator(source, mask, item.seed)
            _save_png(result.image, out.image_path(item.index))
            _save_png(Image.fromarray(result.mask.astype(np.uint8) * 255, mode="L"), out.mask_path(item.index))
            if args.save_candidates:
                for c, cand in enumerate(result.candidates):
                    _save_png(cand, out.candidate_path(item.index, c))
            if result.attention is not None:
                heat = Image.fromarray(np.rint(result.attention * 255).astype(np.uint8), mode="L")
                _save_png(heat, out.attention_path(item.index))
            if item.index < args.preview_rows:
                _save_png(_preview_strip(source, result), out.root / _PREVIEW_DIR / f"{item.index:06d}.png")
            row = {
                "index": item.index, "image": str(out.image_path(item.index).relative_to(out.root)),
                "mask": str(out.mask_path(item.index).relative_to(out.root)), "source_image": str(item.image),
                "mask_source": item.mask_source, "prompt": generator.prompt, "seed": item.seed,
                "candidate_seeds": result.seeds,
                "scores": result.scores, "chosen": result.chosen, "settings": settings,
            }
            if result.attention is not None:
                row["attention"] = str(out.attention_path(item.index).relative_to(out.root))
            # appended only now that image and mask exist: a manifest row always means a finished item
            with open(part, "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        bar.close()
    if distributed:
        state.wait_for_everyone()
    if rank == 0 or not distributed:
        total = out.merge_manifest()
        _write_preview(out)
        log.info("%s: %d of %d images written.", out.root, total, args.count)
    return 0
