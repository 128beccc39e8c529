"""``p2pml keys``: a node's identity key, and the allowlists that close a run to a set of keys.

``p2pml keys show --key FILE`` makes the key file when it is missing (mode 0600) and prints the
public key in hex and the node ID; ``p2pml keys allow FILE... --out LIST`` writes an allowlist for
``--allow-keys`` from several nodes' key files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from p2pml.cli.args import bad_flag
from p2pml.errors import ConfigError
from p2pml.protocol.identity import NodeKey

__all__ = ["keys_app"]

keys_app = typer.Typer(
    help="Node identity keys and run allowlists (--allow-keys).", no_args_is_help=True
)


def _load(path: Path, flag: str) -> NodeKey:
    try:
        return NodeKey.load_or_create(path)
    except ConfigError as err:
        raise bad_flag(flag, str(path), err.allowed) from None


@keys_app.command()
def show(
    key: Annotated[Path, typer.Option(help="Ed25519 key file (made, mode 0600, if absent).")],
) -> None:
    """Print the public key (hex, as --allow-keys files list it) and the node ID of a key file."""
    node_key = _load(key, "--key")
    typer.echo(f"{node_key.public_key.hex()}  # node {node_key.peer_id.hex()}  {key}")


@keys_app.command()
def allow(
    key_files: Annotated[list[Path], typer.Argument(help="Key files of the run's nodes.")],
    out: Annotated[Path, typer.Option(help="The allowlist to write (for --allow-keys).")],
) -> None:
    """Write an allowlist of the public keys of KEY_FILES (made when absent) to --out."""
    lines = ["# p2pml allowlist: one Ed25519 public key (hex) per line"]
    for path in key_files:
        node_key = _load(path, "KEY_FILES")
        lines.append(f"{node_key.public_key.hex()}  # node {node_key.peer_id.hex()[:16]} {path}")
    try:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, out)
    except OSError as exc:
        raise bad_flag("--out", str(out), f"a writable path ({exc.strerror})") from None
    typer.echo(f"{len(key_files)} keys written to {out}")
