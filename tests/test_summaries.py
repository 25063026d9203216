"""summaries.py: train.py's closing summary says what was shipped, beside the baselines, from metrics.json alone."""

import json

from latency_forecast import summaries


def test_the_training_summary_reads_the_report(trained_dir):
    report = json.loads(open(f"{trained_dir}/metrics.json").read())
    text = summaries.training_summary(report, trained_dir, 12.4)
    lines = text.splitlines()
    assert lines[0] == "" and lines[1].startswith("artifacts written to ") and lines[1].endswith(" in 12s")
    weights = report["ensemble"]["weights"]
    shipped = next(line for line in lines if line.startswith("model: the shipped forecast"))
    assert all(f"{name} {weight:.2f}" in shipped for name, weight in weights.items())
    assert f"the recurrent networks alone: test MAE {report['members']['recurrent']['test']['mae']:.1f} ms" in shipped
    mae = next(line for line in lines if line.startswith("MAE (ms)")).split()[2:]
    assert mae == [f"{report['test']['mae']:.1f}", *(f"{block['test']['mae']:.1f}" for block in report["baseline"].values())]
    test = report["test"]
    assert f"confusion (TP/FP/TN/FN): {test['true_positives']}/{test['false_positives']}/{test['true_negatives']}/{test['false_negatives']}" in lines
    skill = 1 - test["mae"] / report["baseline"]["persistence"]["test"]["mae"]
    assert f"{skill:+.3f} over persistence" in lines[-1]
