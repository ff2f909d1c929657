//! In-memory store, for tests and benchmarks.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ListRequest, ObjectInfo, ObjectStore, PutMode, StoreError, StoreResult, apply_range};

/// Bytes and when they were written (seconds since the Unix epoch).
type Objects = BTreeMap<String, (Bytes, i64)>;

#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<Objects>,
}

fn now_unix() -> i64 {
    crate::clock::Clock::now_unix(&crate::clock::SystemClock)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Objects> {
        // A poisoned lock only means a panic elsewhere; the map itself is intact.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of objects stored (tests use it to check sparseness).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Replace an object's bytes behind the engine's back (corruption tests).
    pub fn tamper(&self, key: &str, body: Bytes) {
        self.lock().insert(key.to_string(), (body, now_unix()));
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let data = self.lock().get(key).map(|(b, _)| b.clone()).ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        apply_range(&data, range, key)
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        let mut map = self.lock();
        if mode == PutMode::IfAbsent && map.contains_key(key) {
            return Err(StoreError::PreconditionFailed(key.to_string()));
        }
        map.insert(key.to_string(), (body, now_unix()));
        Ok(())
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        let data = self.get(key, None).await?;
        let tag = super::content_tag(&data);
        Ok((data, tag))
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        let mut map = self.lock();
        match map.get(key) {
            None => Err(StoreError::NotFound(key.to_string())),
            Some((now, _)) if super::content_tag(now) != tag => Err(StoreError::PreconditionFailed(key.to_string())),
            Some(_) => {
                map.insert(key.to_string(), (body, now_unix()));
                Ok(())
            }
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.lock().remove(key);
        Ok(())
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        let map = self.lock();
        let keys = map.iter().map(|(k, (v, _))| (k.as_str(), v.len() as u64));
        Ok(list_sorted(keys, &req, |k| map.get(k).map(|(_, t)| *t)))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        Ok(self.lock().get(key).map(|(b, _)| b.len() as u64))
    }

    fn describe(&self) -> String {
        "memory://".to_string()
    }
}

/// Shared listing logic for stores that can enumerate sorted keys.
pub(crate) fn list_sorted<'k>(
    keys: impl Iterator<Item = (&'k str, u64)>,
    req: &ListRequest<'_>,
    modified: impl Fn(&str) -> Option<i64>,
) -> ListPage {
    let max = if req.max_keys == 0 { 1000 } else { req.max_keys };
    let mut page = ListPage::default();
    let mut count = 0usize;
    let mut last: Option<String> = None;
    for (key, size) in keys {
        if !key.starts_with(req.prefix) {
            continue;
        }
        if let Some(after) = req.start_after
            && key <= after
        {
            continue;
        }
        if req.delimiter {
            let rest = &key[req.prefix.len()..];
            if let Some(pos) = rest.find('/') {
                let common = format!("{}{}", req.prefix, &rest[..=pos]);
                if page.common_prefixes.last() != Some(&common) {
                    if count == max {
                        page.next_start_after = last;
                        return page;
                    }
                    page.common_prefixes.push(common.clone());
                    count += 1;
                }
                // Everything under this prefix sorts before anything after it.
                last = Some(format!("{common}\u{10ffff}"));
                continue;
            }
        }
        if count == max {
            page.next_start_after = last;
            return page;
        }
        page.objects.push(ObjectInfo { key: key.to_string(), size, modified_unix: modified(key) });
        last = Some(key.to_string());
        count += 1;
    }
    page
}
