"""What one imitation strategy exposes to the distillation losses, for one batch.

X2Y: the student's X features (B = backbone C3-C5, N = neck P3-P7) stand in for the teacher's Y features.
Levels are paired by stride: N2N pairs P3-P7 with P3-P7; the others pair the three stride-8/16/32 levels.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Imitation:
    strategy: str  # "N2N", "B2B", "B2N" or "N2B"
    student: list[Tensor]  # the student's X features, level by level
    injected: list[Tensor]  # f_trans(student X): in the teacher's channel space
    teacher: list[Tensor]  # the teacher's own Y features (no gradient)
    # The teacher's detection loss against the ground truth, {classification, bbox_regression[, bbox_ctrness]},
    # of its remaining layers after Y run on `injected` with autograd on. Computed only for losses that declare
    # `needs_teacher_loss = True` (None otherwise), for all strategies of a batch in one pass.
    teacher_loss: dict[str, Tensor] | None = None


def level_count(strategy: str) -> int:
    return 5 if strategy == "N2N" else 3
