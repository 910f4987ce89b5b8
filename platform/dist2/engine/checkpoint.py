"""Checkpoints: the model weights alone (what a user deploys) and the full resume state, each epoch.

Both are plain tensors and Python scalars, so they load with `torch.load(weights_only=True)`; files are written
to a temporary name and renamed, so a crash mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dist2.errors import UserError

WEIGHTS = "model.pth"  # the model's state_dict, loadable into the torchvision detector
RESUME = "resume.pth"  # model, optimizer, scheduler, scaler, epoch


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
    """Load a weights file (or the model part of a resume state), requiring an exact key match."""
    state = load(path, "weights")
    state = state.get("model", state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path}: does not match the configured model "
                        f"({len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:3]}; "
                        f"{len(result.unexpected_keys)} unexpected keys, e.g. {result.unexpected_keys[:3]})")
