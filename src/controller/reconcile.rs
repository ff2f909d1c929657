//! The compaction reconcile loop over this driver's PersistentVolumes.
//!
//! Owns: deciding per PV whether it is ours and whether a compaction is due,
//! choosing its credentials, running the compaction, and telling Kubernetes
//! what happened (an Event on the PV, annotations on the PV, metrics). Does
//! not own compaction itself (`volume::compact`), the stores (`csi::common`)
//! or who runs the loop (`mod.rs`, behind the Lease).
//!
//! The schedule lives on the PV, not in this process: the time and outcome of
//! the last compaction and the count of failures in a row are annotations.
//! So a reconcile triggered by a watch event (including the one our own
//! annotation patch causes) finds the compaction not yet due and only
//! requeues, and a replica that takes over the Lease carries on where the
//! last leader stopped instead of compacting every volume at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};

use crate::clock::Clock;
use crate::csi::common::Stores;
use crate::location::{Location, StoreSpec};
use crate::size::format_size;
use crate::store::DynStore;
use crate::volume::VolumeError;
use crate::volume::compact::{self, CompactOptions, CompactReport};
use crate::volume::format;

/// RFC 3339 time of the last compaction attempt that finished.
pub const ANN_LAST: &str = "s3blk.io/last-compaction";
/// `ok: …` or `failed: …`, one line.
pub const ANN_RESULT: &str = "s3blk.io/last-compaction-result";
/// Failed compactions in a row (absent after a success).
pub const ANN_FAILURES: &str = "s3blk.io/compaction-failures";

/// external-provisioner records the provisioner secret of a PV's
/// StorageClass in these annotations (for DeleteVolume).
const ANN_PROVISIONER_SECRET_NAME: &str = "volume.kubernetes.io/provisioner-deletion-secret-name";
const ANN_PROVISIONER_SECRET_NAMESPACE: &str = "volume.kubernetes.io/provisioner-deletion-secret-namespace";

/// Longest message kept in an annotation or Event note.
const MAX_MESSAGE: usize = 900;

/// When compactions happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// After a success, the next compaction of the same volume.
    pub interval: Duration,
    /// After the first failure; doubled per further failure, capped at `interval`.
    pub first_backoff: Duration,
}

impl Schedule {
    /// How long to wait after an attempt that left `failures` failures in a row.
    pub fn wait_after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return self.interval;
        }
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.first_backoff.saturating_mul(factor).min(self.interval)
    }

    /// How long until the PV's next compaction is due (zero: now), from its annotations.
    pub fn due_in(&self, annotations: &BTreeMap<String, String>, now_unix: i64) -> Duration {
        let Some(last) = annotations.get(ANN_LAST).and_then(|t| t.parse::<Timestamp>().ok()) else {
            return Duration::ZERO;
        };
        let failures = annotations.get(ANN_FAILURES).and_then(|f| f.parse::<u32>().ok()).unwrap_or(0);
        let wait = self.wait_after(failures);
        let elapsed = now_unix.saturating_sub(last.as_second());
        if elapsed < 0 {
            // Written by a replica whose clock is ahead: wait one full period, no longer.
            return wait;
        }
        wait.saturating_sub(Duration::from_secs(elapsed as u64))
    }
}

/// Everything a reconcile needs; shared by all reconciles.
pub struct Context {
    pub client: kube::Client,
    /// `spec.csi.driver` of the PVs that are ours.
    pub driver_name: String,
    pub stores: Arc<Stores>,
    /// `--store`: directory and memory volumes are compacted only there.
    pub default_store: Option<Location>,
    pub schedule: Schedule,
    pub compact: CompactOptions,
    pub recorder: Recorder,
    pub clock: Arc<dyn Clock>,
    /// Results compacted and not yet recorded on their PV (the patch
    /// failed), by PV name and uid: recorded on the next try instead of
    /// compacting again at every backoff.
    pub unrecorded: std::sync::Mutex<HashMap<String, Unrecorded>>,
}

/// A compaction's result its PV does not show yet.
#[derive(Debug, Clone)]
pub struct Unrecorded {
    annotations: BTreeMap<String, Option<String>>,
    failures: u32,
    at: std::time::Instant,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("driver_name", &self.driver_name).finish_non_exhaustive()
    }
}

/// A reconcile that could not record its result; the compaction's own
/// failures are results (recorded on the PV), not these.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("PV {pv}: cannot record the compaction result: {source}")]
    Record { pv: String, source: kube::Error },
}

/// The volume handle of a PV this driver serves, `None` for anyone else's.
pub fn our_volume<'a>(pv: &'a PersistentVolume, driver: &str) -> Option<&'a str> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == driver && !csi.volume_handle.is_empty()).then_some(csi.volume_handle.as_str())
}

/// Where the compaction's store credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A Secret the PV names; `source` says which reference.
    Secret { namespace: String, name: String, source: &'static str },
    /// The pod's own AWS environment (IRSA, AWS_* variables).
    PodEnvironment,
}

/// Which credentials compact a PV's volume: the controller-publish secret
/// (what the attacher passes to this same controller), else the provisioner
/// secret external-provisioner recorded, else the controller-expand secret,
/// else the pod's environment.
pub fn credentials_for(pv: &PersistentVolume) -> Credentials {
    let csi = pv.spec.as_ref().and_then(|s| s.csi.as_ref());
    let from_ref = |r: Option<&k8s_openapi::api::core::v1::SecretReference>, source| {
        let r = r?;
        let name = r.name.clone().filter(|n| !n.is_empty())?;
        Some(Credentials::Secret { namespace: r.namespace.clone().unwrap_or_default(), name, source })
    };
    if let Some(c) = from_ref(csi.and_then(|c| c.controller_publish_secret_ref.as_ref()), "controllerPublishSecretRef")
    {
        return c;
    }
    let ann = pv.annotations();
    let provisioner = (ann.get(ANN_PROVISIONER_SECRET_NAME), ann.get(ANN_PROVISIONER_SECRET_NAMESPACE));
    if let Some((name, namespace)) = provisioner.0.filter(|n| !n.is_empty()).zip(provisioner.1) {
        return Credentials::Secret {
            namespace: namespace.clone(),
            name: name.clone(),
            source: "provisioner secret (StorageClass)",
        };
    }
    if let Some(c) = from_ref(csi.and_then(|c| c.controller_expand_secret_ref.as_ref()), "controllerExpandSecretRef") {
        return c;
    }
    Credentials::PodEnvironment
}

/// A Secret's entries as the store settings read them.
pub fn secret_values(s: &Secret) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in s.data.iter().flatten() {
        if let Ok(text) = String::from_utf8(v.0.clone()) {
            out.insert(k.clone(), text.trim().to_string());
        }
    }
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.trim().to_string());
    }
    out
}

/// What one compaction attempt came to.
#[derive(Debug)]
pub enum Outcome {
    Compacted(CompactReport),
    /// The compaction (or what it needs: credentials, the store) failed.
    Failed {
        reason: &'static str,
        message: String,
    },
}

impl Outcome {
    fn failed(reason: &'static str, message: impl std::fmt::Display) -> Self {
        Outcome::Failed { reason, message: message.to_string() }
    }
}

/// Did a compaction change anything on the store?
pub fn changed(r: &CompactReport) -> bool {
    r.chunks_deleted + r.journal_records_deleted + r.checkpoints_written + r.checkpoints_deleted > 0
}

fn summary(r: &CompactReport) -> String {
    if !changed(r) {
        return format!("nothing to delete; head seq {}", r.head_seq);
    }
    let mut s = format!(
        "deleted {} chunk objects ({}), {} journal records and {} old checkpoints",
        r.chunks_deleted,
        format_size(r.chunk_bytes_deleted),
        r.journal_records_deleted,
        r.checkpoints_deleted
    );
    match r.folded_seq {
        Some(seq) => s.push_str(&format!("; checkpoint at seq {seq}")),
        None => s.push_str("; no record old enough to fold"),
    }
    s.push_str(&format!("; head seq {}", r.head_seq));
    s
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// An Event on a PV about `action`, its note clipped.
fn event(type_: EventType, action: &str, reason: &str, note: String) -> Event {
    Event { type_, reason: reason.to_string(), note: Some(clip(&note)), action: action.to_string(), secondary: None }
}

/// The Events an outcome gets on the PV: one for a compaction that changed
/// something, one for every failure, one when fenced writers' records were
/// found, one when unreadable snapshots hold compaction back.
pub fn events_for(outcome: &Outcome) -> Vec<Event> {
    let ev = |type_, reason: &str, note: String| event(type_, "Compact", reason, note);
    let mut out = Vec::new();
    match outcome {
        Outcome::Compacted(r) => {
            if changed(r) {
                out.push(ev(EventType::Normal, "Compacted", summary(r)));
            }
            if !r.stale_records.is_empty() {
                out.push(ev(
                    EventType::Warning,
                    "FencedWriter",
                    format!(
                        "journal records {:?} were written by a writer after a newer one had opened the volume; they were ignored (the older writer was fenced)",
                        r.stale_records
                    ),
                ));
            }
            if !r.unreadable_snapshots.is_empty() {
                out.push(ev(
                    EventType::Warning,
                    "SnapshotUnreadable",
                    format!(
                        "snapshot records {:?} cannot be read; nothing is deleted from this volume until they are repaired or removed",
                        r.unreadable_snapshots
                    ),
                ));
            }
        }
        Outcome::Failed { reason, message } => out.push(ev(EventType::Warning, reason, message.clone())),
    }
    out
}

/// The annotations an outcome leaves on the PV, given the failures in a row before it.
pub fn annotations_for(outcome: &Outcome, now_unix: i64, failures_before: u32) -> BTreeMap<String, Option<String>> {
    let when = Timestamp::from_second(now_unix).unwrap_or(Timestamp::UNIX_EPOCH).to_string();
    let mut a = BTreeMap::new();
    a.insert(ANN_LAST.to_string(), Some(when));
    match outcome {
        Outcome::Compacted(r) => {
            a.insert(ANN_RESULT.to_string(), Some(format!("ok: {}", summary(r))));
            // A merge patch removes a key set to null.
            a.insert(ANN_FAILURES.to_string(), None);
        }
        Outcome::Failed { reason, message } => {
            a.insert(ANN_RESULT.to_string(), Some(clip(&format!("failed ({reason}): {message}"))));
            a.insert(ANN_FAILURES.to_string(), Some((failures_before + 1).to_string()));
        }
    }
    a
}

fn failures_of(pv: &PersistentVolume) -> u32 {
    pv.annotations().get(ANN_FAILURES).and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// Reconcile one PV: compact its volume when due, record what happened,
/// and requeue for the next time it is due.
pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let name = pv.name_any();
    // Keyed by the PV's uid as well: a PV made again under the same name
    // is another volume's.
    let key = format!("{name}/{}", pv.metadata.uid.as_deref().unwrap_or_default());
    // A result not recorded yet is recorded, not compacted for again, until
    // the next compaction is due by it.
    let pending = ctx.unrecorded.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    let Some(handle) = our_volume(&pv, &ctx.driver_name) else { return Ok(Action::await_change()) };
    if pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if let Some(u) = pending.filter(|u| u.at.elapsed() < ctx.schedule.wait_after(u.failures)) {
        let wait = ctx.schedule.wait_after(u.failures).saturating_sub(u.at.elapsed());
        if let Err(e) = record(&ctx, &name, &u.annotations).await {
            ctx.unrecorded.lock().unwrap_or_else(|p| p.into_inner()).insert(key, u);
            return Err(e);
        }
        return Ok(Action::requeue(wait));
    }
    let due = ctx.schedule.due_in(pv.annotations(), ctx.clock.now_unix());
    if !due.is_zero() {
        return Ok(Action::requeue(due));
    }
    let started = std::time::Instant::now();
    let outcome = compact_volume(&pv, handle, &ctx).await;
    let failures_before = failures_of(&pv);
    // Per volume (its prefix, as on the node): one compaction per volume
    // per interval and three outcomes keep the series few however many
    // volumes the driver has.
    let metrics = &crate::metrics::global().compaction;
    let volume = Location::parse(handle, true)
        .map(|l| crate::metrics::volume_label(&l.prefix))
        .unwrap_or_else(|_| handle.to_string());
    let count = |outcome| {
        let labels = crate::metrics::CompactionLabels { volume: volume.clone(), outcome };
        metrics.volume_compactions.get_or_create(&labels).inc();
    };
    let failures = match &outcome {
        Outcome::Compacted(r) => {
            count(if changed(r) { "changed" } else { "unchanged" });
            let labels = crate::metrics::VolumeLabels { volume: volume.clone() };
            metrics.freed_bytes.get_or_create(&labels).inc_by(r.chunk_bytes_deleted);
            if !r.stale_records.is_empty() {
                metrics.fenced_writers.get_or_create(&labels).inc();
            }
            tracing::info!(pv = %name, volume = handle, seconds = started.elapsed().as_secs_f64(), result = %summary(r), "volume compacted");
            0
        }
        Outcome::Failed { reason, message } => {
            count("failed");
            tracing::warn!(pv = %name, volume = handle, reason, error = %message, "compaction failed");
            failures_before + 1
        }
    };
    let annotations = annotations_for(&outcome, ctx.clock.now_unix(), failures_before);
    if let Err(e) = record(&ctx, &name, &annotations).await {
        let u = Unrecorded { annotations, failures, at: std::time::Instant::now() };
        ctx.unrecorded.lock().unwrap_or_else(|p| p.into_inner()).insert(key, u);
        return Err(e);
    }
    let reference = pv_reference(&pv);
    let mut events = events_for(&outcome);
    if flatten_wanted(&pv) && matches!(outcome, Outcome::Compacted(_)) {
        events.extend(flatten_unserved(&pv, handle, &ctx).await);
    }
    for ev in events {
        // An Event that cannot be written is not worth a second compaction:
        // the annotations above already tell the outcome.
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(pv = %name, reason = %ev.reason, error = %e, "cannot publish an Event");
        }
    }
    Ok(Action::requeue(ctx.schedule.wait_after(failures)))
}

/// Write a compaction's result into its PV's annotations.
async fn record(
    ctx: &Context,
    name: &str,
    annotations: &BTreeMap<String, Option<String>>,
) -> Result<(), ReconcileError> {
    let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|source| ReconcileError::Record { pv: name.to_string(), source })
}

/// After a reconcile error (the result could not be recorded): try again
/// after the first backoff.
pub fn error_policy(_pv: Arc<PersistentVolume>, e: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "reconcile failed; retried");
    Action::requeue(ctx.schedule.first_backoff)
}

fn pv_reference(pv: &PersistentVolume) -> ObjectReference {
    let mut r = pv.object_ref(&());
    // Events about a cluster-scoped object live in the default namespace.
    r.namespace = None;
    r
}

/// Is `loc` a volume this controller may compact? S3 volumes anywhere (the
/// compaction itself touches only a proven s3blk volume's own objects);
/// directory and memory volumes only under `--store`: a PV must not point
/// the controller at other paths of its host.
fn allowed(loc: &Location, default_store: Option<&Location>) -> bool {
    match &loc.store {
        StoreSpec::S3 { .. } => true,
        _ => default_store.is_some_and(|root| {
            let name_len = format::volume_name(&loc.prefix).len() + 1;
            let parent = &loc.prefix[..loc.prefix.len().saturating_sub(name_len)];
            root.store == loc.store && root.prefix == parent
        }),
    }
}

async fn compact_volume(pv: &PersistentVolume, handle: &str, ctx: &Context) -> Outcome {
    let (loc, store) = match volume_store(pv, handle, ctx).await {
        Ok(found) => found,
        Err(failed) => return failed,
    };
    match compact::compact(&store, &loc.prefix, &ctx.compact, ctx.clock.as_ref()).await {
        Ok(r) => Outcome::Compacted(r),
        Err(e @ VolumeError::Key(_)) => Outcome::failed("EncryptionKeyMissing", e),
        Err(e @ VolumeError::Fenced(_)) => Outcome::failed("Fenced", e),
        Err(e @ VolumeError::NotFound(_)) => Outcome::failed("VolumeNotFound", e),
        Err(e) => Outcome::failed("CompactionFailed", e),
    }
}

/// Does the PV's StorageClass ask for its clones to be flattened?
pub fn flatten_wanted(pv: &PersistentVolume) -> bool {
    let attrs = pv.spec.as_ref().and_then(|s| s.csi.as_ref()).and_then(|c| c.volume_attributes.as_ref());
    attrs.and_then(|a| a.get(crate::csi::common::FLATTEN)).is_some_and(|v| v == "true")
}

/// The writer lease command of the controller's flatten: ControllerPublish
/// answers UNAVAILABLE while a live lease of this command is on the
/// volume (and the flatten, seeing the attachment, stops and lets go).
pub const FLATTEN_LEASE: &str = "flatten (s3blk controller)";

/// How often a flatten under way looks for an attachment.
const ATTACHMENT_POLL: Duration = Duration::from_secs(2);

/// Flatten the PV's volume when it is a clone no node serves (a node
/// serving one flattens it itself, as its writer): under the volume's
/// writer lease, copy what it reads through its parent, then let go of
/// the parent. The lease and an attachment exclude each other: this
/// writes the lease and then lists attachments; ControllerPublish writes
/// its attachment and then reads the lease. So a node never opens the
/// volume while this writer lives: a publish meanwhile is refused until
/// the copy, which looks for attachments while it runs, stops and lets
/// the lease go. `None`: nothing to do or say.
pub async fn flatten_unserved(pv: &PersistentVolume, handle: &str, ctx: &Context) -> Option<Event> {
    let ev = |type_, reason: &str, note: String| event(type_, "Flatten", reason, note);
    let failed = |note: String| Some(ev(EventType::Warning, "FlattenFailed", note));
    // A PV released or being deleted: its volume may be on its way out.
    if pv.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p != "Bound") {
        return None;
    }
    let (loc, store) = match volume_store(pv, handle, ctx).await {
        Ok(found) => found,
        Err(Outcome::Failed { message, .. }) => return failed(message),
        Err(Outcome::Compacted(_)) => return None,
    };
    let meta = match crate::volume::replay::read_meta(store.as_ref(), &loc.prefix).await {
        Ok(m) => m,
        Err(e) => return failed(e.to_string()),
    };
    // Copied already when `flattened` is there: only the letting go is left.
    let seq = match (&meta.parent, &meta.flattened) {
        (None, None) => return None,
        (Some(_), None) if meta.single_writer => {
            // No fencing on such a volume: no writer of the controller's beside a node's.
            return failed("a volume in single-writer mode is flattened with `s3blk volume flatten` only".into());
        }
        (Some(_), None) => match copy_unserved(&store, &loc, ctx).await {
            Ok(Some(seq)) => Some(seq),
            Ok(None) => return None,
            Err(e) => return failed(format!("copying what the clone reads through its parent: {e}")),
        },
        _ => None,
    };
    match crate::volume::catalog::let_go_of_parent(&store, &loc.prefix, seq).await {
        Ok(crate::volume::catalog::ParentOutcome::LetGo { parent }) if meta.parent.is_some() => Some(ev(
            EventType::Normal,
            "Flattened",
            format!("the volume has its own copy of every chunk and no longer reads through {parent}"),
        )),
        Ok(crate::volume::catalog::ParentOutcome::Kept { snapshots }) => Some(ev(
            EventType::Normal,
            "FlattenWaiting",
            format!(
                "the volume has its own copy of every chunk, but snapshots of it taken before ({}) still read through \
                 its parent; it lets go of the parent once they are deleted (a clone-* pin goes with its clone, or \
                 when that clone is flattened)",
                snapshots.join(", ")
            ),
        )),
        Ok(_) => None,
        Err(e) => failed(format!("letting go of the parent: {e}")),
    }
}

/// The copy of [`flatten_unserved`], under the writer lease: the seq its
/// copy is committed at, or `None` when a node uses the volume (before
/// or while it copies; what it committed stays).
async fn copy_unserved(store: &DynStore, loc: &Location, ctx: &Context) -> Result<Option<u64>, String> {
    use crate::volume::lease::{self, Lease, LeaseError};
    let held =
        match Lease::acquire(store, &loc.prefix, FLATTEN_LEASE, false, lease::LEASE_TTL, ctx.clock.as_ref()).await {
            Ok(l) => l,
            Err(LeaseError::Busy(_)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
    let attached = || async {
        crate::volume::catalog::attachments(store, &loc.prefix).await.map(|a| !a.is_empty()).map_err(|e| e.to_string())
    };
    let copied = async {
        // The head first, then the attachments (after the lease is
        // written: one written before it is seen here), then an open at
        // that head only: a node that opened since (its publish let
        // through by a lease that lapsed meanwhile) is never fenced by it.
        let meta = crate::volume::replay::read_meta(store.as_ref(), &loc.prefix).await.map_err(|e| e.to_string())?;
        let cs = u64::from(meta.chunk_size);
        let head =
            crate::volume::replay::replay(store.as_ref(), &loc.prefix, cs, None).await.map_err(|e| e.to_string())?.head;
        if attached().await? {
            return Ok(None);
        }
        let opts = crate::volume::OpenOptions { expect_head: Some(head), ..crate::volume::OpenOptions::default() };
        let vol = match crate::volume::Volume::open(store.clone(), &loc.prefix, opts).await {
            Ok(v) => v,
            // Another writer opened since: its node flattens it.
            Err(VolumeError::Fenced(_)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let copy = vol.copy_parents(&|_, _| {});
        tokio::pin!(copy);
        loop {
            tokio::select! {
                biased;
                c = &mut copy => return c.map(|c| Some(c.seq)).map_err(|e| e.to_string()),
                _ = tokio::time::sleep(ATTACHMENT_POLL) => {
                    // A node is on its way: stop (dropping the copy is safe:
                    // what is not committed reads the same through the parent).
                    if attached().await? {
                        return Ok(None);
                    }
                }
            }
        }
    }
    .await;
    held.release().await;
    copied
}

/// The PV's volume and its store (unlocked with the key of the PV's
/// secret when encrypted), or the outcome that says why not.
async fn volume_store(pv: &PersistentVolume, handle: &str, ctx: &Context) -> Result<(Location, DynStore), Outcome> {
    let loc = match Location::parse(handle, true) {
        Ok(l) => l,
        Err(e) => return Err(Outcome::failed("InvalidVolumeHandle", format!("volume handle {handle:?}: {e}"))),
    };
    if !allowed(&loc, ctx.default_store.as_ref()) {
        return Err(Outcome::failed(
            "InvalidVolumeHandle",
            format!("volume handle {handle:?} is a local path outside --store; not compacted"),
        ));
    }
    let secrets = match credentials_for(pv) {
        Credentials::PodEnvironment => HashMap::new(),
        Credentials::Secret { namespace, name, source } => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
            match api.get_opt(&name).await {
                Ok(Some(s)) => secret_values(&s),
                Ok(None) => {
                    return Err(Outcome::failed(
                        "SecretNotFound",
                        format!("secret {namespace}/{name} ({source}) does not exist"),
                    ));
                }
                Err(e) => {
                    return Err(Outcome::failed(
                        "SecretUnreadable",
                        format!("secret {namespace}/{name} ({source}): {e}"),
                    ));
                }
            }
        }
    };
    let store = match ctx.stores.get(&loc, &secrets).await {
        Ok(s) => s,
        Err(e) => return Err(Outcome::failed("StoreUnavailable", e.message())),
    };
    // An encrypted volume compacts with the key in the same secret.
    let kek = match crate::csi::common::kek_of(&secrets) {
        Ok(k) => k,
        Err(e) => return Err(Outcome::failed("EncryptionKeyInvalid", e.message())),
    };
    match crate::csi::common::unlocked(&store, &loc, kek.as_ref()).await {
        Ok(s) => Ok((loc, s)),
        Err(e) => Err(Outcome::failed("EncryptionKeyWrong", e.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched() -> Schedule {
        Schedule { interval: Duration::from_secs(3600), first_backoff: Duration::from_secs(30) }
    }

    #[test]
    fn backoff_doubles_per_failure_and_stops_at_the_interval() {
        let s = sched();
        assert_eq!(s.wait_after(0), Duration::from_secs(3600));
        assert_eq!(s.wait_after(1), Duration::from_secs(30));
        assert_eq!(s.wait_after(2), Duration::from_secs(60));
        assert_eq!(s.wait_after(3), Duration::from_secs(120));
        assert_eq!(s.wait_after(8), Duration::from_secs(3600));
        assert_eq!(s.wait_after(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn due_time_comes_from_the_annotations() {
        let s = sched();
        let now = 1_800_000_000;
        let mut a = BTreeMap::new();
        assert_eq!(s.due_in(&a, now), Duration::ZERO, "never compacted: now");
        a.insert(ANN_LAST.to_string(), Timestamp::from_second(now - 600).unwrap().to_string());
        assert_eq!(s.due_in(&a, now), Duration::from_secs(3000));
        a.insert(ANN_FAILURES.to_string(), "2".to_string());
        assert_eq!(s.due_in(&a, now), Duration::ZERO, "600 s is past a 60 s backoff");
        a.insert(ANN_LAST.to_string(), Timestamp::from_second(now - 10).unwrap().to_string());
        assert_eq!(s.due_in(&a, now), Duration::from_secs(50));
        a.insert(ANN_LAST.to_string(), Timestamp::from_second(now + 9999).unwrap().to_string());
        assert_eq!(s.due_in(&a, now), Duration::from_secs(60), "a future time waits one period, no more");
        a.insert(ANN_LAST.to_string(), "yesterday".to_string());
        assert_eq!(s.due_in(&a, now), Duration::ZERO, "unparsable: now");
    }

    #[test]
    fn local_volumes_only_directly_under_the_default_store() {
        let root = Location::parse("file:///srv/vols", false).unwrap();
        let ok = Location::parse("file:///srv/vols/pvc-1", true).unwrap();
        let deeper = Location::parse("file:///srv/vols/a/pvc-1", true).unwrap();
        let elsewhere = Location::parse("file:///etc/pvc-1", true).unwrap();
        assert!(allowed(&ok, Some(&root)));
        assert!(!allowed(&deeper, Some(&root)));
        assert!(!allowed(&elsewhere, Some(&root)));
        assert!(!allowed(&ok, None));
        assert!(allowed(&Location::parse("s3://b/p/pvc-1", true).unwrap(), None));
    }
}
