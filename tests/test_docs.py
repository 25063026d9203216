"""The docs: docs/flags.md is current and names every flag; the links of README.md and docs/ lead
somewhere; the commands they show run scripts that exist, with flags those scripts have;
docs/design.md's layout names the package's modules."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest

from tools import flags_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FLAGS = ROOT / "docs" / "flags.md"
DESIGN = ROOT / "docs" / "design.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


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


# ---- Markdown, read just well enough: fences, headings, links, commands -------------------------

_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}


def _blocks(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each fenced block as (language, lines)."""
    prose, blocks, fence, language, body = [], [], None, "", []
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence, language, body = match.group(1), match.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((language, body))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    return prose, blocks


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation but - and _ dropped."""
    text = _INLINE_LINK.sub(lambda m: m.group(0)[1 : m.group(0).index("](")], heading)
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    prose, _ = _blocks(path.read_text(encoding="utf-8"))
    anchors, seen = set(), {}
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: pathlib.Path) -> list[str]:
    prose, _ = _blocks(path.read_text(encoding="utf-8"))
    links = []
    for line in prose:
        line = _INLINE_CODE.sub("", line)
        links += _INLINE_LINK.findall(line)
        reference = _REFERENCE_LINK.match(line)
        if reference:
            links.append(reference.group(1))
    return links


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings_that_exist(doc):
    problems = []
    for link in _links(doc):
        if _SCHEME.match(link) or link.startswith("/"):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target.split("?")[0]).resolve() if target else doc
        if not path.exists():
            problems.append(f"{link}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"{link}: {path.name} has no heading with the anchor #{anchor}")
    assert not problems, f"{doc.relative_to(ROOT)} links to nothing: {problems}"


def test_the_readme_links_the_reference_docs():
    links = {link.partition("#")[0] for link in _links(README)}
    assert {"docs/flags.md", "docs/contract.md", "docs/results.md"} <= links


def _shell_commands(doc: pathlib.Path) -> list[str]:
    """Commands of the shell code blocks (continuation lines joined, comments dropped, split at
    && ; ||), and inline code that starts like a command (`python ...`, `make ...`)."""
    text = doc.read_text(encoding="utf-8")
    prose, blocks = _blocks(text)
    commands = []
    for language, body in blocks:
        if language not in _SHELL_LANGUAGES:
            continue
        joined = re.sub(r"\\\n\s*", " ", "\n".join(body))
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [part.strip() for part in re.split(r"&&|;|\|\|", line) if part.strip()]
    for line in prose:
        for _, code in _INLINE_CODE.findall(line):
            if re.match(r"(python3?|torchrun|make) ", code.strip()):
                commands.append(code.strip())
    return commands


_ENTRY_POINT = re.compile(r"^(?:[\w./-]*/)?(?:python3?|torchrun)$")


def _words(command: str) -> list[str]:
    """The command's words, with the brackets around optional arguments dropped."""
    command = command.replace("[", " ").replace("]", " ")
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in prose that looked like a command
        return command.split()


def _invocation(command: str) -> tuple[str, str, list[str]] | None:
    """(how it is named, module name, arguments) of a command that runs a Python entry point."""
    words = _words(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words or not _ENTRY_POINT.match(words[0]):
        return None
    for index, word in enumerate(words[1:], start=1):
        if word == "-m" and index + 1 < len(words):
            module = words[index + 1]
            return f"python -m {module}", module, words[index + 2 :]
        if word.endswith(".py"):
            return word, word[: -len(".py")].replace("/", "."), words[index + 1 :]
    return None


def _module_file(module: str) -> pathlib.Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.exists():
            return candidate
    return None


def _is_ours(module: str) -> bool:
    top = module.split(".")[0]
    return (ROOT / f"{top}.py").exists() or (ROOT / top / "__init__.py").exists() or module in flags_reference.SCRIPTS


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_commands_shown_run_scripts_that_exist_with_flags_they_have(doc):
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    problems = []
    for command in _shell_commands(doc):
        words = _words(command)
        if words[:1] == ["make"]:
            problems += [f"{command}: no make target {word}" for word in words[1:] if "=" not in word and word not in targets]
            continue
        invocation = _invocation(command)
        if invocation is None:
            continue
        shown, module, arguments = invocation
        if not _is_ours(module) and not shown.endswith(".py"):
            continue  # python -m venv, pip: not this repository's
        path = _module_file(module)
        if path is None:
            problems.append(f"{command}: {shown} does not exist")
            continue
        if "def build_parser(" not in path.read_text(encoding="utf-8"):
            continue
        parser = flags_reference.parser_of(module)
        known = {option for action in parser._actions for option in action.option_strings}
        problems += [
            f"{command}: {shown} has no flag {word.split('=')[0]}"
            for word in arguments
            if word.startswith("--") and word.split("=")[0] not in known
        ]
    assert not problems, f"{doc.relative_to(ROOT)} shows commands that would fail: {problems}"


def test_readme_shows_each_script_it_documents():
    shown = {invocation[1] for command in _shell_commands(README) if (invocation := _invocation(command))}
    assert {"train", "backtest", "analyze_causality", "forecast"} <= shown


def test_design_layout_names_every_module_of_the_package():
    _, blocks = _blocks(DESIGN.read_text(encoding="utf-8"))
    layout = next(body for _, body in blocks if any(line.startswith("latency_forecast/") for line in body))
    listed = {match.group(1) for line in layout if (match := re.match(r"^\s+(\w+\.py)\s", line))}
    modules = {path.name for path in (ROOT / "latency_forecast").glob("*.py") if path.name != "__init__.py"}
    assert not modules - listed, f"docs/design.md's layout lacks {sorted(modules - listed)}"
    assert not listed - modules, f"docs/design.md's layout names modules that do not exist: {sorted(listed - modules)}"


_HISTORY = re.compile(
    r"\bissues?[\s-]*#?\d+|(?<![\w&/])#\d+\b|\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|earlier|previous|this|last)"
    r" session\b|\b(?:old|previous) default\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_docs_describe_the_toolkit_not_its_history(doc):
    found = [f"{number}: {match.group(0)!r}" for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
             for match in _HISTORY.finditer(line)]
    assert not found, f"{doc.relative_to(ROOT)} cites issues or narrates how it was made (say what is, and why): {found}"
