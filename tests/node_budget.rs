//! The node plugin's memory budget: every volume one node serves shares
//! one limit of dirty data and one of cache. Volumes are opened through the
//! node service exactly as NodeStage opens them (attaching them to a
//! /dev/nbdX needs a kernel: that part runs in the VM, tests/csi_node.rs),
//! over a local directory store whose chunk uploads are slowed down or
//! held, so that writers outrun the store.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use s3blk::csi::common::Stores;
use s3blk::csi::node::{NodeConfig, NodeService};
use s3blk::location::Location;
use s3blk::store::{DynStore, PutMode, StoreResult};
use s3blk::volume::budget::MemoryBudget;
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::{OpenOptions, Volume};
use tokio::sync::watch;

const CS: u64 = 64 << 10;

/// A store whose chunk uploads take `delay`, and those of volumes marked
/// held wait until they are let go.
#[derive(Debug)]
struct SlowStore {
    delay: Duration,
    held: Mutex<Vec<String>>,
    release: watch::Sender<bool>,
}

impl SlowStore {
    fn new(inner: DynStore, delay: Duration) -> Arc<common::Wrapped<Self>> {
        common::Wrapped::new(inner, Self { delay, held: Mutex::new(Vec::new()), release: watch::channel(false).0 })
    }

    fn hold(&self, prefix: &str) {
        self.held.lock().expect("lock").push(prefix.to_string());
    }

    fn let_go(&self) {
        self.release.send_replace(true);
    }
}

#[async_trait]
impl common::Around for SlowStore {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if key.contains("/chunks/") {
            tokio::time::sleep(self.delay).await;
            let held = self.held.lock().expect("lock").iter().any(|p| key.starts_with(p.as_str()));
            if held {
                let mut rx = self.release.subscribe();
                let _ = rx.wait_for(|go| *go).await;
            }
        }
        inner.put(key, body, mode).await
    }
}

struct Node {
    node: NodeService,
    budget: Arc<MemoryBudget>,
    slow: Arc<common::Wrapped<SlowStore>>,
    plain: DynStore,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A node service with a budget of `dirty` + `cache` bytes, its store a
/// local directory whose chunk uploads take `delay`.
fn node(dirty: u64, cache: u64, delay: Duration) -> Node {
    node_with(dirty, cache, delay, s3blk::csi::node::nbd_inflight(None))
}

/// The same, with `nbd_inflight` NBD bytes in flight for the whole node.
fn node_with(dirty: u64, cache: u64, delay: Duration, nbd_inflight: usize) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).expect("store dir");
    let plain = common::local_store(&root);
    let slow = SlowStore::new(plain.clone(), delay);
    let stores = Arc::new(Stores::new(common::fast_policy()));
    let spec = Location::parse(&format!("file://{}", root.display()), false).expect("store url").store;
    stores.register(&spec, slow.clone());
    let budget = MemoryBudget::new(dirty, cache);
    let cfg = NodeConfig {
        node_id: "node-a".into(),
        state_dir: dir.path().join("state"),
        secrets_dir: dir.path().join("secrets"),
        max_volumes: 16,
        budget: budget.clone(),
        cache_limit: cache,
        busy_poll: Duration::ZERO,
        write_log_limit: 1 << 30,
        patch_limit: s3blk::volume::engine::DEFAULT_PATCH_LIMIT,
        nbd_inflight,
    };
    let node = NodeService::new(cfg, stores).expect("node service");
    Node { node, budget, slow, plain, root, _dir: dir }
}

impl Node {
    /// Create volume `name` and open it as staging would.
    async fn volume(&self, name: &str, size: u64) -> (String, Volume) {
        let url = self.create(name, size).await;
        let v = self.node.open_volume(&url, &HashMap::new(), false, u64::MAX).await.expect("open");
        (Location::parse(&url, true).expect("volume url").prefix, v)
    }

    /// Create volume `name`; returns its volume id (URL).
    async fn create(&self, name: &str, size: u64) -> String {
        let loc = Location::parse(&format!("file://{}/{name}", self.root.display()), true).expect("volume url");
        let opts = CreateOptions::new(size, CS as u32);
        Volume::create(self.plain.clone(), &loc.prefix, opts, &s3blk::clock::SystemClock).await.expect("create");
        loc.url()
    }

    /// What the store holds for a volume, read by a fresh read-only opener.
    async fn stored(&self, prefix: &str, len: u64) -> Vec<u8> {
        let opts = OpenOptions { read_only: true, ..OpenOptions::default() };
        let v = Volume::open(self.plain.clone(), prefix, opts).await.expect("open read-only");
        v.read(0, len).await.expect("read back")
    }
}

/// Write `data` chunk by chunk from offset 0, then flush.
async fn write_and_flush(v: &Volume, data: &[u8]) {
    for (c, chunk) in data.chunks(CS as usize).enumerate() {
        v.write(c as u64 * CS, chunk).await.expect("write");
    }
    v.flush().await.expect("flush");
}

/// The same, in a task of its own.
fn spawn_write_and_flush(v: &Volume, data: &[u8]) -> tokio::task::JoinHandle<()> {
    let (v, data) = (v.clone(), data.to_vec());
    tokio::spawn(async move { write_and_flush(&v, &data).await })
}

/// Wait until the node's dirty bytes stop moving above half of `limit`
/// (a writer whose store stalls has taken all it can).
async fn until_dirty_settles(n: &Node, limit: u64) {
    let mut last = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = n.budget.dirty_bytes();
        if now == last && now > limit / 2 {
            break;
        }
        last = now;
    }
}

/// Dirty plus staged chunks of every volume, in bytes: what the engines
/// hold in memory for writes, whatever the budget says.
fn held_by_engines(volumes: &[Volume]) -> u64 {
    volumes.iter().map(|v| v.stats()).map(|s| (s.dirty_chunks + s.staged_chunks) * s.chunk_size as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dirty_data_of_every_volume_stays_within_the_one_node_budget() {
    let limit = 16 * CS;
    let n = node(limit, 8 * CS, Duration::from_millis(20));
    let per_volume = 48 * CS;
    let mut volumes = Vec::new();
    for i in 0..4 {
        volumes.push(n.volume(&format!("vol-{i}"), per_volume).await);
    }
    let engines: Vec<Volume> = volumes.iter().map(|(_, v)| v.clone()).collect();
    // Sample what the engines hold while the writers run. Reading four
    // volumes one after the other is not atomic: a chunk handed from one to
    // another between two reads may count twice, hence a chunk's slack.
    let (stop, stopped) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut most = 0;
        while !*stopped.borrow() {
            most = most.max(held_by_engines(&engines));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        most
    });
    let writers: Vec<_> = volumes
        .iter()
        .enumerate()
        .map(|(i, (_, v))| spawn_write_and_flush(v, &common::pattern(i as u64, per_volume as usize)))
        .collect();
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w).await.expect("writers finish").expect("join");
    }
    stop.send_replace(true);
    let most = sampler.await.expect("sampler");
    let written = 4 * per_volume;
    assert!(written >= 12 * limit, "the test writes far more than the budget");
    assert!(most <= limit + CS, "the engines held {most} bytes of writes, the budget is {limit}");
    assert!(n.budget.dirty_peak() <= limit, "dirty peak {} over the budget {limit}", n.budget.dirty_peak());
    assert!(n.budget.dirty_peak() >= limit / 2, "the writers never came near the budget: the test proves nothing");
    assert_eq!(n.budget.dirty_bytes(), 0, "everything flushed, nothing held");
    for (i, (prefix, _)) in volumes.iter().enumerate() {
        assert!(n.stored(prefix, per_volume).await == common::pattern(i as u64, per_volume as usize), "volume {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_beside_one_whose_store_stalls_still_writes() {
    let limit = 16 * CS;
    let n = node(limit, 8 * CS, Duration::from_millis(1));
    let (stuck_prefix, stuck) = n.volume("stuck", 64 * CS).await;
    let (free_prefix, free) = n.volume("free", 64 * CS).await;
    n.slow.hold(&stuck_prefix);
    // The stalled volume's writer takes all it can and then waits.
    let stuck_data = common::pattern(7, 64 * CS as usize);
    let writer = spawn_write_and_flush(&stuck, &stuck_data);
    until_dirty_settles(&n, limit).await;
    assert!(n.budget.dirty_bytes() >= limit - 2 * CS, "the stalled volume holds all but the other's floor");
    assert!(!writer.is_finished());
    // The other volume writes four times the budget and commits it.
    let data = common::pattern(8, 64 * CS as usize);
    tokio::time::timeout(Duration::from_secs(30), write_and_flush(&free, &data))
        .await
        .expect("the other volume is not starved");
    assert!(n.budget.dirty_peak() <= limit);
    n.slow.let_go();
    tokio::time::timeout(Duration::from_secs(30), writer).await.expect("stalled writer finishes").expect("join");
    assert!(n.stored(&free_prefix, 64 * CS).await == data);
    assert!(n.stored(&stuck_prefix, 64 * CS).await == stuck_data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_chunks_of_every_volume_share_one_limit_and_a_busy_volume_takes_from_an_idle_one() {
    let cache = 8 * CS;
    let n = node(16 * CS, cache, Duration::ZERO);
    let (_, idle) = n.volume("idle", 16 * CS).await;
    let (_, busy) = n.volume("busy", 16 * CS).await;
    for v in [&idle, &busy] {
        v.write(0, &common::pattern(3, 16 * CS as usize)).await.expect("write");
        v.flush().await.expect("flush");
    }
    // The idle volume reads its chunks once and then sits on them.
    idle.read(0, 16 * CS).await.expect("read");
    // The busy one reads a hot set of four chunks again and again, never
    // where the last read ended (no readahead fetching others meanwhile).
    for _ in 0..20 {
        for c in [0, 2, 1, 3] {
            busy.read(c * CS, CS).await.expect("read");
        }
    }
    let (i, b) = (idle.stats().cache_bytes, busy.stats().cache_bytes);
    assert!(i + b <= cache, "the volumes cache {i} + {b} bytes, the node's cache budget is {cache}");
    assert!(n.budget.cache_peak() <= cache, "cache peak {} over {cache}", n.budget.cache_peak());
    assert_eq!(n.budget.cache_bytes(), i + b);
    assert!(b >= 4 * CS, "the busy volume's hot chunks are cached ({b} bytes)");
    let before = busy.stats().cache_misses;
    for c in [0, 2, 1, 3] {
        busy.read(c * CS, CS).await.expect("read");
    }
    assert_eq!(busy.stats().cache_misses, before, "the hot chunks stay cached");
    assert!(i <= cache - 4 * CS, "the idle volume gave its bytes up ({i} bytes)");
}

/// A writer the budget refuses (its chunks are larger than half the
/// budget) is refused before it appends its open record: the volume's
/// current writer is not fenced on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_the_budget_refuses_does_not_fence_the_current_writer() {
    let n = node(64 << 20, 64 << 20, Duration::ZERO);
    let (prefix, live) = n.volume("live", 1 << 20).await;
    live.write(0, &common::pattern(1, 4096)).await.expect("write");
    let small = MemoryBudget::new(CS, CS);
    let opts = OpenOptions { budget: Some(small), ..OpenOptions::default() };
    let e = Volume::open(n.plain.clone(), &prefix, opts).await.expect_err("a chunk larger than half the budget");
    assert!(e.to_string().contains("budget") || e.to_string().contains("chunk"), "{e}");
    live.flush().await.expect("the current writer was fenced by a writer that was refused");
    assert_eq!(n.stored(&prefix, 4096).await, common::pattern(1, 4096));
}

/// A volume staged while the others hold the whole shared budget still
/// gets its floor (as soon as bytes come back), so a stalled neighbour
/// that takes everything again cannot starve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_staged_while_the_budget_is_spent_gets_its_floor_when_bytes_come_back() {
    let limit = 16 * CS;
    let n = node(limit, 8 * CS, Duration::from_millis(1));
    let (first_prefix, first) = n.volume("first", 64 * CS).await;
    for c in 0..16 {
        first.write(c * CS, &common::pattern(c, CS as usize)).await.expect("write");
    }
    assert_eq!(n.budget.dirty_bytes(), limit, "the first volume holds the whole budget");
    let (late_prefix, late) = n.volume("late", 64 * CS).await;
    first.flush().await.expect("flush");
    // The first volume's store stalls; its writer takes all it can again.
    n.slow.hold(&first_prefix);
    let first_data = common::pattern(7, 64 * CS as usize);
    let writer = spawn_write_and_flush(&first, &first_data);
    until_dirty_settles(&n, limit).await;
    assert!(!writer.is_finished());
    let data = common::pattern(8, 64 * CS as usize);
    tokio::time::timeout(Duration::from_secs(30), write_and_flush(&late, &data))
        .await
        .expect("the late volume is not starved");
    n.slow.let_go();
    tokio::time::timeout(Duration::from_secs(30), writer).await.expect("stalled writer finishes").expect("join");
    assert!(n.stored(&late_prefix, 64 * CS).await == data);
    assert!(n.stored(&first_prefix, 64 * CS).await == first_data);
}

/// NBD request buffers count against one bound for the whole node, not
/// one per volume: a write whose 32 MiB payload is still arriving on one
/// volume holds the whole node's NBD allowance (here 32 MiB), and a read of
/// another volume waits for it, so many busy volumes cannot take more
/// memory than the node set aside for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_buffers_of_every_volume_share_one_bound() {
    let allowance = s3blk::nbd::proto::MAX_PAYLOAD as usize;
    let n = node_with(64 << 20, 16 << 20, Duration::ZERO, allowance);
    let sockets = tempfile::tempdir().expect("tempdir");
    let mut served = Vec::new();
    for name in ["a", "b"] {
        let id = n.create(name, 64 << 20).await;
        let sock = sockets.path().join(format!("{name}.sock"));
        served.push(n.node.serve_unattached(&id, &sock, name, false).await.expect("serve"));
    }
    let mut a = common::nbd_client::Client::connect(&sockets.path().join("a.sock"), "a").await;
    let mut b = common::nbd_client::Client::connect(&sockets.path().join("b.sock"), "b").await;
    let data = common::pattern(1, allowance);
    let cut = allowance - 4096;
    a.send(s3blk::nbd::proto::CMD_WRITE, 0, 1, 0, allowance as u32, &data[..cut]).await;
    // Until the whole payload is in, the server holds at least `cut` bytes of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = tokio::spawn(async move {
        let r = b.read(2, 0, 1 << 20).await;
        (b, r)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!read.is_finished(), "a read of another volume took NBD buffers past the node's allowance");
    use tokio::io::AsyncWriteExt;
    a.s.write_all(&data[cut..]).await.expect("rest of the payload");
    assert_eq!(a.reply().await, (0, 1), "the write");
    let (mut b, r) =
        tokio::time::timeout(Duration::from_secs(30), read).await.expect("the read went on").expect("join");
    assert_eq!(r.expect("read"), vec![0u8; 1 << 20]);
    assert_eq!(b.read(3, 0, 4096).await.expect("read"), vec![0u8; 4096]);
    assert_eq!(a.read(4, 0, 4096).await.expect("read"), data[..4096].to_vec());
    for s in served {
        n.node.stop_serving(s).await.expect("stop");
    }
}

/// A quarter of the container's memory limit, between one largest request
/// and the NBD server's default; that default with no limit known.
#[test]
fn the_nbd_allowance_is_a_quarter_of_the_memory_limit_within_bounds() {
    use s3blk::csi::node::nbd_inflight;
    assert_eq!(nbd_inflight(Some(512 << 20)), 128 << 20);
    assert_eq!(nbd_inflight(Some(64 << 20)), 32 << 20, "never below one 32 MiB request");
    assert_eq!(nbd_inflight(Some(8 << 30)), 256 << 20);
    assert_eq!(nbd_inflight(None), 256 << 20);
}

/// The stores a node reaches (two directories here: two buckets, in
/// effect) share one limit of requests in flight: while it is all taken,
/// a call through either waits; given back, both go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_stores_share_one_limit_of_requests_in_flight() {
    let (d1, d2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let stores = Stores::new(common::fast_policy());
    let mut reached = Vec::new();
    for d in [&d1, &d2] {
        let url = format!("file://{}/vol", d.path().display());
        let loc = Location::parse(&url, true).expect("location");
        let store = stores.get(&loc, &HashMap::new()).await.expect("store");
        store.put("vol/x", Bytes::from_static(b"x"), PutMode::Overwrite).await.expect("put");
        reached.push(store);
    }
    let all = stores.permits().available() as u32;
    assert_eq!(all as usize, s3blk::store::limit::DEFAULT_REQUESTS_IN_FLIGHT, "the default limit");
    let held = stores.permits().hold(all).await.expect("hold");
    let calls: Vec<_> = reached
        .iter()
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move { s.get("vol/x", None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(calls.iter().all(|c| !c.is_finished()), "a store call ran past the node's limit");
    drop(held);
    for c in calls {
        let got = tokio::time::timeout(Duration::from_secs(20), c).await.expect("given back, the calls go on");
        assert_eq!(got.expect("task").expect("get"), &b"x"[..]);
    }
}

/// `csi --requests-in-flight` (the chart's node.requestsInFlight) sets the
/// node's limit: with 2, a third call waits for one of the first two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_of_requests_in_flight_is_the_one_configured() {
    let d = tempfile::tempdir().expect("tempdir");
    let stores = Stores::with_limit(common::fast_policy(), Default::default(), 2);
    assert_eq!(stores.permits().available(), 2);
    let url = format!("file://{}/vol", d.path().display());
    let loc = Location::parse(&url, true).expect("location");
    let store = stores.get(&loc, &HashMap::new()).await.expect("store");
    store.put("vol/x", Bytes::from_static(b"x"), PutMode::Overwrite).await.expect("put");
    let one = stores.permits().hold(1).await.expect("hold");
    store.get("vol/x", None).await.expect("one permit left: the call goes on");
    let other = stores.permits().hold(1).await.expect("hold");
    let s = store.clone();
    let call = tokio::spawn(async move { s.get("vol/x", None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "a call ran past a limit of 2");
    drop(one);
    let got = tokio::time::timeout(Duration::from_secs(20), call).await.expect("given back, the call goes on");
    assert_eq!(got.expect("task").expect("get"), &b"x"[..]);
    drop(other);
}

/// Staging opens an encrypted volume with the stage secret's
/// `encryptionKey` and only with it: without one, or with another, the
/// open fails with INVALID_ARGUMENT and a message that says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_opens_an_encrypted_volume_with_the_secrets_key_only() {
    let n = node(64 << 20, 64 << 20, Duration::ZERO);
    let loc = Location::parse(&format!("file://{}/enc", n.root.display()), true).expect("volume url");
    let key = "6b".repeat(32);
    let kek = s3blk::crypto::Kek::parse(key.as_bytes()).expect("key");
    let opts = CreateOptions {
        encryption: Some(s3blk::volume::keys::NewKeys::fresh(kek.clone())),
        ..CreateOptions::new(4 * CS, CS as u32)
    };
    Volume::create(n.plain.clone(), &loc.prefix, opts, &s3blk::clock::SystemClock).await.expect("create");
    let with = |k: Option<&str>| HashMap::from_iter(k.map(|k| ("encryptionKey".to_string(), k.to_string())));
    for (secrets, needle) in [
        (with(None), "is encrypted"),
        (with(Some(&"6c".repeat(32))), "wrong key for volume"),
        (with(Some("not a key")), "32 bytes"),
    ] {
        match n.node.open_volume(&loc.url(), &secrets, false, u64::MAX).await {
            Err(s) => assert!(s.code() == tonic::Code::InvalidArgument && s.message().contains(needle), "{s:?}"),
            Ok(_) => panic!("opened with {secrets:?}"),
        }
    }
    let v = n.node.open_volume(&loc.url(), &with(Some(&key)), false, u64::MAX).await.expect("open with the key");
    v.write(0, b"staged and sealed").await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let sealed = s3blk::volume::keys::unlock(&n.plain, &loc.prefix, Some(&kek)).await.expect("unlock");
    let r = Volume::open(sealed, &loc.prefix, OpenOptions { read_only: true, ..OpenOptions::default() }).await;
    assert_eq!(r.expect("open").read(0, 17).await.expect("read"), b"staged and sealed");
    // A volume provisioned encrypted (its volume context says so) whose
    // volume.json was replaced by an unencrypted one is not served.
    let swapped = n.create("swapped", 4 * CS).await;
    let got = n.node.open_volume_checked(&swapped, &with(Some(&key)), false, u64::MAX, true).await;
    match got {
        Err(s) => assert!(s.code() == tonic::Code::FailedPrecondition && s.message().contains("in the clear"), "{s:?}"),
        Ok(_) => panic!("an unencrypted volume served as an encrypted one"),
    }
}

/// A clone served with the volume context's `flatten: "true"` is flattened
/// by the node's writer in the background while an NBD client writes to
/// it: its `volume.json` then names no parent, the parent can be deleted,
/// and the clone reads what it read and what was written. Served without
/// it, a clone keeps its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_served_with_flatten_is_flattened_beside_its_writes() {
    use s3blk::volume::catalog;
    let n = node(64 * CS, 64 * CS, Duration::ZERO);
    let (src, v) = n.volume("src", 16 * CS).await;
    let data = common::pattern(5, 16 * CS as usize);
    write_and_flush(&v, &data).await;
    drop(v);
    let sockets = tempfile::tempdir().expect("tempdir");
    let mut expected = data.clone();
    for (name, flatten) in [("plain", false), ("flat", true)] {
        let loc = Location::parse(&format!("file://{}/{name}", n.root.display()), true).expect("url");
        let clock = s3blk::clock::SystemClock;
        catalog::clone_volume(&n.plain, &src, None, &loc.prefix, name, None, &clock).await.expect("clone");
        let sock = sockets.path().join(format!("{name}.sock"));
        let served = n.node.serve_unattached(&loc.url(), &sock, name, flatten).await.expect("serve");
        let mut c = common::nbd_client::Client::connect(&sock, name).await;
        let meta = || async { s3blk::volume::replay::read_meta(n.plain.as_ref(), &loc.prefix).await.expect("meta") };
        let mut h = 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Pages written all the while, until it is flattened (or, without
        // the parameter, for a while).
        loop {
            let at = (h % 16) * CS + (h % 7) * 4096;
            let page = common::pattern(100 + h, 4096);
            assert_eq!(c.write(h, at, &page).await, 0, "write");
            expected[at as usize..at as usize + 4096].copy_from_slice(&page);
            h += 1;
            // Both steps done: `flattened` on record and the parent gone.
            let m = meta().await;
            let flattened = m.flattened.is_some() && m.parent.is_none();
            if flattened || tokio::time::Instant::now() > deadline || (!flatten && h > 40) {
                assert_eq!(flattened, flatten, "{name}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(c.flush(h).await, 0, "flush");
        assert!(c.read(h + 1, 0, 16 * CS as u32).await.expect("read") == expected, "{name} reads other bytes");
        n.node.stop_serving(served).await.expect("stop");
        if flatten {
            assert!(meta().await.parent.is_none());
        } else {
            // The unflattened clone goes, so that the parent can.
            let del = catalog::delete_volume(&n.plain, &loc.prefix, catalog::OnDependants::RefuseClones, &clock).await;
            assert!(matches!(del, Ok(catalog::DeleteOutcome::Deleted { .. })), "{del:?}");
            expected = data.clone();
        }
    }
    let clock = s3blk::clock::SystemClock;
    let del = catalog::delete_volume(&n.plain, &src, catalog::OnDependants::RefuseClones, &clock).await;
    assert!(matches!(del, Ok(catalog::DeleteOutcome::Deleted { .. })), "the flattened clone's parent: {del:?}");
    let flat = Location::parse(&format!("file://{}/flat", n.root.display()), true).expect("url").prefix;
    assert!(n.stored(&flat, 16 * CS).await == expected, "the flattened clone without its parent");
}
