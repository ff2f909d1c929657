//! The local write-back log (issue 13): a writer that died with writes it
//! acknowledged and did not commit leaves them in its log; the next writer
//! on the same host (same log directory) replays them when no other writer
//! opened the volume in between, and discards them otherwise.
//!
//! "Died" here is the volume dropped with unflushed writes, which leaves
//! its log exactly as a killed process does (files closed, lock released);
//! `tests/crash_campaign.rs` kills real `s3blk serve` processes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use s3blk::store::{DynStore, PutMode};
use s3blk::volume::compact::{self, CompactOptions};
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::format::{self, JournalRecord, RecordKind};
use s3blk::volume::{OpenOptions, Volume, VolumeError};

const CS: u32 = 64 << 10;
const SIZE: u64 = 1 << 20;

async fn create(store: &DynStore, vol: &str) -> String {
    let opts = CreateOptions::new(SIZE, CS);
    Volume::create(store.clone(), vol, opts, &s3blk::clock::SystemClock).await.expect("create").uuid
}

fn with_log(dir: &Path) -> OpenOptions {
    OpenOptions { log_dir: Some(dir.to_path_buf()), ..OpenOptions::default() }
}

async fn open_log(store: &DynStore, vol: &str, dir: &Path) -> Volume {
    Volume::open(store.clone(), vol, with_log(dir)).await.expect("open with a log")
}

/// A volume "v" on a local directory store in a fresh directory, and
/// where its writers keep their logs: (the directory, the store, the logs'
/// root, the volume's uuid).
async fn volume_with_logs() -> (tempfile::TempDir, DynStore, PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(&dir.path().join("store"));
    let logs = dir.path().join("logs");
    let uuid = create(&store, "v").await;
    (dir, store, logs, uuid)
}

/// The log directories of a volume's uuid under `root`.
fn log_dirs(root: &Path, uuid: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(root.join(uuid)) {
        Ok(d) => d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The log's segment holding the most bytes.
fn largest_segment(log: &Path) -> PathBuf {
    std::fs::read_dir(log)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seg-")))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a segment")
}

/// Let the volume's background tasks let go of it, so dropping the last
/// handle closes it (its log's files and lock) as a dead process would.
async fn die(v: Volume) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(v);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_after_a_crash_carries_on_with_every_acknowledged_write() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    assert_eq!(v.log_recovery().map(|r| r.adopted), Some(false));
    let flushed = common::pattern(1, 100_000);
    v.write(10_000, &flushed).await.expect("write");
    v.flush().await.expect("flush");
    // After the flush: an unaligned write across chunks, a whole chunk, zeros.
    let a = common::pattern(2, 70_000);
    v.write(50_000, &a).await.expect("write a");
    let whole = common::pattern(3, CS as usize);
    v.write_vec(4 * CS as u64, whole.clone()).await.expect("write whole");
    v.write_zeroes(20_000, 8192).await.expect("zeroes");
    let mut model = vec![0u8; SIZE as usize];
    model[10_000..110_000].copy_from_slice(&flushed);
    model[50_000..120_000].copy_from_slice(&a);
    model[4 * CS as usize..5 * CS as usize].copy_from_slice(&whole);
    model[20_000..28_192].fill(0);
    die(v).await;
    assert_eq!(log_dirs(&logs, &uuid).len(), 1, "the dead writer's log is gone");

    let v = open_log(&store, "v", &logs).await;
    let r = v.log_recovery().expect("a log");
    assert!(r.adopted && r.entries >= 3, "{r:?}");
    assert_eq!(v.read(0, SIZE).await.expect("read"), model, "acknowledged writes were lost");
    // They are committed by the next flush, and a clean close leaves no log.
    v.flush().await.expect("flush");
    die(v).await;
    assert!(log_dirs(&logs, &uuid).is_empty(), "a clean close left its log");
    let v = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open ro");
    assert_eq!(v.read(0, SIZE).await.expect("read"), model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_is_not_replayed_after_another_writer_opened_the_volume() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    v.write(0, &common::pattern(1, 8192)).await.expect("write");
    die(v).await;
    // Another host takes the volume over and writes.
    let other = Volume::open(store.clone(), "v", OpenOptions::default()).await.expect("other host");
    let theirs = common::pattern(2, 4096);
    other.write(4096, &theirs).await.expect("write");
    other.flush().await.expect("flush");
    drop(other);
    // Back on the first host: the dead writer's log is superseded.
    let v = open_log(&store, "v", &logs).await;
    let r = v.log_recovery().expect("a log");
    assert!(!r.adopted && r.discarded == 1, "{r:?}");
    let mut want = vec![0u8; 8192];
    want[4096..].copy_from_slice(&theirs);
    assert_eq!(v.read(0, 8192).await.expect("read"), want, "a superseded writer's writes were applied");
    assert_eq!(log_dirs(&logs, &uuid).len(), 1);
}

/// The window between a writer's open record landing and its log's state
/// saying so: the log names the writer it was being handed to, and is
/// taken over when that writer's open record is the journal's newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_handed_to_a_writer_that_died_opening_is_kept_only_if_its_open_record_landed() {
    // Also when compaction ran in between, with the open record the
    // journal's last: it must not fold the record the log is known by.
    for (landed, compacted) in [(true, false), (false, false), (true, true), (false, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = common::local_store(&dir.path().join("store"));
        let logs = dir.path().join("logs");
        let uuid = create(&store, "v").await;
        let v = open_log(&store, "v", &logs).await;
        let data = common::pattern(7, 8192);
        v.write(0, &data).await.expect("write");
        let head = v.stats().head_seq;
        die(v).await;
        // A writer died between appending its open record and updating
        // the log's state: the state names it as the next writer.
        let log = log_dirs(&logs, &uuid).remove(0);
        let state_path = log.join("state");
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_path).expect("state")).expect("json");
        let next = 0x5eed_u64 | 1;
        state["next_writer"] = serde_json::json!(next);
        std::fs::write(&state_path, serde_json::to_vec(&state).expect("json")).expect("state");
        let rec = JournalRecord {
            kind: RecordKind::Open,
            seq: head + 1,
            epoch: head + 1,
            size: SIZE,
            // Not landed: another writer's open record is there instead.
            writer: if landed { next } else { next + 2 },
            created_unix: 0,
            chunks: Vec::new(),
            inline: Vec::new(),
        };
        let key = format::journal_key("v", head + 1);
        store.put(&key, Bytes::from(rec.encode()), PutMode::IfAbsent).await.expect("open record");
        if compacted {
            let eager = CompactOptions { safety_age: Duration::ZERO, ..CompactOptions::default() };
            let report = compact::compact(&store, "v", &eager, &s3blk::clock::SystemClock).await.expect("compact");
            assert_eq!(report.folded_seq, Some(head), "compaction folded onto the trailing open record");
        }

        let v = open_log(&store, "v", &logs).await;
        let r = v.log_recovery().expect("a log");
        assert_eq!(r.adopted, landed, "compacted: {compacted}; {r:?}");
        let got = v.read(0, 8192).await.expect("read");
        if landed {
            assert_eq!(got, data, "the log of a writer whose open landed was not replayed (compacted: {compacted})");
        } else {
            assert_eq!(got, vec![0u8; 8192], "the log of a superseded writer was replayed (compacted: {compacted})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writer_discards_its_log_and_a_live_writers_log_is_never_taken() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    let a = open_log(&store, "v", &logs).await;
    a.write(0, &common::pattern(1, 8192)).await.expect("write");
    // A second writer on the same host while the first is alive: it must
    // not take the live writer's log.
    let b = open_log(&store, "v", &logs).await;
    let r = b.log_recovery().expect("a log");
    assert!(!r.adopted && r.discarded == 0, "{r:?}");
    assert_eq!(log_dirs(&logs, &uuid).len(), 2);
    assert_eq!(b.read(0, 8192).await.expect("read"), vec![0u8; 8192]);
    // The first writer finds out at its next commit, and drops its log.
    match a.flush().await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("the old writer was not fenced: {other:?}"),
    }
    assert_eq!(log_dirs(&logs, &uuid).len(), 1, "a fenced writer kept its log");
    // Its pages were in that log only: reading them says why they are gone.
    match a.read(0, 8192).await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("a fenced writer's read of pages its log held: {other:?}"),
    }
    die(a).await;
    b.flush().await.expect("flush");
    die(b).await;
    assert!(log_dirs(&logs, &uuid).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_refuses_the_open_with_a_clear_error_and_moving_it_aside_opens_the_last_flush() {
    let (dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    let flushed = common::pattern(1, 8192);
    v.write(0, &flushed).await.expect("write");
    v.flush().await.expect("flush");
    v.write(0, &common::pattern(2, 4096)).await.expect("write");
    v.write(8192, &common::pattern(3, 4096)).await.expect("write");
    die(v).await;
    let log = log_dirs(&logs, &uuid).remove(0);
    let seg = largest_segment(&log);
    let mut b = std::fs::read(&seg).expect("segment");
    b[16 + 17 + 100] ^= 1; // the first entry's payload
    std::fs::write(&seg, b).expect("damage");
    let Err(e) = Volume::open(store.clone(), "v", with_log(&logs)).await else {
        panic!("a damaged log must refuse the open");
    };
    let msg = e.to_string();
    assert!(
        matches!(e, VolumeError::Corrupt(_)) && msg.contains("checksum") && msg.contains("move") && msg.contains(&uuid),
        "{msg}"
    );
    std::fs::rename(&log, dir.path().join("aside")).expect("move aside");
    let v = open_log(&store, "v", &logs).await;
    let mut want = flushed.clone();
    want.extend_from_slice(&[0u8; 4096]);
    assert_eq!(v.read(0, 12288).await.expect("read"), want, "not the last flush");
}

/// A dead writer's log whose state file cannot be read (here: it does not
/// decode) refuses the open with its path, and the start-up sweep of
/// earlier boots' logs leaves it; moved aside, the volume opens as of its
/// last flush. It was taken for a log that never got a state and thrown
/// away with its acknowledged writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_whose_state_cannot_be_read_refuses_the_open_and_is_kept() {
    let (dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    let flushed = common::pattern(1, 8192);
    v.write(0, &flushed).await.expect("write");
    v.flush().await.expect("flush");
    let unflushed = common::pattern(2, 4096);
    v.write(0, &unflushed).await.expect("write");
    die(v).await;
    let log = log_dirs(&logs, &uuid).remove(0);
    std::fs::write(log.join("state"), b"{\"volume\": 7").expect("damage the state");
    let Err(e) = Volume::open(store.clone(), "v", with_log(&logs)).await else {
        panic!("a log whose state does not read must refuse the open");
    };
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::Corrupt(_)) && msg.contains(&uuid) && msg.contains("aside"), "{msg}");
    s3blk::volume::engine::log::sweep_other_boots(&logs).expect("sweep");
    assert_eq!(log_dirs(&logs, &uuid), vec![log.clone()], "the log was thrown away");
    std::fs::rename(&log, dir.path().join("aside")).expect("move aside");
    let v = open_log(&store, "v", &logs).await;
    assert_eq!(v.read(0, 8192).await.expect("read"), flushed, "not the last flush");
}

/// What a writer leaves when an append failed and could not be cut back
/// (the log takes no more writes), a flush rotated, and the process died
/// before the flush released the torn segment: a torn entry, then empty
/// segments. The torn entry was never acknowledged; the writes before it
/// were, and the next open replays them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_entry_followed_only_by_empty_segments_is_the_logs_end() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    let a = common::pattern(1, 8192);
    let b = common::pattern(2, 4096);
    v.write(0, &a).await.expect("write");
    v.write(3 * CS as u64, &b).await.expect("write");
    die(v).await;
    let log = log_dirs(&logs, &uuid).remove(0);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&log)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seg-")))
        .collect();
    segs.sort();
    let last = segs.last().expect("a segment").clone();
    let mut bytes = std::fs::read(&last).expect("segment");
    let header = bytes[..16].to_vec();
    bytes.extend_from_slice(&[0x5a; 11]); // part of an entry header
    std::fs::write(&last, &bytes).expect("tear");
    let name = last.file_name().expect("name").to_string_lossy().into_owned();
    let digits = name.trim_start_matches("seg-");
    let next = u64::from_str_radix(digits, 16).expect("segment number") + 1;
    for k in 0..2 {
        let path = log.join(format!("seg-{:0width$x}", next + k, width = digits.len()));
        std::fs::write(path, &header).expect("empty segment");
    }
    let v = Volume::open(store.clone(), "v", with_log(&logs)).await.expect("the log's end refused as damage");
    assert!(v.log_recovery().is_some_and(|r| r.adopted), "{:?}", v.log_recovery());
    assert_eq!(v.read(0, 8192).await.expect("read"), a, "an acknowledged write was lost");
    assert_eq!(v.read(3 * CS as u64, 4096).await.expect("read"), b, "an acknowledged write was lost");
    v.flush().await.expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_past_its_limit_starts_a_flush() {
    let (_dir, store, logs, _) = volume_with_logs().await;
    let opts = OpenOptions { log_limit: 256 << 10, commit_interval: Duration::from_secs(3600), ..with_log(&logs) };
    let v = Volume::open(store.clone(), "v", opts).await.expect("open");
    let head = v.stats().head_seq;
    v.write(0, &common::pattern(1, 512 << 10)).await.expect("write");
    // Committed what the log held when it passed its limit; what was
    // written after that is less than the limit.
    let committed = common::poll_until(
        || async {
            let s = v.stats();
            s.head_seq > head && (s.dirty_chunks + s.staged_chunks) * CS as u64 <= 256 << 10
        },
        |done| *done,
    )
    .await;
    assert!(committed, "a full log did not start a flush: {:?}", v.stats());
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u64 },
    Zero { offset: u64, len: u64 },
    Flush,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![0..SIZE - 1, (0..SIZE / 4096 - 1).prop_map(|b| b * 4096)];
    prop_oneof![
        5 => (offset.clone(), 1..150_000usize, any::<u64>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (offset, 1..200_000u64).prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => Just(Op::Flush),
        2 => Just(Op::Crash),
    ]
}

async fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (_dir, store, logs, _) = volume_with_logs().await;
    let mut model = vec![0u8; SIZE as usize];
    let mut v = open_log(&store, "v", &logs).await;
    for op in ops {
        match op {
            Op::Write { offset, len, seed } => {
                let len = len.min((SIZE - offset) as usize);
                let data = common::pattern(seed, len);
                v.write(offset, &data).await.expect("write");
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::Zero { offset, len } => {
                let len = len.min(SIZE - offset);
                v.write_zeroes(offset, len).await.expect("zeroes");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Flush => v.flush().await.expect("flush"),
            Op::Crash => {
                die(v).await;
                v = open_log(&store, "v", &logs).await;
            }
        }
    }
    die(v).await;
    let v = open_log(&store, "v", &logs).await;
    prop_assert!(v.read(0, SIZE).await.expect("read") == model, "the volume differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("S3BLK_LOG_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12), ..ProptestConfig::default() })]
    /// Random writes, zeroes, flushes and crashes: after every crash the
    /// volume reads as if nothing had happened.
    #[test]
    fn crashes_anywhere_lose_no_acknowledged_write(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run_ops(ops))?;
    }
}

/// A store that plays a race: the first journal PUT it sees is preceded
/// by another writer (on another host) opening the volume, writing and
/// flushing; the next one lands, and then the proof's read fails, so the
/// opener errs right after its open record landed (as if killed there).
#[derive(Debug)]
struct RaceStore {
    phase: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl common::Around for RaceStore {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<Bytes> {
        use std::sync::atomic::Ordering::SeqCst;
        if key.contains("journal/") && self.phase.load(SeqCst) == 2 {
            return Err(s3blk::store::StoreError::Permanent("injected: the opener dies here".into()));
        }
        inner.get(key, range).await
    }
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> s3blk::store::StoreResult<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if key.contains("journal/") {
            match self.phase.load(SeqCst) {
                0 => {
                    self.phase.store(1, SeqCst);
                    let q = Volume::open(inner.clone(), "v", OpenOptions::default()).await.expect("other host");
                    q.write(0, &[2u8; 4096]).await.expect("write");
                    q.flush().await.expect("flush");
                }
                1 => {
                    let r = inner.put(key, body, mode).await;
                    self.phase.store(2, SeqCst);
                    return r;
                }
                _ => {}
            }
        }
        inner.put(key, body, mode).await
    }
}

/// A writer taking over a dead writer's log loses the race for the next
/// seq to another host's writer, lands its open record after that one's,
/// and dies: the log it took over must already be empty, or the next
/// opener here would replay the dead writer's writes over the other
/// host's flushed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_log_is_emptied_before_an_open_record_that_follows_another_writer_can_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = common::local_store(&dir.path().join("store"));
    let logs = dir.path().join("logs");
    create(&plain, "v").await;
    let v = open_log(&plain, "v", &logs).await;
    v.write(0, &[1u8; 4096]).await.expect("write");
    die(v).await;
    let racing: DynStore = common::Wrapped::new(plain.clone(), RaceStore { phase: 0.into() });
    match Volume::open(racing, "v", with_log(&logs)).await {
        Err(e) => assert!(e.to_string().contains("injected"), "{e}"),
        Ok(v) => panic!("the race was not played: {:?}", v.stats()),
    }
    let v = open_log(&plain, "v", &logs).await;
    assert_eq!(
        v.read(0, 4096).await.expect("read"),
        vec![2u8; 4096],
        "a superseded writer's log was replayed over another writer's flushed data: {:?}",
        v.log_recovery()
    );
}

/// Segments are never fsync'd: after a reboot (a node crash) a log may be
/// partly lost, or a released segment back. A log of another boot is
/// never replayed; the volume opens as of its last flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_an_earlier_boot_is_never_replayed() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    v.write(0, &[1u8; 4096]).await.expect("write");
    v.flush().await.expect("flush");
    v.write(0, &[3u8; 4096]).await.expect("write");
    die(v).await;
    let log = log_dirs(&logs, &uuid).remove(0);
    let state_path = log.join("state");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).expect("state")).expect("json");
    assert!(state["boot"].is_string(), "{state}");
    state["boot"] = serde_json::json!("an-earlier-boot");
    std::fs::write(&state_path, serde_json::to_vec(&state).expect("json")).expect("state");
    let v = open_log(&store, "v", &logs).await;
    let r = v.log_recovery().expect("a log");
    assert!(!r.adopted && r.discarded == 1, "{r:?}");
    assert_eq!(v.read(0, 4096).await.expect("read"), vec![1u8; 4096]);
}

/// A store whose first journal PUT lands, and whose next journal GET (the
/// fencing proof reading the record below) answers other bytes, as when
/// the open record landed where the journal had moved on.
#[derive(Debug)]
struct ProofStore {
    phase: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl common::Around for ProofStore {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<Bytes> {
        use std::sync::atomic::Ordering::SeqCst;
        if key.contains("journal/") && self.phase.compare_exchange(1, 2, SeqCst, SeqCst).is_ok() {
            return Ok(Bytes::from_static(b"another writer's record"));
        }
        inner.get(key, range).await
    }
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> s3blk::store::StoreResult<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let r = inner.put(key, body, mode).await;
        if key.contains("journal/") {
            let _ = self.phase.compare_exchange(0, 1, SeqCst, SeqCst);
        }
        r
    }
}

/// An open record whose fencing proof fails may have landed in a hole
/// compaction left after another writer's open (whose epoch number it
/// then shares): a log being taken over is given up, never replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_is_given_up_when_the_open_records_proof_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = common::local_store(&dir.path().join("store"));
    let logs = dir.path().join("logs");
    create(&plain, "v").await;
    let v = open_log(&plain, "v", &logs).await;
    v.write(0, &[1u8; 4096]).await.expect("write");
    die(v).await;
    let proving: DynStore = common::Wrapped::new(plain.clone(), ProofStore { phase: 0.into() });
    let v = open_log(&proving, "v", &logs).await;
    let r = v.log_recovery().expect("a log");
    assert!(!r.adopted, "a log was replayed after the open record's proof failed: {r:?}");
    assert_eq!(v.read(0, 4096).await.expect("read"), vec![0u8; 4096]);
}

/// A copy of a volume under another prefix (same uuid, same journal) is
/// opened on the host where the original's writer died: the copy does not
/// take the original's log, and does not remove it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_volume_neither_takes_nor_removes_the_originals_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(&dir.path().join("store"));
    let logs = dir.path().join("logs");
    create(&store, "v/").await;
    let v = open_log(&store, "v/", &logs).await;
    v.write(0, &[1u8; 4096]).await.expect("write");
    die(v).await;
    let from = dir.path().join("store").join("v");
    let to = dir.path().join("store").join("w");
    let out = std::process::Command::new("cp").arg("-a").arg(&from).arg(&to).output().expect("cp");
    assert!(out.status.success(), "{out:?}");
    let w = open_log(&store, "w/", &logs).await;
    let r = w.log_recovery().expect("a log");
    assert!(!r.adopted && r.discarded == 0, "{r:?}");
    assert_eq!(w.read(0, 4096).await.expect("read"), vec![0u8; 4096], "the copy replayed the original's log");
    drop(w);
    let v = open_log(&store, "v/", &logs).await;
    assert!(v.log_recovery().is_some_and(|r| r.adopted), "{:?}", v.log_recovery());
    assert_eq!(v.read(0, 4096).await.expect("read"), vec![1u8; 4096], "the original lost its log to the copy");
}

/// A volume whose volume.json carries a uuid that is not what s3blk writes
/// (it names a directory under the log root) is refused a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_uuid_never_names_a_log_directory() {
    let (dir, store, logs, _) = volume_with_logs().await;
    let key = format::meta_key("v");
    let meta = store.get(&key, None).await.expect("meta");
    let mut json: serde_json::Value = serde_json::from_slice(&meta).expect("volume.json is json");
    json["uuid"] = serde_json::json!(dir.path().join("victim").display().to_string());
    std::fs::create_dir_all(dir.path().join("victim")).expect("victim");
    store.delete(&key).await.expect("delete");
    store.put(&key, Bytes::from(serde_json::to_vec(&json).expect("json")), PutMode::IfAbsent).await.expect("put");
    match Volume::open(store.clone(), "v", with_log(&logs)).await {
        Err(e) => assert!(e.to_string().contains("malformed uuid"), "{e}"),
        Ok(_) => panic!("a malformed uuid named a log directory"),
    }
    assert!(dir.path().join("victim").exists());
}

/// The log is bounded on disk too: while the store refuses uploads (so no
/// flush can empty it), writers wait once it holds twice its limit and
/// fail with the flush's error, instead of filling the node's disk; once
/// the store is back, writes go on and the log empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_emptied_stops_growing() {
    use s3blk::store::fault::{Fault, FaultStore, Op, Rule};
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = common::local_store(&dir.path().join("store"));
    let logs = dir.path().join("logs");
    let uuid = create(&plain, "v").await;
    let fault = std::sync::Arc::new(FaultStore::new(plain.clone()));
    let store: DynStore = fault.clone();
    let limit = 64u64 << 10;
    let opts = OpenOptions { log_limit: limit, commit_interval: Duration::from_secs(3600), ..with_log(&logs) };
    let v = Volume::open(store, "v", opts).await.expect("open");
    fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("chunks/".into()),
        fault: Fault::ServerError,
        times: u64::MAX,
    });
    let log_bytes = || -> u64 {
        log_dirs(&logs, &uuid)
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    let mut failed = None;
    for i in 0..200u64 {
        let r = tokio::time::timeout(Duration::from_secs(20), v.write((i % 16) * 4096, &common::pattern(i, 4096)))
            .await
            .expect("a writer waiting for room is answered");
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("200 writes into a log that cannot be emptied all succeeded");
    assert!(log_bytes() <= 2 * limit + 4096 + 64, "the log grew to {} bytes, its limit is {limit}", log_bytes());
    assert!(matches!(e, VolumeError::Store(_)), "{e}");
    fault.clear_rules();
    v.write(0, &common::pattern(1000, 4096)).await.expect("the store is back");
    v.flush().await.expect("flush");
    assert!(log_bytes() <= 64, "the log did not empty: {} bytes", log_bytes());
}

/// A log whose older entry for a block was overwritten, and committed, by
/// a later one of the same dead writer: the replay must not commit the
/// older bytes part way (the dirty budget makes it commit as it goes),
/// which would take the block back in time for everyone, for good if the
/// replaying writer died before reaching the later entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_committing_part_way_never_takes_a_block_back() {
    use s3blk::volume::engine::log::{self, LogState, Record};
    let store: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    let uuid = create(&store, "v/").await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The dead writer: it wrote `old` then `new` to block 0 and committed
    // `new` (its flush released nothing: the log still holds both).
    let a = open_log(&store, "v/", dir.path()).await;
    let (old, new) = (vec![1u8; 4096], vec![2u8; 4096]);
    a.write(0, &new).await.expect("write");
    a.flush().await.expect("flush");
    let epoch = a.stats().epoch;
    die(a).await;
    let mut c = log::create(&dir.path().join(&uuid)).expect("create log");
    let at = format!("{}/v/", store.describe());
    let state = LogState {
        volume: uuid.clone(),
        epoch,
        next_writer: None,
        boot: log::boot_id().expect("boot id"),
        at: Some(at),
    };
    c.set_state(state).expect("state");
    let mut l = c.into_log().expect("log");
    let other = vec![3u8; 4096];
    l.append(Record::Write { offset: 0, data: &old }).expect("append");
    for chunk in 1..5u64 {
        l.append(Record::Write { offset: chunk * CS as u64, data: &other }).expect("append");
    }
    l.append(Record::Write { offset: 0, data: &new }).expect("append");
    drop(l);
    // Room for two dirty chunks: the replay commits as it goes.
    let opts = OpenOptions { dirty_limit: 2 * CS as u64, ..with_log(dir.path()) };
    let b = Volume::open(store.clone(), "v/", opts).await.expect("open");
    assert!(b.log_recovery().is_some_and(|r| r.adopted), "the log was not taken over");
    assert!(b.read(0, 4096).await.expect("read") == new, "the replaying writer reads an older write");
    // What another opener sees now (the replaying writer could die here).
    let ro = Volume::open(store.clone(), "v/", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open read-only");
    assert!(ro.read(0, 4096).await.expect("read") == new, "block 0 was committed back to an older write");
    drop(ro);
    die(b).await;
}

/// With a write-back log, a page written over bytes not in memory is kept
/// in the log only: memory (the dirty budget) holds its entry, not its
/// bytes. Reads, an inline commit, an upload, a flush that a write races
/// (its segment released while a newer page of the chunk is still dirty)
/// and a crash all give the bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_kept_in_the_log_only_take_no_memory_and_read_back_everywhere() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    // Stored bytes under the pages, so that reads and uploads merge.
    let base = common::pattern(9, SIZE as usize);
    {
        let v = open_log(&store, "v", &logs).await;
        v.write(0, &base).await.expect("write");
        v.flush().await.expect("flush");
    }
    let budget = s3blk::volume::budget::MemoryBudget::new(4 * CS as u64, 2 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), log_dir: Some(logs.clone()), ..OpenOptions::default() };
    let v = Volume::open(store.clone(), "v", opts.clone()).await.expect("open");
    let mut model = base.clone();
    let chunks = SIZE / CS as u64;
    let mut pages = 0u64;
    for c in 0..chunks {
        for page in [1u64, 2, 7] {
            let off = c * CS as u64 + page * 4096;
            let data = common::pattern(100 + c * 16 + page, 4096);
            v.write(off, &data).await.expect("write");
            model[off as usize..off as usize + 4096].copy_from_slice(&data);
            pages += 1;
        }
    }
    // 48 pages (192 KiB of data) in 16 chunks: only their entries count.
    let held = budget.dirty_bytes();
    assert!(held < pages * 4096 / 8, "{held} bytes of the dirty budget held for {pages} pages in the log");
    assert_eq!(v.read(0, SIZE).await.expect("read"), model);
    assert_eq!(v.read(4096 - 3, 10).await.expect("read"), &model[4093..4103]);
    // A flush: some chunks go inline, the others are merged and uploaded.
    v.flush().await.expect("flush");
    assert_eq!(budget.dirty_bytes(), 0);
    // A write racing a flush: the chunk stays dirty after it, its older
    // page's segment goes, and the page must come into memory first.
    let a = common::pattern(500, 4096);
    v.write(3 * 4096, &a).await.expect("write");
    model[3 * 4096..4 * 4096].copy_from_slice(&a);
    let flushing = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    let b = common::pattern(501, 4096);
    v.write(5 * 4096, &b).await.expect("write during the flush");
    model[5 * 4096..6 * 4096].copy_from_slice(&b);
    flushing.await.expect("join").expect("flush");
    assert_eq!(v.read(0, SIZE).await.expect("read"), model);
    // More pages, then the writer dies: the next one replays them.
    let c = common::pattern(502, 8192);
    v.write(9 * CS as u64 + 8192, &c).await.expect("write");
    model[9 * CS as usize + 8192..9 * CS as usize + 16384].copy_from_slice(&c);
    die(v).await;
    let v = Volume::open(store.clone(), "v", opts).await.expect("open after the crash");
    assert!(v.log_recovery().is_some_and(|r| r.adopted));
    assert_eq!(v.read(0, SIZE).await.expect("read"), model, "acknowledged writes were lost");
    v.flush().await.expect("flush");
    die(v).await;
    assert!(log_dirs(&logs, &uuid).is_empty(), "a clean close left its log");
    let ro = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open ro");
    assert_eq!(ro.read(0, SIZE).await.expect("read"), model);
}

/// A chunk written over whole, page by page, needs none of its stored
/// bytes any more: a smaller write after that must not fetch them (a
/// store that cannot give them back fails no write, and the write costs
/// no GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_written_whole_in_pages_takes_a_small_write_without_fetching_its_stored_bytes() {
    use s3blk::store::fault::{Fault, Op};
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    let rig = common::FaultRig::new();
    let store = rig.faulty();
    create(&store, "v").await;
    {
        let v = Volume::open(store.clone(), "v", OpenOptions::default()).await.expect("open");
        v.write(0, &common::pattern(1, CS as usize)).await.expect("write");
        v.flush().await.expect("flush");
    }
    let v = open_log(&store, "v", &logs).await;
    let mut model = common::pattern(2, CS as usize);
    for page in 0..CS as u64 / 4096 {
        let at = page as usize * 4096;
        v.write(page * 4096, &model[at..at + 4096]).await.expect("page write");
    }
    // The chunk's stored bytes cannot be read from now on.
    rig.rule(Some(Op::Get), "chunks/", Fault::ServerError, 1000);
    let small = common::pattern(3, 512);
    v.write(100, &small).await.expect("a small write over a chunk written whole fetched its stored bytes");
    model[100..612].copy_from_slice(&small);
    assert_eq!(v.read(0, CS as u64).await.expect("read"), model);
    v.flush().await.expect("flush");
    drop(v);
    rig.fault.clear_rules();
    let ro = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open ro");
    assert_eq!(ro.read(0, CS as u64).await.expect("read"), model);
}

/// A dead writer's log whose newest entry zeroes part of a block an
/// earlier entry wrote whole, and the replay commits part way (room for
/// two dirty chunks): every block another opener sees then is one the
/// volume held at some point, never the newest bytes of one entry beside
/// committed bytes a later entry had overwritten (simulation seed
/// 230075064934969).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_committing_part_way_never_stores_a_block_that_never_was() {
    let (_dir, store, logs, _uuid) = volume_with_logs().await;
    let opts = || OpenOptions { dirty_limit: 2 * CS as u64, ..with_log(&logs) };
    let a = Volume::open(store.clone(), "v", opts()).await.expect("open");
    const SPAN: usize = 3 * CS as usize;
    let mut model = vec![0u8; SPAN];
    // Every state of each 4 KiB block, oldest first.
    let mut states: Vec<Vec<Vec<u8>>> = (0..SPAN / 4096).map(|_| vec![vec![0u8; 4096]]).collect();
    let step = |model: &mut Vec<u8>, states: &mut Vec<Vec<Vec<u8>>>, offset: usize, len: usize, seed: Option<u64>| {
        let data = seed.map_or_else(|| vec![0u8; len], |s| common::pattern(s, len));
        model[offset..offset + len].copy_from_slice(&data);
        for b in offset / 4096..(offset + len).div_ceil(4096) {
            states[b].push(model[b * 4096..(b + 1) * 4096].to_vec());
        }
        (offset as u64, data, seed.is_none())
    };
    let writes: [&[(usize, usize, Option<u64>)]; 2] = [
        &[(65536, 65536, Some(1)), (40960, 20480, Some(2)), (159744, 20480, Some(3)), (102400, 24576, Some(4))],
        &[
            (40960, 12288, None),
            (6060, 8268, Some(6)),
            (65536, 65536, Some(7)),
            (53248, 57344, Some(8)),
            (56596, 8410, None),
        ],
    ];
    for (round, ws) in writes.iter().enumerate() {
        for &(offset, len, seed) in ws.iter() {
            let (o, d, zeros) = step(&mut model, &mut states, offset, len, seed);
            match zeros {
                true => a.write_zeroes(o, d.len() as u64).await.expect("write_zeroes"),
                false => a.write(o, &d).await.expect("write"),
            }
        }
        if round == 0 {
            a.flush().await.expect("flush");
        }
    }
    die(a).await;
    let b = Volume::open(store.clone(), "v", opts()).await.expect("open");
    assert!(b.log_recovery().is_some_and(|r| r.adopted), "the log was not taken over");
    assert!(b.read(0, SPAN as u64).await.expect("read") == model, "the replaying writer reads other bytes");
    // What another opener sees now (the replaying writer could die here).
    let ro = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open read-only");
    let got = ro.read(0, SPAN as u64).await.expect("read");
    for (b, block) in got.chunks(4096).enumerate() {
        assert!(states[b].iter().any(|s| s == block), "block {b} as committed part way was never the volume's");
    }
    drop(ro);
    b.flush().await.expect("flush");
    let ro = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open read-only");
    assert!(
        ro.read(0, SPAN as u64).await.expect("read") == model,
        "the flushed volume differs from what was acknowledged"
    );
}

/// A dead writer's log whose entries (checksums intact) name bytes past
/// the volume's end, two of them in one 4 KiB block near the end of the
/// byte space: the open refuses the log as damaged, before applying any
/// entry, rather than panic on the block arithmetic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_entry_past_the_end_of_the_byte_space_is_damage_not_a_panic() {
    let (_dir, store, logs, uuid) = volume_with_logs().await;
    let v = open_log(&store, "v", &logs).await;
    v.write(0, &common::pattern(1, 4096)).await.expect("write");
    v.flush().await.expect("flush");
    v.write(0, &common::pattern(2, 512)).await.expect("write");
    v.write(8192, &common::pattern(3, 512)).await.expect("write");
    die(v).await;
    let log = log_dirs(&logs, &uuid).remove(0);
    let seg = largest_segment(&log);
    let mut b = std::fs::read(&seg).expect("segment");
    // Entries: crc (4), kind (1), offset (8), length (4), payload; the
    // crc covers the rest of the header and the payload.
    let mut pos = 16;
    let top = u64::MAX - 4095;
    for to in [top, top + 1024] {
        let len = u32::from_le_bytes(b[pos + 13..pos + 17].try_into().expect("4 bytes")) as usize;
        assert_eq!((b[pos + 4], len), (1, 512), "not the write entry expected");
        b[pos + 5..pos + 13].copy_from_slice(&to.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[pos + 4..pos + 17]), &b[pos + 17..pos + 17 + len]);
        b[pos..pos + 4].copy_from_slice(&crc.to_le_bytes());
        pos += 17 + len;
    }
    std::fs::write(&seg, b).expect("rewrite");
    let opened = tokio::spawn({
        let (store, logs) = (store.clone(), logs.clone());
        async move { Volume::open(store, "v", with_log(&logs)).await.map(|_| ()) }
    })
    .await;
    let e = match opened {
        Err(join) => panic!("the open panicked on a log entry past the volume's end: {join}"),
        Ok(Ok(())) => panic!("a log with entries past the volume's end was replayed"),
        Ok(Err(e)) => e,
    };
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::Corrupt(_)) && msg.contains("move") && msg.contains(&uuid), "{msg}");
    // Nothing of the log was applied.
    let ro = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open read-only");
    assert_eq!(ro.read(0, 4096).await.expect("read"), common::pattern(1, 4096));
}

/// A full local disk: a write that does not fit in the write-back log
/// fails with no space (nothing is acknowledged); a flush still commits
/// every write acknowledged before it and empties the log's committed
/// segment, so writes go on. Before, the flush could not start a new
/// segment on the full disk, released nothing, and every later write
/// failed for good. Needs root, for a small tmpfs (skipped otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_until_a_flush_frees_it_and_loses_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let (dir, store, _, _) = volume_with_logs().await;
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mounted =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"]).arg(&small).status();
    assert!(mounted.is_ok_and(|s| s.success()), "mounting a tmpfs as root failed");
    let _unmount = Unmount(small.clone());
    let v = open_log(&store, "v", &small).await;
    let mut model = vec![0u8; SIZE as usize];
    let pages = SIZE / 4096;
    let mut n = 0u64;
    let write = |v: Volume, n: u64| async move {
        let off = (n % pages) * 4096;
        let data = common::pattern(n + 1, 4096);
        v.write(off, &data).await.map(|()| (off, data))
    };
    let full = loop {
        match write(v.clone(), n).await {
            Ok((off, data)) => model[off as usize..off as usize + 4096].copy_from_slice(&data),
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 4 * pages, "512 KiB of log never filled");
    };
    assert!(matches!(full, VolumeError::LocalLog { no_space: true, .. }), "{full}");
    assert!(n > 16, "only {n} writes fit");
    v.flush().await.expect("a flush on a full disk");
    // Room again: as many writes as fitted before.
    let fitted = n;
    for k in 1..=fitted {
        let (off, data) = write(v.clone(), fitted + k).await.expect("a write after the flush");
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    v.flush().await.expect("flush");
    drop(v);
    let ro = Volume::open(store.clone(), "v", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open");
    assert!(ro.read(0, SIZE).await.expect("read") == model, "acknowledged and flushed writes differ");
}
