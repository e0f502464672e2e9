"""Metrics: LPIPS, KID, IC-LPIPS and the downstream inspection models."""

from defectfill.evaluate.metrics.ic_lpips import ic_lpips, ic_lpips_details
from defectfill.evaluate.metrics.kid import kid, kid_images

__all__ = ["ic_lpips", "ic_lpips_details", "kid", "kid_images"]
