"""The baselines beside the model: the window median (nothing to fit) and gradient boosting,
scikit-learn's HistGradientBoostingRegressor on the flattened L x F input window plus the
service, fitted on training windows only. Pure numpy in and out.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

LOSSES = ("log_absolute_error", "log_squared_error", "absolute_error")
# Chosen on validation MAE (ms) on the dev stores (TrainTicket; synthetic at two seeds and two L/H):
# anchored, absolute error on log1p and on ms tie (within 2% of each other on each store) and both
# beat squared error on log1p; the log wins the tie because one split then serves a 3 ms cache and
# an 800 ms gateway alike. It beats the plain fit a user tries first (absolute error on ms, no
# anchor, no service) on every store.
DEFAULT_LOSS = "log_absolute_error"
MAX_SAMPLES = 200_000
MAX_ITER = 300
EARLY_STOPPING_FRACTION = 0.1
# scikit-learn's own rule for early_stopping="auto": below this many windows it stops on nothing
EARLY_STOPPING_MIN_SAMPLES = 10_000
CHUNK_ROWS = 8192  # windows gathered at once: bounds the temporary (chunk, L, F) copy
PREDICT_CHUNK = 16_384  # windows predicted at once: bounds the (chunk, L*F+1) float64 matrix
WINDOW_MEDIAN = "window_median"
_MAX_CATEGORIES = 255  # HistGradientBoosting's ceiling on a categorical feature's cardinality
# What a saved regressor may hold beyond skops' own safe types; a file naming any other type is
# refused before anything in it runs (no pickle: skops rebuilds only the types it is told to trust)
TRUSTED_TYPES = (
    "functools.partial",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils.validation.check_array",
)


class UntrustedModelError(ValueError):
    """A saved regressor holds types outside TRUSTED_TYPES, or is not a skops file at all."""


def _supports_validation_set() -> bool:
    """Whether this scikit-learn takes ``fit(..., X_val=, y_val=)`` (1.7 and later)."""
    return "X_val" in inspect.signature(HistGradientBoostingRegressor.fit).parameters


def _gather(
    out: np.ndarray, features: np.ndarray, service_codes: np.ndarray, ends: np.ndarray, sequence_length: int
) -> np.ndarray:
    """Fill ``out`` (len(ends), L*F + 1) with the flattened windows ending at ``ends``, oldest
    minute first, and the service code in the last column; chunk by chunk."""
    offsets = np.arange(1 - sequence_length, 1)
    for start in range(0, len(ends), CHUNK_ROWS):
        chunk = ends[start : start + CHUNK_ROWS]
        rows = out[start : start + len(chunk)]
        rows[:, :-1] = features[chunk[:, None] + offsets].reshape(len(chunk), -1)
        rows[:, -1] = service_codes[chunk]
    return out


def _early_stopping_split(
    ends: np.ndarray, service_codes: np.ndarray, fraction: float, gap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over ``ends`` (sorted): the windows the trees are grown on and the
    held-out windows early stopping watches.

    The held-out windows are the last ``fraction`` of each service's windows. Rows are sorted by
    (service, minute), so within a service row order is time order, but the last 10% of all rows
    would be the last service(s) whole: the trees would never see that service's category, and
    the stopping point would be chosen on services they were not grown on. Per service, every
    service is on both sides and the held-out minutes come after that service's training
    minutes, which is what a forecast does; it needs no minutes array. Training windows ending
    within ``gap`` rows (L+H) before a service's first held-out window are dropped, so no
    held-out target is also a training input (the splits' embargo, in miniature).
    """
    codes = service_codes[ends]
    order = np.lexsort((ends, codes))  # by service, then time
    sorted_codes = codes[order]
    group_start = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    group_size = np.diff(np.r_[group_start, len(order)])
    held_count = (group_size * fraction).astype(np.int64)
    rank = np.arange(len(order)) - np.repeat(group_start, group_size)
    held_sorted = rank >= np.repeat(group_size - held_count, group_size)
    # the first held-out end of each service (none: past every row, so nothing is dropped)
    first_held = np.where(held_count > 0, ends[order][np.minimum(group_start + group_size - held_count, len(order) - 1)], np.iinfo(np.int64).max)
    too_close = ~held_sorted & (ends[order].astype(np.int64) > np.repeat(first_held, group_size) - gap)
    held = np.zeros(len(ends), dtype=bool)
    fit = np.zeros(len(ends), dtype=bool)
    held[order] = held_sorted
    fit[order] = ~held_sorted & ~too_close
    return fit, held


def _drawn_ends(train_ends: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """The training ends the baseline is fitted on, sorted: all of them, or a seeded draw of
    ``max_samples`` without replacement."""
    ends = np.sort(np.asarray(train_ends, dtype=np.int64))
    if len(ends) == 0:
        raise ValueError("no training windows to fit the gradient-boosting baseline on")
    if len(ends) > max_samples:
        rng = np.random.default_rng(seed)
        ends = ends[np.sort(rng.choice(len(ends), size=max_samples, replace=False))]
    return ends


def _training_matrices(
    features: np.ndarray,
    target: np.ndarray,
    service_codes: np.ndarray,
    window_ends: np.ndarray,
    sequence_length: int,
    horizon: int,
    loss: str,
    anchor: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The flattened windows ending at ``window_ends`` (:func:`_gather`) and what the trees learn
    for each: the encoded latency at t+H, less the encoded latency at t when anchored."""
    # scikit-learn bins a float64 copy of whatever it is given: built float64 here, the
    # windows exist once (not as float32 plus its float64 copy, nor as a slice of a whole)
    matrix = np.empty((len(window_ends), sequence_length * features.shape[1] + 1), dtype=np.float64)
    y = _encode(target[window_ends + horizon].astype(np.float64), loss)
    if anchor:
        y -= _encode(target[window_ends].astype(np.float64), loss)
    return _gather(matrix, features, service_codes, window_ends, sequence_length), y


def _regressor(
    loss: str, learning_rate: float, max_iter: int, n_columns: int, n_services: int, early_stopping: bool, seed: int
) -> HistGradientBoostingRegressor:
    """The unfitted regressor for ``loss`` on matrices of ``n_columns`` (the service code last)."""
    return HistGradientBoostingRegressor(
        loss="absolute_error" if loss.endswith("absolute_error") else "squared_error",
        learning_rate=learning_rate,
        max_iter=max_iter,
        # more services than HistGradientBoosting's category ceiling: the code as a number
        categorical_features=[n_columns - 1] if n_services <= _MAX_CATEGORIES else None,
        early_stopping=early_stopping,
        random_state=seed,
    )


def _fit_regressor(
    regressor: HistGradientBoostingRegressor,
    matrix: np.ndarray,
    y: np.ndarray,
    held: tuple[np.ndarray, np.ndarray] | None,
) -> HistGradientBoostingRegressor:
    """Fit ``regressor`` on ``matrix`` and ``y``, stopping early on the ``held`` windows (matrix and
    targets) when given: through ``X_val`` where this scikit-learn has it."""
    if held is None:
        regressor.fit(matrix, y)
    elif _supports_validation_set():
        regressor.fit(matrix, y, X_val=held[0], y_val=held[1])
    else:
        regressor = _fit_stopping_on(regressor, matrix, y, *held)
    return regressor


def window_median(target: np.ndarray, ends: np.ndarray, sequence_length: int) -> np.ndarray:
    """(n,) the median of the latency (ms) over each window's ``sequence_length`` minutes, ending
    at row ``ends``: the moving median SREs put on a noisy p99 panel. A p99 of a few hundred calls a
    minute jumps by 2-10x from one minute to the next on real services (Nezha TrainTicket), so the
    level of the last minutes forecasts t+H better than the last minute alone; it needs no fitting
    and reads only the window. Minutes without a latency (NaN) are skipped; none at all gives NaN."""
    ends = np.asarray(ends, dtype=np.int64)
    if len(ends) == 0:
        return np.zeros(0)
    rows = ends[:, None] + np.arange(1 - sequence_length, 1, dtype=np.int64)[None]
    window = np.asarray(target, dtype=np.float64)[rows]
    known = np.isfinite(window)
    if known.all():
        return np.median(window, axis=1)
    median = np.full(len(ends), np.nan)
    some = known.any(axis=1)
    median[some] = np.nanmedian(window[some], axis=1)
    return median


@dataclass
class GradientBoostingBaseline:
    """scikit-learn HistGradientBoostingRegressor on the flattened L x F input window plus the
    service (categorical), forecasting the latency (ms) at t+H.

    Anchored (the default), the trees learn the change from the latency at t (in log1p space for
    the log losses) rather than its level: trees cannot extrapolate, so an un-anchored fit caps
    every forecast at the levels seen in training, and a service that runs hotter in validation
    than in training is forecast below persistence.

    Build it with :meth:`fit`. Attributes ``n_samples`` (windows drawn from the training ends,
    at most ``max_samples``), ``n_fit_samples`` (those the trees are grown on) and
    ``n_early_stopping_samples`` (the held-out slice early stopping watches) say what it saw.
    """

    regressor: HistGradientBoostingRegressor
    sequence_length: int
    horizon: int
    n_features: int
    loss: str
    anchor: bool
    n_samples: int
    n_fit_samples: int
    n_early_stopping_samples: int

    @property
    def n_iterations(self) -> int:
        """Boosting iterations kept (after early stopping)."""
        return int(self.regressor.n_iter_)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        target: np.ndarray,
        service_codes: np.ndarray,
        train_ends: np.ndarray,
        sequence_length: int,
        horizon: int,
        n_services: int,
        seed: int,
        max_samples: int = MAX_SAMPLES,
        loss: str = DEFAULT_LOSS,
        max_iter: int = MAX_ITER,
        learning_rate: float = 0.1,
        anchor: bool = True,
    ) -> "GradientBoostingBaseline":
        """Fit on the training windows only.

        Parameters
        ----------
        features : (n_rows, n_features) float32, the inputs the model sees (scaled or not: trees
            are invariant to monotone per-feature transforms); NaN allowed outside the samples
        target : (n_rows,) float32, latency in ms at each row
        service_codes : (n_rows,) int, service index of each row, in ``[0, n_services)``
        train_ends : (n_train,) row indices ending valid training windows; only the rows
            ``t-L+1 .. t`` (inputs; the latency at t, anchored) and ``t+H`` (target) of these windows
            are read
        max_samples : at most this many windows are drawn (seeded, without replacement)
        loss : ``log_absolute_error`` / ``log_squared_error`` fit log1p(latency) with that loss;
            ``absolute_error`` fits milliseconds
        anchor : fit the change from the latency at t (``target[t]``, inside the window) instead
            of the level at t+H
        """
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        ends = _drawn_ends(train_ends, max_samples, seed)
        early_stopping = len(ends) > EARLY_STOPPING_MIN_SAMPLES
        if early_stopping:
            fit_mask, held_mask = _early_stopping_split(ends, service_codes, EARLY_STOPPING_FRACTION, sequence_length + horizon)
        else:
            fit_mask, held_mask = np.ones(len(ends), dtype=bool), np.zeros(len(ends), dtype=bool)

        def matrices(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _training_matrices(features, target, service_codes, ends[chosen], sequence_length, horizon, loss, anchor)

        matrix, y = matrices(fit_mask)
        regressor = _regressor(loss, learning_rate, max_iter, matrix.shape[1], n_services, early_stopping, seed)
        regressor = _fit_regressor(regressor, matrix, y, matrices(held_mask) if early_stopping else None)
        return cls(
            regressor=regressor,
            sequence_length=sequence_length,
            horizon=horizon,
            n_features=features.shape[1],
            loss=loss,
            anchor=anchor,
            n_samples=len(ends),
            n_fit_samples=int(fit_mask.sum()),
            n_early_stopping_samples=int(held_mask.sum()),
        )

    def state(self) -> dict:
        """Everything but the trees, as plain values (the checkpoint keeps it); :attr:`saved` has the trees."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "regressor"}

    @functools.cached_property
    def saved(self) -> bytes:
        """The fitted trees as a skops file's bytes (read back by :meth:`from_saved`), made once:
        identical fits give identical bytes (:func:`_canonical`), and the checkpoint keeps their digest."""
        import skops.io  # here: importing it takes over a second (it lists every scikit-learn estimator)

        return _canonical(skops.io.dumps(self.regressor))

    @classmethod
    def from_saved(cls, state: dict, saved: bytes) -> "GradientBoostingBaseline":
        """Rebuild from :meth:`state` and :attr:`saved`; UntrustedModelError when ``saved`` holds
        any type outside TRUSTED_TYPES (nothing of it is run) or is not a skops file."""
        import skops.io

        try:
            untrusted = sorted(set(skops.io.get_untrusted_types(data=saved)) - set(TRUSTED_TYPES))
        except Exception as error:  # a damaged or foreign file: skops' errors vary by what it found
            raise UntrustedModelError(f"not a saved gradient-boosting model ({type(error).__name__})") from error
        if untrusted:
            raise UntrustedModelError(f"it holds types this toolkit does not trust: {', '.join(untrusted)}")
        regressor = skops.io.loads(saved, trusted=list(TRUSTED_TYPES))
        if not isinstance(regressor, HistGradientBoostingRegressor):
            raise UntrustedModelError(f"it holds a {type(regressor).__name__}, not a HistGradientBoostingRegressor")
        baseline = cls(regressor=regressor, **state)
        baseline.__dict__["saved"] = saved  # the very bytes its digest was taken of
        return baseline

    def predict(
        self,
        features: np.ndarray,
        target: np.ndarray,
        service_codes: np.ndarray,
        ends: np.ndarray,
        chunk_size: int = PREDICT_CHUNK,
    ) -> np.ndarray:
        """(len(ends),) float64 forecast in ms of the latency at t+H for the windows ending at
        ``ends``; ``chunk_size`` windows at a time, so memory stays flat.

        Reads rows ``t-L+1 .. t`` of ``features`` and, anchored, ``target[t]`` (the latency at t,
        NaN there gives a NaN forecast); never a row after t.
        """
        ends = np.asarray(ends, dtype=np.int64)
        out = np.empty(len(ends), dtype=np.float64)
        width = self.sequence_length * self.n_features + 1
        for start in range(0, len(ends), chunk_size):
            chunk = ends[start : start + chunk_size]
            matrix = _gather(np.empty((len(chunk), width), dtype=np.float64), features, service_codes, chunk, self.sequence_length)
            prediction = self.regressor.predict(matrix)
            if self.anchor:
                prediction += _encode(target[chunk].astype(np.float64), self.loss)
            out[start : start + len(chunk)] = _decode(prediction, self.loss)
        return out


def _canonical(saved: bytes) -> bytes:
    """A skops file renumbered so that the same trees always give the same bytes.

    skops names each object (and each array's file) by its ``id()`` and stamps every member with
    the time it was written, so two identical runs would write different files. The same file
    with those ids numbered in order of appearance and one fixed timestamp loads the same model.
    """
    source = zipfile.ZipFile(io.BytesIO(saved))
    schema = json.loads(source.read("schema.json"))
    numbers: dict[int, int] = {}

    def number(value: int) -> int:
        return numbers.setdefault(int(value), len(numbers))

    def renamed(name: str) -> str:
        stem, _, suffix = name.partition(".")
        return f"{number(int(stem))}.{suffix}"

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "__id__" in node:
                node["__id__"] = number(node["__id__"])
            if node.get("__loader__") == "CachedNode":
                node["content"] = number(node["content"])
            if isinstance(node.get("file"), str):
                node["file"] = renamed(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        members = {renamed(info.filename): source.read(info.filename) for info in source.infolist() if info.filename != "schema.json"}
        members["schema.json"] = json.dumps(schema, indent=2).encode()
        for name in sorted(members):
            target.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), members[name], compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _encode(latency_ms: np.ndarray, loss: str) -> np.ndarray:
    if loss.startswith("log_"):
        # latency spans orders of magnitude across services: in log space one tree split serves all
        return np.log1p(np.maximum(latency_ms, 0.0))
    return latency_ms


def _decode(prediction: np.ndarray, loss: str) -> np.ndarray:
    if loss.startswith("log_"):
        return np.expm1(np.maximum(prediction, 0.0))
    return np.maximum(prediction, 0.0)


def _fit_stopping_on(
    regressor: HistGradientBoostingRegressor, X: np.ndarray, y: np.ndarray, X_held: np.ndarray, y_held: np.ndarray
) -> HistGradientBoostingRegressor:
    """Early stopping on given held-out windows for a scikit-learn without ``X_val`` (< 1.7):
    grow every iteration, score each stage on the held-out windows, refit with the best count
    (the fit is deterministic, so the refit is the same trees, cut there)."""
    regressor.set_params(early_stopping=False)
    regressor.fit(X, y)
    absolute = regressor.loss == "absolute_error"
    scores = [
        float(np.mean(np.abs(stage - y_held)) if absolute else np.mean((stage - y_held) ** 2))
        for stage in regressor.staged_predict(X_held)
    ]
    best = int(np.argmin(scores)) + 1
    if best < regressor.n_iter_:
        regressor.set_params(max_iter=best)
        regressor.fit(X, y)
    return regressor
