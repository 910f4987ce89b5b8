"""An ablation's parent run in MLflow: the grid is a tree in the MLflow UI, one parent run per ablation (its
file, size, wall time, packing and report), every teacher and trial run its child."""

from __future__ import annotations

import logging
from pathlib import Path

from dist2 import tracking

log = logging.getLogger(__name__)

ABLATION_KIND, PARENT_TAG = "ablation", "mlflow.parentRunId"


def ablation_run(uri: str, experiment: str) -> tuple[str, bool]:
    """The experiment's ablation run (tag dist2.kind = ablation) and whether it is new: the one found, else one
    created, named after the experiment. An ablation continued with --resume, or reported again, keeps its parent."""
    client = tracking.quick_client(uri)
    exp_id = tracking.experiment_id(uri, experiment)
    found = client.search_runs([exp_id], f"tags.`{tracking.KIND_TAG}` = '{ABLATION_KIND}'", order_by=["start_time ASC"])
    if found:
        return found[0].info.run_id, False
    return client.create_run(exp_id, run_name=experiment, tags={tracking.KIND_TAG: ABLATION_KIND}).info.run_id, True


def open_ablation_run(uri: str, experiment: str, source: Path, sizes: dict[str, float]) -> str:
    """The ablation's parent run, marked running, with its file and the grid's size (metrics: a grid may grow)."""
    client = tracking.quick_client(uri)
    run_id, _ = ablation_run(uri, experiment)
    client.update_run(run_id, status="RUNNING")
    client.log_artifact(run_id, str(source))
    client.log_batch(run_id, metrics=tracking.metrics_at(sizes, 0))
    return run_id


def end_ablation_run(uri: str, run_id: str, status: str) -> None:
    """Close the parent run; an unreachable store warns (the grid's own outcome stands)."""
    try:
        tracking.quick_client(uri).set_terminated(run_id, status)
    except Exception as exc:
        log.warning("MLflow %s unreachable (%s); the ablation's run %s stays open", uri, exc.__class__.__name__,
                    run_id)


def log_summary(uri: str, experiment: str, artifacts: list[Path], metrics: dict[str, float],
                run_id: str | None = None) -> str:
    """The report's files (and folders, the gallery) as artifacts of the ablation run under report/, replacing
    those of an earlier report: `run_id` (the running ablation's parent, closed by `dist2 ablate` itself), else
    the experiment's ablation run, whose status a standalone `dist2 report` leaves alone, or a new one it closes."""
    client = tracking.quick_client(uri)
    created = False
    if run_id is None:
        run_id, created = ablation_run(uri, experiment)
    for path in artifacts:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"report/{Path(path).name}")
        else:
            client.log_artifact(run_id, str(path), artifact_path="report")
    if metrics:
        client.log_batch(run_id, metrics=tracking.metrics_at(metrics, 0))
    if created:
        client.set_terminated(run_id, "FINISHED")
    return run_id
