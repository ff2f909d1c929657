//! Bounded LRU of clean (uploaded or fetched) chunk bytes.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

#[derive(Debug)]
pub struct CleanCache {
    entries: HashMap<u64, (Bytes, u64)>,
    order: BTreeMap<u64, u64>,
    tick: u64,
    bytes: u64,
    limit: u64,
    pub hits: u64,
    pub misses: u64,
}

impl CleanCache {
    pub fn new(limit: u64) -> Self {
        Self { entries: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0, limit, hits: 0, misses: 0 }
    }

    pub fn get(&mut self, index: u64) -> Option<Bytes> {
        let Some((data, tick)) = self.entries.get_mut(&index) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        self.order.remove(tick);
        self.tick += 1;
        *tick = self.tick;
        self.order.insert(self.tick, index);
        Some(data.clone())
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
        self.tick += 1;
        self.bytes += data.len() as u64;
        self.entries.insert(index, (data, self.tick));
        self.order.insert(self.tick, index);
        while self.bytes > self.limit {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.entries.remove(&victim) {
                self.bytes -= d.len() as u64;
            }
        }
    }

    pub fn remove(&mut self, index: u64) {
        if let Some((d, tick)) = self.entries.remove(&index) {
            self.order.remove(&tick);
            self.bytes -= d.len() as u64;
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
    fn evicts_least_recently_used_within_limit() {
        let mut c = CleanCache::new(3);
        c.insert(1, Bytes::from_static(b"a"));
        c.insert(2, Bytes::from_static(b"b"));
        c.insert(3, Bytes::from_static(b"c"));
        assert!(c.get(1).is_some());
        c.insert(4, Bytes::from_static(b"d"));
        assert!(c.get(2).is_none(), "2 was least recently used");
        assert!(c.get(1).is_some() && c.get(3).is_some() && c.get(4).is_some());
        assert_eq!(c.bytes(), 3);
    }
}
