import math

import pytest
import torch

from dist2.config import DataConfig, ModelConfig
from dist2.data.build import build_datasets
from dist2.modeling import build_detector
from dist2.modeling.detectors import build_architecture, remap_coco_classifier


@pytest.fixture(scope="module")
def batch(synth_root):
    train, _ = build_datasets(DataConfig(root=synth_root, train_sizes=[96], test_size=96, max_size=160))
    samples = [train[i] for i in range(3)]
    return train.categories, [s[0] for s in samples], [s[1] for s in samples]


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
@pytest.mark.parametrize("backbone, width", [("resnet10", 1.0), ("mobilenet_v2", 0.5)])
def test_stages_reproduce_torchvision_forward(batch, detector, backbone, width):
    categories, images, targets = batch
    cfg = ModelConfig(detector=detector, backbone=backbone, channels=32, width_mult=width, score_thresh=0.0)
    torch.manual_seed(0)
    model = build_detector(cfg, DataConfig(test_size=96, max_size=160), categories)
    model.train()
    expected = model(images, targets)
    staged = model.staged_forward(images, targets)
    assert set(staged) == set(expected) == ({"classification", "bbox_regression"} |
                                            ({"bbox_ctrness"} if detector == "fcos" else set()))
    for name in expected:
        torch.testing.assert_close(staged[name], expected[name], rtol=0, atol=0)

    model.eval()
    with torch.no_grad():
        expected_det, staged_det = model(images), model.staged_forward(images)
    assert sum(len(d["boxes"]) for d in expected_det) > 0
    for e, s in zip(expected_det, staged_det, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(s[key], e[key], rtol=0, atol=0)
        assert e["labels"].max() < len(categories)


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
@pytest.mark.parametrize("head_convs", [1, 2])
def test_a_shallower_head_has_that_many_convolutions_and_trains(batch, detector, head_convs):
    categories, images, targets = batch
    cfg = ModelConfig(detector=detector, backbone="mobilenet_v2", channels=32, width_mult=0.5, head_convs=head_convs)
    torch.manual_seed(0)
    model = build_detector(cfg, DataConfig(test_size=96, max_size=160), categories)
    for branch in (model.head.classification_head, model.head.regression_head):
        assert sum(isinstance(m, torch.nn.Conv2d) for m in branch.conv.modules()) == head_convs
    model.train()
    losses = model.staged_forward(images, targets)
    sum(losses.values()).backward()
    first_conv = next(m for m in model.head.classification_head.conv.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


def test_init_seed_fixes_the_initial_weights_whatever_the_run_seed_and_leaves_the_run_rng_alone(batch):
    categories = batch[0]
    data = DataConfig(test_size=96, max_size=160)

    def build(run_seed, init_seed):
        torch.manual_seed(run_seed)
        cfg = ModelConfig(detector="fcos", backbone="mobilenet_v2", channels=32, width_mult=0.25, head_convs=1,
                          init_seed=init_seed)
        weights = build_detector(cfg, data, categories).state_dict()
        return weights, torch.rand(3)  # what the run draws next (image order, augmentation)

    (fixed_a, next_a), (fixed_b, next_b) = build(0, 5), build(1, 5)
    assert all(torch.equal(fixed_a[k], fixed_b[k]) for k in fixed_a)
    (own_a, _), (other_init, _) = build(0, None), build(0, 6)
    assert not all(torch.equal(fixed_a[k], own_a[k]) for k in fixed_a)
    assert not all(torch.equal(fixed_a[k], other_init[k]) for k in fixed_a)
    torch.manual_seed(0)
    assert torch.equal(next_a, torch.rand(3)) and not torch.equal(next_a, next_b)


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_one_image_alone_is_detected_as_in_a_batch_of_its_size(detector):
    """A 32-channel head on a 96-pixel image: P7 is 1x1 with one channel per GroupNorm group, which torch's own
    GroupNorm refuses for a batch of one. Alone, the image gets the detections it gets beside another image of its
    size (evaluation and `dist2 predict` run images alone or in batches of one size)."""
    cfg = ModelConfig(detector=detector, backbone="mobilenet_v2", channels=32, width_mult=0.5, score_thresh=0.0)
    torch.manual_seed(0)
    model = build_detector(cfg, DataConfig(test_size=96, max_size=160), {1: "a", 3: "b"}).eval()
    image, other = torch.rand(3, 96, 96), torch.rand(3, 96, 96)
    with torch.no_grad():
        assert [p.shape[-2:] for p in model.neck_stage(model.backbone_stage(image[None]))][-1] == (1, 1)
        alone, together = model([image])[0], model([image, other])[0]
    assert len(alone["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(alone[key], together[key], rtol=1e-5, atol=1e-4)  # batched convolutions round apart


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_stage_shapes_and_strides(batch, detector):
    categories, images, _ = batch
    model = build_detector(ModelConfig(detector=detector, backbone="resnet10", channels=64),
                           DataConfig(test_size=96, max_size=160), categories).eval()
    image_list, _, _ = model.preprocess(images)
    x = image_list.tensors
    c_feats = model.backbone_stage(x)
    p_feats = model.neck_stage(c_feats)
    assert [f.shape[1] for f in c_feats] == [128, 256, 512]
    assert [f.shape[1] for f in p_feats] == [64] * 5
    strides = [8, 16, 32, 8, 16, 32, 64, 128]
    assert [tuple(f.shape[-2:]) for f in c_feats + p_feats] == [
        (math.ceil(x.shape[-2] / s), math.ceil(x.shape[-1] / s)) for s in strides]


def test_frozen_stages_follow_trainable_layers(batch):
    categories, _, _ = batch
    cfg = ModelConfig(detector="fcos", backbone="resnet10", channels=32, trainable_backbone_layers=2)
    model = build_detector(cfg, DataConfig(), categories)
    trainable = {n.split(".")[2] for n, p in model.backbone.body.named_parameters(prefix="backbone.body")
                 if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_coco_weights_layout_loads_with_remapped_classes(detector):
    """torchvision's COCO detectors (91 classes indexed by COCO id) load into our resnet50/256 build, keeping
    the classifier rows of our categories. Offline, so the weights are torchvision's architecture at random."""
    from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

    factory = fcos_resnet50_fpn if detector == "fcos" else retinanet_resnet50_fpn
    reference = factory(weights=None, weights_backbone=None, num_classes=91)
    # The released checkpoints use FrozenBatchNorm, which has no num_batches_tracked buffers.
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    categories = {1: "person", 3: "car", 90: "toothbrush"}
    cfg = ModelConfig(detector=detector, backbone="resnet50", channels=256, weights="coco")
    model = build_architecture(cfg, DataConfig(), len(categories))  # what build_detector loads them into
    anchors = model.anchor_generator.num_anchors_per_location()[0]
    remapped = remap_coco_classifier(state, list(categories), anchors)
    assert set(remapped) == set(model.state_dict())
    model.load_state_dict(remapped)
    rows = remapped["head.classification_head.cls_logits.weight"]
    full = state["head.classification_head.cls_logits.weight"]
    assert rows.shape[0] == anchors * 3
    torch.testing.assert_close(rows[anchors * 3 - 1], full[(anchors - 1) * 91 + 90])
    torch.testing.assert_close(rows[1], full[3])


def test_unreachable_weights_are_a_clear_error(monkeypatch):
    """Offline (as on CI), asking for ImageNet weights fails with a UserError naming the key, not a traceback."""
    from dist2.errors import UserError

    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")  # no cached weights to fall back on
    for var in ("https_proxy", "HTTPS_PROXY"):  # unreachable even on a machine with a network
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    cfg = ModelConfig(detector="fcos", backbone="resnet18", channels=32, backbone_weights="imagenet")
    with pytest.raises(UserError, match="model.backbone_weights: cannot fetch torchvision's ImageNet weights"):
        build_detector(cfg, DataConfig(), {1: "a"})
