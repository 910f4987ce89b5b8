"""`dist2 export CONFIG --checkpoint PATH --out FILE`: the detector as a TorchScript file.

The file holds torchvision's scripted FCOS / RetinaNet (pre- and post-processing included) behind a forward that
takes a list of CHW float images in [0, 1] and returns their detections (boxes xyxy in the input's pixels, scores,
labels); `categories.json` beside the code in the file maps each label to the dataset's category id and name:

    model = torch.jit.load("student.pt", _extra_files=(files := {"categories.json": ""}))
    detections = model([image])

Every finished run logs the same module as its MLflow model (`tracking.log_model`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from dist2.artifacts import CATEGORIES_FILE
from dist2.checkpoint import load_weights
from dist2.config import ExperimentConfig
from dist2.data.build import build_val_dataset
from dist2.modeling import build_detector


class Exported(torch.nn.Module):
    """Detections only: a scripted torchvision detector returns (losses, detections)."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:  # typing names: TorchScript
        return self.detector(images)[1]


def scripted(cfg: ExperimentConfig, checkpoint: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The checkpoint's detector as TorchScript, and its labels ({label: {"id": category id, "name": name}})."""
    categories = build_val_dataset(cfg.data).categories  # {category id: name}, in label order
    model = build_detector(cfg.model, cfg.data, categories)
    load_weights(model, checkpoint)
    labels = {i: {"id": cat_id, "name": name} for i, (cat_id, name) in enumerate(categories.items())}
    with warnings.catch_warnings():
        # torch 2.9+ calls TorchScript deprecated; torchvision's detectors are made for it, and torch.export cannot
        # trace their data-dependent post-processing.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(Exported(model.eval())), labels


def export(cfg: ExperimentConfig, checkpoint: Path, out: Path) -> Path:
    model, labels = scripted(cfg, checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(model, str(out), _extra_files={CATEGORIES_FILE: json.dumps(labels)})
    return out
