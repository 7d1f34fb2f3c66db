"""arch/s390/mm/gmap.c: the guest address space (gmap): its top-level table and ASCE, the table
list, s390_unlist_old_asce / s390_replace_asce, host_to_guest, and the guest memory it maps.
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

    ``gmap_create(mm, limit)``: it belongs to ``mm`` (which lists it until ``gmap_remove``) and
    maps guest absolute addresses to the host memory of ``region`` (one memslot).
    """

    def __init__(self, host: Host, mm: AddressSpace, region: _native.Region, limit: int) -> None:
        self.host = host
        self.uv = host.uv.native
        self.mm = mm
        self.region = region
        self.asce_type: AsceType = asce_type_for_limit(limit)
        self.table = host._kalloc_nofail("crst", CRST_TABLE_SIZE)  # KVM_CREATE_VM, not a PV path
        self.listed: set[int] = {self.table}
        self.guest_handle = 0  # up to the gmap rewrite: copy of kvm->arch.pv.handle for the fault handlers
        # Tables that host_to_guest still points into although the gmap runs on a copy (a
        # segment table replaced before 292a7d6fca33): host-side unlinks write there.
        self.h2g_tables: set[int] = set()
        mm.gmaps.append(self)

    @property
    def asce(self) -> int:
        # origin | designation type | user bits | table length (full length for the type), as
        # gmap_alloc builds it; s390_replace_asce keeps every bit but the origin
        return self.table | ASCE_TYPE_BITS[self.asce_type] | ASCE_USER_BITS | 0x3

    def unlist_old_asce(self) -> None:
        """s390_unlist_old_asce: gmap teardown will not free the current top table (idempotent)."""
        self.listed.discard(self.table)

    def replace_asce(self) -> int:
        """s390_replace_asce: unlist the old top table, then install a copy. Since 292a7d6fca33 a
        segment ASCE is refused (-EINVAL, the table stays unlisted). Before, the copy was made:
        with two levels the top table *is* the segment table, whose entries host_to_guest points
        to, so those pointers keep referring to the old table."""
        self.unlist_old_asce()
        segment = self.asce_type == "segment"
        if segment and self.host.profile.segment_asce_refused:
            return -EINVAL
        new = self.host._kalloc("crst", CRST_TABLE_SIZE)
        if new is None:
            return -ENOMEM
        if segment:
            self.h2g_tables.add(self.table)
        self.listed.add(new)
        self.table = new
        return 0

    def unlink_host_mappings(self, why: str) -> None:
        """The host tears down page tables that map guest memory (exit_mmap's free_pgtables ->
        gmap_unlink -> __gmap_unlink_by_vmaddr): each host_to_guest entry is looked up and its
        segment entry invalidated, i.e. written. An entry that points into a table already freed
        is a write to freed memory."""
        if not self.h2g_tables:
            return
        freed = [t for t in sorted(self.h2g_tables) if not self.host.allocated(t)]
        self.h2g_tables.clear()
        for table in freed:
            self.host.report(
                "kasan",
                "__gmap_unlink_by_vmaddr",
                f"use-after-free write of a segment entry in the freed segment table {table:#x} "
                f"({why}): host_to_guest still points into the table s390_replace_asce replaced",
            )

    def free(self) -> None:
        """gmap_remove: free every listed table; unlisted (leaked or set-aside) tables stay. The
        gmap is unlinked from its mm (host_to_guest goes with it)."""
        for table in self.listed:
            self.host._kfree(table)
        self.listed.clear()
        self.h2g_tables.clear()
        if self in self.mm.gmaps:
            self.mm.gmaps.remove(self)
