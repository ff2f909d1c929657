//! Flattening a clone, its copying half: every chunk the clone still reads
//! through its parents becomes a chunk of its own. The copy is written as
//! the writer writes anything (uploaded, committed, fenced and
//! crash-consistent like any write), and only where nothing was written
//! since: the bytes are read and the slot is filled under the chunk's
//! lock, which every write to a chunk without a dirty slot takes. A crash
//! loses nothing, since a copy not yet committed reads the same through
//! the parent. [`crate::volume::catalog::let_go_of_parent`] then drops the
//! parent.

use super::*;

/// What [`Volume::copy_parents`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Chunks its parents mapped or patched (below its size).
    pub inherited: u64,
    /// Of those, chunks copied into its own prefix now.
    pub copied: u64,
    /// Of the copied ones, chunks that read as zeros: a ZERO reference, no object.
    pub zero: u64,
    /// Of the copied ones, chunk objects copied within the store (S3
    /// CopyObject; the kernel's file copy on the local store): their
    /// bytes never came through this process. A copy the next record
    /// leaves out (the chunk written meanwhile, or the copy too old) is
    /// copied again and counted again.
    pub in_store: u64,
    /// The committed seq from which its own chunk map covers every chunk
    /// its parents map: what it reads from there on never needs them.
    pub seq: u64,
}

/// Chunks read from the parents at once: a background job beside the
/// volume's own I/O, holding at most this many chunks of the dirty
/// budget while it waits.
const COPY_CONCURRENCY: usize = 4;

/// Rounds of copying before giving up on chunks a writer keeps patching
/// (inline pages over the parent's bytes leave the chunk the parent's).
const COPY_ROUNDS: usize = 8;

impl Volume {
    /// The ancestors this handle reads through, nearest first.
    pub fn parent_volumes(&self) -> Vec<String> {
        self.inner.parents.iter().map(|p| p.vol.clone()).collect()
    }

    /// Chunk indices below the volume's size that an ancestor maps or patches.
    fn inherited(&self) -> Vec<u64> {
        let chunks = self.inner.lock().size.div_ceil(self.inner.chunk_size);
        let mut set = std::collections::BTreeSet::new();
        for p in &self.inner.parents {
            set.extend(p.map.keys().chain(p.patches.keys()).copied().filter(|i| *i < chunks));
        }
        set.into_iter().collect()
    }

    /// Make every chunk this clone reads through its parents its own, and
    /// commit them, in batches of half the dirty limit. `progress(done,
    /// total)` is told after each batch. Safe beside writes: a chunk
    /// written meanwhile keeps what was written.
    pub async fn copy_parents(&self, progress: &(dyn Fn(u64, u64) + Send + Sync)) -> VolumeResult<Copied> {
        let inner = &self.inner;
        inner.check_writable()?;
        let all = self.inherited();
        let mut out = Copied { inherited: all.len() as u64, ..Copied::default() };
        let batch = ((inner.opts.dirty_limit / inner.chunk_size) / 2).clamp(1, 256) as usize;
        let mut todo = all.clone();
        for _ in 0..COPY_ROUNDS {
            let mut done = 0u64;
            let clock = inner.opts.clock.as_ref();
            for part in todo.chunks(batch) {
                // Copies within the store hold no memory, but must be named
                // before `restage_after`: a flush at least every quarter of
                // it, however slow the store (a piece of a few rounds of
                // copies at a time).
                let mut since = Stamp::now(clock);
                for piece in part.chunks(4 * COPY_CONCURRENCY) {
                    let copied: Vec<Option<How>> = stream::iter(piece.iter().copied().map(|i| self.copy_chunk(i)))
                        .buffer_unordered(inner.opts.concurrency.clamp(1, COPY_CONCURRENCY))
                        .try_collect()
                        .await?;
                    for how in copied.into_iter().flatten() {
                        out.copied += 1;
                        out.zero += (how == How::Zero) as u64;
                        out.in_store += (how == How::InStore) as u64;
                    }
                    if since.age(clock) >= inner.opts.restage_after / 4 {
                        self.flush().await?;
                        since = Stamp::now(clock);
                    }
                }
                self.flush().await?;
                done += part.len() as u64;
                progress(done, todo.len() as u64);
            }
            // A chunk written over meanwhile with a few pages may have been
            // committed as a patch over the parent's bytes: still the
            // parent's, copied in the next round.
            let st = inner.lock();
            if let Some(why) = &st.fenced {
                return Err(VolumeError::Fenced(why.clone()));
            }
            todo = all.iter().copied().filter(|i| !st.map.contains_key(i)).collect();
            if todo.is_empty() {
                out.seq = st.head;
                return Ok(out);
            }
        }
        Err(VolumeError::Store(StoreError::Transient(format!(
            "{} chunks are still the parent's after {COPY_ROUNDS} rounds (written over with a few pages each time, or \
             copied but not committed in time); try again",
            todo.len()
        ))))
    }

    /// The object of a parent's that chunk `index` reads as it is (no
    /// patch of the clone's or of an ancestor's over it), when the clone
    /// may name a copy of it: not sealed (a sealed object is bound to its
    /// volume and name), and in a layout the clone's own writer could have
    /// written (a packed chunk only into a clone of the same codec).
    fn copyable(&self, st: &State, index: u64) -> Option<(String, ChunkRef)> {
        let inner = &self.inner;
        if inner.meta.encryption.is_some() || st.patches.contains_key(&index) || st.adopted.contains_key(&index) {
            return None;
        }
        for p in &inner.parents {
            if p.patches.contains_key(&index) {
                return None;
            }
            let Some(r) = p.map.get(&index) else { continue };
            let ChunkRef::Stored { generation, layout, .. } = *r else { return None };
            let fits = match layout {
                Layout::Whole => true,
                Layout::Table => inner.meta.format_version >= format::FORMAT_V4,
                Layout::Packed(c) => inner.meta.compression == Some(c),
            };
            return fits.then(|| (chunk_key(&p.vol, index, generation), *r));
        }
        None
    }

    /// Copy chunk `index`'s object from a parent within the store, under a
    /// fresh name of the clone's, for the next record to name
    /// ([`Adopted`]): no byte passes through here. Nothing is locked: the
    /// bytes are the parent's, which reads take meanwhile, and a write
    /// to the chunk makes the copy garbage (the next record leaves it
    /// out). False when the chunk cannot be copied so.
    pub(super) async fn copy_in_store(&self, index: u64) -> VolumeResult<bool> {
        let inner = &self.inner;
        let untouched = |st: &State| {
            !st.slots.contains_key(&index) && !st.staged.contains_key(&index) && !st.map.contains_key(&index)
        };
        let (from, r, epoch) = {
            let st = inner.lock();
            let Some((from, r)) = self.copyable(&st, index).filter(|_| untouched(&st)) else { return Ok(false) };
            (from, r, st.epoch)
        };
        let ChunkRef::Stored { crc, layout, .. } = r else { return Ok(false) };
        let mode = if inner.meta.single_writer { PutMode::Overwrite } else { PutMode::IfAbsent };
        let at = Stamp::now(inner.opts.clock.as_ref());
        for _ in 0..NAME_ATTEMPTS {
            let generation = inner.next_generation(epoch)?;
            match inner.store.copy(&from, &chunk_key(&inner.vol, index, generation), mode).await {
                Ok(()) => {
                    let mut st = inner.lock();
                    if !untouched(&st) || self.copyable(&st, index).is_none_or(|(f, _)| f != from) {
                        // Written or copied meanwhile: the copy is garbage.
                        return Ok(false);
                    }
                    st.adopted.insert(index, Adopted { r: ChunkRef::Stored { generation, crc, layout }, at });
                    return Ok(true);
                }
                // Taken, or an attempt of ours whose answer was lost.
                Err(StoreError::PreconditionFailed(_)) => continue,
                // The parent's object missing, or a store that cannot (a
                // server that refuses the copy, a file system without
                // `copy_file_range` across mounts): the copy through this
                // process finds out and says. Transient trouble fails the
                // round, as a read would.
                Err(e @ (StoreError::NotFound(_) | StoreError::Unsupported(_) | StoreError::Permanent(_))) => {
                    tracing::debug!(volume = %inner.vol, index, error = %e, "copying a chunk within the store failed; reading it instead");
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Copy chunk `index` from the parents when nothing of the clone's own
    /// holds it: how, when copied.
    async fn copy_chunk(&self, index: u64) -> VolumeResult<Option<How>> {
        if self.copy_in_store(index).await? {
            return Ok(Some(How::InStore));
        }
        let inner = &self.inner;
        let untouched = |st: &State| {
            !st.slots.contains_key(&index) && !st.staged.contains_key(&index) && !st.map.contains_key(&index)
        };
        let cs = inner.chunk_size;
        let mut permit: Option<DirtyGuard> = None;
        let _g = loop {
            if !untouched(&inner.lock()) {
                return Ok(None);
            }
            // Never waiting for the lock holding budget bytes: a writer
            // holding the lock may be waiting for them (`write_vec`).
            let g = match permit.is_some().then(|| inner.locks.try_lock(index)).flatten() {
                Some(g) => g,
                None => {
                    permit = None;
                    inner.locks.lock(index).await
                }
            };
            if !untouched(&inner.lock()) {
                return Ok(None);
            }
            // Budget bytes free now, or waited for without the chunk lock
            // (a writer holding it may be waiting for them, as `write_vec`
            // does), then the lock again.
            let free = || inner.dirty.as_ref()?.try_acquire_bytes(cs).filter(|p| p.bytes() == cs);
            if let Some(p) = permit.take().or_else(free) {
                permit = Some(p);
                break g;
            }
            drop(g);
            permit = Some(inner.acquire_dirty_permit(self).await?);
        };
        let Some(permit) = permit else { return Ok(None) };
        // Under the chunk lock no slot appears (a write to a chunk without
        // one takes the lock), and without a slot nothing is staged or
        // committed for it: these bytes stay the chunk's until the slot
        // holds them.
        let data = inner.chunk_bytes(index).await?;
        let zero = data.as_deref().is_none_or(is_zero);
        let data = match data {
            Some(b) if !zero => DirtyData::Data(Arc::new(b.to_vec())),
            _ => DirtyData::Zero,
        };
        // Not in the write-back log: lost in a crash, the chunk reads the
        // same through the parent, and a write over it is logged as any.
        inner.insert_slot(index, data, permit, None, None)?;
        Ok(Some(if zero { How::Zero } else { How::Read }))
    }
}

/// How [`Volume::copy_chunk`] copied a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// Read, and written as any write.
    Read,
    /// Zeros: a ZERO reference.
    Zero,
    /// Its object copied within the store.
    InStore,
}
