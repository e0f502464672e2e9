"""Classifier-free guidance with the unconditional prediction from the base model (`--unconditional base`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_run
from PIL import Image


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, demo_root):
    return write_run(tmp_path_factory.mktemp("run") / "disc-scratch", tiny_model_dir, demo_root)


def _unet_inputs(pipe, rows: int):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((rows, pipe.unet.config.in_channels, 16, 16), generator=gen)
    hidden = torch.randn((rows, 77, pipe.unet.config.cross_attention_dim), generator=gen)
    return sample, torch.tensor([500] * rows), hidden


def test_one_batched_call_gives_the_base_on_unconditional_rows_and_the_lora_on_the_others(run):
    """The oracle: row 0 of a [uncond, cond] call under `lora_on_rows` equals the UNet with its LoRA disabled,
    row 1 equals the fine-tuned UNet; and the two differ (the LoRA changes the model)."""
    from defectfill.generate.generator import DefectGenerator, lora_on_rows

    pipe = DefectGenerator.from_run(run, candidates=1, unconditional="base").pipe
    sample, t, hidden = _unet_inputs(pipe, 2)
    with torch.no_grad():
        tuned = pipe.unet(sample, t, encoder_hidden_states=hidden).sample
        pipe.disable_lora()
        base = pipe.unet(sample, t, encoder_hidden_states=hidden).sample
        pipe.enable_lora()
        with lora_on_rows(pipe.unet, torch.tensor([0.0, 1.0])):
            mixed = pipe.unet(sample, t, encoder_hidden_states=hidden).sample
    assert not torch.allclose(tuned, base, atol=1e-4)
    torch.testing.assert_close(mixed[0], base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], tuned[1], rtol=1e-5, atol=1e-6)
    # the hooks are gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(sample, t, encoder_hidden_states=hidden).sample, tuned)


def test_the_negative_prompt_is_the_base_text_encoders_empty_prompt(run, monkeypatch):
    """The pipeline gets the fine-tuned encoder's prompt and the base encoder's "" as its negative."""
    from defectfill.generate.generator import DefectGenerator

    gen = DefectGenerator.from_run(run, candidates=1, steps=1, guidance=3.0, unconditional="base")
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(gen, "pipe", _Spy(gen.pipe, spy))
    with pytest.raises(RuntimeError, match="stop"):
        gen(Image.new("RGB", (64, 64), (128, 128, 128)), np.pad(np.ones((8, 8), bool), 28))
    pipe = gen.pipe.inner
    with torch.no_grad():
        tuned_prompt, _ = pipe.encode_prompt(gen.prompt, "cpu", 1, False)
        tuned_empty, _ = pipe.encode_prompt("", "cpu", 1, False)
        pipe.disable_lora()
        base_empty, _ = pipe.encode_prompt("", "cpu", 1, False)
        pipe.enable_lora()
    torch.testing.assert_close(seen["prompt_embeds"], tuned_prompt)
    torch.testing.assert_close(seen["negative_prompt_embeds"], base_empty)
    assert not torch.allclose(base_empty, tuned_empty, atol=1e-5)  # the text encoder's LoRA was on


class _Spy:
    """The pipeline with its __call__ replaced; every other attribute is the real pipeline's."""

    def __init__(self, inner, call):
        self.inner, self._call = inner, call

    def __call__(self, **kwargs):
        return self._call(**kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_base_unconditional_changes_guided_samples_and_not_unguided_ones(run):
    """At guidance 1 there is no unconditional branch, so both settings give the same pixels; at guidance 3
    they differ."""
    from defectfill.generate.generator import DefectGenerator

    image = Image.new("RGB", (64, 64), (140, 120, 100))
    mask = np.pad(np.ones((16, 16), bool), 24)
    out = {}
    for unconditional in ("tuned", "base"):
        for guidance in (1.0, 3.0):
            gen = DefectGenerator.from_run(run, candidates=1, steps=2, guidance=guidance, merge_lora=False,
                                           unconditional=unconditional)
            out[unconditional, guidance] = np.asarray(gen(image, mask, seed=0).image)
    assert np.array_equal(out["tuned", 1.0], out["base", 1.0])
    assert not np.array_equal(out["tuned", 3.0], out["base", 3.0])


def test_unknown_unconditional_is_refused(run):
    from defectfill.core.errors import DefectFillError
    from defectfill.generate.generator import DefectGenerator

    with pytest.raises(DefectFillError, match="^unconditional= 'both': choose one of tuned, base"):
        DefectGenerator.from_run(run, candidates=1, unconditional="both")
