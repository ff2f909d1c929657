//! Shared test harness: a real S3 server (moto) and stores to test against.
//!
//! `tests/run.sh` starts one moto server for the whole run and exports
//! `S3BLK_TEST_S3_ENDPOINT`. Run directly (`cargo nextest run`), each test
//! process starts its own moto from `.venv/bin/moto_server` or PATH, which
//! exits with the test process. Without moto, S3 variants skip loudly —
//! except under `CI=true`, where a missing tool is a failure.
#![allow(dead_code)]

pub mod nbd_client;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use s3blk::store::DynStore;
use s3blk::store::local::LocalStore;
use s3blk::store::retry::{RetryPolicy, RetryStore};
use s3blk::store::s3::{S3Settings, S3Store};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A required external tool: present → true; missing → skip loudly, or fail under CI.
pub fn require_tool(name: &str) -> bool {
    if which(name).is_some() {
        return true;
    }
    if in_ci() {
        panic!("{name} is required but not installed (tests/run.sh installs it)");
    }
    eprintln!("\n*** SKIPPING: {name} is not installed; run ./tests/run.sh to install test tools ***\n");
    false
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn start_moto() -> Option<String> {
    let venv = repo_root().join(".venv/bin/moto_server");
    let bin = std::env::var_os("S3BLK_MOTO_SERVER")
        .map(PathBuf::from)
        .or_else(|| venv.is_file().then_some(venv))
        .or_else(|| which("moto_server"))?;
    let port = free_port();
    // The shell watches this test process and stops moto when it is gone.
    let script = format!(
        "{} -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; while kill -0 {} 2>/dev/null; do sleep 1; done; kill $m",
        bin.display(),
        std::process::id()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if !wait_port(port, Duration::from_secs(30)) {
        panic!("moto_server did not start on port {port}");
    }
    Some(format!("http://127.0.0.1:{port}"))
}

/// The S3 endpoint to test against, or `None` (skipped) when there is none.
pub fn s3_endpoint() -> Option<String> {
    static EP: OnceLock<Option<String>> = OnceLock::new();
    EP.get_or_init(|| {
        if let Ok(ep) = std::env::var("S3BLK_TEST_S3_ENDPOINT") {
            return Some(ep);
        }
        let started = start_moto();
        if started.is_none() {
            if in_ci() {
                panic!("no S3 server: set S3BLK_TEST_S3_ENDPOINT or install moto[server] (tests/run.sh does)");
            }
            eprintln!("\n*** SKIPPING S3 tests: no moto_server found; run ./tests/run.sh ***\n");
        }
        started
    })
    .clone()
}

pub fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 6,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        attempt_timeout: Duration::from_secs(20),
    }
}

pub fn s3_settings(endpoint: &str) -> S3Settings {
    S3Settings {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        credentials: Some(("testing".into(), "testing".into())),
    }
}

/// Environment for child processes talking to the test S3 server.
pub fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

/// A fresh bucket on the test S3 server; the raw store (no retry layer).
pub async fn s3_raw_store(bucket: &str) -> Option<Arc<S3Store>> {
    let ep = s3_endpoint()?;
    let s = S3Store::connect(bucket, s3_settings(&ep)).await.expect("s3 client");
    s.client().create_bucket().bucket(bucket).send().await.expect("create bucket");
    Some(Arc::new(s))
}

pub async fn s3_store() -> Option<DynStore> {
    let raw = s3_raw_store(&unique("bkt")).await?;
    Some(Arc::new(RetryStore::new(raw, fast_policy())))
}

pub fn local_store(dir: &Path) -> DynStore {
    Arc::new(RetryStore::new(Arc::new(LocalStore::new(dir).expect("local store")), fast_policy()))
}

/// How long a test waits for background work (a reconcile pass, a reaper)
/// before calling it missing. Generous: under a loaded CI run one pass of
/// the controller's loop against moto has taken several seconds.
pub const BACKGROUND_DEADLINE: Duration = Duration::from_secs(90);

/// Probe every 100 ms until `done` holds for the probe's value or
/// `BACKGROUND_DEADLINE` passes; returns the last value probed.
pub async fn poll_until<T, F, Fut>(mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + BACKGROUND_DEADLINE;
    loop {
        let v = probe().await;
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn s3blk_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3blk"))
}

/// A gRPC channel over a unix socket (the CSI endpoint).
pub async fn grpc_channel(sock: &Path) -> tonic::transport::Channel {
    // The socket file appears at bind(), a moment before listen(): a
    // connect in between is refused, so the first one is tried again
    // for a while (a loaded machine can stop a thread between the two).
    for _ in 0..100 {
        match tokio::net::UnixStream::connect(sock).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            _ => break,
        }
    }
    let path = sock.to_path_buf();
    tonic::transport::Endpoint::try_from("http://localhost")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the CSI socket")
}

/// A memory store behind the fault-injecting wrapper: `plain()` sees the
/// store as it is, `faulty()` through the faults.
pub struct FaultRig {
    pub mem: Arc<s3blk::store::memory::MemoryStore>,
    pub fault: Arc<s3blk::store::fault::FaultStore>,
}

impl FaultRig {
    pub fn new() -> Self {
        let mem = Arc::new(s3blk::store::memory::MemoryStore::new());
        let fault = Arc::new(s3blk::store::fault::FaultStore::new(mem.clone()));
        Self { mem, fault }
    }
    pub fn plain(&self) -> DynStore {
        self.mem.clone()
    }
    pub fn faulty(&self) -> DynStore {
        self.fault.clone()
    }
    /// Fail the next `times` calls of `op` (any op when `None`) on keys containing `key`.
    pub fn rule(&self, op: Option<s3blk::store::fault::Op>, key: &str, fault: s3blk::store::fault::Fault, times: u64) {
        self.fault.add_rule(s3blk::store::fault::Rule { op, key_contains: Some(key.to_string()), fault, times });
    }
}

/// What a test's store wrapper does around the calls of the store it
/// wraps (`inner`). Every call passes straight through unless the wrapper
/// says otherwise: a wrapper writes only the calls it changes.
#[async_trait::async_trait]
pub trait Around: Send + Sync + std::fmt::Debug + 'static {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<bytes::Bytes> {
        inner.get(key, range).await
    }
    async fn put(
        &self,
        inner: &DynStore,
        key: &str,
        body: bytes::Bytes,
        mode: s3blk::store::PutMode,
    ) -> s3blk::store::StoreResult<()> {
        inner.put(key, body, mode).await
    }
    async fn get_tagged(&self, inner: &DynStore, key: &str) -> s3blk::store::StoreResult<(bytes::Bytes, String)> {
        inner.get_tagged(key).await
    }
    async fn put_if_match(
        &self,
        inner: &DynStore,
        key: &str,
        body: bytes::Bytes,
        tag: &str,
    ) -> s3blk::store::StoreResult<()> {
        inner.put_if_match(key, body, tag).await
    }
    /// A GET and a PUT through this wrapper's own `get` and `put`, so that
    /// a wrapper that watches or cuts those sees a copy's too.
    async fn copy(
        &self,
        inner: &DynStore,
        from: &str,
        to: &str,
        mode: s3blk::store::PutMode,
    ) -> s3blk::store::StoreResult<()> {
        let body = self.get(inner, from, None).await?;
        self.put(inner, to, body, mode).await
    }
    async fn delete(&self, inner: &DynStore, key: &str) -> s3blk::store::StoreResult<()> {
        inner.delete(key).await
    }
    async fn list(
        &self,
        inner: &DynStore,
        req: s3blk::store::ListRequest<'_>,
    ) -> s3blk::store::StoreResult<s3blk::store::ListPage> {
        inner.list(req).await
    }
    async fn head(&self, inner: &DynStore, key: &str) -> s3blk::store::StoreResult<Option<u64>> {
        inner.head(key).await
    }
}

/// `inner` with `around` around its calls; derefs to `around`, so a test
/// reaches its wrapper's state through it.
#[derive(Debug)]
pub struct Wrapped<A> {
    pub inner: DynStore,
    pub around: A,
}

impl<A: Around> Wrapped<A> {
    pub fn new(inner: DynStore, around: A) -> Arc<Self> {
        Arc::new(Self { inner, around })
    }
}

impl<A> std::ops::Deref for Wrapped<A> {
    type Target = A;
    fn deref(&self) -> &A {
        &self.around
    }
}

#[async_trait::async_trait]
impl<A: Around> s3blk::store::ObjectStore for Wrapped<A> {
    async fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> s3blk::store::StoreResult<bytes::Bytes> {
        self.around.get(&self.inner, key, range).await
    }
    async fn put(&self, key: &str, body: bytes::Bytes, mode: s3blk::store::PutMode) -> s3blk::store::StoreResult<()> {
        self.around.put(&self.inner, key, body, mode).await
    }
    async fn get_tagged(&self, key: &str) -> s3blk::store::StoreResult<(bytes::Bytes, String)> {
        self.around.get_tagged(&self.inner, key).await
    }
    async fn put_if_match(&self, key: &str, body: bytes::Bytes, tag: &str) -> s3blk::store::StoreResult<()> {
        self.around.put_if_match(&self.inner, key, body, tag).await
    }
    async fn copy(&self, from: &str, to: &str, mode: s3blk::store::PutMode) -> s3blk::store::StoreResult<()> {
        self.around.copy(&self.inner, from, to, mode).await
    }
    async fn delete(&self, key: &str) -> s3blk::store::StoreResult<()> {
        self.around.delete(&self.inner, key).await
    }
    async fn list(&self, req: s3blk::store::ListRequest<'_>) -> s3blk::store::StoreResult<s3blk::store::ListPage> {
        self.around.list(&self.inner, req).await
    }
    async fn head(&self, key: &str) -> s3blk::store::StoreResult<Option<u64>> {
        self.around.head(&self.inner, key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Run a test body (`async fn(DynStore)` named `$name`) against the local directory store and against S3.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local() {
                let dir = tempfile::tempdir().expect("tempdir");
                super::$name(super::common::local_store(dir.path())).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn s3() {
                let Some(store) = super::common::s3_store().await else { return };
                super::$name(store).await
            }
        }
    };
}
