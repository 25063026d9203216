import numpy as np
import pytest
import torch

from latency_forecast import training
from latency_forecast.config import ModelConfig, TrainingConfig
from latency_forecast.model import LatencyForecaster


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


def test_model_shapes_for_both_cells():
    for cell in ("lstm", "gru"):
        model = LatencyForecaster(4, 3, ModelConfig(cell=cell, hidden_size=8, num_layers=2))
        out = model(torch.randn(5, 7, 4), torch.tensor([0, 1, 2, 0, 1]))
        assert out.shape == (5,)
    no_embedding = LatencyForecaster(4, 3, ModelConfig(service_embedding_dim=0, hidden_size=8))
    assert no_embedding(torch.randn(2, 3, 4), torch.tensor([0, 1])).shape == (2,)


def test_anchored_model_forecasts_the_change_from_the_latency_at_t():
    torch.manual_seed(0)
    model = LatencyForecaster(2, 2, ModelConfig(hidden_size=4, dropout=0.0), [3.0, 5.0], [0.5, 0.2], (4.0, 1.0), anchored=True).eval()
    with torch.no_grad():  # the network says "no change" and "no extra milliseconds"
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([0.0, -40.0]))
    current = torch.tensor([-1.0, 0.0, 2.5])
    forecast = model(torch.randn(3, 6, 2), torch.tensor([0, 1, 1]), current)
    torch.testing.assert_close(forecast, current)  # persistence, in the standardised units
    with pytest.raises(ValueError, match="pass current"):
        model(torch.randn(3, 6, 2), torch.tensor([0, 1, 1]))


def test_fit_learns_and_is_reproducible():
    series, ends = _series()
    train, validation = ends[:400], ends[400:]
    config = TrainingConfig(epochs=6, batch_size=32, learning_rate=1e-2, samples_per_epoch=0, seed=3, patience=10)
    results = []
    for _ in range(2):
        torch.manual_seed(config.seed)
        model = LatencyForecaster(3, 1, ModelConfig(hidden_size=8))
        history = training.fit(model, series, train, validation, config, progress=False)
        results.append((history, training.predict(model, series, validation)[0]))
    (history, predictions), (history_again, predictions_again) = results
    assert [row["val_loss"] for row in history] == [row["val_loss"] for row in history_again]
    np.testing.assert_array_equal(predictions, predictions_again)
    assert history[-1]["val_loss"] < history[0]["val_loss"] * 0.5
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "seconds"}


def test_early_stopping_keeps_the_best_weights():
    series, ends = _series()
    config = TrainingConfig(epochs=30, batch_size=64, learning_rate=5e-2, samples_per_epoch=0, patience=2, seed=0)
    torch.manual_seed(0)
    model = LatencyForecaster(3, 1, ModelConfig(hidden_size=8))
    history = training.fit(model, series, ends[:50], ends[400:], config, progress=False)  # tiny train set overfits
    best = min(row["val_loss"] for row in history)
    assert len(history) < 30
    loss = training._loss_function(config)
    windows, services, target = series.batch(torch.as_tensor(ends[400:]))
    with torch.no_grad():
        assert float(loss(model(windows, services), target)) == pytest_approx(best)


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-5)


def test_epoch_order_shards_partition_one_permutation():
    full = training.epoch_order(103, epoch=2, seed=5)
    shards = [training.epoch_order(103, epoch=2, seed=5, rank=r, world_size=4) for r in range(4)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103))
    assert torch.equal(shards[1], full[1::4])
    assert not torch.equal(training.epoch_order(103, 3, 5), full), "a new order each epoch"
    assert len(training.epoch_order(103, 2, 5, limit=10)) == 10
