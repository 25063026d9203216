"""model.py: the recurrent forecaster's shapes, its two-part head and quantiles checked by hand,
anchoring on the latency at t, a model that reads only some input columns, and an ensemble."""

import math

import pytest
import torch

from latency_forecast.config import ModelConfig
from latency_forecast.model import Ensemble, LatencyForecaster


def _set_head(model, bias):
    """The network's last layer outputs ``bias`` whatever the window: its outputs are known by hand."""
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor(bias))
    return model.eval()


def test_shapes_for_both_cells_with_and_without_embedding():
    for cell in ("lstm", "gru"):
        model = LatencyForecaster(4, 3, ModelConfig(cell=cell, hidden_size=8, num_layers=2))
        out = model(torch.randn(5, 7, 4), torch.tensor([0, 1, 2, 0, 1]))
        assert out.shape == (5,)
        assert isinstance(model.rnn, torch.nn.LSTM if cell == "lstm" else torch.nn.GRU) and model.rnn.num_layers == 2
    no_embedding = LatencyForecaster(4, 3, ModelConfig(service_embedding_dim=0, hidden_size=8))
    assert no_embedding.embedding is None
    assert no_embedding(torch.randn(2, 3, 4), torch.tensor([0, 1])).shape == (2,)
    full = LatencyForecaster(4, 3, ModelConfig(hidden_size=8, quantiles="0.1,0.5,0.9", multitask=True))(
        torch.randn(5, 7, 4), torch.tensor([0, 1, 2, 0, 1]), full=True
    )
    assert full.forecast.shape == (5,) and full.quantiles.shape == (5, 3) and full.breach_logit.shape == (5,)


def test_head_mixes_relative_and_absolute_latency_by_hand():
    # service 0: location 3.0, scale 0.5; pooled (4.0, 1.0); outputs r = 1.0, a = -1.0
    model = LatencyForecaster(2, 1, ModelConfig(hidden_size=4, dropout=0.0, quantiles="none"), [3.0], [0.5], (4.0, 1.0))
    _set_head(model, [1.0, -1.0])
    relative, absolute = 3.0 + 0.5 * 1.0, 4.0 + 1.0 * -1.0  # 3.5 and 3.0, in log milliseconds
    expected = (math.log(math.exp(relative) + math.exp(absolute)) - 3.0) / 0.5  # = 1.948154...
    forecast = model(torch.randn(3, 5, 2), torch.zeros(3, dtype=torch.int64))
    torch.testing.assert_close(forecast, torch.full((3,), expected))
    assert expected == pytest.approx(1.948154, abs=1e-6)


def test_quantiles_sit_on_the_forecast_and_never_cross_by_hand():
    model = LatencyForecaster(2, 1, ModelConfig(hidden_size=4, dropout=0.0, quantiles="0.5,0.9", multitask=True), [3.0], [0.5], (4.0, 1.0))
    _set_head(model, [1.0, -40.0, 0.2, -1.0, 0.7])
    outputs = model(torch.randn(2, 5, 2), torch.zeros(2, dtype=torch.int64), full=True)
    forecast = (3.0 + 0.5 - 3.0) / 0.5 + 0.0  # the absolute part e^(4 - 40) vanishes: 1.0
    torch.testing.assert_close(outputs.forecast, torch.full((2,), forecast))
    softplus = math.log(1 + math.exp(-1.0))  # 0.313262
    torch.testing.assert_close(outputs.quantiles, torch.tensor([[forecast + 0.2, forecast + 0.2 + softplus]] * 2))
    torch.testing.assert_close(outputs.breach_logit, torch.full((2,), 0.7))
    assert model.quantile_levels.tolist() == pytest.approx([0.5, 0.9])
    # whatever the weights, the quantiles are ordered
    torch.manual_seed(0)
    random = LatencyForecaster(3, 2, ModelConfig(hidden_size=6, quantiles="0.1,0.5,0.9"))
    quantiles = random(torch.randn(64, 5, 3) * 3, torch.randint(0, 2, (64,)), full=True).quantiles
    assert (quantiles[:, 1:] >= quantiles[:, :-1]).all()


def test_anchored_model_forecasts_the_change_from_the_latency_at_t():
    torch.manual_seed(0)
    model = LatencyForecaster(2, 2, ModelConfig(hidden_size=4, dropout=0.0, quantiles="none"), [3.0, 5.0], [0.5, 0.2], (4.0, 1.0), anchored=True)
    _set_head(model, [0.0, -40.0])  # the network says "no change" and "no extra milliseconds"
    current = torch.tensor([-1.0, 0.0, 2.5])
    forecast = model(torch.randn(3, 6, 2), torch.tensor([0, 1, 1]), current)
    torch.testing.assert_close(forecast, current)  # persistence, in the standardised units
    with pytest.raises(ValueError, match="pass current"):
        model(torch.randn(3, 6, 2), torch.tensor([0, 1, 1]))


def test_a_model_of_some_columns_never_reads_the_others():
    torch.manual_seed(0)
    model = LatencyForecaster(2, 1, ModelConfig(hidden_size=4), input_columns=[0, 2]).eval()
    windows = torch.randn(4, 5, 3)
    changed = windows.clone()
    changed[:, :, 1] = 1e6  # the column it does not read
    codes = torch.zeros(4, dtype=torch.int64)
    torch.testing.assert_close(model(changed, codes), model(windows, codes), rtol=0, atol=0)
    changed[:, :, 2] += 1.0
    assert not torch.equal(model(changed, codes), model(windows, codes))
    with pytest.raises(ValueError, match="3 input columns for a model of 2 features"):
        LatencyForecaster(2, 1, ModelConfig(hidden_size=4), input_columns=[0, 1, 2])


def test_an_ensemble_averages_its_networks_outputs_and_its_quantiles_never_cross():
    settings = ModelConfig(hidden_size=4, dropout=0.0, quantiles="0.5,0.9", multitask=True)
    # point 1 and 3 (relative part), quantile steps that differ, breach logits 0 and 2
    first = _set_head(LatencyForecaster(2, 1, settings), [1.0, -50.0, 0.0, -1.0, 0.0])
    second = _set_head(LatencyForecaster(2, 1, settings), [3.0, -50.0, 1.0, 2.0, 2.0])
    ensemble = Ensemble([first, second]).eval()
    windows, codes = torch.randn(3, 4, 2), torch.tensor([0, 0, 0])
    torch.testing.assert_close(ensemble(windows, codes), torch.full((3,), 2.0))
    full = ensemble(windows, codes, full=True)
    a, b = first(windows, codes, full=True), second(windows, codes, full=True)
    torch.testing.assert_close(full.quantiles, (a.quantiles + b.quantiles) / 2)
    torch.testing.assert_close(full.breach_logit, torch.full((3,), 1.0))
    assert bool((full.quantiles[:, 1] >= full.quantiles[:, 0]).all())
    each = ensemble(windows, codes, members=True)
    assert each.forecast.shape == (2, 3) and each.quantiles.shape == (2, 3, 2) and each.breach_logit.shape == (2, 3)
    one = first(windows, codes, members=True)
    assert one.forecast.shape == (1, 3) and one.quantiles.shape == (1, 3, 2)
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([first])


def test_a_relative_latency_history_reads_the_shape_of_the_history_not_its_level():
    torch.manual_seed(0)
    model = LatencyForecaster(3, 2, ModelConfig(hidden_size=8), anchored=True, relative_column=1).eval()
    windows, services, current = torch.randn(5, 6, 3), torch.tensor([0, 1, 0, 1, 0]), torch.randn(5)
    moved = windows.clone()
    moved[..., 1] += 2.5  # the same history at another level
    torch.testing.assert_close(model(moved, services, current), model(windows, services, current))
    other = windows.clone()
    other[:, 0, 1] += 2.5  # another shape
    assert not torch.allclose(model(other, services, current), model(windows, services, current))
    with pytest.raises(ValueError, match="only an anchored model"):
        LatencyForecaster(3, 2, ModelConfig(hidden_size=8), relative_column=1)


def test_a_median_anchored_history_is_read_relative_to_the_median_minute():
    """The relative history is zero at the minute whose latency the median anchor took, so a
    one-minute spike at t moves neither that reference nor the rest of the history's reading."""
    torch.manual_seed(0)
    model = LatencyForecaster(2, 1, ModelConfig(hidden_size=8, anchor_minutes=3), anchored=True, relative_column=1).eval()
    seen = []
    model.rnn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    windows = torch.tensor([[[0.0, 5.0], [0.0, 1.0], [0.0, 2.0], [0.0, 9.0]]])  # the last 3 minutes: 1, 2, 9 -> 2
    model(windows, torch.tensor([0]), torch.tensor([[9.0, 2.0]]))
    torch.testing.assert_close(seen[0][0, :, 1], torch.tensor([3.0, -1.0, 0.0, 7.0]))


@pytest.mark.parametrize("gate, expected", [(30.0, 1.5), (-30.0, -0.5), (0.0, 0.5)])
def test_a_median_anchored_model_starts_from_its_gated_mix_of_the_latency_at_t_and_the_median(gate, expected):
    """current = (latency at t, recent median) = (1.5, -0.5): the gate (the head's last output)
    picks the latency at t, the median, or their mean; the change output adds to that."""
    config = ModelConfig(hidden_size=4, anchor_minutes=3, quantiles="none", service_embedding_dim=0)
    model = _set_head(LatencyForecaster(2, 1, config, anchored=True), [0.0, -1e4, gate])
    forecast = model(torch.zeros(1, 4, 2), torch.tensor([0]), torch.tensor([[1.5, -0.5]]))
    torch.testing.assert_close(forecast, torch.tensor([expected]))
