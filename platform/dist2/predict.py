"""`dist2 predict CONFIG --checkpoint PATH --images DIR_OR_FILES --out DIR`: see what a detector finds.

For each input image: OUT/<stem>.png, the image at its own size with the detections at or above --score-thresh
drawn (torchvision's draw_bounding_boxes: box, category name, score). And OUT/predictions.json: every detection of
every image as COCO results (image_id, category_id, bbox xywh in the image's own pixels, score), with the dataset's
category ids; an image that is in the config's validation annotations keeps its image id there (so the file
evaluates against them), any other image gets an id after the largest of them, in input order; every result also
names its image by "file_name".

--teacher-head draws what the teacher's head makes of the student's neck (a distillation config): through the
run's trained N2N adapter where the checkpoint (a resume.pth) has one, else through the least-squares probe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from dist2.checkpoint import load_weights
from dist2.config import ExperimentConfig
from dist2.data.build import build_val_dataset
from dist2.distributed import resolve_device
from dist2.errors import UserError
from dist2.modeling import build_detector

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RESULTS = "predictions.json"


def find_images(sources: list[Path]) -> list[Path]:
    """The image files named, and those directly in the folders named (sorted), in order."""
    found: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            found.append(source)
        else:
            raise UserError(f"--images: {source} does not exist")
    if not found:
        raise UserError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, sources))}")
    for path in found:  # every image readable before anything is written
        try:
            with Image.open(path) as image:
                image.verify()
        except OSError as exc:
            raise UserError(f"{path}: cannot read image ({exc})") from None
    stems = [p.stem for p in found]
    if len(set(stems)) < len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise UserError(f"--images: several images named {twice[0]!r} (one PNG each is written by stem)")
    return found


def _read(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return F.to_dtype(F.to_image(image.convert("RGB")), torch.float32, scale=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def predict(cfg: ExperimentConfig, checkpoint: Path, sources: list[Path], out: Path, score_thresh: float = 0.5,
            teacher_head: bool = False) -> Path:
    """Checked first (images, then the checkpoint), written after: a mistake leaves `out` untouched."""
    paths = find_images(sources)
    device = resolve_device(cfg.train.device)
    val = build_val_dataset(cfg.data)
    if teacher_head:
        from dist2.distill.teacher_head import teacher_head_detector

        detect, which = teacher_head_detector(cfg, checkpoint, device)
        log.info("drawing the teacher's head on the student's neck (%s)", which)
    else:
        model = build_detector(cfg.model, cfg.data, val.categories)
        load_weights(model, checkpoint)
        detect = model.to(device).eval()
    known = {Path(info["file_name"]).name: image_id for image_id, info in val.coco.imgs.items()}
    first_new = max(val.coco.imgs, default=0) + 1  # other images are numbered after the val set's ids
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, path in enumerate(paths):  # one at a time: the detections evaluation gives each image (no padding)
        image = _read(path)
        with torch.no_grad():
            (detections,) = detect([image.to(device)])
        image_id = known.get(path.name, first_new + index)
        results += _draw_and_list(image, path, detections, image_id, val, out, score_thresh)
    (out / RESULTS).write_text(json.dumps(results))
    return out


def _draw_and_list(image, path: Path, found: dict, image_id: int, val, out: Path, score_thresh: float) -> list:
    """OUT/<stem>.png with the detections at or above score_thresh, and all detections as COCO results."""
    boxes, scores, labels = found["boxes"].float().cpu(), found["scores"].cpu(), found["labels"].cpu()
    results = [{"image_id": image_id, "file_name": path.name, "category_id": val.category_ids[label],
                "score": round(score, 5), "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                                   round(box[3] - box[1], 2)]}
               for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)]
    keep = scores >= score_thresh
    names = [f"{val.categories[val.category_ids[label]]} {score:.2f}"
             for label, score in zip(labels[keep].tolist(), scores[keep].tolist(), strict=True)]
    drawn = F.to_dtype(image, torch.uint8, scale=True)
    if names:  # torchvision warns on an empty set of boxes
        drawn = draw_bounding_boxes(drawn, boxes[keep], labels=names, colors="red", width=2)
    F.to_pil_image(drawn).save(out / f"{path.stem}.png")
    return results
