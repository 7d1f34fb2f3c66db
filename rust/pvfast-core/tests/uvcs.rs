//! Every UVC: success and error codes, page-state transitions and ownership rules.

mod common;

use common::*;
use pvfast_core::ultravisor::test_bit_inv;
use pvfast_core::{kernel, rc, CoreError, UvOptions, Uvc, UvcStatus};

fn stat(uv: &pvfast_core::Ultravisor, u: Uvc) -> u64 {
    uv.stat(u)
}

#[test]
fn query_and_info() {
    let uv = uv();
    assert_eq!(uv.query(), ok());
    assert_eq!(stat(&uv, Uvc::Qui), 1);
    let i = uv.info();
    assert!(test_bit_inv(&i.inst_calls_list, 23));
    assert_eq!(
        i.inst_calls_list[0] & 0x0000_0100_0000_0000,
        0x0000_0100_0000_0000
    );
    for bit in 24..28 {
        assert!(test_bit_inv(&i.inst_calls_list, bit));
    }
    assert_eq!(i.uv_feature_indications, 0xc000_0000_0000_0000);
    // The host view: the guest-only share calls are not indicated (the Linux boot code takes
    // bits 8 and 9 both set for "running as a protected guest").
    assert!(!test_bit_inv(&i.inst_calls_list, 8));
    assert!(!test_bit_inv(&i.inst_calls_list, 9));
    let g = i.guest_inst_calls_list();
    assert_eq!(g, [(1 << 63) | (1 << 55) | (1 << 54), 0, 0, 0]);
    assert!(i.uv_base_stor_len > 0 && i.uv_base_stor_len.is_multiple_of(MIB));
    assert!(uv.is_initialised());
    assert_eq!(i.max_guest_cpu_id, 247);
    assert_eq!(i.max_num_sec_conf, 4096);

    let uv = uv_with(UvOptions {
        destroy_fast: false,
        dump: false,
        feature_misc: false,
        ..Default::default()
    });
    let i = uv.info();
    assert!(!test_bit_inv(&i.inst_calls_list, 23));
    assert_eq!(i.inst_calls_list[0] & 0xf0_0000_0000, 0);
    assert_eq!(i.uv_feature_indications, 0x4000_0000_0000_0000);
}

#[test]
fn create_config_errors() {
    let uv = uv();
    let region = uv.create_region(64 * MIB).unwrap();
    let info = uv.info();
    let base = info.guest_base_stor_len;
    let var = info.var_stor_len(64 * MIB);
    let mk = |len, asce, b, v| {
        uv.create_config(&region, len, asce | ASCE_P, SCA, b, v)
            .unwrap()
    };
    assert_eq!(mk(0, 0x1000, base, var), (err(rc::INV_GUEST_STOR), 0));
    assert_eq!(
        mk(MIB + PAGE, 0x1000, base, var),
        (err(rc::INV_GUEST_STOR), 0)
    );
    assert_eq!(
        mk(128 * MIB, 0x1000, base, var),
        (err(rc::INV_GUEST_STOR), 0)
    );
    assert_eq!(
        mk(64 * MIB, 0x1000, base - 1, var),
        (err(rc::BASE_STOR_TOO_SHORT), 0)
    );
    assert_eq!(
        mk(64 * MIB, 0x1000, base, var - 1),
        (err(rc::VAR_STOR_TOO_SHORT), 0)
    );
    let (st, h) = mk(64 * MIB, 0x1000 | 0x7, base, var);
    assert_eq!(st, ok());
    assert_ne!(h, 0);
    // Same ASCE origin (control bits differ) is refused while the first config lives.
    assert_eq!(mk(64 * MIB, 0x1003, base, var), (err(rc::ASCE_IN_USE), 0));
    assert_eq!(uv.donated_bytes(), base + var);
    assert_eq!(stat(&uv, Uvc::CreateSecConf), 7);
    // ASCE controls and SCA (kvm-unit-tests test_config_create has the raw versions).
    let raw = |asce, sca| {
        uv.create_config(&region, 64 * MIB, asce, sca, base, var)
            .unwrap()
    };
    assert_eq!(raw(0x2000, SCA), (err(rc::INV_ASCE), 0), "no private bit");
    assert_eq!(raw(0x2000 | ASCE_P | 0x20, SCA), (err(rc::INV_ASCE), 0));
    assert_eq!(raw(0x2000 | ASCE_P | 0x10, SCA), (err(rc::INV_ASCE), 0));
    assert_eq!(raw(0x2000 | ASCE_P | 0x800, SCA), (err(rc::INV_ASCE), 0));
    assert_eq!(raw(0x2000 | ASCE_P, 0), (err(rc::SCA_ZERO), 0));
    // Linux's gmap ASCE: user bits 0x1c0, region-3 type 0x4, table length 3.
    assert_eq!(raw(0x2000 | 0x1c0 | 0x4 | 0x3, SCA).0, ok());
    assert_eq!(stat(&uv, Uvc::CreateSecConf), 13);
    // Destroy frees the ASCE and the donation.
    assert_eq!(uv.destroy_config(h), ok());
    assert_eq!(uv.donated_bytes(), base + var);
    assert_eq!(mk(64 * MIB, 0x1000, base, var).0, ok());

    let small = uv_with(UvOptions {
        max_guests: 1,
        ..Default::default()
    });
    let r = small.create_region(4 * MIB).unwrap();
    assert_eq!(create(&small, &r, 4 * MIB, 0x1000).0, ok());
    assert_eq!(
        create(&small, &r, 4 * MIB, 0x2000).0,
        err(rc::TOO_MANY_CONFIGS)
    );

    // A region of another UV is caller misuse, not a UV error.
    let other = uv_with(UvOptions::default());
    let foreign = other.create_region(4 * MIB).unwrap();
    assert!(matches!(
        uv.create_config(&foreign, 4 * MIB, 0x9000 | ASCE_P, SCA, base, var),
        Err(CoreError::ForeignRegion(_))
    ));
}

#[test]
fn handles_are_opaque() {
    let vm = vm(4 * MIB, 0);
    let uv = &vm.uv;
    assert_eq!(uv.destroy_config(vm.handle + 1), err(rc::INV_GUEST_HANDLE));
    assert_eq!(
        uv.destroy_config(vm.handle.wrapping_sub(1)),
        err(rc::INV_GUEST_HANDLE)
    );
    assert_eq!(uv.destroy_config(0), err(rc::INV_GUEST_HANDLE));
    let c = cpu(uv, vm.handle, 0);
    assert_eq!(uv.destroy_cpu(c + 1), err(rc::INV_CPU_HANDLE));
    assert_eq!(uv.destroy_cpu(vm.handle), err(rc::INV_CPU_HANDLE));
    assert_eq!(uv.cpu_handles(vm.handle).unwrap(), vec![c]);
    assert!(matches!(
        uv.cpu_handles(vm.handle + 1),
        Err(CoreError::NoSuchConfig(_))
    ));
    assert_eq!(uv.config_handles(), vec![vm.handle]);
}

#[test]
fn cpus_and_config_destroy_order() {
    let vm = vm(4 * MIB, 0);
    let uv = &vm.uv;
    let stor = uv.info().guest_cpu_stor_len;
    assert_eq!(
        uv.create_cpu(vm.handle + 1, 0, stor).0,
        err(rc::INV_GUEST_HANDLE)
    );
    assert_eq!(uv.create_cpu(vm.handle, 248, stor).0, err(rc::INV_CPU_NUM));
    assert_eq!(
        uv.create_cpu(vm.handle, 0, stor - 1).0,
        err(rc::CPU_STOR_TOO_SHORT)
    );
    let c0 = cpu(uv, vm.handle, 0);
    assert_eq!(uv.create_cpu(vm.handle, 0, stor).0, err(rc::CPU_NUM_IN_USE));
    let c1 = cpu(uv, vm.handle, 1);
    let donated = uv.donated_bytes();
    assert_eq!(uv.destroy_config(vm.handle), err(rc::CONFIG_HAS_CPUS));
    assert_eq!(uv.destroy_config_fast(vm.handle), err(rc::CONFIG_HAS_CPUS));
    assert_eq!(uv.destroy_cpu(c0), ok());
    assert_eq!(uv.destroy_cpu(c0), err(rc::INV_CPU_HANDLE));
    assert_eq!(uv.donated_bytes(), donated - stor);
    assert_eq!(uv.destroy_config(vm.handle), err(rc::CONFIG_HAS_CPUS));
    assert_eq!(uv.destroy_cpu(c1), ok());
    assert_eq!(uv.destroy_config(vm.handle), ok());
    assert_eq!(uv.destroy_config(vm.handle), err(rc::INV_GUEST_HANDLE));
    assert_eq!(uv.donated_bytes(), 0);
    assert!(uv.config_handles().is_empty());
    for u in [Uvc::CpuReset, Uvc::CpuResetInitial, Uvc::CpuResetClear] {
        assert_eq!(uv.cpu_uvc(u, c1), err(rc::INV_CPU_HANDLE));
        assert_eq!(stat(uv, u), 1);
    }
    assert_eq!(uv.cpu_uvc(Uvc::CpuSetState, c1), err(rc::INV_CMD));
    assert_eq!(uv.cpu_set_state(c1, 1), err(rc::INV_CPU_HANDLE));
    assert_eq!(stat(uv, Uvc::CpuSetState), 2);
}

#[test]
fn cpu_set_state_checks_the_state_value() {
    let vm = vm(4 * MIB, 0);
    let c = cpu(&vm.uv, vm.handle, 0);
    for s in [1, 2, 3, 5] {
        assert_eq!(vm.uv.cpu_set_state(c, s), ok(), "state {s}");
    }
    for s in [0, 4, 6, 0xff] {
        assert_eq!(
            vm.uv.cpu_set_state(c, s),
            err(rc::INV_CPU_STATE),
            "state {s}"
        );
    }
    assert_eq!(vm.uv.cpu_uvc(Uvc::CpuReset, c), ok());
}

#[test]
fn import_destroy_transitions() {
    let vm = vm(4 * MIB, MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    r.write(0, b"host data", 0).unwrap();
    // Not present -> 0x010a; out of range / unaligned -> INV_ADDR.
    assert_eq!(
        uv.convert_to_secure(h, 2 * MIB),
        err(rc::PAGE_NOT_ACCESSIBLE)
    );
    assert_eq!(uv.convert_to_secure(h, 4 * MIB), err(rc::INV_ADDR));
    assert_eq!(uv.convert_to_secure(h, 12), err(rc::INV_ADDR));
    assert_eq!(uv.convert_to_secure(h + 1, 0), err(rc::INV_GUEST_HANDLE));
    // Import zeroes fresh content.
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    assert_eq!(state(r, 0), ("secure", h));
    assert_eq!(uv.convert_to_secure(h, 0), ok(), "own secure page: no-op");
    assert_eq!(uv.secure_pages(Some(h)), 1);
    assert_eq!(uv.secure_pages(None), 1);
    assert!(matches!(
        r.read(0, 8, 0),
        Err(CoreError::SecureStorageAccess { .. })
    ));
    assert_eq!(r.read(0, 9, h).unwrap(), vec![0u8; 9]);
    r.write(0, b"guest secret", h).unwrap();
    // Destroy refused while the owner has CPUs.
    let c = cpu(uv, h, 0);
    assert_eq!(uv.destroy_page(r.base()), err(rc::OWNER_HAS_CPUS));
    assert_eq!(state(r, 0), ("secure", h));
    assert_eq!(uv.destroy_cpu(c), ok());
    assert_eq!(uv.destroy_page(r.base()), ok());
    assert_eq!(state(r, 0), ("nonsecure", 0));
    assert_eq!(r.read(0, 12, 0).unwrap(), vec![0u8; 12], "destroy zeroes");
    assert_eq!(uv.secure_pages(Some(h)), 0);
    // Idempotent, and addresses outside any region are INV_ADDR.
    assert_eq!(uv.destroy_page(r.base()), ok());
    assert_eq!(uv.destroy_page(r.base() + 3), err(rc::INV_ADDR));
    assert_eq!(uv.destroy_page(8), err(rc::INV_ADDR));
    assert_eq!(uv.destroy_page(r.base() + r.size()), err(rc::INV_ADDR));
    assert_eq!(stat(uv, Uvc::DestrSecStor), 6);
}

#[test]
fn legacy_destroy_rc() {
    let vm = vm_with(
        UvOptions {
            legacy_destroy_rc: true,
            ..Default::default()
        },
        4 * MIB,
        MIB,
    );
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    let legacy = UvcStatus::err_rrc(rc::LEGACY_NOT_SECURE, rc::LEGACY_NOT_SECURE_RRC);
    assert_eq!(uv.destroy_page(r.base()), legacy);
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    assert_eq!(uv.destroy_page(r.base()), ok());
    assert_eq!(uv.destroy_page(r.base()), legacy);
}

#[test]
fn export_import_round_trip_and_tamper() {
    let vm = vm(4 * MIB, MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    let secret: Vec<u8> = (0..PAGE as usize).map(|i| (i * 7 + 3) as u8).collect();
    for p in 0..2 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
        r.write(p * PAGE, &secret, h).unwrap();
    }
    // Export: EXPORTED(owner), encrypted in place, readable (as ciphertext) by the host.
    assert_eq!(uv.convert_from_secure(r.base()), ok());
    assert_eq!(state(r, 0), ("exported", h));
    assert_eq!(uv.secure_pages(Some(h)), 1);
    let ct = r.read(0, PAGE, 0).unwrap();
    assert_ne!(ct, secret);
    assert!(
        !ct.windows(64).any(|w| w == &secret[..64]),
        "plaintext must not survive export"
    );
    assert!(matches!(
        r.read(0, 8, h),
        Err(CoreError::SecureStorageAccess { .. })
    ));
    // Exporting twice is a no-op; re-import decrypts.
    assert_eq!(uv.convert_from_secure(r.base()), ok());
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    assert_eq!(r.read(0, PAGE, h).unwrap(), secret);

    // Tamper with the second page's ciphertext: import fails and changes nothing.
    assert_eq!(uv.convert_from_secure(r.base() + PAGE), ok());
    let mut ct = r.read(PAGE, PAGE, 0).unwrap();
    ct[100] ^= 1;
    r.write(PAGE, &ct, 0).unwrap();
    assert_eq!(uv.convert_to_secure(h, PAGE), err(rc::INTEGRITY));
    assert_eq!(state(r, 1), ("exported", h));
    assert_eq!(r.read(PAGE, PAGE, 0).unwrap(), ct);

    // Another config importing the exported page gets it zeroed (foreign).
    let (st, h2) = create(uv, r, 4 * MIB, 0x80_000);
    assert_eq!(st, ok());
    assert_eq!(uv.convert_to_secure(h2, PAGE), ok());
    assert_eq!(state(r, 1), ("secure", h2));
    assert_eq!(r.read(PAGE, PAGE, h2).unwrap(), vec![0u8; PAGE as usize]);
    // ...and may not import a page SECURE for h.
    assert_eq!(uv.convert_to_secure(h2, 0), err(rc::OTHER_OWNER));
    // Export of a non-secure page is a successful no-op.
    assert_eq!(uv.convert_from_secure(r.base() + 2 * PAGE), ok());
    assert_eq!(state(r, 2), ("nonsecure", 0));
}

#[test]
fn shared_pages_pin_and_misc() {
    for misc in [true, false] {
        let vm = vm_with(
            UvOptions {
                feature_misc: misc,
                ..Default::default()
            },
            4 * MIB,
            MIB,
        );
        let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
        assert_eq!(
            uv.set_shared_access(h, 0),
            err(rc::INV_STATE),
            "not secure yet"
        );
        assert_eq!(uv.convert_to_secure(h, 0), ok());
        assert_eq!(
            uv.pin_shared(r.base()),
            err(rc::INV_STATE),
            "secure, not shared"
        );
        assert_eq!(uv.set_shared_access(h, 0), ok());
        assert_eq!(state(r, 0), ("shared", h));
        r.write(0, b"shared", 0).unwrap();
        assert_eq!(r.read(0, 6, 0).unwrap(), b"shared");
        assert_eq!(uv.pin_shared(r.base()), ok());
        assert_eq!(uv.remove_shared_access(h, 0), err(rc::INV_STATE), "pinned");
        assert_eq!(uv.unpin_shared(h, 0), ok());
        assert_eq!(uv.unpin_shared(h, 0), err(rc::INV_STATE));
        assert_eq!(uv.remove_shared_access(h, 0), ok());
        assert_eq!(state(r, 0), ("secure", h));
        assert_eq!(uv.set_shared_access(h, 0), ok());
        assert_eq!(uv.pin_shared(r.base()), ok());
        // Another config imports the shared page: moved only with MISC.
        let (_, h2) = create(uv, r, 4 * MIB, 0x80_000);
        assert_eq!(uv.set_shared_access(h2, 0), err(rc::OTHER_OWNER));
        if misc {
            assert_eq!(uv.convert_to_secure(h2, 0), ok());
            assert_eq!(state(r, 0), ("secure", h2));
            assert_eq!(uv.secure_pages(Some(h)), 0);
            assert_eq!(uv.secure_pages(Some(h2)), 1);
        } else {
            assert_eq!(uv.convert_to_secure(h2, 0), err(rc::OTHER_OWNER));
            assert_eq!(state(r, 0), ("shared", h));
            // Unshare-all makes the (pinned) shared page secure again.
            assert_eq!(uv.unshare_all(h), ok());
            assert_eq!(state(r, 0), ("secure", h));
            assert_eq!(uv.unshare_all(h + 1), err(rc::INV_GUEST_HANDLE));
        }
    }
}

#[test]
fn destroy_config_cleans_and_fast_orphans() {
    let vm = vm(8 * MIB, 8 * MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    for p in 0..100 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
        r.write(p * PAGE, b"x", h).unwrap();
    }
    assert_eq!(uv.destroy_config(h), ok());
    assert_eq!(uv.secure_pages(None), 0);
    let c = r.state_counts().unwrap();
    assert_eq!(
        (c.secure, c.orphaned, c.nonsecure, c.present),
        (0, 0, r.pages(), r.pages())
    );
    assert_eq!(r.read(0, 1, 0).unwrap(), vec![0]);

    let (_, h2) = create(uv, r, 8 * MIB, 0x10_000);
    for p in 0..100 {
        assert_eq!(uv.convert_to_secure(h2, p * PAGE), ok());
    }
    assert_eq!(uv.set_shared_access(h2, 0), ok());
    let donated = uv.donated_bytes();
    assert_eq!(uv.destroy_config_fast(h2), ok());
    assert!(uv.donated_bytes() < donated);
    assert_eq!(state(r, 0), ("orphaned", h2));
    assert_eq!(state(r, 5), ("orphaned", h2));
    assert_eq!(
        uv.secure_pages(Some(h2)),
        100,
        "dead handle still counts its orphans"
    );
    assert_eq!(r.state_counts().unwrap().orphaned, 100);
    // Orphans are not accessible to the host or taken over by another config.
    assert!(matches!(
        r.read(0, 1, 0),
        Err(CoreError::SecureStorageAccess { .. })
    ));
    let (_, h3) = create(uv, r, 8 * MIB, 0x10_000);
    assert_eq!(uv.convert_to_secure(h3, 0), err(rc::OTHER_OWNER));
    assert_eq!(uv.convert_to_secure(h3, 5 * PAGE), err(rc::OTHER_OWNER));
    // Destroy page reclaims them.
    assert_eq!(uv.destroy_page(r.base() + 5 * PAGE), ok());
    assert_eq!(state(r, 5), ("nonsecure", 0));
    assert_eq!(uv.secure_pages(Some(h2)), 99);
    assert_eq!(uv.destroy_config_fast(h2), err(rc::INV_GUEST_HANDLE));

    let no_fast = vm_with(
        UvOptions {
            destroy_fast: false,
            ..Default::default()
        },
        4 * MIB,
        0,
    );
    assert_eq!(
        no_fast.uv.destroy_config_fast(no_fast.handle),
        err(rc::INV_CMD)
    );
    assert_eq!(no_fast.uv.stat(Uvc::DestroySecConfFast), 1);
    assert_eq!(no_fast.uv.config_handles(), vec![no_fast.handle]);
}

#[test]
fn failure_injection_changes_nothing() {
    let vm = vm(4 * MIB, MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    assert!(uv.inject_failure(0x9999, 5, 0, 1).is_err());
    assert!(uv.inject_failure(0x0202, rc::EXECUTED, 0, 1).is_err());
    assert!(uv.inject_failure(0x0202, 5, 0, 0).is_err());

    uv.inject_failure(0x0200, 0x0123, 7, 2).unwrap();
    assert_eq!(uv.convert_to_secure(h, 0), UvcStatus::err_rrc(0x0123, 7));
    assert_eq!(uv.convert_to_secure(h, 0), UvcStatus::err_rrc(0x0123, 7));
    assert_eq!(state(r, 0), ("nonsecure", 0));
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    assert_eq!(uv.stat(Uvc::ConvToSecStor), 3);

    uv.inject_failure(0x0202, 0x0abc, 0, 1).unwrap();
    assert_eq!(uv.destroy_page(r.base()), err(0x0abc));
    assert_eq!(state(r, 0), ("secure", h));
    uv.inject_failure(0x0101, 0x0abc, 0, 1).unwrap();
    assert_eq!(uv.destroy_config(h), err(0x0abc));
    assert_eq!(uv.config_handles(), vec![h]);
    assert_eq!(uv.secure_pages(Some(h)), 1);
    uv.inject_failure(0x0102, rc::APQN_BOUND, 0, 1).unwrap();
    assert_eq!(uv.destroy_config_fast(h), err(rc::APQN_BOUND));
    assert_eq!(uv.config_handles(), vec![h]);
    uv.inject_failure(0x0100, 0x0101, 0, 1).unwrap();
    assert_eq!(create(uv, r, 4 * MIB, 0x40_000), (err(0x0101), 0));
    assert_eq!(uv.config_handles().len(), 1);
    // With the NEED_DESTROY flag a handle exists anyway and must be destroyed.
    uv.inject_failure(0x0100, 0x0101 | rc::NEED_DESTROY, 0, 1)
        .unwrap();
    let (st, nd) = create(uv, r, 4 * MIB, 0x40_000);
    assert_eq!(st, err(0x8101));
    assert_ne!(nd, 0);
    assert_eq!(uv.config_handles().len(), 2);
    assert_eq!(uv.destroy_config(nd), ok());
    uv.inject_failure(0x0201, 0x0abc, 0, 1).unwrap();
    uv.clear_failures();
    assert_eq!(uv.convert_from_secure(r.base()), ok());

    // Injected destroy failures inside a walk are consumed per page.
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    for p in 1..10 {
        assert_eq!(uv.convert_to_secure(h, p * PAGE), ok());
    }
    uv.reset_stats();
    uv.inject_failure(0x0202, 0x0abc, 0, 3).unwrap();
    let w = kernel::destroy_walk(uv, r, 0, None, None).unwrap();
    assert_eq!(w.visited, 256);
    assert_eq!(w.destroyed, 7);
    assert_eq!(uv.secure_pages(Some(h)), 3);
    assert_eq!(uv.stat(Uvc::DestrSecStor), 256);
    assert_eq!(
        uv.destroy_page(r.base() + 100 * PAGE),
        ok(),
        "injections used up"
    );
}

#[test]
fn image_unpack_verify() {
    use pvfast_core::image::{seal_image, HOST_KEY_DEFAULT};
    let vm = vm(4 * MIB, 0);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    let kernel: Vec<u8> = (0..3 * PAGE as usize).map(|i| (i % 251) as u8).collect();
    let key: [u8; 64] = std::array::from_fn(|i| i as u8);
    let (hdr, enc) = seal_image(&[(0x10000, 0x77, &kernel)], &HOST_KEY_DEFAULT, &key).unwrap();

    assert_eq!(
        uv.unpack(h, 0x10000, 0x77, 0),
        err(rc::INV_STATE),
        "no header yet"
    );
    assert_eq!(uv.verify(h), err(rc::INV_STATE));
    assert_eq!(uv.set_sec_parms(h, &hdr[..10]).cc, 1);
    assert_ne!(uv.set_sec_parms(h, &hdr[..10]).rc, rc::EXECUTED);
    assert_eq!(uv.set_sec_parms(h + 1, &hdr), err(rc::INV_GUEST_HANDLE));
    assert_eq!(uv.set_sec_parms(h, &hdr), ok());
    assert_eq!(uv.set_sec_parms(h, &hdr), err(rc::INV_STATE));

    // Host loads the ciphertext; a page not present answers 0x010a.
    assert_eq!(uv.unpack(h, 0x10000, 0x77, 0), err(rc::PAGE_NOT_ACCESSIBLE));
    r.write(0x10000, &enc[0], 0).unwrap();
    for n in 0..3u64 {
        assert_eq!(uv.unpack(h, 0x10000 + n * PAGE, 0x77, n * PAGE), ok());
    }
    assert_eq!(
        uv.unpack(h, 0x10000, 0x77, 0),
        err(rc::INV_STATE),
        "already secure"
    );
    assert_eq!(r.read(0x10000, 3 * PAGE, h).unwrap(), kernel);
    assert_eq!(uv.verify(h), ok());
    assert_eq!(uv.verify(h), err(rc::INV_STATE));

    // A wrong tweak gives garbage plaintext and a verification failure.
    let (_, h2) = create(uv, r, 4 * MIB, 0x80_000);
    assert_eq!(uv.destroy_config(h), ok());
    r.write(0x10000, &enc[0], 0).unwrap();
    assert_eq!(uv.set_sec_parms(h2, &hdr), ok());
    for n in 0..3u64 {
        assert_eq!(uv.unpack(h2, 0x10000 + n * PAGE, 0x78, n * PAGE), ok());
    }
    let v = uv.verify(h2);
    assert_eq!(v.cc, 1);
    assert_ne!(v.rc, rc::EXECUTED);
}

#[test]
fn dump_sequence() {
    let vm = vm(4 * MIB, MIB);
    let (uv, h) = (&vm.uv, vm.handle);
    let c = cpu(uv, h, 3);
    let info = uv.info();
    assert_eq!(uv.dump_conf_stor_state(h, 0).0, err(rc::INV_STATE));
    assert_eq!(uv.dump_cpu(c).0, err(rc::NOT_DUMPING));
    assert_eq!(uv.dump_complete(h).0, err(rc::INV_STATE));
    assert_eq!(uv.dump_init(h), ok());
    assert_eq!(uv.dump_init(h), err(rc::INV_STATE));
    assert_eq!(uv.convert_to_secure(h, PAGE), ok());
    let (st, data) = uv.dump_conf_stor_state(h, 0);
    assert_eq!(st, ok());
    assert_eq!(data.len() as u64, info.conf_dump_storage_state_len);
    assert_eq!(data[16 + 8], 1, "page 1 secure");
    assert_eq!(data[8], 0, "page 0 non-secure");
    assert_eq!(uv.dump_conf_stor_state(h, PAGE).0, err(rc::INV_DUMP_ADDR));
    assert_eq!(
        uv.dump_conf_stor_state(h, 4 * MIB).0,
        err(rc::INV_DUMP_ADDR)
    );
    let (st, data) = uv.dump_cpu(c);
    assert_eq!(st, ok());
    assert_eq!(data.len() as u64, info.guest_cpu_stor_len);
    assert_eq!(uv.dump_cpu(c + 1).0, err(rc::INV_CPU_HANDLE));
    let (st, data) = uv.dump_complete(h);
    assert_eq!(st, ok());
    assert_eq!(data.len() as u64, info.conf_dump_finalize_len);
    assert_eq!(uv.prepare_reset(h), ok());
    assert_eq!(uv.prepare_reset(h + 1), err(rc::INV_GUEST_HANDLE));

    let nodump = vm_with(
        UvOptions {
            dump: false,
            ..Default::default()
        },
        4 * MIB,
        0,
    );
    assert_eq!(nodump.uv.dump_init(nodump.handle), err(rc::INV_CMD));
}

#[test]
fn region_rules() {
    let uv = uv();
    assert!(uv.create_region(0).is_err());
    assert!(uv.create_region(PAGE + 1).is_err());
    let a = uv.create_region(4 * MIB).unwrap();
    let b = uv.create_region(4 * MIB).unwrap();
    assert!(b.base() >= a.base() + a.size());
    assert_eq!(a.base() % PAGE, 0);
    assert_ne!(a.id(), b.id());
    assert_eq!(a.touch(100, 5000).unwrap(), 2);
    assert_eq!(a.touch(0, 8192).unwrap(), 0);
    assert_eq!(a.present_pages().unwrap(), 2);
    assert!(a.touch(4 * MIB - 1, 2).is_err());
    assert!(matches!(
        a.page_state(1024),
        Err(CoreError::IndexOutOfRange { .. })
    ));
    assert!(
        a.read(0, 1, 12345).is_err(),
        "as_config must be a live handle"
    );
    uv.release_region(&a).unwrap();
    assert!(matches!(a.read(0, 1, 0), Err(CoreError::RegionReleased(_))));
    assert!(matches!(
        kernel::destroy_walk(&uv, &a, 0, None, None),
        Err(CoreError::RegionReleased(_))
    ));
    assert_eq!(uv.destroy_page(a.base()), err(rc::INV_ADDR));
    let (st, _) = create(&uv, &b, 4 * MIB, 0x1000);
    assert_eq!(st, ok());
}

#[test]
fn release_region_drops_secure_counts() {
    let vm = vm(4 * MIB, MIB);
    for p in 0..10 {
        assert_eq!(vm.uv.convert_to_secure(vm.handle, p * PAGE), ok());
    }
    assert_eq!(vm.uv.secure_pages(None), 10);
    vm.uv.release_region(&vm.region).unwrap();
    assert_eq!(vm.uv.secure_pages(None), 0);
    assert_eq!(vm.uv.secure_pages(Some(vm.handle)), 0);
    assert_eq!(vm.uv.convert_to_secure(vm.handle, 0), err(rc::INV_ADDR));
}

#[test]
fn exported_pages_of_a_dead_config_read_as_nonsecure() {
    for fast in [false, true] {
        let vm = vm(4 * MIB, MIB);
        let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
        assert_eq!(uv.convert_to_secure(h, 0), ok());
        assert_eq!(uv.convert_from_secure(r.base()), ok());
        assert_eq!(state(r, 0), ("exported", h));
        let st = if fast {
            uv.destroy_config_fast(h)
        } else {
            uv.destroy_config(h)
        };
        assert_eq!(st, ok());
        assert_eq!(state(r, 0), ("nonsecure", 0));
        assert_eq!(r.state_counts().unwrap().exported, 0);
        // Host access is fine; a new config imports it as a fresh page.
        assert!(r.read(0, 16, 0).is_ok());
        let (_, h2) = create(uv, r, 4 * MIB, 0x80_000);
        assert_eq!(uv.convert_to_secure(h2, 0), ok());
        assert_eq!(r.read(0, 16, h2).unwrap(), vec![0u8; 16]);
    }
    // An orphan exported after Destroy-Fast keeps reading as exported by the dead handle.
    let vm = vm(4 * MIB, MIB);
    let (uv, r, h) = (&vm.uv, &vm.region, vm.handle);
    assert_eq!(uv.convert_to_secure(h, 0), ok());
    assert_eq!(uv.destroy_config_fast(h), ok());
    assert_eq!(state(r, 0), ("orphaned", h));
    assert_eq!(uv.convert_from_secure(r.base()), ok());
    assert_eq!(state(r, 0), ("exported", h));
    assert_eq!(uv.secure_pages(Some(h)), 0);
    let (_, h2) = create(uv, r, 4 * MIB, 0x80_000);
    assert_eq!(uv.convert_to_secure(h2, 0), ok());
    assert_eq!(state(r, 0), ("secure", h2));
}

#[test]
fn destroyed_configurations_are_retired_and_their_ids_reused() {
    let uv = uv();
    let r = uv.create_region(4 * MIB).unwrap();
    r.touch(0, MIB).unwrap();
    let mut handles = std::collections::HashSet::new();
    for i in 0..10_000u64 {
        let (st, h) = create(&uv, &r, 4 * MIB, 0x10_000);
        assert_eq!(st, ok());
        assert!(handles.insert(h), "handle {h:#x} reused (cycle {i})");
        assert_eq!(uv.convert_to_secure(h, (i % 8) * PAGE), ok());
        assert_eq!(uv.convert_from_secure(r.base() + (i % 8) * PAGE), ok());
        let c = cpu(&uv, h, 0);
        assert_eq!(uv.destroy_cpu(c), ok());
        assert_eq!(uv.destroy_config(h), ok());
        let t = uv.table_sizes();
        assert_eq!(
            (t.configs, t.live, t.dead, t.cpus),
            (0, 0, 0, 0),
            "cycle {i}"
        );
        assert_eq!(t.id_slots, 1, "the one id is reused (cycle {i})");
    }
    // The exports of destroyed configurations read as plain non-secure memory.
    for p in 0..8 {
        assert_eq!(state(&r, p), ("nonsecure", 0));
    }
}

#[test]
fn a_reused_id_never_adopts_an_old_page() {
    let uv = uv();
    let r = uv.create_region(4 * MIB).unwrap();
    r.touch(0, MIB).unwrap();
    // A: page 0 orphaned by Destroy-Fast, page 1 exported while A lived.
    let (_, a) = create(&uv, &r, 4 * MIB, 0x10_000);
    for p in 0..2 {
        assert_eq!(uv.convert_to_secure(a, p * PAGE), ok());
    }
    r.write(PAGE, b"A's secret", a).unwrap();
    assert_eq!(uv.convert_from_secure(r.base() + PAGE), ok());
    assert_eq!(uv.destroy_config_fast(a), ok());
    assert_eq!(state(&r, 0), ("orphaned", a));
    // While the orphan exists, A is kept: new configurations get other ids.
    let (_, b) = create(&uv, &r, 4 * MIB, 0x20_000);
    assert_eq!(uv.table_sizes().id_slots, 2);
    assert_eq!(uv.convert_to_secure(b, 0), err(rc::OTHER_OWNER));
    assert_eq!(uv.secure_pages(Some(a)), 1);
    // The orphan goes; a sweep (any destroy or region release) forgets A's export and A.
    assert_eq!(uv.destroy_page(r.base()), ok());
    assert_eq!(uv.destroy_config(b), ok());
    let t = uv.table_sizes();
    assert_eq!((t.configs, t.free_ids), (0, 2));
    assert_eq!(uv.secure_pages(Some(a)), 0);
    // C and D take the two freed ids, so one of them has A's: A's exported page is neither's
    // to decrypt, it is fresh memory (zeroed on import), and A's handle means nothing.
    let (_, c) = create(&uv, &r, 4 * MIB, 0x30_000);
    let (_, d) = create(&uv, &r, 4 * MIB, 0x40_000);
    assert_eq!(uv.table_sizes().id_slots, 2, "both ids reused");
    assert_eq!(state(&r, 1), ("nonsecure", 0));
    for (h, page) in [(c, 1), (d, 2)] {
        assert_eq!(uv.convert_to_secure(h, page * PAGE), ok());
        assert_eq!(r.read(page * PAGE, 10, h).unwrap(), vec![0u8; 10]);
    }
    assert_eq!(state(&r, 0), ("nonsecure", 0));
    assert_eq!(uv.destroy_config(a), err(rc::INV_GUEST_HANDLE));
    assert!(c != a && d != a && c != b && d != b);
}

#[test]
fn an_orphan_export_keeps_its_configuration_until_the_region_goes() {
    let uv = uv();
    let r = uv.create_region(4 * MIB).unwrap();
    r.touch(0, MIB).unwrap();
    let (_, a) = create(&uv, &r, 4 * MIB, 0x10_000);
    assert_eq!(uv.convert_to_secure(a, 0), ok());
    assert_eq!(uv.destroy_config_fast(a), ok());
    assert_eq!(uv.convert_from_secure(r.base()), ok()); // the orphan is exported
    for _ in 0..100 {
        let (_, h) = create(&uv, &r, 4 * MIB, 0x20_000);
        assert_eq!(uv.destroy_config(h), ok());
        assert_eq!(
            state(&r, 0),
            ("exported", a),
            "still attributed to the dead handle"
        );
    }
    assert_eq!(uv.table_sizes().dead, 1);
    // Destroy-page leaves an exported page alone; the region going releases everything.
    assert_eq!(uv.destroy_page(r.base()), ok());
    assert_eq!(uv.table_sizes().configs, 1);
    uv.release_region(&r).unwrap();
    let t = uv.table_sizes();
    assert_eq!((t.configs, t.dead), (0, 0));
}
