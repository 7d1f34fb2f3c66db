"""pvfast.testing: the pytest plugin (fixtures, markers), the QEMU-shaped VMM, the host checks,
kernel WARNs on the host; and the sample VMM suite under examples/, run in a subprocess."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import pvfast
from pvfast import PvCmd, Uvc
from pvfast.host import KernelWarning
from pvfast.testing import Qemu, assert_host_clean, assert_no_warnings, host_problems

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 1 << 30
MiB = 1 << 20


def test_the_plugin_is_registered_through_its_entry_point():
    points = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "pvfast"]
    assert [e.value for e in points] == ["pvfast.testing"], "reinstall: pip install -e ."


def test_the_sample_vmm_suite_passes():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/vmm_suite"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed is not None, out.stdout
    assert int(passed.group(1)) >= 9
    assert "failed" not in out.stdout
    assert "skipped" not in out.stdout


# ------------------------------------------------------------------ fixtures and markers


def test_pvfast_host_is_a_fresh_host(pvfast_host):
    assert isinstance(pvfast_host, pvfast.Host)
    assert pvfast_host.processes == []
    assert pvfast_host.module_params["async_destroy"] == 1


@pytest.mark.pvfast_host(async_destroy=0, destroy_fast=False)
def test_the_host_marker_sets_options(pvfast_host):
    assert pvfast_host.module_params["async_destroy"] == 0
    assert not pvfast_host.destroy_fast_available


@pytest.mark.parametrize("pvfast_host", [{"feature_misc": False}], indirect=True)
def test_the_host_takes_indirect_parameters(pvfast_host):
    assert not pvfast_host.feature_misc


@pytest.mark.pvfast_qemu(memory=8 * GiB, vcpus=3, dirty=4 * MiB)
def test_the_qemu_fixture_boots_a_protected_guest(pvfast_qemu, pvfast_vm, pvfast_host):
    assert pvfast_vm is pvfast_qemu.vm
    state = pvfast_vm.pv_state()
    assert state.protected
    assert len(state.vcpu_handles) == 3
    assert all(state.vcpu_handles)
    assert pvfast_vm.memory_size == 8 * GiB
    assert pvfast_host.uv.secure_pages(state.handle) >= 4 * MiB // 4096


def test_fixture_options_are_checked(tmp_path):
    (tmp_path / "test_opts.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.pvfast_host(bogus=1)
            def test_host(pvfast_host):
                pass

            @pytest.mark.pvfast_qemu(memroy=1)
            def test_qemu(pvfast_qemu):
                pass

            @pytest.mark.pvfast_host(kernel="6.2", guest_memory="state")
            def test_every_host_option(pvfast_host):
                assert pvfast_host.kernel == "6.2"

            HOSTS = []

            def test_leaves_qemu_running(pvfast_qemu, pvfast_host):
                HOSTS.append(pvfast_host)
                assert pvfast_qemu.alive

            def test_the_fixture_killed_it():
                from pvfast.testing import assert_host_clean

                (host,) = HOSTS
                assert_host_clean(host)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 1, out.stdout
    assert "unknown option(s) bogus" in out.stdout
    assert "unknown option(s) memroy" in out.stdout
    assert "2 error" in out.stdout
    assert "3 passed" in out.stdout  # kernel= works; the host fixture killed the VMM the test left running


# ------------------------------------------------------------------ the QEMU-shaped VMM


def test_qemu_checks_its_arguments():
    with pytest.raises(TypeError, match="host"):
        Qemu(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="image"):
        Qemu(pvfast.Host(), image=b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="secure"):
        Qemu(pvfast.Host()).run(100)


def test_qemu_start_up_clones_the_helper_before_the_vm(pvfast_host):
    qemu = Qemu(pvfast_host, async_teardown=True)
    assert qemu.helper is not None
    assert qemu.helper.name == f"cleanup/{qemu.process.pid}"
    assert qemu.helper.vms == []  # cloned before KVM was opened: no VM fd
    assert qemu.helper.mm is qemu.process.mm
    qemu.shutdown()
    assert not qemu.helper.alive
    assert_host_clean(pvfast_host)


def test_qemu_shutdown_releases_a_held_cleanup_thread(pvfast_qemu, pvfast_host):
    import threading

    hold = threading.Event()
    thread = pvfast_qemu.unprotect(hold=hold)
    assert thread is not None
    pvfast_qemu.shutdown()
    assert not thread.is_alive()
    assert thread.result is None  # it never entered the ioctl: the VM was gone
    assert pvfast_qemu.exit_status == 0
    assert_host_clean(pvfast_host)


# ------------------------------------------------------------------ host checks and warnings


def test_host_problems_name_what_is_left(pvfast_host):
    assert host_problems(pvfast_host) == []
    qemu = Qemu(pvfast_host)
    qemu.boot()
    qemu.run(MiB)
    problems = "\n".join(host_problems(pvfast_host))
    handle = qemu.vm.pv_state().handle
    assert f"live processes: qemu (pid {qemu.process.pid})" in problems
    assert "secure page(s)" in problems
    assert f"configuration(s) in the UV: {handle:#x}" in problems
    assert "donated to the UV" in problems
    for kind in ("crst", "sca", "stor_base", "stor_var", "cpu_stor", "sida"):
        assert kind in problems
    with pytest.raises(AssertionError, match="host is not clean"):
        assert_host_clean(pvfast_host)
    qemu.shutdown()
    assert_host_clean(pvfast_host)


@pytest.mark.pvfast_host(destroy_fast=False)  # Destroy-Fast would free the donations at VM destroy
def test_host_problems_name_leak_ledger_entries(pvfast_host):
    vm = pvfast_host.create_vm(4 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    handle = vm.pv_state().handle
    pvfast_host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0108, count=2)
    with pytest.raises(pvfast.PvError):
        vm.pv_command(PvCmd.DISABLE)
    vm.close()
    problems = "\n".join(host_problems(pvfast_host))
    assert "leak-ledger entries" in problems
    assert "stor_base at 0x" in problems
    assert f"handle {handle:#x}" in problems
    assert f"configuration(s) in the UV: {handle:#x}" in problems  # the UV still holds it


def test_kernel_warnings_are_recorded_on_the_host(pvfast_host):
    vm = pvfast_host.create_vm(4 * GiB, vcpus=2)
    vm.pv_command(PvCmd.ENABLE)
    cpu_handle = vm.pv_state().vcpu_handles[0]
    pvfast_host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0107, rrc=9)
    with pytest.raises(pvfast.PvError):
        vm.pv_command(PvCmd.DISABLE)
    (warning,) = pvfast_host.warnings()
    assert isinstance(warning, KernelWarning)
    assert warning.function == "kvm_s390_pv_destroy_cpu"
    assert (warning.vm, warning.handle, warning.rc, warning.rrc) == (vm.name, cpu_handle, 0x0107, 9)
    assert "destroying secure CPU 0 failed" in warning.message
    with pytest.raises(AssertionError, match="kvm_s390_pv_destroy_cpu"):
        assert_no_warnings(pvfast_host)
    pvfast_host.clear_warnings()
    assert pvfast_host.warnings() == []
    assert_no_warnings(pvfast_host)


def test_warnings_are_also_logged(pvfast_host, caplog):
    vm = pvfast_host.create_vm(4 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    pvfast_host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0108)
    with pytest.raises(pvfast.PvError):
        vm.pv_command(PvCmd.DISABLE)
    assert [r.name for r in caplog.records if r.levelname == "WARNING"] == ["pvfast.kvm_uv"]
    assert pvfast_host.warnings()[0].function == "kvm_s390_pv_deinit_vm"


def test_kernel_allocations_by_kind(pvfast_host):
    vm = pvfast_host.create_vm(4 * GiB, vcpus=2)
    assert set(pvfast_host.kernel_allocations()) == {"crst", "sca"}
    vm.pv_command(PvCmd.ENABLE)
    allocations = pvfast_host.kernel_allocations()
    assert allocations["cpu_stor"][0] == 2
    assert allocations["sida"] == (2, 2 * 4096)
    assert sum(total for _, total in allocations.values()) == pvfast_host.kernel_memory()
