"""RunManifest validation and run tags, parse_run_tag, and NodeConfig.validate."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest

from p2pml.core.barrier import PsspParams, SspParams
from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig, RunManifest, TensorSpec, parse_run_tag
from p2pml.core.sampling import SampleSize
from p2pml.errors import ConfigError

HYPER = {"barrier": "pssp", "lr": 0.05, "staleness": 4, "nesterov": False, "note": None}
PARAMS = (
    TensorSpec("conv.weight", "float32", (32, 1, 5, 5)),
    TensorSpec("conv.bias", "float32", (32,)),
)
# Computed once from MANIFEST below; a change here means nodes of the old and new code no longer
# agree on the run tag.
EXPECTED_TAG = "mnist-psp@6f6a55a0a214d690"


def manifest(
    run_id: str = "mnist-psp",
    hyperparameters: dict[str, object] | None = None,
    params: tuple[TensorSpec, ...] = PARAMS,
) -> RunManifest:
    return RunManifest.build(run_id, HYPER if hyperparameters is None else hyperparameters, params)


# --- RunManifest.build ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run_id",
    [
        "",
        "a" * 97,
        "run 1",
        "run/1",
        "run@1",
        "run:1",
        "rün",
        "run\n",
        "-run",
        ".run",
        "_run",
        None,
    ],
)
def test_manifest_build_rejects_a_bad_run_id(run_id):
    with pytest.raises(ConfigError) as info:
        RunManifest.build(run_id, HYPER, PARAMS)
    assert info.value.field == "run_id"


@pytest.mark.parametrize("run_id", ["a", "7", "a" * 96, "Run-1.v2_x", "0-._"])
def test_manifest_build_accepts_a_good_run_id(run_id):
    assert manifest(run_id).run_id == run_id


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_manifest_build_rejects_a_non_finite_hyperparameter(bad):
    with pytest.raises(ConfigError) as info:
        manifest(hyperparameters={**HYPER, "lr": bad})
    assert info.value.field == "hyperparameter lr"


def test_manifest_build_rejects_an_empty_parameter_list():
    with pytest.raises(ConfigError) as info:
        manifest(params=())
    assert info.value.field == "model parameters"


def test_manifest_build_sorts_hyperparameters_by_name():
    assert [name for name, _ in manifest().hyperparameters] == sorted(HYPER)


def test_manifest_build_keeps_the_parameter_order():
    assert manifest().params == PARAMS


# --- tags and digests -------------------------------------------------------------------------


def test_manifest_tag_is_run_id_at_16_hex_digits():
    assert re.fullmatch(r"mnist-psp@[0-9a-f]{16}", manifest().tag)


def test_manifest_tag_is_stable():
    assert manifest().tag == EXPECTED_TAG


def test_manifest_digest_does_not_depend_on_hyperparameter_order():
    reordered = dict(reversed(list(HYPER.items())))
    assert list(reordered) != list(HYPER)
    assert manifest(hyperparameters=reordered).tag == manifest().tag


def test_manifest_digest_does_not_depend_on_the_run_id():
    assert manifest("other-run").digest == manifest().digest


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {**HYPER, "lr": 0.050001},
        {**HYPER, "staleness": 5},
        {**HYPER, "staleness": "4"},
        {**HYPER, "nesterov": True},
        {**HYPER, "note": ""},
        {**HYPER, "barrier": "ssp"},
        {**HYPER, "momentum": 0.9},
        {k: v for k, v in HYPER.items() if k != "note"},
    ],
)
def test_manifest_tag_changes_with_any_hyperparameter(hyperparameters):
    assert manifest(hyperparameters=hyperparameters).tag != manifest().tag


@pytest.mark.parametrize(
    "params",
    [
        (replace(PARAMS[0], shape=(32, 1, 5, 4)), PARAMS[1]),
        (replace(PARAMS[0], shape=(32, 5, 5)), PARAMS[1]),
        (replace(PARAMS[0], shape=(32, 5, 5, 1)), PARAMS[1]),
        (PARAMS[0], replace(PARAMS[1], dtype="float16")),
        (PARAMS[0], replace(PARAMS[1], name="conv.bias2")),
        (PARAMS[1], PARAMS[0]),
        PARAMS[:1],
        (*PARAMS, TensorSpec("fc.bias", "float32", (10,))),
    ],
)
def test_manifest_tag_changes_with_any_parameter(params):
    assert manifest(params=params).tag != manifest().tag


def test_manifest_hyper_and_params_digests_are_16_hex_digits():
    m = manifest()
    for digest in (m.hyper_digest, m.params_digest, m.digest):
        assert re.fullmatch(r"[0-9a-f]{16}", digest)


# --- mismatch ---------------------------------------------------------------------------------


def test_manifest_mismatch_is_none_for_the_same_tag():
    assert manifest().mismatch(EXPECTED_TAG) is None


def test_manifest_mismatch_names_both_runs_for_another_run_id():
    other = manifest("other-run").tag
    message = manifest().mismatch(other)
    assert message is not None
    assert "'other-run'" in message
    assert "'mnist-psp'" in message


def test_manifest_mismatch_mentions_the_manifest_for_another_digest():
    other = manifest(hyperparameters={**HYPER, "lr": 0.1}).tag
    message = manifest().mismatch(other)
    assert message is not None
    assert "manifest" in message
    assert parse_run_tag(other)[1] in message
    assert manifest().digest in message


def test_manifest_mismatch_without_a_digest_says_none():
    message = manifest().mismatch("mnist-psp")
    assert message is not None
    assert "manifest (none)" in message


# --- parse_run_tag ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("run-1@0123456789abcdef", ("run-1", "0123456789abcdef")),
        ("", ("", "")),
        ("run-1", ("run-1", "")),
        ("run-1@", ("run-1", "")),
        ("@0123456789abcdef", ("", "0123456789abcdef")),
    ],
)
def test_parse_run_tag_splits_id_and_digest(tag, expected):
    assert parse_run_tag(tag) == expected


def test_parse_run_tag_inverts_the_tag():
    m = manifest()
    assert parse_run_tag(m.tag) == (m.run_id, m.digest)


# --- NodeConfig.validate ----------------------------------------------------------------------


def test_node_config_defaults_validate():
    config = NodeConfig()
    assert config.validate() is config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"overlay": OverlayConfig(k=2)}, "k"),
        ({"data": DataPlaneConfig(chunk_bytes=0)}, "chunk_bytes"),
        ({"barrier": "gossip"}, "barrier"),
        ({"staleness": -1}, "staleness"),
        ({"staleness": 1.5}, "staleness"),
        ({"barrier": "ssp", "staleness": 0, "strict": True}, "staleness"),
        ({"min_peers": -1}, "min_peers"),
        ({"min_peers": True}, "min_peers"),
        ({"full_delivery_max": 0}, "full_delivery_max"),
        ({"fanout": 0}, "fanout"),
        ({"fanout": 2.0}, "fanout"),
        ({"average_every": -1}, "average_every"),
        ({"max_queued_deltas": 0}, "max_queued_deltas"),
        ({"misses_to_forget": 0}, "misses_to_forget"),
        ({"max_delta_age": -1}, "max_delta_age"),
        ({"max_delta_age": True}, "max_delta_age"),
        ({"max_delta_age": 1.0}, "max_delta_age"),
        ({"join_timeout_s": 0}, "join_timeout_s"),
        ({"recheck_s": -0.1}, "recheck_s"),
        ({"recheck_s": "0.1"}, "recheck_s"),
        ({"recheck_max_s": math.nan}, "recheck_max_s"),
        ({"barrier_timeout_s": math.inf}, "barrier_timeout_s"),
        ({"ack_timeout_s": 0.0}, "ack_timeout_s"),
        ({"discover_interval_s": -1}, "discover_interval_s"),
        ({"linger_s": -0.5}, "linger_s"),
        ({"linger_s": math.inf}, "linger_s"),
        ({"linger_s": math.nan}, "linger_s"),
    ],
)
def test_node_config_validate_rejects_a_bad_field(changes, field):
    with pytest.raises(ConfigError) as info:
        replace(NodeConfig(), **changes).validate()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: got ")


@pytest.mark.parametrize(
    "changes",
    [
        {"min_peers": 0},
        {"full_delivery_max": 1},
        {"fanout": 1},
        {"average_every": 0},
        {"max_queued_deltas": 1},
        {"misses_to_forget": 1},
        {"max_delta_age": 0},
        {"linger_s": 0},
        {"recheck_s": 1e-9},
        {"barrier": "asp", "staleness": 0, "strict": True},
        {"barrier": "ssp", "staleness": 1, "strict": True},
    ],
)
def test_node_config_validate_accepts_boundary_values(changes):
    replace(NodeConfig(), **changes).validate()


def test_node_config_params_leave_beta_to_the_sync_machine():
    assert NodeConfig().params() == PsspParams(sample=0, staleness=4)
    assert NodeConfig(barrier="ssp", staleness=2, strict=True).params() == SspParams(2, True)


@pytest.mark.parametrize(("max_delta_age", "expected"), [(None, 4), (0, 0), (7, 7)])
def test_node_config_delta_age_limit_defaults_to_the_staleness(max_delta_age, expected):
    assert NodeConfig(staleness=4, max_delta_age=max_delta_age).delta_age_limit == expected


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"recheck_s": True}, "recheck_s"),
        ({"linger_s": True}, "linger_s"),
        ({"recheck_s": 0.05, "recheck_max_s": 0.01}, "recheck_max_s"),
        ({"sample": SampleSize(count=-3)}, "sample"),
        ({"sample": SampleSize()}, "sample"),
        ({"strict": "no"}, "strict"),
    ],
)
def test_node_config_validate_rejects_what_would_fail_later(changes, field):
    with pytest.raises(ConfigError) as raised:
        replace(NodeConfig(), **changes).validate()
    assert raised.value.field == field


@pytest.mark.parametrize("value", [(1, 2), [1], {"a": 1}, object()])
def test_manifest_build_rejects_a_hyperparameter_that_is_not_a_scalar(value):
    with pytest.raises(ConfigError, match="hyperparameter x"):
        RunManifest.build("r", {"x": value}, [TensorSpec("w", "float32", (2,))])


@pytest.mark.parametrize(
    "spec", [TensorSpec("w", "bogus", (2,)), TensorSpec("w", "float32", (-1,))]
)
def test_manifest_build_rejects_a_bad_parameter_spec(spec):
    with pytest.raises(ConfigError, match="parameter w"):
        RunManifest.build("r", {}, [spec])


def test_manifest_mismatch_for_a_node_in_no_run_says_so():
    manifest = RunManifest.build("r", {}, [TensorSpec("w", "float32", (2,))])
    assert manifest.mismatch("") == "it is in no run, this node in run 'r'"
