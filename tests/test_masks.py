"""Target masks: foreground estimate, shape masks on it, user-mask validation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from defectfill.core.errors import DefectFillError
from defectfill.data import load_rgb
from defectfill.data.masks import (
    SHAPES,
    estimate_foreground,
    fit_mask,
    list_user_masks,
    parse_mask_scale,
    parse_shapes,
    shape_mask,
)


def test_foreground_of_object_excludes_background_and_texture_is_everything(demo_root):
    disc = load_rgb(demo_root / "disc" / "train" / "good" / "000.png")
    fg = estimate_foreground(disc)
    assert 0.2 < fg.mean() < 0.6  # the disc covers ~40 % of the frame
    assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()
    assert fg[32, 32] or fg[28, 28]  # the centre is on the object
    arr = np.asarray(disc).astype(int)
    # every foreground pixel is clearly brighter than the dark background (20, 20, 24)
    assert arr[fg].max(axis=1).min() > 60

    weave = load_rgb(demo_root / "weave" / "train" / "good" / "000.png")
    assert estimate_foreground(weave).all()


def test_flat_image_counts_as_all_foreground():
    assert estimate_foreground(Image.new("RGB", (32, 32), (100, 100, 100))).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_nonempty_inside_foreground_within_area(demo_root, shape):
    disc = load_rgb(demo_root / "disc" / "train" / "good" / "001.png")
    fg = estimate_foreground(disc)
    lo, hi = 0.01, 0.06
    areas = []
    for seed in range(12):
        mask = shape_mask(shape, fg, (lo, hi), np.random.default_rng(seed))
        assert mask.shape == fg.shape and mask.dtype == bool
        assert mask.any()
        assert not (mask & ~fg).any(), "mask touches the background"
        area = mask.mean()
        assert lo <= area <= hi
        areas.append(area)
    assert len(set(areas)) > 1  # sizes vary across draws
    # textures: anywhere in the frame, still in range
    weave_fg = estimate_foreground(load_rgb(demo_root / "weave" / "train" / "good" / "000.png"))
    mask = shape_mask(shape, weave_fg, (lo, hi), np.random.default_rng(0))
    assert lo <= mask.mean() <= hi


def test_shape_mask_is_deterministic_per_rng():
    fg = np.ones((64, 64), bool)
    a = shape_mask("blob", fg, (0.01, 0.05), np.random.default_rng(3))
    b = shape_mask("blob", fg, (0.01, 0.05), np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_impossible_area_range_is_a_clear_error():
    fg = np.zeros((64, 64), bool)
    fg[30:34, 30:34] = True  # 16 px of object
    with pytest.raises(DefectFillError, match="mask-scale"):
        shape_mask("square", fg, (0.1, 0.2), np.random.default_rng(0))


@pytest.mark.parametrize("text", ["0.1", "a,b", "0.2,0.1", "0,0.1", "0.1,1.5"])
def test_bad_mask_scale(text):
    with pytest.raises(DefectFillError, match="--mask-scale"):
        parse_mask_scale(text)


def test_parse_shapes():
    assert parse_shapes("ellipse, star") == ["ellipse", "star"]
    with pytest.raises(DefectFillError, match="--shapes"):
        parse_shapes("circle")


def test_user_masks_skip_empty_with_warning(tmp_path, caplog):
    good = np.zeros((16, 16), np.uint8)
    good[4:8, 4:8] = 255
    Image.fromarray(good).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "b.png")
    with caplog.at_level(logging.WARNING):
        kept = list_user_masks(tmp_path)
    assert [p.name for p in kept] == ["a.png"]
    assert "b.png" in caplog.text and "empty" in caplog.text


def test_user_mask_folder_errors(tmp_path):
    with pytest.raises(DefectFillError, match="not found"):
        list_user_masks(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DefectFillError, match="no mask images"):
        list_user_masks(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DefectFillError, match="every mask is empty"):
        list_user_masks(tmp_path)


def test_fit_mask_resizes_and_stays_binary():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    big = fit_mask(mask, (16, 16))
    assert big.shape == (16, 16) and big.dtype == bool and big.sum() == 64
