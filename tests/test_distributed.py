"""distributed.py without starting ranks: the statistics that torchrun's ranks combine, computed by
ranks simulated as threads of this process (their collectives exchanged in memory), equal the
one-process fit on all rows and are the same on every rank; how services are shared out; the
collectives on a one-rank process group. tests/test_torchrun.py runs real ranks."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch.distributed as dist

from latency_forecast import data, distributed, store
from latency_forecast.config import DataConfig
from latency_forecast.data import SeriesTable
from tests.helpers import HORIZON, SEQUENCE_LENGTH


class ThreadRanks:
    """``world_size`` ranks as threads of one process: :func:`patch` swaps distributed.py's
    collectives for ones that exchange each rank's value in memory at a barrier, so the code that
    combines the ranks' statistics runs as it is."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[Any] = [None] * world_size
        self.local = threading.local()

    def patch(self, monkeypatch) -> None:
        monkeypatch.setattr(distributed, "rank_and_world_size", lambda: (self.local.rank, self.world_size))
        monkeypatch.setattr(distributed, "all_gather", self.all_gather)
        monkeypatch.setattr(distributed, "all_reduce", self.all_reduce)

    def _exchange(self, value: np.ndarray) -> list[np.ndarray]:
        self.slots[self.local.rank] = value
        self.barrier.wait()
        values = [np.array(part, copy=True) for part in self.slots]
        self.barrier.wait()  # no rank writes its next value before every rank has read this one
        return values

    def all_gather(self, values: np.ndarray) -> list[np.ndarray]:
        return self._exchange(np.ascontiguousarray(values))

    def all_reduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        parts = np.stack(self._exchange(np.asarray(values, dtype=np.float64)))
        return parts.sum(axis=0) if op == "sum" else parts.max(axis=0)

    def run(self, function: Callable, arguments: Sequence[tuple]) -> list[Any]:
        """``function(*arguments[rank])`` on every rank at once; each rank's result, in rank order."""
        results: list[Any] = [None] * self.world_size
        errors: list[Exception] = []

        def rank_main(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = function(*arguments[rank])
            except Exception as error:  # the others must not wait for it at the barrier
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def shard(table: SeriesTable, share: Sequence[str]) -> SeriesTable:
    """The rows of ``share``'s services, coded into the whole store's services as
    ``distributed.load_shard`` codes them."""
    own = np.isin(table.service_codes, [table.services.index(name) for name in share])
    return dataclasses.replace(
        table, minutes=table.minutes[own], service_codes=table.service_codes[own], features=table.features[own], target=table.target[own]
    )


@pytest.fixture(scope="module")
def sparse_table(tiny_store) -> SeriesTable:
    """The tiny store with one service left with 20 finite training latencies (fewer than a
    service needs for statistics of its own: it takes the pooled ones)."""
    table = store.load_feature_store(tiny_store)
    target = table.target.copy()
    rows = np.flatnonzero((table.service_codes == 1) & np.isfinite(target))
    target[rows[20:]] = np.nan
    return dataclasses.replace(table, target=target)


def _train_rows(table: SeriesTable, whole: SeriesTable) -> np.ndarray:
    return data.rows_in(table, data.fraction_splits(whole, 0.2, 0.2, SEQUENCE_LENGTH + HORIZON).train)


def _ranks_fit(monkeypatch, table: SeriesTable, world_size: int, settings: DataConfig, seed: int = 0) -> list:
    """Each simulated rank's ``fit_statistics`` on its own services (shared as train.py shares them)."""
    counts = {name: int(np.count_nonzero(table.service_codes == code)) for code, name in enumerate(table.services)}
    shards = [shard(table, share) for share in distributed.assign_services(counts, world_size)]
    ranks = ThreadRanks(world_size)
    ranks.patch(monkeypatch)
    return ranks.run(distributed.fit_statistics, [(part, _train_rows(part, table), settings, seed) for part in shards])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("feature_transform", "target_scale"), [("auto", "pooled"), ("log1p", "service"), ("none", "pooled")])
def test_ranks_combine_to_the_one_process_statistics(monkeypatch, sparse_table, world_size, feature_transform, target_scale):
    settings = DataConfig(sequence_length=SEQUENCE_LENGTH, horizon=HORIZON, feature_transform=feature_transform, target_scale=target_scale)
    scaler, normalizer = distributed.fit_statistics(sparse_table, _train_rows(sparse_table, sparse_table), settings, seed=0)
    assert normalizer.location[1] == normalizer.pooled[0], "the service with 20 latencies takes the pooled location"

    results = _ranks_fit(monkeypatch, sparse_table, world_size, settings)
    for rank_scaler, rank_normalizer in results:
        for name in ("mean_", "var_", "scale_"):  # pooled moments: float64 rounding apart
            np.testing.assert_allclose(getattr(rank_scaler.scaler, name), getattr(scaler.scaler, name), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(rank_scaler.scaler.n_samples_seen_, scaler.scaler.n_samples_seen_)
        assert rank_scaler.transform_name == feature_transform
        if feature_transform == "auto":  # the fraction columns: of every rank's rows together
            assert scaler.saturating.any() and not scaler.saturating.all()
            np.testing.assert_array_equal(rank_scaler.saturating, scaler.saturating)
        features = sparse_table.features
        np.testing.assert_allclose(rank_scaler.transform(features), scaler.transform(features), rtol=1e-5, atol=1e-6)
        # every training log latency is gathered (far fewer than POOLED_SAMPLE_SIZE): exact
        assert rank_normalizer.state() == normalizer.state()
    first = results[0][0].scaler
    for rank_scaler, _ in results[1:]:  # the same bits everywhere, so every rank scales alike
        for name in ("mean_", "var_", "scale_"):
            np.testing.assert_array_equal(getattr(rank_scaler.scaler, name), getattr(first, name))


def test_past_the_pooled_sample_size_the_ranks_send_a_seeded_subsample(monkeypatch, sparse_table):
    settings = DataConfig(sequence_length=SEQUENCE_LENGTH, horizon=HORIZON, feature_transform="none")
    rows = _train_rows(sparse_table, sparse_table)
    _, exact = distributed.fit_statistics(sparse_table, rows, settings, seed=0)
    m = 1500
    monkeypatch.setattr(distributed, "POOLED_SAMPLE_SIZE", m)
    results = _ranks_fit(monkeypatch, sparse_table, 2, settings, seed=0)
    sampled = results[0][1]
    assert results[1][1].state() == sampled.state(), "every rank combines the same subsamples"
    assert _ranks_fit(monkeypatch, sparse_table, 2, settings, seed=0)[0][1].state() == sampled.state(), "seeded"
    assert _ranks_fit(monkeypatch, sparse_table, 2, settings, seed=1)[0][1].pooled != sampled.pooled, "a sample, not all"
    # each service's own median comes whole from its rank; the largest latency is exact too
    fitted = exact.location != exact.pooled[0]
    np.testing.assert_array_equal(sampled.location[fitted], exact.location[fitted])
    assert sampled.ceiling == exact.ceiling
    # the pooled median is off by sampling error only (its rank among all values: sd sqrt(0.25 / m))
    usable = rows & np.isfinite(sparse_table.target)
    values = np.sort(np.log1p(sparse_table.target[usable].astype(np.float64)))
    assert len(values) > 2 * m
    assert abs(np.searchsorted(values, sampled.pooled[0]) / len(values) - 0.5) < 4 * np.sqrt(0.25 / m)


def test_services_are_shared_largest_first_to_the_least_loaded_rank():
    rows = {"a": 100, "b": 60, "c": 50, "d": 40, "e": 10}
    # a -> 0 (100), b -> 1 (60), c -> 1 (110), d -> 0 (140), e -> 1 (120)
    assert distributed.assign_services(rows, 2) == [["a", "d"], ["b", "c", "e"]]
    assert distributed.assign_services(dict(reversed(list(rows.items()))), 2) == [["a", "d"], ["b", "c", "e"]], "whatever the order"
    # equal counts go by name, equal loads to the lowest rank; a rank may get none
    assert distributed.assign_services({"y": 5, "x": 5}, 3) == [["x"], ["y"], []]
    assert distributed.assign_services(rows, 1) == [sorted(rows)]


def test_shares_are_whole_sorted_and_near_equal(rng):
    for _ in range(20):
        rows = {f"service-{i:02d}": int(count) for i, count in enumerate(rng.integers(1, 10_000, rng.integers(3, 40)))}
        world_size = int(rng.integers(1, len(rows) + 1))
        shares = distributed.assign_services(rows, world_size)
        assert len(shares) == world_size
        assert sorted(name for share in shares for name in share) == sorted(rows), "every service on exactly one rank"
        assert all(share == sorted(share) for share in shares)
        loads = [sum(rows[name] for name in share) for share in shares]
        # greedy on the largest first: no rank exceeds the least loaded by more than one service
        assert max(loads) - min(loads) <= max(rows.values())


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of this process alone (no rank started), left on teardown."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collectives_of_a_one_rank_process_group(one_rank_group, monkeypatch):
    assert distributed.active() and distributed.rank_and_world_size() == (0, 1)
    for values in (np.array([3, -4, 5], dtype=np.int64), np.array([0.5, np.inf, -2.0]), np.zeros(0)):
        (gathered,) = distributed.all_gather(values)  # through torch's all_gather, padded and cut back
        assert gathered.dtype == values.dtype
        np.testing.assert_array_equal(gathered, values)
    np.testing.assert_array_equal(distributed.all_reduce(np.array([1, 2.5])), [1.0, 2.5])
    np.testing.assert_array_equal(distributed.all_reduce(np.array([1, 2.5]), op="max"), [1.0, 2.5])
    assert distributed.weighted_mean(0.25, 10) == 0.25
    assert distributed.weighted_mean(0.25, 0) == 0.25, "no weight anywhere: the rank's own value, not NaN"
    assert distributed.joint_digest("abc") == "abc"
    distributed.barrier()
    # torchrun's variables with the group already joined: this rank's place, no second init
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    assert distributed.init_from_env("cpu") == distributed.Ranks(0, 1, 0)
    assert distributed.Ranks(0, 1, 0).is_main and not distributed.Ranks(1, 2, 1).is_main
