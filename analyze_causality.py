r"""Explain predicted latency breaches: which feature drove each true-positive alert, scored
against the injected root causes of a chaos run when a manifest is given.

Example:
    python analyze_causality.py --model-checkpoint artifacts/latency_forecaster.pt \
        --scaler-path artifacts/scaler.pt --feature-store-path feature_store \
        --start-ts 2024-05-01 --end-ts 2024-05-02 --max-samples 10 \
        --output artifacts/causality_report.json --chaos-manifest feature_store/chaos_manifest.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import pandas as pd

from latency_forecast import artifacts, causality, config, data, explain, pipeline, plots, training
from latency_forecast.config import CausalityConfig, ExplainConfig, StoreConfig
from latency_forecast.errors import UserError, cli_entrypoint


def build_parser() -> config.ArgumentParser:
    return config.build_parser(
        prog="analyze_causality.py",
        description=__doc__,
        parents=[config.parent_parser(CausalityConfig, StoreConfig, ExplainConfig)],
    )


def _load_background(checkpoint: dict, forecaster: pipeline.Forecaster, path: str) -> explain.Background:
    state = checkpoint.get("explain_background")
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} carries no explanation background (it predates explanations); retrain it with train.py")
    background = explain.Background.from_state(state)
    expected = (forecaster.data_config.sequence_length, len(forecaster.feature_columns))
    if background.windows.shape[1:] != expected:
        raise UserError(f"checkpoint {path}: its explanation background does not match its model; retrain it with train.py")
    return background


def _read_manifest(path: str) -> list[causality.Fault]:
    try:
        with open(path) as stream:
            entries = json.load(stream)
    except FileNotFoundError as error:
        raise UserError(f"chaos manifest {path} does not exist; pass the chaos_manifest.json of the chaos run") from error
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read chaos manifest {path} ({type(error).__name__}); it must be a JSON list of faults") from error
    return causality.parse_manifest(entries, path)


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = config.from_args(CausalityConfig, args)
    store = config.from_args(StoreConfig, args)
    explain_config = config.from_args(ExplainConfig, args)
    started = time.perf_counter()

    start = data.parse_timestamp(store.start_ts, "--start-ts")
    end = data.parse_timestamp(store.end_ts, "--end-ts")
    if start is not None and end is not None and start >= end:
        raise UserError(f"--start-ts {store.start_ts} is not before --end-ts {store.end_ts}; swap or widen the range")
    checkpoint = artifacts.load_checkpoint(settings.model_checkpoint)
    scaler_state = artifacts.load_scaler_state(settings.scaler_path)
    forecaster = pipeline.Forecaster.from_checkpoint(checkpoint, scaler_state, training.resolve_device("auto"))
    background = _load_background(checkpoint, forecaster, settings.model_checkpoint)
    faults = _read_manifest(settings.chaos_manifest) if settings.chaos_manifest else None

    data_config = forecaster.data_config
    history = pd.Timedelta(minutes=data_config.sequence_length - 1 + data_config.horizon)
    try:  # only the range, plus the history its first forecasts need
        table = data.load_feature_store(
            store.feature_store_path, forecaster.feature_columns, None if start is None else start - history, end
        )
    except data.ColumnError as error:
        raise UserError(
            f"the store does not hold the model's features ({error}); analyse the kind of store the model was trained on"
        ) from error
    time_range = data.TimeRange(
        data.to_minute(start) if start is not None else int(table.minutes.min()),
        data.to_minute(end) if end is not None else int(table.minutes.max()) + 1,
    )
    prepared = pipeline.prepare(table, forecaster, inplace=True)
    if prepared.unknown_services:
        pipeline.warn(f"not forecast (unknown to the model): {', '.join(prepared.unknown_services)}")
    seed = int(forecaster.settings.get("training", {}).get("seed", 0))
    analysis = causality.analyze(forecaster, prepared, time_range, background, faults, settings, explain_config, seed)
    report = analysis.report
    report["model"]["checkpoint"] = os.path.abspath(settings.model_checkpoint)

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
        reasons: dict[str, int] = {}
        for fault in validation["unscorable"]:
            reasons[fault["reason"]] = reasons.get(fault["reason"], 0) + 1
        for reason, count in reasons.items():
            print(f"  unscorable ({count}): {reason}")
    print(f"report written to {os.path.abspath(output)} in {seconds:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
