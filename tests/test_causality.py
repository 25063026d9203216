"""True-positive events and chaos scoring on hand-made cases (no model involved)."""

import numpy as np
import pandas as pd
import pytest

from latency_forecast import causality, data, store
from latency_forecast.causality import Fault
from latency_forecast.errors import UserError
from latency_forecast.graph import CallGraph
from tests.helpers import MANIFEST_BUG, hand_evaluation, table_of

T0 = data.to_minute(store.parse_timestamp("2024-05-01T10:00:00Z", ""))


def test_consecutive_true_positive_minutes_of_one_service_form_one_event():
    codes = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    minutes = T0 + np.array([0, 1, 2, 4, 5, 5, 6, 8])
    tp = np.array([1, 1, 0, 1, 1, 1, 1, 1], dtype=bool)
    events = causality.true_positive_events(codes, minutes, tp)
    # [0,1] | minute 2 not a TP | [4,5] | service changes at minute 5 | [5,6] | minute 7 missing | [8]
    assert [(e.position, e.n_minutes) for e in events] == [(0, 2), (3, 2), (5, 2), (7, 1)]
    assert causality.true_positive_events(codes, minutes, np.zeros(8, dtype=bool)) == []


def _forecasts(rows):
    """rows: (service code, minute offset, forecast, actual, alert, breach), judged at 500 ms."""
    codes, offsets, forecast, actual, alert, breach = map(np.array, zip(*rows))
    forecasts = hand_evaluation(codes, T0 + offsets, forecast, actual, latency_threshold=500.0)
    assert forecasts.alert.tolist() == alert.astype(bool).tolist() and forecasts.breach.tolist() == breach.astype(bool).tolist()
    return forecasts


FEATURES = ["cpu", "queue", "fan_out", "mem", "target_latency_p99"]


def _fault(service, start, end, kind, cause):
    return Fault(service, T0 + start, T0 + end, kind, cause)


def test_chaos_scoring_hand_made_case():
    services = ["a", "b", "c"]
    forecasts = _forecasts(
        [
            # service a: alert at minute 11 misses, TP from minute 12
            (0, 10, 100, 100, 0, 0), (0, 11, 600, 400, 1, 0), (0, 12, 700, 900, 1, 1), (0, 13, 800, 950, 1, 1),
            # service b: never alerts; its highest forecast is at minute 21
            (1, 20, 300, 700, 0, 1), (1, 21, 450, 800, 0, 1), (1, 22, 200, 300, 0, 0),
            # service c: a TP far from any fault
            (2, 50, 900, 900, 1, 1),
        ]
    )
    horizon = 2
    faults = [
        _fault("a", 8, 10, "cpu", "cpu"),  # span [8, 12]: detected at minute 12
        _fault("b", 18, 19, "queue", "queue"),  # span [18, 21]: not detected, explained at 21
        _fault("b", 40, 45, "queue", "queue"),  # no forecast in its span
        _fault("a", 30, 35, "code", None),  # no metric signal
        _fault("a", 30, 35, "delay", "network_delay"),  # not a model input
        _fault("a", 30, 35, "self", "target_latency_p99"),  # the latency itself
        _fault("zz", 10, 12, "cpu", "cpu"),  # service unknown to the model
    ]
    rankable = FEATURES[:-1]
    cases = causality.match_faults(faults, forecasts, services, ["a", "b", "c"], rankable, horizon)
    assert [c.scorable for c in cases] == [True, True, False, False, False, False, False]
    assert (cases[0].detected, cases[0].position) == (True, 2)
    assert (cases[1].detected, cases[1].position) == (False, 5)
    assert "no complete window" in cases[2].reason
    assert "no root-cause feature" in cases[3].reason
    assert "'network_delay' is not an input of the model" in cases[4].reason
    assert "never ranked" in cases[5].reason
    assert "'zz' was not in the model's training data" in cases[6].reason

    cases[0].ranking = ["queue", "cpu", "mem", "fan_out"]  # hit@3, not hit@1
    cases[1].ranking = ["queue", "cpu", "mem", "fan_out"]  # hit@1
    summary = causality.validation_summary(cases, forecasts, n_rankable=4, n_outside=3)
    assert summary["n_faults"] == 2 and summary["n_unscorable"] == 5 and summary["n_outside_range"] == 3
    assert summary["top1_accuracy"] == 0.5 and summary["top3_accuracy"] == 1.0
    assert summary["detection_rate"] == 0.5
    assert summary["detected"] == {"n_faults": 1, "top1_accuracy": 0.0, "top3_accuracy": 1.0}
    assert summary["random_top1"] == 0.25 and summary["random_top3"] == 0.75
    assert summary["by_fault"]["cpu"]["top1_accuracy"] == 0.0 and summary["by_fault"]["cpu"]["n_unscorable"] == 1
    assert summary["by_fault"]["queue"] == {
        "n_faults": 1, "top1_accuracy": 1.0, "top3_accuracy": 1.0, "detection_rate": 0.0,
        "detected": {"n_faults": 0, "top1_accuracy": None, "top3_accuracy": None}, "n_unscorable": 1,
    }
    assert summary["by_fault"]["code"]["top1_accuracy"] is None
    first, second = summary["faults"]
    assert first["explained_minute"] == "2024-05-01T10:12:00Z" and first["detected"] and not first["hit_at_1"] and first["hit_at_3"]
    assert second["explained_minute"] == "2024-05-01T10:21:00Z" and not second["detected"] and second["hit_at_1"]
    assert second["predicted"] == 450 and second["actual"] == 800 and second["top_feature"] == "queue"
    assert {u["reason"] for u in summary["unscorable"]} == {c.reason for c in cases if not c.scorable}
    assert all(u["start"].endswith("Z") for u in summary["unscorable"])


def test_events_name_the_fault_they_fall_in():
    faults = [_fault("a", 0, 10, "cpu", "cpu"), _fault("a", 30, 40, "queue", "queue"), _fault("b", 0, 10, "cpu", "cpu")]
    assert causality.fault_of("a", T0 + 12, faults, horizon=2) == 0  # within end + H
    assert causality.fault_of("a", T0 + 13, faults, horizon=2) is None
    assert causality.fault_of("a", T0 + 30, faults, horizon=2) == 1
    assert causality.fault_of("c", T0 + 5, faults, horizon=2) is None


def test_ranking_never_names_the_latency_itself():
    scores = np.array([1.0, 5.0, -2.0, 0.0, 9.0])
    assert causality.rank_features(scores, FEATURES) == ["queue", "cpu", "mem", "fan_out"]


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"service": "a"}, "not a JSON list"),
        ([{"service": "a", "start": "2024-05-01T10:00:00Z", "fault": "cpu"}], "fault 0 is not an object with"),
        pytest.param([{"service": "a", "start": "yesterday", "end": "2024-05-01", "fault": "cpu"}], "is not a timestamp", marks=MANIFEST_BUG),
        pytest.param([{"service": "a", "start": "2024-05-02", "end": "2024-05-01", "fault": "cpu"}], "ends", marks=MANIFEST_BUG),
        ([{"service": "a", "start": "2024-05-01", "end": "2024-05-01", "fault": "cpu", "root_cause_feature": 3}], "column name or null"),
    ],
)
def test_bad_manifest_is_a_user_error(entries, message):
    with pytest.raises(UserError, match=message):
        causality.parse_manifest(entries, "m.json")


@MANIFEST_BUG
def test_manifest_with_seconds_null_causes_and_extra_keys_parses():
    faults = causality.parse_manifest(
        [{"service": "s", "start": "2023-01-29T08:43:04Z", "end": "2023-01-29T08:46:04Z", "fault": "code", "root_cause_feature": None, "pod": "x"},
         {"service": "s", "start": "2023-01-29T09:00:00Z", "end": "2023-01-29T09:03:00Z", "fault": "cpu"}],
        "m.json",
    )
    assert faults[0].as_dict()["start"] == "2023-01-29T08:43:00Z" and faults[0].root_cause_feature is None
    assert faults[1].root_cause_feature is None


# ----------------------------------------------------------------------------- root-cause services


def test_service_accuracy_is_rcaeval_ac_at_k_and_avg5():
    rankings = [["a", "b", "c"], ["b", "a", "c", "d", "e"], ["c", "d", "e", "f", "b"], ["x"]]
    truths = ["a", "a", "b", "b"]
    # AC@1 1/4; AC@2 2/4; AC@3 2/4; AC@4 2/4; AC@5 3/4 (b is fifth in the third); Avg@5 their mean
    summary = causality.service_accuracy(rankings, truths)
    assert summary["n_faults"] == 4
    assert summary["top1_accuracy"] == 0.25 and summary["top3_accuracy"] == 0.5
    assert summary["avg5"] == pytest.approx((0.25 + 0.5 + 0.5 + 0.5 + 0.75) / 5)
    assert causality.service_accuracy([], []) == {"n_faults": 0, "top1_accuracy": None, "top3_accuracy": None, "avg5": None}


def test_robust_z_against_the_trailing_window():
    trailing = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 1.0], [5.0, 0.0]])
    recent = np.array([[9.0, 0.0], [11.0, np.nan]])
    z = causality.robust_z(recent, trailing, floor=0.5)
    # column 0: median 3, MAD 1 (1.4826), mean |dev| 1.2 (1.504): (10 - 3) / 1.504
    assert z[0] == pytest.approx(7.0 / (1.2533 * 1.2))
    # column 1: MAD 0 and mean |dev| 0.2 (0.25) fall under the floor: (0 - 0) / 0.5
    assert z[1] == 0.0
    assert np.isnan(causality.robust_z(recent, trailing[:0], 0.5)).all(), "no trailing minutes, no z"


def test_call_graph_puts_the_deepest_anomalous_callee_first():
    scores = {"frontend": 12.0, "checkout": 9.0, "payment": 5.0, "cache": 1.0, "lost": float("nan")}
    assert causality.rank_services(scores) == ["frontend", "checkout", "payment", "cache"]
    edges = (("frontend", "checkout"), ("checkout", "payment"), ("checkout", "cache"))
    ranked = causality.rank_services(scores, CallGraph(edges))
    assert ranked == ["payment", "frontend", "checkout", "cache"], "cache is not anomalous: payment is the deepest"


def _injected_table(tmp_path):
    """Services a, b, c over 120 minutes of noise; from minute 100 b's cpu and latency climb,
    and c (b's caller) sees a little of b's latency."""
    rng = np.random.default_rng(0)
    rows = []
    for service in ("a", "b", "c"):
        for minute in range(120):
            rise = max(0, minute - 99) if service == "b" else 0
            rows.append(
                {
                    "timestamp": pd.Timestamp("2024-05-01T10:00:00Z") + pd.Timedelta(minutes=minute),
                    "service": service,
                    "cpu": 0.5 + rng.normal(0, 0.02) + 0.05 * rise,
                    "mem": 0.4 + rng.normal(0, 0.02),
                    "target_latency_p99": 100.0 * np.exp(rng.normal(0, 0.05)) * (1 + 0.3 * rise if service == "b" else 1 + 0.05 * max(0, minute - 101) if service == "c" else 1),
                }
            )
    return table_of(pd.DataFrame(rows), tmp_path, feature_columns=["cpu", "mem"])


def test_rule_baseline_ranks_the_injected_service_and_feature_first(tmp_path):
    table = _injected_table(tmp_path)
    baseline = causality.RuleBaseline(table, table.features, ["cpu", "mem"])
    at = T0 + 104
    scores = {name: baseline.service_score(code, at) for code, name in enumerate(table.services)}
    assert causality.rank_services(scores)[0] == "b"
    assert scores["b"] > 5 > scores["a"]
    assert baseline.rank_features(table.services.index("b"), at) == ["cpu", "mem"]
    assert np.isnan(baseline.service_score(0, T0 + 2)), "no trailing window at the store's start"


def test_service_level_summary_beside_the_rule_baseline(tmp_path):
    table = _injected_table(tmp_path)
    horizon = 2
    codes, minutes, latency = table.service_codes, table.minutes, table.target.astype(np.float64)
    forecast = latency.copy()  # a model that forecasts the latency it will see: caller c rises too
    forecast[codes == 2] *= np.where(minutes[codes == 2] >= T0 + 100, 3.0, 1.0)  # ...and more than b
    forecasts = hand_evaluation(codes, minutes + horizon, forecast, latency, latency_threshold=250.0)
    baseline = causality.RuleBaseline(table, table.features, ["cpu", "mem"])
    faults = [_fault("b", 100, 110, "cpu", "cpu")]
    plain_ranker = causality.ServiceRanker(forecasts, table.services, ["a", "b", "c"], horizon, None)
    plain = causality.service_level_summary(faults, forecasts, table.services, plain_ranker, baseline, horizon)
    assert plain["faults"][0]["top5"][0] == "c" and plain["top1_accuracy"] == 0.0
    graph = CallGraph((("c", "b"),))
    ranker = causality.ServiceRanker(forecasts, table.services, ["a", "b", "c"], horizon, graph)
    summary = causality.service_level_summary(faults, forecasts, table.services, ranker, baseline, horizon)
    assert summary["top1_accuracy"] == 1.0 and summary["avg5"] == 1.0 and summary["call_graph_edges"] == 1
    assert summary["rule_baseline"]["top1_accuracy"] == 1.0
    assert summary["random_top1"] == pytest.approx(1 / 3) and summary["n_services"] == 3
    (outcome,) = summary["faults"]
    assert outcome["rank"] == 1 and outcome["rule_rank"] == 1 and outcome["rule_top5"][0] == "b"
    assert outcome["detected"] and outcome["ranked_at"] > "2024-05-01T11:40:00Z"
