"""arch/s390/kernel/uv.c and arch/s390/mm/fault.c: how host and guest accesses to protected memory
are resolved (the secure-storage exception handlers, make-secure and make-accessible).

An access that the hardware refuses raises one of three program exceptions; the handler resolves
it and the access is retried (``access_with_faults`` is that loop):

* PGM 0x3d, ``do_secure_storage_access``: the host, or a guest that does not run protected, touches
  a secure page. ``arch_make_page_accessible``: pin it shared (UVC 0x0341), else export it (0x0201).
* PGM 0x3e, ``do_non_secure_storage_access``: a protected guest touches a page that is not secure.
  ``gmap_convert_to_secure`` -> ``gmap_make_secure``: import it (0x0200), after an export (result
  ignored) when ``should_export_before_import`` says so.
* PGM 0x3f, ``do_secure_storage_violation``: a protected guest touches a page another configuration
  still owns (the set-aside guest's, after a reboot). ``gmap_destroy_page``: destroy it (0x0202),
  else export it; the retried access then takes 0x3e.

The Ultravisor emulation resolves a whole range in one native walk (GIL released): ``import_range``
takes, page by page, the 0x3f and 0x3e paths; ``make_accessible_range`` the 0x3d path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from . import _native
from .constants import PAGE_SIZE
from .errors import EAGAIN, EFAULT, UvcError

if TYPE_CHECKING:
    from .gmap import Gmap
    from .host import Host
    from .mm import AddressSpace

T = TypeVar("T")

#: Retries of an access whose page went back to secure before it got through: the first
#: FAST_FAULT_RETRIES at once, the rest after yielding the CPU (the racing vCPU thread can run).
FAST_FAULT_RETRIES = 8
MAX_FAULT_RETRIES = 64


def should_export_before_import(host: Host, mm: AddressSpace) -> bool:
    """should_export_before_import for a real import (UNPIN_PAGE_SHARED is none): never when the UV
    has the MISC feature (it moves shared pages itself), else iff more than one protected
    configuration may own pages of ``mm``."""
    return not host.feature_misc and mm.protected_count > 1


def gmap_make_secure(gmap: Gmap, handle: int, first: int, npages: int) -> tuple[int, int]:
    """Make guest pages [first, first + npages) secure for configuration ``handle`` (import, with
    export-before-import; pages of another configuration go through gmap_destroy_page first).
    Returns (pages whose import failed, rc of the first failure)."""
    res = gmap.uv.import_range(
        handle, gmap.region, first, npages, export_first=should_export_before_import(gmap.host, gmap.mm)
    )
    return res.failed_pages, res.first_failure_rc


def arch_make_page_accessible(gmap: Gmap, first: int, npages: int) -> int:
    """Make every secure page of [first, first + npages) accessible to the host: pin shared, else
    export. Returns the number of pages that stay secure (both UVCs failed)."""
    return gmap.uv.make_accessible_range(gmap.region, first, npages).failed


def do_secure_storage_access(gmap: Gmap, first: int, npages: int) -> None:
    """PGM 0x3d over a range. A page that stays secure cannot be accessed: the kernel sends the
    process SIGSEGV; here the access fails with UvcError(EFAULT)."""
    failed = arch_make_page_accessible(gmap, first, npages)
    if failed:
        raise UvcError(EFAULT, f"secure-storage access: {failed} page(s) stay secure", 0)


def do_non_secure_storage_access(gmap: Gmap, handle: int, first: int, npages: int) -> None:
    """PGM 0x3e (and 0x3f, do_secure_storage_violation, for pages another configuration owns) of a
    guest running as configuration ``handle``, over a range. A failed import is UvcError(EFAULT)."""
    failed, first_rc = gmap_make_secure(gmap, handle, first, npages)
    if failed:
        raise UvcError(EFAULT, f"guest fault: CONV_TO_SEC_STOR on {failed} page(s)", first_rc)


def guest_fault(gmap: Gmap, first: int, npages: int, *, secure_handle: int, import_handle: int | None = None) -> int:
    """The guest touches [first, first + npages). ``secure_handle`` is the configuration it runs as
    (0: it runs as a normal guest). A protected guest takes 0x3e/0x3f, importing with
    ``import_handle`` (default: ``secure_handle``; gmap->guest_handle in the kernels that had it,
    0 after a failed destroy, so the import fails); a normal guest takes 0x3d on secure pages and
    ordinary first-touch faults. Returns the configuration whose view the access then has (0 for
    the host's view)."""
    if secure_handle:
        do_non_secure_storage_access(gmap, secure_handle if import_handle is None else import_handle, first, npages)
        return secure_handle
    do_secure_storage_access(gmap, first, npages)
    gmap.region.touch(first * PAGE_SIZE, npages * PAGE_SIZE)
    return 0


def host_fault(gmap: Gmap, first: int, npages: int) -> int:
    """The VMM touches guest memory: 0x3d on its secure pages. Returns 0 (the host's view)."""
    do_secure_storage_access(gmap, first, npages)
    return 0


def access_with_faults(fault: Callable[[], int], access: Callable[[int], T], what: str) -> T:
    """Resolve the faults, then access with the view ``fault`` returned; a page that raced back
    to secure in between (another thread) faults again, as the retried instruction would.

    The kernel retries such an access for as long as it takes. Here a page that another thread
    makes secure again MAX_FAULT_RETRIES times in a row ends the access with OSError(EAGAIN), a
    BlockingIOError: nothing was read (a write may have stored the pages before the one that kept
    faulting, as a copy that faults part-way does); the caller may try again.
    """
    for attempt in range(MAX_FAULT_RETRIES):
        if attempt >= FAST_FAULT_RETRIES:
            time.sleep(0)  # let the thread that keeps re-importing the page run
        view = fault()
        try:
            return access(view)
        except _native.SecureStorageAccess:
            continue
    raise OSError(EAGAIN, f"{what}: a page went back to secure {MAX_FAULT_RETRIES} times before the access got through")
