"""Deprecated: use `from defectfill import DefectFillError` (or `defectfill.core.errors`). Goes in the next
release."""

from defectfill.core.lazy import warn_moved

warn_moved(__name__, "defectfill.core.errors (or `from defectfill import DefectFillError`)")

from defectfill.core.errors import DefectFillError  # noqa: E402, F401
