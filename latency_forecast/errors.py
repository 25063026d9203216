"""User-facing errors and the one place that turns them into exit status 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input the user can fix. The message names the problem and the fix, in one line."""


def cli_entrypoint(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main(argv)``: user errors become one stderr line and exit status 2.

    Anything else is a bug and keeps its traceback. An interrupt exits 130; artifacts are
    staged and only moved into place at the end of a run, so earlier ones survive it.
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

    return wrapper
