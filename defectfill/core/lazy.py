"""Names a package serves from its submodules on first use (PEP 562 `__getattr__`), so importing a package
imports no torch until a name that needs it is read; and the names an old module path still serves for one
release, with a `DeprecationWarning` that says where they live now.

An old module whose file moved (`defectfill/sampler.py` is `defectfill/generate/generator.py`) is served by an
import hook (`install_module_aliases`) rather than by a file left at its old path: with no file there, git sees
the move as a rename, so a branch that still edits the old file merges into the new one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
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
    as usual. `deprecated`: modules whose other names the package served before the stage subpackages (its old
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


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module path as a module holding the public names of the modules that replaced it."""

    def __init__(self, sources: tuple[str, ...]):
        self.sources = sources

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(f"the module {module.__name__} is deprecated and goes in the next release: use "
                      f"{' and '.join(self.sources)}", DeprecationWarning, stacklevel=2)
        for source in self.sources:
            names = vars(importlib.import_module(source))
            module.__dict__.update({k: v for k, v in names.items() if not k.startswith("_")})


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, aliases: dict[str, tuple[str, ...]]):
        self.aliases = aliases

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.aliases:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(self.aliases[fullname]))


def install_module_aliases(aliases: dict[str, tuple[str, ...]]) -> None:
    """Serve each old module path (`defectfill.sampler`) as the public names of its new modules, with a
    DeprecationWarning at its first import. Installed once, by the package `defectfill`."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(aliases))
