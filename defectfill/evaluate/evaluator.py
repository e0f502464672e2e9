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
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from defectfill.config.stages import DownstreamSettings, EvaluateConfig, TrainConfig
from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError
from defectfill.core.folders import claim_folder, folder_lock
from defectfill.data import open_layout
from defectfill.data.images import image_mode, image_to_tensor, load_rgb
from defectfill.data.layouts import DefectSample, Layout
from defectfill.data.split import Split, make_split
from defectfill.evaluate.metrics.downstream import train_classifier, train_localiser
from defectfill.evaluate.metrics.ic_lpips import Distance, ic_lpips_details, lpips_distance_fn
from defectfill.evaluate.metrics.kid import kid_images
from defectfill.model.device import resolve_device
from defectfill.outputs.generated import read_manifest, selection_network
from defectfill.outputs.report import (
    METRICS_NAME,
    REPORT_HTML,
    REPORT_MD,
    area_picture,
    confusion_picture,
    lfs_picture,
    loss_picture,
    mask_area,
    sample_grid,
    sample_grid_name,
    token_check_summary,
    write_report,
)
from defectfill.outputs.run_folder import read_metrics, read_run_config, read_run_split, run_split_path

log = logging.getLogger(__name__)


def _read_run(run: Path, defect_type: str | None = None) -> tuple[TrainConfig | None, Split]:
    """The run's settings (None for a run folder without config.json) and its split (of a model trained on several
    defect types: the split of `defect_type`)."""
    if not run.is_dir():
        raise DefectFillError(f"{run}: run folder not found.")
    config = read_run_config(run, strict=False)
    return config, read_run_split(run, defect_type)


def _rebase(split: Split, root: Path) -> Split:
    """The split with every path moved from its recorded dataset root to `root`."""
    moved = [[_moved(s, split.data_root, root) for s in samples]
             for samples in (split.reference, split.held_out, split.skipped_empty, split.multi_type)]
    return Split(split.layout, root, split.category, split.defect_type, *moved)


def _moved(sample: DefectSample, old_root: Path, root: Path) -> DefectSample:
    try:
        image = root / sample.image.relative_to(old_root)
        mask = root / sample.mask.relative_to(old_root) if sample.mask is not None else None
    except ValueError:
        raise DefectFillError(
            f"{sample.image}: outside the split's dataset root {old_root}; cannot move it to {root}."
        ) from None
    return dataclasses.replace(sample, image=image, mask=mask)


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
        modes.add(image_mode(p))
    other = sorted(modes - {"RGB"})
    if other:
        notes.append(f"{what}: converted images of mode {', '.join(other)} to RGB")
    return images


def _lpips_stack(images: list[Image.Image], size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(im, size) for im in images])


def _pairs(samples: list[DefectSample]) -> list[tuple[Path, Path | None]]:
    return [(s.image, s.mask) for s in samples]


@dataclass
class Evaluation:
    """What one evaluation compares and what it has measured so far (`metrics`, `pictures`)."""

    config: EvaluateConfig
    settings: DownstreamSettings  # the downstream models' (its seed and device also serve KID)
    output: Path
    generated: Path
    gen_layout: Layout
    real_layout: Layout
    category: str
    splits: list[Split]  # one per evaluated defect type
    run_config: TrainConfig | None
    feature_extractor: nn.Module | None  # KID's; None: torch-fidelity's Inception
    distance: Distance | None  # IC-LPIPS's; None: LPIPS AlexNet, loaded on first use
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    pictures: dict[str, Image.Image] = dataclasses.field(default_factory=dict)

    def save(self) -> None:
        """metrics.json as it stands: results are written as they come, so a crash keeps what was computed."""
        write_json(self.output / METRICS_NAME, self.metrics)

    def record_downstream(self, model: str, progress: dict[str, Any]) -> None:
        """A downstream model's result so far (called after each of its epochs), saved at once."""
        self.metrics["downstream"][model] = progress
        self.save()


def evaluate(
    config: EvaluateConfig,
    *,
    feature_extractor: nn.Module | None = None,
    distance: Distance | None = None,
    classifier_factory: Callable[[int, bool], nn.Module] | None = None,
    localiser_factory: Callable[[bool], nn.Module] | None = None,
    note: str | None = None,
    token_probe: Callable[[Path, EvaluateConfig], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Compute every asked metric, save metrics.json as results come, write the report; return the metrics.

    The networks are injectable (tests, offline demos); by default the standard ones are loaded.
    `note` is shown at the top of the report (the demo's: its networks are untrained).
    `token_probe(run, config)`: with `--run` and `token_check`, the token self-check's record, kept as
    metrics.json's `token_check` (it paints, which this stage does not: `run.token_check` passes it).

    1. check the settings and open the generated folder;
    2. find what is compared: the run's split, or each type's split of the dataset;
    3. start the metrics with the settings that decide them;
    4. in the output folder, one writer at a time: KID and IC-LPIPS per type, the downstream models, the report.
    """
    config.validate()
    generated, gen_layout = _open_generated(config)
    run_config, real_layout, category, splits = _compared_splits(config)
    evaluation = Evaluation(config, config.downstream_settings(), Path(config.output).expanduser(), generated,
                            gen_layout, real_layout, category, splits, run_config, feature_extractor, distance)
    evaluation.metrics = _initial_metrics(evaluation)
    claim_folder(evaluation.output, "evaluate")  # an empty or new folder, or one this command wrote
    with folder_lock(evaluation.output, "evaluate"):
        if config.kid or config.ic_lpips:
            for split in splits:
                _measure_images(evaluation, split)
        if config.downstream != "none":
            _measure_downstream(evaluation, classifier_factory, localiser_factory)
        if token_probe is not None and config.run is not None and config.token_check:
            evaluation.metrics["token_check"] = token_probe(Path(config.run), config)
            evaluation.save()
        write_report(evaluation.output, evaluation.metrics, evaluation.pictures, note=note)
    return evaluation.metrics


def _open_generated(config: EvaluateConfig) -> tuple[Path, Layout]:
    generated = Path(config.generated).expanduser()
    if not generated.is_dir():
        raise DefectFillError(f"{generated}: generated folder not found.")
    return generated, open_layout(generated, "mvtec")


def _compared_splits(config: EvaluateConfig) -> tuple[TrainConfig | None, Layout, str, list[Split]]:
    """(the run's settings or None, the real dataset, the category, the splits of the evaluated types)."""
    run, data, category, defect_type = config.run, config.data, config.category, config.defect_type
    if run is not None:
        run_config, run_split = _read_run(Path(run), defect_type)
        if data is not None:  # the dataset moved since training: the split's paths are relative to its root
            run_split = _rebase(run_split, Path(data))
        elif not run_split.data_root.is_dir():
            raise DefectFillError(
                f"{run_split.data_root}: the run's dataset folder is gone (named in {run_split_path(run)}). "
                "Pass its new place with --data."
            )
        return run_config, open_layout(run_split.data_root, run_split.layout), run_split.category, [run_split]
    if data is None or category is None:
        raise DefectFillError("Name what to compare with: --run RUN, or --data ROOT --category CATEGORY.")
    real_layout = open_layout(data, config.layout)
    real_layout.check_category(category)
    types = [defect_type] if defect_type else real_layout.defect_types(category)
    if not types:
        raise DefectFillError(f"{real_layout.root / category}: no defect types found.")
    return None, real_layout, category, [make_split(real_layout, category, t) for t in types]


def _initial_metrics(evaluation: Evaluation) -> dict[str, Any]:
    """The metrics record before anything is measured: the settings that decide its numbers."""
    config, settings, run_config = evaluation.config, evaluation.settings, evaluation.run_config
    return {
        "settings": {
            "generated": str(evaluation.generated.resolve()),
            "run": str(Path(config.run).resolve()) if config.run is not None else None,
            "data": str(evaluation.real_layout.root.resolve()),
            "category": evaluation.category,
            "defect_types": [s.defect_type for s in evaluation.splits],
            "kid": config.kid, "kid_subset_size": config.kid_subset_size, "kid_subsets": config.kid_subsets,
            "kid_features": "inception-v3-compat (torch-fidelity)" if evaluation.feature_extractor is None
            else "custom",
            "ic_lpips": config.ic_lpips, "lpips_size": config.lpips_size,
            "lpips_network": "lpips AlexNet" if evaluation.distance is None else "custom",
            "downstream": config.downstream,
            # the downstream models' settings only where they ran
            **({f"downstream_{k}": v for k, v in settings.to_json().items()} if config.downstream != "none" else {}),
            "run_resolution": run_config.resolution if run_config is not None else None,
            "selection_lpips": selection_network(evaluation.generated),
        },
        "image_metrics": [],
        "downstream": {},
    }


def _measure_images(evaluation: Evaluation, split: Split) -> None:
    """KID and IC-LPIPS of one defect type, and its sample grid."""
    config, settings = evaluation.config, evaluation.settings
    gen_samples = _generated_samples(evaluation.gen_layout, split.category, split.defect_type)
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
    if config.kid:
        item["kid"] = kid_images(
            real_images, gen_images, feature_extractor=evaluation.feature_extractor,
            subset_size=config.kid_subset_size, subsets=config.kid_subsets, seed=settings.seed,
            device=resolve_device(settings.device), inception_weights=config.inception_weights,
        )
    if config.ic_lpips:
        lpips_size = config.lpips_size
        refs = _load_images([s.image for s in split.reference], notes, "reference")
        sizes = {im.size for im in gen_images + refs}
        if sizes != {(lpips_size, lpips_size)}:
            notes.append(f"IC-LPIPS: images resized to {lpips_size}x{lpips_size}")
        if evaluation.distance is None:
            from defectfill.model.lpips import load_lpips

            device = resolve_device(settings.device)
            evaluation.distance = lpips_distance_fn(load_lpips(config.lpips_weights, device=device), device)
        item["ic_lpips"] = ic_lpips_details(
            _lpips_stack(gen_images, lpips_size), _lpips_stack(refs, lpips_size), evaluation.distance)
    evaluation.metrics["image_metrics"].append(item)
    evaluation.pictures[sample_grid_name(split.category, split.defect_type)] = sample_grid(
        _pairs(split.held_out), _pairs(gen_samples), n=config.grid_samples, real_mask_rule=split.mask_rule)
    _add_pictures(evaluation, split, gen_samples)
    evaluation.save()


def _add_pictures(evaluation: Evaluation, split: Split, gen_samples: list[DefectSample]) -> None:
    """The type's loss curve (with --run), LFS-score histogram and real-vs-generated defect areas, where there is
    something to draw."""
    name = f"{split.category}_{split.defect_type}"
    pictures: dict[str, Image.Image | None] = {}
    if evaluation.config.run is not None:
        pictures[f"losses_{name}"] = loss_picture(read_metrics(evaluation.config.run))
    folder = f"{split.category}/test/{split.defect_type}/"
    rows = [r for r in read_manifest(evaluation.generated) if str(r.get("image", "")).startswith(folder)]
    pictures[f"lfs_{name}"] = lfs_picture(rows)
    pictures[f"areas_{name}"] = area_picture(
        [mask_area(s.mask, split.mask_rule) for s in split.held_out if s.mask is not None],
        [mask_area(s.mask) for s in gen_samples if s.mask is not None])
    evaluation.pictures.update({k: v for k, v in pictures.items() if v is not None})


def _measure_downstream(evaluation: Evaluation, classifier_factory: Callable[[int, bool], nn.Module] | None,
                        localiser_factory: Callable[[bool], nn.Module] | None) -> None:
    """The downstream inspection models on every defect type of the category: trained on the generated images,
    tested on the real held-out ones."""
    real_layout, gen_layout, category = evaluation.real_layout, evaluation.gen_layout, evaluation.category
    settings, downstream = evaluation.settings, evaluation.config.downstream
    all_types = real_layout.defect_types(category)
    all_splits = {s.defect_type: s for s in evaluation.splits}
    for t in all_types:
        if t not in all_splits:
            all_splits[t] = make_split(real_layout, category, t)
    missing = [t for t in all_types if not gen_layout.root.joinpath(category, "test", t).is_dir()
               or not gen_layout.defect_samples(category, t)]
    if missing:
        raise DefectFillError(
            f"{evaluation.generated}: no generated images of {category} defect type(s) {', '.join(missing)}; the "
            "downstream models are trained on every type of the category. Generate them first."
        )
    generated_by_type = {t: gen_layout.defect_samples(category, t) for t in all_types}
    no_held_out = [t for t in all_types if not all_splits[t].held_out]
    if no_held_out:
        raise DefectFillError(
            f"{real_layout.root}: no held-out real images of {category} type(s) {', '.join(no_held_out)} "
            "to test the downstream models on."
        )
    settings.device = resolve_device(settings.device)
    settings.mask_rule = real_layout.mask_rule  # VisA's instance-id masks are read as non-zero

    # each model three times on the same seed and the same real test images: trained on the real references only
    # (the baseline a factory has), on real + synthetic, and on synthetic only; `comparison` sets them side by side
    comparison: dict[str, dict[str, float | None]] = {}
    if downstream in ("classify", "both"):
        real = [(s.image, i) for i, t in enumerate(all_types) for s in all_splits[t].reference]
        synthetic = [(s.image, i) for i, t in enumerate(all_types) for s in generated_by_type[t]]
        test = [(s.image, i) for i, t in enumerate(all_types) for s in all_splits[t].held_out]
        results = {}
        for name, train in training_sets(real, synthetic).items():
            key = "classify" if name == "synthetic" else f"classify_{name}"
            results[name] = train_classifier(train, test, all_types, settings, classifier_factory,
                                             functools.partial(evaluation.record_downstream, key))
            evaluation.metrics["downstream"][key] = results[name]
            evaluation.save()
        comparison["classify accuracy"] = compare({n: r["accuracy"] for n, r in results.items()})
        evaluation.pictures[f"confusion_{category}"] = confusion_picture(results["synthetic"]["confusion_matrix"],
                                                                         all_types)

    if downstream in ("localize", "both"):
        unmasked = [s.image for t in all_types for s in generated_by_type[t] if s.mask is None]
        if unmasked:  # without its mask a generated defect image would be learnt as a good one
            raise DefectFillError(
                f"{unmasked[0]}: generated image has no mask (expected <stem>_mask.png in the ground_truth "
                f"folder of its type; {len(unmasked)} such image(s)). The localiser needs every mask."
            )
        good = [(p, None) for p in real_layout.good_images(category)]
        real = [(s.image, s.mask) for t in all_types for s in all_splits[t].reference]
        synthetic = [(s.image, s.mask) for t in all_types for s in generated_by_type[t]]
        test = [(s.image, s.mask) for t in all_types for s in all_splits[t].held_out]
        test += [(p, None) for p in real_layout.good_test_images(category)]
        results = {}
        for name, train in training_sets(real, synthetic).items():
            key = "localize" if name == "synthetic" else f"localize_{name}"
            results[name] = train_localiser(train + good, test, settings, localiser_factory,
                                            functools.partial(evaluation.record_downstream, key))
            evaluation.metrics["downstream"][key] = results[name]
            evaluation.save()
        for level, score in (("image", "auroc"), ("pixel", "auroc"), ("pixel", "ap")):
            comparison[f"localize {level} {score.upper()}"] = compare(
                {n: r[level][score] for n, r in results.items()})
        comparison["localize PRO"] = compare({n: r["pro"] for n, r in results.items()})
    if comparison:
        evaluation.metrics["downstream_comparison"] = comparison
        evaluation.save()


TRAINING_SETS = ("real", "real+synthetic", "synthetic")


def training_sets(real: list, synthetic: list) -> dict[str, list]:
    """The three training sets of the downstream comparison: the real references only, both, the generated only."""
    return {"real": list(real), "real+synthetic": list(real) + list(synthetic), "synthetic": list(synthetic)}


def compare(values: dict[str, float | None]) -> dict[str, float | None]:
    """One metric by training set, and the gains over the real-only baseline (None where either is missing)."""
    out = {name: values.get(name) for name in TRAINING_SETS}
    for name in ("real+synthetic", "synthetic"):
        a, b = values.get(name), values.get("real")
        out[f"gain {name} over real"] = None if a is None or b is None else a - b
    return out


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


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
    for metric, values in metrics.get("downstream_comparison", {}).items():
        lines.append(f"{metric}: real {_num(values['real'])}, real+synthetic {_num(values['real+synthetic'])}, "
                     f"synthetic {_num(values['synthetic'])}; gain of real+synthetic over real "
                     f"{_signed(values['gain real+synthetic over real'])}")
    cls = metrics["downstream"].get("classify")
    if cls:
        lines.append(f"classify (synthetic): accuracy {cls['accuracy']:.4f}")
    loc = metrics["downstream"].get("localize")
    if loc:
        for level in ("image", "pixel"):
            s = loc[level]
            lines.append(f"localize {level}: AUROC {_num(s['auroc'])}, AP {_num(s['ap'])}, F1-max {_num(s['f1_max'])}")
        lines.append(f"localize PRO (FPR <= 0.3): {_num(loc['pro'])}")
    return lines


def evaluate_command(args: argparse.Namespace,
                     token_probe: Callable[[Path, EvaluateConfig], dict[str, Any]] | None = None) -> int:
    """`defectfill evaluate`: evaluate with the standard networks and print a summary. Returns the exit status."""
    config = EvaluateConfig.from_args(args)
    metrics = evaluate(config, token_probe=token_probe)
    for line in _summary(metrics):
        print(line)
    if metrics.get("token_check"):
        print(token_check_summary(metrics["token_check"]))
    print(f"report: {Path(config.output) / REPORT_HTML} (and {REPORT_MD}, {METRICS_NAME})")
    return 0
