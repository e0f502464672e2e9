"""Shared by the benchmarks: the SD2-inpainting architecture with random weights, synthetic inputs,
peak-memory measurement and table printing."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch


def build_sd2_pipeline(seed: int = 0):
    """SD2 inpainting built from its published configuration (random weights; the values are listed in
    docs/sd2-inpainting-architecture.md): timings on the real shapes without a download."""
    from defectfill.model.networks import SD2, build_networks
    from defectfill.model.tiny import assemble_inpaint_pipeline

    unet, vae, text_encoder = build_networks(SD2, 512, seed)
    return assemble_inpaint_pipeline(unet, vae, text_encoder)


def build_pipeline(size: str, seed: int = 0):
    if size == "tiny":
        from defectfill.model.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed)
    if size == "sd2":
        return build_sd2_pipeline(seed)
    if size == "mini":  # the built-in base, its trained weights
        from defectfill.model.pipeline import load_pipeline

        return load_pipeline("defectfill-mini")
    raise SystemExit(f"--size {size!r}: tiny, mini or sd2")


def synthetic_references(n: int, resolution: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n smooth random images (n,3,R,R) in [-1,1] and ellipse defect masks (n,1,R,R) in {0,1}."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic").clamp(-1, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
    masks = []
    for i in range(n):
        cy, cx = 0.3 * (i % 3 - 1), -0.2 * (i % 2)
        masks.append((((yy - cy) / 0.25) ** 2 + ((xx - cx) / 0.12) ** 2 <= 1).float())
    return images, torch.stack(masks)[:, None]


def synthetic_image_and_mask(resolution: int, seed: int = 0):
    """A PIL RGB image and an (R,R) bool ellipse mask for generation."""
    from PIL import Image

    images, masks = synthetic_references(1, resolution, seed)
    arr = ((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr), masks[0, 0].numpy() > 0.5


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set every few ms in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@contextmanager
def measured(device: torch.device):
    """Yields a dict that gets seconds, start RSS, peak RSS and (CUDA) peak allocated bytes of the block."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        yield out
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["seconds"] = time.perf_counter() - t0
    out["rss_start"] = start_rss
    out["rss_peak"] = peak.peak
    if device.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    desc = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    else:
        desc += ", no GPU"
    return desc


def header(title: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"## {title}\n{now}; {machine()}; load average at the end {load}; "
            f"process max RSS {gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} GiB")


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (dicts) in the order of `columns`."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(x) for x in cells])


def write_rows(path: str | None, rows: list[dict]) -> None:
    """With `--json PATH`: the command line and every row (with its timed samples) as JSON."""
    if path:
        import json
        import sys
        from pathlib import Path

        Path(path).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1, default=str))
