//! Races between a chunk upload and an inline commit of the same chunk,
//! made deterministic by holding the upload's PUT at a gate.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{CreateOptions, OpenOptions, Volume};
use crate::clock::SystemClock;
use crate::store::memory::MemoryStore;
use crate::store::{DynStore, ListPage, ListRequest, ObjectStore, PutMode, StoreResult};

/// Holds every chunk PUT until `open` lets it through; `entered` counts
/// the PUTs that reached the gate. Journal PUTs likewise at their own
/// gate, while `hold_journal` is set.
#[derive(Debug)]
struct Gate {
    inner: DynStore,
    open: Semaphore,
    entered: Semaphore,
    hold_journal: AtomicBool,
    journal_open: Semaphore,
    journal_entered: Semaphore,
}

impl Gate {
    fn new(inner: DynStore) -> Arc<Self> {
        Arc::new(Gate {
            inner,
            open: Semaphore::new(0),
            entered: Semaphore::new(0),
            hold_journal: AtomicBool::new(false),
            journal_open: Semaphore::new(0),
            journal_entered: Semaphore::new(0),
        })
    }
}

#[async_trait]
impl ObjectStore for Gate {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        self.inner.get(key, range).await
    }
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        if key.contains("/chunks/") {
            self.entered.add_permits(1);
            self.open.acquire().await.expect("gate open").forget();
        }
        if key.contains("/journal/") && self.hold_journal.load(Ordering::SeqCst) {
            self.journal_entered.add_permits(1);
            self.journal_open.acquire().await.expect("gate open").forget();
        }
        self.inner.put(key, body, mode).await
    }
    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        self.inner.get_tagged(key).await
    }
    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        self.inner.put_if_match(key, body, tag).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        self.inner.list(req).await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        self.inner.head(key).await
    }
    fn describe(&self) -> String {
        "gate".into()
    }
}

const CS: u64 = 64 << 10;

/// Volume "v/" of four chunks on a memory store (`mem`), opened through a
/// gate.
async fn gated_volume() -> (DynStore, Arc<Gate>, Volume) {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let opts = CreateOptions::new(4 * CS, CS as u32);
    Volume::create(mem.clone(), "v/", opts, &SystemClock).await.expect("create");
    let gate = Gate::new(mem.clone());
    let store: DynStore = gate.clone();
    let v = Volume::open(store, "v/", OpenOptions::default()).await.expect("open");
    (mem, gate, v)
}

fn page(n: u8) -> Vec<u8> {
    vec![n; 4096]
}

/// An upload that read a chunk's slot, then lost it to an inline commit
/// of newer pages, must not stage its older bytes when a later write has
/// made a new slot for the chunk: the next record would name that chunk
/// and drop the committed pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_overtaken_by_an_inline_commit_never_stages_older_bytes() {
    let (mem, gate, v) = gated_volume().await;
    v.write(0, &page(1)).await.expect("write page 0");
    // The upload reads the slot (page 0 only) and waits at the gate.
    let inner = v.inner.clone();
    let upload = tokio::spawn(async move { inner.upload_chunk(0).await });
    gate.entered.acquire().await.expect("upload at the gate").forget();
    // Page 1, then a flush that carries both pages inline: the slot goes.
    v.write(4096, &page(2)).await.expect("write page 1");
    v.flush().await.expect("flush inline");
    assert_eq!(v.stats().patched_chunks, 1, "the pages went inline");
    // A new slot for the chunk, then the upload ends.
    v.write(8192, &page(3)).await.expect("write page 2");
    gate.open.add_permits(1);
    upload.await.expect("upload task").expect("upload");
    gate.open.add_permits(1000);
    v.flush().await.expect("flush");
    drop(v);
    let r = Volume::open(mem.clone(), "v/", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open ro");
    assert!(r.read(0, 4096).await.expect("read") == page(1), "page 0 lost");
    assert!(r.read(4096, 4096).await.expect("read") == page(2), "page 1, committed inline, was lost");
    assert!(r.read(8192, 4096).await.expect("read") == page(3), "page 2 lost");
}

/// An upload that read a page before a write zeroed it, still in flight
/// when a record carrying the zeroed page is built (the chunk all zeros
/// below), and staged after that record landed with the chunk written
/// again: the record must carry the zero page (zero pages over zeros are
/// otherwise left out), so the staged bytes get it; a record naming them
/// without the chunk's pages then keeps the page zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_older_than_a_zeroed_page_committed_inline_never_brings_it_back() {
    let (mem, gate, v) = gated_volume().await;
    v.write(0, &page(1)).await.expect("write page 0");
    let inner = v.inner.clone();
    let upload = tokio::spawn(async move { inner.upload_chunk(0).await });
    gate.entered.acquire().await.expect("upload at the gate").forget();
    v.write(0, &page(0)).await.expect("zero page 0");
    // The flush's record (page 0 inline) is held; page 1 is written after
    // it was built, so the chunk stays dirty when it lands.
    gate.hold_journal.store(true, Ordering::SeqCst);
    let flush = {
        let v = v.clone();
        tokio::spawn(async move { v.flush().await })
    };
    gate.journal_entered.acquire().await.expect("record at the gate").forget();
    v.write(4096, &page(2)).await.expect("write page 1");
    gate.hold_journal.store(false, Ordering::SeqCst);
    gate.journal_open.add_permits(1);
    flush.await.expect("flush task").expect("flush");
    // The upload ends and stages; a record naming it without the chunk's
    // pages (as the background committer sends) lands.
    gate.open.add_permits(1000);
    upload.await.expect("upload task").expect("upload");
    {
        let _f = v.inner.flush_lock.lock().await;
        v.inner.commit().await.expect("commit");
    }
    let r = Volume::open(mem.clone(), "v/", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open ro");
    assert!(r.read(0, 4096).await.expect("read") == page(0), "page 0, zeroed and flushed, came back");
    drop(r);
    v.flush().await.expect("flush");
    drop(v);
    let r = Volume::open(mem.clone(), "v/", OpenOptions { read_only: true, ..OpenOptions::default() })
        .await
        .expect("open ro");
    assert!(r.read(0, 4096).await.expect("read") == page(0), "page 0 at the end");
    assert!(r.read(4096, 4096).await.expect("read") == page(2), "page 1 at the end");
}
