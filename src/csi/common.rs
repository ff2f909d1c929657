//! Pieces shared by the CSI services: ids, parameters, capabilities, store
//! connections, per-volume in-flight guards and error mapping.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::pb;
use crate::location::{Location, StoreSpec};
use crate::store::retry::RetryPolicy;
use crate::store::s3::{S3Settings, S3Store};
use crate::store::{DynStore, StoreError};
use crate::volume::VolumeError;
use crate::volume::catalog::CatalogError;
pub use crate::volume::catalog::object_name;

pub type RpcResult<T> = Result<tonic::Response<T>, Status>;

/// The secret key that holds an encrypted volume's key.
pub const ENCRYPTION_KEY: &str = "encryptionKey";
/// The volume context key that says a volume was provisioned encrypted.
pub const ENCRYPTED: &str = "encrypted";
/// The StorageClass parameter (and volume context key) that has clones
/// and restores flattened: "true" or "false" (the default).
pub const FLATTEN: &str = "flatten";

/// The key in a request's secrets, when there is one.
pub fn kek_of(secrets: &HashMap<String, String>) -> Result<Option<crate::crypto::Kek>, Status> {
    match secrets.get(ENCRYPTION_KEY) {
        None => Ok(None),
        Some(v) => crate::crypto::Kek::parse(v.as_bytes())
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("secret key {ENCRYPTION_KEY}: {e}"))),
    }
}

/// The store through which the volume at `loc` reads in the clear
/// (`volume::keys::unlock`): a wrong key is refused; without one, an
/// encrypted volume's store comes back as it is and what needs the key
/// says so (deleting a volume does not).
pub async fn unlocked(store: &DynStore, loc: &Location, kek: Option<&crate::crypto::Kek>) -> Result<DynStore, Status> {
    match crate::volume::keys::unlock(store, &loc.prefix, kek).await {
        Ok(s) => Ok(s),
        Err(VolumeError::NotFound(_)) => Ok(store.clone()),
        Err(VolumeError::Key(_)) if kek.is_none() => Ok(store.clone()),
        Err(e) => Err(status(e)),
    }
}

/// Map an engine error to a gRPC status. Messages carry object names and
/// S3 error codes, never credentials.
pub fn status(e: VolumeError) -> Status {
    match &e {
        VolumeError::NotFound(_) => Status::not_found(e.to_string()),
        VolumeError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        VolumeError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        VolumeError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
        VolumeError::ReadOnly | VolumeError::Fenced(_) | VolumeError::NoConditionalWrites => {
            Status::failed_precondition(e.to_string())
        }
        VolumeError::Corrupt(_) => Status::data_loss(e.to_string()),
        VolumeError::Key(_) => Status::invalid_argument(e.to_string()),
        VolumeError::LocalLog { no_space: true, .. } => Status::resource_exhausted(e.to_string()),
        VolumeError::LocalLog { no_space: false, .. } => Status::internal(e.to_string()),
        VolumeError::Store(se) => store_status(se),
    }
}

/// Map a catalog error to a gRPC status: refusals that protect data are
/// FAILED_PRECONDITION (the CO retries once the condition is gone).
pub fn catalog_status(e: CatalogError) -> Status {
    match e {
        CatalogError::NotAVolume { .. }
        | CatalogError::StoreRoot { .. }
        | CatalogError::HoldsVolume { .. }
        | CatalogError::ForeignObjects { .. }
        | CatalogError::ForeignMarker { .. }
        | CatalogError::Published { .. }
        | CatalogError::HasClones { .. } => Status::failed_precondition(e.to_string()),
        CatalogError::BeingDeleted { .. } => Status::aborted(e.to_string()),
        CatalogError::SnapshotGone { .. } => Status::not_found(e.to_string()),
        CatalogError::Volume(v) => status(v),
        CatalogError::Store(s) => store_status(&s),
    }
}

pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::PreconditionFailed(_) => Status::aborted(e.to_string()),
        StoreError::Transient(_) => Status::unavailable(e.to_string()),
        StoreError::Permanent(m) if m.contains("AccessDenied") || m.contains("403") => {
            Status::permission_denied(e.to_string())
        }
        StoreError::Permanent(_) => Status::internal(e.to_string()),
        StoreError::Damaged(_) => Status::data_loss(e.to_string()),
        StoreError::Unsupported(_) => Status::failed_precondition(e.to_string()),
    }
}

/// A snapshot id: `<volume-url>@<name>`.
pub fn snapshot_id(volume: &Location, name: &str) -> String {
    format!("{}@{name}", volume.url())
}

pub fn parse_volume_id(id: &str) -> Result<Location, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("volume id is required"));
    }
    Location::parse(id, true).map_err(|e| Status::not_found(format!("no such volume: {e}")))
}

pub fn parse_snapshot_id(id: &str) -> Result<(Location, String), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("snapshot id is required"));
    }
    let (vol, name) = id.rsplit_once('@').ok_or_else(|| Status::not_found(format!("no such snapshot {id:?}")))?;
    let loc = Location::parse(vol, true).map_err(|e| Status::not_found(format!("no such snapshot: {e}")))?;
    crate::volume::format::validate_snapshot_name(name).map_err(|e| Status::not_found(e.to_string()))?;
    Ok((loc, name.to_string()))
}

/// Access modes a block device with a single writer can honour.
pub fn check_capability(cap: &pb::VolumeCapability) -> Result<(), String> {
    use pb::volume_capability::AccessType;
    use pb::volume_capability::access_mode::Mode;
    match &cap.access_type {
        None => return Err("volume capability has no access type (block or mount)".into()),
        Some(AccessType::Mount(m)) => {
            if !["", "ext4", "xfs"].contains(&m.fs_type.as_str()) {
                return Err(format!("filesystem {:?} is not supported (ext4, xfs)", m.fs_type));
            }
        }
        Some(AccessType::Block(_)) => {}
    }
    let mode = cap.access_mode.as_ref().map(|m| m.mode()).unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::MultiNodeReaderOnly
        | Mode::SingleNodeSingleWriter => Ok(()),
        Mode::Unknown => Err("volume capability has no access mode".into()),
        other => Err(format!("access mode {other:?} is not supported: an s3blk volume has one writer at a time")),
    }
}

pub fn check_capabilities(caps: &[pb::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume capabilities are required"));
    }
    for c in caps {
        check_capability(c).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

/// Connections to stores, made once per bucket and credentials.
#[derive(Default)]
pub struct Stores {
    cache: Mutex<HashMap<String, DynStore>>,
    policy: RetryPolicy,
    /// Requests in flight at once across every store of this process
    /// (all the volumes a node serves, whatever their bucket).
    permits: crate::store::limit::Permits,
    /// Used for whatever a request's secrets leave out.
    defaults: S3Settings,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

fn secret<'a>(secrets: &'a HashMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| secrets.get(*k)).map(String::as_str).filter(|v| !v.is_empty())
}

impl Stores {
    pub fn new(policy: RetryPolicy) -> Self {
        Self::with_defaults(policy, S3Settings::default())
    }

    /// With explicit S3 settings for requests that carry no secrets.
    pub fn with_defaults(policy: RetryPolicy, defaults: S3Settings) -> Self {
        Self::with_limit(policy, defaults, crate::store::limit::DEFAULT_REQUESTS_IN_FLIGHT)
    }

    /// With at most `requests` S3 requests in flight at once across them all.
    pub fn with_limit(policy: RetryPolicy, defaults: S3Settings, requests: usize) -> Self {
        let permits = crate::store::limit::Permits::new(requests.max(1));
        Self { cache: Mutex::default(), policy, defaults, permits }
    }

    /// The limit of requests in flight its stores share.
    pub fn permits(&self) -> &crate::store::limit::Permits {
        &self.permits
    }

    /// Use `store` for every location in `spec` reached without secrets
    /// (a process embedding the driver, or a test wrapping the store).
    pub fn register(&self, spec: &StoreSpec, store: DynStore) {
        let key = Self::key(spec, &self.settings(&HashMap::new()));
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, store);
    }

    fn settings(&self, secrets: &HashMap<String, String>) -> S3Settings {
        S3Settings {
            endpoint: secret(secrets, &["endpoint", "AWS_ENDPOINT_URL"])
                .map(str::to_string)
                .or_else(|| self.defaults.endpoint.clone()),
            region: secret(secrets, &["region", "AWS_REGION"])
                .map(str::to_string)
                .or_else(|| self.defaults.region.clone()),
            credentials: match (
                secret(secrets, &["accessKeyID", "AWS_ACCESS_KEY_ID"]),
                secret(secrets, &["secretAccessKey", "AWS_SECRET_ACCESS_KEY"]),
            ) {
                (Some(id), Some(key)) => Some((id.to_string(), key.to_string())),
                _ => self.defaults.credentials.clone(),
            },
        }
    }

    fn key(spec: &StoreSpec, settings: &S3Settings) -> String {
        match spec {
            StoreSpec::S3 { bucket } => format!(
                "s3|{bucket}|{:?}|{:?}|{:08x}",
                settings.endpoint,
                settings.region,
                settings.credentials.as_ref().map(|(i, k)| crc32c::crc32c(format!("{i}:{k}").as_bytes())).unwrap_or(0)
            ),
            StoreSpec::Local { root } => format!("file|{}", root.display()),
            StoreSpec::Memory => "memory".to_string(),
        }
    }

    /// The store a location lives in. S3 endpoint, region and credentials
    /// come from the request's secrets when given, else from the
    /// environment (pod AWS settings, IRSA).
    pub async fn get(&self, loc: &Location, secrets: &HashMap<String, String>) -> Result<DynStore, Status> {
        let settings = self.settings(secrets);
        let key = Self::key(&loc.store, &settings);
        if let Some(s) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(s.clone());
        }
        let base: DynStore = match &loc.store {
            StoreSpec::S3 { bucket } => {
                Arc::new(S3Store::connect(bucket, settings).await.map_err(|e| store_status(&e))?)
            }
            StoreSpec::Local { root } => {
                Arc::new(crate::store::local::LocalStore::new(root).map_err(|e| store_status(&e))?)
            }
            StoreSpec::Memory => Arc::new(crate::store::memory::MemoryStore::new()),
        };
        let store = crate::store::layered_within(base, self.policy.clone(), Some(self.permits.clone()));
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, store.clone());
        Ok(store)
    }
}

/// Operations in flight, by key: a second call for the same volume while
/// the first runs gets ABORTED, as the CSI spec asks.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn start(&self, key: &str) -> Result<InFlightGuard, Status> {
        let mut k = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !k.insert(key.to_string()) {
            return Err(Status::aborted(format!("an operation on {key} is already in progress")));
        }
        Ok(InFlightGuard { keys: self.keys.clone(), key: key.to_string() })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let loc = Location::parse("s3://b/p/vol", true).unwrap();
        assert_eq!(parse_volume_id(&loc.url()).unwrap(), loc);
        let (l, n) = parse_snapshot_id(&snapshot_id(&loc, "snap-1")).unwrap();
        assert_eq!((l, n.as_str()), (loc, "snap-1"));
        assert_eq!(parse_volume_id("").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(parse_volume_id("garbage://x").unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(parse_snapshot_id("s3://b/v@bad/name").unwrap_err().code(), tonic::Code::NotFound);
    }
}

/// The calls of a service that run in tasks of their own (they finish when
/// their caller gives up): each holds a guard while it runs, and `close`
/// waits for them, up to a grace period, before the service stops. No call
/// starts once `close` began, also after its wait gave up.
#[derive(Debug, Default)]
pub struct Calls {
    running: Arc<tokio::sync::RwLock<()>>,
    stopping: std::sync::atomic::AtomicBool,
}

/// Held by a running call.
pub type CallGuard = tokio::sync::OwnedRwLockReadGuard<()>;

impl Calls {
    /// A guard for a call about to start (`what` names the service in the
    /// refusal), or UNAVAILABLE when the service is stopping.
    pub async fn enter(&self, what: &str) -> Result<CallGuard, Status> {
        let g = self.running.clone().read_owned().await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable(format!("the {what} is stopping")));
        }
        Ok(g)
    }

    /// Run `call` on the service `me` names in a task of its own, holding
    /// a guard: it finishes (and keeps its guard on the volume till then)
    /// when the caller gives up. `what` names the service in errors.
    pub async fn owned<S, T, F, Fut>(&self, me: &std::sync::Weak<S>, what: &str, call: F) -> RpcResult<T>
    where
        F: FnOnce(Arc<S>) -> Fut,
        Fut: std::future::Future<Output = RpcResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(me) = me.upgrade() else {
            return Err(Status::internal(format!("the {what} service was not started through into_arc")));
        };
        let running = self.enter(what).await?;
        let work = call(me);
        tokio::spawn(async move {
            let _running = running;
            work.await
        })
        .await
        .map_err(|e| Status::internal(format!("the operation stopped before it finished: {e}")))?
    }

    /// `enter` without waiting (for work started outside a call).
    pub fn try_enter(&self) -> Option<CallGuard> {
        let g = self.running.clone().try_read_owned().ok()?;
        (!self.stopping.load(std::sync::atomic::Ordering::SeqCst)).then_some(g)
    }

    /// Refuse new calls and wait up to `grace` for the running ones;
    /// false when some still run.
    pub async fn close(&self, grace: std::time::Duration) -> bool {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(grace, self.running.write()).await.is_ok()
    }
}

/// Longest a service told to stop waits for calls still running (a
/// stage's mkfs, a create's store requests) before it stops anyway; well
/// inside the chart's grace period.
pub const CALLS_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
