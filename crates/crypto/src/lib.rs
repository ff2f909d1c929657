//! Keys and ciphers of client-side encryption.
//!
//! Owns: the key-encryption key a user gives (KEK: a Kubernetes Secret's
//! `encryptionKey`, or `--key-file`), the per-volume data key it wraps, key
//! ids, the frames objects are sealed in, and the tags that authenticate
//! records kept in the clear. Does not own which objects are sealed (the
//! store layer, `store::sealed`) or where a volume keeps its wrapped key
//! (`volume::keys`).
//!
//! One cipher throughout: XChaCha20-Poly1305. Its nonces are 192 random
//! bits, so writers on different nodes, retries and writers fenced
//! mid-write never need to agree on a counter to keep nonces unique.
//! Every derived key comes from HMAC-SHA256 of its parent under a label,
//! so no key is ever used for two purposes.

use std::fmt;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroize;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a key (KEK or data key).
pub const KEY_LEN: usize = 32;
/// Plain bytes per sealed frame: a ranged read opens only the frames it
/// needs, and a chunk's verify block is one frame.
pub const FRAME: usize = 16 << 10;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// A frame's first byte (more frames follow, or this is the last); part of
/// its associated data, so a cut object whose last frame is not marked so
/// is found.
const MORE: u8 = 0xE4;
const LAST: u8 = 0xE5;
/// Bytes a frame adds: its mark, its nonce, its tag.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// HMAC-SHA256 of `parts` (each length-prefixed, so no two lists collide) under `key`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(key) else { return [0; 32] };
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A user's key-encryption key: it wraps volumes' data keys and never
/// touches data itself.
#[derive(Clone)]
pub struct Kek([u8; KEY_LEN]);

impl Drop for Kek {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({})", self.id())
    }
}

/// Where a key came from, for an error message.
pub const KEY_FORMAT_HELP: &str = "an encryption key is 32 bytes, given as 64 hex digits or in base64 (make one with: head -c 32 /dev/urandom | base64)";

impl Kek {
    /// The key as a Secret or a key file holds it: 64 hex digits, base64
    /// of 32 bytes (either with surrounding whitespace), or 32 raw bytes
    /// that are not all printable text (a random key is so but once in
    /// 10^14). Nothing else: a passphrase would need a slow KDF to be safe,
    /// and a key of the wrong length is more likely a mistake than a choice.
    pub fn parse(raw: &[u8]) -> Result<Kek, String> {
        use base64::Engine;
        let text = std::str::from_utf8(raw).ok().map(str::trim);
        let decoded = match text {
            Some(t) if t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
                (0..KEY_LEN).map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>()
            }
            Some(t) if !t.is_empty() => base64::engine::general_purpose::STANDARD.decode(t).ok(),
            _ => None,
        };
        let mut bytes = match decoded {
            Some(b) if b.len() == KEY_LEN => b,
            _ if raw.len() == KEY_LEN && !raw.iter().all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) => {
                raw.to_vec()
            }
            _ => return Err(format!("not a usable key ({} bytes): {KEY_FORMAT_HELP}", raw.len())),
        };
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&bytes);
        bytes.zeroize();
        if k.iter().all(|&b| b == 0) {
            return Err(format!("the key is all zeros: {KEY_FORMAT_HELP}"));
        }
        Ok(Kek(k))
    }

    /// 16 hex digits that name the key without revealing it: shown by
    /// `volume inspect` and kept beside each wrapped data key, so that a
    /// wrong key is told apart from a damaged one.
    pub fn id(&self) -> String {
        hex(&hmac(&self.0, &[b"s3blk key id 1"])[..8])
    }

    fn wrapping(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&hmac(&self.0, &[b"s3blk key wrap 1"]).into())
    }

    /// Wrap `data` for the volume `uuid`: nonce, sealed key, tag.
    pub fn wrap(&self, data: &DataKey, uuid: &str) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut buf = data.0.raw.to_vec();
        // Encrypting into a Vec of the right size cannot fail.
        let tag = self
            .wrapping()
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &wrap_ad(uuid), &mut buf)
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out.extend_from_slice(&tag);
        buf.zeroize();
        out
    }

    /// The data key `wrapped` holds for `uuid`, or `None` when this key did
    /// not wrap it (or the wrapped key was altered).
    pub fn unwrap(&self, wrapped: &[u8], uuid: &str) -> Option<DataKey> {
        if wrapped.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return None;
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let (sealed, tag) = rest.split_at(KEY_LEN);
        let mut buf = sealed.to_vec();
        self.wrapping()
            .decrypt_in_place_detached(XNonce::from_slice(nonce), &wrap_ad(uuid), &mut buf, Tag::from_slice(tag))
            .ok()?;
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&buf);
        buf.zeroize();
        Some(DataKey::from_bytes(k))
    }
}

fn wrap_ad(uuid: &str) -> Vec<u8> {
    let mut ad = b"s3blk data key 1\0".to_vec();
    ad.extend_from_slice(uuid.as_bytes());
    ad
}

/// A volume's data key: drawn at create, shared with its clones (they read
/// its chunks), kept in `volume.json` only wrapped.
#[derive(Clone)]
pub struct DataKey(Box<DataKeyInner>);

#[derive(Clone)]
struct DataKeyInner {
    raw: [u8; KEY_LEN],
    frames: [u8; KEY_LEN],
    tags: [u8; KEY_LEN],
}

impl Drop for DataKeyInner {
    fn drop(&mut self) {
        self.raw.zeroize();
        self.frames.zeroize();
        self.tags.zeroize();
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({})", self.id())
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        DataKey::from_bytes(rand::random())
    }

    fn from_bytes(mut raw: [u8; KEY_LEN]) -> DataKey {
        let inner =
            DataKeyInner { raw, frames: hmac(&raw, &[b"s3blk frames 1"]), tags: hmac(&raw, &[b"s3blk record tags 1"]) };
        raw.zeroize();
        DataKey(Box::new(inner))
    }

    /// Names the data key (not the KEK): a clone's equals its parent's.
    pub fn id(&self) -> String {
        hex(&hmac(&self.0.raw, &[b"s3blk data key id 1"])[..8])
    }

    /// The tag of a record kept in the clear (`volume.json`'s fields, a
    /// snapshot record): 32 hex digits.
    pub fn tag(&self, parts: &[&[u8]]) -> String {
        hex(&hmac(&self.0.tags, parts)[..16])
    }

    pub fn cipher(&self) -> FrameCipher {
        FrameCipher(XChaCha20Poly1305::new(&self.0.frames.into()))
    }
}

/// Seals and opens the frames of objects.
#[derive(Clone)]
pub struct FrameCipher(XChaCha20Poly1305);

impl fmt::Debug for FrameCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FrameCipher")
    }
}

/// Frames of an object of `plain` bytes: at least one, so that an empty
/// object is authenticated too.
pub fn frames(plain: u64) -> u64 {
    plain.div_ceil(FRAME as u64).max(1)
}

/// Stored bytes of a sealed object of `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    plain + frames(plain) * OVERHEAD as u64
}

/// Plain bytes of a sealed object of `stored` bytes; `None` when no object
/// seals to that size.
pub fn plain_len(stored: u64) -> Option<u64> {
    let n = stored.div_ceil((FRAME + OVERHEAD) as u64).max(1);
    let plain = stored.checked_sub(n * OVERHEAD as u64)?;
    (n == 1 || plain > (n - 1) * FRAME as u64).then_some(plain)
}

/// Does `b` begin like a sealed object? (Every object s3blk keeps in the
/// clear begins with an ASCII magic or `{`.)
pub fn looks_sealed(b: &[u8]) -> bool {
    matches!(b.first(), Some(&MORE | &LAST))
}

/// What a frame is bound to: the volume (its uuid), the object's name
/// under the volume's prefix, the frame's place and whether it is last.
fn frame_ad(uuid: &str, name: &str, index: u64, mark: u8) -> Vec<u8> {
    let mut ad = Vec::with_capacity(32 + uuid.len() + name.len());
    ad.extend_from_slice(b"s3blk frame 1\0");
    ad.extend_from_slice(uuid.as_bytes());
    ad.push(0);
    ad.extend_from_slice(name.as_bytes());
    ad.push(0);
    ad.extend_from_slice(&index.to_le_bytes());
    ad.push(mark);
    ad
}

impl FrameCipher {
    /// Seal `plain` as the object `name` of the volume `uuid`.
    pub fn seal(&self, uuid: &str, name: &str, plain: &[u8]) -> Vec<u8> {
        let n = frames(plain.len() as u64) as usize;
        let mut out = Vec::with_capacity(sealed_len(plain.len() as u64) as usize);
        for i in 0..n {
            let piece = &plain[(i * FRAME).min(plain.len())..((i + 1) * FRAME).min(plain.len())];
            let mark = if i + 1 == n { LAST } else { MORE };
            let nonce: [u8; NONCE_LEN] = rand::random();
            out.push(mark);
            out.extend_from_slice(&nonce);
            let start = out.len();
            out.extend_from_slice(piece);
            let ad = frame_ad(uuid, name, i as u64, mark);
            // In place over a slice of the right size: cannot fail.
            let tag = self
                .0
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &ad, &mut out[start..])
                .unwrap_or_default();
            out.extend_from_slice(&tag);
        }
        out
    }

    /// Open `stored`: the frames of the object `name` from frame `first`
    /// on. `whole`: they run to the object's end, whose last frame must
    /// say so (a cut object is found). Otherwise the last may be the
    /// object's end or not. The error says what is wrong.
    pub fn open(&self, uuid: &str, name: &str, first: u64, stored: &[u8], whole: bool) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(stored.len());
        let mut rest = stored;
        let mut i = first;
        if rest.is_empty() {
            return Err("is empty (a sealed object has at least one frame)".into());
        }
        while !rest.is_empty() {
            let take = rest.len().min(FRAME + OVERHEAD);
            let (frame, tail) = rest.split_at(take);
            rest = tail;
            if frame.len() < OVERHEAD {
                return Err(format!("ends inside frame {i} ({} bytes)", frame.len()));
            }
            let mark = frame[0];
            if mark != MORE && mark != LAST {
                return Err(format!("frame {i} is not a sealed frame"));
            }
            let last = mark == LAST;
            if last && !rest.is_empty() {
                return Err(format!("frame {i} says it is the last, but more follow"));
            }
            if !last && (rest.is_empty() && whole || frame.len() < FRAME + OVERHEAD) {
                return Err(format!("is cut short after frame {i}"));
            }
            let (nonce, body) = frame[1..].split_at(NONCE_LEN);
            let (sealed, tag) = body.split_at(body.len() - TAG_LEN);
            let start = out.len();
            out.extend_from_slice(sealed);
            let ad = frame_ad(uuid, name, i, mark);
            if self
                .0
                .decrypt_in_place_detached(XNonce::from_slice(nonce), &ad, &mut out[start..], Tag::from_slice(tag))
                .is_err()
            {
                return Err(format!(
                    "fails authentication in frame {i} (altered, cut, or another object's bytes under this name)"
                ));
            }
            i += 1;
        }
        Ok(out)
    }
}

/// Fuzzing entry: arbitrary bytes opened as sealed frames (whole, and as
/// a range from a later frame), unwrapped as a wrapped key, parsed as a
/// key, their length mapped to a plain length. Nothing may panic, and
/// nothing but a real seal may open.
pub fn fuzz_open(data: &[u8]) {
    let cipher = DataKey::from_bytes([7; KEY_LEN]).cipher();
    let _ = cipher.open("u", "chunks/0/1", 0, data, true);
    let _ = cipher.open("u", "chunks/0/1", 3, data, false);
    let _ = plain_len(data.len() as u64);
    let _ = Kek::parse(data);
    let _ = Kek([9; KEY_LEN]).unwrap(data, "u");
}

/// Seeds for [`fuzz_open`]: objects sealed as it opens them (one frame,
/// and three), and a key wrapped as it unwraps one.
pub fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let cipher = DataKey::from_bytes([7; KEY_LEN]).cipher();
    let text: Vec<u8> = b"sealed s3blk object ".iter().cycle().take(2 * FRAME + 100).copied().collect();
    vec![
        ("sealed-small", cipher.seal("u", "chunks/0/1", &text[..300])),
        ("sealed-frames", cipher.seal("u", "chunks/0/1", &text)),
        ("wrapped-key", Kek([9; KEY_LEN]).wrap(&DataKey::from_bytes([3; KEY_LEN]), "u")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Kek {
        Kek::parse(&[7u8; 32]).unwrap()
    }

    #[test]
    fn keys_parse_from_hex_base64_and_raw_bytes_only() {
        use base64::Engine;
        let raw = [0x9au8; 32];
        let hex_form = hex(&raw);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        for given in [raw.to_vec(), hex_form.clone().into_bytes(), format!("  {hex_form}\n").into_bytes(), b64.into()] {
            assert_eq!(Kek::parse(&given).unwrap().id(), Kek(raw).id());
        }
        for bad in [
            &b"correct horse battery staple"[..],
            b"correct horse battery staple 123",
            b"correct horse battery staple 12\n",
            b"",
            &[0u8; 32],
            &[1u8; 31],
            b"abcd",
        ] {
            let e = Kek::parse(bad).unwrap_err();
            assert!(e.contains("32 bytes"), "{e}");
        }
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_kek_and_volume() {
        let dk = DataKey::generate();
        let w = key().wrap(&dk, "u1");
        assert_eq!(key().unwrap(&w, "u1").unwrap().id(), dk.id());
        assert!(key().unwrap(&w, "u2").is_none());
        assert!(Kek::parse(&[8u8; 32]).unwrap().unwrap(&w, "u1").is_none());
        for i in 0..w.len() {
            let mut bad = w.clone();
            bad[i] ^= 1;
            assert!(key().unwrap(&bad, "u1").is_none(), "flipped byte {i}");
        }
        assert!(key().unwrap(&w[1..], "u1").is_none());
    }

    #[test]
    fn frames_round_trip_and_every_change_is_found() {
        let c = DataKey::generate().cipher();
        for len in [0usize, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 17] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let s = c.seal("u", "chunks/1", &plain);
            assert_eq!(s.len() as u64, sealed_len(len as u64));
            assert_eq!(plain_len(s.len() as u64), Some(len as u64));
            assert!(looks_sealed(&s));
            assert_eq!(c.open("u", "chunks/1", 0, &s, true).unwrap(), plain);
            // Another name, volume or key.
            assert!(c.open("u", "chunks/2", 0, &s, true).is_err());
            assert!(c.open("v", "chunks/1", 0, &s, true).is_err());
            assert!(DataKey::generate().cipher().open("u", "chunks/1", 0, &s, true).is_err());
            // A cut at a frame's end, or anywhere.
            for cut in [s.len() - 1, s.len().saturating_sub(FRAME + OVERHEAD), 1] {
                if cut > 0 && cut < s.len() {
                    assert!(c.open("u", "chunks/1", 0, &s[..cut], true).is_err(), "len {len} cut {cut}");
                }
            }
            // Flipped bits (a sample across the object).
            for i in (0..s.len()).step_by(997).chain([s.len() - 1]) {
                let mut bad = s.clone();
                bad[i] ^= 0x10;
                assert!(c.open("u", "chunks/1", 0, &bad, true).is_err(), "len {len} byte {i}");
            }
        }
        // Frames open alone, at their place only.
        let plain: Vec<u8> = (0..3 * FRAME + 5).map(|i| i as u8).collect();
        let s = c.seal("u", "k", &plain);
        let f = FRAME + OVERHEAD;
        assert_eq!(c.open("u", "k", 1, &s[f..2 * f], false).unwrap(), &plain[FRAME..2 * FRAME]);
        assert_eq!(c.open("u", "k", 3, &s[3 * f..], false).unwrap(), &plain[3 * FRAME..]);
        assert!(c.open("u", "k", 2, &s[f..2 * f], false).is_err());
        // Frames swapped within the object.
        let mut swapped = s[f..2 * f].to_vec();
        swapped.extend_from_slice(&s[..f]);
        swapped.extend_from_slice(&s[2 * f..]);
        assert!(c.open("u", "k", 0, &swapped, true).is_err());
        assert_eq!(plain_len(5), None);
        // Two frames whose last would hold nothing: no object seals so.
        assert_eq!(plain_len((FRAME + OVERHEAD + 1) as u64), None);
        assert_eq!(plain_len((FRAME + 2 * OVERHEAD + 1) as u64), Some(FRAME as u64 + 1));
    }

    #[test]
    fn ids_and_tags_name_keys_without_revealing_them() {
        let k = key();
        assert_eq!(k.id().len(), 16);
        assert!(!format!("{k:?}").contains("0707"));
        let dk = DataKey::generate();
        assert_ne!(dk.id(), DataKey::generate().id());
        assert_eq!(dk.tag(&[b"a", b"bc"]), dk.tag(&[b"a", b"bc"]));
        assert_ne!(dk.tag(&[b"a", b"bc"]), dk.tag(&[b"ab", b"c"]));
        assert_ne!(dk.tag(&[b"a"]), DataKey::generate().tag(&[b"a"]));
    }
}
