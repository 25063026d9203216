"""background.py: the explanation background is built from training windows only, summarises
each service (and all of them pooled), and round-trips through a weights_only checkpoint."""

import numpy as np
import pytest
import torch

from latency_forecast import training
from latency_forecast.background import POOLED, Background, build_background


def test_background_is_built_from_training_windows_only(tiny_fit):
    trained, prepared, ends = tiny_fit.forecaster, tiny_fit.prepared, tiny_fit.ends
    n_services = len(trained.services)
    background = build_background(prepared.tensors, ends["train"], n_services, 4, seed=3, pool=200)
    # poison every row that no training window reads: the background must not change
    used = np.zeros(len(prepared.table), dtype=bool)
    for offset in range(prepared.tensors.sequence_length):
        used[ends["train"] - offset] = True
    poisoned = training.SeriesTensors(
        torch.where(torch.from_numpy(used)[:, None], prepared.tensors.inputs, torch.tensor(1e6)),
        prepared.tensors.target, prepared.tensors.service_codes, prepared.tensors.sequence_length, prepared.tensors.horizon,
    )
    again = build_background(poisoned, ends["train"], n_services, 4, seed=3, pool=200)
    np.testing.assert_array_equal(again.windows, background.windows)
    np.testing.assert_array_equal(again.weights, background.weights)
    assert np.abs(background.windows).max() < 1e3
    # one block per service plus the pooled one, weights summing to 1 in each
    for code in [*range(n_services), POOLED]:
        windows, weights = background.of_service(code)
        assert len(windows) == 4 and weights.sum() == pytest.approx(1.0)
    # with room for all of them, the background is exactly the service's training windows
    few = ends["train"][prepared.tensors.service_codes[ends["train"]].numpy() == 0][:3]
    exact = build_background(prepared.tensors, few, n_services, 10, seed=0)
    np.testing.assert_array_equal(exact.of_service(0)[0], prepared.tensors.batch(torch.as_tensor(few))[0].numpy())


def test_background_round_trips_through_a_weights_only_checkpoint(tiny_fit, tmp_path):
    trained, prepared, ends = tiny_fit.forecaster, tiny_fit.prepared, tiny_fit.ends
    background = build_background(prepared.tensors, ends["train"], len(trained.services), 3, seed=0, pool=200)
    torch.save({"explain_background": background.state()}, tmp_path / "c.pt")
    loaded = Background.from_state(torch.load(tmp_path / "c.pt", weights_only=True)["explain_background"])
    np.testing.assert_array_equal(loaded.windows, background.windows)
    np.testing.assert_array_equal(loaded.weights, background.weights)
    np.testing.assert_array_equal(loaded.service_codes, background.service_codes)
    assert loaded.description == background.description
