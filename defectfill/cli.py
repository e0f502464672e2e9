"""The `defectfill` command: train, generate, evaluate, run, demo, make-demo-data, data, pretrain-base, ui.

User-input problems raise `DefectFillError`; they are printed as one clear
message (no traceback) and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from defectfill import __version__
from defectfill.errors import DefectFillError


def _train(args: argparse.Namespace) -> int:
    from defectfill.config import TrainConfig
    from defectfill.train import train

    out = train(TrainConfig.from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
        print(f"LoRA written to {out}/pytorch_lora_weights.safetensors")
    return 0


def _make_demo_data(args: argparse.Namespace) -> int:
    from defectfill.demo_data import make_demo_dataset
    from defectfill.folders import claim_folder

    if args.size < 32:
        raise DefectFillError(f"--size {args.size}: the drawn parts need at least 32 pixels a side.")
    root = make_demo_dataset(claim_folder(args.dir, "make-demo-data", flag="DIR"), size=args.size)
    print(f"demo dataset (MVTec AD layout) written to {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from defectfill.config import EvaluateConfig, GenerateConfig, RunConfig, TrainConfig
    from defectfill.demo import add_demo_arguments, demo_command
    from defectfill.evaluate import evaluate_command
    from defectfill.generate import generate_command
    from defectfill.inspect_data import add_arguments as add_data_arguments
    from defectfill.inspect_data import data_command
    from defectfill.runner import run_command

    parser = argparse.ArgumentParser(prog="defectfill", description="Few-shot realistic defect image generation (DefectFill).")
    parser.add_argument("--version", action="version", version=f"defectfill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # (name, help, settings class, command)
    stages = [
        ("train", "fine-tune SD2 inpainting with LoRA on one defect type", TrainConfig, _train),
        ("generate", "paint the learned defect into defect-free images (MVTec layout out)", GenerateConfig,
         generate_command),
        ("evaluate", "KID, IC-LPIPS and downstream inspection metrics, with a report", EvaluateConfig,
         evaluate_command),
        ("run", "train, generate and evaluate every defect type of a category, with one report", RunConfig,
         run_command),
    ]
    for name, help_text, settings, command in stages:
        p = sub.add_parser(name, help=help_text, description=help_text)
        settings.add_arguments(p)
        p.set_defaults(func=command)

    p = sub.add_parser("demo", help="the whole job on a drawn dataset and a tiny model: no data, GPU or network")
    add_demo_arguments(p)
    p.set_defaults(func=demo_command)

    p = sub.add_parser("make-demo-data", help="write a small procedurally drawn MVTec-layout dataset")
    p.add_argument("dir", help="folder to write")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=_make_demo_data)

    from defectfill.pretrain import add_arguments as add_pretrain_arguments
    from defectfill.pretrain import pretrain_command

    help_text = "pretrain a small inpainting base (defectfill-mini) on a procedurally drawn world, on the CPU"
    p = sub.add_parser("pretrain-base", help=help_text, description=help_text)
    add_pretrain_arguments(p)
    p.set_defaults(func=pretrain_command)

    help_text = ("what a dataset holds as train reads it: layout, categories, defect types with their counts, "
                 "the reference/held-out split and every problem (reads no model, writes nothing)")
    p = sub.add_parser("data", help=help_text, description=help_text)
    add_data_arguments(p)
    p.set_defaults(func=data_command)

    from defectfill.ui import add_arguments as add_ui_arguments  # no gradio import: the extra is optional

    help_text = ("a local browser app: draw a mask on a defect-free image, see the candidates with their LFS "
                 "scores, add the good ones to a dataset, curate it (needs pip install 'defectfill[ui]')")
    p = sub.add_parser("ui", help=help_text, description=help_text)
    add_ui_arguments(p)
    p.set_defaults(func=_ui)
    return parser


def _ui(args: argparse.Namespace) -> int:
    from defectfill.ui import ui_command

    return ui_command(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("defectfill").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DefectFillError as exc:
        print(f"defectfill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"defectfill {args.command}: interrupted; {_again(args.command)} to continue.", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every write is atomic, so what was finished is intact and a rerun continues from it
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"defectfill {args.command}: error: no space left on the disk{where}. Free some space, then "
              f"{_again(args.command)} to continue where it stopped.", file=sys.stderr)
        return 2


def _again(command: str) -> str:
    return "rerun with --resume latest" if command == "train" else "rerun the same command"


if __name__ == "__main__":
    sys.exit(main())
