//! A file that exists while a served volume may hold writes this process
//! acknowledged but has not committed to the store.
//!
//! Until acknowledged writes survive a crash of the serving process, such
//! writes live only in its memory. The marker lets the next process tell a
//! clean exit from a lossy one: it is created before the first write after
//! a clean point is acknowledged, and removed after a FLUSH that leaves no
//! acknowledged write uncommitted. A process that finds the marker at start
//! knows writes were lost and must not pretend otherwise (the node plugin
//! disconnects the kernel's device instead of reconnecting it).
//!
//! The file is not fsync'd: a crash of the process keeps the page cache,
//! and a crash of the node takes the kernel's device with it anyway.
//!
//! What it does not own: committing (the engine) and deciding what to do
//! about a marker found at start (the node plugin).
//!
//! The hot path is two atomic increments and a load per write; the file is
//! touched once per clean point. A write racing a flush keeps the marker:
//! writes are counted as they begin, a flush only clears the marker when no
//! write was in flight as it began and none began since.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

#[derive(Debug)]
pub struct UnflushedMarker {
    path: PathBuf,
    /// Writes begun since this process started.
    begun: AtomicU64,
    /// Writes begun and not yet finished.
    in_flight: AtomicU64,
    /// The file exists (or is being created under `file`).
    present: AtomicBool,
    /// Serialises creating and removing the file.
    file: Mutex<()>,
}

/// Held by a write from before it starts until it finished (succeeded or
/// failed); its reply may be sent only while the guard exists or after.
#[derive(Debug)]
pub struct WriteGuard<'a>(&'a UnflushedMarker);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

/// Taken as a flush begins: `Some(begun)` when no write was in flight, so
/// a successful flush covers every write counted in `begun`.
#[derive(Debug, Clone, Copy)]
pub struct FlushTicket(Option<u64>);

impl UnflushedMarker {
    /// The marker at `path`; a file already there (left by a process that
    /// did not exit cleanly) is kept until a flush clears it.
    pub fn new(path: PathBuf) -> Self {
        let present = path.exists();
        Self {
            path,
            begun: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            present: AtomicBool::new(present),
            file: Mutex::new(()),
        }
    }

    /// Is there a marker at `path` (a previous process may have lost writes)?
    pub fn found(path: &Path) -> bool {
        path.exists()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call before a write starts. Fails when the marker cannot be created:
    /// the write must then fail too, or its loss in a crash would go unseen.
    pub fn write_begins(&self) -> io::Result<WriteGuard<'_>> {
        self.in_flight.fetch_add(1, SeqCst);
        let guard = WriteGuard(self);
        self.begun.fetch_add(1, SeqCst);
        if !self.present.load(SeqCst) {
            let _file = self.lock();
            if !self.present.load(SeqCst) {
                std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&self.path).map_err(|e| {
                    io::Error::new(e.kind(), format!("unflushed-writes marker {}: {e}", self.path.display()))
                })?;
                self.present.store(true, SeqCst);
            }
        }
        Ok(guard)
    }

    /// Call just before the volume is flushed.
    pub fn flush_begins(&self) -> FlushTicket {
        // A write counted in `begun` incremented `in_flight` first: if it
        // has not finished, `in_flight` shows it.
        let begun = self.begun.load(SeqCst);
        FlushTicket((self.in_flight.load(SeqCst) == 0).then_some(begun))
    }

    /// Call after the flush that began with `ticket` succeeded: removes the
    /// marker when that flush covered every write begun so far.
    pub fn flushed(&self, ticket: FlushTicket) {
        let Some(covered) = ticket.0 else { return };
        if self.begun.load(SeqCst) != covered || !self.present.load(SeqCst) {
            return;
        }
        let _file = self.lock();
        // Clear the flag before checking for new writes: a write that
        // begins now either is seen below, or sees the flag cleared and
        // waits for the lock to create the file again.
        self.present.store(false, SeqCst);
        if self.begun.load(SeqCst) != covered {
            self.present.store(true, SeqCst);
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the unflushed-writes marker");
                self.present.store(true, SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> (tempfile::TempDir, UnflushedMarker) {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = UnflushedMarker::new(dir.path().join("v.unflushed"));
        (dir, m)
    }

    #[test]
    fn a_write_creates_the_marker_and_a_covering_flush_removes_it() {
        let (_d, m) = marker();
        assert!(!m.path().exists());
        let g = m.write_begins().expect("write");
        assert!(m.path().exists(), "marker missing while a write is acknowledged");
        drop(g);
        let t = m.flush_begins();
        m.flushed(t);
        assert!(!m.path().exists(), "a flush covering every write left the marker");
        let _g = m.write_begins().expect("write");
        assert!(m.path().exists(), "the next write after a clean point did not mark");
    }

    #[test]
    fn a_write_in_flight_or_begun_during_a_flush_keeps_the_marker() {
        let (_d, m) = marker();
        let g = m.write_begins().expect("write");
        let t = m.flush_begins();
        drop(g);
        m.flushed(t);
        assert!(m.path().exists(), "a flush that began with a write in flight removed the marker");
        let t = m.flush_begins();
        drop(m.write_begins().expect("write during the flush"));
        m.flushed(t);
        assert!(m.path().exists(), "a write begun during the flush lost its marker");
        let t = m.flush_begins();
        m.flushed(t);
        assert!(!m.path().exists());
    }

    #[test]
    fn a_marker_left_by_an_earlier_process_stays_until_a_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.unflushed");
        std::fs::write(&path, b"").expect("marker");
        let m = UnflushedMarker::new(path.clone());
        assert!(UnflushedMarker::found(&path));
        drop(m.write_begins().expect("write"));
        assert!(path.exists());
        let t = m.flush_begins();
        m.flushed(t);
        assert!(!path.exists());
    }

    #[test]
    fn concurrent_writes_and_flushes_never_leave_an_unflushed_write_unmarked() {
        let (_d, m) = marker();
        let m = std::sync::Arc::new(m);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flusher = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let t = m.flush_begins();
                    m.flushed(t);
                }
            })
        };
        for _ in 0..20_000 {
            let g = m.write_begins().expect("write");
            // Acknowledged now: until a flush that begins after this point
            // succeeds, the marker must exist.
            assert!(m.path().exists(), "an acknowledged write is not marked");
            drop(g);
        }
        stop.store(true, SeqCst);
        flusher.join().expect("flusher");
    }
}
