"""Greedy ensemble selection (Caruana et al., ICML 2004) of forecast members on validation
forecasts, and the shipped forecast it weighs: pure numpy.

Members are forecasts of the same latency in ms: the recurrent networks, gradient boosting and
persistence. No member wins everywhere: the networks read spikes coming, trees on raw lags follow a
level that moved after training, persistence is right on a plateau.

The window median (a reported baseline) is not a member. It wins where a p99 jumps from minute to
minute around its level (TrainTicket: skill +0.09 to +0.26 over gradient boosting as a member), but
it lags every ramp into a fault: weighed 0.35 on one development store's validation, it cost 0.12
of skill on the other store's faults (docs/results.md).

Weights are fitted where the alert rule is calibrated (validation), never on test.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

RECURRENT = "recurrent"
MEMBERS = (RECURRENT, "gradient_boosting", "persistence")
# Rounds of selection with replacement: weights are multiples of 1/ROUNDS. Few members and a
# coarse grid keep the weights from fitting validation noise (AutoGluon uses 100 rounds over
# dozens of models).
ROUNDS = 20


def select_weights(forecasts: Mapping[str, np.ndarray], actual: np.ndarray, rounds: int = ROUNDS) -> dict[str, float]:
    """Non-negative weights summing to 1 that minimise the MAE of the weighted mean forecast.

    Greedy selection with replacement: each round adds the member whose addition gives the
    lowest mean absolute error; a member's weight is the share of rounds it was added in. Ties
    go to the member named first (list the recurrent networks first). Samples where a member
    has no forecast (NaN) or the truth is missing are left out.

    Parameters
    ----------
    forecasts : member name -> (n,) forecast in ms, on the validation samples
    actual : (n,) latency in ms at the forecast minute
    """
    names = list(forecasts)
    if not names:
        raise ValueError("no members to weigh")
    stacked = np.stack([np.asarray(forecasts[name], dtype=np.float64) for name in names])
    known = np.isfinite(actual) & np.isfinite(stacked).all(axis=0)
    if not known.any():
        return {name: float(i == 0) for i, name in enumerate(names)}
    stacked, truth = stacked[:, known], np.asarray(actual, dtype=np.float64)[known]
    counts = np.zeros(len(names))
    total = np.zeros(len(truth))
    for done in range(rounds):
        errors = np.mean(np.abs((total[None] + stacked) / (done + 1) - truth[None]), axis=1)
        best = int(np.argmin(errors))  # the first of equal errors
        counts[best] += 1
        total += stacked[best]
    return {name: float(count / rounds) for name, count in zip(names, counts)}


def combine(weights: Mapping[str, float], forecasts: Mapping[str, np.ndarray]) -> np.ndarray:
    """The weighted mean of the members' forecasts (ms); members of weight 0 are not read.

    A member with no forecast for a sample (NaN: persistence and the trees need the latency at
    t, which a live store may not have yet) gives its weight to the others there; where no
    weighted member has one, the recurrent networks' forecast stands.
    """
    used = {name: weight for name, weight in weights.items() if weight > 0}
    stacked = np.stack([np.asarray(forecasts[name], dtype=np.float64) for name in used])
    weight = np.array(list(used.values()))[:, None]
    known = np.isfinite(stacked)
    total = np.where(known, weight, 0.0).sum(axis=0)
    mean = np.where(known, stacked * weight, 0.0).sum(axis=0) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, mean, np.asarray(forecasts[RECURRENT], dtype=np.float64))


def rescale_quantiles(quantiles: Mapping[str, np.ndarray], recurrent: np.ndarray, shipped: np.ndarray) -> dict[str, np.ndarray]:
    """The recurrent networks' quantile band carried to the shipped point forecast.

    Each quantile is multiplied by ``shipped / recurrent`` (both ms, positive): the band keeps its
    width relative to the forecast, as a band in log latency does, and moves with the shipped
    forecast. The levels are then sorted per sample, so they never cross.
    """
    if not quantiles:
        return {}
    names = sorted(quantiles, key=float)
    ratio = np.asarray(shipped, dtype=np.float64) / np.maximum(np.asarray(recurrent, dtype=np.float64), 1e-9)
    band = np.sort(np.stack([np.asarray(quantiles[name], dtype=np.float64) * ratio for name in names]), axis=0)
    return {name: band[i] for i, name in enumerate(names)}
