//! A sequence of raw UVCBs against a fresh emulated UV, with handle and address placeholders so
//! the fuzzer reaches the UVC bodies (config/CPU lifetimes, page-state transitions, destroy,
//! export, Destroy-Fast orphans) and not only the length and handle checks.
//!
//! Input: repeated `[len_hi, len_lo, block...]`; the top bit of the length word set means "issued
//! by the protected guest of the first configuration created" (the share calls are guest calls),
//! otherwise the host issues the block. In each block, an 8-aligned u64 field at offset
//! ≥ 0x10 of the form 0xFFFF_FFFF_FFFF_FFxx is replaced: xx < 0x80 → the (xx mod n)-th handle
//! created so far (configs and CPUs), xx ≥ 0x80 → the host address of page (xx - 0x80) of the
//! region. Properties: no panic; afterwards the O(1) secure-page counter equals a full recount of
//! the region's page states; once the input's CPUs and configurations are destroyed and the region
//! released, the UV keeps no configuration record (ids are reused, nothing leaks across inputs).
//! One UV (with its worker pool) lives for the whole run; each input gets a fresh region.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pvfast_core::dispatch::{self, Issuer};
use pvfast_core::{Ultravisor, UvOptions};

const REGION: u64 = 4 << 20;

fn uv() -> Option<&'static Ultravisor> {
    static UV: OnceLock<Option<Ultravisor>> = OnceLock::new();
    UV.get_or_init(|| Ultravisor::new(UvOptions { threads: 1, ..Default::default() }).ok()).as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some(uv) = uv() else { return };
    let Ok(region) = uv.create_region(REGION) else { return };
    if region.touch(0, REGION).is_err() {
        let _ = uv.release_region(&region);
        return;
    }
    let mut handles: Vec<u64> = Vec::new();
    let mut configs: Vec<u64> = Vec::new();
    let mut cpus: Vec<u64> = Vec::new();
    let mut rest = data;
    for _ in 0..64 {
        if rest.len() < 2 {
            break;
        }
        let word = u16::from_be_bytes([rest[0], rest[1]]);
        let issuer = match (word & 0x8000 != 0, configs.first()) {
            (true, Some(&h)) => Issuer::Guest(h),
            _ => Issuer::Host,
        };
        let n = (usize::from(word & 0x7fff) % 0x130).min(rest.len() - 2);
        let mut block = rest[2..2 + n].to_vec();
        rest = &rest[2 + n..];
        let mut off = 0x10;
        while off + 8 <= block.len() {
            let w = u64::from_be_bytes(block[off..off + 8].try_into().unwrap_or([0; 8]));
            if w >> 8 == 0x00FF_FFFF_FFFF_FFFF {
                let xx = w & 0xFF;
                let v = if xx < 0x80 {
                    if handles.is_empty() { 0 } else { handles[(xx as usize) % handles.len()] }
                } else {
                    region.base() + (xx - 0x80) * 4096
                };
                block[off..off + 8].copy_from_slice(&v.to_be_bytes());
            }
            off += 8;
        }
        let (cc, out) = dispatch::call_as(uv, issuer, &block);
        if cc == 0 && out.len() >= 0x20 {
            let cmd = u16::from_be_bytes([out[2], out[3]]);
            if cmd == 0x0100 || cmd == 0x0120 {
                let h = u64::from_be_bytes(out[0x18..0x20].try_into().unwrap_or([0; 8]));
                handles.push(h);
                if cmd == 0x0100 { configs.push(h) } else { cpus.push(h) }
            }
        }
    }
    let counts = region.state_counts().expect("region is registered");
    assert_eq!(
        uv.secure_pages(None),
        counts.secure + counts.shared + counts.orphaned,
        "secure-page counter out of step with the page states"
    );
    for h in cpus {
        let _ = uv.destroy_cpu(h);
    }
    for h in configs {
        let _ = uv.destroy_config(h);
    }
    let _ = uv.release_region(&region);
    // Nothing refers to this input's configurations any more: every record is retired.
    let t = uv.table_sizes();
    assert_eq!((t.configs, t.cpus), (0, 0), "configuration records leaked: {t:?}");
});
