"""NonLocal: Zhang & Ma, ICLR 2021, "Improve Object Detection with Feature-based Knowledge Distillation: Towards
Accurate and Efficient Detectors" (the authors' code, ArchipLab-LinfengZhang/Object-Detection-Knowledge-
Distillation-ICLR2021, and MMRazor's FBKD port were read for the details). Per level, on the adapted student
feature S = f_trans(student P) and the teacher's T (N, C, H, W), summed over the levels as the source does:

- attention-guided feature loss, `alpha` (source 7e-5): sqrt(Σ (T - S)² · M_s · M_c), with the spatial mask
  M_s = H·W · softmax(mean_c |x| / T) and the channel mask M_c = C · softmax(mean_hw |x| / T) taken from the
  *average* of the teacher's and the student's attention and detached (no gradient through the masks);
- attention transfer, `beta` (source 4e-3 each): L2 distance between the teacher's channel-pooled map
  mean_hw(T) and a linear adaptation of the student's, and between the teacher's spatial map mean_c(T) and a
  3x3-conv adaptation of the student's;
- non-local relation loss, `gamma` (source 7e-5): L2 distance between a non-local block on T and a 1x1
  adaptation of a non-local block on S. The blocks (embedded Gaussian, Wang et al. 2018) max-pool their keys
  and values by a per-level `strides` window (the source's 8, 4, 2, 2, 2 for P3-P7, with C/4 inner channels
  where the window is 4 or more, as its 64 of 256), so P3's attention costs (H·W)²/64 instead of (H·W)², and
  their output conv starts at zero: each block starts as the identity.

Ours: the source's student has the teacher's channel count; ours need not, so every student-side term works on
S = f_trans(student), the run's N2N adapter (the source's `adaptation_layers`). The three adaptation layers
start as the identity (the source leaves them random) so that identical features give a zero loss from step 0.
Both masks weight the feature loss as the paper writes it (the source's code applies the spatial one only).

YAML: `distill: {method: nonlocal, strategies: [N2N], nonlocal: {alpha: 7.0e-5, beta: 4.0e-3, gamma: 7.0e-5,
temperature: 0.5, strides: [8, 4, 2, 2, 2]}}`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dist2.distill.imitation import Imitation


def attention(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial (N,1,H,W), channel (N,C,1,1)) attention of a feature map, each scaled to mean 1."""
    n, c, h, w = x.shape
    magnitude = x.abs()
    spatial = F.softmax(magnitude.mean(dim=1).reshape(n, -1) / temperature, dim=1).reshape(n, 1, h, w) * (h * w)
    channel = F.softmax(magnitude.mean(dim=(2, 3)) / temperature, dim=1).reshape(n, c, 1, 1) * c
    return spatial, channel


def attention_masks(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """The feature loss's masks: the mean of the student's and the teacher's attention, detached."""
    (s_spatial, s_channel), (t_spatial, t_channel) = attention(student, temperature), attention(teacher, temperature)
    return ((s_spatial + t_spatial) / 2).detach(), ((s_channel + t_channel) / 2).detach()


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block with max-pooled keys and values and a zero-initialised output conv."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        inner = max(1, channels // (4 if stride >= 4 else 2))
        self.theta, self.phi, self.g = (nn.Conv2d(channels, inner, 1) for _ in range(3))
        self.stride = stride
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        # Levels smaller than the window (P7 of a small image) keep every position.
        return F.max_pool2d(x, self.stride) if min(x.shape[-2:]) >= self.stride > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # N, HW, C'
        key = self._pool(self.phi(x)).flatten(2)  # N, C', HW/stride²
        value = self._pool(self.g(x)).flatten(2).transpose(1, 2)  # N, HW/stride², C'
        y = torch.softmax(query @ key, dim=-1) @ value
        return x + self.out(y.transpose(1, 2).reshape(n, -1, h, w))


def _identity_conv(channels: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[range(channels), range(channels), kernel // 2, kernel // 2] = 1.0
        conv.bias.zero_()
    return conv


class LevelModules(nn.Module):
    """The trained parts of one level: both non-local blocks and the student's three adaptation layers."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.teacher_block, self.student_block = NonLocalBlock(channels, stride), NonLocalBlock(channels, stride)
        self.channel_adapt = nn.Linear(channels, channels)
        with torch.no_grad():
            self.channel_adapt.weight.copy_(torch.eye(channels))
            self.channel_adapt.bias.zero_()
        self.spatial_adapt = _identity_conv(1, 3)
        self.relation_adapt = _identity_conv(channels, 1)


class NonLocal(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.cfg = cfg.nonlocal_
        self.levels = nn.ModuleList(LevelModules(t, stride)
                                    for t, stride in zip(teacher_channels, self.cfg.strides, strict=True))

    def forward(self, imitation: Imitation):
        c = self.cfg
        feat = att = rel = 0.0
        for s, t, m in zip(imitation.injected, imitation.teacher, self.levels, strict=True):
            spatial_mask, channel_mask = attention_masks(s, t, c.temperature)
            # (clamped: the square root's gradient is infinite at exactly zero)
            feat = feat + ((t - s) ** 2 * spatial_mask * channel_mask).sum().clamp_min(1e-12).sqrt()
            att = att + torch.dist(t.mean(dim=(2, 3)), m.channel_adapt(s.mean(dim=(2, 3)))) \
                + torch.dist(t.mean(dim=1, keepdim=True), m.spatial_adapt(s.mean(dim=1, keepdim=True)))
            rel = rel + torch.dist(m.teacher_block(t), m.relation_adapt(m.student_block(s)))
        return {"loss_nonlocal/feat": c.alpha * feat, "loss_nonlocal/attention": c.beta * att,
                "loss_nonlocal/relation": c.gamma * rel}
