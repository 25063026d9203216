"""artifacts.py: JSON without NaN, atomic files with the usual mode, staged runs that commit all or
nothing, swapping a directory in, torch files read back with weights_only=True, and the resume
directory."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from latency_forecast import artifacts
from latency_forecast.errors import UserError


def test_json_has_no_nan_and_handles_numpy(tmp_path):
    path = tmp_path / "m.json"
    artifacts.write_json({"a": np.float32(1.5), "b": float("nan"), "c": [np.int64(3), float("inf")], "d": np.arange(2)}, str(path))
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [3, None], "d": [0, 1]}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        artifacts.write_json({"x": object()}, str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists() and [p.name for p in tmp_path.iterdir()] == ["m.json"], "no temporary left behind"


def test_atomic_files_get_the_usual_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        artifacts.write_text("hello\n", str(tmp_path / "a.txt"))
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644, "readable by a dashboard, not mkstemp's 0600"


def test_staged_run_commits_all_or_nothing(tmp_path):
    out = tmp_path / "artifacts"
    with artifacts.staged(str(out)) as stage:
        stage.write_json("metrics.json", {"run": 1})
        stage.save_torch("model.pt", {"w": torch.ones(2)})
        assert not (out / "metrics.json").exists(), "nothing is in place before the run succeeds"
    assert json.loads((out / "metrics.json").read_text()) == {"run": 1}
    assert torch.equal(torch.load(out / "model.pt", weights_only=True)["w"], torch.ones(2))
    with pytest.raises(RuntimeError):
        with artifacts.staged(str(out)) as stage:
            stage.write_json("metrics.json", {"run": 2})
            raise RuntimeError("crash after the first file")
    assert json.loads((out / "metrics.json").read_text()) == {"run": 1}, "earlier artifacts survive"
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt"], "no staging debris"


def test_an_unwritable_output_directory_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to output directory .*; choose another path"):
        with artifacts.staged(str(blocker / "out")):
            pass


def test_replace_directory_swaps_in_one_step(tmp_path):
    target = tmp_path / "store"
    for generation in ("old", "new"):
        with artifacts.staging_directory(str(target)) as staging:
            (open(os.path.join(staging, "part.txt"), "w")).write(generation)
            artifacts.replace_directory(staging, str(target))
    assert (target / "part.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["store"], "no staging or retired directory left"
    (tmp_path / "plain").write_text("")
    with artifacts.staging_directory(str(tmp_path / "plain")) as staging:
        with pytest.raises(UserError, match="exists and is not a directory"):
            artifacts.replace_directory(staging, str(tmp_path / "plain"))


def test_torch_files_are_read_weights_only_and_errors_are_user_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3), "name": "x"}, good)
    loaded = artifacts.load_torch(str(good), "checkpoint", "--model-checkpoint")
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["name"] == "x"
    with pytest.raises(UserError, match=r"checkpoint .*missing.pt does not exist; run train.py first or pass --model-checkpoint"):
        artifacts.load_torch(str(tmp_path / "missing.pt"), "checkpoint", "--model-checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load scaler .*garbage.pt"):
        artifacts.load_torch(str(garbage), "scaler", "--scaler-path")
    code = tmp_path / "code.pt"
    torch.save({"w": np.ones(2)}, code)  # a numpy array is pickled code, refused under weights_only
    with pytest.raises(UserError, match="cannot load checkpoint"):
        artifacts.load_torch(str(code), "checkpoint", "--model-checkpoint")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(UserError, match="is not a checkpoint written by train.py"):
        artifacts.load_torch(str(listed), "checkpoint", "--model-checkpoint")


def test_the_resume_directory_is_emptied_for_a_fresh_run_and_kept_with_resume(tmp_path):
    path = str(tmp_path / ".resume")
    assert artifacts.resume_directory(str(tmp_path), ".resume", resume=True) == (path, False), "nothing saved yet: a first start"
    artifacts.save_torch_atomic({"epoch": 0}, os.path.join(path, "forecaster.pt"))
    open(os.path.join(path, ".tmp-cut-short"), "wb").close()
    assert artifacts.resume_directory(str(tmp_path), ".resume", resume=True) == (path, True)
    assert artifacts.resume_directory(str(tmp_path), ".resume", resume=False) == (path, False) and not os.path.exists(path)
    os.makedirs(path)
    open(os.path.join(path, ".tmp-cut-short"), "wb").close()
    assert artifacts.resume_directory(str(tmp_path), ".resume", resume=True) == (path, False), "a write cut short is no saved state"
