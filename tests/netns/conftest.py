"""A network lab for the root-only suite: private network namespaces joined by a bridge, real
``p2pml`` processes inside them, kernel-level faults, and guaranteed cleanup.

Topology (addresses in 10.77.0.0/24, inside namespaces this suite creates; nothing leaves the
machine)::

    node 0 (10.77.0.1) --veth--+
    node 1 (10.77.0.2) --veth--+-- br0 in the hub namespace (10.77.0.254: the seed)
    node 2 (10.77.0.3) --veth--+

Every namespace name carries this process's pid, so runs never collide, and namespaces left by
a run that was killed are removed at the next start. The `swarm` fixture skips the tests, saying
why, when the suite is not run as root or when namespaces, veth pairs or a bridge cannot be made.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PREFIX = "p2pml-t"
SUBNET = "10.77.0"
HUB_IP = f"{SUBNET}.254"
PORT = 7000  # fixed, and safe: each namespace has its own port space
P2PML = str(Path(sys.executable).with_name("p2pml"))
_serial = itertools.count()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure with `check`, raise RuntimeError with its stderr."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _remove_stale_namespaces() -> None:
    """Namespaces of earlier runs whose process is gone (a killed run cannot clean up)."""
    listed = sh("ip", "netns", "list", check=False).stdout.split()
    for name in listed:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            sh("ip", "netns", "del", name, check=False)


class Lab:
    """One hub namespace with a bridge and `n` node namespaces, each on a veth pair."""

    def __init__(self, n: int, root: Path) -> None:
        tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        self.hub = f"{tag}-hub"
        self.nodes = [f"{tag}-n{i}" for i in range(n)]
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.blackholes: list[tuple[int, int]] = []
        self.drop_tool: str | None = None

    # -- topology --------------------------------------------------------------------------------
    def up(self) -> None:
        hub = self.hub
        sh("ip", "netns", "add", hub)
        sh("ip", "-n", hub, "link", "set", "lo", "up")
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nodes):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "eth0", "netns", ns)
            sh("ip", "-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Stop every process, then delete the namespaces (their veths and bridge go too)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in [*self.nodes, self.hub]:
            sh("ip", "netns", "del", ns, check=False)

    @staticmethod
    def ip(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    # -- faults ----------------------------------------------------------------------------------
    def rate_limit(self, i: int, rate: str = "20mbit") -> None:
        """A tbf qdisc on node i's outgoing traffic."""
        ns = self.nodes[i]
        sh("ip", "-n", ns, "link", "set", "eth0", "txqueuelen", "1000")
        sh(
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
            "tbf", "rate", rate, "burst", "64kb", "latency", "100ms",
        )  # fmt: skip

    def qdisc_stats(self, i: int) -> str:
        return sh(
            "ip", "netns", "exec", self.nodes[i], "tc", "-s", "qdisc", "show", "dev", "eth0"
        ).stdout

    def random_drop(self, i: int, percent: int) -> str | None:
        """Drop `percent` % of the UDP datagrams node i receives, with nft or iptables; returns
        the tool used, or None when neither is installed or works here."""
        ns = self.nodes[i]
        if shutil.which("nft"):
            chain = "{ type filter hook input priority 0; policy accept; }"
            rules = (
                "add table inet p2pml\n"
                f"add chain inet p2pml input {chain}\n"
                "add rule inet p2pml input meta l4proto udp "
                f"numgen random mod 100 < {percent} drop\n"
            )
            done = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=rules, capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return "nft"
        if shutil.which("iptables"):
            done = sh(
                "ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-p", "udp", "-m",
                "statistic", "--mode", "random", "--probability", f"{percent / 100:.2f}",
                "-j", "DROP", check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return "iptables"
        return None

    def cut(self, i: int, j: int) -> None:
        """Partition nodes i and j: each routes the other's address into a blackhole."""
        for a, b in ((i, j), (j, i)):
            sh("ip", "-n", self.nodes[a], "route", "add", "blackhole", f"{self.ip(b)}/32")
        self.blackholes.append((i, j))

    def heal(self) -> None:
        for i, j in self.blackholes:
            for a, b in ((i, j), (j, i)):
                sh("ip", "-n", self.nodes[a], "route", "del", "blackhole", f"{self.ip(b)}/32")
        self.blackholes.clear()

    # -- processes -------------------------------------------------------------------------------
    def spawn(self, ns: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PML_")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        err = (self.root / f"{name}.err").open("wb")
        with err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, P2PML, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=self.root,
            )
        self.procs.append(proc)
        return proc

    def seed(self) -> subprocess.Popen[bytes]:
        key = str(self.root / "seed.key")
        return self.spawn(self.hub, "seed", "seed", "--listen", f"{HUB_IP}:{PORT}", "--key", key)

    def node(self, i: int, *args: str) -> subprocess.Popen[bytes]:
        """`p2pml run` in node i's namespace, joined through the hub's seed, logging to
        ``node-i.jsonl``; `args` come last, so they override the defaults."""
        base = (
            "run", "--listen", f"{self.ip(i)}:{PORT}", "--bootstrap", f"{HUB_IP}:{PORT}",
            "--min-peers", str(len(self.nodes) - 1), "--join-timeout", "40",
            "--dataset", "iris", "--model", "mlp", "--eval-every", "0", "--batch-size", "16",
            "--shard", f"{i}/{len(self.nodes)}", "--log", str(self.log(i)), "--quiet",
        )  # fmt: skip
        return self.spawn(self.nodes[i], f"node-{i}", *base, *args)

    def log(self, i: int) -> Path:
        return self.root / f"node-{i}.jsonl"

    def steps(self, i: int) -> list[dict[str, object]]:
        """The complete lines of node i's step log so far."""
        try:
            text = self.log(i).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def stderr(self, name: str) -> str:
        return (self.root / f"{name}.err").read_text(encoding="utf-8", errors="replace")

    def wait_for(self, what: str, condition: Callable[[], bool], timeout_s: float) -> None:
        """Poll `condition` until it holds; fail naming `what` (with every process's stderr)
        when `timeout_s` runs out or a process ends early with an error."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            failed = [p for p in self.procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                pytest.fail(
                    f"{what}: {'a process failed' if failed else 'timed out'}\n{self.report()}"
                )
            time.sleep(0.1)

    def report(self) -> str:
        names = ["seed", *(f"node-{i}" for i in range(len(self.nodes)))]
        parts = []
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"--- {name} stderr (last 2000 chars):\n{self.stderr(name)[-2000:]}")
        return "\n".join(parts)


def _why_no_lab() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (run the netns suite as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is not installed"
    if not Path(P2PML).exists():
        return f"no p2pml console script beside the interpreter ({P2PML}): pip install -e ."
    return None


@contextlib.contextmanager
def built_lab(root: Path, n: int = 3) -> Iterator[Lab]:
    """A lab of `n` node namespaces, torn down (processes first) even when the body fails;
    skips the test, saying why, when none can be built here."""
    why = _why_no_lab()
    if why is not None:
        pytest.skip(why)
    _remove_stale_namespaces()
    made = Lab(n, root)
    try:
        made.up()
    except RuntimeError as err:
        made.down()
        pytest.skip(f"cannot build the network namespaces here: {err}")
    try:
        yield made
    finally:
        made.down()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A seed and three `p2pml run` peers (pSSP, s = 2) training without end on a network that
    rate-limits every node (tbf) and drops 5 % of the datagrams it receives (nft or iptables;
    where neither is installed, the same loss injected in-process with ``--faults``).

    The nodes refresh their DHT every second: a lost datagram can cut an identity check short,
    and only a refresh (or new traffic) checks again; the default interval is 60 s (see
    tests/integration/test_fault_injection.py). Shared by the tests of a module, since starting
    the processes (torch) is most of the time.
    """
    root = tmp_path_factory.mktemp("swarm")
    with built_lab(root) as made:
        args = [
            "--steps", "1000000", "--slow", "0.02", "--barrier", "pssp", "--staleness", "2",
            "--refresh-interval", "1", "--rpc-timeout", "0.3",
        ]  # fmt: skip
        for i in range(len(made.nodes)):
            made.rate_limit(i, "20mbit")
        made.drop_tool = {made.random_drop(i, 5) for i in range(len(made.nodes))}.pop()
        if made.drop_tool is None:
            plan = root / "loss.toml"
            plan.write_text("seed = 1\nloss = 0.05\nrequest_loss = 0.0\n", encoding="utf-8")
            args += ["--faults", str(plan)]
        made.seed()
        for i in range(len(made.nodes)):
            made.node(i, *args)
        yield made
