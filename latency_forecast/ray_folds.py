"""Backtest folds as Ray tasks: a local single-node instance that listens on the loopback address
only, or a cluster this package is shipped to; each fold's CPUs and share of the GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from types import ModuleType
from typing import Callable, Iterator, TypeVar

from latency_forecast.errors import UserError

Task = TypeVar("Task")
Result = TypeVar("Result")

# The local instance's shared memory for task arguments and results: a fold's rows and result are
# megabytes, and Ray spills to disk beyond it rather than failing.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


# Ray's single-node mode (its default on macOS and Windows): a local instance takes 127.0.0.1 as
# its node address and binds every server there. On Linux Ray otherwise takes the host's
# routable address and listens on every interface, a cluster port open to the network for a run
# that never leaves the host. Read once, when ray is first imported; its processes inherit it.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(local: bool) -> ModuleType:
    """The ``ray`` module, imported only when ``--executor ray`` asks for it; ``local`` (no
    cluster to join) keeps the instance it starts on the loopback address unless the
    environment already chose (SINGLE_NODE_ENV)."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault(SINGLE_NODE_ENV, "0")
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install -r requirements-ray.txt") from None
    return ray


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


@contextlib.contextmanager
def ray_session(ray: ModuleType, address: str | None, cpus: int, device: str) -> Iterator[None]:
    """Ray, connected for the ``with`` block: to the cluster at ``address``, or, without one, to a
    local instance started with ``cpus`` CPUs (no GPU for ``device`` cpu), no dashboard and a
    small object store, shut down when the block ends. A session already open is used as it is.

    A cluster gets this package shipped to its workers (``runtime_env`` ``py_modules``), so its
    nodes need the dependencies of requirements.txt but not a copy of this code.
    """
    if ray.is_initialized():
        yield
        return
    package = os.path.dirname(os.path.abspath(__file__))
    if address is None:
        ray.init(
            num_cpus=cpus,
            num_gpus=0 if device == "cpu" else None,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            logging_level=logging.WARNING,
            # the workers import this package from where the driver did, whatever their directory
            job_config=ray.job_config.JobConfig(code_search_path=[os.path.dirname(package)]),
        )
    else:
        try:
            ray.init(address=address, runtime_env={"py_modules": [package]}, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
            raise UserError(
                f"--ray-address {address}: cannot join that Ray cluster ({_first_line(error)}); "
                "start it (ray start --head) or leave out --ray-address to start a local one"
            ) from None
    try:
        yield
    finally:
        ray.shutdown()


def ray_task_options(cluster_gpus: float, jobs: int, threads: int, device: str) -> dict[str, float]:
    """Each fold's Ray resources: ``threads`` CPUs and, unless ``device`` is cpu, an equal share
    of the cluster's GPUs among the ``jobs`` folds in flight (at most one GPU each).

    A task that asks for no GPU sees none (Ray hides them), so ``--device auto`` trains on CPU there.
    """
    cpus = max(1, threads)
    if device == "cpu" or (device == "auto" and not cluster_gpus):
        return {"num_cpus": cpus, "num_gpus": 0}
    if not cluster_gpus:
        raise UserError("--device cuda but the Ray cluster has no GPU; use --device cpu (or auto), or a cluster with GPUs")
    # Ray counts resources in steps of 1e-4: round the share down so `jobs` of them fit
    return {"num_cpus": cpus, "num_gpus": min(1.0, math.floor(cluster_gpus / max(1, jobs) * 10_000) / 10_000)}


def run_on_ray(
    run_fold: Callable[[Task], Result],
    tasks: Iterator[Task],
    jobs: int,
    threads: int,
    device: str,
    address: str | None,
    on_result: Callable[[Result], None],
) -> list[Result]:
    """``run_fold`` of each task as a Ray task, at most ``jobs`` in flight (and so at most ``jobs``
    folds' rows in the object store); results in fold order (``result.fold.number``). A fold's
    UserError is raised here as it is."""
    ray = import_ray(local=address is None)
    jobs = max(1, jobs)
    with ray_session(ray, address, jobs * max(1, threads), device):
        options = ray_task_options(ray.cluster_resources().get("GPU", 0), jobs, threads, device)
        remote_fold = ray.remote(run_fold).options(**options)
        pending: list = []
        results = []

        def submit_next() -> None:
            task = next(tasks, None)
            if task is not None:
                pending.append(remote_fold.remote(task))

        for _ in range(jobs):
            submit_next()
        try:
            while pending:
                done, _ = ray.wait(pending, num_returns=1)
                for reference in done:
                    pending.remove(reference)
                    try:
                        results.append(ray.get(reference))
                    except ray.exceptions.RayTaskError as error:
                        if isinstance(error.cause, UserError):
                            raise error.cause from None  # one line, as from the local executor
                        raise
                    on_result(results[-1])
                    submit_next()
        except BaseException:
            for reference in pending:
                ray.cancel(reference, force=True)
            raise
    return sorted(results, key=lambda result: result.fold.number)
