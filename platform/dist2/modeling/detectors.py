"""FCOS and RetinaNet from torchvision, opened up into the stages that distillation needs.

`Dist2FCOS` and `Dist2RetinaNet` *are* torchvision's FCOS and RetinaNet (same modules, same state_dict keys,
same `forward`), plus the stages a distiller composes:

    preprocess  images -> ImageList (normalised, resized, batched)
    backbone    ImageList.tensors -> [C3, C4, C5]            (strides 8, 16, 32)
    neck        [C3, C4, C5] -> [P3, P4, P5, P6, P7]          (strides 8 ... 128)
    head        [P3..P7] -> raw outputs {cls_logits, bbox_regression[, bbox_ctrness]}
    match       ground truth -> anchor/point assignment       (shared by every head run on the same levels)
    loss        raw outputs + assignment -> named loss terms
    detect      raw outputs -> boxes, scores, labels in original image coordinates

tests/test_detectors.py proves that composing them reproduces torchvision's own forward exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FCOS_ResNet50_FPN_Weights, RetinaNet, RetinaNet_ResNet50_FPN_Weights
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen

from dist2.config import TORCHVISION_HEAD_CONVS, DataConfig, ModelConfig
from dist2.errors import UserError
from dist2.modeling.backbones import build_backbone_fpn


class _CaptureMatches:
    """Stands in for a head so that torchvision's own matching code can be run on its own."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        return matched_idxs


class StagedDetector:
    """The stage interface shared by Dist2FCOS and Dist2RetinaNet (a mixin over the torchvision class)."""

    def preprocess(self, images: list[Tensor], targets=None):
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        return image_list, targets, original_sizes

    def backbone_stage(self, x: Tensor) -> list[Tensor]:
        return list(self.backbone.body(x).values())

    def neck_stage(self, c_feats: list[Tensor]) -> list[Tensor]:
        return list(self.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(c_feats))).values())

    def extra_levels(self, p345: list[Tensor]) -> list[Tensor]:
        """P3-P5 -> P3-P7, with the FPN's own extra-level block (P6 and P7 are computed from P5)."""
        levels, _ = self.backbone.fpn.extra_blocks(list(p345), list(p345), ["0", "1", "2"])
        return levels

    def head_stage(self, p_feats: list[Tensor]) -> dict[str, Tensor]:
        return self.head(p_feats)

    def anchors(self, images: ImageList, p_feats: list[Tensor]) -> list[Tensor]:
        return self.anchor_generator(images, p_feats)

    def match(self, targets, anchors: list[Tensor], p_feats: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def loss_stage(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    def detect(self, head_outputs, anchors, p_feats, images: ImageList, original_sizes) -> list[dict[str, Tensor]]:
        # Mirrors the eval branch of torchvision's forward: split the flat outputs per level, decode, NMS,
        # then map boxes back to the original image size.
        hw_per_level = [x.size(2) * x.size(3) for x in p_feats]
        per_location = head_outputs["cls_logits"].size(1) // sum(hw_per_level)
        per_level = [hw * per_location for hw in hw_per_level]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

    def staged_forward(self, images: list[Tensor], targets=None):
        """torchvision's forward, spelled out stage by stage: losses in train mode, detections in eval mode."""
        image_list, targets, original_sizes = self.preprocess(images, targets)
        p_feats = self.neck_stage(self.backbone_stage(image_list.tensors))
        outputs = self.head_stage(p_feats)
        anchors = self.anchors(image_list, p_feats)
        if self.training:
            return self.loss_stage(targets, outputs, anchors, self.match(targets, anchors, p_feats))
        return self.detect(outputs, anchors, p_feats, image_list, original_sizes)


class Dist2FCOS(StagedDetector, FCOS):
    def match(self, targets, anchors, p_feats):
        proxy = SimpleNamespace(head=_CaptureMatches(), center_sampling_radius=self.center_sampling_radius)
        num_anchors_per_level = [x.size(2) * x.size(3) for x in p_feats]
        return FCOS.compute_loss(proxy, targets, {}, anchors, num_anchors_per_level)


class Dist2RetinaNet(StagedDetector, RetinaNet):
    def match(self, targets, anchors, p_feats):
        proxy = SimpleNamespace(head=_CaptureMatches(), proposal_matcher=self.proposal_matcher)
        return RetinaNet.compute_loss(proxy, targets, {}, anchors)


DETECTORS = {"fcos": Dist2FCOS, "retinanet": Dist2RetinaNet}
COCO_WEIGHTS = {"fcos": FCOS_ResNet50_FPN_Weights.COCO_V1, "retinanet": RetinaNet_ResNet50_FPN_Weights.COCO_V1}


def remap_coco_classifier(state_dict: dict, category_ids: list[int], num_anchors: int) -> dict:
    """Keep the rows of torchvision's COCO classifier (indexed by COCO category id, 91 classes) that belong to
    our contiguous labels, in our order. RetinaNet's rows are laid out anchor-major: row = a * 91 + class."""
    key = "head.classification_head.cls_logits"
    weight, bias = state_dict[f"{key}.weight"], state_dict[f"{key}.bias"]
    num_coco = weight.shape[0] // num_anchors
    rows = torch.tensor([a * num_coco + c for a in range(num_anchors) for c in category_ids])
    return {**state_dict, f"{key}.weight": weight[rows], f"{key}.bias": bias[rows]}


def _load_coco_weights(model: StagedDetector, detector: str, categories: dict[int, str]) -> None:
    weights = COCO_WEIGHTS[detector]
    coco_names = weights.meta["categories"]
    for cat_id, name in categories.items():
        if not 0 < cat_id < len(coco_names) or coco_names[cat_id] != name:
            raise UserError(f"model.weights: 'coco' needs COCO's own categories; category {cat_id} {name!r} "
                            "is not one of them (use backbone_weights: imagenet instead)")
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:
        raise UserError(f"model.weights: cannot fetch torchvision's COCO {detector} weights ({exc})") from None
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    model.load_state_dict(remap_coco_classifier(state, list(categories), num_anchors))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also normalises a single image whose group holds one value, which torch refuses ("Expected
    more than 1 value per channel") though it is well defined (the value normalises to 0: the output is the bias)
    and passes as soon as a second image shares the batch. A 32-channel head on a 128-pixel image has a 1x1 P7
    with one channel per group, so without it one image alone could not be detected."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def _single_image_group_norms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is nn.GroupNorm:  # torchvision's FCOS head builds its own
            module.__class__ = GroupNorm
    return model


def build_architecture(model_cfg: ModelConfig, data_cfg: DataConfig, num_classes: int,
                       download: bool = True) -> StagedDetector:
    """The detector with freshly initialised (or ImageNet-backbone) weights. download=False builds the same
    architecture without fetching ImageNet weights, for a model whose checkpoint is loaded next."""
    imagenet = model_cfg.backbone_weights == "imagenet" and model_cfg.weights is None
    try:
        backbone = build_backbone_fpn(model_cfg.backbone, model_cfg.channels, imagenet and download,
                                      model_cfg.trainable_backbone_layers, model_cfg.width_mult,
                                      frozen_bn=imagenet or model_cfg.weights == "coco")
    except ValueError as exc:
        raise UserError(f"model.backbone: {exc}") from None
    except OSError as exc:  # no network, or a corrupt download
        raise UserError(f"model.backbone_weights: cannot fetch torchvision's ImageNet weights for "
                        f"{model_cfg.backbone} ({exc}); set backbone_weights: null to train from scratch") from None
    extra = {}
    if model_cfg.detector == "retinanet" and model_cfg.weights is None:
        # The RetinaNet head with GroupNorm (torchvision's "v2" head) trains from scratch, where the original
        # unnormalised head barely moves in the first epochs. COCO weights come with the original head.
        anchors = _default_anchorgen().num_anchors_per_location()[0]
        extra["head"] = RetinaNetHead(model_cfg.channels, anchors, num_classes, norm_layer=partial(nn.GroupNorm, 32))
        for branch in (extra["head"].classification_head, extra["head"].regression_head):
            branch.conv = branch.conv[:model_cfg.head_convs]  # one Conv2dNormActivation per convolution
    elif model_cfg.detector == "fcos" and model_cfg.head_convs != TORCHVISION_HEAD_CONVS:
        # torchvision builds its own FCOS head at the default depth. FCOS predicts from one point per feature
        # location: one "anchor".
        extra["head"] = FCOSHead(model_cfg.channels, 1, num_classes, num_convs=model_cfg.head_convs)
    return _single_image_group_norms(DETECTORS[model_cfg.detector](
        backbone,
        num_classes=num_classes,
        min_size=data_cfg.test_size,
        max_size=data_cfg.max_size,
        score_thresh=model_cfg.score_thresh,
        nms_thresh=model_cfg.nms_thresh,
        detections_per_img=model_cfg.detections_per_img,
        # Training images are already resized by the data pipeline (transforms.v2); eval images are resized
        # here, so that predictions come back in original image coordinates for COCO evaluation.
        _skip_resize=True,
        **extra,
    ))


def build_detector(model_cfg: ModelConfig, data_cfg: DataConfig, categories: dict[int, str]) -> StagedDetector:
    """A detector for the dataset's categories ({category id: name}, in label order), with the weights the
    config asks for: drawn from torch's global generator, or from `model.init_seed` without touching it."""
    if model_cfg.init_seed is None:
        model = build_architecture(model_cfg, data_cfg, len(categories))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.init_seed)
            model = build_architecture(model_cfg, data_cfg, len(categories))
    if model_cfg.weights == "coco":
        _load_coco_weights(model, model_cfg.detector, categories)
    return model
