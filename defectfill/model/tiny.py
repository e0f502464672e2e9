"""A tiny SD-inpainting-shaped pipeline built from configs: tests, benchmarks and the demo, offline.

Same structure as SD2 inpainting (9-channel UNet with decoder cross-attention,
VAE with scaling factor 0.18215, CLIP text encoder on the real CLIP BPE
vocabulary, SD2's DDIM schedule), random weights, nothing downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import tempfile
from pathlib import Path

import torch.nn as nn

from defectfill.core.errors import DefectFillError


def _clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """The real CLIP BPE (shipped in the open_clip_torch wheel): its 512 byte symbols and its ranked merges."""
    import importlib.util

    # Found, not imported: importing open_clip pulls in timm and more, and only its data file is needed.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DefectFillError("the tiny test pipeline needs the CLIP vocabulary from open_clip_torch: "
                              "pip install open_clip_torch")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    # byte-level alphabet, as CLIP defines it
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    alphabet = [chr(c) for c in cs]
    return alphabet + [a + "</w>" for a in alphabet], merges


def _write_tokenizer_folder(symbols: list[str], merges: list[tuple[str, str]], prefix: str) -> str:
    vocab = symbols + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / "vocab.json").write_text(json.dumps({html.unescape(t): i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "!", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }))
    return str(folder)


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_folder() -> str:
    """The real CLIP BPE vocabulary (49408 tokens) as vocab.json + merges.txt."""
    symbols, merges = _clip_bpe()
    return _write_tokenizer_folder(symbols, merges, "defectfill-clip-tokenizer-")


def _merges_of(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one lower-case word, in the order it applies them."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


@functools.lru_cache(maxsize=4)
def reduced_tokenizer_folder(words: tuple[str, ...]) -> str:
    """A CLIP BPE tokenizer cut down to the merges these words need, as vocab.json + merges.txt.

    Every one of `words` (ASCII letters) tokenizes exactly as CLIP tokenizes it, and any other text still
    tokenizes (into smaller pieces, down to single bytes), so a user's prompt never fails. About 500 byte
    symbols plus a few hundred merges instead of 49408 rows: a small text encoder spends its weights on
    its layers instead of on an embedding table whose rows its training never reaches.
    """
    symbols, merges = _clip_bpe()
    ranks = {m: i for i, m in enumerate(merges)}
    needed = {m for word in words for m in _merges_of(word.lower(), ranks)}
    return _write_tokenizer_folder(symbols, sorted(needed, key=ranks.__getitem__), "defectfill-mini-tokenizer-")


def clip_tokenizer(folder: str | None = None):
    """The CLIP BPE tokenizer (49408 tokens, pad "!", 77 positions), built offline; or the one in `folder`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder or _clip_tokenizer_folder())


def build_tiny_pipeline(seed: int = 0):
    """A small SD-inpainting-shaped pipeline with random weights, built from configs (no download).

    Same structure as SD2 inpainting: 9-channel UNet with cross-attention in its
    decoder at two resolutions, a VAE with scaling factor 0.18215 (factor-4
    latents), a CLIP text encoder on the real CLIP vocabulary, DDIM with SD2's
    schedule. For tests, benchmarks and the demo: untrained, so its images are noise.
    """
    from defectfill.model.networks import TINY, build_networks

    unet, vae, text_encoder = build_networks(TINY, 64, seed)
    return assemble_inpaint_pipeline(unet, vae, text_encoder)


def assemble_inpaint_pipeline(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                              prediction_type: str = "epsilon", tokenizer=None):
    """An inpainting pipeline of these networks with SD2's DDIM schedule and `tokenizer` (default: CLIP's)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
    )
    return StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder that `--model` accepts."""
    folder = Path(folder)
    build_tiny_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder
