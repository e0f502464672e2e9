"""Images per second of `defectfill generate` (the whole writer: loading, sampling, LFS, paste-back, PNG files,
manifest), today's path against the throughput levers, on the same run and the same settings.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/generate_command.py            # tiny, 64 px, CPU
    python3 benchmarks/generate_command.py --device cuda --mixed-precision bf16 --count 64       # on a GPU

Ways (each a fresh `run_generate` into its own folder; the ways alternate, `--repeats` rounds):
  today     one image per pipeline call, PNG writes on the sampling thread (`--batch-images 1
            --no-background-writes`: the pipeline calls generation made before the levers)
  batched   `--batch-images K`, writes on the writer thread (the same seeds; images within float tolerance)
  solver    `batched` with `--scheduler dpm++ --steps S` (fewer steps: other images; its quality is the quality
            benchmark's question, not this one's)
The run is the base (`--model`, default the tiny pipeline) with a LoRA on the demo dataset (`make_run`). "load s" is `DefectGenerator.from_run` and its LPIPS network timed alone; "images/s" counts the whole command, "images/s
sampling" the command less its load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, median, table, write_rows  # noqa: E402

from defectfill.config.stages import GenerateConfig, TrainConfig  # noqa: E402
from defectfill.data import make_split, open_layout  # noqa: E402
from defectfill.demo.dataset import make_demo_dataset  # noqa: E402
from defectfill.generate.generator import DefectGenerator  # noqa: E402
from defectfill.generate.writer import run_generate  # noqa: E402
from defectfill.model.pipeline import add_lora, load_pipeline, save_lora_weights  # noqa: E402
from defectfill.model.tiny import save_tiny_pipeline  # noqa: E402
from defectfill.outputs.run_folder import write_run_files  # noqa: E402

WAYS = ("today", "batched", "solver")


def make_run(work: Path, resolution: int, base: str) -> Path:
    """A run folder as `defectfill train` writes it: the base (`tiny`: the tests' tiny pipeline) with a rank-4 LoRA
    (its values do not change the cost), the demo dataset's disc/scratch split."""
    data, run = work / "data", work / "run"
    make_demo_dataset(data, size=resolution)
    model = str(save_tiny_pipeline(work / "model")) if base == "tiny" else base
    pipe = load_pipeline(model)
    add_lora(pipe.unet, pipe.text_encoder, rank=4)
    run.mkdir(parents=True)
    save_lora_weights(run, pipe.unet, pipe.text_encoder)
    config = TrainConfig(data=str(data), category="disc", defect_type="scratch", output=str(run), model=model,
                         resolution=resolution)
    write_run_files(run, config, make_split(open_layout(data), "disc", "scratch"))
    return run


def settings(args: argparse.Namespace, run: Path, out: Path, way: str) -> GenerateConfig:
    extra = {"today": {"batch_images": 1, "background_writes": False},
             "batched": {"batch_images": args.batch_images, "background_writes": True},
             "solver": {"batch_images": args.batch_images, "background_writes": True, "scheduler": "dpm++",
                        "steps": args.solver_steps}}[way]
    base = {"run": str(run), "output": str(out), "count": args.count, "candidates": args.candidates,
            "steps": args.steps, "guidance": args.guidance, "scheduler": "ddim", "masks": "shapes",
            "lpips_random_backbone": True, "device": args.device, "mixed_precision": args.mixed_precision,
            "compile": args.compile, "preview_rows": 0, "with_good": False}
    return GenerateConfig(**{**base, **extra})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (the tests' tiny pipeline), defectfill-mini, or a base folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--count", type=int, default=16, help="images per command")
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of today and batched")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-images", type=int, default=8, help="K of batched and solver")
    p.add_argument("--solver-steps", type=int, default=10, help="dpm++ steps of the solver way")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    p.add_argument("--repeats", type=int, default=2, help="rounds; the ways alternate within each")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--compile", choices=["no", "yes"], default="no")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="defectfill-bench-gencmd-"))
    run = make_run(work, args.resolution, args.model)
    t0 = time.perf_counter()
    gen = DefectGenerator.from_run(run, device=args.device, mixed_precision=args.mixed_precision,
                                   compile=args.compile, lpips_pretrained=False)
    assert gen.scorer is not None  # the LPIPS network loads with it, as in the command
    load = time.perf_counter() - t0
    seconds: dict[str, list[float]] = {w: [] for w in args.ways}
    for r in range(args.repeats):
        order = args.ways[r % len(args.ways):] + args.ways[:r % len(args.ways)]
        for way in order:
            out = work / f"out-{way}-{r}"
            t0 = time.perf_counter()
            run_generate(settings(args, run, out, way))
            seconds[way].append(time.perf_counter() - t0)
            print(f"  round {r} {way}: {seconds[way][-1]:.2f} s for {args.count} images", file=sys.stderr, flush=True)
    rows = []
    for way, times in seconds.items():
        med = median(times)
        steps = args.solver_steps if way == "solver" else args.steps
        rows.append({
            "base": args.model, "way": way, "scheduler": "dpm++" if way == "solver" else "ddim", "steps": steps,
            "images per call": 1 if way == "today" else args.batch_images, "N": args.candidates,
            "px": args.resolution, "device": args.device, "precision": args.mixed_precision, "count": args.count,
            "median s": f"{med:.2f}", "load s": f"{load:.2f}", "images/s": f"{args.count / med:.3f}",
            "images/s sampling": f"{args.count / max(med - load, 1e-9):.3f}", "_seconds": times,
        })
    if "today" in seconds:
        today = median(seconds["today"])
        for row in rows:
            row["x today"] = f"{today / median(seconds[row['way']]):.2f}"
    cols = ["base", "way", "scheduler", "steps", "images per call", "N", "px", "device", "precision", "count", "median s",
            "load s", "images/s", "images/s sampling", "x today"]
    print(header(f"defectfill generate, {args.count} images per command ({args.repeats} rounds)"))
    print(table(rows, cols))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
