"""Demo feature store: a small microservice fleet with queueing latency and injected chaos faults.

The generator is a per-minute fluid model, not noise around a curve: load follows daily and
weekly seasons and flows down a call graph; each service's p99 grows like an M/M/1 queue as
utilisation approaches 1, plus backlog wait, plus the latency of the calls it makes. Faults ramp
up over minutes (the leading indicators a forecaster can use) and are written to a chaos
manifest with their root-cause feature; the call graph is written beside them. Run
``python -m latency_forecast.synthetic --help``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from latency_forecast import flags
from latency_forecast.config import MINUTES_PER_DAY, TARGET_COLUMN
from latency_forecast.errors import cli_entrypoint
from latency_forecast.graph import CALL_GRAPH_FILE
from latency_forecast.script_config import SyntheticConfig

START = pd.Timestamp(SyntheticConfig.start)
FEATURE_COLUMNS = (
    "cpu_rolling_avg",
    "mem_usage",
    "request_rate",
    "queue_depth",
    "error_rate",
    "path_depth",
    "fan_out",
    "dependency_latency_ms",
    "node_cpu_cores",
)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    dependencies: tuple[tuple[str, float], ...]  # (callee, calls per request)
    external_rate: float  # requests/s arriving from outside the fleet, at the daily mean
    service_time_ms: float  # own p99 at zero utilisation


# Leaves first: every dependency is defined before its caller.
FLEET = (
    ServiceSpec("cache", (), 40.0, 1.5),
    ServiceSpec("payment", (), 0.0, 60.0),
    ServiceSpec("auth", (("cache", 1.0),), 0.0, 8.0),
    ServiceSpec("inventory", (("cache", 2.0),), 0.0, 10.0),
    ServiceSpec("shipping", (("cache", 1.0),), 0.0, 15.0),
    ServiceSpec("catalog", (("inventory", 2.0), ("cache", 3.0)), 0.0, 12.0),
    ServiceSpec("checkout", (("payment", 1.0), ("inventory", 2.0), ("shipping", 1.0)), 0.0, 20.0),
    ServiceSpec("frontend", (("auth", 1.0), ("catalog", 2.0), ("checkout", 0.3)), 120.0, 15.0),
)

# fault type -> root-cause feature
FAULT_ROOT_CAUSES = {
    "cpu": "cpu_rolling_avg",
    "deploy_fan_out": "fan_out",
    "deploy_path_depth": "path_depth",
    "queue": "queue_depth",
    "memory_leak": "mem_usage",
}

PEAK_UTILISATION = 0.72  # capacity is provisioned so the busiest minutes run at about this
HOP_MS = 150.0  # one extra network hop (cross-zone proxy) on a changed route
MAX_WAIT_S = 8.0  # clients time out: a backlog never holds more than this much work
CALL_OVERLAP = 0.5  # share of downstream call time on the critical path (calls partly parallel)


def build_fleet(n_services: int) -> list[ServiceSpec]:
    """``n_services`` services: copies of the base call graph, suffixed ``-2``, ``-3``, ...

    A copy cut short keeps its leaves-first prefix; a service left without callers takes
    traffic from outside the fleet, so every service has load.
    """
    if n_services < 1:
        raise ValueError("n_services must be at least 1")
    fleet: list[ServiceSpec] = []
    copy = 1
    while len(fleet) < n_services:
        suffix = "" if copy == 1 else f"-{copy}"
        for spec in FLEET[: n_services - len(fleet)]:
            dependencies = tuple((callee + suffix, calls) for callee, calls in spec.dependencies)
            fleet.append(ServiceSpec(spec.name + suffix, dependencies, spec.external_rate, spec.service_time_ms))
        copy += 1
    called = {callee for spec in fleet for callee, _ in spec.dependencies}
    return [
        spec if spec.external_rate or spec.name in called else ServiceSpec(spec.name, spec.dependencies, 40.0, spec.service_time_ms)
        for spec in fleet
    ]


def call_graph(n_services: int) -> dict:
    """The call graph the fleet of ``n_services`` simulates, as ``call_graph.json`` holds it."""
    return {"edges": [{"caller": spec.name, "callee": callee} for spec in build_fleet(n_services) for callee, _ in spec.dependencies]}


def _season(minutes: np.ndarray, start: pd.Timestamp) -> np.ndarray:
    """Load multiplier: daily cycle peaking mid-afternoon UTC, quieter weekends."""
    since_monday = minutes + start.day_of_week * MINUTES_PER_DAY + start.hour * 60 + start.minute
    hour = (since_monday % MINUTES_PER_DAY) / 60.0
    day = (since_monday // MINUTES_PER_DAY) % 7
    daily = 1.0 + 0.45 * np.sin(2 * np.pi * (hour - 8.0) / 24.0) + 0.12 * np.sin(4 * np.pi * (hour - 5.0) / 24.0)
    weekly = np.where(day >= 5, 0.72, 1.0)
    return daily * weekly


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """Stationary AR(1) noise with marginal standard deviation ``sigma``."""
    shocks = rng.normal(0.0, sigma * np.sqrt(1 - phi**2), n)
    out = np.empty(n)
    out[0] = rng.normal(0.0, sigma)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + shocks[i]
    return out


def _ramp(n: int, start: int, ramp: int, plateau: int, recovery: int) -> np.ndarray:
    """0 before ``start``, rising linearly to 1 over ``ramp``, held, then back to 0 over ``recovery``."""
    t = np.arange(n, dtype=float)
    up = np.clip((t - start) / ramp, 0.0, 1.0)
    end = start + ramp + plateau
    down = np.clip(1.0 - (t - end) / recovery, 0.0, 1.0)
    return np.minimum(up, down)


def _backlog(net_inflow: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Lindley's recursion Q_t = min(limit_t, max(0, Q_{t-1} + net_inflow_t)): requests past
    the limit time out and are shed, as clients give up."""
    backlog = np.zeros(len(net_inflow))
    level = 0.0
    for i, (inflow, cap) in enumerate(zip(net_inflow.tolist(), limit.tolist())):
        level = min(cap, max(0.0, level + inflow))
        backlog[i] = level
    return backlog


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    return pd.Series(values).ewm(span=span, adjust=False).mean().to_numpy()


@dataclass
class Fault:
    service: str
    fault: str
    start: int  # minute index
    ramp: int
    plateau: int
    recovery: int
    magnitude: float

    @property
    def end(self) -> int:
        """Last minute of injection (recovery starts after it)."""
        return self.start + self.ramp + self.plateau


def _eligible(fault: str, spec: ServiceSpec) -> bool:
    if fault == "deploy_fan_out":
        return len(spec.dependencies) >= 2 and spec.service_time_ms >= 15.0
    if fault in ("cpu", "deploy_path_depth"):
        return spec.service_time_ms >= 10.0
    return True


def _schedule_faults(
    rng: np.random.Generator, fleet: Sequence[ServiceSpec], n_minutes: int, faults_per_day: float
) -> list[Fault]:
    """Faults spread over the whole span, at least three hours apart on any one service."""
    n_faults = rng.poisson(faults_per_day * n_minutes / MINUTES_PER_DAY)
    fault_types = list(FAULT_ROOT_CAUSES)
    busy: dict[str, list[tuple[int, int]]] = {}
    faults: list[Fault] = []
    for _ in range(n_faults * 5):
        if len(faults) >= n_faults:
            break
        fault = fault_types[len(faults) % len(fault_types)]
        candidates = [spec for spec in fleet if _eligible(fault, spec)]
        if not candidates:  # a small fleet may have no service this fault applies to
            fault_types.remove(fault)
            continue
        spec = candidates[rng.integers(len(candidates))]
        ramp = int(rng.integers(10, 21)) if fault != "memory_leak" else int(rng.integers(40, 90))
        plateau = int(rng.integers(10, 35)) if fault != "memory_leak" else 0
        start = int(rng.integers(60, n_minutes - ramp - plateau - 60))
        end = start + ramp + plateau + 30
        if any(start < other_end + 180 and other_start < end + 180 for other_start, other_end in busy.get(spec.name, [])):
            continue
        busy.setdefault(spec.name, []).append((start, end))
        magnitude = {
            "cpu": rng.uniform(0.975, 0.99),  # utilisation reached at the plateau
            "deploy_fan_out": rng.uniform(650.0, 950.0),  # dependency time (ms) the bad build reaches
            "deploy_path_depth": float(rng.integers(4, 7)),  # extra hops on the new route
            "queue": rng.uniform(0.0015, 0.003),  # share of arrivals stalled workers leave unserved
            "memory_leak": 0.985,  # memory fraction at which the pod is OOM-killed
        }[fault]
        recovery = 2 if fault == "memory_leak" else int(rng.integers(3, 8))
        faults.append(Fault(spec.name, fault, start, ramp, plateau, recovery, float(magnitude)))
    faults.sort(key=lambda f: f.start)
    return faults


def _level_shifts(rng: np.random.Generator, fleet: Sequence[ServiceSpec], n: int, at: float) -> dict[str, np.ndarray]:
    """Each service's service-time factor per minute: 1, then 0.5 or 2 from its deploy minute
    (within a twentieth of the span after ``at``) on; all ones when ``at`` is 0."""
    factors = {spec.name: np.ones(n) for spec in fleet}
    if at > 0:
        for spec in fleet:
            deploy = min(n - 1, int(n * at + rng.integers(0, max(1, n // 20))))
            factors[spec.name][deploy:] = rng.choice([0.5, 2.0])
    return factors


def generate(
    days: int = 35,
    n_services: int = 8,
    seed: int = 0,
    faults_per_day: float = 1.5,
    start: pd.Timestamp = START,
    level_shift_at: float = 0.0,
) -> tuple[pd.DataFrame, list[dict]]:
    """Simulate the fleet minute by minute.

    ``level_shift_at`` (a share of the span, 0 for none): from about that point on, a deploy
    halves or doubles each service's own service time for good (each service its own minute and
    direction), the level shift that real services see every week; callers feel it through
    their calls.

    Returns
    -------
    frame : DataFrame with ``timestamp`` (UTC), ``service``, the feature columns and
        ``target_latency_p99`` (ms), one row per (service, minute) minus a few missing minutes.
    manifest : the chaos manifest, one dict per injected fault (contract section 2).
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    rng = np.random.default_rng(seed)
    fleet = build_fleet(n_services)
    n = days * MINUTES_PER_DAY
    minutes = np.arange(n)
    season = _season(minutes, start)
    faults = _schedule_faults(rng, fleet, n, faults_per_day)
    shifts = _level_shifts(np.random.default_rng([seed, 1]), fleet, n, level_shift_at)  # its own stream: stores without shifts stay as they were

    # Arrival rates flow from callers to callees (leaves are defined first, so walk in reverse).
    arrival = {spec.name: np.zeros(n) for spec in fleet}
    for spec in reversed(fleet):
        if spec.external_rate:
            arrival[spec.name] += spec.external_rate * season * np.exp(_ar1(rng, n, 0.97, 0.08))
        for callee, calls in spec.dependencies:
            arrival[callee] += calls * arrival[spec.name]
    for name in arrival:
        arrival[name] *= np.exp(rng.normal(0.0, 0.03, n))

    columns: dict[str, list[np.ndarray]] = {c: [] for c in ("service", "minute", *FEATURE_COLUMNS, TARGET_COLUMN)}
    latency: dict[str, np.ndarray] = {}
    for spec in fleet:
        rate = arrival[spec.name]
        capacity = np.quantile(rate, 0.99) / PEAK_UTILISATION
        mine = [f for f in faults if f.service == spec.name]

        hog = np.zeros(n)  # CPU taken by a runaway process (share of the node)
        fan_out_factor = np.ones(n)
        extra_hops = np.zeros(n)
        stall = np.zeros(n)  # share of throughput lost to stalled workers
        memory = 0.45 + 0.04 * _ar1(rng, n, 0.999, 1.0) + 0.03 * np.sin(2 * np.pi * minutes / MINUTES_PER_DAY)
        restarts: list[int] = []
        for fault in mine:
            shape = _ramp(n, fault.start, fault.ramp, fault.plateau, fault.recovery)
            if fault.fault == "cpu":
                # the hog takes what the current load leaves, so utilisation climbs to `magnitude`
                # (latency explodes as 1/(1-rho)) without tipping into a backlog
                spare = np.clip(1.0 - rate / (capacity * fault.magnitude), 0.0, None)
                hog = np.maximum(hog, spare * shape)
            elif fault.fault == "deploy_fan_out":
                # the bad build multiplies calls until dependency time reaches `magnitude` ms
                before = sum(CALL_OVERLAP * calls * latency[callee][fault.start] for callee, calls in spec.dependencies)
                multiplier = float(np.clip(fault.magnitude / max(before, 1.0), 3.0, 20.0))
                fan_out_factor *= 1.0 + (multiplier - 1.0) * shape
            elif fault.fault == "deploy_path_depth":
                extra_hops += fault.magnitude * shape
            elif fault.fault == "queue":
                stall = np.maximum(stall, fault.magnitude * shape)
            elif fault.fault == "memory_leak":
                leak = np.clip((minutes - fault.start) / fault.ramp, 0.0, None)
                before = memory[fault.start]
                window = (minutes >= fault.start) & (minutes <= fault.end)
                memory[window] = before + (fault.magnitude - before) * leak[window]
                restarts.append(fault.end)
        memory = np.clip(memory + rng.normal(0.0, 0.005, n), 0.05, 0.999)

        # Queueing: utilisation of what the CPU has left, plus the backlog of unserved requests.
        available = capacity * (1.0 - hog)
        utilisation = rate / available
        served = np.where(stall > 0, np.minimum(available, rate * (1.0 - stall)), available)
        backlog = _backlog((rate - served) * 60.0, limit=served * MAX_WAIT_S)
        queue_wait_ms = backlog / np.maximum(served, 1e-6) * 1000.0

        busy = np.minimum(utilisation, 1.0) * (1.0 - 0.3 * np.clip(stall / 0.003, 0.0, 1.0))
        cpu_now = hog + (1.0 - hog) * busy
        gc_pressure = np.clip((memory - 0.75) / 0.25, 0.0, None) ** 3
        cpu_now = np.clip(cpu_now + 0.08 * gc_pressure + rng.normal(0.0, 0.015, n), 0.0, 1.0)

        own = spec.service_time_ms * shifts[spec.name] / (1.0 - np.minimum(utilisation, 0.99))
        dependency = np.zeros(n)
        for callee, calls in spec.dependencies:
            dependency += CALL_OVERLAP * calls * latency[callee]
        base_fan_out = sum(calls for _, calls in spec.dependencies)
        dependency_observed = dependency * np.exp(rng.normal(0.0, 0.05, n))
        p99 = (
            own
            + dependency * fan_out_factor
            + HOP_MS * extra_hops
            + queue_wait_ms
            + 2500.0 * gc_pressure
        )
        noise = np.exp(rng.normal(0.0, 0.12, n))
        blips = np.where(rng.random(n) < 4e-4, 1.0 + rng.pareto(1.5, n) * 2.0, 1.0)  # GC/network blips
        p99 = p99 * noise * blips
        latency[spec.name] = p99 / (noise * blips)  # callers see the smooth part

        errors = 0.002 * np.exp(rng.normal(0.0, 0.3, n)) + 0.05 * (queue_wait_ms > 0.9 * MAX_WAIT_S * 1000.0)
        for _ in range(rng.poisson(days / 7)):  # bad-client bursts: errors with no latency cause
            at = rng.integers(0, n - 20)
            errors[at : at + rng.integers(5, 16)] += rng.uniform(0.02, 0.08)

        columns["service"].append(np.full(n, spec.name, dtype=object))
        columns["minute"].append(minutes)
        columns["cpu_rolling_avg"].append(_ema(cpu_now, 5))
        columns["mem_usage"].append(memory)
        columns["request_rate"].append(rate * np.exp(rng.normal(0.0, 0.02, n)))
        # the pending-work queue: requests waiting for a worker, not those in service; it only
        # grows when throughput falls below arrivals (a CPU hog slows service without tipping it)
        columns["queue_depth"].append(backlog + rng.poisson(0.5, n))
        columns["error_rate"].append(np.clip(errors, 0.0, 1.0))
        columns["path_depth"].append(_path_depth(spec, fleet) + extra_hops + rng.normal(0.0, 0.03, n) * bool(spec.dependencies))
        columns["fan_out"].append(base_fan_out * fan_out_factor * (1 + rng.normal(0.0, 0.02, n) * bool(spec.dependencies)))
        columns["dependency_latency_ms"].append(dependency_observed)
        columns["node_cpu_cores"].append(np.full(n, 4.0))
        columns[TARGET_COLUMN].append(p99)

        keep = np.ones(n, dtype=bool)
        for restart in restarts:  # an OOM-killed pod misses a scrape or two
            keep[restart + 1 : restart + 1 + rng.integers(1, 3)] = False
        for key in columns:
            columns[key][-1] = columns[key][-1][keep]

    frame = pd.DataFrame({key: np.concatenate(parts) for key, parts in columns.items()})
    frame.insert(0, "timestamp", start + pd.to_timedelta(frame.pop("minute"), unit="min"))
    frame = _add_imperfections(rng, frame)
    manifest = [
        {
            "service": f.service,
            "start": _iso(start + pd.Timedelta(minutes=f.start)),
            "end": _iso(start + pd.Timedelta(minutes=f.end)),
            "fault": f.fault,
            "root_cause_feature": FAULT_ROOT_CAUSES[f.fault],
            "magnitude": round(f.magnitude, 4),
        }
        for f in faults
    ]
    return frame, manifest


def _path_depth(spec: ServiceSpec, fleet: Sequence[ServiceSpec]) -> float:
    by_name = {s.name: s for s in fleet}
    if not spec.dependencies:
        return 1.0
    return 1.0 + max(_path_depth(by_name[callee], fleet) for callee, _ in spec.dependencies)


def _add_imperfections(rng: np.random.Generator, frame: pd.DataFrame) -> pd.DataFrame:
    """Scrape gaps (a few missing minutes) and sporadic NaNs, as real collectors produce."""
    n = len(frame)
    drop = np.zeros(n, dtype=bool)
    for at in rng.integers(0, n, max(1, n // 20_000)):
        drop[at : at + rng.integers(1, 5)] = True
    frame = frame.loc[~drop].reset_index(drop=True)
    for column in ("cpu_rolling_avg", "queue_depth", "request_rate", TARGET_COLUMN):
        values = frame[column].to_numpy(copy=True)
        values[rng.random(len(values)) < 3e-4] = np.nan
        frame[column] = values
    return frame


def _iso(timestamp: pd.Timestamp) -> str:
    return timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_parser() -> flags.ArgumentParser:
    return flags.build_parser(
        prog="python -m latency_forecast.synthetic",
        description="Write the demo feature store (hive-partitioned by date), its chaos_manifest.json and call_graph.json.",
        parents=[flags.parent_parser(SyntheticConfig)],
    )


@cli_entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    from latency_forecast import artifacts, store

    settings = flags.from_args(build_parser().parse_args(argv), SyntheticConfig)
    start = store.parse_timestamp(settings.start, "--start").floor("min")
    if settings.end is not None:
        end = pd.Timestamp.now(tz="UTC") if settings.end == "now" else store.parse_timestamp(settings.end, "--end")
        start = end.floor("min") - pd.Timedelta(minutes=settings.days * MINUTES_PER_DAY - 1)
    frame, manifest = generate(settings.days, settings.services, settings.seed, settings.faults_per_day, start, settings.level_shift_at)
    store.write_feature_store(frame, settings.output)
    artifacts.write_json(manifest, f"{settings.output}/chaos_manifest.json")
    artifacts.write_json(call_graph(settings.services), f"{settings.output}/{CALL_GRAPH_FILE}")
    print(
        f"wrote {len(frame):,} rows ({frame['service'].nunique()} services x {settings.days} days) "
        f"and {len(manifest)} injected faults to {settings.output}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
