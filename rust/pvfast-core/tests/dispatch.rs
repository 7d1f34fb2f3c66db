//! The raw UVCB dispatcher: layouts, length and command checks, and totality on garbage.

mod common;

use common::*;
use pvfast_core::dispatch::{self, expected_len, fuzz_one, Issuer};
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
    put(&mut cgc, 0x20, 0x10_0000); // base storage origin
    put(&mut cgc, 0x28, 0x20_0000); // variable storage origin
    put(&mut cgc, 0x40, 8 * MIB);
    put(&mut cgc, 0x48, SCA);
    put(&mut cgc, 0x50, 0x5000 | ASCE_P);
    let (cc, out) = dispatch::call(&uv, &cgc);
    assert_eq!((cc, rc_of(&out).0), (0, rc::EXECUTED));
    let handle = get(&out, 0x18);
    assert_eq!(uv.config_handles(), vec![handle]);

    let mut csc = block(0x60, 0x0120, 0x60);
    put(&mut csc, 0x20, handle);
    put(&mut csc, 0x28, 0x30_0000); // cpu storage origin
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

/// The blocks real kernels send (Linux arch/s390/include/asm/uv.h, v6.2 and newest).
#[test]
fn linux_query_blocks() {
    let uv = uv();
    let info = uv.info();
    // v6.2 struct uv_cb_qui: 0x100 bytes; Linux 6.4+: 0x120, the tail (secret fields the
    // emulator does not model) left as sent.
    for (len, size) in [(0x100u16, 0x100usize), (0x120, 0x120)] {
        let mut b = block(len, 0x0001, size);
        b[0x100..].fill(0x5a);
        let (cc, out) = dispatch::call(&uv, &b);
        assert_eq!((cc, rc_of(&out)), (0, (rc::EXECUTED, 0)), "len {len:#x}");
        assert_eq!(get(&out, 0x40), info.uv_base_stor_len);
        assert_eq!(get(&out, 0x80), info.max_sec_stor_addr);
        assert_eq!(get(&out, 0xd0), info.conf_dump_finalize_len);
        assert!(out[0x100..].iter().all(|&x| x == 0x5a));
    }
    // An older, shorter block (v5.x: 0xc8): the fields that fit, rc 0x0100, nothing past len.
    let mut b = block(0xc8, 0x0001, 0x100);
    b[0xc8..].fill(0xa5);
    let (cc, out) = dispatch::call(&uv, &b);
    assert_eq!((cc, rc_of(&out).0), (1, rc::MORE_DATA));
    assert_eq!(get(&out, 0x10), info.inst_calls_list[0]);
    assert_eq!(get(&out, 0xa0), info.uv_feature_indications);
    assert!(out[0xc8..].iter().all(|&x| x == 0xa5), "wrote past len");
    // The Linux boot code takes "bits 8 and 9 set" for a protected guest: a host never sees
    // them, a guest sees nothing else but QUI.
    let w = get(&out, 0x10);
    assert_eq!(w & (3 << 54), 0);
    assert_eq!(uv.stat(Uvc::Qui), 3);
}

#[test]
fn cpu_set_state_uses_the_0x50_block() {
    let uv = uv();
    let region = uv.create_region(4 * MIB).unwrap();
    let (_, h) = create(&uv, &region, 4 * MIB, 0x4000);
    let c = cpu(&uv, h, 0);
    let set = |len: u16, state: u8| {
        let mut b = block(len, 0x0330, 0x50);
        put(&mut b, 0x18, c);
        b[0x27] = state;
        let (cc, out) = dispatch::call(&uv, &b);
        (cc, rc_of(&out).0)
    };
    assert_eq!(set(0x50, 1), (0, rc::EXECUTED));
    assert_eq!(set(0x50, 5), (0, rc::EXECUTED));
    assert_eq!(set(0x50, 4), (1, rc::INV_CPU_STATE));
    assert_eq!(
        set(0x28, 1),
        (1, rc::INV_LEN),
        "the old emulator-only length"
    );
}

#[test]
fn share_calls_belong_to_the_guest() {
    let uv = uv();
    let region = uv.create_region(4 * MIB).unwrap();
    region.touch(0, MIB).unwrap();
    let (_, h) = create(&uv, &region, 4 * MIB, 0x4000);
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    let mut share = block(0x30, 0x1000, 0x30);
    put(&mut share, 0x20, 0);
    // Issued by the host: not offered.
    assert_eq!(rc_of(&dispatch::call(&uv, &share).1).0, rc::INV_CMD);
    assert_eq!(state(&region, 0).0, "secure");
    // Issued by the guest of h: the address is the guest's, at 0x20.
    let (cc, _) = dispatch::call_as(&uv, Issuer::Guest(h), &share);
    assert_eq!(cc, 0);
    assert_eq!(state(&region, 0), ("shared", h));
    // A guest has no host calls; a dead guest's share calls are 0x0020.
    let (_, out) = dispatch::call_as(&uv, Issuer::Guest(h), &block(0x40, 0x0101, 0x40));
    assert_eq!(rc_of(&out).0, rc::INV_CMD);
    let (_, out) = dispatch::call_as(&uv, Issuer::Guest(h + 1), &share);
    assert_eq!(rc_of(&out).0, rc::INV_GUEST_HANDLE);
    // The guest's QUI: bits 0, 8, 9 only, no host storage sizes.
    let (cc, q) = dispatch::call_as(&uv, Issuer::Guest(h), &block(0x100, 0x0001, 0x100));
    assert_eq!(cc, 0);
    assert_eq!(get(&q, 0x10), (1 << 63) | (1 << 55) | (1 << 54));
    assert_eq!((get(&q, 0x40), get(&q, 0x50), get(&q, 0x80)), (0, 0, 0));
}

#[test]
fn an_uninitialised_uv_refuses_everything_but_query_and_init() {
    let uv = uv_with(UvOptions {
        initialised: false,
        ..Default::default()
    });
    assert!(!uv.is_initialised());
    let region = uv.create_region(4 * MIB).unwrap();
    assert_eq!(uv.query(), ok());
    let created = uv
        .create_config(&region, 4 * MIB, 0x4000 | ASCE_P, SCA, MIB, 1 << 20)
        .unwrap();
    assert_eq!(created, (err(rc::INV_STATE), 0));
    assert_eq!(uv.destroy_page(region.base()), err(rc::INV_STATE));
    // Header errors come first.
    let (_, out) = dispatch::call(&uv, &block(0x38, 0x0101, 0x40));
    assert_eq!(rc_of(&out).0, rc::INV_LEN);
    let info = uv.info();
    assert_eq!(
        uv.init_uv(1 << 31, info.uv_base_stor_len - 1),
        err(rc::INIT_STOR_LEN)
    );
    assert_eq!(
        uv.init_uv((1 << 31) + 4096, info.uv_base_stor_len),
        err(rc::INIT_STOR_ORIGIN)
    );
    assert_eq!(
        uv.init_uv(!(MIB - 1), info.uv_base_stor_len),
        err(rc::INIT_STOR_RANGE)
    );
    assert_eq!(uv.donated_bytes(), 0);
    assert_eq!(uv.init_uv(1 << 31, info.uv_base_stor_len), ok());
    assert!(uv.is_initialised());
    assert_eq!(uv.donated_bytes(), info.uv_base_stor_len);
    assert_eq!(create(&uv, &region, 4 * MIB, 0x4000).0, ok());
    assert_eq!(
        uv.init_uv(1 << 31, info.uv_base_stor_len),
        err(rc::INIT_DOUBLE)
    );
    // The default UV is initialised at construction (the host kernel's boot-time INIT_UV).
    let booted = uv_with(UvOptions::default());
    assert_eq!(
        booted.init_uv(1 << 32, info.uv_base_stor_len),
        err(rc::INIT_DOUBLE)
    );
    assert_eq!(
        booted.donated_bytes(),
        0,
        "the boot-time donation is not counted"
    );
}

#[test]
fn create_config_as_linux_sends_it() {
    let uv = uv();
    let _region = uv.create_region(16 * MIB).unwrap();
    let info = uv.info();
    let mut cgc = block(0x80, 0x0100, 0x80);
    put(&mut cgc, 0x20, 0x8000_0000); // conf_base_stor_origin
    put(&mut cgc, 0x28, 0x8010_0000); // conf_virt_stor_origin
    cgc[0x36..0x38].copy_from_slice(&3u16.to_be_bytes()); // Linux 6.15+ AP flags
    put(&mut cgc, 0x38, 0); // guest_stor_origin: 0 for KVM
    put(&mut cgc, 0x40, 16 * MIB);
    put(&mut cgc, 0x48, 0x8020_0000); // SCA
    put(&mut cgc, 0x50, 0x8030_0000 | 0x1c0 | 0x8 | 0x3); // gmap ASCE, region-2 table
    let (cc, out) = dispatch::call(&uv, &cgc);
    assert_eq!((cc, rc_of(&out).0), (0, rc::EXECUTED));
    let h = get(&out, 0x18);
    assert_eq!(uv.config_handles(), vec![h]);
    assert_eq!(
        uv.donated_bytes(),
        info.guest_base_stor_len + info.var_stor_len(16 * MIB)
    );
    // The same block again: the ASCE is in use (an emulator-chosen rc >= 0x0104).
    put(&mut cgc, 0x18, 0);
    let (cc, out) = dispatch::call(&uv, &cgc);
    assert_eq!(
        (cc, rc_of(&out).0, get(&out, 0x18)),
        (1, rc::ASCE_IN_USE, 0)
    );
    // Variable storage in the lowcore.
    put(&mut cgc, 0x28, 0x1000);
    assert_eq!(rc_of(&dispatch::call(&uv, &cgc).1).0, rc::VAR_STOR_LOWCORE);
}
