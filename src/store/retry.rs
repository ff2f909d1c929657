//! Retries with exponential backoff, full jitter and per-attempt timeouts.
//! Metrics are not kept here: [`super::metered`] wraps this layer on both
//! sides. Attempts run inline in the caller's task (the metered layers rely
//! on it to tie attempts to their call).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DynStore, ListPage, ListRequest, ObjectStore, PutMode, StoreError, StoreResult};
use crate::clock::{Clock, SystemClock};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A single attempt that takes longer is abandoned and counts as transient.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Upper bound of the delay before retry number `retry` (0-based):
    /// `min(max_delay, base * 2^retry)`. The actual delay is drawn uniformly
    /// below it ("full jitter"), which spreads out clients that failed together.
    pub fn delay_cap(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Draws a jittered delay below a cap.
pub type Jitter = Arc<dyn Fn(Duration) -> Duration + Send + Sync>;

pub fn full_jitter() -> Jitter {
    Arc::new(|cap: Duration| {
        let nanos = cap.as_nanos().min(u64::MAX as u128) as u64;
        if nanos == 0 { cap } else { Duration::from_nanos(rand::random_range(0..=nanos)) }
    })
}

#[derive(Clone)]
pub struct RetryStore {
    inner: DynStore,
    policy: RetryPolicy,
    clock: Arc<dyn Clock>,
    jitter: Jitter,
    /// Taken for each attempt, before its timeout starts: a wait for a
    /// shared permit is no fault of the store's.
    permits: Option<super::limit::Permits>,
}

impl std::fmt::Debug for RetryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryStore").field("inner", &self.inner).field("policy", &self.policy).finish()
    }
}

impl RetryStore {
    pub fn new(inner: DynStore, policy: RetryPolicy) -> Self {
        Self::with_clock(inner, policy, Arc::new(SystemClock), full_jitter())
    }

    pub fn with_clock(inner: DynStore, policy: RetryPolicy, clock: Arc<dyn Clock>, jitter: Jitter) -> Self {
        Self { inner, policy, clock, jitter, permits: None }
    }

    /// Each attempt takes one of `permits` (shared with other stores)
    /// while it runs; the attempt timeout counts from when it has one.
    pub fn with_permits(mut self, permits: super::limit::Permits) -> Self {
        self.permits = Some(permits);
        self
    }

    async fn run<T, F, Fut>(&self, what: &str, key: &str, mut op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = StoreResult<T>> + Send,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let permit = match &self.permits {
                Some(p) => Some(p.take().await?),
                None => None,
            };
            let result = match tokio::time::timeout(self.policy.attempt_timeout, op()).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Transient(format!(
                    "{what} {key} timed out after {:?}",
                    self.policy.attempt_timeout
                ))),
            };
            drop(permit);
            match result {
                Err(e) if e.is_retryable() && attempt < self.policy.max_attempts => {
                    let delay = (self.jitter)(self.policy.delay_cap(attempt - 1));
                    tracing::debug!(op = what, key, attempt, ?delay, error = %e, "retrying store call");
                    self.clock.sleep(delay).await;
                }
                Err(StoreError::Transient(msg)) => {
                    return Err(StoreError::Transient(format!("{msg} (gave up after {attempt} attempts)")));
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        self.run("GET", key, || self.inner.get(key, range.clone())).await
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        // A conditional PUT that times out may still have landed; a retry then
        // sees 412. Callers that care (journal commits) resolve that by reading
        // the object back and comparing it with what they wrote.
        self.run("PUT", key, || self.inner.put(key, body.clone(), mode)).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        self.run("PUT", key, || self.inner.put_parts(key, parts.clone(), mode)).await
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        self.run("GET", key, || self.inner.get_tagged(key)).await
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        // As a conditional create: an attempt that timed out may have
        // landed, and the retry then sees 412 (the tag is its own now).
        self.run("PUT", key, || self.inner.put_if_match(key, body.clone(), tag)).await
    }

    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        // As a PUT: a conditional copy whose first attempt landed unanswered
        // sees 412 on the retry (callers take a fresh name then).
        self.run("COPY", to, || self.inner.copy(from, to, mode)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run("DELETE", key, || self.inner.delete(key)).await
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        self.run("LIST", req.prefix, || self.inner.list(req.clone())).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        self.run("HEAD", key, || self.inner.head(key)).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
