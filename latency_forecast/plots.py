"""Matplotlib figures. Built on ``matplotlib.figure.Figure`` directly: no pyplot, no global state."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
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
        for (name, values), color in zip(panel.get("baselines", {}).items(), BASELINE_COLOURS[1:]):
            if name != "persistence":
                axes.plot(times, values, color=color, linewidth=0.8, alpha=0.8, linestyle="-.", label=f"{name.replace('_', ' ')} baseline")
        quantiles = panel.get("quantiles", {})
        if len(quantiles) >= 2:
            low, high = min(quantiles, key=float), max(quantiles, key=float)
            axes.fill_between(times, quantiles[low], quantiles[high], color="tab:blue", alpha=0.15, linewidth=0, label=f"forecast {low}-{high} quantiles")
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
    for key in ("baselines", "quantiles"):
        result[key] = {name: np.insert(np.asarray(values, dtype=np.float64), gaps, np.nan) for name, values in panel.get(key, {}).items()}
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
    markers = "o^sDvP*Xph<>"  # one per operating point: zip() would drop the points beyond the markers
    for (label, (fpr, tpr)), marker in zip(points.items(), markers * (len(points) // len(markers) + 1)):
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


# the model first, then persistence and gradient boosting, in every figure
BASELINE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def backtest_folds(folds: Sequence[dict]) -> Figure:
    """Per fold (backtest.json entries): MAE, breach TPR and FPR of the model and of each baseline."""
    figure = Figure(figsize=(max(7, 1.4 * len(folds) + 3), 8))
    mae_axes, tpr_axes, fpr_axes = figure.subplots(3, 1, sharex=True)
    x = np.arange(len(folds))
    labels = [f"fold {fold['fold']}\n{fold['val_start'][:10]}\n{fold['val_end'][:10]}" for fold in folds]

    def values(blocks: list[dict], key: str) -> np.ndarray:
        return np.array([np.nan if block[key] is None else block[key] for block in blocks], dtype=float)

    series = [("model", [fold["metrics"] for fold in folds])]
    series += [(name, [fold["baseline"][name] for fold in folds]) for name in folds[0]["baseline"]]
    width = 0.8 / len(series)
    for i, ((name, blocks), color) in enumerate(zip(series, BASELINE_COLOURS)):
        mae_axes.bar(x + (i - (len(series) - 1) / 2) * width, values(blocks, "mae"), width, color=color, label=name)
        tpr_axes.plot(x, values(blocks, "true_positive_rate"), marker="o", color=color, label=name)
        fpr_axes.plot(x, values(blocks, "false_positive_rate"), marker="s", color=color, label=name)
    mae_axes.set_ylabel("MAE (ms)")
    mae_axes.set_title("Walk-forward backtest: each fold judged on the window after its training")
    highest = np.nanmax(np.concatenate([values(blocks, "mae") for _, blocks in series] + [[1.0]]))
    mae_axes.set_ylim(0, 1.3 * highest)  # room for the legend above the bars
    mae_axes.legend(loc="upper center", ncol=len(series))
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
    axes.set_ylabel("Shapley value of the explained forecast (ms)")
    axes.set_title("Why each predicted breach was predicted (hatched: the injected root cause)")
    handles = [Patch(color=colours[name], label=name) for name in feature_columns]
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(alpha=0.3, axis="y")
    return figure

