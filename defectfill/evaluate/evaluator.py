"""`defectfill evaluate`: KID and IC-LPIPS against the held-out real images, downstream models, a report.

Two ways to name what is compared:
- `--run RUN`: the category, defect type and held-out images of a training run
  (its split.json); IC-LPIPS clusters around the run's reference images.
- `--data ROOT --category C [--defect-type T]`: the same deterministic split is
  made from the dataset, for one defect type or every type of the category.

The generated folder is in the MVTec layout (<category>/test/<type>/*.png and
<category>/ground_truth/<type>/*_mask.png), as `defectfill generate` writes it.
`evaluate()` takes injectable networks so tests and other tools can run it
without downloading Inception, AlexNet or ImageNet weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from defectfill.config.stages import EvaluateConfig, TrainConfig
from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import claim_folder, folder_lock
from defectfill.data import open_layout
from defectfill.data.images import image_to_tensor, load_rgb
from defectfill.data.layouts import DefectSample, Layout
from defectfill.data.split import Split, make_split
from defectfill.evaluate.metrics.downstream import train_classifier, train_localiser
from defectfill.evaluate.metrics.ic_lpips import Distance, ic_lpips_details, lpips_distance_fn
from defectfill.evaluate.metrics.kid import kid_images
from defectfill.outputs.report import (
    METRICS_NAME,
    REPORT_HTML,
    REPORT_MD,
    confusion_picture,
    sample_grid,
    sample_grid_name,
    write_report,
)
from defectfill.outputs.run_folder import read_run_config, read_run_split, run_split_path

log = logging.getLogger(__name__)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _read_run(run: Path, defect_type: str | None = None) -> tuple[TrainConfig | None, Split]:
    """The run's settings (None for a run folder without config.json) and its split (of a model trained on several
    defect types: the split of `defect_type`)."""
    if not run.is_dir():
        raise DefectFillError(f"{run}: run folder not found.")
    config = read_run_config(run, strict=False)
    return config, read_run_split(run, defect_type)


def _rebase(split: Split, root: Path) -> Split:
    """The split with every path moved from its recorded dataset root to `root`."""
    def move(samples: list[DefectSample]) -> list[DefectSample]:
        out = []
        for s in samples:
            try:
                image = root / s.image.relative_to(split.data_root)
                mask = root / s.mask.relative_to(split.data_root) if s.mask is not None else None
            except ValueError:
                raise DefectFillError(
                    f"{s.image}: outside the split's dataset root {split.data_root}; cannot move it to {root}."
                ) from None
            out.append(dataclasses.replace(s, image=image, mask=mask))
        return out

    return Split(split.layout, root, split.category, split.defect_type, move(split.reference),
                 move(split.held_out), move(split.skipped_empty), move(split.multi_type))


def _generated_samples(generated: Layout, category: str, defect_type: str) -> list[DefectSample]:
    root = generated.root
    try:
        samples = generated.defect_samples(category, defect_type)
    except DefectFillError:
        samples = []
    if not samples:
        raise DefectFillError(
            f"{root}: no generated images of {category}/{defect_type} (expected "
            f"{root / category / 'test' / defect_type}/*.png). Generate them first, or pick another --defect-type."
        )
    return samples


def _load_images(paths: list[Path], notes: list[str], what: str) -> list[Image.Image]:
    """RGB images; a note says when other modes were converted (load_rgb converts any mode)."""
    modes = set()
    images = []
    for p in paths:
        images.append(load_rgb(p))  # first, for its clear error on unreadable files
        with Image.open(p) as im:
            modes.add(im.mode)
    other = sorted(modes - {"RGB"})
    if other:
        notes.append(f"{what}: converted images of mode {', '.join(other)} to RGB")
    return images


def _lpips_stack(images: list[Image.Image], size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(im, size) for im in images])


def _pairs(samples: list[DefectSample]) -> list[tuple[Path, Path | None]]:
    return [(s.image, s.mask) for s in samples]


def evaluate(
    config: EvaluateConfig,
    *,
    feature_extractor: nn.Module | None = None,
    distance: Distance | None = None,
    classifier_factory: Callable[[int, bool], nn.Module] | None = None,
    localiser_factory: Callable[[bool], nn.Module] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Compute every asked metric, save metrics.json as results come, write the report; return the metrics.

    The networks are injectable (tests, offline demos); by default the standard ones are loaded.
    `note` is shown at the top of the report (the demo's: its networks are untrained).
    """
    config.validate()
    settings = config.downstream_settings()
    run, data, category, defect_type = config.run, config.data, config.category, config.defect_type
    downstream, lpips_size = config.downstream, config.lpips_size
    compute_kid, compute_ic_lpips = config.kid, config.ic_lpips
    output = Path(config.output).expanduser()
    generated = Path(config.generated).expanduser()
    if not generated.is_dir():
        raise DefectFillError(f"{generated}: generated folder not found.")
    gen_layout = open_layout(generated, "mvtec")

    # ---- what is compared
    run_config: TrainConfig | None = None
    if run is not None:
        run_config, run_split = _read_run(Path(run), defect_type)
        if data is not None:  # the dataset moved since training: the split's paths are relative to its root
            run_split = _rebase(run_split, Path(data))
        elif not run_split.data_root.is_dir():
            raise DefectFillError(
                f"{run_split.data_root}: the run's dataset folder is gone (named in {run_split_path(run)}). "
                "Pass its new place with --data."
            )
        category = run_split.category
        splits = [run_split]
        real_layout = open_layout(run_split.data_root, run_split.layout)
    else:
        if data is None or category is None:
            raise DefectFillError("Name what to compare with: --run RUN, or --data ROOT --category CATEGORY.")
        real_layout = open_layout(data, config.layout)
        real_layout.check_category(category)
        types = [defect_type] if defect_type else real_layout.defect_types(category)
        if not types:
            raise DefectFillError(f"{real_layout.root / category}: no defect types found.")
        splits = [make_split(real_layout, category, t) for t in types]

    metrics: dict[str, Any] = {
        "settings": {
            "generated": str(generated.resolve()),
            "run": str(Path(run).resolve()) if run is not None else None,
            "data": str(real_layout.root.resolve()),
            "category": category,
            "defect_types": [s.defect_type for s in splits],
            "kid": compute_kid, "kid_subset_size": config.kid_subset_size, "kid_subsets": config.kid_subsets,
            "kid_features": "inception-v3-compat (torch-fidelity)" if feature_extractor is None else "custom",
            "ic_lpips": compute_ic_lpips, "lpips_size": lpips_size,
            "lpips_network": "lpips AlexNet" if distance is None else "custom",
            "downstream": downstream,
            # the downstream models' settings only where they ran
            **({f"downstream_{k}": v for k, v in settings.to_json().items()} if downstream != "none" else {}),
            "run_resolution": run_config.resolution if run_config is not None else None,
        },
        "image_metrics": [],
        "downstream": {},
    }
    claim_folder(output, "evaluate")  # an empty or new folder, or one this command wrote

    def measure() -> dict[str, Any]:
        nonlocal distance
        pictures: dict[str, Image.Image] = {}

        def save() -> None:  # results are written as they come, so a crash keeps what was computed
            write_json(output / METRICS_NAME, metrics)

        # ---- KID and IC-LPIPS per defect type
        if compute_kid or compute_ic_lpips:
            for split in splits:
                gen_samples = _generated_samples(gen_layout, split.category, split.defect_type)
                if not split.held_out:
                    raise DefectFillError(
                        f"{split.data_root}: no held-out real images of {split.category}/{split.defect_type} "
                        f"(all {len(split.reference)} are reference images). KID needs real images the generator "
                        "did not see; add more defect images of this type."
                    )
                notes: list[str] = []
                real_images = _load_images([s.image for s in split.held_out], notes, "real held-out")
                gen_images = _load_images([s.image for s in gen_samples], notes, "generated")
                item: dict[str, Any] = {
                    "category": split.category, "defect_type": split.defect_type,
                    "n_real_held_out": len(real_images), "n_generated": len(gen_images),
                    "n_references": len(split.reference), "notes": notes,
                }
                if compute_kid:
                    item["kid"] = kid_images(
                        real_images, gen_images, feature_extractor=feature_extractor, subset_size=config.kid_subset_size,
                        subsets=config.kid_subsets, seed=settings.seed, device=_device(settings.device),
                        inception_weights=config.inception_weights,
                    )
                if compute_ic_lpips:
                    refs = _load_images([s.image for s in split.reference], notes, "reference")
                    sizes = {im.size for im in gen_images + refs}
                    if sizes != {(lpips_size, lpips_size)}:
                        notes.append(f"IC-LPIPS: images resized to {lpips_size}x{lpips_size}")
                    if distance is None:
                        from defectfill.model.lpips import load_lpips

                        distance = lpips_distance_fn(load_lpips(config.lpips_weights, device=_device(settings.device)),
                                                     _device(settings.device))
                    item["ic_lpips"] = ic_lpips_details(
                        _lpips_stack(gen_images, lpips_size), _lpips_stack(refs, lpips_size), distance)
                metrics["image_metrics"].append(item)
                pictures[sample_grid_name(split.category, split.defect_type)] = sample_grid(
                    _pairs(split.held_out), _pairs(gen_samples), n=config.grid_samples,
                    real_mask_rule=split.mask_rule)
                save()

        # ---- downstream inspection models on every defect type of the category
        if downstream != "none":
            all_types = real_layout.defect_types(category)
            all_splits = {s.defect_type: s for s in splits}
            for t in all_types:
                if t not in all_splits:
                    all_splits[t] = make_split(real_layout, category, t)
            missing = [t for t in all_types if not gen_layout.root.joinpath(category, "test", t).is_dir()
                       or not gen_layout.defect_samples(category, t)]
            if missing:
                raise DefectFillError(
                    f"{generated}: no generated images of {category} defect type(s) {', '.join(missing)}; the "
                    "downstream models are trained on every type of the category. Generate them first."
                )
            generated_by_type = {t: gen_layout.defect_samples(category, t) for t in all_types}
            no_held_out = [t for t in all_types if not all_splits[t].held_out]
            if no_held_out:
                raise DefectFillError(
                    f"{real_layout.root}: no held-out real images of {category} type(s) {', '.join(no_held_out)} "
                    "to test the downstream models on."
                )
            settings.device = _device(settings.device)
            settings.mask_rule = real_layout.mask_rule  # VisA's instance-id masks are read as non-zero

            if downstream in ("classify", "both"):
                train = [(s.image, i) for i, t in enumerate(all_types) for s in generated_by_type[t]]
                test = [(s.image, i) for i, t in enumerate(all_types) for s in all_splits[t].held_out]

                def on_classify(progress: dict[str, Any]) -> None:
                    metrics["downstream"]["classify"] = progress
                    save()

                result = train_classifier(train, test, all_types, settings, classifier_factory, on_classify)
                metrics["downstream"]["classify"] = result
                pictures[f"confusion_{category}"] = confusion_picture(result["confusion_matrix"], all_types)
                save()

            if downstream in ("localize", "both"):
                unmasked = [s.image for t in all_types for s in generated_by_type[t] if s.mask is None]
                if unmasked:  # without its mask a generated defect image would be learnt as a good one
                    raise DefectFillError(
                        f"{unmasked[0]}: generated image has no mask (expected <stem>_mask.png in the ground_truth "
                        f"folder of its type; {len(unmasked)} such image(s)). The localiser needs every mask."
                    )
                train = [(s.image, s.mask) for t in all_types for s in generated_by_type[t]]
                train += [(p, None) for p in real_layout.good_images(category)]
                test = [(s.image, s.mask) for t in all_types for s in all_splits[t].held_out]
                test += [(p, None) for p in real_layout.good_test_images(category)]

                def on_localize(progress: dict[str, Any]) -> None:
                    metrics["downstream"]["localize"] = progress
                    save()

                metrics["downstream"]["localize"] = train_localiser(train, test, settings, localiser_factory, on_localize)
                save()

        write_report(output, metrics, pictures, note=note)
        return metrics

    with folder_lock(output, "evaluate"):  # one writer at a time
        return measure()


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _summary(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for item in metrics["image_metrics"]:
        head = f"{item['category']}/{item['defect_type']}"
        k = item.get("kid")
        if k is not None:
            lines.append(f"{head}: KID " + (
                f"{k['mean_x1e3']:.2f} ± {k['std_x1e3']:.2f} (x10^3, subset size {k['subset_size']})"
                if k["available"] else f"unavailable: {k['reason']}"))
        ic = item.get("ic_lpips")
        if ic is not None:
            lines.append(f"{head}: IC-LPIPS " + (f"{ic['value']:.4f}" if ic["available"] else f"unavailable: {ic['reason']}"))
    cls = metrics["downstream"].get("classify")
    if cls:
        lines.append(f"classify: accuracy {cls['accuracy']:.4f}")
    loc = metrics["downstream"].get("localize")
    if loc:
        for level in ("image", "pixel"):
            s = loc[level]
            lines.append(f"localize {level}: AUROC {_num(s['auroc'])}, AP {_num(s['ap'])}, F1-max {_num(s['f1_max'])}")
        lines.append(f"localize PRO (FPR <= 0.3): {_num(loc['pro'])}")
    return lines


def evaluate_command(args: argparse.Namespace) -> int:
    """`defectfill evaluate`: evaluate with the standard networks and print a summary. Returns the exit status."""
    config = EvaluateConfig.from_args(args)
    metrics = evaluate(config)
    for line in _summary(metrics):
        print(line)
    print(f"report: {Path(config.output) / REPORT_HTML} (and {REPORT_MD}, {METRICS_NAME})")
    return 0
