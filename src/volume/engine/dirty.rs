//! Pure parts of the write path: splitting requests into per-chunk pieces,
//! zero detection, and the dirty state of one chunk. No I/O, no locks.

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::log::{Pos, WriteLog};

/// A piece of a request that falls in one chunk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub index: u64,
    /// Offset inside the chunk.
    pub at: usize,
    pub len: usize,
    /// Offset inside the request buffer.
    pub pos: usize,
}

pub(super) fn pieces(offset: u64, len: u64, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut cur = offset;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let index = cur / chunk_size;
        let at = cur % chunk_size;
        let n = (chunk_size - at).min(end - cur);
        let p = Piece { index, at: at as usize, len: n as usize, pos: (cur - offset) as usize };
        cur += n;
        Some(p)
    })
}

/// True when every byte is zero. Works in 4 KiB blocks of 16-byte words
/// so data that is not zero is rejected after its first block.
pub fn is_zero(buf: &[u8]) -> bool {
    // Data that is not zero nearly always says so in its first bytes.
    if buf.iter().take(16).any(|&b| b != 0) {
        return false;
    }
    buf.chunks(4096).all(|block| {
        let words = block.chunks_exact(16);
        let tail = words.remainder();
        let acc = words.fold(0u128, |acc, w| {
            let mut a = [0u8; 16];
            a.copy_from_slice(w);
            acc | u128::from_ne_bytes(a)
        });
        acc == 0 && tail.iter().all(|&b| b == 0)
    })
}

/// The bytes a dirty chunk holds.
///
/// Whole-chunk buffers are shared (`Arc`) so an upload can send them without
/// a copy while the slot keeps them: a write that lands during the upload
/// copies the buffer first ([`Arc::make_mut`]), so the bytes on the wire
/// never change under the upload and the slot never loses its data, however
/// the upload ends (success, error, or its future dropped).
#[derive(Debug)]
pub(super) enum DirtyData {
    Zero,
    Data(Arc<Vec<u8>>),
    /// Whole pages written over bytes that were never read: the chunk's
    /// stored bytes are fetched only when it is uploaded, or when a read
    /// needs a page that is not here. A small random write to a chunk that
    /// is not cached therefore waits for no download.
    Pages(PageBuf),
}

/// The unit of [`DirtyData::Pages`].
pub(super) const PAGE: usize = 4096;

/// Where a written page's bytes are.
#[derive(Debug)]
enum Page {
    Zero,
    Mem(Box<[u8; PAGE]>),
    /// In the write-back log only (the entry that wrote it).
    Log(Pos),
}

/// Dirty budget bytes of a page whose bytes are not in memory (zeros, or
/// in the write-back log): its entry here, with its share of the map's
/// nodes (which may be half full).
pub(super) const LOGGED_PAGE: u64 = 128;

/// Dirty budget bytes a slot of pages takes besides its pages: the slot,
/// its entry among the slots, its page map's first node, its budget
/// guard, and its bitmap of touched pages (a bit a page). A chunk dirty by
/// one page in the log takes about ten times that page's entry.
pub(super) fn slot_overhead(chunk_size: u64) -> u64 {
    1024 + chunk_size / PAGE as u64 / 8
}

impl Page {
    fn charge(&self) -> u64 {
        match self {
            Page::Mem(_) => PAGE as u64,
            _ => LOGGED_PAGE,
        }
    }
}

/// The write-back log a slot's pages may be in.
pub(super) type LogRef<'a> = Option<&'a WriteLog>;

fn read_log(log: LogRef<'_>, pos: Pos, out: &mut [u8]) -> io::Result<()> {
    match log {
        Some(l) => l.read_at(pos, out),
        None => Err(io::Error::new(io::ErrorKind::NotFound, "the write-back log holding a dirty page is gone")),
    }
}

/// The pages written to a chunk over bytes that were never read, by page
/// number. Only written pages take memory, and a page the write-back log
/// holds takes none but its entry here: the dirty budget counts them one
/// by one ([`LOGGED_PAGE`], or 4 KiB for a page held in memory), over
/// what the slot itself takes ([`slot_overhead`]).
#[derive(Debug)]
pub(super) struct PageBuf {
    pages: std::collections::BTreeMap<usize, Page>,
    /// Pages in the chunk.
    total: usize,
    /// The budget bytes the pages (and the slot) take.
    charge: u64,
}

impl PageBuf {
    pub fn new(chunk_size: u64) -> Self {
        Self {
            pages: std::collections::BTreeMap::new(),
            total: chunk_size as usize / PAGE,
            charge: slot_overhead(chunk_size),
        }
    }

    /// What [`PageBuf::write`] of whole pages `[at, at + len)` would make
    /// the charge at most (`logged`: the bytes go to the log).
    pub fn charge_after(&self, at: usize, len: usize, logged: bool) -> u64 {
        let each = if logged { LOGGED_PAGE } else { PAGE as u64 };
        let delta: i64 = (at / PAGE..(at + len) / PAGE)
            .map(|page| each as i64 - self.pages.get(&page).map_or(0, |p| p.charge() as i64))
            .sum();
        (self.charge as i64 + delta).max(0) as u64
    }

    /// Write whole pages at `at` (`None` = zeros); `logged`: where the
    /// write-back log took the bytes (then memory keeps none).
    fn write(&mut self, at: usize, len: usize, data: Option<&[u8]>, logged: Option<Pos>) {
        for (i, page) in (at / PAGE..(at + len) / PAGE).enumerate() {
            let bytes = data.map(|d| &d[i * PAGE..(i + 1) * PAGE]).filter(|b| !is_zero(b));
            let new = match (bytes, logged) {
                (None, _) => Page::Zero,
                (Some(_), Some(pos)) => Page::Log(Pos { seg: pos.seg, at: pos.at + (i * PAGE) as u64 }),
                (Some(b), None) => {
                    let mut buf = Box::new([0u8; PAGE]);
                    buf.copy_from_slice(b);
                    Page::Mem(buf)
                }
            };
            self.charge += new.charge();
            if let Some(old) = self.pages.insert(page, new) {
                self.charge -= old.charge();
            }
        }
    }

    fn full(&self) -> bool {
        self.pages.len() == self.total
    }

    /// The piece's bytes when written pages cover all of it.
    pub fn covered(&self, p: Piece, log: LogRef<'_>) -> io::Result<Option<Bytes>> {
        let first = p.at / PAGE;
        let last = (p.at + p.len).div_ceil(PAGE);
        if (first..last).any(|page| !self.pages.contains_key(&page)) {
            return Ok(None);
        }
        let mut out = vec![0u8; p.len];
        self.lay(p.at, &mut out, log)?;
        Ok(Some(Bytes::from(out)))
    }

    /// Lay the written pages that fall in `[at, at + out.len())` of the
    /// chunk over `out`.
    fn lay(&self, at: usize, out: &mut [u8], log: LogRef<'_>) -> io::Result<()> {
        let end = at + out.len();
        for (&page, bytes) in self.pages.range(at / PAGE..end.div_ceil(PAGE)) {
            let (s, e) = ((page * PAGE).max(at), ((page + 1) * PAGE).min(end));
            let dst = &mut out[s - at..e - at];
            match bytes {
                Page::Mem(b) => dst.copy_from_slice(&b[s - page * PAGE..e - page * PAGE]),
                Page::Zero => dst.fill(0),
                Page::Log(pos) => read_log(log, Pos { seg: pos.seg, at: pos.at + (s - page * PAGE) as u64 }, dst)?,
            }
        }
        Ok(())
    }

    /// Bytes `[at, at + len)` of the chunk: the written pages over `base`
    /// (`None` = zeros), leaving the pages as they are.
    pub fn over(&self, base: Option<&[u8]>, at: usize, len: usize, log: LogRef<'_>) -> io::Result<Vec<u8>> {
        let mut out = match base {
            Some(b) => b[at..at + len].to_vec(),
            None => vec![0u8; len],
        };
        self.lay(at, &mut out, log)?;
        Ok(out)
    }

    /// Bring the pages of log segments up to `upto` into memory (those
    /// segments are about to go); returns the charge added, also when a
    /// page could not be read (those before it are in memory).
    fn load(&mut self, upto: u64, log: LogRef<'_>) -> (u64, io::Result<()>) {
        let before = self.charge;
        for page in self.pages.values_mut() {
            if let Page::Log(pos) = page
                && pos.seg <= upto
            {
                let mut buf = Box::new([0u8; PAGE]);
                if let Err(e) = read_log(log, *pos, &mut buf[..]) {
                    return (self.charge - before, Err(e));
                }
                self.charge += PAGE as u64 - LOGGED_PAGE;
                *page = Page::Mem(buf);
            }
        }
        (self.charge - before, Ok(()))
    }
}

impl DirtyData {
    /// Turn pages over an unread base into the whole chunk, given the
    /// base. On an error (reading the log) nothing changes.
    pub fn materialize(&mut self, base: Option<&[u8]>, log: LogRef<'_>) -> io::Result<()> {
        if let DirtyData::Pages(pb) = self {
            let v = pb.over(base, 0, pb.total * PAGE, log)?;
            *self = DirtyData::Data(Arc::new(v));
        }
        Ok(())
    }

    /// Pages over an unread base that cover the whole chunk: the base does
    /// not matter.
    pub fn full_pages(&self) -> bool {
        matches!(self, DirtyData::Pages(pb) if pb.full())
    }

    /// Bring pages the log holds in segments up to `upto` into memory;
    /// returns the budget bytes that takes, also when one could not be
    /// read (the error).
    pub fn load_logged(&mut self, upto: u64, log: LogRef<'_>) -> (u64, io::Result<()>) {
        match self {
            DirtyData::Pages(pb) => pb.load(upto, log),
            _ => (0, Ok(())),
        }
    }

    /// The bytes of a piece, when this slot alone knows them (`Some(None)`
    /// = zeros); `None` when pages over an unread base do not cover it.
    pub fn piece(&self, p: Piece, log: LogRef<'_>) -> io::Result<Option<Option<Bytes>>> {
        Ok(match self {
            DirtyData::Zero => Some(None),
            DirtyData::Data(v) => Some(Some(Bytes::copy_from_slice(&v[p.at..p.at + p.len]))),
            DirtyData::Pages(pb) => pb.covered(p, log)?.map(Some),
        })
    }

    /// One whole page for an inline commit (`Some(None)`: zeros); `None`
    /// when pages over an unread base do not hold it.
    pub fn page(&self, page: usize, log: LogRef<'_>) -> io::Result<Option<Option<Bytes>>> {
        Ok(match self.piece(Piece { index: 0, at: page * PAGE, len: PAGE, pos: 0 }, log)? {
            None => None,
            Some(Some(b)) if !is_zero(&b) => Some(Some(b)),
            Some(_) => Some(None),
        })
    }

    /// Apply a write (`None` = zeros); `logged`: where the write-back log
    /// took its bytes. False, with nothing changed, when the slot holds
    /// pages over an unread base and the write is not whole pages: the
    /// caller must read the base first.
    pub fn apply(&mut self, p: Piece, data: Option<&[u8]>, chunk_size: u64, logged: Option<Pos>) -> bool {
        if p.len as u64 == chunk_size {
            *self = match data {
                None => DirtyData::Zero,
                Some(d) => DirtyData::Data(Arc::new(d.to_vec())),
            };
            return true;
        }
        match (&mut *self, data) {
            (DirtyData::Zero, None) => {}
            (DirtyData::Data(v), None) => Arc::make_mut(v)[p.at..p.at + p.len].fill(0),
            (DirtyData::Zero, Some(d)) => {
                let mut v = vec![0u8; chunk_size as usize];
                v[p.at..p.at + p.len].copy_from_slice(d);
                *self = DirtyData::Data(Arc::new(v));
            }
            (DirtyData::Data(v), Some(d)) => Arc::make_mut(v)[p.at..p.at + p.len].copy_from_slice(d),
            (DirtyData::Pages(pb), data) => {
                if !p.at.is_multiple_of(PAGE) || !p.len.is_multiple_of(PAGE) {
                    return false;
                }
                pb.write(p.at, p.len, data, logged);
            }
        }
        true
    }

    /// Whether writing piece `p` needs the chunk's stored bytes first
    /// (pages over an unread base, and a write that is not whole pages).
    pub fn needs_base(&self, p: Piece, chunk_size: u64) -> bool {
        matches!(self, DirtyData::Pages(_))
            && p.len as u64 != chunk_size
            && !(p.at.is_multiple_of(PAGE) && p.len.is_multiple_of(PAGE))
    }

    /// The dirty budget bytes this data holds, at most, after writing
    /// piece `p` (`logged`: the write-back log takes its bytes): its
    /// written pages, or the whole chunk.
    pub fn charge_after(&self, p: Piece, chunk_size: u64, logged: bool) -> u64 {
        match self {
            DirtyData::Pages(pb)
                if p.len as u64 != chunk_size && p.at.is_multiple_of(PAGE) && p.len.is_multiple_of(PAGE) =>
            {
                pb.charge_after(p.at, p.len, logged)
            }
            _ => chunk_size,
        }
    }

    /// What an upload sends: `None` for zeros (no object), else the bytes,
    /// shared with the slot. Pages must be materialized first.
    pub fn upload_bytes(&self) -> Option<Option<Bytes>> {
        match self {
            DirtyData::Zero => Some(None),
            DirtyData::Data(v) if is_zero(v) => Some(None),
            DirtyData::Data(v) => Some(Some(Bytes::from_owner(SharedBuf(v.clone())))),
            DirtyData::Pages(_) => None,
        }
    }
}

/// A dirty buffer lent to an upload without a copy.
struct SharedBuf(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let v: Vec<(u64, usize, usize, usize)> = pieces(100, 300, 128).map(|p| (p.index, p.at, p.len, p.pos)).collect();
        assert_eq!(v, vec![(0, 100, 28, 0), (1, 0, 128, 28), (2, 0, 128, 156), (3, 0, 16, 284)]);
        assert_eq!(pieces(0, 0, 128).count(), 0);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn a_write_during_an_upload_copies_and_never_changes_the_bytes_on_the_wire() {
        let cs = 8192u64;
        let mut d = DirtyData::Zero;
        let p = Piece { index: 0, at: 0, len: 8192, pos: 0 };
        assert!(d.apply(p, Some(&[7u8; 8192]), cs, None));
        let Some(Some(sent)) = d.upload_bytes() else { panic!("expected bytes") };
        let q = Piece { index: 0, at: 10, len: 1, pos: 0 };
        assert!(d.apply(q, Some(&[9u8]), cs, None));
        assert_eq!(sent[10], 7, "the upload's bytes changed under it");
        assert_eq!(d.piece(q, None).expect("piece"), Some(Some(Bytes::from_static(&[9u8]))));
    }

    #[test]
    fn pages_cover_only_written_pages_and_merge_over_a_base() {
        let cs = 4 * PAGE as u64;
        let mut d = DirtyData::Pages(PageBuf::new(cs));
        let p = Piece { index: 0, at: PAGE, len: PAGE, pos: 0 };
        assert!(d.apply(p, Some(&[1u8; PAGE]), cs, None));
        assert!(d.piece(Piece { index: 0, at: 0, len: 10, pos: 0 }, None).expect("piece").is_none());
        assert!(!d.apply(Piece { index: 0, at: 5, len: 10, pos: 0 }, Some(&[2u8; 10]), cs, None));
        assert!(d.upload_bytes().is_none(), "pages must be merged before an upload");
        d.materialize(Some(&[3u8; 4 * PAGE]), None).expect("merge");
        let Some(Some(b)) = d.upload_bytes() else { panic!("expected bytes") };
        assert_eq!((b[0], b[PAGE], b[2 * PAGE]), (3, 1, 3));
    }

    /// Pages whose bytes the write-back log took are read back from it,
    /// cost only their entry in the budget, and come into memory (at a
    /// page's cost) before their segment goes.
    #[test]
    fn logged_pages_are_read_from_the_log_and_loaded_before_their_segment_goes() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = super::super::log::create(root.path()).expect("create").into_log().expect("log");
        let cs = 4 * PAGE as u64;
        let mut pb = PageBuf::new(cs);
        let mut two = vec![5u8; 2 * PAGE];
        two[PAGE..].fill(6);
        let at = log.append(super::super::log::Record::Write { offset: PAGE as u64, data: &two }).expect("append");
        assert_eq!(pb.charge_after(PAGE, 2 * PAGE, true), slot_overhead(cs) + 2 * LOGGED_PAGE);
        pb.write(PAGE, 2 * PAGE, Some(&two), Some(at));
        // A zero page costs its entry, logged or not.
        pb.write(3 * PAGE, PAGE, Some(&[0u8; PAGE]), None);
        assert_eq!(pb.charge, slot_overhead(cs) + 3 * LOGGED_PAGE);
        let got = pb.over(Some(&[9u8; 4 * PAGE]), 0, 4 * PAGE, Some(&log)).expect("over");
        assert_eq!((got[0], got[PAGE], got[2 * PAGE], got[3 * PAGE]), (9, 5, 6, 0));
        let p = Piece { index: 0, at: PAGE + 100, len: PAGE, pos: 0 };
        let b = pb.covered(p, Some(&log)).expect("read").expect("covered");
        assert_eq!((b[0], b[PAGE - 101], b[PAGE - 100]), (5, 5, 6));
        assert!(pb.covered(p, None).is_err(), "no log: an error, never zeros");
        // The segment is released after a flush: its pages come in first.
        let seg = log.rotate().expect("rotate");
        let (added, r) = pb.load(seg, Some(&log));
        r.expect("load");
        assert_eq!(added, 2 * (PAGE as u64 - LOGGED_PAGE));
        log.release(seg);
        assert!(!log.holds(seg));
        let again = pb.over(None, 0, 4 * PAGE, None).expect("in memory now");
        assert_eq!(again, got.iter().enumerate().map(|(i, b)| if i < PAGE { 0 } else { *b }).collect::<Vec<u8>>());
    }
}
