"""Datasets: layouts, the reference split, image/mask reading and augmentation."""

from defectfill.data.images import load_mask, load_rgb
from defectfill.data.layouts import LAYOUTS, DefectSample, Layout, object_name, open_layout
from defectfill.data.split import Split, make_split, read_split

__all__ = [
    "LAYOUTS", "DefectSample", "Layout", "Split", "load_mask", "load_rgb", "make_split",
    "object_name", "open_layout", "read_split",
]
