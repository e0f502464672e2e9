"""The token self-check: does a trained run's token carry the defect, or does its LoRA paint it whatever the prompt?

A short probe after training (`defectfill train`, `run`) and in `defectfill evaluate --run`: on a few masks (the
run's held-out defects, else its references) painted on defect-free images (else on the defect's own image),
it paints with the run's prompt and the same prompt without the token, and the object prompt with and without
it, each at the run's guidance and at 1 and 3, and measures how far each painted set is from the real defects
(`mask_region_features` distance, 0..~1.7). The distance of the untouched surface under the masks is the
yardstick of "nothing painted". It lives in `run/` because it drives generation (the painting) and evaluation
(the features), which the stages themselves may not import.

Verdict (the run's prompt at the run's guidance, against the same prompt without the token):
    with the token above LEARNED_RATIO x the untouched surface's distance     -> "nothing was learned"
    else with the token at most TOKEN_RATIO x without it                      -> "the token carries the defect"
    else                                                                      -> "the LoRA paints the defect whatever the prompt"
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from defectfill.core.atomic import write_json
from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, load_rgb, open_layout
from defectfill.data.split import DefectSample
from defectfill.evaluate.metrics.mask_stats import feature_distance, mask_region_features
from defectfill.model.names import LORA_WEIGHTS_NAME
from defectfill.outputs.report import token_check_summary
from defectfill.outputs.run_folder import read_run_split, read_token_check, read_trained_run, token_check_file

log = logging.getLogger(__name__)

LEARNED_RATIO = 0.8  # painting with the token must come this much closer to the defects than the bare surface
TOKEN_RATIO = 0.8  # ... and this much closer than the same prompt without the token, for the token to carry it
PROBE_GUIDANCES = (1.0, 3.0)  # besides the run's own
TOKEN_CARRIES = "the token carries the defect"
LORA_PAINTS = "the LoRA paints the defect whatever the prompt"
NOTHING_LEARNED = "nothing was learned"


class Painter(Protocol):
    """What the probe needs of a `DefectGenerator`."""

    prompt: str
    token: str
    guidance: float

    def __call__(self, image: Image.Image, mask: np.ndarray, seed: int = 0) -> Any: ...


def without_token(prompt: str, token: str) -> str:
    """`prompt` with every occurrence of `token` taken out (spaces tidied): what the probe compares with."""
    return " ".join(prompt.replace(token, " ").split())


def token_verdict(with_token: float, without: float, untouched: float) -> str:
    """The plain-words verdict of three distances to the real defects (lower is closer): the run's prompt, the
    same prompt without the token, and the untouched surface under the masks."""
    if not with_token <= LEARNED_RATIO * untouched:
        return NOTHING_LEARNED
    if with_token <= TOKEN_RATIO * without and with_token < without:  # (both 0: painted whatever the prompt)
        return TOKEN_CARRIES
    return LORA_PAINTS


@dataclasses.dataclass
class _Target:
    source: Image.Image  # the defect-free image painted on
    mask: np.ndarray  # (H, W) bool, at the source's size
    real: np.ndarray  # the real defect's region features


def _targets(run_dir: Path, count: int, defect_type: str | None) -> tuple[list[_Target], str]:
    """Up to `count` (defect-free image, mask, real defect features) of `defect_type` (per-object runs; None
    otherwise), and where the masks came from."""
    config = read_trained_run(run_dir)
    split = read_run_split(run_dir, defect_type)
    samples: list[DefectSample] = split.held_out[:count]
    origin = "held-out"
    if not samples:
        samples, origin = split.reference[:count], "references"
    try:
        goods = open_layout(split.data_root, split.layout, config.good_images).good_images(split.category)
    except DefectFillError:
        goods = []
    out = []
    for i, sample in enumerate(samples):
        defect = load_rgb(sample.image)
        mask = load_mask(sample.mask, split.mask_rule)
        if mask.shape != (defect.height, defect.width) or not mask.any():
            continue
        real = mask_region_features(np.asarray(defect), mask)
        source = load_rgb(goods[i % len(goods)]) if goods else defect
        if source.size != defect.size:
            source = source.resize(defect.size, Image.BICUBIC)
        out.append(_Target(source, mask, real))
    if not out:
        raise DefectFillError(f"{run_dir}: the token check found no defect mask in the run's split; "
                              "pass --no-token-check.")
    return out, origin + (" masks on defect-free images" if goods else " masks on the defect images themselves")


def _painted_distance(painter: Painter, targets: list[_Target], real: np.ndarray) -> float:
    features = [mask_region_features(np.asarray(painter(t.source, t.mask, seed=i).image), t.mask)
                for i, t in enumerate(targets)]
    return feature_distance(np.stack(features), real)


def probe(painter: Painter, targets: list[_Target], object_prompt: str | None = None) -> dict[str, Any]:
    """Paint every probe prompt at every probe guidance; -> the record `check_token` writes (without `masks`)."""
    real = np.stack([t.real for t in targets])
    untouched = feature_distance(np.stack([mask_region_features(np.asarray(t.source), t.mask) for t in targets]),
                                 real)
    prompt, guidance = painter.prompt, float(painter.guidance)
    prompts = {"run prompt": prompt, "run prompt without the token": without_token(prompt, painter.token)}
    if object_prompt and object_prompt != prompt:
        prompts["object prompt"] = object_prompt
        prompts["object prompt without the token"] = without_token(object_prompt, painter.token)
    guidances = [guidance, *(g for g in PROBE_GUIDANCES if g != guidance)]
    rows = []
    try:
        for name, text in prompts.items():
            for g in guidances:
                painter.prompt, painter.guidance = text, g
                rows.append({"prompt": name, "text": text, "guidance": g,
                             "distance": round(_painted_distance(painter, targets, real), 5)})
    finally:
        painter.prompt, painter.guidance = prompt, guidance
    at_run = {r["prompt"]: r["distance"] for r in rows if r["guidance"] == guidance}
    with_token, without = at_run["run prompt"], at_run["run prompt without the token"]
    return {
        "verdict": token_verdict(with_token, without, untouched),
        "with_token": with_token, "without_token": without, "untouched": round(untouched, 5),
        "guidance": guidance, "distances": rows,
        "rule": (f"{NOTHING_LEARNED!r} unless the run's prompt at its guidance comes to at most {LEARNED_RATIO} x "
                 f"the untouched surface's distance; then {TOKEN_CARRIES!r} when it is at most {TOKEN_RATIO} x the "
                 f"same prompt without the token, else {LORA_PAINTS!r}"),
        "distance": "Euclidean distance of the mean mask-region features (mean RGB, luminance std, edge energy) "
                    "of the painted regions to the real defects'; lower is closer",
    }


def check_token(run_dir: str | Path, masks: int = 4, steps: int = 10, device: str = "cpu",
                mixed_precision: str = "no", painter: Painter | None = None,
                defect_type: str | None = None) -> dict[str, Any]:
    """Run the token self-check on a trained run and write `<run>/token_check.json` (atomic); return the record.
    A per-object run is checked one `defect_type` at a time (`token_check-<type>.json`).

    `masks` probe masks, `steps` sampling steps each, one candidate (no Low-Fidelity Selection: it would pick
    the least normal-looking whatever the prompt). `painter`: a DefectGenerator-like object (tests); default one
    from the run."""
    run_dir = Path(run_dir).expanduser()
    config = read_trained_run(run_dir)
    if config.per_object and defect_type is None:
        raise DefectFillError(f"{run_dir}: a run with one model per object is checked one defect type at a time; "
                              f"name one of {', '.join(config.defect_types())}.")
    defect_type = defect_type if config.per_object else None
    targets, origin = _targets(run_dir, masks, defect_type)
    if painter is None:
        from defectfill.generate.generator import DefectGenerator

        painter = DefectGenerator.from_run(run_dir, device=device, mixed_precision=mixed_precision, candidates=1,
                                           steps=steps, defect_type=defect_type)
    token = painter.token
    record = probe(painter, targets, config.prompt(config.object_prompt, token))
    record.update(masks=len(targets), requested_masks=masks, origin=origin, steps=steps)
    if defect_type is not None:
        record["defect_type"] = defect_type
    write_json(run_dir / token_check_file(defect_type), record)
    log.info("token self-check: %s (distance to the real defects %.4f with the token, %.4f without, %.4f untouched)",
             record["verdict"], record["with_token"], record["without_token"], record["untouched"])
    return record


def evaluation_probe(run: Path, config: Any) -> dict[str, Any]:
    """`evaluate --run`'s token self-check (`EvaluateConfig`'s token_check_masks and _steps): the run's
    token_check.json when it is newer than the run's LoRA and was made with as many masks and steps, else a
    new probe (written there)."""
    from defectfill.model.device import resolve_device

    defect_type = config.defect_type if read_trained_run(run).per_object else None
    record = read_token_check(run, defect_type)
    lora = Path(run) / LORA_WEIGHTS_NAME
    if (record and lora.is_file()
            and (Path(run) / token_check_file(defect_type)).stat().st_mtime >= lora.stat().st_mtime
            and (record.get("steps"), record.get("requested_masks"))
            == (config.token_check_steps, config.token_check_masks)):
        return record
    return check_token(run, config.token_check_masks, config.token_check_steps,
                       device=resolve_device(config.device), defect_type=defect_type)


def after_training(run_dir: str | Path, config: Any) -> list[dict[str, Any]]:
    """The token self-check after `defectfill train` and `run`'s training (`TrainConfig.token_check`), of each
    defect type in a per-object run; a probe that cannot run (no masks) is said in the log, never fails the
    finished training. -> the records made."""
    if not config.token_check:
        return []
    from defectfill.model.device import resolve_device

    records = []
    for defect_type in (config.defect_types() if config.per_object else [None]):
        try:
            record = check_token(run_dir, config.token_check_masks, config.token_check_steps,
                                 device=resolve_device(), defect_type=defect_type)
        except DefectFillError as exc:
            log.warning("token self-check skipped: %s", exc)
            continue
        print(token_check_summary(record))
        records.append(record)
    return records


def evaluate_command(args: Any) -> int:
    """`defectfill evaluate`, with the token self-check of `--run` (`evaluate` takes it as `token_probe`)."""
    from defectfill.evaluate.evaluator import evaluate_command as run_evaluate

    return run_evaluate(args, token_probe=evaluation_probe)
