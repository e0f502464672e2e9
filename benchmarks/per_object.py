"""One model per object against one model per defect type, at equal training compute, on the tiny pipeline.

    .venv/bin/python benchmarks/per_object.py --steps 40      # per type 40 steps each; per object 40 x types

Trains, on the drawn demo data's `disc` (scratch, spot), one run per type (`--token sks`, the default) and one
per-object run (`--defect-type scratch,spot`, a new token per type) with as many steps as the per-type runs
together, then scores every model on each type's HELD-OUT images with the training losses (L_def, L_obj,
L_attn) under the same noise, timesteps and box masks for every model (paired draws), each model prompted with
its own token for the type. The untrained base is the reference row. The tiny pipeline is untrained and
drawn data is simple: the figures show whether per-object training keeps up, not defect quality.
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

from defectfill.attention import AttentionRecorder  # noqa: E402
from defectfill.config import TrainConfig  # noqa: E402
from defectfill.data import make_split, open_layout  # noqa: E402
from defectfill.data.augment import random_box_mask  # noqa: E402
from defectfill.model import load_pipeline  # noqa: E402
from defectfill.train import MicroBatch, TrainingModels, defectfill_losses, load_references, prompt_inputs, train  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps of each per-type run")
    parser.add_argument("--draws", type=int, default=16, help="paired noise/timestep draws per held-out image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from defectfill.demo_data import make_demo_dataset
    from defectfill.tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data = save_tiny_pipeline(tmp / "model"), make_demo_dataset(tmp / "data")
        common = dict(data=str(data), category="disc", model=str(model), resolution=64, batch_size=2,
                      warmup_steps=5, lr_unet=1e-3, lr_text=2e-4, save_every=10**6, sample_every=0, log_every=10**6,
                      seed=args.seed, mixed_precision="no", compile="no")
        rows = {}
        base = TrainConfig(**common, defect_type="scratch", output=str(tmp / "unused"))
        rows["base (untrained)"] = held_out_losses(load_pipeline(str(model)), base,
                                                   dict.fromkeys(TYPES, "sks"), data, args.draws)
        per_type, seconds = {}, 0.0
        for t in TYPES:
            pipe = load_pipeline(str(model))
            config = TrainConfig(**common, defect_type=t, steps=args.steps, output=str(tmp / f"disc-{t}"))
            start = time.perf_counter()
            train(config, pipe=pipe)
            seconds += time.perf_counter() - start
            per_type[t] = held_out_losses(pipe, config, {t: "sks"}, data, args.draws)[t]
        rows[f"per type ({args.steps} steps each, {seconds:.0f} s)"] = per_type
        pipe = load_pipeline(str(model))
        config = TrainConfig(**common, defect_type=",".join(TYPES), steps=args.steps * len(TYPES),
                             output=str(tmp / "disc"))
        start = time.perf_counter()
        train(config, pipe=pipe)
        seconds = time.perf_counter() - start
        rows[f"per object ({args.steps * len(TYPES)} steps, {seconds:.0f} s)"] = held_out_losses(
            pipe, config, config.type_tokens(), data, args.draws)
    print(header("one model per object vs one per type (tiny pipeline, demo disc: scratch, spot)"))
    print(f"held-out losses, mean of {args.draws} paired draws per image (lower is better)")
    print(f"{'model':34} " + " ".join(f"{t + ' ' + k:>16}" for t in TYPES for k in ("L_def", "L_obj", "L_attn")))
    for name, losses in rows.items():
        print(f"{name:34} " + " ".join(f"{losses[t][k]:>16.5f}" for t in TYPES
                                       for k in ("defect", "object", "attention")))


if __name__ == "__main__":
    main()
