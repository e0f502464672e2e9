"""`defectfill ui` served on localhost: its API driven by gradio_client, and the page driven by a real headless
Chromium (Debian's chromium + chromium-driver, installed by scripts/setup.sh; that test is skipped without them).

The tiny model at 2 steps keeps a generation to seconds on a CPU."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import write_run
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from defectfill.config.stages import GenerateConfig  # noqa: E402
from defectfill.data import load_mask, open_layout  # noqa: E402
from defectfill.generate.generator import derived_seed  # noqa: E402
from defectfill.generate.writer import run_generate  # noqa: E402
from defectfill.outputs.generated import MANIFEST  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # git-ignored; CI keeps what is there
RUN = "disc-scratch"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    GenerateConfig.add_arguments(parser)
    return parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, demo_root):
    """The app on a free localhost port over one tiny run, and its workspace; closed after the module."""
    base = tmp_path_factory.mktemp("ui")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(base / "gradio-cache"))
    from defectfill.ui.app import build_app, launch
    from defectfill.ui.backend import Workspace

    write_run(base / "runs" / RUN, tiny_model_dir, demo_root)
    ws = Workspace([base / "runs"], base / "datasets", device="cpu", lpips_random_backbone=True)
    demo = build_app(ws)
    port = _free_port()
    launch(demo, ws, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", ws, base
    demo.close()


def _editor_arg(value: dict) -> dict:
    """An editor value returned by the client (local file paths) as the client sends it back."""
    from gradio_client import handle_file

    return {"background": handle_file(value["background"]), "layers": [handle_file(p) for p in value["layers"]],
            "composite": None}


def _files(root: Path) -> set[str]:
    skip = {".defectfill.lock"}
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in skip}


def test_generate_add_reject_through_the_api_writes_what_generate_writes(served, demo_root, tmp_path):
    url, ws, base = served
    client = gradio_client.Client(url, verbose=False)
    client.predict(RUN, api_name="/select_run")
    client.predict(RUN, "000.png", api_name="/select_image")
    placed = client.predict("ellipse", 0.05, 3, api_name="/place_shape")
    seed = 0  # as `defectfill generate --seed 0`: its item 0 (item seed derived_seed(0, 0))
    t0 = time.perf_counter()
    # the dict /place_shape returned goes back as it is
    gallery, chosen, scores_md, zoom = client.predict(RUN, placed, 2, 2, 7.5, seed, False, "scratch",
                                                      api_name="/generate")
    print(f"generate through the API: {time.perf_counter() - t0:.1f} s")
    assert len(gallery) == 2 and sum("✓" in g["caption"] for g in gallery) == 1
    assert all(len(g["caption"]) <= 10 and " 0." in g["caption"] for g in gallery) and "| #1 |" in scores_md
    # results readable: upscaled to >= 256 px (the base paints 64 px), the zoom crop as large
    assert min(Image.open(gallery[0]["image"]).size) >= 256 and min(Image.open(chosen).size) >= 256
    assert min(Image.open(zoom).size) >= 256
    status, _ = client.predict("disc-scratch", api_name="/add_to_dataset")
    assert "Added item 0" in status
    ui_root = ws.datasets_root / "disc-scratch"

    # the same item written by `defectfill generate`: same image and mask, seed, settings
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    shutil.copy(demo_root / "disc" / "train" / "good" / "000.png", images / "000.png")
    shutil.copy(ui_root / "disc" / "ground_truth" / "scratch" / "000_mask.png", masks / "m.png")
    cli_root = tmp_path / "cli"
    args = ["--run", str(ws.run_dir(RUN)), "--output", str(cli_root), "--count", "1", "--images", str(images),
            "--masks", str(masks), "--candidates", "2", "--steps", "2", "--save-candidates", "--lpips-random-backbone"]
    run_generate(GenerateConfig.from_args(_parser().parse_args(args)))
    assert _files(ui_root) == _files(cli_root)  # the layout: MVTec tree, candidates, train/good, preview
    ui_row, cli_row = (json.loads((r / MANIFEST).read_text()) for r in (ui_root, cli_root))
    assert ui_row["seed"] == derived_seed(0, 0) and ui_row["settings"]["seed"] == 0  # generate --seed 0's item 0
    assert ui_row.keys() == cli_row.keys() and ui_row["settings"].keys() == cli_row["settings"].keys()
    for key in ui_row.keys() - {"source_image", "mask_source", "settings", "provenance"}:
        assert ui_row[key] == cli_row[key], key
    # the same base, LoRA, version, device and precision; only the time each row was written differs
    assert {**ui_row["provenance"], "created_utc": None} == {**cli_row["provenance"], "created_utc": None}
    assert ui_row["mask_source"] == "shape:ellipse" and ui_row["settings"]["masks"] == "shapes"
    for name in ("disc/test/scratch/000.png", "disc/ground_truth/scratch/000_mask.png",
                 "candidates/disc/scratch/000_0.png", "candidates/disc/scratch/000_1.png"):
        assert np.array_equal(np.asarray(Image.open(ui_root / name)), np.asarray(Image.open(cli_root / name))), name
    state = json.loads((ui_root / "generate.json").read_text())
    assert state.keys() - {"per_item_settings"} == json.loads((cli_root / "generate.json").read_text()).keys()
    assert state["config"]["candidates"] == 2 and state["config"]["mixed_precision"] == "no"
    mask = load_mask(ui_root / "disc/ground_truth/scratch/000_mask.png")
    assert 0.04 <= mask.mean() <= 0.06  # the placed shape's size
    layout = open_layout(ui_root, "auto")
    assert layout.name == "mvtec" and layout.defect_types("disc") == ["scratch"]

    # the same result cannot be added twice; a second generation becomes item 1
    with pytest.raises(gradio_client.exceptions.AppError, match="already in"):
        client.predict("disc-scratch", api_name="/add_to_dataset")
    client.predict(RUN, _editor_arg(placed), 1, 2, 3.0, 5, True, api_name="/generate")
    assert "Added item 1" in client.predict("disc-scratch", api_name="/add_to_dataset")[0]
    # generate.json stays item 0's (the folder's record is not rewritten by a later add); item 1's own settings
    # are its row's
    assert json.loads((ui_root / "generate.json").read_text()) == state
    rows = [json.loads(line) for line in (ui_root / MANIFEST).read_text().splitlines()]
    assert state["settings"] == rows[0]["settings"] and state["config"]["guidance"] == 7.5
    assert rows[1]["settings"]["guidance"] == 3.0 and rows[1]["settings"]["candidates"] == 1

    # the Dataset tab: the item with its candidates and scores; reject moves it aside and marks it
    image, mask_file, source, cands, row = client.predict("disc-scratch", 0, api_name="/item")
    assert len(cands) == 2 and row["scores"] == ui_row["scores"] and source is not None
    before = (ui_root / "disc/test/scratch/000.png").read_bytes()
    assert "rejected" in client.predict("disc-scratch", 0, "too faint", api_name="/reject")
    assert not (ui_root / "disc/test/scratch/000.png").exists()
    assert (ui_root / "rejected/disc/test/scratch/000.png").read_bytes() == before  # moved, not deleted
    assert (ui_root / "rejected/disc/ground_truth/scratch/000_mask.png").is_file()
    rows = [json.loads(line) for line in (ui_root / MANIFEST).read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[0]["rejected"]["reason"] == "too faint"
    assert rows[0]["rejected"]["from"]["image"] == "disc/test/scratch/000.png" and "rejected" not in rows[1]
    assert [r["index"] for r in client.predict("disc-scratch", "disc", "scratch", False, api_name="/items")] == [1]
    assert len(client.predict("disc-scratch", "", "", True, api_name="/items")) == 2
    assert [s.image.name for s in open_layout(ui_root, "mvtec").defect_samples("disc", "scratch")] == ["001.png"]
    with pytest.raises(gradio_client.exceptions.AppError, match="already rejected"):
        client.predict("disc-scratch", 0, "", api_name="/reject")


def test_the_api_refuses_paths_outside_its_folders(served):
    url, ws, base = served
    client = gradio_client.Client(url, verbose=False)
    for dataset in ("../escape", "/tmp/escape", "x/../../escape"):
        with pytest.raises(gradio_client.exceptions.AppError, match="outside"):
            client.predict(dataset, 0, api_name="/item")
    with pytest.raises(gradio_client.exceptions.AppError, match="not one of the defect-free images"):
        client.predict(RUN, "../../../etc/passwd", api_name="/select_image")
    with pytest.raises(gradio_client.exceptions.AppError, match="not one of the finished runs"):
        client.predict("../runs/" + RUN, api_name="/select_run")
    with pytest.raises(gradio_client.exceptions.AppError, match="generate first"):
        client.predict("../escape", api_name="/add_to_dataset")
    assert not (base / "escape").exists() and not (ws.datasets_root.parent / "escape").exists()


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _set_number(browser, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _shot(element) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(int)


def _picture_box(shot: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the editor's picture in a screenshot of the editor: the non-white block,
    leaving out the tool bar (left) and the zoom bar and label (top)."""
    h, w, _ = shot.shape
    inner = shot[40:h - 5, 60:w - 60]
    ys, xs = np.nonzero(inner.min(axis=2) < 200)
    return xs.min() + 60, ys.min() + 40, xs.max() + 61, ys.max() + 41


def _grown(mask: np.ndarray, n: int) -> np.ndarray:
    """`mask` dilated by n pixels (4-neighbour steps)."""
    out = mask.copy()
    for _ in range(n):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _reddish(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2])) > 60


def test_a_real_browser_generates_through_the_buttons(served, demo_root):
    """The page in headless Chromium: the placed shape is seen in the editor (pixels of the screenshot inside the
    shape red, outside not), the prompt typed is the one sampled, results are shown large."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from defectfill.data import load_rgb
    from defectfill.ui.backend import place_shape

    url, ws, _ = served
    source = load_rgb(demo_root / "disc" / "train" / "good" / "000.png")
    placed = place_shape(source, "ellipse", 0.03, 0)  # the page's default shape, size and seed
    token = ws.run_config(RUN).prompt_token
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(url)
        # the run's first image is loaded into the editor on page load
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#editor canvas")))
        wait.until(lambda b: "defect-free image(s) of" in b.page_source)
        # the prompt starts at the base's recommendation (the tiny base has none: the run's object prompt)
        prompt_box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        assert prompt_box.get_attribute("value") == "A {object} with {token}"
        _set_number(browser, "steps", 2)
        _set_number(browser, "n-candidates", 3)
        time.sleep(1.0)
        editor = browser.find_element(By.ID, "editor")
        before = _shot(editor)
        browser.find_element(By.ID, "place").click()
        wait.until(lambda b: _reddish(_shot(editor)).sum() > 200)
        time.sleep(1.0)  # the picture settles
        after = _shot(editor)
        assert after.shape == before.shape
        left, top, right, bottom = _picture_box(before)
        scale = (right - left) / source.width
        assert abs((bottom - top) / source.height - scale) < 0.05 * scale  # the picture shown whole, unstretched
        ys, xs = np.mgrid[top:bottom, left:right]
        shape = placed[np.clip(((ys - top + 0.5) / scale).astype(int), 0, source.height - 1),
                       np.clip(((xs - left + 0.5) / scale).astype(int), 0, source.width - 1)]
        inside = ~_grown(~shape, 3)  # away from the edge, where pixels blend
        outside = ~_grown(shape, 3)
        red_after, red_before = _reddish(after[top:bottom, left:right]), _reddish(before[top:bottom, left:right])
        assert inside.sum() > 200 and red_after[inside].mean() > 0.9, red_after[inside].mean()
        assert red_after[outside].mean() < 0.01 and red_before[inside].mean() < 0.01
        prompt_box.send_keys(Keys.CONTROL, "a")
        prompt_box.send_keys("A photo of {token}", Keys.TAB)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#candidates img")) >= 3)
        wait.until(lambda b: "✓" in b.page_source and f"A photo of {token}" in b.page_source)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "ui-generate.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")
    finally:
        browser.quit()


def test_a_batch_on_chosen_images_then_review_against_the_references(served):
    """N images with one shape, each its own item seed (as `defectfill generate` seeds item i) and its own placed
    shape; added as items in turn; approved and unapproved in the manifest; the run's real references beside."""
    from defectfill.outputs.run_folder import read_run_split

    url, ws, base = served
    client = gradio_client.Client(url, verbose=False)
    client.predict(RUN, api_name="/select_run")
    gallery, md = client.predict(RUN, ["000.png", "001.png"], 3, "ellipse", 0.05, 0, 1, 1, 7.5, "scratch",
                                 api_name="/generate_batch")
    assert [g["caption"] for g in gallery] == ["#0 000.png", "#1 001.png", "#2 000.png"]
    assert min(Image.open(gallery[0]["image"]).size) >= 256 and "| 2 | 000.png |" in md
    status, _ = client.predict("batch-ds", api_name="/add_batch")
    assert "Added items 0–2 (3)" in status
    root = ws.datasets_root / "batch-ds"
    rows = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]
    assert [Path(r["source_image"]).name for r in rows] == ["000.png", "001.png", "000.png"]
    assert [r["seed"] for r in rows] == [derived_seed(0, i) for i in range(3)]
    assert all(r["mask_source"] == "shape:ellipse" for r in rows)
    masks = [load_mask(root / r["mask"]) for r in rows]
    assert not np.array_equal(masks[0], masks[2])  # same image, own seed: the shape lies elsewhere
    with pytest.raises(gradio_client.exceptions.AppError, match="already in that dataset"):
        client.predict("batch-ds", api_name="/add_batch")

    assert "1 item(s) approved: 1" in client.predict("batch-ds", 1, api_name="/approve")
    items = client.predict("batch-ds", "", "", False, api_name="/items")
    assert [i["is_approved"] for i in items] == [False, True, False]
    assert "approved" in json.loads((root / MANIFEST).read_text().splitlines()[1])
    client.predict("batch-ds", 1, api_name="/unapprove")
    assert not any(i["is_approved"] for i in client.predict("batch-ds", "", "", False, api_name="/items"))
    client.predict("batch-ds", 2, "", api_name="/reject")
    with pytest.raises(gradio_client.exceptions.AppError, match="is rejected"):
        client.predict("batch-ds", 2, api_name="/approve")
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))
    # "Approve all shown" (the grid's items): the rejected one among them is left as it is
    from defectfill.ui.app import Handlers

    assert "2 item(s) approved: 0, 1" in Handlers(ws).approve("batch-ds", None, [0, 1, 2], every=True)
    assert [i["is_approved"] for i in ws.dataset_items("batch-ds", rejected=True)] == [True, True, False]

    references = client.predict("batch-ds", 0, api_name="/references")
    expected = read_run_split(ws.run_dir(RUN)).reference
    assert len(references) == len(expected) > 0
    assert sorted(r["caption"] for r in references) == sorted(s.image.name for s in expected)


def test_a_real_browser_shows_the_loss_legend_and_no_item_as_none(served):
    """The Run tab's loss plot shows its legend (the legend's symbols are in the screenshot, below the curves, not
    clipped away), and the Dataset tab says 'none' rather than an index of -1 when no item is chosen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from defectfill.outputs.run_folder import append_metrics
    from defectfill.ui.app import LOSS_COLOURS

    url, ws, _ = served
    run = ws.run_dir(RUN)
    if not (run / "metrics.jsonl").exists():
        for step in range(1, 6):
            append_metrics(run, {"step": step, "loss": {"total": 1 / step, "defect": 0.6 / step,
                                                        "object": 0.4 / step, "attention": 0.2 / step}})
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(url)
        wait.until(lambda b: "defect-free image(s) of" in b.page_source)
        next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text.strip() == "Run").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#losses .role-legend-label text"))
        time.sleep(1.0)
        plot = browser.find_element(By.ID, "losses")
        box = plot.rect
        labels = browser.find_elements(By.CSS_SELECTOR, "#losses .role-legend-label text")
        assert sorted(e.text for e in labels) == sorted(LOSS_COLOURS)
        for label in labels:  # inside the plot's block, so not clipped by it
            r = label.rect
            assert box["y"] <= r["y"] and r["y"] + r["height"] <= box["y"] + box["height"], (r, box)
        shot = _shot(plot)
        legend_band = shot[int(labels[0].rect["y"] - box["y"]) - 4:int(labels[0].rect["y"] - box["y"]) + 16]
        red = tuple(int(LOSS_COLOURS["defect"][i:i + 2], 16) for i in (1, 3, 5))
        assert (np.abs(legend_band - np.array(red)).sum(axis=2) < 60).sum() >= 5  # the defect curve's symbol
        next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text.strip() == "Dataset").click()
        wait.until(lambda b: "none chosen" in browser.find_element(By.ID, "item-index").text)
        assert "-1" not in browser.find_element(By.ID, "item-index").text
    finally:
        browser.quit()


def test_the_api_generates_from_a_plain_image_and_black_and_white_mask(served, demo_root, tmp_path):
    """A fresh client (no image chosen in its session) sends the picture and a black-and-white mask file."""
    from gradio_client import handle_file

    url, _, _ = served
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:30, 35:47] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    client = gradio_client.Client(url, verbose=False)
    editor = {"background": handle_file(str(demo_root / "disc" / "train" / "good" / "000.png")),
              "layers": [handle_file(str(tmp_path / "mask.png"))], "composite": None}
    gallery, chosen, scores_md, _ = client.predict(RUN, editor, 1, 1, 7.5, 0, False, None, api_name="/generate")
    assert len(gallery) == 1 and f"({int((mask > 0).sum())} px" in scores_md and "`drawn`" in scores_md
    with pytest.raises(gradio_client.exceptions.AppError, match="choose or upload a defect-free image first"):
        client.predict(RUN, None, 1, 1, 7.5, 0, False, None, api_name="/generate")
