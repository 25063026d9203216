r"""Explain predicted latency breaches: which feature drove each true-positive alert, scored
against the injected root causes of a chaos run when a manifest is given (root-cause feature and
service, beside a rule-based baseline; a call_graph.json beside the store informs the service ranking).

Example:
    python analyze_causality.py --model-checkpoint artifacts/latency_forecaster.pt \
        --scaler-path artifacts/scaler.pt --feature-store-path feature_store \
        --start-ts 2024-05-01 --end-ts 2024-05-02 --max-samples 10 \
        --output artifacts/causality_report.json --chaos-manifest feature_store/chaos_manifest.json
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import pandas as pd

from latency_forecast import artifacts, causality, data, flags, plots, store, training
from latency_forecast.config import ExplainConfig, StoreConfig, TimeRangeConfig
from latency_forecast.errors import cli_entrypoint, warn
from latency_forecast.forecaster import Forecaster
from latency_forecast.script_config import CausalityConfig, CheckpointConfig

CONFIGS = (CheckpointConfig, CausalityConfig, StoreConfig, TimeRangeConfig, ExplainConfig)


def build_parser() -> flags.ArgumentParser:
    return flags.build_parser(prog="analyze_causality.py", description=__doc__, parents=[flags.parent_parser(*CONFIGS)])


def _read_manifest(path: str) -> list[causality.Fault]:
    entries = store.read_json(path, f"chaos manifest {path}", "pass the chaos_manifest.json of the chaos run", "a JSON list of faults")
    return causality.parse_manifest(entries, path)


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    checkpoint, settings, store_config, time_range, explain_config = flags.from_args(build_parser().parse_args(argv), *CONFIGS)
    started = time.perf_counter()

    start, end = store.time_bounds(time_range)
    forecaster = Forecaster.load(checkpoint.model_checkpoint, checkpoint.scaler_path, training.resolve_device("auto"))
    background = forecaster.require_background(checkpoint.model_checkpoint)
    faults = _read_manifest(settings.chaos_manifest) if settings.chaos_manifest else None

    history = pd.Timedelta(minutes=forecaster.data_config.window_minutes - 1)  # what the first window needs before start
    table = store.load_feature_store(
        store_config.feature_store_path, forecaster.feature_columns, None if start is None else start - history, end, for_model=True, warn_invalid=True
    )
    span = data.span(table)
    time_range = data.TimeRange(
        data.to_minute(start) if start is not None else span.start, data.to_minute(end) if end is not None else span.end
    )
    call_graph = store.read_call_graph(store_config.feature_store_path, settings.call_graph, table.services)
    prepared = forecaster.prepare(table, inplace=True)
    if prepared.unknown_services:
        warn(f"not forecast (unknown to the model): {', '.join(prepared.unknown_services)}")
    analysis = causality.analyze(
        forecaster, prepared, time_range, background, faults, settings, explain_config, forecaster.training_config.seed, call_graph
    )
    report = analysis.report
    report["model"]["checkpoint"] = os.path.abspath(checkpoint.model_checkpoint)

    output_dir = os.path.dirname(os.path.abspath(settings.output))
    name = os.path.basename(settings.output)
    with artifacts.staged(output_dir) as stage:
        stage.write_json(name, report)
        stage.save_figure(name[: -len(".json")] + ".png", plots.causality_events(analysis.figure_events, forecaster.feature_columns))
    _print_summary(report, settings.output, time.perf_counter() - started)
    return 0


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _print_summary(report: dict, output: str, seconds: float) -> None:
    window = report["window"]
    print(
        f"analysed {window['start']} to {window['end']}: {report['n_samples']:,} forecasts, "
        f"{report['n_true_positives']} true-positive minutes in {report['n_events']} events, {len(report['events'])} explained"
    )
    if "message" in report:
        print(report["message"])
    for event in report["events"]:
        fault = event["fault"]
        injected = f"  [injected {fault['fault']}: {fault['root_cause_feature']}]" if fault else ""
        top = event["top_feature"]
        print(
            f"  {event['timestamp']}  {event['service']:<14} predicted {event['predicted']:7.0f} ms, actual "
            f"{event['actual']:7.0f} ms (usual {event['base_value']:.0f} ms); top: {top} ({event['scores'][top]:+.0f} ms){injected}"
        )
    validation = report.get("validation")
    if validation:
        print(
            f"chaos validation, {validation['n_faults']} scorable faults: AC@1 {_share(validation['top1_accuracy'])} "
            f"(random {_share(validation['random_top1'])}), AC@3 {_share(validation['top3_accuracy'])} "
            f"(random {_share(validation['random_top3'])}), detection rate {_share(validation['detection_rate'])}; "
            f"detected only ({validation['detected']['n_faults']}): AC@1 {_share(validation['detected']['top1_accuracy'])}, "
            f"AC@3 {_share(validation['detected']['top3_accuracy'])}"
        )
        for fault_type, scores in validation["by_fault"].items():
            print(
                f"  {fault_type:<18} {scores['n_faults']:3d} scorable  AC@1 {_share(scores['top1_accuracy'])}  "
                f"AC@3 {_share(scores['top3_accuracy'])}  detected {_share(scores['detection_rate'])}"
                + (f"  ({scores['n_unscorable']} unscorable)" if scores["n_unscorable"] else "")
            )
        rule = validation["rule_baseline"]
        print(f"  rule-based baseline on the same forecasts: AC@1 {_share(rule['top1_accuracy'])}, AC@3 {_share(rule['top3_accuracy'])}")
        services = validation["service_level"]
        graph = f", call graph of {services['call_graph_edges']} edges" if services["call_graph_edges"] is not None else ", no call graph"
        print(
            f"root-cause service, {services['n_faults']} faults ({services['n_services']} services{graph}): "
            f"model AC@1 {_share(services['top1_accuracy'])}, AC@3 {_share(services['top3_accuracy'])}, Avg@5 {_share(services['avg5'])}; "
            f"rule-based baseline AC@1 {_share(services['rule_baseline']['top1_accuracy'])}, "
            f"AC@3 {_share(services['rule_baseline']['top3_accuracy'])}, Avg@5 {_share(services['rule_baseline']['avg5'])} "
            f"(random AC@1 {_share(services['random_top1'])})"
        )
        reasons: dict[str, int] = {}
        for fault in validation["unscorable"]:
            reasons[fault["reason"]] = reasons.get(fault["reason"], 0) + 1
        for reason, count in reasons.items():
            print(f"  unscorable ({count}): {reason}")
    print(f"report written to {os.path.abspath(output)} in {seconds:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
