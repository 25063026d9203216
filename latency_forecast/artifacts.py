"""Everything written to disk and torch files read back: atomic JSON/PNG/torch files, staged runs.

A run stages its outputs in a hidden directory and moves them into place only when it has
succeeded, so a failed or interrupted run never leaves a half-written file and never touches
the artifacts of an earlier good run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from latency_forecast.errors import UserError


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean(value: Any) -> Any:
    """NaN/inf become null: the contract's JSON never holds NaN."""
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: str, write: Any, mode: str = "w") -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide metrics from a dashboard's reader
        with os.fdopen(handle, mode) as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, then a rename."""
    _atomic(path, lambda stream: stream.write(text))


def write_json(value: Any, path: str) -> None:
    write_text(json.dumps(_clean(value), indent=2, default=_json_default, allow_nan=False) + "\n", path)


class Stage:
    """Files of one run, written into a hidden staging directory until :func:`staged` commits."""

    def __init__(self, directory: str):
        self.directory = directory
        self.names: list[str] = []

    def path(self, name: str) -> str:
        self.names.append(name)
        return os.path.join(self.directory, name)

    def write_json(self, name: str, value: Any) -> None:
        write_json(value, self.path(name))

    def save_torch(self, name: str, value: dict) -> None:
        torch.save(value, self.path(name))

    def save_figure(self, name: str, figure: Any) -> None:
        figure.savefig(self.path(name), dpi=110, bbox_inches="tight")


@contextlib.contextmanager
def staged(output_dir: str) -> Iterator[Stage]:
    """Stage a run's files; on success move each into ``output_dir``, on failure drop them all."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=output_dir)
    except OSError as error:
        raise UserError(f"cannot write to output directory {output_dir}: {error.strerror}; choose another path") from error
    try:
        stage = Stage(staging)
        yield stage
        for name in dict.fromkeys(stage.names):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staging_directory(target: str) -> Iterator[str]:
    """A fresh hidden directory beside ``target``, removed afterwards unless renamed into place."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".staging-{os.path.basename(os.path.abspath(target))}-", dir=parent)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(staging: str, target: str) -> None:
    """Swap a finished ``staging`` directory in for ``target`` (which may not exist yet)."""
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise UserError(f"{target} exists and is not a directory; remove it or choose another --output")
        retired = tempfile.mkdtemp(prefix=f".old-{os.path.basename(os.path.abspath(target))}-", dir=os.path.dirname(os.path.abspath(target)))
        os.rename(target, os.path.join(retired, "store"))
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)


def load_torch(path: str, what: str, flag: str) -> dict:
    """A dict saved with ``torch.save``, loaded with ``weights_only=True`` (no pickled code runs)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; run train.py first or pass {flag}")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"cannot load {what} {path} ({type(error).__name__}); pass a file written by train.py") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a {what} written by train.py; pass the file from its output directory")
    return value
