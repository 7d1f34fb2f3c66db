"""State-only guests (``Host(guest_memory="state")``): a touched page costs only its state word,
pages that hold data still read, write, export and import, and teardown clears only those."""

from __future__ import annotations

import pytest

import pvfast
from pvfast import PvCmd, experiments, vmm

from .conftest import GiB, MiB

HIGH = 2 * GiB
PAGE = 4096


def protected(host: pvfast.Host, size: int = 3 * GiB) -> pvfast.Vm:
    vm = host.create_vm(size, vcpus=2)
    vmm.protect(vm, experiments.boot_image())
    return vm


def test_guest_memory_is_checked():
    with pytest.raises(ValueError, match="guest_memory: expected one of real, state, got 'virtual'"):
        pvfast.Host(guest_memory="virtual")
    with pytest.raises(TypeError, match="guest_memory: expected str"):
        pvfast.Host(guest_memory=1)  # type: ignore[arg-type]
    assert pvfast.Host().guest_memory == "real"
    vm = pvfast.Host(guest_memory="state").create_vm(64 * MiB)
    assert vm.region.guest_memory == "state"


def test_touched_pages_cost_only_their_state():
    host = pvfast.Host(guest_memory="state")
    vm = protected(host)
    image_pages = vm.region.data_pages()  # the boot image: written by the host, unpacked
    assert 0 < image_pages <= 70
    vm.guest_access(HIGH, 512 * MiB)  # the guest makes 512 MiB secure without writing data
    assert vm.region.present_pages() >= 512 * MiB // PAGE
    assert vm.region.data_pages() == image_pages  # no page of it is backed by host memory
    assert host.uv.secure_pages(vm.pv_state().handle) >= 512 * MiB // PAGE


def test_data_reads_writes_and_export_still_work():
    host = pvfast.Host(guest_memory="state")
    vm = protected(host)
    vm.guest_access(HIGH, 4 * MiB)
    payload = bytes(range(256)) * 16
    vm.guest_write(HIGH + 8 * PAGE, payload)
    assert vm.guest_read(HIGH + 8 * PAGE, len(payload)) == payload
    assert vm.guest_read(HIGH, 16) == bytes(16)  # touched, no data: reads as zeroes
    before = vm.region.data_pages()
    # the host reads a secure page: it is exported (ciphertext), never plaintext
    cipher = vm.host_read(HIGH + 8 * PAGE, PAGE)
    assert cipher != payload
    assert vm.region.data_pages() == before
    exported_dataless = vm.host_read(HIGH + 100 * PAGE, PAGE)  # export of a page without data
    assert exported_dataless != bytes(PAGE)  # ciphertext of zeroes: now the page holds data
    assert vm.region.data_pages() == before + 1
    # the guest touches them again: imported back, decrypted
    assert vm.guest_read(HIGH + 8 * PAGE, len(payload)) == payload
    assert vm.guest_read(HIGH + 100 * PAGE, 16) == bytes(16)


@pytest.mark.parametrize("how", ["disable", "async"])
def test_teardown_clears_the_pages_that_hold_data(how):
    host = pvfast.Host(guest_memory="state")
    vm = protected(host)
    vm.guest_access(HIGH, 64 * MiB)
    secret = b"top secret guest data".ljust(PAGE, b"!")
    vm.guest_write(HIGH + 5 * PAGE, secret)
    vm.guest_write(PAGE * 300, secret)  # below 2 GiB: PREPARE's own pass clears it
    assert vm.region.data_pages() > 2
    if how == "disable":
        vm.pv_command(PvCmd.DISABLE)
    else:
        thread = vmm.unprotect(vm)
        assert thread is not None
        thread.join(60)
    assert host.uv.secure_pages() == 0
    assert vm.region.data_pages() == 0  # every page that held data was cleared
    assert vm.host_read(HIGH + 5 * PAGE, PAGE) == bytes(PAGE)
    assert vm.host_read(PAGE * 300, PAGE) == bytes(PAGE)


def test_a_state_only_reboot_and_shutdown_count_the_same_work_as_real_memory():
    secure = 96 * MiB
    mem = experiments.auto_memory(secure)
    for run in (
        lambda o: experiments.reboot(mem, secure, mode="sync", options=o, timeline=False),
        lambda o: experiments.reboot(mem, secure, mode="async", options=o, timeline=False),
        lambda o: experiments.shutdown(mem, secure, helper=True, options=o, timeline=False),
    ):
        real = run(experiments.HostOptions(guest_memory="real"))
        state = run(experiments.HostOptions(guest_memory="state"))
        assert state["host"]["guest_memory"] == "state"
        assert real["model"] == {**state["model"]}
        for key in ("uvcs", "secure_pages_left", "configs_left", "leaked"):
            assert real.get(key) == state.get(key)


def test_a_guest_secure_all_through():
    """--secure equal to --memory: the guest's secure memory reaches below 2 GiB."""
    size = 3 * GiB
    r = experiments.reboot(
        size, size, mode="async", options=experiments.HostOptions(guest_memory="state"), timeline=False
    )
    assert r["secure_pages_before"] == size // PAGE
    assert r["secure_pages_left"] == 0
    teardown = {t["thread"]: t for t in r["accounting"]["teardown"]}
    assert teardown["MainThread"]["zeroed_pages"] == HIGH // PAGE  # PREPARE cleared [0, 2 GiB)
    assert teardown["async_cleanup"]["zeroed_pages"] == (size - HIGH) // PAGE
