"""arch/s390/mm/gmap.c: the guest address space (gmap): its top-level table and ASCE, the table
list, s390_unlist_old_asce / s390_replace_asce, and the guest memory it maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import ASCE_TYPE_BITS, CRST_TABLE_SIZE, AsceType, asce_type_for_limit
from .errors import EINVAL, ENOMEM

#: _ASCE_USER_BITS (arch/s390/include/asm/pgtable.h): space-switch, private-space and
#: alteration-event controls. gmap_alloc ORs them into every gmap ASCE, and the UV refuses a
#: Create Config ASCE without the private-space control (rc 0x0105).
ASCE_USER_BITS = 0x40 | 0x100 | 0x80

if TYPE_CHECKING:
    from . import _native
    from .host import Host
    from .mm import AddressSpace


class Gmap:
    """A gmap: top-level CRST table (16 KiB) whose origin the UV records as the guest ASCE.

    ``gmap_create(mm, limit)``: it belongs to ``mm`` and maps guest absolute addresses to the
    host memory of ``region`` (one memslot).
    """

    def __init__(self, host: Host, mm: AddressSpace, region: _native.Region, limit: int) -> None:
        self.host = host
        self.uv = host.uv.native
        self.mm = mm
        self.region = region
        self.asce_type: AsceType = asce_type_for_limit(limit)
        self.table = host._kalloc_nofail("crst", CRST_TABLE_SIZE)  # KVM_CREATE_VM, not a PV path
        self.listed: set[int] = {self.table}
        self.guest_handle = 0  # v6.2: copy of kvm->arch.pv.handle for the fault handlers

    @property
    def asce(self) -> int:
        # origin | designation type | user bits | table length (full length for the type), as
        # gmap_alloc builds it; s390_replace_asce keeps every bit but the origin
        return self.table | ASCE_TYPE_BITS[self.asce_type] | ASCE_USER_BITS | 0x3

    def unlist_old_asce(self) -> None:
        """s390_unlist_old_asce: gmap teardown will not free the current top table (idempotent)."""
        self.listed.discard(self.table)

    def replace_asce(self) -> int:
        """s390_replace_asce: unlist the old top table, then install a copy (Δ6.4 refuses segment ASCEs)."""
        self.unlist_old_asce()
        if self.asce_type == "segment":
            return -EINVAL
        new = self.host._kalloc("crst", CRST_TABLE_SIZE)
        if new is None:
            return -ENOMEM
        self.listed.add(new)
        self.table = new
        return 0

    def free(self) -> None:
        """gmap_remove: free every listed table; unlisted (leaked or set-aside) tables stay."""
        for table in self.listed:
            self.host._kfree(table)
        self.listed.clear()
