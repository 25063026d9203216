r"""The live demo (``make live``): a demo store ending now, a model, and forecast.py once a minute
into a Prometheus textfile for node_exporter's textfile collector, as a deployment runs it.

The store holds --days of minutes up to the current one and a day beyond it; each minute forecast.py
forecasts ``--at`` the last finished minute, so it reads only minutes that have "arrived" (none after
``--at``) and the forecasts' ``as_of`` follows the clock. A checkpoint in --model-dir (``make demo``'s
``artifacts/``) is reused when it forecasts this fleet from its features; otherwise a small model is
trained on the minutes before now into DIRECTORY/artifacts (about half a minute on 2 cores) and reused
next time. A store about to run out is generated again.

Example:
    python -m tools.live --textfile-directory /var/lib/prometheus/node-exporter
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import pandas as pd

import forecast
import train
from latency_forecast import flags, store, synthetic, training
from latency_forecast.config import TARGET_COLUMN
from latency_forecast.data import format_minute, to_minute
from latency_forecast.errors import UserError, cli_entrypoint
from latency_forecast.forecaster import Forecaster
from latency_forecast.script_config import SyntheticConfig

AHEAD_MINUTES = 24 * 60  # minutes generated beyond now: a day of forecasts before the store is regenerated
REGENERATE_MINUTES = 60  # regenerate when fewer minutes than this are left ahead
FAULTS_PER_DAY = 3.0  # twice the demo store's: alerts to see within an hour or two
# a small model: enough to forecast the demo fleet, trained in about half a minute on 2 cores
SMALL_TRAINING = [
    "--hidden-size", "16", "--epochs", "3", "--samples-per-epoch", "5000", "--num-threads", "1", "--shap-samples", "0", "--quiet",
]
TEXTFILE = "latency_forecast.prom"


def build_parser() -> flags.ArgumentParser:
    parser = flags.build_parser(prog="python -m tools.live", description=__doc__, parents=[])
    parser.add_argument(
        "--directory", default="live", help="where the store, a trained model and forecasts.json go (default: %(default)s)"
    )
    parser.add_argument(
        "--textfile-directory",
        help=f"where {TEXTFILE} is written: node_exporter's --collector.textfile.directory (default: DIRECTORY/textfile)",
    )
    parser.add_argument(
        "--model-dir", default="artifacts", help="reuse the checkpoint here when it fits the demo fleet (default: %(default)s)"
    )
    parser.add_argument("--days", type=int, default=7, help="days of minutes before now in the store (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the store (default: %(default)s)")
    parser.add_argument(
        "--runs", type=int, default=0, help="forecasts to make before exiting; 0: until interrupted (default: %(default)s)"
    )
    parser.add_argument("--alertmanager-url", help="also post the firing alerts to this Alertmanager (forecast.py's flag)")
    return parser


def _minute_now() -> int:
    return to_minute(pd.Timestamp.now(tz="UTC"))


def ensure_store(path: str, days: int, seed: int, now: int) -> None:
    """Generate the store when it is missing or has fewer than REGENERATE_MINUTES left after ``now``."""
    if os.path.isdir(path) and store.minute_span(path).end - 1 >= now + REGENERATE_MINUTES:
        return
    end = format_minute(now + AHEAD_MINUTES)
    arguments = ["--output", path, "--days", str(days + AHEAD_MINUTES // (24 * 60)), "--end", end, "--seed", str(seed)]
    if synthetic.main([*arguments, "--faults-per-day", str(FAULTS_PER_DAY)]) != 0:
        raise UserError(f"cannot generate the demo store in {path}; see the line above")


def fits_the_fleet(directory: str) -> bool:
    """Whether ``directory`` holds a checkpoint that forecasts demo-fleet services from demo-store columns."""
    checkpoint, scaler = os.path.join(directory, "latency_forecaster.pt"), os.path.join(directory, "scaler.pt")
    if not (os.path.exists(checkpoint) and os.path.exists(scaler)):
        return False
    try:
        forecaster = Forecaster.load(checkpoint, scaler, training.resolve_device("auto"))
    except UserError:
        return False
    fleet = {spec.name for spec in synthetic.build_fleet(SyntheticConfig.services)}
    columns = {*synthetic.FEATURE_COLUMNS, TARGET_COLUMN}
    return set(forecaster.services) <= fleet and set(forecaster.feature_columns) <= columns


def choose_model(model_dir: str, directory: str, store_path: str, now: int) -> str:
    """The directory of the checkpoint to forecast with: ``model_dir``'s, an earlier live run's, or a
    small model trained now on the store's minutes before ``now``."""
    trained = os.path.join(directory, "artifacts")
    for candidate in (model_dir, trained):
        if fits_the_fleet(candidate):
            print(f"forecasting with the checkpoint in {candidate}/")
            return candidate
    print(f"no checkpoint in {model_dir}/ fits the demo fleet: training a small one into {trained}/ (about half a minute)")
    arguments = ["--feature-store-path", store_path, "--end-ts", format_minute(now + 1), "--output-dir", trained]
    if train.main([*arguments, *SMALL_TRAINING]) != 0:
        raise UserError(f"training a model on {store_path} failed; see the lines above")
    return trained


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.days < 1:
        raise UserError(f"--days must be at least 1, got {args.days}")
    store_path = os.path.join(args.directory, "feature_store")
    textfile_directory = args.textfile_directory or os.path.join(args.directory, "textfile")
    os.makedirs(textfile_directory, exist_ok=True)
    ensure_store(store_path, args.days, args.seed, _minute_now())
    model = choose_model(args.model_dir, args.directory, store_path, _minute_now())
    textfile = os.path.join(textfile_directory, TEXTFILE)
    command = [
        "--model-checkpoint", os.path.join(model, "latency_forecaster.pt"), "--scaler-path", os.path.join(model, "scaler.pt"),
        "--feature-store-path", store_path, "--output", os.path.join(args.directory, "forecasts.json"),
        "--prometheus-textfile", textfile,
        *(["--alertmanager-url", args.alertmanager_url] if args.alertmanager_url else []),
    ]
    runs = 0
    try:
        while True:
            now = _minute_now()
            ensure_store(store_path, args.days, args.seed, now)
            code = forecast.main([*command, "--at", format_minute(now - 1)])  # the last finished minute
            runs += 1
            if code != 0 or runs == args.runs:
                return code
            time.sleep(62 - time.time() % 60)  # two seconds into the next minute
    except KeyboardInterrupt:
        print(
            f"stopped after {runs} forecast(s); {textfile} stays until deleted "
            "(LatencyForecasterStale fires 5 minutes after the last run)",
            file=sys.stderr,
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
