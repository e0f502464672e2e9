"""The settings machinery every stage shares: one dataclass field is the flag, the YAML key and the recorded key.

A stage's settings are a dataclass that derives from `Settings`. For each field
`lr_unet` the command has the flag `--lr-unet`, a YAML file may set `lr_unet:`
(or `lr-unet:`), and the recorded JSON holds `"lr_unet"`. Values from every
source go through one type check (`coerce`), then the class's `validate()`.

A field whose metadata has `"stage"` composes another settings class (as
`RunConfig` holds a `TrainConfig`): the stage's fields named in that mapping
become this class's flat settings under the names it gives.

Declared once on the field, in its metadata, besides its help:
- bounds: `"min"` (at least), `"max"` (at most), `"above"` (greater than), checked by `check_declared`
  before the class's own `validate()`, with a message naming the setting as the command being built names
  it: `--generate-steps` from `run` (its flat name), `--steps` from `generate`;
- `"choices"`: the allowed values (also the flag's choices);
- `"identity": False`: the setting does not decide what the output holds (how a job is carried out, or
  what may differ between a run and its continuation); `non_identity_names` lists them.
Messages a stage writes by hand (cross-field checks) name its own flags; `settings_named` renders them in
the terms of the composing command (`run`: `--steps` of generate is `--generate-steps`) or of a Python
API (`candidates=`).

Also here: the precision names that every command shares (`PRECISIONS`) and
how `auto` resolves on the machine at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from defectfill.core.errors import DefectFillError
from defectfill.model.device import resolve_device

log = logging.getLogger("defectfill")

S = TypeVar("S", bound="Settings")


def flag(name: str) -> str:
    """`lr_unet` -> `--lr-unet`."""
    return "--" + name.replace("_", "-")


def setting_name(name: str, python: bool = False) -> str:
    """How a message names setting `name`: its flag (`--lr-unet`), or as a Python parameter (`lr_unet=`)."""
    return f"{name}=" if python else flag(name)


_FLAG = re.compile(r"(?<![\w-])--([a-z0-9]+(?:-[a-z0-9]+)*)(?![\w-])")


def rename_settings(message: str, renames: dict[str, str] | None = None, python: bool = False,
                    known: set[str] | None = None) -> str:
    """`message` of a stage in the terms of the command being built: each flag `--name` in it whose setting is in
    `renames` (stage setting -> this command's setting) becomes this command's; with `python`, each flag of a
    setting in `known` or `renames` becomes the parameter name (`candidates=`). Other flags stay as written."""
    renames = renames or {}

    def render(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        if name in renames:
            return setting_name(renames[name], python)
        if python and known is not None and name in known:
            return setting_name(name, python)
        return match.group(0)

    return _FLAG.sub(render, message)


@contextlib.contextmanager
def settings_named(renames: dict[str, str] | None = None, python: bool = False,
                   known: set[str] | None = None) -> Iterator[None]:
    """A `DefectFillError` raised inside names its settings as `rename_settings` renders them: a composing
    command validates each stage inside `settings_named(<the stage's mapping>)`, a Python API its settings
    inside `settings_named(python=True, known=<its parameters>)`."""
    try:
        yield
    except DefectFillError as exc:
        raise DefectFillError(rename_settings(str(exc), renames, python, known)) from None


def _named_validate(validate):
    @functools.wraps(validate)
    def named(self) -> None:
        naming = getattr(self, "_naming", None)
        if naming is None:
            return validate(self)
        with settings_named(*naming):
            return validate(self)

    return named


def _bound_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is outside field `f`'s declared bounds ("must be at least 1"), or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("above")
    # below the least: the least named (what a user who typed 0 needs); above the most: the whole range
    if low is not None and high is not None and value > high:
        return f"must be in [{low}, {high}]"
    if low is not None and value < low:
        return "must be 0 or more" if low == 0 else f"must be at least {low}"
    if high is not None and value > high:
        return f"must be at most {high}"
    if above is not None and not value > above:
        return "must be positive" if above == 0 else f"must be more than {above}"
    return None


def _kind(f: dataclasses.Field) -> str:
    """bool, int, float, str or list, from the field's annotation (a string under `from __future__`)."""
    annotation = str(f.type).replace(" ", "")
    for kind in ("bool", "int", "float", "list"):
        if annotation.startswith(kind):
            return kind
    return "str"


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def coerce(name: str, f: dataclasses.Field, value: Any, source: str = "") -> Any:
    """`value` as the type of field `f`, or a DefectFillError naming the setting (and `source`)."""
    where = f"{source}: " if source else ""
    if value is None:
        if _optional(f):
            return None
        raise DefectFillError(f"{where}setting {name} needs a value.")
    kind = _kind(f)

    def bad(expected: str) -> DefectFillError:
        return DefectFillError(f"{where}setting {name}: expected {expected}, got {value!r}.")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "int":
        if isinstance(value, bool) or isinstance(value, float):  # 6.7 must not become 6, nor true 1
            raise bad("a whole number")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise bad("a whole number") from None
    elif kind == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
    elif kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of names (or one comma-separated text)")
        value = list(value)
    else:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            raise bad("text")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise DefectFillError(f"{where}setting {name}: {value!r} is not one of {', '.join(map(str, choices))}.")
    return value


# the order of the --help sections of every command
GROUP_ORDER = ["data", "model", "training", "checkpoints and logging", "generation", "sampling",
               "Low-Fidelity Selection", "evaluation", "inspection models", "output", "execution", "settings"]


@dataclass(frozen=True)
class FlatField:
    """One flat setting: its name (flag/YAML/JSON key), where it lives, and the dataclass field behind it."""

    name: str
    path: tuple[str, ...]  # ("lr_unet",) or ("generate", "steps")
    field: dataclasses.Field
    default: Any


class Settings:
    """Base of a stage's settings dataclass; see the module docstring."""

    required: ClassVar[tuple[str, ...]] = ()  # flat names that must have a value
    # --help sections: title -> the flat names in it (GROUP_ORDER orders them); a setting named in none is in
    # the composed stage's section, else in help_default_group
    help_groups: ClassVar[dict[str, tuple[str, ...]]] = {}
    help_default_group: ClassVar[str] = "settings"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each class's own `validate` names settings as `named_as` said, when it said."""
        super().__init_subclass__(**kwargs)
        if "validate" in cls.__dict__:
            cls.validate = _named_validate(cls.__dict__["validate"])

    def named_as(self: S, renames: dict[str, str] | None = None, python: bool = False) -> S:
        """This instance, whose `validate` messages name its settings as the composing command does (`renames`:
        this class's setting -> that command's; `RunConfig.generate_config`: generate's `steps` is
        `--generate-steps`), or as a Python API does (`python`: `steps=`). Not a setting: not recorded, and
        `dataclasses.replace` drops it."""
        self._naming = (dict(renames or {}), python, {f.name for f in self.flat_fields()})
        return self

    # ------------------------------------------------------------------ the flat view

    @classmethod
    def flat_fields(cls) -> list[FlatField]:
        defaults = cls()  # every settings class has defaults for all fields
        out = []
        for f in fields(cls):
            stage = f.metadata.get("stage")
            if stage is None:
                out.append(FlatField(f.name, (f.name,), f, getattr(defaults, f.name)))
                continue
            inner = getattr(defaults, f.name)
            by_name = {g.name: g for g in fields(inner)}
            for sub, flat_name in stage.items():
                out.append(FlatField(flat_name, (f.name, sub), by_name[sub], getattr(inner, sub)))
        return out

    def get(self, flat: FlatField) -> Any:
        value: Any = self
        for part in flat.path:
            value = getattr(value, part)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The recorded form: every flat setting by name (a YAML file of these keys reproduces the settings)."""
        return {f.name: self.get(f) for f in self.flat_fields()}

    # ------------------------------------------------------------------ command line

    @classmethod
    def help_group(cls, flat: FlatField) -> str:
        """The --help section of a flat setting: the one this class's `help_groups` names it in, else the one the
        composed stage's class names it in (run's `--steps` is train's "training"), else the class's
        `help_default_group`."""
        for title, names in cls.help_groups.items():
            if flat.name in names:
                return title
        if len(flat.path) > 1:
            stage = type(getattr(cls(), flat.path[0]))
            if issubclass(stage, Settings):
                for title, names in stage.help_groups.items():
                    if flat.path[1] in names:
                        return title
                return stage.help_default_group
        return cls.help_default_group

    @classmethod
    def flag_help(cls, flat: FlatField) -> str:
        """A flag's help: its text, then "(required)" or its default; no default where there is none (None) or
        where the text already says what happens without it."""
        text = flat.field.metadata.get("help", "")
        if flat.name in cls.required:
            return f"{text} (required)"
        if flat.default is None or flat.default == [] or "default" in text:
            return text
        default = flat.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, config_option: bool = True) -> None:
        """One flag per flat setting, in --help sections (`help_group`, in GROUP_ORDER); unset flags stay absent
        so a --config file can fill them."""
        if config_option:
            parser.add_argument("--config", help="YAML file of settings (keys as the flags, - or _); flags override it")
        flats = cls.flat_fields()
        by_group: dict[str, list[FlatField]] = {}
        for f in flats:
            by_group.setdefault(cls.help_group(f), []).append(f)
        order = sorted(by_group, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER))
        groups = {title: parser.add_argument_group(title) for title in order}
        for f in flats:
            kind = _kind(f.field)
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name, "help": cls.flag_help(f)}
            if kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = {"int": int, "float": float}.get(kind, str)
                if "choices" in f.field.metadata:
                    kwargs["choices"] = f.field.metadata["choices"]
            groups[cls.help_group(f)].add_argument(flag(f.name), **kwargs)

    @classmethod
    def from_args(cls: type[S], args: argparse.Namespace, require: bool = True) -> S:
        """Settings from a parsed command line (flags over the --config file over the defaults)."""
        values = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
        return cls.from_settings(values, getattr(args, "config", None), require=require)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_settings(cls: type[S], values: dict[str, Any], config_file: str | Path | None = None,
                      require: bool = True) -> S:
        """Defaults <- YAML file <- `values`, type-checked and validated. Keys are flat names."""
        merged = load_yaml_settings(config_file, cls) if config_file else {}
        merged.update(values)
        return cls.build(merged, source="", require=require)

    @classmethod
    def build(cls: type[S], values: dict[str, Any], source: str = "", require: bool = True,
              ignore_unknown: bool = False, check: bool = True) -> S:
        """An instance from flat `values` (unknown keys refused unless `ignore_unknown`), type-checked,
        and with `check` range-checked by `validate()`."""
        flat = {f.name: f for f in cls.flat_fields()}
        unknown = sorted(set(values) - set(flat))
        if unknown and not ignore_unknown:
            where = f"{source}: " if source else ""
            raise DefectFillError(f"{where}unknown setting(s) {', '.join(unknown)}. Known settings: "
                                  f"{', '.join(sorted(flat))}.")
        own: dict[str, Any] = {}
        staged: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            if name not in flat:
                continue
            f = flat[name]
            value = coerce(name, f.field, value, source)
            if len(f.path) == 1:
                own[name] = value
            else:
                staged.setdefault(f.path[0], {})[f.path[1]] = value
        instance = cls()
        for stage, sub_values in staged.items():
            own[stage] = dataclasses.replace(getattr(instance, stage), **sub_values)
        instance = dataclasses.replace(instance, **own)
        if require:
            missing = [flag(n) for n in cls.required if instance.get(flat[n]) in (None, "", [])]
            if missing:
                raise DefectFillError(f"missing required setting(s): {', '.join(missing)}.")
        if check:
            instance.validate()
        return instance

    def validate(self) -> None:
        """Raise DefectFillError naming the flag when a value is out of range. Subclasses add their checks,
        after `check_declared()`."""
        self.check_declared()

    def check_declared(self, python: bool = False) -> None:
        """The declared bounds of every flat setting (see the module docstring), each named by its flat name:
        `--generate-steps` for `run`'s, `generate_steps=` with `python`."""
        for f in self.flat_fields():
            value = self.get(f)
            problem = _bound_problem(f.field, value)
            if problem:
                raise DefectFillError(f"{setting_name(f.name, python)} {problem} (got {value}).")

    @classmethod
    def non_identity_names(cls, own_only: bool = False) -> set[str]:
        """The flat settings declared `"identity": False`; `own_only`: only this class's own fields, not those
        of the stages it composes."""
        return {f.name for f in cls.flat_fields() if f.field.metadata.get("identity", True) is False
                and not (own_only and len(f.path) > 1)}

    @classmethod
    def stage_renames(cls, stage: str) -> dict[str, str]:
        """A composed stage's settings -> this class's flat names for them (`RunConfig`: generate's
        `steps` -> `generate_steps`)."""
        f = next(f for f in fields(cls) if f.name == stage)
        return dict(f.metadata["stage"])


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise DefectFillError(message.rstrip(".") + ".")


MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few lines; a document this big is not one


@functools.cache
def _settings_loader():
    """yaml's safe loader without aliases: `*name` lets a few lines expand to gigabytes (the "billion laughs"),
    and a settings file never needs one."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a settings file",
                                                  mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_yaml_settings(path: str | Path, cls: type[Settings]) -> dict[str, Any]:
    """The settings of a YAML file as flat names (`lr-unet` and `lr_unet` both accepted); unknown keys refused."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise DefectFillError(f"{path}: config file not found.")
    try:
        if path.stat().st_size > MAX_SETTINGS_BYTES:
            raise DefectFillError(f"{path}: {path.stat().st_size} bytes is too large for a settings file "
                                  f"(at most {MAX_SETTINGS_BYTES}).")
        data = yaml.load(path.read_text(), Loader=_settings_loader()) or {}
    except yaml.YAMLError as exc:
        raise DefectFillError(f"{path}: not valid YAML ({exc}).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefectFillError(f"{path}: cannot read the config file ({exc}).") from None
    if not isinstance(data, dict):
        raise DefectFillError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}.")
    flat = {f.name: f for f in cls.flat_fields()}
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in flat:
            raise DefectFillError(f"{path}: unknown setting {key!r}. Known settings: {', '.join(sorted(flat))}.")
        # a type error names the file it came from
        settings[name] = coerce(name, flat[name].field, value, str(path))
    return settings


# --------------------------------------------------------------------------- precision

# One vocabulary for every command: `no` is full precision (fp32).
PRECISIONS = ("auto", "no", "fp16", "bf16")


def resolve_precision(setting: str, device: str | None = None) -> str:
    """`auto` -> bf16 on a CUDA GPU that supports it, fp16 on other CUDA GPUs, `no` elsewhere.

    An explicit half precision that this machine cannot run is refused with the alternative named;
    one that would be slow on a CPU is allowed with a warning.
    """
    import torch

    if setting not in PRECISIONS:
        raise DefectFillError(f"--mixed-precision {setting!r}: choose one of {', '.join(PRECISIONS)}.")
    device = resolve_device(device)
    on_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if setting == "auto":
        if not on_cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise DefectFillError("--mixed-precision bf16: this GPU does not support bfloat16. "
                              "Use --mixed-precision fp16 (or auto).")
    if setting in ("fp16", "bf16") and not on_cuda:
        log.warning("--mixed-precision %s on %s: half precision is usually slower than full precision without "
                    "a GPU; --mixed-precision no (or auto) is the faster choice here.", setting, device)
    return setting


def resolve_compile(setting: str, device: str | None = None) -> bool:
    """`auto` compiles on a CUDA GPU only: on a 2-core CPU the compiled tiny step was measured 1.24x slower
    (benchmarks/README.md)."""
    import torch

    if setting not in ("auto", "yes", "no"):
        raise DefectFillError(f"--compile {setting!r}: choose auto, yes or no.")
    if setting == "auto":
        device = resolve_device(device)
        return device.startswith("cuda") and torch.cuda.is_available()
    return setting == "yes"


def compile_module(module, **kwargs):
    """torch.compile with the backend named by $DEFECTFILL_COMPILE_BACKEND (default inductor; tests use a
    backend that runs quickly on a CPU)."""
    import os

    import torch

    return torch.compile(module, backend=os.environ.get("DEFECTFILL_COMPILE_BACKEND", "inductor"), **kwargs)


def precision_dtype(resolved: str):
    """The torch dtype of a resolved precision name."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolved, torch.float32)
