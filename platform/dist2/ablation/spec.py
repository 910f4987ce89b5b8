"""An ablation file (ablations/*.yaml), validated, and expanded into the runs it stands for.

One file = one grid: the teacher/student pairs, the grid's axes (a list of cross products, as scikit-learn's
ParameterGrid takes them), cells to skip, the resources of one trial, and the paper tables it rebuilds. Every
run of the grid is a full experiment config (the pair's YAML + `set` overrides + the cell's distill section),
so a trial is exactly what `dist2 distill` of that config would do.

A cell's schema params (detector, teacher, student, method, strategies, num_strategies, lambda_di, lambda_feat,
seed) go to MLflow beside the flattened config; the reporter groups runs by them. A λ that a method does not use
is logged empty, so that cells differing only in it are one cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from dist2.artifacts import CONFIG, WEIGHTS
from dist2.config import ExperimentConfig, MethodName, Strict, apply_overrides, validate
from dist2.config_files import read_experiment, read_yaml
from dist2.errors import UserError
from dist2.methods import ALL2ALL, METHODS, STRATEGIES, TEACHER, resolve_alias, resolve_strategies

TABLES = ("table1", "table2", "table3", "lambda_di", "teacher_head", "per_class", "gallery")
SCHEMA = ("detector", "teacher", "student", "method", "strategies", "num_strategies", "lambda_di", "lambda_feat",
          "seed")


class Pair(Strict):
    teacher: Path  # the teacher's experiment YAML
    student: Path  # the student's experiment YAML
    # Names in the report and in the `teacher` / `student` params (default: the YAMLs' `name`).
    teacher_label: Optional[str] = None
    student_label: Optional[str] = None


class GridEntry(Strict):
    """One cross product of axes. Axes left out take the file's defaults."""

    method: list[MethodName] = Field(min_length=1)  # a pair's teacher is run by itself
    # Explicit strategy lists (e.g. [[N2N], [B2B, N2N], [All2All]]) or "the first k of N2N, B2B, B2N, N2B".
    strategies: Optional[list[list[Literal[STRATEGIES + (ALL2ALL,)]]]] = None
    num_strategies: Optional[list[int]] = None
    lambda_di: Optional[list[float]] = None
    lambda_feat: Optional[list[float]] = None
    seed: Optional[list[int]] = None

    @model_validator(mode="after")
    def _one_way_to_pick_strategies(self) -> "GridEntry":
        if self.strategies is not None and self.num_strategies is not None:
            raise ValueError("give either strategies or num_strategies in one grid entry, not both")
        if any(not 1 <= k <= len(STRATEGIES) for k in self.num_strategies or []):
            raise ValueError(f"num_strategies: each must be 1..{len(STRATEGIES)} (the first k of "
                             f"{', '.join(STRATEGIES)})")
        return self


class Resources(Strict):
    """What one trial holds: its Ray Train workers (ray.num_workers) and each worker's CPUs and GPUs."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)


class AblationConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")  # = the MLflow experiment
    output_dir: Path = Path("runs")  # runs go to output_dir/name/, teachers to output_dir/teachers/
    tables: list[Literal[TABLES]] = Field(default_factory=lambda: list(TABLES))
    pairs: list[Pair] = Field(min_length=1)
    set: list[str] = Field(default_factory=list)  # KEY=VALUE overrides of every run, teachers included
    teacher_set: list[str] = Field(default_factory=list)  # ... of the teachers only (after `set`)
    student_set: list[str] = Field(default_factory=list)  # ... of the grid's runs only (after `set`)
    distill: dict = Field(default_factory=dict)  # the distill section's other keys (hint.weight, ...)
    teacher_min_mAP: float = Field(1.0, ge=0, le=100)
    grid: list[GridEntry] = Field(min_length=1)
    strategies: list[list[str]] = Field(default_factory=lambda: [["N2N"]])  # defaults of the grid's axes
    lambda_di: list[float] = Field(default_factory=lambda: [1.0])
    lambda_feat: list[float] = Field(default_factory=lambda: [1.0])
    seed: list[int] = Field(default_factory=lambda: [0])
    skip: list[dict] = Field(default_factory=list)  # a cell matching every key of one of these is dropped
    resources: Resources = Resources()
    # Trials running at once, at most (default: as many as the cluster's resources hold, nodes that join included).
    max_concurrent: Optional[int] = Field(None, ge=1)

    @field_validator("skip")
    @classmethod
    def _skip_keys_are_params(cls, skip: list[dict]) -> list[dict]:
        for entry in skip:
            unknown = sorted(set(entry) - set(SCHEMA))
            if unknown:
                raise ValueError(f"skip: unknown key(s) {', '.join(unknown)}; use any of {', '.join(SCHEMA)}")
        return skip

    @field_validator("distill")
    @classmethod
    def _grid_owns_its_axes(cls, distill: dict) -> dict:
        owned = sorted(set(distill) & {"method", "strategies", "lambda_di", "lambda_feat"})
        if owned:
            raise ValueError(f"distill: {', '.join(owned)} are grid axes; set them in grid entries")
        return distill


@dataclass(frozen=True)
class Run:
    """One run of the grid: its config, how it is launched, and its schema params."""

    cfg: ExperimentConfig
    kind: str  # "train" (a teacher) or "distill" (a student cell: the baseline too, method "student")
    params: dict[str, str]
    label: str = ""  # its MLflow run name: what tells it apart in the UI's runs table (see mlflow_names)


def load_ablation(path: Path, overrides: list[str] = ()) -> AblationConfig:
    raw = apply_overrides(read_yaml(path), list(overrides))
    spec = validate(AblationConfig, raw, str(path))
    base = Path(path).parent
    # Experiment YAMLs named in the file are found relative to the working directory, like the CLI's.
    for pair in spec.pairs:
        for role in ("teacher", "student"):
            if not getattr(pair, role).is_file():
                raise UserError(f"{path}: pairs: {role} config {getattr(pair, role)} does not exist "
                                f"(paths are relative to the working directory, not to {base})")
    # Trials run in other processes and other folders (a Ray job's, a Tune trial's): every path is absolute.
    pairs = [pair.model_copy(update={"teacher": pair.teacher.absolute(), "student": pair.student.absolute()})
             for pair in spec.pairs]
    return spec.model_copy(update={"output_dir": spec.output_dir.absolute(), "pairs": pairs})


# Keys added after teachers were first cached, at the values that train exactly as before the key existed: left out
# of a teacher's identity at those values, so that the caches made before them stay valid.
NEUTRAL_KEYS = {("data", "group_aspect_ratio"): False, ("model", "init_checkpoint"): None,
                ("model", "init_strict"): True, ("model", "init_seed"): None,
                ("model", "head_convs"): 4,
                ("train", "best_metric"): "mAP",
                ("train", "ema_decay"): None, ("train", "optimizer"): "sgd"}


def teacher_key(cfg: ExperimentConfig) -> str:
    """The identity of a trained teacher: a hash of everything that shapes its weights (not its name, where it
    is written, the resources it ran on, or how it is evaluated)."""
    dumped = cfg.model_dump(mode="json", by_alias=True, exclude={"name", "output_dir", "ray", "eval"})
    for (section, key), neutral in NEUTRAL_KEYS.items():
        if dumped[section][key] == neutral:
            del dumped[section][key]
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:12]


def _resolve(path: Path, overrides: list[str], source: str, update: dict) -> ExperimentConfig:
    raw = apply_overrides(read_experiment(path), overrides)
    raw.update(update)
    return validate(ExperimentConfig, raw, f"{source} ({path})")


def _ray_section(resources: Resources) -> dict:
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    return {"num_workers": resources.num_workers, "use_gpu": resources.gpus_per_worker > 0,
            "resources_per_worker": per_worker}


def teacher_runs(spec: AblationConfig, source: Path) -> list[Run]:
    """The distinct teachers of the pairs, each named by its config hash under output_dir/teachers/."""
    runs = {}
    for pair in spec.pairs:
        cfg = _resolve(pair.teacher, spec.set + spec.teacher_set, str(source), {})
        key = teacher_key(cfg)
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-{key}", "output_dir": spec.output_dir / "teachers",
                                     "ray": cfg.ray.model_validate(_ray_section(spec.resources))})
        runs[key] = Run(cfg, "train", {"detector": cfg.model.detector, "teacher": _label(pair, "teacher"),
                                       "student": "", "method": TEACHER, "strategies": "",
                                       "num_strategies": "0", "lambda_di": "", "lambda_feat": "",
                                       "seed": str(cfg.seed)})
    return mlflow_names(list(runs.values()))


def teachers_in_use(teachers: list[Run], runs: list[Run]) -> list[Run]:
    """The teachers some grid run distils from: a pair whose every cell `skip` drops trains no teacher."""
    used = {Path(run.cfg.teacher.checkpoint).parent for run in runs}
    return mlflow_names([t for t in teachers if t.cfg.run_dir in used])


def _label(pair: Pair, role: str) -> str:
    return getattr(pair, f"{role}_label") or read_experiment(getattr(pair, role)).get("name", str(getattr(pair, role)))


def _cells(spec: AblationConfig, entry: GridEntry, source: Path):
    if entry.num_strategies is not None:
        strategy_lists = [list(STRATEGIES[:k]) for k in entry.num_strategies]
    else:
        strategy_lists = entry.strategies or spec.strategies
    axes = (entry.method, strategy_lists, entry.lambda_di or spec.lambda_di, entry.lambda_feat or spec.lambda_feat,
            entry.seed or spec.seed)
    for name, strategies, lambda_di, lambda_feat, seed in itertools.product(*axes):
        try:  # an alias (Hint = FI at N2N) is one experiment, one cell, whichever name the grid uses
            method, chosen = resolve_alias(name, resolve_strategies(strategies))
        except ValueError as exc:
            raise UserError(f"{source}: grid: {exc}") from None
        registered = METHODS[method]
        if not registered.losses:  # the student baseline: no strategy
            chosen = []
        yield {"method": method, "strategies": ",".join(sorted(chosen)), "num_strategies": str(len(chosen)),
               "lambda_di": str(float(lambda_di)) if registered.lambda_di else "",
               "lambda_feat": str(float(lambda_feat)) if registered.lambda_feat else "", "seed": str(seed)}


def _skipped(params: dict[str, str], skip: list[dict]) -> bool:
    def same(key, want):
        if key == "strategies" and isinstance(want, list):
            want = ",".join(sorted(resolve_strategies(want)))
        return params[key] == (str(float(want)) if key.startswith("lambda") else str(want))

    return any(all(same(k, v) for k, v in entry.items()) for entry in skip)


def _run_name(teacher: Run, student_name: str, cell: dict) -> str:
    """e.g. quick_fcos_teacher-quick_fcos_student-di-B2B_N2N-ldi1.0-s0 (the teacher's name without its hash)."""
    parts = [teacher.cfg.name.rsplit("-", 1)[0], student_name, cell["method"]]
    if cell["num_strategies"] == str(len(STRATEGIES)):
        parts.append(ALL2ALL)
    elif cell["strategies"]:
        parts.append(cell["strategies"].replace(",", "_"))
    if cell["lambda_di"]:
        parts.append(f"ldi{cell['lambda_di']}")
    if cell["lambda_feat"]:
        parts.append(f"lfeat{cell['lambda_feat']}")
    return "-".join(parts + [f"s{cell['seed']}"])


def grid_runs(spec: AblationConfig, source: Path, teachers: list[Run]) -> list[Run]:
    """Every distinct cell of the grid for every pair, in grid order (a cell listed twice runs once)."""
    by_key = {teacher_key(t.cfg): t for t in teachers}
    runs: dict[str, Run] = {}
    for pair in spec.pairs:
        teacher_cfg = _resolve(pair.teacher, spec.set + spec.teacher_set, str(source), {})
        teacher = by_key[teacher_key(teacher_cfg)]
        student_raw = read_experiment(pair.student)
        for entry in spec.grid:
            for cell in _cells(spec, entry, source):
                params = {"detector": teacher.params["detector"], "teacher": teacher.params["teacher"],
                          "student": _label(pair, "student"), **cell}
                if _skipped(params, spec.skip):
                    continue
                name = _run_name(teacher, student_raw.get("name", "student"), cell)
                distill = {**spec.distill, "method": cell["method"],
                           "strategies": cell["strategies"].split(",") if cell["strategies"] else ["N2N"],
                           "lambda_di": float(cell["lambda_di"] or 1.0),
                           "lambda_feat": float(cell["lambda_feat"] or 1.0)}
                update = {"name": name, "seed": int(cell["seed"]), "output_dir": str(spec.output_dir / spec.name),
                          "ray": _ray_section(spec.resources), "distill": distill,
                          "teacher": {"config": str(teacher.cfg.run_dir / CONFIG),
                                      "checkpoint": str(teacher.cfg.run_dir / WEIGHTS),
                                      "min_mAP": spec.teacher_min_mAP}}
                cfg = _resolve(pair.student, spec.set + spec.student_set, str(source), update)
                if cfg.model.detector != teacher.cfg.model.detector:
                    raise UserError(f"{source}: pairs: teacher {pair.teacher} is {teacher.cfg.model.detector}, "
                                    f"student {pair.student} is {cfg.model.detector}; a pair shares its detector")
                runs.setdefault(name, Run(cfg, "distill", params))
    if not runs:
        raise UserError(f"{source}: the grid is empty after `skip`")
    return mlflow_names(list(runs.values()))


DETECTOR_TAGS = {"fcos": "fcos", "retinanet": "retina"}


def _pair_tags(pairs: list[tuple[str, str, str]]) -> dict[tuple, str]:
    """A short tag per (detector, teacher, student) when the runs span several pairs, "" for one."""
    pairs = list(dict.fromkeys(pairs))
    if len(pairs) < 2:
        return dict.fromkeys(pairs, "")
    for make in (lambda d, t, s: DETECTOR_TAGS.get(d, d), lambda d, t, s: f"{DETECTOR_TAGS.get(d, d)}·{s[:4]}",
                 lambda d, t, s: f"{DETECTOR_TAGS.get(d, d)}·{t[:4]}→{s[:4]}"):
        tags = {pair: make(*pair) for pair in pairs}
        if len(set(tags.values())) == len(pairs):
            return tags
    return {pair: f"P{i + 1}" for i, pair in enumerate(pairs)}


def mlflow_names(runs: list[Run]) -> list[Run]:
    """The runs labelled with MLflow run names that lead with what differs, e.g. `dist2 All2All s0`,
    `di N2N+B2B s1`, `student s0`, `teacher ResNet10-C64`: a λ only where the runs' λ values differ, a short pair tag
    in front where they span several pairs (`retina·MV2 di N2N s0`). The run folders, Tune trials and grid cells
    keep their full names; the pair, detector and config are in the run's params."""
    params = [r.params for r in runs]
    tags = _pair_tags([(p["detector"], p["teacher"], p["student"]) for p in params if p["method"] != TEACHER])
    varies = {key: len({p[key] for p in params if p[key]}) > 1 for key in ("lambda_di", "lambda_feat")}

    def core(p: dict[str, str]) -> str:
        if p["method"] == TEACHER:
            return f"teacher {p['teacher']}"
        if not p["strategies"]:
            return f"{p['method']} s{p['seed']}"
        chosen = p["strategies"].split(",")
        strategies = ALL2ALL if len(chosen) == len(STRATEGIES) else "+".join(s for s in STRATEGIES if s in chosen)
        lambdas = "".join(f" {symbol}{float(p[key]):g}" for key, symbol in (("lambda_di", "λ"), ("lambda_feat", "λf"))
                          if p[key] and varies[key])
        return f"{p['method']} {strategies}{lambdas} s{p['seed']}"

    names = [" ".join(filter(None, (tags.get((p["detector"], p["teacher"], p["student"]), ""), core(p))))
             for p in params]
    for tell in (lambda r: DETECTOR_TAGS.get(r.params["detector"]), lambda r: r.cfg.name):
        if len(set(names)) == len(names):
            break  # e.g. two teachers of one label: their detector, else their config names, tell them apart
        names = [f"{tell(r)} {name}" if names.count(name) > 1 else name for name, r in zip(names, runs, strict=True)]
    return [replace(r, label=name) for r, name in zip(runs, names, strict=True)]
