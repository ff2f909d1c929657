//! Object stores: one narrow trait and its implementations.
//!
//! The trait is deliberately small (get, put, put-if-absent, delete, list,
//! head). Retries, metrics and fault injection are wrappers around it
//! ([`retry::RetryStore`], [`metered`], [`fault::FaultStore`]) rather than
//! logic inside every backend; [`layered`] stacks the first two the way
//! every store of the process is built.

pub mod fault;
pub mod limit;
pub mod local;
pub mod memory;
pub mod metered;
pub mod retry;
pub mod s3;
pub mod sealed;
pub mod sim;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// What went wrong with one store call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(String),
    /// A conditional write (`If-None-Match: *`) found the object already there.
    #[error("object {0} already exists (conditional write refused)")]
    PreconditionFailed(String),
    /// Worth retrying: 5xx, throttling, timeouts, connection resets.
    #[error("transient store error: {0}")]
    Transient(String),
    /// Not worth retrying: access denied, bad bucket, malformed request.
    #[error("store error: {0}")]
    Permanent(String),
    /// An encrypted volume's object that does not open: altered, cut, or
    /// another object's bytes under this name ([`sealed`]). Never retried.
    #[error("{0}")]
    Damaged(String),
    /// The store does not do what was asked (a replace `If-Match` on a
    /// store that answers 501 to it). Never retried.
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Conditions on a PUT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PutMode {
    /// Create or replace.
    #[default]
    Overwrite,
    /// Create only if no object exists under the key (`If-None-Match: *`).
    IfAbsent,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Seconds since the Unix epoch, when the store knows it.
    pub modified_unix: Option<i64>,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// With a delimiter: the "directories" directly under the prefix, each ending in `/`.
    pub common_prefixes: Vec<String>,
    /// Pass as `start_after` to get the next page; `None` when the listing is complete.
    pub next_start_after: Option<String>,
}

/// A listing request.
#[derive(Debug, Clone, Default)]
pub struct ListRequest<'a> {
    pub prefix: &'a str,
    pub start_after: Option<&'a str>,
    /// Group keys at the next `/` after the prefix.
    pub delimiter: bool,
    pub max_keys: usize,
}

#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Read an object, or a byte range of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes>;
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()>;
    /// [`ObjectStore::put`] of `parts` one after the other. The S3 and
    /// local stores (and the layers over them) send the parts as they are:
    /// a chunk's table goes up after its bytes without a copy of them.
    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        self.put(key, concat(&parts), mode).await
    }
    /// An object and its version tag: the S3 store's ETag, the others' an
    /// MD5 of the bytes ([`content_tag`]). Equal bytes may have equal tags.
    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)>;
    /// Replace `key` only while its tag is still `tag` (`If-Match`):
    /// [`StoreError::PreconditionFailed`] when it changed (or a retried
    /// attempt of this call landed: read it back),
    /// [`StoreError::NotFound`] when it is gone, and
    /// [`StoreError::Unsupported`] from a store without conditional
    /// replaces.
    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()>;
    /// Copy the object `from` to `to` under `mode`, within the store where
    /// it can (S3 CopyObject; on the local store the kernel copies the
    /// file) so that the bytes never pass through this process; here, a
    /// GET and a PUT.
    /// [`StoreError::NotFound`] when `from` is missing.
    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        let body = self.get(from, None).await?;
        self.put(to, body, mode).await
    }
    /// Delete an object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// List keys in lexicographic order.
    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage>;
    /// Size of an object, `None` when absent.
    async fn head(&self, key: &str) -> StoreResult<Option<u64>>;
    /// A short human description ("s3://bucket", "file:///dir").
    fn describe(&self) -> String;
    /// A store that seals volumes' objects ([`sealed::SealedStore`]): its
    /// keys, and the (prefix, uuid) of the volumes it seals.
    fn unlocked(&self) -> Option<sealed::Sealing> {
        None
    }
}

pub type DynStore = Arc<dyn ObjectStore>;

/// `base` as the rest of s3blk uses it: attempts metered, retried, calls
/// metered (see [`metered`] for why metrics sit on both sides of the
/// retries). Tests put a [`fault::FaultStore`] in as `base`.
pub fn layered(base: DynStore, policy: retry::RetryPolicy) -> DynStore {
    layered_within(base, policy, None)
}

/// [`layered`], each attempt also taking one of `permits` (shared with
/// other stores) while it runs.
pub fn layered_within(base: DynStore, policy: retry::RetryPolicy, permits: Option<limit::Permits>) -> DynStore {
    let metrics = crate::metrics::global().store.clone();
    let attempts: DynStore = Arc::new(metered::MeteredAttempts::new(base, metrics.clone()));
    let retry = retry::RetryStore::new(attempts, policy);
    let retried: DynStore = Arc::new(match permits {
        Some(p) => retry.with_permits(p),
        None => retry,
    });
    Arc::new(metered::MeteredStore::new(retried, metrics))
}

/// The parts as one body (one part is not copied).
pub fn concat(parts: &[Bytes]) -> Bytes {
    match parts {
        [one] => one.clone(),
        _ => {
            let mut v = Vec::with_capacity(parts.iter().map(Bytes::len).sum());
            for p in parts {
                v.extend_from_slice(p);
            }
            Bytes::from(v)
        }
    }
}

/// Where the next page of a listing of `prefix` starts (`None`: it ended),
/// given where this one started and what it said. A page that does not
/// move past the one before (a store that ignores StartAfter) is an error:
/// followed, the listing would never end.
pub fn advance(prefix: &str, after: Option<&str>, next: Option<String>) -> StoreResult<Option<String>> {
    match next {
        Some(n) if after.is_some_and(|a| n.as_str() <= a) => Err(StoreError::Permanent(format!(
            "listing {prefix}: the store answered a page that does not move past {n:?}"
        ))),
        other => Ok(other),
    }
}

/// List every object under a prefix, following pages.
pub async fn list_all(store: &dyn ObjectStore, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page =
            store.list(ListRequest { prefix, start_after: after.as_deref(), delimiter: false, max_keys: 1000 }).await?;
        out.extend(page.objects);
        match advance(prefix, after.as_deref(), page.next_start_after)? {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// Delete every key, `concurrency` calls at a time; the first error stops it.
pub async fn delete_keys(store: &dyn ObjectStore, keys: Vec<String>, concurrency: usize) -> StoreResult<()> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(keys.into_iter().map(|k| async move { store.delete(&k).await }))
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// The version tag of `body` in the stores that keep no tag of their own
/// (local directory, memory, simulation): its MD5 in hex, as S3 tags an
/// object put whole without KMS.
pub fn content_tag(body: &[u8]) -> String {
    use md5::Digest;
    let digest = md5::Md5::digest(body);
    let mut out = String::with_capacity(34);
    out.push('"');
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('"');
    out
}

/// The name of [`supports_conditional_put`]'s probe under a prefix is this
/// stem and 16 hex digits.
pub const PROBE_STEM: &str = ".s3blk-probe-";
/// What the probe's first and second create write (the second lands only
/// on a store that ignores `If-None-Match`).
pub const PROBE_BODIES: [&[u8]; 2] = [b"1", b"2"];

/// Probe whether the store honours `If-None-Match: *`: create a probe object
/// twice; the second create must be refused. The probe is deleted again;
/// when that delete is lost, the catalog recognises what is left
/// (`catalog::delete_volume`).
pub async fn supports_conditional_put(store: &dyn ObjectStore, prefix: &str) -> StoreResult<bool> {
    let key = format!("{prefix}{PROBE_STEM}{:016x}", rand::random::<u64>());
    store.put(&key, Bytes::from_static(PROBE_BODIES[0]), PutMode::IfAbsent).await?;
    let second = store.put(&key, Bytes::from_static(PROBE_BODIES[1]), PutMode::IfAbsent).await;
    let _ = store.delete(&key).await;
    match second {
        Err(StoreError::PreconditionFailed(_)) => Ok(true),
        Ok(()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Probe whether the store honours `If-Match` on a PUT: create a probe
/// object, then replace it under a tag it does not have; that replace
/// must be refused. A store that ignores the header (some S3 servers, and
/// older versions of others, answer 200 and write) or answers 501 to it
/// does not. The probe is named and filled as
/// [`supports_conditional_put`]'s, so a lost delete leaves what the
/// catalog recognises.
pub async fn supports_conditional_replace(store: &dyn ObjectStore, prefix: &str) -> StoreResult<bool> {
    let key = format!("{prefix}{PROBE_STEM}{:016x}", rand::random::<u64>());
    store.put(&key, Bytes::from_static(PROBE_BODIES[0]), PutMode::IfAbsent).await?;
    let not_its_tag = content_tag(PROBE_BODIES[1]);
    let second = store.put_if_match(&key, Bytes::from_static(PROBE_BODIES[1]), &not_its_tag).await;
    let _ = store.delete(&key).await;
    match second {
        Err(StoreError::PreconditionFailed(_)) => Ok(true),
        Ok(()) | Err(StoreError::Unsupported(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) fn apply_range(data: &Bytes, range: Option<Range<u64>>, key: &str) -> StoreResult<Bytes> {
    match range {
        None => Ok(data.clone()),
        Some(r) => {
            let len = data.len() as u64;
            if r.start > r.end || r.start > len {
                return Err(StoreError::Permanent(format!(
                    "range {}..{} outside object {key} of {len} bytes",
                    r.start, r.end
                )));
            }
            let end = r.end.min(len);
            Ok(data.slice(r.start as usize..end as usize))
        }
    }
}
