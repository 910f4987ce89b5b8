"""The optimizer, and the detection "1x"-style schedule: linear warmup, then step decay at given epochs."""

from __future__ import annotations

import torch

from dist2.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: TrainConfig, iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration: warmup over `warmup_iters`, then x lr_gamma after each epoch in lr_steps."""
    milestones = [s * iters_per_epoch for s in cfg.lr_steps]

    def factor(it: int) -> float:
        warm = 1.0
        if it < cfg.warmup_iters:
            alpha = it / cfg.warmup_iters
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        return warm * cfg.lr_gamma ** sum(it >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
