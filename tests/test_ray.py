"""Runs on Ray Train with the session's two-node cluster up (gloo on CPU), each one MLflow run."""

import pytest

from dist2.config import load_config

from conftest import (
    SMALL,
    assert_failed_on_a_non_finite_loss,
    cli_in_process,
    distill_config,
    epochs_logged,
    non_finite_config,
    only_run,
    read_json,
    run_cli,
    run_store,
    write_config,
)


def test_two_worker_distillation_on_two_nodes_is_one_mlflow_run_and_evaluates_like_one_process(tmp_path, teacher,
                                                                                                 cluster, capsys):
    """`dist2 distill --num-workers 2 --address` on the session's two-node cluster (token auth): the cluster's 5
    CPUs shared out make two 2-CPU workers, which no single node holds. --no-gpu: its GPUs are declared only."""
    cluster["grow"]()
    teacher_yaml, teacher_dir, root = teacher
    teacher_pth = teacher_dir / "model.pth"
    cfg = distill_config(tmp_path, root, teacher_yaml, teacher_pth)
    cfg["train"]["epochs"] = 2
    cfg["data"].update(SMALL)
    cfg_path = write_config(tmp_path / "d.yaml", cfg)
    result = run_cli("distill", cfg_path, "--num-workers", "2", "--address", cluster["address"], "--no-gpu",
                     env=cluster["env"])
    assert result.returncode == 0, result.stderr
    assert load_config(tmp_path / "runs/student_di/config.yaml").ray.num_workers == 2
    run_dir = tmp_path / "runs/student_di"
    history = read_json(run_dir / "metrics.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2]

    client = run_store(tmp_path)
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "student_di"
    assert run.data.params["distill.strategies"] == "['N2N', 'B2N']" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["dist2.world_size"] == "2" and run.data.tags["dist2.kind"] == "distill"
    assert run.data.tags["dist2.nodes"] == "2" and run.data.tags["dist2.cuda_visible_devices"] == ";"
    assert epochs_logged(client, run.info.run_id) == [1, 2]
    for key in ("loss_di/N2N", "loss_fi/B2N", "loss_det/classification", "lr", "img_per_s", "mAP", "AP50",
                "teacher_head_mAP"):
        assert run.data.metrics[key] == pytest.approx(history[-1][key], nan_ok=True), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"d.yaml", "config.yaml", "model.pth", "metrics.json"}

    # The workers' sharded evaluation (predictions gathered, COCOeval once) == one process on the same checkpoint:
    # the teacher (evaluated by the 2 workers before distilling), then the student and its teacher_head_mAP.
    out = tmp_path / "single.json"
    code, err = cli_in_process(capsys, "eval", teacher_yaml, "--checkpoint", teacher_pth, "--json", out)
    assert code == 0, err
    assert read_json(out)["mAP"] > 5 and read_json(out)["mAP"] == pytest.approx(history[-1]["teacher_mAP"], abs=1e-9)
    code, err = cli_in_process(capsys, "eval", cfg_path, "--checkpoint", run_dir / "resume.pth", "--teacher-head",
                               "--json", out)
    assert code == 0, err
    for key, value in read_json(out).items():
        assert value == pytest.approx(history[-1][key], abs=1e-9) if value is not None else \
            history[-1][key] != history[-1][key], key


def test_non_finite_loss_stops_every_worker_and_fails_the_run_with_its_reason(tmp_path, synth_root, cluster):
    """With several workers every one of them must stop at the same step (or the others would hang in the next
    all-reduce); the run ends with the reason, whichever worker saw it. The session's cluster is the machine's
    newest `ray start` meanwhile: a run given no address starts its own Ray all the same (it neither joins that
    cluster, as a plain ray.init() would, nor fails). One worker, in-process: test_train.py."""
    result = run_cli("train", non_finite_config(tmp_path, synth_root, workers=2), env=cluster["as_default"])
    assert_failed_on_a_non_finite_loss(tmp_path, result.returncode, result.stderr)
