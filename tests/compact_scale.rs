//! Compaction of a volume far bigger than memory: its memory must not grow
//! with the chunk map.
//!
//! A synthetic store stands in for the bucket: it generates the chunk
//! listing (every chunk's generations, live and garbage, in key order) and
//! the parts of the volume's split checkpoint on demand, so a 4 TiB volume
//! (4 M chunks of 1 MiB; `S3BLK_SCALE_CHUNKS` sets the count) costs the
//! test no memory of its own. The memory store would hold every key (and
//! list in time linear in its size); moto would take hours to list 4 M
//! keys. Everything else (volume.json, journal records, a snapshot,
//! manifests, the clock probe) is stored as the store is asked. The parts
//! compaction writes go to a directory on disk and are checked afterwards
//! against the map they must hold.
//!
//! The volume: a split checkpoint at seq 100 (epoch 90), then records 101
//! (chunk P-1 stored again), 102 (an inline page in chunk 7), 103 (chunk P
//! stored again), 104 (the size, unchanged), P being the entries per part
//! (so the two chunks straddle a part boundary); a snapshot pins seq 102.
//! Every object is older than the safety age. Compaction must fold to 104,
//! write checkpoints at 104 and at 102 (for the snapshot) part by part,
//! delete exactly the garbage generations and no live one, and its peak
//! RSS must grow by less than `S3BLK_SCALE_RSS_MIB` (default 64).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use s3blk::clock::SystemClock;
use s3blk::store::{DynStore, ListPage, ListRequest, ObjectInfo, ObjectStore, PutMode, StoreError, StoreResult};
use s3blk::volume::compact::{self, CompactOptions};
use s3blk::volume::format::{
    self, BLOCK_SIZE, ChunkRef, InlineWrite, JournalRecord, PartRef, Patch, Patches, RecordKind, SnapshotRecord,
    SplitCheckpoint, StoredCheckpoint, VolumeMeta, generation,
};

const VOL: &str = "v/";
const CS: u64 = 1 << 20;
const BASE: u64 = 100;
const EPOCH: u64 = 90;
const TAG: u64 = 0x5ca1e;
const T0: i64 = 1_700_000_000;

/// The synthetic volume's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    chunks: u64,
    per_part: u64,
}

impl Shape {
    fn j1(&self) -> u64 {
        self.per_part - 1
    }
    fn j2(&self) -> u64 {
        self.per_part
    }
    fn rec_gen(&self, which: u64) -> u64 {
        generation(EPOCH, self.chunks + which)
    }
    fn base_gen(i: u64) -> u64 {
        generation(EPOCH, i + 1)
    }
    fn base_ref(i: u64) -> ChunkRef {
        ChunkRef::Stored { generation: Self::base_gen(i), crc: i as u32, layout: s3blk::volume::format::Layout::Table }
    }
    fn rec_ref(&self, which: u64) -> ChunkRef {
        ChunkRef::Stored { generation: self.rec_gen(which), crc: 7, layout: s3blk::volume::format::Layout::Table }
    }
    /// Chunk `i`'s generations in the listing, in key order.
    fn gens(&self, i: u64) -> Vec<u64> {
        let mut g = Vec::with_capacity(4);
        if i % 7 == 3 {
            g.push(generation(EPOCH - 10, i + 1));
        }
        g.push(Self::base_gen(i));
        if i == self.j1() {
            g.push(self.rec_gen(1));
        }
        if i == self.j2() {
            g.push(self.rec_gen(2));
        }
        if i % 11 == 5 {
            g.push(generation(EPOCH + 50, i + 1));
        }
        g
    }
    /// Is generation `g` of chunk `i` referred to by the map at 102 or 104?
    fn live(&self, i: u64, g: u64) -> bool {
        (g == Self::base_gen(i) && i != self.j1())
            || (i == self.j1() && g == self.rec_gen(1))
            || (i == self.j2() && g == self.rec_gen(2))
    }
    fn garbage(&self) -> u64 {
        (0..self.chunks).map(|i| self.gens(i).iter().filter(|g| !self.live(i, **g)).count() as u64).sum()
    }
    fn parts(&self) -> u64 {
        self.chunks.div_ceil(self.per_part)
    }
    fn part_range(&self, n: u64) -> (u64, u64) {
        let first = n * self.per_part;
        let last = if n + 1 == self.parts() { u64::MAX } else { first + self.per_part - 1 };
        (first, last)
    }
    fn base_patch(i: u64) -> Option<Arc<Patch>> {
        (i % 4096 == 1).then(|| {
            let mut p = Patch::default();
            p.pages.insert(0, Some(Bytes::from(vec![0xab; BLOCK_SIZE as usize])));
            Arc::new(p)
        })
    }
    /// The base checkpoint's part `n`.
    fn base_part(&self, n: u64) -> (Vec<u8>, PartRef) {
        let (first, last) = self.part_range(n);
        let end = last.saturating_add(1).min(self.chunks);
        let entries: Vec<(u64, ChunkRef)> = (first..end).map(|i| (i, Self::base_ref(i))).collect();
        let patches: Patches = (first..end).filter_map(|i| Self::base_patch(i).map(|p| (i, p))).collect();
        format::encode_part((BASE, TAG, n as u32), (first, last), &entries, &patches)
    }
    /// Chunk `i`'s entry and patch in the map at `seq` (102 or 104).
    fn expected(&self, seq: u64, i: u64) -> (ChunkRef, Option<Arc<Patch>>) {
        let r = if i == self.j1() {
            self.rec_ref(1)
        } else if i == self.j2() && seq >= 103 {
            self.rec_ref(2)
        } else {
            Self::base_ref(i)
        };
        let patch = if i == 7 {
            let mut p = Patch::default();
            p.pages.insert(1, Some(Bytes::from(vec![0xcd; BLOCK_SIZE as usize])));
            Some(Arc::new(p))
        } else if i == self.j1() {
            None
        } else {
            Self::base_patch(i)
        };
        (r, patch)
    }
}

fn chunk_key(i: u64, g: u64) -> String {
    format::chunk_key(VOL, i, g)
}

#[derive(Debug)]
struct ScaleStore {
    shape: Shape,
    now: AtomicI64,
    /// Objects stored as they were put, with their store time.
    small: Mutex<BTreeMap<String, (Bytes, i64)>>,
    /// Base checkpoint parts (generated) still there.
    base_parts: Mutex<BTreeMap<String, u64>>,
    /// Where the parts compaction writes go.
    spill: PathBuf,
    garbage_deleted: AtomicU64,
    live_deleted: Mutex<Vec<String>>,
    parts_written: AtomicU64,
    part_bytes_written: AtomicU64,
    base_parts_deleted: AtomicU64,
}

impl ScaleStore {
    fn small_put(&self, key: &str, body: Bytes) {
        self.small.lock().unwrap().insert(key.to_string(), (body, self.now.load(Ordering::SeqCst)));
    }

    /// The chunk listing after `start_after`, generated.
    fn list_chunks(&self, start_after: Option<&str>, max: usize) -> ListPage {
        let (mut i, after_gen) = match start_after.and_then(|k| format::parse_chunk_key(VOL, k)) {
            Some((i, g)) => (i, Some(g)),
            None => (0, None),
        };
        let mut objects = Vec::with_capacity(max);
        let mut first = true;
        while i < self.shape.chunks && objects.len() < max {
            for g in self.shape.gens(i) {
                if first && after_gen.is_some_and(|a| g <= a) {
                    continue;
                }
                objects.push(ObjectInfo { key: chunk_key(i, g), size: CS + 256, modified_unix: Some(T0) });
            }
            first = false;
            i += 1;
        }
        // A page may end between two generations of one chunk, as S3's may.
        objects.truncate(max);
        let more = objects
            .last()
            .and_then(|o| format::parse_chunk_key(VOL, &o.key))
            .is_some_and(|(li, lg)| li + 1 < self.shape.chunks || self.shape.gens(li).last().is_some_and(|g| *g > lg));
        let next_start_after = if more { objects.last().map(|o| o.key.clone()) } else { None };
        ListPage { objects, common_prefixes: Vec::new(), next_start_after }
    }
}

#[async_trait]
impl ObjectStore for ScaleStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        assert!(range.is_none(), "compaction reads no ranges");
        if let Some((b, _)) = self.small.lock().unwrap().get(key) {
            return Ok(b.clone());
        }
        let n = self.base_parts.lock().unwrap().get(key).copied();
        match n {
            Some(n) => Ok(Bytes::from(self.shape.base_part(n).0)),
            None => Err(StoreError::NotFound(key.to_string())),
        }
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if format::parse_checkpoint_part_key(VOL, key).is_some() {
            self.parts_written.fetch_add(1, Ordering::SeqCst);
            self.part_bytes_written.fetch_add(body.len() as u64, Ordering::SeqCst);
            let file = self.spill.join(key.replace('/', "_"));
            std::fs::write(&file, &body).map_err(|e| StoreError::Permanent(e.to_string()))?;
            return Ok(());
        }
        if mode == PutMode::IfAbsent && self.small.lock().unwrap().contains_key(key) {
            return Err(StoreError::PreconditionFailed(key.to_string()));
        }
        self.small_put(key, body);
        Ok(())
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        Err(StoreError::Unsupported(format!("{key}: the scale store keeps no tags")))
    }

    async fn put_if_match(&self, key: &str, _: Bytes, _: &str) -> StoreResult<()> {
        Err(StoreError::Unsupported(format!("{key}: the scale store keeps no tags")))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        if let Some((i, g)) = format::parse_chunk_key(VOL, key) {
            if self.shape.live(i, g) {
                self.live_deleted.lock().unwrap().push(key.to_string());
            } else {
                self.garbage_deleted.fetch_add(1, Ordering::SeqCst);
            }
            return Ok(());
        }
        if self.base_parts.lock().unwrap().remove(key).is_some() {
            self.base_parts_deleted.fetch_add(1, Ordering::SeqCst);
        }
        self.small.lock().unwrap().remove(key);
        Ok(())
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        assert!(!req.delimiter, "compaction lists without a delimiter");
        let max = if req.max_keys == 0 { 1000 } else { req.max_keys };
        let chunks = format::chunk_prefix(VOL);
        if req.prefix == chunks {
            return Ok(self.list_chunks(req.start_after, max));
        }
        assert!(!req.prefix.starts_with(&chunks), "an unexpected listing of {}", req.prefix);
        let mut all: Vec<ObjectInfo> = self
            .small
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(req.prefix))
            .map(|(k, (b, t))| ObjectInfo { key: k.clone(), size: b.len() as u64, modified_unix: Some(*t) })
            .collect();
        all.extend(self.base_parts.lock().unwrap().keys().filter(|k| k.starts_with(req.prefix)).map(|k| ObjectInfo {
            key: k.clone(),
            size: 1,
            modified_unix: Some(T0),
        }));
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all.retain(|o| req.start_after.is_none_or(|s| o.key.as_str() > s));
        let more = all.len() > max;
        all.truncate(max);
        let next_start_after = if more { all.last().map(|o| o.key.clone()) } else { None };
        Ok(ListPage { objects: all, common_prefixes: Vec::new(), next_start_after })
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        if let Some((b, _)) = self.small.lock().unwrap().get(key) {
            return Ok(Some(b.len() as u64));
        }
        Ok(self.base_parts.lock().unwrap().contains_key(key).then_some(1))
    }

    fn describe(&self) -> String {
        "synthetic://scale".into()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// This process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn record(seq: u64, chunks: Vec<(u64, ChunkRef)>, inline: Vec<InlineWrite>, size: u64) -> Bytes {
    let r = JournalRecord {
        kind: RecordKind::Commit,
        seq,
        epoch: EPOCH,
        size,
        writer: 1,
        created_unix: T0,
        chunks,
        inline,
    };
    Bytes::from(r.encode())
}

/// The volume as described at the top, in a fresh synthetic store.
fn build(shape: Shape, spill: PathBuf) -> Arc<ScaleStore> {
    let size = shape.chunks * CS;
    let store = Arc::new(ScaleStore {
        shape,
        now: AtomicI64::new(T0),
        small: Mutex::default(),
        base_parts: Mutex::default(),
        spill,
        garbage_deleted: AtomicU64::new(0),
        live_deleted: Mutex::default(),
        parts_written: AtomicU64::new(0),
        part_bytes_written: AtomicU64::new(0),
        base_parts_deleted: AtomicU64::new(0),
    });
    let meta = VolumeMeta {
        format_version: format::FORMAT_V5,
        uuid: "0123456789abcdef0123456789abcdef".into(),
        size,
        chunk_size: CS as u32,
        block_size: BLOCK_SIZE,
        checksum: "crc32c".into(),
        created_unix: T0,
        parent: None,
        single_writer: false,
        compression: None,
        encryption: None,
        flattened: None,
    };
    store.small_put(&format::meta_key(VOL), Bytes::from(meta.encode()));
    // The base checkpoint: its parts are generated when read; the manifest
    // needs their lengths and checksums once.
    let mut refs = Vec::new();
    for n in 0..shape.parts() {
        refs.push(shape.base_part(n).1);
        store.base_parts.lock().unwrap().insert(format::checkpoint_part_key(VOL, BASE, TAG, n as u32), n);
    }
    let manifest = SplitCheckpoint { seq: BASE, epoch: EPOCH, size, tag: TAG, parts: refs };
    store.small_put(&format::checkpoint_key(VOL, BASE), Bytes::from(manifest.encode()));
    let page =
        InlineWrite { offset: 7 * CS + BLOCK_SIZE as u64, data: Some(Bytes::from(vec![0xcd; BLOCK_SIZE as usize])) };
    let records = [
        record(BASE + 1, vec![(shape.j1(), shape.rec_ref(1))], Vec::new(), size),
        record(BASE + 2, Vec::new(), vec![page], size),
        record(BASE + 3, vec![(shape.j2(), shape.rec_ref(2))], Vec::new(), size),
        record(BASE + 4, Vec::new(), Vec::new(), size),
    ];
    for (k, r) in records.into_iter().enumerate() {
        store.small_put(&format::journal_key(VOL, BASE + 1 + k as u64), r);
    }
    let snap = SnapshotRecord {
        format_version: 1,
        name: "pinned".into(),
        seq: BASE + 2,
        size,
        created_unix: T0,
        token: None,
        clone: None,
        auth: None,
    };
    let snap = serde_json::to_vec(&snap).expect("a snapshot record encodes");
    store.small_put(&format::snapshot_key(VOL, "pinned"), Bytes::from(snap));
    // Everything above is now an hour old on the store's clock.
    store.now.store(T0 + 3600, Ordering::SeqCst);
    store
}

/// Read back the checkpoint compaction wrote at `seq` (manifest stored,
/// parts on disk) and compare it with the map it must hold, a part at a time.
fn check_written(store: &ScaleStore, seq: u64) {
    let key = format::checkpoint_key(VOL, seq);
    let bytes = store.small.lock().unwrap().get(&key).map(|(b, _)| b.clone()).expect("checkpoint written");
    let StoredCheckpoint::Split(split) = StoredCheckpoint::decode(&bytes, &key).expect("decodes") else {
        panic!("checkpoint {seq} of {} chunks stored whole", store.shape.chunks);
    };
    assert_eq!((split.seq, split.epoch, split.size), (seq, EPOCH, store.shape.chunks * CS));
    let mut next = 0u64;
    for n in 0..split.parts.len() {
        let part = split.part_key(VOL, n);
        let body = std::fs::read(store.spill.join(part.replace('/', "_"))).expect("part written");
        let (entries, patches) = split.read_part(n, &body, &part).expect("part decodes");
        for (i, r) in &entries {
            assert_eq!(*i, next, "checkpoint {seq}: chunk {next} missing");
            let (want, want_patch) = store.shape.expected(seq, *i);
            assert_eq!(*r, want, "checkpoint {seq}: chunk {i}");
            assert_eq!(patches.get(i), want_patch.as_ref(), "checkpoint {seq}: patch of chunk {i}");
            next += 1;
        }
        let expected_patches = entries.iter().filter(|(i, _)| store.shape.expected(seq, *i).1.is_some()).count();
        assert_eq!(patches.len(), expected_patches, "checkpoint {seq}: part {n} has patches of chunks it lacks");
    }
    assert_eq!(next, store.shape.chunks, "checkpoint {seq} holds every chunk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_of_a_huge_chunk_map_holds_one_part_per_map() {
    let shape =
        Shape { chunks: env_u64("S3BLK_SCALE_CHUNKS", 4 << 20), per_part: format::CHECKPOINT_PART_ENTRIES as u64 };
    assert!(shape.chunks > 2 * shape.per_part, "at least three checkpoint parts");
    let limit_mib = env_u64("S3BLK_SCALE_RSS_MIB", 64);
    let spill = tempfile::tempdir().expect("tempdir");
    let store = build(shape, spill.path().to_path_buf());
    let garbage = shape.garbage();
    let dyn_store: DynStore = store.clone();
    let before = peak_rss_kib();
    let started = std::time::Instant::now();
    let rep = compact::compact(&dyn_store, VOL, &CompactOptions::default(), &SystemClock).await.expect("compact");
    let took = started.elapsed();
    let grew_mib = peak_rss_kib().saturating_sub(before) as f64 / 1024.0;
    println!(
        "compacted {} chunks ({} TiB, {} checkpoint parts) in {took:.1?}: peak RSS grew {grew_mib:.1} MiB (limit \
         {limit_mib} MiB); {} garbage generations deleted, {} parts ({:.0} MB) written",
        shape.chunks,
        (shape.chunks * CS) >> 40,
        shape.parts(),
        rep.chunks_deleted,
        store.parts_written.load(Ordering::SeqCst),
        store.part_bytes_written.load(Ordering::SeqCst) as f64 / 1e6,
    );
    let live_deleted = store.live_deleted.lock().unwrap().clone();
    assert!(live_deleted.is_empty(), "live chunks deleted: {:?}", &live_deleted[..live_deleted.len().min(10)]);
    assert_eq!(rep.folded_seq, Some(BASE + 4));
    assert_eq!(rep.chunks_deleted, garbage, "every garbage generation goes");
    assert_eq!(store.garbage_deleted.load(Ordering::SeqCst), garbage);
    assert_eq!(rep.chunks_live, shape.chunks + 1, "every live generation is counted once");
    assert_eq!(rep.checkpoints_written, 2, "at the fold point and at the snapshot");
    assert_eq!(store.parts_written.load(Ordering::SeqCst), 2 * shape.parts());
    assert_eq!(rep.journal_records_deleted, 3);
    assert_eq!(rep.checkpoints_deleted, 1);
    assert_eq!(store.base_parts_deleted.load(Ordering::SeqCst), shape.parts(), "the old checkpoint's parts go");
    check_written(&store, BASE + 4);
    check_written(&store, BASE + 2);
    assert!(grew_mib < limit_mib as f64, "compaction's peak RSS grew {grew_mib:.1} MiB (limit {limit_mib} MiB)");
}
