"""The settings of the scripts beside train.py, as dataclasses: which checkpoint to use, what
analyze_causality.py and forecast.py do and write, backtest.py's folds, the demo store.

Like ``config.py``'s, each default lives in one field, with its help text in ``metadata``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from latency_forecast.config import MINUTES_PER_DAY, require
from latency_forecast.flags import flag, setting


@dataclass
class CheckpointConfig:
    """The trained model to use."""

    model_checkpoint: str = setting("artifacts/latency_forecaster.pt", "checkpoint written by train.py")
    scaler_path: str = setting("artifacts/scaler.pt", "scaler.pt written beside the checkpoint")


@dataclass
class CausalityConfig:
    """Which faults, what to write (analyze_causality.py)."""

    chaos_manifest: str | None = setting(
        None, "chaos manifest (JSON list of injected faults) to score the explanations against; default: no scoring"
    )
    call_graph: str | None = setting(
        None,
        "call graph (JSON: {\"edges\": [{\"caller\": ..., \"callee\": ...}]}) for ranking root-cause services; "
        "default: call_graph.json beside the store's Parquet files, if there is one",
    )
    max_samples: int = setting(10, "true-positive events to explain and report (faults of the manifest are all scored)")
    event_order: str = setting(
        "earliest",
        "which events are explained when there are more than --max-samples: the earliest, or the "
        "highest predicted latency",
        choices=("earliest", "predicted"),
    )
    output: str = setting(
        "artifacts/causality_report.json", "report path; causality_report.png is written beside it"
    )

    def __post_init__(self) -> None:
        require(self.max_samples >= 0, "--max-samples must be 0 or more")
        require(self.output.endswith(".json"), f"--output must name a .json file, got {self.output}")


@dataclass
class ForecastConfig:
    """When to forecast and where the forecasts go (forecast.py)."""

    at: str | None = setting(
        None, "forecast from the window ending at this minute, ISO-8601 (UTC unless an offset is given); default: the newest minute in the store"
    )
    max_staleness_minutes: int = setting(
        5, "a service whose newest minute is more than this many minutes before --at is reported stale, not forecast"
    )
    output: str = setting("artifacts/forecasts.json", "path of forecasts.json")
    prometheus_textfile: str | None = setting(
        None,
        "also write the forecasts as Prometheus gauges here, a *.prom file in node_exporter's --collector.textfile.directory "
        "(Debian's: /var/lib/prometheus/node-exporter)",
    )
    alertmanager_url: str | None = setting(
        None, "also post the firing alerts to this Alertmanager (its base URL, e.g. http://alertmanager:9093)"
    )
    alertmanager_timeout: float = setting(5.0, "seconds to wait for Alertmanager before giving up")
    resolve_after_minutes: float = setting(
        5.0, "a posted alert ends this many minutes after the run unless a later run posts it again"
    )
    severity: str = setting("warning", "severity label of the posted alerts")

    def __post_init__(self) -> None:
        require(self.max_staleness_minutes >= 0, "--max-staleness-minutes must be 0 or more")
        require(self.output.endswith(".json"), f"--output must name a .json file, got {self.output}")
        require(self.alertmanager_timeout > 0, "--alertmanager-timeout must be positive (seconds)")
        require(self.resolve_after_minutes > 0, "--resolve-after-minutes must be positive")


@dataclass
class BacktestConfig:
    """Walk-forward folds (backtest.py)."""

    train_window_days: float = setting(
        21.0,
        "days each fold learns from; its last --validation-fraction (after an embargo) is kept for early stopping",
    )
    val_window_days: float = setting(
        7.0, "days each fold is judged on, right after its training window; the first --embargo-minutes are skipped"
    )
    step_days: float | None = setting(
        None, "days between consecutive folds; default: --val-window-days, so validation windows tile the data"
    )
    window_mode: str = setting(
        "sliding",
        "sliding: every fold trains on the last --train-window-days; expanding: on everything from the start of the data",
        choices=("sliding", "expanding"),
    )
    jobs: int = setting(
        1,
        "folds trained at once, each in its own process (or Ray task) with --num-threads threads "
        "(0: auto for one fold at a time, one thread each for folds side by side)",
    )
    executor: str = setting(
        "local",
        "local: folds run in worker processes on this machine; ray: each fold is a Ray task asking for "
        "--num-threads CPUs (and a share of the GPUs unless --device cpu); needs `pip install -r requirements-ray.txt`",
        choices=("local", "ray"),
    )
    ray_address: str | None = setting(
        None,
        "Ray cluster for --executor ray (auto, HOST:PORT or ray://HOST:10001; the package is shipped to its workers); "
        "default: a local Ray instance, started for the run with --jobs times --num-threads CPUs and shut down after it",
    )
    output: str = setting("artifacts/backtest.json", "path of backtest.json; backtest.png is written beside it")

    def __post_init__(self) -> None:
        for name in ("train_window_days", "val_window_days", "step_days"):
            value = getattr(self, name)
            if value is None:
                continue
            require(
                math.isfinite(value) and round(value * MINUTES_PER_DAY) >= 1,
                f"{flag(name)} must be positive (at least one minute), got {value}",
            )
        require(self.jobs >= 1, f"--jobs must be at least 1, got {self.jobs}")
        require(
            self.ray_address is None or self.executor == "ray",
            f"--ray-address {self.ray_address} is only used with --executor ray; add --executor ray or leave it out",
        )

    @property
    def train_window_minutes(self) -> int:
        return round(self.train_window_days * MINUTES_PER_DAY)

    @property
    def val_window_minutes(self) -> int:
        return round(self.val_window_days * MINUTES_PER_DAY)

    @property
    def step_minutes(self) -> int:
        return self.val_window_minutes if self.step_days is None else round(self.step_days * MINUTES_PER_DAY)


@dataclass
class SyntheticConfig:
    """The demo store (python -m latency_forecast.synthetic)."""

    output: str = setting("feature_store", "store directory to create")
    days: int = setting(35, "days of minutes to simulate")
    services: int = setting(8, "services; beyond 8 the call graph is repeated")
    faults_per_day: float = setting(1.5, "mean injected faults per day")
    seed: int = setting(0, "random seed; same seed, same store")
    start: str = setting("2024-05-01T00:00:00Z", "first minute, ISO-8601 UTC")
    end: str | None = setting(
        None, "last minute, ISO-8601 UTC or now (the current minute); given, the store's --days end there and --start is not used"
    )
    level_shift_at: float = setting(
        0.0,
        "share of the span after which a deploy halves or doubles each service's own latency for good "
        "(a development store whose level moves after training, e.g. 0.8); 0: no level shifts",
    )

    def __post_init__(self) -> None:
        require(self.days >= 1, f"--days must be at least 1, got {self.days}")
        require(0 <= self.level_shift_at < 1, f"--level-shift-at must be in [0, 1), got {self.level_shift_at}")
        require(self.services >= 1, f"--services must be at least 1, got {self.services}")
        require(self.faults_per_day >= 0, f"--faults-per-day must be 0 or more, got {self.faults_per_day}")
