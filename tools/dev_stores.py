r"""Judge a model configuration on development stores, never on the demo store's test split.

Synthetic stores (--dev-stores, two or more chaos runs of one fleet): for each ordered pair
(A, B), fit on A's training split (early stopping on A's validation split), fit the baselines
there, calibrate every alert to --target-fpr on A's validation split, then report on A's
validation split and on all of B (a chaos run the model never saw).
Real stores (--real-stores, each its own fleet): fit and calibrate the same way, then report on
its validation and test splits.

Each line: the model's test MAE skill over persistence and gradient boosting (1 - MAE ratio,
same samples), episodes anticipated by the model, persistence and gradient boosting with each
one's threshold chosen on validation for the same FPR (and the test FPR each reached), false
alarms per service-day, the episodes each baseline and each other model forecast anticipates at
exactly the model's FPR on the judged samples (thresholds set there: a comparison, never an
operating point), and the coverage of each model quantile. Change one setting at a time
and keep it only if it wins everywhere.

Example:
    python -m latency_forecast.synthetic --output dev_store_1 --seed 1
    python -m latency_forecast.synthetic --output dev_store_2 --seed 2
    python -m tools.dev_stores --dev-stores dev_store_1,dev_store_2 --real-stores path/to/nezha_train_ticket
"""

from __future__ import annotations

import itertools
import sys
from typing import Sequence

from latency_forecast import alerting, data, evaluation, fitting, flags, store
from latency_forecast.config import AlertConfig, BaselineConfig, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.errors import UserError, cli_entrypoint

CONFIGS = (DataConfig, ModelConfig, TrainingConfig, AlertConfig, BaselineConfig)


def build_parser() -> flags.ArgumentParser:
    parser = flags.build_parser(prog="python -m tools.dev_stores", description=__doc__, parents=[flags.parent_parser(*CONFIGS)])
    parser.add_argument("--dev-stores", default="", help="comma-separated synthetic development stores (two or more), fit on each, judged on the others")
    parser.add_argument("--real-stores", default="", help="comma-separated real stores, each judged on its own validation and test splits")
    return parser


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def judge(judged: evaluation.Evaluation, compared: dict[str, tuple[str, float]], horizon: int, rule: alerting.AlertRule) -> str:
    """One line: the model against its baselines on the same samples, alerts at the same FPR
    (thresholds chosen on validation), then every alert at exactly the model's FPR here."""
    view = evaluation.alerting_report(judged, horizon, compared)
    model_mae, per_day = judged.model_metrics["mae"], "false_alarm_episodes_per_service_day"
    skills = "  ".join(
        f"skill/{name} {1 - model_mae / block['mae']:+.3f}" for name, block in judged.baseline_metrics.items() if block["mae"]
    )

    def alerts(block: dict, fpr: float | None) -> str:
        return f"{block['anticipated_episodes']}/{block['episodes']} ({_number(fpr, '{:.2%}')}, {_number(block[per_day], '{:.2f}')}/day)"

    line = [f"MAE {model_mae:.1f}  {skills}", f"model {alerts(view['model'], judged.model_metrics['false_positive_rate'])}"]
    for label, block in view.items():
        if label.endswith("_at_target_fpr"):
            line.append(f"{label[: -len('_at_target_fpr')]} {alerts(block, block['false_positive_rate'])}")
    matched = evaluation.alerting_report(judged, horizon, evaluation.matched_on_test(judged, rule))
    line.append("at the model's FPR here: " + " ".join(
        f"{label} {block['anticipated_episodes']}/{block['episodes']}" for label, block in matched.items()
    ))
    coverage = evaluation.quantile_report(judged)
    if coverage:
        line.append("coverage " + " ".join(f"{name}:{_number(block['coverage'], '{:.3f}')}" for name, block in coverage.items()))
        if "0.5" in coverage:  # the median's MAE (twice its pinball loss): the forecast that minimises MAE in ms
            pinball = coverage["0.5"]["pinball_loss_ms"]
            line.append(f"median MAE {_number(None if pinball is None else 2 * pinball, '{:.2f}')} (point {model_mae:.2f})")
    return "  ".join(line)


def fit(path: str, settings: fitting.Settings) -> tuple[fitting.Trained, data.Splits, dict]:
    """The training step on the store's training split (calibrated on its validation split), and
    the alerts compared with the model's, chosen there."""
    table = store.load_feature_store(path, settings.data.feature_columns)
    splits = data.fraction_splits(table, settings.data.validation_fraction, settings.data.test_fraction, settings.data.embargo)
    run = fitting.train(table, splits.train, splits.validation, settings, progress=False, log=lambda message: None)
    compared = evaluation.comparisons(run.validation, run.forecaster.alert, settings.alert, settings.data.horizon)
    return run, splits, compared


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_config, model_config, training_config, alert_config, baseline_config = flags.from_args(args, *CONFIGS)
    settings = fitting.Settings(
        data_config, model_config, training_config, alert_config, baseline_config, latency_thresholds=alerting.read_latency_thresholds(data_config)
    )
    horizon = data_config.horizon
    synthetic = [path for path in args.dev_stores.split(",") if path]
    real = [path for path in args.real_stores.split(",") if path]
    if len(synthetic) == 1 or not (synthetic or real):
        raise UserError("pass two or more --dev-stores (python -m latency_forecast.synthetic --seed 1, --seed 2) and/or --real-stores")
    print("model vs baselines on the same samples; alerts: episodes anticipated (test FPR, false alarms per service-day), thresholds chosen on validation")
    for path in real:
        run, splits, compared = fit(path, settings)
        trained = run.forecaster
        print(f"real {path}: validation  {judge(run.validation, compared, horizon, trained.alert)}")
        test = evaluation.evaluate(trained, run.prepared, run.prepared.samples(splits.test, "test"))
        print(f"    test  {judge(test, compared, horizon, trained.alert)}", flush=True)
    for fit_store, other_store in itertools.permutations(synthetic, 2):
        run, _, compared = fit(fit_store, settings)
        trained = run.forecaster
        unseen = trained.prepare(store.load_feature_store(other_store, trained.feature_columns))
        print(f"fit {fit_store}: validation  {judge(run.validation, compared, horizon, trained.alert)}")
        other = evaluation.evaluate(trained, unseen, unseen.ends)
        print(f"    judged on all of {other_store}: {judge(other, compared, horizon, trained.alert)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
