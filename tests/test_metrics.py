"""KID, IC-LPIPS, the downstream scores and trainers, and the report files (CPU, tiny injected networks)."""

from __future__ import annotations

import base64
import itertools
import json
import re
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import TinyClassifier
from PIL import Image

from defectfill.core.errors import DefectFillError
from defectfill.evaluate.metrics import ic_lpips, ic_lpips_details, kid, kid_images
from defectfill.evaluate.metrics.kid import kid_subset_plan


class PoolFeatures(nn.Module):
    """A weight-free 'feature network': uint8 (N,3,H,W) -> 4x4 average-pooled colours (48-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)


def numpy_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: the unbiased MMD^2 with k(a,b) = (a.b/d + 1)^3, written as explicit pair sums."""
    m, d = x.shape

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


# ---------------------------------------------------------------- KID


def test_kid_equals_independent_unbiased_mmd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    y = rng.normal(0.5, 1.2, size=(12, 5))
    mean, std = kid(x, y, subset_size=100, subsets=10)
    assert mean == pytest.approx(numpy_unbiased_mmd2(x, y), rel=1e-9)
    assert std == 0.0  # the subsets all cover both whole sets


def test_kid_subset_sampling_matches_torchmetrics():
    """Pins the subset sampling itself, with subsets smaller than both sets: each subset draws a permutation of the
    real set then one of the generated set, as torchmetrics' KID does (with the same seed, the same subsets), and
    the mean and population std over subsets equal its values. (Bounding the mean by the range of subset MMDs, the
    old test, passed on any sampling.)"""
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(40, 6)), dtype=torch.float64)
    y = torch.tensor(rng.normal(0.4, 1.3, size=(30, 6)), dtype=torch.float64)
    metric = KernelInceptionDistance(feature=nn.Identity(), subset_size=9, subsets=25)
    metric.update(x, real=True)
    metric.update(y, real=False)
    torch.manual_seed(3)  # torchmetrics draws its subsets from the global generator
    tm_mean, tm_std = metric.compute()
    mean, std = kid(x, y, subset_size=9, subsets=25, seed=3)
    assert mean == pytest.approx(float(tm_mean), rel=1e-9) and std == pytest.approx(float(tm_std), rel=1e-9)
    # each subset is an unbiased MMD of 9 real and 9 generated samples, independently drawn
    gen = torch.Generator().manual_seed(3)
    subsets = []
    for _ in range(25):
        a, b = torch.randperm(40, generator=gen)[:9], torch.randperm(30, generator=gen)[:9]
        subsets.append(numpy_unbiased_mmd2(x[a].numpy(), y[b].numpy()))
    assert mean == pytest.approx(np.mean(subsets), rel=1e-9) and std == pytest.approx(np.std(subsets), rel=1e-9)
    assert kid(x, y, subset_size=9, subsets=25, seed=4) != (mean, std)  # the seed picks the subsets


def test_kid_matches_torchmetrics_on_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(16, 6)), dtype=torch.float64)
    y = torch.tensor(rng.normal(0.3, 1.0, size=(16, 6)), dtype=torch.float64)
    metric = KernelInceptionDistance(feature=nn.Identity(), subset_size=16, subsets=3)
    metric.update(x, real=True)
    metric.update(y, real=False)
    tm_mean, _ = metric.compute()
    assert kid(x, y, subset_size=16, subsets=3)[0] == pytest.approx(float(tm_mean), rel=1e-6)


def test_kid_near_zero_same_distribution_positive_for_different():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 8))
    b = rng.normal(size=(200, 8))
    c = rng.normal(1.0, 2.0, size=(200, 8))
    same, same_std = kid(a, b, subset_size=100, subsets=50)
    diff, _ = kid(a, c, subset_size=100, subsets=50)
    assert abs(same) < 3 * same_std + 0.05
    assert diff > 10 * abs(same) and diff > 0.5


def test_kid_subset_plan_adapts_to_small_sets():
    assert kid_subset_plan(5000, 4000, 1000, 100) == (1000, 100)
    assert kid_subset_plan(30, 50, 1000, 100) == (30, 100)
    assert kid_subset_plan(30, 30, 1000, 100) == (30, 1)  # every subset would be the same whole set


def test_kid_too_few_or_mismatched_features_is_an_error():
    with pytest.raises(DefectFillError, match="at least 2"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(DefectFillError, match="same D"):
        kid(np.zeros((3, 4)), np.zeros((3, 5)))


def _images(n, size, colour, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.clip(rng.normal(colour, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr).convert(mode))
    return out


def test_kid_images_reports_subset_size_and_conversions():
    real = _images(6, 32, 100)
    fake = _images(4, 48, 180, mode="L", seed=1)
    rec = kid_images(real, fake, feature_extractor=PoolFeatures(), subset_size=1000, subsets=20)
    assert rec["available"] and rec["subset_size"] == 4 and rec["subsets"] == 20
    assert rec["mean"] > 0 and rec["mean_x1e3"] == pytest.approx(rec["mean"] * 1e3)
    notes = " ".join(rec["notes"])
    assert "mode L" in notes and "48x48" in notes and "subset size reduced from 1000 to 4" in notes


def test_kid_images_too_few_is_unavailable_not_a_number():
    rec = kid_images(_images(5, 32, 100), _images(1, 32, 100), feature_extractor=PoolFeatures())
    assert rec["available"] is False and "at least 2" in rec["reason"]
    assert "mean" not in rec


def test_inception_download_failure_is_a_clear_error(monkeypatch):
    import torchmetrics.image.fid as fid

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fid, "NoTrainInceptionV3", no_network)
    with pytest.raises(DefectFillError, match="weights-inception-2015-12-05-6726825d.pth"):
        kid_images(_images(3, 32, 100), _images(3, 32, 100))


# ---------------------------------------------------------------- IC-LPIPS


def _scalar_images(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def _abs_distance(a, b):
    return (a - b).abs().flatten(1).mean(dim=1)


def test_ic_lpips_hand_worked_value_and_differs_from_pairwise():
    refs = _scalar_images([0.0, 10.0])
    gens = _scalar_images([1.0, 2.0, 4.0, 9.0, 12.0])
    # clusters: {1, 2, 4} around 0 -> pairs 1, 3, 2 -> mean 2; {9, 12} around 10 -> 3; IC = (2 + 3) / 2
    assert ic_lpips(gens, refs, _abs_distance) == pytest.approx(2.5)
    values = [1, 2, 4, 9, 12]
    pairwise = np.mean([abs(a - b) for a, b in itertools.combinations(values, 2)])
    assert pairwise == pytest.approx(5.8) and abs(pairwise - 2.5) > 1
    rec = ic_lpips_details(gens, refs, _abs_distance)
    assert rec["cluster_sizes"] == [3, 2] and rec["clusters_used"] == 2


def test_ic_lpips_reports_both_dfmgan_values_and_caps_clusters():
    """Pins IC-LPIPS as DFMGAN computes it: the headline counts a cluster without a pair as 0 (clpips), the second
    value leaves such clusters out (clpips_rz), and a cluster keeps its first `max_per_cluster` images."""
    refs = _scalar_images([0.0, 10.0, 20.0])
    gens = _scalar_images([1.0, 3.0, 19.0])  # clusters {1, 3}, {}, {19}
    rec = ic_lpips_details(gens, refs, _abs_distance)
    assert rec["cluster_means"] == [pytest.approx(2.0), None, None]
    assert rec["value"] == pytest.approx(2.0 / 3) and rec["value_excluding_singletons"] == pytest.approx(2.0)
    assert "count as 0" in rec["headline"] and rec["cluster_cap"] == 200 and rec["dropped_by_cap"] == 0
    assert ic_lpips(gens, refs, _abs_distance) == pytest.approx(2.0 / 3)
    # cap 3: the cluster around 0 keeps 1, 4, 2 (the first three in order; pairs 3, 1, 2) and drops 3 and 0.5
    many = _scalar_images([1.0, 4.0, 2.0, 3.0, 0.5, 11.0, 14.0])
    capped = ic_lpips_details(many, refs[:2], _abs_distance, max_per_cluster=3)
    assert capped["cluster_sizes"] == [3, 2] and capped["dropped_by_cap"] == 2
    assert capped["cluster_means"] == [pytest.approx(2.0), pytest.approx(3.0)]
    assert capped["value"] == pytest.approx(2.5) == capped["value_excluding_singletons"]
    assert ic_lpips_details(many, refs[:2], _abs_distance)["cluster_means"][0] == pytest.approx(
        np.mean([abs(a - b) for a, b in itertools.combinations([1, 4, 2, 3, 0.5], 2)]))
    lonely = _scalar_images([1.0, 11.0])  # one image per cluster: no pair anywhere
    assert ic_lpips_details(lonely, refs, _abs_distance)["available"] is False
    with pytest.raises(DefectFillError, match="at least 2 generated"):
        ic_lpips(gens[:1], refs, _abs_distance)


def test_ic_lpips_with_the_lpips_network():
    from defectfill.evaluate.metrics.ic_lpips import lpips_distance_fn
    from defectfill.model.lpips import load_lpips

    torch.manual_seed(0)
    distance = lpips_distance_fn(load_lpips(pretrained_backbone=False))
    refs = torch.rand(2, 3, 64, 64) * 2 - 1
    gens = (refs.repeat(3, 1, 1, 1) + 0.1 * torch.randn(6, 3, 64, 64)).clamp(-1, 1)
    value = ic_lpips(gens, refs, distance)
    assert 0 < value < 1


# ---------------------------------------------------------------- downstream scores and trainers


def test_binary_scores_hand_worked():
    from defectfill.evaluate.metrics.downstream import binary_scores

    s = binary_scores(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert s["auroc"] == pytest.approx(0.75)
    assert s["ap"] == pytest.approx(5 / 6)
    assert s["f1_max"] == pytest.approx(0.8)  # threshold 0.35: precision 2/3, recall 1
    one_class = binary_scores(torch.tensor([0.2, 0.9]), torch.tensor([0, 0]))
    assert one_class["auroc"] is None and one_class["f1_max"] is None


def test_pro_hand_worked():
    from defectfill.evaluate.metrics.downstream import pro_score

    # one 1x13 image: region A = pixels 0-1 (score 1), region B = pixel 3 (score 0.5);
    # the 10 defect-free pixels score 0 except pixels 2 and 4 (0.75, i.e. 20% of them)
    mask = np.zeros((1, 1, 13), bool)
    mask[0, 0, [0, 1, 3]] = True
    score = np.zeros((1, 1, 13))
    score[0, 0, [0, 1]] = 1.0
    score[0, 0, 3] = 0.5
    score[0, 0, [2, 4]] = 0.75
    # curve (FPR, PRO): (0, 0.5) -> (0.2, 0.5) -> (0.2, 1) -> (1, 1); area to 0.3 = 0.2*0.5 + 0.1*1 = 0.2
    assert pro_score(score, mask) == pytest.approx(0.2 / 0.3)
    # tensors work as arrays do
    assert pro_score(torch.tensor(score), torch.tensor(mask)) == pytest.approx(0.2 / 0.3)
    assert pro_score(mask.astype(float), mask) == pytest.approx(1.0)
    assert pro_score(1.0 - mask, mask) == pytest.approx(0.0)
    assert pro_score(score, np.zeros_like(mask)) is None


def test_pro_regions_are_eight_connected():
    """Pins PRO's regions as MVTec AD's evaluation labels them (8-connected): a defect pixel touching another only
    diagonally belongs to its region. 4 x 4 map: defect pixels a = (0, 0) (score 1), b = (1, 1) and c = (1, 2)
    (score 0.2); one of the 13 defect-free pixels scores 0.5, the rest 0.
    8-connected, one region {a, b, c}: curve (0, 0) -> (0, 1/3) -> (1/13, 1/3) -> (1/13, 1) -> (1, 1);
    area to FPR 0.3 = (1/13) * (1/3) + (0.3 - 1/13) * 1. (4-connected, {a} and {b, c}, the second point is 1/2.)"""
    from defectfill.evaluate.metrics.downstream import pro_score

    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    score = np.zeros((1, 4, 4))
    score[0, 0, 0] = 1.0
    score[0, 1, 1] = score[0, 1, 2] = 0.2
    score[0, 3, 3] = 0.5
    assert pro_score(score, mask) == pytest.approx(((1 / 13) * (1 / 3) + (0.3 - 1 / 13)) / 0.3)
    # pixels outside `valid` (letterbox padding) are neither regions nor false positives
    padded = np.zeros((1, 4, 6), bool), np.zeros((1, 4, 6)), np.zeros((1, 4, 6), bool)
    padded[0][:, :, :4], padded[1][:, :, :4], padded[2][:, :, :4] = mask, score, True
    padded[1][:, :, 4:] = 0.9  # high scores on the padding change nothing
    assert pro_score(padded[1], padded[0], valid=padded[2]) == pytest.approx(pro_score(score, mask))


def test_f1_max_hand_worked_on_pixel_maps():
    """F1-max is the best F1 over every threshold, on (N, 1, H, W) maps as the localiser passes them. Scores
    0.9 .. 0.4 with labels 1 0 1 1 0 0: thresholds give F1 1/2, 2/5, 2/3, 6/7 (at 0.6: precision 3/4, recall 1),
    3/4, 2/3; the F1 at a 0.5 threshold would be 3/4."""
    from defectfill.evaluate.metrics.downstream import binary_scores

    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]).view(1, 1, 2, 3)
    labels = torch.tensor([1, 0, 1, 1, 0, 0]).view(1, 1, 2, 3)
    s = binary_scores(scores, labels)
    assert s["f1_max"] == pytest.approx(6 / 7)
    assert s["auroc"] == pytest.approx(7 / 9) and s["n_positive"] == 3


def test_downstream_images_are_letterboxed_not_stretched(tmp_path):
    """Pins the inspection models' input: a 64x32 image goes into a 32 px square as 32x16 rows in the middle,
    padded with the ImageNet mean (0 after normalisation), its mask alike; no longer stretched to 32x32."""
    from defectfill.evaluate.metrics.downstream import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        _image_tensor,
        _mask_tensor,
        _valid_tensor,
    )

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    mask = np.zeros((32, 64), np.uint8)
    mask[8:24, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "wide_mask.png")
    x = _image_tensor(tmp_path / "wide.png", 32)
    v = _valid_tensor(tmp_path / "wide.png", 32)
    m = _mask_tensor(tmp_path / "wide_mask.png", 32)
    assert x.shape == (3, 32, 32) and (x[:, :8] == 0).all() and (x[:, 24:] == 0).all()
    assert v[0, 8:24].all() and v.sum() == 32 * 16
    small = np.asarray(Image.fromarray(arr).resize((32, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (torch.from_numpy(small).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[:, 8:24], expected, atol=1e-5, rtol=1e-5)
    ys, xs = torch.nonzero(m[0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 19, 5, 9)


def test_classification_scores_hand_worked():
    from defectfill.evaluate.metrics.downstream import classification_scores

    s = classification_scores(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["per_type_accuracy"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.5})
    assert s["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.fixture()
def settings():
    from defectfill.evaluate.metrics.downstream import DownstreamSettings

    return DownstreamSettings(epochs=2, batch_size=4, lr=1e-3, image_size=32, seed=0, pretrained=False)


def test_classifier_trains_and_its_metrics_match_torchmetrics(demo_root, settings):
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

    from defectfill.evaluate.metrics.downstream import _image_tensor, train_classifier

    types = ["scratch", "spot"]
    paths = {t: sorted((demo_root / "disc" / "test" / t).glob("*.png")) for t in types}
    train = [(p, i) for i, t in enumerate(types) for p in paths[t][:4]]
    test = [(p, i) for i, t in enumerate(types) for p in paths[t][4:]]
    made = []

    def factory(k, pretrained):
        assert pretrained is False
        made.append(TinyClassifier(k))
        return made[-1]

    before = [p.clone() for p in TinyClassifier(2).parameters()]
    progress = []
    result = train_classifier(train, test, types, settings, factory, progress.append)
    assert len(result["train_loss"]) == 2 and progress[-1]["epoch"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, made[0].parameters(), strict=True))  # it trained
    with torch.no_grad():
        pred = made[0].eval()(torch.stack([_image_tensor(p, 32) for p, _ in test])).argmax(1)
    target = torch.tensor([c for _, c in test])
    assert result["accuracy"] == pytest.approx(float(multiclass_accuracy(pred, target, num_classes=2, average="micro")))
    assert result["confusion_matrix"] == multiclass_confusion_matrix(pred, target, num_classes=2).tolist()


def test_resnet34_classifier_one_step(settings):
    from defectfill.evaluate.metrics.downstream import resnet34_classifier

    model = resnet34_classifier(3, pretrained=False)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    assert model.fc.out_features == 3 and torch.isfinite(loss)


def small_unet(pretrained: bool) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=1)


def test_localiser_trains_and_its_metrics_match_torchmetrics(demo_root, settings):
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    from defectfill.evaluate.metrics.downstream import _image_tensor, _mask_tensor, train_localiser

    cat = demo_root / "disc"
    pairs = [(p, cat / "ground_truth" / "scratch" / f"{p.stem}_mask.png")
             for p in sorted((cat / "test" / "scratch").glob("*.png"))]
    good = sorted((cat / "train" / "good").glob("*.png"))
    good_test = sorted((cat / "test" / "good").glob("*.png"))
    train = pairs[:4] + [(p, None) for p in good[:2]]
    test = pairs[4:] + [(p, None) for p in good_test]
    made = []

    def factory(pretrained):
        made.append(small_unet(pretrained))
        return made[-1]

    result = train_localiser(train, test, settings, factory)
    with torch.no_grad():
        prob = torch.sigmoid(made[0].eval()(torch.stack([_image_tensor(p, 32) for p, _ in test])))
    masks = torch.stack([_mask_tensor(m, 32) for _, m in test]).long()
    labels = torch.tensor([0 if m is None else 1 for _, m in test])
    image_scores = prob.flatten(1).max(1).values
    assert result["image"]["auroc"] == pytest.approx(float(binary_auroc(image_scores, labels)), abs=1e-6)
    assert result["pixel"]["ap"] == pytest.approx(float(binary_average_precision(prob.flatten(), masks.flatten())),
                                                  abs=1e-6)
    assert result["n_test_defect"] == 2 and result["n_test_good"] == 3
    assert 0 <= result["pixel"]["f1_max"] <= 1
    from defectfill.evaluate.metrics.downstream import pro_score

    assert result["pro"] == pytest.approx(pro_score(prob[:, 0], masks[:, 0] > 0))


def test_downstream_bad_settings_and_inputs(settings, demo_root):
    from defectfill.evaluate.metrics.downstream import DownstreamSettings, train_classifier, train_localiser

    with pytest.raises(DefectFillError, match="--epochs"):
        DownstreamSettings(epochs=0).check()
    with pytest.raises(DefectFillError, match="no generated images"):
        train_classifier([], [(demo_root, 0)], ["a"], settings, lambda k, p: TinyClassifier(k))
    img = next((demo_root / "disc" / "test" / "scratch").glob("*.png"))
    mask = demo_root / "disc" / "ground_truth" / "scratch" / f"{img.stem}_mask.png"
    with pytest.raises(DefectFillError, match="good test images"):
        train_localiser([(img, mask)], [(img, mask)], settings, small_unet)


# ---------------------------------------------------------------- report


def test_report_files_name_every_metric_and_embed_the_grid(tmp_path, demo_root):
    from defectfill.outputs.report import confusion_picture, sample_grid, write_report

    cat = demo_root / "disc"
    pairs = [(p, cat / "ground_truth" / "spot" / f"{p.stem}_mask.png") for p in sorted((cat / "test" / "spot").glob("*.png"))]
    grid = sample_grid(pairs[:3], pairs[3:], n=3, tile=32)
    assert grid.size[1] == 4 * 36 + 4  # real, its close-ups (the spots are small), generated, its close-ups
    metrics = {
        "settings": {"category": "disc", "kid_subsets": 100},
        "image_metrics": [{
            "category": "disc", "defect_type": "spot", "n_real_held_out": 4, "n_generated": 3,
            "kid": {"available": True, "mean": 0.0123, "std": 0.001, "mean_x1e3": 12.3, "std_x1e3": 1.0,
                    "subset_size": 3, "subsets": 1},
            "ic_lpips": {"available": False, "reason": "IC-LPIPS needs a cluster with at least 2 generated images"},
            "notes": ["resized images of size 48x48 to 64x64"],
        }],
        "downstream": {
            "classify": {"accuracy": 0.5, "per_type_accuracy": {"spot": 1.0, "scratch": 0.0}},
            "localize": {"image": {"auroc": 0.9, "ap": 0.8, "f1_max": 0.7}, "pixel": {"auroc": 0.95, "ap": 0.6,
                                                                                      "f1_max": 0.55}, "pro": 0.42},
        },
    }
    paths = write_report(tmp_path / "eval", metrics,
                         {"samples_disc_spot": grid, "confusion_disc": confusion_picture([[1, 1], [0, 2]], ["a", "b"])})
    assert json.loads(paths["metrics"].read_text()) == metrics
    page = paths["html"].read_text()
    md = paths["markdown"].read_text()
    # every recorded value stays in the report under its metrics.json key (a collapsed section)
    for name in ["kid.mean", "kid.mean_x1e3", "kid.subset_size", "ic_lpips.reason", "accuracy",
                 "per_type_accuracy.spot", "image.auroc", "pixel.ap", "pixel.f1_max", "pro", "kid_subsets", "48x48",
                 "Realism gap (KID x 10^3)", "Diversity (IC-LPIPS)",
                 "Defect localiser: pixel AUROC / AP / F1-max (trained on synthetic)"]:
        assert name in page and name in md, name
    assert "12.300 ± 1.000" in page and "0.0123" in md and "0.42" in md
    assert "unavailable: IC-LPIPS needs a cluster" in md
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == 2
    assert base64.b64decode(embedded[0]) == (tmp_path / "eval" / "samples_disc_spot.png").read_bytes()
    assert "<img" in page and "src='samples" not in page  # nothing linked: the page stands alone
    assert "](samples_disc_spot.png)" in md


def _kid_item(n_real: int, mean: float, std: float, sizes: list[int]) -> dict:
    n_gen = sum(sizes)
    return {"category": "disc", "defect_type": "spot", "n_real_held_out": n_real, "n_generated": n_gen,
            "n_references": len(sizes), "notes": [],
            "kid": {"available": True, "n_real": n_real, "n_generated": n_gen, "mean": mean / 1e3, "std": std / 1e3,
                    "mean_x1e3": mean, "std_x1e3": std, "subset_size": min(n_real, n_gen), "subsets": 20},
            "ic_lpips": {"available": True, "n_generated": n_gen, "n_references": len(sizes), "cluster_sizes": sizes,
                         "value": 0.1, "value_excluding_singletons": 0.2}}


def test_report_says_direction_sample_and_cautions_on_small_samples(tmp_path):
    """The demo's case (KID -9.25 ± 27.46 on 4 real images, clusters 8, 0) is read with its direction, its
    sample and a caution each; 60 real images spread over both references carry none of them."""
    from defectfill.outputs.report import write_report

    small = write_report(tmp_path / "small", {"settings": {"selection_lpips": "untrained AlexNet"},
                                              "image_metrics": [_kid_item(4, -9.25, 27.46, [8, 0])]}, {})
    page, md = small["html"].read_text(), small["markdown"].read_text()
    for text in (page, md):
        assert "lower is better" in text and "higher is better" in text
        assert "4 real held-out, 8 generated images" in text and "group sizes 8, 0" in text
        assert "Unreliable: KID on 4 images per side" in text
        assert "negative KID is not &#39;better than perfect&#39;" in text or "negative KID is not 'better" in text
        assert "Diversity warning" in text and "untrained (random) AlexNet" in text
    assert "-9.250 ± 27.460" in page
    large = write_report(tmp_path / "large", {"settings": {"selection_lpips": "AlexNet"},
                                              "image_metrics": [_kid_item(60, 4.0, 1.0, [30, 30])]}, {})
    page = large["html"].read_text()
    assert "lower is better" in page and "60 real held-out" in page
    for caution in ("Unreliable", "negative KID", "Diversity warning", "untrained", "spread (±) is larger"):
        assert caution not in page, caution


def test_report_escapes_names_from_the_data(tmp_path):
    """A defect type named like HTML is shown as text: the template engine escapes it."""
    from defectfill.outputs.report import write_report

    item = _kid_item(60, 4.0, 1.0, [30, 30]) | {"defect_type": "<script>x</script>"}
    page = write_report(tmp_path / "e", {"settings": {}, "image_metrics": [item]}, {})["html"].read_text()
    assert "<script>x" not in page and "&lt;script&gt;x" in page


def test_charts_draw_their_data(tmp_path):
    """The loss curve draws one coloured line per loss; the LFS histogram counts chosen and other candidates;
    the area plot has both groups; nothing to draw gives no picture."""
    import numpy as np

    from defectfill.outputs.charts import COLOURS
    from defectfill.outputs.report import area_picture, lfs_picture, loss_picture

    rows = [{"step": s, "loss": {"defect": 1.0 / s, "total": 2.0 / s}} for s in (1, 2, 3)]
    curve = np.asarray(loss_picture(rows))
    for colour in COLOURS[:2]:
        assert (curve == colour).all(axis=-1).sum() > 50, colour  # a line (and its legend box) in each colour
    assert (curve == COLOURS[2]).all(axis=-1).sum() == 0
    assert loss_picture([]) is None and lfs_picture([]) is None and area_picture([], []) is None
    lfs = lfs_picture([{"scores": [0.1, 0.5], "chosen": 1}, {"scores": [0.2, 0.6, 0.3], "chosen": 1}])
    assert lfs is not None and (np.asarray(lfs) == COLOURS[1]).all(axis=-1).sum() > 0
    assert area_picture([1.0, 2.0], [1.5]) is not None


def test_sample_grid_outlines_the_defect_and_crops_a_small_one(tmp_path):
    """The contour is drawn around the mask (not over it) and a small defect gets a close-up row; a large one
    needs none."""
    import numpy as np
    from PIL import Image

    from defectfill.outputs.report import OUTLINE, sample_grid

    img = np.full((64, 64, 3), 200, np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    small = np.zeros((64, 64), np.uint8)
    small[30:34, 30:34] = 255
    Image.fromarray(small).save(tmp_path / "small.png")
    big = np.zeros((64, 64), np.uint8)
    big[4:60, 4:60] = 255
    Image.fromarray(big).save(tmp_path / "big.png")
    grid = np.asarray(sample_grid([(tmp_path / "a.png", tmp_path / "small.png")], [], tile=64))
    assert grid.shape[0] == 4 + 3 * (64 + 4)  # real, its close-up, an empty generated row
    tile = grid[4:68, 114:178]
    assert (tile == OUTLINE).all(axis=-1).sum() > 0 and (tile[31:33, 31:33] == 200).all()  # defect untouched
    close = grid[72:136, 114:178]
    assert (close == OUTLINE).all(axis=-1).sum() > (tile == OUTLINE).all(axis=-1).sum()  # magnified
    grid = np.asarray(sample_grid([(tmp_path / "a.png", tmp_path / "big.png")], [], tile=64))
    assert grid.shape[0] == 4 + 2 * (64 + 4)  # no close-up row
