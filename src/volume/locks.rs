//! Per-chunk async locks. Requests touching different chunks run in
//! parallel; requests touching the same chunk are serialised. Entries are
//! dropped when the last holder or waiter lets go, so the table stays as
//! small as the number of chunks currently in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Debug, Default)]
pub struct ChunkLocks {
    table: Mutex<HashMap<u64, Arc<AsyncMutex<()>>>>,
}

pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    index: u64,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ChunkLocks {
    pub async fn lock(&self, index: u64) -> ChunkGuard<'_> {
        let m = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.entry(index).or_default().clone()
        };
        let guard = m.lock_owned().await;
        ChunkGuard { locks: self, index, guard: Some(guard) }
    }

    /// The lock if nobody holds it now.
    pub fn try_lock(&self, index: u64) -> Option<ChunkGuard<'_>> {
        let m = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.entry(index).or_default().clone()
        };
        // On failure the guard-less value's drop removes the entry again
        // if it is unused.
        let mut g = ChunkGuard { locks: self, index, guard: None };
        g.guard = Some(m.try_lock_owned().ok()?);
        Some(g)
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.table.lock().unwrap_or_else(|p| p.into_inner());
        // Release the lock first; then the table's own reference is the only
        // one left exactly when nobody else holds or waits for this chunk.
        self.guard = None;
        if let Some(m) = t.get(&self.index)
            && Arc::strong_count(m) == 1
        {
            t.remove(&self.index);
        }
    }
}
