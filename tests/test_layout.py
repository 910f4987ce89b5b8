import importlib
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def test_stdlib_platform_is_not_shadowed():
    # The code lives in platform/dist2, but "platform" must stay the standard library module, from anywhere.
    assert not (REPO / "platform" / "__init__.py").exists()
    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.python_version())"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == platform.python_version()


def test_package_imports_from_platform_folder():
    dist2 = importlib.import_module("dist2")
    assert Path(dist2.__file__).resolve().parent == REPO / "platform" / "dist2"


def test_every_experiment_config_validates():
    from dist2.config import load_config

    files = sorted((REPO / "experiments").rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        if "paper" in path.parts:
            # COCO 2017 is not on this machine: validate everything but the dataset paths.
            cfg = load_config(path, ["data.root=null"])
        else:
            cfg = load_config(path)
        assert cfg.name == path.stem
