//! Rebuilding a volume's chunk map from its latest checkpoint and the
//! journal records after it.

use bytes::Bytes;

use super::format::{
    self, Checkpoint, ChunkMap, JournalRecord, Patches, RecordKind, checkpoint_prefix, journal_key, journal_prefix,
    parse_checkpoint_key, parse_journal_key,
};
use super::{VolumeError, VolumeResult};
use crate::store::{ListRequest, ObjectStore, StoreError};

/// The state a replay arrives at.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    pub map: ChunkMap,
    /// Pages laid over the map's chunks by inline writes (format 2).
    pub patches: Patches,
    pub size: u64,
    /// Seq of the last record applied.
    pub head: u64,
    /// Epoch of the newest writer (seq of its Open record).
    pub epoch: u64,
    /// Records ignored because a newer writer had already opened (see fsck).
    pub stale_records: Vec<u64>,
    /// Seq of the checkpoint the replay started from, if any.
    pub checkpoint: Option<u64>,
    pub records_replayed: u64,
    /// The bytes of the record at `head`, when the replay read it (not
    /// when the head is a checkpoint's): a writer's fencing proof compares
    /// the record below its first append with these.
    pub head_bytes: Option<Bytes>,
}

impl Replayed {
    /// Apply one record; its seq must follow the head.
    pub fn apply(&mut self, rec: &JournalRecord, chunk_size: u64) -> VolumeResult<()> {
        match rec.kind {
            RecordKind::Create => {
                if rec.seq != 0 {
                    return Err(VolumeError::Corrupt(format!("create record at seq {}", rec.seq)));
                }
            }
            RecordKind::Open => {
                if rec.epoch != rec.seq {
                    return Err(VolumeError::Corrupt(format!("open record {} has epoch {}", rec.seq, rec.epoch)));
                }
                self.epoch = rec.epoch;
            }
            RecordKind::Commit => {
                if rec.epoch != self.epoch {
                    // Only possible when a fenced writer's record slipped into
                    // a seq that compaction had already folded and deleted: the
                    // writer itself notices and reports failure, readers skip it.
                    self.stale_records.push(rec.seq);
                    self.head = rec.seq;
                    return Ok(());
                }
            }
        }
        if rec.size < self.size && rec.kind != RecordKind::Create {
            return Err(VolumeError::Corrupt(format!("record {} shrinks the volume", rec.seq)));
        }
        self.size = rec.size;
        let chunks = rec.size.div_ceil(chunk_size);
        for (index, r) in &rec.chunks {
            if *index >= chunks {
                return Err(VolumeError::Corrupt(format!("record {} maps chunk {index} past the end", rec.seq)));
            }
            self.map.insert(*index, *r);
            // Stored whole again: earlier pages are in the new bytes.
            self.patches.remove(index);
        }
        let bs = format::BLOCK_SIZE as u64;
        for w in &rec.inline {
            if w.offset.checked_add(bs).is_none_or(|end| end > rec.size) {
                return Err(VolumeError::Corrupt(format!("record {} writes inline past the end", rec.seq)));
            }
            let index = w.offset / chunk_size;
            let page = ((w.offset % chunk_size) / bs) as u32;
            let patch = self.patches.entry(index).or_default();
            std::sync::Arc::make_mut(patch).pages.insert(page, w.data.clone());
        }
        self.head = rec.seq;
        self.records_replayed += 1;
        Ok(())
    }
}

async fn latest_checkpoint(store: &dyn ObjectStore, vol: &str, upto: Option<u64>) -> VolumeResult<Option<Checkpoint>> {
    let prefix = checkpoint_prefix(vol);
    let all = crate::store::list_all(store, &prefix).await?;
    let best = all
        .iter()
        .filter_map(|o| parse_checkpoint_key(vol, &o.key).map(|s| (s, &o.key)))
        .filter(|(s, _)| upto.is_none_or(|u| *s <= u))
        .max_by_key(|(s, _)| *s);
    let Some((seq, _)) = best else {
        return Ok(None);
    };
    match read_checkpoint(store, vol, seq).await {
        // A part gone beside its manifest while a newer checkpoint (not
        // past `upto`) is there: a compaction folded past this one and
        // removed it, and a late PUT of its manifest landed again. The
        // caller lists again and starts from the newer one.
        Err(VolumeError::Corrupt(why))
            if why.ends_with("which is missing") && checkpoint_after(store, vol, upto, Some(seq)).await? =>
        {
            Err(VolumeError::Store(StoreError::NotFound(format::checkpoint_key(vol, seq))))
        }
        r => Ok(Some(r?)),
    }
}

/// Fetch and decode the checkpoint at `seq`: a whole one, or a split one's
/// manifest and then its parts, side by side. The manifest gone, or a part
/// gone with it, is the store's NotFound (a compaction removed the
/// checkpoint meanwhile: the caller lists again); a part gone while its
/// manifest is still there is damage.
pub async fn read_checkpoint(store: &dyn ObjectStore, vol: &str, seq: u64) -> VolumeResult<Checkpoint> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    let key = format::checkpoint_key(vol, seq);
    let bytes = store.get(&key, None).await?;
    let stored = format::StoredCheckpoint::decode(&bytes, &key)?;
    if stored.seq() != seq {
        return Err(VolumeError::Corrupt(format!("{key} holds seq {}", stored.seq())));
    }
    let split = match stored {
        format::StoredCheckpoint::Whole(cp) => return Ok(cp),
        format::StoredCheckpoint::Split(s) => s,
    };
    let mut cp = split.assembly();
    let mut parts = stream::iter(0..split.parts.len())
        .map(|n| {
            let key = split.part_key(vol, n);
            async move { store.get(&key, None).await.map(|b| (n, key, b)) }
        })
        .buffered(REPLAY_FETCHES);
    loop {
        match parts.try_next().await {
            Ok(Some((n, part, b))) => split.decode_part(n, &b, &part, &mut cp)?,
            Ok(None) => break,
            // Compaction removes a checkpoint's manifest before its parts:
            // a part gone while the manifest read is still there is
            // damage. Another manifest there now (a slower compactor's,
            // landing after this checkpoint was removed) is not.
            Err(StoreError::NotFound(part)) => {
                return match store.get(&key, None).await {
                    Ok(now) if now == bytes => {
                        Err(VolumeError::Corrupt(format!("{key} names the part {part}, which is missing")))
                    }
                    Ok(_) | Err(StoreError::NotFound(_)) => Err(StoreError::NotFound(part).into()),
                    Err(e) => Err(e.into()),
                };
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(cp.finish(&key)?)
}

/// Store `cp` at `checkpoints/<seq>` unless a checkpoint is there already
/// (then it holds the same map: the state at a seq is the state at that
/// seq). A split one's parts go first, under a name of this call's own,
/// and its manifest last. When the manifest certainly did not land (the
/// parts failed, or another manifest is there) the parts are taken back;
/// when that is not known they stay (compaction collects parts no manifest
/// names once its fold point passes them). Returns whether this call's
/// checkpoint landed.
pub async fn write_checkpoint(store: &dyn ObjectStore, vol: &str, cp: &Checkpoint) -> VolumeResult<bool> {
    use crate::store::PutMode;
    use futures::stream::{self, StreamExt, TryStreamExt};
    let tag = rand::random::<u64>();
    let (head, parts) = cp.encode_stored(tag);
    let keys: Vec<String> = (0..parts.len()).map(|n| format::checkpoint_part_key(vol, cp.seq, tag, n as u32)).collect();
    let put_parts = stream::iter(keys.iter().cloned().zip(parts))
        .map(|(key, body)| async move { store.put(&key, Bytes::from(body), PutMode::Overwrite).await })
        .buffer_unordered(REPLAY_FETCHES)
        .try_collect::<Vec<()>>()
        .await;
    if let Err(e) = put_parts {
        // No manifest was sent: nothing refers to the parts.
        take_back(store, vol, keys, &e.to_string()).await;
        return Err(e.into());
    }
    land_checkpoint(store, vol, cp.seq, Bytes::from(head), keys).await
}

/// Store the manifest (or whole checkpoint) `head` at `checkpoints/<seq>`
/// once its parts `keys` are all stored, unless a checkpoint is there
/// already; then the parts are taken back when the one there is certainly
/// not ours. Returns whether ours landed.
pub(crate) async fn land_checkpoint(
    store: &dyn ObjectStore,
    vol: &str,
    seq: u64,
    head: Bytes,
    keys: Vec<String>,
) -> VolumeResult<bool> {
    use crate::store::PutMode;
    let key = format::checkpoint_key(vol, seq);
    let landed = store.put(&key, head.clone(), PutMode::IfAbsent).await;
    match landed {
        Ok(()) => Ok(true),
        // Ours, landed on an earlier try whose answer was lost, or another's.
        Err(StoreError::PreconditionFailed(_)) => match store.get(&key, None).await {
            Ok(there) if there == head => Ok(true),
            Ok(_) => {
                take_back(store, vol, keys, "another checkpoint at this seq landed first").await;
                Ok(false)
            }
            // Not known which: the parts stay (compaction collects them
            // once below its fold point if no manifest names them).
            Err(e) => Err(e.into()),
        },
        // The manifest may have landed: its parts stay.
        Err(e) => Err(e.into()),
    }
}

/// Remove the parts of a checkpoint whose manifest is certainly not there
/// (best effort: compaction collects parts left below its fold point).
pub(crate) async fn take_back(store: &dyn ObjectStore, vol: &str, keys: Vec<String>, why: &str) {
    if keys.is_empty() {
        return;
    }
    if let Err(e) = crate::store::delete_keys(store, keys, REPLAY_FETCHES).await {
        tracing::warn!(volume = vol, error = %e, reason = why, "removing the parts of a checkpoint that was not written failed");
    }
}

/// Fetch and decode one journal record.
pub async fn read_record(store: &dyn ObjectStore, vol: &str, seq: u64) -> VolumeResult<Option<(JournalRecord, Bytes)>> {
    let key = journal_key(vol, seq);
    match store.get(&key, None).await {
        Ok(bytes) => {
            let rec = JournalRecord::decode(&bytes, &key)?;
            if rec.seq != seq {
                return Err(VolumeError::Corrupt(format!("{key} holds seq {}", rec.seq)));
            }
            Ok(Some((rec, bytes)))
        }
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Replay from scratch (latest checkpoint, then the journal), stopping at
/// `upto` when given (snapshots and clone parents). A compaction running
/// meanwhile may fold records away under us; it writes a newer checkpoint
/// first, so a gap with a newer checkpoint behind it means "start again".
pub async fn replay(store: &dyn ObjectStore, vol: &str, chunk_size: u64, upto: Option<u64>) -> VolumeResult<Replayed> {
    let mut attempts = 0;
    loop {
        // A checkpoint listed but gone when fetched: a compaction removed
        // it after writing a newer one; list again.
        let cp = match latest_checkpoint(store, vol, upto).await {
            Err(VolumeError::Store(StoreError::NotFound(_))) if attempts < REPLAY_ATTEMPTS => {
                attempts += 1;
                continue;
            }
            r => r?,
        };
        let from = cp.as_ref().map(|c| c.seq);
        match replay_from(store, vol, chunk_size, upto, cp).await {
            Err(VolumeError::Corrupt(why))
                if attempts < REPLAY_ATTEMPTS && changed_under(store, vol, upto, from).await? =>
            {
                attempts += 1;
                tracing::debug!(volume = vol, reason = %why, "journal folded during replay; replaying again");
            }
            r => return r,
        }
    }
}

/// Replays tried while compaction keeps folding under them.
pub(crate) const REPLAY_ATTEMPTS: u32 = 4;

/// Did compaction move under a replay that started from `from`: a newer
/// checkpoint (not past `upto`), or the one it started from gone?
pub(crate) async fn changed_under(
    store: &dyn ObjectStore,
    vol: &str,
    upto: Option<u64>,
    from: Option<u64>,
) -> VolumeResult<bool> {
    if checkpoint_after(store, vol, upto, from).await? {
        return Ok(true);
    }
    match from {
        Some(f) => Ok(store.head(&format::checkpoint_key(vol, f)).await?.is_none()),
        None => Ok(crate::store::list_all(store, &checkpoint_prefix(vol))
            .await?
            .iter()
            .any(|o| parse_checkpoint_key(vol, &o.key).is_some())),
    }
}

/// Is there now a checkpoint newer than `from` (and not past `upto`)?
pub(crate) async fn checkpoint_after(
    store: &dyn ObjectStore,
    vol: &str,
    upto: Option<u64>,
    from: Option<u64>,
) -> VolumeResult<bool> {
    let all = crate::store::list_all(store, &checkpoint_prefix(vol)).await?;
    Ok(all
        .iter()
        .filter_map(|o| parse_checkpoint_key(vol, &o.key))
        .any(|s| upto.is_none_or(|u| s <= u) && from.is_none_or(|f| s > f)))
}

async fn replay_from(
    store: &dyn ObjectStore,
    vol: &str,
    chunk_size: u64,
    upto: Option<u64>,
    cp: Option<Checkpoint>,
) -> VolumeResult<Replayed> {
    let mut state = Replayed::default();
    let mut started = false;
    if let Some(cp) = cp {
        check_patches(cp.seq, cp.size, &cp.patches, chunk_size)?;
        state = Replayed {
            map: cp.map,
            patches: cp.patches,
            size: cp.size,
            head: cp.seq,
            epoch: cp.epoch,
            checkpoint: Some(cp.seq),
            ..Replayed::default()
        };
        started = true;
    }
    catch_up(store, vol, chunk_size, &mut state, started, upto).await?;
    if !started && state.records_replayed == 0 {
        return Err(nothing_to_replay(vol));
    }
    Ok(state)
}

/// A volume with neither a journal record nor a checkpoint.
pub(crate) fn nothing_to_replay(vol: &str) -> VolumeError {
    VolumeError::Corrupt(format!(
        "{vol}: no journal records and no checkpoint (a create that stopped after writing volume.json leaves this: \
         create the same volume again to finish it, or delete it)"
    ))
}

/// Every page a checkpoint's patches lay must fall inside its chunk and
/// inside the volume, as the records they came from had to (`seq` and
/// `size` are the checkpoint's).
pub(crate) fn check_patches(seq: u64, size: u64, patches: &Patches, chunk_size: u64) -> VolumeResult<()> {
    let bs = format::BLOCK_SIZE as u64;
    for (index, patch) in patches {
        for page in patch.pages.keys() {
            let at = *page as u64 * bs;
            let offset = index.checked_mul(chunk_size).and_then(|o| o.checked_add(at));
            if at + bs > chunk_size {
                return Err(VolumeError::Corrupt(format!(
                    "checkpoint {seq} patches page {page} of chunk {index}, outside its chunk"
                )));
            }
            if offset.and_then(|o| o.checked_add(bs)).is_none_or(|end| end > size) {
                return Err(VolumeError::Corrupt(format!(
                    "checkpoint {seq} patches page {page} of chunk {index}, past the end"
                )));
            }
        }
    }
    Ok(())
}

/// Journal records fetched at once during replay.
pub(crate) const REPLAY_FETCHES: usize = 32;

/// Apply every record after `state.head` (or from seq 0 when `!started`).
/// Records of one listing page are fetched in parallel and applied in order.
pub async fn catch_up(
    store: &dyn ObjectStore,
    vol: &str,
    chunk_size: u64,
    state: &mut Replayed,
    mut started: bool,
    upto: Option<u64>,
) -> VolumeResult<()> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    let prefix = journal_prefix(vol);
    let mut after = if started { Some(journal_key(vol, state.head)) } else { None };
    loop {
        let page = store
            .list(ListRequest { prefix: &prefix, start_after: after.as_deref(), delimiter: false, max_keys: 1000 })
            .await?;
        // The seqs this page must supply, in order, checked for gaps before
        // anything is fetched.
        let mut wanted = Vec::new();
        let mut expected = if started { state.head + 1 } else { 0 };
        let mut reached_end = false;
        for obj in &page.objects {
            let Some(seq) = parse_journal_key(vol, &obj.key) else {
                continue;
            };
            if upto.is_some_and(|u| seq > u) {
                // Everything up to `upto` must have been there.
                if upto.is_some_and(|u| expected <= u) {
                    return Err(VolumeError::Corrupt(format!(
                        "journal record {expected} is missing (next present is {seq})"
                    )));
                }
                reached_end = true;
                break;
            }
            if seq < expected {
                // Folded into the checkpoint but not yet deleted.
                continue;
            }
            if seq != expected {
                return Err(VolumeError::Corrupt(format!(
                    "journal record {expected} is missing (next present is {seq})"
                )));
            }
            wanted.push((seq, obj.key.clone()));
            expected = seq + 1;
        }
        let records: Vec<(u64, String, Bytes)> = stream::iter(wanted.into_iter().map(|(seq, key)| async move {
            match store.get(&key, None).await {
                Ok(bytes) => Ok((seq, key, bytes)),
                // Folded away between the listing and the fetch.
                Err(StoreError::NotFound(_)) => {
                    Err(VolumeError::Corrupt(format!("journal record {seq} disappeared during replay")))
                }
                Err(e) => Err(VolumeError::from(e)),
            }
        }))
        .buffered(REPLAY_FETCHES)
        .try_collect()
        .await?;
        for (seq, key, bytes) in records {
            let rec = JournalRecord::decode(&bytes, &key)?;
            if rec.seq != seq {
                return Err(VolumeError::Corrupt(format!("{key} holds seq {}", rec.seq)));
            }
            state.apply(&rec, chunk_size)?;
            state.head_bytes = Some(bytes);
            started = true;
        }
        match crate::store::advance(&prefix, after.as_deref(), page.next_start_after)? {
            Some(n) if !reached_end => after = Some(n),
            _ => {
                // A replay to `upto` that ran out of records below it: they
                // were folded away under us.
                if let Some(u) = upto.filter(|u| state.head < *u) {
                    return Err(VolumeError::Corrupt(format!(
                        "journal ends at {} before seq {u} (folded during replay)",
                        state.head
                    )));
                }
                return Ok(());
            }
        }
    }
}

/// Load `volume.json` with its version tag, for a change of it that must
/// not undo another's ([`crate::store::ObjectStore::put_if_match`]); no
/// tag from a store that keeps none (an S3 server that answers no ETag).
pub async fn read_meta_tagged(
    store: &dyn ObjectStore,
    vol: &str,
) -> VolumeResult<(format::VolumeMeta, Option<String>)> {
    let key = format::meta_key(vol);
    match store.get_tagged(&key).await {
        Ok((bytes, tag)) => Ok((format::VolumeMeta::decode(&bytes)?, Some(tag))),
        Err(StoreError::Unsupported(_)) => Ok((read_meta(store, vol).await?, None)),
        Err(StoreError::NotFound(_)) => {
            Err(VolumeError::NotFound(format!("{}/{}", store.describe(), vol.trim_end_matches('/'))))
        }
        Err(e) => Err(e.into()),
    }
}

/// Load `volume.json`.
pub async fn read_meta(store: &dyn ObjectStore, vol: &str) -> VolumeResult<format::VolumeMeta> {
    let key = format::meta_key(vol);
    match store.get(&key, None).await {
        Ok(bytes) => Ok(format::VolumeMeta::decode(&bytes)?),
        Err(StoreError::NotFound(_)) => {
            Err(VolumeError::NotFound(format!("{}/{}", store.describe(), vol.trim_end_matches('/'))))
        }
        Err(e) => Err(e.into()),
    }
}
