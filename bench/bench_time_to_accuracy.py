"""Time to accuracy: seconds of training until the validation MAE (ms) first reaches a fixed
target, ours against Darts' BlockRNNModel and RNNModel (LSTM), one network each, the same hidden
size, sequence length and horizon, on CPU at one thread, on a demo-style generated store.

    python -m bench.bench_time_to_accuracy [--time-limit 300] [--target-factor 0.9] [--steps-per-epoch 64] [--smoke]

The target is fixed before anything trains: ``--target-factor`` times persistence's MAE (the
latency at t as the forecast of t+H) on the validation windows (or ``--target-mae`` ms). 0.9 asks
for a tenth less error than persistence: the demo store's recurrent networks reach 0.8 of it
(docs/results.md), gradient boosting 0.82. A contender that does not reach it within
``--time-limit`` seconds of training is reported as not reached, with the best MAE it reached.

Contenders: ``ours``, ``training.fit`` of one network (``--ensemble-size 1``), one target per
window; ``ours-sequence``, ``--targets-per-sequence 4`` (``--sequence-targets``) with ``--latency-history difference``;
``darts-block``, BlockRNNModel on the scaled features as past covariates (as bench_training);
``darts-rnn``, RNNModel (one step ahead, rolled out over the H minutes; its future covariates are
the features H minutes late, so it reads nothing after t), trained on sequences of L + 15
minutes. The same validation windows (``--validation-windows``, evenly spaced over the validation
split) are forecast after every epoch of each, through ours' ``Forecaster.predict`` and Darts'
``predict``, Darts' normalised forecasts turned into ms by ours' ``target_normalizer.denormalize``
as ours' are. An epoch is ``--steps-per-epoch`` optimiser steps of ``--batch-size`` windows
(sequences for ours-sequence and darts-rnn). Darts gets ours' Adam learning rate, gradient
clipping and Huber loss; ours keeps its ReduceLROnPlateau, its patience rescaled to count as many
training windows as at the default ``--samples-per-epoch``. Darts trains by ``fit(epochs=1)``
calls on the same model, its Adam state carried from one to the next; its time is its Lightning
training epochs alone (trainer set-up and dataset building are not counted), ours' the whole
``training.fit`` with its own validation-loss pass after each epoch; neither counts the MAE
evaluations (Darts' take longer than its epochs: a full run may last about 2.5x the training
seconds of the contenders that never reach the target). The ratio is Darts' fastest time over
each of ours'. Each contender first runs one untimed epoch (the first optimiser imports
torch._dynamo, oneDNN builds its kernels). ``--smoke`` runs at most two brief epochs of each on a
3 x 2 store with a lax target.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from bench.common import Result, chosen_contenders, command, ensure_store, load_average, machine, parse_arguments, run_benchmark
from latency_forecast import data, fitting, training
from latency_forecast import store as store_io  # `store` names store paths here
from latency_forecast.config import AUTO_BATCH_SIZES, DataConfig, ModelConfig, TrainingConfig
from latency_forecast.data import SeriesTable, Splits
from latency_forecast.forecaster import Forecaster

CONTENDERS = ("ours", "ours-sequence", "darts-block", "darts-rnn")
LABELS = {
    "ours": "ours, one target per window",
    "ours-sequence": "ours, {targets} targets per sequence, latency history differenced",
    "darts-block": "Darts BlockRNNModel",
    "darts-rnn": "Darts RNNModel",
}
SMOKE = {
    "services": 3, "days": 2, "hidden_size": 8, "validation_windows": 64, "steps_per_epoch": 4,
    "max_epochs": 2, "time_limit": 30.0, "target_factor": 3.0,
}


@dataclass
class _Validation:
    """The fixed validation windows every contender forecasts.

    ends : (n,) row index of each window's last input minute t
    codes : (n,) its service's code (the forecasters' codes are the table's)
    current, actual : (n,) float64 p99 latency in ms at t and at t+H
    """

    ends: np.ndarray
    codes: np.ndarray
    current: np.ndarray
    actual: np.ndarray

    def mae(self, forecast_ms: np.ndarray) -> float:
        return float(np.mean(np.abs(np.asarray(forecast_ms, dtype=np.float64) - self.actual)))


def _validation_windows(table: SeriesTable, splits: Splits, settings: DataConfig, count: int) -> _Validation:
    """``count`` windows evenly spaced over the validation split's (every service, its whole span)."""
    L, H = settings.sequence_length, settings.horizon
    ends, _ = data.window_ends(table, L, H)
    candidates = data.require_samples_in(ends, table, splits.validation, L, H, "validation")
    chosen = candidates[np.unique(np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(np.int64))]
    target = table.target.astype(np.float64)
    return _Validation(chosen, table.service_codes[chosen].astype(np.int64), target[chosen], target[chosen + H])


@dataclass
class _Curve:
    """One contender's validation MAE after each epoch, against its seconds of training so far;
    :meth:`add` says when to stop: the target reached, ``time_limit`` seconds or ``max_epochs`` spent."""

    target_mae: float
    time_limit: float
    max_epochs: int  # 0: no limit but the time
    points: list[tuple[float, float]] = field(default_factory=list)

    def add(self, seconds: float, mae: float) -> bool:
        self.points.append((seconds, mae))
        return mae <= self.target_mae or seconds >= self.time_limit or (self.max_epochs > 0 and len(self.points) >= self.max_epochs)

    @property
    def reached(self) -> tuple[int, float] | None:
        """The first epoch (from 1) whose MAE reached the target, and its seconds; None if none did."""
        for epoch, (seconds, mae) in enumerate(self.points, 1):
            if mae <= self.target_mae:
                return epoch, seconds
        return None

    @property
    def best(self) -> tuple[int, float]:
        """The epoch of the lowest MAE, and that MAE."""
        epoch = int(np.argmin([mae for _, mae in self.points])) + 1
        return epoch, self.points[epoch - 1][1]

    def sampled(self, count: int = 16) -> str:
        """About ``count`` points of the curve, as epoch:MAE."""
        step = -(-len(self.points) // count)
        shown = sorted(set(range(0, len(self.points), step)) | {len(self.points) - 1})
        return " ".join(f"{epoch + 1}:{self.points[epoch][1]:.2f}" for epoch in shown)

    def summary(self) -> str:
        best_epoch, best_mae = self.best
        reached = self.reached
        if reached is not None:
            return f"{reached[1]:.2f} s (epoch {reached[0]}, MAE {self.points[reached[0] - 1][1]:.2f} ms)"
        seconds = self.points[-1][0]
        return f"not reached in {seconds:.1f} s, {len(self.points)} epochs (best {best_mae:.2f} ms, epoch {best_epoch})"


class _Stop(Exception):
    """Raised from ``training.fit``'s per-epoch log line to end the fit there."""


def _train_ours(
    table: SeriesTable, splits: Splits, settings: fitting.Settings, validation: _Validation, curve: _Curve
) -> None:
    """``training.fit`` of the forecaster that ``settings`` builds, its validation MAE taken after
    each epoch (where fit logs the epoch's line) through ``Forecaster.predict``, off the clock."""
    forecaster = fitting.untrained_forecaster(table, splits.train, settings)
    prepared = forecaster.prepare(table)
    train_ends = prepared.samples(splits.train, "training")
    config = _rescaled_lr_patience(forecaster.training_config, len(train_ends))
    clock = {"seconds": 0.0, "since": 0.0}

    def after_epoch(line: str) -> None:
        if not line.startswith("epoch "):  # the start and early-stop lines
            return
        clock["seconds"] += time.perf_counter() - clock["since"]
        if curve.add(clock["seconds"], validation.mae(forecaster.predict(prepared, validation.ends).ms)):
            raise _Stop
        clock["since"] = time.perf_counter()

    clock["since"] = time.perf_counter()
    try:
        training.fit(forecaster.model, prepared.tensors, train_ends, validation.ends, config, progress=True, log=after_epoch)
    except _Stop:
        pass


def _ours_settings(model_config: ModelConfig, batch_size: int, steps_per_epoch: int, targets: int, threads: int) -> fitting.Settings:
    """One network; an epoch of ``steps_per_epoch`` batches (of windows, or of sequences of
    ``targets`` targets); no early stop (the curve's limits end the fit)."""
    training_config = TrainingConfig(
        epochs=10**6, patience=10**6, batch_size=batch_size, samples_per_epoch=steps_per_epoch * batch_size * targets,
        targets_per_sequence=targets, device="cpu", num_threads=threads,
    )
    return fitting.Settings(DataConfig(), dataclasses.replace(model_config, ensemble_size=1), training_config)


def _rescaled_lr_patience(config: TrainingConfig, training_windows: int) -> TrainingConfig:
    """The plateau rule's patience in epochs of ``config``'s size that hold as many training
    windows as its default patience does in epochs of the default size (on this store)."""
    default = TrainingConfig()
    windows = default.lr_patience * min(default.samples_per_epoch or training_windows, training_windows)
    return dataclasses.replace(config, lr_patience=math.ceil(windows / min(config.samples_per_epoch or training_windows, training_windows)))


class _Darts:
    """A Darts LSTM on the same scaled rows as ours: target = normalised log latency, covariates =
    scaled features, gaps forward-filled (Darts needs gap-free series), trained on the training
    split's minutes only."""

    def __init__(
        self, kind: str, table: SeriesTable, splits: Splits, reference: Forecaster, model_config: ModelConfig,
        batch_size: int, steps_per_epoch: int, sequence_targets: int, validation: _Validation,
    ):
        import pytorch_lightning as pl
        from darts import TimeSeries
        from darts.models import BlockRNNModel, RNNModel

        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "darts"):  # every fit announces itself
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        settings = reference.data_config
        L, H = settings.sequence_length, settings.horizon
        self.kind, self.horizon, self.validation, self.normalizer = kind, H, validation, reference.target_normalizer
        scaled = reference.scaler.transform(table.features)
        target = reference.target_normalizer.normalize(table.target, table.service_codes)
        bounds = table.service_bounds
        series, covariates, first_minutes = [], [], []
        for code in range(len(table.services)):
            rows = slice(bounds[code], bounds[code + 1])
            index = pd.to_datetime(table.minutes[rows] * 60, unit="s")
            frame = pd.DataFrame(np.column_stack([target[rows], scaled[rows]]), index=index)
            frame = frame.reindex(pd.date_range(index[0], index[-1], freq="min")).ffill().bfill().astype(np.float32)
            series.append(TimeSeries.from_times_and_values(frame.index, frame.values[:, :1]))
            covariates.append(TimeSeries.from_times_and_values(frame.index, frame.values[:, 1:]))
            first_minutes.append(int(table.minutes[bounds[code]]))
        if kind == "darts-rnn":
            # RNNModel reads the covariates of the minute it forecasts: those of t+H must be t's
            covariates = [values.shift(H) for values in covariates]
        train_start, train_end = (pd.Timestamp(minute * 60, unit="s") for minute in (splits.train.start, splits.train.end))
        shortest = L + H + (sequence_targets if kind == "darts-rnn" else 0)
        self.train_series, self.train_covariates = [], []
        for values, extra in zip(series, covariates):
            # the training minutes, where the covariates are known too (darts-rnn's start H minutes late)
            part = values.slice(train_start, train_end - pd.Timedelta(minutes=1)).slice_intersect(extra)
            if len(part) >= shortest:
                self.train_series.append(part)
                self.train_covariates.append(extra)
        # each validation window's L minutes of target, and its service's covariates
        positions = table.minutes[validation.ends] - np.asarray(first_minutes)[validation.codes]
        self.inputs = [series[code][int(position) + 1 - L : int(position) + 1] for code, position in zip(validation.codes, positions)]
        self.input_covariates = [covariates[code] for code in validation.codes]
        self.forecast_times = pd.to_datetime((table.minutes[validation.ends] + H) * 60, unit="s")

        class EpochTimer(pl.Callback):
            seconds = 0.0

            def on_train_epoch_start(self, trainer, module):
                self.started = time.perf_counter()

            def on_train_epoch_end(self, trainer, module):
                self.seconds += time.perf_counter() - self.started

        class CarryOptimizer(pl.Callback):
            """Each fit(epochs=1) builds a fresh optimiser: go on from the last one's state, as one long fit would."""

            state = None

            def on_train_start(self, trainer, module):
                if self.state is not None:
                    trainer.optimizers[0].load_state_dict(self.state)

            def on_train_end(self, trainer, module):
                self.state = copy.deepcopy(trainer.optimizers[0].state_dict())

        self.timer = EpochTimer()
        defaults = TrainingConfig()
        common = dict(
            input_chunk_length=L, model="LSTM", hidden_dim=model_config.hidden_size, n_rnn_layers=model_config.num_layers,
            dropout=model_config.dropout, batch_size=batch_size, n_epochs=1, random_state=defaults.seed,
            optimizer_kwargs={"lr": defaults.learning_rate}, loss_fn=torch.nn.HuberLoss(delta=defaults.huber_delta),
            pl_trainer_kwargs={
                "accelerator": "cpu", "enable_progress_bar": False, "logger": False, "enable_model_summary": False,
                "enable_checkpointing": False, "callbacks": [self.timer, CarryOptimizer()],
                "limit_train_batches": steps_per_epoch, "gradient_clip_val": defaults.gradient_clip or None,
            },
        )
        if kind == "darts-block":
            self.model = BlockRNNModel(
                output_chunk_length=1, output_chunk_shift=H - 1,  # the one output is t+H
                hidden_fc_sizes=[model_config.hidden_size], **common,  # our head's hidden layer
            )
        else:
            self.model = RNNModel(training_length=L + sequence_targets - 1, **common)

    @property
    def seconds(self) -> float:
        """Seconds of training epochs so far."""
        return self.timer.seconds

    def epoch(self) -> None:
        if self.kind == "darts-block":
            self.model.fit(self.train_series, past_covariates=self.train_covariates, epochs=1, verbose=False)
        else:
            self.model.fit(self.train_series, future_covariates=self.train_covariates, epochs=1, verbose=False)

    def forecast_ms(self) -> np.ndarray:
        """(n,) the validation windows' forecasts of t+H, ms."""
        if self.kind == "darts-block":
            forecasts = self.model.predict(1, series=self.inputs, past_covariates=self.input_covariates, verbose=False)
        else:
            forecasts = self.model.predict(self.horizon, series=self.inputs, future_covariates=self.input_covariates, verbose=False)
        if forecasts[0].end_time() != self.forecast_times[0] or forecasts[-1].end_time() != self.forecast_times[-1]:
            raise RuntimeError(f"Darts forecast {forecasts[0].end_time()}, expected t+H = {self.forecast_times[0]}")
        normalized = np.array([forecast.values()[-1, 0] for forecast in forecasts], dtype=np.float32)
        return self.normalizer.denormalize(normalized, self.validation.codes, self.validation.current)


def _train_darts(contender: _Darts, curve: _Curve) -> None:
    while True:
        contender.epoch()
        if curve.add(contender.seconds, contender.validation.mae(contender.forecast_ms())):
            return


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_time_to_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="seconds of training each contender gets to reach the target (default: %(default)s)")
    parser.add_argument("--target-factor", type=float, default=0.9,
                        help="the target MAE is this times persistence's on the validation windows (default: %(default)s)")
    parser.add_argument("--target-mae", type=float, help="the target MAE in ms instead (default: from --target-factor)")
    parser.add_argument("--steps-per-epoch", type=int, default=64,
                        help="optimiser steps between two MAE evaluations, for every contender (default: %(default)s)")
    parser.add_argument("--max-epochs", type=int, default=0, help="epochs each contender gets at most (default: %(default)s, no limit but the time)")
    parser.add_argument("--batch-size", type=int, default=AUTO_BATCH_SIZES[0],
                        help="windows (or sequences) per step, for every contender (default: %(default)s, what --batch-size 0 takes "
                        "on a store this small)")
    parser.add_argument("--hidden-size", type=int, default=ModelConfig().hidden_size,
                        help="LSTM units of every contender, one layer (default: %(default)s, ours' default)")
    parser.add_argument("--sequence-targets", type=int, default=4,
                        help="ours-sequence's --targets-per-sequence; darts-rnn trains on sequences of L + this - 1 minutes (default: %(default)s)")
    parser.add_argument("--validation-windows", type=int, default=2048,
                        help="validation windows the MAE is taken on, evenly spaced over the validation split (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for all (default: %(default)s, see bench_training for why; 0: the toolkit's automatic choice)")
    parser.add_argument("--services", type=int, default=8, help="services in the generated store (default: %(default)s)")
    parser.add_argument("--days", type=int, default=8, help="days in the generated store (default: %(default)s)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated, among %(default)s (default: all; without a Darts one, no ratio)")
    args = parse_arguments(parser, argv, SMOKE)
    names = chosen_contenders(parser, args.contenders, CONTENDERS)
    if args.time_limit <= 0 or args.steps_per_epoch < 1 or args.batch_size < 1 or args.sequence_targets < 2 or args.validation_windows < 1:
        parser.error("--time-limit, --steps-per-epoch, --batch-size and --validation-windows must be positive, --sequence-targets at least 2")
    training.configure_threads(args.threads)
    print(f"machine: {machine(('numpy', 'darts', 'pytorch-lightning'))}")
    model_config = ModelConfig(hidden_size=args.hidden_size, num_layers=1)
    settings = DataConfig()
    curves: dict[str, _Curve] = {}
    with tempfile.TemporaryDirectory(prefix="bench-time-to-accuracy-") as directory:
        store = ensure_store(os.path.join(directory, "store"), args.services, args.days)
        table = store_io.load_feature_store(store)
        splits = data.fraction_splits(table, settings.validation_fraction, settings.test_fraction, settings.embargo)
        validation = _validation_windows(table, splits, settings, args.validation_windows)
        persistence = validation.mae(validation.current)
        target = args.target_mae if args.target_mae is not None else args.target_factor * persistence
        how = f"{args.target_mae:g} ms" if args.target_mae is not None else f"{args.target_factor:g}x persistence's {persistence:.2f} ms"
        print(f"target: validation MAE <= {target:.2f} ms ({how}) on {len(validation.ends)} windows; "
              f"{args.time_limit:g} s of training each at most", flush=True)

        def run(name: str, curve: _Curve) -> None:
            torch.manual_seed(0)
            if name.startswith("ours"):
                targets = args.sequence_targets if name == "ours-sequence" else 1
                config = dataclasses.replace(model_config, latency_history="difference") if targets > 1 else model_config
                _train_ours(table, splits, _ours_settings(config, args.batch_size, args.steps_per_epoch, targets, args.threads), validation, curve)
            else:
                # its scalers (ours' too: fitted on training rows); it sets torch's threads, so it is told ours
                reference_settings = fitting.Settings(settings, ModelConfig(), TrainingConfig(device="cpu", num_threads=args.threads))
                reference = fitting.untrained_forecaster(table, splits.train, reference_settings)
                contender = _Darts(name, table, splits, reference, model_config, args.batch_size, args.steps_per_epoch, args.sequence_targets, validation)
                _train_darts(contender, curve)

        for name in names:  # warm-up, untimed: the first optimiser imports torch._dynamo (seconds), oneDNN builds its kernels
            run(name, _Curve(target, args.time_limit, max_epochs=1))
        for name in names:
            curve = curves[name] = _Curve(target, args.time_limit, args.max_epochs)
            run(name, curve)
            print(f"  {name}: {curve.summary()}; MAE by epoch: {curve.sampled()}", flush=True)

    label = {name: text.format(targets=args.sequence_targets) for name, text in LABELS.items()}
    darts = [name for name in names if name.startswith("darts")]
    darts_times = {name: curves[name].reached[1] for name in darts if curves[name].reached is not None}
    fastest = min(darts_times, key=darts_times.get) if darts_times else None
    ratios, notes = {}, {}
    for name in names:
        if not name.startswith("ours") or not darts:
            continue
        reached = curves[name].reached
        if fastest is not None and reached is not None:
            ratios[name] = darts_times[fastest] / max(reached[1], 1e-9)
            notes[name] = f" (Darts' fastest: {label[fastest].removeprefix('Darts ')} {darts_times[fastest]:.2f} s)"
        else:
            notes[name] = " (no Darts contender reached it: no ratio)" if fastest is None else " (Darts reached it, ours did not: no ratio)"
    print(f"\n| contender | s of training to MAE <= {target:.2f} ms | epochs run | best MAE (ms) | Darts' fastest / this |\n|---|---|---|---|---|")
    for name in names:
        curve, reached = curves[name], curves[name].reached
        ratio = f"{ratios[name]:.2f}x" if name in ratios else ""
        print(f"| {label[name]} | {'not reached' if reached is None else f'{reached[1]:.2f}'} | {len(curve.points)} | {curve.best[1]:.2f} | {ratio} |")
    measured = (
        f"s of training to validation MAE <= {target:.2f} ms ({how}, {len(validation.ends)} windows), hidden {args.hidden_size}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch_size}"
    )
    where = command("bench.bench_time_to_accuracy", argv)
    return [
        Result(
            "time to accuracy", f"{measured}, {label[name]}" + (", ratio = Darts' fastest / ours" if name in notes else ""),
            curves[name].summary() + notes.get(name, ""), ratios.get(name), "none set", None, where, load_average(),
        )
        for name in names
    ]


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
