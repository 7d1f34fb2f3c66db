//! The Ultravisor checks of kvm-unit-tests, ported: every check of `s390x/uv-host.c` and
//! `s390x/uv-guest.c` that applies to an emulated UV, one `#[test]` per check, driven through
//! the raw UVCB dispatcher (`dispatch::call` / `call_as`) as kvm-unit-tests drives the UVC
//! instruction. kvm-unit-tests runs these on real IBM Z machines, so they are the public record
//! of the hardware's answers. Each test is named after its function (`host_<function>_<check>`
//! for uv-host.c, `guest_<function>_<check>` for uv-guest.c) and cites it; the checks that
//! cannot apply (program interrupts, address translation, host CPU run state, host memory
//! size, machine reset) are listed with the reason in docs/UV.md.
//!
//! Read at (repository kvm-unit-tests/kvm-unit-tests):
//! * `s390x/uv-host.c`: the revision with `test_i3`, `test_uv_uninitialized`, `test_access`,
//!   `test_set_se_header`, the "attest" entry of `invalid_cmds` and `cgc_check_data` (the
//!   source index stores it without a commit id); differences of the older revision
//!   0a5b31d2539d67b2e46b037012bb83f09b585c9e are noted in docs/UV.md.
//! * `s390x/uv-guest.c` at 3c645a436dbd3f3d88353779eae70fc64e090d15.
//! * `lib/s390x/uv.c` at 0c259cf369540df8fed7e64d63998f92574966b9 (`uv_setup`: the start-up
//!   QUI whose answer `uv_query_test_call` reads) and `lib/s390x/asm/uv.h` (block layouts).
//!
//! The code is pvfast's own; only the constants and the expected answers carry over.

use pvfast_core::dispatch::{self, Issuer};
use pvfast_core::{Ultravisor, UvOptions};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// `cmds[]` of uv-host.c (and `invalid_cmds[]` of uv-guest.c after "bogus"): name, command,
/// `sizeof` of its control block, installed-calls bit.
struct Cmd {
    name: &'static str,
    cmd: u16,
    len: u16,
    bit: u32,
}

const CMDS: [Cmd; 17] = [
    Cmd {
        name: "init",
        cmd: 0x000f,
        len: 0x48,
        bit: 1,
    },
    Cmd {
        name: "create conf",
        cmd: 0x0100,
        len: 0x80,
        bit: 2,
    },
    Cmd {
        name: "destroy conf",
        cmd: 0x0101,
        len: 0x40,
        bit: 3,
    },
    Cmd {
        name: "create cpu",
        cmd: 0x0120,
        len: 0x60,
        bit: 4,
    },
    Cmd {
        name: "destroy cpu",
        cmd: 0x0121,
        len: 0x40,
        bit: 5,
    },
    Cmd {
        name: "conv to",
        cmd: 0x0200,
        len: 0x28,
        bit: 6,
    },
    Cmd {
        name: "conv from",
        cmd: 0x0201,
        len: 0x20,
        bit: 7,
    },
    Cmd {
        name: "set sec conf",
        cmd: 0x0300,
        len: 0x50,
        bit: 11,
    },
    Cmd {
        name: "unpack",
        cmd: 0x0301,
        len: 0x50,
        bit: 13,
    },
    Cmd {
        name: "verify",
        cmd: 0x0302,
        len: 0x40,
        bit: 14,
    },
    Cmd {
        name: "cpu reset",
        cmd: 0x0310,
        len: 0x40,
        bit: 15,
    },
    Cmd {
        name: "cpu initial reset",
        cmd: 0x0311,
        len: 0x40,
        bit: 16,
    },
    Cmd {
        name: "conf clear reset",
        cmd: 0x0320,
        len: 0x40,
        bit: 18,
    },
    Cmd {
        name: "cpu clear reset",
        cmd: 0x0321,
        len: 0x40,
        bit: 19,
    },
    Cmd {
        name: "cpu set state",
        cmd: 0x0330,
        len: 0x50,
        bit: 17,
    },
    Cmd {
        name: "pin shared",
        cmd: 0x0341,
        len: 0x20,
        bit: 21,
    },
    Cmd {
        name: "unpin shared",
        cmd: 0x0342,
        len: 0x28,
        bit: 22,
    },
];

const RC_EXECUTED: u16 = 0x0001;
const RC_INV_CMD: u16 = 0x0002;
const RC_INV_STATE: u16 = 0x0003;
const RC_INV_LEN: u16 = 0x0005;
const RC_INV_GHANDLE: u16 = 0x0020;
const RC_INV_CHANDLE: u16 = 0x0021;
const RC_DSTR_NEEDED_FLG: u16 = 0x8000;

// uv_cb_qui offsets (lib/s390x/asm/uv.h).
const QUI_INST_CALLS: usize = 0x10;
const QUI_UV_BASE_STOR_LEN: usize = 0x40;
const QUI_CONF_BASE_PHYS_STOR_LEN: usize = 0x50;
const QUI_CONF_BASE_VIRT_STOR_LEN: usize = 0x58;
const QUI_CONF_VIRT_VAR_STOR_LEN: usize = 0x60;
const QUI_CPU_STOR_LEN: usize = 0x68;
const QUI_MAX_GUEST_STOR_ADDR: usize = 0x80;
const QUI_MAX_GUEST_CPUS: usize = 0x9e;

// ASCE bits of the Create Config test (lib/s390x/asm/pgtable.h).
const ASCE_DT_SEGMENT: u64 = 0x0;
const REGION_TABLE_LENGTH: u64 = 0x3;
const ASCE_P: u64 = 0x100;

/// Host "memory" the tests donate from: any address the UV takes as storage. The emulator
/// keeps no host memory map, so only the values matter (all above the lowcore, 16 KiB aligned).
const AREA: u64 = 0x4000_0000;

// ------------------------------------------------------------------------------- blocks

/// A zeroed control block of `size` bytes with header `len`, `cmd`.
fn block(cmd: u16, len: u16, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[0..2].copy_from_slice(&len.to_be_bytes());
    b[2..4].copy_from_slice(&cmd.to_be_bytes());
    b
}

fn set_len(b: &mut [u8], len: u16) {
    b[0..2].copy_from_slice(&len.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn get16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn rc(b: &[u8]) -> u16 {
    get16(b, 4)
}

/// `uv_call`: issue the block as the host; the block is updated in place, cc returned.
fn uv_call(uv: &Ultravisor, b: &mut Vec<u8>) -> u8 {
    uv_call_as(uv, Issuer::Host, b)
}

fn uv_call_as(uv: &Ultravisor, who: Issuer, b: &mut Vec<u8>) -> u8 {
    let (cc, out) = dispatch::call_as(uv, who, b);
    *b = out;
    cc
}

/// `test_bit_inv` over the installed-calls list of a QUI answer.
fn qui_bit(qui: &[u8], bit: u32) -> bool {
    let word = get64(qui, QUI_INST_CALLS + 8 * (bit as usize / 64));
    word & (1u64 << (63 - bit % 64)) != 0
}

// ------------------------------------------------------------------------------- set-up

/// A host UV as kvm-unit-tests finds it at start: not yet initialised.
fn host_uv() -> Ultravisor {
    Ultravisor::new(UvOptions {
        threads: 1,
        initialised: false,
        ..Default::default()
    })
    .expect("ultravisor")
}

/// `uv_setup` (lib/s390x/uv.c): one QUI with the full block, accepted with rc 0x0001 or 0x0100;
/// `uv_query_test_call` reads this stored answer.
fn uv_setup(uv: &Ultravisor, who: Issuer) -> Vec<u8> {
    let mut qui = block(0x0001, 0x100, 0x100);
    uv_call_as(uv, who, &mut qui);
    assert!(
        matches!(rc(&qui), 0x0001 | 0x0100),
        "uv_setup QUI rc {:#x}",
        rc(&qui)
    );
    qui
}

/// The Init UV block of `test_init`: a 1 MiB aligned donation of uv_base_stor_len above 2 GiB.
fn init_block(qui: &[u8]) -> Vec<u8> {
    let mut b = block(0x000f, 0x48, 0x48);
    put64(&mut b, 0x18, 1 << 32);
    put64(&mut b, 0x20, get64(qui, QUI_UV_BASE_STOR_LEN));
    b
}

/// A host after `test_init` succeeded, with guest storage for the configuration (the emulator
/// needs a region to hold the 42 MiB kvm-unit-tests asks for).
struct Host {
    uv: Ultravisor,
    qui: Vec<u8>,
}

fn initialised_host() -> Host {
    let uv = host_uv();
    let qui = uv_setup(&uv, Issuer::Host);
    let mut init = init_block(&qui);
    assert_eq!((uv_call(&uv, &mut init), rc(&init)), (0, RC_EXECUTED));
    uv.create_region(64 * MIB).expect("region");
    Host { uv, qui }
}

/// `uvcb_cgc` as `test_config_create` fills it: origin 0, 42 MiB, base and variable donations,
/// ASCE = 16 KiB table | segment type | full table length | private-space control, a 16 KiB SCA.
fn cgc_block(h: &Host) -> Vec<u8> {
    let guest_len = 42 * MIB;
    let vsize = get64(&h.qui, QUI_CONF_BASE_VIRT_STOR_LEN)
        + guest_len / MIB * get64(&h.qui, QUI_CONF_VIRT_VAR_STOR_LEN);
    let base_len = get64(&h.qui, QUI_CONF_BASE_PHYS_STOR_LEN);
    let mut b = block(0x0100, 0x80, 0x80);
    let base = AREA;
    let var = (base + base_len).next_multiple_of(PAGE);
    let asce = (var + vsize).next_multiple_of(4 * PAGE);
    let sca = asce + 4 * PAGE;
    put64(&mut b, 0x20, base);
    put64(&mut b, 0x28, var);
    put64(&mut b, 0x38, 0);
    put64(&mut b, 0x40, guest_len);
    put64(&mut b, 0x48, sca);
    put64(
        &mut b,
        0x50,
        asce | ASCE_DT_SEGMENT | REGION_TABLE_LENGTH | ASCE_P,
    );
    b
}

/// `cgc_check_data`: an error rc (the 0x8000 flag masked off) equal to `expected`, and a
/// handle only together with the flag.
fn cgc_check_data(b: &[u8], expected: u16) -> bool {
    let r = rc(b);
    if r == RC_EXECUTED {
        return false;
    }
    assert!(
        r & RC_DSTR_NEEDED_FLG != 0 || get64(b, 0x18) == 0,
        "received a handle with rc {r:#x}"
    );
    r & !RC_DSTR_NEEDED_FLG == expected
}

/// `cgc_destroy_if_needed`: a handle that came back (success or the 0x8000 flag) is destroyed.
fn cgc_destroy_if_needed(uv: &Ultravisor, b: &mut [u8]) {
    let r = rc(b);
    if r != RC_EXECUTED && r & RC_DSTR_NEEDED_FLG == 0 {
        return;
    }
    let mut dsc = block(0x0101, 0x40, 0x40);
    put64(&mut dsc, 0x18, get64(b, 0x18));
    assert_eq!(uv_call(uv, &mut dsc), 0);
    put64(b, 0x18, 0);
}

/// Run one Create Config variant (`change` edits the valid block), then clean up as
/// `test_config_create` does; returns (cc, block as answered).
fn cgc_variant(change: impl FnOnce(&mut Vec<u8>)) -> (u8, Vec<u8>) {
    let h = initialised_host();
    let mut b = cgc_block(&h);
    change(&mut b);
    let cc = uv_call(&h.uv, &mut b);
    let answered = b.clone();
    cgc_destroy_if_needed(&h.uv, &mut b);
    (cc, answered)
}

/// A host with the configuration of `test_config_create` created.
struct WithConfig {
    h: Host,
    cgc: Vec<u8>,
    handle: u64,
}

fn with_config() -> WithConfig {
    let h = initialised_host();
    let mut cgc = cgc_block(&h);
    assert_eq!((uv_call(&h.uv, &mut cgc), rc(&cgc)), (0, RC_EXECUTED));
    let handle = get64(&cgc, 0x18);
    WithConfig { h, cgc, handle }
}

/// `uvcb_csc` as `test_cpu_create` fills it: the config, a 4 KiB aligned cpu_stor_len donation,
/// a state description page, cpu number 0.
fn csc_block(c: &WithConfig) -> Vec<u8> {
    let cpu_len = get64(&c.h.qui, QUI_CPU_STOR_LEN);
    let mut b = block(0x0120, 0x60, 0x60);
    put64(&mut b, 0x20, c.handle);
    put64(&mut b, 0x28, AREA + 256 * MIB);
    put64(
        &mut b,
        0x38,
        AREA + 256 * MIB + cpu_len.next_multiple_of(PAGE),
    );
    put16(&mut b, 0x36, 0);
    b
}

/// A host with the configuration and the CPU of `test_cpu_create`.
struct WithCpu {
    c: WithConfig,
    cpu: u64,
}

fn with_cpu() -> WithCpu {
    let c = with_config();
    let mut csc = csc_block(&c);
    assert_eq!((uv_call(&c.h.uv, &mut csc), rc(&csc)), (0, RC_EXECUTED));
    let cpu = get64(&csc, 0x18);
    WithCpu { c, cpu }
}

fn nodata(cmd: u16, handle: u64) -> Vec<u8> {
    let mut b = block(cmd, 0x40, 0x40);
    put64(&mut b, 0x18, handle);
    b
}

// ===================================================================== uv-host.c test_invalid

/// The entries of `invalid_cmds[]`: each answers cc 1, rc 0x0002, and (if it has one) its bit
/// is not indicated in the host's QUI. The header is 8 bytes, as in the test.
fn host_invalid(cmd: u16, len: u16, bit: Option<u32>) {
    let uv = host_uv();
    let qui = uv_setup(&uv, Issuer::Host);
    let mut hdr = block(cmd, len, 8);
    let cc = uv_call(&uv, &mut hdr);
    assert_eq!((cc, rc(&hdr)), (1, RC_INV_CMD));
    if let Some(bit) = bit {
        assert!(!qui_bit(&qui, bit), "bit {bit} indicated to a host");
    }
}

/// uv-host.c test_invalid: "bogus" (0x4242).
#[test]
fn host_test_invalid_bogus() {
    host_invalid(0x4242, 8, None);
}

/// uv-host.c test_invalid: "share" (SET_SHARED_ACCESS is a guest call; bit 8).
#[test]
fn host_test_invalid_share() {
    host_invalid(0x1000, 0x30, Some(8));
}

/// uv-host.c test_invalid: "unshare" (REMOVE_SHARED_ACCESS; bit 9).
#[test]
fn host_test_invalid_unshare() {
    host_invalid(0x1001, 0x30, Some(9));
}

/// uv-host.c test_invalid: "attest" (ATTESTATION 0x1020, a guest call; bit 28).
#[test]
fn host_test_invalid_attest() {
    host_invalid(0x1020, 0x188, Some(28));
}

// ============================================================ uv-host.c test_uv_uninitialized

/// Before INIT_UV, each command of `cmds[]` but init (header with its length, the rest 0)
/// answers rc 0x0003.
fn host_uninitialized(i: usize) {
    let c = &CMDS[i];
    let uv = host_uv();
    let mut b = block(c.cmd, c.len, usize::from(c.len));
    uv_call(&uv, &mut b);
    assert_eq!(rc(&b), RC_INV_STATE, "{}", c.name);
}

macro_rules! per_cmd {
    ($check:ident, $doc:literal: $($test:ident = $i:expr;)*) => {$(
        #[doc = $doc]
        #[test]
        fn $test() {
            $check($i);
        }
    )*};
}

per_cmd! { host_uninitialized, "uv-host.c test_uv_uninitialized (one entry of cmds[]).":
    host_test_uv_uninitialized_create_conf = 1;
    host_test_uv_uninitialized_destroy_conf = 2;
    host_test_uv_uninitialized_create_cpu = 3;
    host_test_uv_uninitialized_destroy_cpu = 4;
    host_test_uv_uninitialized_conv_to = 5;
    host_test_uv_uninitialized_conv_from = 6;
    host_test_uv_uninitialized_set_sec_conf = 7;
    host_test_uv_uninitialized_unpack = 8;
    host_test_uv_uninitialized_verify = 9;
    host_test_uv_uninitialized_cpu_reset = 10;
    host_test_uv_uninitialized_cpu_initial_reset = 11;
    host_test_uv_uninitialized_conf_clear_reset = 12;
    host_test_uv_uninitialized_cpu_clear_reset = 13;
    host_test_uv_uninitialized_cpu_set_state = 14;
    host_test_uv_uninitialized_pin_shared = 15;
    host_test_uv_uninitialized_unpin_shared = 16;
}

// ======================================================================= uv-host.c test_query

/// uv-host.c test_query: "length" (0xa0, a dword below the minimum) -> 0x0005.
#[test]
fn host_test_query_length() {
    let uv = host_uv();
    let mut b = block(0x0001, 0xa0, 0x100);
    uv_call(&uv, &mut b);
    assert_eq!(rc(&b), RC_INV_LEN);
}

/// uv-host.c test_query: "insf length" (0xa8) -> 0x0100.
#[test]
fn host_test_query_insf_length() {
    let uv = host_uv();
    let mut b = block(0x0001, 0xa8, 0x100);
    uv_call(&uv, &mut b);
    assert_eq!(rc(&b), 0x0100);
}

/// uv-host.c test_query: "successful query" (full block) -> cc 0 rc 0x0001, or cc 1 rc 0x0100.
#[test]
fn host_test_query_successful_query() {
    let uv = host_uv();
    let mut b = block(0x0001, 0x100, 0x100);
    let cc = uv_call(&uv, &mut b);
    assert!(
        (cc == 0 && rc(&b) == RC_EXECUTED) || (cc == 1 && rc(&b) == 0x0100),
        "cc {cc} rc {:#x}",
        rc(&b)
    );
}

/// Each command of `cmds[]` is indicated in the host's installed-calls list.
fn host_query_indicated(i: usize) {
    let c = &CMDS[i];
    let uv = host_uv();
    let qui = uv_setup(&uv, Issuer::Host);
    assert!(
        qui_bit(&qui, c.bit),
        "{} (bit {}) not indicated",
        c.name,
        c.bit
    );
}

per_cmd! { host_query_indicated, "uv-host.c test_query: uv_query_test_call for one entry of cmds[].":
    host_test_query_indicated_init = 0;
    host_test_query_indicated_create_conf = 1;
    host_test_query_indicated_destroy_conf = 2;
    host_test_query_indicated_create_cpu = 3;
    host_test_query_indicated_destroy_cpu = 4;
    host_test_query_indicated_conv_to = 5;
    host_test_query_indicated_conv_from = 6;
    host_test_query_indicated_set_sec_conf = 7;
    host_test_query_indicated_unpack = 8;
    host_test_query_indicated_verify = 9;
    host_test_query_indicated_cpu_reset = 10;
    host_test_query_indicated_cpu_initial_reset = 11;
    host_test_query_indicated_conf_clear_reset = 12;
    host_test_query_indicated_cpu_clear_reset = 13;
    host_test_query_indicated_cpu_set_state = 14;
    host_test_query_indicated_pin_shared = 15;
    host_test_query_indicated_unpin_shared = 16;
}

// ======================================================================== uv-host.c test_init

/// The state test_init starts from: QUI done, UV not initialised.
fn before_init() -> (Ultravisor, Vec<u8>) {
    let uv = host_uv();
    let qui = uv_setup(&uv, Issuer::Host);
    let init = init_block(&qui);
    (uv, init)
}

/// uv-host.c test_init: "hdr invalid length" (0x40) -> cc 1, 0x0005.
#[test]
fn host_test_init_hdr_invalid_length() {
    let (uv, mut b) = before_init();
    set_len(&mut b, 0x40);
    assert_eq!((uv_call(&uv, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-host.c test_init: "storage invalid length" (uv_base_stor_len - 8) -> cc 1, 0x0103.
#[test]
fn host_test_init_storage_invalid_length() {
    let (uv, mut b) = before_init();
    let len = get64(&b, 0x20);
    assert_ne!(len, 0, "QUI reports uv_base_stor_len");
    put64(&mut b, 0x20, len - 8);
    assert_eq!((uv_call(&uv, &mut b), rc(&b)), (1, 0x0103));
}

/// uv-host.c test_init: "storage below 2GB" (origin 1 GiB) -> cc 1, 0x0108.
#[test]
fn host_test_init_storage_below_2gb() {
    let (uv, mut b) = before_init();
    put64(&mut b, 0x18, 1 << 30);
    assert_eq!((uv_call(&uv, &mut b), rc(&b)), (1, 0x0108));
}

/// uv-host.c test_init: "successful" -> cc 0, 0x0001 (and the UV now holds the donation).
#[test]
fn host_test_init_successful() {
    let (uv, mut b) = before_init();
    assert_eq!((uv_call(&uv, &mut b), rc(&b)), (0, RC_EXECUTED));
    assert_eq!(uv.donated_bytes(), get64(&b, 0x20));
}

/// uv-host.c test_init: "double init" (a second, new 1 MiB aligned donation) -> cc 1, 0x0101.
#[test]
fn host_test_init_double_init() {
    let (uv, mut b) = before_init();
    assert_eq!(uv_call(&uv, &mut b), 0);
    let mut again = b.clone();
    put64(
        &mut again,
        0x18,
        get64(&b, 0x18) + get64(&b, 0x20).next_multiple_of(MIB),
    );
    assert_eq!((uv_call(&uv, &mut again), rc(&again)), (1, 0x0101));
}

// =============================================================== uv-host.c test_config_create

/// uv-host.c test_config_create: "hdr invalid length" (0x78) -> cc 1, 0x0005, no handle.
#[test]
fn host_test_config_create_hdr_invalid_length() {
    let (cc, b) = cgc_variant(|b| set_len(b, 0x78));
    assert_eq!((cc, rc(&b), get64(&b, 0x18)), (1, RC_INV_LEN, 0));
}

/// uv-host.c test_config_create: "MSO > max guest addr" -> 0x0101.
#[test]
fn host_test_config_create_mso_above_max_guest_addr() {
    let h = initialised_host();
    let max = get64(&h.qui, QUI_MAX_GUEST_STOR_ADDR);
    drop(h);
    let (cc, b) = cgc_variant(|b| put64(b, 0x38, max + 2 * MIB + 1));
    assert!(cc == 1 && cgc_check_data(&b, 0x0101), "rc {:#x}", rc(&b));
}

/// uv-host.c test_config_create: "MSO + MSL > max guest addr" -> 0x0102.
#[test]
fn host_test_config_create_mso_msl_above_max_guest_addr() {
    let h = initialised_host();
    let max = get64(&h.qui, QUI_MAX_GUEST_STOR_ADDR);
    drop(h);
    let (cc, b) = cgc_variant(|b| put64(b, 0x38, max - MIB));
    assert!(cc == 1 && cgc_check_data(&b, 0x0102), "rc {:#x}", rc(&b));
}

/// uv-host.c test_config_create: "ASCE private bit missing" -> 0x0105.
#[test]
fn host_test_config_create_asce_private_bit_missing() {
    let (cc, b) = cgc_variant(|b| {
        let asce = get64(b, 0x50);
        put64(b, 0x50, asce & !ASCE_P);
    });
    assert!(cc == 1 && cgc_check_data(&b, 0x0105), "rc {:#x}", rc(&b));
}

/// uv-host.c test_config_create: "ASCE bit 58 set" (0x20) -> 0x0105.
#[test]
fn host_test_config_create_asce_bit_58_set() {
    let (cc, b) = cgc_variant(|b| {
        let asce = get64(b, 0x50);
        put64(b, 0x50, asce | 0x20);
    });
    assert!(cc == 1 && cgc_check_data(&b, 0x0105), "rc {:#x}", rc(&b));
}

/// uv-host.c test_config_create: "base storage origin contains lowcore" (0x1000) -> 0x0109.
#[test]
fn host_test_config_create_base_storage_origin_contains_lowcore() {
    let (cc, b) = cgc_variant(|b| put64(b, 0x20, 0x1000));
    assert!(cc == 1 && cgc_check_data(&b, 0x0109), "rc {:#x}", rc(&b));
}

/// uv-host.c test_config_create: "sca == 0" -> 0x010c.
#[test]
fn host_test_config_create_sca_zero() {
    let (cc, b) = cgc_variant(|b| put64(b, 0x48, 0));
    assert!(cc == 1 && cgc_check_data(&b, 0x010c), "rc {:#x}", rc(&b));
}

/// uv-host.c test_config_create: "successful" -> cc 0, 0x0001.
#[test]
fn host_test_config_create_successful() {
    let h = initialised_host();
    let mut b = cgc_block(&h);
    assert_eq!((uv_call(&h.uv, &mut b), rc(&b)), (0, RC_EXECUTED));
    assert_ne!(get64(&b, 0x18), 0);
}

/// uv-host.c test_config_create: "reuse uvcb" (same block again, handle zeroed) -> cc 1,
/// rc >= 0x0100.
#[test]
fn host_test_config_create_reuse_uvcb() {
    let c = with_config();
    let mut b = c.cgc.clone();
    put16(&mut b, 4, 0);
    put16(&mut b, 6, 0);
    put64(&mut b, 0x18, 0);
    let cc = uv_call(&c.h.uv, &mut b);
    assert!(cc == 1 && rc(&b) >= 0x0100, "cc {cc} rc {:#x}", rc(&b));
    cgc_destroy_if_needed(&c.h.uv, &mut b);
}

/// uv-host.c test_config_create: "reuse ASCE" (new donations, same ASCE) -> cc 1, rc >= 0x0104,
/// no handle.
#[test]
fn host_test_config_create_reuse_asce() {
    let c = with_config();
    let mut b = c.cgc.clone();
    put16(&mut b, 4, 0);
    put16(&mut b, 6, 0);
    put64(&mut b, 0x18, 0);
    put64(&mut b, 0x20, AREA + 512 * MIB);
    put64(&mut b, 0x28, AREA + 600 * MIB);
    let cc = uv_call(&c.h.uv, &mut b);
    assert!(
        cc == 1 && rc(&b) >= 0x0104 && get64(&b, 0x18) == 0,
        "cc {cc} rc {:#x}",
        rc(&b)
    );
    cgc_destroy_if_needed(&c.h.uv, &mut b);
}

// ================================================================== uv-host.c test_cpu_create

/// uv-host.c test_cpu_create: "hdr invalid length" (0x58) -> cc 1, 0x0005, no cpu handle.
#[test]
fn host_test_cpu_create_hdr_invalid_length() {
    let c = with_config();
    let mut b = csc_block(&c);
    set_len(&mut b, 0x58);
    let cc = uv_call(&c.h.uv, &mut b);
    assert_eq!((cc, rc(&b), get64(&b, 0x18)), (1, RC_INV_LEN, 0));
}

/// uv-host.c test_cpu_create: "invalid guest handle" (handle + 1) -> cc 1, 0x0020.
#[test]
fn host_test_cpu_create_invalid_guest_handle() {
    let c = with_config();
    let mut b = csc_block(&c);
    put64(&mut b, 0x20, c.handle + 1);
    assert_eq!((uv_call(&c.h.uv, &mut b), rc(&b)), (1, RC_INV_GHANDLE));
}

/// uv-host.c test_cpu_create: "invalid cpu #" (max_guest_cpus + 1) -> cc 1, 0x0103.
#[test]
fn host_test_cpu_create_invalid_cpu_number() {
    let c = with_config();
    let mut b = csc_block(&c);
    put16(&mut b, 0x36, get16(&c.h.qui, QUI_MAX_GUEST_CPUS) + 1);
    assert_eq!((uv_call(&c.h.uv, &mut b), rc(&b)), (1, 0x0103));
}

/// uv-host.c test_cpu_create: "cpu stor in lowcore" (stor_origin 0) -> cc 1, 0x0106.
#[test]
fn host_test_cpu_create_cpu_stor_in_lowcore() {
    let c = with_config();
    let mut b = csc_block(&c);
    put64(&mut b, 0x28, 0);
    assert_eq!((uv_call(&c.h.uv, &mut b), rc(&b)), (1, 0x0106));
}

/// uv-host.c test_cpu_create: "success" -> cc 0, 0x0001, a cpu handle.
#[test]
fn host_test_cpu_create_success() {
    let c = with_config();
    let mut b = csc_block(&c);
    let cc = uv_call(&c.h.uv, &mut b);
    assert_eq!((cc, rc(&b)), (0, RC_EXECUTED));
    assert_ne!(get64(&b, 0x18), 0);
}

/// uv-host.c test_cpu_create: "already defined" (cpu 0 again, new storage) -> cc 1, 0x0104.
#[test]
fn host_test_cpu_create_already_defined() {
    let c = with_config();
    let mut b = csc_block(&c);
    assert_eq!(uv_call(&c.h.uv, &mut b), 0);
    let mut again = csc_block(&c);
    put64(&mut again, 0x28, AREA + 300 * MIB);
    assert_eq!((uv_call(&c.h.uv, &mut again), rc(&again)), (1, 0x0104));
}

// =============================================================== uv-host.c test_set_se_header

/// `test_set_se_header`'s block: the config (with one CPU), header origin 0, length 0x1000.
fn ssc_block(w: &WithCpu) -> Vec<u8> {
    let mut b = block(0x0300, 0x50, 0x50);
    put64(&mut b, 0x18, w.c.handle);
    put64(&mut b, 0x20, 0);
    b[0x28..0x2c].copy_from_slice(&0x1000u32.to_be_bytes());
    b
}

/// The first address after the guest storage: its page is not mapped (as the page the test
/// makes invalid with PAGE_ENTRY_I).
fn invalid_page(w: &WithCpu) -> u64 {
    let r = &w.c.h.uv.regions()[0];
    r.base() + r.size()
}

/// uv-host.c test_set_se_header: "hdr invalid length" (0x48) -> cc 1, 0x0005.
#[test]
fn host_test_set_se_header_hdr_invalid_length() {
    let w = with_cpu();
    let mut b = ssc_block(&w);
    set_len(&mut b, 0x48);
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-host.c test_set_se_header: "invalid handle" (handle + 1, header origin 0) -> cc 1, 0x0020.
#[test]
fn host_test_set_se_header_invalid_handle() {
    let w = with_cpu();
    let mut b = ssc_block(&w);
    put64(&mut b, 0x18, w.c.handle + 1);
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (1, RC_INV_GHANDLE));
}

/// uv-host.c test_set_se_header: "se hdr access exception" (header on an invalid page) ->
/// cc 1, 0x0103.
#[test]
fn host_test_set_se_header_se_hdr_access_exception() {
    let w = with_cpu();
    let mut b = ssc_block(&w);
    put64(&mut b, 0x20, invalid_page(&w));
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (1, 0x0103));
}

/// uv-host.c test_set_se_header: "se hdr access exception crossing" (the first 0x20 bytes
/// readable, the rest on the invalid page) -> cc 1, 0x0103.
#[test]
fn host_test_set_se_header_se_hdr_access_exception_crossing() {
    let w = with_cpu();
    let mut b = ssc_block(&w);
    put64(&mut b, 0x20, invalid_page(&w) - 0x20);
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (1, 0x0103));
}

// ================================================================= uv-host.c test_cpu_destroy

/// uv-host.c test_cpu_destroy: "hdr invalid length" (0x38) -> cc 1, 0x0005.
#[test]
fn host_test_cpu_destroy_hdr_invalid_length() {
    let w = with_cpu();
    let mut b = nodata(0x0121, w.cpu);
    set_len(&mut b, 0x38);
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-host.c test_cpu_destroy: "invalid handle" (cpu handle + 1; skipped on z15) -> cc 1,
/// 0x0021.
#[test]
fn host_test_cpu_destroy_invalid_handle() {
    let w = with_cpu();
    let mut b = nodata(0x0121, w.cpu + 1);
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (1, RC_INV_CHANDLE));
}

/// uv-host.c test_cpu_destroy: "success" -> cc 0, 0x0001.
#[test]
fn host_test_cpu_destroy_success() {
    let w = with_cpu();
    let mut b = nodata(0x0121, w.cpu);
    assert_eq!((uv_call(&w.c.h.uv, &mut b), rc(&b)), (0, RC_EXECUTED));
}

// ============================================================== uv-host.c test_config_destroy

/// The state test_config_destroy starts from: the test_cpu_create CPU already destroyed.
fn cpu_destroyed() -> WithConfig {
    let w = with_cpu();
    let mut b = nodata(0x0121, w.cpu);
    assert_eq!(uv_call(&w.c.h.uv, &mut b), 0);
    w.c
}

/// uv-host.c test_config_destroy: "hdr invalid length" (0x38) -> cc 1, 0x0005.
#[test]
fn host_test_config_destroy_hdr_invalid_length() {
    let c = cpu_destroyed();
    let mut b = nodata(0x0101, c.handle);
    set_len(&mut b, 0x38);
    assert_eq!((uv_call(&c.h.uv, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-host.c test_config_destroy: "invalid handle" (handle + 1) -> cc 1, 0x0020.
#[test]
fn host_test_config_destroy_invalid_handle() {
    let c = cpu_destroyed();
    let mut b = nodata(0x0101, c.handle + 1);
    assert_eq!((uv_call(&c.h.uv, &mut b), rc(&b)), (1, RC_INV_GHANDLE));
}

/// uv-host.c test_config_destroy: "success" -> cc 0, 0x0001.
#[test]
fn host_test_config_destroy_success() {
    let c = cpu_destroyed();
    let mut b = nodata(0x0101, c.handle);
    assert_eq!((uv_call(&c.h.uv, &mut b), rc(&b)), (0, RC_EXECUTED));
}

// ==================================================================== uv-guest.c (a guest)

/// A protected guest: a host UV with a 4 MiB configuration whose guest issues the calls.
/// `page` is the guest page the test allocates (alloc_page): secure, as all guest memory.
struct Guest {
    uv: Ultravisor,
    who: Issuer,
    page: u64,
    ram: u64,
}

fn guest() -> Guest {
    let uv = Ultravisor::new(UvOptions {
        threads: 1,
        ..Default::default()
    })
    .expect("ultravisor");
    let ram = 4 * MIB;
    let region = uv.create_region(ram).expect("region");
    region.touch(0, ram).expect("touch");
    let info = uv.info();
    let (st, handle) = uv
        .create_config(
            &region,
            ram,
            AREA | ASCE_P,
            AREA + 4 * PAGE,
            info.guest_base_stor_len,
            info.var_stor_len(ram),
        )
        .expect("create_config");
    assert!(st.is_ok());
    let page = 16 * PAGE;
    assert!(uv.convert_to_secure(handle, page).is_ok());
    Guest {
        uv,
        who: Issuer::Guest(handle),
        page,
        ram,
    }
}

/// uv-guest.c test_invalid for one entry: cc 1, rc 0x0002, bit not indicated to the guest.
fn guest_invalid(cmd: u16, len: u16, bit: Option<u32>) {
    let g = guest();
    let qui = uv_setup(&g.uv, g.who);
    let mut hdr = block(cmd, len, usize::from(len.max(8)));
    let cc = uv_call_as(&g.uv, g.who, &mut hdr);
    assert_eq!((cc, rc(&hdr)), (1, RC_INV_CMD), "cmd {cmd:#06x}");
    if let Some(bit) = bit {
        assert!(!qui_bit(&qui, bit), "bit {bit} indicated to a guest");
    }
}

/// uv-guest.c test_invalid: "bogus" (0x4242).
#[test]
fn guest_test_invalid_bogus() {
    guest_invalid(0x4242, 8, None);
}

fn guest_invalid_cmd(i: usize) {
    let c = &CMDS[i];
    guest_invalid(c.cmd, c.len, Some(c.bit));
}

per_cmd! { guest_invalid_cmd, "uv-guest.c test_invalid: one host command of invalid_cmds[].":
    guest_test_invalid_init = 0;
    guest_test_invalid_create_conf = 1;
    guest_test_invalid_destroy_conf = 2;
    guest_test_invalid_create_cpu = 3;
    guest_test_invalid_destroy_cpu = 4;
    guest_test_invalid_conv_to = 5;
    guest_test_invalid_conv_from = 6;
    guest_test_invalid_set_sec_conf = 7;
    guest_test_invalid_unpack = 8;
    guest_test_invalid_verify = 9;
    guest_test_invalid_cpu_reset = 10;
    guest_test_invalid_cpu_initial_reset = 11;
    guest_test_invalid_conf_clear_reset = 12;
    guest_test_invalid_cpu_clear_reset = 13;
    guest_test_invalid_cpu_set_state = 14;
    guest_test_invalid_pin_shared = 15;
    guest_test_invalid_unpin_shared = 16;
}

/// uv-guest.c test_query: "length" (0xa0) -> cc 1, 0x0005.
#[test]
fn guest_test_query_length() {
    let g = guest();
    let mut b = block(0x0001, 0xa0, 0x100);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-guest.c test_query: "successful query" (0x100) -> cc 0, 0x0001.
#[test]
fn guest_test_query_successful_query() {
    let g = guest();
    let mut b = block(0x0001, 0x100, 0x100);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (0, RC_EXECUTED));
}

fn guest_query_bit(bit: u32) {
    let g = guest();
    let mut b = block(0x0001, 0x100, 0x100);
    assert_eq!(uv_call_as(&g.uv, g.who, &mut b), 0);
    assert!(qui_bit(&b, bit), "bit {bit} not indicated to the guest");
}

/// uv-guest.c test_query: "query indicated" (bit 0).
#[test]
fn guest_test_query_query_indicated() {
    guest_query_bit(0);
}

/// uv-guest.c test_query: "share indicated" (bit 8).
#[test]
fn guest_test_query_share_indicated() {
    guest_query_bit(8);
}

/// uv-guest.c test_query: "unshare indicated" (bit 9).
#[test]
fn guest_test_query_unshare_indicated() {
    guest_query_bit(9);
}

/// `struct uv_cb_share` of test_sharing: paddr (the guest's address) at 0x20.
fn share_block(cmd: u16, paddr: u64) -> Vec<u8> {
    let mut b = block(cmd, 0x30, 0x30);
    put64(&mut b, 0x20, paddr);
    b
}

/// uv-guest.c test_sharing, share: "length" (0x28) -> cc 1, 0x0005.
#[test]
fn guest_test_sharing_share_length() {
    let g = guest();
    let mut b = share_block(0x1000, g.page);
    set_len(&mut b, 0x28);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-guest.c test_sharing, share: "share" -> cc 0, 0x0001.
#[test]
fn guest_test_sharing_share() {
    let g = guest();
    let mut b = share_block(0x1000, g.page);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (0, RC_EXECUTED));
    let r = &g.uv.regions()[0];
    assert_eq!(
        r.page_state(g.page / PAGE).expect("page").0.name(),
        "shared"
    );
}

/// uv-guest.c test_sharing, share: "invalid memory" (RAM size + 4 KiB) -> cc 1, 0x0101.
#[test]
fn guest_test_sharing_invalid_memory() {
    let g = guest();
    let mut b = share_block(0x1000, g.ram + PAGE);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (1, 0x0101));
}

/// uv-guest.c test_sharing, unshare: "length" (0x28) -> cc 1, 0x0005.
#[test]
fn guest_test_sharing_unshare_length() {
    let g = guest();
    let mut share = share_block(0x1000, g.page);
    assert_eq!(uv_call_as(&g.uv, g.who, &mut share), 0);
    let mut b = share_block(0x1001, g.page);
    set_len(&mut b, 0x28);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (1, RC_INV_LEN));
}

/// uv-guest.c test_sharing, unshare: "unshare" -> cc 0, 0x0001.
#[test]
fn guest_test_sharing_unshare() {
    let g = guest();
    let mut share = share_block(0x1000, g.page);
    assert_eq!(uv_call_as(&g.uv, g.who, &mut share), 0);
    let mut b = share_block(0x1001, g.page);
    assert_eq!((uv_call_as(&g.uv, g.who, &mut b), rc(&b)), (0, RC_EXECUTED));
    let r = &g.uv.regions()[0];
    assert_eq!(
        r.page_state(g.page / PAGE).expect("page").0.name(),
        "secure"
    );
}
