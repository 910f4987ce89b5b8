"""The Distiller: the student, its adapters (f_trans) and distillation losses, beside a frozen teacher.

One forward pass per batch:
  student:  images -> C3-C5 -> P3-P7 -> head -> L_det            (ground-truth matching computed once)
  teacher:  images -> C3-C5 -> P3-P7                              (no grad: the FI targets)
  for each strategy X2Y: injected = f_trans(student X)
      FI  = mse(injected, teacher Y)
      DI  = teacher's detection loss of its layers after Y run on `injected` (autograd through the teacher)
The DI passes of all strategies run through the teacher as one batch (see `teacher_losses`).
The teacher is held outside the module tree: it is never in the state_dict, the optimizer or a DDP wrapper,
stays in eval mode (frozen BatchNorm) and has requires_grad off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dist2.config import DistillConfig
from dist2.distill.adapters import Adapter
from dist2.distill.imitation import Imitation, level_count
from dist2.distill.losses import LOSSES
from dist2.methods import METHODS
from dist2.modeling.detectors import StagedDetector


def freeze(teacher: StagedDetector) -> StagedDetector:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def level_channels(model: StagedDetector, side: str) -> list[int]:
    """Channels of the backbone (B: C3-C5) or neck (N: P3-P7) levels."""
    if side == "B":
        return list(model.backbone.fpn.inner_blocks[i][0].in_channels for i in range(3))
    return [model.backbone.out_channels] * 5


class Distiller(nn.Module):
    def __init__(self, student: StagedDetector, teacher: StagedDetector, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.student = student
        object.__setattr__(self, "teacher", freeze(teacher))  # deliberately not a submodule
        names = METHODS[cfg.method].losses
        self.strategies = cfg.resolved_strategies if names else []
        self.needs_teacher_loss = any(getattr(LOSSES[name], "needs_teacher_loss", False) for name in names)
        self.adapters = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        for strategy in self.strategies:
            n = level_count(strategy)
            s_ch, t_ch = level_channels(student, strategy[0])[:n], level_channels(teacher, strategy[2])[:n]
            self.adapters[strategy] = Adapter(s_ch, t_ch)
            self.losses[strategy] = nn.ModuleDict({name: LOSSES[name](cfg, s_ch, t_ch) for name in names})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # whatever the student does, the teacher's BatchNorm stays frozen
        return self

    def teacher_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            c = self.teacher.backbone_stage(x)
            return c, self.teacher.neck_stage(c)

    def teacher_rest(self, strategy: str, injected: list[Tensor]) -> list[Tensor]:
        """The teacher's layers after Y, from injected Y features to P3-P7."""
        if strategy[2] == "B":
            return self.teacher.neck_stage(injected)  # B2B, N2B: the teacher's own FPN
        if len(injected) == 3:
            return self.teacher.extra_levels(injected)  # B2N: P6, P7 from the injected P5
        return injected  # N2N

    def teacher_losses(self, injected: dict[str, list[Tensor]], targets, anchors, matched) -> dict[str, dict]:
        """strategy -> the teacher's detection loss of its layers after Y run on that strategy's injected features.

        One batched pass instead of one per strategy: strategies that inject at the same place share the teacher's
        remaining layers (B2B and N2B both go through its FPN), and all of them share its head. Batching changes
        nothing but speed, since the frozen teacher normalises each image on its own (eval BatchNorm, GroupNorm).
        """
        groups: dict[tuple, list[str]] = {}
        for strategy in injected:
            groups.setdefault((strategy[2], level_count(strategy)), []).append(strategy)
        p_feats = {}
        for members in groups.values():
            batched = [torch.cat(levels) for levels in zip(*(injected[s] for s in members), strict=True)]
            levels = self.teacher_rest(members[0], batched)
            per_strategy = zip(*(level.chunk(len(members)) for level in levels), strict=True)
            p_feats.update(zip(members, per_strategy, strict=True))
        order = list(injected)
        outputs = self.teacher.head_stage([torch.cat(levels)
                                           for levels in zip(*(p_feats[s] for s in order), strict=True)])
        chunks = {name: value.chunk(len(order)) for name, value in outputs.items()}
        return {s: self.teacher.loss_stage(targets, {name: chunks[name][i] for name in chunks}, anchors, matched)
                for i, s in enumerate(order)}

    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        student = self.student
        image_list, targets, _ = student.preprocess(images, targets)
        x = image_list.tensors
        s_feats = {"B": student.backbone_stage(x)}
        s_feats["N"] = student.neck_stage(s_feats["B"])
        anchors = student.anchors(image_list, s_feats["N"])
        # Target assignment depends only on the ground truth and the level strides, which student and teacher
        # share: compute it once for the student and every DI term.
        matched = student.match(targets, anchors, s_feats["N"])
        losses = {}
        if self.cfg.student_loss:
            out = student.head_stage(s_feats["N"])
            losses.update({f"loss_det/{k}": v for k, v in student.loss_stage(targets, out, anchors, matched).items()})
        if not self.strategies:
            return losses
        t_feats = dict(zip("BN", self.teacher_features(x), strict=True))
        pairs = {}
        for strategy in self.strategies:
            n = level_count(strategy)
            source, target = s_feats[strategy[0]][:n], t_feats[strategy[2]][:n]
            for s, t in zip(source, target, strict=True):  # levels are paired by stride: same spatial size
                if s.shape[-2:] != t.shape[-2:]:
                    raise RuntimeError(f"{strategy}: student level {tuple(s.shape)} vs teacher {tuple(t.shape)}")
            pairs[strategy] = (source, self.adapters[strategy](source), target)
        teacher_loss = {}
        if self.needs_teacher_loss:
            injected = {strategy: pair[1] for strategy, pair in pairs.items()}
            teacher_loss = self.teacher_losses(injected, targets, anchors, matched)
        for strategy, (source, injected, target) in pairs.items():
            imitation = Imitation(strategy, source, injected, target, teacher_loss.get(strategy))
            for loss in self.losses[strategy].values():
                losses.update(loss(imitation))
        return losses
