"""`dist2 distill`: what a worker trains for a distillation run."""

from __future__ import annotations

from dist2.checkpoint import initialise
from dist2.config import ExperimentConfig
from dist2.data.build import build_datasets, build_unaugmented_train_dataset
from dist2.distill.distiller import Distiller
from dist2.distill.teacher import load_teacher, require_distill_sections
from dist2.distill.teacher_head import teacher_head_metrics
from dist2.engine.loop import Task, seed_epoch
from dist2.methods import TEACHER_MAP
from dist2.modeling import build_detector


def build_distill_task(cfg: ExperimentConfig, device):
    """What a worker trains for a distillation run: the student with its adapters and losses (wrapped for data
    parallelism), beside the frozen teacher (not wrapped: it has nothing to synchronise)."""
    require_distill_sections(cfg, "dist2 distill")
    seed_epoch(cfg.seed, -1)
    train_ds, val_ds = build_datasets(cfg.data)
    probe_ds = build_unaugmented_train_dataset(cfg.data)
    teacher, teacher_map = load_teacher(cfg, val_ds, device)
    student = build_detector(cfg.model, cfg.data, train_ds.categories)
    initialise(student, cfg.model)
    distiller = Distiller(student, teacher, cfg.distill).to(device)

    def extra_eval(dataset):
        trained = distiller.adapters["N2N"] if "N2N" in distiller.adapters else None
        return {**teacher_head_metrics(student, teacher, trained, probe_ds, dataset, device, cfg.train.batch_size,
                                     cfg.eval.backend),
                TEACHER_MAP: teacher_map}  # beside the student's, as the paper's tables show it

    # Without the student's own loss its head takes no part in the step, which DDP must be told.
    task = Task(module=distiller, deploy=student, extra_eval=extra_eval,
                ddp_kwargs={"find_unused_parameters": not cfg.distill.student_loss})
    return task, train_ds, val_ds
