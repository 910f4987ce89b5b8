"""`dist2 train`: one detector trained from its config, in one process."""

from __future__ import annotations

from dist2.config import ExperimentConfig
from dist2.data.build import build_datasets
from dist2.engine.loop import Task, fit, resolve_device, seed_epoch
from dist2.modeling import build_detector


def train(cfg: ExperimentConfig, resume: bool = False) -> dict:
    device = resolve_device(cfg.train.device)
    seed_epoch(cfg.seed, -1)  # weight initialisation is seeded too
    train_ds, val_ds = build_datasets(cfg.data)
    model = build_detector(cfg.model, cfg.data, train_ds.categories).to(device)
    return fit(cfg, Task(module=model, deploy=model), train_ds, val_ds, device, resume=resume)
