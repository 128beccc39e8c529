"""Model files and checkpoints: tensors in p2pml's own wire format (never pickle), written
atomically and checksummed.

A model file is one ``ModelReply`` frame (``protocol/wire.py``): a msgpack header naming the run
tag, the step and each tensor's name, dtype and shape, then the raw little-endian tensor bytes;
then a trailer, ``P2PMSUM1`` and the 32-byte BLAKE2b digest of the frame. It is read back with the
same strict decoder that guards the network, so a truncated file is refused with a message naming
what is wrong, and a file whose bytes changed on disk fails its checksum; ``numpy.frombuffer`` over
the file's bytes gives the tensors without parsing them element by element. (Files written before
the trailer existed are read without a checksum.)

A checkpoint folder holds numbered model files (``<prefix>-<version>.p2pml``); `save_checkpoint`
adds one and keeps the newest few, and `load_latest` / `find_checkpoint` return the newest that
reads back whole, belongs to the run and passes the caller's check, falling back past corrupt,
partial or foreign ones with a warning that names each file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError, P2PMLError, WireFormatError
from p2pml.protocol.messages import ModelReply, TensorBlob
from p2pml.protocol.wire import WireLimits, decode_message, encode_frames

__all__ = [
    "CheckpointCheck",
    "SavedModel",
    "find_checkpoint",
    "load_latest",
    "load_model",
    "save_checkpoint",
    "save_model",
]

log = logging.getLogger(__name__)

_NO_SENDER = PeerId(bytes(20))
# A local file may hold more and longer-named tensors than a network message (a checkpoint holds
# the optimiser's state beside the parameters).
_FILE_LIMITS: Final = WireLimits(
    max_message_bytes=1 << 40,
    max_header_bytes=1 << 28,
    max_tensors=1 << 20,
    max_tensor_elements=1 << 40,
    max_name_chars=4096,
)
_SUM_MAGIC: Final = b"P2PMSUM1"
_SUM_BYTES: Final = 32
_TRAILER_BYTES: Final = len(_SUM_MAGIC) + _SUM_BYTES
_MAX_REASONS: Final = 5

CheckpointCheck = Callable[["SavedModel"], None]
"""Raises a `P2PMLError` saying why a checkpoint that reads back whole is still unusable."""


@dataclass(frozen=True, slots=True)
class SavedModel:
    """A model file's contents."""

    run_tag: str
    step: int
    tensors: tuple[TensorBlob, ...]
    version: int = 0


def _check_fits(path: Path, tensors: Sequence[TensorBlob]) -> None:
    """Refuse to write what `load_model` would refuse to read."""
    if len(tensors) > _FILE_LIMITS.max_tensors:
        raise ConfigError("save", str(path), f"at most {_FILE_LIMITS.max_tensors} tensors")
    for blob in tensors:
        if len(blob.name) > _FILE_LIMITS.max_name_chars:
            raise ConfigError(
                "save", blob.name, f"tensor names of at most {_FILE_LIMITS.max_name_chars} chars"
            )


def save_model(
    path: Path,
    run_tag: str,
    step: int,
    tensors: Sequence[TensorBlob],
    *,
    version: int | None = None,
) -> None:
    """Write the model to `path` atomically: a temporary file, fsync, rename, fsync the folder.

    Raises:
        ConfigError: naming `path` when it cannot be written.
    """
    _check_fits(path, tensors)
    number = step if version is None else version
    msg = ModelReply(run_tag, _NO_SENDER, number, step, tuple(tensors))
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as err:
        raise ConfigError("save", str(path), f"a writable path ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            digest = hashlib.blake2b(digest_size=_SUM_BYTES)
            for frame in encode_frames(msg):
                handle.write(frame)
                digest.update(frame)
            handle.write(_SUM_MAGIC + digest.digest())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a folder gone: the file is not written, say where
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError("save", str(path), f"a writable path ({err.strerror or err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise ConfigError("save", str(path), f"a writable path ({err.strerror or err})") from None


def _read(path: Path) -> bytearray:
    try:
        with path.open("rb") as handle:
            buf = bytearray(os.fstat(handle.fileno()).st_size)
            n_read = handle.readinto(buf)
    except OSError as err:
        raise ConfigError("model file", str(path), f"a readable file ({err.strerror})") from None
    del buf[n_read:]  # the file shrank while we read it
    return buf


def _frame(path: Path, buf: bytearray) -> memoryview:
    """The frame of the file's bytes, its checksum verified when it has one."""
    view = memoryview(buf)
    split = len(buf) - _TRAILER_BYTES
    if split < 0 or bytes(view[split : split + len(_SUM_MAGIC)]) != _SUM_MAGIC:
        return view  # no trailer: a file from before checksums (or a truncated one: decode says)
    want = bytes(view[split + len(_SUM_MAGIC) :])
    if hashlib.blake2b(view[:split], digest_size=_SUM_BYTES).digest() != want:
        raise ConfigError(
            "model file",
            str(path),
            "a whole p2pml model file (its checksum does not match its contents: the file is "
            "corrupt)",
        )
    return view[:split]


def load_model(path: Path) -> SavedModel:
    """Read a model file written by `save_model` (off the event loop: it reads and hashes the
    whole file).

    Raises:
        ConfigError: naming `path` when it is missing, unreadable, truncated, corrupt or not a
            model file.
    """
    buf = _read(path)
    frame = _frame(path, buf)
    try:
        msg = decode_message(frame, _FILE_LIMITS)
    except WireFormatError as err:
        raise ConfigError(
            "model file", str(path), f"a whole p2pml model file; it is truncated or corrupt: {err}"
        ) from None
    if not isinstance(msg, ModelReply):
        raise ConfigError("model file", str(path), f"a model, not a {type(msg).__name__}")
    return SavedModel(msg.run_id, msg.step, msg.tensors, msg.version)


def _numbered(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{1,18}})\.p2pml")
    try:
        names = list(folder.iterdir())
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ConfigError("checkpoint folder", str(folder), f"a readable folder ({err})") from None
    found = [(int(m.group(1)), p) for p in names if (m := pattern.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(
    folder: Path,
    prefix: str,
    run_tag: str,
    tensors: Sequence[TensorBlob],
    *,
    version: int,
    step: int,
    keep: int = 2,
) -> Path:
    """Write ``folder/<prefix>-<version>.p2pml`` atomically and delete all but the newest `keep`
    (never the one just written).

    Raises:
        ConfigError: naming the folder when it cannot be written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("checkpoint folder", str(folder), f"a writable folder ({err})") from None
    path = folder / f"{prefix}-{version:012d}.p2pml"
    save_model(path, run_tag, step, tensors, version=version)
    for _version, old in _numbered(folder, prefix)[keep:]:
        if old != path:
            try:
                old.unlink(missing_ok=True)
            except OSError as err:  # an old file that will not go is no reason to stop training
                log.warning("could not delete the old checkpoint %s: %s", old, err)
    return path


def _refusal(path: Path, run_tag: str, check: CheckpointCheck | None) -> SavedModel | str:
    """The checkpoint at `path`, or why it is refused."""
    try:
        saved = load_model(path)
    except ConfigError as err:
        return err.allowed
    if saved.run_tag != run_tag:
        return f"it is of run {saved.run_tag}, not {run_tag}"
    if check is not None:
        try:
            check(saved)
        except P2PMLError as err:
            return str(err)
    return saved


def _scan(
    folder: Path, prefix: str, run_tag: str, check: CheckpointCheck | None
) -> tuple[tuple[Path, SavedModel] | None, list[str]]:
    refused: list[str] = []
    for _version, path in _numbered(folder, prefix):
        outcome = _refusal(path, run_tag, check)
        if isinstance(outcome, SavedModel):
            return (path, outcome), refused
        log.warning("checkpoint %s refused, trying an older one: %s", path, outcome)
        refused.append(f"{path.name}: {outcome}")
    return None, refused


def load_latest(
    folder: Path, prefix: str, run_tag: str, *, check: CheckpointCheck | None = None
) -> tuple[Path, SavedModel] | None:
    """The newest checkpoint in `folder` that reads back whole, is of `run_tag` and passes
    `check`; a corrupt, partial, foreign or failing one is logged and skipped. None when there is
    none."""
    return _scan(folder, prefix, run_tag, check)[0]


def find_checkpoint(
    folder: Path, prefix: str, run_tag: str, *, check: CheckpointCheck | None = None
) -> tuple[Path, SavedModel]:
    """`load_latest`, for a caller that cannot go on without a checkpoint.

    Raises:
        ConfigError: naming `folder` when it holds no usable checkpoint: that it is missing or
            empty, or each file refused and why.
    """
    if not folder.is_dir():
        raise ConfigError("checkpoint folder", str(folder), "an existing folder of checkpoints")
    found, refused = _scan(folder, prefix, run_tag, check)
    if found is not None:
        return found
    if not refused:
        raise ConfigError(
            "checkpoint folder", str(folder), f"a folder holding {prefix}-<step>.p2pml checkpoints"
        )
    more = len(refused) - _MAX_REASONS
    reasons = "; ".join(refused[:_MAX_REASONS]) + (f"; and {more} more" if more > 0 else "")
    raise ConfigError(
        "checkpoint folder",
        str(folder),
        f"a usable {prefix}-<step>.p2pml checkpoint; all {len(refused)} were refused: {reasons}",
    )
