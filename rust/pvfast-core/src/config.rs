//! Secure configurations and CPUs as the UV keeps them: handles, donations, ASCE use, the
//! per-configuration export key, and the table that maps handles and owner ids to them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;

use crate::image::{SecHeader, Verifier};
use crate::PAGE_SIZE;

pub(crate) const CFG_ALIVE: u8 = 0;
pub(crate) const CFG_DESTROYED: u8 = 1;
pub(crate) const CFG_FAST_DESTROYED: u8 = 2;

/// Nonce and tag of an exported page, kept beside the ciphertext (the UV's side table).
#[derive(Clone, Copy)]
pub(crate) struct ExportTag {
    pub(crate) owner: u32,
    nonce: [u8; 12],
    tag: [u8; 16],
}

/// Image state of a configuration (SET_SEC_CONF_PARAMS / UNPACK / VERIFY).
#[derive(Default)]
pub(crate) struct ImageState {
    pub(crate) header: Option<Box<SecHeader>>,
    pub(crate) verifier: Option<Verifier>,
    pub(crate) verified: bool,
}

pub(crate) struct Config {
    pub(crate) id: u32,
    pub(crate) handle: u64,
    /// Base (host address) of the region holding the guest storage: the key of the
    /// Ultravisor's region registry. Bases are never reused.
    pub(crate) region_base: u64,
    pub(crate) guest_len: u64,
    pub(crate) asce_origin: u64,
    pub(crate) donated: u64,
    state: AtomicU8,
    /// Live secure CPUs. Changed only under the tables write lock.
    pub(crate) cpus: AtomicU32,
    /// SECURE + SHARED pages owned (orphaned ones included after Destroy-Fast).
    pub(crate) secure_pages: AtomicI64,
    pub(crate) dumping: AtomicBool,
    pub(crate) image: Mutex<ImageState>,
    cipher: Aes256Gcm,
    nonce_ctr: AtomicU64,
}

impl Config {
    pub(crate) fn new(
        id: u32,
        handle: u64,
        region_base: u64,
        guest_len: u64,
        asce_origin: u64,
        donated: u64,
    ) -> Config {
        let key = random_key(handle);
        Config {
            id,
            handle,
            region_base,
            guest_len,
            asce_origin,
            donated,
            state: AtomicU8::new(CFG_ALIVE),
            cpus: AtomicU32::new(0),
            secure_pages: AtomicI64::new(0),
            dumping: AtomicBool::new(false),
            image: Mutex::new(ImageState::default()),
            cipher: Aes256Gcm::new(&key.into()),
            nonce_ctr: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn is_alive(&self) -> bool {
        self.state.load(Ordering::SeqCst) == CFG_ALIVE
    }

    pub(crate) fn set_state(&self, s: u8) {
        self.state.store(s, Ordering::SeqCst);
    }

    /// Destroy-page must be refused: the owner is alive and still has secure CPUs.
    #[inline]
    pub(crate) fn refuses_destroy(&self) -> bool {
        self.cpus.load(Ordering::SeqCst) != 0 && self.is_alive()
    }

    fn aad(&self, paddr: u64) -> [u8; 20] {
        let mut aad = [0u8; 20];
        aad[..4].copy_from_slice(&self.id.to_be_bytes());
        aad[4..12].copy_from_slice(&self.handle.to_be_bytes());
        aad[12..].copy_from_slice(&paddr.to_be_bytes());
        aad
    }

    /// Encrypt one page in place; binds owner and paddr through the AAD.
    pub(crate) fn encrypt_page(&self, paddr: u64, page: &mut [u8]) -> Option<ExportTag> {
        let ctr = self.nonce_ctr.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.id.to_be_bytes());
        nonce[4..].copy_from_slice(&ctr.to_be_bytes());
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce.into(), &self.aad(paddr), page.into())
            .ok()?;
        Some(ExportTag {
            owner: self.id,
            nonce,
            tag: tag.into(),
        })
    }

    /// Decrypt and verify one exported page. On failure `page` is left unchanged.
    pub(crate) fn decrypt_page(&self, paddr: u64, page: &mut [u8], tag: &ExportTag) -> bool {
        if tag.owner != self.id || page.len() != PAGE_SIZE {
            return false;
        }
        let mut tmp = [0u8; PAGE_SIZE];
        tmp.copy_from_slice(page);
        match self.cipher.decrypt_inout_detached(
            &tag.nonce.into(),
            &self.aad(paddr),
            tmp.as_mut_slice().into(),
            &tag.tag.into(),
        ) {
            Ok(()) => {
                page.copy_from_slice(&tmp);
                true
            }
            Err(_) => false,
        }
    }
}

/// A secure CPU.
pub(crate) struct Cpu {
    pub(crate) config: Arc<Config>,
    pub(crate) num: u16,
    pub(crate) stor_len: u64,
}

/// Everything keyed by handle. One RwLock: creations and destructions are rare, lookups cheap.
#[derive(Default)]
pub(crate) struct Tables {
    /// Every configuration ever created (dead ones too, for orphaned pages and their handles).
    pub(crate) by_handle: HashMap<u64, Arc<Config>>,
    /// Same configurations indexed by id - 1 (ids are dense and never reused).
    pub(crate) by_id: Vec<Arc<Config>>,
    pub(crate) cpus: HashMap<u64, Cpu>,
    pub(crate) asce_in_use: HashSet<u64>,
    pub(crate) live: usize,
}

impl Tables {
    #[inline]
    pub(crate) fn by_id(&self, id: u32) -> Option<&Arc<Config>> {
        (id as usize).checked_sub(1).and_then(|i| self.by_id.get(i))
    }

    pub(crate) fn live(&self, handle: u64) -> Option<&Arc<Config>> {
        self.by_handle.get(&handle).filter(|c| c.is_alive())
    }
}

/// SplitMix64: turns sequential ids into opaque, well-spread handles.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random 64-bit value; falls back to time and address entropy if the OS source fails.
pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_ok() {
        return u64::from_ne_bytes(b);
    }
    fallback_entropy(0)
}

fn fallback_entropy(extra: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    mix64(t ^ mix64(std::ptr::addr_of!(local) as u64) ^ mix64(extra))
}

fn random_key(handle: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    if getrandom::fill(&mut key).is_err() {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for i in 0..4u64 {
            h.update(fallback_entropy(handle ^ i).to_be_bytes());
        }
        key.copy_from_slice(&h.finalize());
    }
    key
}
