"""The benchmark commands as a user runs them, on small sizes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from p2pml.io.linkbench import measure_pushes

pytestmark = pytest.mark.integration


def p2pml(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pml", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bench_codec_writes_rows_per_metric_and_size(tmp_path):
    out = tmp_path / "codec.json"
    proc = p2pml("bench", "codec", "--size-mb", "1,2", "--repeat", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["metric"], r["size_bytes"]) for r in rows] == [
        (m, s) for s in (1 << 20, 2 << 20) for m in ("encode", "encode_contiguous", "decode")
    ]
    for row in rows:
        assert row["baseline"] == "ndarray.copy"
        assert row["ratio"] == pytest.approx(row["gbps"] / row["baseline_gbps"], rel=0.01)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_transport_writes_a_push_row_with_a_pair_ratio(tmp_path):
    out = tmp_path / "transport.json"
    proc = p2pml("bench", "transport", "--size-mb", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    row, sealed = json.loads(out.read_text())["rows"]
    assert row["metric"] == "push" and row["pairs"] == 15
    assert row["baseline"] == "asyncio BufferedProtocol"
    assert row["ratio"] > 0
    assert sealed["metric"] == "sealed push" and sealed["baseline"] == "unsealed push"
    assert sealed["baseline_gbps"] == row["gbps"] and sealed["target"] == 0.75
    assert sealed["ratio"] > 0
    assert "peak memory growth" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_receiver_memory_grows_by_at_most_one_and_a_half_payloads():
    size = 64 << 20
    pairs, peak = asyncio.run(measure_pushes(size, 2))
    assert len(pairs) == 2
    assert peak <= 1.5 * size


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["codec", "--size-mb", "0"], "--size-mb"),
        (["codec", "--size-mb", "x"], "--size-mb"),
        (["codec", "--repeat", "0"], "--repeat"),
        (["transport", "--repeat", "3"], "--repeat"),
        (["codec", "--json", "/nonexistent-dir/x.json"], "--json"),
    ],
)
def test_bench_bad_input_is_one_line_naming_the_flag(args, flag):
    proc = p2pml("bench", *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert flag in proc.stderr
