import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

# One torch thread in this process and every process the tests start, before any test module imports torch: the
# tests' models are tiny and the two xdist workers already use both cores of a CI machine (a second thread each
# adds CPU time, not speed). Runs that set their own count (Ray workers: cpus_per_worker) still do.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Those runs' threads sleep when they wait rather than spin: the test clusters declare five CPUs on a 2-core machine,
# and two 2-thread trials beside the other xdist worker spun each other down to a twelfth of their speed (three
# 2-thread processes on 2 cores, measured: 1.4 steps/s each spinning, 5.5 sleeping; Ray's nodes inherit this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


SHARED_SERVICES = {"cluster", "postgres", "tracking_server"}  # session fixtures too costly to start twice
SHARED_SERVICE_MODULES = {"test_ablate.py", "test_deploy.py", "test_ray.py"}  # the modules whose tests use them


def pytest_xdist_make_scheduler(config, log):
    """The suite runs on two pytest-xdist workers (pyproject's `-n 2`), a test module on one worker, in order (its
    module fixtures made once). The modules that use the session's Ray cluster or tracking server run on one
    worker, in collection order: those services start once, and the node-join test sees the bare head first.
    (A scheduler rather than xdist_group marks: pytest-xdist 3.8's groups have no effect under pytest 9.) The
    units go out in collection order, not most tests first: the shared services' unit, the longest by far, starts
    at once on one worker while the other works through the rest. That worker takes another module only once its
    last test runs: xdist hands a worker its next module when two of its tests are left, and the shared unit's last
    two (test_ray's) take ~100 s, while the other worker would run out of modules and wait."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False
    shared = "shared services"

    class ModulesAndSharedServices(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:  # as xdist's own loadfile and loadgroup schedulers do
            module = nodeid.split("::", 1)[0]
            return shared if Path(module).name in SHARED_SERVICE_MODULES else module

        def _reschedule(self, node) -> None:
            work = self.assigned_work[node]
            if shared in work and self._pending_of({shared: work[shared]}) > 1:
                return  # (a worker runs its last test once it has more work or is told to stop: so 1, not 0)
            super()._reschedule(node)

    return ModulesAndSharedServices(config, log)


def pytest_itemcollected(item):
    """Keeps SHARED_SERVICE_MODULES true: a test elsewhere that used a shared service would start its own copy on
    the other worker (and a second cluster would not start bare for the node-join test)."""
    used = SHARED_SERVICES & set(item.fixturenames)
    if used and item.path.name not in SHARED_SERVICE_MODULES:
        raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)}: add {item.path.name} to SHARED_SERVICE_MODULES")


def once_per_session(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, filled by `make(folder)` once for the whole test session even when pytest-xdist splits
    it over workers: the first worker to ask makes it under the session's common temp root, the others wait for
    it and share it (they only read it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest's temp root for the session, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Generated datasets go to a per-session cache, never the user's ~/.cache.
    os.environ["DIST2_CACHE"] = str(tmp_path_factory.mktemp("dist2-cache"))
    # The local Ray clusters the tests start (in-process and through the CLI) run without token auth.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # MLflow's system metrics every second (a run's default: averages of three 10 s samples), so that the tests'
    # runs of seconds have some.
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"] = "1"


@contextlib.contextmanager
def short_temp_dir(prefix: str):
    """A folder with a short absolute path, removed afterwards: Ray and PostgreSQL put Unix sockets in the folders
    they are given, and a socket's path may not exceed 107 bytes (pytest's folders under xdist come close)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `dist2` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "dist2", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env or {**os.environ}, timeout=600)


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """`dist2 ARGS` through cli.main in this process: (exit code, stderr: what it printed and dist2's log lines, as
    a user's terminal shows them). For the many error cases of one command (each subprocess costs seconds of
    imports); every such test also runs one case through `run_cli`."""
    from dist2.cli import main

    # pytest's own log capture holds the root logger, so cli.main's basicConfig adds no console handler here.
    lines, logger = io.StringIO(), logging.getLogger("dist2")
    handler, level = logging.StreamHandler(lines), logger.level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code = main([str(a) for a in args])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return code, capsys.readouterr().err + lines.getvalue()


def non_finite_config(tmp_path: Path, synth_root: Path, workers: int) -> Path:
    """The tiny config at a learning rate that makes its loss non-finite within two epochs."""
    return write_config(tmp_path / "tiny.yaml", tiny_config(
        tmp_path, synth_root, train={"epochs": 2, "lr_steps": [], "lr": 1.0e6, "warmup_iters": 0,
                                     "clip_grad_norm": None}, ray={"num_workers": workers}))


def assert_failed_on_a_non_finite_loss(tmp_path: Path, code: int, stderr: str) -> None:
    """Exit 1 with the reason in one line, and the run FAILED in MLflow with the term, epoch and step."""
    assert code == 1, stderr
    assert "stopped: loss term" in stderr and "Traceback" not in stderr
    run = only_run(run_store(tmp_path))
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["dist2.failure_term"] in {"loss", "classification", "bbox_regression", "bbox_ctrness"}
    assert int(tags["dist2.failure_epoch"]) >= 1 and int(tags["dist2.failure_step"]) >= 0
    assert tags["dist2.failure_term"] in tags["dist2.failure"]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def run_store(tmp_path: Path) -> MlflowClient:
    """The default store of runs written under tmp_path/runs."""
    return MlflowClient(f"sqlite:///{tmp_path / 'runs/mlflow.db'}")


def only_run(client: MlflowClient, experiment: str = "dist2"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(port: int, backend_uri: str, artifacts: Path, options: list[str] = ()) -> subprocess.Popen:
    """A real `mlflow server` on loopback with any further `options` and compose.yaml's environment for its server
    (added to this process's), returned once it answers."""
    import urllib.request

    env = {**os.environ, **compose_tracking_server()["env"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
                               "--workers", "1", *options], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
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
    """An ablation file; its report has Table 1 and the teacher-head table unless `tables` is given (the gallery
    is drawn by the one test that checks it)."""
    spec = {"name": path.stem, "output_dir": str(output_dir), "pairs": [pair], "teacher_min_mAP": 0.0,
            "grid": grid, "tables": ["table1", "teacher_head"], **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------- services shared by the whole session

@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (pgserver: PostgreSQL's own binaries from PyPI, in the dev extra; as root it runs
    them as its own system user) with an empty `mlflow` database; yields its URI (a Unix socket)."""
    import pgserver

    with short_temp_dir("dist2-pg-") as home:  # not under pytest's root-only folder: postgres reads it
        server = pgserver.get_server(home / "data", cleanup_mode="stop")
        try:
            server.psql("CREATE DATABASE mlflow;")
            yield server.get_uri("mlflow")
        finally:
            server.cleanup()


def compose_tracking_server() -> dict:
    """docker/compose.yaml's `mlflow server`: its options (flag -> value), its environment and the host:port its
    nodes call it by."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    args = shlex.split(compose["services"]["mlflow"]["command"])
    assert args[:2] == ["mlflow", "server"]
    return {"options": dict(zip(args[2::2], args[3::2], strict=True)),
            "env": compose["services"]["mlflow"]["environment"],
            "client_host": compose["x-node"]["environment"]["MLFLOW_TRACKING_URI"].removeprefix("http://")}


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory) -> dict:
    """The deployment's tracking server, for every test that needs one that stays up: a real `mlflow server` on
    the PostgreSQL above with compose.yaml's own options and environment (only host, port and stores swapped for
    test ones)."""
    swapped = ("--host", "--port", "--backend-store-uri", "--artifacts-destination")
    compose = compose_tracking_server()
    kept = [arg for key, value in compose["options"].items() if key not in swapped for arg in (key, value)]
    port = free_port()
    server = start_mlflow_server(port, postgres, tmp_path_factory.mktemp("mlartifacts"), kept)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "port": port, "pid": server.pid}
    finally:
        stop(server)


RAY = str(Path(sys.executable).parent / "ray")


def ray_start(env: dict, *args: str) -> None:
    """`ray start ARGS` with a small object store, its own dashboard-agent port and no usage stats; a failure says
    why (Ray's output)."""
    # Ray's fixed default for the job agent (52365) would collide with any other Ray on the machine: the agent would
    # not start, and job submission would never find one.
    done = subprocess.run([RAY, "start", *args, f"--dashboard-agent-listen-port={free_port()}",
                           f"--object-store-memory={128 * 2**20}", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray start {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


def stop_cluster(port: int) -> None:
    """`stop_local_cluster(port)`, then a check that none of that cluster's processes still runs."""
    from dist2.bench_cluster import local_cluster_processes, stop_local_cluster

    stop_local_cluster(port)
    assert not local_cluster_processes(port), [p.cmdline()[:3] for p in local_cluster_processes(port)]


NODES = ({"cpus": 3, "gpus": 1}, {"cpus": 2, "gpus": 1})  # the cluster's worker nodes; GPUs declared, not real


@pytest.fixture(scope="session")
def cluster():
    """A real Ray cluster on loopback (`ray start --head`, token auth on) whose head has no CPU, as on an
    autoscaling cloud cluster, its dashboard taking jobs. It starts with no worker node: `add_node()` starts the
    next of NODES (`ray start --address`), `grow()` all that are not up yet. Two 2-CPU workers fit no single node:
    they span both."""
    token = "dist2-test-" + os.urandom(8).hex()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    port, dashboard = free_port(), free_port()
    started: list[float] = []  # when each node joined (time.time())

    def add_node() -> float:
        node = NODES[len(started)]
        ray_start(env, f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={node['cpus']}",
                  f"--num-gpus={node['gpus']}")
        started.append(time.time())
        return started[-1]

    def grow() -> None:
        while len(started) < len(NODES):
            add_node()

    with short_temp_dir("dist2-ray-") as system_temp:
        # Its own temp folder, laid out as Ray's default under RAY_TMPDIR=system_temp: in `as_default` (an
        # environment) it is the newest `ray start` of the machine, the cluster a plain ray.init() would join.
        temp = system_temp / "ray"
        try:  # a head that failed part-way is stopped too
            ray_start(env, "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                      f"--ray-client-server-port={free_port()}")  # not the default 10001, for the same reason
            yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
                   "ray": RAY, "add_node": add_node, "grow": grow, "nodes": started,
                   "as_default": {**os.environ, "RAY_TMPDIR": str(system_temp)}}
        finally:
            stop_cluster(port)  # this cluster only: never another Ray on the machine


# Eight images, evaluated on themselves: a teacher overfitted to them in seconds scores well above zero, which
# makes "this evaluation == that one" a comparison of real numbers.
SMALL = {"val_annotations": "annotations/instances_train.json", "val_images": "train", "hflip_prob": 0.0}


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """(a tiny FCOS teacher's YAML, its run folder, the data it overfits), trained once per session through
    `dist2 train`; its mAP on that data is well above zero."""
    from dist2.cli import main
    from dist2.config import SynthConfig
    from dist2.data.synth import generate

    def train(tmp: Path) -> None:
        root = generate(tmp / "small", SynthConfig(num_train=8, num_val=2, image_size=96, seed=5))
        cfg = tiny_config(tmp, root, name="teacher", data=SMALL,
                          train={"epochs": 25, "lr": 0.02, "warmup_iters": 10, "lr_steps": [20], "eval_every": 25})
        assert main(["train", str(write_config(tmp / "teacher.yaml", cfg))]) == 0  # in this process: no imports

    tmp = once_per_session(tmp_path_factory, "teacher", train)
    assert read_json(tmp / "runs/teacher/metrics.json")["final"]["mAP"] > 5
    return tmp / "teacher.yaml", tmp / "runs/teacher", tmp / "small"
