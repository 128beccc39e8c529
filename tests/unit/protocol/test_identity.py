from __future__ import annotations

import os

import pytest

from p2pml.errors import ConfigError, WireFormatError
from p2pml.protocol.identity import NodeKey, peer_id_of, verify_signature


def test_peer_id_is_twenty_bytes_derived_from_the_public_key():
    key = NodeKey.generate()
    assert len(key.peer_id) == 20
    assert key.peer_id == peer_id_of(key.public_key)
    assert NodeKey.generate().peer_id != key.peer_id


def test_signature_verifies_and_binds_the_id_to_the_key():
    key = NodeKey.generate()
    verify_signature(key.peer_id, key.public_key, b"step 7", key.sign(b"step 7"))


@pytest.mark.parametrize("tamper", ["data", "signature", "foreign key", "forged id"])
def test_tampered_records_are_rejected_naming_what_failed(tamper):
    key, other = NodeKey.generate(), NodeKey.generate()
    peer_id, public, data, sig = key.peer_id, key.public_key, b"step 7", key.sign(b"step 7")
    if tamper == "data":
        data = b"step 8"
    elif tamper == "signature":
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    elif tamper == "foreign key":
        public = other.public_key
    else:
        peer_id = other.peer_id
    with pytest.raises(WireFormatError, match=r"signature|peer id"):
        verify_signature(peer_id, public, data, sig)


def test_ids_of_many_keys_look_uniform():
    top_bits = [NodeKey.generate().peer_id[0] >> 4 for _ in range(1600)]
    counts = [top_bits.count(v) for v in range(16)]
    chi2 = sum((c - 100) ** 2 / 100 for c in counts)
    assert chi2 < 45.0  # 15 degrees of freedom: p < 1e-4 above this


def test_key_file_is_created_private_and_loads_back(tmp_path):
    path = tmp_path / "node.key"
    created = NodeKey.load_or_create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert NodeKey.load_or_create(path).peer_id == created.peer_id


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "node.key"
    NodeKey.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        NodeKey.load_or_create(path)


def test_garbage_key_file_is_refused_naming_the_flag(tmp_path, rng):
    path = tmp_path / "node.key"
    path.write_bytes(rng.randbytes(100))
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=r"^--key: got"):
        NodeKey.load_or_create(path)


@pytest.mark.parametrize("raw", [b"", b"x" * 31, b"x" * 33])
def test_public_keys_of_the_wrong_length_are_rejected(raw):
    with pytest.raises(WireFormatError, match="public key"):
        peer_id_of(raw)
