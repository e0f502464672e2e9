"""Time and peak memory of one optimiser step: our DefectFill step against the floor and the naive step.

    .venv/bin/python benchmarks/train_step.py --size tiny            # tiny pipeline, 64 and 128 px
    .venv/bin/python benchmarks/train_step.py --size sd2             # SD2-inpainting shapes, 256 px, batch 1
    .venv/bin/python benchmarks/train_step.py --size sd2 --device cuda --mixed-precision bf16 \
        --gradient-checkpointing --resolution 512 --batch-size 4     # on a GPU

Modes, on the same model, the same inputs and in the same process:
  ours   `defectfill.train.trainer.defectfill_losses`: both branches in one UNet call (batch 2B), the token's maps
         recorded on decoder cross-attention only, text encoded once per step.
  floor  a plain LoRA inpainting step at batch 2B: one UNet call, stock (SDPA) attention everywhere,
         one MSE; the same VAE/text work. What the UNet batch costs with none of DefectFill's extras.
  naive  `defectfill.train.naive_step.naive_losses`: one UNet call per branch and an attention store on every
         attention layer (how the public re-implementations do it, but with the maps' gradient kept).
Each step = losses + backward + AdamW step + zero_grad. Rounds interleave the modes (order rotated each
round) so a shared machine's load affects them alike; warm-up rounds are not timed; medians are reported.
With --compile yes, ours and floor run the UNet and VAE encoder compiled the same way (`train.compile_models`);
"first s" is each mode's first step, compilation included (naive is left out: it is the eager reference).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_pipeline, gib, header, measured, median, synthetic_references, table, write_rows  # noqa: E402

from defectfill.config.stages import TrainConfig  # noqa: E402
from defectfill.model.pipeline import encode_inpaint_condition, unet_input  # noqa: E402
from defectfill.train.naive_step import AttentionStore, naive_losses  # noqa: E402
from defectfill.train.trainer import build_models, compile_models, defectfill_losses, make_micro_batch, prompt_inputs  # noqa: E402

MODES = ("ours", "floor", "naive")


def floor_loss(models, batch, prompts, device: torch.device, autocast=nullcontext) -> torch.Tensor:
    """Plain LoRA inpainting at batch 2B: our step's inputs, one UNet call, one MSE, no recording."""
    vae, unet, sched = models.vae, models.unet, models.noise_scheduler
    b = batch.images.shape[0]
    gen = batch.generator
    images = batch.images.to(device, vae.dtype)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(gen) * vae.config.scaling_factor
        mask_lat, masked_lat = encode_inpaint_condition(
            vae, torch.cat([images, images]), torch.cat([batch.masks, batch.box_masks]).to(device, vae.dtype), gen)
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=gen).to(device)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    unet_call = unet if models.unet_call is None else models.unet_call  # compiled with --compile yes
    with autocast():
        text = models.text_encoder(prompts.input_ids.to(device))[0]
        text = torch.cat([text[0:1].expand(b, -1, -1), text[1:2].expand(b, -1, -1)])
        pred = unet_call(unet_input(torch.cat([noisy, noisy]), mask_lat, masked_lat).to(unet.dtype),
                    torch.cat([timesteps, timesteps]), encoder_hidden_states=text).sample
    return F.mse_loss(pred.float(), torch.cat([noise, noise]))


def bench_resolution(args: argparse.Namespace, resolution: int) -> list[dict]:
    """Every mode at one resolution, for each gradient-checkpointing setting asked for (one model build)."""
    device = torch.device(args.device)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    config = TrainConfig(category="metal_nut", defect_type="scratch", resolution=resolution,
                         batch_size=args.batch_size, mixed_precision=args.mixed_precision, seed=0)
    models = build_models(config, device, weight_dtype, pipe=build_pipeline(args.size))
    if args.compile == "yes":
        compile_models(models)
    rows = []
    for ckpt in (["no", "yes"] if args.gradient_checkpointing == "both" else [args.gradient_checkpointing]):
        if ckpt == "yes":
            models.unet.enable_gradient_checkpointing()
        else:
            models.unet.disable_gradient_checkpointing()
        rows += bench_modes(args, models, config, device, weight_dtype, resolution, ckpt)
    return rows


def bench_modes(args: argparse.Namespace, models, config: TrainConfig, device: torch.device,
                weight_dtype: torch.dtype, resolution: int, ckpt: str) -> list[dict]:
    models.unet.train()
    models.text_encoder.train()
    prompts = prompt_inputs(models.tokenizer, config)
    ours_procs = dict(models.unet.attn_processors)  # recorder on decoder cross-attention, SDPA elsewhere
    stock_procs = dict(models.recorder._original)  # SDPA everywhere
    params = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if device.type == "cuda" or weight_dtype != torch.float32:
        autocast = lambda: torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)  # noqa: E731
    else:
        autocast = nullcontext
    refs, ref_masks = synthetic_references(3, resolution)

    def step(mode: str, i: int) -> dict:
        batch = make_micro_batch(refs, ref_masks, config, i, 0, 0, 1)  # the same draws for every mode
        with measured(device) as m:
            if mode == "naive":
                with AttentionStore(models.unet) as store:  # kept installed through backward (checkpointing)
                    naive_losses(models, batch, prompts, config, device, store, autocast).total.backward()
            else:
                models.unet.set_attn_processor(dict(ours_procs if mode == "ours" else stock_procs))
                if mode == "ours":
                    loss = defectfill_losses(models, batch, prompts, config, device, autocast).total
                else:
                    loss = floor_loss(models, batch, prompts, device, autocast)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return m

    modes = [m for m in MODES if m in args.modes]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    first: dict[str, float] = {}
    for r in range(args.warmup + args.iters):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            m = step(mode, r)
            first.setdefault(mode, m["seconds"])
            if r >= args.warmup:
                results[mode].append(m)
            print(f"  {args.size} {resolution}px ckpt {ckpt} round {r}{' (warm-up)' if r < args.warmup else ''} "
                  f"{mode}: {m['seconds']:.3f} s", file=sys.stderr, flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for mode in modes:
            with profile(activities=activities) as prof:
                step(mode, args.warmup + args.iters)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"### profile {args.size} {resolution}px ckpt {ckpt} {mode}\n"
                  + prof.key_averages().table(sort_by=key, row_limit=args.profile), flush=True)
    models.unet.set_attn_processor(dict(ours_procs))

    rows = []
    med = {mode: median([m["seconds"] for m in ms]) for mode, ms in results.items()}
    for mode, ms in results.items():
        peak = max(m["rss_peak"] for m in ms)
        rows.append({
            "size": args.size, "px": resolution, "B": args.batch_size, "device": args.device,
            "precision": args.mixed_precision, "ckpt": ckpt, "compile": args.compile,
            "mode": mode, "first s": f"{first[mode]:.1f}", "median s/step": f"{med[mode]:.4f}",
            "min s": f"{min(m['seconds'] for m in ms):.4f}", "max s": f"{max(m['seconds'] for m in ms):.4f}",
            "peak RSS GiB": gib(peak), "RSS rise GiB": gib(max(m["rss_peak"] - m["rss_start"] for m in ms)),
            "peak GPU alloc GiB": gib(max(m["gpu_peak"] for m in ms)) if device.type == "cuda" else "-",
            "ours/mode": f"{med['ours'] / med[mode]:.3f}" if "ours" in med else "-",
            "_seconds": [m["seconds"] for m in ms],
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "mini", "sd2"], default="tiny", help="mini: the built-in base defectfill-mini")
    p.add_argument("--resolution", type=int, nargs="+", default=None, help="default: tiny 64 128, sd2 256")
    p.add_argument("--batch-size", type=int, default=None, help="reference images B (UNet batch 2B); default tiny 4, sd2 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--gradient-checkpointing", nargs="?", const="yes", default="no", choices=["no", "yes", "both"],
                   help="UNet gradient checkpointing; `both`: time without, then with, on the same model")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default tiny 3, sd2 1)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default tiny 10, sd2 3)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--compile", choices=["no", "yes"], default="no",
                   help="torch.compile the UNet and VAE encoder for ours and floor (backend: $DEFECTFILL_COMPILE_BACKEND "
                        "or inductor)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step per mode with torch.profiler and print its top N ops")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.size in ("tiny", "mini")
    args.resolution = args.resolution or ([64, 128] if args.size == "tiny" else [64] if tiny else [256])
    args.batch_size = args.batch_size or (4 if tiny else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if tiny else 1)
    args.iters = args.iters if args.iters is not None else (10 if tiny else 3)
    if args.compile == "yes" and "naive" in args.modes:  # naive swaps every processor: a graph of its own
        args.modes = [m for m in args.modes if m != "naive"]
        print("--compile yes: naive left out (it is the eager reference)", file=sys.stderr)

    rows = []
    for res in args.resolution:
        rows += bench_resolution(args, res)
    cols = ["size", "px", "B", "device", "precision", "ckpt", "compile", "mode", "first s", "median s/step", "min s",
            "max s",
            "peak RSS GiB", "RSS rise GiB", "peak GPU alloc GiB", "ours/mode"]
    print(header(f"train_step --size {args.size}  (warm-up {args.warmup}, timed {args.iters} rounds)"))
    print(table(rows, cols))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
