"""`defectfill ui`: a local browser app to place defects, judge candidates and curate a generated dataset.

This module parses the command and checks the binding; it imports no gradio, so the core package (and
`defectfill --help`) works without the optional `ui` extra. The page is `defectfill.ui.app`; what it
does, without gradio, is `defectfill.ui.backend`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from defectfill.core.errors import DefectFillError

INSTALL_HINT = "pip install 'defectfill[ui]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="runs",
                        help="folder of training runs, scanned for finished ones (default: runs)")
    parser.add_argument("--run", action="append", default=[],
                        help="a run folder to offer (repeatable); with it, --runs is not scanned unless given too")
    parser.add_argument("--datasets", default="datasets",
                        help="folder under which the app writes and browses generated datasets (default: datasets)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; another needs --auth)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="a login the page asks for")
    parser.add_argument("--auth-file", default=None, metavar="FILE", help="logins, one USER:PASSWORD a line")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when there is one)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                        help="pipeline weights: auto is bf16/fp16 on a GPU, full precision on a CPU")
    parser.add_argument("--lpips-weights", default=None, help="local AlexNet weights for LPIPS (offline machines)")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="LPIPS with an untrained AlexNet (no download): demos and tests only")


def require_gradio() -> None:
    """A clear message when the optional extra is missing, instead of an ImportError deep in the app."""
    for module in ("gradio", "gradio_client"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise DefectFillError(f"`defectfill ui` needs {module}, which is not installed. Install the "
                                  f"browser UI extra: {INSTALL_HINT}") from None


def run_roots(args: argparse.Namespace) -> list[Path]:
    """The folders runs are offered from: each --run, plus --runs when no --run is given or when set explicitly."""
    roots = [Path(r).expanduser() for r in args.run]
    for r in roots:
        if not r.is_dir():
            raise DefectFillError(f"--run {r}: folder not found. Pass the output folder of `defectfill train`.")
    runs = Path(args.runs).expanduser()
    if not roots or args.runs != "runs":
        if not runs.is_dir():
            raise DefectFillError(f"--runs {runs}: folder not found. Pass the folder that holds your training "
                                  "runs, or --run RUN.")
        roots.append(runs)
    return roots


def ui_command(args: argparse.Namespace) -> int:
    from defectfill.ui.backend import check_bind, read_auth

    logins = read_auth(args.auth, args.auth_file)
    check_bind(args.host, logins)  # before anything is loaded or served
    roots = run_roots(args)
    require_gradio()
    from defectfill.ui.app import build_app, launch
    from defectfill.ui.backend import Workspace

    workspace = Workspace(roots, args.datasets, device=args.device, mixed_precision=args.mixed_precision,
                          lpips_weights=args.lpips_weights, lpips_random_backbone=args.lpips_random_backbone)
    if not workspace.runs():
        raise DefectFillError(f"no finished run under {', '.join(str(r) for r in roots)} (a folder with config.json "
                              "and pytorch_lora_weights.safetensors). Train one with `defectfill train`.")
    launch(build_app(workspace), workspace, host=args.host, port=args.port, logins=logins, block=True)
    return 0
