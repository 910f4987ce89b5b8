"""The report's pictures (matplotlib, headless): each returns False when its table has nothing to draw."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dist2.methods import STRATEGIES, TEACHER  # noqa: E402
from dist2.report import paper, tables  # noqa: E402


def _legend_beside(fig, ax) -> None:
    """The legend right of the axes, where it covers no bar or point."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()


def lambda_plot(c: pd.DataFrame, path: Path) -> bool:
    """mAP against λ_DI, one line per (pair, method, strategies), error bars = sample std over seeds."""
    di = c[c["method"].isin(tables.di_methods())]
    if di["lambda_di"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, group in di.groupby(tables.PAIR + ["method", "strategies", "lambda_feat"], sort=False):
        group = group.assign(lam=group["lambda_di"].astype(float)).sort_values("lam")
        label = f"{key[0]} {key[3]} {tables.show_strategies(key[4])}"
        ax.errorbar(group["lam"], group["mAP"], yerr=group["std"].fillna(0), marker="o", capsize=3, label=label)
    ax.set_xlabel("λ_DI")
    ax.set_ylabel("mAP (%), ± seed std")
    _legend_beside(fig, ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _error_bar(row, base) -> float:
    """A Δ's error bar: the pooled seed std of the cell and its baseline; 0 where either has one seed (no noise
    estimate)."""
    return tables.pooled_std(row, base) if min(row["n"], base["n"]) > 1 else 0.0


def _delta_bars(series: dict[str, list[tuple[float, float]]], ticks: list[str], path: Path) -> None:
    """Grouped bars of Δ mAP over the student, one group per tick and one bar per series, each (Δ, error bar);
    a bar without a noise estimate (error 0) gets no error bar."""
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        errors = [e if e > 0 else float("nan") for _, e in values]
        ax.bar([x + i * width for x in range(len(ticks))], [v for v, _ in values], width, yerr=errors, capsize=3,
               label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(ticks))], ticks, rotation=20, ha="right")
    ax.set_ylabel("Δ mAP over the student (points),\n± pooled seed std")
    ax.axhline(0, color="black", linewidth=0.5)
    _legend_beside(fig, ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a slanted first label reaches left of the axes
    plt.close(fig)


def table1_deltas(c: pd.DataFrame) -> dict[str, dict[tuple, tuple[float, float]]]:
    """Table 1's Δs as bar series: per pair, (method, strategies) -> (Δ mAP over the pair's student, error bar =
    the pooled seed std of the cell and its baseline, 0 with one seed); after a detector's first pair, the paper's
    Δs for that detector (no error bar)."""
    ref = tables.at_reference(c)
    series = {}
    for pair in tables.pairs(ref):
        base = tables.student_cell(ref, pair)
        rows = [(m, s, row) for m, s, row in tables.table1_rows(ref, pair) if m not in (TEACHER, "student")]
        ours = {(m, s): (row["mAP"] - base["mAP"], _error_bar(row, base))
                for m, s, row in rows if row is not None and base is not None}
        if ours:
            series[f"{pair[1]} → {pair[2]} ({pair[0]})"] = ours
            series.setdefault(f"paper: {paper.TABLE1_PAIR} ({pair[0]})", {
                (m, s): (paper.TABLE1[(pair[0], m, s)][1], 0.0) for m, s, _ in rows if (pair[0], m, s) in paper.TABLE1})
    return series


def methods_plot(c: pd.DataFrame, path: Path) -> bool:
    """Table 1 as bars: each method row's Δ over its pair's student beside the paper's (table1_deltas)."""
    series = table1_deltas(c)
    if not series:
        return False
    names = tables.method_rows()
    order = list(names)
    keys = sorted(dict.fromkeys(k for cells in series.values() for k in cells), key=lambda k: order.index(k[0]))
    # The Hint row's name carries its strategy ("+ Hint = FI (N2N)"); the others take theirs in brackets.
    ticks = [names[m] if m == "hint" else f"{names[m]} ({tables.show_strategies(s)})" for m, s in keys]
    _delta_bars({label: [cells.get(k, (float("nan"), 0.0)) for k in keys] for label, cells in series.items()},
                ticks, path)
    return True


def strategy_plot(c: pd.DataFrame, path: Path) -> bool:
    """Δ mAP over the student for each single strategy with DI: ours (one bar per pair, error bar = the pooled
    seed std of the cell and its baseline; none with one seed) beside the paper's."""
    ref = tables.at_reference(c)
    series = {}
    for pair in tables.pairs(ref):
        base = tables.student_cell(ref, pair)
        rows = [tables.di_single(ref, pair, s) for s in STRATEGIES]
        if base is None or all(r is None for r in rows):
            continue
        series[f"{pair[1]} → {pair[2]}"] = [(r["mAP"] - base["mAP"], _error_bar(r, base)) if r is not None
                                            else (float("nan"), 0.0) for r in rows]
    if not series:
        return False
    series[f"paper: {paper.TABLE2_PAIR}"] = [(paper.TABLE2[s][1], 0.0) for s in STRATEGIES]
    _delta_bars(series, list(STRATEGIES), path)
    return True


PLOTS = {"table1": methods_plot, "lambda_di": lambda_plot, "table2": strategy_plot}
