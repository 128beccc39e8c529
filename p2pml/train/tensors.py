"""Between torch and the wire: parameter specs, run manifests and `TensorBlob` conversion.

Only a model's parameters travel (buffers such as batch-norm statistics stay local). Tensors cross
as numpy views of their memory; the dtypes allowed are the wire's floating-point ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import torch

from p2pml.core.run import HyperValue, RunManifest, TensorSpec
from p2pml.errors import ConfigError
from p2pml.protocol.messages import TensorBlob

__all__ = ["load_blobs", "param_specs", "run_manifest", "to_blobs"]

WIRE_DTYPES: Final = {
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def param_specs(model: torch.nn.Module) -> tuple[TensorSpec, ...]:
    """The model's trainable parameters as (name, wire dtype, shape), in registration order.

    Raises:
        ConfigError: for a parameter whose dtype the wire does not carry (bfloat16, say).
    """
    specs = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        dtype = WIRE_DTYPES.get(param.dtype)
        if dtype is None:
            raise ConfigError(
                f"parameter {name} dtype", str(param.dtype), ", ".join(WIRE_DTYPES.values())
            )
        specs.append(TensorSpec(name, dtype, tuple(param.shape)))
    if not specs:
        raise ConfigError("model", type(model).__name__, "a model with trainable parameters")
    return tuple(specs)


def run_manifest(
    run_id: str, model: torch.nn.Module, hyperparameters: Mapping[str, HyperValue]
) -> RunManifest:
    """The manifest every node of the run must share: `hyperparameters` and the model's specs."""
    return RunManifest.build(run_id, hyperparameters, param_specs(model))


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def to_blobs(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[TensorBlob, ...]:
    """Wrap CPU tensors as blobs that view their memory (the caller must not change them)."""
    return tuple(TensorBlob.of(name, t.detach().contiguous().numpy()) for name, t in named)


def as_tensor(blob: TensorBlob) -> torch.Tensor:
    """A tensor over the blob's memory (copied only if that memory is read-only)."""
    array = blob.array
    if array.flags.writeable:
        return torch.from_numpy(array)
    return torch.tensor(array)


def load_blobs(
    params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    blobs: Sequence[TensorBlob],
) -> None:
    """Copy `blobs` into the parameters of the same names (checked by the caller beforehand)."""
    by_name = dict(params)
    with torch.no_grad():
        for blob in blobs:
            by_name[blob.name].copy_(as_tensor(blob))
