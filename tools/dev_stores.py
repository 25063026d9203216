r"""Judge a setting on many splits, never on the demo store's test split: the protocol a default
has to pass before it changes.

The splits (each trained with the given settings at every --seeds seed):
- each real store (--real-stores) at three walk-forward origins: the store cut after 60%, 80% and
  100% of its minutes, each cut split into train, validation and test by the fractions;
- two chaos runs of the demo fleet (synthetic stores of seeds 1 and 2), fit on one and judged on
  all of the other, in both directions;
- generated stores of other regimes: a level shift (every service's latency halves or doubles for
  good after training), a two-day store, and a store with four times the faults.
The generated stores are written once into --workdir and reused.

Per split and seed it prints the shipped forecast's MAE skill (1 - MAE ratio, same samples) over
gradient boosting and persistence, the recurrent networks' own skill, the ensemble weights, the
0.9-quantile coverage and the worst service (shipped MAE over the better of persistence's and
gradient boosting's on it); then the median and the worst split. --save writes them as JSON; --compare reads such a file and gives
the verdict: a setting may replace the other only if the median skill improves and no split's
skill falls by more than 0.02.

Example:
    python -m tools.dev_stores --real-stores path/to/nezha_train_ticket --save before.json
    python -m tools.dev_stores --real-stores path/to/nezha_train_ticket --latency-history level --compare before.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Sequence

import numpy as np

from latency_forecast import alerting, data, evaluation, fitting, flags, store, synthetic
from latency_forecast.config import AlertConfig, BaselineConfig, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.data import TimeRange
from latency_forecast.errors import UserError, cli_entrypoint

CONFIGS = (DataConfig, ModelConfig, TrainingConfig, AlertConfig, BaselineConfig)
ORIGINS = (0.6, 0.8, 1.0)  # walk-forward cuts of a real store, as shares of its minutes
# name -> synthetic.generate arguments: small enough that the protocol runs in about 20 minutes
GENERATED = {
    "fleet_1": dict(days=6, n_services=8, seed=1),
    "fleet_2": dict(days=6, n_services=8, seed=2),
    "level_shift": dict(days=6, n_services=6, seed=11, level_shift_at=0.72),
    "two_days": dict(days=2, n_services=8, seed=12),
    "many_faults": dict(days=5, n_services=6, seed=13, faults_per_day=6.0),
}
MAX_SKILL_DROP = 0.02


@dataclasses.dataclass(frozen=True)
class Split:
    name: str
    store: str  # fit here
    judged_on: str | None = None  # all of this store; None: the fit store's test split
    origin: float = 1.0  # the share of the fit store's minutes kept


def build_parser() -> flags.ArgumentParser:
    parser = flags.build_parser(prog="python -m tools.dev_stores", description=__doc__, parents=[flags.parent_parser(*CONFIGS)])
    parser.add_argument("--real-stores", default="", help="comma-separated real stores, each judged at three walk-forward origins")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each split trained once per seed")
    parser.add_argument("--workdir", default="dev_stores", help="where the generated stores are written (once) and read")
    parser.add_argument("--only", default="", help="comma-separated split names to run (default: all)")
    parser.add_argument("--save", help="write the results as JSON to this path")
    parser.add_argument("--compare", help="results JSON of another setting (--save): print the per-split change and the verdict")
    return parser


def protocol_splits(real_stores: Sequence[str], workdir: str) -> list[Split]:
    """Every split, writing the generated stores into ``workdir`` when they are not there yet."""
    for name, arguments in GENERATED.items():
        path = os.path.join(workdir, name)
        if not os.path.isdir(path):
            frame, _ = synthetic.generate(**arguments)
            store.write_feature_store(frame, path)
    splits = [Split(f"{os.path.basename(os.path.normpath(path))}@{origin:g}", path, origin=origin) for path in real_stores for origin in ORIGINS]
    fleets = [os.path.join(workdir, name) for name in ("fleet_1", "fleet_2")]
    splits += [Split("fleet_1->fleet_2", fleets[0], fleets[1]), Split("fleet_2->fleet_1", fleets[1], fleets[0])]
    return splits + [Split(name, os.path.join(workdir, name)) for name in ("level_shift", "two_days", "many_faults")]


def judge(split: Split, settings: fitting.Settings) -> dict:
    """Train on the split's store and judge the shipped forecast and its members on the same samples."""
    data_config = settings.data
    table = store.load_feature_store(split.store, data_config.feature_columns)
    if split.origin < 1.0:
        span = data.span(table)
        table = data.table_in(table, TimeRange(span.start, span.start + int((span.end - span.start) * split.origin)))
    splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
    run = fitting.train(table, splits.train, splits.validation, settings, progress=False, log=lambda message: None)
    trained = run.forecaster
    if split.judged_on is None:
        prepared, ends = run.prepared, run.prepared.samples(splits.test, "test")
    else:
        prepared = trained.prepare(store.load_feature_store(split.judged_on, trained.feature_columns))
        ends = prepared.ends
    judged = evaluation.evaluate(trained, prepared, ends)
    members = {name: block["mae"] for name, block in {**judged.baseline_metrics, **judged.member_metrics}.items()}
    per_service = evaluation.per_service(judged, prepared.table.services)
    # against the better of the two baselines the done-when criterion names; the window median is
    # exact on services whose p99 sits on one histogram bucket, which makes any ratio to it explode
    compared = ("persistence", "gradient_boosting")
    worst = max(
        (blocks["model"]["mae"] / min(blocks[name]["mae"] for name in compared), service)
        for service, blocks in per_service.items()
        if min(blocks[name]["mae"] for name in compared) > 0
    )
    coverage = evaluation.quantile_report(judged).get("0.9", {}).get("coverage")
    return {"shipped": judged.model_metrics["mae"], "members": members, "weights": trained.ensemble_weights, "coverage_0.9": coverage,
            "worst_service": {"service": worst[1], "ratio": worst[0]}}


def skill(result: dict, over: str, of: str = "shipped") -> float:
    mae = result["shipped"] if of == "shipped" else result["members"][of]
    return 1.0 - mae / result["members"][over]


def summary_line(name: str, results: list[dict]) -> str:
    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    weights = {member: median([r["weights"].get(member, 0.0) for r in results]) for member in results[0]["members"]}
    coverage = [r["coverage_0.9"] for r in results if r["coverage_0.9"] is not None]
    worst = max(results, key=lambda r: r["worst_service"]["ratio"])["worst_service"]
    return (
        f"{name:24} shipped skill/gb {median([skill(r, 'gradient_boosting') for r in results]):+.3f} "
        f"/persistence {median([skill(r, 'persistence') for r in results]):+.3f}  "
        f"recurrent/gb {median([skill(r, 'gradient_boosting', 'recurrent') for r in results]):+.3f}  "
        f"weights {' '.join(f'{m[:4]} {w:.2f}' for m, w in weights.items())}  "
        f"cov0.9 {median(coverage) if coverage else float('nan'):.3f}  worst service {worst['service']} x{worst['ratio']:.2f}"
    )


def compare(mine: dict[str, list[dict]], theirs: dict[str, list[dict]]) -> str:
    """The verdict of ``mine`` against ``theirs`` on the splits both ran."""
    common = [name for name in mine if name in theirs]
    change = {name: float(np.median([skill(r, "gradient_boosting") for r in mine[name]]) - np.median([skill(r, "gradient_boosting") for r in theirs[name]])) for name in common}
    median_change = float(np.median([np.median([skill(r, "gradient_boosting") for r in mine[n]]) for n in common])) - float(
        np.median([np.median([skill(r, "gradient_boosting") for r in theirs[n]]) for n in common])
    )
    lines = [f"  {name:24} skill/gb change {delta:+.3f}" for name, delta in change.items()]
    worst = min(change.values())
    adopt = median_change > 0 and worst >= -MAX_SKILL_DROP
    lines.append(f"median skill change {median_change:+.3f}, worst split {worst:+.3f}: {'adopt' if adopt else 'keep the other'}")
    return "\n".join(lines)


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_config, model_config, training_config, alert_config, baseline_config = flags.from_args(args, *CONFIGS)
    if "gradient_boosting" not in baseline_config.baseline_names:
        raise UserError("the protocol judges skill over gradient boosting: keep it in --baselines")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    splits = protocol_splits([path for path in args.real_stores.split(",") if path], args.workdir)
    if args.only:
        splits = [split for split in splits if split.name in args.only.split(",")]
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for split in splits:
        for seed in seeds:
            settings = fitting.Settings(
                data_config, model_config, dataclasses.replace(training_config, seed=seed), alert_config, baseline_config,
                latency_thresholds=alerting.read_latency_thresholds(data_config),
            )
            results.setdefault(split.name, []).append(judge(split, settings))
        print(summary_line(split.name, results[split.name]), flush=True)
    medians = {name: float(np.median([skill(r, "gradient_boosting") for r in runs])) for name, runs in results.items()}
    print(f"median split skill/gb {np.median(list(medians.values())):+.3f}, worst split {min(medians, key=medians.get)} "
          f"{min(medians.values()):+.3f} ({time.perf_counter() - started:.0f} s)")
    if args.save:
        with open(args.save, "w") as stream:
            json.dump(results, stream, indent=1)
    if args.compare:
        with open(args.compare) as stream:
            print(compare(results, json.load(stream)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
