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
//! 3. A flush uploads every dirty chunk (a chunk with few dirty pages
//!    sends them inside the record instead: format 2's page patches), then
//!    creates `journal/<head+1>` with `If-None-Match: *` and proves the
//!    record below it is still the one this writer appended
//!    ([`super::journal`]; by the append alone when the writer sent that
//!    record recently). Only then is the flush acknowledged. A crash anywhere before leaves garbage chunk objects,
//!    never a torn volume; another writer's record there means we were
//!    fenced.
//! 4. A journal record is sent once, and only while its oldest chunk is
//!    younger than [`OpenOptions::commit_deadline`] (well inside
//!    compaction's safety age). When its outcome is unknown (an error, a
//!    timeout, the flush's future dropped) it stays *pending*, and the next
//!    commit reads back what is under its seq: ours (then proven and
//!    applied), someone else's (fenced), or nothing — then the record is
//!    abandoned, its chunks go up again under fresh names and a new record
//!    is built. An abandoned record that lands after all is recognised as
//!    ours. No record is ever sent long after its chunks were uploaded, so
//!    none can land referring to chunks compaction may have collected.
//!
//! Cancellation: no state depends on a future running to completion. A
//! dirty slot keeps its bytes while they are uploaded (writes meanwhile
//! copy them first), a pending record is noted before its PUT is sent, and
//! memory permits are owned guards that travel with the slot or staged
//! chunk they account for.
//!
//! Memory: dirty and staged chunks hold bytes of a dirty budget (a dirty
//! chunk of whole pages over bytes never read, only its pages: small
//! random writes over many chunks fill the budget page by page; with a
//! write-back log such pages stay in the log only, and memory holds where
//! they are, until a flush is about to delete their segment), cached
//! chunks bytes of a cache budget; both may be shared with other volumes
//! of the process ([`super::budget`], [`OpenOptions::budget`]). A writer
//! never waits for budget bytes while it holds the lock of a dirty chunk.
//!
//! Concurrency: reads, fetches and read-modify-writes of chunk *i* hold
//! chunk *i*'s async lock; uploads of chunk *i* hold its upload lock, and
//! the chunk lock only while merging pages with a fetched base, never
//! across the PUT, so reads never wait for an upload's retries. Shared
//! bookkeeping lives in one `std::sync::Mutex` that is never held across an
//! await.

mod commit;
mod dirty;
mod fetchcost;
mod flatten;
#[cfg(test)]
mod flatten_tests;
pub mod log;
mod read;
mod upload;
#[cfg(test)]
mod upload_race_tests;
mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::time::Instant;

pub use dirty::is_zero;
use dirty::{DirtyData, PAGE, PageBuf, Piece, pieces};
pub use flatten::Copied;

use super::budget::{CacheMember, DirtyAccount, DirtyGuard, MemoryBudget, Uploads};
use super::cache::{ChunkTable, CleanCache};
use super::format::{
    self, Checkpoint, ChunkMap, ChunkRef, InlineWrite, JournalRecord, Layout, ParentRef, Patch, Patches, RecordKind,
    SnapshotRecord, VolumeMeta, chunk_key, journal_key, meta_key, snapshot_key,
};
use super::journal::{self, Appended};
use super::keys;
use super::locks::ChunkLocks;
use super::replay::{self, Replayed};
use super::{VolumeError, VolumeResult};
use crate::clock::{Clock, SystemClock};
use crate::store::{DynStore, PutMode, StoreError};

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Dirty data kept in memory before background uploads start and
    /// writers wait (without a shared `budget`).
    pub dirty_limit: u64,
    /// Clean chunk bytes kept in memory for reads: this volume's cap, also
    /// inside a shared `budget`.
    pub cache_limit: u64,
    /// Dirty and cache budgets shared with other volumes of the process
    /// (the CSI node plugin's); `None`: a budget of this volume's own
    /// from `dirty_limit` and `cache_limit`.
    pub budget: Option<Arc<MemoryBudget>>,
    /// Parallel chunk uploads/downloads.
    pub concurrency: usize,
    /// Chunks fetched ahead of a sequential reader at most (and no more
    /// than a quarter of the cache): readahead fetches twice what the
    /// reader read in a row, from half a chunk on.
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
    /// Where a writer keeps its local write-back log ([`log`]): every
    /// acknowledged write until a flush commits it, so that a process
    /// opening the volume after a crash of this one (same directory, no
    /// other writer in between) carries on with them. `None`: writes live
    /// in memory only until flushed.
    pub log_dir: Option<std::path::PathBuf>,
    /// A log holding more than this starts a flush (which empties it).
    pub log_limit: u64,
    /// Bytes of pages this volume may keep as patches over its chunks
    /// (format 2): a flush sends a chunk's few dirty pages inside its
    /// journal record instead of uploading the chunk, while the volume's
    /// patches stay under this; past half of it, the committer stores the
    /// most patched chunks whole again. 0: every dirty chunk is uploaded
    /// (format 1 records only).
    pub patch_limit: u64,
    /// New chunk objects end with their table (format 4: a read of a few
    /// KiB fetches and checks only the blocks it needs). `false` writes
    /// them whole, as format 3 did: tests and the simulation make volumes
    /// that mix both. Readers take either.
    pub chunk_tables: bool,
    /// Open as a writer only at this head: the open record goes at the
    /// next seq or the open fails, never after another writer's records.
    /// For a writer that checked the volume unused at that head (the
    /// controller's flatten): a writer that opened since is never fenced
    /// by it.
    pub expect_head: Option<u64>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            dirty_limit: 256 << 20,
            cache_limit: 128 << 20,
            budget: None,
            commit_interval: Duration::from_secs(10),
            restage_after: Duration::from_secs(30),
            commit_deadline: Duration::from_secs(75),
            concurrency: 16,
            readahead_chunks: 16,
            snapshot: None,
            clock: Arc::new(SystemClock),
            log_dir: None,
            log_limit: 1 << 30,
            patch_limit: DEFAULT_PATCH_LIMIT,
            chunk_tables: true,
            expect_head: None,
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
    /// Compress chunks with this codec (format 5); `None`: stored as they are.
    pub compression: Option<format::Codec>,
    /// Encrypt (format 6): the data key and the key that wraps it. A
    /// clone's data key is its parent's.
    pub encryption: Option<super::keys::NewKeys>,
}

impl CreateOptions {
    /// A volume of `size` bytes in chunks of `chunk_size`: no parent,
    /// fenced writers, stored as it is (neither compressed nor encrypted).
    pub fn new(size: u64, chunk_size: u32) -> Self {
        Self { size, chunk_size, parent: None, single_writer: false, compression: None, encryption: None }
    }
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
    /// Dirty chunks' memory as the dirty budget counts it.
    pub dirty_bytes: u64,
    pub staged_chunks: u64,
    /// Chunks with committed pages over their stored bytes, and those pages' bytes.
    pub patched_chunks: u64,
    pub patch_bytes: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub fenced: bool,
}

/// Patch bytes a volume keeps by default: at most this much memory, and
/// this much in each checkpoint, for pages waiting to be folded.
pub const DEFAULT_PATCH_LIMIT: u64 = 16 << 20;

/// Inline bytes one journal record carries at most: a small flush stays
/// one small PUT; the rest of a big one goes up as chunks in parallel.
const RECORD_INLINE_MAX: u64 = 256 << 10;

#[derive(Debug)]
struct Slot {
    data: DirtyData,
    /// Pages written since the slot was made (a bit per page): what a
    /// flush sends inline when it does not upload the chunk.
    touched: Vec<u64>,
    /// Changes with every write: an upload that finishes finds out whether
    /// what it sent is still the slot's content.
    version: u64,
    /// When it became dirty (for choosing what to upload first). A tick
    /// no other slot has: an upload tells by it whether the slot it read
    /// is still there or was replaced.
    since: u64,
    /// The memory this chunk holds (at least [`DirtyData::charge`]);
    /// moves to the staged chunk on upload.
    permit: Option<DirtyGuard>,
}

impl Slot {
    fn new(data: DirtyData, tick: u64, permit: DirtyGuard, chunk_size: u64) -> Self {
        let pages = chunk_size as usize / PAGE;
        Slot { data, touched: vec![0; pages.div_ceil(64)], version: tick, since: tick, permit: Some(permit) }
    }

    /// Dirty bytes of the budget it holds.
    fn charged(&self) -> u64 {
        self.permit.as_ref().map_or(0, DirtyGuard::bytes)
    }

    /// Hold `more` budget bytes too.
    fn grow(&mut self, more: DirtyGuard) {
        match &mut self.permit {
            Some(p) => p.absorb(more),
            None => self.permit = Some(more),
        }
    }

    /// Note bytes `[at, at + len)` of the chunk as written.
    fn touch(&mut self, at: usize, len: usize) {
        for page in at / PAGE..(at + len).div_ceil(PAGE) {
            if let Some(w) = self.touched.get_mut(page / 64) {
                *w |= 1 << (page % 64);
            }
        }
    }

    fn touched_pages(&self) -> u64 {
        self.touched.iter().map(|w| w.count_ones() as u64).sum()
    }

    fn touched(&self) -> impl Iterator<Item = usize> + '_ {
        self.touched
            .iter()
            .enumerate()
            .flat_map(|(i, w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| i * 64 + b))
    }
}

/// A moment, on two clocks: the monotonic one, and the wall clock through
/// the injected [`Clock`]. An age is the larger of the two, so neither a
/// wall clock stepped back nor a host suspended (the monotonic clock stops
/// while the store's does not) makes a chunk look younger than it is.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    mono: Instant,
    wall: i64,
}

impl Stamp {
    fn now(clock: &dyn Clock) -> Self {
        Self { mono: Instant::now(), wall: clock.now_unix() }
    }

    fn age(&self, clock: &dyn Clock) -> Duration {
        let wall = Duration::from_secs(clock.now_unix().saturating_sub(self.wall).max(0) as u64);
        self.mono.elapsed().max(wall)
    }
}

/// An uploaded chunk no commit refers to yet.
#[derive(Debug)]
struct Staged {
    r: ChunkRef,
    /// Its bytes (`None` for zeros), kept to upload it again if needed.
    data: Option<Bytes>,
    /// When its upload started.
    at: Stamp,
    /// The tick at which its bytes were read: a record built later
    /// carries pages at least as new as these bytes.
    read: u64,
    /// Its bytes changed after the upload (pages a record built after
    /// they were read, but not naming it, committed over them): the
    /// object holds older bytes and goes up again before a record names
    /// it ([`Inner::restage`]).
    stale: bool,
    /// The dirty budget its bytes hold: dropped with the entry, it gives
    /// the memory back.
    permit: Option<DirtyGuard>,
}

/// A parent's chunk object copied within the store under a name of the
/// clone's own ([`Volume::copy_parents`]): the next record names it,
/// unless the chunk is no longer the parent's by then (written, staged,
/// patched or mapped since), or the copy is older than `restage_after`
/// (compaction may collect an object no record names): then the copy is
/// garbage, and the flatten copies the chunk again. Its bytes are the
/// parent's: reads go on through the parent until a record names it.
#[derive(Debug)]
struct Adopted {
    r: ChunkRef,
    /// When the copy started.
    at: Stamp,
}

/// A chunk being uploaded from bytes read at tick `read`: a record built
/// later that lands before the upload is staged carries newer pages of it
/// (`laid`), which the staged bytes get.
#[derive(Debug)]
struct Reading {
    read: u64,
    laid: Patch,
}

/// A record given up on that may still land: its bytes, the record, and
/// the tick at which it was built.
type Abandoned = (Bytes, JournalRecord, u64);

/// A journal record sent (or about to be sent) whose outcome is unknown.
#[derive(Debug, Clone)]
struct Pending {
    bytes: Bytes,
    record: JournalRecord,
    /// Upload time of its oldest chunk object: the deadline counts from here.
    oldest: Stamp,
    /// Its PUT may have gone out, first at this moment. A record is sent
    /// once: after that its fate is read back, never sent again (a copy
    /// sent late could land after compaction collected its chunks).
    sent: Option<Stamp>,
    /// The dirty slots whose touched pages it carries inline, at the
    /// version it read them: once it is the head, a slot still at that
    /// version is clean.
    inline_versions: Vec<(u64, u64)>,
    /// The tick at which it was built: its pages are the newest written
    /// by then.
    built: u64,
}

#[derive(Debug)]
struct State {
    size: u64,
    committed_size: u64,
    head: u64,
    /// The bytes of the record at `head` when known (ours, or replayed).
    head_bytes: Option<Bytes>,
    /// When the record at `head` was first sent, when it is ours and
    /// known: the next commit's fencing proof may rest on it
    /// ([`Inner::proof_window`]).
    head_sent: Option<Stamp>,
    epoch: u64,
    map: ChunkMap,
    /// Committed pages over the map's chunks, and their bytes.
    patches: Patches,
    patch_bytes: u64,
    /// Dirty chunks the running flush commits inline (their touched
    /// pages) rather than uploading: the next record built carries them.
    inline_next: BTreeSet<u64>,
    /// Chunks of `inline_next` that a commit left out: written since the
    /// flush chose them, their pages no longer fit the limits. The flush
    /// uploads them whole and commits again.
    inline_deferred: BTreeSet<u64>,
    staged: BTreeMap<u64, Staged>,
    /// Parents' chunks copied within the store for the next record.
    adopted: BTreeMap<u64, Adopted>,
    /// Chunks being uploaded, from bytes read when: see [`Reading`].
    reading: BTreeMap<u64, Reading>,
    slots: BTreeMap<u64, Slot>,
    clean: CleanCache,
    fenced: Option<String>,
    /// The last background upload's failure, and when: a writer waiting
    /// for dirty bytes since then fails with it.
    upload_error: Option<(StoreError, Instant)>,
    pending: Option<Pending>,
    /// Records given up on at seq `head + 1`: one may still land.
    abandoned: Vec<Abandoned>,
    tick: u64,
    last_read_end: u64,
    /// Bytes read in a row (each read where the last one ended): readahead
    /// fetches twice that.
    read_in_a_row: u64,
    /// Chunks being fetched ahead (each once, however many reads ask).
    reading_ahead: BTreeSet<u64>,
    /// Seq of the newest checkpoint known (written by us or replayed from).
    checkpoint_seq: u64,
    /// The write-back log (a writer with a `log_dir`), appended in the
    /// critical section in which each write becomes visible here.
    log: Option<log::WriteLog>,
    log_limit: u64,
    /// Told when the log passes `log_limit` (the committer flushes).
    log_full: Arc<tokio::sync::Notify>,
    /// Why the last flush of a full log failed (writers waiting for room).
    log_flush_error: Option<VolumeError>,
}

impl State {
    /// Dirty chunks' memory as the dirty budget counts it.
    fn dirty_bytes(&self) -> u64 {
        self.slots.values().map(Slot::charged).sum()
    }

    /// Log a change just applied here (under the same lock). An error
    /// fails the write; what memory holds then is at most a write that
    /// was never acknowledged.
    fn log(&mut self, r: log::Record<'_>) -> VolumeResult<Option<log::Pos>> {
        let Some(l) = self.log.as_mut() else { return Ok(None) };
        let pos = l.append(r).map_err(|e| log_io(l.dir(), e))?;
        if l.bytes() > self.log_limit {
            self.log_full.notify_one();
        }
        Ok(Some(pos))
    }

    /// A dirty page could not be read back from the write-back log.
    fn log_read(&self, e: std::io::Error) -> VolumeError {
        if let Some(why) = &self.fenced {
            // A fenced writer's log is gone with what it did not commit.
            return VolumeError::Fenced(why.clone());
        }
        match &self.log {
            Some(l) => log_io(l.dir(), e),
            None => VolumeError::LocalLog { no_space: false, why: format!("write-back log: {e}") },
        }
    }

    /// The log holds more than twice its limit: writers wait.
    fn log_over_cap(&self) -> bool {
        self.log.as_ref().is_some_and(|l| l.bytes() > self.log_limit.saturating_mul(2))
    }

    /// Write a piece (`None`: zeros) to chunk `p.index`'s dirty slot, logged
    /// first: a page the log takes is kept there only.
    fn write_logged(&mut self, p: Piece, data: Option<&[u8]>, chunk_size: u64, tick: u64) -> VolumeResult<()> {
        let pos = self.log_piece(p, data, chunk_size)?;
        if let Some(slot) = self.slots.get_mut(&p.index) {
            slot.data.apply(p, data, chunk_size, pos);
            slot.touch(p.at, p.len);
            slot.version = tick;
        }
        Ok(())
    }

    /// Log a piece of a write (`None`: zeros) at chunk `p.index`.
    fn log_piece(&mut self, p: Piece, data: Option<&[u8]>, chunk_size: u64) -> VolumeResult<Option<log::Pos>> {
        let offset = p.index * chunk_size + p.at as u64;
        match data {
            Some(data) => self.log(log::Record::Write { offset, data }),
            None => self.log(log::Record::Zero { offset, len: p.len as u64 }),
        }
    }
}

/// What opening a writer found in its write-back log directory.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LogRecovery {
    /// A dead process's log of this writer's predecessor was taken over.
    pub adopted: bool,
    /// Entries applied from it, and their payload bytes.
    pub entries: u64,
    pub bytes: u64,
    /// Logs of superseded writers removed (their writes were never
    /// committed, and another writer opened the volume since).
    pub discarded: u64,
}

#[derive(Debug)]
struct Parent {
    vol: String,
    map: ChunkMap,
    patches: Patches,
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
    /// This volume's part of the dirty budget (`None` when read-only).
    /// After `state`: the guards its slots hold drop first.
    dirty: Option<DirtyAccount>,
    flush_lock: tokio::sync::Mutex<()>,
    /// A read-only opener follows the journal one catch-up at a time.
    follow_lock: tokio::sync::Mutex<()>,
    /// The most one entry of its cache can hold: its own cap, or the
    /// pool's it shares with other volumes when that is smaller.
    cache_room: u64,
    uploader_running: AtomicBool,
    generation_counter: AtomicU64,
    /// Its commit and NBD request metrics; its gauges read [`Inner::figures`].
    metrics: crate::metrics::VolumeMetrics,
    /// What opening found in the write-back log directory.
    recovery: Mutex<Option<LogRecovery>>,
    /// What ranged and whole fetches of chunks have cost.
    fetch_costs: fetchcost::FetchCosts,
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
        let store = keys::base(&store);
        if let Some(p) = &opts.parent {
            let parent = replay::read_meta(store.as_ref(), &p.volume).await?;
            if parent.encryption.is_some() != opts.encryption.is_some() {
                return Err(VolumeError::InvalidArgument(match parent.encryption {
                    Some(_) => format!("{} is encrypted: a volume made from it must be encrypted too", p.volume),
                    None => format!("{} is not encrypted: a volume made from it cannot be", p.volume),
                }));
            }
        }
        if store.head(&meta_key(vol)).await?.is_some() {
            // A create asked again after an attempt that wrote volume.json
            // and failed (or died) before its create record: finished here
            // when it asked for the same volume.
            let meta = replay::read_meta(store.as_ref(), vol).await?;
            let same_key = match (&meta.encryption, &opts.encryption) {
                (None, None) => true,
                (Some(e), Some(k)) => e.key_id == k.kek.id(),
                _ => false,
            };
            if meta.size == opts.size
                && meta.chunk_size == opts.chunk_size
                && meta.parent == opts.parent
                && meta.compression == opts.compression
                && same_key
                && Self::finish_create(
                    &keys::unlock(&store, vol, opts.encryption.as_ref().map(|k| &k.kek)).await?,
                    vol,
                    &meta,
                )
                .await?
            {
                return Ok(meta);
            }
            return Err(VolumeError::AlreadyExists(format!("volume {}/{vol}", store.describe())));
        }
        let conditional = crate::store::supports_conditional_put(store.as_ref(), vol).await?;
        if !conditional && !opts.single_writer {
            return Err(VolumeError::NoConditionalWrites);
        }
        let mut meta = VolumeMeta {
            // Format 4 unless compressed (or encrypted, below): earlier
            // builds open the volume.
            format_version: if opts.compression.is_some() { format::FORMAT_V5 } else { format::FORMAT_V4 },
            uuid: format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()),
            size: opts.size,
            chunk_size: opts.chunk_size,
            block_size: format::BLOCK_SIZE,
            checksum: "crc32c".into(),
            created_unix: clock.now_unix(),
            parent: opts.parent,
            single_writer: !conditional,
            compression: opts.compression,
            encryption: None,
            flattened: None,
        };
        if let Some(k) = &opts.encryption {
            keys::seal_meta(&mut meta, &k.kek, &k.data);
        }
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
        // The create record is sealed like every record after it.
        let store = match &opts.encryption {
            Some(k) => keys::unlocked_with(&store, vol, &meta, k.kek.clone(), k.data.clone()).await?,
            None => store,
        };
        let record = create_record(&meta);
        for _ in 0..3 {
            match store.put(&journal_key(vol, 0), record.clone(), PutMode::IfAbsent).await {
                Ok(()) => return Ok(meta),
                Err(StoreError::PreconditionFailed(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // A retried PUT that had landed the first time answers 412 (the
            // same bytes: ours). Other bytes are the record a finish of an
            // earlier volume of this name wrote after that volume was
            // deleted; that finish takes it back once it sees this
            // volume.json.
            match store.get(&journal_key(vol, 0), None).await {
                Ok(b) if b == record => return Ok(meta),
                // Another volume's (sealed with another key, or in the clear).
                Ok(_) | Err(StoreError::Damaged(_)) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(VolumeError::Store(StoreError::Transient(format!(
            "{vol}: the create record's place holds another volume's (an earlier volume of this name whose create \
             was being finished); create it again"
        ))))
    }

    /// Finish a create that wrote `volume.json` (`meta`) but not its
    /// create record (the creator failed or died in between): write the
    /// record. `Ok(false)`: the volume has records or checkpoints, there
    /// is nothing to finish. A volume with chunks but neither is damage,
    /// never taken for a new empty one. (One whose every record and
    /// checkpoint was removed from outside, and whose writes all went
    /// inside records, cannot be told from a create that stopped: it is
    /// finished as an empty volume.)
    pub async fn finish_create(store: &DynStore, vol: &str, meta: &VolumeMeta) -> VolumeResult<bool> {
        // The create record of an encrypted volume is sealed like every
        // record after it: through a store that seals this volume (one
        // unlocked for its source lends its key), never in the clear.
        let sealed;
        let store = match meta.encryption.is_some() && !keys::seals(store.as_ref(), vol) {
            true => {
                sealed = keys::unlock(store, vol, None).await?;
                &sealed
            }
            false => store,
        };
        // Objects s3blk names so (the first page: its names sort first).
        let any = |prefix: String, ours: fn(&str, &str) -> bool| async move {
            let req =
                crate::store::ListRequest { prefix: &prefix, start_after: None, delimiter: false, max_keys: 1000 };
            Ok::<_, StoreError>(store.list(req).await?.objects.iter().any(|o| ours(vol, &o.key)))
        };
        let is_record = |vol: &str, key: &str| format::parse_journal_key(vol, key).is_some();
        let is_checkpoint = |vol: &str, key: &str| {
            format::parse_checkpoint_key(vol, key).is_some() || format::parse_checkpoint_part_key(vol, key).is_some()
        };
        let is_chunk = |vol: &str, key: &str| format::parse_chunk_key(vol, key).is_some();
        if any(format::journal_prefix(vol), is_record).await?
            || any(format::checkpoint_prefix(vol), is_checkpoint).await?
        {
            return Ok(false);
        }
        if any(format::chunk_prefix(vol), is_chunk).await? {
            return Err(VolumeError::Corrupt(format!("{vol}: chunks, but no journal records and no checkpoint")));
        }
        // Its delete has begun: nothing is finished for the reaper to take.
        if store.head(&crate::volume::catalog::tombstone_key(vol)).await?.is_some() {
            return Err(VolumeError::NotFound(format!("{vol} (deleted: its create is not finished)")));
        }
        // A clone (or restore) reads through its parent at the seq its pin
        // keeps there. A `volume.json` whose PUT landed late may name a pin
        // its failed create let go of, or one a later attempt wrote at
        // another seq: finished, it would read what compaction takes.
        if let Some(p) = &meta.parent {
            let held = match read_snapshot(store, &p.volume, &p.snapshot).await {
                Ok(pin) => Some(pin.seq),
                Err(VolumeError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            if held != Some(p.seq) {
                let pin = match held {
                    Some(seq) => format!("keeps seq {seq}"),
                    None => "is gone".to_string(),
                };
                return Err(VolumeError::AlreadyExists(format!(
                    "{vol} was left unfinished by a create that failed; it would read through {} at seq {}, but \
                     its pin there ({}) {pin}: delete it and create it again",
                    p.volume, p.seq, p.snapshot
                )));
            }
        }
        let record = create_record(meta);
        let landed = match store.put(&journal_key(vol, 0), record.clone(), PutMode::IfAbsent).await {
            Ok(()) => true,
            // The first creator's record landed meanwhile (unless the name
            // was deleted and created again, below), or this call's own,
            // whose answer was lost and whose retry found it: the same
            // bytes, this volume's record either way.
            Err(StoreError::PreconditionFailed(_)) => match store.get(&journal_key(vol, 0), None).await {
                Ok(found) => found == record,
                // Another volume's record, in the clear or sealed with another key.
                Err(StoreError::NotFound(_) | StoreError::Damaged(_)) => false,
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        // A delete may have begun meanwhile (it takes volume.json first):
        // a record left under a prefix without a volume is taken back. The
        // name may even have been created again since: a record of ours
        // there is not that volume's (another size, another creation
        // time), and is taken back too; its create waits for that (it
        // compares the record with its own) and a retry of it finishes it.
        match replay::read_meta(store.as_ref(), vol).await {
            Ok(now) if now.uuid == meta.uuid => {}
            Ok(_) => {
                if landed {
                    store.delete(&journal_key(vol, 0)).await?;
                }
                return Err(VolumeError::AlreadyExists(format!(
                    "{vol} (deleted and created again while its create was being finished)"
                )));
            }
            Err(VolumeError::NotFound(_)) => {
                // Only this volume's record: another is another create's
                // (its delete takes it back).
                if landed {
                    store.delete(&journal_key(vol, 0)).await?;
                }
                return Err(VolumeError::NotFound(format!("{vol} (deleted while its create was being finished)")));
            }
            Err(e) => return Err(e),
        }
        tracing::info!(volume = vol, "finished a create that had stopped before its create record");
        Ok(true)
    }

    /// Open a volume: replay checkpoint + journal; for writing, append an
    /// Open record, which fences every earlier writer.
    pub async fn open(store: DynStore, vol: &str, opts: OpenOptions) -> VolumeResult<Volume> {
        let meta = replay::read_meta(store.as_ref(), vol).await?;
        keys::require(store.as_ref(), vol, &meta)?;
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
        let at = upto.unwrap_or(st.head);
        if let (None, Some(f)) = (&meta.parent, &meta.flattened) {
            check_flattened_at(vol, f, at, upto.is_some())?;
        }
        let parents = load_parents(&store, vol, &meta, at).await?;
        // A delete removes `volume.json` before anything else. Still there
        // after the replay, no record or checkpoint the replay read was
        // taken by one; gone, the replay may have stopped at a checkpoint
        // whose later records the delete had removed, and older bytes would
        // be served as the volume's.
        if store.head(&format::meta_key(vol)).await?.is_none() {
            return Err(VolumeError::NotFound(format!("{vol} (deleted while it was being opened)")));
        }
        let writer = rand::random::<u64>() | 1;
        let budget = match &opts.budget {
            Some(b) => b.clone(),
            // A budget of its own: today's per-volume limits, at least two chunks dirty.
            None => MemoryBudget::new((opts.dirty_limit / chunk_size).max(2) * chunk_size, opts.cache_limit),
        };
        // Before the open record: a writer refused here must not have
        // fenced the volume's current writer on its way.
        let dirty = match opts.read_only {
            true => None,
            false => Some(budget.dirty.register(chunk_size).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?),
        };
        let mut claimed = None;
        let mut recovery = None;
        let mut head_sent = None;
        if !opts.read_only {
            // The log directory first: a dead predecessor's log is chosen
            // against the journal as replayed, and marked with our writer
            // id before our open record is sent, so that a crash right
            // after it landed still finds the log ours.
            let mut taking = match &opts.log_dir {
                Some(root) => Some(claim_log(&store, vol, &meta, &st, root, writer).await?),
                None => None,
            };
            let (prev_epoch, sent) =
                open_for_write(&store, vol, &meta, &mut st, writer, &opts, taking.as_mut()).await?;
            head_sent = Some(sent);
            if let Some(mut t) = taking {
                t.before_append(prev_epoch)?;
                let state = log::LogState {
                    volume: meta.uuid.clone(),
                    epoch: st.epoch,
                    next_writer: None,
                    boot: t.boot.clone(),
                    at: Some(t.at.clone()),
                };
                t.c.set_state(state).map_err(|e| log_io(&t.c.dir, e))?;
                claimed = Some(t.c);
                recovery = Some(t.rec);
            }
        }
        let state = State {
            size: st.size,
            committed_size: st.size,
            head: st.head,
            head_bytes: st.head_bytes.clone(),
            head_sent,
            epoch: st.epoch,
            patch_bytes: st.patches.values().map(|p| p.bytes()).sum(),
            patches: st.patches,
            inline_next: BTreeSet::new(),
            inline_deferred: BTreeSet::new(),
            map: st.map,
            staged: BTreeMap::new(),
            adopted: BTreeMap::new(),
            reading: BTreeMap::new(),
            slots: BTreeMap::new(),
            clean: CleanCache::shared(opts.cache_limit, budget.cache.clone()),
            fenced: None,
            upload_error: None,
            pending: None,
            abandoned: Vec::new(),
            tick: 0,
            last_read_end: u64::MAX,
            read_in_a_row: 0,
            reading_ahead: BTreeSet::new(),
            checkpoint_seq: st.checkpoint.unwrap_or(0),
            log: None,
            log_limit: opts.log_limit,
            log_full: Arc::new(tokio::sync::Notify::new()),
            log_flush_error: None,
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
        let cache_id = state.clean.id();
        let cache_room = state.clean.room();
        let v = Volume {
            inner: Arc::new_cyclic(|me: &std::sync::Weak<Inner>| Inner {
                metrics: crate::metrics::global().volume(vol, me.clone()),
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
                dirty,
                flush_lock: tokio::sync::Mutex::new(()),
                follow_lock: tokio::sync::Mutex::new(()),
                uploader_running: AtomicBool::new(false),
                generation_counter: AtomicU64::new(1),
                recovery: Mutex::new(None),
                fetch_costs: fetchcost::FetchCosts::default(),
                cache_room,
            }),
        };
        // Other volumes of the budget may now ask this one to upload or
        // to give back cache bytes.
        let weak: Weak<Inner> = Arc::downgrade(&v.inner);
        budget.cache.attach(cache_id, weak.clone());
        if let Some(d) = &v.inner.dirty {
            d.attach(weak);
        }
        if !read_only {
            v.start_committer();
        }
        if let (Some(mut c), Some(mut rec)) = (claimed, recovery) {
            if rec.adopted {
                v.replay_log(&c, &mut rec).await?;
            } else {
                c.clear().map_err(|e| log_io(&c.dir, e))?;
            }
            let dir = c.dir.clone();
            let l = c.into_log().map_err(|e| log_io(&dir, e))?;
            if rec.adopted {
                tracing::info!(volume = vol, log = %dir.display(), entries = rec.entries, bytes = rec.bytes, "unflushed writes of the previous process replayed from its write-back log");
            }
            v.inner.lock().log = Some(l);
            *v.inner.recovery.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec);
        }
        Ok(v)
    }

    /// What opening found in the write-back log directory (`None`: no log).
    pub fn log_recovery(&self) -> Option<LogRecovery> {
        self.inner.recovery.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Apply a dead predecessor's logged writes, in order, through the
    /// write path (not logged again: they stay in its segments until a
    /// flush commits them).
    async fn replay_log(&self, c: &log::Claimed, rec: &mut LogRecovery) -> VolumeResult<()> {
        let damaged = |e: log::LogError| {
            VolumeError::Corrupt(format!(
                "the write-back log of the previous writer cannot be replayed: {e}; to open the volume as of its \
                 last flush (losing the writes acknowledged after it), move {} aside",
                c.dir.display()
            ))
        };
        // All or nothing: every segment is read back before one entry is
        // applied.
        c.check().map_err(damaged)?;
        let segments = c.segments().map_err(|e| log_io(&c.dir, e))?;
        // Only the newest logged bytes of each range are applied, not every
        // entry in turn: the dirty budget may make the replay commit part
        // way, and an older entry applied over what the dead writer had
        // already committed after it would otherwise be committed, taking
        // the volume back in time until a later entry is replayed (or for
        // good, if this writer dies first). A volume part-replayed holds,
        // block by block, its committed bytes or the newest acknowledged
        // ones: a subset of unflushed writes, as a volatile cache may.
        let mut ranges = Vec::new();
        // Per entry that covers bytes: its segment and where its payload is.
        let mut sources = Vec::new();
        let mut size = None;
        for (i, n) in segments.iter().enumerate() {
            for (at, e) in c.read_segment_at(*n, i + 1 == segments.len()).map_err(damaged)? {
                match e {
                    log::Entry::Write { offset, data } => {
                        ranges.push((offset, data.len() as u64));
                        sources.push(Some((*n, at, offset)));
                    }
                    log::Entry::Zero { offset, len } => {
                        ranges.push((offset, len));
                        sources.push(None);
                    }
                    log::Entry::Size(s) => size = size.max(Some(s)),
                }
            }
        }
        if let Some(s) = size {
            let mut st = self.inner.lock();
            st.size = st.size.max(s);
        }
        // An entry past the volume's end is damage: refused before any
        // entry is applied (and before the block arithmetic below, which
        // holds for bytes of the volume only).
        let end = self.size();
        if let Some(&(offset, len)) = ranges.iter().find(|(o, l)| o.checked_add(*l).is_none_or(|e| e > end)) {
            let why = format!("an entry for {len} bytes at {offset} is past the volume's end ({end})");
            return Err(damaged(log::LogError::Damaged { path: c.dir.clone(), at: 0, why }));
        }
        let keep = newest_parts(&ranges);
        // A block whose newest bytes are in two parts or more (of one entry
        // or several) is written whole, once, at the end: written part by
        // part, a commit between the parts would store a block that never
        // was (the newest bytes of one entry beside the committed ones
        // another entry had overwritten).
        let shared = shared_blocks(&keep);
        let mut at = 0;
        for (i, n) in segments.iter().enumerate() {
            for e in c.read_segment(*n, i + 1 == segments.len()).map_err(damaged)? {
                let parts = match &e {
                    log::Entry::Size(_) => &[][..],
                    _ => {
                        at += 1;
                        keep.get(at - 1).map_or(&[][..], Vec::as_slice)
                    }
                };
                for &(start, end) in parts {
                    let (start, end) = outside_blocks(start, end, &shared);
                    if start >= end {
                        continue;
                    }
                    let r = match &e {
                        log::Entry::Write { offset, data } => {
                            let from = (start - offset) as usize;
                            self.write(start, &data[from..from + (end - start) as usize]).await
                        }
                        log::Entry::Zero { .. } => self.write_zeroes(start, end - start).await,
                        log::Entry::Size(_) => Ok(()),
                    };
                    r.map_err(|err| replay_damage(err, &damaged, &c.dir))?;
                }
                rec.entries += 1;
                if let log::Entry::Write { data, .. } = &e {
                    rec.bytes += data.len() as u64;
                }
            }
        }
        for (block, parts) in &shared {
            let first = block * REPLAY_BLOCK;
            let len = REPLAY_BLOCK.min(self.size().saturating_sub(first));
            let mut buf = self.read(first, len).await.map_err(|err| replay_damage(err, &damaged, &c.dir))?;
            for &(entry, start, end) in parts {
                let Some(to) = buf.get_mut((start - first) as usize..(end - first) as usize) else {
                    let why = format!("an entry for bytes {start}..{end} is past the volume's end");
                    return Err(damaged(log::LogError::Damaged { path: c.dir.clone(), at: 0, why }));
                };
                match sources.get(entry).copied().flatten() {
                    Some((seg, payload, offset)) => {
                        c.read_payload(seg, payload + (start - offset), to).map_err(|e| log_io(&c.dir, e))?
                    }
                    None => to.fill(0),
                }
            }
            self.write(first, &buf).await.map_err(|err| replay_damage(err, &damaged, &c.dir))?;
        }
        Ok(())
    }

    pub fn meta(&self) -> &VolumeMeta {
        &self.inner.meta
    }

    /// The store it was opened through (sealing, for an encrypted volume).
    pub fn store(&self) -> &DynStore {
        &self.inner.store
    }

    /// Its key prefix in that store.
    pub fn prefix(&self) -> &str {
        &self.inner.vol
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

    /// Its metrics (the NBD server records its requests there).
    pub fn metrics(&self) -> &crate::metrics::VolumeMetrics {
        &self.inner.metrics
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
            dirty_bytes: st.dirty_bytes(),
            staged_chunks: st.staged.len() as u64,
            patched_chunks: st.patches.len() as u64,
            patch_bytes: st.patch_bytes,
            cache_bytes: st.clean.bytes(),
            cache_hits: st.clean.hits,
            cache_misses: st.clean.misses,
            fenced: st.fenced.is_some(),
        }
    }

    /// Does the volume read as zeros everywhere, its parents' chunks
    /// included (nothing but trims, zeroes and discards was ever
    /// committed, and nothing is pending)? Then making a filesystem on it
    /// overwrites nothing.
    pub fn reads_as_zeros(&self) -> bool {
        let zeros = |map: &ChunkMap| map.values().all(|r| matches!(r, ChunkRef::Zero));
        let st = self.inner.lock();
        // Chunks zeroed and not yet committed (a trim, or a flatten's copy
        // of a parent's ZERO chunk) are zeros too.
        zeros(&st.map)
            && st.patches.is_empty()
            && st.slots.values().all(|s| matches!(s.data, DirtyData::Zero))
            && st.staged.values().all(|s| s.data.is_none())
            && self.inner.parents.iter().all(|p| zeros(&p.map) && p.patches.is_empty())
    }

    /// Flush, then record a snapshot pinning the committed state.
    pub async fn snapshot(&self, name: &str) -> VolumeResult<SnapshotRecord> {
        format::validate_snapshot_name(name).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
        if self.inner.opts.read_only {
            // Its head is where it was opened (or last followed the journal).
            return Err(VolumeError::InvalidArgument(format!(
                "snapshot {name}: a read-only handle takes no snapshot; snapshot the volume's committed head instead"
            )));
        }
        self.flush().await?;
        let (seq, size) = {
            let st = self.inner.lock();
            (st.head, st.committed_size)
        };
        let started = Instant::now();
        // A writer fenced without knowing it (nothing to commit since)
        // holds a head another writer has moved past, maybe long ago: a
        // compaction running now may fold past it after the check in
        // `record_snapshot` (which sees its record still there). So the
        // seq after it must be free, or a record of this writer's own (a
        // commit since, young): then no compaction folds past it before
        // it sees the snapshot.
        let next = journal_key(&self.inner.vol, seq + 1);
        match self.inner.store.get(&next, None).await {
            Err(StoreError::NotFound(_)) => {}
            Ok(b) => {
                let r = JournalRecord::decode(&b, &next)?;
                if r.writer != self.inner.writer {
                    return Err(self.inner.fence(format!(
                        "record {} is another writer's: this one's head ({seq}) is not the volume's, no snapshot \
                         {name} taken",
                        seq + 1
                    )));
                }
            }
            Err(e) => return Err(e.into()),
        }
        // And the record at the head itself still there: a compaction
        // deleting records (in ascending order) has not reached it, so the
        // one after it was never deleted either (only created, by this
        // writer, since). A checkpoint at the head alone is no proof: a
        // pass deleting records below its fold point deletes checkpoints
        // after them.
        if self.inner.store.head(&journal_key(&self.inner.vol, seq)).await?.is_none() {
            return Err(VolumeError::Store(StoreError::Transient(format!(
                "snapshot {name}: record {seq}, this writer's head, was folded by compaction; no snapshot taken, try again"
            ))));
        }
        let rec = SnapshotRecord {
            format_version: format::FORMAT_V1,
            name: name.to_string(),
            seq,
            size,
            created_unix: self.inner.opts.clock.now_unix(),
            token: Some(rand::random()),
            clone: None,
            auth: None,
        };
        record_snapshot(&self.inner.store, &self.inner.vol, rec, started, true).await
    }
}

/// Pin the volume's committed head under a snapshot name without taking
/// over the volume: a live writer keeps going. `for_clone`: the record is
/// the pin of that clone (as its marker names it).
pub async fn snapshot_committed(
    store: &DynStore,
    vol: &str,
    name: &str,
    for_clone: Option<&str>,
    clock: &dyn Clock,
) -> VolumeResult<SnapshotRecord> {
    format::validate_snapshot_name(name).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let started = Instant::now();
    let meta = replay::read_meta(store.as_ref(), vol).await?;
    keys::require(store.as_ref(), vol, &meta)?;
    let st = replay::replay(store.as_ref(), vol, meta.chunk_size as u64, None).await?;
    let rec = SnapshotRecord {
        format_version: format::FORMAT_V1,
        name: name.to_string(),
        seq: st.head,
        size: st.size,
        created_unix: clock.now_unix(),
        token: Some(rand::random()),
        clone: for_clone.map(str::to_string),
        auth: None,
    };
    record_snapshot(store, vol, rec, started, false).await
}

/// Record the snapshot `rec`, then check the seq it pins is still
/// replayable (its journal record or a checkpoint at it exists): compaction
/// folds only records older than its safety age and keeps what every
/// snapshot it lists needs, so a snapshot that took long between reading
/// the head (`started`) and being recorded, or that pins a seq already
/// folded, is withdrawn rather than left unreadable. With `same_seq_ok`, a
/// record already there at the same seq is this snapshot recorded before;
/// otherwise any record there is someone else's.
async fn record_snapshot(
    store: &DynStore,
    vol: &str,
    rec: SnapshotRecord,
    started: Instant,
    same_seq_ok: bool,
) -> VolumeResult<SnapshotRecord> {
    let mut rec = rec;
    keys::tag_snapshot(store.as_ref(), vol, &mut rec);
    let name = rec.name.clone();
    let body = serde_json::to_vec_pretty(&rec).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let key = snapshot_key(vol, &name);
    let body = Bytes::from(body);
    let (rec, ours) = match store.put(&key, body.clone(), PutMode::IfAbsent).await {
        Ok(()) => (rec, true),
        Err(StoreError::PreconditionFailed(_)) => {
            // This PUT may have landed with its answer lost and been
            // retried: the very bytes there are this record, to be checked
            // (and taken back) as this call's own.
            let there = match store.get(&key, None).await {
                Ok(b) => Some(b),
                Err(StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            if rec.token.is_some() && there.as_ref() == Some(&body) {
                (rec, true)
            } else if same_seq_ok {
                let existing = read_snapshot(store, vol, &name).await?;
                if existing.seq != rec.seq {
                    return Err(VolumeError::AlreadyExists(format!("snapshot {name}")));
                }
                (existing, false)
            } else {
                return Err(VolumeError::AlreadyExists(format!("snapshot {name}")));
            }
        }
        Err(e) => return Err(e.into()),
    };
    // The volume may have been deleted since it was looked at: a record
    // landing after the delete's last listing would be left behind under
    // a prefix without a volume, and one behind a tombstone would pin a
    // deleted volume's data. (A record already there is left alone.)
    if ours {
        let meta = match store.get(&format::meta_key(vol), None).await {
            Ok(b) => Some(b),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if meta.is_none() || store.head(&crate::volume::catalog::tombstone_key(vol)).await?.is_some() {
            store.delete(&key).await?;
            return Err(VolumeError::NotFound(format!("{vol} (deleted while snapshot {name} was being taken)")));
        }
        // A flatten let go of the parent that seq reads through after it
        // listed the snapshots (it lists them again after it writes
        // `volume.json`, so a record it did not see there sees this).
        if let Some(f) = meta.and_then(|b| VolumeMeta::decode(&b).ok()).and_then(|m| m.flattened)
            && f.seq > rec.seq
        {
            store.delete(&key).await?;
            return Err(VolumeError::Store(StoreError::Transient(format!(
                "snapshot {name}: the volume was flattened at seq {} after this snapshot read seq {}; try again",
                f.seq, rec.seq
            ))));
        }
    }
    let slow = started.elapsed() > SNAPSHOT_DEADLINE;
    if slow || !super::compact::snapshot_still_replayable(store, vol, rec.seq).await? {
        store.delete(&key).await?;
        return Err(VolumeError::Store(StoreError::Transient(format!(
            "snapshot {name} could not be recorded at seq {} (compaction may have folded it); try again",
            rec.seq
        ))));
    }
    Ok(rec)
}

/// Is `rec`, a snapshot record of `vol` found by name, one a flatten left
/// unreadable: at a seq before the one from which `vol` reads without the
/// parent it let go of? Such a record can only be one whose PUT landed
/// after its recorder gave up (or withdrew it): none is kept otherwise.
/// It never opens; it is deleted here (when still the record read), and
/// `true` tells the caller to take the snapshot again.
pub async fn take_back_if_outlived(store: &DynStore, vol: &str, rec: &SnapshotRecord) -> VolumeResult<bool> {
    let meta = replay::read_meta(store.as_ref(), vol).await?;
    let (None, Some(f)) = (&meta.parent, &meta.flattened) else { return Ok(false) };
    if rec.seq >= f.seq {
        return Ok(false);
    }
    let key = snapshot_key(vol, &rec.name);
    match store.get(&key, None).await {
        Ok(b) if SnapshotRecord::decode(&b, &key).is_ok_and(|now| now.seq == rec.seq && now.token == rec.token) => {
            tracing::warn!(volume = vol, snapshot = %rec.name, seq = rec.seq, flattened_at = f.seq, "a snapshot record that landed after the volume was flattened is taken back");
            store.delete(&key).await?;
        }
        Ok(_) | Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(true)
}

/// Longest a snapshot of a volume with a live writer may take between
/// reading the head and recording it; well under compaction's safety age.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(30);

/// Deepest clone chain followed (clone of a clone of ...).
const MAX_CLONE_DEPTH: usize = 32;

/// `vol`, flattened as `f` says, read as of `seq`: from `f.seq` on its
/// own chunks cover what its parent gave it; before, they may not, and the
/// parent is let go of. A flatten keeps its parent while any snapshot
/// pins an earlier seq, and a snapshot recorded meanwhile withdraws
/// itself: one read at such a seq is on its way out (`pinned`), a head
/// there is damage.
fn check_flattened_at(vol: &str, f: &format::FlattenedFrom, seq: u64, pinned: bool) -> VolumeResult<()> {
    if seq >= f.seq {
        return Ok(());
    }
    let why = format!(
        "{vol} was flattened at seq {} (its parent {} let go of), so seq {seq} does not read without it",
        f.seq, f.parent.volume
    );
    Err(match pinned {
        true => {
            VolumeError::Store(StoreError::Transient(format!("{why}; a snapshot there is being withdrawn, try again")))
        }
        false => VolumeError::Corrupt(why),
    })
}

/// Does `meta`'s volume, read as of `seq`, need its parent? Not from the
/// seq a flatten recorded on: its own chunks cover all the parent gave it
/// (so a `volume.json` that names the parent again, as a rekey racing the
/// flatten's last step may leave it, still opens once the parent is gone).
fn needs_parent(meta: &VolumeMeta, seq: u64) -> Option<ParentRef> {
    match &meta.flattened {
        Some(f) if seq >= f.seq => None,
        _ => meta.parent.clone(),
    }
}

/// The maps of `vol`'s parents, each as of the seq it reads through; `vol`
/// is read as of `seq`.
async fn load_parents(store: &DynStore, vol: &str, meta: &VolumeMeta, seq: u64) -> VolumeResult<Vec<Parent>> {
    let mut parents = Vec::new();
    let mut child = vol.to_string();
    let mut next = needs_parent(meta, seq);
    while let Some(p) = next {
        if parents.len() >= MAX_CLONE_DEPTH {
            return Err(VolumeError::Corrupt(format!("clone chain deeper than {MAX_CLONE_DEPTH}")));
        }
        let pmeta = replay::read_meta(store.as_ref(), &p.volume).await?;
        if pmeta.chunk_size != meta.chunk_size {
            return Err(VolumeError::Corrupt(format!("clone parent {} has another chunk size", p.volume)));
        }
        let pst = match replay::replay(store.as_ref(), &p.volume, meta.chunk_size as u64, Some(p.seq)).await {
            Ok(pst) if pst.head == p.seq => Ok(pst),
            Ok(pst) => Err(VolumeError::Corrupt(format!(
                "clone parent {} replays to seq {}, not to seq {} that {child} reads through",
                p.volume, pst.head, p.seq
            ))),
            Err(e) => Err(e),
        };
        // A delete of the clone lets go of its pin in the parent before it
        // removes the rest: the parent's compaction may then fold past
        // that seq under this replay. The clone is being deleted (its
        // tombstone is written first), not damaged. Further up the chain
        // a pin goes only once the volume opened is being deleted too (a
        // deleted middle volume is kept, pin and all, while a clone reads
        // through it): a volume opened that is not tombstoned is damaged.
        let pst = match pst {
            Err(VolumeError::Corrupt(why))
                if store.head(&crate::volume::catalog::tombstone_key(vol)).await?.is_some() =>
            {
                tracing::info!(volume = %child, parent = %p.volume, reason = %why, "the parent of a clone being deleted cannot be read through any more");
                return Err(VolumeError::NotFound(format!("{vol} (deleted while it was being opened)")));
            }
            r => r?,
        };
        if let (None, Some(f)) = (&pmeta.parent, &pmeta.flattened) {
            check_flattened_at(&p.volume, f, p.seq, true)?;
        }
        parents.push(Parent { vol: p.volume.clone(), map: pst.map, patches: pst.patches });
        child = p.volume.clone();
        next = needs_parent(&pmeta, p.seq);
    }
    Ok(parents)
}

pub async fn read_snapshot(store: &DynStore, vol: &str, name: &str) -> VolumeResult<SnapshotRecord> {
    format::validate_snapshot_name(name).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let key = snapshot_key(vol, name);
    match store.get(&key, None).await {
        Ok(b) => {
            let rec = SnapshotRecord::decode(&b, &key)?;
            keys::check_snapshot(store.as_ref(), vol, name, &rec, &key)?;
            Ok(rec)
        }
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
    opts: &OpenOptions,
    mut log: Option<&mut TakingLog>,
) -> VolumeResult<(u64, Stamp)> {
    let clock = opts.clock.as_ref();
    // A deleted volume kept behind its tombstone for the snapshots or clones
    // that read through it: whatever a writer acknowledged there would go
    // with the rest once the reaper finishes the delete.
    if store.head(&crate::volume::catalog::tombstone_key(vol)).await?.is_some() {
        return Err(VolumeError::NotFound(format!(
            "{vol} (deleted: its objects are kept only for the snapshots or clones that read through it; it can be \
             read, not written)"
        )));
    }
    let chunk_size = meta.chunk_size as u64;
    for _ in 0..32 {
        // Never after another writer's record (`OpenOptions::expect_head`).
        if let Some(h) = opts.expect_head
            && st.head != h
        {
            return Err(VolumeError::Fenced(format!(
                "{vol}: the journal is at seq {}, past the seq {h} this writer checked before it opened; not opened",
                st.head
            )));
        }
        let seq = st.head + 1;
        // Our open record may land from here on: a log taken over must not
        // outlive another writer's open, even if we die before we know.
        if let Some(l) = log.as_mut() {
            l.before_append(st.epoch)?;
        }
        let rec = JournalRecord {
            kind: RecordKind::Open,
            seq,
            epoch: seq,
            size: st.size,
            writer,
            created_unix: clock.now_unix(),
            chunks: Vec::new(),
            inline: Vec::new(),
        };
        let bytes = Bytes::from(rec.encode());
        let sent = Stamp::now(clock);
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
            deleted_since_open(store, vol, seq).await?;
            let proof = if meta.single_writer {
                Ok(())
            } else {
                // An open record is never in doubt long: no checkpoint
                // vouches for it.
                journal::prove_successor(store.as_ref(), vol, seq, st.head_bytes.as_ref(), None).await?
            };
            match proof {
                Ok(()) => {
                    let prev_epoch = st.epoch;
                    st.apply(&rec, chunk_size)?;
                    st.head_bytes = Some(bytes);
                    return Ok((prev_epoch, sent));
                }
                Err(why) => {
                    tracing::info!(volume = vol, seq, reason = %why, "open record landed behind the journal; replaying");
                    // It may have landed in a hole compaction left after
                    // another writer's open: a log taken over is
                    // superseded (its epoch number may even recur).
                    if let Some(l) = log.as_mut() {
                        l.supersede(seq)?;
                    }
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

/// The tombstone check before an open record is check-then-act: a delete
/// can tombstone the volume, and even purge it, between the check and the
/// record landing. So the check is made again once the record is ours, and
/// the open fails on a tombstone or a `volume.json` gone. A delete writes
/// its tombstone before it deletes anything and `volume.json` before the
/// rest, then lists again until nothing but the tombstone is left: a
/// record that landed while `volume.json` was still there is seen by a
/// later listing; one that landed after is not, and is taken back here
/// (no volume is left for it to belong to).
///
/// A store error here is not a reason to fail: the record has landed and
/// fenced the writer before, and an open failing after that leaves a log
/// it took over harder to adopt (a later opener finds it by this record,
/// which compaction may fold away meanwhile). Unknown is taken for "not
/// deleted", as it was before this check existed.
async fn deleted_since_open(store: &DynStore, vol: &str, seq: u64) -> VolumeResult<()> {
    let looked = async {
        let meta_gone = store.head(&format::meta_key(vol)).await?.is_none();
        let tombstoned = meta_gone || store.head(&crate::volume::catalog::tombstone_key(vol)).await?.is_some();
        Ok::<_, StoreError>((meta_gone, tombstoned))
    };
    let meta_gone = match looked.await {
        Ok((_, false)) => return Ok(()),
        Ok((meta_gone, true)) => meta_gone,
        Err(e) => {
            tracing::warn!(volume = vol, error = %e, "cannot tell whether the volume was deleted while it was opened; going on");
            return Ok(());
        }
    };
    if meta_gone {
        let key = format::journal_key(vol, seq);
        if let Err(e) = store.delete(&key).await {
            tracing::warn!(volume = vol, key = %key, error = %e, "removing the open record of a volume deleted meanwhile failed");
        }
    }
    Err(VolumeError::NotFound(format!("{vol} (deleted while it was being opened)")))
}

/// The create record (seq 0) of a volume whose `volume.json` is `meta`.
fn create_record(meta: &VolumeMeta) -> Bytes {
    let rec = JournalRecord {
        kind: RecordKind::Create,
        seq: 0,
        epoch: 0,
        size: meta.size,
        writer: 0,
        created_unix: meta.created_unix,
        chunks: Vec::new(),
        inline: Vec::new(),
    };
    Bytes::from(rec.encode())
}

/// The unit a write-back log replay never leaves half applied: a block
/// holds, at every commit, bytes it held at once (a kernel's writes are
/// made of whole 512-byte sectors or 4 KiB blocks).
const REPLAY_BLOCK: u64 = 4096;

/// The blocks of [`REPLAY_BLOCK`] holding two or more of `parts` (from
/// [`newest_parts`]), each with those parts as `(entry, start, end)`.
/// Only the blocks where a part starts or ends can: a block inside a part
/// holds nothing else.
fn shared_blocks(parts: &[Vec<(u64, u64)>]) -> BTreeMap<u64, Vec<(usize, u64, u64)>> {
    let mut blocks: BTreeMap<u64, Vec<(usize, u64, u64)>> = BTreeMap::new();
    for (entry, ps) in parts.iter().enumerate() {
        for &(start, end) in ps {
            if start >= end {
                continue;
            }
            let (first, last) = (start / REPLAY_BLOCK, (end - 1) / REPLAY_BLOCK);
            for b in [first, last] {
                let (lo, hi) = (b * REPLAY_BLOCK, (b + 1) * REPLAY_BLOCK);
                if start > lo || end < hi {
                    let piece = (entry, start.max(lo), end.min(hi));
                    let v = blocks.entry(b).or_default();
                    if !v.contains(&piece) {
                        v.push(piece);
                    }
                }
            }
        }
    }
    blocks.retain(|_, v| v.len() > 1);
    blocks
}

/// `[start, end)` without its first and last block when those are in
/// `shared` (only a part's end blocks can be).
fn outside_blocks(start: u64, end: u64, shared: &BTreeMap<u64, Vec<(usize, u64, u64)>>) -> (u64, u64) {
    if start >= end {
        return (start, start);
    }
    let (first, last) = (start / REPLAY_BLOCK, (end - 1) / REPLAY_BLOCK);
    let from = match shared.contains_key(&first) {
        true => (first + 1) * REPLAY_BLOCK,
        false => start,
    };
    let to = match shared.contains_key(&last) {
        true => last * REPLAY_BLOCK,
        false => end,
    };
    (from, to.max(from))
}

/// An error applying a replayed entry: one the entry itself caused is the
/// log's damage.
fn replay_damage(
    err: VolumeError,
    damaged: &impl Fn(log::LogError) -> VolumeError,
    dir: &std::path::Path,
) -> VolumeError {
    match err {
        VolumeError::OutOfRange { .. } | VolumeError::InvalidArgument(_) => {
            damaged(log::LogError::Damaged { path: dir.to_path_buf(), at: 0, why: err.to_string() })
        }
        other => other,
    }
}

/// For ranges `(offset, len)` in the order they were written, the parts of
/// each that no later range overwrote, as `[start, end)` pairs: applying
/// just those gives the same bytes as applying every range in order.
fn newest_parts(ranges: &[(u64, u64)]) -> Vec<Vec<(u64, u64)>> {
    // Disjoint covered intervals, start → end.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = vec![Vec::new(); ranges.len()];
    for (i, &(offset, len)) in ranges.iter().enumerate().rev() {
        let (start, end) = (offset, offset.saturating_add(len));
        if start >= end {
            continue;
        }
        // The covered intervals that touch [start, end), merged with it.
        let first = covered.range(..=start).next_back().filter(|(_, e)| **e >= start).map(|(s, _)| *s);
        let touching: Vec<(u64, u64)> = covered.range(first.unwrap_or(start)..=end).map(|(s, e)| (*s, *e)).collect();
        let mut pos = start;
        for &(s, e) in &touching {
            if s > pos {
                out[i].push((pos, s.min(end)));
            }
            pos = pos.max(e);
        }
        if pos < end {
            out[i].push((pos, end));
        }
        let (mut lo, mut hi) = (start, end);
        for (s, e) in touching {
            covered.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        covered.insert(lo, hi);
    }
    out
}

fn log_io(dir: &std::path::Path, e: std::io::Error) -> VolumeError {
    VolumeError::LocalLog {
        no_space: e.kind() == std::io::ErrorKind::StorageFull,
        why: format!("write-back log {}: {e}", dir.display()),
    }
}

/// A log directory an opening writer holds: taken over from a dead
/// process, or new.
#[derive(Debug)]
struct TakingLog {
    c: log::Claimed,
    rec: LogRecovery,
    /// Journal epochs the taken-over writes sit on top of: the one they
    /// were written at, and our own open records.
    ok_epochs: Vec<u64>,
    uuid: String,
    /// The store and prefix: a copy of the volume elsewhere (same uuid)
    /// never takes this one's log.
    at: String,
    writer: u64,
    /// This boot's id as read when the log was chosen.
    boot: Option<String>,
}

impl TakingLog {
    /// Before each attempt at our open record, and once it landed, with
    /// the journal's epoch below it: another writer's epoch there means
    /// the taken-over writes are superseded. They are deleted (and the
    /// state says so) before the record can land.
    fn before_append(&mut self, epoch: u64) -> VolumeResult<()> {
        if !self.rec.adopted || self.ok_epochs.contains(&epoch) {
            return Ok(());
        }
        self.supersede(epoch)
    }

    /// The taken-over writes are superseded: delete them, and say so in
    /// the state before anything else can land.
    fn supersede(&mut self, epoch: u64) -> VolumeResult<()> {
        if !self.rec.adopted {
            return Ok(());
        }
        self.ok_epochs.clear();
        tracing::warn!(
            log = %self.c.dir.display(), epoch,
            "the volume was opened by another writer meanwhile: its predecessor's unflushed writes are discarded"
        );
        self.c.clear().map_err(|e| log_io(&self.c.dir, e))?;
        let state = log::LogState {
            volume: self.uuid.clone(),
            epoch,
            next_writer: Some(self.writer),
            boot: self.boot.clone(),
            at: Some(self.at.clone()),
        };
        self.c.set_state(state).map_err(|e| log_io(&self.c.dir, e))?;
        self.rec.adopted = false;
        Ok(())
    }
}

/// Choose this writer's log directory under `root/<uuid>`: a dead
/// process's of this boot whose writes sit on top of the journal as
/// replayed (its epoch is the journal's, or it was opening and its open
/// record is the journal's last), else a new one. Logs of superseded
/// writers and of earlier boots are removed. The chosen one is marked
/// with `writer` before returning.
async fn claim_log(
    store: &DynStore,
    vol: &str,
    meta: &VolumeMeta,
    st: &Replayed,
    root: &std::path::Path,
    writer: u64,
) -> VolumeResult<TakingLog> {
    // The uuid names a directory here: only what s3blk itself writes.
    // (Lowercase, as it writes them: the sweep of earlier boots' logs
    // passes over any other name and would never remove its logs.)
    if !format::is_lower_hex(&meta.uuid, 32) {
        return Err(VolumeError::Corrupt(format!("volume.json of {vol} has a malformed uuid {:?}", meta.uuid)));
    }
    let at = format!("{}/{vol}", store.describe());
    let root = root.join(&meta.uuid);
    let found = log::scan(&root).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => VolumeError::Corrupt(e.to_string()),
        _ => log_io(&root, e),
    })?;
    let mut rec = LogRecovery::default();
    let mut chosen = None;
    let mut opener = None;
    // Unreadable now: refused, not taken for another boot's (which would
    // throw away the acknowledged writes of a log of this one).
    let boot = log::boot_id().map_err(|e| VolumeError::LocalLog {
        no_space: false,
        why: format!("cannot tell which boot wrote the write-back logs under {}: {e}", root.display()),
    })?;
    for c in found {
        let this_boot = boot.is_some() && c.state.as_ref().is_some_and(|s| s.boot == boot);
        let here = c.state.as_ref().is_some_and(|s| s.volume == meta.uuid && s.at.as_deref() == Some(at.as_str()));
        // The open record at the journal's epoch was read by the replay
        // only if no checkpoint covers it; an object under a folded seq
        // may be a late record that landed in a hole.
        let open_replayed = st.checkpoint.is_none_or(|c| c < st.epoch);
        if !here && c.state.is_some() {
            // A copy of this volume elsewhere (same uuid): its log is its
            // own, neither taken nor removed here.
            continue;
        }
        let ours = match &c.state {
            _ if !this_boot || !here => false,
            Some(s) if s.epoch == st.epoch && s.epoch != 0 => true,
            Some(s) if s.next_writer.is_some() && open_replayed => {
                if opener.is_none() {
                    opener = Some(open_record_writer(store, vol, st.epoch).await?);
                }
                opener == Some(s.next_writer)
            }
            _ => false,
        };
        if ours && chosen.is_none() {
            chosen = Some(c);
            continue;
        }
        tracing::warn!(
            volume = vol, log = %c.dir.display(), epoch = c.state.as_ref().map(|s| s.epoch),
            "discarding the write-back log of a superseded writer (the volume was opened by another writer since, or \
             the node rebooted: a crashed node may lose unflushed writes)"
        );
        rec.discarded += 1;
        let dir = c.dir.clone();
        c.discard().map_err(|e| log_io(&dir, e))?;
    }
    rec.adopted = chosen.is_some();
    let mut c = match chosen {
        Some(c) => c,
        None => log::create(&root).map_err(|e| log_io(&root, e))?,
    };
    let epoch = c.state.as_ref().map_or(0, |s| s.epoch);
    let state = log::LogState {
        volume: meta.uuid.clone(),
        epoch,
        next_writer: Some(writer),
        boot: boot.clone(),
        at: Some(at.clone()),
    };
    c.set_state(state).map_err(|e| log_io(&c.dir, e))?;
    Ok(TakingLog { c, rec, ok_epochs: vec![st.epoch], uuid: meta.uuid.clone(), at, writer, boot })
}

/// The writer id of the open record at `epoch` (`None`: not readable any
/// more, or not an open record).
async fn open_record_writer(store: &DynStore, vol: &str, epoch: u64) -> VolumeResult<Option<u64>> {
    let key = journal_key(vol, epoch);
    match store.get(&key, None).await {
        Ok(b) => Ok(JournalRecord::decode(&b, &key).ok().filter(|r| r.kind == RecordKind::Open).map(|r| r.writer)),
        Err(StoreError::NotFound(_)) => Ok(None),
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

    /// A fenced writer's memory holds writes that will never be committed:
    /// answering reads from it would show data no one else ever sees.
    fn check_not_fenced(&self) -> VolumeResult<()> {
        match &self.lock().fenced {
            Some(why) => Err(VolumeError::Fenced(why.clone())),
            None => Ok(()),
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
}

/// Read at scrape time: one short hold of the state lock per scrape.
impl crate::metrics::VolumeFigures for Inner {
    fn figures(&self) -> crate::metrics::Figures {
        let st = self.lock();
        crate::metrics::Figures {
            dirty_bytes: st.dirty_bytes(),
            cache_bytes: st.clean.bytes(),
            staged_chunks: st.staged.len() as u64,
            journal_records: st.head.saturating_sub(st.checkpoint_seq),
            write_log_bytes: st.log.as_ref().map_or(0, |l| l.bytes()),
            patch_bytes: st.patch_bytes,
        }
    }
}

impl Uploads for Inner {
    fn start_uploads(self: Arc<Self>) {
        Volume { inner: self }.kick_uploader();
    }
}

impl CacheMember for Inner {
    fn try_sweep(&self, want: u64) -> u64 {
        match self.state.try_lock() {
            Ok(mut st) => st.clean.sweep(want),
            Err(TryLockError::Poisoned(p)) => p.into_inner().clean.sweep(want),
            Err(TryLockError::WouldBlock) => 0,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut st = self.lock();
        let log = st.log.take();
        if !st.slots.is_empty() || !st.staged.is_empty() || st.pending.is_some() {
            match &log {
                Some(l) => tracing::warn!(
                    volume = %self.vol, dirty = st.slots.len(), staged = st.staged.len(), log = %l.dir().display(),
                    "volume closed with unflushed writes: they stay in its write-back log for the next writer on this host"
                ),
                None => {
                    tracing::warn!(volume = %self.vol, dirty = st.slots.len(), staged = st.staged.len(), "volume closed with unflushed writes")
                }
            }
        } else if let Some(l) = log {
            // Every write is committed: the log has nothing left to give.
            l.discard();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{REPLAY_BLOCK, newest_parts, outside_blocks, shared_blocks};

    /// A boot id that cannot be read when a writer opens: the open is
    /// refused and the dead writer's log stays, taken once the id reads
    /// again. It was taken for another boot's log and its acknowledged
    /// writes thrown away. (Current-thread runtime: the boot id file is
    /// this thread's stand-in.)
    #[tokio::test]
    async fn an_unreadable_boot_id_refuses_the_open_and_keeps_the_log() {
        use super::log::TEST_BOOT_ID_FILE;
        use super::{CreateOptions, OpenOptions, Volume, VolumeError};
        use crate::store::{DynStore, memory::MemoryStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = dir.path().join("boot_id");
        std::fs::write(&boot, "boot-a\n").expect("boot id");
        TEST_BOOT_ID_FILE.with(|f| *f.borrow_mut() = Some(boot.clone()));
        let store: DynStore = std::sync::Arc::new(MemoryStore::new());
        let opts = CreateOptions::new(1 << 20, 64 << 10);
        let uuid = Volume::create(store.clone(), "v/", opts, &crate::clock::SystemClock).await.expect("create").uuid;
        let logs = dir.path().join("logs");
        let with_log = || OpenOptions { log_dir: Some(logs.clone()), ..OpenOptions::default() };
        let v = Volume::open(store.clone(), "v/", with_log()).await.expect("open");
        let data = vec![0x5au8; 10_000];
        v.write(4096, &data).await.expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(v);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let count = || std::fs::read_dir(logs.join(&uuid)).map(|d| d.count()).unwrap_or(0);
        assert_eq!(count(), 1, "the dead writer's log");
        // A directory where the id should be: reading it fails.
        TEST_BOOT_ID_FILE.with(|f| *f.borrow_mut() = Some(dir.path().to_path_buf()));
        let refused = Volume::open(store.clone(), "v/", with_log()).await;
        match refused {
            Err(VolumeError::LocalLog { why, .. }) => assert!(why.contains("cannot tell which boot"), "{why}"),
            other => panic!("opened without knowing the boot: {:?}", other.map(|_| ())),
        }
        assert_eq!(count(), 1, "the log was thrown away");
        TEST_BOOT_ID_FILE.with(|f| *f.borrow_mut() = Some(boot.clone()));
        let v = Volume::open(store.clone(), "v/", with_log()).await.expect("open again");
        assert_eq!(v.log_recovery().map(|r| r.adopted), Some(true));
        assert_eq!(v.read(4096, data.len() as u64).await.expect("read"), data, "acknowledged writes were lost");
        TEST_BOOT_ID_FILE.with(|f| *f.borrow_mut() = None);
    }

    #[test]
    fn only_the_newest_bytes_of_each_range_are_kept() {
        // Written in this order: [0,10), [5,15), [20,30), [0,3), [25,26).
        let parts = newest_parts(&[(0, 10), (5, 10), (20, 10), (0, 3), (25, 1), (40, 0)]);
        assert_eq!(
            parts,
            vec![vec![(3, 5)], vec![(5, 15)], vec![(20, 25), (26, 30)], vec![(0, 3)], vec![(25, 26)], vec![]]
        );
        // A range covered by later ones on both sides and in the middle.
        let parts = newest_parts(&[(0, 100), (0, 10), (50, 10), (90, 10)]);
        assert_eq!(parts[0], vec![(10, 50), (60, 90)]);
        // Replaying the kept parts gives what replaying everything gives.
        let ranges: Vec<(u64, u64)> = (0..200u64).map(|i| ((i * 37) % 150, (i * 13) % 40 + 1)).collect();
        let (mut all, mut kept) = (vec![0usize; 200], vec![0usize; 200]);
        for (i, (o, l)) in ranges.iter().enumerate() {
            all[*o as usize..(*o + *l) as usize].fill(i + 1);
        }
        for (i, ps) in newest_parts(&ranges).iter().enumerate() {
            for (s, e) in ps {
                assert!(kept[*s as usize..*e as usize].iter().all(|&v| v == 0), "a byte kept twice");
                kept[*s as usize..*e as usize].fill(i + 1);
            }
        }
        assert_eq!(all, kept);
    }

    /// Many small random histories (adjacent, nested, zero-length and
    /// repeated ranges): the kept parts never overlap, each lies inside its
    /// own range, and laid in order they give what every range in turn
    /// gives. Ranges ending past `u64::MAX` are cut there.
    #[test]
    fn newest_parts_match_applying_every_range_in_order() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..2000 {
            let n = next(12) as usize;
            let ranges: Vec<(u64, u64)> = (0..n).map(|_| (next(32), next(12))).collect();
            let (mut all, mut kept) = ([0usize; 48], [0usize; 48]);
            for (i, (o, l)) in ranges.iter().enumerate() {
                all[*o as usize..(*o + *l) as usize].fill(i + 1);
            }
            for (i, ps) in newest_parts(&ranges).iter().enumerate() {
                let (o, l) = ranges[i];
                for (s, e) in ps {
                    assert!(o <= *s && s < e && *e <= o + l, "{ranges:?}: part {s}..{e} outside range {i}");
                    assert!(kept[*s as usize..*e as usize].iter().all(|&v| v == 0), "{ranges:?}: a byte kept twice");
                    kept[*s as usize..*e as usize].fill(i + 1);
                }
            }
            assert_eq!(all, kept, "{ranges:?}");
        }
        let m = u64::MAX;
        assert_eq!(
            newest_parts(&[(m - 5, 10), (m - 3, 1)]),
            vec![vec![(m - 5, m - 3), (m - 2, m)], vec![(m - 3, m - 2)]]
        );
    }

    /// The replay's steps (each entry's newest bytes outside shared blocks
    /// in log order, then each shared block whole) over random histories
    /// of unaligned ranges: after every step each block is either as
    /// before the replay or as after it, and after the last, every byte
    /// is its newest.
    #[test]
    fn a_replay_leaves_every_block_old_or_new_after_each_step() {
        const B: usize = REPLAY_BLOCK as usize;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..500 {
            let n = next(10) as usize + 1;
            let ranges: Vec<(u64, u64)> =
                (0..n).map(|_| (next(5 * REPLAY_BLOCK), next(3 * REPLAY_BLOCK) + 1)).collect();
            // Byte values: 0 before the replay, entry + 1 for an entry's bytes.
            let mut fin = vec![0usize; 9 * B];
            for (i, (o, l)) in ranges.iter().enumerate() {
                fin[*o as usize..(*o + *l) as usize].fill(i + 1);
            }
            let mut now = vec![0usize; 9 * B];
            let check = |now: &[usize]| {
                for b in 0..9 {
                    let (got, want) = (&now[b * B..(b + 1) * B], &fin[b * B..(b + 1) * B]);
                    assert!(
                        got.iter().all(|v| *v == 0) || got == want,
                        "{ranges:?}: block {b} was neither old nor new"
                    );
                }
            };
            let keep = newest_parts(&ranges);
            let shared = shared_blocks(&keep);
            for (i, ps) in keep.iter().enumerate() {
                for &(s, e) in ps {
                    let (s, e) = outside_blocks(s, e, &shared);
                    now[s as usize..e as usize].fill(i + 1);
                    check(&now);
                }
            }
            for (block, parts) in &shared {
                for &(i, s, e) in parts {
                    assert_eq!((s / REPLAY_BLOCK, (e - 1) / REPLAY_BLOCK), (*block, *block), "{ranges:?}");
                    now[s as usize..e as usize].fill(i + 1);
                }
                check(&now);
            }
            assert_eq!(now, fin, "{ranges:?}");
        }
    }
}
