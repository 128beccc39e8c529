"""Model files and checkpoints: parameters in p2pml's own wire format (never pickle), written
atomically.

A model file is one ``ModelReply`` frame (``protocol/wire.py``): a msgpack header naming the run
tag, the step and each tensor's name, dtype and shape, then the raw little-endian tensor bytes. It
is read back with the same strict decoder that guards the network, so a truncated or corrupt file
is refused with a message naming what is wrong; ``numpy.frombuffer`` over the file's bytes gives the
tensors without parsing them element by element.

A checkpoint folder holds numbered model files (``<prefix>-<version>.p2pml``); `save_checkpoint`
adds one and keeps the newest few, and `load_latest` returns the newest that reads back whole and
belongs to the run, falling back past corrupt or partial ones.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError, WireFormatError
from p2pml.protocol.messages import ModelReply, TensorBlob
from p2pml.protocol.wire import WireLimits, decode_message, encode_frames

__all__ = ["SavedModel", "load_latest", "load_model", "save_checkpoint", "save_model"]

log = logging.getLogger(__name__)

_NO_SENDER = PeerId(bytes(20))
_FILE_LIMITS = WireLimits(max_message_bytes=1 << 40)


@dataclass(frozen=True, slots=True)
class SavedModel:
    """A model file's contents."""

    run_tag: str
    step: int
    tensors: tuple[TensorBlob, ...]
    version: int = 0


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
    number = step if version is None else version
    msg = ModelReply(run_tag, _NO_SENDER, number, step, tuple(tensors))
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as err:
        raise ConfigError("save", str(path), f"a writable path ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            for frame in encode_frames(msg):
                handle.write(frame)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_model(path: Path) -> SavedModel:
    """Read a model file written by `save_model`.

    Raises:
        ConfigError: naming `path` when it is missing, unreadable, truncated or not a model file.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError("model file", str(path), f"a readable file ({err.strerror})") from None
    try:
        msg = decode_message(bytearray(data), _FILE_LIMITS)
    except WireFormatError as err:
        raise ConfigError("model file", str(path), f"a p2pml model file ({err})") from None
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
    """Write ``folder/<prefix>-<version>.p2pml`` atomically and delete all but the newest `keep`.

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
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path, prefix: str, run_tag: str) -> tuple[Path, SavedModel] | None:
    """The newest checkpoint in `folder` that reads back whole and is of `run_tag`; a corrupt,
    partial or foreign one is logged and skipped. None when there is none."""
    for _version, path in _numbered(folder, prefix):
        try:
            saved = load_model(path)
        except ConfigError as err:
            log.warning("checkpoint %s refused, trying an older one: %s", path, err)
            continue
        if saved.run_tag != run_tag:
            log.warning(
                "checkpoint %s is of run %s, not %s; trying an older one",
                path,
                saved.run_tag,
                run_tag,
            )
            continue
        return path, saved
    return None
