"""Model files: the parameters in p2pml's own wire format (never pickle), written atomically.

A model file is one ``ModelReply`` frame (``protocol/wire.py``): a msgpack header naming the run
tag, the step and each tensor's name, dtype and shape, then the raw little-endian tensor bytes. It
is read back with the same strict decoder that guards the network, so a truncated or corrupt file
is refused with a message naming what is wrong; ``numpy.frombuffer`` over the file's bytes gives the
tensors without parsing them element by element.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError, WireFormatError
from p2pml.protocol.messages import ModelReply, TensorBlob
from p2pml.protocol.wire import WireLimits, decode_message, encode_frames

__all__ = ["SavedModel", "load_model", "save_model"]

_NO_SENDER = PeerId(bytes(20))
_FILE_LIMITS = WireLimits(max_message_bytes=1 << 40)


@dataclass(frozen=True, slots=True)
class SavedModel:
    """A model file's contents."""

    run_tag: str
    step: int
    tensors: tuple[TensorBlob, ...]


def save_model(path: Path, run_tag: str, step: int, tensors: Sequence[TensorBlob]) -> None:
    """Write the model to `path` atomically: a temporary file, fsync, rename, fsync the folder.

    Raises:
        ConfigError: naming `path` when it cannot be written.
    """
    msg = ModelReply(run_tag, _NO_SENDER, step, step, tuple(tensors))
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
    return SavedModel(msg.run_id, msg.step, msg.tensors)
