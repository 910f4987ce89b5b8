"""`dist2 bench --ray CONFIG`: what running on Ray Train costs, against the plain training loop.

The same run (the config, shortened to `epochs`, with a random-weight teacher for a distillation config: the
time does not depend on the weights) is timed four ways, each in a fresh process so that every variant pays
its own imports and start-up:
  - the in-process loop: build the task and iterate `engine.loop.epochs`, no Ray, no MLflow;
  - `dist2 train/distill` with one worker: in-process, no worker group (what a laptop run does), with its
    checkpoints and MLflow logging;
  - one worker in a Ray Train worker group on a local Ray started for the run;
  - two workers in that worker group (gloo).
The MLflow store is created before the first variant (as after a user's first run). Wall time is measured
around the child process. Fixed overhead = wall time - that of the in-process loop at
the same throughput; the projection for a 5-minute run adds it to the steady-state slowdown.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from tabulate import tabulate

from dist2.config import load_config

VARIANTS = ["in-process loop (no Ray, no MLflow)", "dist2, 1 worker, in-process (default)",
            "Ray Train, 1 worker, worker group", "Ray Train, 2 workers, worker group"]


def _overrides(path: Path, tmp: Path, epochs: int) -> list[str]:
    cfg = load_config(path)
    overrides = [f"output_dir={tmp / 'runs'}", f"train.epochs={epochs}", "train.lr_steps=[]",
                 f"train.eval_every={epochs}"]
    if cfg.teacher is not None:
        from dist2.data.build import build_val_dataset
        from dist2.modeling.detectors import build_architecture

        teacher_cfg = load_config(cfg.teacher.config)
        categories = build_val_dataset(cfg.data).categories
        teacher = build_architecture(teacher_cfg.model, cfg.data, len(categories), download=False)
        torch.save(teacher.state_dict(), tmp / "teacher.pth")
        overrides += [f"teacher.checkpoint={tmp / 'teacher.pth'}", "teacher.min_mAP=0"]
    return overrides


def _run_variant(variant: int, path: str, overrides: list[str], tmp: str, out: str) -> None:
    from dist2.distributed import resolve_device
    from dist2.engine.launch import launch
    from dist2.engine.loop import epochs
    from dist2.engine.rundir import read_record
    from dist2.engine.worker import TASKS

    kind = "distill" if load_config(path).teacher is not None else "train"
    name = f"bench{variant}"
    cfg = load_config(path, overrides + [f"name={name}", f"ray.num_workers={2 if variant == 3 else 1}"])
    if variant == 0:
        device = resolve_device(cfg.train.device)
        task, train_ds, val_ds = TASKS[kind](cfg, device)
        history = [metrics for metrics, _ in epochs(cfg, task, train_ds, val_ds, device)]
    else:
        address = None
        if variant >= 2:  # a worker group even for one worker: the local Ray a run would start, started here
            from dist2.engine.local_ray import start_ray

            start_ray()
            address = "auto"
        launch(cfg, kind, Path(path), address=address, tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        history = read_record(cfg.run_dir)["history"]
    Path(out).write_text(json.dumps(history))


def bench_ray(path: Path, epochs: int = 1) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = _overrides(path, Path(tmp), epochs)
        MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()  # creates the store's tables
        for variant, label in enumerate(VARIANTS):
            out = Path(tmp) / f"history{variant}.json"
            start = time.perf_counter()
            child = ctx.Process(target=_run_variant, args=(variant, str(path), overrides, tmp, str(out)))
            child.start()
            child.join()
            wall = time.perf_counter() - start
            if child.exitcode != 0:
                raise RuntimeError(f"benchmark variant {label!r} failed (exit code {child.exitcode})")
            history = json.loads(out.read_text())
            rows.append({"how": label, "wall s": wall,
                         "img/s (train)": statistics.median(h["img_per_s"] for h in history)})
    base = rows[0]
    images = load_config(path).data.synth.num_train * epochs
    for row in rows:
        # Fixed overhead: the wall time beyond the loop's, less what the difference in training speed explains.
        row["x loop img/s"] = row["img/s (train)"] / base["img/s (train)"]
        slower_s = images / row["img/s (train)"] - images / base["img/s (train)"]
        row["fixed overhead s"] = row["wall s"] - base["wall s"] - slower_s
        slowdown = 1 / row["x loop img/s"] - 1
        row["added to a 5-min run"] = f"{100 * (row['fixed overhead s'] / 300 + slowdown):+.1f}%"
    print(f"Ray Train overhead, {Path(path).name}, {epochs} epoch(s), {torch.get_num_threads()} CPU threads")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    return rows
