import json

import pytest

from dist2.ablation.spec import NEUTRAL_KEYS, teacher_key
from dist2.config import flatten, load_config
from dist2.errors import UserError

from conftest import run_cli, tiny_config, write_config


def test_valid_config_and_overrides(tmp_path, synth_root):
    path = write_config(tmp_path / "exp.yaml", tiny_config(tmp_path, synth_root))
    cfg = load_config(path, ["train.epochs=5", "model.channels=64", "data.train_sizes=[64, 96]"])
    assert cfg.train.epochs == 5 and cfg.model.channels == 64 and cfg.data.train_sizes == [64, 96]
    flat = flatten(cfg)
    # Keys keep their YAML names, dotted.
    assert flat["train.epochs"] == "5" and flat["model.detector"] == "fcos" and flat["model.weights"] == "null"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.backbon=resnet50", ["model.backbon", "Extra inputs are not permitted"]),
        ("train.epochs=many", ["train.epochs", "valid integer", "'many'"]),
        ("train.lr=-1", ["train.lr", "greater than 0"]),
        ("model.detector=yolo", ["model.detector", "'fcos' or 'retinanet'", "'yolo'"]),
        ("model.backbone=resnet9", ["model.backbone", "resnet9", "mobilenet_v2, resnet10, resnet18, resnet50, "
                                    "resnext101_64x4d"]),
        ("model.channels=48", ["model.channels", "multiple of 32"]),
        ("data.root=/no/such/folder", ["data.root", "/no/such/folder", "does not exist"]),
        ("train.lr_steps=[30]", ["train.lr_steps", "1..2"]),
        ("train.optimizer=adam", ["train.optimizer", "'sgd' or 'adamw'", "'adam'"]),
        ("model.head_convs=0", ["model.head_convs", "greater than or equal to 1"]),
        ("model.head_convs=5", ["model.head_convs", "less than or equal to 4"]),
        ("bogus", ["--set 'bogus'", "KEY=VALUE"]),
    ],
)
def test_bad_values_name_file_key_and_allowed(tmp_path, synth_root, override, expected):
    path = write_config(tmp_path / "exp.yaml", tiny_config(tmp_path, synth_root))
    with pytest.raises(UserError) as err:
        load_config(path, [override])
    message = str(err.value)
    if not override == "bogus":
        assert message.startswith(f"{path}: invalid config: ")
    for fragment in expected:
        assert fragment in message


def test_missing_annotation_file_is_named(tmp_path, synth_root):
    cfg = tiny_config(tmp_path, synth_root, data={"val_annotations": "annotations/nope.json"})
    with pytest.raises(UserError, match=r"data.val_annotations: .*annotations/nope.json does not exist"):
        load_config(write_config(tmp_path / "exp.yaml", cfg))


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="bad.yaml: expected a mapping"):
        load_config(bad)
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_cli_config_error_exits_2_without_traceback_or_files(tmp_path, synth_root):
    path = write_config(tmp_path / "exp.yaml", tiny_config(tmp_path, synth_root))
    result = run_cli("train", path, "--set", "model.backbone=resnet9")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "dist2: error:" in result.stderr and "model.backbone" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_missing_file_a_grid_mistake_or_a_bad_argument_is_reported_before_torch_ray_mlflow_or_pandas_load(
        tmp_path, synth_root):
    """Such a mistake costs a user a fraction of a second, not the seconds of importing the training stack: each
    command checks what it was given first, a config's own keys included (its backbone against the registry,
    which loads no torchvision)."""
    import subprocess
    import sys

    good = write_config(tmp_path / "exp.yaml", tiny_config(tmp_path, synth_root))
    ablation = tmp_path / "grid.yaml"
    ablation.write_text(f"name: grid\npairs: [{{teacher: {good}, student: {good}}}]\ngrid: [{{method: [dist3]}}]\n")
    missing = str(tmp_path / "nope.yaml")
    cases = [["train", missing], ["distill", missing],
             ["predict", missing, "--checkpoint", "m.pth", "--images", "x", "--out", "o"],
             ["export", missing, "--checkpoint", "m.pth", "--out", "m.pt"], ["ablate", str(ablation)],
             ["report", "--experiment", "x"], ["train", str(good), "--set", "train.lr=-1"],
             ["distill", str(good), "--set", "model.backbone=resnet9"]]
    script = ("import json, sys\nfrom dist2.cli import main\n"
              f"codes = [main(argv) for argv in {cases!r}]\n"
              "print(json.dumps([codes, sorted({'torch', 'ray', 'mlflow', 'pandas'} & set(sys.modules))]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    codes, heavy = json.loads(result.stdout.splitlines()[-1])
    assert codes == [2] * len(cases) and heavy == [], result.stderr
    assert result.stderr.count("dist2: error:") == len(cases) and "Traceback" not in result.stderr


def test_cli_usage_error_exits_2(tmp_path):
    result = run_cli("train")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run_cli("eval", "--annotations", tmp_path / "a.json")
    assert result.returncode == 2 and "needs either CONFIG --checkpoint" in result.stderr


def test_a_base_chain_merges_sections_replaces_lists_and_never_inherits_the_name(tmp_path, synth_root):
    import yaml

    (tmp_path / "cfgs").mkdir()
    write_config(tmp_path / "root.yaml", tiny_config(tmp_path, synth_root, name="root"))
    (tmp_path / "cfgs/mid.yaml").write_text(yaml.safe_dump({
        "base": "../root.yaml", "name": "mid", "train": {"epochs": 3, "lr_steps": [2, 3]},
        "data": {"train_sizes": [64, 80]}}))
    (tmp_path / "cfgs/child.yaml").write_text(yaml.safe_dump({
        "base": "mid.yaml", "name": "child", "train": {"lr_steps": [3]}, "model": {"channels": 64}}))
    child = load_config(tmp_path / "cfgs/child.yaml")
    root = load_config(tmp_path / "root.yaml")
    assert child.name == "child"
    assert (child.train.epochs, child.train.lr_steps, child.train.lr) == (3, [3], root.train.lr)  # a list: replaced
    assert child.data.train_sizes == [64, 80] and child.data.test_size == root.data.test_size  # sections: merged
    assert child.model.channels == 64 and child.model.backbone == root.model.backbone
    # The resolved config is what is flattened for MLflow: no trace of `base`.
    assert not any(key.startswith("base") for key in flatten(child))
    (tmp_path / "cfgs/nameless.yaml").write_text(yaml.safe_dump({"base": "mid.yaml"}))
    with pytest.raises(UserError, match="name: Field required"):
        load_config(tmp_path / "cfgs/nameless.yaml")


@pytest.mark.parametrize("case", ["cycle", "missing"])
def test_a_broken_base_chain_is_an_error_naming_the_chain(tmp_path, case, capsys):
    import yaml

    from conftest import cli_in_process

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"base": "b.yaml", "name": "a"}))
    b.write_text(yaml.safe_dump({"base": "a.yaml" if case == "cycle" else "gone.yaml", "name": "b"}))
    expected = (f"{a}: base: the chain {a} -> {b} -> {a} is a cycle" if case == "cycle" else
                f"{b}: base: {tmp_path / 'gone.yaml'} does not exist (chain: {a} -> {b} -> {tmp_path / 'gone.yaml'})")
    code, err = cli_in_process(capsys, "train", a)
    assert code == 2 and err.strip() == f"dist2: error: {expected}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, changed", [("model.head_convs", "2"), ("model.init_seed", "7"),
                                          ("train.optimizer", "adamw")])
def test_a_key_at_its_former_behaviour_keeps_a_cached_teachers_identity(tmp_path, synth_root, key, changed):
    """Keys added after teachers were cached leave a teacher's hash alone at the value that reproduces the old
    behaviour (spec.NEUTRAL_KEYS), and change it at any other value."""
    section, name = key.split(".")
    neutral = NEUTRAL_KEYS[(section, name)]
    path = write_config(tmp_path / "exp.yaml", tiny_config(tmp_path, synth_root))
    before = teacher_key(load_config(path))
    assert teacher_key(load_config(path, [f"{key}={'null' if neutral is None else neutral}"])) == before
    assert teacher_key(load_config(path, [f"{key}={changed}"])) != before
