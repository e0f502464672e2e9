"""Sampling settings that follow the base model: its recommendation, unless the user sets a value.

A base folder may hold `defectfill_sampling.json`, the sampling its makers measured it to want:

    {"prompt": "A photo of {token}", "guidance": 3.0, "steps": 20, "unconditional": "base"}

Every key is optional. `generate`, `run`, `defectfill ui`, the training previews and
`DefectGenerator.from_run` fill each sampling setting the user left unset from it, and any key
it lacks (or a base without the file, such as Stable Diffusion 2 from the hub) from the
paper's values (`PAPER_SAMPLING`). What was used is what the output records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from defectfill.core.errors import DefectFillError

BASE_SAMPLING_NAME = "defectfill_sampling.json"
UNCONDITIONAL = ("tuned", "base")
# DefectFill's generation settings (prompt None: the run's object prompt "A {object} with {token}")
PAPER_SAMPLING: dict[str, Any] = {"prompt": None, "guidance": 7.5, "steps": 50, "unconditional": "tuned"}


def _problem(key: str, value: Any) -> str | None:
    if key == "prompt":
        if not isinstance(value, str) or "{token}" not in value:
            return "a prompt template with {token}"
        try:
            value.format(token="t", object="o")
        except (KeyError, IndexError, ValueError):
            return "a template with only {token} and {object} as placeholders"
    elif key == "guidance":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            return "a number from 0 to 100"
    elif key == "steps":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            return "a whole number from 1 to 1000"
    elif key == "unconditional":
        if value not in UNCONDITIONAL:
            return f"one of {', '.join(UNCONDITIONAL)}"
    return None


def read_base_sampling(model: str) -> dict[str, Any]:
    """The sampling a base recommends (the keys its `defectfill_sampling.json` sets), {} without one.

    Read from local folders and the built-in bases; a hub id is not downloaded for it."""
    from defectfill.model.pipeline import resolve_model

    try:
        folder = Path(resolve_model(model))
    except DefectFillError:
        return {}
    path = folder / BASE_SAMPLING_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DefectFillError(f"{path}: cannot read the base's sampling recommendation ({exc}). Fix or remove the "
                              "file; without it the paper's sampling settings are used.") from None
    if not isinstance(data, dict):
        raise DefectFillError(f"{path}: must be a JSON object such as {{\"guidance\": 3.0}}.")
    for key, value in data.items():
        if key not in PAPER_SAMPLING:
            raise DefectFillError(f"{path}: unknown key {key!r}; the keys are {', '.join(PAPER_SAMPLING)}.")
        problem = _problem(key, value)
        if problem:
            raise DefectFillError(f"{path}: {key} {value!r} must be {problem}.")
    return data


def resolve_sampling(model: str, **given: Any) -> dict[str, Any]:
    """Each of prompt, guidance, steps, unconditional: the value given, else the base's recommendation, else the
    paper's. (prompt may stay None: the run's object prompt.)"""
    unknown = set(given) - set(PAPER_SAMPLING)
    if unknown:
        raise TypeError(f"not sampling settings: {', '.join(sorted(unknown))}")
    recommended = read_base_sampling(model) if any(v is None for v in given.values()) or len(given) < 4 else {}
    return {key: given[key] if given.get(key) is not None else recommended.get(key, paper)
            for key, paper in PAPER_SAMPLING.items()}


def write_base_sampling(folder: str | Path, sampling: dict[str, Any]) -> Path:
    """Write a base's recommendation (checked as it will be read)."""
    from defectfill.core.atomic import write_json

    for key, value in sampling.items():
        problem = _problem(key, value) if key in PAPER_SAMPLING else "a known key"
        if problem:
            raise DefectFillError(f"{BASE_SAMPLING_NAME}: {key} {value!r} must be {problem}.")
    path = Path(folder) / BASE_SAMPLING_NAME
    write_json(path, sampling)
    return path
