"""The public surface: every public class, function, method and property has a docstring, the
fields of the result and record types are documented, and kernel internals are not on it."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from types import ModuleType

import pytest

import pvfast
from pvfast import cli, experiments, image, testing, timeline, trace, vmm
from pvfast import host as host_module
from pvfast.host import KernelWarning, LeakEntry, UltravisorView, UvInfo
from pvfast.kvm import PvResult, PvState

MODULES: list[ModuleType] = [pvfast, vmm, image, testing, host_module, experiments, trace, timeline, cli]
# Reached through attributes rather than a module's __all__.
EXTRA_CLASSES: list[type] = [UltravisorView, vmm.AsyncCleanupThread, KernelWarning]


def public_classes() -> list[type]:
    seen: list[type] = []
    for module in MODULES:
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in names:
            value = getattr(module, name)
            if inspect.isclass(value) and value.__module__.startswith("pvfast") and value not in seen:
                seen.append(value)
    return seen + [c for c in EXTRA_CLASSES if c not in seen]


def public_functions() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for module in MODULES:
        for name in getattr(module, "__all__", None) or []:
            value = getattr(module, name)
            if inspect.isfunction(value):
                out.append((f"{module.__name__}.{name}", value))
    for module in (vmm, image, experiments, trace, timeline, cli):
        for name, value in vars(module).items():
            if not name.startswith("_") and inspect.isfunction(value) and value.__module__ == module.__name__:
                out.append((f"{module.__name__}.{name}", value))
    return out


def members_without_docstring(cls: type) -> list[str]:
    missing = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("pvfast"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if (inspect.isfunction(target) or isinstance(value, property)) and not (target.__doc__ or "").strip():
                missing.append(f"{cls.__name__}.{name} (defined in {klass.__name__})")
    return missing


def test_every_public_class_and_member_has_a_docstring():
    missing = []
    for cls in public_classes():
        if not (cls.__doc__ or "").strip():
            missing.append(cls.__name__)
        missing += members_without_docstring(cls)
    assert missing == []


def test_every_public_function_has_a_docstring():
    assert [name for name, func in public_functions() if not (getattr(func, "__doc__", "") or "").strip()] == []


@pytest.mark.parametrize("cls", [PvState, PvResult, KernelWarning])
def test_dataclass_fields_are_documented(cls):
    doc = cls.__doc__ or ""
    assert [f.name for f in dataclasses.fields(cls) if f"``{f.name}``" not in doc] == []


@pytest.mark.parametrize("cls", [UvInfo, LeakEntry])
def test_typed_dict_keys_are_documented(cls):
    doc = cls.__doc__ or ""
    keys = typing.get_type_hints(cls)
    assert [k for k in keys if k not in doc] == []


@pytest.mark.parametrize(
    ("cls", "names"),
    [
        (
            pvfast.Host,
            ["kalloc", "kalloc_nofail", "kfree", "leak", "ledger", "alloc_pid", "add_process", "remove_process"],
        ),
        (
            pvfast.AddressSpace,
            [
                "protected_inc",
                "protected_dec",
                "protected_inc_not_zero",
                "mmget",
                "mmget_not_zero",
                "mmput",
                "exit_mmap",
                "mmap",
                "mmu_notifier_register",
                "mmu_notifier_unregister",
                "destroy_range",
            ],
        ),
        (pvfast.Process, ["fdget", "fdput", "close_fd"]),
        (pvfast.Vm, ["release"]),
    ],
)
def test_kernel_internals_are_not_public(cls, names):
    assert [n for n in names if hasattr(cls, n)] == []


def test_the_contract_names_are_there():
    """What the API contract lists stays public."""
    host = pvfast.Host()
    for name in ("module_params", "read_sysfs", "check_extension", "spawn_process", "create_vm", "uv"):
        assert hasattr(host, name), name
    for name in ("stats", "config_handles", "secure_pages", "inject_failure"):
        assert hasattr(host.uv, name), name
    proc = host.spawn_process()
    for name in ("create_vm", "clone_vm", "kill", "exit", "alive", "pid", "name"):
        assert hasattr(proc, name), name
    vm = proc.create_vm(1 << 30)
    for name in (
        "close",
        "memory_size",
        "memory_limit",
        "asce_type",
        "vcpus",
        "create_vcpu",
        "check_extension",
        "pv_command",
        "pv_state",
        "guest_access",
        "guest_write",
        "guest_read",
        "guest_share",
        "host_read",
        "host_write",
    ):
        assert hasattr(vm, name), name
    for name in ("unprotect", "protect"):
        assert callable(getattr(vmm, name))
    assert callable(image.build)
    proc.exit()
