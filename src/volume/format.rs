//! The on-store format of one volume, under `<prefix>/<volume>/`:
//!
//! | object | written | content |
//! |---|---|---|
//! | `volume.json` | once, `If-None-Match: *` | [`VolumeMeta`] |
//! | `chunks/<index:016x>/<generation:016x>` | never overwritten | one chunk's bytes |
//! | `journal/<seq:020x>` | `If-None-Match: *` | one [`JournalRecord`] (format 2: with inline pages) |
//! | `checkpoints/<seq:020x>` | by compaction and writers | the whole [`ChunkMap`] at `seq`, and its [`Patches`] |
//! | `snapshots/<name>.json` | once, `If-None-Match: *` | [`SnapshotRecord`] |
//!
//! Chunk checksums (crc32c) live in the chunk map, i.e. in the journal record
//! that commits the chunk, not in object metadata: the reference is then
//! authoritative (it also catches an intact object under the wrong name) and
//! works on every store, including the local directory.
//!
//! Binary records are little-endian, start with an 8-byte magic and a
//! format version, and end with a crc32c of everything before it.
//!
//! Format 2 adds page patches: a journal record may carry small writes
//! inline ([`InlineWrite`], whole 4 KiB pages), which replay lays over the
//! chunk's stored bytes ([`Patch`]); a checkpoint keeps the patches of its
//! map. A record or checkpoint without patches is still written as
//! version 1, so a volume that never had a small flush stays readable by
//! format-1 readers; the first inline write upgrades it (older readers
//! then refuse it with a version error rather than misread it).
//!
//! Format 4 adds chunk tables: a chunk object of format 4 is the chunk's
//! bytes followed by a crc32c of each [`VERIFY_BLOCK`] of them, and its
//! reference ([`ChunkRef::Stored`] with `table`) holds the crc32c of that
//! table. A read of a few KiB then fetches the table and the blocks it
//! needs, each checked, instead of the whole chunk. Records and
//! checkpoints that reference such a chunk are format 4 (a layout byte per
//! reference); a split checkpoint's manifest stays format 3, which is what
//! marks it as one.
//!
//! Format 5 adds packed chunks, for volumes with `compression` set in
//! `volume.json`: a chunk object that begins with a table of each
//! [`VERIFY_BLOCK`]'s stored length and crc32c, then the blocks, each
//! compressed on its own or as it is ([`Layout::Packed`], [`pack_chunk`]).
//! Records and checkpoints (and parts) referencing one are format 5; their
//! layout byte names the codec.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The newest format this build reads and writes. New volumes get format
/// 4 unless they are compressed (format 5) or encrypted (format 6), so
/// that earlier builds open them.
pub const FORMAT_VERSION: u32 = FORMAT_V6;
/// Objects whose layout format 2 did not change (snapshot records,
/// tombstones, binary objects without patches) keep this version.
pub const FORMAT_V1: u32 = 1;
/// Page patches: journal records with inline writes, checkpoints with patches.
pub const FORMAT_V2: u32 = 2;
/// Split checkpoints: a checkpoint whose map has more than
/// [`CHECKPOINT_PART_ENTRIES`] entries is a manifest plus parts.
pub const FORMAT_V3: u32 = 3;
/// Chunk tables: chunk objects end with a crc32c per [`VERIFY_BLOCK`], and
/// references to them say so.
pub const FORMAT_V4: u32 = 4;
/// Packed chunks: a chunk object compressed block by block
/// ([`Layout::Packed`]), for volumes with `compression` set.
pub const FORMAT_V5: u32 = 5;
/// Encrypted volumes: `volume.json` holds a wrapped data key, and chunks,
/// journal records and checkpoints are sealed (`store::sealed`). Only
/// `volume.json` says so: the objects themselves are those of format 5,
/// sealed. Earlier builds refuse the volume instead of reading ciphertext.
pub const FORMAT_V6: u32 = 6;
/// The bytes one crc32c of a chunk table covers: the least a verified
/// read fetches.
pub const VERIFY_BLOCK: usize = 16 << 10;
/// Chunk map entries per part of a split checkpoint: about 1.7 MB of a
/// dense map, so no object grows with the volume (a 64 TiB volume of 1 MiB
/// chunks has 512 parts) and an open fetches the parts side by side.
pub const CHECKPOINT_PART_ENTRIES: usize = 1 << 17;

static PART_ENTRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(CHECKPOINT_PART_ENTRIES);

/// Split checkpoints into parts of `n` map entries from now on, in this
/// whole process (at least 1): the simulation makes even its small volumes'
/// checkpoints split, to try the parts' races. Readers take any split.
pub fn set_checkpoint_part_entries(n: usize) {
    PART_ENTRIES.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}
pub const BLOCK_SIZE: u32 = 4096;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest volume: 1 EiB keeps every offset arithmetic far from overflow.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;

const JOURNAL_MAGIC: &[u8; 8] = b"S3BLKJR\x01";
const CHECKPOINT_MAGIC: &[u8; 8] = b"S3BLKCP\x01";
const CHECKPOINT_PART_MAGIC: &[u8; 8] = b"S3BLKCX\x01";

/// Errors decoding a stored object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0}: truncated")]
    Truncated(String),
    #[error("{0}: bad magic (not an s3blk object)")]
    BadMagic(String),
    #[error("{what}: format version {found} is newer than this s3blk understands ({FORMAT_VERSION})")]
    Version { what: String, found: u32 },
    #[error("{0}: checksum mismatch")]
    Checksum(String),
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    /// A sealed object read without the volume's key.
    #[error("{0} is encrypted: this needs the volume's key")]
    Encrypted(String),
}

fn invalid(what: &str, detail: impl Into<String>) -> FormatError {
    FormatError::Invalid { what: what.to_string(), detail: detail.into() }
}

// ---------------------------------------------------------------- names

pub fn meta_key(vol: &str) -> String {
    format!("{vol}volume.json")
}
pub fn chunk_prefix(vol: &str) -> String {
    format!("{vol}chunks/")
}
pub fn chunk_key(vol: &str, index: u64, generation: u64) -> String {
    format!("{vol}chunks/{index:016x}/{generation:016x}")
}
pub fn journal_prefix(vol: &str) -> String {
    format!("{vol}journal/")
}
pub fn journal_key(vol: &str, seq: u64) -> String {
    format!("{vol}journal/{seq:020x}")
}
pub fn checkpoint_prefix(vol: &str) -> String {
    format!("{vol}checkpoints/")
}
pub fn checkpoint_key(vol: &str, seq: u64) -> String {
    format!("{vol}checkpoints/{seq:020x}")
}
/// Part `n` of the split checkpoint at `seq` whose manifest names `tag`
/// (each writer of a checkpoint picks its own: two writing the same seq
/// never overwrite each other's parts).
pub fn checkpoint_part_key(vol: &str, seq: u64, tag: u64, n: u32) -> String {
    format!("{vol}checkpoints/{seq:020x}.{tag:016x}.{n:06x}")
}
/// Written and removed at once by compaction to read the store's clock
/// (one name per probe: compactors run side by side).
pub fn clock_probe_key(vol: &str, nonce: u64) -> String {
    format!("{vol}{CLOCK_PROBE_STEM}{nonce:016x}")
}
/// The clock probe's name under a volume is this stem and 16 hex digits.
pub const CLOCK_PROBE_STEM: &str = ".s3blk-clock-";
/// What a clock probe holds.
pub const CLOCK_PROBE_BODY: &[u8] = b"s3blk clock probe";
pub fn snapshot_prefix(vol: &str) -> String {
    format!("{vol}snapshots/")
}
pub fn snapshot_key(vol: &str, name: &str) -> String {
    format!("{vol}snapshots/{name}.json")
}
/// The volume's own name: the last segment of its prefix.
pub fn volume_name(vol: &str) -> &str {
    vol.trim_end_matches('/').rsplit('/').next().unwrap_or_default()
}
/// Markers of the clones that read through this volume's snapshots.
pub fn clones_prefix(vol: &str) -> String {
    format!("{vol}clones/")
}
/// The marker `parent` keeps for the clone under `clone_vol`.
pub fn clone_marker_key(parent: &str, clone_vol: &str) -> String {
    format!("{parent}clones/{}.json", volume_name(clone_vol))
}
/// How the names of clones' pins begin.
pub const CLONE_PIN_PREFIX: &str = "clone-";

/// The snapshot of the parent that pins a clone's source.
pub fn clone_pin_name(clone_vol: &str) -> String {
    format!("{CLONE_PIN_PREFIX}{}", volume_name(clone_vol))
}

/// Is `s` exactly `width` lowercase hex digits, as s3blk writes numbers
/// into names? Nothing else is one of its names: `A` in place of `a`, a
/// sign or another width is another program's object, never to be read
/// as, or deleted for, the number it resembles.
pub fn is_lower_hex(s: &str, width: usize) -> bool {
    s.len() == width && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_hex_tail(key: &str, prefix: &str, width: usize) -> Option<u64> {
    let tail = key.strip_prefix(prefix)?;
    if !is_lower_hex(tail, width) {
        return None;
    }
    u64::from_str_radix(tail, 16).ok()
}

/// `journal/<seq>` → seq.
pub fn parse_journal_key(vol: &str, key: &str) -> Option<u64> {
    parse_hex_tail(key, &journal_prefix(vol), 20)
}
/// `checkpoints/<seq>` → seq.
pub fn parse_checkpoint_key(vol: &str, key: &str) -> Option<u64> {
    parse_hex_tail(key, &checkpoint_prefix(vol), 20)
}
/// `checkpoints/<seq>.<tag>.<n>` → (seq, tag, n).
pub fn parse_checkpoint_part_key(vol: &str, key: &str) -> Option<(u64, u64, u32)> {
    let tail = key.strip_prefix(&checkpoint_prefix(vol))?;
    let mut it = tail.split('.');
    let (seq, tag, n) = (it.next()?, it.next()?, it.next()?);
    let hex = |s: &str, w: usize| is_lower_hex(s, w).then_some(());
    hex(seq, 20)?;
    hex(tag, 16)?;
    hex(n, 6)?;
    if it.next().is_some() {
        return None;
    }
    Some((u64::from_str_radix(seq, 16).ok()?, u64::from_str_radix(tag, 16).ok()?, u32::from_str_radix(n, 16).ok()?))
}
/// `chunks/<index>/<generation>` → (index, generation).
pub fn parse_chunk_key(vol: &str, key: &str) -> Option<(u64, u64)> {
    let tail = key.strip_prefix(&chunk_prefix(vol))?;
    let (i, g) = tail.split_once('/')?;
    if !is_lower_hex(i, 16) || !is_lower_hex(g, 16) {
        return None;
    }
    Some((u64::from_str_radix(i, 16).ok()?, u64::from_str_radix(g, 16).ok()?))
}

/// Snapshot names become object names: keep them to a safe alphabet.
pub fn validate_snapshot_name(name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "snapshot name",
            format!("{name:?} must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'"),
        ))
    }
}

// ---------------------------------------------------------------- generations

/// A chunk generation is unique per writer: the high bits are the writer's
/// epoch (the journal seq of its open record, unique because that record was
/// created conditionally), the low bits a counter. Two writers can therefore
/// never upload the same chunk object name, so chunks are never overwritten.
pub const GENERATION_COUNTER_BITS: u32 = 36;

/// A writer's counter stays below this, so no generation is ever the
/// reserved ZERO value.
pub const MAX_GENERATION_COUNTER: u64 = (1 << GENERATION_COUNTER_BITS) - 2;

/// The generation for a writer's `counter`th upload. Past 2^28 epochs the
/// high bits repeat, so names are unique by the writer's counter and epoch
/// only up to there; what makes them collision-free in every case is that
/// chunk objects are created with `If-None-Match: *` and a taken name is
/// never overwritten (the writer takes the next one).
pub fn generation(epoch: u64, counter: u64) -> u64 {
    const EPOCH_BITS: u32 = 64 - GENERATION_COUNTER_BITS;
    ((epoch & ((1 << EPOCH_BITS) - 1)) << GENERATION_COUNTER_BITS) | (counter & ((1 << GENERATION_COUNTER_BITS) - 1))
}

pub fn generation_epoch(generation: u64) -> u64 {
    generation >> GENERATION_COUNTER_BITS
}

// ---------------------------------------------------------------- volume.json

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// The parent volume's key prefix in the same store (ends with `/`).
    pub volume: String,
    pub snapshot: String,
    /// The journal seq the snapshot pins.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub format_version: u32,
    /// Random id, distinguishes a volume from another created later under the same name.
    pub uuid: String,
    /// Size at creation; the current size is in the journal.
    pub size: u64,
    pub chunk_size: u32,
    pub block_size: u32,
    pub checksum: String,
    pub created_unix: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The store did not honour conditional writes and the user accepted
    /// single-writer mode: no fencing.
    #[serde(default)]
    pub single_writer: bool,
    /// How this volume's writers store chunks (format 5): compressed block
    /// by block with this codec, where that saves at least an eighth.
    /// Readers need no setting: each chunk's reference says how it is
    /// stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Codec>,
    /// Encrypted (format 6): the wrapped data key and what names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// A clone being flattened or flattened (`volume::catalog::let_go_of_parent`):
    /// from which seq of this volume on its own chunks cover all its parent
    /// gave it, and what the parent was. Beside `parent` while the parent
    /// is still kept (for snapshots of earlier seqs); alone once it was let
    /// go of. Earlier builds ignore it (an unencrypted flattened clone then
    /// opens as a volume without parent, which reads the same; an encrypted
    /// one fails its tag there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flattened: Option<FlattenedFrom>,
}

/// A flatten's record in `volume.json` ([`VolumeMeta::flattened`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlattenedFrom {
    /// The parent reference the clone had.
    pub parent: ParentRef,
    /// A journal seq of this volume whose map covers every chunk the
    /// parent chain gave it (and so every later one does): a snapshot (or
    /// a clone's pin) of an earlier seq needs the parent, which is let go
    /// of only while none is kept, and none is taken from then on.
    pub seq: u64,
}

/// The only cipher: XChaCha20-Poly1305 (`crypto`).
pub const CIPHER: &str = "xchacha20poly1305";

/// How an encrypted volume keeps its data key (`volume::keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub cipher: String,
    /// The id of the key-encryption key that wrapped the data key (never the key).
    pub key_id: String,
    /// The data key's id: the same for a volume and its clones.
    pub data_key_id: String,
    /// The data key, wrapped (base64 of nonce, sealed key, tag).
    pub wrapped_key: String,
    /// This file's other fields, authenticated under the data key.
    pub tag: String,
}

/// A compression codec for chunk objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// LZ4 (block format): fast, modest ratio.
    Lz4,
    /// Zstandard, level 3: a better ratio for more CPU.
    Zstd,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    /// `lz4`, `zstd` or `none` (`None`), as the StorageClass and the CLI say it.
    pub fn parse(s: &str) -> Result<Option<Codec>, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lz4" => Ok(Some(Codec::Lz4)),
            "zstd" => Ok(Some(Codec::Zstd)),
            "none" | "" => Ok(None),
            other => Err(format!("unknown compression {other:?} (lz4, zstd or none)")),
        }
    }
}

impl VolumeMeta {
    pub fn validate(&self) -> Result<(), FormatError> {
        let w = "volume.json";
        if self.format_version > FORMAT_VERSION {
            return Err(FormatError::Version { what: w.into(), found: self.format_version });
        }
        if self.format_version == 0 {
            return Err(invalid(w, "format_version 0"));
        }
        check_chunk_size(self.chunk_size).map_err(|d| invalid(w, d))?;
        if self.block_size != BLOCK_SIZE {
            return Err(invalid(w, format!("block_size {} (expected {BLOCK_SIZE})", self.block_size)));
        }
        check_size(self.size).map_err(|d| invalid(w, d))?;
        if self.compression.is_some() && self.format_version < FORMAT_V5 {
            return Err(invalid(w, format!("compression in a format-{} volume", self.format_version)));
        }
        match &self.encryption {
            Some(_) if self.format_version < FORMAT_V6 => {
                return Err(invalid(w, format!("encryption in a format-{} volume", self.format_version)));
            }
            Some(e) if e.cipher != CIPHER => {
                return Err(invalid(w, format!("unknown cipher {:?} (this build knows {CIPHER})", e.cipher)));
            }
            None if self.format_version >= FORMAT_V6 => {
                return Err(invalid(w, "a format-6 volume without its encryption"));
            }
            _ => {}
        }
        if self.checksum != "crc32c" {
            return Err(invalid(w, format!("unknown checksum algorithm {:?}", self.checksum)));
        }
        if let (Some(p), Some(f)) = (&self.parent, &self.flattened)
            && *p != f.parent
        {
            return Err(invalid(w, "a parent and another flattened parent"));
        }
        Ok(())
    }

    /// The volume it was cloned from, flattened or not.
    pub fn source(&self) -> Option<&ParentRef> {
        self.parent.as_ref().or(self.flattened.as_ref().map(|f| &f.parent))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let meta: VolumeMeta = serde_json::from_slice(bytes).map_err(|e| {
            if e.is_eof() {
                FormatError::Truncated("volume.json".into())
            } else {
                invalid("volume.json", e.to_string())
            }
        })?;
        meta.validate()?;
        Ok(meta)
    }
}

pub fn check_chunk_size(cs: u32) -> Result<(), String> {
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(format!("chunk size {cs} must be a power of two between 64 KiB and 64 MiB"));
    }
    Ok(())
}

pub fn check_size(size: u64) -> Result<(), String> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) || size > MAX_VOLUME_SIZE {
        return Err(format!("size {size} must be a non-zero multiple of {BLOCK_SIZE} bytes, at most 1 EiB"));
    }
    Ok(())
}

// ---------------------------------------------------------------- snapshots

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub format_version: u32,
    pub name: String,
    /// The journal seq whose state the snapshot is.
    pub seq: u64,
    pub size: u64,
    pub created_unix: i64,
    /// Drawn at random by each taking of a snapshot: tells a record this
    /// call wrote (its PUT landed, the answer was lost, the retry found it)
    /// from one of the same name another call wrote at the same seq and
    /// second. Records of earlier versions, and pins, have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// A clone's pin: the clone it was made for, as its clone marker names
    /// it. Pins are named by the clone's last path segment, so clones of
    /// one name in different folders take the same name in turn; this
    /// tells whose pin is there. Pins of earlier versions, and snapshots,
    /// have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<String>,
    /// An encrypted volume's records are authenticated: the tag of the
    /// fields above and the record's name under the data key
    /// (`volume::keys`). Records of unencrypted volumes have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

impl SnapshotRecord {
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self, FormatError> {
        let r: SnapshotRecord = serde_json::from_slice(bytes).map_err(|e| invalid(what, e.to_string()))?;
        if r.format_version > FORMAT_VERSION {
            return Err(FormatError::Version { what: what.into(), found: r.format_version });
        }
        Ok(r)
    }
}

// ---------------------------------------------------------------- chunk map

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros; no object.
    Zero,
    /// `chunks/<index>/<generation>`. Without `table`, the object is the
    /// chunk's bytes and `crc` their crc32c; with it (format 4), the
    /// object is the bytes and then their table ([`chunk_table`]), and
    /// `crc` is the table's crc32c.
    Stored { generation: u64, crc: u32, layout: Layout },
}

/// How a chunk object holds the chunk's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The bytes alone; the reference's crc is theirs.
    Whole,
    /// The bytes, then their table ([`chunk_table`], format 4); the
    /// reference's crc is the table's.
    Table,
    /// A table of (stored length, crc32c of the block's bytes) per
    /// [`VERIFY_BLOCK`], then each block compressed with the codec, or as
    /// it is where that does not make it smaller ([`pack_chunk`], format
    /// 5); the reference's crc is the table's.
    Packed(Codec),
}

impl ChunkRef {
    /// Format 4 and later: a table, so that a range of blocks can be read and checked alone.
    pub fn has_table(&self) -> bool {
        matches!(self, ChunkRef::Stored { layout: Layout::Table | Layout::Packed(_), .. })
    }

    fn packed(&self) -> bool {
        matches!(self, ChunkRef::Stored { layout: Layout::Packed(_), .. })
    }
}

/// Bytes of the table that ends a format-4 chunk object of `chunk_size`.
pub fn table_len(chunk_size: u64) -> u64 {
    chunk_size.div_ceil(VERIFY_BLOCK as u64) * 4
}

/// The table of a chunk's bytes (format 4: its object is the bytes, then
/// this), and the table's crc32c for its reference.
pub fn chunk_table(data: &[u8]) -> (Bytes, u32) {
    let mut table = Vec::with_capacity(data.len().div_ceil(VERIFY_BLOCK) * 4);
    for block in data.chunks(VERIFY_BLOCK) {
        table.extend_from_slice(&crc32c::crc32c(block).to_le_bytes());
    }
    let crc = crc32c::crc32c(&table);
    (Bytes::from(table), crc)
}

/// Check a whole chunk object fetched for `r` (a [`ChunkRef::Stored`]) and
/// give back the chunk's bytes (without the table, sharing the object's
/// memory). The error says what is wrong, for a "damaged" message.
pub fn check_chunk(obj: Bytes, r: ChunkRef, chunk_size: u64) -> Result<Bytes, String> {
    let ChunkRef::Stored { crc, layout, .. } = r else {
        return Err("a zero chunk has no object".into());
    };
    if let Layout::Packed(codec) = layout {
        return unpack_chunk(&obj, codec, crc, chunk_size).map(Bytes::from);
    }
    let table = layout == Layout::Table;
    let want = chunk_size + if table { table_len(chunk_size) } else { 0 };
    if obj.len() as u64 != want {
        return Err(format!("has {} bytes, expected {want}", obj.len()));
    }
    if !table {
        let actual = crc32c::crc32c(&obj);
        if actual != crc {
            return Err(format!("fails its checksum (crc32c {actual:08x}, expected {crc:08x})"));
        }
        return Ok(obj);
    }
    let crcs = check_table(&obj[chunk_size as usize..], crc, chunk_size)?;
    let data = obj.slice(..chunk_size as usize);
    check_blocks(&crcs, 0, &data)?;
    Ok(data)
}

/// Check a chunk table (as fetched: [`table_len`] bytes after the chunk's
/// bytes) against its reference's `crc`, and give back its entries.
pub fn check_table(bytes: &[u8], crc: u32, chunk_size: u64) -> Result<Vec<u32>, String> {
    if bytes.len() as u64 != table_len(chunk_size) {
        return Err(format!("has a table of {} bytes, expected {}", bytes.len(), table_len(chunk_size)));
    }
    let actual = crc32c::crc32c(bytes);
    if actual != crc {
        return Err(format!("has a table that fails its checksum (crc32c {actual:08x}, expected {crc:08x})"));
    }
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Check `data`, the chunk's bytes from block `first` on (whole blocks,
/// the chunk's last one possibly short), against the table's entries.
pub fn check_blocks(crcs: &[u32], first: usize, data: &[u8]) -> Result<(), String> {
    for (n, block) in data.chunks(VERIFY_BLOCK).enumerate() {
        let i = first + n;
        let want = crcs.get(i).copied().ok_or_else(|| format!("has no table entry for block {i}"))?;
        let actual = crc32c::crc32c(block);
        if actual != want {
            return Err(format!(
                "fails its checksum in block {i} at byte {} (crc32c {actual:08x}, expected {want:08x})",
                i * VERIFY_BLOCK
            ));
        }
    }
    Ok(())
}

/// Bytes of the table that begins a packed chunk object of `chunk_size`.
pub fn packed_table_len(chunk_size: u64) -> u64 {
    chunk_size.div_ceil(VERIFY_BLOCK as u64) * 8
}

/// The table of a packed chunk: per block, the bytes it takes in the
/// object (its own length where it is stored as it is) and the crc32c of
/// its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedTable {
    pub stored: Vec<u32>,
    pub crcs: Vec<u32>,
}

/// Where block `i`'s stored bytes begin in a packed object whose table
/// gives `stored` (`i` up to the number of blocks: the object's end).
pub fn packed_offset(stored: &[u32], i: usize) -> u64 {
    (stored.len() * 8) as u64 + stored[..i.min(stored.len())].iter().map(|&n| n as u64).sum::<u64>()
}

/// The length of block `i` of a chunk of `chunk_size` (the last may be short).
fn block_len(chunk_size: u64, i: usize) -> usize {
    (chunk_size as usize - i * VERIFY_BLOCK).min(VERIFY_BLOCK)
}

fn compress_block(codec: Codec, block: &[u8], zstd: &mut Option<zstd::bulk::Compressor<'static>>) -> Option<Vec<u8>> {
    match codec {
        Codec::Lz4 => Some(lz4_flex::block::compress(block)),
        Codec::Zstd => {
            if zstd.is_none() {
                *zstd = zstd::bulk::Compressor::new(3).ok();
            }
            zstd.as_mut()?.compress(block).ok()
        }
    }
}

/// A chunk's bytes as a packed object ([`Layout::Packed`]) and its table's
/// crc32c, or `None` when packing saves less than an eighth of them (the
/// chunk is then stored as it is).
pub fn pack_chunk(data: &[u8], codec: Codec) -> Option<(Bytes, u32)> {
    let blocks = data.len().div_ceil(VERIFY_BLOCK);
    let limit = data.len() * 7 / 8;
    // One buffer: the table's room first, filled in as the blocks follow.
    let mut obj = vec![0u8; blocks * 8];
    obj.reserve(limit.saturating_sub(obj.len()));
    let mut zstd = None;
    for (i, block) in data.chunks(VERIFY_BLOCK).enumerate() {
        let packed = compress_block(codec, block, &mut zstd).filter(|c| c.len() < block.len());
        let stored = packed.as_deref().unwrap_or(block);
        obj[i * 8..i * 8 + 4].copy_from_slice(&(stored.len() as u32).to_le_bytes());
        obj[i * 8 + 4..i * 8 + 8].copy_from_slice(&crc32c::crc32c(block).to_le_bytes());
        // Past what is worth it already: what follows only adds.
        if obj.len() + stored.len() > limit {
            return None;
        }
        obj.extend_from_slice(stored);
    }
    let crc = crc32c::crc32c(&obj[..blocks * 8]);
    Some((Bytes::from(obj), crc))
}

/// Check a packed chunk's table (the object's first [`packed_table_len`]
/// bytes) against its reference's `crc`.
pub fn check_packed_table(bytes: &[u8], crc: u32, chunk_size: u64) -> Result<PackedTable, String> {
    if bytes.len() as u64 != packed_table_len(chunk_size) {
        return Err(format!("has a table of {} bytes, expected {}", bytes.len(), packed_table_len(chunk_size)));
    }
    let actual = crc32c::crc32c(bytes);
    if actual != crc {
        return Err(format!("has a table that fails its checksum (crc32c {actual:08x}, expected {crc:08x})"));
    }
    let mut t = PackedTable { stored: Vec::with_capacity(bytes.len() / 8), crcs: Vec::with_capacity(bytes.len() / 8) };
    for (i, e) in bytes.chunks_exact(8).enumerate() {
        let stored = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        if stored == 0 || stored as usize > block_len(chunk_size, i) {
            return Err(format!("has a table entry of {stored} bytes for block {i}"));
        }
        t.stored.push(stored);
        t.crcs.push(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
    }
    Ok(t)
}

/// The bytes of blocks `first..` of a packed chunk from `data`, their
/// stored bytes as fetched (whole blocks, in order), each unpacked and
/// checked against the table.
pub fn unpack_blocks(
    codec: Codec,
    (stored, crcs): (&[u32], &[u32]),
    chunk_size: u64,
    first: usize,
    data: &[u8],
) -> Result<Vec<u8>, String> {
    // Room for the blocks `data` holds whole, no more.
    let whole = stored
        .iter()
        .skip(first)
        .scan(0usize, |n, &l| {
            *n += l as usize;
            (*n <= data.len()).then_some(())
        })
        .count();
    let mut out = Vec::with_capacity(whole * VERIFY_BLOCK);
    let mut pos = 0usize;
    let mut zstd = None;
    let mut i = first;
    while pos < data.len() {
        let (Some(&len), Some(&want)) = (stored.get(i), crcs.get(i)) else {
            return Err(format!("has more bytes than its table gives blocks (block {i})"));
        };
        let raw = block_len(chunk_size, i);
        let Some(src) = data.get(pos..pos + len as usize) else {
            return Err(format!("is cut short in block {i}"));
        };
        let start = out.len();
        out.resize(start + raw, 0);
        if len as usize == raw {
            out[start..].copy_from_slice(src);
        } else {
            let n = match codec {
                Codec::Lz4 => lz4_flex::block::decompress_into(src, &mut out[start..]).map_err(|e| e.to_string()),
                Codec::Zstd => {
                    if zstd.is_none() {
                        zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                    }
                    match zstd.as_mut() {
                        Some(d) => d.decompress_to_buffer(src, &mut out[start..]).map_err(|e| e.to_string()),
                        None => Err("no decompressor".into()),
                    }
                }
            };
            match n {
                Ok(n) if n == raw => {}
                Ok(n) => return Err(format!("unpacks block {i} to {n} bytes, expected {raw}")),
                Err(e) => return Err(format!("does not unpack in block {i} ({} {e})", codec.name())),
            }
        }
        let actual = crc32c::crc32c(&out[start..]);
        if actual != want {
            return Err(format!(
                "fails its checksum in block {i} at byte {} (crc32c {actual:08x}, expected {want:08x})",
                i * VERIFY_BLOCK
            ));
        }
        pos += len as usize;
        i += 1;
    }
    Ok(out)
}

/// Check a whole packed chunk object and give back the chunk's bytes.
pub fn unpack_chunk(obj: &[u8], codec: Codec, crc: u32, chunk_size: u64) -> Result<Vec<u8>, String> {
    let tl = packed_table_len(chunk_size) as usize;
    let Some(head) = obj.get(..tl) else {
        return Err(format!("has {} bytes, less than its table", obj.len()));
    };
    let table = check_packed_table(head, crc, chunk_size)?;
    let want = packed_offset(&table.stored, table.stored.len());
    if obj.len() as u64 != want {
        return Err(format!("has {} bytes, its table gives {want}", obj.len()));
    }
    unpack_blocks(codec, (&table.stored, &table.crcs), chunk_size, 0, &obj[tl..])
}

/// Fuzz entry point: every decoder of stored objects over arbitrary
/// bytes, and the chunk decoders of every layout, with a reference crc
/// that does and one that does not match. None may panic, nor allocate
/// more than the chunk size asks.
pub fn fuzz_decode(data: &[u8]) {
    crate::crypto::fuzz_open(data);
    let _ = VolumeMeta::decode(data);
    let _ = SnapshotRecord::decode(data, "fuzz");
    let _ = JournalRecord::decode(data, "fuzz");
    if let Ok(StoredCheckpoint::Split(m)) = StoredCheckpoint::decode(data, "fuzz") {
        let mut into = m.assembly();
        for n in 0..m.parts.len().min(4) {
            let _ = m.decode_part(n, data, "fuzz", &mut into);
        }
    }
    // The first byte picks a chunk size from 64 KiB to 1 MiB; the rest is the object.
    let Some((&pick, obj)) = data.split_first() else { return };
    let cs = (MIN_CHUNK_SIZE as u64) << (pick % 5);
    let tl = packed_table_len(cs) as usize;
    let table_crc = obj.get(..tl).map_or(0, crc32c::crc32c);
    let obj = Bytes::copy_from_slice(obj);
    for layout in [Layout::Whole, Layout::Table, Layout::Packed(Codec::Lz4), Layout::Packed(Codec::Zstd)] {
        for crc in [table_crc, crc32c::crc32c(&obj), 0] {
            let _ = check_chunk(obj.clone(), ChunkRef::Stored { generation: 1, crc, layout }, cs);
        }
    }
    if let Some(head) = obj.get(..tl)
        && let Ok(t) = check_packed_table(head, table_crc, cs)
    {
        for first in [0, t.stored.len() / 2] {
            let from = (packed_offset(&t.stored, first) as usize).min(obj.len());
            for codec in [Codec::Lz4, Codec::Zstd] {
                let _ = unpack_blocks(codec, (&t.stored, &t.crcs), cs, first, &obj[from..]);
            }
        }
    }
}

const ZERO_GENERATION: u64 = u64::MAX;

/// The chunk map: chunk index → where its bytes are. An index absent from
/// the map reads as the parent's chunk for a clone, zeros otherwise.
/// Memory is proportional to mapped chunks only.
pub type ChunkMap = BTreeMap<u64, ChunkRef>;

// ---------------------------------------------------------------- binary codec

struct Writer(Vec<u8>);

impl Writer {
    fn new(magic: &[u8; 8], version: u32) -> Self {
        let mut w = Writer(Vec::with_capacity(64));
        w.0.extend_from_slice(magic);
        w.u32(version);
        w
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.0);
        self.u32(crc);
        self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
    version: u32,
}

impl<'a> Reader<'a> {
    /// Check magic, version and trailing checksum; position after the header.
    fn open(buf: &'a [u8], magic: &[u8; 8], what: &'a str) -> Result<Self, FormatError> {
        if crate::crypto::looks_sealed(buf) {
            return Err(FormatError::Encrypted(what.into()));
        }
        if buf.len() < 16 {
            return Err(FormatError::Truncated(what.into()));
        }
        if &buf[..8] != magic {
            return Err(FormatError::BadMagic(what.into()));
        }
        let (body, tail) = buf.split_at(buf.len() - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let mut r = Reader { buf: body, pos: 8, what, version: 0 };
        let version = r.u32()?;
        if version > FORMAT_VERSION || version == 0 {
            return Err(FormatError::Version { what: what.into(), found: version });
        }
        r.version = version;
        if crc32c::crc32c(body) != stored {
            return Err(FormatError::Checksum(what.into()));
        }
        Ok(r)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| FormatError::Truncated(self.what.into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(invalid(self.what, "varint too long"))
    }
    /// A count of items of at least `min_item` bytes each: bounded by what
    /// is left, so a corrupt count can never make us allocate wildly.
    fn count(&mut self, min_item: usize) -> Result<usize, FormatError> {
        let n = self.varint()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(FormatError::Truncated(self.what.into()));
        }
        Ok(n as usize)
    }
    fn done(&self) -> Result<(), FormatError> {
        if self.pos != self.buf.len() {
            return Err(invalid(self.what, "trailing bytes"));
        }
        Ok(())
    }
}

/// The version an object holding these references needs at least: format
/// 5 when one of them is packed, 4 when one has a table, else `base`.
fn refs_version<'a>(base: u32, refs: impl Iterator<Item = &'a ChunkRef>) -> u32 {
    let mut v = base;
    for r in refs {
        if r.packed() {
            return FORMAT_V5;
        }
        if r.has_table() {
            v = FORMAT_V4;
        }
    }
    v
}

/// A reference; in a format-4 object a stored one ends with a layout byte
/// (0: whole, 1: with a table; format 5: 2 packed with lz4, 3 with zstd).
fn put_ref(w: &mut Writer, r: &ChunkRef, version: u32) {
    match r {
        ChunkRef::Zero => w.u64(ZERO_GENERATION),
        ChunkRef::Stored { generation, crc, layout } => {
            w.u64(*generation);
            w.u32(*crc);
            if version >= FORMAT_V4 {
                w.u8(match layout {
                    Layout::Whole => 0,
                    Layout::Table => 1,
                    Layout::Packed(Codec::Lz4) => 2,
                    Layout::Packed(Codec::Zstd) => 3,
                });
            }
        }
    }
}

fn get_ref(r: &mut Reader<'_>) -> Result<ChunkRef, FormatError> {
    let generation = r.u64()?;
    if generation == ZERO_GENERATION {
        return Ok(ChunkRef::Zero);
    }
    let crc = r.u32()?;
    let layout = match r.version {
        v if v < FORMAT_V4 => Layout::Whole,
        v => match r.u8()? {
            0 => Layout::Whole,
            1 => Layout::Table,
            2 if v >= FORMAT_V5 => Layout::Packed(Codec::Lz4),
            3 if v >= FORMAT_V5 => Layout::Packed(Codec::Zstd),
            l => return Err(invalid(r.what, format!("unknown chunk layout {l}"))),
        },
    };
    Ok(ChunkRef::Stored { generation, crc, layout })
}

// ---------------------------------------------------------------- journal

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Written by `volume create`: seq 0, the initial size.
    Create = 0,
    /// A writer attached: its epoch is this record's seq. Fences older writers.
    Open = 1,
    /// Chunks and/or size committed by a flush.
    Commit = 2,
}

/// One page written inside the record itself (format 2): a small flush
/// costs the journal PUT alone. Replay applies them after the record's
/// chunk entries, over the chunk's stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineWrite {
    /// Volume byte offset, a multiple of [`BLOCK_SIZE`].
    pub offset: u64,
    /// [`BLOCK_SIZE`] bytes; `None`: zeros.
    pub data: Option<Bytes>,
}

/// Pages laid over a chunk's stored bytes by inline writes since the chunk
/// was last stored whole: page index within the chunk → its bytes
/// (`None`: zeros). A chunk entry in a later record replaces the patch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch {
    pub pages: BTreeMap<u32, Option<Bytes>>,
}

impl Patch {
    /// Bytes the patch stands for (zero pages count too: they are pages
    /// that must be folded some day).
    pub fn bytes(&self) -> u64 {
        self.pages.len() as u64 * BLOCK_SIZE as u64
    }

    /// Lay the pages over a chunk's bytes.
    pub fn apply(&self, chunk: &mut [u8]) {
        let bs = BLOCK_SIZE as usize;
        for (page, data) in &self.pages {
            let at = *page as usize * bs;
            let Some(dst) = chunk.get_mut(at..at + bs) else { continue };
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
    }
}

/// Chunk index → its patch. Shared (`Arc`) so that a map can be copied
/// cheaply and a reader can tell a patch changed under it.
pub type Patches = BTreeMap<u64, Arc<Patch>>;

fn put_page(w: &mut Writer, data: &Option<Bytes>) {
    match data {
        None => w.u8(0),
        Some(d) => {
            w.u8(1);
            w.0.extend_from_slice(d);
        }
    }
}

fn get_page(r: &mut Reader<'_>) -> Result<Option<Bytes>, FormatError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(Bytes::copy_from_slice(r.take(BLOCK_SIZE as usize)?))),
        f => Err(invalid(r.what, format!("unknown page kind {f}"))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    pub kind: RecordKind,
    pub seq: u64,
    /// The writer's epoch (seq of its Open record; 0 for Create).
    pub epoch: u64,
    /// Volume size after this record.
    pub size: u64,
    /// Random per-writer nonce: tells our own record from another writer's
    /// when a retried conditional PUT answers 412.
    pub writer: u64,
    pub created_unix: i64,
    pub chunks: Vec<(u64, ChunkRef)>,
    pub inline: Vec<InlineWrite>,
}

impl JournalRecord {
    pub fn encode(&self) -> Vec<u8> {
        let base = if self.inline.is_empty() { FORMAT_V1 } else { FORMAT_V2 };
        let version = refs_version(base, self.chunks.iter().map(|(_, r)| r));
        let mut w = Writer::new(JOURNAL_MAGIC, version);
        w.u8(self.kind as u8);
        w.u64(self.seq);
        w.u64(self.epoch);
        w.u64(self.size);
        w.u64(self.writer);
        w.u64(self.created_unix as u64);
        w.varint(self.chunks.len() as u64);
        for (index, r) in &self.chunks {
            w.u64(*index);
            put_ref(&mut w, r, version);
        }
        w.varint(self.inline.len() as u64);
        for iw in &self.inline {
            w.u64(iw.offset);
            put_page(&mut w, &iw.data);
        }
        w.finish()
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Self, FormatError> {
        let mut r = Reader::open(bytes, JOURNAL_MAGIC, what)?;
        let kind = match r.u8()? {
            0 => RecordKind::Create,
            1 => RecordKind::Open,
            2 => RecordKind::Commit,
            k => return Err(invalid(what, format!("unknown record kind {k}"))),
        };
        let seq = r.u64()?;
        let epoch = r.u64()?;
        let size = r.u64()?;
        let writer = r.u64()?;
        let created_unix = r.u64()? as i64;
        let n = r.count(16)?;
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            let index = r.u64()?;
            chunks.push((index, get_ref(&mut r)?));
        }
        let n = r.count(9)?;
        if n > 0 && r.version < 2 {
            return Err(invalid(what, "inline writes in a format-1 record"));
        }
        let mut inline = Vec::with_capacity(n);
        for _ in 0..n {
            let offset = r.u64()?;
            if !offset.is_multiple_of(BLOCK_SIZE as u64) {
                return Err(invalid(what, format!("inline write at {offset} is not page aligned")));
            }
            inline.push(InlineWrite { offset, data: get_page(&mut r)? });
        }
        r.done()?;
        check_size(size).map_err(|d| invalid(what, d))?;
        Ok(JournalRecord { kind, seq, epoch, size, writer, created_unix, chunks, inline })
    }
}

// ---------------------------------------------------------------- checkpoints

/// The whole chunk map at `seq`, written by compaction. Indexes are
/// delta-encoded varints, so a dense map costs about 13 bytes a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    /// Highest writer epoch folded in (replay refuses older records after it).
    pub epoch: u64,
    pub size: u64,
    pub map: ChunkMap,
    /// Format 2: the pages laid over the map's chunks.
    pub patches: Patches,
}

impl Checkpoint {
    /// The whole checkpoint as one object (format 1, 2 with patches, 4
    /// with a chunk table).
    pub fn encode(&self) -> Vec<u8> {
        let base = if self.patches.is_empty() { FORMAT_V1 } else { FORMAT_V2 };
        let version = refs_version(base, self.map.values());
        let mut w = Writer::new(CHECKPOINT_MAGIC, version);
        w.u64(self.seq);
        w.u64(self.epoch);
        w.u64(self.size);
        put_map(&mut w, self.map.len(), self.map.iter(), version);
        if version >= FORMAT_V2 {
            put_patches(&mut w, self.patches.iter());
        }
        w.finish()
    }

    /// A checkpoint stored whole; a split one's manifest is refused (see
    /// [`StoredCheckpoint`]).
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self, FormatError> {
        match StoredCheckpoint::decode(bytes, what)? {
            StoredCheckpoint::Whole(cp) => Ok(cp),
            StoredCheckpoint::Split(_) => Err(invalid(what, "a split checkpoint's manifest, not a whole checkpoint")),
        }
    }

    /// The objects that store this checkpoint: `checkpoints/<seq>` and its
    /// parts (none when the map fits one part: then it is stored whole).
    /// `tag` names the parts ([`checkpoint_part_key`]).
    pub fn encode_stored(&self, tag: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
        self.encode_stored_with(tag, PART_ENTRIES.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn encode_stored_with(&self, tag: u64, per_part: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut b = CheckpointBuilder::with_part_entries(self.seq, self.epoch, self.size, tag, per_part);
        // Indexes come from the maps' own order: they increase.
        let mut parts = b
            .push_all(self.map.iter().map(|(i, r)| (*i, *r)), self.patches.iter().map(|(i, p)| (*i, p.clone())))
            .unwrap_or_default();
        match b.finish() {
            Built::Whole(bytes) => (bytes, parts),
            Built::Split { last, manifest } => {
                parts.push(last);
                (manifest, parts)
            }
        }
    }
}

/// Encode part `n` of the split checkpoint `seq`/`tag`: the map entries and
/// patches of chunk indexes `first..=last`, in index order. Returns the
/// object and the manifest's record of it.
pub fn encode_part(
    (seq, tag, n): (u64, u64, u32),
    (first, last): (u64, u64),
    entries: &[(u64, ChunkRef)],
    patches: &Patches,
) -> (Vec<u8>, PartRef) {
    let version = refs_version(FORMAT_V3, entries.iter().map(|(_, r)| r));
    let mut w = Writer::new(CHECKPOINT_PART_MAGIC, version);
    w.u64(seq);
    w.u64(tag);
    w.u32(n);
    w.u64(first);
    w.u64(last);
    put_map(&mut w, entries.len(), entries.iter().map(|(i, r)| (i, r)), version);
    put_patches(&mut w, patches.iter());
    let bytes = w.finish();
    let r =
        PartRef { first, last, entries: entries.len() as u64, len: bytes.len() as u64, crc: crc32c::crc32c(&bytes) };
    (bytes, r)
}

/// Writes a checkpoint from its map entries and patches given one chunk
/// index at a time, in increasing order, without holding the map: each
/// part is handed back as soon as the first entry of the next one shows
/// where it ends. A map of no more than one part's entries comes out
/// whole, as [`Checkpoint::encode_stored`] stores it.
#[derive(Debug)]
pub struct CheckpointBuilder {
    seq: u64,
    epoch: u64,
    size: u64,
    tag: u64,
    per_part: usize,
    first: u64,
    entries: Vec<(u64, ChunkRef)>,
    patches: Patches,
    parts: Vec<PartRef>,
    last_index: Option<u64>,
}

/// What a [`CheckpointBuilder`] ends with.
#[derive(Debug)]
pub enum Built {
    /// The whole checkpoint, one object (no part was handed out).
    Whole(Vec<u8>),
    /// The last part, and then the manifest naming every part.
    Split { last: Vec<u8>, manifest: Vec<u8> },
}

impl CheckpointBuilder {
    /// A builder cutting parts as [`Checkpoint::encode_stored`] does now.
    pub fn new(seq: u64, epoch: u64, size: u64, tag: u64) -> Self {
        Self::with_part_entries(seq, epoch, size, tag, PART_ENTRIES.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn with_part_entries(seq: u64, epoch: u64, size: u64, tag: u64, per_part: usize) -> Self {
        Self {
            seq,
            epoch,
            size,
            tag,
            per_part: per_part.max(1),
            first: 0,
            entries: Vec::new(),
            patches: Patches::new(),
            parts: Vec::new(),
            last_index: None,
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The name its parts go under ([`checkpoint_part_key`]).
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Parts handed out so far.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Chunk `index`'s map entry (`None`: unmapped, zeros) and patch, if
    /// it has either. Indexes must increase from call to call. Returns a
    /// finished part's object when this entry starts the next part.
    pub fn push(
        &mut self,
        index: u64,
        entry: Option<ChunkRef>,
        patch: Option<Arc<Patch>>,
    ) -> Result<Option<Vec<u8>>, FormatError> {
        if let Some(l) = self.last_index.filter(|l| index <= *l) {
            return Err(invalid(
                "checkpoint being written",
                format!("chunk {index} given after chunk {l}: entries out of order"),
            ));
        }
        self.last_index = Some(index);
        let mut done = None;
        if let Some(r) = entry {
            if self.entries.len() >= self.per_part {
                done = Some(self.cut(index - 1));
                self.first = index;
            }
            self.entries.push((index, r));
        }
        if let Some(p) = patch.filter(|p| !p.pages.is_empty()) {
            self.patches.insert(index, p);
        }
        Ok(done)
    }

    /// [`push`](Self::push) every chunk of `entries` and `patches` (each
    /// in increasing index order), interleaved by index. Returns the parts
    /// finished meanwhile, in order.
    pub fn push_all(
        &mut self,
        entries: impl IntoIterator<Item = (u64, ChunkRef)>,
        patches: impl IntoIterator<Item = (u64, Arc<Patch>)>,
    ) -> Result<Vec<Vec<u8>>, FormatError> {
        let mut done = Vec::new();
        let mut patches = patches.into_iter().peekable();
        for (index, r) in entries {
            // Patches of chunks before this entry first.
            while let Some((i, p)) = patches.next_if(|(i, _)| *i < index) {
                done.extend(self.push(i, None, Some(p))?);
            }
            let patch = patches.next_if(|(i, _)| *i == index).map(|(_, p)| p);
            done.extend(self.push(index, Some(r), patch)?);
        }
        for (i, p) in patches {
            done.extend(self.push(i, None, Some(p))?);
        }
        Ok(done)
    }

    /// Finish the current part at `last`.
    fn cut(&mut self, last: u64) -> Vec<u8> {
        let n = self.parts.len() as u32;
        let (bytes, r) = encode_part((self.seq, self.tag, n), (self.first, last), &self.entries, &self.patches);
        self.parts.push(r);
        self.entries.clear();
        self.patches.clear();
        bytes
    }

    pub fn finish(mut self) -> Built {
        if self.parts.is_empty() {
            let cp = Checkpoint {
                seq: self.seq,
                epoch: self.epoch,
                size: self.size,
                map: std::mem::take(&mut self.entries).into_iter().collect(),
                patches: std::mem::take(&mut self.patches),
            };
            return Built::Whole(cp.encode());
        }
        let last = self.cut(u64::MAX);
        let manifest =
            SplitCheckpoint { seq: self.seq, epoch: self.epoch, size: self.size, tag: self.tag, parts: self.parts };
        Built::Split { last, manifest: manifest.encode() }
    }
}

fn put_map<'a>(w: &mut Writer, len: usize, map: impl Iterator<Item = (&'a u64, &'a ChunkRef)>, version: u32) {
    w.varint(len as u64);
    let mut prev = 0u64;
    for (i, (index, r)) in map.enumerate() {
        w.varint(if i == 0 { *index } else { index - prev });
        prev = *index;
        put_ref(w, r, version);
    }
}

/// The map entries, in increasing index order (a map is built from them in
/// one go: far cheaper than inserting a million entries one by one).
fn get_map(r: &mut Reader<'_>, what: &str) -> Result<Vec<(u64, ChunkRef)>, FormatError> {
    let n = r.count(9)?;
    let mut map = Vec::with_capacity(n);
    let mut prev = 0u64;
    for i in 0..n {
        let delta = r.varint()?;
        let index = if i == 0 {
            delta
        } else {
            prev.checked_add(delta).filter(|_| delta > 0).ok_or_else(|| invalid(what, "indexes not increasing"))?
        };
        prev = index;
        map.push((index, get_ref(r)?));
    }
    Ok(map)
}

fn put_patches<'a>(w: &mut Writer, patches: impl Iterator<Item = (&'a u64, &'a Arc<Patch>)> + Clone) {
    w.varint(patches.clone().count() as u64);
    for (index, patch) in patches {
        w.u64(*index);
        w.varint(patch.pages.len() as u64);
        for (page, data) in &patch.pages {
            w.u32(*page);
            put_page(w, data);
        }
    }
}

fn get_patches(r: &mut Reader<'_>, what: &str) -> Result<Patches, FormatError> {
    let mut patches = Patches::new();
    let n = r.count(9)?;
    for _ in 0..n {
        let index = r.u64()?;
        let pages = r.count(5)?;
        if pages == 0 {
            return Err(invalid(what, format!("chunk {index} has an empty patch")));
        }
        let mut patch = Patch::default();
        for _ in 0..pages {
            let page = r.u32()?;
            if patch.pages.insert(page, get_page(r)?).is_some() {
                return Err(invalid(what, format!("page {page} of chunk {index} patched twice")));
            }
        }
        if patches.insert(index, Arc::new(patch)).is_some() {
            return Err(invalid(what, format!("chunk {index} patched twice")));
        }
    }
    Ok(patches)
}

/// What `checkpoints/<seq>` holds: a whole checkpoint, or the manifest of
/// one split into parts (format 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredCheckpoint {
    Whole(Checkpoint),
    Split(SplitCheckpoint),
}

impl StoredCheckpoint {
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self, FormatError> {
        let mut r = Reader::open(bytes, CHECKPOINT_MAGIC, what)?;
        let seq = r.u64()?;
        let epoch = r.u64()?;
        let size = r.u64()?;
        // Format 3 is a manifest; 1, 2 and 4 hold the map whole.
        if r.version == FORMAT_V3 {
            let tag = r.u64()?;
            let n = r.count(22)?;
            let mut parts = Vec::with_capacity(n);
            for _ in 0..n {
                let (first, last) = (r.u64()?, r.u64()?);
                let (entries, len, crc) = (r.varint()?, r.varint()?, r.u32()?);
                parts.push(PartRef { first, last, entries, len, crc });
            }
            r.done()?;
            check_size(size).map_err(|d| invalid(what, d))?;
            // Contiguous ranges from 0 to the last index, each non-empty.
            let mut next = Some(0u64);
            for p in &parts {
                if Some(p.first) != next || p.last < p.first {
                    return Err(invalid(what, "checkpoint parts do not cover every chunk index once"));
                }
                next = p.last.checked_add(1);
            }
            if parts.is_empty() || next.is_some() {
                return Err(invalid(what, "checkpoint parts do not cover every chunk index once"));
            }
            return Ok(StoredCheckpoint::Split(SplitCheckpoint { seq, epoch, size, tag, parts }));
        }
        let map = get_map(&mut r, what)?.into_iter().collect();
        let patches = if r.version >= FORMAT_V2 { get_patches(&mut r, what)? } else { Patches::new() };
        r.done()?;
        check_size(size).map_err(|d| invalid(what, d))?;
        Ok(StoredCheckpoint::Whole(Checkpoint { seq, epoch, size, map, patches }))
    }

    pub fn seq(&self) -> u64 {
        match self {
            StoredCheckpoint::Whole(c) => c.seq,
            StoredCheckpoint::Split(s) => s.seq,
        }
    }

    pub fn epoch(&self) -> u64 {
        match self {
            StoredCheckpoint::Whole(c) => c.epoch,
            StoredCheckpoint::Split(s) => s.epoch,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            StoredCheckpoint::Whole(c) => c.size,
            StoredCheckpoint::Split(s) => s.size,
        }
    }
}

/// The manifest of a split checkpoint: its header and, for each part in
/// index order, the range it covers and what its object must hold (its
/// length and crc32c: a part swapped, truncated or of another writer is
/// refused, never merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitCheckpoint {
    pub seq: u64,
    pub epoch: u64,
    pub size: u64,
    pub tag: u64,
    pub parts: Vec<PartRef>,
}

/// One part of a split checkpoint, as its manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRef {
    /// Chunk indexes `first..=last`: the map entries and patches in them.
    pub first: u64,
    pub last: u64,
    pub entries: u64,
    pub len: u64,
    pub crc: u32,
}

impl SplitCheckpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(CHECKPOINT_MAGIC, FORMAT_V3);
        w.u64(self.seq);
        w.u64(self.epoch);
        w.u64(self.size);
        w.u64(self.tag);
        w.varint(self.parts.len() as u64);
        for p in &self.parts {
            w.u64(p.first);
            w.u64(p.last);
            w.varint(p.entries);
            w.varint(p.len);
            w.u32(p.crc);
        }
        w.finish()
    }

    /// Where part `n` is stored.
    pub fn part_key(&self, vol: &str, n: usize) -> String {
        checkpoint_part_key(vol, self.seq, self.tag, n as u32)
    }

    /// Decode part `n` (as fetched) into `into`, after checking it is the
    /// very object the manifest names.
    pub fn decode_part(&self, n: usize, bytes: &[u8], what: &str, into: &mut Assembly) -> Result<(), FormatError> {
        let (map, patches) = self.read_part(n, bytes, what)?;
        if into.next != n {
            return Err(invalid(what, format!("part {n} assembled out of order (expected part {})", into.next)));
        }
        into.next += 1;
        into.entries.extend(map);
        into.patches.extend(patches);
        Ok(())
    }

    /// Decode part `n` (as fetched) on its own, after checking it is the
    /// very object the manifest names: its map entries in index order and
    /// its patches.
    pub fn read_part(
        &self,
        n: usize,
        bytes: &[u8],
        what: &str,
    ) -> Result<(Vec<(u64, ChunkRef)>, Patches), FormatError> {
        let p = self.parts.get(n).ok_or_else(|| invalid(what, format!("no part {n} in the manifest")))?;
        if bytes.len() as u64 != p.len || crc32c::crc32c(bytes) != p.crc {
            return Err(invalid(what, "not the part its checkpoint's manifest names (length or checksum differ)"));
        }
        let mut r = Reader::open(bytes, CHECKPOINT_PART_MAGIC, what)?;
        let (seq, tag, num, first, last) = (r.u64()?, r.u64()?, r.u32()?, r.u64()?, r.u64()?);
        if seq != self.seq || tag != self.tag || num as usize != n || first != p.first || last != p.last {
            return Err(invalid(what, "a part of another checkpoint"));
        }
        let map = get_map(&mut r, what)?;
        let patches = get_patches(&mut r, what)?;
        r.done()?;
        let outside = |i: &u64| *i < first || *i > last;
        if map.len() as u64 != p.entries || map.iter().map(|(i, _)| i).any(outside) || patches.keys().any(outside) {
            return Err(invalid(what, "entries outside the part's range"));
        }
        Ok((map, patches))
    }

    /// The part holding chunk `index`, by number.
    pub fn part_of(&self, index: u64) -> Option<usize> {
        let n = self.parts.partition_point(|p| p.last < index);
        self.parts.get(n).filter(|p| p.first <= index).map(|_| n)
    }

    /// Start assembling the checkpoint, part 0 first.
    pub fn assembly(&self) -> Assembly {
        let total = self.parts.iter().map(|p| p.entries).sum::<u64>();
        Assembly {
            seq: self.seq,
            epoch: self.epoch,
            size: self.size,
            parts: self.parts.len(),
            next: 0,
            entries: Vec::with_capacity(total.min(1 << 26) as usize),
            patches: Patches::new(),
        }
    }
}

/// A split checkpoint being put together from its parts, in order.
#[derive(Debug)]
pub struct Assembly {
    seq: u64,
    epoch: u64,
    size: u64,
    parts: usize,
    next: usize,
    entries: Vec<(u64, ChunkRef)>,
    patches: Patches,
}

impl Assembly {
    /// The checkpoint, once every part is in.
    pub fn finish(self, what: &str) -> Result<Checkpoint, FormatError> {
        if self.next != self.parts {
            return Err(invalid(what, format!("{} of {} parts assembled", self.next, self.parts)));
        }
        Ok(Checkpoint {
            seq: self.seq,
            epoch: self.epoch,
            size: self.size,
            map: self.entries.into_iter().collect(),
            patches: self.patches,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JournalRecord {
        JournalRecord {
            kind: RecordKind::Commit,
            seq: 7,
            epoch: 3,
            size: 1 << 30,
            writer: 42,
            created_unix: 1_700_000_000,
            chunks: vec![
                (0, ChunkRef::Zero),
                (5, ChunkRef::Stored { generation: generation(3, 9), crc: 0xdead_beef, layout: Layout::Table }),
                (6, ChunkRef::Stored { generation: generation(3, 10), crc: 0xfeed, layout: Layout::Whole }),
            ],
            inline: vec![
                InlineWrite { offset: 4096, data: Some(Bytes::from(vec![7u8; BLOCK_SIZE as usize])) },
                InlineWrite { offset: 8192, data: None },
            ],
        }
    }

    #[test]
    fn journal_record_round_trips() {
        let r = record();
        assert_eq!(JournalRecord::decode(&r.encode(), "j").unwrap(), r);
    }

    #[test]
    fn journal_record_detects_every_single_bit_flip_and_truncation() {
        let bytes = record().encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(JournalRecord::decode(&b, "j").is_err(), "flip at byte {i} bit {bit} accepted");
            }
            assert!(JournalRecord::decode(&bytes[..i], "j").is_err(), "truncation at {i} accepted");
        }
    }

    #[test]
    fn checkpoint_round_trips() {
        let mut map = ChunkMap::new();
        map.insert(0, ChunkRef::Zero);
        map.insert(1, ChunkRef::Stored { generation: 1, crc: 2, layout: Layout::Whole });
        map.insert(1 << 40, ChunkRef::Stored { generation: 3, crc: 4, layout: Layout::Whole });
        let cp = Checkpoint { seq: 9, epoch: 2, size: 1 << 50, map, patches: Patches::new() };
        let bytes = cp.encode();
        assert_eq!(bytes[8..12], FORMAT_V1.to_le_bytes(), "a checkpoint without patches stays format 1");
        assert_eq!(Checkpoint::decode(&bytes, "c").unwrap(), cp);
        let mut patch = Patch::default();
        patch.pages.insert(3, Some(Bytes::from(vec![5u8; BLOCK_SIZE as usize])));
        patch.pages.insert(0, None);
        let mut patches = Patches::new();
        patches.insert(1, Arc::new(patch));
        let cp = Checkpoint { patches, ..cp };
        let bytes = cp.encode();
        assert_eq!(bytes[8..12], FORMAT_V2.to_le_bytes());
        assert_eq!(Checkpoint::decode(&bytes, "c").unwrap(), cp);
        // A chunk with a table makes it format 4, still whole (format 3
        // is a split checkpoint's manifest), with and without patches.
        let mut cp = cp;
        cp.map.insert(2, ChunkRef::Stored { generation: 5, crc: 6, layout: Layout::Table });
        let bytes = cp.encode();
        assert_eq!(bytes[8..12], FORMAT_V4.to_le_bytes());
        assert_eq!(Checkpoint::decode(&bytes, "c").unwrap(), cp);
        let cp = Checkpoint { patches: Patches::new(), ..cp };
        assert_eq!(Checkpoint::decode(&cp.encode(), "c").unwrap(), cp);
    }

    #[test]
    fn a_reference_with_an_unknown_layout_is_refused() {
        let r = JournalRecord { inline: Vec::new(), ..record() };
        let mut bytes = r.encode();
        // Chunk 5's reference: after the header (8 + 4 + 1 + 5 * 8), the
        // count (1 byte), chunk 0 (8 + 8) and chunk 5's index, generation
        // and crc (8 + 8 + 4) comes its layout byte.
        let at = 8 + 4 + 1 + 40 + 1 + 16 + 20;
        assert_eq!(bytes[at], 1);
        bytes[at] = 2;
        let n = bytes.len();
        let crc = crc32c::crc32c(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let err = JournalRecord::decode(&bytes, "j").unwrap_err();
        assert!(err.to_string().contains("unknown chunk layout 2"), "{err}");
    }

    #[test]
    fn a_chunk_object_with_a_table_checks_every_block_and_the_table() {
        let cs = 4 * VERIFY_BLOCK as u64;
        let data: Vec<u8> = (0..cs).map(|i| (i * 7 % 251) as u8).collect();
        let (table, crc) = chunk_table(&data);
        let obj = Bytes::from([&data[..], &table[..]].concat());
        assert_eq!(obj.len() as u64, cs + table_len(cs));
        let r = ChunkRef::Stored { generation: 1, crc, layout: Layout::Table };
        assert_eq!(check_chunk(obj.clone(), r, cs).unwrap(), &data[..]);
        // Any flipped bit, in the bytes or the table, is caught.
        for at in [0, VERIFY_BLOCK * 2 + 17, cs as usize - 1, cs as usize, obj.len() - 1] {
            let mut bad = obj.to_vec();
            bad[at] ^= 0x10;
            assert!(check_chunk(Bytes::from(bad), r, cs).is_err(), "flip at {at} accepted");
        }
        assert!(check_chunk(obj.slice(..obj.len() - 4), r, cs).is_err(), "a truncated object was accepted");
        // A whole chunk object (format 3) under a reference with a table
        // and the other way round are refused.
        let whole = ChunkRef::Stored { generation: 1, crc: crc32c::crc32c(&data), layout: Layout::Whole };
        assert!(check_chunk(Bytes::from(data.clone()), r, cs).is_err());
        assert!(check_chunk(obj.clone(), whole, cs).is_err());
        assert_eq!(check_chunk(Bytes::from(data.clone()), whole, cs).unwrap(), &data[..]);
        // A ranged read: the table, then any run of blocks.
        let crcs = check_table(&obj[cs as usize..], crc, cs).unwrap();
        assert_eq!(crcs.len(), 4);
        let b = VERIFY_BLOCK;
        check_blocks(&crcs, 1, &data[b..3 * b]).unwrap();
        let err = check_blocks(&crcs, 2, &data[b..2 * b]).unwrap_err();
        assert!(err.contains("block 2"), "{err}");
        assert!(check_table(&obj[cs as usize..], crc ^ 1, cs).is_err());
        assert!(check_blocks(&crcs, 4, &data[..b]).is_err(), "a block past the table was accepted");
    }

    fn big_checkpoint(n: u64) -> Checkpoint {
        let mut map = ChunkMap::new();
        for i in 0..n {
            let r = match i % 3 {
                0 => ChunkRef::Zero,
                t => ChunkRef::Stored {
                    generation: i,
                    crc: i as u32,
                    layout: if t == 1 && i > n / 2 { Layout::Table } else { Layout::Whole },
                },
            };
            map.insert(i * 7 + 2, r);
        }
        let mut patches = Patches::new();
        for i in [0u64, 2, 30, 7 * n] {
            let mut patch = Patch::default();
            patch.pages.insert(1, Some(Bytes::from(vec![i as u8; BLOCK_SIZE as usize])));
            patches.insert(i, Arc::new(patch));
        }
        Checkpoint { seq: 40, epoch: 12, size: 1 << 40, map, patches }
    }

    fn assemble(manifest: &[u8], parts: &[Vec<u8>]) -> Result<Checkpoint, FormatError> {
        let StoredCheckpoint::Split(s) = StoredCheckpoint::decode(manifest, "m")? else {
            panic!("not split");
        };
        let mut cp = s.assembly();
        for (n, p) in parts.iter().enumerate() {
            s.decode_part(n, p, "p", &mut cp)?;
        }
        cp.finish("m")
    }

    #[test]
    fn a_big_checkpoint_splits_into_parts_that_assemble_back() {
        let cp = big_checkpoint(10);
        // Small enough: stored whole, as before.
        let (whole, none) = cp.encode_stored_with(5, 10);
        assert!(none.is_empty());
        assert_eq!(Checkpoint::decode(&whole, "c").unwrap(), cp);
        let (manifest, parts) = cp.encode_stored_with(5, 3);
        assert_eq!(parts.len(), 4);
        assert_eq!(manifest[8..12], FORMAT_V3.to_le_bytes(), "a split checkpoint's manifest is format 3");
        // Only the part holding a chunk with a table (entry 7) is format 4.
        let versions: Vec<&[u8]> = parts.iter().map(|p| &p[8..12]).collect();
        assert_eq!(versions, [&[3, 0, 0, 0][..], &[3, 0, 0, 0], &[4, 0, 0, 0], &[3, 0, 0, 0]]);
        assert!(Checkpoint::decode(&manifest, "m").is_err(), "a manifest read as a whole checkpoint");
        let stored = StoredCheckpoint::decode(&manifest, "m").unwrap();
        assert_eq!((stored.seq(), stored.epoch(), stored.size()), (40, 12, 1 << 40));
        assert_eq!(assemble(&manifest, &parts).unwrap(), cp);
        // The default part size keeps every part bounded.
        let cp = big_checkpoint(CHECKPOINT_PART_ENTRIES as u64 * 2 + 1);
        let (manifest, parts) = cp.encode_stored(9);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() < 4 << 20), "{:?}", parts.iter().map(Vec::len).collect::<Vec<_>>());
        assert_eq!(assemble(&manifest, &parts).unwrap(), cp);
    }

    #[test]
    fn a_part_swapped_damaged_or_of_another_checkpoint_is_refused() {
        let cp = big_checkpoint(10);
        let (manifest, parts) = cp.encode_stored_with(5, 3);
        let mut swapped = parts.clone();
        swapped.swap(0, 1);
        assert!(assemble(&manifest, &swapped).is_err(), "parts swapped");
        let mut flipped = parts.clone();
        flipped[2][20] ^= 1;
        assert!(assemble(&manifest, &flipped).is_err(), "a bit flipped");
        let mut short = parts.clone();
        let len = short[1].len();
        short[1].truncate(len - 1);
        assert!(assemble(&manifest, &short).is_err(), "truncated");
        let (_, other) = cp.encode_stored_with(6, 3);
        assert!(assemble(&manifest, &other).is_err(), "another writer's parts");
        let later = Checkpoint { seq: 41, ..cp.clone() };
        let (_, later) = later.encode_stored_with(5, 3);
        assert!(assemble(&manifest, &later).is_err(), "parts of another seq");
        for cut in [manifest.len() - 5, 20] {
            assert!(StoredCheckpoint::decode(&manifest[..cut], "m").is_err());
        }
        // A manifest whose parts leave a range uncovered, or overlap.
        for bad in [
            vec![PartRef { first: 0, last: 9, entries: 0, len: 0, crc: 0 }],
            vec![PartRef { first: 1, last: u64::MAX, entries: 0, len: 0, crc: 0 }],
            vec![
                PartRef { first: 0, last: 9, entries: 0, len: 0, crc: 0 },
                PartRef { first: 9, last: u64::MAX, entries: 0, len: 0, crc: 0 },
            ],
            vec![],
        ] {
            let m = SplitCheckpoint { seq: 1, epoch: 1, size: 1 << 30, tag: 1, parts: bad.clone() }.encode();
            assert!(StoredCheckpoint::decode(&m, "m").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_checkpoint_patching_a_page_twice_or_with_no_pages_is_refused() {
        let encode = |pages: &[u32]| {
            let mut w = Writer::new(CHECKPOINT_MAGIC, FORMAT_V2);
            w.u64(9);
            w.u64(2);
            w.u64(1 << 30);
            w.varint(0);
            w.varint(1);
            w.u64(5);
            w.varint(pages.len() as u64);
            for page in pages {
                w.u32(*page);
                w.u8(0);
            }
            w.finish()
        };
        let cp = Checkpoint::decode(&encode(&[3, 4]), "c").expect("two pages");
        assert_eq!(cp.patches[&5].pages.len(), 2);
        let err = Checkpoint::decode(&encode(&[3, 3]), "c").expect_err("a page twice");
        assert!(err.to_string().contains("page 3 of chunk 5 patched twice"), "{err}");
        let err = Checkpoint::decode(&encode(&[]), "c").expect_err("no pages");
        assert!(err.to_string().contains("empty patch"), "{err}");
    }

    #[test]
    fn records_are_format_1_unless_they_carry_inline_writes_or_chunk_tables() {
        let whole = |r: JournalRecord| JournalRecord {
            chunks: r.chunks.into_iter().map(|(i, c)| (i, if i == 5 { ChunkRef::Zero } else { c })).collect(),
            ..r
        };
        let plain = JournalRecord { inline: Vec::new(), ..whole(record()) };
        assert_eq!(plain.encode()[8..12], FORMAT_V1.to_le_bytes());
        assert_eq!(whole(record()).encode()[8..12], FORMAT_V2.to_le_bytes());
        assert_eq!(JournalRecord { inline: Vec::new(), ..record() }.encode()[8..12], FORMAT_V4.to_le_bytes());
        assert_eq!(record().encode()[8..12], FORMAT_V4.to_le_bytes());
        // What a format-1 reader meets: a version it does not know, not garbage.
        let mut newer = record().encode();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let n = newer.len();
        let crc = crc32c::crc32c(&newer[..n - 4]);
        newer[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(
            matches!(JournalRecord::decode(&newer, "j"), Err(FormatError::Version { found, .. }) if found == FORMAT_VERSION + 1)
        );
    }

    #[test]
    fn patches_lay_pages_over_a_chunk() {
        let mut patch = Patch::default();
        patch.pages.insert(1, Some(Bytes::from(vec![9u8; BLOCK_SIZE as usize])));
        patch.pages.insert(2, None);
        let mut chunk = vec![1u8; 4 * BLOCK_SIZE as usize];
        patch.apply(&mut chunk);
        let bs = BLOCK_SIZE as usize;
        assert_eq!((chunk[0], chunk[bs], chunk[2 * bs], chunk[3 * bs]), (1, 9, 0, 1));
        assert_eq!(patch.bytes(), 2 * BLOCK_SIZE as u64);
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut w = Writer::new(JOURNAL_MAGIC, FORMAT_V1);
        w.u8(2);
        for _ in 0..5 {
            w.u64(1);
        }
        w.u64(4096);
        w.varint(u64::MAX / 2);
        let bytes = w.finish();
        assert!(matches!(JournalRecord::decode(&bytes, "j"), Err(FormatError::Truncated(_))));
    }

    #[test]
    fn key_names_parse_back() {
        let v = "p/vol/";
        assert_eq!(parse_journal_key(v, &journal_key(v, 77)), Some(77));
        assert_eq!(parse_checkpoint_key(v, &checkpoint_key(v, 5)), Some(5));
        let part = checkpoint_part_key(v, 5, u64::MAX, 7);
        assert_eq!(parse_checkpoint_part_key(v, &part), Some((5, u64::MAX, 7)));
        assert_eq!(parse_checkpoint_key(v, &part), None, "a part taken for a checkpoint");
        assert_eq!(parse_checkpoint_part_key(v, &checkpoint_key(v, 5)), None);
        assert_eq!(parse_checkpoint_part_key(v, &format!("{part}.1")), None);
        assert!(crate::volume::catalog::is_own_object(v, &part));
        assert_eq!(parse_chunk_key(v, &chunk_key(v, 3, 99)), Some((3, 99)));
        assert_eq!(parse_chunk_key(v, "p/vol/chunks/xyz/1"), None);
        assert_eq!(generation_epoch(generation(12, 34)), 12);
    }

    #[test]
    fn volume_meta_rejects_bad_fields() {
        let good = VolumeMeta {
            format_version: 1,
            uuid: "u".into(),
            size: 1 << 30,
            chunk_size: DEFAULT_CHUNK_SIZE,
            block_size: BLOCK_SIZE,
            checksum: "crc32c".into(),
            created_unix: 0,
            parent: None,
            single_writer: false,
            compression: None,
            encryption: None,
            flattened: None,
        };
        assert!(VolumeMeta::decode(&good.encode()).is_ok());
        let enc = good.encode();
        assert!(matches!(VolumeMeta::decode(&enc[..enc.len() / 2]), Err(FormatError::Truncated(_))));
        let bad = VolumeMeta { chunk_size: 3000, ..good.clone() };
        assert!(VolumeMeta::decode(&bad.encode()).is_err());
        let packed = VolumeMeta { format_version: FORMAT_V5, compression: Some(Codec::Zstd), ..good.clone() };
        assert_eq!(VolumeMeta::decode(&packed.encode()).expect("format 5").compression, Some(Codec::Zstd));
        let mislabelled = VolumeMeta { format_version: FORMAT_V4, ..packed };
        assert!(VolumeMeta::decode(&mislabelled.encode()).is_err(), "compression in a format-4 volume.json");
        let newer = VolumeMeta { format_version: 99, ..good.clone() };
        assert!(matches!(VolumeMeta::decode(&newer.encode()), Err(FormatError::Version { .. })));
        // Encryption: format 6 and the known cipher only, and format 6 never without it.
        let enc = Encryption {
            cipher: CIPHER.into(),
            key_id: "k".into(),
            data_key_id: "d".into(),
            wrapped_key: "w".into(),
            tag: "t".into(),
        };
        let sealed = VolumeMeta { format_version: FORMAT_V6, encryption: Some(enc.clone()), ..good.clone() };
        assert!(VolumeMeta::decode(&sealed.encode()).is_ok());
        let early = VolumeMeta { format_version: FORMAT_V5, ..sealed.clone() };
        assert!(VolumeMeta::decode(&early.encode()).is_err(), "encryption in a format-5 volume.json");
        let other = Encryption { cipher: "rot13".into(), ..enc };
        let other = VolumeMeta { encryption: Some(other), ..sealed.clone() };
        assert!(VolumeMeta::decode(&other.encode()).is_err(), "an unknown cipher");
        let stripped = VolumeMeta { encryption: None, ..sealed };
        assert!(VolumeMeta::decode(&stripped.encode()).is_err(), "format 6 without its encryption");
    }

    /// Text-like bytes that compress, and bytes that do not.
    fn compressible(n: usize) -> Vec<u8> {
        let line = b"2026-12-03 10:00:00 INFO the volume was staged on node-a; nothing to do\n";
        line.iter().cycle().take(n).copied().collect()
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn packed_chunks_round_trip_and_incompressible_ones_are_not_packed() {
        let cs = 64u64 << 10;
        for codec in [Codec::Lz4, Codec::Zstd] {
            // Half text, half noise: the text blocks shrink, the noise
            // blocks are stored as they are, and the whole still saves.
            let mut data = compressible(cs as usize / 2);
            data.extend(random(cs as usize / 2, 7));
            data.extend(compressible(cs as usize / 2));
            data.truncate(cs as usize);
            let (obj, crc) = pack_chunk(&data, codec).expect("packs");
            assert!((obj.len() as u64) < cs * 7 / 8, "{codec:?}: {} bytes", obj.len());
            let r = ChunkRef::Stored { generation: 1, crc, layout: Layout::Packed(codec) };
            assert_eq!(check_chunk(obj.clone(), r, cs).expect("unpacks"), data);
            // Any range of blocks reads alone, checked.
            let t = check_packed_table(&obj[..packed_table_len(cs) as usize], crc, cs).expect("table");
            for (first, last) in [(0, 0), (1, 2), (2, 3), (3, 3)] {
                let (a, b) = (packed_offset(&t.stored, first), packed_offset(&t.stored, last + 1));
                let got = unpack_blocks(codec, (&t.stored, &t.crcs), cs, first, &obj[a as usize..b as usize])
                    .expect("blocks");
                assert_eq!(got, &data[first * VERIFY_BLOCK..(last + 1) * VERIFY_BLOCK]);
            }
            assert!(pack_chunk(&random(cs as usize, 3), codec).is_none(), "noise packed");
            // Every flipped bit is found: in the table, in a packed block,
            // in a block stored as it is; so is a cut object.
            for at in [3, packed_table_len(cs) as usize + 5, obj.len() - 1, obj.len() / 2] {
                let mut bad = obj.to_vec();
                bad[at] ^= 0x10;
                assert!(check_chunk(Bytes::from(bad), r, cs).is_err(), "{codec:?}: flip at {at} not found");
            }
            assert!(check_chunk(obj.slice(..obj.len() - 1), r, cs).is_err());
            assert!(check_chunk(obj.slice(..10), r, cs).is_err());
            // Another codec's reading of it fails, never passes as data.
            let other = if codec == Codec::Lz4 { Codec::Zstd } else { Codec::Lz4 };
            let wrong = ChunkRef::Stored { generation: 1, crc, layout: Layout::Packed(other) };
            assert!(check_chunk(obj.clone(), wrong, cs).is_err());
        }
    }

    /// Writes the fuzz corpus's seeds: `cargo test --lib write_volume_format_corpus -- --ignored`.
    #[test]
    #[ignore]
    fn write_volume_format_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/volume_format");
        std::fs::create_dir_all(&dir).expect("dir");
        let cs = 64u64 << 10;
        let mut chunk = compressible(cs as usize / 2);
        chunk.extend(random(cs as usize / 2, 5));
        for (name, codec) in [("packed-lz4", Codec::Lz4), ("packed-zstd", Codec::Zstd)] {
            let (obj, _) = pack_chunk(&chunk, codec).expect("packs");
            // The first byte picks the chunk size: 0 is 64 KiB.
            std::fs::write(dir.join(name), [&[0u8][..], &obj].concat()).expect("write");
        }
        let (table, _) = chunk_table(&chunk);
        std::fs::write(dir.join("tabled"), [&[0u8][..], &chunk, &table].concat()).expect("write");
        for (name, obj) in crate::crypto::fuzz_seeds() {
            std::fs::write(dir.join(name), obj).expect("write");
        }
        let r = ChunkRef::Stored { generation: 7, crc: 9, layout: Layout::Packed(Codec::Zstd) };
        let rec = JournalRecord {
            kind: RecordKind::Commit,
            seq: 4,
            epoch: 3,
            size: 1 << 20,
            writer: 9,
            created_unix: 0,
            chunks: vec![(1, r), (2, ChunkRef::Zero)],
            inline: vec![InlineWrite { offset: 8192, data: Some(Bytes::from(vec![7u8; 4096])) }],
        };
        std::fs::write(dir.join("journal-v5"), rec.encode()).expect("write");
        let mut cp = Checkpoint { seq: 4, epoch: 3, size: 1 << 20, map: ChunkMap::new(), patches: Patches::new() };
        cp.map.insert(7, r);
        cp.map.insert(8, ChunkRef::Stored { generation: 5, crc: 6, layout: Layout::Table });
        std::fs::write(dir.join("checkpoint-v5"), cp.encode()).expect("write");
        for (k, e) in
            (0..40u64).map(|i| (i, ChunkRef::Stored { generation: i + 1, crc: 1, layout: Layout::Table })).enumerate()
        {
            cp.map.insert(k as u64 + 100, e.1);
        }
        let (manifest, _) = cp.encode_stored_with(1, 16);
        std::fs::write(dir.join("checkpoint-manifest"), manifest).expect("write");
        let meta = VolumeMeta {
            format_version: FORMAT_V5,
            uuid: "0123456789abcdef0123456789abcdef".into(),
            size: 1 << 30,
            chunk_size: DEFAULT_CHUNK_SIZE,
            block_size: BLOCK_SIZE,
            checksum: "crc32c".into(),
            created_unix: 0,
            parent: None,
            single_writer: false,
            compression: Some(Codec::Lz4),
            encryption: None,
            flattened: None,
        };
        std::fs::write(dir.join("volume-json"), meta.encode()).expect("write");
    }

    #[test]
    fn packed_references_need_format_5() {
        let r = ChunkRef::Stored { generation: generation(3, 9), crc: 0xabc, layout: Layout::Packed(Codec::Zstd) };
        let rec = JournalRecord {
            kind: RecordKind::Commit,
            seq: 4,
            epoch: 3,
            size: 1 << 20,
            writer: 9,
            created_unix: 0,
            chunks: vec![(1, r), (2, ChunkRef::Stored { generation: 5, crc: 1, layout: Layout::Table })],
            inline: Vec::new(),
        };
        let enc = rec.encode();
        assert_eq!(JournalRecord::decode(&enc, "r").expect("decode"), rec);
        assert_eq!(u32::from_le_bytes([enc[8], enc[9], enc[10], enc[11]]), FORMAT_V5);
        // The same layout byte in a format-4 object is no layout.
        let mut v4 = enc.clone();
        v4[8..12].copy_from_slice(&FORMAT_V4.to_le_bytes());
        assert!(JournalRecord::decode(&v4, "r").is_err());
        let mut cp = Checkpoint { seq: 4, epoch: 3, size: 1 << 20, map: ChunkMap::new(), patches: Patches::new() };
        cp.map.insert(7, ChunkRef::Stored { generation: 5, crc: 6, layout: Layout::Packed(Codec::Lz4) });
        assert_eq!(Checkpoint::decode(&cp.encode(), "c").expect("decode"), cp);
    }

    /// The fuzz corpus (`fuzz/corpus/volume_format`: valid objects of each
    /// kind, and what the fuzzer ever found) and mutations of each never
    /// panic the decoders.
    #[test]
    fn fuzz_corpus_and_its_mutations_decode_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/volume_format");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus dir") {
            let data = std::fs::read(entry.expect("entry").path()).expect("read");
            fuzz_decode(&data);
            for seed in 0..64u64 {
                let mut m = data.clone();
                if m.is_empty() {
                    break;
                }
                for (k, b) in random(4, seed).iter().enumerate() {
                    let at = (seed as usize * 7919 + k * 104_729) % m.len();
                    m[at] = *b;
                }
                fuzz_decode(&m);
                m.truncate((seed as usize * 31) % m.len());
                fuzz_decode(&m);
            }
            n += 1;
        }
        assert!(n >= 6, "corpus has only {n} inputs");
    }

    /// Bytes that are no packed chunk never panic the decoders.
    #[test]
    fn packed_decoders_take_any_bytes() {
        let cs = 64u64 << 10;
        let (obj, crc) = pack_chunk(&compressible(cs as usize), Codec::Lz4).expect("packs");
        let tl = packed_table_len(cs) as usize;
        for seed in 0..200u64 {
            let mut junk = obj.to_vec();
            let noise = random(16, seed);
            for (k, b) in noise.iter().enumerate() {
                let at = (seed as usize * 131 + k * 977) % junk.len();
                junk[at] = *b;
            }
            for codec in [Codec::Lz4, Codec::Zstd] {
                let _ = unpack_chunk(&junk, codec, crc, cs);
                let _ = unpack_chunk(&junk, codec, crc32c::crc32c(&junk[..tl]), cs);
                let stored = vec![(seed % 20_000) as u32 + 1; 4];
                let _ = unpack_blocks(codec, (&stored, &[0; 4]), cs, (seed % 4) as usize, &junk[tl..]);
            }
        }
    }
}
