"""Shared fixtures and hypothesis profiles (quick by default; HYPOTHESIS_PROFILE=long for the long run)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import pvfast

settings.register_profile("quick", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=2000, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def host() -> pvfast.Host:
    return pvfast.Host()


@pytest.fixture(params=[True, False], ids=["fast", "slow"])
def any_host(request: pytest.FixtureRequest) -> pvfast.Host:
    """A host with and without the Destroy-Fast UVC."""
    return pvfast.Host(destroy_fast=request.param)


def enable(vm: pvfast.Vm) -> pvfast.PvResult:
    return vm.pv_command(pvfast.PvCmd.ENABLE)
