"""The training loop shared by plain training and distillation.

A `Task` says what to optimise and what to deploy: for plain training both are the detector; for distillation
the optimised module is the student with its adapters (the frozen teacher lives outside it), and the deployed
model is the student alone. The loop itself knows nothing about detectors or teachers.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from dist2.config import ExperimentConfig
from dist2.data.coco import CocoDetection, collate
from dist2.engine import checkpoint
from dist2.engine.schedule import build_optimizer, build_scheduler
from dist2.evaluation import evaluate

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or inf: training stops rather than continue on garbage."""

    def __init__(self, epoch: int, step: int, term: str, value: float):
        super().__init__(f"loss term {term!r} is {value} at epoch {epoch + 1}, step {step}")
        self.epoch, self.step, self.term = epoch, step, term


@dataclass
class Task:
    module: torch.nn.Module  # optimised; forward(images, targets) -> {loss term name: scalar}
    deploy: torch.nn.Module  # saved as model.pth and evaluated
    # Extra evaluation metrics beside COCO's, e.g. teacher_head_mAP; called with the val dataset.
    extra_eval: Callable[[CocoDetection], dict[str, float]] | None = None
    params: list = field(default_factory=list)

    def __post_init__(self):
        self.params = self.params or [p for p in self.module.parameters() if p.requires_grad]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from dist2.errors import UserError

        raise UserError("train.device: 'cuda' asked for but no CUDA device is visible (use 'auto' or 'cpu')")
    return torch.device(name)


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed every RNG from (seed, epoch) alone, so that a resumed run draws exactly what an unbroken run would
    (data order and augmentation) without having to carry RNG states in the checkpoint."""
    s = seed * 100_003 + epoch
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def train_one_epoch(task: Task, loader: DataLoader, optimizer, scheduler, scaler, device, epoch: int,
                    cfg: ExperimentConfig) -> dict[str, float]:
    task.module.train()
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    use_amp = scaler.is_enabled()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
                disable=None)  # a bar on a terminal; logs get one line per epoch instead
    for step, (images, targets) in enumerate(bar):
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, enabled=use_amp):
            losses = task.module(images, targets)
        total = sum(losses.values())
        for name, value in {"loss": total, **losses}.items():
            v = float(value.detach())
            if not math.isfinite(v):
                raise NonFiniteLoss(epoch, step, name, v)
            sums[name] = sums.get(name, 0.0) + v
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.train.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(task.params, cfg.train.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen += len(images)
        bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    steps = max(1, len(loader))
    metrics = {name: total / steps for name, total in sums.items()}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["img_per_s"] = seen / (time.perf_counter() - start)
    return metrics


def run_eval(task: Task, val_ds: CocoDetection, device, batch_size: int) -> dict[str, float]:
    metrics = evaluate(task.deploy, val_ds, device, batch_size)
    if task.extra_eval is not None:
        metrics.update(task.extra_eval(val_ds))
    return metrics


def fit(cfg: ExperimentConfig, task: Task, train_ds: CocoDetection, val_ds: CocoDetection, device: torch.device,
        resume: bool = False) -> dict:
    """Train for cfg.train.epochs, evaluating and checkpointing each epoch. Returns the metrics of the last one.

    Files in cfg.run_dir: config.yaml, model.pth (deployable weights), resume.pth (full state), metrics.json.
    """
    run_dir = Path(cfg.run_dir)
    batch = cfg.train.batch_size
    iters_per_epoch = math.ceil(len(train_ds) / batch)
    optimizer = build_optimizer(task.params, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")
    start_epoch, history = 0, []
    if resume:
        state = checkpoint.load(run_dir / checkpoint.RESUME, "resume state")
        task.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    for epoch in range(start_epoch, cfg.train.epochs):
        generator = seed_epoch(cfg.seed, epoch)
        loader = DataLoader(train_ds, batch_size=batch, shuffle=True, generator=generator, collate_fn=collate,
                            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
        metrics = {"epoch": epoch + 1}
        metrics.update(train_one_epoch(task, loader, optimizer, scheduler, scaler, device, epoch, cfg))
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(run_eval(task, val_ds, device, batch))
        history.append(metrics)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        checkpoint.atomic_save(task.deploy.state_dict(), run_dir / checkpoint.WEIGHTS)
        checkpoint.atomic_save({"model": task.module.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                "epoch": epoch + 1, "history": history}, run_dir / checkpoint.RESUME)
        (run_dir / "metrics.json").write_text(json.dumps({"history": history, "final": history[-1]}, indent=1))
    return history[-1] if history else {}
