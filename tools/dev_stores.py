r"""Judge a model configuration on development stores, never on the demo store's test split.

For each ordered pair of stores (A, B): fit on A's training split (early stopping on A's
validation split), calibrate the alert to --target-fpr on A's validation split, then report on
A's validation split and on all of B (a chaos run the model never saw), beside persistence on
the same samples: MAE ratio, ROC-AUC, episodes anticipated by the model and by persistence with
its threshold chosen on A's validation split for the same FPR, false-alarm episodes per
service-day. Change one setting at a time and keep it only if it wins on every line.

Example:
    python -m latency_forecast.synthetic --output dev_store_1 --seed 1
    python -m latency_forecast.synthetic --output dev_store_2 --seed 2
    python -m tools.dev_stores --dev-stores dev_store_1,dev_store_2 --hidden-size 32
"""

from __future__ import annotations

import itertools
import sys
from typing import Sequence

from latency_forecast import config, data, metrics, pipeline
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.errors import UserError, cli_entrypoint


def build_parser() -> config.ArgumentParser:
    parser = config.build_parser(
        prog="python -m tools.dev_stores",
        description=__doc__,
        parents=[config.parent_parser(DataConfig, ModelConfig, TrainingConfig, AlertConfig)],
    )
    parser.add_argument("--dev-stores", required=True, help="comma-separated paths of two or more development stores")
    return parser


def judge(evaluation: pipeline.Evaluation, persistence_threshold: float, horizon: int) -> str:
    """One line: the model against persistence on the same samples."""
    model, baseline = evaluation.model_metrics, evaluation.persistence_metrics
    codes, minutes, breach = evaluation.service_codes, evaluation.target_minutes, evaluation.breach
    episodes = metrics.episode_metrics(codes, minutes, breach, evaluation.alert, horizon)
    matched = metrics.episode_metrics(codes, minutes, breach, evaluation.persistence_score >= persistence_threshold, horizon)
    auc = metrics.ranking_metrics(evaluation.score, breach)["roc_auc"]
    persistence_auc = metrics.ranking_metrics(evaluation.persistence_score, breach)["roc_auc"]
    per_day = "false_alarm_episodes_per_service_day"

    def number(value, fmt):
        return "n/a" if value is None else fmt.format(value)

    return (
        f"MAE ratio {model['mae'] / baseline['mae']:.3f}  FPR {number(model['false_positive_rate'], '{:.2%}')}  "
        f"ROC-AUC {number(auc, '{:.4f}')} vs {number(persistence_auc, '{:.4f}')}  "
        f"anticipated {episodes['anticipated_episodes']} vs {matched['anticipated_episodes']} of {episodes['episodes']}  "
        f"false alarms/service-day {number(episodes[per_day], '{:.2f}')} vs {number(matched[per_day], '{:.2f}')}"
    )


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_config = config.from_args(DataConfig, args)
    model_config = config.from_args(ModelConfig, args)
    training_config = config.from_args(TrainingConfig, args)
    alert_config = config.from_args(AlertConfig, args)
    stores = [path for path in args.dev_stores.split(",") if path]
    if len(stores) < 2:
        raise UserError("--dev-stores needs two or more stores (e.g. python -m latency_forecast.synthetic --seed 1 and --seed 2)")
    L, H = data_config.sequence_length, data_config.horizon
    print("model vs persistence at the same validation-chosen FPR, on the same samples")
    for fit_store, other_store in itertools.permutations(stores, 2):
        table = data.load_feature_store(fit_store, data_config.feature_columns)
        splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
        forecaster, prepared, _ = pipeline.fit_forecaster(
            table, splits.train, splits.validation, data_config, model_config, training_config,
            progress=False, log=lambda message: None, latency_thresholds=config.latency_thresholds(data_config),
        )
        validation_ends = data.samples_in(prepared.ends, table, splits.validation, L, H)
        validation, _ = pipeline.calibrated_evaluation(forecaster, prepared, validation_ends, alert_config)
        persistence_threshold = metrics.calibrate_threshold(validation.persistence_score, validation.breach, alert_config.target_fpr or 0.01)
        other = data.load_feature_store(other_store, forecaster.feature_columns)
        unseen = pipeline.prepare(other, forecaster)
        print(f"fit {fit_store}: validation  {judge(validation, persistence_threshold, H)}")
        print(f"    judged on all of {other_store}: {judge(pipeline.evaluate(forecaster, unseen, unseen.ends), persistence_threshold, H)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
