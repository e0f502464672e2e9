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
