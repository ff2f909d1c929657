//! The dirty budget counts the memory dirty chunks really take: with a
//! write-back log, a page written over bytes not in memory keeps only its
//! entry in memory, and a chunk dirty by one such page still holds its
//! slot. Measured with a counting allocator (this binary holds this one
//! test, so nothing else allocates meanwhile).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use s3blk::volume::budget::MemoryBudget;
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::{OpenOptions, Volume};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a
// counter is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const CS: u64 = 64 << 10;

/// Pages written one per chunk over many chunks, and pages filling a few
/// chunks: the memory they add stays within the dirty budget bytes held.
#[test]
fn dirty_pages_in_the_log_take_no_more_memory_than_the_budget_counts() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = common::local_store(&dir.path().join("store"));
        let chunks = 1024u64;
        let opts = CreateOptions::new(chunks * CS, CS as u32);
        Volume::create(store.clone(), "v", opts, &s3blk::clock::SystemClock).await.expect("create");
        let budget = MemoryBudget::new(256 << 20, 16 << 20);
        let opts = OpenOptions {
            budget: Some(budget.clone()),
            log_dir: Some(dir.path().join("logs")),
            commit_interval: std::time::Duration::from_secs(3600),
            ..OpenOptions::default()
        };
        let v = Volume::open(store.clone(), "v", opts).await.expect("open");
        let page = common::pattern(1, 4096);
        // Warm up whatever the write path allocates once.
        v.write(0, &page).await.expect("write");
        let (live, held) = (LIVE.load(Ordering::SeqCst), budget.dirty_bytes() as i64);
        // One page in each of most chunks.
        for c in 1..chunks / 2 {
            v.write(c * CS + 4096, &page).await.expect("write");
        }
        // Every page of the others.
        for c in chunks / 2..chunks {
            for p in 0..CS / 4096 {
                v.write(c * CS + p * 4096, &page).await.expect("write");
            }
        }
        let added = LIVE.load(Ordering::SeqCst) - live;
        let charged = budget.dirty_bytes() as i64 - held;
        assert!(
            added <= charged,
            "dirty chunks took {added} bytes of memory, the dirty budget counts {charged} ({} per chunk more)",
            (added - charged) / chunks as i64
        );
        drop(v);
    });
}
