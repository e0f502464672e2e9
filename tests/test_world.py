"""The pretraining world: deterministic per seed, varied, and independent of the demo dataset."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

import defectfill.pretrain.world as world
from defectfill.pretrain.world import FORBIDDEN_WORDS, KINDS, sample_batch, sample_inpaint_mask, sample_world


def test_same_seed_same_samples_other_seed_other_samples():
    a = sample_batch(np.random.default_rng(3), 6, 64)
    b = sample_batch(np.random.default_rng(3), 6, 64)
    c = sample_batch(np.random.default_rng(4), 6, 64)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0])


def test_images_are_rgb_of_the_size_asked():
    image, caption = sample_world(np.random.default_rng(0), 48)
    assert image.mode == "RGB" and image.size == (48, 48)
    assert isinstance(caption, str)


def test_the_world_is_varied():
    rng = np.random.default_rng(0)
    captions = [sample_world(rng, 32)[1] for _ in range(300)]
    nouns = {noun for noun, _, _ in KINDS.values()}
    seen = {noun for noun in nouns if any(noun in c for c in captions)}
    assert len(seen) == len(nouns)  # every kind of part and surface appears
    assert sum(" with " in c for c in captions) > 60  # anomalies
    anomaly_words = {c.split(" with ", 1)[1].split(" of ")[0] for c in captions if " with " in c}
    assert len(anomaly_words) >= 7
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.04 < empty < 0.18  # about EMPTY_CAPTION_RATE
    assert len(set(captions)) > 80
    images = np.stack([np.asarray(sample_world(rng, 32)[0], dtype=np.float32) for _ in range(40)])
    assert images.mean(axis=(1, 2)).std(axis=0).min() > 10  # colours differ between images


def test_captions_never_use_the_demo_defect_names():
    rng = np.random.default_rng(1)
    for _ in range(400):
        caption = sample_world(rng, 32, anomaly_rate=1.0)[1]
        assert not any(word in caption for word in FORBIDDEN_WORDS), caption
    from defectfill.demo.dataset import DEMO_CATEGORIES

    demo_types = {t for _, types in DEMO_CATEGORIES.values() for t in types}
    assert demo_types <= set(FORBIDDEN_WORDS)  # the rule covers every demo defect type


def test_the_world_never_calls_into_demo_data():
    source = Path(world.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any("demo" in name for name in imported)
    assert not re.search(r"\bdemo_data\.", source)


def test_masks_are_never_empty_and_varied():
    rng = np.random.default_rng(0)
    masks = [sample_inpaint_mask(rng, 64) for _ in range(300)]
    assert all(m.dtype == np.bool_ and m.shape == (64, 64) and m.any() for m in masks)
    areas = np.array([m.mean() for m in masks])
    assert areas.min() < 0.02 and areas.max() > 0.3  # thin lines to large boxes
    assert len({round(a, 3) for a in areas}) > 100


def test_most_anomalies_are_the_hole_and_their_caption_names_them():
    """The base learns that the words decide what is painted in the hole: for most images with an anomaly the
    inpainting mask covers the anomaly's pixels, and those captions (unless empty) name the anomaly."""
    from defectfill.pretrain.world import ANOMALIES, sample_training_pair

    rng = np.random.default_rng(2)
    pairs = [sample_training_pair(rng, 64) for _ in range(300)]
    with_anomaly = [(s, m) for s, m in pairs if s.anomaly is not None]
    assert 0.45 < len(with_anomaly) / len(pairs) < 0.75
    stems = [words.split(" of ")[0] for words in ANOMALIES.values()]
    for s, _ in with_anomaly:
        assert s.caption == "" or any(stem in s.caption for stem in stems), s.caption
    covered = sum(bool((m & s.anomaly).sum() == s.anomaly.sum()) for s, m in with_anomaly)
    assert 0.6 < covered / len(with_anomaly) < 0.85  # COVER_RATE 0.7; a random mask rarely covers one whole


def test_an_anomaly_mask_keeps_a_thin_mark_whole():
    """A thin line drawn on the doubled canvas keeps every final pixel it touches (max-pooled, not thresholded)."""
    from defectfill.pretrain.world import draw_world

    rng = np.random.default_rng(5)
    for _ in range(200):
        s = draw_world(rng, 64, anomaly_rate=1.0)
        if s.anomaly is not None and "line" in s.caption:
            break
    changed = np.abs(np.asarray(s.image, float).mean(-1) - np.median(np.asarray(s.image, float).mean(-1)))
    assert s.anomaly.sum() >= 20  # a 0.15-0.45 frame-long line, 2-3 px wide
    assert changed[s.anomaly].mean() > changed[~s.anomaly].mean()


def test_captions_come_in_several_phrasings_and_the_autoencoder_sees_fine_marks():
    from defectfill.pretrain.world import caption_words, sample_autoencoder_batch

    rng = np.random.default_rng(3)
    captions = [sample_world(rng, 32)[1] for _ in range(400)]
    assert any(c.startswith("a photo of ") for c in captions)
    assert any(" with " in c and c.split(" with ")[0].count(" ") == 1 for c in captions)  # "a nut with ..."
    words = set(caption_words())
    assert {w for c in captions for w in c.replace("{colour}", "").split()} <= words
    plain = sample_autoencoder_batch(np.random.default_rng(4), 16, 64, detail_rate=0.0)
    marked = sample_autoencoder_batch(np.random.default_rng(4), 16, 64, detail_rate=1.0)
    assert plain.shape == marked.shape == (16, 64, 64, 3)
    assert (np.abs(plain.astype(int) - marked.astype(int)).max(axis=-1) > 20).mean() > 0.002
