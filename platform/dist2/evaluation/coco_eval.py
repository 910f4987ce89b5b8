"""COCO box evaluation with pycocotools' own COCOeval; metrics in percent."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Callable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from dist2 import distributed
from dist2.data.coco import CocoDetection, collate
from dist2.methods import COCO_METRICS  # COCOeval.stats[0:6], in this order


def coco_metrics(coco_gt: COCO, results: list[dict]) -> dict[str, float]:
    """Box AP of COCO detection results (image_id, category_id, bbox xywh, score) against `coco_gt`.

    A metric COCO cannot define (no ground truth in that size range) is NaN; no detections at all is 0.
    """
    if not results:
        return {k: 0.0 for k in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = zip(COCO_METRICS, evaluator.stats[:6], strict=True)
    return {k: (100.0 * float(v) if v >= 0 else math.nan) for k, v in stats}


@torch.no_grad()
def predict(detect: Callable, dataset: CocoDetection, device: torch.device, batch_size: int = 8,
            indices: list[int] | None = None) -> list[dict]:
    """Run `detect(images) -> [{boxes, scores, labels}]` over the dataset (or some of its indices) and return
    COCO results with the dataset's own category ids and boxes as xywh in original image coordinates."""
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
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


def evaluate_detections(detect: Callable, dataset: CocoDetection, device: torch.device,
                        batch_size: int = 8) -> dict[str, float]:
    """COCO metrics of `detect(images)` on `dataset`. With several workers each predicts its own shard of whole
    batches, the predictions are gathered and COCOeval runs once, on rank 0: the numbers are exactly those of
    one process with the same batch size."""
    indices = distributed.shard(len(dataset), batch_size)
    results = distributed.gather(predict(detect, dataset, device, batch_size, indices))
    return distributed.from_rank_zero(coco_metrics(dataset.coco, results) if distributed.rank() == 0 else None)


def evaluate(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8) -> dict:
    """mAP, AP50, AP75, APs, APm, APl (percent) of `model` on `dataset`."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_detections(model, dataset, device, batch_size)
    finally:
        model.train(was_training)
