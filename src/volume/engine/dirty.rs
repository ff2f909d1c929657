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

/// A chunk-sized buffer of which only the pages marked written are
/// meaningful (the rest are zeros until merged with the stored bytes).
/// Allocated zeroed, so untouched pages cost no memory.
#[derive(Debug)]
pub(super) struct PageBuf {
    buf: Vec<u8>,
    written: Vec<u64>,
}

impl PageBuf {
    pub fn new(chunk_size: u64) -> Self {
        let pages = chunk_size as usize / PAGE;
        Self { buf: vec![0u8; chunk_size as usize], written: vec![0u64; pages.div_ceil(64)] }
    }

    fn is_written(&self, page: usize) -> bool {
        self.written[page / 64] & (1 << (page % 64)) != 0
    }

    /// Write whole pages at `at` (`None` = zeros).
    fn write(&mut self, at: usize, len: usize, data: Option<&[u8]>) {
        match data {
            Some(d) => self.buf[at..at + len].copy_from_slice(d),
            None => self.buf[at..at + len].fill(0),
        }
        for page in at / PAGE..(at + len) / PAGE {
            self.written[page / 64] |= 1 << (page % 64);
        }
    }

    fn full(&self) -> bool {
        self.written.iter().map(|w| w.count_ones() as usize).sum::<usize>() == self.buf.len() / PAGE
    }

    /// The piece's bytes when written pages cover all of it.
    pub fn covered(&self, p: Piece) -> Option<&[u8]> {
        (p.at / PAGE..(p.at + p.len).div_ceil(PAGE))
            .all(|page| self.is_written(page))
            .then(|| &self.buf[p.at..p.at + p.len])
    }

    /// The chunk's bytes: the written pages over `base` (`None` = zeros).
    fn merged(mut self, base: Option<&[u8]>) -> Vec<u8> {
        if let Some(base) = base {
            for page in 0..self.buf.len() / PAGE {
                if !self.is_written(page) {
                    let r = page * PAGE..(page + 1) * PAGE;
                    self.buf[r.clone()].copy_from_slice(&base[r]);
                }
            }
        }
        self.buf
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
            DirtyData::Pages(pb) => pb.covered(p).map(|v| Some(Bytes::copy_from_slice(v))),
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
