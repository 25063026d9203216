"""Training throughput: samples per second of one training epoch, ours against Darts'
BlockRNNModel (LSTM, same hidden size, layers, dropout, sequence length, horizon, batch size and
past covariates), on CPU with the same thread count, one network of 64 x 1 and of 64 x 2 layers
(Darts trains one network; the default forecaster is an ensemble of networks of 32 x 1).

    python -m bench.bench_training [--samples 10240] [--repeats 5] [--threads 1] [--sizes 64x1,64x2] [--smoke]

Needs requirements-bench.txt (Darts, Lightning), unless ``--contenders ours``. The contenders
alternate in one process; the ratio is ours / Darts of the medians. Ours: one epoch of
``training.fit`` (it includes a 256-window validation pass); Darts: its Lightning training epoch
alone (trainer set-up and dataset building are not counted), on the same scaled features and
normalised target. Darts needs gap-free series, so its series are the same rows with gaps
forward-filled. ``--smoke`` times one epoch of 512 windows of each, hidden 8 x 1 layer, on a
3 x 2 store.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from bench.common import Result, chosen_contenders, command, ensure_store, load_average, machine, median, parse_arguments, run_benchmark
from latency_forecast import data, fitting, training
from latency_forecast import store as store_io  # `store` names store paths here
from latency_forecast.config import AUTO_BATCH_SIZES, DataConfig, ModelConfig, TrainingConfig

TARGET_RATIO = 2.0
VALIDATION_WINDOWS = 256
CONTENDERS = ("ours", "darts")
SMOKE = {"services": 3, "days": 2, "samples": 512, "repeats": 1, "sizes": "8x1"}


class _Ours:
    def __init__(self, table: data.SeriesTable, splits: data.Splits, model_config: ModelConfig, batch_size: int):
        settings = DataConfig()
        self.batch_size = batch_size
        forecaster = fitting.untrained_forecaster(table, splits.train, fitting.Settings(settings, model_config, TrainingConfig(device="cpu")))
        self.model, self.prepared = forecaster.model, forecaster.prepare(table)
        L, H = settings.sequence_length, settings.horizon
        self.train = data.samples_in(self.prepared.ends, table, splits.train, L, H)
        self.validation = data.samples_in(self.prepared.ends, table, splits.validation, L, H)[:VALIDATION_WINDOWS]

    def epoch(self, samples: int) -> float:
        """Samples per second of one epoch."""
        config = TrainingConfig(epochs=1, samples_per_epoch=samples, batch_size=self.batch_size, device="cpu")
        history = training.fit(self.model, self.prepared.tensors, self.train, self.validation, config, progress=False, log=lambda _: None)
        return samples / history[0]["seconds"]


class _Darts:
    """BlockRNNModel on the same scaled rows: target = normalised log latency, past covariates = features."""

    def __init__(self, table: data.SeriesTable, splits: data.Splits, model_config: ModelConfig, batch_size: int):
        from darts import TimeSeries

        # Lightning and Darts announce every fit; the timing only needs the epoch
        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "darts"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        settings = DataConfig()
        forecaster = fitting.untrained_forecaster(table, splits.train, fitting.Settings(settings, ModelConfig(), TrainingConfig(device="cpu")))
        scaled = forecaster.scaler.transform(table.features)
        target = forecaster.target_normalizer.normalize(table.target, table.service_codes)
        bounds = table.service_bounds
        self.series, self.covariates = [], []
        for code in range(len(table.services)):
            rows = slice(bounds[code], bounds[code + 1])
            index = pd.to_datetime(table.minutes[rows] * 60, unit="s")
            frame = pd.DataFrame(np.column_stack([target[rows], scaled[rows]]), index=index)
            frame = frame.reindex(pd.date_range(index[0], index[-1], freq="min")).ffill().bfill().astype(np.float32)
            self.series.append(TimeSeries.from_times_and_values(frame.index, frame.values[:, :1]))
            self.covariates.append(TimeSeries.from_times_and_values(frame.index, frame.values[:, 1:]))
        self.model_config, self.settings, self.batch_size = model_config, settings, batch_size

    def epoch(self, samples: int) -> float:
        import pytorch_lightning as pl
        from darts.models import BlockRNNModel

        class EpochTimer(pl.Callback):
            def on_train_epoch_start(self, trainer, module):
                self.started = time.perf_counter()

            def on_train_epoch_end(self, trainer, module):
                self.seconds = time.perf_counter() - self.started

        timer = EpochTimer()
        config = self.model_config
        model = BlockRNNModel(
            input_chunk_length=self.settings.sequence_length,
            output_chunk_length=1,
            output_chunk_shift=self.settings.horizon - 1,  # the one output is t+H
            model="LSTM",
            hidden_dim=config.hidden_size,
            n_rnn_layers=config.num_layers,
            hidden_fc_sizes=[config.hidden_size],  # our head's hidden layer
            dropout=config.dropout,
            batch_size=self.batch_size,
            n_epochs=1,
            random_state=0,
            pl_trainer_kwargs={
                "accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                "enable_model_summary": False, "enable_checkpointing": False, "callbacks": [timer],
            },
        )
        per_series = samples // len(self.series)
        model.fit(self.series, past_covariates=self.covariates, max_samples_per_ts=per_series, verbose=False)
        return per_series * len(self.series) / timer.seconds


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_training", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10240, help="training windows in each timed epoch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs of each contender, alternating (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads for both (default: %(default)s; 0 keeps torch's default). On a 2-core machine "
        "shared with other jobs, 2 threads make every step wait for a descheduled thread and times swing 10x",
    )
    parser.add_argument("--sizes", default="64x1,64x2", help="hidden x layers, comma-separated (default: %(default)s; one network each, as Darts trains)")
    parser.add_argument("--services", type=int, default=8, help="services in the generated store (default: %(default)s)")
    parser.add_argument("--days", type=int, default=8, help="days in the generated store (default: %(default)s)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated, among ours and darts (default: %(default)s; ours alone gives no ratio)")
    args = parse_arguments(parser, argv, SMOKE)
    names = chosen_contenders(parser, args.contenders, CONTENDERS)
    training.configure_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"machine: {machine(('numpy', 'darts', 'pytorch-lightning'))}")
    batch_size = AUTO_BATCH_SIZES[-1]  # the batch --batch-size 0 takes on large stores
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as directory:
        store = ensure_store(os.path.join(directory, "store"), args.services, args.days)
        table = store_io.load_feature_store(store)
        settings = DataConfig()
        splits = data.fraction_splits(table, settings.validation_fraction, settings.test_fraction, settings.embargo)
        for size in args.sizes.split(","):
            hidden, layers = (int(part) for part in size.split("x"))
            model_config = ModelConfig(hidden_size=hidden, num_layers=layers)
            torch.manual_seed(0)
            builders = {"ours": _Ours, "darts": _Darts}
            contenders = {name: builders[name](table, splits, model_config, batch_size) for name in names}
            torch.set_num_threads(threads)  # building a forecaster sets its own (--num-threads 0: one)
            for contender in contenders.values():  # warm-up: oneDNN builds its kernels on first use
                contender.epoch(2 * batch_size)
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            for repeat in range(args.repeats):
                for name in names if repeat % 2 == 0 else names[::-1]:
                    rates[name].append(contenders[name].epoch(args.samples))
            print(f"  {size}: " + ", ".join(f"{name} {[round(r) for r in rates[name]]}" for name in names) + " samples/s", flush=True)
            measured = f"samples/s of one epoch, hidden {hidden} x {layers} layer(s), {torch.get_num_threads()} thread(s), batch {batch_size}"
            target, where = f">= {TARGET_RATIO:g}x Darts", command("bench.bench_training", argv)
            if "ours" in rates and "darts" in rates:
                ours, darts = median(rates["ours"]), median(rates["darts"])
                ratio = ours / darts
                results.append(Result(
                    "training", f"{measured}, ratio = ours / Darts BlockRNNModel", f"{ours:,.0f} /s (Darts {darts:,.0f} /s)",
                    ratio, target, ratio >= TARGET_RATIO, where, load_average(),
                ))
            else:  # one contender: its rate, no ratio
                (name, values), = rates.items()
                label = {"ours": "ours", "darts": "Darts BlockRNNModel"}[name]
                results.append(Result(
                    "training", f"{measured}, {label} alone", f"{median(values):,.0f} /s", None, target, None, where, load_average(),
                ))
    return results


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
