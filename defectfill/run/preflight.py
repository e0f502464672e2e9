"""Pre-flight of `defectfill run` (and its `--dry-run`): refuse a plan that cannot finish before any GPU hour is
spent on it.

- a plan of 0 defect types (a plain folder without `--defect-type`, a category with none);
- a category with 0 defect-free images, unless `--images DIR` gives the sources (generation would fail after
  training);
- a network the plan needs that is neither on this machine nor downloadable: the base model (`--model`), the
  Inception-V3 of KID, the AlexNet of LPIPS (Low-Fidelity Selection, IC-LPIPS), the ResNet-34 of the
  downstream classifier and the ResNet-34 encoder of the downstream U-Net. "Present" is the file where its
  loader looks (the torch hub cache, the Hugging Face cache, a local folder); "downloadable" is one HEAD request
  of its address (5 s), never made with ``HF_HUB_OFFLINE=1`` (or ``DEFECTFILL_OFFLINE=1``).

Every problem is named with the fix as flags of `run` itself.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from defectfill.config.stages import RunConfig
from defectfill.core.errors import DefectFillError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
RESNET34_FILE = "resnet34-b627a593.pth"
TORCH_URL = "https://download.pytorch.org/models/"
SMP_ENCODER_REPO = "smp-hub/resnet34.imagenet"  # segmentation-models-pytorch 0.5+: encoder weights on the hub


@dataclass
class Weight:
    what: str  # the network, for the message
    present: bool
    where: str  # where it was looked for
    url: str | None  # what would be downloaded (None: not downloadable)
    fix: str  # the flags of `run` that avoid or provide it


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "DEFECTFILL_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(url: str, timeout: float = 5.0) -> bool:
    """One HEAD request: whether `url` answers (any status below 400, after redirects)."""
    if offline():
        return False
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "defectfill-preflight"})
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - fixed https addresses
            return response.status < 400
    except Exception:  # noqa: BLE001 - any failure means "cannot download from here"
        return False


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (torchvision, torch-fidelity) keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def _hub_cached(repo: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo, filename)
    return isinstance(found, str) and Path(found).is_file()


def _base_model(config: RunConfig) -> Weight:
    from defectfill.model.pipeline import resolve_model

    model = config.train.model
    fix = "pass --model a local diffusers inpainting folder, or --model defectfill-mini (the built-in base)"
    resolved = resolve_model(model)
    path = Path(resolved).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return Weight(f"the base model {model}", (path / "model_index.json").is_file(), str(path), None,
                      f"{fix}; a local folder must hold model_index.json (saved with save_pretrained)")
    url = f"https://huggingface.co/{model}/resolve/main/model_index.json"
    return Weight(f"the base model {model}", _hub_cached(model, "model_index.json"),
                  "the Hugging Face cache (HF_HOME)", url, fix)


def _torch_file(what: str, filename: str, url: str, fix: str) -> Weight:
    path = torch_hub_checkpoints() / filename
    return Weight(what, path.is_file(), str(path), url, f"put {filename} in {path.parent}, or {fix}")


def needed_weights(config: RunConfig, injected_kid: bool = False, injected_lpips: bool = False) -> list[Weight]:
    """Every pretrained network this run will load, found or not. `injected_*`: the caller supplies KID's
    features or the LPIPS distance itself (offline demos, tests), so those networks are not loaded."""
    weights = [_base_model(config)]
    ev, gen = config.evaluate, config.generate
    if ev.kid and not injected_kid and not ev.inception_weights:
        weights.append(_torch_file("KID's Inception-V3", INCEPTION_FILE, INCEPTION_URL,
                                   "pass --inception-weights PATH, or skip KID with --no-kid"))
    lfs = gen.candidates > 1 and not gen.lpips_random_backbone
    if not gen.lpips_weights and ((lfs and not injected_lpips) or (ev.ic_lpips and not injected_lpips)):
        used = " and ".join(n for n, on in (("Low-Fidelity Selection", lfs), ("IC-LPIPS", ev.ic_lpips)) if on)
        weights.append(_torch_file(f"LPIPS's AlexNet ({used})", ALEXNET_FILE, TORCH_URL + ALEXNET_FILE,
                                   "pass --lpips-weights PATH" + (", or --lpips-random-backbone (LFS)" if lfs else "")
                                   + (", and --no-ic-lpips" if ev.ic_lpips else "")))
    if config.downstream != "none" and ev.pretrained:
        if config.downstream in ("classify", "both"):
            weights.append(_torch_file("the downstream classifier's ImageNet ResNet-34", RESNET34_FILE,
                                       TORCH_URL + RESNET34_FILE, "train it from scratch with --no-downstream-pretrained"))
        if config.downstream in ("localize", "both"):
            weights.append(Weight("the downstream U-Net's ImageNet ResNet-34 encoder",
                                  _hub_cached(SMP_ENCODER_REPO, "config.json"), "the Hugging Face cache (HF_HOME)",
                                  f"https://huggingface.co/{SMP_ENCODER_REPO}/resolve/main/config.json",
                                  "train it from scratch with --no-downstream-pretrained"))
    return weights


def plan_problems(config: RunConfig, layout, pairs: list[tuple[str, str]]) -> list[str]:
    """A plan of nothing, or a category without defect-free images (and no --images)."""
    problems = []
    if not pairs:
        from defectfill.data.layouts import FolderLayout

        if isinstance(layout, FolderLayout):
            problems.append(f"{layout.root}: a plain folder holds one defect type, which it does not name: pass "
                            "--defect-type NAME (e.g. --defect-type scratch); the plan has 0 defect types.")
        else:
            problems.append(f"{layout.root}: the plan has 0 defect types (none found for "
                            f"{', '.join(config.selected_categories() or ['any category'])}). `defectfill data --data "
                            f"{layout.root}` lists what the dataset holds.")
    if not config.generate.images:
        for cat in sorted({c for c, _ in pairs}):
            if not layout.good_images(cat):
                problems.append(f"{layout.root}: category {cat!r} has 0 defect-free images to paint defects on, so "
                                "generation would fail after training. Add them (MVTec: <cat>/train/good/; an "
                                "annotation export: --good-images DIR), or pass --images DIR.")
    return problems


def weight_problems(weights: list[Weight], probe=reachable) -> list[str]:
    problems = []
    for w in weights:
        if w.present:
            continue
        if w.url is not None and probe(w.url):
            continue  # downloaded on first use
        why = "not on this machine (looked in " + w.where + ")"
        why += ", and downloads are off (HF_HUB_OFFLINE)" if offline() and w.url else (
            f", and {w.url} cannot be reached" if w.url else "")
        problems.append(f"{w.what} is {why}: {w.fix}.")
    return problems


def preflight(config: RunConfig, layout, pairs: list[tuple[str, str]], injected_kid: bool = False,
              injected_lpips: bool = False, probe=reachable, plan: bool = True, weights: bool = True) -> None:
    """Refuse the run, every problem named with its fix, before anything is trained (`plan`: the types and
    defect-free images; `weights`: the networks)."""
    problems = plan_problems(config, layout, pairs) if plan else []
    if pairs and weights:
        problems += weight_problems(needed_weights(config, injected_kid, injected_lpips), probe)
    if problems:
        raise DefectFillError("the run cannot finish; nothing was started:\n  - " + "\n  - ".join(problems))
