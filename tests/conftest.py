"""Shared fixtures and options: --run-slow, the seeded `rng`, hypothesis profiles."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng_seed(request: pytest.FixtureRequest) -> int:
    return int(os.environ.get("P2PML_TEST_SEED", "20261121"))


@pytest.fixture
def rng(rng_seed: int, request: pytest.FixtureRequest) -> random.Random:
    """A seeded rng; the seed is printed with a failing test's report (set P2PML_TEST_SEED)."""
    request.node.user_properties.append(("rng_seed", rng_seed))
    print(f"rng seed: {rng_seed}")
    return random.Random(rng_seed)
