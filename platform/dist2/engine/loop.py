"""The training loop shared by plain training and distillation.

A `Task` says what to optimise and what to deploy: for plain training both are the detector; for distillation
the optimised module is the student with its adapters (the frozen teacher lives outside it), and the deployed
model is the student alone. The loop itself knows nothing about detectors, teachers, Ray or MLflow: it runs
in one process or in each of several data-parallel workers, and hands each epoch's metrics and resume state
to its caller.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dist2 import distributed
from dist2.config import ExperimentConfig
from dist2.data.coco import CocoDetection
from dist2.data.loader import TrainLoader
from dist2.engine.averaging import WeightAverage
from dist2.engine.schedule import build_optimizer, build_scheduler
from dist2.evaluation import evaluate
from dist2.methods import CLASS_AP

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
    # Extra evaluation metrics beside COCO's, e.g. teacher_head_mAP; called with the val dataset on every worker.
    extra_eval: Callable[[CocoDetection], dict[str, float]] | None = None
    # Keyword arguments for DistributedDataParallel, e.g. find_unused_parameters when a head goes unused.
    ddp_kwargs: dict = field(default_factory=dict)


def seed_epoch(seed: int, epoch: int, worker: int = 0) -> None:
    """Seed every RNG from (seed, epoch, worker) alone, so that a resumed run draws exactly what an unbroken run
    would (augmentation) without having to carry RNG states in the checkpoint."""
    s = (seed * 100_003 + epoch) * 1_009 + worker
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _first_non_finite(losses: dict[str, float]) -> tuple[str, float] | None:
    return next(((name, v) for name, v in losses.items() if not math.isfinite(v)), None)


# Called after every training step with (global step, images trained by all workers so far in this run).
StepHook = Callable[[int, int], None]


def train_one_epoch(model: torch.nn.Module, params: list, loader: DataLoader, optimizer, scheduler, scaler, device,
                    epoch: int, cfg: ExperimentConfig, on_step: StepHook | None = None,
                    average: WeightAverage | None = None) -> dict[str, float]:
    """One pass over this worker's shard. `model` is the optimised module, wrapped for data parallelism when
    there are several workers; `average`, if any, follows its weights. Loss metrics are this worker's means;
    img_per_s is the throughput of all."""
    model.train()
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    use_amp = scaler.is_enabled()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
                disable=None if distributed.rank() == 0 else True)  # a bar on a terminal, from one worker
    for step, (images, targets) in enumerate(bar):
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, enabled=use_amp):
            losses = model(images, targets)
        total = sum(losses.values())
        values = {name: float(value.detach()) for name, value in {"loss": total, **losses}.items()}
        bad = _first_non_finite(values)
        # Every worker must stop at the same step, or the others would wait forever in the next all-reduce.
        if distributed.any_worker(bad is not None, device):
            term, value = next(b for b in distributed.gather([bad]) if b is not None)
            raise NonFiniteLoss(epoch, step, term, value)
        for name, v in values.items():
            sums[name] = sums.get(name, 0.0) + v
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.train.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if average is not None:
            average.update()
        seen += len(images)
        if on_step is not None:
            global_step = epoch * len(loader) + step + 1
            on_step(global_step, global_step * cfg.train.batch_size)
        bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    steps = max(1, len(loader))
    metrics = {name: total / steps for name, total in sums.items()}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["img_per_s"] = distributed.world_size() * seen / (time.perf_counter() - start)
    return metrics


def run_eval(task: Task, val_ds: CocoDetection, device, cfg: ExperimentConfig, final: bool) -> dict[str, float]:
    """COCO metrics of the deployed model (each category's AP too at the `final` evaluation), and those of any extra
    detector, over all workers' shards."""
    distributed.sync_buffers(task.module)
    metrics = evaluate(task.deploy, val_ds, device, cfg.train.batch_size, cfg.eval.backend, per_class=final)
    if task.extra_eval is not None:
        metrics.update(task.extra_eval(val_ds))
    return metrics


def epochs(cfg: ExperimentConfig, task: Task, train_ds: CocoDetection, val_ds: CocoDetection, device: torch.device,
           state: dict | None = None, on_step: StepHook | None = None) -> Iterator[tuple[dict, dict]]:
    """Train from `state` (a resume state, or None for a fresh start) to cfg.train.epochs, evaluating every
    cfg.train.eval_every epochs. Yields (metrics, resume state) after each epoch; the caller saves them.
    `on_step` follows the steps (rank 0's heartbeat).

    The global batch cfg.train.batch_size is split over the workers; with several, the module is wrapped in
    DistributedDataParallel and each worker draws its own shard of every epoch. With cfg.train.ema_decay the
    evaluated and deployed weights are the moving average of the trained ones: the module holds them while each
    epoch's results are yielded, and the resume state keeps both.
    """
    world = distributed.world_size()
    loader = TrainLoader(train_ds, cfg.data, cfg.train.batch_size // world, cfg.seed, world, distributed.rank(),
                         pin_memory=device.type == "cuda")
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")
    average = WeightAverage(task.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
    start_epoch, history = 0, []
    if state is not None:
        task.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        if average is not None:
            average.load_state_dict(state["average"])
        log.info("resuming %s after epoch %d", cfg.name, start_epoch)
    model = task.module
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(task.module, device_ids=ids, **task.ddp_kwargs)

    for epoch in range(start_epoch, cfg.train.epochs):
        seed_epoch(cfg.seed, epoch, distributed.rank())
        metrics = {"epoch": epoch + 1}
        metrics.update(train_one_epoch(model, params, loader.epoch(epoch), optimizer, scheduler, scaler, device,
                                       epoch, cfg, on_step, average))
        with average.applied() if average is not None else contextlib.nullcontext() as trained:
            final = epoch + 1 == cfg.train.epochs
            if (epoch + 1) % cfg.train.eval_every == 0 or final:
                metrics.update(run_eval(task, val_ds, device, cfg, final))
            history.append(metrics)
            if distributed.rank() == 0:
                log.info("epoch %d: %s", epoch + 1,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                   if k != "epoch" and not k.startswith(CLASS_AP)))  # those are for files and MLflow
            yield metrics, {"model": trained or task.module.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "average": average and average.state_dict(), "epoch": epoch + 1, "history": history}
