"""Misuse and resource failures raise the contract's exceptions and change nothing.

The contract: Python misuse is TypeError/ValueError naming the argument; what the kernel refuses
is its errno (an OSError). Each case below once escaped as something else (a bare AssertionError,
RuntimeError, AttributeError, an unnamed ENOMEM, a native OverflowError) and is a regression test.
"""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from typing import Any

import pytest

import pvfast
from pvfast import PAGE_SIZE, PvCmd, PvError, Uvc, fault, image, vmm
from pvfast import kvm as kvm_module
from pvfast.constants import MAX_GUEST_MEMORY

GiB = 1 << 30
MiB = 1 << 20
TiB = 1 << 40


def snapshot(host: pvfast.Host) -> dict[str, Any]:
    """What the host holds: every count a failed call must leave as it was."""
    return {
        "configs": host.uv.config_handles(),
        "secure": host.uv.secure_pages(),
        "donated": host.uv.donated_bytes(),
        "kernel_memory": host.kernel_memory(),
        "leaked": host.leaked(),
        "live": [p.pid for p in host.processes if p.alive],
        "stats": host.uv.stats(),
    }


def small_image() -> image.Image:
    return image.build([(0x10000, b"kernel" * 1000)])


# ------------------------------------------------------------------ closed fd: EBADF and ValueError


def test_a_call_on_a_closed_vm_is_ebadf_and_a_value_error(host):
    vm = host.create_vm(GiB)
    vm.close()
    for call in (
        lambda: vm.pv_command(PvCmd.ENABLE),
        lambda: vm.pv_command(PvCmd.DISABLE),
        lambda: vm.pv_state(),
        lambda: vm.check_extension(224),
        lambda: vm.create_vcpu(),
        lambda: vm.guest_access(0),
        lambda: vm.host_read(0, 16),
    ):
        with pytest.raises(pvfast.ClosedFdError, match="VM is closed") as info:
            call()
        assert info.value.errno == errno.EBADF
        assert isinstance(info.value, OSError)
        assert isinstance(info.value, ValueError)


def test_a_call_after_the_process_exited_is_ebadf(host):
    proc = host.spawn_process()
    vm = proc.create_vm(GiB)
    proc.exit()
    with pytest.raises(OSError, match=r"VM is closed|has exited") as info:
        vm.pv_command(PvCmd.ENABLE)
    assert info.value.errno == errno.EBADF


def test_closed_fd_error_pickles():
    err = pvfast.ClosedFdError("VM is closed")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is pvfast.ClosedFdError
    assert (back.errno, back.strerror) == (errno.EBADF, "VM is closed")


# ------------------------------------------------------------------ wrong keyword for a command


@pytest.mark.parametrize(
    ("cmd", "kwargs", "named"),
    [
        (PvCmd.DISABLE, {"header": b"x"}, "header"),
        (PvCmd.ENABLE, {"addr": 0}, "addr"),
        (PvCmd.ASYNC_CLEANUP_PERFORM, {"id": 0}, "id"),
        (PvCmd.UNPACK, {"header": b"x"}, "header"),
        (PvCmd.INFO, {"subcmd": 0}, "subcmd"),
        (PvCmd.DUMP, {"len_max": 0}, "len_max"),
        (PvCmd.SET_SEC_PARMS, {"tweak": 0}, "tweak"),
        (PvCmd.UNPACK, {"adr": 0, "size": 4096, "tweak": 0}, "adr"),
    ],
)
def test_a_keyword_the_command_does_not_take_is_a_type_error(host, cmd, kwargs, named):
    vm = host.create_vm(GiB)
    before = snapshot(host)
    with pytest.raises(TypeError, match=named):
        vm.pv_command(cmd, **kwargs)
    assert snapshot(host) == before
    assert not vm.pv_state().user_cpu_state_ctrl  # refused before the ioctl started


def test_an_unknown_command_number_takes_any_data_keyword_and_is_enotty(host):
    vm = host.create_vm(GiB)
    with pytest.raises(PvError) as info:
        vm.pv_command(99, addr=0)
    assert info.value.errno == errno.ENOTTY


# ------------------------------------------------------------------ issue 13, item 6


def test_inject_alloc_failure_is_left_for_the_pv_code(host):
    """KVM_CREATE_VM's own allocations (gmap table, SCA) are not PV paths: create_vm works and the
    injected failure is still there for ENABLE, which fails with ENOMEM and changes nothing."""
    host.inject_alloc_failure()
    vm = host.create_vm(GiB)
    assert len(vm.mm.regions) == 1
    before = snapshot(host)
    with pytest.raises(PvError) as info:
        vm.pv_command(PvCmd.ENABLE)
    assert info.value.errno == errno.ENOMEM
    after = snapshot(host)
    assert after == before
    vm.pv_command(PvCmd.ENABLE)  # the failure was used up
    vm.close()
    assert host.kernel_memory() == 0
    assert not any(p.alive for p in host.processes)


def test_inject_alloc_failure_then_process_create_vm(host):
    proc = host.spawn_process()
    host.inject_alloc_failure(2)
    vm = proc.create_vm(GiB, vcpus=2)
    assert proc.vms == [vm]
    assert len(proc.mm.regions) == 1
    proc.exit()
    assert host.kernel_memory() == 0


def test_host_read_against_a_guest_that_keeps_reimporting_is_eagain(host, monkeypatch):
    """Every time the host has exported the page, the guest's vCPU imports it again before the
    host's access gets through: the access ends with OSError(EAGAIN), not RuntimeError."""
    vm = host.create_vm(4 * GiB)
    vmm.protect(vm, small_image())
    vm.guest_write(3 * GiB, b"secret")
    real = fault.host_fault
    faults = []

    def raced(gmap, first, npages):
        view = real(gmap, first, npages)
        faults.append(first)
        vm.guest_access(first * PAGE_SIZE, npages * PAGE_SIZE)  # the vCPU re-imports it
        return view

    monkeypatch.setattr(kvm_module, "host_fault", raced)
    with pytest.raises(OSError, match="host_read") as info:
        vm.host_read(3 * GiB, 6)
    assert info.value.errno == errno.EAGAIN
    assert isinstance(info.value, BlockingIOError)  # what OSError(EAGAIN) is in Python
    assert len(faults) > 1
    monkeypatch.undo()
    assert vm.guest_read(3 * GiB, 6) == b"secret"  # the guest's data is intact
    assert vm.host_read(3 * GiB, 6) != b"secret"  # and exported, never plaintext


def test_vmm_helpers_check_their_arguments(host):
    vm = host.create_vm(4 * GiB)
    before = snapshot(host)
    with pytest.raises(TypeError, match="image: expected"):
        vmm.protect(vm, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="vm: expected Vm, got NoneType"):
        vmm.protect(None, small_image())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="vm: expected Vm, got NoneType"):
        vmm.unprotect(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="vm: expected Vm"):
        vmm.try_disable_async("vm")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hold: expected"):
        vmm.unprotect(vm, hold=True)  # type: ignore[arg-type]
    assert snapshot(host) == before
    assert not vm.pv_state().protected


def test_submodules_are_attributes_of_the_package():
    code = "import pvfast; pvfast.image.build; pvfast.vmm.unprotect; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


class _Proxy:
    """The native Ultravisor, except that reserving guest memory fails as mmap would."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def create_region(self, size: int, **_options: Any) -> Any:
        raise OSError(errno.ENOMEM, "Cannot allocate memory (os error 12)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)


def test_create_vm_that_cannot_be_mapped_is_enomem_naming_memory_size(host):
    proc = host.spawn_process()
    proc.mm.uv = _Proxy(proc.mm.uv)
    before = snapshot(host)
    with pytest.raises(OSError, match="memory_size") as info:
        proc.create_vm(64 * TiB)
    assert info.value.errno == errno.ENOMEM
    assert snapshot(host) == before
    assert proc.vms == []
    assert proc.mm.regions == []
    assert proc.alive


def test_create_vm_of_64_tib_on_this_machine(host):
    """However many 64 TiB guests the machine can reserve, the one it cannot is ENOMEM naming memory_size."""
    made = []
    failure: OSError | None = None
    for _ in range(4):
        try:
            vm = host.create_vm(64 * TiB)
        except OSError as err:
            failure = err
            break
        made.append(vm)
    if failure is not None:
        assert failure.errno == errno.ENOMEM
        assert "memory_size" in str(failure)
    for vm in made:
        vm.close()
    assert host.kernel_memory() == 0


def test_create_vm_above_the_limit_is_a_value_error_and_spawns_nothing(host):
    before = len(host.processes)
    with pytest.raises(ValueError, match=r"memory_size: .* 64 TiB"):
        host.create_vm(MAX_GUEST_MEMORY + MiB)
    with pytest.raises(ValueError, match="memory_size"):
        host.create_vm(MiB + 1)
    with pytest.raises(ValueError, match="vcpus"):
        host.create_vm(GiB, vcpus=10_000)
    with pytest.raises(TypeError, match="memory_size"):
        host.create_vm("1G")
    assert len(host.processes) == before


class Liar(int):
    """An int that says yes to every range check, and whose conversions lie too."""

    def __lt__(self, other: object) -> bool:
        return False

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False

    def __ge__(self, other: object) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False


def test_an_int_subclass_with_lying_comparisons_is_checked_by_its_value(host):
    vm = host.create_vm(GiB)
    before = snapshot(host)
    cases: list[tuple[str, Any]] = [
        ("memory_size", lambda: host.create_vm(Liar(-MiB))),
        ("vcpus", lambda: host.create_vm(GiB, vcpus=Liar(1 << 20))),
        ("gaddr", lambda: vm.guest_access(Liar(-PAGE_SIZE))),
        ("size", lambda: vm.host_read(0, Liar(1 << 70))),
        ("cmd", lambda: vm.pv_command(Liar(1 << 40))),
        ("flags", lambda: vm.pv_command(PvCmd.ENABLE, flags=Liar(-1))),
        ("rc", lambda: vm.pv_command(PvCmd.ENABLE, rc=Liar(1 << 16))),
        ("addr", lambda: vm.pv_command(PvCmd.UNPACK, addr=Liar(-1), size=PAGE_SIZE, tweak=0)),
        ("len_max", lambda: vm.pv_command(PvCmd.INFO, id=0, len_max=Liar(1 << 33))),
        ("walk_threads", lambda: pvfast.Host(walk_threads=Liar(-1))),
        ("async_destroy", lambda: pvfast.Host(async_destroy=Liar(1 << 40))),
        ("rc", lambda: host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, Liar(1 << 20))),
        ("count", lambda: host.inject_alloc_failure(Liar(-1))),
        ("cap", lambda: host.check_extension(Liar(1 << 64))),
        ("sig", lambda: host.spawn_process().kill(Liar(-9))),
        ("status", lambda: host.spawn_process().exit(Liar(1 << 40))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name}: ") as info:
            call()
        assert not isinstance(info.value, OSError), name
    live = [p for p in host.processes if p.alive and p is not vm.process]
    for proc in live:
        proc.exit()
    assert snapshot(host)["configs"] == before["configs"]
    assert host.uv.secure_pages() == 0


def test_an_int_subclass_is_used_by_its_value(host):
    """A well-behaved int subclass works, and the value used is the int's own, not __int__'s."""

    class Odd(int):
        def __int__(self) -> int:
            return 12345

    vm = host.create_vm(Odd(GiB), vcpus=Odd(2))
    assert (vm.memory_size, vm.vcpus) == (GiB, 2)
    assert type(vm.memory_size) is int
    res = vm.pv_command(PvCmd.INFO, id=Odd(0), len_max=Odd(80))
    assert res.data is not None
    assert len(res.data) == 80
