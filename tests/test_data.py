"""Data: image modes, masks, layouts, the split, augmentation, box masks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from defectfill.core.errors import DefectFillError
from defectfill.data import load_mask, load_rgb, make_split, object_name, open_layout
from defectfill.data.augment import random_box_mask, resize_crop_keep_defect


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P", "LA", "CMYK"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    arr = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(arr.astype(np.uint16) * 257)
        assert image.mode.startswith("I;16")
    else:
        image = Image.fromarray(arr).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    out = np.asarray(rgb)
    # brightness order survives (a 16-bit image is not clipped to white)
    assert out[0, 0].mean() < out[-1, -1].mean()
    assert out[-1, -1].mean() > 200


@pytest.mark.parametrize("kind", ["0/1", "0/255", "antialiased", "16bit", "rgb"])
def test_masks_become_binary(tmp_path, kind):
    m = np.zeros((20, 20), dtype=np.uint8)
    m[5:15, 5:15] = 1
    if kind == "0/1":
        image = Image.fromarray(m)
    elif kind == "0/255":
        image = Image.fromarray(m * 255)
    elif kind == "antialiased":
        soft = m * 255
        soft[4, 5:15] = 100  # an edge below half: background
        soft[15, 5:15] = 200  # an edge above half: defect
        image = Image.fromarray(soft)
    elif kind == "16bit":
        image = Image.fromarray(m.astype(np.uint16) * 65535)
    else:
        image = Image.fromarray(np.stack([m * 255, m * 0, m * 0], -1))
    image.save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == bool
    expected = m.astype(bool)
    if kind == "antialiased":
        expected[15, 5:15] = True
    assert np.array_equal(mask, expected)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DefectFillError, match="broken.png.*cannot read"):
        load_rgb(bad)


def test_layout_detection(tmp_path, demo_root):
    assert open_layout(demo_root).name == "mvtec"
    df2 = tmp_path / "df2" / "nut" / "train"
    (df2 / "defective" / "crack").mkdir(parents=True)
    (df2 / "defective_masks" / "crack").mkdir(parents=True)
    src = demo_root / "disc" / "test" / "scratch"
    shutil.copy(src / "000.png", df2 / "defective" / "crack" / "a.png")
    shutil.copy(demo_root / "disc" / "ground_truth" / "scratch" / "000_mask.png",
                df2 / "defective_masks" / "crack" / "a_mask.png")
    layout = open_layout(tmp_path / "df2")
    assert layout.name == "defectfill2" and layout.defect_types("nut") == ["crack"]
    assert layout.defect_samples("nut", "crack")[0].mask.name == "a_mask.png"
    folder = tmp_path / "plain"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    shutil.copy(src / "000.png", folder / "images" / "p.png")
    shutil.copy(demo_root / "disc" / "ground_truth" / "scratch" / "000_mask.png", folder / "masks" / "p.png")
    layout = open_layout(folder)
    assert layout.name == "folder"
    assert layout.defect_samples("metal_nut", "dent")[0].mask.name == "p.png"
    with pytest.raises(DefectFillError, match="cannot tell the dataset layout"):
        open_layout(tmp_path / "plain" / "images")


def test_unknown_category_and_type_list_what_exists(demo_root):
    layout = open_layout(demo_root)
    with pytest.raises(DefectFillError, match="unknown category 'hazelnut'.*disc, weave"):
        layout.defect_samples("hazelnut", "hole")
    with pytest.raises(DefectFillError, match="unknown defect type 'hole'.*scratch, spot"):
        layout.defect_samples("disc", "hole")


def test_split_is_first_third_sorted_and_at_least_one(demo_root, tmp_path):
    split = make_split(open_layout(demo_root), "disc", "scratch")
    assert [s.image.name for s in split.reference] == ["000.png", "001.png"]
    assert [s.image.name for s in split.held_out] == ["002.png", "003.png", "004.png", "005.png"]
    root = tmp_path / "one"
    shutil.copytree(demo_root / "disc", root / "disc")
    for name in ("001", "002", "003", "004", "005"):
        (root / "disc" / "test" / "scratch" / f"{name}.png").unlink()
    split = make_split(open_layout(root), "disc", "scratch")
    assert len(split.reference) == 1 and split.held_out == []


def _copy(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "disc", root / "disc")
    return root


def test_missing_mask_is_named(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path)
    (root / "disc" / "ground_truth" / "scratch" / "002_mask.png").unlink()
    with pytest.raises(DefectFillError, match="002.png: defect image has no mask"):
        make_split(open_layout(root), "disc", "scratch")


def test_mask_of_another_size_is_named(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path)
    path = root / "disc" / "ground_truth" / "scratch" / "003_mask.png"
    Image.open(path).resize((32, 32)).save(path)
    with pytest.raises(DefectFillError, match="003_mask.png: mask is 32x32 but its image 003.png is 64x64"):
        make_split(open_layout(root), "disc", "scratch")


def test_empty_masks_are_skipped_then_fail_when_none_remain(demo_root, tmp_path, caplog):
    root = _copy(demo_root, tmp_path)
    gt = root / "disc" / "ground_truth" / "scratch"
    Image.new("L", (64, 64), 0).save(gt / "000_mask.png")
    split = make_split(open_layout(root), "disc", "scratch")
    assert "000.png" not in [s.image.name for s in split.reference + split.held_out]
    assert [s.image.name for s in split.skipped_empty] == ["000.png"]
    assert "000_mask.png: mask is empty" in caplog.text
    for p in gt.iterdir():
        Image.new("L", (64, 64), 0).save(p)
    with pytest.raises(DefectFillError, match="every mask of defect type 'scratch'.*empty"):
        make_split(open_layout(root), "disc", "scratch")


def test_crop_keeps_the_defect_inside():
    image = torch.rand(3, 64, 64) * 2 - 1
    for corner in [(0, 0), (0, 58), (58, 0), (58, 58), (30, 30)]:
        mask = torch.zeros(1, 64, 64)
        mask[:, corner[0]:corner[0] + 6, corner[1]:corner[1] + 6] = 1
        for seed in range(20):
            out_image, out_mask = resize_crop_keep_defect(image, mask, torch.Generator().manual_seed(seed), 1.125)
            assert out_image.shape == (3, 64, 64) and out_mask.shape == (1, 64, 64)
            # the whole defect survives: at least its original area (scaled up by >= 1)
            assert out_mask.sum() >= mask.sum() * 0.95, (corner, seed)


def test_box_mask_is_a_union_of_boxes_in_range():
    gen = torch.Generator().manual_seed(0)
    mask = random_box_mask(200, 200, gen, num_boxes=1, min_side=0.03, max_side=0.25)
    ys, xs = torch.nonzero(mask[0], as_tuple=True)
    h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    assert 6 <= h <= 50 and 6 <= w <= 50 and mask.sum() == h * w
    many = random_box_mask(200, 200, torch.Generator().manual_seed(1), num_boxes=30)
    assert 0 < many.mean() < 1


def test_object_name():
    assert object_name("metal_nut") == "metal nut"


def _wide_dataset(root, size=(96, 48)):
    """An MVTec-layout category 'plate' with three 96x48 'scratch' images: a diagonal gradient and a 1 px line."""
    w, h = size
    for sub in ("train/good", "test/scratch", "ground_truth/scratch"):
        (root / "plate" / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(3):
        arr = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 40 * i)], -1).astype(np.uint8)
        Image.fromarray(arr).save(root / "plate" / "test" / "scratch" / f"{i:03d}.png")
        Image.fromarray(arr).save(root / "plate" / "train" / "good" / f"{i:03d}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 31] = 255  # a 1 px scratch: 2/3 px wide at the training scale
        Image.fromarray(mask).save(root / "plate" / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


def test_non_square_references_are_letterboxed_not_stretched(tmp_path):
    """Pins training's aspect: a 96x48 reference goes into its 64 px square scaled by 2/3 (64x32, centred, the
    rows above and below black padding marked invalid), not stretched to 64x64; its 1 px scratch survives the
    shrink (any coverage counts)."""
    from defectfill.train.trainer import load_references

    root = _wide_dataset(tmp_path / "data")
    images, masks, valid = load_references(make_split(open_layout(root), "plate", "scratch"), 64)
    assert images.shape == (1, 3, 64, 64) and masks.shape == valid.shape == (1, 1, 64, 64)
    assert valid[0, 0, 16:48].all() and not valid[0, 0, :16].any() and not valid[0, 0, 48:].any()
    assert (images[0, :, :16] == -1).all() and (images[0, :, 48:] == -1).all()
    source = load_rgb(root / "plate" / "test" / "scratch" / "000.png").resize((64, 32), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(source, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(images[0, :, 16:48], expected)  # the aspect-kept resize, nothing stretched
    ys, xs = torch.nonzero(masks[0, 0], as_tuple=True)
    assert ys.min() >= 16 and ys.max() < 48 and set(xs.tolist()) <= {20, 21} and len(ys) >= 20


def test_box_masks_stay_on_the_image_and_padding_follows_the_crop(tmp_path):
    """The object branch's boxes are drawn inside the letterboxed image, and the valid region goes through the
    same enlargement and crop as image and mask; a square reference draws exactly the boxes it drew before."""
    from defectfill.config.stages import TrainConfig
    from defectfill.train.trainer import load_references, make_micro_batch

    root = _wide_dataset(tmp_path / "data")
    images, masks, valid = load_references(make_split(open_layout(root), "plate", "scratch"), 64)
    config = TrainConfig(data=str(root), category="plate", defect_type="scratch", output=str(tmp_path / "run"),
                         resolution=64, batch_size=2)
    for step in range(5):
        batch = make_micro_batch(images, masks, config, step, 0, 0, 1, valid)
        assert batch.valid is not None and batch.valid.shape == (2, 1, 64, 64)
        assert batch.box_masks.sum() > 0 and (batch.box_masks * (1 - batch.valid)).sum() == 0
        assert (batch.masks * (1 - batch.valid)).sum() == 0 and batch.masks.sum() > 0
        padding = (batch.valid[:, 0] == 0)[:, None].expand(-1, 3, -1, -1)  # black, up to the resize's blend at the edge
        assert padding.any() and batch.images[padding].mean() < -0.95
    square = torch.ones(1, 1, 64, 64)
    with_valid = make_micro_batch(images, masks, config, 3, 0, 0, 1, square)
    without = make_micro_batch(images, masks, config, 3, 0, 0, 1)
    assert torch.equal(with_valid.box_masks, without.box_masks) and torch.equal(with_valid.images, without.images)


# --------------------------------------------------------------------------- masks that read as empty (issue 26)


def _mask_file(tmp_path, arr, name="m.png", mode=None):
    path = tmp_path / name
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.mark.parametrize("value", [1, 2, 3, 7, 40])
def test_class_id_masks_read_as_defect_and_keep_their_id(tmp_path, value):
    from defectfill.data.images import load_labels

    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = value
    path = _mask_file(tmp_path, m)
    assert np.array_equal(load_mask(path), m > 0)
    assert np.array_equal(load_labels(path), m.astype(np.int64))  # the class id is there to select by
    assert not load_mask(path, "half").any() or value == 1  # what the old rule read: nothing


def test_dark_label_colours_read_as_defect(tmp_path):
    m = np.zeros((20, 20, 3), np.uint8)
    m[2:8, 2:8] = (100, 0, 0)  # CVAT-style dark label colours
    m[10:18, 10:18] = (0, 0, 64)
    path = _mask_file(tmp_path, m)
    assert np.array_equal(load_mask(path), m.max(axis=2) > 0)
    m[0, 0] = (255, 255, 255)  # a bright label beside them: every colour but black is still a label
    path = _mask_file(tmp_path, m, "m2.png")
    assert np.array_equal(load_mask(path), m.max(axis=2) > 0)


def test_a_label_reference_selects_one_class(tmp_path):
    from defectfill.data.annotations import reference
    from defectfill.data.images import mask_file, rgb_label

    m = np.zeros((20, 20), np.uint8)
    m[2:6, 2:6], m[10:14, 10:14] = 2, 5
    path = _mask_file(tmp_path, m)
    ref = reference(path, "label", label=5)
    assert mask_file(ref) == path
    assert np.array_equal(load_mask(ref), m == 5)
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[2:6, 2:6] = (100, 0, 0)
    colour[10:14, 10:14] = (0, 100, 0)
    cpath = _mask_file(tmp_path, colour, "c.png")
    assert np.array_equal(load_mask(reference(cpath, "label", label=rgb_label(0, 100, 0))), m == 5)


def test_jpeg_mask_noise_is_not_a_defect(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 6, (32, 32)).astype(np.uint8)  # what JPEG leaves around black
    path = tmp_path / "n.jpg"
    Image.fromarray(noise).save(path, quality=95)
    assert not load_mask(path).any()


def test_data_exits_nonzero_on_empty_masks_naming_file_and_fix(demo_root, tmp_path, capsys):
    """An empty mask is a problem, not a warning: exit 1, the file and the fix named. Class-id masks (2) and
    dark colours count as defects, so the same dataset with them is clean."""
    from defectfill.cli import main

    root = _copy(demo_root, tmp_path)
    gt = root / "disc" / "ground_truth" / "scratch"
    assert main(["data", "--data", str(root), "--category", "disc"]) == 0
    capsys.readouterr()
    for k, p in enumerate(sorted(gt.iterdir())):  # the same masks as class id 2 and as a dark red
        m = load_mask(p)
        if k % 2:
            Image.fromarray(m.astype(np.uint8) * 2).save(p)
        else:
            Image.fromarray(np.stack([m.astype(np.uint8) * 100, m * 0, m * 0], -1).astype(np.uint8)).save(p)
    assert main(["data", "--data", str(root), "--category", "disc"]) == 0
    split = make_split(open_layout(root), "disc", "scratch")
    assert split.skipped_empty == []
    capsys.readouterr()
    Image.new("L", (64, 64), 0).save(gt / "000_mask.png")
    assert main(["data", "--data", str(root), "--category", "disc"]) == 1
    out = capsys.readouterr().out
    assert "000_mask.png: mask is empty" in out and "Draw the defect in the mask" in out


def test_augmentation_keeps_a_thin_line_in_one_piece():
    """A 1 px diagonal scratch, enlarged by up to 1.125 and cropped back, stays one 8-connected piece in every
    one of 50 draws, and covers every pixel where the enlarged image shows it (a threshold at 0.5 on a bilinear
    resize cut it into ~26 pieces)."""
    from scipy import ndimage

    from defectfill.data.augment import resize_crop_keep_defect

    size = 256
    mask = torch.zeros(1, size, size)
    for i in range(60, 200):
        mask[0, i, i] = 1.0
    image = mask.expand(3, -1, -1) * 2 - 1  # the line white on black
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        big_image, big_mask = resize_crop_keep_defect(image, mask, gen)
        _, pieces = ndimage.label(big_mask[0].numpy() > 0, structure=np.ones((3, 3)))
        assert pieces == 1
        shows = big_image.mean(dim=0) > -0.9  # where the enlarged image is lighter than the background
        assert bool((big_mask[0] > 0)[shows].all())
