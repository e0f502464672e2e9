"""Defect quality on `defectfill-mini` with the paper's ablations (issue 10, part 4).

Defect types: the demo's disc/scratch, disc/spot and weave/crack, which the base's pretraining world never
drew or named (tests/test_world.py). Per seed, each variant is one `defectfill run` over the three types
(train, generate, evaluate, downstream) into its own folder under --output:

    a  full DefectFill                      b  without L_attn (lambda_attn 0)
    c  without L_obj (lambda_obj 0)         d  without LFS: one candidate, i.e. a random one kept (a's LoRA)
    e  plain LoRA inpainting: one MSE inside the mask with the generation prompt, no object branch, no L_attn
    f  the base with no fine-tuning (learning rates 0: the LoRA stays the identity)
    g  copy-paste: a real reference defect (its masked pixels) moved onto the target mask's centre
    h  a with L_attn on every decoder grid and the consistency term (--attn-scales all, 0.05)
    i  a's LoRA sampled with latent blending (--latent-blend)
    j  a with the decoded pixel term (--lambda-perceptual 0.1)
    k  one model per object (disc), a scratch and a spot per image, painted one after the other
    l  as k, both in one steered pass (--multi-defect joint); paired with k, not with a

KID and IC-LPIPS use the base's own VAE encoder (defectfill.evaluate.metrics.base_features; no ImageNet network is
available offline), and the table adds the mask-region feature distance of defectfill.evaluate.metrics.mask_stats.
The downstream classifier (ResNet-34) and localiser (U-Net) train from scratch on each variant's images.
Generation samples as the base recommends (its defectfill_sampling.json; `--prompt`, `--guidance` override). Every variant's folder is resumable: rerun the same command and finished stages
are skipped.

    .venv/bin/python benchmarks/quality.py --output bench-quality --seeds 0 --json bench-quality/rows.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


VARIANTS = {
    "a": ("full DefectFill", {}),
    "b": ("without L_attn", {"lambda_attn": 0.0}),
    "c": ("without L_obj", {"lambda_obj": 0.0}),
    "d": ("without LFS (random candidate)", {"candidates": 1}),
    # what a user would try first: DreamBooth-style LoRA inpainting, the whole-image loss on random box masks
    # with the token prompt (the object branch alone, alpha 1: no defect weighting), sampled with that prompt
    "e": ("LoRA inpainting on random masks", {"lambda_def": 0.0, "lambda_attn": 0.0, "lambda_obj": 1.0,
                                              "alpha": 1.0, "prompt": "A {object} with {token}"}),
    "f": ("base, no fine-tuning", {"lr_unet": 0.0, "lr_text": 0.0, "steps": 1, "warmup_steps": 0}),
    "g": ("copy-paste of a real defect", {}),
    # issue 24's extensions, each off by default until these show it helps
    "h": ("L_attn on every decoder grid + consistency", {"attn_scales": "all", "lambda_attn_consistency": 0.05}),
    "i": ("latent blending at sampling (a's LoRA)", {"latent_blend": True}),
    "j": ("with the decoded pixel (perceptual) term", {"lambda_perceptual": 0.1}),
    # several defects in one image from one model per object (disc: scratch and spot), paired with each other
    "k": ("one object model, scratch+spot one after the other", {"multi_defect": "sequential"}),
    "l": ("one object model, scratch+spot in one steered pass", {"multi_defect": "joint"}),
}
REUSES_A = ("d", "g", "i")  # variants that change only the sampling (or need a's split): a's trained runs
COMBINED = ("k", "l")  # their items are two-defect images: compared with each other, not with a
COMBINED_TYPES = ("disc", ["scratch", "spot"])


def base_settings(args: argparse.Namespace, data: Path, seed: int) -> dict:
    return dict(
        data=str(data), model=args.model, resolution=64, steps=args.steps, batch_size=3,
        lr_unet=1e-3, lr_text=2e-4, warmup_steps=20, save_every=10**6, sample_every=0, log_every=50,
        mixed_precision="no", compile="no", seed=seed,
        count=args.count, candidates=args.candidates, generate_steps=args.generate_steps, guidance=args.guidance,
        prompt=args.prompt,
        lpips_random_backbone=True, preview_rows=8,
        downstream="both" if str(seed) in args.downstream_seeds.split(",") else "none",
        downstream_epochs=args.downstream_epochs, downstream_image_size=64,
        downstream_pretrained=False, kid_subsets=50, lpips_size=64,
    )


def copy_paste(config, pairs: list[tuple[str, str]], seed: int) -> None:
    """Variant g: per type, `count` images in the layout `defectfill generate` writes, each a defect-free image
    with a reference's defect pixels moved onto the centre of a held-out mask (the mask moves with them)."""
    from defectfill.core.atomic import write_json
    from defectfill.data.images import load_mask, load_rgb
    from defectfill.outputs.generated import MANIFEST, STATE
    from defectfill.outputs.job_folder import job_folder
    from defectfill.outputs.run_folder import read_run_split

    rng = np.random.default_rng(seed)
    for cat, t in pairs:
        folders = job_folder(config).type_folders(cat, t)
        gen = folders.generated
        if (gen / MANIFEST).is_file():
            continue
        split = read_run_split(folders.run)  # the run borrowed from variant a: its references and held-out masks
        goods = sorted((split.data_root / cat / "train" / "good").glob("*.png"))
        tmp = gen.with_name(gen.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        rows = []
        for i in range(config.generate.count):
            good = np.asarray(load_rgb(goods[i % len(goods)])).copy()
            ref = split.reference[int(rng.integers(len(split.reference)))]
            src = np.asarray(load_rgb(ref.image))
            src_mask = load_mask(ref.mask, split.mask_rule)
            target = load_mask(split.held_out[i % len(split.held_out)].mask, split.mask_rule)
            (ty, tx), (sy, sx) = (np.argwhere(m).mean(axis=0).round().astype(int) for m in (target, src_mask))
            moved = np.roll(np.roll(src_mask, ty - sy, axis=0), tx - sx, axis=1)
            pixels = np.roll(np.roll(src, ty - sy, axis=0), tx - sx, axis=1)
            # no wrap-around: keep only what was shifted in from inside the image
            valid = np.zeros_like(moved)
            valid[max(0, ty - sy):min(moved.shape[0], moved.shape[0] + ty - sy),
                  max(0, tx - sx):min(moved.shape[1], moved.shape[1] + tx - sx)] = True
            moved &= valid
            if not moved.any():
                moved, pixels = src_mask, src
            good[moved] = pixels[moved]
            name = f"{i:06d}"
            for sub, arr in ((f"{cat}/test/{t}/{name}.png", good),
                             (f"{cat}/ground_truth/{t}/{name}_mask.png", moved.astype(np.uint8) * 255)):
                (tmp / sub).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(tmp / sub)
            rows.append({"index": i, "image": f"{cat}/test/{t}/{name}.png",
                         "mask": f"{cat}/ground_truth/{t}/{name}_mask.png",
                         "source_image": str(goods[i % len(goods)]), "prompt": "copy-paste", "seed": seed})
        (tmp / cat / "train" / "good").mkdir(parents=True, exist_ok=True)
        for g in goods:
            shutil.copy2(g, tmp / cat / "train" / "good" / g.name)
        write_json(tmp / STATE, {"variant": "copy-paste", "seed": seed})
        (tmp / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
        shutil.rmtree(gen, ignore_errors=True)
        tmp.rename(gen)


def run_variant(key: str, args: argparse.Namespace, data: Path, seed: int) -> list[dict]:
    from defectfill.config.stages import RunConfig
    from defectfill.data import open_layout
    from defectfill.evaluate.metrics.base_features import base_metric_networks
    from defectfill.run.runner import plan_types, run_all

    if key in COMBINED:
        return combined_variant(key, args, data, seed)
    name, overrides = VARIANTS[key]
    out = Path(args.output) / f"{key}-seed{seed}"
    settings = base_settings(args, data, seed)
    settings.update(overrides)
    settings["output"] = str(out)
    cats = args.categories.split(",") if args.categories else None
    settings["categories"] = cats
    config = RunConfig.from_settings(settings)
    pairs = plan_types(open_layout(data), cats, None)
    if key in REUSES_A:  # d and i only change the sampling; g needs a's split
        source = Path(args.output) / f"a-seed{seed}" / "runs"
        if not source.is_dir():
            raise SystemExit(f"variant {key} needs variant a first (missing {source})")
        if not (out / "runs").is_dir():
            from defectfill.core.folders import claim_folder

            claim_folder(out, "run")  # first, while it is empty: `run` then accepts the folder as its own
            shutil.copytree(source, out / "runs")
    if key == "g":
        copy_paste(config, pairs, seed)
    feature_extractor, distance = base_metric_networks(args.model)
    started = time.time()
    results = run_all(config, feature_extractor=feature_extractor, distance=distance,
                      note=f"quality benchmark, variant {key}: {name}")
    seconds = time.time() - started
    rows = []
    for r in results:
        down_path = out / "eval" / f"{r.category}-downstream" / "metrics.json"
        down = json.loads(down_path.read_text()).get("downstream", {}) if down_path.is_file() else {}
        row = {
            "variant": key, "name": name, "seed": seed, "category": r.category, "defect_type": r.defect_type,
            "status": r.status, "n_generated": r.n_generated, "kid_x1e3": r.kid_x1e3, "kid_std_x1e3": r.kid_std_x1e3,
            "ic_lpips": r.ic_lpips, "downstream": down, "seconds_whole_variant": round(seconds, 1),
            "one_class": len([t for c, t in pairs if c == r.category]) < 2,
        }
        if r.n_generated:
            row.update(sample_measures(key, args, config, r.category, r.defect_type, feature_extractor))
        rows.append(row)
    return rows


def combined_variant(key: str, args: argparse.Namespace, data: Path, seed: int) -> list[dict]:
    """Variants k and l: one model per object on disc (`run --one-model-per-object`, in k's folder, trained once
    for both), then `count` images with a scratch and a spot each, painted one after the other (k) or in one
    steered pass (l) from the same items (backgrounds, masks, seeds). One row per defect type: the per-sample
    distance of each painted region (its own mask) to that type's held-out real regions."""
    import quality_stats as qs

    from defectfill.config.stages import GenerateConfig, RunConfig
    from defectfill.data.images import load_mask, load_rgb
    from defectfill.evaluate.metrics.base_features import base_metric_networks
    from defectfill.evaluate.metrics.mask_stats import feature_distance
    from defectfill.generate.writer import run_generate
    from defectfill.outputs.generated import manifest_path
    from defectfill.outputs.job_folder import job_folder
    from defectfill.outputs.run_folder import read_run_split
    from defectfill.run.runner import run_all

    name, overrides = VARIANTS[key]
    cat, types = COMBINED_TYPES
    out = Path(args.output) / f"k-seed{seed}"
    settings = base_settings(args, data, seed)
    settings.update(output=str(out), categories=[cat], one_model_per_object=True, downstream="none")
    config = RunConfig.from_settings(settings)
    feature_extractor, distance = base_metric_networks(args.model)
    started = time.time()
    run_all(config, feature_extractor=feature_extractor, distance=distance,
            note="quality benchmark, variants k and l: one model per object")  # finished stages are skipped
    run_dir = job_folder(config).type_folders(cat, types[0]).run
    gen_out = out / f"combined-{overrides['multi_defect']}"
    run_generate(GenerateConfig(run=str(run_dir), output=str(gen_out), count=args.count, defect_types=list(types),
                                multi_defect=overrides["multi_defect"], candidates=args.candidates,
                                steps=args.generate_steps, guidance=args.guidance, prompt=args.prompt, seed=seed,
                                lpips_random_backbone=True, mixed_precision="no", compile="no", preview_rows=8))
    seconds = time.time() - started
    manifest = sorted((json.loads(line) for line in manifest_path(gen_out).read_text().splitlines() if line.strip()),
                      key=lambda r: r["index"])
    rows = []
    for i, t in enumerate(types):
        generated = [(np.asarray(load_rgb(gen_out / r["image"])), load_mask(gen_out / r["defects"][i]["mask"], "half"))
                     for r in manifest]
        real_f = qs.region_features(qs.real_pairs(read_run_split(run_dir, t)))
        gen_f = qs.region_features(generated)
        rows.append({"variant": key, "name": name, "seed": seed, "category": cat, "defect_type": f"{t} (of {'+'.join(types)})",
                     "status": "ok", "n_generated": len(manifest), "kid_x1e3": None, "kid_std_x1e3": None,
                     "ic_lpips": None, "downstream": {}, "seconds_whole_variant": round(seconds, 1),
                     "one_class": False, "mask_feature_distance": feature_distance(gen_f, real_f),
                     "sample_distances": qs.nearest_distances(gen_f, real_f).tolist(),
                     "crop_kid": qs.crop_kid(qs.real_pairs(read_run_split(run_dir, t)), generated, feature_extractor)})
    return rows


def sample_measures(key: str, args, config, cat: str, t: str, feature_extractor) -> dict:
    """Per-sample distances, crop KID, retention and token dependence of one type's run (quality_stats)."""
    import quality_stats as qs

    from defectfill.evaluate.metrics.mask_stats import feature_distance
    from defectfill.generate.generator import DefectGenerator
    from defectfill.outputs.job_folder import job_folder
    from defectfill.outputs.run_folder import read_run_split

    folders = job_folder(config).type_folders(cat, t)
    split = read_run_split(folders.run)
    real, generated = qs.real_pairs(split), qs.generated_pairs(folders.generated)
    real_f, gen_f = qs.region_features(real), qs.region_features(generated)
    out = {"mask_feature_distance": feature_distance(gen_f, real_f),
           "sample_distances": qs.nearest_distances(gen_f, real_f).tolist(),
           "crop_kid": qs.crop_kid(real, generated, feature_extractor)}
    if key in REUSES_A:  # copy-paste has no model; d and i are a's model
        return out
    goods = sorted((split.data_root / cat / "train" / "good").glob("*.png"))
    targets = [(qs.Image.open(goods[i % len(goods)]).convert("RGB"), m) for i, (_, m) in enumerate(generated)]
    gen = DefectGenerator.from_run(folders.run, candidates=1, steps=args.generate_steps, guidance=args.guidance,
                                   prompt=config.generate.prompt or args.prompt, merge_lora=False)
    prompt = gen.prompt
    with_token = qs.paint_features(gen, targets, prompt)
    without = qs.paint_features(gen, targets, qs.without_token(prompt, gen.token))
    out["token"] = {"prompt": prompt, "with": qs.nearest_distances(with_token, real_f).tolist(),
                    "without": qs.nearest_distances(without, real_f).tolist()}
    out["retention_errors"] = qs.retention_error(gen, goods, cat, args.count).tolist()
    return out


def downstream_numbers(down: dict, one_class: bool = False) -> tuple[str, str, str, str]:
    """(classifier accuracy, localiser image AUROC, pixel AUROC, PRO) of a category's downstream record; a
    category with one defect type has no classifier to measure (its accuracy is 1 by construction)."""
    cls, loc = down.get("classify") or {}, down.get("localize") or {}

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    return ("n/a (one class)" if one_class else fmt(cls.get("accuracy")), fmt((loc.get("image") or {}).get("auroc")),
            fmt((loc.get("pixel") or {}).get("auroc")), fmt(loc.get("pro")))


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    print("| variant | seed | category/type | KID x10^3 | IC-LPIPS | mask-feature dist. | "
          "category: classifier acc. | image AUROC | pixel AUROC | PRO |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        acc, img_auroc, px_auroc, pro = downstream_numbers(r["downstream"], r.get("one_class", False))
        print(f"| {r['variant']} {r['name']} | {r['seed']} | {r['category']}/{r['defect_type']} | "
              f"{fmt(r['kid_x1e3'], '.2f')} | {fmt(r['ic_lpips'], '.3f')} | {fmt(r['mask_feature_distance'], '.4f')} | "
              f"{acc} | {img_auroc} | {px_auroc} | {pro} |")


def _per_seed(rows: list[dict], variant: str, cat: str, t: str) -> dict[int, np.ndarray]:
    return {r["seed"]: np.array(r["sample_distances"]) for r in rows
            if r["variant"] == variant and (r["category"], r["defect_type"]) == (cat, t) and "sample_distances" in r}


def print_summary(rows: list[dict]) -> None:
    """Per type and variant: each measure's mean +- std over seeds [95 % bootstrap interval]; then full DefectFill
    (a) against each other variant, paired per sample."""
    import quality_stats as qs

    def cell(per_seed):
        s = qs.summary(per_seed)
        return f"{s['mean']:.3f} +- {s['std']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    types = sorted({(r["category"], r["defect_type"]) for r in rows if "sample_distances" in r})
    variants = sorted({r["variant"] for r in rows})
    print("\n| type | variant | per-sample distance | mean-colour distance | retention error | "
          "distance without the token | crop KID x10^3 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cat, t in types:
        for v in variants:
            mine = sorted((r for r in rows if r["variant"] == v and (r["category"], r["defect_type"]) == (cat, t)
                           and "sample_distances" in r), key=lambda r: r["seed"])
            if not mine:
                continue
            colour = [np.array([r["mask_feature_distance"]]) for r in mine]
            ret = [np.array(r["retention_errors"]) for r in mine if "retention_errors" in r]
            tok = [np.array(r["token"]["without"]) for r in mine if "token" in r]
            kid = [r["crop_kid"]["mean_x1e3"] for r in mine if r["crop_kid"].get("available")]
            kid_cell = f"{np.mean(kid):.1f} +- {np.std(kid, ddof=1) if len(kid) > 1 else 0:.1f}" if kid else "n/a"
            print(f"| {cat}/{t} | {v} {VARIANTS[v][0]} | {cell([np.array(r['sample_distances']) for r in mine])} | "
                  f"{cell(colour)} | {cell(ret) if ret else 'n/a'} | {cell(tok) if tok else 'n/a'} | {kid_cell} |")
    print("\n| type | A against | A - X per-sample distance [95 % CI] | verdict (a: A) |")
    print("| --- | --- | --- | --- |")
    for cat, t in types:
        for v in variants:
            base = "k" if v in COMBINED else "a"  # the two-defect variants pair with each other, the rest with a
            mine, other = _per_seed(rows, base, cat, t), _per_seed(rows, v, cat, t)
            seeds = sorted(set(mine) & set(other))
            if v == base or not seeds:
                continue
            s = qs.paired_verdict([mine[k] for k in seeds], [other[k] for k in seeds])
            print(f"| {cat}/{t} | {base} against {v} {VARIANTS[v][0]} | {s['mean']:+.3f} [{s['ci95'][0]:+.3f}, "
                  f"{s['ci95'][1]:+.3f}] | {s['verdict']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="bench-quality")
    p.add_argument("--model", default="defectfill-mini")
    p.add_argument("--variants", default="a,b,c,d,e,f,g")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--categories", default=None, help="comma-separated (default: disc and weave, every type)")
    p.add_argument("--steps", type=int, default=120, help="DefectFill steps per type")
    p.add_argument("--count", type=int, default=24, help="generated images per type")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--generate-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="default: the base's recommendation")
    p.add_argument("--prompt", default=None, help="generation prompt template (default: the base's recommendation)")
    p.add_argument("--downstream-epochs", type=int, default=10)
    p.add_argument("--downstream-seeds", default="0", help="seeds whose runs also train the inspection models "
                   "(comma-separated; '' for none): they cost more than the rest of a variant")
    p.add_argument("--json", default=None, help="write every row (with the full downstream records) here")
    args = p.parse_args(argv)
    from defectfill.demo.dataset import make_demo_dataset

    data = Path(args.output) / "data"
    if not (data / ".complete").is_file():
        make_demo_dataset(data, n_good=24, n_defect=15, n_good_test=6)  # 5 references, 10 held out per type
        (data / ".complete").write_text("")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for key in args.variants.split(","):
            print(f"== variant {key} ({VARIANTS[key][0]}), seed {seed}", file=sys.stderr)
            rows.extend(run_variant(key, args, data, seed))
    print_table(rows)
    print_summary(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
