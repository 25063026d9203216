"""Every door's bad inputs, one table per script: each case ends with exit status 2 and one stderr
line naming the problem and the fix, no traceback, and nothing written (an earlier artifact stays
byte for byte, no new file or directory appears, a malicious pickle runs no code).

The scripts are called in-process through ``main(argv)``; every case fails before any training."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import skops.io
import torch

import analyze_causality
import backtest
import forecast
import train
from latency_forecast import synthetic
from tests.helpers import TINY_TRAINING, assert_one_line_error

CHECKPOINT, SCALER = "latency_forecaster.pt", "scaler.pt"
MIDDLE_PARTITION = "date=2024-05-02"  # of tiny_store's three days


# ----------------------------------------------------------------------------- the bad inputs


class Payload:
    """Pickles to a call of ``os.system`` that creates ``marker``: what a checkpoint from an
    untrusted source can hold. ``torch.load(..., weights_only=True)`` must refuse to unpickle it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class Workspace:
    """A case's own directory and the session's artifacts it makes its bad inputs from; the
    session fixtures are built only when a case asks for them."""

    def __init__(self, request, directory: Path):
        self.request, self.directory = request, directory
        self.marker = directory / "code-ran"

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    @property
    def store(self) -> str:
        return self.fixture("tiny_store")

    @property
    def trained(self) -> str:
        return self.fixture("trained_dir")

    @property
    def history(self) -> str:
        return self.fixture("history_dir")

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def save(self, name: str, value) -> str:
        torch.save(value, self.path(name))
        record = value.get("gradient_boosting") if isinstance(value, dict) else None
        trees = os.path.join(self.trained, record["file"]) if record else None
        if trees and not os.path.exists(self.path(record["file"])) and hashlib.sha256(open(trees, "rb").read()).hexdigest() == record["sha256"]:
            shutil.copy(trees, self.directory)  # a checkpoint travels with its ensemble's trees
        return self.path(name)

    def checkpoint(self) -> dict:
        return torch.load(f"{self.trained}/{CHECKPOINT}", map_location="cpu", weights_only=True)

    def scaler(self) -> dict:
        return torch.load(f"{self.trained}/{SCALER}", map_location="cpu", weights_only=True)

    def frame(self) -> pd.DataFrame:
        return self.fixture("tiny_frame")[0]

    def manifest(self, entries) -> str:
        with open(self.path("chaos_manifest.json"), "w") as stream:
            stream.write(entries if isinstance(entries, str) else json.dumps(entries))
        return self.path("chaos_manifest.json")

    def corrupt_store(self, corrupt: Callable[[bytes], bytes]) -> str:
        """A copy of tiny_store whose middle partition file is replaced by ``corrupt(its bytes)``."""
        copy = self.path("corrupt_store")
        shutil.copytree(self.store, copy)
        part = os.path.join(copy, MIDDLE_PARTITION, "part-0.parquet")
        data = open(part, "rb").read()
        open(part, "wb").write(corrupt(data))
        return copy


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``directory``."""
    found: dict[str, bytes | None] = {}
    for root, directories, files in os.walk(directory):
        for name in directories:
            found[os.path.relpath(os.path.join(root, name), directory)] = None
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = open(path, "rb").read()
    return found


def assert_refused(capsys, workspace: Workspace, main, argv: list[str], messages: tuple[str, ...]) -> None:
    """``main(argv)`` is a one-line user error that wrote nothing and ran no pickled code."""
    before = snapshot(workspace.directory)
    code = main(argv)
    assert_one_line_error(capsys, code, *messages)
    assert not workspace.marker.exists(), "the pickled payload ran"
    after = snapshot(workspace.directory)
    assert sorted(after) == sorted(before), f"written: {sorted(set(after) - set(before))}"
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"changed: {changed}"


@pytest.fixture
def workspace(request, tmp_path) -> Workspace:
    return Workspace(request, tmp_path)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _scribbled(data: bytes) -> bytes:
    """The footer (schema, row groups, statistics) intact, the column pages overwritten."""
    middle = slice(len(data) // 4, len(data) // 2)
    return data[: middle.start] + b"\xff" * (middle.stop - middle.start) + data[middle.stop :]


BAD_PART = os.path.join("corrupt_store", MIDDLE_PARTITION, "part-0.parquet")
TRUNCATED_PARQUET = (BAD_PART, "valid Parquet")


# ----------------------------------------------------------------------------- train.py


def _train_argv(w: Workspace, extra: list[str]) -> list[str]:
    return ["--feature-store-path", w.store, "--output-dir", w.path("out"), *TINY_TRAINING, "--shap-samples", "0", *extra]


TRAIN_CASES = [
    pytest.param(lambda w: ["--feature-store-path", w.corrupt_store(_half)], TRUNCATED_PARQUET, id="truncated-partition"),
    pytest.param(lambda w: ["--feature-store-path", w.corrupt_store(lambda data: b"")], TRUNCATED_PARQUET, id="empty-partition"),
    pytest.param(
        lambda w: ["--feature-store-path", w.corrupt_store(_scribbled)],
        ("cannot read", BAD_PART, "of the feature store", "rewrite or remove that file"),
        id="scribbled-partition",
    ),
    pytest.param(lambda w: ["--anchor-minutes", "99"], ("--anchor-minutes 99 is longer than the window", "use at most"), id="anchor-past-window"),
]


@pytest.mark.parametrize("case, messages", TRAIN_CASES)
def test_train_refuses(capsys, workspace, case, messages):
    assert_refused(capsys, workspace, train.main, _train_argv(workspace, case(workspace)), messages)


# ----------------------------------------------------------------------------- backtest.py

# the tiny store spans 2024-05-01 to 2024-05-04: two folds of 2 days + half a day
WINDOWS = ["--train-window-days", "2", "--val-window-days", "0.5"]


def _backtest_argv(w: Workspace, extra: list[str]) -> list[str]:
    return ["--feature-store-path", w.store, "--output", w.path("out/backtest.json"), *TINY_TRAINING, *WINDOWS, "--num-threads", "1", *extra]


BACKTEST_CASES = [
    pytest.param(
        lambda w: ["--train-window-days", "3"],
        ("the data spans 3 days", "one fold needs --train-window-days + --val-window-days = 3.5 days", "shorten the windows"),
        id="windows-longer-than-the-store",
    ),
    pytest.param(
        lambda w: ["--train-window-days", "30", "--val-window-days", "7"],
        ("the data spans 3 days", "= 37 days", "use a longer store"),
        id="each-window-longer-than-the-store",
    ),
    pytest.param(
        lambda w: ["--train-window-days", "0.005"],
        ("training window leaves", "sequence length + horizon = 8 minutes", "lengthen --train-window-days"),
        id="train-window-shorter-than-L+H",
    ),
    pytest.param(
        lambda w: ["--val-window-days", "0.005"],
        ("--val-window-days 0.005", "embargo + sequence length + horizon = 16 minutes"),
        id="validation-window-shorter-than-embargo+L+H",
    ),
    pytest.param(lambda w: ["--train-window-days", "0"], ("--train-window-days must be positive",), id="zero-train-days"),
    pytest.param(lambda w: ["--train-window-days", "-2"], ("--train-window-days must be positive", "-2"), id="negative-train-days"),
    pytest.param(lambda w: ["--val-window-days", "0"], ("--val-window-days must be positive",), id="zero-validation-days"),
    pytest.param(lambda w: ["--val-window-days", "-1"], ("--val-window-days must be positive",), id="negative-validation-days"),
    pytest.param(lambda w: ["--step-days", "0"], ("--step-days must be positive",), id="zero-step-days"),
    pytest.param(lambda w: ["--step-days", "-0.5"], ("--step-days must be positive",), id="negative-step-days"),
    pytest.param(lambda w: ["--train-window-days", "nan"], ("--train-window-days must be positive", "nan"), id="nan-train-days"),
    pytest.param(lambda w: ["--jobs", "0"], ("--jobs must be at least 1, got 0",), id="jobs-0"),
    pytest.param(lambda w: ["--jobs", "-3"], ("--jobs must be at least 1, got -3",), id="negative-jobs"),
    pytest.param(lambda w: ["--output", w.path("")], ("is a directory", "name the file"), id="output-is-a-directory"),
    pytest.param(lambda w: ["--feature-store-path", w.corrupt_store(_half)], TRUNCATED_PARQUET, id="truncated-partition"),
]


@pytest.mark.parametrize("case, messages", BACKTEST_CASES)
def test_backtest_refuses(capsys, workspace, case, messages):
    assert_refused(capsys, workspace, backtest.main, _backtest_argv(workspace, case(workspace)), messages)


# ----------------------------------------------------------------------------- checkpoints (analyze_causality.py and forecast.py)


def _store_without_a_feature(w: Workspace) -> str:
    frame = w.frame()
    frame = frame[frame["timestamp"] >= frame["timestamp"].max() - pd.Timedelta(hours=2)].drop(columns=synthetic.FEATURE_COLUMNS[0])
    frame.to_parquet(w.path("without_a_feature.parquet"), index=False)
    return w.path("without_a_feature.parquet")


def _scaler_of_another_run(w: Workspace) -> str:
    """A scaler with the checkpoint's features but other statistics, as another run fits."""
    scaler = w.scaler()
    return w.save("other_scaler.pt", {**scaler, "mean": scaler["mean"] + 1.0})


def _malicious_checkpoint(w: Workspace) -> str:
    return w.save("malicious.pt", {**w.checkpoint(), "config": Payload(w.marker)})


def _beside_a_copy(w: Workspace, saved_trees: bytes | None, digest_of: bytes | None = None) -> str:
    """A copy of the checkpoint in the case's directory with ``saved_trees`` beside it as its
    gradient-boosting member (none when None); its recorded digest is that of ``digest_of``
    (default: of ``saved_trees``, as an attacker who rewrites both would write it)."""
    checkpoint = w.checkpoint()
    record = dict(checkpoint["gradient_boosting"])
    if saved_trees is not None:
        with open(w.path(record["file"]), "wb") as stream:
            stream.write(saved_trees)
    record["sha256"] = hashlib.sha256(digest_of if digest_of is not None else saved_trees or b"").hexdigest()
    return w.save(CHECKPOINT, {**checkpoint, "gradient_boosting": record})


def _malicious_trees(w: Workspace) -> str:
    """A skops file that would call ``os.system`` when rebuilt, beside a checkpoint that vouches for it."""
    return _beside_a_copy(w, skops.io.dumps(functools.partial(os.system, f"touch {shlex.quote(str(w.marker))}")))


def _trees_of_another_run(w: Workspace) -> str:
    trees = open(f"{w.trained}/gradient_boosting.skops", "rb").read()
    return _beside_a_copy(w, trees, digest_of=trees + b"another run")


def _malicious_legacy_pickle(w: Workspace) -> str:
    """A plain pickle (torch's legacy, non-zip format) that runs its payload when loaded."""
    with open(w.path("legacy.pt"), "wb") as stream:
        pickle.dump({"format_version": 3, "state_dict": Payload(w.marker)}, stream, protocol=2)
    return w.path("legacy.pt")


def _truncated_checkpoint(w: Workspace) -> str:
    data = open(f"{w.trained}/{CHECKPOINT}", "rb").read()
    open(w.path("truncated.pt"), "wb").write(_half(data))
    return w.path("truncated.pt")


REFUSED_PICKLE = ("cannot load", "UnpicklingError", "pass a file written by train.py")

CHECKPOINT_CASES = [
    pytest.param(
        lambda w: ["--model-checkpoint", w.save("v2.pt", {**w.checkpoint(), "format_version": 2})],
        ("has format_version 2, this version reads 4", "retrain it with train.py"),
        id="checkpoint-of-another-format-version",
    ),
    pytest.param(
        lambda w: ["--model-checkpoint", _truncated_checkpoint(w)],
        ("cannot load checkpoint", "truncated.pt", "pass a file written by train.py"),
        id="truncated-checkpoint",
    ),
    pytest.param(
        lambda w: ["--model-checkpoint", w.path("absent.pt")],
        ("checkpoint", "absent.pt does not exist", "run train.py first or pass --model-checkpoint"),
        id="missing-checkpoint",
    ),
    pytest.param(
        lambda w: ["--model-checkpoint", f"{w.history}/{CHECKPOINT}"],
        ("scaler features", "do not match the checkpoint's", "pass the scaler.pt saved beside this checkpoint"),
        id="checkpoint-and-scaler-of-two-runs",
    ),
    pytest.param(
        lambda w: ["--scaler-path", _scaler_of_another_run(w)],
        ("the scaler was not saved with checkpoint", "different train.py runs", "pass the scaler.pt written beside"),
        id="scaler-of-another-run-same-features",
    ),
    pytest.param(
        lambda w: ["--feature-store-path", _store_without_a_feature(w)],
        ("does not hold the model's features", synthetic.FEATURE_COLUMNS[0], "use a store of the kind the model was trained on"),
        id="checkpoint-features-missing-from-the-store",
    ),
    pytest.param(lambda w: ["--model-checkpoint", _malicious_checkpoint(w)], REFUSED_PICKLE, id="malicious-checkpoint"),
    pytest.param(
        lambda w: ["--model-checkpoint", _malicious_trees(w)],
        ("refusing gradient_boosting.skops", "types this toolkit does not trust: posix.system", "retrain with train.py"),
        id="malicious-gradient-boosting-member",
    ),
    pytest.param(
        lambda w: ["--model-checkpoint", _beside_a_copy(w, None)],
        ("needs gradient_boosting.skops beside it", "copy it with the checkpoint or retrain"),
        id="gradient-boosting-member-missing",
    ),
    pytest.param(
        lambda w: ["--model-checkpoint", _trees_of_another_run(w)],
        ("gradient_boosting.skops was not saved with checkpoint", "use the one written beside it"),
        id="gradient-boosting-member-of-another-run",
    ),
    pytest.param(lambda w: ["--model-checkpoint", _malicious_legacy_pickle(w)], REFUSED_PICKLE, id="malicious-legacy-pickle"),
    pytest.param(
        lambda w: ["--scaler-path", w.save("malicious_scaler.pt", {**w.scaler(), "mean": Payload(w.marker)})],
        (*REFUSED_PICKLE, "scaler"),
        id="malicious-scaler",
    ),
]


def test_the_malicious_trees_would_run_code_if_trusted(workspace):
    """The skops payload is real: trusted blindly, rebuilding it returns the call that runs code."""
    path = os.path.join(os.path.dirname(_malicious_trees(workspace)), "gradient_boosting.skops")
    data = open(path, "rb").read()
    skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))()
    assert workspace.marker.exists()


def test_the_malicious_pickle_would_run_code(workspace):
    """The payload is real: unpickled without ``weights_only`` it runs (so the refusals above mean something)."""
    torch.load(_malicious_checkpoint(workspace), map_location="cpu", weights_only=False)
    assert workspace.marker.exists()


# ----------------------------------------------------------------------------- analyze_causality.py


def _analyze_argv(w: Workspace, extra: list[str]) -> list[str]:
    return [
        "--model-checkpoint", f"{w.trained}/{CHECKPOINT}", "--scaler-path", f"{w.trained}/{SCALER}",
        "--feature-store-path", w.store, "--output", w.path("out/causality_report.json"), "--max-samples", "2", *extra,
    ]


def _fault(**changes) -> dict:
    return {
        "service": "payment", "start": "2024-05-02T10:00:00Z", "end": "2024-05-02T10:20:00Z",
        "fault": "cpu", "root_cause_feature": "cpu_rolling_avg", **changes,
    }


def _manifest_a_year_earlier(w: Workspace) -> str:
    faults = w.fixture("tiny_frame")[1]
    shift = pd.Timedelta(days=365)
    moved = [
        {**fault, "start": (pd.Timestamp(fault["start"]) - shift).isoformat(), "end": (pd.Timestamp(fault["end"]) - shift).isoformat()}
        for fault in faults
    ]
    return w.manifest(moved)


def _blocked(w: Workspace, name: str) -> str:
    """A path inside a regular file: no directory can be made there, whoever runs the test."""
    open(w.path("a-file"), "w").close()
    return w.path(f"a-file/{name}")


ANALYZE_CASES = [
    *CHECKPOINT_CASES,
    pytest.param(
        lambda w: ["--model-checkpoint", w.save("bare.pt", {**w.checkpoint(), "explain_background": None})],
        ("carries no explanation background", "retrain it with train.py"),
        id="checkpoint-without-explanation-background",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest("[{'service': 'payment',")],
        ("cannot read chaos manifest", "JSONDecodeError", "it must be a JSON list of faults"),
        id="manifest-not-json",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest({"faults": [_fault()]})],
        ("is not a JSON list of faults", "see the contract"),
        id="manifest-not-a-list",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest([{"svc": "payment", "from": "2024-05-02T10:00:00Z", "to": "2024-05-02T10:20:00Z", "kind": "cpu"}])],
        ("fault 0 is not an object with service, start, end, fault", "fix the manifest"),
        id="manifest-with-unknown-keys",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest([_fault(), _fault(start="yesterday")])],
        ("fault 1: start", "'yesterday' is not a timestamp", "use ISO-8601"),
        id="manifest-bad-timestamp",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest([_fault(end="2024-05-02T09:00:00Z")])],
        ("fault 0 ends (2024-05-02T09:00:00Z) before it starts", "fix the manifest"),
        id="manifest-fault-ends-before-it-starts",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest([_fault(root_cause_feature=3)])],
        ("root_cause_feature must be a column name or null",),
        id="manifest-root-cause-not-a-name",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", _manifest_a_year_earlier(w)],
        ("none of the", "faults of the chaos manifest", "analysed window", "pass the manifest of the chaos run"),
        id="faults-outside-the-window",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.manifest([_fault()]), "--start-ts", "2024-05-03T00:00:00Z"],
        ("none of the 1 faults", "2024-05-03T00:00:00Z", "widen --start-ts/--end-ts"),
        id="faults-before-the-start",
    ),
    pytest.param(
        lambda w: ["--chaos-manifest", w.path("absent.json")],
        ("chaos manifest", "absent.json does not exist", "pass the chaos_manifest.json"),
        id="missing-manifest",
    ),
    pytest.param(
        lambda w: ["--start-ts", "2024-05-03", "--end-ts", "2024-05-02"],
        ("--start-ts 2024-05-03 is not before --end-ts 2024-05-02", "swap or widen the range"),
        id="start-after-end",
    ),
    pytest.param(
        lambda w: ["--start-ts", "2024-05-02T00:00:00Z", "--end-ts", "2024-05-02T00:00:00Z"],
        ("is not before",),
        id="start-equals-end",
    ),
    pytest.param(lambda w: ["--start-ts", "2031-01-01"], ("has no rows", "check the path and the time range"), id="range-after-the-store"),
    pytest.param(
        lambda w: ["--start-ts", "2024-05-01T00:00:00Z", "--end-ts", "2024-05-01T00:05:00Z"],
        ("no complete window forecasts a minute between", "widen --start-ts/--end-ts"),
        id="range-shorter-than-a-window",
    ),
    pytest.param(lambda w: ["--output", w.path("report.txt")], ("--output must name a .json file",), id="output-not-json"),
    pytest.param(lambda w: ["--end-ts", "tomorrow"], ("--end-ts 'tomorrow' is not a timestamp", "use ISO-8601"), id="end-not-a-timestamp"),
    pytest.param(
        lambda w: ["--output", _blocked(w, "causality_report.json"), "--start-ts", "2024-05-02T00:00:00Z", "--end-ts", "2024-05-02T01:00:00Z"],
        ("cannot write to output directory", "a-file", "choose another path"),
        id="unwritable-output",
    ),
]


@pytest.mark.parametrize("case, messages", ANALYZE_CASES)
def test_analyze_causality_refuses(capsys, workspace, case, messages):
    assert_refused(capsys, workspace, analyze_causality.main, _analyze_argv(workspace, case(workspace)), messages)


# ----------------------------------------------------------------------------- forecast.py


EARLIER = {"out/forecasts.json": b'{"earlier": "run"}\n', "out/latency_forecast.prom": b"# earlier run\n"}


def _forecast_argv(w: Workspace, extra: list[str]) -> list[str]:
    """The usual every-minute run, where the outputs of the run a minute ago are already there."""
    for name, content in EARLIER.items():
        Path(w.path(name)).parent.mkdir(exist_ok=True)
        Path(w.path(name)).write_bytes(content)
    return [
        "--model-checkpoint", f"{w.trained}/{CHECKPOINT}", "--scaler-path", f"{w.trained}/{SCALER}",
        "--feature-store-path", w.store, "--output", w.path("out/forecasts.json"),
        "--prometheus-textfile", w.path("out/latency_forecast.prom"), *extra,
    ]


def _store_of_other_services(w: Workspace) -> str:
    frame = w.frame()
    frame = frame[frame["timestamp"] >= frame["timestamp"].max() - pd.Timedelta(hours=2)].copy()
    frame["service"] = "ghost-" + frame["service"].astype(str)
    frame.to_parquet(w.path("other_fleet.parquet"), index=False)
    return w.path("other_fleet.parquet")


FORECAST_CASES = [
    *CHECKPOINT_CASES,
    pytest.param(
        lambda w: ["--feature-store-path", _store_of_other_services(w)],
        ("holds none of the checkpoint's services", "forecast a store of the fleet the model was trained on"),
        id="store-without-the-checkpoints-services",
    ),
    pytest.param(
        lambda w: ["--at", "2030-01-01T00:00:00Z"],
        ("--at 2030-01-01T00:00:00Z is outside the store", "2024-05-01T00:00:00Z", "pick a minute inside it or leave --at out"),
        id="at-after-the-store",
    ),
    pytest.param(lambda w: ["--at", "2024-04-30T23:59:00Z"], ("is outside the store", "pick a minute inside it"), id="at-before-the-store"),
    pytest.param(lambda w: ["--at", "noon"], ("--at 'noon' is not a timestamp", "use ISO-8601"), id="at-not-a-timestamp"),
    pytest.param(
        lambda w: ["--prometheus-textfile", w.path("no-such-dir/latency_forecast.prom")],
        ("cannot write --prometheus-textfile", "no-such-dir", "create its directory or choose another path"),
        id="textfile-in-a-missing-directory",
    ),
    pytest.param(
        lambda w: ["--prometheus-textfile", w.path("out")],
        ("cannot write --prometheus-textfile", "it is a directory", "name a file in it"),
        id="textfile-is-a-directory",
    ),
    pytest.param(
        lambda w: ["--output", _blocked(w, "forecasts.json")],
        ("cannot write to output directory", "a-file", "choose another path"),
        id="unwritable-output",
    ),
    pytest.param(lambda w: ["--feature-store-path", w.corrupt_store(_half)], TRUNCATED_PARQUET, id="truncated-partition"),
]


@pytest.mark.parametrize("case, messages", FORECAST_CASES)
def test_forecast_refuses(capsys, workspace, case, messages):
    argv = _forecast_argv(workspace, case(workspace))
    assert_refused(capsys, workspace, forecast.main, argv, messages)
    for name, content in EARLIER.items():
        assert Path(workspace.path(name)).read_bytes() == content


def test_forecast_good_run_replaces_both_earlier_files(capsys, workspace):
    """The control of the table above: the same argv without a bad input replaces both files and
    leaves nothing else behind (no staging directory)."""
    code = forecast.main(_forecast_argv(workspace, []))
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(workspace.path("out"))) == ["forecasts.json", "latency_forecast.prom"]
    assert json.loads(Path(workspace.path("out/forecasts.json")).read_text())["forecasts"]
    assert Path(workspace.path("out/latency_forecast.prom")).read_text().startswith("# HELP latency_forecast_")
