"""DefectFill: few-shot realistic defect image generation for visual inspection."""

__version__ = "0.1.0"

from defectfill.errors import DefectFillError  # noqa: E402

__all__ = ["DefectFillError", "__version__"]
