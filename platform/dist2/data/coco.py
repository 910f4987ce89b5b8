"""COCO-format detection data through the pycocotools COCO API.

Labels are contiguous (0..K-1) for training; `category_ids[label]` maps them back to the dataset's own
(possibly gapped) category ids for evaluation. Crowd annotations are left out of training targets (COCOeval
still uses them, as ignore regions); boxes are clipped to the image; boxes with no area (zero or negative size,
NaN) are dropped and counted in one warning per annotation file. A malformed file (a bbox that is not four
numbers, an annotation of an unknown image, duplicate ids...) is a UserError naming the annotation.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from dist2.errors import UserError

log = logging.getLogger(__name__)


def read_json(path: Path, what: str):
    """A JSON file's content, or a UserError naming the file (`what` says what it should have been)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_duplicate(ids: list) -> object | None:
    seen = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def check_instances(ann_file: Path, data: dict) -> None:
    """What pycocotools and the loader rely on, checked up front: a UserError naming the file and the offending
    image or annotation id. Boxes that are only degenerate (no area, NaN) are not errors: they are dropped."""
    images = data["images"]
    if any(not isinstance(img, dict) or "id" not in img for img in images):
        raise UserError(f"{ann_file}: every entry of images needs an id")
    duplicate = _first_duplicate([img["id"] for img in images])
    if duplicate is not None:
        raise UserError(f"{ann_file}: image id {duplicate!r} appears more than once in images")
    if any(not isinstance(ann, dict) or "id" not in ann for ann in data["annotations"]):
        raise UserError(f"{ann_file}: every entry of annotations needs an id")
    duplicate = _first_duplicate([ann["id"] for ann in data["annotations"]])
    if duplicate is not None:
        raise UserError(f"{ann_file}: annotation id {duplicate!r} appears more than once in annotations")
    image_ids = {img["id"] for img in images}
    for ann in data["annotations"]:
        where = f"{ann_file}: annotation id {ann['id']!r}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise UserError(f"{where}: bbox must be four numbers [x, y, width, height] (got {bbox!r})")
        if ann.get("image_id") not in image_ids:
            raise UserError(f"{where}: image_id {ann.get('image_id')!r} is not in images")
        if "area" in ann and not _is_number(ann["area"]):
            raise UserError(f"{where}: area must be a number (got {ann['area']!r})")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise UserError(f"{where}: iscrowd must be 0 or 1 (got {ann['iscrowd']!r})")


def load_coco(ann_file: Path) -> COCO:
    """Load an annotation file, turning every way it can be broken into a UserError naming it."""
    ann_file = Path(ann_file)
    data = read_json(ann_file, "annotation file")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{ann_file}: not a COCO instances file (missing {', '.join(missing)})")
    check_instances(ann_file, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    def __init__(self, ann_file: Path, image_dir: Path, transforms=None):
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.coco = load_coco(self.ann_file)
        self.transforms = transforms
        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        self.categories = {c: self.coco.cats[c]["name"] for c in self.category_ids}
        self.label_of = {c: i for i, c in enumerate(self.category_ids)}
        self.ids: list[int] = sorted(self.coco.imgs)
        unknown = {a["category_id"] for a in self.coco.anns.values()} - set(self.category_ids)
        if unknown:
            raise UserError(f"{self.ann_file}: annotations use category id(s) {sorted(unknown)} "
                            "that are not in its categories list")
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise UserError(f"{self.ann_file}: {len(missing)} image file(s) missing from {self.image_dir}, "
                            f"e.g. {self.image_dir / missing[0]}")
        self.num_dropped_boxes = sum(1 for i in self.ids for _ in self._boxes(i, count_only_dropped=True))
        if self.num_dropped_boxes:
            log.warning("%s: dropped %d invalid (zero-area, negative or NaN) box(es)", self.ann_file,
                        self.num_dropped_boxes)

    def __len__(self) -> int:
        return len(self.ids)

    def _boxes(self, image_id: int, count_only_dropped: bool = False):
        """Yield (xyxy clipped to the image, label) of the non-crowd boxes with area, or the dropped ones."""
        info = self.coco.imgs[image_id]
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x0, y0 = min(max(x, 0.0), info["width"]), min(max(y, 0.0), info["height"])
            x1, y1 = min(max(x + w, 0.0), info["width"]), min(max(y + h, 0.0), info["height"])
            has_area = x1 > x0 and y1 > y0
            if has_area != count_only_dropped:
                yield [x0, y0, x1, y1], self.label_of[ann["category_id"]]

    def __getitem__(self, item: int | tuple[int, int]):
        """`item`: an index, or (index, seed) from a loader whose processes outlive an epoch: the sample's own
        augmentation seed (torchvision's v2 transforms draw from torch's global RNG; data/loader.py)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            torch.manual_seed(seed)
        image_id = self.ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise UserError(f"{path}: cannot read image ({exc})") from None
        pairs = list(self._boxes(image_id))
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor([b for b, _ in pairs], dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(image.height, image.width)),
            "labels": torch.tensor([label for _, label in pairs], dtype=torch.int64),
            "image_id": image_id,
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        # Plain tensors from here on: the models do their own box arithmetic.
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), target


def collate(batch):
    return tuple(zip(*batch, strict=True))
