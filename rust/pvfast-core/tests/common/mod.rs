//! Shared setup for the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use pvfast_core::{rc, Region, Ultravisor, UvOptions, UvcStatus, PAGE_SIZE};

pub const MIB: u64 = 1 << 20;
pub const PAGE: u64 = PAGE_SIZE as u64;
/// ASCE private-space control: the UV refuses a Create Config ASCE without it.
pub const ASCE_P: u64 = 0x100;
/// A guest SCA origin (the UV refuses 0).
pub const SCA: u64 = 0x8000;

pub struct Vm {
    pub uv: Ultravisor,
    pub region: Arc<Region>,
    pub handle: u64,
}

pub fn uv_with(opts: UvOptions) -> Ultravisor {
    Ultravisor::new(UvOptions { threads: 2, ..opts }).expect("ultravisor")
}

pub fn uv() -> Ultravisor {
    uv_with(UvOptions::default())
}

/// Create a config on `region` with the exact donation sizes QUI asks for; `asce` gets the
/// private-space control added.
pub fn create(
    uv: &Ultravisor,
    region: &Arc<Region>,
    guest_len: u64,
    asce: u64,
) -> (UvcStatus, u64) {
    let info = uv.info();
    uv.create_config(
        region,
        guest_len,
        asce | ASCE_P,
        SCA,
        info.guest_base_stor_len,
        info.var_stor_len(guest_len),
    )
    .expect("create_config")
}

/// A UV with one region of `size` bytes (first `touched` bytes touched) and one config over it.
pub fn vm_with(opts: UvOptions, size: u64, touched: u64) -> Vm {
    let uv = uv_with(opts);
    let region = uv.create_region(size).expect("region");
    region.touch(0, touched).expect("touch");
    let (st, handle) = create(&uv, &region, size, 0x10_000);
    assert_eq!(st, UvcStatus::OK);
    Vm { uv, region, handle }
}

pub fn vm(size: u64, touched: u64) -> Vm {
    vm_with(UvOptions::default(), size, touched)
}

pub fn err(code: u16) -> UvcStatus {
    UvcStatus::err(code)
}

pub fn ok() -> UvcStatus {
    UvcStatus::OK
}

pub fn state(region: &Region, page: u64) -> (&'static str, u64) {
    let (s, o) = region.page_state(page).expect("page_state");
    (s.name(), o)
}

pub fn cpu(uv: &Ultravisor, handle: u64, num: u64) -> u64 {
    let (st, h) = uv.create_cpu(handle, num, uv.info().guest_cpu_stor_len);
    assert_eq!(st, UvcStatus::OK);
    h
}

pub const INV_HANDLE: u16 = rc::INV_GUEST_HANDLE;
