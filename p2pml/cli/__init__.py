"""The ``p2pml`` command: a typer app with one module per command group.

Errors in what a user typed end the command with one line on stderr that names the flag, and exit
status 2; no traceback. When the value came from an environment variable or a config file
(`p2pml.cli.config`), the line says which.
"""

from __future__ import annotations

import sys

import typer

from p2pml import __version__
from p2pml.cli.args import UsageError
from p2pml.cli.bench import bench_app
from p2pml.cli.bounds import bounds
from p2pml.cli.config import ConfigCommand, describe_origin
from p2pml.cli.keys import keys_app
from p2pml.cli.local import local
from p2pml.cli.overlay import peers, seed
from p2pml.cli.plot import plot
from p2pml.cli.run import run
from p2pml.cli.simulate import simulate
from p2pml.errors import ConfigError

__all__ = ["app", "main"]


app = typer.Typer(
    name="p2pml",
    help="Decentralised machine-learning training with probabilistic barriers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(simulate)
app.command()(bounds)
app.command()(seed)
app.command()(peers)
app.command(cls=ConfigCommand)(run)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(local)
app.command()(plot)
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"p2pml {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Decentralised machine-learning training with probabilistic barriers."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status instead of raising SystemExit for usage errors."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="p2pml", standalone_mode=False)
    except typer.Exit as done:
        return int(done.exit_code)
    except UsageError as err:
        ctx = getattr(err, "ctx", None)
        name = ctx.command_path if ctx is not None else "p2pml"
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if message:  # empty when the help was shown because no arguments were given
            print(f"{name}: error: {message}{describe_origin(err)}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"p2pml: error: {err}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("p2pml: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
