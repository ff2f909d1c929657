//! Time, injected: production code sleeps on tokio's clock, tests on a
//! manual one that records what was asked for and returns at once.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

#[async_trait]
pub trait Clock: Send + Sync + std::fmt::Debug {
    async fn sleep(&self, d: Duration);
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> i64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
    fn now_unix(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    }
}

/// A clock for tests: `sleep` returns immediately and is recorded.
#[derive(Debug, Default)]
pub struct ManualClock {
    slept: Mutex<Vec<Duration>>,
    now: Mutex<i64>,
}

impl ManualClock {
    pub fn new(now_unix: i64) -> Self {
        Self { slept: Mutex::default(), now: Mutex::new(now_unix) }
    }
    pub fn sleeps(&self) -> Vec<Duration> {
        self.slept.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn advance(&self, secs: i64) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) += secs;
    }
}

#[async_trait]
impl Clock for ManualClock {
    async fn sleep(&self, d: Duration) {
        self.slept.lock().unwrap_or_else(|p| p.into_inner()).push(d);
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) += d.as_secs() as i64;
        tokio::task::yield_now().await;
    }
    fn now_unix(&self) -> i64 {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}
