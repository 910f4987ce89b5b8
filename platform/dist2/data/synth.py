"""The embedded default dataset: a deterministic synthetic detection set in real COCO format.

Six categories told apart by shape only (colour and texture are random), some of them close (circle / ring,
square / triangle, cross / star); object sizes log-uniform over the FPN levels; objects cut by the image edge;
a few images with no objects, and "crowd" regions of many tiny objects marked iscrowd=1. Category ids have gaps,
as COCO's do, so the label mapping is exercised. Every difficulty keeps all of that.

`data.synth.difficulty` sets the rest (DIFFICULTIES below):
- `easy`: 1-4 objects that never overlap, no distractors, plain backgrounds. A quick teacher passes 50 mAP in
  CPU minutes, so distillation has something to transfer (the quick benchmark's setting).
- `standard`: 2-7 objects with a little overlap, a few distractors, mildly textured backgrounds.
- `hard`: 3-12 overlapping, partly occluded objects, un-annotated look-alike distractors (bars, blobs, arcs,
  lines) under and over them, cluttered textured backgrounds: not saturated by a small model (the set of
  generator version 2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dist2.config import SynthConfig

# Part of the cache key of generated datasets: bump it whenever a change alters what generate() writes.
VERSION = 3

CATEGORIES = {1: "circle", 3: "square", 4: "triangle", 7: "ring", 9: "cross", 11: "star"}


@dataclass(frozen=True)
class Difficulty:
    objects: tuple[int, int]  # objects per image (inclusive range; 5% of images have none)
    smallest: float  # the smallest object radius in pixels (radii log-uniform up to 0.45 of the shorter side)
    max_overlap: float  # the IoU two objects' boxes may reach when placed (0: apart, nothing occluded)
    distractors: tuple[int, int]  # un-annotated look-alikes drawn under the objects
    occluders: tuple[int, int]  # ... and over them (partial occlusion)
    texture: float  # background gradient, stripes and noise: 0 plain, 1 cluttered
    # Each category drawn in its own hue (jittered) on a grey background, so colour is a cue besides shape;
    # otherwise every object takes a random colour and shape is the only cue.
    category_colours: bool = False


# The hue of each category under `category_colours` (RGB, jittered by ±JITTER per channel).
PALETTE = {"circle": (220, 40, 40), "square": (40, 170, 40), "triangle": (40, 70, 220), "ring": (230, 200, 30),
           "cross": (200, 40, 200), "star": (30, 200, 210)}
JITTER = 25
REACH = 1.06  # every shape lies within REACH * r of its centre (placement keeps those squares apart)


DIFFICULTIES = {
    "easy": Difficulty(objects=(1, 4), smallest=8, max_overlap=0.0, distractors=(0, 0), occluders=(0, 0), texture=0.0,
                       category_colours=True),
    "standard": Difficulty(objects=(2, 7), smallest=8, max_overlap=0.15, distractors=(0, 2), occluders=(0, 0),
                           texture=0.5),
    "hard": Difficulty(objects=(3, 12), smallest=8, max_overlap=0.4, distractors=(1, 4), occluders=(0, 1), texture=1.0),
}


def _regular_polygon(n: int, r: float, rot: float) -> np.ndarray:
    a = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _star(r: float, rot: float) -> np.ndarray:
    a = rot + np.arange(10) * math.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _cross(r: float, rot: float) -> np.ndarray:
    w = 0.33 * r
    pts = np.array([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                    (-r, -w), (-w, -w)])
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def _ellipse(rx: float, ry: float, rot: float, n: int = 48) -> np.ndarray:
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(a), ry * np.sin(a)], axis=1)
    c, s = math.cos(rot), math.sin(rot)
    return pts @ np.array([[c, s], [-s, c]])


def _shape_outline(name: str, r: float, rng: np.random.Generator) -> np.ndarray:
    rot = rng.uniform(0, 2 * math.pi)
    if name in ("circle", "ring"):
        return _ellipse(r, r, 0.0)
    if name == "ellipse":
        return _ellipse(r, r * rng.uniform(0.45, 0.65), rot)
    if name == "square":
        return _regular_polygon(4, r, rot)
    if name == "triangle":
        return _regular_polygon(3, r, rot)
    if name == "hexagon":
        return _regular_polygon(6, r, rot)
    if name == "star":
        return _star(r, rot)
    if name == "cross":
        return _cross(r, rot)
    raise KeyError(name)


def _random_color(rng: np.random.Generator, avoid: np.ndarray | None = None) -> tuple[int, int, int]:
    while True:
        c = rng.integers(0, 256, 3)
        if avoid is None or np.abs(c.astype(int) - avoid.astype(int)).sum() > 120:
            return tuple(int(v) for v in c)


def _background(w: int, h: int, rng: np.random.Generator, level: Difficulty) -> tuple[Image.Image, np.ndarray]:
    texture = level.texture
    grey_or_colour = np.full(3, rng.integers(70, 180)) if level.category_colours else rng.integers(40, 216, 3)
    base = grey_or_colour.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (xx / w) * rng.uniform(-60, 60) + (yy / h) * rng.uniform(-60, 60)
    stripes = 10 * np.sin(2 * math.pi * (xx * rng.uniform(-0.08, 0.08) + yy * rng.uniform(-0.08, 0.08)))
    noise = rng.normal(0, rng.uniform(4, 12) * max(texture, 0.25), (h, w, 3))  # a plain one keeps a little
    img = base + texture * (grad + stripes)[..., None] + noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), base


def _draw_distractor(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator, avoid) -> None:
    kind = rng.integers(0, 4)
    color = _random_color(rng, avoid)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    size = math.exp(rng.uniform(math.log(8), math.log(0.5 * min(w, h))))
    if kind == 0:  # a thin bar
        pts = _ellipse(size, size * 0.12, rng.uniform(0, math.pi), n=4)
        draw.polygon([tuple(p) for p in pts + (cx, cy)], fill=color)
    elif kind == 1:  # an irregular blob, jagged enough not to pass for one of the polygons
        n = int(rng.integers(8, 14))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = size * rng.uniform(0.25, 1.0, n)
        pts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], axis=1)
        draw.polygon([tuple(p) for p in pts], fill=color)
    elif kind == 2:  # an open arc
        start = rng.uniform(0, 360)
        draw.arc([cx - size, cy - size, cx + size, cy + size], start, start + rng.uniform(90, 220), fill=color,
                 width=max(1, int(size * 0.15)))
    else:  # a line
        draw.line([cx, cy, cx + rng.uniform(-2, 2) * size, cy + rng.uniform(-2, 2) * size], fill=color,
                  width=int(rng.integers(1, 4)))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_object(draw, name: str, cx: float, cy: float, r: float, rng, avoid, level: Difficulty) -> list[float]:
    pts = _shape_outline(name, r, rng) + (cx, cy)
    if level.category_colours:
        color = tuple(int(v) for v in np.clip(np.array(PALETTE[name]) + rng.integers(-JITTER, JITTER + 1, 3), 0, 255))
    else:
        color = _random_color(rng, avoid)
    draw.polygon([tuple(p) for p in pts], fill=color)
    if name == "ring":  # a hole of the background's colour, or a disc of another colour
        inner = _ellipse(r * rng.uniform(0.45, 0.65), r * rng.uniform(0.45, 0.65), 0.0) + (cx, cy)
        hole = tuple(int(v) for v in avoid) if level.category_colours else _random_color(rng, np.array(color))
        draw.polygon([tuple(p) for p in inner], fill=hole)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return [float(x0), float(y0), float(x1), float(y1)]


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _make_image(rng: np.random.Generator, size: int, level: Difficulty):
    w = size
    h = int(size * rng.choice([0.75, 1.0, 1.0, 1.25]))
    img, bg_color = _background(w, h, rng, level)
    draw = ImageDraw.Draw(img)
    for _ in range(_count(rng, level.distractors)):
        _draw_distractor(draw, w, h, rng, bg_color)
    objects: list[tuple[int, list[float], int]] = []  # (category id, xyxy, iscrowd)
    n_objects = 0 if rng.random() < 0.05 else _count(rng, level.objects)
    names = list(CATEGORIES.items())
    placed: list[tuple[int, str, float, float, float]] = []
    for _ in range(n_objects):
        cat_id, name = names[int(rng.integers(len(names)))]
        for _attempt in range(10):
            r = math.exp(rng.uniform(math.log(level.smallest), math.log(0.45 * min(w, h))))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)  # the centre may sit near an edge: cut objects
            e = REACH * r  # a cross's corners reach 1.054 r from its centre
            if all(_iou((cx - e, cy - e, cx + e, cy + e), (x - REACH * q, y - REACH * q, x + REACH * q, y + REACH * q))
                   <= level.max_overlap for _, _, x, y, q in placed):
                placed.append((cat_id, name, cx, cy, r))
                break
    # Largest first, so that overlaps occlude objects partly but never hide a small one completely.
    for cat_id, name, cx, cy, r in sorted(placed, key=lambda p: -p[4]):
        objects.append((cat_id, _draw_object(draw, name, cx, cy, r, rng, bg_color, level), 0))
    if rng.random() < 0.08:  # a crowd: many tiny objects of one category in one region, annotated once
        cat_id, name = names[int(rng.integers(len(names)))]
        x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
        x1, y1 = x0 + w * 0.3, y0 + h * 0.3
        for _ in range(12):
            _draw_object(draw, name, rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(2, 4), rng, bg_color,
                         level)
        objects.append((cat_id, [x0, y0, x1, y1], 1))
    for _ in range(_count(rng, level.occluders)):  # distractors drawn over objects: partial occlusion
        _draw_distractor(draw, w, h, rng, bg_color)
    return img, objects


def _write_split(out: Path, split: str, count: int, size: int, seed: int, level: Difficulty) -> None:
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, annotations = [], []
    for image_id in range(1, count + 1):
        img, objects = _make_image(rng, size, level)
        file_name = f"{image_id:06d}.jpg"
        img.save(image_dir / file_name, quality=92)
        w, h = img.size
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for cat_id, (x0, y0, x1, y1), crowd in objects:
            # COCO stores boxes clipped to the image, as xywh.
            x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            bw, bh = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id,
                                "bbox": [round(v, 2) for v in (x0, y0, bw, bh)], "area": round(bw * bh, 2),
                                "iscrowd": crowd})
    coco = {
        "info": {"description": f"dist2 synthetic detection set ({split}, seed {seed}, generator v{VERSION})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORIES.items()],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def generate(out: Path, cfg: SynthConfig | None = None) -> Path:
    """Write the dataset to `out` (train/, val/, annotations/instances_{train,val}.json)."""
    out, cfg = Path(out), cfg or SynthConfig()
    level = DIFFICULTIES[cfg.difficulty]
    _write_split(out, "train", cfg.num_train, cfg.image_size, cfg.seed, level)
    _write_split(out, "val", cfg.num_val, cfg.image_size, cfg.seed, level)
    return out
