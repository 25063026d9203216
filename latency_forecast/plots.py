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


def forecast_vs_actual(
    panels: Sequence[dict], latency_threshold: float, horizon: int
) -> Figure:
    """One panel per service: actual p99, model forecast and persistence over a test stretch.

    Each panel dict holds ``service``, ``minutes`` (target minute t+H, datetime64),
    ``actual``, ``forecast``, ``persistence`` (ms).
    """
    figure = Figure(figsize=(11, 2.8 * max(len(panels), 1)))
    axes_list = np.atleast_1d(figure.subplots(max(len(panels), 1), 1, squeeze=False)[:, 0])
    for axes, panel in zip(axes_list, panels):
        times = pd.to_datetime(panel["minutes"])
        axes.plot(times, panel["actual"], color="black", linewidth=1.0, label="actual p99")
        axes.plot(times, panel["forecast"], color="tab:blue", linewidth=1.2, label=f"forecast (made {horizon} min earlier)")
        axes.plot(times, panel["persistence"], color="tab:orange", linewidth=0.8, alpha=0.7, linestyle="--", label="persistence baseline")
        axes.axhline(latency_threshold, color="tab:red", linestyle=":", label=f"threshold {latency_threshold:g} ms")
        breach = panel["actual"] >= latency_threshold
        axes.scatter(times[breach], panel["actual"][breach], color="tab:red", s=10, zorder=3, label="breach")
        alert = panel["forecast"] >= latency_threshold
        if alert.any():
            low = max(np.nanmin(panel["actual"]) * 0.8, 0.1)
            axes.scatter(times[alert], np.full(alert.sum(), low), marker="^", color="tab:blue", s=12, label="alert")
        axes.set_yscale("log")
        axes.set_ylabel("p99 latency (ms)")
        axes.set_title(panel["service"], loc="left")
        axes.grid(alpha=0.3, which="both")
    axes_list[0].legend(loc="upper left", fontsize=8, ncol=3)
    figure.autofmt_xdate()
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
