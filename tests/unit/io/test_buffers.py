from __future__ import annotations

import numpy as np

from p2pml.io.buffers import ReceiveBufferPool

MB = 1 << 20


def test_pool_reuses_a_buffer_once_no_view_of_it_is_alive():
    pool = ReceiveBufferPool(64 * MB)
    first = pool.acquire(4 * MB)
    address = first.ctypes.data
    del first
    second = pool.acquire(3 * MB)
    assert second.ctypes.data == address
    assert (pool.n_allocated, pool.n_reused) == (1, 1)


def test_pool_never_hands_out_a_buffer_whose_view_is_still_held():
    pool = ReceiveBufferPool(64 * MB)
    held = pool.acquire(4 * MB)
    held[:] = 7
    decoded = np.frombuffer(held, dtype=np.float32)  # a message decoded over the buffer
    del held
    other = pool.acquire(4 * MB)
    other[:] = 0
    assert not np.shares_memory(other, decoded)
    assert np.all(decoded.view(np.uint8) == 7)


def test_small_requests_are_not_pooled():
    pool = ReceiveBufferPool(64 * MB)
    pool.acquire(1000)
    assert pool.pooled_bytes == 0


def test_pool_stays_within_its_byte_cap():
    pool = ReceiveBufferPool(10 * MB)
    held = [pool.acquire(4 * MB) for _ in range(4)]
    assert pool.pooled_bytes <= 10 * MB
    assert all(h.nbytes == 4 * MB for h in held)
    del held
    pool.acquire(9 * MB)
    assert pool.pooled_bytes <= 10 * MB


def test_pool_with_zero_bytes_never_keeps_buffers():
    pool = ReceiveBufferPool(0)
    pool.acquire(8 * MB)
    assert pool.pooled_bytes == 0
