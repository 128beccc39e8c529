"""Options of a command from environment variables and a TOML file, and ``--print-config``.

Every option of a configured command (``p2pml run``) can be given three more ways than as a flag.
The first source that has a value wins: the flag, then the environment, then the ``--config``
file, then the built-in default.

- **Environment.** ``P2PML_`` and the option's name upper-cased, dashes as underscores:
  ``--barrier`` is ``P2PML_BARRIER``, ``--http-listen`` is ``P2PML_HTTP_LISTEN``, ``--log`` is
  ``P2PML_LOG``. An empty variable counts as unset. ``--config`` itself is ``P2PML_CONFIG``;
  ``--print-config`` has no variable, so that no environment can stop a node from starting.
- **File.** ``--config FILE`` reads TOML. Keys are option names without the leading dashes,
  with dashes or underscores (``http-listen`` or ``http_listen``). They sit in a table named
  after the command (``[run]``), or at the top level, where they apply to any
  command reading the file; the command's table overrides the top level, and tables of the other
  commands are skipped, so one file can serve both. Values have the option's type: a string, an
  integer (also accepted for string options: ``sample = 10``), a number (integer or float), a
  boolean for on/off flags, a string for paths. ``config`` and ``print-config`` are not allowed
  in a file. A missing, unreadable or malformed file, an unknown key or a value of the wrong type
  ends the command with one line naming the file (and, for TOML syntax, the line and column).
- **Print.** ``--print-config`` prints every option with its resolved value and, as a comment,
  where the value came from (flag, env, file or default), as TOML that ``--config`` reads back;
  then the command exits 0 without starting anything.

Values from the environment and the file reach the command exactly as flags do, so they are
checked by the same code; an error about one says where it came from (``main`` in
``p2pml/cli/__init__.py`` appends `describe_origin`).

Making another command configurable takes three steps:

1. register it with ``app.command(cls=ConfigCommand)(func)`` (every option without its own
   ``envvar`` gets ``P2PML_<OPTION>``);
2. give `func` the parameters ``ctx: typer.Context``, ``config_file: ConfigOption = None`` and
   ``print_config: PrintConfigOption = False`` (any names; the flags are fixed);
3. once the values are checked, and before anything starts, call ``show_config(ctx)`` and
   return when `print_config` is set. A file's keys for the command go in a table named after
   it; add the name to `COMMAND_TABLES` so that other commands skip that table.
"""

from __future__ import annotations

import difflib
import inspect
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from typer.core import TyperCommand, TyperOption

__all__ = [
    "COMMAND_TABLES",
    "ENV_PREFIX",
    "ConfigCommand",
    "ConfigOption",
    "PrintConfigOption",
    "add_env_vars",
    "describe_origin",
    "env_var",
    "read_config",
    "render_config",
    "show_config",
]

ENV_PREFIX = "P2PML_"
COMMAND_TABLES = ("run",)  # tables of a config file; each is read by its command only
_META_FLAGS = ("--config", "--print-config")  # options about the configuration itself
_PATH_KEY = "p2pml.config.path"  # ctx.meta: the file that filled ctx.default_map
_SOURCES = {"COMMANDLINE": "flag", "ENVIRONMENT": "env", "DEFAULT_MAP": "file"}
# What a TOML value may be for an option annotated with each type (bool is never a number).
_ACCEPTS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "a boolean (true or false)"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str, int), "a string"),
    Path: ((str,), "a path as a string"),
}
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


def env_var(flag: str) -> str:
    """The environment variable of an option: ``--http-listen`` -> ``P2PML_HTTP_LISTEN``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _options(command: TyperCommand) -> Iterator[TyperOption]:
    for param in command.params:
        if isinstance(param, TyperOption) and param.opts:
            yield param


def add_env_vars(command: TyperCommand) -> None:
    """Give every option of `command` that has no environment variable its ``P2PML_<OPTION>``
    (not ``--print-config``); an option declared with its own ``envvar`` keeps it."""
    for option in _options(command):
        if option.envvar is None and option.opts[0] != "--print-config":
            option.envvar = env_var(option.opts[0])


class ConfigCommand(TyperCommand):
    """A typer command whose options also come from ``P2PML_*`` variables and ``--config``.

    Use as ``app.command(cls=ConfigCommand)(func)``; see the module docstring.
    """

    def __init__(self, name: str | None, **settings: Any) -> None:  # typer's own settings
        super().__init__(name, **settings)
        add_env_vars(self)


def _key(option: TyperOption) -> str:
    return option.opts[0].lstrip("-")


def _file_error(path: Path, problem: str) -> typer.BadParameter:
    return typer.BadParameter(f"{path}: {problem}", param_hint="'--config'")


def _read_toml(path: Path) -> dict[str, object]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise _file_error(path, "no such file") from None
    except IsADirectoryError:
        raise _file_error(path, "a folder, not a TOML file") from None
    except OSError as err:
        raise _file_error(path, f"cannot read it ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise _file_error(path, f"not UTF-8 text (byte {err.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        reason = " ".join(str(err).split())  # one line, whatever the Python version
        raise _file_error(path, f"not valid TOML: {reason}") from None


def _expected_types(command: TyperCommand) -> dict[str, type]:
    """Parameter name -> the type of its value (``int`` for ``int | None``), from the signature
    of the command's function; typer resolves the same hints to build the command."""
    if command.callback is None:
        return {}
    hints = typing.get_type_hints(inspect.unwrap(command.callback))
    found: dict[str, type] = {}
    for name, hint in hints.items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next((arg for arg in typing.get_args(hint) if arg is not type(None)), str)
        if isinstance(hint, type):
            found[name] = hint
    return found


def _check_value(path: Path, where: str, value: object, kind: type | None) -> object:
    allowed, expected = _ACCEPTS.get(kind or str, _ACCEPTS[str])
    if isinstance(value, allowed) and (kind is bool or not isinstance(value, bool)):
        return str(value) if kind is str else value
    got = _TOML_TYPES.get(type(value)) or (
        "a table"
        if isinstance(value, dict)
        else "an array"
        if isinstance(value, list)
        else "a date"
    )
    shown = got if isinstance(value, list | dict) else f"{_toml_value(value)} ({got})"
    raise _file_error(path, f"{where}: got {shown}; expected {expected}")


def _table_values(
    path: Path, table: Mapping[str, object], name: str, command: TyperCommand
) -> dict[str, object]:
    """Check one table of the file against `command`'s options: parameter name -> value."""
    options = {_key(o): o for o in _options(command) if o.opts[0] not in _META_FLAGS}
    kinds = _expected_types(command)
    values: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for raw, value in table.items():
        key = raw.replace("_", "-")
        option = options.get(key)
        if option is None or option.name is None:
            raise _file_error(path, _unknown(raw, value, name, list(options)))
        if key in spelled:
            raise _file_error(path, f"{key!r} given twice {name} ({spelled[key]!r}, {raw!r})")
        spelled[key] = raw
        where = f"key {raw!r} {name}"
        values[option.name] = _check_value(path, where, value, kinds.get(option.name))
    return values


def _unknown(raw: str, value: object, name: str, keys: list[str]) -> str:
    if isinstance(value, dict):
        tables = ", ".join(f"[{t}]" for t in COMMAND_TABLES)
        return f"unknown table [{raw}] {name} (command tables: {tables})"
    key = raw.replace("_", "-")
    if f"--{key}" in _META_FLAGS:
        return f"{raw!r} {name}: --{key} cannot be set from a config file"
    near = difflib.get_close_matches(key, keys, n=1)
    return f"unknown key {raw!r} {name}" + (f" (did you mean {near[0]!r}?)" if near else "")


def read_config(path: Path, command: TyperCommand) -> dict[str, object]:
    """The option values a config file holds for `command`, by parameter name.

    Raises:
        typer.BadParameter: about ``--config``, naming the file, when it is missing,
            unreadable or malformed, or has an unknown key or a value of the wrong type.
    """
    document = _read_toml(path)
    own = command.name or ""
    top = {k: v for k, v in document.items() if not (k in COMMAND_TABLES and isinstance(v, dict))}
    values = _table_values(path, top, "at the top level", command)
    table = document.get(own, {})
    if isinstance(table, dict):
        values.update(_table_values(path, table, f"in [{own}]", command))
    return values


def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is None or ctx.resilient_parsing or not isinstance(ctx.command, TyperCommand):
        return value
    ctx.default_map = {**(ctx.default_map or {}), **read_config(value, ctx.command)}
    ctx.meta[_PATH_KEY] = value
    return value


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar=env_var("--config"),
        is_eager=True,
        callback=_load_config,
        help=(
            "TOML file of options: keys are option names without dashes, in a table named "
            "after the command (run) or at the top level. "
            "Precedence: flag > env P2PML_<OPTION> > file > default."
        ),
    ),
]
PrintConfigOption = Annotated[
    bool,
    typer.Option(
        "--print-config",
        help="Print the resolved options and their sources as TOML for --config, and exit.",
    ),
]


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) < 0xE000:
            out.append(f"\\u{ord(char) if ord(char) < 0xD800 else 0xFFFD:04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf and nan are spelled alike in TOML
    return _toml_string(str(value))


def _source(ctx: typer.Context, option: TyperOption) -> str:
    assert option.name is not None  # options always have a name
    source = ctx.get_parameter_source(option.name)
    label = _SOURCES.get(source.name if source is not None else "", "default")
    if label == "env" and isinstance(option.envvar, str):
        return f"env {option.envvar}"
    return label


_SECRET_OPTIONS: Final = frozenset({"run_key"})
"""Options whose value is a secret: `render_config` says they are set, never what they are."""


def render_config(ctx: typer.Context) -> str:
    """The resolved options of `ctx`'s command as TOML, each with its source as a comment."""
    command = ctx.command
    name = command.name or ""
    lines = [
        f"# p2pml {name}: resolved options (flag > env P2PML_* > --config file > default).",
        f"# Read back with: p2pml {name} --config FILE",
    ]
    if _PATH_KEY in ctx.meta:
        lines.append(f"# config file: {ctx.meta[_PATH_KEY]}")
    lines.append(f"[{name}]")
    if isinstance(command, TyperCommand):
        for option in _options(command):
            if option.opts[0] in _META_FLAGS or option.name is None:
                continue
            value = ctx.params.get(option.name)
            if value is None:
                lines.append(f"# {_key(option)}: not set ({_source(ctx, option)})")
            elif option.name in _SECRET_OPTIONS and not str(value).startswith("@"):
                lines.append(f"# {_key(option)}: set, not shown ({_source(ctx, option)})")
            else:
                lines.append(f"{_key(option)} = {_toml_value(value)}  # {_source(ctx, option)}")
    return "\n".join(lines) + "\n"


def show_config(ctx: typer.Context) -> None:
    """Print `render_config` to stdout (``--print-config``)."""
    typer.echo(render_config(ctx), nl=False)


def describe_origin(err: Exception) -> str:
    """`` (from P2PML_X)`` or `` (from config file F)`` when the option a usage error is about
    got its value from the environment or a config file; else empty."""
    ctx = getattr(err, "ctx", None)
    command = getattr(ctx, "command", None)
    if ctx is None or not isinstance(command, TyperCommand):
        return ""
    param = getattr(err, "param", None)
    hint = getattr(err, "param_hint", None)
    if isinstance(hint, str):  # errors raised by a command's own checks name their flag
        flag = hint.strip("'\"")
        param = next((o for o in _options(command) if flag in o.opts), None)
    if not isinstance(param, TyperOption):
        return ""
    label = _source(ctx, param)
    if label.startswith("env "):
        message = getattr(err, "format_message", lambda: "")()
        return "" if label[4:] in str(message) else f" (from {label[4:]})"
    if label == "file" and _PATH_KEY in ctx.meta:
        return f" (from config file {ctx.meta[_PATH_KEY]})"
    return ""
