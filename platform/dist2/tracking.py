"""MLflow: every dist2 run is exactly one MLflow run.

The driver opens the run (params = the flattened config, keys as in the YAML; tags), or reopens it when a run
is continued (its id is kept in each checkpoint's metrics.json); rank 0 logs each epoch's metrics while
training; the driver fills in any epoch a tracking outage made it miss, logs the artifacts and closes the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelStatus, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from dist2.artifacts import CATEGORIES_FILE, CONFIG, METRICS
from dist2.config import ExperimentConfig, flatten
from dist2.errors import RunFailed, UserError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "dist2"
KIND_TAG = "dist2.kind"  # run tag: train, distill, or the ablation's parent run (ABLATION_KIND)
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


def _metrics(record: dict, step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in record.items() if isinstance(v, (int, float))]


# How often rank 0 says it is alive (metrics train/step and train/img_per_s) and samples the node (MLflow's system
# metrics, averaged over SYSTEM_SAMPLES samples): about two points a minute, fine for hour-long runs.
HEARTBEAT_ENV, HEARTBEAT_DEFAULT_S = "DIST2_HEARTBEAT_S", 30.0
SYSTEM_SAMPLE_S, SYSTEM_SAMPLES = 10, 3  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _SAMPLES_BEFORE_LOGGING override
HEARTBEAT_STEP, HEARTBEAT_RATE = "train/step", "train/img_per_s"
SYSTEM_HOST_TAG = "dist2.system_metrics_host"  # the node MLflow's system/* metrics describe
DATA_CONTEXT_TAG = "mlflow.data.context"  # a dataset input's role: train or val


def _heartbeat_interval() -> float:
    try:
        seconds = float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_DEFAULT_S))
        if seconds > 0:
            return seconds
    except ValueError:
        pass
    log.warning("%s=%r is not a number of seconds above 0; the heartbeat comes every %g s", HEARTBEAT_ENV,
                os.environ.get(HEARTBEAT_ENV), HEARTBEAT_DEFAULT_S)
    return HEARTBEAT_DEFAULT_S


class EpochLogger:
    """Rank 0's logging: its datasets, a heartbeat while it trains, the node's system metrics, and each epoch. An
    unreachable server warns and keeps the epoch for the next try; an epoch that is already in the run (logged
    before a worker failure sent training back a checkpoint) is skipped."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.uri, self.run_id = quick_client(uri), uri, run_id
        self.pending: list[dict] = []
        self.beat: tuple[float, int] | None = None  # (time, images) at the last heartbeat
        self.quiet_until = 0.0
        self.heartbeat_s = _heartbeat_interval()
        self.monitor = None
        try:
            self.logged = {m.step for m in self.client.get_metric_history(run_id, "epoch")}
        except Exception:
            self.logged = set()  # the driver fills in what is missing at the end

    def _warn(self, what: str, exc: Exception) -> None:
        log.warning("MLflow %s unreachable (%s); %s not logged", self.uri, exc.__class__.__name__, what)

    def set_tags(self, tags: dict[str, str]) -> None:
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as exc:
            self._warn(f"tags {tags}", exc)

    def log_datasets(self, describe: Callable[[], list[dict]]) -> None:
        """The run's dataset inputs, from `describe()`'s records (`data.build.describe`). A continued run logs them
        again: MLflow keeps one input per dataset and run."""
        try:
            inputs = [DatasetInput(Dataset(r["name"], r["digest"], r["source_type"], json.dumps(r["source"]),
                                           profile=json.dumps(r["profile"])),
                                   tags=[InputTag(DATA_CONTEXT_TAG, r["context"])]) for r in describe()]
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as exc:
            self._warn("the datasets", exc)

    def start_system_metrics(self) -> None:
        """MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml finds one) of this node."""
        self.set_tags({SYSTEM_HOST_TAG: socket.gethostname()})
        # Its INFO lines at every start and stop are not dist2's (set once: the monitor logs from its thread).
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_SAMPLE_S,
                                                samples_before_logging=SYSTEM_SAMPLES, resume_logging=True,
                                                tracking_uri=self.uri)
            self.monitor.start()  # a thread; it stops by itself when the run is no longer RUNNING
        except Exception as exc:
            self._warn("system metrics", exc)

    def stop_system_metrics(self) -> None:
        if self.monitor is None:
            return
        monitor, self.monitor = self.monitor, None
        monitor.finish()
        # The monitor publishes after its first interval, and stopped earlier it drops its samples: a run shorter
        # than that would show no node metrics at all. Publish one sample then.
        try:
            if not any(name.startswith("system/") for name in self.client.get_run(self.run_id).data.metrics):
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as exc:
            self._warn("system metrics", exc)

    def heartbeat(self, step: int, images: int) -> None:
        """Called after every training step (global step, images trained by all workers so far): logs the step and
        the recent throughput at the first step and every DIST2_HEARTBEAT_S seconds (30), so that a stuck run can
        be told from a slow one. A missed heartbeat is not retried, and after one the next waits ten intervals."""
        now = time.monotonic()
        if now < self.quiet_until or (self.beat is not None and now - self.beat[0] < self.heartbeat_s):
            return
        stamp = int(time.time() * 1000)
        metrics = [Metric(HEARTBEAT_STEP, float(step), stamp, step)]
        if self.beat is not None and now > self.beat[0]:
            metrics.append(Metric(HEARTBEAT_RATE, (images - self.beat[1]) / (now - self.beat[0]), stamp, step))
        self.beat = (now, images)
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:
            self._warn(f"the heartbeat at step {step}", exc)
            self.quiet_until = now + 10 * self.heartbeat_s  # each try may wait for the timeout: do not slow training

    def log(self, record: dict) -> None:
        if record["epoch"] not in self.logged:
            self.pending.append(record)
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=_metrics(self.pending[0], self.pending[0]["epoch"]))
                self.logged.add(self.pending.pop(0)["epoch"])
        except Exception as exc:
            log.warning("MLflow %s unreachable (%s); %d epoch(s) of metrics kept, retried next epoch and at the "
                        "end of the run", self.uri, exc.__class__.__name__, len(self.pending))


def close_run(uri: str, run_id: str, history: list[dict], artifacts: list[Path], status: str = "FINISHED",
              tags: dict[str, str] | None = None) -> None:
    """Log every epoch of `history` the run is missing, the artifacts and tags, and set the final status."""
    client = quick_client(uri)
    try:
        logged = {m.step for m in client.get_metric_history(run_id, "epoch")}
        for record in history:
            if record["epoch"] not in logged:
                client.log_batch(run_id, metrics=_metrics(record, record["epoch"]))
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


# A grid is a tree in the MLflow UI: one parent run per ablation (its file, size, wall time, packing and report),
# every teacher and trial run its child.
ABLATION_KIND, PARENT_TAG = "ablation", "mlflow.parentRunId"


def ablation_run(uri: str, experiment: str) -> tuple[str, bool]:
    """The experiment's ablation run (tag dist2.kind = ablation) and whether it is new: the one found, else one
    created, named after the experiment. An ablation continued with --resume, or reported again, keeps its parent."""
    client = quick_client(uri)
    exp_id = experiment_id(uri, experiment)
    found = client.search_runs([exp_id], f"tags.`{KIND_TAG}` = '{ABLATION_KIND}'", order_by=["start_time ASC"])
    if found:
        return found[0].info.run_id, False
    return client.create_run(exp_id, run_name=experiment, tags={KIND_TAG: ABLATION_KIND}).info.run_id, True


def open_ablation_run(uri: str, experiment: str, source: Path, sizes: dict[str, float]) -> str:
    """The ablation's parent run, marked running, with its file and the grid's size (metrics: a grid may grow)."""
    client = quick_client(uri)
    run_id, _ = ablation_run(uri, experiment)
    client.update_run(run_id, status="RUNNING")
    client.log_artifact(run_id, str(source))
    client.log_batch(run_id, metrics=_metrics(sizes, 0))
    return run_id


def end_ablation_run(uri: str, run_id: str, status: str) -> None:
    """Close the parent run; an unreachable store warns (the grid's own outcome stands)."""
    try:
        quick_client(uri).set_terminated(run_id, status)
    except Exception as exc:
        log.warning("MLflow %s unreachable (%s); the ablation's run %s stays open", uri, exc.__class__.__name__,
                    run_id)


def log_summary(uri: str, experiment: str, artifacts: list[Path], metrics: dict[str, float],
                run_id: str | None = None) -> str:
    """The report's files (and folders, the gallery) as artifacts of the ablation run under report/, replacing
    those of an earlier report: `run_id` (the running ablation's parent, closed by `dist2 ablate` itself), else
    the experiment's ablation run, whose status a standalone `dist2 report` leaves alone, or a new one it closes."""
    client = quick_client(uri)
    created = False
    if run_id is None:
        run_id, created = ablation_run(uri, experiment)
    for path in artifacts:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"report/{Path(path).name}")
        else:
            client.log_artifact(run_id, str(path), artifact_path="report")
    if metrics:
        client.log_batch(run_id, metrics=_metrics(metrics, 0))
    if created:
        client.set_terminated(run_id, "FINISHED")
    return run_id
