"""The frozen teacher a distillation run needs: built from its own experiment file, its checkpoint loaded with
exact keys and shapes, and its val mAP checked against a floor."""

from __future__ import annotations

import logging

import torch

from dist2.checkpoint import load_weights
from dist2.config import ExperimentConfig, load_config
from dist2.data.coco import CocoDetection
from dist2.distill.distiller import freeze
from dist2.errors import UserError
from dist2.evaluation import evaluate
from dist2.modeling.detectors import build_architecture

log = logging.getLogger(__name__)


def frozen_teacher(cfg: ExperimentConfig, num_classes: int, device: torch.device):
    """The teacher built from its own experiment file, its checkpoint loaded (exact keys and shapes), frozen."""
    teacher_cfg = load_config(cfg.teacher.config)
    if teacher_cfg.model.detector != cfg.model.detector:
        raise UserError(f"teacher.config: {cfg.teacher.config} is a {teacher_cfg.model.detector} teacher but the "
                        f"student is {cfg.model.detector}; DI runs the teacher's head, so they must match")
    teacher = build_architecture(teacher_cfg.model, cfg.data, num_classes, download=False)
    load_weights(teacher, cfg.teacher.checkpoint)
    return freeze(teacher.to(device))


def load_teacher(cfg: ExperimentConfig, val_ds: CocoDetection, device: torch.device):
    """The frozen teacher with its val mAP checked against the floor: a teacher that silently failed to load must
    never be distilled from. Returns (the frozen teacher, its val mAP)."""
    teacher = frozen_teacher(cfg, len(val_ds.categories), device)
    score = evaluate(teacher, val_ds, device, cfg.train.batch_size, cfg.eval.backend)["mAP"]
    if not score >= cfg.teacher.min_mAP:
        raise UserError(f"teacher.checkpoint: {cfg.teacher.checkpoint} scores {score:.2f} mAP on the val set, below "
                        f"teacher.min_mAP = {cfg.teacher.min_mAP}; is it the right checkpoint for "
                        f"{cfg.teacher.config}?")
    log.info("teacher %s: %.2f mAP on the val set", cfg.teacher.checkpoint, score)
    return teacher, score


def require_distill_sections(cfg: ExperimentConfig, what: str) -> None:
    if cfg.teacher is None or cfg.distill is None:
        raise UserError(f"{cfg.name}: {what} needs the teacher: and distill: sections in the config")
