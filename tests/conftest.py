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


def unexplained_leaks(host: pvfast.Host) -> list[dict]:
    """Leak-ledger entries that no documented cause explains. Besides injected UV failures (the
    caller knows about those), the one kernel behaviour that leaks is the race of the mm-release
    notifier's Destroy-Fast with VM destroy's cleanup-all (docs/KERNEL.md): it leaves the top
    table its failed Destroy Config replaced, listed in ``host.races()``."""
    residue = {addr for race in host.races() for addr in race["leaked"]}
    return [dict(e) for e in host.leaked() if e["addr"] not in residue]


def race_residue_bytes(host: pvfast.Host) -> int:
    """Kernel memory the races of ``host.races()`` left allocated (16 KiB per top table)."""
    residue = {addr for race in host.races() for addr in race["leaked"]}
    return sum(e["size"] for e in host.leaked() if e["addr"] in residue)
