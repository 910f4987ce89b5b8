"""PAD, Prime-Aware Adaptive Distillation (Zhang et al., ECCV 2020): L2 weighted by a learned uncertainty,
mean((t - s)^2 / sigma^2 + log sigma^2), with log sigma^2 predicted from the student feature by a 1x1 conv.

Ours: log sigma^2 is clamped to [-LOG_VAR_LIMIT, LOG_VAR_LIMIT]. Unclamped, where the residual goes to zero the
loss is unbounded below (log sigma^2 -> -inf) and the branch can drive the total loss without bound.

YAML: `distill: {method: pad, strategies: [N2N], pad: {weight: 1.0}}`.
"""

import torch
from torch import nn

from dist2.distill.imitation import Imitation

LOG_VAR_LIMIT = 5.0  # sigma^2 within [e^-5, e^5] ~ [0.0067, 148]


class PAD(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.weight = cfg.pad.weight
        self.log_var = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1)
                                     for s, t in zip(student_channels, teacher_channels, strict=True))
        for conv in self.log_var:  # start at sigma^2 = 1: plain L2
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, imitation: Imitation):
        per_level = []
        levels = zip(self.log_var, imitation.student, imitation.injected, imitation.teacher, strict=True)
        for branch, s, adapted, t in levels:
            log_var = branch(s).clamp(-LOG_VAR_LIMIT, LOG_VAR_LIMIT)
            per_level.append(((t - adapted) ** 2 * torch.exp(-log_var) + log_var).mean())
        return {"loss_pad": self.weight * sum(per_level) / len(per_level)}
