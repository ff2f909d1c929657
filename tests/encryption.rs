//! Encrypted volumes against real stores (the local directory store and a
//! real S3 server): nothing written leaves the process in the clear, every
//! altered, swapped, replayed or cut object is found instead of read, and
//! only the right key opens a volume.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use s3blk::crypto::Kek;
use s3blk::store::memory::MemoryStore;
use s3blk::store::{self, DynStore, PutMode};
use s3blk::volume::engine::{CreateOptions, read_snapshot, snapshot_committed};
use s3blk::volume::keys::{self, NewKeys};
use s3blk::volume::{OpenOptions, Volume, VolumeError, catalog, compact, format, fsck};

const CS: u32 = 64 << 10;
const CSU: u64 = CS as u64;

fn kek(n: u8) -> Kek {
    Kek::parse(&[0x80 | n; 32]).expect("a key")
}

fn create_opts(size: u64, encryption: Option<NewKeys>) -> CreateOptions {
    CreateOptions { encryption, ..CreateOptions::new(size, CS) }
}

/// Create an encrypted volume and give back the store that reads it in the clear.
async fn create_encrypted(base: &DynStore, vol: &str, size: u64, key: &Kek) -> DynStore {
    let meta = Volume::create(base.clone(), vol, create_opts(size, Some(NewKeys::fresh(key.clone()))), &clock())
        .await
        .expect("create");
    assert_eq!(meta.format_version, format::FORMAT_V6);
    assert_eq!(meta.encryption.as_ref().map(|e| e.key_id.clone()), Some(key.id()));
    keys::unlock(base, vol, Some(key)).await.expect("unlock")
}

fn clock() -> s3blk::clock::SystemClock {
    s3blk::clock::SystemClock
}

async fn open(store: &DynStore, vol: &str) -> Volume {
    Volume::open(store.clone(), vol, OpenOptions::default()).await.expect("open")
}

async fn open_ro(store: &DynStore, vol: &str) -> Volume {
    Volume::open(store.clone(), vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await.expect("open ro")
}

async fn fsck_errors(store: &DynStore, vol: &str) -> Vec<String> {
    fsck::fsck(store.as_ref(), vol, true, &|_, _| {}).await.expect("fsck ran").errors
}

/// Bytes that are easy to find: a line of text repeated.
fn marked(len: usize, tag: &str) -> Vec<u8> {
    let line = format!("PLAINTEXT-{tag}-the quick brown fox jumps over the lazy dog;");
    line.bytes().cycle().take(len).collect()
}

/// Every object in the store, raw, and whether any holds `needle`.
async fn raw_objects_holding(base: &DynStore, needle: &[u8]) -> (usize, Vec<String>) {
    let all = store::list_all(base.as_ref(), "").await.expect("list");
    let mut holding = Vec::new();
    for o in &all {
        let b = base.get(&o.key, None).await.expect("get");
        if b.windows(needle.len()).any(|w| w == needle) {
            holding.push(o.key.clone());
        }
    }
    (all.len(), holding)
}

/// Whole chunks, a small inline write, a compaction (a checkpoint holding
/// the inline pages), a snapshot and a clone written through: everything
/// reads back through the key, fsck is clean, and no object in the store
/// holds the plaintext, with or without compression (compressed before it
/// is sealed: the sealed chunk is still smaller than the chunk).
async fn an_encrypted_volume_stores_no_plaintext_and_reads_back(base: DynStore) {
    for compression in [None, Some(format::Codec::Zstd)] {
        let vol = &format!("{}/", common::unique("enc"));
        let key = kek(1);
        let opts = CreateOptions { compression, ..create_opts(8 * CSU, Some(NewKeys::fresh(key.clone()))) };
        Volume::create(base.clone(), vol, opts, &clock()).await.expect("create");
        let store = keys::unlock(&base, vol, Some(&key)).await.expect("unlock");
        let w = open(&store, vol).await;
        let mut want = marked(4 * CS as usize, "CHUNK");
        w.write(0, &want).await.expect("write");
        w.flush().await.expect("flush");
        let small = marked(4096, "INLINE");
        w.write(5 * CSU, &small).await.expect("small write");
        w.flush().await.expect("flush");
        want.resize(5 * CS as usize, 0);
        want.extend_from_slice(&small);
        drop(w);
        let rep = compact::compact(
            &store,
            vol,
            &compact::CompactOptions { safety_age: Duration::ZERO, ..Default::default() },
            &clock(),
        )
        .await
        .expect("compact");
        assert!(rep.folded_seq.is_some(), "a checkpoint was written: {rep:?}");
        let snap = snapshot_committed(&store, vol, "s1", None, &clock()).await.expect("snapshot");
        assert!(snap.auth.is_some(), "an encrypted volume's snapshot record carries its tag");
        let clone = &format!("{}/", common::unique("enc-clone"));
        catalog::clone_volume(&store, vol, Some("s1"), clone, clone, None, &clock()).await.expect("clone");
        let cstore = keys::unlock(&base, clone, Some(&key)).await.expect("unlock the clone");
        let c = open(&cstore, clone).await;
        let cwrite = marked(CS as usize, "CLONE");
        c.write(2 * CSU, &cwrite).await.expect("clone write");
        c.flush().await.expect("clone flush");
        drop(c);

        let got = open_ro(&store, vol).await.read(0, want.len() as u64).await.expect("read");
        assert!(got == want, "{compression:?}: the volume reads back");
        let mut cwant = want.clone();
        cwant[2 * CS as usize..3 * CS as usize].copy_from_slice(&cwrite);
        let got = open_ro(&cstore, clone).await.read(0, cwant.len() as u64).await.expect("read clone");
        assert!(got == cwant, "{compression:?}: the clone reads back through its parent");
        let snap_ro = Volume::open(
            store.clone(),
            vol,
            OpenOptions { snapshot: Some("s1".into()), read_only: true, ..OpenOptions::default() },
        )
        .await
        .expect("open the snapshot");
        assert!(snap_ro.read(0, want.len() as u64).await.expect("read") == want);
        assert_eq!(fsck_errors(&store, vol).await, Vec::<String>::new());
        assert_eq!(fsck_errors(&cstore, clone).await, Vec::<String>::new());

        for needle in ["PLAINTEXT-CHUNK", "PLAINTEXT-INLINE", "PLAINTEXT-CLONE", "quick brown fox"] {
            let (n, holding) = raw_objects_holding(&base, needle.as_bytes()).await;
            assert!(n > 10, "{n} objects looked at");
            assert!(holding.is_empty(), "{compression:?}: {needle} in the clear in {holding:?}");
        }
        if compression.is_some() {
            let chunks = store::list_all(base.as_ref(), &format::chunk_prefix(vol)).await.expect("list");
            assert!(!chunks.is_empty());
            for o in chunks {
                assert!(o.size < CSU / 2, "compressed before it was sealed: {} holds {} bytes", o.key, o.size);
            }
        }
    }
}

on_both_stores!(an_encrypted_volume_stores_no_plaintext_and_reads_back);

/// Replace the object `key` with `body` in the raw store.
async fn put_raw(base: &DynStore, key: &str, body: Bytes) {
    base.put(key, body, PutMode::Overwrite).await.expect("put raw");
}

/// The chunk objects of chunk `index`, oldest generation first.
async fn generations(base: &DynStore, vol: &str, index: u64) -> Vec<String> {
    let mut keys: Vec<(u64, String)> = store::list_all(base.as_ref(), &format::chunk_prefix(vol))
        .await
        .expect("list")
        .into_iter()
        .filter_map(|o| format::parse_chunk_key(vol, &o.key).filter(|(i, _)| *i == index).map(|(_, g)| (g, o.key)))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

/// Each way of altering an encrypted volume's objects is found: a read
/// fails (never other bytes) and fsck reports the object. Flipped bits in
/// a chunk; a chunk object copied over another index, and an older
/// generation copied over a newer one's name (both of the same bytes, so
/// no checksum tells them apart); a cut journal record; a changed
/// `volume.json` field; a changed snapshot record.
async fn damage_to_an_encrypted_volume_is_found(base: DynStore) {
    let key = kek(2);
    // One volume per case: each starts from a clean copy.
    let setup = || async {
        let vol = format!("{}/", common::unique("dmg"));
        let store = create_encrypted(&base, &vol, 4 * CSU, &key).await;
        let w = open(&store, &vol).await;
        // Chunks 0 and 1 hold the same bytes, and chunk 0 gets them again
        // (a second generation of the same bytes): their checksums alike,
        // only the sealing binds each object to its name.
        let same = marked(CS as usize, "A");
        w.write(0, &same).await.expect("write");
        w.write(CSU, &same).await.expect("write");
        w.flush().await.expect("flush");
        w.write(0, &same).await.expect("write");
        w.flush().await.expect("flush");
        drop(w);
        assert_eq!(fsck_errors(&store, &vol).await, Vec::<String>::new());
        (vol, store)
    };
    let read_fails = |store: DynStore, vol: String, what: &'static str| async move {
        match Volume::open(store.clone(), &vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await {
            Ok(v) => match v.read(0, 2 * CSU).await {
                Err(VolumeError::Corrupt(why)) => assert!(why.contains("damaged") || why.contains("fails"), "{why}"),
                other => panic!("{what}: read gave {:?}", other.map(|b| b.len())),
            },
            Err(VolumeError::Corrupt(_)) => {}
            Err(e) => panic!("{what}: open failed otherwise: {e}"),
        }
    };

    // A flipped bit inside a chunk.
    let (vol, store) = setup().await;
    let newest = generations(&base, &vol, 0).await.pop().expect("chunk 0");
    let mut raw = base.get(&newest, None).await.expect("get").to_vec();
    let at = raw.len() / 2;
    raw[at] ^= 0x04;
    put_raw(&base, &newest, raw.into()).await;
    read_fails(store.clone(), vol.clone(), "a flipped bit").await;
    let errs = fsck_errors(&store, &vol).await;
    assert!(errs.iter().any(|e| e.contains(&newest)), "fsck: {errs:?}");

    // Chunk 1's object copied over chunk 0's newest name.
    let (vol, store) = setup().await;
    let newest = generations(&base, &vol, 0).await.pop().expect("chunk 0");
    let other = generations(&base, &vol, 1).await.pop().expect("chunk 1");
    put_raw(&base, &newest, base.get(&other, None).await.expect("get")).await;
    read_fails(store.clone(), vol.clone(), "another index's object").await;
    assert!(fsck_errors(&store, &vol).await.iter().any(|e| e.contains(&newest)));

    // The older generation of chunk 0 copied over the newer one's name.
    let (vol, store) = setup().await;
    let gens = generations(&base, &vol, 0).await;
    assert!(gens.len() >= 2, "two generations of chunk 0: {gens:?}");
    put_raw(&base, &gens[gens.len() - 1], base.get(&gens[0], None).await.expect("get")).await;
    read_fails(store.clone(), vol.clone(), "an older generation").await;
    assert!(fsck_errors(&store, &vol).await.iter().any(|e| e.contains(&gens[gens.len() - 1])));

    // The newest journal record cut short (at a frame boundary and inside one).
    for cut in [0usize, 17] {
        let (vol, store) = setup().await;
        let records = store::list_all(base.as_ref(), &format::journal_prefix(&vol)).await.expect("list");
        let last = records.last().expect("records").key.clone();
        let raw = base.get(&last, None).await.expect("get");
        let keep = if cut == 0 { raw.len() - 1 } else { cut };
        put_raw(&base, &last, raw.slice(..keep)).await;
        match Volume::open(store.clone(), &vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await {
            Err(VolumeError::Corrupt(why)) => assert!(why.contains(&last), "{why}"),
            other => panic!("a cut record: open gave {:?}", other.map(|_| ())),
        }
        let errs = fsck_errors(&store, &vol).await;
        assert!(errs.iter().any(|e| e.contains(&last)), "fsck: {errs:?}");
    }

    // A record replayed under a later seq: record 1 copied over the last.
    let (vol, store) = setup().await;
    let records = store::list_all(base.as_ref(), &format::journal_prefix(&vol)).await.expect("list");
    let (first, last) = (records[1].key.clone(), records.last().expect("records").key.clone());
    put_raw(&base, &last, base.get(&first, None).await.expect("get")).await;
    assert!(matches!(
        Volume::open(store.clone(), &vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await,
        Err(VolumeError::Corrupt(_))
    ));

    // volume.json's size changed: refused at unlock, and by an open, fsck or
    // compaction through a store unlocked before the change.
    let (vol, store) = setup().await;
    let mk = format::meta_key(&vol);
    let mut meta = format::VolumeMeta::decode(&base.get(&mk, None).await.expect("get")).expect("meta");
    meta.size *= 2;
    put_raw(&base, &mk, Bytes::from(meta.encode())).await;
    match keys::unlock(&base, &vol, Some(&key)).await {
        Err(VolumeError::Corrupt(why)) => assert!(why.contains("fails its tag"), "{why}"),
        other => panic!("a changed volume.json: {:?}", other.map(|_| ())),
    }
    match Volume::open(store.clone(), &vol, OpenOptions::default()).await {
        Err(VolumeError::Corrupt(why)) => assert!(why.contains("fails its tag"), "{why}"),
        other => panic!("an open after volume.json changed: {:?}", other.map(|_| ())),
    }
    let opts = compact::CompactOptions { safety_age: Duration::ZERO, ..Default::default() };
    assert!(matches!(compact::compact(&store, &vol, &opts, &clock()).await, Err(VolumeError::Corrupt(_))));
    let errs = fsck_errors(&store, &vol).await;
    assert!(errs.iter().any(|e| e.contains("volume.json") && e.contains("fails its tag")), "{errs:?}");

    // Another volume's volume.json (same key) put in its place.
    let (vol, store) = setup().await;
    let (other, _) = setup().await;
    put_raw(&base, &format::meta_key(&vol), base.get(&format::meta_key(&other), None).await.expect("get")).await;
    match Volume::open(store.clone(), &vol, OpenOptions::default()).await {
        Err(VolumeError::Corrupt(why)) => assert!(why.contains("names uuid"), "{why}"),
        other => panic!("another volume's volume.json: {:?}", other.map(|_| ())),
    }

    // A snapshot record's seq changed.
    let (vol, store) = setup().await;
    snapshot_committed(&store, &vol, "s", None, &clock()).await.expect("snapshot");
    let sk = format::snapshot_key(&vol, "s");
    let mut rec = format::SnapshotRecord::decode(&base.get(&sk, None).await.expect("get"), &sk).expect("record");
    rec.seq -= 1;
    put_raw(&base, &sk, Bytes::from(serde_json::to_vec(&rec).expect("json"))).await;
    match read_snapshot(&store, &vol, "s").await {
        Err(VolumeError::Corrupt(why)) => assert!(why.contains("fails its tag"), "{why}"),
        other => panic!("a changed snapshot record: {other:?}"),
    }
    let errs = fsck_errors(&store, &vol).await;
    assert!(errs.iter().any(|e| e.contains(&sk)), "fsck: {errs:?}");
    // Compaction takes it for unreadable: it deletes nothing.
    let opts = compact::CompactOptions { safety_age: Duration::ZERO, ..Default::default() };
    let rep = compact::compact(&store, &vol, &opts, &clock()).await.expect("compact");
    assert_eq!(rep.unreadable_snapshots, vec![sk.clone()]);
    assert_eq!(rep.chunks_deleted + rep.journal_records_deleted, 0, "{rep:?}");

    // A snapshot record copied under another snapshot's name.
    let (vol, store) = setup().await;
    snapshot_committed(&store, &vol, "a", None, &clock()).await.expect("snapshot");
    let (ka, kb) = (format::snapshot_key(&vol, "a"), format::snapshot_key(&vol, "b"));
    put_raw(&base, &kb, base.get(&ka, None).await.expect("get")).await;
    match read_snapshot(&store, &vol, "b").await {
        Err(VolumeError::Corrupt(why)) => assert!(why.contains("holds the record of snapshot"), "{why}"),
        other => panic!("a snapshot record under another name: {other:?}"),
    }
}

on_both_stores!(damage_to_an_encrypted_volume_is_found);

/// Only the right key opens a volume; none, or another, is refused before
/// anything is read or written, with the key ids in the message; a rekey
/// keeps the data readable with the new key only, rewriting no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_key_opens_and_rekey_changes_it() {
    let base: DynStore = Arc::new(MemoryStore::new());
    let vol = "v/";
    let (k1, k2, k3) = (kek(3), kek(4), kek(5));
    let store = create_encrypted(&base, vol, 4 * CSU, &k1).await;
    let data = marked(3 * CS as usize, "KEYS");
    let w = open(&store, vol).await;
    w.write(0, &data).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);

    // No key: refused at open, naming the key.
    match Volume::open(base.clone(), vol, OpenOptions::default()).await {
        Err(VolumeError::Key(why)) => {
            assert!(why.contains("is encrypted") && why.contains(&k1.id()) && why.contains("--key-file"), "{why}")
        }
        other => panic!("no key: {:?}", other.map(|_| ())),
    }
    // Another key: refused at unlock.
    match keys::unlock(&base, vol, Some(&k2)).await {
        Err(VolumeError::Key(why)) => {
            assert!(why.contains("wrong key for volume") && why.contains(&k1.id()) && why.contains(&k2.id()), "{why}")
        }
        other => panic!("a wrong key: {:?}", other.map(|_| ())),
    }
    // Nothing was written by the refused attempts.
    let before = store::list_all(base.as_ref(), "").await.expect("list");

    // Rekey: a wrong current key is refused; then k2 replaces k1.
    assert!(matches!(keys::rekey(&base, vol, &k3, &k2).await, Err(VolumeError::Key(_))));
    let chunks_before = store::list_all(base.as_ref(), &format::chunk_prefix(vol)).await.expect("list");
    assert_eq!(keys::rekey(&base, vol, &k1, &k2).await.expect("rekey"), k2.id());
    let after = store::list_all(base.as_ref(), "").await.expect("list");
    assert_eq!(before.len(), after.len(), "a rekey writes no object but volume.json");
    let chunks_after = store::list_all(base.as_ref(), &format::chunk_prefix(vol)).await.expect("list");
    for (a, b) in chunks_before.iter().zip(&chunks_after) {
        assert_eq!((&a.key, a.size), (&b.key, b.size));
    }
    assert!(
        matches!(keys::unlock(&base, vol, Some(&k1)).await, Err(VolumeError::Key(_))),
        "the old key no longer opens"
    );
    let store2 = keys::unlock(&base, vol, Some(&k2)).await.expect("the new key opens");
    assert!(open_ro(&store2, vol).await.read(0, data.len() as u64).await.expect("read") == data);
    assert_eq!(fsck_errors(&store2, vol).await, Vec::<String>::new());
    // A plain volume has no key to change.
    Volume::create(base.clone(), "plain/", create_opts(CSU, None), &clock()).await.expect("create");
    assert!(matches!(keys::rekey(&base, "plain/", &k1, &k2).await, Err(VolumeError::InvalidArgument(_))));
    // Snapshot names may end in .json: their records are checked under
    // their own names (compaction deletes on, fsck is clean).
    snapshot_committed(&store2, vol, "nightly.json", None, &clock()).await.expect("snapshot");
    assert_eq!(read_snapshot(&store2, vol, "nightly.json").await.expect("read").name, "nightly.json");
    let opts = compact::CompactOptions { safety_age: Duration::ZERO, ..Default::default() };
    let rep = compact::compact(&store2, vol, &opts, &clock()).await.expect("compact");
    assert!(rep.unreadable_snapshots.is_empty(), "{rep:?}");
    assert_eq!(fsck_errors(&store2, vol).await, Vec::<String>::new());
    // A volume whose create stopped before its create record is not rekeyed.
    let rig = common::FaultRig::new();
    rig.rule(Some(s3blk::store::fault::Op::Put), "half/journal/", s3blk::store::fault::Fault::ServerError, 1);
    let opts = create_opts(CSU, Some(NewKeys::fresh(k1.clone())));
    assert!(Volume::create(rig.faulty(), "half/", opts, &clock()).await.is_err());
    match keys::rekey(&rig.plain(), "half/", &k1, &k2).await {
        Err(VolumeError::InvalidArgument(why)) => assert!(why.contains("has not finished"), "{why}"),
        other => panic!("a rekey of an unfinished create: {other:?}"),
    }
    assert!(keys::unlock(&rig.plain(), "half/", Some(&k1)).await.is_ok(), "volume.json is as it was");
}

/// A volume made from an encrypted one (clone, restore) is encrypted with
/// the same data key; made without the key it is refused, as is an
/// encrypted volume made from a plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_their_parents_encryption() {
    let base: DynStore = Arc::new(MemoryStore::new());
    let key = kek(6);
    let store = create_encrypted(&base, "src/", 2 * CSU, &key).await;
    let w = open(&store, "src/").await;
    w.write(0, &marked(CS as usize, "SRC")).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    // Through the store in the clear only.
    let e = catalog::clone_volume(&base, "src/", None, "c0/", "c0/", None, &clock()).await;
    assert!(e.is_err(), "a clone of an encrypted volume without its key");
    assert!(base.head(&format::meta_key("c0/")).await.expect("head").is_none());
    let meta = catalog::clone_volume(&store, "src/", None, "c1/", "c1/", None, &clock()).await.expect("clone");
    let src_meta = s3blk::volume::replay::read_meta(base.as_ref(), "src/").await.expect("meta");
    let (a, b) = (meta.encryption.expect("encrypted"), src_meta.encryption.expect("encrypted"));
    assert_eq!(a.data_key_id, b.data_key_id);
    assert_ne!(a.wrapped_key, b.wrapped_key, "wrapped again for the clone");
    let cstore = keys::unlock(&base, "c1/", Some(&key)).await.expect("unlock");
    assert!(open_ro(&cstore, "c1/").await.read(0, CSU).await.expect("read") == marked(CS as usize, "SRC"));
    // A plain parent cannot have an encrypted child.
    Volume::create(base.clone(), "plain/", create_opts(CSU, None), &clock()).await.expect("create");
    let parent = format::ParentRef { volume: "plain/".into(), snapshot: "x".into(), seq: 0 };
    let opts = CreateOptions { parent: Some(parent), ..create_opts(CSU, Some(NewKeys::fresh(key.clone()))) };
    assert!(matches!(
        Volume::create(base.clone(), "c2/", opts, &clock()).await,
        Err(VolumeError::InvalidArgument(why)) if why.contains("not encrypted")
    ));
}

/// A delete that keeps the volume for its clones (its tombstone beside
/// `volume.json`) begins while a rekey rewrites `volume.json`: the rekey
/// says the volume is being deleted and leaves `volume.json` where it is,
/// so the reaper never takes the volume for an interrupted delete and the
/// clone still reads through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_racing_a_delete_leaves_the_volume_its_clones_read() {
    #[derive(Debug, Default)]
    struct DeleteDuringRekey {
        armed: std::sync::atomic::AtomicBool,
    }
    #[async_trait::async_trait]
    impl common::Around for DeleteDuringRekey {
        async fn put_if_match(&self, inner: &DynStore, key: &str, body: Bytes, tag: &str) -> store::StoreResult<()> {
            if key == "src/volume.json" && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let out = catalog::delete_volume(inner, "src/", catalog::OnDependants::Keep, &clock()).await;
                assert!(matches!(out, Ok(catalog::DeleteOutcome::Kept)), "{out:?}");
            }
            inner.put_if_match(key, body, tag).await
        }
    }
    let mem: DynStore = Arc::new(MemoryStore::new());
    let wrapped = common::Wrapped::new(mem.clone(), DeleteDuringRekey::default());
    let base: DynStore = wrapped.clone();
    let (k1, k2) = (kek(7), kek(8));
    let store = create_encrypted(&base, "src/", 2 * CSU, &k1).await;
    let w = open(&store, "src/").await;
    w.write(0, &marked(CS as usize, "KEPT")).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    catalog::clone_volume(&store, "src/", None, "c/", "c/", None, &clock()).await.expect("clone");
    wrapped.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    match keys::rekey(&base, "src/", &k1, &k2).await {
        Err(VolumeError::NotFound(why)) => assert!(why.contains("deleted while its key"), "{why}"),
        other => panic!("a rekey racing a delete: {other:?}"),
    }
    assert!(mem.head(&format::meta_key("src/")).await.expect("head").is_some(), "volume.json stays");
    let age = catalog::ReapAge { safety_age: Duration::ZERO };
    catalog::reap(&mem, "src/", Some(age)).await.expect("reap");
    let cstore = keys::unlock(&mem, "c/", Some(&k1)).await.expect("unlock the clone");
    assert!(open_ro(&cstore, "c/").await.read(0, CSU).await.expect("read") == marked(CS as usize, "KEPT"));
}

/// A clone whose create stopped after its `volume.json` (its create record
/// failed) is finished by the retry with a sealed create record: it opens
/// with the key, and its record is not in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_retried_after_a_failed_create_record_is_sealed() {
    use s3blk::store::fault::{Fault, Op};
    let rig = common::FaultRig::new();
    let faulty = rig.faulty();
    let key = kek(9);
    let store = create_encrypted(&faulty, "src/", 2 * CSU, &key).await;
    let w = open(&store, "src/").await;
    w.write(0, &marked(CS as usize, "RETRY")).await.expect("write");
    w.flush().await.expect("flush");
    drop(w);
    rig.rule(Some(Op::Put), "c/journal/", Fault::ServerError, 1);
    assert!(catalog::clone_volume(&store, "src/", None, "c/", "c/", None, &clock()).await.is_err());
    assert!(rig.plain().head(&format::meta_key("c/")).await.expect("head").is_some(), "volume.json was left");
    catalog::clone_volume(&store, "src/", None, "c/", "c/", None, &clock()).await.expect("the retry finishes it");
    let record = rig.plain().get(&format::journal_key("c/", 0), None).await.expect("create record");
    assert!(s3blk::crypto::looks_sealed(&record), "the create record is sealed");
    let cstore = keys::unlock(&rig.plain(), "c/", Some(&key)).await.expect("unlock");
    assert!(open_ro(&cstore, "c/").await.read(0, CSU).await.expect("read") == marked(CS as usize, "RETRY"));
}

/// A sealed store answers every range as the store in the clear would:
/// the same bytes, the same clipping at the end, an empty answer for a
/// range from the end on, an error for one past it; heads and listings
/// give plain sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_ranges_read_as_plain_ranges() {
    let frame = s3blk::crypto::FRAME as u64;
    let base: DynStore = Arc::new(MemoryStore::new());
    let plain: DynStore = Arc::new(MemoryStore::new());
    let store = create_encrypted(&base, "v/", CSU, &kek(10)).await;
    for len in [0, 1, frame - 1, frame, frame + 1, 2 * frame, 3 * frame - 5] {
        let key = format!("v/chunks/{len:016x}/0000000000000001");
        let body = Bytes::from(common::pattern(len, len as usize));
        store.put(&key, body.clone(), PutMode::Overwrite).await.expect("put sealed");
        plain.put(&key, body.clone(), PutMode::Overwrite).await.expect("put plain");
        assert_eq!(store.head(&key).await.expect("head"), Some(len));
        let listed = store::list_all(store.as_ref(), &key).await.expect("list");
        assert_eq!(listed.iter().map(|o| o.size).collect::<Vec<_>>(), vec![len]);
        assert_eq!(store.get(&key, None).await.expect("get"), body);
        let points = [0, 1, frame - 1, frame, frame + 1, len.saturating_sub(1), len, len + 1, len + frame];
        for &a in &points {
            for &b in &points {
                if a > b {
                    continue;
                }
                let want = plain.get(&key, Some(a..b)).await;
                let got = store.get(&key, Some(a..b)).await;
                match (&want, &got) {
                    (Ok(w), Ok(g)) => assert_eq!(w, g, "len {len} range {a}..{b}"),
                    (Err(_), Err(e)) => assert!(!matches!(e, store::StoreError::Damaged(_)), "{e}"),
                    _ => panic!("len {len} range {a}..{b}: plain {want:?}, sealed {got:?}"),
                }
            }
        }
    }
}

/// Where [`RekeyBesideFlatten`] puts the other change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beside {
    /// A whole rekey lands between the flatten's read of `volume.json`
    /// and its first write.
    RekeyInFlatten,
    /// A whole flatten lands between the rekey's read and its write.
    FlattenInRekey,
    /// The rekey's write lands but its answer is lost; a whole flatten
    /// lands before the retry (which finds `volume.json` changed).
    FlattenAfterLostRekey,
    /// A whole rekey lands right after the flatten's first write, before
    /// the flatten reads it back.
    RekeyAfterFlattenStep,
}

/// Runs the other change through the store it wraps at the first write of
/// the clone's `volume.json` (conditional or not).
#[derive(Debug)]
struct RekeyBesideFlatten {
    beside: Beside,
    armed: std::sync::atomic::AtomicBool,
}

impl RekeyBesideFlatten {
    async fn other(&self, inner: &DynStore, key: &str) {
        if key != "c/volume.json" || !self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match self.beside {
            Beside::RekeyInFlatten => {
                assert_eq!(keys::rekey(inner, "c/", &kek(11), &kek(12)).await.expect("rekey"), kek(12).id())
            }
            Beside::FlattenInRekey => {
                let out = flatten_with(inner, "c/", &kek(11)).await;
                assert_eq!(out, catalog::ParentOutcome::LetGo { parent: "src/".into() });
            }
            Beside::FlattenAfterLostRekey | Beside::RekeyAfterFlattenStep => {}
        }
    }
}

#[async_trait::async_trait]
impl common::Around for RekeyBesideFlatten {
    async fn put(&self, inner: &DynStore, key: &str, body: Bytes, mode: PutMode) -> store::StoreResult<()> {
        self.other(inner, key).await;
        inner.put(key, body, mode).await
    }
    async fn put_if_match(&self, inner: &DynStore, key: &str, body: Bytes, tag: &str) -> store::StoreResult<()> {
        if self.beside == Beside::FlattenAfterLostRekey
            && key == "c/volume.json"
            && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            inner.put_if_match(key, body, tag).await?;
            let out = flatten_with(inner, "c/", &kek(12)).await;
            assert_eq!(out, catalog::ParentOutcome::LetGo { parent: "src/".into() });
            return Err(store::StoreError::Transient("injected: the answer was lost".into()));
        }
        if self.beside == Beside::RekeyAfterFlattenStep
            && key == "c/volume.json"
            && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            inner.put_if_match(key, body, tag).await?;
            assert_eq!(keys::rekey(inner, "c/", &kek(11), &kek(12)).await.expect("rekey"), kek(12).id());
            return Ok(());
        }
        self.other(inner, key).await;
        inner.put_if_match(key, body, tag).await
    }
}

/// Copy the parents' chunks of the encrypted clone `vol` (opened with
/// `key`) and let go of its parent.
async fn flatten_with(base: &DynStore, vol: &str, key: &Kek) -> catalog::ParentOutcome {
    let store = keys::unlock(base, vol, Some(key)).await.expect("unlock");
    let v = open(&store, vol).await;
    let copied = v.copy_parents(&|_, _| {}).await.expect("copy the parent's chunks");
    drop(v);
    catalog::let_go_of_parent(&store, vol, Some(copied.seq)).await.expect("let go of the parent")
}

/// A rekey and a flatten of one clone at once, each landing between the
/// other's read of `volume.json` and its write, undo neither change: the
/// later write finds `volume.json` changed (a replace `If-Match`), reads
/// it again and goes again. Unconditional, the flatten's step put the old
/// key back (the new one no longer opened the clone), and a rekey that
/// read before the flatten named the parent again after it was let go of
/// (the clone then failed to open once the parent was deleted). A rekey
/// whose write landed unanswered and whose retry finds a flatten's step
/// over it succeeds (the new key opens the volume): it said "wrong key".
/// A rekey landing right after a flatten's step is no conflict for the
/// flatten (it said "changed by another" and stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_and_a_flatten_at_once_keep_each_others_change() {
    for beside in
        [Beside::RekeyInFlatten, Beside::FlattenInRekey, Beside::FlattenAfterLostRekey, Beside::RekeyAfterFlattenStep]
    {
        let mem: DynStore = Arc::new(MemoryStore::new());
        let wrapped = common::Wrapped::new(
            mem.clone(),
            RekeyBesideFlatten { beside, armed: std::sync::atomic::AtomicBool::new(false) },
        );
        let policy = store::retry::RetryPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
            ..store::retry::RetryPolicy::default()
        };
        let base: DynStore = store::layered(wrapped.clone(), policy);
        let (k1, k2) = (kek(11), kek(12));
        let store = create_encrypted(&mem, "src/", 3 * CSU, &k1).await;
        let w = open(&store, "src/").await;
        w.write(0, &marked(CS as usize, "ZERO")).await.expect("write");
        w.write(2 * CSU, &marked(CS as usize, "TWO")).await.expect("write");
        w.flush().await.expect("flush");
        drop(w);
        catalog::clone_volume(&store, "src/", None, "c/", "c/", None, &clock()).await.expect("clone");
        let model = open_ro(&keys::unlock(&mem, "c/", Some(&k1)).await.expect("unlock"), "c/")
            .await
            .read(0, 3 * CSU)
            .await
            .expect("read");
        wrapped.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        match beside {
            Beside::RekeyInFlatten | Beside::RekeyAfterFlattenStep => {
                let out = flatten_with(&base, "c/", &k1).await;
                assert_eq!(out, catalog::ParentOutcome::LetGo { parent: "src/".into() });
            }
            Beside::FlattenInRekey | Beside::FlattenAfterLostRekey => {
                assert_eq!(keys::rekey(&base, "c/", &k1, &k2).await.expect("rekey"), k2.id())
            }
        }
        assert!(!wrapped.armed.load(std::sync::atomic::Ordering::SeqCst), "{beside:?}: the other change never ran");
        let meta = s3blk::volume::replay::read_meta(mem.as_ref(), "c/").await.expect("meta");
        assert_eq!(
            meta.encryption.as_ref().map(|e| e.key_id.clone()),
            Some(k2.id()),
            "{beside:?}: the rekey was undone"
        );
        assert!(meta.parent.is_none() && meta.flattened.is_some(), "{beside:?}: the flatten was undone: {meta:?}");
        let old = keys::unlock(&mem, "c/", Some(&k1)).await;
        assert!(matches!(old, Err(VolumeError::Key(_))), "{beside:?}: the old key still opens the clone");
        let del = catalog::delete_volume(&mem, "src/", catalog::OnDependants::RefuseClones, &clock()).await;
        assert!(matches!(del, Ok(catalog::DeleteOutcome::Deleted { .. })), "{beside:?}: {del:?}");
        let cstore = keys::unlock(&mem, "c/", Some(&k2)).await.expect("unlock with the new key");
        let v = Volume::open(cstore.clone(), "c/", OpenOptions { read_only: true, ..OpenOptions::default() }).await;
        let v = v.unwrap_or_else(|e| panic!("{beside:?}: the clone does not open without its parent: {e}"));
        assert!(v.read(0, 3 * CSU).await.expect("read") == model, "{beside:?}: the clone reads other bytes");
        assert!(fsck_errors(&cstore, "c/").await.is_empty(), "{beside:?}");
    }
}

/// A store that writes over a replace `If-Match` whatever the tag.
#[derive(Debug)]
struct IgnoresIfMatch;

#[async_trait::async_trait]
impl common::Around for IgnoresIfMatch {
    async fn put_if_match(&self, inner: &DynStore, key: &str, body: Bytes, _: &str) -> store::StoreResult<()> {
        inner.put(key, body, PutMode::Overwrite).await
    }
}

/// A store that answers 501 to `If-Match`.
#[derive(Debug)]
struct NoIfMatch;

#[async_trait::async_trait]
impl common::Around for NoIfMatch {
    async fn put_if_match(&self, _: &DynStore, key: &str, _: Bytes, _: &str) -> store::StoreResult<()> {
        Err(store::StoreError::Unsupported(format!("PUT (If-Match) {key}: HTTP 501 NotImplemented")))
    }
}

/// An S3 server that answers a GET with no ETag.
#[derive(Debug)]
struct NoTags;

#[async_trait::async_trait]
impl common::Around for NoTags {
    async fn get_tagged(&self, _: &DynStore, key: &str) -> store::StoreResult<(Bytes, String)> {
        Err(store::StoreError::Unsupported(format!("GET {key}: the server answered no ETag")))
    }
}

/// The probe before a change of `volume.json` finds a store that ignores
/// `If-Match` or answers 501 to it (and leaves no probe behind); a rekey
/// there, or on a store that keeps no tags, still changes the key,
/// unconditionally (without tags it failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_without_conditional_replaces_are_found_and_still_rekeyed() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    assert!(store::supports_conditional_replace(mem.as_ref(), "p/").await.expect("probe"));
    let ignores: DynStore = common::Wrapped::new(mem.clone(), IgnoresIfMatch);
    let refuses: DynStore = common::Wrapped::new(mem.clone(), NoIfMatch);
    assert!(!store::supports_conditional_replace(ignores.as_ref(), "p/").await.expect("probe"));
    assert!(!store::supports_conditional_replace(refuses.as_ref(), "p/").await.expect("probe"));
    assert!(store::list_all(mem.as_ref(), "p/").await.expect("list").is_empty(), "a probe was left");
    let untagged: DynStore = common::Wrapped::new(mem.clone(), NoTags);
    for (n, base) in [(0u8, ignores), (1, refuses), (2, untagged)] {
        let vol = format!("v{n}/");
        let (k1, k2) = (kek(20 + 2 * n), kek(21 + 2 * n));
        let store = create_encrypted(&base, &vol, CSU, &k1).await;
        let w = open(&store, &vol).await;
        w.write(0, &marked(CS as usize, "CAS")).await.expect("write");
        w.flush().await.expect("flush");
        drop(w);
        assert_eq!(keys::rekey(&base, &vol, &k1, &k2).await.expect("rekey"), k2.id());
        assert!(matches!(keys::unlock(&mem, &vol, Some(&k1)).await, Err(VolumeError::Key(_))));
        let now = keys::unlock(&mem, &vol, Some(&k2)).await.expect("the new key opens it");
        assert!(open_ro(&now, &vol).await.read(0, CSU).await.expect("read") == marked(CS as usize, "CAS"));
    }
}
