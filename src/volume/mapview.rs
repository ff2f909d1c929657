//! A volume's chunk map at one seq, read a part at a time.
//!
//! Replay ([`super::replay`]) builds the whole map in memory: right for a
//! writer, which serves reads from it, but compaction of a 64 TiB volume
//! (64 M chunks of 1 MiB) would hold gigabytes for each map it keeps
//! (at the fold point, at the head, at every snapshot). A [`MapView`] holds
//! the checkpoint it starts from only as its manifest, and the records
//! after it as a small map of what they changed (the delta); its map is
//! read as [`Slice`]s, one per checkpoint part with the delta laid over
//! it, so that compaction walks every map it keeps side by side, in chunk
//! index order, with one part of each in memory, and writes a checkpoint
//! part by part.

use std::sync::Arc;

use bytes::Bytes;

use super::format::{self, Built, Checkpoint, CheckpointBuilder, ChunkRef, Patches, SplitCheckpoint, StoredCheckpoint};
use super::replay::{self, Replayed};
use super::{VolumeError, VolumeResult};
use crate::store::{ObjectStore, PutMode, StoreError};

/// Where a view's map starts.
#[derive(Debug, Clone)]
pub enum Base {
    /// No checkpoint: the journal from seq 0.
    Empty,
    /// A checkpoint stored whole (its map fits one part).
    Whole(Checkpoint),
    /// A split checkpoint's manifest: its parts are read as the view is walked.
    Split(SplitCheckpoint),
}

impl Base {
    /// The checkpoint's seq (`None`: no checkpoint).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Base::Empty => None,
            Base::Whole(c) => Some(c.seq),
            Base::Split(s) => Some(s.seq),
        }
    }
}

/// The map at `delta.head`: `base`, then the records after it.
#[derive(Debug, Clone)]
pub struct MapView {
    pub base: Base,
    /// The records after the base applied to an empty map: the entries
    /// they set and the pages they laid (over the base's, unless the same
    /// record or a later one stored the chunk again), with the view's
    /// head, epoch and size.
    pub delta: Replayed,
    chunk_size: u64,
    /// A snapshot pins its seq: compaction keeps the checkpoint there
    /// whatever it folds past, so a part of it gone is damage even with a
    /// newer checkpoint on the store. (Not pinned: the head, a fold point,
    /// where a newer checkpoint means a fold past removed it.)
    pub pinned: bool,
}

/// The view's map over chunk indexes `first..=last`: entries in index order
/// and the patches laid over them.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    pub first: u64,
    pub last: u64,
    pub entries: Vec<(u64, ChunkRef)>,
    pub patches: Patches,
}

/// The view at `upto` (the head when `None`): the latest checkpoint not past
/// it and the records after it. Like [`replay::replay`], it starts again
/// when a compaction folds under it.
pub async fn replay_view(
    store: &dyn ObjectStore,
    vol: &str,
    chunk_size: u64,
    upto: Option<u64>,
) -> VolumeResult<MapView> {
    let mut attempts = 0;
    loop {
        // A checkpoint listed but gone when fetched: a compaction removed
        // it after writing a newer one; list again.
        let base = match latest_base(store, vol, chunk_size, upto).await {
            Err(VolumeError::Store(StoreError::NotFound(_))) if attempts < replay::REPLAY_ATTEMPTS => {
                attempts += 1;
                continue;
            }
            r => r?,
        };
        let from = base.seq();
        let mut delta = match &base {
            Base::Empty => Replayed::default(),
            Base::Whole(c) => start(c.seq, c.epoch, c.size),
            Base::Split(s) => start(s.seq, s.epoch, s.size),
        };
        match replay::catch_up(store, vol, chunk_size, &mut delta, from.is_some(), upto).await {
            Err(VolumeError::Corrupt(why))
                if attempts < replay::REPLAY_ATTEMPTS && replay::changed_under(store, vol, upto, from).await? =>
            {
                attempts += 1;
                tracing::debug!(volume = vol, reason = %why, "journal folded during replay; replaying again");
                continue;
            }
            r => r?,
        }
        if from.is_none() && delta.records_replayed == 0 {
            return Err(replay::nothing_to_replay(vol));
        }
        return Ok(MapView { base, delta, chunk_size, pinned: false });
    }
}

fn start(seq: u64, epoch: u64, size: u64) -> Replayed {
    Replayed { size, head: seq, epoch, checkpoint: Some(seq), ..Replayed::default() }
}

/// The latest checkpoint not past `upto`, whole or as its manifest.
async fn latest_base(store: &dyn ObjectStore, vol: &str, chunk_size: u64, upto: Option<u64>) -> VolumeResult<Base> {
    let all = crate::store::list_all(store, &format::checkpoint_prefix(vol)).await?;
    let best = all
        .iter()
        .filter_map(|o| format::parse_checkpoint_key(vol, &o.key))
        .filter(|s| upto.is_none_or(|u| *s <= u))
        .max();
    let Some(seq) = best else {
        return Ok(Base::Empty);
    };
    let key = format::checkpoint_key(vol, seq);
    let bytes = store.get(&key, None).await?;
    let stored = StoredCheckpoint::decode(&bytes, &key)?;
    if stored.seq() != seq {
        return Err(VolumeError::Corrupt(format!("{key} holds seq {}", stored.seq())));
    }
    Ok(match stored {
        StoredCheckpoint::Whole(cp) => {
            replay::check_patches(cp.seq, cp.size, &cp.patches, chunk_size)?;
            Base::Whole(cp)
        }
        StoredCheckpoint::Split(s) => Base::Split(s),
    })
}

impl MapView {
    /// Seq of the last record applied (the base's when none was).
    pub fn head(&self) -> u64 {
        self.delta.head
    }

    /// How many slices the map is read in.
    pub fn slices(&self) -> usize {
        match &self.base {
            Base::Split(s) => s.parts.len(),
            Base::Empty | Base::Whole(_) => 1,
        }
    }

    /// Slice `n` of the map (the base's part `n` with the delta over it).
    /// A part gone while its manifest is still there is damage; gone with
    /// it, the store's NotFound (a compaction removed the checkpoint).
    pub async fn slice(&self, store: &dyn ObjectStore, vol: &str, n: usize) -> VolumeResult<Slice> {
        let base = match &self.base {
            Base::Empty => Slice { first: 0, last: u64::MAX, ..Slice::default() },
            Base::Whole(cp) => Slice {
                first: 0,
                last: u64::MAX,
                entries: cp.map.iter().map(|(i, r)| (*i, *r)).collect(),
                patches: cp.patches.clone(),
            },
            Base::Split(split) => {
                let key = split.part_key(vol, n);
                let bytes = match store.get(&key, None).await {
                    Ok(b) => b,
                    Err(StoreError::NotFound(_)) => {
                        let manifest = format::checkpoint_key(vol, split.seq);
                        // A volume being deleted loses its objects in any order.
                        if store.head(&format::meta_key(vol)).await?.is_none() {
                            return Err(VolumeError::NotFound(vol.trim_end_matches('/').to_string()));
                        }
                        // A compaction folded past this checkpoint (writing a
                        // newer one first) and removed it; its manifest may
                        // even be back, a PUT of it landing late. Not at a
                        // pinned seq, which no fold removes: there a newer
                        // checkpoint up to the view's head tells. Elsewhere
                        // the record at its seq gone tells (records go only
                        // below a fold point), not any newer checkpoint (a
                        // writer writes them as it goes).
                        let from = Some(split.seq);
                        let removed = match self.pinned {
                            true => replay::checkpoint_after(store, vol, Some(self.delta.head), from).await?,
                            false => {
                                store.head(&format::journal_key(vol, split.seq)).await?.is_none()
                                    && replay::checkpoint_after(store, vol, None, from).await?
                            }
                        };
                        if removed {
                            return Err(StoreError::NotFound(key).into());
                        }
                        // Damage only when the manifest there is still this
                        // checkpoint's: another one at the same seq (a
                        // slower compactor's, landing after a faster one
                        // removed this one) means this one was removed.
                        let ours = match store.get(&manifest, None).await {
                            Ok(b) => matches!(
                                format::StoredCheckpoint::decode(&b, &manifest),
                                Ok(format::StoredCheckpoint::Split(s)) if s.tag == split.tag
                            ),
                            Err(StoreError::NotFound(_)) => false,
                            Err(e) => return Err(e.into()),
                        };
                        if ours {
                            return Err(VolumeError::Corrupt(format!(
                                "{manifest} names the part {key}, which is missing"
                            )));
                        }
                        return Err(StoreError::NotFound(key).into());
                    }
                    Err(e) => return Err(e.into()),
                };
                let (entries, patches) = split.read_part(n, &bytes, &key)?;
                replay::check_patches(split.seq, split.size, &patches, self.chunk_size)?;
                let p = split.parts[n];
                Slice { first: p.first, last: p.last, entries, patches }
            }
        };
        Ok(merge(base, &self.delta))
    }

    /// The whole map in memory, as [`replay::replay`] builds it.
    pub async fn materialize(&self, store: &dyn ObjectStore, vol: &str) -> VolumeResult<Replayed> {
        let mut out = Replayed { map: Default::default(), patches: Default::default(), ..self.delta.clone() };
        for n in 0..self.slices() {
            let s = self.slice(store, vol, n).await?;
            out.map.extend(s.entries);
            out.patches.extend(s.patches);
        }
        Ok(out)
    }

    /// Store the map as the checkpoint at its head (see
    /// [`replay::write_checkpoint`]), a part at a time: one slice of the
    /// map in memory, each part written as soon as it is cut. Returns
    /// whether this call's checkpoint landed (another at the same seq
    /// holds the same map).
    pub async fn write_checkpoint(&self, store: &dyn ObjectStore, vol: &str) -> VolumeResult<bool> {
        let (seq, epoch, size) = (self.delta.head, self.delta.epoch, self.delta.size);
        let tag = rand::random::<u64>();
        let mut b = CheckpointBuilder::new(seq, epoch, size, tag);
        let mut keys: Vec<String> = Vec::new();
        let stored = async {
            for n in 0..self.slices() {
                let s = self.slice(store, vol, n).await?;
                let done = b.push_all(s.entries, s.patches)?;
                for part in done {
                    put_part(store, format::checkpoint_part_key(vol, seq, tag, keys.len() as u32), part, &mut keys)
                        .await?;
                }
            }
            VolumeResult::Ok(())
        }
        .await;
        if let Err(e) = stored {
            replay::take_back(store, vol, keys, &e.to_string()).await;
            return Err(e);
        }
        let head = match b.finish() {
            Built::Whole(bytes) => bytes,
            Built::Split { last, manifest } => {
                let key = format::checkpoint_part_key(vol, seq, tag, keys.len() as u32);
                if let Err(e) = put_part(store, key, last, &mut keys).await {
                    replay::take_back(store, vol, keys, &e.to_string()).await;
                    return Err(e);
                }
                manifest
            }
        };
        replay::land_checkpoint(store, vol, seq, Bytes::from(head), keys).await
    }
}

/// Store a part of a checkpoint being written under `key`, noting the key
/// first (a part whose PUT failed may have landed: it is taken back too).
async fn put_part(store: &dyn ObjectStore, key: String, part: Vec<u8>, keys: &mut Vec<String>) -> VolumeResult<()> {
    keys.push(key.clone());
    store.put(&key, Bytes::from(part), PutMode::Overwrite).await?;
    Ok(())
}

/// Lay the delta over a slice of the base: the delta's entries replace
/// the base's; a chunk the delta stored again keeps only the pages laid
/// after that (the delta's own), any other keeps the base's pages with
/// the delta's over them.
fn merge(base: Slice, delta: &Replayed) -> Slice {
    let Slice { first, last, entries: base_entries, mut patches } = base;
    let mut entries = Vec::with_capacity(base_entries.len());
    let mut d = delta.map.range(first..=last).map(|(i, r)| (*i, *r)).peekable();
    for (i, r) in base_entries {
        while let Some(e) = d.next_if(|(di, _)| *di < i) {
            entries.push(e);
        }
        entries.push(d.next_if(|(di, _)| *di == i).unwrap_or((i, r)));
    }
    entries.extend(d);
    for i in delta.map.range(first..=last).map(|(i, _)| i) {
        patches.remove(i);
    }
    for (i, p) in delta.patches.range(first..=last) {
        match patches.get_mut(i) {
            Some(b) => Arc::make_mut(b).pages.extend(p.pages.iter().map(|(k, v)| (*k, v.clone()))),
            None => {
                patches.insert(*i, p.clone());
            }
        }
    }
    Slice { first, last, entries, patches }
}

/// Walks a view's map in increasing chunk index order, one slice in memory.
#[derive(Debug)]
pub struct Walker<'v> {
    view: &'v MapView,
    next: usize,
    slice: Option<Slice>,
    pos: usize,
}

impl<'v> Walker<'v> {
    pub fn new(view: &'v MapView) -> Self {
        Self { view, next: 0, slice: None, pos: 0 }
    }

    /// Does the map refer to generation `generation` of chunk `index`?
    /// Indexes asked about must not decrease from call to call (the same
    /// index may be asked about again, for each of its generations).
    pub async fn holds(
        &mut self,
        store: &dyn ObjectStore,
        vol: &str,
        index: u64,
        generation: u64,
    ) -> VolumeResult<bool> {
        while self.slice.as_ref().is_none_or(|s| s.last < index) {
            if self.next >= self.view.slices() {
                return Ok(false);
            }
            self.slice = Some(self.view.slice(store, vol, self.next).await?);
            self.next += 1;
            self.pos = 0;
        }
        let Some(s) = self.slice.as_ref() else {
            return Ok(false);
        };
        // Never past `index` itself: its other generations come next.
        while s.entries.get(self.pos).is_some_and(|(i, _)| *i < index) {
            self.pos += 1;
        }
        Ok(s.entries.get(self.pos).is_some_and(|(i, r)| {
            *i == index && matches!(r, ChunkRef::Stored { generation: g, .. } if *g == generation)
        }))
    }

    /// Read the slices not read yet: every part of the checkpoint is then
    /// known to be there and whole (the walk reads only the parts whose
    /// ranges hold a listed chunk).
    pub async fn finish(&mut self, store: &dyn ObjectStore, vol: &str) -> VolumeResult<()> {
        while self.next < self.view.slices() {
            self.slice = Some(self.view.slice(store, vol, self.next).await?);
            self.next += 1;
            self.pos = 0;
        }
        Ok(())
    }
}
