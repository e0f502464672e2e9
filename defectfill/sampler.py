"""Deprecated: the old module of `DefectGenerator`. Use `defectfill.generate` (`from defectfill.generate import
DefectGenerator`, or `from defectfill import DefectGenerator`); the canvas is `defectfill.model.canvas`. This
module goes in the next release."""

from defectfill.core.lazy import warn_moved

warn_moved(__name__, "defectfill.generate.generator (DefectGenerator) and defectfill.model.canvas")

from defectfill.generate.generator import *  # noqa: E402, F403 - every name the old module had
from defectfill.model.canvas import Canvas, canvas_for, prepare_canvas  # noqa: E402, F401
