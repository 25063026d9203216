"""scaling.py: the feature scaler and the target normaliser see training rows only, match
StandardScaler's fit chunk by chunk, spread fractions near saturation, round-trip through
scaler.pt, and centre each service's latency on one scale."""

import numpy as np
import pytest

from latency_forecast import data, scaling, store
from latency_forecast.errors import UserError
from tests.helpers import hand_frame, table_of


def test_scaler_sees_training_rows_only(tiny_store):
    table = store.load_feature_store(tiny_store)
    splits = data.fraction_splits(table, 0.2, 0.2, 20)
    rows = data.rows_in(table, splits.train)
    clean = scaling.FeatureScaler().fit(table.features, rows)
    poisoned = table.features.copy()
    poisoned[~rows] = 1e9
    dirty = scaling.FeatureScaler().fit(poisoned, rows)
    np.testing.assert_array_equal(clean.scaler.mean_, dirty.scaler.mean_)
    np.testing.assert_array_equal(clean.scaler.scale_, dirty.scaler.scale_)


def test_scaler_by_hand():
    features = np.array([[0.0, 5.0], [np.e - 1, 5.0], [np.nan, 5.0], [-(np.e - 1), 5.0]], dtype=np.float32)
    rows = np.array([True, True, False, True])
    scaler = scaling.FeatureScaler("log1p").fit(features, rows)
    # signed log1p: 0, 1, -1 -> mean 0, population std sqrt(2/3); the constant column gets scale 1
    np.testing.assert_allclose(scaler.scaler.mean_, [0.0, np.log1p(5.0)], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scaler.scaler.scale_, [np.sqrt(2 / 3), 1.0], rtol=1e-6)
    scaled = scaler.transform(features)
    np.testing.assert_allclose(scaled[[0, 1, 3], 0], [0.0, 1 / np.sqrt(2 / 3), -1 / np.sqrt(2 / 3)], rtol=1e-5, atol=1e-6)
    assert np.isnan(scaled[2, 0]) and (scaled[:, 1] == 0).all()
    identity = scaling.FeatureScaler("none").fit(features, rows)
    np.testing.assert_allclose(identity.scaler.mean_[0], 0.0, atol=1e-7)
    with pytest.raises(UserError, match="no training rows"):
        scaling.FeatureScaler().fit(features, np.zeros(4, dtype=bool))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # scikit-learn's, on the all-NaN feature
def test_auto_transform_spreads_fractions_near_saturation(monkeypatch):
    """auto: -log(1 - x) for a column whose training rows all lie in [0, 1], signed log1p for the
    rest; rows outside training do not decide it, and a fraction past 1 later stays finite."""
    monkeypatch.setattr(data, "_CHUNK_ROWS", 2)  # the bounds pool their chunks
    features = np.array([
        # utilisation, a counter, a ratio that once left [0, 1], a column never seen in training
        [0.10, 3.0, 0.5, np.nan],
        [0.88, 0.0, 1.5, np.nan],
        [0.98, 12.0, 0.2, np.nan],
        [np.nan, 7.0, 0.9, np.nan],
        [0.50, 1e6, -3.0, 0.5],  # not training: it decides nothing
    ], dtype=np.float32)
    rows = np.array([True, True, True, True, False])
    scaler = scaling.FeatureScaler("auto").fit(features, rows)
    assert scaler.saturating.tolist() == [True, False, False, False]
    raw = scaler._transform_block(features.copy())
    np.testing.assert_allclose(raw[[0, 1, 2], 0], -np.log(1 - np.array([0.10, 0.88, 0.98])), rtol=1e-5)
    np.testing.assert_allclose(raw[:, 1], np.log1p(features[:, 1]), rtol=1e-6)
    np.testing.assert_allclose(raw[:, 2], np.sign(features[:, 2]) * np.log1p(np.abs(features[:, 2])), rtol=1e-6)
    assert np.isnan(raw[3, 0]) and np.isnan(raw[:4, 3]).all()
    # the last points before saturation are spread, not squeezed as log1p squeezes them
    assert raw[2, 0] - raw[1, 0] > 1.5 > 10 * (np.log1p(0.98) - np.log1p(0.88))
    later = np.array([[1.0, 1.0, 1.0, 1.0], [1.7, 1.0, 1.0, 1.0], [-0.2, 1.0, 1.0, 1.0]], dtype=np.float32)
    scaled = scaler.transform(later)
    assert np.isfinite(scaled).all() and scaled[0, 0] == scaled[1, 0]
    np.testing.assert_allclose(scaled[2, 0], (0.0 - scaler.scaler.mean_[0]) / scaler.scaler.scale_[0], rtol=1e-5)
    inplace = later.copy()
    np.testing.assert_array_equal(scaler.transform(inplace, inplace=True), scaled)
    assert scaling.FeatureScaler("log1p").fit(features, rows).saturating is None


def test_scaler_pools_its_chunks_into_standard_scalers_fit(monkeypatch, rng):
    """Chunk by chunk (3 rows each here), NaNs ignored: the mean and variance StandardScaler
    finds on the transformed training rows at once."""
    from sklearn.preprocessing import StandardScaler

    features = (rng.lognormal(2.0, 1.5, size=(40, 3)) * rng.choice([-1, 1], size=(40, 3))).astype(np.float32)
    features[rng.random((40, 3)) < 0.2] = np.nan
    features[:, 2] = np.nan  # never seen: constant 0
    rows = rng.random(40) < 0.7
    monkeypatch.setattr(data, "_CHUNK_ROWS", 3)
    fitted = scaling.FeatureScaler("log1p").fit(features, rows).scaler
    transformed = np.sign(features[rows]) * np.log1p(np.abs(features[rows]))
    reference = StandardScaler().fit(transformed[:, :2])
    np.testing.assert_allclose(fitted.mean_[:2], reference.mean_, rtol=1e-6)
    np.testing.assert_allclose(fitted.var_[:2], reference.var_, rtol=1e-5)
    np.testing.assert_array_equal(fitted.n_samples_seen_[:2], reference.n_samples_seen_)
    assert fitted.mean_[2] == 0.0 and fitted.scale_[2] == 1.0 and fitted.n_samples_seen_[2] == 0


def test_constant_feature_scales_to_zero_not_nan(tiny_store):
    table = store.load_feature_store(tiny_store)
    scaler = scaling.FeatureScaler().fit(table.features, np.ones(len(table), dtype=bool))
    scaled = scaler.transform(table.features)
    constant = table.feature_columns.index("node_cpu_cores")
    assert scaler.scaler.scale_[constant] == 1.0
    assert (scaled[:, constant] == 0).all()
    finite = np.isfinite(table.features)
    assert np.isfinite(scaled[finite]).all() and np.isnan(scaled[~finite]).all()
    assert abs(np.nanmean(scaled[:, 0])) < 1e-3


def test_scaler_state_rebuilds_a_fitted_standard_scaler(tiny_store, tmp_path):
    import torch

    table = store.load_feature_store(tiny_store)
    for transform in ("auto", "log1p"):
        fitted = scaling.FeatureScaler(transform).fit(table.features, np.ones(len(table), dtype=bool))
        torch.save(fitted.state(table.feature_columns), tmp_path / "scaler.pt")
        restored = scaling.FeatureScaler.from_state(torch.load(tmp_path / "scaler.pt", weights_only=True))
        np.testing.assert_array_equal(restored.transform(table.features), fitted.transform(table.features))
    auto = scaling.FeatureScaler("auto").fit(table.features, np.ones(len(table), dtype=bool))
    assert {"cpu_rolling_avg", "mem_usage"} <= set(auto.state(table.feature_columns)["saturating_columns"])
    assert not set(auto.state(table.feature_columns)["saturating_columns"]) & {"request_rate", "queue_depth"}
    scaler = scaling.FeatureScaler("log1p").fit(table.features, np.ones(len(table), dtype=bool))
    transformed = np.sign(table.features[:50]) * np.log1p(np.abs(table.features[:50]))
    np.testing.assert_allclose(
        restored.scaler.transform(np.nan_to_num(transformed)), scaler.scaler.transform(np.nan_to_num(transformed))
    )


def test_target_normalizer_centres_each_service_on_one_scale_and_inverts(tmp_path):
    table = table_of(hand_frame(services=("fast", "slow"), minutes=200), tmp_path)
    table.target[table.service_codes == 1] *= 100
    table.target[np.flatnonzero(table.service_codes == 1)[::2]] *= 20  # bimodal: a wide spread of its own
    normalizer = scaling.TargetNormalizer.fit(table, np.ones(len(table), dtype=bool))
    assert normalizer.location[1] - normalizer.location[0] > 3
    assert normalizer.scale.tolist() == [normalizer.pooled[1]] * 2
    own = scaling.TargetNormalizer.fit(table, np.ones(len(table), dtype=bool), per_service_scale=True)
    assert own.scale[1] > 2 * own.scale[0] and own.location.tolist() == normalizer.location.tolist()
    # a spike is measured in the service's own spread, whatever the scale: 20x its median is one on
    # the steadier service, not on the bimodal one (20x is its other mode)
    spikes = normalizer.spikes(np.expm1(normalizer.location + np.log(20.0)), np.array([0, 1]), z=3.0)
    assert spikes.tolist() == [True, False] and (normalizer.spread == own.scale).all()
    z = normalizer.normalize(table.target, table.service_codes)
    assert abs(np.median(z[table.service_codes == 0])) < 0.1 and abs(np.median(z[table.service_codes == 1])) < 0.1
    np.testing.assert_allclose(normalizer.denormalize(z, table.service_codes), table.target, rtol=1e-4)
    # forecasts are capped at the largest latency seen in training
    top = float(table.target.max())
    assert normalizer.denormalize(np.array([1e3]), np.array([1]))[0] == pytest.approx(top, rel=1e-5)
    # ... or at the latency at t where a service is already above that (its level moved up after
    # training): never below where it is now for want of evidence, nor above it
    capped = normalizer.denormalize(np.array([1e3, 1e3, 0.0]), np.array([1, 1, 1]), np.array([3 * top, np.nan, 3 * top]))
    assert capped[0] == pytest.approx(3 * top, rel=1e-5) and capped[1] == pytest.approx(top, rel=1e-5)
    assert capped[2] == pytest.approx(float(np.expm1(normalizer.location[1])), rel=1e-5), "only the cap moves"
    again = scaling.TargetNormalizer.from_state(normalizer.state())
    np.testing.assert_array_equal(again.location, normalizer.location)
    assert (again.pooled, again.ceiling) == (normalizer.pooled, normalizer.ceiling)
