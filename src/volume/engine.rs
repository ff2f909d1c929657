//! The volume engine: read, write, trim, flush (commit), resize, snapshot.
//!
//! Durability rules, in the order they matter:
//! 1. A write lands in a dirty chunk buffer in memory. It is not durable.
//! 2. Dirty chunks are uploaded as *new* chunk objects (never overwriting),
//!    in the background past the dirty limit and always at flush. An
//!    uploaded chunk is "staged": readable by us, invisible to everyone else.
//! 3. A flush uploads every dirty chunk, then creates `journal/<head+1>`
//!    with `If-None-Match: *`. Only when that PUT succeeds is the flush
//!    acknowledged. A crash anywhere before leaves garbage chunk objects,
//!    never a torn volume; a 412 means another writer took over (fenced).
//!
//! Concurrency: every access to chunk *i* (read-modify-write, fetch, upload)
//! holds chunk *i*'s async lock, so overlapping requests are serialised and
//! uploads of one chunk happen in order; different chunks proceed in
//! parallel. Shared bookkeeping lives in one `std::sync::Mutex` that is never
//! held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::Semaphore;

use super::cache::CleanCache;
use super::format::{
    self, ChunkMap, ChunkRef, JournalRecord, ParentRef, RecordKind, SnapshotRecord, VolumeMeta, chunk_key, journal_key,
    meta_key, snapshot_key,
};
use super::locks::ChunkLocks;
use super::replay::{self, Replayed};
use super::{VolumeError, VolumeResult};
use crate::clock::{Clock, SystemClock};
use crate::store::{DynStore, PutMode, StoreError};

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Dirty data kept in memory before background uploads start and writers wait.
    pub dirty_limit: u64,
    /// Clean chunk bytes kept in memory for reads.
    pub cache_limit: u64,
    /// Parallel chunk uploads/downloads.
    pub concurrency: usize,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead_chunks: u64,
    /// Open the state at this snapshot (read-only).
    pub snapshot: Option<String>,
    pub clock: Arc<dyn Clock>,
    /// Chunks uploaded in the background (past the dirty limit) are
    /// committed this long after, flush or not, so compaction, which
    /// collects unreferenced chunks older than its safety age, never sees
    /// them unreferenced for long.
    pub commit_interval: Duration,
    /// A commit whose oldest staged chunk was uploaded longer ago than this
    /// first checks that the chunk objects are still there.
    pub recheck_staged_after: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            dirty_limit: 256 << 20,
            cache_limit: 128 << 20,
            commit_interval: Duration::from_secs(10),
            recheck_staged_after: Duration::from_secs(60),
            concurrency: 16,
            readahead_chunks: 4,
            snapshot: None,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Parameters of a new volume.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub chunk_size: u32,
    pub parent: Option<ParentRef>,
    /// Accept a store without conditional writes (no fencing).
    pub single_writer: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VolumeStats {
    pub size: u64,
    pub chunk_size: u32,
    pub head_seq: u64,
    pub epoch: u64,
    pub mapped_chunks: u64,
    pub stored_chunks: u64,
    pub dirty_chunks: u64,
    pub staged_chunks: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub fenced: bool,
}

#[derive(Debug)]
enum DirtyData {
    Zero,
    Data(Vec<u8>),
    /// Whole pages written over bytes that were never read: the chunk's
    /// stored bytes are fetched only when it is uploaded, or when a read
    /// needs a page that is not here. A small random write to a chunk that
    /// is not cached therefore waits for no download.
    Pages(PageBuf),
}

/// The unit of [`DirtyData::Pages`].
const PAGE: usize = 4096;

/// A chunk-sized buffer of which only the pages marked written are
/// meaningful (the rest are zeros until merged with the stored bytes).
/// Allocated zeroed, so untouched pages cost no memory.
#[derive(Debug)]
struct PageBuf {
    buf: Vec<u8>,
    written: Vec<u64>,
}

impl PageBuf {
    fn new(chunk_size: u64) -> Self {
        let pages = chunk_size as usize / PAGE;
        Self { buf: vec![0u8; chunk_size as usize], written: vec![0u64; pages.div_ceil(64)] }
    }

    fn is_written(&self, page: usize) -> bool {
        self.written[page / 64] & (1 << (page % 64)) != 0
    }

    /// Write whole pages at `at` (`None` = zeros).
    fn write(&mut self, at: usize, len: usize, data: Option<&[u8]>) {
        match data {
            Some(d) => self.buf[at..at + len].copy_from_slice(d),
            None => self.buf[at..at + len].fill(0),
        }
        for page in at / PAGE..(at + len) / PAGE {
            self.written[page / 64] |= 1 << (page % 64);
        }
    }

    fn full(&self) -> bool {
        self.written.iter().map(|w| w.count_ones() as usize).sum::<usize>() == self.buf.len() / PAGE
    }

    /// The piece's bytes when written pages cover all of it.
    fn covered(&self, p: Piece) -> Option<&[u8]> {
        (p.at / PAGE..(p.at + p.len).div_ceil(PAGE))
            .all(|page| self.is_written(page))
            .then(|| &self.buf[p.at..p.at + p.len])
    }

    /// The chunk's bytes: the written pages over `base` (`None` = zeros).
    fn merged(mut self, base: Option<&[u8]>) -> Vec<u8> {
        if let Some(base) = base {
            for page in 0..self.buf.len() / PAGE {
                if !self.is_written(page) {
                    let r = page * PAGE..(page + 1) * PAGE;
                    self.buf[r.clone()].copy_from_slice(&base[r]);
                }
            }
        }
        self.buf
    }
}

/// Turn pages over an unread base into the whole chunk, given the base.
fn materialize(slot: &mut DirtyData, base: Option<&[u8]>) {
    if let DirtyData::Pages(_) = slot {
        if let DirtyData::Pages(pb) = std::mem::replace(slot, DirtyData::Zero) {
            *slot = DirtyData::Data(pb.merged(base));
        }
    }
}

#[derive(Debug)]
struct Slot {
    data: DirtyData,
    /// When it became dirty (for choosing what to upload first).
    since: u64,
    /// Its bytes are on their way to the store (moved out of `data`); only
    /// the chunk lock's holder may touch the slot until it is done.
    uploading: bool,
}

/// A commit whose journal PUT failed without a clear answer: it may or may
/// not have landed. The next flush finds out before writing anything.
#[derive(Debug)]
struct Uncertain {
    seq: u64,
    bytes: Bytes,
    record: JournalRecord,
}

#[derive(Debug)]
struct State {
    size: u64,
    committed_size: u64,
    head: u64,
    epoch: u64,
    map: ChunkMap,
    staged: BTreeMap<u64, ChunkRef>,
    slots: HashMap<u64, Slot>,
    clean: CleanCache,
    fenced: Option<String>,
    upload_error: Option<StoreError>,
    uncertain: Option<Uncertain>,
    tick: u64,
    last_read_end: u64,
    /// When the oldest chunk in `staged` was uploaded.
    staged_since: Option<std::time::Instant>,
}

#[derive(Debug)]
struct Parent {
    vol: String,
    map: ChunkMap,
}

#[derive(Debug)]
struct Inner {
    store: DynStore,
    vol: String,
    meta: VolumeMeta,
    chunk_size: u64,
    opts: OpenOptions,
    writer: u64,
    /// For a clone: the ancestors' chunk maps at their pinned seqs, nearest first.
    parents: Vec<Parent>,
    state: Mutex<State>,
    locks: ChunkLocks,
    /// One permit per chunk that may be dirty at once.
    dirty_permits: Semaphore,
    flush_lock: tokio::sync::Mutex<()>,
    uploader_running: AtomicBool,
    committer_running: AtomicBool,
    generation_counter: AtomicU64,
}

/// An open volume. Cheap to clone; all clones share one engine.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

/// A piece of a request that falls in one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    index: u64,
    /// Offset inside the chunk.
    at: usize,
    len: usize,
    /// Offset inside the request buffer.
    pos: usize,
}

fn pieces(offset: u64, len: u64, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut cur = offset;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let index = cur / chunk_size;
        let at = cur % chunk_size;
        let n = (chunk_size - at).min(end - cur);
        let p = Piece { index, at: at as usize, len: n as usize, pos: (cur - offset) as usize };
        cur += n;
        Some(p)
    })
}

/// True when every byte is zero. Works in 4 KiB blocks of 16-byte words
/// so data that is not zero is rejected after its first block.
pub fn is_zero(buf: &[u8]) -> bool {
    // Data that is not zero nearly always says so in its first bytes.
    if buf.iter().take(16).any(|&b| b != 0) {
        return false;
    }
    buf.chunks(4096).all(|block| {
        let words = block.chunks_exact(16);
        let tail = words.remainder();
        let acc = words.fold(0u128, |acc, w| {
            let mut a = [0u8; 16];
            a.copy_from_slice(w);
            acc | u128::from_ne_bytes(a)
        });
        acc == 0 && tail.iter().all(|&b| b == 0)
    })
}

impl Volume {
    /// Create a new volume: probe conditional writes, then write
    /// `volume.json` and the create record, both conditionally.
    pub async fn create(
        store: DynStore,
        vol: &str,
        opts: CreateOptions,
        clock: &dyn Clock,
    ) -> VolumeResult<VolumeMeta> {
        format::check_size(opts.size).map_err(VolumeError::InvalidArgument)?;
        format::check_chunk_size(opts.chunk_size).map_err(VolumeError::InvalidArgument)?;
        if store.head(&meta_key(vol)).await?.is_some() {
            return Err(VolumeError::AlreadyExists(format!("volume {}/{vol}", store.describe())));
        }
        let conditional = crate::store::supports_conditional_put(store.as_ref(), vol).await?;
        if !conditional && !opts.single_writer {
            return Err(VolumeError::NoConditionalWrites);
        }
        let meta = VolumeMeta {
            format_version: format::FORMAT_VERSION,
            uuid: format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()),
            size: opts.size,
            chunk_size: opts.chunk_size,
            block_size: format::BLOCK_SIZE,
            checksum: "crc32c".into(),
            created_unix: clock.now_unix(),
            parent: opts.parent,
            single_writer: !conditional,
        };
        match store.put(&meta_key(vol), Bytes::from(meta.encode()), PutMode::IfAbsent).await {
            Ok(()) => {}
            Err(StoreError::PreconditionFailed(_)) => {
                return Err(VolumeError::AlreadyExists(format!("volume {}/{vol}", store.describe())));
            }
            Err(e) => return Err(e.into()),
        }
        let rec = JournalRecord {
            kind: RecordKind::Create,
            seq: 0,
            epoch: 0,
            size: opts.size,
            writer: 0,
            created_unix: meta.created_unix,
            chunks: Vec::new(),
            inline: Vec::new(),
        };
        match store.put(&journal_key(vol, 0), Bytes::from(rec.encode()), PutMode::IfAbsent).await {
            // A retried PUT that had landed the first time answers 412.
            Ok(()) | Err(StoreError::PreconditionFailed(_)) => Ok(meta),
            Err(e) => Err(e.into()),
        }
    }

    /// Open a volume: replay checkpoint + journal; for writing, append an
    /// Open record, which fences every earlier writer.
    pub async fn open(store: DynStore, vol: &str, opts: OpenOptions) -> VolumeResult<Volume> {
        let meta = replay::read_meta(store.as_ref(), vol).await?;
        let chunk_size = meta.chunk_size as u64;
        let mut opts = opts;
        let upto = match &opts.snapshot {
            Some(name) => {
                opts.read_only = true;
                Some(read_snapshot(&store, vol, name).await?.seq)
            }
            None => None,
        };
        let mut st = replay::replay(store.as_ref(), vol, chunk_size, upto).await?;
        let parents = load_parents(&store, &meta).await?;
        let writer = rand::random::<u64>() | 1;
        if !opts.read_only {
            open_for_write(&store, vol, chunk_size, &mut st, writer, opts.clock.now_unix()).await?;
        }
        let permits = (opts.dirty_limit / chunk_size).max(2) as usize;
        let state = State {
            size: st.size,
            committed_size: st.size,
            head: st.head,
            epoch: st.epoch,
            map: st.map,
            staged: BTreeMap::new(),
            slots: HashMap::new(),
            clean: CleanCache::new(opts.cache_limit),
            fenced: None,
            upload_error: None,
            uncertain: None,
            tick: 0,
            last_read_end: u64::MAX,
            staged_since: None,
        };
        tracing::info!(
            volume = vol,
            size = st.size,
            head = st.head,
            epoch = st.epoch,
            read_only = opts.read_only,
            "volume opened"
        );
        Ok(Volume {
            inner: Arc::new(Inner {
                store,
                vol: vol.to_string(),
                meta,
                chunk_size,
                opts,
                writer,
                parents,
                state: Mutex::new(state),
                locks: ChunkLocks::default(),
                dirty_permits: Semaphore::new(permits),
                flush_lock: tokio::sync::Mutex::new(()),
                uploader_running: AtomicBool::new(false),
                committer_running: AtomicBool::new(false),
                generation_counter: AtomicU64::new(1),
            }),
        })
    }

    pub fn meta(&self) -> &VolumeMeta {
        &self.inner.meta
    }

    pub fn size(&self) -> u64 {
        self.inner.lock().size
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.opts.read_only
    }

    pub fn fenced(&self) -> Option<String> {
        self.inner.lock().fenced.clone()
    }

    /// Why the volume is unhealthy, if it is: fenced, or its store does
    /// not answer (one cheap HEAD, bounded by `timeout`).
    pub async fn health(&self, timeout: Duration) -> Option<String> {
        if let Some(why) = self.fenced() {
            return Some(format!("fenced: {why}"));
        }
        match tokio::time::timeout(timeout, self.inner.store.head(&meta_key(&self.inner.vol))).await {
            Ok(Ok(Some(_))) => None,
            Ok(Ok(None)) => Some("volume.json is gone from the store".into()),
            Ok(Err(e)) => Some(format!("store unreachable: {e}")),
            Err(_) => Some(format!("store did not answer within {timeout:?}")),
        }
    }

    pub fn stats(&self) -> VolumeStats {
        let st = self.inner.lock();
        VolumeStats {
            size: st.size,
            chunk_size: self.inner.meta.chunk_size,
            head_seq: st.head,
            epoch: st.epoch,
            mapped_chunks: st.map.len() as u64,
            stored_chunks: st.map.values().filter(|r| matches!(r, ChunkRef::Stored { .. })).count() as u64,
            dirty_chunks: st.slots.len() as u64,
            staged_chunks: st.staged.len() as u64,
            cache_bytes: st.clean.bytes(),
            cache_hits: st.clean.hits,
            cache_misses: st.clean.misses,
            fenced: st.fenced.is_some(),
        }
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> VolumeResult<Vec<u8>> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        let mut out = vec![0u8; len as usize];
        let ps: Vec<Piece> = pieces(offset, len, inner.chunk_size).collect();
        let fetched: Vec<(Piece, Option<Bytes>)> = stream::iter(ps.into_iter().map(|p| async move {
            let _g = inner.locks.lock(p.index).await;
            Ok::<_, VolumeError>((p, inner.piece_bytes(p).await?))
        }))
        .buffered(inner.opts.concurrency)
        .try_collect()
        .await?;
        for (p, data) in fetched {
            if let Some(d) = data {
                out[p.pos..p.pos + p.len].copy_from_slice(&d);
            }
        }
        self.maybe_readahead(offset, len);
        Ok(out)
    }

    /// Like [`Volume::read`], returning shared bytes: a read inside one
    /// cached chunk is a slice of the cache, with no copy.
    pub async fn read_bytes(&self, offset: u64, len: u64) -> VolumeResult<Bytes> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        let mut ps = pieces(offset, len, inner.chunk_size);
        if let (Some(p), None) = (ps.next(), ps.next()) {
            let data = {
                let _g = inner.locks.lock(p.index).await;
                inner.piece_bytes(p).await?
            };
            self.maybe_readahead(offset, len);
            return Ok(data.unwrap_or_else(|| Bytes::from(vec![0u8; p.len])));
        }
        self.read(offset, len).await.map(Bytes::from)
    }

    /// A read served on the spot when its bytes are in memory: one chunk,
    /// dirty (and not being uploaded), cached, or known to be zeros. No
    /// chunk lock and no await: the state lock alone orders it against
    /// writers, which change a chunk's bytes only under that lock. `None`
    /// means "take [`Volume::read_bytes`]".
    pub fn read_now(&self, offset: u64, len: u64) -> Option<Bytes> {
        let inner = &self.inner;
        // Out-of-range requests take the normal path and its error.
        offset.checked_add(len)?;
        let mut ps = pieces(offset, len, inner.chunk_size);
        let (Some(p), None) = (ps.next(), ps.next()) else {
            return None;
        };
        let (data, sequential) = {
            let mut st = inner.lock();
            if offset + len > st.size {
                return None;
            }
            let data = match st.slots.get(&p.index) {
                Some(slot) if slot.uploading => return None,
                Some(Slot { data: DirtyData::Data(v), .. }) => Bytes::copy_from_slice(&v[p.at..p.at + p.len]),
                Some(Slot { data: DirtyData::Zero, .. }) => Bytes::from(vec![0u8; p.len]),
                Some(Slot { data: DirtyData::Pages(pb), .. }) => Bytes::copy_from_slice(pb.covered(p)?),
                None => match st.clean.get(p.index) {
                    Some(b) => b.slice(p.at..p.at + p.len),
                    None => match st.staged.get(&p.index).or_else(|| st.map.get(&p.index)) {
                        Some(ChunkRef::Zero) => Bytes::from(vec![0u8; p.len]),
                        None if inner.parents.is_empty() => Bytes::from(vec![0u8; p.len]),
                        _ => return None,
                    },
                },
            };
            (data, note_read(&mut st, offset, len))
        };
        if sequential {
            self.readahead_after(offset + len);
        }
        Some(data)
    }

    /// A write applied on the spot when it falls in one chunk that is
    /// already dirty and not being uploaded: a copy under the state lock.
    /// `None` means "take [`Volume::write_vec`]".
    pub fn write_now(&self, offset: u64, data: &[u8]) -> Option<VolumeResult<()>> {
        let inner = &self.inner;
        offset.checked_add(data.len() as u64)?;
        let mut ps = pieces(offset, data.len() as u64, inner.chunk_size);
        let (Some(p), None) = (ps.next(), ps.next()) else {
            return None;
        };
        if inner.opts.read_only {
            return Some(Err(VolumeError::ReadOnly));
        }
        let mut st = inner.lock();
        if let Some(why) = &st.fenced {
            return Some(Err(VolumeError::Fenced(why.clone())));
        }
        if offset + data.len() as u64 > st.size {
            return None;
        }
        match st.slots.get_mut(&p.index) {
            Some(slot) if !slot.uploading => {
                apply_piece(&mut slot.data, p, Some(data), inner.chunk_size).then_some(Ok(()))
            }
            _ => None,
        }
    }

    /// Write `data` at `offset`. Not durable until [`Volume::flush`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> VolumeResult<()> {
        self.inner.check_writable()?;
        self.inner.check_range(offset, data.len() as u64)?;
        for p in pieces(offset, data.len() as u64, self.inner.chunk_size) {
            self.inner.write_piece(p, Some(&data[p.pos..p.pos + p.len]), self).await?;
        }
        Ok(())
    }

    /// Like [`Volume::write`], taking the buffer: a write of exactly one
    /// whole chunk becomes the chunk's dirty buffer without a copy.
    pub async fn write_vec(&self, offset: u64, data: Vec<u8>) -> VolumeResult<()> {
        let cs = self.inner.chunk_size;
        if offset % cs != 0 || data.len() as u64 != cs {
            return self.write(offset, &data).await;
        }
        self.inner.check_writable()?;
        self.inner.check_range(offset, cs)?;
        let index = offset / cs;
        let _g = self.inner.locks.lock(index).await;
        {
            let mut st = self.inner.lock();
            if let Some(slot) = st.slots.get_mut(&index) {
                slot.data = DirtyData::Data(data);
                return Ok(());
            }
        }
        self.inner.acquire_dirty_permit(self).await?;
        let mut st = self.inner.lock();
        st.tick += 1;
        let since = st.tick;
        st.clean.remove(index);
        st.slots.insert(index, Slot { data: DirtyData::Data(data), since, uploading: false });
        Ok(())
    }

    /// Zero a range (TRIM and WRITE_ZEROES). Whole chunks become ZERO
    /// references: no object, no bytes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.inner.check_writable()?;
        self.inner.check_range(offset, len)?;
        for p in pieces(offset, len, self.inner.chunk_size) {
            self.inner.write_piece(p, None, self).await?;
        }
        Ok(())
    }

    /// Make every write acknowledged before this call durable: upload dirty
    /// chunks, then commit one journal record. Returns only when the record
    /// is on the store.
    pub async fn flush(&self) -> VolumeResult<()> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Ok(());
        }
        let _f = inner.flush_lock.lock().await;
        inner.check_writable()?;
        inner.resolve_uncertain().await?;
        let dirty: Vec<u64> = inner.lock().slots.keys().copied().collect();
        stream::iter(dirty.into_iter().map(|i| inner.upload_chunk(i)))
            .buffer_unordered(inner.opts.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        inner.commit().await
    }

    /// Grow the volume and commit the new size. Shrinking is refused.
    pub async fn resize(&self, new_size: u64) -> VolumeResult<()> {
        self.inner.check_writable()?;
        format::check_size(new_size).map_err(VolumeError::InvalidArgument)?;
        {
            let mut st = self.inner.lock();
            if new_size < st.size {
                return Err(VolumeError::InvalidArgument(format!(
                    "shrinking from {} to {new_size} bytes is not supported",
                    st.size
                )));
            }
            st.size = new_size;
        }
        self.flush().await
    }

    /// Flush, then record a snapshot pinning the committed state.
    pub async fn snapshot(&self, name: &str) -> VolumeResult<SnapshotRecord> {
        format::validate_snapshot_name(name).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
        self.flush().await?;
        let (seq, size) = {
            let st = self.inner.lock();
            (st.head, st.committed_size)
        };
        let rec = SnapshotRecord {
            format_version: format::FORMAT_VERSION,
            name: name.to_string(),
            seq,
            size,
            created_unix: self.inner.opts.clock.now_unix(),
        };
        let body = serde_json::to_vec_pretty(&rec).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
        let key = snapshot_key(&self.inner.vol, name);
        match self.inner.store.put(&key, Bytes::from(body), PutMode::IfAbsent).await {
            Ok(()) => Ok(rec),
            Err(StoreError::PreconditionFailed(_)) => {
                let existing = read_snapshot(&self.inner.store, &self.inner.vol, name).await?;
                if existing.seq == rec.seq {
                    Ok(existing)
                } else {
                    Err(VolumeError::AlreadyExists(format!("snapshot {name}")))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Prefetch a chunk into the cache (NBD_CMD_CACHE).
    pub async fn prefetch(&self, offset: u64, len: u64) -> VolumeResult<()> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        for p in pieces(offset, len, inner.chunk_size) {
            let _g = inner.locks.lock(p.index).await;
            inner.chunk_bytes(p.index).await?;
        }
        Ok(())
    }

    fn maybe_readahead(&self, offset: u64, len: u64) {
        if note_read(&mut self.inner.lock(), offset, len) {
            self.readahead_after(offset + len);
        }
    }

    /// Fetch the chunks after `end` into the cache in the background.
    fn readahead_after(&self, end: u64) {
        let inner = &self.inner;
        let ra = inner.opts.readahead_chunks;
        if ra == 0 {
            return;
        }
        let size = self.size();
        let next = end.div_ceil(inner.chunk_size);
        let last = size.div_ceil(inner.chunk_size);
        for index in next..(next + ra).min(last) {
            let cached = {
                let st = inner.lock();
                st.slots.contains_key(&index) || st.clean.peek(index)
            };
            if cached {
                continue;
            }
            let vol = self.clone();
            tokio::spawn(async move {
                let _g = vol.inner.locks.lock(index).await;
                if let Err(e) = vol.inner.chunk_bytes(index).await {
                    tracing::debug!(index, error = %e, "readahead failed");
                }
            });
        }
    }

    fn kick_uploader(&self) {
        let inner = &self.inner;
        if inner.uploader_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let vol = self.clone();
        tokio::spawn(async move {
            vol.inner.background_upload().await;
            vol.inner.uploader_running.store(false, Ordering::SeqCst);
            vol.kick_committer();
        });
    }

    /// Commit background uploads within `commit_interval`. The task holds
    /// no strong reference: a closed volume stops it.
    fn kick_committer(&self) {
        let inner = &self.inner;
        if inner.lock().staged.is_empty() || inner.committer_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(inner);
        let interval = inner.opts.commit_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let pending = {
                    let st = inner.lock();
                    !st.staged.is_empty() && st.fenced.is_none()
                };
                if pending {
                    let _f = inner.flush_lock.lock().await;
                    let r = async {
                        inner.resolve_uncertain().await?;
                        inner.commit().await
                    };
                    if let Err(e) = r.await {
                        tracing::warn!(volume = %inner.vol, error = %e, "committing background uploads failed; will retry");
                    }
                    continue;
                }
                inner.committer_running.store(false, Ordering::SeqCst);
                // Staged again between the check and the flag: keep going.
                if inner.lock().staged.is_empty() || inner.committer_running.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }
}

/// Pin the volume's committed head under a snapshot name without taking
/// over the volume: a live writer keeps going.
pub async fn snapshot_committed(
    store: &DynStore,
    vol: &str,
    name: &str,
    clock: &dyn Clock,
) -> VolumeResult<SnapshotRecord> {
    format::validate_snapshot_name(name).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let started = std::time::Instant::now();
    let meta = replay::read_meta(store.as_ref(), vol).await?;
    let st = replay::replay(store.as_ref(), vol, meta.chunk_size as u64, None).await?;
    let rec = SnapshotRecord {
        format_version: format::FORMAT_VERSION,
        name: name.to_string(),
        seq: st.head,
        size: st.size,
        created_unix: clock.now_unix(),
    };
    let body = serde_json::to_vec_pretty(&rec).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let key = snapshot_key(vol, name);
    match store.put(&key, Bytes::from(body), PutMode::IfAbsent).await {
        Ok(()) => {}
        Err(StoreError::PreconditionFailed(_)) => return Err(VolumeError::AlreadyExists(format!("snapshot {name}"))),
        Err(e) => return Err(e.into()),
    }
    // Compaction only folds records older than its safety age (minutes),
    // and keeps what every snapshot it lists needs. A snapshot that took
    // long between reading the head and recording it may have missed that
    // listing: withdraw it rather than leave one that cannot be read.
    let slow = started.elapsed() > SNAPSHOT_DEADLINE;
    if slow || !super::compact::snapshot_still_replayable(store, vol, rec.seq).await? {
        store.delete(&key).await?;
        return Err(VolumeError::Store(StoreError::Transient(format!(
            "snapshot {name} took too long to record (compaction may have folded seq {}); try again",
            rec.seq
        ))));
    }
    Ok(rec)
}

/// Longest a snapshot of a volume with a live writer may take between
/// reading the head and recording it; well under compaction's safety age.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(30);

/// Deepest clone chain followed (clone of a clone of ...).
const MAX_CLONE_DEPTH: usize = 32;

async fn load_parents(store: &DynStore, meta: &VolumeMeta) -> VolumeResult<Vec<Parent>> {
    let mut parents = Vec::new();
    let mut next = meta.parent.clone();
    while let Some(p) = next {
        if parents.len() >= MAX_CLONE_DEPTH {
            return Err(VolumeError::Corrupt(format!("clone chain deeper than {MAX_CLONE_DEPTH}")));
        }
        let pmeta = replay::read_meta(store.as_ref(), &p.volume).await?;
        if pmeta.chunk_size != meta.chunk_size {
            return Err(VolumeError::Corrupt(format!("clone parent {} has another chunk size", p.volume)));
        }
        let pst = replay::replay(store.as_ref(), &p.volume, meta.chunk_size as u64, Some(p.seq)).await?;
        parents.push(Parent { vol: p.volume.clone(), map: pst.map });
        next = pmeta.parent;
    }
    Ok(parents)
}

pub async fn read_snapshot(store: &DynStore, vol: &str, name: &str) -> VolumeResult<SnapshotRecord> {
    format::validate_snapshot_name(name).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let key = snapshot_key(vol, name);
    match store.get(&key, None).await {
        Ok(b) => Ok(SnapshotRecord::decode(&b, &key)?),
        Err(StoreError::NotFound(_)) => Err(VolumeError::NotFound(format!("snapshot {name}"))),
        Err(e) => Err(e.into()),
    }
}

/// Append an Open record at head+1. Losing the race to another writer's
/// record just means replaying it and trying the next seq.
async fn open_for_write(
    store: &DynStore,
    vol: &str,
    chunk_size: u64,
    st: &mut Replayed,
    writer: u64,
    now: i64,
) -> VolumeResult<()> {
    for _ in 0..32 {
        let seq = st.head + 1;
        let rec = JournalRecord {
            kind: RecordKind::Open,
            seq,
            epoch: seq,
            size: st.size,
            writer,
            created_unix: now,
            chunks: Vec::new(),
            inline: Vec::new(),
        };
        let bytes = Bytes::from(rec.encode());
        match store.put(&journal_key(vol, seq), bytes.clone(), PutMode::IfAbsent).await {
            Ok(()) => {}
            Err(StoreError::PreconditionFailed(_)) => {
                if !is_own_record(store, vol, seq, &bytes).await? {
                    replay::catch_up(store.as_ref(), vol, chunk_size, st, true, None).await?;
                    continue;
                }
            }
            Err(e) => return Err(e.into()),
        }
        st.apply(&rec, chunk_size)?;
        return Ok(());
    }
    Err(VolumeError::Fenced("could not append an open record: too many concurrent writers".into()))
}

/// After a conditional PUT answered 412: is the record there the one we
/// wrote (an earlier attempt landed and only its answer was lost)?
async fn is_own_record(store: &DynStore, vol: &str, seq: u64, bytes: &Bytes) -> VolumeResult<bool> {
    match store.get(&journal_key(vol, seq), None).await {
        Ok(existing) => Ok(existing == *bytes),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> VolumeResult<()> {
        let size = self.lock().size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> VolumeResult<()> {
        if self.opts.read_only {
            return Err(VolumeError::ReadOnly);
        }
        if let Some(why) = &self.lock().fenced {
            return Err(VolumeError::Fenced(why.clone()));
        }
        Ok(())
    }

    fn next_generation(&self, epoch: u64) -> u64 {
        format::generation(epoch, self.generation_counter.fetch_add(1, Ordering::SeqCst))
    }

    /// The bytes of one piece of a chunk (`None` = zeros), copying no more
    /// than the piece from a dirty buffer. Caller holds the chunk lock.
    async fn piece_bytes(&self, p: Piece) -> VolumeResult<Option<Bytes>> {
        {
            let st = self.lock();
            match st.slots.get(&p.index).map(|s| &s.data) {
                None => {}
                Some(DirtyData::Zero) => return Ok(None),
                Some(DirtyData::Data(v)) => return Ok(Some(Bytes::copy_from_slice(&v[p.at..p.at + p.len]))),
                Some(DirtyData::Pages(pb)) => {
                    if let Some(v) = pb.covered(p) {
                        return Ok(Some(Bytes::copy_from_slice(v)));
                    }
                }
            }
        }
        Ok(self.chunk_bytes(p.index).await?.map(|b| b.slice(p.at..p.at + p.len)))
    }

    /// The current bytes of a chunk (`None` = zeros). Caller holds the chunk lock.
    async fn chunk_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        let over_base = {
            let st = self.lock();
            match st.slots.get(&index).map(|s| &s.data) {
                None => false,
                Some(DirtyData::Zero) => return Ok(None),
                Some(DirtyData::Data(v)) => return Ok(Some(Bytes::copy_from_slice(v))),
                Some(DirtyData::Pages(_)) => true,
            }
        };
        let base = self.stored_bytes(index).await?;
        if !over_base {
            return Ok(base);
        }
        // Merge once, in place, with the pages as they are now (the fast
        // write path may have added some meanwhile); later reads are copies.
        let mut st = self.lock();
        let Some(slot) = st.slots.get_mut(&index) else {
            return Ok(base);
        };
        materialize(&mut slot.data, base.as_deref());
        Ok(match &slot.data {
            DirtyData::Data(v) => Some(Bytes::copy_from_slice(v)),
            _ => None,
        })
    }

    /// The chunk's bytes as committed or staged, ignoring any dirty slot
    /// (`None` = zeros): from the cache, or fetched and verified.
    async fn stored_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        let (vol, r) = {
            let mut st = self.lock();
            if let Some(b) = st.clean.get(index) {
                return Ok(Some(b));
            }
            match st.staged.get(&index).or_else(|| st.map.get(&index)) {
                Some(r) => (self.vol.as_str(), *r),
                // The nearest ancestor that maps the chunk decides (a ZERO
                // there hides older ancestors' bytes).
                None => match self.parents.iter().find_map(|p| p.map.get(&index).map(|r| (p, *r))) {
                    Some((p, r)) => (p.vol.as_str(), r),
                    None => return Ok(None),
                },
            }
        };
        let ChunkRef::Stored { generation, crc } = r else {
            return Ok(None);
        };
        let key = chunk_key(vol, index, generation);
        let data = match self.store.get(&key, None).await {
            Ok(d) => d,
            Err(StoreError::NotFound(_)) => {
                return Err(VolumeError::Corrupt(format!("chunk object {key} is missing")));
            }
            Err(e) => return Err(e.into()),
        };
        if data.len() as u64 != self.chunk_size {
            return Err(VolumeError::Corrupt(format!(
                "chunk object {key} has {} bytes, expected {}",
                data.len(),
                self.chunk_size
            )));
        }
        let actual = crc32c::crc32c(&data);
        if actual != crc {
            return Err(VolumeError::Corrupt(format!(
                "chunk object {key} fails its checksum (crc32c {actual:08x}, expected {crc:08x})"
            )));
        }
        let mut st = self.lock();
        // The cache holds a chunk's current bytes: with a dirty slot over
        // them, these are only its base.
        if !st.slots.contains_key(&index) {
            st.clean.insert(index, data.clone());
        }
        Ok(Some(data))
    }

    async fn write_piece(&self, p: Piece, data: Option<&[u8]>, vol: &Volume) -> VolumeResult<()> {
        let _g = self.locks.lock(p.index).await;
        let full = p.at == 0 && p.len as u64 == self.chunk_size;
        // `None`: no dirty slot yet; `Some(false)`: pages over an unread base.
        let applied =
            self.lock().slots.get_mut(&p.index).map(|slot| apply_piece(&mut slot.data, p, data, self.chunk_size));
        if applied == Some(true) {
            return Ok(());
        }
        if applied == Some(false) {
            // Pages over an unread base, and a write that is not whole
            // pages: read the base now and merge. (We hold the chunk lock:
            // only the fast path may add pages meanwhile, and the merge
            // below sees them.)
            let base = self.stored_bytes(p.index).await?;
            let mut st = self.lock();
            if let Some(slot) = st.slots.get_mut(&p.index) {
                materialize(&mut slot.data, base.as_deref());
                apply_piece(&mut slot.data, p, data, self.chunk_size);
            }
            return Ok(());
        }
        // A new dirty chunk needs a permit: this is where memory is bounded.
        self.acquire_dirty_permit(vol).await?;
        let mut slot_data = if full {
            DirtyData::Zero
        } else if p.at % PAGE == 0 && p.len % PAGE == 0 {
            DirtyData::Pages(PageBuf::new(self.chunk_size))
        } else {
            match self.chunk_bytes(p.index).await.inspect_err(|_| self.dirty_permits.add_permits(1))? {
                None => DirtyData::Zero,
                Some(b) => DirtyData::Data(b.to_vec()),
            }
        };
        apply_piece(&mut slot_data, p, data, self.chunk_size);
        let mut st = self.lock();
        st.tick += 1;
        let since = st.tick;
        st.clean.remove(p.index);
        st.slots.insert(p.index, Slot { data: slot_data, since, uploading: false });
        Ok(())
    }

    async fn acquire_dirty_permit(&self, vol: &Volume) -> VolumeResult<()> {
        loop {
            if let Ok(p) = self.dirty_permits.try_acquire() {
                p.forget();
                return Ok(());
            }
            vol.kick_uploader();
            match tokio::time::timeout(Duration::from_millis(200), self.dirty_permits.acquire()).await {
                Ok(Ok(p)) => {
                    p.forget();
                    return Ok(());
                }
                Ok(Err(_)) => return Err(VolumeError::Fenced("volume closed".into())),
                Err(_) => {
                    if let Some(e) = self.lock().upload_error.take() {
                        return Err(e.into());
                    }
                    self.check_writable()?;
                }
            }
        }
    }

    /// Upload one dirty chunk as a new generation and stage it.
    async fn upload_chunk(&self, index: u64) -> VolumeResult<()> {
        let _g = self.locks.lock(index).await;
        let pages = matches!(self.lock().slots.get(&index).map(|s| &s.data), Some(DirtyData::Pages(_)));
        let base = if pages { self.stored_bytes(index).await? } else { None };
        let (data, epoch) = {
            let mut st = self.lock();
            let epoch = st.epoch;
            let Some(slot) = st.slots.get_mut(&index) else {
                return Ok(());
            };
            // We hold the chunk lock, so nobody can modify the slot while its
            // bytes are on the wire: move them out instead of copying.
            slot.uploading = true;
            let v = match std::mem::replace(&mut slot.data, DirtyData::Zero) {
                DirtyData::Zero => None,
                DirtyData::Data(v) => Some(v),
                DirtyData::Pages(pb) => Some(pb.merged(base.as_deref())),
            };
            let data = v.filter(|v| !is_zero(v)).map(Bytes::from);
            (data, epoch)
        };
        let r = match &data {
            None => ChunkRef::Zero,
            Some(d) => {
                let generation = self.next_generation(epoch);
                let crc = crc32c::crc32c(d);
                let key = chunk_key(&self.vol, index, generation);
                if let Err(e) = self.store.put(&key, d.clone(), PutMode::Overwrite).await {
                    let mut st = self.lock();
                    if let Some(slot) = st.slots.get_mut(&index) {
                        slot.data = DirtyData::Data(d.to_vec());
                        slot.uploading = false;
                    }
                    return Err(e.into());
                }
                ChunkRef::Stored { generation, crc }
            }
        };
        let mut st = self.lock();
        st.slots.remove(&index);
        st.staged.insert(index, r);
        st.staged_since.get_or_insert_with(std::time::Instant::now);
        match data {
            Some(d) => st.clean.insert(index, d),
            None => st.clean.remove(index),
        }
        drop(st);
        self.dirty_permits.add_permits(1);
        Ok(())
    }

    /// Upload the oldest dirty chunks until a quarter of the permits are free.
    async fn background_upload(&self) {
        loop {
            let batch: Vec<u64> = {
                let st = self.lock();
                let total = (self.opts.dirty_limit / self.chunk_size).max(2) as usize;
                if st.fenced.is_some() || st.slots.len() * 4 <= total * 3 {
                    return;
                }
                let mut v: Vec<(u64, u64)> = st.slots.iter().map(|(i, s)| (s.since, *i)).collect();
                v.sort_unstable();
                v.into_iter().take(self.opts.concurrency).map(|(_, i)| i).collect()
            };
            let results: Vec<VolumeResult<()>> = stream::iter(batch.into_iter().map(|i| self.upload_chunk(i)))
                .buffer_unordered(self.opts.concurrency)
                .collect()
                .await;
            for r in results {
                if let Err(e) = r {
                    tracing::warn!(volume = %self.vol, error = %e, "background upload failed");
                    if let VolumeError::Store(se) = e {
                        self.lock().upload_error = Some(se);
                    }
                    return;
                }
            }
        }
    }

    /// Find out whether an earlier commit whose PUT failed ambiguously landed.
    async fn resolve_uncertain(&self) -> VolumeResult<()> {
        let Some(u) = self.lock().uncertain.take() else {
            return Ok(());
        };
        match self.store.get(&journal_key(&self.vol, u.seq), None).await {
            Ok(existing) if existing == u.bytes => {
                self.apply_commit(&u.record);
                Ok(())
            }
            Ok(_) => Err(self.fence(format!("journal record {} was written by another writer", u.seq))),
            Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => {
                self.lock().uncertain = Some(u);
                Err(e.into())
            }
        }
    }

    fn fence(&self, why: String) -> VolumeError {
        tracing::error!(volume = %self.vol, reason = %why, "writer fenced");
        crate::metrics::inc("s3blk_fenced_total", "");
        self.lock().fenced = Some(why.clone());
        VolumeError::Fenced(why)
    }

    fn apply_commit(&self, rec: &JournalRecord) {
        let mut st = self.lock();
        for (index, r) in &rec.chunks {
            if st.staged.get(index) == Some(r) {
                st.staged.remove(index);
            }
            st.map.insert(*index, *r);
        }
        st.head = rec.seq;
        st.committed_size = rec.size;
        if st.staged.is_empty() {
            st.staged_since = None;
        }
    }

    /// Staged chunks uploaded long ago (a commit kept failing, say) may
    /// have been collected by a compaction that saw them unreferenced past
    /// its safety age. Check they are there; upload again from the cache
    /// what is missing; refuse to commit a reference to a missing object.
    async fn recheck_old_staged(&self) -> VolumeResult<()> {
        let old: Vec<(u64, u64, u32)> = {
            let st = self.lock();
            match st.staged_since {
                Some(t) if t.elapsed() >= self.opts.recheck_staged_after => st
                    .staged
                    .iter()
                    .filter_map(|(i, r)| match r {
                        ChunkRef::Stored { generation, crc } => Some((*i, *generation, *crc)),
                        ChunkRef::Zero => None,
                    })
                    .collect(),
                _ => return Ok(()),
            }
        };
        for (index, generation, crc) in old {
            if self.store.head(&chunk_key(&self.vol, index, generation)).await?.is_some() {
                continue;
            }
            let cached = {
                let mut st = self.lock();
                if st.slots.contains_key(&index) {
                    // Rewritten since: the dirty slot supersedes the lost
                    // upload, and the next upload stages it afresh.
                    if st.staged.get(&index) == Some(&ChunkRef::Stored { generation, crc }) {
                        st.staged.remove(&index);
                    }
                    continue;
                }
                st.clean.get(index).filter(|d| crc32c::crc32c(d) == crc)
            };
            let Some(data) = cached else {
                return Err(self.fence(format!(
                    "chunk {index} was uploaded but its object is gone before it could be committed; \
                     the unflushed writes to it are lost"
                )));
            };
            let epoch = self.lock().epoch;
            let fresh = self.next_generation(epoch);
            self.store.put(&chunk_key(&self.vol, index, fresh), data, PutMode::Overwrite).await?;
            tracing::warn!(volume = %self.vol, index, "re-uploaded a staged chunk that had disappeared");
            let mut st = self.lock();
            if st.staged.get(&index) == Some(&ChunkRef::Stored { generation, crc }) {
                st.staged.insert(index, ChunkRef::Stored { generation: fresh, crc });
            }
        }
        self.lock().staged_since = Some(std::time::Instant::now());
        Ok(())
    }

    /// Write the next journal record with every staged chunk.
    async fn commit(&self) -> VolumeResult<()> {
        let started = std::time::Instant::now();
        let r = self.commit_inner().await;
        if r.is_ok() {
            crate::metrics::add("s3blk_commit_seconds_total", "", started.elapsed().as_secs_f64());
        }
        r
    }

    async fn commit_inner(&self) -> VolumeResult<()> {
        self.recheck_old_staged().await?;
        let rec = {
            let st = self.lock();
            if st.staged.is_empty() && st.size == st.committed_size {
                return Ok(());
            }
            JournalRecord {
                kind: RecordKind::Commit,
                seq: st.head + 1,
                epoch: st.epoch,
                size: st.size,
                writer: self.writer,
                created_unix: self.opts.clock.now_unix(),
                chunks: st.staged.iter().map(|(i, r)| (*i, *r)).collect(),
                inline: Vec::new(),
            }
        };
        let key = journal_key(&self.vol, rec.seq);
        let bytes = Bytes::from(rec.encode());
        match self.store.put(&key, bytes.clone(), PutMode::IfAbsent).await {
            Ok(()) => {}
            Err(StoreError::PreconditionFailed(_)) => {
                if !is_own_record(&self.store, &self.vol, rec.seq, &bytes).await? {
                    return Err(self.fence(format!("journal record {} was written by another writer", rec.seq)));
                }
            }
            Err(e) => {
                self.lock().uncertain = Some(Uncertain { seq: rec.seq, bytes, record: rec });
                return Err(e.into());
            }
        }
        // Compaction deletes folded journal records oldest first, and only
        // below a checkpoint. If our predecessor record is gone, compaction
        // has passed us: a newer writer exists, and this record landed in a
        // hole nobody will read. Report failure rather than lose the data
        // silently.
        if !self.meta.single_writer && self.store.head(&journal_key(&self.vol, rec.seq - 1)).await?.is_none() {
            return Err(self.fence(format!("journal record {} was already folded by compaction", rec.seq - 1)));
        }
        self.apply_commit(&rec);
        crate::metrics::inc("s3blk_commits_total", "");
        tracing::debug!(volume = %self.vol, seq = rec.seq, chunks = rec.chunks.len(), "committed");
        Ok(())
    }
}

/// Record a read for sequential detection: true when it continues the last one.
fn note_read(st: &mut State, offset: u64, len: u64) -> bool {
    let sequential = st.last_read_end == offset;
    st.last_read_end = offset + len;
    sequential
}

/// Apply a write (`None` = zeros) to a dirty chunk. False, with nothing
/// changed, when the slot holds pages over an unread base and the write is
/// not whole pages: the caller must read the base first.
fn apply_piece(slot: &mut DirtyData, p: Piece, data: Option<&[u8]>, chunk_size: u64) -> bool {
    if p.len as u64 == chunk_size {
        *slot = match data {
            None => DirtyData::Zero,
            Some(d) => DirtyData::Data(d.to_vec()),
        };
        return true;
    }
    match (slot as &mut DirtyData, data) {
        (DirtyData::Zero, None) => {}
        (DirtyData::Data(v), None) => v[p.at..p.at + p.len].fill(0),
        (DirtyData::Zero, Some(d)) => {
            let mut v = vec![0u8; chunk_size as usize];
            v[p.at..p.at + p.len].copy_from_slice(d);
            *slot = DirtyData::Data(v);
        }
        (DirtyData::Data(v), Some(d)) => v[p.at..p.at + p.len].copy_from_slice(d),
        (DirtyData::Pages(pb), data) => {
            if p.at % PAGE != 0 || p.len % PAGE != 0 {
                return false;
            }
            pb.write(p.at, p.len, data);
            if pb.full() {
                // Every page written: the base no longer matters.
                materialize(slot, None);
            }
        }
    }
    true
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.lock();
        if !st.slots.is_empty() || !st.staged.is_empty() {
            tracing::warn!(volume = %self.vol, dirty = st.slots.len(), staged = st.staged.len(), "volume closed with unflushed writes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let v: Vec<(u64, usize, usize, usize)> = pieces(100, 300, 128).map(|p| (p.index, p.at, p.len, p.pos)).collect();
        assert_eq!(v, vec![(0, 100, 28, 0), (1, 0, 128, 28), (2, 0, 128, 156), (3, 0, 16, 284)]);
        assert_eq!(pieces(0, 0, 128).count(), 0);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
