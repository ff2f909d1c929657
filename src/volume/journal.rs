//! Appending to the journal, and the proof that makes an append a commit.
//!
//! A record is appended at `head + 1` with `If-None-Match: *`. That alone
//! does not prove the writer still owns the volume: compaction deletes
//! folded records, and a writer that slept through a takeover and a fold
//! could create its next record in the hole the fold left. So a commit
//! counts only once, after the conditional PUT, the record below it is
//! found byte for byte as this writer left it ([`prove_successor`]).
//!
//! That proof rests on one rule compaction keeps: journal records are
//! deleted strictly in ascending order, each after the one before was gone
//! ([`delete_ascending`]). A record that still exists therefore has every
//! later record of its history above it; if our predecessor is there and
//! is ours, nobody appended between it and us, and nobody folded past us.
//!
//! A writer that sent the record below less than a proof window ago (the
//! commit deadline, at most half the shortest safety age compaction
//! allows beside a live writer) skips that read: another writer's record
//! at our seq would have been created after the record below it existed,
//! so after we sent it, and compaction folds nothing younger than its
//! safety age (invariant 3: on the store's clock), so such a record could
//! not yet have been folded away when ours landed; the append's success
//! is then the proof. A writer flushing often pays one PUT per fsync.

use bytes::Bytes;

use std::collections::{BTreeMap, BTreeSet};

use super::format::{BLOCK_SIZE, JournalRecord, Patches, StoredCheckpoint, checkpoint_key, journal_key};
use crate::store::{ObjectStore, PutMode, StoreError, StoreResult};

/// How a conditional append ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The record under the seq is exactly ours (this call or an earlier
    /// attempt with the same bytes created it).
    Ours,
    /// The record there is one this writer gave up on earlier (index into
    /// the `earlier` list): it landed after all.
    Earlier(usize),
    /// Another writer's record holds the seq, or it was folded away.
    Taken(String),
}

/// Create `journal/<seq>` holding `bytes`. A 412 is told apart: our own
/// record (an earlier attempt landed and its answer was lost), one of our
/// `earlier` abandoned records, or somebody else's. Any other error leaves
/// the outcome unknown: the caller must try again with the same bytes.
pub async fn append(
    store: &dyn ObjectStore,
    vol: &str,
    seq: u64,
    bytes: &Bytes,
    earlier: &[Bytes],
) -> StoreResult<Appended> {
    let key = journal_key(vol, seq);
    match store.put(&key, bytes.clone(), PutMode::IfAbsent).await {
        Ok(()) => Ok(Appended::Ours),
        Err(StoreError::PreconditionFailed(_)) => match store.get(&key, None).await {
            Ok(existing) if existing == *bytes => Ok(Appended::Ours),
            Ok(existing) => Ok(match earlier.iter().position(|e| *e == existing) {
                Some(i) => Appended::Earlier(i),
                None => Appended::Taken(format!("journal record {seq} was written by another writer")),
            }),
            // Created, then deleted: only compaction deletes records, and
            // only below a fold point, so the volume has moved on past us.
            Err(StoreError::NotFound(_)) => {
                Ok(Appended::Taken(format!("journal record {seq} was already folded by compaction")))
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Whether a record sent earlier with an unknown outcome landed: `None`
/// when nothing is under `seq`, else whose it is (as [`append`] tells).
pub async fn read_back(
    store: &dyn ObjectStore,
    vol: &str,
    seq: u64,
    bytes: &Bytes,
    earlier: &[Bytes],
) -> StoreResult<Option<Appended>> {
    match store.get(&journal_key(vol, seq), None).await {
        Ok(existing) if existing == *bytes => Ok(Some(Appended::Ours)),
        Ok(existing) => Ok(Some(match earlier.iter().position(|e| *e == existing) {
            Some(i) => Appended::Earlier(i),
            None => Appended::Taken(format!("journal record {seq} was written by another writer")),
        })),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a checkpoint at a record's own seq must show to vouch for it.
#[derive(Debug, Clone, Copy)]
pub struct Vouch<'a> {
    /// The record that landed.
    pub record: &'a JournalRecord,
    /// Other records this writer built for the same seq and gave up on
    /// (any of them may have landed and been folded instead).
    pub twins: &'a [JournalRecord],
    pub chunk_size: u64,
}

/// The fencing proof for a record that landed at `seq`: the record at
/// `seq - 1` must still exist and, when the writer knows its bytes, be
/// exactly those. When compaction has folded it away, a checkpoint at
/// `seq` itself can vouch for the record the writer appended, which
/// happens when a record of ours that was long in doubt became the fold
/// point. The checkpoint must then hold that very record's effect (our
/// epoch as the newest, its size, every chunk entry and every inline page
/// exactly) and not that of any twin: a record this writer gave up on at
/// `seq` may have landed and been folded, and the one it built next for
/// the same `seq` could then land in the hole the fold left, long after
/// another writer took over. When the checkpoint could be either's, the
/// writer is fenced: it cannot tell. `Ok(Err(why))` means fenced; a store
/// error means "not known yet, ask again".
pub async fn prove_successor(
    store: &dyn ObjectStore,
    vol: &str,
    seq: u64,
    prev: Option<&Bytes>,
    vouch: Option<Vouch<'_>>,
) -> StoreResult<Result<(), String>> {
    let Some(before) = seq.checked_sub(1) else {
        return Ok(Ok(()));
    };
    match store.get(&journal_key(vol, before), None).await {
        Ok(b) if prev.is_none_or(|p| *p == b) => Ok(Ok(())),
        Ok(_) => Ok(Err(format!("journal record {before} is not the one this writer appended after"))),
        Err(StoreError::NotFound(_)) => {
            let folded = || Ok(Err(format!("journal record {before} was already folded by compaction")));
            let Some(v) = vouch else {
                return folded();
            };
            let mut holds = checkpoint_holds(store, vol, v.record, v.chunk_size).await;
            for twin in v.twins.iter().filter(|t| t.seq == seq) {
                if !matches!(holds, Ok(true)) {
                    break;
                }
                holds = match checkpoint_holds(store, vol, twin, v.chunk_size).await {
                    // The checkpoint may be the twin's. It is ours all the
                    // same when no fold went past `seq`: a fold writes its
                    // checkpoint before it deletes a record, and a
                    // checkpoint goes only once a newer one is there, so
                    // none past `seq` means the record there was never
                    // deleted, and ours (created there) is the one folded.
                    Ok(true) => no_checkpoint_past(store, vol, seq).await,
                    Ok(false) => Ok(true),
                    Err(e) => Err(e),
                };
            }
            match holds {
                Ok(true) => Ok(Ok(())),
                Ok(false) | Err(StoreError::NotFound(_)) => folded(),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether no checkpoint past `seq` is listed.
async fn no_checkpoint_past(store: &dyn ObjectStore, vol: &str, seq: u64) -> StoreResult<bool> {
    let all = crate::store::list_all(store, &super::format::checkpoint_prefix(vol)).await?;
    Ok(!all.iter().filter_map(|o| super::format::parse_checkpoint_key(vol, &o.key)).any(|s| s > seq))
}

/// Whether the checkpoint at `record.seq` holds exactly what `record`
/// applied: its epoch is the newest, its size is the volume's, and every
/// chunk entry and inline page it wrote is in the map as written. Reads
/// the manifest and only the parts holding those chunks. A checkpoint
/// that cannot be decoded vouches for nothing.
async fn checkpoint_holds(
    store: &dyn ObjectStore,
    vol: &str,
    record: &JournalRecord,
    chunk_size: u64,
) -> StoreResult<bool> {
    let key = checkpoint_key(vol, record.seq);
    let bytes = store.get(&key, None).await?;
    let Ok(stored) = StoredCheckpoint::decode(&bytes, &key) else {
        return Ok(false);
    };
    if stored.seq() != record.seq || stored.epoch() != record.epoch || stored.size() != record.size {
        return Ok(false);
    }
    let bs = BLOCK_SIZE as u64;
    let pages: Vec<(u64, u32, &Option<Bytes>)> =
        record.inline.iter().map(|w| (w.offset / chunk_size, ((w.offset % chunk_size) / bs) as u32, &w.data)).collect();
    // The entries and patches of the chunks the record touched.
    let mut wanted: BTreeSet<u64> = record.chunks.iter().map(|(i, _)| *i).collect();
    wanted.extend(pages.iter().map(|(i, _, _)| *i));
    let mut map = BTreeMap::new();
    let mut patches = Patches::new();
    match stored {
        StoredCheckpoint::Whole(cp) => {
            for i in &wanted {
                if let Some(r) = cp.map.get(i) {
                    map.insert(*i, *r);
                }
                if let Some(p) = cp.patches.get(i) {
                    patches.insert(*i, p.clone());
                }
            }
        }
        StoredCheckpoint::Split(split) => {
            let parts: BTreeSet<usize> = wanted.iter().filter_map(|i| split.part_of(*i)).collect();
            for n in parts {
                let part = split.part_key(vol, n);
                let bytes = store.get(&part, None).await?;
                let Ok((entries, got)) = split.read_part(n, &bytes, &part) else {
                    return Ok(false);
                };
                map.extend(entries.into_iter().filter(|(i, _)| wanted.contains(i)));
                patches.extend(got.into_iter().filter(|(i, _)| wanted.contains(i)));
            }
        }
    }
    let chunks_hold = record.chunks.iter().all(|(i, r)| map.get(i) == Some(r));
    let pages_hold =
        pages.iter().all(|(i, page, data)| patches.get(i).and_then(|p| p.pages.get(page)).is_some_and(|d| d == *data));
    Ok(chunks_hold && pages_hold)
}

/// Delete journal records strictly in ascending order, one at a time, each
/// only after the one before it is gone: a crash or error leaves a prefix
/// deleted, never a hole below a record that remains. Returns how many
/// were deleted before an error, if one stopped it.
pub async fn delete_ascending(store: &dyn ObjectStore, vol: &str, seqs: &[u64]) -> (u64, StoreResult<()>) {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut done = 0;
    for seq in sorted {
        if let Err(e) = store.delete(&journal_key(vol, seq)).await {
            return (done, Err(e));
        }
        done += 1;
    }
    (done, Ok(()))
}
