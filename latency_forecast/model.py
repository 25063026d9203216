"""The recurrent forecaster: LSTM or GRU over a window of features, a per-service embedding,
and a two-part head (service-relative plus absolute latency)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latency_forecast.config import ModelConfig


class Outputs(NamedTuple):
    """What the network says about each window, in the target's standardised log space."""

    forecast: torch.Tensor  # (batch,)
    quantiles: torch.Tensor | None  # (batch, n_quantiles), ascending levels, non-decreasing
    breach_logit: torch.Tensor | None  # (batch,), multitask models only


class LatencyForecaster(nn.Module):
    """Predicts one service's standardised log p99 latency ``horizon`` minutes ahead.

    The service embedding joins the last hidden state at the head: two services with the same
    CPU and topology can live at 40 ms and 300 ms, and the head must know which one it sees.

    The head has two outputs because p99 latency is the sum of two kinds of time. Queueing
    multiplies a service's own time (relative: ``location_s + scale_s * r`` in log space);
    a GC pause, an extra network hop or a backlog adds milliseconds whatever the service
    (absolute: ``pooled_location + pooled_scale * a``). The forecast is their sum,
    ``logaddexp`` in log space, returned standardised per service like the target.
    A single relative output had to learn "+2 s" as a different multiplier for every service,
    and extrapolated a fault seen on one service wildly on another.

    An ``anchored`` model (one that reads the latency's own history) starts the relative part
    from the service's latency at t (``current``, standardised like the target): the network
    forecasts the change, so a plateau is forecast as itself and a fault the model never saw on
    this service is not extrapolated from a normal level to another service's peak. With
    ``config.anchor_minutes`` above 1, ``current`` is (latency at t, median of the last minutes)
    on a last axis, and a gate (the head's last output) mixes the two into the anchor.

    Quantile outputs (``config.quantile_levels``) sit on the point forecast: the lowest is the
    forecast plus a learned offset, each next one adds a softplus, so they never cross.
    """

    def __init__(
        self,
        n_features: int,
        n_services: int,
        config: ModelConfig,
        location: Sequence[float] | None = None,
        scale: Sequence[float] | None = None,
        pooled: tuple[float, float] = (0.0, 1.0),
        input_columns: Sequence[int] | None = None,
        anchored: bool = False,
        relative_column: int | None = None,
        differenced: bool = False,
    ):
        """``input_columns``: the model reads only these columns of the windows it is given
        (``n_features`` of them); None reads all ``n_features``. ``relative_column``: the column
        the network reads relative to its value at t (an anchored model's latency history), or
        with ``differenced`` as its change from the minute before (0 at a window's first minute),
        which does not depend on t, so one pass over a sequence serves a target at every step."""
        super().__init__()
        recurrent = {"lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        self.rnn = recurrent(
            input_size=n_features + int(differenced and relative_column is not None),
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.embedding = nn.Embedding(n_services, config.service_embedding_dim) if config.service_embedding_dim else None
        head_inputs = config.hidden_size + config.service_embedding_dim
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(head_inputs, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, 2 + len(config.quantile_levels) + int(config.multitask) + int(config.anchor_minutes > 1)),
        )
        self.multitask = config.multitask
        self.n_quantiles = len(config.quantile_levels)
        self.register_buffer("quantile_levels", torch.tensor(config.quantile_levels, dtype=torch.float32))
        self.anchored = anchored
        if relative_column is not None and not anchored:
            raise ValueError("only an anchored model reads its latency relative to t: the anchor carries the level")
        self.relative_column = relative_column
        self.differenced = differenced
        self.anchor_minutes = config.anchor_minutes
        with torch.no_grad():  # the absolute part starts small: e^(pooled - 4 sd)
            self.head[-1].bias[1] = -4.0
        # target statistics (from training rows), so the head can mix the two parts
        self.register_buffer("location", torch.as_tensor(location if location is not None else [0.0] * n_services, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale if scale is not None else [1.0] * n_services, dtype=torch.float32))
        self.register_buffer("pooled", torch.as_tensor(pooled, dtype=torch.float32))
        self.input_columns: torch.Tensor | None
        if input_columns is None:
            self.input_columns = None
        else:
            if len(input_columns) != n_features:
                raise ValueError(f"{len(input_columns)} input columns for a model of {n_features} features")
            self.register_buffer("input_columns", torch.as_tensor(list(input_columns), dtype=torch.int64))

    def forward(
        self,
        windows: torch.Tensor,
        service_codes: torch.Tensor,
        current: torch.Tensor | None = None,
        full: bool = False,
        members: bool = False,
        steps: int = 0,
    ) -> torch.Tensor | Outputs:
        """``windows`` (batch, sequence_length, n_features), ``service_codes`` (batch,) and, for an
        anchored model, ``current`` (batch,) the standardised latency at t -> the point forecast
        (batch,), what explanations explain; with ``full`` every output (:class:`Outputs`); with
        ``members`` every output of each network, stacked on a leading axis (one network here,
        see :class:`Ensemble`), which is what training's loss reads.

        ``steps`` > 0 (sequence training): a forecast from each of the last ``steps`` minutes of
        longer windows, each output gaining a step axis after the batch's and ``current`` being
        (batch, steps); the network's state at a step has read only the minutes up to it."""
        if members:
            return Outputs(*(None if output is None else output[None] for output in self._outputs(windows, service_codes, current, True, steps)))
        return self._outputs(windows, service_codes, current, full, steps)

    def _outputs(
        self, windows: torch.Tensor, service_codes: torch.Tensor, current: torch.Tensor | None, full: bool, steps: int = 0
    ) -> torch.Tensor | Outputs:
        if self.anchored and current is None:
            raise ValueError("this model forecasts the change from the latency at t: pass current")
        if self.input_columns is not None:
            windows = windows.index_select(-1, self.input_columns)
        if self.relative_column is not None and self.differenced:
            # the latency's minute-to-minute change (log ratio to the minute before): its level is
            # the anchor's, at whichever step the forecast starts from
            column = windows[..., self.relative_column]
            change = torch.cat([torch.zeros_like(column[:, :1]), column[:, 1:] - column[:, :-1]], dim=1)
            # and its distance from the window's running mean so far: where it stands against the
            # minutes before, without an integration of noisy changes
            minutes = torch.arange(1, column.shape[1] + 1, device=column.device, dtype=column.dtype)
            above = column - torch.cumsum(column, dim=1) / minutes
            windows = torch.cat(
                [windows[..., : self.relative_column], change[..., None], windows[..., self.relative_column + 1 :], above[..., None]], dim=-1
            )
        elif self.relative_column is not None:
            # the shape of the latency's recent history, not its level: a service whose level moved
            # after training is forecast from where it is now (the anchor), not pulled back to
            # where it was (scaled log latency, so this is the log ratio to the latency at t)
            level = torch.zeros_like(windows[:, -1:])
            # the anchor's minute: the same (lower) median the caller's ``current`` took, in feature space
            recent = windows[:, -self.anchor_minutes :, self.relative_column]
            level[..., self.relative_column] = recent.median(dim=1, keepdim=True).values
            windows = windows - level
        output, _ = self.rnn(windows)
        last = output[:, -steps:] if steps else output[:, -1]  # (batch, [steps,] hidden)
        location, scale = self.location[service_codes], self.scale[service_codes]
        if self.embedding is not None:
            embedded = self.embedding(service_codes)
            last = torch.cat([last, embedded[:, None].expand(-1, steps, -1) if steps else embedded], dim=-1)
        if steps:
            location, scale = location[:, None], scale[:, None]
        heads = self.head(last)
        if not self.anchored:
            change = heads[..., 0]
        elif self.anchor_minutes > 1:
            # a learned mix of the latency at t and the recent median: persistence where the latency
            # ramps (a fault building up), the median where it jumps around a level (a p99 that
            # hops between histogram buckets from minute to minute)
            gate = torch.sigmoid(heads[..., -1])
            change = heads[..., 0] + gate * current[..., 0] + (1 - gate) * current[..., 1]
        else:
            change = heads[..., 0] + current
        relative = location + scale * change
        absolute = self.pooled[0] + self.pooled[1] * heads[..., 1]
        forecast = (torch.logaddexp(relative, absolute) - location) / scale
        quantiles = None
        if full and self.n_quantiles:
            raw = heads[..., 2 : 2 + self.n_quantiles]
            increments = torch.cat([raw[..., :1], F.softplus(raw[..., 1:])], dim=-1)
            quantiles = forecast[..., None] + torch.cumsum(increments, dim=-1)
        if not full:
            return forecast
        return Outputs(forecast, quantiles, heads[..., 2 + self.n_quantiles] if self.multitask else None)


class Ensemble(nn.Module):
    """Networks of one architecture trained side by side from different initial weights, their
    outputs averaged in the target's standardised log space (a geometric mean in ms).

    On a small store one network's forecast depends on its seed more than on any setting
    (TrainTicket, two days: test MAE 305-357 ms over eight seeds); the mean of several is that
    lottery's expectation. Quantiles are averaged level by level, so they still never cross.
    It answers the same calls as one :class:`LatencyForecaster`.
    """

    def __init__(self, members: Sequence[LatencyForecaster]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble has at least two networks")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.anchored, self.multitask, self.n_quantiles = first.anchored, first.multitask, first.n_quantiles
        self.register_buffer("quantile_levels", first.quantile_levels.clone())
        if first.input_columns is not None:
            raise ValueError("an ensemble's networks read every column of their windows")
        self.input_columns = None

    def forward(
        self,
        windows: torch.Tensor,
        service_codes: torch.Tensor,
        current: torch.Tensor | None = None,
        full: bool = False,
        members: bool = False,
        steps: int = 0,
    ) -> torch.Tensor | Outputs:
        """As :meth:`LatencyForecaster.forward`, averaged over the networks (``members``: not averaged)."""
        if not (full or members):
            return torch.stack([member(windows, service_codes, current, steps=steps) for member in self.members]).mean(0)
        each = [member(windows, service_codes, current, full=True, steps=steps) for member in self.members]
        stacked = Outputs(*(None if parts[0] is None else torch.stack(parts) for parts in zip(*each)))
        if members:
            return stacked
        return Outputs(*(None if output is None else output.mean(0) for output in stacked))
