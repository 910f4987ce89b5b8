"""The paper's tables from a frame of finished runs (one row per run, the MLflow schema's params as columns).

Cells are the runs of one (detector, teacher, student, method, strategies, lambda_di, lambda_feat), aggregated
over seeds: mean ± sample std and the seed count n. Δ = a cell's mean mAP - the mean mAP of its pair's student
baseline, marked by NOISE_RULE. A cell with no finished run prints "–"; nothing is interpolated.
"""

from __future__ import annotations

import math

import pandas as pd

from dist2.methods import (
    ALL2ALL,
    CLASS_AP,
    HINT,
    HINT_ROW,
    METHODS,
    PROBE_METRIC,
    STRATEGIES,
    TEACHER,
    TEACHER_HEAD_METRICS,
    TEACHER_ROW,
    TRAINED_METRIC,
)
from dist2.report import paper

PAIR = ["detector", "teacher", "student"]
CELL = PAIR + ["method", "strategies", "lambda_di", "lambda_feat"]
MISSING = "–"
def method_rows() -> dict[str, str]:
    """Row labels in the report's order: the teacher, the student, Hint (FI at N2N), then the methods as
    registered (read at report time: a method registered later is placed too)."""
    return {TEACHER: TEACHER_ROW, "student": METHODS["student"].row, "hint": HINT_ROW,
            **{name: method.row for name, method in METHODS.items()}}


def di_methods() -> list[str]:
    """The methods weighted by λ_DI: the cells of the λ_DI table."""
    return [name for name, method in METHODS.items() if method.lambda_di]
REFERENCE_LAMBDA = ("", "1.0")  # Tables 1-3 use the runs at the default λ_DI = λ_feat = 1 (the paper's setting)


SPREAD = "|"  # `<metric>|std`, `<metric>|n`: no metric name has it (a category's is sanitised to \w, -, ., space)


def class_metrics(frame: pd.DataFrame) -> list[str]:
    """The per-category AP metrics (CLASS_AP + name) of a frame of runs or cells, by name (MLflow keeps no order)."""
    return sorted(c for c in frame.columns if c.startswith(CLASS_AP) and SPREAD not in c)


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: mAP mean/std/n, and the same (`<metric>`, `<metric>|std`, `<metric>|n`) for the two
    teacher-head measures and each category's AP."""
    grouped = runs.groupby(CELL, sort=False)
    columns = [grouped["mAP"].agg(mAP="mean", std="std", n="count")]
    for metric in (*TEACHER_HEAD_METRICS, *class_metrics(runs)):
        std, n = _spread(metric)
        columns.append(grouped[metric].agg(**{metric: "mean", std: "std", n: "count"}))
    out = pd.concat(columns, axis=1).reset_index()
    # Rows in the paper's order whatever order the trials ran in: pairs as they first appear, then the method
    # (teacher, student, baselines, DI, Dist2), the number of strategies, the strategies, λ.
    pair_order = {pair: i for i, pair in enumerate(dict.fromkeys(out[PAIR].apply(tuple, axis=1)))}
    order = pd.DataFrame({"pair": out[PAIR].apply(tuple, axis=1).map(pair_order),
                          "method": out["method"].map(list(method_rows()).index),
                          "k": out["strategies"].str.count(",") + (out["strategies"] != ""),
                          "strategies": out["strategies"].map(
                              lambda s: tuple(sorted(STRATEGIES.index(x) for x in s.split(",") if x))),
                          "lambda_di": pd.to_numeric(out["lambda_di"], errors="coerce"),
                          "lambda_feat": pd.to_numeric(out["lambda_feat"], errors="coerce")})
    return out.loc[order.sort_values(list(order.columns), kind="stable").index].reset_index(drop=True)


def at_reference(c: pd.DataFrame) -> pd.DataFrame:
    return c[c["lambda_di"].isin(REFERENCE_LAMBDA) & c["lambda_feat"].isin(REFERENCE_LAMBDA)]


def fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return MISSING
    spread = f" ± {std:.1f}" if std is not None and not math.isnan(std) else ""
    return f"{mean:.1f}{spread}"


def fmt_delta(delta: float | None) -> str:
    return MISSING if delta is None or math.isnan(delta) else f"{delta:+.1f}"


ABOVE_NOISE, WITHIN_NOISE, ONE_SEED = "✓", "within noise", "1 seed: no noise estimate"
NOISE_RULE = (f"A Δ is marked {ABOVE_NOISE} (above noise) only when both cells have ≥ 2 seeds and |Δ| exceeds twice "
              "their pooled seed standard deviation; with 2–3 seeds this is a rough screen, not a significance "
              f"test. Otherwise it reads \"{WITHIN_NOISE}\", or \"{ONE_SEED}\" when either cell has a single seed.")


def _spread(metric: str) -> tuple[str, str]:
    """A cell's std and seed-count columns for `metric` (mAP's are plain `std` and `n`)."""
    return ("std", "n") if metric == "mAP" else (f"{metric}{SPREAD}std", f"{metric}{SPREAD}n")


def pooled_std(a, b, metric: str = "mAP") -> float:
    """The pooled sample standard deviation of two cells' `metric` over their seeds."""
    std, n = _spread(metric)
    dof = a[n] + b[n] - 2
    return math.sqrt(((a[n] - 1) * a[std] ** 2 + (b[n] - 1) * b[std] ** 2) / dof)


def marked_delta(row, base, metric: str = "mAP") -> str:
    """`row`'s Δ over `base` (both cells) in `metric` with its noise mark, e.g. "+6.0 ✓", "+0.4 (within noise)"."""
    delta = row[metric] - base[metric]
    if math.isnan(delta):
        return MISSING
    _, n = _spread(metric)
    if min(row[n], base[n]) < 2:
        return f"{delta:+.1f} ({ONE_SEED})"
    if abs(delta) > 2 * pooled_std(row, base, metric):
        return f"{delta:+.1f} {ABOVE_NOISE}"
    return f"{delta:+.1f} ({WITHIN_NOISE})"


def fmt_cell(row) -> str:
    """mean ± std, n=seeds."""
    return f"{fmt(row['mAP'], row['std'])}, n={int(row['n'])}"


def show_strategies(strategies: str) -> str:
    """`B2B,N2N` -> `N2N, B2B` (the paper's order); all four -> All2All; none -> –."""
    if not strategies:
        return MISSING
    chosen = strategies.split(",")
    return ALL2ALL if len(chosen) == len(STRATEGIES) else ", ".join(s for s in STRATEGIES if s in chosen)


def student_cell(c: pd.DataFrame, pair: tuple) -> pd.Series | None:
    """The pair's student-baseline cell (mAP, std, n), or None."""
    rows = c[(c[PAIR].apply(tuple, axis=1) == pair) & (c["method"] == "student")]
    return rows.iloc[0] if len(rows) else None


def pairs(c: pd.DataFrame) -> list[tuple]:
    """The (detector, teacher, student) pairs that have student runs, in the order they appear."""
    rows = c[c["method"] != TEACHER]
    return list(dict.fromkeys(rows[PAIR].apply(tuple, axis=1)))


def _teacher_row(c: pd.DataFrame, detector: str, teacher: str):
    rows = c[(c["detector"] == detector) & (c["teacher"] == teacher) & (c["method"] == TEACHER)]
    return rows.iloc[0] if len(rows) else None


def table1_rows(c: pd.DataFrame, pair: tuple) -> list[tuple[str, str, pd.Series | None]]:
    """A pair's Table 1 rows in the report's order, ours and the paper's together: (method, strategies, our cell or
    None). Hint (FI at N2N, one experiment) is the "hint" row."""
    detector, teacher, _ = pair
    ours = {}
    t = _teacher_row(c, detector, teacher)
    if t is not None:
        ours[(TEACHER, "")] = t
    for _, row in c[(c[PAIR].apply(tuple, axis=1) == pair)].iterrows():
        key = (row["method"], row["strategies"])
        ours[("hint", "N2N") if key == (HINT[0], ",".join(HINT[1])) else key] = row
    published = [k[1:] for k in paper.TABLE1 if k[0] == detector]
    keys = list(dict.fromkeys(published + list(ours)))
    order = list(method_rows())
    keys.sort(key=lambda k: order.index(k[0]))
    return [(method, strategies, ours.get((method, strategies))) for method, strategies in keys]


def table1(c: pd.DataFrame) -> pd.DataFrame:
    """Per detector and pair: teacher, student and each method with its strategy; ours beside the paper's."""
    c = at_reference(c)
    rows = method_rows()
    out = []
    for pair in pairs(c):
        detector, teacher, student = pair
        base = student_cell(c, pair)
        for method, strategies, row in table1_rows(c, pair):
            mean = None if row is None else row["mAP"]
            p_map, p_delta, note = paper.TABLE1.get((detector, method, strategies), (None, None, ""))
            label = {TEACHER: teacher, "student": student}.get(method, "")
            out.append({
                "detector": detector, "teacher → student": f"{teacher} → {student}",
                "row": f"{label} {rows[method]}".strip(), "strategy": show_strategies(strategies),
                "mAP": fmt(mean, None if row is None else row["std"]),
                "Δ": marked_delta(row, base) if row is not None and base is not None
                and method not in (TEACHER, "student") else "",
                "seeds": "" if row is None else int(row["n"]),
                f"paper mAP ({paper.TABLE1_PAIR})": MISSING if p_map is None else f"{p_map:.1f}{note}",
                "paper Δ": "" if p_delta is None else fmt_delta(p_delta),
            })
    return pd.DataFrame(out)


def di_single(c: pd.DataFrame, pair: tuple, strategies: str):
    rows = c[(c[PAIR].apply(tuple, axis=1) == pair) & (c["method"] == "di") & (c["strategies"] == strategies)]
    return rows.iloc[0] if len(rows) else None


def _with_delta(row, base) -> str:
    if row is None:
        return MISSING
    return f"{fmt_cell(row)}; Δ {marked_delta(row, base) if base is not None else MISSING}"


def table2(c: pd.DataFrame) -> pd.DataFrame:
    """One imitation strategy at a time with DI: mAP (Δ) per strategy, a row per pair, the paper's row last."""
    c = at_reference(c)
    out = []
    for pair in pairs(c):
        base = student_cell(c, pair)
        out.append({"pair": f"{pair[1]} → {pair[2]} ({pair[0]})",
                    "student": MISSING if base is None else fmt_cell(base),
                    **{s: _with_delta(di_single(c, pair, s), base) for s in STRATEGIES}})
    out.append({"pair": f"paper: {paper.TABLE2_PAIR}", "student": fmt(paper.TABLE2_STUDENT),
                **{s: f"{m:.1f} ({fmt_delta(d)})" for s, (m, d) in paper.TABLE2.items()}})
    return pd.DataFrame(out)


def table3(c: pd.DataFrame) -> pd.DataFrame:
    """Number of strategies used together with DI (the first k of N2N, B2B, B2N, N2B; other subsets of two or
    more get a row of their own), the paper's row (as transcribed) last."""
    c = at_reference(c)
    out = []
    for pair in pairs(c):
        base = student_cell(c, pair)
        mine = c[(c[PAIR].apply(tuple, axis=1) == pair) & (c["method"] == "di")]
        rows: dict[str, dict] = {}
        for _, row in mine.iterrows():
            chosen = row["strategies"].split(",")
            k = len(chosen)
            first_k = sorted(chosen) == sorted(STRATEGIES[:k])
            if k == 1 and not first_k:
                continue  # one strategy other than N2N: Table 2's row, not a count
            name = "first k" if first_k else show_strategies(row["strategies"])
            rows.setdefault(name, {str(i): MISSING for i in range(1, 5)})[str(k)] = _with_delta(row, base)
        for name, values in sorted(rows.items(), key=lambda kv: kv[0] != "first k"):
            out.append({"pair": f"{pair[1]} → {pair[2]} ({pair[0]})", "strategies": name, **values})
    out.append({"pair": f"paper: {paper.TABLE2_PAIR}", "strategies": "first k (as transcribed)",
                **{str(k): f"{m:.1f}" for k, m in paper.TABLE3.items()}})
    return pd.DataFrame(out)


def lambda_table(c: pd.DataFrame) -> pd.DataFrame:
    """mAP of each DI cell (di, dist2) against λ_DI; the paper publishes no λ sweep."""
    di = c[c["method"].isin(di_methods())]
    if di.empty:
        return pd.DataFrame()
    lambdas = sorted(di["lambda_di"].unique(), key=float)
    out = []
    for key, group in di.groupby(PAIR + ["method", "strategies", "lambda_feat"], sort=False):
        detector, teacher, student, method, strategies, lambda_feat = key
        values = {f"λ_DI={lam}": MISSING for lam in lambdas}
        for _, row in group.iterrows():
            values[f"λ_DI={row['lambda_di']}"] = fmt_cell(row)
        out.append({"pair": f"{teacher} → {student} ({detector})", "method": method_rows()[method],
                    "strategy": show_strategies(strategies), "λ_feat": lambda_feat or MISSING, **values})
    return pd.DataFrame(out)


PROBE_COLUMN = "teacher head, probe (every run)"
TRAINED_COLUMN = "teacher head, the run's own N2N adapter"


PROBE_DELTA_COLUMN = "probe Δ over the student"


def teacher_head_table(c: pd.DataFrame) -> pd.DataFrame:
    """The poster's motivation: the student's neck through the teacher's head beside mAP. The probe column is the
    same least-squares procedure for every run (comparable across rows, so its Δ over the student baseline is
    marked by the noise rule); the adapter column is the run's own trained N2N f_trans (DI-N2N trains it through
    the teacher's head: high by construction). Means ± std over the cell's seeds."""
    rows = c[(c["method"] != TEACHER) & c[PROBE_METRIC].notna()]
    out = []
    for _, r in rows.iterrows():
        pair = tuple(r[PAIR])
        base = student_cell(c, pair)
        out.append({
            "pair": f"{r['teacher']} → {r['student']} ({r['detector']})", "row": method_rows()[r["method"]],
            "strategy": show_strategies(r["strategies"]), "λ_DI": r["lambda_di"] or MISSING,
            "λ_feat": r["lambda_feat"] or MISSING, "mAP": fmt_cell(r),
            PROBE_COLUMN: fmt(r[PROBE_METRIC], r[_spread(PROBE_METRIC)[0]]),
            PROBE_DELTA_COLUMN: "" if base is None or r["method"] == "student"
            else marked_delta(r, base, PROBE_METRIC),
            TRAINED_COLUMN: fmt(r[TRAINED_METRIC], r[_spread(TRAINED_METRIC)[0]])})
    return pd.DataFrame(out)


def best_distilled(c: pd.DataFrame, pair: tuple):
    """The pair's distillation cell of highest mean mAP (at λ = 1), or None."""
    mine = c[(c[PAIR].apply(tuple, axis=1) == pair) & ~c["method"].isin([TEACHER, "student"])]
    return mine.loc[mine["mAP"].idxmax()] if len(mine) else None


def per_class_table(c: pd.DataFrame) -> pd.DataFrame:
    """Which categories distillation helps: each category's AP for the pair's teacher, its student baseline and its
    best distillation cell (by mAP), with that cell's Δ over the student per category, marked by the noise rule on
    the category's own seed spread."""
    c = at_reference(c)
    out = []
    for pair in pairs(c):
        detector, teacher, student = pair
        base, best, t = student_cell(c, pair), best_distilled(c, pair), _teacher_row(c, detector, teacher)
        if base is None or best is None:
            continue
        best_label = f"{method_rows()[best['method']]} ({show_strategies(best['strategies'])})"
        for metric in class_metrics(c):
            if math.isnan(base[metric]) and math.isnan(best[metric]):
                continue  # a category this pair's runs never logged (another dataset's, or no final evaluation)
            out.append({
                "pair": f"{teacher} → {student} ({detector})", "category": metric.removeprefix(CLASS_AP),
                "teacher": MISSING if t is None else fmt(t[metric]),
                "student": fmt(base[metric], base[_spread(metric)[0]]),
                "best run": best_label, "best run AP": fmt(best[metric], best[_spread(metric)[0]]),
                "Δ": marked_delta(best, base, metric)})
    return pd.DataFrame(out)
