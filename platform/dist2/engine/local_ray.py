"""The Ray a run or an ablation starts on this machine when no cluster address is given (or joins, when one is).

This module imports nothing heavy: `quiet_local_worker` runs first in every process of that local Ray.
"""

from __future__ import annotations

import logging
import os

LOCAL_RAY_TRAIN_SETTINGS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
OBJECT_STORE_BYTES = 256 * 2**20  # the local Ray's object store: the workers pass almost nothing through it


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
        # address="local": a plain ray.init() would join the newest `ray start` cluster on this machine (and refuse
        # num_cpus there), not start the run's own Ray as documented.
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": quiet_local_worker})


def quiet_local_worker() -> None:
    """Every worker process of a local Ray started by dist2 runs this first, to keep what only Ray's developers
    need off the console:
      - Ray Train's placement-group cleaner asks the State API every second whether its controller is alive; a
        local Ray without a dashboard has no State API, so each question would log a warning, and with another
        Ray on the machine the cleaner's thread would die with a traceback (the State API client cannot tell the
        clusters apart). The cleaner matters when a controller dies on a long-lived cluster; this Ray ends with
        the run.
      - each worker's "Reporting training result ..." line (its logger is named by file, so Ray Train's own
        log level does not reach it; dist2 prints one line per epoch)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    reporter = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(reporter).setLevel(logging.WARNING)
