"""Hint (Chen et al., NeurIPS 2017, after FitNets): L2 between the adapted student feature and the teacher's."""

from torch import nn

from dist2.distill.imitation import Imitation
from dist2.distill.losses.fi import mean_level_mse


class Hint(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.weight = cfg.hint.weight

    def forward(self, imitation: Imitation):
        return {"loss_hint": self.weight * mean_level_mse(imitation.injected, imitation.teacher)}
