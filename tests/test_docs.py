"""The docs: docs/flags.md is current and names every flag; README.md stays a short manual whose links work."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

from tools import flags_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FLAGS = ROOT / "docs" / "flags.md"
README_MAX_BYTES = 16_000


def test_flag_reference_is_not_stale():
    assert flags_reference.is_current(FLAGS), "docs/flags.md is stale: run make docs"


def test_every_root_script_with_a_parser_is_in_the_reference():
    scripts = {path.stem for path in ROOT.glob("*.py") if "def build_parser(" in path.read_text()}
    missing = sorted(scripts - set(flags_reference.SCRIPTS))
    assert not missing, f"add {missing} to tools/flags_reference.py's SCRIPTS, then run make docs"


def _sections(text: str) -> dict[str, str]:
    """Heading line of each '## ' section -> the section's text."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {part.splitlines()[0]: part for part in parts}


@pytest.mark.parametrize("module_name", flags_reference.SCRIPTS)
def test_every_flag_of_every_script_is_in_the_reference(module_name):
    parser = importlib.import_module(module_name).build_parser()
    shown_as = module_name if "." in module_name else f"{module_name}.py"
    sections = [body for heading, body in _sections(FLAGS.read_text()).items() if shown_as in heading]
    assert len(sections) == 1, f"docs/flags.md has {len(sections)} sections for {shown_as}: run make docs"
    rows = [line for line in sections[0].splitlines() if line.startswith("|")]
    problems = []
    for action in parser._actions:
        for option in action.option_strings:
            row = next((line for line in rows if f"`{option}`" in line.split("|")[1]), None)
            if row is None:
                problems.append(f"{option} has no row")
            elif action.choices and not all(f"`{choice}`" in row for choice in action.choices):
                problems.append(f"{option}'s row lacks its choices {list(action.choices)}")
    assert not problems, f"docs/flags.md, {shown_as}: {problems}; run make docs"


def test_readme_is_a_short_manual():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}); move reference text to docs/"


_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def test_readme_relative_links_point_at_files_that_exist():
    text = README.read_text()
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    relative = [t for t in targets if not t.startswith("#") and not _SCHEME.match(t)]
    assert relative, "README.md links no file of the repository (expected docs/flags.md at least)"
    missing = sorted({t for t in relative if not (README.parent / re.split(r"[#?]", t)[0]).exists()})
    assert not missing, f"README.md links files that do not exist: {missing}"
