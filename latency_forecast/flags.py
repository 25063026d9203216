"""argparse flags from settings dataclasses: one ``--flag`` per field, with its default, type,
choices and help from the field, and the dataclasses built back from the parsed flags.

The scripts share flags through ``parents=[parent_parser(...)]``, so no flag is declared twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A settings field with its default and help text (and argparse's ``choices`` if given)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag(name: str) -> str:
    """The flag of a field: ``sequence_length`` -> ``--sequence-length``."""
    return "--" + name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def _field_type(config_class: type, name: str) -> Any:
    hint = typing.get_type_hints(config_class)[name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> argparse.ArgumentParser:
    """Add one ``--flag`` per field of ``config_class``, with its default, type, choices and help."""
    group = parser.add_argument_group(config_class.__doc__.strip().rstrip("."))
    for config_field in dataclasses.fields(config_class):
        hint = _field_type(config_class, config_field.name)
        help_text = config_field.metadata["help"]
        name = flag(config_field.name)
        if hint is bool:
            group.add_argument(name, action="store_true", default=config_field.default, help=help_text)
            continue
        kwargs: dict[str, Any] = {"default": config_field.default, "help": help_text + " (default: %(default)s)"}
        if typing.get_origin(hint) is list:
            kwargs["type"] = _comma_list
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = hint
        if "choices" in config_field.metadata:
            kwargs["choices"] = config_field.metadata["choices"]
        group.add_argument(name, **kwargs)
    return parser


def parent_parser(*config_classes: type) -> argparse.ArgumentParser:
    """A parser to pass as ``parents=[...]``: the flags of these config classes, nothing else."""
    parser = argparse.ArgumentParser(add_help=False)
    for config_class in config_classes:
        add_arguments(parser, config_class)
    return parser


def build_parser(prog: str, description: str, parents: Sequence[argparse.ArgumentParser]) -> ArgumentParser:
    return ArgumentParser(
        prog=prog,
        description=description,
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def from_args(namespace: argparse.Namespace, *config_classes: type) -> Any:
    """Build each config class from the parsed flags (validation errors become UserError);
    one class gives its instance, several a tuple in the same order."""
    built = tuple(
        config_class(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_class)})
        for config_class in config_classes
    )
    return built[0] if len(built) == 1 else built
