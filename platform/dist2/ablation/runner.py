"""`dist2 ablate FILE`: a whole ablation as Ray Tune trials, then the report.

  1. Teachers: every distinct teacher config of the pairs (keyed by its hash, under output_dir/teachers/) that
     has not finished before, in any ablation, is trained by a Tune run of its own; one found finished is reused
     and recorded as a `teacher` run of this ablation's MLflow experiment.
  2. The grid: one Tune trial per cell. A one-worker trial runs its worker in the trial's own process (the
     in-process path of `dist2 distill`: a Ray Train worker group would add ~40 s per trial); a trial of more
     workers launches a TorchTrainer (Train inside Tune). Each trial is one `launch`: it logs its own MLflow run
     and checkpoints every epoch in its run folder, so a trial that is run again continues where it stopped.
  3. The report (dist2.report) from the experiment's finished runs.

In MLflow the ablation is one parent run (tag dist2.kind = ablation: the ablation file, the grid's size, wall time,
packing and the report as artifacts) and every teacher and trial run is its child, so the UI shows the grid as a
tree; --resume keeps the parent.

`--resume` restores the grid's Tune run (Tuner.restore): finished trials are kept, unfinished ones continue
from their last epoch checkpoint in the same MLflow run. MLflow logging is dist2's own, not Ray's
MLflowLoggerCallback (which keeps its trial -> run map in memory and opens duplicate runs after a restore).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from ray import tune

from dist2 import tracking
from dist2.ablation import parent_run, scheduling
from dist2.ablation.scheduling import TRIAL_END, TRIAL_WALL, Footprint, LiveCapacity
from dist2.ablation.spec import (
    SCHEMA,
    AblationConfig,
    Run,
    grid_runs,
    teacher_runs,
    teachers_in_use,
)
from dist2.config import ExperimentConfig
from dist2.engine.launch import launch, log_detector
from dist2.engine.local_ray import start_ray
from dist2.engine.rundir import RunDir
from dist2.errors import RunFailed, UserError, WaitedTooLong
from dist2.methods import (
    COCO_METRICS,
    EVAL_VERSION,
    METHODS,
    PROBE_METRIC,
    TEACHER_HEAD_METRICS,
    TEACHER_MAP,
    evaluation_name,
)

log = logging.getLogger(__name__)

REPORTED = (*COCO_METRICS, *TEACHER_HEAD_METRICS, TEACHER_MAP, "epoch")  # what a trial tells Tune
# The experiment's view in the MLflow UI: what tells the grid's runs apart and how they score.
GRID_VIEW = tracking.view_tag(
    ["attributes.`Dataset`", "attributes.`Models`", *(f"metrics.`{m}`" for m in (COCO_METRICS[0], PROBE_METRIC)),
     *(f"params.`{p}`" for p in SCHEMA if p not in ("detector", "teacher", "num_strategies"))])


# ---------------------------------------------------------------- one trial (in a Tune trial actor)

@dataclass(frozen=True)
class TrialJob:
    """One Tune trial: a run of the grid and where it logs. Tune's config holds it as a dict (`asdict`: Tune
    takes dataclasses apart), read back into a TrialJob by the trial."""
    cfg: dict  # the run's experiment (absolute paths)
    kind: str  # "train" (a teacher) or "distill"
    params: dict[str, str]  # the grid's MLflow params
    tracking_uri: str
    experiment: str  # the ablation's MLflow experiment
    source: str  # the ablation file, logged as the run's config artifact
    run_name: str = ""  # its MLflow run name (Run.label); a grid saved before run names restores without it
    parent_run_id: str = ""  # the ablation's MLflow run; "" in a grid saved before parent runs


def _trial_name(trial) -> str:
    return trial.config["run"]["cfg"]["name"]


def _trial_job(run: Run, tracking_uri: str, experiment: str, source: str, parent_run_id: str) -> TrialJob:
    return TrialJob(cfg=run.cfg.model_dump(mode="json", by_alias=True), kind=run.kind, params=run.params,
                    tracking_uri=tracking_uri, experiment=experiment, source=source, run_name=run.label,
                    parent_run_id=parent_run_id)


def _child_tags(experiment: str, parent_run_id: str) -> dict[str, str]:
    """A grid run's tags: its ablation, and its parent run in the MLflow UI's tree."""
    return {"dist2.ablation": experiment, **({parent_run.PARENT_TAG: parent_run_id} if parent_run_id else {})}


def _trial(config: dict) -> None:
    # The trial's epoch lines reach the driver's console through Ray's log forwarding.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    fields = dict(config["run"])
    if "uri" in fields:  # Tune state saved before TrialJob named it tracking_uri: such a grid resumes all the same
        fields["tracking_uri"] = fields.pop("uri")
    job = TrialJob(**fields)
    started = time.monotonic()
    cfg = ExperimentConfig.model_validate(job.cfg)
    if cfg.ray.num_workers == 1:
        torch.set_num_threads(max(1, int(cfg.ray.resources_per_worker["CPU"])))
    # A trial run again (the driver died before Tune recorded it) reuses or closes its finished run.
    metrics = launch(cfg, job.kind, Path(job.source), tracking_uri=job.tracking_uri, experiment=job.experiment,
                     params=job.params, tags=_child_tags(job.experiment, job.parent_run_id), in_process=True,
                     reuse_finished=True, run_name=job.run_name or None)
    result = {k: float(metrics[k]) for k in REPORTED if isinstance(metrics.get(k), (int, float))}
    tune.report({**result, TRIAL_WALL: time.monotonic() - started, TRIAL_END: time.time()})


# ---------------------------------------------------------------- driver

class Progress(tune.Callback):
    """A one-line account of a Tune run (done / running / pending / failed, best mAP so far) at every trial
    start and end, and once a minute in between."""

    def __init__(self, phase: str, total: int):
        self.phase, self.total, self.last = phase, total, 0.0
        self.best: tuple[float, str] | None = None

    def _line(self, trials, trial=None, event=""):
        count = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "RUNNING", "PENDING", "ERROR")}
        best = f"; best mAP {self.best[0]:.2f} ({self.best[1]})" if self.best else ""
        name = f" [{event} {_trial_name(trial)}]" if trial is not None else ""
        pending = self.total - count["TERMINATED"] - count["RUNNING"] - count["ERROR"]  # Tune adds trials lazily
        log.info("%s: %d/%d done, %d running, %d pending, %d failed%s%s", self.phase, count["TERMINATED"],
                 self.total, count["RUNNING"], pending, count["ERROR"], best, name)
        self.last = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trials, trial, "started")

    def on_trial_complete(self, iteration, trials, trial, **info):
        mAP = (trial.last_result or {}).get("mAP")
        if mAP is not None and (self.best is None or mAP > self.best[0]):
            self.best = (mAP, _trial_name(trial))
        self._line(trials, trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "FAILED")

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last > 60:
            self._line(trials)


def _widen(teachers: list[Run], footprint: Footprint) -> tuple[list[Run], Footprint]:
    """Fewer one-worker CPU teachers than the trials the cluster's idle CPUs hold *now*: each teacher gets its
    share of those CPUs as torch threads, as many as one node holds (a trial actor lives on one node)."""
    import ray

    if footprint.num_workers > 1 or "GPU" in footprint.per_worker:
        return teachers, footprint
    factor = footprint.slots(ray.available_resources()) // len(teachers)
    if factor <= 1:
        return teachers, footprint
    cpus = footprint.per_worker["CPU"]
    largest_node = max(node.get("CPU", 0) for node in scheduling.alive_nodes())
    cpus = max(cpus, min(cpus * factor, largest_node))
    wide = [replace(run, cfg=run.cfg.model_copy(update={"ray": run.cfg.ray.model_copy(
        update={"resources_per_worker": {"CPU": cpus}})})) for run in teachers]
    return wide, Footprint.of(1, cpus, 0)


def _longest_first(runs: list[Run]) -> list[Run]:
    """Trials in order of their expected cost (LPT scheduling): the short ones go last and fill the slots the
    long ones leave, instead of a long trial running alone at the end (costs: `Method.trial_cost`; a teacher
    trains like a student)."""
    def cost(run: Run) -> float:
        method = METHODS.get(run.params["method"], METHODS["student"])
        return method.trial_cost(int(run.params["num_strategies"]))
    return sorted(runs, key=cost, reverse=True)


def _tune(phase: str, runs: list[Run], spec: AblationConfig, where: dict, restore: bool, footprint: Footprint,
          wait_timeout: float | None):
    """Run `runs` as one Tune run named `phase` under output_dir/name/tune; returns (ResultGrid, wall s, watch)."""
    trainable = tune.with_resources(_trial, footprint.trial_resources())
    path = spec.output_dir / spec.name / "tune"
    key = f"{spec.name} {phase}"
    watch = scheduling.watch(key, footprint, wait_timeout)
    started = time.monotonic()
    if restore:
        tuner = tune.Tuner.restore(str(path / phase), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search([asdict(_trial_job(run, **where))
                                                  for run in _longest_first(runs)])},
            # reuse_actors: a trial actor that imported torch serves the next trial (~10 s saved per trial here)
            tune_config=tune.TuneConfig(search_alg=LiveCapacity(footprint, spec.max_concurrent), reuse_actors=True,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=phase, storage_path=str(path), verbose=0,
                                      callbacks=[Progress(key, len(runs)), scheduling.Watch(key)]))
    log.info("%s: %d trial(s) of %s each, as many at once as the cluster holds%s", key, len(runs), footprint,
             f" (at most {spec.max_concurrent})" if spec.max_concurrent else "")
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        if not watch.timed_out:
            raise
        results = None  # the wait timeout's SIGINT reached us rather than Tune's handler: Tune saved its state
    return results, time.monotonic() - started, watch


def _stopped_waiting(command: str, watch: scheduling.PhaseWatch) -> UserError:
    return WaitedTooLong(f"{watch.phase}: waited {watch.wait_timeout:g} s (--wait-timeout) with no trial running: "
                         f"{scheduling.cluster_line(watch.footprint)}; add resources and continue with "
                         f"{command} --resume")


def _stopped_early(spec: AblationConfig, command: str, results, runs: list[Run]) -> bool:
    """Whether Tune stopped a phase before all its trials finished (Ctrl-C: its state is saved); says so."""
    unfinished = [r for r in results if r.error is None and TRIAL_WALL not in (r.metrics or {})]
    left = len(runs) - len(results) + len(unfinished)
    if left:
        print(f"dist2: {spec.name}: interrupted with {left} trial(s) unfinished; continue with {command} --resume",
              file=sys.stderr)
    return left > 0


def _record_reused_teacher(uri: str, experiment: str, run: Run, source: Path, parent_run_id: str) -> None:
    """A teacher trained before (by any ablation) appears in this experiment as a finished `teacher` run."""
    record = RunDir(run.cfg).finished()
    version = record.get("eval_version")  # absent in runs from before it was recorded
    measured = {tracking.EVAL_VERSION_TAG: str(version)} if version is not None else {}
    if version != EVAL_VERSION:
        log.warning("%s: teacher %s was measured by %s, not today's v%d: the report marks it, and "
                    "ablations/reevaluate.py measures every run again", experiment, run.label,
                    evaluation_name(version), EVAL_VERSION)
    run_id = tracking.record_finished_run(uri, experiment, run.cfg, run.kind, record["history"], {**run.params},
                                          {**_child_tags(experiment, parent_run_id), "dist2.config": str(source),
                                           **measured}, record["mlflow_run_id"], run.label)
    log_detector(run.cfg, uri, run_id)


def ablate(path: Path, spec: AblationConfig, overrides: list[str], resume: bool, address: str | None,
           tracking_uri: str | None, wait_timeout: float | None = None) -> int:
    """Run the ablation `spec`, read from `path` with `overrides` (which the report's command repeats)."""
    # Tune's legacy reporter at verbose=0 prints nothing: no configuration box and TensorBoard hint per phase
    # (the Progress callback prints dist2's progress lines).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    source = Path(path).absolute()
    teachers = teacher_runs(spec, source)
    runs = grid_runs(spec, source, teachers)
    teachers = teachers_in_use(teachers, runs)
    tune_dir = spec.output_dir / spec.name / "tune"
    if (tune_dir / "grid").exists() and not resume:
        raise UserError(f"{path}: ablation {spec.name} has already run in {tune_dir.parent}; pass --resume to "
                        "continue it (finished trials are kept), or delete that folder to start over")
    r = spec.resources
    footprint = Footprint.of(r.num_workers, r.cpus_per_worker, r.gpus_per_worker)
    start_ray(address)
    scheduling.refuse_impossible(footprint, scheduling.declared_node_types(), scheduling.alive_nodes())
    spec.output_dir.mkdir(parents=True, exist_ok=True)  # every path is absolute from here on
    uri = tracking.resolve_tracking_uri(tracking_uri, spec.output_dir)
    # The store is usable, and the experiment exists before any trial; the report prints its command.
    command = shlex.join(["dist2", "ablate", str(path), *(arg for o in overrides for arg in ("--set", o))])
    tracking.tag_experiment(uri, spec.name, {tracking.COMMAND_TAG: command, **GRID_VIEW})
    missing = [t for t in teachers if RunDir(t.cfg).finished() is None]
    log.info("%s: %d teacher(s) (%d to train), %d grid trial(s); runs in %s, MLflow %s", spec.name,
             len(teachers), len(missing), len(runs), spec.output_dir / spec.name, uri)
    parent = parent_run.open_ablation_run(uri, spec.name, source, {"grid_trials": len(runs),
                                                                   "grid_teachers": len(teachers)})
    where = {"tracking_uri": uri, "experiment": spec.name, "source": str(source), "parent_run_id": parent}
    status = "FAILED"
    try:
        scheduling.request_grid(footprint, len(runs), spec.max_concurrent)
        with _working_in(spec.output_dir):
            code = _run_phases(command, spec, source, teachers, missing, runs, where, footprint, resume,
                               wait_timeout)
        status = "FINISHED" if code == 0 else "KILLED"
        return code
    except (KeyboardInterrupt, WaitedTooLong):
        status = "KILLED"  # continued with --resume, in the same parent run
        raise
    finally:
        scheduling.release_request()
        parent_run.end_ablation_run(uri, parent, status)


@contextlib.contextmanager
def _working_in(folder: Path):
    """Tune resolves its storage paths against the working directory (os.path.relpath), and a Ray job's working
    directory is a temporary copy that Ray may unpack again under a running driver (seen with two nodes on one
    machine): the Tune phases run in output_dir, and the caller's working directory comes back afterwards."""
    try:
        before = os.getcwd()
    except FileNotFoundError:  # that copy is already gone: there is nothing to come back to
        before = None
    os.chdir(folder)
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(OSError):
                os.chdir(before)


def _run_phases(command, spec, source, teachers, missing, runs, where, footprint, resume, wait_timeout) -> int:
    """The teacher and grid phases, then the report; `command` is the user's (its --set included), for the
    --resume hints."""
    from dist2.report import write_report

    uri, tune_dir = where["tracking_uri"], spec.output_dir / spec.name / "tune"
    if missing:
        wide, wide_footprint = _widen(missing, footprint)
        results, wall, watch = _tune("teachers", wide, spec, where, False, wide_footprint, wait_timeout)
        if watch.timed_out:
            raise _stopped_waiting(command, watch)
        if _stopped_early(spec, command, results, wide):  # the grid needs every teacher: it waits for --resume
            return 130
        failed = [r for r in results if r.error is not None]
        if failed:
            raise RunFailed(f"{spec.name}: {len(failed)} teacher(s) failed, the grid needs them: "
                            + "; ".join(str(r.error).splitlines()[0][:200] for r in failed))
        log.info("%s teachers: %.0f s, packing efficiency %.2f", spec.name, wall,
                 watch.packing(results))
    for teacher in teachers:
        if teacher not in missing and not tracking.has_finished_run(uri, spec.name, teacher.cfg.run_dir):
            _record_reused_teacher(uri, spec.name, teacher, source, where["parent_run_id"])

    restore = resume and tune.Tuner.can_restore(str(tune_dir / "grid"))
    if resume and not restore:
        log.info("%s: no grid state to restore in %s; starting the grid (finished runs are kept)", spec.name, tune_dir)
    results, wall, watch = _tune("grid", runs, spec, where, restore, footprint, wait_timeout)
    if watch.timed_out:
        raise _stopped_waiting(command, watch)
    if _stopped_early(spec, command, results, runs):
        return 130
    packing = watch.packing(results)
    log.info("%s grid: %d trial(s) in %.0f s, packing efficiency %.2f (%s-seconds of trials / of the cluster)",
             spec.name, len(results), wall, packing, footprint.sized_by)

    out = spec.output_dir / spec.name / "report"
    report = write_report(uri, [spec.name], out, spec.tables, extra_metrics={"grid_wall_s": wall,
                                                                          "grid_packing_efficiency": packing},
                          ablation_run=where["parent_run_id"])
    print(f"\nreport: {report}")
    try:
        print(f"MLflow UI on this store: {tracking.ui_command(uri, spec.name)}")
    except Exception as exc:  # the grid is done and reported: a store gone away now is only a missing hint
        log.warning("MLflow %s unreachable (%s): no link to the MLflow UI", uri, exc.__class__.__name__)
    failed = [r for r in results if r.error is not None]
    if failed:
        raise RunFailed(f"{spec.name}: {len(failed)} of {len(results)} trial(s) failed (their cells are missing "
                        f"from the report): " + "; ".join(str(r.error).splitlines()[0][:200] for r in failed))
    return 0
