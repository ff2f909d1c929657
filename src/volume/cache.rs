//! Bounded cache of clean (uploaded or fetched) chunk bytes.
//!
//! Eviction is CLOCK, an approximation of LRU: a hit only sets a flag, so
//! the read path does no reordering; the eviction hand gives flagged
//! entries a second chance and takes the first unflagged one.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

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
    limit: u64,
    pub hits: u64,
    pub misses: u64,
}

impl CleanCache {
    pub fn new(limit: u64) -> Self {
        Self { entries: HashMap::new(), ring: VecDeque::new(), stamp: 0, bytes: 0, limit, hits: 0, misses: 0 }
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
        if data.len() as u64 > self.limit {
            return;
        }
        self.stamp += 1;
        self.bytes += data.len() as u64;
        self.entries.insert(index, Entry { data, referenced: false, stamp: self.stamp });
        self.ring.push_back((index, self.stamp));
        while self.bytes > self.limit {
            let Some((victim, stamp)) = self.ring.pop_front() else {
                break;
            };
            match self.entries.get_mut(&victim) {
                Some(e) if e.stamp == stamp && e.referenced => {
                    e.referenced = false;
                    self.ring.push_back((victim, stamp));
                }
                Some(e) if e.stamp == stamp => {
                    self.bytes -= e.data.len() as u64;
                    self.entries.remove(&victim);
                }
                _ => {}
            }
        }
        // Leftovers of removed entries must not pile up in the ring.
        if self.ring.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.ring.retain(|(i, s)| entries.get(i).is_some_and(|e| e.stamp == *s));
        }
    }

    pub fn remove(&mut self, index: u64) {
        if let Some(e) = self.entries.remove(&index) {
            self.bytes -= e.data.len() as u64;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
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
