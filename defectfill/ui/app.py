"""The gradio page of `defectfill ui`: three tabs over a `backend.Workspace`.

- Generate: a run, a defect-free image (the run's data or an upload), a mask painted with the brush or a
  shape placed on the object, the sampling settings; every candidate with its LFS score, the chosen one
  framed, the token's attention optionally laid over it; "Add to dataset".
- Dataset: a generated dataset's items by category and type, each with its mask, candidates and scores;
  reject (moved aside, marked in the manifest).
- Run: the run's settings, loss curves and logged sample inpaintings.

Every action is a named API endpoint (`gradio_client` drives them in the tests). A `DefectFillError`
becomes a `gr.Error`: a message in the page, never a traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

# no usage reporting from a local tool (and CI machines have no network)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from defectfill.config.sampling import PAPER_SAMPLING  # noqa: E402
from defectfill.config.stages import MAX_SEED  # noqa: E402
from defectfill.core.errors import DefectFillError  # noqa: E402
from defectfill.data.masks import SHAPES  # noqa: E402
from defectfill.outputs.report import token_check_summary  # noqa: E402
from defectfill.ui.backend import (  # noqa: E402
    Outcome,
    Source,
    Workspace,
    attention_overlay,
    framed,
    item_kind,
    mask_from_layers,
    mask_layer,
    os_error_message,
    outlined,
    place_shape,
    zoomed,
)

_THUMB = 256  # px: the run's defect-free images are shown as thumbnails, not served from its data folder
LOSS_NAMES = ("total", "defect", "object", "attention")  # the curves training logs (the plot's legend)
LOSS_COLOURS = {"total": "#222222", "defect": "#d62728", "object": "#1f77b4", "attention": "#2ca02c"}
# gradio sizes the plot's SVG to its height without the legend vega puts below it, and clips it: room is made
PAGE_CSS = "#losses svg.marks { overflow: visible; } #losses { overflow: visible; padding-bottom: 3em; }"


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input shows as a message in the page (and a clean error to API clients), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DefectFillError as exc:
            raise gr.Error(str(exc)) from None
        except OSError as exc:  # an unreadable or unwritable folder of runs, datasets or uploads
            raise gr.Error(os_error_message(exc)) from None

    return wrapper


def _thumb(path: Path) -> Image.Image:
    from defectfill.data.images import open_image

    with open_image(path) as im:
        im = im.convert("RGB")
        im.thumbnail((_THUMB, _THUMB))
        return im


def _editor_value(image: Image.Image, mask: np.ndarray | None = None) -> dict[str, Any]:
    """The editor showing `image`, with `mask` (a placed shape) as its layer. gradio's editor keeps a layer sent
    from the server but does not draw it, so a placed shape is also laid into the composite, which the editor
    shows as its picture; generation adds the placed shape to what is painted, so what is seen is the mask."""
    layer = mask_layer(mask if mask is not None else np.zeros((image.height, image.width), dtype=bool))
    background = image.convert("RGBA")
    composite = None
    if mask is not None:
        composite = background.copy()
        composite.alpha_composite(layer)
    return {"background": background, "layers": [layer], "composite": composite}


def _session_editor_data() -> type:
    """The editor's payload model for /generate, accepting the dict /place_shape returned to a gradio_client: the
    client hands back its own downloaded copies as plain paths, which are not the server's to read; they are
    dropped, and the handler uses what this session placed (the source and the shape it holds)."""
    from gradio.components.image_editor import EditorData
    from pydantic import model_validator

    class SessionEditorData(EditorData):
        @model_validator(mode="before")
        @classmethod
        def _drop_client_paths(cls, data: Any) -> Any:
            if isinstance(data, dict):
                data = {**data, **{key: None for key in ("background", "composite") if isinstance(data.get(key), str)}}
                if isinstance(data.get("layers"), list):
                    data["layers"] = [layer for layer in data["layers"] if not isinstance(layer, str)]
            return data

    return SessionEditorData


def _editor_image(value: Any) -> Image.Image | None:
    """An editor value's picture (its background) as RGB, from whatever a client sent: an image, an array or a
    file the server received."""
    from defectfill.data.images import load_rgb

    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        return Image.fromarray(value[..., :3] if value.ndim == 3 else value).convert("RGB")
    return load_rgb(value)


def build_app(ws: Workspace) -> gr.Blocks:
    """The page over `ws`:

    1. the handlers, bound to the workspace (`Handlers`); per-browser-tab state (source, placed shape, last
       result) is gr.State;
    2. the layout: the run row and the Generate, Dataset and Run tabs (`_layout`, its components by name);
    3. the wiring: each component's events to their handler, under the API names scripts and tests call
       (`_wire`).
    """
    handlers = Handlers(ws)
    with gr.Blocks(title="defectfill") as demo:
        components = _layout(ws)
        _wire(demo, handlers, components)
    return demo


def _report_progress(progress: gr.Progress, fraction: float, text: str) -> None:
    progress(fraction, desc=text)


class Handlers:
    """What the page's events do, over one workspace. A `DefectFillError` shows as a message (`_friendly`)."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    # ------------------------------------------------------------------ generate tab

    @_friendly
    def select_run(self, run: str):
        config = self.ws.run_config(run)
        try:
            images = self.ws.good_images(run)
            message = f"{len(images)} defect-free image(s) of **{config.category}** in `{config.data}`."
        except DefectFillError as exc:  # data moved: uploads still work
            images, message = [], f"{exc}"
        names = [p.name for p in images]
        gallery = [(_thumb(p), p.name) for p in images[:60]]
        types = self.ws.defect_types(run)  # a per-object run draws each of its types; one dataset holds them all
        suggested = config.category if config.per_object else f"{config.category}-{config.defect_type}"
        sampling = self.ws.recommended_sampling(run)  # the run's base's recommendation, the paper's otherwise
        return (gr.update(choices=names, value=names[0] if names else None), gallery, message, suggested,
                gr.update(choices=types, value=types[0], interactive=len(types) > 1),
                gr.update(value=sampling["steps"]), gr.update(value=sampling["guidance"]),
                gr.update(value=sampling["prompt"]), gr.update(value=sampling["unconditional"]), "",
                gr.update(choices=names, value=[]))

    @_friendly
    def sampling_note(self, run: str, prompt: str, steps: float, guidance: float, unconditional: str):
        """The warning beside the sampling controls when they depart from the base's recommendation."""
        if not run:
            return ""
        note = self.ws.sampling_note(run, (prompt or "").strip() or None, steps, guidance, unconditional or None)
        return f"⚠ {note}" if note else ""

    @_friendly
    def select_image(self, run: str, name: str):
        if not name:
            return gr.update(), None, None
        source = self.ws.source(run, name)
        return _editor_value(source.image), source, None

    @_friendly
    def pick_from_gallery(self, run: str, evt: gr.SelectData):
        names = [p.name for p in self.ws.good_images(run)]
        return names[evt.index] if evt.index is not None and evt.index < len(names) else gr.update()

    @_friendly
    def upload_image(self, image: str | Path | Image.Image | None):
        from defectfill.data.images import load_rgb

        if image is None:
            return gr.update(), None, None
        # the upload arrives as a file and is read by the one safe reader: a decompression bomb or a broken file
        # is a message on the page, not a traceback or a hang
        rgb = image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image)
        source = Source(rgb, None, "upload")
        return _editor_value(source.image), source, None

    @_friendly
    def place(self, source: Source | None, shape: str, size: float, seed: float):
        if source is None:
            raise DefectFillError("choose or upload a defect-free image first.")
        mask = place_shape(source.image, shape, float(size), int(seed))
        return _editor_value(source.image, mask), {"shape": shape, "size": float(size), "mask": mask}

    def clear_mask(self, source: Source | None):
        if source is None:
            return gr.update(), None
        return _editor_value(source.image), None

    @_friendly
    def generate(self, run: str, source: Source | None, editor: Any, placed: dict | None, candidates: float,
                 steps: float, guidance: float, seed: float, attention: bool, defect_type: str | None = None,
                 prompt: str | None = None, unconditional: str | None = None, lpips_fallback: bool = True,
                 progress: gr.Progress = gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's progress idiom
        editor = editor if isinstance(editor, dict) else {"background": editor, "layers": []}
        if source is None:  # an API client that sent the picture in the editor value (e.g. /place_shape's)
            image = _editor_image(editor.get("background"))
            if image is None:
                raise DefectFillError("choose or upload a defect-free image first (API: call /select_image or "
                                      "/upload_image, or send the editor value's background with handle_file).")
            source = Source(image, None, "upload")
        layers = [layer for layer in (editor.get("layers") or []) if layer is not None]
        mask = mask_from_layers(layers, source.image.size)
        shape = None
        if placed is not None and placed["mask"].shape == mask.shape[:2]:
            mask = mask | placed["mask"]  # the placed shape is in the editor's picture, so it stays in the mask
            if np.array_equal(placed["mask"], mask):
                shape = placed["shape"]  # the placed shape, unedited: recorded as `generate --masks shapes` does
        outcome = self.ws.generate(run, source, mask, candidates=int(candidates), steps=int(steps),
                                   guidance=float(guidance), seed=int(seed), attention=bool(attention),
                                   shape=shape, shape_size=placed["size"] if shape else None,
                                   progress=functools.partial(_report_progress, progress),
                                   defect_type=defect_type or None, prompt=prompt, unconditional=unconditional,
                                   lpips_fallback=bool(lpips_fallback))
        result = outcome.result
        gallery = []
        for i, cand in enumerate(result.candidates):
            shown = outlined(cand, result.mask)
            score = f" {result.scores[i]:.3f}" if result.scores else ""
            chosen = i == result.chosen
            # short captions (the gallery cuts long ones); the full text is the table below
            gallery.append((framed(shown) if chosen else shown, f"#{i}{score}{' ✓' if chosen else ''}"))
        shown = result.image
        if result.attention is not None:
            shown = attention_overlay(result.image, result.attention)
        lines = [f"**{len(result.candidates)} candidate(s)**, seed {outcome.settings['seed']}, mask "
                 f"`{outcome.mask_source}` ({int(result.mask.sum())} px, outlined in cyan). Low-Fidelity "
                 "Selection keeps the candidate least like the input inside the mask's box (highest LPIPS); it is "
                 f"framed in green and marked ✓. Prompt: `{outcome.prompt}`.", ""]
        lines += [f"> ⚠ {note}" for note in outcome.notes] + ([""] if outcome.notes else [])
        lines += ["| candidate | LFS score (higher: less like the input) | |", "|---|---|---|"]
        for i in range(len(result.candidates)):
            score = f"{result.scores[i]:.4f}" if result.scores else "- (1 candidate: no selection)"
            lines.append(f"| #{i} | {score} | {'chosen' if i == result.chosen else ''} |")
        zoom = zoomed([source.image, result.image], result.mask)
        return gallery, outlined(shown, result.mask), "\n".join(lines), outcome, zoom

    @_friendly
    def generate_batch(self, run: str, names: list[str] | None, count: float, shape: str, size: float, seed: float,
                       candidates: float, steps: float, guidance: float, defect_type: str | None = None,
                       prompt: str | None = None, unconditional: str | None = None, lpips_fallback: bool = True,
                       progress: gr.Progress = gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's progress idiom
        outcomes = self.ws.generate_batch(run, list(names or []), int(count), shape, float(size), int(seed),
                                          progress=functools.partial(_report_progress, progress),
                                          candidates=int(candidates), steps=int(steps), guidance=float(guidance),
                                          defect_type=defect_type or None, prompt=prompt,
                                          unconditional=unconditional, lpips_fallback=bool(lpips_fallback))
        gallery = [(outlined(o.result.image, o.result.mask), f"#{i} {o.source.label}") for i, o in enumerate(outcomes)]
        lines = [f"**{len(outcomes)} image(s)**, a `{shape}` of about {float(size):.3f} of the area placed on each "
                 "with the item's own seed. Prompt: " f"`{outcomes[0].prompt}`.", "",
                 "| # | image | item seed | LFS score of the chosen |", "|---|---|---|---|"]
        for i, o in enumerate(outcomes):
            score = f"{max(o.result.scores):.4f}" if o.result.scores else "-"
            lines.append(f"| {i} | {o.source.label} | {o.settings['item_seed']} | {score} |")
        notes = list(dict.fromkeys(n for o in outcomes for n in o.notes))
        lines += [""] + [f"> ⚠ {n}" for n in notes] if notes else []
        return gallery, "\n".join(lines), outcomes

    @_friendly
    def add_batch(self, outcomes: list[Outcome] | None, dataset: str):
        if not outcomes:
            raise DefectFillError("generate a batch first, then add it to a dataset.")
        rows = [self.ws.add_to_dataset(o, dataset) for o in outcomes if dataset not in o.added_to]
        if not rows:
            raise DefectFillError("this batch is already in that dataset; generate again for other items.")
        root = self.ws.dataset_path(dataset)
        message = f"Added items {rows[0]['index']}–{rows[-1]['index']} ({len(rows)}) to `{root}`."
        return message, gr.update(choices=self.ws.datasets(), value=str(root.relative_to(self.ws.datasets_root)))

    @_friendly
    def add(self, outcome: Outcome | None, dataset: str):
        if outcome is None:
            raise DefectFillError("generate first, then add the result to a dataset.")
        row = self.ws.add_to_dataset(outcome, dataset)
        root = self.ws.dataset_path(dataset)
        message = f"Added item {row['index']} to `{root}`: `{row['image']}` and `{row['mask']}`."
        return message, gr.update(choices=self.ws.datasets(), value=str(root.relative_to(self.ws.datasets_root)))

    # ------------------------------------------------------------------ dataset tab

    @_friendly
    def open_dataset(self, dataset: str | None):
        if not dataset:
            return gr.update(choices=[], value=None), gr.update(choices=[], value=None)
        items = self.ws.dataset_items(dataset, rejected=True)
        cats = sorted({i["category"] for i in items})
        types = sorted({i["defect_type"] for i in items})
        return (gr.update(choices=["(all)"] + cats, value="(all)"),
                gr.update(choices=["(all)"] + types, value="(all)"))

    @_friendly
    def browse(self, dataset: str | None, category: str | None, defect_type: str | None, rejected: bool):
        if not dataset:
            return [], []
        items = self.ws.dataset_items(dataset, None if category in (None, "(all)") else category,
                                 None if defect_type in (None, "(all)") else defect_type, bool(rejected))
        root = self.ws.dataset_path(dataset)
        gallery = []
        for it in items:
            score = f" · LFS {max(it['scores']):.4f}" if it.get("scores") else ""
            mark = " ✗ rejected" if it["is_rejected"] else " ✓ approved" if it["is_approved"] else ""
            gallery.append((str(root / it["image"]), f"#{it['index']}{score}{mark}"))
        return gallery, [it["index"] for it in items]

    def item_label(self, dataset: str | None, index: float | None) -> str:
        if not dataset or index is None or index < 0:
            return "**Item:** none chosen (click one in the grid)"
        return f"**Item {int(index)}** of `{dataset}`"

    def pick_item(self, shown: list[int], evt: gr.SelectData):
        return shown[evt.index] if shown and evt.index is not None and evt.index < len(shown) else gr.update()

    @_friendly
    def show_item(self, dataset: str | None, index: float | None):
        if not dataset or index is None or index < 0:
            return None, None, None, [], None
        files = self.ws.item_files(dataset, int(index))
        row = files["row"]
        scores = row.get("scores") or []
        candidates = [(str(p), f"#{c}" + (f" · LFS {scores[c]:.4f}" if c < len(scores) else "")
                       + (" · CHOSEN" if c == row.get("chosen") else "")) for c, p in enumerate(files["candidates"])]
        # the source lies in the run's data folder, which is not served: sent as an image
        source = _thumb(files["source"]) if files["source"] else None
        return str(files["image"]), str(files["mask"]), source, candidates, row

    @_friendly
    def references(self, dataset: str | None, index: float | None):
        """The real defect images the dataset's run learnt from, of the item's type: to judge it against."""
        if not dataset or index is None or index < 0:
            return []
        run = self.ws.dataset_run(dataset)
        if run is None:
            return []
        row = self.ws.item_files(dataset, int(index))["row"]
        _, kind = item_kind(row)
        return [(_thumb(p), p.name) for p in self.ws.references(run, kind or None)[:24]]

    @_friendly
    def approve(self, dataset: str | None, index: float | None, shown: list[int] | None, every: bool,
                approved: bool = True):
        if not dataset:
            raise DefectFillError("choose a dataset first.")
        indices = list(shown or []) if every else ([] if index is None or index < 0 else [int(index)])
        if every:  # the rejected ones among those shown stay as they are
            rejected = {i["index"] for i in self.ws.dataset_items(dataset, rejected=True) if i["is_rejected"]}
            indices = [i for i in indices if i not in rejected]
        rows = self.ws.approve(dataset, indices, approved)
        what = "approved" if approved else "no longer approved"
        return f"{len(rows)} item(s) {what}: {', '.join(str(r['index']) for r in rows)} (saved in the manifest)."

    @_friendly
    def reject(self, dataset: str | None, index: float | None, reason: str):
        if not dataset or index is None or index < 0:
            raise DefectFillError("choose an item in the grid first.")
        row = self.ws.reject(dataset, int(index), reason or "")
        return f"Item {int(index)} rejected: moved to `{row['image']}` (nothing deleted)."

    # ------------------------------------------------------------------ run tab

    @_friendly
    def show_run(self, run: str):
        import pandas as pd

        info = self.ws.run_info(run)
        losses = pd.DataFrame(info["losses"] or [], columns=["step", "loss", "value"])
        samples = [(str(p), p.stem) for p in info["samples"]]
        lines = [f"Run folder: `{info['folder']}`", ""]
        for defect_type, record in info["token_checks"].items():
            lines.append(f"**Token self-check{f' ({defect_type})' if defect_type else ''}:** "
                         f"{token_check_summary(record)}")
        if not info["token_checks"]:
            lines.append("**Token self-check:** none recorded (trained with --no-token-check, or before it existed).")
        return info["settings"], losses, samples, "\n".join(lines)


    @_friendly
    def rescan_runs(self):
        return gr.update(choices=list(self.ws.runs()))

    @_friendly
    def refresh_datasets(self):
        return gr.update(choices=self.ws.datasets())

    @_friendly
    def items(self, dataset: str, category: str = "", defect_type: str = "", rejected: bool = False) -> list[dict]:
        """For scripts: a dataset's items as manifest rows, filtered."""
        return self.ws.dataset_items(dataset, category or None, defect_type or None, bool(rejected))


def _layout(ws: Workspace) -> SimpleNamespace:
    """The page's components (inside the Blocks being built), by the names the wiring uses."""
    runs = list(ws.runs())
    gr.Markdown("# defectfill\nPaint a defect onto a defect-free image with a trained run, pick what is good, "
                "and curate the generated dataset.")
    with gr.Row():
        # custom values allowed: every name is checked by the workspace (a run found under the roots)
        run_dd = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", elem_id="run", scale=3,
                             allow_custom_value=True)
        run_type_dd = gr.Dropdown([], label="Defect type (a per-object run draws each of its types)",
                                  elem_id="run-defect-type", scale=2)
        runs_btn = gr.Button("Rescan runs", scale=0)
    source_state = gr.State(None)
    placed_state = gr.State(None)
    outcome_state = gr.State(None)
    with gr.Tab("Generate"):
        with gr.Row():
            with gr.Column(scale=1):
                data_note = gr.Markdown()
                image_dd = gr.Dropdown([], label="Defect-free image", elem_id="image", allow_custom_value=True)
                good_gallery = gr.Gallery(label="The run's defect-free images (click one)", columns=4,
                                          height=260, allow_preview=False, format="png")
                upload = gr.Image(type="filepath", sources=["upload"], label="...or upload one", height=160)
            with gr.Column(scale=2):
                editor = gr.ImageEditor(
                    label="Paint where the defect goes (or place a shape)", type="numpy", image_mode="RGBA",
                    sources=[], format="png", transforms=[], layers=False, elem_id="editor",
                    brush=gr.Brush(colors=["#ff0000"], color_mode="fixed", default_size="auto"),
                )
                editor.data_model = _session_editor_data()
                with gr.Row():
                    shape_dd = gr.Dropdown(list(SHAPES), value="ellipse", label="Shape")
                    size = gr.Slider(0.002, 0.3, value=0.03, step=0.001, label="Shape size (area fraction)")
                    place_btn = gr.Button("Place shape", elem_id="place")
                    clear_btn = gr.Button("Clear mask", elem_id="clear-mask")
        with gr.Row():
            candidates = gr.Slider(1, 16, value=4, step=1, label="Candidates", elem_id="n-candidates")
            steps = gr.Slider(1, 100, value=30, step=1, label="Steps", elem_id="steps")
            # until a run is chosen (then the run's base's recommendation)
            guidance = gr.Slider(1.0, 15.0, value=PAPER_SAMPLING["guidance"], step=0.5, label="Guidance",
                                 elem_id="guidance")
            seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            attention = gr.Checkbox(False, label="Show the token's attention")
        with gr.Row():
            # until a run is chosen (then the run's base's recommendation, as the steps and guidance)
            prompt = gr.Textbox("A {object} with {token}", label="Prompt ({token}: the trained defect word; "
                                "{object}: the category)", elem_id="prompt", scale=3)
            unconditional = gr.Radio(["tuned", "base"], value=PAPER_SAMPLING["unconditional"],
                                     label="Guidance's unconditional branch", elem_id="unconditional", scale=1)
            lpips_fallback = gr.Checkbox(True, label="LPIPS: untrained AlexNet when the weights cannot be fetched "
                                         "(offline; said with the result)", elem_id="lpips-fallback", scale=1)
        sampling_md = gr.Markdown(elem_id="sampling-note")
        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            cand_gallery = gr.Gallery(label="Candidates (LFS score; ✓ chosen, framed)", columns=2,
                                      height=560, format="png", elem_id="candidates", object_fit="contain")
            chosen_img = gr.Image(label="Chosen (mask outlined)", type="pil", format="png", height=560,
                                  elem_id="chosen")
        zoom_img = gr.Image(label="Zoom on the defect's box: source | chosen", type="pil", format="png",
                            height=300, elem_id="zoom")
        scores_md = gr.Markdown()
        with gr.Row():
            dataset_name = gr.Textbox(label="Dataset folder (inside the datasets folder)", elem_id="dataset")
            add_btn = gr.Button("Add to dataset", elem_id="add")
        add_md = gr.Markdown(elem_id="add-status")
        with gr.Accordion("Batch: N images with this shape", open=False):
            with gr.Row():
                batch_images = gr.Dropdown([], multiselect=True, label="Defect-free images (none: all of the "
                                           "run's, in turn)", elem_id="batch-images", scale=3)
                batch_count = gr.Slider(1, 64, value=4, step=1, label="How many", elem_id="batch-count")
                batch_btn = gr.Button("Generate the batch", elem_id="batch-generate")
            batch_gallery = gr.Gallery(label="Chosen images (mask outlined)", columns=4, height=420, format="png",
                                       elem_id="batch-results", object_fit="contain")
            batch_md = gr.Markdown()
            batch_add_btn = gr.Button("Add the batch to the dataset", elem_id="batch-add")
            batch_add_md = gr.Markdown()
        batch_state = gr.State(None)
    with gr.Tab("Dataset"):
        with gr.Row():
            ds_dd = gr.Dropdown(ws.datasets(), label="Dataset", elem_id="ds", allow_custom_value=True)
            refresh_btn = gr.Button("Refresh")
            cat_dd = gr.Dropdown([], label="Category")
            type_dd = gr.Dropdown([], label="Defect type")
            show_rejected = gr.Checkbox(False, label="Show rejected")
        shown_state = gr.State([])
        items_gallery = gr.Gallery(label="Items", columns=6, height=300, allow_preview=False)
        # the chosen item's index, for the handlers and the API; a Number shows an empty value as 0, so the page
        # shows a sentence instead
        item_index = gr.Number(None, precision=0, label="Item index", visible="hidden")
        item_md = gr.Markdown("**Item:** none chosen (click one in the grid)", elem_id="item-index")
        with gr.Row():
            item_image = gr.Image(label="Image", type="filepath", height=220)
            item_mask = gr.Image(label="Mask", type="filepath", height=220)
            item_source = gr.Image(label="Source", type="filepath", height=220)
        item_cands = gr.Gallery(label="Candidates (saved ones)", columns=8, height=200, allow_preview=False)
        item_refs = gr.Gallery(label="Real defects the run learnt from (its references), to compare", columns=8,
                               height=200, allow_preview=False, elem_id="references")
        item_row = gr.JSON(label="Manifest row")
        with gr.Row():
            reason = gr.Textbox(label="Why rejected (optional)")
            reject_btn = gr.Button("Reject (move aside)", variant="stop")
            approve_btn = gr.Button("Approve", elem_id="approve")
            approve_all_btn = gr.Button("Approve all shown", elem_id="approve-all")
            unapprove_btn = gr.Button("Unapprove")
        reject_md = gr.Markdown()
    with gr.Tab("Run"):
        run_md = gr.Markdown()
        settings_json = gr.JSON(label="Settings (config.json)")
        loss_plot = gr.LinePlot(x="step", y="value", color="loss", label="Losses (metrics.jsonl)", height=300,
                                color_title="loss", color_map=LOSS_COLOURS, x_title="step",
                                y_title="loss value", elem_id="losses")
        samples_gallery = gr.Gallery(label="Logged sample inpaintings: source | mask | inpainting", columns=1,
                                     height=300)

    return SimpleNamespace(batch_images=batch_images, batch_count=batch_count, batch_btn=batch_btn,
                           batch_gallery=batch_gallery, batch_md=batch_md, batch_add_btn=batch_add_btn,
                           batch_add_md=batch_add_md, batch_state=batch_state, item_refs=item_refs,
                           approve_btn=approve_btn, approve_all_btn=approve_all_btn, unapprove_btn=unapprove_btn,
                           clear_btn=clear_btn, item_md=item_md, prompt=prompt, unconditional=unconditional,
                           lpips_fallback=lpips_fallback, sampling_md=sampling_md, zoom_img=zoom_img, run_dd=run_dd, run_type_dd=run_type_dd, runs_btn=runs_btn, source_state=source_state, placed_state=placed_state, outcome_state=outcome_state, data_note=data_note, image_dd=image_dd, good_gallery=good_gallery, upload=upload, editor=editor, shape_dd=shape_dd, size=size, place_btn=place_btn, candidates=candidates, steps=steps, guidance=guidance, seed=seed, attention=attention, generate_btn=generate_btn, cand_gallery=cand_gallery, chosen_img=chosen_img, scores_md=scores_md, dataset_name=dataset_name, add_btn=add_btn, add_md=add_md, ds_dd=ds_dd, refresh_btn=refresh_btn, cat_dd=cat_dd, type_dd=type_dd, show_rejected=show_rejected, shown_state=shown_state, items_gallery=items_gallery, item_index=item_index, item_image=item_image, item_mask=item_mask, item_source=item_source, item_cands=item_cands, item_row=item_row, reason=reason, reject_btn=reject_btn, reject_md=reject_md, run_md=run_md, settings_json=settings_json, loss_plot=loss_plot, samples_gallery=samples_gallery)


def _wire(demo: gr.Blocks, h: Handlers, c: SimpleNamespace) -> None:
    """Each component's events to their handler; the named ones are the page's API."""
    run_outputs = [c.image_dd, c.good_gallery, c.data_note, c.dataset_name, c.run_type_dd, c.steps, c.guidance,
                   c.prompt, c.unconditional, c.sampling_md, c.batch_images]
    sampling_inputs = [c.run_dd, c.prompt, c.steps, c.guidance, c.unconditional]
    for control in (c.prompt, c.steps, c.guidance, c.unconditional):
        control.change(h.sampling_note, sampling_inputs, c.sampling_md, api_visibility="private")
    c.run_dd.change(h.select_run, c.run_dd, run_outputs, api_name="select_run")
    c.run_dd.change(h.show_run, c.run_dd, [c.settings_json, c.loss_plot, c.samples_gallery, c.run_md], api_name="run_info")
    demo.load(h.select_run, c.run_dd, run_outputs, api_visibility="private")
    demo.load(h.show_run, c.run_dd, [c.settings_json, c.loss_plot, c.samples_gallery, c.run_md], api_visibility="private")
    c.image_dd.change(h.select_image, [c.run_dd, c.image_dd], [c.editor, c.source_state, c.placed_state],
                    api_name="select_image")
    c.good_gallery.select(h.pick_from_gallery, c.run_dd, c.image_dd, api_visibility="private")
    c.upload.upload(h.upload_image, c.upload, [c.editor, c.source_state, c.placed_state], api_name="upload_image")
    c.place_btn.click(h.place, [c.source_state, c.shape_dd, c.size, c.seed], [c.editor, c.placed_state], api_name="place_shape")
    c.clear_btn.click(h.clear_mask, c.source_state, [c.editor, c.placed_state], api_visibility="private")
    # one generation at a time on the device: two tabs queue instead of sharing its memory
    c.generate_btn.click(h.generate, [c.run_dd, c.source_state, c.editor, c.placed_state, c.candidates, c.steps, c.guidance, c.seed,
                                  c.attention, c.run_type_dd, c.prompt, c.unconditional, c.lpips_fallback],
                         [c.cand_gallery, c.chosen_img, c.scores_md, c.outcome_state, c.zoom_img],
                       api_name="generate", concurrency_limit=1, concurrency_id="device")
    c.batch_btn.click(h.generate_batch, [c.run_dd, c.batch_images, c.batch_count, c.shape_dd, c.size, c.seed,
                                         c.candidates, c.steps, c.guidance, c.run_type_dd, c.prompt, c.unconditional,
                                         c.lpips_fallback], [c.batch_gallery, c.batch_md, c.batch_state],
                      api_name="generate_batch", concurrency_limit=1, concurrency_id="device")
    c.batch_add_btn.click(h.add_batch, [c.batch_state, c.dataset_name], [c.batch_add_md, c.ds_dd],
                          api_name="add_batch", concurrency_limit=1, concurrency_id="write")
    c.add_btn.click(h.add, [c.outcome_state, c.dataset_name], [c.add_md, c.ds_dd], api_name="add_to_dataset",
                  concurrency_limit=1, concurrency_id="write")
    browse_inputs = [c.ds_dd, c.cat_dd, c.type_dd, c.show_rejected]
    c.ds_dd.change(h.open_dataset, c.ds_dd, [c.cat_dd, c.type_dd], api_visibility="private").then(
        h.browse, browse_inputs, [c.items_gallery, c.shown_state], api_visibility="private")
    for trigger in (c.cat_dd.change, c.type_dd.change, c.show_rejected.change):
        trigger(h.browse, browse_inputs, [c.items_gallery, c.shown_state], api_visibility="private")
    c.runs_btn.click(h.rescan_runs, None, c.run_dd, api_visibility="private")
    c.refresh_btn.click(h.refresh_datasets, None, c.ds_dd, api_visibility="private")
    c.items_gallery.select(h.pick_item, c.shown_state, c.item_index, api_visibility="private")
    c.item_index.change(h.show_item, [c.ds_dd, c.item_index], [c.item_image, c.item_mask, c.item_source, c.item_cands, c.item_row],
                      api_name="item")
    c.item_index.change(h.references, [c.ds_dd, c.item_index], c.item_refs, api_name="references")
    c.item_index.change(h.item_label, [c.ds_dd, c.item_index], c.item_md, api_visibility="private")
    for button, every, approved, name in ((c.approve_btn, False, True, "approve"),
                                          (c.approve_all_btn, True, True, "approve_shown"),
                                          (c.unapprove_btn, False, False, "unapprove")):
        button.click(functools.partial(h.approve, every=every, approved=approved),
                     [c.ds_dd, c.item_index, c.shown_state], c.reject_md, api_name=name,
                     concurrency_limit=1, concurrency_id="write").then(
            h.browse, browse_inputs, [c.items_gallery, c.shown_state], api_visibility="private")
    c.reject_btn.click(h.reject, [c.ds_dd, c.item_index, c.reason], c.reject_md, api_name="reject",
                     concurrency_limit=1, concurrency_id="write").then(
        h.browse, browse_inputs, [c.items_gallery, c.shown_state], api_visibility="private")

    gr.api(h.items, api_name="items")


def launch(demo: gr.Blocks, ws: Workspace, host: str = "127.0.0.1", port: int = 7860,
           logins: list[tuple[str, str]] | None = None, block: bool = True) -> Any:
    """Serve the page. Only the datasets and runs folders are served as files (gallery images)."""
    demo.queue(default_concurrency_limit=4)  # light events in parallel; generate and writes have their own limit
    allowed = [str(ws.datasets_root.resolve())] + [str(r.resolve()) for r in ws.run_roots]
    return demo.launch(server_name=host, server_port=port, auth=logins, allowed_paths=allowed, share=False,
                       inbrowser=False, show_error=True, prevent_thread_lock=not block, quiet=not block, css=PAGE_CSS)
