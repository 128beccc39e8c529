"""Fuzzing a live node (issue 8): the engine of benchmarks/fuzz.py with a small count.

One run (module scope) sends N random and mutated datagrams and N hostile HTTP bodies to a live
peer node and a parameter server while slow-loris connections trickle; the tests read its report.
The benchmark runs the same engine with 60,000 + 60,000 (``python benchmarks/fuzz.py``).
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuzz
from fuzzlib import (
    DATAGRAM_KINDS,
    DatagramFuzzer,
    HttpFuzzer,
    Mutator,
    Reply,
    Route,
    classify,
    join_frame,
    split_frame,
)

from p2pml.core.types import Address, PeerId
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import DeltaPush, TensorBlob
from p2pml.protocol.wire import decode_message, encode_contiguous

pytestmark = pytest.mark.integration

N_DATAGRAMS = N_BODIES = 2000
SEED = int(os.environ.get("P2PML_TEST_SEED", "20261121"))
BODY_OUTCOME = re.compile(
    r"200|4\d\d [a-z][a-z0-9_]*|503 [a-z][a-z0-9_]*|400 http parser \(plain text\)"
    r"|closed without reply"
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def report() -> fuzz.FuzzReport:
    print(f"fuzz seed: {SEED}")
    result = await fuzz.run_fuzz(N_DATAGRAMS, N_BODIES, SEED)
    print(fuzz.format_report(result))
    return result


def body_outcomes(report: fuzz.FuzzReport) -> dict[str, dict[str, int]]:
    return {k: v for k, v in report.outcomes.items() if not k.startswith("dgram ")}


def test_fuzz_sends_every_input_and_reaches_the_checks_behind_the_decoders(report):
    assert report.n_datagrams >= N_DATAGRAMS
    assert report.n_bodies == N_BODIES
    assert report.counters["peer dht"]["malformed"] > 0
    refusals = report.counters["peer http refusals"]
    assert refusals["bad_frame"] > 0
    past_the_seal = ("nonfinite", "shape", "dtype")  # refusals behind the seal check
    assert sum(refusals.get(code, 0) for code in past_the_seal) > 0, refusals


def test_fuzz_crashes_nothing(report):
    assert report.reproducers == []
    assert report.error_logs == []
    assert report.node_failures == []
    assert report.n_crashes == 0


def test_fuzz_leaves_no_unhandled_task_exception(report):
    assert report.loop_errors == []


def test_fuzz_replies_are_statuses_with_a_json_error_for_every_refusal(report):
    for kind, outcomes in body_outcomes(report).items():
        for outcome in outcomes:
            assert BODY_OUTCOME.fullmatch(outcome), (kind, outcome)
            if outcome == "closed without reply":
                # only a body cut short by the sender's EOF, or one over the cap that the server
                # stopped draining before the sender finished writing it
                assert kind.endswith(("http:cl_long", "http:over_cap")), kind
    assert report.n_bad_refusals == 0


def test_fuzz_leaves_the_node_healthy_and_cuts_slow_clients_off(report):
    assert report.health == []
    assert len(report.slow_clients) == 4
    assert report.n_slow_failures == 0


def test_fuzz_memory_growth_stays_bounded(report):
    assert [pct for pct, _ in report.rss_mib] == list(range(0, 101, 10))
    assert report.rss_growth_mib <= fuzz.RSS_BOUND_MIB


def test_fuzz_datagrams_never_overflow_the_nodes_socket(report):
    assert report.udp_drops["target"] == 0


# -- the engine without sockets -------------------------------------------------------------------


def corpus() -> dict[str, list[bytes]]:
    msg = DeltaPush(
        "run", PeerId(b"\x07" * 20), 0, 0, (TensorBlob.of("w", np.ones(4, np.float32)),)
    )
    return {"delta": [encode_contiguous(msg).tobytes()]}


def test_the_same_seed_makes_the_same_cases():
    route = [Route("peer", "POST", "/v1/delta", "delta", 1 << 20, 1)]
    targets = {"peer": Address("127.0.0.2", 9)}
    a, b = (HttpFuzzer(targets, route, corpus(), {}, seed=5) for _ in range(2))
    assert [a.make(i) for i in range(200)] == [b.make(i) for i in range(200)]
    key = NodeKey.generate()
    d1, d2 = (DatagramFuzzer(targets["peer"], -1, key, 5, rate_per_s=1.0) for _ in range(2))
    assert all(d1.make(k, i) == d2.make(k, i) for k in DATAGRAM_KINDS for i in range(30))


def test_split_and_join_frame_round_trip_a_library_frame():
    frame = corpus()["delta"][0]
    assert join_frame(*split_frame(frame)) == frame
    assert decode_message(join_frame(*split_frame(frame))) == decode_message(frame)


def test_mutated_trees_always_pack():
    rng = random.Random(SEED)
    for _ in range(500):
        header = split_frame(corpus()["delta"][0])[1]
        msgpack.packb(Mutator(rng).mutate_tree(header, 3), use_bin_type=True)


@pytest.mark.parametrize(
    ("reply", "http_level", "outcome", "is_failure"),
    [
        (Reply(200, {}, b""), False, "200", False),
        (Reply(400, {}, b'{"error": "bad_frame", "message": "m"}'), False, "400 bad_frame", False),
        (Reply(503, {}, b'{"error": "busy", "message": "m"}'), False, "503 busy", False),
        (Reply(400, {}, b"400: Bad Request"), False, "400 (no JSON error)", True),
        (Reply(400, {}, b"400: Bad Request"), True, "400 http parser (plain text)", False),
        (Reply(500, {}, b"500 Internal Server Error"), False, "500", True),
        (Reply(0, {}, b""), False, "closed without reply", False),
    ],
)
def test_classify_flags_server_errors_and_refusals_without_a_json_error(
    reply, http_level, outcome, is_failure
):
    label, failure = classify(reply, http_level=http_level)
    assert label == outcome
    assert (failure is not None) == is_failure
