//! Flush and commit: settling pending journal records, the fencing proof,
//! the commit deadline, writer checkpoints.

use super::*;

impl Volume {
    /// Make every write acknowledged before this call durable: upload dirty
    /// chunks, then commit one journal record. Returns only when the record
    /// is on the store and proven ours. Safe to cancel at any await.
    pub async fn flush(&self) -> VolumeResult<()> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Ok(());
        }
        // Timed from the call, waiting for another flush included: what
        // the caller (an fsync) waits for, whatever the outcome.
        let started = Instant::now();
        let r = async {
            let _f = inner.flush_lock.lock().await;
            inner.check_writable()?;
            // The log's segments so far hold only writes already visible in
            // memory (both happen under the state lock): once this flush
            // committed, they hold nothing uncommitted.
            let (dirty, closed) = {
                let mut st = inner.lock();
                let closed = st.log.as_mut().map(|l| match l.rotate() {
                    Ok(n) => (Some(n), None),
                    // The disk full, say: the segments closed before this
                    // flush still go once it committed, and the current
                    // one is emptied then if nothing was appended to it
                    // meanwhile (what frees the disk).
                    Err(e) => {
                        tracing::warn!(volume = %inner.vol, log = %l.dir().display(), error = %e, "starting a new write-back log segment failed; the committed entries of the current one are cut off after the flush instead");
                        (l.last_closed(), Some(l.position()))
                    }
                });
                // Chunks with a few dirty pages go inside the record;
                // the others are uploaded whole.
                let inline = inner.choose_inline(&st, st.slots.keys().copied());
                let rounds = inner.upload_rounds(st.slots.iter().filter(|(i, _)| !inline.contains(i)));
                st.inline_next.extend(inline);
                (rounds, closed)
            };
            for round in dirty {
                inner.upload_round(round).await?;
            }
            // Chunks it chose inline whose pages, written meanwhile, no
            // longer fit: they go up whole, in more records (chunks of
            // pages a few at a time, as above).
            // Committed even when their slots are gone: an upload that
            // took one may have staged it since the last record.
            let deferred = {
                let mut st = inner.lock();
                let deferred = std::mem::take(&mut st.inline_deferred);
                (!deferred.is_empty())
                    .then(|| inner.upload_rounds(deferred.iter().filter_map(|i| st.slots.get_key_value(i))))
            };
            for round in deferred.into_iter().flatten() {
                inner.upload_round(round).await?;
            }
            let (closed, current) = closed.unwrap_or((None, None));
            if let Some(n) = closed {
                inner.release_log(n);
            }
            if let Some((seg, len)) = current {
                inner.empty_log_segment(seg, len);
            }
            Ok(())
        }
        .await;
        inner.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        r
    }

    /// Grow the volume and commit the new size. Shrinking is refused.
    pub async fn resize(&self, new_size: u64) -> VolumeResult<()> {
        self.inner.check_writable()?;
        format::check_size(new_size).map_err(VolumeError::InvalidArgument)?;
        {
            let mut st = self.inner.lock();
            if new_size < st.size {
                return Err(VolumeError::InvalidArgument(format!(
                    "shrinking from {} to {new_size} bytes is not supported",
                    st.size
                )));
            }
            // Logged first: a size the log does not know would make the
            // writes past the old end unreplayable.
            st.log(log::Record::Size(new_size))?;
            st.size = new_size;
        }
        self.flush().await
    }

    /// Commit background uploads (and settle pending records) within
    /// `commit_interval`, flush or not. The task holds no strong reference:
    /// a closed volume stops it.
    pub(super) fn start_committer(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.opts.commit_interval;
        let log_full = self.inner.lock().log_full.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = tokio::time::sleep(interval) => {}
                    () = log_full.notified() => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let full = {
                    let st = inner.lock();
                    st.fenced.is_none() && st.log.as_ref().is_some_and(|l| l.bytes() > st.log_limit)
                };
                if full {
                    // Only a flush empties the log.
                    if let Err(e) = (Volume { inner: inner.clone() }).flush().await {
                        tracing::warn!(volume = %inner.vol, error = %e, "flushing a full write-back log failed; will retry");
                        inner.lock().log_flush_error = Some(e);
                        drop(inner);
                        // Not again at once, however many writes ask.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
                if let Err(e) = inner.fold_patches().await {
                    tracing::warn!(volume = %inner.vol, error = %e, "folding patched chunks failed; will retry");
                }
                let due = {
                    let st = inner.lock();
                    st.fenced.is_none() && (!st.staged.is_empty() || st.pending.is_some())
                };
                if !due {
                    continue;
                }
                let _f = inner.flush_lock.lock().await;
                if let Err(e) = inner.commit().await {
                    tracing::warn!(volume = %inner.vol, error = %e, "committing background uploads failed; will retry");
                }
            }
        });
    }
}

impl Inner {
    pub(super) fn fence(&self, why: String) -> VolumeError {
        tracing::error!(volume = %self.vol, reason = %why, "writer fenced");
        self.metrics.fenced.inc();
        let log = {
            let mut st = self.lock();
            st.fenced = Some(why.clone());
            st.log.take()
        };
        // Another writer owns the volume now: what this one acknowledged
        // and did not commit must never be applied anywhere.
        if let Some(l) = log {
            l.discard();
        }
        VolumeError::Fenced(why)
    }

    /// Delete the log's segments up to `n` (a flush committed every write
    /// they hold). Pages of chunks written again while the flush ran may
    /// still be dirty with their bytes only there: they come into memory
    /// first (past the dirty limit if need be); when one cannot be read,
    /// the segments stay, and a later flush tries again.
    fn release_log(&self, n: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if self.load_logged(st, n)
            && let Some(l) = st.log.as_mut()
        {
            l.release(n);
        }
    }

    /// A flush whose new segment could not be started committed the
    /// current one's entries up to `len`: emptied, when nothing was
    /// appended to it since (pages of chunks written again meanwhile are
    /// brought into memory first).
    fn empty_log_segment(&self, seg: u64, len: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.log.as_ref().is_none_or(|l| l.position() != (seg, len)) || !self.load_logged(st, seg) {
            return;
        }
        if let Some(l) = st.log.as_mut()
            && let Err(e) = l.empty_current(seg, len)
        {
            tracing::warn!(volume = %self.vol, log = %l.dir().display(), error = %e, "emptying a committed write-back log segment failed");
        }
    }

    /// Bring into memory the dirty pages whose only copy is in log
    /// segments up to `n`. False when one could not be read (the segments
    /// then stay).
    fn load_logged(&self, st: &mut State, n: u64) -> bool {
        for (index, slot) in st.slots.iter_mut() {
            let (more, r) = slot.data.load_logged(n, st.log.as_ref());
            // The pages brought in are counted, whether all came or not.
            if let (true, Some(d)) = (more > 0, &self.dirty) {
                slot.grow(d.overdraft(more));
            }
            if let Err(e) = r {
                tracing::warn!(volume = %self.vol, index, error = %e, "reading dirty pages back from the write-back log failed; its segments stay");
                return false;
            }
        }
        true
    }

    /// Dirty chunks in upload rounds, each committed before the next:
    /// chunks held whole go up at once (in the first); chunks of pages are
    /// merged with their stored bytes for the upload, which takes a whole
    /// chunk of memory each, so they go up [`Inner::merge_round`] at a
    /// time, each round giving that memory back before the next. Always
    /// one round at least.
    fn upload_rounds<'a>(&self, slots: impl Iterator<Item = (&'a u64, &'a Slot)>) -> Vec<Vec<u64>> {
        let (mut whole, mut pages) = (Vec::new(), Vec::new());
        for (i, s) in slots {
            match s.data {
                DirtyData::Pages(_) => pages.push(*i),
                _ => whole.push(*i),
            }
        }
        let mut rounds: Vec<Vec<u64>> = pages.chunks(self.merge_round()).map(<[u64]>::to_vec).collect();
        match rounds.first_mut() {
            Some(r) => r.append(&mut whole),
            None => rounds.push(whole),
        }
        rounds
    }

    /// Upload a round of dirty chunks and commit. Caller holds the flush
    /// lock.
    async fn upload_round(&self, round: Vec<u64>) -> VolumeResult<()> {
        self.commit_staged_first().await?;
        stream::iter(round.into_iter().map(|i| self.upload_chunk(i)))
            .buffer_unordered(self.opts.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        self.commit().await
    }

    /// Chunks uploaded by rounds whose commit failed stay staged, each
    /// holding a whole chunk of memory (past the budget when it merged
    /// pages): with a round's worth of them, commit them before merging
    /// more, so that retried flushes or uploads cannot pile them up while
    /// the journal refuses records. Caller holds the flush lock.
    pub(super) async fn commit_staged_first(&self) -> VolumeResult<()> {
        if self.lock().staged.len() >= self.merge_round() {
            self.commit().await?;
        }
        Ok(())
    }

    /// How many chunks of pages a flush merges and uploads before it
    /// commits them: each holds a whole chunk of memory meanwhile, past
    /// the dirty limit if need be, so a round is also at most half of the
    /// volume's share of that limit (at least two chunks).
    pub(super) fn merge_round(&self) -> usize {
        let share = self.dirty.as_ref().map_or(u64::MAX, |d| d.fair_share() / self.chunk_size / 2);
        (self.opts.concurrency * 2).max(4).min(usize::try_from(share).unwrap_or(usize::MAX)).max(2)
    }

    /// The dirty chunks a flush sends inline: few touched pages, within
    /// the chunk's patch cap (a quarter of the chunk), the record's inline
    /// cap and the volume's patch limit. The rest are uploaded whole,
    /// which also folds their patches.
    pub(super) fn choose_inline(&self, st: &State, candidates: impl Iterator<Item = u64>) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if self.opts.patch_limit == 0 {
            return out;
        }
        let mut used = (0, st.patch_bytes);
        for index in candidates {
            if let Some(slot) = st.slots.get(&index)
                && self.take_inline_room(st, index, slot, &mut used)
            {
                out.insert(index);
            }
        }
        out
    }

    /// Whether chunk `index`'s touched pages fit in a record already
    /// carrying `used.0` inline bytes, with the volume's patches at
    /// `used.1`: within the chunk's patch cap (a quarter of the chunk), the
    /// record's cap and the patch limit. When they fit, they are counted in.
    fn take_inline_room(&self, st: &State, index: u64, slot: &Slot, used: &mut (u64, u64)) -> bool {
        let new = slot.touched_pages() * PAGE as u64;
        let had = st.patches.get(&index).map_or(0, |p| p.bytes());
        let fits = had + new <= self.chunk_size / 4
            && used.0 + new <= RECORD_INLINE_MAX
            && used.1 + new <= self.opts.patch_limit;
        if fits {
            used.0 += new;
            used.1 += new;
        }
        fits
    }

    /// A record of ours is the journal's head now. `inline_versions`: the
    /// slots whose pages it carries, at the versions it read (empty when
    /// the record is not the one built last); `built`: the tick at which
    /// it was built.
    pub(super) fn apply_commit(&self, rec: &JournalRecord, bytes: Bytes, inline_versions: &[(u64, u64)], built: u64) {
        let mut st = self.lock();
        for (index, r) in &rec.chunks {
            if st.adopted.get(index).is_some_and(|a| a.r == *r) {
                st.adopted.remove(index);
            }
            if st.staged.get(index).is_some_and(|s| s.r == *r)
                && let Some(s) = st.staged.remove(index)
                && let (Some(d), false) = (s.data, st.slots.contains_key(index))
            {
                st.clean.insert(*index, d);
            }
            st.map.insert(*index, *r);
            // Stored whole: its earlier pages are in the new bytes.
            if let Some(p) = st.patches.remove(index) {
                st.patch_bytes -= p.bytes();
            }
        }
        // Then the pages, as replay lays them (after the chunk entries).
        // This record's pages by chunk.
        let mut patched: BTreeMap<u64, Patch> = BTreeMap::new();
        for w in &rec.inline {
            let index = w.offset / self.chunk_size;
            let page = ((w.offset % self.chunk_size) / PAGE as u64) as u32;
            let patch = st.patches.entry(index).or_default();
            let before = patch.bytes();
            Arc::make_mut(patch).pages.insert(page, w.data.clone());
            let after = patch.bytes();
            st.patch_bytes += after - before;
            patched.entry(index).or_default().pages.insert(page, w.data.clone());
        }
        for index in patched.keys() {
            // A cached copy predates the pages.
            st.clean.remove(*index);
        }
        // A chunk uploaded from bytes read before this record was built,
        // and not named by it (staged after it was built, or still in
        // flight), holds older bytes than its pages: named by a later
        // record as it is, it would take them back. Its bytes get the
        // pages; a staged one goes up again before a record names it.
        for (index, laid) in patched {
            if let Some(r) = st.reading.get_mut(&index).filter(|r| r.read < built) {
                r.laid.pages.extend(laid.pages.iter().map(|(p, d)| (*p, d.clone())));
            }
            if let Some(s) = st.staged.get_mut(&index).filter(|s| s.read < built)
                && let Some(data) = upload::lay_pages(s.data.as_ref(), &laid, self.chunk_size)
            {
                // Zeros need no object.
                s.stale = data.is_some();
                if data.is_none() {
                    s.r = ChunkRef::Zero;
                }
                // Bytes where there were none (a chunk staged as zeros)
                // are counted too.
                s.permit = self.staged_permit(s.permit.take(), data.as_ref());
                s.data = data;
            }
        }
        for (index, version) in inline_versions {
            if st.slots.get(index).is_none_or(|s| s.version != *version) {
                // Written again meanwhile: still dirty (its pages go again).
                continue;
            }
            // A chunk staged since the record was built (an upload that
            // read the slot before its last write ended meanwhile) holds
            // no more than the record: read instead of the pages, or named
            // by the next record, it would take them back.
            st.staged.remove(index);
            if let Some(slot) = st.slots.remove(index)
                && let DirtyData::Data(v) = slot.data
            {
                // Its bytes are the chunk's committed bytes now.
                let v = Arc::try_unwrap(v).unwrap_or_else(|shared| shared.as_ref().clone());
                st.clean.insert(*index, Bytes::from(v));
            }
        }
        st.head = rec.seq;
        st.head_bytes = Some(bytes);
        st.committed_size = rec.size;
        st.pending = None;
        st.abandoned.clear();
    }

    /// Commit every staged chunk (and a grown size) in the next journal
    /// record; first settle a pending record from an earlier attempt.
    pub(super) async fn commit(&self) -> VolumeResult<()> {
        for _ in 0..8 {
            let pending = self.lock().pending.clone();
            if let Some(p) = pending {
                self.settle(p).await?;
                continue;
            }
            // Uploads that were in flight when a record landed stage stale
            // chunks as they end, each going up again here: few (one per
            // upload in flight then; no record lands meanwhile), so this
            // ends, and costs none of the attempts below.
            let mut st = loop {
                self.restage(self.opts.restage_after).await?;
                let st = self.lock();
                if !st.staged.values().any(|s| s.stale) {
                    break st;
                }
            };
            // The pages of the chunks this flush sends inline, as they are
            // now: within the limits `choose_inline` kept to, which pages
            // written since may have pushed them past.
            let mut inline = Vec::new();
            let mut inline_versions = Vec::new();
            let mut deferred = Vec::new();
            let mut used = (0, st.patch_bytes);
            for index in &st.inline_next {
                let Some(slot) = st.slots.get(index) else { continue };
                if !self.take_inline_room(&st, *index, slot, &mut used) {
                    deferred.push(*index);
                    continue;
                }
                inline_versions.push((*index, slot.version));
                // Zero pages over a chunk that is all zeros go nowhere;
                // an upload in flight gets the record's pages when it
                // lands, so they all go then.
                let zero_below = !st.staged.contains_key(index)
                    && !st.reading.contains_key(index)
                    && !st.patches.contains_key(index)
                    && match st.map.get(index) {
                        Some(ChunkRef::Zero) => true,
                        Some(ChunkRef::Stored { .. }) => false,
                        None => self.parents.is_empty(),
                    };
                for page in slot.touched() {
                    let Some(data) = slot.data.page(page, st.log.as_ref()).map_err(|e| st.log_read(e))? else {
                        return Err(VolumeError::Corrupt(format!("chunk {index}: a written page is not in memory")));
                    };
                    if data.is_none() && zero_below {
                        continue;
                    }
                    let offset = index * self.chunk_size + (page * PAGE) as u64;
                    inline.push(InlineWrite { offset, data });
                }
            }
            // Each chunk chosen is now carried, left out, or clean: a
            // record that does not land hands its chunks back (`abandon`,
            // and `settle` when an earlier record landed instead). Taken
            // here, not when the record lands: a record sent by an earlier
            // flush must not take a later flush's choice with it.
            st.inline_next.clear();
            st.inline_deferred.extend(deferred);
            // Copies of parents' chunks whose chunk is still the parent's
            // alone, and young enough to be named.
            let chunks_now = st.size.div_ceil(self.chunk_size);
            let restage_after = self.opts.restage_after;
            let clock = self.opts.clock.as_ref();
            let adopted = std::mem::take(&mut st.adopted);
            st.adopted = adopted
                .into_iter()
                .filter(|(i, a)| {
                    *i < chunks_now
                        && !st.slots.contains_key(i)
                        && !st.staged.contains_key(i)
                        && !st.reading.contains_key(i)
                        && !st.patches.contains_key(i)
                        && !st.map.contains_key(i)
                        && a.at.age(clock) < restage_after
                })
                .collect();
            // A chunk whose pages were all zeros over zeros adds nothing,
            // but the flush covering its writes still commits a record: the
            // append is what proves this writer was not fenced meanwhile.
            // Once it lands, the chunk is clean.
            if st.staged.is_empty()
                && st.adopted.is_empty()
                && inline.is_empty()
                && inline_versions.is_empty()
                && st.size == st.committed_size
            {
                return Ok(());
            }
            let record = JournalRecord {
                kind: RecordKind::Commit,
                seq: st.head + 1,
                epoch: st.epoch,
                size: st.size,
                writer: self.writer,
                created_unix: self.opts.clock.now_unix(),
                chunks: st
                    .staged
                    .iter()
                    .map(|(i, s)| (*i, s.r))
                    .chain(st.adopted.iter().map(|(i, a)| (*i, a.r)))
                    .collect(),
                inline,
            };
            // Only chunk objects age: a ZERO entry refers to nothing
            // compaction could collect.
            let oldest = st
                .staged
                .values()
                .filter(|s| matches!(s.r, ChunkRef::Stored { .. }))
                .map(|s| s.at)
                .chain(st.adopted.values().map(|a| a.at))
                .max_by_key(|at| at.age(clock))
                .unwrap_or_else(|| Stamp::now(clock));
            // Noted before it is sent: if this future is dropped mid-PUT,
            // the next commit finds out whether it landed.
            st.pending = Some(Pending {
                bytes: Bytes::from(record.encode()),
                record,
                oldest,
                sent: None,
                inline_versions,
                built: st.tick,
            });
        }
        Err(VolumeError::Store(StoreError::Transient("the journal kept moving under this commit; try again".into())))
    }

    /// Send a pending record, or find out where one sent before stands. Ok
    /// when it, or an earlier abandoned record of ours, is now proven the
    /// journal's head, or when it was abandoned (not there, or too old to
    /// send): nothing is pending any more either way.
    pub(super) async fn settle(&self, p: Pending) -> VolumeResult<()> {
        let seq = p.record.seq;
        let (prev, earlier, mut twins) = {
            let st = self.lock();
            let twins: Vec<(usize, JournalRecord)> = st
                .abandoned
                .iter()
                .enumerate()
                .filter(|(_, (_, r, _))| r.seq == seq)
                .map(|(i, (_, r, _))| (i, r.clone()))
                .collect();
            (st.head_bytes.clone(), st.abandoned.iter().map(|(b, _, _)| b.clone()).collect::<Vec<_>>(), twins)
        };
        let clock = self.opts.clock.as_ref();
        let first_sent = p.sent.unwrap_or_else(|| Stamp::now(clock));
        let landed = if p.sent.is_some() {
            // Sent before with no clear answer: read back what is there.
            match journal::read_back(self.store.as_ref(), &self.vol, seq, &p.bytes, &earlier).await? {
                Some(a) => a,
                None => return self.abandon(p).await,
            }
        } else {
            let left = self.opts.commit_deadline.saturating_sub(p.oldest.age(self.opts.clock.as_ref()));
            if left.is_zero() {
                // Its chunks are too old to be named (an earlier attempt at
                // committing them failed long ago): upload them again.
                return self.abandon(p).await;
            }
            if let Some(pending) = self.lock().pending.as_mut() {
                pending.sent = Some(first_sent);
            }
            let sent = journal::append(self.store.as_ref(), &self.vol, seq, &p.bytes, &earlier);
            match tokio::time::timeout(left, sent).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    self.abandon(p).await?;
                    return Err(VolumeError::Store(StoreError::Transient(format!(
                        "the commit did not land within {:?}; its chunks were uploaded again, try again",
                        self.opts.commit_deadline
                    ))));
                }
            }
        };
        let (record, bytes, versions, built, sent) = match landed {
            Appended::Ours => (p.record.clone(), p.bytes.clone(), p.inline_versions.clone(), p.built, Some(first_sent)),
            Appended::Earlier(i) => {
                twins.retain(|(t, _)| *t != i);
                let (b, r, built) = self.lock().abandoned[i].clone();
                tracing::warn!(volume = %self.vol, seq, "a commit given up on landed after all; committing again after it");
                // Its pages were read from slots that stay dirty: they go
                // again in the next record, with those `p` carried.
                self.lock().inline_next.extend(p.inline_versions.iter().map(|(i, _)| *i));
                (r, b, Vec::new(), built, None)
            }
            Appended::Taken(why) => return Err(self.fence(why)),
        };
        // The fencing proof. Our record is at `seq` now; it could have
        // landed in a hole compaction left only if another writer's record
        // had been there and been folded away. Such a record was created
        // after the one below ours was (its writer read it first), so no
        // earlier than we sent that one; compaction folds nothing younger
        // than its safety age, on the store's clock. So when less than
        // `PROOF_WINDOW` (well inside the shortest safety age allowed
        // beside a live writer) has passed since we sent the record below,
        // on our monotonic clock and on the wall clock alike, no such hole
        // can have existed when ours landed, before now: the append itself
        // is the proof. Otherwise the record below must still be ours.
        let recent = self.lock().head_sent.is_some_and(|s| s.age(clock) < self.proof_window());
        if !self.meta.single_writer && !recent {
            let twins: Vec<JournalRecord> = twins.into_iter().map(|(_, r)| r).collect();
            let vouch = journal::Vouch { record: &record, twins: &twins, chunk_size: self.meta.chunk_size as u64 };
            match journal::prove_successor(self.store.as_ref(), &self.vol, seq, prev.as_ref(), Some(vouch)).await? {
                Ok(()) => {}
                Err(why) => return Err(self.fence(why)),
            }
        }
        // When an abandoned record landed instead of `p`, `p` is dropped
        // here too: what it carried is still staged and goes in the next.
        self.apply_commit(&record, bytes, &versions, built);
        // When this record was first sent (unknown for an abandoned one).
        self.lock().head_sent = sent;
        self.metrics.commits.inc();
        tracing::debug!(volume = %self.vol, seq, chunks = record.chunks.len(), pages = record.inline.len(), "committed");
        self.maybe_checkpoint();
        Ok(())
    }

    /// How recently the record below a new one must have been sent for the
    /// append alone to prove the new one ours: the commit deadline, and
    /// at most half the shortest safety age compaction allows beside a
    /// live writer.
    pub(super) fn proof_window(&self) -> Duration {
        self.opts.commit_deadline.min(super::super::compact::MIN_LIVE_SAFETY_AGE / 2)
    }

    /// Give up on a pending record that did not land in time: it may still
    /// land (then it is recognised as ours), but its chunks go up again
    /// under fresh names and the next commit refers to those.
    pub(super) async fn abandon(&self, p: Pending) -> VolumeResult<()> {
        tracing::warn!(
            volume = %self.vol,
            seq = p.record.seq,
            deadline = ?self.opts.commit_deadline,
            "journal record did not land in time; its chunks will be uploaded again"
        );
        {
            let mut st = self.lock();
            st.pending = None;
            // The chunks whose pages it carried go in the next record.
            st.inline_next.extend(p.inline_versions.iter().map(|(i, _)| *i));
            st.abandoned.push((p.bytes, p.record, p.built));
            // Copies it named are too old to be named again: copied anew.
            st.adopted.clear();
        }
        self.restage(Duration::ZERO).await
    }

    /// Write a checkpoint at the head now and then, so that opening the
    /// volume replays few records whatever the flush rate.
    pub(super) fn maybe_checkpoint(&self) {
        let cp = {
            let mut st = self.lock();
            if st.head.saturating_sub(st.checkpoint_seq) < checkpoint_every(st.map.len()) {
                return;
            }
            st.checkpoint_seq = st.head;
            Checkpoint {
                seq: st.head,
                epoch: st.epoch,
                size: st.committed_size,
                map: st.map.clone(),
                patches: st.patches.clone(),
            }
        };
        let store = self.store.clone();
        let vol = self.vol.clone();
        tokio::spawn(async move {
            // Compaction may have written the same seq: the same map.
            match crate::volume::replay::write_checkpoint(store.as_ref(), &vol, &cp).await {
                Ok(_) => tracing::debug!(volume = %vol, seq = cp.seq, "writer checkpoint written"),
                Err(e) => tracing::warn!(volume = %vol, seq = cp.seq, error = %e, "writer checkpoint failed"),
            }
        });
    }
}
