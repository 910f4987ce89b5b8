"""The distillation loss registry: a new loss is one file in this folder plus one line here (and a method that
uses it, one line in `dist2.methods.METHODS`).

Every loss is an nn.Module built as `Loss(cfg: DistillConfig, student_channels, teacher_channels)` (channels
of the levels it will see) and called as `loss(imitation) -> {term name: weighted scalar}`; its parameters, if
any, are trained with the student. A loss that needs the teacher's detection loss on the injected features (as
DI does) sets the class attribute `needs_teacher_loss = True`.
"""

from dist2.distill.losses.di import DetectionImitation
from dist2.distill.losses.fi import FeatureImitation
from dist2.distill.losses.nonlocal_kd import NonLocal
from dist2.distill.losses.pad import PAD

LOSSES = {
    "fi": FeatureImitation,
    "di": DetectionImitation,
    "pad": PAD,
    "nonlocal": NonLocal,
}
