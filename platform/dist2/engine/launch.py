"""Running an experiment, the driver's side: config -> MLflow run -> workers -> run folder and MLflow status.

  - One worker with no cluster address runs in this process, without Ray (no worker group: no start-up cost,
    the run folder is the checkpoint storage). Otherwise the workers (`engine.worker`) are a TorchTrainer worker
    group on a local Ray started for the run, or on the cluster at --address / RAY_ADDRESS: gloo on CPU, NCCL on
    GPU.
  - A run whose name has checkpoints under storage_path continues from the newest one, in the same MLflow run;
    one that trained to its last epoch but was not closed is closed (`engine.rundir`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from dist2 import tracking
from dist2.artifacts import CONFIG, METRICS, WEIGHTS
from dist2.config import ExperimentConfig
from dist2.engine.local_ray import start_ray
from dist2.engine.rundir import RunDir, best_epoch, read_record
from dist2.engine.worker import Job, run_worker
from dist2.errors import RunFailed, UserError
from dist2.methods import BEST_EPOCH_TAG, BEST_VALUE_TAG

log = logging.getLogger(__name__)


def _scaling(cfg: ExperimentConfig):
    """(ScalingConfig, torch threads per worker) for a worker group on the connected cluster."""
    import ray
    from ray.train import ScalingConfig

    use_gpu = cfg.ray.use_gpu
    if use_gpu is None:
        use_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and
                                                 ray.cluster_resources().get("GPU", 0) > 0)
    # use_gpu reserves each worker's GPUs (Ray sets CUDA_VISIBLE_DEVICES); train.device: cpu still computes on the
    # CPU over gloo (see _fit_on_ray), e.g. to test GPU placement on nodes that only declare GPUs.
    resources = cfg.ray.resources_per_worker
    if resources is None and not use_gpu:
        # Share this cluster's CPUs out: each worker gets as many torch threads as CPUs.
        resources = {"CPU": max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.ray.num_workers)}
    threads = int(resources["CPU"]) if resources and "CPU" in resources else None
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources), threads


def _fit_on_ray(cfg: ExperimentConfig, run: RunDir, job: Job, address: str | None) -> dict | None:
    """Run the workers as a TorchTrainer worker group, then copy its final checkpoint into the run folder;
    returns rank 0's failure record or None."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    start_ray(address)
    scaling, threads = _scaling(cfg)
    on_gpu = scaling.use_gpu and cfg.train.device != "cpu"
    trainer = TorchTrainer(
        run_worker, train_loop_config={"job": replace(job, use_gpu=on_gpu, threads=threads)}, scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             # Ray Train's own INFO lines (every report, every checkpoint, the worker list) are for
                             # Ray's developers; dist2 prints one line per epoch.
                             logging_config=LoggingConfig(log_level="WARNING")))
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise RunFailed(f"{cfg.name}: training failed: {str(exc).splitlines()[0]}") from None
    if result.return_value is None:
        # Ray's last registered checkpoint (anywhere Ray stores them, e.g. s3://), or none: a group restarted from
        # the run's own newest checkpoint after its last epoch reports nothing more.
        registered = result.checkpoint
        with registered.as_directory() if registered else contextlib.nullcontext() as folder:
            run.copy_final(run.newest(Path(folder) if folder else None))
    return result.return_value


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers do not run in the driver's working directory: every path in the config is made absolute."""
    update = {"output_dir": cfg.output_dir.absolute()}
    if cfg.model.init_checkpoint is not None:
        update["model"] = cfg.model.model_copy(update={"init_checkpoint": cfg.model.init_checkpoint.absolute()})
    if cfg.data.root is not None:
        update["data"] = cfg.data.model_copy(update={"root": cfg.data.root.absolute()})
    if cfg.teacher is not None:
        update["teacher"] = cfg.teacher.model_copy(update={"config": cfg.teacher.config.absolute(),
                                                           "checkpoint": cfg.teacher.checkpoint.absolute()})
    return cfg.model_copy(update=update)


def launch(cfg: ExperimentConfig, kind: str, source: Path, address: str | None = None,
           tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
           params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
           in_process: bool | None = None, reuse_finished: bool = False, run_name: str | None = None) -> dict:
    """Run (or continue) the experiment; returns its final metrics. Files: cfg.run_dir/{config.yaml,
    model.pth, resume.pth, metrics.json} and the epoch checkpoints under storage_path/name.

    `params` and `tags` are logged to MLflow beside the config; `run_name` names a new MLflow run (default: the
    run's own name). `in_process` forces (True) or forbids (False)
    running the one worker in this process; by default one worker runs here unless a cluster address is given.
    A run that has already finished is an error, unless `reuse_finished` (an ablation's trial run again).
    """
    cfg = _absolute_paths(cfg)
    run = RunDir(cfg)
    run.check_same_experiment()
    uri = tracking.resolve_tracking_uri(tracking_uri, cfg.output_dir)
    trained = run.trained()
    if trained is not None:
        return _trained_already(cfg, trained, source, uri, reuse_finished)
    if in_process is None:
        in_process = address is None and not os.environ.get("RAY_ADDRESS")
    local = in_process and cfg.ray.num_workers == 1 and run.checkpoints is not None
    latest = run.latest()
    previous = read_record(latest) if latest else None
    previous_id = previous and previous["mlflow_run_id"]
    run_id = tracking.open_run(uri, cfg, kind, previous_id, experiment,
                               {"dist2.config": str(source), **(tags or {})}, params or {}, run_name)
    if previous:
        log.info("%s: continuing after epoch %d of %d", cfg.name, previous["final"]["epoch"], cfg.train.epochs)
    job = Job(cfg=cfg.model_dump(mode="json", by_alias=True), kind=kind, tracking_uri=uri, run_id=run_id,
              local=local)
    try:
        if local:
            failure = run_worker({"job": job})
            if failure is None:
                run.copy_final(run.latest())
        else:
            failure = _fit_on_ray(cfg, run, job, address)
    except RunFailed as exc:
        _close_failed(uri, run_id, run, {"dist2.failure": str(exc)[:4000]})
        raise
    except BaseException as exc:  # a bug or an interrupt: the MLflow run must not stay RUNNING
        _close_failed(uri, run_id, run, {"dist2.failure": repr(exc)[:4000]},
                      status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if failure is not None and failure["failure_kind"] == "config" and previous_id is None:
        # A mistake the workers found before training (e.g. the teacher guard): leave nothing behind.
        tracking.delete_run(uri, run_id)
        if run.checkpoints is not None:
            shutil.rmtree(run.checkpoints, ignore_errors=True)
        raise UserError(failure["failure"])
    if failure is not None:
        _close_failed(uri, run_id, run, {f"dist2.{k}": str(v) for k, v in failure.items()})
        raise RunFailed(f"{cfg.name}: stopped: {failure['failure']}")
    return _close_finished(cfg, source, uri, run_id)


def _trained_already(cfg: ExperimentConfig, record: dict, source: Path, uri: str, reuse_finished: bool) -> dict:
    """A run that trained to its last epoch: closed now if it stopped before its MLflow run was (a crash, or a
    driver killed between its last checkpoint and the end), else reused or refused."""
    if tracking.run_status(uri, record["mlflow_run_id"]) != "FINISHED":
        return _close_finished(cfg, source, uri, record["mlflow_run_id"])
    if reuse_finished:
        return record["final"]
    raise UserError(f"{cfg.name}: this run already finished its {cfg.train.epochs} epochs ({cfg.run_dir}); "
                    "pick another name, delete that folder, or raise train.epochs to continue it")


def _close_finished(cfg: ExperimentConfig, source: Path, uri: str, run_id: str) -> dict:
    """Log a finished run's missing epochs and its artifacts to MLflow and close it; returns its final metrics."""
    history = read_record(cfg.run_dir)["history"]
    artifacts = [source, cfg.run_dir / CONFIG, cfg.run_dir / WEIGHTS, cfg.run_dir / METRICS]
    best = best_epoch(history, cfg.train.best_metric)
    tags = {} if best is None else {BEST_EPOCH_TAG: str(best["epoch"]),
                                    BEST_VALUE_TAG: f"{best[cfg.train.best_metric]:.4f}"}
    log_detector(cfg, uri, run_id)
    tracking.close_run(uri, run_id, history, artifacts, tags=tags)
    return history[-1]


def log_detector(cfg: ExperimentConfig, uri: str, run_id: str) -> None:
    """The run's detector as its MLflow model; a failure costs the run nothing but that model, and says why."""
    from dist2.export import scripted

    try:
        tracking.log_model(uri, run_id, lambda: scripted(cfg, cfg.run_dir / WEIGHTS))
    except Exception as exc:
        log.warning("%s: the MLflow model was not logged (%s: %s); model.pth is complete", cfg.name,
                    exc.__class__.__name__, str(exc).splitlines()[0][:300] if str(exc) else "")


def _close_failed(uri: str, run_id: str, run: RunDir, tags: dict, status: str = "FAILED") -> None:
    latest = run.latest()
    history = read_record(latest)["history"] if latest else []
    tracking.close_run(uri, run_id, history, [], status=status, tags=tags)
