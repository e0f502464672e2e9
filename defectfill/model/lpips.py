"""LPIPS (AlexNet), shared by Low-Fidelity Selection and IC-LPIPS.

The `lpips` package ships its linear-layer weights; the AlexNet backbone's
ImageNet weights are downloaded by torchvision on first use. Where that cannot
happen, the error names the ways out. Tests pass `pretrained_backbone=False`
(a random backbone, no download).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from defectfill.core.errors import DefectFillError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


@contextmanager
def _quiet_torchvision():
    """The lpips package calls torchvision with its deprecated `pretrained=` argument; hide that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        yield


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a restricted unpickler that loads tensors and nothing executable
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_lpips(
    backbone_weights: str | Path | None = None,
    pretrained_backbone: bool = True,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """LPIPS with the AlexNet backbone, in eval mode, frozen.

    backbone_weights: a local torchvision AlexNet state dict (.pth or .safetensors)
    for machines that cannot download it.
    """
    import lpips

    if backbone_weights is not None:
        path = Path(backbone_weights).expanduser()
        if not path.is_file():
            raise DefectFillError(f"{path}: LPIPS backbone weights not found.")
        with _quiet_torchvision():
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        try:
            state = _read_state_dict(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read the user's file gets one message
            raise DefectFillError(f"{path}: cannot read AlexNet weights ({exc}).") from None
        loaded = 0
        for slice_module in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
            for index, layer in slice_module.named_children():
                for param_name, param in layer.named_parameters(recurse=False):
                    key = f"features.{index}.{param_name}"
                    if key in state:
                        param.data.copy_(state[key])
                        loaded += 1
        if loaded != 10:  # 5 conv layers x (weight, bias)
            raise DefectFillError(f"{path}: not a torchvision AlexNet state dict (found {loaded} of 10 conv tensors).")
    else:
        try:
            # a random backbone is drawn from a fixed seed: the same command picks the same candidates
            with _quiet_torchvision(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = lpips.LPIPS(net="alex", pnet_rand=not pretrained_backbone, verbose=False)
        except (OSError, RuntimeError) as exc:
            raise DefectFillError(
                f"LPIPS needs torchvision's ImageNet AlexNet weights, which could not be downloaded ({exc}). "
                f"Put {ALEXNET_FILE} in $TORCH_HOME/hub/checkpoints, or pass a local copy "
                "(--lpips-weights PATH), or skip LPIPS (--candidates 1 for generation)."
            ) from None
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def lpips_distance(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W), (N,3,H,W) in [-1, 1] -> (N,) LPIPS distances."""
    return model(a, b, normalize=False).view(-1)
