//! Integration tests of the boot-image module: seal/parse round trip, the documented byte
//! layout (checked with independent crypto), every rc, the verifier, and robustness of
//! parse_header against random, truncated and bit-flipped headers.

use aes::Aes256;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use pvfast_core::image::*;
use sha2::{Digest, Sha512};
use xts_mode::{Array, Xts128};

const PAGE: usize = 4096;
const KEY: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = (i as u8).wrapping_mul(7).wrapping_add(1);
        i += 1;
    }
    k
};

/// splitmix64: deterministic test randomness without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

struct Sealed {
    plain: Vec<(u64, u64, Vec<u8>)>,
    header: Vec<u8>,
    enc: Vec<Vec<u8>>,
}

/// Three components: a kernel-like 2.5 pages, a one-byte parmline, a 3-page initrd placed
/// below the kernel (component order is not address order).
fn sample() -> Sealed {
    let plain = vec![
        (0x10000u64, 0x7076_0001u64, pattern(2 * PAGE + 2048, 1)),
        (0x0u64, 0x7076_0002u64, vec![0x42]),
        (0x8000u64, 0x7076_0003u64, pattern(2 * PAGE, 3)),
    ];
    let refs: Vec<(u64, u64, &[u8])> = plain
        .iter()
        .map(|(a, t, d)| (*a, *t, d.as_slice()))
        .collect();
    let (header, enc) = seal_image(&refs, &HOST_KEY_DEFAULT, &KEY).expect("seal");
    Sealed { plain, header, enc }
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(PAGE) * PAGE, 0);
    v
}

/// Every page as the kernel's UNPACK loop issues it: (gaddr, tweak0, tweak1, ciphertext).
fn unpack_order(s: &Sealed) -> Vec<(u64, u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for ((addr, tweak, _), enc) in s.plain.iter().zip(&s.enc) {
        for (n, page) in enc.chunks(PAGE).enumerate() {
            let off = (n * PAGE) as u64;
            out.push((addr + off, *tweak, off, page.to_vec()));
        }
    }
    out
}

fn verify_pages(hdr: &SecHeader, pages: &[(u64, u64, u64, Vec<u8>)]) -> Result<(), u16> {
    let mut v = Verifier::new();
    for (gaddr, t0, t1, ct) in pages {
        let mut page = ct.clone();
        hdr.decrypt_page(*t0, *t1, &mut page);
        v.add_page(*gaddr, *t0, *t1, &page);
    }
    v.finish(hdr)
}

fn set_u32(h: &mut [u8], off: usize, v: u32) {
    h[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn set_u64(h: &mut [u8], off: usize, v: u64) {
    h[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn rc_of(bytes: &[u8]) -> u16 {
    parse_header(bytes, &HOST_KEY_DEFAULT)
        .expect_err("header must be refused")
        .rc()
}

#[test]
fn round_trip_components_and_digests() {
    let s = sample();
    assert_eq!(s.header.len(), 0xf0 + 3 * 24 + 80);
    let hdr = parse_header(&s.header, &HOST_KEY_DEFAULT).expect("parse");
    assert_eq!(hdr.version(), VERSION);
    assert_eq!(hdr.length(), s.header.len());
    assert_eq!(
        hdr.components(),
        &[
            ComponentDesc {
                addr: 0x10000,
                size: 3 * PAGE as u64,
                tweak: 0x7076_0001
            },
            ComponentDesc {
                addr: 0x0,
                size: PAGE as u64,
                tweak: 0x7076_0002
            },
            ComponentDesc {
                addr: 0x8000,
                size: 2 * PAGE as u64,
                tweak: 0x7076_0003
            },
        ]
    );
    assert_eq!(hdr.pages(), 6);
    for ((_, _, plain), enc) in s.plain.iter().zip(&s.enc) {
        assert_eq!(enc.len(), plain.len().div_ceil(PAGE) * PAGE);
        assert_ne!(
            &enc[..plain.len()],
            plain.as_slice(),
            "component stored in clear"
        );
    }
    assert_eq!(verify_pages(&hdr, &unpack_order(&s)), Ok(()));
}

#[test]
fn decrypt_page_returns_padded_plaintext() {
    let s = sample();
    let hdr = parse_header(&s.header, &HOST_KEY_DEFAULT).unwrap();
    for ((_, tweak, plain), enc) in s.plain.iter().zip(&s.enc) {
        let want = padded(plain);
        for (n, ct) in enc.chunks(PAGE).enumerate() {
            let mut page = ct.to_vec();
            hdr.decrypt_page(*tweak, (n * PAGE) as u64, &mut page);
            assert_eq!(page, want[n * PAGE..(n + 1) * PAGE]);
            // Any other tweak gives garbage.
            let mut wrong = ct.to_vec();
            hdr.decrypt_page(*tweak, (n * PAGE) as u64 + PAGE as u64, &mut wrong);
            assert_ne!(wrong, want[n * PAGE..(n + 1) * PAGE]);
        }
    }
    // Shorter than one AES block: untouched, no panic.
    let mut tiny = [7u8; 15];
    hdr.decrypt_page(1, 0, &mut tiny);
    assert_eq!(tiny, [7u8; 15]);
}

/// docs/IMAGE.md, checked with the crypto crates directly rather than through the module.
#[test]
fn layout_matches_the_documentation() {
    let s = sample();
    let h = &s.header;
    let u32_at = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
    assert_eq!(&h[0..8], b"IBMSecEx");
    assert_eq!(u32_at(0x08), 0x100);
    assert_eq!(u32_at(0x0c) as usize, h.len());
    assert_eq!(u32_at(0x10), 3);
    assert_eq!(u32_at(0x14), 0);
    assert_eq!(u64_at(0x18), 6);
    assert_eq!(u32_at(0x2c), 0);
    for (i, (addr, tweak, plain)) in s.plain.iter().enumerate() {
        let e = 0xf0 + 24 * i;
        assert_eq!(u64_at(e), *addr);
        assert_eq!(u64_at(e + 8) as usize, padded(plain).len());
        assert_eq!(u64_at(e + 16), *tweak);
    }

    // Digests: SHA-512 over plaintext pages / u64 BE addresses / 16-byte tweaks.
    let (mut pld, mut ald, mut tld) = (Sha512::new(), Sha512::new(), Sha512::new());
    for (addr, tweak, plain) in &s.plain {
        for (n, page) in padded(plain).chunks(PAGE).enumerate() {
            let off = (n * PAGE) as u64;
            pld.update(page);
            ald.update((addr + off).to_be_bytes());
            tld.update(tweak.to_be_bytes());
            tld.update(off.to_be_bytes());
        }
    }
    assert_eq!(&h[0x30..0x70], pld.finalize().as_slice());
    assert_eq!(&h[0x70..0xb0], ald.finalize().as_slice());
    assert_eq!(&h[0xb0..0xf0], tld.finalize().as_slice());

    // Key slot: AES-256-GCM(host key, nonce @0x20, AAD = everything before the slot).
    let slot = h.len() - 80;
    let mut key = [0u8; 64];
    key.copy_from_slice(&h[slot..slot + 64]);
    let tag: [u8; 16] = h[slot + 64..].try_into().unwrap();
    let nonce: [u8; 12] = h[0x20..0x2c].try_into().unwrap();
    Aes256Gcm::new(&Array::from(HOST_KEY_DEFAULT))
        .decrypt_inout_detached(
            &Nonce::from(nonce),
            &h[..slot],
            key.as_mut_slice().into(),
            &Tag::from(tag),
        )
        .expect("documented unwrap");
    assert_eq!(key, KEY);

    // Pages: AES-256-XTS, key halves (data, tweak), tweak = tweak0 BE || tweak1 BE.
    let k1: [u8; 32] = KEY[..32].try_into().unwrap();
    let k2: [u8; 32] = KEY[32..].try_into().unwrap();
    let xts = Xts128::new(Aes256::new(&Array::from(k1)), Aes256::new(&Array::from(k2)));
    let (_, tweak0, plain0) = &s.plain[0];
    let mut page = padded(plain0)[PAGE..2 * PAGE].to_vec();
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&tweak0.to_be_bytes());
    t[8..].copy_from_slice(&(PAGE as u64).to_be_bytes());
    xts.encrypt_sector(&mut page, Array::from(t));
    assert_eq!(page, s.enc[0][PAGE..2 * PAGE]);
}

#[test]
fn each_seal_uses_a_fresh_nonce() {
    let a = sample();
    let b = sample();
    assert_ne!(a.header, b.header);
    assert_eq!(a.enc, b.enc, "same image key and tweaks: same ciphertext");
    assert!(parse_header(&b.header, &HOST_KEY_DEFAULT).is_ok());
}

#[test]
fn wrong_host_key_is_0x108() {
    let s = sample();
    let mut other = HOST_KEY_DEFAULT;
    other[31] ^= 1;
    let err = parse_header(&s.header, &other).unwrap_err();
    assert_eq!(err, HeaderError::KeyUnwrap);
    assert_eq!(err.rc(), 0x0108);
    assert!(err.to_string().contains("host key"));
}

#[test]
fn every_single_bit_flip_is_refused() {
    let s = sample();
    for byte in 0..s.header.len() {
        for bit in 0..8 {
            let mut h = s.header.clone();
            h[byte] ^= 1 << bit;
            let err = parse_header(&h, &HOST_KEY_DEFAULT)
                .expect_err(&format!("flip of byte {byte:#x} bit {bit} accepted"));
            assert!((0x0101..=0x010f).contains(&err.rc()), "{err:?}");
        }
    }
}

#[test]
fn tampered_digest_nonce_tweak_or_key_slot_fails_unwrap() {
    let s = sample();
    // Bytes whose change keeps the header well formed: only the AEAD can notice.
    let len = s.header.len();
    for off in [
        0x20,
        0x2b,
        0x30,
        0x6f,
        0x70,
        0xb0,
        0xef,
        0xf0 + 16,
        0xf0 + 24 + 20,
        len - 80,
        len - 17,
        len - 1,
    ] {
        let mut h = s.header.clone();
        h[off] ^= 0x80;
        assert_eq!(rc_of(&h), RC_HDR_KEY_UNWRAP, "offset {off:#x}");
    }
}

#[test]
fn rc_for_each_structural_error() {
    let s = sample();
    let h = &s.header;

    assert_eq!(rc_of(&[]), RC_HDR_TOO_SHORT);
    assert_eq!(rc_of(&h[..MIN_HEADER_LEN - 1]), RC_HDR_TOO_SHORT);
    assert!(matches!(
        parse_header(&h[..100], &HOST_KEY_DEFAULT),
        Err(HeaderError::TooShort { len: 100 })
    ));

    let mut m = h.clone();
    m[3] = b'x';
    assert_eq!(rc_of(&m), RC_HDR_BAD_MAGIC);

    let mut v = h.clone();
    set_u32(&mut v, 0x08, 0x200);
    assert_eq!(
        parse_header(&v, &HOST_KEY_DEFAULT).unwrap_err(),
        HeaderError::BadVersion { version: 0x200 }
    );
    assert_eq!(rc_of(&v), RC_HDR_BAD_VERSION);

    // Truncated but still long enough: length field disagrees.
    assert_eq!(rc_of(&h[..h.len() - 1]), RC_HDR_BAD_LENGTH);
    let mut longer = h.clone();
    longer.push(0);
    assert_eq!(rc_of(&longer), RC_HDR_BAD_LENGTH);
    // Length field and buffer agree, but the count implies another length.
    let mut c = h.clone();
    set_u32(&mut c, 0x10, 2);
    assert_eq!(rc_of(&c), RC_HDR_BAD_LENGTH);
    set_u32(&mut c, 0x10, u32::MAX);
    assert_eq!(rc_of(&c), RC_HDR_BAD_LENGTH);
    // Over the limit, whatever it contains.
    let mut huge = h.clone();
    huge.resize(MAX_HEADER_LEN + 1, 0);
    let len_field = (MAX_HEADER_LEN + 1) as u32;
    set_u32(&mut huge, 0x0c, len_field);
    assert_eq!(rc_of(&huge), RC_HDR_BAD_LENGTH);
    assert!(parse_header(&huge, &HOST_KEY_DEFAULT)
        .unwrap_err()
        .to_string()
        .contains("maximum"));

    let mut f = h.clone();
    set_u32(&mut f, 0x14, 1);
    assert_eq!(rc_of(&f), RC_HDR_RESERVED);
    let mut r = h.clone();
    r[0x2f] = 1;
    assert_eq!(rc_of(&r), RC_HDR_RESERVED);
}

#[test]
fn bad_component_tables() {
    let s = sample();
    let entry = |i: usize| 0xf0 + 24 * i;
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation, Option<usize>)> = vec![
        (
            "unaligned",
            Box::new(move |h| set_u64(h, entry(1), 0x800)),
            Some(1),
        ),
        (
            "zero size",
            Box::new(move |h| set_u64(h, entry(0) + 8, 0)),
            Some(0),
        ),
        (
            "size not page multiple",
            Box::new(move |h| set_u64(h, entry(2) + 8, 0x1800)),
            Some(2),
        ),
        (
            "overflow",
            Box::new(move |h| set_u64(h, entry(0), !0xfffu64)),
            Some(0),
        ),
        (
            "overlap",
            Box::new(move |h| set_u64(h, entry(2), 0x11000)),
            Some(2),
        ),
        (
            "same tweak",
            Box::new(move |h| set_u64(h, entry(2) + 16, 0x7076_0001)),
            Some(2),
        ),
        ("page count", Box::new(|h| set_u64(h, 0x18, 7)), None),
    ];
    for (what, mutate, index) in cases {
        let mut h = s.header.clone();
        mutate(&mut h);
        match parse_header(&h, &HOST_KEY_DEFAULT) {
            Err(e @ HeaderError::BadComponent { .. }) => {
                assert_eq!(e.rc(), RC_HDR_BAD_COMPONENT);
                let HeaderError::BadComponent { index: got, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(*got, index, "{what}: {e}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A header with no components is the shortest possible too: count 0 is a length error.
    let mut zero = s.header[..0xf0].to_vec();
    zero.extend_from_slice(&[0u8; 80]);
    let zero_len = zero.len() as u32;
    set_u32(&mut zero, 0x0c, zero_len);
    set_u32(&mut zero, 0x10, 0);
    assert_eq!(rc_of(&zero), RC_HDR_TOO_SHORT);
}

#[test]
fn verifier_accepts_full_image_and_rejects_deviations() {
    let s = sample();
    let hdr = parse_header(&s.header, &HOST_KEY_DEFAULT).unwrap();
    let pages = unpack_order(&s);
    assert_eq!(verify_pages(&hdr, &pages), Ok(()));

    // Nothing unpacked at all.
    assert_eq!(Verifier::new().finish(&hdr), Err(RC_VERIFY_PLD));
    // A missing component (the parmline, page 3).
    let mut missing = pages.clone();
    missing.remove(3);
    assert_eq!(verify_pages(&hdr, &missing), Err(RC_VERIFY_PLD));
    // One page unpacked twice.
    let mut twice = pages.clone();
    twice.insert(1, pages[0].clone());
    assert_eq!(verify_pages(&hdr, &twice), Err(RC_VERIFY_PLD));
    // Components unpacked in another order.
    let mut reordered = pages[3..].to_vec();
    reordered.extend_from_slice(&pages[..3]);
    assert_eq!(verify_pages(&hdr, &reordered), Err(RC_VERIFY_PLD));
    // A ciphertext bit flipped in guest memory before UNPACK.
    let mut tampered = pages.clone();
    tampered[4].3[100] ^= 1;
    assert_eq!(verify_pages(&hdr, &tampered), Err(RC_VERIFY_PLD));

    // Right content, wrong address: the verifier is fed plaintexts directly.
    let plain: Vec<(u64, u64, u64, Vec<u8>)> = pages
        .iter()
        .map(|(g, t0, t1, ct)| {
            let mut p = ct.clone();
            hdr.decrypt_page(*t0, *t1, &mut p);
            (*g, *t0, *t1, p)
        })
        .collect();
    let feed = |list: &[(u64, u64, u64, Vec<u8>)]| {
        let mut v = Verifier::new();
        for (g, t0, t1, p) in list {
            v.add_page(*g, *t0, *t1, p);
        }
        assert_eq!(v.pages(), list.len() as u64);
        v.finish(&hdr)
    };
    assert_eq!(feed(&plain), Ok(()));
    let mut moved = plain.clone();
    moved[5].0 += 0x1000_0000;
    assert_eq!(feed(&moved), Err(RC_VERIFY_ALD));
    let mut retweaked = plain.clone();
    retweaked[5].1 ^= 1;
    assert_eq!(feed(&retweaked), Err(RC_VERIFY_TLD));
    let mut reoffset = plain.clone();
    reoffset[5].2 += 1;
    assert_eq!(feed(&reoffset), Err(RC_VERIFY_TLD));
}

#[test]
fn seal_rejects_misuse() {
    let d = [1u8; 10];
    let seal = |c: &[(u64, u64, &[u8])]| seal_image(c, &HOST_KEY_DEFAULT, &KEY).unwrap_err();
    assert!(seal(&[]).contains("no components"));
    assert!(seal(&[(0, 1, &[])]).contains("components[0]: data is empty"));
    assert!(seal(&[(0, 1, &d), (0x1001, 2, &d)]).contains("components[1]: address 0x1001"));
    assert!(seal(&[(0x2000, 1, &d), (0x1000, 2, &[0u8; 4097])])
        .contains("components[1]: overlaps component 0"));
    assert!(seal(&[(0, 5, &d), (0x1000, 5, &d)]).contains("tweak 0x5"));
    assert!(seal(&[(!0xfffu64, 1, &d)]).contains("overflows"));
    let same_halves = [9u8; 64];
    let err = seal_image(&[(0, 1, &d)], &HOST_KEY_DEFAULT, &same_halves).unwrap_err();
    assert!(err.contains("image_key"));

    let many: Vec<(u64, u64, &[u8])> = (0..=MAX_COMPONENTS as u64)
        .map(|i| (i * 0x1000, i + 1, &d[..]))
        .collect();
    assert!(seal(&many).contains("at most 328"));
    let (h, enc) = seal_image(&many[..MAX_COMPONENTS], &HOST_KEY_DEFAULT, &KEY).unwrap();
    assert_eq!(h.len(), MAX_HEADER_LEN);
    assert_eq!(enc.len(), MAX_COMPONENTS);
    assert_eq!(
        parse_header(&h, &HOST_KEY_DEFAULT)
            .unwrap()
            .components()
            .len(),
        MAX_COMPONENTS
    );
}

#[test]
fn random_image_keys_work_and_differ() {
    let a = random_image_key().unwrap();
    let b = random_image_key().unwrap();
    assert_ne!(a, b);
    assert_ne!(a[..32], a[32..]);
    let (h, enc) = seal_image(&[(0, 3, b"hello")], &HOST_KEY_DEFAULT, &a).unwrap();
    let hdr = parse_header(&h, &HOST_KEY_DEFAULT).unwrap();
    let mut page = enc[0].clone();
    hdr.decrypt_page(3, 0, &mut page);
    assert_eq!(&page[..5], b"hello");
    assert!(page[5..].iter().all(|&b| b == 0));
}

#[test]
fn debug_output_hides_the_key() {
    let s = sample();
    let hdr = parse_header(&s.header, &HOST_KEY_DEFAULT).unwrap();
    let text = format!("{hdr:?}");
    assert!(text.contains("components"));
    assert!(!text.contains("xts"));
}

/// Robustness: no input may panic. Random garbage, prefixes, multi-bit flips, and
/// well-formed-looking headers with random fields.
#[test]
fn parse_never_panics() {
    let s = sample();
    let mut rng = Rng(0x5eed);
    for _ in 0..2000 {
        let n = rng.below(MAX_HEADER_LEN + 200);
        let _ = parse_header(&rng.bytes(n), &HOST_KEY_DEFAULT);
    }
    for n in 0..=s.header.len() {
        let r = parse_header(&s.header[..n], &HOST_KEY_DEFAULT);
        assert_eq!(r.is_ok(), n == s.header.len());
    }
    for _ in 0..3000 {
        let mut h = s.header.clone();
        for _ in 0..1 + rng.below(8) {
            let i = rng.below(h.len());
            h[i] ^= 1 << rng.below(8);
        }
        if h != s.header {
            assert!(parse_header(&h, &HOST_KEY_DEFAULT).is_err());
        }
    }
    // Valid preamble, random count/length/table: reaches the table checks and the unwrap.
    for _ in 0..3000 {
        let count = rng.below(MAX_COMPONENTS + 2);
        let len = 0xf0 + 24 * count + 80;
        let mut h = rng.bytes(len);
        h[..8].copy_from_slice(b"IBMSecEx");
        set_u32(&mut h, 0x08, VERSION);
        set_u32(&mut h, 0x0c, len as u32);
        set_u32(&mut h, 0x10, count as u32);
        set_u32(&mut h, 0x14, 0);
        set_u32(&mut h, 0x2c, 0);
        for i in 0..count {
            let e = 0xf0 + 24 * i;
            if rng.below(2) == 0 {
                // Mostly-plausible entries so overlap/tweak/page-count checks run too.
                set_u64(&mut h, e, (rng.next() & 0xffff) << 12);
                set_u64(&mut h, e + 8, (1 + (rng.next() & 0xf)) << 12);
            }
        }
        let r = parse_header(&h, &HOST_KEY_DEFAULT);
        assert!(r.is_err());
        if len > MAX_HEADER_LEN {
            assert_eq!(r.unwrap_err().rc(), RC_HDR_BAD_LENGTH);
        }
    }
}
