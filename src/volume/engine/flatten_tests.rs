//! A parent's chunk copied within the store ([`Volume::copy_in_store`])
//! and then written before a record names the copy: the record must never
//! name the copy over what was written, nor name one too old.

use std::sync::Arc;

use super::{ChunkRef, CreateOptions, OpenOptions, Volume};
use crate::clock::SystemClock;
use crate::store::DynStore;
use crate::store::memory::MemoryStore;
use crate::volume::catalog;

const CS: u64 = 64 << 10;

fn fill(n: u8, len: u64) -> Vec<u8> {
    vec![n; len as usize]
}

/// Parent "p/" with chunks 0 and 1 stored whole, cloned from its head as
/// "c/"; the clone's writer.
async fn clone_of_two_chunks() -> (DynStore, Volume) {
    let mem: DynStore = Arc::new(MemoryStore::new());
    Volume::create(mem.clone(), "p/", CreateOptions::new(4 * CS, CS as u32), &SystemClock).await.expect("create");
    let p = Volume::open(mem.clone(), "p/", OpenOptions::default()).await.expect("open parent");
    p.write(0, &fill(1, CS)).await.expect("write");
    p.write(CS, &fill(2, CS)).await.expect("write");
    p.flush().await.expect("flush");
    drop(p);
    catalog::clone_volume(&mem, "p/", None, "c/", "c/", None, &SystemClock).await.expect("clone");
    let c = Volume::open(mem.clone(), "c/", OpenOptions::default()).await.expect("open clone");
    (mem, c)
}

async fn read_fresh(mem: &DynStore) -> Vec<u8> {
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    let v = Volume::open(mem.clone(), "c/", ro).await.expect("open read-only");
    v.read(0, 2 * CS).await.expect("read")
}

/// Written whole after its copy, the chunk is staged when the record is
/// built: the record names what was written, not the copy (named after
/// it, the copy took the write back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_written_after_its_copy_keeps_what_was_written() {
    let (mem, c) = clone_of_two_chunks().await;
    assert!(c.copy_in_store(0).await.expect("copy"), "chunk 0 was not copied within the store");
    assert!(c.copy_in_store(1).await.expect("copy"), "chunk 1 was not copied within the store");
    c.write(CS, &fill(9, CS)).await.expect("write chunk 1 whole");
    c.write(100, &fill(8, 10)).await.expect("write into chunk 0");
    c.flush().await.expect("flush");
    let mut want = [fill(1, CS), fill(9, CS)].concat();
    want[100..110].copy_from_slice(&fill(8, 10));
    assert!(c.read(0, 2 * CS).await.expect("read") == want, "the writer reads other bytes");
    drop(c);
    assert!(read_fresh(&mem).await == want, "a fresh reader reads other bytes");
}

/// A copy older than `restage_after` when the record is built is left
/// out (compaction may have collected it): the chunk stays the parent's,
/// for the flatten to copy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_too_old_to_name_is_left_out() {
    let mem: DynStore = clone_of_two_chunks().await.0;
    let opts = OpenOptions { restage_after: std::time::Duration::ZERO, ..OpenOptions::default() };
    let c = Volume::open(mem.clone(), "c/", opts).await.expect("open clone");
    assert!(c.copy_in_store(0).await.expect("copy"));
    c.flush().await.expect("flush");
    assert!(!c.inner.lock().map.contains_key(&0), "a record named a copy older than restage_after");
    // The flatten copies it again, and this time names it at once.
    let copied = c.copy_parents(&|_, _| {}).await;
    assert!(copied.is_err(), "{copied:?}: every copy is too old at once with restage_after 0");
    drop(c);
    let c = Volume::open(mem.clone(), "c/", OpenOptions::default()).await.expect("open clone");
    let copied = c.copy_parents(&|_, _| {}).await.expect("copy");
    assert_eq!((copied.copied, copied.in_store), (2, 2), "{copied:?}");
    let map = c.inner.lock().map.clone();
    assert!(map.values().all(|r| matches!(r, ChunkRef::Stored { .. })) && map.len() == 2, "{map:?}");
    drop(c);
    assert!(read_fresh(&mem).await == [fill(1, CS), fill(2, CS)].concat());
    let objects = crate::store::list_all(mem.as_ref(), "c/chunks/").await.expect("list");
    assert!(objects.len() >= 2, "{objects:?}");
    assert!(mem.head("c/volume.json").await.expect("head").is_some());
}
