"""Shared fixtures: tiny real feature stores written by the project's own generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from latency_forecast import data, synthetic

TINY_TRAINING = [
    "--hidden-size", "8",
    "--epochs", "2",
    "--samples-per-epoch", "2000",
    "--batch-size", "256",
    "--sequence-length", "6",
    "--horizon", "2",
    "--quiet",
]


@pytest.fixture(scope="session")
def tiny_frame() -> tuple[pd.DataFrame, list[dict]]:
    """Four services over three days, with faults, gaps and NaNs."""
    return synthetic.generate(days=3, n_services=4, seed=7, faults_per_day=3.0)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_frame) -> str:
    frame, manifest = tiny_frame
    path = str(tmp_path_factory.mktemp("store") / "feature_store")
    data.write_feature_store(frame, path)
    from latency_forecast import artifacts

    artifacts.write_json(manifest, f"{path}/chaos_manifest.json")
    return path


def write_frame(frame: pd.DataFrame, path) -> str:
    """A single-file store from a hand-made frame."""
    path = str(path)
    frame.to_parquet(path, index=False)
    return path


def hand_frame(services=("a", "b"), minutes=30, start="2024-05-01T00:00:00Z", features=("cpu",)) -> pd.DataFrame:
    """A small regular frame: latency = 10 * (service index + 1) + minute."""
    rows = []
    base = pd.Timestamp(start)
    for s, service in enumerate(services):
        for m in range(minutes):
            row = {"timestamp": base + pd.Timedelta(minutes=m), "service": service}
            for f, feature in enumerate(features):
                row[feature] = float(m + f)
            row["target_latency_p99"] = 10.0 * (s + 1) + m
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
