//! Bounded cache of clean (uploaded or fetched) chunk bytes.
//!
//! Eviction is CLOCK, an approximation of LRU: a hit only sets a flag, so
//! the read path does no reordering; the eviction hand gives flagged
//! entries a second chance and takes the first unflagged one.
//!
//! Each cache has a cap of its own and draws its bytes from a
//! [`CachePool`] it may share with the caches of other volumes (see
//! [`super::budget`]): a miss that finds the pool full sweeps the caches
//! in turn, this one included.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::budget::CachePool;

#[derive(Debug)]
struct Entry {
    data: Bytes,
    referenced: bool,
    /// Matches the ring's stamp for this entry's current insertion.
    stamp: u64,
}

#[derive(Debug)]
pub struct CleanCache {
    entries: HashMap<u64, Entry>,
    /// The clock: (index, stamp) in insertion order. Pairs whose stamp no
    /// longer matches their entry are leftovers of removed entries.
    ring: VecDeque<(u64, u64)>,
    stamp: u64,
    bytes: u64,
    /// This cache's own cap.
    limit: u64,
    pool: Arc<CachePool>,
    /// This cache's id in the pool.
    id: u64,
    pub hits: u64,
    pub misses: u64,
}

impl CleanCache {
    /// A cache of its own: `limit` bytes, shared with nobody.
    pub fn new(limit: u64) -> Self {
        Self::shared(limit, Arc::new(CachePool::new(limit)))
    }

    /// A cache of at most `limit` bytes drawn from `pool`.
    pub(crate) fn shared(limit: u64, pool: Arc<CachePool>) -> Self {
        let id = pool.new_id();
        Self { entries: HashMap::new(), ring: VecDeque::new(), stamp: 0, bytes: 0, limit, pool, id, hits: 0, misses: 0 }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub fn get(&mut self, index: u64) -> Option<Bytes> {
        let Some(e) = self.entries.get_mut(&index) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        e.referenced = true;
        Some(e.data.clone())
    }

    /// Is the chunk cached? (No effect on recency or hit counters.)
    pub fn peek(&self, index: u64) -> bool {
        self.entries.contains_key(&index)
    }

    pub fn insert(&mut self, index: u64, data: Bytes) {
        self.remove(index);
        let n = data.len() as u64;
        if n > self.limit || n > self.pool.limit() {
            return;
        }
        // Under this cache's own cap first (two passes clear every flag).
        let mut tries = 0;
        while self.bytes + n > self.limit && tries < 3 {
            if self.sweep(self.bytes + n - self.limit) == 0 {
                tries += 1;
            }
        }
        if self.bytes + n > self.limit {
            return;
        }
        // Then room in the pool: sweep the caches in turn (this one
        // directly, the others only if their lock is free this instant).
        // Two rounds clear every flag, so a third frees something unless
        // every other cache is busy: then the chunk goes uncached.
        let mut idle_rounds = 0;
        while !self.pool.try_reserve(n) {
            let mut freed = 0;
            let mut swept_self = false;
            for (id, member) in self.pool.sweep_order() {
                let want = self.pool.overshoot(n);
                if want == 0 {
                    break;
                }
                freed += if id == self.id {
                    swept_self = true;
                    self.sweep(want)
                } else {
                    member.upgrade().map_or(0, |m| m.try_sweep(want))
                };
            }
            if !swept_self {
                freed += self.sweep(self.pool.overshoot(n));
            }
            if freed == 0 {
                idle_rounds += 1;
                if idle_rounds > 2 {
                    return;
                }
            }
        }
        self.stamp += 1;
        self.bytes += n;
        self.entries.insert(index, Entry { data, referenced: false, stamp: self.stamp });
        self.ring.push_back((index, self.stamp));
        // Leftovers of removed entries must not pile up in the ring.
        if self.ring.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.ring.retain(|(i, s)| entries.get(i).is_some_and(|e| e.stamp == *s));
        }
    }

    /// Run the CLOCK hand for at most one pass over the ring, evicting
    /// unflagged entries until `want` bytes are freed; flagged ones lose
    /// their flag (a second chance). Returns the bytes freed.
    pub(crate) fn sweep(&mut self, want: u64) -> u64 {
        let mut freed = 0;
        let mut steps = self.ring.len();
        while freed < want && steps > 0 {
            steps -= 1;
            let Some((victim, stamp)) = self.ring.pop_front() else {
                break;
            };
            match self.entries.get_mut(&victim) {
                Some(e) if e.stamp == stamp && e.referenced => {
                    e.referenced = false;
                    self.ring.push_back((victim, stamp));
                }
                Some(e) if e.stamp == stamp => {
                    let n = e.data.len() as u64;
                    self.entries.remove(&victim);
                    self.bytes -= n;
                    self.pool.release(n);
                    freed += n;
                }
                _ => {}
            }
        }
        freed
    }

    pub fn remove(&mut self, index: u64) {
        if let Some(e) = self.entries.remove(&index) {
            self.bytes -= e.data.len() as u64;
            self.pool.release(e.data.len() as u64);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for CleanCache {
    fn drop(&mut self) {
        self.pool.detach(self.id);
        self.pool.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_entries_not_used_since_the_last_sweep_within_limit() {
        let mut c = CleanCache::new(3);
        c.insert(1, Bytes::from_static(b"a"));
        c.insert(2, Bytes::from_static(b"b"));
        c.insert(3, Bytes::from_static(b"c"));
        assert!(c.get(1).is_some());
        c.insert(4, Bytes::from_static(b"d"));
        assert!(c.get(2).is_none(), "2 was the oldest entry not used");
        assert!(c.get(1).is_some() && c.get(3).is_some() && c.get(4).is_some());
        assert_eq!(c.bytes(), 3);
    }

    #[test]
    fn removed_and_reinserted_entries_keep_the_accounting_right() {
        let mut c = CleanCache::new(4);
        for round in 0..1000u64 {
            c.insert(round % 7, Bytes::from_static(b"x"));
            if round % 3 == 0 {
                c.remove((round + 1) % 7);
            }
            assert!(c.bytes() <= 4);
            assert_eq!(c.bytes(), c.entries.len() as u64);
            assert!(c.ring.len() <= 2 * c.entries.len() + 17);
        }
        c.insert(100, Bytes::from(vec![0u8; 5]));
        assert!(!c.peek(100), "an entry larger than the whole cache is not kept");
    }
}
