"""NonLocal: Zhang & Ma, ICLR 2021, "Improve Object Detection with Feature-based Knowledge Distillation".

Three terms per level, on the adapted student feature S and the teacher feature T (N, C, H, W):
- attention-masked feature loss: sum(M_s * M_c * (T - S)^2), masks from the teacher's spatial and channel
  attention (softmax of mean |feature| with temperature), scaled by H*W*C so that it is a mean;
- attention transfer: L1 between the student's and the teacher's spatial and channel attention;
- non-local relation loss: L2 between the outputs of a non-local block on each side (both blocks are trained
  with the student and start identical, so identical features give zero loss).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dist2.distill.imitation import Imitation


def _attention(x, temperature):
    n, c, h, w = x.shape
    mag = x.abs()
    spatial = F.softmax(mag.mean(dim=1).reshape(n, -1) / temperature, dim=1).reshape(n, 1, h, w)
    channel = F.softmax(mag.mean(dim=(2, 3)) / temperature, dim=1).reshape(n, c, 1, 1)
    return spatial, channel


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., 2018) with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 2)
        self.theta, self.phi, self.g = (nn.Conv2d(channels, inner, 1) for _ in range(3))
        self.out = nn.Conv2d(inner, channels, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)
        k = self.phi(x).flatten(2)
        v = self.g(x).flatten(2).transpose(1, 2)
        y = torch.softmax(q @ k, dim=-1) @ v
        return x + self.out(y.transpose(1, 2).reshape(n, -1, h, w))


class NonLocal(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.cfg = cfg.nonlocal_
        self.teacher_blocks = nn.ModuleList(NonLocalBlock(t) for t in teacher_channels)
        self.student_blocks = copy.deepcopy(self.teacher_blocks)

    def forward(self, imitation: Imitation):
        c = self.cfg
        feat = att = rel = 0.0
        levels = zip(imitation.injected, imitation.teacher, self.student_blocks, self.teacher_blocks)
        for s, t, s_block, t_block in levels:
            s_spatial, s_channel = _attention(s, c.temperature)
            t_spatial, t_channel = _attention(t, c.temperature)
            n, ch, h, w = t.shape
            # The masks sum to 1 over H*W and over C: scale them back to mean 1.
            mask = (t_spatial * h * w) * (t_channel * ch)
            feat = feat + (mask * (t - s) ** 2).mean()
            att = att + (s_spatial - t_spatial).abs().sum() / n + (s_channel - t_channel).abs().sum() / n
            rel = rel + F.mse_loss(s_block(s), t_block(t))
        levels = len(imitation.teacher)
        return {
            "loss_nonlocal/feat": c.alpha * feat / levels,
            "loss_nonlocal/attention": c.beta * att / levels,
            "loss_nonlocal/relation": c.gamma * rel / levels,
        }
