from __future__ import annotations

import pytest
import torch

from p2pml.errors import ConfigError
from p2pml.train.models import MODELS, build_model

# conv 5×5×32 (832) + fc 4608→1024 (4,719,616) + linear 1024→10 (10,250): DESIGN's "4.73 M".
CNN_MNIST_PARAMETERS = 4_730_698


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)], ids=["mnist", "digits"])
def test_build_model_maps_a_batch_to_logits(name, shape):
    model = build_model(name, shape, 10, seed=0)
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


def test_build_model_mlp_takes_flat_features():
    assert build_model("mlp", (4,), 3, seed=0)(torch.zeros(5, 4)).shape == (5, 3)


def test_build_model_mlp_hidden_width_is_a_keyword():
    model = build_model("mlp", (4,), 3, hidden=7)
    assert n_parameters(model) == 4 * 7 + 7 + 7 * 3 + 3


def test_build_model_cnn_has_the_psp_experiment_parameter_count():
    assert n_parameters(build_model("cnn", (1, 28, 28), 10)) == CNN_MNIST_PARAMETERS


def test_build_model_with_a_seed_is_deterministic():
    first = build_model("cnn", (1, 8, 8), 10, seed=11).state_dict()
    second = build_model("cnn", (1, 8, 8), 10, seed=11).state_dict()
    other = build_model("cnn", (1, 8, 8), 10, seed=12).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_build_model_with_a_seed_leaves_the_global_rng_untouched():
    before = torch.get_rng_state()
    build_model("mlp", (1, 28, 28), 10, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_build_model_rejects_an_unknown_name():
    with pytest.raises(ConfigError, match="model: got 'resnet'; expected one of mlp, cnn"):
        build_model("resnet", (1, 28, 28), 10)


@pytest.mark.parametrize("shape", [(4,), (1, 5, 5), (28, 28)])
def test_build_model_cnn_rejects_inputs_it_cannot_convolve(shape):
    with pytest.raises(ConfigError, match="model: got 'cnn'; expected mlp for a data set"):
        build_model("cnn", shape, 3)


@pytest.mark.parametrize(
    ("shape", "n_classes", "field"),
    [((), 3, "input_shape"), ((0, 4), 3, "input_shape"), ((4,), 0, "n_classes")],
)
def test_build_model_rejects_bad_sizes(shape, n_classes, field):
    with pytest.raises(ConfigError, match=field):
        build_model("mlp", shape, n_classes)
