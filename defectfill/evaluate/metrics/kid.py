"""Kernel Inception Distance (Binkowski et al. 2018), computed the standard way.

KID is the unbiased estimate of the squared MMD between two feature sets under
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets of equal size drawn from each side (mean and std over subsets), as
torchmetrics and torch-fidelity report it. The default features are the
2048-d pool features of torch-fidelity's Inception-V3 ("inception-v3-compat",
the TF-FID weights), so numbers compare with other papers. Any feature network
can be passed instead (tests use tiny ones).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from defectfill.core.errors import DefectFillError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
MIN_KID_IMAGES = 2  # the unbiased estimator needs two samples per side (it drops the diagonal)


def kid_subset_plan(n_real: int, n_fake: int, subset_size: int = 1000, subsets: int = 100) -> tuple[int, int]:
    """The (subset size, number of subsets) actually used for sets of these sizes.

    The subset size shrinks to the smaller set; when it covers both sets whole,
    every subset is the same set, so one subset is enough (and std is 0).
    """
    if subset_size < 2 or subsets < 1:
        raise DefectFillError(f"KID needs subset size >= 2 and subsets >= 1 (got {subset_size}, {subsets}).")
    m = min(subset_size, n_real, n_fake)
    if m == n_real == n_fake:
        subsets = 1
    return m, subsets


def _poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int, gamma: float, coef: float) -> torch.Tensor:
    return (a @ b.T * gamma + coef) ** degree


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef: float) -> float:
    m = x.shape[0]
    k_xx = _poly_kernel(x, x, degree, gamma, coef)
    k_yy = _poly_kernel(y, y, degree, gamma, coef)
    k_xy = _poly_kernel(x, y, degree, gamma, coef)
    # off-diagonal means of the within-set kernels; the full mean of the cross kernel
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * k_xy.mean())


def kid(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    subset_size: int = 1000,
    subsets: int = 100,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between (N, D) real and (M, D) generated features.

    The subset size is adapted to small sets by `kid_subset_plan`.
    """
    real, fake = (
        (f if torch.is_tensor(f) else torch.as_tensor(np.asarray(f))).detach().double().cpu()
        for f in (real_features, fake_features)
    )
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DefectFillError(
            f"KID needs two (N, D) feature arrays of the same D; got {tuple(real.shape)} and {tuple(fake.shape)}."
        )
    if min(real.shape[0], fake.shape[0]) < MIN_KID_IMAGES:
        raise DefectFillError(
            f"KID needs at least {MIN_KID_IMAGES} samples per side; got {real.shape[0]} real, {fake.shape[0]} generated."
        )
    m, n_subsets = kid_subset_plan(real.shape[0], fake.shape[0], subset_size, subsets)
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        x = real[torch.randperm(real.shape[0], generator=gen)[:m]]
        y = fake[torch.randperm(fake.shape[0], generator=gen)[:m]]
        values.append(_unbiased_mmd2(x, y, degree, gamma, coef))
    arr = np.asarray(values)
    # population std over subsets, as torchmetrics' KID reports it (unbiased=False)
    return float(arr.mean()), float(arr.std())


def inception_feature_extractor(weights: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """torch-fidelity's Inception-V3 (2048-d pool features), taking uint8 (N, 3, H, W) images.

    Downloads the TF-FID weights on first use; `weights` is a local copy for offline machines.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:
        raise DefectFillError(f"KID needs torchmetrics and torch-fidelity ({exc}). pip install torch-fidelity") from None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DefectFillError(f"{path}: Inception weights not found.")
        try:
            # read with the restricted unpickler; torch-fidelity itself would unpickle the file freely,
            # so it is handed a copy holding nothing but tensors
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read the user's file gets one message
            raise DefectFillError(f"{path}: cannot read Inception weights ({exc}).") from None
        with tempfile.TemporaryDirectory() as tmp:
            safe = Path(tmp) / INCEPTION_FILE
            torch.save({k: v for k, v in state.items() if torch.is_tensor(v)}, safe)
            try:
                model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                           feature_extractor_weights_path=str(safe))
            except RuntimeError as exc:
                raise DefectFillError(f"{path}: not torch-fidelity's Inception-V3 weights ({exc}).") from None
    else:
        try:
            model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as exc:  # noqa: BLE001 - urllib, OSError and RuntimeError all mean "no weights"
            raise DefectFillError(
                f"KID needs torch-fidelity's Inception-V3 weights, which could not be downloaded ({exc}). "
                f"Put {INCEPTION_FILE} in $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints), "
                "or pass a local copy (--inception-weights PATH), or skip KID (--no-kid)."
            ) from None
    return model.eval().to(device)


def prepare_images(
    real: Sequence[Image.Image], fake: Sequence[Image.Image], size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Convert both sets to RGB uint8 tensors of one size; return notes saying what was changed."""
    notes: list[str] = []
    modes = sorted({im.mode for im in list(real) + list(fake)} - {"RGB"})
    if modes:
        notes.append(f"converted images of mode {', '.join(modes)} to RGB")
    if size is None:
        size = real[0].size if real else fake[0].size
    sizes = sorted({im.size for im in list(real) + list(fake)} - {size})
    if sizes:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:5])
        notes.append(f"resized images of size {shown} to {size[0]}x{size[1]}")

    def stack(images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size, Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.uint8))
        if not arrays:
            return torch.zeros((0, 3, size[1], size[0]), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    return stack(real), stack(fake), notes


@torch.no_grad()
def extract_features(
    extractor: nn.Module, images: torch.Tensor, batch_size: int = 32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, D) float features, in batches."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        feats = extractor(images[start:start + batch_size].to(device))
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        out.append(feats.reshape(feats.shape[0], -1).double().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0), dtype=torch.float64)


def kid_images(
    real: Sequence[Image.Image],
    fake: Sequence[Image.Image],
    feature_extractor: nn.Module | None = None,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    inception_weights: str | Path | None = None,
) -> dict[str, Any]:
    """KID between real and generated PIL images, as a JSON-ready record.

    `feature_extractor` takes uint8 (N, 3, H, W) tensors (torchmetrics' convention);
    None means the standard Inception features. Too few images give
    {"available": False, "reason": ...} rather than a number.
    """
    record: dict[str, Any] = {
        "n_real": len(real), "n_generated": len(fake),
        "features": "inception-v3-compat pool 2048 (torch-fidelity)" if feature_extractor is None else "custom",
    }
    if min(len(real), len(fake)) < MIN_KID_IMAGES:
        record.update(available=False, reason=(
            f"KID needs at least {MIN_KID_IMAGES} images on each side; "
            f"got {len(real)} real held-out and {len(fake)} generated."
        ))
        return record
    real_t, fake_t, notes = prepare_images(real, fake)
    extractor = feature_extractor if feature_extractor is not None else inception_feature_extractor(
        inception_weights, device)
    real_f = extract_features(extractor, real_t, batch_size, device)
    fake_f = extract_features(extractor, fake_t, batch_size, device)
    m, n_subsets = kid_subset_plan(len(real), len(fake), subset_size, subsets)
    mean, std = kid(real_f, fake_f, subset_size=subset_size, subsets=subsets, seed=seed)
    if m < subset_size:
        notes.append(f"subset size reduced from {subset_size} to {m} (the smaller image set)")
    if not (math.isfinite(mean) and math.isfinite(std)):
        record.update(available=False, reason="KID came out non-finite (features contain NaN or inf).")
        return record
    record.update(
        available=True, mean=mean, std=std, mean_x1e3=mean * 1e3, std_x1e3=std * 1e3,
        subset_size=m, subsets=n_subsets, requested_subset_size=subset_size, notes=notes,
    )
    return record
