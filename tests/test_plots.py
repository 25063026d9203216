"""plots.py: every figure drawn from hand-made inputs, saved as a real PNG (decoded, a plausible size,
not blank), with what each figure must show checked on its axes."""

import numpy as np
import pytest

from latency_forecast import plots
from tests.helpers import assert_png


def _save(figure, tmp_path, name="figure.png"):
    path = tmp_path / name
    figure.savefig(path, dpi=110, bbox_inches="tight")  # as artifacts.Stage.save_figure does
    return assert_png(path)


HISTORY = [
    {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "seconds": 1.0},
    {"epoch": 2, "train_loss": 0.6, "val_loss": 0.5, "seconds": 1.0},
    {"epoch": 3, "train_loss": 0.4, "val_loss": 0.55, "seconds": 1.0},
]


def test_loss_curve_marks_the_kept_epoch(tmp_path):
    figure = plots.loss_curve(HISTORY)
    axes = figure.axes[0]
    train, validation = axes.lines[:2]
    assert train.get_ydata().tolist() == [0.9, 0.6, 0.4] and validation.get_ydata().tolist() == [0.8, 0.5, 0.55]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["train", "validation", "kept: epoch 2"]
    pixels = _save(figure, tmp_path)
    assert pixels.shape[1] > pixels.shape[0], "a landscape figure (7 x 4 in)"


def _panel(service="api", minutes=(0, 1, 2, 5, 6), threshold=500.0):
    n = len(minutes)
    actual = np.array([100.0, 200.0, 600.0, 700.0, 300.0])[:n]
    return {
        "service": service,
        "minutes": np.array(minutes, dtype="datetime64[m]"),
        "actual": actual,
        "forecast": actual * 0.9,
        "persistence": np.roll(actual, 1),
        "quantiles": {"0.5": actual * 0.9, "0.9": actual * 1.3},
        "baselines": {"persistence": np.roll(actual, 1), "gradient_boosting": actual * 1.1},
        "latency_threshold": threshold,
        "alert": np.array([False, True, True, False, False])[:n],
    }


def test_gaps_break_the_lines_by_hand():
    broken = plots._break_at_gaps(_panel())
    # minutes 0, 1, 2, (3: NaN), 5, 6
    assert broken["minutes"].astype(int).tolist() == [0, 1, 2, 3, 5, 6]
    np.testing.assert_array_equal(broken["actual"], [100.0, 200.0, 600.0, np.nan, 700.0, 300.0])
    assert broken["alert"].tolist() == [False, True, True, False, False, False]
    assert plots._break_at_gaps(_panel(minutes=(4,)))["minutes"].astype(int).tolist() == [4]


def test_forecast_vs_actual_has_one_log_panel_per_service(tmp_path):
    figure = plots.forecast_vs_actual([_panel("api"), _panel("cache", threshold=50.0)], horizon=5)
    assert [axes.get_title(loc="left") for axes in figure.axes] == ["api", "cache"]
    assert all(axes.get_yscale() == "log" for axes in figure.axes)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "forecast (made 5 min earlier)" in labels and "threshold 500 ms" in labels and "persistence baseline" in labels
    assert "gradient boosting baseline" in labels
    pixels = _save(figure, tmp_path)
    assert pixels.shape[0] > 400, "two panels stacked"


def test_alert_tradeoff_on_a_log_fpr_axis(tmp_path):
    curves = {"model": (np.array([0.0, 0.001, 0.01, 1.0]), np.array([0.0, 0.4, 0.7, 1.0]))}
    figure = plots.alert_tradeoff(curves, {"model (chosen)": (0.008, 0.65)}, target_fpr=0.02)
    axes = figure.axes[0]
    assert axes.get_xscale() == "log" and axes.get_xlim() == pytest.approx((1e-5, 1.0))
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "model (chosen): FPR 0.80%, TPR 65.0%" in labels and "target FPR 0.02" in labels
    # the FPR-0 point cannot be drawn on a log axis: it is left out of the curve
    assert axes.lines[0].get_xdata().tolist() == [0.001, 0.01, 1.0]
    _save(figure, tmp_path)


def _fold(number, model_mae, persistence_mae):
    block = {"mae": model_mae, "true_positive_rate": 0.5, "false_positive_rate": 0.01}
    return {
        "fold": number, "val_start": "2024-05-0%dT00:00:00Z" % number, "val_end": "2024-05-0%dT00:00:00Z" % (number + 1),
        "metrics": block, "baseline": {"persistence": {**block, "mae": persistence_mae, "true_positive_rate": None}},
    }


def test_backtest_folds_draws_each_folds_mae(tmp_path):
    figure = plots.backtest_folds([_fold(1, 10.0, 12.0), _fold(2, 8.0, 9.5)])
    mae_axes = figure.axes[0]
    heights = sorted(round(patch.get_height(), 6) for patch in mae_axes.patches)
    assert heights == [8.0, 9.5, 10.0, 12.0]
    assert mae_axes.get_ylim()[1] == pytest.approx(1.3 * 12.0)
    _save(figure, tmp_path)


def test_feature_importance_bars_are_the_shares(tmp_path):
    report = {
        "n_windows": 24,
        "normalized": {"cpu": 0.6, "queue": 0.3, "fan_out": 0.1},
        "predicted_breach": {"n_windows": 3, "normalized": {"cpu": 0.2, "queue": 0.7, "fan_out": 0.1}},
    }
    figure = plots.feature_importance(report)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["fan_out", "queue", "cpu"], "smallest share at the bottom"
    widths = [round(patch.get_width(), 6) for patch in axes.patches]
    assert widths == [0.1, 0.3, 0.6, 0.1, 0.7, 0.2]
    _save(figure, tmp_path)


def test_causality_events_stack_the_scores_and_say_when_there_is_none(tmp_path):
    events = [
        {"label": "api\n05-01 10:00", "scores": {"cpu": 300.0, "queue": -50.0}, "cause": "cpu", "fault": "cpu"},
        {"label": "db\n05-01 11:00", "scores": {"cpu": 10.0, "queue": 120.0}, "cause": None, "fault": None},
    ]
    figure = plots.causality_events(events, ["cpu", "queue"])
    axes = figure.axes[0]
    assert len(axes.patches) == 4 and sorted(round(p.get_height(), 6) for p in axes.patches) == [-50.0, 10.0, 120.0, 300.0]
    hatched = [patch for patch in axes.patches if patch.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_height() == 300.0, "the injected root cause is outlined"
    assert [label.get_text() for label in axes.get_xticklabels()] == ["api\n05-01 10:00", "db\n05-01 11:00"]
    _save(figure, tmp_path, "events.png")
    empty = plots.causality_events([], ["cpu"])
    assert [text.get_text() for text in empty.axes[0].texts] == ["no true-positive event to explain in this range"]
    _save(empty, tmp_path, "empty.png")


def test_alert_tradeoff_marks_every_operating_point():
    # model, persistence and gradient boosting at their thresholds, at the target FPR, at the paging load...
    points = {f"alert {i}": (0.001 * (i + 1), 0.5 + 0.05 * i) for i in range(7)}
    figure = plots.alert_tradeoff({"model": (np.array([0.0, 0.01, 1.0]), np.array([0.0, 0.5, 1.0]))}, points, 0.01)
    assert len(figure.axes[0].collections) == len(points)
