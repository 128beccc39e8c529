"""Numpy models for `EmbeddedNode`: a manifest from arrays, checking a caller's update, combining
a step's deltas by the rules of DESIGN.md §5, and the node's own copy of the model.

No torch here: an edge program trains with numpy alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pml.core.run import HyperValue, RunManifest, TensorSpec
from p2pml.core.types import PeerId
from p2pml.errors import ConfigError
from p2pml.protocol.messages import DTYPES, TensorBlob

__all__ = [
    "Contribution",
    "HeldModel",
    "Params",
    "Update",
    "as_blobs",
    "combine",
    "numpy_manifest",
]

Params = dict[str, npt.NDArray[Any]]
"""Parameters or changes by name, in the manifest's order."""
Update = Sequence[TensorBlob] | Mapping[str, npt.ArrayLike]
"""One array per parameter of the manifest, by name (or as `TensorBlob`s)."""
Contribution = tuple[int, PeerId, tuple[TensorBlob, ...]]
"""An update to combine: (its step, its sender, its tensors in the manifest's order)."""


def numpy_manifest(
    run_id: str,
    params: Mapping[str, npt.ArrayLike],
    hyperparameters: Mapping[str, HyperValue] | None = None,
) -> RunManifest:
    """The run manifest of a model held as numpy arrays, in the mapping's order.

    Raises:
        ConfigError: for a bad run ID, an unsupported dtype or no parameters.
    """
    blobs = [TensorBlob.of(name, value) for name, value in params.items()]
    specs = [TensorSpec(b.name, b.dtype_name, tuple(b.array.shape)) for b in blobs]
    return RunManifest.build(run_id, hyperparameters or {}, specs)


def as_blobs(
    values: Update, specs: Sequence[TensorSpec], *, what: str = "update"
) -> tuple[TensorBlob, ...]:
    """`values` as blobs in the manifest's order, cast to its dtypes (same-kind casts only).

    Raises:
        ConfigError: for missing or extra names, a wrong shape or dtype, or NaN or infinity.
    """
    if isinstance(values, Mapping):
        arrays: dict[str, npt.ArrayLike] = dict(values)
    else:
        arrays = {blob.name: blob.array for blob in values}
        if len(arrays) != len(values):
            raise ConfigError(what, [b.name for b in values], "each parameter once")
    names = [spec.name for spec in specs]
    if set(arrays) != set(names):
        raise ConfigError(what, sorted(arrays), f"the parameters {names}")
    return tuple(_as_blob(arrays[spec.name], spec, what) for spec in specs)


def _as_blob(value: npt.ArrayLike, spec: TensorSpec, what: str) -> TensorBlob:
    array = np.asarray(value)
    field = f"{what}[{spec.name!r}]"
    if array.shape != spec.shape:
        raise ConfigError(field, f"shape {array.shape}", f"shape {spec.shape}")
    try:
        array = array.astype(DTYPES[spec.dtype], casting="same_kind", copy=False)
    except TypeError:
        raise ConfigError(field, f"dtype {array.dtype}", f"{spec.dtype} (or same kind)") from None
    if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
        raise ConfigError(field, "NaN or infinite values", "finite values")
    return TensorBlob.of(spec.name, array)


def combine(
    contributions: Sequence[Contribution], specs: Sequence[TensorSpec], weight: float
) -> Params:
    """`weight` times the sum of the contributions, tensor by tensor.

    Contributions are summed in (step, sender) order, so every node holding the same ones gets
    the same bits; floating-point parameters accumulate in their own dtype, others in float64.
    """
    ordered = sorted(contributions, key=lambda c: (c[0], c[1]))
    out: Params = {}
    for i, spec in enumerate(specs):
        dtype = DTYPES[spec.dtype]
        total = np.zeros(spec.shape, dtype if dtype.kind == "f" else np.float64)
        for _, _, tensors in ordered:
            np.add(total, tensors[i].array, out=total)
        np.multiply(total, weight, out=total)
        out[spec.name] = total
    return out


class HeldModel:
    """The node's copy of the caller's model, kept in step with `step()`'s changes to serve peers
    that join later (a `ModelSource`). Changed in the caller's thread and copied for a peer in a
    worker thread, both under one lock."""

    def __init__(self, blobs: Sequence[TensorBlob]) -> None:
        self._lock = threading.Lock()
        self._arrays = {b.name: b.array.copy() for b in blobs}
        self._version = 0

    def apply(
        self, change: Params, version: int, *, peer: Sequence[TensorBlob] | None = None
    ) -> None:
        """Add `change`; with a `peer` model (gossip), first extend `change` in place so that
        the result is the mean of the changed model and the peer's."""
        with self._lock:
            if peer is not None:
                for blob in peer:
                    mine = np.add(self._arrays[blob.name], change[blob.name])
                    gap = np.multiply(np.subtract(blob.array, mine), 0.5)
                    np.add(change[blob.name], gap, out=change[blob.name], casting="unsafe")
            for name, array in self._arrays.items():
                np.add(array, change[name], out=array, casting="unsafe")
            self._version = version

    def replace(self, arrays: Params, version: int) -> None:
        with self._lock:
            for name, array in self._arrays.items():
                array[...] = arrays[name]
            self._version = version

    def copy(self) -> Params:
        with self._lock:
            return {name: array.copy() for name, array in self._arrays.items()}

    def _blobs(self) -> tuple[int, tuple[TensorBlob, ...]]:
        with self._lock:
            blobs = tuple(TensorBlob(n, a.copy()) for n, a in self._arrays.items())
            return self._version, blobs

    async def snapshot(self) -> tuple[int, tuple[TensorBlob, ...]]:
        return await asyncio.to_thread(self._blobs)
