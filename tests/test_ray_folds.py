"""backtest.py --executor ray end to end on a local Ray instance: the same folds as --jobs 1,
its sockets on loopback only, and the user errors of a missing Ray or a misplaced --ray-address."""

import importlib.util
import ipaddress
import json
import os
import subprocess
import sys

import pytest

import backtest
from latency_forecast import ray_folds
from latency_forecast.errors import UserError
from tests.helpers import TINY_TRAINING

# The tiny store covers 2024-05-01 to 2024-05-04: two folds of 2 days + half a day.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS = ["--train-window-days", "2", "--val-window-days", "0.5"]


def _argv(tiny_store, output, *extra):
    return ["--feature-store-path", tiny_store, "--output", str(output), *TINY_TRAINING, *WINDOWS, "--num-threads", "1", *extra]


def _folds(report):
    return [{key: value for key, value in fold.items() if key != "seconds"} for fold in report["folds"]]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray (requirements-ray.txt)")
def test_ray_tasks_give_the_same_folds_as_one_job(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no report to usage-stats.ray.io from a test
    reports = {}
    for name, extra in (("one_job", ["--jobs", "1"]), ("ray", ["--executor", "ray", "--jobs", "2"])):
        output = tmp_path / name / "backtest.json"
        assert backtest.main(_argv(tiny_store, output, *extra)) == 0
        reports[name] = json.loads(output.read_text())
    assert not sys.modules["ray"].is_initialized()  # the local instance was shut down with the run
    one_job, on_ray = reports["one_job"], reports["ray"]
    assert [fold["fold"] for fold in on_ray["folds"]] == [1, 2]
    assert _folds(on_ray) == _folds(one_job)
    assert on_ray["summary"] == one_job["summary"]
    assert on_ray["config"]["backtest"]["executor"] == "ray" and on_ray["config"]["backtest"]["ray_address"] is None
    assert on_ray["config"]["resolved"]["jobs"] == 2


def test_ray_task_options_share_cpus_and_gpus():
    assert ray_folds.ray_task_options(0, 2, 3, "auto") == {"num_cpus": 3, "num_gpus": 0}
    assert ray_folds.ray_task_options(4, 2, 3, "cpu") == {"num_cpus": 3, "num_gpus": 0}
    assert ray_folds.ray_task_options(1, 3, 1, "auto") == {"num_cpus": 1, "num_gpus": 0.3333}
    assert ray_folds.ray_task_options(8, 2, 0, "cuda") == {"num_cpus": 1, "num_gpus": 1.0}
    with pytest.raises(UserError, match="no GPU"):
        ray_folds.ray_task_options(0, 2, 1, "cuda")


def _one_line_error(capsys, argv, message):
    code = backtest.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_executor_ray_without_ray_exits_2(capsys, tiny_store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    argv = _argv(tiny_store, tmp_path / "b.json", "--executor", "ray")
    _one_line_error(capsys, argv, "--executor ray needs Ray: pip install -r requirements-ray.txt")
    assert not list(tmp_path.iterdir())


def test_ray_address_without_executor_ray_exits_2(capsys, tiny_store, tmp_path):
    argv = _argv(tiny_store, tmp_path / "b.json", "--ray-address", "auto")
    _one_line_error(capsys, argv, "--ray-address auto is only used with --executor ray")


LOOPBACK_PROBE = """
import json, os
from latency_forecast import ray_folds
from tests.helpers import listening_addresses

def worker_pid():
    return os.getpid()

if __name__ == "__main__":  # Ray's workers load the driver's code too
    ray = ray_folds.import_ray(local=True)
    with ray_folds.ray_session(ray, None, 1, "cpu"):
        assert ray.get(ray.remote(worker_pid).remote()) != os.getpid()  # a worker is up, with its own server
        print(json.dumps(listening_addresses(os.getpid())))
"""


@pytest.mark.skipif(importlib.util.find_spec("ray") is None or not os.path.exists("/proc/net/tcp"), reason="needs Ray and Linux's /proc")
def test_the_local_ray_instance_listens_on_loopback_only(tmp_path):
    # A fresh interpreter: the choice is made when ray is first imported. Without it Ray binds
    # its GCS, raylet and workers on every interface (ss -ltn shows *:PORT).
    environment = {key: value for key, value in os.environ.items() if key != ray_folds.SINGLE_NODE_ENV}
    environment.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPOSITORY)
    script = tmp_path / "probe.py"
    script.write_text(LOOPBACK_PROBE)
    probe = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment, timeout=240)
    assert probe.returncode == 0, probe.stderr[-2000:]
    addresses = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(addresses) >= 3, addresses  # the GCS, the raylet and a worker at least
    assert all(_is_loopback(address.rsplit(":", 1)[0]) for address in addresses), addresses


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too
