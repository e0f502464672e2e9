"""The VisA and MVTec AD 2 layouts, and `defectfill data`, on tiny synthetic trees."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from defectfill.cli import main
from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, make_split, open_layout, read_split

SIZE = 32
# image stem -> label as VisA writes it (names with spaces; several types joined by commas)
VISA_LABELS = {
    "000": "chunk of wax missing",
    "001": "chunk of wax missing",
    "002": "chunk of wax missing",
    "003": "chunk of wax missing",
    "004": "weird candle wick",
    "005": "chunk of wax missing, weird candle wick",
    "006": "damaged corner of packaging,weird candle wick",
}


def _jpg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIZE, SIZE), (value, 100, 50)).save(path)


def _id_mask(path, ids=(1, 2)):
    """A VisA mask: instance ids (1, 2) where the defects are, 0 elsewhere; nothing reaches half the range."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((SIZE, SIZE), np.uint8)
    for k, i in enumerate(ids):
        m[4 + 12 * k:10 + 12 * k, 4:12] = i
    Image.fromarray(m, mode="L").save(path)


def make_visa(root, labels=VISA_LABELS, split_csv=True, annotations=True):
    """A VisA root as released: candle/Data/Images/{Normal,Anomaly}, Data/Masks/Anomaly, image_anno.csv
    (paths relative to the root) and split_csv/1cls.csv."""
    cat = root / "candle"
    rows = ["image,label,mask"]
    for i in range(4):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        _jpg(root / rel, 200)
        rows.append(f"{rel},normal,")
    for stem, label in labels.items():
        rel, mask = f"candle/Data/Images/Anomaly/{stem}.JPG", f"candle/Data/Masks/Anomaly/{stem}.png"
        _jpg(root / rel, 90)
        _id_mask(root / mask)
        rows.append(f'{rel},"{label}",{mask}' if "," in label else f"{rel},{label},{mask}")
    if annotations:
        (cat / "image_anno.csv").write_text("\n".join(rows) + "\n")
    if split_csv:
        split = ["object,split,label,image,mask"]
        split += [f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG," for i in range(3)]
        split += ["candle,test,normal,candle/Data/Images/Normal/0003.JPG,"]
        split += [f"candle,test,anomaly,candle/Data/Images/Anomaly/{s}.JPG,candle/Data/Masks/Anomaly/{s}.png"
                  for s in labels]
        (root / "split_csv").mkdir(parents=True)
        (root / "split_csv" / "1cls.csv").write_text("\n".join(split) + "\n")
    return root


def make_mvtec_ad2(root):
    """An MVTec AD 2 category 'can': train/good, validation/good, test_public/{good,bad,ground_truth/bad},
    test_private (no ground truth)."""
    cat = root / "can"
    for sub, names in [("train/good", ["000_regular", "001_regular"]), ("validation/good", ["000_regular"]),
                       ("test_public/good", ["000_regular"]), ("test_private", ["000_regular"]),
                       ("test_public/bad", ["000_regular", "001_overexposed", "002_shift_1"])]:
        for name in names:
            path = cat / sub / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (SIZE, SIZE), (120, 120, 120)).save(path)
    gt = cat / "test_public" / "ground_truth" / "bad"
    gt.mkdir(parents=True)
    for name in ["000_regular", "001_overexposed", "002_shift_1"]:
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[8:16, 8:16] = 255
        Image.fromarray(m).save(gt / f"{name}_mask.png")
    return root


@pytest.fixture
def visa(tmp_path):
    return make_visa(tmp_path / "visa")


@pytest.fixture
def ad2(tmp_path):
    return make_mvtec_ad2(tmp_path / "ad2")


def test_detection_tells_visa_mvtec_ad2_and_mvtec_apart(visa, ad2, demo_root, tmp_path):
    assert open_layout(visa).name == "visa"
    assert open_layout(ad2).name == "mvtec_ad2"
    assert open_layout(demo_root).name == "mvtec"
    bare = make_visa(tmp_path / "bare", annotations=False, split_csv=False)  # still VisA: its error names the csv
    assert open_layout(bare).name == "visa"
    with pytest.raises(DefectFillError, match="one VisA category: pass --data .*visa --category candle"):
        open_layout(visa / "candle")
    with pytest.raises(DefectFillError, match="one MVTec AD 2 category: pass --data .*ad2 --category can"):
        open_layout(ad2 / "can")


def test_visa_categories_types_and_names_with_spaces(visa):
    layout = open_layout(visa)
    assert layout.categories() == ["candle"]
    # underscore form: the name of folders and of the split; types only on multi-type images are not trainable
    assert layout.defect_types("candle") == ["chunk_of_wax_missing", "weird_candle_wick"]
    assert layout.all_defect_types("candle") == ["chunk_of_wax_missing", "damaged_corner_of_packaging",
                                                 "weird_candle_wick"]
    as_written = layout.defect_samples("candle", "chunk of wax missing")
    assert as_written == layout.defect_samples("candle", "chunk_of_wax_missing")
    assert [s.image.name for s in as_written] == ["000.JPG", "001.JPG", "002.JPG", "003.JPG"]
    assert {s.defect_type for s in as_written} == {"chunk_of_wax_missing"}
    assert as_written[0].mask == visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"


def test_visa_masks_are_read_as_nonzero_and_the_half_range_rule_stays_elsewhere(visa):
    sample = open_layout(visa).defect_samples("candle", "weird candle wick")[0]
    assert sample.mask_rule == "nonzero"
    mask = load_mask(sample.mask, sample.mask_rule)
    assert mask.sum() == 2 * 6 * 8  # both instances (ids 1 and 2)
    assert not load_mask(sample.mask, "half").any()  # the old half-range rule saw nothing in ids 1, 2
    assert load_mask(sample.mask).sum() == 2 * 6 * 8  # the other layouts' "auto" rule reads them as labels
    split = make_split(open_layout(visa), "candle", "chunk of wax missing")
    assert split.skipped_empty == [] and len(split.reference) == 1 and len(split.held_out) == 3
    assert split.defect_type == "chunk_of_wax_missing" and split.mask_rule == "nonzero"


def test_visa_multi_type_images_are_left_out_and_counted(visa, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="defectfill")
    split = make_split(open_layout(visa), "candle", "weird_candle_wick")
    assert [s.image.name for s in split.reference + split.held_out] == ["004.JPG"]
    assert [s.image.name for s in split.multi_type] == ["005.JPG", "006.JPG"]
    assert "2 image(s) also show other defect types; left out" in caplog.text
    split.save(tmp_path / "split.json")
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["mask_rule"] == "nonzero" and len(saved["left_out_multi_type"]) == 2
    again = read_split(tmp_path / "split.json")
    assert again.mask_rule == "nonzero" and again.reference[0].mask_rule == "nonzero"


def test_visa_good_images_follow_the_one_class_split(visa, tmp_path):
    layout = open_layout(visa)
    assert [p.name for p in layout.good_images("candle")] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert [p.name for p in layout.good_test_images("candle")] == ["0003.JPG"]
    without = open_layout(make_visa(tmp_path / "nosplit", split_csv=False))
    assert len(without.good_images("candle")) == 4 and without.good_test_images("candle") == []


def test_mvtec_ad2_bad_type_masks_and_goods(ad2):
    layout = open_layout(ad2)
    assert layout.categories() == ["can"] and layout.defect_types("can") == ["bad"]
    samples = layout.defect_samples("can", "bad")
    assert [(s.image.name, s.mask.name) for s in samples] == [
        ("000_regular.png", "000_regular_mask.png"), ("001_overexposed.png", "001_overexposed_mask.png"),
        ("002_shift_1.png", "002_shift_1_mask.png")]
    assert samples[0].mask_rule == "auto"
    assert [p.name for p in layout.good_images("can")] == ["000_regular.png", "001_regular.png"]
    assert [p.parent.parent.name for p in layout.good_test_images("can")] == ["test_public"]
    split = make_split(layout, "can", "bad")
    assert len(split.reference) == 1 and len(split.held_out) == 2


def _tree(root):
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_data_command_table_and_json_write_nothing(visa, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before, files_here = _tree(visa), set(os.listdir(tmp_path))
    code = main(["data", "--data", str(visa)])
    out = capsys.readouterr().out
    assert code == 1  # the type found only on multi-type images is a problem
    assert "layout visa (masks read as non-zero = defect)" in out
    assert "category candle: 3 good images, 1 good test images" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("chunk_of_wax_missing"))
    assert row == ["chunk_of_wax_missing", "4", "4", "0", "0", "1", "1", "3"]
    assert "damaged_corner_of_packaging" in out and "appears only on 1 image(s) labelled with several" in out
    assert main(["data", "--data", str(visa), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "visa" and report["mask_rule"] == "nonzero"
    types = {t["defect_type"]: t for t in report["categories"][0]["defect_types"]}
    wick = types["weird_candle_wick"]
    assert (wick["images"], wick["masks"], wick["multi_type_images"]) == (1, 1, 2)
    assert wick["split"]["reference"] == [{"image": "candle/Data/Images/Anomaly/004.JPG",
                                           "mask": "candle/Data/Masks/Anomaly/004.png"}]
    assert [p["kind"] for p in report["problems"]] == ["no_images"]
    assert _tree(visa) == before and set(os.listdir(tmp_path)) == files_here


def test_data_command_on_mvtec_ad2_is_clean(ad2, capsys):
    assert main(["data", "--data", str(ad2), "--category", "can", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cat = report["categories"][0]
    assert (report["layout"], cat["good_images"], cat["good_test_images"]) == ("mvtec_ad2", 2, 1)
    assert cat["defect_types"][0]["defect_type"] == "bad" and report["problems"] == []


def test_data_command_counts_empty_masks_and_size_mismatches(ad2, capsys):
    gt = ad2 / "can" / "test_public" / "ground_truth" / "bad"
    Image.new("L", (SIZE, SIZE), 0).save(gt / "000_regular_mask.png")
    Image.new("L", (16, 16), 255).save(gt / "001_overexposed_mask.png")
    assert main(["data", "--data", str(ad2), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    bad = report["categories"][0]["defect_types"][0]
    assert (bad["images"], bad["masks"], bad["empty_masks"], bad["size_mismatches"]) == (3, 3, 1, 1)
    assert [(p["kind"], p["file"].rsplit("/", 1)[-1]) for p in report["problems"]] == [
        ("size", "001_overexposed_mask.png"), ("empty_mask", "000_regular_mask.png")]


def test_visa_without_image_anno_csv_is_named(tmp_path, capsys):
    root = make_visa(tmp_path / "visa", annotations=False)
    with pytest.raises(DefectFillError, match=r"candle/image_anno.csv: not found.*columns image,label,mask"):
        open_layout(root).defect_types("candle")
    assert main(["data", "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "defectfill data: error:" in err and "image_anno.csv: not found" in err and "Traceback" not in err


def test_visa_label_naming_a_missing_mask_is_named(visa, capsys):
    (visa / "candle" / "Data" / "Masks" / "Anomaly" / "002.png").unlink()
    with pytest.raises(DefectFillError, match=r"Anomaly/002.png: mask file not found.*002.JPG.*image_anno.csv"):
        make_split(open_layout(visa), "candle", "chunk of wax missing")
    assert main(["data", "--data", str(visa), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    missing = [p for p in report["problems"] if p["kind"] == "missing_mask"]
    assert len(missing) == 1 and missing[0]["file"].endswith("Masks/Anomaly/002.png")


def test_type_only_on_multi_type_images_is_explained(visa):
    with pytest.raises(DefectFillError, match=r"'damaged corner of packaging' appears only on images labelled with "
                                              r"several types \(1: 006.JPG\).*own: chunk_of_wax_missing, "
                                              r"weird_candle_wick"):
        make_split(open_layout(visa), "candle", "damaged corner of packaging")
    with pytest.raises(DefectFillError, match="unknown defect type 'dent'.*found: chunk_of_wax_missing"):
        open_layout(visa).defect_samples("candle", "dent")


def test_generation_reads_held_out_visa_masks_as_nonzero(visa):
    from defectfill.generate.writer import _item_mask
    from defectfill.outputs.generated import Item

    mask = visa / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    image = Image.new("RGB", (SIZE, SIZE))
    assert _item_mask(Item(0, mask, str(mask), 0, "nonzero"), image, (1.0, 1.0)).any()
    with pytest.raises(DefectFillError, match="empty after resizing"):
        _item_mask(Item(0, mask, str(mask), 0), image, (1.0, 1.0))


def test_train_runs_on_a_visa_tree(visa, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(visa), "--category", "candle", "--defect-type", "chunk of wax missing",
                 "--output", str(out), "--model", str(tiny_model_dir), "--resolution", "64", "--steps", "1",
                 "--batch-size", "1", "--sample-every", "0"])
    assert code == 0, capsys.readouterr().err
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    split = json.loads((out / "split.json").read_text())
    assert (split["layout"], split["defect_type"], split["mask_rule"]) == ("visa", "chunk_of_wax_missing", "nonzero")
    assert [r["image"] for r in split["left_out_multi_type"]] == ["candle/Data/Images/Anomaly/005.JPG"]
    assert json.loads((out / "config.json").read_text())["defect_type"] == "chunk_of_wax_missing"


def test_run_plans_visa_types_under_their_underscore_names(visa):
    from defectfill.run.runner import plan_types

    pairs = plan_types(open_layout(visa), ["candle"], ["chunk of wax missing", "weird_candle_wick"])
    assert pairs == [("candle", "chunk_of_wax_missing"), ("candle", "weird_candle_wick")]


def test_evaluation_reads_visa_masks_as_nonzero(tmp_path, monkeypatch):
    """The report's real-mask row and the localiser's ground truth read VisA's instance ids (1, 2) as defect;
    with the half-range rule both saw empty masks."""
    import defectfill.evaluate.evaluator
    from defectfill.config.stages import EvaluateConfig
    from defectfill.evaluate.metrics.downstream import _mask_tensor
    from defectfill.outputs.report import sample_grid

    labels = {f"{i:03d}": "chunk of wax missing" if i < 3 else "weird candle wick" for i in range(6)}
    visa = make_visa(tmp_path / "visa", labels=labels)
    split = make_split(open_layout(visa), "candle", "chunk_of_wax_missing")
    sample = split.held_out[0]
    assert _mask_tensor(sample.mask, 32, "nonzero").sum() > 0 and _mask_tensor(sample.mask, 32).sum() == 0
    from defectfill.outputs.report import OUTLINE

    grid = np.asarray(sample_grid([(sample.image, sample.mask)], [], tile=32, real_mask_rule="nonzero"))
    assert (grid[4:36, 114:146] == OUTLINE).all(axis=-1).any()  # the real image's defect is outlined
    seen = {}

    def localiser(train, test, settings, factory, on_progress):
        seen["rule"] = settings.mask_rule
        raise RuntimeError("stop")

    monkeypatch.setattr(defectfill.evaluate.evaluator, "train_localiser", localiser)
    generated = tmp_path / "gen"
    for t in ("chunk_of_wax_missing", "weird_candle_wick"):
        (generated / "candle" / "test" / t).mkdir(parents=True)
        (generated / "candle" / "ground_truth" / t).mkdir(parents=True)
        Image.new("RGB", (SIZE, SIZE)).save(generated / "candle" / "test" / t / "000.png")
        Image.new("L", (SIZE, SIZE), 255).save(generated / "candle" / "ground_truth" / t / "000_mask.png")
    config = EvaluateConfig.from_settings({"generated": generated, "output": tmp_path / "eval", "data": visa,
                                           "category": "candle", "downstream": "localize", "kid": False,
                                           "ic_lpips": False, "pretrained": False})
    with pytest.raises(RuntimeError, match="stop"):
        defectfill.evaluate.evaluator.evaluate(config)
    assert seen["rule"] == "nonzero"


@pytest.mark.parametrize("again", ["candle/Data/Images/Anomaly/001.JPG", "./candle/Data/Images/Anomaly/001.JPG",
                                   "Data/Images/Anomaly/001.JPG"])
def test_a_visa_csv_listing_an_image_twice_is_refused(visa, again):
    """Issue 28: listed twice, an image could be a reference and held out at once (an evaluation leak)."""
    csv_path = visa / "candle" / "image_anno.csv"
    with csv_path.open("a") as fh:
        fh.write(f"{again},chunk of wax missing,candle/Data/Masks/Anomaly/001.png\n")
    with pytest.raises(DefectFillError, match=r"image_anno.csv line 13: .*001.JPG is listed again \(first on line 7\)"):
        make_split(open_layout(visa), "candle", "chunk_of_wax_missing")
