//! A store in a local directory: the embedded default.
//!
//! Each key is a file under the root. Writes go to a temporary file in the
//! target directory, are fsynced, then renamed (overwrite) or hard-linked
//! (create-if-absent: `link(2)` fails atomically with `EEXIST`), and the
//! directory is fsynced, so a crash leaves either the old object or the new
//! one, never a torn file.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ListRequest, ObjectStore, PutMode, StoreError, StoreResult};

const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root`; the directory is created if needed.
    pub fn new(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| io_err(&root.display().to_string(), e))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key.split('/').any(|c| c == ".." || c == "." || c.starts_with(TMP_PREFIX))
        {
            return Err(StoreError::Permanent(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Transient(format!("local store worker failed: {e}")))?
    }
}

fn io_err(key: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound(key.to_string()),
        io::ErrorKind::AlreadyExists => StoreError::PreconditionFailed(key.to_string()),
        io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            StoreError::Transient(format!("{key}: {e}"))
        }
        _ => StoreError::Permanent(format!("{key}: {e}")),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn write_object(path: &Path, body: &[u8], mode: PutMode) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("object path has no parent"))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        drop(f);
        match mode {
            PutMode::Overwrite => fs::rename(&tmp, path),
            PutMode::IfAbsent => {
                let linked = fs::hard_link(&tmp, path);
                let _ = fs::remove_file(&tmp);
                linked
            }
        }?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, u64, Option<i64>)>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let key = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let meta = entry.metadata()?;
        if meta.is_dir() {
            walk(&entry.path(), &key, out)?;
        } else if meta.is_file() {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i64);
            out.push((key, meta.len(), modified));
        }
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        Self::blocking(move || {
            let read = || -> io::Result<Vec<u8>> {
                let mut f = fs::File::open(&path)?;
                let len = f.metadata()?.len();
                let (start, end) = match &range {
                    None => (0, len),
                    Some(r) if r.start <= r.end && r.start <= len => (r.start, r.end.min(len)),
                    Some(r) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("range {}..{} outside object of {len} bytes", r.start, r.end),
                        ));
                    }
                };
                f.seek(SeekFrom::Start(start))?;
                let mut buf = vec![0u8; (end - start) as usize];
                f.read_exact(&mut buf)?;
                Ok(buf)
            };
            read().map(Bytes::from).map_err(|e| io_err(&key, e))
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        Self::blocking(move || write_object(&path, &body, mode).map_err(|e| io_err(&key, e))).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let root = self.root.clone();
        let key = key.to_string();
        Self::blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err(&key, e)),
            }
            // Remove directories left empty, up to the root, so a deleted
            // volume leaves nothing behind. Failure (not empty) stops the climb.
            let mut dir = path.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                if d == root || fs::remove_dir(&d).is_err() {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
            Ok(())
        })
        .await
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        // Walk only the deepest directory named by the prefix.
        let (dir_rel, _) = req.prefix.rsplit_once('/').unwrap_or(("", req.prefix));
        if !dir_rel.is_empty() {
            self.path_of(dir_rel)?;
        }
        let dir = if dir_rel.is_empty() { self.root.clone() } else { self.root.join(dir_rel) };
        let rel = dir_rel.to_string();
        let key = req.prefix.to_string();
        let mut found = Self::blocking(move || {
            let mut out = Vec::new();
            walk(&dir, &rel, &mut out).map_err(|e| io_err(&key, e))?;
            Ok(out)
        })
        .await?;
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let modified: std::collections::HashMap<&str, Option<i64>> =
            found.iter().map(|(k, _, m)| (k.as_str(), *m)).collect();
        Ok(super::memory::list_sorted(found.iter().map(|(k, s, _)| (k.as_str(), *s)), &req, |k| {
            modified.get(k).copied().flatten()
        }))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        Self::blocking(move || match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&key, e)),
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}
