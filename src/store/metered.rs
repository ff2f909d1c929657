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
use tokio::time::Instant;

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
        Err(StoreError::Damaged(_)) => "damaged",
        Err(StoreError::Unsupported(_)) => "unsupported",
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

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        self.run("PUT", self.inner.put_parts(key, parts, mode)).await
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        self.run("GET", self.inner.get_tagged(key)).await
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        self.run("PUT", self.inner.put_if_match(key, body, tag)).await
    }

    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        self.run("COPY", self.inner.copy(from, to, mode)).await
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

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        self.run("PUT", self.inner.put_parts(key, parts, mode)).await
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        self.run("GET", self.inner.get_tagged(key)).await
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        self.run("PUT", self.inner.put_if_match(key, body, tag)).await
    }

    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        self.run("COPY", self.inner.copy(from, to, mode)).await
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::clock::ManualClock;
    use crate::store::fault::{Fault, FaultStore, Op, Rule};
    use crate::store::memory::MemoryStore;
    use crate::store::retry::{RetryPolicy, RetryStore};

    /// The production stack ([`super::super::layered`]) over a fault
    /// injector over memory, with metrics of its own, and its exposition.
    fn stack() -> (DynStore, Arc<FaultStore>, impl Fn() -> String) {
        let metrics = StoreMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let fault = Arc::new(FaultStore::new(Arc::new(MemoryStore::new())));
        let policy = RetryPolicy { max_attempts: 3, attempt_timeout: Duration::from_secs(1), ..RetryPolicy::default() };
        let attempts: DynStore = Arc::new(MeteredAttempts::new(fault.clone(), metrics.clone()));
        let clock = Arc::new(ManualClock::new(0));
        let retried: DynStore = Arc::new(RetryStore::with_clock(attempts, policy, clock, Arc::new(|_| Duration::ZERO)));
        let store: DynStore = Arc::new(MeteredStore::new(retried, metrics));
        let render = move || {
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("encode");
            out
        };
        (store, fault, render)
    }

    fn value(text: &str, series: &str) -> u64 {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
    }

    fn rule(op: Op, fault: Fault, times: u64) -> Rule {
        Rule { op: Some(op), key_contains: None, fault, times }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_every_attempt_and_each_calls_outcome() {
        let (store, fault, render) = stack();
        // Two 500s, then the PUT lands: three attempts, two retries, no failure.
        fault.add_rule(rule(Op::Put, Fault::ServerError, 2));
        store.put("a", Bytes::from_static(b"x"), PutMode::Overwrite).await.expect("put after retries");
        // 503s until the retry budget is spent: three attempts, one failure.
        fault.add_rule(rule(Op::Get, Fault::SlowDown, 5));
        assert!(matches!(store.get("a", None).await, Err(StoreError::Transient(_))));
        fault.clear_rules();
        // Answers that are not failures.
        assert!(matches!(store.get("missing", None).await, Err(StoreError::NotFound(_))));
        let taken = store.put("a", Bytes::from_static(b"y"), PutMode::IfAbsent).await;
        assert!(matches!(taken, Err(StoreError::PreconditionFailed(_))));
        // An attempt that hangs is abandoned at its timeout and timed as such.
        fault.add_rule(rule(Op::Delete, Fault::Hang, 1));
        store.delete("a").await.expect("delete after a hung attempt");

        let text = render();
        let series = |name: &str, labels: &str| value(&text, &format!("{name}{{{labels}}}"));
        let latency = |op: &str, outcome: &str| {
            series("s3blk_store_request_duration_seconds_count", &format!("op=\"{op}\",outcome=\"{outcome}\""))
        };
        assert_eq!(series("s3blk_store_requests_total", "op=\"PUT\""), 4, "{text}");
        assert_eq!(series("s3blk_store_retries_total", "op=\"PUT\""), 2, "{text}");
        assert_eq!(series("s3blk_store_failures_total", "op=\"PUT\""), 0, "{text}");
        assert_eq!((latency("PUT", "transient"), latency("PUT", "ok"), latency("PUT", "exists")), (2, 1, 1));

        assert_eq!(series("s3blk_store_requests_total", "op=\"GET\""), 4, "{text}");
        assert_eq!(series("s3blk_store_retries_total", "op=\"GET\""), 2, "{text}");
        assert_eq!(series("s3blk_store_failures_total", "op=\"GET\""), 1, "{text}");
        assert_eq!((latency("GET", "transient"), latency("GET", "not_found")), (3, 1));

        assert_eq!(series("s3blk_store_requests_total", "op=\"DELETE\""), 2, "{text}");
        assert_eq!(series("s3blk_store_retries_total", "op=\"DELETE\""), 1, "{text}");
        assert_eq!((latency("DELETE", "abandoned"), latency("DELETE", "ok")), (1, 1));
        // The hung attempt took its whole timeout (paused time: exactly).
        let sum = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("s3blk_store_request_duration_seconds_sum{op=\"DELETE\",outcome=\"abandoned\"} ")
            })
            .and_then(|v| v.parse::<f64>().ok());
        assert_eq!(sum, Some(1.0), "{text}");
    }

    #[tokio::test]
    async fn a_permanent_failure_is_one_attempt_and_one_failure() {
        let (store, fault, render) = stack();
        fault.crash_after_puts(0);
        assert!(matches!(store.put("k", Bytes::new(), PutMode::Overwrite).await, Err(StoreError::Permanent(_))));
        let text = render();
        assert_eq!(value(&text, "s3blk_store_requests_total{op=\"PUT\"}"), 1, "{text}");
        assert_eq!(value(&text, "s3blk_store_retries_total{op=\"PUT\"}"), 0, "{text}");
        assert_eq!(value(&text, "s3blk_store_failures_total{op=\"PUT\"}"), 1, "{text}");
    }
}
