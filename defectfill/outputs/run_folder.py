"""The run folder: what `defectfill train` writes and generate, evaluate and run read.

    <run>/
      config.json                          the TrainConfig (every setting), defectfill_version, base_model
      split.json                           which defect images trained and which are held out
      pytorch_lora_weights.safetensors     the LoRA, as diffusers' load_lora_weights reads it
      learned_embeds.safetensors           a new token's embedding row (with --new-token)
      learned_embeds-<type>.safetensors    one model per object: each type's token row ({"<type>": row})
      checkpoint-N/                        resumable state (see checkpoints.py)
      metrics.jsonl                        the curves: one JSON object per logged step (`append_metrics`)
      token_check.json                     the token self-check after training (`defectfill.run.token_check`)
      token_check-<type>.json              one model per object: each type's token self-check
      logs/, train.log                     TensorBoard scalars, logs/samples/step-NNNNNN.png, the text log
      README.md                            the model card: base, token, prompts, steps, losses, how to load it

This module is the one place that knows these names and reads config.json back
into a `TrainConfig`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import defectfill
from defectfill.config.stages import TrainConfig
from defectfill.core.atomic import write_json, write_text
from defectfill.core.errors import DefectFillError
from defectfill.data.layouts import object_name
from defectfill.data.split import ObjectSplit, Split, read_split
from defectfill.model.names import LORA_WEIGHTS_NAME, TOKEN_WEIGHTS_NAME

CONFIG_NAME = "config.json"
SPLIT_NAME = "split.json"
LOGS_DIR = "logs"  # TensorBoard scalars, and the logged sample inpaintings in logs/samples/
TRAIN_LOG = "train.log"  # the text log, for people
METRICS_NAME = "metrics.jsonl"  # the logged curves, for programs (`append_metrics`, `read_metrics`)
MODEL_CARD = "README.md"  # what the run is and how to load it, for people and the Hugging Face Hub
TOKEN_CHECK_NAME = "token_check.json"  # does the token carry the defect (`defectfill.run.token_check`)
RUN_FILES = {CONFIG_NAME, SPLIT_NAME, LORA_WEIGHTS_NAME, TOKEN_WEIGHTS_NAME, LOGS_DIR, TRAIN_LOG, METRICS_NAME,
             MODEL_CARD, TOKEN_CHECK_NAME}


def type_token_file(defect_type: str) -> str:
    """The file of one defect type's token in a per-object run, in the textual-inversion format diffusers'
    `load_textual_inversion(path, token="<type>")` reads (one token per file: it accepts no more)."""
    return f"learned_embeds-{defect_type}.safetensors"


def token_check_file(defect_type: str | None = None) -> str:
    """The token self-check's record: one per run, or one per defect type in a per-object run."""
    return TOKEN_CHECK_NAME if defect_type is None else f"token_check-{defect_type}.json"


def is_run_file(name: str) -> bool:
    """Whether a name in a folder is one `defectfill train` writes."""
    return (name in RUN_FILES or (name.startswith("learned_embeds-") and name.endswith(".safetensors"))
            or (name.startswith("token_check-") and name.endswith(".json")))


def write_run_config(run_dir: str | Path, config: TrainConfig) -> None:
    """config.json: every training setting, plus the package version, the base model and where the data is
    (`data_paths`: absolute, and relative to the run folder, so `resolve_data` finds it from any directory and
    after the dataset and the run moved together)."""
    extra = {"defectfill_version": defectfill.__version__, "base_model": config.model}
    if config.data:
        extra["data_paths"] = data_paths(config.data, run_dir)
    write_json(Path(run_dir) / CONFIG_NAME, {**config.to_dict(), **extra})


def data_paths(data: str | Path, folder: str | Path) -> dict[str, str]:
    """A dataset's path as an absolute path and relative to `folder` (the run folder)."""
    absolute = Path(data).expanduser().absolute()
    return {"absolute": str(absolute), "from_run": os.path.relpath(absolute, Path(folder).expanduser().absolute())}


def resolve_data(recorded: dict, run_dir: str | Path) -> str | None:
    """The data folder of a recorded run, wherever this process runs: relative to the run folder (the two moved
    together, or any working directory), else the absolute path (the run moved alone), else `data` as written
    (config.json files written before `data_paths`: relative to the directory train was started in)."""
    data = recorded.get("data")
    paths = recorded.get("data_paths")
    if isinstance(paths, dict):
        for candidate in (Path(run_dir).expanduser() / str(paths.get("from_run", "")) if paths.get("from_run") else None,
                          Path(str(paths["absolute"])) if paths.get("absolute") else None):
            if candidate is not None and candidate.is_dir():
                return str(candidate)
    return data


def write_run_files(run_dir: str | Path, config: TrainConfig, split: Split | ObjectSplit) -> None:
    """The settings and the split of a run, written when training starts."""
    write_run_config(run_dir, config)
    split.save(Path(run_dir) / SPLIT_NAME)


def read_recorded_config(run_dir: str | Path) -> dict | None:
    """config.json as recorded (a dict), None when there is none; a clear error when it is unreadable."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise DefectFillError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise DefectFillError(f"{path}: expected a mapping of settings.")
    return data


def read_run_config(run_dir: str | Path, strict: bool = True) -> TrainConfig | None:
    """The TrainConfig a run was trained with, type-checked; `model` is the recorded base model.

    `strict`: config.json and the settings generation needs must be there. Otherwise (evaluation, which
    reads older and partial run folders too) a folder without config.json gives None.
    """
    run_dir = Path(run_dir).expanduser()
    path = run_dir / CONFIG_NAME
    recorded = read_recorded_config(run_dir)
    if recorded is None:
        if not strict:
            return None
        raise DefectFillError(f"{run_dir}: no {CONFIG_NAME}; this is not a finished defectfill run folder.")
    missing = [k for k in ("category", "defect_type", "token", "resolution") if not recorded.get(k)]
    if not (recorded.get("base_model") or recorded.get("model")):
        missing.append("base_model")
    if missing and strict:
        raise DefectFillError(f"{path}: missing setting(s) {', '.join(missing)}; was it written by `defectfill train`?")
    values = {k: v for k, v in recorded.items() if k != "data_paths"}
    if recorded.get("data"):
        values["data"] = resolve_data(recorded, run_dir)
    if recorded.get("base_model") or recorded.get("model"):
        values["model"] = recorded.get("base_model") or recorded["model"]
    try:
        return TrainConfig.build(values, source=str(path), require=False, ignore_unknown=True)
    except DefectFillError as exc:
        if str(path) in str(exc):
            raise
        raise DefectFillError(f"{path}: {exc}") from None


def read_trained_run(run_dir: str | Path) -> TrainConfig:
    """`read_run_config` of a run whose training has finished: its weights must be there."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise DefectFillError(f"--run {run_dir}: folder not found. Pass the output folder of `defectfill train`.")
    config = read_run_config(run_dir)
    if not (run_dir / LORA_WEIGHTS_NAME).is_file():
        raise DefectFillError(
            f"{run_dir}: no {LORA_WEIGHTS_NAME}. Training has not finished; wait for it or pass a finished run "
            "(or a checkpoint folder holding the weights)."
        )
    if config.new_token and not (run_dir / TOKEN_WEIGHTS_NAME).is_file():
        raise DefectFillError(f"{run_dir}: the run trained the token {config.new_token!r} but "
                              f"{TOKEN_WEIGHTS_NAME} is missing.")
    if config.per_object:
        missing = [type_token_file(t) for t in config.defect_types() if not (run_dir / type_token_file(t)).is_file()]
        if missing:
            raise DefectFillError(f"{run_dir}: the run trained one token per defect type but {', '.join(missing)} "
                                  "is missing. Training has not finished; wait for it or resume it.")
    return config


def run_split_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SPLIT_NAME


def samples_dir(run_dir: str | Path) -> Path:
    """Where training saves its logged sample inpaintings (`sample_path`)."""
    return Path(run_dir) / LOGS_DIR / "samples"


def sample_path(run_dir: str | Path, step: int) -> Path:
    return samples_dir(run_dir) / f"step-{step:06d}.png"


def logged_samples(run_dir: str | Path) -> list[Path]:
    """The logged sample inpaintings, in step order."""
    return sorted(samples_dir(run_dir).glob("step-*.png"))


def append_metrics(run_dir: str | Path, row: dict[str, Any]) -> None:
    """One logged step's curves as a line of metrics.jsonl: `step`, the losses by name under `loss`, `lr` by
    parameter group, `grad_norm` (None on a skipped step), `skipped_steps`. Flushed, so a reader never misses a
    finished line; a resumed run appends after the steps it had logged."""
    with open(Path(run_dir) / METRICS_NAME, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows in file order ([] without one); a torn last line (a killed run) is skipped. A resumed
    run may log a step twice: both rows are returned, the reader keeps the later one."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_token_check(run_dir: str | Path, defect_type: str | None = None) -> dict[str, Any] | None:
    """The run's token self-check record (of `defect_type` in a per-object run), or None when it has none or
    it cannot be read."""
    try:
        record = json.loads((Path(run_dir) / token_check_file(defect_type)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "verdict" in record else None


def read_run_split(run_dir: str | Path, defect_type: str | None = None) -> Split:
    """The run's split; of a per-object run, the split of `defect_type` (refused, with the types named, without)."""
    return read_split(run_split_path(run_dir), defect_type)


def pick_defect_type(run_dir: str | Path, config: TrainConfig, asked: str | None, flag: str = "--defect-type") -> str:
    """The defect type to draw from a run: `asked` (any spelling the layout accepts: VisA names with spaces)
    when the run trained it, the run's one type by default; otherwise an error listing the run's types."""
    from defectfill.data.layouts import find_type

    types = list(config.type_tokens())
    if asked is None:
        if len(types) == 1:
            return types[0]
        raise DefectFillError(f"--run {run_dir}: one model for {config.category} with the defect types "
                              f"{', '.join(types)}; name the one to draw with {flag} (one of them).")
    match = find_type(asked, types)
    if match is not None:
        return match
    raise DefectFillError(f"{flag} {asked}: the run {run_dir} does not know this defect type; it trained "
                          f"{', '.join(types)}.")


def model_card(run_dir: str | Path, config: TrainConfig) -> str:
    """The run's README.md: what was trained on which base, with which token and prompts, for how many steps,
    its last logged losses, the newest logged sample, and how diffusers loads it."""
    run_dir = Path(run_dir)
    tokens = config.type_tokens()
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else None
    samples = sorted((run_dir / LOGS_DIR / "samples").glob("step-*.png"))
    types = ", ".join(tokens)
    lines = [
        "---", "library_name: diffusers", f"base_model: {config.model}",
        "tags: [defectfill, lora, stable-diffusion-inpainting, defect-generation]", "---", "",
        f"# DefectFill LoRA: {config.category} / {types}", "",
        f"A DefectFill LoRA (defectfill {defectfill.__version__}) that paints the {types} defect of "
        f"{config.category} into a masked region of a defect-free image.", "",
        "| | |", "| --- | --- |",
        f"| base model | `{config.model}` |",
        f"| token | {', '.join(f'`{t}` ({name})' for name, t in tokens.items())} |",
        f"| defect prompt | `{_prompt(config.defect_prompt, tokens, config)}` |",
        f"| object prompt (training) | `{_prompt(config.object_prompt, tokens, config)}` |",
        f"| steps | {last['step'] if last else 0} of {config.steps} (batch {config.batch_size}, "
        f"resolution {config.resolution}, LoRA rank {config.lora_rank}) |",
    ]
    if last and isinstance(last.get("loss"), dict):
        lines.append("| last logged losses | " + ", ".join(f"{k} {v:.4f}" for k, v in last["loss"].items()
                                                        if isinstance(v, (int, float))) + " |")
    lines += ["", "## Load it with diffusers", "", "```python",
              "from diffusers import StableDiffusionInpaintPipeline", "",
              f'pipe = StableDiffusionInpaintPipeline.from_pretrained("{config.model}")',
              f'pipe.load_lora_weights("{run_dir.name}")  # this folder: {LORA_WEIGHTS_NAME}']
    if config.per_object:
        files = [type_token_file(t) for t in tokens]
        lines.append(f"pipe.load_textual_inversion({[f'{run_dir.name}/{f}' for f in files]}, "
                     f"token={list(tokens.values())})")
    elif config.new_token:
        lines.append(f'pipe.load_textual_inversion("{run_dir.name}/{TOKEN_WEIGHTS_NAME}", token="{config.new_token}")')
    lines += [f'image = pipe(prompt="{_prompt(config.defect_prompt, tokens, config)}", image=part, '
              "mask_image=mask).images[0]", "```", "",
              "`defectfill generate --run <this folder>` does the same with Low-Fidelity Selection and writes an "
              "MVTec-layout dataset. Settings: config.json; the reference/held-out split: split.json.", ""]
    if samples:
        rel = samples[-1].relative_to(run_dir).as_posix()
        lines += ["## Sample", "", f"![sample at the last logged step (source / mask / sample)]({rel})", ""]
    return "\n".join(lines)


def _prompt(template: str, tokens: dict[str, str], config: TrainConfig) -> str:
    """A prompt template with the first type's token and the category's object name filled in, as text."""
    token = next(iter(tokens.values()))
    return template.replace("{token}", token).replace("{object}", object_name(config.category))


def write_model_card(run_dir: str | Path, config: TrainConfig) -> Path:
    """README.md of a finished run (`model_card`), written atomically."""
    path = Path(run_dir) / MODEL_CARD
    write_text(path, model_card(run_dir, config))
    return path
