"""What every `peft-cvae` subcommand shares: the parser pieces, config files, user-error handling and small printing
helpers. Library code does not live here: commands only turn flags into calls of the library."""

import argparse
import dataclasses
import json
import os
import textwrap
from pathlib import Path

from transformers import HfArgumentParser

from ..base_model import load_base_model, model_path
from ..errors import PeftCVAEError
from ..task_data import read_text_file

__all__ = [
    "CLIError",
    "HelpFormatter",
    "add_command",
    "apply_config_file",
    "dataclass_from",
    "existing_path",
    "human_size",
    "load_base_model",
    "model_path",
    "print_table",
    "require",
]

PROG = "peft-cvae"


class CLIError(PeftCVAEError, ValueError):
    """A mistake in what was asked of the command line (bad spec file, conflicting flags, ...)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it is None or False, which say nothing, or the help already names it) and
    keeps the epilog's layout."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if quiet or not action.option_strings or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_command(commands, name: str, dataclass_types=(), **kwargs) -> HfArgumentParser:
    """A subcommand parser whose options are the fields of `dataclass_types` (`transformers.HfArgumentParser`).

    HfArgumentParser gives every field `--field_name` and `--field-name`; the dashed spelling (the one the help and the
    docs use) is listed first. Every command also takes `--config FILE`, a JSON or YAML file of option values.
    """
    if "\n" not in kwargs.get("description", "\n"):  # the raw formatter (for epilogs) keeps lines as given
        kwargs["description"] = textwrap.fill(kwargs["description"], width=88)
    parser = commands.add_parser(name, dataclass_types=list(dataclass_types), formatter_class=HelpFormatter, **kwargs)
    for action in parser._actions:  # -h, today's spellings (aliases such as --output), dashed, then underscored
        action.option_strings.sort(key=lambda option: _option_rank(option, action))
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser copies the help of the True option
            action.help = f"turn --{action.dest.replace('_', '-')} off"
    if dataclass_types:
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="a JSON or YAML file of option values (keys as the options, e.g. batch_size: 16); flags given on "
            "the command line win",
        )
    return parser


def _option_rank(option: str, action: argparse.Action) -> int:
    if not option.startswith("--"):
        return 0
    dest = action.dest
    if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_x/--no-x for a bool that is True
        dest = f"no_{dest}"
    if option not in (f"--{dest}", f"--{dest.replace('_', '-')}"):
        return 1  # an alias: the spelling the command line had before its options came from dataclasses
    return 3 if "_" in option else 2


def require(parser: argparse.ArgumentParser, dest: str) -> None:
    """Make the option stored in `dest` required on the command line (a config file may still set it)."""
    for action in parser._actions:
        if action.dest == dest:
            action.required = True


def dataclass_from(namespace: argparse.Namespace, dataclass_type):
    """An instance of `dataclass_type` from the parsed options of the same names (its __post_init__ checks them)."""
    names = {field.name for field in dataclasses.fields(dataclass_type) if field.init}
    return dataclass_type(**{name: getattr(namespace, name) for name in names if hasattr(namespace, name)})


def _read_config_file(path: Path) -> dict:
    text = read_text_file(existing_path(path, "config file"))
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except (json.JSONDecodeError, ValueError) as error:
        raise CLIError(f"The config file {path} cannot be parsed: {' '.join(str(error).split())}") from error
    if not isinstance(values, dict):
        raise CLIError(f"The config file {path} must hold a mapping of option names to values, e.g. epochs: 50.")
    return values


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make the values of the command's `--config FILE` (JSON or YAML) the defaults of its parser, as trl's
    `TrlParser` does: the command line still overrides them, and an option set in the file is no longer required."""
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    command = next((arg for arg in argv if arg in subparsers.choices), None)
    if command is None:
        return
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    found, _ = config_parser.parse_known_args(argv[argv.index(command) + 1 :])
    if found.config is None:
        return
    path = Path(found.config).expanduser()
    subparser = subparsers.choices[command]
    dests = {}
    for action in subparser._actions:
        if action.dest in ("help", "config"):
            continue
        dests[action.dest] = action
        for option in action.option_strings:
            dests.setdefault(option.lstrip("-").replace("-", "_"), action)
    values = {}
    for key, value in _read_config_file(path).items():
        action = dests.get(str(key).replace("-", "_"))
        if action is None:
            raise CLIError(
                f"The config file {path} sets {key!r}, which is not an option of `{PROG} {command}`. Its options are: "
                f"{', '.join(sorted({a.dest for a in dests.values()}))}."
            )
        values[action.dest] = value
        action.required = False
    subparser.set_defaults(**values)


def existing_path(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CLIError(f"The {what} {path} does not exist. Check the path.")
    return path


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain text table with aligned columns (the first left-aligned, the others right-aligned)."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells):
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths))
        )

    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
