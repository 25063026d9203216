"""Everything written to disk and torch files read back: atomic JSON/PNG/torch files, staged
runs, the output directory's lock.

A run stages its outputs in a hidden directory and moves them into place only when it has
succeeded, so a failed or interrupted run never leaves a half-written file and never touches
the artifacts of an earlier good run. POSIX cannot rename several files at once, so the move is
a commit with roll-forward: a ``.commit`` file in the staging directory, written atomically once
every file is there, says "these files are the new run". A process killed between two renames
leaves that staging directory behind, and :func:`recover` (run by the next writer under the
lock, and by every loader) finishes the renames; a staging directory without ``.commit`` is an
unfinished run, and is removed once the process that made it is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
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


def save_torch_atomic(value: dict, path: str) -> None:
    """``torch.save`` to ``path`` atomically: a kill mid-write leaves the previous file."""
    _atomic(path, lambda stream: torch.save(value, stream), mode="wb")


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

    def write_bytes(self, name: str, value: bytes) -> None:
        with open(self.path(name), "wb") as stream:
            stream.write(value)

    def save_torch(self, name: str, value: dict) -> None:
        torch.save(value, self.path(name))

    def save_figure(self, name: str, figure: Any) -> None:
        figure.savefig(self.path(name), dpi=110, bbox_inches="tight")


STAGING_PREFIX = ".staging-"
COMMIT_MARKER = ".commit"


def _output_directory_error(output_dir: str, error: OSError) -> UserError:
    return UserError(f"cannot write to output directory {output_dir}: {error.strerror}; choose another path")


@contextlib.contextmanager
def staged(output_dir: str) -> Iterator[Stage]:
    """Stage a run's files; on success commit them into ``output_dir``, on failure drop them all."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir)
    except OSError as error:
        raise _output_directory_error(output_dir, error) from error
    committed = False
    try:
        stage = Stage(staging)
        yield stage
        write_json(list(dict.fromkeys(stage.names)), os.path.join(staging, COMMIT_MARKER))
        committed = True  # from here on the files are the new run: a kill is rolled forward by recover()
        _finish_commit(staging, output_dir)
    finally:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)


def _finish_commit(staging: str, output_dir: str) -> None:
    """Move a committed staging directory's files into place (those not moved yet), then drop it."""
    with open(os.path.join(staging, COMMIT_MARKER)) as stream:
        names = json.load(stream)
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # moved before an interruption, or by a concurrent recover()
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    os.remove(os.path.join(staging, COMMIT_MARKER))
    shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover(output_dir: str) -> None:
    """Finish the commits that a killed run left half done in ``output_dir`` and remove the
    staging directories of runs that died before committing. Safe to call any time."""
    if not os.path.isdir(output_dir):
        return
    try:
        for entry in sorted(os.scandir(output_dir), key=lambda item: item.stat().st_mtime):
            if not (entry.name.startswith(STAGING_PREFIX) and entry.is_dir()):
                continue
            if os.path.exists(os.path.join(entry.path, COMMIT_MARKER)):
                _finish_commit(entry.path, output_dir)
                continue
            pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)
    except FileNotFoundError:  # a concurrent recover() got there first
        pass
    except OSError as error:
        raise UserError(
            f"{output_dir} holds the files of an interrupted run that cannot be moved into place ({error.strerror}); "
            "run train.py again with this --output-dir as a user who can write there"
        ) from error


@contextlib.contextmanager
def output_lock(output_dir: str, flag: str = "--output-dir") -> Iterator[None]:
    """Hold ``output_dir``'s lock for one run: a second run into it is refused, never interleaved.

    The lock is ``flock`` on the directory itself: no lock file to go stale, and it dies with its
    process, kill -9 included. Under the lock, what an earlier killed run left is recovered first.
    A directory made for the run is removed again when the run wrote nothing into it.
    """
    created = not os.path.isdir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise _output_directory_error(output_dir, error) from error
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another run (train.py or backtest.py) is writing into {output_dir}; wait for it to finish or choose another {flag}"
            ) from None
        recover(output_dir)
        yield
    finally:
        os.close(handle)  # releases the lock
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                os.rmdir(output_dir)


def resume_directory(output_dir: str, name: str, resume: bool) -> tuple[str, bool]:
    """``output_dir/name``, where a run keeps its resumable training state, and whether it holds
    a saved state: emptied for a fresh run; with ``resume``, kept (where nothing was saved yet,
    the run starts from the beginning, so one command serves a first start and every retry)."""
    path = os.path.join(output_dir, name)
    if not resume:
        shutil.rmtree(path, ignore_errors=True)
    saved = os.path.isdir(path) and any(not entry.startswith(".") for entry in os.listdir(path))  # .tmp-*: a write cut short
    return path, saved


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


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, None when there is no such file."""
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or type(error).__name__}); check its permissions") from error


def load_torch(path: str, what: str, flag: str) -> dict:
    """A dict saved with ``torch.save``, loaded with ``weights_only=True`` (no pickled code runs);
    a commit that a killed run left half done beside it is finished first."""
    recover(os.path.dirname(os.path.abspath(path)))
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; run train.py first or pass {flag}")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"cannot load {what} {path} ({type(error).__name__}); pass a file written by train.py") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a {what} written by train.py; pass the file from its output directory")
    return value
