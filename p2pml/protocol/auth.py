"""Who may take part in a run, and the seal every data-plane frame carries.

**Admission.** A run is open (any key may take part; the node says so loudly at start) or closed,
by a shared secret (``--run-key``: members prove they hold it with an HMAC-SHA256) and/or an
allowlist of Ed25519 public keys (``--allow-keys FILE``). With both, a peer needs both.

**The seal.** Every data-plane frame (deltas, models, control messages and their replies) ends in a
fixed-size trailer::

    b"P2PA" | public key (32) | timestamp, unix seconds (f64 LE) | nonce (16)
            | Ed25519 signature (64) | HMAC-SHA256 under the run key, or zeros (32)

The signature and the HMAC cover a domain tag, the timestamp, the nonce and the BLAKE3 digest of
every frame byte before the trailer (the header names the run, the sender and the step, so they are
covered too). Both ends compute the digest while the bytes stream through, so a 256 MB delta is
hashed once per end, chunk by chunk, never read twice. The receiver checks, in order: the trailer's
form, the clock (the timestamp within `max_skew_s` of its own), the key's binding to the frame's
`sender` and the signature, admission, and that the nonce is new: a replayed frame is refused.

Seen nonces are kept until their timestamp leaves the skew window, and at most `max_nonces` of them:
when the table is full, the one with the oldest timestamp is forgotten and frames stamped no later
than it are refused as replays, so memory stays bounded without letting a replay through (a flood
of more than `max_nonces` frames within the window costs the oldest-stamped senders a refusal).
The seal is not encryption and names no recipient: a frame captured on the wire can be shown to
another member of the run within the window (each node refuses it only once it has seen it).

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import blake3

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError, Refused, WireFormatError
from p2pml.protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, NodeKey, verify_signature

__all__ = [
    "DIGEST_BYTES",
    "MAC_BYTES",
    "NONCE_BYTES",
    "TRAILER_BYTES",
    "Admission",
    "Authenticator",
    "Digest",
    "ReplayGuard",
    "Seal",
    "new_digest",
    "parse_public_key",
    "seal",
]

AUTH_MAGIC: Final = b"P2PA"
DIGEST_BYTES: Final = 32
NONCE_BYTES: Final = 16
MAC_BYTES: Final = 32
_TRAILER: Final = struct.Struct(
    f"<4s{PUBLIC_KEY_BYTES}sd{NONCE_BYTES}s{SIGNATURE_BYTES}s{MAC_BYTES}s"
)
TRAILER_BYTES: Final = _TRAILER.size
_NO_MAC: Final = bytes(MAC_BYTES)
_SEAL_DOMAIN: Final = b"p2pml-seal-v1\x00"
_ADMIT_DOMAIN: Final = b"p2pml-admit-v1\x00"
MIN_RUN_KEY_BYTES: Final = 16
DEFAULT_MAX_SKEW_S: Final = 120.0
DEFAULT_MAX_NONCES: Final = 1 << 16


class Digest(Protocol):
    """An incremental hash: feed it chunks, then read the digest."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def new_digest() -> Digest:
    """A fresh BLAKE3 hasher for a frame's bytes (32-byte digest)."""
    return blake3.blake3()


def parse_public_key(text: str) -> bytes:
    """A raw Ed25519 public key from its 64 hex digits.

    Raises:
        ValueError: naming what was received, when it is not 64 hex digits.
    """
    cleaned = text.strip().lower()
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raw = b""
    if len(raw) != PUBLIC_KEY_BYTES:
        shown = cleaned if len(cleaned) <= 20 else cleaned[:17] + "..."
        raise ValueError(f"expected {2 * PUBLIC_KEY_BYTES} hex digits, received {shown!r}")
    return raw


@dataclass(frozen=True, slots=True)
class Admission:
    """Who may take part in a run. Neither a key nor a list: open.

    Attributes:
        run_key: the HMAC key derived from the run's shared secret (see `from_secret`).
        allowed_keys: raw public keys allowed in the run, or None for any key.
    """

    run_key: bytes | None = None
    allowed_keys: frozenset[bytes] | None = None

    @property
    def is_open(self) -> bool:
        return self.run_key is None and self.allowed_keys is None

    def describe(self) -> str:
        """How the run is closed, for logs: 'open', 'run key', 'allowlist of 3 keys', ..."""
        parts = []
        if self.run_key is not None:
            parts.append("run key")
        if self.allowed_keys is not None:
            parts.append(f"allowlist of {len(self.allowed_keys)} keys")
        return " and ".join(parts) or "open"

    @staticmethod
    def derive_key(secret: bytes) -> bytes:
        """The HMAC key of a run secret (so the secret itself is never used as a key)."""
        return hashlib.blake2b(secret, digest_size=32, person=b"p2pml-run-key").digest()

    @classmethod
    def load(cls, *, run_key: str | None, allow_keys: Path | None) -> Admission:
        """The admission of ``--run-key`` and ``--allow-keys``.

        `run_key` is the secret itself, or ``@PATH`` for a file holding it (first line, at least
        16 bytes). The allowlist file holds one public key per line in hex (as `p2pml keys`
        prints it); blank lines and ``#`` comments are skipped.

        Raises:
            ConfigError: naming the flag, the file and line, and what was wrong.
        """
        key = None
        if run_key is not None:
            secret = run_key.encode()
            shown = "(the secret given)"
            if run_key.startswith("@"):
                path = Path(run_key[1:])
                shown = run_key
                try:
                    secret = path.read_bytes().split(b"\n", 1)[0].strip()
                except OSError as exc:
                    raise ConfigError(
                        "--run-key", run_key, f"a readable file ({exc.strerror})"
                    ) from None
            if len(secret) < MIN_RUN_KEY_BYTES:
                raise ConfigError(
                    "--run-key",
                    shown,
                    f"a secret of at least {MIN_RUN_KEY_BYTES} bytes (received {len(secret)})",
                )
            key = cls.derive_key(secret)
        allowed = None
        if allow_keys is not None:
            try:
                lines = allow_keys.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    "--allow-keys", str(allow_keys), f"a readable file ({why})"
                ) from None
            keys = set()
            for number, line in enumerate(lines, start=1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                try:
                    keys.add(parse_public_key(text.split()[0]))
                except ValueError as exc:
                    raise ConfigError(
                        "--allow-keys", f"{allow_keys}:{number}", f"a public key in hex ({exc})"
                    ) from None
            if not keys:
                raise ConfigError("--allow-keys", str(allow_keys), "at least one public key")
            allowed = frozenset(keys)
        return cls(key, allowed)

    def proof(self, public_key: bytes, data: bytes) -> bytes:
        """What a member shows to prove it holds the run key, over `data` (zeros in runs
        without a key)."""
        if self.run_key is None:
            return _NO_MAC
        return hmac.new(self.run_key, _ADMIT_DOMAIN + public_key + data, "sha256").digest()

    def is_admitted(self, public_key: bytes, data: bytes, proof: bytes) -> bool:
        """Whether the holder of `public_key` may take part, given its `proof` over `data`."""
        if self.allowed_keys is not None and public_key not in self.allowed_keys:
            return False
        if self.run_key is not None:
            return hmac.compare_digest(self.proof(public_key, data), proof)
        return True


@dataclass(frozen=True, slots=True)
class Seal:
    """A parsed trailer."""

    public_key: bytes
    timestamp_s: float
    nonce: bytes
    signature: bytes
    mac: bytes

    @classmethod
    def parse(cls, trailer: bytes | memoryview) -> Seal:
        """Raises WireFormatError when `trailer` is not one."""
        if len(trailer) != TRAILER_BYTES:
            raise WireFormatError(f"seal: expected {TRAILER_BYTES} bytes, received {len(trailer)}")
        magic, key, stamp, nonce, signature, mac = _TRAILER.unpack(trailer)
        if magic != AUTH_MAGIC:
            raise WireFormatError(f"seal: expected magic {AUTH_MAGIC!r}, received {magic!r}")
        return cls(key, stamp, nonce, signature, mac)

    def signed_bytes(self, digest: bytes) -> bytes:
        return _signed(digest, self.timestamp_s, self.nonce)


def _signed(digest: bytes, timestamp_s: float, nonce: bytes) -> bytes:
    return _SEAL_DOMAIN + struct.pack("<d", timestamp_s) + nonce + digest


def seal(
    key: NodeKey, admission: Admission, digest: bytes, *, now_unix_s: float, nonce: bytes
) -> bytes:
    """The trailer that closes a frame whose bytes hash to `digest` (`nonce`: 16 random bytes)."""
    if len(digest) != DIGEST_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("seal: a 32-byte digest and a 16-byte nonce are required")
    signed = _signed(digest, now_unix_s, nonce)
    mac = admission.proof(key.public_key, signed)
    return _TRAILER.pack(AUTH_MAGIC, key.public_key, now_unix_s, nonce, key.sign(signed), mac)


class ReplayGuard:
    """Checks seals against the clock, the sender, the run's admission and the nonces seen.

    Refusals (`Refused`, by code): ``bad_seal`` (no trailer or a malformed one), ``clock_skew``
    (timestamp out of the window), ``forged`` (the key is not the sender's or the signature does
    not verify), ``not_admitted`` (a key outside the run, or a wrong run-key proof), ``replayed``
    (a nonce seen before, or older than the nonces this guard still remembers).
    """

    def __init__(
        self,
        admission: Admission,
        *,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        max_nonces: int = DEFAULT_MAX_NONCES,
    ) -> None:
        if not math.isfinite(max_skew_s) or max_skew_s <= 0:
            raise ConfigError("max_skew_s", max_skew_s, "a finite number > 0")
        if max_nonces < 1:
            raise ConfigError("max_nonces", max_nonces, "an integer >= 1")
        self.admission = admission
        self.max_skew_s = max_skew_s
        self.max_nonces = max_nonces
        self._seen: dict[bytes, float] = {}  # nonce -> timestamp
        self._by_stamp: list[tuple[float, bytes]] = []  # a heap: the oldest stamp first
        self._floor_s = -math.inf  # frames stamped at or before this are refused

    def __len__(self) -> int:
        return len(self._seen)

    def check(
        self, trailer: bytes | memoryview, digest: bytes, *, sender: PeerId, now_unix_s: float
    ) -> Seal:
        """The seal of a frame from `sender` whose other bytes hash to `digest`.

        Raises:
            Refused: with the codes of the class docstring.
        """
        try:
            sealed = Seal.parse(trailer)
        except WireFormatError as exc:
            raise Refused("bad_seal", str(exc)) from None
        who = sender.hex()[:8]
        stamp = sealed.timestamp_s
        if not math.isfinite(stamp) or abs(stamp - now_unix_s) > self.max_skew_s:
            raise Refused(
                "clock_skew",
                f"frame from {who} stamped {stamp - now_unix_s:+.1f} s from this node's clock; "
                f"at most {self.max_skew_s:.0f} s is allowed",
            )
        signed = sealed.signed_bytes(digest)
        try:
            verify_signature(sender, sealed.public_key, signed, sealed.signature)
        except WireFormatError as exc:
            raise Refused("forged", f"frame from {who}: {exc}") from None
        if not self.admission.is_admitted(sealed.public_key, signed, sealed.mac):
            raise Refused(
                "not_admitted",
                f"frame from {who}: key {sealed.public_key.hex()[:16]} is not admitted to this "
                f"run ({self.admission.describe()})",
            )
        self._remember(sealed, who, now_unix_s)
        return sealed

    def _remember(self, sealed: Seal, who: str, now_unix_s: float) -> None:
        horizon = now_unix_s - self.max_skew_s
        while self._by_stamp and self._by_stamp[0][0] < horizon:  # out of the window for good
            _, nonce = heapq.heappop(self._by_stamp)
            del self._seen[nonce]
        if sealed.nonce in self._seen:
            raise Refused("replayed", f"frame from {who}: nonce {sealed.nonce.hex()} seen before")
        if sealed.timestamp_s <= self._floor_s:
            raise Refused(
                "replayed",
                f"frame from {who}: stamped before the oldest nonce this node still remembers "
                f"(too many frames within {self.max_skew_s:.0f} s to tell)",
            )
        self._seen[sealed.nonce] = sealed.timestamp_s
        heapq.heappush(self._by_stamp, (sealed.timestamp_s, sealed.nonce))
        if len(self._seen) > self.max_nonces:  # forget the oldest stamp; refuse anything older
            stamp, nonce = heapq.heappop(self._by_stamp)
            del self._seen[nonce]
            self._floor_s = max(self._floor_s, stamp)


class Authenticator:
    """One node's side of the seal: it seals what the node sends and checks what it receives.

    Args:
        key: the node's identity key, which signs.
        admission: who may take part in the run; the node's own proof comes from it too.
    """

    def __init__(
        self,
        key: NodeKey,
        admission: Admission | None = None,
        *,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        max_nonces: int = DEFAULT_MAX_NONCES,
    ) -> None:
        self.key = key
        self.admission = admission or Admission()
        self.guard = ReplayGuard(self.admission, max_skew_s=max_skew_s, max_nonces=max_nonces)

    def seal(self, digest: bytes, *, now_unix_s: float, nonce: bytes) -> bytes:
        """The trailer of a frame that hashes to `digest`."""
        return seal(self.key, self.admission, digest, now_unix_s=now_unix_s, nonce=nonce)

    def check(
        self, trailer: bytes | memoryview, digest: bytes, *, sender: PeerId, now_unix_s: float
    ) -> Seal:
        """Check a received frame's trailer (see `ReplayGuard.check`); raises `Refused`."""
        return self.guard.check(trailer, digest, sender=sender, now_unix_s=now_unix_s)
