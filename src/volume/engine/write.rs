//! The write path: applying writes to dirty chunks, bounded by owned
//! memory permits.

use super::*;

impl Volume {
    /// A write applied on the spot when it falls in one chunk that is
    /// already dirty: a copy under the state lock. `None` means "take
    /// [`Volume::write_vec`]".
    pub fn write_now(&self, offset: u64, data: &[u8]) -> Option<VolumeResult<()>> {
        let inner = &self.inner;
        offset.checked_add(data.len() as u64)?;
        let mut ps = pieces(offset, data.len() as u64, inner.chunk_size);
        let (Some(p), None) = (ps.next(), ps.next()) else {
            return None;
        };
        if inner.opts.read_only {
            return Some(Err(VolumeError::ReadOnly));
        }
        let mut st = inner.lock();
        if let Some(why) = &st.fenced {
            return Some(Err(VolumeError::Fenced(why.clone())));
        }
        if st.log_over_cap() {
            return None;
        }
        if offset + data.len() as u64 > st.size {
            return None;
        }
        st.tick += 1;
        let tick = st.tick;
        let slot = st.slots.get_mut(&p.index)?;
        if !slot.data.apply(p, Some(data), inner.chunk_size) {
            return None;
        }
        slot.touch(p.at, p.len);
        slot.version = tick;
        Some(st.log_piece(p, Some(data), inner.chunk_size))
    }

    /// Write `data` at `offset`. Not durable until [`Volume::flush`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> VolumeResult<()> {
        self.inner.check_writable()?;
        self.inner.check_range(offset, data.len() as u64)?;
        self.inner.wait_for_log_room().await?;
        for p in pieces(offset, data.len() as u64, self.inner.chunk_size) {
            self.inner.write_piece(p, Some(&data[p.pos..p.pos + p.len]), self).await?;
        }
        Ok(())
    }

    /// Like [`Volume::write`], taking the buffer: a write of exactly one
    /// whole chunk becomes the chunk's dirty buffer without a copy.
    pub async fn write_vec(&self, offset: u64, data: Vec<u8>) -> VolumeResult<()> {
        let cs = self.inner.chunk_size;
        if !offset.is_multiple_of(cs) || data.len() as u64 != cs {
            return self.write(offset, &data).await;
        }
        self.inner.check_writable()?;
        self.inner.check_range(offset, cs)?;
        self.inner.wait_for_log_room().await?;
        let index = offset / cs;
        let _g = self.inner.locks.lock(index).await;
        let data = DirtyData::Data(Arc::new(data));
        let data = {
            let mut st = self.inner.lock();
            st.tick += 1;
            let tick = st.tick;
            match st.slots.get_mut(&index) {
                Some(slot) => {
                    slot.data = data;
                    slot.touch(0, cs as usize);
                    slot.version = tick;
                    let DirtyData::Data(d) = &slot.data else { return Ok(()) };
                    let d = d.clone();
                    return st.log(log::Record::Write { offset, data: &d });
                }
                None => data,
            }
        };
        let permit = self.inner.acquire_dirty_permit(self).await?;
        let bytes = match &data {
            DirtyData::Data(d) => Some(d.clone()),
            _ => None,
        };
        let logged = bytes.as_ref().map(|d| log::Record::Write { offset, data: d.as_slice() });
        self.inner.insert_slot(index, data, permit, (0, cs as usize), logged)
    }

    /// Zero a range (TRIM and WRITE_ZEROES). Whole chunks become ZERO
    /// references: no object, no bytes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> VolumeResult<()> {
        self.inner.check_writable()?;
        self.inner.check_range(offset, len)?;
        self.inner.wait_for_log_room().await?;
        for p in pieces(offset, len, self.inner.chunk_size) {
            self.inner.write_piece(p, None, self).await?;
        }
        Ok(())
    }
}

impl Inner {
    /// The local disk is bounded too: past twice its limit (the flush the
    /// limit starts is not keeping up, or the store does not answer),
    /// writers wait for a flush to empty the log; a flush that fails while
    /// they wait fails them.
    pub(super) async fn wait_for_log_room(&self) -> VolumeResult<()> {
        let waited_from = {
            let mut st = self.lock();
            if !st.log_over_cap() {
                return Ok(());
            }
            st.log_flush_error = None;
            st.log_full.notify_one();
            Instant::now()
        };
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut st = self.lock();
            if let Some(why) = &st.fenced {
                return Err(VolumeError::Fenced(why.clone()));
            }
            if !st.log_over_cap() {
                return Ok(());
            }
            if let Some(e) = st.log_flush_error.take() {
                return Err(e);
            }
            if waited_from.elapsed() > Duration::from_secs(1) {
                st.log_full.notify_one();
            }
        }
    }

    /// A new dirty slot, written at `touched` (offset in the chunk,
    /// length); `logged` is the change that made it, logged in the same
    /// critical section.
    pub(super) fn insert_slot(
        &self,
        index: u64,
        data: DirtyData,
        permit: DirtyGuard,
        touched: (usize, usize),
        logged: Option<log::Record<'_>>,
    ) -> VolumeResult<()> {
        let mut st = self.lock();
        st.tick += 1;
        let tick = st.tick;
        st.clean.remove(index);
        let mut slot = Slot::new(data, tick, permit, self.chunk_size);
        slot.touch(touched.0, touched.1);
        st.slots.insert(index, slot);
        match logged {
            Some(r) => st.log(r),
            None => Ok(()),
        }
    }

    pub(super) async fn write_piece(&self, p: Piece, data: Option<&[u8]>, vol: &Volume) -> VolumeResult<()> {
        let _g = self.locks.lock(p.index).await;
        loop {
            if let Some(r) = self.try_write_piece(p, data, vol).await? {
                return r;
            }
        }
    }

    /// One attempt of [`Inner::write_piece`] (chunk lock held): `None`
    /// when the chunk's dirty pages were committed inline while it read
    /// their base (their slot is gone): try again.
    async fn try_write_piece(
        &self,
        p: Piece,
        data: Option<&[u8]>,
        vol: &Volume,
    ) -> VolumeResult<Option<VolumeResult<()>>> {
        let full = p.at == 0 && p.len as u64 == self.chunk_size;
        // `None`: no dirty slot yet; `Some(false)`: pages over an unread base.
        let applied = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            let applied = st.slots.get_mut(&p.index).map(|slot| {
                let done = slot.data.apply(p, data, self.chunk_size);
                if done {
                    slot.touch(p.at, p.len);
                    slot.version = tick;
                }
                done
            });
            if applied == Some(true) {
                return Ok(Some(st.log_piece(p, data, self.chunk_size)));
            }
            applied
        };
        if applied == Some(false) {
            // Pages over an unread base, and a write that is not whole
            // pages: read the base now and merge. (We hold the chunk lock:
            // only the fast path may add pages meanwhile, and the merge
            // below sees them.)
            let base = self.stored_bytes(p.index).await?;
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            if let Some(slot) = st.slots.get_mut(&p.index) {
                slot.data.materialize(base.as_deref());
                slot.data.apply(p, data, self.chunk_size);
                slot.touch(p.at, p.len);
                slot.version = tick;
                return Ok(Some(st.log_piece(p, data, self.chunk_size)));
            }
            // Uploads take a slot of pages only under the chunk lock, which
            // this write holds; a commit that carried its pages inline
            // releases it without: they are in the chunk's patch now,
            // which `base` predates.
            return Ok(None);
        }
        // A new dirty chunk needs a permit: this is where memory is bounded.
        // The permit is a guard: dropped with this future, it goes back.
        let permit = self.acquire_dirty_permit(vol).await?;
        // The chunk's bytes when memory has them (staged, or cached):
        // then the slot starts from them, and once committed they go back
        // to the cache, so a hot chunk stays hot.
        let in_memory = {
            let mut st = self.lock();
            match st.staged.get(&p.index) {
                Some(s) => Some(s.data.clone()),
                None => st.clean.get(p.index).map(Some),
            }
        };
        let mut slot_data = if full {
            DirtyData::Zero
        } else if let Some(base) = in_memory {
            match base {
                None => DirtyData::Zero,
                Some(b) => DirtyData::Data(Arc::new(b.to_vec())),
            }
        } else if p.at.is_multiple_of(PAGE) && p.len.is_multiple_of(PAGE) {
            DirtyData::Pages(PageBuf::new(self.chunk_size))
        } else {
            match self.chunk_bytes(p.index).await? {
                None => DirtyData::Zero,
                Some(b) => DirtyData::Data(Arc::new(b.to_vec())),
            }
        };
        slot_data.apply(p, data, self.chunk_size);
        let offset = p.index * self.chunk_size + p.at as u64;
        let logged = match data {
            Some(data) => log::Record::Write { offset, data },
            None => log::Record::Zero { offset, len: p.len as u64 },
        };
        Ok(Some(self.insert_slot(p.index, slot_data, permit, (p.at, p.len), Some(logged))))
    }

    /// One chunk's bytes of the dirty budget. While the budget is spent,
    /// this volume and every volume holding more than its fair share
    /// upload; the wait keeps its place in the budget's queue.
    pub(super) async fn acquire_dirty_permit(&self, vol: &Volume) -> VolumeResult<DirtyGuard> {
        let Some(account) = &self.dirty else { return Err(VolumeError::ReadOnly) };
        if let Some(g) = account.try_acquire() {
            return Ok(g);
        }
        let wait = account.acquire();
        tokio::pin!(wait);
        loop {
            vol.kick_uploader();
            account.ask_others_to_upload();
            tokio::select! {
                g = &mut wait => return Ok(g),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Some(e) = self.lock().upload_error.take() {
                        return Err(e.into());
                    }
                    self.check_writable()?;
                }
            }
        }
    }
}
