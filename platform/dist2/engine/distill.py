"""`dist2 distill`: a student trained with a frozen teacher, in one process."""

from __future__ import annotations

import logging

import torch

from dist2.config import ExperimentConfig, load_config
from dist2.data.build import build_datasets
from dist2.data.coco import CocoDetection
from dist2.distill.distiller import Distiller, freeze
from dist2.engine.checkpoint import load_weights
from dist2.engine.loop import Task, fit, resolve_device, seed_epoch
from dist2.errors import UserError
from dist2.evaluation import coco_metrics, evaluate, predict
from dist2.modeling import build_detector
from dist2.modeling.detectors import build_architecture

log = logging.getLogger(__name__)


def load_teacher(cfg: ExperimentConfig, val_ds: CocoDetection, device: torch.device):
    """Build the teacher from its own experiment file, load its checkpoint (exact keys and shapes), and check its
    val mAP against the floor: a teacher that silently failed to load must never be distilled from."""
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
    return teacher


def teacher_head_map(distiller: Distiller, dataset: CocoDetection, device, batch_size: int) -> float:
    """COCO mAP of the teacher's head on f_trans(student neck), N2N: the poster's motivating measurement."""
    was_training = distiller.training
    distiller.eval()
    try:
        results = predict(distiller.teacher_head_detect, dataset, device, batch_size)
        return coco_metrics(dataset.coco, results)["mAP"]
    finally:
        distiller.train(was_training)


def distill(cfg: ExperimentConfig, resume: bool = False) -> dict:
    if cfg.teacher is None or cfg.distill is None:
        raise UserError(f"{cfg.name}: dist2 distill needs the teacher: and distill: sections in the config")
    device = resolve_device(cfg.train.device)
    seed_epoch(cfg.seed, -1)
    train_ds, val_ds = build_datasets(cfg.data)
    teacher = load_teacher(cfg, val_ds, device)
    student = build_detector(cfg.model, cfg.data, train_ds.categories)
    distiller = Distiller(student, teacher, cfg.distill).to(device)
    extra = None
    if "N2N" in distiller.adapters:
        def extra(dataset):
            return {"teacher_head_mAP": teacher_head_map(distiller, dataset, device, cfg.train.batch_size)}
    return fit(cfg, Task(module=distiller, deploy=student, extra_eval=extra), train_ds, val_ds, device, resume=resume)
