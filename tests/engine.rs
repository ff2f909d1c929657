//! The volume engine against real stores: the local directory store and a
//! real S3 server (moto), plus the fault-injecting store for crashes and
//! retries.

#[macro_use]
mod common;

use common::FaultRig;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use s3blk::clock::ManualClock;
use s3blk::store::fault::{Fault, FaultStore, Op, Rule};
use s3blk::store::memory::MemoryStore;
use s3blk::store::retry::{RetryPolicy, RetryStore};
use s3blk::store::{self, DynStore, ObjectStore, PutMode};
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::format::{self, Checkpoint};
use s3blk::volume::{OpenOptions, Volume, VolumeError, compact, fsck, replay};

const CS: u32 = 64 << 10;

fn create_opts(size: u64) -> CreateOptions {
    CreateOptions::new(size, CS)
}

async fn create(store: &DynStore, vol: &str, size: u64) {
    Volume::create(store.clone(), vol, create_opts(size), &s3blk::clock::SystemClock).await.expect("create");
}

async fn open(store: &DynStore, vol: &str) -> Volume {
    Volume::open(store.clone(), vol, OpenOptions::default()).await.expect("open")
}

async fn open_ro(store: &DynStore, vol: &str) -> Volume {
    Volume::open(store.clone(), vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await.expect("open ro")
}

async fn assert_fsck_clean(store: &DynStore, vol: &str) {
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck ran");
    assert!(rep.clean, "fsck found damage: {:?}", rep.errors);
}

/// A fresh read-only opener reads `want` as the volume's first `len`
/// bytes, and fsck finds it clean.
async fn assert_stored(store: &DynStore, vol: &str, len: u64, want: &[u8], what: &str) {
    let got = open_ro(store, vol).await.read(0, len).await.expect("read");
    assert!(got == want, "{what}: the stored bytes differ");
    assert_fsck_clean(store, vol).await;
}

// ------------------------------------------------------------------ model

#[derive(Debug, Clone)]
enum Action {
    Write {
        off: u64,
        len: usize,
        seed: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    /// Drop the engine without flushing and open again: unflushed writes vanish.
    Reopen,
}

/// 5 whole chunks and a partial last chunk.
const MODEL_SIZE: u64 = 5 * CS as u64 + 12288;

fn offset_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..MODEL_SIZE,
        (0..6u64, -3i64..3).prop_map(|(c, d)| (c * CS as u64).saturating_add_signed(d).min(MODEL_SIZE - 1)),
    ]
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop_oneof![
        1 => (0..5u64, any::<u64>()).prop_map(|(c, seed)| Action::Write { off: c * CS as u64, len: CS as usize, seed }),
        5 => (offset_strategy(), 1usize..150_000, any::<u64>()).prop_map(|(off, len, seed)| Action::Write {
            off,
            len: len.min((MODEL_SIZE - off) as usize),
            seed
        }),
        // Whole 4 KiB pages, as filesystems write: dirty pages over an unread base.
        4 => (0..MODEL_SIZE / 4096, 1u64..40, any::<u64>()).prop_map(|(page, n, seed)| Action::Write {
            off: page * 4096,
            len: (n * 4096).min(MODEL_SIZE - page * 4096) as usize,
            seed
        }),
        1 => (0..MODEL_SIZE / 4096, 1u64..8).prop_map(|(page, n)| Action::Zero {
            off: page * 4096,
            len: (n * 4096).min(MODEL_SIZE - page * 4096)
        }),
        2 => (offset_strategy(), 1u64..200_000).prop_map(|(off, len)| Action::Zero { off, len: len.min(MODEL_SIZE - off) }),
        2 => (offset_strategy(), 1u64..200_000).prop_map(|(off, len)| Action::Read { off, len: len.min(MODEL_SIZE - off) }),
        2 => Just(Action::Flush),
        1 => Just(Action::Reopen),
    ]
}

async fn run_model(store: DynStore, actions: Vec<Action>, fold: bool) -> Result<(), TestCaseError> {
    let vol = format!("{}/", common::unique("model"));
    create(&store, &vol, MODEL_SIZE).await;
    // Small limits: background uploads and cache evictions happen mid-run,
    // so dirty pages are merged with bases fetched back from the store.
    let mut small = OpenOptions { dirty_limit: 2 * CS as u64, cache_limit: 2 * CS as u64, ..OpenOptions::default() };
    if fold {
        // Few patch bytes and a busy committer: flushes alternate between
        // inline pages and whole chunks, and folds run beside the writes.
        small.patch_limit = 6 * 4096;
        small.commit_interval = Duration::from_millis(3);
    }
    let open = |store: &DynStore, vol: &str| {
        let (store, vol, small) = (store.clone(), vol.to_string(), small.clone());
        async move { Volume::open(store, &vol, small).await.expect("open") }
    };
    let mut v = open(&store, &vol).await;
    let mut model = vec![0u8; MODEL_SIZE as usize];
    let mut durable = model.clone();
    // Writes since the last flush: the engine may commit any of them in
    // the background (a volatile cache may or may not keep what was not
    // flushed), so after a reopen each byte holds its flushed value or one
    // of these.
    let mut since_flush: Vec<(usize, Vec<u8>)> = Vec::new();
    for a in actions {
        match a {
            Action::Write { off, len, seed } => {
                let data = common::pattern(seed, len);
                // Whole-chunk writes go through the buffer-taking path; a
                // third of the others try the in-memory fast path first.
                let now = if seed % 3 == 0 { v.write_now(off, &data) } else { None };
                if let Some(r) = now {
                    r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                } else if off % CS as u64 == 0 && len == CS as usize {
                    v.write_vec(off, data.clone()).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                } else {
                    v.write(off, &data).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
                since_flush.push((off as usize, data));
            }
            Action::Zero { off, len } => {
                v.write_zeroes(off, len).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                model[off as usize..(off + len) as usize].fill(0);
                since_flush.push((off as usize, vec![0u8; len as usize]));
            }
            Action::Read { off, len } => {
                // Every read path: the in-memory fast path (when it takes
                // the read), the copying one and the shared-bytes one.
                let now = if off % 3 == 2 { v.read_now(off, len).map(|b| b.to_vec()) } else { None };
                let got = if let Some(got) = now {
                    got
                } else if off % 2 == 0 {
                    v.read(off, len).await.map_err(|e| TestCaseError::fail(e.to_string()))?
                } else {
                    v.read_bytes(off, len).await.map_err(|e| TestCaseError::fail(e.to_string()))?.to_vec()
                };
                prop_assert!(got == model[off as usize..(off + len) as usize], "read {off}+{len} differs");
            }
            Action::Flush => {
                v.flush().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                durable = model.clone();
                since_flush.clear();
            }
            Action::Reopen => {
                drop(v);
                v = open(&store, &vol).await;
                let got = v.read(0, MODEL_SIZE).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                for (i, b) in got.iter().enumerate() {
                    let written = |&(o, ref d): &(usize, Vec<u8>)| i >= o && i < o + d.len() && d[i - o] == *b;
                    prop_assert!(
                        *b == durable[i] || since_flush.iter().any(written),
                        "after reopen, byte {i} holds {b:#x}: neither flushed nor written since"
                    );
                }
                model = got.clone();
                durable = got;
                since_flush.clear();
            }
        }
    }
    let all = v.read(0, MODEL_SIZE).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(all == model, "final contents differ from the model");
    v.flush().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
    drop(v);
    let again =
        open_ro(&store, &vol).await.read(0, MODEL_SIZE).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(again == model, "contents after reopen differ from the model");
    Ok(())
}

fn model_test(store: DynStore, cases: u32, fold: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    let result = runner.run(&proptest::collection::vec(action_strategy(), 1..14), |actions| {
        rt.block_on(run_model(store.clone(), actions, fold))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn random_io_matches_model_local() {
    let dir = tempfile::tempdir().expect("tempdir");
    model_test(common::local_store(dir.path()), 48, false);
}

#[test]
fn random_io_matches_model_memory() {
    model_test(Arc::new(MemoryStore::new()), 96, false);
}

#[test]
fn random_io_matches_model_with_patches_folding_beside_it() {
    model_test(Arc::new(MemoryStore::new()), 96, true);
}

#[test]
fn random_io_matches_model_s3() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(store) = rt.block_on(common::s3_store()) else { return };
    drop(rt);
    model_test(store, 16, false);
}

// ------------------------------------------------------------------ crash consistency

/// State A: chunks 0..3 hold pattern 1. State B: chunk 0 partly rewritten,
/// chunk 1 zeroed, chunks 3 and 4 written (3 chunk uploads + 1 journal PUT).
async fn write_a(v: &Volume) {
    v.write(0, &common::pattern(1, 3 * CS as usize)).await.expect("write A");
}
async fn write_b(v: &Volume) {
    v.write(1000, &common::pattern(2, 5000)).await.expect("write B0");
    v.write_zeroes(CS as u64, CS as u64).await.expect("zero B1");
    v.write(3 * CS as u64 + 7, &common::pattern(3, CS as usize + 100)).await.expect("write B3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_is_all_or_nothing_at_every_crash_point() {
    let size = 8 * CS as u64;
    // Reference images of A and B.
    let reference = |with_b: bool| async move {
        let rig = FaultRig::new();
        create(&rig.plain(), "v/", size).await;
        let v = open(&rig.plain(), "v/").await;
        write_a(&v).await;
        if with_b {
            write_b(&v).await;
        }
        v.read(0, size).await.expect("read")
    };
    let image_a = reference(false).await;
    let image_b = reference(true).await;
    assert_ne!(image_a, image_b);

    let mut saw_ok = false;
    let mut saw_err = false;
    for crash_after in 0..=6u64 {
        let rig = FaultRig::new();
        create(&rig.plain(), "v/", size).await;
        let v = open(&rig.faulty(), "v/").await;
        write_a(&v).await;
        v.flush().await.expect("flush A");
        write_b(&v).await;
        let puts_before = rig.fault.puts_seen();
        rig.fault.crash_after_puts(crash_after);
        let result = v.flush().await;
        let journal_put_reached = rig.fault.puts_seen() - puts_before >= 4;
        drop(v);
        // "Restart": a new engine on the store as the crash left it.
        let after = open_ro(&rig.plain(), "v/").await.read(0, size).await.expect("read after crash");
        match &result {
            Ok(()) => {
                saw_ok = true;
                assert!(after == image_b, "crash after {crash_after} puts: flush acknowledged but B not durable");
            }
            Err(e) => {
                saw_err = true;
                assert!(after == image_a || after == image_b, "crash after {crash_after} puts: torn volume ({e})");
                if !journal_put_reached {
                    assert!(after == image_a, "crash before the journal PUT must leave A");
                }
            }
        }
        assert_fsck_clean(&rig.plain(), "v/").await;
        // A new writer takes over cleanly and can commit.
        let w = open(&rig.plain(), "v/").await;
        w.write(0, b"after").await.expect("write after crash");
        w.flush().await.expect("flush after crash");
    }
    assert!(saw_ok && saw_err, "the crash points must cover both outcomes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_background_uploads_leaves_last_flush() {
    let rig = FaultRig::new();
    let size = 32 * CS as u64;
    create(&rig.plain(), "v/", size).await;
    let opts = OpenOptions { dirty_limit: 2 * CS as u64, ..OpenOptions::default() };
    let v = Volume::open(rig.faulty(), "v/", opts).await.expect("open");
    write_a(&v).await;
    v.flush().await.expect("flush A");
    let image_a = v.read(0, size).await.expect("read");
    rig.fault.crash_after_puts(3);
    // Past the dirty limit the writer waits for background uploads, which
    // hit the crash; writes then fail instead of growing memory.
    let mut failed = false;
    for i in 0..20u64 {
        if v.write(i * CS as u64, &common::pattern(i + 10, CS as usize)).await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "writes must fail once uploads cannot proceed");
    drop(v);
    // Background uploads may have been committed before the crash: each
    // chunk holds what the flush left or what was written to it since.
    let after = open_ro(&rig.plain(), "v/").await.read(0, size).await.expect("read");
    let cs = CS as usize;
    for c in 0..32usize {
        let got = &after[c * cs..(c + 1) * cs];
        let newer = common::pattern(c as u64 + 10, cs);
        assert!(got == &image_a[c * cs..(c + 1) * cs] || (c < 20 && got == newer.as_slice()), "chunk {c}");
    }
    assert_fsck_clean(&rig.plain(), "v/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_journal_response_is_recognised_as_own_commit() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 8 * CS as u64).await;
    let clock = Arc::new(ManualClock::new(0));
    let retrying: DynStore =
        Arc::new(RetryStore::with_clock(rig.faulty(), common::fast_policy(), clock.clone(), Arc::new(|d| d)));
    let v = open(&retrying, "v/").await;
    v.write(0, &common::pattern(5, 10_000)).await.expect("write");
    rig.fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("journal/".into()),
        fault: Fault::LostResponse,
        times: 1,
    });
    v.flush().await.expect("the retried PUT answers 412 and must be recognised as ours");
    assert_eq!(clock.sleeps().len(), 1);
    drop(v);
    let got = open_ro(&rig.plain(), "v/").await.read(0, 10_000).await.expect("read");
    assert_eq!(got, common::pattern(5, 10_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_commit_is_resolved_by_the_next_flush() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 8 * CS as u64).await;
    // No retry layer: the lost response surfaces as an error.
    let v = open(&rig.faulty(), "v/").await;
    v.write(0, &common::pattern(6, 1000)).await.expect("write");
    rig.fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("journal/".into()),
        fault: Fault::LostResponse,
        times: 1,
    });
    assert!(v.flush().await.is_err());
    v.write(CS as u64, &common::pattern(7, 1000)).await.expect("write 2");
    v.flush().await.expect("next flush resolves the uncertain commit and commits on top");
    drop(v);
    let r = open_ro(&rig.plain(), "v/").await;
    assert_eq!(r.read(0, 1000).await.expect("read"), common::pattern(6, 1000));
    assert_eq!(r.read(CS as u64, 1000).await.expect("read"), common::pattern(7, 1000));
    assert_fsck_clean(&rig.plain(), "v/").await;
}

// ------------------------------------------------------------------ fencing

async fn stale_writer_is_fenced(store: DynStore) {
    let vol = format!("{}/", common::unique("fence"));
    create(&store, &vol, 8 * CS as u64).await;
    let a = open(&store, &vol).await;
    a.write(0, b"from the stale writer").await.expect("a write");
    let b = open(&store, &vol).await;
    b.write(0, b"from the live writer!").await.expect("b write");
    b.flush().await.expect("b flush");
    match a.flush().await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("stale flush must be fenced, got {other:?}"),
    }
    assert!(matches!(a.write(0, b"x").await, Err(VolumeError::Fenced(_))));
    assert!(matches!(a.flush().await, Err(VolumeError::Fenced(_))));
    // Nor does it answer reads from its memory, which holds writes that
    // will never be committed (both the fast and the normal read path).
    assert!(a.read_now(0, 21).is_none(), "a fenced writer answered a read from memory");
    match a.read(0, 21).await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("a fenced writer must refuse reads, got {other:?}"),
    }
    // The NBD server's read path.
    match a.read_bytes(0, 21).await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("a fenced writer must refuse reads (read_bytes), got {other:?}"),
    }
    b.write(100, b"still live").await.expect("b write 2");
    b.flush().await.expect("b flush 2");
    drop((a, b));
    let r = open_ro(&store, &vol).await;
    assert_eq!(r.read(0, 21).await.expect("read"), b"from the live writer!");
    assert_eq!(r.read(100, 10).await.expect("read"), b"still live");
    assert_fsck_clean(&store, &vol).await;
}
on_both_stores!(stale_writer_is_fenced);

/// A writer asleep through a takeover and a fold: its next record lands
/// in the hole the fold left, and the fencing proof catches it. (The fold
/// here deletes at once; real compaction folds nothing younger than its
/// safety age, so the writer's clock is moved past that: a writer whose
/// previous record is recent proves its next by the append alone, see
/// `a_flush_soon_after_the_last_costs_no_proof_get`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_writer_cannot_commit_into_a_compacted_journal() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 8 * CS as u64).await;
    let clock = Arc::new(ManualClock::new(1_700_000_000));
    let a = Volume::open(store.clone(), "v/", OpenOptions { clock: clock.clone(), ..OpenOptions::default() })
        .await
        .expect("open a");
    let b = open(&store, "v/").await;
    b.write(0, b"live").await.expect("write");
    b.flush().await.expect("flush");
    // Compaction: checkpoint at the head, then delete the folded records below it.
    let st = replay::replay(store.as_ref(), "v/", CS as u64, None).await.expect("replay");
    let cp =
        Checkpoint { seq: st.head, epoch: st.epoch, size: st.size, map: st.map.clone(), patches: st.patches.clone() };
    store
        .put(&format::checkpoint_key("v/", st.head), Bytes::from(cp.encode()), PutMode::Overwrite)
        .await
        .expect("put cp");
    for seq in 0..st.head {
        store.delete(&format::journal_key("v/", seq)).await.expect("delete");
    }
    clock.advance(compact::MIN_LIVE_SAFETY_AGE.as_secs() as i64);
    a.write(0, b"dead").await.expect("a write");
    assert!(matches!(a.flush().await, Err(VolumeError::Fenced(_))), "the stale writer must learn it lost");
    let r = open_ro(&store, "v/").await;
    assert_eq!(r.read(0, 4).await.expect("read"), b"live");
}

/// A flush soon after the writer's previous record costs the append
/// alone: a record another writer could have left there was created after
/// ours below it, and compaction folds nothing that young, so no hole can
/// have been under our append. Once the previous record is older than the
/// proof window, the proof reads the record below again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_soon_after_the_last_costs_no_proof_get() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 8 * CS as u64).await;
    let fault = Arc::new(FaultStore::new(mem.clone()));
    let store: DynStore = fault.clone();
    let clock = Arc::new(ManualClock::new(1_700_000_000));
    let v = Volume::open(store.clone(), "v/", OpenOptions { clock: clock.clone(), ..OpenOptions::default() })
        .await
        .expect("open");
    for i in 0..5u64 {
        let (puts, gets) = (fault.puts_seen(), fault.gets_seen());
        v.write(i * CS as u64, &common::pattern(i, 4096)).await.expect("write");
        v.flush().await.expect("flush");
        assert_eq!((fault.puts_seen() - puts, fault.gets_seen() - gets), (1, 0), "flush {i}: one PUT, no GET");
    }
    clock.advance(61);
    let gets = fault.gets_seen();
    v.write(0, b"later").await.expect("write");
    v.flush().await.expect("flush");
    assert_eq!(fault.gets_seen() - gets, 1, "a flush long after the last proves with a GET");
    drop(v);
    let r = open_ro(&mem, "v/").await;
    assert_eq!(r.read(0, 5).await.expect("read"), b"later");
    assert_eq!(r.read(4 * CS as u64, 4096).await.expect("read"), common::pattern(4, 4096));
}

// ------------------------------------------------------------------ retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_within_budget() {
    let mem = Arc::new(MemoryStore::new());
    let fault = Arc::new(FaultStore::new(mem.clone()));
    let clock = Arc::new(ManualClock::new(0));
    let policy = RetryPolicy { attempt_timeout: Duration::from_millis(300), ..common::fast_policy() };
    let store: DynStore = Arc::new(RetryStore::with_clock(fault.clone(), policy, clock.clone(), Arc::new(|d| d)));
    create(&store, "v/", 16 * CS as u64).await;
    let v = open(&store, "v/").await;
    let data = common::pattern(9, 4 * CS as usize);
    v.write(0, &data).await.expect("write");
    let rules = [
        (Op::Put, "chunks/", Fault::ServerError, 2),
        (Op::Put, "chunks/", Fault::SlowDown, 2),
        (Op::Put, "chunks/", Fault::Reset, 1),
        (Op::Put, "journal/", Fault::SlowDown, 2),
        (Op::Put, "journal/", Fault::Hang, 1),
    ];
    for (op, key, f, times) in rules {
        fault.add_rule(Rule { op: Some(op), key_contains: Some(key.into()), fault: f, times });
    }
    v.flush().await.expect("flush must succeed within the retry budget");
    assert_eq!(clock.sleeps().len(), 8, "one backoff per injected fault");
    drop(v);
    fault.add_rule(Rule { op: Some(Op::Get), key_contains: Some("journal/".into()), fault: Fault::Reset, times: 1 });
    let r = open_ro(&store, "v/").await;
    assert_eq!(clock.sleeps().len(), 9, "a journal read is retried too");
    fault.add_rule(Rule {
        op: Some(Op::Get),
        key_contains: Some("chunks/".into()),
        fault: Fault::ServerError,
        times: 3,
    });
    fault.add_rule(Rule { op: Some(Op::Get), key_contains: Some("chunks/".into()), fault: Fault::Hang, times: 1 });
    assert!(r.read(0, data.len() as u64).await.expect("read") == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_clearly_and_the_volume_recovers() {
    let mem = Arc::new(MemoryStore::new());
    let fault = Arc::new(FaultStore::new(mem.clone()));
    let clock = Arc::new(ManualClock::new(0));
    let store: DynStore =
        Arc::new(RetryStore::with_clock(fault.clone(), common::fast_policy(), clock.clone(), Arc::new(|d| d)));
    create(&store, "v/", 16 * CS as u64).await;
    let v = open(&store, "v/").await;
    // One chunk: a single upload, so the recorded backoffs form one sequence.
    let data = common::pattern(11, CS as usize);
    v.write(0, &data).await.expect("write");
    fault.add_rule(Rule { op: Some(Op::Put), key_contains: None, fault: Fault::SlowDown, times: 1000 });
    let err = v.flush().await.expect_err("S3 is down: flush must fail");
    let msg = err.to_string();
    assert!(msg.contains("gave up after 6 attempts") && msg.contains("SlowDown"), "unclear error: {msg}");
    // Exponential backoff, capped.
    let sleeps = clock.sleeps();
    let ms: Vec<u64> = sleeps.iter().map(|d| d.as_millis() as u64).collect();
    assert_eq!(ms, vec![5, 10, 20, 40, 50]);
    assert!(sleeps.iter().all(|d| *d <= Duration::from_millis(50)));
    // S3 comes back: the same engine commits everything, nothing was lost.
    fault.clear_rules();
    v.flush().await.expect("flush after recovery");
    drop(v);
    assert!(open_ro(&store, "v/").await.read(0, data.len() as u64).await.expect("read") == data);
}

#[test]
fn backoff_caps_grow_exponentially_to_the_maximum() {
    let p = RetryPolicy {
        max_attempts: 10,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(1),
    };
    let caps: Vec<u128> = (0..6).map(|r| p.delay_cap(r).as_millis()).collect();
    assert_eq!(caps, vec![100, 200, 400, 800, 1000, 1000]);
    assert_eq!(p.delay_cap(1000), Duration::from_secs(1));
    let jitter = s3blk::store::retry::full_jitter();
    for _ in 0..100 {
        assert!(jitter(Duration::from_millis(100)) <= Duration::from_millis(100));
    }
}

// ------------------------------------------------------------------ bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_objects_give_clear_errors() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    create(&store, "v/", 8 * CS as u64).await;
    let v = open(&store, "v/").await;
    v.write(0, &common::pattern(1, 2 * CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let expect_corrupt = |r: Result<Volume, VolumeError>, what: &str| match r {
        Err(VolumeError::Corrupt(m)) => assert!(m.contains(what), "error {m:?} does not name {what}"),
        Err(e) => panic!("expected a corruption error naming {what}, got {e}"),
        Ok(_) => panic!("damaged {what} was accepted"),
    };
    // volume.json: garbage, truncated, impossible fields.
    let good_meta = mem.get("v/volume.json", None).await.expect("meta");
    for bad in [&b"not json"[..], &good_meta[..good_meta.len() / 2], &b"{\"format_version\":1}"[..]] {
        mem.tamper("v/volume.json", Bytes::copy_from_slice(bad));
        expect_corrupt(Volume::open(store.clone(), "v/", OpenOptions::default()).await, "volume.json");
    }
    let mut meta: serde_json::Value = serde_json::from_slice(&good_meta).expect("json");
    meta["chunk_size"] = 12345.into();
    mem.tamper("v/volume.json", Bytes::from(serde_json::to_vec(&meta).expect("json")));
    expect_corrupt(Volume::open(store.clone(), "v/", OpenOptions::default()).await, "chunk size");
    mem.tamper("v/volume.json", good_meta);

    // A journal record: flipped byte, truncated, missing.
    let jkey = format::journal_key("v/", 2);
    let good_rec = mem.get(&jkey, None).await.expect("record");
    let mut flipped = good_rec.to_vec();
    flipped[30] ^= 0x40;
    mem.tamper(&jkey, Bytes::from(flipped));
    expect_corrupt(Volume::open(store.clone(), "v/", OpenOptions::default()).await, "checksum");
    mem.tamper(&jkey, good_rec.slice(..good_rec.len() - 7));
    expect_corrupt(Volume::open(store.clone(), "v/", OpenOptions::default()).await, "journal");
    mem.tamper(&jkey, good_rec);
    // A record in the middle (the newest one missing is indistinguishable
    // from a shorter history, which is why records are never deleted above
    // a checkpoint).
    let middle = format::journal_key("v/", 1);
    let middle_rec = mem.get(&middle, None).await.expect("record");
    mem.delete(&middle).await.expect("delete");
    expect_corrupt(Volume::open(store.clone(), "v/", OpenOptions::default()).await, "missing");
    mem.tamper(&middle, middle_rec);

    // A chunk: bytes changed under the same name, or truncated.
    let chunk = store::list_all(mem.as_ref(), "v/chunks/0000000000000000/").await.expect("list")[0].key.clone();
    let good_chunk = mem.get(&chunk, None).await.expect("chunk");
    let mut bad = good_chunk.to_vec();
    bad[777] ^= 1;
    mem.tamper(&chunk, Bytes::from(bad));
    let r = open_ro(&store, "v/").await;
    match r.read(0, 4096).await {
        Err(VolumeError::Corrupt(m)) => assert!(m.contains("checksum"), "{m}"),
        other => panic!("checksum mismatch not detected: {other:?}"),
    }
    let rep = fsck::fsck(store.as_ref(), "v/", true, &|_, _| {}).await.expect("fsck");
    assert!(!rep.clean && rep.errors.iter().any(|e| e.contains("checksum")), "{:?}", rep.errors);
    mem.tamper(&chunk, good_chunk.slice(..1000));
    let r = open_ro(&store, "v/").await;
    assert!(matches!(r.read(0, 10).await, Err(VolumeError::Corrupt(m)) if m.contains("1000 bytes")));
    mem.tamper(&chunk, good_chunk);
    assert_fsck_clean(&store, "v/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_io_is_refused_and_changes_nothing() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let size = 4 * CS as u64;
    create(&store, "v/", size).await;
    let v = open(&store, "v/").await;
    let oor = |r: Result<(), VolumeError>| assert!(matches!(r, Err(VolumeError::OutOfRange { .. })), "{r:?}");
    oor(v.write(size - 1, b"ab").await);
    oor(v.write(u64::MAX - 1, b"ab").await);
    oor(v.write_zeroes(size, 1).await);
    oor(v.write_zeroes(1, u64::MAX).await);
    assert!(matches!(v.read(size, 1).await, Err(VolumeError::OutOfRange { .. })));
    assert!(matches!(v.read(u64::MAX, 2).await, Err(VolumeError::OutOfRange { .. })));
    assert_eq!(v.stats().dirty_chunks, 0);
    v.write(size - 1, b"z").await.expect("last byte is writable");
    assert!(matches!(v.resize(size - 4096).await, Err(VolumeError::InvalidArgument(_))));
    assert!(matches!(v.resize(size + 1).await, Err(VolumeError::InvalidArgument(_))));
}

// ------------------------------------------------------------------ sparseness

async fn sparse_volumes_cost_a_handful_of_objects(store: DynStore) {
    let vol = format!("{}/", common::unique("sparse"));
    let tib = 1u64 << 40;
    Volume::create(store.clone(), &vol, CreateOptions::new(tib, 1 << 20), &s3blk::clock::SystemClock)
        .await
        .expect("create");
    let v = open(&store, &vol).await;
    let objects = store::list_all(store.as_ref(), &vol).await.expect("list");
    assert!(objects.len() <= 3, "a new 1 TiB volume has {} objects: {objects:?}", objects.len());
    // Zeros written as data, as WRITE_ZEROES, anywhere: no chunk objects.
    v.write(0, &vec![0u8; 3 << 20]).await.expect("write zeros");
    v.write_zeroes(tib - (8 << 20), 8 << 20).await.expect("write_zeroes");
    v.write(500 << 30, &vec![0u8; 4096]).await.expect("write zeros");
    v.flush().await.expect("flush");
    let chunks = store::list_all(store.as_ref(), &format::chunk_prefix(&vol)).await.expect("list");
    assert!(chunks.is_empty(), "zeros created chunk objects: {chunks:?}");
    // Trimming written data releases its chunk from the map.
    assert_eq!(v.stats().patched_chunks, 0, "zero pages over zeros were kept as a patch");
    // A small write goes inline (a patch, no object); a big one is stored.
    v.write(1 << 30, b"data").await.expect("write");
    v.write(2 << 30, &[7u8; 1 << 19]).await.expect("write");
    v.flush().await.expect("flush");
    let s = v.stats();
    assert_eq!((s.stored_chunks, s.patched_chunks), (1, 1));
    v.write_zeroes(1 << 30, 1 << 20).await.expect("trim");
    v.write_zeroes(2 << 30, 1 << 20).await.expect("trim");
    v.flush().await.expect("flush");
    let s = v.stats();
    assert_eq!((s.stored_chunks, s.patched_chunks), (0, 0), "trimmed chunks are still held");
    assert_eq!(v.read(1 << 30, 4).await.expect("read"), vec![0; 4]);
    let total = store::list_all(store.as_ref(), &vol).await.expect("list").len();
    assert!(total <= 10, "{total} objects after a few small commits");
}
on_both_stores!(sparse_volumes_cost_a_handful_of_objects);

// ------------------------------------------------------------------ snapshots, resize, concurrency

async fn snapshots_pin_state_and_resize_grows(store: DynStore) {
    let vol = format!("{}/", common::unique("snap"));
    let size = 6 * CS as u64;
    create(&store, &vol, size).await;
    let v = open(&store, &vol).await;
    v.write(10, b"before snapshot").await.expect("write");
    let rec = v.snapshot("s1").await.expect("snapshot");
    assert!(matches!(v.snapshot("bad/name").await, Err(VolumeError::InvalidArgument(_))));
    v.write(10, b"AFTER  snapshot").await.expect("write");
    v.resize(size * 2).await.expect("grow");
    v.write(size * 2 - 5, b"tail!").await.expect("write in the new space");
    v.flush().await.expect("flush");
    let snap = Volume::open(store.clone(), &vol, OpenOptions { snapshot: Some("s1".into()), ..OpenOptions::default() })
        .await
        .expect("open snapshot");
    assert_eq!(snap.size(), rec.size);
    assert_eq!(snap.read(10, 15).await.expect("read"), b"before snapshot");
    assert!(snap.write(0, b"x").await.is_err(), "snapshots are read-only");
    drop(v);
    let head = open_ro(&store, &vol).await;
    assert_eq!(head.size(), size * 2);
    assert_eq!(head.read(10, 15).await.expect("read"), b"AFTER  snapshot");
    assert_eq!(head.read(size * 2 - 5, 5).await.expect("read"), b"tail!");
    assert_eq!(head.read(size, 4096).await.expect("read"), vec![0; 4096], "grown space reads zeros");
    assert_fsck_clean(&store, &vol).await;
}
on_both_stores!(snapshots_pin_state_and_resize_grows);

async fn concurrent_requests_do_not_interfere(store: DynStore) {
    let vol = format!("{}/", common::unique("conc"));
    let size = 16 * CS as u64;
    create(&store, &vol, size).await;
    let v = open(&store, &vol).await;
    // 48 disjoint, unaligned ranges, several per chunk, written concurrently
    // with reads and flushes.
    let region = size / 48;
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            let off = i * region + 3;
            let data = common::pattern(i, (region - 7) as usize);
            v.write(off, &data).await.expect("write");
            if i % 8 == 0 {
                v.flush().await.expect("flush");
            }
            assert_eq!(v.read(off, data.len() as u64).await.expect("read"), data);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    v.flush().await.expect("flush");
    drop(v);
    let r = open_ro(&store, &vol).await;
    for i in 0..48u64 {
        let data = common::pattern(i, (region - 7) as usize);
        assert_eq!(r.read(i * region + 3, data.len() as u64).await.expect("read"), data, "range {i}");
    }
    assert_fsck_clean(&store, &vol).await;
}
on_both_stores!(concurrent_requests_do_not_interfere);

async fn volume_opens_from_a_checkpoint(store: DynStore) {
    let vol = format!("{}/", common::unique("cp"));
    create(&store, &vol, 8 * CS as u64).await;
    let v = open(&store, &vol).await;
    v.write(0, &common::pattern(1, 3 * CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    let st = replay::replay(store.as_ref(), &vol, CS as u64, None).await.expect("replay");
    let cp =
        Checkpoint { seq: st.head, epoch: st.epoch, size: st.size, map: st.map.clone(), patches: st.patches.clone() };
    store.put(&format::checkpoint_key(&vol, st.head), Bytes::from(cp.encode()), PutMode::IfAbsent).await.expect("cp");
    for seq in 0..st.head {
        store.delete(&format::journal_key(&vol, seq)).await.expect("delete");
    }
    v.write(CS as u64 * 5, b"after the checkpoint").await.expect("write");
    v.flush().await.expect("flush after checkpoint");
    drop(v);
    let r = open_ro(&store, &vol).await;
    assert_eq!(r.read(0, 3 * CS as u64).await.expect("read"), common::pattern(1, 3 * CS as usize));
    assert_eq!(r.read(CS as u64 * 5, 20).await.expect("read"), b"after the checkpoint");
    assert_fsck_clean(&store, &vol).await;
}
on_both_stores!(volume_opens_from_a_checkpoint);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_twice_is_refused() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 1 << 20).await;
    let again = Volume::create(store.clone(), "v/", create_opts(1 << 20), &s3blk::clock::SystemClock).await;
    assert!(matches!(again, Err(VolumeError::AlreadyExists(_))), "{again:?}");
    assert!(matches!(
        Volume::open(store.clone(), "nope/", OpenOptions::default()).await,
        Err(VolumeError::NotFound(_))
    ));
}

/// A deleted volume kept only for a clone that reads through it takes no
/// writer: writes acknowledged into it would vanish when the clone goes
/// and the reaper finishes the delete. Reading it stays possible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_volume_kept_for_its_clones_takes_no_writer() {
    use s3blk::volume::catalog;
    let store: DynStore = Arc::new(MemoryStore::new());
    let clock = s3blk::clock::SystemClock;
    create(&store, "parent/", 4 * CS as u64).await;
    let v = open(&store, "parent/").await;
    v.write(0, &[7u8; 4096]).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    catalog::clone_volume(&store, "parent/", None, "child/", "child", None, &clock).await.expect("clone");
    let out = catalog::delete_volume(&store, "parent/", catalog::OnDependants::Keep, &clock).await.expect("delete");
    assert!(matches!(out, catalog::DeleteOutcome::Kept), "{out:?}");
    match Volume::open(store.clone(), "parent/", OpenOptions::default()).await {
        Err(VolumeError::NotFound(msg)) => {
            assert!(msg.contains("deleted: its objects are kept") && msg.contains("not written"), "{msg}")
        }
        other => panic!("a writer opened a deleted volume: {:?}", other.map(|_| ())),
    }
    let ro = open_ro(&store, "parent/").await;
    assert_eq!(ro.read(0, 4096).await.expect("read")[..], [7u8; 4096][..]);
    let child = open(&store, "child/").await;
    assert_eq!(child.read(0, 4096).await.expect("read child")[..], [7u8; 4096][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_fencing_and_an_unreachable_store() {
    let rig = FaultRig::new();
    create(&rig.plain(), "v/", 4 * CS as u64).await;
    let v = open(&rig.faulty(), "v/").await;
    assert_eq!(v.health(Duration::from_secs(5)).await, None);
    rig.fault.add_rule(Rule { op: Some(Op::Head), key_contains: None, fault: Fault::Hang, times: 1 });
    let slow = v.health(Duration::from_millis(100)).await.expect("a hung store is unhealthy");
    assert!(slow.contains("did not answer"), "{slow}");
    rig.fault.crash_after_puts(0);
    let _ = v.write(0, b"x").await;
    let _ = v.flush().await;
    let down = v.health(Duration::from_secs(5)).await.expect("an unreachable store is unhealthy");
    assert!(down.contains("store unreachable"), "{down}");
    let w = open(&rig.plain(), "v/").await;
    w.write(0, b"new writer").await.expect("write");
    w.flush().await.expect("flush");
    // A newer writer opens: w's next flush finds itself fenced, and says so.
    let _newer = open(&rig.plain(), "v/").await;
    w.write(0, b"stale").await.expect("buffered");
    assert!(w.flush().await.is_err());
    let fenced = w.health(Duration::from_secs(5)).await.expect("a fenced writer is unhealthy");
    assert!(fenced.starts_with("fenced"), "{fenced}");
}

// ------------------------------------------------------------- compaction

async fn keys(store: &DynStore, prefix: &str) -> Vec<String> {
    store::list_all(store.as_ref(), prefix).await.expect("list").into_iter().map(|o| o.key).collect()
}

/// Compaction options under which every object the test wrote is past the
/// safety age (ages are measured on the store's clock).
fn eager() -> compact::CompactOptions {
    compact::CompactOptions { safety_age: Duration::ZERO, ..compact::CompactOptions::default() }
}

/// A clock an hour ahead (dry runs, which write nothing, age objects on it).
fn later() -> ManualClock {
    ManualClock::new(s3blk::clock::Clock::now_unix(&s3blk::clock::SystemClock) + 3600)
}

async fn compaction_folds_the_journal_and_collects_garbage(store: DynStore) {
    let vol = format!("{}/", common::unique("compact"));
    create(&store, &vol, 8 * CS as u64).await;
    let v = open(&store, &vol).await;
    let cs = CS as usize;
    let mut model = vec![0u8; 8 * cs];
    let put = |model: &mut Vec<u8>, chunk: usize, seed: u64| {
        let data = common::pattern(seed, cs);
        model[chunk * cs..(chunk + 1) * cs].copy_from_slice(&data);
        data
    };
    for c in 0..4 {
        let d = put(&mut model, c, 10 + c as u64);
        v.write(c as u64 * CS as u64, &d).await.expect("write A");
    }
    v.flush().await.expect("flush A");
    let at_snapshot = model.clone();
    v.snapshot("s1").await.expect("snapshot");
    for c in 0..3 {
        let d = put(&mut model, c, 20 + c as u64);
        v.write(c as u64 * CS as u64, &d).await.expect("write B");
    }
    v.flush().await.expect("flush B");
    let d = put(&mut model, 1, 30);
    v.write(CS as u64, &d).await.expect("write C");
    v.write_zeroes(3 * CS as u64, CS as u64).await.expect("zero chunk 3");
    model[3 * cs..4 * cs].fill(0);
    v.flush().await.expect("flush C");
    let records_before = keys(&store, &format::journal_prefix(&vol)).await.len();

    let opts = eager();
    let rep = compact::compact(&store, &vol, &opts, &s3blk::clock::SystemClock).await.expect("compact");
    // Chunk 1's B generation is the only one neither the head nor s1 needs.
    assert_eq!(rep.chunks_deleted, 1, "{rep:?}");
    assert_eq!(rep.folded_seq, Some(rep.head_seq), "{rep:?}");
    assert_eq!(rep.journal_records_deleted as usize, records_before - 1, "{rep:?}");
    assert_eq!(keys(&store, &format::journal_prefix(&vol)).await.len(), 1, "only the head record stays");
    assert!(!keys(&store, &format::checkpoint_prefix(&vol)).await.is_empty());
    let rep = fsck::fsck(store.as_ref(), &vol, true, &|_, _| {}).await.expect("fsck");
    assert!(rep.clean && rep.garbage_chunks == 0, "{rep:?}");

    // The live writer keeps committing after the journal under it was folded.
    let d = put(&mut model, 5, 40);
    v.write(5 * CS as u64, &d).await.expect("write after compaction");
    v.flush().await.expect("flush after compaction");
    drop(v);
    assert_eq!(open_ro(&store, &vol).await.read(0, 8 * CS as u64).await.expect("read"), model);
    let snap = Volume::open(store.clone(), &vol, OpenOptions { snapshot: Some("s1".into()), ..OpenOptions::default() })
        .await
        .expect("open snapshot");
    assert_eq!(snap.read(0, 8 * CS as u64).await.expect("read snapshot"), at_snapshot);

    // Once the snapshot is gone, the generations only it pinned go too.
    store.delete(&format::snapshot_key(&vol, "s1")).await.expect("delete snapshot");
    let rep = compact::compact(&store, &vol, &opts, &s3blk::clock::SystemClock).await.expect("compact again");
    assert_eq!(rep.chunks_deleted, 4, "A generations of chunks 0-3: {rep:?}");
    assert_eq!(keys(&store, &format::chunk_prefix(&vol)).await.len(), 4, "chunks 0, 1, 2 and 5 remain");
    assert_fsck_clean(&store, &vol).await;
    assert_eq!(open_ro(&store, &vol).await.read(0, 8 * CS as u64).await.expect("read"), model);
}
on_both_stores!(compaction_folds_the_journal_and_collects_garbage);

/// A stage's mkfs mark (`formatting.json`) left on a volume lets a later
/// stage format the volume when it finds no filesystem: fsck says so, and
/// a volume delete takes the mark with the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_mkfs_mark_is_reported_by_fsck_and_deleted_with_the_volume() {
    use s3blk::volume::catalog::{self, OnDependants};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "marked/";
    create(&store, vol, 4 * CS as u64).await;
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck");
    assert!(rep.clean && rep.warnings.is_empty(), "{rep:?}");
    let mark = format!("{vol}{}", catalog::FORMATTING);
    store
        .put(&mark, Bytes::from_static(b"{\"node\":\"n1\",\"started_unix\":1}"), PutMode::Overwrite)
        .await
        .expect("put");
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck");
    assert!(rep.clean, "{rep:?}");
    assert!(rep.warnings.iter().any(|w| w.contains("formatting.json is left")), "{:?}", rep.warnings);
    catalog::delete_volume(&store, vol, OnDependants::RefuseClones, &s3blk::clock::SystemClock).await.expect("delete");
    assert!(keys(&store, vol).await.is_empty(), "{:?}", keys(&store, vol).await);
}

/// Names s3blk writes hold numbers in lowercase hex of a fixed width; an
/// object that differs only in case (another program's, or a hand-made
/// copy) is not the journal record, checkpoint or chunk it resembles, and
/// compaction, which deletes what it folded or what nothing needs, leaves
/// it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_leaves_names_like_its_own_in_uppercase_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "upper/";
    create(&store, vol, 4 * CS as u64).await;
    let v = open(&store, vol).await;
    for seed in 0..14 {
        v.write(0, &common::pattern(seed, CS as usize)).await.expect("write");
        v.flush().await.expect("flush");
    }
    drop(v);
    let foreign = [
        format!("{vol}journal/{:020X}", 0xa),
        format!("{vol}checkpoints/{:020X}", 0xa),
        format!("{vol}checkpoints/{:020X}.{:016x}.{:06x}", 0xb, 1, 0),
        format!("{vol}chunks/{:016x}/{:016X}", 0, 0xab),
    ];
    for k in &foreign {
        store.put(k, Bytes::from_static(b"not s3blk's"), PutMode::Overwrite).await.expect("put");
    }
    let rep = compact::compact(&store, vol, &eager(), &s3blk::clock::SystemClock).await.expect("compact");
    assert!(rep.journal_records_deleted > 0 && rep.chunks_deleted > 0, "compaction did nothing: {rep:?}");
    let left = keys(&store, vol).await;
    for k in &foreign {
        assert!(left.contains(k), "compaction deleted {k}, which s3blk did not write");
    }
    assert_eq!(open_ro(&store, vol).await.read(0, CS as u64).await.expect("read"), common::pattern(13, CS as usize));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_leaves_young_objects_and_dry_runs_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "young/";
    create(&store, vol, 4 * CS as u64).await;
    let v = open(&store, vol).await;
    for seed in 0..3 {
        v.write(0, &common::pattern(seed, CS as usize)).await.expect("write");
        v.flush().await.expect("flush");
    }
    let before = keys(&store, "").await;
    let dry = compact::CompactOptions { dry_run: true, ..compact::CompactOptions::default() };
    let rep = compact::compact(&store, vol, &dry, &later()).await.expect("dry run");
    assert_eq!(rep.chunks_deleted, 2, "a dry run reports what it would delete: {rep:?}");
    assert_eq!(keys(&store, "").await, before, "a dry run changes nothing");
    let now = compact::CompactOptions::default();
    let rep = compact::compact(&store, vol, &now, &s3blk::clock::SystemClock).await.expect("compact");
    assert_eq!((rep.folded_seq, rep.chunks_deleted), (None, 0), "{rep:?}");
    assert_eq!(keys(&store, "").await, before, "nothing younger than the safety age is touched");
    // An age too large for Unix seconds keeps everything too (it wrapped
    // to a cutoff in the future, which made every object old).
    let forever = compact::CompactOptions { safety_age: Duration::from_secs(u64::MAX), ..Default::default() };
    let rep = compact::compact(&store, vol, &forever, &s3blk::clock::SystemClock).await.expect("compact");
    assert_eq!((rep.folded_seq, rep.chunks_deleted), (None, 0), "{rep:?}");
    assert_eq!(keys(&store, "").await, before, "an enormous safety age deleted young objects");
}

/// Compaction in a loop beside a writer that keeps writing and flushing:
/// a short real safety age, real clocks, the writer never fenced, nothing lost.
async fn compaction_beside_a_live_writer_loses_nothing(store: DynStore) {
    let vol = format!("{}/", common::unique("live"));
    create(&store, &vol, 16 * CS as u64).await;
    let v = open(&store, &vol).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (store, vol, stop) = (store.clone(), vol.clone(), stop.clone());
        tokio::spawn(async move {
            let opts = compact::CompactOptions { safety_age: Duration::from_secs(2), ..Default::default() };
            let mut deleted = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let rep = compact::compact(&store, &vol, &opts, &s3blk::clock::SystemClock).await.expect("compact");
                deleted += rep.chunks_deleted + rep.journal_records_deleted;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            deleted
        })
    };
    let mut model = vec![0u8; 16 * CS as usize];
    let started = std::time::Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(6) {
        for k in 0..4u64 {
            let off = ((round * 7 + k * 3) % 16) * CS as u64 + (k * 4096);
            let data = common::pattern(round * 10 + k, 3 * 4096);
            let end = (off as usize + data.len()).min(model.len());
            v.write(off, &data[..end - off as usize]).await.expect("write");
            model[off as usize..end].copy_from_slice(&data[..end - off as usize]);
        }
        v.flush().await.expect("a live writer beside compaction is never fenced");
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let deleted = compactor.await.expect("compactor");
    assert!(deleted > 0, "compaction collected nothing in {round} rounds");
    assert_eq!(v.read(0, 16 * CS as u64).await.expect("read"), model);
    drop(v);
    assert_stored(&store, &vol, 16 * CS as u64, &model, "a fresh opener").await;
}
on_both_stores!(compaction_beside_a_live_writer_loses_nothing);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_uploads_are_committed_without_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    create(&store, "auto/", 16 * CS as u64).await;
    let opts = OpenOptions {
        dirty_limit: 2 * CS as u64,
        commit_interval: Duration::from_millis(100),
        ..OpenOptions::default()
    };
    let v = Volume::open(store.clone(), "auto/", opts).await.expect("open");
    let data = common::pattern(5, 12 * CS as usize);
    let head = v.stats().head_seq;
    v.write(0, &data).await.expect("write past the dirty limit");
    let committed =
        common::poll_until(|| async { v.stats().head_seq > head && v.stats().staged_chunks == 0 }, |done| *done).await;
    assert!(committed, "staged uploads were not committed: {:?}", v.stats());
    // What was committed reads back from a fresh view of the store.
    let ro = open_ro(&store, "auto/").await;
    let got = ro.read(0, 12 * CS as u64).await.expect("read");
    let stored = (0..12)
        .filter(|&c| got[c * CS as usize..(c + 1) * CS as usize] == data[c * CS as usize..(c + 1) * CS as usize])
        .count();
    assert!(stored >= 8, "only {stored} of 12 chunks were committed");
}

/// Pages written over an unread base that turn the chunk all zeros: the
/// cache must not keep serving the base it fetched to merge them.
async fn zeroed_pages_over_a_base_read_back_as_zeros(store: DynStore) {
    let vol = format!("{}/", common::unique("pages"));
    create(&store, &vol, 2 * CS as u64).await;
    let v = open(&store, &vol).await;
    v.write(0, &common::pattern(1, 8192)).await.expect("write base");
    v.flush().await.expect("flush base");
    drop(v);
    let v = open(&store, &vol).await;
    // Whole pages: no read of the base on the write path.
    v.write(0, &[0u8; 8192]).await.expect("zero the written pages");
    v.write(16384, &common::pattern(2, 4096)).await.expect("write another page");
    let mut want = vec![0u8; CS as usize];
    want[16384..20480].copy_from_slice(&common::pattern(2, 4096));
    assert_eq!(v.read(0, CS as u64).await.expect("read before flush"), want);
    v.write(16384, &[0u8; 4096]).await.expect("zero it again");
    v.flush().await.expect("flush");
    assert_eq!(v.read(0, CS as u64).await.expect("read"), vec![0u8; CS as usize]);
    assert_eq!(v.read_now(0, 4096).map(|b| b.to_vec()), Some(vec![0u8; 4096]), "the fast path agrees");
    drop(v);
    assert_eq!(open_ro(&store, &vol).await.read(0, CS as u64).await.expect("reopen"), vec![0u8; CS as usize]);
}
on_both_stores!(zeroed_pages_over_a_base_read_back_as_zeros);

/// The reaper removes a volume only on s3blk's own word: a tombstone old
/// enough, and nothing but s3blk's objects under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remains_of_a_deleted_volume_go_only_when_tombstoned_all_ours_and_old() {
    use s3blk::volume::catalog::{self, CatalogError, ReapAge};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    // Ages are measured on the store's clock: "old" is a zero safety age.
    let old = || Some(ReapAge { safety_age: Duration::ZERO });
    let young = || Some(ReapAge { safety_age: compact::DEFAULT_SAFETY_AGE });
    create(&store, "gone/", 4 * CS as u64).await;
    let v = open(&store, "gone/").await;
    v.write(0, &common::pattern(3, CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    assert_eq!(catalog::reap(&store, "gone/", old()).await.expect("live"), None, "a live volume");
    // volume.json gone, but no tombstone: nothing proves the rest is a deleted volume's.
    store.delete(&format::meta_key("gone/")).await.expect("delete meta");
    let left = keys(&store, "gone/").await.len();
    assert_eq!(catalog::reap(&store, "gone/", old()).await.expect("untombstoned"), None);
    assert_eq!(keys(&store, "gone/").await.len(), left);
    // The tombstone an interrupted delete leaves behind.
    let tombstone = catalog::tombstone_key("gone/");
    store.put(&tombstone, Bytes::from_static(b"{\"deleted_unix\":0}"), PutMode::Overwrite).await.expect("put");
    assert_eq!(catalog::reap(&store, "gone/", young()).await.expect("young"), None, "a young tombstone");
    store.put("gone/notes.txt", Bytes::from_static(b"not ours"), PutMode::Overwrite).await.expect("put");
    let foreign = catalog::reap(&store, "gone/", old()).await;
    assert!(matches!(foreign, Err(CatalogError::ForeignObjects { .. })), "{foreign:?}");
    assert_eq!(keys(&store, "gone/").await.len(), left + 2, "nothing deleted beside a foreign object");
    store.delete("gone/notes.txt").await.expect("delete");
    // A snapshot record the interrupted delete had not reached yet does not hold it up.
    store.put("gone/snapshots/old.json", Bytes::from_static(b"{}"), PutMode::Overwrite).await.expect("put");
    let removed = catalog::reap(&store, "gone/", old()).await.expect("remove");
    assert_eq!(removed, Some(left as u64 + 2));
    assert!(keys(&store, "gone/").await.is_empty());
}

/// A clone whose create failed after the delete of its store probe was lost
/// leaves only that probe under its prefix: deleting the clone removes it
/// (and nothing else: a probe beside anything s3blk did not write, or a
/// probe's name holding other bytes, is refused and left whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_clone_leaves_nothing_a_delete_cannot_remove() {
    use s3blk::store::local::LocalStore;
    use s3blk::volume::catalog::{self, CatalogError, DeleteOutcome, OnDependants};
    let dir = tempfile::tempdir().expect("tempdir");
    let fault = Arc::new(FaultStore::new(Arc::new(LocalStore::new(dir.path()).expect("local store"))));
    let store: DynStore = Arc::new(RetryStore::new(fault.clone(), common::fast_policy()));
    let clock = s3blk::clock::SystemClock;
    create(&store, "parent/", 4 * CS as u64).await;
    // Every delete of the probe fails, and so does the clone's volume.json.
    for key in [".s3blk-probe-", "child/volume.json"] {
        let op = if key.contains("probe") { Op::Delete } else { Op::Put };
        fault.add_rule(Rule { op: Some(op), key_contains: Some(key.into()), fault: Fault::ServerError, times: 1000 });
    }
    let failed = catalog::clone_volume(&store, "parent/", None, "child/", "child", None, &clock).await;
    assert!(failed.is_err(), "the clone was created: {failed:?}");
    fault.clear_rules();
    let left = keys(&store, "child/").await;
    assert!(left.len() == 1 && left[0].starts_with("child/.s3blk-probe-"), "{left:?}");
    let out = catalog::delete_volume(&store, "child/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Ok(DeleteOutcome::Probes { objects: 1 })), "{out:?}");
    assert!(keys(&store, "child/").await.is_empty());
    // The parent let go of the failed clone and deletes as usual.
    let out = catalog::delete_volume(&store, "parent/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Ok(DeleteOutcome::Deleted { .. })), "{out:?}");

    // A probe beside someone else's object: nothing goes.
    let probe = "other/.s3blk-probe-0123456789abcdef";
    store.put(probe, Bytes::from_static(b"1"), PutMode::Overwrite).await.expect("put");
    store.put("other/notes.txt", Bytes::from_static(b"not ours"), PutMode::Overwrite).await.expect("put");
    let out = catalog::delete_volume(&store, "other/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Err(CatalogError::ForeignObjects { .. })), "{out:?}");
    assert_eq!(keys(&store, "other/").await.len(), 2);
    // A probe's name (and a clock probe's) holding bytes s3blk never writes there: nothing goes.
    store.delete("other/notes.txt").await.expect("delete");
    let clock_probe = "other/.s3blk-clock-00000000000000ff";
    store.put(clock_probe, Bytes::from_static(b"s3blk clock probe"), PutMode::Overwrite).await.expect("put");
    store.put(probe, Bytes::from_static(b"someone's data"), PutMode::Overwrite).await.expect("put");
    let out = catalog::delete_volume(&store, "other/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Err(CatalogError::NotAVolume { objects: 2, .. })), "{out:?}");
    assert_eq!(keys(&store, "other/").await.len(), 2);
    // Both as s3blk writes them: both go.
    store.put(probe, Bytes::from_static(b"2"), PutMode::Overwrite).await.expect("put");
    let out = catalog::delete_volume(&store, "other/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Ok(DeleteOutcome::Probes { objects: 2 })), "{out:?}");
    assert!(keys(&store, "other/").await.is_empty());
}

/// A restore that died part way (its pin and clone marker in the source
/// written, its volume.json not, and its own attempt to let go of the source
/// failed) leaves a record under the new volume's prefix naming its source:
/// deleting the new volume lets go of the source, so the source deletes as
/// usual instead of being kept for a clone that never existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_died_part_way_lets_go_of_its_source_when_deleted() {
    use s3blk::store::local::LocalStore;
    use s3blk::volume::catalog::{self, DeleteOutcome, OnDependants};
    let dir = tempfile::tempdir().expect("tempdir");
    let fault = Arc::new(FaultStore::new(Arc::new(LocalStore::new(dir.path()).expect("local store"))));
    let store: DynStore = Arc::new(RetryStore::new(fault.clone(), common::fast_policy()));
    let clock = s3blk::clock::SystemClock;
    create(&store, "parent/", 4 * CS as u64).await;
    // The clone's volume.json never lands, and neither does any delete in
    // the parent: the restore dies with its pin and marker in place.
    fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("child/volume.json".into()),
        fault: Fault::ServerError,
        times: 1000,
    });
    fault.add_rule(Rule {
        op: Some(Op::Delete),
        key_contains: Some("parent/".into()),
        fault: Fault::ServerError,
        times: 1000,
    });
    let failed = catalog::clone_volume(&store, "parent/", None, "child/", "child", None, &clock).await;
    assert!(failed.is_err(), "the clone was created: {failed:?}");
    fault.clear_rules();
    let pin = format::snapshot_key("parent/", &format::clone_pin_name("child/"));
    let marker = format::clone_marker_key("parent/", "child/");
    assert!(store.head(&pin).await.expect("head").is_some(), "the restore's own release was not stopped");
    let out = catalog::delete_volume(&store, "child/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Ok(DeleteOutcome::Absent | DeleteOutcome::Probes { .. })), "{out:?}");
    assert!(keys(&store, "child/").await.is_empty(), "{:?}", keys(&store, "child/").await);
    for key in [&pin, &marker] {
        assert!(store.head(key).await.expect("head").is_none(), "{key} is left in the source");
    }
    let out = catalog::delete_volume(&store, "parent/", OnDependants::RefuseClones, &clock).await;
    assert!(matches!(out, Ok(DeleteOutcome::Deleted { .. })), "{out:?}");
    assert!(keys(&store, "").await.is_empty(), "{:?}", keys(&store, "").await);

    // Under those names, bytes s3blk never writes there: nothing goes.
    for (key, body) in [
        ("other/source.json", &br#"{"source":"parent/","clone":"other","note":"mine"}"#[..]),
        ("other/provisioned.json", &b"{\"parameters\":{}}"[..]),
    ] {
        store.put(key, Bytes::copy_from_slice(body), PutMode::Overwrite).await.expect("put");
        let out = catalog::delete_volume(&store, "other/", OnDependants::RefuseClones, &clock).await;
        assert!(matches!(out, Err(catalog::CatalogError::NotAVolume { .. })), "{key}: {out:?}");
        assert_eq!(keys(&store, "other/").await, vec![key.to_string()]);
        store.delete(key).await.expect("delete");
    }
}

/// A compaction that dies at any point (at its checkpoint PUT, or after
/// any number of deletes) leaves a volume that reads the same, snapshot
/// included, passes fsck, takes a new writer, and compacts fully next time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_is_crash_consistent_at_every_step() {
    let size = 6 * CS as u64;
    let setup = |rig: &FaultRig| {
        let store = rig.plain();
        async move {
            create(&store, "c/", size).await;
            let v = open(&store, "c/").await;
            for round in 0..4u64 {
                for c in 0..3u64 {
                    let off = c * CS as u64 + round * 4096;
                    v.write(off, &common::pattern(round * 10 + c, 2 * CS as usize)).await.expect("write");
                }
                v.flush().await.expect("flush");
                if round == 1 {
                    v.snapshot("mid").await.expect("snapshot");
                }
            }
        }
    };
    let images = |store: DynStore| async move {
        let head = open_ro(&store, "c/").await.read(0, size).await.expect("read head");
        let snap = Volume::open(store, "c/", OpenOptions { snapshot: Some("mid".into()), ..OpenOptions::default() })
            .await
            .expect("open snapshot")
            .read(0, size)
            .await
            .expect("read snapshot");
        (head, snap)
    };
    let rig = FaultRig::new();
    setup(&rig).await;
    let want = images(rig.plain()).await;
    let dry = compact::CompactOptions { dry_run: true, ..compact::CompactOptions::default() };
    let plan = compact::compact(&rig.plain(), "c/", &dry, &later()).await.expect("dry run");
    // One more delete than planned: the probe that reads the store's clock.
    let deletes = plan.journal_records_deleted + plan.checkpoints_deleted + plan.chunks_deleted + 1;
    assert!(plan.chunks_deleted > 0 && plan.journal_records_deleted > 0, "{plan:?}");

    let opts = eager();
    for step in 0..=deletes + 1 {
        let rig = FaultRig::new();
        setup(&rig).await;
        if step == 0 {
            rig.fault.crash_after_puts(1); // dies at the checkpoint PUT (after the clock probe)
        } else {
            rig.fault.crash_after_deletes(step - 1);
        }
        let result = compact::compact(&rig.faulty(), "c/", &opts, &s3blk::clock::SystemClock).await;
        assert_eq!(result.is_ok(), step == deletes + 1, "step {step}: {result:?}");
        assert_eq!(images(rig.plain()).await, want, "step {step}: contents changed");
        assert_fsck_clean(&rig.plain(), "c/").await;
        let rep = compact::compact(&rig.plain(), "c/", &opts, &s3blk::clock::SystemClock)
            .await
            .expect("compaction after the crash");
        assert_eq!(images(rig.plain()).await, want, "step {step}: contents changed by the second compaction");
        let fsck = fsck::fsck(rig.plain().as_ref(), "c/", true, &|_, _| {}).await.expect("fsck");
        assert!(fsck.clean && fsck.garbage_chunks == 0, "step {step}: {fsck:?} after {rep:?}");
        let w = open(&rig.plain(), "c/").await;
        w.write(0, b"after").await.expect("write after");
        w.flush().await.expect("a new writer commits after the crash");
    }
}

/// A store that runs a compaction of `f/` the first time the journal is
/// listed: a reader replaying the journal finds it folded under its feet.
#[derive(Debug)]
struct CompactsOnJournalList {
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl common::Around for CompactsOnJournalList {
    async fn list(&self, inner: &DynStore, req: store::ListRequest<'_>) -> store::StoreResult<store::ListPage> {
        if req.prefix.ends_with("journal/") && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            compact::compact(inner, "f/", &eager(), &s3blk::clock::SystemClock)
                .await
                .expect("compaction in the middle");
        }
        inner.list(req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_while_compaction_folds_the_journal_replays_again() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "f/", 4 * CS as u64).await;
    let v = open(&mem, "f/").await;
    for round in 0..6u64 {
        v.write(round * 4096, &common::pattern(round, 4096)).await.expect("write");
        v.flush().await.expect("flush");
    }
    let want = v.read(0, 4 * CS as u64).await.expect("read");
    drop(v);
    let racing: DynStore = common::Wrapped::new(mem.clone(), CompactsOnJournalList { armed: true.into() });
    let got = open_ro(&racing, "f/").await.read(0, 4 * CS as u64).await.expect("read");
    assert_eq!(got, want);
    assert!(!store::list_all(mem.as_ref(), "f/checkpoints/").await.expect("list").is_empty(), "compaction ran");
}

// ------------------------------------------------------------------ inline pages (format 2)

/// The chunk objects under `vol`.
async fn chunk_objects(store: &DynStore, vol: &str) -> usize {
    store::list_all(store.as_ref(), &format::chunk_prefix(vol)).await.expect("list").len()
}

/// A small write and a flush cost one PUT, the journal record, and no
/// chunk object; what it wrote reads back from the writer, from a fresh
/// opener, from a checkpoint that folded the journal, and from a clone of
/// a snapshot; fsck is clean; the record and checkpoint say format 2.
async fn a_small_flush_is_one_put_and_reads_back_everywhere(store: DynStore) {
    let vol = format!("{}/", common::unique("inline"));
    create(&store, &vol, 4 * CS as u64).await;
    let fault = Arc::new(FaultStore::new(store.clone()));
    let counted: DynStore = fault.clone();
    let v = open(&counted, &vol).await;
    let mut expect = common::pattern(1, 2 * CS as usize);
    v.write(0, &expect).await.expect("write");
    v.flush().await.expect("flush");
    assert_eq!(chunk_objects(&store, &vol).await, 2);
    // A whole page, a few bytes inside another page, a zeroed page.
    let page = common::pattern(2, 4096);
    let puts = fault.puts_seen();
    v.write(8192, &page).await.expect("write page");
    v.write(CS as u64 + 100, b"xyz").await.expect("write bytes");
    v.write_zeroes(CS as u64 + 3 * 4096, 4096).await.expect("zero a page");
    v.flush().await.expect("flush");
    assert_eq!(fault.puts_seen() - puts, 1, "a small flush should cost the journal PUT alone");
    assert_eq!(chunk_objects(&store, &vol).await, 2, "a small flush uploaded a chunk");
    expect[8192..8192 + 4096].copy_from_slice(&page);
    expect[CS as usize + 100..CS as usize + 103].copy_from_slice(b"xyz");
    expect[CS as usize + 3 * 4096..CS as usize + 4 * 4096].fill(0);
    let s = v.stats();
    assert_eq!((s.patched_chunks, s.patch_bytes), (2, 3 * 4096));
    let head = replay::read_record(store.as_ref(), &vol, s.head_seq).await.expect("read").expect("head record");
    assert_eq!(head.1[8..12], format::FORMAT_V2.to_le_bytes(), "a record with inline pages is format 2");
    assert_eq!(v.read(0, 2 * CS as u64).await.expect("read"), expect, "the writer reads its patched chunks");
    drop(v);
    assert_stored(&store, &vol, 2 * CS as u64, &expect, "a fresh opener").await;
    // A snapshot, a clone of it, and a write through the clone's own patch.
    let clock = s3blk::clock::SystemClock;
    s3blk::volume::engine::snapshot_committed(&store, &vol, "s1", None, &clock).await.expect("snapshot");
    let child = format!("{}/", common::unique("inline-child"));
    let child_id = format::volume_name(&child).to_string();
    s3blk::volume::catalog::clone_volume(&store, &vol, Some("s1"), &child, &child_id, None, &clock)
        .await
        .expect("clone");
    let c = open(&store, &child).await;
    assert_eq!(c.read(0, 2 * CS as u64).await.expect("read clone"), expect, "the clone reads the parent's patches");
    c.write(8192 + 4096, b"child").await.expect("write clone");
    c.flush().await.expect("flush clone");
    drop(c);
    let mut child_expect = expect.clone();
    child_expect[8192 + 4096..8192 + 4096 + 5].copy_from_slice(b"child");
    assert_eq!(open_ro(&store, &child).await.read(0, 2 * CS as u64).await.expect("read"), child_expect);
    // Fold the journal into a checkpoint: the patches travel with it.
    let st = replay::replay(store.as_ref(), &vol, CS as u64, None).await.expect("replay");
    let cp =
        Checkpoint { seq: st.head, epoch: st.epoch, size: st.size, map: st.map.clone(), patches: st.patches.clone() };
    let cp_bytes = cp.encode();
    // Patches need format 2; its chunks, stored with their table, 4.
    assert_eq!(cp_bytes[8..12], format::FORMAT_V4.to_le_bytes());
    store.put(&format::checkpoint_key(&vol, st.head), Bytes::from(cp_bytes), PutMode::IfAbsent).await.expect("cp");
    for seq in 0..=st.head {
        store.delete(&format::journal_key(&vol, seq)).await.expect("delete");
    }
    let v = open(&store, &vol).await;
    assert_eq!(v.read(0, 2 * CS as u64).await.expect("read"), expect, "a writer opened from the checkpoint");
    // A write covering most of a patched chunk stores it whole: the
    // patch goes, the bytes stay.
    let big = common::pattern(3, CS as usize / 2);
    v.write(CS as u64 + CS as u64 / 2, &big).await.expect("write");
    v.flush().await.expect("flush");
    expect[CS as usize + CS as usize / 2..2 * CS as usize].copy_from_slice(&big);
    assert_eq!(v.stats().patched_chunks, 1, "the chunk stored whole kept its patch");
    drop(v);
    assert_stored(&store, &vol, 2 * CS as u64, &expect, "a fresh opener").await;
}
on_both_stores!(a_small_flush_is_one_put_and_reads_back_everywhere);

/// Patches past half their limit are folded in the background: the most
/// patched chunks are stored whole again and the patches go, with the
/// bytes intact, while writes keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_past_their_limit_are_folded_into_chunks() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 16 * CS as u64).await;
    let opts =
        OpenOptions { patch_limit: 8 * 4096, commit_interval: Duration::from_millis(20), ..OpenOptions::default() };
    let v = Volume::open(store.clone(), "v/", opts).await.expect("open");
    let mut model = vec![0u8; 16 * CS as usize];
    for i in 0..64u64 {
        let off = (i % 16) * CS as u64 + (i / 16) * 8192;
        let data = common::pattern(i, 4096);
        v.write(off, &data).await.expect("write");
        v.flush().await.expect("flush");
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        assert!(v.stats().patch_bytes <= 8 * 4096, "patches grew past their limit");
    }
    let folded = async {
        while v.stats().patch_bytes > 4 * 4096 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), folded).await.expect("the committer folds patches");
    assert!(chunk_objects(&store, "v/").await > 0, "folding stores chunks");
    assert_eq!(v.read(0, 16 * CS as u64).await.expect("read"), model);
    drop(v);
    assert_stored(&store, "v/", 16 * CS as u64, &model, "a fresh opener").await;
}

/// A volume of format 1 (created before patches existed, its records all
/// format 1) opens and takes small flushes: the first inline record
/// upgrades it; a writer with patches off keeps writing format 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_volume_opens_and_is_upgraded_by_its_first_small_flush() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 4 * CS as u64).await;
    // Rewrite volume.json as format 1 wrote it.
    let key = format::meta_key("v/");
    let mut meta = format::VolumeMeta::decode(&store.get(&key, None).await.expect("meta")).expect("meta");
    meta.format_version = 1;
    store.put(&key, Bytes::from(meta.encode()), PutMode::Overwrite).await.expect("put meta");
    // Nor chunk tables (format 4), which also need a newer reader.
    let old = OpenOptions { patch_limit: 0, chunk_tables: false, ..OpenOptions::default() };
    let v = Volume::open(store.clone(), "v/", old).await.expect("open");
    v.write(0, b"format one").await.expect("write");
    v.flush().await.expect("flush");
    let head = v.stats().head_seq;
    drop(v);
    for seq in 0..=head {
        let (_, bytes) = replay::read_record(store.as_ref(), "v/", seq).await.expect("read").expect("record");
        assert_eq!(bytes[8..12], format::FORMAT_V1.to_le_bytes(), "record {seq} of a writer without patches");
    }
    let v = open(&store, "v/").await;
    assert_eq!(v.read(0, 10).await.expect("read"), b"format one");
    v.write(4096, b"format two").await.expect("write");
    v.flush().await.expect("flush");
    let (_, bytes) = replay::read_record(store.as_ref(), "v/", v.stats().head_seq).await.expect("read").expect("rec");
    assert_eq!(bytes[8..12], format::FORMAT_V2.to_le_bytes());
    drop(v);
    let r = open_ro(&store, "v/").await;
    assert_eq!(r.read(0, 10).await.expect("read"), b"format one");
    assert_eq!(r.read(4096, 10).await.expect("read"), b"format two");
    assert_fsck_clean(&store, "v/").await;
}

/// A page written over a chunk memory holds starts from those bytes: after
/// its inline commit the chunk is still cached, and reading it back costs
/// no GET (hot data stays hot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_chunk_stays_cached_through_an_inline_commit() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CS as u64).await;
    let fault = Arc::new(FaultStore::new(mem.clone()));
    let store: DynStore = fault.clone();
    let v = open(&store, "v/").await;
    let mut expect = common::pattern(1, CS as usize);
    v.write(0, &expect).await.expect("write");
    v.flush().await.expect("flush");
    assert_eq!(v.read(0, CS as u64).await.expect("read"), expect);
    let page = common::pattern(2, 4096);
    v.write(4096, &page).await.expect("write a page");
    v.flush().await.expect("flush");
    expect[4096..8192].copy_from_slice(&page);
    assert_eq!(v.stats().patched_chunks, 1, "the page went inline");
    let gets = fault.gets_seen();
    assert_eq!(v.read(0, CS as u64).await.expect("read"), expect);
    assert_eq!(fault.gets_seen() - gets, 0, "the chunk was fetched again after its inline commit");
}

/// Equal bytes, or the first offset where they differ.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("{what}: bytes differ from offset {at} (page {})", at / 4096);
    }
}

/// A store that holds PUTs of keys containing a given string (the next
/// `n` of them, once armed), each until one permit is released: uploads
/// and commits caught in flight.
#[derive(Debug)]
struct HoldsPuts {
    armed: std::sync::Mutex<Option<(String, usize)>>,
    /// Hold the answer, after the PUT was applied, instead of the PUT.
    after: std::sync::atomic::AtomicBool,
    entered: std::sync::atomic::AtomicUsize,
    done: std::sync::atomic::AtomicUsize,
    release: tokio::sync::Semaphore,
}

impl HoldsPuts {
    fn new(inner: DynStore) -> Arc<common::Wrapped<Self>> {
        common::Wrapped::new(
            inner,
            Self {
                armed: std::sync::Mutex::new(None),
                after: false.into(),
                entered: 0.into(),
                done: 0.into(),
                release: tokio::sync::Semaphore::new(0),
            },
        )
    }
    fn arm(&self, key: &str, n: usize) {
        *self.armed.lock().expect("lock") = Some((key.to_string(), n));
    }
    /// Wait until `n` held PUTs have begun (`done`: ended).
    async fn until(&self, n: usize, done: bool) {
        let counter = if done { &self.done } else { &self.entered };
        let wait = async {
            while counter.load(std::sync::atomic::Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait).await.expect("held PUTs");
    }
}

#[async_trait::async_trait]
impl common::Around for HoldsPuts {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> store::StoreResult<()> {
        let held = {
            let mut armed = self.armed.lock().expect("lock");
            match armed.as_mut() {
                Some((k, n)) if *n > 0 && key.contains(k.as_str()) => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        if !held {
            return inner.put(key, body, mode).await;
        }
        if self.after.load(std::sync::atomic::Ordering::SeqCst) {
            let r = inner.put(key, body, mode).await;
            self.entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.release.acquire().await.expect("semaphore").forget();
            self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return r;
        }
        self.entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.release.acquire().await.expect("semaphore").forget();
        let r = inner.put(key, body, mode).await;
        self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    }
}

/// A background upload of a chunk read before its last write, ending
/// after a flush committed the chunk's pages inline, must not put the
/// older bytes back: neither for the writer's reads nor in the next
/// record (whose chunk entry would drop the committed pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_older_than_inline_pages_does_not_bring_back_older_bytes() {
    let (mem, journal, chunks, store) = held_puts_volume().await;
    let (v, want, third) = older_upload_in_flight(&store, &chunks, &journal).await;
    v.flush().await.expect("flush");
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "after the flush");
    // The held upload ends, and the uploader commits what it staged.
    chunks.release.add_permits(1);
    third.await.expect("join").expect("third write");
    chunks.until(1, true).await;
    // What it does next takes no store call: give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle_staged(&v).await;
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "the writer, after the older upload ended");
    v.flush().await.expect("flush");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 8192).await.expect("read"), &want, "a fresh opener");
    assert_fsck_clean(&mem, "v/").await;
}

/// The same upload ending while the flush's record is in flight (the slot
/// is still there, written since the upload read it): the record lands
/// and releases the slot; the chunk staged meanwhile holds less than the
/// record and must go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_ending_while_inline_pages_are_in_flight_does_not_outlive_them() {
    let (mem, journal, chunks, store) = held_puts_volume().await;
    // The uploader's next upload of chunk 0 (at the flushed version) is
    // held too, until the record has landed.
    let (v, want, third) = older_upload_in_flight(&store, &chunks, &journal).await;
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 0), 1);
    journal.arm(&format::journal_prefix("v/"), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    journal.until(2, false).await;
    chunks.release.add_permits(1);
    chunks.until(1, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    journal.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "the writer, after the flush");
    chunks.release.add_permits(1);
    third.await.expect("join").expect("third write");
    settle_staged(&v).await;
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "the writer, after the uploads ended");
    v.flush().await.expect("flush");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 8192).await.expect("read"), &want, "a fresh opener");
    assert_fsck_clean(&mem, "v/").await;
}

/// A chunk of pages merged with its stored bytes for an upload and
/// written again while the upload is in flight keeps only its pages: the
/// merged bytes are the upload's own. (Merged in place, the chunk stayed
/// whole in memory, and random writes during a long write-back filled the
/// dirty limit with whole chunks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_an_upload_of_pages_leaves_the_chunk_holding_only_its_pages() {
    let (mem, _journal, chunks, store) = held_puts_volume().await;
    let v = open(&store, "v/").await;
    // Half the chunk's pages: more than go inside a record, so the flush
    // uploads the chunk.
    let half = common::pattern(1, CS as usize / 2);
    v.write(0, &half).await.expect("write");
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 0), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    chunks.until(1, false).await;
    let page = common::pattern(2, 4096);
    let at = CS as u64 / 2 + 4096;
    v.write(at, &page).await.expect("write during the upload");
    chunks.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    let s = v.stats();
    assert_eq!(s.dirty_chunks, 1, "the page written during the upload is dirty");
    assert!(
        s.dirty_bytes < CS as u64 / 2 + 2 * 4096 + 2048,
        "a chunk of {} pages counts {} bytes: it holds the whole chunk",
        CS / 2 / 4096 + 1,
        s.dirty_bytes
    );
    let mut want = vec![0u8; CS as usize];
    want[..half.len()].copy_from_slice(&half);
    want[at as usize..at as usize + 4096].copy_from_slice(&page);
    assert_same(&v.read(0, CS as u64).await.expect("read"), &want, "the writer");
    v.flush().await.expect("flush");
    assert_eq!(v.stats().dirty_chunks, 0);
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, CS as u64).await.expect("read"), &want, "a fresh opener");
    assert_fsck_clean(&mem, "v/").await;
}

/// The chunk such an upload merged stays counted in the dirty budget
/// until the record naming it lands (past the limit if need be): with
/// commits slow or failing, uploads of chunks written meanwhile cannot
/// pile up memory the budget does not see, across volumes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_staged_while_written_again_counts_in_the_dirty_budget_until_committed() {
    let (_mem, journal, chunks, store) = held_puts_volume().await;
    let budget = s3blk::volume::budget::MemoryBudget::new(8 * CS as u64, 2 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), ..OpenOptions::default() };
    let v = Volume::open(store.clone(), "v/", opts).await.expect("open");
    // Half the chunk's pages: the flush uploads the chunk.
    v.write(0, &common::pattern(1, CS as usize / 2)).await.expect("write");
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 0), 1);
    journal.arm(&format::journal_prefix("v/"), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    chunks.until(1, false).await;
    v.write(CS as u64 / 2 + 4096, &common::pattern(2, 4096)).await.expect("write during the upload");
    let slot = budget.dirty_bytes();
    chunks.release.add_permits(1);
    // Staged; the record naming it is held.
    journal.until(1, false).await;
    let staged = budget.dirty_bytes();
    assert!(
        staged >= slot + CS as u64,
        "the staged chunk is not counted: {staged} bytes dirty with it, {slot} before it"
    );
    journal.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    assert_eq!(budget.dirty_bytes(), slot, "committed: only the chunk still dirty is counted");
    v.flush().await.expect("flush");
    assert_eq!(budget.dirty_bytes(), 0);
}

/// A flush carries chunk 0's pages inline (b on page 1) while an older
/// upload of the chunk (b0 on page 1) is in flight; a write after the
/// record was built keeps the chunk dirty, and the upload then stages its
/// older bytes. The next record must not name them as they are: applied,
/// it would drop the page the flush acknowledged. Found by review: a fresh
/// opener read b0. When the record lands, the staged chunk gets its pages
/// and goes up again before a record names it. (Dropping the staged chunk
/// instead fails simulation seed 166743172782522: a flush running
/// meanwhile may rely on it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_older_than_inline_pages_staged_after_them_is_never_committed() {
    let (mem, journal, chunks, store) = held_puts_volume().await;
    let (v, want, third) = older_upload_in_flight(&store, &chunks, &journal).await;
    let (flush, want) = flush_held_then_written_again(&v, &journal, want).await;
    // The older upload ends and stages; the next upload of chunk 0 is held.
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 0), 1);
    chunks.release.add_permits(1);
    chunks.until(1, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    journal.release.add_permits(1);
    // The flush commits what is staged too: the older upload's chunk,
    // given the record's pages, goes up again first (let through).
    let mut flush = flush;
    let flushed = tokio::select! {
        r = &mut flush => r,
        () = chunks.until(2, false) => {
            chunks.release.add_permits(1);
            flush.await
        }
    };
    flushed.expect("join").expect("flush");
    // Whatever the uploader commits meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "the writer");
    assert_page_1_flushed(&mem, &want).await;
    chunks.release.add_permits(4);
    third.await.expect("join").expect("third write");
    v.flush().await.expect("flush");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 8192).await.expect("read"), &want, "a fresh opener at the end");
    assert_fsck_clean(&mem, "v/").await;
}

/// As above, but the record lands before the older upload ends: the
/// upload, staged after it, gets the record's pages and goes up again
/// before a record names it. Without that, the uploader's next record
/// names its older bytes (b0 on page 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_older_than_inline_pages_that_landed_before_it_ended_is_never_committed() {
    let (mem, journal, chunks, store) = held_puts_volume().await;
    let (v, want, third) = older_upload_in_flight(&store, &chunks, &journal).await;
    let (flush, want) = flush_held_then_written_again(&v, &journal, want).await;
    journal.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    // The older upload ends and stages; the next upload of chunk 0 is held.
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 0), 1);
    chunks.release.add_permits(1);
    chunks.until(1, true).await;
    // Whatever the uploader commits meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "the writer");
    assert_page_1_flushed(&mem, &want).await;
    chunks.release.add_permits(4);
    third.await.expect("join").expect("third write");
    v.flush().await.expect("flush");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 8192).await.expect("read"), &want, "a fresh opener at the end");
    assert_fsck_clean(&mem, "v/").await;
}

/// A flush of the volume `older_upload_in_flight` left, its record
/// (chunk 0's pages inline) held by `journal`, and page 0 written again
/// after the record was built (no new budget): the chunk stays dirty when
/// the record lands. Returns the flush and chunk 0's first two pages as
/// they must now read.
async fn flush_held_then_written_again(
    v: &Volume,
    journal: &HoldsPuts,
    mut want: Vec<u8>,
) -> (tokio::task::JoinHandle<Result<(), VolumeError>>, Vec<u8>) {
    journal.arm(&format::journal_prefix("v/"), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    journal.until(2, false).await;
    let a3 = common::pattern(7, 4096);
    v.write(0, &a3).await.expect("write a''");
    want[..4096].copy_from_slice(&a3);
    (flush, want)
}

/// A fresh opener reads page 1 as flushed (b), not as the older upload
/// had it (b0).
async fn assert_page_1_flushed(mem: &DynStore, want: &[u8]) {
    let got = open_ro(mem, "v/").await.read(4096, 4096).await.expect("read");
    assert!(got != common::pattern(5, 4096), "a fresh opener reads page 1 as the older upload had it");
    assert_same(&got, &want[4096..8192], "a fresh opener, page 1 (b, flushed)");
}

/// Volume "v/" of four chunks on a memory store (`mem`), reached through
/// `store`: chunk PUTs held by `chunks`, journal PUTs by `journal`.
async fn held_puts_volume() -> (DynStore, Arc<common::Wrapped<HoldsPuts>>, Arc<common::Wrapped<HoldsPuts>>, DynStore) {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CS as u64).await;
    let journal = HoldsPuts::new(mem.clone());
    let chunks = HoldsPuts::new(journal.clone());
    let store: DynStore = chunks.clone();
    (mem, journal, chunks, store)
}

/// A writer with room for two dirty chunks: pages a (chunk 0, page 0),
/// an older page 1 and a page of chunk 1 written; a third chunk's write waiting for the
/// background uploader. The uploader first commits both chunks' pages
/// inline; that record is held while both are written again (page a'),
/// so the round frees nothing and the uploader uploads chunk 0 instead,
/// held in its PUT; then page b (chunk 0, page 1) written. Returns the
/// volume, chunk 0's first two pages as they must read, and the waiting
/// write. `journal` holds journal PUTs under `chunks`.
async fn older_upload_in_flight(
    store: &DynStore,
    chunks: &HoldsPuts,
    journal: &HoldsPuts,
) -> (Volume, Vec<u8>, tokio::task::JoinHandle<Result<(), VolumeError>>) {
    let opts = OpenOptions { dirty_limit: 2 * CS as u64, concurrency: 1, ..OpenOptions::default() };
    let v = Volume::open(store.clone(), "v/", opts).await.expect("open");
    let a = common::pattern(1, 4096);
    let a2 = common::pattern(3, 4096);
    let b = common::pattern(2, 4096);
    // Page 1 too, with bytes b replaces later: every upload carries them,
    // and b then needs no more of the budget (where the third write waits
    // first in the queue).
    let mut a_b0 = a.clone();
    a_b0.extend_from_slice(&common::pattern(5, 4096));
    v.write(0, &a_b0).await.expect("write a and an older page 1");
    // Chunk 1 whole (the budget counts chunk 0 by its two pages): the
    // third write then waits for the uploader.
    v.write(CS as u64, &common::pattern(4, CS as usize)).await.expect("write chunk 1");
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 0), 1);
    journal.arm(&format::journal_prefix("v/"), 1);
    let third = {
        let v = v.clone();
        tokio::spawn(async move { v.write(2 * CS as u64, b"third").await })
    };
    journal.until(1, false).await;
    v.write(0, &a2).await.expect("write a'");
    v.write(CS as u64, &a2).await.expect("write chunk 1 again");
    journal.release.add_permits(1);
    chunks.until(1, false).await;
    v.write(4096, &b).await.expect("write b");
    let a = a2;
    let mut want = a;
    want.extend_from_slice(&b);
    (v, want, third)
}

async fn settle_staged(v: &Volume) {
    let settled = async {
        while v.stats().staged_chunks > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), settled).await.expect("the uploader settled");
}

/// Zeros written into a chunk that is all zeros add nothing to a record,
/// but the flush still commits one (see the next test) and leaves the
/// chunk clean: no dirty chunk (and no dirty memory) stays behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_zeros_over_zeros_leaves_nothing_dirty() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 4 * CS as u64).await;
    let v = open(&store, "v/").await;
    v.write_zeroes(4096, 4096).await.expect("zero a page");
    v.write(2 * CS as u64, &[0u8; 4096]).await.expect("write a page of zeros");
    let head = v.stats().head_seq;
    v.flush().await.expect("flush");
    let s = v.stats();
    assert_eq!(s.head_seq, head + 1, "one record, with no chunk and no page");
    assert_eq!((s.dirty_chunks, s.patched_chunks), (0, 0), "a flush left chunks dirty or patched");
    assert_eq!(v.read(0, 3 * CS as u64).await.expect("read"), vec![0u8; 3 * CS as usize]);
}

/// A checkpoint whose patches lay a page outside its chunk, on a chunk
/// past the volume's end, or past the end inside the last chunk is
/// refused as corrupt when opened, not silently half-applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_with_patches_out_of_place_is_refused() {
    let store: DynStore = Arc::new(MemoryStore::new());
    // Three and a half chunks: the last one is half inside the volume.
    let size = 3 * CS as u64 + CS as u64 / 2;
    create(&store, "v/", size).await;
    let v = open(&store, "v/").await;
    v.write(0, b"data").await.expect("write");
    v.flush().await.expect("flush");
    let head = v.stats().head_seq;
    drop(v);
    let st = replay::replay(store.as_ref(), "v/", CS as u64, None).await.expect("replay");
    assert_eq!(st.patches.len(), 1);
    let pages = CS / 4096;
    let page = Some(Bytes::from(vec![7u8; 4096]));
    for (index, p, what) in [
        (0u64, pages, "outside its chunk"),
        (0, u32::MAX, "outside its chunk"),
        (4, 0, "past the end"),
        (3, pages / 2, "past the end"),
    ] {
        let mut patches = st.patches.clone();
        let mut patch = format::Patch::default();
        patch.pages.insert(p, page.clone());
        patches.insert(index, Arc::new(patch));
        let cp = Checkpoint { seq: head, epoch: st.epoch, size: st.size, map: st.map.clone(), patches };
        let key = format::checkpoint_key("v/", head);
        store.put(&key, Bytes::from(cp.encode()), PutMode::Overwrite).await.expect("put checkpoint");
        match Volume::open(store.clone(), "v/", OpenOptions { read_only: true, ..OpenOptions::default() }).await {
            Err(VolumeError::Corrupt(m)) => assert!(m.contains(what), "chunk {index} page {p}: {m}"),
            Err(e) => panic!("chunk {index} page {p}: expected a corruption error, got {e}"),
            Ok(_) => panic!("chunk {index} page {p}: a checkpoint patching {what} was accepted"),
        }
    }
}

/// A flush chooses the chunks it sends inline before it uploads the
/// others; pages written to them meanwhile must not carry the record past
/// the limits (a chunk's patch cap, the volume's patch limit): such a
/// chunk is uploaded whole instead, and the flush still commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_written_during_a_flush_do_not_carry_its_record_past_the_patch_limits() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CS as u64).await;
    let chunks = HoldsPuts::new(mem.clone());
    let store: DynStore = chunks.clone();
    let limit = 8 * 4096;
    let v = Volume::open(store.clone(), "v/", OpenOptions { patch_limit: limit, ..OpenOptions::default() })
        .await
        .expect("open");
    let mut want = vec![0u8; 2 * CS as usize];
    let first = common::pattern(1, 4096);
    v.write(0, &first).await.expect("write a page");
    want[..4096].copy_from_slice(&first);
    let whole = common::pattern(2, CS as usize);
    v.write(CS as u64, &whole).await.expect("write chunk 1");
    want[CS as usize..].copy_from_slice(&whole);
    chunks.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 1), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    // The flush chose chunk 0 (one page) inline and uploads chunk 1.
    chunks.until(1, false).await;
    let rest = common::pattern(3, CS as usize - 4096);
    v.write(4096, &rest).await.expect("write the rest of chunk 0");
    want[4096..CS as usize].copy_from_slice(&rest);
    chunks.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    let s = v.stats();
    assert!(s.patch_bytes <= limit, "patches of {} bytes past their limit of {limit}", s.patch_bytes);
    assert!(s.patch_bytes <= CS as u64 / 4, "a patch of {} bytes past a quarter of its chunk", s.patch_bytes);
    assert_same(&v.read(0, 2 * CS as u64).await.expect("read"), &want, "the writer");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 2 * CS as u64).await.expect("read"), &want, "a fresh opener");
    assert_fsck_clean(&mem, "v/").await;
}

/// A flush given up while its record, carrying a chunk's pages, was in
/// flight (the record landed; its answer never came), a write to the same
/// chunk, and a flush: settling the earlier record must not make the new
/// flush forget the chunk it chose to send inline, or it returns success
/// without committing the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_an_earlier_inline_record_does_not_drop_a_later_flushs_pages() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CS as u64).await;
    let journal = HoldsPuts::new(mem.clone());
    let store: DynStore = journal.clone();
    let v = open(&store, "v/").await;
    let a = common::pattern(1, 4096);
    let b = common::pattern(2, 4096);
    v.write(0, &a).await.expect("write a");
    journal.after.store(true, std::sync::atomic::Ordering::SeqCst);
    journal.arm(&format::journal_prefix("v/"), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    journal.until(1, false).await;
    flush.abort();
    assert!(flush.await.is_err(), "the first flush was given up");
    v.write(4096, &b).await.expect("write b");
    v.flush().await.expect("flush");
    let mut want = a;
    want.extend_from_slice(&b);
    assert_same(&v.read(0, 8192).await.expect("read"), &want, "the writer");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 8192).await.expect("read"), &want, "a fresh opener");
    assert_fsck_clean(&mem, "v/").await;
}

/// Zeros written over a chunk of zeros add nothing to a record, but the
/// flush that covers them still proves the writer was not fenced: a
/// writer another one took over gets an error, never success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_zeros_over_zeros_still_finds_the_writer_fenced() {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, "v/", 4 * CS as u64).await;
    let old = open(&store, "v/").await;
    let new = open(&store, "v/").await;
    new.write(4096, b"the new writer's").await.expect("write");
    new.flush().await.expect("flush");
    old.write_zeroes(4096, 4096).await.expect("zero a page");
    match old.flush().await {
        Err(VolumeError::Fenced(_)) => {}
        other => panic!("a writer taken over flushed zeros over its stale view: {other:?}"),
    }
    drop(old);
    let r = open_ro(&store, "v/").await;
    assert_eq!(r.read(4096, 16).await.expect("read"), b"the new writer's");
}

/// The dirty budget counts a chunk of pages by its written pages: small
/// random writes spread over many more chunks than the budget holds whole
/// stay in memory, with no upload, until a flush; the flush then merges
/// and uploads them a few at a time, so memory stays near the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_over_many_chunks_take_only_their_pages_of_the_budget() {
    let rig = FaultRig::new();
    let chunks = 64u64;
    let size = chunks * CS as u64;
    create(&rig.plain(), "v/", size).await;
    // Whole chunks to start from, so that a merge has stored bytes to read.
    {
        let v = Volume::open(rig.plain(), "v/", OpenOptions::default()).await.expect("open");
        v.write(0, &common::pattern(1, size as usize)).await.expect("write");
        v.flush().await.expect("flush");
    }
    // Room for 12 whole chunks; 64 chunks of two pages each take 512 KiB
    // (8 chunks' worth).
    let budget = s3blk::volume::budget::MemoryBudget::new(12 * CS as u64, 2 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), patch_limit: 0, concurrency: 2, ..OpenOptions::default() };
    let v = Volume::open(rig.faulty(), "v/", opts).await.expect("open");
    let puts = rig.fault.puts_seen();
    let mut image = common::pattern(1, size as usize);
    for c in 0..chunks {
        for page in [3u64, 9] {
            let off = c * CS as u64 + page * 4096;
            let data = common::pattern(100 + c * 16 + page, 4096);
            v.write(off, &data).await.expect("write");
            image[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
    }
    assert_eq!(rig.fault.puts_seen(), puts, "no upload while the written pages fit the budget");
    // Two pages a chunk, and what each slot takes besides (1 KiB, and a
    // bit a page of the chunk).
    let counted = chunks * (2 * 4096 + 1024 + CS as u64 / 4096 / 8);
    assert_eq!(budget.dirty_bytes(), counted, "the budget counts written pages");
    // Reads lay the pages over the stored bytes, unaligned ones too.
    assert_eq!(v.read(0, size).await.expect("read"), image);
    assert_eq!(v.read(3 * 4096 - 7, 20).await.expect("read"), &image[3 * 4096 - 7..3 * 4096 + 13]);
    assert_eq!(budget.dirty_bytes(), counted, "reads merge nothing into the slots");
    v.flush().await.expect("flush");
    assert_eq!(budget.dirty_bytes(), 0);
    // Merged for their uploads a few at a time (four chunks a round with
    // a concurrency of 2), never all of them at once.
    let peak = budget.dirty_peak();
    assert!(peak <= counted + 4 * CS as u64, "dirty peak {peak} bytes");
    drop(v);
    assert_stored(&rig.plain(), "v/", size, &image, "a fresh opener").await;
}

/// A slot of pages that grows (more pages, an unaligned write that merges
/// it, a whole-chunk write) takes the bytes it grows by, waiting for them
/// when the budget is spent, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_pages_growing_past_the_budget_waits_and_loses_nothing() {
    let rig = FaultRig::new();
    let chunks = 16u64;
    let size = chunks * CS as u64;
    create(&rig.plain(), "v/", size).await;
    let budget = s3blk::volume::budget::MemoryBudget::new(4 * CS as u64, 2 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), concurrency: 2, ..OpenOptions::default() };
    let v = Volume::open(rig.faulty(), "v/", opts).await.expect("open");
    let mut image = vec![0u8; size as usize];
    let mut put = |v: &[u8], off: usize| image[off..off + v.len()].copy_from_slice(v);
    for c in 0..chunks {
        let base = (c * CS as u64) as usize;
        let a = common::pattern(c + 1, 8192);
        v.write(base as u64, &a).await.expect("pages");
        put(&a, base);
        // More pages, then an unaligned write (the slot merges), then the
        // whole chunk on every fourth.
        let b = common::pattern(c + 50, 4096);
        v.write(base as u64 + 5 * 4096, &b).await.expect("more pages");
        put(&b, base + 5 * 4096);
        let u = common::pattern(c + 90, 100);
        v.write(base as u64 + 777, &u).await.expect("unaligned");
        put(&u, base + 777);
        if c % 4 == 0 {
            let w = common::pattern(c + 200, CS as usize);
            v.write_vec(base as u64, w.clone()).await.expect("whole chunk");
            put(&w, base);
        }
        assert!(budget.dirty_bytes() <= 4 * CS as u64 + 4 * CS as u64, "dirty {} bytes", budget.dirty_bytes());
    }
    assert_eq!(v.read(0, size).await.expect("read"), image);
    v.flush().await.expect("flush");
    drop(v);
    assert_stored(&rig.plain(), "v/", size, &image, "a fresh opener").await;
}

/// An upload error nobody waited for (the uploader ran because another
/// volume of the budget asked it to) does not fail a write that starts
/// waiting later, once the store answers again: only an error met while
/// a writer waits fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_error_nobody_waited_for_does_not_fail_a_later_write() {
    let rig = FaultRig::new();
    create(&rig.plain(), "a/", 16 * CS as u64).await;
    create(&rig.plain(), "b/", 16 * CS as u64).await;
    let budget = s3blk::volume::budget::MemoryBudget::new(8 * CS as u64, 2 * CS as u64);
    // A failed PUT is tried again 300 ms later, once.
    let policy = RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(300),
        max_delay: Duration::from_millis(300),
        attempt_timeout: Duration::from_secs(10),
    };
    let a_store: DynStore =
        Arc::new(RetryStore::with_clock(rig.faulty(), policy, Arc::new(s3blk::clock::SystemClock), Arc::new(|d| d)));
    let opts = || OpenOptions { budget: Some(budget.clone()), ..OpenOptions::default() };
    let a = Volume::open(a_store, "a/", opts()).await.expect("open a");
    let b = Volume::open(rig.faulty(), "b/", opts()).await.expect("open b");
    let whole = |n| common::pattern(n, CS as usize);
    // A takes its floor and the whole shared part; B its floor.
    for i in 0..6u64 {
        a.write(i * CS as u64, &whole(i + 1)).await.expect("a write");
    }
    b.write(0, &whole(20)).await.expect("b write");
    b.write(CS as u64, &whole(21)).await.expect("b write");
    // A's chunk uploads fail, B's never answer. B waits for bytes and asks
    // A to upload; A's uploads fail with no writer of A waiting. B gives up.
    rig.fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("a/chunks/".into()),
        fault: Fault::ServerError,
        times: 1000,
    });
    rig.fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("b/chunks/".into()),
        fault: Fault::Hang,
        times: 1000,
    });
    let waited = tokio::time::timeout(Duration::from_secs(1), b.write(2 * CS as u64, &whole(22))).await;
    assert!(waited.is_err(), "B must wait: A's uploads fail");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The store answers again, slowly: A's next upload round takes a
    // retry, longer than a waiting writer's look at upload errors.
    rig.fault.clear_rules();
    rig.fault.add_rule(Rule {
        op: Some(Op::Put),
        key_contains: Some("a/chunks/".into()),
        fault: Fault::ServerError,
        times: 1,
    });
    drop(b);
    a.write(6 * CS as u64, &whole(7)).await.expect("a write waiting for A's own uploads, which succeed");
    a.flush().await.expect("flush");
    let got = open_ro(&rig.plain(), "a/").await.read(0, 7 * CS as u64).await.expect("read");
    assert_eq!(got, (1..=7).flat_map(whole).collect::<Vec<u8>>());
}

/// A chunk written while a flush's record is in flight stays dirty after
/// it; the flush then deletes the write-back log segments it committed,
/// which hold the only copy of the chunk's older pages: they come into
/// memory first, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_whose_log_segment_a_flush_deletes_while_still_dirty_come_into_memory_first() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CS as u64).await;
    let journal = HoldsPuts::new(mem.clone());
    let store: DynStore = journal.clone();
    let logs = tempfile::tempdir().expect("tempdir");
    let opts = OpenOptions { log_dir: Some(logs.path().to_path_buf()), ..OpenOptions::default() };
    let v = Volume::open(store, "v/", opts).await.expect("open");
    let a = common::pattern(1, 4096);
    let b = common::pattern(2, 4096);
    v.write(0, &a).await.expect("write a");
    journal.arm(&format::journal_prefix("v/"), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    journal.until(1, false).await;
    v.write(8192, &b).await.expect("write b while the record is in flight");
    journal.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    let mut want = a.clone();
    want.extend_from_slice(&[0u8; 4096]);
    want.extend_from_slice(&b);
    assert_same(&v.read(0, 12288).await.expect("read"), &want, "the writer, after the flush");
    v.flush().await.expect("flush again");
    drop(v);
    assert_same(&open_ro(&mem, "v/").await.read(0, 12288).await.expect("read"), &want, "a fresh opener");
}

/// Writers that waited for the bytes to grow a chunk of pages, and found
/// it uploaded meanwhile, never hold those bytes while they wait for a
/// whole chunk's: several of them at once must not spend the budget
/// among themselves and wait for each other forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_growing_chunks_of_pages_do_not_starve_each_other() {
    let rig = FaultRig::new();
    let chunks = 32u64;
    let size = chunks * CS as u64;
    create(&rig.plain(), "v/", size).await;
    let budget = s3blk::volume::budget::MemoryBudget::new(2 * CS as u64, 64 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), concurrency: 2, patch_limit: 0, ..OpenOptions::default() };
    let v = Volume::open(rig.faulty(), "v/", opts).await.expect("open");
    let writers = 4u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..40u64 {
                let c = (round * writers + w) % chunks;
                let base = c * CS as u64;
                v.write(base + 4096, &common::pattern(round, 4096)).await.expect("a page");
                v.write(base + 100, &common::pattern(round + 1, 100)).await.expect("unaligned");
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("writer");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all).await.expect("writers stuck waiting for the dirty budget");
    v.flush().await.expect("flush");
    assert_eq!(budget.dirty_bytes(), 0);
}

/// Chunks of pages a flush chose to send inline, written meanwhile past
/// what a record carries for them, go up whole after the record: merged
/// for their upload a few at a time, each round committed before the
/// next, like the flush's other chunks of pages, not all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_pages_a_flush_defers_are_merged_a_few_at_a_time() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let pages_chunks = 16u64;
    let size = 64 * CS as u64;
    create(&mem, "v/", size).await;
    let held = HoldsPuts::new(mem.clone());
    let store: DynStore = held.clone();
    let budget = s3blk::volume::budget::MemoryBudget::new(8 * CS as u64, 64 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), concurrency: 2, ..OpenOptions::default() };
    let v = Volume::open(store, "v/", opts).await.expect("open");
    let mut image = vec![0u8; size as usize];
    let mut write = async |off: u64, data: Vec<u8>| {
        v.write(off, &data).await.expect("write");
        image[off as usize..off as usize + data.len()].copy_from_slice(&data);
    };
    // One page in each of 16 chunks (sent inline), and a whole chunk
    // (uploaded), whose upload is held.
    for c in 0..pages_chunks {
        write(c * CS as u64, common::pattern(c + 1, 4096)).await;
    }
    write(40 * CS as u64, common::pattern(99, CS as usize)).await;
    held.arm(&format!("{}{:016x}/", format::chunk_prefix("v/"), 40), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    held.until(1, false).await;
    // Four more pages each: past a chunk's patch cap (a quarter of it),
    // so the record leaves them out.
    for c in 0..pages_chunks {
        for page in 1..5u64 {
            write(c * CS as u64 + page * 4096, common::pattern(c * 8 + page + 200, 4096)).await;
        }
    }
    held.release.add_permits(1);
    flush.await.expect("flush task").expect("flush");
    let peak = budget.dirty_peak();
    // The pages (16 chunks of five) and chunk 40, then four chunks merged
    // at a time: never the 16 at once.
    assert!(peak <= pages_chunks * 5 * 4096 + 5 * CS as u64, "dirty peak {peak} bytes");
    assert_eq!(budget.dirty_bytes(), 0);
    assert_eq!(v.read(0, size).await.expect("read"), image);
    drop(v);
    assert_stored(&mem, "v/", size, &image, "a fresh opener").await;
}

/// Chunks of pages merged for an upload whose commit then fails stay
/// staged, each holding a whole chunk of memory past the budget: flushes
/// retried while the journal refuses records must not merge more of them
/// round after round, but commit those first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_do_not_pile_up_merged_chunks_of_pages() {
    let rig = FaultRig::new();
    let chunks = 60u64;
    let size = chunks * CS as u64;
    create(&rig.plain(), "v/", size).await;
    let limit = 4 * CS as u64;
    let budget = s3blk::volume::budget::MemoryBudget::new(limit, 64 * CS as u64);
    let opts = OpenOptions { budget: Some(budget.clone()), concurrency: 2, patch_limit: 0, ..OpenOptions::default() };
    let v = Volume::open(rig.faulty(), "v/", opts).await.expect("open");
    let mut image = vec![0u8; size as usize];
    for c in 0..chunks {
        let off = c * CS as u64 + 4096;
        let data = common::pattern(c + 1, 4096);
        v.write(off, &data).await.expect("write");
        image[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    rig.rule(Some(Op::Put), &format::journal_prefix("v/"), Fault::ServerError, 1000);
    for _ in 0..20 {
        assert!(v.flush().await.is_err(), "a flush whose record cannot land must fail");
    }
    // The pages, and a round or two of chunks merged (four a round).
    let held = budget.dirty_bytes();
    assert!(held <= chunks * 4096 + 8 * CS as u64, "{held} bytes held with a dirty limit of {limit}");
    rig.fault.clear_rules();
    v.flush().await.expect("flush");
    assert_eq!(budget.dirty_bytes(), 0);
    assert_eq!(v.read(0, size).await.expect("read"), image);
    drop(v);
    assert_stored(&rig.plain(), "v/", size, &image, "a fresh opener").await;
}

/// A flush that brings still-dirty pages into memory before deleting
/// their log segment, and cannot read one of them back (the segment was
/// cut short under it), keeps the segments; the pages it did bring in
/// are counted in the dirty budget all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_a_flush_brought_into_memory_are_counted_when_a_later_one_cannot_be_read() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    create(&mem, "v/", 4 * CS as u64).await;
    let journal = HoldsPuts::new(mem.clone());
    let store: DynStore = journal.clone();
    let logs = tempfile::tempdir().expect("tempdir");
    let budget = s3blk::volume::budget::MemoryBudget::new(8 * CS as u64, 2 * CS as u64);
    let opts = OpenOptions {
        budget: Some(budget.clone()),
        log_dir: Some(logs.path().to_path_buf()),
        ..OpenOptions::default()
    };
    let v = Volume::open(store, "v/", opts).await.expect("open");
    let a = common::pattern(1, 4096);
    let a2 = common::pattern(2, 4096);
    let b = common::pattern(3, 4096);
    v.write(0, &a).await.expect("write a");
    v.write(4096, &a2).await.expect("write a2");
    journal.arm(&format::journal_prefix("v/"), 1);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    journal.until(1, false).await;
    // The chunk stays dirty after the flush: its pages a and a2 are in
    // the segment the flush deletes once committed.
    v.write(8192, &b).await.expect("write b while the record is in flight");
    let mut segs: Vec<std::path::PathBuf> =
        walk(logs.path()).into_iter().filter(|p| p.to_string_lossy().contains("seg-")).collect();
    segs.sort();
    let old = &segs[0];
    let len = std::fs::metadata(old).expect("meta").len();
    // a2's entry is the last in it: cut into its bytes.
    std::fs::OpenOptions::new().write(true).open(old).expect("open").set_len(len - 100).expect("cut");
    journal.release.add_permits(1);
    flush.await.expect("join").expect("flush");
    // Page a is in memory now (4 KiB), whatever became of a2.
    let held = budget.dirty_bytes();
    assert!(held >= 4096 + 2 * 128, "a page brought into memory is not counted: {held} bytes held");
    drop(v);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The checkpoint parts under `vol`: (seq, tag) of each.
async fn checkpoint_parts(store: &DynStore, vol: &str) -> Vec<(u64, u64)> {
    store::list_all(store.as_ref(), &format::checkpoint_prefix(vol))
        .await
        .expect("list")
        .iter()
        .filter_map(|o| format::parse_checkpoint_part_key(vol, &o.key).map(|(s, t, _)| (s, t)))
        .collect()
}

/// A chunk map past one checkpoint part (here entries for chunks that
/// read as zeros, as trimming records them) is checkpointed as a manifest
/// and parts: a fresh opener starts from it, fsck checks every part, a
/// second writer of the same seq takes its own parts back, and compaction
/// writes the next one in parts too and removes the old one's.
async fn a_map_past_one_checkpoint_part_is_checkpointed_in_parts(store: DynStore) {
    let vol = format!("{}/", common::unique("split"));
    let n = format::CHECKPOINT_PART_ENTRIES as u64 * 2 + 10;
    create(&store, &vol, (n + 8) * CS as u64).await;
    let v = open(&store, &vol).await;
    let mut want = common::pattern(1, 3 * CS as usize);
    v.write(0, &want).await.expect("write");
    v.flush().await.expect("flush");
    let st = replay::replay(store.as_ref(), &vol, CS as u64, None).await.expect("replay");
    let mut map = st.map.clone();
    map.extend((8..n).map(|i| (i, format::ChunkRef::Zero)));
    let cp = Checkpoint { seq: st.head, epoch: st.epoch, size: st.size, map, patches: st.patches.clone() };
    assert!(replay::write_checkpoint(store.as_ref(), &vol, &cp).await.expect("checkpoint"), "not written");
    let parts = checkpoint_parts(&store, &vol).await;
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert!(!replay::write_checkpoint(store.as_ref(), &vol, &cp).await.expect("again"), "written twice");
    assert_eq!(checkpoint_parts(&store, &vol).await, parts, "the second writer's parts were left behind");

    let from = replay::replay(store.as_ref(), &vol, CS as u64, None).await.expect("replay");
    assert_eq!((from.checkpoint, from.map.len() as u64), (Some(st.head), n - 8 + st.map.len() as u64));
    assert_stored(&store, &vol, 3 * CS as u64, &want, "from a split checkpoint").await;
    let rep = fsck::fsck(store.as_ref(), &vol, true, &|_, _| {}).await.expect("fsck");
    assert_eq!(rep.checkpoint_parts, 3);
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);

    let more = common::pattern(2, CS as usize);
    v.write(CS as u64, &more).await.expect("write");
    v.flush().await.expect("flush");
    want[CS as usize..2 * CS as usize].copy_from_slice(&more);
    let opts = compact::CompactOptions { safety_age: Duration::ZERO, ..Default::default() };
    let rep = compact::compact(&store, &vol, &opts, &s3blk::clock::SystemClock).await.expect("compact");
    let x = rep.folded_seq.expect("folded");
    assert!(x > st.head && rep.checkpoints_written == 1, "{rep:?}");
    assert_eq!(rep.checkpoint_parts_deleted, 3, "{rep:?}");
    let parts = checkpoint_parts(&store, &vol).await;
    assert!(parts.len() == 3 && parts.iter().all(|(s, _)| *s == x), "{parts:?}");
    assert_stored(&store, &vol, 3 * CS as u64, &want, "after compaction").await;
    drop(v);
    let v = open(&store, &vol).await;
    assert_eq!(v.read(0, 3 * CS as u64).await.expect("read"), want);
}
on_both_stores!(a_map_past_one_checkpoint_part_is_checkpointed_in_parts);

/// Parts a writer of a checkpoint left without its manifest (it died, or
/// lost the race and could not take them back): fsck names them, and
/// compaction removes them once it folds past their seq, not before (the
/// manifest may be on its way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_parts_no_manifest_names_go_once_folded_past() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    create(&store, vol, 8 * CS as u64).await;
    let v = open(&store, vol).await;
    v.write(0, &common::pattern(1, CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    let st = replay::replay(store.as_ref(), vol, CS as u64, None).await.expect("replay");
    let mut map = st.map.clone();
    map.extend((8..format::CHECKPOINT_PART_ENTRIES as u64 + 20).map(|i| (i, format::ChunkRef::Zero)));
    let cp = Checkpoint { seq: st.head, epoch: st.epoch, size: st.size, map, patches: st.patches.clone() };
    let (_, parts) = cp.encode_stored(77);
    assert_eq!(parts.len(), 2);
    for (n, p) in parts.into_iter().enumerate() {
        let key = format::checkpoint_part_key(vol, st.head, 77, n as u32);
        store.put(&key, Bytes::from(p), PutMode::Overwrite).await.expect("part");
    }
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck");
    assert!(rep.clean && rep.checkpoint_parts == 2, "{rep:?}");
    assert!(rep.warnings.iter().any(|w| w.contains("no checkpoint names")), "{:?}", rep.warnings);
    // Folded up to their seq, not past it: they stay.
    let rep = compact::compact(&store, vol, &eager(), &s3blk::clock::SystemClock).await.expect("compact");
    assert_eq!((rep.folded_seq, rep.checkpoint_parts_deleted), (Some(st.head), 0), "{rep:?}");
    assert_eq!(checkpoint_parts(&store, vol).await.len(), 2);
    v.write(CS as u64, &common::pattern(2, CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    let rep = compact::compact(&store, vol, &eager(), &s3blk::clock::SystemClock).await.expect("compact");
    assert!(rep.folded_seq > Some(st.head) && rep.checkpoint_parts_deleted == 2, "{rep:?}");
    assert!(checkpoint_parts(&store, vol).await.is_empty());
    drop(v);
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck");
    assert!(rep.clean && rep.warnings.is_empty(), "{rep:?}");
}

/// Chunks of a volume whose full map takes two checkpoint parts.
const PAST_ONE_PART: u64 = format::CHECKPOINT_PART_ENTRIES as u64 + 20;

/// A memory store with a volume of [`PAST_ONE_PART`] chunks under `vol`,
/// its first chunk written and flushed.
async fn volume_past_one_part(vol: &str) -> DynStore {
    let store: DynStore = Arc::new(MemoryStore::new());
    create(&store, vol, PAST_ONE_PART * CS as u64).await;
    let v = open(&store, vol).await;
    v.write(0, &common::pattern(1, CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    store
}

/// Write a checkpoint at the head of `vol` whose map also maps chunks 8
/// on as zeros (as trimming records them): it is stored in two parts.
/// Returns its seq.
async fn split_checkpoint_at_head(store: &DynStore, vol: &str) -> u64 {
    let st = replay::replay(store.as_ref(), vol, CS as u64, None).await.expect("replay");
    let mut map = st.map.clone();
    map.extend((8..PAST_ONE_PART).map(|i| (i, format::ChunkRef::Zero)));
    let cp = Checkpoint { seq: st.head, epoch: st.epoch, size: st.size, map, patches: st.patches.clone() };
    assert!(replay::write_checkpoint(store.as_ref(), vol, &cp).await.expect("checkpoint"));
    st.head
}

/// A part of a checkpoint gone while its manifest is still there is
/// damage: the open refuses with a clear error naming it, and fsck reports
/// it; a missing part is never read as an empty range of the map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_missing_a_part_is_damage_not_an_empty_range() {
    let vol = "v/";
    let store = volume_past_one_part(vol).await;
    split_checkpoint_at_head(&store, vol).await;
    let (seq, tag) = checkpoint_parts(&store, vol).await[1];
    let gone = format::checkpoint_part_key(vol, seq, tag, 1);
    store.delete(&gone).await.expect("delete a part");
    let Err(e) = Volume::open(store.clone(), vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await
    else {
        panic!("a volume whose checkpoint lost a part opened");
    };
    assert!(matches!(e, VolumeError::Corrupt(_)) && e.to_string().contains(&gone), "{e}");
    let rep = fsck::fsck(store.as_ref(), vol, false, &|_, _| {}).await.expect("fsck");
    assert!(!rep.clean && rep.errors.iter().any(|e| e.contains(&gone)), "{:?}", rep.errors);
}

/// A checkpoint no replay reads (a newer one covers the head, and no
/// snapshot pins a seq it alone covers) whose part is gone: a manifest
/// whose PUT landed after compaction had removed it and its parts. fsck
/// names it as a warning, not damage: nothing kept depends on it, and
/// compaction removes it. A snapshot that needs it makes it damage again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_checkpoint_no_replay_reads_is_a_warning() {
    let vol = "v/";
    let store = volume_past_one_part(vol).await;
    let old = split_checkpoint_at_head(&store, vol).await;
    let v = open(&store, vol).await;
    v.write(CS as u64, &common::pattern(2, CS as usize)).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    split_checkpoint_at_head(&store, vol).await;
    let (seq, tag) = checkpoint_parts(&store, vol).await[0];
    assert_eq!(seq, old);
    let gone = format::checkpoint_part_key(vol, seq, tag, 1);
    store.delete(&gone).await.expect("delete a part");
    let rep = fsck::fsck(store.as_ref(), vol, false, &|_, _| {}).await.expect("fsck");
    assert!(rep.clean, "{:?}", rep.errors);
    assert!(rep.warnings.iter().any(|w| w.contains(&gone) && w.contains("no replay reads it")), "{:?}", rep.warnings);
    // A snapshot at that seq reads it: damage.
    let rec = format::SnapshotRecord {
        format_version: format::FORMAT_VERSION,
        name: "s".into(),
        seq: old,
        size: PAST_ONE_PART * CS as u64,
        created_unix: 0,
        token: None,
        clone: None,
        auth: None,
    };
    let body = serde_json::to_vec_pretty(&rec).expect("json");
    store.put(&format::snapshot_key(vol, "s"), body.into(), PutMode::IfAbsent).await.expect("snapshot");
    let rep = fsck::fsck(store.as_ref(), vol, false, &|_, _| {}).await.expect("fsck");
    assert!(!rep.clean && rep.errors.iter().any(|e| e.contains(&gone)), "{:?}", rep.errors);
}

// ------------------------------------------------------------------ ranged reads

const MIB: u64 = 1 << 20;
const VB: u64 = format::VERIFY_BLOCK as u64;

/// Every GET of a chunk object: its key and range.
#[derive(Debug, Default)]
struct ChunkGets(std::sync::Mutex<Vec<(String, Option<std::ops::Range<u64>>)>>);

impl ChunkGets {
    fn take(&self) -> Vec<(String, Option<std::ops::Range<u64>>)> {
        std::mem::take(&mut *self.0.lock().expect("lock"))
    }
}

#[async_trait::async_trait]
impl common::Around for ChunkGets {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<Bytes> {
        if key.contains("/chunks/") {
            self.0.lock().expect("lock").push((key.to_string(), range.clone()));
        }
        inner.get(key, range).await
    }
}

/// A volume of 1 MiB chunks (16 verified blocks each) whose first two
/// chunks hold `pattern(1, 2 MiB)`, flushed.
async fn two_chunks_of_1mib(store: &DynStore, vol: &str) -> Vec<u8> {
    let opts = CreateOptions::new(4 * MIB, MIB as u32);
    Volume::create(store.clone(), vol, opts, &s3blk::clock::SystemClock).await.expect("create");
    let data = common::pattern(1, 2 * MIB as usize);
    let v = open(store, vol).await;
    v.write(0, &data).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    data
}

/// The key of chunk `index`'s only object.
async fn chunk_object(store: &DynStore, vol: &str, index: u64) -> String {
    let keys = keys(store, &format::chunk_prefix(vol)).await;
    let mut of = keys.into_iter().filter(|k| format::parse_chunk_key(vol, k).is_some_and(|(i, _)| i == index));
    let key = of.next().expect("the chunk's object");
    assert!(of.next().is_none(), "chunk {index} has more than one object");
    key
}

/// Chunk GETs that take `whole` when they fetch a whole object and
/// `ranged` when they fetch a range.
#[derive(Debug)]
struct ChunkGetDelays {
    whole: Duration,
    ranged: Duration,
}

#[async_trait::async_trait]
impl common::Around for ChunkGetDelays {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<Bytes> {
        if key.contains("/chunks/") {
            tokio::time::sleep(if range.is_some() { self.ranged } else { self.whole }).await;
        }
        inner.get(key, range).await
    }
}

/// `store` with chunk GETs delayed as `delays` says, every chunk GET
/// recorded.
fn delayed_and_recorded(store: &DynStore, delays: ChunkGetDelays) -> Arc<common::Wrapped<ChunkGets>> {
    let delayed: DynStore = common::Wrapped::new(store.clone(), delays);
    common::Wrapped::new(delayed, ChunkGets::default())
}

/// A read of a few KiB of a chunk that is not cached fetches the blocks
/// that hold them and the chunk's table (once), not the whole chunk; a
/// second miss in a chunk fetches it whole while no whole chunk has been
/// measured, and afterwards only where a whole chunk costs little more
/// than a ranged fetch (here whole chunks take 300 ms more); a sequential
/// reader still fetches whole chunks.
async fn a_small_cold_read_fetches_its_blocks_and_the_table_not_the_whole_chunk(store: DynStore) {
    let vol = &format!("{}/", common::unique("ranged"));
    let data = two_chunks_of_1mib(&store, vol).await;
    let gets =
        delayed_and_recorded(&store, ChunkGetDelays { whole: Duration::from_millis(300), ranged: Duration::ZERO });
    let logged: DynStore = gets.clone();
    let v = open_ro(&logged, vol).await;
    let chunk0 = chunk_object(&store, vol, 0).await;
    let chunk1 = chunk_object(&store, vol, 1).await;
    let table = MIB..MIB + format::table_len(MIB);
    let r = |at: u64, len: u64| data[at as usize..(at + len) as usize].to_vec();
    let sorted = |mut got: Vec<(String, Option<std::ops::Range<u64>>)>| {
        got.sort_by_key(|(_, r)| r.as_ref().map(|r| r.start));
        got
    };
    assert_eq!(v.read(4 * VB, 2048).await.expect("read"), r(4 * VB, 2048));
    assert_eq!(
        sorted(gets.take()),
        vec![(chunk0.clone(), Some(4 * VB..5 * VB)), (chunk0.clone(), Some(table.clone()))]
    );
    // The same block again (not where the last read ended, which a
    // sequential reader would read next): from the cache.
    assert_eq!(v.read(4 * VB + 3072, 1024).await.expect("read"), r(4 * VB + 3072, 1024));
    assert_eq!(gets.take(), vec![]);
    // Another block of the chunk, with no whole chunk measured yet: the
    // whole chunk, which measures it.
    assert_eq!(v.read(10 * VB, VB / 2).await.expect("read"), r(10 * VB, VB / 2));
    assert_eq!(gets.take(), vec![(chunk0.clone(), None)]);
    assert_eq!(v.read(5 * VB - 1024, 2048).await.expect("read"), r(5 * VB - 1024, 2048));
    assert_eq!(gets.take(), vec![]);
    // Chunk 1, with whole chunks measured slow: a block and the table...
    assert_eq!(v.read(MIB + 4 * VB, 2048).await.expect("read"), r(MIB + 4 * VB, 2048));
    assert_eq!(
        sorted(gets.take()),
        vec![(chunk1.clone(), Some(4 * VB..5 * VB)), (chunk1.clone(), Some(table.clone()))]
    );
    // ...another block of the chunk: its bytes only, the table is known...
    assert_eq!(v.read(MIB + 10 * VB, VB / 2).await.expect("read"), r(MIB + 10 * VB, VB / 2));
    assert_eq!(gets.take(), vec![(chunk1.clone(), Some(10 * VB..11 * VB))]);
    // ...across two blocks, one of them cached...
    assert_eq!(v.read(MIB + 5 * VB - 1024, 2048).await.expect("read"), r(MIB + 5 * VB - 1024, 2048));
    assert_eq!(gets.take(), vec![(chunk1.clone(), Some(4 * VB..6 * VB))]);
    // ...more than half the chunk: the whole object, in one GET.
    assert_eq!(v.read(MIB + MIB / 8, 5 * MIB / 8).await.expect("read"), r(MIB + MIB / 8, 5 * MIB / 8));
    assert_eq!(gets.take(), vec![(chunk1.clone(), None)]);
    // A sequential reader of chunk 1: ranged first, then the whole chunk.
    drop(v);
    let v = open_ro(&logged, vol).await;
    assert_eq!(v.read(MIB, 4096).await.expect("read"), &data[MIB as usize..MIB as usize + 4096]);
    assert_eq!(v.read(MIB + 4096, 4096).await.expect("read"), &data[MIB as usize + 4096..MIB as usize + 8192]);
    let got = gets.take();
    assert!(got.iter().filter(|(k, r)| k.contains("/0000000000000001/") && r.is_none()).count() == 1, "{got:?}");
    // The read path's answers agree with a writer's whole reads.
    drop(v);
    let w = open(&logged, vol).await;
    assert_eq!(w.read(0, 2 * MIB).await.expect("read"), data);
    assert_fsck_clean(&store, vol).await;
}
on_both_stores!(a_small_cold_read_fetches_its_blocks_and_the_table_not_the_whole_chunk);

// ------------------------------------------------------------------ compression

/// Log-like text: compresses well.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut n = seed;
    while out.len() < len {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.extend_from_slice(format!("{n:>20} INFO volume pvc-{:04} staged on node-{}\n", n % 9973, n % 7).as_bytes());
    }
    out.truncate(len);
    out
}

/// A compressed volume of 1 MiB chunks: chunk 0 text, chunk 1 noise,
/// chunk 2 text; flushed. Returns the three chunks' bytes.
async fn compressed_volume(store: &DynStore, vol: &str, codec: format::Codec) -> Vec<u8> {
    let opts = CreateOptions { compression: Some(codec), ..CreateOptions::new(4 * MIB, MIB as u32) };
    let meta = Volume::create(store.clone(), vol, opts, &s3blk::clock::SystemClock).await.expect("create");
    assert_eq!((meta.format_version, meta.compression), (format::FORMAT_V5, Some(codec)));
    let mut data = text(MIB as usize, 1);
    data.extend(common::pattern(2, MIB as usize));
    data.extend(text(MIB as usize, 3));
    let v = open(store, vol).await;
    v.write(0, &data).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    data
}

/// A compressed volume stores its compressible chunks packed (smaller
/// objects), its incompressible ones as they are, and reads all of them
/// back: whole, and by a small cold read that fetches the packed chunk's
/// table and then only the blocks it needs; fsck verifies it.
async fn compressed_chunks_are_smaller_and_read_back_by_range(store: DynStore) {
    for codec in [format::Codec::Lz4, format::Codec::Zstd] {
        let vol = &format!("{}/", common::unique(codec.name()));
        let data = compressed_volume(&store, vol, codec).await;
        let size_of = |k: String| {
            let store = store.clone();
            async move { store.head(&k).await.expect("head").expect("there") }
        };
        let (c0, c1, c2) = (
            chunk_object(&store, vol, 0).await,
            chunk_object(&store, vol, 1).await,
            chunk_object(&store, vol, 2).await,
        );
        let ptl = format::packed_table_len(MIB);
        assert!(
            size_of(c0.clone()).await < MIB * 5 / 8,
            "{codec:?}: text stored in {} bytes",
            size_of(c0.clone()).await
        );
        assert!(size_of(c2.clone()).await < MIB * 5 / 8);
        assert_eq!(size_of(c1.clone()).await, MIB + format::table_len(MIB), "noise is stored as it is");
        let gets = delayed_and_recorded(&store, ChunkGetDelays { whole: Duration::ZERO, ranged: Duration::ZERO });
        let logged: DynStore = gets.clone();
        let v = open_ro(&logged, vol).await;
        let r = |at: u64, len: u64| data[at as usize..(at + len) as usize].to_vec();
        assert_eq!(v.read(4 * VB + 100, 2048).await.expect("read"), r(4 * VB + 100, 2048));
        let got = gets.take();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], (c0.clone(), Some(0..ptl)), "the table first");
        let blocks = got[1].1.clone().expect("a range");
        assert_eq!(got[1].0, c0);
        assert!(blocks.start >= ptl && blocks.end - blocks.start < VB, "one packed block: {blocks:?}");
        // Cached now; another block of chunk 2 reads alike; the noise chunk as before.
        assert_eq!(v.read(4 * VB + 3000, 1000).await.expect("read"), r(4 * VB + 3000, 1000));
        assert_eq!(gets.take(), vec![]);
        assert_eq!(v.read(2 * MIB + 9 * VB, 4096).await.expect("read"), r(2 * MIB + 9 * VB, 4096));
        assert_eq!(gets.take().len(), 2);
        assert_eq!(v.read(MIB + 3 * VB, 4096).await.expect("read"), r(MIB + 3 * VB, 4096));
        assert_eq!(v.read(0, 3 * MIB).await.expect("read"), data);
        drop(v);
        assert_stored(&store, vol, 3 * MIB, &data, "a fresh opener").await;
        // A writer's partial overwrite of a packed chunk reads its base back.
        let w = open(&store, vol).await;
        let patch = common::pattern(9, 10_000);
        w.write(MIB / 2 + 7, &patch).await.expect("write");
        w.flush().await.expect("flush");
        drop(w);
        let mut want = data.clone();
        want[MIB as usize / 2 + 7..MIB as usize / 2 + 7 + patch.len()].copy_from_slice(&patch);
        assert_stored(&store, vol, 3 * MIB, &want, "after a partial overwrite").await;
    }
}
on_both_stores!(compressed_chunks_are_smaller_and_read_back_by_range);

/// Damage to a packed chunk (a flipped bit in a block, or in its table, or
/// a cut object) is an error on read, by range or whole, and fsck reports
/// it; never other bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_a_packed_chunk_is_found() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    compressed_volume(&mem, vol, format::Codec::Zstd).await;
    let key = chunk_object(&mem, vol, 0).await;
    let good = mem.get(&key, None).await.expect("get");
    let ptl = format::packed_table_len(MIB) as usize;
    let flip = |at: usize| {
        let mut b = good.to_vec();
        b[at] ^= 0x04;
        Bytes::from(b)
    };
    // What is damaged, and a small read of a block it is in.
    for (what, bad, at) in [
        ("a block", flip(ptl + 40), 100),
        ("the table", flip(20), 5 * VB),
        ("the end", good.slice(..good.len() - 3), MIB - 4096),
    ] {
        mem.put(&key, bad, s3blk::store::PutMode::Overwrite).await.expect("damage");
        let v = open_ro(&mem, vol).await;
        let small = v.read(at, 4096).await;
        assert!(matches!(small, Err(VolumeError::Corrupt(_))), "{what}: a small read gave {small:?}");
        let whole = v.read(0, MIB).await;
        assert!(matches!(whole, Err(VolumeError::Corrupt(_))), "{what}: a whole read gave {:?}", whole.map(|_| ()));
        drop(v);
        let rep = fsck::fsck(mem.as_ref(), vol, true, &|_, _| {}).await.expect("fsck ran");
        assert!(!rep.clean && rep.errors.iter().any(|e| e.contains(&key)), "{what}: {:?}", rep.errors);
    }
    mem.put(&key, good, s3blk::store::PutMode::Overwrite).await.expect("repair");
    assert_fsck_clean(&mem, vol).await;
}

/// Where every request takes long (a store across a network) and a whole
/// chunk costs little more than a few blocks, a chunk read at random a
/// second time comes whole, and later reads of it are served from the
/// cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_latency_bound_store_a_chunk_missed_twice_comes_whole() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let data = two_chunks_of_1mib(&mem, vol).await;
    let each = Duration::from_millis(40);
    let gets = delayed_and_recorded(&mem, ChunkGetDelays { whole: each, ranged: each });
    let logged: DynStore = gets.clone();
    let v = open_ro(&logged, vol).await;
    let r = |at: u64, len: u64| data[at as usize..(at + len) as usize].to_vec();
    for (n, base) in [0, MIB].into_iter().enumerate() {
        assert_eq!(v.read(base + 4 * VB, 4096).await.expect("read"), r(base + 4 * VB, 4096));
        let ranged = gets.take();
        assert!(ranged.len() == 2 && ranged.iter().all(|(_, r)| r.is_some()), "chunk {n}: {ranged:?}");
        assert_eq!(v.read(base + 10 * VB, 4096).await.expect("read"), r(base + 10 * VB, 4096));
        let whole = gets.take();
        assert!(whole.len() == 1 && whole[0].1.is_none(), "chunk {n}, the second miss: {whole:?}");
        for at in [2 * VB, 7 * VB, 13 * VB] {
            assert_eq!(v.read(base + at, 4096).await.expect("read"), r(base + at, 4096));
        }
        assert_eq!(gets.take(), vec![], "chunk {n}: later reads are served from the cache");
    }
}

/// The same, where the cache pool the volume shares with others is
/// smaller than a chunk (its own cap is not): a whole chunk fetched could
/// not stay, so the second miss fetches blocks too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_missed_twice_comes_in_blocks_when_the_shared_cache_cannot_keep_it() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let data = two_chunks_of_1mib(&mem, vol).await;
    let each = Duration::from_millis(40);
    let gets = delayed_and_recorded(&mem, ChunkGetDelays { whole: each, ranged: each });
    let logged: DynStore = gets.clone();
    let budget = s3blk::volume::budget::MemoryBudget::new(4 * MIB, MIB / 2);
    let opts = OpenOptions { read_only: true, budget: Some(budget), ..OpenOptions::default() };
    let v = Volume::open(logged, vol, opts).await.expect("open");
    let r = |at: u64, len: u64| data[at as usize..(at + len) as usize].to_vec();
    assert_eq!(v.read(4 * VB, 4096).await.expect("read"), r(4 * VB, 4096));
    let first = gets.take();
    assert!(!first.is_empty() && first.iter().all(|(_, r)| r.is_some()), "the first miss: {first:?}");
    assert_eq!(v.read(10 * VB, 4096).await.expect("read"), r(10 * VB, 4096));
    let second = gets.take();
    assert!(
        !second.is_empty() && second.iter().all(|(_, r)| r.is_some()),
        "the second miss fetched the whole chunk, which the cache cannot keep: {second:?}"
    );
    assert_eq!(v.read(10 * VB, 4096).await.expect("read"), r(10 * VB, 4096));
    assert_eq!(gets.take(), vec![], "the blocks read stay cached");
}

/// One flipped bit in a block, or in the table, of a chunk object: the
/// reads that need it fail as damage (never return its bytes), other
/// blocks still read, and fsck reports the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_block_or_table_fails_the_reads_that_need_it_and_fsck() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "v/";
    let data = two_chunks_of_1mib(&store, vol).await;
    let key = chunk_object(&store, vol, 0).await;
    let good = store.get(&key, None).await.expect("get");
    assert_eq!(good.len() as u64, MIB + format::table_len(MIB), "a chunk object is its bytes and its table");
    let damage = |at: usize| {
        let mut b = good.to_vec();
        b[at] ^= 0x04;
        Bytes::from(b)
    };
    // Block 3.
    store.put(&key, damage(3 * VB as usize + 5), PutMode::Overwrite).await.expect("damage");
    let v = open_ro(&store, vol).await;
    let e = v.read(3 * VB + 4096, 4096).await.expect_err("a damaged block was read");
    assert!(matches!(e, VolumeError::Corrupt(_)) && e.to_string().contains("block 3"), "{e}");
    assert_eq!(v.read(VB, 4096).await.expect("another block"), &data[VB as usize..VB as usize + 4096]);
    let e = v.read(0, MIB).await.expect_err("the whole damaged chunk was read");
    assert!(matches!(e, VolumeError::Corrupt(_)) && e.to_string().contains("block 3"), "{e}");
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck");
    assert!(!rep.clean && rep.errors.iter().any(|e| e.contains(&key) && e.contains("block 3")), "{:?}", rep.errors);
    // The table.
    store.put(&key, damage(MIB as usize + 2), PutMode::Overwrite).await.expect("damage");
    let v = open_ro(&store, vol).await;
    let e = v.read(VB, 4096).await.expect_err("a block read through a damaged table");
    assert!(matches!(e, VolumeError::Corrupt(_)) && e.to_string().contains("table"), "{e}");
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck");
    assert!(!rep.clean && rep.errors.iter().any(|e| e.contains(&key) && e.contains("table")), "{:?}", rep.errors);
    // Cut short: the ranged read falls back to the whole object, which says so.
    store.put(&key, good.slice(..MIB as usize), PutMode::Overwrite).await.expect("truncate");
    let v = open_ro(&store, vol).await;
    let e = v.read(VB, 4096).await.expect_err("a block of a truncated object");
    assert!(matches!(e, VolumeError::Corrupt(_)) && e.to_string().contains("bytes, expected"), "{e}");
    store.put(&key, good, PutMode::Overwrite).await.expect("restore");
    assert_stored(&store, vol, 2 * MIB, &data, "restored").await;
}

/// Chunks written whole (format 3) and with a table (format 4) in one
/// volume read alike, whole and ranged, before and after compaction; the
/// records that reference a table are format 4, the others are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_written_whole_and_with_a_table_read_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "v/";
    let opts = CreateOptions::new(4 * MIB, MIB as u32);
    Volume::create(store.clone(), vol, opts, &s3blk::clock::SystemClock).await.expect("create");
    let data = common::pattern(3, 3 * MIB as usize);
    let whole = OpenOptions { chunk_tables: false, ..OpenOptions::default() };
    let v = Volume::open(store.clone(), vol, whole).await.expect("open");
    v.write(0, &data[..2 * MIB as usize]).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let v = open(&store, vol).await;
    v.write(2 * MIB, &data[2 * MIB as usize..]).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let records = keys(&store, &format::journal_prefix(vol)).await;
    let versions: Vec<u32> = futures::future::join_all(records.iter().map(|k| store.get(k, None)))
        .await
        .into_iter()
        .map(|b| {
            let b = b.expect("record");
            u32::from_le_bytes([b[8], b[9], b[10], b[11]])
        })
        .collect();
    // Create, open, the commit of whole chunks, open, the commit of one
    // with a table.
    assert_eq!(versions, [1, 1, 1, 1, 4], "{records:?}");
    let sizes: Vec<u64> = store::list_all(store.as_ref(), &format::chunk_prefix(vol))
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.size)
        .collect();
    assert_eq!(sizes, [MIB, MIB, MIB + format::table_len(MIB)]);
    let check = |v: Volume| {
        let data = data.clone();
        async move {
            for at in [5 * VB + 100, MIB + 9 * VB, 2 * MIB + 3 * VB - 10, 2 * MIB + 15 * VB] {
                let got = v.read(at, 4096).await.expect("ranged read");
                assert!(got == data[at as usize..at as usize + 4096], "at {at}");
            }
            assert!(v.read(0, 3 * MIB).await.expect("whole read") == data);
        }
    };
    check(open_ro(&store, vol).await).await;
    assert_fsck_clean(&store, vol).await;
    compact::compact(&store, vol, &eager(), &s3blk::clock::SystemClock).await.expect("compact");
    check(open_ro(&store, vol).await).await;
    check(open(&store, vol).await).await;
    assert_fsck_clean(&store, vol).await;
}

/// A PUT of parts (how a chunk and its table go up) stores their
/// concatenation as one object, under the same condition as a PUT, on the
/// local store and on S3 (through the retry layer).
async fn a_put_of_parts_is_one_object_under_its_condition(store: DynStore) {
    let key = format!("{}/obj", common::unique("parts"));
    let parts = vec![Bytes::from(common::pattern(1, 70_000)), Bytes::new(), Bytes::from_static(b"tail")];
    store.put_parts(&key, parts.clone(), PutMode::IfAbsent).await.expect("put parts");
    let want = store::concat(&parts);
    assert_eq!(want.len(), 70_004);
    assert_eq!(store.get(&key, None).await.expect("get"), want);
    assert_eq!(store.get(&key, Some(69_998..70_004)).await.expect("ranged get"), want.slice(69_998..));
    let again = store.put_parts(&key, vec![Bytes::from_static(b"other")], PutMode::IfAbsent).await;
    assert!(matches!(again, Err(store::StoreError::PreconditionFailed(_))), "{again:?}");
    assert_eq!(store.get(&key, None).await.expect("get"), want, "a refused PUT changed the object");
    store.put_parts(&key, vec![Bytes::from_static(b"new")], PutMode::Overwrite).await.expect("overwrite");
    assert_eq!(store.get(&key, None).await.expect("get"), &b"new"[..]);
}
on_both_stores!(a_put_of_parts_is_one_object_under_its_condition);

/// A replace `If-Match` lands only while the object is still the one whose
/// tag was read: a stale tag is refused and changes nothing, a missing
/// object is not found, and of replaces racing from one tag exactly one
/// lands (on the local store: threads holding its file lock in turn; on
/// S3: the server's condition), through the retry layer.
async fn a_replace_if_match_lands_only_over_what_was_read(store: DynStore) {
    let prefix = format!("{}/", common::unique("cas"));
    assert!(store::supports_conditional_replace(store.as_ref(), &prefix).await.expect("probe"));
    let key = format!("{prefix}meta");
    let gone = store.put_if_match(&key, Bytes::from_static(b"x"), "\"00\"").await;
    assert!(matches!(gone, Err(store::StoreError::NotFound(_))), "{gone:?}");
    store.put(&key, Bytes::from_static(b"first"), PutMode::IfAbsent).await.expect("put");
    let (body, tag) = store.get_tagged(&key).await.expect("get tagged");
    assert_eq!(body, &b"first"[..]);
    store.put_if_match(&key, Bytes::from_static(b"second"), &tag).await.expect("replace over what was read");
    let (body, tag2) = store.get_tagged(&key).await.expect("get tagged");
    assert_eq!(body, &b"second"[..]);
    assert_ne!(tag, tag2, "other bytes, the same tag");
    let stale = store.put_if_match(&key, Bytes::from_static(b"stale"), &tag).await;
    assert!(matches!(stale, Err(store::StoreError::PreconditionFailed(_))), "{stale:?}");
    assert_eq!(store.get(&key, None).await.expect("get"), &b"second"[..], "a refused replace changed the object");
    // Racing from one tag: one lands, the others are refused.
    let racers = (0..8u8).map(|i| {
        let (store, key, tag) = (store.clone(), key.clone(), tag2.clone());
        tokio::spawn(async move { (i, store.put_if_match(&key, Bytes::from(vec![b'a' + i; 64]), &tag).await) })
    });
    let mut landed = Vec::new();
    for r in futures::future::join_all(racers).await {
        match r.expect("racer") {
            (i, Ok(())) => landed.push(i),
            (_, Err(store::StoreError::PreconditionFailed(_))) => {}
            (_, Err(e)) => panic!("a racing replace: {e}"),
        }
    }
    assert_eq!(landed.len(), 1, "replaces from one tag that landed: {landed:?}");
    assert_eq!(store.get(&key, None).await.expect("get"), vec![b'a' + landed[0]; 64]);
}
on_both_stores!(a_replace_if_match_lands_only_over_what_was_read);

/// Readahead grows with what a sequential reader read in a row: a short
/// run fetches nothing ahead, a long scan keeps up to 16 chunks ahead (a
/// quarter of the cache at most); reads elsewhere fetch nothing ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_starts_at_one_chunk_and_grows_with_a_sequential_reader() {
    use std::collections::BTreeSet;
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let chunks = 48u64;
    let opts = CreateOptions::new(chunks * MIB, MIB as u32);
    Volume::create(mem.clone(), vol, opts, &s3blk::clock::SystemClock).await.expect("create");
    let data = common::pattern(5, (chunks * MIB) as usize);
    let v = open(&mem, vol).await;
    v.write(0, &data).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let gets = common::Wrapped::new(mem.clone(), ChunkGets::default());
    let logged: DynStore = gets.clone();
    let fetched = |g: &[(String, Option<std::ops::Range<u64>>)]| -> BTreeSet<u64> {
        g.iter().filter_map(|(k, _)| format::parse_chunk_key(vol, k).map(|(i, _)| i)).collect()
    };
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    let v = Volume::open(
        logged.clone(),
        vol,
        OpenOptions { read_only: true, cache_limit: 256 * MIB, ..Default::default() },
    )
    .await
    .expect("open");
    // Random reads: nothing ahead.
    for at in [40 * MIB + 4096, 7 * MIB, 23 * MIB + 100] {
        assert!(v.read(at, 4096).await.expect("read") == data[at as usize..at as usize + 4096]);
    }
    settle().await;
    assert_eq!(fetched(&gets.take()), BTreeSet::from([40, 7, 23]), "random reads fetched chunks ahead");
    // Two reads in a row: the chunk they read (whole, for a reader that
    // goes on), nothing ahead.
    for at in [2 * MIB, 2 * MIB + 4096] {
        assert!(v.read(at, 4096).await.expect("read") == data[at as usize..at as usize + 4096]);
    }
    settle().await;
    assert_eq!(fetched(&gets.take()), BTreeSet::from([2]), "a short sequential run fetched chunks ahead");
    // A long scan in 256 KiB reads: the window reaches 16 chunks.
    let mut most_ahead = 0;
    let mut at = 10 * MIB;
    while at < 20 * MIB {
        assert!(v.read(at, 256 << 10).await.expect("read") == data[at as usize..at as usize + (256 << 10)]);
        settle().await;
        let ahead = fetched(&gets.0.lock().expect("lock")).into_iter().max().unwrap_or(0).saturating_sub(at / MIB);
        most_ahead = most_ahead.max(ahead);
        at += 256 << 10;
    }
    assert_eq!(most_ahead, 16, "readahead did not grow to its limit");
    assert!(fetched(&gets.take()).into_iter().max() <= Some(20 + 16), "readahead went past its window");
    // With a small cache, a quarter of it.
    drop(v);
    let v =
        Volume::open(logged.clone(), vol, OpenOptions { read_only: true, cache_limit: 8 * MIB, ..Default::default() })
            .await
            .expect("open");
    for n in 0..12u64 {
        let at = n * (64 << 10);
        assert!(v.read(at, 64 << 10).await.expect("read") == data[at as usize..at as usize + (64 << 10)]);
    }
    settle().await;
    // 768 KiB read in a row: twice that is one chunk, under the quarter of
    // the cache (two chunks).
    assert_eq!(fetched(&gets.take()), BTreeSet::from([0, 1]), "readahead past what was read or the cache");
}

/// A proxy in front of the test's S3 endpoint that keeps a copy of every
/// byte clients send through it; with `hide_ranges`, the server sees no
/// Range header (it answers with whole objects).
async fn recording_proxy(endpoint: &str, hide_ranges: bool) -> (String, Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = endpoint.trim_start_matches("http://").trim_end_matches('/').to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        log.lock().expect("lock").extend_from_slice(&buf[..n]);
                        if hide_ranges {
                            let name = b"\r\nrange: ";
                            if let Some(at) = buf[..n].windows(name.len()).position(|w| w.eq_ignore_ascii_case(name)) {
                                buf[at + 2] = b'x';
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (url, sent)
}

/// A chunk's PUT sends its bytes and table as they are (unsigned: their
/// SHA-256 is not in the request's signature), so with request checksums
/// "when required" (the default for a custom endpoint) it carries their
/// MD5 for the server to check; a plain PUT is signed with its SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_of_parts_carries_the_md5_of_its_bytes() {
    use md5::Digest;
    let Some(endpoint) = common::s3_endpoint() else { return };
    let (proxy, sent) = recording_proxy(&endpoint, false).await;
    let bucket = common::unique("bkt");
    let raw = s3blk::store::s3::S3Store::connect(&bucket, common::s3_settings(&proxy)).await.expect("client");
    raw.client().create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let parts = vec![Bytes::from(common::pattern(1, 70_000)), Bytes::from_static(b"tail")];
    raw.put("plain", store::concat(&parts), PutMode::IfAbsent).await.expect("put");
    raw.put_parts("parts", parts.clone(), PutMode::IfAbsent).await.expect("put parts");
    assert_eq!(raw.get("parts", None).await.expect("get"), store::concat(&parts));
    let text = String::from_utf8_lossy(&sent.lock().expect("lock")).to_lowercase();
    let headers = |key: &str| {
        let at = text.find(&format!("put /{bucket}/{key}")).expect("the request");
        text[at..at + text[at..].find("\r\n\r\n").expect("headers")].to_string()
    };
    let md5 = aws_smithy_types::base64::encode(md5::Md5::digest(store::concat(&parts))).to_lowercase();
    let parts_put = headers("parts");
    assert!(parts_put.contains(&format!("content-md5: {md5}")), "no MD5 of the bytes in a chunk's PUT:\n{parts_put}");
    assert!(!headers("plain").contains("unsigned-payload"), "a plain PUT went unsigned");
}

/// A store that answers a ranged GET with the whole object (a gateway that
/// ignores Range, HTTP 200): reads fall back to checking the whole chunk.
#[derive(Debug, Default)]
struct IgnoresRange;

#[async_trait::async_trait]
impl common::Around for IgnoresRange {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        _: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<Bytes> {
        inner.get(key, None).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ignores_ranges_reads_whole_chunks_not_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "v/";
    let data = two_chunks_of_1mib(&store, vol).await;
    let wrapped: DynStore = common::Wrapped::new(store.clone(), IgnoresRange);
    let v = open_ro(&wrapped, vol).await;
    for at in [3 * VB + 100, MIB + 5 * VB] {
        let got = v.read(at, 4096).await.expect("a sound chunk read as damaged");
        assert!(got == data[at as usize..at as usize + 4096], "at {at}");
    }
}

/// Blocks cached inside a longer run that starts before them are served
/// from the cache, not fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_cached_inside_a_longer_run_are_not_fetched_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    let vol = "v/";
    let data = two_chunks_of_1mib(&store, vol).await;
    let gets = common::Wrapped::new(store.clone(), ChunkGets::default());
    let logged: DynStore = gets.clone();
    let v = open_ro(&logged, vol).await;
    let r = |at: u64, len: u64| data[at as usize..(at + len) as usize].to_vec();
    // Block 1, then blocks 0 to 2.
    assert_eq!(v.read(VB + 10, 100).await.expect("read"), r(VB + 10, 100));
    assert_eq!(v.read(10, 3 * VB - 20).await.expect("read"), r(10, 3 * VB - 20));
    gets.take();
    for at in [2 * VB + 10, VB + 500, 20] {
        assert_eq!(v.read(at, 100).await.expect("read"), r(at, 100));
    }
    assert_eq!(gets.take(), vec![], "cached blocks fetched again");
}

/// An S3 server that ignores Range answers a ranged GET with the whole
/// object and no Content-Range: the S3 store refuses ranged reads from
/// then on without asking the server (the engine reads whole chunks), and
/// whole reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_server_that_ignores_ranges_gets_no_more_ranged_reads() {
    let Some(endpoint) = common::s3_endpoint() else { return };
    let (proxy, sent) = recording_proxy(&endpoint, true).await;
    let bucket = common::unique("bkt");
    let raw = s3blk::store::s3::S3Store::connect(&bucket, common::s3_settings(&proxy)).await.expect("client");
    raw.client().create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let body = Bytes::from(common::pattern(2, 1000));
    raw.put("obj", body.clone(), PutMode::IfAbsent).await.expect("put");
    let gets = || String::from_utf8_lossy(&sent.lock().expect("lock")).matches("GET /").count();
    for _ in 0..3 {
        let e = raw.get("obj", Some(100..164)).await.expect_err("a ranged read answered");
        assert!(matches!(&e, store::StoreError::Permanent(m) if m.contains("ignores Range")), "{e}");
    }
    assert_eq!(gets(), 1, "ranged reads went on to a server that ignores them");
    assert_eq!(raw.get("obj", None).await.expect("whole read"), body);
    let text = String::from_utf8_lossy(&sent.lock().expect("lock")).to_lowercase();
    assert!(text.contains("\r\nrange: bytes=100-163"), "the GET asked for no range");
}

/// Through a server that ignores Range, a volume's chunks are read whole,
/// once each, and cached, not fetched whole for every block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_on_an_s3_server_that_ignores_ranges_reads_each_chunk_once() {
    let Some(endpoint) = common::s3_endpoint() else { return };
    let (proxy, sent) = recording_proxy(&endpoint, true).await;
    let bucket = common::unique("bkt");
    let raw = s3blk::store::s3::S3Store::connect(&bucket, common::s3_settings(&proxy)).await.expect("client");
    raw.client().create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let store: DynStore = Arc::new(raw);
    let data = two_chunks_of_1mib(&store, "v/").await;
    let chunk_gets = || String::from_utf8_lossy(&sent.lock().expect("lock")).matches("/v/chunks/").count();
    let v = open_ro(&store, "v/").await;
    let before = chunk_gets();
    for at in [3 * VB + 100, 9 * VB, 5 * VB + 7, MIB + 2 * VB, MIB + 11 * VB] {
        assert!(v.read(at, 4096).await.expect("read") == data[at as usize..at as usize + 4096], "at {at}");
    }
    // The first read learns that ranges are ignored (two ranged GETs), then
    // each chunk is read whole once.
    assert!(chunk_gets() - before <= 4, "{} GETs of chunk objects for 5 reads in 2 chunks", chunk_gets() - before);
}

/// A cache smaller than a chunk cannot keep what readahead fetches: a
/// sequential reader's every read must not fetch the next chunk whole
/// again (nor its own chunk whole, when a ranged fetch would do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_into_a_cache_smaller_than_a_chunk_is_not_a_get_per_read() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let data = two_chunks_of_1mib(&mem, vol).await;
    let gets = common::Wrapped::new(mem.clone(), ChunkGets::default());
    let logged: DynStore = gets.clone();
    let v = Volume::open(
        logged.clone(),
        vol,
        OpenOptions { read_only: true, cache_limit: 512 << 10, ..Default::default() },
    )
    .await
    .expect("open");
    for n in 0..20u64 {
        let at = n * 4096;
        assert!(v.read(at, 4096).await.expect("read") == data[at as usize..at as usize + 4096]);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = gets.take();
    let whole = |i: &str| got.iter().filter(|(k, r)| k.contains(i) && r.is_none()).count();
    let (c0, c1) = (whole("/0000000000000000/"), whole("/0000000000000001/"));
    assert!(c1 <= 1 && c0 <= 1, "20 reads of 4 KiB: chunk 0 fetched whole {c0} times, chunk 1 (readahead) {c1} times");
}

/// GETs of chunk objects other than chunk 0 take a while.
#[derive(Debug, Default)]
struct SlowAhead;

#[async_trait::async_trait]
impl common::Around for SlowAhead {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<Bytes> {
        if key.contains("/chunks/") && !key.contains("/0000000000000000/") {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        inner.get(key, range).await
    }
}

/// While readahead's fetches are in flight, a sequential reader's reads
/// must not each spawn another task for every chunk in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_in_flight_is_not_spawned_again_for_every_read() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let data = two_chunks_of_1mib(&mem, vol).await;
    let slow: DynStore = common::Wrapped::new(mem.clone(), SlowAhead);
    let v = open_ro(&slow, vol).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let mut most = 0;
    for n in 0..200u64 {
        let at = n * 4096;
        assert!(v.read(at, 4096).await.expect("read") == data[at as usize..at as usize + 4096]);
        most = most.max(metrics.num_alive_tasks().saturating_sub(before));
    }
    assert!(most <= 16, "{most} readahead tasks alive at once for a volume of 4 chunks");
}

/// A handful of small reads in a row (a filesystem reading a few
/// consecutive 4 KiB blocks) must not fetch the window's full 16 chunks:
/// readahead should grow with what the reader consumed, not per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_small_sequential_reads_do_not_fetch_sixteen_chunks_ahead() {
    use std::collections::BTreeSet;
    let mem: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let chunks = 48u64;
    let opts = CreateOptions::new(chunks * MIB, MIB as u32);
    Volume::create(mem.clone(), vol, opts, &s3blk::clock::SystemClock).await.expect("create");
    let v = open(&mem, vol).await;
    v.write(0, &common::pattern(5, (chunks * MIB) as usize)).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let gets = common::Wrapped::new(mem.clone(), ChunkGets::default());
    let logged: DynStore = gets.clone();
    let v = Volume::open(
        logged.clone(),
        vol,
        OpenOptions { read_only: true, cache_limit: 256 * MIB, ..Default::default() },
    )
    .await
    .expect("open");
    for n in 0..6u64 {
        v.read(10 * MIB + n * 4096, 4096).await.expect("read");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: BTreeSet<u64> =
        gets.take().iter().filter_map(|(k, _)| format::parse_chunk_key(vol, k).map(|(i, _)| i)).collect();
    assert!(got.len() <= 3, "24 KiB read sequentially in chunk 10 fetched chunks {got:?}");
}

/// Compaction reads maps as views (a checkpoint's parts one at a time,
/// the records after it laid over each) and writes checkpoints from them
/// part by part. A view at any seq must be exactly the map replay builds,
/// patches included, and the checkpoint written from it must read back as
/// that map, across checkpoints split into parts of 3 entries, whole
/// chunks, inline pages and trims over several folds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_views_equal_replay_at_every_seq() {
    use s3blk::volume::mapview;
    format::set_checkpoint_part_entries(3);
    for seed in 1..=3u64 {
        let store: DynStore = Arc::new(MemoryStore::new());
        let vol = "v/";
        let cs = CS as u64;
        create(&store, vol, 24 * cs).await;
        let v = open(&store, vol).await;
        let (mut split, mut written) = (0, 0);
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..14 {
            for _ in 0..1 + next(4) {
                let chunk = next(24);
                match next(4) {
                    // A whole chunk.
                    0 => v.write(chunk * cs, &common::pattern(round * 31 + chunk, CS as usize)).await,
                    // A page: goes inline.
                    1 | 2 => {
                        let page = next(cs / 4096) * 4096;
                        v.write(chunk * cs + page, &common::pattern(round + 7 * chunk, 4096)).await
                    }
                    _ => v.write_zeroes(chunk * cs, cs).await,
                }
                .expect("write");
            }
            v.flush().await.expect("flush");
            if round % 4 == 3 {
                compact::compact(&store, vol, &eager(), &s3blk::clock::SystemClock).await.expect("compact");
            }
            // Every seq still replayable: from the newest checkpoint on
            // (from seq 0 before the first).
            let head = replay::replay(store.as_ref(), vol, cs, None).await.expect("replay");
            for seq in head.checkpoint.unwrap_or(0)..=head.head {
                let want = replay::replay(store.as_ref(), vol, cs, Some(seq)).await.expect("replay");
                let view = mapview::replay_view(store.as_ref(), vol, cs, Some(seq)).await.expect("view");
                let got = view.materialize(store.as_ref(), vol).await.expect("materialize");
                split += matches!(view.base, mapview::Base::Split(_)) as u32;
                let what = format!("seed {seed}, round {round}, seq {seq}");
                assert_eq!((got.head, got.epoch, got.size), (want.head, want.epoch, want.size), "{what}");
                assert_eq!(got.map, want.map, "{what}: the map");
                assert_eq!(got.patches, want.patches, "{what}: the patches");
                // A checkpoint from the view at the head, now and then.
                if seq == head.head
                    && next(2) == 0
                    && store.head(&format::checkpoint_key(vol, seq)).await.expect("head").is_none()
                {
                    assert!(view.write_checkpoint(store.as_ref(), vol).await.expect("write"), "{what}: landed");
                    let cp = replay::read_checkpoint(store.as_ref(), vol, seq).await.expect("read back");
                    assert_eq!((cp.seq, cp.epoch, cp.size), (want.head, want.epoch, want.size), "{what}");
                    assert_eq!(cp.map, want.map, "{what}: the checkpoint's map");
                    assert_eq!(cp.patches, want.patches, "{what}: the checkpoint's patches");
                    written += 1;
                }
            }
        }
        assert!(split > 0 && written > 1, "seed {seed}: {split} views from split checkpoints, {written} written");
        println!("seed {seed}: {split} views from split checkpoints, {written} checkpoints written from views");
        drop(v);
        assert_fsck_clean(&store, vol).await;
    }
}

/// A store whose listing ignores StartAfter (it answers the first page
/// again and again) gets an error, not a listing followed for ever that
/// grows until memory runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_does_not_move_on_is_an_error() {
    #[derive(Debug, Default)]
    struct IgnoresStartAfter(std::sync::atomic::AtomicU32);
    #[async_trait::async_trait]
    impl common::Around for IgnoresStartAfter {
        async fn list(
            &self,
            inner: &DynStore,
            req: s3blk::store::ListRequest<'_>,
        ) -> s3blk::store::StoreResult<s3blk::store::ListPage> {
            if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 100 {
                return Err(s3blk::store::StoreError::Permanent("listed the first page 100 times".into()));
            }
            inner.list(s3blk::store::ListRequest { start_after: None, ..req }).await
        }
    }
    let mem: DynStore = Arc::new(MemoryStore::new());
    for i in 0..1001 {
        mem.put(&format!("p/{i:05}"), Bytes::from_static(b"x"), PutMode::Overwrite).await.expect("put");
    }
    let wrapped: DynStore = common::Wrapped::new(mem, IgnoresStartAfter::default());
    let r = tokio::time::timeout(Duration::from_secs(20), store::list_all(wrapped.as_ref(), "p/"))
        .await
        .expect("the listing was followed for ever");
    assert!(r.as_ref().is_err_and(|e| e.to_string().contains("does not move")), "{:?}", r.map(|v| v.len()));
}
