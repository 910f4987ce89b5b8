"""`dist2 eval`: evaluate a checkpoint against its config's val set, or a COCO results file against a GT file."""

from __future__ import annotations

from pathlib import Path

from dist2.checkpoint import load_weights
from dist2.config import ExperimentConfig
from dist2.data.build import build_val_dataset
from dist2.data.coco import load_coco, read_json
from dist2.distributed import resolve_device
from dist2.errors import UserError
from dist2.evaluation.coco_eval import coco_metrics, evaluate
from dist2.modeling import build_detector


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: Path) -> dict[str, float]:
    device = resolve_device(cfg.train.device)
    val_ds = build_val_dataset(cfg.data)
    model = build_detector(cfg.model, cfg.data, val_ds.categories)
    load_weights(model, checkpoint)
    return evaluate(model.to(device), val_ds, device, cfg.train.batch_size, cfg.eval.backend, per_class=True)


def load_results(path: Path, coco_gt) -> list[dict]:
    path = Path(path)
    results = read_json(path, "predictions file")
    if not isinstance(results, list):
        raise UserError(f"{path}: expected a JSON list of COCO detection results")
    required = {"image_id", "category_id", "bbox", "score"}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not required <= r.keys():
            raise UserError(f"{path}: result {i} lacks keys {sorted(required - set(r))} "
                            "(each needs image_id, category_id, bbox [x, y, w, h], score)")
        if r["image_id"] not in coco_gt.imgs:
            raise UserError(f"{path}: result {i} has image_id {r['image_id']!r}, not in the annotations")
        if r["category_id"] not in coco_gt.cats:
            raise UserError(f"{path}: result {i} has category_id {r['category_id']!r}, not in the annotations")
        if not (isinstance(r["bbox"], list) and len(r["bbox"]) == 4):
            raise UserError(f"{path}: result {i} has bbox {r['bbox']!r}; expected [x, y, w, h]")
    return results


def evaluate_files(annotations: Path, predictions: Path, backend: str) -> dict[str, float]:
    coco_gt = load_coco(annotations)
    return coco_metrics(coco_gt, load_results(predictions, coco_gt), backend, per_class=True)
