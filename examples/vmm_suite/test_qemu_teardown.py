"""A sample VMM test suite: QEMU's reboot and shutdown paths against the emulated kernel.

It uses only the fixtures of the pvfast pytest plugin (``pvfast_host``, ``pvfast_qemu``,
``pvfast_vm``) and the checks of ``pvfast.testing``. Run it with ``pytest examples/vmm_suite``
in an environment where pvfast is installed (the plugin is found through its entry point).
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

import pvfast
from pvfast import Cap, PvCmd, PvError, Uvc
from pvfast.testing import Qemu, assert_host_clean, assert_no_warnings, host_problems

GiB = 1 << 30
MiB = 1 << 20


def uvcs(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The UV calls issued between two ``host.uv.stats()`` snapshots."""
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


# ------------------------------------------------------------------------- reboot


@pytest.mark.pvfast_qemu(dirty=16 * MiB)
def test_async_reboot(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """The usual reboot: PREPARE, the guest runs again at once, async_cleanup finishes later."""
    old = pvfast_qemu.vm.pv_state().handle
    thread = pvfast_qemu.reboot()
    assert thread is not None
    assert thread.name == "async_cleanup"
    assert pvfast_qemu.vm.pv_state().protected  # the new guest runs while the old one is torn down
    thread.join()
    assert thread.result is not None
    assert pvfast_host.uv.secure_pages(old) == 0
    pvfast_qemu.shutdown()
    assert_host_clean(pvfast_host)
    assert_no_warnings(pvfast_host)


def test_double_reboot_kills_qemu(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """Two reboots in a row while the first async_cleanup thread has not entered the ioctl yet:
    the second PREPARE is refused (one configuration is already set aside), QEMU falls back to
    DISABLE, which tears down both; the first thread's PERFORM then finds nothing and QEMU exits 1."""
    hold = threading.Event()
    first = pvfast_qemu.reboot(hold=hold)
    assert first is not None
    second = pvfast_qemu.reboot()
    assert second is None  # PREPARE failed: DISABLE instead
    state = pvfast_qemu.vm.pv_state()
    assert state.protected
    assert not state.set_aside
    hold.set()  # now the first thread enters PERFORM
    first.join()
    assert isinstance(first.error, PvError)
    assert first.error.errno == errno.EINVAL
    assert pvfast_qemu.exit_status == 1
    assert_host_clean(pvfast_host)
    assert_no_warnings(pvfast_host)


@pytest.mark.pvfast_qemu(memory=4 * GiB)
def test_perform_killed(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """QEMU is killed while async_cleanup walks the old guest's memory: PERFORM stops at a batch
    boundary and returns rc 1 / rrc 42, the rest goes to the leftover list, and the VM's
    destruction cleans it. Nothing is lost either way; the scenario is retried until the kill
    really lands inside the walk."""
    qemu = pvfast_qemu
    for _ in range(5):
        qemu.run(256 * MiB)
        thread = qemu.reboot()
        assert thread is not None
        while thread.is_alive() and not qemu.vm.pv_state().performing:
            time.sleep(0)
        qemu.kill()
        assert_host_clean(pvfast_host)
        if thread.result is not None and thread.result.rrc == 42:
            break  # the kill landed inside the walk
        qemu = Qemu(pvfast_host, memory=4 * GiB)
        qemu.boot()
    else:
        pytest.fail("the kill never landed inside PERFORM's walk")
    assert_no_warnings(pvfast_host)


def test_destroy_fast_refused_falls_back_to_disable(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """Destroy-Fast refused with rc 0x0104 (AP queues still bound): PREPARE fails with EIO and
    the guest stays protected, QEMU logs it and uses DISABLE. No kernel warning for 0x0104."""
    pvfast_host.uv.inject_failure(Uvc.DESTROY_SEC_CONF_FAST, 0x0104)
    before = pvfast_host.uv.stats()
    assert pvfast_qemu.reboot() is None
    done = uvcs(before, pvfast_host.uv.stats())
    assert done["DESTROY_SEC_CONF_FAST"] == 1
    assert done["DESTROY_SEC_CONF"] == 1  # DISABLE's synchronous destroy
    assert pvfast_qemu.vm.pv_state().protected  # rebooted
    assert pvfast_host.warnings() == []
    pvfast_qemu.shutdown()
    assert_host_clean(pvfast_host)


def test_destroy_fast_failing_otherwise_warns(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """Any other Destroy-Fast failure is a kernel WARN, visible in host.warnings()."""
    pvfast_host.uv.inject_failure(Uvc.DESTROY_SEC_CONF_FAST, 0x0106)
    assert pvfast_qemu.reboot() is None
    (warning,) = pvfast_host.warnings()
    assert warning.function == "kvm_s390_pv_deinit_vm_fast"
    assert (warning.rc, warning.vm) == (0x0106, pvfast_qemu.vm.name)
    pvfast_qemu.shutdown()
    assert_host_clean(pvfast_host)  # nothing leaked: the configuration stayed intact


@pytest.mark.pvfast_host(async_destroy=0)
def test_without_async_destroy_reboot_is_synchronous(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """kvm.async_destroy=0: capability 224 reads 0, so QEMU does not try PREPARE at all."""
    assert pvfast_host.check_extension(Cap.S390_PROTECTED_ASYNC_DISABLE) == 0
    assert pvfast_host.read_sysfs("/sys/module/kvm/parameters/async_destroy") == "0\n"
    before = pvfast_host.uv.stats()
    assert pvfast_qemu.reboot() is None
    done = uvcs(before, pvfast_host.uv.stats())
    assert "DESTROY_SEC_CONF_FAST" not in done
    assert done["DESTROY_SEC_CONF"] == 1
    pvfast_qemu.shutdown()
    assert_host_clean(pvfast_host)


@pytest.mark.pvfast_qemu(memory=2 * GiB)
def test_small_guest_reboots_with_disable(pvfast_qemu: Qemu, pvfast_vm: pvfast.Vm) -> None:
    """A memory limit of 2 GiB or less: QEMU does not try PREPARE (the kernel would refuse it:
    the guest has a segment-table ASCE) and uses DISABLE."""
    assert pvfast_vm.asce_type == "segment"
    assert pvfast_qemu.reboot() is None
    assert pvfast_vm.pv_state().protected
    with pytest.raises(PvError) as refused:  # what QEMU's check avoids
        pvfast_vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    assert refused.value.errno == errno.EINVAL
    pvfast_vm.pv_command(PvCmd.DISABLE)  # as the API documentation asks after a refused PREPARE


# ------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize(
    "pvfast_qemu",
    [{"async_teardown": False, "dirty": 32 * MiB}, {"async_teardown": True, "dirty": 32 * MiB}],
    ids=["plain", "async-teardown"],
    indirect=True,
)
def test_shutdown(pvfast_qemu: Qemu, pvfast_host: pvfast.Host) -> None:
    """QEMU exits with the guest running. Without the helper QEMU's exit is the last user of the
    address space: the mm-release notifier uses Destroy-Fast and the page-table teardown destroys
    every page. With it, QEMU's exit only closes the VM fd (Destroy Config, then a zap while the
    helper keeps the address space alive); the helper's own exit frees the memory."""
    before = pvfast_host.uv.stats()
    pvfast_qemu.shutdown(helper_exits=False)
    done = uvcs(before, pvfast_host.uv.stats())
    if pvfast_qemu.helper is None:
        assert done["DESTROY_SEC_CONF_FAST"] == 1
        assert "DESTROY_SEC_CONF" not in done
        assert_host_clean(pvfast_host)
    else:
        assert done["DESTROY_SEC_CONF"] == 1
        assert "DESTROY_SEC_CONF_FAST" not in done
        helper = pvfast_qemu.helper
        assert host_problems(pvfast_host) == [f"live processes: {helper.name} (pid {helper.pid})"]
        pvfast_qemu.exit_helper()
        assert_host_clean(pvfast_host)
    assert_no_warnings(pvfast_host)
