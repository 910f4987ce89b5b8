"""`dist2 bench --data CONFIG`: does the loader keep the model fed, and what does aspect-ratio grouping save?

The loader is the run's own (`data/loader.py`: decode, augment to the config's training size, batch) over COCO-size
JPEGs generated for the benchmark (640x480 and 480x640 and the other common COCO shapes, in COCO val2017's
proportions), timed at 0, 1 and 2 loader processes; beside it, the config's training step (`dist2 bench`) at the
same batch. Padding: the share of a padded batch tensor that is padding, with and without grouping, over one epoch
of the generated sizes resized as the detector resizes them.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tabulate import tabulate

from dist2.bench import bench_batch, measure
from dist2.config import load_config
from dist2.data.coco import CocoDetection
from dist2.data.loader import TrainLoader
from dist2.data.transforms import train_transforms

# (width, height): weight, roughly COCO val2017's most common image shapes.
COCO_SHAPES = {(640, 480): 0.48, (480, 640): 0.16, (640, 427): 0.18, (427, 640): 0.07, (640, 360): 0.06,
               (500, 375): 0.05}
SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform pads a batch to a multiple of this


def write_coco_jpegs(folder: Path, images: int, seed: int = 0) -> Path:
    """A COCO-format folder of `images` JPEGs (smooth noise, a few boxes each) in COCO_SHAPES' proportions."""
    rng = random.Random(seed)
    shapes, weights = zip(*COCO_SHAPES.items(), strict=True)
    (folder / "train").mkdir(parents=True)
    (folder / "annotations").mkdir()
    imgs, anns = [], []
    for image_id in range(1, images + 1):
        width, height = rng.choices(shapes, weights)[0]
        small = np.random.default_rng(image_id).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / f"train/{image_id}.jpg",
                                                                            quality=90)
        imgs.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.randint(1, 7)):
            w, h = rng.uniform(16, width / 2), rng.uniform(16, height / 2)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": w * h,
                         "bbox": [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]})
    (folder / "annotations/instances.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return folder


def _resized(width: int, height: int, short: int, max_size: int) -> tuple[int, int]:
    scale = min(short / min(width, height), max_size / max(width, height))
    return round(width * scale), round(height * scale)


def padding_share(dataset: CocoDetection, cfg, batch_size: int, grouped: bool) -> float:
    """The padding share of one epoch's batches at the config's largest training size (the detector pads a
    batch to its largest image, rounded up to SIZE_DIVISIBLE)."""
    data = cfg.data.model_copy(update={"group_aspect_ratio": grouped, "num_workers": 0})
    batches = TrainLoader(dataset, data, batch_size, seed=0, world=1, rank=0, pin_memory=False).epoch(0)
    sizes = [_resized(dataset.coco.imgs[i]["width"], dataset.coco.imgs[i]["height"], max(cfg.data.train_sizes),
                      cfg.data.max_size) for i in dataset.ids]
    pixels = padded = 0
    for batch in batches.batch_sampler:
        shapes = [sizes[i] for i in batch]
        width = math.ceil(max(w for w, _ in shapes) / SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        height = math.ceil(max(h for _, h in shapes) / SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        pixels += sum(w * h for w, h in shapes)
        padded += len(shapes) * width * height
    return 1 - pixels / padded


def _loader_rate(dataset: CocoDetection, cfg, batch_size: int, workers: int, batches: int) -> float:
    data = cfg.data.model_copy(update={"num_workers": workers})
    loader = TrainLoader(dataset, data, batch_size, seed=0, world=1, rank=0, pin_memory=False)
    it = iter(loader.epoch(0))
    next(it)  # process start-up and the first decode are not the steady state
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in (next(it) for _ in range(batches)))
    return seen / (time.perf_counter() - start)


def bench_data(path: Path, batch_size: int | None = None, batches: int = 10) -> list[dict]:
    probe = load_config(path, ["data.root=null"])
    batch = bench_batch(path, probe, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_coco_jpegs(Path(tmp) / "coco", images=batch * (batches + 1) * 2)
        cfg = load_config(path, [f"data.root={root}", "data.train_annotations=annotations/instances.json",
                                 "data.train_images=train", "data.val_annotations=annotations/instances.json",
                                 "data.val_images=train"])
        dataset = CocoDetection(root / "annotations/instances.json", root / "train", train_transforms(cfg.data))
        rows = [{"what": f"loader, {w} process(es)", "img/s": _loader_rate(dataset, cfg, batch, w, batches)}
                for w in (0, 1, 2)]
        step = measure(path, steps=3, batch_size=batch)
        rows.append({"what": f"training step ({step['config']}, input {step['first input']})", "img/s": step["img/s"]})
        shares = {g: padding_share(dataset, cfg, batch, g) for g in (False, True)}
    print(f"{Path(path).name}: batch {batch}, training size {cfg.data.train_sizes} (max {cfg.data.max_size}), "
          f"generated COCO-size JPEGs")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    print(f"padding in a batch tensor over one epoch: {100 * shares[False]:.1f}% ungrouped, "
          f"{100 * shares[True]:.1f}% with data.group_aspect_ratio")
    return rows
