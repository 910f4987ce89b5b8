"""DI: the teacher's own detection loss on predictions its remaining layers make from f_trans(student X).

The teacher's weights are frozen but autograd runs through them, so the gradient reaches f_trans and the student.
"""

from torch import nn

from dist2.distill.imitation import Imitation


class DetectionImitation(nn.Module):
    needs_teacher_loss = True

    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.weight = cfg.lambda_di

    def forward(self, imitation: Imitation):
        return {f"loss_di/{imitation.strategy}": self.weight * sum(imitation.teacher_loss.values())}
