"""`dist2 ablate` on a real two-node Ray cluster on loopback (`ray start --head` + `ray start --address`), driven
through `ray job submit` with Ray's token auth and through `--address`, logging to a real `mlflow server` on a real
PostgreSQL and to SQLite: teachers trained once and reused, Train inside Tune across both nodes, resume after the
driver is killed, and the ablation file's mistakes."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.entities import LoggedModelStatus, ViewType
from mlflow.tracking import MlflowClient

import mlflow_ui
from dist2.methods import EVAL_VERSION
from dist2.tracking import RUN_DIR_TAG

from conftest import REPO, run_cli, write_ablation


def _runs(uri: str, experiment: str, view: int = ViewType.ACTIVE_ONLY):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], run_view_type=view) if found else []


def _poll_runs(uri: str, experiment: str) -> list:
    try:
        return _runs(uri, experiment)[1]
    except Exception:  # the store is being created by the driver
        return []


def _grid(runs) -> list:
    return [r for r in runs if r.data.params.get("method") not in (None, "teacher")]


def _max_overlap(runs, before: float = float("inf")) -> int:
    """The most runs that were open at once (MLflow start/end times), counting runs started before `before` only."""
    events = sorted([(r.info.start_time / 1000, 1) for r in runs if r.info.start_time / 1000 < before]
                    + [(r.info.end_time / 1000, -1) for r in runs if r.info.start_time / 1000 < before])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_a_grid_waits_for_a_node_and_uses_nodes_that_join_later(cluster, pair, out, tmp_path):
    """Submitted to a cluster with no CPU at all (the head's is 0), the ablation waits instead of refusing; a node
    joining ~20 s later runs the teacher and the first trials one at a time (2-CPU trials on a 3-CPU node), and a
    second node joining mid-grid is used by the remaining trials at once (three remain when it is started, each
    four epochs: it takes a trial on joining unless joining takes longer than two trials, ~40 s here)."""
    assert not cluster["nodes"], "this test runs first, on the bare head"
    ablation = write_ablation(tmp_path / "growgrid.yaml", pair, out,
                              [{"method": ["student"], "seed": [0, 1]}, {"method": ["di"], "num_strategies": [1, 2]}],
                              set=["train.epochs=4"], teacher_set=["train.epochs=1"],  # the module's teacher
                              resources={"num_workers": 1, "cpus_per_worker": 2}, tables=["table1", "gallery"])
    uri = f"sqlite:///{out / 'mlflow.db'}"
    log = tmp_path / "ablate.log"
    driver = subprocess.Popen([sys.executable, "-m", "dist2", "ablate", str(ablation), "--address",
                               cluster["address"]], env=cluster["env"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # the ablation's own run opens once the driver has checked the cluster
        while not _poll_runs(uri, "growgrid"):
            assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-3000:]  # not refused
            time.sleep(1)
        time.sleep(8)  # time to start a teacher, were there a CPU for one
        assert driver.poll() is None, log.read_text()[-3000:]  # waiting
        assert [r.data.tags["dist2.kind"] for r in _poll_runs(uri, "growgrid")] == ["ablation"]  # nothing started
        cluster["add_node"]()
        deadline = time.monotonic() + 600
        while not any(r.info.status == "FINISHED" for r in _grid(_poll_runs(uri, "growgrid"))):
            assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        second = cluster["add_node"]()
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        driver.kill()
    runs = [r for r in _poll_runs(uri, "growgrid") if r.data.tags.get("dist2.kind") != "ablation"]
    grid = _grid(runs)
    assert len(grid) == 4 and len({r.info.run_name for r in grid}) == 4
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 5  # the grid and its teacher
    # The gallery: per image, the teacher, the student (seed 0), the best DI cell and its teacher head (probe),
    # drawn from each run's own weights in MLflow, linked from results.md and logged to the pictured runs.
    report = out / "growgrid" / "report"
    gallery = (report / "results.md").read_text().split("## Gallery", 1)[1]
    head = [c.strip() for c in gallery.split("\n|", 1)[1].split("\n", 1)[0].strip("|").split("|")]
    assert head[:2] == ["teacher", "student"] and head[2].startswith("+ DI (N2N") and head[3].endswith("(probe)")
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", gallery)
    assert len(links) == 4 * 4 and all((report / link).stat().st_size > 100 for link in links)
    student = next(r for r in grid if r.data.params["method"] == "student" and r.data.params["seed"] == "0")
    client = MlflowClient(uri)
    logged = sorted(a.path for a in client.list_artifacts(student.info.run_id, "gallery/student"))
    assert logged == [f"gallery/student/{Path(link).name}" for link in links[1::4]] + [
        "gallery/student/predictions.json"]  # its four pictures and its detections as COCO results
    assert _max_overlap(grid, before=second) == 1  # one node of 3 CPUs: one 2-CPU trial at a time
    assert _max_overlap(grid) == 2  # the second node took a trial as soon as it joined
    assert len({r.data.tags["dist2.node_ids"] for r in grid}) == 2


def test_wait_timeout_ends_a_job_no_node_can_hold_with_exit_3_and_the_resume_command(cluster, pair, out, tmp_path):
    """No node holds a 4-CPU trial and, without an autoscaler, one may still be added by hand: the job waits,
    and --wait-timeout ends it with what it waited for, leaving no MLflow run open."""
    cluster["grow"]()
    ablation = write_ablation(tmp_path / "toobig.yaml", pair, out, [{"method": ["student"]}],
                              resources={"num_workers": 1, "cpus_per_worker": 4})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dist2", "ablate", str(ablation), "--address",
                             cluster["address"], "--wait-timeout", "3"], env=cluster["env"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    err = result.stderr
    assert "waited 3 s (--wait-timeout) with no trial running: one trial needs {CPU: 4}; the cluster has 5 CPU" \
        in err, err[-3000:]
    assert f"continue with dist2 ablate {ablation} --resume" in err and "Traceback" not in err
    assert time.monotonic() - started < 120
    assert not [r for r in _poll_runs(f"sqlite:///{out / 'mlflow.db'}", "toobig") if r.info.status == "RUNNING"]


def test_gpu_trials_take_one_declared_gpu_each_and_get_cuda_visible_devices(cluster, pair, out, tmp_path):
    """Nodes that declare one GPU each (`ray start --num-gpus 1`): one-GPU trials run one per GPU slot (two of
    the three at once although the CPUs hold five), each on its own node, and Ray gives each worker its GPU as
    CUDA_VISIBLE_DEVICES (train.device: cpu computes on the CPU: there is no real GPU here)."""
    cluster["grow"]()
    ablation = write_ablation(tmp_path / "gpugrid.yaml", pair, out, [{"method": ["student"], "seed": [0, 1, 2]}],
                              resources={"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1})
    result = subprocess.run([sys.executable, "-m", "dist2", "ablate", str(ablation), "--address",
                             cluster["address"]], env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = _grid(_poll_runs(f"sqlite:///{out / 'mlflow.db'}", "gpugrid"))
    assert len(grid) == 3 and all(r.info.status == "FINISHED" for r in grid)
    assert _max_overlap(grid) == 2
    assert {r.data.tags["dist2.cuda_visible_devices"] for r in grid} == {"0"}
    assert len({r.data.tags["dist2.node_ids"] for r in grid}) == 2
    # One torch thread per trial (cpus_per_worker: 1), and the report's hardware line says it computed on the CPU.
    assert all(re.fullmatch(r"\S+ \d+ CPU cores, 1 torch thread\(s\), no GPU; torch .+", r.data.tags["dist2.machine"])
               for r in grid)


@pytest.fixture(scope="module")
def resumed(cluster, pair, out, tmp_path_factory) -> dict:
    """`dist2 ablate` killed mid-grid, once a trial has finished and another is part-way (its epoch 1
    checkpointed), then run again with --resume: its store, and what the first run had left at the kill."""
    cluster["grow"]()
    tmp = tmp_path_factory.mktemp("resume")
    ablation = write_ablation(tmp / "resumegrid.yaml", pair, out,
                              [{"method": ["student"]}, {"method": ["di"], "num_strategies": [1, 2]}],
                              set=["train.epochs=2"], teacher_set=["train.epochs=1"],  # the module's teacher
                              resources={"num_workers": 1, "cpus_per_worker": 1},
                              # Two trials, then the third: it is part-way when the first two have finished
                              # (trials started together end together, their runs closed at once).
                              max_concurrent=2)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    env = {**cluster["env"]}
    first = subprocess.Popen([sys.executable, "-m", "dist2", "ablate", str(ablation), "--address",
                              cluster["address"]], env=env, stdout=(tmp / "first.log").open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    finished, part_way = [], {}
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
        runs = _poll_runs(uri, "resumegrid")
        grid = _grid(runs)
        finished = [r for r in grid if r.info.status == "FINISHED"]
        # A trial between its epochs: epoch 1's checkpoint complete, epoch 2 not yet.
        part_way = {r.info.run_name: r.info.run_id for r in grid if r.info.status == "RUNNING"
                    and (Path(r.data.tags[RUN_DIR_TAG]) / "epoch_0001/metrics.json").is_file()
                    and not (Path(r.data.tags[RUN_DIR_TAG]) / "epoch_0002").exists()}
        if finished and part_way:
            break
    assert finished and part_way and first.poll() is None, "no moment with a finished and a part-way trial"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    parents = [r.info.run_id for r in runs if r.data.tags.get("dist2.kind") == "ablation"]
    before = {r.info.run_name: (r.info.end_time, (Path(r.data.tags[RUN_DIR_TAG]) / "model.pth").stat().st_mtime)
              for r in finished}
    second = subprocess.run([sys.executable, "-m", "dist2", "ablate", str(ablation), "--resume", "--address",
                             cluster["address"]], env=env, capture_output=True, text=True, timeout=900)
    return {"uri": uri, "second": second, "part_way": part_way, "before": before, "parents": parents}


def test_resume_after_the_driver_is_killed(resumed):
    """Finished trials are not rerun, the part-way one continues in its own MLflow run, every trial ends with
    exactly one MLflow run (deleted ones counted), each epoch logged once; the grid keeps its parent run."""
    second, uri, part_way, before = resumed["second"], resumed["uri"], resumed["part_way"], resumed["before"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "no grid state to restore" not in second.stderr  # Tuner.restore, not a fresh grid
    # Only dist2's lines: no Tune configuration box or TensorBoard hint, no Ray Train report lines.
    for noise in ("Configuration for experiment", "TensorBoard", "Reporting training result", "PlacementGroupCleaner"):
        assert noise not in second.stderr + second.stdout, noise

    client, runs = _runs(uri, "resumegrid")
    trials = [r for r in runs if r.data.params.get("method") not in (None, "teacher")]
    names = [r.info.run_name for r in trials]
    assert sorted(names) == sorted(set(names)) and len(names) == 3  # one run per trial
    assert all(r.info.status == "FINISHED" for r in trials)
    student = next(r for r in trials if r.data.params["method"] == "student")
    assert (student.data.params["strategies"], student.data.params["num_strategies"]) == ("", "0")
    for run in trials:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2]
        if run.info.run_name in part_way:  # continued in the run it started in, and no other was ever opened
            assert run.info.run_id == part_way[run.info.run_name]
            assert [r.info.run_id for r in _runs(uri, "resumegrid", ViewType.ALL)[1]
                    if r.info.run_name == run.info.run_name] == [run.info.run_id]
        if run.info.run_name in before:
            # finished before the kill: neither trained again nor its MLflow run touched
            weights = Path(run.data.tags[RUN_DIR_TAG]) / "model.pth"
            assert (run.info.end_time, weights.stat().st_mtime) == before[run.info.run_name]
    teacher = [r for r in runs if r.data.params.get("method") == "teacher"]
    assert len(teacher) == 1 and teacher[0].info.status == "FINISHED"
    assert "teacher(s) (0 to train)" in second.stderr

    # A tree in the MLflow UI: one parent for the whole ablation, the same before the kill and after the resume,
    # holding the ablation file and the report; every teacher and trial run is its child.
    parent = [r for r in runs if r.data.tags.get("dist2.kind") == "ablation"]
    assert [r.info.run_id for r in parent] == resumed["parents"] and len(parent) == 1
    parent = parent[0]
    assert (parent.info.run_name, parent.info.status) == ("resumegrid", "FINISHED")
    assert {r.data.tags.get("mlflow.parentRunId") for r in trials + teacher} == {parent.info.run_id}
    assert (parent.data.metrics["grid_trials"], parent.data.metrics["grid_teachers"]) == (3, 1)
    assert parent.data.metrics["grid_wall_s"] > 0 and 0 < parent.data.metrics["grid_packing_efficiency"] <= 1
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"resumegrid.yaml", "report"} <= logged
    # The command printed at the end opens the experiment in the UI's training view, with dist2's columns.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert f"MLflow UI on this store: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open " \
           f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" \
           "&viewStateShareKey=dist2" in second.stdout
    view = json.loads(experiment.tags["mlflow.sharedViewState.dist2"])
    assert view["selectedColumns"][:4] == ["attributes.`Dataset`", "attributes.`Models`", "metrics.`mAP`",
                                           "metrics.`teacher_head_probe_mAP`"]
    assert "report/results.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_every_run_of_a_grid_logs_its_data_its_node_a_heartbeat_and_a_model(resumed):
    """What the MLflow UI's Dataset, System metrics and Models views show: the train and val sets (generator
    settings and a digest of the annotations), rank 0's node metrics, the step heartbeat and the trained detector."""
    client, runs = _runs(resumed["uri"], "resumegrid")
    children = [r for r in runs if r.data.tags.get("dist2.kind") != "ablation"]
    assert len(children) == 4
    for run in children:
        inputs = {(d.dataset.name, [t.value for t in d.tags if t.key == "mlflow.data.context"][0]): d.dataset
                  for d in run.inputs.dataset_inputs}
        assert len(run.inputs.dataset_inputs) == 2, run.info.run_name  # once each, the continued run's too
        assert sorted(inputs) == [("synthetic-hard train", "train"), ("synthetic-hard val", "val")], run.info.run_name
        train = inputs[("synthetic-hard train", "train")]
        assert train.source_type == "synthetic" and len(train.digest) == 16
        assert json.loads(train.profile)["images"] == 16 and json.loads(train.source)["num_train"] == 16
        # The Models column's link: one usable model (and no upload left pending by the kill).
        models = [client.get_logged_model(o.model_id).status for o in run.outputs.model_outputs]
        assert models.count(LoggedModelStatus.READY) == 1 and LoggedModelStatus.PENDING not in models, models
        # Measured by today's evaluation, the reused teacher too (its run folder's metrics.json says so).
        assert run.data.tags["dist2.eval_version"] == str(EVAL_VERSION), run.info.run_name
        if "dist2.reused_from" in run.data.tags:
            continue  # the module's teacher, trained by the first test's grid: recorded here, not trained
        assert "system/cpu_utilization_percentage" in run.data.metrics, run.info.run_name
        assert run.data.tags["dist2.system_metrics_host"] == socket.gethostname()
        assert min(m.value for m in client.get_metric_history(run.info.run_id, "train/step")) == 1  # first step
    # Every run of the grid trained on the same data, the continued one too (its inputs were not logged twice).
    assert len({d.dataset.digest for r in children for d in r.inputs.dataset_inputs}) == 2
    report = (Path(resumed["uri"].removeprefix("sqlite:///")).parent / "resumegrid/report/results.md").read_text()
    assert "Command: `dist2 ablate" in report and "**Evaluation**" not in report  # nothing to warn of


def test_reevaluating_a_grid_reproduces_what_its_runs_logged(resumed, tmp_path):
    """ablations/reevaluate.py on a grid the current code ran: every run's final checkpoint, evaluated again, gives
    the metrics the run logged (training never reads an evaluation), and the report is written from them; the
    store is only read. The experiment given twice (as a grid and a later grid sharing its cached teacher would
    be): each run counts once."""
    _, runs = _runs(resumed["uri"], "resumegrid")
    script = importlib.util.spec_from_file_location("reevaluate", REPO / "ablations/reevaluate.py")
    reevaluate = importlib.util.module_from_spec(script)
    script.loader.exec_module(reevaluate)  # in this process: a subprocess would spend seconds on its imports
    assert reevaluate.main(["resumegrid", "resumegrid", "--tracking-uri", resumed["uri"], "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "reevaluated.json").read_text())
    assert len(record) == 4  # the teacher's record, the student, DI with 1 and 2 strategies
    for name, metrics in record.items():
        assert {"mAP", "AR100", "AP/circle"} <= metrics["reevaluated"].keys(), name
        assert ("teacher_head_probe_mAP" in metrics["reevaluated"]) == (metrics["method"] != "teacher"), name
        # the report's columns (AP, each category's AP, the teacher-head measures) as the run logged them
        assert {"mAP", "APs", "AP/circle"} <= metrics["logged"].keys(), name
        for key, logged in metrics["logged"].items():
            assert metrics["reevaluated"][key] == pytest.approx(logged, abs=1e-6, nan_ok=True), (name, key)
    report = (tmp_path / "results.md").read_text()
    assert "re-evaluated by `python ablations/reevaluate.py resumegrid" in report and "## Table 1" in report
    assert f"\n{len(record)} finished run(s)." in report  # not twice as many
    assert len(_runs(resumed["uri"], "resumegrid")[1]) == len(runs)


@pytest.mark.skipif(not mlflow_ui.available(), reason="needs Debian's chromium and chromium-driver, and selenium")
def test_the_mlflow_ui_opens_the_grid_as_a_tree_of_named_runs_with_its_columns(resumed):
    """The link `dist2 ablate` prints, opened in headless Chromium on a real `mlflow ui`: the training-runs view
    (not the GenAI overview), the ablation's run with every run of the grid under it by its new name, and the
    columns of dist2's view, each trial's dataset and model."""
    second = resumed["second"]
    printed = next(line for line in second.stdout.splitlines() if line.startswith("MLflow UI on this store: "))
    client, runs = _runs(resumed["uri"], "resumegrid")
    names = [r.info.run_name for r in runs if r.data.tags.get("dist2.kind") != "ablation"]
    # Wide enough for every column: the table draws only the columns in view.
    with mlflow_ui.mlflow_ui(resumed["uri"]) as port, mlflow_ui.chromium(width=2800) as driver:
        link = printed.split("then open ")[1].replace(":5000/", f":{port}/")
        page = mlflow_ui.open_runs(driver, link, "resumegrid")
    lines = page.splitlines()
    assert "Runs" in lines and "Overview" not in lines and "Training runs" not in lines  # model training, not GenAI
    assert "You're viewing a shared view." in page  # dist2's view, from the experiment
    assert len(set(names)) == 4 and "student s0" in names and "teacher R10" in names
    at = {name: lines.index(name) for name in ["resumegrid", *names]}  # every run, listed by its readable name
    assert min(at.values()) == at["resumegrid"]  # the parent first, its children under it
    for column in ("Dataset", "Models", "mAP", "teacher_head_probe_mAP", "method", "strategies", "seed"):
        assert column in lines, column
    assert page.count("synthetic-hard train") == len(names) and lines.count("model") == len(names)


def test_job_submission_to_a_two_node_cluster_logs_to_mlflow_on_postgresql(cluster, tracking_server, pair, out,
                                                                          tmp_path):
    """`ray job submit --working-dir . -- dist2 ablate ...` with Ray's token auth: the teacher is trained once,
    the trial launches a TorchTrainer whose two workers run on both nodes, and every run lands in the
    PostgreSQL-backed MLflow server with the schema. The teacher (same config as the resume test's, other
    resources) is trained once in all: found in the shared cache, it is recorded, not retrained."""
    cluster["grow"]()
    trained_before = (out / "teachers").is_dir()
    # Two workers of 2 CPUs and 1 GPU fit no single node (3 and 2 CPUs, 1 GPU each): the worker group spans both.
    ablation = write_ablation(tmp_path / "jobgrid.yaml", pair, out, [{"method": ["di"], "strategies": [["N2N"]]}],
                              resources={"num_workers": 2, "cpus_per_worker": 2, "gpus_per_worker": 1})
    # The README's command, with this interpreter's dist2 (the test's venv need not be on PATH).
    command = [cluster["ray"], "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
               sys.executable, "-m", "dist2", "ablate", str(ablation), "--tracking-uri", tracking_server["uri"]]
    for _ in range(30):  # a node's job agent can still be starting on a busy machine: Ray says to try again
        job = subprocess.run(command, env=cluster["env"], capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    assert f"report: {out / 'jobgrid' / 'report' / 'results.md'}" in job.stdout

    client, runs = _runs(tracking_server["uri"], "jobgrid")
    by_method = {r.data.params.get("method"): r for r in runs if r.data.tags.get("dist2.kind") != "ablation"}
    assert sorted(by_method) == ["di", "teacher"]
    parent = next(r for r in runs if r.data.tags.get("dist2.kind") == "ablation")
    assert [r.data.tags["mlflow.parentRunId"] for r in by_method.values()] == [parent.info.run_id] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    di = by_method["di"].data
    assert {k: di.params[k] for k in ("detector", "teacher", "student", "strategies", "num_strategies",
                                      "lambda_di", "lambda_feat", "seed")} == {
        "detector": "fcos", "teacher": "R10", "student": "MNV2", "strategies": "N2N", "num_strategies": "1",
        "lambda_di": "1.0", "lambda_feat": "", "seed": "0"}
    assert di.tags["dist2.ablation"] == "jobgrid"
    assert (di.tags["dist2.world_size"], di.tags["dist2.nodes"]) == ("2", "2")  # a worker group on both nodes
    assert di.tags["dist2.cuda_visible_devices"] == "0;0"  # each worker: its node's one GPU, as Ray set it
    assert {"mAP", "AP50", "AP75", "APs", "APm", "APl", "teacher_head_mAP"} <= set(di.metrics)
    teacher_dirs = list((out / "teachers").iterdir())
    assert len(teacher_dirs) == 1 and (teacher_dirs[0] / "model.pth").is_file()
    assert ("dist2.reused_from" in by_method["teacher"].data.tags) == trained_before
    assert by_method["teacher"].info.status == "FINISHED"
    # The hardware beside the numbers: rank 0's host, computing on CPU (train.device: cpu) though GPUs are held.
    assert re.fullmatch(r"2 workers, rank 0 on \S+ \d+ CPU cores, 2 torch thread\(s\), no GPU; torch .+",
                        di.tags["dist2.machine"])
    report = (out / "jobgrid" / "report" / "results.md").read_text()
    assert f"Command: `dist2 ablate {ablation}`" in report
    assert re.search(rf"Measured on: .*{re.escape(di.tags['dist2.machine'])} \(\d run\(s\)\)", report)
    assert MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_experiment_by_name("jobgrid") is None  # all on the server


def test_ablation_file_mistakes_exit_2_before_anything_runs(pair, tmp_path, capsys):
    from dist2.cli import main

    out = tmp_path / "runs"
    cases = [
        ({"grid": [{"method": ["dist3"]}]}, "grid.0.method.0"),
        ({"grid": [{"method": ["di"], "strategies": [["N2N"]], "num_strategies": [2]}]}, "not both"),
        ({"grid": [{"method": ["di"]}], "skip": [{"metod": "di"}]}, "unknown key(s) metod"),
        ({"grid": [{"method": ["di"]}], "pairs": [{**pair, "student": str(tmp_path / "nope.yaml")}]},
         "student config"),
        ({"grid": [{"method": ["hint"], "strategies": [["B2B"]]}]}, "defined at N2N only"),
    ]
    for i, (change, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        spec = {"name": "bad", "output_dir": str(out), "pairs": [pair], "grid": [{"method": ["student"]}], **change}
        path.write_text(yaml.safe_dump(spec))
        assert main(["ablate", str(path)]) == 2, change
        err = capsys.readouterr().err
        assert message in err and str(path) in err and "Traceback" not in err, err
    # The same through the installed command, as a user meets it.
    result = run_cli("ablate", tmp_path / "bad0.yaml")
    assert result.returncode == 2 and "dist2: error:" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # nothing started: no run folder, no MLflow store


def test_mlflow_run_names_lead_with_what_differs_and_never_meet(monkeypatch):
    from dist2.ablation.spec import grid_runs, load_ablation, teacher_runs, teachers_in_use

    monkeypatch.chdir(REPO)  # the ablation files name experiment files relative to the repository root

    def names(path: str, *overrides: str) -> list[str]:
        spec = load_ablation(Path(path), overrides)
        teachers = teacher_runs(spec, Path(path))
        runs = grid_runs(spec, Path(path), teachers)
        return [r.label for r in teachers_in_use(teachers, runs) + runs]

    assert sorted(names("ablations/quickstart.yaml")) == sorted([
        "teacher ResNet10-C64", "student s0", "student s1", "dist2 All2All s0", "dist2 All2All s1", "fi N2N s0",
        "di N2N s0"])
    table1 = names("ablations/quick_table1.yaml")  # two pairs of one label: told apart by their detector
    assert {"fcos teacher ResNet10-C64", "retina teacher ResNet10-C64", "fcos dist2 All2All s2",
            "retina nonlocal N2N s0", "retina student s1"} <= set(table1)
    assert len({name[:25] for name in table1}) == len(table1) == 38  # distinct in a 25-character column
    # A pair that `skip` empties trains no teacher, and one pair left needs no pair tags.
    fcos_only = names("ablations/quick_table1.yaml", "skip=[{detector: retinanet}]")
    assert [n for n in fcos_only if "teacher" in n] == ["teacher ResNet10-C64"] and len(fcos_only) == 1 + 18
    full = names("ablations/quick_full.yaml")  # λ sweeps: a λ appears where the grid's λ values differ
    assert len(set(full)) == len(full) and "fcos dist2 All2All λ2 s0" in full and "fcos di N2N+B2B λ1 s0" in full


def test_set_teacher_set_and_student_set_reach_the_runs_they_name(pair, tmp_path):
    from dist2.ablation.spec import grid_runs, load_ablation, teacher_runs

    path = tmp_path / "sets.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sets", "output_dir": str(tmp_path / "runs"), "pairs": [pair],
        "grid": [{"method": ["student", "di"], "seed": [0, 1]}],
        "set": ["train.epochs=3", "train.lr=0.03"], "teacher_set": ["train.epochs=5"],
        "student_set": ["train.lr=0.002", "model.head_convs=2"]}))
    spec = load_ablation(path)
    [teacher] = teacher_runs(spec, path)
    runs = grid_runs(spec, path, [teacher])
    assert (teacher.cfg.train.epochs, teacher.cfg.train.lr, teacher.cfg.model.head_convs) == (5, 0.03, 4)
    assert len(runs) == 4
    assert {(r.cfg.train.epochs, r.cfg.train.lr, r.cfg.model.head_convs) for r in runs} == {(3, 0.002, 2)}
