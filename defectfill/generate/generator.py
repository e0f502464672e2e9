"""The generator: a trained run turns one defect-free image and a target mask into defect candidates.

`DefectGenerator` is the Python API: N candidates of one (image, mask) in one
pipeline batch, pasted back so that outside the mask the output is the input,
and Low-Fidelity Selection (the candidate least like the input inside the
mask's bounding box, by LPIPS). The dataset writer behind `defectfill generate`
is `writer.py`; the canvas an image is sampled on, which training shares, is
`defectfill.model.canvas`.

    gen = DefectGenerator.from_run("runs/hazelnut-hole")
    result = gen(image, mask, seed=0)   # result.image, result.mask, result.scores, result.chosen
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectfill.config.sampling import SAMPLING_FIELDS, SamplingConfig, prompt_problem
from defectfill.config.settings import (
    compile_module,
    precision_dtype,
    resolve_compile,
    resolve_precision,
    settings_named,
)
from defectfill.config.stages import TrainConfig
from defectfill.core.errors import DefectFillError
from defectfill.data.masks import fit_mask
from defectfill.model.canvas import Canvas, prepare_canvas
from defectfill.model.names import LORA_WEIGHTS_NAME, TOKEN_WEIGHTS_NAME
from defectfill.model.pipeline import LoraMerge, load_pipeline, merge_lora_layers, vae_scale_factor
from defectfill.outputs.run_folder import pick_defect_type, read_trained_run, type_token_file

log = logging.getLogger(__name__)

# (candidates (N,3,h,w) in [-1,1], source (1,3,h,w) in [-1,1]) -> (N,) scores, higher = less like the source
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LPIPS_MIN_SIDE = 64  # AlexNet's five stages need a few pixels left at the end


# --------------------------------------------------------------------------- selection


class LPIPSScorer:
    """LPIPS distance of bounding-box crops (each side stretched to >= 64 px for AlexNet's five stages)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, candidates: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.score_pairs(candidates, source.expand_as(candidates))

    def score_pairs(self, candidates: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """(N,) distances of N (candidate, source) crop pairs of one size: the crops of several images scored in
        one call (each row's score is its own, as in a call per image)."""
        from defectfill.model.lpips import lpips_distance

        h, w = candidates.shape[-2:]
        # each side stretched on its own: a 1x800 scratch box becomes 64x800, not 64x51200
        size = (max(h, _LPIPS_MIN_SIDE), max(w, _LPIPS_MIN_SIDE))
        if size != (h, w):
            candidates = F.interpolate(candidates, size=size, mode="bilinear", align_corners=False)
            sources = F.interpolate(sources, size=size, mode="bilinear", align_corners=False)
        device = next(self.model.parameters()).device
        a = candidates.float().to(device)
        b = sources.float().to(device)
        return lpips_distance(self.model, a, b).cpu()


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bool HxW -> (y0, y1, x0, x1), half-open, of the True pixels."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _to_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 (an array, or a tensor on any device) -> (..., 3, H, W) float in [-1, 1]."""
    t = arr.float() if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr, dtype=np.float32))
    return (t / 127.5 - 1.0).movedim(-1, -3)


def select_low_fidelity(
    candidates: np.ndarray, source: np.ndarray, mask: np.ndarray, scorer: Scorer
) -> tuple[int, list[float]]:
    """Score (N,H,W,3) uint8 candidates against the (H,W,3) source inside the mask's bounding box.

    Returns the index of the highest score (least like the defect-free input) and every score.
    """
    y0, y1, x0, x1 = mask_bbox(mask)
    crops = _to_tensor(candidates[:, y0:y1, x0:x1])  # (N, 3, h, w)
    ref = _to_tensor(source[None, y0:y1, x0:x1])  # (1, 3, h, w)
    scores = torch.as_tensor(scorer(crops, ref)).reshape(-1).float()
    if scores.numel() != len(candidates):
        raise RuntimeError(f"scorer returned {scores.numel()} scores for {len(candidates)} candidates")
    return int(torch.argmax(scores)), [float(s) for s in scores]


# --------------------------------------------------------------------------- paste-back


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight (H,W) float32: 0 outside the mask, ramping to 1 over `feather` px inside its edge.

    The ramp lies inside the mask only, so pixels outside keep the input exactly.
    """
    alpha = mask.astype(np.float32)
    if feather <= 0:
        return alpha
    # depth of each mask pixel (chessboard distance to the outside, 1 at the edge), via repeated erosion
    depth = np.zeros(mask.shape, dtype=np.float32)
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    from PIL import ImageFilter

    current = mask
    for _ in range(feather):
        depth += current
        im = im.filter(ImageFilter.MinFilter(3))
        current = np.asarray(im) >= 128
    return np.where(mask, np.minimum(depth / feather, 1.0), 0.0).astype(np.float32)


def paste_back_tensor(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
                      alpha: torch.Tensor) -> torch.Tensor:
    """`paste_back` on tensors of any device: (N,H,W,3) uint8 generated, (H,W,3) uint8 source, (H,W) bool mask,
    (H,W) float32 `feather_alpha` -> (N,H,W,3) uint8, the same bytes as `paste_back` (the same float32 operations
    in the same order, each its own kernel, so no fused multiply-add changes a rounding)."""
    a = alpha[..., None]
    blended = torch.round(a * generated.float() + (1 - a) * source.float())  # round half to even, as np.rint
    out = blended.clamp(0, 255).to(torch.uint8)
    return torch.where(mask[..., None], out, source)


def paste_back(generated: np.ndarray, source: np.ndarray, mask: np.ndarray, feather: int = 0) -> np.ndarray:
    """(…,H,W,3) uint8 generated, (H,W,3) uint8 source, (H,W) bool mask -> uint8, equal to source outside the mask."""
    alpha = feather_alpha(mask, feather)[..., None]  # (H, W, 1)
    blended = np.rint(alpha * generated.astype(np.float32) + (1 - alpha) * source.astype(np.float32))
    out = blended.clip(0, 255).astype(np.uint8)
    # exact copy outside the mask (not just numerically close): the guarantee users rely on
    return np.where(mask[..., None], out, source)


# --------------------------------------------------------------------------- the model's canvas


# --------------------------------------------------------------------------- generator


@dataclass
class GenerationResult:
    image: Image.Image  # chosen candidate, source size, pasted back
    mask: np.ndarray  # (H, W) bool at source size
    candidates: list[Image.Image]  # every candidate, pasted back
    scores: list[float] | None  # LFS score of each candidate (None with one candidate)
    chosen: int
    attention: np.ndarray | None = None  # (H, W) float in [0, 1]: the token's cross-attention for the chosen one
    seeds: list[int] = field(default_factory=list)


def derived_seed(seed: int, index: int) -> int:
    """The seed of item or candidate `index` under `seed`: independent streams, reproducible, fits torch's range."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _scheduler(pipe, name: str):
    """The sampler `name`, built from the base's scheduler config (its betas, prediction type, spacing)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    # dpm and dpm++ are the same solver (2nd-order multistep DPM-Solver++); dpm stays for recorded settings
    made = {"ddim": (DDIMScheduler, {}), "dpm": (DPMSolverMultistepScheduler, {}),
            "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
            "unipc": (UniPCMultistepScheduler, {}), "euler": (EulerDiscreteScheduler, {}), "pndm": (PNDMScheduler, {})}
    if name not in made:
        raise DefectFillError(f"--scheduler {name!r}: choose one of {', '.join(made)}.")
    cls, overrides = made[name]
    return cls.from_config(pipe.scheduler.config, **overrides)


def run_prompt(config: TrainConfig, template: str | None = None, defect_type: str | None = None) -> tuple[str, str]:
    """(prompt, token) of a run: the template (default the run's object prompt) filled in by `TrainConfig.prompt`
    with the token of `defect_type` (a per-object run has one per type; default: the run's one token)."""
    template = template or config.object_prompt
    problem = prompt_problem(template, "--prompt")
    if problem:
        raise DefectFillError(problem + ".")
    token = config.type_tokens()[defect_type] if defect_type is not None else config.prompt_token
    return config.prompt(template, token), token


@contextmanager
def lora_on_rows(unet: torch.nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, each LoRA layer of `unet` adds its change only to the batch rows where `rows` (B,) is 1:
    one batched UNet call gives the base model's prediction on the other rows (e.g. the unconditional half of a
    classifier-free-guidance batch). Works on unmerged (PEFT) LoRA layers; a batch of another size is refused."""
    hooks = []

    def scale(module, inputs, output):
        if output.shape[0] != rows.shape[0]:
            raise RuntimeError(f"LoRA row weights for {rows.shape[0]} rows, batch of {output.shape[0]}")
        return output * rows.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    for module in unet.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, torch.nn.ModuleDict):
            hooks += [layer.register_forward_hook(scale) for layer in lora_b.values()]
    if not hooks:
        raise DefectFillError("the unconditional prediction from the base needs the LoRA layers unmerged "
                              "(merge_lora=False).")
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def merge_lora_weights(pipe) -> LoraMerge:
    """Fold the loaded LoRA into the UNet's and text encoder's weights and remove those LoRA layers.

    A sampling step then costs what the base model costs: no extra LoRA matmuls per projection. The change is
    added in fp32 and rounded once; a layer whose weights' dtype would round its change away (a small change in
    bf16) stays a LoRA layer (`merge_lora_layers`), so the merged model samples what the unmerged one does.
    """
    models = [m for m in (pipe.unet, getattr(pipe, "text_encoder", None)) if m is not None]
    merge = merge_lora_layers(*models)
    if not merge.kept:
        pipe.unload_lora_weights()  # no LoRA layer is left: drop the adapters' bookkeeping too
    log.info("LoRA merged into %d layers; %d kept as LoRA layers (their weights' dtype rounds the change away)",
             merge.merged, len(merge.kept))
    return merge


def _sampling(sampling: SamplingConfig | None, settings: dict[str, Any], api: str) -> SamplingConfig:
    """`sampling` (default SamplingConfig()) with the sampling settings given by name in `settings` (taken out of
    it) over its own, checked, a message naming each as a Python parameter (`candidates=`)."""
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise TypeError(f"{api}: sampling= takes a SamplingConfig (each setting may be given by name: "
                        f"candidates=, steps=, ...), got {type(sampling).__name__}")
    named = {name: settings.pop(name) for name in list(settings) if name in SAMPLING_FIELDS}
    sampling = dataclasses.replace(sampling or SamplingConfig(), **named)
    with settings_named(python=True, known=set(SAMPLING_FIELDS)):
        sampling.validate()
    return sampling


def _sampling_setting(name: str) -> property:
    """`DefectGenerator.<name>`: that setting of its `sampling`; set, a copy of `sampling` with it."""
    def get(self) -> Any:
        value = getattr(self.sampling, name)
        return (value or self.sampling.candidates) if name == "batch_size" else value

    def put(self, value: Any) -> None:
        self.sampling = dataclasses.replace(self.sampling, **{name: value})

    return property(get, put)


class DefectGenerator:
    """Generate defect images on defect-free ones with a trained run.

        gen = DefectGenerator.from_run("runs/hazelnut-hole")
        result = gen(image, mask, seed=0)   # result.image, result.mask, result.scores, result.chosen
    """

    def __init__(
        self,
        pipe,
        prompt: str,
        token: str,
        resolution: int,
        sampling: SamplingConfig | None = None,
        *,
        scorer: Scorer | None = None,
        lpips_weights: str | None = None,
        lpips_pretrained: bool = True,
        device: str | torch.device = "cpu",
        save_attention: bool = False,
        **settings: Any,
    ):
        """`prompt` is the filled prompt text; `sampling` how to sample (its steps, guidance and unconditional
        left None: the paper's 50, 7.5 and tuned; its prompt and scheduler are `from_run`'s). Each sampling
        setting may also be given by name (`candidates=4`, `steps=20`), over `sampling`'s."""
        self.sampling = _sampling(sampling, settings, "DefectGenerator").resolved()
        if settings:
            raise TypeError(f"DefectGenerator got unexpected keyword argument(s) {', '.join(sorted(settings))}")
        # unconditional "base": the classifier-free-guidance branch without the prompt comes from the base model
        # (LoRA off in the UNet and the text encoder), so guidance pushes away from the base's inpainting, not from
        # a fine-tuned model's own unconditional prediction, which the LoRA has already moved toward the defect
        self.pipe = pipe
        self.prompt, self.token = prompt, token
        self.resolution = resolution
        self.device = torch.device(device)
        self._scorer = scorer
        self._lpips_weights = lpips_weights
        self._lpips_pretrained = lpips_pretrained
        self.save_attention = save_attention
        self.defect_type: str | None = None
        self.type_prompts: dict[str, tuple[str, str]] = {}  # each drawable type's (prompt, token), `from_run`

    # the sampling settings in use, each also by name (`gen.guidance = 1.0` replaces `gen.sampling`'s)
    candidates = _sampling_setting("candidates")
    steps = _sampling_setting("steps")
    guidance = _sampling_setting("guidance")
    feather = _sampling_setting("feather")
    latent_blend = _sampling_setting("latent_blend")
    unconditional = _sampling_setting("unconditional")
    batch_size = _sampling_setting("batch_size")  # unset: every candidate of an image in one call
    batch_images = _sampling_setting("batch_images")  # images whose candidates share a call (`generate_many`)

    def for_type(self, defect_type: str) -> "DefectGenerator":
        """The same pipeline drawing another defect type of its run (one model per object): a shallow copy with
        that type's prompt and token."""
        if defect_type not in self.type_prompts:
            raise DefectFillError(f"defect type {defect_type!r}: this generator draws "
                                  f"{', '.join(self.type_prompts) or 'only its own prompt'}.")
        other = copy.copy(self)
        other.prompt, other.token = self.type_prompts[defect_type]
        other.defect_type = defect_type
        return other

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        scorer: Scorer | None = None,
        sampling: SamplingConfig | None = None,
        merge_lora: bool = True,
        compile: str = "no",
        defect_type: str | None = None,
        **settings: Any,
    ) -> "DefectGenerator":
        """Load the run's base model, LoRA and (if trained) new tokens; the other settings go to __init__.

        `sampling` (or each of its settings by name: `steps=20`, `prompt=...`, `scheduler="dpm"`): its
        `prompt`, `steps`, `guidance` and `unconditional` left None are what the run's base model recommends
        (`config.sampling`: its defectfill_sampling.json), else the paper's (object prompt, 50, 7.5, tuned).

        `defect_type`: the type to draw; a run trained on several (one model per object) needs it, and
        `for_type` switches to another of them without reloading.

        `mixed_precision` (auto, no, fp16, bf16) is the dtype of the pipeline's weights. `merge_lora` folds
        the LoRA into the weights it adapts and drops the LoRA layers (only in memory: the run's files stay
        as they are), so each sampling step runs the plain networks. `compile` (auto, yes, no) compiles the UNet.
        """
        sampling = _sampling(sampling, settings, "DefectGenerator.from_run")
        run_dir = Path(run_dir).expanduser()
        config = read_trained_run(run_dir)
        sampling = sampling.resolved(config.model)
        unconditional = sampling.unconditional
        defect_type = pick_defect_type(run_dir, config, defect_type)
        type_prompts = {t: run_prompt(config, sampling.prompt, t) for t in config.type_tokens()}
        prompt_text, token = type_prompts[defect_type]
        dtype = precision_dtype(resolve_precision(mixed_precision, str(device)))
        pipe = load_pipeline(config.model, dtype)
        try:
            pipe.load_lora_weights(str(run_dir), weight_name=LORA_WEIGHTS_NAME)
            if config.per_object:  # every type's token: one file each, as diffusers reads them
                tokens = config.type_tokens()
                pipe.load_textual_inversion([str(run_dir / type_token_file(t)) for t in tokens],
                                            token=list(tokens.values()))
            elif config.new_token:
                pipe.load_textual_inversion(str(run_dir / TOKEN_WEIGHTS_NAME), token=config.new_token)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DefectFillError(
                f"{run_dir}: cannot load the trained weights into {config.model} "
                f"({str(exc).splitlines()[0]}). Was the run trained on this base model?"
            ) from None
        if merge_lora and unconditional != "base":  # the base's rows need the LoRA layers kept apart
            merge_lora_weights(pipe)
        pipe.scheduler = _scheduler(pipe, sampling.scheduler)
        pipe = pipe.to(device)
        if resolve_compile(compile, str(device)):
            pipe.unet = compile_module(pipe.unet)
        pipe.set_progress_bar_config(disable=True)
        generator = cls(pipe, prompt_text, token, config.resolution, sampling, scorer=scorer, device=device,
                        **settings)
        generator.defect_type, generator.type_prompts = defect_type, type_prompts
        log.info("sampling %r at guidance %g, %d steps, unconditional branch from the %s model", prompt_text,
                 generator.guidance, generator.steps, unconditional)
        return generator

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:  # loaded on first use: --candidates 1 never needs LPIPS weights
            from defectfill.model.lpips import load_lpips

            self._scorer = LPIPSScorer(load_lpips(self._lpips_weights, pretrained_backbone=self._lpips_pretrained,
                                                  device=self.device))
        return self._scorer

    def _token_weights(self, n: int) -> torch.Tensor:
        """(B, 77) weights of the token's positions for a UNet batch of n candidates.

        Under classifier-free guidance the pipeline's UNet batch is [unconditional n, conditional n];
        only the conditional rows see the prompt, so the unconditional rows get zero weight.
        """
        from defectfill.model.pipeline import token_positions

        positions = token_positions(self.pipe.tokenizer, self.prompt, self.token)
        cfg = self.guidance > 1.0
        weights = torch.zeros(2 * n if cfg else n, self.pipe.tokenizer.model_max_length)
        weights[n if cfg else 0 :, positions] = 1.0 / len(positions)
        return weights

    def _step_kwargs(self, image, generators: list[torch.Generator], height: int, width: int) -> dict[str, Any]:
        """The pipeline's per-step arguments: none (the stock loop), or with latent_blend the callback that keeps
        the latents outside the mask on the source's (`steering.LatentBlend`). `image`: the canvas image, or one
        per row. Called before the pipeline draws from `generators`."""
        if not self.sampling.latent_blend:
            return {}
        from defectfill.generate.steering import latent_blend_kwargs

        return latent_blend_kwargs(self.pipe, image, generators, height, width)

    @contextmanager
    def _unconditional_from_base(self, n: int) -> Iterator[dict[str, Any]]:
        """The pipeline's prompt arguments for n candidates; with unconditional="base" under guidance, the
        empty prompt encoded with the text encoder's LoRA off and the UNet's LoRA applied only to the n
        conditional rows of the [unconditional n, conditional n] batch (one call per step, as stock CFG)."""
        if self.unconditional != "base" or self.guidance <= 1.0:
            yield {"prompt": self.prompt}
            return
        device = self.pipe._execution_device
        prompt_embeds, _ = self.pipe.encode_prompt(self.prompt, device, 1, False)
        self.pipe.disable_lora()
        try:
            negative, _ = self.pipe.encode_prompt("", device, 1, False)
        finally:
            self.pipe.enable_lora()
        rows = torch.cat([torch.zeros(n), torch.ones(n)]).to(device)
        with lora_on_rows(self.pipe.unet, rows):
            yield {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}

    def _prepare(self, image: Image.Image, mask: np.ndarray, seed: int) -> _Job:
        image = image.convert("RGB")
        mask = fit_mask(np.asarray(mask, dtype=bool), image.size)
        if not mask.any():
            raise DefectFillError("the target mask is empty: draw the defect region in white.")
        canvas, image_c, mask_c = prepare_canvas(image, mask, self.resolution, vae_scale_factor(self.pipe.vae))
        seeds = [derived_seed(seed, i) for i in range(self.candidates)]
        return _Job(image, mask, np.array(image), canvas, image_c, mask_c, seeds)  # a writable copy: torch's

    @torch.no_grad()
    def _sample(self, jobs: list[_Job]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Each job's candidates (N, h, w, 3) uint8 at the model's scale (the image's aspect, `Canvas.scaled`) and
        with save_attention the token's cross-attention maps (N, h_lat, w_lat) in [0, 1] on the canvas's latent
        grid (else None). The jobs share one canvas size; each pipeline call holds a chunk of the candidates
        (`batch_size`) of every job. One job is sampled as it always was (one image, its candidates as
        `num_images_per_prompt`); several go as one row per candidate, each image's masked-image latents made as
        its own call makes them (`_mask_latents_per_image`), so every row gets the same noise, conditioning
        and steps as in a call of its image alone."""
        factor = vae_scale_factor(self.pipe.vae)
        (cw, ch) = jobs[0].canvas.size
        gen_device = "cpu" if self.device.type == "mps" else self.device
        outputs: list[list[np.ndarray]] = [[] for _ in jobs]
        maps: list[list[np.ndarray]] = [[] for _ in jobs]
        recorder = None
        if self.save_attention:
            from defectfill.model.attention import AttentionRecorder

            # a running mean at latent size: every (layer, step) map resized to the image first held
            # layers x steps x rows full-size maps (about 7 GiB at 512 px, 50 steps, 8 candidates)
            recorder = AttentionRecorder(self.pipe.unet, running_hw=(ch // factor, cw // factor))
        try:
            for start in range(0, self.candidates, self.batch_size):
                chunk = range(start, min(start + self.batch_size, self.candidates))
                n = len(jobs) * len(chunk)
                generators = [torch.Generator(gen_device).manual_seed(job.seeds[c]) for job in jobs for c in chunk]
                if len(jobs) == 1:
                    images: dict[str, Any] = {"image": jobs[0].image_c, "mask_image": jobs[0].mask_c}
                    per_image: contextlib.AbstractContextManager = contextlib.nullcontext()
                else:
                    images = {"image": [job.image_c for job in jobs for _ in chunk],
                              "mask_image": [job.mask_c for job in jobs for _ in chunk]}
                    per_image = _mask_latents_per_image(self.pipe, len(chunk))
                if recorder is not None:
                    recorder.start(self._token_weights(n).to(self.device))
                with self._unconditional_from_base(n) as prompt_kwargs, per_image:
                    out = self.pipe(
                        **images, height=ch, width=cw, num_images_per_prompt=n, generator=generators,
                        num_inference_steps=self.steps, guidance_scale=self.guidance, output_type="np",
                        **prompt_kwargs, **self._step_kwargs(images["image"], generators, ch, cw),
                    ).images  # (n, ch, cw, 3) float in [0, 1], the rows of job j at [j * len(chunk), ...)
                att = None
                if recorder is not None:
                    # mean over every decoder layer and step; the conditional rows are the last n
                    att = recorder.running_mean()[-n:].cpu().numpy()  # (n, h_lat, w_lat)
                    recorder.stop()
                for j, job in enumerate(jobs):
                    (sw, sh) = job.canvas.scaled
                    rows = slice(j * len(chunk), (j + 1) * len(chunk))
                    outputs[j].append(np.clip(np.rint(out[rows, :sh, :sw] * 255), 0, 255).astype(np.uint8))
                    if att is not None:
                        maps[j].append(att[rows])
        finally:
            if recorder is not None:
                recorder.remove()
        return [(np.concatenate(o), np.concatenate(m) if m else None) for o, m in zip(outputs, maps, strict=True)]

    def _finish(self, jobs: list[_Job], sampled: list[tuple[np.ndarray, np.ndarray | None]]) -> list[GenerationResult]:
        """Paste-back and Low-Fidelity Selection of sampled jobs, on the generator's device: each job's candidates
        go there once, are pasted back there (`paste_back_tensor`, the bytes of `paste_back`) and their crops
        scored there; an LPIPS scorer scores the crops of every job of one crop size in one call."""
        pasted: list[torch.Tensor] = []
        for job, (raw, _) in zip(jobs, sampled, strict=True):
            w, h = job.image.size
            resized = np.stack([
                np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) if c.shape[:2] != (h, w)
                else c for c in raw
            ])  # (N, H, W, 3)
            mask_t = torch.from_numpy(job.mask).to(self.device)
            alpha = torch.from_numpy(feather_alpha(job.mask, self.feather)).to(self.device)
            pasted.append(paste_back_tensor(torch.from_numpy(resized).to(self.device),
                                            torch.from_numpy(job.source).to(self.device), mask_t, alpha))
        scores: list[list[float] | None] = [None] * len(jobs)
        if self.candidates > 1:
            scores = self._scores(jobs, pasted)
        results = []
        for job, (_, maps), cands, job_scores in zip(jobs, sampled, pasted, scores, strict=True):
            chosen = 0 if job_scores is None else int(np.argmax(job_scores))
            cands_np = cands.cpu().numpy()
            attention = None
            if maps is not None:
                # one resize, latent grid -> the canvas at the source's scale, then the canvas padding cut off
                w, h = job.image.size
                (sw, sh), (cw, ch) = job.canvas.scaled, job.canvas.size
                big = (max(w, round(cw * w / sw)), max(h, round(ch * h / sh)))
                att = Image.fromarray(maps[chosen].astype(np.float32), mode="F").resize(big, Image.Resampling.BILINEAR)
                attention = np.clip(np.asarray(att)[:h, :w], 0.0, 1.0)  # (H, W)
            results.append(GenerationResult(
                image=Image.fromarray(cands_np[chosen]), mask=job.mask, candidates=[Image.fromarray(c) for c in cands_np],
                scores=job_scores, chosen=chosen, attention=attention, seeds=job.seeds,
            ))
        return results

    def _scores(self, jobs: list[_Job], pasted: list[torch.Tensor]) -> list[list[float] | None]:
        """Each job's LFS scores of its pasted candidates' mask-box crops against its source's."""
        crops, refs = [], []
        for job, cands in zip(jobs, pasted, strict=True):
            y0, y1, x0, x1 = mask_bbox(job.mask)
            crops.append(_to_tensor(cands[:, y0:y1, x0:x1]))  # (N, 3, h, w)
            refs.append(_to_tensor(torch.from_numpy(job.source[None, y0:y1, x0:x1]).to(cands.device)))
        out: list[list[float] | None] = [None] * len(jobs)
        scorer = self.scorer
        pairs = getattr(scorer, "score_pairs", None)
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, c in enumerate(crops):  # one call per crop size; a plain scorer gets one call per image
            groups.setdefault(tuple(c.shape[-2:]) if pairs is not None else (j,), []).append(j)
        for members in groups.values():
            if pairs is not None:
                got = pairs(torch.cat([crops[j] for j in members]),
                            torch.cat([refs[j].expand_as(crops[j]) for j in members]))
            else:
                got = scorer(crops[members[0]], refs[members[0]])
            got = torch.as_tensor(got).reshape(-1).float()
            if got.numel() != self.candidates * len(members):
                raise RuntimeError(f"scorer returned {got.numel()} scores for "
                                   f"{self.candidates * len(members)} candidates")
            for k, j in enumerate(members):
                out[j] = [float(x) for x in got[k * self.candidates : (k + 1) * self.candidates]]
        return out

    def generate_many(self, requests: Sequence[tuple[Image.Image, np.ndarray, int]],
                      images_per_call: int | None = None) -> list[GenerationResult]:
        """`self(image, mask, seed)` for each request, in order, the candidates of up to `images_per_call`
        (default `batch_images`) images of one canvas size in each pipeline call: the same seeds, and the same
        images within float tolerance (one image per call gives them exactly)."""
        k = images_per_call or self.batch_images
        jobs = [self._prepare(image, mask, seed) for image, mask, seed in requests]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            by_size.setdefault(job.canvas.size, []).append(i)
        results: list[GenerationResult | None] = [None] * len(jobs)
        for members in by_size.values():
            for start in range(0, len(members), k):
                group = members[start : start + k]
                done = self._finish([jobs[i] for i in group], self._sample([jobs[i] for i in group]))
                for i, result in zip(group, done, strict=True):
                    results[i] = result
        return results  # type: ignore[return-value]

    def __call__(self, image: Image.Image, mask: np.ndarray, seed: int = 0) -> GenerationResult:
        """N candidates for one defect-free image and target mask (True = defect), the LFS choice among them."""
        return self.generate_many([(image, mask, seed)], images_per_call=1)[0]


@dataclass
class _Job:
    """One image to generate: its inputs at source size and on the model's canvas, its candidates' seeds."""

    image: Image.Image  # RGB, source size
    mask: np.ndarray  # (H, W) bool at source size
    source: np.ndarray  # (H, W, 3) uint8
    canvas: Canvas
    image_c: Image.Image
    mask_c: Image.Image
    seeds: list[int]


@contextmanager
def _mask_latents_per_image(pipe, rows: int) -> Iterator[None]:
    """Within the block, a pipeline call whose batch holds several images (`rows` consecutive rows each) makes each
    image's mask and masked-image latents as a call of that image alone does: diffusers encodes a call's one
    masked image once, sampled with the call's first generator, but a batch of masked images row by row, each
    with its own row's generator (another latent sample)."""
    original = pipe.prepare_mask_latents

    def per_image(mask, masked_image, batch_size, height, width, dtype, device, generator, cfg):
        parts = [original(mask[s : s + 1], masked_image[s : s + 1], rows, height, width, dtype, device,
                          generator[s : s + rows], False) for s in range(0, batch_size, rows)]
        masks, latents = torch.cat([m for m, _ in parts]), torch.cat([x for _, x in parts])
        if cfg:  # [unconditional rows, conditional rows], as the pipeline lays them out
            masks, latents = torch.cat([masks] * 2), torch.cat([latents] * 2)
        return masks, latents

    pipe.prepare_mask_latents = per_image  # an instance attribute over the method, removed after
    try:
        yield
    finally:
        del pipe.prepare_mask_latents
