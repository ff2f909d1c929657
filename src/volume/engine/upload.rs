//! Uploads: dirty chunks become staged chunk objects under fresh names,
//! in the background past the dirty limit and at every flush.

use super::*;

impl Volume {
    /// Past the dirty limit: upload the oldest dirty chunks and commit them,
    /// which gives their memory back to writers.
    pub(super) fn kick_uploader(&self) {
        let inner = &self.inner;
        if inner.uploader_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let vol = self.clone();
        tokio::spawn(async move {
            vol.inner.background_upload().await;
            vol.inner.uploader_running.store(false, Ordering::SeqCst);
        });
    }
}

/// Removes an upload's entry among the chunks being read for upload when
/// the upload ends, however it ends.
struct ReadingGuard<'a> {
    inner: &'a Inner,
    index: u64,
}

impl Drop for ReadingGuard<'_> {
    fn drop(&mut self) {
        self.inner.lock().reading.remove(&self.index);
    }
}

/// `data` (`None`: zeros) with `pages` laid over it, when that changes
/// it (`Some(None)`: zeros still).
pub(super) fn lay_pages(data: Option<&Bytes>, pages: &Patch, chunk_size: u64) -> Option<Option<Bytes>> {
    if pages.pages.is_empty() {
        return None;
    }
    let mut v = data.map_or_else(|| vec![0u8; chunk_size as usize], |d| d.to_vec());
    pages.apply(&mut v);
    let same = match data {
        Some(d) => d[..] == v[..],
        None => is_zero(&v),
    };
    (!same).then(|| (!is_zero(&v)).then(|| Bytes::from(v)))
}

impl Inner {
    pub(super) fn next_generation(&self, epoch: u64) -> VolumeResult<u64> {
        let counter = self.generation_counter.fetch_add(1, Ordering::SeqCst);
        if counter >= format::MAX_GENERATION_COUNTER {
            return Err(self.fence("this writer used up its chunk names; open the volume again".into()));
        }
        Ok(format::generation(epoch, counter))
    }

    /// Upload a chunk's bytes under a fresh generation, created
    /// conditionally: a name already taken (by any writer, ever) is never
    /// overwritten; the next name is tried.
    pub(super) async fn put_chunk(&self, index: u64, data: &Bytes) -> VolumeResult<ChunkRef> {
        // Packed where the volume is compressed and that saves an eighth
        // (a copy, smaller); else the bytes and their table go up as
        // parts, with no copy of the chunk.
        let packed = match (self.opts.chunk_tables, self.meta.compression) {
            // Compressing a chunk takes milliseconds of CPU: off the
            // runtime's workers, which serve reads from the cache meanwhile.
            (true, Some(codec)) => {
                let data = data.clone();
                tokio::task::spawn_blocking(move || format::pack_chunk(&data, codec))
                    .await
                    .map_err(|e| VolumeError::Corrupt(format!("compressing chunk {index}: {e}")))?
                    .map(|(obj, crc)| (obj, crc, codec))
            }
            _ => None,
        };
        let (parts, crc, layout) = match (packed, self.opts.chunk_tables) {
            (Some((obj, crc, codec)), _) => (vec![obj], crc, Layout::Packed(codec)),
            (None, true) => {
                let (t, crc) = format::chunk_table(data);
                (vec![data.clone(), t], crc, Layout::Table)
            }
            (None, false) => (vec![data.clone()], crc32c::crc32c(data), Layout::Whole),
        };
        let mode = if self.meta.single_writer { PutMode::Overwrite } else { PutMode::IfAbsent };
        for _ in 0..NAME_ATTEMPTS {
            let epoch = self.lock().epoch;
            let generation = self.next_generation(epoch)?;
            match self.store.put_parts(&chunk_key(&self.vol, index, generation), parts.clone(), mode).await {
                Ok(()) => return Ok(ChunkRef::Stored { generation, crc, layout }),
                // Taken, or our own earlier attempt whose answer was lost:
                // either way a fresh name is safe (the other is garbage).
                Err(StoreError::PreconditionFailed(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VolumeError::Corrupt(format!("chunk {index}: {NAME_ATTEMPTS} fresh object names were all taken")))
    }

    /// Upload one dirty chunk as a new generation and stage it. The slot
    /// keeps its bytes throughout: cancelled or failed, nothing is lost.
    pub(super) async fn upload_chunk(&self, index: u64) -> VolumeResult<()> {
        let _u = self.upload_locks.lock(index).await;
        let (data, version, since, read) = loop {
            let pages = matches!(self.lock().slots.get(&index).map(|s| &s.data), Some(DirtyData::Pages(_)));
            // Held until the slot's bytes are read: no new slot of pages
            // can appear meanwhile (slots are made under the chunk lock).
            let _g = match pages {
                true => Some(self.locks.lock(index).await),
                false => None,
            };
            if pages {
                // Pages over the whole chunk need no base.
                let full = self.lock().slots.get(&index).is_some_and(|s| s.data.full_pages());
                let base = match full {
                    true => None,
                    false => self.stored_bytes(index).await?,
                };
                let mut st = self.lock();
                let Some(slot) = st.slots.get(&index) else {
                    return Ok(());
                };
                if let DirtyData::Pages(pb) = &slot.data {
                    // The chunk's bytes in a buffer of the upload's own:
                    // the slot keeps its pages (most of them only in the
                    // write-back log), so a write landing during the
                    // upload leaves the slot no bigger than it was, where
                    // merging in place left it holding the whole chunk.
                    // The buffer is not counted in the dirty budget
                    // (freeing memory must not wait for memory): uploads
                    // merge a few chunks at a time (at most a merge
                    // round) and commit them before the next ones.
                    let v = pb
                        .over(base.as_deref(), 0, self.chunk_size as usize, st.log.as_ref())
                        .map_err(|e| st.log_read(e))?;
                    let data = (!is_zero(&v)).then(|| Bytes::from(v));
                    let read = (slot.version, slot.since, st.tick);
                    st.reading.insert(index, Reading { read: read.2, laid: Patch::default() });
                    break (data, read.0, read.1, read.2);
                }
                // Committed inline meanwhile, and a write made a new slot
                // that holds the chunk whole: taken as it is, below.
            }
            let mut st = self.lock();
            let Some(slot) = st.slots.get(&index) else {
                return Ok(());
            };
            match slot.data.upload_bytes() {
                Some(data) => {
                    let read = (slot.version, slot.since, st.tick);
                    st.reading.insert(index, Reading { read: read.2, laid: Patch::default() });
                    break (data, read.0, read.1, read.2);
                }
                // The slot read was committed inline meanwhile and a write
                // made a new one, of pages: merge that one too.
                None => continue,
            }
        };
        // Records that land while it runs lay their newer pages here
        // (`apply_commit`); gone with the upload, however it ends.
        let _reading = ReadingGuard { inner: self, index };
        let at = Stamp::now(self.opts.clock.as_ref());
        let r = match &data {
            None => ChunkRef::Zero,
            Some(d) => self.put_chunk(index, d).await?,
        };
        let mut st = self.lock();
        let laid = st.reading.remove(&index).map(|r| r.laid);
        if st.slots.get(&index).is_none_or(|s| s.since != since) {
            // A commit carried the slot's pages inline meanwhile (only
            // uploads, one at a time per chunk, and such commits remove
            // slots), and a write since may have made a new slot from the
            // bytes that commit left: the chunk's committed bytes are
            // those pages over what it had, at least as new as these.
            // Staged, these would be read instead, and their chunk entry
            // in the next record would drop the pages. The object is
            // garbage.
            return Ok(());
        }
        // A record built after the bytes were read, carrying pages of the
        // chunk, landed meanwhile: its pages are newer than these, and the
        // object holds the older bytes (it goes up again before a record
        // names it).
        let (data, r, stale) = match laid.and_then(|p| lay_pages(data.as_ref(), &p, self.chunk_size)) {
            // Zeros need no object.
            Some(None) => (None, ChunkRef::Zero, false),
            Some(d) => (d, r, true),
            None => (data, r, false),
        };
        let unchanged = st.slots.get(&index).is_some_and(|s| s.version == version);
        let permit = if unchanged { st.slots.remove(&index).and_then(|mut s| s.permit.take()) } else { None };
        if unchanged {
            match &data {
                Some(d) => st.clean.insert(index, d.clone()),
                None => st.clean.remove(index),
            }
        }
        // A chunk of pages merged for the upload, or a whole chunk the
        // slot copied when written during the upload, is a buffer the
        // slot's charge does not cover.
        let permit = self.staged_permit(permit, data.as_ref());
        // A staged chunk it replaces keeps its permit until dropped here.
        st.staged.insert(index, Staged { r, data, at, read, stale, permit });
        Ok(())
    }

    /// `permit` grown to count `data`, a staged chunk's bytes, in the
    /// dirty budget until committed: past the limit if need be, without
    /// waiting (committed, they free more).
    pub(super) fn staged_permit(&self, permit: Option<DirtyGuard>, data: Option<&Bytes>) -> Option<DirtyGuard> {
        let held = data.map_or(0, |b| b.len() as u64);
        let counted = permit.as_ref().map_or(0, DirtyGuard::bytes);
        let Some(d) = self.dirty.as_ref().filter(|_| held > counted) else { return permit };
        let more = d.overdraft(held - counted);
        Some(match permit {
            Some(mut p) => {
                p.absorb(more);
                p
            }
            None => more,
        })
    }

    /// Upload the oldest dirty chunks until they hold no more than three
    /// quarters of what this volume held (of its fair share of the dirty
    /// budget, when it held more: all of the budget when it is the
    /// volume's own), then commit them, which gives their bytes back. So
    /// each round frees a quarter at least, whoever asked for it.
    pub(super) async fn background_upload(&self) {
        let target = self.dirty.as_ref().map_or(0, |d| d.fair_share().min(d.held()) / 4 * 3);
        // Room for more pages first, when they are past half their limit.
        if let Err(e) = self.fold_patches().await {
            tracing::warn!(volume = %self.vol, error = %e, "folding patched chunks failed");
        }
        // Off once a round of inline commits freed nothing (the same
        // chunks written again meanwhile): then they are uploaded.
        let mut inline_helps = true;
        loop {
            let (batch, inline): (Vec<u64>, BTreeSet<u64>) = {
                let st = self.lock();
                if st.fenced.is_some() || st.slots.values().map(Slot::charged).sum::<u64>() <= target {
                    break;
                }
                let mut v: Vec<(u64, u64)> = st.slots.iter().map(|(i, s)| (s.since, *i)).collect();
                v.sort_unstable();
                // Chunks with few dirty pages, oldest first, go inside one
                // journal record (no upload, no base to fetch); the oldest
                // of the others are uploaded.
                let inline = match inline_helps {
                    true => self.choose_inline(&st, v.iter().map(|(_, i)| *i)),
                    false => BTreeSet::new(),
                };
                let batch = v.into_iter().map(|(_, i)| i).filter(|i| !inline.contains(i));
                (batch.take(self.opts.concurrency).collect(), inline)
            };
            if !inline.is_empty() {
                let before = {
                    let mut st = self.lock();
                    st.inline_next.extend(inline);
                    st.slots.len()
                };
                let _f = self.flush_lock.lock().await;
                if let Err(e) = self.commit().await {
                    self.upload_failed("committing dirty pages in the background failed", e);
                    return;
                }
                inline_helps = self.lock().slots.len() < before;
                continue;
            }
            if batch.is_empty() {
                break;
            }
            if self.lock().staged.len() >= self.merge_round() {
                let _f = self.flush_lock.lock().await;
                if let Err(e) = self.commit_staged_first().await {
                    self.upload_failed("committing earlier uploads failed", e);
                    return;
                }
            }
            let results: Vec<VolumeResult<()>> = stream::iter(batch.into_iter().map(|i| self.upload_chunk(i)))
                .buffer_unordered(self.opts.concurrency)
                .collect()
                .await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                self.upload_failed("background upload failed", e);
                return;
            }
            // Committed batch by batch: staged chunks give their memory
            // back only then, and chunks of pages merged for their upload
            // hold more than the budget counted for them.
            let _f = self.flush_lock.lock().await;
            if let Err(e) = self.commit().await {
                self.upload_failed("committing background uploads failed", e);
                return;
            }
        }
        let due = {
            let st = self.lock();
            st.fenced.is_none() && (!st.staged.is_empty() || st.pending.is_some())
        };
        if due {
            let _f = self.flush_lock.lock().await;
            if let Err(e) = self.commit().await {
                self.upload_failed("committing background uploads failed", e);
            }
        }
    }

    /// A background upload or commit failed: logged, and kept for the
    /// writers waiting for the memory it would have freed.
    fn upload_failed(&self, what: &str, e: VolumeError) {
        tracing::warn!(volume = %self.vol, error = %e, "{what}");
        if let VolumeError::Store(se) = e {
            self.lock().upload_error = Some((se, Instant::now()));
        }
    }

    /// Patches past half the volume's limit: store the most patched chunks
    /// whole again (their current bytes, uploaded as new generations and
    /// committed), until they are under it, so that small flushes keep
    /// going inline.
    pub(super) async fn fold_patches(&self) -> VolumeResult<()> {
        loop {
            let batch: Vec<u64> = {
                let st = self.lock();
                if st.fenced.is_some() || st.patch_bytes <= self.opts.patch_limit / 2 {
                    return Ok(());
                }
                let mut v: Vec<(u64, u64)> = st
                    .patches
                    .iter()
                    .filter(|(i, _)| !st.slots.contains_key(i) && !st.staged.contains_key(i))
                    .map(|(i, p)| (p.bytes(), *i))
                    .collect();
                v.sort_unstable_by(|a, b| b.cmp(a));
                v.into_iter().take(self.opts.concurrency).map(|(_, i)| i).collect()
            };
            if batch.is_empty() {
                return Ok(());
            }
            let staged: Vec<bool> = stream::iter(batch.into_iter().map(|i| self.fold_chunk(i)))
                .buffer_unordered(self.opts.concurrency)
                .try_collect()
                .await?;
            let _f = self.flush_lock.lock().await;
            self.commit().await?;
            if !staged.contains(&true) {
                // Every one moved under us: try at the next round.
                return Ok(());
            }
        }
    }

    /// Upload a patched chunk's bytes whole and stage them, unless the
    /// chunk changed meanwhile (then the next flush deals with it). True
    /// when staged.
    async fn fold_chunk(&self, index: u64) -> VolumeResult<bool> {
        // Never waits for a chunk's locks: a writer holding one may be
        // waiting for memory that only the uploader (which folds) frees.
        let Some(_u) = self.upload_locks.try_lock(index) else { return Ok(false) };
        let (data, map, patch, read) = {
            let Some(_g) = self.locks.try_lock(index) else { return Ok(false) };
            let (map, patch, read) = {
                let st = self.lock();
                (st.map.get(&index).copied(), st.patches.get(&index).cloned(), st.tick)
            };
            (self.stored_bytes(index).await?, map, patch, read)
        };
        let Some(patch) = patch else { return Ok(false) };
        let at = Stamp::now(self.opts.clock.as_ref());
        let r = match &data {
            Some(d) if !is_zero(d) => self.put_chunk(index, d).await?,
            _ => ChunkRef::Zero,
        };
        let mut st = self.lock();
        // Staged only over exactly the state it read, with no record in
        // flight or given up on (one could still land with pages these
        // bytes lack, and this chunk entry would then drop them) and no
        // write since (a dirty slot's pages sit on the old bytes, which
        // are these).
        let unchanged = st.map.get(&index).copied() == map
            && st.patches.get(&index).is_some_and(|p| Arc::ptr_eq(p, &patch))
            && !st.slots.contains_key(&index)
            && !st.staged.contains_key(&index)
            && st.pending.is_none()
            && st.abandoned.is_empty();
        if !unchanged {
            return Ok(false);
        }
        let data = data.filter(|_| matches!(r, ChunkRef::Stored { .. }));
        let permit = self.staged_permit(None, data.as_ref());
        st.staged.insert(index, Staged { r, data, at, read, stale: false, permit });
        Ok(true)
    }

    /// Staged chunks uploaded longer ago than `restage_after`, or whose
    /// bytes changed since (stale), go up again under fresh names from the
    /// bytes kept in memory, so that no commit refers to a chunk
    /// compaction could have collected meanwhile, or to older bytes than
    /// the chunk's.
    pub(super) async fn restage(&self, older_than: Duration) -> VolumeResult<()> {
        let clock = self.opts.clock.as_ref();
        let old: Vec<(u64, ChunkRef, Bytes)> = {
            let st = self.lock();
            st.staged
                .iter()
                .filter(|(_, s)| s.stale || s.at.age(clock) >= older_than)
                .filter_map(|(i, s)| s.data.clone().map(|d| (*i, s.r, d)))
                .collect()
        };
        for (index, old_ref, data) in old {
            let at = Stamp::now(clock);
            let r = self.put_chunk(index, &data).await?;
            let mut st = self.lock();
            // Not when replaced meanwhile, or when its bytes changed again.
            if let Some(s) = st
                .staged
                .get_mut(&index)
                .filter(|s| s.r == old_ref && s.data.as_ref().is_some_and(|d| d.as_ptr() == data.as_ptr()))
            {
                s.r = r;
                s.at = at;
                s.stale = false;
            }
            tracing::debug!(volume = %self.vol, index, "uploaded an old staged chunk again before committing it");
        }
        Ok(())
    }
}
