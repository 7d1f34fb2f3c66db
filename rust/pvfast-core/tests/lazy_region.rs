//! A 1 TiB region is only reserved: creating it and walking it costs (almost) no RAM and no
//! time. In its own test binary so that no other test's allocations run in the same process
//! while RSS is measured.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pvfast_core::kernel;

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[test]
fn one_tib_region_is_lazy_and_its_empty_walk_is_fast() {
    let uv = uv();
    let before = vm_rss_kib();
    let r = uv.create_region(1 << 40).unwrap();
    assert_eq!(r.pages(), 1 << 28);
    let t = Instant::now();
    let w = kernel::destroy_walk(&uv, &r, 0, None, None).unwrap();
    let took = t.elapsed();
    assert_eq!((w.visited, w.destroyed), (0, 0));
    assert_eq!(r.present_pages().unwrap(), 0);
    let after = vm_rss_kib();
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "RSS grew by {} KiB",
        after - before
    );
    // Debug builds are much slower; the 50 ms bound is for optimised code.
    let bound = if cfg!(debug_assertions) {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(50)
    };
    assert!(took < bound, "empty 1 TiB walk took {took:?}");
    // A touched page far out is found and counted.
    r.touch((1 << 40) - PAGE, PAGE).unwrap();
    let w = kernel::destroy_walk(&uv, &r, 0, None, None).unwrap();
    assert_eq!(w.visited, 1);
    uv.release_region(&r).unwrap();
}
