//! The memory the volumes of one process may hold, shared by all of them:
//! dirty bytes (written, not yet committed) and clean cached chunk bytes,
//! each bounded by one limit. The CSI node plugin makes one
//! [`MemoryBudget`] for every volume it serves; a volume opened without
//! one (`s3blk serve`, the CLI) gets a private budget of its own limits.
//!
//! This module owns the accounting and who waits or gives back; the engine
//! decides what to upload and what a cache evicts.
//!
//! **Dirty bytes** are counted in a semaphore of bytes. A new dirty chunk
//! takes its bytes as an owned [`DirtyGuard`] that travels with the chunk
//! (dirty, then staged) and gives the bytes back when dropped (after the
//! commit that makes the chunk durable): its chunk size, or, while it holds
//! only whole pages written over bytes never read, 4 KiB per page, the
//! guard growing with each new page. An upload that merges such a chunk
//! with its stored bytes takes the rest without waiting (an overdraft:
//! freeing memory must not wait for memory); the engine bounds it by
//! merging a few chunks at a time and committing them before the next. Writers that find the budget
//! spent wait in the semaphore's FIFO queue, so the bytes a slow volume's
//! upload frees go to whoever waited longest, whatever its volume. Each
//! writable volume also gets a small floor of its own (two of its chunks),
//! taken out of the shared bytes when it registers: no other volume can use
//! it, so a volume whose store stalls with the whole shared part dirty
//! never stops the others; they go on at least two chunks at a time. A
//! single volume can use its floor and all the shared bytes, so alone it
//! uses the whole budget. While writers wait, every volume holding more
//! than its fair share (limit / writable volumes) is told to upload.
//!
//! **Cache bytes** are counted in one atomic of the pool; each volume keeps
//! its own CLOCK cache ([`super::cache::CleanCache`]) under its own state
//! lock, so a hit costs what it did with private caches: a flag set under
//! the volume's lock, nothing shared. Only a miss that finds the pool full
//! evicts: it sweeps the volumes' CLOCK hands in turn (a pass each, from a
//! shared hand), its own directly and the others' through a `try_lock` of
//! their state (never waiting for a lock while holding its own, so no
//! deadlock), which approximates one CLOCK over all cached chunks: a cold
//! volume's chunks go before a hot one's. When nothing can be freed at
//! once the chunk is simply not cached; the pool never exceeds its limit.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Dirty and cache limits shared by every volume opened with it.
#[derive(Debug)]
pub struct MemoryBudget {
    pub(crate) dirty: Arc<DirtyPool>,
    pub(crate) cache: Arc<CachePool>,
}

/// Why a budget cannot be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("a memory budget of {0} bytes is too small (at least {MIN_BUDGET} bytes)")]
    TooSmall(u64),
    #[error(
        "the dirty budget ({limit} bytes) is smaller than two chunks of this volume ({chunk_size}-byte chunks); \
         give the node a larger memory budget or use smaller chunks"
    )]
    ChunkTooLarge { limit: u64, chunk_size: u64 },
}

/// The smallest `--memory-budget` accepted: two default chunks each for
/// dirty data and cache.
pub const MIN_BUDGET: u64 = 8 << 20;

impl MemoryBudget {
    pub fn new(dirty_limit: u64, cache_limit: u64) -> Arc<Self> {
        Arc::new(Self { dirty: Arc::new(DirtyPool::new(dirty_limit)), cache: Arc::new(CachePool::new(cache_limit)) })
    }

    /// Split a total: half for dirty data, half for the cache.
    pub fn split(total: u64) -> Result<Arc<Self>, BudgetError> {
        if total < MIN_BUDGET {
            return Err(BudgetError::TooSmall(total));
        }
        Ok(Self::new(total / 2, total - total / 2))
    }

    pub fn dirty_limit(&self) -> u64 {
        self.dirty.limit
    }

    /// Dirty bytes held now by every volume of this budget.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.held.load(Ordering::SeqCst)
    }

    /// The most dirty bytes ever held at once.
    pub fn dirty_peak(&self) -> u64 {
        self.dirty.peak.load(Ordering::SeqCst)
    }

    pub fn cache_limit(&self) -> u64 {
        self.cache.limit
    }

    /// Clean bytes cached now by every volume of this budget.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.used.load(Ordering::SeqCst)
    }

    /// The most cache bytes ever held at once.
    pub fn cache_peak(&self) -> u64 {
        self.cache.peak.load(Ordering::SeqCst)
    }
}

/// What the dirty pool asks of a volume holding more than its share.
pub(crate) trait Uploads: Send + Sync {
    /// Start background uploads (no-op when they run already).
    fn start_uploads(self: Arc<Self>);
}

struct DirtyMember {
    id: u64,
    volume: Weak<dyn Uploads>,
    held: Arc<AtomicU64>,
}

pub(crate) struct DirtyPool {
    limit: u64,
    shared: Arc<Semaphore>,
    held: AtomicU64,
    peak: AtomicU64,
    /// Bytes carved out as floors, for the cap on floors.
    floors: AtomicU64,
    members: Mutex<Vec<DirtyMember>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for DirtyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyPool").field("limit", &self.limit).field("held", &self.held).finish_non_exhaustive()
    }
}

impl DirtyPool {
    fn new(limit: u64) -> Self {
        let permits = (limit as usize).min(Semaphore::MAX_PERMITS);
        Self {
            limit: permits as u64,
            shared: Arc::new(Semaphore::new(permits)),
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            floors: AtomicU64::new(0),
            members: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<DirtyMember>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dirty bytes each writable volume may hold before it is asked to
    /// upload when writers wait.
    pub fn fair_share(&self) -> u64 {
        self.limit / self.members().len().max(1) as u64
    }

    /// Join the pool as a writable volume of `chunk_size`-byte chunks.
    pub fn register(self: &Arc<Self>, chunk_size: u64) -> Result<DirtyAccount, BudgetError> {
        if chunk_size.saturating_mul(2) > self.limit {
            return Err(BudgetError::ChunkTooLarge { limit: self.limit, chunk_size });
        }
        // Floors together stay under half the budget, so sharing still
        // means something; a volume that finds no room (or the shared
        // part spent right now) goes without one.
        let want = 2 * chunk_size;
        let floor = Arc::new(Semaphore::new(0));
        let carved = Arc::new(Mutex::new(None));
        let mut carving = None;
        if self.floors.fetch_add(want, Ordering::SeqCst) + want <= self.limit / 2 {
            match self.shared.clone().try_acquire_many_owned(want as u32) {
                Ok(p) => {
                    floor.add_permits(want as usize);
                    *lock(&carved) = Some(p);
                }
                // The shared part is spent right now (other volumes hold
                // it): the floor is carved as soon as bytes come back,
                // ahead of writers that ask later (the semaphore is fair).
                Err(_) => match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let (shared, floor, carved) = (self.shared.clone(), floor.clone(), carved.clone());
                        carving = Some(rt.spawn(async move {
                            if let Ok(p) = shared.acquire_many_owned(want as u32).await {
                                floor.add_permits(want as usize);
                                *lock(&carved) = Some(p);
                            }
                        }));
                    }
                    Err(_) => {
                        self.floors.fetch_sub(want, Ordering::SeqCst);
                    }
                },
            }
        } else {
            self.floors.fetch_sub(want, Ordering::SeqCst);
            tracing::info!(limit = self.limit, "volume joins the node's dirty budget without a floor of its own");
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        Ok(DirtyAccount {
            pool: self.clone(),
            id,
            chunk_size,
            floor,
            carved,
            carving,
            want,
            held: Arc::new(AtomicU64::new(0)),
        })
    }

    fn note_held(&self, n: u64) {
        let now = self.held.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
}

/// One writable volume's membership of the dirty pool.
pub(crate) struct DirtyAccount {
    pool: Arc<DirtyPool>,
    id: u64,
    chunk_size: u64,
    /// This volume's floor: bytes no other volume can take.
    floor: Arc<Semaphore>,
    /// The floor's bytes, held out of the shared semaphore while this
    /// account lives (set later by `carving` when the shared part was
    /// spent at registration).
    carved: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// Waiting for the floor's bytes.
    carving: Option<tokio::task::JoinHandle<()>>,
    /// The floor's size, counted in the pool's floors from registration
    /// (when it has one at all).
    want: u64,
    held: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for DirtyAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyAccount")
            .field("id", &self.id)
            .field("held", &self.held)
            .field("floor", &lock(&self.carved).as_ref().map(|c| c.num_permits()))
            .finish_non_exhaustive()
    }
}

/// Dirty bytes held while a chunk is dirty or staged (its whole size, or
/// the pages written to it when only those are in memory); the bytes go
/// back to the budget when it is dropped. A guard may grow
/// ([`DirtyGuard::absorb`]) as a chunk's pages are written.
pub(crate) struct DirtyGuard {
    /// From the floor, the shared part, or both (a grown guard); none for
    /// an overdraft ([`DirtyAccount::overdraft`]).
    _permits: Vec<OwnedSemaphorePermit>,
    bytes: u64,
    held: Arc<AtomicU64>,
    pool: Arc<DirtyPool>,
}

impl std::fmt::Debug for DirtyGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirtyGuard({} bytes)", self.bytes)
    }
}

impl Drop for DirtyGuard {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::SeqCst);
        self.pool.held.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl DirtyGuard {
    /// The bytes it holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hold `other`'s bytes too (from the same account).
    pub fn absorb(&mut self, mut other: DirtyGuard) {
        self._permits.append(&mut other._permits);
        self.bytes += other.bytes;
        other.bytes = 0;
    }
}

impl DirtyAccount {
    /// Listen for "upload" requests from writers of other volumes.
    pub fn attach(&self, volume: Weak<dyn Uploads>) {
        let member = DirtyMember { id: self.id, volume, held: self.held.clone() };
        self.pool.members().push(member);
    }

    fn guard(&self, permits: Vec<OwnedSemaphorePermit>, bytes: u64) -> DirtyGuard {
        self.held.fetch_add(bytes, Ordering::SeqCst);
        self.pool.note_held(bytes);
        DirtyGuard { _permits: permits, bytes, held: self.held.clone(), pool: self.pool.clone() }
    }

    /// One chunk's bytes, if free now (from the floor first).
    #[cfg(test)]
    pub fn try_acquire(&self) -> Option<DirtyGuard> {
        self.try_acquire_bytes(self.chunk_size)
    }

    /// `n` bytes (at most a chunk's), if free now (from the floor first).
    pub fn try_acquire_bytes(&self, n: u64) -> Option<DirtyGuard> {
        let k = n.min(self.chunk_size) as u32;
        let p = self
            .floor
            .clone()
            .try_acquire_many_owned(k)
            .or_else(|_| self.pool.shared.clone().try_acquire_many_owned(k));
        p.ok().map(|p| self.guard(vec![p], u64::from(k)))
    }

    /// One chunk's bytes: from the floor or the shared part, whichever
    /// frees first. Cancel-safe: a dropped wait takes nothing.
    #[cfg(test)]
    pub async fn acquire(&self) -> DirtyGuard {
        self.acquire_bytes(self.chunk_size).await
    }

    /// `n` bytes (at most a chunk's), as [`DirtyAccount::acquire`].
    pub async fn acquire_bytes(&self, n: u64) -> DirtyGuard {
        let k = n.min(self.chunk_size) as u32;
        loop {
            let permit = tokio::select! {
                biased;
                p = self.floor.clone().acquire_many_owned(k) => p,
                p = self.pool.shared.clone().acquire_many_owned(k) => p,
            };
            // Neither semaphore is ever closed.
            if let Ok(p) = permit {
                return self.guard(vec![p], u64::from(k));
            }
            tokio::task::yield_now().await;
        }
    }

    /// `n` bytes counted as held without waiting, past the limit when it
    /// is spent: for memory an upload needs for a moment to free more
    /// (a chunk of pages merged with its stored bytes), which the
    /// caller bounds (at most a few chunks, until the next commit).
    pub fn overdraft(&self, n: u64) -> DirtyGuard {
        match self.try_acquire_bytes(n) {
            Some(g) if g.bytes == n => g,
            _ => self.guard(Vec::new(), n),
        }
    }

    /// Dirty bytes this volume holds (dirty and staged chunks).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    pub fn fair_share(&self) -> u64 {
        self.pool.fair_share()
    }

    /// Writers wait: every other volume over its fair share uploads.
    pub fn ask_others_to_upload(&self) {
        let share = self.pool.fair_share();
        let over: Vec<Arc<dyn Uploads>> = self
            .pool
            .members()
            .iter()
            .filter(|m| m.id != self.id && m.held.load(Ordering::SeqCst) > share)
            .filter_map(|m| m.volume.upgrade())
            .collect();
        for v in over {
            v.start_uploads();
        }
    }
}

impl Drop for DirtyAccount {
    fn drop(&mut self) {
        self.pool.members().retain(|m| m.id != self.id);
        let carving = self.carving.take();
        if let Some(t) = &carving {
            t.abort();
        }
        if lock(&self.carved).take().is_some() || carving.is_some() {
            // Counted at registration, carved or still waiting.
            self.pool.floors.fetch_sub(self.want, Ordering::SeqCst);
        }
    }
}

/// What the cache pool asks of another volume's cache when full.
pub(crate) trait CacheMember: Send + Sync {
    /// Run this cache's CLOCK hand for one pass at most, evicting until
    /// `want` bytes are freed; 0 when its lock is busy right now.
    fn try_sweep(&self, want: u64) -> u64;
}

pub(crate) struct CachePool {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    members: Mutex<Vec<(u64, Weak<dyn CacheMember>)>>,
    hand: AtomicUsize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for CachePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachePool").field("limit", &self.limit).field("used", &self.used).finish_non_exhaustive()
    }
}

impl CachePool {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            members: Mutex::new(Vec::new()),
            hand: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Weak<dyn CacheMember>)>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An id for a new cache (before its volume exists).
    pub fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// The cache `id` may be swept by others' misses from now on.
    pub fn attach(&self, id: u64, member: Weak<dyn CacheMember>) {
        self.members().push((id, member));
    }

    pub fn detach(&self, id: u64) {
        self.members().retain(|(i, _)| *i != id);
    }

    /// Take `n` bytes if they fit under the limit.
    pub fn try_reserve(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::SeqCst);
        loop {
            if cur.saturating_add(n) > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(cur, cur + n, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.peak.fetch_max(cur + n, Ordering::SeqCst);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    pub fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::SeqCst);
    }

    /// How far `n` more bytes would overshoot the limit.
    pub fn overshoot(&self, n: u64) -> u64 {
        (self.used.load(Ordering::SeqCst) + n).saturating_sub(self.limit)
    }

    /// The caches in sweeping order, starting at the shared hand (which
    /// moves on by one), so successive misses sweep different caches first.
    pub fn sweep_order(&self) -> Vec<(u64, Weak<dyn CacheMember>)> {
        let members = self.members();
        if members.is_empty() {
            return Vec::new();
        }
        let start = self.hand.fetch_add(1, Ordering::Relaxed) % members.len();
        members[start..].iter().chain(&members[..start]).map(|(i, w)| (*i, w.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nobody;
    impl Uploads for Nobody {
        fn start_uploads(self: Arc<Self>) {}
    }

    #[tokio::test]
    async fn dirty_bytes_across_volumes_never_exceed_the_limit_and_a_floor_is_kept() {
        let b = MemoryBudget::new(8 << 10, 1 << 10);
        let a = b.dirty.register(1 << 10).expect("register");
        let c = b.dirty.register(1 << 10).expect("register");
        let w: Arc<dyn Uploads> = Arc::new(Nobody);
        a.attach(Arc::downgrade(&w));
        // Volume a takes everything it can: its floor and the shared part.
        let mut held = Vec::new();
        while let Some(g) = a.try_acquire() {
            held.push(g);
        }
        assert_eq!(held.len(), 6, "a holds all but c's floor");
        assert_eq!(b.dirty_bytes(), 6 << 10);
        // c still gets its floor while a holds the rest.
        let c1 = c.try_acquire().expect("c's floor");
        let c2 = c.try_acquire().expect("c's floor");
        assert!(c.try_acquire().is_none());
        assert_eq!(b.dirty_bytes(), 8 << 10);
        assert_eq!(b.dirty_peak(), 8 << 10);
        // A waiter is served when bytes come back.
        let waiter = tokio::spawn(async move { c.acquire().await.bytes });
        tokio::task::yield_now().await;
        drop(held.pop());
        assert_eq!(waiter.await.expect("join"), 1 << 10);
        drop((c1, c2));
        // Alone, one volume uses the whole budget.
        drop(held);
        drop(a);
        let only = b.dirty.register(1 << 10).expect("register");
        let all: Vec<_> = std::iter::from_fn(|| only.try_acquire()).collect();
        assert_eq!(all.len(), 8);
    }

    #[tokio::test]
    async fn guards_grow_page_by_page_and_an_overdraft_is_counted_and_given_back() {
        let b = MemoryBudget::new(16 << 10, 1 << 10);
        let a = b.dirty.register(4 << 10).expect("register");
        let mut g = a.try_acquire_bytes(1 << 10).expect("a page");
        for _ in 0..15 {
            g.absorb(a.try_acquire_bytes(1 << 10).expect("another page"));
        }
        assert_eq!((g.bytes(), b.dirty_bytes()), (16 << 10, 16 << 10));
        assert!(a.try_acquire_bytes(1 << 10).is_none(), "the budget is spent");
        // Past the limit without waiting, counted while held.
        let o = a.overdraft(4 << 10);
        assert_eq!((o.bytes(), b.dirty_bytes(), b.dirty_peak()), (4 << 10, 20 << 10, 20 << 10));
        drop(o);
        assert_eq!(b.dirty_bytes(), 16 << 10);
        assert!(a.try_acquire_bytes(1 << 10).is_none(), "an overdraft gives back no bytes it did not take");
        // A grown guard gives every byte back, from both semaphores.
        drop(g);
        assert_eq!(b.dirty_bytes(), 0);
        let all = a.try_acquire_bytes(4 << 10).expect("a chunk");
        let o = a.overdraft(2 << 10);
        assert_eq!(o.bytes(), 2 << 10, "an overdraft takes free bytes when there are some");
        drop((all, o));
        let mut whole = Vec::new();
        while let Some(g) = a.try_acquire() {
            whole.push(g);
        }
        assert_eq!(whole.len(), 4);
    }

    #[test]
    fn a_chunk_larger_than_half_the_dirty_budget_is_refused() {
        let b = MemoryBudget::new(3 << 20, 1 << 20);
        let e = b.dirty.register(2 << 20).expect_err("too large");
        assert!(e.to_string().contains("smaller than two chunks"), "{e}");
        assert_eq!(MemoryBudget::split(1 << 20).expect_err("tiny"), BudgetError::TooSmall(1 << 20));
    }
}
