//! The destroy walk and the kernel-side range helpers: semantics, isolation of a running
//! config, cancellation, laziness of big regions.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pvfast_core::{
    kernel, rc, AccessResult, CancelToken, TeardownResult, UnpackStatus, UvOptions, Uvc,
    BATCH_PAGES,
};

#[test]
fn walk_destroys_present_secure_pages_and_counts_every_present_page() {
    let vm = vm(64 * MIB, 32 * MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    // Secure pages scattered over a few chunks; page 8191 is the last touched one.
    let secure: Vec<u64> = vec![0, 1, 511, 512, 4000, 8191];
    for &p in &secure {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    uv.reset_stats();
    let w = kernel::destroy_walk(uv, r, 0, None, None).unwrap();
    assert_eq!(w.visited, 8192);
    assert_eq!(w.destroyed, 6);
    assert!(!w.interrupted);
    assert_eq!(w.resume_page, r.pages());
    assert_eq!(uv.stat(Uvc::DestrSecStor), 8192);
    assert_eq!(uv.secure_pages(None), 0);
    for &p in &secure {
        assert_eq!(state(r, p), ("nonsecure", 0));
    }
    // Idempotent second pass, still one UVC per present page.
    let w = kernel::destroy_walk(uv, r, 0, None, None).unwrap();
    assert_eq!((w.visited, w.destroyed), (8192, 0));
    assert_eq!(uv.stat(Uvc::DestrSecStor), 2 * 8192);
}

#[test]
fn walk_subrange_and_clamping() {
    let vm = vm(8 * MIB, 8 * MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    for p in 0..2048 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    let w = kernel::destroy_walk(uv, r, 100, Some(700), None).unwrap();
    assert_eq!((w.visited, w.destroyed, w.resume_page), (600, 600, 700));
    assert_eq!(state(r, 99), ("secure", h));
    assert_eq!(state(r, 100), ("nonsecure", 0));
    assert_eq!(state(r, 699), ("nonsecure", 0));
    assert_eq!(state(r, 700), ("secure", h));
    assert_eq!(uv.secure_pages(Some(h)), 2048 - 600);
    let w = kernel::destroy_walk(uv, r, 5000, Some(1 << 40), None).unwrap();
    assert_eq!((w.visited, w.resume_page), (0, 2048));
}

#[test]
fn walk_leaves_pages_of_a_config_with_cpus_untouched() {
    let vm = vm(16 * MIB, 16 * MIB);
    let (uv, r, old) = (&vm.uv, &vm.region, vm.handle);
    for p in 0..1024 {
        assert_eq!(uv.convert_to_secure(old, p * PAGE), ok());
    }
    assert_eq!(uv.destroy_config_fast(old), ok());
    let (st, new) = create(uv, r, 16 * MIB, 0x40_000);
    assert_eq!(st, ok());
    let _c = cpu(uv, new, 0);
    for p in 2048..3072 {
        assert_eq!(uv.convert_to_secure(new, p * PAGE), ok());
        r.write(p * PAGE, &p.to_be_bytes(), new).unwrap();
    }
    let w = kernel::destroy_walk(uv, r, 0, None, None).unwrap();
    assert_eq!(w.destroyed, 1024, "only the orphans");
    assert_eq!(uv.secure_pages(Some(old)), 0);
    assert_eq!(uv.secure_pages(Some(new)), 1024);
    for p in 2048..3072 {
        assert_eq!(state(r, p), ("secure", new));
        assert_eq!(r.read(p * PAGE, 8, new).unwrap(), p.to_be_bytes());
    }
}

/// A walk on one thread while another imports pages for a running config: the running
/// config's pages are never destroyed and never lose content.
#[test]
fn concurrent_walk_and_import() {
    let vm = vm(64 * MIB, 64 * MIB);
    let uv = Arc::new(vm.uv);
    let r = vm.region;
    let old = vm.handle;
    for p in 0..8192 {
        assert_eq!(uv.convert_to_secure(old, p * PAGE), ok());
    }
    assert_eq!(uv.destroy_config_fast(old), ok());
    let (_, new) = create(&uv, &r, 64 * MIB, 0x40_000);
    let _c = cpu(&uv, new, 0);
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let importer = {
        let (uv, r) = (Arc::clone(&uv), Arc::clone(&r));
        let (done, started) = (Arc::clone(&done), Arc::clone(&started));
        std::thread::spawn(move || {
            let mut imported = Vec::new();
            let mut p = 0u64;
            // Import over the orphans (secure-storage violation path) and fresh pages.
            while p < 16384 && !done.load(Ordering::Relaxed) {
                kernel::import_range(&uv, new, &r, p, 16, false).unwrap();
                for q in p..p + 16 {
                    if uv.convert_to_secure(new, q * PAGE).is_ok() {
                        r.write(q * PAGE, &q.to_le_bytes(), new).unwrap();
                        imported.push(q);
                    }
                }
                started.store(true, Ordering::Release);
                p += 16;
            }
            imported
        })
    };
    // The walks must overlap the imports: on a loaded machine the importer may not have run
    // at all before 20 walks are over.
    while !started.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    for _ in 0..20 {
        kernel::destroy_walk(&uv, &r, 0, None, None).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let imported = importer.join().unwrap();
    kernel::destroy_walk(&uv, &r, 0, None, None).unwrap();
    assert!(!imported.is_empty());
    for &q in &imported {
        assert_eq!(state(&r, q), ("secure", new), "page {q}");
        assert_eq!(r.read(q * PAGE, 8, new).unwrap(), q.to_le_bytes());
    }
    assert_eq!(uv.secure_pages(Some(new)), imported.len() as u64);
    assert_eq!(uv.secure_pages(Some(old)), 0);
    assert_eq!(uv.secure_pages(None), imported.len() as u64);
}

#[test]
fn cancelled_walk_stops_within_one_batch_in_all() {
    let threads = 2u64;
    let vm = vm_with(
        UvOptions {
            threads: threads as usize,
            ..Default::default()
        },
        256 * MIB,
        256 * MIB,
    );
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    kernel::import_range(uv, h, r, 0, r.pages(), false).unwrap();
    assert_eq!(uv.secure_pages(Some(h)), r.pages());
    // Already set: the walk does at most one batch in all (the kernel's walk is one thread),
    // however many workers started one.
    let cancel = CancelToken::new();
    cancel.set();
    uv.reset_stats();
    let w = kernel::destroy_walk(uv, r, 0, None, Some(&cancel)).unwrap();
    assert!(w.interrupted);
    assert!(w.visited <= BATCH_PAGES as u64, "visited {}", w.visited);
    assert!(
        w.destroyed <= BATCH_PAGES as u64,
        "destroyed {}",
        w.destroyed
    );
    assert_eq!(
        uv.secure_pages(Some(h)),
        r.pages() - w.destroyed,
        "{threads} workers: only one batch stands"
    );
    assert_eq!(uv.stat(Uvc::DestrSecStor), w.visited);
    // Resume: everything below resume_page is done.
    for p in 0..w.resume_page {
        assert_eq!(state(r, p), ("nonsecure", 0));
    }
    // Cancel from another thread mid-walk, then resume until done.
    cancel.clear();
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        c2.set();
    });
    let mut start = w.resume_page;
    let w2 = kernel::destroy_walk(uv, r, start, None, Some(&cancel)).unwrap();
    t.join().unwrap();
    cancel.clear();
    if w2.interrupted {
        assert!(w2.resume_page < r.pages());
    }
    start = w2.resume_page;
    let w3 = kernel::destroy_walk(uv, r, start, None, Some(&cancel)).unwrap();
    assert!(!w3.interrupted);
    assert_eq!(uv.secure_pages(None), 0);
}

#[test]
fn cancelled_walk_over_nonsecure_pages_keeps_batch_granularity() {
    let vm = vm_with(
        UvOptions {
            threads: 1,
            ..Default::default()
        },
        8 * MIB,
        8 * MIB,
    );
    let cancel = CancelToken::new();
    cancel.set();
    let w = kernel::destroy_walk(&vm.uv, &vm.region, 0, None, Some(&cancel)).unwrap();
    assert!(w.interrupted);
    assert_eq!(
        (w.visited, w.resume_page),
        (BATCH_PAGES as u64, BATCH_PAGES as u64)
    );
    let w = kernel::destroy_walk(&vm.uv, &vm.region, 0, None, None).unwrap();
    assert_eq!((w.visited, w.interrupted), (2048, false));
}

#[test]
fn cancel_after_last_batch_still_reports_interrupted() {
    let vm = vm(4 * MIB, 4 * PAGE);
    let cancel = CancelToken::new();
    cancel.set();
    let w = kernel::destroy_walk(&vm.uv, &vm.region, 0, Some(1), Some(&cancel)).unwrap();
    assert_eq!(w.visited, 1);
    assert!(w.interrupted);
    let w = kernel::destroy_walk(&vm.uv, &vm.region, 1, Some(1), Some(&cancel)).unwrap();
    assert!(!w.interrupted, "empty range: no batch, no check");
}

#[test]
fn export_fallback_exports_what_the_uv_refused_to_destroy() {
    let vm = vm(8 * MIB, MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    for p in 0..20 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    let c = cpu(uv, h, 0);
    uv.reset_stats();
    let w = kernel::destroy_walk(uv, r, 0, None, None).unwrap();
    assert_eq!(
        (w.visited, w.destroyed),
        (256, 0),
        "owner has CPUs: every destroy refused"
    );
    assert_eq!(uv.secure_pages(Some(h)), 20);
    let (w, exported) = kernel::destroy_walk_export(uv, r, 0, Some(10), None).unwrap();
    assert_eq!((w.visited, w.destroyed, exported), (10, 0, 10));
    assert_eq!(uv.stat(Uvc::ConvFromSecStor), 10);
    assert_eq!(state(r, 9), ("exported", h));
    assert_eq!(state(r, 10), ("secure", h));
    assert_eq!(uv.destroy_cpu(c), ok());
    let (w, exported) = kernel::destroy_walk_export(uv, r, 0, None, None).unwrap();
    assert_eq!(
        (w.destroyed, exported),
        (10, 0),
        "no CPUs: destroyed, nothing to export"
    );
    // An injected destroy failure is followed by an export too (page by page).
    for p in 30..33 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    uv.inject_failure(0x0202, 0x0003, 0, 1).unwrap();
    uv.reset_stats();
    let (w, exported) = kernel::destroy_walk_export(uv, r, 30, Some(33), None).unwrap();
    assert_eq!((w.visited, w.destroyed, exported), (3, 2, 1));
    assert_eq!(uv.stat(Uvc::ConvFromSecStor), 1);
    assert_eq!(state(r, 30), ("exported", h));
}

#[test]
fn import_range_paths() {
    let vm = vm(8 * MIB, 0);
    let (uv, r, old) = (&vm.uv, &vm.region, vm.handle);
    // Not present -> touched then imported.
    let x = kernel::import_range(uv, old, r, 0, 8, false).unwrap();
    assert_eq!(
        (x.imports, x.exports, x.destroys, x.failed_pages),
        (8, 0, 0, 0)
    );
    assert_eq!(r.present_pages().unwrap(), 8);
    // Own pages: nothing.
    uv.reset_stats();
    let x = kernel::import_range(uv, old, r, 0, 8, true).unwrap();
    assert_eq!((x.imports, x.exports, x.destroys), (0, 0, 0));
    assert_eq!(uv.set_shared_access(old, 0), ok());
    // New config with CPUs; old one still alive with a CPU (secure pages resist destroy).
    let oc = cpu(uv, old, 0);
    let (_, new) = create(uv, r, 8 * MIB, 0x40_000);
    uv.reset_stats();
    let x = kernel::import_range(uv, new, r, 0, 4, true).unwrap();
    // Page 0 SHARED(old): export first, then import (foreign exported -> zeroed, moved).
    // Pages 1..4 SECURE(old) with CPUs: destroy fails -> export; export_first; import.
    assert_eq!(x.destroys, 3);
    assert_eq!(x.failed_pages, 0);
    assert_eq!(x.imports, 4);
    assert_eq!(x.exports, 4 + 3);
    assert_eq!(uv.stat(Uvc::ConvFromSecStor), x.exports);
    assert_eq!(uv.stat(Uvc::DestrSecStor), 3);
    for p in 0..4 {
        assert_eq!(state(r, p), ("secure", new));
    }
    // Without export_first and without MISC a shared page of a live config cannot be taken.
    assert_eq!(uv.destroy_cpu(oc), ok());
    let nomisc = vm_with(
        UvOptions {
            feature_misc: false,
            ..Default::default()
        },
        4 * MIB,
        MIB,
    );
    assert_eq!(nomisc.uv.convert_to_secure(nomisc.handle, 0), ok());
    assert_eq!(nomisc.uv.set_shared_access(nomisc.handle, 0), ok());
    let (_, n2) = create(&nomisc.uv, &nomisc.region, 4 * MIB, 0x40_000);
    let x = kernel::import_range(&nomisc.uv, n2, &nomisc.region, 0, 1, false).unwrap();
    assert_eq!(
        (x.imports, x.failed_pages, x.first_failure_rc),
        (1, 1, rc::OTHER_OWNER)
    );
    assert!(
        kernel::import_range(uv, new, r, 2040, 100, false).is_err(),
        "range outside region"
    );
}

#[test]
fn make_accessible_and_mm_teardown() {
    let vm = vm(8 * MIB, MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    for p in 0..10 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    assert_eq!(uv.set_shared_access(h, 0), ok());
    assert_eq!(uv.set_shared_access(h, PAGE), ok());
    // The live owner's shared pages are host-accessible: no exception, no UVC.
    assert_eq!(
        kernel::make_accessible_range(uv, r, 0, 4).unwrap(),
        AccessResult {
            pinned: 0,
            exported: 2,
            failed: 0
        }
    );
    assert_eq!(
        uv.stat(Uvc::PinPageShared),
        2,
        "pin tried (and refused) on the two secure pages only"
    );
    assert_eq!(state(r, 0), ("shared", h));
    assert_eq!(state(r, 2), ("exported", h));
    let c = cpu(uv, h, 0);
    // Owner has CPUs: destroys fail, teardown exports (shared pages too).
    assert_eq!(
        kernel::mm_teardown(uv, r, false).unwrap(),
        TeardownResult {
            destroyed: 0,
            exported: 8
        }
    );
    assert_eq!(uv.secure_pages(None), 0);
    assert_eq!(uv.destroy_cpu(c), ok());
    for p in 10..20 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    uv.reset_stats();
    assert_eq!(
        kernel::mm_teardown(uv, r, false).unwrap(),
        TeardownResult {
            destroyed: 10,
            exported: 0
        }
    );
    assert_eq!(uv.secure_pages(None), 0);
    assert_eq!(
        (uv.stat(Uvc::DestrSecStor), uv.stat(Uvc::ConvFromSecStor)),
        (10, 0)
    );
    // An injected destroy failure falls back to export for that page only.
    for p in 0..5 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    uv.reset_stats();
    uv.inject_failure(0x0202, 0x0abc, 0, 2).unwrap();
    assert_eq!(
        kernel::mm_teardown(uv, r, false).unwrap(),
        TeardownResult {
            destroyed: 3,
            exported: 2
        }
    );
    assert_eq!(
        (uv.stat(Uvc::DestrSecStor), uv.stat(Uvc::ConvFromSecStor)),
        (5, 2)
    );
    assert_eq!(state(r, 0), ("exported", h));
    assert_eq!(state(r, 4), ("nonsecure", 0));

    // all_present: one destroy per present page (256 touched); an injected failure may land on
    // a non-secure page, whose export is then a successful no-op.
    assert_eq!(uv.convert_to_secure(h, 100 * PAGE), ok());
    uv.reset_stats();
    uv.inject_failure(0x0202, 0x0abc, 0, 1).unwrap();
    assert_eq!(
        kernel::mm_teardown(uv, r, true).unwrap(),
        TeardownResult {
            destroyed: 1,
            exported: 1
        }
    );
    assert_eq!(
        (uv.stat(Uvc::DestrSecStor), uv.stat(Uvc::ConvFromSecStor)),
        (256, 1)
    );
    assert_eq!(state(r, 100), ("nonsecure", 0));
    // The legacy answer on non-secure pages counts as success: no export.
    let legacy = vm_with(
        UvOptions {
            legacy_destroy_rc: true,
            ..Default::default()
        },
        4 * MIB,
        MIB,
    );
    assert_eq!(legacy.uv.convert_to_secure(legacy.handle, 0), ok());
    assert_eq!(
        kernel::mm_teardown(&legacy.uv, &legacy.region, true).unwrap(),
        TeardownResult {
            destroyed: 1,
            exported: 0
        }
    );
    assert_eq!(legacy.uv.stat(Uvc::ConvFromSecStor), 0);
    assert_eq!(legacy.uv.stat(Uvc::DestrSecStor), 256);
}

#[test]
fn unpack_range_loop() {
    use pvfast_core::image::{seal_image, HOST_KEY_DEFAULT};
    let vm = vm(4 * MIB, 0);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    let data: Vec<u8> = (0..4 * PAGE as usize).map(|i| (i % 13) as u8).collect();
    let key: [u8; 64] = std::array::from_fn(|i| (i * 3) as u8);
    let (hdr, enc) = seal_image(&[(0x20000, 0x99, &data)], &HOST_KEY_DEFAULT, &key).unwrap();
    assert_eq!(uv.set_sec_parms(h, &hdr), ok());
    let bad = kernel::unpack_range(uv, h, r, 0x20001, 4 * PAGE, 0x99, false, None).unwrap();
    assert_eq!(bad.status, UnpackStatus::Einval);
    // Pages not present: no UVC, the page is faulted in; a set cancel token makes that -EAGAIN.
    let cancel = CancelToken::new();
    cancel.set();
    let before = uv.stat(Uvc::UnpackImg);
    let u = kernel::unpack_range(uv, h, r, 0x20000, 4 * PAGE, 0x99, true, Some(&cancel)).unwrap();
    assert_eq!((u.status, u.rc, u.pages_done), (UnpackStatus::Eagain, 0, 0));
    assert_eq!(uv.stat(Uvc::UnpackImg), before, "no UVC for an absent page");
    assert_eq!(
        uv.stat(Uvc::ConvFromSecStor),
        0,
        "no export before the page is there"
    );
    // The faulted-in page now holds garbage; reload the ciphertext, then unpack for real.
    r.write(0x20000, &enc[0], 0).unwrap();
    let u = kernel::unpack_range(uv, h, r, 0x20000, 4 * PAGE, 0x99, true, None).unwrap();
    assert_eq!(
        (u.status, u.rc, u.pages_done),
        (UnpackStatus::Ok, rc::EXECUTED, 4)
    );
    assert_eq!(
        uv.stat(Uvc::UnpackImg),
        before + 4,
        "one UNPACK_IMG per page"
    );
    assert_eq!(
        uv.stat(Uvc::ConvFromSecStor),
        4,
        "one export-before-import per page"
    );
    assert_eq!(uv.verify(h), ok());
    let u = kernel::unpack_range(uv, h, r, 4 * MIB - PAGE, 2 * PAGE, 0x99, false, None).unwrap();
    assert_eq!(u.status, UnpackStatus::Einval, "already verified");
    let u = kernel::unpack_range(uv, h, r, 4 * MIB, PAGE, 0x99, false, None).unwrap();
    assert_eq!(u.status, UnpackStatus::Efault);
}
