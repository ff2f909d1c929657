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
        // Absolute, so that the store describes itself the same way from
        // any working directory (write-back logs are keyed to it).
        let root = fs::canonicalize(&root).unwrap_or(root);
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

/// Create `dir` and any missing parents, noting each one made in `made`:
/// its parent got a new entry, synced once the object is in place (see
/// [`put_file`]), so a crash cannot lose a directory an object was put in.
fn create_dirs(dir: &Path, made: &mut Vec<PathBuf>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent, made)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            made.push(dir.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sync a directory that may be gone: one a concurrent delete emptied and
/// removed after the object in it was deleted too has nothing to keep.
fn fsync_dir_if_there(dir: &Path) -> io::Result<()> {
    match fsync_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// How often a write starts again when a concurrent delete removed its
/// (then empty) directory between creating it and writing into it.
const DIR_RACE_ATTEMPTS: usize = 16;

fn write_object(path: &Path, body: &[Bytes], mode: PutMode) -> io::Result<()> {
    put_file(path, mode, |f| body.iter().try_for_each(|part| f.write_all(part)))
}

/// Copy the object at `src` to `dst` as a write does, the bytes copied by
/// the kernel (`copy_file_range`, a reflink where the file system shares
/// extents). Not a hard link: the new object must be as young as the
/// copy (compaction takes an unnamed chunk object for garbage by its
/// age), where a link shares the source's inode and mtime.
fn copy_object(src: &Path, dst: &Path, mode: PutMode) -> io::Result<()> {
    let mut from = fs::File::open(src)?;
    put_file(dst, mode, |f| io::copy(&mut from, f).map(drop))
}

/// Put an object at `path`: a temporary file in its directory, filled by
/// `fill`, synced, then renamed (overwrite) or hard-linked
/// (create-if-absent) into place, and the directories synced. Directories
/// are made without a sync and synced only once the temporary file is in
/// them: a delete of a neighbour's last object prunes empty directories,
/// and a sync between making one and filling it (slow on a busy disk)
/// gave that prune the time to take it again and again.
fn put_file(path: &Path, mode: PutMode, fill: impl FnOnce(&mut fs::File) -> io::Result<()>) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("object path has no parent"))?;
    let mut attempt = 0;
    let mut made = Vec::new();
    loop {
        // A directory on the way went away under us (a delete of its last
        // object removed it): make it again. Once our temporary file is in
        // it, it is not empty and stays.
        let opened = create_dirs(dir, &mut made).and_then(|()| {
            let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
            fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map(|f| (f, tmp))
        });
        match opened {
            Ok((f, tmp)) => return finish_object(f, &tmp, dir, path, fill, mode, &made),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < DIR_RACE_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

fn finish_object(
    mut f: fs::File,
    tmp: &Path,
    dir: &Path,
    path: &Path,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
    mode: PutMode,
    made: &[PathBuf],
) -> io::Result<()> {
    let result = (|| {
        fill(&mut f)?;
        f.sync_all()?;
        // The directories made for it hold it now: their entries synced,
        // nearest the root first.
        for d in made {
            if let Some(parent) = d.parent() {
                fsync_dir_if_there(parent)?;
            }
        }
        match mode {
            PutMode::Overwrite => fs::rename(tmp, path),
            PutMode::IfAbsent => {
                let linked = fs::hard_link(tmp, path);
                let _ = fs::remove_file(tmp);
                linked
            }
        }?;
        fsync_dir_if_there(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Replace the object at `path` only while its bytes still have `tag`
/// ([`super::content_tag`]). Every such replace holds an exclusive `flock`
/// on the file it checked until its rename is done, and checks that the
/// file it locked is still the one under the name (a replace that renamed
/// over it meanwhile made a new one): two replaces from the same tag, in
/// one process or two, cannot both land. `Ok(false)`: the tag differs.
fn replace_if_match(path: &Path, body: &Bytes, tag: &str) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..DIR_RACE_ATTEMPTS {
        let mut f = fs::File::open(path)?;
        f.lock()?;
        let (held, now) = (f.metadata()?, fs::metadata(path)?);
        if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
            continue;
        }
        let mut current = Vec::with_capacity(held.len() as usize);
        f.read_to_end(&mut current)?;
        if super::content_tag(&current) != tag {
            return Ok(false);
        }
        write_object(path, std::slice::from_ref(body), PutMode::Overwrite)?;
        return Ok(true);
    }
    Err(io::Error::new(io::ErrorKind::Interrupted, "replaced by others again and again while waiting for its lock"))
}

/// Remove an object and the directories its removal left empty, up to the
/// root. A directory that is not empty (or just got a new entry) stays.
fn delete_object(root: &Path, path: &Path) -> io::Result<()> {
    // After any replace `If-Match` holding the file's lock: one that
    // checked its tag must not rename its bytes back after the delete.
    let _held = match fs::File::open(path) {
        Ok(f) => {
            f.lock()?;
            f
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let mut dir = path.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == root || fs::remove_dir(&d).is_err() {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    // The directory that held the name, unless a concurrent delete removed
    // it meanwhile (then there is nothing left to make durable).
    if let Some(d) = path.parent() {
        match fsync_dir(d) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(())
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
        // Deleted since read_dir named it (a compaction, a take-back): not
        // listed, as if the listing had come a moment later.
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
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
                // Read into spare capacity: no zeroing of a buffer the
                // read overwrites anyway.
                let want = end - start;
                let mut buf = Vec::with_capacity(want as usize);
                f.take(want).read_to_end(&mut buf)?;
                if (buf.len() as u64) < want {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "object shorter than its size"));
                }
                Ok(buf)
            };
            read().map(Bytes::from).map_err(|e| io_err(&key, e))
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        self.put_parts(key, vec![body], mode).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        Self::blocking(move || write_object(&path, &parts, mode).map_err(|e| io_err(&key, e))).await
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        let data = self.get(key, None).await?;
        let tag = super::content_tag(&data);
        Ok((data, tag))
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let (key, tag) = (key.to_string(), tag.to_string());
        Self::blocking(move || match replace_if_match(&path, &body, &tag) {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::PreconditionFailed(key)),
            Err(e) => Err(io_err(&key, e)),
        })
        .await
    }

    /// The bytes copied by the kernel, not through this process (see
    /// [`copy_object`]).
    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        let (src, dst) = (self.path_of(from)?, self.path_of(to)?);
        let (from, to) = (from.to_string(), to.to_string());
        Self::blocking(move || {
            copy_object(&src, &dst, mode).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound if !src.exists() => StoreError::NotFound(from),
                _ => io_err(&to, e),
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let root = self.root.clone();
        let key = key.to_string();
        Self::blocking(move || delete_object(&root, &path).map_err(|e| io_err(&key, e))).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy is a new object, as young as the copy (a hard link kept the
    /// source's days-old mtime, and compaction took the copy for garbage
    /// before a record named it), with the source's bytes; a copy onto a
    /// name taken is refused, and one of a missing object is not found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_is_a_new_object_as_young_as_the_copy() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(root.path()).expect("store");
        let body = Bytes::from(vec![7u8; 100_000]);
        store.put("p/chunks/a", body.clone(), PutMode::IfAbsent).await.expect("put");
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let f = fs::File::options().write(true).open(root.path().join("p/chunks/a")).expect("open");
        f.set_modified(old).expect("age the source");
        store.copy("p/chunks/a", "c/chunks/a", PutMode::IfAbsent).await.expect("copy");
        assert_eq!(store.get("c/chunks/a", None).await.expect("get"), body);
        let now = crate::clock::Clock::now_unix(&crate::clock::SystemClock);
        let listed = store.list(ListRequest { prefix: "c/", max_keys: 10, ..ListRequest::default() }).await;
        let modified = listed.expect("list").objects.first().and_then(|o| o.modified_unix);
        assert!(modified.is_some_and(|m| m >= now - 60), "the copy is stamped {modified:?}, now is {now}");
        let taken = store.copy("p/chunks/a", "c/chunks/a", PutMode::IfAbsent).await;
        assert!(matches!(taken, Err(StoreError::PreconditionFailed(_))), "{taken:?}");
        let missing = store.copy("p/chunks/b", "c/chunks/b", PutMode::IfAbsent).await;
        assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
        // The source's file is its own still: unchanged by the copy.
        let source = fs::metadata(root.path().join("p/chunks/a")).expect("stat").modified().expect("mtime");
        assert_eq!(source, old);
    }

    /// A delete waits while a replace `If-Match` holds the object's lock
    /// (here the test holds it): a replace that checked its tag renames
    /// its bytes in before the delete, never after it (which brought a
    /// deleted `volume.json` back).
    #[test]
    fn a_delete_waits_for_a_replace_holding_the_objects_lock() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("v/volume.json");
        write_object(&path, &[Bytes::from_static(b"a")], PutMode::IfAbsent).expect("write");
        let held = fs::File::open(&path).expect("open");
        held.lock().expect("lock");
        let deleter = {
            let (root, path) = (root.path().to_path_buf(), path.clone());
            std::thread::spawn(move || delete_object(&root, &path))
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!deleter.is_finished() && path.exists(), "the delete went ahead of a replace holding the lock");
        // The replace lands, then lets go: the delete removes its bytes.
        write_object(&path, &[Bytes::from_static(b"b")], PutMode::Overwrite).expect("replace");
        drop(held);
        deleter.join().expect("deleter").expect("delete");
        assert!(!path.exists(), "the replaced object outlived the delete");
    }

    /// A delete of a directory's last object removes the directory; a write
    /// into that directory at the same moment must still succeed.
    #[test]
    fn writes_survive_concurrent_deletes_of_their_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path().to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let deleter = {
            let (root, stop) = (root.clone(), stop.clone());
            std::thread::spawn(move || {
                let victim = root.join("v/chunks/0/a");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = write_object(&victim, &[Bytes::from_static(b"x")], PutMode::Overwrite);
                    delete_object(&root, &victim).expect("delete");
                }
            })
        };
        let mut failures = Vec::new();
        for i in 0..2000 {
            let path = root.join(format!("v/chunks/0/b{i}"));
            if let Err(e) = write_object(&path, &[Bytes::from_static(b"y")], PutMode::IfAbsent) {
                failures.push(e.to_string());
            }
            let _ = delete_object(&root, &path);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        deleter.join().expect("deleter thread");
        assert!(failures.is_empty(), "{} of 2000 writes failed, first: {:?}", failures.len(), failures.first());
    }

    /// A listing beside deletes of what it lists (compaction deleting
    /// journal records and emptying chunk directories) succeeds: an entry
    /// gone between the directory read and its stat is left out. It failed
    /// with NotFound, which a writer's proof of succession read as its
    /// record folded away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_beside_deletes_of_what_it_lists_succeeds() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(root.path()).expect("store");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (root, stop) = (root.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for path in [root.join(format!("v/journal/{i:020x}")), root.join(format!("v/chunks/{i:x}/1"))] {
                        let _ = write_object(&path, &[Bytes::from_static(b"x")], PutMode::Overwrite);
                        let _ = delete_object(&root, &path);
                    }
                    i = (i + 1) % 64;
                }
            })
        };
        let mut failures = Vec::new();
        for _ in 0..2000 {
            for prefix in ["v/journal/", "v/"] {
                let req = ListRequest { prefix, start_after: None, delimiter: false, max_keys: 1000 };
                if let Err(e) = store.list(req).await {
                    failures.push(e.to_string());
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().expect("churn thread");
        assert!(failures.is_empty(), "{} of 4000 listings failed, first: {:?}", failures.len(), failures.first());
    }
}
