//! Deterministic simulation of the volume engine.
//!
//! One `u64` seed decides a whole history: the volume's shape, every
//! actor's choices, every store call's latency and fault (transient
//! errors, lost answers, hangs, outages, latency spikes of seconds). Each
//! seed runs on its own single-threaded tokio runtime with paused time, so
//! sleeps, timeouts and retry backoff take no real time and happen in one
//! order.
//!
//! Actors, each an async task with its own store handle ([`SimStore`]
//! wrapped in the real [`RetryStore`]) and its own clock skew:
//! - writer sessions doing random writes, write-zeroes, reads, flushes
//!   (some cut short by a timeout, as a cancelled request), resizes,
//!   snapshots, and bursts of requests in flight at once on one handle
//!   (writes of distinct blocks, reads of anything, flushes, FUA-like
//!   writes: a write, then a flush for it); at random moments a new session takes over, either after
//!   the old one crashed (task aborted, store handle dead, its requests in
//!   flight landing or not) or while the old one lives on cut off from
//!   the store, fenced without knowing it yet; often it comes back only
//!   after compaction folded the journal past its last record, over a link
//!   that drops again as its first journal record lands (in the hole the
//!   fold left), so that its next flush reads that record back;
//! - each writer session keeps its local write-back log on one of two
//!   hosts (directories of the run's own) or has none; a takeover mostly
//!   runs on the host of the session before it (a restart in place),
//!   often on the other host, sometimes without a log, and so does the
//!   takeover at quiescence (the run's end kills every writer: it is a
//!   crash too). Before a session opens after a crash, the crashed
//!   writer's engine is waited for until it has closed its log (its own
//!   tasks fail on the dead store handle and let go of it), as a dead
//!   process's files are closed: in this one process, the flock a live
//!   engine holds on its log would otherwise hide the log from the next
//!   opener. Unlike a killed process, the closing engine removes its log
//!   when everything in it was committed (the next opener then has
//!   nothing to replay, as it would after replaying committed writes);
//!   each session reads the whole volume as soon as it opened;
//! - read-only openers (some at a snapshot) that read everything at open
//!   and then now and then;
//! - one to three compactors with the shortest safety age the engine
//!   calls safe beside a live writer, crashed mid-way at times, each pass
//!   on the volume or on one of its clones; their clocks are seconds off,
//!   minutes off, or ahead by more than the safety age (every upload not
//!   yet committed looks old to such a host);
//! - a cloner that restores clones from snapshots as the CSI controller
//!   does (a record of the parent under the clone's prefix, a pin in the
//!   parent, a clone marker, `volume.json` naming the pin), deletes snapshots (some that clones were restored from), and
//!   deletes clones with `catalog::delete_volume` while their writer and
//!   readers still work; each clone has a writer session and read-only
//!   openers of its own, reading through the parent while the parent is
//!   compacted.
//!
//! Same seed, same run: every store delay and fault is drawn from the seed
//! and the call itself (not from the order calls happen to start in), and
//! events due in the same instant run in a seeded order (see
//! `s3blk::store::sim`). `same_seed_same_run` checks it.
//!
//! The oracle keeps, per 4 KiB block, the history of every value written
//! there, in the order writes were issued, whichever session issued them
//! (a write is part of the history from the moment it is issued: the
//! engine may commit part of a write in progress; a write that failed stays
//! in it), and a durable floor: the newest write of a session acknowledged
//! before the start of a flush (or resize or snapshot) that session got
//! `Ok` for. A value that a reader of committed state saw raises the floor
//! too: a committed value cannot go back (what a writer opened with counts
//! as committed once it flushed, when it replayed a log). Then:
//! - a read of committed state (a read-only opener, the base a writer
//!   opened with, the final checks) returns a value at or above the floor;
//!   never an older one, never zeros in place of durable data, never bytes
//!   that were never written to the block;
//! - a write issued by a session after a later session's open succeeded is
//!   never visible, and a flush covering such a write is never acknowledged
//!   (the old session was fenced);
//! - a writer reads back exactly its own latest writes (blocks it has not
//!   written: the state it opened with, stable from read to read); a read
//!   beside writes in flight reads, per block, the value before or after
//!   each; a flush covers the writes acknowledged before it began;
//! - a writer is told it is fenced only when a later session tried to open;
//! - a writer that opens on the host of the last session to open, which
//!   crashed, with no session elsewhere trying to open in between, adopts its
//!   write-back log and reads every write that session acknowledged,
//!   flushed or not (and what that one had adopted in turn), as soon as it
//!   opened; once it flushed, so does every reader of committed state;
//! - a writer that opens after another writer opened since a log was
//!   written (on another host, without a log, or while the log's writer
//!   still lived) replays none of it: the versions a session read where
//!   it wrote nothing pin the state it opened with, and a version issued
//!   before it opened, never in that state, is never read again by anyone;
//! - a writer opened with a log has one, named by its epoch; after the
//!   takeover at quiescence flushed and closed, no log is left on its host
//!   (the superseded ones went as it opened, its own as it closed);
//! - a snapshot reads as its writer's view when the snapshot was taken;
//!   a reader's values never go back in time; sizes never shrink;
//! - nothing reports damage (the simulated store damages nothing); a read
//!   that does is told apart by opening afresh: a stale opener's map, or
//!   committed data gone;
//! - a clone reads its own acknowledged writes, and elsewhere exactly the
//!   snapshot it was restored from, whatever compaction did to the parent;
//!   once a delete of a clone returned, no new opener opens it;
//! - at quiescence a takeover reads every block at or above its floor,
//!   two compactions change nothing a reader sees, and `fsck` (reading
//!   every chunk) is clean; the same for every live clone; a deleted clone
//!   leaves no object, pin or marker behind (objects written by requests
//!   that landed after its delete began aside); deleting the volume
//!   while clones read through it hides it and changes nothing they read;
//!   deleting the clones and the snapshots then leaves the store empty.
//!
//! A failing seed prints its invariant, the last events and the command
//! that replays it. Environment:
//! - `S3BLK_SIM_SEED=n`: run seed n alone, printing every event;
//! - `S3BLK_SIM_SEEDS=n`, `S3BLK_SIM_SECONDS=t`: run n seeds (from
//!   `S3BLK_SIM_FIRST`, random by default), or as many as fit in t seconds;
//! - `S3BLK_SIM_THREADS`: seeds run in parallel on this many threads (2);
//! - `S3BLK_SIM_STOP=1`: stop at the first failing seed (seeds below it
//!   all run), to count how many seeds a bug takes to show;
//! - `S3BLK_SIM_HOT=1`: every seed hot (see `Hot`; about 3 in 10 are by
//!   default); a failing seed replays with the same setting.
//!
//! By default a fixed range of seeds and a few random ones run; a run of
//! 100 seeds or more fails if no writer replayed a write-back log.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use s3blk::clock::Clock;
use s3blk::crypto::Kek;
use s3blk::store::retry::{Jitter, RetryPolicy, RetryStore};
use s3blk::store::sealed::{SealedStore, Unlocked};
use s3blk::store::sim::{FaultPlan, Fnv, Outage, PutTrip, SimClock, SimGate, SimStore, SimWorld};
use s3blk::store::{DynStore, PutMode};
use s3blk::volume::catalog;
use s3blk::volume::compact::{self, CompactOptions};
use s3blk::volume::engine::log::LogState;
use s3blk::volume::engine::{CreateOptions, read_snapshot};
use s3blk::volume::format::{self, ParentRef};
use s3blk::volume::keys::{self, NewKeys};
use s3blk::volume::{OpenOptions, Volume, VolumeError, fsck};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The oracle's unit.
const BLOCK: u64 = 4096;
/// The smallest chunk size the format allows.
const CS: u64 = 64 << 10;
const VOL: &str = "sim/vol/";
/// Session number of the zeros every block starts with.
const INITIAL: usize = usize::MAX;
/// Seeds of the default (CI) run.
const CI_SEEDS: u64 = 200;
/// Random seeds added to the default run.
const CI_RANDOM_SEEDS: u64 = 4;

// ---------------------------------------------------------------- config

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    Calm,
    Moderate,
    Harsh,
}

/// Everything about one run that is decided up front.
#[derive(Debug, Clone)]
struct Config {
    chaos: Chaos,
    initial_chunks: u64,
    max_chunks: u64,
    dirty_chunks: u64,
    cache_chunks: u64,
    concurrency: usize,
    readahead: u64,
    run_for: Duration,
    safety_age: Duration,
    /// When a new writer session takes over, and whether the old one crashed first.
    takeovers: Vec<(Duration, bool)>,
    /// Clock skew of each compactor, in seconds.
    compactor_skews: Vec<i64>,
    writer_skew_bound: i64,
    /// Clones restored from snapshots during the run.
    max_clones: u64,
    /// When an unreadable snapshot record appears (damage from outside).
    broken_snapshot_at: Option<Duration>,
    /// When the writer starts a flush storm (a database syncing many times
    /// a second).
    storm_at: Option<Duration>,
    /// When the writer loses the store as it sends a journal record (its
    /// chunks already up), and for how long: longer than compaction's
    /// safety age, shorter than the retry layer's budget for one PUT.
    commit_outage: Option<(Duration, Duration)>,
    /// Where each writer session keeps its write-back log: the first
    /// session's, then one per takeover.
    hosts: Vec<Host>,
    /// Where the takeover at quiescence keeps its log.
    final_host: Host,
    /// A writer whose log holds more than this flushes on its own.
    log_limit: u64,
    /// The volume's chunk size: `CS`, or 4 times that. Reads of up to half
    /// a chunk that miss the cache fetch only their verified blocks (16
    /// KiB each) when the chunk has a table.
    chunk_size: u64,
    /// Whether writers upload chunk objects with their table (format 4).
    tables: Tables,
    /// Pressure on a few hot chunks, for some seeds.
    hot: Option<Hot>,
    /// The volume and its clones are encrypted: every actor's store seals
    /// them (`store::sealed`), for some seeds.
    encrypted: bool,
    /// The volume and its clones compress their chunks, for some seeds
    /// (packed by writers that write tables; the writes' words compress
    /// well with either codec).
    compression: Option<format::Codec>,
}

/// Most writes land on one or two hot chunks, a page or two at a time,
/// often in bursts beside flushes, with writers keeping no log mostly
/// (each page counts whole against the dirty limit, so background uploads
/// of the hot chunks run all the time) and a small patch limit (so a
/// chunk's pages go inline in one flush and whole in the next). That is
/// where an upload that read a chunk runs beside a record carrying newer
/// pages of it, and a write lands while that record is on its way.
#[derive(Debug, Clone)]
struct Hot {
    /// Their indexes, in chunks of the volume's chunk size.
    chunks: Vec<u64>,
    /// The blocks in them that most of their writes go to (a database's
    /// log tail, rewritten at every commit: a write there needs no more
    /// of the dirty budget, so it lands while writers of new pages wait).
    pages: Vec<u64>,
    /// The share of writes that go to them.
    share: f64,
    patch_limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tables {
    /// Whole, as format 3 did.
    Off,
    On,
    /// Some writers with, some without: volumes that mix both.
    Mixed,
}

thread_local! {
    /// Writers opened by this thread's seed so far (which of them use
    /// tables under `Tables::Mixed`).
    static OPENS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Where a writer session runs, as far as its write-back log goes: on one
/// of two hosts (each a directory of the run's own; a process restarted on
/// the same host finds the logs left there), or without a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    A,
    B,
    NoLog,
}

impl Host {
    fn label(self) -> &'static str {
        match self {
            Host::A => "host a",
            Host::B => "host b",
            Host::NoLog => "no log",
        }
    }

    /// The host of a takeover after a session on `prev`: mostly the same
    /// (a restart in place), often the other one, sometimes none.
    fn draw_after(prev: Host, rng: &mut StdRng) -> Host {
        match (rng.random_range(0..100), prev) {
            (0..=54, Host::NoLog) => Host::A,
            (0..=54, h) => h,
            (55..=84, Host::A) => Host::B,
            (55..=84, _) => Host::A,
            _ => Host::NoLog,
        }
    }
}

impl Config {
    fn draw(rng: &mut StdRng) -> Self {
        let chaos = match rng.random_range(0..10) {
            0..=1 => Chaos::Calm,
            2..=6 => Chaos::Moderate,
            _ => Chaos::Harsh,
        };
        let initial_chunks = rng.random_range(2..=4);
        let max_chunks = initial_chunks + rng.random_range(0..=3);
        let run_for = Duration::from_secs(rng.random_range(6 * 60..=14 * 60));
        let mut takeovers: Vec<(Duration, bool)> = (0..rng.random_range(0..=3))
            .map(|_| (Duration::from_secs(rng.random_range(20..run_for.as_secs() - 30)), rng.random_bool(0.5)))
            .collect();
        takeovers.sort_by_key(|t| t.0);
        let safety_age = compact::MIN_LIVE_SAFETY_AGE + Duration::from_secs(rng.random_range(0..=60));
        // Most hosts keep time within seconds; now and then a compactor's
        // clock is minutes off, and sometimes ahead by more than the safety
        // age, when every upload not yet committed looks old to it (the
        // engine promises to measure ages on the store's clock, so that
        // must be safe too).
        let safety = safety_age.as_secs() as i64;
        let skew = |rng: &mut StdRng| match rng.random_range(0..100) {
            0..=69 => rng.random_range(-3..=3),
            70..=84 => rng.random_range(-300..=300),
            _ => rng.random_range(safety + 5..=safety + 300),
        };
        let compactor_skews = (0..rng.random_range(1..=3)).map(|_| skew(rng)).collect();
        let max_clones = rng.random_range(0..=2);
        let broken_snapshot_at =
            rng.random_bool(0.15).then(|| Duration::from_secs(rng.random_range(10..run_for.as_secs() - 60)));
        let storm_at = rng.random_bool(0.25).then(|| Duration::from_secs(rng.random_range(10..run_for.as_secs() - 60)));
        let commit_outage = rng.random_bool(0.25).then(|| {
            (
                Duration::from_secs(rng.random_range(10..run_for.as_secs() / 2)),
                Duration::from_secs(rng.random_range(190..300)),
            )
        });
        Self {
            chaos,
            initial_chunks,
            max_chunks,
            dirty_chunks: rng.random_range(2..=3),
            cache_chunks: rng.random_range(0..=3),
            concurrency: rng.random_range(1..=6),
            readahead: rng.random_range(0..=2),
            run_for,
            safety_age,
            takeovers,
            compactor_skews,
            writer_skew_bound: 3,
            max_clones,
            broken_snapshot_at,
            storm_at,
            commit_outage,
            hosts: Vec::new(),
            final_host: Host::NoLog,
            log_limit: 0,
            chunk_size: CS,
            tables: Tables::Off,
            hot: None,
            encrypted: false,
            compression: None,
        }
        .draw_logs(rng)
    }

    /// The chunk layout, from a generator of its own: the seeds whose
    /// volumes keep format 3's layout run as they did before format 4.
    fn draw_chunks(mut self, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_7ab1e5);
        (self.chunk_size, self.tables) = match rng.random_range(0..10) {
            0..=3 => (CS, Tables::Off),
            4..=5 => (CS, Tables::On),
            6..=7 => (4 * CS, Tables::On),
            _ => (4 * CS, Tables::Mixed),
        };
        OPENS.with(|o| o.set(0));
        self
    }

    /// Encryption, for some seeds, from a generator of its own (the other
    /// seeds run as they did before). `S3BLK_SIM_ENCRYPTED=1`: every seed.
    fn draw_encryption(mut self, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xe4c2_7a11_5ea1);
        self.encrypted = rng.random_bool(0.3) || std::env::var("S3BLK_SIM_ENCRYPTED").is_ok_and(|v| v == "1");
        self
    }

    /// Compression, for some seeds, from a generator of its own (the other
    /// seeds run as they did before). `S3BLK_SIM_COMPRESSION=lz4|zstd`:
    /// every seed.
    fn draw_compression(mut self, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xc0_4e55_10c0);
        self.compression = match std::env::var("S3BLK_SIM_COMPRESSION").as_deref() {
            Ok("lz4") => Some(format::Codec::Lz4),
            Ok("zstd") => Some(format::Codec::Zstd),
            _ => match rng.random_range(0..10) {
                0..=1 => Some(format::Codec::Lz4),
                2..=3 => Some(format::Codec::Zstd),
                _ => None,
            },
        };
        self
    }

    /// Hot chunks, for some seeds, from a generator of their own (drawn
    /// last: the other seeds run as they did before).
    fn draw_hot(mut self, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x407_c4a1_2b5e);
        let hot = rng.random_bool(0.3);
        if !hot && !std::env::var("S3BLK_SIM_HOT").is_ok_and(|v| v == "1") {
            return self;
        }
        // Small chunks and the smallest dirty limit (two chunks): a spray
        // passes it.
        self.chunk_size = CS;
        self.dirty_chunks = 2;
        self.initial_chunks = self.initial_chunks.max(4);
        self.max_chunks = self.max_chunks.max(self.initial_chunks);
        let chunks = (self.initial_chunks * CS / self.chunk_size).max(1);
        let mut hot: Vec<u64> = (0..rng.random_range(1..=2)).map(|_| rng.random_range(0..chunks)).collect();
        hot.dedup();
        let pages = (0..rng.random_range(1..=4)).map(|_| rng.random_range(0..CS / BLOCK)).collect();
        self.hot = Some(Hot {
            chunks: hot,
            pages,
            share: rng.random_range(0.6..0.95),
            patch_limit: rng.random_range(2..=16) * BLOCK,
        });
        if rng.random_bool(0.7) {
            self.hosts.iter_mut().for_each(|h| *h = Host::NoLog);
        }
        self
    }

    /// A write's range: on a hot chunk (a page or two) at the hot share,
    /// anywhere otherwise.
    fn write_range(&self, rng: &mut StdRng, size: u64) -> (u64, u64) {
        match &self.hot {
            Some(h) if rng.random_bool(h.share) => {
                let chunk = h.chunks[rng.random_range(0..h.chunks.len())];
                let pages = self.chunk_size / BLOCK;
                let (lo, hi) = (chunk * pages, ((chunk + 1) * pages).min(size / BLOCK));
                if lo >= hi {
                    return random_range(rng, size);
                }
                let b = match rng.random_bool(0.7) {
                    true => lo + h.pages[rng.random_range(0..h.pages.len())],
                    false => rng.random_range(lo..hi),
                };
                if b >= hi {
                    return random_range(rng, size);
                }
                let n = rng.random_range(1..=2u64).min(hi - b);
                (b * BLOCK, n * BLOCK)
            }
            _ => random_range(rng, size),
        }
    }

    /// Whether the next writer opened writes chunk tables.
    fn next_tables(&self) -> bool {
        match self.tables {
            Tables::Off => false,
            Tables::On => true,
            Tables::Mixed => OPENS.with(|o| {
                o.set(o.get() + 1);
                o.get() % 3 != 0
            }),
        }
    }

    /// The write-back log settings, drawn after everything else (so that a
    /// seed's other choices are what they were before logs were added).
    fn draw_logs(mut self, rng: &mut StdRng) -> Self {
        let first = if rng.random_bool(0.85) { Host::A } else { Host::NoLog };
        self.hosts = vec![first];
        for _ in 0..self.takeovers.len() {
            let prev = self.hosts[self.hosts.len() - 1];
            self.hosts.push(Host::draw_after(prev, rng));
        }
        self.final_host = Host::draw_after(self.hosts[self.hosts.len() - 1], rng);
        self.log_limit =
            if rng.random_bool(0.3) { rng.random_range(2..=16) * CS } else { OpenOptions::default().log_limit };
        self
    }

    fn max_blocks(&self) -> usize {
        (self.max_chunks * CS / BLOCK) as usize
    }

    /// A fault plan for one actor's store handle.
    fn fault_plan(&self, rng: &mut StdRng) -> FaultPlan {
        let mut plan = FaultPlan::calm();
        let run = self.run_for.as_secs();
        let (outages, outage_len) = match self.chaos {
            Chaos::Calm => {
                plan.error_rate = 0.002;
                (0, 0..1)
            }
            Chaos::Moderate => {
                plan.error_rate = rng.random_range(0.0..0.03);
                plan.lost_answer_rate = rng.random_range(0.0..0.02);
                plan.hang_rate = rng.random_range(0.0..0.005);
                plan.slow_rate = 0.03;
                (rng.random_range(0..=1), 5..90)
            }
            Chaos::Harsh => {
                plan.error_rate = rng.random_range(0.02..0.08);
                plan.lost_answer_rate = rng.random_range(0.01..0.04);
                plan.hang_rate = rng.random_range(0.005..0.02);
                plan.slow_rate = 0.06;
                (rng.random_range(0..=3), 10..300)
            }
        };
        for _ in 0..outages {
            let start = rng.random_range(0..run);
            let len = rng.random_range(outage_len.clone());
            plan.outages.push(Outage {
                window: Duration::from_secs(start)..Duration::from_secs(start + len),
                black_hole: rng.random_bool(0.5),
            });
        }
        // Latency spikes: for a while every call takes seconds (uploads
        // stay staged that long before their commit lands).
        let brownouts = match self.chaos {
            Chaos::Calm => 0,
            Chaos::Moderate => rng.random_range(0..=1),
            Chaos::Harsh => rng.random_range(0..=2),
        };
        for _ in 0..brownouts {
            let start = rng.random_range(0..run);
            let len = rng.random_range(10..120);
            plan.brownouts.push(Duration::from_secs(start)..Duration::from_secs(start + len));
        }
        plan.abandoned_lands_rate = rng.random_range(0.2..0.8);
        plan
    }

    fn open_options(&self, clock: Arc<dyn Clock>, read_only: bool, snapshot: Option<String>) -> OpenOptions {
        OpenOptions {
            read_only,
            dirty_limit: self.dirty_chunks * CS,
            cache_limit: self.cache_chunks * CS,
            concurrency: self.concurrency,
            readahead_chunks: self.readahead,
            snapshot,
            clock,
            chunk_tables: self.next_tables(),
            patch_limit: self.hot.as_ref().map_or(OpenOptions::default().patch_limit, |h| h.patch_limit),
            // The engine's own time limits (commit interval, restaging old
            // chunks, the commit deadline) keep their production values.
            ..OpenOptions::default()
        }
    }

    /// A writer's options, its write-back log under `log_root` (`None`: no log).
    fn writer_options(&self, clock: Arc<dyn Clock>, log_root: Option<PathBuf>) -> OpenOptions {
        OpenOptions { log_dir: log_root, log_limit: self.log_limit, ..self.open_options(clock, false, None) }
    }
}

/// A generator for one actor, derived from the seed and the actor's name,
/// so one actor's choices do not shift when another's change.
fn rng_for(seed: u64, name: &str) -> StdRng {
    let mut h = Fnv::default();
    h.write_u64(seed);
    h.write(name.as_bytes());
    StdRng::seed_from_u64(h.finish())
}

/// Bytes of write number `write` at volume offset `offset`: unique per
/// write and position, never zero.
fn pattern(write: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| {
            let word = ((write << 32) ^ (o >> 3)) | (1 << 63);
            word.to_le_bytes()[(o & 7) as usize]
        })
        .collect()
}

/// Where bytes of block `b` (from byte `at` of it) came from, in runs:
/// zeros, or write #n's bytes for some volume offset (every 8-byte word of
/// a [`pattern`] names its write and offset). For reports on bytes that are
/// no version of the block.
fn decode(b: u64, at: usize, data: &[u8]) -> String {
    let base = b * BLOCK + at as u64;
    let mut runs: Vec<(usize, usize, String)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let o = base + pos as u64;
        let word_end = ((o / 8 + 1) * 8 - base) as usize;
        let end = word_end.min(data.len());
        let bytes = &data[pos..end];
        let what = if bytes.iter().all(|&x| x == 0) {
            "zeros".to_string()
        } else if end - pos == 8 {
            let w = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
            let write = (w & !(1 << 63)) >> 32;
            let from = (w & 0xffff_ffff) << 3;
            if from == o { format!("write #{write}") } else { format!("write #{write} of offset {from}") }
        } else {
            "?".to_string()
        };
        match runs.last_mut() {
            Some((_, e, w)) if *w == what => *e = end,
            _ => runs.push((pos + at, end + at, what)),
        }
        pos = end;
    }
    runs.iter().map(|(s, e, w)| format!("{s}..{e}: {w}")).collect::<Vec<_>>().join(", ")
}

fn zeros() -> Bytes {
    Bytes::from(vec![0u8; BLOCK as usize])
}

/// The block-sized pieces of a byte range: (block, offset in block, offset in range, length).
fn blocks_of(offset: u64, len: u64) -> Vec<(u64, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut cur = offset;
    while cur < offset + len {
        let b = cur / BLOCK;
        let at = (cur % BLOCK) as usize;
        let n = ((BLOCK - at as u64).min(offset + len - cur)) as usize;
        out.push((b, at, (cur - offset) as usize, n));
        cur += n as u64;
    }
    out
}

// ---------------------------------------------------------------- oracle

/// One value a block held (or may hold) at some point.
#[derive(Debug, Clone)]
struct Version {
    data: Bytes,
    session: usize,
    /// Write number (0: the initial zeros).
    write: u64,
    /// When the write was issued. Writes in flight at once touch
    /// different blocks, so a block's versions of one session are issued
    /// and acknowledged in the same order.
    tick: u64,
    acked: bool,
    /// When the write was acknowledged (0: not acknowledged). A flush
    /// covers the writes acknowledged before it started; with requests in
    /// flight at once, a write issued earlier may be acknowledged later.
    acked_tick: u64,
    at: Duration,
    /// Never committed and never to be: the session named here opened
    /// without it (see [`Oracle::pin_base`]).
    dead: Option<usize>,
}

/// What reading one block may return.
#[derive(Debug, Clone)]
struct Expect {
    values: Vec<Bytes>,
    /// Or any version in `lower..upper` (the state a writer opened with).
    base: bool,
    lower: usize,
    upper: usize,
    /// The session whose own view this is, while it holds writes it
    /// replayed from a crashed predecessor's write-back log and has not
    /// been told it is fenced (see [`Oracle::held`]).
    holder: Option<usize>,
}

impl Expect {
    fn exact(data: Bytes) -> Self {
        Self { values: vec![data], base: false, lower: 0, upper: 0, holder: None }
    }
}

#[derive(Debug)]
struct Session {
    name: String,
    host: Host,
    first_attempt: u64,
    opened: Option<u64>,
    /// When a later session's open succeeded: this one is fenced from then on.
    superseded: Option<u64>,
    /// When its process died (a takeover after a crash, or the end of the run).
    crashed: Option<u64>,
    /// Its write-back log directory, once it opened with one.
    log_dir: Option<PathBuf>,
    /// It replayed entries of a predecessor's log as it opened: what it
    /// opened with is not all committed until it flushes.
    replayed: bool,
    /// Whose log it replayed: the last session to open before it.
    adopted_from: Option<usize>,
    /// An operation of it failed as fenced: from then on it reads nothing
    /// it replayed (the engine refuses reads once it knows).
    told_fenced: bool,
    /// What it must read where it wrote nothing: what was durable when it
    /// began opening, raised by what it must have adopted from a crashed
    /// predecessor's write-back log and by what it read there.
    open_floor: Vec<usize>,
    open_len: Vec<usize>,
    /// Blocks this session wrote or read; the others read as `open_floor..open_len`.
    view: BTreeMap<u64, Expect>,
}

#[derive(Debug, Clone)]
struct SnapshotExpect {
    size: u64,
    blocks: Vec<Expect>,
}

#[derive(Debug, Clone)]
struct Violation {
    invariant: &'static str,
    detail: String,
    at: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    writes_acked: u64,
    flushes_acked: u64,
    flushes_cancelled: u64,
    snapshots: u64,
    sessions: u64,
    readers: u64,
    compactions: u64,
    compactions_crashed: u64,
    snapshots_deleted: u64,
    clones: u64,
    clones_deleted: u64,
    /// Flattens that ended with the clone's parent let go of (a clone
    /// flattened again finds it done and counts again).
    flattens: u64,
    bursts: u64,
    storms: u64,
    unreadable_snapshots_reported: u64,
    compactions_killed_deleting: u64,
    /// Openers that had to carry on with a crashed predecessor's log.
    log_restarts: u64,
    /// Openers that replayed entries of a log, and how many.
    log_replays: u64,
    log_entries_replayed: u64,
    /// Logs of superseded writers removed by openers.
    logs_discarded: u64,
    /// Versions found never committed when a later session opened.
    versions_dead: u64,
    /// Chunks the volume's final state maps to compressed objects.
    packed_chunks: u64,
}

/// What a writer opening with a write-back log must do with the logs
/// left on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogExpect {
    /// It has no log.
    NoLog,
    /// Replay nothing: every log there is a superseded writer's (or a
    /// live one's), or there is none.
    Nothing,
    /// Carry on with this session's writes: it was the last to open, on
    /// this host, and crashed, and nobody on another host (or without a
    /// log) tried to open since.
    Replays(usize),
    /// Another session tried to open since the last one opened, and its
    /// open record may have landed: either.
    Either,
}

#[derive(Debug)]
struct Oracle {
    world: Arc<SimWorld>,
    tick: u64,
    writes: u64,
    history: Vec<Vec<Version>>,
    floor: Vec<usize>,
    size_floor: u64,
    sessions: Vec<Session>,
    /// (session, tick) of every open attempt.
    attempts: Vec<(usize, u64)>,
    snapshots: BTreeMap<String, SnapshotExpect>,
    /// Snapshots whose deletion began: readers at them may fail.
    deleted_snapshots: std::collections::BTreeSet<String>,
    clones: Vec<CloneState>,
    violations: Vec<Violation>,
    counts: Counts,
}

/// Per-reader lower bounds: a reader's values never go back.
#[derive(Debug, Clone)]
struct ReaderView {
    name: String,
    lower: Vec<usize>,
}

impl Oracle {
    fn new(world: Arc<SimWorld>, blocks: usize, size: u64) -> Self {
        let initial = Version {
            data: zeros(),
            session: INITIAL,
            write: 0,
            tick: 0,
            acked: true,
            acked_tick: 0,
            at: Duration::ZERO,
            dead: None,
        };
        Self {
            world,
            tick: 0,
            writes: 0,
            history: vec![vec![initial]; blocks],
            floor: vec![0; blocks],
            size_floor: size,
            sessions: Vec::new(),
            attempts: Vec::new(),
            snapshots: BTreeMap::new(),
            deleted_snapshots: Default::default(),
            clones: Vec::new(),
            violations: Vec::new(),
            counts: Counts::default(),
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn failed(&self) -> bool {
        !self.violations.is_empty()
    }

    fn violation(&mut self, invariant: &'static str, detail: String) {
        self.world.trace(&format!("VIOLATION {invariant}: {detail}"));
        self.violations.push(Violation { invariant, detail, at: self.world.elapsed() });
    }

    fn excluded(&self, v: &Version) -> bool {
        v.dead.is_some() || self.issued_fenced(v)
    }

    /// Issued by a session after a later one had opened.
    fn issued_fenced(&self, v: &Version) -> bool {
        v.session != INITIAL && self.sessions[v.session].superseded.is_some_and(|t| v.tick > t)
    }

    /// Excluded from what `holder` may read: a version a session that
    /// opened after `holder` declared dead (it opened without it) is still
    /// in `holder`'s memory when `holder` replayed it from its crashed
    /// predecessor's write-back log (or from what that one had replayed in
    /// turn): `holder`, fenced without knowing it yet, reads it until it is
    /// told. Nobody else ever reads it again.
    fn excluded_for(&self, v: &Version, holder: Option<usize>) -> bool {
        match (holder, v.dead) {
            (Some(s), Some(d)) if self.opened_after(d, s) && self.held(s, v) => self.issued_fenced(v),
            _ => self.excluded(v),
        }
    }

    /// Did session `d` open after session `s`?
    fn opened_after(&self, d: usize, s: usize) -> bool {
        matches!((self.sessions[d].opened, self.sessions[s].opened), (Some(td), Some(ts)) if td > ts)
    }

    /// Is `v` a write session `s` replayed from a predecessor's write-back
    /// log (that session's own, or one it had replayed in turn)?
    fn held(&self, s: usize, v: &Version) -> bool {
        let mut from = self.sessions[s].adopted_from.filter(|_| self.sessions[s].replayed);
        while let Some(m) = from {
            if v.session == m {
                return true;
            }
            from = self.sessions[m].adopted_from.filter(|_| self.sessions[m].replayed);
        }
        false
    }

    fn describe(&self, b: u64, p: usize) -> String {
        let v = &self.history[b as usize][p];
        if v.session == INITIAL {
            return format!("v{p} (initial zeros)");
        }
        let why = match v.dead {
            Some(s) => format!(", never committed: {} opened without it", self.sessions[s].name),
            None if self.excluded(v) => ", after a later session opened".to_string(),
            None => String::new(),
        };
        format!(
            "v{p} ({} write #{} {} at {:.3}s{why})",
            self.sessions[v.session].name,
            v.write,
            if v.acked { "acked" } else { "not acked" },
            v.at.as_secs_f64(),
        )
    }

    fn matches(&self, b: u64, at: usize, data: &[u8]) -> Vec<usize> {
        let h = &self.history[b as usize];
        (0..h.len()).filter(|&p| &h[p].data[at..at + data.len()] == data).collect()
    }

    /// The first version in `lower..upper`, not written by a fenced session, that reads as `data`
    /// (to `holder`, see [`Oracle::excluded_for`]).
    fn find(&self, b: u64, at: usize, data: &[u8], lower: usize, upper: usize, holder: Option<usize>) -> Option<usize> {
        let h = &self.history[b as usize];
        (lower..upper.min(h.len()))
            .find(|&p| &h[p].data[at..at + data.len()] == data && !self.excluded_for(&h[p], holder))
    }

    /// What `data` is, in words: zeros, a version, or bytes never written there.
    fn describe_data(&self, b: u64, at: usize, data: &[u8]) -> String {
        if data.iter().all(|&x| x == 0) {
            return "zeros".into();
        }
        match self.matches(b, at, data).last() {
            Some(&p) => self.describe(b, p),
            None => "bytes never written there".into(),
        }
    }

    /// Why `data` is not a legal value of block `b` in `lower..upper`.
    fn explain(&self, b: u64, at: usize, data: &[u8], lower: usize, upper: usize) -> (&'static str, String) {
        let all = self.matches(b, at, data);
        let piece = if at == 0 && data.len() as u64 == BLOCK {
            String::new()
        } else {
            format!(" (bytes {at}..{})", at + data.len())
        };
        let floor = self.describe(b, lower.min(self.history[b as usize].len() - 1));
        let zero = data.iter().all(|&x| x == 0);
        let h = &self.history[b as usize];
        if let Some(&p) = all.iter().find(|&&p| p >= lower && p < upper && !zero && h[p].dead.is_some()) {
            return (
                "superseded-write-revived",
                format!(
                    "block {b}{piece} reads {}: a write a later session opened without came back (a superseded \
                     writer's write-back log replayed?)",
                    self.describe(b, p)
                ),
            );
        }
        if let Some(&p) = all.iter().find(|&&p| p >= lower && p < upper && !zero) {
            return (
                "fenced-write-visible",
                format!("block {b}{piece} reads {}, written by a session already fenced", self.describe(b, p)),
            );
        }
        if let Some(&p) = all.iter().find(|&&p| p >= upper) {
            return (
                "read-from-later",
                format!("block {b}{piece} reads {}, written after this reader's state was fixed", self.describe(b, p)),
            );
        }
        let got = self.describe_data(b, at, data);
        if all.is_empty() {
            let runs = decode(b, at, data);
            return (
                "never-written",
                format!("block {b}{piece} reads bytes never written there [{runs}] (durable: {floor})"),
            );
        }
        ("acked-data-lost", format!("block {b}{piece} reads {got}, older than durable {floor}"))
    }

    fn check(&self, b: u64, e: &Expect, at: usize, data: &[u8]) -> Result<Option<usize>, (&'static str, String)> {
        if e.values.iter().any(|v| &v[at..at + data.len()] == data) {
            return Ok(None);
        }
        if e.base {
            if let Some(p) = self.find(b, at, data, e.lower, e.upper, e.holder) {
                return Ok(Some(p));
            }
            if e.values.is_empty() {
                return Err(self.explain(b, at, data, e.lower, e.upper));
            }
        }
        let mut wanted: Vec<String> = e.values.iter().map(|v| self.describe_data(b, 0, v)).collect();
        if e.base {
            wanted.push(format!("what it opened with ({}..)", self.describe(b, e.lower)));
        }
        Err((
            "writer-reads-own-writes",
            format!(
                "block {b} (bytes {at}..{}) reads {}, expected {}",
                at + data.len(),
                self.describe_data(b, at, data),
                wanted.join(" or ")
            ),
        ))
    }

    fn raise(&mut self, b: u64, p: usize) {
        let f = &mut self.floor[b as usize];
        *f = (*f).max(p);
    }

    // ---- sessions

    fn new_session(&mut self, name: &str, host: Host) -> usize {
        let t = self.next_tick();
        self.sessions.push(Session {
            name: name.to_string(),
            host,
            first_attempt: t,
            opened: None,
            superseded: None,
            crashed: None,
            log_dir: None,
            replayed: false,
            adopted_from: None,
            told_fenced: false,
            open_floor: self.floor.clone(),
            open_len: Vec::new(),
            view: BTreeMap::new(),
        });
        self.counts.sessions += 1;
        self.sessions.len() - 1
    }

    fn open_attempt(&mut self, s: usize) {
        let t = self.next_tick();
        self.attempts.push((s, t));
    }

    /// Session `s` opened. With a crashed predecessor's write-back log to
    /// carry on with, what that one acknowledged is part of what `s` must
    /// read where it writes nothing (not yet durable: a reader of committed
    /// state may still read older values until `s` flushes).
    fn opened(&mut self, s: usize) -> LogExpect {
        let expect = self.log_expect(s);
        let t = self.next_tick();
        let lens = self.history.iter().map(Vec::len).collect();
        if let LogExpect::Replays(m) = expect {
            let acked = self.acknowledged(m);
            for (f, a) in self.sessions[s].open_floor.iter_mut().zip(acked) {
                *f = (*f).max(a);
            }
            self.counts.log_restarts += 1;
        }
        let sess = &mut self.sessions[s];
        sess.opened = Some(t);
        sess.open_len = lens;
        for earlier in &mut self.sessions[..s] {
            earlier.superseded.get_or_insert(t);
        }
        expect
    }

    /// What session `s` must do with the write-back logs on its host,
    /// opening now.
    fn log_expect(&self, s: usize) -> LogExpect {
        let host = self.sessions[s].host;
        if host == Host::NoLog {
            return LogExpect::NoLog;
        }
        let Some(m) = (0..s).rev().find(|&m| self.sessions[m].opened.is_some()) else { return LogExpect::Nothing };
        let last = &self.sessions[m];
        let Some(crashed) = last.crashed.filter(|_| last.host == host) else { return LogExpect::Nothing };
        // A session on this host that tried to open after the crash and
        // never did (it gave up, or the run ended mid-open) took the log
        // over, if anything, and left it marked for whoever opens next here.
        let since = last.opened.unwrap_or(0);
        let elsewhere = |o: usize, t: u64| self.sessions[o].host != host || t < crashed;
        if self.attempts.iter().any(|&(o, t)| o != m && o != s && t > since && elsewhere(o, t)) {
            return LogExpect::Either;
        }
        LogExpect::Replays(m)
    }

    /// Per block, the newest version session `m` must be read at or above
    /// by a writer carrying on with its log: its last acknowledged write
    /// there, or what it had to read there itself.
    fn acknowledged(&self, m: usize) -> Vec<usize> {
        (0..self.history.len())
            .map(|b| {
                let own = self.history[b].iter().rposition(|v| v.session == m && v.acked).unwrap_or(0);
                own.max(self.sessions[m].open_floor[b])
            })
            .collect()
    }

    /// Session `s` read block `b` of the state it opened with (committed
    /// state, with the log it adopted replayed on top) as `data`. No
    /// version issued before it opened and after the last one that reads
    /// as `data` was ever in that state, so none was ever committed (a
    /// block's committed versions only move forward) and none can be now
    /// (no earlier session commits after a later one opened, and no log of
    /// theirs may be replayed any more): from now on no one may read them.
    fn pin_base(&mut self, s: usize, b: u64, data: &[u8]) {
        let (lower, upper) = (self.sessions[s].open_floor[b as usize], self.sessions[s].open_len[b as usize]);
        let upper = upper.min(self.history[b as usize].len());
        let h = &self.history[b as usize];
        let Some(last) = (lower..upper).rev().find(|&p| &h[p].data[..] == data && !self.excluded(&h[p])) else {
            return;
        };
        let mut dead = 0;
        for v in &mut self.history[b as usize][last + 1..upper] {
            if v.data[..] != *data && v.dead.is_none() {
                v.dead = Some(s);
                dead += 1;
            }
        }
        self.counts.versions_dead += dead;
    }

    /// A later session tried to open: this one may be fenced.
    fn may_be_fenced(&self, s: usize) -> bool {
        let started = self.sessions[s].first_attempt;
        self.attempts.iter().any(|&(o, t)| o != s && t > started)
    }

    fn expect(&self, s: usize, b: u64) -> Expect {
        let sess = &self.sessions[s];
        sess.view.get(&b).cloned().unwrap_or_else(|| Expect {
            values: Vec::new(),
            base: true,
            lower: sess.open_floor[b as usize],
            upper: sess.open_len.get(b as usize).copied().unwrap_or(0),
            holder: (sess.replayed && !sess.told_fenced).then_some(s),
        })
    }

    /// The block's single known value in this session, if known.
    fn known(&self, s: usize, b: u64) -> Option<Bytes> {
        match self.sessions[s].view.get(&b) {
            Some(e) if !e.base && e.values.len() == 1 => Some(e.values[0].clone()),
            _ => None,
        }
    }

    /// A session read `data` at `offset`.
    fn writer_read(&mut self, s: usize, offset: u64, data: &[u8]) {
        for (b, at, pos, n) in blocks_of(offset, data.len() as u64) {
            let piece = &data[pos..pos + n];
            let e = self.expect(s, b);
            match self.check(b, &e, at, piece) {
                Ok(p) => {
                    if n as u64 == BLOCK {
                        if let Some(p) = p {
                            // What a writer opened with was committed: it
                            // cannot go back. What it replayed from a log
                            // is committed by its next flush.
                            let f = &mut self.sessions[s].open_floor[b as usize];
                            *f = (*f).max(p);
                            if !self.sessions[s].replayed {
                                self.raise(b, p);
                            }
                            self.pin_base(s, b, piece);
                        }
                        self.sessions[s].view.insert(b, Expect::exact(Bytes::copy_from_slice(piece)));
                    }
                }
                Err((inv, why)) => {
                    let who = self.sessions[s].name.clone();
                    self.violation(inv, format!("{who} read: {why}"));
                    return;
                }
            }
        }
    }

    /// A reader of committed state read `data` at `offset`.
    fn reader_read(&mut self, r: &mut ReaderView, offset: u64, data: &[u8]) {
        for (b, at, pos, n) in blocks_of(offset, data.len() as u64) {
            let piece = &data[pos..pos + n];
            let lower = r.lower[b as usize];
            match self.find(b, at, piece, lower, usize::MAX, None) {
                Some(p) if n as u64 == BLOCK => {
                    r.lower[b as usize] = p;
                    self.raise(b, p);
                }
                Some(_) => {}
                None => {
                    let (inv, why) = self.explain(b, at, piece, lower, usize::MAX);
                    self.violation(inv, format!("{} read: {why}", r.name));
                    return;
                }
            }
        }
    }

    /// New contents of the blocks a write of `data` (`None`: zeros) at
    /// `offset` touches, or the first partly covered block whose value this
    /// session does not know.
    fn plan_write(&self, s: usize, offset: u64, len: u64, data: Option<&[u8]>) -> Result<Vec<(u64, Bytes)>, u64> {
        let mut out = Vec::new();
        for (b, at, pos, n) in blocks_of(offset, len) {
            let mut block =
                if n as u64 == BLOCK { vec![0u8; BLOCK as usize] } else { self.known(s, b).ok_or(b)?.to_vec() };
            match data {
                Some(d) => block[at..at + n].copy_from_slice(&d[pos..pos + n]),
                None => block[at..at + n].fill(0),
            }
            out.push((b, Bytes::from(block)));
        }
        Ok(out)
    }

    /// A write is issued: from now on its bytes may show (the engine may
    /// commit part of a write still in progress, as a disk with a volatile
    /// cache may). Returns where its versions sit in each block's history.
    fn write_issued(&mut self, s: usize, write: u64, blocks: &[(u64, Bytes)]) -> Vec<usize> {
        let tick = self.next_tick();
        let at = self.world.elapsed();
        blocks
            .iter()
            .map(|(b, data)| {
                let h = &mut self.history[*b as usize];
                h.push(Version {
                    data: data.clone(),
                    session: s,
                    write,
                    tick,
                    acked: false,
                    acked_tick: 0,
                    at,
                    dead: None,
                });
                h.len() - 1
            })
            .collect::<Vec<_>>()
            .into_iter()
            .zip(blocks)
            .map(|(p, (b, data))| {
                // Until it returns, a read may see the block before or after it.
                let mut e = self.expect(s, *b);
                if !e.values.contains(data) {
                    e.values.push(data.clone());
                }
                self.sessions[s].view.insert(*b, e);
                p
            })
            .collect()
    }

    /// The write returned: acknowledged, or failed (then any part of it may
    /// have reached the engine).
    fn write_done(&mut self, s: usize, blocks: Vec<(u64, Bytes)>, positions: Vec<usize>, acked: bool) {
        let tick = self.next_tick();
        if acked {
            self.counts.writes_acked += 1;
        }
        for ((b, data), p) in blocks.into_iter().zip(positions) {
            self.history[b as usize][p].acked = acked;
            self.history[b as usize][p].acked_tick = if acked { tick } else { 0 };
            let e = if acked {
                Expect::exact(data)
            } else {
                let mut e = self.expect(s, b);
                if !e.values.contains(&data) {
                    e.values.push(data);
                }
                e
            };
            self.sessions[s].view.insert(b, e);
        }
    }

    /// A flush (or resize, snapshot) that started at `t0` returned `Ok`:
    /// it committed the session's writes acknowledged before `t0`, and what
    /// it opened with (a predecessor's logged writes included).
    fn flush_acked(&mut self, s: usize, t0: u64, what: &str) {
        self.counts.flushes_acked += 1;
        for b in 0..self.history.len() as u64 {
            let base = self.sessions[s].open_floor[b as usize];
            self.raise(b, base);
            let h = &self.history[b as usize];
            let Some(p) = h.iter().rposition(|v| v.session == s && v.acked && v.acked_tick < t0) else { continue };
            if self.excluded(&h[p]) {
                let why = format!(
                    "{} got Ok from {what} covering block {b} = {}, written after a later session had opened",
                    self.sessions[s].name,
                    self.describe(b, p)
                );
                self.violation("fenced-writer-acked", why);
                return;
            }
            self.raise(b, p);
        }
    }

    /// A snapshot is committed state: it holds nothing by virtue of a log.
    fn snapshot_expect(&self, s: usize, size: u64) -> SnapshotExpect {
        let blocks = (0..size / BLOCK).map(|b| Expect { holder: None, ..self.expect(s, b) }).collect();
        SnapshotExpect { size, blocks }
    }

    /// An operation of session `s` (or of a reader, `None`) failed.
    fn error(&mut self, who: &str, s: Option<usize>, op: &str, e: &VolumeError) {
        let zombie = s.is_some_and(|s| self.may_be_fenced(s));
        match e {
            VolumeError::Store(_) => {}
            VolumeError::Fenced(why) => {
                if let Some(s) = s {
                    self.sessions[s].told_fenced = true;
                }
                if !zombie {
                    self.violation("self-fenced", format!("{who} {op}: fenced though no later session opened: {why}"));
                }
            }
            // A fenced session may find its old chunks collected.
            VolumeError::Corrupt(_) if zombie => {}
            // Compaction beside other compactions and writers must not
            // take its own race for damage.
            VolumeError::Corrupt(why) if op == "compact" => {
                self.violation("compaction-reports-damage", format!("{who}: {why}"))
            }
            VolumeError::Corrupt(why) => self.violation("corruption-reported", format!("{who} {op}: {why}")),
            other => self.violation("unexpected-error", format!("{who} {op}: {other}")),
        }
    }
}

// ---------------------------------------------------------------- the simulation

struct Sim {
    seed: u64,
    world: Arc<SimWorld>,
    cfg: Config,
    oracle: Mutex<Oracle>,
    handles: Mutex<Vec<SimStore>>,
    tasks: Mutex<Vec<AbortHandle>>,
    stop: AtomicBool,
    snapshot_names: AtomicU64,
    /// The flush storm happened (or began).
    stormed: AtomicBool,
    commit_outage_armed: AtomicBool,
    /// The hosts' local disks: write-back logs live under `a/` and `b/`.
    disks: tempfile::TempDir,
    /// An encrypted run's keys, and the (prefix, uuid) of each volume
    /// created so far (the volume, then its clones): every actor's store
    /// seals them.
    keys: Option<NewKeys>,
    sealed: Arc<Mutex<Vec<(String, String)>>>,
}

/// An actor's store in an encrypted run: a sealed store (`store::sealed`)
/// of every volume created so far, the list growing as clones are made.
#[derive(Debug)]
struct RingStore {
    keys: Arc<Unlocked>,
    ring: Arc<Mutex<Vec<(String, String)>>>,
}

impl RingStore {
    fn now(&self) -> SealedStore {
        SealedStore::new(self.keys.clone(), lock(&self.ring).clone())
    }
}

#[async_trait::async_trait]
impl s3blk::store::ObjectStore for RingStore {
    async fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> s3blk::store::StoreResult<Bytes> {
        self.now().get(key, range).await
    }
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> s3blk::store::StoreResult<()> {
        self.now().put(key, body, mode).await
    }
    async fn get_tagged(&self, key: &str) -> s3blk::store::StoreResult<(Bytes, String)> {
        self.now().get_tagged(key).await
    }
    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> s3blk::store::StoreResult<()> {
        self.now().put_if_match(key, body, tag).await
    }
    async fn delete(&self, key: &str) -> s3blk::store::StoreResult<()> {
        self.now().delete(key).await
    }
    async fn list(&self, req: s3blk::store::ListRequest<'_>) -> s3blk::store::StoreResult<s3blk::store::ListPage> {
        self.now().list(req).await
    }
    async fn head(&self, key: &str) -> s3blk::store::StoreResult<Option<u64>> {
        self.now().head(key).await
    }
    fn describe(&self) -> String {
        self.keys.base.describe()
    }
    fn unlocked(&self) -> Option<s3blk::store::sealed::Sealing> {
        self.now().unlocked()
    }
}

type Ctx = Arc<Sim>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    fn oracle(&self) -> MutexGuard<'_, Oracle> {
        lock(&self.oracle)
    }

    fn done(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.oracle().failed()
    }

    fn event(&self, e: &str) {
        self.world.trace(e);
    }

    /// A store handle for one actor, behind the real retry layer (and a
    /// gate that orders calls started in the same instant by the seed).
    fn store(&self, actor: &str, plan: FaultPlan, rng: &mut StdRng) -> (SimStore, DynStore) {
        let handle = self.world.handle(actor, plan);
        // Jitter from the seed, the same whatever order calls retry in.
        let share: f64 = rng.random_range(0.0..1.0);
        let jitter: Jitter = Arc::new(move |cap: Duration| cap.mul_f64(share));
        let clock = Arc::new(SimClock::new(self.world.clone(), 0));
        let retry = RetryStore::with_clock(Arc::new(handle.clone()), RetryPolicy::default(), clock, jitter);
        lock(&self.handles).push(handle.clone());
        let gate: DynStore = Arc::new(SimGate::new(self.world.clone(), actor, Arc::new(retry)));
        // An encrypted run's volumes, once created, are read and written sealed.
        match &self.keys {
            Some(k) if !lock(&self.sealed).is_empty() => {
                let keys = Arc::new(Unlocked { base: gate, kek: k.kek.clone(), data: k.data.clone() });
                (handle, Arc::new(RingStore { keys, ring: self.sealed.clone() }))
            }
            _ => (handle, gate),
        }
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let t = tokio::spawn(f);
        lock(&self.tasks).push(t.abort_handle());
    }

    fn clock(&self, rng: &mut StdRng) -> Arc<dyn Clock> {
        let b = self.cfg.writer_skew_bound;
        Arc::new(SimClock::new(self.world.clone(), rng.random_range(-b..=b)))
    }

    /// Where writers on `host` keep their write-back logs.
    fn log_root(&self, host: Host) -> Option<PathBuf> {
        match host {
            Host::A => Some(self.disks.path().join("a")),
            Host::B => Some(self.disks.path().join("b")),
            Host::NoLog => None,
        }
    }
}

/// How long a crashed writer's engine may take to let go of its
/// write-back log (its own tasks end once every store call fails).
const LOG_RELEASE_BOUND: Duration = Duration::from_secs(600);

/// Is the write-back log in `dir` held by a live engine? The engine holds
/// `lock` with `flock` for as long as it uses the log, and a dead process's
/// lock goes with its descriptors; a log removed is held by nobody.
fn log_held(dir: &Path) -> bool {
    match std::fs::OpenOptions::new().write(true).open(dir.join("lock")) {
        Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// A process that crashed has closed its files. In this one process, a
/// crashed writer's engine lives on until its own tasks (an upload, a
/// commit, each failing on the dead store handle) let go of it: wait for
/// that, so that what the next opener on the host finds is what a dead
/// process leaves behind.
async fn wait_log_released(ctx: &Ctx, s: usize) {
    let (name, dir) = {
        let o = ctx.oracle();
        (o.sessions[s].name.clone(), o.sessions[s].log_dir.clone())
    };
    let Some(dir) = dir else { return };
    let since = ctx.world.elapsed();
    while log_held(&dir) {
        let waited = ctx.world.elapsed() - since;
        if waited > LOG_RELEASE_BOUND {
            let why = format!("{name}: its engine still holds its write-back log {waited:?} after it crashed");
            ctx.oracle().violation("crashed-writer-lingers", why);
            return;
        }
        sleep(Duration::from_secs(1)).await;
    }
    let waited = ctx.world.elapsed() - since;
    if !waited.is_zero() {
        ctx.event(&format!("{name}: its engine let go of its write-back log after {waited:?}"));
    }
}

/// Every write-back log directory under `root` (of any volume).
fn log_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(volumes) = std::fs::read_dir(root) else { return Vec::new() };
    volumes.flatten().filter_map(|v| std::fs::read_dir(v.path()).ok()).flatten().flatten().map(|e| e.path()).collect()
}

/// The log directory of the writer `vol` opened: the one under `root`
/// whose state names its epoch.
fn find_log_dir(root: &Path, vol: &Volume) -> Option<PathBuf> {
    let epoch = vol.stats().epoch;
    let dirs = std::fs::read_dir(root.join(&vol.meta().uuid)).ok()?;
    dirs.flatten().map(|e| e.path()).find(|d| {
        std::fs::read(d.join("state"))
            .ok()
            .and_then(|b| serde_json::from_slice::<LogState>(&b).ok())
            .is_some_and(|st| st.epoch == epoch && st.next_writer.is_none())
    })
}

/// After session `s` opened: its log is where it should be, and it
/// replayed what it had to and nothing it must not.
fn check_log_recovery(ctx: &Ctx, s: usize, vol: &Volume, expect: LogExpect, predecessor_log: bool) {
    let (name, host) = {
        let o = ctx.oracle();
        (o.sessions[s].name.clone(), o.sessions[s].host)
    };
    let Some(root) = ctx.log_root(host) else { return };
    let Some(rec) = vol.log_recovery() else {
        ctx.oracle().violation("log-missing", format!("{name} opened with a write-back log directory but has no log"));
        return;
    };
    ctx.event(&format!(
        "{name}: write-back log on {}: {} ({} entries replayed), {} superseded logs discarded; expected {}",
        host.label(),
        if rec.adopted { "adopted" } else { "new" },
        rec.entries,
        rec.discarded,
        match expect {
            LogExpect::Replays(m) => format!("{}'s", ctx.oracle().sessions[m].name),
            LogExpect::Either => "either".into(),
            LogExpect::Nothing | LogExpect::NoLog => "nothing replayed".into(),
        }
    ));
    let mut o = ctx.oracle();
    o.counts.logs_discarded += rec.discarded;
    o.sessions[s].replayed = rec.adopted && rec.entries > 0;
    // Whose writes it replayed: the last session to open before it's (and
    // what that one had replayed in turn), as `log_expect` reckons.
    o.sessions[s].adopted_from = (0..s).rev().find(|&m| o.sessions[m].opened.is_some());
    if rec.entries > 0 {
        o.counts.log_replays += 1;
        o.counts.log_entries_replayed += rec.entries;
    }
    match expect {
        LogExpect::Replays(m) if predecessor_log && !rec.adopted => {
            let why = format!(
                "{name} did not adopt the write-back log {} left on {} when it crashed",
                o.sessions[m].name,
                host.label()
            );
            o.violation("log-not-adopted", why);
        }
        LogExpect::Nothing if rec.adopted && rec.entries > 0 => {
            let why = format!(
                "{name} replayed {} entries of a write-back log on {}, though another writer opened after the \
                 one that wrote it (or it is alive)",
                rec.entries,
                host.label()
            );
            o.violation("superseded-log-replayed", why);
        }
        _ => {}
    }
    match find_log_dir(&root, vol) {
        Some(dir) => o.sessions[s].log_dir = Some(dir),
        None => o.violation("log-missing", format!("{name}: no write-back log directory names its epoch")),
    }
}

/// Did session `s`'s crashed predecessor (if it must carry on with its
/// log) leave a log directory? One whose writes were all committed is
/// removed as its engine closes.
fn predecessor_log(ctx: &Ctx, s: usize) -> bool {
    let o = ctx.oracle();
    match o.log_expect(s) {
        LogExpect::Replays(m) => o.sessions[m].log_dir.as_ref().is_some_and(|d| d.exists()),
        _ => false,
    }
}

async fn sleep(d: Duration) {
    tokio::time::sleep(d).await
}

fn ms(rng: &mut StdRng, r: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.random_range(r))
}

/// Create the volume as a provisioner would: retry until it exists.
async fn create(ctx: &Ctx, rng: &mut StdRng) -> bool {
    let mut plan = ctx.cfg.fault_plan(rng);
    plan.outages.clear();
    let (_h, store) = ctx.store("creator", plan, rng);
    let clock = SimClock::new(ctx.world.clone(), 0);
    let opts = CreateOptions {
        encryption: ctx.keys.clone(),
        compression: ctx.cfg.compression,
        ..CreateOptions::new(ctx.cfg.initial_chunks * CS, ctx.cfg.chunk_size as u32)
    };
    for attempt in 1..=20 {
        match Volume::create(store.clone(), VOL, opts.clone(), &clock).await {
            Ok(meta) => {
                ctx.event(&format!("creator: volume created (attempt {attempt})"));
                if ctx.keys.is_some() {
                    lock(&ctx.sealed).push((VOL.to_string(), meta.uuid));
                }
                return true;
            }
            Err(VolumeError::AlreadyExists(what)) => {
                let journal0 = !ctx.world.keys(&format!("{VOL}journal/")).is_empty();
                ctx.oracle().violation(
                    "create-retry",
                    format!(
                        "attempt {attempt} of the only creator got AlreadyExists ({what}); \
                         the volume {} usable",
                        if journal0 { "is" } else { "is NOT" }
                    ),
                );
                return journal0;
            }
            Err(VolumeError::Store(e)) => {
                ctx.event(&format!("creator: attempt {attempt} failed: {e}"));
                sleep(ms(rng, 100..5000)).await;
            }
            Err(e) => {
                ctx.oracle().violation("unexpected-error", format!("create: {e}"));
                return false;
            }
        }
    }
    ctx.event("creator: gave up");
    false
}

// ---------------------------------------------------------------- writers

/// Takeovers at their times; the first session at once.
async fn writers(ctx: Ctx) {
    let mut rng = rng_for(ctx.seed, "writers");
    let mut current = start_session(&ctx, 1, ctx.cfg.hosts[0], &mut rng).await;
    for (i, (at, crash_old)) in ctx.cfg.takeovers.clone().into_iter().enumerate() {
        tokio::time::sleep_until(Instant::now() + at.saturating_sub(ctx.world.elapsed())).await;
        if let Some((s, handle, task)) = current.take() {
            if crash_old {
                task.abort();
                handle.crash();
                {
                    let mut o = ctx.oracle();
                    let t = o.next_tick();
                    o.sessions[s].crashed = Some(t);
                }
                ctx.event(&format!("{}: crashed", handle.actor()));
                wait_log_released(&ctx, s).await;
                sleep(ms(&mut rng, 0..30_000)).await;
            } else {
                // The old writer's node is cut off for a while (that is
                // why it was replaced) and lives on, fenced unawares.
                let now = ctx.world.elapsed();
                let mut len = Duration::from_secs(rng.random_range(10..400));
                // Often it comes back after compaction folded the
                // journal past its last record, over a link that drops again
                // just after its first journal record lands: the commit is
                // in doubt, and its next flush reads the record back, in the
                // hole the fold left.
                let safety = ctx.cfg.safety_age.as_secs();
                let latest = ctx.cfg.run_for.saturating_sub(now).as_secs().saturating_sub(90);
                if rng.random_bool(0.6) && latest > safety + 90 {
                    len = Duration::from_secs(rng.random_range(safety + 90..=latest.min(safety + 360)));
                    // Longer than the retry layer's budget for one call,
                    // mostly shorter than compactions' intervals.
                    let flap = Duration::from_secs(rng.random_range(17..40));
                    handle.trip_at_put(PutTrip {
                        contains: "/journal/".into(),
                        not_before: now + len,
                        lands: Some(rng.random_bool(0.5)),
                        outage: Outage { window: Duration::ZERO..flap, black_hole: false },
                    });
                    ctx.event(&format!(
                        "{}: its first journal record after the cut lands as the link drops for {flap:?}",
                        handle.actor()
                    ));
                }
                handle.add_outage(Outage { window: now..now + len, black_hole: rng.random_bool(0.5) });
                ctx.event(&format!("{}: cut off for {len:?}, left running", handle.actor()));
            }
        }
        current = start_session(&ctx, i as u64 + 2, ctx.cfg.hosts[i + 1], &mut rng).await;
    }
}

/// Open a writer session (retrying as a restarted node would), read
/// everything it opened with, and start its task.
async fn start_session(ctx: &Ctx, n: u64, host: Host, rng: &mut StdRng) -> Option<(usize, SimStore, AbortHandle)> {
    let name = format!("w{n}");
    let mut arng = rng_for(ctx.seed, &name);
    let plan = ctx.cfg.fault_plan(&mut arng);
    let (handle, store) = ctx.store(&name, plan, &mut arng);
    let opts = ctx.cfg.writer_options(ctx.clock(&mut arng), ctx.log_root(host));
    let s = ctx.oracle().new_session(&name, host);
    let predecessor_log = predecessor_log(ctx, s);
    for attempt in 1..=10 {
        if ctx.done() {
            return None;
        }
        ctx.oracle().open_attempt(s);
        match Volume::open(store.clone(), VOL, opts.clone()).await {
            Ok(vol) => {
                let expect = ctx.oracle().opened(s);
                let st = vol.stats();
                ctx.event(&format!("{name}: opened (epoch {}, size {}, {})", st.epoch, st.size, host.label()));
                check_log_recovery(ctx, s, &vol, expect, predecessor_log);
                read_opened(ctx, s, &name, &vol, &mut arng).await;
                let task = tokio::spawn(writer_loop(ctx.clone(), s, name, vol, arng)).abort_handle();
                lock(&ctx.tasks).push(task.clone());
                return Some((s, handle, task));
            }
            Err(e) => {
                ctx.event(&format!("{name}: open attempt {attempt} failed: {e}"));
                ctx.oracle().error(&name, None, "open", &e);
                sleep(ms(rng, 500..20_000)).await;
            }
        }
    }
    None
}

/// A writer reads everything it opened with, before it writes: what it
/// must find (a crashed predecessor's acknowledged writes, when it carries
/// on with its log), and where, for the oracle, the committed state stood
/// when it took over.
async fn read_opened(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) {
    let size = vol.size();
    let mut off = 0;
    while off < size && !ctx.done() {
        let len = CS.min(size - off);
        for _ in 0..3 {
            match vol.read(off, len).await {
                Ok(data) => {
                    ctx.oracle().writer_read(s, off, &data);
                    break;
                }
                Err(VolumeError::Store(e)) => {
                    ctx.event(&format!("{name}: read {off}+{len} failed: {e}"));
                    sleep(ms(rng, 100..5000)).await;
                }
                Err(e @ VolumeError::Corrupt(_)) if !ctx.oracle().may_be_fenced(s) => {
                    ctx.event(&format!("{name}: read {off}+{len} failed: {e}"));
                    diagnose_missing(ctx, name, off, len, &e).await;
                    return;
                }
                Err(e) => {
                    note_error(ctx, s, name, &format!("read {off}+{len}"), &e);
                    return;
                }
            }
        }
        off += len;
    }
    ctx.event(&format!("{name}: read what it opened with"));
}

#[derive(Debug, Clone, Copy)]
enum WriterOp {
    Write,
    Zero,
    Read,
    Flush,
    Resize,
    Snapshot,
    Burst,
    Spray,
}

async fn writer_loop(ctx: Ctx, s: usize, name: String, vol: Volume, mut rng: StdRng) {
    while !ctx.done() {
        // Think; now and then stall for minutes (a paused VM, a slow node).
        // Hot seeds think less, and stall about as often per minute.
        let pause = match ctx.cfg.hot {
            None if rng.random_bool(0.02) => ms(&mut rng, 20_000..400_000),
            None => ms(&mut rng, 0..2000),
            Some(_) if rng.random_bool(0.003) => ms(&mut rng, 20_000..400_000),
            Some(_) => ms(&mut rng, 0..300),
        };
        sleep(pause).await;
        if ctx.done() {
            return;
        }
        if let Some((at, len)) = ctx.cfg.commit_outage
            && ctx.world.elapsed() >= at
            && !ctx.commit_outage_armed.swap(true, Ordering::SeqCst)
            && let Some(h) = lock(&ctx.handles).iter().rev().find(|h| h.actor() == name)
        {
            ctx.event(&format!("{name}: loses the store at its next journal record, for {len:?}"));
            h.outage_at_put("/journal/", Outage { window: Duration::ZERO..len, black_hole: true });
        }
        if ctx.cfg.storm_at.is_some_and(|t| ctx.world.elapsed() >= t) && !ctx.stormed.swap(true, Ordering::SeqCst) {
            if storm(&ctx, s, &name, &vol, &mut rng).await {
                ctx.event(&format!("{name}: fenced, stops"));
                return;
            }
            continue;
        }
        let roll = rng.random_range(0..100);
        // Hot seeds: more bursts, taken from plain reads.
        let roll = if ctx.cfg.hot.is_some() && (47..=65).contains(&roll) && roll % 2 == 0 { 70 } else { roll };
        let op = match roll {
            // Hot seeds: some writes become sprays.
            0..=37 if ctx.cfg.hot.is_some() && roll % 4 == 0 => WriterOp::Spray,
            0..=37 => WriterOp::Write,
            38..=46 => WriterOp::Zero,
            47..=65 => WriterOp::Read,
            66..=72 => WriterOp::Burst,
            73..=93 => WriterOp::Flush,
            94..=96 => WriterOp::Resize,
            _ => WriterOp::Snapshot,
        };
        let fenced = match op {
            WriterOp::Write | WriterOp::Zero => {
                write_op(&ctx, s, &name, &vol, &mut rng, matches!(op, WriterOp::Zero)).await
            }
            WriterOp::Read => {
                let (off, len) = random_range(&mut rng, vol.size());
                writer_read(&ctx, s, &name, &vol, &mut rng, off, len).await
            }
            WriterOp::Flush => flush_op(&ctx, s, &name, &vol, &mut rng).await,
            WriterOp::Resize => resize_op(&ctx, s, &name, &vol, &mut rng).await,
            WriterOp::Snapshot => snapshot_op(&ctx, s, &name, &vol).await,
            WriterOp::Burst if ctx.cfg.hot.is_some() && rng.random_bool(0.5) => {
                overlap_op(&ctx, s, &name, &vol, &mut rng).await
            }
            WriterOp::Burst => burst_op(&ctx, s, &name, &vol, &mut rng).await,
            WriterOp::Spray => spray_op(&ctx, s, &name, &vol, &mut rng).await,
        };
        if fenced {
            ctx.event(&format!("{name}: fenced, stops"));
            return;
        }
    }
}

/// A random byte range inside `size`: mostly whole blocks.
fn random_range(rng: &mut StdRng, size: u64) -> (u64, u64) {
    let blocks = size / BLOCK;
    if rng.random_bool(0.8) {
        if rng.random_bool(0.15) && size >= CS {
            return (rng.random_range(0..size / CS) * CS, CS);
        }
        let b = rng.random_range(0..blocks);
        let n = rng.random_range(1..=(blocks - b).min(24));
        (b * BLOCK, n * BLOCK)
    } else {
        let off = rng.random_range(0..size);
        (off, rng.random_range(1..=(size - off).min(9000)))
    }
}

/// Did the error say this session is fenced? Records it with the oracle either way.
fn note_error(ctx: &Ctx, s: usize, name: &str, op: &str, e: &VolumeError) -> bool {
    ctx.event(&format!("{name}: {op} failed: {e}"));
    ctx.oracle().error(name, Some(s), op, e);
    matches!(e, VolumeError::Fenced(_))
}

async fn writer_read(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng, off: u64, len: u64) -> bool {
    let r = match rng.random_range(0..3) {
        0 => vol.read(off, len).await,
        1 => vol.read_bytes(off, len).await.map(|b| b.to_vec()),
        _ => match vol.read_now(off, len) {
            Some(b) => Ok(b.to_vec()),
            None => vol.read(off, len).await,
        },
    };
    match r {
        Ok(data) => {
            ctx.event(&format!("{name}: read {off}+{len} ok"));
            ctx.oracle().writer_read(s, off, &data);
            false
        }
        Err(e @ VolumeError::Corrupt(_)) if !ctx.oracle().may_be_fenced(s) => {
            ctx.event(&format!("{name}: read {off}+{len} failed: {e}"));
            diagnose_missing(ctx, name, off, len, &e).await;
            false
        }
        Err(e) => note_error(ctx, s, name, &format!("read {off}+{len}"), &e),
    }
}

/// A read found damage. The simulated store damages nothing, so either the
/// reader works from a map that compaction has moved past (a fresh open
/// reads the range), or committed data is gone (a fresh open fails too).
async fn diagnose_missing(ctx: &Ctx, who: &str, off: u64, len: u64, e: &VolumeError) {
    let mut rng = rng_for(ctx.seed, &format!("{who}-recheck"));
    let (_h, store) = ctx.store(&format!("{who}-recheck"), FaultPlan::calm(), &mut rng);
    let opts = ctx.cfg.open_options(ctx.clock(&mut rng), true, None);
    let fresh = match Volume::open(store, VOL, opts).await {
        Ok(v) => v.read(off, len).await.map(drop),
        Err(e) => Err(e),
    };
    let (invariant, verdict) = match fresh {
        Ok(()) => {
            ("stale-map-read", "a fresh open reads the range: compaction collected what this opener's map still uses")
        }
        Err(VolumeError::Corrupt(_)) => ("committed-chunk-missing", "a fresh open fails too: committed data is gone"),
        Err(_) => ("corruption-reported", "a fresh open could not tell"),
    };
    ctx.oracle().violation(invariant, format!("{who} read {off}+{len}: {e}; {verdict}"));
}

async fn write_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng, zero: bool) -> bool {
    let (off, len) = ctx.cfg.write_range(rng, vol.size());
    let write = {
        let mut o = ctx.oracle();
        o.writes += 1;
        o.writes
    };
    let data: Option<Vec<u8>> = if zero {
        None
    } else if rng.random_bool(0.05) {
        Some(vec![0u8; len as usize])
    } else {
        Some(pattern(write, off, len as usize))
    };
    // A write that covers part of a block needs the block's value: read
    // it first (both ends of the range may need it).
    let mut tries = 0;
    let blocks = loop {
        let plan = ctx.oracle().plan_write(s, off, len, data.as_deref());
        match plan {
            Ok(b) => break b,
            Err(_) if tries == 2 => return false,
            Err(b) => {
                tries += 1;
                if writer_read(ctx, s, name, vol, rng, b * BLOCK, BLOCK).await {
                    return true;
                }
            }
        }
    };
    let what = if zero { "write_zeroes" } else { "write" };
    let positions = ctx.oracle().write_issued(s, write, &blocks);
    let r = match data {
        None => vol.write_zeroes(off, len).await,
        Some(d) => {
            if off % CS == 0 && len == CS && rng.random_bool(0.5) {
                vol.write_vec(off, d).await
            } else if rng.random_bool(0.3) {
                match vol.write_now(off, &d) {
                    Some(r) => r,
                    None => vol.write(off, &d).await,
                }
            } else {
                vol.write(off, &d).await
            }
        }
    };
    let ok = r.is_ok();
    ctx.event(&format!("{name}: {what} #{write} {off}+{len} {}", if ok { "ok" } else { "failed" }));
    ctx.oracle().write_done(s, blocks, positions, ok);
    match r {
        Ok(()) => false,
        Err(e) => note_error(ctx, s, name, what, &e),
    }
}

async fn flush_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) -> bool {
    let t0 = ctx.oracle().next_tick();
    // Some flushes are cut short: a cancelled request (the caller went away).
    let bound = if rng.random_bool(0.15) { ms(rng, 1..20_000) } else { Duration::from_secs(24 * 3600) };
    match tokio::time::timeout(bound, vol.flush()).await {
        Ok(Ok(())) => {
            ctx.event(&format!("{name}: flush ok (head {})", vol.stats().head_seq));
            ctx.oracle().flush_acked(s, t0, "flush");
            false
        }
        Ok(Err(e)) => note_error(ctx, s, name, "flush", &e),
        Err(_) => {
            ctx.event(&format!("{name}: flush cancelled after {bound:?}"));
            ctx.oracle().counts.flushes_cancelled += 1;
            false
        }
    }
}

/// Several requests in flight at once on one handle, as a kernel queues
/// them: writes of whole blocks (no two touching the same block), reads of
/// anything, flushes, and FUA-like writes (a write, then a flush meant for
/// it). A read returns, per block, a value some serial order of the
/// requests allows; a flush covers the writes acknowledged before it began.
async fn burst_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) -> bool {
    let size = vol.size();
    let blocks = size / BLOCK;
    let mut taken = std::collections::BTreeSet::new();
    let mut ops: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>> = Vec::new();
    for _ in 0..rng.random_range(2..=6) {
        let mut sub = StdRng::seed_from_u64(rng.random());
        match rng.random_range(0..100) {
            0..=54 => {
                let (b, n) = match ctx.cfg.hot {
                    Some(_) => {
                        let (off, len) = ctx.cfg.write_range(rng, size);
                        (off / BLOCK, len.div_ceil(BLOCK).max(1))
                    }
                    None => {
                        let b = rng.random_range(0..blocks);
                        (b, rng.random_range(1..=(blocks - b).min(8)))
                    }
                };
                if (b..b + n).any(|x| taken.contains(&x)) {
                    continue;
                }
                taken.extend(b..b + n);
                let fua = rng.random_bool(0.3);
                let zero = rng.random_bool(0.1);
                ops.push(Box::pin(async move {
                    if burst_write(ctx, s, name, vol, b * BLOCK, n * BLOCK, zero).await {
                        return true;
                    }
                    if fua { flush_op(ctx, s, name, vol, &mut sub).await } else { false }
                }));
            }
            55..=84 => {
                let (off, len) = random_range(&mut sub, size);
                ops.push(Box::pin(async move { burst_read(ctx, s, name, vol, off, len).await }));
            }
            _ => ops.push(Box::pin(async move { flush_op(ctx, s, name, vol, &mut sub).await })),
        }
    }
    ctx.event(&format!("{name}: {} requests at once", ops.len()));
    ctx.oracle().counts.bursts += 1;
    futures::future::join_all(ops).await.into_iter().any(|fenced| fenced)
}

/// A flush with writes landing while it is on its way, one after the
/// other (a database writing its next pages while its last fsync runs).
async fn overlap_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) -> bool {
    let mut sub = StdRng::seed_from_u64(rng.random());
    let size = vol.size();
    // Each after a pause: some land before its record is built, some
    // while the record is on its way, some after.
    let writes: Vec<(Duration, u64, u64)> = (0..rng.random_range(1..=6))
        .map(|_| {
            let (off, len) = ctx.cfg.write_range(rng, size);
            (ms(rng, 0..200), off / BLOCK, len.div_ceil(BLOCK).max(1))
        })
        .collect();
    ctx.event(&format!("{name}: a flush, and {} writes while it runs", writes.len()));
    let flush = flush_op(ctx, s, name, vol, &mut sub);
    let more = async {
        for (pause, b, n) in writes {
            sleep(pause).await;
            if burst_write(ctx, s, name, vol, b * BLOCK, n * BLOCK, false).await {
                return true;
            }
        }
        false
    };
    let (a, b) = tokio::join!(flush, more);
    a || b
}

/// Many single-block writes all over the volume, eight at a time and no
/// flush: past the dirty limit, so that background uploads start (hot
/// seeds: beside the hot chunks' writes and flushes).
async fn spray_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) -> bool {
    let blocks = vol.size() / BLOCK;
    let n = rng.random_range(16..=48);
    ctx.event(&format!("{name}: spray of {n} writes"));
    let picks: Vec<u64> = (0..n).map(|_| rng.random_range(0..blocks)).collect();
    for group in picks.chunks(8) {
        let mut distinct = group.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let writes = distinct.into_iter().map(|b| burst_write(ctx, s, name, vol, b * BLOCK, BLOCK, false));
        if futures::future::join_all(writes).await.into_iter().any(|fenced| fenced) {
            return true;
        }
    }
    false
}

async fn burst_write(ctx: &Ctx, s: usize, name: &str, vol: &Volume, off: u64, len: u64, zero: bool) -> bool {
    let (write, blocks, positions) = {
        let mut o = ctx.oracle();
        o.writes += 1;
        let write = o.writes;
        let data = (!zero).then(|| pattern(write, off, len as usize));
        let Ok(blocks) = o.plan_write(s, off, len, data.as_deref()) else { return false };
        let positions = o.write_issued(s, write, &blocks);
        (write, blocks, positions)
    };
    let r = if zero {
        vol.write_zeroes(off, len).await
    } else {
        let data: Vec<u8> = blocks.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        vol.write(off, &data).await
    };
    let ok = r.is_ok();
    ctx.event(&format!("{name}: burst write #{write} {off}+{len} {}", if ok { "ok" } else { "failed" }));
    ctx.oracle().write_done(s, blocks, positions, ok);
    match r {
        Ok(()) => false,
        Err(e) => note_error(ctx, s, name, "write", &e),
    }
}

/// A read beside writes in flight: each block reads as what the session
/// expected when the read began or when it returned (a write in flight
/// all the while may show or not).
async fn burst_read(ctx: &Ctx, s: usize, name: &str, vol: &Volume, off: u64, len: u64) -> bool {
    let before: Vec<Expect> = {
        let o = ctx.oracle();
        blocks_of(off, len).iter().map(|&(b, ..)| o.expect(s, b)).collect()
    };
    match vol.read(off, len).await {
        Ok(data) => {
            ctx.event(&format!("{name}: burst read {off}+{len} ok"));
            let mut o = ctx.oracle();
            for ((b, at, pos, n), e0) in blocks_of(off, len).into_iter().zip(before) {
                let piece = &data[pos..pos + n];
                if o.check(b, &e0, at, piece).is_ok() {
                    continue;
                }
                let now = o.expect(s, b);
                if let Err((inv, why)) = o.check(b, &now, at, piece) {
                    let who = o.sessions[s].name.clone();
                    o.violation(inv, format!("{who} read beside writes in flight: {why}"));
                    return false;
                }
            }
            false
        }
        Err(e @ VolumeError::Corrupt(_)) if !ctx.oracle().may_be_fenced(s) => {
            ctx.event(&format!("{name}: burst read {off}+{len} failed: {e}"));
            diagnose_missing(ctx, name, off, len, &e).await;
            false
        }
        Err(e) => note_error(ctx, s, name, &format!("read {off}+{len}"), &e),
    }
}

/// Records past the newest checkpoint the engine lets pile up: a writer
/// writes a checkpoint every 64 records (for volumes this small); one may
/// fail or be slow to land.
const JOURNAL_TAIL_BOUND: usize = 3 * 64;

/// Many small writes, each flushed at once, as fast as the store answers;
/// then, after a quiet minute (for the writer's checkpoint to land), the
/// journal past the newest checkpoint is bounded however fast the writer
/// flushed, so any opener replays few records. Compaction cannot help
/// here: every record is younger than its safety age.
async fn storm(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) -> bool {
    let n = rng.random_range(250..400);
    ctx.event(&format!("{name}: flush storm of {n}"));
    let blocks = vol.size() / BLOCK;
    for _ in 0..n {
        if ctx.done() {
            return false;
        }
        let b = rng.random_range(0..blocks);
        if burst_write(ctx, s, name, vol, b * BLOCK, BLOCK, false).await {
            return true;
        }
        let t0 = ctx.oracle().next_tick();
        match vol.flush().await {
            Ok(()) => ctx.oracle().flush_acked(s, t0, "flush"),
            Err(e) => {
                ctx.event(&format!("{name}: storm ends: {e}"));
                return note_error(ctx, s, name, "flush", &e);
            }
        }
    }
    sleep(Duration::from_secs(60)).await;
    let newest = ctx
        .world
        .keys(&format::checkpoint_prefix(VOL))
        .iter()
        .filter_map(|k| format::parse_checkpoint_key(VOL, k))
        .max();
    let tail = ctx
        .world
        .keys(&format::journal_prefix(VOL))
        .iter()
        .filter_map(|k| format::parse_journal_key(VOL, k))
        .filter(|&q| newest.is_none_or(|c| q > c))
        .count();
    ctx.event(&format!("{name}: after the storm, {tail} records past checkpoint {newest:?}"));
    ctx.oracle().counts.storms += 1;
    if tail > JOURNAL_TAIL_BOUND {
        ctx.oracle().violation(
            "journal-unbounded",
            format!("{name}: {tail} journal records past the newest checkpoint ({newest:?}) after a flush storm"),
        );
    }
    false
}

async fn resize_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume, rng: &mut StdRng) -> bool {
    let max = ctx.cfg.max_chunks * CS;
    let size = vol.size();
    if size >= max {
        return false;
    }
    let new = (size + rng.random_range(1..=20) * BLOCK).min(max);
    let t0 = ctx.oracle().next_tick();
    match vol.resize(new).await {
        Ok(()) => {
            ctx.event(&format!("{name}: resize to {new} ok"));
            let mut o = ctx.oracle();
            o.flush_acked(s, t0, "resize");
            o.size_floor = o.size_floor.max(new);
            false
        }
        Err(e) => note_error(ctx, s, name, &format!("resize to {new}"), &e),
    }
}

async fn snapshot_op(ctx: &Ctx, s: usize, name: &str, vol: &Volume) -> bool {
    let snap = format!("s{}", ctx.snapshot_names.fetch_add(1, Ordering::SeqCst));
    let (t0, expect) = {
        let mut o = ctx.oracle();
        (o.next_tick(), o.snapshot_expect(s, vol.size()))
    };
    match vol.snapshot(&snap).await {
        Ok(rec) => {
            ctx.event(&format!("{name}: snapshot {snap} ok (seq {}, size {})", rec.seq, rec.size));
            let mut o = ctx.oracle();
            o.flush_acked(s, t0, "snapshot");
            o.counts.snapshots += 1;
            o.snapshots.insert(snap, expect);
            false
        }
        Err(e) => note_error(ctx, s, name, &format!("snapshot {snap}"), &e),
    }
}

// ---------------------------------------------------------------- readers

async fn readers(ctx: Ctx) {
    let mut rng = rng_for(ctx.seed, "readers");
    for n in 1.. {
        // Hot seeds: often, to see a chunk's bytes between two records.
        let gap = if ctx.cfg.hot.is_some() { 1_000..10_000 } else { 10_000..150_000 };
        sleep(ms(&mut rng, gap)).await;
        if ctx.done() {
            return;
        }
        let snapshot = {
            let o = ctx.oracle();
            let names: Vec<&String> = o.snapshots.keys().filter(|n| !o.deleted_snapshots.contains(*n)).collect();
            (!names.is_empty() && rng.random_bool(0.3)).then(|| names[rng.random_range(0..names.len())].clone())
        };
        let stay = ms(&mut rng, 5_000..200_000);
        let c = ctx.clone();
        ctx.spawn(reader(c, format!("r{n}"), snapshot, stay));
    }
}

/// Hot seeds: a fresh reader soon after a journal record lands, one at a
/// time, reading everything once. A record that names a chunk's older
/// bytes is followed closely by one naming the newer (the writer still
/// holds them dirty), so a reader that comes minutes later sees nothing.
async fn auditor(ctx: Ctx) {
    let mut rng = rng_for(ctx.seed, "auditor");
    let mut seen = None;
    for n in 1.. {
        sleep(ms(&mut rng, 1..40)).await;
        if ctx.done() {
            return;
        }
        let head = ctx.world.keys(&format::journal_prefix(VOL)).pop();
        if head.is_none() || head == seen {
            continue;
        }
        seen = head;
        reader(ctx.clone(), format!("a{n}"), None, Duration::ZERO).await;
    }
}

/// Open read-only, read everything, then read now and then.
async fn reader(ctx: Ctx, name: String, snapshot: Option<String>, stay: Duration) {
    let mut rng = rng_for(ctx.seed, &name);
    let plan = ctx.cfg.fault_plan(&mut rng);
    let (_h, store) = ctx.store(&name, plan, &mut rng);
    let (floor, size_floor) = {
        let mut o = ctx.oracle();
        o.counts.readers += 1;
        (o.floor.clone(), o.size_floor)
    };
    let opts = ctx.cfg.open_options(ctx.clock(&mut rng), true, snapshot.clone());
    let vol = match Volume::open(store, VOL, opts).await {
        Ok(v) => v,
        Err(e) => {
            ctx.event(&format!("{name}: open failed: {e}"));
            let gone = snapshot.as_ref().is_some_and(|s| ctx.oracle().deleted_snapshots.contains(s));
            if !gone {
                ctx.oracle().error(&name, None, "open", &e);
            }
            return;
        }
    };
    let size = vol.size();
    ctx.event(&format!(
        "{name}: opened read-only{} (size {size})",
        snapshot.as_ref().map(|s| format!(" at {s}")).unwrap_or_default()
    ));
    if let Some(snap) = snapshot {
        check_snapshot(&ctx, &name, &vol, &snap).await;
        return;
    }
    if size < size_floor {
        ctx.oracle().violation("size-shrank", format!("{name}: size {size}, but {size_floor} was acknowledged"));
        return;
    }
    let mut view = ReaderView { name: name.clone(), lower: floor };
    let mut off = 0;
    while off < size && !ctx.done() {
        let len = CS.min(size - off);
        reader_read(&ctx, &vol, &mut view, off, len).await;
        off += len;
    }
    let until = ctx.world.elapsed() + stay;
    while ctx.world.elapsed() < until && !ctx.done() {
        sleep(ms(&mut rng, 200..20_000)).await;
        let (off, len) = random_range(&mut rng, size);
        reader_read(&ctx, &vol, &mut view, off, len).await;
    }
    ctx.event(&format!("{name}: closed"));
}

async fn reader_read(ctx: &Ctx, vol: &Volume, view: &mut ReaderView, off: u64, len: u64) {
    match vol.read(off, len).await {
        Ok(data) => {
            ctx.event(&format!("{}: read {off}+{len} ok", view.name));
            ctx.oracle().reader_read(view, off, &data);
        }
        Err(e) => {
            ctx.event(&format!("{}: read {off}+{len} failed: {e}", view.name));
            if matches!(e, VolumeError::Corrupt(_)) {
                diagnose_missing(ctx, &view.name, off, len, &e).await;
            } else {
                ctx.oracle().error(&view.name, None, "read", &e);
            }
        }
    }
}

async fn check_snapshot(ctx: &Ctx, name: &str, vol: &Volume, snap: &str) {
    let Some(expect) = ctx.oracle().snapshots.get(snap).cloned() else { return };
    if vol.size() != expect.size {
        ctx.oracle().violation(
            "snapshot-content",
            format!("{name}: snapshot {snap} has size {}, taken at {}", vol.size(), expect.size),
        );
        return;
    }
    let mut off = 0;
    while off < expect.size && !ctx.done() {
        let len = CS.min(expect.size - off);
        match vol.read(off, len).await {
            Ok(data) => {
                let mut o = ctx.oracle();
                for (b, _, pos, n) in blocks_of(off, len) {
                    if let Err((_, why)) = o.check(b, &expect.blocks[b as usize], 0, &data[pos..pos + n]) {
                        o.violation("snapshot-content", format!("{name}: snapshot {snap}: {why}"));
                        return;
                    }
                }
            }
            Err(e) => {
                ctx.event(&format!("{name}: read {off}+{len} failed: {e}"));
                // A snapshot deleted under its reader may be collected.
                if !ctx.oracle().deleted_snapshots.contains(snap) {
                    ctx.oracle().error(name, None, "read", &e);
                }
            }
        }
        off += len;
    }
}

// ---------------------------------------------------------------- compactors

async fn compactor(ctx: Ctx, n: usize, skew: i64) {
    let mut rng = rng_for(ctx.seed, &format!("c{n}"));
    let clock = SimClock::new(ctx.world.clone(), skew);
    let mut incarnation = 0;
    let mut current = None;
    while !ctx.done() {
        sleep(ms(&mut rng, 5_000..120_000)).await;
        let (handle, store) = match current.take() {
            Some(hs) => hs,
            None => {
                incarnation += 1;
                let name = format!("c{n}.{incarnation}");
                let plan = ctx.cfg.fault_plan(&mut rng);
                ctx.store(&name, plan, &mut rng)
            }
        };
        let opts =
            CompactOptions { safety_age: ctx.cfg.safety_age, dry_run: false, concurrency: rng.random_range(1..=16) };
        // Some passes die part-way (the controller pod is killed).
        let bound = if rng.random_bool(0.25) { ms(&mut rng, 0..8_000) } else { Duration::from_secs(3600) };
        // Some die as they delete folded journal records: the deletes in
        // flight land or not (a hole, were they sent several at once).
        let trip = rng.random_bool(0.2).then(|| rng.random_range(1..=24u64));
        handle.crash_at_delete(trip.map(|n| ("/journal/", n)));
        let who = handle.actor().to_string();
        // Now and then a clone (compacted beside its parent's compactions).
        let (target, clone) = {
            let o = ctx.oracle();
            let live: Vec<usize> = (0..o.clones.len()).filter(|&c| o.clones[c].live()).collect();
            match live.is_empty() || rng.random_bool(0.6) {
                true => (VOL.to_string(), None),
                false => {
                    let c = live[rng.random_range(0..live.len())];
                    (o.clones[c].prefix.clone(), Some(c))
                }
            }
        };
        match tokio::time::timeout(bound, compact::compact(&store, &target, &opts, &clock)).await {
            Ok(Ok(rep)) => {
                ctx.event(&format!(
                    "{who}: compacted {target} (skew {skew}s, head {}, folded {:?}, records deleted {}, chunks deleted {})",
                    rep.head_seq, rep.folded_seq, rep.journal_records_deleted, rep.chunks_deleted
                ));
                ctx.oracle().counts.compactions += 1;
                handle.crash_at_delete(None);
                current = Some((handle, store));
            }
            Ok(Err(_)) if handle.is_crashed() => {
                ctx.event(&format!("{who}: killed while deleting journal records"));
                ctx.oracle().counts.compactions_crashed += 1;
                ctx.oracle().counts.compactions_killed_deleting += 1;
            }
            Ok(Err(e)) => {
                handle.crash_at_delete(None);
                ctx.event(&format!("{who}: compaction of {target} failed: {e}"));
                match clone {
                    Some(c) => ctx.oracle().clone_error(c, &who, "compact", &e),
                    None => ctx.oracle().error(&who, None, "compact", &e),
                }
                current = Some((handle, store));
            }
            Err(_) => {
                ctx.event(&format!("{who}: killed mid-compaction after {bound:?}"));
                ctx.oracle().counts.compactions_crashed += 1;
                handle.crash();
            }
        }
    }
}

// ---------------------------------------------------------------- damage from outside

/// Key of the snapshot record [`break_snapshot`] writes.
const BROKEN_SNAPSHOT: &str = "broken";

/// An unreadable snapshot record appears (a bad restore from backup, a
/// tool gone wrong). Compaction must go on (folding nothing while it is
/// there) and report it, never fail.
async fn break_snapshot(ctx: Ctx, at: Duration) {
    let mut rng = rng_for(ctx.seed, "vandal");
    sleep(at).await;
    let (_h, store) = ctx.store("vandal", FaultPlan::calm(), &mut rng);
    let key = format::snapshot_key(VOL, BROKEN_SNAPSHOT);
    match store.put(&key, Bytes::from_static(b"{\"not\": \"a snapshot"), PutMode::Overwrite).await {
        Ok(()) => ctx.event(&format!("vandal: wrote an unreadable {key}")),
        Err(e) => ctx.event(&format!("vandal: {e}")),
    }
}

/// At quiescence: an unreadable snapshot record is reported by compaction
/// and `fsck`; then it is removed, as an operator would.
async fn check_broken_snapshot(ctx: &Ctx, store: &DynStore, clock: &dyn Clock) -> bool {
    let key = format::snapshot_key(VOL, BROKEN_SNAPSHOT);
    if ctx.world.keys(&key).is_empty() {
        return true;
    }
    let opts = CompactOptions { safety_age: ctx.cfg.safety_age, ..CompactOptions::default() };
    match compact::compact(store, VOL, &opts, clock).await {
        Ok(rep) if rep.unreadable_snapshots.contains(&key) => {}
        Ok(rep) => {
            let why = format!("compaction did not report {key}: {:?}", rep.unreadable_snapshots);
            ctx.oracle().violation("unreadable-snapshot", why);
            return false;
        }
        Err(e) => {
            ctx.oracle().violation("unreadable-snapshot", format!("compaction failed beside {key}: {e}"));
            return false;
        }
    }
    match fsck::fsck(store.as_ref(), VOL, false, &|_, _| {}).await {
        Ok(rep) if !rep.clean => {}
        other => {
            let why = format!("fsck did not report {key}: {:?}", other.map(|r| r.errors));
            ctx.oracle().violation("unreadable-snapshot", why);
            return false;
        }
    }
    if let Err(e) = store.delete(&key).await {
        ctx.oracle().violation("unreadable-snapshot", format!("removing {key}: {e}"));
        return false;
    }
    ctx.oracle().counts.unreadable_snapshots_reported += 1;
    true
}

// ---------------------------------------------------------------- clones and deletes

/// A volume restored from a snapshot of the simulated volume, made as the
/// CSI controller makes one (a pin of its own in the parent, a clone
/// marker, then `volume.json` naming the pin) and written by one session
/// in whole blocks. Version 0 of a block is the snapshot's content,
/// version p ≥ 1 the clone's write `writes[b][p - 1]`.
#[derive(Debug)]
struct CloneState {
    name: String,
    prefix: String,
    snap: String,
    base: SnapshotExpect,
    created: bool,
    /// Per block: the clone's writes in order, each with when it was
    /// acknowledged (0: not).
    writes: Vec<Vec<(Bytes, u64)>>,
    floor: Vec<usize>,
    /// When its deletion began: from then on its actors may fail.
    deleting: Option<u64>,
    /// A delete of it returned Ok: no opener that starts later may open it.
    deleted: bool,
    /// When (store clock) its deletion began.
    deleting_unix: i64,
}

impl CloneState {
    fn live(&self) -> bool {
        self.created && self.deleting.is_none()
    }
}

impl Oracle {
    /// The first version at or above `lower` of clone `c`'s block `b` that reads as `data`.
    fn clone_find(&self, c: usize, b: u64, at: usize, data: &[u8], lower: usize) -> Option<usize> {
        let k = &self.clones[c];
        let w = &k.writes[b as usize];
        (lower..=w.len()).find(|&p| {
            if p == 0 {
                self.check(b, &k.base.blocks[b as usize], at, data).is_ok()
            } else {
                &w[p - 1].0[at..at + data.len()] == data
            }
        })
    }

    /// A reader of clone `c`'s committed state read `data` at `off`;
    /// `lower` is the floor when it opened, raised by what it read (its
    /// values never go back).
    fn clone_read(&mut self, c: usize, who: &str, lower: &mut [usize], off: u64, data: &[u8]) {
        for (b, at, pos, n) in blocks_of(off, data.len() as u64) {
            let piece = &data[pos..pos + n];
            let lo = lower[b as usize];
            match self.clone_find(c, b, at, piece, lo) {
                Some(p) => {
                    if n as u64 == BLOCK {
                        lower[b as usize] = p;
                        let f = &mut self.clones[c].floor[b as usize];
                        *f = (*f).max(p);
                    }
                }
                None => {
                    let k = &self.clones[c];
                    let what = match self.clone_find(c, b, at, piece, 0) {
                        _ if piece.iter().all(|&x| x == 0) => "zeros".to_string(),
                        Some(0) => "the snapshot's content".to_string(),
                        Some(p) => format!("its write {p}"),
                        None => format!("bytes neither snapshot {} nor the clone wrote there", k.snap),
                    };
                    let why = format!(
                        "{who} read block {b} of {} as {what}; durable: version {lo} of {}",
                        k.name,
                        k.writes[b as usize].len()
                    );
                    let inv = if lo > 0 { "clone-acked-data-lost" } else { "clone-content" };
                    self.violation(inv, why);
                    return;
                }
            }
        }
    }

    /// The clone's writer read `data` at `off`: its own latest writes, the
    /// snapshot where it wrote nothing.
    fn clone_writer_read(&mut self, c: usize, who: &str, off: u64, data: &[u8]) {
        for (b, at, pos, n) in blocks_of(off, data.len() as u64) {
            let piece = &data[pos..pos + n];
            let k = &self.clones[c];
            let ok = match k.writes[b as usize].last() {
                Some((v, _)) => &v[at..at + n] == piece,
                None => self.check(b, &k.base.blocks[b as usize], at, piece).is_ok(),
            };
            if !ok {
                let why = format!(
                    "{who} read block {b} of {} as {}; expected its write {}",
                    k.name,
                    self.describe_data(b, at, piece),
                    k.writes[b as usize].len()
                );
                self.violation("clone-writer-reads-own-writes", why);
                return;
            }
        }
    }

    fn clone_flush_acked(&mut self, c: usize, t0: u64) {
        self.counts.flushes_acked += 1;
        let k = &mut self.clones[c];
        for (w, f) in k.writes.iter().zip(k.floor.iter_mut()) {
            if let Some(p) = w.iter().rposition(|&(_, t)| t != 0 && t < t0) {
                *f = (*f).max(p + 1);
            }
        }
    }

    /// An actor of clone `c` failed: expected once its deletion began, and
    /// for store errors; anything else breaks an invariant.
    fn clone_error(&mut self, c: usize, who: &str, op: &str, e: &VolumeError) {
        if self.clones[c].deleting.is_some() || matches!(e, VolumeError::Store(_)) {
            return;
        }
        let inv = match e {
            VolumeError::Fenced(_) => "self-fenced",
            VolumeError::Corrupt(_) if op == "compact" => "compaction-reports-damage",
            VolumeError::Corrupt(_) => "corruption-reported",
            _ => "unexpected-error",
        };
        self.violation(inv, format!("{who} {op}: {e}"));
    }
}

/// Now and then: restore a clone from a snapshot, delete a clone (its
/// writer and readers still at work), or delete a snapshot (clones keep
/// their own pins).
async fn cloner(ctx: Ctx) {
    let mut rng = rng_for(ctx.seed, "cloner");
    let mut made = 0;
    loop {
        sleep(ms(&mut rng, 20_000..180_000)).await;
        if ctx.done() {
            return;
        }
        let (snaps, live): (Vec<String>, Vec<usize>) = {
            let o = ctx.oracle();
            let snaps = o.snapshots.keys().filter(|n| !o.deleted_snapshots.contains(*n)).cloned().collect();
            (snaps, (0..o.clones.len()).filter(|&c| o.clones[c].live()).collect())
        };
        let roll = rng.random_range(0..100);
        if roll < 30 && !live.is_empty() {
            let c = live[rng.random_range(0..live.len())];
            ctx.spawn(delete_clone(ctx.clone(), c));
        } else if roll < 45 && !snaps.is_empty() {
            let snap = snaps[rng.random_range(0..snaps.len())].clone();
            delete_snapshot(&ctx, &snap, &mut rng).await;
        } else if !snaps.is_empty() && made < ctx.cfg.max_clones {
            made += 1;
            let snap = snaps[rng.random_range(0..snaps.len())].clone();
            ctx.spawn(clone_life(ctx.clone(), made, snap));
        }
    }
}

/// Delete a snapshot of the volume, as DeleteSnapshot does.
async fn delete_snapshot(ctx: &Ctx, snap: &str, rng: &mut StdRng) {
    ctx.oracle().deleted_snapshots.insert(snap.to_string());
    let plan = ctx.cfg.fault_plan(rng);
    let who = format!("del-{snap}");
    let (_h, store) = ctx.store(&who, plan, rng);
    for _ in 0..5 {
        match store.delete(&format::snapshot_key(VOL, snap)).await {
            Ok(()) => {
                ctx.event(&format!("{who}: snapshot {snap} deleted"));
                ctx.oracle().counts.snapshots_deleted += 1;
                return;
            }
            Err(e) => {
                ctx.event(&format!("{who}: delete failed: {e}"));
                sleep(ms(rng, 1000..20_000)).await;
            }
        }
    }
}

enum CloneFail {
    /// The snapshot went away first: nothing to restore.
    Gone(String),
    Retry(String),
    Bad(String),
}

fn clone_fail(e: catalog::CatalogError) -> CloneFail {
    use catalog::CatalogError as C;
    match e {
        C::SnapshotGone { .. } | C::Volume(VolumeError::NotFound(_)) => CloneFail::Gone(e.to_string()),
        C::Store(_) | C::Volume(VolumeError::Store(_)) => CloneFail::Retry(e.to_string()),
        e => CloneFail::Bad(e.to_string()),
    }
}

/// Restore `prefix` from snapshot `snap` of the volume, as CreateVolume
/// with a snapshot source does.
async fn make_clone(
    store: &DynStore,
    prefix: &str,
    snap: &str,
    clock: &dyn Clock,
    chunk_size: u64,
    compression: Option<format::Codec>,
) -> Result<u64, CloneFail> {
    let rec = read_snapshot(store, VOL, snap).await.map_err(|e| clone_fail(e.into()))?;
    catalog::record_source(store, prefix, VOL, prefix).await.map_err(clone_fail)?;
    catalog::pin_snapshot_for(store, VOL, &rec, prefix, prefix, &mut false).await.map_err(clone_fail)?;
    catalog::add_clone_marker(store, VOL, prefix, prefix, rec.seq).await.map_err(clone_fail)?;
    let parent = ParentRef { volume: VOL.to_string(), snapshot: format::clone_pin_name(prefix), seq: rec.seq };
    let opts = CreateOptions {
        parent: Some(parent),
        // An encrypted volume's clone shares its data key.
        encryption: keys::NewKeys::inherited(store.as_ref()),
        // As a StorageClass of the same compression makes it.
        compression,
        ..CreateOptions::new(rec.size, chunk_size as u32)
    };
    match Volume::create(store.clone(), prefix, opts, clock).await {
        // A retry after an attempt that landed.
        Ok(_) | Err(VolumeError::AlreadyExists(_)) => {
            catalog::forget_source(store, prefix).await;
            Ok(rec.size)
        }
        Err(e) => Err(clone_fail(e.into())),
    }
}

/// Restore a clone, then write, read and flush it (whole blocks) until the
/// run ends or a while after its deletion began; now and then a read-only
/// opener reads it beside the writer and the parent's compactions.
async fn clone_life(ctx: Ctx, n: u64, snap: String) {
    let name = format!("k{n}");
    let prefix = format!("sim/{name}/");
    let mut rng = rng_for(ctx.seed, &name);
    let plan = ctx.cfg.fault_plan(&mut rng);
    let (_h, store) = ctx.store(&name, plan, &mut rng);
    let clock = ctx.clock(&mut rng);
    let c = {
        let mut o = ctx.oracle();
        let Some(base) = o.snapshots.get(&snap).cloned() else { return };
        let blocks = (base.size / BLOCK) as usize;
        o.clones.push(CloneState {
            name: name.clone(),
            prefix: prefix.clone(),
            snap: snap.clone(),
            base,
            created: false,
            writes: vec![Vec::new(); blocks],
            floor: vec![0; blocks],
            deleting: None,
            deleted: false,
            deleting_unix: i64::MAX,
        });
        o.clones.len() - 1
    };
    let mut size = None;
    for attempt in 1..=10 {
        if ctx.done() {
            return;
        }
        match make_clone(&store, &prefix, &snap, clock.as_ref(), ctx.cfg.chunk_size, ctx.cfg.compression).await {
            Ok(s) => {
                size = Some(s);
                break;
            }
            Err(CloneFail::Gone(why)) => {
                ctx.event(&format!("{name}: not restored from {snap}: {why}"));
                return;
            }
            Err(CloneFail::Retry(why)) => {
                ctx.event(&format!("{name}: restore attempt {attempt} failed: {why}"));
                sleep(ms(&mut rng, 500..20_000)).await;
            }
            Err(CloneFail::Bad(why)) => {
                ctx.oracle().violation("clone-create", format!("{name} from {snap}: {why}"));
                return;
            }
        }
    }
    let Some(size) = size else { return };
    if ctx.keys.is_some() {
        // The clone is sealed from now on, in every actor's store.
        let mut uuid = None;
        for _ in 0..20 {
            match s3blk::volume::replay::read_meta(store.as_ref(), &prefix).await {
                Ok(m) => {
                    uuid = Some(m.uuid);
                    break;
                }
                Err(e) => ctx.event(&format!("{name}: reading its volume.json: {e}")),
            }
            sleep(Duration::from_secs(1)).await;
        }
        let Some(uuid) = uuid else { return };
        lock(&ctx.sealed).push((prefix.clone(), uuid));
    }
    {
        let mut o = ctx.oracle();
        if size != o.clones[c].base.size {
            let want = o.clones[c].base.size;
            o.violation("clone-create", format!("{name}: size {size}, snapshot {snap} was taken at {want}"));
            return;
        }
        o.clones[c].created = true;
        o.counts.clones += 1;
    }
    ctx.event(&format!("{name}: restored from {snap}"));
    let opts = ctx.cfg.open_options(clock.clone(), false, None);
    let mut vol = None;
    for _ in 0..10 {
        if ctx.done() || ctx.oracle().clones[c].deleting.is_some() {
            return;
        }
        match Volume::open(store.clone(), &prefix, opts.clone()).await {
            Ok(v) => {
                vol = Some(v);
                break;
            }
            Err(e) => {
                ctx.event(&format!("{name}: open failed: {e}"));
                ctx.oracle().clone_error(c, &name, "open", &e);
                sleep(ms(&mut rng, 500..20_000)).await;
            }
        }
    }
    let Some(vol) = vol else { return };
    ctx.event(&format!("{name}: opened"));
    let blocks = size / BLOCK;
    let mut after_delete = rng.random_range(0..8);
    let mut readers = 0;
    let mut flattens = 0;
    let flattening = Arc::new(AtomicBool::new(false));
    while !ctx.done() {
        sleep(ms(&mut rng, 0..3000)).await;
        if ctx.oracle().clones[c].deleting.is_some() {
            if after_delete == 0 {
                ctx.event(&format!("{name}: writer stops"));
                return;
            }
            after_delete -= 1;
        }
        match rng.random_range(0..100) {
            0..=44 => {
                let b = rng.random_range(0..blocks);
                let n = rng.random_range(1..=(blocks - b).min(8));
                let (write, data) = {
                    let mut o = ctx.oracle();
                    o.writes += 1;
                    let write = o.writes;
                    let data = pattern(write, b * BLOCK, (n * BLOCK) as usize);
                    for (i, blk) in (b..b + n).enumerate() {
                        let piece = Bytes::copy_from_slice(&data[i * BLOCK as usize..(i + 1) * BLOCK as usize]);
                        o.clones[c].writes[blk as usize].push((piece, 0));
                    }
                    (write, data)
                };
                let r = vol.write(b * BLOCK, &data).await;
                ctx.event(&format!("{name}: write #{write} {}+{} {}", b * BLOCK, n * BLOCK, r.is_ok()));
                let mut o = ctx.oracle();
                match r {
                    Ok(()) => {
                        let t = o.next_tick();
                        for blk in b..b + n {
                            if let Some(last) = o.clones[c].writes[blk as usize].last_mut() {
                                last.1 = t;
                            }
                        }
                    }
                    Err(e) => {
                        // What it reads from now on is not known: it stops.
                        o.clone_error(c, &name, "write", &e);
                        return;
                    }
                }
            }
            45..=74 => {
                let (off, len) = random_range(&mut rng, size);
                match vol.read(off, len).await {
                    Ok(d) => {
                        ctx.event(&format!("{name}: read {off}+{len} ok"));
                        let mut o = ctx.oracle();
                        if o.clones[c].deleting.is_none() {
                            o.clone_writer_read(c, &name, off, &d);
                        }
                    }
                    Err(e) => {
                        ctx.event(&format!("{name}: read {off}+{len} failed: {e}"));
                        ctx.oracle().clone_error(c, &name, "read", &e);
                    }
                }
            }
            75..=94 => {
                let t0 = ctx.oracle().next_tick();
                let bound = if rng.random_bool(0.15) { ms(&mut rng, 1..20_000) } else { Duration::from_secs(86_400) };
                match tokio::time::timeout(bound, vol.flush()).await {
                    Ok(Ok(())) => {
                        ctx.event(&format!("{name}: flush ok"));
                        ctx.oracle().clone_flush_acked(c, t0);
                    }
                    Ok(Err(e)) => {
                        ctx.event(&format!("{name}: flush failed: {e}"));
                        ctx.oracle().clone_error(c, &name, "flush", &e);
                    }
                    Err(_) => ctx.event(&format!("{name}: flush cancelled after {bound:?}")),
                }
            }
            // Now and then, flatten it (once at a time), beside its writes.
            _ if rng.random_range(0..4) == 0 => {
                if !flattening.swap(true, Ordering::SeqCst) {
                    flattens += 1;
                    let (ctx2, vol, store) = (ctx.clone(), vol.clone(), store.clone());
                    let (who, prefix, busy) = (format!("{name}f{flattens}"), prefix.clone(), flattening.clone());
                    ctx.spawn(async move {
                        flatten_clone(&ctx2, c, &who, &store, &prefix, &vol).await;
                        busy.store(false, Ordering::SeqCst);
                    });
                }
            }
            _ => {
                readers += 1;
                let stay = ms(&mut rng, 5_000..120_000);
                ctx.spawn(clone_reader(ctx.clone(), c, format!("{name}r{readers}"), stay));
            }
        }
    }
}

/// Flatten clone `c` as `s3blk volume flatten` does, through its writer
/// `vol` (whose writes go on meanwhile): copy, then let go of the parent.
/// Its reads must not change; the parent's compaction may then take what
/// the clone read through it.
async fn flatten_clone(ctx: &Ctx, c: usize, who: &str, store: &DynStore, prefix: &str, vol: &Volume) {
    let copied = match vol.copy_parents(&|_, _| {}).await {
        Ok(copied) => copied,
        Err(e) => {
            ctx.event(&format!("{who}: copy failed: {e}"));
            ctx.oracle().clone_error(c, who, "flatten", &e);
            return;
        }
    };
    ctx.event(&format!(
        "{who}: copied {} of {} inherited chunks, covered from seq {}",
        copied.copied, copied.inherited, copied.seq
    ));
    match catalog::let_go_of_parent(store, prefix, Some(copied.seq)).await {
        Ok(catalog::ParentOutcome::LetGo { parent }) => {
            ctx.event(&format!("{who}: let go of {parent}"));
            ctx.oracle().counts.flattens += 1;
        }
        Ok(other) => {
            // No snapshot of a clone is taken here: nothing keeps the parent.
            ctx.oracle().violation("flatten", format!("{who}: {other:?}"));
        }
        Err(catalog::CatalogError::Store(e) | catalog::CatalogError::Volume(VolumeError::Store(e))) => {
            ctx.event(&format!("{who}: letting go failed: {e}"));
        }
        Err(e) => {
            ctx.event(&format!("{who}: letting go failed: {e}"));
            let mut o = ctx.oracle();
            if o.clones[c].deleting.is_none() {
                o.violation("flatten", format!("{who}: {e}"));
            }
        }
    }
}

/// Open clone `c` read-only (refused once a delete of it returned Ok),
/// read it all, then now and then.
async fn clone_reader(ctx: Ctx, c: usize, name: String, stay: Duration) {
    let mut rng = rng_for(ctx.seed, &name);
    let plan = ctx.cfg.fault_plan(&mut rng);
    let (_h, store) = ctx.store(&name, plan, &mut rng);
    let (prefix, deleted, mut lower) = {
        let o = ctx.oracle();
        let k = &o.clones[c];
        (k.prefix.clone(), k.deleted, k.floor.clone())
    };
    let opts = ctx.cfg.open_options(ctx.clock(&mut rng), true, None);
    let vol = match Volume::open(store, &prefix, opts).await {
        Ok(v) if deleted => {
            drop(v);
            ctx.oracle()
                .violation("deleted-volume-opens", format!("{name}: opened {prefix} after its delete returned"));
            return;
        }
        Ok(v) => v,
        Err(VolumeError::NotFound(_)) if deleted => return,
        Err(e) => {
            ctx.event(&format!("{name}: open failed: {e}"));
            ctx.oracle().clone_error(c, &name, "open", &e);
            return;
        }
    };
    ctx.event(&format!("{name}: opened read-only"));
    let size = vol.size();
    let until = ctx.world.elapsed() + stay;
    let mut off = 0;
    while !ctx.done() {
        let (o, len) = if off < size {
            let len = CS.min(size - off);
            off += len;
            (off - len, len)
        } else if ctx.world.elapsed() < until {
            sleep(ms(&mut rng, 200..20_000)).await;
            random_range(&mut rng, size)
        } else {
            break;
        };
        match vol.read(o, len).await {
            Ok(d) => {
                ctx.event(&format!("{name}: read {o}+{len} ok"));
                ctx.oracle().clone_read(c, &name, &mut lower, o, &d);
            }
            Err(e) => {
                ctx.event(&format!("{name}: read {o}+{len} failed: {e}"));
                ctx.oracle().clone_error(c, &name, "read", &e);
            }
        }
    }
    ctx.event(&format!("{name}: closed"));
}

/// Delete clone `c` as DeleteVolume does, its writer and readers still at
/// work; once the delete returned, a new opener must not find it.
async fn delete_clone(ctx: Ctx, c: usize) {
    let (name, prefix) = {
        let mut o = ctx.oracle();
        let t = o.next_tick();
        let k = &mut o.clones[c];
        k.deleting = Some(t);
        k.deleting_unix = ctx.world.now_unix();
        (format!("{}-delete", k.name), k.prefix.clone())
    };
    let mut rng = rng_for(ctx.seed, &name);
    let plan = ctx.cfg.fault_plan(&mut rng);
    let (_h, store) = ctx.store(&name, plan, &mut rng);
    let clock = ctx.clock(&mut rng);
    for attempt in 1..=10 {
        match catalog::delete_volume(&store, &prefix, catalog::OnDependants::RefuseClones, clock.as_ref()).await {
            Ok(catalog::DeleteOutcome::Deleted { objects }) => {
                ctx.event(&format!("{name}: deleted ({objects} objects)"));
                break;
            }
            Ok(catalog::DeleteOutcome::Absent | catalog::DeleteOutcome::Probes { .. }) if attempt > 1 => {
                ctx.event(&format!("{name}: deleted (by an earlier attempt)"));
                break;
            }
            Ok(other) => {
                ctx.oracle().violation("clone-delete", format!("{name}: {other:?}, though nothing reads through it"));
                return;
            }
            Err(catalog::CatalogError::Store(e)) => {
                ctx.event(&format!("{name}: attempt {attempt} failed: {e}"));
                sleep(ms(&mut rng, 500..20_000)).await;
            }
            Err(e) => {
                ctx.oracle().violation("clone-delete", format!("{name}: {e}"));
                return;
            }
        }
        if attempt == 10 {
            return;
        }
    }
    {
        let mut o = ctx.oracle();
        o.clones[c].deleted = true;
        o.counts.clones_deleted += 1;
    }
    // A new opener at once: the volume is gone.
    ctx.spawn(clone_reader(ctx.clone(), c, format!("{name}-check"), Duration::ZERO));
}

// ---------------------------------------------------------------- quiescence

/// Every actor stopped, every request in flight settled: a takeover reads
/// the floor or later everywhere; compaction changes nothing; fsck is clean.
async fn final_checks(ctx: &Ctx) {
    let mut rng = rng_for(ctx.seed, "final");
    let (_h, store) = ctx.store("final", FaultPlan::calm(), &mut rng);
    let clock: Arc<dyn Clock> = Arc::new(SimClock::new(ctx.world.clone(), 0));
    if !check_broken_snapshot(ctx, &store, clock.as_ref()).await {
        return;
    }
    // Every writer died at the stop: its engine lets go of its log.
    let sessions = ctx.oracle().sessions.len();
    for w in 0..sessions {
        wait_log_released(ctx, w).await;
    }
    let host = ctx.cfg.final_host;
    let s = ctx.oracle().new_session("final", host);
    let predecessor_log = predecessor_log(ctx, s);
    ctx.oracle().open_attempt(s);
    let opts = ctx.cfg.writer_options(clock.clone(), ctx.log_root(host));
    let vol = match Volume::open(store.clone(), VOL, opts).await {
        Ok(v) => v,
        Err(e) => {
            ctx.oracle().violation("open-at-quiescence", format!("a takeover on a calm store failed: {e}"));
            return;
        }
    };
    let expect = ctx.oracle().opened(s);
    ctx.event(&format!("final: opened (epoch {}, {})", vol.stats().epoch, host.label()));
    check_log_recovery(ctx, s, &vol, expect, predecessor_log);
    let size = vol.size();
    let size_floor = ctx.oracle().size_floor;
    if size < size_floor {
        ctx.oracle().violation("size-shrank", format!("final: size {size}, but {size_floor} was acknowledged"));
        return;
    }
    let mut image = Vec::new();
    let mut off = 0;
    while off < size {
        let len = CS.min(size - off);
        match vol.read(off, len).await {
            Ok(d) => {
                ctx.oracle().writer_read(s, off, &d);
                image.extend_from_slice(&d);
            }
            Err(e) => {
                ctx.oracle().violation("read-at-quiescence", format!("final read {off}+{len}: {e}"));
                return;
            }
        }
        off += len;
    }
    if ctx.oracle().failed() {
        return;
    }
    if let Err(e) = vol.flush().await {
        ctx.oracle().violation("flush-at-quiescence", format!("{e}"));
        return;
    }
    drop(vol);
    if let Ok(st) = s3blk::volume::replay::replay(store.as_ref(), VOL, ctx.cfg.chunk_size, None).await {
        let packed =
            st.map.values().filter(|r| matches!(r, format::ChunkRef::Stored { layout: format::Layout::Packed(_), .. }));
        ctx.oracle().counts.packed_chunks = packed.count() as u64;
    }
    // Its writes all committed, its log goes as it closes; the logs of the
    // writers it superseded went as it opened.
    if let Some(root) = ctx.log_root(host) {
        wait_log_released(ctx, s).await;
        let left = log_dirs(&root);
        if !left.is_empty() {
            let why =
                format!("{} write-back logs left on {} after the last writer closed clean", left.len(), host.label());
            ctx.oracle().violation("log-left-behind", why);
            return;
        }
    }
    ctx.event("final: takeover read everything; compacting twice");
    for _ in 0..2 {
        sleep(ctx.cfg.safety_age + Duration::from_secs(30)).await;
        let opts = CompactOptions { safety_age: ctx.cfg.safety_age, ..CompactOptions::default() };
        match compact::compact(&store, VOL, &opts, clock.as_ref()).await {
            Ok(rep) => ctx.event(&format!(
                "final: compacted (head {}, folded {:?}, chunks deleted {})",
                rep.head_seq, rep.folded_seq, rep.chunks_deleted
            )),
            Err(e) => {
                ctx.oracle().violation("compact-at-quiescence", format!("{e}"));
                return;
            }
        }
    }
    match fsck::fsck(store.as_ref(), VOL, true, &|_, _| {}).await {
        Ok(rep) if rep.clean => {}
        Ok(rep) => {
            ctx.oracle().violation("fsck", rep.errors.join("; "));
            return;
        }
        Err(e) => {
            ctx.oracle().violation("fsck", format!("did not run: {e}"));
            return;
        }
    }
    let ro = match Volume::open(store.clone(), VOL, ctx.cfg.open_options(clock.clone(), true, None)).await {
        Ok(v) => v,
        Err(e) => {
            ctx.oracle().violation("open-at-quiescence", format!("read-only open after compaction: {e}"));
            return;
        }
    };
    match ro.read(0, size).await {
        Ok(d) if d == image => {}
        Ok(d) => {
            let b = d.iter().zip(&image).position(|(a, b)| a != b).unwrap_or(0) as u64 / BLOCK;
            ctx.oracle().violation("compaction-changed-data", format!("block {b} differs after compaction"));
            return;
        }
        Err(e) => {
            ctx.oracle().violation("read-at-quiescence", format!("after compaction: {e}"));
            return;
        }
    }
    let snaps: Vec<String> = {
        let o = ctx.oracle();
        o.snapshots.keys().filter(|n| !o.deleted_snapshots.contains(*n)).cloned().collect()
    };
    for snap in snaps {
        let opts = ctx.cfg.open_options(clock.clone(), true, Some(snap.clone()));
        match Volume::open(store.clone(), VOL, opts).await {
            Ok(v) => check_snapshot(ctx, "final", &v, &snap).await,
            Err(e) => ctx.oracle().violation("snapshot-lost", format!("snapshot {snap}: {e}")),
        }
    }
}

/// After the volume's own final checks: every live clone reads what its
/// snapshot and its acknowledged writes say, before and after compacting
/// it, and `fsck` finds it clean; no deleted clone opens, and its objects,
/// pin and marker are gone once reaped. Then the volume is deleted while
/// clones read through it: it is hidden, the clones still read the same;
/// deleting the clones and the snapshots leaves nothing under the store.
async fn final_clones(ctx: &Ctx) {
    let mut rng = rng_for(ctx.seed, "final-clones");
    let (_h, store) = ctx.store("final-clones", FaultPlan::calm(), &mut rng);
    let clock: Arc<dyn Clock> = Arc::new(SimClock::new(ctx.world.clone(), 0));
    let clones: Vec<(usize, String, bool, bool)> = {
        let o = ctx.oracle();
        o.clones.iter().enumerate().map(|(c, k)| (c, k.prefix.clone(), k.created, k.deleting.is_some())).collect()
    };
    let mut images = Vec::new();
    for &(c, ref prefix, created, deleting) in &clones {
        if deleting || !created {
            // Finish a delete that gave up, or let go of a restore that never
            // finished, as a retried DeleteVolume does: the delete lets go of
            // the source by what the restore left under the clone's prefix
            // (the checker does not: the leftovers below must be gone).
            let r = catalog::delete_volume(&store, prefix, catalog::OnDependants::RefuseClones, clock.as_ref()).await;
            let r = match r {
                Ok(_) => Ok(()),
                // What its writer, readers and compactors still sent while
                // the delete ran (or in flight when it returned) may land
                // after the delete's last listing: a prefix of such
                // leftovers alone is no volume, and the catalog leaves it
                // be (design invariant 5).
                Err(catalog::CatalogError::NotAVolume { .. }) if late_writes_only(ctx, c, prefix) => {
                    ctx.event(&format!("final: {prefix}: objects written after its delete are left"));
                    catalog::release_source(&store, VOL, prefix).await.map(|_| ())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                ctx.oracle().violation("delete-at-quiescence", format!("{prefix}: {e}"));
                return;
            }
            if !late_writes_only(ctx, c, prefix)
                && let Some(left) = leftovers(ctx, c, prefix)
            {
                ctx.oracle().violation("delete-left-objects", left);
                return;
            }
            continue;
        }
        let Some(image) = read_clone(ctx, &store, &clock, c, "final").await else { return };
        match fsck::fsck(store.as_ref(), prefix, true, &|_, _| {}).await {
            Ok(rep) if rep.clean => {}
            Ok(rep) => return ctx.oracle().violation("fsck", format!("{prefix}: {}", rep.errors.join("; "))),
            Err(e) => return ctx.oracle().violation("fsck", format!("{prefix}: did not run: {e}")),
        }
        let opts = CompactOptions { safety_age: ctx.cfg.safety_age, ..CompactOptions::default() };
        if let Err(e) = compact::compact(&store, prefix, &opts, clock.as_ref()).await {
            return ctx.oracle().violation("compact-at-quiescence", format!("{prefix}: {e}"));
        }
        let Some(again) = read_clone(ctx, &store, &clock, c, "final").await else { return };
        if again != image {
            return ctx.oracle().violation("compaction-changed-data", format!("{prefix} differs after compaction"));
        }
        images.push((c, prefix.clone(), image));
    }
    // Delete the volume while clones read through it (a flattened clone
    // reads through it no more: it goes whole once no other one does).
    let mut reading = 0;
    for (_, prefix, _) in &images {
        match s3blk::volume::replay::read_meta(store.as_ref(), prefix).await {
            Ok(m) if m.parent.is_none() && m.flattened.is_some() => {}
            Ok(_) => reading += 1,
            Err(e) => return ctx.oracle().violation("clone-meta", format!("{prefix}: {e}")),
        }
    }
    let expect_kept = reading > 0 || !ctx.world.keys(&format::snapshot_prefix(VOL)).is_empty();
    match catalog::delete_volume(&store, VOL, catalog::OnDependants::Keep, clock.as_ref()).await {
        Ok(catalog::DeleteOutcome::Kept) if expect_kept => {}
        Ok(catalog::DeleteOutcome::Deleted { .. }) if !expect_kept => {}
        other => {
            let why = format!("{VOL} with {} live clones ({reading} not flattened): {other:?}", images.len());
            return ctx.oracle().violation("parent-delete", why);
        }
    }
    ctx.event("final: volume deleted");
    if expect_kept && !matches!(catalog::is_deleted(&store, VOL).await, Ok(true)) {
        return ctx.oracle().violation("parent-delete", "kept but not marked deleted".into());
    }
    for (c, prefix, image) in images {
        let Some(after) = read_clone(ctx, &store, &clock, c, "after-parent-delete").await else { return };
        if after != image {
            return ctx.oracle().violation("parent-delete", format!("{prefix} reads differently"));
        }
        match catalog::delete_volume(&store, &prefix, catalog::OnDependants::RefuseClones, clock.as_ref()).await {
            Ok(catalog::DeleteOutcome::Deleted { .. }) => {}
            other => return ctx.oracle().violation("clone-delete", format!("{prefix}: {other:?}")),
        }
        match Volume::open(store.clone(), &prefix, ctx.cfg.open_options(clock.clone(), true, None)).await {
            Err(VolumeError::NotFound(_)) => {}
            Ok(_) => return ctx.oracle().violation("deleted-volume-opens", format!("{prefix} after its delete")),
            Err(e) => return ctx.oracle().violation("deleted-volume-opens", format!("{prefix}: {e}")),
        }
    }
    // The last snapshots go (as DeleteSnapshot does) and take the volume with them.
    for key in ctx.world.keys(&format::snapshot_prefix(VOL)) {
        if let Err(e) = store.delete(&key).await {
            return ctx.oracle().violation("delete-at-quiescence", format!("{key}: {e}"));
        }
    }
    if let Err(e) = catalog::reap(&store, VOL, None).await {
        return ctx.oracle().violation("delete-at-quiescence", format!("reap {VOL}: {e}"));
    }
    let late: Vec<String> = clones.iter().filter(|k| late_writes_only(ctx, k.0, &k.1)).map(|k| k.1.clone()).collect();
    let left: Vec<String> =
        ctx.world.keys("sim/").into_iter().filter(|k| !late.iter().any(|p| k.starts_with(p.as_str()))).collect();
    if !left.is_empty() {
        let why = format!("{} objects left after deleting everything: {:?}", left.len(), &left[..left.len().min(5)]);
        ctx.oracle().violation("delete-left-objects", why);
    }
}

/// Does all that is left under clone `c`'s prefix stem from writes that
/// landed after its delete began?
fn late_writes_only(ctx: &Ctx, c: usize, prefix: &str) -> bool {
    let since = ctx.oracle().clones[c].deleting_unix;
    let keys = ctx.world.keys(prefix);
    !keys.is_empty() && keys.iter().all(|k| ctx.world.modified_unix(k).is_some_and(|t| t >= since))
}

/// Objects left under clone `c`'s prefix, and the parent's pin and marker
/// of it. A pin or marker that landed after the clone's delete began is
/// left aside, as objects under the prefix are (`late_writes_only`): a
/// request of its restore that hung and landed after the delete let go of
/// the parent (seed 226214961778075: the pin's first PUT applied 70 s late).
fn leftovers(ctx: &Ctx, c: usize, prefix: &str) -> Option<String> {
    let since = ctx.oracle().clones[c].deleting_unix;
    let mut left = ctx.world.keys(prefix);
    for key in [format::clone_marker_key(VOL, prefix), format::snapshot_key(VOL, &format::clone_pin_name(prefix))] {
        let late = ctx.world.modified_unix(&key).is_some_and(|t| t >= since);
        left.extend(ctx.world.keys(&key).into_iter().filter(|k| *k == key && !late));
    }
    (!left.is_empty())
        .then(|| format!("{} objects left after deleting {prefix}: {:?}", left.len(), &left[..left.len().min(5)]))
}

/// Open clone `c` read-only and read it all, checked against its floor.
async fn read_clone(ctx: &Ctx, store: &DynStore, clock: &Arc<dyn Clock>, c: usize, who: &str) -> Option<Vec<u8>> {
    let (prefix, mut lower) = {
        let o = ctx.oracle();
        (o.clones[c].prefix.clone(), o.clones[c].floor.clone())
    };
    let vol = match Volume::open(store.clone(), &prefix, ctx.cfg.open_options(clock.clone(), true, None)).await {
        Ok(v) => v,
        Err(e) => {
            ctx.oracle().violation("open-at-quiescence", format!("{who}: {prefix}: {e}"));
            return None;
        }
    };
    match vol.read(0, vol.size()).await {
        Ok(d) => {
            ctx.oracle().clone_read(c, &format!("{who} {prefix}"), &mut lower, 0, &d);
            (!ctx.oracle().failed()).then_some(d)
        }
        Err(e) => {
            ctx.oracle().violation("read-at-quiescence", format!("{who}: {prefix}: {e}"));
            None
        }
    }
}

// ---------------------------------------------------------------- running seeds

#[derive(Debug, Clone)]
struct Outcome {
    seed: u64,
    violation: Option<Violation>,
    trace: (u64, u64),
    sim_time: Duration,
    counts: Counts,
    events: Vec<(u64, String)>,
    summary: String,
    wall: Duration,
}

async fn simulate(seed: u64, verbose: bool) -> Outcome {
    let world = SimWorld::new(seed, verbose);
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = Config::draw(&mut rng).draw_chunks(seed).draw_hot(seed).draw_encryption(seed).draw_compression(seed);
    let summary = format!(
        "{:?} chaos, {}..{} chunks, dirty {} chunks, {} min, safety age {}s, takeovers {:?}, compactor skews {:?}, up to {} clones, writers on {:?} then {}, log limit {}, {} KiB chunks, tables {:?}, hot {:?}, encrypted {}, compression {:?}",
        cfg.chaos,
        cfg.initial_chunks,
        cfg.max_chunks,
        cfg.dirty_chunks,
        cfg.run_for.as_secs() / 60,
        cfg.safety_age.as_secs(),
        cfg.takeovers
            .iter()
            .map(|(t, crash)| format!("{}s{}", t.as_secs(), if *crash { " crash" } else { "" }))
            .collect::<Vec<_>>(),
        cfg.compactor_skews,
        cfg.max_clones,
        cfg.hosts.iter().map(|h| h.label()).collect::<Vec<_>>(),
        cfg.final_host.label(),
        cfg.log_limit,
        cfg.chunk_size >> 10,
        cfg.tables,
        cfg.hot,
        cfg.encrypted,
        cfg.compression
    );
    world.trace(&format!("seed {seed}: {summary}"));
    let oracle = Oracle::new(world.clone(), cfg.max_blocks(), cfg.initial_chunks * CS);
    let disks = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot make the hosts' directory: {e}"),
    };
    let cfg_encrypted = cfg.encrypted;
    let ctx: Ctx = Arc::new(Sim {
        disks,
        seed,
        world: world.clone(),
        cfg,
        oracle: Mutex::new(oracle),
        handles: Mutex::new(Vec::new()),
        tasks: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        snapshot_names: AtomicU64::new(1),
        stormed: AtomicBool::new(false),
        commit_outage_armed: AtomicBool::new(false),
        keys: cfg_encrypted.then(|| NewKeys::fresh(Kek::parse("5e".repeat(32).as_bytes()).expect("a key"))),
        sealed: Arc::new(Mutex::new(Vec::new())),
    });
    let mut crng = rng_for(seed, "creator");
    if create(&ctx, &mut crng).await {
        ctx.spawn(writers(ctx.clone()));
        ctx.spawn(readers(ctx.clone()));
        if ctx.cfg.hot.is_some() {
            ctx.spawn(auditor(ctx.clone()));
        }
        ctx.spawn(cloner(ctx.clone()));
        if let Some(at) = ctx.cfg.broken_snapshot_at {
            ctx.spawn(break_snapshot(ctx.clone(), at));
        }
        for (n, skew) in ctx.cfg.compactor_skews.clone().into_iter().enumerate() {
            ctx.spawn(compactor(ctx.clone(), n + 1, skew));
        }
        while ctx.world.elapsed() < ctx.cfg.run_for && !ctx.oracle().failed() {
            sleep(Duration::from_secs(1)).await;
        }
    }
    // Stop: every actor dies where it stands; what it had in flight lands or not.
    ctx.stop.store(true, Ordering::SeqCst);
    for t in lock(&ctx.tasks).drain(..) {
        t.abort();
    }
    for h in lock(&ctx.handles).iter() {
        if !h.is_crashed() {
            h.crash();
        }
    }
    {
        let mut o = ctx.oracle();
        let t = o.next_tick();
        for s in &mut o.sessions {
            s.crashed.get_or_insert(t);
        }
    }
    if !ctx.oracle().failed() {
        sleep(Duration::from_secs(3600)).await;
        final_checks(&ctx).await;
        if !ctx.oracle().failed() {
            final_clones(&ctx).await;
        }
    }
    let o = ctx.oracle();
    Outcome {
        seed,
        violation: o.violations.first().cloned(),
        trace: world.trace_hash(),
        sim_time: world.elapsed(),
        counts: o.counts,
        events: world.events(),
        summary,
        wall: Duration::ZERO,
    }
}

thread_local! {
    static PANICS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Count panics per thread, so a panic inside an engine task (which tokio
/// would swallow) fails the seed.
fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

fn run_seed(seed: u64, verbose: bool) -> Outcome {
    let started = std::time::Instant::now();
    let mut out = run_seed_inner(seed, verbose);
    out.wall = started.elapsed();
    out
}

fn run_seed_inner(seed: u64, verbose: bool) -> Outcome {
    count_panics();
    let before = PANICS.with(|p| p.get());
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a runtime: {e}"),
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(simulate(seed, verbose))));
    drop(rt);
    let panicked = PANICS.with(|p| p.get()) > before;
    match r {
        Ok(mut out) => {
            if panicked && out.violation.is_none() {
                out.violation = Some(Violation {
                    invariant: "panic",
                    detail: "a task panicked (see stderr)".into(),
                    at: out.sim_time,
                });
            }
            out
        }
        Err(_) => Outcome {
            seed,
            violation: Some(Violation {
                invariant: "panic",
                detail: "the simulation panicked".into(),
                at: Duration::ZERO,
            }),
            trace: (0, 0),
            sim_time: Duration::ZERO,
            counts: Counts::default(),
            events: Vec::new(),
            summary: String::new(),
            wall: Duration::ZERO,
        },
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Lines worth reading in a failure report: what actors did and saw, the
/// journal, checkpoint and snapshot objects written and deleted, and the
/// store calls that went wrong (not every call that went right).
fn story_line(line: &str) -> bool {
    let text = line.trim_start().split_once(' ').map_or("", |(_, t)| t);
    let actor_said = text.split_once(' ').is_some_and(|(who, _)| who.ends_with(':'));
    let mutation = [" Put ", " PutIfAbsent ", " Delete "].iter().any(|m| text.contains(m))
        && ["journal/", "checkpoints/", "snapshots/"].iter().any(|m| text.contains(m));
    let fault =
        ["answer lost", "never answer", "outage", "abandoned", "412", "not found"].iter().any(|m| text.contains(m));
    actor_said || text.starts_with("VIOLATION") || mutation || fault
}

fn report(out: &Outcome, lines: usize) -> String {
    let Some(v) = &out.violation else { return format!("seed {}: ok", out.seed) };
    let end = out.events.iter().position(|(_, l)| l.contains("VIOLATION")).map_or(out.events.len(), |i| i + 1);
    let story: Vec<&str> = out.events[..end].iter().map(|(_, l)| l.as_str()).filter(|l| story_line(l)).collect();
    let tail = &story[story.len().saturating_sub(lines)..];
    format!(
        "seed {seed} FAILED at {:.3}s: {}: {}\n  config: {}\n  replay: {hot}S3BLK_SIM_SEED={seed} cargo test --test simulation -- simulation --nocapture\n  story (last {} lines; the replay prints every event):\n    {}",
        v.at.as_secs_f64(),
        v.invariant,
        v.detail,
        out.summary,
        tail.len(),
        tail.join("\n    "),
        seed = out.seed,
        hot = if std::env::var("S3BLK_SIM_HOT").is_ok_and(|v| v == "1") { "S3BLK_SIM_HOT=1 " } else { "" }
    )
}

/// Run seeds on a few threads until the list or the time runs out.
fn run_many(seeds: Vec<u64>, deadline: Option<std::time::Instant>, progress: bool) -> Vec<Outcome> {
    let threads = env_u64("S3BLK_SIM_THREADS").unwrap_or(2).max(1) as usize;
    let stop_at_first = env_u64("S3BLK_SIM_STOP").is_some_and(|v| v != 0);
    let queue = Arc::new(Mutex::new(seeds.into_iter()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (queue, results, failed) = (queue.clone(), results.clone(), failed.clone());
            std::thread::spawn(move || {
                loop {
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                        return;
                    }
                    // Seeds are taken in order: when one fails, every lower
                    // seed has been taken and finishes.
                    if stop_at_first && failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some(seed) = lock(&queue).next() else { return };
                    let out = run_seed(seed, false);
                    if out.violation.is_some() {
                        failed.store(true, Ordering::SeqCst);
                        println!("{}", report(&out, 30));
                    }
                    let mut results = lock(&results);
                    results.push(out);
                    if progress && results.len() % 200 == 0 {
                        let failed = results.iter().filter(|o| o.violation.is_some()).count();
                        println!("... {} seeds, {failed} failed", results.len());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            panic!("a simulation thread panicked");
        }
    }
    let mut v = std::mem::take(&mut *lock(&results));
    v.sort_by_key(|o| o.seed);
    v
}

#[test]
fn simulation() {
    // Every checkpoint of more than two mapped chunks is split into parts,
    // so that the parts' writes, reads and deletions meet every race.
    format::set_checkpoint_part_entries(2);
    if let Some(seed) = env_u64("S3BLK_SIM_SEED") {
        let out = run_seed(seed, true);
        println!(
            "trace hash {:016x} ({} events), {:?} simulated, {:?}",
            out.trace.0, out.trace.1, out.sim_time, out.counts
        );
        assert!(out.violation.is_none(), "{}", report(&out, 40));
        return;
    }
    let started = std::time::Instant::now();
    let first = env_u64("S3BLK_SIM_FIRST");
    let (seeds, deadline): (Vec<u64>, _) = match (env_u64("S3BLK_SIM_SEEDS"), env_u64("S3BLK_SIM_SECONDS")) {
        (None, None) => {
            let base = first.unwrap_or(0);
            let mut seeds: Vec<u64> = (base..base + CI_SEEDS).collect();
            let random: Vec<u64> = (0..CI_RANDOM_SEEDS).map(|_| rand::random::<u64>() >> 1).collect();
            println!("random seeds this run: {random:?}");
            seeds.extend(random);
            (seeds, None)
        }
        (n, secs) => {
            let base = first.unwrap_or_else(|| rand::random::<u64>() >> 16);
            // Bounded by the deadline alone: more seeds than any run gets through.
            let n = n.unwrap_or(1 << 20);
            println!("seeds from {base}");
            ((base..base.saturating_add(n)).collect(), secs.map(|s| started + Duration::from_secs(s)))
        }
    };
    let long = env_u64("S3BLK_SIM_SEEDS").is_some() || env_u64("S3BLK_SIM_SECONDS").is_some();
    let outcomes = run_many(seeds, deadline, long);
    let mut total = Counts::default();
    let mut sim_time = Duration::ZERO;
    for o in &outcomes {
        let c = &o.counts;
        total.writes_acked += c.writes_acked;
        total.flushes_acked += c.flushes_acked;
        total.flushes_cancelled += c.flushes_cancelled;
        total.snapshots += c.snapshots;
        total.sessions += c.sessions;
        total.readers += c.readers;
        total.compactions += c.compactions;
        total.compactions_crashed += c.compactions_crashed;
        total.snapshots_deleted += c.snapshots_deleted;
        total.clones += c.clones;
        total.clones_deleted += c.clones_deleted;
        total.flattens += c.flattens;
        total.bursts += c.bursts;
        total.storms += c.storms;
        total.unreadable_snapshots_reported += c.unreadable_snapshots_reported;
        total.compactions_killed_deleting += c.compactions_killed_deleting;
        total.log_restarts += c.log_restarts;
        total.log_replays += c.log_replays;
        total.log_entries_replayed += c.log_entries_replayed;
        total.logs_discarded += c.logs_discarded;
        total.versions_dead += c.versions_dead;
        total.packed_chunks += c.packed_chunks;
        sim_time += o.sim_time;
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.violation.is_some()).collect();
    let passed: Vec<Duration> = outcomes.iter().filter(|o| o.violation.is_none()).map(|o| o.wall).collect();
    let mean_pass = passed.iter().sum::<Duration>().checked_div(passed.len() as u32).unwrap_or_default();
    println!(
        "{} seeds in {:.1}s ({:.1} simulated hours; a passing seed takes {:.2}s): {} failed; {total:?}",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        sim_time.as_secs_f64() / 3600.0,
        mean_pass.as_secs_f64(),
        failed.len()
    );
    for o in &failed {
        if let Some(v) = &o.violation {
            println!("  seed {}: {} at {:.1}s: {}", o.seed, v.invariant, v.at.as_secs_f64(), v.detail);
        }
    }
    assert!(failed.is_empty(), "{} of {} seeds broke an invariant (listed above)", failed.len(), outcomes.len());
    assert!(
        outcomes.len() < 100 || total.log_replays > 0,
        "no writer replayed a crashed predecessor's write-back log: the run did not test it"
    );
}

/// The same seed gives the same run, also on another thread (where the
/// engine's hash maps iterate in another order, and tokio's unbiased
/// `select!` picks among ready branches at random: seeds 43 and
/// 6618327667788810696 ran differently twice until the engine's selects
/// were biased).
#[test]
fn same_seed_same_run() {
    let mut seeds = vec![3u64, 43, 6618327667788810696, rand::random::<u64>() >> 1];
    if let Some(n) = env_u64("S3BLK_SIM_DETERMINISM_SEEDS") {
        seeds.extend(0..n);
    }
    for seed in seeds {
        let a = std::thread::spawn(move || run_seed(seed, false));
        let b = std::thread::spawn(move || run_seed(seed, false));
        let (Ok(a), Ok(b)) = (a.join(), b.join()) else { panic!("a simulation thread panicked") };
        assert!(seed != 3 || a.trace.1 > 1000, "seed {seed}: only {} events", a.trace.1);
        if a.trace != b.trace {
            let i = a.events.iter().zip(&b.events).position(|(x, y)| x.0 != y.0).unwrap_or(0);
            let around = |o: &Outcome| {
                o.events[i.saturating_sub(5)..(i + 3).min(o.events.len())]
                    .iter()
                    .map(|(_, l)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    ")
            };
            panic!(
                "seed {seed} ran differently twice ({} vs {} events); event {i} differs:\n  first run:\n    {}\n  second run:\n    {}",
                a.trace.1,
                b.trace.1,
                around(&a),
                around(&b)
            );
        }
    }
}
