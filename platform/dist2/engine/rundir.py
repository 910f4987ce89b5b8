"""A run's files, in one place: its epoch checkpoints and its run folder.

Every epoch writes a checkpoint folder `epoch_NNNN/` (config.yaml, model.pth, resume.pth, metrics.json) under
storage_path/name, by default the run folder itself. A folder is complete when metrics.json reads whole and every
other file is there at the size metrics.json records for it: this module writes metrics.json last and atomically,
but Ray persists a reported folder's files in no fixed order, and a worker group lost mid-copy leaves every name
present and one file cut short.
When the run ends, the last checkpoint's files are copied into the run folder (output_dir/name),
which is what users, `dist2 eval` and the ablation's teacher cache read.

`RunDir` answers the questions a driver and its workers ask of these files: where to continue from (the newest
complete checkpoint, or Ray's if that is newer), whether the run has finished, and whether it trained to its last
epoch without being closed (a crash between the last checkpoint and the run's end: it is closed, not retrained).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from dist2 import checkpoint
from dist2.artifacts import BEST, CONFIG, METRICS, RESUME, WEIGHTS
from dist2.config import ExperimentConfig, flatten
from dist2.errors import UserError
from dist2.methods import EVAL_VERSION

FINAL_FILES = (CONFIG, WEIGHTS, RESUME, METRICS)
SIZED_FILES = tuple(name for name in FINAL_FILES if name != METRICS)  # recorded in metrics.json, written after them
# The only settings a run may change when it continues: its length and its resources.
CONTINUABLE = ("train.epochs", "train.lr_steps", "ray.", "eval.")


def read_record(folder: Path) -> dict:
    """A checkpoint's (or run folder's) metrics.json: {"history", "final", "mlflow_run_id", "eval_version",
    "sizes"} (the last two absent in runs from before they were recorded)."""
    return json.loads((Path(folder) / METRICS).read_text())


def write_checkpoint(folder: Path, weights: dict, state: dict, cfg: dict, run_id: str) -> None:
    """One epoch's checkpoint folder; metrics.json last and atomically, with the byte size of every other file (a
    copy of the folder is complete when its files have those sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    checkpoint.atomic_save(weights, folder / WEIGHTS)
    checkpoint.atomic_save(state, folder / RESUME)
    history = state["history"]
    sizes = {name: (folder / name).stat().st_size for name in SIZED_FILES}
    tmp = folder / (METRICS + ".tmp")
    record = {"history": history, "final": history[-1], "mlflow_run_id": run_id, "eval_version": EVAL_VERSION,
              "sizes": sizes}
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / METRICS)


def best_epoch(history: list[dict], metric: str) -> dict | None:
    """The evaluated epoch of highest `metric` (the earliest of equals), or None if none was evaluated."""
    scored = [h for h in history if isinstance(h.get(metric), (int, float)) and h[metric] == h[metric]]
    return max(scored, key=lambda h: h[metric]) if scored else None  # max keeps the first of equals


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds all its files whole (see the module's docstring)."""
    try:
        sizes = read_record(folder).get("sizes", {})  # absent in checkpoints written before sizes were recorded
    except (OSError, ValueError):  # metrics.json missing or still being copied
        return False
    for name in SIZED_FILES:
        try:
            size = (folder / name).stat().st_size
        except OSError:  # not copied yet, or the folder pruned meanwhile
            return False
        if size != sizes.get(name, size):
            return False
    return True


def _epoch(folder: Path | None) -> int:
    return read_record(folder)["final"]["epoch"] if folder is not None else 0


class RunDir:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.folder = cfg.run_dir  # the final files
        # The epoch checkpoints, when they are on a file system this process sees (not s3://...).
        local = "://" not in cfg.storage_path
        self.checkpoints = Path(cfg.storage_path).absolute() / cfg.name if local else None

    def latest(self) -> Path | None:
        """The newest complete epoch checkpoint folder, or None."""
        found = sorted(self.checkpoints.glob("epoch_*")) if self.checkpoints is not None else []
        complete = [folder for folder in found if is_complete(folder)]
        return complete[-1] if complete else None

    def newest(self, other: Path | None) -> Path | None:
        """The newer of `other` (e.g. the checkpoint Ray hands a restarted worker group) and `latest()`: Ray only
        knows a checkpoint once its controller has registered the report, which a worker killed right after the
        checkpoint was written never lets it do."""
        latest = self.latest()
        return other if _epoch(other) > _epoch(latest) else latest

    def epoch_folder(self, epoch: int) -> Path:
        return self.checkpoints / epoch_name(epoch)

    def prune(self, keep: int) -> None:
        for old in sorted(self.checkpoints.glob("epoch_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def finished(self) -> dict | None:
        """The run folder's record if the run has finished all its epochs."""
        record = read_record(self.folder) if (self.folder / METRICS).is_file() else None
        return record if record and record["final"]["epoch"] >= self.cfg.train.epochs else None

    def trained(self) -> dict | None:
        """The record of a run that trained to its last epoch, whether or not its run folder was filled (copied in
        from the newest checkpoint here if not); None for a run still to (continue to) train."""
        if self.finished() is None:
            latest = self.latest()
            if latest is None or _epoch(latest) < self.cfg.train.epochs:
                return None
            self.copy_final(latest)
        return self.finished()

    def keep_best(self, folder: Path, history: list[dict]) -> None:
        """Copy the checkpoint folder just written into best/ when its epoch is the best so far (replacing the
        previous best at once: written beside it, then renamed)."""
        best = best_epoch(history, self.cfg.train.best_metric)
        if best is None or best["epoch"] != history[-1]["epoch"]:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fresh, old = self.folder / f".{BEST}.new", self.folder / f".{BEST}.old"
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(folder, fresh)
        if (self.folder / BEST).exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.folder / BEST, old)
        os.replace(fresh, self.folder / BEST)
        shutil.rmtree(old, ignore_errors=True)

    def copy_final(self, folder: Path) -> None:
        """A checkpoint folder's files into the run folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in FINAL_FILES:
            shutil.copyfile(Path(folder) / name, self.folder / name)

    def check_same_experiment(self) -> None:
        """A run continues only with the same experiment: its schedule length and its resources may change,
        nothing else."""
        latest = self.latest()
        saved = latest / CONFIG if latest else None
        if saved is None or not saved.is_file():
            return
        before = flatten(ExperimentConfig.model_validate(yaml.safe_load(saved.read_text())))
        now = flatten(self.cfg)
        changed = sorted(k for k in before.keys() | now.keys()
                         if before.get(k) != now.get(k) and not k.startswith(CONTINUABLE))
        if changed:
            raise UserError(f"{self.cfg.name}: a run of this name exists in {self.folder} with a different config "
                            f"({', '.join(changed[:8])}); pick another name or delete that folder")
