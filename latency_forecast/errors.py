"""User-facing errors and the one place that turns them into exit status 2."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `... | head`


class UserError(Exception):
    """Bad input the user can fix. The message names the problem and the fix, in one line."""


def cli_entrypoint(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main(argv)``: user errors become one stderr line and exit status 2.

    Anything else is a bug and keeps its traceback. An interrupt exits 130; artifacts are
    staged and only moved into place at the end of a run, so earlier ones survive it.
    A reader that closes stdout early (``| head``) ends the run quietly with 141, no traceback.
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
        except BrokenPipeError:
            # stdout is gone; point it at devnull so the interpreter's final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE

    return wrapper


def warn(message: str) -> None:
    """A warning line on stderr (the run goes on)."""
    print(f"warning: {message}", file=sys.stderr)
