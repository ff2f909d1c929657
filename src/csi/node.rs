//! The CSI node service: serve a volume from this process over NBD on a
//! per-volume unix socket, attach it to a free `/dev/nbdX` (`crate::attach`:
//! the kernel's netlink interface, or its ioctls where netlink is not
//! reachable), then mkfs (only if the device holds no filesystem) and mount
//! it at the staging path.
//!
//! Each staged volume has a record in the state directory, so a restarted
//! plugin serves its volumes again on the same sockets and gives the kernel
//! fresh connections; the mounted filesystems only see a pause. (Devices
//! attached through ioctls do not survive the restart: see `crate::attach`.)
//! A restarted plugin serves a volume again only while its attachment
//! record (ControllerPublish) still names this node and, where the
//! Kubernetes API is reachable, while a VolumeAttachment still attaches it
//! to this node (`super::attachments`); recovery runs in the background,
//! one task per volume, while the CSI socket already answers.
//!
//! Stage secrets never reach the state directory (persistent disk): they
//! are kept in memory and, for a restart, in `--secrets-dir` (a tmpfs such
//! as /run/s3blk: directory 0700, files 0600). After a reboot that copy is
//! gone, and a volume staged with secrets cannot be served again until
//! kubelet stages it again. Secrets never appear in logs, errors or
//! `Debug` output.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell, watch};
use tonic::{Request, Response, Status};

use super::attachments::NodeAttachments;
use super::common::{
    CALLS_GRACE, Calls, ENCRYPTED, InFlight, RpcResult, Stores, check_capability, parse_volume_id, status, store_status,
};
use super::mount::{self, MountError};
use super::pb;
use crate::attach::{AttachError, Attacher, devices};
use crate::clock::Clock;
use crate::nbd::unflushed::UnflushedMarker;
use crate::nbd::{Export, Listen, server};
use crate::size::parse_size;
use crate::store::DynStore;
use crate::volume::budget::MemoryBudget;
use crate::volume::{OpenOptions, Volume, catalog};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    pub state_dir: PathBuf,
    /// Where stage secrets are kept for a restart: must be a tmpfs.
    pub secrets_dir: PathBuf,
    pub max_volumes: i64,
    /// Dirty data and cache shared by every volume this node serves.
    pub budget: Arc<MemoryBudget>,
    /// A volume's own cache cap inside the shared budget when its
    /// StorageClass sets no `cacheSize` (at most the budget's cache).
    pub cache_limit: u64,
    pub busy_poll: std::time::Duration,
    /// A staged volume's write-back log past this starts a flush.
    pub write_log_limit: u64,
    /// Writers' page patch limit ([`crate::volume::OpenOptions::patch_limit`]).
    pub patch_limit: u64,
    /// NBD request payload and reply bytes in flight, across every volume
    /// this node serves and every connection to it (see [`nbd_inflight`]).
    pub nbd_inflight: usize,
}

/// The NBD bytes in flight a node allows across all the volumes it serves:
/// a quarter of the container's memory limit when one is known, between one
/// largest request (32 MiB) and the NBD server's default of 256 MiB; that
/// default without a limit. With the half the memory budget takes, this
/// leaves at least a quarter of the limit to the process itself.
pub fn nbd_inflight(container_limit: Option<u64>) -> usize {
    let default = crate::nbd::session::DEFAULT_SERVER_INFLIGHT as u64;
    let floor = crate::nbd::proto::MAX_PAYLOAD as u64;
    container_limit.map_or(default, |l| (l / 4).clamp(floor, default)) as usize
}

/// Stage secrets: serialised only into `--secrets-dir`, never printed.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
struct Secrets(HashMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} keys, redacted)", self.0.len())
    }
}

/// What a staged volume needs to be served again after a restart.
/// Written to the state directory: holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageRecord {
    volume_id: String,
    staging_path: PathBuf,
    device: String,
    socket: PathBuf,
    export: String,
    /// `None` for raw block volumes.
    fs_type: Option<String>,
    readonly: bool,
    cache_limit: u64,
    /// The stage carried secrets (kept in `--secrets-dir`, not here).
    #[serde(default)]
    has_secrets: bool,
    /// The boot of the kernel the device was attached in (`None`: a record
    /// of an earlier version). After a reboot the device named is no longer
    /// this volume's: another tool may have taken its number since.
    #[serde(default)]
    boot: Option<String>,
    /// Provisioned encrypted: served only while its `volume.json` says so.
    #[serde(default)]
    encrypted: bool,
    /// Its StorageClass asks for clones to be flattened.
    #[serde(default)]
    flatten: bool,
    /// Records of earlier versions kept the secrets here: read once,
    /// moved to `--secrets-dir`, never written back.
    #[serde(default, rename = "secrets", skip_serializing)]
    legacy_secrets: Secrets,
}

/// A volume served on its NBD socket by this process.
struct Server {
    volume: Volume,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Flattening it in the background (a clone of a class that asks).
    flatten: Option<AbortOnDrop>,
}

/// A task stopped when its handle goes.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A volume served by [`NodeService::serve_unattached`].
pub struct Served {
    volume_id: String,
    server: Server,
}

/// What serving a volume takes (a stage record minus where it is attached).
struct ServeSpec<'a> {
    volume_id: &'a str,
    socket: &'a Path,
    export: &'a str,
    readonly: bool,
    cache_limit: u64,
    secrets: &'a HashMap<String, String>,
    /// Provisioned encrypted (the volume context says so).
    encrypted: bool,
    /// Flatten it, when it is a clone (the volume context says so).
    flatten: bool,
}

impl<'a> ServeSpec<'a> {
    fn of(r: &'a StageRecord, secrets: &'a HashMap<String, String>) -> Self {
        Self {
            volume_id: &r.volume_id,
            socket: &r.socket,
            export: &r.export,
            readonly: r.readonly,
            cache_limit: r.cache_limit,
            secrets,
            encrypted: r.encrypted,
            flatten: r.flatten,
        }
    }
}

/// Flatten a clone this node serves (its StorageClass asks): its writer
/// copies what it reads through its parent beside the I/O it serves, then
/// lets go of the parent. Failures are retried with backoff; a snapshot of
/// the clone older than the copy keeps the parent, and the flatten is tried
/// again hourly until it is gone. Stopped with the volume's server.
async fn flatten_served(volume: Volume, volume_id: String) {
    const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);
    const LATEST: std::time::Duration = std::time::Duration::from_secs(3600);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let outcome = match volume.copy_parents(&|_, _| {}).await {
            Ok(c) => {
                tracing::info!(volume = %volume_id, copied = c.copied, in_store = c.in_store, inherited = c.inherited, "flatten: copied what the clone read through its parent");
                catalog::let_go_of_parent(volume.store(), volume.prefix(), Some(c.seq)).await.map_err(|e| e.to_string())
            }
            Err(e) if volume.fenced().is_some() => {
                tracing::info!(volume = %volume_id, error = %e, "flatten stopped: the volume was taken over");
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        let wait = match outcome {
            Ok(catalog::ParentOutcome::LetGo { parent }) => {
                tracing::info!(volume = %volume_id, parent = %parent, "flattened: the clone no longer reads through its parent");
                return;
            }
            Ok(catalog::ParentOutcome::NotAClone) => return,
            Ok(catalog::ParentOutcome::Kept { snapshots }) => {
                tracing::info!(volume = %volume_id, snapshots = ?snapshots, "flatten: snapshots of the clone taken before keep its parent; trying again in an hour");
                LATEST
            }
            Err(e) => {
                tracing::warn!(volume = %volume_id, error = %e, retry_in = ?backoff, "flatten failed");
                let w = backoff;
                backoff = (backoff * 2).min(LATEST);
                w
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// What `VolumeCondition` and the RPCs say about a volume that lost
/// acknowledged writes in a plugin crash.
const LOST_WRITES: &str = "lost unflushed writes in a plugin crash; restart the pod: the volume's device was \
                           disconnected so the filesystem sees I/O errors, and staging it again (after NodeUnstage) \
                           mounts the data as of its last flush";

/// How this process holds a staged volume.
enum Serving {
    /// Served on its socket by this process.
    Up(Server),
    /// The previous plugin process exited without committing writes it had
    /// acknowledged (its unflushed-writes marker was left behind): the
    /// device was disconnected, nothing is served until NodeUnstage.
    LostWrites,
}

struct Staged {
    record: StageRecord,
    serving: Serving,
    /// Why the device could not be connected to its server again after a
    /// plugin restart: until a NodeStage connects it, its I/O fails and
    /// the volume is reported abnormal.
    unconnected: Option<String>,
}

impl Staged {
    fn volume(&self) -> Result<&Volume, Status> {
        match &self.serving {
            Serving::Up(s) => Ok(&s.volume),
            Serving::LostWrites => Err(Status::failed_precondition(LOST_WRITES)),
        }
    }
}

/// Was the stage record written before this boot of the node (`boot`)?
/// A record names its boot; one of an earlier version does not, and is
/// taken for this boot's (a file's time is no proof: the clock may have
/// been stepped since the boot).
fn staged_in_an_earlier_boot(record: &StageRecord, boot: Option<&str>) -> bool {
    matches!((&record.boot, boot), (Some(theirs), Some(ours)) if theirs != ours)
}

/// Tries to connect a staged volume's device again after a plugin restart
/// (waiting 1, 2 s between them) before it is left to NodeStage.
const RECONNECT_ATTEMPTS: u32 = 3;

pub struct NodeService {
    cfg: NodeConfig,
    stores: Arc<Stores>,
    staged: Mutex<HashMap<String, Staged>>,
    inflight: InFlight,
    attacher: Attacher,
    /// What every export's connections share: one bound on NBD buffers for
    /// the whole node, not one per volume.
    nbd_limits: crate::nbd::session::Limits,
    /// The Kubernetes API, when the plugin runs in a cluster.
    kubernetes: Option<NodeAttachments>,
    /// This service, for the tasks its calls run in (see [`Self::into_arc`]).
    me: Weak<NodeService>,
    /// The calls running in tasks of their own, and recoveries: `shutdown`
    /// waits for them.
    calls: Calls,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

fn internal(e: MountError) -> Status {
    Status::internal(e.to_string())
}

fn attach_err(e: AttachError) -> Status {
    match e {
        AttachError::NoFreeDevice { .. } => Status::resource_exhausted(e.to_string()),
        AttachError::DriverMissing => Status::failed_precondition(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// What the staging path of a staged filesystem volume holds.
enum StagedMount {
    Ok,
    Missing,
    Wrong(String),
}

/// Does `device` hold an `fs` filesystem (`false`: nothing at all)? One
/// of another type is refused, and so is anything else blkid finds (a
/// partition table, contradicting signatures). blkid says "nothing" also
/// when it cannot read the device (the store not answering): that is
/// believed only when the device's ends read before the probe (which
/// then reads them from the page cache) and after it.
async fn has_filesystem(device: &str, fs: &str) -> Result<bool, Status> {
    let read = async || {
        let dev = device.to_string();
        let r = tokio::task::spawn_blocking(move || reads_ends(&dev))
            .await
            .map_err(|e| Status::internal(format!("reading {device}: {e}")))?;
        r.map_err(|e| {
            Status::unavailable(format!(
                "{device} could not be read to look for a filesystem ({e}); nothing was formatted"
            ))
        })
    };
    read().await?;
    match mount::probe(device).await.map_err(internal)? {
        mount::Found::Type(found) if found != fs => {
            Err(Status::failed_precondition(format!("the volume holds a {found} filesystem, not {fs}")))
        }
        mount::Found::Type(_) => Ok(true),
        mount::Found::Other(what) => Err(Status::failed_precondition(format!(
            "the volume holds {what}, not a {fs} filesystem: it is not formatted"
        ))),
        mount::Found::Nothing => {
            read().await?;
            Ok(false)
        }
    }
}

/// Read the first and the last MiB of `device` (where filesystems keep
/// their superblocks), failing on any error.
fn reads_ends(device: &str) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(device)?;
    let len = f.seek(SeekFrom::End(0))?;
    let span = len.min(1 << 20);
    let mut buf = vec![0u8; span as usize];
    for at in [0, len - span] {
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf)?;
    }
    Ok(())
}

fn staged_mount(r: &StageRecord) -> StagedMount {
    let Some((dev_t, fs, _opts)) = mount::mounted_at(&r.staging_path) else { return StagedMount::Missing };
    let want = devices::dev_t(&r.device);
    if want.as_deref() != Some(dev_t.as_str()) {
        return StagedMount::Wrong(format!(
            "{} is mounted from device {dev_t}, not from this volume's {} ({})",
            r.staging_path.display(),
            r.device,
            want.unwrap_or_else(|| "unknown".into())
        ));
    }
    if r.fs_type.as_deref().is_some_and(|want| want != fs) {
        return StagedMount::Wrong(format!("{} holds a {fs} filesystem, not the volume's", r.staging_path.display()));
    }
    StagedMount::Ok
}

/// Mount a staged volume's filesystem: a preen check first (ext4,
/// read-write), the options `mount::stage_options` explains, and then grow
/// the filesystem to the device (a volume restored or cloned into a larger
/// size holds its source's smaller filesystem).
async fn mount_staged(
    volume_id: &str,
    device: &str,
    staging: &Path,
    fs: &str,
    readonly: bool,
    user_flags: Vec<String>,
) -> Result<(), Status> {
    // Not while the filesystem is mounted elsewhere (a pod's bind mount of
    // a staging path that lost its mount): fsck refuses, and need not run.
    let mounted = devices::dev_t(device).is_some_and(|d| mount::device_mounted(&d));
    if fs == "ext4" && !readonly && !mounted {
        match mount::preen_ext4(device).await {
            Ok(mount::Preen::Clean) => {}
            Ok(mount::Preen::Fixed(out)) => {
                tracing::warn!(volume = %volume_id, device = %device, output = %out, "fsck.ext4 -p fixed the filesystem");
            }
            Err(e) => return Err(Status::failed_precondition(e.to_string())),
        }
    }
    let mut flags = user_flags;
    flags.extend(mount::stage_options(fs, readonly));
    mount::mount(device, staging, Some(fs), &flags).await.map_err(internal)?;
    if !readonly && let Err(e) = mount::grow_filesystem(device, staging, fs).await {
        let _ = mount::umount(staging).await;
        return Err(internal(e));
    }
    Ok(())
}

/// How long recovery waits for the Kubernetes API before it goes on
/// without it.
const KUBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The in-flight key of a publish target (volume ids are URLs: no clash).
fn target_key(target: &Path) -> String {
    format!("publish target {}", target.display())
}

fn key_of(volume_id: &str) -> String {
    format!("{:08x}", crc32c::crc32c(volume_id.as_bytes()))
}

fn required_path(p: &str, what: &str) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!("{what} must be absolute")));
    }
    Ok(path)
}

impl NodeService {
    pub fn new(cfg: NodeConfig, stores: Arc<Stores>) -> Result<Self, std::io::Error> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))?;
        let attacher = Attacher::new(&cfg.state_dir);
        let nbd_limits = crate::nbd::session::Limits::new(
            cfg.nbd_inflight,
            crate::nbd::session::DEFAULT_MAX_CONNECTIONS,
            crate::nbd::session::DEFAULT_IO_DEADLINE,
        );
        Ok(Self {
            nbd_limits,
            cfg,
            stores,
            staged: Mutex::new(HashMap::new()),
            inflight: InFlight::default(),
            attacher,
            kubernetes: None,
            me: Weak::new(),
            calls: Calls::default(),
        })
    }

    /// The service, shared: what its gRPC server and recovery take. Its
    /// calls that change the node run in tasks of their own, which hold it.
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
        self.calls.owned(&self.me, "node plugin", call).await
    }

    /// Consult this node's VolumeAttachments (through `api`) before serving
    /// staged volumes again after a restart.
    pub fn with_kubernetes(mut self, api: NodeAttachments) -> Self {
        self.kubernetes = Some(api);
        self
    }

    /// The volumes Kubernetes attaches to this node, read once per recovery
    /// (`cell`); `None` outside a cluster or when the API cannot tell, and
    /// then only the stores' attachment records decide.
    async fn kube_attached<'a>(&self, cell: &'a OnceCell<Option<HashSet<String>>>) -> Option<&'a HashSet<String>> {
        cell.get_or_init(|| async {
            let api = self.kubernetes.as_ref()?;
            let node = &self.cfg.node_id;
            match tokio::time::timeout(KUBE_TIMEOUT, api.attached_to(node)).await {
                Ok(Ok(set)) => {
                    tracing::info!(node = %node, volumes = set.len(), "read this node's VolumeAttachments");
                    Some(set)
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        node = %node, error = %e,
                        "cannot read this node's VolumeAttachments: serving staged volumes again as their stores' \
                         attachment records say"
                    );
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        node = %node, timeout = ?KUBE_TIMEOUT,
                        "the Kubernetes API did not list this node's VolumeAttachments in time: serving staged \
                         volumes again as their stores' attachment records say"
                    );
                    None
                }
            }
        })
        .await
        .as_ref()
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{}.json", key_of(volume_id)))
    }

    /// Make an `fs` filesystem on the stage's `device` unless it holds one
    /// (true when it made one). Only on a volume that reads as zeros
    /// (`zeros`), or over what a stage's mkfs that did not finish left (on
    /// this node or another: its mark is on the volume's store): a volume
    /// holding data without a filesystem blkid knows is refused, never
    /// formatted.
    async fn filesystem_on(
        &self,
        req: &pb::NodeStageVolumeRequest,
        device: &str,
        fs: &str,
        readonly: bool,
        zeros: bool,
    ) -> Result<bool, Status> {
        if has_filesystem(device, fs).await? {
            // One a stage's mkfs made, before a plugin kill kept that stage
            // from removing its mark. (A reader leaves the mark alone: a
            // writer's mkfs may be under way elsewhere.)
            if !readonly {
                self.formatted(req).await;
            }
            return Ok(false);
        }
        if readonly {
            return Err(Status::failed_precondition("a read-only volume without a filesystem cannot be mounted"));
        }
        let (store, mark) = self.mkfs_mark(req).await?;
        if !zeros && store.head(&mark).await.map_err(|e| store_status(&e))?.is_none() {
            return Err(Status::failed_precondition(format!(
                "no {fs} filesystem was found on {device}, but the volume holds data: it is not formatted, which \
                 would overwrite that data (stage it as a block volume to see what it holds)"
            )));
        }
        let body =
            serde_json::json!({ "node": self.cfg.node_id, "started_unix": crate::clock::SystemClock.now_unix() });
        store
            .put(&mark, bytes::Bytes::from(body.to_string()), crate::store::PutMode::Overwrite)
            .await
            .map_err(|e| store_status(&e))?;
        let opts = req.volume_context.get("mkfsOptions").cloned().unwrap_or_default();
        mount::mkfs(device, fs, &opts).await.map_err(internal)?;
        Ok(true)
    }

    /// The mark a stage keeps on the volume's store while it makes the
    /// volume's filesystem: its store, and the key.
    async fn mkfs_mark(&self, req: &pb::NodeStageVolumeRequest) -> Result<(DynStore, String), Status> {
        let loc = parse_volume_id(&req.volume_id)?;
        let store = self.stores.get(&loc, &req.secrets).await?;
        Ok((store, format!("{}{}", loc.prefix, catalog::FORMATTING)))
    }

    /// The volume has its filesystem: the mark of a stage making it goes,
    /// if there is one (left, it would let a later stage format the volume
    /// should blkid see no filesystem on it).
    async fn formatted(&self, req: &pb::NodeStageVolumeRequest) {
        let gone = match self.mkfs_mark(req).await {
            Ok((store, mark)) => match store.head(&mark).await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => store.delete(&mark).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.message().to_string()),
        };
        if let Err(e) = gone {
            tracing::warn!(volume = %req.volume_id, error = %e, "removing the volume's mkfs mark failed");
        }
    }

    /// Put back a record as it was (`bytes`), atomically.
    fn put_back_record(&self, volume_id: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.record_path(volume_id);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    }

    fn save(&self, r: &StageRecord) -> Result<(), Status> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.record_path(&r.volume_id);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(r).map_err(|e| Status::internal(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| Status::internal(format!("state record {}: {e}", path.display())))
    }

    /// Exists while the volume may hold acknowledged, uncommitted writes
    /// (see `crate::nbd::unflushed`). Beside the stage record.
    fn marker_path(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{}.unflushed", key_of(volume_id)))
    }

    fn secrets_path(&self, volume_id: &str) -> PathBuf {
        self.cfg.secrets_dir.join(format!("{}.json", key_of(volume_id)))
    }

    /// Keep a stage's secrets for a restart, in `--secrets-dir` (tmpfs).
    /// Errors name the file, never its content.
    fn save_secrets(&self, volume_id: &str, secrets: &Secrets) -> Result<(), Status> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = &self.cfg.secrets_dir;
        let path = self.secrets_path(volume_id);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(secrets).map_err(|_| Status::internal("stage secrets cannot be encoded"))?;
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&body)?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| Status::internal(format!("secrets file {}: {e}", path.display())))
    }

    fn load_secrets(&self, volume_id: &str) -> Option<Secrets> {
        let body = std::fs::read(self.secrets_path(volume_id)).ok()?;
        serde_json::from_slice(&body).ok()
    }

    fn remove_secrets(&self, volume_id: &str) {
        let _ = std::fs::remove_file(self.secrets_path(volume_id));
    }

    /// Remove what a stage kept on the node: its socket, secrets, record
    /// (the file `record`) and, last, its unflushed-writes marker (until
    /// the record is gone, a restart must still see a loss).
    fn forget_stage(&self, volume_id: &str, socket: Option<&Path>, record: &Path) {
        if let Some(s) = socket {
            let _ = std::fs::remove_file(s);
        }
        self.remove_secrets(volume_id);
        let _ = std::fs::remove_file(record);
        let _ = std::fs::remove_file(self.marker_path(volume_id));
    }

    /// Every stage record in the state directory.
    fn records(&self) -> Vec<(PathBuf, Option<StageRecord>)> {
        let Ok(dir) = std::fs::read_dir(&self.cfg.state_dir) else { return Vec::new() };
        dir.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
            .map(|p| {
                let r = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice::<StageRecord>(&b).ok());
                (p, r)
            })
            .collect()
    }

    /// Devices recorded as attached to any volume: served by this process
    /// or only on disk (a record recovery did not serve). Never handed to
    /// another volume, never detached for another one.
    async fn recorded_devices(&self, except: Option<&str>) -> Vec<String> {
        let mut taken: Vec<String> = self
            .staged
            .lock()
            .await
            .values()
            .filter(|s| Some(s.record.volume_id.as_str()) != except)
            .map(|s| s.record.device.clone())
            .collect();
        for (_, r) in self.records() {
            if let Some(r) = r.filter(|r| Some(r.volume_id.as_str()) != except) {
                taken.push(r.device);
            }
        }
        taken.sort();
        taken.dedup();
        taken
    }

    /// The dirty data and cache every volume served here shares.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.cfg.budget
    }

    /// Open a volume as staging does: inside the node's shared budget,
    /// with `cache_limit` as its own cache cap there.
    pub async fn open_volume(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
        readonly: bool,
        cache_limit: u64,
    ) -> Result<Volume, Status> {
        self.open_volume_checked(volume_id, secrets, readonly, cache_limit, false).await
    }

    /// [`NodeService::open_volume`]; `encrypted`: the volume was
    /// provisioned encrypted, and one whose `volume.json` says otherwise
    /// (replaced in the store) is refused, never written in the clear.
    pub async fn open_volume_checked(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
        readonly: bool,
        cache_limit: u64,
        encrypted: bool,
    ) -> Result<Volume, Status> {
        let loc = parse_volume_id(volume_id)?;
        let store = self.stores.get(&loc, secrets).await?;
        // An encrypted volume opens with the stage secret's key (kept with
        // the other stage secrets for a restart) and only with it.
        let store = super::common::unlocked(&store, &loc, super::common::kek_of(secrets)?.as_ref()).await?;
        if encrypted {
            let meta = crate::volume::replay::read_meta(store.as_ref(), &loc.prefix).await.map_err(status)?;
            if meta.encryption.is_none() {
                return Err(Status::failed_precondition(format!(
                    "{volume_id} was provisioned encrypted, but its volume.json says it is not (it was replaced in \
                     the store): not served, so that nothing is written to it in the clear"
                )));
            }
        }
        let opts = OpenOptions {
            read_only: readonly,
            cache_limit,
            budget: Some(self.cfg.budget.clone()),
            // Beside the stage records: a restarted plugin serves the
            // volume again with every write it had acknowledged.
            log_dir: (!readonly).then(|| self.cfg.state_dir.join("write-log")),
            log_limit: self.cfg.write_log_limit,
            patch_limit: self.cfg.patch_limit,
            ..OpenOptions::default()
        };
        Volume::open(store, &loc.prefix, opts).await.map_err(status)
    }

    /// Open the volume and serve it on its socket.
    async fn serve(&self, spec: &ServeSpec<'_>) -> Result<Server, Status> {
        let volume = self
            .open_volume_checked(spec.volume_id, spec.secrets, spec.readonly, spec.cache_limit, spec.encrypted)
            .await?;
        let bound = server::bind(&Listen::Unix(spec.socket.to_path_buf()), None)
            .await
            .map_err(|e| Status::internal(format!("socket {}: {e}", spec.socket.display())))?;
        let unflushed = (!spec.readonly).then(|| Arc::new(UnflushedMarker::new(self.marker_path(spec.volume_id))));
        let export = Arc::new(Export {
            name: spec.export.to_string(),
            description: spec.volume_id.to_string(),
            volume: volume.clone(),
            read_only: spec.readonly,
            busy_poll: self.cfg.busy_poll,
            limits: self.nbd_limits.clone(),
            unflushed,
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(server::serve(bound, export, rx));
        let flatten = (spec.flatten && !spec.readonly && volume.meta().parent.is_some()).then(|| {
            let (volume, id) = (volume.clone(), spec.volume_id.to_string());
            AbortOnDrop(tokio::spawn(flatten_served(volume, id)).abort_handle())
        });
        Ok(Server { volume, shutdown, task, flatten })
    }

    /// Serve again every volume staged before a restart, each in a task of
    /// its own; returns at once (the CSI socket does not wait for it). A
    /// volume being recovered refuses other operations (ABORTED, kubelet
    /// retries).
    pub fn recover(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        // Logs of earlier boots are never replayed; a volume that never
        // comes back to this node would keep its log for ever.
        let logs = self.cfg.state_dir.join("write-log");
        match crate::volume::engine::log::sweep_other_boots(&logs) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, dir = %logs.display(), "removed write-back logs of earlier boots"),
            Err(e) => {
                tracing::warn!(dir = %logs.display(), error = %e, "removing write-back logs of earlier boots failed")
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        let attached = Arc::new(OnceCell::new());
        let boot = crate::volume::engine::log::boot_id().ok().flatten();
        for (path, record) in self.records() {
            let Some(record) = record else {
                tracing::warn!(path = %path.display(), "unreadable stage record skipped");
                continue;
            };
            if staged_in_an_earlier_boot(&record, boot.as_deref()) {
                // The device and the mount went with that boot, and the
                // device's number may be another tool's now: nothing is
                // done to it. The next NodeStage stages the volume afresh;
                // what was not flushed went with the node's crash, as the
                // kernel's own unwritten pages did.
                tracing::info!(
                    volume = %record.volume_id, device = %record.device,
                    "staged before this node rebooted: its stage record is dropped, its device left alone"
                );
                self.forget_stage(&record.volume_id, Some(&record.socket), &path);
                continue;
            }
            let guard = match self.inflight.start(&record.volume_id) {
                Ok(g) => g,
                Err(_) => continue,
            };
            // Held like a call's, so a plugin told to stop waits for the
            // recovery (it attaches devices) before it stops the volumes.
            let running = match self.calls.try_enter() {
                Some(r) => r,
                None => {
                    tracing::info!(volume = %record.volume_id, "the node plugin is stopping: not recovered");
                    continue;
                }
            };
            let me = self.clone();
            let attached = attached.clone();
            tasks.spawn(async move {
                let attached = me.kube_attached(&attached).await;
                me.recover_one(record, attached).await;
                drop(guard);
                drop(running);
            });
        }
        tokio::spawn(async move {
            while tasks.join_next().await.is_some() {}
            tracing::info!("recovery of staged volumes finished");
        })
    }

    /// Does the volume's attachment record (ControllerPublish) still name
    /// this node? Store errors are retried for a while; `Err` when the
    /// store cannot tell.
    async fn published_here(&self, volume_id: &str, secrets: &HashMap<String, String>) -> Result<bool, String> {
        let loc = parse_volume_id(volume_id).map_err(|e| e.message().to_string())?;
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            let store = match self.stores.get(&loc, secrets).await {
                Ok(s) => s,
                Err(e) => {
                    last = e.message().to_string();
                    continue;
                }
            };
            match catalog::attachments(&store, &loc.prefix).await {
                Ok(list) => return Ok(list.iter().any(|a| a.node_id == self.cfg.node_id)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Serve one staged volume again, unless its writes were lost, its
    /// secrets are gone, or it is no longer attached here: by Kubernetes
    /// (`attached`, when known) or by its store's attachment record.
    async fn recover_one(&self, mut record: StageRecord, attached: Option<&HashSet<String>>) {
        let id = record.volume_id.clone();
        // Writes acknowledged and not committed when the previous process
        // died: safe only if its write-back log is taken over below.
        let marked = UnflushedMarker::found(&self.marker_path(&id));
        if !record.legacy_secrets.0.is_empty() {
            // An earlier version wrote the secrets into the record: move
            // them to the secrets directory and rewrite the record.
            let legacy = std::mem::take(&mut record.legacy_secrets);
            record.has_secrets = true;
            if let Err(e) = self.save_secrets(&id, &legacy).and_then(|()| self.save(&record)) {
                tracing::error!(volume = %id, error = %e.message(), "moving secrets out of the stage record failed");
            }
        }
        let secrets = if record.has_secrets {
            match self.load_secrets(&id) {
                Some(s) => s,
                None => {
                    tracing::error!(
                        volume = %id, device = %record.device, secrets_dir = %self.cfg.secrets_dir.display(),
                        "cannot serve the staged volume again: its stage secrets were kept only in memory and in the \
                         secrets directory (tmpfs), which no longer holds them (a reboot, or a directory not kept \
                         across plugin restarts); its I/O fails until kubelet unstages and stages it again"
                    );
                    return self.lost_if(marked, record).await;
                }
            }
        } else {
            Secrets::default()
        };
        if let Some(set) = attached
            && !set.contains(&id)
        {
            tracing::warn!(
                volume = %id, node = %self.cfg.node_id, device = %record.device,
                "not serving the staged volume again: no VolumeAttachment attaches it to this node any more (it was \
                 detached or moved while the plugin was down); its stage record stays for NodeUnstage"
            );
            return self.lost_if(marked, record).await;
        }
        match self.published_here(&id, &secrets.0).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    volume = %id, node = %self.cfg.node_id, device = %record.device,
                    "not serving the staged volume again: its attachment record no longer names this node (it was \
                     unpublished or moved to another node); opening it here would fence its writer"
                );
                return self.lost_if(marked, record).await;
            }
            Err(e) => {
                tracing::error!(
                    volume = %id, error = %e,
                    "not serving the staged volume again: cannot read its attachment records to check it is still \
                     published to this node"
                );
                return self.lost_if(marked, record).await;
            }
        }
        match self.serve(&ServeSpec::of(&record, &secrets.0)).await {
            Ok(server) if marked && !server.volume.log_recovery().is_some_and(|r| r.adopted) => {
                // No write-back log of the previous process to take over
                // (removed, or another writer opened the volume since):
                // what it acknowledged is gone.
                if let Err(e) = self.stop(&id, server).await {
                    tracing::warn!(volume = %id, error = %e.message(), "stopping the volume that lost writes");
                }
                // The stopped server's clean final flush removed the
                // marker: put it back, or a later restart would serve the
                // volume as if nothing had been lost.
                if let Err(e) = std::fs::write(self.marker_path(&id), b"") {
                    tracing::error!(volume = %id, error = %e, "restoring the unflushed-writes marker failed");
                }
                self.writes_lost(record).await;
            }
            Ok(server) => {
                if let Some(r) = server.volume.log_recovery().filter(|r| r.adopted && r.entries > 0) {
                    tracing::info!(
                        volume = %id, entries = r.entries, bytes = r.bytes,
                        "writes the previous plugin process acknowledged and had not committed were replayed from its write-back log"
                    );
                }
                tracing::info!(volume = %id, device = %record.device, "serving staged volume again");
                // A device busy for a moment (udev probing it after the
                // restart) is tried again, a few times.
                let mut unconnected = None;
                for attempt in 0..RECONNECT_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(std::time::Duration::from_secs(1 << (attempt - 1))).await;
                    }
                    match self.connect_again(&record).await {
                        Ok(reconfigured) => {
                            tracing::info!(volume = %id, "device reconnected");
                            unconnected = None;
                            if record.boot.is_none() && reconfigured {
                                // Staged by an earlier version: the kernel
                                // took a new socket for the device's own
                                // connection, so it is this boot's.
                                record.boot = crate::volume::engine::log::boot_id().ok().flatten();
                                if let Err(e) = self.save(&record) {
                                    tracing::warn!(volume = %id, error = %e.message(), "stamping the stage record with this boot failed");
                                }
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(volume = %id, device = %record.device, attempt, error = %e, "reconnect failed");
                            unconnected = Some(e);
                        }
                    }
                }
                if let Some(e) = &unconnected {
                    tracing::error!(
                        volume = %id, device = %record.device, error = %e,
                        "the device could not be connected again: its I/O fails, and the volume is reported abnormal, \
                         until a NodeStage connects it"
                    );
                }
                self.staged.lock().await.insert(id, Staged { record, serving: Serving::Up(server), unconnected });
            }
            Err(e) => {
                tracing::error!(volume = %id, error = %e.message(), "cannot serve staged volume");
                // A write-back log that cannot be replayed (damaged) or a
                // store that does not answer: what the previous process
                // acknowledged cannot be served; the filesystem is told.
                self.lost_if(marked, record).await;
            }
        }
    }

    /// Connect a staged volume's recorded device to its server again. A
    /// netlink-attached device: the kernel has been holding its I/O since
    /// the old connection died; hand it a fresh socket. A device without a
    /// size lost its connection (ioctl-attached, or the dead-connection
    /// timeout passed): connect it again.
    /// True when the device's own connection took the new socket.
    async fn connect_again(&self, record: &StageRecord) -> Result<bool, String> {
        let r = if devices::device_size(&record.device) > 0 {
            self.attacher.reconnect(&record.socket, &record.export, &record.device).await.map(|()| true)
        } else {
            self.attacher.attach_device(&record.socket, &record.export, &record.device).await.map(|_| false)
        };
        r.map_err(|e| e.to_string())
    }

    /// Not served again: when the previous process left writes it had
    /// not committed, they are lost (see [`Self::writes_lost`]).
    async fn lost_if(&self, marked: bool, record: StageRecord) {
        if marked {
            self.writes_lost(record).await;
        }
    }

    /// The previous plugin process exited (killed, out of memory) while the
    /// volume held writes it had acknowledged and not committed: they are
    /// gone. Reconnecting the device would let the filesystem go on as if
    /// they had been stored; disconnect it instead, so the I/O the kernel
    /// holds and every later request fail and the filesystem sees the loss.
    /// The volume stays staged (and reported) until NodeUnstage.
    async fn writes_lost(&self, record: StageRecord) {
        let id = record.volume_id.clone();
        tracing::error!(
            volume = %id, device = %record.device,
            "the previous plugin process exited without committing writes it had acknowledged: they are lost. \
             Disconnecting the device so that the filesystem sees I/O errors instead of silently missing data; \
             restart the pods using the volume (NodeUnstage, then NodeStage mounts the data as of its last flush)"
        );
        if devices::device_size(&record.device) > 0 {
            match self.attacher.disconnect(&record.device).await {
                Ok(()) => tracing::info!(volume = %id, device = %record.device, "device disconnected"),
                Err(e) => tracing::error!(volume = %id, device = %record.device, error = %e, "disconnect failed"),
            }
        }
        self.staged.lock().await.insert(id, Staged { record, serving: Serving::LostWrites, unconnected: None });
    }

    /// Serve a volume on a unix socket as NodeStage does, without attaching
    /// it to a device (what the volumes of a node share is tested with it
    /// where no kernel is at hand); `stop_serving` ends it.
    /// `flatten`: as the volume context's `flatten` says.
    pub async fn serve_unattached(
        &self,
        volume_id: &str,
        socket: &Path,
        export: &str,
        flatten: bool,
    ) -> Result<Served, Status> {
        let secrets = HashMap::new();
        let spec = ServeSpec {
            volume_id,
            socket,
            export,
            readonly: false,
            cache_limit: self.cfg.cache_limit,
            secrets: &secrets,
            encrypted: false,
            flatten,
        };
        Ok(Served { volume_id: volume_id.to_string(), server: self.serve(&spec).await? })
    }

    /// Flush a volume `serve_unattached` serves and close its socket.
    pub async fn stop_serving(&self, s: Served) -> Result<(), Status> {
        self.stop(&s.volume_id, s.server).await
    }

    /// Stop serving: flush everything, then close the socket.
    async fn stop(&self, volume_id: &str, s: Server) -> Result<(), Status> {
        // A flatten stops first (what it copied and did not commit reads
        // the same through the parent; the final flush commits it).
        drop(s.flatten);
        let _ = s.shutdown.send(true);
        match s.task.await {
            Ok(Ok(())) => Ok(()),
            // Taken over by another writer: nothing held here can be
            // committed any more (NodeUnstage already said so).
            Ok(Err(e)) if s.volume.fenced().is_some() => {
                tracing::warn!(volume = %volume_id, error = %e, "final flush of a volume another writer took over: its uncommitted writes are discarded");
                Ok(())
            }
            Ok(Err(e)) => Err(Status::internal(format!("final flush of {volume_id} failed: {e}"))),
            Err(e) => Err(Status::internal(format!("server task: {e}"))),
        }
    }

    /// Flush and stop every served volume (plugin shutdown). Devices
    /// attached through netlink stay attached: the kernel holds their I/O
    /// (dead-connection timeout) until the restarted plugin reconnects them.
    /// Devices attached through ioctls go away with this process.
    pub async fn shutdown(&self) {
        // Calls their callers gave up on may still run (a stage's mkfs):
        // what they leave must be in `staged` to be stopped below.
        if !self.calls.close(CALLS_GRACE).await {
            tracing::warn!(grace = ?CALLS_GRACE, "node calls still running; stopping the volumes anyway");
        }
        let lost = self.attacher.ioctl_devices();
        if !lost.is_empty() {
            tracing::warn!(
                devices = ?lost,
                "these devices were attached through the NBD ioctl interface: their I/O fails from now on, until \
                 their volumes are staged again"
            );
        }
        let all: Vec<Staged> = self.staged.lock().await.drain().map(|(_, s)| s).collect();
        // All at once: the grace period is shared by every staged volume.
        let stops = all.into_iter().filter_map(|s| {
            // A volume that lost writes keeps its marker: the next process
            // reports it too, until NodeUnstage.
            let Serving::Up(server) = s.serving else { return None };
            let id = s.record.volume_id;
            Some(async move {
                if let Err(e) = self.stop(&id, server).await {
                    tracing::error!(volume = %id, error = %e, "stop failed");
                }
            })
        });
        futures::future::join_all(stops).await;
    }
}

impl NodeService {
    async fn stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> RpcResult<pb::NodeStageVolumeResponse> {
        let req = request.into_inner();
        parse_volume_id(&req.volume_id)?;
        let staging = required_path(&req.staging_target_path, "staging target path")?;
        let cap =
            req.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        check_capability(cap).map_err(Status::invalid_argument)?;
        let _guard = self.inflight.start(&req.volume_id)?;
        let already = self.staged.lock().await.get(&req.volume_id).map(|s| {
            let zeros = s.volume().is_ok_and(|v| v.reads_as_zeros());
            (s.record.clone(), matches!(s.serving, Serving::LostWrites), s.unconnected.is_some(), zeros)
        });
        if let Some((r, lost, unconnected, zeros)) = already {
            if lost {
                return Err(Status::failed_precondition(LOST_WRITES));
            }
            if r.staging_path != staging {
                return Err(Status::failed_precondition(format!(
                    "volume is already staged at {}",
                    r.staging_path.display()
                )));
            }
            if unconnected {
                // Recovery could not connect the device again: this stage
                // tries, and fails (kubelet retries) until it can.
                self.connect_again(&r).await.map_err(|e| {
                    Status::unavailable(format!("the device {} could not be connected again: {e}", r.device))
                })?;
                if let Some(s) = self.staged.lock().await.get_mut(&req.volume_id) {
                    s.unconnected = None;
                }
                tracing::info!(volume = %req.volume_id, device = %r.device, "device connected again by NodeStage");
            }
            // Kubelet stages again after a restart of either side: the
            // staging path must really hold this volume's filesystem.
            if let Some(fs) = &r.fs_type {
                match staged_mount(&r) {
                    // Mounted: a mark its mkfs left (the plugin killed
                    // between the mount and the mark's removal) goes.
                    StagedMount::Ok if !r.readonly => self.formatted(&req).await,
                    StagedMount::Ok => {}
                    StagedMount::Missing => {
                        // A stage whose plugin died after it recorded the
                        // device may not have made the filesystem yet (or
                        // its mkfs, which outlived it, may still run: it
                        // holds the device exclusively, so this mkfs or
                        // mount fails until it is done, and kubelet retries).
                        let made = self.filesystem_on(&req, &r.device, fs, r.readonly, zeros).await?;
                        std::fs::create_dir_all(&staging)
                            .map_err(|e| Status::internal(format!("{}: {e}", staging.display())))?;
                        mount_staged(&req.volume_id, &r.device, &staging, fs, r.readonly, Vec::new()).await?;
                        if made {
                            self.formatted(&req).await;
                        }
                        tracing::info!(volume = %req.volume_id, device = %r.device, "staging path mounted again");
                    }
                    StagedMount::Wrong(why) => return Err(Status::failed_precondition(why)),
                }
            }
            return Ok(Response::new(pb::NodeStageVolumeResponse {}));
        }
        if staging.exists() && !staging.is_dir() {
            return Err(Status::failed_precondition(format!("{} is not a directory", staging.display())));
        }
        use pb::volume_capability::{AccessType, access_mode::Mode};
        let mode = cap.access_mode.as_ref().map(|m| m.mode()).unwrap_or(Mode::Unknown);
        let readonly = req.publish_context.get("readonly").is_some_and(|v| v == "true")
            || matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly);
        let fs_type = match &cap.access_type {
            Some(AccessType::Mount(m)) => Some(
                Some(m.fs_type.clone())
                    .filter(|f| !f.is_empty())
                    .or_else(|| req.volume_context.get("fsType").cloned())
                    .unwrap_or_else(|| "ext4".to_string()),
            ),
            _ => None,
        };
        let cache_limit = match req.volume_context.get("cacheSize") {
            Some(v) => parse_size(v).map_err(Status::invalid_argument)?,
            None => self.cfg.cache_limit,
        };
        let encrypted = req.volume_context.get(ENCRYPTED).is_some_and(|v| v == "true");
        let flatten = req.volume_context.get(super::common::FLATTEN).is_some_and(|v| v == "true");
        let key = key_of(&req.volume_id);
        let socket = self.cfg.state_dir.join(format!("{key}.sock"));
        // A marker left without a stage record (an unstage interrupted at
        // its end) says nothing about this stage. (A write-back log left
        // here by a plugin of this boot that died is still taken over when
        // no other writer opened the volume since: its writes were
        // acknowledged.)
        let _ = std::fs::remove_file(self.marker_path(&req.volume_id));
        let spec = ServeSpec {
            volume_id: &req.volume_id,
            socket: &socket,
            export: &key,
            readonly,
            cache_limit,
            secrets: &req.secrets,
            encrypted,
            flatten,
        };
        let server = self.serve(&spec).await?;
        let taken = self.recorded_devices(None).await;
        let device = match self.attacher.attach(&socket, &key, &taken).await {
            Ok(a) => a.device,
            Err(e) => {
                let _ = self.stop(&req.volume_id, server).await;
                return Err(attach_err(e));
            }
        };
        let record = StageRecord {
            volume_id: req.volume_id.clone(),
            staging_path: staging.clone(),
            device: device.clone(),
            socket,
            export: key,
            fs_type: fs_type.clone(),
            readonly,
            cache_limit,
            has_secrets: !req.secrets.is_empty(),
            boot: crate::volume::engine::log::boot_id().ok().flatten(),
            encrypted,
            flatten,
            legacy_secrets: Secrets::default(),
        };
        // Whether this call mounted the staging path (only then does a
        // failure unmount it).
        let mut mounted = false;
        // Recorded (secrets first, which the record's recovery needs) as
        // soon as the device is attached, before the filesystem work that
        // can take long: a plugin killed meanwhile leaves a record, so the
        // restarted one serves the volume on that device again and the
        // retried stage finishes there. Recorded only at the end, such a
        // device stayed attached with nobody knowing it, and the retry
        // attached the volume a second time.
        // A record recovery left without serving the volume (its device
        // may still be attached) is put back if this stage fails.
        let earlier = std::fs::read(self.record_path(&req.volume_id)).ok();
        let recorded = async {
            if record.has_secrets {
                self.save_secrets(&req.volume_id, &Secrets(req.secrets.clone()))?;
            }
            self.save(&record)
        }
        .await;
        let result: Result<(), Status> = async {
            recorded?;
            if let Some(fs) = &fs_type {
                let made = self.filesystem_on(&req, &device, fs, readonly, server.volume.reads_as_zeros()).await?;
                std::fs::create_dir_all(&staging)
                    .map_err(|e| Status::internal(format!("{}: {e}", staging.display())))?;
                let flags = match &cap.access_type {
                    Some(AccessType::Mount(m)) => m.mount_flags.clone(),
                    _ => Vec::new(),
                };
                mount_staged(&req.volume_id, &device, &staging, fs, readonly, flags).await?;
                mounted = true;
                if made {
                    self.formatted(&req).await;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // Leave nothing half-done behind; the record goes last, once
            // the device it names is no longer attached.
            if mounted {
                let _ = mount::umount(&staging).await;
            }
            let detached = self.attacher.detach(&device).await;
            let _ = self.stop(&req.volume_id, server).await;
            match (detached, &earlier) {
                // Still attached: its record stays, for NodeUnstage.
                (Err(d), _) => tracing::warn!(
                    volume = %req.volume_id, device = %device, error = %d,
                    "a failed stage could not detach its device; its record stays"
                ),
                (Ok(_), Some(bytes)) => {
                    // Unless another volume's stage took its device meanwhile
                    // (this stage's record no longer named it): two records
                    // of one device, and a restart would hand it to both.
                    let device = serde_json::from_slice::<StageRecord>(bytes).ok().map(|r| r.device);
                    let taken = self.recorded_devices(Some(&req.volume_id)).await;
                    if device.as_ref().is_some_and(|d| taken.contains(d)) {
                        tracing::warn!(volume = %req.volume_id, device = ?device, "the earlier stage record's device is another volume's now; the record is dropped");
                        self.remove_secrets(&req.volume_id);
                        let _ = std::fs::remove_file(self.record_path(&req.volume_id));
                    } else if let Err(w) = self.put_back_record(&req.volume_id, bytes) {
                        tracing::warn!(volume = %req.volume_id, error = %w, "putting the earlier stage record back failed");
                    }
                }
                (Ok(_), None) => {
                    self.remove_secrets(&req.volume_id);
                    let _ = std::fs::remove_file(self.record_path(&req.volume_id));
                }
            }
            return Err(e);
        }
        tracing::info!(volume = %req.volume_id, device = %device, staging = %staging.display(), "volume staged");
        self.staged
            .lock()
            .await
            .insert(req.volume_id, Staged { record, serving: Serving::Up(server), unconnected: None });
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> RpcResult<pb::NodeUnstageVolumeResponse> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let staging = required_path(&req.staging_target_path, "staging target path")?;
        let _guard = self.inflight.start(&req.volume_id)?;
        let served = self.staged.lock().await.get(&req.volume_id).map(|s| (s.volume().ok().cloned(), s.record.clone()));
        let record: Option<StageRecord> = match &served {
            Some((_, r)) => Some(r.clone()),
            // Not served by this process (recovery did not serve it after
            // a restart): the record still says which device it attached.
            None => std::fs::read(self.record_path(&req.volume_id)).ok().and_then(|b| serde_json::from_slice(&b).ok()),
        };
        // Another path is not this volume's to unmount (it may be another
        // volume's stage), and the device must not be cut while its
        // filesystem is still mounted at the real one.
        if let Some(r) = record.as_ref().filter(|r| r.staging_path != staging) {
            return Err(Status::failed_precondition(format!(
                "volume is staged at {}, not {}; nothing was unmounted or detached",
                r.staging_path.display(),
                staging.display()
            )));
        }
        mount::umount(&staging).await.map_err(internal)?;
        if let Some(r) = &record
            && devices::dev_t(&r.device).is_some_and(|d| mount::device_mounted(&d))
        {
            return Err(Status::failed_precondition(format!(
                "{} is still mounted (a publish not yet undone, or a mount stacked on the staging path): \
                 it stays attached until it is unmounted",
                r.device
            )));
        }
        if let Some((Some(volume), _)) = &served {
            // Commit every acknowledged write before anything is let go:
            // while that fails the volume stays served and attached, and
            // kubelet retries.
            let flushed = if volume.is_read_only() { Ok(()) } else { volume.flush().await };
            match flushed {
                Ok(()) => {}
                // Another writer took the volume over: nothing held here
                // can be committed any more, and keeping it staged would
                // only hold its memory and its device for ever.
                Err(crate::volume::VolumeError::Fenced(why)) => tracing::warn!(
                    volume = %req.volume_id, reason = %why,
                    "unstage: the volume was taken over by another writer; writes this node had not committed are discarded"
                ),
                Err(e) => {
                    tracing::error!(volume = %req.volume_id, error = %e, "unstage: committing the volume failed");
                    return Err(Status::unavailable(format!(
                        "cannot commit the volume's acknowledged writes to the store ({e}); it stays staged and \
                         attached until they are committed"
                    )));
                }
            }
        }
        if let Some(r) = &record {
            // Only a device this volume attached, and only while no other
            // volume's record names it.
            let others = self.recorded_devices(Some(&req.volume_id)).await;
            if others.contains(&r.device) {
                tracing::warn!(
                    volume = %req.volume_id, device = %r.device,
                    "unstage: the recorded device now belongs to another volume: left attached"
                );
            } else {
                self.attacher.detach(&r.device).await.map_err(attach_err)?;
            }
        }
        if let Some(s) = self.staged.lock().await.remove(&req.volume_id)
            && let Serving::Up(server) = s.serving
        {
            self.stop(&req.volume_id, server).await?;
        }
        let socket = record.as_ref().map(|r| r.socket.as_path());
        self.forget_stage(&req.volume_id, socket, &self.record_path(&req.volume_id));
        tracing::info!(volume = %req.volume_id, "volume unstaged");
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> RpcResult<pb::NodePublishVolumeResponse> {
        let req = request.into_inner();
        parse_volume_id(&req.volume_id)?;
        let target = required_path(&req.target_path, "target path")?;
        let staging = required_path(&req.staging_target_path, "staging target path")?;
        let cap =
            req.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        check_capability(cap).map_err(Status::invalid_argument)?;
        // A publish given up on still runs: an unpublish of its target
        // waits for it (ABORTED, kubelet retries) rather than run beside it.
        let _guard = self.inflight.start(&target_key(&target))?;
        let device = {
            let staged = self.staged.lock().await;
            let s = staged
                .get(&req.volume_id)
                .ok_or_else(|| Status::failed_precondition("the volume is not staged on this node"))?;
            s.volume()?;
            if s.record.staging_path != staging {
                return Err(Status::invalid_argument("staging path differs from the one the volume was staged at"));
            }
            if s.record.fs_type.is_some() {
                match staged_mount(&s.record) {
                    StagedMount::Ok => {}
                    StagedMount::Missing => {
                        return Err(Status::failed_precondition(format!(
                            "{} is not mounted: stage the volume again",
                            staging.display()
                        )));
                    }
                    StagedMount::Wrong(why) => return Err(Status::failed_precondition(why)),
                }
            }
            s.record.device.clone()
        };
        if mount::is_mountpoint(&target) {
            return Ok(Response::new(pb::NodePublishVolumeResponse {}));
        }
        let mut opts = vec!["bind".to_string()];
        let block = matches!(cap.access_type, Some(pb::volume_capability::AccessType::Block(_)));
        let source = if block {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Status::internal(e.to_string()))?;
            }
            if !target.exists() {
                std::fs::File::create(&target).map_err(|e| Status::internal(format!("{}: {e}", target.display())))?;
            }
            device
        } else {
            std::fs::create_dir_all(&target).map_err(|e| Status::internal(format!("{}: {e}", target.display())))?;
            staging.display().to_string()
        };
        mount::mount(&source, &target, None, &opts).await.map_err(internal)?;
        if req.readonly {
            opts.extend(["remount".to_string(), "ro".to_string()]);
            if let Err(e) = mount::mount(&source, &target, None, &opts).await {
                let _ = mount::umount(&target).await;
                return Err(internal(e));
            }
        }
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> RpcResult<pb::NodeUnpublishVolumeResponse> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let target = required_path(&req.target_path, "target path")?;
        let _guard = self.inflight.start(&target_key(&target))?;
        mount::umount(&target).await.map_err(internal)?;
        if target.is_dir() {
            let _ = std::fs::remove_dir(&target);
        } else if target.exists() {
            let _ = std::fs::remove_file(&target);
        }
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> RpcResult<pb::NodeGetVolumeStatsResponse> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        // An unknown volume is NOT_FOUND whatever the path says.
        let (volume, record, unconnected) = {
            let staged = self.staged.lock().await;
            let s =
                staged.get(&req.volume_id).ok_or_else(|| Status::not_found("the volume is not staged on this node"))?;
            (s.volume().ok().cloned(), s.record.clone(), s.unconnected.clone())
        };
        let path = required_path(&req.volume_path, "volume path")?;
        if !path.exists() {
            return Err(Status::not_found(format!("{} does not exist", path.display())));
        }
        let Some(volume) = volume else {
            // Its filesystem fails every I/O: no usage to report.
            let condition = pb::VolumeCondition { abnormal: true, message: LOST_WRITES.into() };
            return Ok(Response::new(pb::NodeGetVolumeStatsResponse {
                usage: vec![],
                volume_condition: Some(condition),
            }));
        };
        let condition = match unconnected {
            Some(why) => pb::VolumeCondition {
                abnormal: true,
                message: format!("its device {} is not connected since the plugin restarted: {why}", record.device),
            },
            None => match volume.health(std::time::Duration::from_secs(5)).await {
                Some(why) => pb::VolumeCondition { abnormal: true, message: why },
                None => pb::VolumeCondition { abnormal: false, message: "ok".into() },
            },
        };
        use pb::volume_usage::Unit;
        let usage = if record.fs_type.is_some() && path.is_dir() {
            let (bytes, inodes) = mount::statvfs(&path).map_err(internal)?;
            let u = |v: [u64; 3], unit: Unit| pb::VolumeUsage {
                total: v[0] as i64,
                available: v[1] as i64,
                used: v[2] as i64,
                unit: unit as i32,
            };
            vec![u(bytes, Unit::Bytes), u(inodes, Unit::Inodes)]
        } else {
            vec![pb::VolumeUsage { total: volume.size() as i64, unit: Unit::Bytes as i32, ..Default::default() }]
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) }))
    }

    async fn expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> RpcResult<pb::NodeExpandVolumeResponse> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let _guard = self.inflight.start(&req.volume_id)?;
        // An unknown volume is NOT_FOUND whatever the path says.
        let (volume, record) = {
            let staged = self.staged.lock().await;
            let s =
                staged.get(&req.volume_id).ok_or_else(|| Status::not_found("the volume is not staged on this node"))?;
            (s.volume()?.clone(), s.record.clone())
        };
        let path = required_path(&req.volume_path, "volume path")?;
        if !path.exists() {
            return Err(Status::not_found(format!("{} does not exist", path.display())));
        }
        // The capacity range is optional: without one the node catches up
        // with the size the controller gave the volume.
        let chunk = volume.chunk_size();
        let range = req.capacity_range.unwrap_or_default();
        let required = (range.required_bytes.max(0) as u64).div_ceil(chunk) * chunk;
        let want = required.max(volume.size());
        if range.limit_bytes > 0 && want > range.limit_bytes as u64 {
            return Err(Status::out_of_range(format!(
                "the volume would be {want} bytes (its size, or the required bytes rounded up to its chunk size \
                 {chunk}), more than the limit of {} bytes",
                range.limit_bytes
            )));
        }
        if want > volume.size() {
            // This engine is the volume's writer: it grows and commits the size.
            volume.resize(want).await.map_err(status)?;
        }
        let size = volume.size();
        if devices::device_size(&record.device) < size {
            self.attacher.resize(&record.device, size).await.map_err(attach_err)?;
        }
        if let Some(fs) = &record.fs_type {
            mount::grow_filesystem(&record.device, &record.staging_path, fs).await.map_err(internal)?;
        }
        tracing::info!(volume = %req.volume_id, size, "volume expanded on the node");
        Ok(Response::new(pb::NodeExpandVolumeResponse { capacity_bytes: size as i64 }))
    }

    async fn capabilities(
        &self,
        _r: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> RpcResult<pb::NodeGetCapabilitiesResponse> {
        use pb::node_service_capability::{Rpc, Type, rpc::Type as T};
        let caps = [T::StageUnstageVolume, T::GetVolumeStats, T::ExpandVolume, T::VolumeCondition]
            .into_iter()
            .map(|t| pb::NodeServiceCapability { r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities: caps }))
    }

    async fn info(&self, _r: Request<pb::NodeGetInfoRequest>) -> RpcResult<pb::NodeGetInfoResponse> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: self.cfg.max_volumes,
            accessible_topology: None,
        }))
    }
}

/// The calls that change the node (stage, unstage, publish, unpublish,
/// expand) run in a task of their own, which finishes when the call is
/// cancelled: kubelet gives up on a call after its deadline (a long mkfs,
/// a slow store) and gRPC then drops the handler. Dropped between its
/// steps, a stage would leave a device attached and a volume served that
/// no record names, and the retry would attach and mount the volume a
/// second time. The retry answers ABORTED while the first runs, then finds
/// its result.
#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> RpcResult<pb::NodeStageVolumeResponse> {
        self.owned(|me| async move { me.stage_volume(request).await }).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> RpcResult<pb::NodeUnstageVolumeResponse> {
        self.owned(|me| async move { me.unstage_volume(request).await }).await
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> RpcResult<pb::NodePublishVolumeResponse> {
        self.owned(|me| async move { me.publish_volume(request).await }).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> RpcResult<pb::NodeUnpublishVolumeResponse> {
        self.owned(|me| async move { me.unpublish_volume(request).await }).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> RpcResult<pb::NodeGetVolumeStatsResponse> {
        self.volume_stats(request).await
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> RpcResult<pb::NodeExpandVolumeResponse> {
        self.owned(|me| async move { me.expand_volume(request).await }).await
    }

    async fn node_get_capabilities(
        &self,
        r: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> RpcResult<pb::NodeGetCapabilitiesResponse> {
        self.capabilities(r).await
    }

    async fn node_get_info(&self, r: Request<pb::NodeGetInfoRequest>) -> RpcResult<pb::NodeGetInfoResponse> {
        self.info(r).await
    }
}

/// Wait until this process is the only node plugin using `state_dir`, and
/// hold it so until the returned file is dropped. A second plugin on the
/// node (a pod replaced before the old one exited: a forced delete, a
/// rolling update with a surge, a process stuck in the kernel) would open
/// every volume the first still serves for writing, which fences it: its
/// unflushed writes would be lost and its devices cut. It waits instead.
pub async fn hold_node_lock(state_dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join("node.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    let mut told = false;
    loop {
        if crate::volume::engine::log::flock_nb(&file)? {
            if told {
                tracing::info!(lock = %path.display(), "the other node plugin exited; serving");
            }
            return Ok(file);
        }
        if !told {
            tracing::warn!(lock = %path.display(), "another node plugin is still running with this state directory; waiting for it to exit before serving any volume");
            told = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod node_lock_tests {
    use super::hold_node_lock;

    /// A second holder waits until the first lets go.
    #[tokio::test]
    async fn a_second_node_plugin_waits_for_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = hold_node_lock(dir.path()).await.expect("first");
        let second = tokio::time::timeout(std::time::Duration::from_millis(600), hold_node_lock(dir.path())).await;
        assert!(second.is_err(), "a second plugin went ahead while the first runs");
        let path = dir.path().to_path_buf();
        let waiting = tokio::spawn(async move { hold_node_lock(&path).await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "a second plugin went ahead while the first runs");
        drop(first);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert!(got.is_ok_and(|r| r.is_ok_and(|f| f.is_ok())), "the second did not go on once the first exited");
    }
}
