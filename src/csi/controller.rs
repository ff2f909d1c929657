//! The CSI controller service: volumes, attachments and snapshots as
//! objects in the store. Stateless: every id names its own location. The
//! bookkeeping objects (attachments, clone markers, pins, tombstones, store
//! markers) and every deletion belong to [`crate::volume::catalog`]; this
//! service validates requests, calls it and the engine, and maps their
//! errors to gRPC codes.
//!
//! ## Which volume ids DeleteVolume acts on
//!
//! A volume id is the canonical URL of the volume (`Location::url`):
//! `<store root>/<name>`, where the store root is `--store` or a bucket and
//! prefix a StorageClass named (marked with `.s3blk-store.json` at the
//! first CreateVolume there; directory and memory stores only as
//! `--store`), and `<name>` is what [`object_name`] makes of a CSI name.
//!
//! | id | answer |
//! |---|---|
//! | empty | INVALID_ARGUMENT |
//! | no canonical volume URL (`garbage`, a plain path such as `/dir/vol`) | OK: it names no volume; nothing is touched |
//! | a canonical URL outside the stores served, or a name the driver never gives (a store root, another bucket or prefix, another directory) | INVALID_ARGUMENT; nothing is touched |
//! | in a served store, nothing there | OK (already deleted, or never created) |
//! | in a served store, only what a failed CreateVolume wrote before `volume.json` (probes, `provisioned.json`, `source.json`), each holding what s3blk writes there | OK; the source it pinned is let go of, then they are deleted |
//! | in a served store, other s3blk-named objects but no `volume.json` and no tombstone | OK; nothing is deleted (not proven a volume), a warning is logged |
//! | anything but s3blk's own objects under it (another volume, a store, foreign data) | FAILED_PRECONDITION; nothing is touched |
//! | published to a node | FAILED_PRECONDITION |
//! | snapshots or clones read through it | OK; hidden behind its tombstone, reaped when they are gone |
//! | otherwise | OK; tombstone, every object, tombstone last; logged with the object count |
//!
//! Every other RPC answers NOT_FOUND for an id outside S3 and `--store`
//! (a plain path, another directory) and never opens it.
//!
//! ## Which stores listing covers, which nodes publishing accepts
//!
//! ListVolumes, ListSnapshots and the compaction pass walk `--store` and
//! every store registered under it (`catalog::register_store`, written by
//! CreateVolume into another bucket or prefix), with the controller's own
//! credentials: listing calls carry no secrets, so a registered store those
//! cannot read is logged and skipped. ControllerPublishVolume accepts a node
//! id only when the node plugin registered under `--store`
//! (`csi::registration`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::common::{
    CALLS_GRACE, Calls, ENCRYPTION_KEY, InFlight, RpcResult, Stores, catalog_status, check_capabilities,
    check_capability, kek_of, object_name, parse_snapshot_id, parse_volume_id, snapshot_id, status, store_status,
    unlocked,
};
use super::pb;
use crate::clock::{Clock, SystemClock};
use crate::location::{Location, StoreSpec};
use crate::size::parse_size;
use crate::store::{self, DynStore, PutMode, StoreError};
use crate::volume::catalog::{self, Attachment, CatalogError, DeleteOutcome, EntryState, OnDependants};
use crate::volume::engine::{CreateOptions, read_snapshot, snapshot_committed, take_back_if_outlived};
use crate::volume::format::{self, DEFAULT_CHUNK_SIZE, ParentRef, SnapshotRecord, VolumeMeta};
use crate::volume::{OpenOptions, Volume, VolumeError, compact, keys, replay};

/// Default size when a request gives no capacity.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where volumes go when the StorageClass names no store; listing
    /// starts here (with the stores registered under it), and nodes
    /// register here.
    pub default_store: Option<Location>,
    /// Reported by GetCapacity: object stores are bottomless.
    pub capacity: u64,
    /// Advertise GET_CAPACITY: only when the provisioner tracks capacity
    /// (`--enable-capacity`), which is what the capability is for.
    pub capacity_tracking: bool,
}

#[derive(Debug)]
pub struct ControllerService {
    cfg: ControllerConfig,
    stores: Arc<Stores>,
    inflight: InFlight,
    clock: Arc<dyn Clock>,
    /// This service, for the tasks its calls run in (see [`Self::into_arc`]).
    me: Weak<ControllerService>,
    /// The calls running in tasks of their own: `shutdown` waits for them.
    calls: Calls,
}

/// StorageClass parameters s3blk understands.
#[derive(Debug, Default)]
struct Params {
    store: Option<Location>,
    chunk_size: Option<u32>,
    /// `compression`: lz4, zstd or none (the default).
    compression: Option<format::Codec>,
    /// `encrypted`: "true" or "false"; unset, a secret holding a key is refused.
    encrypted: Option<bool>,
    context: HashMap<String, String>,
}

fn parse_params(p: &HashMap<String, String>) -> Result<Params, Status> {
    let mut out = Params::default();
    let mut bucket = None;
    let mut prefix = String::new();
    for (k, v) in p {
        match k.as_str() {
            "store" => {
                out.store = Some(
                    Location::parse(v, false).map_err(|e| Status::invalid_argument(format!("parameter store: {e}")))?,
                )
            }
            "bucket" => bucket = Some(v.clone()),
            "prefix" => prefix = v.trim_matches('/').to_string(),
            "chunkSize" => {
                let cs = parse_size(v).map_err(|e| Status::invalid_argument(format!("parameter chunkSize: {e}")))?;
                let cs = u32::try_from(cs).map_err(|_| Status::invalid_argument("parameter chunkSize: too large"))?;
                format::check_chunk_size(cs)
                    .map_err(|e| Status::invalid_argument(format!("parameter chunkSize: {e}")))?;
                out.chunk_size = Some(cs);
            }
            "compression" => {
                out.compression = format::Codec::parse(v)
                    .map_err(|e| Status::invalid_argument(format!("parameter compression: {e}")))?;
            }
            "encrypted" => {
                out.encrypted = Some(match v.trim().to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(Status::invalid_argument(format!("parameter encrypted: {v:?} (true or false)"))),
                })
            }
            "cacheSize" => {
                parse_size(v).map_err(|e| Status::invalid_argument(format!("parameter cacheSize: {e}")))?;
                out.context.insert(k.clone(), v.clone());
            }
            "fsType" => {
                if !["ext4", "xfs"].contains(&v.as_str()) {
                    return Err(Status::invalid_argument(format!("parameter fsType: {v:?} (ext4 or xfs)")));
                }
                out.context.insert(k.clone(), v.clone());
            }
            "mkfsOptions" => {
                out.context.insert(k.clone(), v.clone());
            }
            // Clones and restores of the class copy what they read through
            // their source, and then let go of it (the node serving one, or
            // the controller's reconcile loop for one no node serves).
            super::common::FLATTEN => {
                let on = match v.trim().to_ascii_lowercase().as_str() {
                    "true" => "true",
                    "false" => "false",
                    _ => return Err(Status::invalid_argument(format!("parameter flatten: {v:?} (true or false)"))),
                };
                out.context.insert(k.clone(), on.to_string());
            }
            // Keys the sidecars and Kubernetes add for themselves.
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => return Err(Status::invalid_argument(format!("unknown parameter {other:?}"))),
        }
    }
    if bucket.is_none() && !prefix.is_empty() {
        return Err(Status::invalid_argument("parameter prefix needs the parameter bucket"));
    }
    if let Some(b) = bucket {
        if out.store.is_some() {
            return Err(Status::invalid_argument("give either store or bucket/prefix, not both"));
        }
        let url = if prefix.is_empty() { format!("s3://{b}") } else { format!("s3://{b}/{prefix}") };
        out.store =
            Some(Location::parse(&url, false).map_err(|e| Status::invalid_argument(format!("parameter bucket: {e}")))?);
    }
    Ok(out)
}

/// Capacity range → size: at least `required`, rounded up to whole chunks,
/// at most `limit`.
fn size_for(range: Option<&pb::CapacityRange>, chunk: u64, minimum: u64) -> Result<u64, Status> {
    let (req, lim) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if req < 0 || lim < 0 {
        return Err(Status::invalid_argument("capacity must not be negative"));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim != 0 && req > lim {
        return Err(Status::invalid_argument("required_bytes exceeds limit_bytes"));
    }
    let want = if req == 0 { DEFAULT_CAPACITY.min(if lim == 0 { u64::MAX } else { lim }) } else { req };
    let want = want.max(minimum).max(1);
    let rounded = want.div_ceil(chunk).checked_mul(chunk).filter(|s| *s <= format::MAX_VOLUME_SIZE);
    let rounded = rounded.ok_or_else(|| Status::out_of_range("capacity larger than the largest volume (1 EiB)"))?;
    if lim != 0 && rounded > lim {
        // A limit below one chunk: fall back to block granularity.
        let block = want.div_ceil(format::BLOCK_SIZE as u64) * format::BLOCK_SIZE as u64;
        if block <= lim {
            return Ok(block);
        }
        return Err(Status::out_of_range(format!("no size of whole blocks fits {req}..={lim} bytes")));
    }
    Ok(rounded)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn volume_message(loc: &Location, meta: &VolumeMeta, size: u64) -> pb::Volume {
    let mut context = HashMap::new();
    context.insert("chunkSize".to_string(), meta.chunk_size.to_string());
    if meta.encryption.is_some() {
        context.insert(super::common::ENCRYPTED.to_string(), "true".to_string());
    }
    pb::Volume { capacity_bytes: to_i64(size), volume_id: loc.url(), volume_context: context, ..Default::default() }
}

/// A store as people name it in a StorageClass.
fn store_name(loc: &Location) -> String {
    match &loc.store {
        StoreSpec::S3 { bucket } => format!("bucket {bucket}"),
        _ => format!("store {}", split_volume(loc).0.url()),
    }
}

/// What CreateVolume records of a request to compare a retry with.
fn provisioned(params: &Params, caps: &[pb::VolumeCapability]) -> catalog::Provisioned {
    use pb::volume_capability::AccessType;
    let mut capabilities: Vec<String> = caps
        .iter()
        .map(|c| {
            let kind = match &c.access_type {
                Some(AccessType::Block(_)) => "block".to_string(),
                Some(AccessType::Mount(m)) => format!("mount:{}", m.fs_type),
                None => "none".to_string(),
            };
            let mode = c.access_mode.as_ref().map(|m| m.mode()).unwrap_or_default();
            format!("{kind}/{}", mode.as_str_name())
        })
        .collect();
    capabilities.sort();
    capabilities.dedup();
    catalog::Provisioned { parameters: params.context.clone().into_iter().collect(), capabilities }
}

fn timestamp(unix: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: unix, nanos: 0 }
}

impl ControllerService {
    pub fn new(cfg: ControllerConfig, stores: Arc<Stores>) -> Self {
        Self {
            cfg,
            stores,
            inflight: InFlight::default(),
            clock: Arc::new(SystemClock),
            me: Weak::new(),
            calls: Calls::default(),
        }
    }

    /// The service, shared: what its gRPC server takes. Its calls that
    /// change volumes run in tasks of their own, which hold it.
    pub fn into_arc(mut self) -> Arc<Self> {
        Arc::new_cyclic(|me| {
            self.me = me.clone();
            self
        })
    }

    /// Run `call` in a task of its own, so that it finishes (and keeps its
    /// guard on the volume till then) when the caller gives up.
    async fn owned<T, F, Fut>(&self, call: F) -> RpcResult<T>
    where
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = RpcResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.calls.owned(&self.me, "controller plugin", call).await
    }

    /// At plugin shutdown: refuse new calls and wait (up to a minute) for
    /// those their callers gave up on, so their store requests and checks
    /// run to their end rather than stop wherever the runtime ends.
    pub async fn shutdown(&self) {
        if !self.calls.close(CALLS_GRACE).await {
            tracing::warn!(grace = ?CALLS_GRACE, "controller calls still running; stopping anyway");
        }
    }

    async fn store_for(&self, loc: &Location, secrets: &HashMap<String, String>) -> Result<DynStore, Status> {
        self.stores.get(loc, secrets).await
    }

    /// The volume's metadata, or NOT_FOUND (also for tombstoned volumes).
    async fn live_meta(&self, store: &DynStore, loc: &Location) -> Result<VolumeMeta, Status> {
        let meta = replay::read_meta(store.as_ref(), &loc.prefix).await.map_err(status)?;
        if catalog::is_deleted(store, &loc.prefix).await.map_err(catalog_status)? {
            return Err(Status::not_found(format!("volume {} was deleted", loc.url())));
        }
        Ok(meta)
    }

    /// The volume as CSI describes it; its size from the newest journal
    /// record (`catalog::current_size`), without replaying the journal.
    async fn volume_message(&self, store: &DynStore, loc: &Location, meta: &VolumeMeta) -> Result<pb::Volume, Status> {
        let size = catalog::current_size(store, &loc.prefix, meta).await.map_err(catalog_status)?;
        Ok(volume_message(loc, meta, size))
    }

    async fn attachments(&self, store: &DynStore, loc: &Location) -> Result<Vec<Attachment>, Status> {
        catalog::attachments(store, &loc.prefix).await.map_err(catalog_status)
    }

    /// Delete a tombstoned volume once nothing depends on it any more.
    async fn reap(&self, store: &DynStore, loc: &Location) -> Result<(), Status> {
        catalog::reap(store, &loc.prefix, None).await.map_err(catalog_status)?;
        Ok(())
    }

    async fn snapshot_message(&self, store: &DynStore, vol: &Location, rec: &SnapshotRecord) -> pb::Snapshot {
        let _ = store;
        pb::Snapshot {
            size_bytes: to_i64(rec.size),
            snapshot_id: snapshot_id(vol, &rec.name),
            source_volume_id: vol.url(),
            creation_time: Some(timestamp(rec.created_unix)),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }
    }

    /// Snapshots of one volume, sorted by name.
    async fn volume_snapshots(&self, store: &DynStore, vol: &Location) -> Result<Vec<SnapshotRecord>, Status> {
        let prefix = format::snapshot_prefix(&vol.prefix);
        let objs = store::list_all(store.as_ref(), &prefix).await.map_err(|e| store_status(&e))?;
        let mut out = Vec::new();
        for o in objs {
            if !o.key.ends_with(".json") {
                continue;
            }
            match store.get(&o.key, None).await {
                Ok(b) => match SnapshotRecord::decode(&b, &o.key) {
                    Ok(r) if !r.name.starts_with("clone-") => out.push(r),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(key = %o.key, error = %e, "unreadable snapshot record"),
                },
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(store_status(&e)),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The compaction reconcile pass: compact every volume under the
    /// default store, deleted ones still kept for their snapshots and
    /// clones included, and reap deleted volumes nothing depends on any
    /// more (tombstoned ones only: a prefix without a tombstone is never
    /// removed). Returns (compacted, failed). Safe beside live writers and
    /// beside the same pass in another controller replica.
    pub async fn compact_all(&self, opts: &compact::CompactOptions) -> Result<(u64, u64), Status> {
        let (mut done, mut failed) = (0, 0);
        for (loc, state) in self.entries().await? {
            let store = self.store_for(&loc, &HashMap::new()).await?;
            match state {
                EntryState::Other => continue,
                EntryState::Deleted if !opts.dry_run => {
                    // Kept for dependants that have gone meanwhile, or an
                    // interrupted delete: removed once the tombstone is old.
                    let age = catalog::ReapAge { safety_age: opts.safety_age };
                    if let Err(e) = catalog::reap(&store, &loc.prefix, Some(age)).await {
                        tracing::warn!(volume = %loc.url(), error = %e, "reaping a deleted volume failed");
                    }
                }
                EntryState::Deleted | EntryState::Live => {}
            }
            match compact::compact(&store, &loc.prefix, opts, self.clock.as_ref()).await {
                // Reaped just now, deleted meanwhile, or the remains of a delete.
                Err(VolumeError::NotFound(_)) => {}
                Ok(rep) => {
                    done += 1;
                    if rep.chunks_deleted + rep.journal_records_deleted > 0 {
                        tracing::info!(
                            volume = %loc.url(),
                            chunks_deleted = rep.chunks_deleted,
                            records_deleted = rep.journal_records_deleted,
                            "volume compacted"
                        );
                    }
                }
                Err(e @ VolumeError::Key(_)) => {
                    failed += 1;
                    crate::metrics::global().compaction.failures.inc();
                    tracing::warn!(
                        volume = %loc.url(),
                        error = %e,
                        "an encrypted volume is not compacted here: compaction over the store alone has no key (the \
                         Kubernetes compaction reads it from the volume's provisioner secret)"
                    );
                }
                Err(e) => {
                    failed += 1;
                    crate::metrics::global().compaction.failures.inc();
                    tracing::warn!(volume = %loc.url(), error = %e, "compaction failed; retried next pass");
                }
            }
        }
        Ok((done, failed))
    }

    /// The live volumes under the default store (not the deleted ones kept
    /// for dependants), sorted by URL.
    async fn all_volumes(&self) -> Result<Vec<Location>, Status> {
        let entries = self.entries().await?;
        Ok(entries.into_iter().filter(|(_, s)| *s == EntryState::Live).map(|(l, _)| l).collect())
    }

    /// The store roots listing walks: `--store`, then every S3 store
    /// registered under it (CreateVolume into another bucket or prefix).
    async fn known_stores(&self) -> Result<Vec<Location>, Status> {
        let Some(home) = &self.cfg.default_store else { return Ok(Vec::new()) };
        let store = self.store_for(home, &HashMap::new()).await?;
        let mut out = vec![home.clone()];
        for url in catalog::registered_stores(&store, &home.prefix).await.map_err(catalog_status)? {
            match Location::parse(&url, false) {
                Ok(l) if matches!(l.store, StoreSpec::S3 { .. }) && l.url() != home.url() => out.push(l),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable store registry entry"),
            }
        }
        Ok(out)
    }

    /// Every prefix directly under each known store, and what it holds.
    /// Stores are read with the controller's own credentials: a registered
    /// store they cannot read is logged and left out.
    async fn entries(&self) -> Result<Vec<(Location, EntryState)>, Status> {
        let mut out: Vec<(Location, EntryState)> = Vec::new();
        for (i, root) in self.known_stores().await?.into_iter().enumerate() {
            let listed = async {
                let store = self.store_for(&root, &HashMap::new()).await?;
                catalog::list(&store, &root.prefix).await.map_err(catalog_status)
            }
            .await;
            let entries = match listed {
                Ok(e) => e,
                Err(e) if i > 0 => {
                    tracing::warn!(
                        store = %root.url(),
                        error = %e.message(),
                        "a store this driver provisioned into cannot be listed with the controller's credentials; its volumes are left out"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            out.extend(
                entries.into_iter().map(|e| (Location { store: root.store.clone(), prefix: e.prefix }, e.state)),
            );
        }
        out.sort_by_key(|(l, _)| l.url());
        Ok(out)
    }

    /// A volume of this name in a known store other than `root` (a retry
    /// of a CreateVolume with another bucket or prefix).
    async fn same_name_elsewhere(&self, root: &Location, name: &str) -> Result<Option<Location>, Status> {
        for other in self.known_stores().await? {
            if other.url() == root.url() {
                continue;
            }
            let loc = other.child(name);
            let found = async {
                let store = self.store_for(&loc, &HashMap::new()).await?;
                store.head(&format::meta_key(&loc.prefix)).await.map_err(|e| store_status(&e))
            }
            .await;
            match found {
                Ok(Some(_)) => return Ok(Some(loc)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(store = %other.url(), error = %e.message(), "cannot check a store for the name")
                }
            }
        }
        Ok(None)
    }

    /// NOT_FOUND unless the node plugin `node` registered itself under the
    /// controller's `--store` (see `csi::registration`). Without `--store`
    /// there is nowhere to look, and every node id is taken on trust.
    async fn check_node(&self, node: &str) -> Result<(), Status> {
        let Some(home) = &self.cfg.default_store else { return Ok(()) };
        let store = self.store_for(home, &HashMap::new()).await?;
        match catalog::node_record(&store, &home.prefix, node).await.map_err(catalog_status)? {
            Some(_) => Ok(()),
            None => Err(Status::not_found(format!(
                "node {node} is unknown: no s3blk node plugin with this id has registered in {}",
                home.url()
            ))),
        }
    }

    /// The volume's condition as the store shows it: the store unreachable,
    /// damage fsck finds without reading chunk data (missing or unreadable
    /// journal records, checkpoints or chunk objects), or records a fenced
    /// writer left after another writer took the volume over. Reads every
    /// journal record: for ControllerGetVolume only, never for listing.
    async fn condition(&self, store: &DynStore, loc: &Location) -> pb::VolumeCondition {
        let abnormal = |message: String| pb::VolumeCondition { abnormal: true, message };
        match crate::volume::fsck::fsck(store.as_ref(), &loc.prefix, false, &|_, _| {}).await {
            Ok(rep) if !rep.clean => abnormal(format!("damaged: {}", rep.errors.join("; "))),
            Ok(rep) => {
                let fenced: Vec<&String> = rep.warnings.iter().filter(|w| w.contains("fenced writer")).collect();
                if fenced.is_empty() {
                    pb::VolumeCondition { abnormal: false, message: "ok".into() }
                } else {
                    abnormal(format!(
                        "another writer took the volume over while a fenced writer was still writing: {}",
                        fenced.iter().map(|w| w.as_str()).collect::<Vec<_>>().join("; ")
                    ))
                }
            }
            Err(VolumeError::Store(e)) => abnormal(format!("store unreachable: {e}")),
            // ControllerGetVolume carries no secrets.
            Err(VolumeError::Key(_)) => pb::VolumeCondition {
                abnormal: false,
                message: "not checked: the volume is encrypted and this call carries no key".into(),
            },
            Err(e) => abnormal(format!("damaged: {e}")),
        }
    }

    /// Can a volume of this driver live at `loc`: in an S3 bucket, or in
    /// the directory store that is `--store`? Other ids (a plain path,
    /// another directory) name nothing the driver made, and are never
    /// opened: opening a directory store creates its directory.
    fn may_hold_volume(&self, loc: &Location) -> bool {
        matches!(loc.store, StoreSpec::S3 { .. })
            || self.cfg.default_store.as_ref().is_some_and(|d| d.url() == split_volume(loc).0.url())
    }

    /// A volume id's location, or NOT_FOUND for an id the driver never issues.
    fn volume_location(&self, id: &str) -> Result<Location, Status> {
        let loc = parse_volume_id(id)?;
        if !self.may_hold_volume(&loc) {
            return Err(Status::not_found(format!("no such volume {id}")));
        }
        Ok(loc)
    }

    /// A snapshot id's volume and name, or NOT_FOUND for an id the driver never issues.
    fn snapshot_location(&self, id: &str) -> Result<(Location, String), Status> {
        let (loc, name) = parse_snapshot_id(id)?;
        if !self.may_hold_volume(&loc) {
            return Err(Status::not_found(format!("no such snapshot {id}")));
        }
        Ok((loc, name))
    }

    /// Is `root` a store this controller provisions into: `--store`, or a
    /// bucket and prefix a StorageClass named (marked at its first
    /// CreateVolume)? Directory and memory stores are served only as
    /// `--store`: the controller never touches other paths of its host.
    async fn serves(&self, root: &Location, secrets: &HashMap<String, String>) -> Result<bool, Status> {
        if self.cfg.default_store.as_ref().is_some_and(|d| d.url() == root.url()) {
            return Ok(true);
        }
        if !matches!(root.store, StoreSpec::S3 { .. }) {
            return Ok(false);
        }
        let store = self.store_for(root, secrets).await?;
        catalog::is_marked_store(&store, &root.prefix).await.map_err(catalog_status)
    }
}

/// The store root a volume lives in and the volume's name.
fn split_volume(loc: &Location) -> (Location, &str) {
    let name = format::volume_name(&loc.prefix);
    let root_len = loc.prefix.len().saturating_sub(name.len() + 1);
    (Location { store: loc.store.clone(), prefix: loc.prefix[..root_len].to_string() }, name)
}

fn parse_pagination(max: i32, token: &str) -> Result<(usize, usize), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries must not be negative"));
    }
    let start = if token.is_empty() {
        0
    } else {
        token.parse::<usize>().map_err(|_| Status::aborted(format!("invalid starting token {token:?}")))?
    };
    Ok((start, if max == 0 { usize::MAX } else { max as usize }))
}

fn page<T>(items: Vec<T>, start: usize, max: usize) -> Result<(Vec<T>, String), Status> {
    if start > items.len() {
        return Err(Status::aborted(format!("starting token {start} is past the end")));
    }
    let total = items.len();
    let out: Vec<T> = items.into_iter().skip(start).take(max).collect();
    let next = if start + out.len() < total { (start + out.len()).to_string() } else { String::new() };
    Ok((out, next))
}

impl ControllerService {
    /// Where a CreateVolume's content source lives, from its id alone
    /// (nothing read).
    fn requested_source(&self, req: &pb::CreateVolumeRequest) -> Result<Option<Location>, Status> {
        Ok(match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(pb::volume_content_source::Type::Snapshot(s)) => Some(self.snapshot_location(&s.snapshot_id)?.0),
            Some(pb::volume_content_source::Type::Volume(v)) => Some(self.volume_location(&v.volume_id)?),
        })
    }

    async fn do_create_volume(&self, request: Request<pb::CreateVolumeRequest>) -> RpcResult<pb::CreateVolumeResponse> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        check_capabilities(&req.volume_capabilities)?;
        let params = parse_params(&req.parameters)?;
        let root =
            params.store.clone().or_else(|| self.cfg.default_store.clone()).ok_or_else(|| {
                Status::invalid_argument("no store: set the StorageClass parameter bucket (or store)")
            })?;
        if !matches!(root.store, StoreSpec::S3 { .. })
            && self.cfg.default_store.as_ref().is_none_or(|d| d.url() != root.url())
        {
            return Err(Status::invalid_argument(
                "a directory or memory store is served only as the driver's --store; StorageClasses name S3 stores",
            ));
        }
        let kek = kek_of(&req.secrets)?;
        let encrypted = match (params.encrypted, &kek) {
            (Some(true), None) => {
                return Err(Status::invalid_argument(format!(
                    "the StorageClass sets encrypted: \"true\", but the provisioner secret holds no {ENCRYPTION_KEY} \
                     (name the secret with csi.storage.k8s.io/provisioner-secret-name and -namespace)"
                )));
            }
            (None, Some(_)) => {
                return Err(Status::invalid_argument(format!(
                    "the provisioner secret holds {ENCRYPTION_KEY}, but the StorageClass does not say whether to \
                     encrypt: set the parameter encrypted: \"true\" (or \"false\" for unencrypted volumes)"
                )));
            }
            (e, _) => e.unwrap_or(false),
        };
        let loc = root.child(&object_name(&req.name));
        let _guard = self.inflight.start(&loc.url())?;
        let store = self.store_for(&loc, &req.secrets).await?;
        let chunk = params.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);

        // The source, if any: a snapshot, or a volume (cloned via an internal
        // snapshot, its pin). It must exist (NOT_FOUND) and live in the new
        // volume's bucket. A volume's pin is taken only once the new
        // volume's prefix records its source (below), so that a create
        // that dies after pinning is let go of by a delete of its name; a
        // pin already there is the one an earlier attempt took.
        let resolved: Result<Option<(Location, Option<SnapshotRecord>, u64)>, Status> = async {
            Ok(match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(pb::volume_content_source::Type::Snapshot(s)) => {
                let (sloc, name) = self.snapshot_location(&s.snapshot_id)?;
                if name.starts_with("clone-") {
                    return Err(Status::not_found(format!("no such snapshot {}", s.snapshot_id)));
                }
                let sstore = self.store_for(&sloc, &req.secrets).await?;
                let sstore = unlocked(&sstore, &sloc, kek.as_ref()).await?;
                let rec = match read_snapshot(&sstore, &sloc.prefix, &name).await {
                    Ok(r) if !take_back_if_outlived(&sstore, &sloc.prefix, &r).await.map_err(status)? => r,
                    // One a flatten left unreadable is no snapshot either.
                    Ok(_) | Err(VolumeError::NotFound(_)) => {
                        return Err(Status::not_found(format!("no such snapshot {}", s.snapshot_id)));
                    }
                    Err(e) => return Err(status(e)),
                };
                if sstore.describe() != store.describe() || sloc.store != loc.store {
                    return Err(Status::invalid_argument(format!(
                        "snapshot {} is in {}, the new volume in {}: a snapshot is restored into its own bucket (use a StorageClass with its bucket)",
                        s.snapshot_id,
                        store_name(&sloc),
                        store_name(&loc)
                    )));
                }
                let size = rec.size;
                Some((sloc, Some(rec), size))
            }
            Some(pb::volume_content_source::Type::Volume(v)) => {
                let vloc = self.volume_location(&v.volume_id)?;
                let vstore = self.store_for(&vloc, &req.secrets).await?;
                let vstore = unlocked(&vstore, &vloc, kek.as_ref()).await?;
                let vmeta = self.live_meta(&vstore, &vloc).await?;
                if vloc.store != loc.store {
                    return Err(Status::invalid_argument(format!(
                        "volume {} is in {}, the clone in {}: a volume is cloned within its own bucket (use a StorageClass with its bucket)",
                        v.volume_id,
                        store_name(&vloc),
                        store_name(&loc)
                    )));
                }
                let snap = format::clone_pin_name(&loc.prefix);
                match read_snapshot(&vstore, &vloc.prefix, &snap).await {
                    // The pin of a clone of the same last path segment
                    // elsewhere (pins of earlier versions name none).
                    Ok(r) if r.clone.as_deref().is_some_and(|c| !catalog::names_clone(c, &loc.prefix)) => {
                        return Err(Status::already_exists(format!(
                            "volume {} already has a clone named {} ({}); this volume cannot be cloned under that name",
                            v.volume_id,
                            format::volume_name(&loc.prefix),
                            r.clone.unwrap_or_default()
                        )));
                    }
                    // An earlier attempt's pin, unless a flatten of the
                    // source left it unreadable (then taken again).
                    Ok(r) if !take_back_if_outlived(&vstore, &vloc.prefix, &r).await.map_err(status)? => {
                        let size = r.size;
                        Some((vloc, Some(r), size))
                    }
                    Ok(_) | Err(VolumeError::NotFound(_)) => {
                        let size =
                            catalog::current_size(&vstore, &vloc.prefix, &vmeta).await.map_err(catalog_status)?;
                        Some((vloc, None, size))
                    }
                    Err(e) => return Err(status(e)),
                }
            }
            })
        }
        .await;
        // A source gone (deleted since an earlier attempt of this call made
        // the volume, as the CO may retry one whose answer it lost): the
        // volume made from it is still the answer, its source compared by
        // volume as for a flattened clone. With no volume, NOT_FOUND.
        let (source, mut gone) = match resolved {
            Ok(s) => (s, None),
            Err(st) if st.code() == tonic::Code::NotFound => match self.requested_source(&req)? {
                Some(sloc) => (None, Some((sloc, st))),
                None => return Err(st),
            },
            Err(st) => return Err(st),
        };
        let minimum = source.as_ref().map(|(_, _, size)| *size).unwrap_or(0);
        let size = size_for(req.capacity_range.as_ref(), chunk as u64, minimum)?;
        if size < minimum {
            return Err(Status::out_of_range("the source is larger than the requested capacity"));
        }
        // The parent names the pin that keeps what the new volume reads
        // (for a restore, a pin of its own beside the user's snapshot).
        let parent_of = |sloc: &Location, rec: &SnapshotRecord| ParentRef {
            volume: sloc.prefix.clone(),
            snapshot: format::clone_pin_name(&loc.prefix),
            seq: rec.seq,
        };
        let parent = source.as_ref().and_then(|(sloc, rec, _)| rec.as_ref().map(|r| parent_of(sloc, r)));
        // Reads and writes the source (pins, its committed head) in the
        // clear, and the new volume once it exists.
        let store = match &source {
            Some((sloc, _, _)) => unlocked(&store, sloc, kek.as_ref()).await?,
            None => store,
        };
        // Before anything is written into the source (its pin, its marker):
        // a volume made from an encrypted one is encrypted, with its key.
        if let Some((sloc, _, _)) = &source {
            let smeta = replay::read_meta(store.as_ref(), &sloc.prefix).await.map_err(status)?;
            match (smeta.encryption.is_some(), encrypted) {
                (true, false) => {
                    return Err(Status::invalid_argument(format!(
                        "{} is encrypted: a volume made from it must be encrypted too (a StorageClass with \
                         encrypted: \"true\" and the source's key)",
                        sloc.url()
                    )));
                }
                (false, true) => {
                    return Err(Status::invalid_argument(format!(
                        "{} is not encrypted: a volume made from it cannot be (use a StorageClass without encryption)",
                        sloc.url()
                    )));
                }
                _ => {}
            }
        }

        // Idempotency: an existing volume of this name is the answer when
        // it was made with the same store, chunk size, parameters,
        // capabilities and source, and its size is in the requested range.
        let wanted = provisioned(&params, &req.volume_capabilities);
        match replay::read_meta(store.as_ref(), &loc.prefix).await {
            Ok(meta) => {
                // Made otherwise: answered before anything needs its key.
                if meta.encryption.is_some() != encrypted {
                    return Err(Status::already_exists(format!(
                        "volume {} exists with encrypted {} (asked: {encrypted})",
                        req.name,
                        meta.encryption.is_some()
                    )));
                }
                let store = unlocked(&store, &loc, kek.as_ref()).await?;
                let tombstoned = catalog::is_deleted(&store, &loc.prefix).await.map_err(catalog_status)?;
                if tombstoned {
                    return Err(Status::already_exists(format!("volume {} exists and is being deleted", req.name)));
                }
                // An earlier attempt that wrote volume.json and failed before
                // its create record: finished now, as the retry asks.
                if Volume::finish_create(&store, &loc.prefix, &meta).await.map_err(status)? {
                    catalog::forget_source(&store, &loc.prefix).await;
                }
                let size = catalog::current_size(&store, &loc.prefix, &meta).await.map_err(catalog_status)?;
                let lim = req.capacity_range.as_ref().map(|r| r.limit_bytes).unwrap_or(0);
                let req_b = req.capacity_range.as_ref().map(|r| r.required_bytes).unwrap_or(0);
                let mut differs = Vec::new();
                if size < req_b.max(0) as u64 || (lim != 0 && size > lim as u64) {
                    differs.push(format!("its size {size} is outside the requested range"));
                }
                if meta.chunk_size != chunk {
                    differs.push(format!("chunkSize {} (asked: {chunk})", meta.chunk_size));
                }
                if meta.compression != params.compression {
                    let name = |c: Option<format::Codec>| c.map_or("none", |c| c.name());
                    differs.push(format!(
                        "compression {} (asked: {})",
                        name(meta.compression),
                        name(params.compression)
                    ));
                }
                if meta.encryption.is_some() != encrypted {
                    differs.push(format!("encrypted {} (asked: {encrypted})", meta.encryption.is_some()));
                }
                // A clone flattened since no longer has the pin the source
                // is looked up by: its source volume is what is compared.
                let same_source = match (&meta.parent, &meta.flattened, &source) {
                    _ if gone.is_some() => {
                        let made_from = meta
                            .parent
                            .as_ref()
                            .map(|p| &p.volume)
                            .or(meta.flattened.as_ref().map(|f| &f.parent.volume));
                        made_from == gone.as_ref().map(|(sloc, _)| &sloc.prefix)
                    }
                    (None, Some(f), Some((sloc, _, _))) => f.parent.volume == sloc.prefix,
                    _ => meta.source() == parent.as_ref() && (source.is_none() || parent.is_some()),
                };
                if !same_source {
                    differs.push("another source".to_string());
                }
                // Volumes made before the record was kept (or by the CLI) have none.
                if let Some(had) = catalog::read_provisioned(&store, &loc.prefix).await.map_err(catalog_status)? {
                    if had.parameters != wanted.parameters {
                        differs.push(format!("parameters {:?} (asked: {:?})", had.parameters, wanted.parameters));
                    }
                    if had.capabilities != wanted.capabilities {
                        differs.push(format!("capabilities {:?} (asked: {:?})", had.capabilities, wanted.capabilities));
                    }
                }
                if !differs.is_empty() {
                    return Err(Status::already_exists(format!(
                        "volume {} exists with {}",
                        req.name,
                        differs.join(", ")
                    )));
                }
                let mut v = volume_message(&loc, &meta, size);
                v.volume_context.extend(params.context);
                v.content_source = req.volume_content_source.clone();
                return Ok(Response::new(pb::CreateVolumeResponse { volume: Some(v) }));
            }
            Err(VolumeError::NotFound(_)) => {
                if let Some((_, st)) = gone.take() {
                    return Err(st);
                }
            }
            Err(e) => return Err(status(e)),
        }
        if let Some((_, st)) = gone.take() {
            return Err(st);
        }
        if let Some(other) = self.same_name_elsewhere(&root, &object_name(&req.name)).await? {
            return Err(Status::already_exists(format!(
                "volume {} exists in another store ({}); this request names {}",
                req.name,
                split_volume(&other).0.url(),
                root.url()
            )));
        }
        catalog::check_name_free(&store, &loc.prefix).await.map_err(catalog_status)?;
        let (root_loc, _) = split_volume(&loc);
        catalog::mark_store(&store, &root_loc.prefix, self.clock.as_ref()).await.map_err(catalog_status)?;
        if let Some(home) = self.cfg.default_store.as_ref().filter(|h| h.url() != root.url()) {
            // So that listing, ListSnapshots and compaction find this store.
            let home_store = self.store_for(home, &HashMap::new()).await?;
            catalog::register_store(&home_store, &home.prefix, &root.url()).await.map_err(catalog_status)?;
        }
        // Before volume.json: a volume never exists without its record.
        catalog::write_provisioned(&store, &loc.prefix, &wanted).await.map_err(catalog_status)?;
        // Set once the pin in the source may be another CreateVolume's of
        // this name, still running (another controller's, across a leader
        // handover): what this call wrote stays on a failure, since
        // letting go of the source would take the pin that create's clone
        // reads through. A retry or a DeleteVolume cleans up.
        let mut raced = false;
        let made = async {
            let mut parent = parent;
            if let Some((sloc, rec, _)) = &source {
                // From here on the pin in the source may be another running
                // create's of this name too (across a leader handover: its
                // record of the source is the one this call overwrites), or
                // one that took this call's pin for its own (the pins of
                // one name are alike): on a failure, nothing is let go of.
                // A retry finishes the volume; a DeleteVolume of it cleans
                // up. Must be set before `pin_snapshot_for`, which keeps a
                // pin it wrote only then.
                raced = true;
                // Before anything is written in the source.
                catalog::record_source(&store, &loc.prefix, &sloc.prefix, &loc.url()).await.map_err(catalog_status)?;
                let rec = match rec {
                    // A restore: deleting the snapshot must not take what
                    // this volume reads through, so it gets a pin of its own.
                    // It stays on a failure, also when the snapshot is found
                    // deleted meanwhile (`raced` is set).
                    Some(rec) if rec.name != format::clone_pin_name(&loc.prefix) => {
                        catalog::pin_snapshot_for(&store, &sloc.prefix, rec, &loc.prefix, &loc.url(), &mut raced)
                            .await
                            .map_err(catalog_status)?;
                        rec.clone()
                    }
                    // Found there: an earlier attempt's, or another running
                    // create's of this name.
                    Some(rec) => rec.clone(),
                    None => {
                        let pin = format::clone_pin_name(&loc.prefix);
                        let rec =
                            match snapshot_committed(&store, &sloc.prefix, &pin, Some(&loc.url()), self.clock.as_ref())
                                .await
                            {
                                Ok(rec) => rec,
                                // Free when read above: the pin is another
                                // CreateVolume's of this name (another
                                // controller's, across a leader handover), still
                                // running. Letting go of the source here would
                                // take the pin its clone reads through.
                                Err(VolumeError::AlreadyExists(_)) => {
                                    return Err(Status::aborted(format!(
                                        "another CreateVolume of {} is in progress; retry",
                                        req.name
                                    )));
                                }
                                Err(e) => return Err(status(e)),
                            };
                        if size < rec.size {
                            return Err(Status::out_of_range("the source is larger than the requested capacity"));
                        }
                        rec
                    }
                };
                parent = Some(parent_of(sloc, &rec));
                catalog::add_clone_marker(&store, &sloc.prefix, &loc.prefix, &loc.url(), rec.seq)
                    .await
                    .map_err(catalog_status)?;
            }
            // A clone or restore shares its source's data key.
            let encryption = match (encrypted, &kek) {
                (true, Some(k)) => {
                    Some(keys::NewKeys::inherited(store.as_ref()).unwrap_or_else(|| keys::NewKeys::fresh(k.clone())))
                }
                _ => None,
            };
            let opts = CreateOptions {
                size,
                chunk_size: chunk,
                parent,
                single_writer: false,
                compression: params.compression,
                encryption,
            };
            match Volume::create(store.clone(), &loc.prefix, opts, self.clock.as_ref()).await {
                Ok(m) => Ok(m),
                // Lost a race with a concurrent create of the same name.
                Err(VolumeError::AlreadyExists(_)) => {
                    replay::read_meta(store.as_ref(), &loc.prefix).await.map_err(status)
                }
                Err(e) => Err(status(e)),
            }
        }
        .await;
        let meta = match made {
            Ok(meta) => meta,
            Err(e) => {
                // Without volume.json, what this call wrote goes again and
                // the source is let go of; what cannot go now (the store
                // failing) a DeleteVolume or a retry of this call finds.
                if raced {
                    return Err(e);
                }
                if let Err(clean) = catalog::abandon_create(&store, &loc.prefix).await {
                    tracing::warn!(volume = %loc.url(), error = %clean, "cleaning up after a failed CreateVolume");
                }
                return Err(e);
            }
        };
        if source.is_some() {
            catalog::forget_source(&store, &loc.prefix).await;
        }
        let store = unlocked(&store, &loc, kek.as_ref()).await?;
        tracing::info!(volume = %loc.url(), size, encrypted, "volume created");
        let mut v = self.volume_message(&store, &loc, &meta).await?;
        v.volume_context.extend(params.context);
        v.content_source = req.volume_content_source;
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(v) }))
    }

    async fn do_delete_volume(&self, request: Request<pb::DeleteVolumeRequest>) -> RpcResult<pb::DeleteVolumeResponse> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        // An id this driver never issues names no volume: deleting it
        // succeeds and touches nothing (see the table at the top).
        let Some(loc) = Location::parse(&req.volume_id, true).ok().filter(|l| l.url() == req.volume_id) else {
            tracing::info!(volume_id = %req.volume_id, "DeleteVolume of an id that names no s3blk volume: nothing to do");
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        let (root, name) = split_volume(&loc);
        if object_name(name) != name || !self.serves(&root, &req.secrets).await? {
            return Err(Status::invalid_argument(format!(
                "volume id {} is outside the stores this driver provisions into; nothing was deleted",
                req.volume_id
            )));
        }
        let _guard = self.inflight.start(&loc.url())?;
        let store = self.store_for(&loc, &req.secrets).await?;
        match catalog::delete_volume(&store, &loc.prefix, OnDependants::Keep, self.clock.as_ref()).await {
            Ok(
                DeleteOutcome::Absent
                | DeleteOutcome::Probes { .. }
                | DeleteOutcome::Kept
                | DeleteOutcome::Deleted { .. },
            ) => {}
            // No volume.json and no tombstone: no volume, so nothing to
            // delete; the objects stay for an operator to look at.
            Err(e @ CatalogError::NotAVolume { .. }) => {
                tracing::warn!(volume = %loc.url(), error = %e, "DeleteVolume found no volume to delete");
            }
            Err(e) => return Err(catalog_status(e)),
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn do_controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> RpcResult<pb::ControllerPublishVolumeResponse> {
        let req = request.into_inner();
        let loc = self.volume_location(&req.volume_id)?;
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node id is required"));
        }
        let cap =
            req.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        check_capability(cap).map_err(Status::invalid_argument)?;
        let _guard = self.inflight.start(&loc.url())?;
        let store = self.store_for(&loc, &req.secrets).await?;
        self.live_meta(&store, &loc).await?;
        self.check_node(&req.node_id).await?;
        use pb::volume_capability::access_mode::Mode;
        let mode = cap.access_mode.as_ref().map(|m| m.mode()).unwrap_or(Mode::Unknown);
        let readonly = req.readonly || matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly);
        let existing = self.attachments(&store, &loc).await?;
        if let Some(same) = existing.iter().find(|a| a.node_id == req.node_id) {
            if same.readonly != readonly {
                return Err(Status::already_exists(format!(
                    "volume is already published to node {} with readonly={}",
                    same.node_id, same.readonly
                )));
            }
        } else {
            if let Some(writer) = existing.iter().find(|a| !a.readonly)
                && !readonly
            {
                return Err(Status::failed_precondition(format!(
                    "volume is published read-write to node {}; it has one writer at a time",
                    writer.node_id
                )));
            }
            if !readonly && !existing.is_empty() {
                return Err(Status::failed_precondition("volume is published read-only elsewhere"));
            }
            let a = Attachment { node_id: req.node_id.clone(), readonly, created_unix: self.clock.now_unix() };
            catalog::attach(&store, &loc.prefix, &a).await.map_err(catalog_status)?;
        }
        // After the attachment is written: the controller's flatten writes
        // its lease and then lists attachments, so one of the two sees the
        // other, and a node never opens the volume beside that writer. The
        // flatten sees the attachment and stops; a retry then goes through.
        if !readonly
            && let Some(crate::volume::lease::Occupant::Lease { holder, .. }) =
                crate::volume::lease::occupant(&store, &loc.prefix, None).await.map_err(super::common::status)?
            && holder.command == crate::controller::reconcile::FLATTEN_LEASE
        {
            return Err(Status::unavailable(format!(
                "volume {} is being flattened by the controller (it stops now that the volume is being attached); \
                 retry in a few seconds",
                loc.url()
            )));
        }
        let mut ctx = HashMap::new();
        ctx.insert("readonly".to_string(), readonly.to_string());
        Ok(Response::new(pb::ControllerPublishVolumeResponse { publish_context: ctx }))
    }

    async fn do_controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> RpcResult<pb::ControllerUnpublishVolumeResponse> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let Ok(loc) = self.volume_location(&req.volume_id) else {
            return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        };
        let _guard = self.inflight.start(&loc.url())?;
        let store = self.store_for(&loc, &req.secrets).await?;
        let targets: Vec<String> = if req.node_id.is_empty() {
            self.attachments(&store, &loc).await?.into_iter().map(|a| a.node_id).collect()
        } else {
            vec![req.node_id]
        };
        for node in targets {
            catalog::detach(&store, &loc.prefix, &node).await.map_err(catalog_status)?;
        }
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn do_validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> RpcResult<pb::ValidateVolumeCapabilitiesResponse> {
        let req = request.into_inner();
        let loc = self.volume_location(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume capabilities are required"));
        }
        let store = self.store_for(&loc, &req.secrets).await?;
        self.live_meta(&store, &loc).await?;
        if let Err(e) = parse_params(&req.parameters) {
            return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            }));
        }
        for c in &req.volume_capabilities {
            if let Err(msg) = check_capability(c) {
                return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message: msg }));
            }
        }
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn do_list_volumes(&self, request: Request<pb::ListVolumesRequest>) -> RpcResult<pb::ListVolumesResponse> {
        let req = request.into_inner();
        let (start, max) = parse_pagination(req.max_entries, &req.starting_token)?;
        let (locs, next) = page(self.all_volumes().await?, start, max)?;
        let mut entries = Vec::new();
        for loc in locs {
            let store = self.store_for(&loc, &HashMap::new()).await?;
            let meta = match replay::read_meta(store.as_ref(), &loc.prefix).await {
                Ok(m) => m,
                Err(VolumeError::NotFound(_)) => continue,
                Err(e) => return Err(status(e)),
            };
            // No journal replay: the size comes from the newest record.
            let volume = self.volume_message(&store, &loc, &meta).await?;
            let nodes = self.attachments(&store, &loc).await?.into_iter().map(|a| a.node_id).collect();
            entries.push(pb::list_volumes_response::Entry {
                volume: Some(volume),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: nodes,
                    volume_condition: None,
                }),
            });
        }
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token: next }))
    }

    async fn do_get_capacity(&self, request: Request<pb::GetCapacityRequest>) -> RpcResult<pb::GetCapacityResponse> {
        let req = request.into_inner();
        for c in &req.volume_capabilities {
            if check_capability(c).is_err() {
                return Ok(Response::new(pb::GetCapacityResponse::default()));
            }
        }
        // The store a CreateVolume with these parameters would provision
        // into: none (or one CreateVolume refuses) has no capacity.
        let params = parse_params(&req.parameters)?;
        let root = params.store.or_else(|| self.cfg.default_store.clone());
        let usable = root.is_some_and(|r| {
            matches!(r.store, StoreSpec::S3 { .. })
                || self.cfg.default_store.as_ref().is_some_and(|d| d.url() == r.url())
        });
        if !usable {
            return Ok(Response::new(pb::GetCapacityResponse::default()));
        }
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: to_i64(self.cfg.capacity),
            maximum_volume_size: Some(to_i64(format::MAX_VOLUME_SIZE)),
            minimum_volume_size: Some(format::BLOCK_SIZE as i64),
        }))
    }

    async fn do_controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> RpcResult<pb::ControllerGetCapabilitiesResponse> {
        use pb::controller_service_capability::{Rpc, Type, rpc::Type as T};
        let caps = [
            T::CreateDeleteVolume,
            T::PublishUnpublishVolume,
            T::ListVolumes,
            T::CreateDeleteSnapshot,
            T::ListSnapshots,
            T::CloneVolume,
            T::PublishReadonly,
            T::ExpandVolume,
            T::ListVolumesPublishedNodes,
            T::GetVolume,
            T::GetCapacity,
        ]
        .into_iter()
        .filter(|t| *t != T::GetCapacity || self.cfg.capacity_tracking)
        .map(|t| pb::ControllerServiceCapability { r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities: caps }))
    }

    async fn do_create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> RpcResult<pb::CreateSnapshotResponse> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("snapshot name is required"));
        }
        let vloc = self.volume_location(&req.source_volume_id)?;
        let name = object_name(&req.name);
        // Taken for one, it could never be deleted (DeleteSnapshot leaves
        // pins alone) nor listed, and a clone of that name would read
        // through it.
        if name.starts_with("clone-") {
            return Err(Status::invalid_argument(format!(
                "snapshot name {}: names starting with clone- are reserved for the pins that keep what clones read",
                req.name
            )));
        }
        let store = self.store_for(&vloc, &req.secrets).await?;
        let store = unlocked(&store, &vloc, kek_of(&req.secrets)?.as_ref()).await?;
        // A volume first: the claim below would stay for good otherwise.
        self.live_meta(&store, &vloc).await?;
        // Snapshot names are unique per store: an index entry claims the name.
        let root_prefix =
            vloc.prefix.trim_end_matches('/').rsplit_once('/').map(|(p, _)| format!("{p}/")).unwrap_or_default();
        let index_key = format!("{root_prefix}_snapshots/{name}");
        let sid = snapshot_id(&vloc, &name);
        match store.put(&index_key, Bytes::from(sid.clone()), PutMode::IfAbsent).await {
            Ok(()) => {}
            Err(StoreError::PreconditionFailed(_)) => {
                let owner = store.get(&index_key, None).await.map_err(|e| store_status(&e))?;
                if owner != sid.as_bytes() {
                    return Err(Status::already_exists(format!(
                        "snapshot name {} is used by another volume",
                        req.name
                    )));
                }
            }
            Err(e) => return Err(store_status(&e)),
        }
        let _guard = self.inflight.start(&sid)?;
        let found = match read_snapshot(&store, &vloc.prefix, &name).await {
            // An earlier attempt's, unless a flatten left it unreadable.
            Ok(r) if !take_back_if_outlived(&store, &vloc.prefix, &r).await.map_err(status)? => Some(r),
            Ok(_) | Err(VolumeError::NotFound(_)) => None,
            Err(e) => return Err(status(e)),
        };
        let rec = match found {
            Some(r) => r,
            None => snapshot_committed(&store, &vloc.prefix, &name, None, self.clock.as_ref()).await.map_err(status)?,
        };
        tracing::info!(snapshot = %sid, seq = rec.seq, "snapshot created");
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(self.snapshot_message(&store, &vloc, &rec).await),
        }))
    }

    async fn do_delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> RpcResult<pb::DeleteSnapshotResponse> {
        let req = request.into_inner();
        if req.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("snapshot id is required"));
        }
        let Ok((vloc, name)) = self.snapshot_location(&req.snapshot_id) else {
            return Ok(Response::new(pb::DeleteSnapshotResponse {}));
        };
        // The pins that keep what clones and restored volumes read are no
        // snapshots a CO can see (ListSnapshots hides them) or delete.
        if name.starts_with("clone-") {
            return Ok(Response::new(pb::DeleteSnapshotResponse {}));
        }
        // As for DeleteVolume: nothing is deleted outside the stores this
        // driver provisions into.
        let (root, vname) = split_volume(&vloc);
        if object_name(vname) != vname || !self.serves(&root, &req.secrets).await? {
            return Err(Status::invalid_argument(format!(
                "snapshot id {} is outside the stores this driver provisions into; nothing was deleted",
                req.snapshot_id
            )));
        }
        let _guard = self.inflight.start(&req.snapshot_id)?;
        let store = self.store_for(&vloc, &req.secrets).await?;
        // Volumes restored from it hold pins of their own: its data stays
        // until the last of them is deleted.
        store.delete(&format::snapshot_key(&vloc.prefix, &name)).await.map_err(|e| store_status(&e))?;
        let root_prefix =
            vloc.prefix.trim_end_matches('/').rsplit_once('/').map(|(p, _)| format!("{p}/")).unwrap_or_default();
        // The name's claim, when it is this snapshot's (another volume's
        // snapshot of the same name keeps its own).
        let index_key = format!("{root_prefix}_snapshots/{name}");
        match store.get(&index_key, None).await {
            Ok(owner) if owner == snapshot_id(&vloc, &name).as_bytes() => {
                store.delete(&index_key).await.map_err(|e| store_status(&e))?;
            }
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(store_status(&e)),
        }
        self.reap(&store, &vloc).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn do_list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> RpcResult<pb::ListSnapshotsResponse> {
        let req = request.into_inner();
        let (start, max) = parse_pagination(req.max_entries, &req.starting_token)?;
        let mut all = Vec::new();
        if !req.snapshot_id.is_empty() {
            if let Ok((vloc, name)) = self.snapshot_location(&req.snapshot_id) {
                let store = self.store_for(&vloc, &req.secrets).await?;
                match read_snapshot(&store, &vloc.prefix, &name).await {
                    Ok(rec)
                        if req.source_volume_id.is_empty()
                            || parse_volume_id(&req.source_volume_id).is_ok_and(|l| l == vloc) =>
                    {
                        all.push(self.snapshot_message(&store, &vloc, &rec).await)
                    }
                    Ok(_) | Err(VolumeError::NotFound(_)) | Err(VolumeError::InvalidArgument(_)) => {}
                    Err(e) => return Err(status(e)),
                }
            }
        } else {
            let vols = if req.source_volume_id.is_empty() {
                self.all_volumes().await?
            } else {
                match self.volume_location(&req.source_volume_id) {
                    Ok(l) => vec![l],
                    Err(_) => Vec::new(),
                }
            };
            for vloc in vols {
                let store = self.store_for(&vloc, &req.secrets).await?;
                for rec in self.volume_snapshots(&store, &vloc).await? {
                    all.push(self.snapshot_message(&store, &vloc, &rec).await);
                }
            }
        }
        let (items, next) = page(all, start, max)?;
        let entries = items.into_iter().map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) }).collect();
        Ok(Response::new(pb::ListSnapshotsResponse { entries, next_token: next }))
    }

    async fn do_controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> RpcResult<pb::ControllerExpandVolumeResponse> {
        let req = request.into_inner();
        let loc = self.volume_location(&req.volume_id)?;
        let range =
            req.capacity_range.as_ref().ok_or_else(|| Status::invalid_argument("capacity range is required"))?;
        let _guard = self.inflight.start(&loc.url())?;
        let store = self.store_for(&loc, &req.secrets).await?;
        let store = unlocked(&store, &loc, kek_of(&req.secrets)?.as_ref()).await?;
        let meta = self.live_meta(&store, &loc).await?;
        keys::require(store.as_ref(), &loc.prefix, &meta).map_err(status)?;
        let st = replay::replay(store.as_ref(), &loc.prefix, meta.chunk_size as u64, None).await.map_err(status)?;
        let want = size_for(Some(range), meta.chunk_size as u64, 0)?;
        let is_block = matches!(
            req.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()),
            Some(pb::volume_capability::AccessType::Block(_))
        );
        if want <= st.size {
            return Ok(Response::new(pb::ControllerExpandVolumeResponse {
                capacity_bytes: to_i64(st.size),
                node_expansion_required: !is_block,
            }));
        }
        // While a node has the volume attached, its engine is the writer:
        // the node grows the volume (NodeExpandVolume). Otherwise grow it here.
        if self.attachments(&store, &loc).await?.iter().any(|a| !a.readonly) {
            return Ok(Response::new(pb::ControllerExpandVolumeResponse {
                capacity_bytes: to_i64(want),
                node_expansion_required: true,
            }));
        }
        let vol = Volume::open(store.clone(), &loc.prefix, OpenOptions::default()).await.map_err(status)?;
        vol.resize(want).await.map_err(status)?;
        tracing::info!(volume = %loc.url(), size = want, "volume expanded");
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(want),
            node_expansion_required: !is_block,
        }))
    }

    async fn do_controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> RpcResult<pb::ControllerGetVolumeResponse> {
        let req = request.into_inner();
        let loc = self.volume_location(&req.volume_id)?;
        let store = self.store_for(&loc, &HashMap::new()).await?;
        let reply = |volume: pb::Volume, nodes: Vec<String>, condition: pb::VolumeCondition| {
            Ok(Response::new(pb::ControllerGetVolumeResponse {
                volume: Some(volume),
                status: Some(pb::controller_get_volume_response::VolumeStatus {
                    published_node_ids: nodes,
                    volume_condition: Some(condition),
                }),
            }))
        };
        // The store not answering, or a volume.json that cannot be read,
        // is the volume's condition, not an error of the call: the CO
        // learns what is wrong with the volume.
        let bare = || pb::Volume { volume_id: loc.url(), ..Default::default() };
        let abnormal = |message: String| pb::VolumeCondition { abnormal: true, message };
        let meta = match replay::read_meta(store.as_ref(), &loc.prefix).await {
            Ok(m) => m,
            Err(e @ VolumeError::NotFound(_)) => return Err(status(e)),
            Err(VolumeError::Store(e)) => {
                return reply(bare(), Vec::new(), abnormal(format!("store unreachable: {e}")));
            }
            Err(e) => return reply(bare(), Vec::new(), abnormal(format!("damaged: {e}"))),
        };
        match catalog::is_deleted(&store, &loc.prefix).await {
            Ok(false) => {}
            Ok(true) => return Err(Status::not_found(format!("volume {} was deleted", loc.url()))),
            Err(e) => return reply(bare(), Vec::new(), abnormal(format!("store unreachable: {e}"))),
        }
        let nodes = match self.attachments(&store, &loc).await {
            Ok(a) => a.into_iter().map(|a| a.node_id).collect(),
            Err(_) => Vec::new(),
        };
        let condition = self.condition(&store, &loc).await;
        let size = catalog::current_size(&store, &loc.prefix, &meta).await.unwrap_or(meta.size);
        reply(volume_message(&loc, &meta, size), nodes, condition)
    }
}

/// The calls that change volumes and snapshots run in a task of their
/// own, which finishes when the caller gives up (the provisioner's,
/// attacher's, resizer's or snapshotter's deadline; gRPC then drops the
/// handler): its store requests and its checks run to their end, so the
/// retry (ABORTED while it runs) finds what it left whole, never a request
/// of it landing later.
#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn create_volume(&self, request: Request<pb::CreateVolumeRequest>) -> RpcResult<pb::CreateVolumeResponse> {
        self.owned(|me| async move { me.do_create_volume(request).await }).await
    }

    async fn delete_volume(&self, request: Request<pb::DeleteVolumeRequest>) -> RpcResult<pb::DeleteVolumeResponse> {
        self.owned(|me| async move { me.do_delete_volume(request).await }).await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> RpcResult<pb::ControllerPublishVolumeResponse> {
        self.owned(|me| async move { me.do_controller_publish_volume(request).await }).await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> RpcResult<pb::ControllerUnpublishVolumeResponse> {
        self.owned(|me| async move { me.do_controller_unpublish_volume(request).await }).await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> RpcResult<pb::ValidateVolumeCapabilitiesResponse> {
        self.do_validate_volume_capabilities(request).await
    }

    async fn list_volumes(&self, request: Request<pb::ListVolumesRequest>) -> RpcResult<pb::ListVolumesResponse> {
        self.do_list_volumes(request).await
    }

    async fn get_capacity(&self, request: Request<pb::GetCapacityRequest>) -> RpcResult<pb::GetCapacityResponse> {
        self.do_get_capacity(request).await
    }

    async fn controller_get_capabilities(
        &self,
        request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> RpcResult<pb::ControllerGetCapabilitiesResponse> {
        self.do_controller_get_capabilities(request).await
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> RpcResult<pb::CreateSnapshotResponse> {
        self.owned(|me| async move { me.do_create_snapshot(request).await }).await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> RpcResult<pb::DeleteSnapshotResponse> {
        self.owned(|me| async move { me.do_delete_snapshot(request).await }).await
    }

    async fn list_snapshots(&self, request: Request<pb::ListSnapshotsRequest>) -> RpcResult<pb::ListSnapshotsResponse> {
        self.do_list_snapshots(request).await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> RpcResult<pb::ControllerExpandVolumeResponse> {
        self.owned(|me| async move { me.do_controller_expand_volume(request).await }).await
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> RpcResult<pb::ControllerGetVolumeResponse> {
        self.do_controller_get_volume(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> pb::CapacityRange {
        pb::CapacityRange { required_bytes: req, limit_bytes: lim }
    }

    #[test]
    fn capacity_rounds_up_to_chunks_within_limits() {
        let mib = 1 << 20;
        assert_eq!(size_for(None, mib, 0).unwrap(), DEFAULT_CAPACITY);
        assert_eq!(size_for(Some(&range(1, 0)), mib, 0).unwrap(), mib);
        assert_eq!(size_for(Some(&range(mib as i64 + 1, 0)), mib, 0).unwrap(), 2 * mib);
        assert_eq!(size_for(Some(&range(5000, 8192)), mib, 0).unwrap(), 8192, "block granularity under a small limit");
        assert_eq!(size_for(Some(&range(0, 10 * mib as i64)), mib, 0).unwrap(), 10 * mib);
        assert_eq!(size_for(Some(&range(-1, 0)), mib, 0).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(size_for(Some(&range(10, 5)), mib, 0).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(size_for(Some(&range(5000, 5000)), mib, 0).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(i64::MAX, 0)), mib, 0).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(1, 0)), mib, 3 * mib).unwrap(), 3 * mib, "at least the source size");
    }

    #[test]
    fn parameters_are_validated() {
        let p = |kv: &[(&str, &str)]| parse_params(&kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let ok = p(&[("bucket", "b"), ("prefix", "/k8s/"), ("chunkSize", "4MiB"), ("fsType", "xfs")]).unwrap();
        assert_eq!(ok.store.unwrap().url(), "s3://b/k8s");
        assert_eq!(ok.chunk_size, Some(4 << 20));
        assert_eq!(ok.context["fsType"], "xfs");
        assert_eq!(ok.compression, None);
        assert_eq!(p(&[("compression", "zstd")]).unwrap().compression, Some(format::Codec::Zstd));
        assert_eq!(p(&[("compression", "LZ4")]).unwrap().compression, Some(format::Codec::Lz4));
        assert_eq!(p(&[("compression", "none")]).unwrap().compression, None);
        assert_eq!(p(&[("flatten", "True")]).unwrap().context["flatten"], "true");
        for bad in [
            &[("flatten", "yes")][..],
            &[("compression", "gzip")][..],
            &[("chunkSize", "3000")],
            &[("fsType", "btrfs")],
            &[("bogus", "1")],
            &[("bucket", "b"), ("store", "s3://c")],
            &[("cacheSize", "lots")],
            &[("prefix", "k8s")],
        ] {
            assert_eq!(p(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        assert!(p(&[("csi.storage.k8s.io/pvc/name", "x")]).is_ok());
    }
}
