"""Checkpoints: the model weights alone (what a user deploys) and the full resume state, each epoch (their file
names: dist2.artifacts).

Both are plain tensors and Python scalars, so they load with `torch.load(weights_only=True)`; files are written
to a temporary name and renamed, so a crash mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dist2.errors import UserError

log = logging.getLogger(__name__)


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


def _detector_state(path: Path, what: str) -> dict:
    """The detector weights in a weights file or a resume state (the student's part, for a distillation run)."""
    state = load(path, what)
    state = state.get("model", state)
    if any(k.startswith("student.") for k in state):
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    return state


def load_weights(model: torch.nn.Module, path: Path, what: str = "weights", hint: str = "") -> None:
    """Load a weights file (or the model of a resume state: the student, for a distillation run), requiring exactly
    the model's keys and shapes."""
    state = _detector_state(path, what)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise UserError(f"{path}: does not match the configured model ({len(missing)} missing keys, e.g. "
                        f"{missing[:3]}; {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}; "
                        f"{len(mismatched)} shape mismatches, e.g. {mismatched[:2]}){hint}")
    model.load_state_dict(state)


def load_init(model: torch.nn.Module, path: Path, strict: bool) -> list[str]:
    """`model.init_checkpoint`: weights loaded before training. Strict: exactly the model's keys and shapes. Not
    strict (`model.init_strict: false`): every key of the same name and shape is loaded and the others keep their
    fresh initialisation (e.g. a head for another class count); returns those."""
    what = "model.init_checkpoint"
    if strict:
        load_weights(model, path, what, hint="; model.init_strict: false loads only the keys that fit")
        return []
    expected = model.state_dict()
    fits = {k: v for k, v in _detector_state(path, what).items() if k in expected and v.shape == expected[k].shape}
    if not fits:
        raise UserError(f"{path}: {what} has no key of the configured model's names and shapes")
    model.load_state_dict(fits, strict=False)
    return sorted(set(expected) - set(fits))


def initialise(model: torch.nn.Module, cfg) -> None:
    """Apply a ModelConfig's init_checkpoint (if any) to a freshly built model, saying what kept its own init."""
    if cfg.init_checkpoint is None:
        return
    kept = load_init(model, cfg.init_checkpoint, cfg.init_strict)
    log.info("model.init_checkpoint %s loaded%s", cfg.init_checkpoint,
             f"; {len(kept)} key(s) of another shape or absent keep their init, e.g. {kept[:3]}" if kept else "")
