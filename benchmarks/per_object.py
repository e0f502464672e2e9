"""One model per object against one model per defect type, at equal training compute.

    .venv/bin/python benchmarks/per_object.py --steps 120     # per type 120 steps each; per object 120 x types
    .venv/bin/python benchmarks/per_object.py --model tiny --steps 40   # the untrained tiny pipeline

Trains, on the drawn demo data's `disc` (scratch, spot), one run per type (`--token sks`, the default) and one
per-object run (`--defect-type scratch,spot`, a new token per type) with as many steps as the per-type runs
together, then scores every model on each type's HELD-OUT images with the training losses (L_def, L_obj,
L_attn) under the same noise, timesteps and box masks for every model (paired draws), each model prompted with
its own token for the type. On the built-in base (`defectfill-mini`, the default) each model also paints
every held-out mask of each type into a new defect-free disc, and the table gives the distance of those
regions to the real held-out defects in the colour/edge feature space of `defectfill.evaluate.metrics.mask_stats`
(lower is closer; one candidate, 20 DDIM steps, the defect prompt at `--guidance`, as docs/method.md's
"Sampling on defectfill-mini" measured). The un-fine-tuned base is the reference row.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from defectfill.config.sampling import resolve_sampling  # noqa: E402
from defectfill.config.stages import TrainConfig  # noqa: E402
from defectfill.data import make_split, open_layout  # noqa: E402
from defectfill.data.augment import random_box_mask  # noqa: E402
from defectfill.evaluate.metrics.mask_stats import feature_distance, mask_region_features  # noqa: E402
from defectfill.generate.generator import DefectGenerator  # noqa: E402
from defectfill.model.attention import AttentionRecorder  # noqa: E402
from defectfill.model.pipeline import load_pipeline  # noqa: E402
from defectfill.train.trainer import (  # noqa: E402
    MicroBatch,
    TrainingModels,
    defectfill_losses,
    load_references,
    prompt_inputs,
    train,
)

TYPES = ["scratch", "spot"]


def held_out_losses(pipe, config: TrainConfig, tokens: dict[str, str], data: Path, draws: int) -> dict[str, dict]:
    """Mean L_def, L_obj, L_attn of each type's held-out images over `draws` paired draws (seeded by draw)."""
    from diffusers import DDPMScheduler

    recorder = AttentionRecorder(pipe.unet)
    models = TrainingModels(pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer,
                            DDPMScheduler.from_config(pipe.scheduler.config), recorder, None)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    layout = open_layout(data)
    out = {}
    try:
        for t in tokens:  # the types this model draws
            split = make_split(layout, "disc", t)
            refs = load_references(dataclasses.replace(split, reference=split.held_out), config.resolution)
            prompts = prompt_inputs(pipe.tokenizer, config, [tokens[t]])
            sums = {"defect": 0.0, "object": 0.0, "attention": 0.0}
            for d in range(draws):
                gen = torch.Generator().manual_seed(1000 + d)
                n, r = refs.images.shape[0], config.resolution
                boxes = torch.stack([random_box_mask(r, r, gen, config.num_boxes, config.box_min, config.box_max)
                                     for _ in range(n)])
                batch = MicroBatch(refs.images, refs.masks, boxes, gen, refs.valid)
                with torch.no_grad():
                    terms = defectfill_losses(models, batch, prompts, config, torch.device("cpu"))
                for k in sums:
                    sums[k] += float(getattr(terms, k)) / draws
            out[t] = sums
    finally:
        recorder.remove()
    return out


def held_out_look(generator_for: dict[str, DefectGenerator], data: Path) -> dict[str, float]:
    """Per type: distance of what the generator paints into the held-out masks (each on a new defect-free disc)
    to the real held-out defects, in the mask-region feature space."""
    import numpy as np

    from defectfill.data import load_mask, load_rgb

    layout = open_layout(data)
    goods = sorted(layout.good_images("disc"))
    out = {}
    for t, generator in generator_for.items():
        split = make_split(layout, "disc", t)
        painted, real = [], []
        for i, (good, sample) in enumerate(zip(goods, split.held_out, strict=False)):
            mask = load_mask(sample.mask, sample.mask_rule)
            result = generator(load_rgb(good), mask, seed=i)
            painted.append(mask_region_features(np.asarray(result.image), mask))
            real.append(mask_region_features(np.asarray(load_rgb(sample.image)), mask))
        out[t] = feature_distance(np.stack(painted), np.stack(real))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="defectfill-mini", choices=("defectfill-mini", "tiny"),
                        help="the built-in base, or the untrained tiny pipeline (losses only)")
    parser.add_argument("--steps", type=int, default=120, help="steps of each per-type run")
    parser.add_argument("--draws", type=int, default=16, help="paired noise/timestep draws per held-out image")
    parser.add_argument("--guidance", type=float, default=1.0, help="sampling guidance of the painted regions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from defectfill.demo.dataset import make_demo_dataset
    from defectfill.model.tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_demo_dataset(tmp / "data", n_defect=9, categories={"disc": ("object", tuple(TYPES))})
        model = str(save_tiny_pipeline(tmp / "model")) if args.model == "tiny" else args.model
        look = args.model != "tiny"  # the untrained pipeline paints noise: only its losses are compared
        common = dict(data=str(data), category="disc", model=model, resolution=64, batch_size=3,
                      warmup_steps=10, lr_unet=1e-3, lr_text=2e-4, save_every=10**6, sample_every=0, log_every=10**6,
                      seed=args.seed, mixed_precision="no", compile="no")
        sampling = dict(candidates=1, steps=20, guidance=args.guidance)
        rows, looks = {}, {}
        base = TrainConfig(**common, defect_type="scratch", output=str(tmp / "unused"))
        name = f"base ({args.model})"
        base_pipe = load_pipeline(model)  # untouched by the loss pass (no_grad, its recorder removed after)
        rows[name] = held_out_losses(base_pipe, base, dict.fromkeys(TYPES, "sks"), data, args.draws)
        if look:
            plain = DefectGenerator(base_pipe, resolve_sampling(args.model)["prompt"].format(token="sks"), "sks", 64, **sampling)
            looks[name] = held_out_look(dict.fromkeys(TYPES, plain), data)
        per_type, per_type_look, seconds = {}, {}, 0.0
        for t in TYPES:
            pipe = load_pipeline(model)
            config = TrainConfig(**common, defect_type=t, steps=args.steps, output=str(tmp / f"disc-{t}"))
            start = time.perf_counter()
            train(config, pipe=pipe)
            seconds += time.perf_counter() - start
            per_type[t] = held_out_losses(pipe, config, {t: "sks"}, data, args.draws)[t]
            if look:
                per_type_look.update(held_out_look({t: DefectGenerator.from_run(config.output, prompt=resolve_sampling(args.model)[
                    "prompt"], **sampling)}, data))
        name = f"per type ({args.steps} steps each, {seconds:.0f} s)"
        rows[name], looks[name] = per_type, per_type_look
        pipe = load_pipeline(model)
        config = TrainConfig(**common, defect_type=",".join(TYPES), steps=args.steps * len(TYPES),
                             output=str(tmp / "disc"))
        start = time.perf_counter()
        train(config, pipe=pipe)
        seconds = time.perf_counter() - start
        name = f"per object ({args.steps * len(TYPES)} steps, {seconds:.0f} s)"
        rows[name] = held_out_losses(pipe, config, config.type_tokens(), data, args.draws)
        if look:
            drawer = DefectGenerator.from_run(config.output, defect_type=TYPES[0], prompt=resolve_sampling(args.model)["prompt"],
                                              **sampling)
            looks[name] = held_out_look({t: drawer.for_type(t) for t in TYPES}, data)
    print(header(f"one model per object vs one per type ({args.model}, demo disc: {', '.join(TYPES)})"))
    print(f"held-out losses, mean of {args.draws} paired draws per image (lower is better)")
    print(f"{'model':34} " + " ".join(f"{t + ' ' + k:>16}" for t in TYPES for k in ("L_def", "L_obj", "L_attn")))
    for name, losses in rows.items():
        print(f"{name:34} " + " ".join(f"{losses[t][k]:>16.5f}" for t in TYPES
                                       for k in ("defect", "object", "attention")))
    if looks:
        print(f"\npainted held-out masks: distance to the real defects (mask_stats features, guidance {args.guidance}; "
              "lower is closer)")
        print(f"{'model':34} " + " ".join(f"{t:>10}" for t in TYPES))
        for name, per in looks.items():
            print(f"{name:34} " + " ".join(f"{per[t]:>10.3f}" for t in TYPES))


if __name__ == "__main__":
    main()
