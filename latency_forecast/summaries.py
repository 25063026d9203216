"""The text summaries the doors print at the end of a run, built from the reports they wrote."""

from __future__ import annotations

import os


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def training_summary(report: dict, output_dir: str, seconds: float) -> str:
    """What train.py prints when it is done: the test metrics beside the baselines', the alerting view."""
    lines: list[str] = []
    line = lines.append
    test, baselines = report["test"], {name: blocks["test"] for name, blocks in report["baseline"].items()}
    alerting, point = report["alerting"]["test"], report["alerting"]["operating_point"]
    names = list(baselines)
    line(f"\nartifacts written to {os.path.abspath(output_dir)}/ in {seconds:.0f}s")
    line(f"test period: {report['data']['splits']['test']['start']} to {report['data']['splits']['test']['end']}, {test['n_samples']:,} samples")
    if point["target_fpr"]:
        on = point["score"] + (f" {point['quantile']}" if point["quantile"] else "")
        line(
            f"alert threshold calibrated on validation for FPR <= {point['target_fpr']:.1%}: score >= {point['threshold']:.3g} "
            f"({on}); validation FPR {_rate(point['validation_false_positive_rate'])}, test FPR {_rate(point['test_false_positive_rate'])}"
        )

    def row(label: str, model: str, others: list[str]) -> None:
        line(f"{label:30}{model:>12}" + "".join(f"{other:>20}" for other in others))

    weights = report["ensemble"]["weights"]
    line(
        "model: the shipped forecast, a weighted mean of its members (weights chosen on validation: "
        + ", ".join(f"{name} {weight:.2f}" for name, weight in weights.items())
        + f"); the recurrent networks alone: test MAE {_number(report['members']['recurrent']['test']['mae'])} ms"
    )
    row("", "model", names)
    for label, key in (("MAE (ms)", "mae"), ("RMSE (ms)", "rmse")):
        row(label, _number(test[key]), [_number(baselines[name][key]) for name in names])
    row("breach TPR / FPR", f"{_rate(test['true_positive_rate'])} / {_rate(test['false_positive_rate'])}",
        [f"{_rate(baselines[name]['true_positive_rate'])} / {_rate(baselines[name]['false_positive_rate'])}" for name in names])
    row("ROC-AUC", _number(alerting["model"]["roc_auc"], "{:.3f}"), [_number(alerting[name]["roc_auc"], "{:.3f}") for name in names])
    model = alerting["model"]
    matched = [alerting.get(f"{name}_at_target_fpr") for name in names]
    if any(matched):
        line("at the target FPR, each threshold chosen on validation (test FPR, episodes anticipated, false alarms per service-day):")
        per_day = "false_alarm_episodes_per_service_day"

        def cell(view: dict | None) -> str:
            if view is None:
                return "n/a"
            return f"{_rate(view['false_positive_rate'])} {view['anticipated_episodes']}/{view['episodes']} {_number(view[per_day], '{:.2f}')}"

        row("  alerts", f"{_rate(test['false_positive_rate'])} {model['anticipated_episodes']}/{model['episodes']} {_number(model[per_day], '{:.2f}')}",
            [cell(view) for view in matched])
        for label, view in alerting.items():
            if label.startswith("model_") and label.endswith("_at_target_fpr"):
                line(f"  model alerting on its {view['source'].replace('_', ' ')} instead: {cell(view)}")
    matched = report["alerting"]["test_at_model_test_fpr"]
    if len(matched) > 1:
        line(
            f"at the model's test FPR ({_rate(test['false_positive_rate'])}; baselines' thresholds set on test itself, to compare): "
            + ", ".join(f"{label} {view['anticipated_episodes']}/{view['episodes']}" for label, view in matched.items())
        )
    paged = alerting["persistence_at_model_false_alarms"]
    line(f"persistence at the model's paging load: {paged['anticipated_episodes']}/{paged['episodes']} episodes anticipated")
    coverage = report["quantiles"]["test"]
    if coverage:
        line("quantile coverage on test: " + ", ".join(f"{name}: {_rate(block['coverage'])}" for name, block in coverage.items()))
    line(f"confusion (TP/FP/TN/FN): {test['true_positives']}/{test['false_positives']}/{test['true_negatives']}/{test['false_negatives']}")
    skills = [f"{1 - test['mae'] / baselines[name]['mae']:+.3f} over {name}" for name in names if test["mae"] is not None and baselines[name]["mae"]]
    if skills:
        line("model MAE skill (1 - MAE / baseline's, same samples): " + ", ".join(skills))
    return "\n".join(lines)
