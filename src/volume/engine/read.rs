//! The read path: dirty, staged, cached or fetched bytes; readahead; a
//! read-only opener following the journal.

use super::*;

impl Volume {
    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> VolumeResult<Vec<u8>> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.check_not_fenced()?;
        let mut out = vec![0u8; len as usize];
        let ps: Vec<Piece> = pieces(offset, len, inner.chunk_size).collect();
        let ranged = self.ranged(offset);
        let fetched: Vec<(Piece, Option<Bytes>)> = stream::iter(ps.into_iter().map(|p| async move {
            let _g = inner.locks.lock(p.index).await;
            Ok::<_, VolumeError>((p, inner.piece_bytes(p, ranged).await?))
        }))
        .buffered(inner.opts.concurrency)
        .try_collect()
        .await?;
        for (p, data) in fetched {
            if let Some(d) = data {
                out[p.pos..p.pos + p.len].copy_from_slice(&d);
            }
        }
        self.maybe_readahead(offset, len);
        Ok(out)
    }

    /// Like [`Volume::read`], returning shared bytes: a read inside one
    /// cached chunk is a slice of the cache, with no copy.
    pub async fn read_bytes(&self, offset: u64, len: u64) -> VolumeResult<Bytes> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.check_not_fenced()?;
        let mut ps = pieces(offset, len, inner.chunk_size);
        if let (Some(p), None) = (ps.next(), ps.next()) {
            let ranged = self.ranged(offset);
            let data = {
                let _g = inner.locks.lock(p.index).await;
                inner.piece_bytes(p, ranged).await?
            };
            self.maybe_readahead(offset, len);
            return Ok(data.unwrap_or_else(|| Bytes::from(vec![0u8; p.len])));
        }
        self.read(offset, len).await.map(Bytes::from)
    }

    /// A read served on the spot when its bytes are in memory: one chunk,
    /// dirty, staged, cached, or known to be zeros. No chunk lock and no
    /// await: the state lock alone orders it against writers, which change
    /// a chunk's bytes only under that lock. `None` means "take
    /// [`Volume::read_bytes`]".
    /// Which parts of `[offset, offset + len)` read as zeros without any
    /// stored data (unmapped chunks, ZERO chunks, zeroed dirty chunks):
    /// runs of `(length, zero)`, at most `max_runs` of them, so they may
    /// cover less than asked. Dirty and stored chunks count as data; for a
    /// clone, the nearest ancestor that maps a chunk decides. Scans at most
    /// 64 Ki chunks per call.
    pub fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> VolumeResult<Vec<(u64, bool)>> {
        const MAX_SCAN: u64 = 64 << 10;
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        let st = inner.lock();
        if let Some(why) = &st.fenced {
            return Err(VolumeError::Fenced(why.clone()));
        }
        let cs = inner.chunk_size;
        let end = offset + len;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        let mut scanned = 0;
        while pos < end && scanned < MAX_SCAN {
            let index = pos / cs;
            let next = ((index + 1) * cs).min(end);
            // Patched pages count as data.
            let zero = match (st.slots.get(&index), st.staged.get(&index), st.map.get(&index)) {
                (Some(slot), _, _) => matches!(slot.data, DirtyData::Zero),
                (None, Some(staged), _) => staged.data.is_none(),
                _ if st.patches.contains_key(&index) => false,
                (None, None, Some(r)) => matches!(r, ChunkRef::Zero),
                (None, None, None) => !inner
                    .parents
                    .iter()
                    .find_map(|p| match p.map.get(&index) {
                        _ if p.patches.contains_key(&index) => Some(true),
                        Some(r) => Some(matches!(r, ChunkRef::Stored { .. })),
                        None => None,
                    })
                    .unwrap_or(false),
            };
            let full = runs.len() >= max_runs.max(1);
            match runs.last_mut() {
                Some((n, z)) if *z == zero => *n += next - pos,
                _ if full => break,
                _ => runs.push((next - pos, zero)),
            }
            pos = next;
            scanned += 1;
        }
        Ok(runs)
    }

    pub fn read_now(&self, offset: u64, len: u64) -> Option<Bytes> {
        let inner = &self.inner;
        // Out-of-range requests take the normal path and its error.
        offset.checked_add(len)?;
        let mut ps = pieces(offset, len, inner.chunk_size);
        let (Some(p), None) = (ps.next(), ps.next()) else {
            return None;
        };
        let (data, ahead) = {
            let mut st = inner.lock();
            if offset + len > st.size || st.fenced.is_some() {
                return None;
            }
            let data = match st.slots.get(&p.index) {
                // A page the log cannot give back: the slow path says why.
                Some(slot) => {
                    slot.data.piece(p, st.log.as_ref()).ok()??.unwrap_or_else(|| Bytes::from(vec![0u8; p.len]))
                }
                None => match st.staged.get(&p.index) {
                    Some(s) => match &s.data {
                        Some(b) => b.slice(p.at..p.at + p.len),
                        None => Bytes::from(vec![0u8; p.len]),
                    },
                    None => match st.clean.get_range(p.index, p.at, p.len) {
                        Some(b) => b,
                        None if st.patches.contains_key(&p.index) => return None,
                        None => match st.map.get(&p.index) {
                            Some(ChunkRef::Zero) => Bytes::from(vec![0u8; p.len]),
                            None if inner.parents.is_empty() => Bytes::from(vec![0u8; p.len]),
                            _ => return None,
                        },
                    },
                },
            };
            (data, note_read(&mut st, offset, len, inner.readahead_limit(), inner.chunk_size))
        };
        if ahead > 0 {
            self.readahead_after(offset + len, ahead);
        }
        Some(data)
    }

    /// Prefetch a chunk into the cache (NBD_CMD_CACHE).
    pub async fn prefetch(&self, offset: u64, len: u64) -> VolumeResult<()> {
        let inner = &self.inner;
        inner.check_range(offset, len)?;
        inner.check_not_fenced()?;
        for p in pieces(offset, len, inner.chunk_size) {
            let _g = inner.locks.lock(p.index).await;
            inner.chunk_bytes(p.index).await?;
        }
        Ok(())
    }

    /// Whether a read at `offset` may fetch only the blocks it needs: not
    /// when it continues the last read (a sequential reader wants whole
    /// chunks, and readahead fetches the next ones).
    fn ranged(&self, offset: u64) -> bool {
        // A cache that cannot keep a whole chunk would fetch it again for
        // every read of it.
        self.inner.lock().last_read_end != offset || self.inner.cache_room < self.inner.chunk_size
    }

    pub(super) fn maybe_readahead(&self, offset: u64, len: u64) {
        let ahead = note_read(&mut self.inner.lock(), offset, len, self.inner.readahead_limit(), self.inner.chunk_size);
        if ahead > 0 {
            self.readahead_after(offset + len, ahead);
        }
    }

    /// Fetch `ra` chunks after `end` into the cache in the background.
    pub(super) fn readahead_after(&self, end: u64, ra: u64) {
        let inner = &self.inner;
        let size = self.size();
        let next = end.div_ceil(inner.chunk_size);
        let last = size.div_ceil(inner.chunk_size);
        for index in next..(next + ra).min(last) {
            {
                // Cached, dirty, or being fetched ahead already: nothing to do.
                let mut st = inner.lock();
                if st.slots.contains_key(&index)
                    || st.staged.contains_key(&index)
                    || st.clean.peek(index)
                    || !st.reading_ahead.insert(index)
                {
                    continue;
                }
            }
            let vol = self.clone();
            tokio::spawn(async move {
                let _done = ReadingAhead { vol: &vol, index };
                let _g = vol.inner.locks.lock(index).await;
                if let Err(e) = vol.inner.chunk_bytes(index).await {
                    tracing::debug!(index, error = %e, "readahead failed");
                }
            });
        }
    }
}

impl Inner {
    /// The most chunks readahead fetches at once: the configured number,
    /// and no more than a quarter of the cache (none when a chunk is more
    /// than that: what it fetched would not stay).
    fn readahead_limit(&self) -> u64 {
        let quarter = self.cache_room / 4 / self.chunk_size;
        self.opts.readahead_chunks.min(quarter)
    }

    /// The bytes of one piece of a chunk (`None` = zeros), copying no more
    /// than the piece from a dirty buffer; `ranged`: fetching only the
    /// blocks it needs when the chunk has a table. Caller holds the chunk
    /// lock.
    pub(super) async fn piece_bytes(&self, p: Piece, ranged: bool) -> VolumeResult<Option<Bytes>> {
        self.bytes_at(p.index, p.at, p.len, ranged).await
    }

    /// The current bytes of a chunk (`None` = zeros). Caller holds the chunk lock.
    pub(super) async fn chunk_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        self.bytes_at(index, 0, self.chunk_size as usize, false).await
    }

    /// Bytes `[at, at + len)` of chunk `index` (`None` = zeros): a dirty
    /// slot's, or its written pages laid over the stored bytes (which
    /// leaves the slot as it is: it holds only its pages, as the budget
    /// counts it), or the stored bytes. Caller holds the chunk lock.
    async fn bytes_at(&self, index: u64, at: usize, len: usize, ranged: bool) -> VolumeResult<Option<Bytes>> {
        let p = Piece { index, at, len, pos: 0 };
        let mut ranged = ranged;
        loop {
            let over_base = {
                let st = self.lock();
                match st.slots.get(&index) {
                    None => false,
                    Some(s) => match s.data.piece(p, st.log.as_ref()).map_err(|e| st.log_read(e))? {
                        Some(b) => return Ok(b),
                        None => true,
                    },
                }
            };
            if !over_base && ranged {
                if let Some(b) = self.stored_range(index, at, len).await? {
                    return Ok(Some(b));
                }
                ranged = false;
            }
            let base = self.stored_bytes(index).await?;
            if !over_base {
                return Ok(base.map(|b| if at == 0 && len == b.len() { b } else { b.slice(at..at + len) }));
            }
            // The pages as they are now (the fast write path may have
            // added some meanwhile).
            let st = self.lock();
            let log = st.log.as_ref();
            match st.slots.get(&index).map(|s| &s.data) {
                Some(DirtyData::Pages(pb)) => {
                    let v = pb.over(base.as_deref(), at, len, log).map_err(|e| st.log_read(e))?;
                    return Ok(Some(Bytes::from(v)));
                }
                Some(d) => {
                    if let Some(b) = d.piece(p, log).map_err(|e| st.log_read(e))? {
                        return Ok(b);
                    }
                }
                // Committed inline while we fetched: the pages are in the
                // chunk's patch now, which `base` predates. Read again.
                None => {}
            }
        }
    }

    /// The chunk's bytes as staged or committed, ignoring any dirty slot
    /// (`None` = zeros): staged bytes from memory, else from the cache, or
    /// fetched and verified.
    pub(super) async fn stored_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        let mut followed = false;
        loop {
            match self.try_stored_bytes(index).await {
                // A read-only opener's map may refer to a chunk generation
                // that a writer has since replaced and compaction collected:
                // follow the journal to the current state, once per read.
                Err(VolumeError::Corrupt(why))
                    if why.ends_with("is missing") && self.follows_journal() && !followed =>
                {
                    followed = true;
                    self.follow_journal().await?;
                }
                r => return r,
            }
        }
    }

    /// A read-only opener of the live volume (not of a snapshot).
    pub(super) fn follows_journal(&self) -> bool {
        self.opts.read_only && self.opts.snapshot.is_none()
    }

    /// Bring a read-only opener's map up to the journal's head: the
    /// records after ours, or, when compaction folded past our head, the
    /// latest checkpoint and what follows it.
    pub(super) async fn follow_journal(&self) -> VolumeResult<()> {
        let cs = self.chunk_size;
        // One at a time, each from the state the one before left: reads
        // missing chunks at once each follow, and one that started from an
        // older head and ended last put the map back to an older state
        // (older generations read again, or the chunk missing again: EIO).
        let _turn = self.follow_lock.lock().await;
        let mut next = {
            let st = self.lock();
            Replayed {
                map: st.map.clone(),
                patches: st.patches.clone(),
                size: st.size,
                head: st.head,
                epoch: st.epoch,
                ..Replayed::default()
            }
        };
        // The records after our head are the volume's history only while no
        // compaction folded past it: a fenced writer's record may have
        // landed in the hole a fold left (the writer finds out and fails,
        // but the record stays until the next fold). A checkpoint past our
        // head, there after reading them, means a fold may have happened:
        // start from the latest checkpoint instead. (A fold writes its
        // checkpoint before deleting records, and a checkpoint goes only
        // once a newer one is there.)
        let from = next.head;
        let caught = replay::catch_up(self.store.as_ref(), &self.vol, cs, &mut next, true, None).await;
        if caught.is_err() || replay::checkpoint_after(self.store.as_ref(), &self.vol, None, Some(from)).await? {
            next = replay::replay(self.store.as_ref(), &self.vol, cs, None).await?;
        }
        let mut st = self.lock();
        if next.head < st.head {
            return Ok(());
        }
        tracing::debug!(volume = %self.vol, from = st.head, to = next.head, "read-only opener followed the journal");
        for (index, r) in &next.map {
            if st.map.get(index) != Some(r) {
                st.clean.remove(*index);
            }
        }
        let changed: Vec<u64> = st
            .patches
            .keys()
            .chain(next.patches.keys())
            .filter(|i| match (st.patches.get(i), next.patches.get(i)) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                _ => true,
            })
            .copied()
            .collect();
        for index in changed {
            st.clean.remove(index);
        }
        st.patch_bytes = next.patches.values().map(|p| p.bytes()).sum();
        st.patches = next.patches;
        st.map = next.map;
        st.head = next.head;
        st.size = st.size.max(next.size);
        st.committed_size = st.size;
        st.epoch = next.epoch;
        Ok(())
    }

    pub(super) async fn try_stored_bytes(&self, index: u64) -> VolumeResult<Option<Bytes>> {
        // Patches to lay over the stored bytes, nearest first: ours, then
        // each ancestor's down to the one that maps the chunk.
        let mut patches: Vec<Arc<Patch>> = Vec::new();
        let (vol, r, own, own_patch) = {
            let mut st = self.lock();
            if let Some(s) = st.staged.get(&index) {
                return Ok(s.data.clone());
            }
            if let Some(b) = st.clean.get(index) {
                return Ok(Some(b));
            }
            let own_patch = st.patches.get(&index).cloned();
            patches.extend(own_patch.clone());
            match st.map.get(&index) {
                Some(r) => (self.vol.as_str(), *r, Some(*r), own_patch),
                // The nearest ancestor that maps the chunk decides (a ZERO
                // there hides older ancestors' bytes).
                None => {
                    let mut found = None;
                    for p in &self.parents {
                        patches.extend(p.patches.get(&index).cloned());
                        if let Some(r) = p.map.get(&index) {
                            found = Some((p.vol.as_str(), *r));
                            break;
                        }
                    }
                    let (vol, r) = found.unwrap_or((self.vol.as_str(), ChunkRef::Zero));
                    (vol, r, None, own_patch)
                }
            }
        };
        let data = match r {
            ChunkRef::Zero if patches.is_empty() => return Ok(None),
            ChunkRef::Zero => Bytes::from(vec![0u8; self.chunk_size as usize]),
            r @ ChunkRef::Stored { .. } => self.fetch_chunk(vol, index, r).await?,
        };
        let data = if patches.is_empty() {
            data
        } else {
            let mut v = data.to_vec();
            for p in patches.iter().rev() {
                p.apply(&mut v);
            }
            Bytes::from(v)
        };
        let mut st = self.lock();
        // The cache holds a chunk's current bytes: with a dirty slot over
        // them, these are only its base. A chunk staged, remapped or
        // patched while we fetched is not cached either.
        let same_patch = match (st.patches.get(&index), &own_patch) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !st.slots.contains_key(&index)
            && !st.staged.contains_key(&index)
            && st.map.get(&index).copied() == own
            && same_patch
        {
            st.clean.insert(index, data.clone());
        }
        Ok(Some(data))
    }

    /// Fetch a chunk object and check it (its size, checksum or table).
    async fn fetch_chunk(&self, vol: &str, index: u64, r: ChunkRef) -> VolumeResult<Bytes> {
        let ChunkRef::Stored { generation, .. } = r else {
            return Ok(Bytes::from(vec![0u8; self.chunk_size as usize]));
        };
        let key = chunk_key(vol, index, generation);
        let started = Instant::now();
        let data = match self.store.get(&key, None).await {
            Ok(d) => d,
            Err(StoreError::NotFound(_)) => {
                return Err(VolumeError::Corrupt(format!("chunk object {key} is missing")));
            }
            Err(e) => return Err(e.into()),
        };
        let checked = match r {
            // Unpacking a whole chunk takes a while: off the runtime's workers.
            ChunkRef::Stored { layout: Layout::Packed(_), .. } => {
                let cs = self.chunk_size;
                tokio::task::spawn_blocking(move || format::check_chunk(data, r, cs))
                    .await
                    .map_err(|e| VolumeError::Corrupt(format!("unpacking chunk object {key}: {e}")))?
            }
            _ => format::check_chunk(data, r, self.chunk_size),
        };
        let data = checked.map_err(|why| VolumeError::Corrupt(format!("chunk object {key} {why}")))?;
        self.fetch_costs.whole_took(started.elapsed());
        Ok(data)
    }

    /// Bytes `[at, at + len)` of the chunk as stored, from the cache or
    /// fetched as the few blocks that hold them and checked against the
    /// chunk's table (fetched beside them unless cached). `None`: take the
    /// whole chunk instead (it is staged or patched, has no table, or the
    /// blocks are more than half of it; or the ranged fetch failed, which
    /// the whole fetch then reports). Caller holds the chunk lock.
    async fn stored_range(&self, index: u64, at: usize, len: usize) -> VolumeResult<Option<Bytes>> {
        let cs = self.chunk_size;
        let (vol, r, own, table) = {
            let mut st = self.lock();
            if st.staged.contains_key(&index) || st.patches.contains_key(&index) {
                return Ok(None);
            }
            if let Some(b) = st.clean.get_range(index, at, len) {
                return Ok(Some(b));
            }
            let (vol, r, own) = match st.map.get(&index) {
                Some(r) => (self.vol.as_str(), *r, Some(*r)),
                None => {
                    let mut found = None;
                    for p in &self.parents {
                        if p.patches.contains_key(&index) {
                            return Ok(None);
                        }
                        if let Some(r) = p.map.get(&index) {
                            found = Some((p.vol.as_str(), *r));
                            break;
                        }
                    }
                    match found {
                        Some((vol, r)) => (vol, r, None),
                        None => return Ok(None),
                    }
                }
            };
            (vol, r, own, st.clean.table(index, r))
        };
        let ChunkRef::Stored { generation, crc, layout: layout @ (Layout::Table | Layout::Packed(_)) } = r else {
            return Ok(None);
        };
        let vb = format::VERIFY_BLOCK;
        let (first, last) = (at / vb, (at + len - 1) / vb);
        let blocks = (cs as usize).div_ceil(vb);
        if (last - first + 1) * 2 > blocks {
            return Ok(None);
        }
        // Blocks of this chunk cached already and more wanted now: a
        // chunk read at random more than once, likely read again. Where
        // requests cost more than bytes, it comes whole.
        // (Not when the cache cannot keep a whole chunk.)
        if table.is_some() && self.cache_room >= cs && self.fetch_costs.whole_on_second_miss() {
            return Ok(None);
        }
        if let Layout::Packed(codec) = layout {
            return self.packed_range(vol, index, r, own, table, codec, (first, last), (at, len)).await;
        }
        let key = chunk_key(vol, index, generation);
        let (start, end) = (first * vb, ((last + 1) * vb).min(cs as usize));
        let fetch_table = async {
            if let Some(t) = table {
                return Ok(Some(t));
            }
            let bytes = self.store.get(&key, Some(cs..cs + format::table_len(cs))).await?;
            if bytes.len() as u64 != format::table_len(cs) {
                return Ok(None);
            }
            match format::check_table(&bytes, crc, cs) {
                Ok(crcs) => Ok(Some(Arc::new(ChunkTable { r, crcs, stored: Vec::new() }))),
                Err(why) => Err(VolumeError::Corrupt(format!("chunk object {key} {why}"))),
            }
        };
        let started = Instant::now();
        let fetch_data = async { Ok(self.store.get(&key, Some(start as u64..end as u64)).await?) };
        let (table, data): (Option<Arc<ChunkTable>>, Bytes) = match tokio::try_join!(fetch_table, fetch_data) {
            Ok(v) => v,
            // Missing or cut short: the whole fetch says which (and a
            // read-only opener follows the journal there).
            Err(VolumeError::Store(StoreError::NotFound(_) | StoreError::Permanent(_))) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Not the lengths asked for (an object cut short, or a store that
        // answered with more than the range): the whole fetch decides.
        let Some(table) = table.filter(|_| data.len() == end - start) else {
            return Ok(None);
        };
        format::check_blocks(&table.crcs, first, &data)
            .map_err(|why| VolumeError::Corrupt(format!("chunk object {key} {why}")))?;
        self.fetch_costs.ranged_took(started.elapsed());
        self.keep_blocks(index, own, table, start, &data);
        Ok(Some(data.slice(at - start..at - start + len)))
    }

    /// Cache blocks fetched from `start` on, checked against `table`,
    /// unless the chunk changed meanwhile (dirty, staged, patched or
    /// remapped from `own`).
    fn keep_blocks(&self, index: u64, own: Option<ChunkRef>, table: Arc<ChunkTable>, start: usize, data: &Bytes) {
        let mut st = self.lock();
        if !st.slots.contains_key(&index)
            && !st.staged.contains_key(&index)
            && !st.patches.contains_key(&index)
            && st.map.get(&index).copied() == own
        {
            st.clean.insert_blocks(index, table, start, data.clone(), format::VERIFY_BLOCK);
        }
    }
}

impl Inner {
    /// [`Inner::stored_range`] of a packed chunk: its table (from the
    /// cache, else fetched first: where the blocks lie depends on it), then
    /// the stored bytes of blocks `first..=last`, unpacked and checked.
    #[allow(clippy::too_many_arguments)]
    async fn packed_range(
        &self,
        vol: &str,
        index: u64,
        r: ChunkRef,
        own: Option<ChunkRef>,
        table: Option<Arc<ChunkTable>>,
        codec: format::Codec,
        (first, last): (usize, usize),
        (at, len): (usize, usize),
    ) -> VolumeResult<Option<Bytes>> {
        let cs = self.chunk_size;
        let vb = format::VERIFY_BLOCK;
        let ChunkRef::Stored { generation, crc, .. } = r else {
            return Ok(None);
        };
        let key = chunk_key(vol, index, generation);
        let table = match table {
            Some(t) => t,
            None => {
                let tl = format::packed_table_len(cs);
                let bytes = match self.store.get(&key, Some(0..tl)).await {
                    Ok(b) if b.len() as u64 == tl => b,
                    // Missing, cut short, or more than asked: the whole fetch decides.
                    Ok(_) | Err(StoreError::NotFound(_) | StoreError::Permanent(_)) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let t = format::check_packed_table(&bytes, crc, cs)
                    .map_err(|why| VolumeError::Corrupt(format!("chunk object {key} {why}")))?;
                Arc::new(ChunkTable { r, crcs: t.crcs, stored: t.stored })
            }
        };
        if table.stored.len() <= last {
            return Ok(None);
        }
        let (from, to) = (format::packed_offset(&table.stored, first), format::packed_offset(&table.stored, last + 1));
        // Timed from here: the fetch costs compare one request for blocks
        // against one for the whole chunk (the table's came before).
        let started = Instant::now();
        let data = match self.store.get(&key, Some(from..to)).await {
            Ok(b) if b.len() as u64 == to - from => b,
            Ok(_) | Err(StoreError::NotFound(_) | StoreError::Permanent(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let data = format::unpack_blocks(codec, (&table.stored, &table.crcs), cs, first, &data)
            .map_err(|why| VolumeError::Corrupt(format!("chunk object {key} {why}")))?;
        let data = Bytes::from(data);
        self.fetch_costs.ranged_took(started.elapsed());
        let start = first * vb;
        self.keep_blocks(index, own, table, start, &data);
        Ok(Some(data.slice(at - start..at - start + len)))
    }
}

/// Record a read for sequential detection; returns how many chunks of
/// `chunk_size` to fetch ahead: none unless it continues the last read,
/// then twice what was read in a row (none until that is half a chunk),
/// up to `limit`.
fn note_read(st: &mut State, offset: u64, len: u64, limit: u64, chunk_size: u64) -> u64 {
    let sequential = st.last_read_end == offset;
    st.last_read_end = offset + len;
    st.read_in_a_row = match sequential {
        true => st.read_in_a_row.saturating_add(len),
        false => len,
    };
    match sequential {
        true => (st.read_in_a_row.saturating_mul(2) / chunk_size).min(limit),
        false => 0,
    }
}

/// A chunk being fetched ahead, until the task fetching it ends.
struct ReadingAhead<'a> {
    vol: &'a Volume,
    index: u64,
}

impl Drop for ReadingAhead<'_> {
    fn drop(&mut self) {
        self.vol.inner.lock().reading_ahead.remove(&self.index);
    }
}
