"""Running an experiment: the driver that launches Ray Train workers, and what each worker does.

Driver (`launch`): config -> run folder and MLflow run -> TorchTrainer -> final files and MLflow status.
  - One worker with no cluster address runs in this process, without Ray (no worker group: no start-up cost,
    the run folder is the checkpoint storage). Otherwise the workers are a TorchTrainer worker group on a local
    Ray started for the run, or on the cluster at --address / RAY_ADDRESS: gloo on CPU, NCCL on GPU.
  - A run whose name has checkpoints under storage_path continues from the latest one (same MLflow run).
Worker (`_worker`): build the task, restore the latest checkpoint, train; after each epoch rank 0 writes a
checkpoint (model.pth, resume.pth, metrics.json) that `ray.train.report` persists, then logs the metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform as host
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from dist2 import checkpoint, distributed, tracking
from dist2.config import ExperimentConfig, flatten
from dist2.distributed import resolve_device
from dist2.engine.distill import build_distill_task
from dist2.engine.loop import NonFiniteLoss, epochs
from dist2.engine.train import build_train_task
from dist2.errors import RunFailed, UserError

log = logging.getLogger(__name__)

TASKS = {"train": build_train_task, "distill": build_distill_task}
CONFIG = "config.yaml"  # the experiment as it ran (overrides applied)
METRICS = "metrics.json"  # {"history": [per-epoch metrics], "final": {...}, "mlflow_run_id": ...}
LOCAL_RAY_TRAIN_SETTINGS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
OBJECT_STORE_BYTES = 256 * 2**20  # the local Ray's object store: the workers pass almost nothing through it


# ---------------------------------------------------------------- worker side

def _write_checkpoint(folder: Path, task, state: dict, job: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(yaml.safe_dump(job["cfg"], sort_keys=False))
    checkpoint.atomic_save(task.deploy.state_dict(), folder / checkpoint.WEIGHTS)
    checkpoint.atomic_save(state, folder / checkpoint.RESUME)
    # metrics.json last, and atomically: a folder that has it is a complete checkpoint (see _latest_checkpoint).
    history = state["history"]
    tmp = folder / (METRICS + ".tmp")
    tmp.write_text(json.dumps({"history": history, "final": history[-1], "mlflow_run_id": job["run_id"]}, indent=1))
    os.replace(tmp, folder / METRICS)


def _restore(job: dict) -> dict | None:
    if not job["local"]:
        import ray.train

        latest = ray.train.get_checkpoint()  # after a worker-group restart, or a Ray run of the same name
        if latest is not None:
            with latest.as_directory() as folder:
                return checkpoint.load(Path(folder) / checkpoint.RESUME, "resume state")
    if job["resume_from"]:
        return checkpoint.load(Path(job["resume_from"]) / checkpoint.RESUME, "resume state")
    return None


def _prune(run_storage: Path, keep: int) -> None:
    for old in sorted(run_storage.glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _placement() -> dict:
    """Where this worker runs: its Ray node and the GPUs Ray gave it (CUDA_VISIBLE_DEVICES, per rank); empty
    outside Ray (`dist2 train` in-process)."""
    ray = sys.modules.get("ray")  # not imported: not on Ray (and not worth importing to find that out)
    if ray is None or not ray.is_initialized():
        return {}
    return {"node": ray.get_runtime_context().get_node_id(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _machine(device: torch.device, world_size: int) -> str:
    """What a run's numbers were measured on, for the report beside its tables: rank 0's host (the others match
    in any sane worker group) and the world size."""
    compute = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(device)}" if device.type == "cuda"
               else "no GPU")
    workers = f"{world_size} workers, rank 0 on " if world_size > 1 else ""
    return (f"{workers}{host.machine()} {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), "
            f"{compute}; torch {torch.__version__}")


def _worker(job: dict) -> dict | None:
    """One worker's run; returns a failure record ({"failure": reason, ...}) or None. In local mode it runs in
    the driver's process and the run folder is the storage; in a worker group `ray.train.report` persists each
    epoch's checkpoint (from rank 0) and is a barrier every worker passes."""
    on_ray = not job["local"]
    if on_ray:
        import ray
        import ray.train
        import ray.train.torch
    cfg = ExperimentConfig.model_validate(job["cfg"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    # ray.use_gpu: false (--no-gpu) keeps an in-process run on the CPU too, whatever train.device says.
    wanted = "cpu" if cfg.ray.use_gpu is False else cfg.train.device
    device = ray.train.torch.get_device() if on_ray and job["use_gpu"] else resolve_device(wanted)
    rank = distributed.rank()
    logger = tracking.EpochLogger(job["tracking_uri"], job["run_id"]) if rank == 0 else None
    placements = distributed.gather([_placement()])
    if logger is not None:
        logger.set_tags({tracking.MACHINE_TAG: _machine(device, len(placements))})
    if logger is not None and placements[0]:
        nodes = list(dict.fromkeys(p["node"] for p in placements))
        logger.set_tags({"dist2.world_size": str(len(placements)), "dist2.nodes": str(len(nodes)),
                         "dist2.node_ids": ",".join(nodes),
                         "dist2.cuda_visible_devices": ";".join(p["gpus"] for p in placements)})
    try:
        task, train_ds, val_ds = TASKS[job["kind"]](cfg, device)
        for metrics, state in epochs(cfg, task, train_ds, val_ds, device, _restore(job)):
            name = f"epoch_{state['epoch']:04d}"
            folder = None
            if rank == 0:
                folder = Path(tempfile.mkdtemp()) if on_ray else Path(job["run_storage"]) / name
                _write_checkpoint(folder, task, state, job)
            if on_ray:
                ray.train.report(metrics, checkpoint=folder and ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=name)
            if rank == 0:
                if on_ray:
                    shutil.rmtree(folder, ignore_errors=True)  # persisted to storage_path by the report
                else:
                    _prune(Path(job["run_storage"]), cfg.ray.num_to_keep)
                logger.log(metrics)  # after the checkpoint: an epoch is never logged twice, see EpochLogger
    except (NonFiniteLoss, UserError) as exc:
        # Every worker meets these at the same point (workers agree on a non-finite loss before stopping), so
        # every worker returns normally: Ray would only retry a failure that must happen again.
        failure = {"failure": str(exc), "failure_kind": "config" if isinstance(exc, UserError) else "loss"}
        if isinstance(exc, NonFiniteLoss):
            failure.update(failure_term=exc.term, failure_epoch=exc.epoch + 1, failure_step=exc.step)
        return failure  # rank 0's reaches the driver as the run's return value
    return None


# ---------------------------------------------------------------- driver side

def _latest_checkpoint(run_storage: Path | None) -> Path | None:
    found = sorted(run_storage.glob(f"epoch_*/{METRICS}")) if run_storage is not None else []
    return found[-1].parent if found else None


def _check_same_experiment(cfg: ExperimentConfig, latest: Path | None) -> None:
    """Continuing a run is only allowed with the same experiment: its schedule length and its resources may
    change, nothing else."""
    saved = latest / CONFIG if latest else None
    if saved is None or not saved.is_file():
        return
    before = flatten(ExperimentConfig.model_validate(yaml.safe_load(saved.read_text())))
    now = flatten(cfg)
    free = ("train.epochs", "ray.", "train.lr_steps")
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not k.startswith(free))
    if changed:
        raise UserError(f"{cfg.name}: a run of this name exists in {cfg.run_dir} with a different config "
                        f"({', '.join(changed[:8])}); pick another name or delete that folder")


def start_ray(address: str | None = None):
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A Ray just for this run: no preemption watcher (nothing preempts a laptop), no print patching (it
        # defeats silencing pycocotools), and a faster controller poll so that the run ends sooner.
        for key, value in LOCAL_RAY_TRAIN_SETTINGS.items():
            os.environ.setdefault(key, value)
        ray.init(num_cpus=os.cpu_count(), object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=True)


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


def _fit_on_ray(cfg: ExperimentConfig, job: dict, address: str | None):
    """Run `_worker` as a TorchTrainer worker group; returns (failure record or None, final checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    start_ray(address)
    scaling, threads = _scaling(cfg)
    on_gpu = scaling.use_gpu and cfg.train.device != "cpu"
    job = {**job, "use_gpu": on_gpu, "threads": threads}
    trainer = TorchTrainer(
        _worker, train_loop_config=job, scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)))
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise RunFailed(f"{cfg.name}: training failed: {str(exc).splitlines()[0]}") from None
    return result.return_value, result.checkpoint


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers do not run in the driver's working directory: every path in the config is made absolute."""
    update = {"output_dir": cfg.output_dir.absolute()}
    if cfg.data.root is not None:
        update["data"] = cfg.data.model_copy(update={"root": cfg.data.root.absolute()})
    if cfg.teacher is not None:
        update["teacher"] = cfg.teacher.model_copy(update={"config": cfg.teacher.config.absolute(),
                                                           "checkpoint": cfg.teacher.checkpoint.absolute()})
    return cfg.model_copy(update=update)


def finished_run(cfg: ExperimentConfig) -> dict | None:
    """The run folder's metrics.json ({"history", "final", "mlflow_run_id"}) if the run has finished."""
    path = cfg.run_dir / METRICS
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record and record["final"]["epoch"] >= cfg.train.epochs else None


def launch(cfg: ExperimentConfig, kind: str, source: Path, address: str | None = None,
           tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
           params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
           in_process: bool | None = None) -> dict:
    """Run (or continue) the experiment; returns its final metrics. Files: cfg.run_dir/{config.yaml,
    model.pth, resume.pth, metrics.json} and the epoch checkpoints under storage_path/name.

    `params` and `tags` are logged to MLflow beside the config. `in_process` forces (True) or forbids (False)
    running the one worker in this process; by default one worker runs here unless a cluster address is given.
    """
    cfg = _absolute_paths(cfg)
    storage_is_local = "://" not in cfg.storage_path
    run_storage = Path(cfg.storage_path).absolute() / cfg.name if storage_is_local else None
    if in_process is None:
        in_process = address is None and not os.environ.get("RAY_ADDRESS")
    local = in_process and cfg.ray.num_workers == 1 and storage_is_local
    latest = _latest_checkpoint(run_storage)
    _check_same_experiment(cfg, latest)
    previous = json.loads((latest / METRICS).read_text()) if latest else None
    if previous and previous["final"]["epoch"] >= cfg.train.epochs:
        if finished_run(cfg) is None:
            # Trained to the end but stopped before its run folder and MLflow run were closed: close them now.
            _copy_final(latest, cfg.run_dir)
            return close_finished(cfg, source, tracking.resolve_tracking_uri(tracking_uri, cfg.output_dir),
                                  previous["mlflow_run_id"])
        raise UserError(f"{cfg.name}: this run already finished its {cfg.train.epochs} epochs ({cfg.run_dir}); "
                        "pick another name, delete that folder, or raise train.epochs to continue it")
    uri = tracking.resolve_tracking_uri(tracking_uri, cfg.output_dir)
    run_id = tracking.open_run(uri, cfg, kind, previous and previous["mlflow_run_id"], experiment,
                               {"dist2.config": str(source), **(tags or {})}, params or {})
    if previous:
        log.info("%s: continuing after epoch %d of %d", cfg.name, previous["final"]["epoch"], cfg.train.epochs)
    job = {"cfg": cfg.model_dump(mode="json", by_alias=True), "kind": kind, "local": local, "use_gpu": False,
           "threads": None, "tracking_uri": uri, "run_id": run_id,
           "run_storage": str(run_storage) if run_storage else None, "resume_from": str(latest) if latest else None}
    try:
        if local:
            failure = _worker(job)
            final = _latest_checkpoint(run_storage)
        else:
            failure, final = _fit_on_ray(cfg, job, address)
    except RunFailed as exc:
        _close_failed(uri, run_id, run_storage, {"dist2.failure": str(exc)[:4000]})
        raise
    except BaseException as exc:  # a bug or an interrupt: the MLflow run must not stay RUNNING
        _close_failed(uri, run_id, run_storage, {"dist2.failure": repr(exc)[:4000]},
                      status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if failure is not None and failure["failure_kind"] == "config" and previous is None:
        # A mistake the workers found before training (e.g. the teacher guard): leave nothing behind.
        tracking.delete_run(uri, run_id)
        if run_storage is not None:
            shutil.rmtree(run_storage, ignore_errors=True)
        raise UserError(failure["failure"])
    if failure is not None:
        _close_failed(uri, run_id, run_storage, {f"dist2.{k}": str(v) for k, v in failure.items()})
        raise RunFailed(f"{cfg.name}: stopped: {failure['failure']}")
    _copy_final(final, cfg.run_dir)
    return close_finished(cfg, source, uri, run_id)


def close_finished(cfg: ExperimentConfig, source: Path, uri: str, run_id: str) -> dict:
    """Log a finished run's missing epochs and its artifacts to MLflow and close it; returns its final metrics."""
    history = json.loads((cfg.run_dir / METRICS).read_text())["history"]
    artifacts = [source, cfg.run_dir / CONFIG, cfg.run_dir / checkpoint.WEIGHTS, cfg.run_dir / METRICS]
    tracking.close_run(uri, run_id, history, artifacts)
    return history[-1]


def _copy_final(final, run_dir: Path) -> None:
    """The last epoch's checkpoint (a folder, or a Ray Checkpoint anywhere Ray stores them) into the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with final.as_directory() if hasattr(final, "as_directory") else contextlib.nullcontext(final) as folder:
        for name in (CONFIG, checkpoint.WEIGHTS, checkpoint.RESUME, METRICS):
            shutil.copyfile(Path(folder) / name, run_dir / name)


def _close_failed(uri: str, run_id: str, run_storage: Path | None, tags: dict, status: str = "FAILED") -> None:
    latest = _latest_checkpoint(run_storage)
    history = json.loads((latest / METRICS).read_text())["history"] if latest else []
    tracking.close_run(uri, run_id, history, [], status=status, tags=tags)
