"""What defectfill reads: dataset layouts (`layouts`), the reference split (`split`), image and mask reading
(`images`), defect masks drawn or given (`masks`), augmentation (`augment`) and `defectfill data` (`inspection`).
Imports no torch (the functions that make tensors import it)."""

from defectfill.data.images import load_mask, load_rgb
from defectfill.data.layouts import LAYOUTS, DefectSample, Layout, object_name, open_layout
from defectfill.data.split import Split, make_split, read_split

__all__ = [
    "LAYOUTS", "DefectSample", "Layout", "Split", "load_mask", "load_rgb", "make_split",
    "object_name", "open_layout", "read_split",
]
