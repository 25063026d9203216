"""How many CPUs this process may really use: its affinity and its cgroup's CPU quota, not the
machine's core count.

A Kubernetes pod limited to 2 CPUs on a 64-core node sees 64 cores (``os.cpu_count()``) and
its affinity often lists all 64; only the cgroup's quota (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1) says 2. torch sizes its thread pool from the
core count, and threads that spin-wait on cores the quota does not grant stall every step.
"""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
# torch's intra-op threads under --num-threads 0. A second thread made a default train.py run
# 1.14x faster alone on 2 cores (64.0 -> 55.9 s) and two such runs side by side 3.8x slower
# than one alone (241 s each, threads spinning on cores the other run holds; at one thread each:
# 61 s, docs/results.md). The recurrent kernels of these small networks gain little from more.
AUTO_TORCH_THREADS = 1


def torch_threads(num_threads: int) -> int:
    """torch's intra-op threads for ``--num-threads`` (0: AUTO_TORCH_THREADS)."""
    return num_threads or min(AUTO_TORCH_THREADS, available_cpus())


def pool_threads(num_threads: int) -> int:
    """Threads of the native pools (gradient boosting's OpenMP, BLAS) for ``--num-threads``
    (0: the CPUs this process may use). Their parallel regions are coarse: no spinning per step."""
    return num_threads or available_cpus()


def available_cpus(cgroup_root: str = CGROUP_ROOT, proc_self_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may use: the smaller of its affinity and its cgroup quota (rounded
    up, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: str = CGROUP_ROOT, proc_self_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time the process's cgroup may use per period (e.g. 2.0), or None without a
    limit (or without cgroups). The tightest limit on the path from the process's cgroup up
    to the root counts: a parent's quota binds its children."""
    limits = [quota for directory in _cgroup_directories(cgroup_root, proc_self_cgroup) if (quota := _quota_in(directory)) is not None]
    return min(limits) if limits else None


def _cgroup_directories(cgroup_root: str, proc_self_cgroup: str) -> list[str]:
    """The process's cgroup directory (v2 unified, or v1's cpu controller) and each parent up to
    the mount, innermost first; the mount alone when /proc/self/cgroup is unreadable."""
    root, relative = os.path.normpath(cgroup_root), ""
    try:
        with open(proc_self_cgroup) as stream:
            lines = [line.rstrip("\n").split(":", 2) for line in stream if line.count(":") >= 2]
    except OSError:
        lines = []
    for _, controllers, path in lines:
        if controllers == "" or "cpu" in controllers.split(","):
            relative = path.strip("/")
            v1_mount = os.path.join(root, controllers)
            if controllers and os.path.isdir(v1_mount):  # v1: the cpu controller has a mount of its own
                root = v1_mount
            break
    path = os.path.normpath(os.path.join(root, relative))
    # in a container the path names a host cgroup that is not mounted: the namespace's root is
    while path != root and not os.path.isdir(path):
        path = os.path.dirname(path)
    directories = [path]
    while path != root and path.startswith(root):
        path = os.path.dirname(path)
        directories.append(path)
    return directories


def _quota_in(directory: str) -> float | None:
    """One cgroup directory's CPU quota in CPUs, None when it sets none."""
    try:
        with open(os.path.join(directory, "cpu.max")) as stream:  # v2: "200000 100000" or "max 100000"
            quota, period = stream.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1: quota -1 is no limit
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as stream:
            quota_us = int(stream.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as stream:
            period_us = int(stream.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
