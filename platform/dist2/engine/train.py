"""`dist2 train`: what a worker trains for a plain detector run."""

from __future__ import annotations

from dist2.checkpoint import initialise
from dist2.config import ExperimentConfig
from dist2.data.build import build_datasets
from dist2.engine.loop import Task, seed_epoch
from dist2.modeling import build_detector


def build_train_task(cfg: ExperimentConfig, device):
    seed_epoch(cfg.seed, -1)  # weight initialisation is seeded too (the same on every worker)
    train_ds, val_ds = build_datasets(cfg.data)
    model = build_detector(cfg.model, cfg.data, train_ds.categories)
    initialise(model, cfg.model)  # a continued run's resume state replaces these weights afterwards
    model.to(device)
    return Task(module=model, deploy=model), train_ds, val_ds
