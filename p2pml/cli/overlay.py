"""``p2pml seed`` runs a bootstrap node; ``p2pml peers`` joins briefly and shows what it sees."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import signal
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from p2pml.cli.args import bad_flag, check_writable
from p2pml.cli.output import console, write_json
from p2pml.core.config import DEFAULT_RPC_TIMEOUT_S, OverlayConfig
from p2pml.core.types import Address
from p2pml.errors import ConfigError, OverlayError, PeerTimeout, ProtocolError
from p2pml.log import setup_logging
from p2pml.protocol.auth import Admission

__all__ = ["parse_bootstrap", "peers", "seed"]

DEFAULT_MAX_CONTACTS_PER_IP = OverlayConfig().max_contacts_per_ip

BootstrapOption = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        envvar="P2PML_BOOTSTRAP",
        help="Seed nodes: host:port[,host:port...] or a seeds .toml file (env P2PML_BOOTSTRAP).",
    ),
]
RunKeyOption = Annotated[
    str | None,
    typer.Option(
        "--run-key",
        envvar="P2PML_RUN_KEY",
        help="Close the run: the shared secret (>= 16 bytes), or @FILE holding it.",
    ),
]
AllowKeysOption = Annotated[
    Path | None,
    typer.Option(
        "--allow-keys",
        envvar="P2PML_ALLOW_KEYS",
        help="Close the run: a file of allowed public keys (hex, one per line).",
    ),
]
MaxPerIpOption = Annotated[
    int,
    typer.Option(
        "--max-contacts-per-ip",
        envvar="P2PML_MAX_CONTACTS_PER_IP",
        help="Contacts from one IP address in the routing table (this host's own IP exempt).",
    ),
]


def parse_listen(text: str, flag: str = "--listen") -> Address:
    """An IP literal and a port (0 = any free port) to bind to."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise bad_flag(flag, text, "IP:port or [IPv6]:port, port 0-65535 (0 = any)") from None
    if not 0 <= number <= 65535:
        raise bad_flag(flag, text, "IP:port or [IPv6]:port, port 0-65535 (0 = any)")
    return Address(host, number)


def _address(text: str, flag: str) -> Address:
    try:
        return Address.parse(text, field=flag)
    except ConfigError as err:
        raise bad_flag(flag, text, err.allowed) from None


def parse_bootstrap(text: str | None, flag: str = "--bootstrap") -> list[Address]:
    """``host:port,host:port`` or a TOML file with ``seeds = ["host:port", ...]``."""
    if not text:
        return []
    if text.endswith(".toml"):
        try:
            entries = tomllib.loads(Path(text).read_text()).get("seeds")
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise bad_flag(flag, text, f"a readable seeds TOML file ({err})") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise bad_flag(flag, text, 'a TOML file with seeds = ["host:port", ...]')
        if not entries:
            raise bad_flag(flag, text, "a seeds file that lists at least one seed")
        return [_address(e, f"{flag} ({text})") for e in entries]
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise bad_flag(flag, text, "host:port[,host:port...] with no empty items")
    return [_address(item, flag) for item in items]


def _config(
    listen: str,
    advertise: str | None,
    rpc_timeout: float,
    max_contacts_per_ip: int = DEFAULT_MAX_CONTACTS_PER_IP,
) -> OverlayConfig:
    flags = {"rpc_timeout_s": "--rpc-timeout", "max_contacts_per_ip": "--max-contacts-per-ip"}
    try:
        return OverlayConfig(
            listen=parse_listen(listen),
            advertise=_address(advertise, "--advertise") if advertise else None,
            rpc_timeout_s=rpc_timeout,
            max_contacts_per_ip=max_contacts_per_ip,
        ).validate()
    except ConfigError as err:
        raise bad_flag(flags.get(err.field, err.field), err.value, err.allowed) from None


def _admission(run_key: str | None, allow_keys: Path | None) -> Admission:
    try:
        return Admission.load(run_key=run_key, allow_keys=allow_keys)
    except ConfigError as err:
        raise bad_flag(err.field, err.value, err.allowed) from None


def seed(
    listen: Annotated[
        str, typer.Option("--listen", help="UDP address to bind.")
    ] = "127.0.0.1:4000",
    key: Annotated[
        Path, typer.Option("--key", help="Ed25519 key file (made, mode 0600, if absent).")
    ] = Path("seed.key"),
    advertise: Annotated[
        str | None,
        typer.Option("--advertise", help="host:port others should use (NAT, containers)."),
    ] = None,
    bootstrap: BootstrapOption = None,
    contacts: Annotated[
        Path | None, typer.Option("--contacts", help="Save and reload known contacts (JSON).")
    ] = None,
    rpc_timeout: Annotated[
        float, typer.Option("--rpc-timeout", help="RPC timeout, s.")
    ] = DEFAULT_RPC_TIMEOUT_S,
    run_key: RunKeyOption = None,
    allow_keys: AllowKeysOption = None,
    max_contacts_per_ip: MaxPerIpOption = DEFAULT_MAX_CONTACTS_PER_IP,
) -> None:
    """Run a long-lived seed node: DHT only, no training. Stop with Ctrl-C or SIGTERM.

    A seed of a closed run takes the run's --run-key and/or --allow-keys (with an allowlist, the
    seed's own key must be on it, or the run's nodes will not admit it).
    """
    from p2pml.node.seed import run_seed  # the DHT stack loads only for the commands using it
    from p2pml.protocol.identity import NodeKey

    config = _config(listen, advertise, rpc_timeout, max_contacts_per_ip)
    admission = _admission(run_key, allow_keys)
    seeds = parse_bootstrap(bootstrap)
    check_writable(contacts, "--contacts")
    node_key = NodeKey.load_or_create(key)
    setup_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready: asyncio.Future[str] = loop.create_future()
        ready.add_done_callback(
            lambda f: print(f"seed {node_key.peer_id.hex()} contact {f.result()}", flush=True)
        )
        await run_seed(
            config,
            node_key,
            bootstrap=seeds,
            contacts_path=contacts,
            stop=stop,
            on_ready=ready,
            admission=admission,
        )

    try:
        asyncio.run(main())
    except ConfigError as err:
        if err.field != "listen":
            raise
        raise bad_flag("--listen", listen, err.allowed) from None


async def _look(
    config: OverlayConfig, seeds: list[Address], n_sample: int, admission: Admission
) -> dict[str, object]:
    from p2pml.io.overlay import KademliaOverlay
    from p2pml.protocol.identity import NodeKey

    config = dataclasses.replace(config, refresh_after_join=False)  # it refreshes by itself below
    async with KademliaOverlay(config, NodeKey.generate(), admission=admission) as overlay:
        await overlay.bootstrap(seeds)
        estimate = await overlay.membership.estimate_now()
        assert estimate is not None, "estimate_now sets an estimate"
        if not estimate.is_exact:
            await overlay.membership.fill_pool(n_sample)
        rows: list[dict[str, object]] = []
        for contact in overlay.sample_peers(n_sample):
            started = time.perf_counter()
            try:
                record = await overlay.info(contact)
            except (PeerTimeout, ProtocolError) as err:
                rows.append(
                    {"id": contact.peer_id.hex(), "addr": str(contact.addr), "error": str(err)}
                )
                continue
            rows.append(
                {
                    "id": contact.peer_id.hex(),
                    "addr": str(contact.addr),
                    "role": record.role,
                    "step": int(record.step),
                    "http": str(record.http) if record.http else None,
                    "rtt_s": time.perf_counter() - started,
                }
            )
        return {
            "self": overlay.peer_id.hex(),
            "contacts": len(overlay.contacts()),
            "n_hat": estimate.n_hat,
            "n_lookups": estimate.n_lookups,
            "rel_error": estimate.rel_error,
            "exact": estimate.is_exact,
            "lookup_median_s": statistics.median(overlay.lookup_durations),
            "sample": rows,
        }


def peers(
    bootstrap: BootstrapOption = None,
    listen: Annotated[str, typer.Option("--listen", help="UDP address to bind.")] = "127.0.0.1:0",
    sample: Annotated[int, typer.Option("--sample", help="Peers to draw and ping.")] = 5,
    rpc_timeout: Annotated[
        float, typer.Option("--rpc-timeout", help="RPC timeout, s.")
    ] = DEFAULT_RPC_TIMEOUT_S,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON.")
    ] = None,
    run_key: RunKeyOption = None,
    allow_keys: AllowKeysOption = None,
    max_contacts_per_ip: MaxPerIpOption = DEFAULT_MAX_CONTACTS_PER_IP,
) -> None:
    """Join the DHT briefly and print what a node sees: contacts, N^, a sample, round trips.

    With a closed run's --run-key/--allow-keys it counts and samples only the run's members.
    """
    seeds = parse_bootstrap(bootstrap)
    if not seeds:
        raise bad_flag("--bootstrap", bootstrap, "at least one seed host:port (or P2PML_BOOTSTRAP)")
    if not 1 <= sample <= 1000:
        raise bad_flag("--sample", sample, "a whole number in 1-1000")
    config = _config(listen, None, rpc_timeout, max_contacts_per_ip)
    admission = _admission(run_key, allow_keys)
    check_writable(json_path, "--json")
    setup_logging(logging.WARNING)
    try:
        result = asyncio.run(_look(config, seeds, sample, admission))
    except ConfigError as err:
        if err.field != "listen":
            raise
        raise bad_flag("--listen", listen, err.allowed) from None
    except OverlayError as err:
        print(f"p2pml peers: error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    exact = (
        "exact count"
        if result["exact"]
        else (f"± {float(str(result['rel_error'])):.1%} from {result['n_lookups']} lookups")
    )
    console.print(f"contacts in the routing table: {result['contacts']}")
    console.print(f"population estimate N^ = {float(str(result['n_hat'])):.1f} ({exact})")
    table = Table(title="a uniform sample of peers")
    for name in ("id", "address", "role", "step", "http", "rtt ms"):
        table.add_column(name)
    rows = result["sample"]
    assert isinstance(rows, list)
    for row in rows:
        rtt = f"{row['rtt_s'] * 1e3:.2f}" if "rtt_s" in row else row.get("error", "")
        table.add_row(
            row["id"][:16],
            row["addr"],
            row.get("role", "-"),
            str(row.get("step", "-")),
            str(row.get("http") or "-"),
            rtt,
        )
    console.print(table)
    if json_path is not None:
        write_json(json_path, json.loads(json.dumps(result)))
