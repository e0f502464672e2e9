"""Annotation imports (issue 26, part 2): the demo's own defects saved as a COCO export (RLE and polygons), YOLO
segmentation, CVAT "Segmentation mask 1.1" and a Label Studio JSON export (brush RLE and polygons) are each
detected, listed by `defectfill data` with both types, split, and read back as the very masks they came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectfill.cli import main
from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, make_split, open_layout, read_split
from defectfill.data.images import mask_file

pycocotools = pytest.importorskip("pycocotools.mask")

TYPES = ("scratch", "spot")


def _demo(demo_root):
    """{type: [(image, mask array)]} of the demo disc, and its good images."""
    disc = demo_root / "disc"
    out = {}
    for t in TYPES:
        out[t] = [(p, load_mask(disc / "ground_truth" / t / f"{p.stem}_mask.png"))
                  for p in sorted((disc / "test" / t).glob("*.png"))]
    return out, sorted((disc / "train" / "good").glob("*.png"))[:3]


def _copy_images(root, demo, good, folder="images"):
    """Copy every image under root/folder as <type>_<stem>.png; good ones as good_<stem>.png."""
    (root / folder).mkdir(parents=True)
    names = {}
    for t, items in demo.items():
        for image, _ in items:
            name = f"{t}_{image.stem}.png"
            shutil.copyfile(image, root / folder / name)
            names[name] = image
    for image in good:
        shutil.copyfile(image, root / folder / f"good_{image.stem}.png")
    return names


def _square(size=64, box=(10, 12, 30, 40)):
    m = np.zeros((size, size), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def _runs(mask):
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros), as CVAT writes masks."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


@pytest.fixture
def coco(demo_root, tmp_path):
    demo, good = _demo(demo_root)
    root = tmp_path / "coco"
    names = _copy_images(root, demo, good)
    images, annotations = [], []
    categories = [{"id": 1, "name": "scratch"}, {"id": 2, "name": "spot"}, {"id": 3, "name": "unused"}]
    expected = {}
    for k, name in enumerate(sorted(list(names) + [f"good_{g.stem}.png" for g in good]), start=1):
        images.append({"id": k, "file_name": name, "width": 64, "height": 64})
        t = name.split("_")[0]
        if t == "good":
            continue
        mask = dict(demo[t])[names[name]]
        expected[name] = mask
        if t == "scratch":  # CVAT's way with masks: uncompressed RLE, iscrowd 1
            seg = {"size": [64, 64], "counts": _runs(mask)}
        else:  # a compressed RLE string, as pycocotools and FiftyOne write it
            rle = pycocotools.encode(np.asfortranarray(mask.astype(np.uint8)))
            seg = {"size": [64, 64], "counts": rle["counts"].decode()}
        annotations.append({"id": len(annotations) + 1, "image_id": k, "category_id": 1 if t == "scratch" else 2,
                            "segmentation": seg, "iscrowd": 1, "bbox": [0, 0, 1, 1], "area": int(mask.sum())})
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_default.json").write_text(json.dumps(
        {"licenses": [], "info": {}, "categories": categories, "images": images, "annotations": annotations}))
    return root, expected


@pytest.fixture
def cvat(demo_root, tmp_path):
    demo, good = _demo(demo_root)
    root = tmp_path / "cvat"
    names = _copy_images(root, demo, good, "JPEGImages")
    colours = {"scratch": (100, 0, 0), "spot": (0, 0, 64)}  # dark label colours: what read as empty before
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
                                       "scratch:100,0,0::\nspot:0,0,64::\n")
    (root / "SegmentationClass").mkdir()
    expected = {}
    for name, image in names.items():
        t = name.split("_")[0]
        mask = dict(demo[t])[image]
        expected[name] = mask
        rgb = np.zeros((64, 64, 3), np.uint8)
        rgb[mask] = colours[t]
        Image.fromarray(rgb).save(root / "SegmentationClass" / f"{name[:-4]}.png")
    for g in good:  # CVAT writes an all-background mask for an image without labels
        Image.new("RGB", (64, 64)).save(root / "SegmentationClass" / f"good_{g.stem}.png")
    return root, expected


@pytest.fixture
def labelstudio(demo_root, tmp_path):
    from label_studio_converter.brush import encode_rle

    demo, good = _demo(demo_root)
    root = tmp_path / "ls"
    names = _copy_images(root, demo, good)
    tasks, expected = [], {}
    for k, name in enumerate(sorted(names) + [f"good_{g.stem}.png" for g in good], start=1):
        t = name.split("_")[0]
        data = {"image": f"/data/upload/3/{k:08x}-{name}"}  # an upload's hex prefix before the file name
        if t == "good":
            tasks.append({"id": k, "data": data, "annotations": [{"id": k, "result": []}]})
            continue
        mask = dict(demo[t])[names[name]]
        if t == "scratch":  # a brush mask, encoded by Label Studio's own converter
            rgba = np.repeat(mask.reshape(-1).astype(np.uint8) * 255, 4)
            value = {"format": "rle", "rle": [int(v) for v in encode_rle(rgba)], "brushlabels": ["scratch"]}
            expected[name] = mask
        else:  # a polygon, in percent of the image size
            value = {"points": [[10 / 64 * 100, 12 / 64 * 100], [30 / 64 * 100, 12 / 64 * 100],
                                [30 / 64 * 100, 40 / 64 * 100], [10 / 64 * 100, 40 / 64 * 100]],
                     "polygonlabels": ["spot"], "closed": True}
            expected[name] = _square()
        result = {"id": "r1", "type": "brushlabels" if t == "scratch" else "polygonlabels", "from_name": "tag",
                  "to_name": "image", "original_width": 64, "original_height": 64, "image_rotation": 0,
                  "value": value}
        tasks.append({"id": k, "data": data, "annotations": [
            {"id": 100 + k, "was_cancelled": True, "result": []},  # a skipped annotation is not read
            {"id": 200 + k, "result": [result]}]})
    (root / "project-3-at-2026-12-04.json").write_text(json.dumps(tasks))
    return root, expected


@pytest.fixture
def yolo(demo_root, tmp_path):
    demo, good = _demo(demo_root)
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: scratch\n  1: spot\n")
    expected = {}
    boxes = [(10, 12, 30, 40), (20, 8, 50, 30)]
    for t, cls in (("scratch", 0), ("spot", 1)):
        for k, (image, _) in enumerate(demo[t]):
            name = f"{t}_{image.stem}.png"
            shutil.copyfile(image, root / "images" / "train" / name)
            x0, y0, x1, y1 = boxes[k % 2]
            pts = [x0, y0, x1, y0, x1, y1, x0, y1]
            (root / "labels" / "train" / f"{name[:-4]}.txt").write_text(
                f"{cls} " + " ".join(f"{v / 64:.6f}" for v in pts) + "\n")
            expected[name] = _square(box=boxes[k % 2])
    for g in good:
        shutil.copyfile(g, root / "images" / "train" / f"good_{g.stem}.png")
    (root / "labels" / "train" / f"good_{good[0].stem}.txt").write_text("")  # an empty label file: no defect
    return root, expected


FORMATS = ["coco", "yolo", "cvat", "labelstudio"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_export_is_detected_and_read_as_its_masks(fmt, request, capsys):
    root, expected = request.getfixturevalue(fmt)
    layout = open_layout(root)
    assert layout.name == fmt
    assert layout.defect_types("disc") == list(TYPES)  # the categories are the defect types, several per dataset
    assert [p.name for p in layout.good_images("disc")] == [f"good_{i:03d}.png" for i in range(3)]
    for t in TYPES:
        samples = layout.defect_samples("disc", t)
        assert len(samples) == 6 and all(s.defect_type == t for s in samples)
        for s in samples:
            assert mask_file(s.mask).is_file()
            got = load_mask(s.mask, s.mask_rule)
            want = expected[s.image.name]
            if fmt == "yolo" or (fmt == "labelstudio" and t == "spot"):  # polygons: drawn, edges may differ by a pixel
                assert (got & want).sum() / (got | want).sum() > 0.9
            else:
                assert np.array_equal(got, want)
    # `defectfill data` works on it: both types, no problem, exit 0
    assert main(["data", "--data", str(root), "--category", "disc", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == fmt and report["problems"] == []
    cat = report["categories"][0]
    assert [t["defect_type"] for t in cat["defect_types"]] == list(TYPES) and cat["good_images"] == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_split_of_an_import_reads_back_from_split_json(fmt, request, tmp_path):
    root, expected = request.getfixturevalue(fmt)
    split = make_split(open_layout(root), "disc", "spot")
    split.save(tmp_path / "split.json")
    again = read_split(tmp_path / "split.json")
    assert [s.image for s in again.held_out] == [s.image for s in split.held_out]
    for s in again.reference + again.held_out:
        assert np.array_equal(load_mask(s.mask, again.mask_rule), load_mask(s.mask, s.mask_rule))
        assert load_mask(s.mask, again.mask_rule).any()


def test_coco_polygons_match_pycocotools_rasterisation(tmp_path, demo_root):
    """Our polygon fill against the COCO API's own (frPyObjects + decode) on the same polygon."""
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), (90, 90, 90)).save(root / "images" / "a.png")
    Image.new("RGB", (64, 48), (90, 90, 90)).save(root / "images" / "b.png")
    poly = [5.5, 4.0, 40.2, 9.7, 33.0, 40.5, 8.1, 30.0]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_default.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 8, "file_name": "b.png", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "dent mark"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": [poly], "iscrowd": 0}]}))
    layout = open_layout(root)
    assert layout.defect_types("part") == ["dent_mark"]  # spaces written as folders use them
    assert [p.name for p in layout.good_images("part")] == ["b.png"]  # listed without annotations: defect-free
    (sample,) = layout.defect_samples("part", "dent mark")
    ours = load_mask(sample.mask)
    theirs = pycocotools.decode(pycocotools.merge(pycocotools.frPyObjects([poly], 48, 64))).astype(bool)
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.95
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 0.05 * theirs.sum()


def test_our_brush_rle_and_label_studios_decode_each_other():
    from label_studio_converter.brush import decode_rle, encode_rle

    from defectfill.data.annotations import decode_brush_rle, encode_brush_rle

    rng = np.random.default_rng(0)
    mask = np.zeros((37, 53), bool)
    mask[5:20, 8:30] = True
    mask |= rng.random(mask.shape) > 0.97
    rgba = np.repeat(mask.reshape(-1).astype(np.uint8) * 255, 4)
    assert np.array_equal(decode_brush_rle(encode_rle(rgba)), rgba)  # theirs, decoded by ours
    ours = encode_brush_rle(mask)
    assert np.array_equal(decode_rle(ours).reshape(37, 53, 4)[..., 3] > 0, mask)  # ours, decoded by theirs


def test_images_without_annotations_or_a_named_folder_are_the_good_images(coco, tmp_path, capsys):
    root, _ = coco
    elsewhere = tmp_path / "goods"
    elsewhere.mkdir()
    for k in range(5):
        Image.new("RGB", (64, 64), (k, k, k)).save(elsewhere / f"g{k}.png")
    assert len(open_layout(root, good=elsewhere).good_images("disc")) == 5
    assert main(["data", "--data", str(root), "--category", "disc", "--good-images", str(elsewhere), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["categories"][0]["good_images"] == 5
    with pytest.raises(DefectFillError, match="--good-images nowhere: folder not found"):
        open_layout(root, good="nowhere")
    with pytest.raises(DefectFillError, match="--good-images is for the annotation exports"):
        open_layout(root, "folder", good=elsewhere)


def test_an_image_with_two_types_is_left_out_of_single_type_training(coco):
    root, _ = coco
    path = root / "annotations" / "instances_default.json"
    data = json.loads(path.read_text())
    first = data["annotations"][0]
    data["annotations"].append({**first, "id": 999, "category_id": 2})  # the same image also shows a spot
    path.write_text(json.dumps(data))
    layout = open_layout(root)
    assert len(layout.defect_samples("disc", "scratch")) == 5
    assert [s.image for s in layout.multi_type_samples("disc", "spot")] == [
        next(p for p in (root / "images").iterdir() if p.name.startswith("scratch_000"))]
    ((sample, types),) = layout.multi_type_images("disc")
    assert types == ("scratch", "spot") and load_mask(sample.mask).any()


@pytest.mark.parametrize("case, message", [
    ("bad_json", r"instances_default.json: cannot read this file as JSON"),
    ("missing_image", r"task 1: image '/data/upload/3/00000001-x.png' not found"),
    ("bad_yolo_line", r"labels/train/a.txt line 1: a polygon needs at least 3 x,y pairs"),
    ("unknown_colour", r"SegmentationClass/a.png: colour 9,9,9 is not in .*labelmap.txt"),
    ("unknown_class", r"labels/train/a.txt: class 4 is not in"),
])
def test_broken_exports_name_the_file_and_the_fix(tmp_path, capsys, case, message):
    root = tmp_path / case
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    if case == "bad_json":
        (root / "annotations").mkdir(parents=True)
        (root / "annotations" / "instances_default.json").write_text('{"images": [')
    elif case == "missing_image":
        root.mkdir()
        (root / "export.json").write_text(json.dumps([{"id": 1, "data": {"image": "/data/upload/3/00000001-x.png"}}]))
    elif case in ("bad_yolo_line", "unknown_class"):
        (root / "images" / "train").mkdir(parents=True)
        (root / "labels" / "train").mkdir(parents=True)
        (root / "data.yaml").write_text("names: [scratch]\n")
        shutil.copyfile(tmp_path / "a.png", root / "images" / "train" / "a.png")
        (root / "labels" / "train" / "a.txt").write_text("0 0.1 0.2 0.3\n" if case == "bad_yolo_line" else
                                                         "4 0.1 0.1 0.5 0.1 0.5 0.5\n")
    else:
        (root / "JPEGImages").mkdir(parents=True)
        (root / "SegmentationClass").mkdir()
        shutil.copyfile(tmp_path / "a.png", root / "JPEGImages" / "a.png")
        Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "SegmentationClass" / "a.png")
        (root / "labelmap.txt").write_text("background:0,0,0::\nscratch:100,0,0::\n")
    with pytest.raises(DefectFillError, match=message):
        open_layout(root).defect_types("x")
    assert main(["data", "--data", str(root), "--category", "x"]) == 2  # no traceback: the message, exit 2
    assert "Traceback" not in capsys.readouterr().err


def test_train_runs_on_a_coco_export(coco, tiny_model_dir, tmp_path):
    """End to end: `train` on the COCO export (a split of mask references), 2 steps of the tiny model."""
    root, _ = coco
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--category", "disc", "--defect-type", "scratch",
                 "--output", str(run), "--model", str(tiny_model_dir), "--resolution", "64", "--steps", "2",
                 "--batch-size", "2", "--warmup-steps", "2", "--save-every", "1000", "--sample-every", "0"]) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["layout"] == "coco" and "#coco:" in split["reference"][0]["mask"]
    assert (run / "pytorch_lora_weights.safetensors").is_file()


def test_good_images_flag_is_recorded_and_generation_draws_from_it(coco, tiny_model_dir, tmp_path):
    """`train --good-images` (a folder inside --data) is recorded in config.json, and `generate` takes its
    defect-free sources from that folder."""
    root, _ = coco
    extra = root / "extra_good"
    extra.mkdir()
    for k in range(2):
        Image.new("RGB", (64, 64), (120 + k, 110, 100)).save(extra / f"part{k}.png")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--category", "disc", "--defect-type", "spot", "--good-images",
                 "extra_good", "--output", str(run), "--model", str(tiny_model_dir), "--resolution", "64",
                 "--steps", "1", "--batch-size", "1", "--warmup-steps", "1", "--save-every", "1000",
                 "--sample-every", "0"]) == 0
    assert json.loads((run / "config.json").read_text())["good_images"] == "extra_good"
    out = tmp_path / "gen"
    assert main(["generate", "--run", str(run), "--output", str(out), "--count", "2", "--candidates", "1",
                 "--steps", "2", "--masks", "held-out", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Path(r["source_image"]).name for r in rows) == ["part0.png", "part1.png"]
    assert all("#coco:" in r["mask_source"] for r in rows)  # held-out masks drawn from the COCO references
