"""PAD, Prime-Aware Adaptive Distillation (Zhang et al., ECCV 2020): L2 weighted by a learned uncertainty,
mean((t - s)^2 / sigma^2 + log sigma^2), with log sigma^2 predicted from the student feature by a 1x1 conv."""

import torch
from torch import nn

from dist2.distill.imitation import Imitation


class PAD(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.weight = cfg.pad.weight
        self.log_var = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1) for s, t in zip(student_channels, teacher_channels))
        for conv in self.log_var:  # start at sigma^2 = 1: plain L2
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, imitation: Imitation):
        per_level = []
        for branch, s, adapted, t in zip(self.log_var, imitation.student, imitation.injected, imitation.teacher):
            log_var = branch(s)
            per_level.append(((t - adapted) ** 2 * torch.exp(-log_var) + log_var).mean())
        return {"loss_pad": self.weight * sum(per_level) / len(per_level)}
