//! The volume engine: read, write, trim, flush (commit), resize, snapshot.
//!
//! Durability rules, in the order they matter:
//! 1. A write lands in a dirty chunk buffer in memory. It is not durable.
//! 2. Dirty chunks are uploaded as *new* chunk objects (never overwriting,
//!    created with `If-None-Match: *`), in the background past the dirty
//!    limit and always at flush. An uploaded chunk is "staged": readable by
//!    us, invisible to everyone else. Its bytes stay in memory until a commit
//!    references it, so it can be uploaded again whatever happens to the
//!    object.
//! 3. A flush uploads every dirty chunk, then creates `journal/<head+1>`
//!    with `If-None-Match: *` and proves the record below it is still the
//!    one this writer appended ([`super::journal`]). Only then is the flush
//!    acknowledged. A crash anywhere before leaves garbage chunk objects,
//!    never a torn volume; another writer's record there means we were
//!    fenced.
//! 4. A journal PUT whose outcome is unknown (an error, a timeout, the
//!    flush's future dropped) stays *pending* and is sent again with the
//!    same bytes until the store says where it stands, so a record that did
//!    land is recognised as ours. A pending record is sent only while its
//!    oldest chunk is younger than [`OpenOptions::commit_deadline`], well
//!    inside compaction's safety age; past it the record is abandoned and
//!    its chunks uploaded again, so no commit can land referencing chunks
//!    that compaction may already have collected.
//!
//! Cancellation: no state depends on a future running to completion. A
//! dirty slot keeps its bytes while they are uploaded (writes meanwhile
//! copy them first), a pending record is noted before its PUT is sent, and
//! memory permits are owned guards that travel with the slot or staged
//! chunk they account for.
//!
//! Concurrency: reads, fetches and read-modify-writes of chunk *i* hold
//! chunk *i*'s async lock; uploads of chunk *i* hold its upload lock, and
//! the chunk lock only while merging pages with a fetched base, never
//! across the PUT, so reads never wait for an upload's retries. Shared
//! bookkeeping lives in one `std::sync::Mutex` that is never held across an
//! await.

mod dirty;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use dirty::is_zero;
use dirty::{DirtyData, PAGE, PageBuf, Piece, pieces};

use super::cache::CleanCache;
use super::format::{
    self, Checkpoint, ChunkMap, ChunkRef, JournalRecord, ParentRef, RecordKind, SnapshotRecord, VolumeMeta,
    checkpoint_key, chunk_key, journal_key, meta_key, snapshot_key,
};
use super::journal::{self, Appended};
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
    /// A staged chunk uploaded longer ago than this is uploaded again (from
    /// the bytes kept in memory) before a commit refers to it.
    pub restage_after: Duration,
    /// A journal record is sent only while its oldest chunk is younger
    /// than this; then it is abandoned and its chunks are uploaded again.
    /// Must stay well below compaction's safety age.
    pub commit_deadline: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            dirty_limit: 256 << 20,
            cache_limit: 128 << 20,
            commit_interval: Duration::from_secs(10),
            restage_after: Duration::from_secs(30),
            commit_deadline: Duration::from_secs(75),
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
struct Slot {
    data: DirtyData,
    /// Changes with every write: an upload that finishes finds out whether
    /// what it sent is still the slot's content.
    version: u64,
    /// When it became dirty (for choosing what to upload first).
    since: u64,
    /// The memory this chunk holds; moves to the staged chunk on upload.
    permit: Option<OwnedSemaphorePermit>,
}

/// An uploaded chunk no commit refers to yet.
#[derive(Debug)]
struct Staged {
    r: ChunkRef,
    /// Its bytes (`None` for zeros), kept to upload it again if needed.
    data: Option<Bytes>,
    /// When its upload started.
    at: Instant,
    /// Held, not read: dropped with the entry, it gives the memory back.
    _permit: Option<OwnedSemaphorePermit>,
}

/// A journal record sent (or about to be sent) whose outcome is unknown.
#[derive(Debug, Clone)]
struct Pending {
    bytes: Bytes,
    record: JournalRecord,
    /// Upload time of its oldest chunk: the deadline counts from here.
    oldest: Instant,
}

#[derive(Debug)]
struct State {
    size: u64,
    committed_size: u64,
    head: u64,
    /// The bytes of the record at `head` when known (ours, or replayed).
    head_bytes: Option<Bytes>,
    epoch: u64,
    map: ChunkMap,
    staged: BTreeMap<u64, Staged>,
    slots: BTreeMap<u64, Slot>,
    clean: CleanCache,
    fenced: Option<String>,
    upload_error: Option<StoreError>,
    pending: Option<Pending>,
    /// Records given up on at seq `head + 1`: one may still land.
    abandoned: Vec<(Bytes, JournalRecord)>,
    tick: u64,
    last_read_end: u64,
    /// Seq of the newest checkpoint known (written by us or replayed from).
    checkpoint_seq: u64,
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
    upload_locks: ChunkLocks,
    /// One permit per chunk that may be dirty or staged at once.
    dirty_permits: Arc<Semaphore>,
    total_permits: usize,
    flush_lock: tokio::sync::Mutex<()>,
    uploader_running: AtomicBool,
    generation_counter: AtomicU64,
}

/// An open volume. Cheap to clone; all clones share one engine.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

/// Journal records a writer lets accumulate past the newest checkpoint
/// before it writes one itself, so that opening never replays many.
fn checkpoint_every(mapped: usize) -> u64 {
    (mapped as u64 / 1024).clamp(64, 1024)
}

/// Rounds of the open record's append (each already retried by the store
/// layer) before opening fails.
const OPEN_APPEND_TRIES: u32 = 3;

/// Chunk uploads tried under fresh names when a name is taken.
const NAME_ATTEMPTS: u32 = 8;

impl Volume {
    /// Create a new volume: probe conditional writes, then write
    /// `volume.json` and the create record, both conditionally. A retried
    /// create whose first attempt landed (its answer lost) succeeds.
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
        let meta_bytes = Bytes::from(meta.encode());
        match store.put(&meta_key(vol), meta_bytes.clone(), PutMode::IfAbsent).await {
            Ok(()) => {}
            Err(StoreError::PreconditionFailed(_)) => {
                // Ours if the bytes are (the uuid makes them unique).
                match store.get(&meta_key(vol), None).await {
                    Ok(existing) if existing == meta_bytes => {}
                    Ok(_) | Err(StoreError::NotFound(_)) => {
                        return Err(VolumeError::AlreadyExists(format!("volume {}/{vol}", store.describe())));
                    }
                    Err(e) => return Err(e.into()),
                }
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
            // A retried PUT that had landed the first time answers 412; the
            // record is ours: nobody else can have written volume.json.
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
            open_for_write(&store, vol, &meta, &mut st, writer, opts.clock.now_unix()).await?;
        }
        let permits = (opts.dirty_limit / chunk_size).max(2) as usize;
        let state = State {
            size: st.size,
            committed_size: st.size,
            head: st.head,
            head_bytes: st.head_bytes.clone(),
            epoch: st.epoch,
            map: st.map,
            staged: BTreeMap::new(),
            slots: BTreeMap::new(),
            clean: CleanCache::new(opts.cache_limit),
            fenced: None,
            upload_error: None,
            pending: None,
            abandoned: Vec::new(),
            tick: 0,
            last_read_end: u64::MAX,
            checkpoint_seq: st.checkpoint.unwrap_or(0),
        };
        tracing::info!(
            volume = vol,
            size = st.size,
            head = st.head,
            epoch = st.epoch,
            records_replayed = st.records_replayed,
            read_only = opts.read_only,
            "volume opened"
        );
        let read_only = opts.read_only;
        let v = Volume {
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
                upload_locks: ChunkLocks::default(),
                dirty_permits: Arc::new(Semaphore::new(permits)),
                total_permits: permits,
                flush_lock: tokio::sync::Mutex::new(()),
                uploader_running: AtomicBool::new(false),
                generation_counter: AtomicU64::new(1),
            }),
        };
        if !read_only {
            v.start_committer();
        }
        Ok(v)
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
    /// dirty, staged, cached, or known to be zeros. No chunk lock and no
    /// await: the state lock alone orders it against writers, which change
    /// a chunk's bytes only under that lock. `None` means "take
    /// [`Volume::read_bytes`]".
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
                Some(slot) => slot.data.piece(p)?.unwrap_or_else(|| Bytes::from(vec![0u8; p.len])),
                None => match st.staged.get(&p.index) {
                    Some(s) => match &s.data {
                        Some(b) => b.slice(p.at..p.at + p.len),
                        None => Bytes::from(vec![0u8; p.len]),
                    },
                    None => match st.clean.get(p.index) {
                        Some(b) => b.slice(p.at..p.at + p.len),
                        None => match st.map.get(&p.index) {
                            Some(ChunkRef::Zero) => Bytes::from(vec![0u8; p.len]),
                            None if inner.parents.is_empty() => Bytes::from(vec![0u8; p.len]),
                            _ => return None,
                        },
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
    /// already dirty: a copy under the state lock. `None` means "take
    /// [`Volume::write_vec`]".
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
        st.tick += 1;
        let tick = st.tick;
        let slot = st.slots.get_mut(&p.index)?;
        if !slot.data.apply(p, Some(data), inner.chunk_size) {
            return None;
        }
        slot.version = tick;
        Some(Ok(()))
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
        let data = DirtyData::Data(Arc::new(data));
        let data = {
            let mut st = self.inner.lock();
            st.tick += 1;
            let tick = st.tick;
            match st.slots.get_mut(&index) {
                Some(slot) => {
                    slot.data = data;
                    slot.version = tick;
                    return Ok(());
                }
                None => data,
            }
        };
        let permit = self.inner.acquire_dirty_permit(self).await?;
        self.inner.insert_slot(index, data, permit);
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
    /// is on the store and proven ours. Safe to cancel at any await.
    pub async fn flush(&self) -> VolumeResult<()> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Ok(());
        }
        let _f = inner.flush_lock.lock().await;
        inner.check_writable()?;
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
                st.slots.contains_key(&index) || st.staged.contains_key(&index) || st.clean.peek(index)
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

    /// Past the dirty limit: upload the oldest dirty chunks and commit them,
    /// which gives their memory back to writers.
    fn kick_uploader(&self) {
        let inner = &self.inner;
        if inner.uploader_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let vol = self.clone();
        tokio::spawn(async move {
            vol.inner.background_upload().await;
            vol.inner.uploader_running.store(false, Ordering::SeqCst);
        });
    }

    /// Commit background uploads (and settle pending records) within
    /// `commit_interval`, flush or not. The task holds no strong reference:
    /// a closed volume stops it.
    fn start_committer(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.opts.commit_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let due = {
                    let st = inner.lock();
                    st.fenced.is_none() && (!st.staged.is_empty() || st.pending.is_some())
                };
                if !due {
                    continue;
                }
                let _f = inner.flush_lock.lock().await;
                if let Err(e) = inner.commit().await {
                    tracing::warn!(volume = %inner.vol, error = %e, "committing background uploads failed; will retry");
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
    let started = Instant::now();
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

/// Append an Open record at head+1, and prove it follows the record we
/// replayed. Losing the race to another writer's record (or finding the
/// journal folded past us) just means replaying and trying the next seq.
async fn open_for_write(
    store: &DynStore,
    vol: &str,
    meta: &VolumeMeta,
    st: &mut Replayed,
    writer: u64,
    now: i64,
) -> VolumeResult<()> {
    let chunk_size = meta.chunk_size as u64;
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
        let mut tries = 0;
        let landed = loop {
            match journal::append(store.as_ref(), vol, seq, &bytes, &[]).await {
                Ok(a) => break a,
                // Unknown outcome: the same bytes again tell.
                Err(e) if e.is_retryable() && tries < OPEN_APPEND_TRIES => tries += 1,
                Err(e) => return Err(e.into()),
            }
        };
        if landed == Appended::Ours {
            let proof = if meta.single_writer {
                Ok(())
            } else {
                journal::prove_successor(store.as_ref(), vol, seq, st.head_bytes.as_ref()).await?
            };
            match proof {
                Ok(()) => {
                    st.apply(&rec, chunk_size)?;
                    st.head_bytes = Some(bytes);
                    return Ok(());
                }
                Err(why) => {
                    tracing::info!(volume = vol, seq, reason = %why, "open record landed behind the journal; replaying")
                }
            }
            *st = replay::replay(store.as_ref(), vol, chunk_size, None).await?;
            continue;
        }
        // Another writer's record: catch up and try after it.
        if replay::catch_up(store.as_ref(), vol, chunk_size, st, true, None).await.is_err() {
            *st = replay::replay(store.as_ref(), vol, chunk_size, None).await?;
        }
    }
    Err(VolumeError::Fenced("could not append an open record: too many concurrent writers".into()))
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

    fn next_generation(&self, epoch: u64) -> VolumeResult<u64> {
        let counter = self.generation_counter.fetch_add(1, Ordering::SeqCst);
        if counter >= format::MAX_GENERATION_COUNTER {
            return Err(self.fence("this writer used up its chunk names; open the volume again".into()));
        }
        Ok(format::generation(epoch, counter))
    }

    fn insert_slot(&self, index: u64, data: DirtyData, permit: OwnedSemaphorePermit) {
        let mut st = self.lock();
        st.tick += 1;
        let tick = st.tick;
        st.clean.remove(index);
        st.slots.insert(index, Slot { data, version: tick, since: tick, permit: Some(permit) });
    }

    /// The bytes of one piece of a chunk (`None` = zeros), copying no more
    /// than the piece from a dirty buffer. Caller holds the chunk lock.
    async fn piece_bytes(&self, p: Piece) -> VolumeResult<Option<Bytes>> {
        if let Some(b) = self.lock().slots.get(&p.index).and_then(|s| s.data.piece(p)) {
            return Ok(b);
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
        slot.data.materialize(base.as_deref());
        Ok(match &slot.data {
            DirtyData::Data(v) => Some(Bytes::copy_from_slice(v)),
            _ => None,
        })
    }

    /// The chunk's bytes as staged or committed, ignoring any dirty slot
    /// (`None` = zeros): staged bytes from memory, else from the cache, or
    /// fetched and verified.
    async fn stored_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        let mut followed = false;
        loop {
            match self.try_stored_bytes(index).await {
                // A read-only opener's map may refer to a chunk generation
                // that a writer has since replaced and compaction collected:
                // follow the journal to the current state, once per read.
                Err(VolumeError::Corrupt(why))
                    if why.ends_with("is missing") && self.follows_journal() && !followed =>
                {
                    followed = true;
                    self.follow_journal().await?;
                }
                r => return r,
            }
        }
    }

    /// A read-only opener of the live volume (not of a snapshot).
    fn follows_journal(&self) -> bool {
        self.opts.read_only && self.opts.snapshot.is_none()
    }

    /// Bring a read-only opener's map up to the journal's head: the
    /// records after ours, or, when compaction folded past our head, the
    /// latest checkpoint and what follows it.
    async fn follow_journal(&self) -> VolumeResult<()> {
        let cs = self.chunk_size;
        let mut next = {
            let st = self.lock();
            Replayed { map: st.map.clone(), size: st.size, head: st.head, epoch: st.epoch, ..Replayed::default() }
        };
        if replay::catch_up(self.store.as_ref(), &self.vol, cs, &mut next, true, None).await.is_err() {
            next = replay::replay(self.store.as_ref(), &self.vol, cs, None).await?;
        }
        let mut st = self.lock();
        tracing::debug!(volume = %self.vol, from = st.head, to = next.head, "read-only opener followed the journal");
        for (index, r) in &next.map {
            if st.map.get(index) != Some(r) {
                st.clean.remove(*index);
            }
        }
        st.map = next.map;
        st.head = next.head;
        st.size = st.size.max(next.size);
        st.committed_size = st.size;
        st.epoch = next.epoch;
        Ok(())
    }

    async fn try_stored_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        let (vol, r, own) = {
            let mut st = self.lock();
            if let Some(s) = st.staged.get(&index) {
                return Ok(s.data.clone());
            }
            if let Some(b) = st.clean.get(index) {
                return Ok(Some(b));
            }
            match st.map.get(&index) {
                Some(r) => (self.vol.as_str(), *r, Some(*r)),
                // The nearest ancestor that maps the chunk decides (a ZERO
                // there hides older ancestors' bytes).
                None => match self.parents.iter().find_map(|p| p.map.get(&index).map(|r| (p, *r))) {
                    Some((p, r)) => (p.vol.as_str(), r, None),
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
        // them, these are only its base. A chunk staged or remapped while
        // we fetched is not cached either.
        if !st.slots.contains_key(&index) && !st.staged.contains_key(&index) && st.map.get(&index).copied() == own {
            st.clean.insert(index, data.clone());
        }
        Ok(Some(data))
    }

    async fn write_piece(&self, p: Piece, data: Option<&[u8]>, vol: &Volume) -> VolumeResult<()> {
        let _g = self.locks.lock(p.index).await;
        let full = p.at == 0 && p.len as u64 == self.chunk_size;
        // `None`: no dirty slot yet; `Some(false)`: pages over an unread base.
        let applied = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            st.slots.get_mut(&p.index).map(|slot| {
                let done = slot.data.apply(p, data, self.chunk_size);
                if done {
                    slot.version = tick;
                }
                done
            })
        };
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
            st.tick += 1;
            let tick = st.tick;
            if let Some(slot) = st.slots.get_mut(&p.index) {
                slot.data.materialize(base.as_deref());
                slot.data.apply(p, data, self.chunk_size);
                slot.version = tick;
            }
            return Ok(());
        }
        // A new dirty chunk needs a permit: this is where memory is bounded.
        // The permit is a guard: dropped with this future, it goes back.
        let permit = self.acquire_dirty_permit(vol).await?;
        let mut slot_data = if full {
            DirtyData::Zero
        } else if p.at % PAGE == 0 && p.len % PAGE == 0 {
            DirtyData::Pages(PageBuf::new(self.chunk_size))
        } else {
            match self.chunk_bytes(p.index).await? {
                None => DirtyData::Zero,
                Some(b) => DirtyData::Data(Arc::new(b.to_vec())),
            }
        };
        slot_data.apply(p, data, self.chunk_size);
        self.insert_slot(p.index, slot_data, permit);
        Ok(())
    }

    async fn acquire_dirty_permit(&self, vol: &Volume) -> VolumeResult<OwnedSemaphorePermit> {
        loop {
            if let Ok(p) = self.dirty_permits.clone().try_acquire_owned() {
                return Ok(p);
            }
            vol.kick_uploader();
            match tokio::time::timeout(Duration::from_millis(200), self.dirty_permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => return Ok(p),
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

    /// Upload a chunk's bytes under a fresh generation, created
    /// conditionally: a name already taken (by any writer, ever) is never
    /// overwritten; the next name is tried.
    async fn put_chunk(&self, index: u64, data: &Bytes) -> VolumeResult<ChunkRef> {
        let crc = crc32c::crc32c(data);
        let mode = if self.meta.single_writer { PutMode::Overwrite } else { PutMode::IfAbsent };
        for _ in 0..NAME_ATTEMPTS {
            let epoch = self.lock().epoch;
            let generation = self.next_generation(epoch)?;
            match self.store.put(&chunk_key(&self.vol, index, generation), data.clone(), mode).await {
                Ok(()) => return Ok(ChunkRef::Stored { generation, crc }),
                // Taken, or our own earlier attempt whose answer was lost:
                // either way a fresh name is safe (the other is garbage).
                Err(StoreError::PreconditionFailed(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VolumeError::Corrupt(format!("chunk {index}: {NAME_ATTEMPTS} fresh object names were all taken")))
    }

    /// Upload one dirty chunk as a new generation and stage it. The slot
    /// keeps its bytes throughout: cancelled or failed, nothing is lost.
    async fn upload_chunk(&self, index: u64) -> VolumeResult<()> {
        let _u = self.upload_locks.lock(index).await;
        let pages = matches!(self.lock().slots.get(&index).map(|s| &s.data), Some(DirtyData::Pages(_)));
        if pages {
            let _g = self.locks.lock(index).await;
            let base = self.stored_bytes(index).await?;
            if let Some(slot) = self.lock().slots.get_mut(&index) {
                slot.data.materialize(base.as_deref());
            }
        }
        let (data, version) = {
            let st = self.lock();
            let Some(slot) = st.slots.get(&index) else {
                return Ok(());
            };
            let Some(data) = slot.data.upload_bytes() else {
                return Err(VolumeError::Corrupt(format!("chunk {index}: pages left unmerged before upload")));
            };
            (data, slot.version)
        };
        let at = Instant::now();
        let r = match &data {
            None => ChunkRef::Zero,
            Some(d) => self.put_chunk(index, d).await?,
        };
        let mut st = self.lock();
        let unchanged = st.slots.get(&index).is_some_and(|s| s.version == version);
        let permit = if unchanged { st.slots.remove(&index).and_then(|mut s| s.permit.take()) } else { None };
        if unchanged {
            match &data {
                Some(d) => st.clean.insert(index, d.clone()),
                None => st.clean.remove(index),
            }
        }
        // A staged chunk it replaces keeps its permit until dropped here.
        st.staged.insert(index, Staged { r, data, at, _permit: permit });
        Ok(())
    }

    /// Upload the oldest dirty chunks until a quarter of the permits are
    /// free, then commit them, which frees their permits.
    async fn background_upload(&self) {
        loop {
            let batch: Vec<u64> = {
                let st = self.lock();
                if st.fenced.is_some() || st.slots.len() * 4 <= self.total_permits * 3 {
                    break;
                }
                let mut v: Vec<(u64, u64)> = st.slots.iter().map(|(i, s)| (s.since, *i)).collect();
                v.sort_unstable();
                v.into_iter().take(self.opts.concurrency).map(|(_, i)| i).collect()
            };
            let results: Vec<VolumeResult<()>> = stream::iter(batch.into_iter().map(|i| self.upload_chunk(i)))
                .buffer_unordered(self.opts.concurrency)
                .collect()
                .await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                tracing::warn!(volume = %self.vol, error = %e, "background upload failed");
                if let VolumeError::Store(se) = e {
                    self.lock().upload_error = Some(se);
                }
                return;
            }
        }
        let due = {
            let st = self.lock();
            st.fenced.is_none() && (!st.staged.is_empty() || st.pending.is_some())
        };
        if due {
            let _f = self.flush_lock.lock().await;
            if let Err(e) = self.commit().await {
                tracing::warn!(volume = %self.vol, error = %e, "committing background uploads failed");
                if let VolumeError::Store(se) = e {
                    self.lock().upload_error = Some(se);
                }
            }
        }
    }

    fn fence(&self, why: String) -> VolumeError {
        tracing::error!(volume = %self.vol, reason = %why, "writer fenced");
        crate::metrics::inc("s3blk_fenced_total", "");
        self.lock().fenced = Some(why.clone());
        VolumeError::Fenced(why)
    }

    /// A record of ours is the journal's head now.
    fn apply_commit(&self, rec: &JournalRecord, bytes: Bytes) {
        let mut st = self.lock();
        for (index, r) in &rec.chunks {
            if st.staged.get(index).is_some_and(|s| s.r == *r) {
                if let Some(s) = st.staged.remove(index) {
                    if let (Some(d), false) = (s.data, st.slots.contains_key(index)) {
                        st.clean.insert(*index, d);
                    }
                }
            }
            st.map.insert(*index, *r);
        }
        st.head = rec.seq;
        st.head_bytes = Some(bytes);
        st.committed_size = rec.size;
        st.pending = None;
        st.abandoned.clear();
    }

    /// Staged chunks uploaded longer ago than `restage_after` go up again
    /// under fresh names from the bytes kept in memory, so that no commit
    /// refers to a chunk compaction could have collected meanwhile.
    async fn restage(&self, older_than: Duration) -> VolumeResult<()> {
        let now = Instant::now();
        let old: Vec<(u64, ChunkRef, Bytes)> = {
            let st = self.lock();
            st.staged
                .iter()
                .filter(|(_, s)| now.saturating_duration_since(s.at) >= older_than)
                .filter_map(|(i, s)| s.data.clone().map(|d| (*i, s.r, d)))
                .collect()
        };
        for (index, old_ref, data) in old {
            let at = Instant::now();
            let r = self.put_chunk(index, &data).await?;
            let mut st = self.lock();
            if let Some(s) = st.staged.get_mut(&index).filter(|s| s.r == old_ref) {
                s.r = r;
                s.at = at;
            }
            tracing::debug!(volume = %self.vol, index, "uploaded an old staged chunk again before committing it");
        }
        Ok(())
    }

    /// Commit every staged chunk (and a grown size) in the next journal
    /// record; first settle a pending record from an earlier attempt.
    async fn commit(&self) -> VolumeResult<()> {
        let started = Instant::now();
        for _ in 0..8 {
            let pending = self.lock().pending.clone();
            if let Some(p) = pending {
                self.settle(p).await?;
                continue;
            }
            self.restage(self.opts.restage_after).await?;
            let mut st = self.lock();
            if st.staged.is_empty() && st.size == st.committed_size {
                drop(st);
                crate::metrics::add("s3blk_commit_seconds_total", "", started.elapsed().as_secs_f64());
                return Ok(());
            }
            let record = JournalRecord {
                kind: RecordKind::Commit,
                seq: st.head + 1,
                epoch: st.epoch,
                size: st.size,
                writer: self.writer,
                created_unix: self.opts.clock.now_unix(),
                chunks: st.staged.iter().map(|(i, s)| (*i, s.r)).collect(),
                inline: Vec::new(),
            };
            let oldest = st.staged.values().map(|s| s.at).min().unwrap_or_else(Instant::now);
            // Noted before it is sent: if this future is dropped mid-PUT,
            // the next commit finds out whether it landed.
            st.pending = Some(Pending { bytes: Bytes::from(record.encode()), record, oldest });
        }
        Err(VolumeError::Store(StoreError::Transient("the journal kept moving under this commit; try again".into())))
    }

    /// Find out where a pending record stands, sending it (again) if it
    /// may not have landed. Ok when it, or an earlier abandoned record of
    /// ours, is now proven the journal's head, or when it was too old to
    /// send and was abandoned (nothing pending any more either way).
    async fn settle(&self, p: Pending) -> VolumeResult<()> {
        let seq = p.record.seq;
        let deadline = p.oldest + self.opts.commit_deadline;
        let (prev, earlier) = {
            let st = self.lock();
            (st.head_bytes.clone(), st.abandoned.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>())
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Too old to send again (an earlier attempt failed long ago):
            // give it up and let the caller commit afresh.
            return self.abandon(p).await;
        }
        let sent = journal::append(self.store.as_ref(), &self.vol, seq, &p.bytes, &earlier);
        let landed = match tokio::time::timeout(left, sent).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                self.abandon(p).await?;
                return Err(VolumeError::Store(StoreError::Transient(format!(
                    "the commit did not land within {:?}; its chunks were uploaded again, try again",
                    self.opts.commit_deadline
                ))));
            }
        };
        let (record, bytes) = match landed {
            Appended::Ours => (p.record.clone(), p.bytes.clone()),
            Appended::Earlier(i) => {
                let (b, r) = self.lock().abandoned[i].clone();
                tracing::warn!(volume = %self.vol, seq, "a commit given up on landed after all; committing again after it");
                (r, b)
            }
            Appended::Taken(why) => return Err(self.fence(why)),
        };
        if !self.meta.single_writer {
            match journal::prove_successor(self.store.as_ref(), &self.vol, seq, prev.as_ref()).await? {
                Ok(()) => {}
                Err(why) => return Err(self.fence(why)),
            }
        }
        // When an abandoned record landed instead of `p`, `p` is dropped
        // here too: what it carried is still staged and goes in the next.
        self.apply_commit(&record, bytes);
        crate::metrics::inc("s3blk_commits_total", "");
        tracing::debug!(volume = %self.vol, seq, chunks = record.chunks.len(), "committed");
        self.maybe_checkpoint();
        Ok(())
    }

    /// Give up on a pending record that did not land in time: it may still
    /// land (then it is recognised as ours), but its chunks go up again
    /// under fresh names and the next commit refers to those.
    async fn abandon(&self, p: Pending) -> VolumeResult<()> {
        tracing::warn!(
            volume = %self.vol,
            seq = p.record.seq,
            deadline = ?self.opts.commit_deadline,
            "journal record did not land in time; its chunks will be uploaded again"
        );
        {
            let mut st = self.lock();
            st.pending = None;
            st.abandoned.push((p.bytes, p.record));
        }
        self.restage(Duration::ZERO).await
    }

    /// Write a checkpoint at the head now and then, so that opening the
    /// volume replays few records whatever the flush rate.
    fn maybe_checkpoint(&self) {
        let cp = {
            let mut st = self.lock();
            if st.head.saturating_sub(st.checkpoint_seq) < checkpoint_every(st.map.len()) {
                return;
            }
            st.checkpoint_seq = st.head;
            Checkpoint { seq: st.head, epoch: st.epoch, size: st.committed_size, map: st.map.clone() }
        };
        let store = self.store.clone();
        let key = checkpoint_key(&self.vol, cp.seq);
        let vol = self.vol.clone();
        tokio::spawn(async move {
            match store.put(&key, Bytes::from(cp.encode()), PutMode::IfAbsent).await {
                // Compaction may have written the same seq: the same map.
                Ok(()) | Err(StoreError::PreconditionFailed(_)) => {
                    tracing::debug!(volume = %vol, seq = cp.seq, "writer checkpoint written")
                }
                Err(e) => tracing::warn!(volume = %vol, seq = cp.seq, error = %e, "writer checkpoint failed"),
            }
        });
    }
}

/// Record a read for sequential detection: true when it continues the last one.
fn note_read(st: &mut State, offset: u64, len: u64) -> bool {
    let sequential = st.last_read_end == offset;
    st.last_read_end = offset + len;
    sequential
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.lock();
        if !st.slots.is_empty() || !st.staged.is_empty() {
            tracing::warn!(volume = %self.vol, dirty = st.slots.len(), staged = st.staged.len(), "volume closed with unflushed writes");
        }
    }
}
