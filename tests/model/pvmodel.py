"""Reference model of KVM s390 PV teardown + the Ultravisor, written only from the kernel sources.

Sources: a reading of arch/s390/kvm/pv.c @ f7866f582b1c and arch/s390/kvm/kvm-s390.c @ cc726886079f
(the v6.2 state), arch/s390/mm/gmap.c @ 292a7d6fca33, arch/s390/kernel/uv.c @ 594ce0b8a998 and the
v6.2 arch/s390/include/asm/uv.h, plus the public API as documented in docs/ and
python/pvfast/__init__.py.  Comments name the kernel function a step follows.  Two kernel
profiles: ``Model(kernel="latest")`` (the default: v6.2 with the fixes of v6.4 to v6.6, plus the
changes of the newest tree read, listed in docs/KERNEL.md: walks over the VM's own memory with an
export when a destroy is refused, imports with the VM's handle, 1 MiB SE headers, the dump reset
in kvm_s390_clear_pv_state) and ``Model(kernel="6.2")`` (v6.2 as merged: segment-ASCE VMs may
PREPARE, walks over the whole address space with refusals ignored, imports with
gmap->guest_handle, 8 KiB SE headers, ``dumping`` survives the PV state).
This file must never import pvfast: it is the independent oracle the implementation is checked
against.  It is deliberately slow and literal: one Python statement per kernel step.  For the same
reason it defines its own constants (errnos, UVC codes and rcs, sizes) instead of taking pvfast's
or the native module's: a wrong constant on either side then shows up as a difference.

Modelling choices that a comparator must know (details and the full list in docs/MODEL.md):

* Leak ledger (emulator-only: the kernel keeps no counter, it WARNs and leaks what the UV may
  still use).  ``pv_state(vm)["leaked"]`` is the number of resources *currently* on the ledger of
  that VM, one entry per resource: each CPU donation, each base storage, each variable storage and
  each top-level table counts 1.  A failed Destroy Config of the *current* VM keeps the handle
  and the donation pointers (kvm_s390_pv_deinit_vm), so a later successful Destroy Config /
  Destroy-Fast of that same handle frees the base and variable storage and removes those two
  entries again.
  Everything else on the ledger (CPU donations, unlisted tables, a failed leftover's resources)
  stays there for good.
* Pages: a dict ``(vm_id, page_index) -> (state, owner_handle)`` in the UV for pages that are not
  plain NONSECURE, plus a per-address-space set of *present* (touched) page keys.  Only guest
  memory is modelled, so "every present page of the mm" means every touched page of every VM
  created by a process sharing that mm.  Guest memory stays mapped when a VM fd closes and goes
  away only with the address space (Model(unmap_on_close=True) changes that).
* Injected failures change nothing: an injected Create Config failure returns handle 0 even when
  the injected rc carries 0x8000 (NEED_DESTROY).
* UV refusals for which the kernel sources give no code (destroy page / destroy config of a
  config that has CPUs, import of a page owned by another config, unknown handle) answer cc 1
  with rc = UVC_RC_INV_STATE (0x0003), rrc 0.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------
# Constants (include/uapi/linux/kvm.h @ 8c516b25d6e9, arch/s390/include/asm/uv.h of v6.2).
# Plain ints on purpose: no dependency on pvfast or on the errno module.

EIO = 5
ENXIO = 6
EAGAIN = 11
ENOMEM = 12
EFAULT = 14
EINVAL = 22
ENOTTY = 25

PAGE_SIZE = 4096
SZ_1M = 1 << 20
SZ_2G = 1 << 31
BATCH_PAGES = 32  # GATHER_GET_PAGES, arch/s390/mm/gmap.c @ 292a7d6fca33
LOW_PAGES = SZ_2G // PAGE_SIZE  # PREPARE destroys guest pages [0, 2 GiB) synchronously
SEC_PARMS_MAX = 2 * PAGE_SIZE  # 8 KiB in v6.2..v6.6
SEC_PARMS_MAX_LATEST = 1 << 20  # 1 MiB in Δlatest
KERNELS = ("6.2", "latest")
DUMP_BUFF_LEN = SZ_1M

KVM_PV_ENABLE = 0
KVM_PV_DISABLE = 1
KVM_PV_SET_SEC_PARMS = 2
KVM_PV_UNPACK = 3
KVM_PV_VERIFY = 4
KVM_PV_PREP_RESET = 5
KVM_PV_UNSHARE_ALL = 6
KVM_PV_INFO = 7
KVM_PV_DUMP = 8
KVM_PV_ASYNC_CLEANUP_PREPARE = 9
KVM_PV_ASYNC_CLEANUP_PERFORM = 10

KVM_PV_DUMP_INIT = 0
KVM_PV_DUMP_CONFIG_STOR_STATE = 1
KVM_PV_DUMP_COMPLETE = 2
KVM_PV_DUMP_CPU = 3
KVM_PV_INFO_VM = 0
KVM_PV_INFO_DUMP = 1
INFO_HEADER_LEN = 16
INFO_VM_LEN = 16 + 64
INFO_DUMP_LEN = 16 + 24

KVM_CAP_S390_PROTECTED = 180
KVM_CAP_S390_PROTECTED_DUMP = 217
KVM_CAP_S390_PROTECTED_ASYNC_DISABLE = 224

UVC_RC_EXECUTED = 0x0001
UVC_RC_INV_CMD = 0x0002
UVC_RC_INV_STATE = 0x0003
UVC_RC_INV_LEN = 0x0005
UVC_RC_NO_RESUME = 0x0007
UVC_RC_NEED_DESTROY = 0x8000
UVC_RC_DESTROY_FAST_APQN = 0x0104  # Δ6.6: no warning
# The rc QEMU annotates for SET_SEC_PARMS (s390_pv_set_sec_parms, target/s390x/kvm/pv.c @ 06b40d250ecf).
UVC_RC_SEC_PARMS_BAD_HEADER = 0x0108
RRC_KVM_SYNTHETIC = 42

# UVC name -> command code (arch/s390/include/asm/uv.h of v6.2).  Names are the kernel's UVC_CMD_* without the prefix.
UVC_CODES = {
    "QUI": 0x0001,
    "INIT_UV": 0x000F,
    "CREATE_SEC_CONF": 0x0100,
    "DESTROY_SEC_CONF": 0x0101,
    "DESTROY_SEC_CONF_FAST": 0x0102,
    "CREATE_SEC_CPU": 0x0120,
    "DESTROY_SEC_CPU": 0x0121,
    "CONV_TO_SEC_STOR": 0x0200,
    "CONV_FROM_SEC_STOR": 0x0201,
    "DESTR_SEC_STOR": 0x0202,
    "SET_SEC_CONF_PARAMS": 0x0300,
    "UNPACK_IMG": 0x0301,
    "VERIFY_IMG": 0x0302,
    "CPU_RESET": 0x0310,
    "CPU_RESET_INITIAL": 0x0311,
    "PREPARE_RESET": 0x0320,
    "CPU_RESET_CLEAR": 0x0321,
    "CPU_SET_STATE": 0x0330,
    "SET_UNSHARE_ALL": 0x0340,
    "PIN_PAGE_SHARED": 0x0341,
    "UNPIN_PAGE_SHARED": 0x0342,
    "DUMP_INIT": 0x0400,
    "DUMP_CONF_STOR_STATE": 0x0401,
    "DUMP_CPU": 0x0402,
    "DUMP_COMPLETE": 0x0403,
    "SET_SHARED_ACCESS": 0x1000,
    "REMOVE_SHARED_ACCESS": 0x1001,
}
UVC_NAMES = {code: name for name, code in UVC_CODES.items()}

# Installed-calls bits (MSB-0, enum uv_cmds_inst of arch/s390/include/asm/uv.h, v6.2).
# Bit 23 (Destroy-Fast) depends on the host option.
UVC_INSTALLED_BITS = {
    "QUI": 0,
    "INIT_UV": 1,
    "CREATE_SEC_CONF": 2,
    "DESTROY_SEC_CONF": 3,
    "CREATE_SEC_CPU": 4,
    "DESTROY_SEC_CPU": 5,
    "CONV_TO_SEC_STOR": 6,
    "CONV_FROM_SEC_STOR": 7,
    "SET_SHARED_ACCESS": 8,
    "REMOVE_SHARED_ACCESS": 9,
    "SET_SEC_CONF_PARAMS": 11,
    "UNPACK_IMG": 13,
    "VERIFY_IMG": 14,
    "CPU_RESET": 15,
    "CPU_RESET_INITIAL": 16,
    "CPU_SET_STATE": 17,
    "PREPARE_RESET": 18,
    "CPU_RESET_CLEAR": 19,
    "SET_UNSHARE_ALL": 20,
    "PIN_PAGE_SHARED": 21,
    "UNPIN_PAGE_SHARED": 22,
    "DESTROY_SEC_CONF_FAST": 23,
    "DUMP_INIT": 24,
    "DUMP_CONF_STOR_STATE": 25,
    "DUMP_CPU": 26,
    "DUMP_COMPLETE": 27,
}
BIT_UV_FEAT_MISC = 0
BIT_UV_FEAT_AIV = 1

# Page states of the UV (inferred from the kernel's comments and commit texts; pvfast's are in
# docs/UV.md).  A page with no entry is NONSECURE.
NONSECURE = "NONSECURE"
EXPORTED = "EXPORTED"  # non-secure, encrypted, tagged with its former owner
SECURE = "SECURE"
SHARED = "SHARED"  # secure-shared: host-accessible, owned by a guest
ORPHANED = "ORPHANED"  # secure, owner removed with Destroy-Fast
SECURE_STATES = (SECURE, SHARED, ORPHANED)  # what uv.secure_pages() counts


def msb0_words(bits):
    """Four u64 words with the given MSB-0 bit numbers set (test_bit_inv numbering, arch/s390/include/asm/uv.h)."""
    words = [0, 0, 0, 0]
    for bit in bits:
        words[bit // 64] |= 1 << (63 - bit % 64)
    return words


def asce_type_for_limit(memory_limit):
    """gmap_alloc (arch/s390/mm/gmap.c): limit = memory_limit - 1; segment < 2^31, region3 < 2^42, region2 < 2^53."""
    limit = memory_limit - 1
    if limit < 1 << 31:
        return "segment"
    if limit < 1 << 42:
        return "region3"
    if limit < 1 << 53:
        return "region2"
    return "region1"


class PvResult(tuple):
    """``(errno_or_0, rc, rrc)`` as the ioctl leaves them; ``.data``/``.token`` carry extras."""

    data: object
    token: object

    def __new__(cls, err, rc, rrc, data=None, token=None):
        self = super().__new__(cls, (err, rc, rrc))
        self.data = data
        self.token = token
        return self

    err = property(lambda self: self[0])
    rc = property(lambda self: self[1])
    rrc = property(lambda self: self[2])


class Cmd:
    """The rc/rrc words of ``struct kvm_pv_cmd``: what a helper writes through ``u16 *rc``."""

    __slots__ = ("rc", "rrc")

    def __init__(self, rc=0, rrc=0):
        self.rc = rc
        self.rrc = rrc

    def set(self, rc, rrc):
        self.rc = rc
        self.rrc = rrc


# --------------------------------------------------------------------------------------------
# The Ultravisor (page states inferred from the kernel's comments and commit texts).


@dataclass
class UvConfig:
    handle: int
    table: int  # top-level table the config's ASCE points at
    guest_len: int
    cpus: set = field(default_factory=set)


@dataclass
class UvcEvent:
    name: str
    arg: object  # handle, cpu handle or page key
    cc: int
    rc: int
    rrc: int
    reason: str = ""  # why the kernel issued it ("ebi" = export before import, "walk", ...)
    ebi_rule: bool | None = None  # for imports: did should_export_before_import say "export first" at that moment?


@dataclass
class _Injection:
    after: int
    count: int
    rc: int
    rrc: int


class Ultravisor:
    """Emulated UV: configs, CPUs, page states, per-UVC counters, injected failures."""

    def __init__(self, *, destroy_fast, feature_misc, feature_aiv):
        self.destroy_fast = destroy_fast
        self.feature_misc = feature_misc
        self.feature_aiv = feature_aiv
        self.configs: dict[int, UvConfig] = {}
        self.cpus: dict[int, int] = {}  # cpu handle -> config handle
        self.pages: dict[tuple, tuple] = {}  # page key -> (state, owner handle)
        self.counts: Counter = Counter()
        self.created_handles: list[int] = []  # creation order, for mapping onto real handles
        self.destroyed: dict[int, list[str]] = {}  # handle -> names of the successful destroys
        self.cpus_destroyed: Counter = Counter()
        self.trace: list[UvcEvent] = []
        self.injections: dict[str, deque] = {}
        self.injected_fired = 0
        self.destroy_with_cpus: list[tuple] = []  # config destroys the UV refused (I11)
        self.violations: list[str] = []
        self._handles = itertools.count(0x1000_0001)
        self._cpu_handles = itertools.count(0x2000_0001)

    # ---- inspection (mirrors host.uv.*) ----
    def stats(self):
        return dict(self.counts)

    def config_handles(self):
        return set(self.configs)

    def live_configs(self):
        return len(self.configs)

    def secure_pages(self, handle=None):
        return sum(
            1 for state, owner in self.pages.values() if state in SECURE_STATES and (handle is None or owner == handle)
        )

    def page_state(self, key):
        return self.pages.get(key, (NONSECURE, 0))

    def installed_calls(self):
        names = [n for n in UVC_INSTALLED_BITS if n != "DESTROY_SEC_CONF_FAST" or self.destroy_fast]
        return msb0_words(UVC_INSTALLED_BITS[n] for n in names)

    def feature_indications(self):
        bits = ([BIT_UV_FEAT_MISC] if self.feature_misc else []) + ([BIT_UV_FEAT_AIV] if self.feature_aiv else [])
        return msb0_words(bits)[0]

    # ---- failure injection ----
    def inject_failure(self, name, rc, rrc=0, count=1, after=0):
        """The next ``count`` executions of UVC ``name`` (after ``after`` unaffected ones) fail."""
        if name not in UVC_CODES:
            raise ValueError(f"unknown UVC name {name!r}")
        self.injections.setdefault(name, deque()).append(_Injection(after, count, rc, rrc))

    def _injected(self, name):
        queue = self.injections.get(name)
        if not queue:
            return None
        head = queue[0]
        if head.after > 0:
            head.after -= 1
            return None
        head.count -= 1
        if head.count <= 0:
            queue.popleft()
        self.injected_fired += 1
        return head.rc, head.rrc

    def _call(self, name, arg, op, reason="", ebi_rule=None):
        """Count one execution of ``name``; run ``op`` unless a failure is injected.

        ``op`` returns ``(cc, rc, rrc, out)``.  The result is ``(cc, rc, rrc, out)``.
        """
        self.counts[name] += 1
        injected = self._injected(name)
        if injected is not None:
            result = (1, injected[0], injected[1], 0)
        else:
            result = op()
        self.trace.append(UvcEvent(name, arg, result[0], result[1], result[2], reason, ebi_rule))
        return result

    @staticmethod
    def _ok(out=0):
        return (0, UVC_RC_EXECUTED, 0, out)

    @staticmethod
    def _refused(out=0):
        return (1, UVC_RC_INV_STATE, 0, out)

    # ---- UVCs ----
    def boot(self, prot_virt):
        self._call("QUI", None, self._ok)
        if prot_virt:
            self._call("INIT_UV", None, self._ok)

    def create_conf(self, table, guest_len):
        def op():
            handle = next(self._handles)
            self.configs[handle] = UvConfig(handle, table, guest_len)
            self.created_handles.append(handle)
            return self._ok(handle)

        return self._call("CREATE_SEC_CONF", None, op)

    def _destroy_conf(self, name, handle, fast):
        def op():
            config = self.configs.get(handle)
            if config is None:
                return self._refused()
            if config.cpus:
                self.destroy_with_cpus.append((name, handle))
                return self._refused()
            for key, (state, owner) in list(self.pages.items()):
                if owner != handle:
                    continue
                if fast and state in (SECURE, SHARED):
                    self.pages[key] = (ORPHANED, owner)  # Destroy-Fast does not clean memory
                elif not fast or state == EXPORTED:
                    del self.pages[key]  # Destroy Config cleans the config's pages itself
            del self.configs[handle]
            self.destroyed.setdefault(handle, []).append(name)
            return self._ok()

        return self._call(name, handle, op)

    def destroy_conf(self, handle):
        return self._destroy_conf("DESTROY_SEC_CONF", handle, fast=False)

    def destroy_conf_fast(self, handle):
        return self._destroy_conf("DESTROY_SEC_CONF_FAST", handle, fast=True)

    def create_cpu(self, handle):
        def op():
            config = self.configs.get(handle)
            if config is None:
                return self._refused()
            cpu = next(self._cpu_handles)
            config.cpus.add(cpu)
            self.cpus[cpu] = handle
            return self._ok(cpu)

        return self._call("CREATE_SEC_CPU", handle, op)

    def destroy_cpu(self, cpu):
        def op():
            handle = self.cpus.pop(cpu, None)
            if handle is None:
                return self._refused()
            self.configs[handle].cpus.discard(cpu)
            self.cpus_destroyed[cpu] += 1
            return self._ok()

        return self._call("DESTROY_SEC_CPU", cpu, op)

    def _owner_has_cpus(self, owner):
        config = self.configs.get(owner)
        return config is not None and bool(config.cpus)

    def destroy_page(self, key, reason=""):
        """DESTR_SEC_STOR: secure/orphaned -> NONSECURE; no-op success on non-secure pages."""

        def op():
            state, owner = self.page_state(key)
            if state in (NONSECURE, EXPORTED):
                return self._ok()
            if state in (SECURE, SHARED) and self._owner_has_cpus(owner):
                return self._refused()  # must refuse: PERFORM's walk also visits the running VM's pages
            del self.pages[key]
            return self._ok()

        return self._call("DESTR_SEC_STOR", key, op, reason)

    def export_page(self, key, reason=""):
        """CONV_FROM_SEC_STOR: secure/shared/orphaned -> EXPORTED(owner); no-op if non-secure."""

        def op():
            state, owner = self.page_state(key)
            if state in SECURE_STATES:
                self.pages[key] = (EXPORTED, owner)
            return self._ok()

        return self._call("CONV_FROM_SEC_STOR", key, op, reason)

    def import_page(self, name, handle, key, ebi_rule):
        """CONV_TO_SEC_STOR / UNPACK_IMG into config ``handle``."""

        def op():
            if handle not in self.configs:
                return self._refused()
            state, owner = self.page_state(key)
            if state in (NONSECURE, EXPORTED) or (owner == handle and state in (SECURE, SHARED)):
                self.pages[key] = (SECURE, handle)
                return self._ok()
            if state == SHARED and self.feature_misc:
                self.pages[key] = (SECURE, handle)  # MISC: ownership of shared pages moves
                return self._ok()
            return self._refused()  # owned by another config

        return self._call(name, key, op, "import", ebi_rule)

    def pin_shared(self, key):
        def op():
            return self._ok() if self.page_state(key)[0] == SHARED else self._refused()

        return self._call("PIN_PAGE_SHARED", key, op, "host")

    def set_shared(self, handle, key):
        def op():
            state, owner = self.page_state(key)
            if owner != handle or state not in (SECURE, SHARED):
                return self._refused()
            self.pages[key] = (SHARED, handle)
            return self._ok()

        return self._call("SET_SHARED_ACCESS", key, op, "guest")

    def nodata(self, name, handle, *, valid=True, gaddr=0):
        """Config-level UVCs without page effects (plus SET_UNSHARE_ALL's unsharing)."""

        def op():
            config = self.configs.get(handle)
            if config is None:
                return self._refused()
            if name == "SET_SEC_CONF_PARAMS" and not valid:
                return (1, UVC_RC_SEC_PARMS_BAD_HEADER, 0, 0)
            if name == "DUMP_CONF_STOR_STATE" and gaddr >= config.guest_len:
                return self._refused()
            if name == "SET_UNSHARE_ALL":
                for key, (state, owner) in list(self.pages.items()):
                    if owner == handle and state == SHARED:
                        self.pages[key] = (SECURE, handle)
            return self._ok()

        return self._call(name, handle, op)


# --------------------------------------------------------------------------------------------
# Kernel side.


@dataclass
class Resource:
    kind: str  # "cpu" | "base" | "var" | "table"
    state: str = "held"  # "held" | "leaked" | "freed"
    guard: int = 0  # cpu handle (kind cpu) or config handle (base/var) that must be gone first


@dataclass
class Vcpu:
    index: int
    handle: int = 0  # pv.handle, 0 = not protected (sdf 0)
    stor: int | None = None  # resource id of the CPU donation


@dataclass
class Record:
    """struct pv_vm_to_be_destroyed (arch/s390/kvm/pv.c @ f7866f582b1c).  handle 0 = made by Destroy-Fast."""

    handle: int = 0
    stor_base: int | None = None
    stor_var: int | None = None
    old_table: int | None = None


@dataclass
class Mm:
    id: int
    users: int = 1
    protected_count: int = 0
    present: set = field(default_factory=set)
    notifiers: list = field(default_factory=list)  # VM ids with a live mmu-notifier subscription
    vms: list = field(default_factory=list)

    @property
    def alive(self):
        return self.users > 0


@dataclass
class Process:
    pid: int
    mm: Mm
    name: str
    alive: bool = True
    fds: list = field(default_factory=list)  # VM ids, in open order


@dataclass
class Vm:
    id: int
    pid: int
    mm: Mm
    memory_size: int
    memory_limit: int
    vcpus: list
    table: int
    table_listed: bool = True
    handle: int = 0
    stor_base: int | None = None
    stor_var: int | None = None
    guest_len: int = 0
    dumping: bool = False
    set_aside: Record | None = None
    need_cleanup: list = field(default_factory=list)
    inflight: int = 0  # PERFORM calls holding a claimed record
    service_irq_masked: bool = False
    guest_handle: int = 0  # 6.2: gmap->guest_handle, the fault handlers' copy of the handle
    user_cpu_state_ctrl: bool = False
    gisa_disabled: bool = False
    notifier_registered: bool = False  # registered once per VM (v6.2)
    ledger: dict = field(default_factory=dict)  # resource id -> kind, currently leaked
    stuck: list = field(default_factory=list)  # reasons protected_count holds a ref for good
    closed: bool = False  # the fd was closed (user view)
    destroyed: bool = False  # kvm_arch_destroy_vm ran

    @property
    def asce_type(self):
        return asce_type_for_limit(self.memory_limit)

    @property
    def pages(self):
        return self.memory_size // PAGE_SIZE


@dataclass
class PerformToken:
    id: int
    vm: Vm
    record: Record
    rc_in: int
    rrc_in: int
    finished: bool = False


class Model:
    """Kernel (KVM s390 PV, profile ``kernel``: "6.2" or "latest") plus Ultravisor, as one
    sequential state machine."""

    def __init__(
        self,
        async_destroy=1,
        prot_virt=True,
        destroy_fast=True,
        feature_misc=True,
        feature_aiv=True,
        *,
        kernel="latest",
        unmap_on_close=False,
        conf_dump_storage_state_len=4096,
        conf_dump_finalize_len=4096,
    ):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: the model knows {KERNELS}, not {kernel!r}")
        self.kernel = kernel
        latest = kernel == "latest"
        self.segment_refused = latest  # Δ6.4 (292a7d6fca33) is in every profile after 6.2
        self.own_memory_walks = latest  # walks over the VM's own gmap, not the whole mm
        self.export_refused = latest  # a refused destroy in those walks is followed by an export
        self.imports_use_handle = latest  # no gmap->guest_handle
        self.clear_resets_dump = latest  # kvm_s390_clear_pv_state ends a dump in progress
        self.create_cpu_frees = latest  # a failed Create CPU frees its donation
        self.notifier_first = latest  # the mm notifier is registered first in init_vm
        self.sec_parms_max = SEC_PARMS_MAX_LATEST if latest else SEC_PARMS_MAX
        self.async_destroy = int(async_destroy)
        self.prot_virt = bool(prot_virt)
        self.destroy_fast = bool(destroy_fast)
        self.feature_misc = bool(feature_misc)
        self.feature_aiv = bool(feature_aiv)
        self.unmap_on_close = unmap_on_close
        self.conf_dump_storage_state_len = conf_dump_storage_state_len
        self.conf_dump_finalize_len = conf_dump_finalize_len
        self.uv = Ultravisor(
            destroy_fast=self.destroy_fast,
            feature_misc=self.feature_misc,
            feature_aiv=self.feature_aiv,
        )
        self.uv.boot(self.prot_virt)
        self.processes: dict[int, Process] = {}
        self.vms: dict[int, Vm] = {}
        self.mms: list[Mm] = []
        self.resources: dict[int, Resource] = {}
        self.tokens: dict[int, PerformToken] = {}
        self.config_vm: dict[int, int] = {}  # config handle -> VM that created it
        self.violations = self.uv.violations
        self._pids = itertools.count(1000)
        self._vm_ids = itertools.count(1)
        self._mm_ids = itertools.count(1)
        self._res_ids = itertools.count(1)
        self._token_ids = itertools.count(1)
        self._exiting: set[int] = set()  # pids inside exit(): VM releases wait for mmput

    # ---- host-level ----
    @property
    def module_params(self):
        return {"async_destroy": self.async_destroy}

    def check_extension(self, cap):
        if cap == KVM_CAP_S390_PROTECTED:
            return int(self.prot_virt)
        if cap == KVM_CAP_S390_PROTECTED_DUMP:
            return int(self.prot_virt)  # all four dump bits are installed in this UV
        if cap == KVM_CAP_S390_PROTECTED_ASYNC_DISABLE:
            return int(bool(self.async_destroy) and self.prot_virt)
        return 0

    def inject_failure(self, uvc_name, rc, rrc=0, count=1, after=0):
        self.uv.inject_failure(uvc_name, rc, rrc, count, after)

    # ---- resources and the leak ledger (the kernel only WARNs and leaks; invariant 12) ----
    def _alloc(self, kind, guard=0):
        rid = next(self._res_ids)
        self.resources[rid] = Resource(kind, "held", guard)
        return rid

    def _free(self, vm, rid):
        if rid is None:
            return
        res = self.resources[rid]
        if res.kind == "cpu" and res.guard in self.uv.cpus:
            self.violations.append(f"I12: CPU donation {rid} freed while CPU {res.guard:#x} exists")
        if res.kind in ("base", "var") and res.guard in self.uv.configs:
            self.violations.append(f"I12: {res.kind} {rid} freed while config {res.guard:#x} lives")
        if res.kind == "table" and any(c.table == rid for c in self.uv.configs.values()):
            self.violations.append(f"I12: table {rid} freed while a live config uses it")
        if res.state == "freed":
            self.violations.append(f"resource {rid} freed twice")
        res.state = "freed"
        vm.ledger.pop(rid, None)

    def _leak(self, vm, rid):
        if rid is None:
            return
        self.resources[rid].state = "leaked"
        vm.ledger[rid] = self.resources[rid].kind

    # ---- processes ----
    def spawn_process(self, name="qemu"):
        mm = Mm(next(self._mm_ids))
        self.mms.append(mm)
        pid = next(self._pids)
        self.processes[pid] = Process(pid, mm, name)
        return pid

    def clone_vm(self, pid, name=None):
        """A CLONE_VM helper: shares the address space, holds no fds (QEMU's -async-teardown helper)."""
        parent = self._live_process(pid)
        parent.mm.users += 1
        child = next(self._pids)
        self.processes[child] = Process(child, parent.mm, name or f"cleanup/{pid}")
        return child

    def process_alive(self, pid):
        return self.processes[pid].alive

    def _live_process(self, pid):
        proc = self.processes.get(pid)
        if proc is None or not proc.alive:
            raise ValueError(f"process {pid} is not alive")
        return proc

    def create_vm(self, pid, memory_size, vcpus=1, memory_limit=None):
        proc = self._live_process(pid)
        if memory_size <= 0 or memory_size % SZ_1M:
            raise ValueError("memory_size must be a positive multiple of 1 MiB")
        if vcpus < 0:
            raise ValueError("vcpus must be >= 0")
        vm = Vm(
            id=next(self._vm_ids),
            pid=pid,
            mm=proc.mm,
            memory_size=memory_size,
            memory_limit=memory_limit or memory_size,
            vcpus=[Vcpu(i) for i in range(vcpus)],
            table=self._alloc("table"),
        )
        self.vms[vm.id] = vm
        proc.mm.vms.append(vm.id)
        proc.fds.append(vm.id)
        return vm.id

    def vm_info(self, vm_id):
        vm = self.vms[vm_id]
        return {
            "memory_size": vm.memory_size,
            "memory_limit": vm.memory_limit,
            "asce_type": vm.asce_type,
            "vcpus": len(vm.vcpus),
            "closed": vm.closed,
        }

    def _open_vm(self, vm_id):
        vm = self.vms.get(vm_id)
        if vm is None or vm.closed:
            raise ValueError(f"VM {vm_id} is closed")
        return vm

    # ---- observables ----
    def pv_state(self, vm_id):
        vm = self.vms[vm_id]
        return {
            "handle": vm.handle,
            "protected": vm.handle != 0,
            "set_aside": vm.set_aside is not None,
            "need_cleanup": len(vm.need_cleanup),
            "protected_count": vm.mm.protected_count,
            "dumping": vm.dumping,
            "gisa_enabled": not vm.gisa_disabled,
            "leaked": len(vm.ledger),
            "vcpu_protected": [vcpu.handle != 0 for vcpu in vm.vcpus],
            "service_irq_masked": vm.service_irq_masked,
            "user_cpu_state_ctrl": vm.user_cpu_state_ctrl,
        }

    def page_state(self, vm_id, page):
        """(state, owner handle) of one guest page, as the UV sees it."""
        return self.uv.page_state((vm_id, page))

    # ---- vCPU helpers (kvm_s390_cpus_to_pv/_from_pv, kvm_s390_pv_create_cpu/_destroy_cpu) ----
    def _destroy_cpu(self, vm, vcpu, out):
        if not vcpu.handle:
            return 0
        cc, rc, rrc, _ = self.uv.destroy_cpu(vcpu.handle)
        out.set(rc, rrc)
        if cc == 0:
            self._free(vm, vcpu.stor)
        else:
            self._leak(vm, vcpu.stor)  # intended leak: the UV may still use it
        vcpu.handle = 0  # SIE block handles cleared, sdf = 0, in both cases
        vcpu.stor = None
        return EIO if cc else 0

    def _cpus_from_pv(self, vm, out):
        """Destroy every secure CPU; do not stop on error; first failure's rc/rrc."""
        ret = 0
        for vcpu in vm.vcpus:
            local = Cmd()
            if self._destroy_cpu(vm, vcpu, local) and not ret:
                out.set(local.rc, local.rrc)
                ret = EIO
        vm.gisa_disabled = False  # use_gisa assumed set
        return ret

    def _create_cpu(self, vm, vcpu, out):
        if vcpu.handle:
            return EINVAL
        stor = self._alloc("cpu")
        cc, rc, rrc, cpu = self.uv.create_cpu(vm.handle)
        out.set(rc, rrc)
        vcpu.handle = cpu
        vcpu.stor = stor
        self.resources[stor].guard = cpu
        if cc:
            if vcpu.handle:  # the partial CPU is destroyed
                self._destroy_cpu(vm, vcpu, Cmd())
            elif self.create_cpu_frees:  # nothing was created: the donation just goes back
                self._free(vm, stor)
                vcpu.stor = None
            else:  # 6.2: destroy_cpu returns at once without a CPU handle: kernel memory leaked
                self.resources[stor].state = "stray"
                vcpu.stor = None
            return EIO
        return 0

    def _cpus_to_pv(self, vm, out):
        if not self.feature_aiv:
            vm.gisa_disabled = True
        for vcpu in vm.vcpus:
            ret = self._create_cpu(vm, vcpu, out)
            if ret:
                self._cpus_from_pv(vm, Cmd())
                return ret
        return 0

    def _guest_protected(self, vm, vcpu=0):
        """The guest runs protected on ``vcpu`` iff that vCPU has a secure CPU (sdf 2)."""
        return bool(self._vcpu(vm, vcpu).handle)

    def _vcpu(self, vm, vcpu):
        """A guest runs only on a vCPU (KVM_RUN, which holds vcpu->mutex for the access)."""
        if not 0 <= vcpu < len(vm.vcpus):
            raise ValueError(f"vcpu: no vCPU {vcpu} (the VM has {len(vm.vcpus)})")
        return vm.vcpus[vcpu]

    # ---- gmap table helpers (s390_unlist_old_asce, s390_replace_asce: arch/s390/mm/gmap.c @ 292a7d6fca33) ----
    def _unlist_old_asce(self, vm):
        """Returns the table that was unlisted now, or None if it already was (safe twice)."""
        if not vm.table_listed:
            return None
        vm.table_listed = False
        return vm.table

    def _replace_asce(self, vm):
        """s390_replace_asce: unlist, [Δ6.4] refuse segment ASCE, install a copy."""
        unlisted = self._unlist_old_asce(vm)
        if vm.asce_type == "segment" and self.segment_refused:
            return EINVAL, unlisted
        vm.table = self._alloc("table")
        vm.table_listed = True
        return 0, unlisted

    # ---- teardown machinery (arch/s390/kvm/pv.c @ f7866f582b1c) ----
    def _clear_pv_state(self, vm):
        """kvm_s390_clear_pv_state (Δlatest also ends a dump in progress)."""
        vm.handle = 0
        vm.guest_len = 0
        vm.stor_base = vm.stor_var = None
        if self.clear_resets_dump:
            vm.dumping = False

    def _deinit_vm(self, vm, out):
        """kvm_s390_pv_deinit_vm: Destroy Config of the current VM, no memory walk."""
        cc, rc, rrc, _ = self.uv.destroy_conf(vm.handle)
        out.set(rc, rrc)
        vm.guest_handle = 0  # zeroed whatever the result
        if cc == 0:
            vm.mm.protected_count -= 1
            self._free(vm, vm.stor_base)
            self._free(vm, vm.stor_var)
            self._clear_pv_state(vm)
            return 0
        self._leak(vm, vm.stor_base)
        self._leak(vm, vm.stor_var)
        if vm.handle == 0:
            vm.stuck.append("destroy of a zero NEED_DESTROY handle failed")
        _, unlisted = self._replace_asce(vm)
        self._leak(vm, unlisted)  # nobody keeps a pointer to the unlisted table
        return EIO

    def _deinit_vm_fast(self, vm, out):
        """kvm_s390_pv_deinit_vm_fast: Destroy-Fast of the current VM.  protected_count is not touched."""
        cc, rc, rrc, _ = self.uv.destroy_conf_fast(vm.handle)
        out.set(rc, rrc)
        vm.guest_handle = 0  # zeroed whatever the result
        if cc:
            return EIO
        self._free(vm, vm.stor_base)
        self._free(vm, vm.stor_var)
        self._clear_pv_state(vm)
        return 0

    def _dispose_one_leftover(self, vm, rec, out):
        """kvm_s390_pv_dispose_one_leftover.  rc/rrc written only for a real handle."""
        if rec.handle == 0:
            vm.mm.protected_count -= 1
            return 0
        cc, rc, rrc, _ = self.uv.destroy_conf(rec.handle)
        out.set(rc, rrc)
        if cc:
            self._leak(vm, rec.stor_base)
            self._leak(vm, rec.stor_var)
            self._leak(vm, rec.old_table)
            vm.stuck.append(f"leftover {rec.handle:#x} destroy failed")
            return EIO
        self._free(vm, rec.stor_base)
        self._free(vm, rec.old_table)
        self._free(vm, rec.stor_var)
        vm.mm.protected_count -= 1
        return 0

    def _walk_keys(self, mm, vm=None, below=None):
        return sorted(
            key for key in mm.present if (vm is None or key[0] == vm.id) and (below is None or key[1] < below)
        )

    def _destroy_range(self, keys, reason):
        """__s390_uv_destroy_range body: one destroy per present page, results ignored (6.2);
        Δlatest (gmap_pv_destroy_range): a refused destroy is followed by an export."""
        for key in keys:
            cc, _, _, _ = self.uv.destroy_page(key, reason)
            if cc and self.export_refused:
                self.uv.export_page(key, reason)

    def _range_keys(self, vm):
        """The pages PERFORM and the zap walk: the whole mm (6.2), the VM's own memory (Δlatest)."""
        return self._walk_keys(vm.mm, vm if self.own_memory_walks else None)

    def _deinit_cleanup_all(self, vm, out):
        """kvm_s390_pv_deinit_cleanup_all with the Δ6.5 zero check (5ff92181577a)."""
        mm = vm.mm
        if mm.protected_count == 0:
            return 0
        mm.protected_count += 1
        out.rc = UVC_RC_EXECUTED
        ret = 0
        need_zap = False
        if vm.handle:
            ret = self._deinit_vm(vm, out)
            need_zap = True
        if vm.set_aside is not None:
            vm.need_cleanup.insert(0, vm.set_aside)
            vm.set_aside = None
        while vm.need_cleanup:
            rec = vm.need_cleanup[0]
            need_zap = True
            local = Cmd()
            if self._dispose_one_leftover(vm, rec, local):
                ret = EIO
                if out.rc == UVC_RC_EXECUTED:
                    out.set(local.rc, local.rrc)
            vm.need_cleanup.pop(0)
        if need_zap and mm.alive:
            self._destroy_range(self._range_keys(vm), "cleanup-all")
        mm.protected_count -= 1
        return ret

    def _set_aside(self, vm, out):
        """kvm_s390_pv_set_aside, PREPARE after the CPUs are gone (v6.2 + Δ6.4, 292a7d6fca33)."""
        if vm.set_aside is not None:
            return EINVAL
        if vm.asce_type == "segment" and self.segment_refused:
            return EINVAL
        old_handle = vm.handle
        if self.destroy_fast:
            if self._deinit_vm_fast(vm, out):
                return EIO  # record freed, VM stays protected
            rec = Record()
        else:
            rec = Record(vm.handle, vm.stor_base, vm.stor_var, vm.table)
            vm.guest_handle = 0
            ret, _ = self._replace_asce(vm)  # the old table is held by the record
            if ret:
                return ENOMEM
        self._destroy_range(self._walk_keys(vm.mm, vm, LOW_PAGES), "prepare-low2g")
        left = [
            key
            for key in self._walk_keys(vm.mm, vm, LOW_PAGES)
            if self.uv.page_state(key) in ((SECURE, old_handle), (SHARED, old_handle), (ORPHANED, old_handle))
        ]
        if left and not self.uv.injected_fired:
            self.violations.append(f"I2: PREPARE left {len(left)} old pages below 2 GiB")
        self._clear_pv_state(vm)
        vm.set_aside = rec
        out.set(UVC_RC_EXECUTED, RRC_KVM_SYNTHETIC)
        return 0

    # ---- the ioctl (kvm_arch_vm_ioctl, kvm_s390_handle_pv: arch/s390/kvm/kvm-s390.c @ cc726886079f) ----
    def pv_command(self, vm_id, cmd, rc_in=0, rrc_in=0, flags=0, **data):
        """KVM_S390_PV_COMMAND.  Returns PvResult(errno or 0, rc, rrc) as copied back."""
        vm = self._open_vm(vm_id)
        if cmd == KVM_PV_ASYNC_CLEANUP_PERFORM:
            claim = self.perform_claim(vm_id, rc_in, rrc_in, flags)
            if claim.token is None:
                return claim
            return self.perform_finish(claim.token)
        vm.user_cpu_state_ctrl = True
        if not self.prot_virt:
            return PvResult(EINVAL, rc_in, rrc_in)
        if flags:
            return PvResult(EINVAL, rc_in, rrc_in)
        handler = {
            KVM_PV_ENABLE: self._pv_enable,
            KVM_PV_DISABLE: self._pv_disable,
            KVM_PV_SET_SEC_PARMS: self._pv_set_sec_parms,
            KVM_PV_UNPACK: self._pv_unpack,
            KVM_PV_VERIFY: self._pv_verify,
            KVM_PV_PREP_RESET: self._pv_prep_reset,
            KVM_PV_UNSHARE_ALL: self._pv_unshare_all,
            KVM_PV_INFO: self._pv_info,
            KVM_PV_DUMP: self._pv_dump,
            KVM_PV_ASYNC_CLEANUP_PREPARE: self._pv_prepare,
        }.get(cmd)
        if handler is None:
            return PvResult(ENOTTY, rc_in, rrc_in)
        out = Cmd(rc_in, rrc_in)
        ret, result_data = handler(vm, out, data)
        return PvResult(ret, out.rc, out.rrc, result_data)

    def _pv_enable(self, vm, out, data):
        """KVM_PV_ENABLE: kvm_s390_handle_pv, kvm_s390_pv_init_vm."""
        if vm.handle:
            return EINVAL, None
        # init_vm
        mm = vm.mm
        if self.notifier_first and not vm.notifier_registered:
            vm.notifier_registered = True  # Δlatest: registered before anything is allocated
            mm.notifiers.append(vm.id)
        vm.guest_len = vm.memory_size
        base = self._alloc("base")
        var = self._alloc("var")
        cc, rc, rrc, handle = self.uv.create_conf(vm.table, vm.guest_len)
        out.set(rc, rrc)
        if handle:
            self.config_vm[handle] = vm.id
        self.resources[base].guard = self.resources[var].guard = handle
        vm.handle = handle  # stored whether it worked or not
        vm.stor_base, vm.stor_var = base, var
        mm.protected_count += 1
        if cc:
            if rc & UVC_RC_NEED_DESTROY:
                self._deinit_vm(vm, Cmd())
            else:
                mm.protected_count -= 1
                self._free(vm, base)
                self._free(vm, var)
                self._clear_pv_state(vm)
            return EIO, None
        if not self.imports_use_handle:
            vm.guest_handle = handle
        if not vm.notifier_registered:
            vm.notifier_registered = True
            mm.notifiers.append(vm.id)
        ret = self._cpus_to_pv(vm, out)
        if ret:
            self._deinit_vm(vm, Cmd())
        vm.service_irq_masked = True  # always once init_vm succeeded
        return ret, None

    def _pv_disable(self, vm, out, data):
        """KVM_PV_DISABLE: kvm_s390_handle_pv."""
        if not vm.handle:
            return EINVAL, None
        if self._cpus_from_pv(vm, out):
            return EIO, None  # service IRQs stay masked, no config destroy tried
        ret = self._deinit_cleanup_all(vm, out)
        vm.service_irq_masked = False
        return ret, None

    def _pv_set_sec_parms(self, vm, out, data):
        """KVM_PV_SET_SEC_PARMS: kvm_s390_pv_set_sec_parms (only lengths and the UV's verdict are modelled)."""
        if not vm.handle:
            return EINVAL, None
        if "header" in data:
            length = len(data["header"])
        elif "length" in data:
            length = data["length"]
        else:
            return EFAULT, None
        if length > self.sec_parms_max:
            return EINVAL, None
        if length == 0:
            return ENOMEM, None  # the allocator returns NULL for 0 bytes
        cc, rc, rrc, _ = self.uv.nodata("SET_SEC_CONF_PARAMS", vm.handle, valid=data.get("valid", True))
        out.set(rc, rrc)
        return (EINVAL if cc else 0), None

    def _should_export_before_import(self, mm):
        """should_export_before_import (arch/s390/kernel/uv.c @ 594ce0b8a998).

        Its UNPIN_PAGE_SHARED exclusion never applies: that UVC is not modelled."""
        return not self.feature_misc and mm.protected_count > 1

    def _make_secure(self, vm, page, name, out):
        key = (vm.id, page)
        vm.mm.present.add(key)  # the kernel faults the page in (rc 0x10a / -ENXIO path)
        rule = self._should_export_before_import(vm.mm)
        if rule:
            self.uv.export_page(key, "ebi")  # result ignored
        # UNPACK uses the VM's handle; 6.2's fault handler imports with gmap->guest_handle
        handle = vm.handle if name == "UNPACK_IMG" or self.imports_use_handle else vm.guest_handle
        cc, rc, rrc, _ = self.uv.import_page(name, handle, key, rule)
        out.set(rc, rrc)
        return EINVAL if cc else 0

    def _pv_unpack(self, vm, out, data):
        """KVM_PV_UNPACK: kvm_s390_pv_unpack."""
        if not vm.handle or vm.mm.protected_count == 0:
            return EINVAL, None
        if "addr" not in data or "size" not in data:
            return EFAULT, None
        addr, size = data["addr"], data["size"]
        if addr % PAGE_SIZE or size == 0 or size % PAGE_SIZE:
            return EINVAL, None
        for offset in range(0, size, PAGE_SIZE):
            gaddr = addr + offset
            if gaddr + PAGE_SIZE > vm.memory_size:
                return EFAULT, None  # no gmap translation; rc/rrc stay from the last UVC tried
            ret = self._make_secure(vm, gaddr // PAGE_SIZE, "UNPACK_IMG", out)
            if ret:
                return ret, None
        return 0, None

    def _nodata_cmd(self, vm, out, name):
        """VERIFY, PREP_RESET, UNSHARE_ALL: one nodata UVC (uv_cmd_nodata); a UV error gives -EINVAL (invariant 22)."""
        if not vm.handle:
            return EINVAL, None
        cc, rc, rrc, _ = self.uv.nodata(name, vm.handle)
        out.set(rc, rrc)
        return (EINVAL if cc else 0), None

    def _pv_verify(self, vm, out, data):
        return self._nodata_cmd(vm, out, "VERIFY_IMG")

    def _pv_prep_reset(self, vm, out, data):
        return self._nodata_cmd(vm, out, "PREPARE_RESET")

    def _pv_unshare_all(self, vm, out, data):
        return self._nodata_cmd(vm, out, "SET_UNSHARE_ALL")

    def _pv_info(self, vm, out, data):
        """KVM_PV_INFO (kvm_s390_handle_pv_info): works protected or not; rc/rrc untouched."""
        if "id" not in data or "len_max" not in data:
            return EFAULT, None
        info_id, len_max = data["id"], data["len_max"]
        if len_max < INFO_HEADER_LEN:
            return EINVAL, None
        if info_id == KVM_PV_INFO_VM:
            if len_max < INFO_VM_LEN:
                return EINVAL, None
            return 0, {
                "id": info_id,
                "len_written": INFO_VM_LEN,
                "inst_calls_list": self.uv.installed_calls(),
                "feature_indication": self.uv.feature_indications(),
            }
        if info_id == KVM_PV_INFO_DUMP:
            if len_max < INFO_DUMP_LEN:
                return EINVAL, None
            return 0, {
                "id": info_id,
                "len_written": INFO_DUMP_LEN,
                "dump_config_mem_buffer_per_1m": self.conf_dump_storage_state_len,
                "dump_config_finalize_len": self.conf_dump_finalize_len,
            }
        return EINVAL, None

    def _pv_dump(self, vm, out, data):
        """KVM_PV_DUMP: kvm_s390_pv_dmp, kvm_s390_pv_dump_stor_state, kvm_s390_pv_dump_complete."""
        if not vm.handle:
            return EINVAL, None
        if "subcmd" not in data:
            return EFAULT, None
        subcmd = data["subcmd"]
        buff_len = data.get("buff_len", 0)
        gaddr = data.get("gaddr", 0)
        if subcmd == KVM_PV_DUMP_INIT:
            if vm.dumping:
                return EINVAL, None
            cc, rc, rrc, _ = self.uv.nodata("DUMP_INIT", vm.handle)
            out.set(rc, rrc)
            if cc:
                return EINVAL, None
            vm.dumping = True
            return 0, None
        if subcmd == KVM_PV_DUMP_CONFIG_STOR_STATE:
            state_len = self.conf_dump_storage_state_len
            if not vm.dumping:
                return EINVAL, None
            if gaddr % SZ_1M or buff_len == 0 or buff_len % state_len:
                out.set(0, 0)  # the error exit copies the (zero) UVC header back
                return EINVAL, None
            written = 0
            while written < buff_len:
                cc, rc, rrc, _ = self.uv.nodata("DUMP_CONF_STOR_STATE", vm.handle, gaddr=gaddr)
                out.set(rc, rrc)
                if cc:
                    return EINVAL, {"bytes_copied": written}  # dmp struct not copied back
                written += state_len
                gaddr += SZ_1M
            return 0, {"bytes_copied": written, "gaddr": gaddr}
        if subcmd == KVM_PV_DUMP_COMPLETE:
            if not vm.dumping or buff_len < self.conf_dump_finalize_len:
                return EINVAL, None
            cc, rc, rrc, _ = self.uv.nodata("DUMP_COMPLETE", vm.handle)
            out.set(rc, rrc)
            if cc:
                return EINVAL, None
            vm.dumping = False
            return 0, {"bytes_copied": self.conf_dump_finalize_len}
        return ENOTTY, None  # DUMP_CPU included: only via the vCPU ioctl

    def _pv_prepare(self, vm, out, data):
        """KVM_PV_ASYNC_CLEANUP_PREPARE: kvm_s390_handle_pv.  kvm->lock held throughout."""
        if not vm.handle or not self.async_destroy:
            return EINVAL, None
        if self._cpus_from_pv(vm, out):
            return EIO, None  # the service-IRQ mask is not cleared on this path
        ret = self._set_aside(vm, out)
        vm.service_irq_masked = False  # whatever set_aside returned
        return ret, None

    # ---- PERFORM (kvm_s390_pv_deinit_aside_vm), split so interleavings can be modelled ----
    def perform_claim(self, vm_id, rc_in=0, rrc_in=0, flags=0):
        """Prologue + step a/b of deinit_aside_vm.  PvResult.token is set on a claim."""
        vm = self._open_vm(vm_id)
        vm.user_cpu_state_ctrl = True
        if not self.prot_virt or flags or not self.async_destroy:
            return PvResult(EINVAL, rc_in, rrc_in)
        rec = vm.set_aside
        vm.set_aside = None
        if rec is None:
            return PvResult(EINVAL, rc_in, rrc_in)
        token = PerformToken(next(self._token_ids), vm, rec, rc_in, rrc_in)
        self.tokens[token.id] = token
        vm.inflight += 1
        return PvResult(0, rc_in, rrc_in, token=token.id)

    def perform_finish(self, token_id, interrupted=False, batches=0):
        """Walk + dispose, atomically.  ``interrupted``: a fatal signal was seen after
        ``batches`` batches of 32 present pages (the check also runs after the last batch)."""
        token = self.tokens.pop(token_id)
        vm = token.vm
        keys = self._range_keys(vm)
        out = Cmd(token.rc_in, token.rrc_in)
        if interrupted:
            self._destroy_range(keys[: batches * BATCH_PAGES], "perform")
            vm.need_cleanup.insert(0, token.record)  # list_add: front (see docs/MODEL.md)
            vm.inflight -= 1
            out.set(UVC_RC_EXECUTED, RRC_KVM_SYNTHETIC)
            ret = 0
        else:
            self._destroy_range(keys, "perform")
            ret = self._dispose_one_leftover(vm, token.record, out)
            vm.inflight -= 1
        if vm.closed and not vm.destroyed and vm.inflight == 0 and vm.pid not in self._exiting:
            self._kvm_arch_destroy_vm(vm)  # the fd's last reference was the running ioctl
        return PvResult(ret, out.rc, out.rrc)

    def inflight_tokens(self, vm_id=None):
        return [t for t, tok in self.tokens.items() if vm_id is None or tok.vm.id == vm_id]

    # ---- vCPU hotplug ----
    def create_vcpu(self, vm_id):
        """A vCPU created while protected gets a secure CPU; on failure no vCPU is created."""
        vm = self._open_vm(vm_id)
        vcpu = Vcpu(len(vm.vcpus))
        out = Cmd()
        if vm.handle:
            ret = self._create_cpu(vm, vcpu, out)
            if ret:
                return PvResult(ret, out.rc, out.rrc)
        vm.vcpus.append(vcpu)
        return PvResult(0, out.rc, out.rrc, data=vcpu.index)

    # ---- memory access fault model (the storage-exception handlers, should_export_before_import) ----
    def _check_range(self, vm, page, n):
        if page < 0 or n < 0 or page + n > vm.pages:
            raise ValueError("page range outside guest memory")

    def _host_fault(self, key):
        """Secure-storage-access exception: pin-shared first, then export (arch_make_page_accessible)."""
        state, _ = self.uv.page_state(key)
        if state in (SECURE, ORPHANED):
            cc, _, _, _ = self.uv.pin_shared(key)
            if cc:
                cc, _, _, _ = self.uv.export_page(key, "host")
                if cc:
                    return EFAULT
        return 0

    def host_access(self, vm_id, page, n=1):
        """The VMM touches guest memory: secure pages are exported, never read in plaintext."""
        vm = self._open_vm(vm_id)
        self._check_range(vm, page, n)
        for p in range(page, page + n):
            key = (vm.id, p)
            vm.mm.present.add(key)
            if self._host_fault(key):
                return EFAULT
        return 0

    def guest_access(self, vm_id, page, n=1, write=True, vcpu=0):
        """The guest running on ``vcpu`` touches pages ``page .. page+n-1``.  Returns 0 or an
        errno; ValueError if the VM has no such vCPU."""
        vm = self._open_vm(vm_id)
        self._check_range(vm, page, n)
        protected = self._guest_protected(vm, vcpu)
        for p in range(page, page + n):
            key = (vm.id, p)
            vm.mm.present.add(key)
            if not protected:
                if self._host_fault(key):  # a non-secure guest faults like the host
                    return EFAULT
                continue
            state, owner = self.uv.page_state(key)
            if owner == vm.handle and state in (SECURE, SHARED):
                continue
            if state == SHARED:
                continue  # another guest's shared page raises no exception
            if state in (SECURE, ORPHANED):
                # secure-storage violation: gmap_destroy_page, fallback export, guest retries
                cc, _, _, _ = self.uv.destroy_page(key, "violation")
                if cc:
                    cc, _, _, _ = self.uv.export_page(key, "violation")
                    if cc:
                        return EFAULT
            # non-secure-storage access: import through make-secure
            if self._make_secure(vm, p, "CONV_TO_SEC_STOR", Cmd()):
                return EINVAL
        return 0

    def guest_share(self, vm_id, page, n=1, vcpu=0):
        """The guest protected on ``vcpu`` makes pages shared (guest-side SET_SHARED_ACCESS per page)."""
        vm = self._open_vm(vm_id)
        self._check_range(vm, page, n)
        if not self._guest_protected(vm, vcpu):
            return EINVAL
        for p in range(page, page + n):
            ret = self.guest_access(vm_id, p, 1, vcpu=vcpu)
            if ret:
                return ret
            cc, _, _, _ = self.uv.set_shared(vm.handle, (vm.id, p))
            if cc:
                return EINVAL
        return 0

    # ---- VM destroy, mm teardown, process exit (kvm_arch_destroy_vm, the mm-release notifier, exit_mmap) ----
    def _notifier_release(self, vm):
        """kvm_s390_pv_mmu_notifier_release: runs once per subscription."""
        vm.mm.notifiers.remove(vm.id)
        if self._cpus_from_pv(vm, Cmd()):
            return
        if self.destroy_fast and vm.handle:
            if self._deinit_vm_fast(vm, Cmd()) == 0:
                vm.stuck.append("notifier destroy-fast (count not decremented)")

    def _kvm_arch_destroy_vm(self, vm):
        """kvm_arch_destroy_vm (arch/s390/kvm/kvm-s390.c @ cc726886079f)."""
        mm = vm.mm
        for vcpu in vm.vcpus:
            self._destroy_cpu(vm, vcpu, Cmd())
        vm.vcpus = []  # kvm_destroy_vcpus
        self._deinit_cleanup_all(vm, Cmd())
        if vm.id in mm.notifiers:  # still subscribed, so the mm is alive
            self._notifier_release(vm)  # unregister calls release on a live subscription
        if vm.table_listed:
            self._free(vm, vm.table)  # the gmap frees listed tables only
            vm.table_listed = False
        vm.destroyed = True
        if self.unmap_on_close and mm.alive:
            keys = self._walk_keys(mm, vm)
            if mm.protected_count > 0:
                for key in keys:  # partial unmap of a protected mm: export (ptep_get_and_clear_full)
                    self.uv.export_page(key, "unmap")
            self._drop_pages(mm, keys)

    def close_vm(self, vm_id):
        """vm.close(): kvm_arch_destroy_vm, deferred while a PERFORM on this VM is running."""
        vm = self.vms[vm_id]
        if vm.closed:
            return
        vm.closed = True
        proc = self.processes[vm.pid]
        if vm_id in proc.fds:
            proc.fds.remove(vm_id)
        if vm.inflight == 0:
            self._kvm_arch_destroy_vm(vm)

    def _drop_pages(self, mm, keys):
        """The host frees page frames; a frame the UV still calls secure stays in the UV."""
        for key in keys:
            mm.present.discard(key)
            if self.uv.page_state(key)[0] == EXPORTED:
                del self.uv.pages[key]

    def _mm_teardown(self, mm):
        """exit_mmap: notifier release, then per-page destroy (fallback export) if protected."""
        for vm_id in list(mm.notifiers):
            self._notifier_release(self.vms[vm_id])
        keys = sorted(mm.present)
        if mm.protected_count > 0:
            for key in keys:
                cc, _, _, _ = self.uv.destroy_page(key, "mm-teardown")
                if cc:
                    self.uv.export_page(key, "mm-teardown")
        self._drop_pages(mm, keys)

    def _mmput(self, mm):
        mm.users -= 1
        if mm.users == 0:
            self._mm_teardown(mm)

    def exit(self, pid):
        """Process exit in kernel order: stop interruptible work, drop mm user, close fds."""
        proc = self.processes[pid]
        if not proc.alive:
            return
        self._exiting.add(pid)
        for token_id, token in list(self.tokens.items()):
            if token.vm.pid == pid:
                self.perform_finish(token_id, interrupted=True, batches=0)
        self._mmput(proc.mm)
        # file releases run after exit_mm: fds still open, and VMs whose last reference
        # was an ioctl that has just been interrupted
        for vm_id in proc.mm.vms:
            vm = self.vms[vm_id]
            if vm.pid == pid and vm.closed and not vm.destroyed and vm.inflight == 0:
                self._kvm_arch_destroy_vm(vm)
        for vm_id in list(proc.fds):
            self.close_vm(vm_id)
        self._exiting.discard(pid)
        proc.alive = False

    def kill(self, pid):
        """A fatal signal: in-flight PERFORM walks stop at the next batch boundary, then exit."""
        self.exit(pid)


# --------------------------------------------------------------------------------------------
# Invariants, numbered as in docs/VERIFICATION.md §8.


def check_invariants(model):
    """Return violations of the invariants (docs/VERIFICATION.md §8) that can be checked on a state (as text)."""
    problems = list(model.violations)
    uv = model.uv
    clean = uv.injected_fired == 0

    for mm in model.mms:
        vms = [model.vms[v] for v in mm.vms]
        # 8: protected_count equals the sum of its parts (outside cleanup-all).
        expected = sum(
            (vm.handle != 0) + (vm.set_aside is not None) + len(vm.need_cleanup) + vm.inflight + len(vm.stuck)
            for vm in vms
        )
        if mm.protected_count != expected:
            problems.append(f"I8: mm {mm.id} protected_count {mm.protected_count} != {expected}")
        if mm.protected_count < 0:
            problems.append(f"I8: mm {mm.id} protected_count negative")
        # 9: leftovers keep the mm protected.
        if any(vm.set_aside or vm.need_cleanup for vm in vms) and mm.protected_count == 0:
            problems.append(f"I9: mm {mm.id} has leftovers but is not protected")
        # 13: full teardown leaves nothing behind (no failures injected).
        if clean and not mm.alive and all(vm.destroyed for vm in vms):
            owned = set()
            for vm in vms:
                if vm.set_aside or vm.need_cleanup:
                    problems.append(f"I13: VM {vm.id} keeps records after teardown")
                if vm.ledger:
                    problems.append(f"I13: VM {vm.id} ledger not empty: {vm.ledger}")
                if any("notifier" not in reason for reason in vm.stuck):
                    problems.append(f"I13: VM {vm.id} has stuck counts {vm.stuck}")
            for handle in uv.configs:
                if model.config_vm.get(handle) in mm.vms:
                    owned.add(handle)
            if owned:
                problems.append(f"I13: configs of mm {mm.id} still live: {sorted(owned)}")
            left = [k for k, (s, _) in uv.pages.items() if k[0] in mm.vms and s in SECURE_STATES]
            if left:
                problems.append(f"I13: {len(left)} secure/orphaned pages left in mm {mm.id}")
            notifier_refs = sum(len(vm.stuck) for vm in vms)
            if mm.protected_count != notifier_refs:
                problems.append(f"I13: mm {mm.id} protected_count {mm.protected_count} at end")

    for vm in model.vms.values():
        # 1/2 structural: vCPU protected implies VM handle; set_aside is one record at most.
        if any(vcpu.handle for vcpu in vm.vcpus) and not vm.handle:
            problems.append(f"VM {vm.id}: protected vCPU without a config handle")
        if vm.set_aside is not None and not isinstance(vm.set_aside, Record):
            problems.append(f"I1: VM {vm.id} set_aside is not a single record")
        if vm.handle and vm.handle not in uv.configs and clean:
            problems.append(f"VM {vm.id} handle {vm.handle:#x} is not a live config")

    # 10: every config destroyed at most once, by one kind of destroy; CPUs at most once.
    for handle, names in uv.destroyed.items():
        if len(names) > 1:
            problems.append(f"I10: config {handle:#x} destroyed {len(names)} times: {names}")
    for cpu, times in uv.cpus_destroyed.items():
        if times > 1:
            problems.append(f"I10: CPU {cpu:#x} destroyed {times} times")
    if clean:
        live_records = {
            rec.handle
            for vm in model.vms.values()
            for rec in ([vm.set_aside] if vm.set_aside else []) + vm.need_cleanup
        } | {tok.record.handle for tok in model.tokens.values()}
        for handle in uv.configs:
            owners = [vm for vm in model.vms.values() if vm.handle == handle]
            if not owners and handle not in live_records:
                problems.append(f"I10: config {handle:#x} is live but nobody refers to it")

    # 11: no config destroy is issued while the config has CPUs (no injected failures).
    if clean:
        for name, handle in uv.destroy_with_cpus:
            problems.append(f"I11: {name} issued for config {handle:#x} that still has CPUs")
        known = {vcpu.handle for vm in model.vms.values() for vcpu in vm.vcpus if vcpu.handle}
        unknown = set(uv.cpus) - known
        if unknown:
            problems.append(f"I11: UV CPUs without a vCPU: {sorted(unknown)}")

    # 12: the ledger only ever holds resources in the "leaked" state.
    for vm in model.vms.values():
        for rid in vm.ledger:
            if model.resources[rid].state != "leaked":
                problems.append(f"I12: ledger entry {rid} is {model.resources[rid].state}")
        if clean and vm.ledger:
            problems.append(f"I12: VM {vm.id} leaked {vm.ledger} without any UVC failure")

    # 15: no destroy pass changed a page whose owner had CPUs (UV refuses; checked in trace).
    # 23: export-before-import exactly when the rule said so, right before the import.
    previous = None
    for event in uv.trace:
        if event.reason == "import":
            ebi_before = (
                previous is not None
                and previous.name == "CONV_FROM_SEC_STOR"
                and previous.reason == "ebi"
                and previous.arg == event.arg
            )
            if event.ebi_rule and not ebi_before:
                problems.append(f"I23: import of {event.arg} without export-before-import")
            if not event.ebi_rule and ebi_before:
                problems.append(f"I23: export-before-import of {event.arg} not due")
        previous = event

    # 16: orphaned/secure pages are only ever reached by the host after a destroy or export:
    # structural in host_access/guest_access; a page the host freed while secure is reported.
    if clean:
        for key, (state, _) in uv.pages.items():
            vm = model.vms.get(key[0])
            if state in SECURE_STATES and vm is not None and key not in vm.mm.present:
                problems.append(f"I16: page {key} is {state} but no longer mapped by the host")
    return problems
