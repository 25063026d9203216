"""graph.py and store.read_call_graph: the optional call graph beside a store, validated, with
edges naming unknown services dropped (one warning line)."""

import json

import pytest

from latency_forecast import graph, store, synthetic
from latency_forecast.errors import UserError
from tests.helpers import hand_frame, write_frame


def _store_with_graph(tmp_path, entries, name=graph.CALL_GRAPH_FILE):
    path = tmp_path / "store"
    path.mkdir()
    write_frame(hand_frame(services=("a", "b", "c")), path / "part-0.parquet")
    (path / name).write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return str(path)


def test_graph_beside_the_store_is_read(tmp_path, capsys):
    edges = [{"caller": "a", "callee": "b", "calls": 2}, {"caller": "b", "callee": "c"}, {"caller": "a", "callee": "b"}]
    path = _store_with_graph(tmp_path, {"edges": edges, "source": "traces"})
    call_graph = store.read_call_graph(path, None, ["a", "b", "c"])
    assert call_graph.edges == (("a", "b"), ("b", "c")), "extra keys ignored, each edge once"
    assert call_graph.callees("a") == ["b"] and call_graph.callees("c") == []
    assert capsys.readouterr().err == ""
    assert store.read_call_graph(str(tmp_path / "store" / "part-0.parquet"), None).edges == call_graph.edges, "beside a one-file store too"


def test_no_graph_is_none(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    write_frame(hand_frame(), path / "part-0.parquet")
    assert store.read_call_graph(str(path)) is None


def test_explicit_path_wins_and_must_exist(tmp_path):
    path = _store_with_graph(tmp_path, {"edges": [{"caller": "a", "callee": "b"}]})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"edges": [{"caller": "c", "callee": "a"}]}))
    assert store.read_call_graph(path, str(other)).edges == (("c", "a"),)
    with pytest.raises(UserError, match="does not exist"):
        store.read_call_graph(path, str(tmp_path / "missing.json"))


def test_edges_naming_unknown_services_are_dropped_with_one_warning(tmp_path, capsys):
    edges = [{"caller": "a", "callee": "b"}, {"caller": "a", "callee": "zz"}, {"caller": "yy", "callee": "c"}]
    call_graph = store.read_call_graph(_store_with_graph(tmp_path, {"edges": edges}), None, ["a", "b", "c"])
    assert call_graph.edges == (("a", "b"),)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2 of 3 edges" in err and "yy, zz" in err and "ignored" in err


@pytest.mark.parametrize(
    "entries, message",
    [
        ("{not json", "cannot read call graph"),
        ([{"caller": "a", "callee": "b"}], "is not a JSON object"),
        ({"nodes": []}, "is not a JSON object"),
        ({"edges": [{"caller": "a"}]}, "edge 0 is not an object with caller and callee"),
        ({"edges": [{"caller": "a", "callee": 3}]}, "edge 0"),
    ],
)
def test_malformed_graph_is_a_user_error(tmp_path, entries, message):
    with pytest.raises(UserError, match=message):
        store.read_call_graph(_store_with_graph(tmp_path, entries), None, ["a", "b", "c"])


def test_generator_writes_the_graph_of_its_fleet(tmp_path):
    out = tmp_path / "demo"
    assert synthetic.main(["--output", str(out), "--days", "1", "--services", "6", "--seed", "2"]) == 0
    call_graph = store.read_call_graph(str(out), None, store.load_feature_store(str(out)).services)
    fleet = synthetic.build_fleet(6)
    assert set(call_graph.edges) == {(spec.name, callee) for spec in fleet for callee, _ in spec.dependencies}
    assert ("catalog", "inventory") in call_graph.edges and len(call_graph.edges) == 5
