//! Raw UVCB dispatcher over an [`Ultravisor`]: parses the big-endian control blocks (8-byte
//! header `len, cmd, rc, rrc`), checks command and length, runs the typed UVC, and writes rc/rrc
//! and any output fields back. Total over all inputs: never panics, whatever the bytes.

use std::sync::{Arc, OnceLock};

use crate::region::Region;
use crate::ultravisor::{Ultravisor, UvOptions};
use crate::uvc::{rc, Uvc, UvcStatus, CC_ERROR};

/// Header size; a block shorter than this cannot even carry its rc.
pub const HEADER_LEN: usize = 8;

/// Largest SE header SET_SEC_CONF_PARAMS reads from guest storage (spec §1.5, [Δlatest]).
const MAX_SEC_HEADER: u64 = 1 << 20;

/// The block length each command requires (spec §1.4; emulator-chosen where the spec is silent,
/// see docs/UV.md).
pub const fn expected_len(uvc: Uvc) -> u16 {
    match uvc {
        Uvc::Qui => 0x100,
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
        Uvc::CpuSetState => 0x28,
        Uvc::UnpinPageShared => 0x28,
        Uvc::DumpConfStorState | Uvc::DumpCpu | Uvc::DumpComplete => 0x50,
        Uvc::SetSharedAccess | Uvc::RemoveSharedAccess => 0x30,
    }
}

struct Block<'a>(&'a mut [u8]);

impl Block<'_> {
    fn u64(&self, off: usize) -> u64 {
        self.0
            .get(off..off + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_be_bytes)
    }
    fn u32(&self, off: usize) -> u32 {
        self.0
            .get(off..off + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes)
    }
    fn u16(&self, off: usize) -> u16 {
        self.0
            .get(off..off + 2)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map_or(0, u16::from_be_bytes)
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        if let Some(b) = self.0.get_mut(off..off + 8) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        if let Some(b) = self.0.get_mut(off..off + 4) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
    fn put_u16(&mut self, off: usize, v: u16) {
        if let Some(b) = self.0.get_mut(off..off + 2) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
}

/// Execute one raw UVCB. Returns the condition code and the block with rc/rrc (and output
/// fields) filled in. Bytes beyond the block's `len` are returned unchanged.
pub fn call(uv: &Ultravisor, uvcb: &[u8]) -> (u8, Vec<u8>) {
    let mut out = uvcb.to_vec();
    if out.len() < HEADER_LEN {
        return (CC_ERROR, out);
    }
    let mut b = Block(&mut out);
    let len = b.u16(0);
    let cmd = b.u16(2);
    let status = dispatch(uv, &mut b, len, cmd);
    b.put_u16(4, status.rc);
    b.put_u16(6, status.rrc);
    (status.cc, out)
}

/// A malformed execution of `uvc` that answers `status`: it still counts, and still consumes
/// an injected failure (which then takes the place of `status`).
fn precheck(uv: &Ultravisor, uvc: Uvc, status: UvcStatus) -> UvcStatus {
    uv.core.execute(uvc, || status)
}

fn dispatch(uv: &Ultravisor, b: &mut Block<'_>, len: u16, cmd: u16) -> UvcStatus {
    let Some(uvc) = Uvc::from_code(cmd) else {
        return UvcStatus::err(rc::INV_CMD);
    };
    if !uv.core.info.is_installed(uvc) {
        return precheck(uv, uvc, UvcStatus::err(rc::INV_CMD));
    }
    if len != expected_len(uvc) || usize::from(len) > b.0.len() {
        return precheck(uv, uvc, UvcStatus::err(rc::INV_LEN));
    }
    match uvc {
        Uvc::Qui => {
            let s = uv.query();
            if s.is_ok() {
                fill_qui(uv, b);
            }
            s
        }
        Uvc::InitUv => uv.init_uv(),
        Uvc::CreateSecConf => raw_create_config(uv, b),
        Uvc::DestroySecConf => uv.destroy_config(b.u64(0x18)),
        Uvc::DestroySecConfFast => uv.destroy_config_fast(b.u64(0x18)),
        Uvc::CreateSecCpu => {
            let num = u64::from(b.u16(0x36));
            let stor_len = uv.core.info.guest_cpu_stor_len;
            let (s, h) = uv.create_cpu(b.u64(0x20), num, stor_len);
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
        Uvc::CpuReset | Uvc::CpuResetInitial | Uvc::CpuResetClear | Uvc::CpuSetState => {
            uv.cpu_uvc(uvc, b.u64(0x18))
        }
        Uvc::PinPageShared => uv.pin_shared(b.u64(0x18)),
        Uvc::UnpinPageShared => uv.unpin_shared(b.u64(0x18), b.u64(0x20)),
        Uvc::DumpInit => uv.dump_init(b.u64(0x18)),
        // The dump data has no host memory to go to in a raw call; only rc/rrc are returned.
        Uvc::DumpConfStorState => uv.dump_conf_stor_state(b.u64(0x18), b.u64(0x28)).0,
        Uvc::DumpCpu => uv.dump_cpu(b.u64(0x18)).0,
        Uvc::DumpComplete => uv.dump_complete(b.u64(0x18)).0,
        Uvc::SetSharedAccess => uv.set_shared_access(b.u64(0x18), b.u64(0x20)),
        Uvc::RemoveSharedAccess => uv.remove_shared_access(b.u64(0x18), b.u64(0x20)),
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

fn raw_create_config(uv: &Ultravisor, b: &mut Block<'_>) -> UvcStatus {
    let guest_len = b.u64(0x40);
    let Some(region) = raw_region(uv, b.u64(0x38)) else {
        b.put_u64(0x18, 0);
        return precheck(uv, Uvc::CreateSecConf, UvcStatus::err(rc::INV_GUEST_STOR));
    };
    let info = &uv.core.info;
    let base_len = info.guest_base_stor_len;
    let var_len = info.var_stor_len(guest_len);
    match uv.create_config(
        &region,
        guest_len,
        b.u64(0x50),
        b.u64(0x48),
        base_len,
        var_len,
    ) {
        Ok((s, h)) => {
            b.put_u64(0x18, h);
            s
        }
        Err(_) => UvcStatus::err(rc::INV_GUEST_STOR),
    }
}

/// SET_SEC_CONF_PARAMS: the header origin is read as a host address inside a region.
fn raw_set_sec_parms(uv: &Ultravisor, b: &mut Block<'_>) -> UvcStatus {
    let handle = b.u64(0x18);
    let origin = b.u64(0x20);
    let len = u64::from(b.u32(0x28));
    let header = (len <= MAX_SEC_HEADER)
        .then(|| {
            uv.regions().into_iter().find_map(|r| {
                let off = origin.checked_sub(r.base())?;
                r.read(off, len, 0).ok()
            })
        })
        .flatten();
    match header {
        Some(h) => uv.set_sec_parms(handle, &h),
        None => precheck(uv, Uvc::SetSecConfParams, UvcStatus::err(rc::INV_ADDR)),
    }
}

/// QUI output fields (the v6.2 `struct uv_cb_qui` offsets).
fn fill_qui(uv: &Ultravisor, b: &mut Block<'_>) {
    let i = &uv.core.info;
    for (n, w) in i.inst_calls_list.iter().enumerate() {
        b.put_u64(0x10 + 8 * n, *w);
    }
    b.put_u64(0x50, i.guest_base_stor_len);
    b.put_u64(0x58, i.guest_virt_base_stor_len);
    b.put_u64(0x60, i.guest_virt_var_stor_len);
    b.put_u64(0x68, i.guest_cpu_stor_len);
    b.put_u32(0x7c, u32::try_from(i.max_num_sec_conf).unwrap_or(u32::MAX));
    b.put_u64(0x80, i.max_sec_stor_addr);
    b.put_u16(0x9e, u16::try_from(i.max_guest_cpu_id).unwrap_or(u16::MAX));
    b.put_u64(0xa0, i.uv_feature_indications);
    b.put_u64(0xc8, i.conf_dump_storage_state_len);
    b.put_u64(0xd0, i.conf_dump_finalize_len);
}

/// `cargo fuzz` entry: run one arbitrary byte string through a shared emulated UV that has a
/// small region registered. Must never panic.
pub fn fuzz_one(data: &[u8]) {
    static UV: OnceLock<Option<(Ultravisor, Arc<Region>)>> = OnceLock::new();
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
        let _ = call(uv, data);
    }
}
