//! Encrypted volumes as a store layer: the objects of a volume that hold
//! its data or its map (chunks, journal records, checkpoints and their
//! parts) are sealed on their way up and opened on their way back, and
//! everything above sees them in the clear.
//!
//! Owns: which names are sealed, frames (`crypto::FrameCipher`) over whole
//! objects and byte ranges, the sizes listings and heads report. Does not
//! own keys (`crypto`) or how a volume is unlocked (`volume::keys`).
//!
//! Each frame is bound to the volume's uuid and the object's name under
//! the volume, so an object copied over another (another chunk index, an
//! older generation, another volume's) fails to open, as does a flipped
//! bit or a cut. Such a read answers [`StoreError::Damaged`]. A range
//! opens only the frames it touches: a cold 4 KiB read of a chunk fetches
//! and opens one or two 16 KiB frames.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DynStore, ListPage, ListRequest, ObjectStore, PutMode, StoreError, StoreResult};
use crate::crypto::{self, DataKey, FRAME, FrameCipher, Kek, OVERHEAD};

/// Bodies at least this big are sealed and opened on the blocking pool.
const BLOCKING_AT: usize = 256 << 10;

/// What a sealed store was unlocked with.
#[derive(Debug)]
pub struct Unlocked {
    /// The store underneath (in the clear).
    pub base: DynStore,
    /// The key that unwrapped the data key: a clone made through this
    /// store wraps the same data key with it.
    pub kek: Kek,
    pub data: DataKey,
}

/// A sealed store's keys, and the (prefix, uuid) of the volumes it seals.
#[derive(Debug, Clone)]
pub struct Sealing {
    pub keys: Arc<Unlocked>,
    pub volumes: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct SealedStore {
    keys: Arc<Unlocked>,
    cipher: FrameCipher,
    /// (prefix, uuid) of each volume whose objects are sealed: the one
    /// unlocked and the parents it reads through (one data key).
    volumes: Vec<(String, String)>,
}

/// Names under a volume that are sealed (relative to its prefix).
pub fn is_sealed_name(rel: &str) -> bool {
    rel.starts_with("chunks/") || rel.starts_with("journal/") || rel.starts_with("checkpoints/")
}

impl SealedStore {
    pub fn new(keys: Arc<Unlocked>, volumes: Vec<(String, String)>) -> SealedStore {
        let cipher = keys.data.cipher();
        SealedStore { keys, cipher, volumes }
    }

    /// The volume uuid and the name under it, when `key` is sealed.
    fn sealed<'k>(&self, key: &'k str) -> Option<(String, &'k str)> {
        self.volumes.iter().find_map(|(prefix, uuid)| {
            key.strip_prefix(prefix.as_str()).filter(|rel| is_sealed_name(rel)).map(|rel| (uuid.clone(), rel))
        })
    }

    fn base(&self) -> &DynStore {
        &self.keys.base
    }
}

fn damaged(key: &str, why: String) -> StoreError {
    StoreError::Damaged(format!("object {key} {why}"))
}

/// Run `f` on the blocking pool when `len` is big enough to hold a runtime
/// worker for long. On a current-thread runtime it runs in place: there
/// is no other worker to keep free, and a paused clock (the simulation)
/// must not move while a thread outside the runtime works.
async fn maybe_blocking<T: Send + 'static>(len: usize, f: impl FnOnce() -> T + Send + 'static) -> StoreResult<T> {
    let single = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if len < BLOCKING_AT || single {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Transient(format!("sealing: {e}")))
}

#[async_trait]
impl ObjectStore for SealedStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let Some((uuid, rel)) = self.sealed(key) else {
            return self.base().get(key, range).await;
        };
        let rel = rel.to_string();
        let f = (FRAME + OVERHEAD) as u64;
        match range {
            None => {
                let stored = self.base().get(key, None).await?;
                let cipher = self.cipher.clone();
                let plain = maybe_blocking(stored.len(), move || cipher.open(&uuid, &rel, 0, &stored, true)).await?;
                plain.map(Bytes::from).map_err(|why| damaged(key, why))
            }
            Some(r) if r.start >= r.end => {
                // Nothing to open: only whether the object is there and that long.
                let len = self.head(key).await?.ok_or_else(|| StoreError::NotFound(key.to_string()))?;
                if r.start > r.end || r.start > len {
                    return Err(StoreError::Permanent(format!(
                        "range {}..{} outside object {key} of {len} bytes",
                        r.start, r.end
                    )));
                }
                Ok(Bytes::new())
            }
            Some(r) => {
                let first = r.start / FRAME as u64;
                let last = (r.end - 1) / FRAME as u64;
                let stored = self.base().get(key, Some(first.saturating_mul(f)..(last + 1).saturating_mul(f))).await?;
                if stored.is_empty() {
                    // From the object's end on (a whole number of frames):
                    // nothing, as a plain object answers; past it, an error.
                    // A cut object reads short here; a whole read finds the cut.
                    if r.start == first * FRAME as u64 {
                        return Ok(Bytes::new());
                    }
                    return Err(StoreError::Permanent(format!(
                        "range {}..{} outside object {key} of {} bytes",
                        r.start,
                        r.end,
                        first * FRAME as u64
                    )));
                }
                let cipher = self.cipher.clone();
                let plain = maybe_blocking(stored.len(), move || cipher.open(&uuid, &rel, first, &stored, false))
                    .await?
                    .map_err(|why| damaged(key, why))?;
                let skip = (r.start - first * FRAME as u64) as usize;
                if skip > plain.len() {
                    return Err(StoreError::Permanent(format!(
                        "range {}..{} outside object {key} of {} bytes",
                        r.start,
                        r.end,
                        first * FRAME as u64 + plain.len() as u64
                    )));
                }
                let end = ((r.end - r.start) as usize + skip).min(plain.len());
                Ok(Bytes::from(plain).slice(skip..end))
            }
        }
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        let Some((uuid, rel)) = self.sealed(key) else {
            return self.base().put(key, body, mode).await;
        };
        let rel = rel.to_string();
        let cipher = self.cipher.clone();
        let sealed = maybe_blocking(body.len(), move || cipher.seal(&uuid, &rel, &body)).await?;
        self.base().put(key, Bytes::from(sealed), mode).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        if self.sealed(key).is_none() {
            return self.base().put_parts(key, parts, mode).await;
        }
        self.put(key, super::concat(&parts), mode).await
    }

    /// Only for objects kept in the clear (`volume.json`): a sealed
    /// object's tag would be its ciphertext's.
    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        match self.sealed(key) {
            Some(_) => Err(StoreError::Unsupported(format!("{key}: a sealed object is not replaced conditionally"))),
            None => self.base().get_tagged(key).await,
        }
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        match self.sealed(key) {
            Some(_) => Err(StoreError::Unsupported(format!("{key}: a sealed object is not replaced conditionally"))),
            None => self.base().put_if_match(key, body, tag).await,
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.base().delete(key).await
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        let mut page = self.base().list(req).await?;
        for o in &mut page.objects {
            if self.sealed(&o.key).is_some() {
                // A size no sealed object has stays as it is: a size check
                // above then finds it wrong.
                o.size = crypto::plain_len(o.size).unwrap_or(o.size);
            }
        }
        Ok(page)
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        let size = self.base().head(key).await?;
        Ok(match self.sealed(key) {
            Some(_) => size.map(|s| crypto::plain_len(s).unwrap_or(s)),
            None => size,
        })
    }

    fn describe(&self) -> String {
        self.base().describe()
    }

    fn unlocked(&self) -> Option<Sealing> {
        Some(Sealing { keys: self.keys.clone(), volumes: self.volumes.clone() })
    }
}
