"""The explanation background: training windows that stand for "normal" for each service, a
weighted k-means summary saved in the checkpoint and read by every explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from latency_forecast.training import SeriesTensors

POOLED = -1  # service code of the background pooled over all services (for services without training windows)
BACKGROUND_POOL = 1000  # training windows per service drawn before summarising them with k-means


@dataclass
class Background:
    """Training windows that stand for "normal" for each service, in the model's scaled input space.

    Attributes
    ----------
    windows : (n_background, sequence_length, n_features) float32, scaled like the model's inputs
    weights : (n_background,) float64, summing to 1 within each service
    service_codes : (n_background,) int64, the model's service code, or ``POOLED``
    description : how the background was built (goes into the output's ``method``)
    """

    windows: np.ndarray
    weights: np.ndarray
    service_codes: np.ndarray
    description: str

    def of_service(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """The background windows and weights for one service (the pooled ones if it has none)."""
        mine = self.service_codes == code
        if not mine.any():
            mine = self.service_codes == POOLED
        return self.windows[mine], self.weights[mine]

    def state(self) -> dict:
        """Plain dict for the checkpoint (loads with ``weights_only=True``)."""
        return {
            "windows": torch.from_numpy(np.ascontiguousarray(self.windows, dtype=np.float32)),
            "weights": torch.from_numpy(self.weights.astype(np.float64)),
            "service_codes": torch.from_numpy(self.service_codes.astype(np.int64)),
            "description": self.description,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Background":
        return cls(
            state["windows"].numpy(),
            state["weights"].numpy().astype(np.float64),
            state["service_codes"].numpy().astype(np.int64),
            str(state["description"]),
        )


def build_background(
    series: SeriesTensors, ends: np.ndarray, n_services: int, size: int, seed: int, pool: int = BACKGROUND_POOL
) -> Background:
    """Summarise training windows per service as ``size`` weighted k-means centres (shap.kmeans).

    Parameters
    ----------
    series : the prepared series (scaled inputs and the model's service code of each row)
    ends : (n_samples,) row indices ending the *training* windows; no other row is read
    size : windows per service; a service with at most ``size`` training windows keeps them all
    pool : training windows per service drawn at random before k-means

    A background pooled over all services is added for services without training windows.
    """
    from shap import kmeans  # here, not at the top: only train.py builds a background, and backtests never import shap

    rng = np.random.default_rng(seed)
    service_codes = series.service_codes.cpu().numpy()
    windows, weights, codes = [], [], []
    groups = [(code, ends[service_codes[ends] == code]) for code in range(n_services)] + [(POOLED, ends)]
    for code, mine in groups:
        if not len(mine):
            continue
        if len(mine) > pool:
            mine = np.sort(rng.choice(mine, pool, replace=False))
        drawn = series.windows(torch.as_tensor(mine, device=series.inputs.device))[0].cpu().numpy()
        if len(drawn) <= size:
            centres, share = drawn, np.ones(len(drawn))
        else:
            # a thousand windows are too few to gain from threads, and on a busy machine idle
            # OpenMP threads waiting for each other turned 0.1 s into several seconds
            with threadpool_limits(limits=1):
                summary = kmeans(drawn.reshape(len(drawn), -1).astype(np.float64), size)
            centres, share = summary.data.reshape(size, *drawn.shape[1:]), np.asarray(summary.weights)
        windows.append(np.asarray(centres, dtype=np.float32))
        weights.append(np.asarray(share, dtype=np.float64) / np.sum(share))
        codes.append(np.full(len(centres), code, dtype=np.int64))
    if not windows:
        raise ValueError("no training windows to build the background from")
    description = (
        f"background: per service, a weighted k-means summary (shap.kmeans, {size} centres) of "
        f"up to {pool} of its training windows"
    )
    return Background(np.concatenate(windows), np.concatenate(weights), np.concatenate(codes), description)
