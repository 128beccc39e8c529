"""``p2pml seed``, ``p2pml peers`` and ``p2pml bench overlay`` as a user runs them."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def p2pml(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "p2pml", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The seed's first stdout line (its contact string), waiting at most `timeout_s`."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise AssertionError("the seed printed no contact line in time")
    return proc.stdout.readline()


@pytest.fixture
def seed_node(tmp_path):
    key = tmp_path / "seed.key"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pml",
            "seed",
            "--listen",
            "127.0.0.7:0",
            "--key",
            str(key),
            "--contacts",
            str(tmp_path / "contacts.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _first_line(proc, 30)
        words = line.split()
        assert words[0] == "seed" and words[2] == "contact", line
        yield words[3], words[1], key, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)  # also closes the pipes


def test_seed_prints_its_contact_and_keeps_its_key_private(seed_node):
    contact, peer_id, key, _ = seed_node
    assert contact.startswith("127.0.0.7:") and len(peer_id) == 40
    assert key.stat().st_mode & 0o777 == 0o600


def test_peers_joins_through_the_seed_and_reports_it(seed_node, tmp_path):
    contact, peer_id, _, _ = seed_node
    out = tmp_path / "peers.json"
    done = p2pml("peers", "--bootstrap", contact, "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["exact"] and result["n_hat"] == 2 and result["contacts"] == 1
    assert [row["id"] for row in result["sample"]] == [peer_id]
    assert result["sample"][0]["role"] == "seed"
    assert "population estimate N^ = 2.0 (exact count)" in done.stdout


def test_peers_reads_the_bootstrap_list_from_the_environment(seed_node):
    contact, peer_id, _, _ = seed_node
    done = p2pml("peers", env={"P2PML_BOOTSTRAP": contact})
    assert done.returncode == 0, done.stderr
    assert peer_id[:16] in done.stdout


def test_peers_reads_a_seeds_file(seed_node, tmp_path):
    contact, _, _, _ = seed_node
    seeds = tmp_path / "seeds.toml"
    seeds.write_text(f'seeds = ["{contact}"]\n')
    assert p2pml("peers", "--bootstrap", str(seeds)).returncode == 0


def test_seed_stops_cleanly_on_sigterm_and_saves_its_contacts(seed_node, tmp_path):
    contact, _, _, proc = seed_node
    assert p2pml("peers", "--bootstrap", contact).returncode == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    saved = json.loads((tmp_path / "contacts.json").read_text())
    assert saved["version"] == 1 and len(saved["contacts"]) == 1


def test_peers_with_no_reachable_seed_fails_with_a_clear_error():
    started = time.monotonic()
    done = p2pml("peers", "--bootstrap", "127.0.0.1:9", "--rpc-timeout", "0.05")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "could not reach any bootstrap node (127.0.0.1:9) after 5 attempts" in last
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["peers"], "--bootstrap"),
        (["peers", "--bootstrap", "nohost"], "--bootstrap"),
        (["peers", "--bootstrap", "a:1,,b:2"], "--bootstrap"),
        (["peers", "--bootstrap", "missing.toml"], "--bootstrap"),
        (["peers", "--bootstrap", "127.0.0.1:4000", "--sample", "0"], "--sample"),
        (["peers", "--bootstrap", "127.0.0.1:4000", "--listen", "host:1"], "--listen"),
        (["peers", "--bootstrap", "127.0.0.1:4000", "--rpc-timeout", "-1"], "--rpc-timeout"),
        (["seed", "--listen", "127.0.0.1:99999"], "--listen"),
        (["seed", "--listen", "192.0.2.1:4000", "--key", "/tmp/p2pml-test.key"], "--listen"),
        (["seed", "--advertise", "x"], "--advertise"),
        (["seed", "--max-contacts-per-ip", "0"], "--max-contacts-per-ip"),
        (["seed", "--run-key", "short"], "--run-key"),
        (["seed", "--run-key", "@/nonexistent/p2pml.secret"], "--run-key"),
        (["seed", "--allow-keys", "/nonexistent/p2pml-keys.txt"], "--allow-keys"),
        (["peers", "--bootstrap", "127.0.0.1:4000", "--run-key", "short"], "--run-key"),
        (["bench", "overlay", "--nodes", "2"], "--nodes"),
        (["bench", "overlay", "--lookups", "0"], "--lookups"),
        (["bench", "overlay", "--dead-fraction", "0.95"], "--dead-fraction"),
        (["bench", "overlay", "--draws", "-1"], "--draws"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(args, flag):
    done = p2pml(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], done.stderr


def test_seed_refuses_a_key_file_others_can_read(tmp_path):
    key = tmp_path / "open.key"
    key.write_text("x")
    key.chmod(0o644)
    done = p2pml("seed", "--key", str(key), "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "chmod 600" in done.stderr


def test_bench_overlay_writes_the_contract_fields(tmp_path):
    out = tmp_path / "overlay.json"
    done = p2pml(
        "bench",
        "overlay",
        "--nodes",
        "16",
        "--lookups",
        "4",
        "--draws",
        "300",
        "--dead-fraction",
        "0.1",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "overlay.png"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {
        "nodes",
        "dead_fraction",
        "lookups",
        "join_s_per_node",
        "lookup_p50_s",
        "lookup_p95_s",
        "estimate",
        "sampling",
        "memory_mib_per_node",
    } <= set(result)
    assert result["nodes"] == 16 and result["dead_fraction"] == 0.1 and result["lookups"] == 4
    assert {"true_n", "median_abs_error", "p95_abs_error", "rmse"} <= set(result["estimate"])
    assert result["estimate"]["true_n"] == 14
    assert result["sampling"]["draws"] == 300 and 0 <= result["sampling"]["chi2_p"] <= 1
    assert result["sampling"]["dead_in_samples"] == 0
    assert "join s per node" in done.stdout
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["estimate"]["errors"]) == 14 and len(result["sampling"]["counts"]) == 14
