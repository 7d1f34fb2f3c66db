//! Raw UVCB dispatcher over an [`Ultravisor`]: parses the big-endian control blocks (8-byte
//! header `len, cmd, rc, rrc`), checks command and length, runs the typed UVC, and writes rc/rrc
//! and any output fields back. Total over all inputs: never panics, whatever the bytes.
//!
//! The layouts are the Linux kernel's (`arch/s390/include/asm/uv.h`, v6.2 and newest, which
//! agree on every block used here except QUI, 0x100 bytes in v6.2 and 0x120 from v6.4) and
//! kvm-unit-tests' (`lib/s390x/asm/uv.h`). The answers follow what kvm-unit-tests
//! (`s390x/uv-host.c`, `s390x/uv-guest.c`) asserts on real machines; docs/UV.md lists every rc
//! with its source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::region::Region;
use crate::ultravisor::{ConfigRequest, RawCgc, Ultravisor, UvOptions};
use crate::uvc::{rc, Uvc, UvcStatus, CC_ERROR};

/// Header size; a block shorter than this cannot even carry its rc.
pub const HEADER_LEN: usize = 8;

/// Shortest QUI block the UV takes: 0xa0 answers 0x0005, 0xa8 answers 0x0100 "more data"
/// (kvm-unit-tests uv-host.c test_query).
pub const QUI_MIN_LEN: u16 = 0xa8;

/// Bytes of query data the emulated UV stores (the v6.2 `struct uv_cb_qui`). A longer block
/// (Linux 6.4+ sends 0x120) gets cc 0 and the bytes past this untouched; a shorter one (at
/// least [`QUI_MIN_LEN`]) gets the fields that fit and rc 0x0100.
pub const QUI_DATA_LEN: u16 = 0x100;

/// Who issues a raw UVC. A host (KVM) and a protected guest see different call sets: a guest
/// has QUI and SET/REMOVE_SHARED_ACCESS only (its QUI shows bits 0, 8 and 9), a host every
/// other call (bits 8 and 9 clear) — kvm-unit-tests uv-host.c / uv-guest.c test_invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer {
    Host,
    /// The protected guest of this configuration handle. A guest only runs while its
    /// configuration lives; a handle that is not live makes its share calls answer 0x0020.
    Guest(u64),
}

/// The full block length of each command: the `sizeof` of its Linux `struct uv_cb_*` (QUI: the
/// v6.2 size; see [`QUI_MIN_LEN`] for the lengths QUI also takes).
pub const fn expected_len(uvc: Uvc) -> u16 {
    match uvc {
        Uvc::Qui => QUI_DATA_LEN,
        Uvc::InitUv => 0x48,
        Uvc::CreateSecConf => 0x80,
        Uvc::DestroySecConf => 0x40,
        Uvc::DestroySecConfFast => 0x48,
        Uvc::CreateSecCpu => 0x60,
        Uvc::DestroySecCpu => 0x40,
        Uvc::ConvToSecStor => 0x28,
        Uvc::ConvFromSecStor | Uvc::DestrSecStor | Uvc::PinPageShared => 0x20,
        Uvc::SetSecConfParams => 0x50,
        Uvc::UnpackImg => 0x50,
        Uvc::VerifyImg | Uvc::PrepareReset | Uvc::SetUnshareAll | Uvc::DumpInit => 0x40,
        Uvc::CpuReset | Uvc::CpuResetInitial | Uvc::CpuResetClear => 0x40,
        Uvc::CpuSetState => 0x50,
        Uvc::UnpinPageShared => 0x28,
        Uvc::DumpConfStorState | Uvc::DumpCpu | Uvc::DumpComplete => 0x50,
        Uvc::SetSharedAccess | Uvc::RemoveSharedAccess => 0x30,
    }
}

/// Whether `len` is a length the UV takes for `uvc`.
pub const fn len_ok(uvc: Uvc, len: u16) -> bool {
    match uvc {
        Uvc::Qui => len >= QUI_MIN_LEN,
        _ => len == expected_len(uvc),
    }
}

/// The block as the UV sees it: exactly `len` bytes. Reads past the end give 0, writes past the
/// end are dropped (a field is stored only if it fits whole).
struct Block<'a>(&'a mut [u8]);

impl Block<'_> {
    fn get<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.0
            .get(off..off.checked_add(N)?)
            .and_then(|b| <[u8; N]>::try_from(b).ok())
    }
    fn u64(&self, off: usize) -> u64 {
        self.get::<8>(off).map_or(0, u64::from_be_bytes)
    }
    fn u32(&self, off: usize) -> u32 {
        self.get::<4>(off).map_or(0, u32::from_be_bytes)
    }
    fn u16(&self, off: usize) -> u16 {
        self.get::<2>(off).map_or(0, u16::from_be_bytes)
    }
    fn u8(&self, off: usize) -> u8 {
        self.0.get(off).copied().unwrap_or(0)
    }
    fn put(&mut self, off: usize, bytes: &[u8]) {
        if let Some(b) = off
            .checked_add(bytes.len())
            .and_then(|end| self.0.get_mut(off..end))
        {
            b.copy_from_slice(bytes);
        }
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_be_bytes());
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_be_bytes());
    }
    fn put_u16(&mut self, off: usize, v: u16) {
        self.put(off, &v.to_be_bytes());
    }
}

/// Execute one raw UVCB issued by the host. Returns the condition code and the block with
/// rc/rrc (and output fields) filled in. Bytes beyond the block's `len` are returned unchanged.
pub fn call(uv: &Ultravisor, uvcb: &[u8]) -> (u8, Vec<u8>) {
    call_as(uv, Issuer::Host, uvcb)
}

/// [`call`] for a given issuer (host or protected guest).
pub fn call_as(uv: &Ultravisor, issuer: Issuer, uvcb: &[u8]) -> (u8, Vec<u8>) {
    let mut out = uvcb.to_vec();
    if out.len() < HEADER_LEN {
        return (CC_ERROR, out);
    }
    let len = u16::from_be_bytes([out[0], out[1]]);
    let cmd = u16::from_be_bytes([out[2], out[3]]);
    let status = dispatch(uv, issuer, &mut out, len, cmd);
    out[4..6].copy_from_slice(&status.rc.to_be_bytes());
    out[6..8].copy_from_slice(&status.rrc.to_be_bytes());
    (status.cc, out)
}

/// An execution of `uvc` refused by its header (command not offered, wrong length) with
/// `status`: it still counts, and still consumes an injected failure (which then takes the
/// place of `status`); it is answered before the UV's state (0x0003 before INIT_UV).
fn precheck(uv: &Ultravisor, uvc: Uvc, status: UvcStatus) -> UvcStatus {
    uv.core.begin_header(uvc).unwrap_or(status)
}

fn dispatch(uv: &Ultravisor, issuer: Issuer, out: &mut [u8], len: u16, cmd: u16) -> UvcStatus {
    // An unknown command is answered before anything else, the length included
    // (kvm-unit-tests test_invalid: "bogus" with an 8-byte block, before INIT_UV).
    let Some(uvc) = Uvc::from_code(cmd) else {
        return UvcStatus::err(rc::INV_CMD);
    };
    let info = &uv.core.info;
    let offered = match issuer {
        Issuer::Host => info.is_installed(uvc),
        Issuer::Guest(_) => info.is_guest_installed(uvc),
    };
    if !offered {
        return precheck(uv, uvc, UvcStatus::err(rc::INV_CMD));
    }
    if !len_ok(uvc, len) || usize::from(len) > out.len() {
        return precheck(uv, uvc, UvcStatus::err(rc::INV_LEN));
    }
    let mut b = Block(&mut out[..usize::from(len)]);
    let b = &mut b;
    match uvc {
        Uvc::Qui => {
            let s = uv.query();
            if !s.is_ok() {
                return s;
            }
            fill_qui(uv, issuer, b);
            if len < QUI_DATA_LEN {
                UvcStatus::err(rc::MORE_DATA)
            } else {
                s
            }
        }
        Uvc::InitUv => uv.init_uv(b.u64(0x18), b.u64(0x20)),
        Uvc::CreateSecConf => raw_create_config(uv, b),
        Uvc::DestroySecConf => uv.destroy_config(b.u64(0x18)),
        Uvc::DestroySecConfFast => uv.destroy_config_fast(b.u64(0x18)),
        Uvc::CreateSecCpu => {
            let num = u64::from(b.u16(0x36));
            let stor_len = info.guest_cpu_stor_len;
            let (s, h) = uv.create_cpu_at(b.u64(0x20), num, stor_len, Some(b.u64(0x28)));
            b.put_u64(0x18, h);
            s
        }
        Uvc::DestroySecCpu => uv.destroy_cpu(b.u64(0x18)),
        Uvc::ConvToSecStor => uv.convert_to_secure(b.u64(0x18), b.u64(0x20)),
        Uvc::ConvFromSecStor => uv.convert_from_secure(b.u64(0x18)),
        Uvc::DestrSecStor => uv.destroy_page(b.u64(0x18)),
        Uvc::SetSecConfParams => raw_set_sec_parms(uv, b),
        Uvc::UnpackImg => uv.unpack(b.u64(0x18), b.u64(0x20), b.u64(0x28), b.u64(0x30)),
        Uvc::VerifyImg => uv.verify(b.u64(0x18)),
        Uvc::PrepareReset => uv.prepare_reset(b.u64(0x18)),
        Uvc::SetUnshareAll => uv.unshare_all(b.u64(0x18)),
        Uvc::CpuReset | Uvc::CpuResetInitial | Uvc::CpuResetClear => uv.cpu_uvc(uvc, b.u64(0x18)),
        Uvc::CpuSetState => uv.cpu_set_state(b.u64(0x18), b.u8(0x27)),
        Uvc::PinPageShared => uv.pin_shared(b.u64(0x18)),
        Uvc::UnpinPageShared => uv.unpin_shared(b.u64(0x18), b.u64(0x20)),
        Uvc::DumpInit => uv.dump_init(b.u64(0x18)),
        // The dump data has no host memory to go to in a raw call; only rc/rrc are returned.
        Uvc::DumpConfStorState => uv.dump_conf_stor_state(b.u64(0x18), b.u64(0x28)).0,
        Uvc::DumpCpu => uv.dump_cpu(b.u64(0x18)).0,
        Uvc::DumpComplete => uv.dump_complete(b.u64(0x18)).0,
        // `struct uv_cb_share`: the guest's address at 0x20; the issuing guest is the config.
        Uvc::SetSharedAccess | Uvc::RemoveSharedAccess => {
            let Issuer::Guest(handle) = issuer else {
                // Not offered to a host: answered above.
                return UvcStatus::err(rc::INV_CMD);
            };
            if uvc == Uvc::SetSharedAccess {
                uv.set_shared_access(handle, b.u64(0x20))
            } else {
                uv.remove_shared_access(handle, b.u64(0x20))
            }
        }
    }
}

/// The region a raw Create Config means: guest_stor_origin 0 = the only registered region;
/// otherwise the region whose base equals the origin.
fn raw_region(uv: &Ultravisor, origin: u64) -> Option<Arc<Region>> {
    let regions = uv.regions();
    if origin == 0 {
        return match regions.as_slice() {
            [only] => Some(Arc::clone(only)),
            _ => None,
        };
    }
    regions.into_iter().find(|r| r.base() == origin)
}

/// `struct uv_cb_cgc`: handle out @0x18, conf_base_stor_origin @0x20, conf_virt_stor_origin
/// @0x28, guest_stor_origin @0x38, guest_stor_len @0x40, guest_sca @0x48, guest_asce @0x50
/// (Linux 6.15+ flags @0x36 are read by nobody). The donation lengths are not in the block:
/// the UV takes its own QUI sizes.
fn raw_create_config(uv: &Ultravisor, b: &mut Block<'_>) -> UvcStatus {
    let guest_origin = b.u64(0x38);
    let guest_len = b.u64(0x40);
    let region = raw_region(uv, guest_origin);
    let info = &uv.core.info;
    let (s, h) = uv.create_config_req(&ConfigRequest {
        region: region.as_ref(),
        guest_len,
        asce: b.u64(0x50),
        sca: b.u64(0x48),
        base_stor_len: info.guest_base_stor_len,
        var_stor_len: info.var_stor_len(guest_len),
        raw: Some(RawCgc {
            guest_origin,
            base_origin: b.u64(0x20),
            var_origin: b.u64(0x28),
        }),
    });
    b.put_u64(0x18, h);
    s
}

/// SET_SEC_CONF_PARAMS (`struct uv_cb_ssc`: handle @0x18, header origin @0x20, header len u32
/// @0x28): the header origin is a host address, read from the region holding it. Not wholly
/// inside one region, or on a secure page: 0x0103. Longer than any header the UV parses:
/// the image module's length error, without reading.
fn raw_set_sec_parms(uv: &Ultravisor, b: &mut Block<'_>) -> UvcStatus {
    let handle = b.u64(0x18);
    let origin = b.u64(0x20);
    let len = u64::from(b.u32(0x28));
    uv.set_sec_parms_with(handle, || {
        if len > crate::image::MAX_HEADER_LEN as u64 {
            return Err(UvcStatus::err(crate::image::RC_HDR_BAD_LENGTH));
        }
        uv.regions()
            .into_iter()
            .find_map(|r| {
                let off = origin.checked_sub(r.base())?;
                r.read(off, len, 0).ok()
            })
            .ok_or(UvcStatus::err(rc::HDR_ACCESS))
    })
}

/// QUI output fields at the v6.2 `struct uv_cb_qui` offsets; a guest gets its own call list
/// and no host storage sizes.
fn fill_qui(uv: &Ultravisor, issuer: Issuer, b: &mut Block<'_>) {
    let i = &uv.core.info;
    let host = issuer == Issuer::Host;
    let calls = if host {
        i.inst_calls_list
    } else {
        i.guest_inst_calls_list()
    };
    let h = |v: u64| if host { v } else { 0 };
    for (n, w) in calls.iter().enumerate() {
        b.put_u64(0x10 + 8 * n, *w);
    }
    b.put_u64(0x40, h(i.uv_base_stor_len));
    b.put_u64(0x50, h(i.guest_base_stor_len));
    b.put_u64(0x58, h(i.guest_virt_base_stor_len));
    b.put_u64(0x60, h(i.guest_virt_var_stor_len));
    b.put_u64(0x68, h(i.guest_cpu_stor_len));
    b.put_u32(
        0x7c,
        u32::try_from(h(i.max_num_sec_conf)).unwrap_or(u32::MAX),
    );
    b.put_u64(0x80, h(i.max_sec_stor_addr));
    b.put_u16(
        0x9e,
        u16::try_from(h(i.max_guest_cpu_id)).unwrap_or(u16::MAX),
    );
    b.put_u64(0xa0, i.uv_feature_indications);
    b.put_u64(0xc8, h(i.conf_dump_storage_state_len));
    b.put_u64(0xd0, h(i.conf_dump_finalize_len));
}

/// `cargo fuzz` entry: run one arbitrary byte string through a shared emulated UV that has a
/// small region registered, as the host and then as the guest of the configuration created
/// last by an earlier input (if any). Must never panic.
pub fn fuzz_one(data: &[u8]) {
    static UV: OnceLock<Option<(Ultravisor, Arc<Region>)>> = OnceLock::new();
    static GUEST: AtomicU64 = AtomicU64::new(0);
    let uv = UV.get_or_init(|| {
        let uv = Ultravisor::new(UvOptions {
            threads: 1,
            ..Default::default()
        })
        .ok()?;
        let region = uv.create_region(16 << 20).ok()?;
        region.touch(0, 16 << 20).ok()?;
        Some((uv, region))
    });
    if let Some((uv, _)) = uv {
        let (cc, out) = call(uv, data);
        if cc == 0 && out.get(2..4) == Some(&[0x01, 0x00]) {
            if let Some(h) = out
                .get(0x18..0x20)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
            {
                GUEST.store(u64::from_be_bytes(h), Ordering::Relaxed);
            }
        }
        let guest = GUEST.load(Ordering::Relaxed);
        if guest != 0 {
            let _ = call_as(uv, Issuer::Guest(guest), data);
        }
    }
}
