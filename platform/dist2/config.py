"""Experiment configs: one YAML file per run, validated into typed objects.

The YAML keys are the names used everywhere downstream (MLflow params, report columns), so nothing is
renamed after this point. `load_config` is the only entry: it reads the file, applies `--set a.b=value`
overrides, validates, and turns every problem into one `UserError` naming the file, the key and what is
allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dist2.config_files import read_experiment
from dist2.errors import UserError
from dist2.methods import (
    ALIASES,
    ALL2ALL,
    COCO_METRICS,
    COCO_RECALLS,
    DEFAULT_EVAL_BACKEND,
    EVAL_BACKENDS,
    METHODS,
    STRATEGIES,
    TEACHER_HEAD_METRICS,
    check_method,
    resolve_alias,
    resolve_strategies,
)

# A distillation method's name: one in dist2.methods (METHODS, or an alias such as hint).
MethodName = Annotated[str, AfterValidator(check_method)]


class Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Strict):
    """The embedded synthetic COCO-format dataset (used when `data.root` is null)."""

    num_train: int = Field(512, ge=1)
    num_val: int = Field(128, ge=1)
    image_size: int = Field(128, ge=64, le=1024)
    seed: int = 0
    # easy | standard | hard: objects per image, overlap, distractors, background clutter (dist2.data.synth)
    difficulty: Literal["easy", "standard", "hard"] = "hard"


class DataConfig(Strict):
    root: Optional[Path] = None  # a COCO-format dataset folder; null = the embedded synthetic dataset
    train_annotations: str = "annotations/instances_train.json"
    train_images: str = "train"
    val_annotations: str = "annotations/instances_val.json"
    val_images: str = "val"
    synth: SynthConfig = SynthConfig()
    # Augmentation (torchvision.transforms.v2, box-aware): the shorter side of a training image is drawn from
    # train_sizes; evaluation resizes to test_size. max_size caps the longer side in both.
    train_sizes: list[int] = Field(default_factory=lambda: [800], min_length=1)
    test_size: int = Field(800, ge=32)
    max_size: int = Field(1333, ge=32)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    num_workers: int = Field(0, ge=0)  # loader processes, kept across epochs (0: load in the training process)
    group_aspect_ratio: bool = False  # batch wide and tall images apart (less padding; the paper configs)

    @field_validator("train_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if any(s < 32 for s in sizes):
            raise ValueError("every training size must be >= 32 pixels")
        return sizes

    @model_validator(mode="after")
    def _paths_exist(self) -> "DataConfig":
        if self.root is None:
            return self
        if not self.root.is_dir():
            raise ValueError(f"data.root: folder {self.root} does not exist")
        for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
            path = self.root / getattr(self, key)
            if not path.exists():
                raise ValueError(f"data.{key}: {path} does not exist")
        return self


TORCHVISION_HEAD_CONVS = 4  # convolutions per branch of torchvision's FCOS and RetinaNet heads


class ModelConfig(Strict):
    detector: Literal["fcos", "retinanet"]
    backbone: str
    # Neck (FPN) and head width: the paper's "C128" students use 128, its teachers 256.
    channels: int = Field(256, ge=32, le=1024)
    width_mult: float = Field(1.0, gt=0.0, le=2.0)  # MobileNetV2 only
    # 3x3 convolutions in each head branch before its predictor. torchvision's FCOS and RetinaNet heads have 4;
    # fewer give a student of less capacity, one that converges below its teacher.
    head_convs: int = Field(TORCHVISION_HEAD_CONVS, ge=1, le=TORCHVISION_HEAD_CONVS)
    backbone_weights: Optional[Literal["imagenet"]] = None
    weights: Optional[Literal["coco"]] = None  # torchvision's COCO detector weights (resnet50, 256 channels)
    trainable_backbone_layers: Optional[int] = Field(None, ge=0, le=5)
    # Weights loaded before training (a model.pth or resume.pth: a student pretrained elsewhere, a teacher to
    # fine-tune); strict = exactly this model's keys and shapes, false = what fits (another class count's head).
    init_checkpoint: Optional[Path] = None
    # The seed the initial weights are drawn from; null = the run's seed. Set, every seed and every method starts
    # from the same weights, as students fine-tuned from one pretrained checkpoint do, and the run's seed draws
    # only the image order and augmentation.
    init_seed: Optional[int] = Field(None, ge=0)
    init_strict: bool = True
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    nms_thresh: float = Field(0.6, gt=0.0, le=1.0)
    detections_per_img: int = Field(100, ge=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from dist2.modeling.backbones import BACKBONES

        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
        return name

    @model_validator(mode="after")
    def _coco_weights_fit(self) -> "ModelConfig":
        if self.channels % 32:
            # FCOS's head normalises with GroupNorm(32, channels).
            raise ValueError(f"model.channels: must be a multiple of 32 (got {self.channels})")
        if self.weights == "coco" and (self.backbone != "resnet50" or self.channels != 256
                                       or self.head_convs != TORCHVISION_HEAD_CONVS):
            raise ValueError("model.weights: 'coco' exists only for backbone resnet50 with channels 256 and "
                             f"head_convs {TORCHVISION_HEAD_CONVS}")
        return self


class TrainConfig(Strict):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(16, ge=1)  # the global batch
    lr: float = Field(0.01, gt=0.0)
    # sgd (with momentum: the detection default) or adamw (Loshchilov & Hutter, ICLR 2019; torch's default betas,
    # weight_decay decoupled): the quick students use AdamW, 5 mAP higher than SGD in their four from-scratch
    # epochs (README, "Results on the quick benchmark").
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    lr_steps: list[int] = Field(default_factory=lambda: [8, 11])  # epochs after which lr *= lr_gamma
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    clip_grad_norm: Optional[float] = Field(10.0, gt=0.0)
    amp: bool = True  # mixed precision; only takes effect on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(1, ge=1)  # epochs
    # Evaluate and deploy an exponential moving average of the weights with this decay (e.g. 0.99); null: the
    # trained weights themselves (engine/averaging.py).
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0)
    # The evaluated epoch the run folder keeps in best/ (and tags in MLflow), highest first.
    best_metric: Literal[COCO_METRICS + COCO_RECALLS + TEACHER_HEAD_METRICS] = "mAP"

    @model_validator(mode="after")
    def _steps_within_schedule(self) -> "TrainConfig":
        if any(not 0 < s <= self.epochs for s in self.lr_steps):
            raise ValueError(f"train.lr_steps: every step must be an epoch in 1..{self.epochs}")
        if self.lr_steps != sorted(self.lr_steps):
            raise ValueError("train.lr_steps: must be increasing")
        return self


class EvalConfig(Strict):
    """How COCO metrics are computed. It never shapes weights: a cached teacher's identity leaves it out."""

    backend: Literal[EVAL_BACKENDS] = DEFAULT_EVAL_BACKEND  # or pycocotools, the reference (same numbers, slower)


class RayConfig(Strict):
    """Where and how a run executes: Ray Train's ScalingConfig, RunConfig and FailureConfig.

    One worker on the local machine runs in-process (Ray Train's local mode: no worker group, no start-up
    cost); more workers, or a cluster address, run a TorchTrainer worker group (gloo on CPU, NCCL on GPU).
    """

    num_workers: int = Field(1, ge=1)  # data-parallel workers; train.batch_size is split over them
    use_gpu: Optional[bool] = None  # null: from train.device (auto = whether the cluster has GPUs)
    resources_per_worker: Optional[dict[str, float]] = None  # null: the local machine's CPUs shared out
    storage_path: Optional[str] = None  # checkpoints go to storage_path/name; null = output_dir; or s3://...
    num_to_keep: int = Field(2, ge=1)  # epoch checkpoints kept
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)


class TeacherConfig(Strict):
    config: Path  # the teacher's experiment YAML: its model section builds the teacher
    checkpoint: Path  # the teacher's model.pth
    # Refuse to distil from a teacher whose val mAP is below this floor: it most likely failed to load or train.
    min_mAP: float = Field(1.0, ge=0.0, le=100.0)


class PADConfig(Strict):
    weight: float = Field(1.0, ge=0.0)


class NonLocalConfig(Strict):
    # Zhang & Ma (ICLR 2021), with the source's default weights: attention-masked feature loss (alpha),
    # attention transfer (beta), non-local relation loss (gamma); temperature of the attention softmax; the
    # non-local blocks' key/value max-pooling window per level, P3 to P7.
    alpha: float = Field(7e-5, ge=0.0)
    beta: float = Field(4e-3, ge=0.0)
    gamma: float = Field(7e-5, ge=0.0)
    temperature: float = Field(0.5, gt=0.0)
    strides: list[int] = Field(default_factory=lambda: [8, 4, 2, 2, 2], min_length=5, max_length=5)


class DistillConfig(Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    method: MethodName = "dist2"
    strategies: list[Literal[STRATEGIES + (ALL2ALL,)]] = Field(default_factory=lambda: ["N2N"])
    lambda_di: float = Field(1.0, ge=0.0)
    lambda_feat: float = Field(1.0, ge=0.0)
    student_loss: bool = True  # the student's own detection loss L_det (off: distillation terms alone)
    pad: PADConfig = PADConfig()
    nonlocal_: NonLocalConfig = Field(NonLocalConfig(), alias="nonlocal")

    @model_validator(mode="before")
    @classmethod
    def _hint_is_fi_at_n2n(cls, data):
        if isinstance(data, dict) and data.get("method") in ALIASES:
            try:
                name = data["method"]
                method, strategies = resolve_alias(name, data.get("strategies", ALIASES[name][1]))
            except ValueError as exc:
                raise ValueError(f"distill.strategies: {exc}") from None
            data = {**data, "method": method, "strategies": strategies}
        return data

    @model_validator(mode="after")
    def _strategies_fit_method(self) -> "DistillConfig":
        if not self.strategies:
            raise ValueError(f"distill.strategies: list at least one of {', '.join(STRATEGIES)} (or {ALL2ALL})")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"distill.strategies: {self.strategies} lists a strategy twice")
        if METHODS[self.method].n2n_only and self.resolved_strategies != ["N2N"]:
            raise ValueError(f"distill.strategies: the {self.method} baseline is defined at N2N only")
        return self

    @property
    def resolved_strategies(self) -> list[str]:
        """The strategies in canonical order, All2All expanded to all four."""
        return resolve_strategies(self.strategies)


class ExperimentConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 0
    output_dir: Path = Path("runs")  # the run's files go to output_dir/name
    data: DataConfig = DataConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    # Distillation runs only (`dist2 distill`): the frozen teacher and the method.
    teacher: Optional[TeacherConfig] = None
    distill: Optional[DistillConfig] = None

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> "ExperimentConfig":
        if self.train.batch_size % self.ray.num_workers:
            raise ValueError(f"train.batch_size: the global batch ({self.train.batch_size}) must split evenly over "
                             f"ray.num_workers = {self.ray.num_workers}")
        return self

    @property
    def run_dir(self) -> Path:
        return (self.output_dir / self.name).absolute()

    @property
    def storage_path(self) -> str:
        return self.ray.storage_path or str(self.output_dir.absolute())


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{loc}: " if loc and not msg.startswith(loc) else ""
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        lines.append(f"{where}{msg}{got}")
    return f"{source}: invalid config: " + "; ".join(lines)


def validate(model: type[BaseModel], raw: dict, source: str):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None


def load_config(path: Path | str, overrides: list[str] = ()) -> ExperimentConfig:
    """An experiment YAML (its `base:` chain resolved, config_files.py) with `--set` overrides, validated."""
    raw = apply_overrides(read_experiment(Path(path)), list(overrides))
    return validate(ExperimentConfig, raw, str(path))


def flatten(config: BaseModel) -> dict[str, str]:
    """The config as `a.b.c -> value` strings (the MLflow params), keys exactly as in the YAML."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = "null" if value is None else str(value)

    walk("", config.model_dump(mode="json", by_alias=True))
    return out
