"""The report's pictures (matplotlib, headless): each returns False when its table has nothing to draw."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dist2.config import STRATEGIES  # noqa: E402
from dist2.report import paper, tables  # noqa: E402


def lambda_plot(c: pd.DataFrame, path: Path) -> bool:
    """mAP against λ_DI, one line per (pair, method, strategies), error bars = std over seeds."""
    di = c[c["method"].isin(["di", "dist2"])]
    if di["lambda_di"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, group in di.groupby(tables.PAIR + ["method", "strategies", "lambda_feat"], sort=False):
        group = group.assign(lam=group["lambda_di"].astype(float)).sort_values("lam")
        label = f"{key[0]} {key[3]} {tables.show_strategies(key[4])}"
        ax.errorbar(group["lam"], group["mAP"], yerr=group["std"].fillna(0), marker="o", capsize=3, label=label)
    ax.set_xlabel("λ_DI")
    ax.set_ylabel("mAP (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def strategy_plot(c: pd.DataFrame, path: Path) -> bool:
    """Δ mAP over the student for each single strategy with DI: ours (one bar per pair) beside the paper's."""
    ref = tables._at_reference(c)
    pairs = tables._pairs(ref)
    bars = {}
    for pair in pairs:
        base = tables._student_mean(ref, pair)
        rows = [tables._di_single(ref, pair, s) for s in STRATEGIES]
        if any(r is not None for r in rows) and base == base:
            bars[f"{pair[1]} → {pair[2]}"] = [r["mAP"] - base if r is not None else float("nan") for r in rows]
    if not bars:
        return False
    bars[f"paper: {paper.TABLE2_PAIR}"] = [paper.TABLE2[s][1] for s in STRATEGIES]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar([x + i * width for x in range(len(STRATEGIES))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(STRATEGIES))], STRATEGIES)
    ax.set_ylabel("Δ mAP over the student (points)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


PLOTS = {"lambda_di": lambda_plot, "table2": strategy_plot}
