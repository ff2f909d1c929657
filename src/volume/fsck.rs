//! Consistency check of a stored volume: every invariant of the format.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::format::{
    self, ChunkRef, JournalRecord, SnapshotRecord, parse_checkpoint_key, parse_chunk_key, parse_journal_key,
};
use super::{VolumeError, VolumeResult, replay};
use crate::store::{ObjectStore, StoreError};

#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub volume: String,
    pub clean: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub size: u64,
    pub head_seq: u64,
    pub journal_records: u64,
    pub checkpoints: u64,
    /// Objects holding parts of split checkpoints.
    pub checkpoint_parts: u64,
    pub snapshots: u64,
    pub referenced_chunks: u64,
    pub verified_chunks: u64,
    pub garbage_chunks: u64,
}

/// Check a volume. `verify_data` reads every referenced chunk and checks
/// its crc32c; otherwise only presence and size are checked.
pub async fn fsck(
    store: &dyn ObjectStore,
    vol: &str,
    verify_data: bool,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> VolumeResult<FsckReport> {
    let mut rep = FsckReport { volume: format!("{}/{vol}", store.describe()), ..Default::default() };
    let meta = match replay::read_meta(store, vol).await {
        Ok(m) => m,
        Err(e @ VolumeError::NotFound(_)) => return Err(e),
        Err(VolumeError::Store(e)) => return Err(e.into()),
        Err(e) => {
            rep.errors.push(format!("volume.json: {e}"));
            return Ok(rep);
        }
    };
    // Without its key an encrypted volume's records read as noise: refused,
    // not reported as damage.
    match super::keys::require(store, vol, &meta) {
        Ok(()) => {}
        Err(e @ VolumeError::Key(_)) => return Err(e),
        // Its fields altered since the store was unlocked.
        Err(e) => {
            rep.errors.push(format!("volume.json: {e}"));
            return Ok(rep);
        }
    }
    let chunk_size = meta.chunk_size as u64;
    let objects = crate::store::list_all(store, vol).await?;
    let mut journal = BTreeMap::new();
    let mut checkpoints = BTreeSet::new();
    let mut parts: BTreeMap<(u64, u64), Vec<u32>> = BTreeMap::new();
    let mut chunks: HashMap<(u64, u64), u64> = HashMap::new();
    let mut snapshots = Vec::new();
    for o in &objects {
        if o.key == format::meta_key(vol) {
            continue;
        } else if let Some(seq) = parse_journal_key(vol, &o.key) {
            journal.insert(seq, o.key.clone());
        } else if let Some(seq) = parse_checkpoint_key(vol, &o.key) {
            checkpoints.insert(seq);
        } else if let Some((seq, tag, n)) = format::parse_checkpoint_part_key(vol, &o.key) {
            parts.entry((seq, tag)).or_default().push(n);
        } else if let Some(ig) = parse_chunk_key(vol, &o.key) {
            chunks.insert(ig, o.size);
        } else if o.key.starts_with(&format::snapshot_prefix(vol)) && o.key.ends_with(".json") {
            snapshots.push(o.key.clone());
        } else if o.key[vol.len()..] == *super::catalog::FORMATTING {
            rep.warnings.push(format!(
                "{} is left: a node's stage began making a filesystem here and did not see it through; a stage \
                 that finds no filesystem on this volume will make one (delete it if the volume holds data \
                 without one)",
                o.key
            ));
        } else if !super::catalog::is_bookkeeping(&o.key[vol.len()..]) {
            rep.warnings.push(format!("unknown object {}", o.key));
        }
    }
    rep.journal_records = journal.len() as u64;
    rep.checkpoints = checkpoints.len() as u64;
    rep.checkpoint_parts = parts.values().map(|p| p.len() as u64).sum();

    // Every checkpoint decodes, a split one with every part it names.
    let mut named: BTreeSet<(u64, u64)> = BTreeSet::new();
    // Checkpoints that do not read back, judged once the snapshots are known.
    let mut broken: Vec<(u64, String)> = Vec::new();
    for &seq in &checkpoints {
        let key = format::checkpoint_key(vol, seq);
        match store.get(&key, None).await {
            Ok(b) => {
                if let Ok(format::StoredCheckpoint::Split(s)) = format::StoredCheckpoint::decode(&b, &key) {
                    named.insert((seq, s.tag));
                }
                match replay::read_checkpoint(store, vol, seq).await {
                    // Removed by a compaction since the listing.
                    Ok(_) | Err(VolumeError::Store(crate::store::StoreError::NotFound(_))) => {}
                    Err(VolumeError::Store(e)) => return Err(e.into()),
                    Err(e) => broken.push((seq, format!("checkpoint {seq}: {e}"))),
                }
            }
            // Removed by a compaction since the listing.
            Err(crate::store::StoreError::NotFound(_)) => {}
            // An encrypted volume's checkpoint that does not open.
            Err(crate::store::StoreError::Damaged(why)) => broken.push((seq, why)),
            Err(e) => return Err(e.into()),
        }
    }
    for (&(seq, tag), ns) in &parts {
        if !named.contains(&(seq, tag)) {
            rep.warnings.push(format!(
                "{} parts of a checkpoint at seq {seq} that no checkpoint names (a writer's that did not land, or \
                 one being written): compaction removes them once the journal is folded past it",
                ns.len()
            ));
        }
    }
    rep.snapshots = snapshots.len() as u64;

    // Every journal record decodes and sits under its own seq.
    for (seq, key) in &journal {
        match store.get(key, None).await {
            Ok(b) => match JournalRecord::decode(&b, key) {
                Ok(r) if r.seq != *seq => rep.errors.push(format!("{key} holds seq {}", r.seq)),
                Ok(_) => {}
                Err(e) => rep.errors.push(e.to_string()),
            },
            Err(e) => rep.errors.push(format!("{key}: {e}")),
        }
    }
    // The journal is contiguous from its start (0, or just after a checkpoint).
    if let Some(&first) = journal.keys().next() {
        if first != 0 && !checkpoints.iter().any(|&c| c + 1 >= first) {
            rep.errors.push(format!("journal starts at {first} but no checkpoint covers the records before it"));
        }
        let mut prev = first;
        for &seq in journal.keys().skip(1) {
            if seq != prev + 1 {
                rep.errors.push(format!("journal records {}..{} are missing", prev + 1, seq));
            }
            prev = seq;
        }
    } else if checkpoints.is_empty() {
        rep.errors.push("no journal records and no checkpoint".into());
    }

    let head = match replay::replay(store, vol, chunk_size, None).await {
        Ok(st) => st,
        Err(VolumeError::Store(e)) => return Err(e.into()),
        Err(e) => {
            rep.errors.extend(broken.into_iter().map(|(_, why)| why));
            rep.errors.push(format!("replay: {e}"));
            rep.clean = false;
            return Ok(rep);
        }
    };
    rep.size = head.size;
    rep.head_seq = head.head;
    for s in &head.stale_records {
        rep.warnings.push(format!("journal record {s} was written by a fenced writer and is ignored"));
    }

    // Chunks referenced by the head and by every snapshot.
    let mut referenced: BTreeMap<(u64, u64), ChunkRef> = BTreeMap::new();
    let mut add_refs = |map: &format::ChunkMap| {
        for (i, r) in map {
            if let ChunkRef::Stored { generation, .. } = r {
                referenced.insert((*i, *generation), *r);
            }
        }
    };
    add_refs(&head.map);
    let mut pinned_seqs = Vec::new();
    for key in &snapshots {
        let rec = match store.get(key, None).await {
            Ok(b) => match SnapshotRecord::decode(&b, key).map_err(VolumeError::from).and_then(|r| {
                let name = key[format::snapshot_prefix(vol).len()..].strip_suffix(".json").unwrap_or_default();
                super::keys::check_snapshot(store, vol, name, &r, key)?;
                Ok(r)
            }) {
                Ok(r) => r,
                Err(e) => {
                    rep.errors.push(e.to_string());
                    continue;
                }
            },
            Err(e) => {
                rep.errors.push(format!("{key}: {e}"));
                continue;
            }
        };
        pinned_seqs.push(rec.seq);
        if rec.seq > head.head {
            rep.errors.push(format!("{key} pins seq {} past the journal head {}", rec.seq, head.head));
            continue;
        }
        match replay::replay(store, vol, chunk_size, Some(rec.seq)).await {
            Ok(st) => add_refs(&st.map),
            Err(VolumeError::Store(e)) => return Err(e.into()),
            Err(e) => rep.errors.push(format!("{key}: cannot rebuild its state: {e}")),
        }
    }
    rep.referenced_chunks = referenced.len() as u64;
    // A replay reads the newest checkpoint, or the newest at or below a
    // snapshot's seq. Any other is garbage compaction removes: one that
    // does not read back is a manifest whose PUT landed after compaction
    // had removed it and its parts, not damage to anything kept.
    let newest_at = |upto: Option<u64>| checkpoints.iter().rev().find(|&&c| upto.is_none_or(|u| c <= u)).copied();
    let read: BTreeSet<u64> =
        std::iter::once(None).chain(pinned_seqs.iter().map(|s| Some(*s))).filter_map(newest_at).collect();
    for (seq, why) in broken {
        match read.contains(&seq) {
            true => rep.errors.push(why),
            false => rep.warnings.push(format!(
                "{why} (no replay reads it: a newer checkpoint covers the head and every snapshot; compaction \
                 removes it)"
            )),
        }
    }

    // A chunk object with a table (format 4) ends with it; a packed one
    // (format 5) begins with its table and takes at most the chunk's size
    // more (its exact size is checked with the data).
    let object_size = |r: &ChunkRef| match r {
        ChunkRef::Stored { layout: format::Layout::Table, .. } => {
            (chunk_size + format::table_len(chunk_size), chunk_size + format::table_len(chunk_size))
        }
        ChunkRef::Stored { layout: format::Layout::Packed(_), .. } => {
            let t = format::packed_table_len(chunk_size);
            (t + chunk_size.div_ceil(format::VERIFY_BLOCK as u64), t + chunk_size)
        }
        _ => (chunk_size, chunk_size),
    };
    let mut to_verify = Vec::new();
    for ((index, generation), r) in &referenced {
        match chunks.get(&(*index, *generation)) {
            None => rep.errors.push(format!("chunk {index} generation {generation:x} is referenced but missing")),
            Some(&size) if !(object_size(r).0..=object_size(r).1).contains(&size) => {
                let (lo, hi) = object_size(r);
                let expected = if lo == hi { lo.to_string() } else { format!("{lo} to {hi}") };
                rep.errors
                    .push(format!("chunk {index} generation {generation:x} has {size} bytes, expected {expected}"))
            }
            Some(_) => to_verify.push((*index, *generation, *r)),
        }
    }
    rep.garbage_chunks = chunks.keys().filter(|k| !referenced.contains_key(k)).count() as u64;
    if rep.garbage_chunks > 0 {
        rep.warnings.push(format!(
            "{} chunk objects are referenced by nothing (left by uncommitted writes; compaction reclaims them)",
            rep.garbage_chunks
        ));
    }

    if verify_data {
        let total = to_verify.len() as u64;
        let mut done = 0u64;
        let mut results = stream::iter(to_verify.into_iter().map(|(index, generation, r)| async move {
            let key = format::chunk_key(vol, index, generation);
            match store.get(&key, None).await {
                Ok(d) => Ok(format::check_chunk(d, r, chunk_size).err().map(|why| format!("chunk object {key} {why}"))),
                Err(StoreError::NotFound(_)) => Ok(Some(format!("chunk object {key} vanished"))),
                // An encrypted volume's chunk that does not open.
                Err(StoreError::Damaged(why)) => Ok(Some(why)),
                Err(e) => Err(e),
            }
        }))
        .buffer_unordered(16);
        while let Some(r) = results.next().await {
            if let Some(err) = r? {
                rep.errors.push(err);
            }
            done += 1;
            rep.verified_chunks += 1;
            progress(done, total);
        }
    }
    rep.clean = rep.errors.is_empty();
    Ok(rep)
}
