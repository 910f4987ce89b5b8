"""`dist2 bench --cluster-join ABLATION`: what a node joining mid-grid buys, on real local Ray clusters.

The ablation runs twice, each time with `dist2 ablate --address` on a fresh local cluster (`ray start --head`)
of one node with `--cpus` CPUs, its teachers trained beforehand (in the first run's teacher phase, cached by
config hash, so both grids start alike):
  - "one node": the grid runs on that node alone;
  - "+ a node after trial 1": a second node of the same size joins (`ray start --address`) as soon as the
    first grid trial has finished.
Printed: the grid's wall time and packing efficiency (Σ trial CPU-seconds / Σ cluster CPU-seconds) from the
ablation's run, and, for the second, the time from the node's `ray start` returning to the first trial started on
it (MLflow run start, node from the run's `dist2.node_ids` tag). Both nodes share this machine's cores: on a
small machine the second node adds trial slots, not compute.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from tabulate import tabulate

from dist2 import tracking
from dist2.ablation.parent_run import ABLATION_KIND


def _ray(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], check=True, capture_output=True, timeout=120)


def local_cluster_processes(port: int) -> list:
    """The running processes of the local cluster whose GCS listens on `port`: those that name its address or port
    (GCS, raylets, dashboard, monitor, agents) and their children (the workers). A zombie (a worker whose raylet
    has gone, not yet reaped) holds nothing and is not counted."""
    import psutil

    roots = [proc for proc in psutil.process_iter(["cmdline"])
             if proc.pid != os.getpid() and _names_gcs(port).search(" ".join(proc.info["cmdline"] or []))]
    return _running({child for root in roots for child in _children(root)} | set(roots))


def stop_local_cluster(port: int, grace: float = 2.0) -> None:
    """Stop the Ray nodes of the local cluster whose GCS listens on `port` (`local_cluster_processes`), and nothing
    else: `ray stop` would stop every Ray of this user on the machine (another user's job, a running ablation).

    SIGTERM, then SIGKILL for what still runs after `grace` seconds, as `ray stop` does with a longer grace: a
    raylet drains for ~10 s after SIGTERM, and the GCS and the autoscaler's monitor do not exit on it at all; a
    cluster stopped here has nothing left to drain."""
    import psutil

    procs = local_cluster_processes(port)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    if not _stopped_within(procs, grace):
        for proc in _running(procs):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _stopped_within(procs, 5.0)
    # `ray start` (a joining node too) records its cluster as the one a plain ray.init() on this machine connects
    # to; `ray stop` removes that record, and so must we, or the next ray.init() tries the dead cluster.
    from ray._private.utils import get_ray_address_file  # Ray has no public name for it

    record = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):
        if _names_gcs(port).search(record.read_text()):
            record.unlink()


def _names_gcs(port: int) -> re.Pattern:
    return re.compile(rf"(:|--gcs_server_port=){port}(\D|$)")  # HOST:PORT in any flag, or the GCS's own


def _stopped_within(procs, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running(procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _running(procs) -> list:
    import psutil

    def runs(proc) -> bool:
        try:
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [proc for proc in procs if runs(proc)]


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _grid_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if r.data.params.get("method") not in (None, "teacher")]


def _one(ablation: Path, out: Path, name: str, cpus: int, join: bool) -> dict:
    port = 6400 + os.getpid() % 1000
    _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
         "--include-dashboard=false", f"--object-store-memory={128 * 2**20}", "--disable-usage-stats",
         f"--ray-client-server-port={port + 1}", f"--dashboard-agent-listen-port={port + 2}")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    joined = None
    try:
        driver = subprocess.Popen([sys.executable, "-m", "dist2", "ablate", str(ablation), "--address",
                                   f"127.0.0.1:{port}", "--set", f"name={name}", "--set", f"output_dir={out}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while join and joined is None and driver.poll() is None:
            time.sleep(0.5)
            try:
                done = any(r.info.status == "FINISHED" for r in _grid_runs(uri, name))
            except Exception:  # the store is being created
                continue
            if done:
                _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                     f"--object-store-memory={128 * 2**20}", "--disable-usage-stats",
                     f"--dashboard-agent-listen-port={port + 3}")
                joined = time.time()
        if driver.wait() != 0:
            raise SystemExit(f"dist2 ablate {ablation} failed (exit {driver.returncode})")
    finally:
        stop_local_cluster(port)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name).experiment_id
    report = next(r for r in client.search_runs([experiment])
                  if r.data.tags.get(tracking.KIND_TAG) == ABLATION_KIND)
    row = {"grid": name, "grid wall s": report.data.metrics["grid_wall_s"],
           "packing efficiency": report.data.metrics["grid_packing_efficiency"], "join → first trial on it s": ""}
    if joined is not None:
        runs = sorted(_grid_runs(uri, name), key=lambda r: r.info.start_time)
        first_node = runs[0].data.tags["dist2.node_ids"]
        on_new = [r.info.start_time / 1000 for r in runs if r.data.tags["dist2.node_ids"] != first_node]
        row["join → first trial on it s"] = f"{min(on_new) - joined:.1f}" if on_new else "never"
    return row


def bench_cluster_join(ablation: Path, cpus: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        rows = [_one(ablation, out, "one_node", cpus, join=False),
                _one(ablation, out, "joined_node", cpus, join=True)]
    print(f"\n{ablation}: {cpus}-CPU nodes, all on this machine ({os.cpu_count()} cores)")
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
