"""`dist2 report`: an MLflow experiment's finished runs -> results.md in the paper's layout, plus plots.

The runs are read with the MLflow client's `search_runs` into pandas; the tables are built in `tables.py` beside
the paper's numbers (`paper.py`); the report is also logged as the artifacts of the experiment's ablation run (the
parent of its runs in the MLflow UI, tag dist2.kind = ablation; created for an experiment that has none), replaced
by each new report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dist2 import tracking
from dist2.ablation import parent_run
from dist2.ablation.spec import SCHEMA, TABLES
from dist2.errors import UserError
from dist2.methods import CLASS_AP, COCO_METRICS, EVAL_VERSION, TEACHER_HEAD_METRICS, evaluation_name
from dist2.report import gallery, paper, plots, tables

METRICS = (*COCO_METRICS, *TEACHER_HEAD_METRICS)
# What load_runs gives beside the params and metrics: where, by which evaluation and as which MLflow run.
RUN_COLUMNS = ("machine", "eval_version", "run_id", "run_name", "run_dir")
TITLES = {
    "table1": "Table 1 — methods (imitation strategy in brackets)",
    "table2": "Table 2 — one imitation strategy at a time, with DI",
    "table3": "Table 3 — number of imitation strategies used together, with DI",
    "lambda_di": "λ_DI — the weight of the DI terms",
    "teacher_head": "Teacher-head mAP — the student's neck through the teacher's head",
    "per_class": "Per-category AP — the teacher, the student baseline and the best distillation run",
    "gallery": "Gallery — what the teacher, the student and the best distillation run detect",
}
BUILDERS = {"table1": tables.table1, "table2": tables.table2, "table3": tables.table3,
            "lambda_di": tables.lambda_table, "teacher_head": tables.teacher_head_table,
            "per_class": tables.per_class_table}


def load_runs(uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's FINISHED runs that carry the schema params: one row per run, params and final metrics
    as columns named as in MLflow (without the params./metrics. prefixes)."""
    client = tracking.quick_client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as exc:
        raise tracking.unusable(uri, exc) from None
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: "
                        f"{', '.join(names) or 'none'}")
    # The client, not mlflow.search_runs: that needs mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI
    # in this process's environment, where every run started from it afterwards would find it.
    finished, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", page_token=token)
        finished += page
        token = page.token
        if not token:
            break
    rows = [{**{p: run.data.params.get(p) for p in SCHEMA},
             **{m: run.data.metrics.get(m, float("nan")) for m in METRICS},
             **{k: v for k, v in run.data.metrics.items() if k.startswith(CLASS_AP)},
             "machine": run.data.tags.get(tracking.MACHINE_TAG),
             "eval_version": run.data.tags.get(tracking.EVAL_VERSION_TAG), "run_id": run.info.run_id,
             "run_name": run.info.run_name, "run_dir": run.data.tags.get(tracking.RUN_DIR_TAG)} for run in finished]
    columns = [*SCHEMA, *METRICS, *RUN_COLUMNS]
    runs = pd.DataFrame(rows).reindex(columns=[*columns, *sorted({k for r in rows for k in r} - set(columns))])
    runs = runs.astype({c: object for c in (*SCHEMA, *RUN_COLUMNS)})  # text, even with no run to say so
    runs = runs[runs["method"].notna()].fillna({p: "" for p in SCHEMA})
    return runs.iloc[::-1].reset_index(drop=True)  # search_runs lists the newest first: keep the grid's order


def load_experiments(uri: str, experiments: list[str]) -> pd.DataFrame:
    """Several experiments' runs as one frame, e.g. a grid and a later grid that added methods or seeds to it; a
    run found in more than one (the shared, cached teacher) counts once."""
    runs = pd.concat([load_runs(uri, name) for name in experiments], ignore_index=True)
    return runs[runs["run_dir"].isna() | ~runs.duplicated("run_dir")].reset_index(drop=True)


def provenance(runs: pd.DataFrame, command: str | None) -> list[str]:
    """The lines that say how the numbers were made: the command, and each machine with its run count."""
    lines = [f"Command: `{command}`" if command else "Command: not recorded (runs logged outside `dist2 ablate`)."]
    machines = runs["machine"].dropna().value_counts()
    lines += ["Measured on: " + "; ".join(f"{machine} ({n} run(s))" for machine, n in machines.items())
              if len(machines) else "Measured on: not recorded for these runs."]
    return [line + "  " for line in lines[:-1]] + lines[-1:]  # markdown line breaks


NAMED = 10  # the stale runs evaluation_note names (of a whole old grid: the first few, then a count)


def evaluation_note(runs: pd.DataFrame, experiment: str) -> list[str]:
    """A warning under the provenance when some runs were measured by a different evaluation from today's (e.g. a
    teacher cached before a change to the evaluation): their numbers do not compare with the others'."""
    versions = [int(v) if isinstance(v, str) and v.isdigit() else None for v in runs["eval_version"]]
    stale = [f"{name} ({evaluation_name(version)})" for name, version in zip(runs["run_name"], versions, strict=True)
             if version != EVAL_VERSION]
    if not stale:
        return []
    named = "; ".join(stale[:NAMED]) + (f"; and {len(stale) - NAMED} more" if len(stale) > NAMED else "")
    return [f"**Evaluation**: {len(stale)} of {len(runs)} run(s) were measured by a different evaluation from "
            f"today's (v{EVAL_VERSION}), and their numbers may not compare with the others': {named}. "
            f"`python ablations/reevaluate.py {experiment}` measures every run again with today's.", ""]


def render(runs: pd.DataFrame, which: list[str], out: Path, experiments: list[str], command: str | None = None,
           uri: str | None = None) -> str:
    """results.md's text; the plots (and the gallery's pictures, drawn from the runs in the store at `uri`) are
    written to `out` and linked."""
    c = tables.cells(runs)
    lines = [f"# {' + '.join(experiments)}: results", "", *provenance(runs, command), "",
             *evaluation_note(runs, " ".join(experiments)),
             f"{len(runs)} finished run(s). Box mAP in percent on the run's validation set; mean ± sample std "
             "over seeds where a cell has several, n = its seeds; Δ = mAP − the pair's student baseline. "
             "Tables 1–3 use the runs at λ_DI = λ_feat = 1. Paper columns: the poster's COCO numbers (PAPER.md); "
             "– = no finished run.", "", tables.NOISE_RULE, ""]
    for name in which:
        if name == "gallery":
            lines += [f"## {TITLES[name]}", ""] + (gallery.section(uri, runs, c, out) if uri else
                                                   ["(no tracking store given: no pictures)", ""])
            continue
        frame = BUILDERS[name](c)
        lines += [f"## {TITLES[name]}", ""]
        table = frame.to_markdown(index=False, disable_numparse=True) if not frame.empty else "(no runs for this table)"
        lines += [table, ""]
        if any(str(cell).endswith("*") for cell in frame.to_numpy().ravel()):
            lines += [f"\\* {paper.NOTES['*']}", ""]
        if name == "table3":
            lines += ["The paper's Table 3 row repeats its Table 2 row in the source (probably a transcription "
                      "error); it is shown as transcribed.", ""]
        picture = plots.PLOTS.get(name)
        if picture is not None and picture(c, out / f"{name}.png"):
            lines += [f"![{TITLES[name]}]({name}.png)", ""]
    return "\n".join(lines)


def recorded_command(uri: str, experiments: list[str]) -> str | None:
    """The `dist2 ablate` commands that made these experiments, joined for the report's header (None if no
    experiment recorded one: its runs were logged outside `dist2 ablate`)."""
    commands = [tracking.experiment_tag(uri, name, tracking.COMMAND_TAG) for name in experiments]
    return "`; `".join(c for c in commands if c) or None


def write_report(uri: str, experiments: list[str], out: Path, which: list[str] = TABLES,
                 extra_metrics: dict[str, float] | None = None, ablation_run: str | None = None) -> Path:
    """results.md and its pictures in `out`, from one experiment's runs or several experiments' (see
    load_experiments), logged to each experiment's ablation run (`ablation_run`: the one `dist2 ablate` holds
    open, for a report of its own experiment)."""
    runs = load_experiments(uri, experiments)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    path.write_text(render(runs, list(which), out, experiments, recorded_command(uri, experiments), uri) + "\n")
    artifacts = [path] + [out / f"{name}.png" for name in which if (out / f"{name}.png").is_file()]
    if "gallery" in which and (out / gallery.FOLDER).is_dir():
        artifacts.append(out / gallery.FOLDER)
    for name in experiments:
        parent_run.log_summary(uri, name, artifacts, extra_metrics or {}, ablation_run)
    return path
