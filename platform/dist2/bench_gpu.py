"""`dist2 bench --gpu-smoke`: the CUDA paths, end to end, on one GPU, in a few minutes.

1. The quick FCOS teacher, one epoch with AMP, evaluated (in this process: the engine's own loop).
2. Dist2 All2All distillation from it, one epoch with AMP, evaluated with the teacher-head measures: through a
   one-worker Ray Train worker group (NCCL) logged to a fresh MLflow store, as `dist2 distill --address` runs it;
   on a machine without Ray or MLflow, the same loop in this process (and the summary says so).
3. Training images/s of the paper-scale FCOS student and teacher at batch 8 with AMP (`dist2 bench`'s step).

Needs torch, torchvision and the package's light dependencies (pydantic, PyYAML, pycocotools, faster-coco-eval);
run from the repository root (it reads experiments/).
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from dist2.bench import measure
from dist2.checkpoint import atomic_save
from dist2.config import ExperimentConfig, load_config
from dist2.engine.distill import build_distill_task
from dist2.engine.loop import epochs
from dist2.engine.train import build_train_task
from dist2.errors import UserError

TEACHER = Path("experiments/quick_fcos_teacher.yaml")
DISTILL = Path("experiments/quick_fcos_dist2_all2all.yaml")
PAPER = [Path("experiments/paper/fcos_mnv2c128_student.yaml"), Path("experiments/paper/fcos_x101_teacher.yaml")]
ONE_EPOCH_AMP = ["train.epochs=1", "train.lr_steps=[]", "train.amp=true", "train.device=cuda"]


def _in_process(cfg: ExperimentConfig, build) -> tuple[dict, float]:
    """Train `cfg` in this process with the engine's loop; saves model.pth; returns (final metrics, seconds)."""
    device = torch.device("cuda")
    task, train_ds, val_ds = build(cfg, device)  # first use generates the synthetic data: not timed
    start = time.perf_counter()
    history = [metrics for metrics, _ in epochs(cfg, task, train_ds, val_ds, device)]
    atomic_save(task.deploy.state_dict(), cfg.run_dir / "model.pth")
    return history[-1], time.perf_counter() - start


def _on_ray_train(cfg: ExperimentConfig, source: Path) -> tuple[dict, float]:
    """The same run as `dist2 distill` runs it on a worker group: one Ray Train worker (NCCL), MLflow logging."""
    from dist2.engine.launch import launch

    start = time.perf_counter()
    uri = f"sqlite:///{cfg.output_dir.absolute() / 'mlflow.db'}"
    metrics = launch(cfg, "distill", source, tracking_uri=uri, experiment="gpu_smoke", in_process=False)
    return metrics, time.perf_counter() - start


def gpu_smoke(workdir: Path | None = None) -> list[dict]:
    if not torch.cuda.is_available():
        raise UserError("dist2 bench --gpu-smoke needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for path in (TEACHER, DISTILL, *PAPER):
        if not path.is_file():
            raise UserError(f"{path} not found: run dist2 bench --gpu-smoke from the repository root")
    work = Path(workdir or tempfile.mkdtemp(prefix="dist2-gpu-smoke-")).absolute()
    rows = []

    teacher = load_config(TEACHER, ONE_EPOCH_AMP + [f"output_dir={work}", "name=teacher"])
    metrics, seconds = _in_process(teacher, build_train_task)
    rows.append({"stage": "quick FCOS teacher, 1 epoch, AMP", "ran": "in process", "s (stage)": seconds,
                 "train img/s": metrics["img_per_s"], "mAP": metrics["mAP"]})

    distill = load_config(DISTILL, ONE_EPOCH_AMP + [f"output_dir={work}", "name=dist2_all2all",
                                                    f"teacher.checkpoint={teacher.run_dir / 'model.pth'}",
                                                    "teacher.min_mAP=0", "ray.num_workers=1", "ray.use_gpu=true"])
    if all(importlib.util.find_spec(m) for m in ("ray", "mlflow")):
        metrics, seconds = _on_ray_train(distill, DISTILL)
        ran = "Ray Train, 1 worker, NCCL"
    else:
        metrics, seconds = _in_process(distill, build_distill_task)
        ran = "in process (no Ray or MLflow here)"
    rows.append({"stage": "Dist2 All2All distillation, 1 epoch, AMP", "ran": ran, "s (stage)": seconds,
                 "train img/s": metrics["img_per_s"], "mAP": metrics["mAP"],
                 "teacher_head_probe_mAP": metrics.get("teacher_head_probe_mAP")})

    for path in PAPER:
        step = measure(path, steps=5, batch_size=8)
        rows.append({"stage": f"{path.stem}, batch 8, AMP, input {step['first input']}", "ran": "in process",
                     "s/step": step["s/step"], "train img/s": step["img/s"]})
    print(f"GPU smoke check on {torch.cuda.get_device_name()}, torch {torch.__version__}; files in {work}")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github", missingval=""))
    return rows
