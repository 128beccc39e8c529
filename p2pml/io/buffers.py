"""Reusable receive buffers, so large bodies land in memory whose pages are already mapped.

A fresh 256 MB buffer costs a page fault per page on first touch, about as long as the transfer
itself on loopback. The pool hands out views of buffers it keeps; a buffer is free again once no
view of it is alive anywhere (nothing but the pool refers to it: CPython's reference count tells),
so a decoded message that the node still holds can never be overwritten.
"""

from __future__ import annotations

import sys
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["ReceiveBufferPool"]

# References to a pooled buffer while `acquire` inspects it: the pool's list, the loop variable
# and getrefcount's own argument.
_IDLE_REFS: Final = 3


class ReceiveBufferPool:
    """Up to `max_bytes` of reusable uint8 buffers; smaller requests than `min_pooled_bytes` are
    never pooled.

    Not thread-safe: use it from one event loop.
    """

    def __init__(self, max_bytes: int, *, min_pooled_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_pooled_bytes = min_pooled_bytes
        self._buffers: list[npt.NDArray[np.uint8]] = []
        self.n_reused = 0
        self.n_allocated = 0

    @property
    def pooled_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def acquire(self, n_bytes: int) -> npt.NDArray[np.uint8]:
        """A writable uint8 array of `n_bytes`; its contents are undefined."""
        if n_bytes < self.min_pooled_bytes:
            return np.empty(n_bytes, dtype=np.uint8)
        best: npt.NDArray[np.uint8] | None = None
        for buf in self._buffers:
            fits = buf.nbytes >= n_bytes and (best is None or buf.nbytes < best.nbytes)
            if fits and sys.getrefcount(buf) == _IDLE_REFS:
                best = buf
        if best is not None:
            self.n_reused += 1
            return best[:n_bytes]
        self.n_allocated += 1
        fresh = np.empty(n_bytes, dtype=np.uint8)
        self._evict_idle(self.max_bytes - n_bytes)
        if self.pooled_bytes + n_bytes <= self.max_bytes:
            self._buffers.append(fresh)
        return fresh

    def _evict_idle(self, keep_bytes: int) -> None:
        """Drop idle buffers, largest first, until the pool holds at most `keep_bytes`."""
        for buf in sorted(self._buffers, key=lambda b: -b.nbytes):
            if self.pooled_bytes <= keep_bytes:
                return
            if sys.getrefcount(buf) == _IDLE_REFS + 1:  # + the sorted() list
                self._buffers = [b for b in self._buffers if b is not buf]
