//! Configuration ids are reused once no page names them: a walk running at the same time must
//! never mistake a new configuration (with a CPU) for the dead one that had its id.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pvfast_core::{kernel, UvOptions};

/// One page in each of the region's 32 chunks, so a walk meets them one chunk after another.
const PAGES: [u64; 8] = [0, 2048, 4096, 6144, 8192, 10240, 12288, 16000];

#[test]
fn a_walk_never_destroys_the_pages_of_a_running_configuration_with_a_reused_id() {
    let uv = Arc::new(uv_with(UvOptions {
        threads: 1, // one task: the walk's id -> configuration cache lives across every chunk
        ..Default::default()
    }));
    let r = uv.create_region(64 * MIB).unwrap();
    for p in PAGES {
        r.touch(p * PAGE, PAGE).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let walker = {
        let (uv, r, stop) = (Arc::clone(&uv), Arc::clone(&r), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut walks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                kernel::destroy_walk(&uv, &r, 0, None, None).unwrap();
                walks += 1;
            }
            walks
        })
    };
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut cycles = 0u64;
    let mut max_slots = 0;
    while Instant::now() < deadline {
        let (st, h) = create(&uv, &r, 64 * MIB, 0x10_000);
        assert_eq!(st, ok());
        let c = cpu(&uv, h, 0);
        for p in PAGES {
            // The previous configuration's orphan may still be there: the walk destroys it.
            loop {
                let st = uv.convert_to_secure(h, p * PAGE);
                if st == ok() {
                    break;
                }
                assert_eq!(st, err(pvfast_core::rc::OTHER_OWNER));
                std::thread::yield_now();
            }
        }
        // While h has a CPU the walk must leave its pages alone, whatever id h got.
        for _ in 0..20 {
            for p in PAGES {
                assert_eq!(state(&r, p), ("secure", h), "cycle {cycles}, page {p}");
            }
        }
        assert_eq!(uv.destroy_cpu(c), ok());
        // Orphans for the walk to destroy; once they are gone the id is free again.
        assert_eq!(uv.destroy_config_fast(h), ok());
        max_slots = max_slots.max(uv.table_sizes().id_slots);
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let walks = walker.join().unwrap();
    assert!(cycles > 10 && walks > 10, "cycles {cycles}, walks {walks}");
    assert!(max_slots <= 3, "ids are reused ({max_slots} slots)");
    kernel::destroy_walk(&uv, &r, 0, None, None).unwrap();
    uv.release_region(&r).unwrap();
    assert_eq!(uv.table_sizes().configs, 0);
}
