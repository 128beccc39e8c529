"""``p2pml run``: one node that trains a built-in model with its run's other nodes: a peer (the
default), or the parameter server (``--role server``) or one of its workers (``--role worker
--server HOST:PORT``) of the centralised mode.

Every step of a peer or worker writes one JSON line (to stdout, or to ``--log FILE``): ``step``,
``loss``, ``accuracy`` (when evaluated), ``wait_s``, ``n_hat``, ``deltas_sent``,
``deltas_received``, ``deltas_rejected`` and a few more. The server writes one line per model
update: ``version``, ``step``, ``workers``, ``staleness`` (per delta), ``weight``, ``n_workers``,
``accuracy``, ``time_s``. Progress and the final summary go to stderr.

Every option can also come from an environment variable (``P2PML_BARRIER`` for ``--barrier``) or
a TOML file (``--config``), and ``--print-config`` shows the result; see `p2pml.cli.config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from p2pml.cli.args import bad_flag, check_writable, parse_shard
from p2pml.cli.config import ConfigOption, PrintConfigOption, show_config
from p2pml.cli.overlay import BootstrapOption, _address, parse_bootstrap, parse_listen
from p2pml.core.barrier import get_policy
from p2pml.core.config import DEFAULT_RPC_TIMEOUT_S, DataPlaneConfig, OverlayConfig
from p2pml.core.faults import FaultPlan
from p2pml.core.run import NodeConfig, RunManifest, TensorSpec
from p2pml.core.sampling import SampleSize
from p2pml.core.types import Address
from p2pml.errors import BarrierTimeout, ConfigError, OverlayError, P2PMLError
from p2pml.log import setup_logging
from p2pml.protocol.aggregate import RULES, AggregationConfig
from p2pml.protocol.auth import Admission

if TYPE_CHECKING:
    from p2pml.node.server import ParameterServer, UpdateLog
    from p2pml.train.loop import StepLog
    from p2pml.train.session import Session

__all__ = ["run"]

log = logging.getLogger("p2pml.run")

_FLAGS = {
    "sample": "--sample",
    "staleness": "--staleness",
    "barrier": "--barrier",
    "min_peers": "--min-peers",
    "full_delivery_max": "--full-delivery-max",
    "fanout": "--fanout",
    "average_every": "--average-every",
    "max_delta_age": "--max-delta-age",
    "join_timeout_s": "--join-timeout",
    "rpc_timeout_s": "--rpc-timeout",
    "refresh_interval_s": "--refresh-interval",
    "max_contacts_per_ip": "--max-contacts-per-ip",
    "heartbeat_timeout_s": "--heartbeat-timeout",
    "heartbeat_interval_s": "--heartbeat-timeout",
    "server_timeout_s": "--server-timeout",
    "checkpoint_every": "--checkpoint-every",
}
ROLES = ("peer", "server", "worker")
_REFRESH_INTERVAL_S = OverlayConfig().refresh_interval_s


def _node_config(
    *,
    role: str,
    listen: str,
    http_listen: str | None,
    advertise: str | None,
    bootstrap: list[Address],
    rpc_timeout: float,
    max_contacts_per_ip: int,
    refresh_interval: float = _REFRESH_INTERVAL_S,
    **fields: object,
) -> NodeConfig:
    udp = parse_listen(listen)
    if http_listen:
        http = parse_listen(http_listen, "--http-listen")
    elif role == "server":  # no DHT: --listen is where workers reach the server
        http = udp
    else:
        http = Address(udp.host, 0)
    try:
        overlay = OverlayConfig(
            listen=udp,
            advertise=_address(advertise, "--advertise") if advertise else None,
            rpc_timeout_s=rpc_timeout,
            max_contacts_per_ip=max_contacts_per_ip,
            refresh_interval_s=refresh_interval,
        )
        return NodeConfig(
            overlay=overlay,
            data=DataPlaneConfig(listen=http),
            bootstrap=tuple(bootstrap),
            **fields,  # type: ignore[arg-type]
        ).validate()
    except ConfigError as err:
        raise bad_flag(_FLAGS.get(err.field, err.field), err.value, err.allowed) from None


def _fault_plan(path: Path | None) -> FaultPlan | None:
    """The plan of ``--faults``, read and checked now (the node re-reads it as it changes)."""
    if path is None:
        return None
    from p2pml.io.faults import read_plan  # aiohttp and kademlia load only with the flag

    try:
        return read_plan(path)
    except ConfigError as err:
        where = "" if err.field == "faults" else f" ({err.field})"
        raise bad_flag("--faults", err.value, err.allowed + where) from None


def _aggregation(
    name: str, trim: float, radius: float | None, norm_factor: float | None
) -> AggregationConfig:
    """The checked ``--aggregate``, ``--trim``, ``--clip-radius`` and ``--norm-filter``."""
    flags = {
        "aggregation": "--aggregate",
        "trim": "--trim",
        "radius": "--clip-radius",
        "norm_factor": "--norm-filter",
    }
    if name.lower() not in RULES:
        raise bad_flag("--aggregate", name, "one of " + ", ".join(RULES))
    try:
        return AggregationConfig.build(
            name.lower(), trim=trim, radius=radius, norm_factor=norm_factor
        )
    except ConfigError as err:
        raise bad_flag(flags.get(err.field, err.field), err.value, err.allowed) from None


def _open_log(path: str) -> IO[str]:
    if path == "-":
        return sys.stdout
    target = Path(path)
    check_writable(target, "--log")
    return target.open("a", encoding="utf-8", buffering=1)


def run(
    ctx: typer.Context,
    bootstrap: BootstrapOption = None,
    listen: Annotated[str, typer.Option(help="UDP address of the DHT.")] = "127.0.0.1:0",
    http_listen: Annotated[
        str | None,
        typer.Option(help="HTTP data-plane address (default: --listen's host, any port)."),
    ] = None,
    advertise: Annotated[
        str | None, typer.Option(help="host:port others should use for the DHT (NAT, containers).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="Ed25519 key file (made if absent); default: a new key.")
    ] = None,
    run_key: Annotated[
        str | None,
        typer.Option(
            help="Close the run to holders of this shared secret (>= 16 bytes), or @FILE for a "
            "file holding it; P2PML_RUN_KEY keeps it out of the process list."
        ),
    ] = None,
    allow_keys: Annotated[
        Path | None,
        typer.Option(
            help="Close the run to these public keys: a file of hex keys, one per line "
            "(p2pml keys show prints a node's)."
        ),
    ] = None,
    run_id: Annotated[
        str, typer.Option(help="The run to join: nodes of other runs are refused.")
    ] = "p2pml",
    barrier: Annotated[str, typer.Option(help="bsp, ssp, asp, pbsp or pssp.")] = "pssp",
    sample: Annotated[
        str, typer.Option(help="Beta: peers per check (10) or a share of N^ (5%).")
    ] = "10",
    staleness: Annotated[
        int, typer.Option(help="s, in steps (ssp, pssp; also the delta age limit).")
    ] = 4,
    model: Annotated[str, typer.Option(help="mlp or cnn.")] = "mlp",
    dataset: Annotated[str, typer.Option(help="mnist, mnist-5k, digits or iris.")] = "mnist-5k",
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of the MNIST IDX files (for --dataset mnist).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Steps to train.")] = 500,
    time_budget: Annotated[
        float,
        typer.Option(help="Stop training after this many seconds even short of --steps (0: none)."),
    ] = 0.0,
    lr: Annotated[float, typer.Option(help="Learning rate (SGD).")] = 0.05,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    batch_size: Annotated[int, typer.Option(help="Examples per step and node.")] = 64,
    slow: Annotated[
        float, typer.Option(help="Extra seconds per step (straggler experiments).")
    ] = 0.0,
    eval_every: Annotated[
        int, typer.Option(help="Evaluate every N steps (and at the end); 0: end only.")
    ] = 50,
    shard: Annotated[str, typer.Option(help="auto, or INDEX/COUNT for a disjoint shard.")] = "auto",
    seed: Annotated[int, typer.Option(help="Model initialisation and shard seed (the run's).")] = 0,
    aggregate: Annotated[
        str,
        typer.Option(
            help="How a peer combines the deltas of one step it receives (a server: of a BSP "
            "round): mean, or the robust median, trimmed_mean or centered_clip."
        ),
    ] = "mean",
    trim: Annotated[
        float, typer.Option(help="trimmed_mean: the share dropped at each end, in [0, 0.5).")
    ] = 0.1,
    clip_radius: Annotated[
        float | None,
        typer.Option(help="centered_clip: the radius (default: the inputs' median distance)."),
    ] = None,
    norm_filter: Annotated[
        float | None,
        typer.Option(
            help="Drop a received delta whose norm exceeds this x the recent median; 0: off "
            "(default: 10 with a robust --aggregate, off with mean)."
        ),
    ] = None,
    min_peers: Annotated[int, typer.Option(help="Start once this many other nodes are known.")] = 0,
    join_timeout: Annotated[float, typer.Option(help="Seconds to wait for --min-peers.")] = 60.0,
    full_delivery_max: Annotated[
        int, typer.Option(help="Send deltas to everyone up to this run size.")
    ] = 32,
    fanout: Annotated[int, typer.Option(help="Delta fan-out beyond --full-delivery-max.")] = 8,
    average_every: Annotated[
        int, typer.Option(help="Gossip: average with a random peer every N steps.")
    ] = 10,
    max_delta_age: Annotated[
        int | None, typer.Option(help="Refuse deltas older than this (default s).")
    ] = None,
    rpc_timeout: Annotated[float, typer.Option(help="DHT RPC timeout, s.")] = DEFAULT_RPC_TIMEOUT_S,
    refresh_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between DHT refreshes (estimate, peer pool; finding peers again "
            "after a partition heals)."
        ),
    ] = _REFRESH_INTERVAL_S,
    max_contacts_per_ip: Annotated[
        int, typer.Option(help="DHT contacts from one IP address (this host's own IP exempt).")
    ] = OverlayConfig().max_contacts_per_ip,
    role: Annotated[
        str, typer.Option(help="peer; or server, or worker (with --server), the centralised mode.")
    ] = "peer",
    server: Annotated[
        str | None, typer.Option(help="The parameter server's host:port (--role worker).")
    ] = None,
    heartbeat_timeout: Annotated[
        float, typer.Option(help="Server: evict a worker silent this long, s.")
    ] = 5.0,
    server_timeout: Annotated[
        float, typer.Option(help="Worker: give up on an unreachable server after this long, s.")
    ] = 60.0,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            help="Save model and optimiser state every N steps (server: model versions); 0: never."
        ),
    ] = 0,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder (default: --resume's); a server resumes from it."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue from the newest good checkpoint in this folder (not workers)."),
    ] = None,
    log_path: Annotated[
        str, typer.Option("--log", help="JSON-lines step log: a file, or - for stdout.")
    ] = "-",
    save: Annotated[
        Path | None, typer.Option(help="Write the final model here (p2pml format).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Warnings and errors only on stderr.")] = False,
    faults: Annotated[
        Path | None,
        typer.Option(
            help="TOML fault plan (loss, delay, partitions...) injected into this peer's or "
            "worker's traffic, for tests and chaos runs; re-read when the file changes."
        ),
    ] = None,
    config_file: ConfigOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Train as one node: a peer (sampled barriers, deltas straight to peers, no server), or
    the parameter server or a worker of the centralised mode."""
    role = role.lower()
    if role not in ROLES:
        raise bad_flag("--role", role, "one of " + ", ".join(ROLES))
    server_addr = _address(server, "--server") if server else None
    if (role == "worker") != (server_addr is not None):
        raise bad_flag("--server", server, "host:port with --role worker, and only with it")
    if role == "worker" and (checkpoint_every or resume is not None or checkpoint_dir):
        flag, value = (
            ("--resume", str(resume))
            if resume is not None
            else ("--checkpoint-every", checkpoint_every)
            if checkpoint_every
            else ("--checkpoint-dir", str(checkpoint_dir))
        )
        raise bad_flag(flag, value, "none for a worker: its server checkpoints the model")
    if checkpoint_dir is None and role != "server":
        checkpoint_dir = resume
    if checkpoint_every and checkpoint_dir is None:
        raise bad_flag("--checkpoint-dir", None, "a folder when --checkpoint-every is > 0")
    if resume is not None and not resume.is_dir():
        raise bad_flag("--resume", str(resume), "an existing folder of checkpoints")
    if (
        role == "peer"
        and resume is None
        and checkpoint_dir is not None
        and any(checkpoint_dir.glob("node-*.p2pml"))
    ):  # a fresh start there would prune the old run's checkpoints by step, not by age
        raise bad_flag(
            "--checkpoint-dir",
            str(checkpoint_dir),
            "a folder without checkpoints, unless you --resume from it",
        )
    if checkpoint_dir is not None and checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise bad_flag("--checkpoint-dir", str(checkpoint_dir), "a folder, not a file")
    if time_budget and role == "server":
        raise bad_flag(
            "--time-budget", time_budget, "0 with --role server (it stops with its workers)"
        )
    for flag, value, low in (
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--eval-every", eval_every, 0),
    ):
        if value < low:
            raise bad_flag(flag, value, f"a whole number >= {low}")
    if not (lr > 0 and lr < float("inf")):
        raise bad_flag("--lr", lr, "a finite number > 0")
    if not 0 <= momentum < 1:
        raise bad_flag("--momentum", momentum, "a number in [0, 1)")
    for flag, seconds in (("--slow", slow), ("--time-budget", time_budget)):
        if not 0 <= seconds < float("inf"):
            raise bad_flag(flag, seconds, "a finite number of seconds >= 0")
    try:
        policy = get_policy(barrier.lower()).name
        beta = SampleSize.parse(sample, field="--sample")
    except ConfigError as err:
        raise bad_flag(_FLAGS.get(err.field, err.field), err.value, err.allowed) from None
    shard_spec = parse_shard(shard)
    aggregation = _aggregation(aggregate, trim, clip_radius, norm_filter)
    try:
        admission = Admission.load(run_key=run_key, allow_keys=allow_keys)
    except ConfigError as err:
        raise bad_flag(err.field, err.value, err.allowed) from None
    try:
        RunManifest.build(run_id, {}, [TensorSpec("check", "float32", (1,))])
    except ConfigError as err:
        raise bad_flag("--run-id", run_id, err.allowed) from None
    config = _node_config(
        role=role,
        listen=listen,
        http_listen=http_listen,
        advertise=advertise,
        bootstrap=parse_bootstrap(bootstrap),
        rpc_timeout=rpc_timeout,
        refresh_interval=refresh_interval,
        max_contacts_per_ip=max_contacts_per_ip,
        barrier=policy,
        sample=beta,
        staleness=staleness,
        min_peers=min_peers,
        join_timeout_s=join_timeout,
        full_delivery_max=full_delivery_max,
        fanout=fanout,
        average_every=average_every,
        max_delta_age=max_delta_age,
        heartbeat_timeout_s=heartbeat_timeout,
        heartbeat_interval_s=min(1.0, heartbeat_timeout / 4),
        server_timeout_s=server_timeout,
        checkpoint_every=checkpoint_every,
        faults=_fault_plan(faults),
        faults_file=None if faults is None else str(faults),
    )
    if print_config:  # every value is checked; nothing has started or been written
        show_config(ctx)
        return
    check_writable(save, "--save")
    out = _open_log(log_path)
    setup_logging(logging.WARNING if quiet else logging.INFO)
    from p2pml.train.session import Session  # torch loads only for this command

    try:
        session = Session.build(
            config,
            run_id=run_id,
            model=model,
            dataset=dataset,
            data_dir=data_dir,
            lr=lr,
            momentum=momentum,
            batch_size=batch_size,
            seed=seed,
            shard=shard_spec,
            key_path=key,
            aggregation=aggregation,
            admission=admission,
        )
    except ConfigError as err:
        flag = {"dataset": "--dataset", "model": "--model", "run_id": "--run-id"}.get(
            err.field, "--data-dir" if "data" in err.field else err.field
        )
        raise bad_flag(flag, err.value, err.allowed) from None

    def on_step(entry: StepLog) -> None:
        out.write(json.dumps(entry.to_dict()) + "\n")
        if entry.accuracy is not None or entry.step % max(1, steps // 10) == 0:
            log.info(
                "step %d/%d loss %.4f accuracy %s wait %.3f s N^ %.1f",
                entry.step + 1,
                steps,
                entry.loss,
                "-" if entry.accuracy is None else f"{entry.accuracy:.4f}",
                entry.wait_s,
                entry.n_hat,
            )

    if role == "server":
        _serve(
            session,
            out,
            eval_every=eval_every,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            save=save,
            http_flag="--http-listen" if http_listen else "--listen",
        )
        return
    started = time.monotonic()
    try:
        result = asyncio.run(
            session.run(
                steps=steps,
                slow_s=slow,
                eval_every=eval_every,
                on_step=on_step,
                save=save,
                time_budget_s=time_budget or None,
                server=server_addr,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
            )
        )
    except KeyboardInterrupt:
        print("p2pml run: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except ConfigError as err:
        raise _runtime_flag(err, http_flag="--http-listen" if http_listen else "--listen") from None
    except OSError as err:  # the step log's disk filled up, or its folder went away
        print(f"p2pml run: error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    except (OverlayError, BarrierTimeout, P2PMLError) as err:
        print(f"p2pml run: error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        if out is not sys.stdout:
            with contextlib.suppress(OSError):
                out.close()
    print(
        f"p2pml run: {result.steps} steps (from {result.start_step}) in "
        f"{time.monotonic() - started:.1f} s; final loss {result.final_loss}, "
        f"accuracy {result.final_accuracy}; waited {result.wait_s:.2f} s at barriers; "
        f"deltas sent {result.counters.get('deltas_sent', 0)}, received "
        f"{result.counters.get('deltas_received', 0)}, rejected "
        f"{result.counters.get('deltas_rejected', 0)}",
        file=sys.stderr,
    )


def _runtime_flag(err: ConfigError, *, http_flag: str) -> Exception:
    """A configuration mistake found only once the node starts (a busy port, no usable
    checkpoint), as the one-line error of the flag behind it."""
    flags = {
        "listen": ("--listen", err.value),
        "advertise": ("--advertise", err.value),
        "http_listen": (http_flag, err.value),
        "checkpoint folder": ("--resume", err.value),
        "resume": ("--resume", err.value),
        "checkpoint_dir": ("--checkpoint-dir", err.value),
        "save": ("--save", err.value),
    }
    flag, value = flags.get(err.field, (err.field, err.value))
    return bad_flag(flag, value, err.allowed)


def _serve(
    session: Session,
    out: IO[str],
    *,
    eval_every: int,
    checkpoint_dir: Path | None,
    resume: Path | None,
    save: Path | None,
    http_flag: str,
) -> None:
    """Run the parameter server until its workers have finished."""

    def on_update(entry: UpdateLog) -> None:
        out.write(json.dumps(entry.to_dict()) + "\n")
        if entry.accuracy is not None:
            log.info("model version %d: accuracy %.4f", entry.version, entry.accuracy)

    def on_ready(server: ParameterServer) -> None:
        addr = server.data.addr
        print(
            f"p2pml run: parameter server of run {session.manifest.run_id} listening on {addr} "
            f"(workers: --role worker --server {addr})",
            file=sys.stderr,
            flush=True,
        )

    try:
        summary = asyncio.run(
            session.serve(
                eval_every=eval_every,
                on_update=on_update,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                save=save,
                on_ready=on_ready,
            )
        )
    except KeyboardInterrupt:
        print("p2pml run: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except ConfigError as err:
        raise _runtime_flag(err, http_flag=http_flag) from None
    except OSError as err:
        print(f"p2pml run: error: cannot serve: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    except P2PMLError as err:
        print(f"p2pml run: error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        if out is not sys.stdout:
            with contextlib.suppress(OSError):
                out.close()
    stale = summary["staleness"]
    assert isinstance(stale, dict)
    print(
        f"p2pml run: server done at model version {summary['version']}; accuracy "
        f"{summary['accuracy']}; staleness mean {stale['mean']}, variance {stale['variance']}, "
        f"max {stale['max']} over {stale['n']} deltas; summary {json.dumps(summary)}",
        file=sys.stderr,
    )
