"""`dist2 bench --coco-eval`: the COCOeval backends on a COCO-val-sized problem, seconds and peak memory.

The problem is generated (no COCO download): 5,000 images of COCO's sizes in both orientations, ~7 ground-truth
boxes each over COCO's 80 gapped category ids with crowd regions and some empty images, and 100 detections per
image (noisy copies of the boxes, some with the wrong label, plus clutter). Each backend runs in a fresh process
so that its peak resident set is its own; both read the same files and must print the same numbers.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import resource
import tempfile
import time
from pathlib import Path
from queue import Empty

from tabulate import tabulate

from dist2.methods import COCO_METRICS, EVAL_BACKENDS

# COCO 2017's 80 category ids: 1..90 with ten gaps.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_problem(folder: Path, images: int = 5000, boxes_per_image: int = 7, detections: int = 100,
                  seed: int = 0) -> tuple[Path, Path, int]:
    """instances.json and results.json of a COCO-val-sized evaluation problem under `folder`, and its box count."""
    rng = random.Random(seed)
    cats = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in COCO_IDS]
    imgs, anns, results = [], [], []
    for image_id in range(1, images + 1):
        width, height = (640, 480) if rng.random() < 0.7 else (480, 640)
        imgs.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        boxes = []
        for _ in range(0 if rng.random() < 0.01 else rng.randint(1, 2 * boxes_per_image - 1)):
            side = rng.choice([rng.uniform(8, 32), rng.uniform(32, 96), rng.uniform(96, 400)])  # s, m, l
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, max(1, width - w)), rng.uniform(0, max(1, height - h))
            cat = rng.choice(COCO_IDS)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.01)})
            boxes.append((x, y, w, h, cat))
        for k in range(detections):
            if boxes and k < 4 * len(boxes):
                x, y, w, h, cat = boxes[k % len(boxes)]
                box = [x + rng.gauss(0, 0.1 * w), y + rng.gauss(0, 0.1 * h), w * rng.uniform(0.8, 1.25),
                       h * rng.uniform(0.8, 1.25)]
                label, score = cat if rng.random() < 0.8 else rng.choice(COCO_IDS), rng.uniform(0.3, 1.0)
            else:  # clutter, scored lower on the whole
                w, h = rng.uniform(8, 300), rng.uniform(8, 300)
                box, label = [rng.uniform(0, width - 8), rng.uniform(0, height - 8), w, h], rng.choice(COCO_IDS)
                score = rng.uniform(0.0, 0.6)
            results.append({"image_id": image_id, "category_id": label, "bbox": [round(v, 2) for v in box],
                            "score": round(score, 4)})
    folder.mkdir(parents=True, exist_ok=True)
    gt, dt = folder / "instances.json", folder / "results.json"
    gt.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    dt.write_text(json.dumps(results))
    return gt, dt, len(anns)


def _evaluate_in_child(gt: Path, dt: Path, backend: str, queue) -> None:
    from dist2.data.coco import load_coco
    from dist2.evaluation import coco_metrics

    coco_gt, results = load_coco(gt), json.loads(dt.read_text())
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports, ground truth, results
    start = time.perf_counter()
    metrics = coco_metrics(coco_gt, results, backend, per_class=True)
    seconds = time.perf_counter() - start
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - loaded, metrics))


def _in_child(ctx, target, args) -> tuple:
    """`target(*args, queue)` in a fresh process; its result, or an error if it died without one."""
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, queue))
    child.start()
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if not child.is_alive():
                raise RuntimeError(f"the benchmark process died (exit code {child.exitcode}); see its output "
                                   "above") from None


def _largest_difference(measured: dict, reference: dict) -> float:
    """The largest |difference| from the reference over every metric; inf where one is undefined and not both."""
    worst = 0.0
    for m in measured.values():
        for key, value in reference.items():
            other = m.get(key, math.nan)
            if math.isnan(value) != math.isnan(other):
                return math.inf
            if not math.isnan(value):
                worst = max(worst, abs(other - value))
    return worst


def bench_coco_eval(images: int = 5000) -> dict[str, dict]:
    """Seconds (results loaded, evaluated, accumulated, summarised, per-class AP) and peak MB per backend."""
    ctx = multiprocessing.get_context("spawn")
    rows, measured = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        gt, dt, boxes = write_problem(Path(tmp), images)
        for backend in reversed(EVAL_BACKENDS):  # the reference first
            seconds, peak, metrics = _in_child(ctx, _evaluate_in_child, (gt, dt, backend))
            measured[backend] = {"seconds": seconds, "peak MB": peak, "metrics": metrics}
            rows.append({"backend": backend, "s": seconds, "MB above the loaded data": peak,
                         **{k: metrics[k] for k in COCO_METRICS[:3]}})
    reference = measured["pycocotools"]
    for row in rows:
        row["speed-up"] = reference["seconds"] / row["s"]
    largest = _largest_difference({b: m["metrics"] for b, m in measured.items()}, reference["metrics"])
    print(f"COCO box evaluation: {images} images, {boxes} ground-truth boxes over {len(COCO_IDS)} categories, "
          f"{images * 100} detections; each backend in its own process (peak memory: the evaluation's growth over "
          "the process after loading both files)")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    print(f"largest difference from pycocotools over the {len(reference['metrics'])} metrics (AP, AR, per "
          f"category): {largest:.4f} points")
    return measured
