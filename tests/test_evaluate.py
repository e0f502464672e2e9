"""`defectfill evaluate`: run and data modes, the report, downstream models and bad input (tiny injected networks)."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import TinyClassifier, abs_distance
from PIL import Image

from defectfill.config.stages import EvaluateConfig, TrainConfig
from defectfill.core.errors import DefectFillError
from defectfill.data import make_split, open_layout
from defectfill.evaluate.evaluator import evaluate as evaluate_config
from defectfill.evaluate.evaluator import evaluate_command
from defectfill.evaluate.metrics import kid
from defectfill.outputs.run_folder import write_run_files


def evaluate(generated, output, *, settings=None, compute_kid=True, compute_ic_lpips=True, feature_extractor=None,
             distance=None, classifier_factory=None, localiser_factory=None, **values):
    """`evaluate` with an EvaluateConfig of these settings (`settings`: the downstream ones) and these networks."""
    if settings is not None:
        values.update(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                      image_size=settings.image_size, seed=settings.seed, pretrained=settings.pretrained,
                      device=settings.device)
    config = EvaluateConfig.from_settings({"generated": generated, "output": output, "kid": compute_kid,
                                           "ic_lpips": compute_ic_lpips, **values})
    return evaluate_config(config, feature_extractor=feature_extractor, distance=distance,
                           classifier_factory=classifier_factory, localiser_factory=localiser_factory)


class PoolFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)


def small_unet(pretrained: bool) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=1)


def make_generated(demo_root, dest, category="disc", types=("scratch", "spot"), n=5, mode="RGB", size=None, shift=30):
    """Fake 'generated' images: the real defect images brightened, with their masks, in the MVTec layout."""
    for t in types:
        srcs = sorted((demo_root / category / "test" / t).glob("*.png"))
        for i in range(n):
            src = srcs[i % len(srcs)]
            arr = np.clip(np.asarray(Image.open(src), dtype=np.int16) + shift + i, 0, 255).astype(np.uint8)
            image = Image.fromarray(arr).convert(mode)
            mask = Image.open(demo_root / category / "ground_truth" / t / f"{src.stem}_mask.png")
            if size is not None:
                image, mask = image.resize((size, size)), mask.resize((size, size), Image.Resampling.NEAREST)
            (dest / category / "test" / t).mkdir(parents=True, exist_ok=True)
            (dest / category / "ground_truth" / t).mkdir(parents=True, exist_ok=True)
            image.save(dest / category / "test" / t / f"{i:03d}.png")
            mask.save(dest / category / "ground_truth" / t / f"{i:03d}_mask.png")
    return dest


@pytest.fixture()
def run_dir(demo_root, tmp_path):
    run = tmp_path / "runs" / "disc-scratch"
    run.mkdir(parents=True)
    config = TrainConfig(data=str(demo_root), category="disc", defect_type="scratch", layout="mvtec", resolution=64,
                         output=str(run))
    write_run_files(run, config, make_split(open_layout(demo_root), "disc", "scratch"))
    return run


def test_evaluate_run_writes_metrics_and_report(demo_root, run_dir, tmp_path):
    from defectfill.outputs.run_folder import append_metrics

    synth = make_generated(demo_root, tmp_path / "synth")
    for step in (1, 2):
        append_metrics(run_dir, {"step": step, "loss": {"total": 1.0 / step}})
    out = tmp_path / "eval"
    metrics = evaluate(synth, out, run=run_dir, feature_extractor=PoolFeatures(), distance=abs_distance,
                       kid_subsets=10, lpips_size=32)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    (item,) = saved["image_metrics"]
    assert (item["category"], item["defect_type"]) == ("disc", "scratch")
    assert item["n_real_held_out"] == 4 and item["n_generated"] == 5 and item["n_references"] == 2
    assert item["kid"]["available"] and item["kid"]["subset_size"] == 4 and item["kid"]["mean"] > 0
    assert item["ic_lpips"]["available"] and sum(item["ic_lpips"]["cluster_sizes"]) == 5
    # the pipeline's KID is the feature-level KID of the same images
    split = make_split(open_layout(demo_root), "disc", "scratch")

    def feats(paths):
        arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        return PoolFeatures()(torch.from_numpy(arr).permute(0, 3, 1, 2))

    gen_paths = sorted((synth / "disc" / "test" / "scratch").glob("*.png"))
    expected = kid(feats([s.image for s in split.held_out]), feats(gen_paths), subset_size=1000, subsets=10, seed=0)
    assert item["kid"]["mean"] == pytest.approx(expected[0]) and item["kid"]["std"] == pytest.approx(expected[1])
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "samples_disc_scratch" in page
    assert "kid.mean_x1e3" in page and "ic_lpips.value" in page and "n_real_held_out" in page
    assert (out / "report.md").is_file() and (out / "samples_disc_scratch.png").is_file()
    # the run's loss curve, the LFS scores of the manifest and the defect areas, each a picture of the report
    # (this folder has no manifest, so no LFS scores to draw)
    assert (out / "losses_disc_scratch.png").is_file() and (out / "areas_disc_scratch.png").is_file()
    assert not (out / "lfs_disc_scratch.png").exists()
    assert "Training losses: disc / scratch" in page and "Defect sizes: real vs generated" in page


def test_evaluate_data_mode_with_downstream_models(demo_root, tmp_path):
    from defectfill.evaluate.metrics.downstream import DownstreamSettings

    synth = make_generated(demo_root, tmp_path / "synth", n=4)
    out = tmp_path / "eval"
    settings = DownstreamSettings(epochs=1, batch_size=4, lr=1e-3, image_size=32, pretrained=False)
    metrics = evaluate(synth, out, data=demo_root, category="disc", downstream="both", settings=settings,
                       feature_extractor=PoolFeatures(), distance=abs_distance, lpips_size=32, kid_subsets=5,
                       classifier_factory=lambda k, p: TinyClassifier(k), localiser_factory=small_unet)
    assert [m["defect_type"] for m in metrics["image_metrics"]] == ["scratch", "spot"]
    cls = metrics["downstream"]["classify"]
    assert cls["status"] == "done" and cls["n_train"] == 8 and cls["n_test"] == 8
    assert set(cls["per_type_accuracy"]) == {"scratch", "spot"} and 0 <= cls["accuracy"] <= 1
    loc = metrics["downstream"]["localize"]
    assert loc["n_train"] == 8 + 6 and loc["n_test_defect"] == 8 and loc["n_test_good"] == 3
    for level in ("image", "pixel"):
        assert all(loc[level][k] is not None for k in ("auroc", "ap", "f1_max"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["downstream"]["localize"]["status"] == "done"
    page = (out / "report.html").read_text()
    assert "confusion_disc" in page and "image.auroc" in page and "pixel.f1_max" in page
    assert "Tested on 8 real images" in page  # too few test images to read small differences
    assert (out / "confusion_disc.png").is_file()
    # the same models trained on the real references only and on real + synthetic, side by side with the gain
    down = metrics["downstream"]
    assert down["classify_real"]["n_train"] == 4 and down["classify_real+synthetic"]["n_train"] == 4 + 8
    assert down["localize_real"]["n_train"] == 4 + 6 and down["localize_real+synthetic"]["n_train"] == 4 + 8 + 6
    assert all(down[k]["n_test"] == 8 for k in ("classify_real", "classify_real+synthetic"))
    comparison = metrics["downstream_comparison"]
    acc = comparison["classify accuracy"]
    assert acc["real"] == down["classify_real"]["accuracy"] and acc["synthetic"] == cls["accuracy"]
    assert acc["gain real+synthetic over real"] == pytest.approx(acc["real+synthetic"] - acc["real"])
    assert comparison["localize image AUROC"]["real"] == down["localize_real"]["image"]["auroc"]
    assert "Defect type classifier: accuracy (trained on real / real+synthetic / synthetic)" in page
    assert "adding the synthetic images" in page and "higher is better" in page


def test_mode_and_size_differences_are_converted_and_said(demo_root, run_dir, tmp_path):
    synth = make_generated(demo_root, tmp_path / "synth", types=("scratch",), mode="L", size=48)
    metrics = evaluate(synth, tmp_path / "eval", run=run_dir, feature_extractor=PoolFeatures(),
                       distance=abs_distance, kid_subsets=3, lpips_size=32)
    notes = " ".join(metrics["image_metrics"][0]["notes"] + metrics["image_metrics"][0]["kid"]["notes"])
    assert "mode L to RGB" in notes and "48x48" in notes and "resized to 32x32" in notes


def test_too_few_generated_images_reports_unavailable(demo_root, run_dir, tmp_path):
    synth = make_generated(demo_root, tmp_path / "synth", types=("scratch",), n=1)
    item = evaluate(synth, tmp_path / "eval", run=run_dir, feature_extractor=PoolFeatures(), distance=abs_distance,
                    lpips_size=32)["image_metrics"][0]
    assert item["kid"]["available"] is False and "at least 2" in item["kid"]["reason"]
    assert item["ic_lpips"]["available"] is False and "value" not in item["ic_lpips"]
    assert "at least 2" in (tmp_path / "eval" / "report.md").read_text()


def test_no_generated_images_for_the_type(demo_root, run_dir, tmp_path):
    synth = make_generated(demo_root, tmp_path / "synth", types=("spot",))
    with pytest.raises(DefectFillError, match="no generated images of disc/scratch"):
        evaluate(synth, tmp_path / "eval", run=run_dir, feature_extractor=PoolFeatures(), distance=abs_distance)


def test_downstream_needs_generated_images_of_every_type(demo_root, tmp_path):
    synth = make_generated(demo_root, tmp_path / "synth", types=("scratch",))
    with pytest.raises(DefectFillError, match="spot"):
        evaluate(synth, tmp_path / "eval", data=demo_root, category="disc", downstream="classify",
                 compute_kid=False, compute_ic_lpips=False)


def test_no_held_out_real_images(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    for p in sorted((data / "disc" / "test" / "scratch").glob("*.png"))[1:]:
        p.unlink()
        (data / "disc" / "ground_truth" / "scratch" / f"{p.stem}_mask.png").unlink()
    synth = make_generated(demo_root, tmp_path / "synth")
    with pytest.raises(DefectFillError, match="no held-out real images"):
        evaluate(synth, tmp_path / "eval", data=data, category="disc", defect_type="scratch",
                 feature_extractor=PoolFeatures(), distance=abs_distance)


def test_missing_inputs(demo_root, tmp_path):
    synth = make_generated(demo_root, tmp_path / "synth")
    with pytest.raises(DefectFillError, match="--run RUN, or --data"):
        evaluate(synth, tmp_path / "eval")
    with pytest.raises(DefectFillError, match="generated folder not found"):
        evaluate(tmp_path / "nope", tmp_path / "eval", data=demo_root, category="disc")
    with pytest.raises(DefectFillError, match="Nothing to evaluate"):
        evaluate(synth, tmp_path / "eval", data=demo_root, category="disc", compute_kid=False,
                 compute_ic_lpips=False)
    with pytest.raises(DefectFillError, match="split file not found"):
        (tmp_path / "emptyrun").mkdir()
        evaluate(synth, tmp_path / "eval", run=tmp_path / "emptyrun")


def _parse(argv):
    parser = argparse.ArgumentParser()
    EvaluateConfig.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments_and_run_evaluate(demo_root, run_dir, tmp_path, monkeypatch, capsys):
    import importlib

    # the package exports the function `kid`, which hides the submodule of that name as an attribute
    kid_module = importlib.import_module("defectfill.evaluate.metrics.kid")
    lpips_module = importlib.import_module("defectfill.model.lpips")

    real_load = lpips_module.load_lpips
    # stand-ins for the downloaded networks; the code path is the command's own
    monkeypatch.setattr(kid_module, "inception_feature_extractor", lambda weights=None, device="cpu": PoolFeatures())
    monkeypatch.setattr(lpips_module, "load_lpips", lambda *a, **k: real_load(pretrained_backbone=False))
    synth = make_generated(demo_root, tmp_path / "synth", types=("scratch",))
    args = _parse(["--generated", str(synth), "--run", str(run_dir), "--output", str(tmp_path / "eval"),
                   "--lpips-size", "64", "--kid-subsets", "5", "--no-pretrained"])
    parsed = EvaluateConfig.from_args(args)
    assert parsed.pretrained is False and parsed.downstream == "none"
    assert evaluate_command(args) == 0
    printed = capsys.readouterr().out
    assert "disc/scratch: KID" in printed and "x10^3" in printed and "IC-LPIPS" in printed
    assert (tmp_path / "eval" / "report.html").is_file()
    bad = _parse(["--generated", str(synth), "--run", str(run_dir), "--output", str(tmp_path / "e2"),
                  "--kid-subset-size", "1"])
    with pytest.raises(DefectFillError, match="--kid-subset-size"):
        evaluate_command(bad)
    bad = _parse(["--generated", str(synth), "--data", str(demo_root), "--category", "disc",
                  "--output", str(tmp_path / "e3"), "--epochs", "0"])
    with pytest.raises(DefectFillError, match="--epochs"):
        evaluate_command(bad)


def test_run_with_moved_dataset_uses_data(demo_root, run_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(demo_root, moved)
    split = json.loads((run_dir / "split.json").read_text())
    split["data_root"] = str(tmp_path / "gone")  # both recorded places of the data are stale
    split["data_root_from_split"] = str(tmp_path / "gone")
    (run_dir / "split.json").write_text(json.dumps(split))
    synth = make_generated(demo_root, tmp_path / "synth", types=("scratch",))
    with pytest.raises(DefectFillError, match="--data"):
        evaluate(synth, tmp_path / "eval", run=run_dir, feature_extractor=PoolFeatures(), distance=abs_distance)
    metrics = evaluate(synth, tmp_path / "eval", run=run_dir, data=moved, feature_extractor=PoolFeatures(),
                       distance=abs_distance, lpips_size=32, kid_subsets=2)
    assert metrics["image_metrics"][0]["n_real_held_out"] == 4
    assert metrics["settings"]["data"] == str(moved.resolve())


def test_localiser_refuses_generated_images_without_masks(demo_root, tmp_path):
    synth = make_generated(demo_root, tmp_path / "synth")
    victim = synth / "disc" / "ground_truth" / "spot" / "002_mask.png"
    victim.unlink()
    with pytest.raises(DefectFillError, match="002.png: generated image has no mask"):
        evaluate(synth, tmp_path / "eval", data=demo_root, category="disc", downstream="localize",
                 compute_kid=False, compute_ic_lpips=False)


class FailsOnSecondEpoch(TinyClassifier):
    """Trains one epoch, then crashes: what was computed before must already be on disk."""

    calls = 0

    def forward(self, x):
        FailsOnSecondEpoch.calls += 1
        if FailsOnSecondEpoch.calls > 2:  # 8 images, batch 4: two calls per epoch
            raise RuntimeError("simulated crash")
        return super().forward(x)


def test_results_are_saved_as_they_come(demo_root, tmp_path):
    from defectfill.evaluate.metrics.downstream import DownstreamSettings

    synth = make_generated(demo_root, tmp_path / "synth", n=4)
    settings = DownstreamSettings(epochs=3, batch_size=4, image_size=32, pretrained=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(synth, tmp_path / "eval", data=demo_root, category="disc", downstream="classify",
                 settings=settings, feature_extractor=PoolFeatures(), distance=abs_distance, lpips_size=32,
                 kid_subsets=2, classifier_factory=lambda k, p: FailsOnSecondEpoch(k))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [m["defect_type"] for m in saved["image_metrics"]] == ["scratch", "spot"]
    assert saved["image_metrics"][0]["kid"]["available"]
    # the first model trained is the real-only baseline (4 references, one batch an epoch: it dies in epoch 3)
    progress = saved["downstream"]["classify_real"]
    assert progress["status"] == "training" and progress["epoch"] == 2 and len(progress["train_loss"]) == 2


def test_unreadable_inception_weights_file(tmp_path):
    from defectfill.evaluate.metrics.kid import inception_feature_extractor

    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DefectFillError, match="cannot read Inception weights"):
        inception_feature_extractor(bad)
    with pytest.raises(DefectFillError, match="not found"):
        inception_feature_extractor(tmp_path / "missing.pth")


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from defectfill.cli import main

    rc = main(["evaluate", "--generated", str(tmp_path / "nope"), "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and "generated folder not found" in err and "Traceback" not in err
