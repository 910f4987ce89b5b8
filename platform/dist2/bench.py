"""`dist2 bench`: training throughput (images/s) of experiment configs on this machine.

Each config's model is built as configured and trained for a few steps on the embedded synthetic data,
resized to the config's own training size, so paper-scale models are measured at paper-scale inputs
without COCO on disk. The first step (allocator warm-up) is not timed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tabulate import tabulate

from dist2.config import SynthConfig, load_config
from dist2.data.build import synth_root
from dist2.data.coco import CocoDetection
from dist2.data.transforms import train_transforms
from dist2.distributed import resolve_device
from dist2.engine.loop import to_device
from dist2.errors import UserError
from dist2.modeling.detectors import build_architecture

QUICK = ["experiments/quick_*_teacher.yaml", "experiments/quick_*_student.yaml"]
PAPER = ["experiments/paper/*.yaml"]


def _default_configs(paper_scale: bool) -> list[Path]:
    paths = sorted(p for pattern in QUICK + (PAPER if paper_scale else []) for p in Path().glob(pattern))
    if not paths:
        raise UserError(f"no configs given and none found as {' or '.join(QUICK)} (run from the repository root)")
    return paths


def synthetic_batch(data_cfg, batch: int, device):
    """The first `batch` images of the embedded synthetic train set, augmented as `data_cfg` says, on `device`."""
    root = synth_root(SynthConfig())
    data = CocoDetection(root / "annotations/instances_train.json", root / "train", train_transforms(data_cfg))
    torch.manual_seed(0)
    images, targets = to_device(*zip(*(data[i] for i in range(batch)), strict=True), device)
    return data, images, targets


def bench_batch(path: Path, cfg, batch_size: int | None) -> int:
    """The batch a benchmark uses: the one asked for, else 2 for a paper-scale config (CPU-sized), else the config's."""
    return batch_size or (2 if "paper" in Path(path).parts else cfg.train.batch_size)


def measure(path: Path, steps: int, batch_size: int | None) -> dict:
    cfg = load_config(path, ["data.root=null"])
    batch = bench_batch(path, cfg, batch_size)
    device = resolve_device(cfg.train.device)
    data, images, targets = synthetic_batch(cfg.data, batch, device)
    # Random weights: throughput does not depend on them, and a benchmark must not need a download.
    model = build_architecture(cfg.model, cfg.data, len(data.categories), download=False).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    amp = cfg.train.amp and device.type == "cuda"  # as the training loop: mixed precision on CUDA only
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    times = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / steps
    h, w = images[0].shape[-2:]
    return {"config": Path(path).stem, "detector": cfg.model.detector, "backbone": cfg.model.backbone,
            "channels": cfg.model.channels, "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
            "first input": f"{h}x{w}", "batch": batch, "amp": amp, "s/step": step, "img/s": batch / step}


def bench_train(configs: list[Path], steps: int = 5, batch_size: int | None = None,
                paper_scale: bool = False) -> list[dict]:
    rows = [measure(p, steps, batch_size) for p in (configs or _default_configs(paper_scale))]
    print(f"training throughput on {torch.get_num_threads()} CPU threads"
          if not torch.cuda.is_available() else f"training throughput on {torch.cuda.get_device_name()}")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    return rows
