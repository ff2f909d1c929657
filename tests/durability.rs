//! One test per way the engine could lose acknowledged data or let a fenced
//! writer commit (each failed before its fix). The stores are real (memory,
//! local directory) behind the fault-injecting wrapper; where a scenario
//! needs an answer S3 can give but the fault wrapper cannot (a PUT that
//! lands after its client gave up), a small wrapper in this file scripts it.

mod common;

use common::FaultRig;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use s3blk::clock::{Clock, ManualClock, SystemClock};
use s3blk::store::fault::{Fault, Op};
use s3blk::store::memory::MemoryStore;
use s3blk::store::retry::RetryStore;
use s3blk::store::{DynStore, PutMode, StoreError, StoreResult};
use s3blk::volume::compact::{self, CompactOptions};
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::format::{self, ChunkRef};
use s3blk::volume::{OpenOptions, Volume, VolumeError, fsck, replay};

const CS: u32 = 64 << 10;
const CSU: u64 = CS as u64;

async fn create(store: &DynStore, vol: &str, size: u64) {
    let opts = CreateOptions::new(size, CS);
    Volume::create(store.clone(), vol, opts, &SystemClock).await.expect("create");
}

async fn open_with(store: &DynStore, vol: &str, opts: OpenOptions) -> Volume {
    Volume::open(store.clone(), vol, opts).await.expect("open")
}

async fn open(store: &DynStore, vol: &str) -> Volume {
    open_with(store, vol, OpenOptions::default()).await
}

async fn read_fresh(store: &DynStore, vol: &str, offset: u64, len: u64) -> Vec<u8> {
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    open_with(store, vol, ro).await.read(offset, len).await.expect("fresh read")
}

async fn assert_fsck_clean(store: &DynStore, vol: &str) {
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck ran");
    assert!(rep.clean, "fsck found damage: {:?}", rep.errors);
}

/// Compaction that treats everything as old (safety age zero on the
/// store's clock): the most it may ever delete.
fn eager() -> CompactOptions {
    CompactOptions { safety_age: Duration::ZERO, ..CompactOptions::default() }
}

fn journal_key(seq: u64) -> String {
    format::journal_key("v/", seq)
}

// 1 ---------------------------------------------------------------------------

/// A flush cancelled while a chunk's upload hangs: the chunk keeps its
/// bytes (reads, the next flush and a fresh opener all see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_upload_never_zeroes_its_chunk() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    // Whole chunks only: a one-byte change would otherwise go inline.
    let v = open_with(&rig.faulty(), "v/", OpenOptions { patch_limit: 0, ..OpenOptions::default() }).await;
    let mut expect = common::pattern(1, CS as usize);
    v.write(0, &expect).await.expect("write");
    v.flush().await.expect("flush");
    v.write(5, &[0xEE]).await.expect("write one byte");
    expect[5] = 0xEE;
    rig.rule(Some(Op::Put), "chunks/", Fault::Hang, 1);
    let r = tokio::time::timeout(Duration::from_millis(100), v.flush()).await;
    assert!(r.is_err(), "the flush should still be waiting for the hung upload");
    rig.fault.clear_rules();
    assert_eq!(v.read(0, CSU).await.expect("read"), expect, "the cancelled upload lost the chunk's bytes");
    v.flush().await.expect("flush after the cancellation");
    drop(v);
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, CSU).await, expect);
    assert_fsck_clean(&rig.plain(), "v/").await;
}

// 2 ---------------------------------------------------------------------------

/// Writer A commits, B takes over and commits more, and a compaction that
/// dies part-way (killed while one journal delete hangs) leaves the journal
/// however it leaves it. A's next flush must be fenced, and nobody may ever
/// see A's post-takeover data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writer_cannot_commit_after_a_partial_compaction() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    let a = open(&rig.plain(), "v/").await; // open record 1
    a.write(0, b"A-before").await.expect("a write");
    a.flush().await.expect("a flush"); // record 2
    let b = open(&rig.plain(), "v/").await; // open record 3
    for i in 0..2u64 {
        b.write(CSU + i, b"B").await.expect("b write");
        b.flush().await.expect("b flush"); // records 4, 5
    }
    // The delete of record 2 hangs, and the compaction is killed there.
    rig.rule(Some(Op::Delete), &journal_key(2), Fault::Hang, 1);
    let (faulty, opts) = (rig.faulty(), eager());
    let killed = tokio::time::timeout(Duration::from_secs(2), compact::compact(&faulty, "v/", &opts, &SystemClock));
    assert!(killed.await.is_err(), "the compaction should hang at the delete of record 2");
    rig.fault.clear_rules();
    a.write(0, b"A-stale!").await.expect("a buffers the write");
    match a.flush().await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("the stale writer's flush must be fenced, got {other:?}"),
    }
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, 8).await, b"A-before");
    drop((a, b));
    assert_fsck_clean(&rig.plain(), "v/").await;
}

/// The first commit into a folded part of the journal loses its answer; the
/// retry that finds it there must still run the fencing proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_commit_into_a_folded_journal_is_still_fenced() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    // The fold below treats every record as old: so is A's last record.
    let clock = Arc::new(ManualClock::new(1_700_000_000));
    let a = open_with(&rig.faulty(), "v/", OpenOptions { clock: clock.clone(), ..OpenOptions::default() }).await; // 1
    a.write(0, b"A-before").await.expect("a write");
    a.flush().await.expect("a flush"); // 2
    clock.advance(compact::MIN_LIVE_SAFETY_AGE.as_secs() as i64);
    let b = open(&rig.plain(), "v/").await; // 3
    for i in 0..3u64 {
        b.write(CSU + i, b"B").await.expect("b write");
        b.flush().await.expect("b flush"); // 4, 5, 6
    }
    let rep = compact::compact(&rig.plain(), "v/", &eager(), &SystemClock).await.expect("compact");
    assert_eq!(rep.folded_seq, Some(6), "everything is old: the fold reaches the head");
    // A's next record goes to seq 3, which compaction deleted; its answer is lost.
    a.write(0, b"A-stale!").await.expect("a write");
    rig.rule(Some(Op::Put), "journal/", Fault::LostResponse, 1);
    assert!(a.flush().await.is_err(), "the lost answer surfaces (no retry layer)");
    match a.flush().await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("resolving the ambiguous commit must fence the stale writer, got {other:?}"),
    }
    a.write(2 * CSU, b"more").await.ok();
    assert!(matches!(a.flush().await, Err(VolumeError::Fenced(_))));
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, 8).await, b"A-before");
    drop((a, b));
    // The stale record is garbage below the checkpoint; the next pass removes it.
    compact::compact(&rig.plain(), "v/", &eager(), &SystemClock).await.expect("compact again");
    assert_fsck_clean(&rig.plain(), "v/").await;
}

// 3 ---------------------------------------------------------------------------

/// A compactor whose clock runs an hour fast must not collect the chunks of
/// a commit that is still on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_compactor_clock_never_collects_a_pending_commits_chunks() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    let v = open(&rig.faulty(), "v/").await;
    let data = common::pattern(3, 2 * CS as usize);
    v.write(0, &data).await.expect("write");
    // The journal PUT hangs: the flush is given up on, its chunks staged.
    rig.rule(Some(Op::Put), "journal/", Fault::Hang, 1);
    assert!(tokio::time::timeout(Duration::from_millis(200), v.flush()).await.is_err());
    rig.fault.clear_rules();
    let skewed = ManualClock::new(Clock::now_unix(&SystemClock) + 3600);
    let rep = compact::compact(&rig.plain(), "v/", &CompactOptions::default(), &skewed).await.expect("compact");
    assert_eq!(rep.chunks_deleted, 0, "fresh staged chunks were collected: {rep:?}");
    v.flush().await.expect("the commit lands");
    drop(v);
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, 2 * CSU).await, data);
    assert_fsck_clean(&rig.plain(), "v/").await;
}

/// A journal PUT that cannot land is given up on within the commit deadline
/// (not after the retry layer's minutes), and its chunks are uploaded again
/// under fresh names before the next commit refers to them.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_commit_that_cannot_land_in_time_is_abandoned_and_its_chunks_restaged() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    let retrying: DynStore = Arc::new(RetryStore::new(rig.faulty(), Default::default()));
    let opts = OpenOptions { commit_deadline: Duration::from_secs(60), ..OpenOptions::default() };
    let v = open_with(&retrying, "v/", opts).await;
    let data = common::pattern(4, CS as usize);
    v.write(0, &data).await.expect("write");
    rig.rule(Some(Op::Put), "journal/", Fault::Hang, 1000);
    let started = tokio::time::Instant::now();
    let err = v.flush().await.expect_err("the commit cannot land");
    let took = started.elapsed();
    assert!(took <= Duration::from_secs(61), "gave up after {took:?}, past the 60 s deadline");
    assert!(err.to_string().contains("did not land"), "unclear error: {err}");
    rig.fault.clear_rules();
    let before: Vec<String> = keys(&rig.plain(), "v/chunks/").await;
    assert_eq!(before.len(), 2, "the chunk was uploaded once more after the abandon: {before:?}");
    v.flush().await.expect("the next flush commits");
    let st = replay::replay(rig.mem.as_ref(), "v/", CSU, None).await.expect("replay");
    let Some(ChunkRef::Stored { generation, .. }) = st.map.get(&0) else { panic!("chunk 0 not mapped") };
    let newest = before.iter().filter_map(|k| format::parse_chunk_key("v/", k)).map(|(_, g)| g).max();
    assert_eq!(Some(*generation), newest, "the commit must refer to the fresh upload");
    drop(v);
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, CSU).await, data);
}

async fn keys(store: &DynStore, prefix: &str) -> Vec<String> {
    s3blk::store::list_all(store.as_ref(), prefix).await.expect("list").into_iter().map(|o| o.key).collect()
}

// 4 ---------------------------------------------------------------------------

/// An uploaded chunk whose commit failed, and whose object then vanished:
/// a partial write over it must merge with its bytes, never with the older
/// committed generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_staged_chunk_never_reverts_completed_writes() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    let opts = OpenOptions { cache_limit: 0, restage_after: Duration::ZERO, ..OpenOptions::default() };
    let v = open_with(&rig.faulty(), "v/", opts).await;
    v.write(0, &common::pattern(1, CS as usize)).await.expect("write A");
    v.flush().await.expect("flush A");
    let mut expect = common::pattern(2, CS as usize);
    v.write(0, &expect).await.expect("write B");
    rig.rule(Some(Op::Put), "journal/", Fault::ServerError, 1);
    assert!(v.flush().await.is_err(), "the commit of B fails; B stays staged");
    // An over-eager collector removes B's object.
    let committed = replay::replay(rig.mem.as_ref(), "v/", CSU, None).await.expect("replay");
    for k in keys(&rig.plain(), "v/chunks/").await {
        let g = format::parse_chunk_key("v/", &k).map(|(_, g)| g);
        if !matches!(committed.map.get(&0), Some(ChunkRef::Stored { generation, .. }) if Some(*generation) == g) {
            rig.plain().delete(&k).await.expect("delete");
        }
    }
    v.write(8192, &[7u8; 4096]).await.expect("page write over B");
    expect[8192..12288].fill(7);
    v.flush().await.expect("flush");
    assert_eq!(v.read(0, CSU).await.expect("read"), expect);
    drop(v);
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, CSU).await, expect, "bytes of B reverted");
    assert_fsck_clean(&rig.plain(), "v/").await;
}

// 5 ---------------------------------------------------------------------------

/// The commit landed, but the fencing proof's read failed: the next flush
/// must recognise the record as ours, not fence the only writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_proof_after_a_landed_commit_does_not_self_fence() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    let clock = Arc::new(ManualClock::new(1_700_000_000));
    let opts = OpenOptions { clock: clock.clone(), ..OpenOptions::default() };
    let v = open_with(&rig.faulty(), "v/", opts).await; // open record 1; next commit is 2
    v.write(0, b"first").await.expect("write");
    // Long after the open record: the proof reads it.
    clock.advance(compact::MIN_LIVE_SAFETY_AGE.as_secs() as i64);
    rig.rule(None, &journal_key(1), Fault::ServerError, 1);
    assert!(v.flush().await.is_err(), "the proof's read fails (no retry layer)");
    v.write(CSU, b"second").await.expect("write 2");
    v.flush().await.expect("the writer must not fence itself");
    drop(v);
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, 5).await, b"first");
    assert_eq!(read_fresh(&rig.plain(), "v/", CSU, 6).await, b"second");
    assert_fsck_clean(&rig.plain(), "v/").await;
}

/// A store where the first journal PUT fails at the client but lands on
/// the server later: right after the next GET of that key has answered
/// (the worst moment for a writer that resolves by reading first).
#[derive(Debug)]
struct LateLanding {
    armed: Mutex<bool>,
    late: Mutex<Option<(String, Bytes)>>,
}

#[async_trait]
impl common::Around for LateLanding {
    async fn get(&self, inner: &DynStore, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let r = inner.get(key, range).await;
        let late = {
            let mut l = self.late.lock().unwrap_or_else(|p| p.into_inner());
            if l.as_ref().is_some_and(|(k, _)| k == key) { l.take() } else { None }
        };
        if let Some((k, body)) = late {
            let _ = inner.put(&k, body, PutMode::IfAbsent).await;
        }
        r
    }
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        let arm =
            key.contains("journal/") && std::mem::take(&mut *self.armed.lock().unwrap_or_else(|p| p.into_inner()));
        if arm {
            *self.late.lock().unwrap_or_else(|p| p.into_inner()) = Some((key.to_string(), body));
            return Err(StoreError::Transient("timed out (the request is still on its way)".into()));
        }
        inner.put(key, body, mode).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_lands_late_is_recognised_as_ours() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CSU).await;
    let late = common::Wrapped::new(mem.clone(), LateLanding { armed: Mutex::new(false), late: Mutex::new(None) });
    let store: DynStore = late.clone();
    let v = open(&store, "v/").await;
    v.write(0, b"first").await.expect("write");
    *late.armed.lock().unwrap_or_else(|p| p.into_inner()) = true;
    assert!(v.flush().await.is_err(), "the PUT times out at the client");
    v.write(CSU, b"second").await.expect("write 2");
    v.flush().await.expect("the late record is ours: no self-fencing");
    v.write(2 * CSU, b"third").await.expect("write 3");
    v.flush().await.expect("and the writer goes on");
    drop(v);
    assert_eq!(read_fresh(&mem, "v/", 0, 5).await, b"first");
    assert_eq!(read_fresh(&mem, "v/", CSU, 6).await, b"second");
    assert_eq!(read_fresh(&mem, "v/", 2 * CSU, 5).await, b"third");
    assert_fsck_clean(&mem, "v/").await;
}

// 6 ---------------------------------------------------------------------------

/// The first `volume.json` PUT lands but its answer is lost; the retry's
/// 412 must be recognised as our own create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_first_put_landed_succeeds() {
    let rig = FaultRig::new();
    let clock = Arc::new(ManualClock::new(0));
    let retrying: DynStore =
        Arc::new(RetryStore::with_clock(rig.faulty(), common::fast_policy(), clock, Arc::new(|d| d)));
    rig.rule(Some(Op::Put), "volume.json", Fault::LostResponse, 1);
    let opts = CreateOptions::new(4 * CSU, CS);
    Volume::create(retrying.clone(), "v/", opts.clone(), &SystemClock).await.expect("create must succeed");
    let v = open(&retrying, "v/").await;
    v.write(0, b"usable").await.expect("write");
    v.flush().await.expect("flush");
    // Someone else's create under the same name is still refused.
    assert!(matches!(
        Volume::create(retrying.clone(), "v/", opts, &SystemClock).await,
        Err(VolumeError::AlreadyExists(_))
    ));
}

// 7 ---------------------------------------------------------------------------

/// A read-only opener beside a live writer: after the writer replaced a
/// chunk and compaction collected the old generation, reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_opener_follows_the_writer_past_compaction() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 4 * CSU).await;
    let w = open(&store, "v/").await;
    w.write(0, &common::pattern(1, CS as usize)).await.expect("write");
    w.flush().await.expect("flush");
    let ro = open_with(&store, "v/", OpenOptions { read_only: true, cache_limit: 0, ..OpenOptions::default() }).await;
    let newer = common::pattern(2, CS as usize);
    w.write(0, &newer).await.expect("overwrite");
    w.flush().await.expect("flush");
    let rep = compact::compact(&store, "v/", &eager(), &SystemClock).await.expect("compact");
    assert!(rep.chunks_deleted >= 1, "the old generation must be collected for this test: {rep:?}");
    assert_eq!(ro.read(0, CSU).await.expect("the reader must follow the journal, not fail"), newer);
}

// 9 ---------------------------------------------------------------------------

/// An unreadable snapshot record: compaction reports it and deletes
/// nothing (it cannot know what the snapshot pins), without failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_snapshot_is_reported_and_nothing_is_deleted() {
    let rig = FaultRig::new();
    let store = rig.plain();
    create(&store, "v/", 4 * CSU).await;
    let w = open(&store, "v/").await;
    for i in 0..3u8 {
        w.write(0, &[i; 4096]).await.expect("write");
        w.flush().await.expect("flush");
    }
    w.snapshot("good").await.expect("snapshot");
    rig.mem.tamper(&format::snapshot_key("v/", "broken"), Bytes::from_static(b"{not json"));
    let before = keys(&store, "v/").await;
    let rep = compact::compact(&store, "v/", &eager(), &SystemClock).await.expect("compaction must not fail");
    assert_eq!(rep.unreadable_snapshots, vec![format::snapshot_key("v/", "broken")]);
    let after = keys(&store, "v/").await;
    assert!(before.iter().all(|k| after.contains(k)), "something was deleted: {before:?} -> {after:?}");
    let f = fsck::fsck(store.as_ref(), "v/", true, &|_, _| {}).await.expect("fsck");
    assert!(!f.clean && f.errors.iter().any(|e| e.contains("broken")), "fsck must name it: {:?}", f.errors);
}

// 10 --------------------------------------------------------------------------

/// A read of a chunk whose upload is stuck in retries is answered from
/// memory at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_wait_for_an_uploads_retries() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CSU).await;
    let v = open(&rig.faulty(), "v/").await;
    let data = common::pattern(5, CS as usize);
    v.write(0, &data).await.expect("write");
    rig.rule(Some(Op::Put), "chunks/", Fault::Hang, 1);
    let flusher = tokio::spawn({
        let v = v.clone();
        async move { v.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = tokio::time::timeout(Duration::from_secs(2), v.read(100, 4096)).await;
    assert_eq!(got.expect("the read waited for the upload").expect("read"), data[100..4196].to_vec());
    let got = tokio::time::timeout(Duration::from_secs(2), v.write(200, b"during")).await;
    got.expect("a write waited for the upload").expect("write");
    flusher.abort();
}

// 11 --------------------------------------------------------------------------

/// A chunk object name that is already taken is never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_objects_are_never_overwritten() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 4 * CSU).await;
    let v = open(&store, "v/").await;
    let epoch = v.stats().epoch;
    // The names this writer would use next, taken by objects that are not its own.
    let squatted: Vec<String> = (0..4).map(|c| format::chunk_key("v/", 0, format::generation(epoch, c))).collect();
    for k in &squatted {
        store.put(k, Bytes::from_static(b"someone else's bytes"), PutMode::Overwrite).await.expect("put");
    }
    let data = common::pattern(6, CS as usize);
    v.write(0, &data).await.expect("write");
    v.flush().await.expect("flush");
    for k in &squatted {
        assert_eq!(store.get(k, None).await.expect("get"), Bytes::from_static(b"someone else's bytes"), "{k}");
    }
    drop(v);
    assert_eq!(read_fresh(&store, "v/", 0, CSU).await, data);
    // The high bits wrap past 2^28 epochs instead of overflowing into nonsense.
    assert_eq!(format::generation(1 << 28, 5), format::generation(0, 5));
    assert_ne!(format::generation(u64::MAX, format::MAX_GENERATION_COUNTER), u64::MAX);
}

// 12 --------------------------------------------------------------------------

/// Whatever the flush rate, a writer keeps the journal past its newest
/// checkpoint short, so opening replays few records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_volume_opens_replaying_few_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    create(&store, "v/", 4 * CSU).await;
    let v = open(&store, "v/").await;
    for i in 0..400u64 {
        v.write((i % 4) * CSU, &i.to_le_bytes()).await.expect("write");
        v.flush().await.expect("flush");
    }
    drop(v);
    // Checkpoints are written in the background: give the last one a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = replay::replay(store.as_ref(), "v/", CSU, None).await.expect("replay");
    // Every flush commits a record, the first one (zeros over zeros) too.
    assert!(st.head >= 401, "head {} replayed {} cp {:?}", st.head, st.records_replayed, st.checkpoint);
    assert!(st.records_replayed <= 130, "opening replays {} records", st.records_replayed);
    assert_eq!(read_fresh(&store, "v/", 3 * CSU, 8).await, 399u64.to_le_bytes());
    assert_fsck_clean(&store, "v/").await;
}

/// A create whose volume.json landed but whose create record did not: the
/// volume refuses to open with what to do; the same create asked again
/// finishes it (another size is refused as a name taken); a prefix with
/// chunks but no records is damage, never finished into an empty volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_asked_again_finishes_one_that_stopped_before_its_create_record() {
    let rig = FaultRig::new();
    let opts = |size: u64| CreateOptions::new(size, CS);
    rig.rule(Some(Op::Put), "journal/", Fault::ServerError, 1_000);
    let failed = Volume::create(rig.faulty(), "v/", opts(4 * CSU), &SystemClock).await;
    assert!(failed.is_err(), "created: {failed:?}");
    rig.fault.clear_rules();
    let opened = Volume::open(rig.plain(), "v/", OpenOptions::default()).await.err();
    assert!(opened.as_ref().is_some_and(|e| e.to_string().contains("create the same volume again")), "{opened:?}");
    let other = Volume::create(rig.plain(), "v/", opts(8 * CSU), &SystemClock).await;
    assert!(matches!(other, Err(VolumeError::AlreadyExists(_))), "another size: {other:?}");
    // Not while its delete has begun.
    let tomb = s3blk::volume::catalog::tombstone_key("v/");
    rig.plain().put(&tomb, Bytes::from_static(b"{\"deleted_unix\":1}\n"), PutMode::IfAbsent).await.expect("tombstone");
    let deleting = Volume::create(rig.plain(), "v/", opts(4 * CSU), &SystemClock).await;
    assert!(matches!(deleting, Err(VolumeError::NotFound(_))), "a create being deleted was finished: {deleting:?}");
    rig.plain().delete(&tomb).await.expect("delete tombstone");
    Volume::create(rig.plain(), "v/", opts(4 * CSU), &SystemClock).await.expect("the same create again");
    let v = open(&rig.plain(), "v/").await;
    // A whole chunk: it goes up as a chunk object, not inside a record.
    let data = common::pattern(3, CS as usize);
    v.write(0, &data).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    assert_eq!(read_fresh(&rig.plain(), "v/", 0, CSU).await, data);
    let again = Volume::create(rig.plain(), "v/", opts(4 * CSU), &SystemClock).await;
    assert!(matches!(again, Err(VolumeError::AlreadyExists(_))), "a finished volume: {again:?}");
    assert_fsck_clean(&rig.plain(), "v/").await;

    // Records and checkpoints gone, chunks left: damage.
    let store = rig.plain();
    for o in s3blk::store::list_all(store.as_ref(), "v/").await.expect("list") {
        if o.key.contains("/journal/") || o.key.contains("/checkpoints/") {
            store.delete(&o.key).await.expect("delete");
        }
    }
    let damaged = Volume::create(rig.plain(), "v/", opts(4 * CSU), &SystemClock).await;
    assert!(matches!(damaged, Err(VolumeError::Corrupt(_))), "{damaged:?}");
}

/// A clone whose volume.json landed but whose create record did not keeps
/// the pin it reads through (letting go of it would let the source's
/// compaction take the clone's data), and the same clone asked again
/// finishes it: it then reads the source as cloned, after compactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_stopped_before_its_create_record_keeps_its_pin_and_is_finished_when_asked_again() {
    use s3blk::volume::catalog;
    let rig = FaultRig::new();
    create(&rig.plain(), "src/", 4 * CSU).await;
    let w = open(&rig.plain(), "src/").await;
    let before = common::pattern(4, CS as usize);
    w.write(0, &before).await.expect("write");
    w.flush().await.expect("flush");
    rig.rule(Some(Op::Put), "c/journal/", Fault::ServerError, 1_000);
    let failed = catalog::clone_volume(&rig.faulty(), "src/", None, "c/", "c/", None, &SystemClock).await;
    assert!(failed.is_err(), "cloned: {failed:?}");
    rig.fault.clear_rules();
    let pin = format::snapshot_key("src/", &format::clone_pin_name("c/"));
    assert!(rig.plain().head(&pin).await.expect("head").is_some(), "the half-made clone's pin was let go of");
    // The source moves on and is compacted: the pin keeps the clone's seq.
    w.write(0, &common::pattern(5, CS as usize)).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    compact::compact(&rig.plain(), "src/", &eager(), &SystemClock).await.expect("compact");
    compact::compact(&rig.plain(), "src/", &eager(), &SystemClock).await.expect("compact");
    // Asked again at another size: not the clone that was begun.
    let bigger = catalog::clone_volume(&rig.plain(), "src/", None, "c/", "c/", Some(8 * CSU), &SystemClock).await;
    assert!(
        matches!(&bigger, Err(catalog::CatalogError::Volume(VolumeError::AlreadyExists(_)))),
        "a half-made clone of 4 chunks was finished when asked for 8: {bigger:?}"
    );
    catalog::clone_volume(&rig.plain(), "src/", None, "c/", "c/", Some(4 * CSU), &SystemClock)
        .await
        .expect("asked again");
    assert_eq!(read_fresh(&rig.plain(), "c/", 0, CSU).await, before, "the finished clone reads other bytes");
    let again = catalog::clone_volume(&rig.plain(), "src/", None, "c/", "c/", None, &SystemClock).await;
    assert!(again.is_err(), "a finished clone asked again: {again:?}");
    assert_fsck_clean(&rig.plain(), "c/").await;
}

/// `volume.json` PUTs of the volume `vol` time out at the client while
/// `armed` and land later: when `land` is called, or just before the next
/// PUT of a key containing `land_before`.
#[derive(Debug)]
struct LateMeta {
    vol: String,
    land_before: String,
    armed: Mutex<bool>,
    late: Mutex<Option<Bytes>>,
}

impl LateMeta {
    async fn land(&self, inner: &DynStore) {
        let late = self.late.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(body) = late {
            inner.put(&format::meta_key(&self.vol), body, PutMode::IfAbsent).await.expect("the late volume.json");
        }
    }
}

#[async_trait]
impl common::Around for LateMeta {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if key == format::meta_key(&self.vol)
            && std::mem::take(&mut *self.armed.lock().unwrap_or_else(|p| p.into_inner()))
        {
            *self.late.lock().unwrap_or_else(|p| p.into_inner()) = Some(body);
            return Err(StoreError::Transient("timed out (the request is still on its way)".into()));
        }
        if key.contains(&self.land_before) {
            self.land(inner).await;
        }
        inner.put(key, body, mode).await
    }
}

/// A clone's `volume.json` whose PUT timed out lands only while the same
/// clone is asked for again, after the source moved on: the second attempt
/// pins the source's new seq under the same pin name, while the
/// `volume.json` that landed reads through the old one. Asked a third
/// time, the clone must not be finished: its pin keeps another seq than
/// the one it reads through, and the source's compaction takes what it
/// reads. (Before: the third attempt answered Ok, and after two
/// compactions of the source the clone could not be opened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_is_never_finished_through_a_pin_of_another_seq() {
    use s3blk::volume::catalog;
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "src/", 4 * CSU).await;
    let w = open(&mem, "src/").await;
    let before = common::pattern(4, CS as usize);
    w.write(0, &before).await.expect("write");
    w.flush().await.expect("flush");
    let late = common::Wrapped::new(
        mem.clone(),
        LateMeta {
            vol: "c/".into(),
            land_before: "src/clones/".into(),
            armed: Mutex::new(true),
            late: Mutex::default(),
        },
    );
    let store: DynStore = late.clone();
    let first = catalog::clone_volume(&store, "src/", None, "c/", "c/", None, &SystemClock).await;
    assert!(first.is_err(), "the volume.json PUT timed out: {first:?}");
    // The source moves on; the clone is asked for again, and the first
    // attempt's volume.json lands while the second one writes its marker.
    w.write(0, &common::pattern(5, CS as usize)).await.expect("write");
    w.flush().await.expect("flush");
    let second = catalog::clone_volume(&store, "src/", None, "c/", "c/", None, &SystemClock).await;
    assert!(second.is_err(), "the clone's volume.json names another seq: {second:?}");
    let third = catalog::clone_volume(&mem, "src/", None, "c/", "c/", None, &SystemClock).await;
    // The source moves on and is compacted: only its pins keep old seqs.
    w.write(0, &common::pattern(6, CS as usize)).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    compact::compact(&mem, "src/", &eager(), &SystemClock).await.expect("compact");
    compact::compact(&mem, "src/", &eager(), &SystemClock).await.expect("compact");
    if let Ok(meta) = &third {
        let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
        let read = match Volume::open(mem.clone(), "c/", ro).await {
            Ok(v) => v.read(0, CSU).await.map(|b| b == before),
            Err(e) => Err(e),
        };
        panic!("a clone reading through seq {:?} was finished; after compaction its read gives {read:?}", meta.parent);
    }
    assert!(matches!(third, Err(catalog::CatalogError::Volume(VolumeError::AlreadyExists(_)))), "{third:?}");
    // What is left can be deleted, and the clone made afresh.
    let gone = catalog::delete_volume(&mem, "c/", catalog::OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(gone, Ok(catalog::DeleteOutcome::Deleted { .. })), "{gone:?}");
    catalog::clone_volume(&mem, "src/", None, "c/", "c/", None, &SystemClock).await.expect("cloned afresh");
    assert_eq!(read_fresh(&mem, "c/", 0, CSU).await, common::pattern(6, CS as usize));
    assert_fsck_clean(&mem, "c/").await;
}

/// A restore's `volume.json` that lands after its failed create let go of
/// the pin in the source (as CreateVolume's clean-up does when no
/// `volume.json` is there yet): finishing that create (a retried
/// CreateVolume finishes a volume.json without a create record) must be
/// refused, since nothing keeps what the volume would read through once
/// the user's snapshot goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_pin_was_let_go_of_is_never_finished() {
    use s3blk::volume::catalog;
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "src/", 4 * CSU).await;
    let w = open(&mem, "src/").await;
    w.write(0, &common::pattern(4, CS as usize)).await.expect("write");
    let snap = w.snapshot("s").await.expect("snapshot");
    drop(w);
    let late = common::Wrapped::new(
        mem.clone(),
        LateMeta { vol: "r/".into(), land_before: "never".into(), armed: Mutex::new(true), late: Mutex::default() },
    );
    let store: DynStore = late.clone();
    // CreateVolume's steps for a restore of `s` into `r/`.
    catalog::record_source(&store, "r/", "src/", "r/").await.expect("record the source");
    let pin = catalog::pin_snapshot_for(&store, "src/", &snap, "r/", "r/", &mut false).await.expect("pin");
    catalog::add_clone_marker(&store, "src/", "r/", "r/", pin.seq).await.expect("marker");
    let parent = format::ParentRef { volume: "src/".into(), snapshot: pin.name.clone(), seq: pin.seq };
    let opts = CreateOptions { parent: Some(parent), ..CreateOptions::new(4 * CSU, CS) };
    let made = Volume::create(store.clone(), "r/", opts.clone(), &SystemClock).await;
    assert!(made.is_err(), "the volume.json PUT timed out: {made:?}");
    catalog::abandon_create(&store, "r/").await.expect("clean up the failed create");
    assert!(mem.head(&format::snapshot_key("src/", &pin.name)).await.expect("head").is_none(), "the pin stayed");
    late.land(&mem).await;
    // The create asked again finds volume.json and finishes it.
    let meta = replay::read_meta(mem.as_ref(), "r/").await.expect("the late volume.json");
    let again = Volume::create(mem.clone(), "r/", opts, &SystemClock).await;
    let finished = Volume::finish_create(&mem, "r/", &meta).await;
    assert!(again.is_err(), "a restore without its pin was finished: {again:?}");
    assert!(finished.is_err(), "a restore without its pin was finished: {finished:?}");
}

/// Plays, on the first PUT of a create record, another create landing its
/// own record first and a delete then taking `volume.json`.
#[derive(Debug)]
struct OtherCreateThenDelete {
    armed: std::sync::atomic::AtomicBool,
}

/// What the other create's record holds.
const OTHER_RECORD: &[u8] = b"another create's record";

#[async_trait]
impl common::Around for OtherCreateThenDelete {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if key.ends_with("journal/00000000000000000000") && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            inner.put(key, Bytes::from_static(OTHER_RECORD), PutMode::IfAbsent).await?;
            inner.delete(&format::meta_key("v/")).await?;
        }
        inner.put(key, body, mode).await
    }
}

/// A finish of a create whose record PUT finds another's record there, and
/// then finds the volume deleted, leaves that record alone: it wrote none,
/// and what it would delete is another create's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_create_that_wrote_no_record_deletes_none() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CSU).await;
    let meta = replay::read_meta(mem.as_ref(), "v/").await.expect("meta");
    // A create that stopped before its create record.
    mem.delete(&format::journal_key("v/", 0)).await.expect("delete the record");
    let store: DynStore =
        common::Wrapped::new(mem.clone(), OtherCreateThenDelete { armed: std::sync::atomic::AtomicBool::new(true) });
    let finished = Volume::finish_create(&store, "v/", &meta).await;
    assert!(matches!(finished, Err(VolumeError::NotFound(_))), "{finished:?}");
    let left = mem.get(&format::journal_key("v/", 0), None).await;
    assert_eq!(left.ok().as_deref(), Some(OTHER_RECORD), "the other create's record was deleted");
}

/// Lets the first PUT of a create record land, then, as a delete begins
/// (taking `volume.json`), answers it 412: its answer was lost and the
/// retry found the record it had written.
#[derive(Debug)]
struct LandedAnswerLost {
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl common::Around for LandedAnswerLost {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if key.ends_with("journal/00000000000000000000") && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            inner.put(key, body, mode).await?;
            inner.delete(&format::meta_key("v/")).await?;
            return Err(StoreError::PreconditionFailed(key.to_string()));
        }
        inner.put(key, body, mode).await
    }
}

/// A finish of a create whose record landed with its answer lost, and
/// which then finds the volume deleted, takes its record back: left, it
/// sat under a prefix without volume.json or tombstone, which no delete
/// removes and which a create of the name again took for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_create_whose_record_landed_unanswered_takes_it_back() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CSU).await;
    let meta = replay::read_meta(mem.as_ref(), "v/").await.expect("meta");
    mem.delete(&format::journal_key("v/", 0)).await.expect("delete the record");
    let store: DynStore =
        common::Wrapped::new(mem.clone(), LandedAnswerLost { armed: std::sync::atomic::AtomicBool::new(true) });
    let finished = Volume::finish_create(&store, "v/", &meta).await;
    assert!(matches!(finished, Err(VolumeError::NotFound(_))), "{finished:?}");
    assert!(mem.head(&format::journal_key("v/", 0)).await.expect("head").is_none(), "its own record was left");
}

/// Fails the first delete of `key`, as a crash or a lost connection would.
#[derive(Debug)]
struct FailDeleteOnce {
    key: String,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl common::Around for FailDeleteOnce {
    async fn delete(&self, inner: &DynStore, key: &str) -> StoreResult<()> {
        if key == self.key && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Transient("injected: connection reset".into()));
        }
        inner.delete(key).await
    }
}

/// "src/" with its first chunk written and flushed: its writer and the bytes.
async fn source_with_a_chunk(mem: &DynStore) -> (Volume, Vec<u8>) {
    let opts = CreateOptions::new(4 * CSU, CS);
    Volume::create(mem.clone(), "src/", opts, &SystemClock).await.expect("create");
    let w = Volume::open(mem.clone(), "src/", OpenOptions::default()).await.expect("open");
    let old = common::pattern(4, CS as usize);
    w.write(0, &old).await.expect("write");
    w.flush().await.expect("flush");
    (w, old)
}

/// The source's writer `w` overwrites what clone "b/x/" read (`old`) and
/// compaction folds eagerly: b/x still reads `old` through its pin.
async fn b_reads_its_bytes_after_the_source_moves_on(mem: &DynStore, w: Volume, old: &[u8]) {
    w.write(0, &common::pattern(5, CS as usize)).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    let eager = CompactOptions { safety_age: Duration::ZERO, ..CompactOptions::default() };
    for _ in 0..2 {
        compact::compact(mem, "src/", &eager, &SystemClock).await.expect("compact");
    }
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    let b = Volume::open(mem.clone(), "b/x/", ro).await.expect("open b/x");
    assert_eq!(b.read(0, CSU).await.expect("read b/x"), old);
}

/// Pins and markers are named by a clone's last path segment. A delete of
/// clone `a/x` that let go of its source and stopped before its volume.json
/// went, run again after a clone `b/x` of the same source took those names,
/// leaves b/x's pin: b/x still reads its bytes after the source moved on
/// and was compacted. The second run took b/x's pin and b/x could no longer
/// be opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_run_again_leaves_the_pin_of_another_clone_of_the_same_name() {
    use s3blk::volume::catalog::{self, OnDependants};
    let mem: DynStore = Arc::new(MemoryStore::new());
    let (w, old) = source_with_a_chunk(&mem).await;
    catalog::clone_volume(&mem, "src/", None, "a/x/", "a/x/", None, &SystemClock).await.expect("clone a/x");
    let failing: DynStore = common::Wrapped::new(
        mem.clone(),
        FailDeleteOnce { key: "a/x/volume.json".into(), armed: std::sync::atomic::AtomicBool::new(true) },
    );
    let first = catalog::delete_volume(&failing, "a/x/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(first.is_err(), "the first delete was to stop before volume.json went: {first:?}");
    let pin = format::snapshot_key("src/", &format::clone_pin_name("a/x/"));
    assert!(mem.head(&pin).await.expect("head").is_none(), "the first delete let go of the source");
    catalog::clone_volume(&mem, "src/", None, "b/x/", "b/x/", None, &SystemClock).await.expect("clone b/x");
    catalog::delete_volume(&mem, "a/x/", OnDependants::RefuseClones, &SystemClock).await.expect("the delete again");
    assert!(mem.head(&pin).await.expect("head").is_some(), "the delete of a/x took b/x's pin");
    b_reads_its_bytes_after_the_source_moves_on(&mem, w, &old).await;
}

/// Fails every PUT of its first key and every DELETE of its second.
#[derive(Debug)]
struct FailWrites(String, String);

#[async_trait]
impl common::Around for FailWrites {
    async fn put(&self, inner: &DynStore, key: &str, body: bytes::Bytes, mode: PutMode) -> StoreResult<()> {
        if key == self.0 {
            return Err(StoreError::Transient("injected: connection reset".into()));
        }
        inner.put(key, body, mode).await
    }
    async fn delete(&self, inner: &DynStore, key: &str) -> StoreResult<()> {
        if key == self.1 {
            return Err(StoreError::Transient("injected: connection reset".into()));
        }
        inner.delete(key).await
    }
}

/// A clone create of `a/x` that failed after pinning its source and let go
/// of the pin, but not of its record of the source (source.json), and a
/// clone `b/x` of the same source, which takes the same pin name, caught
/// between writing its pin and its marker: cleaning up `a/x` (its delete)
/// finds no marker and must still leave b/x's pin, which names b/x. It took
/// the pin, and b/x then read a source compacted under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleaning_up_a_failed_clone_leaves_the_pin_another_clone_of_the_name_just_wrote() {
    use s3blk::volume::catalog::{self, DeleteOutcome, OnDependants};
    let mem: DynStore = Arc::new(MemoryStore::new());
    let (w, old) = source_with_a_chunk(&mem).await;
    let marker = format::clone_marker_key("src/", "a/x/");
    let failing: DynStore = common::Wrapped::new(mem.clone(), FailWrites(marker.clone(), "a/x/source.json".into()));
    let failed = catalog::clone_volume(&failing, "src/", None, "a/x/", "a/x/", None, &SystemClock).await;
    assert!(failed.is_err(), "the clone of a/x was to fail: {failed:?}");
    assert!(mem.head("a/x/source.json").await.expect("head").is_some(), "a/x's record of its source stays");
    let pin = format::snapshot_key("src/", &format::clone_pin_name("a/x/"));
    assert!(mem.head(&pin).await.expect("head").is_none(), "the failed clone let go of its pin");
    catalog::clone_volume(&mem, "src/", None, "b/x/", "b/x/", None, &SystemClock).await.expect("clone b/x");
    // b/x as its create stands between its pin and its marker.
    let b_marker = mem.get(&marker, None).await.expect("b/x's marker");
    mem.delete(&marker).await.expect("delete the marker");
    let cleaned = catalog::delete_volume(&mem, "a/x/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(cleaned, Ok(DeleteOutcome::Probes { .. })), "{cleaned:?}");
    assert!(mem.head(&pin).await.expect("head").is_some(), "cleaning up a/x took b/x's pin");
    mem.put(&marker, b_marker, PutMode::Overwrite).await.expect("b/x's marker lands");
    b_reads_its_bytes_after_the_source_moves_on(&mem, w, &old).await;
}

/// Plays a clone `f2/data/` of "src/" being made in full just as the clone
/// `f1/data/` sends its pin (same name), whose PUT then fails.
#[derive(Debug)]
struct OtherCloneFirst {
    pin: String,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl common::Around for OtherCloneFirst {
    async fn put(&self, inner: &DynStore, key: &str, body: bytes::Bytes, mode: PutMode) -> StoreResult<()> {
        if key == self.pin && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            s3blk::volume::catalog::clone_volume(inner, "src/", None, "f2/data/", "f2/data/", None, &SystemClock)
                .await
                .map_err(|e| StoreError::Permanent(format!("the other clone: {e}")))?;
            return Err(StoreError::Transient("injected: connection reset".into()));
        }
        inner.put(key, body, mode).await
    }
}

/// A clone create that failed (not for its name) after another clone of
/// the same name elsewhere took the pin and marker lets go of neither: the
/// other clone's delete still finds its marker and lets go of its pin. The
/// marker was deleted, so that delete left the pin for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_clone_leaves_the_marker_of_another_clone_of_the_name() {
    use s3blk::volume::catalog::{self, OnDependants};
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "src/", 4 * CSU).await;
    let pin = format::snapshot_key("src/", &format::clone_pin_name("f1/data/"));
    let marker = format::clone_marker_key("src/", "f1/data/");
    let racing: DynStore = common::Wrapped::new(
        mem.clone(),
        OtherCloneFirst { pin: pin.clone(), armed: std::sync::atomic::AtomicBool::new(true) },
    );
    let failed = catalog::clone_volume(&racing, "src/", None, "f1/data/", "f1/data/", None, &SystemClock).await;
    assert!(failed.is_err(), "f1 was to fail: {failed:?}");
    assert!(mem.head(&pin).await.expect("head").is_some(), "f2's pin was taken");
    assert!(mem.head(&marker).await.expect("head").is_some(), "f2's marker was taken");
    catalog::delete_volume(&mem, "f2/data/", OnDependants::RefuseClones, &SystemClock).await.expect("delete f2");
    assert!(mem.head(&pin).await.expect("head").is_none(), "f2's delete left its pin");
    assert!(mem.head(&marker).await.expect("head").is_none(), "f2's delete left its marker");
}

/// A restore takes a pin already there at its seq for its own (an earlier
/// attempt's, or another running create's of the same volume), but not the
/// pin of a restore of the same last path segment in another folder: that
/// one names its clone, and the second restore is refused instead of
/// reading through a pin whose clone's delete would take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_does_not_adopt_the_pin_of_another_clone_of_the_name() {
    use s3blk::volume::catalog;
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "src/", 4 * CSU).await;
    let snap = s3blk::volume::engine::snapshot_committed(&mem, "src/", "s", None, &SystemClock).await.expect("snap");
    let mut adopted = false;
    let pin = catalog::pin_snapshot_for(&mem, "src/", &snap, "a/x/", "a/x/", &mut adopted).await.expect("pin a/x");
    assert_eq!(pin.clone.as_deref(), Some("a/x/"));
    assert!(!adopted);
    catalog::pin_snapshot_for(&mem, "src/", &snap, "a/x/", "a/x/", &mut adopted).await.expect("a/x again");
    assert!(adopted, "a retry of a/x takes its pin");
    let mut adopted = false;
    let other = catalog::pin_snapshot_for(&mem, "src/", &snap, "b/x/", "b/x/", &mut adopted).await;
    assert!(matches!(other, Err(catalog::CatalogError::Volume(VolumeError::AlreadyExists(_)))), "{other:?}");
    assert!(!adopted, "b/x adopted a/x's pin");
}

/// A delete of a clone that failed while letting go of its source (its
/// pin's or its marker's delete) lets go of the rest when run again: the
/// source keeps no pin, nor a marker that refuses its delete. When the
/// marker went first and the pin's delete failed, the second run found no
/// marker naming the clone and left the pin for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_failed_letting_go_of_its_source_lets_go_when_run_again() {
    use s3blk::volume::catalog::{self, OnDependants};
    let pin = format::snapshot_key("src/", &format::clone_pin_name("c/x/"));
    let marker = format::clone_marker_key("src/", "c/x/");
    for failing_key in [&pin, &marker] {
        let mem: DynStore = Arc::new(MemoryStore::new());
        create(&mem, "src/", 4 * CSU).await;
        catalog::clone_volume(&mem, "src/", None, "c/x/", "c/x/", None, &SystemClock).await.expect("clone");
        let failing: DynStore = common::Wrapped::new(
            mem.clone(),
            FailDeleteOnce { key: failing_key.clone(), armed: std::sync::atomic::AtomicBool::new(true) },
        );
        let first = catalog::delete_volume(&failing, "c/x/", OnDependants::RefuseClones, &SystemClock).await;
        assert!(first.is_err(), "the delete of {failing_key} was to fail: {first:?}");
        catalog::delete_volume(&mem, "c/x/", OnDependants::RefuseClones, &SystemClock).await.expect("run again");
        for k in [&pin, &marker] {
            assert!(mem.head(k).await.expect("head").is_none(), "{k} left after {failing_key} failed once");
        }
        catalog::delete_volume(&mem, "src/", OnDependants::RefuseClones, &SystemClock).await.expect("the source goes");
    }
}

/// Plays another delete finishing between a listing and the GET of the
/// deletion marker it found.
#[derive(Debug)]
struct TombstoneGoesBeforeItIsRead;

#[async_trait]
impl common::Around for TombstoneGoesBeforeItIsRead {
    async fn get(&self, inner: &DynStore, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        if key.ends_with("deleted.json") {
            inner.delete(key).await?;
        }
        inner.get(key, range).await
    }
}

/// A delete that finds a deletion marker gone when it reads it (another
/// delete finished meanwhile) is told to come back (ABORTED), not that
/// s3blk did not write the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_marker_gone_before_it_is_read_is_no_foreign_one() {
    use s3blk::volume::catalog::{self, CatalogError, OnDependants};
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CSU).await;
    let body = Bytes::from(format!("{{\"deleted_unix\":{}}}\n", SystemClock.now_unix()));
    mem.put(&catalog::tombstone_key("v/"), body, PutMode::IfAbsent).await.expect("tombstone");
    let racing: DynStore = common::Wrapped::new(mem.clone(), TombstoneGoesBeforeItIsRead);
    let r = catalog::delete_volume(&racing, "v/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(r, Err(CatalogError::BeingDeleted { .. })), "{r:?}");
}

/// A prefix another program keeps, holding its own `deleted.json` and
/// `volume.json` (and a name under `attachments/`), is no s3blk volume:
/// the reaper leaves it (it took it for an interrupted delete and removed
/// every object) and `volume delete` refuses it, as it refuses a prefix
/// whose only marker is a volume.json that is not a volume's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_deleted_json_or_volume_json_makes_no_volume_to_remove() {
    use s3blk::volume::catalog::{self, OnDependants};
    let mem: DynStore = Arc::new(MemoryStore::new());
    let theirs = [
        ("root/app/deleted.json", &b"[\"order-17\",\"order-18\"]"[..]),
        ("root/app/volume.json", &b"{\"app\":\"inventory\",\"level\":11}"[..]),
        ("root/app/attachments/invoice.json", &b"{\"total\":42}"[..]),
        ("root/cfg/volume.json", &b"{\"replicas\":3}"[..]),
    ];
    for (k, v) in theirs {
        mem.put(k, Bytes::from_static(v), PutMode::Overwrite).await.expect("put");
    }
    let age = catalog::ReapAge { safety_age: Duration::ZERO };
    let reaped = catalog::reap(&mem, "root/app/", Some(age)).await.expect("reap");
    assert_eq!(reaped, None, "the reaper acted on another program's deleted.json");
    for prefix in ["root/app/", "root/cfg/"] {
        let refused = catalog::delete_volume(&mem, prefix, OnDependants::RefuseClones, &SystemClock).await;
        assert!(refused.is_err(), "{prefix} was deleted: {refused:?}");
    }
    for (k, v) in theirs {
        assert_eq!(mem.get(k, None).await.expect("still there"), Bytes::from_static(v), "{k}");
    }
}
