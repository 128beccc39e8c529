"""``p2pml bench codec`` and ``p2pml bench transport``: measure the wire format and a link.

Each row compares p2pml against a baseline measured in the same run and prints a table; ``--json``
writes ``{"rows": [{"metric", "size_bytes", "median_s", "gbps", "baseline", "baseline_gbps",
"ratio"}, ...]}``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from p2pml.cli.args import bad_flag, check_writable, parse_int_list
from p2pml.cli.output import console, write_json
from p2pml.cli.overlaybench import overlay
from p2pml.core.types import PeerId
from p2pml.io.linkbench import measure_pushes
from p2pml.protocol.messages import DeltaPush, TensorBlob
from p2pml.protocol.wire import decode_message, encode_contiguous, encode_frames
from p2pml.report.results import JsonValue
from p2pml.report.tables import make_progress

__all__ = ["bench_app"]

bench_app = typer.Typer(
    help="Measure the codec, the data plane and the overlay against baselines and targets.",
    no_args_is_help=True,
)
bench_app.command()(overlay)

MIN_TRANSPORT_PAIRS = 15
SEALED_TARGET = 0.75  # signing may cost at most 25 % of the unsealed push throughput (issue 8)
O1_CALLS = 50  # encode_frames and decode take microseconds: time a burst, not one cold call
SizesOption = Annotated[str, typer.Option("--size-mb", help="Comma list of delta sizes in MB.")]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Write the rows as JSON.")]


def _timed(fn: Callable[[], object], calls: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `calls` back-to-back calls."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def _row(
    metric: str,
    size: int,
    times: list[float],
    baseline: str,
    baseline_times: list[float],
    ratio: float | None = None,
) -> dict[str, JsonValue]:
    median, base = statistics.median(times), statistics.median(baseline_times)
    gbps, base_gbps = size / median / 1e9, size / base / 1e9
    return {
        "metric": metric,
        "size_bytes": size,
        "median_s": median,
        "gbps": round(gbps, 3),
        "baseline": baseline,
        "baseline_s": base,
        "baseline_gbps": round(base_gbps, 3),
        "ratio": round(ratio if ratio is not None else gbps / base_gbps, 4),
    }


def _codec_rows(size: int, repeat: int) -> list[dict[str, JsonValue]]:
    array = np.ones(size // 4, dtype=np.float32)
    msg = DeltaPush("bench", PeerId(b"\x01" * 20), 1, 0, (TensorBlob.of("delta", array),))
    encoded = encode_contiguous(msg)
    copy_s, encode_s, contiguous_s, decode_s = [], [], [], []
    for _ in range(repeat):  # interleaved, so machine noise hits the baseline and p2pml alike
        copy_s.append(_timed(array.copy))
        encode_s.append(_timed(lambda: encode_frames(msg), O1_CALLS))
        contiguous_s.append(_timed(lambda: encode_contiguous(msg)))
        decode_s.append(_timed(lambda: decode_message(encoded), O1_CALLS))
    return [
        _row("encode", size, encode_s, "ndarray.copy", copy_s),
        _row("encode_contiguous", size, contiguous_s, "ndarray.copy", copy_s),
        _row("decode", size, decode_s, "ndarray.copy", copy_s),
    ]


def _sizes(size_mb: str) -> list[int]:
    return [mb << 20 for mb in parse_int_list(size_mb, "--size-mb", minimum=1)]


def _report(rows: list[dict[str, JsonValue]], title: str, json_path: Path | None) -> None:
    table = Table(title=title)
    for name in ("metric", "MB", "median s", "GB/s", "baseline", "baseline GB/s", "ratio"):
        table.add_column(name, justify="left" if name in ("metric", "baseline") else "right")
    for row in rows:
        size, median = row["size_bytes"], row["median_s"]
        assert isinstance(size, int) and isinstance(median, float)
        table.add_row(
            str(row["metric"]),
            f"{size >> 20}",
            f"{median:.3g}",
            str(row["gbps"]),
            str(row["baseline"]),
            str(row["baseline_gbps"]),
            f"{row['ratio']:.3g}",
        )
    console.print(table)
    if json_path is not None:
        write_json(json_path, {"rows": [*rows]})
        console.print(f"JSON: {json_path}")


@bench_app.command()
def codec(
    size_mb: SizesOption = "1,16,256",
    repeat: Annotated[int, typer.Option(help="Timed repetitions per size.")] = 7,
    json_path: JsonOption = None,
) -> None:
    """Encode (scatter-gather and contiguous) and decode times against ndarray.copy()."""
    sizes = _sizes(size_mb)
    if repeat < 1:
        raise bad_flag("--repeat", repeat, "a whole number >= 1")
    check_writable(json_path, "--json")
    rows: list[dict[str, JsonValue]] = []
    with make_progress(console) as progress:
        task = progress.add_task("codec", total=len(sizes))
        for size in sizes:
            rows += _codec_rows(size, repeat)
            progress.advance(task)
    _report(rows, "codec: median of interleaved repetitions, baseline ndarray.copy()", json_path)


@bench_app.command()
def transport(
    size_mb: SizesOption = "1,16,256",
    repeat: Annotated[int, typer.Option(help="Interleaved pairs per size (>= 15).")] = 15,
    json_path: JsonOption = None,
) -> None:
    """A delta push between two processes on 127.0.0.1 against an asyncio BufferedProtocol."""
    sizes = _sizes(size_mb)
    if repeat < MIN_TRANSPORT_PAIRS:
        raise bad_flag("--repeat", repeat, f"at least {MIN_TRANSPORT_PAIRS} interleaved pairs")
    check_writable(json_path, "--json")
    rows: list[dict[str, JsonValue]] = []
    with make_progress(console) as progress:
        task = progress.add_task("transport", total=len(sizes))
        for size in sizes:
            pairs, peak_bytes = asyncio.run(measure_pushes(size, repeat))
            ratio = statistics.median(p.baseline_s / p.push_s for p in pairs)
            row = _row(
                "push",
                size,
                [p.push_s for p in pairs],
                "asyncio BufferedProtocol",
                [p.baseline_s for p in pairs],
                ratio,
            )
            row["pairs"] = len(pairs)
            row["receiver_peak_growth_bytes"] = peak_bytes
            row["receiver_peak_growth_ratio"] = round(peak_bytes / size, 3)
            rows.append(row)
            sealed = _row(
                "sealed push",
                size,
                [p.sealed_s for p in pairs],
                "unsealed push",
                [p.push_s for p in pairs],
                statistics.median(p.push_s / p.sealed_s for p in pairs),
            )
            sealed["pairs"] = len(pairs)
            sealed["target"] = SEALED_TARGET
            rows.append(sealed)
            progress.advance(task)
    _report(
        rows,
        "transport: push over loopback, ratio = median of round ratios (a sealed push: signed, "
        f"hashed while streaming; target >= {SEALED_TARGET} of the unsealed throughput)",
        json_path,
    )
    for size, row in zip(sizes, rows[::2], strict=True):
        console.print(
            f"{size >> 20} MB: receiver peak memory growth on the first push "
            f"{row['receiver_peak_growth_ratio']}x the payload"
        )
