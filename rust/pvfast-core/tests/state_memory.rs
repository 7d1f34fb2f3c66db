//! State-only regions (`MemoryMode::State`) and per-thread accounts, through the public API.

mod common;

use std::sync::Arc;

use common::{create, MIB, PAGE};
use pvfast_core::{account, kernel, Binding, MemoryMode, Ultravisor, UvOptions, Uvc};

fn state_vm(size: u64) -> (Ultravisor, Arc<pvfast_core::Region>, u64) {
    let uv = Ultravisor::new(UvOptions {
        threads: 2,
        ..Default::default()
    })
    .expect("ultravisor");
    let region = uv
        .create_region_mode(size, MemoryMode::State)
        .expect("region");
    let (st, handle) = create(&uv, &region, size, 0x10_000);
    assert!(st.is_ok());
    (uv, region, handle)
}

#[test]
fn touched_pages_hold_no_data_until_written() {
    let (uv, region, handle) = state_vm(256 * MIB);
    assert_eq!(region.mode(), MemoryMode::State);
    let pages = region.pages();
    let r = kernel::import_range(&uv, handle, &region, 0, pages, false).expect("import");
    assert_eq!(r.imports, pages);
    assert_eq!(region.present_pages().expect("present"), pages);
    assert_eq!(region.data_pages().expect("data"), 0);
    region
        .write(3 * PAGE + 10, b"guest data", handle)
        .expect("write");
    assert_eq!(region.data_pages().expect("data"), 1);
    assert_eq!(
        region.read(3 * PAGE + 10, 10, handle).expect("read"),
        b"guest data"
    );
    assert_eq!(region.read(5 * PAGE, 4, handle).expect("read"), [0; 4]);
    // Export of a page without data writes its ciphertext: now it holds data.
    assert!(uv.convert_from_secure(region.base() + 7 * PAGE).is_ok());
    assert_eq!(region.data_pages().expect("data"), 2);
    assert!(uv.convert_to_secure(handle, 7 * PAGE).is_ok());
    assert_eq!(region.read(7 * PAGE, 8, handle).expect("read"), [0; 8]);
    // The walk clears exactly the pages that hold data.
    let w = kernel::destroy_walk(&uv, &region, 0, None, None).expect("walk");
    assert_eq!(w.destroyed, pages);
    assert_eq!(region.data_pages().expect("data"), 0);
    assert_eq!(
        region.read(3 * PAGE, PAGE, 0).expect("read"),
        vec![0; PAGE as usize]
    );
}

#[test]
fn a_bound_account_gets_the_walk_its_workers_did() {
    let (uv, region, handle) = state_vm(256 * MIB);
    let pages = region.pages();
    kernel::import_range(&uv, handle, &region, 0, pages, false).expect("import");
    let acct = uv.new_account(0);
    let prev = account::bind(Binding {
        thread: Some(Arc::clone(&acct)),
        vm: None,
    });
    let unattributed_before = uv.unattributed().snapshot();
    kernel::destroy_walk(&uv, &region, 0, None, None).expect("walk");
    account::bind(prev);
    let s = acct.snapshot();
    assert_eq!(s.uvcs[Uvc::DestrSecStor.index()], pages);
    assert_eq!(s.ptes, pages);
    assert_eq!(s.zeroed, pages);
    assert_eq!(s.walks, 1);
    assert!(
        s.tasks > 0,
        "256 MiB is four 64 MiB tasks: the pool ran them"
    );
    assert!(s.cpu_ns >= s.worker_cpu_ns);
    assert_eq!(
        uv.unattributed().snapshot().uvcs[Uvc::DestrSecStor.index()],
        unattributed_before.uvcs[Uvc::DestrSecStor.index()],
        "nothing of the walk went to the unattributed account"
    );
    // The import before the binding was nobody's.
    assert_eq!(
        uv.unattributed().snapshot().uvcs[Uvc::ConvToSecStor.index()],
        pages
    );
}
