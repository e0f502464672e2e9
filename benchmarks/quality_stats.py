"""The quality benchmark's per-sample measures and their statistics (benchmarks/quality.py).

Per (variant, seed, defect type), on the `count` generated images, each painted into a held-out real mask:
- the mean-colour distance (`mask_stats.feature_distance`: distance between the mean feature vectors) and the
  per-sample distance (for each generated region, the distance to the nearest real held-out region; mean);
- KID on whole images and on the defect's bounding-box crops (with a margin, resized to CROP px), where a
  small defect is a small share of the whole image;
- retention: the run's error inside random masks on defect-free images under a neutral caption, against the
  truth (a model that paints its defect everywhere scores badly here, however close its defects are);
- token dependence: the distance with the run's default prompt and with the same prompt without the token.

Statistics: mean +- std over seeds, and 95 % bootstrap intervals that resample seeds, then samples within
each seed (hierarchical), 2000 draws. A comparison of two variants is paired: the same seed and item index
is the same defect-free image, mask and sampling seed in every variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CROP = 32
CROP_MARGIN = 4
NEUTRAL = {"disc": "a disc", "weave": "a weave"}


def region_features(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    from defectfill.evaluate.metrics.mask_stats import mask_region_features

    return np.stack([mask_region_features(image, mask) for image, mask in pairs if mask.any()])


def nearest_distances(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(N, 5) x (M, 5) -> (N,): each generated region's distance to its nearest real region."""
    return np.linalg.norm(generated[:, None, :] - real[None, :, :], axis=-1).min(axis=1)


def generated_pairs(gen_root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) of every generated item, in item-index order."""
    from defectfill.data.images import load_mask, load_rgb
    from defectfill.outputs.generated import manifest_path

    rows = [json.loads(line) for line in manifest_path(gen_root).read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["index"])
    return [(np.asarray(load_rgb(gen_root / r["image"])), load_mask(gen_root / r["mask"], "half")) for r in rows]


def real_pairs(split) -> list[tuple[np.ndarray, np.ndarray]]:
    from defectfill.data.images import load_mask, load_rgb

    return [(np.asarray(load_rgb(s.image)), load_mask(s.mask, split.mask_rule)) for s in split.held_out]


def bbox_crop(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    y0, y1 = max(0, ys.min() - CROP_MARGIN), min(h, ys.max() + 1 + CROP_MARGIN)
    x0, x1 = max(0, xs.min() - CROP_MARGIN), min(w, xs.max() + 1 + CROP_MARGIN)
    return Image.fromarray(image[y0:y1, x0:x1]).resize((CROP, CROP), Image.Resampling.BICUBIC)


def crop_kid(real, generated, feature_extractor) -> dict:
    from defectfill.evaluate.metrics.kid import kid_images

    return kid_images([bbox_crop(i, m) for i, m in real], [bbox_crop(i, m) for i, m in generated],
                      feature_extractor=feature_extractor, subset_size=1000, subsets=50)


def paint_features(generator, targets, prompt: str) -> np.ndarray:
    """Region features of what `generator` paints with `prompt` into each (good, mask) target."""
    generator.prompt = prompt
    pairs = []
    for i, (good, mask) in enumerate(targets):
        pairs.append((np.asarray(generator(good, mask, seed=i).image), mask))
    return region_features(pairs)


def retention_error(generator, goods: list[Path], category: str, n: int) -> np.ndarray:
    """(n,) mean absolute error inside a random inpainting mask on defect-free images, neutral caption."""
    from defectfill.data.images import load_rgb
    from defectfill.pretrain.world import sample_inpaint_mask

    generator.prompt = NEUTRAL.get(category, f"a {category}")
    rng = np.random.default_rng(7)
    errors = []
    for i in range(n):
        image = load_rgb(goods[i % len(goods)])
        mask = sample_inpaint_mask(rng, image.size[0])
        if mask.shape != (image.size[1], image.size[0]):
            mask = np.asarray(Image.fromarray(mask).resize(image.size)) > 0
        out = np.asarray(generator(image, mask, seed=i).image, dtype=np.float64) / 255
        errors.append(np.abs(out - np.asarray(image, dtype=np.float64) / 255)[mask].mean())
    return np.array(errors)


from defectfill.run.token_check import without_token  # noqa: E402,F401 - the package's probe, for quality.py

# --------------------------------------------------------------------------- statistics


def hierarchical_bootstrap(per_seed: list[np.ndarray], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean: resample the seeds, then the samples within each drawn seed."""
    rng = np.random.default_rng(seed)
    per_seed = [np.asarray(v, dtype=np.float64) for v in per_seed if len(v)]
    means = np.empty(draws)
    for d in range(draws):
        chosen = rng.integers(len(per_seed), size=len(per_seed))
        means[d] = np.mean([per_seed[c][rng.integers(len(per_seed[c]), size=len(per_seed[c]))].mean()
                            for c in chosen])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summary(per_seed: list[np.ndarray]) -> dict:
    """mean, std over the seeds' means, and the bootstrap interval."""
    seed_means = [float(np.mean(v)) for v in per_seed]
    lo, hi = hierarchical_bootstrap(per_seed)
    return {"mean": float(np.mean(seed_means)), "std": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1
            else 0.0, "ci95": [lo, hi], "seeds": len(per_seed), "samples": int(sum(len(v) for v in per_seed))}


def paired_verdict(a: list[np.ndarray], b: list[np.ndarray], lower_is_better: bool = True) -> dict:
    """a - b per sample (same seed, same item), its mean and interval, and "a better", "a worse" or "level"."""
    diffs = [np.asarray(x) - np.asarray(y) for x, y in zip(a, b, strict=True)]
    s = summary(diffs)
    lo, hi = s["ci95"]
    better = hi < 0 if lower_is_better else lo > 0
    worse = lo > 0 if lower_is_better else hi < 0
    s["verdict"] = "a better" if better else "a worse" if worse else "level"
    return s
