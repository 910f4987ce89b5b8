"""`dist2 distill`: what a worker trains for a distillation run, and the teacher it needs."""

from __future__ import annotations

import logging

import torch

from dist2.config import ExperimentConfig, load_config
from dist2.data.build import build_datasets
from dist2.data.coco import CocoDetection
from dist2.distill.adapters import Adapter
from dist2.distill.distiller import Distiller, freeze, level_channels
from dist2.distill.teacher_head import teacher_head_metrics
from dist2.engine import checkpoint
from dist2.engine.checkpoint import load_weights
from dist2.engine.loop import Task, resolve_device, seed_epoch
from dist2.errors import UserError
from dist2.evaluation import evaluate
from dist2.modeling import build_detector
from dist2.modeling.detectors import build_architecture

log = logging.getLogger(__name__)


def load_teacher(cfg: ExperimentConfig, val_ds: CocoDetection, device: torch.device):
    """Build the teacher from its own experiment file, load its checkpoint (exact keys and shapes), and check its
    val mAP against the floor: a teacher that silently failed to load must never be distilled from.
    Returns (the frozen teacher, its val mAP)."""
    teacher_cfg = load_config(cfg.teacher.config)
    if teacher_cfg.model.detector != cfg.model.detector:
        raise UserError(f"teacher.config: {cfg.teacher.config} is a {teacher_cfg.model.detector} teacher but the "
                        f"student is {cfg.model.detector}; DI runs the teacher's head, so they must match")
    teacher = build_architecture(teacher_cfg.model, cfg.data, len(val_ds.categories), download=False)
    load_weights(teacher, cfg.teacher.checkpoint)
    teacher = freeze(teacher.to(device))
    score = evaluate(teacher, val_ds, device, cfg.train.batch_size)["mAP"]
    if not score >= cfg.teacher.min_mAP:
        raise UserError(f"teacher.checkpoint: {cfg.teacher.checkpoint} scores {score:.2f} mAP on the val set, below "
                        f"teacher.min_mAP = {cfg.teacher.min_mAP}; is it the right checkpoint for "
                        f"{cfg.teacher.config}?")
    log.info("teacher %s: %.2f mAP on the val set", cfg.teacher.checkpoint, score)
    return teacher, score


def _require_distill_sections(cfg: ExperimentConfig, what: str) -> None:
    if cfg.teacher is None or cfg.distill is None:
        raise UserError(f"{cfg.name}: {what} needs the teacher: and distill: sections in the config")


def evaluate_with_teacher_head(cfg: ExperimentConfig, path) -> dict[str, float]:
    """`dist2 eval CONFIG --checkpoint PATH --teacher-head`: the student's COCO metrics, teacher_head_probe_mAP, and
    teacher_head_mAP when the checkpoint (a distillation resume state) brings its trained N2N adapter."""
    _require_distill_sections(cfg, "--teacher-head")
    device = resolve_device(cfg.train.device)
    train_ds, val_ds = build_datasets(cfg.data)
    teacher, _ = load_teacher(cfg, val_ds, device)
    student = build_detector(cfg.model, cfg.data, val_ds.categories)
    load_weights(student, path)
    student.to(device)
    state = checkpoint.load(path).get("model", {})
    trained = {k.removeprefix("adapters.N2N."): v for k, v in state.items() if k.startswith("adapters.N2N.")}
    adapter = None
    if trained:
        adapter = Adapter(level_channels(student, "N"), level_channels(teacher, "N"))
        adapter.load_state_dict(trained)
        adapter.to(device)
    metrics = evaluate(student, val_ds, device, cfg.train.batch_size)
    return {**metrics, **teacher_head_metrics(student, teacher, adapter, train_ds, val_ds, device,
                                              cfg.train.batch_size)}


def build_distill_task(cfg: ExperimentConfig, device):
    """What a worker trains for a distillation run: the student with its adapters and losses (wrapped for data
    parallelism), beside the frozen teacher (not wrapped: it has nothing to synchronise)."""
    _require_distill_sections(cfg, "dist2 distill")
    seed_epoch(cfg.seed, -1)
    train_ds, val_ds = build_datasets(cfg.data)
    teacher, teacher_map = load_teacher(cfg, val_ds, device)
    student = build_detector(cfg.model, cfg.data, train_ds.categories)
    distiller = Distiller(student, teacher, cfg.distill).to(device)

    def extra_eval(dataset):
        trained = distiller.adapters["N2N"] if "N2N" in distiller.adapters else None
        return {**teacher_head_metrics(student, teacher, trained, train_ds, dataset, device, cfg.train.batch_size),
                "teacher_mAP": teacher_map}  # beside the student's, as the paper's tables show it

    # Without the student's own loss its head takes no part in the step, which DDP must be told.
    task = Task(module=distiller, deploy=student, extra_eval=extra_eval,
                ddp_kwargs={"find_unused_parameters": not cfg.distill.student_loss})
    return task, train_ds, val_ds
