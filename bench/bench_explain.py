"""Cost of one explained window: grouped exact Shapley (one player per feature, explain.py) against
shap's flat KernelExplainer over the L x F inputs at its default nsamples, on the same model,
windows and background, in one run, at F = 3 and F = 8 (default model and background settings).
The model is one network of the default size, as the cause model that train.py's default features
(the latency's own history among them) are explained through; ``--ensemble-size 3`` explains the
default ensemble that a forecaster of telemetry features alone trains, and is explained as.

    python -m bench.bench_explain [--windows 64] [--flat-windows 3] [--repeats 5] [--threads N] [--smoke]

Prints the machine, then medians in ms per window. Timings on a shared machine are noisy:
compare the ratios, which are measured back to back in one process. ``--smoke`` explains 4
windows (1 flat) once, on a 3 x 2 store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
import shap
import torch
from shap.utils._legacy import DenseData

from bench.common import Result, command, ensure_store, load_average, machine, parse_arguments, run_benchmark
from latency_forecast import data, explain, fitting, synthetic
from latency_forecast import store as store_io  # `store` names store paths here
from latency_forecast.config import BaselineConfig, DataConfig, ExplainConfig, ImportanceConfig, ModelConfig, TrainingConfig

FEATURES = {
    3: ["cpu_rolling_avg", "path_depth", "fan_out"],
    8: [name for name in synthetic.FEATURE_COLUMNS if name != "node_cpu_cores"],
}
SMOKE = {"services": 3, "days": 2, "samples_per_epoch": 512, "windows": 4, "flat_windows": 1, "repeats": 1}


def _trained(store: str, features: list[str], samples_per_epoch: int, ensemble_size: int) -> fitting.Trained:
    """A forecaster of telemetry features alone (a level model, explained directly, as a cause
    model is), with its explanation background, from the one training step; one brief epoch
    (costs do not depend on the weights)."""
    table = store_io.load_feature_store(store, features)
    data_config = DataConfig(feature_columns=features)
    splits = data.fraction_splits(table, data_config.validation_fraction, data_config.test_fraction, data_config.embargo)
    settings = fitting.Settings(
        data_config, ModelConfig(ensemble_size=ensemble_size), TrainingConfig(epochs=1, samples_per_epoch=samples_per_epoch, device="cpu"),
        baseline=BaselineConfig(baselines="persistence"), importance=ImportanceConfig(),
    )
    return fitting.train(table, splits.train, splits.validation, settings, progress=False, log=lambda _: None)


def _median_ms(seconds: Sequence[float], per: int = 1) -> float:
    return 1e3 * statistics.median(seconds) / per


def run(n_features: int, store: str, n_windows: int, n_flat: int, repeats: int, samples_per_epoch: int, ensemble_size: int) -> dict:
    trained = _trained(store, FEATURES[n_features], samples_per_epoch, ensemble_size)
    forecaster, prepared, validation_ends = trained.forecaster, trained.prepared, trained.samples["validation"]
    L = forecaster.data_config.sequence_length
    background = forecaster.require_background("the benchmark's forecaster")
    # the windows of one service with the highest forecasts: the spikes an SRE would ask about
    code = int(np.bincount(prepared.tensors.service_codes[validation_ends].numpy()).argmax())
    mine = validation_ends[prepared.tensors.service_codes[validation_ends].numpy() == code]
    ends = np.sort(mine[np.argsort(-forecaster.predict(prepared, mine).ms)[:n_windows]])
    windows = prepared.tensors.batch(torch.as_tensor(ends))[0].numpy()
    reference, weights = background.of_service(code)
    model, normalizer, config = forecaster.explained_model, forecaster.target_normalizer, ExplainConfig()

    batched, single = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        values, base, outputs, exact = explain.explain_service(model, normalizer, windows, code, reference, weights, config)
        batched.append(time.perf_counter() - started)
    for i in range(min(repeats, n_windows)):
        started = time.perf_counter()
        explain.explain_service(model, normalizer, windows[i : i + 1], code, reference, weights, config)
        single.append(time.perf_counter() - started)
    assert exact and np.allclose(base + values.sum(1), outputs, rtol=1e-6, atol=1e-6)

    flat_shape = windows.shape[1:]

    def flat_model(flat: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(flat.reshape(-1, *flat_shape).astype(np.float32))
        return explain.forecast_windows(model, normalizer, batch, code)

    names = [f"{feature}@t{step - L + 1}" for step in range(L) for feature in FEATURES[n_features]]
    flat_background = DenseData(reference.reshape(len(reference), -1).astype(np.float64), names, None, weights.copy())
    flat_explainer = shap.KernelExplainer(flat_model, flat_background)
    flat, agree = [], []
    for i in range(min(n_flat, n_windows)):
        started = time.perf_counter()
        flat_values = flat_explainer.shap_values(windows[i].reshape(1, -1).astype(np.float64), silent=True)[0]
        flat.append(time.perf_counter() - started)
        per_feature = np.asarray(flat_values).reshape(L, n_features).sum(0)
        agree.append(per_feature.argmax() == values[i].argmax())
    result = {
        "F": n_features,
        "players": n_features,
        "coalitions": 2**n_features,
        "background": len(reference),
        "grouped_batched_ms": _median_ms(batched, n_windows),
        "grouped_single_ms": _median_ms(single),
        "flat_ms": _median_ms(flat),
        "flat_inputs": L * n_features,
        "top_feature_agreement": float(np.mean(agree)),
    }
    result["speedup_batched"] = result["flat_ms"] / result["grouped_batched_ms"]
    result["speedup_single"] = result["flat_ms"] / result["grouped_single_ms"]
    return result


TARGET_SPEEDUP = {3: 100.0, 8: 5.0}  # grouped exact Shapley against the flat KernelExplainer
TARGET_MS_AT_8 = 50.0  # ms per window at F = 8


def measure(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_explain", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64, help="windows explained together by the grouped explainer (default: %(default)s)")
    parser.add_argument("--flat-windows", type=int, default=3, help="windows explained by the flat KernelExplainer (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of the grouped explanation (default: %(default)s)")
    parser.add_argument("--features", default="3,8", help="comma-separated F values among 3 and 8 (default: %(default)s)")
    parser.add_argument("--services", type=int, default=8, help="services in the generated store (default: %(default)s)")
    parser.add_argument("--days", type=int, default=8, help="days in the generated store (default: %(default)s)")
    parser.add_argument("--samples-per-epoch", type=int, default=4000,
                        help="windows of the model's one training epoch (default: %(default)s; costs do not depend on the weights)")
    parser.add_argument(
        "--ensemble-size", type=int, default=1,
        help="networks of the explained model (default: %(default)s, the cause model's; 3: the default ensemble "
        "of a forecaster of telemetry alone, each network another forward pass per coalition)",
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default: %(default)s; 0 keeps torch's default): on a machine shared with other "
        "jobs, more threads wait for each other",
    )
    args = parse_arguments(parser, argv, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as directory:
        store = ensure_store(os.path.join(directory, "store"), args.services, args.days)
        results = [
            run(int(f), store, args.windows, args.flat_windows, args.repeats, args.samples_per_epoch, args.ensemble_size)
            for f in args.features.split(",")
        ]
    print(
        f"{'F':>3} {'coalitions':>10} {'background':>10} {'grouped, batched':>17} {'grouped, 1 window':>18} "
        f"{'flat (L*F inputs)':>18} {'speedup':>8} {'(1 window)':>10} {'same top':>9}"
    )
    for r in results:
        print(
            f"{r['F']:>3} {r['coalitions']:>10} {r['background']:>10} {r['grouped_batched_ms']:>14.2f} ms "
            f"{r['grouped_single_ms']:>15.2f} ms {r['flat_ms']:>15.0f} ms {r['speedup_batched']:>7.0f}x "
            f"{r['speedup_single']:>9.0f}x {r['top_feature_agreement']:>9.2f}"
        )
    print(f"load average after: {load_average()}")
    print(
        "ms per explained window, medians. grouped: exact Shapley, one player per feature over all "
        f"{DataConfig().sequence_length} minutes, windows of one service explained together (batched) or alone; "
        "flat: shap.KernelExplainer over every (minute, feature) input at its default nsamples and l1_reg; "
        "same model, windows and weighted background. 'same top': share of windows whose top feature "
        "(flat values summed over minutes) is the grouped top feature."
    )
    where, load = command("bench.bench_explain", argv), load_average()
    rows = []
    for r in results:
        value = f"{r['grouped_batched_ms']:.2f} ms/window ({r['grouped_single_ms']:.1f} alone; flat {r['flat_ms']:.0f} ms)"
        target = TARGET_SPEEDUP.get(r["F"])
        rows.append(Result(
            "explanations", f"F = {r['F']}: ms per window, ratio = flat KernelExplainer / grouped exact Shapley (batched)",
            value, r["speedup_batched"], f">= {target:g}x" if target else "none set",
            r["speedup_batched"] >= target if target else None, where, load,
        ))
        if r["F"] == 8:
            rows.append(Result(
                "explanations", "F = 8: ms per window, grouped exact Shapley (batched)", f"{r['grouped_batched_ms']:.2f} ms",
                None, f"<= {TARGET_MS_AT_8:g} ms", r["grouped_batched_ms"] <= TARGET_MS_AT_8, where, load,
            ))
    return rows


if __name__ == "__main__":
    sys.exit(run_benchmark(measure))
