"""The report's picture gallery: per pair, the same first validation images as the teacher, the student baseline
and the best distillation run see them (and, for a run with DI, what the teacher's head makes of its student's
neck, through the probe: the report has the run's weights, not its trained adapter).

Each picture is `dist2 predict` of a run's own weights and config, fetched from MLflow (model.pth and
config.yaml are artifacts of every finished run); the teacher is the one the student baseline names in its
config (teacher.config, teacher.checkpoint), as it was distilled from. So the gallery is drawn wherever the store,
the data and the teacher's checkpoint are reachable. The pictures go under the report folder and are logged to
each pictured run under `gallery/`.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import pandas as pd

from dist2 import tracking
from dist2.artifacts import CONFIG, WEIGHTS
from dist2.methods import METHODS, TEACHER
from dist2.report import tables

log = logging.getLogger(__name__)
FOLDER = "gallery"
IMAGES = 4  # the first validation images, by image id
SCORE = 0.5  # detections drawn at or above this score


def _first_run(runs: pd.DataFrame, pair: tuple, method: str, strategies: str | None = None):
    """The pair's run of `method` (and strategies) of lowest seed, or None."""
    detector, teacher, student = pair
    mine = runs[(runs["detector"] == detector) & (runs["teacher"] == teacher) & (runs["method"] == method)]
    if method != TEACHER:
        mine = mine[mine["student"] == student]
    if strategies is not None:
        mine = mine[mine["strategies"] == strategies]
    mine = tables.at_reference(mine)
    return mine.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce")).iloc[0] if len(mine) else None


MODEL, ITS_TEACHER, TEACHER_HEAD = "model", "teacher", "teacher head"  # what a picture of a run draws


def _pictured(runs: pd.DataFrame, c: pd.DataFrame, pair: tuple) -> list[tuple[str, pd.Series, str]]:
    """(column title, run, what to draw of it) for the pair's pictures, in the order they are shown."""
    student = _first_run(runs, pair, "student")
    shown = [("teacher", student, ITS_TEACHER), ("student", student, MODEL)]
    best = tables.best_distilled(tables.at_reference(c), pair)
    if best is not None:
        label = f"{tables.method_rows()[best['method']]} ({tables.show_strategies(best['strategies'])})"
        run = _first_run(runs, pair, best["method"], best["strategies"])
        shown.append((label, run, MODEL))
        if "di" in METHODS[best["method"]].losses:
            shown.append((f"{label}: teacher head (probe)", run, TEACHER_HEAD))
    return [(title, run, what) for title, run, what in shown if run is not None]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _draw(uri: str, run: pd.Series, out: Path, what: str) -> list[Path]:
    """The run's pictures (of its model, its teacher or its teacher head) of the first validation images, drawn
    into `out`; they are logged to the run."""
    from dist2.config import load_config
    from dist2.data.build import build_val_dataset
    from dist2.predict import predict

    with tempfile.TemporaryDirectory() as tmp:
        files = tracking.download_artifacts(uri, run["run_id"], [CONFIG] if what == ITS_TEACHER else [CONFIG, WEIGHTS],
                                            Path(tmp))
        cfg = load_config(files[CONFIG])
        if what == ITS_TEACHER:
            cfg, weights = load_config(cfg.teacher.config), cfg.teacher.checkpoint
        else:
            weights = files[WEIGHTS]
        val = build_val_dataset(cfg.data)
        images = [val.image_dir / val.coco.imgs[i]["file_name"] for i in val.ids[:IMAGES]]
        predict(cfg, weights, images, out, SCORE, teacher_head=what == TEACHER_HEAD)
    tracking.log_folder(uri, run["run_id"], out, f"{FOLDER}/{out.name}")
    return [out / f"{image.stem}.png" for image in images]


def section(uri: str, runs: pd.DataFrame, c: pd.DataFrame, out: Path) -> list[str]:
    """The gallery's markdown: per pair, a table of pictures (a row per image, a column per run)."""
    lines = [f"The first {IMAGES} validation images; detections scored ≥ {SCORE} drawn. Each run's own weights "
             "and config, from MLflow (the seed-0 run of a cell).", ""]
    for pair in tables.pairs(c):
        lines += [f"**{pair[1]} → {pair[2]} ({pair[0]})**", ""]
        columns = {}
        for title, run, what in _pictured(runs, c, pair):
            folder = out / FOLDER / _slug("_".join(pair)) / _slug(title)
            try:
                columns[title] = _draw(uri, run, folder, what)
            except Exception as exc:  # pictures must never cost the report its tables
                log.warning("gallery: %s of %s not drawn (%s: %s)", title, pair, exc.__class__.__name__, exc)
                lines += [f"({title}: not drawn — {exc.__class__.__name__}: {exc})", ""]
        if columns:
            rows = [[f"![{title}]({path.relative_to(out)})" for title, path in zip(columns, pictures, strict=True)]
                    for pictures in zip(*columns.values(), strict=True)]
            lines += [pd.DataFrame(rows, columns=list(columns)).to_markdown(index=False), ""]
    return lines
