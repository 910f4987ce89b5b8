import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dist2.config import TrainConfig, load_config
from dist2.engine.epoch_logger import EpochLogger
from dist2.engine.schedule import build_optimizer
from dist2.methods import CLASS_AP, COCO_METRICS, COCO_RECALLS
from dist2.modeling import build_detector

from conftest import (
    assert_failed_on_a_non_finite_loss,
    cli_in_process,
    epochs_logged,
    non_finite_config,
    only_run,
    read_json,
    run_cli,
    run_store,
    tiny_config,
    write_config,
)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, synth_root) -> Path:
    """The tiny config trained two epochs in one go with `dist2 train` (in this process): its YAML (the run is in
    runs/tiny)."""
    from dist2.cli import main

    tmp = tmp_path_factory.mktemp("two_epochs")
    cfg_path = write_config(tmp / "tiny.yaml", tiny_config(tmp, synth_root))
    assert main(["train", str(cfg_path)]) == 0
    return cfg_path


def test_train_writes_deployable_weights_metrics_and_evaluates(two_epochs, teacher, tmp_path, capsys):
    run_dir = two_epochs.parent / "runs" / "tiny"
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "model.pth", "resume.pth", "metrics.json",
                                                  "epoch_0001", "epoch_0002", "best"}
    assert {p.name for p in (run_dir / "epoch_0002").iterdir()} == {"config.yaml", "model.pth", "resume.pth",
                                                                   "metrics.json"}
    history = read_json(run_dir / "metrics.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert {"loss", "classification", "bbox_regression", "bbox_ctrness", "lr", "img_per_s"} <= h.keys()
        assert set(COCO_METRICS) | set(COCO_RECALLS) <= h.keys()
    assert history[1]["loss"] < history[0]["loss"]
    # Each category's AP at the final evaluation only: in metrics.json and once in MLflow.
    from dist2.data.synth import CATEGORIES

    per_class = [CLASS_AP + name for name in CATEGORIES.values()]
    assert [set(per_class) <= h.keys() for h in history] == [False, True]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{two_epochs.parent / 'runs/mlflow.db'}")
    experiment = client.get_experiment_by_name("dist2")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs
    run = client.search_runs([experiment.experiment_id])[0]
    for name in per_class:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] == [(2, history[1][name])]

    # model.pth is the bare torchvision state_dict: safe to load, exactly the keys and shapes of a fresh detector.
    state = torch.load(run_dir / "model.pth", weights_only=True)
    from dist2.data.synth import CATEGORIES

    cfg = load_config(two_epochs)
    fresh = build_detector(cfg.model, cfg.data, CATEGORIES).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in fresh.items()}

    # dist2 eval on a checkpoint reproduces the last evaluation of its training: the session's teacher, whose
    # mAP is well above zero (a two-epoch run's is about zero, which any evaluation would reproduce).
    teacher_yaml, teacher_dir, _ = teacher
    out = tmp_path / "eval.json"
    code, err = cli_in_process(capsys, "eval", teacher_yaml, "--checkpoint", teacher_dir / "model.pth", "--json", out)
    assert code == 0, err
    metrics = read_json(out)
    assert list(metrics) == [*COCO_METRICS, *COCO_RECALLS, *per_class]
    trained = read_json(teacher_dir / "metrics.json")["final"]
    assert metrics["mAP"] > 5
    for key, value in metrics.items():  # the six, AR and each category's AP
        assert value == pytest.approx(trained[key], abs=1e-9) if value is not None else trained[key] != trained[key]


def test_the_run_folder_keeps_its_best_epoch_and_mlflow_tags_it(two_epochs, tmp_path):
    from mlflow.tracking import MlflowClient

    from dist2.engine.rundir import RunDir, best_epoch, write_checkpoint

    # Wiring: the two-epoch run's best/ is the checkpoint of its best epoch by mAP, and its MLflow run says which.
    run_dir = two_epochs.parent / "runs/tiny"
    history = read_json(run_dir / "metrics.json")["history"]
    best = best_epoch(history, "mAP")
    assert read_json(run_dir / "best/metrics.json")["final"] == best
    assert {p.name for p in (run_dir / "best").iterdir()} == {"config.yaml", "model.pth", "resume.pth", "metrics.json"}
    client = MlflowClient(f"sqlite:///{two_epochs.parent / 'runs/mlflow.db'}")
    tags = client.search_runs([client.get_experiment_by_name("dist2").experiment_id])[0].data.tags
    assert (tags["dist2.best_epoch"], float(tags["dist2.best_value"])) == (str(best["epoch"]),
                                                                            pytest.approx(best["mAP"], abs=1e-4))
    # The rule, on epochs whose mAP rises, falls, ties and rises: best/ follows the first of the highest, and an
    # epoch without evaluation never replaces it.
    cfg = load_config(two_epochs, [f"output_dir={tmp_path}", "train.best_metric=AP50"])
    run, seen = RunDir(cfg), []
    for epoch, ap50 in enumerate([10.0, 30.0, 20.0, None, 30.0, 40.0], start=1):
        seen.append({"epoch": epoch, **({"AP50": ap50} if ap50 is not None else {})})
        folder = tmp_path / f"epoch_{epoch}"
        write_checkpoint(folder, {"w": torch.tensor([float(epoch)])}, {"history": list(seen)}, {}, "r")
        run.keep_best(folder, seen)
        kept = read_json(run.folder / "best/metrics.json")["final"]["epoch"]
        assert kept == {1: 1, 2: 2, 3: 2, 4: 2, 5: 2, 6: 6}[epoch], epoch
        assert torch.load(run.folder / "best/model.pth")["w"].item() == kept
    assert not list(run.folder.glob(".best.*"))


def test_a_checkpoint_cut_short_while_being_copied_is_not_the_one_a_run_continues_from(two_epochs, tmp_path):
    """Ray persists a checkpoint folder's files in no fixed order: a worker group lost mid-copy can leave all four
    names present and one file cut short (seen: a truncated resume.pth that the restarted group could not load).
    Such a folder is not complete; the run continues from the newest whole one."""
    import shutil

    from dist2.engine.rundir import RunDir, write_checkpoint

    run = RunDir(load_config(two_epochs, [f"output_dir={tmp_path}"]))
    for epoch in (1, 2):
        history = [{"epoch": e} for e in range(1, epoch + 1)]
        write_checkpoint(run.epoch_folder(epoch), {"w": torch.zeros(256)}, {"history": history}, {"e": epoch}, "r")
    newest, older = run.epoch_folder(2), run.epoch_folder(1)
    assert run.latest() == newest
    whole = tmp_path / "whole"
    shutil.copytree(newest, whole)
    for name, cut in (("model.pth", 10), ("resume.pth", 1), ("config.yaml", 2), ("metrics.json", 5)):
        data = (whole / name).read_bytes()
        (newest / name).write_bytes(data[:-cut])
        assert run.latest() == older, name
        (newest / name).unlink()
        assert run.latest() == older, name
        (newest / name).write_bytes(data)
        assert run.latest() == newest, name
    # A checkpoint written before the sizes were recorded is complete when its four files are there.
    record = read_json(newest / "metrics.json")
    del record["sizes"]
    (newest / "metrics.json").write_text(json.dumps(record))
    assert run.latest() == newest
    (newest / "resume.pth").unlink()  # ... and not without them
    assert run.latest() == older


def test_a_run_stopped_by_sigterm_is_closed_killed_and_continues_exactly(two_epochs, tmp_path, synth_root, capsys):
    """SIGTERM (`ray job stop`, `kill`, a preemption) the moment epoch 1's checkpoint is complete is taken as
    Ctrl-C: exit 130 with one line and no traceback, the MLflow run closed KILLED with epoch 1 logged (not left
    RUNNING). The same command again continues that run after epoch 1 and ends where two epochs in one go end, to
    the bit."""
    broken = write_config(tmp_path / "broken.yaml", tiny_config(tmp_path, synth_root, name="broken"))
    first = subprocess.Popen([sys.executable, "-m", "dist2", "train", str(broken)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    epoch_1 = tmp_path / "runs/broken/epoch_0001/metrics.json"  # written last: the checkpoint is complete
    deadline = time.monotonic() + 300
    while not epoch_1.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert epoch_1.exists() and first.returncode == 130, stderr[-3000:]
    assert stderr.rstrip().endswith("dist2: interrupted") and "Traceback" not in stderr, stderr[-3000:]
    client = run_store(tmp_path)
    stopped = only_run(client)
    assert stopped.info.status == "KILLED" and epochs_logged(client, stopped.info.run_id) == [1]

    code, err = cli_in_process(capsys, "train", broken)
    assert code == 0, err
    assert "continuing after epoch 1 of 2" in err
    continued = only_run(client)
    assert (continued.info.run_id, continued.info.status) == (stopped.info.run_id, "FINISHED")
    assert epochs_logged(client, continued.info.run_id) == [1, 2]
    straight = two_epochs.parent / "runs" / "tiny"
    a = torch.load(straight / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "runs/broken/model.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = read_json(straight / "metrics.json")["history"]
    hb = read_json(tmp_path / "runs/broken/metrics.json")["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]

    # A finished run is not run again, nor continued with a different experiment: exit 2, nothing touched.
    before = (tmp_path / "runs/broken/model.pth").read_bytes()
    code, err = cli_in_process(capsys, "train", broken)
    assert code == 2 and "already finished its 2 epochs" in err
    code, err = cli_in_process(capsys, "train", broken, "--set", "train.epochs=3", "--set", "train.lr=0.5")
    assert code == 2 and "with a different config (train.lr)" in err
    assert (tmp_path / "runs/broken/model.pth").read_bytes() == before



def test_a_run_with_kept_loader_processes_grouped_batches_and_averaged_weights_continues_exactly(tmp_path,
                                                                                                 synth_root, capsys):
    """data.num_workers: 2 (processes kept across epochs, each sample seeded from (seed, epoch, index)),
    aspect-ratio grouping, train.ema_decay and AdamW (its moments in the resume state): one epoch, stop, continue
    == two epochs in one go, to the bit. The deployed weights are the moving average, the resume state keeps the
    trained ones beside it."""
    sections = {"data": {"num_workers": 2, "group_aspect_ratio": True},
                "train": {"ema_decay": 0.9, "optimizer": "adamw", "lr": 0.001}}
    straight = write_config(tmp_path / "straight.yaml",
                            tiny_config(tmp_path, synth_root, name="straight", **sections))
    assert cli_in_process(capsys, "train", straight)[0] == 0
    broken = write_config(tmp_path / "broken.yaml", tiny_config(tmp_path, synth_root, name="broken", **sections))
    assert cli_in_process(capsys, "train", broken, "--set", "train.epochs=1", "--set", "train.lr_steps=[]")[0] == 0
    code, err = cli_in_process(capsys, "train", broken)
    assert code == 0 and "continuing after epoch 1 of 2" in err, err
    a = torch.load(tmp_path / "runs/straight/model.pth", weights_only=True)
    b = torch.load(tmp_path / "runs/broken/model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[h["loss"] for h in read_json(tmp_path / f"runs/{n}/metrics.json")["history"]]
              for n in ("straight", "broken")]
    assert losses[0] == losses[1]
    resume = torch.load(tmp_path / "runs/broken/epoch_0002/resume.pth", weights_only=True)
    average = resume["average"]["average"]
    assert all(torch.equal(b[k], average[k]) for k in b)
    assert not all(torch.equal(b[k], resume["model"][k]) for k in b)  # the trained weights are not deployed


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_train_optimizer_first_step_is_the_published_update(optimizer):
    """train.optimizer's first step from a zero state, in closed form. SGD: w - lr (g + wd w). AdamW (decoupled
    decay): w (1 - lr wd) - lr g / (|g| + eps), since the bias-corrected moments of one gradient are g and g^2:
    every weight with a gradient moves by lr whatever the gradient's size."""
    lr, decay, weight, grad = 0.1, 0.01, torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, -300.0, 1e-3])
    param = torch.nn.Parameter(weight.clone())
    param.grad = grad.clone()
    cfg = TrainConfig(optimizer=optimizer, lr=lr, weight_decay=decay, momentum=0.9)
    build_optimizer([param], cfg).step()
    if optimizer == "sgd":
        expected = weight - lr * (grad + decay * weight)
    else:
        expected = weight * (1 - lr * decay) - lr * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(param.detach(), expected)


def test_bad_checkpoints_are_clear_errors(tmp_path, synth_root, capsys):
    cfg_path = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, synth_root))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    result = run_cli("eval", cfg_path, "--checkpoint", junk)
    assert result.returncode == 2 and "junk.pth: cannot load weights" in result.stderr
    other = tiny_config(tmp_path, synth_root, model={"channels": 64})
    torch.save(build_detector(load_config(write_config(tmp_path / "o.yaml", other)).model,
                              load_config(cfg_path).data, {1: "a"}).state_dict(), tmp_path / "other.pth")
    code, err = cli_in_process(capsys, "eval", cfg_path, "--checkpoint", tmp_path / "other.pth")
    assert code == 2 and "does not match the configured model" in err


def test_non_finite_loss_fails_the_run_with_its_reason(tmp_path, synth_root, capsys):
    """One worker, in this process: the run ends at the first non-finite loss term with its reason (the loss
    term, epoch and step). Two workers on Ray: test_ray.py."""
    code, err = cli_in_process(capsys, "train", non_finite_config(tmp_path, synth_root, workers=1))
    assert_failed_on_a_non_finite_loss(tmp_path, code, err)


def test_init_checkpoint_strict_non_strict_and_the_mismatch_error(two_epochs, tmp_path, synth_root, capsys):
    """model.init_checkpoint loads weights before training: all of them (strict), or what fits (init_strict: false,
    here a checkpoint whose head has another class count); a checkpoint that does not fit a strict init is exit 2
    naming the keys, before anything is written."""
    from dist2.engine.train import build_train_task

    trained = two_epochs.parent / "runs/tiny/model.pth"
    cfg = load_config(two_epochs, ["name=warm", f"output_dir={tmp_path / 'runs'}",
                                   f"model.init_checkpoint={trained}"])
    task, _, _ = build_train_task(cfg, torch.device("cpu"))
    state = torch.load(trained, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in task.module.state_dict().items())

    three = build_detector(cfg.model, cfg.data, {1: "a", 2: "b", 3: "c"})  # 3 categories, the data has 6
    torch.save(three.state_dict(), tmp_path / "three.pth")
    loose = cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"init_checkpoint": tmp_path / "three.pth", "init_strict": False})})
    task, _, _ = build_train_task(loose, torch.device("cpu"))
    loaded = task.module.state_dict()
    other = [k for k, v in three.state_dict().items() if v.shape != loaded[k].shape]
    assert other and all("cls_logits" in k for k in other)  # only the class-count-sized layers kept their init
    assert all(torch.equal(v, loaded[k]) for k, v in three.state_dict().items() if k not in other)

    code, err = cli_in_process(capsys, "train", two_epochs, "--set", "name=strict", "--set",
                               f"output_dir={tmp_path / 'runs'}", "--set",
                               f"model.init_checkpoint={tmp_path / 'three.pth'}")
    assert code == 2 and "three.pth: does not match the configured model" in err and "cls_logits" in err
    assert "model.init_strict: false loads only the keys that fit" in err and "Traceback" not in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs/mlflow.db'}")  # as for the teacher guard: no run is left
    assert not (tmp_path / "runs/strict").exists()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_training_learns(tmp_path, synth_root, detector):
    """Overfitting a handful of images must drive mAP on them well above chance: labels, boxes, category
    mapping and evaluation all have to be right for that."""
    from dist2.data.build import build_datasets
    from dist2.engine.loop import Task, epochs

    raw = tiny_config(tmp_path, synth_root, model={"detector": detector},
                      data={"hflip_prob": 0.0, "val_annotations": "annotations/instances_train.json",
                            "val_images": "train"},
                      train={"epochs": 30, "lr": 0.02, "warmup_iters": 10, "lr_steps": [25]})
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    train_ds, val_ds = build_datasets(cfg.data)
    keep = list(range(4))
    train_ds.ids = [train_ds.ids[i] for i in keep]
    val_ds.ids = list(train_ds.ids)
    val_ds.coco.dataset["images"] = [im for im in val_ds.coco.dataset["images"] if im["id"] in val_ds.ids]
    val_ds.coco.dataset["annotations"] = [a for a in val_ds.coco.dataset["annotations"]
                                          if a["image_id"] in val_ds.ids]
    val_ds.coco.createIndex()
    torch.manual_seed(0)
    model = build_detector(cfg.model, cfg.data, train_ds.categories)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": 30})})
    *_, (metrics, _) = epochs(cfg, Task(model, model), train_ds, val_ds, torch.device("cpu"))
    assert metrics["AP50"] > 30, metrics


def test_trainings_started_together_on_a_fresh_sqlite_store_all_finish(tmp_path, synth_root):
    """MLflow creates an SQLite store's tables on first use; three `dist2 train`s doing that at once used to fail
    inside its migrations with a traceback."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    names = ["a", "b", "c"]
    paths = [write_config(tmp_path / f"{n}.yaml", tiny_config(tmp_path, synth_root, name=n,
                                                                 train={"epochs": 1, "lr_steps": []}))
             for n in names]
    drivers = [subprocess.Popen([sys.executable, "-m", "dist2", "train", str(p), "--tracking-uri", uri],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for p in paths]
    errors = [d.communicate(timeout=600)[1] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "dist2"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == names and {r.info.status for r in runs} == {"FINISHED"}


def test_training_on_a_malformed_annotation_file_exits_2_and_leaves_nothing(tmp_path, synth_root):
    import json
    import shutil

    from mlflow.tracking import MlflowClient

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    ann_file = root / "annotations/instances_train.json"
    ann = json.loads(ann_file.read_text())
    ann["annotations"][0]["bbox"] = [1, 2, 3]
    ann_file.write_text(json.dumps(ann))
    cfg_path = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, synth_root, data={"root": str(root)}))
    result = run_cli("train", cfg_path)
    assert result.returncode == 2
    assert (f"{ann_file}: annotation id {ann['annotations'][0]['id']}: bbox must be four numbers" in result.stderr
            and "Traceback" not in result.stderr)
    assert not (tmp_path / "runs" / "tiny").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_export_and_the_runs_mlflow_model_give_the_eager_models_detections(teacher, tmp_path, capsys):
    """`dist2 export`'s TorchScript file, and the MLflow model the training run logged (loaded with
    mlflow.pytorch.load_model, categories.json beside it), detect exactly what model.pth does."""
    import json

    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from dist2.artifacts import CATEGORIES_FILE
    from dist2.data.build import build_val_dataset

    teacher_yaml, teacher_dir, _ = teacher
    out = tmp_path / "deploy/teacher.pt"
    result = run_cli("export", teacher_yaml, "--checkpoint", teacher_dir / "model.pth", "--out", out)
    assert result.returncode == 0, result.stderr
    files = {CATEGORIES_FILE: ""}
    scripted = torch.jit.load(str(out), _extra_files=files)
    store = f"sqlite:///{teacher_dir.parent / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("dist2").experiment_id
    (run,) = client.search_runs([experiment], "attributes.run_name = 'teacher'")
    (output,) = run.outputs.model_outputs
    mlflow.set_tracking_uri(store)  # models:/ URIs resolve against the process's store
    try:
        logged = mlflow.pytorch.load_model(f"models:/{output.model_id}")
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}", dst_path=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(None)
    assert json.loads((model_dir / "extra_files" / CATEGORIES_FILE).read_text()) == json.loads(files[CATEGORIES_FILE])
    cfg = load_config(teacher_yaml)
    val = build_val_dataset(cfg.data)
    assert json.loads(files[CATEGORIES_FILE]) == {str(i): {"id": c, "name": n}
                                                  for i, (c, n) in enumerate(val.categories.items())}
    eager = build_detector(cfg.model, cfg.data, val.categories)
    eager.load_state_dict(torch.load(teacher_dir / "model.pth", weights_only=True))
    eager.eval()
    images = [val[i][0] for i in range(len(val))]
    with torch.no_grad():
        expected, got, from_mlflow = eager(images), scripted(images), logged(images)
    assert sum(len(d["boxes"]) for d in expected) > 0  # a trained model: there is something to compare
    for e, g, m in zip(expected, got, from_mlflow, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(g[key], e[key], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(m[key], e[key], rtol=1e-4, atol=1e-4)

    other = build_detector(cfg.model.model_copy(update={"channels": 64}), cfg.data, val.categories)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    code, err = cli_in_process(capsys, "export", teacher_yaml, "--checkpoint", tmp_path / "other.pth", "--out",
                               tmp_path / "x.pt")
    assert code == 2 and "other.pth: does not match the configured model" in err
    assert "Traceback" not in err and not (tmp_path / "x.pt").exists()


def test_predict_draws_each_image_and_writes_coco_results_that_evaluate_like_the_checkpoint(teacher, tmp_path,
                                                                                            capsys):
    from PIL import Image

    from conftest import cli_in_process

    teacher_yaml, teacher_dir, root = teacher  # its validation set is its 8 training images (conftest.SMALL)
    out = tmp_path / "pictures"
    result = run_cli("predict", teacher_yaml, "--checkpoint", teacher_dir / "model.pth", "--images", root / "train",
                     "--out", out, "--score-thresh", "0.3")
    assert result.returncode == 0, result.stderr
    inputs = sorted((root / "train").iterdir())
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in inputs)
    for image in inputs:
        assert Image.open(out / f"{image.stem}.png").size == Image.open(image).size
    # predictions.json: COCO results against the val annotations, scoring what `dist2 eval` scores for the checkpoint
    ann = root / "annotations/instances_train.json"
    code, err = cli_in_process(capsys, "eval", "--annotations", ann, "--predictions", out / "predictions.json",
                               "--json", tmp_path / "from_json.json")
    assert code == 0, err
    assert read_json(tmp_path / "from_json.json")["mAP"] == pytest.approx(
        read_json(teacher_dir / "metrics.json")["final"]["mAP"], abs=0.05)

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cfg = load_config(teacher_yaml)
    other = build_detector(cfg.model.model_copy(update={"channels": 64}), cfg.data, {1: "a"})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    for images, weights, message in ((tmp_path / "empty", "model.pth", "--images: no image files"),
                                     (tmp_path / "broken.png", "model.pth", "broken.png: cannot read image"),
                                     (root / "train", "other.pth", "other.pth: does not match the configured model")):
        checkpoint = tmp_path / weights if weights == "other.pth" else teacher_dir / weights
        code, err = cli_in_process(capsys, "predict", teacher_yaml, "--checkpoint", checkpoint,
                                   "--images", images, "--out", tmp_path / "bad")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_evaluation_gives_each_image_its_own_detections_whatever_the_batch(teacher):
    """The detector pads a batch to its largest image and the padding changes what it finds, so evaluation batches
    only images of one size: the metrics at batch 1 (each image alone), 3 and 8 are the same, and so are those of
    the training run's own last evaluation (batch 4)."""
    from dist2.checkpoint import load_weights
    from dist2.data.build import build_val_dataset
    from dist2.data.loader import same_size_batches
    from dist2.evaluation import evaluate
    from dist2.evaluation.coco_eval import predict

    teacher_yaml, teacher_dir, _ = teacher
    cfg = load_config(teacher_yaml)
    val = build_val_dataset(cfg.data)
    model = build_detector(cfg.model, cfg.data, val.categories)
    load_weights(model, teacher_dir / "model.pth")
    model.eval()
    cpu = torch.device("cpu")
    sizes = [(val.coco.imgs[i]["width"], val.coco.imgs[i]["height"]) for i in val.ids]
    assert len(set(sizes)) >= 2  # the hazard exists in this set: images of several sizes
    # ... and it is real: an image of another size in the batch changes this image's detections.
    first, other = 0, next(i for i, size in enumerate(sizes) if size != sizes[0])
    alone, mixed = predict(model, val, cpu, [[first]]), predict(model, val, cpu, [[first, other]])
    assert alone != [r for r in mixed if r["image_id"] == val.ids[first]]
    batches = same_size_batches(val, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(val))) and all(len(b) <= 3 for b in batches)
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    metrics = {bs: evaluate(model, val, cpu, bs) for bs in (1, 3, 8)}
    assert metrics[1]["mAP"] > 5
    for bs in (3, 8):
        assert metrics[bs] == pytest.approx(metrics[1], abs=1e-6, nan_ok=True), bs
    assert read_json(teacher_dir / "metrics.json")["final"]["mAP"] == pytest.approx(metrics[1]["mAP"], abs=1e-6)


def test_a_run_shorter_than_one_sampling_interval_still_logs_its_nodes_metrics(tmp_path, monkeypatch):
    """MLflow's monitor publishes only after its first interval and drops its samples when stopped earlier: a run
    stopped at once (here with a 60 s interval) still gets one point of each system metric, on its own node."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("short")).info.run_id
    logger = EpochLogger(uri, run_id)
    logger.start_system_metrics()
    logger.stop_system_metrics()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) == 1 and 0 <= history[0].value <= 100
    assert client.get_run(run_id).data.tags["dist2.system_metrics_host"] == socket.gethostname()


def test_a_model_upload_that_fails_leaves_a_failed_model_and_a_second_try_logs_one(tmp_path):
    """A run's MLflow model whose upload breaks (here: the module cannot be pickled) is FAILED and the error reaches
    the caller (who warns); one whose upload was cut short by a kill (left PENDING) is marked FAILED when the run
    is closed again. Closing the run again logs a model: a failed one is not "the model it has already" (it was,
    and the run never got one). Closing it a third time adds none."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from dist2.tracking import MODEL_ARTIFACT, log_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("upload")
    run_id = client.create_run(experiment).info.run_id
    broken = torch.nn.Linear(2, 2)
    broken.lock = threading.Lock()  # saving the module fails part-way through log_model
    with pytest.raises(Exception, match="pickle"):
        log_model(uri, run_id, lambda: (broken, {}))
    (failed,) = client.search_logged_models([experiment])
    assert failed.status == LoggedModelStatus.FAILED and failed.name == MODEL_ARTIFACT
    # What a process killed during log_model leaves: the run's model created and linked, never finalised.
    cut = client.create_logged_model(experiment, name=MODEL_ARTIFACT, source_run_id=run_id)
    client.log_outputs(run_id, [LoggedModelOutput(cut.model_id, 0)])
    assert client.get_logged_model(cut.model_id).status == LoggedModelStatus.PENDING

    working = torch.jit.script(torch.nn.Linear(2, 2))
    log_model(uri, run_id, lambda: (working, {}))
    log_model(uri, run_id, lambda: (working, {}))  # closed once more: the run keeps the model it has
    statuses = {m.model_id: m.status for m in client.search_logged_models([experiment])}
    assert len(statuses) == 3 and statuses.pop(failed.model_id) == LoggedModelStatus.FAILED
    assert statuses.pop(cut.model_id) == LoggedModelStatus.FAILED
    assert list(statuses.values()) == [LoggedModelStatus.READY]
    outputs = {o.model_id for o in client.get_run(run_id).outputs.model_outputs}
    assert outputs == {failed.model_id, cut.model_id, *statuses}


def test_the_weight_average_is_the_bias_corrected_exponential_mean_and_swaps_back_exactly():
    """train.ema_decay's average: after t updates, sum_i decay^(t-i) w_i / sum_i decay^(t-i) over the weights
    visited (none of the initial ones); integer buffers are copied; `applied` deploys the average and gives the
    trained weights back bit for bit."""
    from dist2.engine.averaging import WeightAverage

    module = torch.nn.BatchNorm1d(1)
    for decay in (0.5, 0.95):
        with torch.no_grad():
            module.weight.fill_(100.0)  # the initial weights: no share in the average
        average = WeightAverage(module, decay)
        values = [float(t * t % 7) for t in range(1, 13)]
        for t, value in enumerate(values, start=1):
            with torch.no_grad():
                module.weight.fill_(value)
            module.num_batches_tracked.fill_(t)
            average.update()
        shares = [decay ** (len(values) - i) for i in range(1, len(values) + 1)]
        expected = sum(s * v for s, v in zip(shares, values, strict=True)) / sum(shares)
        assert average.average["weight"].item() == pytest.approx(expected, rel=1e-6)
        assert average.average["num_batches_tracked"].item() == 12
        with average.applied() as trained:
            assert module.weight.item() == pytest.approx(expected, rel=1e-6)
            assert trained["weight"].item() == values[-1]
        assert module.weight.item() == values[-1]
