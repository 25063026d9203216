"""cpus.py: the CPUs a process may use come from its affinity and its cgroup's quota (v2 and v1),
the tightest limit on the way to the root binding."""

import os

from latency_forecast import cpus


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as stream:
        stream.write(text)


def test_cgroup_v2_quota_of_the_process_cgroup_and_its_parents(tmp_path):
    root = tmp_path / "cgroup"
    write(str(root / "kubepods" / "cpu.max"), "max 100000\n")
    write(str(root / "kubepods" / "pod1" / "cpu.max"), "150000 100000\n")  # 1.5 CPUs
    write(str(root / "kubepods" / "pod1" / "ctr" / "cpu.max"), "max 100000\n")
    proc = tmp_path / "cgroup.txt"
    write(str(proc), "0::/kubepods/pod1/ctr\n")
    assert cpus.cgroup_cpu_quota(str(root), str(proc)) == 1.5
    affinity = len(os.sched_getaffinity(0))
    assert cpus.available_cpus(str(root), str(proc)) == min(affinity, 2), "1.5 CPUs round up to 2 threads"
    write(str(root / "cpu.max"), "50000 100000\n")  # the mount's own limit binds everything under it
    assert cpus.cgroup_cpu_quota(str(root), str(proc)) == 0.5
    assert cpus.available_cpus(str(root), str(proc)) == 1


def test_a_namespaced_container_sees_its_own_cgroup_as_the_mount(tmp_path):
    root = tmp_path / "cgroup"
    write(str(root / "cpu.max"), "200000 100000\n")
    proc = tmp_path / "cgroup.txt"
    write(str(proc), "0::/kubepods/pod1/ctr\n")  # a host path that is not mounted here
    assert cpus.cgroup_cpu_quota(str(root), str(proc)) == 2.0


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    write(str(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us"), "300000\n")
    write(str(root / "cpu,cpuacct" / "job" / "cpu.cfs_period_us"), "100000\n")
    proc = tmp_path / "cgroup.txt"
    write(str(proc), "12:memory:/job\n4:cpu,cpuacct:/job\n")
    assert cpus.cgroup_cpu_quota(str(root), str(proc)) == 3.0
    write(str(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us"), "-1\n")
    assert cpus.cgroup_cpu_quota(str(root), str(proc)) is None
    assert cpus.cgroup_cpu_quota(str(tmp_path / "absent"), str(tmp_path / "absent.txt")) is None
    assert cpus.available_cpus(str(tmp_path / "absent"), str(tmp_path / "absent.txt")) == len(os.sched_getaffinity(0))
