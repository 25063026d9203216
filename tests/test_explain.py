"""Shapley attributions: exact against brute force, additive, null players, training-only background."""

import itertools
import math

import numpy as np
import pytest
import torch

from latency_forecast.background import build_background
from latency_forecast import explain, forecaster, training
from latency_forecast.config import ExplainConfig, ModelConfig
from latency_forecast.scaling import TargetNormalizer
from latency_forecast.model import LatencyForecaster


def _tiny_model(n_features: int, n_services: int = 2, seed: int = 0) -> tuple[LatencyForecaster, TargetNormalizer]:
    torch.manual_seed(seed)
    normalizer = TargetNormalizer(np.log1p([40.0, 300.0]), np.array([0.4, 0.7]), (4.0, 1.0), 9.0)
    model = LatencyForecaster(n_features, n_services, ModelConfig(hidden_size=6, dropout=0.0), normalizer.location, normalizer.scale, normalizer.pooled)
    with torch.no_grad():  # larger weights: a visibly non-linear, interacting model
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model.eval(), normalizer


def _brute_force(model, normalizer, window, code, background, weights):
    """Shapley values by the formula over all subsets, with its own masking (one batched call)."""
    n_features = window.shape[-1]
    subsets = [s for size in range(n_features + 1) for s in itertools.combinations(range(n_features), size)]
    mixed = np.repeat(background[None], len(subsets), axis=0)  # (subsets, K, L, F)
    for i, subset in enumerate(subsets):
        mixed[i][:, :, list(subset)] = window[None, :, list(subset)]
    flat = mixed.reshape(-1, *window.shape)
    with torch.no_grad():
        z = model(torch.from_numpy(flat), torch.full((len(flat),), code)).numpy()
    ms = normalizer.denormalize(z, np.full(len(flat), code)).reshape(len(subsets), len(background))
    value = dict(zip(subsets, ms @ weights))
    phi = np.zeros(n_features)
    for i in range(n_features):
        others = [j for j in range(n_features) if j != i]
        for size in range(n_features):
            for subset in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n_features - size - 1) / math.factorial(n_features)
                phi[i] += weight * (value[tuple(sorted(subset + (i,)))] - value[subset])
    return phi, value[()]


@pytest.mark.parametrize("n_features", [3, 4])
def test_grouped_shapley_is_exact_against_brute_force(rng, n_features):
    model, normalizer = _tiny_model(n_features)
    windows = rng.normal(0, 1.5, (3, 5, n_features)).astype(np.float32)
    background = rng.normal(0, 1, (4, 5, n_features)).astype(np.float32)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    values, base, outputs, exact = explain.explain_service(model, normalizer, windows, 1, background, weights, ExplainConfig())
    assert exact
    for i, window in enumerate(windows):
        expected, empty = _brute_force(model, normalizer, window, 1, background, weights)
        np.testing.assert_allclose(values[i], expected, rtol=1e-6, atol=1e-6 * abs(outputs[i]))
        assert base[i] == pytest.approx(empty, rel=1e-6)
    # additive: base + sum equals the forecast (to float32 rounding of differently batched model calls)
    np.testing.assert_allclose(base + values.sum(1), outputs, rtol=1e-6)


def test_constant_feature_is_a_null_player_with_exactly_zero(rng):
    model, normalizer = _tiny_model(4)
    windows = rng.normal(0, 1.5, (2, 5, 4)).astype(np.float32)
    background = rng.normal(0, 1, (3, 5, 4)).astype(np.float32)
    windows[:, :, 2] = background[:, :, 2] = 0.7  # constant everywhere: leaves the game
    assert explain.null_features(windows, background).tolist() == [False, False, True, False]
    weights = np.full(3, 1 / 3)
    values, base, outputs, _ = explain.explain_service(model, normalizer, windows, 0, background, weights, ExplainConfig())
    assert (values[:, 2] == 0.0).all()
    expected, _ = _brute_force(model, normalizer, windows[0], 0, background, weights)
    np.testing.assert_allclose(values[0], expected, rtol=1e-6, atol=1e-6 * abs(outputs[0]))


def test_many_features_fall_back_to_sampled_coalitions_and_say_so(rng):
    model, normalizer = _tiny_model(5)
    windows = rng.normal(0, 1.5, (2, 4, 5)).astype(np.float32)
    background = rng.normal(0, 1, (3, 4, 5)).astype(np.float32)
    config = ExplainConfig(max_exact_features=3, coalition_samples=20)
    values, base, outputs, exact = explain.explain_service(model, normalizer, windows, 0, background, np.full(3, 1 / 3), config)
    assert not exact
    np.testing.assert_allclose(base + values.sum(1), outputs, rtol=1e-6)  # still additive (float32 model)
    attributions = explain.Attributions(values, base, outputs, np.zeros(2, bool), list("abcde"), 4, "background: test")
    assert "sampled" in attributions.method and "exact" not in attributions.method.split("sampled")[0]


# ------------------------------------------------------------------- on a trained tiny model


@pytest.fixture(scope="module")
def fitted(tiny_fit):
    """A forecaster that reads the latency's own history, so its explanations go through a cause model."""
    assert tiny_fit.forecaster.model.anchored and forecaster.reads_latency_history(tiny_fit.forecaster.feature_columns)
    assert tiny_fit.forecaster.cause_model is not None
    return tiny_fit.forecaster, tiny_fit.prepared, tiny_fit.ends


def test_additivity_matches_the_forecast_in_ms(fitted):
    trained, prepared, ends = fitted
    background = build_background(prepared.tensors, ends["train"], len(trained.services), 5, seed=0, pool=200)
    chosen = ends["validation"][:: max(1, len(ends["validation"]) // 12)][:12]
    attributions = explain.explain(trained, prepared.tensors, chosen, background, ExplainConfig())
    # what is explained is the cause model's forecast, in ms, the way every metric maps it
    normalized = training.predict(trained.cause_model, prepared.tensors, chosen).forecast
    codes = prepared.tensors.service_codes[torch.as_tensor(chosen)].numpy()
    forecast = trained.target_normalizer.denormalize(normalized, codes)
    np.testing.assert_allclose(attributions.outputs, forecast, rtol=1e-5)
    np.testing.assert_allclose(attributions.base_values + attributions.values.sum(1), forecast, rtol=1e-5)
    constant = trained.feature_columns.index("node_cpu_cores")
    assert (attributions.values[:, constant] == 0).all()
    history = trained.feature_columns.index("target_latency_p99")
    assert (attributions.values[:, history] == 0).all(), "the cause model never reads the latency's own history"
    assert "cause model" in attributions.method
    assert attributions.exact.all() and attributions.method.startswith("grouped interventional exact Shapley")


def test_stratified_sample_includes_breaches_and_weights_back_to_the_population(rng):
    alert = np.zeros(1000, dtype=bool)
    alert[rng.choice(1000, 30, replace=False)] = True
    positions, weights = explain.stratified_sample(alert, 100, rng)
    assert len(positions) == 100 and len(set(positions)) == 100
    assert alert[positions].sum() == 30, "fewer breaches than half the sample: all of them are explained"
    assert weights.sum() == pytest.approx(1000)
    assert weights[alert[positions]].sum() == pytest.approx(30)
    positions, weights = explain.stratified_sample(alert, 20, rng)
    assert alert[positions].sum() == 10 and weights.sum() == pytest.approx(1000)


def test_importance_report_follows_the_contract():
    values = np.array([[3.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [2.0, 2.0, 0.0]])
    attributions = explain.Attributions(values, np.zeros(3), values.sum(1), np.ones(3, bool), ["a", "b", "c"], 4, "background: test")
    report = explain.importance_report(attributions, np.array([1.0, 1.0, 2.0]), np.array([True, False, False]), {"predicted_breach": 1, "other": 3})
    assert report["n_windows"] == 3 and report["method"] == attributions.method
    assert report["importance"] == pytest.approx({"a": 2.0, "b": 1.5, "c": 0.0})
    assert sum(report["normalized"].values()) == pytest.approx(1.0)
    assert report["predicted_breach"]["n_windows"] == 1
    assert report["predicted_breach"]["importance"] == pytest.approx({"a": 3.0, "b": 1.0, "c": 0.0})
