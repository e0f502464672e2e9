"""A procedurally drawn industrial world for pretraining the `defectfill-mini` base.

`draw_world(rng, size)` draws one captioned image: a part or a surface
(discs/washers, hex nuts, screws, circuit boards, tiles, woven fabric, wood
grain, brushed metal, cables) in one of a dozen named colours, at a random size
and position, under a lighting gradient with sensor noise, and about half the
time with one generic surface anomaly (a line, a stain, a hole, a fissure, a
chip, a fleck of colour, a missing piece, a smudge), and the anomaly's pixels. The
caption names what was drawn in plain words, in several phrasings ("a blue tile",
"a silver nut with a dark stain", "a photo of a hole"); a fraction
`EMPTY_CAPTION_RATE` of captions are empty, for classifier-free guidance.
`sample_inpaint_mask(rng, size)` draws an inpainting mask (a box, a blob, a brush
stroke or a thin line); `sample_batch` draws both for a batch, and for most images
with an anomaly the mask covers the anomaly (`cover_mask`): then only the caption
says what belongs in the hole, which is how the base learns that the words decide
what is painted there. `sample_autoencoder_batch` adds fine marks for the VAE stage.

Every draw comes from the numpy Generator passed in, so a seed gives the same
images, captions and masks on every machine.

Rule (kept by tests/test_world.py): the world is independent of the demo
dataset. It does not import `defectfill.demo_data`, does not reuse its drawing,
and its captions never use the demo's defect type names ("scratch", "spot",
"crack"): a fine-tuning run on the demo must not find its defects already learnt
by the base. Anomalies here have their own names and drawing.

Beyond the names, the drawing differs too: the world's lines are dark or coloured (the demo's scratches
are bright), its fissures are branching grooves with a light lip and never on woven fabric (the demo's cracks
are flat dark polylines on its weave), its holes have a rim and its stains are soft and blurred (the demo's
spots are flat dark ellipses), and its discs come in named colours at any position and size.

Textures keep their features at least ~3 px wide at 64 px (a factor-4 VAE
loses finer detail, as the tiny weave showed), and everything is drawn at twice
the size and downsampled, so edges are antialiased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

EMPTY_CAPTION_RATE = 0.1
ANOMALY_RATE = 0.6
COVER_RATE = 0.7  # of the images with an anomaly, the share whose inpainting mask covers it
DETAIL_RATE = 0.5  # of the VAE stage's images, the share with fine marks drawn over them

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (178, 40, 36), "blue": (40, 74, 170), "green": (46, 130, 60), "yellow": (214, 186, 52),
    "orange": (222, 120, 36), "grey": (128, 128, 128), "black": (32, 32, 34), "white": (228, 228, 222),
    "brown": (120, 78, 44), "silver": (186, 190, 196), "gold": (196, 160, 70), "copper": (184, 108, 66),
    "purple": (110, 60, 140),
}
# kind -> (caption noun, colours it comes in, object on a background or a surface filling the frame)
KINDS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "disc": ("round disc", ("silver", "grey", "black", "white", "red", "blue", "gold", "copper"), True),
    "washer": ("washer", ("silver", "grey", "gold", "copper", "black"), True),
    "nut": ("metal nut", ("silver", "grey", "gold", "black", "copper"), True),
    "screw": ("screw", ("silver", "grey", "gold", "black", "copper"), True),
    "cable": ("cable", ("red", "blue", "green", "yellow", "black", "white", "orange", "purple"), True),
    "board": ("circuit board", ("green", "blue", "black", "red", "purple"), False),
    "tile": ("tile", ("white", "grey", "blue", "red", "green", "yellow", "brown", "orange"), False),
    "fabric": ("woven fabric", ("red", "blue", "green", "grey", "brown", "yellow", "purple", "white"), False),
    "wood": ("wooden board", ("brown", "orange", "yellow", "grey"), False),
    "metal": ("brushed metal plate", ("silver", "grey", "gold", "copper"), False),
}
# anomaly -> caption words (never "scratch", "spot" or "crack": see the module docstring)
ANOMALIES: dict[str, str] = {
    "line": "a thin line", "stain": "a dark stain", "hole": "a hole", "fissure": "a fissure",
    "chip": "a chipped edge", "fleck": "a fleck of {colour}", "missing": "a missing piece", "smudge": "a smudge",
}
FORBIDDEN_WORDS = ("scratch", "spot", "crack")
BACKGROUNDS = ("black", "grey", "white", "brown", "blue")


def caption_words() -> list[str]:
    """Every word a caption of the world can hold."""
    text = " ".join([*COLOURS, *(noun for noun, _, _ in KINDS.values()), *ANOMALIES.values(), "a photo of with"])
    return sorted(set(text.replace("{colour}", "").split()))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _shade(rgb, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


# --------------------------------------------------------------------------- surfaces (fill the frame)


def _surface(kind: str, rgb, s: int, rng: np.random.Generator) -> Image.Image:
    """A frame-filling surface at side s (the doubled canvas)."""
    base = np.array(rgb, dtype=np.float32)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    if kind == "fabric":  # over-under weave, threads >= 3 px at the final size
        period = rng.uniform(10, 18)  # doubled canvas: 5-9 px at 64
        angle = rng.uniform(-0.3, 0.3)
        u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
        cu, cv = (u / period) % 1.0, (v / period) % 1.0
        over = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
        thread = np.where(over, np.sin(np.pi * cv), np.sin(np.pi * cu))
        img = base * (0.65 + 0.45 * thread[..., None])
    elif kind == "wood":  # rings bent by a low-frequency wobble
        freq = rng.uniform(0.05, 0.1)
        wobble = 6 * np.sin(y / rng.uniform(20, 40) + rng.uniform(0, 6)) + 3 * np.sin(y / 9 + rng.uniform(0, 6))
        rings = 0.5 + 0.5 * np.sin((x + wobble) * freq * 2 * np.pi / 4 + rng.uniform(0, 6))
        img = base * (0.7 + 0.35 * rings[..., None])
    elif kind == "metal":  # brushed streaks along one direction
        streaks = rng.normal(0, 1, s).astype(np.float32)
        streaks = np.convolve(streaks, np.ones(5) / 5, mode="same")
        along = streaks[None, :] if rng.random() < 0.5 else streaks[:, None]
        img = base * (0.92 + 0.12 * along[..., None]) + np.zeros((s, s, 1), np.float32)
    elif kind == "tile":  # tiles with grout lines
        n = int(rng.integers(1, 4))
        step = s / n
        grout = _shade(rgb, 0.45) if sum(rgb) > 300 else (200, 200, 196)
        img = np.broadcast_to(base, (s, s, 3)).copy()
        gw = max(6, int(step * 0.06))
        off = rng.uniform(0, step)
        on = (((x + off) % step) < gw) | (((y + off) % step) < gw)
        img[on] = grout
    else:  # board: a coloured substrate with copper traces and pads
        img = np.broadcast_to(base * 0.8, (s, s, 3)).copy()
        pil = Image.fromarray(img.astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        trace = _jitter(COLOURS["gold"] if rng.random() < 0.5 else COLOURS["silver"], rng)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = rng.uniform(0, s, 2)
            pts = [(x0, y0)]
            for _ in range(int(rng.integers(2, 4))):
                if rng.random() < 0.5:
                    x0 = float(rng.uniform(0, s))
                else:
                    y0 = float(rng.uniform(0, s))
                pts.append((x0, y0))
            draw.line(pts, fill=trace, width=int(rng.integers(6, 10)))
        for _ in range(int(rng.integers(2, 7))):
            cx, cy = rng.uniform(8, s - 8, 2)
            r = rng.uniform(5, 10)
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=trace)
        if rng.random() < 0.6:  # a black chip
            cx, cy = rng.uniform(s * 0.2, s * 0.8, 2)
            w, h = rng.uniform(s * 0.1, s * 0.25, 2)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=(24, 24, 28))
        return pil
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- parts (on a background)


def _background(s: int, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int]]:
    rgb = _jitter(_shade(COLOURS[BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]], rng.uniform(0.5, 1.0)), rng)
    return Image.new("RGB", (s, s), rgb), rgb


def _part(kind: str, rgb, s: int, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int], tuple]:
    """A part drawn on a plain background; returns (image, background colour, (cx, cy, r) of the part)."""
    image, bg = _background(s, rng)
    draw = ImageDraw.Draw(image)
    r = s * rng.uniform(0.2, 0.42)
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    dark, light = _shade(rgb, 0.6), _shade(rgb, 1.25)
    if kind in ("disc", "washer"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb, outline=dark, width=max(2, int(r * 0.08)))
        if kind == "washer":
            ri = r * rng.uniform(0.3, 0.5)
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
        elif rng.random() < 0.5:  # a raised centre
            ri = r * rng.uniform(0.2, 0.5)
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=light)
    elif kind == "nut":
        turn = rng.uniform(0, np.pi / 3)
        hexagon = [(cx + r * np.cos(turn + k * np.pi / 3), cy + r * np.sin(turn + k * np.pi / 3)) for k in range(6)]
        draw.polygon(hexagon, fill=rgb, outline=dark)
        ri = r * rng.uniform(0.35, 0.5)
        draw.ellipse([cx - ri * 1.2, cy - ri * 1.2, cx + ri * 1.2, cy + ri * 1.2], fill=dark)
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif kind == "screw":
        angle = rng.uniform(0, np.pi)
        ux, uy = np.cos(angle), np.sin(angle)
        half, w = r, max(5.0, r * 0.22)
        a, b = (cx - ux * half, cy - uy * half), (cx + ux * half * 0.6, cy + uy * half * 0.6)
        draw.line([a, b], fill=rgb, width=int(w * 2))
        for t in np.arange(0.05, 1.0, rng.uniform(0.1, 0.16)):  # thread ridges
            px, py = a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t
            draw.line([(px - uy * w, py + ux * w), (px + uy * w, py - ux * w)], fill=dark, width=3)
        hr = w * 1.9
        hx, hy = cx + ux * half * 0.75, cy + uy * half * 0.75
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=light, outline=dark, width=2)
        draw.line([(hx - uy * hr * 0.7, hy + ux * hr * 0.7), (hx + uy * hr * 0.7, hy - ux * hr * 0.7)], fill=dark,
                  width=4)
    else:  # cable: a thick curve with a highlight
        pts = []
        x0, y0 = rng.uniform(0, s, 2)
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(12):
            pts.append((float(x0), float(y0)))
            heading += rng.uniform(-0.5, 0.5)
            x0, y0 = x0 + np.cos(heading) * s / 8, y0 + np.sin(heading) * s / 8
        width = int(rng.uniform(s * 0.06, s * 0.14))
        draw.line(pts, fill=dark, width=width + 4, joint="curve")
        draw.line(pts, fill=rgb, width=width, joint="curve")
        draw.line([(x + width * 0.15, y - width * 0.15) for x, y in pts], fill=light, width=max(3, width // 5),
                  joint="curve")
        cx, cy = pts[len(pts) // 2]
        r = width
    return image, bg, (cx, cy, r)


# --------------------------------------------------------------------------- anomalies


def _anomaly(image: Image.Image, name: str, where: tuple, bg,
             rng: np.random.Generator) -> tuple[Image.Image, str, np.ndarray]:
    """Draw one anomaly near `where` = (cx, cy, r); returns the image, the anomaly's caption words and the
    pixels it changed (bool, the canvas's size)."""
    s = image.size[0]
    cx, cy, r = where
    px = float(np.clip(cx + rng.uniform(-0.6, 0.6) * r, 4, s - 4))
    py = float(np.clip(cy + rng.uniform(-0.6, 0.6) * r, 4, s - 4))
    layer = image.copy()
    draw = ImageDraw.Draw(layer)
    words = ANOMALIES[name]
    if name == "line":  # a straight thin mark, lighter or darker than the part
        angle, length = rng.uniform(0, np.pi), s * rng.uniform(0.15, 0.45)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        # dark or coloured, never near-white: the demo's scratches are bright lines on a disc
        tone = (20, 20, 22) if rng.random() < 0.5 else _jitter(COLOURS[str(rng.choice(["red", "blue", "green"]))], rng)
        draw.line([(px - dx, py - dy), (px + dx, py + dy)], fill=tone, width=int(rng.integers(4, 7)))
    elif name == "stain":  # a soft irregular dark patch, blended
        blob = Image.new("L", image.size, 0)
        bd = ImageDraw.Draw(blob)
        for _ in range(int(rng.integers(3, 6))):
            rr = s * rng.uniform(0.04, 0.1)
            ox, oy = px + rng.uniform(-rr, rr), py + rng.uniform(-rr, rr)
            bd.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=int(rng.integers(140, 230)))
        blob = blob.filter(ImageFilter.GaussianBlur(s * 0.02))
        tint = Image.new("RGB", image.size, (int(rng.integers(30, 70)), int(rng.integers(20, 50)), 10))
        layer = Image.composite(tint, layer, blob)
    elif name == "hole":  # a dark round hole with a light rim
        rr = s * rng.uniform(0.03, 0.07)
        draw.ellipse([px - rr * 1.3, py - rr * 1.3, px + rr * 1.3, py + rr * 1.3], fill=(200, 200, 196))
        draw.ellipse([px - rr, py - rr, px + rr, py + rr], fill=(8, 8, 10))
    elif name == "fissure":  # a branching split that narrows from its start
        def branch(x, y, heading, width, depth):
            for _ in range(int(rng.integers(3, 6))):
                heading += rng.uniform(-0.7, 0.7)
                nx, ny = x + np.cos(heading) * s * 0.05, y + np.sin(heading) * s * 0.05
                # a groove: a light lip beside a dark core (the demo's cracks are flat dark polylines)
                draw.line([(x + 2, y + 2), (nx + 2, ny + 2)], fill=(225, 222, 215), width=max(3, int(width)))
                draw.line([(x, y), (nx, ny)], fill=(14, 12, 12), width=max(3, int(width)))
                x, y, width = nx, ny, width * 0.85
                if depth < 1 and rng.random() < 0.3:
                    branch(x, y, heading + rng.choice([-1.0, 1.0]), width * 0.7, depth + 1)
        branch(px, py, rng.uniform(0, 2 * np.pi), rng.uniform(5, 8), 0)
    elif name in ("chip", "missing"):  # the part's edge or a piece of it gone: background shows
        angle = rng.uniform(0, 2 * np.pi)
        ex, ey = cx + np.cos(angle) * r, cy + np.sin(angle) * r
        if name == "missing":
            ex, ey = px, py
        size = s * (rng.uniform(0.05, 0.09) if name == "chip" else rng.uniform(0.08, 0.15))
        corners = [(ex + np.cos(a) * size * rng.uniform(0.6, 1.2), ey + np.sin(a) * size * rng.uniform(0.6, 1.2))
                   for a in np.sort(rng.uniform(0, 2 * np.pi, 5))]
        draw.polygon(corners, fill=bg)
    elif name == "fleck":  # small bright blots of another colour
        colour_name = str(rng.choice(["red", "blue", "green", "yellow", "orange", "purple", "white"]))
        words = words.format(colour=colour_name)
        for _ in range(int(rng.integers(1, 4))):
            rr = s * rng.uniform(0.025, 0.05)
            ox, oy = px + rng.uniform(-3, 3) * rr, py + rng.uniform(-3, 3) * rr
            draw.regular_polygon((ox, oy, rr), int(rng.integers(3, 7)), rotation=float(rng.uniform(0, 360)),
                                 fill=_jitter(COLOURS[colour_name], rng))
    else:  # smudge: a blurred, lightened band
        band = Image.new("L", image.size, 0)
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * s * 0.15, np.sin(angle) * s * 0.15
        ImageDraw.Draw(band).line([(px - dx, py - dy), (px + dx, py + dy)], fill=180, width=int(s * 0.1))
        band = band.filter(ImageFilter.GaussianBlur(s * 0.03))
        layer = Image.composite(Image.new("RGB", image.size, (235, 235, 230)), layer, band)
    changed = np.abs(np.asarray(layer, np.int16) - np.asarray(image, np.int16)).max(axis=-1) > 12
    return layer, words, changed


# --------------------------------------------------------------------------- sampling


def _finish(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Downsample, light with a gradient, add sensor noise."""
    arr = np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1.0 + rng.uniform(0, 0.35) * (np.cos(angle) * x + np.sin(angle) * y) * 2
    arr = arr * gain[..., None] * rng.uniform(0.85, 1.15) + rng.normal(0, rng.uniform(0.5, 5.0), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@dataclass
class WorldSample:
    """One drawn image with its caption and, when it has an anomaly, the pixels the anomaly covers."""

    image: Image.Image
    caption: str
    anomaly: np.ndarray | None  # (size, size) bool, or None for a normal image


def _caption(rng: np.random.Generator, colour: str, noun: str, anomaly_words: str | None) -> str:
    """The caption in one of several phrasings, so a prompt's words, not one fixed template, say what is
    drawn: "a {colour} {noun} with {anomaly}", "a {noun} with {anomaly}", "a photo of {anomaly}", "{anomaly}";
    for a normal image "a {colour} {noun}", "a {noun}", "a photo of a {colour} {noun}"."""
    u = rng.random()
    if anomaly_words is None:
        return f"a {colour} {noun}" if u < 0.5 else f"a {noun}" if u < 0.8 else f"a photo of a {colour} {noun}"
    if u < 0.4:
        return f"a {colour} {noun} with {anomaly_words}"
    if u < 0.7:
        return f"a {noun} with {anomaly_words}"
    return f"a photo of {anomaly_words}" if u < 0.9 else anomaly_words


def draw_world(rng: np.random.Generator, size: int = 64, empty_caption_rate: float = EMPTY_CAPTION_RATE,
               anomaly_rate: float = ANOMALY_RATE) -> WorldSample:
    """One image of the world (PIL RGB, size x size), its caption ("" with probability empty_caption_rate)
    and the anomaly's pixels (max-pooled from the doubled canvas, so a thin mark keeps every pixel it touches)."""
    kinds = list(KINDS)
    kind = kinds[int(rng.integers(len(kinds)))]
    noun, colours, is_part = KINDS[kind]
    colour = colours[int(rng.integers(len(colours)))]
    rgb = _jitter(COLOURS[colour], rng)
    s = size * 2
    if is_part:
        image, bg, where = _part(kind, rgb, s, rng)
    else:
        image = _surface(kind, rgb, s, rng)
        bg, where = (10, 10, 12), (s / 2, s / 2, s / 2)
    words, anomaly = None, None
    if rng.random() < anomaly_rate:
        names = list(ANOMALIES)
        if not is_part:  # a surface has no edge to chip
            names.remove("chip")
        if kind == "fabric":  # the demo's defect on its weave is a dark crack: no fissures on fabric
            names.remove("fissure")
        image, words, changed = _anomaly(image, names[int(rng.integers(len(names)))], where, bg, rng)
        anomaly = changed.reshape(size, 2, size, 2).any(axis=(1, 3))
    caption = _caption(rng, colour, noun, words)
    image = _finish(image, size, rng)
    if rng.random() < empty_caption_rate:
        caption = ""
    return WorldSample(image, caption, anomaly if anomaly is not None and anomaly.any() else None)


def sample_world(rng: np.random.Generator, size: int = 64, empty_caption_rate: float = EMPTY_CAPTION_RATE,
                 anomaly_rate: float = ANOMALY_RATE) -> tuple[Image.Image, str]:
    """One image of the world (PIL RGB, size x size) and its caption ("" with probability empty_caption_rate)."""
    sample = draw_world(rng, size, empty_caption_rate, anomaly_rate)
    return sample.image, sample.caption


MASK_KINDS = ("box", "blob", "stroke", "line", "large")


def sample_inpaint_mask(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """An inpainting mask (size x size, bool, never empty): a box, a blob, a brush stroke, a thin line or a
    large box covering a third to most of the frame."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    kind = MASK_KINDS[int(rng.integers(len(MASK_KINDS)))]
    cx, cy = rng.uniform(0.15, 0.85, 2) * size
    if kind in ("box", "large"):
        w, h = rng.uniform(0.08, 0.3, 2) * size if kind == "box" else rng.uniform(0.3, 0.45, 2) * size
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=255)
    elif kind == "blob":
        for _ in range(int(rng.integers(2, 6))):
            rr = size * rng.uniform(0.05, 0.15)
            ox, oy = cx + rng.uniform(-1.5, 1.5) * rr, cy + rng.uniform(-1.5, 1.5) * rr
            draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=255)
    else:
        pts, heading = [(cx, cy)], rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(1, 5 if kind == "stroke" else 2))):
            heading += rng.uniform(-1.0, 1.0)
            step = size * rng.uniform(0.1, 0.3)
            pts.append((pts[-1][0] + np.cos(heading) * step, pts[-1][1] + np.sin(heading) * step))
        width = int(size * rng.uniform(0.06, 0.14)) if kind == "stroke" else int(rng.integers(2, 4))
        draw.line(pts, fill=255, width=max(2, width), joint="curve")
    out = np.asarray(mask) >= 128
    if not out.any():  # a stroke that left the frame: fall back to a small box at its start
        x0, y0 = int(np.clip(cx, 2, size - 6)), int(np.clip(cy, 2, size - 6))
        out = out.copy()
        out[y0:y0 + 4, x0:x0 + 4] = True
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(image) >= 128


def cover_mask(rng: np.random.Generator, anomaly: np.ndarray) -> np.ndarray:
    """An inpainting mask over an anomaly: its pixels grown by 0-3 px, or their bounding box with a margin
    (30 %), in a fifth of the draws joined with a random mask elsewhere."""
    size = anomaly.shape[0]
    grown = _dilate(anomaly, int(rng.integers(0, 4)))
    if rng.random() < 0.3:
        ys, xs = np.nonzero(grown)
        margin = int(rng.integers(1, 4))
        box = np.zeros_like(grown)
        box[max(0, ys.min() - margin):ys.max() + margin + 1, max(0, xs.min() - margin):xs.max() + margin + 1] = True
        grown = box
    if rng.random() < 0.2:
        grown = grown | sample_inpaint_mask(rng, size)
    return grown


def sample_batch(rng: np.random.Generator, n: int, size: int = 64, empty_caption_rate: float = EMPTY_CAPTION_RATE,
                 cover_rate: float = COVER_RATE) -> tuple[np.ndarray, list[str], np.ndarray]:
    """n samples: images (n, size, size, 3) uint8, captions, inpainting masks (n, size, size) bool.

    With probability `cover_rate` an image's anomaly is the hole (`cover_mask`), so the caption, which names
    the anomaly, is what tells the UNet what to paint there: the prior DefectFill's token relies on."""
    images, captions, masks = [], [], []
    for _ in range(n):
        sample, mask = sample_training_pair(rng, size, empty_caption_rate, cover_rate)
        images.append(np.asarray(sample.image))
        captions.append(sample.caption)
        masks.append(mask)
    return np.stack(images), captions, np.stack(masks)


def sample_training_pair(rng: np.random.Generator, size: int = 64, empty_caption_rate: float = EMPTY_CAPTION_RATE,
                         cover_rate: float = COVER_RATE) -> tuple[WorldSample, np.ndarray]:
    """One world sample and its inpainting mask: over its anomaly with probability `cover_rate`, else random."""
    sample = draw_world(rng, size, empty_caption_rate)
    if sample.anomaly is not None and rng.random() < cover_rate:
        return sample, cover_mask(rng, sample.anomaly)
    return sample, sample_inpaint_mask(rng, size)


def _fine_detail(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Marks finer than the world draws, for the autoencoder only (no caption, the UNet never sees them): 1-4
    lines or polylines 0.5-2 px wide, dots and faint curves, in any tone, light or dark, strong or within a few
    levels of the surface, sometimes blurred. A VAE that reconstructs these keeps a thin or low-contrast
    defect a fine-tune later teaches."""
    size = image.size[0]
    up = 4  # drawn at 4x and box-filtered: coverage gives antialiased sub-pixel widths
    arr = np.asarray(image, dtype=np.float32)
    for _ in range(int(rng.integers(1, 5))):
        cover = Image.new("L", (size * up, size * up), 0)
        draw = ImageDraw.Draw(cover)
        kind = rng.random()
        x0, y0 = rng.uniform(0.1, 0.9, 2) * size * up
        if kind < 0.75:  # a straight line or a polyline
            pts, heading = [(x0, y0)], rng.uniform(0, 2 * np.pi)
            for _ in range(int(rng.integers(1, 6))):
                heading += rng.uniform(-0.8, 0.8) if rng.random() < 0.5 else 0.0
                step = size * up * rng.uniform(0.05, 0.3)
                pts.append((pts[-1][0] + np.cos(heading) * step, pts[-1][1] + np.sin(heading) * step))
            draw.line(pts, fill=255, width=int(rng.integers(2, 9)), joint="curve")
        else:  # a few dots
            for _ in range(int(rng.integers(1, 6))):
                r = rng.uniform(1.5, 6)
                x, y = x0 + rng.uniform(-20, 20), y0 + rng.uniform(-20, 20)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        if rng.random() < 0.4:
            cover = cover.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 4.0)))
        alpha = np.asarray(cover.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0
        if rng.random() < 0.35:  # faint: a few levels from the local surface
            local = arr[alpha[..., 0] > 0.1].mean(axis=0) if (alpha > 0.1).any() else arr.mean(axis=(0, 1))
            tone = local + rng.choice([-1.0, 1.0]) * rng.uniform(8, 40)
        elif rng.random() < 0.7:  # a grey from near black to near white
            tone = np.full(3, rng.uniform(0, 255))
        else:
            tone = rng.uniform(0, 255, 3)
        arr = arr * (1 - alpha) + np.clip(tone, 0, 255) * alpha
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def sample_autoencoder_batch(rng: np.random.Generator, n: int, size: int = 64,
                             detail_rate: float = DETAIL_RATE) -> np.ndarray:
    """n images (n, size, size, 3) uint8 for the VAE stage: world images, with `_fine_detail` on a share."""
    images = []
    for _ in range(n):
        image = draw_world(rng, size).image
        if rng.random() < detail_rate:
            image = _fine_detail(image, rng)
        images.append(np.asarray(image))
    return np.stack(images)
