"""The downstream inspection models the papers report: trained on generated data, tested on real data.

- classify: a torchvision ResNet-34 defect-type classifier trained on the
  generated images of every defect type of a category, tested on the real
  held-out images; accuracy, per-type accuracy and a confusion matrix.
- localize: a segmentation-models-pytorch U-Net trained on generated
  image/mask pairs plus good images (empty masks), tested on the real held-out
  defect images and the real good test images; image-level (max pixel score)
  and pixel-level AUROC, AP and F1-max through torchmetrics, and PRO up to
  30% false-positive rate as MVTec AD defines it.

Networks are injectable (`model_factory`) so tests run tiny ones on CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from defectfill.config.stages import DownstreamSettings  # noqa: F401 - the models' settings, declared with the others
from defectfill.core.errors import DefectFillError
from defectfill.data.images import image_size, letterbox, letterbox_box, load_mask, load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _image_tensor(path: Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size), ImageNet-normalised (the backbones' pretraining statistics).

    Letterboxed, never stretched: scaled so its longer side is `size` (bicubic), centred, and padded with the
    ImageNet mean (0 after normalisation), so a non-square image and its defect keep their shape.
    """
    image, _, valid = letterbox(load_rgb(path), None, size)
    arr = (image + 1.0) / 2.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (arr - mean) / std * valid


def _valid_tensor(path: Path, size: int) -> torch.Tensor:
    """(1, size, size): 1 where the letterboxed image of `path` lies, 0 on its padding."""
    w, h, x0, y0 = letterbox_box(*image_size(path), size)
    valid = torch.zeros(1, size, size)
    valid[:, y0:y0 + h, x0:x0 + w] = 1.0
    return valid


def _mask_tensor(path: Path | None, size: int, rule: str = "half") -> torch.Tensor:
    """A mask file (or None: a good image) -> (1, size, size) in {0, 1}, letterboxed as its image is and
    nearest-resized to stay binary (the usual way to bring ground truth to a model's size)."""
    if path is None:
        return torch.zeros((1, size, size))
    mask = load_mask(path, rule)
    w, h, x0, y0 = letterbox_box(mask.shape[1], mask.shape[0], size)
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    out = torch.zeros(1, size, size)
    out[0, y0:y0 + h, x0:x0 + w] = torch.from_numpy((np.asarray(small) >= 128).astype(np.float32))
    return out


# ---------------------------------------------------------------- metrics


def binary_scores(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """AUROC, average precision and F1-max of binary scores (torchmetrics).

    F1-max is the best F1 over all thresholds of the precision-recall curve.
    Undefined values (one class only) are None, never a made-up number.
    """
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_average_precision,
        binary_precision_recall_curve,
    )

    scores = scores.reshape(-1).float()
    targets = targets.reshape(-1).long()
    n_pos = int(targets.sum())
    if n_pos == 0 or n_pos == targets.numel():
        return {"auroc": None, "ap": None, "f1_max": None, "n": int(targets.numel()), "n_positive": n_pos}
    precision, recall, _ = binary_precision_recall_curve(scores, targets)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return {
        "auroc": float(binary_auroc(scores, targets)),
        "ap": float(binary_average_precision(scores, targets)),
        "f1_max": float(f1.max()),
        "n": int(targets.numel()),
        "n_positive": n_pos,
    }


def pro_score(scores: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray, max_fpr: float = 0.3,
              max_thresholds: int = 2000, valid: torch.Tensor | np.ndarray | None = None) -> float | None:
    """Normalised area under the per-region-overlap curve up to `max_fpr` (MVTec AD's PRO).

    scores (N, H, W) anomaly maps, masks (N, H, W) ground truth, `valid` (N, H, W)
    the pixels that belong to the images (letterbox padding excluded; default
    all). Each connected defect region (8-connected, as in the MVTec AD
    reference implementation) counts equally however large it is: at a threshold, its
    overlap is the fraction of its pixels above the threshold; PRO is the mean
    over regions, plotted against the false-positive rate of the defect-free
    pixels; the area up to `max_fpr` is divided by `max_fpr` (1.0 is perfect).
    None when there is no defect region or no defect-free pixel.
    """
    from scipy import ndimage

    def array(x):
        return np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)

    scores = array(scores).astype(np.float64)
    masks = array(masks).astype(bool)
    valid = np.ones_like(masks) if valid is None else array(valid).astype(bool)
    masks = masks & valid
    regions = []
    eight = np.ones((3, 3), dtype=bool)  # diagonal neighbours join a region, as MVTec AD's evaluation labels them
    for score, mask in zip(scores, masks, strict=True):
        labels, count = ndimage.label(mask, structure=eight)
        regions += [np.sort(score[labels == i]) for i in range(1, count + 1)]
    normal = np.sort(scores[~masks & valid])
    if not regions or normal.size == 0:
        return None
    thresholds = np.unique(scores[valid])
    if thresholds.size > max_thresholds:  # quantiles keep the curve's shape at a bounded cost
        thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, max_thresholds)))
    thresholds = np.concatenate([[np.inf], thresholds[::-1]])  # descending: FPR and PRO grow from (0, 0)

    def above(sorted_values: np.ndarray) -> np.ndarray:
        return 1.0 - np.searchsorted(sorted_values, thresholds, side="left") / sorted_values.size

    fpr = above(normal)
    pro = np.mean([above(r) for r in regions], axis=0)
    area = 0.0
    for f0, p0, f1, p1 in zip(fpr[:-1], pro[:-1], fpr[1:], pro[1:], strict=True):
        if f0 >= max_fpr:
            break
        if f1 > max_fpr:  # cut the last segment at max_fpr
            p1 = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
            f1 = max_fpr
        area += (f1 - f0) * (p0 + p1) / 2
    return float(area / max_fpr)


def classification_scores(pred: torch.Tensor, target: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy (recall) and the confusion matrix (rows: true, columns: predicted)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

    k = len(class_names)
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if k == 1:  # torchmetrics' multiclass metrics need two classes; one class is trivially right
        return {"accuracy": 1.0, "per_type_accuracy": {class_names[0]: 1.0},
                "confusion_matrix": [[int(target.numel())]], "classes": list(class_names), "n": int(target.numel())}
    cm = multiclass_confusion_matrix(pred, target, num_classes=k)
    per_class = multiclass_accuracy(pred, target, num_classes=k, average="none")
    counts = cm.sum(dim=1)
    return {
        "accuracy": float(multiclass_accuracy(pred, target, num_classes=k, average="micro")),
        # a type with no test image has no accuracy
        "per_type_accuracy": {name: (float(per_class[i]) if counts[i] > 0 else None) for i, name in enumerate(class_names)},
        "confusion_matrix": cm.tolist(),
        "classes": list(class_names),
        "n": int(target.numel()),
    }


# ---------------------------------------------------------------- models


def resnet34_classifier(num_classes: int, pretrained: bool) -> nn.Module:
    """torchvision ResNet-34 with a new final layer (ImageNet weights when pretrained)."""
    from torchvision.models import ResNet34_Weights, resnet34

    try:
        model = resnet34(weights=ResNet34_Weights.IMAGENET1K_V1 if pretrained else None)
    except Exception as exc:  # noqa: BLE001 - any download failure gets one message
        raise DefectFillError(
            f"Cannot download torchvision's ImageNet ResNet-34 weights ({exc}). Put resnet34-b627a593.pth in "
            "$TORCH_HOME/hub/checkpoints, or train from scratch with --no-pretrained."
        ) from None
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def unet_localiser(pretrained: bool) -> nn.Module:
    """segmentation-models-pytorch U-Net, ResNet-34 encoder, one output channel (defect logit)."""
    import segmentation_models_pytorch as smp

    try:
        return smp.Unet("resnet34", encoder_weights="imagenet" if pretrained else None, in_channels=3, classes=1)
    except Exception as exc:  # noqa: BLE001
        raise DefectFillError(
            f"Cannot download the ImageNet weights of the U-Net's ResNet-34 encoder ({exc}). "
            "Train from scratch with --no-pretrained, or run once where the download works."
        ) from None


# ---------------------------------------------------------------- training


def _batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _flip(x: torch.Tensor, *more: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random horizontal flip per sample (the one augmentation safe for every defect type)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return tuple(torch.where(flip.view(-1, 1, 1, 1), t.flip(-1), t) for t in (x, *more))


Progress = Callable[[dict[str, Any]], None]


def _fit(
    model: nn.Module,
    n_train: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    settings: DownstreamSettings,
    gen: torch.Generator,
    on_progress: Progress | None,
    desc: str,
) -> list[float]:
    """Adam over shuffled batches for `settings.epochs`; `batch_loss(indices)` gives one batch's loss.

    Returns the mean training loss of each epoch, reported through `on_progress` as it comes.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    losses: list[float] = []
    bar = tqdm(range(settings.epochs), desc=desc)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for idx in _batches(n_train, settings.batch_size, True, gen):
            loss = batch_loss(idx)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_progress:
            on_progress({"status": "training", "epoch": epoch + 1, "epochs": settings.epochs, "train_loss": losses})
    model.eval()
    return losses


def train_classifier(
    train: Sequence[tuple[Path, int]],
    test: Sequence[tuple[Path, int]],
    class_names: Sequence[str],
    settings: DownstreamSettings,
    model_factory: Callable[[int, bool], nn.Module] | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the defect-type classifier on `train` (generated) and score it on `test` (real held-out)."""
    settings.check()
    if not train:
        raise DefectFillError("classify: no generated images to train on.")
    if not test:
        raise DefectFillError("classify: no real held-out images to test on.")
    seed_everything(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    device = torch.device(settings.device)
    size = settings.image_size
    x_train = torch.stack([_image_tensor(p, size) for p, _ in tqdm(train, desc="classify: load", leave=False)])
    y_train = torch.tensor([c for _, c in train])
    x_test = torch.stack([_image_tensor(p, size) for p, _ in test])
    y_test = torch.tensor([c for _, c in test])
    model = (model_factory or resnet34_classifier)(len(class_names), settings.pretrained).to(device)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        (xb,) = _flip(x_train[idx], gen=gen)
        return F.cross_entropy(model(xb.to(device)), y_train[idx].to(device))

    losses = _fit(model, len(train), batch_loss, settings, gen, on_progress, "classify: train")
    preds = []
    with torch.no_grad():
        for idx in _batches(len(test), settings.batch_size, False, gen):
            preds.append(model(x_test[idx].to(device)).argmax(dim=1).cpu())
    result = classification_scores(torch.cat(preds), y_test, class_names)
    result.update(status="done", n_train=len(train), n_test=len(test), train_loss=losses,
                  predictions=[{"image": str(p), "true": class_names[c], "predicted": class_names[int(q)]}
                               for (p, c), q in zip(test, torch.cat(preds), strict=True)])
    return result


def train_localiser(
    train: Sequence[tuple[Path, Path | None]],
    test: Sequence[tuple[Path, Path | None]],
    settings: DownstreamSettings,
    model_factory: Callable[[bool], nn.Module] | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the U-Net on (image, mask-or-None) pairs and score image- and pixel-level detection on `test`.

    A None mask marks a good image (no defect pixel). The image score is the largest pixel probability.
    """
    settings.check()
    if not any(m is not None for _, m in train):
        raise DefectFillError("localize: no generated image/mask pairs to train on.")
    if not any(m is not None for _, m in test):
        raise DefectFillError("localize: no real held-out defect images to test on.")
    if all(m is not None for _, m in test):
        raise DefectFillError("localize: no real good test images; image-level scores need both classes.")
    seed_everything(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    device = torch.device(settings.device)
    size = settings.image_size
    if size % 32:
        raise DefectFillError(f"--image-size must be a multiple of 32 for the U-Net (got {size}).")
    x_train = torch.stack([_image_tensor(p, size) for p, _ in tqdm(train, desc="localize: load", leave=False)])
    m_train = torch.stack([_mask_tensor(m, size, settings.mask_rule) for _, m in train])
    v_train = torch.stack([_valid_tensor(p, size) for p, _ in train])
    x_test = torch.stack([_image_tensor(p, size) for p, _ in test])
    m_test = torch.stack([_mask_tensor(m, size, settings.mask_rule) for _, m in test])
    v_test = torch.stack([_valid_tensor(p, size) for p, _ in test])  # letterbox padding is no part of an image
    model = (model_factory or unet_localiser)(settings.pretrained).to(device)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb, mb, vb = _flip(x_train[idx], m_train[idx], v_train[idx], gen=gen)
        logits = model(xb.to(device))
        mb, vb = mb.to(device), vb.to(device)
        prob = torch.sigmoid(logits) * vb
        # BCE for every image pixel (not the padding) plus soft Dice, since defect pixels are a small minority
        dice = 1 - (2 * (prob * mb).sum() + 1) / (prob.sum() + mb.sum() + 1)
        bce = (F.binary_cross_entropy_with_logits(logits, mb, reduction="none") * vb).sum() / vb.sum()
        return bce + dice

    losses = _fit(model, len(train), batch_loss, settings, gen, on_progress, "localize: train")
    probs = []
    with torch.no_grad():
        for idx in _batches(len(test), settings.batch_size, False, gen):
            probs.append(torch.sigmoid(model(x_test[idx].to(device))).cpu())
    prob = torch.cat(probs) * v_test  # padding scores 0 and is left out of every pixel metric below
    image_scores = prob.flatten(1).max(dim=1).values
    inside = v_test > 0
    # the label is whether the image is a defect sample: a tiny defect may vanish from its resized mask
    image_labels = torch.tensor([int(m is not None) for _, m in test])
    return {
        "status": "done",
        "n_train": len(train),
        "n_train_defect": sum(m is not None for _, m in train),
        "n_test_defect": int(image_labels.sum()),
        "n_test_good": int((image_labels == 0).sum()),
        "image": binary_scores(image_scores, image_labels),
        "pixel": binary_scores(prob[inside], m_test[inside]),
        # at the training resolution; a region smaller than a resized pixel may vanish
        "pro": pro_score(prob[:, 0], m_test[:, 0] > 0.5, valid=inside[:, 0]),
        "pro_max_fpr": 0.3,
        "train_loss": losses,
    }
