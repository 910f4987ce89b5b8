"""From a DataConfig to datasets: a COCO folder by path, or the synthetic default generated and cached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dist2.config import DataConfig, SynthConfig
from dist2.data import synth
from dist2.data.coco import CocoDetection
from dist2.data.synth import generate
from dist2.data.transforms import eval_transforms, train_transforms


def cache_dir() -> Path:
    return Path(os.environ.get("DIST2_CACHE", Path.home() / ".cache" / "dist2"))


def synth_root(cfg: SynthConfig) -> Path:
    """The cached synthetic dataset for this config, generated on first use.

    Generated into a temporary folder and renamed into place, so that concurrent workers never see half a
    dataset: the first rename wins and the others discard their copy.
    """
    spec = {**cfg.model_dump(), "version": synth.VERSION}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / f"synth-{key}"
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=root.parent))
        generate(tmp, cfg)
        try:
            tmp.rename(root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_data_root(cfg: DataConfig) -> Path:
    return cfg.root if cfg.root is not None else synth_root(cfg.synth)


def describe(cfg: DataConfig, dataset: CocoDetection, split: str) -> dict:
    """What a run trains or evaluates on, for MLflow's Dataset column (`EpochLogger.log_datasets`): a name, where
    it is (for the synthetic set also its generator settings), a digest of its annotation file (the images are
    named there) and its size."""
    sha = hashlib.sha256()
    with open(dataset.ann_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    source = {"uri": dataset.ann_file.absolute().as_uri(), "images": dataset.image_dir.absolute().as_uri()}
    if cfg.root is None:
        name = f"synthetic-{cfg.synth.difficulty} {split}"
        source.update(generator=f"dist2.data.synth v{synth.VERSION}", **cfg.synth.model_dump())
    else:
        name = f"{cfg.root.name} {split}"
    return {"name": name, "digest": sha.hexdigest()[:16], "source_type": "synthetic" if cfg.root is None else "local",
            "source": source, "context": split,
            "profile": {"images": len(dataset), "annotations": len(dataset.coco.anns),
                        "categories": len(dataset.categories)}}


def build_datasets(cfg: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    root = resolve_data_root(cfg)
    train = CocoDetection(root / cfg.train_annotations, root / cfg.train_images, train_transforms(cfg))
    val = CocoDetection(root / cfg.val_annotations, root / cfg.val_images, eval_transforms(cfg))
    return train, val


def build_val_dataset(cfg: DataConfig) -> CocoDetection:
    root = resolve_data_root(cfg)
    return CocoDetection(root / cfg.val_annotations, root / cfg.val_images, eval_transforms(cfg))


def build_unaugmented_train_dataset(cfg: DataConfig) -> CocoDetection:
    """The training images as evaluation reads images (no random resize or flip): a fit on training images made
    from it gives the same result during training and in `dist2 eval` (the teacher-head probe)."""
    root = resolve_data_root(cfg)
    return CocoDetection(root / cfg.train_annotations, root / cfg.train_images, eval_transforms(cfg))
