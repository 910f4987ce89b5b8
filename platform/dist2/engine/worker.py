"""What each worker of a run does: build the task, continue from the newest checkpoint, train, checkpoint and log
every epoch.

In a Ray Train worker group `ray.train.report` persists rank 0's checkpoint of each epoch and is a barrier every
worker passes; rank 0 then logs the epoch to MLflow. Rank 0 also logs the run's datasets, a heartbeat every half
minute (train/step, train/img_per_s) and its node's system metrics (`epoch_logger.EpochLogger`). A run of one worker
on this machine (`Job.local`) runs in the driver's process without Ray and writes its checkpoints straight into the
run's folder.
"""

from __future__ import annotations

import contextlib
import os
import platform as host
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist2 import checkpoint, distributed, tracking
from dist2.artifacts import RESUME
from dist2.config import ExperimentConfig
from dist2.data.build import describe
from dist2.distributed import resolve_device
from dist2.engine.distill import build_distill_task
from dist2.engine.epoch_logger import EpochLogger
from dist2.engine.loop import NonFiniteLoss, epochs
from dist2.engine.rundir import RunDir, epoch_name, write_checkpoint
from dist2.engine.train import build_train_task
from dist2.errors import UserError
from dist2.methods import EVAL_VERSION

TASKS = {"train": build_train_task, "distill": build_distill_task}
# Test-only fault injection: "K", "K1,K2" or "K:RANK" makes that worker (rank 0 by default) exit the moment epoch
# K's checkpoint is complete, as a worker killed at that instant would (tests/test_ray.py).
EXIT_AFTER_EPOCH = "DIST2_TEST_EXIT_AFTER_EPOCH"


@dataclass(frozen=True)
class Job:
    """What the driver hands every worker: plain data (it is pickled to Ray workers)."""
    cfg: dict  # the experiment (absolute paths), validated again by each worker
    kind: str  # a TASKS key
    tracking_uri: str
    run_id: str  # the MLflow run every epoch is logged to
    local: bool  # one worker in the driver's process, no Ray
    use_gpu: bool = False  # the worker computes on the GPU Ray gave it
    threads: int | None = None  # torch threads per worker (its CPUs), None = torch's default


def _resume_state(run: RunDir, on_ray: bool) -> dict | None:
    """The newest complete checkpoint's resume state: Ray's (after a worker-group restart) or the run's own newest
    epoch, whichever is further on; None for a fresh start."""
    offered = None
    if on_ray:
        import ray.train

        offered = ray.train.get_checkpoint()
    with offered.as_directory() if offered is not None else contextlib.nullcontext() as ray_folder:
        registered = Path(ray_folder) if ray_folder else None
        newest = run.newest(registered)
        if newest is None:
            return None
        try:
            return checkpoint.load(newest / RESUME, "resume state")
        except UserError:
            if registered is None or newest == registered:
                raise
            # A folder Ray was still persisting when its worker died (its files land in no fixed order): Ray's
            # registered checkpoint is complete.
            return checkpoint.load(registered / RESUME, "resume state")


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


def _tag_placement(logger: EpochLogger | None, device: torch.device) -> None:
    placements = distributed.gather([_placement()])  # every worker takes part; rank 0 logs
    if logger is None:
        return
    logger.set_tags({tracking.MACHINE_TAG: _machine(device, len(placements)),
                     tracking.EVAL_VERSION_TAG: str(EVAL_VERSION)})
    if placements[0]:
        nodes = list(dict.fromkeys(p["node"] for p in placements))
        logger.set_tags({"dist2.world_size": str(len(placements)), "dist2.nodes": str(len(nodes)),
                         "dist2.node_ids": ",".join(nodes),
                         "dist2.cuda_visible_devices": ";".join(p["gpus"] for p in placements)})


def _injected_exit(epoch: int, rank: int, run: RunDir) -> None:
    wanted = os.environ.get(EXIT_AFTER_EPOCH)
    if wanted:
        # EPOCHS[:RANK], EPOCHS comma-separated: each restarted group resumes past the epoch it was lost after, so
        # one run meets each listed fault once.
        at_epochs, _, at_rank = wanted.partition(":")
        if epoch in {int(e) for e in at_epochs.split(",")} and rank == int(at_rank or 0):
            # Another rank's report can return while rank 0 is still persisting the checkpoint: wait for it to be
            # complete on disk, so that the exit lands exactly after it.
            deadline = time.monotonic() + 120
            while run.checkpoints is not None and run.latest() != run.epoch_folder(epoch) and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(1)


def run_worker(config: dict) -> dict | None:
    """One worker's run (a TorchTrainer's train_loop_per_worker, config {"job": Job}); returns a failure record
    ({"failure": reason, ...}) or None. Rank 0's return value reaches the driver."""
    job: Job = config["job"]
    on_ray = not job.local
    if on_ray:
        import ray.train
        import ray.train.torch
    cfg = ExperimentConfig.model_validate(job.cfg)
    run = RunDir(cfg)
    if job.threads:
        torch.set_num_threads(job.threads)
    # ray.use_gpu: false (--no-gpu) keeps an in-process run on the CPU too, whatever train.device says.
    wanted = "cpu" if cfg.ray.use_gpu is False else cfg.train.device
    device = ray.train.torch.get_device() if on_ray and job.use_gpu else resolve_device(wanted)
    rank = distributed.rank()
    logger = EpochLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    _tag_placement(logger, device)
    try:
        task, train_ds, val_ds = TASKS[job.kind](cfg, device)
        if logger is not None:
            logger.log_datasets(lambda: [describe(cfg.data, train_ds, "train"), describe(cfg.data, val_ds, "val")])
            logger.start_system_metrics()
        for metrics, state in epochs(cfg, task, train_ds, val_ds, device, _resume_state(run, on_ray),
                                     on_step=logger and logger.heartbeat):
            epoch = state["epoch"]
            folder = None
            if rank == 0:
                folder = Path(tempfile.mkdtemp()) if on_ray else run.epoch_folder(epoch)
                write_checkpoint(folder, task.deploy.state_dict(), state, job.cfg, job.run_id)
                run.keep_best(folder, state["history"])
            if on_ray:
                ray.train.report(metrics, checkpoint=folder and ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=epoch_name(epoch))
            _injected_exit(epoch, rank, run)
            if rank == 0:
                if on_ray:
                    shutil.rmtree(folder, ignore_errors=True)  # persisted to storage_path by the report
                else:
                    run.prune(cfg.ray.num_to_keep)
                logger.log(metrics)  # after the checkpoint: an epoch is never logged twice, see EpochLogger
    except (NonFiniteLoss, UserError) as exc:
        # Every worker meets these at the same point (workers agree on a non-finite loss before stopping), so
        # every worker returns normally: Ray would only retry a failure that must happen again.
        failure = {"failure": str(exc), "failure_kind": "config" if isinstance(exc, UserError) else "loss"}
        if isinstance(exc, NonFiniteLoss):
            failure.update(failure_term=exc.term, failure_epoch=exc.epoch + 1, failure_step=exc.step)
        return failure
    finally:
        if logger is not None:
            logger.stop_system_metrics()
    return None
