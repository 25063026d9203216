import json
import os

import numpy as np
import pytest
import torch

from latency_forecast import artifacts
from latency_forecast.errors import UserError


def test_json_has_no_nan_and_handles_numpy(tmp_path):
    path = tmp_path / "m.json"
    artifacts.write_json({"a": np.float32(1.5), "b": float("nan"), "c": [np.int64(3)], "d": np.arange(2)}, str(path))
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [3], "d": [0, 1]}


def test_staged_run_commits_all_or_nothing(tmp_path):
    out = tmp_path / "artifacts"
    with artifacts.staged(str(out)) as stage:
        stage.write_json("metrics.json", {"run": 1})
        stage.save_torch("model.pt", {"w": torch.ones(2)})
    assert json.loads((out / "metrics.json").read_text()) == {"run": 1}
    with pytest.raises(RuntimeError):
        with artifacts.staged(str(out)) as stage:
            stage.write_json("metrics.json", {"run": 2})
            raise RuntimeError("crash after the first file")
    assert json.loads((out / "metrics.json").read_text()) == {"run": 1}, "earlier artifacts survive"
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt"], "no staging debris"


def test_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        artifacts.load_checkpoint(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        artifacts.load_checkpoint(str(garbage))
    old = tmp_path / "old.pt"
    torch.save({"format_version": 0, "state_dict": {}}, old)
    with pytest.raises(UserError, match="format_version 0"):
        artifacts.load_checkpoint(str(old))
    scaler = tmp_path / "scaler.pt"
    torch.save({"mean": torch.zeros(1)}, scaler)
    with pytest.raises(UserError, match="lacks scale, feature_columns"):
        artifacts.load_scaler_state(str(scaler))
