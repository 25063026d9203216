"""The README is the user's manual: every flag a script accepts must be documented there."""

import pathlib
import re

import pytest

import analyze_causality
import backtest
import train

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("script", [train, backtest, analyze_causality])
def test_every_flag_is_in_the_readme(script):
    flags = {option for action in script.build_parser()._actions for option in action.option_strings if option.startswith("--")}
    missing = sorted(flag for flag in flags - {"--help"} if not re.search(rf"`{re.escape(flag)}`", README))
    assert not missing, f"README does not document {missing}"
