"""FI: the squared error between f_trans(student X) and the teacher's own Y, averaged over every compared element
of the strategy (PAPER.md: L_feat = 1/K ||f_trans(feat_S) - feat_T||², K the number of elements compared).

All levels' elements count alike: for N2N, P3 (stride 8) holds 256× the elements of P7 and weighs 256× more,
as one 1/K over the strategy says (a per-level mean of MSEs would weigh an element of P7 as much as 256 of P3).

YAML: `distill: {method: fi, strategies: [N2N], lambda_feat: 1.0}` (`dist2` adds DI to it).
"""

from torch import Tensor, nn

from dist2.distill.imitation import Imitation


def mean_over_elements(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ over levels of Σ (a - b)² / Σ over levels of the element count."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)) / sum(x.numel() for x in a)


class FeatureImitation(nn.Module):
    def __init__(self, cfg, student_channels, teacher_channels):
        super().__init__()
        self.weight = cfg.lambda_feat

    def forward(self, imitation: Imitation):
        return {f"loss_fi/{imitation.strategy}": self.weight * mean_over_elements(imitation.injected,
                                                                                  imitation.teacher)}
