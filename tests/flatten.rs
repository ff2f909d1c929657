//! Flattening a clone (`Volume::copy_parents`, `catalog::let_go_of_parent`):
//! the clone reads the same afterwards, also with writes going on while it
//! copies; its parent can then be deleted and compacted away; a snapshot
//! of the clone taken before keeps the parent; a flatten cut short at any
//! store call leaves a clone that reads the same, and a second run finishes it.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use s3blk::clock::SystemClock;
use s3blk::store::{DynStore, PutMode, StoreError, StoreResult};
use s3blk::volume::catalog::{self, DeleteOutcome, OnDependants, ParentOutcome};
use s3blk::volume::compact::{self, CompactOptions};
use s3blk::volume::engine::{CreateOptions, snapshot_committed};
use s3blk::volume::{OpenOptions, Volume, VolumeError, format, fsck};

const CS: u32 = 64 << 10;
const CSU: u64 = CS as u64;
const CHUNKS: u64 = 12;

fn opts(size: u64) -> CreateOptions {
    CreateOptions::new(size, CS)
}

fn eager() -> CompactOptions {
    CompactOptions { safety_age: Duration::ZERO, ..CompactOptions::default() }
}

async fn open(store: &DynStore, vol: &str) -> Volume {
    Volume::open(store.clone(), vol, OpenOptions::default()).await.expect("open")
}

async fn read_fresh(store: &DynStore, vol: &str) -> Vec<u8> {
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    let v = Volume::open(store.clone(), vol, ro).await.expect("open read-only");
    v.read(0, v.size()).await.expect("read")
}

async fn assert_fsck_clean(store: &DynStore, vol: &str) {
    let rep = fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck ran");
    assert!(rep.clean, "fsck of {vol} found damage: {:?}", rep.errors);
}

/// A parent `src/` whose snapshot `s` has stored chunks, a zeroed one, a
/// patch of a few pages over a stored chunk and one over zeros, and some
/// chunks never written; then written on after the snapshot (the clone
/// must not see that). Returns what the snapshot reads.
async fn parent_with_snapshot(store: &DynStore) -> Vec<u8> {
    Volume::create(store.clone(), "src/", opts(CHUNKS * CSU), &SystemClock).await.expect("create");
    let w = open(store, "src/").await;
    for i in [0u64, 1, 2, 5, 7] {
        w.write(i * CSU, &common::pattern(i, CS as usize)).await.expect("write");
    }
    w.flush().await.expect("flush");
    w.write_zeroes(CSU, CSU).await.expect("zero");
    // A page over a stored chunk and one over zeros: inline patches.
    w.write(2 * CSU + 4096, &common::pattern(20, 4096)).await.expect("write");
    w.write(9 * CSU + 8192, &common::pattern(21, 4096)).await.expect("write");
    w.flush().await.expect("flush");
    let seen = w.read(0, CHUNKS * CSU).await.expect("read");
    w.snapshot("s").await.expect("snapshot");
    w.write(0, &common::pattern(99, CS as usize)).await.expect("write after");
    w.flush().await.expect("flush");
    seen
}

async fn clone_of_s(store: &DynStore) {
    catalog::clone_volume(store, "src/", Some("s"), "c/", "c/", None, &SystemClock).await.expect("clone");
}

/// The whole flatten: copy under a writer, then let go.
async fn flatten(store: &DynStore, vol: &str) -> Result<ParentOutcome, String> {
    let v = Volume::open(store.clone(), vol, OpenOptions::default()).await.map_err(|e| e.to_string())?;
    let c = v.copy_parents(&|_, _| {}).await.map_err(|e| e.to_string())?;
    drop(v);
    catalog::let_go_of_parent(store, vol, Some(c.seq)).await.map_err(|e| e.to_string())
}

/// Flattened under writes, the clone reads what it read and what was
/// written; its parent is then deleted, snapshot and all, and its chunks
/// compacted away, and the clone still reads the same, fresh, and fsck
/// finds it clean.
async fn a_flattened_clone_reads_the_same_and_outlives_its_parent(store: DynStore) {
    let mut model = parent_with_snapshot(&store).await;
    clone_of_s(&store).await;
    let v = Arc::new(open(&store, "c/").await);
    // The clone's own writes before: a whole chunk, and pages over the parent's chunk 5.
    v.write(3 * CSU, &common::pattern(30, CS as usize)).await.expect("write");
    v.write(5 * CSU + 12288, &common::pattern(31, 4096)).await.expect("write");
    v.flush().await.expect("flush");
    for (at, seed, len) in [(3 * CSU, 30, CSU), (5 * CSU + 12288, 31, 4096)] {
        model[at as usize..(at + len) as usize].copy_from_slice(&common::pattern(seed, len as usize));
    }
    // Writes while it copies: pages across every chunk, again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (v, stop) = (v.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 24 {
                // Over the parent's chunks 0, 2 and 5 and chunks it never
                // had; its 1, 7 and 9 are left to the copy.
                let at = [0, 2, 5, 3, 11][(n % 5) as usize] * CSU + (n % 16) * 4096;
                let seed = 1000 + n;
                v.write(at, &common::pattern(seed, 4096)).await.expect("write during the copy");
                written.push((at, seed));
                n += 1;
                tokio::task::yield_now().await;
            }
            written
        })
    };
    let copied = v.copy_parents(&|_, _| {}).await.expect("copy");
    stop.store(true, Ordering::Relaxed);
    for (at, seed) in writer.await.expect("writer") {
        model[at as usize..at as usize + 4096].copy_from_slice(&common::pattern(seed, 4096));
    }
    v.flush().await.expect("flush");
    assert_eq!(copied.inherited, 6, "the chunks the parent gives (0, 1, 2, 5, 7, 9): {copied:?}");
    assert!(copied.copied >= 3 && copied.copied <= copied.inherited, "{copied:?}");
    // Chunk 7 (stored whole, never written by the clone) is copied within
    // the store (CopyObject on S3, a hard link on the local store); the
    // zeroed 1 and the patched 9 are read and written.
    assert!(copied.in_store >= 1 && copied.in_store + 2 <= copied.copied, "{copied:?}");
    assert_eq!(v.read(0, CHUNKS * CSU).await.expect("read"), model, "the writer reads other bytes after the copy");
    match catalog::let_go_of_parent(&store, "c/", Some(copied.seq)).await.expect("let go") {
        ParentOutcome::LetGo { parent } => assert_eq!(parent, "src/"),
        other => panic!("the parent was not let go of: {other:?}"),
    }
    let meta = s3blk::volume::replay::read_meta(store.as_ref(), "c/").await.expect("meta");
    assert!(meta.parent.is_none(), "{meta:?}");
    assert_eq!(meta.flattened.as_ref().map(|f| f.parent.volume.as_str()), Some("src/"));
    let pin = format::snapshot_key("src/", &format::clone_pin_name("c/"));
    assert!(store.head(&pin).await.expect("head").is_none(), "the pin is still there");
    assert!(store.head(&format::clone_marker_key("src/", "c/")).await.expect("head").is_none(), "the marker too");
    // The parent goes, snapshot and all, and its chunks with it.
    let del = catalog::delete_volume(&store, "src/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(del, Ok(DeleteOutcome::Deleted { .. })), "the parent could not be deleted: {del:?}");
    let left = s3blk::store::list_all(store.as_ref(), "src/").await.expect("list");
    assert!(left.is_empty(), "the parent left {left:?}");
    // The writer that copied goes on, and a fresh reader reads the same.
    v.write(11 * CSU, &common::pattern(40, 4096)).await.expect("write after");
    v.flush().await.expect("flush");
    model[(11 * CSU) as usize..(11 * CSU + 4096) as usize].copy_from_slice(&common::pattern(40, 4096));
    assert_eq!(v.read(0, CHUNKS * CSU).await.expect("read"), model);
    drop(v);
    compact::compact(&store, "c/", &eager(), &SystemClock).await.expect("compact");
    assert_eq!(read_fresh(&store, "c/").await, model, "the flattened clone reads other bytes without its parent");
    assert_fsck_clean(&store, "c/").await;
    // Run again: nothing left to do.
    assert_eq!(flatten(&store, "c/").await, Ok(ParentOutcome::LetGo { parent: "src/".into() }));
    // And the clone is deleted like any volume.
    let del = catalog::delete_volume(&store, "c/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(del, Ok(DeleteOutcome::Deleted { .. })), "{del:?}");
    assert!(s3blk::store::list_all(store.as_ref(), "").await.expect("list").is_empty());
}
on_both_stores!(a_flattened_clone_reads_the_same_and_outlives_its_parent);

/// A snapshot of the clone taken before the flatten reads through the
/// parent: the flatten copies, keeps the parent and says which snapshot
/// keeps it; once that snapshot is deleted, flatten again lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_before_keeps_the_parent_until_it_is_deleted() {
    let store: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    let model = parent_with_snapshot(&store).await;
    clone_of_s(&store).await;
    snapshot_committed(&store, "c/", "early", None, &SystemClock).await.expect("snapshot of the clone");
    match flatten(&store, "c/").await {
        Ok(ParentOutcome::Kept { snapshots }) => assert_eq!(snapshots, vec!["early".to_string()]),
        other => panic!("{other:?}"),
    }
    // The copy's seq is on record beside the parent, which stays.
    let meta = s3blk::volume::replay::read_meta(store.as_ref(), "c/").await.expect("meta");
    let covered = meta.flattened.as_ref().map(|f| f.seq).expect("the copy's seq recorded");
    assert!(meta.parent.is_some(), "{meta:?}");
    // The clone moves on and is snapshotted again: that snapshot (after
    // the copy) keeps nothing, the early one still does, also when asked
    // again without a copy (a run that resumes from the record).
    let w = open(&store, "c/").await;
    w.write(10 * CSU, &common::pattern(50, 4096)).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    snapshot_committed(&store, "c/", "after", None, &SystemClock).await.expect("a snapshot after the copy");
    match catalog::let_go_of_parent(&store, "c/", None).await {
        Ok(ParentOutcome::Kept { snapshots }) => assert_eq!(snapshots, vec!["early".to_string()]),
        other => panic!("{other:?}"),
    }
    let meta = s3blk::volume::replay::read_meta(store.as_ref(), "c/").await.expect("meta");
    assert_eq!(meta.flattened.as_ref().map(|f| f.seq), Some(covered), "the recorded seq moved");
    let mut later = model.clone();
    later[(10 * CSU) as usize..(10 * CSU + 4096) as usize].copy_from_slice(&common::pattern(50, 4096));
    let del = catalog::delete_volume(&store, "src/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(del, Err(catalog::CatalogError::HasClones { .. })), "{del:?}");
    // The parent compacted meanwhile: the early snapshot reads as taken.
    compact::compact(&store, "src/", &eager(), &SystemClock).await.expect("compact");
    let ro = OpenOptions { read_only: true, snapshot: Some("early".into()), ..OpenOptions::default() };
    let early = Volume::open(store.clone(), "c/", ro).await.expect("open the snapshot");
    assert_eq!(early.read(0, CHUNKS * CSU).await.expect("read"), model);
    drop(early);
    store.delete(&format::snapshot_key("c/", "early")).await.expect("delete the snapshot");
    assert_eq!(flatten(&store, "c/").await, Ok(ParentOutcome::LetGo { parent: "src/".into() }));
    let ro = OpenOptions { read_only: true, snapshot: Some("after".into()), ..OpenOptions::default() };
    let after = Volume::open(store.clone(), "c/", ro).await.expect("open the later snapshot");
    assert_eq!(after.read(0, CHUNKS * CSU).await.expect("read"), later, "the snapshot after the copy");
    let del = catalog::delete_volume(&store, "src/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(del, Ok(DeleteOutcome::Deleted { .. })), "{del:?}");
    assert_eq!(read_fresh(&store, "c/").await, later);
    assert_eq!(after.read(0, CHUNKS * CSU).await.expect("read"), later, "the later snapshot without the parent");
}

/// Mutating calls (PUT, DELETE) pass until `left` is spent; then every
/// call fails, as if the process had died there.
#[derive(Debug)]
struct DiesAfter {
    left: AtomicU64,
    dead: AtomicBool,
}

#[async_trait::async_trait]
impl common::Around for DiesAfter {
    async fn get(&self, inner: &DynStore, key: &str, range: Option<std::ops::Range<u64>>) -> StoreResult<Bytes> {
        self.alive(false)?;
        inner.get(key, range).await
    }
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        self.alive(true)?;
        inner.put(key, body, mode).await
    }
    async fn get_tagged(&self, inner: &DynStore, key: &str) -> StoreResult<(Bytes, String)> {
        self.alive(false)?;
        inner.get_tagged(key).await
    }
    async fn put_if_match(&self, inner: &DynStore, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        self.alive(true)?;
        inner.put_if_match(key, body, tag).await
    }
    async fn delete(&self, inner: &DynStore, key: &str) -> StoreResult<()> {
        self.alive(true)?;
        inner.delete(key).await
    }
    async fn head(&self, inner: &DynStore, key: &str) -> StoreResult<Option<u64>> {
        self.alive(false)?;
        inner.head(key).await
    }
    async fn list(&self, inner: &DynStore, req: s3blk::store::ListRequest<'_>) -> StoreResult<s3blk::store::ListPage> {
        self.alive(false)?;
        inner.list(req).await
    }
}

impl DiesAfter {
    fn alive(&self, mutating: bool) -> StoreResult<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(StoreError::Transient("the process is dead".into()));
        }
        if mutating && self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
            self.dead.store(true, Ordering::SeqCst);
            return Err(StoreError::Transient("the process died here".into()));
        }
        Ok(())
    }
}

/// A flatten that dies at its n-th PUT or DELETE, for every n up to one
/// that finishes: the clone, opened fresh, reads what it read, and a
/// second flatten finishes; the parent is then deletable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flatten_cut_short_at_any_step_leaves_a_readable_clone() {
    let mut finished = false;
    for n in 0..200u64 {
        let mem: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
        let model = parent_with_snapshot(&mem).await;
        clone_of_s(&mem).await;
        let dies: DynStore =
            common::Wrapped::new(mem.clone(), DiesAfter { left: AtomicU64::new(n), dead: AtomicBool::new(false) });
        let first = flatten(&dies, "c/").await;
        let died = first.is_err();
        assert_eq!(read_fresh(&mem, "c/").await, model, "cut after {n} calls ({first:?}): the clone reads other bytes");
        assert_eq!(flatten(&mem, "c/").await, Ok(ParentOutcome::LetGo { parent: "src/".into() }), "after {n}");
        let del = catalog::delete_volume(&mem, "src/", OnDependants::RefuseClones, &SystemClock).await;
        assert!(matches!(del, Ok(DeleteOutcome::Deleted { .. })), "after {n}: {del:?}");
        assert_eq!(read_fresh(&mem, "c/").await, model, "after {n}, without the parent");
        assert_fsck_clean(&mem, "c/").await;
        if !died {
            finished = true;
            break;
        }
    }
    assert!(finished, "no flatten finished within 200 calls");
}

/// A snapshot of the clone that read its head before the copy was
/// committed and is recorded while the parent is let go of: it withdraws
/// itself, or the flatten keeps the parent for it; never a snapshot left
/// reading through a parent let go of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_recorded_while_the_parent_is_let_go_of_never_outlives_it() {
    for land_at in [Land::BeforeMeta, Land::AfterRelease] {
        let mem: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
        let model = parent_with_snapshot(&mem).await;
        clone_of_s(&mem).await;
        let held = common::Wrapped::new(mem.clone(), HoldSnapshot { land_at, held: Mutex::new(None) });
        let store: DynStore = held.clone();
        // The snapshot reads the head now (before the copy) and its record
        // PUT is held.
        let snap = tokio::spawn({
            let store = store.clone();
            async move { snapshot_committed(&store, "c/", "late", None, &SystemClock).await }
        });
        while held.held.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let out = flatten(&store, "c/").await.expect("flatten");
        held.land(&mem).await;
        let snap = snap.await.expect("snapshot task");
        let kept = mem.head(&format::snapshot_key("c/", "late")).await.expect("head").is_some();
        match (&out, kept) {
            (ParentOutcome::LetGo { .. }, true) => {
                panic!("{land_at:?}: a snapshot from before the copy outlived the parent ({snap:?})")
            }
            (ParentOutcome::Kept { .. }, true) => {
                let ro = OpenOptions { read_only: true, snapshot: Some("late".into()), ..OpenOptions::default() };
                let v = Volume::open(mem.clone(), "c/", ro).await.expect("open the snapshot");
                assert_eq!(v.read(0, CHUNKS * CSU).await.expect("read"), model);
            }
            (_, false) => assert!(snap.is_err(), "{land_at:?}: the snapshot is gone but was reported taken"),
            (other, _) => panic!("{other:?}"),
        }
        if land_at == Land::AfterRelease {
            assert!(matches!(out, ParentOutcome::LetGo { .. }), "{out:?}");
            assert!(
                matches!(&snap, Err(VolumeError::Store(StoreError::Transient(why))) if why.contains("flattened")),
                "{snap:?}"
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Land {
    /// The held record lands just before the flatten writes `volume.json`.
    BeforeMeta,
    /// After the flatten let go of the parent.
    AfterRelease,
}

/// Holds the PUT of the clone's snapshot record `late`.
#[derive(Debug)]
struct HoldSnapshot {
    land_at: Land,
    held: Mutex<Option<(Bytes, tokio::sync::oneshot::Sender<StoreResult<()>>)>>,
}

impl HoldSnapshot {
    async fn land(&self, inner: &DynStore) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((body, tx)) = held {
            let r = inner.put(&format::snapshot_key("c/", "late"), body, PutMode::IfAbsent).await;
            let _ = tx.send(r);
        }
    }
}

#[async_trait::async_trait]
impl common::Around for HoldSnapshot {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if key == format::snapshot_key("c/", "late") {
            let (tx, rx) = tokio::sync::oneshot::channel();
            *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some((body, tx));
            return rx.await.unwrap_or_else(|_| Err(StoreError::Transient("dropped".into())));
        }
        inner.put(key, body, mode).await
    }
    async fn put_if_match(&self, inner: &DynStore, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        if key == format::meta_key("c/") && self.land_at == Land::BeforeMeta {
            self.land(inner).await;
        }
        inner.put_if_match(key, body, tag).await
    }
}

/// A `volume.json` that names the parent again after the flatten let go
/// of it (a rekey racing the flatten's last step writes back what it read
/// in between, `flattened` and all) still opens and reads the same once
/// the parent is deleted: from the recorded seq on, the clone needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flattened_clone_whose_parent_is_named_again_opens_without_it() {
    let store: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    let model = parent_with_snapshot(&store).await;
    clone_of_s(&store).await;
    assert_eq!(flatten(&store, "c/").await, Ok(ParentOutcome::LetGo { parent: "src/".into() }));
    let del = catalog::delete_volume(&store, "src/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(del, Ok(DeleteOutcome::Deleted { .. })), "{del:?}");
    let mut meta = s3blk::volume::replay::read_meta(store.as_ref(), "c/").await.expect("meta");
    meta.parent = meta.flattened.as_ref().map(|f| f.parent.clone());
    store.put(&format::meta_key("c/"), Bytes::from(meta.encode()), PutMode::Overwrite).await.expect("put");
    assert_eq!(read_fresh(&store, "c/").await, model);
    let w = open(&store, "c/").await;
    w.write(0, &common::pattern(60, 4096)).await.expect("write");
    w.flush().await.expect("flush");
}

/// The controller's flatten opens its writer only at the head it checked
/// for attachments (`OpenOptions::expect_head`): a writer that opened
/// since (a node, let through by a lease that lapsed) is never fenced by
/// it; at that head it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_at_an_expected_head_never_goes_past_another_writers_open() {
    let store: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    Volume::create(store.clone(), "v/", opts(4 * CSU), &SystemClock).await.expect("create");
    let head = s3blk::volume::replay::replay(store.as_ref(), "v/", CSU, None).await.expect("replay").head;
    let node = open(&store, "v/").await;
    node.write(0, &common::pattern(1, 4096)).await.expect("write");
    let at = |h| OpenOptions { expect_head: Some(h), ..OpenOptions::default() };
    match Volume::open(store.clone(), "v/", at(head)).await {
        Err(VolumeError::Fenced(why)) => assert!(why.contains("checked"), "{why}"),
        other => panic!("opened past another writer's open: {:?}", other.map(|_| ())),
    }
    node.flush().await.expect("the node's writer was not fenced");
    drop(node);
    let now = s3blk::volume::replay::replay(store.as_ref(), "v/", CSU, None).await.expect("replay").head;
    let w = Volume::open(store.clone(), "v/", at(now)).await.expect("opens at the head it checked");
    assert_eq!(w.read(0, 4096).await.expect("read"), common::pattern(1, 4096));
}

/// The stage's mkfs guard (`reads_as_zeros`) takes chunks zeroed and not
/// yet committed (a trim, or a flatten's copy of a parent's ZERO chunk,
/// which the node starts as soon as it serves the clone) for zeros; a
/// page of data pending is data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_chunks_not_yet_committed_still_read_as_zeros() {
    let store: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    Volume::create(store.clone(), "v/", opts(4 * CSU), &SystemClock).await.expect("create");
    let v = open(&store, "v/").await;
    v.write_zeroes(0, 2 * CSU).await.expect("zero");
    assert!(v.reads_as_zeros(), "zeroed chunks pending count as data");
    v.write(3 * CSU, &common::pattern(1, 4096)).await.expect("write");
    assert!(!v.reads_as_zeros(), "a page of data pending counts as zeros");
}

/// A store that refuses every copy within it (a server answering 403 or
/// 501 to CopyObject, a file system that cannot copy across mounts).
#[derive(Debug)]
struct RefusesCopies;

#[async_trait::async_trait]
impl common::Around for RefusesCopies {
    async fn copy(&self, _: &DynStore, _: &str, to: &str, _: PutMode) -> StoreResult<()> {
        Err(StoreError::Permanent(format!("COPY {to}: HTTP 403 AccessDenied")))
    }
}

/// A store that refuses to copy within it gets every chunk read and
/// written instead: the flatten finishes, the same bytes (it failed the
/// flatten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_copies_gets_the_chunks_read_and_written() {
    let mem: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    let model = parent_with_snapshot(&mem).await;
    clone_of_s(&mem).await;
    let store: DynStore = common::Wrapped::new(mem.clone(), RefusesCopies);
    let v = open(&store, "c/").await;
    let copied = v.copy_parents(&|_, _| {}).await.expect("copy through the writer");
    drop(v);
    assert_eq!((copied.in_store, copied.copied), (0, copied.inherited), "{copied:?}");
    assert_eq!(
        catalog::let_go_of_parent(&store, "c/", Some(copied.seq)).await.expect("let go"),
        ParentOutcome::LetGo { parent: "src/".into() }
    );
    let del = catalog::delete_volume(&mem, "src/", OnDependants::RefuseClones, &SystemClock).await;
    assert!(matches!(del, Ok(DeleteOutcome::Deleted { .. })), "{del:?}");
    assert_eq!(read_fresh(&mem, "c/").await, model);
}
