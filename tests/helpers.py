"""Small helpers shared by the tests: tiny training settings, stand-in networks, a written run folder."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from defectfill.config.stages import TrainConfig


def tiny_config(data: Path, output: Path, model: Path, **overrides) -> TrainConfig:
    """Settings for a seconds-long CPU run on the tiny pipeline and the 64 px demo data."""
    settings = dict(
        data=str(data), category="disc", defect_type="scratch", output=str(output), model=str(model),
        resolution=64, steps=2, batch_size=2, warmup_steps=2, save_every=1000, sample_every=0, log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def abs_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A stand-in image distance for LPIPS: mean absolute difference per pair, (N,3,H,W) x2 -> (N,)."""
    return (a - b).abs().flatten(1).mean(dim=1)


class TinyClassifier(nn.Module):
    """A stand-in for ResNet-34: one conv and a linear layer over k classes."""

    def __init__(self, k: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


def perturb_lora(*modules: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Set every LoRA B (zero at initialisation) to seeded noise, so the LoRA changes the model and every
    LoRA tensor gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def take_grads(models) -> dict[str, torch.Tensor]:
    """Every trainable tensor's gradient by name ("unet."/"text_encoder." prefixed), then zeroed for the next step."""
    out = {}
    for prefix, module in (("unet.", models.unet), ("text_encoder.", models.text_encoder)):
        for n, p in module.named_parameters():
            if p.grad is not None:
                out[prefix + n] = p.grad.clone()
        module.zero_grad(set_to_none=True)
    return out


def generate_config(run, out, *flags: str, candidates: int = 1):
    """`defectfill generate --run RUN --output OUT` at 1 step and `candidates` candidates, plus `flags`, as its
    parser reads them."""
    import argparse

    from defectfill.config.stages import GenerateConfig

    parser = argparse.ArgumentParser()
    GenerateConfig.add_arguments(parser)
    args = parser.parse_args(["--run", str(run), "--output", str(out), "--steps", "1", "--candidates", str(candidates),
                              *flags])
    return GenerateConfig.from_args(args)


def run_quick_generate(run, out, *flags: str) -> int:
    """`defectfill generate` at 1 step, 2 candidates, the untrained LPIPS backbone, plus `flags`; its exit code."""
    from defectfill.generate.writer import run_generate

    return run_generate(generate_config(run, out, "--lpips-random-backbone", *flags, candidates=2))


def write_run(run, model_dir, data_root, seed=0, defect_type="scratch"):
    """A run folder as `defectfill train` writes it, with a perturbed (non-zero) LoRA."""
    from defectfill.data import make_split, open_layout
    from defectfill.model.pipeline import add_lora, load_pipeline, save_lora_weights
    from defectfill.outputs.run_folder import write_run_files

    run.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(str(model_dir))
    add_lora(pipe.unet, pipe.text_encoder, rank=4)
    perturb_lora(pipe.unet, pipe.text_encoder, seed=seed)  # B starts at zero: make the LoRA change the model
    save_lora_weights(run, pipe.unet, pipe.text_encoder)
    config = TrainConfig(data=str(data_root), category="disc", defect_type=defect_type, output=str(run),
                         model=str(model_dir), resolution=64, seed=seed)
    write_run_files(run, config, make_split(open_layout(data_root), "disc", defect_type))
    return run


def tiny_run_config(demo_root, tiny_model_dir, output, **overrides):
    """`run` settings for a seconds-long CPU run over the demo's disc category on the tiny pipeline."""
    from defectfill.config.stages import RunConfig

    settings = dict(data=str(demo_root), model=str(tiny_model_dir), output=str(output), resolution=64, steps=2,
                    batch_size=1, warmup_steps=1, save_every=1, sample_every=0, mixed_precision="auto",
                    categories=["disc"], count=2, candidates=2, generate_steps=1, kid_subsets=3, lpips_size=64,
                    lpips_random_backbone=True)
    settings.update(overrides)
    return RunConfig.from_settings(settings)


def run_with_stand_ins(config):
    """`run_all` with stand-in KID and LPIPS networks (no download)."""
    from defectfill.demo.job import UntrainedFeatures
    from defectfill.run.runner import run_all

    return run_all(config, feature_extractor=UntrainedFeatures(), distance=abs_distance)


def exit_after_first_checkpoint(marker_dir: str) -> None:
    """A fault for a Ray worker (its `worker_process_setup_hook`): the first attempt at training a type ends this
    process right after writing a checkpoint, with `os._exit` and no cleanup, as a killed worker or a lost node.
    It writes MARKER_DIR/<run folder name>.pid ("PID STEP") first, so the retry trains on; a marker made
    beforehand spares that type."""
    import os

    import defectfill.train.trainer as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        marker = Path(marker_dir) / f"{Path(out).name}.pid"
        if not marker.exists():
            marker.write_text(f"{os.getpid()} {step}\n")
            os._exit(17)
        return path

    train_module.save_checkpoint = save_then_die


def fault_in_every_worker(marker_dir: str):
    """Ray's worker_process_setup_hook (a plain function, which Ray requires) that installs
    `exit_after_first_checkpoint(marker_dir)` in each worker process it starts."""
    def setup() -> None:
        exit_after_first_checkpoint(marker_dir)

    return setup
