"""Checkpoints: the model weights alone (what a user deploys) and the full resume state, each epoch (their file
names: dist2.artifacts).

Both are plain tensors and Python scalars, so they load with `torch.load(weights_only=True)`; files are written
to a temporary name and renamed, so a crash mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dist2.errors import UserError


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, what: str = "checkpoint") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise UserError(f"{path}: cannot load {what} ({exc.__class__.__name__}: {exc})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a weights file (or the model of a resume state: the student, for a distillation run), requiring exactly
    the model's keys and shapes."""
    state = load(path, "weights")
    state = state.get("model", state)
    if any(k.startswith("student.") for k in state):  # a distillation run's resume state: its student part
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise UserError(f"{path}: does not match the configured model ({len(missing)} missing keys, e.g. "
                        f"{missing[:3]}; {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}; "
                        f"{len(mismatched)} shape mismatches, e.g. {mismatched[:2]})")
    model.load_state_dict(state)
