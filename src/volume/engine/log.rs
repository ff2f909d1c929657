//! The local write-back log: every write a writer acknowledged since its
//! last flush, on local disk, so that a restarted process (same host, the
//! journal not moved on by another writer) carries on with them.
//!
//! Layout, under `<log-dir>/<volume uuid>/<random>/`:
//! - `lock`: held with `flock` by the process using the directory, so a
//!   live process's log is never taken by another, and a dead one's lock
//!   goes with it;
//! - `state`: JSON, replaced atomically (write + rename): the writer epoch
//!   whose writes the segments hold, and while an open is under way the
//!   writer id of the open record being appended;
//! - `seg-<n:016x>`: a header, then entries: crc32c, kind, offset, length,
//!   payload. Appended in the page cache, never fsync'd: a crash of the
//!   process keeps them; a crash of the node may lose the tail, which a
//!   volatile write cache is allowed to do.
//!
//! Rules the engine keeps (see its module doc): an entry is appended under
//! the state lock in the same critical section as the write it records
//! becomes visible in memory, before the write is acknowledged; a flush
//! rotates to a new segment in the critical section that lists the dirty
//! chunks, and once its commit succeeded deletes the segments before it;
//! replaying the remaining segments in order on top of any committed state
//! of the same writer gives every acknowledged write back (writes are
//! overwrites: applying one again changes nothing the later ones do not
//! change again).
//!
//! A dirty page written whole over bytes the engine does not hold lives in
//! the log only: [`WriteLog::append`] returns where its bytes are and
//! [`WriteLog::read_at`] reads them back (closed segments stay open for
//! that until released); the engine brings such pages into memory before
//! it releases their segment.
//!
//! What it does not own: deciding whether a dead process's log may be
//! adopted (the engine compares its epoch with the journal's), applying
//! entries (the engine's write path).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"S3BLKLOG";
const VERSION: u32 = 1;
const SEGMENT_HEADER: usize = 16;
/// crc32c, kind, offset, length.
const ENTRY_HEADER: usize = 4 + 1 + 8 + 4;
/// A segment past this size is closed and a new one begun, so replay
/// reads a bounded amount at a time.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Longest entry payload accepted when reading (the largest chunk).
const MAX_PAYLOAD: usize = super::format::MAX_CHUNK_SIZE as usize;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_SIZE: u8 = 3;

/// One logged change, in the order it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// The volume grew to this size.
    Size(u64),
}

/// What `state` says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogState {
    /// The volume's uuid (a directory moved between volumes is refused).
    pub volume: String,
    /// The writer epoch (seq of its open record) whose writes the
    /// segments hold; 0 before the first open landed.
    pub epoch: u64,
    /// While an open is under way: the writer id of the open record being
    /// appended. If it landed, the segments belong to that epoch too.
    pub next_writer: Option<u64>,
    /// The kernel's boot id when the log was written. Segments are never
    /// fsync'd: after a reboot (a node crash) any of them, or the removal
    /// of a released one, may be lost or half there, so a log of another
    /// boot is never replayed (a crashed node may lose unflushed writes).
    #[serde(default)]
    pub boot: Option<String>,
    /// The volume's store and prefix (a copy of the volume elsewhere has
    /// the same uuid, and never takes this log).
    #[serde(default)]
    pub at: Option<String>,
}

/// Where the kernel says which boot this is.
const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

#[cfg(test)]
thread_local! {
    /// A test's stand-in for [`BOOT_ID_FILE`] on its thread.
    pub(crate) static TEST_BOOT_ID_FILE: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// This boot's id: `Ok(None)` where the kernel does not say (no such
/// file); an error where it does but could not be read now. Logs are then
/// neither taken nor removed: which boot wrote them is not known, and
/// taking a log for another boot's throws away acknowledged writes.
pub fn boot_id() -> io::Result<Option<String>> {
    #[cfg(test)]
    if let Some(p) = TEST_BOOT_ID_FILE.with(|f| f.borrow().clone()) {
        return read_boot_id(&p);
    }
    read_boot_id(Path::new(BOOT_ID_FILE))
}

fn read_boot_id(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: empty", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("reading this boot's id from {}: {e}", path.display()))),
    }
}

/// A log directory this process holds the lock of: a dead process's
/// (found by [`scan`]) or a new one ([`create`]).
#[derive(Debug)]
pub struct Claimed {
    pub dir: PathBuf,
    /// Held, not read: the flock lasts as long as the descriptor.
    _lock: File,
    pub state: Option<LogState>,
}

/// Errors reading a log back.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{path} is damaged at byte {at}: {why}")]
    Damaged { path: PathBuf, at: u64, why: String },
}

/// Take `f`'s exclusive flock without waiting: false when another open
/// file holds it.
pub(crate) fn flock_nb(f: &File) -> io::Result<bool> {
    // SAFETY: flock(2) on a descriptor owned by `f` for the whole call.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:016x}"))
}

/// The segment numbers in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_prefix("seg-")) else { continue };
        if crate::volume::format::is_lower_hex(hex, 16)
            && let Ok(n) = u64::from_str_radix(hex, 16)
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The log directories of `root` (one volume's) whose lock this process
/// could take: those of processes that are gone. Locks are kept.
/// A log whose state is there but cannot be read fails the scan (its
/// writes are neither taken nor thrown away).
pub fn scan(root: &Path) -> io::Result<Vec<Claimed>> {
    scan_where(root, |_| true, true)
}

/// A log's state: `None` when it never got one (its opener died before
/// writing it, and so before any write); an error when it is there and
/// cannot be read or decoded. (It is replaced by a rename, so a reader
/// never sees it half written.)
fn read_state(dir: &Path) -> io::Result<Option<LogState>> {
    let path = dir.join("state");
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a write-back log state ({e}); the writes in {} cannot be told to be this volume's. \
                     Moving that directory aside opens the volume as of its last flush",
                    path.display(),
                    dir.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// [`scan`], of the logs whose state (as read before their lock is
/// tried, without it) `pick` takes: the others are never locked, so a
/// process looking for its own meanwhile finds it free. A state that
/// cannot be read fails the scan when `strict`, else its log is passed
/// over.
fn scan_where(root: &Path, pick: impl Fn(Option<&LogState>) -> bool, strict: bool) -> io::Result<Vec<Claimed>> {
    let state_of = |dir: &Path| match read_state(dir) {
        Ok(s) => Ok(Some(s)),
        Err(e) if strict => Err(e),
        Err(e) => {
            tracing::warn!(log = %dir.display(), error = %e, "a write-back log whose state cannot be read is left alone");
            Ok(None)
        }
    };
    let mut out = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let dir = e.path();
        // Directories being made by another opener ([`create`]).
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Some(state) = state_of(&dir)? else { continue };
        if !pick(state.as_ref()) {
            continue;
        }
        let lock = match fs::OpenOptions::new().write(true).open(dir.join("lock")) {
            Ok(l) => l,
            // Removed meanwhile by the process that held it, or never
            // finished: nothing to take over.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !flock_nb(&lock)? {
            continue;
        }
        if !dir.join("lock").exists() {
            // Removed between our open and our lock.
            continue;
        }
        let Some(state) = state_of(&dir)? else { continue };
        out.push(Claimed { dir, _lock: lock, state });
    }
    Ok(out)
}

/// Remove, under `dir` (a log directory root: `<dir>/<volume uuid>/...`),
/// the logs no writer will ever take over: those of processes that are
/// gone and that were written on another boot (never replayed: their
/// segments were not fsync'd), or that never got a state. Logs of live
/// processes (locked) and of dead ones of this boot are kept. Returns how
/// many were removed. Without a boot id nothing is removed.
pub fn sweep_other_boots(dir: &Path) -> io::Result<u64> {
    let Some(boot) = boot_id()? else { return Ok(0) };
    let volumes = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for v in volumes {
        let v = v?;
        let name = v.file_name().to_string_lossy().into_owned();
        // Only what the engine names: a volume uuid.
        if !v.file_type()?.is_dir() || !crate::volume::format::is_lower_hex(&name, 32) {
            continue;
        }
        for c in sweep_picks(&v.path(), &boot)? {
            // Its state as read under the lock.
            if of_boot(c.state.as_ref(), &boot) {
                continue;
            }
            let path = c.dir.clone();
            tracing::info!(log = %path.display(), "removing a write-back log of an earlier boot (never replayed)");
            c.discard()?;
            removed += 1;
        }
        // Empty now: gone too (another process may be creating a log in
        // it this instant; then it is not empty and stays).
        let _ = fs::remove_dir(v.path());
    }
    Ok(removed)
}

fn of_boot(state: Option<&LogState>, boot: &str) -> bool {
    state.is_some_and(|s| s.boot.as_deref() == Some(boot))
}

/// The logs under `volume` (one volume's directory) the sweep removes,
/// locked: dead ones of another boot, or without a state. Dead logs of
/// this boot are not even locked: a writer restarting this instant must
/// find its own log free, where it took a log locked by the sweep of
/// another process for a live one and started afresh, and the
/// acknowledged writes in it were then given up.
fn sweep_picks(volume: &Path, boot: &str) -> io::Result<Vec<Claimed>> {
    scan_where(volume, |s| !of_boot(s, boot), false)
}

/// A new, empty log directory under `root`, locked. Made under a hidden
/// name and renamed once locked, so [`scan`] never finds it unlocked.
pub fn create(root: &Path) -> io::Result<Claimed> {
    let name = format!("{:016x}", rand::random::<u64>());
    let tmp = root.join(format!(".{name}"));
    fs::create_dir_all(root)?;
    if let Err(e) = fs::create_dir(&tmp) {
        // A sweep removed the (empty) volume directory in between.
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
        fs::create_dir_all(root)?;
        fs::create_dir(&tmp)?;
    }
    let made = fs::OpenOptions::new().create_new(true).write(true).open(tmp.join("lock")).and_then(|lock| {
        if !flock_nb(&lock)? {
            return Err(io::Error::other(format!("{} is locked by another process", tmp.display())));
        }
        let dir = root.join(&name);
        fs::rename(&tmp, &dir)?;
        Ok(Claimed { dir, _lock: lock, state: None })
    });
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    made
}

impl Claimed {
    /// Replace `state` atomically.
    /// Replace the state: written aside, synced, renamed over the old one
    /// and the directory synced. Segments are never synced (a log of an
    /// earlier boot is never replayed), but the state is, so that after a
    /// power loss it reads whole (old or new) and tells that boot: a state
    /// that does not read refuses the open (see [`scan`]).
    pub fn set_state(&mut self, s: LogState) -> io::Result<()> {
        let tmp = self.dir.join("state.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&s).map_err(io::Error::other)?)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join("state"))?;
        File::open(&self.dir)?.sync_all()?;
        self.state = Some(s);
        Ok(())
    }

    /// Drop every segment (the writes they hold are superseded).
    pub fn clear(&mut self) -> io::Result<()> {
        for n in segments(&self.dir)? {
            fs::remove_file(segment_path(&self.dir, n))?;
        }
        Ok(())
    }

    /// Remove the directory (the lock goes with it). Segments go first,
    /// oldest first, as a flush releases them: a process killed midway
    /// leaves a suffix of the log, whose replay by the next opener of this
    /// boot writes only the newest bytes of what it holds. Removed in
    /// directory order, it could leave an older segment without the newer
    /// ones, and the replay put old bytes over committed ones.
    pub fn discard(mut self) -> io::Result<()> {
        self.clear()?;
        fs::remove_dir_all(&self.dir)
    }

    /// The segments' entries, in order, one segment at a time (`f` gets
    /// each segment's entries). A torn entry at the end of the last
    /// segment (a process killed mid-append: that write was never
    /// acknowledged) is cut off; damage anywhere else is an error.
    pub fn segments(&self) -> io::Result<Vec<u64>> {
        segments(&self.dir)
    }

    /// Check every segment reads back (a torn end of the last one is
    /// cut off), without keeping the entries: replay applies nothing
    /// unless all of it can be applied.
    pub fn check(&self) -> Result<(), LogError> {
        let mut segs = segments(&self.dir)?;
        // Segments at the end that hold no entry are removed first, so the
        // log ends where its last entry does. A writer whose append failed
        // and could not be cut back (`WriteLog::broken`) appends nothing
        // more, but a flush still rotates: died before releasing, it leaves
        // the torn entry followed by empty segments, and that torn entry is
        // the log's real end (never acknowledged), not damage before it.
        while segs.len() > 1 {
            let Some(&n) = segs.last() else { break };
            if !self.read_segment(n, true)?.is_empty() {
                break;
            }
            match fs::remove_file(segment_path(&self.dir, n)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            segs.pop();
        }
        for (i, n) in segs.iter().enumerate() {
            self.read_segment(*n, i + 1 == segs.len())?;
        }
        Ok(())
    }

    /// Read segment `n`. `last`: it is the newest, so a torn tail is cut
    /// off (and the file truncated) rather than refused.
    pub fn read_segment(&self, n: u64, last: bool) -> Result<Vec<Entry>, LogError> {
        Ok(self.read_segment_at(n, last)?.into_iter().map(|(_, e)| e).collect())
    }

    /// [`Claimed::read_segment`], each entry with where its payload
    /// starts in the segment (for [`Claimed::read_payload`]).
    pub fn read_segment_at(&self, n: u64, last: bool) -> Result<Vec<(u64, Entry)>, LogError> {
        let path = segment_path(&self.dir, n);
        let mut buf = Vec::new();
        File::open(&path)?.read_to_end(&mut buf)?;
        let (entries, valid, why) = parse_segment(&buf);
        if valid < buf.len() {
            let (why, torn) = why.unwrap_or_default();
            // A process killed mid-append leaves its last entry short
            // (logs of another boot, where a node crash may have left
            // anything, are never read). Anything else is damage.
            if !last || !torn {
                return Err(LogError::Damaged { path, at: valid as u64, why });
            }
            tracing::warn!(
                log = %path.display(), at = valid, dropped = buf.len() - valid, reason = %why,
                "write-back log ends in a torn entry (the process died while appending it; it was never acknowledged): cut off"
            );
            let f = fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(valid.max(SEGMENT_HEADER).min(buf.len()) as u64)?;
            if valid < SEGMENT_HEADER {
                drop(f);
                fs::remove_file(&path)?;
            }
        }
        Ok(entries)
    }

    /// Read `buf.len()` bytes at `at` in segment `n` (part of a payload
    /// [`Claimed::read_segment_at`] located).
    pub fn read_payload(&self, n: u64, at: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        File::open(segment_path(&self.dir, n))?.read_exact_at(buf, at)
    }

    /// Start appending after the segments already there.
    pub fn into_log(self) -> io::Result<WriteLog> {
        let existing = segments(&self.dir)?;
        let first = existing.first().copied().unwrap_or(1);
        let next = existing.last().map_or(1, |n| n + 1);
        let (seg, len) = new_segment(&self.dir, next)?;
        let bytes = existing
            .iter()
            .map(|n| fs::metadata(segment_path(&self.dir, *n)).map(|m| m.len()).unwrap_or(0))
            .sum::<u64>()
            + len;
        Ok(WriteLog {
            claimed: self,
            seg,
            closed: std::collections::BTreeMap::new(),
            seg_no: next,
            seg_len: len,
            first,
            bytes,
            broken: None,
        })
    }
}

fn new_segment(dir: &Path, n: u64) -> io::Result<(File, u64)> {
    let path = segment_path(dir, n);
    // A file already under this number can only be one whose header write
    // failed (segments past the current one never took an entry): reused.
    let mut f = match fs::OpenOptions::new().create_new(true).read(true).append(true).open(&path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::OpenOptions::new().write(true).truncate(true).open(&path)?;
            fs::OpenOptions::new().read(true).append(true).open(&path)?
        }
        other => other?,
    };
    let mut header = [0u8; SEGMENT_HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    if let Err(e) = f.write_all(&header) {
        // Not left behind: the next attempt at this number must succeed.
        drop(f);
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok((f, SEGMENT_HEADER as u64))
}

/// Entries of a segment's bytes, how many bytes are valid, and why the
/// rest is not, with whether it looks like a torn end (the bad entry is
/// the last thing in the file, or only zeros follow the good ones).
/// What [`parse_segment`] found: each entry with where its payload starts
/// in the file, how many bytes are valid, and why the rest is not (and
/// whether that looks like a torn end).
type Parsed = (Vec<(u64, Entry)>, usize, Option<(String, bool)>);

fn parse_segment(buf: &[u8]) -> Parsed {
    let mut out = Vec::new();
    if buf.len() < SEGMENT_HEADER {
        return (out, 0, Some(("short segment header".into(), true)));
    }
    if &buf[..8] != MAGIC {
        return (out, 0, Some(("not a write-back log segment".into(), false)));
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if version != VERSION {
        return (out, 0, Some((format!("segment version {version}, this build reads {VERSION}"), false)));
    }
    let mut pos = SEGMENT_HEADER;
    // Only a log of this boot is read (see `LogState::boot`), and a
    // process killed mid-append leaves its last entry short; a complete
    // entry that does not check out is damage wherever it is.
    let bad = |_pos: usize, _end: usize, why: String| Some((why, false));
    while pos < buf.len() {
        let rest = &buf[pos..];
        if rest.len() < ENTRY_HEADER {
            return (out, pos, Some(("short entry header".into(), true)));
        }
        let crc = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let kind = rest[4];
        let mut off = [0u8; 8];
        off.copy_from_slice(&rest[5..13]);
        let offset = u64::from_le_bytes(off);
        let len = u32::from_le_bytes([rest[13], rest[14], rest[15], rest[16]]) as usize;
        let payload_len = if kind == KIND_WRITE { len } else { 0 };
        let end = pos + ENTRY_HEADER + payload_len;
        if payload_len > MAX_PAYLOAD {
            return (out, pos, bad(pos, buf.len(), format!("entry of {len} bytes")));
        }
        if rest.len() < ENTRY_HEADER + payload_len {
            return (out, pos, Some(("short entry".into(), true)));
        }
        let payload = &rest[ENTRY_HEADER..ENTRY_HEADER + payload_len];
        if crc32c::crc32c_append(crc32c::crc32c(&rest[4..ENTRY_HEADER]), payload) != crc {
            return (out, pos, bad(pos, end, "checksum mismatch".into()));
        }
        let at = (pos + ENTRY_HEADER) as u64;
        out.push(match kind {
            KIND_WRITE => (at, Entry::Write { offset, data: payload.to_vec() }),
            KIND_ZERO => (at, Entry::Zero { offset, len: len as u64 }),
            KIND_SIZE => (at, Entry::Size(offset)),
            k => return (out, pos, bad(pos, end, format!("unknown entry kind {k}"))),
        });
        pos = end;
    }
    (out, pos, None)
}

/// Where an appended write's bytes are: segment, and offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub seg: u64,
    pub at: u64,
}

/// The open log of a writer.
#[derive(Debug)]
pub struct WriteLog {
    claimed: Claimed,
    seg: File,
    /// Closed segments still on disk, open for reading the dirty pages
    /// whose only copy they hold.
    closed: std::collections::BTreeMap<u64, File>,
    seg_no: u64,
    seg_len: u64,
    /// Oldest segment still on disk.
    first: u64,
    /// Bytes of every segment on disk.
    bytes: u64,
    /// Set when an append failed and could not be cut back: the segment
    /// (the number) holds a torn entry, which replay would refuse once a
    /// later segment exists. Nothing is appended until a flush committed
    /// everything and released that segment.
    broken: Option<(u64, String)>,
}

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
    Size(u64),
}

impl WriteLog {
    pub fn dir(&self) -> &Path {
        &self.claimed.dir
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Append one entry to the page cache; returns where its payload
    /// begins. On an error the segment is cut back to before it, so a
    /// later append never follows a torn entry.
    pub fn append(&mut self, r: Record<'_>) -> io::Result<Pos> {
        if let Some((_, why)) = &self.broken {
            return Err(io::Error::other(format!(
                "the write-back log takes no writes until the next flush, after an earlier error: {why}"
            )));
        }
        if self.seg_len >= SEGMENT_BYTES {
            self.next_segment()?;
        }
        let (kind, offset, len, payload): (u8, u64, u32, &[u8]) = match r {
            Record::Write { offset, data } => (KIND_WRITE, offset, data.len() as u32, data),
            Record::Zero { offset, len } => (KIND_ZERO, offset, len as u32, &[]),
            Record::Size(size) => (KIND_SIZE, size, 0, &[]),
        };
        let mut header = [0u8; ENTRY_HEADER];
        header[4] = kind;
        header[5..13].copy_from_slice(&offset.to_le_bytes());
        header[13..17].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[4..]), payload);
        header[..4].copy_from_slice(&crc.to_le_bytes());
        let r = if payload.len() <= 64 << 10 {
            let mut one = Vec::with_capacity(ENTRY_HEADER + payload.len());
            one.extend_from_slice(&header);
            one.extend_from_slice(payload);
            self.seg.write_all(&one)
        } else {
            self.seg.write_all(&header).and_then(|()| self.seg.write_all(payload))
        };
        match r {
            Ok(()) => {
                let pos = Pos { seg: self.seg_no, at: self.seg_len + ENTRY_HEADER as u64 };
                let n = (ENTRY_HEADER + payload.len()) as u64;
                self.seg_len += n;
                self.bytes += n;
                Ok(pos)
            }
            Err(e) => {
                if let Err(undo) = self.seg.set_len(self.seg_len) {
                    self.broken = Some((self.seg_no, format!("{e}; cutting the torn entry off failed: {undo}")));
                }
                Err(e)
            }
        }
    }

    /// Read `buf.len()` bytes appended at `pos`.
    pub fn read_at(&self, pos: Pos, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = match pos.seg == self.seg_no {
            true => &self.seg,
            false => self.closed.get(&pos.seg).ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("write-back log segment {} was released", pos.seg))
            })?,
        };
        f.read_exact_at(buf, pos.at)
    }

    /// Whether segment `n` is on disk (not released).
    pub fn holds(&self, n: u64) -> bool {
        n == self.seg_no || self.closed.contains_key(&n)
    }

    fn next_segment(&mut self) -> io::Result<()> {
        let (seg, len) = new_segment(&self.claimed.dir, self.seg_no + 1)?;
        let old = std::mem::replace(&mut self.seg, seg);
        self.closed.insert(self.seg_no, old);
        self.seg_no += 1;
        self.seg_len = len;
        self.bytes += len;
        Ok(())
    }

    /// Close the current segment (when it holds entries) and begin a new
    /// one; returns the newest segment every entry so far is in.
    pub fn rotate(&mut self) -> io::Result<u64> {
        if self.seg_len > SEGMENT_HEADER as u64 || self.broken.is_some() {
            self.next_segment()?;
        }
        Ok(self.seg_no - 1)
    }

    /// The newest closed segment still here (every segment before the
    /// current one), if any.
    pub fn last_closed(&self) -> Option<u64> {
        (self.seg_no > self.first).then(|| self.seg_no - 1)
    }

    /// Where the next entry goes: the current segment and its length.
    pub fn position(&self) -> (u64, u64) {
        (self.seg_no, self.seg_len)
    }

    /// Empty the current segment, when it is still `seg` and nothing was
    /// appended since it was `len` long (its entries are committed): where
    /// a new segment cannot be started (the disk full), the space its
    /// entries took comes back. True when emptied.
    pub fn empty_current(&mut self, seg: u64, len: u64) -> io::Result<bool> {
        if (self.seg_no, self.seg_len) != (seg, len) || len <= SEGMENT_HEADER as u64 {
            return Ok(false);
        }
        self.seg.set_len(SEGMENT_HEADER as u64)?;
        self.bytes = self.bytes.saturating_sub(len - SEGMENT_HEADER as u64);
        self.seg_len = SEGMENT_HEADER as u64;
        if self.broken.as_ref().is_some_and(|(n, _)| *n == seg) {
            tracing::info!(log = %self.claimed.dir.display(), "the write-back log takes writes again");
            self.broken = None;
        }
        Ok(true)
    }

    /// Delete segments up to `upto` (their writes are committed).
    pub fn release(&mut self, upto: u64) {
        while self.first <= upto && self.first < self.seg_no {
            let path = segment_path(&self.claimed.dir, self.first);
            match fs::metadata(&path).and_then(|m| fs::remove_file(&path).map(|()| m.len())) {
                Ok(len) => {
                    self.bytes = self.bytes.saturating_sub(len);
                    self.closed.remove(&self.first);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.closed.remove(&self.first);
                }
                Err(e) => {
                    tracing::warn!(log = %path.display(), error = %e, "removing a committed write-back log segment failed");
                    return;
                }
            }
            self.first += 1;
        }
        if self.broken.as_ref().is_some_and(|(n, _)| *n < self.first) {
            tracing::info!(log = %self.claimed.dir.display(), "the write-back log takes writes again");
            self.broken = None;
        }
    }

    /// Remove the whole directory: every write is committed, or the
    /// writer was fenced and its writes must never be applied.
    pub fn discard(self) {
        let dir = self.claimed.dir.clone();
        drop(self.seg);
        if let Err(e) = self.claimed.discard() {
            tracing::warn!(log = %dir.display(), error = %e, "removing the write-back log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(records: &[Record<'_>]) -> (Claimed, Vec<Entry>) {
        let root = tempfile::tempdir().expect("tempdir").keep();
        let c = create(&root).expect("create");
        let mut log = c.into_log().expect("log");
        for r in records {
            log.append(*r).expect("append");
        }
        let dir = log.dir().to_path_buf();
        drop(log);
        let mut found = scan(&root).expect("scan");
        assert_eq!(found.len(), 1);
        let c = found.remove(0);
        assert_eq!(c.dir, dir);
        let segs = c.segments().expect("segments");
        let mut all = Vec::new();
        for (i, n) in segs.iter().enumerate() {
            all.extend(c.read_segment(*n, i + 1 == segs.len()).expect("read"));
        }
        (c, all)
    }

    #[test]
    fn entries_come_back_in_order() {
        let data = vec![7u8; 100_000];
        let (_c, got) = roundtrip(&[
            Record::Write { offset: 4096, data: b"abc" },
            Record::Zero { offset: 1 << 20, len: 65536 },
            Record::Size(1 << 30),
            Record::Write { offset: 0, data: &data },
        ]);
        assert_eq!(
            got,
            vec![
                Entry::Write { offset: 4096, data: b"abc".to_vec() },
                Entry::Zero { offset: 1 << 20, len: 65536 },
                Entry::Size(1 << 30),
                Entry::Write { offset: 0, data },
            ]
        );
    }

    /// Logs of another boot (and logs that never got a state) go; dead
    /// logs of this boot and live ones stay; other names are left alone.
    #[test]
    fn the_sweep_removes_only_logs_no_writer_will_take_over() {
        let Some(boot) = boot_id().expect("boot id") else { return };
        let root = tempfile::tempdir().expect("tempdir");
        let uuid = |c: char| std::iter::repeat_n(c, 32).collect::<String>();
        let state = |boot: Option<String>| LogState { volume: uuid('a'), epoch: 3, next_writer: None, boot, at: None };
        let mut old = create(&root.path().join(uuid('a'))).expect("create");
        old.set_state(state(Some("an-earlier-boot".into()))).expect("state");
        let old_dir = old.dir.clone();
        drop(old);
        let mut dead = create(&root.path().join(uuid('a'))).expect("create");
        dead.set_state(state(Some(boot.clone()))).expect("state");
        let dead_dir = dead.dir.clone();
        drop(dead);
        let stateless = create(&root.path().join(uuid('b'))).expect("create");
        let stateless_dir = stateless.dir.clone();
        drop(stateless);
        let mut live = create(&root.path().join(uuid('c'))).expect("create");
        live.set_state(state(Some("an-earlier-boot".into()))).expect("state");
        let live = live.into_log().expect("log");
        std::fs::create_dir_all(root.path().join("not-a-uuid/x")).expect("mkdir");
        assert_eq!(sweep_other_boots(root.path()).expect("sweep"), 2);
        assert!(!old_dir.exists() && !stateless_dir.exists());
        assert!(!root.path().join(uuid('b')).exists(), "an emptied volume directory stays");
        assert!(dead_dir.exists(), "a dead log of this boot was removed");
        assert!(live.dir().exists(), "a live log was removed");
        assert!(root.path().join("not-a-uuid/x").exists());
        assert_eq!(sweep_other_boots(&root.path().join("missing")).expect("sweep"), 0);
    }

    /// While a sweep (of another process, restarting beside this one)
    /// holds what it removes, a dead log of this boot is still free for
    /// the writer restarting on its volume.
    #[test]
    fn a_sweep_never_holds_a_log_a_restarting_writer_takes_over() {
        let Some(boot) = boot_id().expect("boot id") else { return };
        let root = tempfile::tempdir().expect("tempdir");
        let state = |boot: Option<String>| LogState { volume: "v".into(), epoch: 3, next_writer: None, boot, at: None };
        let mut old = create(root.path()).expect("create");
        old.set_state(state(Some("an-earlier-boot".into()))).expect("state");
        drop(old);
        let mut ours = create(root.path()).expect("create");
        ours.set_state(state(Some(boot.clone()))).expect("state");
        let ours_dir = ours.dir.clone();
        drop(ours);
        let held = sweep_picks(root.path(), &boot).expect("sweep");
        assert_eq!(held.len(), 1, "the other boot's log");
        let found = scan(root.path()).expect("scan");
        assert_eq!(
            found.iter().map(|c| c.dir.clone()).collect::<Vec<_>>(),
            vec![ours_dir],
            "a dead log of this boot was held by the sweep"
        );
    }

    #[test]
    fn a_live_log_is_not_found_by_scan_and_a_dead_one_is() {
        let root = tempfile::tempdir().expect("tempdir");
        let log = create(root.path()).expect("create").into_log().expect("log");
        assert!(scan(root.path()).expect("scan").is_empty(), "a log whose lock is held was offered");
        drop(log);
        assert_eq!(scan(root.path()).expect("scan").len(), 1);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_damage_before_it_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = create(root.path()).expect("create").into_log().expect("log");
        log.append(Record::Write { offset: 0, data: b"one" }).expect("append");
        let closed = log.rotate().expect("rotate");
        log.append(Record::Write { offset: 8, data: b"two" }).expect("append");
        log.append(Record::Write { offset: 16, data: b"three" }).expect("append");
        let dir = log.dir().to_path_buf();
        drop(log);
        // Tear the newest entry: a process killed mid-append.
        let last = segment_path(&dir, closed + 1);
        let len = fs::metadata(&last).expect("meta").len();
        fs::OpenOptions::new().write(true).open(&last).expect("open").set_len(len - 2).expect("truncate");
        let c = scan(root.path()).expect("scan").remove(0);
        assert_eq!(
            c.read_segment(closed, false).expect("first"),
            vec![Entry::Write { offset: 0, data: b"one".to_vec() }]
        );
        assert_eq!(
            c.read_segment(closed + 1, true).expect("last"),
            vec![Entry::Write { offset: 8, data: b"two".to_vec() }]
        );
        // The torn bytes are gone from the file: appends after it are readable.
        let mut log = c.into_log().expect("log");
        log.append(Record::Size(5)).expect("append");
        drop(log);
        let c = scan(root.path()).expect("scan").remove(0);
        assert_eq!(
            c.read_segment(closed + 1, false).expect("not last now"),
            vec![Entry::Write { offset: 8, data: b"two".to_vec() }]
        );
        // A flipped bit in a closed segment is damage, not a torn tail.
        let first = segment_path(&dir, closed);
        let mut b = fs::read(&first).expect("read");
        let at = b.len() - 1;
        b[at] ^= 1;
        fs::write(&first, b).expect("write");
        match c.read_segment(closed, false) {
            Err(LogError::Damaged { why, .. }) => assert!(why.contains("checksum"), "{why}"),
            other => panic!("damage not reported: {other:?}"),
        }
    }

    #[test]
    fn a_bad_entry_with_good_ones_after_it_is_damage_even_in_the_last_segment() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = create(root.path()).expect("create").into_log().expect("log");
        log.append(Record::Write { offset: 0, data: b"one" }).expect("append");
        log.append(Record::Write { offset: 8, data: b"two" }).expect("append");
        let n = log.rotate().expect("rotate");
        let dir = log.dir().to_path_buf();
        drop(log);
        let path = segment_path(&dir, n);
        let mut b = fs::read(&path).expect("read");
        // The first entry's payload.
        b[SEGMENT_HEADER + ENTRY_HEADER] ^= 0x40;
        fs::write(&path, &b).expect("write");
        let c = scan(root.path()).expect("scan").remove(0);
        assert!(matches!(c.read_segment(n, true), Err(LogError::Damaged { .. })), "silently cut at a damaged entry");
        // Zeros after the good entries are damage too (a node crash can
        // leave them, and logs of another boot are never read).
        let mut b = fs::read(&path).expect("read");
        b[SEGMENT_HEADER + ENTRY_HEADER] ^= 0x40;
        b.extend_from_slice(&[0u8; 4096]);
        fs::write(&path, &b).expect("write");
        assert!(matches!(c.read_segment(n, true), Err(LogError::Damaged { .. })));
        // A short last entry is a torn end: cut off.
        b.truncate(b.len() - 4096 - 1);
        fs::write(&path, &b).expect("write");
        assert_eq!(c.read_segment(n, true).expect("torn").len(), 1);
    }

    #[test]
    fn a_segment_left_by_a_failed_header_write_does_not_block_rotation() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut l = create(root.path()).expect("create").into_log().expect("log");
        l.append(Record::Write { offset: 0, data: b"a" }).expect("append");
        let next = segment_path(l.dir(), l.seg_no + 1);
        // What a header write that failed (ENOSPC) after the create leaves.
        fs::write(&next, b"S3B").expect("leftover");
        let closed = l.rotate().expect("rotation is stuck behind a leftover segment");
        l.append(Record::Write { offset: 1, data: b"b" }).expect("append");
        drop(l);
        let c = scan(root.path()).expect("scan").remove(0);
        assert_eq!(
            c.read_segment(closed + 1, true).expect("read"),
            vec![Entry::Write { offset: 1, data: b"b".to_vec() }]
        );
    }

    #[test]
    fn release_deletes_closed_segments_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = create(root.path()).expect("create").into_log().expect("log");
        log.append(Record::Write { offset: 0, data: b"a" }).expect("append");
        let closed = log.rotate().expect("rotate");
        log.append(Record::Write { offset: 1, data: b"b" }).expect("append");
        log.release(closed);
        let dir = log.dir().to_path_buf();
        assert_eq!(segments(&dir).expect("segments"), vec![closed + 1]);
        // Nothing new since: rotating keeps the same segment.
        let again = log.rotate().expect("rotate");
        assert_eq!(again, closed + 1);
        log.release(again);
        assert_eq!(segments(&dir).expect("segments"), vec![closed + 2]);
        assert_eq!(log.bytes(), SEGMENT_HEADER as u64);
        log.discard();
        assert!(!dir.exists());
    }
}
