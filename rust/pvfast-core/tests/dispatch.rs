//! The raw UVCB dispatcher: layouts, length and command checks, and totality on garbage.

mod common;

use common::*;
use pvfast_core::dispatch::{self, expected_len, fuzz_one};
use pvfast_core::{rc, UvOptions, Uvc};

fn block(len: u16, cmd: u16, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[0..2].copy_from_slice(&len.to_be_bytes());
    b[2..4].copy_from_slice(&cmd.to_be_bytes());
    b
}

fn put(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn get(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn rc_of(b: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
    )
}

#[test]
fn raw_lifecycle() {
    let uv = uv();
    let region = uv.create_region(8 * MIB).unwrap();
    region.touch(0, MIB).unwrap();

    let (cc, qui) = dispatch::call(&uv, &block(0x100, 0x0001, 0x100));
    assert_eq!((cc, rc_of(&qui)), (0, (rc::EXECUTED, 0)));
    assert_eq!(get(&qui, 0x10), uv.info().inst_calls_list[0]);
    assert_eq!(get(&qui, 0xa0), uv.info().uv_feature_indications);

    let mut cgc = block(0x80, 0x0100, 0x80);
    put(&mut cgc, 0x40, 8 * MIB);
    put(&mut cgc, 0x50, 0x5000);
    let (cc, out) = dispatch::call(&uv, &cgc);
    assert_eq!((cc, rc_of(&out).0), (0, rc::EXECUTED));
    let handle = get(&out, 0x18);
    assert_eq!(uv.config_handles(), vec![handle]);

    let mut csc = block(0x60, 0x0120, 0x60);
    put(&mut csc, 0x20, handle);
    let (cc, out) = dispatch::call(&uv, &csc);
    assert_eq!(cc, 0);
    let cpu = get(&out, 0x18);

    let mut cts = block(0x28, 0x0200, 0x28);
    put(&mut cts, 0x18, handle);
    put(&mut cts, 0x20, PAGE);
    assert_eq!(dispatch::call(&uv, &cts).0, 0);
    assert_eq!(state(&region, 1), ("secure", handle));

    let mut cfs = block(0x20, 0x0202, 0x20);
    put(&mut cfs, 0x18, region.base() + PAGE);
    let (cc, out) = dispatch::call(&uv, &cfs);
    assert_eq!((cc, rc_of(&out).0), (1, rc::OWNER_HAS_CPUS));

    let mut nodata = block(0x40, 0x0101, 0x40);
    put(&mut nodata, 0x18, handle + 1);
    let (cc, out) = dispatch::call(&uv, &nodata);
    assert_eq!((cc, rc_of(&out).0), (1, rc::INV_GUEST_HANDLE));
    put(&mut nodata, 0x18, handle);
    assert_eq!(
        rc_of(&dispatch::call(&uv, &nodata).1).0,
        rc::CONFIG_HAS_CPUS
    );

    let mut dcpu = block(0x40, 0x0121, 0x40);
    put(&mut dcpu, 0x18, cpu);
    assert_eq!(dispatch::call(&uv, &dcpu).0, 0);

    // Destroy-Fast uses its own 0x48 block; the nodata length is wrong for it.
    let mut fast = block(0x40, 0x0102, 0x48);
    put(&mut fast, 0x18, handle);
    assert_eq!(rc_of(&dispatch::call(&uv, &fast).1).0, rc::INV_LEN);
    fast[0..2].copy_from_slice(&0x48u16.to_be_bytes());
    assert_eq!(dispatch::call(&uv, &fast).0, 0);
    assert_eq!(state(&region, 1), ("orphaned", handle));
    assert_eq!(dispatch::call(&uv, &cfs).0, 0);
    assert_eq!(state(&region, 1), ("nonsecure", 0));
}

#[test]
fn length_and_command_checks() {
    let uv = uv();
    // kvm-unit-tests: destroy config with a header 8 bytes short -> 0x0005.
    let (cc, out) = dispatch::call(&uv, &block(0x38, 0x0101, 0x40));
    assert_eq!((cc, rc_of(&out).0), (1, rc::INV_LEN));
    assert_eq!(uv.stat(Uvc::DestroySecConf), 1);
    let (cc, out) = dispatch::call(&uv, &block(0x40, 0x0777, 0x40));
    assert_eq!((cc, rc_of(&out).0), (1, rc::INV_CMD));
    // len larger than the bytes given.
    assert_eq!(
        rc_of(&dispatch::call(&uv, &block(0x40, 0x0101, 0x20)).1).0,
        rc::INV_LEN
    );
    // Too short for a header: returned unchanged with cc 1.
    assert_eq!(dispatch::call(&uv, &[1, 2, 3]), (1, vec![1, 2, 3]));
    // Uninstalled calls are invalid commands.
    let nofast = uv_with(UvOptions {
        destroy_fast: false,
        dump: false,
        ..Default::default()
    });
    assert_eq!(
        rc_of(&dispatch::call(&nofast, &block(0x48, 0x0102, 0x48)).1).0,
        rc::INV_CMD
    );
    assert_eq!(
        rc_of(&dispatch::call(&nofast, &block(0x40, 0x0400, 0x40)).1).0,
        rc::INV_CMD
    );
    for u in Uvc::ALL {
        let len = expected_len(*u);
        assert!(len >= 0x20 && len.is_multiple_of(8), "{u:?}");
    }
}

#[test]
fn dispatcher_survives_garbage() {
    // Deterministic xorshift garbage, including well-formed headers with random bodies.
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let len = (next() % 0x120) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && len >= 8 {
            let u = Uvc::ALL[(next() % Uvc::ALL.len() as u64) as usize];
            let l = if i % 4 == 0 {
                expected_len(u)
            } else {
                (next() % 0x200) as u16
            };
            b[0..2].copy_from_slice(&l.to_be_bytes());
            b[2..4].copy_from_slice(&(u as u16).to_be_bytes());
        }
        fuzz_one(&b);
    }
}
