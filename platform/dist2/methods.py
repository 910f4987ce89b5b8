"""The distillation vocabulary, defined once: imitation strategies, methods and the metric names runs log.

Every layer reads it: config validation, the ablation grid (its axes and MLflow params), the distiller (which
losses a method adds), the report (its rows, in this order) and the schedulers' cost estimates. Adding a method
is one line in `METHODS`; adding a loss is one file in `distill/losses/` and one line in its `LOSSES`. This module
imports no torch: configs are validated before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("N2N", "B2B", "B2N", "N2B")  # X2Y: the student's X stands in for the teacher's Y (PAPER.md)
ALL2ALL = "All2All"  # all four strategies at once


@dataclass(frozen=True)
class Method:
    losses: tuple[str, ...]  # the `distill.losses.LOSSES` added to the student's own detection loss
    row: str  # the report's row label
    lambda_di: bool = False  # weighted by distill.lambda_di (so λ_DI is a grid axis and an MLflow param)
    lambda_feat: bool = False  # weighted by distill.lambda_feat
    n2n_only: bool = False  # defined at N2N only (the baselines)
    # A trial's expected cost relative to the student's training step, for longest-first scheduling: the teacher's
    # forward for any distillation, plus one pass through the teacher's remaining layers per DI strategy.
    cost: float = 1.5
    cost_per_strategy: float = 0.0

    def trial_cost(self, num_strategies: int) -> float:
        return self.cost + self.cost_per_strategy * num_strategies


# In the paper's table order: the student baseline, the baselines, then FI, DI and Dist2.
METHODS: dict[str, Method] = {
    "student": Method((), "(student)", cost=1.0),
    "pad": Method(("pad",), "+ PAD", n2n_only=True),
    "nonlocal": Method(("nonlocal",), "+ NonLocal", n2n_only=True),
    "fi": Method(("fi",), "+ FI", lambda_feat=True),
    "di": Method(("di",), "+ DI", lambda_di=True, cost_per_strategy=0.4),
    "dist2": Method(("fi", "di"), "+ Dist2", lambda_di=True, lambda_feat=True, cost_per_strategy=0.4),
}

# Hint (Chen et al., NeurIPS 2017: an adaptation layer and L2 to the teacher's feature) is, read at N2N, exactly
# FI at N2N: `hint` is accepted as a name for that one experiment, runs as method fi at N2N, and is reported as
# one row under this label.
HINT = ("fi", ["N2N"])
ALIASES = {"hint": HINT}
HINT_ROW = "+ Hint = FI (N2N)"
TEACHER = "teacher"  # the method param of a pair's teacher run (trained by itself, not a distillation method)
TEACHER_ROW = "(teacher)"

# The metrics a run logs and the report reads: COCO's six (evaluation/coco_eval.py, in COCOeval.stats order), the
# pair's teacher beside its student, and the teacher-head measures below.
COCO_METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
COCO_RECALLS = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # COCOeval.stats[6:12], in this order
# COCOeval implementations (evaluation/coco_eval.py): faster-coco-eval's C++ port is the default, pycocotools the
# reference it is tested against.
EVAL_BACKENDS = ("faster_coco_eval", "pycocotools")
DEFAULT_EVAL_BACKEND = EVAL_BACKENDS[0]
# What the evaluation measures, as a number: bump it whenever a change makes the same weights score differently,
# so that a report never sets numbers of two evaluations side by side unsaid (1: val batches padded to their
# largest image, until 2026-11-29; 2: val batches of same-size images). Runs record it: tag EVAL_VERSION_TAG
# (tracking.py) and "eval_version" in metrics.json; runs from before it was recorded have neither.
EVAL_VERSION = 2

CLASS_AP = "AP/"  # + a category's name: its AP (IoU .50:.95, all areas), at the final evaluation only
TEACHER_MAP = "teacher_mAP"
# The run's best evaluated epoch by train.best_metric, and that metric's value there (run folder: best/).
BEST_EPOCH_TAG, BEST_VALUE_TAG = "dist2.best_epoch", "dist2.best_value"

# The teacher's head on the student's neck (distill/teacher_head.py): through a least-squares probe, for every run
# with a teacher; through the run's own trained N2N adapter, for runs that have one.
PROBE_METRIC = "teacher_head_probe_mAP"
TRAINED_METRIC = "teacher_head_mAP"
TEACHER_HEAD_METRICS = (PROBE_METRIC, TRAINED_METRIC)


def method_names() -> list[str]:
    """Every name a config or grid may use."""
    return [*METHODS, *ALIASES]


def check_method(name: str) -> str:
    if name not in METHODS and name not in ALIASES:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    return name


def resolve_alias(name: str, strategies) -> tuple[str, list[str]]:
    """(method, strategies) a config or grid cell runs: an alias (hint) becomes the method it names, at the only
    strategies it is defined at (ValueError for others); any other name is returned as it is."""
    if name not in ALIASES:
        return name, list(strategies)
    method, defined_at = ALIASES[name]
    chosen = resolve_strategies(strategies)
    if chosen != defined_at:
        at = ", ".join(defined_at)
        raise ValueError(f"the {name} baseline ({name.capitalize()} = {method.upper()} at {at}) is defined at {at} "
                         f"only (got {', '.join(chosen)})")
    return method, defined_at


def resolve_strategies(strategies) -> list[str]:
    """Strategies in canonical order, All2All expanded to all four."""
    chosen = set(STRATEGIES) if ALL2ALL in strategies else set(strategies)
    return [s for s in STRATEGIES if s in chosen]


def evaluation_name(version: int | None) -> str:
    """How reports and logs name the evaluation a run was measured by (a recorded version, or None)."""
    return f"evaluation v{version}" if version is not None else "an evaluation from before versions were recorded"
