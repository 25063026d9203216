"""User-facing errors and the one place that turns them into exit status 2."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import Callable, Iterator, NoReturn, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `... | head`
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler, Kubernetes, systemd stopping the run); a BaseException like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


class UserError(Exception):
    """Bad input the user can fix. The message names the problem and the fix, in one line."""


def cli_entrypoint(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main(argv)``: user errors become one stderr line and exit status 2.

    Anything else is a bug and keeps its traceback. An interrupt exits 130; artifacts are
    staged and only moved into place at the end of a run, so earlier ones survive it.
    A reader that closes stdout early (``| head``) ends the run quietly with 141, no traceback;
    after :func:`stop_on_signals`, SIGTERM exits 143.
    """

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        global _held
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt as interrupt:
            print(f"interrupted: no artifact was changed{f'; {interrupt}' if interrupt.args else ''}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated as terminated:
            print(f"stopped by SIGTERM: no artifact was changed; {terminated}", file=sys.stderr)
            return EXIT_TERMINATED
        except BrokenPipeError:
            # stdout is gone; point it at devnull so the interpreter's final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        finally:
            _held = 0  # a signal held when an error ended the run is not the next run's
            while _restore_on_exit:
                signal.signal(*_restore_on_exit.pop())

    return wrapper


def warn(message: str) -> None:
    """A warning line on stderr (the run goes on)."""
    print(f"warning: {message}", file=sys.stderr)


def stop_on_signals(hint: str) -> None:
    """From now on SIGTERM (exit 143) and SIGINT (exit 130) end the run as an interrupt does
    (staged files dropped, earlier artifacts kept), with one line and ``hint`` (what to do next).

    Inside :func:`deferred_stop` the first of them is held instead, until the code reaches a
    point where it can stop (having saved its state) and calls :func:`stop`; more signals change
    nothing then, because process managers often deliver one stop twice (Slurm to the batch
    shell, which passes it on, and to its children; torchrun's agent to workers that got it too).
    """
    global _hint
    _hint = hint

    def on_signal(signum: int, frame: object) -> None:
        global _held
        if _deferring:
            _held = _held or signum
            return
        stop(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        _restore_on_exit.append((signum, signal.signal(signum, on_signal)))


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """A section (a training loop) that polls :func:`held_signal` at the points where it can stop;
    a signal still held when it ends stops the run there."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _held and not _deferring:
        stop(_held)


def held_signal() -> int:
    """The SIGTERM or SIGINT held inside a :func:`deferred_stop` section, 0 when there is none."""
    return _held


def stop(signum: int) -> NoReturn:
    """End the run as ``signum`` ends it: :class:`Terminated` for SIGTERM, KeyboardInterrupt for SIGINT."""
    global _held
    _held = 0
    raise Terminated(_hint) if signum == signal.SIGTERM else KeyboardInterrupt(_hint)


_restore_on_exit: list = []  # (signal, handler) to put back when main returns (not at interpreter exit)
_hint = ""  # what stop_on_signals was told to say
_deferring = 0  # how many deferred_stop sections are open
_held = 0  # the signal held in one of them, 0: none
