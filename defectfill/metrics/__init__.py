"""Metrics: LPIPS, KID, IC-LPIPS and the downstream inspection models."""
