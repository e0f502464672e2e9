"""Evaluation: `evaluate` (`evaluator`: KID, IC-LPIPS and the downstream inspection models of a generated
dataset, with its report) and the metrics themselves (`metrics`). The package is callable as `evaluate`:
`defectfill.evaluate(config)`."""

from defectfill.core.lazy import lazy_getattr, make_callable

__all__ = ["evaluate", "evaluate_command"]

# the old module defectfill/evaluate.py's other names (now defectfill.evaluate.evaluator), with a warning
__getattr__ = lazy_getattr(__name__, {"evaluate": "defectfill.evaluate.evaluator",
                                      "evaluate_command": "defectfill.evaluate.evaluator"},
                           deprecated=("defectfill.evaluate.evaluator",))
make_callable(__name__, "evaluate")
