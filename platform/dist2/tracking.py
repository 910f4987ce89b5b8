"""MLflow: every dist2 run is exactly one MLflow run.

The driver opens the run (params = the flattened config, keys as in the YAML; tags), or reopens it when a run
is continued (its id is kept in each checkpoint's metrics.json); rank 0 logs each epoch's metrics while
training (`engine.epoch_logger`); the driver fills in any epoch a tracking outage made it miss, logs the
artifacts and closes the run. An ablation's own parent run: `ablation.parent_run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from mlflow.entities import LoggedModelStatus, Metric, Param
from mlflow.tracking import MlflowClient

from dist2.artifacts import CATEGORIES_FILE, CONFIG, METRICS
from dist2.config import ExperimentConfig, flatten
from dist2.errors import RunFailed, UserError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "dist2"
KIND_TAG = "dist2.kind"  # run tag: train, distill, or an ablation's parent run (ablation.parent_run.ABLATION_KIND)
REUSED_TAG = "dist2.reused_from"  # run tag: the MLflow run a recorded (reused) run repeats
MACHINE_TAG = "dist2.machine"  # run tag: the hardware a run's numbers come from (rank 0's host, world size)
COMMAND_TAG = "dist2.command"  # experiment tag: the command that runs the experiment's grid
RUN_DIR_TAG = "dist2.run_dir"  # run tag: the run's folder (config.yaml, model.pth, resume.pth, metrics.json)
EVAL_VERSION_TAG = "dist2.eval_version"  # run tag: the evaluation its numbers come from (methods.EVAL_VERSION)


def resolve_tracking_uri(uri: str | None, output_dir: Path) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else an SQLite store beside the runs. SQLite paths are made
    absolute: a Ray job runs in a temporary working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).absolute() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).absolute()
        uri = f"sqlite:///{path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_sqlite_store_once(path, uri)
    elif "://" not in uri:
        raise UserError(f"tracking URI {uri!r}: give sqlite:///PATH or a server's http(s)://HOST:PORT")
    return uri


def _create_sqlite_store_once(path: Path, uri: str) -> None:
    """MLflow creates an SQLite store's tables on first use, and two processes doing that at once (two `dist2
    train`s started together on a fresh store) both fail inside its migrations: create the store under a lock."""
    if path.is_file() and path.stat().st_size:
        return
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (path.is_file() and path.stat().st_size):
            SqlAlchemyStore(uri, _artifact_root(uri)).engine.dispose()


def _artifact_root(uri: str) -> str | None:
    """An embedded store keeps artifacts beside its database (MLflow would default to ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def quick_client(uri: str) -> MlflowClient:
    """An MLflow client that gives up on an unreachable server in seconds: MLflow's default retries a dead server
    for minutes, and a run must fail (or warn) fast instead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(uri)


def unusable(uri: str, exc: Exception) -> UserError:
    """The one-line error for a store that cannot be used: connection refused, DNS, HTTP errors alike."""
    return UserError(f"MLflow tracking store {uri} is not usable ({exc.__class__.__name__}: "
                     f"{str(exc).splitlines()[0][:300]}); start it, or pass --tracking-uri")


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model training.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def experiment_id(uri: str, experiment: str) -> str:
    """The id of the named experiment, created if needed. Raises UserError when the store is not usable."""
    client = quick_client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            try:
                return client.create_experiment(experiment, artifact_location=_artifact_root(uri),
                                                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except Exception:
                found = client.get_experiment_by_name(experiment)  # created by a process started beside us
                if found is None:
                    raise
        return found.experiment_id
    except Exception as exc:
        raise unusable(uri, exc) from None


def tag_experiment(uri: str, experiment: str, tags: dict[str, str]) -> None:
    client = quick_client(uri)
    exp_id = experiment_id(uri, experiment)
    for key, value in tags.items():
        client.set_experiment_tag(exp_id, key, value)


def experiment_tag(uri: str, experiment: str, key: str) -> str | None:
    found = quick_client(uri).get_experiment_by_name(experiment)
    return found.tags.get(key) if found else None


def open_run(uri: str, cfg: ExperimentConfig, kind: str, run_id: str | None, experiment: str,
             extra_tags: dict[str, str], extra_params: dict[str, str], run_name: str | None = None) -> str:
    """Start the MLflow run of `cfg` (or mark a resumed one running again). Raises UserError, before any
    training, when the tracking server cannot be reached.

    A new run replaces a RUNNING or KILLED run of the same run folder in the experiment: one whose process
    died before its first checkpoint, which nothing can continue (a FAILED run stays, as the record of why)."""
    client = quick_client(uri)
    try:
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        exp_id = experiment_id(uri, experiment)
        for stale in client.search_runs([exp_id], f"tags.`{RUN_DIR_TAG}` = '{cfg.run_dir}'"):
            if stale.info.status in ("RUNNING", "KILLED"):
                client.delete_run(stale.info.run_id)
        tags = {KIND_TAG: kind, RUN_DIR_TAG: str(cfg.run_dir), **extra_tags}
        run = client.create_run(exp_id, run_name=run_name or cfg.name, tags=tags)
        log_params(client, run.info.run_id, {**flatten(cfg), **extra_params})
        return run.info.run_id
    except UserError:
        raise
    except Exception as exc:
        raise unusable(uri, exc) from None


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    batch = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=batch[i:i + 100])


def metrics_at(record: dict, step: int) -> list[Metric]:
    """`record`'s numbers as MLflow metrics at `step`."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in record.items() if isinstance(v, (int, float))]


def close_run(uri: str, run_id: str, history: list[dict], artifacts: list[Path], status: str = "FINISHED",
              tags: dict[str, str] | None = None) -> None:
    """Log every epoch of `history` the run is missing, the artifacts and tags, and set the final status."""
    client = quick_client(uri)
    try:
        logged = {m.step for m in client.get_metric_history(run_id, "epoch")}
        for record in history:
            if record["epoch"] not in logged:
                client.log_batch(run_id, metrics=metrics_at(record, record["epoch"]))
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status)
    except Exception as exc:
        raise RunFailed(f"MLflow tracking store {uri} unreachable while closing run {run_id} "
                        f"({exc.__class__.__name__}); the run's own files are complete") from None


MODEL_ARTIFACT = "model"  # the run's MLflow model, beside model.pth


def log_model(uri: str, run_id: str, scripted: Callable[[], tuple[object, dict]]) -> None:
    """The trained detector as the run's MLflow model (the Models column), TorchScript as `dist2 export` writes
    it: `mlflow.pytorch.load_model(uri)([image])` gives its detections with torch and torchvision alone, and
    categories.json beside it maps labels to category ids and names. No signature or input example: MLflow's
    schemas cannot describe a detector's output (one dict of variable-length tensors per image), so the model is
    not served as a pyfunc. `scripted()` gives (the module, its labels); a run that has its model already (closed
    again after a crash) keeps that one, and one whose upload failed (MLflow marks that model FAILED) or was cut
    short (a killed process leaves it PENDING, and it is marked FAILED here) gets a new one."""
    import tempfile

    import mlflow
    import mlflow.pytorch
    import torch
    import torchvision

    client = quick_client(uri)
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    models = [client.get_logged_model(o.model_id) for o in outputs]
    if any(m.status == LoggedModelStatus.READY for m in models):
        return
    for m in models:
        if m.status == LoggedModelStatus.PENDING:  # nobody finishes it: the run is closed once, by its one closer
            client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
    model, labels = scripted()
    # Created here, in the run's experiment: left to itself, log_model files it under the fluent API's experiment.
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id)
    quiet = logging.getLogger("mlflow")
    level, uri_was_set, before = quiet.level, mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri()
    quiet.setLevel(logging.ERROR)  # its advice on pickles (this is TorchScript) and on signatures
    mlflow.set_tracking_uri(uri)  # log_model has no client: it takes the process's store
    try:
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
            categories = Path(tmp) / CATEGORIES_FILE
            categories.write_text(json.dumps(labels, indent=1))
            mlflow.pytorch.log_model(model, name=MODEL_ARTIFACT, run_id=run_id, model_id=logged.model_id,
                                     serialization_format="pickle", extra_files=[str(categories)],
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                       f"torchvision=={torchvision.__version__.split('+')[0]}"])
    finally:
        mlflow.set_tracking_uri(before if uri_was_set else None)
        quiet.setLevel(level)


def delete_run(uri: str, run_id: str) -> None:
    """A run that never trained (a configuration mistake found by the workers) leaves no MLflow run behind."""
    MlflowClient(uri).delete_run(run_id)


def run_status(uri: str, run_id: str) -> str:
    try:
        return quick_client(uri).get_run(run_id).info.status
    except Exception as exc:  # unreachable, or a store that does not hold the run: one line, not a traceback
        raise unusable(uri, exc) from None


def has_finished_run(uri: str, experiment: str, run_dir: Path) -> bool:
    client = quick_client(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'") if found else []
    return any(run.info.status == "FINISHED" for run in runs)


def record_finished_run(uri: str, experiment: str, cfg: ExperimentConfig, kind: str, history: list[dict],
                        params: dict[str, str], tags: dict[str, str], reused_from: str,
                        run_name: str | None = None) -> str:
    """A finished MLflow run for a run done before, MLflow run `reused_from` (a reused teacher): its params, tags
    and epochs' metrics, and, where that run is in this store, its datasets. (Its model is logged again, not linked:
    the UI's Models column shows only models of the run's own experiment.)"""
    client = quick_client(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name or cfg.name,
                            tags={KIND_TAG: kind, RUN_DIR_TAG: str(cfg.run_dir), REUSED_TAG: reused_from, **tags})
    log_params(client, run.info.run_id, {**flatten(cfg), **params})
    try:
        source = client.get_run(reused_from)
        client.log_inputs(run.info.run_id, datasets=source.inputs.dataset_inputs)
    except Exception as exc:  # another store's run: this record is complete without them
        log.info("%s: the datasets of run %s are not in %s (%s)", cfg.name, reused_from, uri, exc.__class__.__name__)
    close_run(uri, run.info.run_id, history, [cfg.run_dir / CONFIG, cfg.run_dir / METRICS])
    return run.info.run_id


# A view of an experiment's runs saved in the experiment (MLflow's shared view state: columns, sort; the tag its UI
# reads for the link's viewStateShareKey), which `dist2 ablate` sets and its printed link opens.
VIEW_TAG, VIEW_KEY = "mlflow.sharedViewState.", "dist2"


def view_tag(columns: list[str]) -> dict[str, str]:
    """The experiment tag of dist2's view: `columns` as MLflow names them ("metrics.`mAP`", "params.`seed`").
    Runs stay in the order they started: sorted by a metric, the UI would list them flat instead of under their
    ablation's run."""
    return {VIEW_TAG + VIEW_KEY: json.dumps({"selectedColumns": columns})}


def ui_command(uri: str, experiment: str, port: int = 5000) -> str:
    """How to open the MLflow UI on this store: for a tracking server its address, otherwise the `mlflow ui`
    command; then the experiment's runs in the model-training view, in dist2's view where it has one."""
    if uri.startswith(("http://", "https://")):
        base, command = uri.rstrip("/"), "open "
    else:
        base = f"http://127.0.0.1:{port}"
        command = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}, then open "
    found = quick_client(uri).get_experiment_by_name(experiment)
    view = f"&viewStateShareKey={VIEW_KEY}" if VIEW_TAG + VIEW_KEY in found.tags else ""
    return f"{command}{base}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning{view}"


@contextlib.contextmanager
def _environ(name: str, value: str):
    """An environment variable set for a while (MLflow reads some settings only from there)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _no_progress_bars():
    """MLflow without its artifact progress bars, which would fill a run's or a report's log."""
    return _environ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def download_artifacts(uri: str, run_id: str, names: list[str], dest: Path) -> dict[str, Path]:
    """Some of a run's top-level artifacts, downloaded into `dest`: {name: local path}."""
    client = quick_client(uri)
    with _no_progress_bars():
        return {name: Path(client.download_artifacts(run_id, name, str(dest))) for name in names}


def log_folder(uri: str, run_id: str, folder: Path, artifact_path: str) -> None:
    """A folder's files as artifacts of a run (finished or not) under `artifact_path`."""
    quick_client(uri).log_artifacts(run_id, str(folder), artifact_path=artifact_path)
