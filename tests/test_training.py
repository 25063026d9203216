"""training.py: the fit loop learns, is reproducible and keeps its best epoch; a signal stops it at
the next batch and the saved state continues exactly; windows gathered by index are the right
rows; epoch orders shard one permutation; losses and devices by hand."""

import os
import signal

import numpy as np
import pytest
import torch

from latency_forecast import data, errors, training
from latency_forecast.config import ModelConfig, TrainingConfig
from latency_forecast.errors import UserError, cli_entrypoint
from latency_forecast.model import LatencyForecaster
from tests.helpers import hand_frame, table_of

POINT_ONLY = ModelConfig(hidden_size=8, quantiles="none")  # its loss is the regression loss alone


def _series(n_rows=600, n_features=3, L=6, H=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_rows, n_features, generator=generator)
    # the target at t+H is a function of the inputs at t: learnable
    target = torch.zeros(n_rows)
    target[H:] = inputs[:-H, 0] * 2.0
    codes = torch.zeros(n_rows, dtype=torch.int64)
    series = training.SeriesTensors(inputs, target, codes, L, H)
    ends = np.arange(L - 1, n_rows - H)
    return series, ends


def test_fit_learns_and_is_reproducible():
    series, ends = _series()
    train, validation = ends[:400], ends[400:]
    config = TrainingConfig(epochs=6, batch_size=32, learning_rate=1e-2, samples_per_epoch=0, seed=3, patience=10)
    results = []
    for _ in range(2):
        torch.manual_seed(config.seed)
        model = LatencyForecaster(3, 1, ModelConfig(hidden_size=8))
        history = training.fit(model, series, train, validation, config, progress=False)
        results.append((history, training.predict(model, series, validation)))
    (history, predictions), (history_again, predictions_again) = results
    assert [row["val_loss"] for row in history] == [row["val_loss"] for row in history_again]
    np.testing.assert_array_equal(predictions.forecast, predictions_again.forecast)
    np.testing.assert_array_equal(predictions.quantiles, predictions_again.quantiles)
    assert history[-1]["val_loss"] < history[0]["val_loss"] * 0.5
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "seconds"}
    assert [row["epoch"] for row in history] == list(range(1, 7))


def test_early_stopping_keeps_the_best_weights():
    series, ends = _series()
    config = TrainingConfig(epochs=30, batch_size=64, learning_rate=5e-2, samples_per_epoch=0, patience=2, seed=0)
    torch.manual_seed(0)
    model = LatencyForecaster(3, 1, POINT_ONLY)
    history = training.fit(model, series, ends[:50], ends[400:], config, progress=False)  # tiny train set overfits
    best = min(row["val_loss"] for row in history)
    assert len(history) < 30
    assert len(history) - 1 - int(np.argmin([row["val_loss"] for row in history])) == config.patience, "stopped after 2 stale epochs"
    loss = training._loss_function(config)
    windows, services, target = series.batch(torch.as_tensor(ends[400:]))
    with torch.no_grad():
        assert float(loss(model(windows, services), target, target > training.SPIKE_Z)) == pytest.approx(best, rel=1e-5)


def test_a_signal_stops_fit_at_the_next_batch_and_its_saved_state_continues_exactly(tmp_path):
    series, ends = _series()
    train, validation = ends[:400], ends[400:]
    config = TrainingConfig(epochs=3, batch_size=32, samples_per_epoch=0, seed=3, patience=10)  # 13 batches an epoch

    def seeded_model() -> LatencyForecaster:  # with dropout, so each batch draws from torch's RNG
        torch.manual_seed(config.seed)
        return LatencyForecaster(3, 1, ModelConfig(hidden_size=8, num_layers=2, dropout=0.3))

    reference = seeded_model()
    history = training.fit(reference, series, train, validation, config, progress=False)

    interrupted, batches = seeded_model(), []

    def sigterm_in_batch_18(module, inputs):  # the 5th batch of the second epoch
        batches.append(module.training)
        if batches.count(True) == 18:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted.register_forward_pre_hook(sigterm_in_batch_18)
    resume = training.ResumeFile(str(tmp_path / "state.pt"), "this run")

    @cli_entrypoint
    def main(argv=None):
        errors.stop_on_signals("rerun with --resume")
        training.fit(interrupted, series, train, validation, config, progress=False, resume=resume)
        return 0

    assert main([]) == errors.EXIT_TERMINATED == 143
    assert batches.count(True) == 18, "stopped at the next batch boundary, not later"
    state = torch.load(resume.path, weights_only=True)
    assert (state["epoch"], state["batch"], state["finished"]) == (1, 5, False)

    resumed = seeded_model()  # as a new process builds it: other weights, the RNG elsewhere
    resumed_history = training.fit(resumed, series, train, validation, config, progress=False, resume=resume)
    assert [{**row, "seconds": 0} for row in resumed_history] == [{**row, "seconds": 0} for row in history]
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in resumed.state_dict().items())


def test_loss_by_hand():
    prediction, target = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.5, 2.0, 4.0])
    spike = torch.tensor([False, False, True])
    # huber (delta 1): 0.125, 1.5, 3.5; the spike weighs 1 + 3
    huber = training._loss_function(TrainingConfig(spike_weight=3.0))
    assert float(huber(prediction, target, spike)) == pytest.approx((0.125 + 1.5 + 4 * 3.5) / 6)
    mse = training._loss_function(TrainingConfig(loss="mse", spike_weight=0.0))
    assert float(mse(prediction, target, spike)) == pytest.approx((0.25 + 4.0 + 16.0) / 3)
    # pinball at levels 0.1 and 0.9 of a forecast 1.0 against target 2.0 (under by 1) and 0.0 (over by 1)
    pinball = training.pinball_loss(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([2.0, 0.0]), torch.tensor([0.1, 0.9]))
    assert float(pinball) == pytest.approx((0.1 + 0.9 + 0.9 + 0.1) / 4)


def test_predict_returns_every_output_and_nothing_for_no_samples():
    series, ends = _series()
    model = LatencyForecaster(3, 1, ModelConfig(hidden_size=8, multitask=True, quantiles="0.5,0.9"))
    predictions = training.predict(model, series, ends[:10], batch_size=4)  # three batches, joined
    assert predictions.forecast.shape == (10,) and predictions.quantiles.shape == (10, 2) and predictions.probability.shape == (10,)
    assert ((predictions.probability > 0) & (predictions.probability < 1)).all()
    whole = training.predict(model, series, ends[:10])
    np.testing.assert_allclose(predictions.forecast, whole.forecast, rtol=1e-6)
    empty = training.predict(model, series, ends[:0])
    assert empty.forecast.shape == (0,) and empty.quantiles.shape == (0, 2) and empty.probability.shape == (0,)
    assert training.predict(LatencyForecaster(3, 1, POINT_ONLY), series, ends[:3]).quantiles is None


def test_windows_gather_the_right_rows(tmp_path):
    table = table_of(hand_frame(services=("a", "b"), minutes=20), tmp_path, feature_columns=["cpu"])
    ends, _ = data.window_ends(table, 4, 2)
    windows = training.gather_windows(table.features, ends, 4)
    assert windows.shape == (len(ends), 4, 1)
    # hand_frame's feature is the minute index: each window is 4 consecutive minutes ending at t
    assert (windows[:, -1, 0] - windows[:, 0, 0] == 3).all()
    assert (table.target[ends + 2] - table.target[ends] == 2).all(), "target is t+H of the same service"
    series = training.SeriesTensors(
        torch.from_numpy(table.features), torch.from_numpy(table.target), torch.from_numpy(table.service_codes), 4, 2
    )
    batch_windows, services, target = series.batch(torch.as_tensor(ends))
    np.testing.assert_array_equal(batch_windows.numpy(), windows)
    np.testing.assert_array_equal(services.numpy(), table.service_codes[ends])
    np.testing.assert_array_equal(target.numpy(), table.target[ends + 2])
    np.testing.assert_array_equal(series.current(torch.as_tensor(ends)).numpy(), table.target[ends])


def test_epoch_order_shards_partition_one_permutation():
    full = training.epoch_order(103, epoch=2, seed=5)
    shards = [training.epoch_order(103, epoch=2, seed=5, rank=r, world_size=4) for r in range(4)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103))
    assert torch.equal(shards[1], full[1::4])
    assert not torch.equal(training.epoch_order(103, 3, 5), full), "a new order each epoch"
    assert torch.equal(training.epoch_order(103, 2, 5), full), "the same seed and epoch, the same order"
    assert len(training.epoch_order(103, 2, 5, limit=10)) == 10


def test_devices():
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda but no CUDA device is visible"):
            training.resolve_device("cuda")


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_training_sequences_cover_every_end_once_and_never_span_a_missing_one(offset):
    ends = np.array([3, 4, 5, 6, 7, 8, 20, 21, 22, 40, 41, 42, 43, 44, 45, 46])
    first, counts = training.training_sequences(ends[::-1], 4, offset)  # any order in
    covered = np.concatenate([np.arange(start, start + count) for start, count in zip(first, counts)])
    np.testing.assert_array_equal(np.sort(covered), ends)  # each end exactly once: every step is an end
    assert counts.max() <= 4 and counts.min() >= 1
    single, ones = training.training_sequences(ends, 1)
    np.testing.assert_array_equal(single, ends)
    assert (ones == 1).all()


def test_a_sequence_forecasts_each_step_from_its_past_only():
    """The first step of a sequence is the forecast of the window ending there; a step never reads
    the minutes after it; differenced latency history does not depend on the step."""
    torch.manual_seed(0)
    model = LatencyForecaster(3, 2, ModelConfig(hidden_size=8), anchored=True, relative_column=0, differenced=True).eval()
    L, steps = 5, 4
    sequence = torch.randn(2, L + steps - 1, 3)
    codes, current = torch.tensor([0, 1]), torch.randn(2, steps)
    with torch.no_grad():
        each = model(sequence, codes, current, full=True, steps=steps)
        alone = model(sequence[:, :L], codes, current[:, 0], full=True)
        torch.testing.assert_close(each.forecast[:, 0], alone.forecast)
        torch.testing.assert_close(each.quantiles[:, 0], alone.quantiles)
        later = sequence.clone()
        later[:, L + 1 :] += 100.0  # the minutes after step 1
        changed = model(later, codes, current, steps=steps)
    torch.testing.assert_close(changed[:, :2], each.forecast[:, :2])
    assert not torch.allclose(changed[:, 2:], each.forecast[:, 2:])


def test_sequence_training_learns_and_masks_what_it_must_not_read():
    series, ends = _series()
    series.inputs[300] = float("nan")  # a missing row: sequences end before it (the ends exclude it)
    valid = ends[(ends < 300) | (ends >= 300 + series.sequence_length)]
    train, validation = valid[valid < 400], valid[valid >= 400]
    config = TrainingConfig(epochs=8, batch_size=2, learning_rate=1e-2, samples_per_epoch=0, seed=3, patience=10, targets_per_sequence=8)
    torch.manual_seed(config.seed)
    model = LatencyForecaster(3, 1, ModelConfig(hidden_size=8))
    history = training.fit(model, series, train, validation, config, progress=False)
    assert all(np.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"] * 0.5


def test_the_validation_loss_over_sequences_weighs_every_sample_once():
    series, ends = _series()
    config = TrainingConfig(targets_per_sequence=4)
    loss, levels = training._loss_function(config), None
    torch.manual_seed(0)
    model = LatencyForecaster(3, 1, POINT_ONLY)
    apart = ends[::2]  # no two consecutive: every sequence is one window, its first step
    first, counts = training.training_sequences(apart, 4)
    assert (counts == 1).all()
    windows = training._mean_loss(model, series, torch.as_tensor(apart), loss, config, levels)
    sequences = training._mean_loss(model, series, torch.as_tensor(first), loss, config, levels, torch.as_tensor(counts))
    assert sequences == pytest.approx(windows, rel=1e-5)
    first, counts = training.training_sequences(ends, 4)
    whole = training._mean_loss(model, series, torch.as_tensor(first), loss, config, levels, torch.as_tensor(counts))
    assert whole == pytest.approx(training._mean_loss(model, series, torch.as_tensor(ends), loss, config, levels), rel=0.05)


def test_a_median_anchor_reads_the_last_minutes_up_to_t_and_skips_missing_ones():
    target = torch.tensor([1.0, 9.0, 2.0, 3.0, float("nan"), 7.0, 100.0, 100.0])
    series = training.SeriesTensors(torch.zeros(8, 1), target, torch.zeros(8, dtype=torch.int64), 5, 2, anchor_minutes=3)
    # (latency at t, median of the last 3 minutes): rows 1..3 hold 9, 2, 3 -> 3; rows 3..5 hold
    # 3, NaN, 7 -> the lower median of 3 and 7; nothing after t is read
    np.testing.assert_array_equal(series.current(torch.tensor([3, 5])).numpy(), [[3.0, 3.0], [7.0, 3.0]])
    # sequence training asks for (batch, steps) anchors
    assert series.current(torch.tensor([[3, 5], [4, 5]])).shape == (2, 2, 2)
    at_t = training.SeriesTensors(torch.zeros(8, 1), target, torch.zeros(8, dtype=torch.int64), 5, 2)
    np.testing.assert_array_equal(at_t.current(torch.tensor([3, 5])).numpy(), [3.0, 7.0])
