"""Shapley attributions per feature (SHAP): each feature, across all the time steps of a window,
is one player, and the explained quantity is the forecast p99 latency in milliseconds.

A coalition keeps the window's real values for its features and takes a background window's
values for the others; its value is the forecast averaged over the weighted background of the
window's own service. shap's KernelExplainer does the Shapley computation (exact with all 2^F
coalitions); this module only turns coalitions into windows, in a few large batched model calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from latency_forecast.background import Background
from latency_forecast.config import ExplainConfig
from latency_forecast.training import SeriesTensors

if TYPE_CHECKING:
    from latency_forecast.forecaster import Forecaster, PreparedSeries

EVALUATIONS_PER_CALL = 4096  # windows per forward pass: large enough to amortise, small enough for cache
EXPLAIN_BATCH = 64  # windows of one service explained together (as one vector-output game)


@dataclass
class Attributions:
    """Shapley values of the forecast (ms) for a set of windows.

    values : (n_windows, n_features) ms; ``base_values + values.sum(1) == outputs``
    base_values : (n_windows,) ms, the forecast averaged over the service's background
    outputs : (n_windows,) ms, the explained model's forecast for each window
    exact : (n_windows,) bool, False where coalitions were sampled (too many features)
    subject : which forecast was explained (the forecaster's, or its cause model's)
    """

    values: np.ndarray
    base_values: np.ndarray
    outputs: np.ndarray
    exact: np.ndarray
    feature_columns: list[str]
    sequence_length: int
    background: str
    subject: str = "the forecast"

    @property
    def method(self) -> str:
        if self.exact.all():
            how = "exact Shapley values (all 2^F coalitions, shap.KernelExplainer)"
        elif not self.exact.any():
            how = "sampled Shapley values (too many features for all 2^F coalitions: sampled coalitions, shap.KernelExplainer)"
        else:
            how = f"Shapley values, exact for {int(self.exact.sum())} windows and from sampled coalitions for {int((~self.exact).sum())}"
        return (
            f"grouped interventional {how} of {self.subject} (p99 latency in ms); one player per feature, "
            f"covering all {self.sequence_length} minutes of the window; a coalition keeps the window's "
            f"values and takes the background's for the other features; {self.background}"
        )


def forecast_windows(model: torch.nn.Module, normalizer, windows: torch.Tensor, service_code: int) -> np.ndarray:
    """(n,) forecast in ms for ``windows`` (n, L, F) of one service: the model's output mapped
    to milliseconds by the same ``TargetNormalizer.denormalize`` that every metric uses."""
    outputs = []
    codes = torch.full((EVALUATIONS_PER_CALL,), service_code, dtype=torch.int64, device=windows.device)
    with torch.inference_mode():
        for start in range(0, len(windows), EVALUATIONS_PER_CALL):
            chunk = windows[start : start + EVALUATIONS_PER_CALL]
            outputs.append(model(chunk, codes[: len(chunk)]).float().cpu().numpy())
    normalized = np.concatenate(outputs) if outputs else np.zeros(0, dtype=np.float32)
    return normalizer.denormalize(normalized, np.full(len(normalized), service_code))


def null_features(windows: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(n_features,) bool: features whose values are the same in every window and every
    background window at every time step. Masking them changes nothing, so their Shapley value
    is exactly 0 and they leave the game; each one halves the number of coalitions."""
    reference = background[:1]
    same = (background == reference).all(axis=(0, 1)) & (windows == reference).all(axis=(0, 1))
    return same


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """KernelExplainer samples coalitions from numpy's global generator: seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def explain_service(
    model: torch.nn.Module,
    normalizer,
    windows: np.ndarray,
    service_code: int,
    background: np.ndarray,
    weights: np.ndarray,
    config: ExplainConfig,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Shapley values for windows of one service, all in one KernelExplainer call.

    The windows are the explainer's outputs (one output per window), so one call evaluates all
    coalitions x background x windows in large batches, and shap solves each window's game.

    Parameters
    ----------
    windows : (n_windows, L, F) scaled inputs
    background, weights : (n_background, L, F) and (n_background,) for this service

    Returns
    -------
    values (n_windows, F), base_values (n_windows,), outputs (n_windows,), exact
    """
    device = next(model.parameters()).device
    n_windows, _, n_features = windows.shape
    # columns the model does not read (a cause model skips the latency's own history) are null
    # players too: exactly 0, and out of the game
    read = np.ones(n_features, dtype=bool) if model.input_columns is None else np.isin(np.arange(n_features), model.input_columns.cpu().numpy())
    players = np.flatnonzero(~null_features(windows, background) & read)
    x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(device)
    reference = torch.from_numpy(np.ascontiguousarray(background, dtype=np.float32)).to(device)
    outputs = forecast_windows(model, normalizer, x, service_code)
    values = np.zeros((n_windows, n_features))
    if len(players) == 0:  # nothing differs from the background: the forecast is the base value
        return values, outputs.copy(), outputs, True
    per_mask = n_windows * len(reference)

    def coalition_values(masks: np.ndarray) -> np.ndarray:
        """(n_masks, n_players) 0/1 -> (n_masks, n_windows): forecast averaged over the background."""
        keep = torch.zeros((len(masks), n_features), dtype=torch.bool, device=device)
        keep[:, torch.as_tensor(players, device=device)] = torch.as_tensor(masks > 0.5, device=device)
        result = np.empty((len(masks), n_windows))
        step = max(1, EVALUATIONS_PER_CALL // per_mask)
        for start in range(0, len(masks), step):
            chunk = keep[start : start + step, None, None, None, :]  # (m, 1, 1, 1, F)
            mixed = torch.where(chunk, x[None, :, None], reference[None, None, :])  # (m, W, K, L, F)
            forecast = forecast_windows(model, normalizer, mixed.reshape(-1, *x.shape[1:]), service_code)
            result[start : start + step] = forecast.reshape(-1, n_windows, len(reference)) @ weights
        return result

    exact = len(players) <= config.max_exact_features
    import shap  # here, not at the top: shap takes most of a second to import, and most runs never explain

    explainer = shap.KernelExplainer(coalition_values, np.zeros((1, len(players))))
    nsamples = 2 ** len(players) if exact else config.coalition_samples
    with _seeded_numpy(seed):
        phi = explainer.shap_values(np.ones(len(players)), nsamples=nsamples, l1_reg=False, silent=True)
    phi = np.asarray(phi).reshape(len(players), n_windows)
    values[:, players] = phi.T
    base = np.broadcast_to(np.asarray(explainer.expected_value, dtype=np.float64), (n_windows,)).copy()
    return values, base, outputs, exact


def explain(
    forecaster: Forecaster,
    series: SeriesTensors,
    ends: np.ndarray,
    background: Background,
    config: ExplainConfig,
    seed: int = 0,
) -> Attributions:
    """Shapley values of the forecast (ms) for the windows ending at rows ``ends`` of ``series``.

    Windows are explained service by service, each against its own service's background, up
    to ``EXPLAIN_BATCH`` windows per KernelExplainer call.
    """
    n_features = series.inputs.shape[1]
    values = np.zeros((len(ends), n_features))
    base = np.zeros(len(ends))
    outputs = np.zeros(len(ends))
    exact = np.ones(len(ends), dtype=bool)
    device = series.inputs.device
    codes = series.service_codes[torch.as_tensor(ends, dtype=torch.int64, device=device)].cpu().numpy()
    for code in np.unique(codes):
        reference, weights = background.of_service(int(code))
        positions = np.flatnonzero(codes == code)
        for start in range(0, len(positions), EXPLAIN_BATCH):
            chosen = positions[start : start + EXPLAIN_BATCH]
            windows = series.windows(torch.as_tensor(ends[chosen], dtype=torch.int64, device=device))[0].cpu().numpy()
            result = explain_service(
                forecaster.explained_model, forecaster.target_normalizer, windows, int(code), reference, weights, config, seed
            )
            values[chosen], base[chosen], outputs[chosen], exact[chosen] = result
    subject = "the forecast"
    if forecaster.cause_model is not None:
        subject = (
            "the cause model's forecast (the forecaster's network, forecasting the level from the telemetry "
            "features alone; the alerting forecaster also reads the latency's own history, which would take "
            "the credit, so that history scores 0 here)"
        )
    return Attributions(
        values, base, outputs, exact, list(forecaster.feature_columns), series.sequence_length, background.description, subject
    )


# ---------------------------------------------------------------------------------------------
# Global importance (feature_importance.json)


def stratified_sample(predicted_breach: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` positions: half predicted breaches (all of them if fewer), the rest other windows.

    Returns the sorted positions and each one's weight (its stratum's size over the number
    drawn from it), so weighted means over the sample estimate means over all windows.
    """
    breach, other = np.flatnonzero(predicted_breach), np.flatnonzero(~predicted_breach)
    n_breach = min(len(breach), max(n // 2, n - len(other)))
    n_other = min(len(other), n - n_breach)
    drawn = [rng.choice(breach, n_breach, replace=False), rng.choice(other, n_other, replace=False)]
    weights = np.zeros(len(predicted_breach))
    weights[drawn[0]] = len(breach) / max(n_breach, 1)
    weights[drawn[1]] = len(other) / max(n_other, 1)
    positions = np.sort(np.concatenate(drawn))
    return positions, weights[positions]


def _mean_absolute(values: np.ndarray, weights: np.ndarray, feature_columns: Sequence[str]) -> tuple[dict, dict]:
    importance = np.average(np.abs(values), axis=0, weights=weights) if len(values) else np.zeros(len(feature_columns))
    total = importance.sum()
    shares = importance / total if total > 0 else np.zeros_like(importance)
    return dict(zip(feature_columns, importance.tolist())), dict(zip(feature_columns, shares.tolist()))


def importance_report(
    attributions: Attributions, weights: np.ndarray, predicted_breach: np.ndarray, population: dict[str, int]
) -> dict:
    """The contract's ``feature_importance.json``: mean absolute Shapley value (ms) per feature and
    its share, over all explained windows (weighted back to the population of windows), and the
    same over the predicted-breach windows alone."""
    features = attributions.feature_columns
    importance, normalized = _mean_absolute(attributions.values, weights, features)
    breach_importance, breach_normalized = _mean_absolute(
        attributions.values[predicted_breach], np.ones(int(predicted_breach.sum())), features
    )
    return {
        "method": attributions.method,
        "n_windows": int(len(attributions.values)),
        "importance": importance,
        "normalized": normalized,
        "predicted_breach": {
            "n_windows": int(predicted_breach.sum()),
            "importance": breach_importance,
            "normalized": breach_normalized,
        },
        "sampling": {
            "windows": "validation windows, stratified: half predicted breaches (or all of them), half the others; "
            "importance is weighted back to all validation windows",
            "population": population,
            "explained": {"predicted_breach": int(predicted_breach.sum()), "other": int((~predicted_breach).sum())},
        },
        "mean_base_value": float(np.average(attributions.base_values, weights=weights)) if len(weights) else None,
    }


def feature_importance(
    forecaster: Forecaster,
    prepared: PreparedSeries,
    ends: np.ndarray,
    alert: np.ndarray,
    background: Background,
    n_windows: int,
    config: ExplainConfig,
    seed: int,
) -> dict:
    """``feature_importance.json`` from ``n_windows`` of the samples ``ends`` (validation), drawn
    stratified so that predicted breaches (``alert``, the model's own alert decisions) are included."""
    positions, weights = stratified_sample(alert, n_windows, np.random.default_rng(seed))
    attributions = explain(forecaster, prepared.tensors, ends[positions], background, config, seed)
    population = {"predicted_breach": int(alert.sum()), "other": int((~alert).sum())}
    return importance_report(attributions, weights, alert[positions], population)
