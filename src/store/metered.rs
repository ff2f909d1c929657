//! Metrics around any store, in two places of the stack built by
//! [`super::layered`]:
//!
//! ```text
//! MeteredStore          each call: retries it took, final failures
//!   RetryStore          backoff, attempt timeouts
//!     MeteredAttempts   each attempt: count, latency by outcome
//!       (FaultStore)    tests only
//!         S3 | local | memory
//! ```
//!
//! Below the retry wrapper each attempt is a real request to the store, so
//! that is where request counts and latency are measured; only above it is
//! a call's final outcome known. The two meet through a task-local counter
//! of the call's attempts: the retry wrapper runs its attempts inline in
//! the caller's task, and knows nothing of metrics. Without a
//! [`MeteredStore`] above it, [`MeteredAttempts`] still counts and times
//! attempts; without [`MeteredAttempts`] below, a call counts as one attempt.

use std::cell::Cell;
use std::future::Future;
use std::ops::Range;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DynStore, ListPage, ListRequest, ObjectStore, PutMode, StoreError, StoreResult};
use crate::metrics::{OpLabels, OpOutcomeLabels, StoreMetrics};

tokio::task_local! {
    /// Attempts made so far by the call a [`MeteredStore`] is running.
    static ATTEMPTS: Cell<u32>;
}

/// The outcome label of one attempt.
fn outcome<T>(r: &StoreResult<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(StoreError::NotFound(_)) => "not_found",
        Err(StoreError::PreconditionFailed(_)) => "exists",
        Err(StoreError::Transient(_)) => "transient",
        Err(StoreError::Permanent(_)) => "permanent",
    }
}

/// Counts and times each attempt; see the module doc.
#[derive(Debug)]
pub struct MeteredAttempts {
    inner: DynStore,
    metrics: StoreMetrics,
}

impl MeteredAttempts {
    pub fn new(inner: DynStore, metrics: StoreMetrics) -> Self {
        Self { inner, metrics }
    }

    async fn run<T>(&self, op: &'static str, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let _ = ATTEMPTS.try_with(|n| n.set(n.get() + 1));
        self.metrics.requests.get_or_create(&OpLabels { op }).inc();
        // An attempt dropped before it answered (the retry wrapper's attempt
        // timeout, a caller that gave up) is timed too, as "abandoned".
        let mut timer = Timer { metrics: &self.metrics, op, started: Instant::now(), outcome: "abandoned" };
        let r = call.await;
        timer.outcome = outcome(&r);
        r
    }
}

struct Timer<'a> {
    metrics: &'a StoreMetrics,
    op: &'static str,
    started: Instant,
    outcome: &'static str,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let labels = OpOutcomeLabels { op: self.op, outcome: self.outcome };
        self.metrics.request_seconds.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl ObjectStore for MeteredAttempts {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        self.run("GET", self.inner.get(key, range)).await
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        self.run("PUT", self.inner.put(key, body, mode)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run("DELETE", self.inner.delete(key)).await
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        self.run("LIST", self.inner.list(req)).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        self.run("HEAD", self.inner.head(key)).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Counts each call's retries and final failures; see the module doc.
#[derive(Debug)]
pub struct MeteredStore {
    inner: DynStore,
    metrics: StoreMetrics,
}

impl MeteredStore {
    pub fn new(inner: DynStore, metrics: StoreMetrics) -> Self {
        Self { inner, metrics }
    }

    async fn run<T>(&self, op: &'static str, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let (attempts, r) = ATTEMPTS
            .scope(Cell::new(0), async {
                let r = call.await;
                (ATTEMPTS.with(Cell::get), r)
            })
            .await;
        let labels = OpLabels { op };
        if attempts > 1 {
            self.metrics.retries.get_or_create(&labels).inc_by(u64::from(attempts - 1));
        }
        // Not found and "already exists" are answers, not failures.
        if matches!(r, Err(StoreError::Transient(_) | StoreError::Permanent(_))) {
            self.metrics.failures.get_or_create(&labels).inc();
        }
        r
    }
}

#[async_trait]
impl ObjectStore for MeteredStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        self.run("GET", self.inner.get(key, range)).await
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        self.run("PUT", self.inner.put(key, body, mode)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run("DELETE", self.inner.delete(key)).await
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        self.run("LIST", self.inner.list(req)).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        self.run("HEAD", self.inner.head(key)).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
