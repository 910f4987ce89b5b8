"""Re-evaluate a finished grid's final checkpoints with today's evaluation and write its report from those numbers.

    python ablations/reevaluate.py EXPERIMENT [EXPERIMENT ...] [--tracking-uri URI] [--out DIR]
        [--tables table1 teacher_head]

For grids measured before a change to the evaluation (2026-11-29: val batches hold images of one size, so no
number depends on the batch size any more). Training never reads an evaluation, so a run's final checkpoint
evaluated again gives exactly what the current code's own final evaluation would have logged: every run with a
teacher through `dist2 eval --teacher-head` on its resume.pth (mAP, AR, each category's AP and the teacher-head
measures), a teacher through `dist2 eval` on its model.pth. Writes OUT/results.md (and its plots) and
OUT/reevaluated.json (each run's metrics as logged and as re-evaluated); the MLflow store is only read.
Several experiments make one report (e.g. a grid and a later grid that added methods or seeds to it); a run found
in more than one (a shared, cached teacher) counts once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dist2 import tracking
from dist2.config import load_config
from dist2.distill.teacher_head import evaluate_with_teacher_head
from dist2.evaluation.files import evaluate_checkpoint
from dist2.methods import EVAL_VERSION, TEACHER
from dist2.report import load_experiments, recorded_command, render


def reevaluate(row) -> dict[str, float]:
    run_dir = Path(row["run_dir"])
    cfg = load_config(run_dir / "config.yaml")
    if row["method"] == TEACHER:
        return evaluate_checkpoint(cfg, run_dir / "model.pth")
    return evaluate_with_teacher_head(cfg, run_dir / "resume.pth")


def _grid_folder(runs) -> Path:
    """Where most runs' folders are: the trials' (the teachers' are elsewhere, in the shared cache)."""
    return Path(runs["run_dir"].dropna().map(lambda d: str(Path(d).parent)).mode()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", metavar="EXPERIMENT")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    parser.add_argument("--out", type=Path, help="default: report_reevaluated/ beside the grid's trial folders")
    parser.add_argument("--tables", nargs="+", default=["table1", "teacher_head", "per_class"])
    args = parser.parse_args(argv)
    uri = tracking.resolve_tracking_uri(args.tracking_uri, Path("runs"))
    runs = load_experiments(uri, args.experiments)
    out = args.out or _grid_folder(runs) / "report_reevaluated"
    out.mkdir(parents=True, exist_ok=True)
    record = {}
    for i, row in runs.iterrows():
        start = time.perf_counter()
        metrics = reevaluate(row)
        name = Path(row["run_dir"]).name
        record[name] = {"method": row["method"], "logged": {k: row[k] for k in metrics if k in row.index},
                        "reevaluated": metrics}
        for key, value in metrics.items():  # each category's AP too, which runs logged before it existed lack
            runs.loc[i, key] = value
        runs.loc[i, "eval_version"] = str(EVAL_VERSION)
        print(f"{name}: mAP {row['mAP']:.2f} -> {metrics['mAP']:.2f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    (out / "reevaluated.json").write_text(json.dumps(record, indent=1, default=float))
    made_by = recorded_command(uri, args.experiments) or "(not recorded)"
    given = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"{made_by}`, re-evaluated by `python ablations/reevaluate.py {given}"
    (out / "results.md").write_text(render(runs, args.tables, out, args.experiments, command) + "\n")
    print(out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
