"""Node identity: an Ed25519 key per node, the node ID derived from its public key, and signatures.

A node's 160-bit ID is BLAKE2b-160 of its raw 32-byte public key, so IDs are uniform (the population
estimate relies on it) and cannot be chosen: a peer proves an ID by showing the key that hashes to
it and signing with that key. Keys live in a PKCS#8 PEM file that only its owner may read (0600);
a key file that others can read is refused.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pml.core.types import PEER_ID_BYTES, PeerId
from p2pml.errors import ConfigError, WireFormatError

__all__ = ["PUBLIC_KEY_BYTES", "SIGNATURE_BYTES", "NodeKey", "peer_id_of", "verify_signature"]

PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64


def peer_id_of(public_key: bytes) -> PeerId:
    """The node ID that belongs to a raw Ed25519 public key.

    Raises:
        WireFormatError: if `public_key` is not 32 bytes.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        shown = len(public_key) if isinstance(public_key, bytes) else type(public_key).__name__
        raise WireFormatError(f"public key: expected {PUBLIC_KEY_BYTES} bytes, received {shown}")
    return PeerId(hashlib.blake2b(public_key, digest_size=PEER_ID_BYTES).digest())


def verify_signature(peer_id: PeerId, public_key: bytes, data: bytes, signature: bytes) -> None:
    """Check that `public_key` belongs to `peer_id` and signed `data`.

    Raises:
        WireFormatError: naming what failed: the key length, the ID binding or the signature.
    """
    if peer_id_of(public_key) != peer_id:
        raise WireFormatError(
            f"peer id {peer_id.hex()[:16]}: not derived from the public key shown"
        )
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise WireFormatError(f"signature: expected {SIGNATURE_BYTES} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        raise WireFormatError(f"signature of peer {peer_id.hex()[:16]}: does not verify") from None


class NodeKey:
    """A node's Ed25519 private key, with its public key and node ID."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: PeerId = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of `data`."""
        return self._key.sign(data)

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """Load the key at `path`, or create it there (mode 0600) on first start.

        Raises:
            ConfigError: naming the path, if the file is readable by others, unreadable, or not
                an unencrypted Ed25519 PKCS#8 PEM key.
        """
        if not path.exists():
            key = cls.generate()
            key._write(path)
            return key
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                "--key",
                str(path),
                f"a file only its owner can read (chmod 600; it has mode {mode:o})",
            )
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError("--key", str(path), f"an Ed25519 PEM key file ({exc})") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigError("--key", str(path), "an Ed25519 key, not another key type")
        return cls(loaded)

    def _write(self, path: Path) -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ConfigError(
                "--key", str(path), f"a path where a key can be created ({exc.strerror})"
            ) from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
