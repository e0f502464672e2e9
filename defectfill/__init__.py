"""DefectFill: few-shot realistic defect image generation for visual inspection.

The public API, each name imported on first use (importing `defectfill` imports no torch):

    from defectfill import TrainConfig, GenerateConfig, EvaluateConfig, RunConfig   # settings
    from defectfill import SamplingConfig                                             # DefectGenerator's sampling
    from defectfill import train, DefectGenerator, evaluate, run_all                 # the stages
    from defectfill import load_pipeline, DefectFillError

`train` and `evaluate` are the stage packages `defectfill.train` and `defectfill.evaluate`, callable as their
stage functions (`train(config)`, `evaluate(config)`).
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from defectfill.core.errors import DefectFillError  # noqa: E402
from defectfill.core.lazy import install_module_aliases  # noqa: E402

# old module paths, for one release (with a DeprecationWarning): the public names of the modules that replaced them
install_module_aliases({
    "defectfill.sampler": ("defectfill.generate.generator", "defectfill.model.canvas"),
    "defectfill.errors": ("defectfill.core.errors",),
    "defectfill.metrics": ("defectfill.evaluate.metrics",),  # kid(...), ic_lpips(...) as the README showed
})

_API = {
    "TrainConfig": "defectfill.config.stages", "GenerateConfig": "defectfill.config.stages",
    "EvaluateConfig": "defectfill.config.stages", "RunConfig": "defectfill.config.stages",
    "SamplingConfig": "defectfill.config.sampling",
    "DefectGenerator": "defectfill.generate.generator", "run_all": "defectfill.run.runner",
    "load_pipeline": "defectfill.model.pipeline",
}
_STAGES = ("train", "evaluate")  # the packages, callable as their functions (see defectfill.core.lazy)

__all__ = ["DefectFillError", "__version__", *_API, *_STAGES]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _STAGES:
        return importlib.import_module(f"defectfill.{name}")
    raise AttributeError(f"module 'defectfill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
