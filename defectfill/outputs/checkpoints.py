"""Training checkpoints with no pickles: safetensors for tensors, JSON for the rest.

A `checkpoint-N/` folder holds:
    trainable.safetensors       every trainable tensor (LoRA, new token rows) by name
    optimizer.safetensors/.json the optimiser's per-parameter state and its param groups
    scheduler.json              the learning-rate scheduler's state
    rng_state.safetensors       torch CPU (and CUDA) generator states
    trainer_state.json          step, skipped steps, the settings the run was made with
    pytorch_lora_weights.safetensors  the LoRA at this step, loadable by diffusers
It is written to a hidden temporary folder and renamed into place, so a
killed run never leaves a half-written checkpoint that `--resume latest` would pick.
With --checkpoints-total-limit N the older ones are then deleted (`prune_checkpoints`),
each renamed to `.checkpoint-N.deleting` first.

The pieces are public for any checkpoint of this kind: `write_checkpoint_folder` (the temporary folder
renamed into place), `save_optimizer`/`load_optimizer` (or `optimizer_to_files`/`optimizer_from_files` for
the raw state), `save_rng_state`/`restore_rng_state`.

The base-model pretraining (`defectfill pretrain-base`) writes its stage checkpoints with them, in
`<output>/checkpoints/`, only the newest of each stage kept:
    stage{N}-{step}/
        weights.safetensors         the stage's networks' tensors, each prefixed by its network ("vae.", "unet.")
        optimizer.safetensors/.json the optimiser's state (absent in stage 1's last one, which ends the stage)
        state.json                  stage, step (and stage 1's measured latent scaling_factor at its end)
Every random draw of a pretraining step is derived from (seed, stage, step), so these hold no RNG state.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defectfill.core.atomic import replace_dir, writing_into
from defectfill.core.errors import DefectFillError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER = "scheduler.json"
RNG_STATE = "rng_state.safetensors"
TRAINER_STATE = "trainer_state.json"
# a pretraining stage checkpoint's (see the module docstring)
STAGE_WEIGHTS = "weights.safetensors"
STAGE_STATE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def stage_checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-{step}"


def latest_stage_checkpoint(folder: Path, stage: int) -> Path | None:
    """The newest complete `stage{stage}-{step}/` in `folder` (a pretraining's checkpoints/), or None."""
    found = []
    for p in folder.glob(f"stage{stage}-*"):
        if p.is_dir() and (p / STAGE_STATE).is_file() and p.name.split("-")[-1].isdigit():
            found.append((int(p.name.split("-")[-1]), p))
    return max(found)[1] if found else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    found = [p for p in found if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def _step(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint: step, skipped steps, and the settings it was made with."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise DefectFillError(f"{path}: trainer_state.json is damaged ({exc}); resume from another checkpoint.") from None
    if not isinstance(state, dict):
        raise DefectFillError(f"{path}: trainer_state.json is damaged; resume from another checkpoint.")
    # what is read back is checked: the step numbers as counts, the settings as a mapping
    for key in ("step", "skipped_steps"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DefectFillError(f"{path}: trainer_state.json is damaged ({key} is {value!r}, not a count); "
                                  "resume from another checkpoint.")
    if "step" not in state or not isinstance(state.get("config", {}), dict):
        raise DefectFillError(f"{path}: trainer_state.json is damaged (no step, or settings that are not a "
                              "mapping); resume from another checkpoint.")
    return state


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise DefectFillError(
                f"{run_dir}: --resume latest found no checkpoint-N folder to continue from. "
                "Start without --resume, or point --output at the run you want to continue."
            )
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / TRAINER_STATE).is_file():
        raise DefectFillError(f"{path}: not a checkpoint folder (no trainer_state.json). Use --resume latest or a checkpoint-N path.")
    return path


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state as (tensors for safetensors, the rest for JSON): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what `optimizer_to_files` gave into `optimizer`."""
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """optimizer.safetensors and optimizer.json in `folder` (a checkpoint's, or any other)."""
    tensors, meta = optimizer_to_files(optimizer)
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_META).write_text(json.dumps(meta))


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """What `save_optimizer` wrote into `folder`, restored into `optimizer`."""
    optimizer_from_files(optimizer, load_file(str(folder / OPTIMIZER_TENSORS)),
                         json.loads((folder / OPTIMIZER_META).read_text()))


def save_rng_state(folder: Path) -> None:
    """torch's CPU (and every CUDA) generator state, as rng_state.safetensors."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(folder / RNG_STATE))


def restore_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def write_checkpoint_folder(parent: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """`parent/name`, filled by `fill(folder)` in a hidden temporary folder and renamed into place, so a killed
    process never leaves a half-written checkpoint that a resume would pick."""
    final, tmp = parent / name, parent / f".{name}.tmp"
    # a disk that filled up (or a folder made read-only) mid-checkpoint: no half-written folder stays, the
    # earlier checkpoints are untouched, so the run resumes from the last one
    with writing_into(parent, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        fill(tmp)
        replace_dir(tmp, final)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoint-N folders of a run (diffusers'
    `checkpoints_total_limit`); returns the folders deleted.

    Called only once a new checkpoint is in place, so the newest is never touched. Each old folder is first
    renamed to a hidden name, then deleted: a job killed midway leaves a `.checkpoint-N.deleting` folder that
    `list_checkpoints` never offers to a resume (and the next prune removes), not a half-deleted checkpoint."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    for stale in run_dir.glob(".checkpoint-*.deleting"):
        shutil.rmtree(stale, ignore_errors=True)
    old = list_checkpoints(run_dir)[:-keep]
    for folder in old:
        doomed = folder.with_name(f".{folder.name}.deleting")
        with writing_into(run_dir):
            folder.rename(doomed)
            shutil.rmtree(doomed)
    return old


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    write_lora: Callable[[Path], None],
) -> Path:
    """checkpoint-`step`/ of a training run (see the module docstring); `write_lora` writes the LoRA files into it."""
    def fill(folder: Path) -> None:
        save_file(trainable, str(folder / TRAINABLE))
        save_optimizer(folder, optimizer)
        (folder / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
        save_rng_state(folder)
        write_lora(folder)
        (folder / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))

    return write_checkpoint_folder(run_dir, checkpoint_name(step), fill)


def load_checkpoint(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimiser, scheduler and RNG; return (trainable tensors, trainer state)."""
    try:
        trainable = load_file(str(path / TRAINABLE))
        load_optimizer(path, optimizer)
        scheduler.load_state_dict(json.loads((path / SCHEDULER).read_text()))
        rng = load_file(str(path / RNG_STATE))
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        earlier = [p for p in list_checkpoints(path.parent) if _step(p) < _step(path)]
        way_out = (f"resume from {earlier[-1].name} (--resume {earlier[-1]}, or remove {path.name} and use "
                   "--resume latest)" if earlier else "start again without --resume")
        raise DefectFillError(f"{path}: {path.name} is damaged ({str(exc).splitlines()[0]}): {way_out}.") from None
    restore_rng_state(rng)
    return trainable, state
