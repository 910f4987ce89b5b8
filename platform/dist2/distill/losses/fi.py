"""FI: mean squared error between f_trans(student X) and the teacher's own Y (PAPER.md, L_feat)."""

import torch.nn.functional as F
from torch import nn

from dist2.distill.imitation import Imitation


def mean_level_mse(a, b):
    return sum(F.mse_loss(x, y) for x, y in zip(a, b)) / len(a)


class FeatureImitation(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.weight = cfg.lambda_feat

    def forward(self, imitation: Imitation):
        return {f"loss_fi/{imitation.strategy}": self.weight * mean_level_mse(imitation.injected, imitation.teacher)}
