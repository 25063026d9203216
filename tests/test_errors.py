"""errors.py: a user error is one stderr line and exit status 2, an interrupt 130, SIGTERM 143 (held
until a stop point inside a deferred section), a closed stdout 141; anything else is a bug and
keeps its traceback."""

import os
import signal
import subprocess
import sys

import pytest

from latency_forecast import errors
from latency_forecast.errors import UserError, cli_entrypoint


def test_user_error_is_one_line_and_exit_2(capsys):
    @cli_entrypoint
    def main(argv=None):
        raise UserError("the store is empty; pass --feature-store-path")

    assert main([]) == errors.EXIT_USER_ERROR == 2
    captured = capsys.readouterr()
    assert captured.err == "error: the store is empty; pass --feature-store-path\n" and captured.out == ""


def test_success_passes_the_status_and_the_arguments_through():
    @cli_entrypoint
    def main(argv=None):
        """Docstring kept."""
        return len(argv)

    assert main(["a", "b", "c"]) == 3
    assert main.__doc__ == "Docstring kept." and main.__name__ == "main"


def test_interrupt_exits_130_saying_nothing_changed(capsys):
    @cli_entrypoint
    def main(argv=None):
        raise KeyboardInterrupt

    assert main([]) == errors.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted: no artifact was changed\n"


def test_a_signal_in_a_deferred_section_waits_for_its_stop_point_and_a_second_one_changes_nothing(capsys):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    reached = []

    @cli_entrypoint
    def held_to_the_end(argv=None):
        errors.stop_on_signals("rerun with --resume")
        with errors.deferred_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append(errors.held_signal())
        reached.append("after the section")
        return 0

    assert held_to_the_end([]) == errors.EXIT_TERMINATED == 143
    assert reached == [signal.SIGTERM] and errors.held_signal() == 0
    assert capsys.readouterr().err == "stopped by SIGTERM: no artifact was changed; rerun with --resume\n"

    @cli_entrypoint
    def interrupted_then_terminated(argv=None):
        errors.stop_on_signals("rerun with --resume")
        with errors.deferred_stop():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # one stop delivered twice, as process managers do
            reached.append(errors.held_signal())
            errors.stop(errors.held_signal())  # the stop point
        return 0

    reached.clear()
    assert interrupted_then_terminated([]) == errors.EXIT_INTERRUPTED
    assert reached == [signal.SIGINT]
    assert capsys.readouterr().err == "interrupted: no artifact was changed; rerun with --resume\n"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers, "put back when main returns"


def test_a_bug_keeps_its_traceback():
    @cli_entrypoint
    def main(argv=None):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError, match="a bug"):
        main([])


def test_warn_is_one_stderr_line(capsys):
    errors.warn("3 services are not forecast")
    captured = capsys.readouterr()
    assert captured.err == "warning: 3 services are not forecast\n" and captured.out == ""


def test_closed_stdout_ends_a_script_quietly():
    script = (
        "from latency_forecast.errors import cli_entrypoint\n"
        "@cli_entrypoint\n"
        "def main(argv=None):\n"
        "    for line in range(200_000):\n"
        "        print('line', line)\n"
        "    return 0\n"
        "raise SystemExit(main())\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()  # the reader goes away, as `| head -1` does
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == errors.EXIT_BROKEN_PIPE == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
