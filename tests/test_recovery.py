"""A run that loses what it runs on: a Ray Train worker (restored from the newest complete checkpoint) or its
`mlflow server` (training goes on, every epoch logged once)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    epochs_logged,
    free_port,
    only_run,
    read_json,
    run_cli,
    run_store,
    start_mlflow_server,
    stop,
    tiny_config,
    write_config,
)


def test_a_worker_lost_right_after_a_checkpoint_resumes_from_it_not_from_scratch(tmp_path, synth_root):
    """Rank 1 exits the instant epoch K's checkpoint is complete (DIST2_TEST_EXIT_AFTER_EPOCH: before Ray's
    controller may have registered it), once mid-run (K=1) and once after the last epoch (K=2, nothing left to
    train). Each restarted worker group must continue after epoch K, not train it again: every epoch is trained
    once (one line each, its wall-clock img_per_s the same in the log, metrics.json and MLflow) and logged once,
    and the run ends with its final files."""
    cfg = tiny_config(tmp_path, synth_root, train={"epochs": 2, "lr_steps": []},
                      ray={"num_workers": 2, "max_failures": 2})
    cfg_path = write_config(tmp_path / "tiny.yaml", cfg)
    result = subprocess.run([sys.executable, "-m", "dist2", "train", str(cfg_path)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "DIST2_TEST_EXIT_AFTER_EPOCH": "1,2:1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # The console carries dist2's lines, not Ray Train's per-report and checkpoint lines nor the placement-group
    # cleaner's State API warnings (the local Ray's workers are quieted).
    for noise in ("Reporting training result", "Checkpoint successfully created", "PlacementGroupCleaner"):
        assert noise not in output, noise
    assert "continuing" not in output  # one launch: the restarts were Ray Train's
    for lost_after in (1, 2):  # each restarted group restored the checkpoint its predecessor was lost after
        assert f"resuming tiny after epoch {lost_after}" in output, output[-3000:]
    lines = {e: re.findall(rf"\bepoch {e}: .*img_per_s=([0-9.e+-]+)", output) for e in (1, 2)}
    assert [len(found) for found in lines.values()] == [1, 1], output[-3000:]
    history = read_json(tmp_path / "runs/tiny/metrics.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    client = run_store(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, run.info.run_id) == [1, 2]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "img_per_s")}
    for epoch in (1, 2):
        kept = history[epoch - 1]["img_per_s"]
        assert f"{kept:.4g}" == lines[epoch][0]
        assert logged[epoch] == pytest.approx(kept, rel=1e-12)
    assert (tmp_path / "runs/tiny/model.pth").is_file()


def _mlflow_server(port: int, store: Path) -> subprocess.Popen:
    return start_mlflow_server(port, f"sqlite:///{store / 'server.db'}", store / "artifacts")


def test_tracking_server_unreachable_at_start_then_dropping_mid_run(tmp_path, synth_root):
    cfg_path = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, synth_root,
                                                                train={"epochs": 5, "lr_steps": []}))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    result = run_cli("train", cfg_path, "--tracking-uri", uri)
    assert result.returncode == 2, result.stderr
    assert f"MLflow tracking store {uri} is not usable" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs/tiny").exists()  # no training happened

    # A real server; it goes away after the first epoch and comes back three epochs later: training goes on with
    # warnings, and every epoch ends up in the run exactly once.
    server = _mlflow_server(port, tmp_path)
    driver = subprocess.Popen([sys.executable, "-m", "dist2", "train", str(cfg_path), "--tracking-uri", uri,
                               "--experiment", "served"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for epoch, action in ((1, "stop"), (4, "start")):
            marker = tmp_path / f"runs/tiny/epoch_{epoch:04d}/metrics.json"
            while not marker.exists() and driver.poll() is None:
                time.sleep(0.05)
            if action == "stop":
                stop(server)
            else:
                server = _mlflow_server(port, tmp_path)
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output
        assert "unreachable" in output
        client = MlflowClient(uri)
        run = only_run(client, "served")
        assert run.info.status == "FINISHED" and epochs_logged(client, run.info.run_id) == [1, 2, 3, 4, 5]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.pth", "metrics.json"}
    finally:
        stop(server)
