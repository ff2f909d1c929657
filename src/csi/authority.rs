//! Clients that name a unix socket in `:authority`.
//!
//! gRPC clients on a unix socket put whatever they like in the HTTP/2
//! `:authority` pseudo-header: grpc-core (Python, C++, Ruby) sends the
//! percent-encoded socket path, grpc-java the raw path. The HTTP/2 server
//! under tonic (h2) resets every such stream with PROTOCOL_ERROR because
//! the value is no valid URI authority, and has no option to relax that.
//! On a unix socket the authority means nothing, so this module sits
//! between the socket and the server and replaces an authority that does
//! not parse with `localhost`; valid ones, and every other byte, pass
//! unchanged.
//!
//! [`AuthorityRewriter`] is the pure part: bytes from the client in, bytes
//! for the server out. It follows the client's frames (the connection
//! preface, then 9-byte frame headers), decodes each complete header block
//! (HEADERS plus CONTINUATION) with its own HPACK decoder, which keeps the
//! client's dynamic table, and re-encodes it as literals without indexing,
//! so the server's HPACK table stays empty and in step. [`FixAuthority`]
//! wraps a stream with it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames we emit stay within the smallest frame size a peer must accept.
const MAX_OUT_FRAME: usize = 16_384;
/// A header block larger than this is refused (h2's own default limit is 16 KiB of headers).
const MAX_BLOCK: usize = 1 << 20;
/// The authority written in place of one that does not parse.
pub const REPLACEMENT: &str = "localhost";

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("the client's connection preface is not HTTP/2")]
    Preface,
    #[error("HTTP/2 protocol error from the client: {0}")]
    Protocol(&'static str),
    #[error("undecodable header block from the client: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct OpenBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server byte stream of one HTTP/2 connection, with invalid
/// authorities replaced.
pub struct AuthorityRewriter {
    preface_seen: usize,
    input: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    open: Option<OpenBlock>,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self { preface_seen: 0, input: Vec::new(), decoder: loona_hpack::Decoder::new(), open: None }
    }
}

impl AuthorityRewriter {
    /// Take bytes read from the client; append what the server should read to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        self.input.extend_from_slice(data);
        if self.preface_seen < PREFACE.len() {
            let n = (PREFACE.len() - self.preface_seen).min(self.input.len());
            if self.input[..n] != PREFACE[self.preface_seen..self.preface_seen + n] {
                return Err(RewriteError::Preface);
            }
            out.extend_from_slice(&self.input[..n]);
            self.input.drain(..n);
            self.preface_seen += n;
        }
        let mut used = 0;
        while self.input.len() - used >= FRAME_HEADER {
            let h = &self.input[used..used + FRAME_HEADER];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if self.input.len() - used < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let frame = used..used + FRAME_HEADER + len;
            let payload = used + FRAME_HEADER..used + FRAME_HEADER + len;
            match (kind, &mut self.open) {
                (HEADERS, None) => {
                    let p = &self.input[payload];
                    let (mut at, mut end) = (0, p.len());
                    if flags & PADDED != 0 {
                        let pad =
                            usize::from(*p.first().ok_or(RewriteError::Protocol("padded frame without padding"))?);
                        at = 1;
                        end = end
                            .checked_sub(pad)
                            .filter(|e| *e >= at)
                            .ok_or(RewriteError::Protocol("padding too long"))?;
                    }
                    let priority = if flags & PRIORITY != 0 {
                        let pr: [u8; 5] = p
                            .get(at..at + 5)
                            .and_then(|s| s.try_into().ok())
                            .ok_or(RewriteError::Protocol("priority field missing"))?;
                        at += 5;
                        Some(pr)
                    } else {
                        None
                    };
                    let fragment = p.get(at..end).ok_or(RewriteError::Protocol("headers frame too short"))?.to_vec();
                    self.open = Some(OpenBlock { stream, flags, priority, fragment });
                }
                (CONTINUATION, Some(b)) if b.stream == stream => {
                    b.fragment.extend_from_slice(&self.input[payload]);
                    if b.fragment.len() > MAX_BLOCK {
                        return Err(RewriteError::Protocol("header block too large"));
                    }
                }
                (_, Some(_)) => return Err(RewriteError::Protocol("header block interrupted")),
                (CONTINUATION, None) => return Err(RewriteError::Protocol("continuation without headers")),
                _ => out.extend_from_slice(&self.input[frame.clone()]),
            }
            if matches!(kind, HEADERS | CONTINUATION)
                && flags & END_HEADERS != 0
                && let Some(b) = self.open.take()
            {
                self.emit(b, out)?;
            }
            used = frame.end;
        }
        self.input.drain(..used);
        Ok(())
    }

    /// Decode a complete header block, fix its authority, and write it out
    /// as HEADERS (and CONTINUATION) frames.
    fn emit(&mut self, b: OpenBlock, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let headers = self.decoder.decode(&b.fragment).map_err(RewriteError::Hpack)?;
        let mut block = Vec::with_capacity(b.fragment.len() + 64);
        for (name, value) in &headers {
            let value: &[u8] = if name.as_slice() == b":authority" && !valid_authority(value) {
                tracing::debug!(authority = %String::from_utf8_lossy(value), "replacing a client's :authority");
                REPLACEMENT.as_bytes()
            } else {
                value
            };
            // Literal header field without indexing, new name, no Huffman.
            block.push(0x00);
            encode_string(name, &mut block);
            encode_string(value, &mut block);
        }
        let mut first = Vec::new();
        if let Some(p) = b.priority {
            first.extend_from_slice(&p);
        }
        let room = MAX_OUT_FRAME - first.len();
        let (head, rest) = block.split_at(room.min(block.len()));
        first.extend_from_slice(head);
        let mut chunks = rest.chunks(MAX_OUT_FRAME).peekable();
        let mut flags = b.flags & (END_STREAM | PRIORITY);
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        write_frame(out, HEADERS, flags, b.stream, &first);
        while let Some(c) = chunks.next() {
            let f = if chunks.peek().is_none() { END_HEADERS } else { 0 };
            write_frame(out, CONTINUATION, f, b.stream, c);
        }
        Ok(())
    }
}

fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string literal without Huffman coding: a 7-bit-prefix length, then the bytes.
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    let mut n = s.len();
    if n < 0x7f {
        out.push(n as u8);
    } else {
        out.push(0x7f);
        n -= 0x7f;
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// A server-side connection whose client's bytes pass through an
/// [`AuthorityRewriter`]; writes go straight through.
pub struct FixAuthority<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    out: Vec<u8>,
    scratch: Box<[u8]>,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, rewriter: AuthorityRewriter::default(), out: Vec::new(), scratch: vec![0; 16 << 10].into() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = buf.remaining().min(this.out.len());
                buf.put_slice(&this.out[..n]);
                this.out.drain(..n);
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.feed(rb.filled(), &mut this.out)?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for FixAuthority<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(block: &[u8], flags: u8, stream: u32) -> Vec<u8> {
        let mut f = Vec::new();
        write_frame(&mut f, HEADERS, flags, stream, block);
        f
    }

    fn literal(name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![0x00];
        encode_string(name.as_bytes(), &mut b);
        encode_string(value.as_bytes(), &mut b);
        b
    }

    fn decode_out(out: &[u8]) -> Vec<(String, String)> {
        let frames = &out[PREFACE.len()..];
        let len = (usize::from(frames[0]) << 16) | (usize::from(frames[1]) << 8) | usize::from(frames[2]);
        let block = &frames[FRAME_HEADER..FRAME_HEADER + len];
        loona_hpack::Decoder::new()
            .decode(block)
            .expect("decode")
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).expect("utf8"), String::from_utf8(v).expect("utf8")))
            .collect()
    }

    #[test]
    fn an_invalid_authority_becomes_localhost_byte_by_byte() {
        let mut block = literal(":path", "/csi.v1.Identity/GetPluginInfo");
        block.extend(literal(":authority", "tmp%2Fcsi.sock"));
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&block, END_HEADERS | END_STREAM, 1));
        let mut data = Vec::new();
        write_frame(&mut data, 0x0, END_STREAM, 1, b"hello");
        input.extend(&data);
        let mut r = AuthorityRewriter::default();
        let mut out = Vec::new();
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut out).expect("feed");
        }
        let h = decode_out(&out);
        assert_eq!(h[1], (":authority".into(), "localhost".into()));
        assert_eq!(h[0].1, "/csi.v1.Identity/GetPluginInfo");
        assert!(out.ends_with(&data), "other frames pass unchanged");
        assert_eq!(out[PREFACE.len() + 4] & (END_HEADERS | END_STREAM), END_HEADERS | END_STREAM);
    }

    #[test]
    fn a_valid_authority_and_padding_and_continuations_are_handled() {
        let block = literal(":authority", "localhost:50051");
        let mut input = PREFACE.to_vec();
        // PADDED, with 3 bytes of padding, split across a CONTINUATION.
        let mut payload = vec![3];
        payload.extend(&block[..4]);
        payload.extend([0, 0, 0]);
        input.extend(headers_frame(&payload, PADDED, 3));
        let mut cont = Vec::new();
        write_frame(&mut cont, CONTINUATION, END_HEADERS, 3, &block[4..]);
        input.extend(cont);
        let mut out = Vec::new();
        AuthorityRewriter::default().feed(&input, &mut out).expect("feed");
        assert_eq!(decode_out(&out), vec![(":authority".to_string(), "localhost:50051".to_string())]);
        assert_eq!(out[PREFACE.len() + 4] & PADDED, 0);
    }

    #[test]
    fn garbage_is_refused_not_passed_on() {
        let mut out = Vec::new();
        assert!(AuthorityRewriter::default().feed(b"GET / HTTP/1.1\r\n", &mut out).is_err());
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&[0xff, 0xff, 0xff, 0xff, 0xff], END_HEADERS, 1));
        assert!(AuthorityRewriter::default().feed(&input, &mut out).is_err());
    }
}
