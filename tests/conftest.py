import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Generated datasets go to a per-session cache, never the user's ~/.cache.
    os.environ["DIST2_CACHE"] = str(tmp_path_factory.mktemp("dist2-cache"))
    # The local Ray clusters the tests start (in-process and through the CLI) run without token auth.
    os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic COCO-format dataset shared by the tests."""
    from dist2.config import SynthConfig
    from dist2.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth"), SynthConfig(num_train=24, num_val=12, image_size=96, seed=3))


def tiny_config(tmp_path: Path, synth_root: Path, **sections) -> dict:
    """A CPU-sized experiment config as a dict (write it with write_config)."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(synth_root), "train_sizes": [96], "test_size": 96, "max_size": 160,
                 "hflip_prob": 0.5},
        "model": {"detector": "fcos", "backbone": "resnet10", "channels": 32},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_iters": 2, "lr_steps": [2]},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def distill_config(tmp_path: Path, synth_root: Path, teacher_yaml: Path, checkpoint: Path, **distill) -> dict:
    """A CPU-sized distillation config (a MobileNetV2 student) for the teacher trained from teacher_yaml."""
    cfg = tiny_config(tmp_path, synth_root, name="student_di",
                      model={"backbone": "mobilenet_v2", "width_mult": 0.5, "channels": 32},
                      train={"epochs": 1, "lr_steps": []})
    cfg["teacher"] = {"config": str(teacher_yaml), "checkpoint": str(checkpoint), "min_mAP": 0.0}
    cfg["distill"] = {"method": "dist2", "strategies": ["N2N", "B2N"], **distill}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `dist2` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "dist2", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ}, timeout=600)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(port: int, backend_uri: str, artifacts: Path, options: list[str] = ()) -> subprocess.Popen:
    """A real `mlflow server` on loopback (with any further `options`), returned once it answers."""
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
                               "--workers", "1", *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


TINY_DATA = {"root": None, "synth": {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0},
             "train_sizes": [64], "test_size": 64, "max_size": 96}
@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One output_dir for the module's ablations: they share the teachers' cache, as a user's do."""
    return tmp_path_factory.mktemp("shared") / "runs"
# train.device: cpu computes on the CPU even in trials that hold the nodes' declared (not real) GPUs.
TINY_TRAIN = {"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup_iters": 2, "lr_steps": [], "device": "cpu"}


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> dict:
    """A tiny teacher and student experiment (FCOS, 16 synthetic images of 64 px)."""
    folder = tmp_path_factory.mktemp("pair")
    files = {}
    for role, model in (("teacher", {"detector": "fcos", "backbone": "resnet10", "channels": 32}),
                        ("student", {"detector": "fcos", "backbone": "mobilenet_v2", "width_mult": 0.5,
                                     "channels": 32})):
        files[role] = folder / f"{role}.yaml"
        files[role].write_text(yaml.safe_dump({"name": f"tiny_{role}", "data": TINY_DATA, "model": model,
                                               "train": TINY_TRAIN}))
    return {"teacher": str(files["teacher"]), "student": str(files["student"]), "teacher_label": "R10",
            "student_label": "MNV2"}


def write_ablation(path: Path, pair: dict, output_dir: Path, grid: list, **extra) -> Path:
    spec = {"name": path.stem, "output_dir": str(output_dir), "pairs": [pair], "teacher_min_mAP": 0.0,
            "grid": grid, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path
