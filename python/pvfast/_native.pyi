"""Type stub of pvfast._native: the emulated Ultravisor (Rust, PyO3).

This file is the contract between the Rust core (rust/pvfast-core, glue in rust/pvfast-py)
and the Python KVM layer (python/pvfast). Users never import _native directly.

Conventions
-----------
* Every call returns a named result (``UvcResult``, ``HandleResult``, ``WalkResult``, ...; see
  "Results" below). A UVC's result starts with ``cc, rc, rrc``: cc 0 = success (rc 0x0001),
  cc 1 = error with the UV's rc/rrc. UV errors are *never* Python exceptions.
* Every UVC execution, successful or failed or injected, adds one to ``stats()[name]``.
* ``inject_failure`` makes the next N executions of one UVC return cc 1 with that rc/rrc and change
  nothing.
* Addresses: ``gaddr`` is a guest absolute address inside the configuration's guest storage
  (the Region it was created with); ``paddr`` is a host absolute address (``region.base + offset``).
* Python misuse (negative numbers, ints that do not fit u64, wrong types) raises ``TypeError`` /
  ``ValueError`` / ``OverflowError`` naming the argument; out-of-range or unaligned addresses given
  to a UVC are UV errors (rc), not exceptions.
* Methods marked "GIL released" run their heavy part inside ``py.detach``.
"""

from typing import Final, Self, final

__all__ = [
    "BATCH_PAGES",
    "UVC_NAMES",
    "HOST_KEY_DEFAULT",
    "IMAGE_MAX_COMPONENTS",
    "IMAGE_MAX_HEADER_LEN",
    "PAGE_SIZE",
    "RC_APQN_BOUND",
    "RC_EXECUTED",
    "RC_INV_CMD",
    "RC_INV_CPU_HANDLE",
    "RC_INV_GUEST_HANDLE",
    "RC_INV_LEN",
    "RC_INV_STATE",
    "RC_NEED_DESTROY",
    "RC_PAGE_NOT_ACCESSIBLE",
    "AccessResult",
    "Account",
    "AccountSnapshot",
    "CallResult",
    "CancelToken",
    "DumpResult",
    "HandleResult",
    "ImportResult",
    "KernelMutex",
    "PageInfo",
    "Region",
    "SealedImage",
    "SecureStorageAccess",
    "TeardownResult",
    "Ultravisor",
    "UnpackResult",
    "UvcResult",
    "WalkResult",
    "advance_clock_to",
    "bind_accounts",
    "build_profile",
    "current_clock_ps",
    "image_decrypt_page",
    "image_parse",
    "image_seal",
    "image_verify",
    "set_accounting_enabled",
]

build_profile: Final[str]  # "release" or "debug"
PAGE_SIZE: Final[int]  # 4096
BATCH_PAGES: Final[int]  # 32: present pages per batch of an interruptible walk (GATHER_GET_PAGES)
RC_EXECUTED: Final[int]  # 0x0001
RC_INV_CMD: Final[int]  # 0x0002
RC_INV_STATE: Final[int]  # 0x0003
RC_INV_LEN: Final[int]  # 0x0005
RC_NEED_DESTROY: Final[int]  # 0x8000 flag in a Create Config rc
RC_INV_GUEST_HANDLE: Final[int]  # 0x0020
RC_INV_CPU_HANDLE: Final[int]  # 0x0021
RC_APQN_BOUND: Final[int]  # 0x0104 (Destroy-Fast refused: AP queues still bound)
RC_PAGE_NOT_ACCESSIBLE: Final[int]  # 0x010a (import/unpack: page not mapped; kernel faults in and retries)

class SecureStorageAccess(Exception):
    """Raised by Region.read/write when the host touches a SECURE page (a kernel bug in the caller)."""

# ---- Results ----
# Frozen, hashable, compared by value; fields are read by name.

@final
class UvcResult:
    """One UVC: condition code (0 success, 1 error) and the UV's return codes."""

    def __new__(cls, cc: int, rc: int, rrc: int) -> Self: ...
    @property
    def cc(self) -> int: ...
    @property
    def rc(self) -> int: ...
    @property
    def rrc(self) -> int: ...

@final
class HandleResult:
    """Create Config / Create CPU: status and the new handle (0 on failure, unless a Create Config
    rc carries the 0x8000 NEED_DESTROY flag)."""

    def __new__(cls, cc: int, rc: int, rrc: int, handle: int) -> Self: ...
    @property
    def cc(self) -> int: ...
    @property
    def rc(self) -> int: ...
    @property
    def rrc(self) -> int: ...
    @property
    def handle(self) -> int: ...

@final
class DumpResult:
    """A dump UVC: status and the data the UV wrote (empty on failure)."""

    def __new__(cls, cc: int, rc: int, rrc: int, data: bytes) -> Self: ...
    @property
    def cc(self) -> int: ...
    @property
    def rc(self) -> int: ...
    @property
    def rrc(self) -> int: ...
    @property
    def data(self) -> bytes: ...

@final
class CallResult:
    """A raw UVCB call: condition code and the block with rc/rrc and output fields filled in."""

    def __new__(cls, cc: int, block: bytes) -> Self: ...
    @property
    def cc(self) -> int: ...
    @property
    def block(self) -> bytes: ...

@final
class WalkResult:
    """destroy_walk: present pages visited (destroy-page UVCs issued), pages made non-secure,
    whether it was interrupted, first page not known to be done (the end when not interrupted)."""

    def __new__(cls, visited: int, destroyed: int, interrupted: bool, resume_page: int) -> Self: ...
    @property
    def visited(self) -> int: ...
    @property
    def destroyed(self) -> int: ...
    @property
    def interrupted(self) -> bool: ...
    @property
    def resume_page(self) -> int: ...

@final
class ImportResult:
    """import_range: UVCs issued per kind (as in stats()), imports that failed, and the rc of the
    first failed import (0 if none failed)."""

    def __new__(cls, imports: int, exports: int, destroys: int, failed_pages: int, first_failure_rc: int) -> Self: ...
    @property
    def imports(self) -> int: ...
    @property
    def exports(self) -> int: ...
    @property
    def destroys(self) -> int: ...
    @property
    def failed_pages(self) -> int: ...
    @property
    def first_failure_rc(self) -> int: ...

@final
class AccessResult:
    """make_accessible_range: successful pins and exports, and the pages that stay secure."""

    def __new__(cls, pinned: int, exported: int, failed: int) -> Self: ...
    @property
    def pinned(self) -> int: ...
    @property
    def exported(self) -> int: ...
    @property
    def failed(self) -> int: ...

@final
class TeardownResult:
    """mm_teardown: pages made non-secure by a destroy, successful exports."""

    def __new__(cls, destroyed: int, exported: int) -> Self: ...
    @property
    def destroyed(self) -> int: ...
    @property
    def exported(self) -> int: ...

@final
class UnpackResult:
    """unpack_range: status "ok" | "eagain" | "einval" | "efault", rc/rrc of the last unpack UVC
    (0, 0 if none), pages unpacked."""

    def __new__(cls, status: str, rc: int, rrc: int, pages_done: int) -> Self: ...
    @property
    def status(self) -> str: ...
    @property
    def rc(self) -> int: ...
    @property
    def rrc(self) -> int: ...
    @property
    def pages_done(self) -> int: ...

@final
class PageInfo:
    """Region.page_state: the state name and the owner handle (0 if none)."""

    def __new__(cls, state: str, owner: int) -> Self: ...
    @property
    def state(self) -> str: ...
    @property
    def owner(self) -> int: ...

@final
class SealedImage:
    """image_seal: the SE header and the encrypted components, padded to 4 KiB."""

    def __new__(cls, header: bytes, components: list[bytes]) -> Self: ...
    @property
    def header(self) -> bytes: ...
    @property
    def components(self) -> list[bytes]: ...

@final
class AccountSnapshot:
    """Account.snapshot(): the counters of one account. ``uvcs`` and ``uv_pages`` are indexed like
    ``UVC_NAMES``; CPU times in ns, modelled times in ps."""

    def __new__(
        cls,
        uvcs: list[int],
        uv_pages: list[int],
        ptes: int,
        zeroed: int,
        faulted: int,
        walks: int,
        tasks: int,
        cpu_ns: int,
        worker_cpu_ns: int,
        work_ps: int,
        clock_ps: int,
    ) -> Self: ...
    @property
    def uvcs(self) -> list[int]: ...  # UVC executions
    @property
    def uv_pages(self) -> list[int]: ...  # pages the UV processed inside each UVC (Destroy Config, Unshare All)
    @property
    def ptes(self) -> int: ...  # present PTEs visited by kernel walks (destroy ranges, unmaps)
    @property
    def zeroed(self) -> int: ...  # 4 KiB pages the UV cleared
    @property
    def faulted(self) -> int: ...  # pages faulted in (first touch)
    @property
    def walks(self) -> int: ...  # kernel walks started
    @property
    def tasks(self) -> int: ...  # worker tasks run on the UV's pools for this account
    @property
    def cpu_ns(self) -> int: ...  # thread CPU time, caller and workers
    @property
    def worker_cpu_ns(self) -> int: ...  # the workers' part of cpu_ns
    @property
    def work_ps(self) -> int: ...  # modelled cost of the work counted (cost table of the account)
    @property
    def clock_ps(self) -> int: ...  # the modelled clock (work plus waits; not reset)

# ---- accounting and the modelled clock ----
# UVC work is charged to the accounts the calling thread has bound (bind_accounts): its emulated
# thread's and the VM's. Walks carry the binding into their worker tasks. CPU time: thread CPU
# time of each walk or range call and of each worker task; O(1) UVCs are timed by elapsed time
# (they never sleep, and the CPU clock costs more than they do). Work with no account of the UV
# bound goes to Ultravisor.unattributed().

UVC_NAMES: Final[tuple[str, ...]]  # UVC names in the order of AccountSnapshot.uvcs and of set_costs

@final
class Account:
    """The UV work of one emulated thread or VM: counters, CPU time and the modelled clock."""

    @property
    def id(self) -> int: ...  # unique in this process
    @property
    def clock_ps(self) -> int: ...
    def advance_to(self, ps: int) -> int:
        """A wait: move the clock to at least ps; returns the clock afterwards."""
    def snapshot(self) -> AccountSnapshot: ...
    def reset(self) -> None:
        """Zero the usage counters (the clock stays)."""

def bind_accounts(thread: Account | None, vm: Account | None = None) -> None:
    """Charge the calling thread's UV work from now on to ``thread`` and ``vm``; None unbinds."""

def current_clock_ps() -> int | None:
    """The clock (ps) of the calling thread's bound thread account; None if none is bound."""

def advance_clock_to(ps: int) -> int | None:
    """A wait of the calling thread: its bound thread account's clock moves to at least ps.
    Returns the clock afterwards; None if none is bound."""

def set_accounting_enabled(on: bool) -> None:
    """Benchmarks only: switch per-account counting and CPU timing off or on (process-wide)."""

@final
class KernelMutex:
    """A mutex whose waits take part in the modelled clock (the emulated kvm->lock): a thread
    acquiring it at a modelled time inside another thread's last non-empty hold moves to the end
    of that hold. The methods of threading.Lock; waiting releases the GIL, and a signal handler's
    exception (KeyboardInterrupt) ends the wait as it ends threading.Lock.acquire."""

    def __init__(self) -> None: ...
    def acquire(self, blocking: bool = True, timeout: float = ...) -> bool: ...  # timeout -1: for ever
    def release(self) -> None: ...  # RuntimeError if not locked
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *_args: object) -> None: ...

@final
class CancelToken:
    """A fatal-signal flag shared between threads. Walks check it once per batch."""

    def __init__(self) -> None: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...

@final
class Region:
    """Guest storage: an anonymous mapping reserved up front (MAP_NORESERVE), registered with a UV.

    Untouched pages cost no RAM. Page metadata (4 bytes/page) is also a lazily-zeroed mapping.
    """

    @property
    def size(self) -> int: ...  # bytes
    @property
    def pages(self) -> int: ...
    @property
    def base(self) -> int: ...  # host absolute address of offset 0 (page aligned, unique per UV)
    @property
    def id(self) -> int: ...
    def present_pages(self) -> int: ...  # pages touched so far ("present PTEs")
    @property
    def guest_memory(self) -> str:
        """ "real" or "state" (see Ultravisor.create_region)."""
    def data_pages(self) -> int:
        """Pages whose bytes may be non-zero: a state-only region's pages that hold data (the only
        ones backed by host memory); every present page of a real region."""
    def page_state(self, index: int) -> PageInfo:
        """state "nonsecure" | "secure" | "shared" | "exported" | "orphaned", owner handle or 0.

        "orphaned" = secure or shared page whose configuration was removed by Destroy-Fast
        (owner = the dead handle). A page exported while its configuration lived reads as
        "nonsecure", owner 0 once that configuration is gone (nobody can import it back); an
        orphan exported after Destroy-Fast reads as "exported" by the dead handle. IndexError for
        an index out of range.
        """
    def state_counts(self) -> dict[str, int]:
        """Counts of pages per state over the region (keys as page_state, plus "present")."""
    def read(self, offset: int, size: int, *, as_config: int = 0) -> bytes:
        """Read bytes. as_config=0 is the host's view: SECURE (and orphaned-secure) pages raise
        SecureStorageAccess; EXPORTED pages return ciphertext; SHARED pages return plaintext.
        as_config=h is guest h's view: pages must be NONSECURE, or SECURE/SHARED owned by h
        (else SecureStorageAccess); ValueError if h is not a live configuration. Touches (makes
        present) the pages read. ValueError out of range or for more than 1 GiB at once."""
    def write(self, offset: int, data: bytes, *, as_config: int = 0) -> None:
        """Write bytes with the same access rules as read. Touches the pages."""
    def bench_zero(self, nontemporal: bool = True, parallel: bool = True) -> float:
        """Benchmark floor only: seconds to zero the region's whole memory (non-temporal stores
        or memset; on the UV's pool or the caller's thread), page states untouched. GIL released."""
    def touch(self, offset: int, size: int) -> int:
        """First-touch pages (host page fault): make them present, content zero. GIL released.
        Returns the number of pages that became present."""

@final
class Ultravisor:
    """One emulated Ultravisor (one per emulated host). Thread-safe; frozen."""

    def __new__(
        cls,
        *,
        destroy_fast: bool = True,  # installed-call bit 23
        feature_misc: bool = True,  # feature bit 0 (MSB-0)
        feature_aiv: bool = True,  # feature bit 1
        dump: bool = True,  # installed-call bits 24..27
        max_guests: int = 4096,
        max_cpus: int = 248,
        legacy_destroy_rc: bool = False,  # destroy-page on a NONSECURE page answers rc 0x107/rrc 0xd
        threads: int = 0,  # rayon threads for walks; 0 = number of CPUs
        initialised: bool = True,  # False: every UVC but QUI/INIT_UV answers 0x0003 until INIT_UV
    ) -> Ultravisor: ...
    # ---- inspection (not UVCs; do not count) ----
    def info(self) -> dict[str, int | tuple[int, int, int, int]]:
        """uv_info, the host's QUI answer: inst_calls_list (4 u64 words, MSB-0 bits; the guest-only
        share calls, bits 8 and 9, are not indicated to a host), uv_base_stor_len (what INIT_UV
        donates), uv_feature_indications,
        guest_base_stor_len, guest_virt_base_stor_len, guest_virt_var_stor_len, guest_cpu_stor_len,
        max_guest_cpu_id, max_num_sec_conf, max_sec_stor_addr, conf_dump_storage_state_len,
        conf_dump_finalize_len."""
    def stats(self) -> dict[str, int]: ...  # keyed by Uvc member name (e.g. "DESTR_SEC_STOR")
    def reset_stats(self) -> None: ...
    def config_handles(self) -> set[int]: ...
    def cpu_handles(self, handle: int) -> set[int]: ...  # KeyError if no such config
    def secure_pages(self, handle: int | None = None) -> int:
        """Pages that are SECURE, SHARED or ORPHANED and owned by handle (any owner if None).
        A dead (fast-destroyed) handle still counts its orphaned pages. O(1)."""
    def donated_bytes(self) -> int:
        """Storage currently donated to the UV through UVCs: configs and CPUs, plus INIT_UV's
        base storage when this UV was built with initialised=False and initialised by a call
        (a default UV's boot-time donation happened before it existed and is not counted)."""
    def is_initialised(self) -> bool: ...  # INIT_UV done (not a UVC, does not count)
    def table_sizes(self) -> dict[str, int]:
        """The UV's configuration tables: configs (records kept: live ones and dead ones some
        page still refers to), live, dead, id_slots (ids handed out at once, at most 2**27-1)
        and free_ids among them, cpus, asces. A dead configuration is retired, and its id
        reused, once no page names it (orphaned and exported pages do)."""
    def inject_failure(self, uvc: int, rc: int, rrc: int = 0, count: int = 1) -> None:
        """ValueError for an unknown UVC code, rc == 0x0001, or count < 1.
        Exception: an injected Create Config rc with the 0x8000 (NEED_DESTROY) flag does create
        the configuration and returns its handle, as the architecture defines that flag."""
    def clear_failures(self) -> None: ...
    def create_region(self, size: int, *, guest_memory: str = "real") -> Region:
        """ValueError unless size is a positive multiple of PAGE_SIZE. OSError if mmap fails.

        guest_memory "state": a touched page costs only its state word; host memory backs only the
        pages that hold data (written, unpacked, or exported as ciphertext), a page without data
        reads as zeroes and clearing it writes nothing. Page states, UVCs and counts are those of a
        "real" region. ValueError for another value."""
    # ---- accounting ----
    def new_account(self, start_ps: int = 0) -> Account:
        """A new account of this UV, charged with the current cost table, its clock at start_ps."""
    def unattributed(self) -> Account:
        """The account of this UV's work that no bound account claimed."""
    def set_costs(
        self, *, uvc_fixed: list[int], uvc_per_page: list[int], pte: int, zero_page: int, fault_page: int
    ) -> None:
        """The cost table (integer ps per unit; the lists indexed like UVC_NAMES) for accounts made
        from now on. ValueError for lists of the wrong length."""
    def release_region(self, region: Region) -> None:
        """Unmap and unregister (the mm is gone). Pages still secure at that point are reported
        by the return of mm_teardown, not here; afterwards every access raises ValueError."""
    # ---- UVCs (single calls) ----
    def query(self) -> UvcResult: ...  # QUI 0x0001
    def create_config(
        self, region: Region, *, guest_len: int, asce: int, sca: int, base_stor_len: int, var_stor_len: int
    ) -> HandleResult:
        """0x0100. handle is 0 on failure unless rc has 0x8000 set. Refused (rcs in docs/UV.md):
        asce without the private-space control 0x100 or with 0x20/0xe10 (0x0105), sca 0
        (0x010c), too many configs (0x010f), guest_len 0 or not 1 MiB aligned or above the region
        size (0x0103), donations shorter than info() says (0x0106/0x010a), ASCE origin already
        used by a live config (0x0104)."""
    def destroy_config(self, handle: int) -> UvcResult:
        """0x0101: refused while the config has CPUs. Cleans (zeroes, NONSECURE) every remaining
        page of the config (GIL released, parallel), returns its donations, frees its ASCE."""
    def destroy_config_fast(self, handle: int) -> UvcResult:
        """0x0102: only if destroy_fast is installed (else rc INV_CMD). Refused while it has CPUs.
        Frees the config and donations at once; its pages become ORPHANED (O(1), no walk)."""
    def create_cpu(self, handle: int, *, num: int, stor_len: int) -> HandleResult:
        """0x0120: handle = the new CPU's handle. num > max_guest_cpu_id 0x0103, num already
        used 0x0104, stor_len short 0x010c."""
    def destroy_cpu(self, cpu_handle: int) -> UvcResult: ...  # 0x0121
    def convert_to_secure(self, handle: int, gaddr: int) -> UvcResult:
        """0x0200 import one page: NONSECURE -> SECURE(handle). Fresh/foreign content is zeroed;
        a page EXPORTED by the same config is decrypted and integrity-checked. rc 0x010a if the
        page is not present. A SHARED page of another config is taken over only with MISC."""
    def convert_from_secure(self, paddr: int) -> UvcResult:
        """0x0201 export: SECURE/SHARED/ORPHANED -> EXPORTED(owner), content encrypted in place."""
    def destroy_page(self, paddr: int) -> UvcResult:
        """0x0202: SECURE/SHARED/ORPHANED -> NONSECURE, content zeroed. No-op success on a
        NONSECURE page. Refused while the owner config has CPUs."""
    def pin_shared(self, paddr: int) -> UvcResult: ...  # 0x0341, only SHARED pages
    def unpin_shared(self, handle: int, gaddr: int) -> UvcResult: ...  # 0x0342
    def set_shared_access(self, handle: int, gaddr: int) -> UvcResult:
        """0x1000, issued by the protected guest of config ``handle``: its SECURE page at gaddr
        becomes SHARED. rc 0x0101 if gaddr is beyond the guest storage."""
    def remove_shared_access(self, handle: int, gaddr: int) -> UvcResult: ...  # 0x1001, as set_shared_access
    def set_sec_parms(self, handle: int, header: bytes) -> UvcResult: ...  # 0x0300
    def unpack(self, handle: int, gaddr: int, tweak0: int, tweak1: int) -> UvcResult: ...  # 0x0301
    def verify(self, handle: int) -> UvcResult: ...  # 0x0302
    def prepare_reset(self, handle: int) -> UvcResult: ...  # 0x0320
    def unshare_all(self, handle: int) -> UvcResult: ...  # 0x0340
    def dump_init(self, handle: int) -> UvcResult: ...  # 0x0400
    def dump_conf_stor_state(self, handle: int, gaddr: int) -> DumpResult:
        """0x0401: conf_dump_storage_state_len bytes for the 1 MiB at gaddr."""
    def dump_cpu(self, cpu_handle: int) -> DumpResult: ...  # 0x0402
    def dump_complete(self, handle: int) -> DumpResult:
        """0x0403: conf_dump_finalize_len bytes."""
    def call(self, uvcb: bytes, *, guest: int | None = None) -> CallResult:
        """Raw dispatcher: a UVCB as the Linux kernel lays it out (arch/s390/include/asm/uv.h;
        big-endian, 8-byte header len/cmd/rc/rrc). Returns cc and the updated block; answers as
        kvm-unit-tests (s390x/uv-host.c, uv-guest.c) expects of real machines, rcs in docs/UV.md.
        Issued by the host, or with ``guest=handle`` by that configuration's protected guest:
        a guest has QUI (bits 0, 8, 9) and SET/REMOVE_SHARED_ACCESS (address @0x20) only, a host
        every other call. Wrong len -> rc 0x0005 (QUI takes any len >= 0xa8: below 0x100 the
        fields that fit and rc 0x0100), unknown or not offered cmd -> rc 0x0002. Never raises
        for any byte string."""
    # ---- kernel-side range helpers (one call per range, GIL released) ----
    def destroy_walk(
        self,
        region: Region,
        start_page: int = 0,
        end_page: int | None = None,
        cancel: CancelToken | None = None,
        *,
        export_refused: bool = False,
    ) -> WalkResult:
        """__s390_uv_destroy_range: issue destroy-page (counted) on every *present* page of
        [start, end), results ignored, in parallel batches of BATCH_PAGES present pages; skips
        regions holding no secure page via the summary (still counting their present pages as
        UVCs). With cancel: checked after every batch; when set, stop and return interrupted.
        Returns visited (present pages), destroyed, interrupted, resume_page. end_page is
        clamped to region.pages (and start_page to end_page). Every page below resume_page is done;
        resume_page == end when not interrupted. export_refused: afterwards, every page of
        [start, resume_page) whose destroy was refused (owner with secure CPUs) gets an export
        UVC (__kvm_s390_pv_destroy_page of the newest kernels)."""
    def import_range(
        self, handle: int, region: Region, start_page: int, npages: int, *, export_first: bool
    ) -> ImportResult:
        """A protected guest (config handle) touches pages; per page, as the kernel fault paths do:
        not present -> first-touch (no UVC); NONSECURE/EXPORTED -> (export 0x0201 first if
        export_first, result ignored) + import 0x0200; SECURE/ORPHANED of another config ->
        secure-storage violation: destroy 0x0202, on failure export 0x0201, then import as above;
        SHARED of another config -> (export first if export_first) + import (the UV takes a shared
        page over only with MISC; otherwise the import fails). Own pages: nothing.
        Returns imports, exports, destroys, failed_pages, first_failure_rc: the first three count
        the UVCs issued (as in stats()), failed_pages the imports that failed; a page whose import
        failed is left as it was and the walk goes on. first_failure_rc is 0 if none failed."""
    def make_accessible_range(self, region: Region, start_page: int, npages: int) -> AccessResult:
        """Host or a non-protected guest touches pages: for each SECURE/ORPHANED page (and SHARED
        page whose owner is gone; a live owner's shared page is host-accessible and gets no
        UVC), pin-shared (0x0341) and if that fails export (0x0201). Returns pinned, exported, failed:
        the successful UVCs, and the pages that stay secure because both failed. GIL released."""
    def unpack_range(
        self,
        handle: int,
        region: Region,
        addr: int,
        size: int,
        tweak: int,
        *,
        export_first: bool,
        cancel: CancelToken | None = None,
    ) -> UnpackResult:
        """KVM_PV_UNPACK's loop: per page 0x0301 with tweak0=tweak, tweak1=offset (export first
        if asked). A page not present yet gets no UVC: it is faulted in, then (cancel set ->
        "eagain") retried. rc 0x010a -> fault the page in; if cancel is set return "eagain"; else retry.
        Other UV error -> "einval". addr not page aligned, size 0 or unaligned -> "einval" with no
        UVC; a page beyond the region -> "efault". Returns status "ok"|"eagain"|"einval"|"efault",
        rc, rrc of the last unpack UVC (0, 0 if none), pages_done. rcs: docs/UV.md."""
    def mm_teardown(self, region: Region, *, all_present: bool = False) -> TeardownResult:
        """exit_mmap of a protected mm: for every present SECURE/SHARED/ORPHANED page destroy
        (0x0202), on failure export (0x0201). With all_present=True the destroy goes to every
        present page (per-PTE teardown without the kernel's PG_arch_1 filter), so an injected
        destroy failure can also land on a non-secure page. The legacy 0x0107/0x000d answer
        counts as success (no export). Returns destroyed (pages) and exported (successful exports).
        GIL released."""

# ---- boot image (rust/pvfast-py/src/image.rs; format and rcs in docs/IMAGE.md) ----
# Header errors raise ValueError("invalid SE header: <reason> (rc 0x01..)") with attribute
# ``rc`` = the UV rc SET_SEC_CONF_PARAMS reports for it. host_key None = HOST_KEY_DEFAULT.

from typing import Any

HOST_KEY_DEFAULT: Final[bytes]  # 32 bytes: the emulated machine's host key
IMAGE_MAX_HEADER_LEN: Final[int]  # 8192
IMAGE_MAX_COMPONENTS: Final[int]  # 328: components that fit in IMAGE_MAX_HEADER_LEN

def image_seal(
    components: list[tuple[int, int, bytes]], host_key: bytes | None = None, image_key: bytes | None = None
) -> SealedImage:
    """Seal [(addr, tweak, plaintext)] -> header and encrypted components padded to 4 KiB.
    Random image key (64 bytes, AES-256-XTS) when None. GIL released. ValueError/TypeError
    naming the argument (``components[2].addr: ...``)."""

def image_parse(header: bytes, host_key: bytes | None = None) -> dict[str, Any]:
    """Authenticate and decode: version, length, pages, components [(addr, size, tweak)],
    pld/ald/tld (hex)."""

def image_decrypt_page(header: bytes, tweak0: int, tweak1: int, page: bytes, host_key: bytes | None = None) -> bytes:
    """UNPACK's decryption of one 4096-byte page (test helper)."""

def image_verify(header: bytes, pages: list[tuple[int, int, int, bytes]], host_key: bytes | None = None) -> int:
    """VERIFY over [(gaddr, tweak0, tweak1, plaintext)] in unpack order: 0x0001 or the rc of
    the first digest that differs (PLD 0x0102, ALD 0x0103, TLD 0x0104). GIL released (test helper)."""
