"""`defectfill generate`: the resumable dataset writer around the generator (`generator.DefectGenerator`).

It plans the items (which defect-free image, which mask, which seed), writes
each chosen image and its mask in the MVTec AD layout, appends a manifest row
only once both files exist, stacks a preview of the first items, and splits the
items over processes (`accelerate launch` / `torchrun`). A killed run continues
where it stopped; a folder holding another run's results is refused.

With `--defect-types a,b` every image gets several defects, painted one after
the other into the previous result, each in its own mask (kept apart from the
earlier ones where the masks allow) with its own run or token and its own
Low-Fidelity Selection; the image is written as the combined type `a+b` with the
union mask, and each defect's mask, type and scores go to the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from defectfill.config.settings import resolve_precision
from defectfill.config.stages import GenerateConfig, TrainConfig
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import folder_lock
from defectfill.data import load_mask, load_rgb, open_layout
from defectfill.data.images import image_size, is_image_file, mask_file
from defectfill.data.layouts import find_type
from defectfill.data.masks import estimate_foreground, fit_mask, list_user_masks, parse_shapes, shape_mask
from defectfill.generate.generator import DefectGenerator, derived_seed
from defectfill.model.device import resolve_device
from defectfill.outputs.generated import (
    CAPTION_H,
    PREVIEW_DIR,
    Item,
    OutputFolder,
    finish_output,
    folder_relative,
    generation_provenance,
    items_problem,
    output_identity,
    output_problem,
    prepare_output,
    row_mask_source,
    save_candidates_and_attention,
    save_mask,
    save_png,
    stamped,
    thumb,
    write_item,
)
from defectfill.outputs.run_folder import SPLIT_NAME, read_run_split, read_trained_run

log = logging.getLogger(__name__)


@dataclass
class Painter:
    """One defect type to paint: the run that trained it, and where its masks come from."""

    defect_type: str
    run_dir: Path
    config: TrainConfig
    mask_sources: list[str] = field(default_factory=list)  # `add_mask_sources`
    mask_rule: str = "half"


def _image_list(settings: GenerateConfig, config: TrainConfig) -> list[Path]:
    if settings.images:
        folder = Path(settings.images).expanduser()
        if not folder.is_dir():
            raise DefectFillError(f"--images {folder}: folder not found.")
        images = sorted(p for p in folder.iterdir() if is_image_file(p))
        where = f"--images {folder}"
    else:
        data = config.data
        if not data:
            raise DefectFillError("the run's config.json names no data folder; pass --images DIR of defect-free images.")
        if not Path(data).expanduser().is_dir():
            raise DefectFillError(
                f"the run's data folder {data} is not there (moved or on another machine); "
                "pass --images DIR of defect-free images."
            )
        images = open_layout(data, config.layout, config.good_images).good_images(config.category)
        where = f"{data} (defect-free images of {config.category!r})"
    if not images:
        raise DefectFillError(f"{where}: no defect-free images found; pass --images DIR.")
    for path in images:  # headers only: a bad file fails now, not after the model has loaded
        image_size(path)  # a DefectFillError naming the file (unreadable, a decompression bomb)
    return images


def _mask_sources(settings: GenerateConfig, run_dir: Path, defect_type: str | None = None) -> tuple[list[str], str]:
    """(the mask sources of a type, how its mask files are read): held-out masks keep their split's rule."""
    if settings.masks == "shapes":
        return [f"shape:{s}" for s in parse_shapes(settings.shapes)], "half"
    if settings.masks == "held-out":
        split = read_run_split(run_dir, defect_type)
        masks = [str(s.mask) for s in split.held_out if s.mask is not None]
        if not masks:
            raise DefectFillError(
                f"{run_dir / SPLIT_NAME}: the held-out set is empty for {split.defect_type!r} (every defect image was "
                "used for training), so there are no masks to reuse. Use --masks shapes or --masks DIR."
            )
        missing = [str(mask_file(m)) for m in masks if not mask_file(m).is_file()]
        if missing:
            raise DefectFillError(
                f"{missing[0]}: held-out mask not found ({len(missing)} of {len(masks)} missing; has the dataset "
                f"moved since training?). Use --masks DIR or --masks shapes."
            )
        return masks, split.mask_rule
    return [str(p) for p in list_user_masks(settings.masks)], "auto"  # class ids and dark colours count


def plan_items(count: int, images: list[Path], mask_sources: list[str], seed: int,
               mask_rule: str = "half") -> list[Item]:
    """Deterministic item list: image k cycles through the images, the mask shifts each cycle so pairs vary."""
    items = []
    for k in range(count):
        mask = mask_sources[(k + k // len(images)) % len(mask_sources)]
        item_seed = derived_seed(seed, k)
        items.append(Item(k, images[k % len(images)], mask, item_seed, mask_rule))
    return items


def _item_mask(item: Item, image: Image.Image, scale: tuple[float, float]) -> np.ndarray:
    if item.mask_source.startswith("shape:"):
        rng = np.random.default_rng(np.random.SeedSequence([item.seed, 1]))
        return shape_mask(item.mask_source[len("shape:"):], estimate_foreground(image), scale, rng)
    mask = fit_mask(load_mask(item.mask_source, item.mask_rule), image.size)
    if not mask.any():
        raise DefectFillError(f"{item.mask_source}: empty after resizing to {image.size[0]}x{image.size[1]}.")
    return mask


def _grow(mask: np.ndarray, pixels: int = 2) -> np.ndarray:
    """The mask grown by `pixels` (a 3x3 maximum filter, repeated): a gap kept between two defects."""
    from PIL import ImageFilter

    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    for _ in range(pixels):
        im = im.filter(ImageFilter.MaxFilter(3))
    return np.asarray(im) >= 128


def defect_mask(painter: Painter, k: int, images: int, i: int, seed: int, image: Image.Image,
                scale: tuple[float, float], taken: np.ndarray) -> tuple[np.ndarray, str]:
    """The mask of defect `i` of item `k` (several defects in one image) and its source, kept off `taken`.

    Mask files are tried from the planned one (which shifts with the item and the defect, as `plan_items`
    shifts) on; the first that keeps 2 px from the earlier defects wins, else the planned one (its overlap then
    belongs to this later defect). Shapes are drawn off the earlier defects where the object has room.
    """
    sources = painter.mask_sources
    start = (k + k // images + i) % len(sources)
    if sources[start].startswith("shape:"):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        foreground = estimate_foreground(image)
        name = sources[start][len("shape:"):]
        try:
            return shape_mask(name, foreground & ~_grow(taken), scale, rng), sources[start]
        except DefectFillError:  # no room beside the earlier defects: overlap them
            return shape_mask(name, foreground, scale, rng), sources[start]
    planned = None
    for j in range(len(sources)):
        source = sources[(start + j) % len(sources)]
        mask = _item_mask(Item(k, Path(), source, seed, painter.mask_rule), image, scale)
        if planned is None:
            planned = (mask, source)
        if not (mask & _grow(taken)).any():
            return mask, source
    return planned


def run_folders(run: str) -> list[Path]:
    """`--run`: one run folder, or several comma-separated (per-type runs painted together with --defect-types)."""
    return [Path(r.strip()).expanduser() for r in run.split(",") if r.strip()]


def plan_painters(settings: GenerateConfig, run_dirs: list[Path]) -> list[Painter]:
    """Which run paints each asked defect type, in painting order; an unknown type names what the runs know."""
    runs = [(d, read_trained_run(d)) for d in run_dirs]
    categories = sorted({c.category for _, c in runs})
    if len(categories) > 1:
        raise DefectFillError(f"--run {settings.run}: the runs are of different categories ({', '.join(categories)}); "
                              "several defects go into images of one object.")
    known: dict[str, tuple[Path, TrainConfig]] = {}
    for run_dir, config in runs:
        for t in config.type_tokens():
            if t in known:
                raise DefectFillError(f"--run: defect type {t!r} is trained by both {known[t][0]} and {run_dir}; "
                                      "give one run per type.")
            known[t] = (run_dir, config)
    asked = settings.painted_types()
    if asked is None:
        if len(known) > 1:
            what = "--defect-types" if len(runs) > 1 else "--defect-type (or several with --defect-types)"
            raise DefectFillError(f"--run {settings.run}: trained the defect types {', '.join(known)}; name what "
                                  f"to draw with {what}.")
        asked = list(known)
    by_run: dict[Path, list[str]] = {}
    for t, (d, _) in known.items():
        by_run.setdefault(d, []).append(t)
    listing = "; ".join(f"{', '.join(types)} ({d})" for d, types in by_run.items())
    painters = []
    for name in asked:
        match = find_type(name, known)
        if match is None:
            flag = "--defect-types" if settings.defect_types else "--defect-type"
            raise DefectFillError(f"{flag} {name}: no run given trained this defect type. The run(s) know: "
                                  f"{listing}.")
        run_dir, config = known[match]
        painters.append(Painter(match, run_dir, config))
    unused = [str(d) for d, _ in runs if all(p.run_dir != d for p in painters)]
    if unused:
        raise DefectFillError(f"--run: {', '.join(unused)} trained none of the asked defect types "
                              f"({', '.join(asked)}); leave it out.")
    return painters


def add_mask_sources(painters: list[Painter], settings: GenerateConfig) -> None:
    """Each painter's mask sources (its own type's held-out masks, shapes, or DIR) and how its mask files read."""
    for painter in painters:
        painter.mask_sources, painter.mask_rule = _mask_sources(settings, painter.run_dir, painter.defect_type)


def _paint_several(out: OutputFolder, item: Item, source: Image.Image, painters: list[Painter],
                   drawers: list[DefectGenerator], n_images: int, scale: tuple[float, float],
                   settings: GenerateConfig, part: Path) -> dict[str, Any]:
    """Several defects into one image, one after the other: defect i is painted into the result of defect i-1
    inside its own mask with its own token and its own LFS (against the image it is painted into). Writes the
    final image, the union mask and each defect's own mask; returns the manifest row."""
    image = source
    taken = np.zeros((source.size[1], source.size[0]), bool)
    defects: list[dict[str, Any]] = []
    own_masks: list[np.ndarray] = []
    steps: list[tuple[str, np.ndarray, Image.Image]] = []
    for i, (painter, drawer) in enumerate(zip(painters, drawers, strict=True)):
        seed = derived_seed(item.seed, i)
        mask, mask_source = defect_mask(painter, item.index, n_images, i, seed, image, scale, taken)
        result = drawer(image, mask, seed)
        for earlier in own_masks:  # a forced overlap: the later defect is what shows there
            earlier &= ~result.mask
        own_masks.append(result.mask.copy())
        taken |= result.mask
        attention = save_candidates_and_attention(out, item.index, result, settings.save_candidates, defect=i)
        defect = {"defect_type": painter.defect_type, "run": folder_relative(out.root, painter.run_dir),
                  "mask_source": row_mask_source(out.root, mask_source),
                  "prompt": drawer.prompt, "seed": seed, "candidate_seeds": result.seeds, "scores": result.scores,
                  "chosen": result.chosen}
        if attention is not None:
            defect["attention"] = attention
        defects.append(defect)
        image = result.image
        steps.append((painter.defect_type, result.mask, image))
    out.reserve(part, out.item_files(item.index))  # never over a file not ours
    for i, (defect, own) in enumerate(zip(defects, own_masks, strict=True)):
        path = out.defect_mask_path(item.index, i, defect["defect_type"])
        save_mask(own, path)
        defect["mask"] = str(path.relative_to(out.root))
    save_png(image, out.image_path(item.index))
    save_mask(taken, out.mask_path(item.index))
    if item.index < settings.preview_rows:
        save_png(_several_preview_strip(source, taken, steps), out.root / PREVIEW_DIR / f"{item.index:06d}.png")
    return {
        "index": item.index, "image": str(out.image_path(item.index).relative_to(out.root)),
        "mask": str(out.mask_path(item.index).relative_to(out.root)), "source_image": folder_relative(out.root, item.image),
        "seed": item.seed, "defect_type": out.defect_type, "defects": defects,
    }


def _paint_jointly(out: OutputFolder, item: Item, source: Image.Image, painters: list[Painter],
                   drawers: list[DefectGenerator], n_images: int, scale: tuple[float, float],
                   settings: GenerateConfig, part: Path) -> dict[str, Any]:
    """Several defects into one image in one sampling pass (--multi-defect joint, `steering.paint_jointly`): each
    defect's mask is chosen as `_paint_several` chooses it (kept 2 px off the earlier ones), then one prompt names
    every token, each token's attention is steered to its own mask, and one LFS runs over the union. Writes what
    `_paint_several` writes; every defect's record carries the pass's prompt, seeds and scores."""
    from defectfill.generate.steering import paint_jointly

    taken = np.zeros((source.size[1], source.size[0]), bool)
    own_masks: list[np.ndarray] = []
    mask_sources: list[str] = []
    for i, painter in enumerate(painters):
        mask, mask_source = defect_mask(painter, item.index, n_images, i, derived_seed(item.seed, i), source, scale,
                                        taken)
        for earlier in own_masks:  # a forced overlap: the later defect owns it, as in sequential painting
            earlier &= ~mask
        own_masks.append(mask.copy())
        mask_sources.append(mask_source)
        taken |= mask
    result, prompt = paint_jointly(drawers[0], source, own_masks, [p.defect_type for p in painters], item.seed)
    out.reserve(part, out.item_files(item.index))  # never over a file not ours
    save_candidates_and_attention(out, item.index, result, settings.save_candidates)
    defects: list[dict[str, Any]] = []
    for i, (painter, own, mask_source) in enumerate(zip(painters, own_masks, mask_sources, strict=True)):
        path = out.defect_mask_path(item.index, i, painter.defect_type)
        save_mask(own, path)
        defects.append({"defect_type": painter.defect_type, "run": folder_relative(out.root, painter.run_dir),
                  "mask_source": row_mask_source(out.root, mask_source),
                        "mask": str(path.relative_to(out.root)), "prompt": prompt, "seed": item.seed,
                        "candidate_seeds": result.seeds, "scores": result.scores, "chosen": result.chosen})
    save_png(result.image, out.image_path(item.index))
    save_mask(result.mask, out.mask_path(item.index))
    if item.index < settings.preview_rows:
        step = ("+".join(p.defect_type for p in painters), result.mask, result.image)
        save_png(_several_preview_strip(source, result.mask, [step]), out.root / PREVIEW_DIR / f"{item.index:06d}.png")
    return {
        "index": item.index, "image": str(out.image_path(item.index).relative_to(out.root)),
        "mask": str(out.mask_path(item.index).relative_to(out.root)), "source_image": folder_relative(out.root, item.image),
        "seed": item.seed, "defect_type": out.defect_type, "defects": defects, "multi_defect": "joint",
    }


def _several_preview_strip(source: Image.Image, union: np.ndarray, steps: list[tuple[str, np.ndarray, Image.Image]],
                           side: int = 128) -> Image.Image:
    """source | union mask | the image after each defect (captioned with its type); the last one is framed."""
    from PIL import ImageDraw

    tiles = [(source, "source"), (Image.fromarray(union.astype(np.uint8) * 255, mode="L"), "union mask")]
    tiles += [(im, f"+ {t}") for t, _, im in steps]
    strip = Image.new("RGB", (side * len(tiles), side + CAPTION_H), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for k, (tile, caption) in enumerate(tiles):
        strip.paste(thumb(tile, side), (k * side, 0))
        draw.text((k * side + 3, side + 1), caption, fill=(230, 230, 230))
    draw.rectangle([(len(tiles) - 1) * side, 0, len(tiles) * side - 1, side - 1], outline=(0, 220, 0), width=2)
    return strip


class BackgroundWriter:
    """Runs each item's writes (`write_item`: PNG encoding, atomic files, then its manifest row) on one worker
    thread, in the order given, while the sampling thread goes on to the next images.

    At most `depth` items wait, so memory stays bounded. The first failure stops the writes after it and is
    raised on the sampling thread at the next `submit` or at `close`; items written before it keep their
    rows, so a resumed run redoes only the rest. `enabled=False` writes on the caller's thread instead."""

    def __init__(self, enabled: bool = True, depth: int = 8):
        self.enabled = enabled
        self._error: BaseException | None = None
        if enabled:
            import queue
            import threading

            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._work, name="defectfill-writer", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:  # after a failure nothing more is written
                fn, args, kwargs = job
                try:
                    fn(*args, **kwargs)
                except BaseException as exc:  # handed to the sampling thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            fn(*args, **kwargs)
            return
        self._raise()
        self._queue.put((fn, args, kwargs))

    def close(self) -> None:
        """Waits for every submitted write; raises the first failure."""
        if self.enabled and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the items already sampled are still written; the error that stopped sampling is the one raised
            self.close()
        except Exception:
            log.exception("a write failed while stopping")


def _process_info(device: str | None, rank: int | None, world_size: int | None):
    """(rank, world size, accelerate's state); tests may simulate rank and world size."""
    from accelerate import PartialState

    # without cpu=True, accelerate treats a launch on a machine with no GPU as one process each,
    # and every process would generate every item
    state = PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())
    if rank is not None and world_size is not None:
        return int(rank), int(world_size), state
    return state.process_index, state.num_processes, state


def generate_command(args: argparse.Namespace) -> int:
    """`defectfill generate`: the flags (and --config file) as a GenerateConfig, then the writer."""
    return run_generate(GenerateConfig.from_args(args))


def run_generate(settings: GenerateConfig, stop_after: int | None = None, rank: int | None = None,
                 world_size: int | None = None) -> int:
    """Write the synthetic dataset; returns the exit code.

    `stop_after` (tests) ends after that many new items; `rank`/`world_size` (tests) simulate a process of many.
    """
    from tqdm.auto import tqdm

    settings.validate()  # checked before anything is written or loaded
    scale = settings.scale()
    run_dirs = run_folders(settings.run)
    painters = plan_painters(settings, run_dirs)
    if settings.multi_defect == "joint" and len({p.run_dir for p in painters}) > 1:
        raise DefectFillError(f"--multi-defect joint: --run {settings.run} gives several runs; one pass needs one "
                              "run trained on every type (train --defect-type all, or run --one-model-per-object), "
                              "or paint them one after the other (--multi-defect sequential).")
    config = painters[0].config
    settings = settings.sampling_for(config.model)  # what the base recommends, where the user set nothing
    category, defect_type = config.category, "+".join(p.defect_type for p in painters)
    images = _image_list(settings, config)
    add_mask_sources(painters, settings)  # after the images: a moved dataset is named by its images first
    multi = settings.defect_types is not None and len(settings.defect_types) > 1
    # the image, mask and seed of every item; with several defects each defect's mask is chosen later, per defect
    items = plan_items(settings.count, images, painters[0].mask_sources, settings.seed, painters[0].mask_rule)

    rank, world, state = _process_info(settings.device, rank, world_size)
    distributed = state.num_processes > 1
    device = settings.device or (str(state.device) if distributed else resolve_device())
    precision = resolve_precision(settings.mixed_precision, device)
    out = OutputFolder(Path(settings.output).expanduser(), category, defect_type, settings.count)
    identity = output_identity(run_dirs, settings)
    is_main = rank == 0 or not distributed
    with contextlib.ExitStack() as stack:
        if is_main:
            # one process checks and prepares the folder; the others wait so they never see it half-prepared
            problem = output_problem(out, identity, settings.resume, settings.overwrite)  # before writing anything
            # an item is never written over a file this folder's manifest does not name (nor deleted by --overwrite)
            problem = problem or items_problem(out, [it.index for it in items])
            if problem:
                raise DefectFillError(problem)
            out.root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(folder_lock(out.root, "generate"))  # a second writer is refused, not mixed in
            record = {"config": {**settings.to_dict(), "mixed_precision": precision}}  # what ran, precision resolved
            prepare_output(out, identity, settings.resume, settings.overwrite, record)
        if distributed:
            state.wait_for_everyone()

        done = out.finished()
        mine = [it for it in items if it.index % world == rank and it.index not in done]
        log.info("process %d of %d: %d item(s) to generate, %d of %d already finished.",
                 rank, world, len(mine), len(done), settings.count)
        if mine:
            generators: dict[Path, DefectGenerator] = {}
            for painter in painters:  # one pipeline per run; a per-object run's types share it
                if painter.run_dir not in generators:
                    generators[painter.run_dir] = DefectGenerator.from_run(
                        painter.run_dir, device=device, mixed_precision=precision, sampling=settings.sampling,
                        lpips_weights=settings.lpips_weights, save_attention=settings.save_attention,
                        lpips_pretrained=not settings.lpips_random_backbone, merge_lora=settings.merge_lora,
                        compile=settings.compile, defect_type=painter.defect_type,
                    )
                    if settings.candidates > 1:
                        generators[painter.run_dir].scorer  # noqa: B018 - load LPIPS now: a missing download fails before any sampling
            drawers = [generators[p.run_dir].for_type(p.defect_type) for p in painters]
            provenance = generation_provenance(config.model, run_dirs, device, precision)  # once: hashes the weights
            part = out.part_path(rank)
            todo = mine if stop_after is None else mine[:stop_after]
            bar = tqdm(total=len(todo), desc=f"generate [{rank}/{world}]" if world > 1 else "generate", unit="img",
                       position=rank if distributed else None, disable=None)
            if multi:  # each defect is painted into the result of the one before: one item at a time
                for item in todo:
                    source = load_rgb(item.image)
                    paint = _paint_jointly if settings.multi_defect == "joint" else _paint_several
                    row = paint(out, item, source, painters, drawers, len(images), scale, settings, part)
                    row["settings"] = identity["settings"]
                    row["provenance"] = stamped(provenance)
                    out.add_row(part, row)
                    bar.update(1)
            else:
                drawer = drawers[0]
                written = {"save_candidates": settings.save_candidates, "preview_rows": settings.preview_rows,
                           "provenance": provenance,
                           "defect_type": drawer.defect_type if settings.painted_types() else None}
                with BackgroundWriter(settings.background_writes) as writer:
                    for start in range(0, len(todo), settings.batch_images):
                        group = todo[start : start + settings.batch_images]
                        sources = [load_rgb(item.image) for item in group]
                        requests = [(s, _item_mask(it, s, scale), it.seed) for it, s in zip(group, sources, strict=True)]
                        if len(group) == 1:
                            results = [drawer(*requests[0])]
                        else:
                            results = drawer.generate_many(requests)
                        for item, source, result in zip(group, sources, results, strict=True):
                            writer.submit(write_item, out, item, source, result, drawer.prompt, identity["settings"],
                                          part, **written)
                        bar.update(len(group))
            bar.close()
        if distributed:
            state.wait_for_everyone()
        if is_main:
            total = finish_output(out, settings.with_good)
            log.info("%s: %d of %d images written.", out.root, total, settings.count)
        return 0

