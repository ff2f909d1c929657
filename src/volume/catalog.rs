//! The catalog of volumes in a store: which prefixes are s3blk volumes, and
//! the bookkeeping objects kept beside the volume format proper.
//!
//! Owns: listing the volumes under a store root; deleting a volume;
//! reaping deleted volumes once nothing depends on them; attachment records
//! (ControllerPublish); clone markers and the pins that keep the source of
//! a clone or of a restored volume readable; the marker that names a prefix
//! as a store the CSI controller provisions into. Does not own the volume
//! format (`format.rs`), compaction (`compact.rs`) or any protocol's error
//! codes: callers map [`CatalogError`] at their edge.
//!
//! Objects it adds under a volume's prefix:
//! - `deleted.json`, the tombstone: the volume is deleted. Written before
//!   the first object is deleted and removed after the last one, so the
//!   remains of an interrupted delete are recognisable as s3blk's. While
//!   snapshots or clones still read through the volume it is only hidden,
//!   and reaped when the last of them goes.
//! - `attachments/<node>.json`: the volume is published to that node.
//! - `clones/<name>.json`: the volume `<name>` reads through this one.
//! - `snapshots/clone-<name>.json`: the pin that keeps what that clone reads.
//! - `provisioned.json`: the CSI parameters and capabilities CreateVolume
//!   made the volume with, so a repeated CreateVolume can tell a retry from
//!   a conflicting request.
//! - `source.json`: the volume a clone or restore is being made from,
//!   written before the pin and marker it adds there and removed once its
//!   `volume.json` landed. A create that died in between leaves it, and the
//!   delete of the name lets go of that source by it (a prefix without
//!   `volume.json` names no source otherwise).
//!
//! And at a store root: `.s3blk-store.json`, written when the controller
//! first provisions a volume there; `.s3blk-stores/<name>.json`, one per
//! other store the controller provisioned into (kept under the controller's
//! own `--store`, so listing can find every store); `.s3blk-nodes/<node>.json`,
//! written by each node plugin at start-up (ControllerPublish accepts only
//! nodes that registered). Prefixes starting with `.s3blk-` are s3blk's own
//! and never listed as volumes (a volume name never starts with a dot).
//!
//! Deletion follows design invariant 5: only s3blk's own object names, and
//! only under a prefix that proves to be an s3blk volume (its `volume.json`
//! or its tombstone). A prefix that also holds anything else (another
//! volume, a store's objects, someone else's data) is left whole; absence of
//! `volume.json` alone never marks anything for deletion.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::engine::read_snapshot;
use super::format::{self, SnapshotRecord};
use super::{VolumeError, replay};
use crate::clock::Clock;
use crate::store::{self, DynStore, ListRequest, ObjectInfo, ObjectStore, PutMode, StoreError};

/// The tombstone's name under a volume's prefix.
pub const TOMBSTONE: &str = "deleted.json";
/// The store marker's name under a store root.
pub const STORE_MARKER: &str = ".s3blk-store.json";
/// The record of a volume's CSI parameters, under its prefix.
pub const PROVISIONED: &str = "provisioned.json";
/// The record of the source a clone or restore under construction pins, under its prefix.
pub const SOURCE: &str = "source.json";
/// Kept by a node's stage while it makes the volume's filesystem (see
/// the node plugin): a stage that finds it may make it again over what an
/// mkfs cut short left.
pub const FORMATTING: &str = "formatting.json";
/// Under a store root: the store registry and the node records.
pub const STORES_DIR: &str = ".s3blk-stores/";
pub const NODES_DIR: &str = ".s3blk-nodes/";
/// Deletes in flight at once.
const DELETE_CONCURRENCY: usize = 32;
/// Listings a delete makes to catch objects that appeared while it ran
/// (a writer that had not stopped) before it leaves them to the reaper.
const DELETE_ROUNDS: usize = 3;

/// Why the catalog refused or failed. Each names the volume (or prefix) it is about.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "{volume} is not an s3blk volume (it holds {objects} objects but neither volume.json nor a deletion marker); nothing was deleted"
    )]
    NotAVolume { volume: String, objects: usize },
    #[error("{volume} is the root of a store of volumes; nothing was deleted")]
    StoreRoot { volume: String },
    #[error("{volume} holds a {what} s3blk cannot take for its own ({why}): nothing was deleted")]
    ForeignMarker { volume: String, what: &'static str, why: String },
    #[error("{volume} holds another volume ({inner}); nothing was deleted")]
    HoldsVolume { volume: String, inner: String },
    #[error("{volume} holds {objects} objects s3blk did not write (such as {example}); nothing was deleted")]
    ForeignObjects { volume: String, objects: usize, example: String },
    #[error("volume {volume} is still published to node {node}")]
    Published { volume: String, node: String },
    #[error(
        "volume {volume} has clones reading through its snapshots ({}); delete them first, or pass --force to break them",
        .clones.join(", ")
    )]
    HasClones { volume: String, clones: Vec<String> },
    #[error("volume {volume} is being deleted; its name is free once the deletion has finished")]
    BeingDeleted { volume: String },
    #[error("snapshot {snapshot} of {volume} was deleted")]
    SnapshotGone { volume: String, snapshot: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type CatalogResult<T> = Result<T, CatalogError>;

fn describe(store: &dyn ObjectStore, vol: &str) -> String {
    format!("{}/{}", store.describe(), vol.trim_end_matches('/'))
}

// ---------------------------------------------------------------- names

pub fn tombstone_key(vol: &str) -> String {
    format!("{vol}{TOMBSTONE}")
}

pub fn attachment_key(vol: &str, node: &str) -> String {
    format!("{vol}attachments/{}.json", object_name(node))
}

pub fn store_marker_key(root: &str) -> String {
    format!("{root}{STORE_MARKER}")
}

/// A Kubernetes name (`pvc-…`, `snapshot-…`, a node) as an object-name
/// component: `[a-z0-9._-]`, at most 80 characters; anything changed gets
/// a hash suffix so different names never collide.
pub fn object_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean == name && !clean.is_empty() && clean.len() <= 80 {
        return clean;
    }
    let short: String = clean.chars().take(70).collect();
    format!("{short}-{:08x}", crc32c::crc32c(name.as_bytes()))
}

/// `<dir><name>.json` with a single-segment name → the name.
fn json_in<'a>(rel: &'a str, dir: &str) -> Option<&'a str> {
    rel.strip_prefix(dir)?.strip_suffix(".json").filter(|n| !n.is_empty() && !n.contains('/'))
}

/// Objects the catalog and the engine keep under a volume beside the format
/// proper (`rel` is the key relative to the volume's prefix).
pub(crate) fn is_bookkeeping(rel: &str) -> bool {
    is_probe(rel)
        || rel == TOMBSTONE
        || rel == super::lease::LEASE_NAME
        || rel == PROVISIONED
        || rel == SOURCE
        || rel == FORMATTING
        // Named as `attachment_key` names them: a name `object_name` keeps.
        || json_in(rel, "attachments/").is_some_and(|n| object_name(n) == n)
        || json_in(rel, "clones/").is_some()
}

/// The conditional-write probe of create and compaction's clock probe
/// (`rel` relative to the volume's prefix): each is deleted right after it
/// was written, but a crash or a lost delete may leave it behind.
fn is_probe(rel: &str) -> bool {
    let hex16 = |h: &str| format::is_lower_hex(h, 16);
    rel.strip_prefix(store::PROBE_STEM).is_some_and(hex16)
        || rel.strip_prefix(format::CLOCK_PROBE_STEM).is_some_and(hex16)
}

/// Does the probe `rel` hold exactly what s3blk writes into it?
fn is_probe_body(rel: &str, body: &[u8]) -> bool {
    if rel.starts_with(store::PROBE_STEM) {
        store::PROBE_BODIES.contains(&body)
    } else {
        body == format::CLOCK_PROBE_BODY
    }
}

/// Is `key` one of the object names s3blk writes under the volume `vol`?
pub fn is_own_object(vol: &str, key: &str) -> bool {
    let Some(rel) = key.strip_prefix(vol) else { return false };
    key == format::meta_key(vol)
        || format::parse_journal_key(vol, key).is_some()
        || format::parse_checkpoint_key(vol, key).is_some()
        || format::parse_checkpoint_part_key(vol, key).is_some()
        || format::parse_chunk_key(vol, key).is_some()
        || json_in(rel, "snapshots/").is_some_and(|n| format::validate_snapshot_name(n).is_ok())
        || is_bookkeeping(rel)
}

/// Refuse a listing that holds anything but `vol`'s own objects, naming
/// the most telling stranger: a store's marker, another volume, or any.
fn check_all_own(store: &dyn ObjectStore, vol: &str, objects: &[ObjectInfo]) -> CatalogResult<()> {
    let foreign: Vec<&str> = objects.iter().map(|o| o.key.as_str()).filter(|k| !is_own_object(vol, k)).collect();
    let Some(first) = foreign.first() else { return Ok(()) };
    let volume = describe(store, vol);
    if foreign.iter().any(|k| k.strip_prefix(vol).is_some_and(|r| r == STORE_MARKER)) {
        return Err(CatalogError::StoreRoot { volume });
    }
    let nested = foreign
        .iter()
        .find_map(|k| k.strip_suffix("volume.json").or_else(|| k.strip_suffix(TOMBSTONE)).filter(|p| p.ends_with('/')));
    if let Some(inner) = nested {
        return Err(CatalogError::HoldsVolume { volume, inner: describe(store, inner) });
    }
    Err(CatalogError::ForeignObjects { volume, objects: foreign.len(), example: first.to_string() })
}

// ---------------------------------------------------------------- stores

/// Record that the controller provisions volumes under `root`.
pub async fn mark_store(store: &DynStore, root: &str, clock: &dyn Clock) -> CatalogResult<()> {
    let body = serde_json::json!({ "format_version": format::FORMAT_V1, "created_unix": clock.now_unix() });
    match store.put(&store_marker_key(root), Bytes::from(body.to_string()), PutMode::IfAbsent).await {
        Ok(()) | Err(StoreError::PreconditionFailed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Has the controller provisioned volumes under `root`?
pub async fn is_marked_store(store: &DynStore, root: &str) -> CatalogResult<bool> {
    Ok(store.head(&store_marker_key(root)).await?.is_some())
}

/// Record, under the controller's own store root `home`, that it also
/// provisions into the store at `url` (another bucket or prefix), so
/// listing can walk it. One object per store: concurrent creates never
/// lose each other's entry.
pub async fn register_store(store: &DynStore, home: &str, url: &str) -> CatalogResult<()> {
    let key = format!("{home}{STORES_DIR}{}.json", object_name(url));
    if store.head(&key).await?.is_some() {
        return Ok(());
    }
    let body = serde_json::json!({ "url": url });
    match store.put(&key, Bytes::from(body.to_string()), PutMode::IfAbsent).await {
        Ok(()) | Err(StoreError::PreconditionFailed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The store URLs registered under `home`, sorted (unreadable entries are
/// logged and skipped).
pub async fn registered_stores(store: &DynStore, home: &str) -> CatalogResult<Vec<String>> {
    #[derive(Deserialize)]
    struct Registered {
        url: String,
    }
    let mut out = Vec::new();
    for o in store::list_all(store.as_ref(), &format!("{home}{STORES_DIR}")).await? {
        match store.get(&o.key, None).await {
            Ok(b) => match serde_json::from_slice::<Registered>(&b) {
                Ok(r) => out.push(r.url),
                Err(e) => tracing::warn!(key = %o.key, error = %e, "unreadable store registry entry"),
            },
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

// ---------------------------------------------------------------- nodes

/// A node plugin's registration: it runs, and may be published to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub node_id: String,
    pub hostname: String,
    pub started_unix: i64,
    pub version: String,
}

pub fn node_key(root: &str, node: &str) -> String {
    format!("{root}{NODES_DIR}{}.json", object_name(node))
}

/// Write (or refresh) the node's record under the store root `root`.
pub async fn register_node(store: &DynStore, root: &str, rec: &NodeRecord) -> CatalogResult<()> {
    let body = serde_json::to_vec(rec).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    store.put(&node_key(root, &rec.node_id), Bytes::from(body), PutMode::Overwrite).await?;
    Ok(())
}

/// The node's record under `root`, if it registered there.
pub async fn node_record(store: &DynStore, root: &str, node: &str) -> CatalogResult<Option<NodeRecord>> {
    let key = node_key(root, node);
    match store.get(&key, None).await {
        Ok(b) => match serde_json::from_slice::<NodeRecord>(&b) {
            Ok(r) if r.node_id == node => Ok(Some(r)),
            // Another node whose name maps to the same object name, or garbage.
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "unreadable node record");
                Ok(None)
            }
        },
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------- provisioning record

/// What CreateVolume made a volume with, beyond what `volume.json` keeps:
/// compared when the same name is asked for again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Provisioned {
    /// The StorageClass parameters that shape the volume (fsType,
    /// mkfsOptions, cacheSize), sorted by key.
    pub parameters: std::collections::BTreeMap<String, String>,
    /// The requested capabilities, each as `block|mount:<fs>` `/` access mode, sorted.
    pub capabilities: Vec<String>,
}

pub async fn write_provisioned(store: &DynStore, vol: &str, p: &Provisioned) -> CatalogResult<()> {
    let body = serde_json::to_vec(p).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    store.put(&format!("{vol}{PROVISIONED}"), Bytes::from(body), PutMode::Overwrite).await?;
    Ok(())
}

/// The record, or `None` for a volume made without one (by the CLI, or
/// before the controller kept it).
pub async fn read_provisioned(store: &DynStore, vol: &str) -> CatalogResult<Option<Provisioned>> {
    let key = format!("{vol}{PROVISIONED}");
    match store.get(&key, None).await {
        Ok(b) => Ok(serde_json::from_slice(&b).map_err(|e| VolumeError::Corrupt(format!("{key}: {e}"))).map(Some)?),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------- size

/// The volume's size without replaying its journal: the size in its
/// newest journal record, else in its newest checkpoint, else in
/// `volume.json`. One listing of the journal (a page per thousand records)
/// and one or two GETs. A record a fenced writer slipped in at the head
/// (see `Replayed::stale_records`) is taken at its word.
pub async fn current_size(store: &DynStore, vol: &str, meta: &format::VolumeMeta) -> CatalogResult<u64> {
    // An encrypted volume's records say nothing without its key: its size
    // at creation, as `volume.json` says (listings carry no key).
    if meta.encryption.is_some() && !super::keys::seals(store.as_ref(), vol) {
        return Ok(meta.size);
    }
    let head = store::list_all(store.as_ref(), &format::journal_prefix(vol))
        .await?
        .iter()
        .filter_map(|o| format::parse_journal_key(vol, &o.key))
        .max();
    if let Some(seq) = head
        && let Some((rec, _)) = replay::read_record(store.as_ref(), vol, seq).await?
    {
        return Ok(rec.size);
    }
    let cp = store::list_all(store.as_ref(), &format::checkpoint_prefix(vol))
        .await?
        .into_iter()
        .filter_map(|o| format::parse_checkpoint_key(vol, &o.key).map(|s| (s, o.key)))
        .max_by_key(|(s, _)| *s);
    if let Some((_, key)) = cp {
        match store.get(&key, None).await {
            Ok(b) => return Ok(format::StoredCheckpoint::decode(&b, &key).map_err(VolumeError::from)?.size()),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(meta.size)
}

// ---------------------------------------------------------------- listing

/// What a prefix directly under a store root holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// A volume in use.
    Live,
    /// Tombstoned: kept for its snapshots or clones, or an interrupted delete.
    Deleted,
    /// Neither `volume.json` nor a tombstone: not a volume (never touched).
    Other,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// The key prefix, ending with `/`.
    pub prefix: String,
    /// The last segment of the prefix.
    pub name: String,
    pub state: EntryState,
}

/// Every prefix directly under `root`, sorted by key.
pub async fn list(store: &DynStore, root: &str) -> CatalogResult<Vec<Entry>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list(ListRequest { prefix: root, start_after: after.as_deref(), delimiter: true, max_keys: 1000 })
            .await?;
        for p in page.common_prefixes {
            if format::volume_name(&p).starts_with(".s3blk-") {
                // The store registry and node records: s3blk's, never a volume.
                continue;
            }
            let state = if store.head(&tombstone_key(&p)).await?.is_some() {
                EntryState::Deleted
            } else if store.head(&format::meta_key(&p)).await?.is_some() {
                EntryState::Live
            } else {
                EntryState::Other
            };
            let name = format::volume_name(&p).to_string();
            out.push(Entry { prefix: p, name, state });
        }
        match store::advance(root, after.as_deref(), page.next_start_after)? {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    out.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(out)
}

/// Is the volume tombstoned (deleted, perhaps still kept for dependants)?
pub async fn is_deleted(store: &DynStore, vol: &str) -> CatalogResult<bool> {
    Ok(store.head(&tombstone_key(vol)).await?.is_some())
}

/// Refuse to create a volume where a deleted one is still being removed:
/// the reaper would take the new volume for the remains of the old.
pub async fn check_name_free(store: &DynStore, vol: &str) -> CatalogResult<()> {
    if is_deleted(store, vol).await? {
        return Err(CatalogError::BeingDeleted { volume: describe(store.as_ref(), vol) });
    }
    Ok(())
}

// ---------------------------------------------------------------- attachments

/// A ControllerPublish: the volume is attached to `node_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub node_id: String,
    pub readonly: bool,
    pub created_unix: i64,
}

pub async fn attachments(store: &DynStore, vol: &str) -> CatalogResult<Vec<Attachment>> {
    let mut out = Vec::new();
    for o in store::list_all(store.as_ref(), &format!("{vol}attachments/")).await? {
        let body = match store.get(&o.key, None).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<Attachment>(&body) {
            Ok(a) => out.push(a),
            Err(e) => tracing::warn!(key = %o.key, error = %e, "unreadable attachment record"),
        }
    }
    Ok(out)
}

pub async fn attach(store: &DynStore, vol: &str, a: &Attachment) -> CatalogResult<()> {
    let body = serde_json::to_vec(a).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    store.put(&attachment_key(vol, &a.node_id), Bytes::from(body), PutMode::Overwrite).await?;
    Ok(())
}

pub async fn detach(store: &DynStore, vol: &str, node: &str) -> CatalogResult<()> {
    Ok(store.delete(&attachment_key(vol, node)).await?)
}

// ---------------------------------------------------------------- clones and pins

/// The marker a source volume keeps for a clone (or restored volume) that reads through it.
#[derive(Debug, Serialize, Deserialize)]
struct CloneMarker {
    clone: String,
    seq: u64,
}

/// Record in `source` that the volume at `clone` (named `clone_id` for
/// people) reads through it as of `seq`.
pub async fn add_clone_marker(
    store: &DynStore,
    source: &str,
    clone: &str,
    clone_id: &str,
    seq: u64,
) -> CatalogResult<()> {
    let body = serde_json::to_vec(&CloneMarker { clone: clone_id.to_string(), seq })
        .map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    store.put(&format::clone_marker_key(source, clone), Bytes::from(body), PutMode::Overwrite).await?;
    Ok(())
}

/// Pin what a volume restored from the snapshot `snap` of `source` reads:
/// a snapshot of its own at the same seq, which compaction keeps until the
/// restored volume is deleted, whatever happens to `snap`. Fails when
/// `snap` is deleted before the pin is in place (compaction may then
/// already have folded its seq away).
///
/// `adopted` is set when the pin was already there at that seq: an earlier
/// attempt's of this create, or another create's of the same name still
/// running (another controller's, across a leader handover), whose volume
/// reads through it. Such a pin is never deleted here, and the caller must
/// not let go of it on a failure either.
pub async fn pin_snapshot_for(
    store: &DynStore,
    source: &str,
    snap: &SnapshotRecord,
    clone: &str,
    clone_id: &str,
    adopted: &mut bool,
) -> CatalogResult<SnapshotRecord> {
    pin_snapshot(store, source, snap, clone, clone_id, Some(adopted)).await
}

/// [`pin_snapshot_for`]; a pin already there at the same seq is taken for
/// this create's own (a retry's) only when `adopted` is given, else it is
/// another create's of the same clone: AlreadyExists.
async fn pin_snapshot(
    store: &DynStore,
    source: &str,
    snap: &SnapshotRecord,
    clone: &str,
    clone_id: &str,
    mut adopted: Option<&mut bool>,
) -> CatalogResult<SnapshotRecord> {
    // Without a token: every restore of this clone writes the same bytes,
    // so the pin found there cannot be told to be this call's own.
    let mut pin = SnapshotRecord {
        name: format::clone_pin_name(clone),
        token: None,
        clone: Some(clone_id.to_string()),
        ..snap.clone()
    };
    super::keys::tag_snapshot(store.as_ref(), source, &mut pin);
    let body = serde_json::to_vec_pretty(&pin).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    let key = format::snapshot_key(source, &pin.name);
    match store.put(&key, Bytes::from(body), PutMode::IfAbsent).await {
        Ok(()) => {}
        Err(StoreError::PreconditionFailed(_)) => {
            let Some(adopted) = adopted.as_deref_mut() else {
                return Err(VolumeError::AlreadyExists(format!("snapshot {}", pin.name)).into());
            };
            // A retried restore's pin, or another running restore's of this
            // name: it is not this call's to delete from here on.
            let existing = read_snapshot(store, source, &pin.name).await?;
            if existing.seq != snap.seq {
                return Err(VolumeError::AlreadyExists(format!("snapshot {} at another seq", pin.name)).into());
            }
            if existing.clone.as_deref().is_some_and(|c| !names_clone(c, clone)) {
                return Err(VolumeError::AlreadyExists(format!(
                    "snapshot {}, the pin of another clone of that name",
                    pin.name
                ))
                .into());
            }
            *adopted = true;
        }
        Err(e) => return Err(e.into()),
    }
    // Compaction keeps what any snapshot it lists needs. The snapshot still
    // being there after the pin was written means every compaction pass
    // since has seen one of the two.
    match read_snapshot(store, source, &snap.name).await {
        Ok(r) if r.seq == snap.seq => Ok(pin),
        Ok(_) | Err(VolumeError::NotFound(_)) => {
            // A pin found there stays: another restore of this name may
            // have seen the snapshot after the pin landed and be reading
            // through it now. So does one this call wrote when `adopted`
            // is set on entry (CreateVolume: another create may have
            // taken it over since); otherwise it goes.
            if !adopted.is_some_and(|a| *a) {
                store.delete(&key).await?;
            }
            Err(CatalogError::SnapshotGone { volume: describe(store.as_ref(), source), snapshot: snap.name.clone() })
        }
        Err(e) => Err(e.into()),
    }
}

/// Create `clone`, a new volume in the same store that reads through
/// `source`: as of its snapshot `snapshot` (which gets a pin of its own
/// for the clone, so deleting the snapshot later keeps what the clone
/// reads), or as of the source's committed state now (`None`). The clone
/// has the source's chunk size, and `size` (at least the source's size
/// then; `None`: the same). The CLI's `volume clone`; the CSI controller
/// takes the same steps in CreateVolume.
///
/// Everything that can be refused is checked before anything is written:
/// the target exists, is inside or around the source, the source already
/// has a clone of that name (pins and markers are named by the clone's last
/// path component), the size is too small. A failure after that removes
/// only the pin and marker this call wrote.
pub async fn clone_volume(
    store: &DynStore,
    source: &str,
    snapshot: Option<&str>,
    clone: &str,
    clone_id: &str,
    size: Option<u64>,
    clock: &dyn Clock,
) -> CatalogResult<super::format::VolumeMeta> {
    let meta = replay::read_meta(store.as_ref(), source).await?;
    // An encrypted source is read with its key: without it, nothing is
    // written into it (a pin, a marker, the record of the source).
    super::keys::require(store.as_ref(), source, &meta)?;
    if is_deleted(store, source).await? {
        return Err(CatalogError::BeingDeleted { volume: describe(store.as_ref(), source) });
    }
    if clone.starts_with(source) || source.starts_with(clone) {
        return Err(VolumeError::InvalidArgument(format!(
            "{} and its clone cannot be inside one another",
            describe(store.as_ref(), source)
        ))
        .into());
    }
    check_name_free(store, clone).await?;
    let marker = format::clone_marker_key(source, clone);
    let pin_name = format::clone_pin_name(clone);
    let pin_key = format::snapshot_key(source, &pin_name);
    match replay::read_meta(store.as_ref(), clone).await {
        Ok(existing) => {
            // An earlier attempt of this clone that wrote volume.json and
            // stopped before its create record: finished now, while its
            // marker is still there (`finish_create` checks the pin it
            // reads through), when asked for its size (or none).
            let ours = existing.parent.as_ref().is_some_and(|p| p.volume == source && p.snapshot == pin_name)
                && size.is_none_or(|s| s == existing.size);
            if ours
                && store.head(&marker).await?.is_some()
                && super::Volume::finish_create(store, clone, &existing).await?
            {
                forget_source(store, clone).await;
                return Ok(existing);
            }
            return Err(VolumeError::AlreadyExists(describe(store.as_ref(), clone)).into());
        }
        Err(VolumeError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    for key in [&marker, &pin_key] {
        if store.head(key).await?.is_some() {
            return Err(VolumeError::AlreadyExists(format!(
                "{} already has a clone named {} ({key}); give the clone another name",
                describe(store.as_ref(), source),
                format::volume_name(clone)
            ))
            .into());
        }
    }
    let wanted = match snapshot {
        Some(name) => read_snapshot(store, source, name).await?.size,
        None => current_size(store, source, &meta).await?,
    };
    if size.is_some_and(|s| s < wanted) {
        return Err(VolumeError::InvalidArgument(format!(
            "a clone cannot be smaller than its source ({wanted} bytes)"
        ))
        .into());
    }
    // Before anything is written in the source: a create that dies after
    // that leaves this record, by which a delete of `clone` lets go of it.
    record_source(store, clone, source, clone_id).await?;
    let rec = match snapshot {
        Some(name) => match read_snapshot(store, source, name).await {
            // The pin's name was free above: one there now is another
            // create's of this clone, whose create may still be running
            // (letting go of it on a failure here would take its pin).
            Ok(snap) => pin_snapshot(store, source, &snap, clone, clone_id, None).await,
            Err(e) => Err(e.into()),
        },
        None => {
            super::engine::snapshot_committed(store, source, &pin_name, Some(clone_id), clock).await.map_err(Into::into)
        }
    };
    let rec = match rec {
        Ok(r) => r,
        // A pin of that name appeared since it was checked: another
        // create's, as is the source record then.
        Err(e @ CatalogError::Volume(VolumeError::AlreadyExists(_))) => return Err(e),
        Err(e) => {
            // The pin may have landed though its answer was lost: let go of
            // it, and keep the record of the source when that fails too.
            match release_source(store, source, clone).await {
                Ok(()) => forget_source(store, clone).await,
                Err(r) => {
                    tracing::warn!(volume = %describe(store.as_ref(), source), error = %r, "releasing a failed clone's pin")
                }
            }
            return Err(e);
        }
    };
    // From here on the pin is this call's (its name was free above).
    let created = async {
        let size = size.unwrap_or(rec.size).max(rec.size);
        add_clone_marker(store, source, clone, clone_id, rec.seq).await?;
        let parent = format::ParentRef { volume: source.to_string(), snapshot: rec.name.clone(), seq: rec.seq };
        let opts = super::engine::CreateOptions {
            size,
            chunk_size: meta.chunk_size,
            parent: Some(parent),
            single_writer: meta.single_writer,
            compression: meta.compression,
            encryption: super::keys::NewKeys::inherited(store.as_ref()),
        };
        Ok::<_, CatalogError>(super::Volume::create(store.clone(), clone, opts, clock).await?)
    }
    .await;
    // Let go of the source again, unless another create of the same name
    // won a race: the pin and marker are then that clone's. The record of
    // the source goes once it is no longer needed: the clone exists, or it
    // let go of the source; otherwise it stays for a delete of the name.
    match &created {
        Ok(_) => forget_source(store, clone).await,
        Err(CatalogError::Volume(VolumeError::AlreadyExists(_))) => {}
        // volume.json landed (or may have): the clone reads through the
        // pin, and a retry finishes it or a delete lets go of it.
        Err(_) if !matches!(store.head(&format::meta_key(clone)).await, Ok(None)) => {}
        Err(_) => match release_source(store, source, clone).await {
            Ok(()) => forget_source(store, clone).await,
            Err(e) => {
                tracing::warn!(volume = %describe(store.as_ref(), source), error = %e, "releasing a failed clone's pin")
            }
        },
    }
    created
}

/// A clone (or restored volume) lets go of its source: the pin and then
/// the marker go, and the source too when it was deleted and this was the
/// last thing that kept it (if that fails, the reaper tries again later).
/// Pin first: a marker gone means this clone's pin went before it, so a
/// pin of the name found without a marker is never this clone's (see
/// [`release_own_source`]), and a delete that failed between the two
/// finds its marker when it runs again. A pin that names another clone
/// (of the same last path segment, in another folder) is that clone's,
/// and stays.
pub async fn release_source(store: &DynStore, source: &str, clone: &str) -> CatalogResult<()> {
    let pin = format::snapshot_key(source, &format::clone_pin_name(clone));
    match store.get(&pin, None).await {
        Ok(b) => match SnapshotRecord::decode(&b, &pin) {
            Ok(r) if r.clone.as_deref().is_none_or(|c| names_clone(c, clone)) => store.delete(&pin).await?,
            // Another clone's pin, and then the marker (which follows its
            // pin) is that clone's too, or it is on its way; or a pin that
            // does not read, which is nobody's to take: both stay.
            found => {
                let why = match found {
                    Ok(r) => format!("it is the pin of {}", r.clone.unwrap_or_default()),
                    Err(e) => format!("it does not read ({e})"),
                };
                tracing::warn!(
                    volume = %describe(store.as_ref(), clone),
                    source = %describe(store.as_ref(), source),
                    "the source's pin and marker of this name are left alone: {why}"
                );
                return Ok(());
            }
        },
        Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    store.delete(&format::clone_marker_key(source, clone)).await?;
    if let Err(e) = Box::pin(reap(store, source, None)).await {
        tracing::warn!(volume = %describe(store.as_ref(), source), error = %e, "reaping a deleted source failed");
    }
    Ok(())
}

/// How [`let_go_of_parent`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentOutcome {
    /// The volume is no clone, and was none.
    NotAClone,
    /// `volume.json` names no parent any more, and the parent's pin and
    /// marker for this volume are gone (the parent may now be deleted).
    LetGo { parent: String },
    /// Kept: these snapshots (or pins of this volume's own clones) read
    /// seqs before the copy was committed, where the parent still gives
    /// chunks. Delete them and flatten again.
    Kept { snapshots: Vec<String> },
}

/// Snapshot records of `vol` (clones' pins included) at seqs before `seq`.
/// One that does not read counts, as it may pin anything.
async fn snapshots_before(store: &DynStore, vol: &str, seq: u64) -> CatalogResult<Vec<String>> {
    let prefix = format::snapshot_prefix(vol);
    let mut out = Vec::new();
    for o in store::list_all(store.as_ref(), &prefix).await? {
        let Some(name) = o.key.strip_prefix(&prefix).and_then(|n| n.strip_suffix(".json")) else { continue };
        let rec = match store.get(&o.key, None).await {
            Ok(b) => SnapshotRecord::decode(&b, &o.key).map(|r| r.seq),
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if rec.as_ref().map_or(true, |s| *s < seq) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// The second half of a flatten: `vol`, whose own chunks cover from seq
/// `seq` on everything its parents gave it ([`super::Volume::copy_parents`];
/// `None` when this run copied nothing), lets go of its parent. In two
/// steps, each a change of `volume.json`:
///
/// 1. `flattened` is added beside `parent`: the seq from which the clone
///    needs no parent is on record (a later run goes on from it, however
///    far the head moved), and from then on a snapshot recorded at an
///    earlier seq withdraws itself (`record_snapshot`).
/// 2. The snapshots are listed: one at an earlier seq (a clone's pin
///    among them) keeps the parent ([`ParentOutcome::Kept`]; step 1 stays).
///    With none, `parent` goes, and then the parent's pin and marker for
///    this volume.
///
/// A run cut short anywhere leaves a clone that reads the same (the parent
/// goes only after `volume.json` no longer names it); run again, it
/// finishes. `store` must be unlocked for an encrypted volume
/// (`volume.json` carries a tag over its fields).
pub async fn let_go_of_parent(store: &DynStore, vol: &str, seq: Option<u64>) -> CatalogResult<ParentOutcome> {
    let meta = replay::read_meta(store.as_ref(), vol).await?;
    let (parent, covered) = match (&meta.parent, &meta.flattened) {
        (None, None) => return Ok(ParentOutcome::NotAClone),
        (None, Some(f)) => {
            // Let go of: what may be left is the pin and marker.
            release_flattened(store, &f.parent.volume, vol).await?;
            return Ok(ParentOutcome::LetGo { parent: f.parent.volume.clone() });
        }
        (Some(p), Some(f)) if f.parent == *p => (p.clone(), f.seq),
        (Some(p), _) => {
            let Some(seq) = seq else {
                return Err(VolumeError::InvalidArgument(format!(
                    "{}: its parent's chunks have not been copied yet; flatten it first",
                    describe(store.as_ref(), vol)
                ))
                .into());
            };
            let flattened = Some(format::FlattenedFrom { parent: p.clone(), seq });
            change_meta(store, vol, |m| (m.parent.as_ref() == Some(p)).then(|| m.flattened = flattened.clone()))
                .await?;
            (p.clone(), seq)
        }
    };
    let early = snapshots_before(store, vol, covered).await?;
    if !early.is_empty() {
        return Ok(ParentOutcome::Kept { snapshots: early });
    }
    let flattened = Some(format::FlattenedFrom { parent: parent.clone(), seq: covered });
    change_meta(store, vol, |m| {
        (m.parent.as_ref() == Some(&parent) && m.flattened == flattened).then(|| m.parent = None)
    })
    .await?;
    release_own_source(store, &parent.volume, vol).await?;
    Ok(ParentOutcome::LetGo { parent: parent.volume })
}

/// Change `vol`'s `volume.json` with `change` (`None`: it no longer
/// applies: the flatten stops, to be run again), replacing it only while
/// it is still what was read ([`super::keys::change_meta`]): a change that
/// landed meanwhile (a rekey) is read again and kept, and `change` applied
/// to it. A store without conditional replaces gets an unconditional
/// write; the check after it then finds a change another undid (an error,
/// and nothing let go of). That check looks at what the flatten changes
/// only: a rekey landing right after this step is no conflict.
async fn change_meta(
    store: &DynStore,
    vol: &str,
    change: impl Fn(&mut format::VolumeMeta) -> Option<()>,
) -> CatalogResult<()> {
    let changed = |why: &str| -> VolumeError {
        VolumeError::Store(StoreError::Transient(format!(
            "{}: volume.json {why} while it was being flattened (a rekey or another flatten at the same time?); \
             run flatten again",
            describe(store.as_ref(), vol)
        )))
    };
    let written = super::keys::change_meta(store, vol, "it was being flattened", |mut next| {
        change(&mut next).ok_or_else(|| changed("changed"))?;
        super::keys::retag(store.as_ref(), vol, &mut next)?;
        Ok(Some(next))
    })
    .await?;
    let Some(next) = written else { return Ok(()) };
    let now = replay::read_meta(store.as_ref(), vol).await?;
    if (&now.parent, &now.flattened) != (&next.parent, &next.flattened) {
        return Err(changed("was changed by another").into());
    }
    Ok(())
}

/// The pin and marker a flatten of `vol` cut short left in `source`, if
/// any (none is the usual case: no warning then).
async fn release_flattened(store: &DynStore, source: &str, vol: &str) -> CatalogResult<()> {
    match store.head(&format::clone_marker_key(source, vol)).await? {
        Some(_) => release_own_source(store, source, vol).await,
        None => Ok(()),
    }
}

/// [`release_source`] for a volume being deleted, whose marker in
/// `source` must name it: pins and markers are named by a clone's last
/// path segment, so after an earlier run of this delete let go of them, a
/// clone of the same name in another folder may have taken the names (and
/// its clone reads through that pin). Without a marker, the pin is left:
/// this volume's went before its marker, so it is such a clone's, whose
/// marker follows its pin.
async fn release_own_source(store: &DynStore, source: &str, vol: &str) -> CatalogResult<()> {
    let key = format::clone_marker_key(source, vol);
    let mine = match store.get(&key, None).await {
        Ok(b) => serde_json::from_slice::<CloneMarker>(&b).ok().is_some_and(|m| marker_names(&m, vol)),
        Err(StoreError::NotFound(_)) => false,
        Err(e) => return Err(e.into()),
    };
    if !mine {
        tracing::warn!(
            volume = %describe(store.as_ref(), vol),
            source = %describe(store.as_ref(), source),
            "the source's marker for this name is gone or another clone's: its pin of that name is left alone"
        );
        return Ok(());
    }
    release_source(store, source, vol).await
}

/// Does `m` name the clone under `vol`? Markers name clones by their
/// volume URL (or, written by callers of the library, by its prefix).
fn marker_names(m: &CloneMarker, vol: &str) -> bool {
    names_clone(&m.clone, vol)
}

/// Does `named` (a clone as a marker or pin names it) name the clone under `vol`?
pub fn names_clone(named: &str, vol: &str) -> bool {
    named.trim_end_matches('/') == vol.trim_end_matches('/')
        || crate::location::Location::parse(named, true).is_ok_and(|l| l.prefix == vol)
}

/// What `source.json` holds: where the pin and marker of a clone or
/// restore under construction are, and the name its marker gives it.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceRecord {
    source: String,
    clone: String,
}

fn source_key(vol: &str) -> String {
    format!("{vol}{SOURCE}")
}

/// Record under `clone` (which has no `volume.json` yet) that it is being
/// made from `source`, before anything is written there: a create that dies
/// after pinning the source leaves the record, and a delete of `clone` lets
/// go of the source by it. A record of another source (a failed attempt
/// with another source under the same name) is let go of first.
pub async fn record_source(store: &DynStore, clone: &str, source: &str, clone_id: &str) -> CatalogResult<()> {
    let rec = SourceRecord { source: source.to_string(), clone: clone_id.to_string() };
    if let Some(old) = read_source(store, clone).await?
        && old != rec
    {
        release_recorded_source(store, clone, &old).await?;
    }
    let body = serde_json::to_vec(&rec).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    store.put(&source_key(clone), Bytes::from(body), PutMode::Overwrite).await?;
    Ok(())
}

/// The create of `clone` finished (its `volume.json` names the source now)
/// or let go of its source itself: the record goes. Failing to delete it
/// harms nothing (it goes with the volume), so it is only logged.
pub async fn forget_source(store: &DynStore, clone: &str) {
    if let Err(e) = store.delete(&source_key(clone)).await {
        tracing::warn!(volume = %describe(store.as_ref(), clone), error = %e, "deleting the record of a clone's source");
    }
}

async fn read_source(store: &DynStore, clone: &str) -> CatalogResult<Option<SourceRecord>> {
    let key = source_key(clone);
    match store.get(&key, None).await {
        Ok(b) => Ok(Some(parse_source(&b).ok_or_else(|| VolumeError::Corrupt(format!("{key}: not a source record")))?)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The record, when `body` is exactly what [`record_source`] writes.
fn parse_source(body: &[u8]) -> Option<SourceRecord> {
    let rec: SourceRecord = serde_json::from_slice(body).ok()?;
    (serde_json::to_vec(&rec).ok()? == body && rec.source.ends_with('/')).then_some(rec)
}

/// Let go of the source a record under `clone` names: its marker and pin
/// for `clone`, unless the marker there names another clone (then both are
/// that clone's, and stay).
async fn release_recorded_source(store: &DynStore, clone: &str, rec: &SourceRecord) -> CatalogResult<()> {
    match store.get(&format::clone_marker_key(&rec.source, clone), None).await {
        Ok(b) => {
            if serde_json::from_slice::<CloneMarker>(&b).is_ok_and(|m| m.clone != rec.clone) {
                return Ok(());
            }
        }
        Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    release_source(store, &rec.source, clone).await
}

/// Do snapshots or clones still read through the volume? Every clone
/// reads through a pin of its own, a snapshot record (a create writes the
/// pin before the clone's marker; a delete removes the pin before the
/// marker): a marker without its pin keeps nothing the clone reads, and is
/// no dependant. One is left when a delete stops between the two (its
/// rerun removes it), or when a marker's PUT lands long after the clone's
/// delete let go of the source.
pub async fn has_dependants(store: &DynStore, vol: &str) -> CatalogResult<bool> {
    let prefix = format::snapshot_prefix(vol);
    let page = store.list(ListRequest { prefix: &prefix, start_after: None, delimiter: false, max_keys: 1 }).await?;
    Ok(!page.objects.is_empty())
}

// ---------------------------------------------------------------- delete and reap

/// What a delete does about snapshots and clones that read through the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDependants {
    /// Hide the volume behind its tombstone and keep its objects until its
    /// last snapshot and clone is gone (CSI: snapshots outlive their volume).
    Keep,
    /// Refuse while clones read through it; its own snapshots go with it
    /// (the CLI).
    RefuseClones,
    /// Delete it anyway, published or not; clones reading through it break
    /// (the CLI's `--force`).
    Break,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Nothing was there: already deleted, or never created.
    Absent,
    /// Hidden behind its tombstone; objects kept for snapshots or clones.
    Kept,
    /// Gone: this many objects deleted.
    Deleted { objects: u64 },
    /// No volume: only what a create that failed left was there (probes
    /// whose delete was lost, or of a compaction cut short; the provisioning
    /// record; the record of its source, whose pin and marker for it were
    /// let go of); this many objects were deleted.
    Probes { objects: u64 },
}

/// Delete the volume under `vol`: prove it is one (its `volume.json` or
/// tombstone) holding nothing but s3blk's own objects, write the tombstone,
/// delete every object, the tombstone last. Refuses, deleting nothing, when
/// the proof is missing, anything else lives under the prefix, or (unless
/// `Break`) the volume is published. A prefix holding nothing but what a
/// create writes before `volume.json` (probes, the provisioning record, the
/// record of its source), each named and filled as s3blk writes them, is
/// what a create that failed left behind: the source it pinned is let go
/// of and the objects go (see [`delete_failed_create`]).
pub async fn delete_volume(
    store: &DynStore,
    vol: &str,
    on_dependants: OnDependants,
    clock: &dyn Clock,
) -> CatalogResult<DeleteOutcome> {
    let volume = describe(store.as_ref(), vol);
    if vol.is_empty() {
        return Err(CatalogError::StoreRoot { volume });
    }
    let objects = store::list_all(store.as_ref(), vol).await?;
    if objects.is_empty() {
        return Ok(DeleteOutcome::Absent);
    }
    check_all_own(store.as_ref(), vol, &objects)?;
    let has = |key: String| objects.iter().any(|o| o.key == key);
    let tombstoned = has(tombstone_key(vol));
    let has_meta = has(format::meta_key(vol));
    // Names alone prove nothing (`volume.json` and `deleted.json` are
    // common names): the prefix is a volume when its deletion marker is
    // one s3blk wrote, or else its volume.json decodes as a volume's.
    // Either gone since the listing: another delete is finishing (the
    // retry sees what it left).
    if tombstoned {
        match own_tombstone(store, vol).await? {
            Some(true) => {}
            Some(false) => {
                let why = "not the deletion marker s3blk writes".to_string();
                return Err(CatalogError::ForeignMarker { volume, what: "deleted.json", why });
            }
            None => return Err(CatalogError::BeingDeleted { volume }),
        }
    }
    if !tombstoned && has_meta {
        match replay::read_meta(store.as_ref(), vol).await {
            Ok(_) => {}
            // Another program's, damaged, or of a newer format.
            Err(VolumeError::Corrupt(why)) => {
                return Err(CatalogError::ForeignMarker { volume, what: "volume.json", why });
            }
            Err(VolumeError::NotFound(_)) => return Err(CatalogError::BeingDeleted { volume }),
            Err(e) => return Err(e.into()),
        }
    }
    if !tombstoned && !has_meta {
        if objects.iter().all(|o| o.key.strip_prefix(vol).is_some_and(is_create_remains)) {
            return delete_failed_create(store, vol, &objects).await;
        }
        return Err(CatalogError::NotAVolume { volume, objects: objects.len() });
    }
    if on_dependants != OnDependants::Break
        && let Some(a) = attachments(store, vol).await?.first()
    {
        return Err(CatalogError::Published { volume, node: a.node_id.clone() });
    }
    let clones = clones_in(vol, &objects);
    if on_dependants == OnDependants::RefuseClones && has_meta && !clones.is_empty() {
        return Err(CatalogError::HasClones { volume, clones });
    }
    write_tombstone(store, vol, clock).await?;
    // Without volume.json a tombstoned volume is an interrupted delete:
    // its snapshots and clones were gone or let go before it began.
    // Otherwise what keeps the volume is decided on a listing made after
    // the tombstone: a snapshot or a clone's pin recorded later (by
    // `snapshot_committed`) sees the tombstone once it has landed and
    // takes itself back, so none the listing misses is left reading
    // through what goes. A restore's pin (`pin_snapshot_for`) is taken
    // back when its snapshot is gone: under Keep that snapshot keeps the
    // volume; under RefuseClones it goes first. A clone pinned since the
    // first listing keeps the volume under RefuseClones too (it is
    // deleted, and kept for it), as does a clone's pin whose marker is
    // not there yet (a create under way writes the pin first; a pin
    // left by a create that died keeps it too, until `--force`).
    if has_meta && on_dependants != OnDependants::Break {
        if on_dependants == OnDependants::RefuseClones {
            // Its own snapshots go with it, before the listing: a restore
            // from one that pins after the listing then finds its
            // snapshot gone and takes its pin back.
            let own: Vec<String> = store::list_all(store.as_ref(), &format::snapshot_prefix(vol))
                .await?
                .into_iter()
                .filter(|o| {
                    json_in(o.key.strip_prefix(vol).unwrap_or_default(), "snapshots/")
                        .is_some_and(|n| !n.starts_with(format::CLONE_PIN_PREFIX))
                })
                .map(|o| o.key)
                .collect();
            store::delete_keys(store.as_ref(), own, DELETE_CONCURRENCY).await?;
        }
        let now = store::list_all(store.as_ref(), vol).await?;
        let clones = clones_in(vol, &now);
        let names: Vec<&str> = now.iter().filter_map(|o| json_in(o.key.strip_prefix(vol)?, "snapshots/")).collect();
        let snapshots = !names.is_empty();
        let pins = names.iter().any(|n| n.starts_with(format::CLONE_PIN_PREFIX));
        let keep = match on_dependants {
            OnDependants::Keep => !clones.is_empty() || snapshots,
            _ => !clones.is_empty() || pins,
        };
        if keep {
            tracing::info!(
                volume = %volume,
                objects = now.len(),
                clones = clones.len(),
                "volume deleted; its objects are kept for its snapshots or clones"
            );
            return Ok(DeleteOutcome::Kept);
        }
    }
    Ok(DeleteOutcome::Deleted { objects: finish_delete(store, vol).await? })
}

/// The clones reading through `vol` in a listing of it: markers with
/// their pin (see `has_dependants`: a marker without one keeps nothing).
fn clones_in(vol: &str, objects: &[ObjectInfo]) -> Vec<String> {
    let has = |key: String| objects.iter().any(|o| o.key == key);
    objects
        .iter()
        .filter_map(|o| json_in(o.key.strip_prefix(vol)?, "clones/"))
        .filter(|name| has(format::snapshot_key(vol, &format::clone_pin_name(name))))
        .map(str::to_string)
        .collect()
}

/// The deletion proper of a tombstoned volume: it lets go of its source
/// first (while its `volume.json` still names it), then every object goes.
async fn finish_delete(store: &DynStore, vol: &str) -> CatalogResult<u64> {
    match replay::read_meta(store.as_ref(), vol).await {
        Ok(m) => {
            if let Some(p) = m.parent {
                release_own_source(store, &p.volume, vol).await?;
            } else if let Some(f) = m.flattened {
                // A flatten cut short may have left the pin and marker.
                release_flattened(store, &f.parent.volume, vol).await?;
            }
        }
        // Gone: an earlier run of this delete let go of the source first.
        Err(VolumeError::NotFound(_)) => {}
        // Not read (the store failing): the delete stops, to be run again.
        // Going on would purge the only record of the source, whose pin
        // and marker for this volume would then stay for good.
        Err(VolumeError::Store(e)) => return Err(e.into()),
        // Damaged: no source can be known from it.
        Err(e) => {
            tracing::warn!(volume = vol, error = %e, "volume.json cannot be read; a source it may name keeps its pin and marker for this volume");
        }
    }
    purge(store, vol).await
}

/// A create of `vol` failed. Unless its `volume.json` (or a tombstone)
/// is there, which makes it a volume to delete as one, what a create
/// writes first (probes, the provisioning record, the record of its source)
/// goes, after the source it pinned is let go of. A prefix holding anything
/// else is left as it is.
pub async fn abandon_create(store: &DynStore, vol: &str) -> CatalogResult<()> {
    let objects = store::list_all(store.as_ref(), vol).await?;
    let remains = |o: &ObjectInfo| o.key.strip_prefix(vol).is_some_and(is_create_remains);
    if !objects.is_empty() && objects.iter().all(remains) {
        delete_failed_create(store, vol, &objects).await?;
    }
    Ok(())
}

/// What a create writes under a prefix before its `volume.json`.
fn is_create_remains(rel: &str) -> bool {
    is_probe(rel) || rel == PROVISIONED || rel == SOURCE
}

/// Does `body` under `rel` (one of [`is_create_remains`]) hold exactly what s3blk writes there?
fn is_create_remains_body(rel: &str, body: &[u8]) -> bool {
    match rel {
        PROVISIONED => serde_json::from_slice::<Provisioned>(body)
            .ok()
            .and_then(|p| serde_json::to_vec(&p).ok())
            .is_some_and(|b| b == body),
        SOURCE => parse_source(body).is_some(),
        _ => is_probe_body(rel, body),
    }
}

/// Delete what a create that failed left under a prefix with no volume
/// (probes whose delete was lost, the provisioning record, the record of
/// its source), after letting go of the source it pinned. Their names
/// alone carry s3blk's mark, and each must also hold exactly what s3blk
/// writes into it before any goes: a prefix with anything else is refused,
/// whole, as no volume (design invariant 5). The record of the source goes
/// last, so a delete cut short finds it again.
async fn delete_failed_create(store: &DynStore, vol: &str, objects: &[ObjectInfo]) -> CatalogResult<DeleteOutcome> {
    let mut keys = Vec::new();
    let mut source = None;
    for o in objects {
        let rel = o.key.strip_prefix(vol).unwrap_or(&o.key);
        match store.get(&o.key, None).await {
            Ok(body) if is_create_remains_body(rel, &body) => {
                if rel == SOURCE {
                    source = parse_source(&body);
                } else {
                    keys.push(o.key.clone());
                }
            }
            Ok(_) => {
                let volume = describe(store.as_ref(), vol);
                return Err(CatalogError::NotAVolume { volume, objects: objects.len() });
            }
            // Gone meanwhile (its writer's delete landed late).
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(rec) = &source {
        release_recorded_source(store, vol, rec).await?;
    }
    let n = keys.len() as u64 + u64::from(source.is_some());
    store::delete_keys(store.as_ref(), keys, DELETE_CONCURRENCY).await?;
    if source.is_some() {
        store.delete(&source_key(vol)).await?;
    }
    tracing::info!(volume = %describe(store.as_ref(), vol), objects = n, "no volume; deleted what a failed create left");
    Ok(DeleteOutcome::Probes { objects: n })
}

async fn write_tombstone(store: &DynStore, vol: &str, clock: &dyn Clock) -> CatalogResult<()> {
    let body = Bytes::from(format!("{{\"deleted_unix\":{}}}\n", clock.now_unix()));
    match store.put(&tombstone_key(vol), body, PutMode::IfAbsent).await {
        // Already tombstoned: keep the first one, its age counts.
        Ok(()) | Err(StoreError::PreconditionFailed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Is `body` a deletion marker as [`write_tombstone`] writes it: a JSON
/// object holding `deleted_unix`, an integer, and nothing else?
fn is_own_tombstone(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tombstone {
        #[serde(rename = "deleted_unix")]
        _deleted_unix: i64,
    }
    serde_json::from_slice::<Tombstone>(body).is_ok()
}

/// Is the deletion marker under `vol` one s3blk wrote? (`None` when absent.)
async fn own_tombstone(store: &DynStore, vol: &str) -> CatalogResult<Option<bool>> {
    match store.get(&tombstone_key(vol), None).await {
        Ok(b) => Ok(Some(is_own_tombstone(&b))),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// When the background reaper may act on a tombstone: once it is older
/// than `safety_age` on the store's clock, so a delete still running
/// finishes on its own.
#[derive(Debug, Clone, Copy)]
pub struct ReapAge {
    pub safety_age: Duration,
}

/// Remove a tombstoned volume once no snapshot or clone reads through it
/// any more: the volume kept for its dependants, or the remains of an
/// interrupted delete. Untombstoned prefixes are never touched. Returns the
/// number of objects deleted, `None` when there was nothing to do.
pub async fn reap(store: &DynStore, vol: &str, age: Option<ReapAge>) -> CatalogResult<Option<u64>> {
    let Some(tombstone) = tombstone_info(store, vol).await? else { return Ok(None) };
    if let Some(a) = age {
        // The tombstone's age on the store's clock, as compaction measures
        // it (design invariant 3). A store that keeps no modification time
        // leaves the age unknown: the tombstone counts as young, never aged
        // by a host's clock (its own `deleted_unix` is one).
        let Some(now) = super::compact::store_now(store, vol).await? else { return Ok(None) };
        let cutoff = now.saturating_sub(i64::try_from(a.safety_age.as_secs()).unwrap_or(i64::MAX));
        if tombstone.modified_unix.is_none_or(|w| w > cutoff) {
            return Ok(None);
        }
    }
    // volume.json goes first when the objects do: without it, this is an
    // interrupted delete to finish, whatever records are left.
    if store.head(&format::meta_key(vol)).await?.is_some() && has_dependants(store, vol).await? {
        return Ok(None);
    }
    Ok(Some(finish_delete(store, vol).await?))
}

/// The deletion marker under `vol`, when it is one s3blk wrote: another
/// program's `deleted.json` makes no prefix s3blk's to remove.
async fn tombstone_info(store: &DynStore, vol: &str) -> CatalogResult<Option<ObjectInfo>> {
    let key = tombstone_key(vol);
    let page = store.list(ListRequest { prefix: &key, start_after: None, delimiter: false, max_keys: 1 }).await?;
    let Some(info) = page.objects.into_iter().find(|o| o.key == key) else { return Ok(None) };
    match own_tombstone(store, vol).await? {
        Some(true) => Ok(Some(info)),
        Some(false) => {
            tracing::warn!(volume = %describe(store.as_ref(), vol), "a deleted.json s3blk did not write; the prefix is left alone");
            Ok(None)
        }
        // Gone since the listing: a delete finished.
        None => Ok(None),
    }
}

/// Delete every object of a tombstoned volume, `volume.json` first (a
/// half-deleted volume never opens), the tombstone last. Each round lists
/// afresh and checks again that only s3blk's objects and the tombstone are
/// there; objects that keep appearing are left, with the tombstone, to the
/// reaper.
async fn purge(store: &DynStore, vol: &str) -> CatalogResult<u64> {
    let volume = describe(store.as_ref(), vol);
    let tombstone = tombstone_key(vol);
    let meta = format::meta_key(vol);
    let mut deleted = 0u64;
    for _ in 0..DELETE_ROUNDS {
        let objects = store::list_all(store.as_ref(), vol).await?;
        if !objects.iter().any(|o| o.key == tombstone) {
            // Someone else finished the job meanwhile.
            return Ok(deleted);
        }
        check_all_own(store.as_ref(), vol, &objects)?;
        let rest: BTreeSet<String> = objects.into_iter().map(|o| o.key).filter(|k| *k != tombstone).collect();
        if rest.is_empty() {
            store.delete(&tombstone).await?;
            tracing::info!(volume = %volume, objects = deleted + 1, "volume deleted");
            return Ok(deleted + 1);
        }
        if rest.contains(&meta) {
            store.delete(&meta).await?;
        }
        let n = rest.len() as u64;
        let keys: Vec<String> = rest.into_iter().filter(|k| *k != meta).collect();
        store::delete_keys(store.as_ref(), keys, DELETE_CONCURRENCY).await?;
        deleted += n;
    }
    tracing::warn!(
        volume = %volume,
        objects = deleted,
        "objects of a deleted volume are still appearing; its tombstone stays for the reaper"
    );
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_safe_and_distinct() {
        assert_eq!(object_name("pvc-0a1b2c3d"), "pvc-0a1b2c3d");
        let a = object_name("My Volume/1");
        let b = object_name("My Volume/2");
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{a}");
        assert!(object_name(&"x".repeat(300)).len() <= 80);
        assert!(!object_name("..").starts_with('.'));
    }

    #[test]
    fn own_objects_are_exactly_the_names_s3blk_writes() {
        let v = "k8s/pvc-1/";
        for own in [
            format::meta_key(v),
            format::journal_key(v, 3),
            format::checkpoint_key(v, 3),
            format::chunk_key(v, 1, 2),
            format::snapshot_key(v, "snap-1"),
            format::clone_marker_key(v, "k8s/pvc-2/"),
            attachment_key(v, "node-a"),
            attachment_key(v, "Node A"),
            tombstone_key(v),
            super::super::lease::lease_key(v),
            format!("{v}.s3blk-probe-0123456789abcdef"),
        ] {
            assert!(is_own_object(v, &own), "{own}");
        }
        for foreign in [
            "k8s/pvc-1/readme.txt",
            "k8s/pvc-1/inner/volume.json",
            "k8s/pvc-1/journal/volume.json",
            "k8s/pvc-1/chunks/0000000000000001/zz",
            "k8s/pvc-1/attachments/a/b.json",
            "k8s/pvc-1/attachments/Node A.json",
            "k8s/pvc-1/attachments/UPPER.json",
            "k8s/pvc-1/snapshots/x/y.json",
            "k8s/pvc-1/.s3blk-store.json",
            "k8s/pvc-10/volume.json",
            "k8s/volume.json",
        ] {
            assert!(!is_own_object(v, foreign), "{foreign}");
        }
    }
}
