"""Reading config files: YAML, and an experiment's `base:` chain.

An experiment YAML may start with `base: other.yaml` (a path relative to the file; the base may have a base of its
own). The chain is merged from the root down: sections merge key by key, any other value (lists included) is
replaced by the child's. `name` is never inherited: each file names its own run, so that two children of one base
never share a run folder. What comes out is a plain dict with no `base:` key: the resolved config that is
validated, saved as config.yaml and logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dist2.errors import UserError

BASE = "base"


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return raw


def deep_merge(base: dict, child: dict) -> dict:
    """`child` over `base`: nested mappings merge, every other value (a list too) is replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_experiment(path: Path) -> dict:
    """An experiment YAML with its `base:` chain resolved (see the module docstring)."""
    return _resolved(Path(path), [])


def _resolved(path: Path, chain: list[Path]) -> dict:
    if path.resolve() in [p.resolve() for p in chain]:
        raise UserError(f"{chain[0]}: base: the chain {' -> '.join(map(str, [*chain, path]))} is a cycle")
    if chain and not path.is_file():
        raise UserError(f"{chain[-1]}: base: {path} does not exist (chain: {' -> '.join(map(str, [*chain, path]))})")
    raw = read_yaml(path)
    base = raw.pop(BASE, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base: expected the path of another experiment YAML, got {base!r}")
    inherited = _resolved(path.parent / base, [*chain, path])
    inherited.pop("name", None)
    return deep_merge(inherited, raw)
