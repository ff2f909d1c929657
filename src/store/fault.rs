//! Fault injection around any store: transient errors, throttling, hangs,
//! connection resets and a simulated crash (the process dies: from some
//! call on, nothing reaches the store any more).

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DynStore, ListPage, ListRequest, ObjectStore, PutMode, StoreError, StoreResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
    List,
    Head,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 InternalError.
    ServerError,
    /// HTTP 503 SlowDown.
    SlowDown,
    /// The call never answers (the retry layer's timeout must fire).
    Hang,
    /// The connection is reset mid-request.
    Reset,
    /// The request reaches the store and is applied, but the answer is lost.
    LostResponse,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub op: Option<Op>,
    /// Only keys containing this substring.
    pub key_contains: Option<String>,
    pub fault: Fault,
    /// How many matching calls to fail (then the rule is spent).
    pub times: u64,
}

#[derive(Debug)]
pub struct FaultStore {
    inner: DynStore,
    rules: Mutex<Vec<Rule>>,
    /// Calls of kind Put left before the simulated crash; u64::MAX = never.
    puts_before_crash: AtomicU64,
    crashed: AtomicBool,
    puts_seen: AtomicU64,
    gets_seen: AtomicU64,
    /// Calls of kind Delete left before the simulated crash; u64::MAX = never.
    deletes_before_crash: AtomicU64,
}

impl FaultStore {
    pub fn new(inner: DynStore) -> Self {
        Self {
            inner,
            rules: Mutex::new(Vec::new()),
            puts_before_crash: AtomicU64::new(u64::MAX),
            crashed: AtomicBool::new(false),
            puts_seen: AtomicU64::new(0),
            gets_seen: AtomicU64::new(0),
            deletes_before_crash: AtomicU64::new(u64::MAX),
        }
    }

    pub fn add_rule(&self, rule: Rule) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).push(rule);
    }

    pub fn clear_rules(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// After `n` more PUTs succeed, the process "crashes": every later call fails.
    pub fn crash_after_puts(&self, n: u64) {
        self.crashed.store(false, Ordering::SeqCst);
        self.puts_before_crash.store(n, Ordering::SeqCst);
    }

    /// After `n` more DELETEs succeed, the process "crashes": every later call fails.
    pub fn crash_after_deletes(&self, n: u64) {
        self.crashed.store(false, Ordering::SeqCst);
        self.deletes_before_crash.store(n, Ordering::SeqCst);
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    pub fn puts_seen(&self) -> u64 {
        self.puts_seen.load(Ordering::SeqCst)
    }

    pub fn gets_seen(&self) -> u64 {
        self.gets_seen.load(Ordering::SeqCst)
    }

    fn take_fault(&self, op: Op, key: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let rule = rules.iter_mut().find(|r| {
            r.times > 0 && r.op.is_none_or(|o| o == op) && r.key_contains.as_deref().is_none_or(|s| key.contains(s))
        })?;
        rule.times -= 1;
        Some(rule.fault)
    }

    async fn gate(&self, op: Op, key: &str) -> StoreResult<Option<Fault>> {
        if self.crashed() {
            return Err(StoreError::Permanent("simulated crash: store unreachable".into()));
        }
        let budget = match op {
            Op::Put => Some(&self.puts_before_crash),
            Op::Delete => Some(&self.deletes_before_crash),
            _ => None,
        };
        if let Some(left) = budget {
            match left.load(Ordering::SeqCst) {
                0 => {
                    self.crashed.store(true, Ordering::SeqCst);
                    return Err(StoreError::Permanent("simulated crash: store unreachable".into()));
                }
                u64::MAX => {}
                n => left.store(n - 1, Ordering::SeqCst),
            }
        }
        match op {
            Op::Put => self.puts_seen.fetch_add(1, Ordering::SeqCst),
            Op::Get => self.gets_seen.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
        match self.take_fault(op, key) {
            Some(Fault::ServerError) => Err(StoreError::Transient(format!("injected 500 InternalError on {key}"))),
            Some(Fault::SlowDown) => Err(StoreError::Transient(format!("injected 503 SlowDown on {key}"))),
            Some(Fault::Reset) => Err(StoreError::Transient(format!("injected connection reset on {key}"))),
            Some(Fault::Hang) => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(StoreError::Transient("injected hang ended".into()))
            }
            Some(Fault::LostResponse) => Ok(Some(Fault::LostResponse)),
            None => Ok(None),
        }
    }

    fn after<T>(fault: Option<Fault>, key: &str, r: StoreResult<T>) -> StoreResult<T> {
        match (fault, r) {
            (Some(Fault::LostResponse), Ok(_)) => {
                Err(StoreError::Transient(format!("injected lost response on {key}")))
            }
            (_, r) => r,
        }
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let f = self.gate(Op::Get, key).await?;
        Self::after(f, key, self.inner.get(key, range).await)
    }
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        let f = self.gate(Op::Put, key).await?;
        Self::after(f, key, self.inner.put(key, body, mode).await)
    }
    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        let f = self.gate(Op::Get, key).await?;
        Self::after(f, key, self.inner.get_tagged(key).await)
    }
    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        let f = self.gate(Op::Put, key).await?;
        Self::after(f, key, self.inner.put_if_match(key, body, tag).await)
    }
    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        let f = self.gate(Op::Put, to).await?;
        Self::after(f, to, self.inner.copy(from, to, mode).await)
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        let f = self.gate(Op::Delete, key).await?;
        Self::after(f, key, self.inner.delete(key).await)
    }
    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        let f = self.gate(Op::List, req.prefix).await?;
        Self::after(f, req.prefix, self.inner.list(req).await)
    }
    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        let f = self.gate(Op::Head, key).await?;
        Self::after(f, key, self.inner.head(key).await)
    }
    fn describe(&self) -> String {
        format!("fault({})", self.inner.describe())
    }
}
