"""User-facing errors and the one place that turns them into exit status 2."""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Callable, Sequence

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
    after :func:`stop_on_sigterm`, SIGTERM exits 143.
    """

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted: no artifact was changed", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated as stop:
            print(f"stopped by SIGTERM: no artifact was changed; {stop}", file=sys.stderr)
            return EXIT_TERMINATED
        except BrokenPipeError:
            # stdout is gone; point it at devnull so the interpreter's final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        finally:
            while _restore_on_exit:
                signal.signal(signal.SIGTERM, _restore_on_exit.pop())

    return wrapper


def warn(message: str) -> None:
    """A warning line on stderr (the run goes on)."""
    print(f"warning: {message}", file=sys.stderr)


def stop_on_sigterm(hint: str) -> None:
    """From now on SIGTERM ends the run as an interrupt does (staged files dropped, earlier
    artifacts kept), with one line and ``hint`` (what to do next), exit status 143."""

    def stop(signum: int, frame: object) -> None:
        raise Terminated(hint)

    _restore_on_exit.append(signal.signal(signal.SIGTERM, stop))


_restore_on_exit: list = []  # SIGTERM handlers to put back when main returns (not at interpreter exit)
