"""Box-aware augmentation with torchvision.transforms.v2."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from dist2.config import DataConfig


def train_transforms(cfg: DataConfig) -> v2.Compose:
    steps = [v2.RandomShortestSize(min_size=cfg.train_sizes, max_size=cfg.max_size)]
    if cfg.hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip_prob))
    # Resizing can squash a tiny box to nothing: drop those rather than train on degenerate boxes.
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)


def eval_transforms(cfg: DataConfig) -> v2.Compose:
    # No resize here: the detector resizes to cfg.test_size itself and maps boxes back to the original image.
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
