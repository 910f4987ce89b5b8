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


def test_every_ablation_file_expands(monkeypatch):
    from dist2.ablation.spec import grid_runs, load_ablation, teacher_runs

    monkeypatch.chdir(REPO)  # the files name experiment YAMLs relative to the repository root, as the CLI does
    files = sorted((REPO / "ablations").glob("*.yaml"))
    names = {path.stem for path in files}
    assert {"quickstart", "paper_table1", "paper_table2", "paper_table3", "paper_full"} <= names
    assert {"quick_table1", "quick_table2", "quick_table3", "quick_full"} <= names
    for path in files:
        # COCO 2017 is not on this machine: the paper grids are expanded with the synthetic data instead.
        spec = load_ablation(path, ['set=["data.root=null"]'] if path.stem.startswith("paper") else [])
        assert spec.name == path.stem
        teachers = teacher_runs(spec, path)
        runs = grid_runs(spec, path, teachers)
        assert len({run.cfg.name for run in runs}) == len(runs)
        assert {run.params["method"] for run in runs} >= {"student", "di"}


def _help(*words: str) -> str:
    import contextlib
    import io

    from dist2.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*words, "--help"])
    return out.getvalue()


def _subcommands(help_text: str) -> list[str]:
    """The {a,b,c} choices argparse lists in a usage line."""
    import re

    found = re.search(r"\{([a-z,-]+)\}", help_text)
    return found.group(1).split(",") if found else []


def test_every_subcommand_and_option_of_the_cli_is_in_the_readme_command_list():
    import re

    readme = (REPO / "README.md").read_text()
    listing = readme.split("## Command line", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines = listing.strip().splitlines()
    top = _help()
    assert "-v, --verbose" in top and "--verbose" in lines[0]
    commands = [[c] for c in _subcommands(top)]
    commands += [[c, sub] for [c] in commands for sub in _subcommands(_help(c)) if c == "data"]
    commands = [c for c in commands if c != ["data"]]
    assert {" ".join(c) for c in commands} >= {"train", "distill", "ablate", "report", "eval", "data synth", "bench"}

    def listed(name: str) -> str:
        """The lines that start with `name`, and their indented continuations."""
        mine, inside = [], False
        for line in lines:
            inside = line.startswith(name + " ") or (inside and line.startswith(" "))
            if inside:
                mine.append(line)
        return " ".join(mine)

    for words in commands:
        name = "dist2 " + " ".join(words)
        text = listed(name)
        assert text, f"{name} is not in the README's command list"
        if "[same options]" in text:  # dist2 distill: as dist2 train
            text += listed("dist2 train")
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", _help(*words))) - {"--help"}
        assert options or words == ["data"], name
        missing = sorted(o for o in options if o not in text)
        assert not missing, f"{name}: options missing from the README's command list: {missing}"


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from dist2... import name` and `import dist2...` in a file."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dist2"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("dist2")]
    return found


def test_layers_import_one_way_and_share_only_public_names():
    """evaluation never imports engine (engine evaluates); no module imports another's private name."""
    import re

    package = REPO / "platform" / "dist2"
    for path in sorted(package.rglob("*.py")):
        own = "dist2." + ".".join(path.relative_to(package).with_suffix("").parts)
        for module, name in _imports(path):
            if path.parent.name == "evaluation":
                assert not module.startswith("dist2.engine"), f"{path}: imports {module}"
            if module != own:
                assert not name.startswith("_"), f"{path}: imports the private {module}.{name}"
        # attribute access to another module's private helper (tracking._x, tables._y)
        for match in re.finditer(r"\b(tracking|tables|config|spec|scheduling)\._[a-z]\w*", path.read_text()):
            assert path.stem == match.group(1), f"{path}: reaches into {match.group(0)}"
