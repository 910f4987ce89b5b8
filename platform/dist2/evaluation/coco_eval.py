"""COCO box evaluation with COCOeval: faster-coco-eval's C++ port by default, pycocotools' own as the reference
(`eval.backend`; the two agree to within 0.01 points, tests/test_eval.py). Metrics in percent."""

from __future__ import annotations

import contextlib
import io
import math
import re
from typing import Callable

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from dist2 import distributed
from dist2.data.coco import CocoDetection, collate
from dist2.data.loader import same_size_batches
from dist2.methods import CLASS_AP, COCO_METRICS, COCO_RECALLS, DEFAULT_EVAL_BACKEND, EVAL_BACKENDS


def _evaluator(coco_gt: COCO, results: list[dict], backend: str):
    """A COCOeval of `backend`, evaluated and accumulated (prints nothing)."""
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        gt = coco_gt
    elif backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval import COCOeval_faster as COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            gt = FastCOCO(coco_gt.dataset)
    else:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; use one of {', '.join(EVAL_BACKENDS)}")
    with contextlib.redirect_stdout(io.StringIO()):  # both print their progress and summary table
        quiet = {"print_function": lambda *_: None} if backend == "faster_coco_eval" else {}  # it logs its table
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox", **quiet)
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _percent(value: float) -> float:
    return 100.0 * float(value) if value >= 0 else math.nan  # COCOeval's -1: undefined (no ground truth there)


def class_metrics(coco_gt: COCO) -> dict[int, str]:
    """Each category id's AP metric name: CLASS_AP + its name, with what MLflow refuses in a metric name (and "/",
    which MLflow reads as a path) as "_"; the id is appended where names would meet or nothing is left."""
    names: dict[int, str] = {}
    for cat_id in sorted(coco_gt.cats):
        name = re.sub(r"[^\w\-. ]", "_", str(coco_gt.cats[cat_id]["name"])).strip(" .")[:200]
        if not name or name in names.values():
            name = f"{name}_{cat_id}".lstrip("_")
        names[cat_id] = name
    return {cat_id: CLASS_AP + name for cat_id, name in names.items()}


def _class_aps(evaluator, coco_gt: COCO) -> dict[str, float]:
    """AP over IoU .50:.95 per category, all areas, 100 detections (COCOeval's precision[T, R, K, A, M])."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    names = class_metrics(coco_gt)
    aps = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        aps[names[cat_id]] = _percent(np.mean(p[p > -1]) if (p > -1).any() else -1)
    return aps


def coco_metrics(coco_gt: COCO, results: list[dict], backend: str = DEFAULT_EVAL_BACKEND,
                 per_class: bool = False) -> dict[str, float]:
    """Box AP and AR of COCO detection results (image_id, category_id, bbox xywh, score) against `coco_gt`:
    COCO_METRICS and COCO_RECALLS, and with `per_class` each category's AP under CLASS_AP + its name.

    A metric COCO cannot define (no ground truth in that size range or category) is NaN; no detections at all is 0.
    """
    if not results:
        zeros = dict.fromkeys((*COCO_METRICS, *COCO_RECALLS), 0.0)
        if per_class:  # as COCOeval: 0 where there is ground truth to miss, undefined (NaN) where there is none
            present = {a["category_id"] for a in coco_gt.anns.values()}
            zeros.update({name: 0.0 if cat_id in present else math.nan
                          for cat_id, name in class_metrics(coco_gt).items()})
        return zeros
    evaluator = _evaluator(coco_gt, results, backend)
    metrics = {k: _percent(v) for k, v in zip((*COCO_METRICS, *COCO_RECALLS), evaluator.stats[:12], strict=True)}
    if per_class:
        metrics.update(_class_aps(evaluator, coco_gt))
    return metrics


@torch.no_grad()
def predict(detect: Callable, dataset: CocoDetection, device: torch.device, batches: list[list[int]]) -> list[dict]:
    """Run `detect(images) -> [{boxes, scores, labels}]` over the dataset's `batches` (lists of indices) and return
    COCO results with the dataset's own category ids and boxes as xywh in original image coordinates."""
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    results = []
    for images, targets in loader:
        detections = detect([img.to(device) for img in images])
        for target, det in zip(targets, detections, strict=True):
            boxes = det["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True):
                results.append({"image_id": target["image_id"], "category_id": dataset.category_ids[label],
                                "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    return results


def evaluate_detections(detect: Callable, dataset: CocoDetection, device: torch.device, batch_size: int = 8,
                        backend: str = DEFAULT_EVAL_BACKEND, per_class: bool = False) -> dict[str, float]:
    """COCO metrics of `detect(images)` on `dataset`, each image's detections those it gets alone: batches hold
    images of one size (`same_size_batches`), so neither the batch size nor the number of workers changes a
    number. With several workers each predicts its share of the batches, the predictions are gathered and
    COCOeval runs once, on rank 0."""
    batches = distributed.shard(same_size_batches(dataset, batch_size))
    results = distributed.gather(predict(detect, dataset, device, batches))
    metrics = coco_metrics(dataset.coco, results, backend, per_class) if distributed.rank() == 0 else None
    return distributed.from_rank_zero(metrics)


def evaluate(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8,
             backend: str = DEFAULT_EVAL_BACKEND, per_class: bool = False) -> dict:
    """COCO_METRICS and COCO_RECALLS (percent) of `model` on `dataset`, and per category's AP with `per_class`."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_detections(model, dataset, device, batch_size, backend, per_class)
    finally:
        model.train(was_training)
