//! Pure parts of the write path: splitting requests into per-chunk pieces,
//! zero detection, and the dirty state of one chunk. No I/O, no locks.

use std::sync::Arc;

use bytes::Bytes;

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

/// One written page (`None`: zeros).
type Page = Option<Box<[u8; PAGE]>>;

/// The pages written to a chunk over bytes that were never read, by page
/// number. Only written pages take memory (a chunk with one page written
/// holds 4 KiB, not the chunk), so the dirty budget counts them one by one.
#[derive(Debug)]
pub(super) struct PageBuf {
    pages: std::collections::BTreeMap<usize, Page>,
    /// Pages in the chunk.
    total: usize,
}

impl PageBuf {
    pub fn new(chunk_size: u64) -> Self {
        Self { pages: std::collections::BTreeMap::new(), total: chunk_size as usize / PAGE }
    }

    /// Pages written.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Pages of `[at, at + len)` (whole pages) not written yet.
    pub fn new_pages(&self, at: usize, len: usize) -> usize {
        (at / PAGE..(at + len) / PAGE).filter(|page| !self.pages.contains_key(page)).count()
    }

    /// Write whole pages at `at` (`None` = zeros).
    fn write(&mut self, at: usize, len: usize, data: Option<&[u8]>) {
        for (i, page) in (at / PAGE..(at + len) / PAGE).enumerate() {
            let bytes = data.map(|d| &d[i * PAGE..(i + 1) * PAGE]).filter(|b| !is_zero(b));
            let entry = self.pages.entry(page).or_insert(None);
            match (entry, bytes) {
                (Some(buf), Some(b)) => buf.copy_from_slice(b),
                (e, b) => {
                    *e = b.map(|b| {
                        let mut buf = Box::new([0u8; PAGE]);
                        buf.copy_from_slice(b);
                        buf
                    })
                }
            }
        }
    }

    fn full(&self) -> bool {
        self.pages.len() == self.total
    }

    /// The piece's bytes when written pages cover all of it.
    pub fn covered(&self, p: Piece) -> Option<Bytes> {
        let first = p.at / PAGE;
        let last = (p.at + p.len).div_ceil(PAGE);
        if (first..last).any(|page| !self.pages.contains_key(&page)) {
            return None;
        }
        let mut out = vec![0u8; p.len];
        self.lay(p.at, &mut out);
        Some(Bytes::from(out))
    }

    /// Lay the written pages that fall in `[at, at + out.len())` of the
    /// chunk over `out`.
    fn lay(&self, at: usize, out: &mut [u8]) {
        let end = at + out.len();
        for (&page, bytes) in self.pages.range(at / PAGE..end.div_ceil(PAGE)) {
            let (s, e) = ((page * PAGE).max(at), ((page + 1) * PAGE).min(end));
            let dst = &mut out[s - at..e - at];
            match bytes {
                Some(b) => dst.copy_from_slice(&b[s - page * PAGE..e - page * PAGE]),
                None => dst.fill(0),
            }
        }
    }

    /// Bytes `[at, at + len)` of the chunk: the written pages over `base`
    /// (`None` = zeros), leaving the pages as they are.
    pub fn over(&self, base: Option<&[u8]>, at: usize, len: usize) -> Vec<u8> {
        let mut out = match base {
            Some(b) => b[at..at + len].to_vec(),
            None => vec![0u8; len],
        };
        self.lay(at, &mut out);
        out
    }

    /// The chunk's bytes: the written pages over `base` (`None` = zeros).
    fn merged(self, base: Option<&[u8]>) -> Vec<u8> {
        self.over(base, 0, self.total * PAGE)
    }
}

impl DirtyData {
    /// Turn pages over an unread base into the whole chunk, given the base.
    pub fn materialize(&mut self, base: Option<&[u8]>) {
        if let DirtyData::Pages(_) = self
            && let DirtyData::Pages(pb) = std::mem::replace(self, DirtyData::Zero)
        {
            *self = DirtyData::Data(Arc::new(pb.merged(base)));
        }
    }

    /// The bytes of a piece, when this slot alone knows them (`Some(None)`
    /// = zeros); `None` when pages over an unread base do not cover it.
    pub fn piece(&self, p: Piece) -> Option<Option<Bytes>> {
        match self {
            DirtyData::Zero => Some(None),
            DirtyData::Data(v) => Some(Some(Bytes::copy_from_slice(&v[p.at..p.at + p.len]))),
            DirtyData::Pages(pb) => pb.covered(p).map(Some),
        }
    }

    /// One whole page for an inline commit (`Some(None)`: zeros); `None`
    /// when pages over an unread base do not hold it.
    pub fn page(&self, page: usize) -> Option<Option<Bytes>> {
        match self.piece(Piece { index: 0, at: page * PAGE, len: PAGE, pos: 0 })? {
            Some(b) if !is_zero(&b) => Some(Some(b)),
            _ => Some(None),
        }
    }

    /// Apply a write (`None` = zeros). False, with nothing changed, when the
    /// slot holds pages over an unread base and the write is not whole
    /// pages: the caller must read the base first.
    pub fn apply(&mut self, p: Piece, data: Option<&[u8]>, chunk_size: u64) -> bool {
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
                pb.write(p.at, p.len, data);
                if pb.full() {
                    // Every page written: the base no longer matters.
                    self.materialize(None);
                }
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

    /// The dirty budget bytes this data holds after writing piece `p`:
    /// its written pages, or the whole chunk.
    pub fn charge_after(&self, p: Piece, chunk_size: u64) -> u64 {
        match self {
            DirtyData::Pages(pb)
                if p.len as u64 != chunk_size && p.at.is_multiple_of(PAGE) && p.len.is_multiple_of(PAGE) =>
            {
                ((pb.len() + pb.new_pages(p.at, p.len)) * PAGE) as u64
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
        assert!(d.apply(p, Some(&[7u8; 8192]), cs));
        let Some(Some(sent)) = d.upload_bytes() else { panic!("expected bytes") };
        let q = Piece { index: 0, at: 10, len: 1, pos: 0 };
        assert!(d.apply(q, Some(&[9u8]), cs));
        assert_eq!(sent[10], 7, "the upload's bytes changed under it");
        assert_eq!(d.piece(q), Some(Some(Bytes::from_static(&[9u8]))));
    }

    #[test]
    fn pages_cover_only_written_pages_and_merge_over_a_base() {
        let cs = 4 * PAGE as u64;
        let mut d = DirtyData::Pages(PageBuf::new(cs));
        let p = Piece { index: 0, at: PAGE, len: PAGE, pos: 0 };
        assert!(d.apply(p, Some(&[1u8; PAGE]), cs));
        assert!(d.piece(Piece { index: 0, at: 0, len: 10, pos: 0 }).is_none());
        assert!(!d.apply(Piece { index: 0, at: 5, len: 10, pos: 0 }, Some(&[2u8; 10]), cs));
        assert!(d.upload_bytes().is_none(), "pages must be merged before an upload");
        d.materialize(Some(&[3u8; 4 * PAGE]));
        let Some(Some(b)) = d.upload_bytes() else { panic!("expected bytes") };
        assert_eq!((b[0], b[PAGE], b[2 * PAGE]), (3, 1, 3));
    }
}
