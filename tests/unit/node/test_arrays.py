"""Numpy models for EmbeddedNode: manifests, checking updates, combining deltas, the held model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError
from p2pml.node.arrays import HeldModel, as_blobs, combine, numpy_manifest
from p2pml.protocol.messages import TensorBlob

MANIFEST = numpy_manifest(
    "arrays", {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, {"lr": 0.1}
)
SPECS = MANIFEST.params


def contribution(step: int, sender: int, seed: int):
    rng = np.random.default_rng(seed)
    values = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in SPECS}
    return step, PeerId(bytes([sender]) * 20), as_blobs(values, SPECS)


def test_numpy_manifest_lists_names_dtypes_and_shapes_in_order():
    assert [(s.name, s.dtype, s.shape) for s in SPECS] == [
        ("w", "float32", (2, 3)),
        ("b", "float32", (3,)),
    ]


def test_as_blobs_orders_by_the_manifest_and_casts_within_a_kind():
    blobs = as_blobs({"b": np.ones(3, np.float64), "w": np.ones((2, 3), np.float32)}, SPECS)
    assert [b.name for b in blobs] == ["w", "b"]
    assert all(b.dtype_name == "float32" for b in blobs)


BAD_UPDATES = {
    "missing name": ({"w": np.zeros((2, 3), np.float32)}, "parameters"),
    "wrong shape": ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "shape"),
    "complex dtype": ({"w": np.zeros((2, 3), np.complex64), "b": np.zeros(3)}, "dtype"),
    "NaN": ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3)}, "finite"),
}


@pytest.mark.parametrize("case", BAD_UPDATES)
def test_as_blobs_refuses_an_update_that_does_not_fit(case):
    values, match = BAD_UPDATES[case]
    with pytest.raises(ConfigError, match=match):
        as_blobs(values, SPECS)


def test_as_blobs_refuses_a_parameter_given_twice():
    blob = TensorBlob.of("b", np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="once"):
        as_blobs([TensorBlob.of("w", np.zeros((2, 3), np.float32)), blob, blob], SPECS)


def test_combine_is_the_weighted_sum_with_the_same_bits_in_any_input_order():
    parts = [contribution(0, s, seed=s) for s in (3, 1, 2)]
    results = [combine(list(order), SPECS, 1 / 3) for order in itertools.permutations(parts)]
    for result in results[1:]:
        assert all(np.array_equal(result[k], results[0][k]) for k in ("w", "b"))
    expected = sum(p[2][1].array.astype(np.float64) for p in parts) / 3
    np.testing.assert_allclose(results[0]["b"], expected, rtol=1e-6)


def test_held_model_applies_changes_and_averages_with_a_peer():
    held = HeldModel(as_blobs({"w": np.zeros((2, 3)), "b": np.zeros(3)}, SPECS))
    change = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    held.apply(change, 1)
    peer = as_blobs({"w": np.full((2, 3), 3.0), "b": np.full(3, 5.0)}, SPECS)
    change = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    held.apply(change, 2, peer=peer)
    params = held.copy()
    assert np.array_equal(params["w"], np.full((2, 3), 2.5, np.float32))  # (1 + 1 + 3) / 2
    assert np.array_equal(params["b"], np.full(3, 3.5, np.float32))  # (1 + 1 + 5) / 2
    assert np.array_equal(change["b"], np.full(3, 2.5, np.float32))  # the caller adds the same
