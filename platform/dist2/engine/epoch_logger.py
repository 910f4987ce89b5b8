"""Rank 0's MLflow logging while a run trains: its datasets, a heartbeat, its node's system metrics and each
epoch (the driver opens and closes the run: `dist2.tracking`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Callable

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag

from dist2 import tracking

log = logging.getLogger(__name__)

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
        self.client, self.uri, self.run_id = tracking.quick_client(uri), uri, run_id
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
                oldest = self.pending[0]
                self.client.log_batch(self.run_id, metrics=tracking.metrics_at(oldest, oldest["epoch"]))
                self.logged.add(self.pending.pop(0)["epoch"])
        except Exception as exc:
            log.warning("MLflow %s unreachable (%s); %d epoch(s) of metrics kept, retried next epoch and at the "
                        "end of the run", self.uri, exc.__class__.__name__, len(self.pending))
