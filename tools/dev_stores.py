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

from latency_forecast import alerting, config, data, evaluation, forecaster, metrics, store
from latency_forecast.config import AlertConfig, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.errors import UserError, cli_entrypoint

CONFIGS = (DataConfig, ModelConfig, TrainingConfig, AlertConfig)


def build_parser() -> config.ArgumentParser:
    parser = config.build_parser(prog="python -m tools.dev_stores", description=__doc__, parents=[config.parent_parser(*CONFIGS)])
    parser.add_argument("--dev-stores", required=True, help="comma-separated paths of two or more development stores")
    return parser


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def judge(judged: evaluation.Evaluation, persistence_threshold: float, horizon: int) -> str:
    """One line: the model against persistence on the same samples."""
    view = evaluation.alerting_report(judged, horizon, {"persistence": persistence_threshold})
    model, matched = view["model"], view["persistence"]
    per_day = "false_alarm_episodes_per_service_day"
    return (
        f"MAE ratio {judged.model_metrics['mae'] / judged.persistence_metrics['mae']:.3f}  "
        f"FPR {_number(judged.model_metrics['false_positive_rate'], '{:.2%}')}  "
        f"ROC-AUC {_number(model['roc_auc'], '{:.4f}')} vs {_number(matched['roc_auc'], '{:.4f}')}  "
        f"anticipated {model['anticipated_episodes']} vs {matched['anticipated_episodes']} of {model['episodes']}  "
        f"false alarms/service-day {_number(model[per_day], '{:.2f}')} vs {_number(matched[per_day], '{:.2f}')}"
    )


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_config, model_config, training_config, alert_config = config.from_args(args, *CONFIGS)
    stores = [path for path in args.dev_stores.split(",") if path]
    if len(stores) < 2:
        raise UserError("--dev-stores needs two or more stores (e.g. python -m latency_forecast.synthetic --seed 1 and --seed 2)")
    print("model vs persistence at the same validation-chosen FPR, on the same samples")
    for fit_store, other_store in itertools.permutations(stores, 2):
        table = store.load_feature_store(fit_store, data_config.feature_columns)
        splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
        trained, prepared, _ = forecaster.fit_forecaster(
            table, splits.train, splits.validation, data_config, model_config, training_config,
            progress=False, log=lambda message: None, latency_thresholds=alerting.read_latency_thresholds(data_config),
        )
        validation, trained.alert = evaluation.calibrated_evaluation(
            trained, prepared, prepared.samples(splits.validation, "validation"), alert_config
        )
        persistence_threshold = metrics.calibrate_threshold(validation.persistence_score, validation.breach, alert_config.target_fpr or 0.01)
        unseen = trained.prepare(store.load_feature_store(other_store, trained.feature_columns))
        print(f"fit {fit_store}: validation  {judge(validation, persistence_threshold, data_config.horizon)}")
        print(f"    judged on all of {other_store}: {judge(evaluation.evaluate(trained, unseen, unseen.ends), persistence_threshold, data_config.horizon)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
