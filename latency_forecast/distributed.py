"""torchrun: the process group from torchrun's environment, which services each rank trains on,
and the collectives that give every rank the same statistics, losses and decisions.

Without torchrun's variables nothing here does anything: one process, one rank, no collectives.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from latency_forecast import data, scaling, store
from latency_forecast.config import DataConfig, StoreConfig, TimeRangeConfig
from latency_forecast.data import SeriesTable
from latency_forecast.errors import UserError
from latency_forecast.scaling import FeatureScaler, TargetNormalizer

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# At most this many training log latencies (all ranks together) are gathered for the pooled median
# and IQR of the target; below it they are all gathered and the statistics are exact.
POOLED_SAMPLE_SIZE = 1_000_000


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's workers (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes the artifacts."""
        return self.rank == 0


def init_from_env(device: str = "auto") -> Ranks:
    """Join torchrun's process group when torchrun started this process (``RANK``, ``WORLD_SIZE``
    and ``LOCAL_RANK`` set; the rendezvous address comes from its ``MASTER_ADDR``/``MASTER_PORT``),
    else do nothing. gloo on CPU; NCCL on CUDA, with one GPU per local rank (``cuda:LOCAL_RANK``
    becomes the current device). ``device`` is ``--device``: auto is CUDA when there is one."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return Ranks()
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK are set but {' and '.join(missing)} not; start train.py with torchrun, or unset them")
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
    if device != "cpu" and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(
                f"torchrun local rank {local_rank} has no GPU of its own ({visible} visible); "
                f"use --nproc-per-node {visible} or fewer, or --device cpu"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return Ranks(rank, world_size, local_rank)


def active() -> bool:
    """Whether a process group is initialised (this process is one of several torchrun ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def barrier() -> None:
    """Wait until every rank is here (nothing without a process group)."""
    if active():
        dist.barrier()


def close() -> None:
    """Leave the process group (nothing without one); after it this process is on its own."""
    if active():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where the collectives' tensors live: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: np.ndarray, op: str = "sum") -> np.ndarray:
    """Element-wise ``sum`` or ``max`` over the ranks of a float64 array (the array itself
    without a process group)."""
    values = np.asarray(values, dtype=np.float64)
    if not active():
        return values
    tensor = torch.as_tensor(values.copy()).to(_device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.cpu().numpy()


def weighted_mean(value: float, weight: float) -> float:
    """The mean over the ranks of each rank's ``value`` weighted by its ``weight`` (e.g. a mean loss
    and its number of samples): the same float on every rank. ``value`` without a process group."""
    if not active():
        return float(value)
    total, weights = all_reduce(np.array([value * weight, weight]))
    return float(total / weights) if weights else float(value)


def all_gather(values: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D array (float64 or int64; lengths may differ), in rank order, on every
    rank; ``[values]`` without a process group."""
    values = np.ascontiguousarray(values)
    if not active():
        return [values]
    device, world_size = _device(), dist.get_world_size()
    length = torch.tensor([len(values)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    sizes = [int(size) for size in lengths]
    padded = torch.zeros(max(max(sizes), 1), dtype=torch.from_numpy(values[:0]).dtype, device=device)
    padded[: len(values)] = torch.from_numpy(values).to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return [part[:size].cpu().numpy() for part, size in zip(parts, sizes)]


def assign_services(rows: dict[str, int], world_size: int) -> list[list[str]]:
    """Each rank's services (sorted), every service whole on one rank: the largest first, each to
    the rank with the fewest rows so far (ties: the lowest rank), so shares are near equal.
    Deterministic: every rank computes the same shares from the same counts."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for name in sorted(rows, key=lambda name: (-rows[name], name)):
        rank = min(range(world_size), key=lambda rank: (loads[rank], rank))
        shares[rank].append(name)
        loads[rank] += rows[name]
    return [sorted(share) for share in shares]


def load_shard(
    store_config: StoreConfig, time_range: TimeRangeConfig, feature_columns: Sequence[str] | None, ranks: Ranks
) -> tuple[SeriesTable, np.ndarray]:
    """This rank's services of the store (only their rows are read), coded into the store's whole
    sorted service list as every rank codes them, and the minutes present in the whole store (so
    every rank cuts the same time splits).

    The store's services and their row counts come from a scan of the ``service`` column alone.
    """
    path = store_config.feature_store_path
    start, end = store.time_bounds(time_range)
    rows = store.service_rows(path, start, end)
    if len(rows) < ranks.world_size:
        raise UserError(
            f"torchrun started {ranks.world_size} ranks but the store holds {len(rows)} services in the time range, "
            f"and each rank trains on whole services; start at most {len(rows)} ranks (--nnodes x --nproc-per-node)"
        )
    share = assign_services(rows, ranks.world_size)[ranks.rank]
    table = data.with_services(store.load_feature_store(path, feature_columns, start, end, services=share), list(rows))
    present = np.unique(np.concatenate(all_gather(data.present_minutes(table).astype(np.int64))))
    return table, present


def fit_statistics(table: SeriesTable, rows: np.ndarray, data_config: DataConfig, seed: int) -> tuple[FeatureScaler, TargetNormalizer]:
    """The feature scaler and target normaliser fitted on ``table``'s ``rows``.

    Under torchrun each rank's table holds its own services (:func:`load_shard`), and the result
    is that of all ranks' rows together, the same on every rank: the scaler's counts, means and
    variances are gathered and pooled (exact up to float64 rounding); each service's median (and
    spread) comes from the rank that holds it; the pooled median and IQR are those of every
    rank's training log latencies when they number at most ``POOLED_SAMPLE_SIZE`` (then exactly
    the one-process values), else of a seeded uniform subsample of about that many, drawn from
    each rank in proportion to its count (a quantile's rank is then off by its sampling error,
    sqrt(p(1 - p) / n): 0.05 percentile points); the ceiling is the largest.
    """
    per_service_scale = data_config.target_scale == "service"
    rank, world_size = rank_and_world_size()
    saturating = None
    if world_size > 1 and data_config.feature_transform == "auto":  # which columns are fractions: on every rank's rows
        bounds = scaling.combine_feature_bounds(all_gather(scaling.feature_bounds(table.features, rows).ravel()))
        saturating = scaling.saturating_columns(bounds)
    scaler = FeatureScaler(data_config.feature_transform, saturating=saturating).fit(table.features, rows)
    if world_size == 1:
        return scaler, TargetNormalizer.fit(table, rows, per_service_scale=per_service_scale)
    moments = [part.reshape(3, -1) for part in all_gather(scaling.scaler_moments(scaler).ravel())]
    scaler = scaling.combine_scalers(moments, data_config.feature_transform, scaler.saturating)

    count = int(np.count_nonzero(rows & np.isfinite(table.target)))  # the targets TargetNormalizer.fit uses
    total = int(all_reduce(np.array([count]))[0])
    sample_size = None if total <= POOLED_SAMPLE_SIZE else int(round(POOLED_SAMPLE_SIZE * count / total))
    local = scaling.target_statistics(table, rows, sample_size=sample_size, seed=[seed, rank])
    n_services = len(table.services)
    packed = all_gather(np.concatenate([local.location, local.scale, local.fitted, [local.count, local.ceiling]]))
    samples = all_gather(local.log_targets)
    parts = [
        scaling.TargetStatistics(part[:n_services], part[n_services : 2 * n_services], part[2 * n_services : 3 * n_services],
                                 sample, int(part[-2]), float(part[-1]))
        for part, sample in zip(packed, samples)
    ]
    return scaler, scaling.combine_target_statistics(parts, per_service_scale)


def joint_digest(digest: str) -> str:
    """One digest of every rank's ``digest`` (e.g. each of its own data), in rank order: the same
    string on every rank; ``digest`` itself with one rank."""
    if rank_and_world_size()[1] == 1:
        return digest
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    return hashlib.blake2b(",".join(str(part) for part in digests).encode(), digest_size=16).hexdigest()
