//! Compaction: fold the journal into a checkpoint, delete what nothing
//! references any more.
//!
//! Safe to run while a writer is live, and concurrently with itself,
//! because it never touches anything younger than the safety age:
//!
//! - The fold point `X` is the newest journal record older than the safety
//!   age. A checkpoint is written at `X`; records below `X` are deleted;
//!   `X` itself and everything after it stay, so a live writer always finds
//!   its predecessor record (the engine's check against resurrected seqs).
//!   When `X` is a writer's open record, the record before it is the fold
//!   point instead: a successor recognises a dead writer's write-back log
//!   by that record.
//! - Every snapshot gets a checkpoint at its seq before the records it
//!   needs go, so snapshots and clones of this volume still replay.
//! - A chunk generation is garbage when no map that can still be read
//!   refers to it: the map at `X`, any record after `X` (read again just
//!   before deleting), any snapshot. It is deleted only when its object is
//!   older than the safety age, so uploads whose commit is still on its way
//!   are never collected (the engine commits background uploads within
//!   seconds, and re-checks old uploads before committing them).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use bytes::Bytes;

use super::engine::read_snapshot;
use super::format::{
    self, ChunkRef, SnapshotRecord, checkpoint_key, journal_key, parse_checkpoint_key, parse_chunk_key,
    parse_journal_key,
};
use super::mapview::{self, MapView, Walker};
use super::{VolumeError, VolumeResult};
use super::{journal, replay};
use crate::clock::Clock;
use crate::store::{DynStore, ObjectInfo, PutMode, StoreError, list_all};

/// Default age below which compaction leaves objects alone.
pub const DEFAULT_SAFETY_AGE: Duration = Duration::from_secs(300);

/// The shortest safety age that is safe beside a live writer: longer than
/// the engine's re-check of old staged chunks (one minute) and a snapshot's
/// deadline (30 s), with room for clock skew.
pub const MIN_LIVE_SAFETY_AGE: Duration = Duration::from_secs(120);

/// A safety age too short for a compactor that runs beside live writers.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "a compaction safety age of {}s is shorter than {}s, the least that is safe beside live writers (a writer's \
     proof that no other writer took over its volume rests on compaction never folding younger journal records)",
    .age.as_secs(),
    MIN_LIVE_SAFETY_AGE.as_secs()
)]
pub struct ShortSafetyAge {
    pub age: Duration,
}

/// Refuse a safety age under [`MIN_LIVE_SAFETY_AGE`] for a compactor that
/// runs beside live writers (the CSI controller's passes); an offline
/// `s3blk compact` of a volume nobody writes may go lower.
pub fn check_live_safety_age(age: Duration) -> Result<(), ShortSafetyAge> {
    match age < MIN_LIVE_SAFETY_AGE {
        true => Err(ShortSafetyAge { age }),
        false => Ok(()),
    }
}

#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Objects younger than this are never deleted, records younger than
    /// this never folded.
    pub safety_age: Duration,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// Deletes in flight at once.
    pub concurrency: usize,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self { safety_age: DEFAULT_SAFETY_AGE, dry_run: false, concurrency: 16 }
    }
}

/// What one compaction did (or, dry run, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompactReport {
    pub head_seq: u64,
    /// The seq folded into a checkpoint, if any record was old enough.
    pub folded_seq: Option<u64>,
    pub checkpoints_written: u64,
    pub checkpoints_deleted: u64,
    pub journal_records_deleted: u64,
    pub chunks_live: u64,
    pub chunks_deleted: u64,
    pub chunk_bytes_deleted: u64,
    /// Parts of split checkpoints deleted (with their checkpoints, or
    /// left by a writer of a checkpoint that did not land).
    pub checkpoint_parts_deleted: u64,
    /// Unreferenced chunk objects kept because they are younger than the safety age.
    pub chunks_kept_young: u64,
    pub snapshots: u64,
    /// Snapshot records that could not be read: while any is listed,
    /// compaction deletes nothing from the volume.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_snapshots: Vec<String>,
    /// Journal records of writers that a newer writer had already fenced
    /// (replay ignores them): evidence of a takeover from a writer that
    /// kept running.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_records: Vec<u64>,
    pub dry_run: bool,
}

/// Compact the volume under `vol`.
pub async fn compact(
    store: &DynStore,
    vol: &str,
    opts: &CompactOptions,
    clock: &dyn Clock,
) -> VolumeResult<CompactReport> {
    let meta = replay::read_meta(store.as_ref(), vol).await?;
    // Without its key nothing of an encrypted volume is read, folded or deleted.
    super::keys::require(store.as_ref(), vol, &meta)?;
    let cs = meta.chunk_size as u64;
    let mut report = CompactReport { dry_run: opts.dry_run, ..CompactReport::default() };
    // Ages are measured on the store's clock, never this host's: a
    // controller whose clock runs fast must not think fresh chunks old.
    let now = match opts.dry_run {
        true => clock.now_unix(),
        false => store_now(store, vol).await?.unwrap_or_else(|| clock.now_unix()),
    };
    let cutoff = now.saturating_sub(i64::try_from(opts.safety_age.as_secs()).unwrap_or(i64::MAX));

    // The fold point: the newest record (or checkpoint) old enough. A
    // young checkpoint (a writer writes them as it goes) speeds up replay
    // but does not move the fold point.
    let journal = list_all(store.as_ref(), &format::journal_prefix(vol)).await?;
    let checkpoints = list_all(store.as_ref(), &format::checkpoint_prefix(vol)).await?;
    let mut fold = None;
    for o in &journal {
        let Some(seq) = parse_journal_key(vol, &o.key) else { continue };
        if seq >= fold.unwrap_or(0) && is_old(o, cutoff) {
            fold = Some(seq);
        }
    }
    for o in &checkpoints {
        let Some(seq) = parse_checkpoint_key(vol, &o.key) else { continue };
        if seq > fold.unwrap_or(0) && is_old(o, cutoff) {
            fold = Some(seq);
        }
    }

    // Maps that can still be read: at the fold point, after it, at every
    // snapshot. Each is a view (a checkpoint and the records after it),
    // walked a part at a time when chunks are collected.
    let mut views: Vec<MapView> = Vec::new();
    let mut live: HashSet<(u64, u64)> = HashSet::new();
    let head_view = mapview::replay_view(store.as_ref(), vol, cs, None).await?;
    report.head_seq = head_view.head();
    report.stale_records = head_view.delta.stale_records.clone();
    add_view(&mut views, head_view);
    let mut pinned: BTreeSet<u64> = BTreeSet::new();
    let has_checkpoint = |seq: u64| checkpoints.iter().any(|o| parse_checkpoint_key(vol, &o.key) == Some(seq));
    if let Some(x) = fold {
        let replay_at = |x: u64| async move {
            match mapview::replay_view(store.as_ref(), vol, cs, Some(x)).await {
                Ok(st) => Ok(st),
                // Another compaction folded past our fold point meanwhile: it
                // did this pass's work; stop without touching anything.
                Err(VolumeError::Corrupt(why))
                    if replay::checkpoint_after(store.as_ref(), vol, None, Some(x)).await? =>
                {
                    Err(VolumeError::Store(StoreError::Transient(format!(
                        "another compaction folded past seq {x} while this one ran ({why}); nothing done"
                    ))))
                }
                Err(e) => Err(e),
            }
        };
        let mut at_fold = replay_at(x).await?;
        // Never fold onto a writer's open record (one before it instead):
        // a writer that took over a dead process's write-back log and died
        // with its open record landed, before it knew, leaves that log to
        // its successor, which recognises it by the writer id in that
        // record. Folded into a checkpoint, the record could be a late
        // one that landed in a hole, and the log would be discarded with
        // the acknowledged writes in it. A record after it is the same
        // writer's commit, and its log then names the epoch itself.
        if x > 0 && at_fold.delta.epoch == x && at_fold.base.seq() != Some(x) && !has_checkpoint(x) {
            fold = Some(x - 1);
            at_fold = replay_at(x - 1).await?;
        }
        let x = fold.unwrap_or(x);
        // Not when the view starts from one at `x` (written since the
        // listing, by another compactor or the writer).
        if !has_checkpoint(x) && at_fold.base.seq() != Some(x) {
            report.checkpoints_written += 1;
            if !opts.dry_run {
                // Another compactor (or the writer) may have written the
                // same seq: the same map, by construction.
                walk_step(at_fold.write_checkpoint(store.as_ref(), vol).await)?;
            }
        }
        add_view(&mut views, at_fold);
        pinned.insert(x);
    }
    let after = fold.map_or(0, |x| x + 1);
    let mut tail_from = add_records(store, vol, after, &mut live).await?.max(report.head_seq + 1);
    let (snapshots, unreadable) = list_snapshots(store, vol).await?;
    report.snapshots = snapshots.len() as u64;
    for snap in &snapshots {
        let at = match mapview::replay_view(store.as_ref(), vol, cs, Some(snap.seq)).await {
            Ok(at) if at.head() == snap.seq => at,
            // Deleted since it was listed, and another pass, which no longer
            // saw it, folded past its seq: no damage. Stop without deleting
            // anything (what this pass listed is out of date); the next pass
            // does not see the snapshot.
            Ok(_) | Err(VolumeError::Corrupt(_)) if snapshot_gone(store, vol, snap).await? => {
                return Err(VolumeError::Store(StoreError::Transient(format!(
                    "snapshot {} was deleted while this compaction ran; nothing done",
                    snap.name
                ))));
            }
            Ok(at) => at,
            Err(e) => return Err(e),
        };
        if at.head() != snap.seq {
            return Err(VolumeError::Corrupt(format!(
                "snapshot {} pins seq {}, but the journal replays only to {}",
                snap.name,
                snap.seq,
                at.head()
            )));
        }
        if at.base.seq() != Some(snap.seq) && fold.is_some_and(|x| snap.seq < x) {
            report.checkpoints_written += 1;
            if !opts.dry_run {
                walk_step(at.write_checkpoint(store.as_ref(), vol).await)?;
            }
        }
        let mut at = at;
        at.pinned = true;
        add_view(&mut views, at);
        pinned.insert(snap.seq);
    }

    // The volume may have been deleted while we worked: take back what we
    // wrote rather than leave objects under a prefix nobody will visit.
    if report.checkpoints_written > 0 && !opts.dry_run && store.head(&format::meta_key(vol)).await?.is_none() {
        let ours: Vec<String> = pinned.iter().map(|s| checkpoint_key(vol, *s)).collect();
        delete_all(store, ours, opts.concurrency).await?;
        let parts = list_all(store.as_ref(), &format::checkpoint_prefix(vol))
            .await?
            .into_iter()
            .filter(|o| format::parse_checkpoint_part_key(vol, &o.key).is_some_and(|(s, _, _)| pinned.contains(&s)));
        delete_all(store, parts.map(|o| o.key).collect(), opts.concurrency).await?;
        return Err(VolumeError::NotFound(vol.trim_end_matches('/').to_string()));
    }

    // A snapshot record that cannot be read pins a seq nobody knows: no
    // record, checkpoint or chunk may go until it is fixed or deleted.
    // Writing checkpoints (above) is still safe and keeps opening fast.
    if !unreadable.is_empty() {
        report.unreadable_snapshots = unreadable.clone();
        crate::metrics::global().compaction.unreadable_snapshots.inc_by(unreadable.len() as u64);
        tracing::error!(
            volume = %vol,
            snapshots = ?unreadable,
            "snapshot records cannot be read; nothing is deleted from this volume until they are repaired or removed"
        );
        report.folded_seq = fold;
        return Ok(report);
    }

    // Collect garbage chunks, one page of the listing at a time (a big
    // volume's listing is never held whole), walking every view alongside
    // in chunk index order (the listing's order), one part of each in
    // memory. Commits that landed while we worked count as live too: the
    // journal tail is read again after each page is listed, right before
    // its garbage goes.
    let chunk_prefix = format::chunk_prefix(vol);
    let mut walkers: Vec<Walker<'_>> = views.iter().map(Walker::new).collect();
    let mut listed_after: Option<String> = None;
    let mut last_index = 0;
    loop {
        let page = store
            .list(crate::store::ListRequest {
                prefix: &chunk_prefix,
                start_after: listed_after.as_deref(),
                delimiter: false,
                max_keys: 1000,
            })
            .await?;
        tail_from = add_records(store, vol, tail_from, &mut live).await?;
        let mut doomed = Vec::new();
        for o in &page.objects {
            // Only names s3blk writes: anything else under chunks/ is not ours.
            let Some((index, generation)) =
                parse_chunk_key(vol, &o.key).filter(|(i, g)| format::chunk_key(vol, *i, *g) == o.key)
            else {
                continue;
            };
            // The walk moves forward only: a listing out of key order could
            // make it pass over live entries.
            if index < last_index {
                return Err(VolumeError::Store(StoreError::Permanent(format!(
                    "the store listed {} after a chunk of index {last_index}: its listing is not in key order; \
                     compaction deletes nothing more from {vol}",
                    o.key
                ))));
            }
            last_index = index;
            if live.contains(&(index, generation)) || held(&mut walkers, store, vol, index, generation).await? {
                report.chunks_live += 1;
                continue;
            }
            if is_old(o, cutoff) {
                report.chunks_deleted += 1;
                report.chunk_bytes_deleted += o.size;
                doomed.push(o.key.clone());
            } else {
                report.chunks_kept_young += 1;
            }
        }
        if !opts.dry_run {
            delete_all(store, doomed, opts.concurrency).await?;
        }
        match crate::store::advance(&chunk_prefix, listed_after.as_deref(), page.next_start_after)? {
            Some(next) => listed_after = Some(next),
            None => break,
        }
    }
    // Every part of every map kept is read through before anything is
    // folded away: a checkpoint of a snapshot (or the fold point) that has
    // lost a part is damage, reported before the records it came from go.
    for w in &mut walkers {
        walk_step(w.finish(store.as_ref(), vol).await)?;
    }
    drop(walkers);

    // Fold: journal records and checkpoints below the fold point go, after
    // the walk (the views may start from those checkpoints). The
    // records strictly in ascending order, one after the other (the
    // journal never gets a hole below a record that remains: writers'
    // fencing proof rests on it).
    if let Some(x) = fold {
        let old_records: Vec<u64> =
            journal.iter().filter_map(|o| parse_journal_key(vol, &o.key)).filter(|s| *s < x).collect();
        let old_checkpoints: Vec<String> = checkpoints
            .iter()
            .filter(|o| parse_checkpoint_key(vol, &o.key).is_some_and(|s| s < x && !pinned.contains(&s)))
            .map(|o| o.key.clone())
            .collect();
        let old_parts = stray_parts(store, vol, &checkpoints, x, &pinned, cutoff).await?;
        report.journal_records_deleted = old_records.len() as u64;
        report.checkpoints_deleted = old_checkpoints.len() as u64;
        report.checkpoint_parts_deleted = old_parts.len() as u64;
        if !opts.dry_run {
            let (_, r) = journal::delete_ascending(store.as_ref(), vol, &old_records).await;
            r?;
            delete_all(store, old_checkpoints, opts.concurrency).await?;
            delete_all(store, old_parts, opts.concurrency).await?;
        }
    }

    report.folded_seq = fold;
    if !opts.dry_run {
        let m = &crate::metrics::global().compaction;
        m.compactions.inc();
        m.deleted_chunks.inc_by(report.chunks_deleted);
    }
    tracing::info!(
        volume = %vol,
        head = report.head_seq,
        folded = ?report.folded_seq,
        records_deleted = report.journal_records_deleted,
        chunks_deleted = report.chunks_deleted,
        dry_run = opts.dry_run,
        "compacted"
    );
    Ok(report)
}

/// The parts of split checkpoints that may go, from the listing of
/// `checkpoints/`: those of every checkpoint below the fold point `x` that
/// is not pinned (they go with their manifests), and, of a pinned one,
/// parts old enough that its manifest names another writer's (a checkpoint
/// written twice at one seq); the fold point's is pinned too, so the parts
/// of a checkpoint that lost its manifest there go even when the volume
/// goes idle and the fold point never moves again. A pinned checkpoint
/// whose manifest is not there yet keeps every part: it may be on its way.
/// Parts past the fold point stay (a writer's checkpoint in progress); they
/// fall below a later fold point. A manifest landing late, after its parts went below
/// the fold point, is never read: every replay finds a newer checkpoint
/// (the fold point's, or the one compaction keeps at each snapshot's seq).
async fn stray_parts(
    store: &DynStore,
    vol: &str,
    listing: &[ObjectInfo],
    x: u64,
    pinned: &BTreeSet<u64>,
    cutoff: i64,
) -> VolumeResult<Vec<String>> {
    let mut out = Vec::new();
    let mut tags: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    for o in listing {
        let Some((seq, tag, _)) = format::parse_checkpoint_part_key(vol, &o.key) else { continue };
        if seq > x {
            continue;
        }
        if !pinned.contains(&seq) {
            out.push(o.key.clone());
            continue;
        }
        if !is_old(o, cutoff) || !listing.iter().any(|m| parse_checkpoint_key(vol, &m.key) == Some(seq)) {
            continue;
        }
        let kept = match tags.get(&seq) {
            Some(t) => *t,
            None => {
                let key = checkpoint_key(vol, seq);
                let t = match store.get(&key, None).await {
                    Ok(b) => match format::StoredCheckpoint::decode(&b, &key)? {
                        format::StoredCheckpoint::Split(s) => Some(s.tag),
                        format::StoredCheckpoint::Whole(_) => None,
                    },
                    // Gone since the listing: leave its parts to a later pass.
                    Err(StoreError::NotFound(_)) => Some(tag),
                    Err(e) => return Err(e.into()),
                };
                tags.insert(seq, t);
                t
            }
        };
        if kept != Some(tag) {
            out.push(o.key.clone());
        }
    }
    Ok(out)
}

/// Is the snapshot `snap` (as listed) gone now, or another one under its name?
async fn snapshot_gone(store: &DynStore, vol: &str, snap: &SnapshotRecord) -> VolumeResult<bool> {
    match read_snapshot(store, vol, &snap.name).await {
        Ok(now) => Ok(now.seq != snap.seq),
        Err(VolumeError::NotFound(_)) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The store's clock: the modification time it gives an object written
/// now. The probe's name is unique to this call (compactors run side by
/// side) and it is removed again. `None` only when the store keeps no
/// modification times at all; a probe the listing does not show is an
/// error (retried next pass), never a reason to fall back to this host's
/// clock.
pub async fn store_now(store: &DynStore, vol: &str) -> VolumeResult<Option<i64>> {
    let key = format::clock_probe_key(vol, rand::random::<u64>());
    store.put(&key, Bytes::from_static(format::CLOCK_PROBE_BODY), PutMode::Overwrite).await?;
    let page =
        store.list(crate::store::ListRequest { prefix: &key, start_after: None, delimiter: false, max_keys: 1 }).await;
    let _ = store.delete(&key).await;
    match page?.objects.into_iter().find(|o| o.key == key) {
        Some(o) => Ok(o.modified_unix),
        None => Err(VolumeError::Store(StoreError::Transient(format!(
            "the store's listing does not show {key}, just written: its clock cannot be read; compacting later"
        )))),
    }
}

/// Is the object older than the cutoff on the store's clock? An object the
/// store lists without a modification time counts as young: its age is
/// unknown, and a host's clock (the record's own `created_unix`) is no
/// measure of it (design invariant 3). Every store s3blk supports lists one.
fn is_old(o: &ObjectInfo, cutoff: i64) -> bool {
    o.modified_unix.is_some_and(|m| m <= cutoff)
}

fn add_map<'a>(live: &mut HashSet<(u64, u64)>, map: impl Iterator<Item = (&'a u64, &'a ChunkRef)>) {
    for (index, r) in map {
        if let ChunkRef::Stored { generation, .. } = r {
            live.insert((*index, *generation));
        }
    }
}

/// Keep `view` among the maps to walk, unless one with the same start
/// and head (so the same map) is there already.
fn add_view(views: &mut Vec<MapView>, view: MapView) {
    match views.iter_mut().find(|v| v.base.seq() == view.base.seq() && v.head() == view.head()) {
        // The same map: pinned when either is.
        Some(v) => v.pinned |= view.pinned,
        None => views.push(view),
    }
}

/// Does any view refer to chunk `index`'s `generation`? A view's part gone
/// under the walk means another compaction folded past it and removed its
/// checkpoint: this pass stops (what it deleted so far was garbage in
/// every map it walked) and the next one starts from the newer checkpoint.
async fn held(
    walkers: &mut [Walker<'_>],
    store: &DynStore,
    vol: &str,
    index: u64,
    generation: u64,
) -> VolumeResult<bool> {
    let mut found = false;
    // Every walker is asked (each must see every index in order, and a
    // cheap "no" keeps it moving with the listing).
    for w in walkers.iter_mut() {
        found |= walk_step(w.holds(store.as_ref(), vol, index, generation).await)?;
    }
    Ok(found)
}

/// A view's answer (a walk's, or a checkpoint written from it), a part
/// gone under it (a compaction folded past its checkpoint) made a
/// transient error.
fn walk_step<T>(r: VolumeResult<T>) -> VolumeResult<T> {
    match r {
        Err(VolumeError::Store(StoreError::NotFound(key))) => Err(VolumeError::Store(StoreError::Transient(format!(
            "checkpoint part {key} was removed by another compaction while this one walked it; compacting again later"
        )))),
        r => r,
    }
}

/// Every chunk any record from `from` on refers to. Returns the seq after
/// the last record read (`from` when there was none): where to read on
/// from next time.
async fn add_records(store: &DynStore, vol: &str, from: u64, live: &mut HashSet<(u64, u64)>) -> VolumeResult<u64> {
    let start = from.checked_sub(1).map(|s| journal_key(vol, s));
    let prefix = format::journal_prefix(vol);
    let mut after = start;
    let mut next = from;
    loop {
        let page = store
            .list(crate::store::ListRequest {
                prefix: &prefix,
                start_after: after.as_deref(),
                delimiter: false,
                max_keys: 1000,
            })
            .await?;
        for o in &page.objects {
            let Some(seq) = parse_journal_key(vol, &o.key) else { continue };
            if seq < from {
                continue;
            }
            if let Some((rec, _)) = replay::read_record(store.as_ref(), vol, seq).await? {
                add_map(live, rec.chunks.iter().map(|(i, r)| (i, r)));
                next = next.max(seq + 1);
            }
        }
        match crate::store::advance(&prefix, after.as_deref(), page.next_start_after)? {
            Some(n) => after = Some(n),
            None => return Ok(next),
        }
    }
}

/// Every snapshot record, and the keys of those that cannot be read or
/// decoded (reported, never guessed at). A record listed but gone when
/// fetched means snapshots changed under us (a restore may have pinned the
/// same seq under another name just before the delete): list again until
/// one listing reads whole.
async fn list_snapshots(store: &DynStore, vol: &str) -> VolumeResult<(Vec<SnapshotRecord>, Vec<String>)> {
    'listing: for _ in 0..SNAPSHOT_LISTINGS {
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for o in list_all(store.as_ref(), &format::snapshot_prefix(vol)).await? {
            if !o.key.ends_with(".json") {
                continue;
            }
            let bytes = match store.get(&o.key, None).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => continue 'listing,
                Err(e) => return Err(e.into()),
            };
            let name = o.key[format::snapshot_prefix(vol).len()..].strip_suffix(".json").unwrap_or_default();
            // An encrypted volume's record must carry its tag: one that does
            // not is unreadable, as a record that does not decode is.
            let checked = SnapshotRecord::decode(&bytes, &o.key)
                .map_err(VolumeError::from)
                .and_then(|s| super::keys::check_snapshot(store.as_ref(), vol, name, &s, &o.key).map(|()| s));
            match checked {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::warn!(volume = %vol, key = %o.key, error = %e, "unreadable snapshot record");
                    unreadable.push(o.key);
                }
            }
        }
        return Ok((out, unreadable));
    }
    Err(VolumeError::Store(StoreError::Transient(format!(
        "{vol}: snapshots kept changing while compaction read them; compacting later"
    ))))
}

/// Listings of snapshot records tried before a pass gives up.
const SNAPSHOT_LISTINGS: usize = 5;

async fn delete_all(store: &DynStore, keys: Vec<String>, concurrency: usize) -> VolumeResult<()> {
    Ok(crate::store::delete_keys(store.as_ref(), keys, concurrency).await?)
}

/// Check, after writing a snapshot record pinning `seq`, that compaction
/// has not folded `seq` away meanwhile: its journal record or a checkpoint
/// at it must exist.
pub async fn snapshot_still_replayable(store: &DynStore, vol: &str, seq: u64) -> VolumeResult<bool> {
    if store.head(&journal_key(vol, seq)).await?.is_some() {
        return Ok(true);
    }
    Ok(store.head(&checkpoint_key(vol, seq)).await?.is_some())
}
