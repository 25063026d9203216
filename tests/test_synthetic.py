"""synthetic.py: the demo store is seeded, follows the contract's schema with its imperfections,
breaches where it injects faults, and its command writes a hive-partitioned store (bad flags: exit 2)."""

import json

import numpy as np
import pandas as pd
import pytest

from latency_forecast import flags, store, synthetic
from latency_forecast.config import TARGET_COLUMN
from latency_forecast.script_config import SyntheticConfig
from tests.helpers import assert_documented_defaults, assert_one_line_error


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


def test_cli_writes_hive_partitioned_store(tmp_path, capsys):
    out = tmp_path / "store"
    assert synthetic.main(["--output", str(out), "--days", "2", "--services", "3", "--seed", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["call_graph.json", "chaos_manifest.json", "date=2024-05-01", "date=2024-05-02"]
    table = store.load_feature_store(str(out))
    assert table.services == ["auth", "cache", "payment"]
    frame, manifest = synthetic.generate(days=2, n_services=3, seed=1)
    assert len(table) == len(frame) and json.loads((out / "chaos_manifest.json").read_text()) == manifest
    assert capsys.readouterr().out == f"wrote {len(frame):,} rows (3 services x 2 days) and {len(manifest)} injected faults to {out}/\n"
    # rerunning replaces the store in one swap
    assert synthetic.main(["--output", str(out), "--days", "1", "--services", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["call_graph.json", "chaos_manifest.json", "date=2024-05-01"]


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


def test_start_moves_the_store(tmp_path):
    out = tmp_path / "store"
    assert synthetic.main(["--output", str(out), "--days", "1", "--services", "1", "--start", "2023-01-02T00:00:00Z"]) == 0
    assert [p.name for p in sorted(out.iterdir())] == ["call_graph.json", "chaos_manifest.json", "date=2023-01-02"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--days", "0"], "--days must be at least 1, got 0"),
        (["--services", "0"], "--services must be at least 1, got 0"),
        (["--faults-per-day", "-1"], "--faults-per-day must be 0 or more"),
        (["--start", "someday"], "--start 'someday' is not a timestamp"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "store"
    assert_one_line_error(capsys, synthetic.main(["--output", str(out), *argv]), message)
    assert not out.exists()


def test_help_shows_the_documented_defaults(capsys):
    assert_documented_defaults(
        synthetic.build_parser(),
        {"--output": "feature_store", "--days": "35", "--services": "8", "--faults-per-day": "1.5", "--seed": "0", "--start": "2024-05-01T00:00:00Z"},
    )
    assert flags.from_args(synthetic.build_parser().parse_args([]), SyntheticConfig) == SyntheticConfig()
    with pytest.raises(SystemExit) as raised:
        synthetic.main(["--help"])
    assert raised.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m latency_forecast.synthetic")


def test_level_shifts_halve_or_double_each_services_own_latency_for_good_and_touch_nothing_else():
    plain, manifest = synthetic.generate(days=4, n_services=3, seed=2)
    shifted, shifted_manifest = synthetic.generate(days=4, n_services=3, seed=2, level_shift_at=0.5)
    assert shifted_manifest == manifest, "a deploy is not a chaos fault"
    early = plain["timestamp"] < plain["timestamp"].min() + pd.Timedelta(days=1.9)
    pd.testing.assert_frame_equal(shifted[early], plain[early])  # nothing changes before the deploys
    late = plain["timestamp"] > plain["timestamp"].min() + pd.Timedelta(days=3)
    ratio = shifted[late].groupby("service")["target_latency_p99"].median() / plain[late].groupby("service")["target_latency_p99"].median()
    leaf = synthetic.build_fleet(3)[-1].name  # calls nobody: its latency is its own time alone
    assert 0.4 < ratio[leaf] < 0.65 or 1.6 < ratio[leaf] < 2.3, ratio
