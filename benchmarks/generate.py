"""Seconds per selected image with Low-Fidelity Selection, batched candidates against one at a time,
and where the time goes (UNet, VAE, text encoder, LPIPS, saving, the rest).

    .venv/bin/python benchmarks/generate.py --size tiny                # 64 and 128 px, 20 DDIM steps
    .venv/bin/python benchmarks/generate.py --size sd2                 # SD2 shapes, 256 px, 2 DDIM steps
    .venv/bin/python benchmarks/generate.py --size sd2 --device cuda --dtype bf16 --resolution 512 --steps 50

One "selected image" = `DefectGenerator(image, mask, seed)` (N candidates, paste-back, LPIPS selection)
plus writing the chosen image and its mask as PNG, as `defectfill generate` does. The model is the
pipeline with an (unfused) rank-8 LoRA on UNet and text encoder, as `from_run` loads it; LPIPS is the
real AlexNet LPIPS with a random backbone (same cost, no download). Per-part times come from wrapping
the modules' calls (synchronised on CUDA); "rest" is everything else (scheduler, pre-processing,
resizing, paste-back, PIL conversions).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_pipeline, gib, header, measured, median, synthetic_image_and_mask, table, write_rows  # noqa: E402

from defectfill.config.settings import compile_module  # noqa: E402
from defectfill.generate.generator import DefectGenerator, LPIPSScorer, _scheduler, merge_lora_weights  # noqa: E402
from defectfill.model.lpips import load_lpips  # noqa: E402
from defectfill.model.pipeline import LORA_WEIGHTS_NAME, add_lora, save_lora_weights  # noqa: E402
from defectfill.outputs.generated import save_png as _save_png  # noqa: E402

PARTS = ("unet", "vae", "text", "lpips", "save")


class Timers:
    """Accumulated seconds per part; `wrap` times every call of a callable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[part] += time.perf_counter() - t0
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)


def bench_resolution(args: argparse.Namespace, resolution: int) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
    pipe = build_pipeline(args.size)
    # the LoRA goes through a saved file and diffusers' loader, as `DefectGenerator.from_run` loads a run
    add_lora(pipe.unet, pipe.text_encoder, 8)
    lora_dir = tempfile.mkdtemp(prefix="defectfill-bench-lora-")
    save_lora_weights(lora_dir, pipe.unet, pipe.text_encoder)
    pipe = build_pipeline(args.size)
    pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS_NAME)
    if args.merge_lora:
        merge_lora_weights(pipe)
    pipe.scheduler = _scheduler(pipe, args.scheduler)  # from the base's scheduler config, as `from_run` builds it
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    if args.compile == "yes":
        pipe.unet = compile_module(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    timers = Timers(device)
    # instance attributes shadow the methods the pipeline calls
    pipe.unet.forward = timers.wrap("unet", pipe.unet.forward)
    pipe.text_encoder.forward = timers.wrap("text", pipe.text_encoder.forward)
    pipe.vae.encode = timers.wrap("vae", pipe.vae.encode)
    pipe.vae.decode = timers.wrap("vae", pipe.vae.decode)
    scorer = LPIPSScorer(load_lpips(pretrained_backbone=False, device=device))
    scorer_timed = timers.wrap("lpips", scorer)
    image, mask = synthetic_image_and_mask(resolution)
    out_dir = Path(tempfile.mkdtemp(prefix="defectfill-bench-gen-"))

    k = args.batch_images

    def one(batch_size: int, steps: int, seed: int) -> tuple[dict, dict]:
        """K selected images (`generate_many`, K images per call); seconds and parts are per selected image."""
        gen = DefectGenerator(pipe, "A metal nut with sks", "sks", resolution, candidates=args.candidates,
                              steps=steps, guidance=args.guidance, batch_size=batch_size, batch_images=k,
                              scorer=scorer_timed, device=device)
        timers.reset()
        with measured(device) as m:
            results = gen.generate_many([(image, mask, seed * k + i) for i in range(k)])
            for i, result in enumerate(results):
                name = f"{seed * k + i:04d}"
                timers.wrap("save", lambda r=result, n=name: (
                    _save_png(r.image, out_dir / f"{n}.png"),
                    _save_png(Image.fromarray(r.mask.astype(np.uint8) * 255, mode="L"), out_dir / f"{n}_mask.png")))()
        m["seconds"] /= k
        return m, {part: t / k for part, t in timers.seconds.items()}

    # warm-up: first calls allocate and pick kernels (and compile, with --compile yes)
    warm_up_seconds = one(args.candidates, 1, 999)[0]["seconds"]
    rows = []
    for label, bs in (("batched", args.candidates), ("one at a time", 1)):
        if label.split()[0] not in args.ways:
            continue
        runs = [one(bs, args.steps, s) for s in range(args.repeats)]
        for r, (m, _) in enumerate(runs):
            print(f"  {args.size} {resolution}px {label} repeat {r}: {m['seconds']:.3f} s", file=sys.stderr, flush=True)
        total = median([m["seconds"] for m, _ in runs])
        parts = {p: median([s[p] for _, s in runs]) for p in PARTS}
        row = {
            "size": args.size, "px": resolution, "device": args.device, "dtype": args.dtype,
            "LoRA": "merged" if args.merge_lora else "layers", "compile": args.compile,
            "warm-up s": f"{warm_up_seconds:.1f}",
            "scheduler": args.scheduler, "steps": args.steps, "N": args.candidates, "candidates": label,
            "images per call": k,
            "s/selected image": f"{total:.3f}",
            **{f"{p} %": f"{100 * parts[p] / total:.1f}" for p in PARTS},
            "rest %": f"{100 * (total - sum(parts.values())) / total:.1f}",
            "outside UNet %": f"{100 * (1 - parts['unet'] / total):.1f}",
            "peak RSS GiB": gib(max(m["rss_peak"] for m, _ in runs)),
            "peak GPU alloc GiB": gib(max(m["gpu_peak"] for m, _ in runs)) if device.type == "cuda" else "-",
            "_seconds": [m["seconds"] for m, _ in runs], "_parts": parts,
        }
        rows.append(row)
    if len(rows) == 2:
        rows[1]["one-at-a-time/batched"] = f"{float(rows[1]['s/selected image']) / float(rows[0]['s/selected image']):.2f}"
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "sd2"], default="tiny")
    p.add_argument("--resolution", type=int, nargs="+", default=None, help="default: tiny 64 128, sd2 256")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default tiny 20, sd2 2; the method uses 50)")
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--batch-images", type=int, default=1,
                   help="images whose candidates share each pipeline call (a timed repeat is that many images)")
    p.add_argument("--scheduler", default="ddim", help="ddim, dpm++, unipc, ... (SamplingConfig's choices)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=None, help="timed images per setting (default tiny 3, sd2 1)")
    p.add_argument("--ways", nargs="+", choices=["batched", "one"], default=["batched", "one"],
                   help="batched: all candidates in one pipeline call; one: one candidate per call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the LoRA into the weights, as generation does (--no-merge-lora: LoRA layers)")
    p.add_argument("--compile", choices=["no", "yes"], default="no", help="torch.compile the UNet")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.size == "tiny"
    args.resolution = args.resolution or ([64, 128] if tiny else [256])
    args.steps = args.steps or (20 if tiny else 2)
    args.repeats = args.repeats or (3 if tiny else 1)
    rows = []
    for res in args.resolution:
        rows += bench_resolution(args, res)
    cols = ["size", "px", "device", "dtype", "LoRA", "compile", "warm-up s", "scheduler", "steps", "N", "images per call", "candidates",
            "s/selected image",
            *(f"{p} %" for p in PARTS), "rest %", "outside UNet %", "peak RSS GiB", "peak GPU alloc GiB",
            "one-at-a-time/batched"]
    print(header(f"generate --size {args.size}  (warm-up 1 image at 1 step, {args.repeats} timed image(s) each)"))
    print(table(rows, cols))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
