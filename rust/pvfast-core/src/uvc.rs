//! The UVC catalogue (command codes, kernel names, installed-call bits), the condition/return
//! codes, and the two per-UVC side tables: execution counters and injected failures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Condition code of the UVC instruction: 0 done, 1 error (see the rc), 2 busy and 3 partial (the
/// kernel's call helpers issue the call again for 2 and 3; arch/s390/include/asm/uv.h, v6.2).
pub const CC_OK: u8 = 0;
pub const CC_ERROR: u8 = 1;

/// Return codes. rc values above 0x00ff are per UVC: the same number means different things for
/// different UVCs. Each constant says where its value comes from (docs/UV.md has the full table
/// with sources): "kvm-unit-tests" = asserted by s390x/uv-host.c or uv-guest.c, which run on real
/// machines; "Linux" = named in arch/s390/include/asm/uv.h or relied on by the kernel;
/// "emulator-chosen" = no public source gives a code for the condition, so pvfast picked one
/// that kvm-unit-tests does not assign for that UVC.
pub mod rc {
    // ---- architected, every UVC (kvm-unit-tests lib/s390x/asm/uv.h, Linux asm/uv.h) ----
    pub const EXECUTED: u16 = 0x0001;
    pub const INV_CMD: u16 = 0x0002;
    pub const INV_STATE: u16 = 0x0003;
    pub const INV_LEN: u16 = 0x0005;
    pub const NO_RESUME: u16 = 0x0007;
    pub const INV_GUEST_HANDLE: u16 = 0x0020;
    pub const INV_CPU_HANDLE: u16 = 0x0021;
    pub const NEED_DESTROY: u16 = 0x8000;

    // ---- QUI ----
    /// The block is long enough (>= 0xa8) but shorter than the UV's query data: the fields that
    /// fit are stored (Linux UVC_RC_MORE_DATA; kvm-unit-tests test_query "insf length").
    pub const MORE_DATA: u16 = 0x0100;

    // ---- INIT_UV (kvm-unit-tests test_init) ----
    /// The UV is already initialised ("double init").
    pub const INIT_DOUBLE: u16 = 0x0101;
    /// stor_len is not the QUI uv_base_stor_len ("storage invalid length").
    pub const INIT_STOR_LEN: u16 = 0x0103;
    /// stor_origin invalid ("storage origin invalid"; here: not 1 MiB aligned).
    pub const INIT_STOR_ORIGIN: u16 = 0x0104;
    /// stor_origin + stor_len invalid ("storage + length invalid"; here: wraps around).
    pub const INIT_STOR_RANGE: u16 = 0x0105;
    /// stor_origin below 2 GiB ("storage below 2GB").
    pub const INIT_STOR_BELOW_2G: u16 = 0x0108;

    // ---- CREATE_SEC_CONF (kvm-unit-tests test_config_create unless marked) ----
    /// guest_stor_origin (MSO) above max_guest_stor_addr.
    pub const GUEST_ORIGIN_TOO_HIGH: u16 = 0x0101;
    /// guest_stor_origin + guest_stor_len above max_guest_stor_addr.
    pub const GUEST_END_TOO_HIGH: u16 = 0x0102;
    /// Emulator-chosen: guest_len 0, not 1 MiB aligned, larger than the region, or region
    /// released; raw: guest_stor_origin names no region.
    pub const INV_GUEST_STOR: u16 = 0x0103;
    /// Emulator-chosen: the ASCE origin is used by a live configuration (kvm-unit-tests "reuse
    /// ASCE" asserts only rc >= 0x0104; 0x0104 is otherwise unassigned there).
    pub const ASCE_IN_USE: u16 = 0x0104;
    /// guest_asce: private-space control (0x100) missing, or real-space control (0x20, bit 58)
    /// or a bit Linux never sets (0xe10) present.
    pub const INV_ASCE: u16 = 0x0105;
    /// Emulator-chosen (typed call only): base storage shorter than guest_base_stor_len.
    pub const BASE_STOR_TOO_SHORT: u16 = 0x0106;
    /// conf_base_stor_origin overlaps the absolute lowcore (0..0x2000).
    pub const BASE_STOR_LOWCORE: u16 = 0x0109;
    /// Emulator-chosen (typed call only): variable storage shorter than the QUI formula.
    pub const VAR_STOR_TOO_SHORT: u16 = 0x010a;
    /// guest_sca is 0.
    pub const SCA_ZERO: u16 = 0x010c;
    /// conf_virt_stor_origin overlaps the absolute lowcore (kvm-unit-tests, older uv-host.c:
    /// "variable storage area contains lowcore").
    pub const VAR_STOR_LOWCORE: u16 = 0x010e;
    /// Emulator-chosen: max_num_sec_conf live configurations, or every configuration id is in
    /// use (beyond every code kvm-unit-tests names for Create Config, 0x0101..0x010e).
    pub const TOO_MANY_CONFIGS: u16 = 0x010f;

    // ---- DESTROY_SEC_CONF, DESTROY_SEC_CONF_FAST ----
    /// Emulator-chosen: the configuration still has secure CPUs (kvm-unit-tests assigns no
    /// code of these UVCs above 0x0020).
    pub const CONFIG_HAS_CPUS: u16 = 0x0102;
    /// Destroy-Fast refused because AP queues are bound (Linux; produced only by injection).
    pub const APQN_BOUND: u16 = 0x0104;

    // ---- CREATE_SEC_CPU (kvm-unit-tests test_cpu_create) ----
    /// cpu number above max_guest_cpu_id ("invalid cpu #").
    pub const INV_CPU_NUM: u16 = 0x0103;
    /// cpu number already defined in this configuration ("already defined").
    pub const CPU_NUM_IN_USE: u16 = 0x0104;
    /// stor_origin overlaps the absolute lowcore ("cpu stor in lowcore").
    pub const CPU_STOR_LOWCORE: u16 = 0x0106;
    /// Emulator-chosen (typed call only): donated CPU storage shorter than guest_cpu_stor_len.
    pub const CPU_STOR_TOO_SHORT: u16 = 0x010c;

    // ---- CPU_SET_STATE ----
    /// Emulator-chosen: the state byte is not 1, 2, 3 or 5 (no public source gives a code).
    pub const INV_CPU_STATE: u16 = 0x0101;

    // ---- SET_SEC_CONF_PARAMS (kvm-unit-tests test_set_se_header) ----
    /// The SE header is (partly) not readable ("se hdr access exception").
    pub const HDR_ACCESS: u16 = 0x0103;

    // ---- SET_SHARED_ACCESS / REMOVE_SHARED_ACCESS (kvm-unit-tests uv-guest.c test_sharing) ----
    /// The address is beyond the guest's storage ("invalid memory").
    pub const SHARE_INV_ADDR: u16 = 0x0101;

    // ---- page UVCs ----
    /// Older firmware's answer to destroy-page on a non-secure page (with rrc 0x000d; Linux).
    pub const LEGACY_NOT_SECURE: u16 = 0x0107;
    pub const LEGACY_NOT_SECURE_RRC: u16 = 0x000d;
    /// Import/unpack: page not mapped (the kernel faults it in and retries; Linux).
    pub const PAGE_NOT_ACCESSIBLE: u16 = 0x010a;
    /// Emulator-chosen: address outside the guest storage / outside any region, or not page
    /// aligned.
    pub const INV_ADDR: u16 = 0x0110;
    /// Emulator-chosen: destroy page while the owning configuration still has secure CPUs.
    pub const OWNER_HAS_CPUS: u16 = 0x0111;
    /// Emulator-chosen: import / unpack / share / unpin of a page owned by another (or a dead)
    /// configuration.
    pub const OTHER_OWNER: u16 = 0x0112;
    /// Emulator-chosen: import of an exported page failed its integrity check (AES-GCM tag).
    pub const INTEGRITY: u16 = 0x0113;

    // ---- configuration-level state ----
    /// Unpack / verify / set-sec-parms / dump: configuration not in the right state
    /// (no header, header already set, already verified, not dumping, dumping twice).
    pub const CONFIG_STATE: u16 = INV_STATE;
    /// Emulator-chosen: cpu-level dump UVC on a CPU whose configuration is not dumping.
    pub const NOT_DUMPING: u16 = 0x010d;
    /// Emulator-chosen: dump storage state gaddr not 1 MiB aligned or beyond the guest storage.
    pub const INV_DUMP_ADDR: u16 = 0x010e;
}

/// CPU_SET_STATE state values (the byte at 0x27 of `struct uv_cb_cpu_set_state`, Linux asm/uv.h).
pub mod cpu_state {
    pub const OPERATING: u8 = 1;
    pub const STOPPED: u8 = 2;
    pub const CHECK_STOP: u8 = 3;
    pub const OPERATING_LOAD: u8 = 5;

    /// The states the UV accepts.
    pub const fn is_valid(state: u8) -> bool {
        matches!(state, OPERATING | STOPPED | CHECK_STOP | OPERATING_LOAD)
    }
}

/// Result of one UVC: condition code and the two return codes copied back to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UvcStatus {
    pub cc: u8,
    pub rc: u16,
    pub rrc: u16,
}

impl UvcStatus {
    pub const OK: UvcStatus = UvcStatus {
        cc: CC_OK,
        rc: rc::EXECUTED,
        rrc: 0,
    };

    pub const fn err(rc: u16) -> Self {
        UvcStatus {
            cc: CC_ERROR,
            rc,
            rrc: 0,
        }
    }

    pub const fn err_rrc(rc: u16, rrc: u16) -> Self {
        UvcStatus {
            cc: CC_ERROR,
            rc,
            rrc,
        }
    }

    pub const fn is_ok(&self) -> bool {
        self.cc == CC_OK
    }

    pub const fn as_tuple(&self) -> (u8, u16, u16) {
        (self.cc, self.rc, self.rrc)
    }
}

macro_rules! uvcs {
    ($( $variant:ident = $code:literal, $name:literal, $bit:expr; )*) => {
        /// Every UVC the emulator knows, with its command code (the `UVC_CMD_*` values of
        /// arch/s390/include/asm/uv.h, v6.2).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Uvc { $( $variant = $code, )* }

        impl Uvc {
            pub const ALL: &'static [Uvc] = &[ $( Uvc::$variant, )* ];

            /// Kernel name without the `UVC_CMD_` prefix (the key of `stats()`).
            pub const fn name(self) -> &'static str {
                match self { $( Uvc::$variant => $name, )* }
            }

            /// Installed-calls bit (MSB-0) of the QUI list, if the architecture defines one.
            pub const fn bit(self) -> Option<u32> {
                match self { $( Uvc::$variant => $bit, )* }
            }

            pub fn from_code(code: u16) -> Option<Uvc> {
                match code { $( $code => Some(Uvc::$variant), )* _ => None }
            }

            /// A call only a protected guest issues (SET/REMOVE_SHARED_ACCESS): a host UV does
            /// not indicate it and answers 0x0002 (kvm-unit-tests uv-host.c test_invalid).
            pub const fn is_guest_call(self) -> bool {
                matches!(self, Uvc::SetSharedAccess | Uvc::RemoveSharedAccess)
            }

            /// Dense index 0..ALL.len() for the counter tables.
            pub const fn index(self) -> usize {
                let mut i = 0;
                while i < Self::ALL.len() {
                    if Self::ALL[i] as u16 == self as u16 {
                        return i;
                    }
                    i += 1;
                }
                0
            }
        }
    };
}

uvcs! {
    Qui = 0x0001, "QUI", Some(0);
    InitUv = 0x000f, "INIT_UV", Some(1);
    CreateSecConf = 0x0100, "CREATE_SEC_CONF", Some(2);
    DestroySecConf = 0x0101, "DESTROY_SEC_CONF", Some(3);
    DestroySecConfFast = 0x0102, "DESTROY_SEC_CONF_FAST", Some(23);
    CreateSecCpu = 0x0120, "CREATE_SEC_CPU", Some(4);
    DestroySecCpu = 0x0121, "DESTROY_SEC_CPU", Some(5);
    ConvToSecStor = 0x0200, "CONV_TO_SEC_STOR", Some(6);
    ConvFromSecStor = 0x0201, "CONV_FROM_SEC_STOR", Some(7);
    DestrSecStor = 0x0202, "DESTR_SEC_STOR", None;
    SetSecConfParams = 0x0300, "SET_SEC_CONF_PARAMS", Some(11);
    UnpackImg = 0x0301, "UNPACK_IMG", Some(13);
    VerifyImg = 0x0302, "VERIFY_IMG", Some(14);
    CpuReset = 0x0310, "CPU_RESET", Some(15);
    CpuResetInitial = 0x0311, "CPU_RESET_INITIAL", Some(16);
    PrepareReset = 0x0320, "PREPARE_RESET", Some(18);
    CpuResetClear = 0x0321, "CPU_RESET_CLEAR", Some(19);
    CpuSetState = 0x0330, "CPU_SET_STATE", Some(17);
    SetUnshareAll = 0x0340, "SET_UNSHARE_ALL", Some(20);
    PinPageShared = 0x0341, "PIN_PAGE_SHARED", Some(21);
    UnpinPageShared = 0x0342, "UNPIN_PAGE_SHARED", Some(22);
    DumpInit = 0x0400, "DUMP_INIT", Some(24);
    DumpConfStorState = 0x0401, "DUMP_CONF_STOR_STATE", Some(25);
    DumpCpu = 0x0402, "DUMP_CPU", Some(26);
    DumpComplete = 0x0403, "DUMP_COMPLETE", Some(27);
    SetSharedAccess = 0x1000, "SET_SHARED_ACCESS", Some(8);
    RemoveSharedAccess = 0x1001, "REMOVE_SHARED_ACCESS", Some(9);
}

pub const NUM_UVCS: usize = Uvc::ALL.len();

/// Per-UVC execution counters.
pub(crate) struct Stats {
    counters: [AtomicU64; NUM_UVCS],
}

impl Stats {
    pub(crate) fn new() -> Self {
        Stats {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    #[inline]
    pub(crate) fn add(&self, uvc: Uvc, n: u64) {
        if n != 0 {
            self.counters[uvc.index()].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self, uvc: Uvc) -> u64 {
        self.counters[uvc.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn reset(&self) {
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Injected failures: one packed word per UVC, `count << 32 | rc << 16 | rrc`.
/// `any` is a cheap flag the hot walk reads once per batch.
pub(crate) struct Injections {
    slots: [AtomicU64; NUM_UVCS],
    any: AtomicBool,
}

impl Injections {
    pub(crate) fn new() -> Self {
        Injections {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            any: AtomicBool::new(false),
        }
    }

    pub(crate) fn set(&self, uvc: Uvc, rc: u16, rrc: u16, count: u32) {
        let word = (u64::from(count) << 32) | (u64::from(rc) << 16) | u64::from(rrc);
        self.slots[uvc.index()].store(word, Ordering::SeqCst);
        self.any.store(true, Ordering::SeqCst);
    }

    pub(crate) fn clear(&self) {
        for s in &self.slots {
            s.store(0, Ordering::SeqCst);
        }
        self.any.store(false, Ordering::SeqCst);
    }

    /// True when some injection may still be pending (exact for one UVC: `pending(uvc)`).
    #[inline]
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn pending(&self, uvc: Uvc) -> bool {
        self.any() && (self.slots[uvc.index()].load(Ordering::Acquire) >> 32) != 0
    }

    /// Consume one injected failure of `uvc`, if any.
    #[inline]
    pub(crate) fn take(&self, uvc: Uvc) -> Option<UvcStatus> {
        if !self.any() {
            return None;
        }
        let slot = &self.slots[uvc.index()];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur >> 32 == 0 {
                return None;
            }
            match slot.compare_exchange_weak(
                cur,
                cur - (1 << 32),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // Truncation intended: rc and rrc are the two low 16-bit fields.
                    let rc = (cur >> 16) as u16;
                    let rrc = cur as u16;
                    return Some(UvcStatus::err_rrc(rc, rrc));
                }
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_consistent() {
        assert_eq!(NUM_UVCS, 27);
        for (i, u) in Uvc::ALL.iter().enumerate() {
            assert_eq!(u.index(), i);
            assert_eq!(Uvc::from_code(*u as u16), Some(*u));
        }
        assert_eq!(Uvc::DestroySecConfFast.bit(), Some(23));
    }

    #[test]
    fn injections_count_down() {
        let inj = Injections::new();
        inj.set(Uvc::DestrSecStor, 0x1234, 0x56, 2);
        assert!(inj.pending(Uvc::DestrSecStor));
        assert_eq!(
            inj.take(Uvc::DestrSecStor),
            Some(UvcStatus::err_rrc(0x1234, 0x56))
        );
        assert_eq!(
            inj.take(Uvc::DestrSecStor),
            Some(UvcStatus::err_rrc(0x1234, 0x56))
        );
        assert_eq!(inj.take(Uvc::DestrSecStor), None);
        assert_eq!(inj.take(Uvc::Qui), None);
    }
}
