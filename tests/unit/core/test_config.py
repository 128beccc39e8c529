from __future__ import annotations

import math

import pytest

from p2pml.core.config import SimConfig, StepTimeConfig
from p2pml.errors import ConfigError


def test_sim_config_defaults_are_the_published_baseline():
    cfg = SimConfig().validate()
    assert (cfg.nodes, cfg.duration_s, cfg.sample, cfg.staleness) == (200, 200.0, 10, 4)
    assert (cfg.step_time.dist, cfg.step_time.mean_s, cfg.poll_s) == ("exponential", 0.5, None)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"nodes": 0}, "nodes"),
        ({"nodes": True}, "nodes"),
        ({"duration_s": 0.0}, "duration_s"),
        ({"duration_s": math.inf}, "duration_s"),
        ({"barrier": "foo"}, "barrier"),
        ({"sample": -1}, "sample"),
        ({"staleness": -1}, "staleness"),
        ({"straggler_fraction": 1.5}, "straggler_fraction"),
        ({"straggler_slowdown": 0.5}, "straggler_slowdown"),
        ({"check_delay_s": -0.1}, "check_delay_s"),
        ({"poll_s": 0.0}, "poll_s"),
        ({"poll_s": math.nan}, "poll_s"),
        ({"engine": "turbo"}, "engine"),
        ({"step_time": StepTimeConfig(dist="weibull")}, "step_time.dist"),
        ({"step_time": StepTimeConfig(mean_s=-1.0)}, "step_time.mean_s"),
        ({"step_time": StepTimeConfig(shape=0.0)}, "step_time.shape"),
    ],
)
def test_sim_config_validate_names_the_bad_field(changes, field):
    with pytest.raises(ConfigError) as info:
        SimConfig(**changes).validate()
    assert info.value.field == field
    assert f"{field}: got" in str(info.value)
