//! Bounded cache of clean (uploaded or fetched) chunk bytes: a whole
//! chunk, or some of its blocks with the chunk's table (ranged reads of
//! chunks with a table, format 4).
//!
//! Eviction is CLOCK, an approximation of LRU: a hit only sets a flag, so
//! the read path does no reordering; the eviction hand gives flagged
//! entries a second chance and takes the first unflagged one.
//!
//! Each cache has a cap of its own and draws its bytes from a
//! [`CachePool`] it may share with the caches of other volumes (see
//! [`super::budget`]): a miss that finds the pool full sweeps the caches
//! in turn, this one included.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::budget::CachePool;
use super::format::ChunkRef;

#[derive(Debug)]
struct Entry {
    held: Held,
    /// Bytes this entry holds (what it draws from the pool).
    bytes: u64,
    referenced: bool,
    /// Matches the ring's stamp for this entry's current insertion.
    stamp: u64,
}

#[derive(Debug)]
enum Held {
    Whole(Bytes),
    /// Runs of a chunk's bytes by their offset in it, and the table of the
    /// stored chunk they were checked against.
    Blocks {
        table: Arc<ChunkTable>,
        runs: BTreeMap<usize, Bytes>,
    },
}

/// A chunk's table as fetched and checked, with the reference it belongs to.
#[derive(Debug, PartialEq, Eq)]
pub struct ChunkTable {
    pub r: ChunkRef,
    pub crcs: Vec<u32>,
    /// A packed chunk's stored block lengths (empty otherwise).
    pub stored: Vec<u32>,
}

impl ChunkTable {
    fn bytes(&self) -> u64 {
        (self.crcs.len() + self.stored.len()) as u64 * 4
    }
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

    /// The most one entry can hold: this cache's cap, or the pool's when
    /// that is smaller.
    pub fn room(&self) -> u64 {
        self.limit.min(self.pool.limit())
    }

    /// The whole chunk, if cached whole.
    pub fn get(&mut self, index: u64) -> Option<Bytes> {
        let hit = self.entries.get_mut(&index).and_then(|e| match &e.held {
            Held::Whole(b) => {
                e.referenced = true;
                Some(b.clone())
            }
            Held::Blocks { .. } => None,
        });
        match hit {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        hit
    }

    /// Bytes `[at, at + len)` of the chunk, if cached: from a whole chunk,
    /// or from blocks that cover them.
    pub fn get_range(&mut self, index: u64, at: usize, len: usize) -> Option<Bytes> {
        let found = self.entries.get_mut(&index).and_then(|e| {
            let b = match &e.held {
                Held::Whole(b) => Some(b.slice(at..at + len)),
                Held::Blocks { runs, .. } => covered(runs, at, len),
            };
            e.referenced |= b.is_some();
            b
        });
        match found {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        found
    }

    /// The table kept with cached blocks of the chunk, if it is `r`'s.
    pub fn table(&self, index: u64, r: ChunkRef) -> Option<Arc<ChunkTable>> {
        match self.entries.get(&index) {
            Some(Entry { held: Held::Blocks { table, .. }, .. }) if table.r == r => Some(table.clone()),
            _ => None,
        }
    }

    /// Is the whole chunk cached? (No effect on recency or hit counters.)
    pub fn peek(&self, index: u64) -> bool {
        matches!(self.entries.get(&index), Some(Entry { held: Held::Whole(_), .. }))
    }

    /// Keep `data`, the chunk's bytes from `at` on (whole blocks of
    /// `block` bytes from a block boundary, the chunk's last one possibly
    /// short), checked against `table`, block by block: each block is a
    /// slice of `data`, no copy, and blocks never overlap. Ignored when the
    /// whole chunk is cached; blocks checked against another table replace
    /// what is there.
    pub fn insert_blocks(&mut self, index: u64, table: Arc<ChunkTable>, at: usize, data: Bytes, block: usize) {
        if self.peek(index) {
            return;
        }
        // Taken out (its bytes given back) and put back below.
        let (mut runs, referenced) = match self.take(index) {
            Some(Entry { held: Held::Blocks { table: t, runs }, referenced, .. }) if t.r == table.r => {
                (runs, referenced)
            }
            _ => (BTreeMap::new(), false),
        };
        let block = block.max(1);
        // Blocks of the fetch held already: the others are copied out, so
        // that no kept block holds the rest of the fetch's memory.
        let partly_held = (0..data.len()).step_by(block).any(|off| runs.contains_key(&(at + off)));
        let mut off = 0;
        while off < data.len() {
            let len = block.min(data.len() - off);
            runs.entry(at + off).or_insert_with(|| match partly_held {
                true => Bytes::copy_from_slice(&data[off..off + len]),
                false => data.slice(off..off + len),
            });
            off += len;
        }
        let n = table.bytes() + runs.values().map(|b| b.len() as u64).sum::<u64>();
        if self.make_room(n) {
            self.add(index, Held::Blocks { table, runs }, n, referenced);
        }
    }

    pub fn insert(&mut self, index: u64, data: Bytes) {
        self.remove(index);
        let n = data.len() as u64;
        if self.make_room(n) {
            self.add(index, Held::Whole(data), n, false);
        }
    }

    /// Make room for `n` more bytes, under this cache's cap and in the pool
    /// (reserved on success).
    fn make_room(&mut self, n: u64) -> bool {
        if n > self.limit || n > self.pool.limit() {
            return false;
        }
        // Under this cache's own cap first (two passes clear every flag).
        let mut tries = 0;
        while self.bytes + n > self.limit && tries < 3 {
            if self.sweep(self.bytes + n - self.limit) == 0 {
                tries += 1;
            }
        }
        if self.bytes + n > self.limit {
            return false;
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
                    return false;
                }
            }
        }
        true
    }

    /// Add an entry of `n` bytes, whose room is made.
    fn add(&mut self, index: u64, held: Held, n: u64, referenced: bool) {
        self.stamp += 1;
        self.bytes += n;
        self.entries.insert(index, Entry { held, bytes: n, referenced, stamp: self.stamp });
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
                    let n = e.bytes;
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
        self.take(index);
    }

    /// Remove the entry and give its bytes back.
    fn take(&mut self, index: u64) -> Option<Entry> {
        let e = self.entries.remove(&index)?;
        self.bytes -= e.bytes;
        self.pool.release(e.bytes);
        Some(e)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Bytes `[at, at + len)` from runs keyed by their offset, if they cover
/// them: a slice of one run, or copied from adjoining ones.
fn covered(runs: &BTreeMap<usize, Bytes>, at: usize, len: usize) -> Option<Bytes> {
    let end = at + len;
    let (&start, first) = runs.range(..=at).next_back()?;
    if start + first.len() >= end {
        return Some(first.slice(at - start..end - start));
    }
    let mut out = Vec::with_capacity(len);
    let mut pos = at;
    while pos < end {
        let (&s, run) = runs.range(..=pos).next_back()?;
        if s + run.len() <= pos {
            return None;
        }
        let take = (s + run.len()).min(end);
        out.extend_from_slice(&run[pos - s..take - s]);
        pos = take;
    }
    Some(Bytes::from(out))
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
    use crate::volume::format::Layout;

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

    fn table(generation: u64) -> Arc<ChunkTable> {
        Arc::new(ChunkTable {
            r: ChunkRef::Stored { generation, crc: 1, layout: Layout::Table },
            crcs: vec![0; 4],
            stored: Vec::new(),
        })
    }

    #[test]
    fn blocks_serve_the_ranges_they_cover_and_count_with_their_table() {
        let mut c = CleanCache::new(1 << 20);
        let run = |b: u8| Bytes::from(vec![b; 100]);
        c.insert_blocks(7, table(1), 100, run(1), 100);
        c.insert_blocks(7, table(1), 200, run(2), 100);
        c.insert_blocks(7, table(1), 400, run(4), 100);
        assert_eq!(c.bytes(), 16 + 300);
        assert!(!c.peek(7) && c.get(7).is_none(), "blocks are not the whole chunk");
        assert_eq!(c.get_range(7, 150, 10).unwrap(), vec![1u8; 10]);
        let across = c.get_range(7, 190, 20).unwrap();
        assert_eq!(&across[..10], &[1u8; 10][..]);
        assert_eq!(&across[10..], &[2u8; 10][..]);
        assert!(c.get_range(7, 250, 100).is_none(), "a gap at 300 is not covered");
        assert!(c.get_range(7, 0, 10).is_none());
        assert!(c.get_range(8, 150, 10).is_none());
        assert_eq!(c.table(7, table(1).r), Some(table(1)));
        assert_eq!(c.table(7, table(2).r), None, "a table is only for its own reference");
        // Blocks of another reference replace the old ones.
        c.insert_blocks(7, table(2), 0, run(9), 100);
        assert!(c.get_range(7, 150, 10).is_none());
        assert_eq!(c.get_range(7, 0, 100).unwrap(), vec![9u8; 100]);
        assert_eq!(c.bytes(), 16 + 100);
        // The whole chunk wins over blocks, and blocks never over it.
        c.insert(7, Bytes::from(vec![5u8; 500]));
        c.insert_blocks(7, table(2), 0, run(9), 100);
        assert_eq!(c.get_range(7, 0, 3).unwrap(), vec![5u8; 3]);
        assert_eq!(c.bytes(), 500);
        c.remove(7);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn blocks_of_overlapping_fetches_are_kept_once_and_serve_every_range_they_hold() {
        let mut c = CleanCache::new(1 << 20);
        let run = |at: usize, len: usize| Bytes::from((at..at + len).map(|i| i as u8).collect::<Vec<u8>>());
        let want = |at: usize, len: usize| (at..at + len).map(|i| i as u8).collect::<Vec<u8>>();
        c.insert_blocks(1, table(1), 100, run(100, 100), 100);
        // Blocks 0 to 2, over block 1.
        c.insert_blocks(1, table(1), 0, run(0, 300), 100);
        assert_eq!(c.get_range(1, 250, 20).as_deref(), Some(&want(250, 20)[..]), "held bytes reported as a miss");
        assert_eq!(c.get_range(1, 150, 20).as_deref(), Some(&want(150, 20)[..]));
        assert_eq!(c.bytes(), 16 + 300, "a block counted twice");
        // Adjoining blocks serve a range across them; a gap does not.
        c.insert_blocks(1, table(1), 300, run(300, 50), 100);
        c.insert_blocks(1, table(1), 400, run(400, 10), 100);
        assert_eq!(c.get_range(1, 290, 60).as_deref(), Some(&want(290, 60)[..]));
        assert!(c.get_range(1, 340, 70).is_none());
        assert_eq!(c.bytes(), 16 + 360);
        // A block held already changes nothing.
        c.insert_blocks(1, table(1), 100, run(100, 100), 100);
        assert_eq!(c.bytes(), 16 + 360);
    }

    /// A fetch buffer that counts its bytes as live until dropped.
    struct Tracked(Vec<u8>, Arc<std::sync::atomic::AtomicU64>);
    impl AsRef<[u8]> for Tracked {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.1.fetch_sub(self.0.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Reads of growing ranges at the start of a chunk, each missing one
    /// block (so each fetches all of them): a kept block must not hold the
    /// rest of its fetch's memory.
    #[test]
    fn blocks_hold_no_more_memory_than_they_count() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let live = Arc::new(AtomicU64::new(0));
        let mut c = CleanCache::new(1 << 30);
        let t = Arc::new(ChunkTable {
            r: ChunkRef::Stored { generation: 1, crc: 1, layout: Layout::Table },
            crcs: vec![0; 64],
            stored: Vec::new(),
        });
        for k in 1..=50usize {
            let v = vec![7u8; k * 100];
            live.fetch_add(v.len() as u64, Ordering::SeqCst);
            c.insert_blocks(1, t.clone(), 0, Bytes::from_owner(Tracked(v, live.clone())), 100);
        }
        let held = live.load(Ordering::SeqCst);
        assert!(held <= c.bytes(), "the cache counts {} bytes but holds {held}", c.bytes());
    }

    #[test]
    fn blocks_stay_within_the_limit() {
        let mut c = CleanCache::new(1000);
        for i in 0..50u64 {
            c.insert_blocks(i % 5, table(1), (i as usize % 7) * 100, Bytes::from(vec![i as u8; 100]), 100);
            assert!(c.bytes() <= 1000, "{} bytes", c.bytes());
            assert_eq!(c.bytes(), c.entries.values().map(|e| e.bytes).sum::<u64>());
        }
    }
}
