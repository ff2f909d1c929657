//! A limit on store requests in flight shared by every store that holds
//! the same [`Permits`]: the CSI node plugin gives one to all the stores
//! (buckets, endpoints) of the volumes it serves, so many volumes cannot
//! open hundreds of connections between them, while one busy volume alone
//! may use the whole limit. A permit is held for one attempt of one call
//! (the retry layer takes it for each attempt, before the attempt's
//! timeout starts): a call waiting out its backoff holds none.

use std::sync::Arc;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::{StoreError, StoreResult};

/// Requests in flight at once across a CSI node's stores, by default.
pub const DEFAULT_REQUESTS_IN_FLIGHT: usize = 64;

/// The shared limit.
#[derive(Debug, Clone)]
pub struct Permits(Arc<Semaphore>);

impl Default for Permits {
    fn default() -> Self {
        Self::new(DEFAULT_REQUESTS_IN_FLIGHT)
    }
}

impl Permits {
    pub fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n.max(1))))
    }

    /// Requests that could start now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Take `n` permits until the guard is dropped: no more than the rest
    /// can run meanwhile (a test holds them all to see who waits).
    pub async fn hold(&self, n: u32) -> StoreResult<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().acquire_many_owned(n).await.map_err(|_| closed())
    }

    pub(crate) async fn take(&self) -> StoreResult<SemaphorePermit<'_>> {
        self.0.acquire().await.map_err(|_| closed())
    }
}

fn closed() -> StoreError {
    StoreError::Transient("the store request limit was closed".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{ListPage, ListRequest, ObjectStore, PutMode};
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::ops::Range;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose GETs take a while and that records how many ran at once.
    #[derive(Debug, Default)]
    struct Slow {
        now: AtomicUsize,
        most: AtomicUsize,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl ObjectStore for Slow {
        async fn get(&self, _: &str, _: Option<Range<u64>>) -> StoreResult<Bytes> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(Bytes::new())
        }
        async fn put(&self, _: &str, _: Bytes, _: PutMode) -> StoreResult<()> {
            Ok(())
        }
        async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
            Err(StoreError::Unsupported(key.into()))
        }
        async fn put_if_match(&self, key: &str, _: Bytes, _: &str) -> StoreResult<()> {
            Err(StoreError::Unsupported(key.into()))
        }
        async fn delete(&self, _: &str) -> StoreResult<()> {
            Ok(())
        }
        async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
            MemoryStore::new().list(req).await
        }
        async fn head(&self, _: &str) -> StoreResult<Option<u64>> {
            Ok(None)
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_sharing_permits_never_run_more_requests_than_the_limit_between_them() {
        // Two stores (say, two buckets) over one recorder of requests in flight.
        let slow = Arc::new(Slow::default());
        let permits = Permits::new(6);
        let policy = crate::store::retry::RetryPolicy::default();
        let a = crate::store::layered_within(slow.clone(), policy.clone(), Some(permits.clone()));
        let b = crate::store::layered_within(slow.clone(), policy, Some(permits.clone()));
        let calls = (0..40).map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { s.get("k", None).await })
        });
        for c in futures::future::join_all(calls).await {
            assert!(matches!(c, Ok(Ok(_))), "{c:?}");
        }
        assert_eq!(slow.most.load(Ordering::SeqCst), 6, "requests in flight at once");
        assert_eq!(permits.available(), 6, "a permit was not given back");
        // Cancelled while waiting or running: the permits come back.
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let s = a.clone();
                tokio::spawn(async move { s.get("k", None).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        for c in &calls {
            c.abort();
        }
        futures::future::join_all(calls).await;
        assert_eq!(permits.available(), 6, "a cancelled call kept its permit");
    }

    /// A call that waits for a permit is timed out for its request only:
    /// the wait counted, so calls queued behind slow requests timed out
    /// without sending anything, went to the back of the queue, and in the
    /// end failed.
    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_permit_does_not_count_against_the_attempt_timeout() {
        let slow = Arc::new(Slow::default());
        let policy = crate::store::retry::RetryPolicy {
            max_attempts: 3,
            base_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(1),
            // Longer than one request (20 ms), shorter than two.
            attempt_timeout: std::time::Duration::from_millis(30),
        };
        let store = crate::store::layered_within(slow.clone(), policy, Some(Permits::new(1)));
        let (a, b) = tokio::join!(store.get("a", None), store.get("b", None));
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        assert_eq!(slow.calls.load(Ordering::SeqCst), 2, "a call was timed out while it waited for its permit");
    }
}
