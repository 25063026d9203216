"""Shared fixtures: tiny real feature stores written by the project's own generator, a tiny
forecaster fitted in-process, and train.py's artifacts from two tiny runs (built once a session).

Session fixtures are shared by many tests: read them, never change them in place."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import train
from latency_forecast import artifacts, store, synthetic
from tests.helpers import TINY_TRAINING, Fitted, fit_tiny


def pytest_configure(config):
    # The suite shares its cores with other jobs: torch's spinning CPU threads that lose their core
    # stalled the tiny fits tenfold (BENCHMARKS.md). One thread keeps it fast and steady; the
    # results do not depend on it (every comparison is made within the same process).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_frame() -> tuple[pd.DataFrame, list[dict]]:
    """Four services over three days, with faults, gaps and NaNs."""
    return synthetic.generate(days=3, n_services=4, seed=7, faults_per_day=3.0)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_frame) -> str:
    frame, manifest = tiny_frame
    path = str(tmp_path_factory.mktemp("store") / "feature_store")
    store.write_feature_store(frame, path)
    artifacts.write_json(manifest, f"{path}/chaos_manifest.json")
    return path


@pytest.fixture(scope="session")
def tiny_fit(tiny_store) -> Fitted:
    """A forecaster of the telemetry and the latency's own history (so anchored, with a cause
    model), fitted on the tiny store with a 300 ms latency threshold."""
    telemetry = store.load_feature_store(tiny_store).feature_columns
    table = store.load_feature_store(tiny_store, telemetry)  # the default: telemetry and the latency's own history
    return fit_tiny(table, cause_model=True)


EXPLAINED = ["--shap-samples", "24", "--background-size", "4", "--target-fpr", "0.02"]


def _train(directory, tiny_store, *extra) -> str:
    assert train.main(["--feature-store-path", tiny_store, "--output-dir", str(directory), *TINY_TRAINING, *EXPLAINED, *extra]) == 0
    return str(directory)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, tiny_store) -> str:
    """train.py's artifacts for a forecaster of the telemetry alone (explained directly)."""
    return _train(tmp_path_factory.mktemp("trained"), tiny_store, "--feature-columns", ",".join(synthetic.FEATURE_COLUMNS))


@pytest.fixture(scope="session")
def history_dir(tmp_path_factory, tiny_store) -> str:
    """train.py's artifacts with the default features: the telemetry and the latency's own
    history (anchored, explained through its cause model)."""
    return _train(tmp_path_factory.mktemp("history"), tiny_store)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
