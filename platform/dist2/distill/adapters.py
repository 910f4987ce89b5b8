"""f_trans: per-level learned 1x1 convolutions from the student's channels to the teacher's."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Adapter(nn.Module):
    def __init__(self, student_channels: list[int], teacher_channels: list[int]):
        super().__init__()
        self.levels = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1)
                                    for s, t in zip(student_channels, teacher_channels, strict=True))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [conv(f) for conv, f in zip(self.levels, feats, strict=True)]

    @torch.no_grad()
    def identity_(self) -> "Adapter":
        """Make every level the identity map (student and teacher channels must agree): self-distillation."""
        for conv in self.levels:
            if conv.in_channels != conv.out_channels:
                raise ValueError("an identity adapter needs equal student and teacher channels")
            conv.weight.copy_(torch.eye(conv.in_channels)[:, :, None, None])
            conv.bias.zero_()
        return self
