"""The `defectfill` command: train, generate, evaluate, run, demo, make-demo-data, data, export, pretrain-base, ui.

User-input problems raise `DefectFillError`; they are printed as one clear
message (no traceback) and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from defectfill import __version__
from defectfill.core.errors import DefectFillError


def _train(args: argparse.Namespace) -> int:
    from defectfill.config.stages import TrainConfig
    from defectfill.train.trainer import train

    config = TrainConfig.from_args(args)
    out = train(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
        print(f"LoRA written to {out}/pytorch_lora_weights.safetensors")
        from defectfill.run.token_check import after_training

        after_training(out, config)
    return 0


MAX_DEMO_SIZE = 2048


def _make_demo_data(args: argparse.Namespace) -> int:
    from defectfill.core.folders import claim_folder
    from defectfill.demo.dataset import make_demo_dataset

    if args.size < 32:
        raise DefectFillError(f"--size {args.size}: the drawn parts need at least 32 pixels a side.")
    if args.size > MAX_DEMO_SIZE:  # 36 images of this side are drawn in memory
        raise DefectFillError(f"--size {args.size}: at most {MAX_DEMO_SIZE} pixels a side (the demo is for small "
                              "images; 64 is the default).")
    root = make_demo_dataset(claim_folder(args.dir, "make-demo-data", flag="DIR"), size=args.size)
    print(f"demo dataset (MVTec AD layout) written to {root}")
    return 0


def _command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand's function, imported when the subcommand runs: building the parser imports no stage (and so
    no torch), and a broken stage module fails loudly when its command is used."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    run.__qualname__ = run.__name__ = f"{module}.{function}"
    return run


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings if o.startswith("--")]


def _suggestion(word: str, known: list[str]) -> str:
    """' (did you mean X?)' for the known word closest to a mistyped one, or ''."""
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" message, each mistyped flag followed by the closest real one."""
    known = _options(parser)
    hints = [_suggestion(e.split("=", 1)[0], known).strip(" ()") for e in extras if e.startswith("--")]
    return "unrecognized arguments: " + " ".join(extras) + "".join(f"; {h}" for h in hints if h)


def _invalid_choice(message: str) -> str:
    """argparse's "invalid choice: 'x' (choose from ...)" with the closest choice named first."""
    match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not match:
        return message
    choices = re.findall(r"'([^']*)'|([^\s,]+)", match.group(2))
    names = [a or b for a, b in choices]
    return message + _suggestion(match.group(1), names)


class _TopParser(argparse.ArgumentParser):
    """The top-level parser: a flag no subcommand knows is refused by that subcommand's parser (its usage, not
    the top level's), with the closest flag it has; a mistyped subcommand, with the closest one."""

    subcommands: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.subcommands.get(getattr(parsed, "command", None) or "", self)
            parser.error(_unrecognized(parser, extras))
        return parsed

    def error(self, message: str):  # type: ignore[override]
        super().error(_invalid_choice(message))


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments may come from a module that imports torch (`add_arguments`
    names it, as "module:function"): they are added when the subcommand is parsed or its help is shown, so
    `defectfill --help` stays quick. A value outside a flag's choices is refused with the closest choice."""

    def error(self, message: str):  # type: ignore[override]
        super().error(_invalid_choice(message))

    def __init__(self, *args: Any, add_arguments: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _complete(self) -> None:
        if self._add_arguments is not None:
            module, function = self._add_arguments.split(":")
            self._add_arguments = None
            getattr(importlib.import_module(module), function)(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand. The settings classes and argument adders used here import no torch; demo's and
    pretrain-base's arguments are added when those subcommands are parsed."""
    from defectfill.config.settings import flag
    from defectfill.config.stages import EvaluateConfig, GenerateConfig, RunConfig, TrainConfig
    from defectfill.data.inspection import add_arguments as add_data_arguments
    from defectfill.outputs.export import add_arguments as add_export_arguments
    from defectfill.ui import add_arguments as add_ui_arguments  # no gradio import: the extra is optional

    parser = _TopParser(prog="defectfill", description="Few-shot realistic defect image generation (DefectFill).")
    parser.add_argument("--version", action="version", version=f"defectfill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # (name, help, settings class, command)
    stages = [
        ("train", "fine-tune SD2 inpainting with LoRA on one defect type", TrainConfig, _train),
        ("generate", "paint the learned defect into defect-free images (MVTec layout out)", GenerateConfig,
         _command("defectfill.generate.writer", "generate_command")),
        ("evaluate", "KID, IC-LPIPS and downstream inspection metrics, with a report", EvaluateConfig,
         _command("defectfill.run.token_check", "evaluate_command")),  # evaluate, with the token self-check
        ("run", "train, generate and evaluate every defect type of a category, with one report", RunConfig,
         _command("defectfill.run.runner", "run_command")),
    ]
    for name, help_text, settings, command in stages:
        # the required flags, then the sections of --help: the usage line stays short however many flags there are
        required = " ".join(f"{flag(n)} {n.upper()}" for n in settings.required)
        p = sub.add_parser(name, help=help_text, description=help_text,
                           usage=f"%(prog)s {required} [options]  (every option: defectfill {name} --help)")
        settings.add_arguments(p)
        p.set_defaults(func=command)

    p = sub.add_parser("demo", help="the whole job on a drawn dataset and a tiny model: no data, GPU or network",
                       add_arguments="defectfill.demo.job:add_demo_arguments")
    p.set_defaults(func=_command("defectfill.demo.job", "demo_command"))

    p = sub.add_parser("make-demo-data", help="write a small procedurally drawn MVTec-layout dataset")
    p.add_argument("dir", help="folder to write")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=_make_demo_data)

    help_text = "pretrain a small inpainting base (defectfill-mini) on a procedurally drawn world, on the CPU"
    p = sub.add_parser("pretrain-base", help=help_text, description=help_text,
                       add_arguments="defectfill.pretrain.base:add_arguments")
    p.set_defaults(func=_command("defectfill.pretrain.base", "pretrain_command"))

    help_text = ("what a dataset holds as train reads it: layout, categories, defect types with their counts, "
                 "the reference/held-out split and every problem (reads no model, writes nothing)")
    p = sub.add_parser("data", help=help_text, description=help_text)
    add_data_arguments(p)
    p.set_defaults(func=_command("defectfill.data.inspection", "data_command"))

    help_text = ("a generated dataset in the formats other tools read: COCO (RLE masks), a Hugging Face imagefolder, "
                 "Label Studio tasks (masks as predictions), an MVTec tree; prefixed names never collide with real ones")
    p = sub.add_parser("export", help=help_text, description=help_text)
    add_export_arguments(p)
    p.set_defaults(func=_command("defectfill.outputs.export", "export_command"))

    help_text = ("a local browser app: draw a mask on a defect-free image, see the candidates with their LFS "
                 "scores, add the good ones to a dataset, curate it (needs pip install 'defectfill[ui]')")
    p = sub.add_parser("ui", help=help_text, description=help_text)
    add_ui_arguments(p)
    p.set_defaults(func=_ui)
    parser.subcommands = dict(sub.choices)
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
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            # an unreadable or unwritable file or folder, a read-only disk: named, not a traceback
            where = exc.filename or "a file"
            print(f"defectfill {args.command}: error: {where}: {exc.strerror or exc}. Check its permissions (or "
                  f"choose another folder), then {_again(args.command)} to continue.", file=sys.stderr)
            return 2
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
