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
        let cs = inner.chunk_size;
        let logged = st.log.is_some();
        {
            let slot = st.slots.get_mut(&p.index)?;
            if slot.data.needs_base(p, cs) {
                return None;
            }
            // New pages of a slot of pages take budget bytes, if free now.
            let need = slot.data.charge_after(p, cs, logged).saturating_sub(slot.charged());
            if need > 0 {
                slot.grow(inner.dirty.as_ref()?.try_acquire_bytes(need).filter(|g| g.bytes() == need)?);
            }
        }
        Some(st.write_logged(p, Some(data), cs, tick))
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
        let data = Arc::new(data);
        let must_wait = {
            let mut st = self.inner.lock();
            if let Some(why) = &st.fenced {
                return Err(VolumeError::Fenced(why.clone()));
            }
            st.tick += 1;
            let tick = st.tick;
            match st.slots.get_mut(&index) {
                None => false,
                Some(slot) => {
                    // A slot of pages growing to the whole chunk: the bytes
                    // may have to be waited for, which the general path does.
                    let need = cs.saturating_sub(slot.charged());
                    let more = match need {
                        0 => None,
                        _ => self.inner.dirty.as_ref().and_then(|d| d.try_acquire_bytes(need)),
                    };
                    match more.filter(|g| g.bytes() == need) {
                        None if need > 0 => true,
                        more => {
                            if let Some(g) = more {
                                slot.grow(g);
                            }
                            st.log(log::Record::Write { offset, data: &data })?;
                            if let Some(slot) = st.slots.get_mut(&index) {
                                slot.data = DirtyData::Data(data.clone());
                                slot.touch(0, cs as usize);
                                slot.version = tick;
                            }
                            return Ok(());
                        }
                    }
                }
            }
        };
        if must_wait {
            drop(_g);
            return self.write(offset, &data).await;
        }
        let data = DirtyData::Data(data);
        let permit = self.inner.acquire_dirty_permit(self).await?;
        let bytes = match &data {
            DirtyData::Data(d) => Some(d.clone()),
            _ => None,
        };
        let logged = bytes.as_ref().map(|d| log::Record::Write { offset, data: d.as_slice() });
        self.inner.insert_slot(index, data, permit, None, logged)
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

    /// A new dirty slot: `data`, then the write `piece` (with its bytes,
    /// `None`: zeros) applied over it, or, without one, `data` written
    /// whole; `logged` is the change that made it, logged in the same
    /// critical section, first (pages the log takes are kept there only).
    pub(super) fn insert_slot(
        &self,
        index: u64,
        mut data: DirtyData,
        permit: DirtyGuard,
        piece: Option<(Piece, Option<&[u8]>)>,
        logged: Option<log::Record<'_>>,
    ) -> VolumeResult<()> {
        let mut st = self.lock();
        if let Some(why) = &st.fenced {
            // Fenced since the write looked (its log is gone with it).
            return Err(VolumeError::Fenced(why.clone()));
        }
        let pos = match logged {
            Some(r) => st.log(r)?,
            None => None,
        };
        st.tick += 1;
        let tick = st.tick;
        st.clean.remove(index);
        let (at, len) = match piece {
            Some((p, bytes)) => {
                data.apply(p, bytes, self.chunk_size, pos);
                (p.at, p.len)
            }
            None => (0, self.chunk_size as usize),
        };
        let mut slot = Slot::new(data, tick, permit, self.chunk_size);
        slot.touch(at, len);
        st.slots.insert(index, slot);
        Ok(())
    }

    pub(super) async fn write_piece(&self, p: Piece, data: Option<&[u8]>, vol: &Volume) -> VolumeResult<()> {
        // Budget bytes waited for without the chunk lock, for the next try.
        let mut extra = None;
        loop {
            let g = self.locks.lock(p.index).await;
            match self.try_write_piece(p, data, &mut extra).await? {
                Attempt::Done(r) => return r,
                Attempt::Again => {}
                Attempt::Need(n) => {
                    // Never wait for memory holding the lock of a dirty
                    // chunk (the uploader may need it to free memory), nor
                    // holding budget bytes: writers that each kept some
                    // while waiting for more could spend the budget among
                    // themselves, leaving nothing to upload, and wait for
                    // each other forever.
                    drop(g);
                    drop(extra.take());
                    extra = Some(self.acquire_dirty_bytes(vol, n).await?);
                }
            }
        }
    }

    /// `need` budget bytes for a slot: from `extra` (bytes waited for
    /// before), else free now; `None` when they must be waited for.
    fn take_bytes(&self, need: u64, extra: &mut Option<DirtyGuard>) -> Option<DirtyGuard> {
        let have = extra.as_ref().map_or(0, DirtyGuard::bytes);
        if have >= need {
            return extra.take();
        }
        let more = self.dirty.as_ref()?.try_acquire_bytes(need - have).filter(|g| g.bytes() == need - have)?;
        Some(match extra.take() {
            Some(mut e) => {
                e.absorb(more);
                e
            }
            None => more,
        })
    }

    /// One attempt of [`Inner::write_piece`] (chunk lock held).
    async fn try_write_piece(
        &self,
        p: Piece,
        data: Option<&[u8]>,
        extra: &mut Option<DirtyGuard>,
    ) -> VolumeResult<Attempt> {
        let cs = self.chunk_size;
        let full = p.at == 0 && p.len as u64 == cs;
        // `None`: no dirty slot yet; `Some(g)`: pages over an unread base,
        // and the budget bytes that the whole chunk will take.
        let materialize = {
            let mut st = self.lock();
            if let Some(why) = &st.fenced {
                return Ok(Attempt::Done(Err(VolumeError::Fenced(why.clone()))));
            }
            st.tick += 1;
            let tick = st.tick;
            let logged = st.log.is_some();
            let more = match st.slots.get_mut(&p.index) {
                None => None,
                Some(slot) => {
                    let need = slot.data.charge_after(p, cs, logged).saturating_sub(slot.charged());
                    let more = match need {
                        0 => None,
                        _ => match self.take_bytes(need, extra) {
                            Some(g) => Some(g),
                            None => return Ok(Attempt::Need(need)),
                        },
                    };
                    if slot.data.needs_base(p, cs) {
                        Some(more)
                    } else {
                        if let Some(g) = more {
                            slot.grow(g);
                        }
                        None
                    }
                }
            };
            if more.is_none() && st.slots.contains_key(&p.index) {
                return Ok(Attempt::Done(st.write_logged(p, data, cs, tick)));
            }
            more
        };
        if let Some(more) = materialize {
            // Pages over an unread base, and a write that is not whole
            // pages: read the base now and merge. (We hold the chunk lock:
            // only the fast path may add pages meanwhile, and the merge
            // below sees them.) Pages over the whole chunk need no base:
            // writes only add pages, and a new slot needs our lock.
            let full_pages = self.lock().slots.get(&p.index).is_some_and(|s| s.data.full_pages());
            let base = match full_pages {
                true => None,
                false => self.stored_bytes(p.index).await?,
            };
            let mut guard = self.lock();
            let st = &mut *guard;
            st.tick += 1;
            let tick = st.tick;
            if let Some(slot) = st.slots.get_mut(&p.index) {
                if let Some(g) = more {
                    slot.grow(g);
                }
                if let Err(e) = slot.data.materialize(base.as_deref(), st.log.as_ref()) {
                    return Ok(Attempt::Done(Err(st.log_read(e))));
                }
                return Ok(Attempt::Done(st.write_logged(p, data, cs, tick)));
            }
            // Uploads take a slot of pages only under the chunk lock, which
            // this write holds; a commit that carried its pages inline
            // releases it without: they are in the chunk's patch now,
            // which `base` predates.
            *extra = more;
            return Ok(Attempt::Again);
        }
        // A new dirty chunk takes budget bytes: this is where memory is
        // bounded. Whole pages over bytes not in memory take only their
        // own; anything else the whole chunk. The bytes are a guard:
        // dropped with this future, they go back.
        let pages = !full && p.at.is_multiple_of(PAGE) && p.len.is_multiple_of(PAGE);
        let (from_memory, logged) = {
            let st = self.lock();
            (!full && (st.staged.contains_key(&p.index) || st.clean.peek(p.index)), st.log.is_some())
        };
        let need = match pages && !from_memory {
            true => PageBuf::new(cs).charge_after(p.at, p.len, logged),
            false => cs,
        };
        let Some(permit) = self.take_bytes(need, extra) else {
            return Ok(Attempt::Need(need));
        };
        // The chunk's bytes when memory has them (staged, or cached):
        // then the slot starts from them, and once committed they go back
        // to the cache, so a hot chunk stays hot.
        let in_memory = match from_memory {
            true => {
                let mut st = self.lock();
                match st.staged.get(&p.index) {
                    Some(s) => Some(s.data.clone()),
                    None => st.clean.get(p.index).map(Some),
                }
            }
            false => None,
        };
        let slot_data = if full {
            DirtyData::Zero
        } else if let Some(base) = in_memory {
            match base {
                None => DirtyData::Zero,
                Some(b) => DirtyData::Data(Arc::new(b.to_vec())),
            }
        } else if pages {
            DirtyData::Pages(PageBuf::new(cs))
        } else {
            match self.chunk_bytes(p.index).await? {
                None => DirtyData::Zero,
                Some(b) => DirtyData::Data(Arc::new(b.to_vec())),
            }
        };
        let offset = p.index * cs + p.at as u64;
        let logged = match data {
            Some(data) => log::Record::Write { offset, data },
            None => log::Record::Zero { offset, len: p.len as u64 },
        };
        Ok(Attempt::Done(self.insert_slot(p.index, slot_data, permit, Some((p, data)), Some(logged))))
    }

    /// One chunk's bytes of the dirty budget (see [`Inner::acquire_dirty_bytes`]).
    pub(super) async fn acquire_dirty_permit(&self, vol: &Volume) -> VolumeResult<DirtyGuard> {
        self.acquire_dirty_bytes(vol, self.chunk_size).await
    }

    /// `n` bytes of the dirty budget (at most a chunk's). While the budget
    /// is spent, this volume and every volume holding more than its fair
    /// share upload; the wait keeps its place in the budget's queue.
    pub(super) async fn acquire_dirty_bytes(&self, vol: &Volume, n: u64) -> VolumeResult<DirtyGuard> {
        let Some(account) = &self.dirty else { return Err(VolumeError::ReadOnly) };
        if let Some(g) = account.try_acquire_bytes(n) {
            return Ok(g);
        }
        let wait = account.acquire_bytes(n);
        tokio::pin!(wait);
        let since = Instant::now();
        loop {
            vol.kick_uploader();
            account.ask_others_to_upload();
            // Biased: a wait that finished is taken, also when the timer
            // is due at the same moment (an unbiased pick made runs of the
            // simulation differ for the same seed).
            tokio::select! {
                biased;
                g = &mut wait => return Ok(g),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    // Only an upload that failed while this writer waited
                    // fails it; an older failure (of a round another
                    // volume asked for, with the store since recovered)
                    // is dropped, and the next round tries again.
                    if let Some((e, at)) = self.lock().upload_error.take()
                        && at >= since
                    {
                        return Err(e.into());
                    }
                    self.check_writable()?;
                }
            }
        }
    }
}

/// What one try of a piece's write came to.
pub(super) enum Attempt {
    Done(VolumeResult<()>),
    /// The slot went meanwhile: try again.
    Again,
    /// Wait for this many budget bytes (in all, giving back those held)
    /// without the chunk lock, then try again.
    Need(u64),
}
