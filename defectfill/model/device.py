"""The device a command runs on when the user names none (or `auto`): the first CUDA GPU when there is one,
else the CPU. Every stage resolves its device setting here, so they agree on one machine."""

from __future__ import annotations


def resolve_device(name: str | None = None) -> str:
    """`name` as given, or for None / "auto": "cuda" when a CUDA GPU is present, else "cpu"."""
    if name and name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
