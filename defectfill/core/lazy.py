"""Names a package serves from its submodules on first use (PEP 562 `__getattr__`), so importing a package
imports no torch until a name that needs it is read; and the names an old module path still serves for one
release, with a `DeprecationWarning` that says where they live now."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, public: dict[str, str], deprecated: tuple[str, ...] = (),
                 renamed: dict[str, tuple[str, str]] | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`.

    `public`: name -> module that defines it (served without a warning). A submodule of the package is imported
    as usual. `deprecated`: modules whose other names the package served before the layout of issue 25 (its old
    flat module's names): served with a DeprecationWarning naming the new place. `renamed`: old name -> (module,
    new name), also with the warning.
    """
    renamed = renamed or {}

    def __getattr__(name: str) -> Any:
        if name in public:
            return getattr(importlib.import_module(public[name]), name)
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        if name in renamed:
            module, new = renamed[name]
            _warn(f"{package}.{name}", f"{module}.{new}")
            return getattr(importlib.import_module(module), new)
        for module in deprecated:
            value = getattr(importlib.import_module(module), name, _MISSING)
            if value is not _MISSING:
                home = getattr(value, "__module__", None)  # where a function or class is defined
                _warn(f"{package}.{name}", f"{home if isinstance(home, str) and home.startswith('defectfill.') else module}.{name}")
                return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


_MISSING = object()


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and goes in the next release: use {new}", DeprecationWarning, stacklevel=3)


def warn_moved(old_module: str, new: str) -> None:
    """The warning of an old module path kept as a shim (imported once: the warning comes at its first import)."""
    warnings.warn(f"the module {old_module} is deprecated and goes in the next release: use {new}",
                  DeprecationWarning, stacklevel=3)


class _CallableStage(types.ModuleType):
    """A stage package that is also callable as its stage function (`defectfill.train(config)`)."""

    _stage_function: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self._stage_function)(*args, **kwargs)


def make_callable(package: str, function: str) -> None:
    """Make the package `package` callable as its function `function`.

    `from defectfill import train` must give something that trains whether or not the package `defectfill.train`
    was imported before: importing a subpackage binds its name on the parent, over the parent's lazy name. So the
    package itself is what `defectfill.train` and `defectfill.evaluate` are, and calling it calls the function.
    """
    module = sys.modules[package]
    module.__class__ = _CallableStage
    module._stage_function = function
