//! Secure configurations and CPUs as the UV keeps them: handles, donations, ASCE use, the
//! per-configuration export key, and the table that maps handles and owner ids to them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;

use crate::image::{SecHeader, Verifier};
use crate::memory::ps::MAX_OWNER;
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
    /// EXPORTED pages whose state word names this configuration (orphan exports included).
    pub(crate) exported_pages: AtomicI64,
    /// Of those, the ones exported after the configuration was gone (ORPHAN_EXPORT).
    pub(crate) orphan_exports: AtomicI64,
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
            exported_pages: AtomicI64::new(0),
            orphan_exports: AtomicI64::new(0),
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

    /// Page state words that name this configuration's id (secure, shared, orphaned, exported).
    /// Once a dead configuration has none, nothing can attribute a page to it any more.
    pub(crate) fn page_refs(&self) -> i64 {
        self.secure_pages.load(Ordering::Acquire) + self.exported_pages.load(Ordering::Acquire)
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
///
/// A configuration is kept while it lives and, once dead, while some page state word still
/// names its id (orphaned pages after Destroy-Fast, exported pages): those pages are attributed
/// to it. Then it is retired: its record goes, and its id (27 bits in the page word) may be
/// given to a new configuration. Because no word names a retired id, a reused id never makes
/// an old page look owned by the new configuration. Handles are never reused.
#[derive(Default)]
pub(crate) struct Tables {
    /// Live configurations, and dead ones pages still refer to.
    pub(crate) by_handle: HashMap<u64, Arc<Config>>,
    /// The same configurations by id - 1; None = a free id.
    by_id: Vec<Option<Arc<Config>>>,
    /// Free ids below `by_id.len()`, reused last-freed first.
    free_ids: Vec<u32>,
    /// Dead configurations that may be retired once no page refers to them.
    dead: Vec<u32>,
    pub(crate) cpus: HashMap<u64, Cpu>,
    pub(crate) asce_in_use: HashSet<u64>,
    pub(crate) live: usize,
}

/// Sizes of the configuration tables (`Ultravisor::table_sizes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Configuration records kept: live ones and dead ones pages still refer to.
    pub configs: u64,
    pub live: u64,
    /// Dead configurations kept because pages still refer to them.
    pub dead: u64,
    /// Ids ever handed out at once (the id table's length) and, of those, free ones.
    pub id_slots: u64,
    pub free_ids: u64,
    pub cpus: u64,
    pub asces: u64,
}

impl Tables {
    #[inline]
    pub(crate) fn by_id(&self, id: u32) -> Option<&Arc<Config>> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.by_id.get(i))
            .and_then(Option::as_ref)
    }

    pub(crate) fn live(&self, handle: u64) -> Option<&Arc<Config>> {
        self.by_handle.get(&handle).filter(|c| c.is_alive())
    }

    /// No id can be handed out (2^27 - 1 configurations are kept).
    pub(crate) fn ids_exhausted(&self) -> bool {
        self.free_ids.is_empty() && self.by_id.len() >= MAX_OWNER as usize
    }

    /// The id the next [`Tables::insert`] takes (None if exhausted).
    pub(crate) fn next_id(&self) -> Option<u32> {
        match self.free_ids.last() {
            Some(&id) => Some(id),
            None if self.by_id.len() < MAX_OWNER as usize => Some(self.by_id.len() as u32 + 1),
            None => None,
        }
    }

    /// Enter a new configuration whose id came from [`Tables::next_id`].
    pub(crate) fn insert(&mut self, cfg: Arc<Config>) {
        let id = cfg.id;
        if self.free_ids.last() == Some(&id) {
            self.free_ids.pop();
        } else {
            debug_assert_eq!(id as usize, self.by_id.len() + 1);
            self.by_id.push(None);
        }
        self.by_handle.insert(cfg.handle, Arc::clone(&cfg));
        if let Some(slot) = self.by_id.get_mut(id as usize - 1) {
            *slot = Some(cfg);
        }
    }

    /// A dead configuration may now be retired (its own clean-up is done).
    pub(crate) fn mark_dead(&mut self, id: u32) {
        self.dead.push(id);
    }

    /// Dead configurations no page refers to any more are retired; their ids become free.
    /// Returns how many. The caller holds the tables write lock, so no page transition is
    /// half-accounted meanwhile (transitions count the new reference before dropping the old).
    pub(crate) fn retire_unreferenced(&mut self) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self.dead.len() {
            let id = self.dead[i];
            if self.by_id(id).is_some_and(|c| c.page_refs() > 0) {
                i += 1;
                continue;
            }
            self.dead.swap_remove(i);
            if let Some(cfg) = self.by_id.get_mut(id as usize - 1).and_then(Option::take) {
                self.by_handle.remove(&cfg.handle);
            }
            self.free_ids.push(id);
            n += 1;
        }
        n
    }

    /// Dead configurations whose only references are pages exported while they lived (which
    /// read as non-secure already): candidates for `forget_exports`.
    pub(crate) fn only_live_exports(&self) -> Vec<Arc<Config>> {
        self.dead
            .iter()
            .filter_map(|&id| self.by_id(id))
            .filter(|c| {
                c.secure_pages.load(Ordering::Acquire) <= 0
                    && c.orphan_exports.load(Ordering::Acquire) <= 0
                    && c.exported_pages.load(Ordering::Acquire) > 0
            })
            .cloned()
            .collect()
    }

    pub(crate) fn sizes(&self) -> TableSizes {
        TableSizes {
            configs: self.by_handle.len() as u64,
            live: self.live as u64,
            dead: self.dead.len() as u64,
            id_slots: self.by_id.len() as u64,
            free_ids: self.free_ids.len() as u64,
            cpus: self.cpus.len() as u64,
            asces: self.asce_in_use.len() as u64,
        }
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
