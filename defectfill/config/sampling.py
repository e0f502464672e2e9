"""The sampling settings (`SamplingConfig`), and how those left unset follow the base model: its
recommendation, unless the user sets a value.

`SamplingConfig` declares each sampling setting once (default, help, bounds, choices): `generate` and
`run` expose its fields as their own flags (`sampling_field`; `run` names `steps` and `batch_size`
`--generate-steps` and `--generate-batch-size`), `DefectGenerator` takes one, and the UI checks its
settings with it.

A base folder may hold `defectfill_sampling.json`, the sampling its makers measured it to want:

    {"prompt": "A photo of {token}", "guidance": 3.0, "steps": 20, "unconditional": "base"}

Every key is optional. `generate`, `run`, `defectfill ui`, the training previews and
`DefectGenerator.from_run` fill each sampling setting the user left unset from it, and any key
it lacks (or a base without the file, such as Stable Diffusion 2 from the hub) from the
paper's values (`PAPER_SAMPLING`). What was used is what the output records.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectfill.config.settings import Settings
from defectfill.core.errors import DefectFillError

BASE_SAMPLING_NAME = "defectfill_sampling.json"
UNCONDITIONAL = ("tuned", "base")
SCHEDULERS = ["ddim", "dpm++", "unipc", "dpm", "euler", "pndm"]  # dpm: the same solver as dpm++ (older name)
# DefectFill's generation settings (prompt None: the run's object prompt "A {object} with {token}")
PAPER_SAMPLING: dict[str, Any] = {"prompt": None, "guidance": 7.5, "steps": 50, "unconditional": "tuned"}


def prompt_problem(template: str, what: str) -> str | None:
    """Why a prompt template cannot be filled (no {token}, another placeholder, a stray brace, a format spec), or
    None."""
    try:
        # a format spec or conversion ({token:>10}, {object!r}) pads or quotes the words; a huge width
        # ({object:>999999999}) fills memory: checked on the parsed template, before anything is formatted
        odd = next((f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                    for _, name, spec, conv in string.Formatter().parse(template)
                    if name is not None and (spec or conv)), None)
        if odd:
            return (f"{what} {template!r}: {odd} has a format spec or conversion; write plain {{object}} and "
                    "{token}")
        if "{token}" not in template:
            return f"{what} {template!r} must contain {{token}} (the trained defect word)"
        template.format(token="t", object="o")
    except (KeyError, IndexError, ValueError) as exc:
        return f"{what} {template!r}: {exc}; use only {{object}} and {{token}} as placeholders"
    return None


@dataclass
class SamplingConfig(Settings):
    """How each image is sampled. steps, guidance, unconditional and prompt left None are what the base
    recommends (`resolved`), else the paper's (`PAPER_SAMPLING`)."""

    candidates: int = field(default=8, metadata={"help": "candidates per image for Low-Fidelity Selection (1: no LPIPS)", "min": 1})
    steps: int | None = field(default=None, metadata={"help": f"sampling steps (default: the base model's recommendation, else {PAPER_SAMPLING['steps']})", "min": 1})
    guidance: float | None = field(default=None, metadata={"help": f"classifier-free guidance scale (default: the base model's recommendation, else {PAPER_SAMPLING['guidance']})", "min": 0})
    unconditional: str | None = field(default=None, metadata={"help": "the guidance's unconditional branch: 'tuned' (the fine-tuned model, stock CFG) or 'base' (the base model: LoRA off for those rows) (default: the base model's recommendation, else tuned)", "choices": UNCONDITIONAL})
    scheduler: str = field(default="ddim", metadata={"help": "sampler, built from the base's scheduler config: ddim (the paper's), dpm++ (2nd-order multistep DPM-Solver++) or unipc (UniPC multistep), the multistep solvers meant for fewer --steps; dpm is dpm++", "choices": SCHEDULERS})
    prompt: str | None = field(default=None, metadata={"help": "prompt template with {token} and {object} (default: the base model's recommendation, else the run's object prompt)"})
    feather: int = field(default=0, metadata={"help": "blend this many pixels inside the mask edge", "min": 0})
    latent_blend: bool = field(default=False, metadata={"help": "blended latent diffusion: after each sampler step the latents outside the mask become the source's, noised to that step (the source's clean latents at the last); off: the stock inpainting loop"})
    batch_size: int | None = field(default=None, metadata={"help": "candidates per pipeline call (default: all candidates of an image in one call)", "min": 1})
    batch_images: int = field(default=1, metadata={"help": "images whose candidates share each pipeline call (those of one canvas size): more fill a GPU's UNet calls; 1 samples each image in its own call, as before (the same seeds either way, the same images within float tolerance)", "min": 1, "max": 256})

    def validate(self) -> None:
        self.check_declared()  # the bounds in the fields' metadata
        for name in ("unconditional", "scheduler"):  # a hand-made config's choices (the flags check theirs)
            value, choices = getattr(self, name), SAMPLING_FIELDS[name].metadata["choices"]
            if value is not None and value not in choices:
                raise DefectFillError(f"--{name} {value!r}: choose one of {', '.join(choices)}.")
        if self.prompt is not None:
            problem = prompt_problem(self.prompt, "--prompt")
            if problem:
                raise DefectFillError(problem + ".")

    def resolved(self, model: str | None = None) -> SamplingConfig:
        """A copy with prompt, steps, guidance and unconditional left unset filled as the base `model`
        recommends (its defectfill_sampling.json), else (or without a model) the paper's; prompt may stay None
        (the run's object prompt)."""
        given = {key: getattr(self, key) for key in PAPER_SAMPLING}
        if model is not None:
            return dataclasses.replace(self, **resolve_sampling(model, **given))
        return dataclasses.replace(self, **{key: PAPER_SAMPLING[key] if value is None else value
                                            for key, value in given.items()})

    def settings(self) -> dict[str, Any]:
        """The settings by name (as `generate` records them)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}


SAMPLING_FIELDS = {f.name: f for f in dataclasses.fields(SamplingConfig)}


def sampling_field(name: str) -> Any:
    """SamplingConfig's field `name` for a settings class that has the sampling settings as its own flags
    (`GenerateConfig`): the same default, help, bounds and choices, declared once."""
    declared = SAMPLING_FIELDS[name]
    return field(default=declared.default, metadata=declared.metadata)


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
    unset = [key for key in PAPER_SAMPLING if given.get(key) is None]
    recommended = read_base_sampling(model) if unset else {}  # the base's file only when it can matter
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
