//! Secure-Execution-style boot image: the sealed header (SET_SEC_CONF_PARAMS), per-page
//! AES-256-XTS decryption (UNPACK_IMG) and the PLD/ALD/TLD check (VERIFY_IMG).
//!
//! The byte layout and every rc are documented in docs/IMAGE.md. Parsing never panics: any
//! byte string either yields a [`SecHeader`] or a [`HeaderError`] with the UV rc to report.

use std::fmt;

use aes::Aes256;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use sha2::{Digest, Sha512};
use xts_mode::{Array, Xts128};

use crate::PAGE_SIZE;

/// The emulated machine's host key (AES-256). Real hosts hold a private ECDH key; the
/// emulator wraps the image key directly under this symmetric key. Public by design.
pub const HOST_KEY_DEFAULT: [u8; 32] = *b"pvfast-emulated-ultravisor-key-1";
/// Largest header the emulated UV accepts (the v6.2 kernel limit, 2 * PAGE_SIZE).
pub const MAX_HEADER_LEN: usize = 2 * PAGE_SIZE;
/// Header magic, as in real Secure Execution headers.
pub const MAGIC: [u8; 8] = *b"IBMSecEx";
/// The only header version this UV understands.
pub const VERSION: u32 = 0x0000_0100;
/// Bytes of the AES-256-XTS image key (two AES-256 keys: data key, tweak key).
pub const IMAGE_KEY_LEN: usize = 64;

const OFF_MAGIC: usize = 0x00;
const OFF_VERSION: usize = 0x08;
const OFF_LENGTH: usize = 0x0c;
const OFF_COUNT: usize = 0x10;
const OFF_FLAGS: usize = 0x14;
const OFF_PAGES: usize = 0x18;
const OFF_NONCE: usize = 0x20;
const NONCE_LEN: usize = 12;
const OFF_RESERVED: usize = 0x2c;
const OFF_PLD: usize = 0x30;
const OFF_ALD: usize = 0x70;
const OFF_TLD: usize = 0xb0;
const OFF_TABLE: usize = 0xf0;
const ENTRY_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Wrapped image key plus GCM tag, after the component table.
const TRAILER_LEN: usize = IMAGE_KEY_LEN + TAG_LEN;
const DIGEST_LEN: usize = 64;

/// Smallest valid header: one component.
pub const MIN_HEADER_LEN: usize = OFF_TABLE + ENTRY_LEN + TRAILER_LEN;
/// Most components that fit in [`MAX_HEADER_LEN`].
pub const MAX_COMPONENTS: usize = (MAX_HEADER_LEN - OFF_TABLE - TRAILER_LEN) / ENTRY_LEN;

/// SET_SEC_CONF_PARAMS rcs (cc 1), one per [`HeaderError`] variant.
pub const RC_HDR_TOO_SHORT: u16 = 0x0101;
pub const RC_HDR_BAD_MAGIC: u16 = 0x0102;
/// Not 0x0103: for SET_SEC_CONF_PARAMS that means "header not readable" on real machines
/// (kvm-unit-tests s390x/uv-host.c test_set_se_header).
pub const RC_HDR_BAD_VERSION: u16 = 0x0107;
pub const RC_HDR_BAD_LENGTH: u16 = 0x0104;
pub const RC_HDR_BAD_COMPONENT: u16 = 0x0105;
pub const RC_HDR_RESERVED: u16 = 0x0106;
/// Wrong host key or tampered header; QEMU adds "check whether the image is correctly
/// encrypted for this host" for this rc.
pub const RC_HDR_KEY_UNWRAP: u16 = 0x0108;

/// VERIFY_IMG rcs (cc 1), checked in this order.
pub const RC_VERIFY_PLD: u16 = 0x0102;
pub const RC_VERIFY_ALD: u16 = 0x0103;
pub const RC_VERIFY_TLD: u16 = 0x0104;

/// One entry of the component table: guest absolute address, size (a positive multiple of
/// 4 KiB) and the component tweak (tweak0 of every UNPACK of its pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ComponentDesc {
    pub addr: u64,
    pub size: u64,
    pub tweak: u64,
}

impl ComponentDesc {
    /// Pages of the component.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }
}

/// Why the UV refused a header. [`HeaderError::rc`] gives the rc to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the smallest valid header ([`MIN_HEADER_LEN`]).
    TooShort { len: usize },
    /// The first 8 bytes are not `IBMSecEx`.
    BadMagic,
    /// A version other than [`VERSION`].
    BadVersion { version: u32 },
    /// More than [`MAX_HEADER_LEN`] bytes, or a length that disagrees with the length field
    /// or with the component count. `expected` is what the header itself implies.
    BadLength { expected: u64, actual: usize },
    /// A flags or reserved field is not zero.
    Reserved,
    /// The component table is invalid. `index` is the offending entry, if there is one.
    BadComponent {
        index: Option<usize>,
        reason: String,
    },
    /// The image key does not unwrap: wrong host key, or any byte of the header was changed.
    KeyUnwrap,
}

impl HeaderError {
    /// The UV rc for SET_SEC_CONF_PARAMS (reported with cc 1).
    pub fn rc(&self) -> u16 {
        match self {
            HeaderError::TooShort { .. } => RC_HDR_TOO_SHORT,
            HeaderError::BadMagic => RC_HDR_BAD_MAGIC,
            HeaderError::BadVersion { .. } => RC_HDR_BAD_VERSION,
            HeaderError::BadLength { .. } => RC_HDR_BAD_LENGTH,
            HeaderError::BadComponent { .. } => RC_HDR_BAD_COMPONENT,
            HeaderError::Reserved => RC_HDR_RESERVED,
            HeaderError::KeyUnwrap => RC_HDR_KEY_UNWRAP,
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::TooShort { len } => {
                write!(f, "header is {len} bytes, shorter than the minimum {MIN_HEADER_LEN}")
            }
            HeaderError::BadMagic => write!(f, "bad magic (expected \"IBMSecEx\")"),
            HeaderError::BadVersion { version } => {
                write!(f, "unsupported header version {version:#x} (expected {VERSION:#x})")
            }
            HeaderError::BadLength { expected, actual } if *actual > MAX_HEADER_LEN => write!(
                f,
                "header is {actual} bytes, more than the maximum {MAX_HEADER_LEN} (header says {expected})"
            ),
            HeaderError::BadLength { expected, actual } => {
                write!(f, "header is {actual} bytes but its fields imply {expected}")
            }
            HeaderError::Reserved => write!(f, "flags or reserved field not zero"),
            HeaderError::BadComponent { index: Some(i), reason } => {
                write!(f, "component {i}: {reason}")
            }
            HeaderError::BadComponent { index: None, reason } => {
                write!(f, "component table: {reason}")
            }
            HeaderError::KeyUnwrap => write!(
                f,
                "image key unwrap failed (wrong host key or tampered header)"
            ),
        }
    }
}

impl std::error::Error for HeaderError {}

/// A header that parsed and authenticated: the component table, the digests to verify
/// against, and the unwrapped image key (kept only as an expanded XTS key schedule).
pub struct SecHeader {
    version: u32,
    length: usize,
    components: Vec<ComponentDesc>,
    pages: u64,
    pld: [u8; DIGEST_LEN],
    ald: [u8; DIGEST_LEN],
    tld: [u8; DIGEST_LEN],
    xts: Xts128<Aes256>,
}

impl fmt::Debug for SecHeader {
    // The image key is the guest's secret: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecHeader")
            .field("version", &self.version)
            .field("length", &self.length)
            .field("components", &self.components)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl SecHeader {
    pub fn components(&self) -> &[ComponentDesc] {
        &self.components
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Header length in bytes.
    pub fn length(&self) -> usize {
        self.length
    }

    /// Total pages of all components (the header's page-count field).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn pld(&self) -> &[u8; 64] {
        &self.pld
    }

    pub fn ald(&self) -> &[u8; 64] {
        &self.ald
    }

    pub fn tld(&self) -> &[u8; 64] {
        &self.tld
    }

    /// Decrypt one page in place with the image key and the 16-byte tweak
    /// `tweak0.to_be_bytes() || tweak1.to_be_bytes()`. The page is one XTS data unit; callers
    /// pass 4096 bytes. A slice shorter than one AES block (16 bytes) is left unchanged.
    pub fn decrypt_page(&self, tweak0: u64, tweak1: u64, page: &mut [u8]) {
        if page.len() >= 16 {
            self.xts.decrypt_sector(page, xts_tweak(tweak0, tweak1));
        }
    }
}

fn xts_tweak(tweak0: u64, tweak1: u64) -> Array<u8, aes::cipher::consts::U16> {
    let mut tweak = [0u8; 16];
    tweak[..8].copy_from_slice(&tweak0.to_be_bytes());
    tweak[8..].copy_from_slice(&tweak1.to_be_bytes());
    Array::from(tweak)
}

fn xts_from_key(image_key: &[u8; IMAGE_KEY_LEN]) -> Xts128<Aes256> {
    let mut data_key = [0u8; 32];
    let mut tweak_key = [0u8; 32];
    data_key.copy_from_slice(&image_key[..32]);
    tweak_key.copy_from_slice(&image_key[32..]);
    Xts128::new(
        Aes256::new(&Array::from(data_key)),
        Aes256::new(&Array::from(tweak_key)),
    )
}

fn be_u32(bytes: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[off..off + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(bytes: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[off..off + 8]);
    u64::from_be_bytes(b)
}

fn digest_at(bytes: &[u8], off: usize) -> [u8; DIGEST_LEN] {
    let mut d = [0u8; DIGEST_LEN];
    d.copy_from_slice(&bytes[off..off + DIGEST_LEN]);
    d
}

/// Header length for `count` components.
fn header_len_for(count: u64) -> u64 {
    // count comes from a u32 field: no overflow in u64.
    (OFF_TABLE + TRAILER_LEN) as u64 + count * ENTRY_LEN as u64
}

/// Checks shared by the sealer and the UV. Returns the total page count.
fn validate_table(components: &[ComponentDesc]) -> Result<u64, (Option<usize>, String)> {
    if components.is_empty() {
        return Err((None, "no components".into()));
    }
    if components.len() > MAX_COMPONENTS {
        return Err((
            None,
            format!(
                "{} components, at most {MAX_COMPONENTS} fit in a header",
                components.len()
            ),
        ));
    }
    let page = PAGE_SIZE as u64;
    let mut pages: u64 = 0;
    for (i, c) in components.iter().enumerate() {
        if c.addr % page != 0 {
            return Err((
                Some(i),
                format!("address {:#x} is not 4 KiB aligned", c.addr),
            ));
        }
        if c.size == 0 {
            return Err((Some(i), "size is zero".into()));
        }
        if c.size % page != 0 {
            return Err((
                Some(i),
                format!("size {:#x} is not a multiple of 4 KiB", c.size),
            ));
        }
        if c.addr.checked_add(c.size).is_none() {
            return Err((
                Some(i),
                format!("address {:#x} + size {:#x} overflows", c.addr, c.size),
            ));
        }
        pages = pages
            .checked_add(c.pages())
            .ok_or_else(|| (Some(i), "total page count overflows".to_string()))?;
    }
    let mut order: Vec<usize> = (0..components.len()).collect();
    order.sort_unstable_by_key(|&i| components[i].addr);
    for pair in order.windows(2) {
        let (a, b) = (&components[pair[0]], &components[pair[1]]);
        // a.addr + a.size cannot overflow: checked above.
        if a.addr + a.size > b.addr {
            let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            return Err((Some(second), format!("overlaps component {first}")));
        }
    }
    order.sort_unstable_by_key(|&i| components[i].tweak);
    for pair in order.windows(2) {
        if components[pair[0]].tweak == components[pair[1]].tweak {
            let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            return Err((
                Some(second),
                format!(
                    "tweak {:#x} is also the tweak of component {first}",
                    components[second].tweak
                ),
            ));
        }
    }
    Ok(pages)
}

/// Parse, validate and authenticate a header as SET_SEC_CONF_PARAMS does.
///
/// Checks, in order: size limits ([`MAX_HEADER_LEN`], [`MIN_HEADER_LEN`]), magic, version,
/// length field, flags/reserved, component count vs length, component table, page count,
/// and finally the AES-256-GCM unwrap of the image key (which authenticates every other
/// byte of the header). Never panics.
pub fn parse_header(bytes: &[u8], host_key: &[u8; 32]) -> Result<SecHeader, HeaderError> {
    let actual = bytes.len();
    if actual > MAX_HEADER_LEN {
        let expected = if actual >= OFF_LENGTH + 4 {
            be_u32(bytes, OFF_LENGTH) as u64
        } else {
            0
        };
        return Err(HeaderError::BadLength { expected, actual });
    }
    if actual < MIN_HEADER_LEN {
        return Err(HeaderError::TooShort { len: actual });
    }
    if bytes[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = be_u32(bytes, OFF_VERSION);
    if version != VERSION {
        return Err(HeaderError::BadVersion { version });
    }
    let declared = be_u32(bytes, OFF_LENGTH) as u64;
    if declared != actual as u64 {
        return Err(HeaderError::BadLength {
            expected: declared,
            actual,
        });
    }
    if be_u32(bytes, OFF_FLAGS) != 0 || be_u32(bytes, OFF_RESERVED) != 0 {
        return Err(HeaderError::Reserved);
    }
    let count = be_u32(bytes, OFF_COUNT) as u64;
    let implied = header_len_for(count);
    if implied != actual as u64 {
        return Err(HeaderError::BadLength {
            expected: implied,
            actual,
        });
    }
    // implied == actual <= MAX_HEADER_LEN, so count is small and the table is in bounds.
    let count = count as usize;
    let components: Vec<ComponentDesc> = (0..count)
        .map(|i| {
            let off = OFF_TABLE + i * ENTRY_LEN;
            ComponentDesc {
                addr: be_u64(bytes, off),
                size: be_u64(bytes, off + 8),
                tweak: be_u64(bytes, off + 16),
            }
        })
        .collect();
    let pages = validate_table(&components)
        .map_err(|(index, reason)| HeaderError::BadComponent { index, reason })?;
    let declared_pages = be_u64(bytes, OFF_PAGES);
    if declared_pages != pages {
        return Err(HeaderError::BadComponent {
            index: None,
            reason: format!(
                "page-count field {declared_pages} differs from the {pages} pages of the table"
            ),
        });
    }

    let key_off = actual - TRAILER_LEN;
    let mut image_key = [0u8; IMAGE_KEY_LEN];
    image_key.copy_from_slice(&bytes[key_off..key_off + IMAGE_KEY_LEN]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&bytes[key_off + IMAGE_KEY_LEN..]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[OFF_NONCE..OFF_NONCE + NONCE_LEN]);
    let gcm = Aes256Gcm::new(&Array::from(*host_key));
    gcm.decrypt_inout_detached(
        &Nonce::from(nonce),
        &bytes[..key_off],
        image_key.as_mut_slice().into(),
        &Tag::from(tag),
    )
    .map_err(|_| HeaderError::KeyUnwrap)?;

    Ok(SecHeader {
        version,
        length: actual,
        components,
        pages,
        pld: digest_at(bytes, OFF_PLD),
        ald: digest_at(bytes, OFF_ALD),
        tld: digest_at(bytes, OFF_TLD),
        xts: xts_from_key(&image_key),
    })
}

/// Running PLD/ALD/TLD of the pages unpacked so far (one per configuration). Feed it each
/// page exactly once, after a successful UNPACK, in the order the pages were unpacked.
#[derive(Clone)]
pub struct Verifier {
    pld: Sha512,
    ald: Sha512,
    tld: Sha512,
    pages: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new() -> Self {
        Verifier {
            pld: Sha512::new(),
            ald: Sha512::new(),
            tld: Sha512::new(),
            pages: 0,
        }
    }

    /// Account one unpacked page: its guest address, its tweak and its decrypted content.
    pub fn add_page(&mut self, gaddr: u64, tweak0: u64, tweak1: u64, plaintext: &[u8]) {
        self.pld.update(plaintext);
        self.ald.update(gaddr.to_be_bytes());
        self.tld.update(tweak0.to_be_bytes());
        self.tld.update(tweak1.to_be_bytes());
        self.pages += 1;
    }

    /// Pages added so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// VERIFY_IMG: compare PLD, then ALD, then TLD with the header; the first mismatch gives
    /// the rc ([`RC_VERIFY_PLD`], [`RC_VERIFY_ALD`], [`RC_VERIFY_TLD`]).
    pub fn finish(&self, hdr: &SecHeader) -> Result<(), u16> {
        if digest_of(&self.pld) != hdr.pld {
            return Err(RC_VERIFY_PLD);
        }
        if digest_of(&self.ald) != hdr.ald {
            return Err(RC_VERIFY_ALD);
        }
        if digest_of(&self.tld) != hdr.tld {
            return Err(RC_VERIFY_TLD);
        }
        Ok(())
    }
}

fn digest_of(hasher: &Sha512) -> [u8; DIGEST_LEN] {
    hasher.clone().finalize().into()
}

/// A fresh random AES-256-XTS image key (two different halves).
pub fn random_image_key() -> Result<[u8; IMAGE_KEY_LEN], String> {
    let mut key = [0u8; IMAGE_KEY_LEN];
    loop {
        getrandom::fill(&mut key).map_err(|e| format!("getrandom: {e}"))?;
        if key[..32] != key[32..] {
            return Ok(key);
        }
    }
}

/// Build a sealed image, as genprotimg/pvimg does: pad each component to 4 KiB with zeros,
/// encrypt page by page with AES-256-XTS (tweak = component tweak || byte offset), compute
/// PLD/ALD/TLD in component order, and wrap the image key with AES-256-GCM under the host key
/// with the rest of the header as AAD. `components` are `(addr, tweak, plaintext)`.
///
/// Returns the header and the encrypted components (each a multiple of 4 KiB, in input
/// order). Errors name the argument and the offending entry (`components[2]: ...`).
pub fn seal_image(
    components: &[(u64, u64, &[u8])],
    host_key: &[u8; 32],
    image_key: &[u8; IMAGE_KEY_LEN],
) -> Result<(Vec<u8>, Vec<Vec<u8>>), String> {
    if image_key[..32] == image_key[32..] {
        return Err("image_key: its two halves (XTS data and tweak keys) must differ".into());
    }
    let page = PAGE_SIZE as u64;
    let mut table = Vec::with_capacity(components.len());
    for (i, &(addr, tweak, data)) in components.iter().enumerate() {
        if data.is_empty() {
            return Err(format!("components[{i}]: data is empty"));
        }
        let size = (data.len() as u64)
            .checked_next_multiple_of(page)
            .ok_or_else(|| format!("components[{i}]: data too large"))?;
        table.push(ComponentDesc { addr, size, tweak });
    }
    let pages = validate_table(&table).map_err(|(index, reason)| match index {
        Some(i) => format!("components[{i}]: {reason}"),
        None => format!("components: {reason}"),
    })?;

    let xts = xts_from_key(image_key);
    let (mut pld, mut ald, mut tld) = (Sha512::new(), Sha512::new(), Sha512::new());
    let mut encrypted = Vec::with_capacity(components.len());
    for (desc, &(_, _, data)) in table.iter().zip(components) {
        let size = usize::try_from(desc.size).map_err(|_| "component too large".to_string())?;
        let mut buf = vec![0u8; size];
        buf[..data.len()].copy_from_slice(data);
        for (n, chunk) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let offset = n as u64 * page;
            pld.update(&*chunk);
            ald.update((desc.addr + offset).to_be_bytes());
            tld.update(desc.tweak.to_be_bytes());
            tld.update(offset.to_be_bytes());
            xts.encrypt_sector(chunk, xts_tweak(desc.tweak, offset));
        }
        encrypted.push(buf);
    }

    let length = header_len_for(table.len() as u64) as usize;
    let mut hdr = vec![0u8; length];
    hdr[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    hdr[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_be_bytes());
    hdr[OFF_LENGTH..OFF_LENGTH + 4].copy_from_slice(&(length as u32).to_be_bytes());
    hdr[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&(table.len() as u32).to_be_bytes());
    hdr[OFF_PAGES..OFF_PAGES + 8].copy_from_slice(&pages.to_be_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| format!("getrandom: {e}"))?;
    hdr[OFF_NONCE..OFF_NONCE + NONCE_LEN].copy_from_slice(&nonce);
    hdr[OFF_PLD..OFF_PLD + DIGEST_LEN].copy_from_slice(&pld.finalize());
    hdr[OFF_ALD..OFF_ALD + DIGEST_LEN].copy_from_slice(&ald.finalize());
    hdr[OFF_TLD..OFF_TLD + DIGEST_LEN].copy_from_slice(&tld.finalize());
    for (i, c) in table.iter().enumerate() {
        let off = OFF_TABLE + i * ENTRY_LEN;
        hdr[off..off + 8].copy_from_slice(&c.addr.to_be_bytes());
        hdr[off + 8..off + 16].copy_from_slice(&c.size.to_be_bytes());
        hdr[off + 16..off + 24].copy_from_slice(&c.tweak.to_be_bytes());
    }
    let key_off = length - TRAILER_LEN;
    let (aad, trailer) = hdr.split_at_mut(key_off);
    let (wrapped, tag_out) = trailer.split_at_mut(IMAGE_KEY_LEN);
    wrapped.copy_from_slice(image_key);
    let gcm = Aes256Gcm::new(&Array::from(*host_key));
    let tag = gcm
        .encrypt_inout_detached(&Nonce::from(nonce), aad, wrapped.into())
        .map_err(|_| "AES-GCM key wrap failed".to_string())?;
    tag_out.copy_from_slice(&tag);
    Ok((hdr, encrypted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_constants() {
        assert_eq!(MIN_HEADER_LEN, 344);
        assert_eq!(MAX_COMPONENTS, 328);
        assert!(header_len_for(MAX_COMPONENTS as u64) as usize <= MAX_HEADER_LEN);
        assert!(header_len_for(MAX_COMPONENTS as u64 + 1) as usize > MAX_HEADER_LEN);
    }
}
