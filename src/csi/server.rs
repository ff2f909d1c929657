//! `s3blk csi`: the gRPC server on a unix socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use super::attachments::NodeAttachments;
use super::common::Stores;
use super::controller::{ControllerConfig, ControllerService};
use super::identity::IdentityService;
use super::node::{NodeConfig, NodeService};
use super::pb;
use crate::controller::{self, CompactionMode};
use crate::location::Location;
use crate::volume::budget::MemoryBudget;
use crate::volume::compact;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
}

#[derive(Debug, Clone)]
pub struct CsiConfig {
    pub mode: Mode,
    /// `unix:///path` or `unix:/path`.
    pub endpoint: String,
    pub driver_name: String,
    pub node_id: Option<String>,
    pub default_store: Option<Location>,
    pub capacity: u64,
    /// Advertise GET_CAPACITY (the provisioner tracks capacity).
    pub capacity_tracking: bool,
    /// Node mode: where stage records and per-volume sockets live.
    pub state_dir: PathBuf,
    /// Node mode: where stage secrets are kept for a restart (a tmpfs).
    pub secrets_dir: PathBuf,
    pub max_volumes: i64,
    /// Node mode without a memory limit to size from: the shared budget is
    /// `dirty_limit` of dirty data plus `cache_limit` of cache.
    pub dirty_limit: u64,
    pub cache_limit: u64,
    /// Node mode: dirty data plus cache, shared by every staged volume
    /// (`None`: half of `memory_limit`, else of the cgroup limit).
    pub memory_budget: Option<u64>,
    /// Node mode: the container's memory limit, when given (downward API).
    pub memory_limit: Option<u64>,
    /// NBD busy polling per connection (see `nbd::session::Export`).
    pub busy_poll: std::time::Duration,
    /// Node mode: a staged volume's write-back log past this starts a flush.
    pub write_log_limit: u64,
    /// Writers' page patch limit ([`crate::volume::OpenOptions::patch_limit`]).
    pub patch_limit: u64,
    /// Controller: how often every volume under the default store is
    /// compacted (zero: never), and the compaction safety age.
    pub compact_interval: std::time::Duration,
    pub compact_safety_age: std::time::Duration,
    /// Controller: accept a safety age under `compact::MIN_LIVE_SAFETY_AGE`
    /// (otherwise refused at start-up: the controller compacts beside live
    /// writers). Never set from the command line; for tests that need
    /// compaction to act at once on volumes no second writer takes over.
    pub allow_short_safety_age: bool,
    /// Controller: how compaction runs (see `controller::CompactionMode`).
    pub compaction: CompactionMode,
    /// `HOST:PORT` for Prometheus metrics, if wanted.
    pub metrics_address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("endpoint {0:?}: only unix sockets are supported (unix:///path/csi.sock)")]
    Endpoint(String),
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("node mode needs --node-id")]
    NoNodeId,
    #[error("state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("metrics address {0}: {1}")]
    Metrics(String, std::io::Error),
    #[error("--compaction=kubernetes: no Kubernetes API configuration (in-cluster or KUBECONFIG): {0}")]
    Kubernetes(String),
    #[error("--compact-safety-age: {0}")]
    SafetyAge(#[from] compact::ShortSafetyAge),
    #[error("node memory budget ({from})")]
    Budget { from: String, source: crate::volume::budget::BudgetError },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| CsiError::Endpoint(endpoint.to_string()))?;
    if p.is_empty() {
        return Err(CsiError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(p))
}

/// Bind the socket: remove a stale socket file, create parent directories,
/// and allow only the owner (the CO's sidecars run as root next to us).
pub fn bind(path: &std::path::Path) -> Result<UnixListener, CsiError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| CsiError::Socket { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => return Err(err(std::io::Error::other("exists and is not a socket"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

/// Serve until `shutdown` completes, then finish in-flight calls and remove the socket.
pub async fn run(
    cfg: CsiConfig,
    stores: Arc<Stores>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), CsiError> {
    let path = socket_path(&cfg.endpoint)?;
    let with_controller = cfg.mode != Mode::Node;
    // Before anything starts: the controller's compaction (the pass over
    // --store, or the Kubernetes reconcile loop) runs beside live writers.
    let compacts = !cfg.compact_interval.is_zero() && cfg.compaction != CompactionMode::Off;
    if with_controller && compacts && !cfg.allow_short_safety_age {
        compact::check_live_safety_age(cfg.compact_safety_age)?;
    }
    // Also heeded while waiting for the node lock (a pod told to stop
    // before the one it replaces exited).
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    let mut registration = None;
    let mut node_lock = None;
    let node = if cfg.mode != Mode::Controller {
        let node_id = cfg.node_id.clone().filter(|n| !n.is_empty()).ok_or(CsiError::NoNodeId)?;
        let (budget, nbd_inflight) = node_budget(&cfg)?;
        let ncfg = NodeConfig {
            node_id: node_id.clone(),
            state_dir: cfg.state_dir.clone(),
            secrets_dir: cfg.secrets_dir.clone(),
            max_volumes: cfg.max_volumes,
            cache_limit: budget.cache_limit(),
            budget,
            busy_poll: cfg.busy_poll,
            write_log_limit: cfg.write_log_limit,
            patch_limit: cfg.patch_limit,
            nbd_inflight,
        };
        // Held while this process serves (see hold_node_lock).
        let lock = tokio::select! {
            lock = super::node::hold_node_lock(&cfg.state_dir) => lock,
            () = &mut shutdown => {
                tracing::info!("told to stop while waiting for the other node plugin; nothing was served");
                return Ok(());
            }
        };
        node_lock = Some(lock.map_err(|source| CsiError::StateDir { path: cfg.state_dir.clone(), source })?);
        let n = NodeService::new(ncfg, stores.clone())
            .map_err(|source| CsiError::StateDir { path: cfg.state_dir.clone(), source })?;
        let n = match controller::connect().await {
            Ok(client) => {
                tracing::info!("node recovery consults this node's VolumeAttachments");
                n.with_kubernetes(NodeAttachments::new(client, cfg.driver_name.clone()))
            }
            Err(e) => {
                tracing::info!(reason = %e, "no Kubernetes API configuration: node recovery reads only the stores' attachment records");
                n
            }
        };
        let n = n.into_arc();
        // Register before serving so that ControllerPublish finds the node
        // (bounded: an unreachable store only delays it to the background).
        if let Some(root) = &cfg.default_store {
            let rec = super::registration::record(&node_id, &crate::clock::SystemClock);
            registration = super::registration::register(stores.clone(), root.clone(), rec).await;
        }
        // In the background: the socket comes up at once; a volume being
        // recovered answers ABORTED until it is served again.
        n.recover();
        Some(n)
    } else {
        None
    };
    let listener = bind(&path)?;
    let metrics = match &cfg.metrics_address {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| CsiError::Metrics(addr.clone(), e))?;
            tracing::info!(address = %addr, "metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(l)))
        }
        None => None,
    };
    let identity = IdentityService {
        driver_name: cfg.driver_name.clone(),
        controller: with_controller,
        // A node's readiness does not hang on the store: its volumes keep
        // being served (and fail I/O on their own) while S3 is away.
        probe_store: if with_controller { cfg.default_store.clone() } else { None },
        stores: stores.clone(),
    };
    let ccfg = ControllerConfig {
        default_store: cfg.default_store.clone(),
        capacity: cfg.capacity,
        capacity_tracking: cfg.capacity_tracking,
    };
    let compactor = match with_controller {
        true => start_compaction(&cfg, &ccfg, &stores).await?,
        false => None,
    };
    let controller = with_controller.then(|| ControllerService::new(ccfg, stores).into_arc());
    static REQUEST_ID: AtomicU64 = AtomicU64::new(1);
    tracing::info!(endpoint = %cfg.endpoint, driver = %cfg.driver_name, mode = ?cfg.mode, "CSI driver listening");
    let result = tonic::transport::Server::builder()
        .trace_fn(|req| {
            tracing::info_span!("csi", method = %req.uri().path(), request_id = REQUEST_ID.fetch_add(1, Ordering::Relaxed))
        })
        .layer(tower::util::MapRequestLayer::new(|req: http::Request<tonic::body::Body>| {
            let method = req.uri().path().rsplit('/').next().unwrap_or("unknown").to_string();
            crate::metrics::global().csi_requests.get_or_create(&crate::metrics::MethodLabels { method }).inc();
            req
        }))
        .add_service(pb::identity_server::IdentityServer::new(identity))
        .add_optional_service(controller.clone().map(pb::controller_server::ControllerServer::from_arc))
        .add_optional_service(node.clone().map(pb::node_server::NodeServer::from_arc))
        .serve_with_incoming_shutdown(
            // Any :authority a client sends on the socket is accepted (see `authority`).
            UnixListenerStream::new(listener).map(|c| c.map(super::authority::FixAuthority::new)),
            shutdown,
        )
        .await;
    // Both wait (side by side) for the calls their callers gave up on.
    let stop_controller = async {
        if let Some(c) = &controller {
            c.shutdown().await;
        }
    };
    let stop_node = async {
        if let Some(n) = &node {
            n.shutdown().await;
        }
    };
    tokio::join!(stop_controller, stop_node);
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(c) = compactor {
        c.stop().await;
    }
    if let Some(r) = registration {
        r.abort();
    }
    let _ = std::fs::remove_file(&path);
    // Its volumes stopped: another node plugin may go on.
    drop(node_lock);
    result.map_err(CsiError::from)
}

/// The node's memory budget and its bound on NBD bytes in flight, each
/// shared by every volume it serves.
fn node_budget(cfg: &CsiConfig) -> Result<(Arc<MemoryBudget>, usize), CsiError> {
    let fallback = cfg.dirty_limit.saturating_add(cfg.cache_limit);
    let cgroups = std::path::Path::new("/sys/fs/cgroup");
    let sizing = super::memory::size_budget(cfg.memory_budget, cfg.memory_limit, cgroups, fallback);
    let budget = if sizing.fallback {
        // No limit known: today's figures, shared.
        MemoryBudget::new(cfg.dirty_limit, cfg.cache_limit)
    } else {
        MemoryBudget::split(sizing.total).map_err(|source| CsiError::Budget { from: sizing.source.clone(), source })?
    };
    let limit =
        cfg.memory_limit.filter(|l| *l > 0).or_else(|| super::memory::cgroup_memory_limit(cgroups).ok().flatten());
    let nbd_inflight = super::node::nbd_inflight(limit);
    tracing::info!(
        dirty_bytes = budget.dirty_limit(),
        cache_bytes = budget.cache_limit(),
        nbd_inflight_bytes = nbd_inflight,
        source = %sizing.source,
        "node memory budget and NBD bytes in flight, each shared by every staged volume"
    );
    Ok((budget, nbd_inflight))
}

/// Start compaction in the mode asked for (`auto`: Kubernetes when an API
/// configuration is found, else the pass over `--store`), and log which.
async fn start_compaction(
    cfg: &CsiConfig,
    ccfg: &ControllerConfig,
    stores: &Arc<Stores>,
) -> Result<Option<Compactor>, CsiError> {
    if cfg.compact_interval.is_zero() || cfg.compaction == CompactionMode::Off {
        tracing::info!("compaction mode: off");
        return Ok(None);
    }
    if let Err(e) = compact::check_live_safety_age(cfg.compact_safety_age) {
        // Only with allow_short_safety_age (see `run`).
        tracing::warn!(error = %e, "compacting with a short safety age");
    }
    let opts = compact::CompactOptions { safety_age: cfg.compact_safety_age, ..Default::default() };
    let client = match cfg.compaction {
        CompactionMode::Kubernetes => Some(controller::connect().await.map_err(CsiError::Kubernetes)?),
        CompactionMode::Auto => match controller::connect().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::info!(reason = %e, "no Kubernetes API configuration");
                None
            }
        },
        CompactionMode::Store | CompactionMode::Off => None,
    };
    if let Some(client) = client {
        let settings = controller::KubeSettings {
            driver_name: cfg.driver_name.clone(),
            default_store: cfg.default_store.clone(),
            interval: cfg.compact_interval,
            compact: opts,
            lease: Default::default(),
            identity: controller::default_identity(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(controller::run(client, stores.clone(), settings, stopped));
        return Ok(Some(Compactor { task, stop: Some(stop) }));
    }
    let Some(root) = &cfg.default_store else {
        tracing::info!("compaction mode: off (store mode needs --store)");
        return Ok(None);
    };
    tracing::info!(store = %root.url(), interval_seconds = cfg.compact_interval.as_secs(), "compaction mode: store (every replica compacts every volume under --store)");
    let svc = ControllerService::new(ccfg.clone(), stores.clone());
    Ok(Some(Compactor { task: tokio::spawn(compaction_loop(svc, opts, cfg.compact_interval)), stop: None }))
}

/// The compaction task, and (Kubernetes mode) how to stop it gracefully.
struct Compactor {
    task: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Compactor {
    /// At shutdown: in Kubernetes mode stop the work and hand the Lease to
    /// another replica (bounded wait); a pass over `--store` is aborted.
    async fn stop(mut self) {
        match self.stop.take() {
            Some(stop) => {
                let _ = stop.send(());
                if tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.task).await.is_err() {
                    self.task.abort();
                }
            }
            None => self.task.abort(),
        }
    }
}

/// The compaction reconcile loop: a pass over every volume each interval
/// (the first after a random part of it, so replicas drift apart).
async fn compaction_loop(svc: ControllerService, opts: compact::CompactOptions, interval: std::time::Duration) {
    let mut wait = interval.mul_f64(rand::random::<f64>().max(0.05));
    loop {
        tokio::time::sleep(wait).await;
        wait = interval;
        let started = std::time::Instant::now();
        match svc.compact_all(&opts).await {
            Ok((done, failed)) => {
                tracing::info!(
                    volumes = done,
                    failed,
                    seconds = started.elapsed().as_secs_f64(),
                    "compaction pass done"
                )
            }
            Err(e) => tracing::warn!(error = %e.message(), "compaction pass could not list volumes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn socket_replaces_a_stale_one_is_owner_only_and_never_clobbers_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nested/csi.sock");
        let first = bind(&sock).expect("first bind");
        drop(first); // the socket file stays behind, as after a crash
        assert!(sock.exists());
        let _l = bind(&sock).expect("a stale socket is replaced");
        let mode = std::fs::metadata(&sock).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"keep me").expect("write");
        let e = bind(&file).expect_err("a regular file is not a socket");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    }
}
