"""Matplotlib figures. Built on ``matplotlib.figure.Figure`` directly: no pyplot, no global state."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter


def loss_curve(history: Sequence[dict]) -> Figure:
    """Training and validation loss per epoch, the kept (best) epoch marked."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    epochs = [row["epoch"] for row in history]
    axes.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    axes.plot(epochs, [row["val_loss"] for row in history], marker="o", label="validation")
    best = min(history, key=lambda row: row["val_loss"])
    axes.axvline(best["epoch"], color="grey", linestyle=":", label=f"kept: epoch {best['epoch']}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss (standardised log latency)")
    axes.set_title("Training history")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def forecast_vs_actual(panels: Sequence[dict], horizon: int) -> Figure:
    """One panel per service: actual p99, model forecast and persistence over a test stretch.

    Each panel dict holds ``service``, ``minutes`` (target minute t+H, datetime64),
    ``actual``, ``forecast``, ``persistence`` (ms), ``latency_threshold`` (ms) and ``alert``.
    """
    figure = Figure(figsize=(11, 2.8 * max(len(panels), 1)))
    axes_list = np.atleast_1d(figure.subplots(max(len(panels), 1), 1, squeeze=False)[:, 0])
    for axes, panel in zip(axes_list, panels):
        panel = _break_at_gaps(panel)
        times = pd.to_datetime(panel["minutes"])
        axes.plot(times, panel["actual"], color="black", linewidth=1.0, label="actual p99")
        axes.plot(times, panel["forecast"], color="tab:blue", linewidth=1.2, label=f"forecast (made {horizon} min earlier)")
        axes.plot(times, panel["persistence"], color="tab:orange", linewidth=0.8, alpha=0.7, linestyle="--", label="persistence baseline")
        threshold = panel["latency_threshold"]
        axes.axhline(threshold, color="tab:red", linestyle=":", label=f"threshold {threshold:g} ms")
        breach = np.nan_to_num(panel["actual"]) >= threshold
        axes.scatter(times[breach], panel["actual"][breach], color="tab:red", s=10, zorder=3, label="breach")
        alert = panel["alert"]
        if alert.any():
            low = max(np.nanmin(panel["actual"]) * 0.8, 0.1)  # alert markers along the bottom
            axes.scatter(times[alert], np.full(alert.sum(), low), marker="^", color="tab:blue", s=12, label="alert")
        axes.set_yscale("log")
        axes.set_ylabel("p99 latency (ms)")
        axes.set_title(panel["service"], loc="left")
        axes.grid(alpha=0.3, which="both")
    axes_list[0].legend(loc="upper left", fontsize=8, ncol=3)
    figure.autofmt_xdate()
    return figure


def _break_at_gaps(panel: dict) -> dict:
    """Insert a NaN row wherever minutes are missing, so lines are not drawn across gaps."""
    minutes = np.asarray(panel["minutes"], dtype="datetime64[m]")
    if len(minutes) < 2:
        return panel
    gaps = np.flatnonzero(np.diff(minutes).astype(np.int64) > 1) + 1
    result = dict(panel, minutes=np.insert(minutes, gaps, minutes[gaps - 1] + np.timedelta64(1, "m")))
    for key in ("actual", "forecast", "persistence"):
        result[key] = np.insert(np.asarray(panel[key], dtype=np.float64), gaps, np.nan)
    result["alert"] = np.insert(np.asarray(panel["alert"], dtype=bool), gaps, False)
    return result


def alert_tradeoff(curves: dict[str, tuple], points: dict[str, tuple], target_fpr: float | None) -> Figure:
    """TPR against FPR (log x) per alert score, with operating points and the target FPR line.

    ``curves`` maps a label to ``(fpr, tpr)`` arrays; ``points`` maps a label to one ``(fpr, tpr)``.
    """
    figure = Figure(figsize=(7, 5))
    axes = figure.subplots()
    for label, (fpr, tpr) in curves.items():
        visible = fpr > 0
        axes.plot(fpr[visible], tpr[visible], label=label)
    for (label, (fpr, tpr)), marker in zip(points.items(), "o^sD"):
        if fpr is not None and tpr is not None:
            axes.scatter([max(fpr, 1e-5)], [tpr], marker=marker, s=60, zorder=3, label=f"{label}: FPR {fpr:.2%}, TPR {tpr:.1%}")
    axes.axvline(0.01, color="tab:red", linestyle=":", label="1% FPR (alert-fatigue budget)")
    if target_fpr and abs(target_fpr - 0.01) > 1e-12:
        axes.axvline(target_fpr, color="grey", linestyle="--", label=f"target FPR {target_fpr:g}")
    axes.set_xlim(1e-5, 1)  # limits first: a log axis over the default (0, 1) warns
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("false positive rate (log)")
    axes.set_ylabel("true positive rate")
    axes.set_title("Alert trade-off on the test split")
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3, which="both")
    return figure


def backtest_folds(folds: Sequence[dict]) -> Figure:
    """Per fold (backtest.json entries): MAE, breach TPR and FPR of the model and of persistence."""
    figure = Figure(figsize=(max(7, 1.4 * len(folds) + 3), 8))
    mae_axes, tpr_axes, fpr_axes = figure.subplots(3, 1, sharex=True)
    x = np.arange(len(folds))
    labels = [f"fold {fold['fold']}\n{fold['val_start'][:10]}\n{fold['val_end'][:10]}" for fold in folds]

    def values(source: str, key: str) -> np.ndarray:
        return np.array([np.nan if fold[source][key] is None else fold[source][key] for fold in folds], dtype=float)

    width = 0.38
    sources = (("metrics", "tab:blue", "model"), ("baseline", "tab:orange", "persistence"))
    for offset, (source, color, name) in zip((-width / 2, width / 2), sources):
        mae_axes.bar(x + offset, values(source, "mae"), width, color=color, label=name)
        tpr_axes.plot(x, values(source, "true_positive_rate"), marker="o", color=color, label=name)
        fpr_axes.plot(x, values(source, "false_positive_rate"), marker="s", color=color, label=name)
    mae_axes.set_ylabel("MAE (ms)")
    mae_axes.set_title("Walk-forward backtest: each fold judged on the window after its training")
    highest = np.nanmax(np.concatenate([values("metrics", "mae"), values("baseline", "mae"), [1.0]]))
    mae_axes.set_ylim(0, 1.3 * highest)  # room for the legend above the bars
    mae_axes.legend(loc="upper center", ncol=2)
    tpr_axes.set_ylabel("breach TPR")
    tpr_axes.set_ylim(-0.02, 1.02)
    fpr_axes.set_ylabel("false positive rate")
    fpr_axes.set_ylim(bottom=0)
    fpr_axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    fpr_axes.set_xticks(x, labels)
    fpr_axes.set_xlabel("validation window")
    for axes in (mae_axes, tpr_axes, fpr_axes):
        axes.grid(alpha=0.3, axis="y")
    return figure
