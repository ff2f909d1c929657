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
                let closed = st.log.as_mut().and_then(|l| match l.rotate() {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(volume = %inner.vol, log = %l.dir().display(), error = %e, "starting a new write-back log segment failed; the log is trimmed at a later flush");
                        None
                    }
                });
                (st.slots.keys().copied().collect::<Vec<u64>>(), closed)
            };
            stream::iter(dirty.into_iter().map(|i| inner.upload_chunk(i)))
                .buffer_unordered(inner.opts.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            inner.commit().await?;
            if let Some(n) = closed
                && let Some(l) = inner.lock().log.as_mut()
            {
                l.release(n);
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

    /// A record of ours is the journal's head now.
    pub(super) fn apply_commit(&self, rec: &JournalRecord, bytes: Bytes) {
        let mut st = self.lock();
        for (index, r) in &rec.chunks {
            if st.staged.get(index).is_some_and(|s| s.r == *r)
                && let Some(s) = st.staged.remove(index)
                && let (Some(d), false) = (s.data, st.slots.contains_key(index))
            {
                st.clean.insert(*index, d);
            }
            st.map.insert(*index, *r);
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
            self.restage(self.opts.restage_after).await?;
            let mut st = self.lock();
            if st.staged.is_empty() && st.size == st.committed_size {
                return Ok(());
            }
            let record = JournalRecord {
                kind: RecordKind::Commit,
                seq: st.head + 1,
                epoch: st.epoch,
                size: st.size,
                writer: self.writer,
                created_unix: self.opts.clock.now_unix(),
                chunks: st.staged.iter().map(|(i, s)| (*i, s.r)).collect(),
                inline: Vec::new(),
            };
            // Only chunk objects age: a ZERO entry refers to nothing
            // compaction could collect.
            let clock = self.opts.clock.as_ref();
            let oldest = st
                .staged
                .values()
                .filter(|s| matches!(s.r, ChunkRef::Stored { .. }))
                .map(|s| s.at)
                .max_by_key(|at| at.age(clock))
                .unwrap_or_else(|| Stamp::now(clock));
            // Noted before it is sent: if this future is dropped mid-PUT,
            // the next commit finds out whether it landed.
            st.pending = Some(Pending { bytes: Bytes::from(record.encode()), record, oldest, sent: false });
        }
        Err(VolumeError::Store(StoreError::Transient("the journal kept moving under this commit; try again".into())))
    }

    /// Send a pending record, or find out where one sent before stands. Ok
    /// when it, or an earlier abandoned record of ours, is now proven the
    /// journal's head, or when it was abandoned (not there, or too old to
    /// send): nothing is pending any more either way.
    pub(super) async fn settle(&self, p: Pending) -> VolumeResult<()> {
        let seq = p.record.seq;
        let (prev, earlier, epoch) = {
            let st = self.lock();
            (st.head_bytes.clone(), st.abandoned.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(), st.epoch)
        };
        let landed = if p.sent {
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
                pending.sent = true;
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
        let (record, bytes) = match landed {
            Appended::Ours => (p.record.clone(), p.bytes.clone()),
            Appended::Earlier(i) => {
                let (b, r) = self.lock().abandoned[i].clone();
                tracing::warn!(volume = %self.vol, seq, "a commit given up on landed after all; committing again after it");
                (r, b)
            }
            Appended::Taken(why) => return Err(self.fence(why)),
        };
        if !self.meta.single_writer {
            match journal::prove_successor(self.store.as_ref(), &self.vol, seq, prev.as_ref(), epoch).await? {
                Ok(()) => {}
                Err(why) => return Err(self.fence(why)),
            }
        }
        // When an abandoned record landed instead of `p`, `p` is dropped
        // here too: what it carried is still staged and goes in the next.
        self.apply_commit(&record, bytes);
        self.metrics.commits.inc();
        tracing::debug!(volume = %self.vol, seq, chunks = record.chunks.len(), "committed");
        self.maybe_checkpoint();
        Ok(())
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
            st.abandoned.push((p.bytes, p.record));
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
            Checkpoint { seq: st.head, epoch: st.epoch, size: st.committed_size, map: st.map.clone() }
        };
        let store = self.store.clone();
        let key = checkpoint_key(&self.vol, cp.seq);
        let vol = self.vol.clone();
        tokio::spawn(async move {
            match store.put(&key, Bytes::from(cp.encode()), PutMode::IfAbsent).await {
                // Compaction may have written the same seq: the same map.
                Ok(()) | Err(StoreError::PreconditionFailed(_)) => {
                    tracing::debug!(volume = %vol, seq = cp.seq, "writer checkpoint written")
                }
                Err(e) => tracing::warn!(volume = %vol, seq = cp.seq, error = %e, "writer checkpoint failed"),
            }
        });
    }
}
