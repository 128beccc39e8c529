from __future__ import annotations

import pytest

from p2pml.core.types import Address, make_peer_id, make_step
from p2pml.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8000", "127.0.0.1", 8000),
        ("seed-1.example.org:65535", "seed-1.example.org", 65535),
        ("[::1]:1", "::1", 1),
        ("localhost:443", "localhost", 443),
    ],
)
def test_address_parse_accepts_host_port(text, host, port):
    addr = Address.parse(text)
    assert (addr.host, addr.port) == (host, port)
    assert Address.parse(str(addr)) == addr


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        ":80",
        "host:-1",
        "::1:80",
        "[zz]:80",
        "[::1]80",
        "bad host:80",
        "a..b:80",
        "host:8o",
    ],
)
def test_address_parse_rejects_malformed_text_naming_the_field(text):
    with pytest.raises(ConfigError, match=r"^--listen: got"):
        Address.parse(text, field="--listen")


@pytest.mark.parametrize("raw", [b"", b"x" * 19, b"x" * 21, "x" * 20, 7])
def test_make_peer_id_requires_twenty_bytes(raw):
    with pytest.raises(ConfigError, match="peer_id"):
        make_peer_id(raw)


def test_make_peer_id_accepts_twenty_bytes():
    assert make_peer_id(b"\x01" * 20) == b"\x01" * 20


@pytest.mark.parametrize("raw", [-1, True, 1.0, "3", None])
def test_make_step_rejects_non_integers_and_negatives(raw):
    with pytest.raises(ConfigError, match="step"):
        make_step(raw)


def test_make_step_accepts_zero_and_positive():
    assert (make_step(0), make_step(12)) == (0, 12)
