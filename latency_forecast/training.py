"""Fit and predict loops: batches gathered by index, early stopping, device, seeds, threads.

Windows are gathered per batch from one ``(n_rows, n_features)`` tensor that lives on the
device, so there is no per-sample DataLoader and no host-to-device copy per batch. Under
``torchrun`` with a process group initialised (``distributed.init_from_env``), each rank trains
on its own samples (its services'), the same number per epoch on every rank, the model is
wrapped in DistributedDataParallel, and the losses are averaged over the ranks.

A SIGTERM or SIGINT (after ``errors.stop_on_signals``) stops a fit at the next batch boundary,
its resumable state saved there (under torchrun every rank stops at the same batch).
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from latency_forecast import artifacts, cpus, distributed, errors
from latency_forecast.config import TrainingConfig
from latency_forecast.errors import UserError
from latency_forecast.model import Ensemble, Outputs

PREDICT_BATCH_SIZE = 8192


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu or install the CUDA build of torch")
    return torch.device(name)


def configure_threads(num_threads: int) -> None:
    """Set torch's CPU threads from ``--num-threads`` (0: :data:`cpus.AUTO_TORCH_THREADS`)."""
    torch.set_num_threads(cpus.torch_threads(num_threads))


@dataclass
class SeriesTensors:
    """The whole prepared series on one device; samples are row indices into it.

    inputs : (n_rows, n_features) float32, scaled features
    target : (n_rows,) float32, standardised log latency (NaN where missing)
    service_codes : (n_rows,) int32 or int64, the model's service index for each row
    """

    inputs: torch.Tensor
    target: torch.Tensor
    service_codes: torch.Tensor
    sequence_length: int
    horizon: int
    breach: torch.Tensor | None = None  # (n_rows,) float32 1/0: latency at or above its threshold
    spike: torch.Tensor | None = None  # (n_rows,) bool: a spike of its service's own (else target > SPIKE_Z)
    anchor_minutes: int = 1  # above 1, an anchored model also reads the median latency of the window's last this many minutes

    def windows(self, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows (batch, sequence_length, n_features) and service codes for these ends; no
        target is read, so a window whose future has not happened yet (forecast.py) works too."""
        offsets = torch.arange(1 - self.sequence_length, 1, device=ends.device)
        return self.inputs[ends[:, None] + offsets], self.service_codes[ends].long()

    def sequences(self, first: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences (batch, sequence_length + steps - 1, n_features) whose first ``sequence_length``
        rows are the window ending at each ``first``, then the ``steps - 1`` rows after it, and the
        service codes. Rows past the table's end read its last row, and missing values read 0: the
        steps they reach are never supervised (the loss masks them), but must stay finite."""
        offsets = torch.arange(1 - self.sequence_length, steps, device=first.device)
        rows = (first[:, None] + offsets).clamp_(max=len(self.inputs) - 1)
        return torch.nan_to_num(self.inputs[rows]), self.service_codes[first].long()

    def batch(self, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows, service codes and targets (at t+H) for these ends."""
        windows, services = self.windows(ends)
        return windows, services, self.target[ends + self.horizon]

    def current(self, ends: torch.Tensor) -> torch.Tensor:
        """What an anchored model starts from: the standardised latency at t of each sample, or with
        ``anchor_minutes`` above 1, that latency and the (lower) median of the last ``anchor_minutes``
        minutes, missing ones skipped, stacked on a last axis of 2."""
        if self.anchor_minutes == 1:
            return self.target[ends]
        offsets = torch.arange(1 - self.anchor_minutes, 1, device=ends.device)
        median = self.target[ends[..., None] + offsets].nanmedian(dim=-1).values
        return torch.stack([self.target[ends], median], dim=-1)

    def breach_labels(self, ends: torch.Tensor) -> torch.Tensor:
        """Whether the target minute t+H of each sample breached (multitask label)."""
        assert self.breach is not None, "breach labels were not prepared"
        return self.breach[ends + self.horizon]


def gather_windows(inputs: np.ndarray, ends: np.ndarray, sequence_length: int) -> np.ndarray:
    """(len(ends), sequence_length, n_features) windows ending at ``ends``, from a numpy matrix."""
    return inputs[ends[:, None] + np.arange(1 - sequence_length, 1)]


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def epoch_order(n: int, epoch: int, seed: int, limit: int = 0, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's shuffled sample positions for one epoch (the same permutation on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if limit:
        order = order[:limit]
    return order[rank::world_size]


def shard_order(n: int, total: int, epoch: int, seed: int, limit: int = 0, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's shuffled positions into its own ``n`` samples for one epoch, when each rank holds
    other samples (under torchrun, its own services'; ``total`` over all ranks).

    Every rank takes the same number, ceil(min(limit or total, total) / world_size), so that all
    ranks take the same number of steps; a rank holding fewer repeats them, each pass reshuffled.
    """
    if n == 0:
        raise UserError(f"torchrun rank {rank} holds no training window (its services have none in the training period); start fewer ranks")
    count = -(-min(limit or total, total) // world_size)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)
    parts = [torch.randperm(n, generator=generator)[:count] for _ in range(-(-count // n))]
    return torch.cat(parts)[:count]


SPIKE_Z = 3.0  # a latency this many of its service's robust standard deviations above its median is a spike


def _loss_function(config: TrainingConfig) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-batch loss of (batch,) or (networks, batch) forecasts (the mean of each network's);
    spikes weigh ``1 + spike_weight`` because they are rare and they are the point."""

    def loss(prediction: torch.Tensor, target: torch.Tensor, spike: torch.Tensor) -> torch.Tensor:
        target = target.expand_as(prediction)
        if config.loss == "huber":
            per_sample = F.huber_loss(prediction, target, delta=config.huber_delta, reduction="none")
        elif config.loss == "absolute":
            per_sample = (prediction - target).abs()
        else:
            per_sample = F.mse_loss(prediction, target, reduction="none")
        weight = 1.0 + config.spike_weight * spike
        return (per_sample * weight).sum() / (weight.sum() * (prediction.numel() // target.shape[-1]))

    return loss


@dataclass
class Predictions:
    """Model outputs for a set of samples, in the target's standardised log space (float32)."""

    forecast: np.ndarray  # (n,)
    quantiles: np.ndarray | None  # (n, n_quantiles) for a model with quantiles
    probability: np.ndarray | None  # (n,) breach probability of a multitask model


@torch.no_grad()
def predict(model: nn.Module, series: SeriesTensors, ends: np.ndarray, batch_size: int = PREDICT_BATCH_SIZE) -> Predictions:
    """Every output of the model for the samples ending at ``ends``."""
    model.eval()
    device = series.inputs.device
    ends_tensor = torch.as_tensor(ends, dtype=torch.int64, device=device)
    parts: list[Outputs] = []
    for i in range(0, len(ends), batch_size):
        batch = ends_tensor[i : i + batch_size]
        windows, services = series.windows(batch)
        parts.append(model(windows, services, series.current(batch), full=True))
    n_quantiles, multitask = model.n_quantiles, model.multitask

    def joined(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> np.ndarray:
        return torch.cat(tensors).float().cpu().numpy() if tensors else np.zeros(shape, dtype=np.float32)

    return Predictions(
        joined([part.forecast for part in parts], (0,)),
        joined([part.quantiles for part in parts], (0, n_quantiles)) if n_quantiles else None,
        torch.sigmoid(torch.from_numpy(joined([part.breach_logit for part in parts], (0,)))).numpy() if multitask else None,
    )


def pinball_loss(quantiles: torch.Tensor, target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Mean pinball (quantile) loss of (..., batch, n_quantiles) forecasts at ``levels`` (n_quantiles,)."""
    error = target[:, None] - quantiles
    return torch.maximum(levels * error, (levels - 1) * error).mean()


def training_sequences(ends: np.ndarray, steps: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training samples cut into sequences of at most ``steps`` consecutive ends (sequence
    training): each sequence's first end, and how many ends it has (its supervised steps).

    A sequence never spans a missing end, so its first window and every row up to its last
    supervised step are valid inputs of one service. Every end is in exactly one sequence;
    ``offset`` (0 .. steps-1, drawn per epoch) moves the cuts so that the same minutes do not
    always share one. With ``steps`` 1 the sequences are the ends themselves.
    """
    ends = np.sort(np.asarray(ends, dtype=np.int64))
    if steps == 1 or len(ends) == 0:
        return ends, np.ones(len(ends), dtype=np.int64)
    index = np.arange(len(ends))
    starts_run = np.r_[True, np.diff(ends) != 1]
    position = index - np.maximum.accumulate(np.where(starts_run, index, 0))  # within its run of consecutive ends
    first = np.flatnonzero(starts_run | ((position + offset) % steps == 0))
    return ends[first], np.diff(np.r_[first, len(ends)])


def _batch_loss(
    model: nn.Module,
    series: SeriesTensors,
    ends: torch.Tensor,
    loss: Callable,
    config: TrainingConfig,
    levels: torch.Tensor | None,
    counts: torch.Tensor | None = None,
    steps: int = 0,
) -> torch.Tensor:
    """Regression loss, plus the quantiles' pinball loss and a multitask model's weighted breach BCE,
    each network's own (an ensemble's networks learn side by side, not as one averaged forecast).

    With ``steps`` (sequence training), ``ends`` are sequences' first ends and ``counts`` how many
    of their ``steps`` steps are supervised; every supervised step weighs as one sample."""
    if steps:
        assert counts is not None, "sequence training needs each sequence's count of targets"
        windows, services = series.sequences(ends, steps)
        mask = torch.arange(steps, device=ends.device)[None] < counts[:, None]
        # the end row of each step; unsupervised steps read their first end's (finite, never selected)
        at = torch.where(mask, ends[:, None] + torch.arange(steps, device=ends.device), ends[:, None])
        every = model(windows, services, series.current(at), members=True, steps=steps)
        outputs = Outputs(*(None if output is None else output[:, mask] for output in every))
        ends, target = at[mask], series.target[at[mask] + series.horizon]
    else:
        windows, services, target = series.batch(ends)
        outputs = model(windows, services, series.current(ends), members=True)
    spike = series.spike[ends + series.horizon] if series.spike is not None else target > SPIKE_Z
    total = loss(outputs.forecast, target, spike)
    if outputs.quantiles is not None:
        # unweighted: weighting spikes up would push every quantile up and break its coverage
        total = total + config.quantile_loss_weight * pinball_loss(outputs.quantiles, target, levels)
    if outputs.breach_logit is not None:
        pos_weight = torch.tensor(config.breach_pos_weight, device=target.device)
        labels = series.breach_labels(ends).expand_as(outputs.breach_logit)
        breach_loss = F.binary_cross_entropy_with_logits(outputs.breach_logit, labels, pos_weight=pos_weight)
        total = total + config.breach_loss_weight * breach_loss
    return total


@torch.no_grad()
def _mean_loss(
    model: nn.Module,
    series: SeriesTensors,
    ends: torch.Tensor,
    loss: Callable,
    config: TrainingConfig,
    levels: torch.Tensor | None,
    counts: torch.Tensor | None = None,
) -> float:
    """The loss over the samples ending at ``ends``, or with ``counts`` over the sequences that
    start there (:func:`training_sequences`: every sample once, the loss in the form training
    minimises, for a fraction of the recurrent work)."""
    model.eval()
    steps = config.targets_per_sequence if counts is not None else 0
    per_batch = PREDICT_BATCH_SIZE // max(steps, 1)
    total = torch.zeros((), device=series.inputs.device)
    for i in range(0, len(ends), per_batch):
        batch_counts = None if counts is None else counts[i : i + per_batch]
        targets = len(ends[i : i + per_batch]) if batch_counts is None else batch_counts.sum()
        total += _batch_loss(model, series, ends[i : i + per_batch], loss, config, levels, batch_counts, steps) * targets
    return float(total / max(len(ends) if counts is None else int(counts.sum()), 1))


RESUME_FORMAT = 2  # the layout of a saved state; one of another layout is not resumed


@dataclass
class ResumeFile:
    """Where :func:`fit` keeps its resumable state (after every epoch, and at the batch where a
    signal stopped it), and the fingerprint of the settings and data it belongs to (a state of
    other settings or data is never resumed)."""

    path: str
    fingerprint: str

    def load(self) -> dict | None:
        """The saved state, None when there is none; a user error when it belongs to another run."""
        if not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # it is written atomically: this is a file from elsewhere or a damaged disk
            raise UserError(f"--resume: cannot read the saved training state {self.path} ({type(error).__name__}); rerun without --resume") from error
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"--resume: the training state in {os.path.dirname(self.path)} was saved by a run with other settings or data; "
                "resume with that run's command and store, or rerun without --resume to start over"
            )
        if state.get("format") != RESUME_FORMAT:
            raise UserError(f"--resume: the training state in {os.path.dirname(self.path)} was saved by another version of train.py; rerun without --resume")
        return state

    def save(self, state: dict) -> None:
        artifacts.save_torch_atomic({**state, "fingerprint": self.fingerprint, "format": RESUME_FORMAT}, self.path)


def _rng_states() -> dict:
    """Every generator a training step could draw from (dropout draws from torch's), as tensors,
    numbers and lists (``weights_only``)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": [version, list(python_state), gauss_next],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class _Position:
    """Where a fit stands: ``epoch`` epochs finished, then ``batch`` batches of the next one, whose
    losses sum to ``running`` (a tensor on the training device) and which took ``seconds`` so far."""

    epoch: int
    running: torch.Tensor
    batch: int = 0
    seconds: float = 0.0


@dataclass
class _EarlyStopping:
    """What early stopping carries from epoch to epoch (and ``--resume`` saves): the best
    validation loss and its weights, the epochs since it, the history."""

    best_loss: float
    best_state: dict
    stale: int = 0
    history: list[dict] = field(default_factory=list)

    def record(self, model: nn.Module, epoch: int, train_loss: float, validation_loss: float, seconds: float) -> bool:
        """Add an epoch to the history, keeping the weights if its validation loss is the best yet
        (returned: whether it is)."""
        self.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": validation_loss, "seconds": seconds})
        improved = validation_loss < self.best_loss
        if improved:
            self.best_loss, self.best_state, self.stale = validation_loss, copy.deepcopy(model.state_dict()), 0
        else:
            self.stale += 1
        return improved


def _start(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    resume: ResumeFile | None,
    epochs: int,
    device: torch.device,
    log: Callable[[str], None] | None,
) -> tuple[_EarlyStopping, _Position, int]:
    """Early stopping's state, where training stands and the last epoch to run: the start, or
    where the state ``resume`` holds left off (weights, optimiser, scheduler and RNG restored).
    ``log``: where to say which, or None."""
    stopping = _EarlyStopping(float("inf"), copy.deepcopy(model.state_dict()))
    saved = resume.load() if resume is not None else None
    if saved is None:
        if log is not None:
            log(f"training from the start: at most {epochs} epochs")
        return stopping, _Position(0, torch.zeros((), device=device)), epochs
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _restore_rng_states(saved["rng"])
    stopping = _EarlyStopping(saved["best_loss"], saved["best_state"], saved["stale"], saved["history"])
    position = _Position(saved["epoch"], saved["running"].to(device), saved["batch"], saved["seconds"])
    if log is not None:
        where = f"in epoch {position.epoch + 1} after batch {position.batch}" if position.batch else f"after epoch {position.epoch}"
        log(f"resuming {where}" + (f" (best validation loss {stopping.best_loss:.4f})" if stopping.history else ""))
    # stopped early or ran every epoch: nothing left to train
    return stopping, position, position.epoch if saved["finished"] else epochs


def _resumable_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    position: _Position,
    finished: bool,
    stopping: _EarlyStopping,
) -> dict:
    """Everything :func:`_start` needs to continue from ``position`` (``finished``: nothing is left)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_states(),
        "epoch": position.epoch, "batch": position.batch, "running": position.running.cpu(), "seconds": position.seconds, "finished": finished,
        "best_loss": stopping.best_loss, "best_state": stopping.best_state, "stale": stopping.stale, "history": stopping.history,
    }


def _stop_signal(world_size: int) -> int:
    """The SIGTERM or SIGINT held to stop at this batch boundary (``errors.deferred_stop``), 0 to go
    on. Under torchrun the ranks' steps are in lockstep (DDP), so all must stop at the same batch:
    the signal of any rank stops every rank."""
    held = errors.held_signal()
    if world_size == 1:
        return held
    return int(distributed.all_reduce(np.array([held]), "max")[0])


def _rank_order(n: int, total: int, epoch: int, config: TrainingConfig, rank: int, world_size: int, limit: int) -> torch.Tensor:
    """This rank's positions into its ``n`` training samples (or sequences) for ``epoch``, at most
    ``limit`` of them (0: all): one seeded permutation shared by all, or under torchrun (each rank
    holding its own services' samples, distributed.load_shard) :func:`shard_order`."""
    if world_size == 1:
        return epoch_order(n, epoch, config.seed, limit)
    return shard_order(n, total, epoch, config.seed, limit, rank, world_size)


def _epoch_sequences(train_ends: np.ndarray, epoch: int, config: TrainingConfig) -> tuple[np.ndarray, np.ndarray | None, int]:
    """What one epoch trains on: the training samples' ends (and None) for one target per window,
    or with ``--targets-per-sequence`` the sequences' first ends and their counts of targets, cut
    at an offset drawn from the seed and the epoch; then how many of them make an epoch (0: all)."""
    steps = config.targets_per_sequence
    if steps == 1:
        return train_ends, None, config.samples_per_epoch
    offset = int(np.random.default_rng((config.seed, epoch)).integers(steps))
    first, counts = training_sequences(train_ends, steps, offset)
    # about --samples-per-epoch targets: sequences hold `steps` targets but at a run's edges
    limit = -(-config.samples_per_epoch * len(first) // max(len(train_ends), 1)) if config.samples_per_epoch else 0
    return first, counts, limit


def _train_epoch(
    trainable: nn.Module,
    model: nn.Module,
    series: SeriesTensors,
    train_tensor: torch.Tensor,
    counts: torch.Tensor | None,
    order: torch.Tensor,
    loss: Callable,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig,
    position: _Position,
    stop_signal: Callable[[], int],
    description: str,
    show: bool,
) -> int:
    """The batches of the training samples at positions ``order`` from ``position.batch`` on
    (``trainable`` is ``model``, or its DistributedDataParallel wrapper), each one counted in
    ``position``; with ``counts``, the samples are sequences of that many targets, ``batch_size``
    sequences a batch. Before each batch ``stop_signal()`` is asked; returns the
    signal that stopped the epoch there, 0 when it is done."""
    trainable.train()
    # an ensemble's networks train as if alone: their own gradients, clipped each (Adam is per weight)
    networks = list(model.members) if isinstance(model, Ensemble) else [model]
    steps = config.targets_per_sequence if counts is not None else 0
    batch_size = config.batch_size
    n_batches = -(-len(order) // batch_size)
    bar = tqdm(range(position.batch, n_batches), desc=description, initial=position.batch, total=n_batches,
               leave=False, disable=None if show else True, unit="batch")
    for step in bar:
        signum = stop_signal()
        if signum:
            bar.close()
            return signum
        batch = order[step * batch_size : (step + 1) * batch_size]
        batch_counts = counts[batch] if counts is not None else None
        batch_loss = _batch_loss(trainable, series, train_tensor[batch], loss, config, model.quantile_levels, batch_counts, steps)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        if config.gradient_clip:  # each network's own norm: its loss is 1/len(networks) of the batch loss
            for network in networks:
                nn.utils.clip_grad_norm_(network.parameters(), config.gradient_clip / len(networks), foreach=True)
        optimizer.step()
        position.running += batch_loss.detach()
        position.batch = step + 1
        if show and position.batch % 50 == 0:  # reading the loss syncs the device: not every step
            bar.set_postfix(loss=f"{float(position.running) / position.batch:.4f}")
    return 0


def fit(
    model: nn.Module,
    series: SeriesTensors,
    train_ends: np.ndarray,
    validation_ends: np.ndarray,
    config: TrainingConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: ResumeFile | None = None,
) -> list[dict]:
    """Adam with early stopping on the validation loss; the best weights are loaded at the end.

    With ``resume``, the whole state (weights, optimiser, scheduler, RNG, epoch, best loss and
    weights, early-stopping counter, history) is saved there after every epoch, and with the
    position inside the epoch (batch, summed loss) at the batch where a SIGTERM or SIGINT stops
    the run (``errors.stop_on_signals``); a state saved earlier is continued from. On CPU a
    resumed run ends with exactly the weights of an uninterrupted one: each epoch's order is
    seeded by its number, so the batch says where in it to go on, and dropout draws from the
    saved RNG.

    Returns the per-epoch history: ``{"epoch", "train_loss", "val_loss", "seconds"}``.
    """
    rank, world_size = _distributed()
    device = series.inputs.device
    trainable = model
    if world_size > 1:
        trainable = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel for every parameter's update, not a Python loop over the ensemble's
    # tensors (Adam was 17% of a TrainTicket step, most of it loop overhead)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    # halve the step when validation stalls: the loss is spiky, and a smaller step settles it
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=config.lr_patience)
    loss = _loss_function(config)
    if config.batch_size < 1:
        raise ValueError("batch_size 0 (auto) is resolved by fitting.fit_networks (auto_batch_size) before training")
    validation_counts = None
    if config.targets_per_sequence > 1:
        validation_first, counts = training_sequences(validation_ends, config.targets_per_sequence)
        validation_tensor = torch.as_tensor(validation_first, dtype=torch.int64, device=device)
        validation_counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    else:
        validation_tensor = torch.as_tensor(validation_ends, dtype=torch.int64, device=device)

    show = progress and rank == 0
    samples = None  # this epoch's training samples on the device: one target per window, the same every epoch
    with errors.deferred_stop():  # a SIGTERM or SIGINT waits for the next batch boundary
        stopping, position, last_epoch = _start(model, optimizer, scheduler, resume, config.epochs, device, log if show else None)
        while position.epoch < last_epoch:
            epoch = position.epoch + 1
            started = time.perf_counter() - position.seconds
            if samples is None or config.targets_per_sequence > 1:  # sequences are cut anew each epoch
                first, counts, limit = _epoch_sequences(train_ends, epoch, config)
                total = int(distributed.all_reduce(np.array([len(first)]))[0]) if world_size > 1 else len(first)
                samples = (
                    torch.as_tensor(first, dtype=torch.int64, device=device),
                    None if counts is None else torch.as_tensor(counts, dtype=torch.int64, device=device),
                    total,
                    limit,
                )
            first_tensor, counts_tensor, total, limit = samples
            order = _rank_order(len(first_tensor), total, epoch, config, rank, world_size, limit).to(device)
            description = f"epoch {epoch}/{config.epochs}"
            signum = _train_epoch(
                trainable, model, series, first_tensor, counts_tensor, order, loss, optimizer, config, position, lambda: _stop_signal(world_size), description, show
            )
            if signum:
                if resume is not None and rank == 0:
                    position.seconds = time.perf_counter() - started
                    resume.save(_resumable_state(model, optimizer, scheduler, position, False, stopping))
                errors.stop(signum)
            validation_loss = _mean_loss(model, series, validation_tensor, loss, config, model.quantile_levels, validation_counts)
            # each rank measured its own samples: every rank gets the same means, so the same decisions
            train_loss = distributed.weighted_mean(float(position.running) / max(position.batch, 1), position.batch)
            validation_loss = distributed.weighted_mean(validation_loss, len(validation_ends))
            seconds = time.perf_counter() - started
            scheduler.step(validation_loss)
            improved = stopping.record(model, epoch, train_loss, validation_loss, seconds)
            if show:
                log(
                    f"epoch {epoch:3d}/{config.epochs}  train {train_loss:.4f}  val {validation_loss:.4f}  "
                    f"{seconds:5.1f}s{'  *' if improved else ''}"
                )
            if not np.isfinite(train_loss):
                raise UserError("training diverged (loss is not finite); lower --learning-rate")
            position = _Position(epoch, torch.zeros((), device=device))
            if resume is not None and rank == 0:
                finished = stopping.stale >= config.patience or epoch == config.epochs
                resume.save(_resumable_state(model, optimizer, scheduler, position, finished, stopping))
            if stopping.stale >= config.patience:
                if show:
                    log(f"early stop: no better validation loss for {config.patience} epochs; keeping epoch {epoch - stopping.stale}")
                break
    model.load_state_dict(stopping.best_state)
    model.eval()
    return stopping.history
