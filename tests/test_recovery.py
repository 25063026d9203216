"""Runs that survive the real world: SIGKILL mid-epoch and --resume, SIGTERM in the first epoch and
the same command again, a kill between two renames of the commit, concurrent runs into one
directory, and determinism. The kills are real signals to real train.py subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import train
from latency_forecast import artifacts
from tests.helpers import TINY_TRAINING, assert_one_line_error, without

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# long enough to be killed in the middle; one thread, so the subprocess and this process compute alike
SLOW = ["--epochs", "12", "--patience", "12", "--samples-per-epoch", "6000", "--num-threads", "1", "--shap-samples", "0"]


def _argv(store: str, out, *extra: str) -> list[str]:
    return ["--feature-store-path", store, "--output-dir", str(out), *TINY_TRAINING, *SLOW, *extra]


def _artifacts(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory)) if not name.startswith(".")}


def _weights(directory) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(directory, "latency_forecaster.pt"), weights_only=True)["state_dict"]


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(process: subprocess.Popen, state: str, epochs: int = 1, timeout: float = 120.0) -> None:
    """Until the training state after ``epochs`` epochs is saved (the run is then in the next one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"train.py ended before it could be interrupted: {process.stderr.read()}"
        if os.path.exists(state):
            try:
                if torch.load(state, weights_only=True)["epoch"] >= epochs:
                    return
            except (RuntimeError, EOFError, KeyError):  # replaced while being read
                pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no training state saved in time")


@pytest.fixture(scope="module")
def uninterrupted(tiny_store, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main(_argv(tiny_store, out)) == 0
    return str(out)


def test_sigkill_mid_epoch_keeps_earlier_artifacts_and_resume_ends_exactly_as_uninterrupted(tiny_store, tmp_path, uninterrupted):
    out = tmp_path / "out"
    assert train.main(_argv(tiny_store, out, "--seed", "5")) == 0  # an earlier run's artifacts
    earlier = _artifacts(out)

    process = _start(_argv(tiny_store, out))
    _wait_for_epoch(process, str(out / train.RESUME_DIR / "forecaster.pt"), epochs=2)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert _artifacts(out) == earlier, "the killed run changed an earlier artifact"

    assert train.main([*_argv(tiny_store, out), "--resume"]) == 0
    assert _artifacts(out)["metrics.json"] == _artifacts(uninterrupted)["metrics.json"]
    resumed, reference = _weights(out), _weights(uninterrupted)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[key], reference[key]) for key in reference)
    assert not os.path.exists(out / train.RESUME_DIR), "a finished run leaves nothing to resume"
    assert [name for name in os.listdir(out) if name.startswith(".")] == []


# A first epoch of 188 batches (1-2 s) to stop in its middle; one command line for the first start and
# every retry, as a Kubernetes Job or a Slurm script runs it. Not --quiet: its lines say where training is.
RETRIED = [*without(TINY_TRAINING, "--quiet"), "--samples-per-epoch", "6000", "--batch-size", "32", "--num-threads", "1",
           "--shap-samples", "0", "--baselines", "persistence", "--resume"]


def test_sigterm_in_the_first_epoch_saves_its_batch_exits_143_and_the_same_command_ends_as_uninterrupted(tiny_store, tmp_path, capsys):
    def argv(out) -> list[str]:
        return ["--feature-store-path", tiny_store, "--output-dir", str(out), *RETRIED]

    uninterrupted = tmp_path / "uninterrupted"
    assert train.main(argv(uninterrupted)) == 0, "--resume with nothing saved: a first start"
    assert f"--resume: no saved training state in {uninterrupted}; starting from the beginning" in capsys.readouterr().out

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-u", "train.py", *argv(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # printed inside the training loop's section, where a signal waits for the next batch
    started = next((line for line in process.stdout if line.startswith("training from the start")), None)
    assert started is not None, process.stderr.read()
    time.sleep(0.3)  # some batches into the first epoch
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    lines = process.stderr.read().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM") and "--resume" in lines[0], lines
    assert not [name for name in os.listdir(out) if not name.startswith(".")], "no artifact of a stopped run"
    state = torch.load(out / train.RESUME_DIR / "forecaster.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["batch"] < 188, "saved at a batch boundary of the first epoch"

    assert_one_line_error(capsys, train.main([*argv(out), "--learning-rate", "0.01"]), "--resume", "other settings or data")
    assert train.main(argv(out)) == 0
    assert f"resuming in epoch 1 after batch {state['batch']}" in capsys.readouterr().out
    resumed, reference = _artifacts(out), _artifacts(uninterrupted)
    for name in ("metrics.json", "latency_forecaster.pt", "scaler.pt"):
        assert resumed[name] == reference[name], f"{name} differs from the uninterrupted run's"


def test_a_second_run_into_the_same_directory_is_refused(tiny_store, tmp_path, capsys):
    with artifacts.output_lock(str(tmp_path)):
        code = train.main(_argv(tiny_store, tmp_path))
    assert_one_line_error(capsys, code, "another run", f"is writing into {tmp_path}")
    assert os.listdir(tmp_path) == []


def test_a_kill_between_two_renames_of_the_commit_is_rolled_forward(tmp_path):
    out = tmp_path / "out"
    artifacts.write_json({"run": "old"}, str(out / "metrics.json"))
    artifacts.write_json({"run": "old"}, str(out / "config.json"))
    artifacts.save_torch_atomic({"run": "old"}, str(out / "model.pt"))
    # the writer dies by SIGKILL right after its first file is moved into place (the renames out of
    # the staging directory are its commit marker's, then the files')
    script = textwrap.dedent(f"""
        import os, signal
        from latency_forecast import artifacts
        real_replace = os.replace
        def replace(source, target):
            real_replace(source, target)
            if os.path.dirname(target) == {str(out)!r}:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        with artifacts.staged({str(out)!r}) as stage:
            stage.save_torch("model.pt", {{"run": "new"}})
            stage.write_json("metrics.json", {{"run": "new"}})
            stage.write_json("config.json", {{"run": "new"}})
    """)
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT).returncode == -signal.SIGKILL
    # the window: one file of the new run beside two of the old one
    assert torch.load(out / "model.pt", weights_only=True) == {"run": "new"}
    assert [json.loads(open(out / name).read())["run"] for name in ("metrics.json", "config.json")] == ["old", "old"]

    # any loader (or the next run, under its lock) finishes the commit: one run's files, whole
    assert artifacts.load_torch(str(out / "model.pt"), "checkpoint", "--model-checkpoint") == {"run": "new"}
    assert {name: json.loads(open(out / name).read())["run"] for name in ("metrics.json", "config.json")} == {
        "metrics.json": "new", "config.json": "new"
    }
    assert sorted(os.listdir(out)) == ["config.json", "metrics.json", "model.pt"]


def test_a_staging_directory_of_a_dead_run_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{artifacts.STAGING_PREFIX}{dead.stdout.strip()}-abc"
    live = tmp_path / f"{artifacts.STAGING_PREFIX}{os.getpid()}-def"
    for directory in (stale, live):
        directory.mkdir()
        (directory / "metrics.json").write_text("{}")
    artifacts.recover(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [live.name]


def test_the_same_command_twice_gives_byte_identical_metrics_and_weights(tiny_store, tmp_path, uninterrupted):
    again = tmp_path / "again"
    assert train.main(_argv(tiny_store, again)) == 0
    first, second = _artifacts(uninterrupted), _artifacts(again)
    for name in ("metrics.json", "config.json", "latency_forecaster.pt", "scaler.pt"):
        assert first[name] == second[name], f"{name} differs between two identical runs"
