"""The poster's motivating measurement: COCO mAP of the teacher's head run on f_trans(student P3-P7) (N2N).
Feature imitation alone can make the features close while this stays near zero. Two measures, never mixed:

- `teacher_head_probe_mAP`, for every run that has a teacher (the student baseline and every method): f_trans is
  a least-squares probe, the per-level 1x1 convolution that maps the student's neck to the teacher's, fitted on
  the first training images (unaugmented, so the fit is the same during training and in `dist2 eval`) once per
  evaluation. The same procedure for every run: rows are comparable.
- `teacher_head_mAP`, only for a run that trains its own N2N adapter (FI, DI, Dist2 with N2N): f_trans is that
  adapter. DI-N2N trains it *through* the teacher's head, so it scores high by construction; read it as what
  the run itself achieved, not as a comparison across methods.
Either way the teacher's head is untouched.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dist2 import checkpoint
from dist2.checkpoint import load_weights
from dist2.config import ExperimentConfig
from dist2.data.build import build_unaugmented_train_dataset, build_val_dataset
from dist2.data.coco import CocoDetection, collate
from dist2.data.loader import same_size_batches
from dist2.distill.adapters import Adapter
from dist2.distill.distiller import level_channels
from dist2.distill.teacher import frozen_teacher, load_teacher, require_distill_sections
from dist2.distributed import resolve_device
from dist2.evaluation import evaluate, evaluate_detections
from dist2.methods import PROBE_METRIC, TRAINED_METRIC
from dist2.modeling import build_detector
from dist2.modeling.detectors import StagedDetector


def _neck(model: StagedDetector, images):
    image_list, _, original_sizes = model.preprocess(images)
    return model.neck_stage(model.backbone_stage(image_list.tensors)), image_list, original_sizes


@torch.no_grad()
def fit_linear_probe(student: StagedDetector, teacher: StagedDetector, dataset: CocoDetection,
                     device: torch.device, num_images: int = 64, batch_size: int = 8) -> Adapter:
    """Least-squares per-level 1x1 conv from the student's P3-P7 to the teacher's, over `num_images` images."""
    was_training = student.training
    student.eval()
    batches = same_size_batches(dataset, batch_size, range(min(num_images, len(dataset))))
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    gram = cross = None
    for images, _ in loader:
        images = [img.to(device) for img in images]
        s_feats, _, _ = _neck(student, images)
        t_feats, _, _ = _neck(teacher, images)
        xs = [torch.cat([s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]),
                         s.new_ones(s.shape[0] * s.shape[2] * s.shape[3], 1)], dim=1).double() for s in s_feats]
        ys = [t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double() for t in t_feats]
        g = [x.T @ x for x in xs]
        c = [x.T @ y for x, y in zip(xs, ys, strict=True)]
        gram = g if gram is None else [a + b for a, b in zip(gram, g, strict=True)]
        cross = c if cross is None else [a + b for a, b in zip(cross, c, strict=True)]
    adapter = Adapter([s.shape[1] for s in s_feats], [t.shape[1] for t in t_feats]).to(device)
    for conv, g, c in zip(adapter.levels, gram, cross, strict=True):
        ridge = 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        w = torch.linalg.solve(g + ridge, c)  # (Cs + 1) x Ct
        conv.weight.copy_(w[:-1].T[:, :, None, None].float())
        conv.bias.copy_(w[-1].float())
    student.train(was_training)
    return adapter


@torch.no_grad()
def teacher_head_detect(student: StagedDetector, teacher: StagedDetector, adapter: Adapter, images):
    p_feats, image_list, original_sizes = _neck(student, images)
    p_feats = adapter(p_feats)
    outputs = teacher.head_stage(p_feats)
    return teacher.detect(outputs, teacher.anchors(image_list, p_feats), p_feats, image_list, original_sizes)


def teacher_head_map(student: StagedDetector, teacher: StagedDetector, adapter: Adapter, dataset: CocoDetection,
                     device: torch.device, batch_size: int, backend: str) -> float:
    modes = student.training, adapter.training
    student.eval(), adapter.eval()
    try:
        return evaluate_detections(lambda imgs: teacher_head_detect(student, teacher, adapter, imgs), dataset,
                                   device, batch_size, backend)["mAP"]
    finally:
        student.train(modes[0]), adapter.train(modes[1])


def teacher_head_metrics(student: StagedDetector, teacher: StagedDetector, trained: Adapter | None,
                         probe_ds: CocoDetection, val_ds: CocoDetection, device: torch.device,
                         batch_size: int, backend: str) -> dict[str, float]:
    """{PROBE_METRIC: ...} for every run, plus {TRAINED_METRIC: ...} with the run's trained N2N adapter. The probe
    is fitted on `probe_ds`: training images without augmentation (`build_unaugmented_train_dataset`)."""
    probe = fit_linear_probe(student, teacher, probe_ds, device)
    metrics = {PROBE_METRIC: teacher_head_map(student, teacher, probe, val_ds, device, batch_size, backend)}
    if trained is not None:
        metrics[TRAINED_METRIC] = teacher_head_map(student, teacher, trained, val_ds, device, batch_size, backend)
    return metrics


def load_student_with_teacher(cfg: ExperimentConfig, path, device: torch.device, check_teacher: bool = True):
    """A distillation run's student from `path` (model.pth or resume.pth), its frozen teacher (its val mAP checked
    against teacher.min_mAP with `check_teacher`, as a distillation run does), and the student's own trained N2N
    adapter when the checkpoint (a resume state) brings one, else None."""
    require_distill_sections(cfg, "--teacher-head")
    val_ds = build_val_dataset(cfg.data)
    teacher = load_teacher(cfg, val_ds, device)[0] if check_teacher else \
        frozen_teacher(cfg, len(val_ds.categories), device)
    student = build_detector(cfg.model, cfg.data, val_ds.categories)
    load_weights(student, path)
    student.to(device)
    state = checkpoint.load(path).get("model", {})
    trained = {k.removeprefix("adapters.N2N."): v for k, v in state.items() if k.startswith("adapters.N2N.")}
    adapter = None
    if trained:
        adapter = Adapter(level_channels(student, "N"), level_channels(teacher, "N"))
        adapter.load_state_dict(trained)
        adapter.to(device)
    return student, teacher, adapter, val_ds


def teacher_head_detector(cfg: ExperimentConfig, path, device: torch.device):
    """`detect(images)` of the teacher's head on the student's neck, through the run's trained N2N adapter where
    the checkpoint has one, else the probe (the rule of the teacher-head metrics); and which of the two it is."""
    # Pictures, not a distillation: the teacher's weights must fit exactly, its val mAP need not be measured.
    student, teacher, adapter, _ = load_student_with_teacher(cfg, path, device, check_teacher=False)
    which = TRAINED_METRIC
    if adapter is None:
        adapter = fit_linear_probe(student, teacher, build_unaugmented_train_dataset(cfg.data), device)
        which = PROBE_METRIC
    student.eval(), adapter.eval()
    return (lambda images: teacher_head_detect(student, teacher, adapter, images)), which


def evaluate_with_teacher_head(cfg: ExperimentConfig, path) -> dict[str, float]:
    """`dist2 eval CONFIG --checkpoint PATH --teacher-head`: the student's COCO metrics, teacher_head_probe_mAP, and
    teacher_head_mAP when the checkpoint (a distillation resume state) brings its trained N2N adapter."""
    device = resolve_device(cfg.train.device)
    student, teacher, adapter, val_ds = load_student_with_teacher(cfg, path, device)
    metrics = evaluate(student, val_ds, device, cfg.train.batch_size, cfg.eval.backend, per_class=True)
    probe_ds = build_unaugmented_train_dataset(cfg.data)
    return {**metrics, **teacher_head_metrics(student, teacher, adapter, probe_ds, val_ds, device,
                                              cfg.train.batch_size, cfg.eval.backend)}
