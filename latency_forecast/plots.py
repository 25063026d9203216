"""Matplotlib figures. Built on ``matplotlib.figure.Figure`` directly: no pyplot, no global state."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch


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


def feature_importance(report: dict) -> Figure:
    """Share of the mean absolute Shapley value per feature: all windows and predicted breaches."""
    features = sorted(report["normalized"], key=lambda name: report["normalized"][name])
    figure = Figure(figsize=(8, 0.45 * len(features) + 1.6))
    axes = figure.subplots()
    position = np.arange(len(features))
    axes.barh(position + 0.2, [report["normalized"][f] for f in features], height=0.4, label=f"all windows ({report['n_windows']} explained)")
    breach = report["predicted_breach"]
    if breach["n_windows"]:
        axes.barh(position - 0.2, [breach["normalized"][f] for f in features], height=0.4, color="tab:red", label=f"predicted breaches ({breach['n_windows']})")
    axes.set_yticks(position, features)
    axes.set_xlabel("share of mean |Shapley value| of the forecast (ms)")
    axes.set_title("Feature importance on validation windows")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3, axis="x")
    return figure


def causality_events(events: Sequence[dict], feature_columns: Sequence[str]) -> Figure:
    """One stacked bar per explained event: each feature's Shapley value (ms) stacked up (pushes
    towards the spike) or down; the injected root cause, when known, outlined and named."""
    figure = Figure(figsize=(max(6.0, 1.1 * len(events) + 3.0), 5))
    axes = figure.subplots()
    if not events:
        axes.text(0.5, 0.5, "no true-positive event to explain in this range", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    palette = colormaps["tab10" if len(feature_columns) <= 10 else "tab20"]
    colours = {name: palette(i % palette.N) for i, name in enumerate(feature_columns)}
    highest = lowest = 0.0
    for x, event in enumerate(events):
        up = down = 0.0
        for name in feature_columns:
            value = event["scores"][name]
            bottom = up if value >= 0 else down
            cause = name == event["cause"]
            axes.bar(
                x, value, bottom=bottom, width=0.7, color=colours[name],
                edgecolor="black" if cause else "none", linewidth=2.0 if cause else 0.0, hatch="//" if cause else None,
            )
            if value >= 0:
                up += value
            else:
                down += value
        highest, lowest = max(highest, up), min(lowest, down)
        if event["cause"]:
            axes.annotate(f"{event['fault']}\n({event['cause']})", (x, up), ha="center", va="bottom", fontsize=6.5)
    axes.axhline(0, color="black", linewidth=0.8)
    span = max(highest - lowest, 1e-9)
    axes.set_ylim(lowest - 0.05 * span, highest + 0.18 * span)  # room for the fault labels above the bars
    axes.set_xticks(range(len(events)), [event["label"] for event in events], fontsize=7)
    axes.set_ylabel("Shapley value of the forecast (ms)")
    axes.set_title("Why each predicted breach was predicted (hatched: the injected root cause)")
    handles = [Patch(color=colours[name], label=name) for name in feature_columns]
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(alpha=0.3, axis="y")
    return figure

