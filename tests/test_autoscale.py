"""`dist2 ablate --address` on a real autoscaling Ray cluster: Ray's own autoscaler (the monitor `ray start --head
--autoscaling-config` runs) with its fake multi-node provider, which launches real local raylets as the nodes of
the declared node types. The head has no CPU and no worker node runs at submission: only the grid's own request to
the autoscaler brings one up (Tune asks for nothing while no trial fits the cluster's capacity)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, ray_start, short_temp_dir, stop_cluster, write_ablation

NODE_TYPE = {"resources": {"CPU": 2, "object_store_memory": 128 * 2**20}, "node_config": {}, "min_workers": 0,
             "max_workers": 2}


def _autoscaling_config(path: Path, gcs_address: str) -> Path:
    """An autoscaler config for Ray's fake multi-node provider: a 0-CPU head and a 2-CPU worker type."""
    provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": gcs_address}
    empty_lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                   "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                   "rsync_filter")
    config = {"cluster_name": "dist2-autoscale", "max_workers": 2, "provider": provider,
              "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                                            "max_workers": 0},
                                       "cpu2": NODE_TYPE},
              "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
              "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
              **{key: [] for key in empty_lists}}
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def autoscaling_cluster():
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    port = free_port()
    with short_temp_dir("dist2-autoscale-") as temp:
        config = _autoscaling_config(temp / "autoscaler.json", f"127.0.0.1:{port}")
        try:  # a head that failed part-way is stopped too
            ray_start(env, "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                      f"--dashboard-port={free_port()}", f"--autoscaling-config={config}", f"--temp-dir={temp}",
                      f"--ray-client-server-port={free_port()}")
            yield {"address": f"127.0.0.1:{port}", "env": env}
        finally:
            stop_cluster(port)  # this cluster only (the fake nodes are its monitor's children)


def _ablate(cluster, ablation: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist2", "ablate", str(ablation), "--address", cluster["address"],
                           *extra], env=cluster["env"], capture_output=True, text=True, timeout=600)


def test_a_trial_no_node_type_can_hold_is_refused_before_anything_runs(autoscaling_cluster, pair, tmp_path):
    out = tmp_path / "runs"
    ablation = write_ablation(tmp_path / "toowide.yaml", pair, out, [{"method": ["student"]}],
                              resources={"num_workers": 1, "cpus_per_worker": 4})
    result = _ablate(autoscaling_cluster, ablation)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "resources: one worker needs {CPU: 4}; no node type of the cluster's autoscaler " \
           "(cpu2, ray.head.default) has that much CPU (at most 2)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # no run folder, no MLflow store


def test_the_grid_asks_the_autoscaler_for_nodes_and_runs_on_them(autoscaling_cluster, pair, tmp_path):
    out = tmp_path / "runs"
    ablation = write_ablation(tmp_path / "scaled.yaml", pair, out, [{"method": ["student"], "seed": [0, 1]}],
                              resources={"num_workers": 1, "cpus_per_worker": 1})
    # The wait timeout turns a grid nobody scales up for into a failure rather than a hang.
    result = _ablate(autoscaling_cluster, ablation, "--wait-timeout", "180")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("scaled").experiment_id])
    trials = [r for r in runs if r.data.params.get("method") in ("teacher", "student")]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    # The head has no CPU: every trial ran on a node the autoscaler launched for the grid's request.
