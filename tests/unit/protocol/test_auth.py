"""The seal of data-plane frames and run admission (p2pml.protocol.auth)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.errors import ConfigError, Refused
from p2pml.protocol.auth import (
    NONCE_BYTES,
    TRAILER_BYTES,
    Admission,
    Authenticator,
    ReplayGuard,
    new_digest,
)
from p2pml.protocol.identity import NodeKey

NOW = 1_800_000_000.0


def digest_of(data: bytes) -> bytes:
    d = new_digest()
    d.update(data)
    return d.digest()


def sealed(key: NodeKey, admission: Admission, data: bytes, *, at: float = NOW, nonce=None):
    nonce = nonce or os.urandom(NONCE_BYTES)
    return Authenticator(key, admission).seal(digest_of(data), now_unix_s=at, nonce=nonce)


def code_of(guard: ReplayGuard, trailer: bytes, data: bytes, sender, now: float = NOW) -> str:
    with pytest.raises(Refused) as refused:
        guard.check(trailer, digest_of(data), sender=sender, now_unix_s=now)
    return refused.value.code


def test_a_sealed_frame_passes_once_and_its_replay_is_refused():
    key = NodeKey.generate()
    guard = ReplayGuard(Admission())
    trailer = sealed(key, Admission(), b"frame")
    assert len(trailer) == TRAILER_BYTES
    seal = guard.check(trailer, digest_of(b"frame"), sender=key.peer_id, now_unix_s=NOW)
    assert seal.public_key == key.public_key
    assert code_of(guard, trailer, b"frame", key.peer_id) == "replayed"


def test_tampered_bytes_another_sender_and_a_bad_signature_are_forged():
    key, other = NodeKey.generate(), NodeKey.generate()
    guard = ReplayGuard(Admission())
    trailer = sealed(key, Admission(), b"frame")
    assert code_of(guard, trailer, b"framf", key.peer_id) == "forged"
    assert code_of(guard, trailer, b"frame", other.peer_id) == "forged"
    broken = bytearray(trailer)
    broken[60] ^= 1  # inside the signature
    assert code_of(guard, bytes(broken), b"frame", key.peer_id) == "forged"
    assert len(guard) == 0  # nothing refused is remembered


def test_malformed_trailers_are_bad_seals():
    key = NodeKey.generate()
    guard = ReplayGuard(Admission())
    trailer = sealed(key, Admission(), b"x")
    assert code_of(guard, trailer[:-1], b"x", key.peer_id) == "bad_seal"
    assert code_of(guard, b"XXXX" + trailer[4:], b"x", key.peer_id) == "bad_seal"


@pytest.mark.parametrize("offset_s", [-121.0, 121.0, float("nan"), float("inf")])
def test_a_timestamp_out_of_the_window_is_refused(offset_s):
    key = NodeKey.generate()
    guard = ReplayGuard(Admission(), max_skew_s=120.0)
    trailer = sealed(key, Admission(), b"x", at=NOW + offset_s)
    assert code_of(guard, trailer, b"x", key.peer_id) == "clock_skew"


def test_run_key_admits_holders_only():
    secret = Admission(run_key=Admission.derive_key(b"a secret of 16 bytes!"))
    wrong = Admission(run_key=Admission.derive_key(b"another secret, 16+"))
    member, outsider = NodeKey.generate(), NodeKey.generate()
    guard = ReplayGuard(secret)
    guard.check(
        sealed(member, secret, b"m"), digest_of(b"m"), sender=member.peer_id, now_unix_s=NOW
    )
    assert code_of(guard, sealed(outsider, wrong, b"m"), b"m", outsider.peer_id) == "not_admitted"
    assert code_of(guard, sealed(outsider, Admission(), b"m"), b"m", outsider.peer_id) == (
        "not_admitted"
    )


def test_allowlist_admits_listed_keys_only():
    member, outsider = NodeKey.generate(), NodeKey.generate()
    closed = Admission(allowed_keys=frozenset({member.public_key}))
    guard = ReplayGuard(closed)
    guard.check(
        sealed(member, Admission(), b"m"), digest_of(b"m"), sender=member.peer_id, now_unix_s=NOW
    )
    assert code_of(guard, sealed(outsider, Admission(), b"m"), b"m", outsider.peer_id) == (
        "not_admitted"
    )


def test_nonce_memory_is_bounded_and_never_lets_a_forgotten_nonce_replay():
    key = NodeKey.generate()
    guard = ReplayGuard(Admission(), max_nonces=8)
    trailers = [sealed(key, Admission(), b"f", at=NOW + i * 0.01) for i in range(20)]
    for t in trailers:
        guard.check(t, digest_of(b"f"), sender=key.peer_id, now_unix_s=NOW + 0.2)
    assert len(guard) == 8
    for t in trailers:  # the remembered ones by nonce, the forgotten ones by age
        assert code_of(guard, t, b"f", key.peer_id, now=NOW + 0.2) == "replayed"


def test_nonces_expire_with_the_skew_window():
    key = NodeKey.generate()
    guard = ReplayGuard(Admission(), max_skew_s=10.0)
    guard.check(sealed(key, Admission(), b"a"), digest_of(b"a"), sender=key.peer_id, now_unix_s=NOW)
    later = sealed(key, Admission(), b"b", at=NOW + 11)
    guard.check(later, digest_of(b"b"), sender=key.peer_id, now_unix_s=NOW + 11)
    assert len(guard) == 1


@given(st.binary(max_size=2 * TRAILER_BYTES), st.binary(max_size=64))
def test_any_bytes_as_a_trailer_are_refused_never_an_other_error(trailer, data):
    key = NodeKey.generate()
    with pytest.raises(Refused):
        ReplayGuard(Admission()).check(trailer, digest_of(data), sender=key.peer_id, now_unix_s=NOW)


def test_load_reads_secrets_and_allowlists_and_names_bad_input(tmp_path):
    key = NodeKey.generate()
    listing = tmp_path / "allow.txt"
    listing.write_text(f"# the run\n\n{key.public_key.hex()}  # node 1\n")
    admission = Admission.load(run_key="0123456789abcdef", allow_keys=listing)
    assert admission.allowed_keys == {key.public_key}
    assert admission.run_key is not None and not admission.is_open
    assert "run key" in admission.describe() and "1 keys" in admission.describe()
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef\n")
    assert Admission.load(run_key=f"@{secret}", allow_keys=None).run_key == admission.run_key
    assert Admission.load(run_key=None, allow_keys=None).is_open
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Admission.load(run_key="short", allow_keys=None)
    with pytest.raises(ConfigError, match="readable"):
        Admission.load(run_key=f"@{tmp_path / 'missing'}", allow_keys=None)
    listing.write_text("nothex\n")
    with pytest.raises(ConfigError) as bad:
        Admission.load(run_key=None, allow_keys=listing)
    assert bad.value.value == f"{listing}:1"
    listing.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="at least one"):
        Admission.load(run_key=None, allow_keys=listing)


def test_an_overflow_forgets_the_oldest_stamp_not_the_first_arrival():
    key = NodeKey.generate()
    guard = ReplayGuard(Admission(), max_nonces=8)
    early = sealed(key, Admission(), b"f", at=NOW + 100)  # a fast clock, within the skew
    guard.check(early, digest_of(b"f"), sender=key.peer_id, now_unix_s=NOW)
    for i in range(20):  # honest frames stamped before it, arriving after it
        t = sealed(key, Admission(), b"f", at=NOW + 1 + i)
        guard.check(t, digest_of(b"f"), sender=key.peer_id, now_unix_s=NOW + 21)
    assert len(guard) == 8
    assert code_of(guard, early, b"f", key.peer_id, now=NOW + 21) == "replayed"  # still known
    fresh = sealed(key, Admission(), b"f", at=NOW + 22)
    guard.check(fresh, digest_of(b"f"), sender=key.peer_id, now_unix_s=NOW + 22)
