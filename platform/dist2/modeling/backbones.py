"""Backbones: ImageNet classifiers cut at strides 8/16/32 (C3, C4, C5) and topped with an FPN of a chosen width.

One registry, `BACKBONES`: name -> function(pretrained, norm_layer, width_mult) -> `Trunk`. Adding a backbone is
one function and one registry line. Importing this module loads neither torch nor torchvision (each builder
imports them when it runs): a config's backbone is checked against the registry, and a mistake elsewhere in the
config is reported without the seconds of loading the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN


@dataclass
class Trunk:
    body: nn.Module  # the module whose named children are run in order
    return_layers: dict[str, str]  # child name -> output key, for C3, C4, C5
    in_channels: list[int]  # channels of C3, C4, C5
    stages: list[str]  # child names from the input side, for freezing the first ones


def _resnet(arch: str) -> Callable[..., Trunk]:
    """torchvision's `arch` (a ResNet or ResNeXt) with its first ImageNet weights (IMAGENET1K_V1)."""
    def build(pretrained: bool, norm_layer, width_mult: float) -> Trunk:
        from torchvision import models

        weights = models.get_model_weights(arch).IMAGENET1K_V1 if pretrained else None
        net = models.get_model(arch, weights=weights, norm_layer=norm_layer)
        c5 = net.fc.in_features
        return Trunk(
            body=net,
            return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
            in_channels=[c5 // 4, c5 // 2, c5],
            stages=["conv1", "layer1", "layer2", "layer3", "layer4"],
        )

    return build


def _resnet10(pretrained: bool, norm_layer, width_mult: float) -> Trunk:
    """A ResNet-18 with one block per stage: a CPU-sized backbone for quick configs and tests."""
    from torchvision import models

    if pretrained:
        raise ValueError("resnet10 has no ImageNet weights")
    net = models.ResNet(models.resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
    return Trunk(net, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512],
                 ["conv1", "layer1", "layer2", "layer3", "layer4"])


def _mobilenet_v2(pretrained: bool, norm_layer, width_mult: float) -> Trunk:
    from torchvision import models

    if pretrained and width_mult != 1.0:
        raise ValueError("mobilenet_v2 ImageNet weights exist only for width_mult 1.0")
    weights = models.MobileNet_V2_Weights.IMAGENET1K_V1 if pretrained else None
    net = models.mobilenet_v2(weights=weights, width_mult=width_mult, norm_layer=norm_layer)
    # Blocks 6, 13 and 17 end the stride-8, -16 and -32 stages (32, 96 and 320 channels at width 1.0).
    channels = [net.features[i].out_channels for i in (6, 13, 17)]
    return Trunk(net.features, {"6": "0", "13": "1", "17": "2"}, channels,
                 ["0", "1", "3", "7", "14"])  # first block of each stride, as ResNet's conv1..layer4


BACKBONES: dict[str, Callable[..., Trunk]] = {
    "resnext101_64x4d": _resnet("resnext101_64x4d"),
    "resnet50": _resnet("resnet50"),
    "resnet18": _resnet("resnet18"),
    "resnet10": _resnet10,
    "mobilenet_v2": _mobilenet_v2,
}


def _freeze_first_stages(trunk: Trunk, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` stages, as torchvision's detection builders do."""
    first_trainable = trunk.stages[len(trunk.stages) - trainable_layers] if trainable_layers else None
    for name, child in trunk.body.named_children():
        if name == first_trainable:
            break
        child.requires_grad_(False)


def build_backbone_fpn(name: str, channels: int, pretrained: bool, trainable_layers: int | None,
                       width_mult: float = 1.0, frozen_bn: bool | None = None) -> BackboneWithFPN:
    """Backbone (C3-C5) + FPN (P3-P7, `channels` wide). P6 and P7 come from P5, so that an injected P5 (B2N)
    drives them the same way the teacher's own P5 does."""
    from torch import nn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    # Pretrained statistics are kept frozen (FrozenBatchNorm), as torchvision does for detection fine-tuning;
    # from scratch the BatchNorm layers learn. `frozen_bn` forces it for weights loaded afterwards (COCO).
    frozen_bn = pretrained if frozen_bn is None else frozen_bn
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    trunk = BACKBONES[name](pretrained, norm_layer, width_mult)
    if trainable_layers is None:
        trainable_layers = 3 if frozen_bn else 5
    _freeze_first_stages(trunk, trainable_layers)
    return BackboneWithFPN(
        trunk.body,
        return_layers=trunk.return_layers,
        in_channels_list=trunk.in_channels,
        out_channels=channels,
        extra_blocks=LastLevelP6P7(channels, channels),
    )
