import numpy as np
import pandas as pd

from latency_forecast import data, synthetic
from latency_forecast.config import TARGET_COLUMN


def test_same_seed_same_store_other_seed_other_store():
    first, manifest_a = synthetic.generate(days=2, n_services=3, seed=3)
    second, manifest_b = synthetic.generate(days=2, n_services=3, seed=3)
    third, _ = synthetic.generate(days=2, n_services=3, seed=4)
    pd.testing.assert_frame_equal(first, second)
    assert manifest_a == manifest_b
    assert not first[TARGET_COLUMN].equals(third[TARGET_COLUMN])


def test_schema_and_imperfections(tiny_frame):
    frame, _ = tiny_frame
    assert list(frame.columns[:2]) == ["timestamp", "service"]
    assert set(synthetic.FEATURE_COLUMNS) <= set(frame.columns)
    assert str(frame["timestamp"].dt.tz) == "UTC"
    per_service = frame.groupby("service").size()
    assert (per_service < 3 * 1440).any(), "some minutes are missing"
    assert frame[["cpu_rolling_avg", TARGET_COLUMN]].isna().to_numpy().any(), "occasional NaNs"
    assert frame["node_cpu_cores"].nunique() == 1, "a feature constant overall"
    leaf = frame[frame["service"] == "cache"]
    assert leaf["fan_out"].nunique() == 1, "a feature constant within a service"


def test_latency_follows_utilisation_and_faults_breach(tiny_frame):
    frame, manifest = tiny_frame
    assert {f["fault"] for f in manifest} <= set(synthetic.FAULT_ROOT_CAUSES)
    for fault in manifest:
        assert fault["root_cause_feature"] in frame.columns
        rows = frame[(frame["service"] == fault["service"]) & (frame["timestamp"] >= fault["start"])]
        rows = rows[rows["timestamp"] <= pd.Timestamp(fault["end"]) + pd.Timedelta(minutes=10)]
        assert rows[TARGET_COLUMN].max() >= 500, f"{fault['fault']} on {fault['service']} never breaches"
    busy = frame[frame["service"] == "payment"]
    hot = busy["cpu_rolling_avg"] > busy["cpu_rolling_avg"].quantile(0.9)
    assert busy.loc[hot, TARGET_COLUMN].median() > busy.loc[~hot, TARGET_COLUMN].median()


def test_cli_writes_hive_partitioned_store(tmp_path):
    out = tmp_path / "store"
    assert synthetic.main(["--output", str(out), "--days", "2", "--services", "3", "--seed", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chaos_manifest.json", "date=2024-05-01", "date=2024-05-02"]
    table = data.load_feature_store(str(out))
    assert table.services == ["auth", "cache", "payment"]
    # rerunning replaces the store in one swap
    assert synthetic.main(["--output", str(out), "--days", "1", "--services", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chaos_manifest.json", "date=2024-05-01"]


def test_fleet_scales_past_the_base_graph():
    fleet = synthetic.build_fleet(20)
    names = [spec.name for spec in fleet]
    assert len(names) == len(set(names)) == 20
    defined = set()
    for spec in fleet:
        assert all(callee in defined for callee, _ in spec.dependencies)
        defined.add(spec.name)
    frame, _ = synthetic.generate(days=1, n_services=20, seed=0, faults_per_day=0)
    assert np.isfinite(frame[synthetic.TARGET_COLUMN].dropna()).all()
    assert (frame.groupby("service")["request_rate"].mean() > 0).all()
