import hashlib
import json
import logging

import pytest
import torch

from dist2.config import DataConfig, SynthConfig
from dist2.data.coco import CocoDetection
from dist2.data.synth import CATEGORIES, DIFFICULTIES, VERSION, generate
from dist2.data.transforms import train_transforms
from dist2.errors import UserError

from conftest import run_cli


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_real_coco(tmp_path):
    cfg = SynthConfig(num_train=6, num_val=3, image_size=96, seed=7)
    a, b = generate(tmp_path / "a", cfg), generate(tmp_path / "b", cfg)
    assert _digest(a) == _digest(b)
    c = generate(tmp_path / "c", cfg.model_copy(update={"seed": 8}))
    assert _digest(a) != _digest(c)
    ds = CocoDetection(a / "annotations/instances_train.json", a / "train")
    assert len(ds) == 6 and ds.categories == CATEGORIES


def test_synth_has_what_makes_it_hard(synth_root):
    coco = json.loads((synth_root / "annotations/instances_train.json").read_text())
    anns = [a for a in coco["annotations"] if not a["iscrowd"]]
    sides = sorted(max(a["bbox"][2], a["bbox"][3]) for a in anns)
    # Sizes spread over the FPN levels: small (<32 px), medium and large (>64 px) objects all present.
    assert sides[0] < 16 and sides[-1] > 64 and any(32 <= s <= 64 for s in sides)
    assert len({a["category_id"] for a in anns}) == len(CATEGORIES)
    assert sorted(CATEGORIES) != list(range(1, len(CATEGORIES) + 1))  # gapped ids, as COCO's


def _overlapping_pairs(coco) -> int:
    """Pairs of (non-crowd) boxes of one image that intersect."""
    boxes = {}
    for a in coco["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            boxes.setdefault(a["image_id"], []).append((x, y, x + w, y + h))
    return sum(min(p[2], q[2]) > max(p[0], q[0]) and min(p[3], q[3]) > max(p[1], q[1])
               for image in boxes.values() for i, p in enumerate(image) for q in image[i + 1:])


@pytest.mark.parametrize("difficulty", ["easy", "standard", "hard"])
def test_every_difficulty_keeps_what_the_evaluation_must_meet(tmp_path, difficulty):
    """Gapped category ids, crowd regions and empty images at every difficulty; overlap only where allowed."""
    root = generate(tmp_path / difficulty, SynthConfig(num_train=80, num_val=4, image_size=96, seed=1,
                                                       difficulty=difficulty))
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    per_image = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
        per_image[a["image_id"]] += not a["iscrowd"]
    assert any(a["iscrowd"] for a in coco["annotations"])
    assert 0 in per_image.values()  # empty images
    assert {c["id"] for c in coco["categories"]} == set(CATEGORIES)
    assert max(per_image.values()) <= DIFFICULTIES[difficulty].objects[1]
    overlaps = _overlapping_pairs(coco)
    assert (overlaps == 0) if difficulty == "easy" else (overlaps > 0)
    assert f"generator v{VERSION}" in coco["info"]["description"]


def test_cli_data_synth(tmp_path):
    result = run_cli("data", "synth", "--out", tmp_path / "d", "--num-train", "3", "--num-val", "2",
                     "--difficulty", "easy")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "d/train").glob("*.jpg"))) == 3
    assert len(json.loads((tmp_path / "d/annotations/instances_val.json").read_text())["images"]) == 2


def _write_coco(tmp_path, annotations, images=None, categories=None):
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    images = images or [{"id": 10, "file_name": "a.png", "width": 50, "height": 40},
                        {"id": 20, "file_name": "b.png", "width": 50, "height": 40}]
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 90, 90)).save(tmp_path / "img" / im["file_name"])
    categories = categories or [{"id": 5, "name": "cat"}, {"id": 42, "name": "dog"}, {"id": 90, "name": "eel"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _ann(i, image_id, cat, bbox, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": crowd}


def test_labels_crowd_clipping_zero_area_and_empty_images(tmp_path, caplog):
    path = _write_coco(tmp_path, [
        _ann(1, 10, 42, [5, 5, 10, 10]),
        _ann(2, 10, 90, [40, 30, 20, 20]),  # runs past the right and bottom edges: clipped
        _ann(3, 10, 5, [1, 1, 30, 30], crowd=1),  # crowd: not a training target
        _ann(4, 10, 5, [3, 3, 0, 8]),  # zero width: dropped and counted
        _ann(5, 10, 5, [60, 3, 5, 5]),  # entirely outside the image: no area after clipping
        _ann(6, 10, 5, [20, 20, -5, 5]),  # negative width: dropped
        _ann(7, 10, 5, [20, 20, float("nan"), 5]),  # NaN (JSON's NaN, as json.dumps writes it): dropped
    ])
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(path, tmp_path / "img")
    assert ds.num_dropped_boxes == 4
    assert "dropped 4 invalid (zero-area, negative or NaN) box(es)" in caplog.text and "instances.json" in caplog.text
    assert ds.category_ids == [5, 42, 90]  # label i <-> category_ids[i]
    image, target = ds[0]
    assert image.shape == (3, 40, 50)
    assert target["image_id"] == 10
    assert target["labels"].tolist() == [1, 2]
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [40, 30, 50, 40]]
    _, empty = ds[1]  # an image without objects
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_unknown_category_missing_image_and_bad_json(tmp_path):
    path = _write_coco(tmp_path, [_ann(1, 10, 7, [5, 5, 10, 10])])
    with pytest.raises(UserError, match=r"instances.json: annotations use category id\(s\) \[7\]"):
        CocoDetection(path, tmp_path / "img")
    path = _write_coco(tmp_path, [])
    (tmp_path / "img" / "b.png").unlink()
    with pytest.raises(UserError, match=r"1 image file\(s\) missing .*b.png"):
        CocoDetection(path, tmp_path / "img")
    path.write_text("{not json")
    with pytest.raises(UserError, match="instances.json: not a readable JSON file"):
        CocoDetection(path, tmp_path / "img")
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not a COCO instances file .missing annotations, categories"):
        CocoDetection(path, tmp_path / "img")


def test_augmentation_moves_boxes_with_pixels(tmp_path):
    from PIL import Image

    path = _write_coco(tmp_path, [_ann(1, 10, 42, [5, 10, 10, 20])])
    img = Image.new("RGB", (50, 40))
    img.paste((255, 255, 255), (5, 10, 15, 30))  # a white block exactly under the box
    img.save(tmp_path / "img" / "a.png")
    cfg = DataConfig(train_sizes=[80], max_size=200, hflip_prob=1.0, test_size=80)
    ds = CocoDetection(path, tmp_path / "img", train_transforms(cfg))
    image, target = ds[0]
    assert image.shape == (3, 80, 100) and image.dtype == torch.float32 and image.max() <= 1.0
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    assert (x0, y0, x1, y1) == pytest.approx((70, 20, 90, 60))  # scaled x2 and mirrored: 100 - 2*15 = 70
    inside = image[:, int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2]
    assert inside.min() > 0.9  # the white block moved with its box
    assert image[:, :, :60].max() < 0.1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_grouped_batches_are_one_group_each_and_every_rank_gets_as_many(world):
    """Aspect-ratio grouping under DistributedSampler: every batch holds one group; every rank draws the same
    number of batches (DDP hangs otherwise), all its shard's indices, and the same batches for the same epoch."""
    from torch.utils.data import DistributedSampler

    from dist2.data.loader import GroupedBatchSampler

    groups = [int(i % 3 == 0) for i in range(61)]  # a third of the images tall
    counts, epochs = set(), {}
    for rank in range(world):
        sampler = DistributedSampler(range(61), num_replicas=world, rank=rank, shuffle=True, seed=5)
        batches = GroupedBatchSampler(sampler, groups, batch_size=4)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            drawn = list(batches)
            assert drawn == list(batches)  # the same (seed, epoch): the same batches
            epochs[(rank, epoch)] = drawn
            assert len(drawn) == len(batches) == len(sampler) // 4
            assert all(len(b) == 4 and len({groups[i] for i in b}) == 1 for b in drawn)
            used = {i for b in drawn for i in b}
            assert used <= set(sampler) and len(used) >= len(sampler) - 2 * 3  # at most a partial batch per group
            counts.add(len(drawn))
    assert len(counts) == 1
    assert epochs[(0, 0)] != epochs[(0, 1)]


def test_a_kept_loader_reseeds_each_sample_from_seed_epoch_and_index(tmp_path):
    """With loader processes kept across epochs, a sample's augmentation depends on (seed, epoch, index) alone:
    the same epoch drawn again (a resumed run) gives the same tensors; another epoch different ones."""
    from dist2.data.loader import TrainLoader

    root = generate(tmp_path / "d", SynthConfig(num_train=12, num_val=2, image_size=96, seed=0))
    cfg = DataConfig(root=root, train_sizes=[64, 96, 128], test_size=96, max_size=160, hflip_prob=0.5,
                     num_workers=2)
    ds = CocoDetection(root / cfg.train_annotations, root / cfg.train_images, train_transforms(cfg))

    def draw(loader, epoch):
        return [(img.shape, t["boxes"]) for images, targets in loader.epoch(epoch)
                for img, t in zip(images, targets, strict=True)]

    kept = TrainLoader(ds, cfg, batch_size=4, seed=3, world=1, rank=0, pin_memory=False)
    first, second = draw(kept, 0), draw(kept, 1)
    fresh = TrainLoader(ds, cfg, batch_size=4, seed=3, world=1, rank=0, pin_memory=False)
    again = draw(fresh, 1)  # a new process group starting at epoch 1, as a resumed run does
    assert [s for s, _ in again] == [s for s, _ in second]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, second, strict=True))
    assert [s for s, _ in first] != [s for s, _ in second]
