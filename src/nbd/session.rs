//! One NBD connection: option haggling, then the transmission phase.
//!
//! Requests are read in order but executed concurrently, each in its own
//! task, and answered as they finish (out of order, matched by handle).
//! A byte budget bounds how much request payload may be in flight, so a
//! client cannot make us buffer without limit. Ordering guarantees the
//! protocol asks for hold because the engine makes every *completed* write
//! visible to later reads and covered by any later FLUSH, on every
//! connection (hence CAN_MULTI_CONN).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// The memory a request holds until its reply is written: its share of
/// the connection's budget and of the server's.
type Permit = (OwnedSemaphorePermit, OwnedSemaphorePermit);
use tokio::task::JoinSet;

use super::proto::{self, Request};
use super::tls::{Policy, Secured, Tls};
use super::unflushed::{UnflushedMarker, WriteGuard};
use crate::error::nbd_errno;
use crate::volume::engine::is_zero;
use crate::volume::{Volume, VolumeResult};

/// What a server offers: one volume under one name.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub volume: Volume,
    pub read_only: bool,
    /// How long a connection that is answering requests back to back
    /// polls its socket for the next one before it sleeps (zero: never).
    /// See [`Poller`].
    pub busy_poll: Duration,
    /// What all connections to this export may use together.
    pub limits: Limits,
    /// Marks, in a file, that acknowledged writes may be uncommitted (the
    /// node plugin's crash detection); `None` when nobody asks.
    pub unflushed: Option<Arc<UnflushedMarker>>,
}

/// Bounds that keep hostile or broken clients from exhausting the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request payload and reply bytes in flight across all connections.
    pub inflight: Arc<Semaphore>,
    /// Connections served at once; more are refused (closed at accept).
    pub max_connections: usize,
    /// A client must finish the handshake within this, and a request's
    /// payload must keep arriving: no progress for this long drops it. So
    /// must its replies while another request waits for `inflight`.
    pub io_deadline: Duration,
    /// Requests waiting for `inflight` now.
    waiting: Arc<AtomicUsize>,
}

impl Limits {
    pub fn new(inflight_bytes: usize, max_connections: usize, io_deadline: Duration) -> Self {
        let units = (inflight_bytes / PERMIT_UNIT).max(proto::MAX_PAYLOAD as usize / PERMIT_UNIT);
        Self {
            inflight: Arc::new(Semaphore::new(units)),
            max_connections: max_connections.max(1),
            io_deadline,
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// `units` of the server-wide budget, counted as waiting until granted
    /// (`None` once the budget is closed), here and in `own`, the waits of
    /// the connection asking.
    async fn acquire(&self, units: u32, own: &AtomicUsize) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.inflight.clone().try_acquire_many_owned(units) {
            return Some(p);
        }
        struct Waiting<'a>(&'a AtomicUsize, &'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.1.fetch_sub(1, Ordering::SeqCst);
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // Own count first: `others_wait` may still take a wait beginning
        // between its two loads for another connection's, for one tick;
        // a cut needs twenty in a row.
        own.fetch_add(1, Ordering::SeqCst);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(own, &self.waiting);
        self.inflight.clone().acquire_many_owned(units).await.ok()
    }

    /// Does a request of another connection than the one whose waits
    /// `own` counts wait for the server-wide budget? A connection's own
    /// requests waiting behind its unread replies are its client's affair:
    /// counted, the kernel's only connection was cut by its own reads once
    /// the budget was smaller than what it keeps in flight.
    fn others_wait(&self, own: &AtomicUsize) -> bool {
        // Own count read first: a wait of this connection that ends
        // between the two loads only makes the answer "no".
        let mine = own.load(Ordering::SeqCst);
        self.waiting.load(Ordering::SeqCst) > mine
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(DEFAULT_SERVER_INFLIGHT, DEFAULT_MAX_CONNECTIONS, DEFAULT_IO_DEADLINE)
    }
}

/// Server-wide payload and reply bytes in flight, by default.
pub const DEFAULT_SERVER_INFLIGHT: usize = 256 << 20;
/// Connections at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Handshake and payload deadline, by default (qemu-nbd's handshake limit).
pub const DEFAULT_IO_DEADLINE: Duration = Duration::from_secs(10);

impl Export {
    pub fn flags(&self) -> u16 {
        let mut f = proto::TF_HAS_FLAGS
            | proto::TF_SEND_FLUSH
            | proto::TF_SEND_FUA
            | proto::TF_CAN_MULTI_CONN
            | proto::TF_SEND_CACHE;
        if self.read_only {
            f |= proto::TF_READ_ONLY;
        } else {
            f |= proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES;
        }
        f
    }

    /// Call before a write starts; hold the guard until it finished. An
    /// error (the marker cannot be created) must fail the write.
    fn write_begins(&self) -> Result<Option<WriteGuard<'_>>, (u32, String)> {
        match &self.unflushed {
            None => Ok(None),
            Some(m) => m.write_begins().map(Some).map_err(|e| {
                tracing::error!(error = %e, "write refused: cannot mark the volume as holding unflushed writes");
                (proto::EIO, e.to_string())
            }),
        }
    }

    /// Commit every completed write; a flush that covered every write
    /// acknowledged so far clears the unflushed-writes marker.
    pub async fn flush(&self) -> VolumeResult<()> {
        let ticket = self.unflushed.as_ref().map(|m| m.flush_begins());
        self.volume.flush().await?;
        if let (Some(m), Some(t)) = (&self.unflushed, ticket) {
            m.flushed(t);
        }
        Ok(())
    }

    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Block sizes: any 512-byte aligned request works; whole chunks are
    /// what the engine likes best.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let chunk = self.volume.chunk_size().min(proto::MAX_PAYLOAD as u64) as u32;
        (512, chunk.max(4096), proto::MAX_PAYLOAD)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Bytes of request payload that may be in flight on one connection.
const INFLIGHT_BYTES: usize = 64 << 20;
/// A payload buffer grows by at most this much per read.
const PAYLOAD_STEP: usize = 1 << 20;

/// Bytes of a payload read before it takes its server-wide share: a header
/// (and a stalled trickle) pins this much memory at most, no budget.
const FIRST_BYTES: usize = 64 << 10;

/// Time a whole payload may take: the idle deadline plus one second per
/// MiB, so a client trickling bytes cannot hold its share for ever.
fn payload_deadline(deadline: Duration, len: usize) -> Duration {
    deadline + Duration::from_secs((len >> 20) as u64)
}

/// Read a `len`-byte payload into `buf`, growing it only as bytes arrive.
/// The first bytes are read before anything is taken from the server-wide
/// budget (`server`, into `held`), so a header whose payload never comes
/// holds none of what other connections need; then the whole payload's
/// share is taken in one acquire. Never more than once while holding part
/// of it: connections waiting for the budget hold none of it, so streams
/// of large writes on many connections cannot wait on each other for ever.
/// `Ok(false)`: the client went away, sent nothing for `deadline`, or took
/// longer than [`payload_deadline`] for the whole payload.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
    deadline: Duration,
    server: &Limits,
    own: &AtomicUsize,
    held: &mut OwnedSemaphorePermit,
) -> std::io::Result<bool> {
    let whole = payload_deadline(deadline, len);
    let mut read_some =
        async |buf: &mut Vec<u8>, want: usize, started: tokio::time::Instant| -> std::io::Result<bool> {
            let start = buf.len();
            buf.resize(start + want, 0);
            let left = whole.saturating_sub(started.elapsed()).min(deadline);
            match tokio::time::timeout(left, rd.read(&mut buf[start..])).await {
                Ok(Ok(0)) | Err(_) => Ok(false),
                Ok(Ok(n)) => {
                    buf.truncate(start + n);
                    Ok(true)
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                Ok(Err(e)) => Err(e),
            }
        };
    let started = tokio::time::Instant::now();
    let first = len.min(FIRST_BYTES);
    while buf.len() < first {
        let want = first - buf.len();
        if !read_some(buf, want, started).await? {
            return Ok(false);
        }
    }
    let units = len.div_ceil(PERMIT_UNIT);
    if let Some(more) = units.checked_sub(held.num_permits()).filter(|&n| n > 0) {
        match server.acquire(more as u32, own).await {
            Some(p) => held.merge(p),
            None => return Ok(false),
        }
    }
    // The rest's time runs from here: a wait for the budget (other
    // connections' writes waiting on a slow store) is no fault of this
    // client's, whose bytes sit in the socket meanwhile. Counted in, it
    // cut the kernel's connection once the wait passed the deadline.
    let started = tokio::time::Instant::now();
    while buf.len() < len {
        let want = (len - buf.len()).min(PAYLOAD_STEP);
        if !read_some(buf, want, started).await? {
            return Ok(false);
        }
    }
    Ok(true)
}
const PERMIT_UNIT: usize = 4096;

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    structured: bool,
    /// base:allocation selected: BLOCK_STATUS is answered.
    base_allocation: bool,
}

enum Next {
    Transmit(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
    Close,
}

/// A connection's byte stream as accepted: read and written whole during
/// the handshake (STARTTLS needs it whole), split in two for the
/// transmission phase.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: AsyncRead + Unpin + Send + 'static;
    type Writer: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Reader, Self::Writer);
}

// Owned halves of a socket avoid the lock `tokio::io::split` puts between them.
impl Transport for tokio::net::UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl Transport for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

/// Run one connection to completion. `fd` is the socket's descriptor when
/// busy polling may use it; `tls` the server's TLS setup, if it has one.
pub async fn run<S: Transport>(
    stream: S,
    export: Arc<Export>,
    shutdown: watch::Receiver<bool>,
    fd: Option<RawFd>,
    tls: Option<Arc<Tls>>,
) -> Result<(), SessionError> {
    let mut stop = shutdown.clone();
    // One deadline for the whole handshake, the TLS handshake included.
    let negotiated = tokio::select! {
        r = tokio::time::timeout(export.limits.io_deadline, negotiate(stream, &export, tls.as_deref())) => match r {
            Ok(r) => r?,
            Err(_) => {
                tracing::info!(deadline = ?export.limits.io_deadline, "client did not finish the handshake in time; closing");
                return Ok(());
            }
        },
        _ = stop.changed() => return Ok(()),
    };
    match negotiated {
        Negotiation::Close => Ok(()),
        Negotiation::Plain(stream, neg) => {
            let poller = fd.filter(|_| !export.busy_poll.is_zero()).map(|fd| Poller::new(fd, export.busy_poll));
            let (rd, wr) = stream.into_halves();
            transmit(buffered(rd), wr, export, neg, shutdown, poller).await
        }
        Negotiation::Secured(stream, neg) => {
            // No busy polling: bytes on the socket are not yet a request
            // (TLS may hold decrypted ones the socket does not show).
            let (rd, wr) = tokio::io::split(*stream);
            transmit(buffered(rd), wr, export, neg, shutdown, None).await
        }
    }
}

/// Buffered: a request header and its payload usually arrive in one read.
fn buffered<R: AsyncRead>(rd: R) -> tokio::io::BufReader<R> {
    tokio::io::BufReader::with_capacity(256 << 10, rd)
}

async fn reply<W: AsyncWrite + Unpin>(wr: &mut W, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    wr.write_all(&proto::option_reply(option, kind, data)).await
}

/// How the handshake ended.
enum Negotiation<S> {
    Plain(S, Negotiated),
    Secured(Box<Secured<S>>, Negotiated),
    Close,
}

/// The greeting, options, and (when the client asks) the switch to TLS and
/// the options after it. Reads are unbuffered: after STARTTLS the next
/// bytes belong to TLS, and none may sit in a buffer of ours.
async fn negotiate<S: Transport>(
    mut stream: S,
    export: &Export,
    tls: Option<&Tls>,
) -> Result<Negotiation<S>, SessionError> {
    stream.write_all(&proto::server_greeting()).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    // Flags this server does not know: the spec says drop the connection.
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        tracing::info!(flags = client_flags, "client sent unknown handshake flags; closing");
        return Ok(Negotiation::Close);
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let before = match tls {
        None => TlsState::Unavailable,
        Some(t) if t.policy == Policy::Require => TlsState::Required,
        Some(_) => TlsState::Offered,
    };
    let tls = match (options(&mut stream, export, no_zeroes, before).await?, tls) {
        (Next::Transmit(neg), _) => return Ok(Negotiation::Plain(stream, neg)),
        (Next::StartTls, Some(tls)) => tls,
        (Next::Close | Next::StartTls, _) => return Ok(Negotiation::Close),
    };
    let mut secured = tls.accept(stream).await.map_err(SessionError::Tls)?;
    // Nothing negotiated before TLS carries over (a man in the middle may
    // have chosen it): the options start again from scratch.
    match options(&mut secured, export, no_zeroes, TlsState::Established).await? {
        Next::Transmit(neg) => Ok(Negotiation::Secured(Box::new(secured), neg)),
        Next::StartTls | Next::Close => Ok(Negotiation::Close),
    }
}

/// Where a connection stands with TLS while options are haggled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// The server has no TLS setup.
    Unavailable,
    /// STARTTLS may be asked for; plaintext is served too.
    Offered,
    /// Nothing but STARTTLS and ABORT until TLS is up.
    Required,
    Established,
}

/// Haggle options until the client picks the export (or asks for TLS, or
/// leaves).
async fn options<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    export: &Export,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Next, SessionError> {
    let mut structured = false;
    // The metadata context SET_META_CONTEXT selected (base:allocation is
    // the only one offered).
    let mut base_allocation = false;
    loop {
        let mut hdr = [0u8; 16];
        stream.read_exact(&mut hdr).await?;
        // The magic first: a length behind a wrong magic means nothing
        // (and is not drained).
        if hdr[..8] != proto::IHAVEOPT.to_be_bytes() {
            tracing::info!("bad option magic; closing");
            return Ok(Next::Close);
        }
        let code = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        let mut frame = hdr.to_vec();
        if len > proto::MAX_OPTION_LEN {
            // Skip the payload without buffering it, then refuse the option.
            let skipped = tokio::io::copy(&mut (&mut *stream).take(len as u64), &mut tokio::io::sink()).await?;
            if skipped != len as u64 {
                return Ok(Next::Close);
            }
            reply(stream, code, proto::REP_ERR_TOO_BIG, b"option too large").await?;
            continue;
        }
        frame.resize(16 + len as usize, 0);
        stream.read_exact(&mut frame[16..]).await?;
        let Some((opt, _)) = proto::parse_option(&frame)? else {
            return Ok(Next::Close);
        };
        if tls == TlsState::Required && !matches!(opt.code, proto::OPT_STARTTLS | proto::OPT_ABORT) {
            if opt.code == proto::OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: the spec says close.
                tracing::info!("a plaintext client asked for the export, but TLS is required; closing");
                return Ok(Next::Close);
            }
            reply(stream, opt.code, proto::REP_ERR_TLS_REQD, b"TLS is required: send STARTTLS first").await?;
            stream.flush().await?;
            continue;
        }
        match opt.code {
            proto::OPT_EXPORT_NAME => {
                if !export.matches(&opt.data) {
                    tracing::info!(name = %crate::nbd::printable(&opt.data), "unknown export requested");
                    return Ok(Next::Close);
                }
                stream.write_all(&proto::export_name_reply(export.volume.size(), export.flags(), no_zeroes)).await?;
                return Ok(Next::Transmit(Negotiated { structured, base_allocation }));
            }
            proto::OPT_ABORT => {
                let _ = reply(stream, opt.code, proto::REP_ACK, &[]).await;
                return Ok(Next::Close);
            }
            proto::OPT_LIST => {
                if !opt.data.is_empty() {
                    reply(stream, opt.code, proto::REP_ERR_INVALID, b"LIST takes no data").await?;
                } else {
                    let entry = proto::list_entry(export.name.as_bytes(), export.description.as_bytes());
                    reply(stream, opt.code, proto::REP_SERVER, &entry).await?;
                    reply(stream, opt.code, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some(req) = proto::parse_info_request(&opt.data) else {
                    reply(stream, opt.code, proto::REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                if !export.matches(&req.name) {
                    reply(stream, opt.code, proto::REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let size = export.volume.size();
                reply(stream, opt.code, proto::REP_INFO, &proto::info_export(size, export.flags())).await?;
                let (min, pref, max) = export.block_sizes();
                reply(stream, opt.code, proto::REP_INFO, &proto::info_block_size(min, pref, max)).await?;
                if req.requests.contains(&proto::INFO_NAME) {
                    reply(
                        stream,
                        opt.code,
                        proto::REP_INFO,
                        &proto::info_text(proto::INFO_NAME, export.name.as_bytes()),
                    )
                    .await?;
                }
                if req.requests.contains(&proto::INFO_DESCRIPTION) {
                    let d = proto::info_text(proto::INFO_DESCRIPTION, export.description.as_bytes());
                    reply(stream, opt.code, proto::REP_INFO, &d).await?;
                }
                reply(stream, opt.code, proto::REP_ACK, &[]).await?;
                if opt.code == proto::OPT_GO {
                    return Ok(Next::Transmit(Negotiated { structured, base_allocation }));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !opt.data.is_empty() {
                    reply(stream, opt.code, proto::REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
                } else {
                    structured = true;
                    reply(stream, opt.code, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt.code == proto::OPT_SET_META_CONTEXT;
                match proto::parse_meta_context_request(&opt.data) {
                    _ if !structured => {
                        reply(stream, opt.code, proto::REP_ERR_INVALID, b"negotiate structured replies first").await?;
                    }
                    None => reply(stream, opt.code, proto::REP_ERR_INVALID, b"malformed meta context request").await?,
                    Some(req) if !export.matches(&req.export) => {
                        reply(stream, opt.code, proto::REP_ERR_UNKNOWN, b"no such export").await?;
                    }
                    Some(req) => {
                        // LIST with no queries lists everything; a namespace
                        // query ("base:") lists its contexts. SET selects
                        // exact names only, and replaces an earlier choice.
                        let exact = |q: &Vec<u8>| q == proto::BASE_ALLOCATION.as_bytes();
                        let offered = if set {
                            req.queries.iter().any(exact)
                        } else {
                            req.queries.is_empty() || req.queries.iter().any(|q| exact(q) || q == b"base:")
                        };
                        if set {
                            base_allocation = offered;
                        }
                        if offered {
                            let d = proto::meta_context_reply(proto::BASE_ALLOCATION_ID, proto::BASE_ALLOCATION);
                            reply(stream, opt.code, proto::REP_META_CONTEXT, &d).await?;
                        }
                        reply(stream, opt.code, proto::REP_ACK, &[]).await?;
                    }
                }
            }
            proto::OPT_STARTTLS => match tls {
                TlsState::Unavailable => {
                    reply(stream, opt.code, proto::REP_ERR_UNSUP, b"this server is not set up for TLS").await?;
                }
                TlsState::Established => {
                    reply(stream, opt.code, proto::REP_ERR_INVALID, b"TLS is already established").await?;
                }
                TlsState::Offered | TlsState::Required if !opt.data.is_empty() => {
                    reply(stream, opt.code, proto::REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                }
                TlsState::Offered | TlsState::Required => {
                    reply(stream, opt.code, proto::REP_ACK, &[]).await?;
                    stream.flush().await?;
                    return Ok(Next::StartTls);
                }
            },
            other => {
                let msg = format!("option {other} is not supported");
                reply(stream, other, proto::REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
        stream.flush().await?;
    }
}

/// A reply on its way to the socket. It holds its request's share of the
/// in-flight budget until it has been written, so queued replies count
/// against the same bound as requests being processed.
struct Reply {
    parts: Vec<Bytes>,
    _permit: Option<Permit>,
}

/// Where replies go: straight to the socket when nobody is writing (no
/// hand-off, the common case at low queue depth), else to the writer
/// task's queue, which batches whatever piles up.
struct Replies<W> {
    tx: mpsc::UnboundedSender<Reply>,
    out: Arc<Mutex<Out<W>>>,
}

/// The socket's write half, and whether it is broken: a write failed or
/// made no progress for the deadline while another request waited for the
/// server-wide budget. A broken connection writes nothing more (a reply
/// after a half-written one would be read as part of it): its replies are
/// dropped, and with them the budget they hold, and `tell` has the request
/// loop end the session.
struct Out<W> {
    w: W,
    broken: bool,
    stall: Stall,
    tell: watch::Sender<bool>,
}

/// When a reply's write counts as stalled.
struct Stall {
    deadline: Duration,
    limits: Limits,
    /// This connection's requests waiting for the server-wide budget.
    own: Arc<AtomicUsize>,
    shutdown: watch::Receiver<bool>,
}

/// Stalls are watched in this many ticks per deadline.
const STALL_TICKS: u32 = 20;

impl Stall {
    /// Run `io`, giving up once it made no progress for the deadline while
    /// something else needed what this connection holds all that time: a
    /// request of another connection waiting for the server-wide budget,
    /// or the server stopping. Otherwise a slow reader (a paused machine, a
    /// client busy elsewhere) is waited for.
    ///
    /// Time is counted in ticks, each a fresh timer: a machine that was
    /// paused finds one tick due when it wakes, not the whole deadline
    /// spent, so its client gets a deadline's worth of real time to read.
    async fn progress<T>(&self, io: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
        tokio::pin!(io);
        let tick = (self.deadline / STALL_TICKS).max(Duration::from_millis(1));
        // The last ticks without progress that others waited through (or
        // the server was stopping).
        let mut needed = 0u32;
        loop {
            match tokio::time::timeout(tick, &mut io).await {
                Ok(r) => return r,
                Err(_) => {
                    if *self.shutdown.borrow() || self.limits.others_wait(&self.own) {
                        needed += 1;
                    } else {
                        needed = 0;
                    }
                    if needed >= STALL_TICKS {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client read none of its replies while others waited",
                        ));
                    }
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> Out<W> {
    /// Write `batch` unless the connection is broken; a failure breaks it.
    async fn write(&mut self, batch: &[Reply], buf: &mut Vec<u8>) -> bool {
        if self.broken {
            return false;
        }
        if let Err(e) = write_batch(&mut self.w, batch, buf, &self.stall).await {
            tracing::info!(error = %e, "a reply could not be written; closing the connection");
            self.broken = true;
            let _ = self.tell.send(true);
            return false;
        }
        true
    }
}

impl<W> Clone for Replies<W> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), out: self.out.clone() }
    }
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    async fn send(&self, parts: Vec<Bytes>, permit: Option<Permit>) {
        let reply = Reply { parts, _permit: permit };
        if let Ok(mut w) = self.out.try_lock() {
            let mut buf = Vec::new();
            w.write(std::slice::from_ref(&reply), &mut buf).await;
            return;
        }
        // Only fails when the writer has stopped (the connection is gone).
        let _ = self.tx.send(reply);
    }

    async fn simple(&self, error: u32, handle: u64, permit: Option<Permit>) {
        self.send(vec![Bytes::copy_from_slice(&proto::simple_reply(error, handle))], permit).await
    }
}

/// Write replies, small parts gathered into one buffer: few syscalls.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[Reply],
    buf: &mut Vec<u8>,
    stall: &Stall,
) -> std::io::Result<()> {
    const GATHER: usize = 64 << 10;
    buf.clear();
    for part in batch.iter().flat_map(|r| r.parts.iter()) {
        if part.len() >= GATHER {
            if !buf.is_empty() {
                write_all(w, buf, stall).await?;
                buf.clear();
            }
            write_all(w, part, stall).await?;
        } else {
            buf.extend_from_slice(part);
        }
    }
    if !buf.is_empty() {
        write_all(w, buf, stall).await?;
    }
    stall.progress(w.flush()).await
}

/// `write_all`, each write held to [`Stall::progress`].
async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, mut bytes: &[u8], stall: &Stall) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = stall.progress(w.write(bytes)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// The queue's writer: takes every reply that is ready and writes them together.
async fn write_replies<W: AsyncWrite + Unpin>(out: Arc<Mutex<Out<W>>>, mut rx: mpsc::UnboundedReceiver<Reply>) {
    let mut buf: Vec<u8> = Vec::with_capacity(256 << 10);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut w = out.lock().await;
        if !w.write(&batch, &mut buf).await {
            break;
        }
    }
    // Replies still queued (and what they hold) go with the queue.
    drop(rx);
    // A clean end for a client still reading (TLS sends close_notify);
    // none for a broken one, whose socket may never take another byte.
    let mut out = out.lock().await;
    if !out.broken {
        let deadline = out.stall.deadline;
        let _ = tokio::time::timeout(deadline, out.w.shutdown()).await;
    }
}

/// Busy polling for request/reply ping-pong (a client with one request in
/// flight). Sleeping until the next request arrives costs a wakeup, and on
/// a virtual machine waking an idle CPU costs tens of microseconds: more
/// than the request itself. A connection whose last request arrived
/// within one polling budget of its reply (so polling would have caught
/// it) polls the socket (a non-blocking peek) for up to one budget before
/// sleeping; one whose requests come slower than that, a paced client or
/// an idle one, stops polling at once and costs nothing.
struct Poller {
    fd: RawFd,
    budget: Duration,
    /// Was the last gap between a reply and the next request short?
    hot: bool,
    idle_since: Instant,
}

impl Poller {
    fn new(fd: RawFd, budget: Duration) -> Self {
        Self { fd, budget, hot: false, idle_since: Instant::now() }
    }

    /// Called when the connection has nothing buffered and nothing in
    /// flight: poll for the next request if the client is hot.
    fn wait(&mut self) {
        self.idle_since = Instant::now();
        if !self.hot {
            return;
        }
        let mut byte = 0u8;
        while self.idle_since.elapsed() < self.budget {
            // SAFETY: `fd` is the connection's socket, open for as long as
            // the session owns its halves; the buffer is one valid byte.
            let n = unsafe { libc::recv(self.fd, (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                return; // data, end of stream or an error: the read will tell
            }
            std::hint::spin_loop();
        }
    }

    /// Called when a request header has arrived: stay hot only while
    /// polling pays (the gap fit in the budget).
    fn arrived(&mut self) {
        self.hot = self.idle_since.elapsed() <= self.budget;
    }
}

async fn transmit<R, W>(
    mut rd: tokio::io::BufReader<R>,
    wr: W,
    export: Arc<Export>,
    neg: Negotiated,
    mut shutdown: watch::Receiver<bool>,
    mut poller: Option<Poller>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let structured = neg.structured;
    let (tx, rx) = mpsc::unbounded_channel();
    let (tell, mut broken) = watch::channel(false);
    let own = Arc::new(AtomicUsize::new(0));
    let stall = Stall {
        deadline: export.limits.io_deadline,
        limits: export.limits.clone(),
        own: own.clone(),
        shutdown: shutdown.clone(),
    };
    let out = Arc::new(Mutex::new(Out { w: wr, broken: false, stall, tell }));
    let writer = tokio::spawn(write_replies(out.clone(), rx));
    let wr = Replies { tx, out };
    let budget = Arc::new(Semaphore::new(INFLIGHT_BYTES / PERMIT_UNIT));
    let mut tasks = JoinSet::new();
    let result = loop {
        let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
        while tasks.try_join_next().is_some() {}
        if let Some(p) = poller.as_mut()
            && rd.buffer().is_empty()
            && tasks.is_empty()
        {
            p.wait();
        }
        tokio::select! {
            r = rd.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    // EOF without DISC: the client went away. Writes it was
                    // told completed are in the engine; flush them below.
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e.into()) };
                }
            }
            _ = shutdown.changed() => break Ok(()),
            _ = broken.changed() => break Ok(()),
        }
        if let Some(p) = poller.as_mut() {
            p.arrived();
        }
        let req = match proto::parse_request(&hdr) {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        if req.kind == proto::CMD_DISC {
            break Ok(());
        }
        // What a request holds in memory: a READ its reply (one larger
        // than any payload is refused and holds none), a WRITE its
        // payload. A TRIM, WRITE_ZEROES, CACHE or block status holds
        // nothing, whatever range it covers: charged by its length, a
        // TRIM of more than the whole budget (mkfs discards the whole
        // device) waited for good, and every request queued behind it.
        let bytes = match req.kind {
            proto::CMD_READ if req.length <= proto::MAX_PAYLOAD => req.length as usize,
            proto::CMD_WRITE => req.length as usize,
            _ => 0,
        };
        let units = bytes.min(INFLIGHT_BYTES).div_ceil(PERMIT_UNIT).max(1) as u32;
        // A WRITE takes its server-wide share as its payload arrives (see
        // read_payload); everything else takes it up front.
        // One longer than any payload is read and dropped, never buffered.
        let payload_follows = req.kind == proto::CMD_WRITE && req.length > 0;
        let server_units = if payload_follows { 0 } else { units };
        let permits = async {
            let mine = budget.clone().acquire_many_owned(units).await.ok()?;
            let all = export.limits.acquire(server_units, &own).await?;
            Some((mine, all))
        };
        let mut permit = tokio::select! {
            p = permits => match p {
                Some(p) => p,
                None => break Ok(()),
            },
            _ = shutdown.changed() => break Ok(()),
            _ = broken.changed() => break Ok(()),
        };
        let mut payload = None;
        if req.kind == proto::CMD_WRITE {
            if req.length > proto::MAX_PAYLOAD {
                // Read and dropped in small pieces (no share of the
                // server's budget), within the payload deadline.
                let whole = payload_deadline(export.limits.io_deadline, req.length as usize);
                let mut rest = (&mut rd).take(req.length as u64);
                let mut sink = tokio::io::sink();
                let skip = tokio::io::copy(&mut rest, &mut sink);
                let n = tokio::select! {
                    n = tokio::time::timeout(whole, skip) => match n {
                        Ok(n) => n?,
                        Err(_) => break Ok(()),
                    },
                    _ = shutdown.changed() => break Ok(()),
                    _ = broken.changed() => break Ok(()),
                };
                if n != req.length as u64 {
                    break Ok(());
                }
                wr.simple(proto::EINVAL, req.handle, None).await;
                continue;
            }
            // The buffer grows as the payload arrives: a header alone pins
            // budget, not memory. A payload that stops arriving (or a
            // shutdown) ends the connection.
            let mut buf = Vec::with_capacity((req.length as usize).min(PAYLOAD_STEP));
            let deadline = export.limits.io_deadline;
            let r = tokio::select! {
                r = read_payload(&mut rd, &mut buf, req.length as usize, deadline, &export.limits, &own, &mut permit.1) => r,
                _ = shutdown.changed() => break Ok(()),
                _ = broken.changed() => break Ok(()),
            };
            match r {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            payload = Some(buf);
        }
        // Timed from here (the request fully received) until its reply is
        // ready: recorded before the reply goes out, so a client that has
        // its answer finds the request counted.
        let started = std::time::Instant::now();
        // Reads of bytes in memory and writes within one already-dirty
        // chunk are answered on the spot: no task, no chunk lock.
        if req.kind == proto::CMD_READ
            && req.length <= proto::MAX_PAYLOAD
            && flags_ok(&req)
            && let Some(data) = export.volume.read_now(req.offset, req.length as u64)
        {
            observe(&export, req.kind, started);
            send_read(&wr, req, data, structured, permit).await;
            continue;
        }
        if let (proto::CMD_WRITE, Some(data), false) = (req.kind, &payload, export.read_only)
            && req.flags == 0
        {
            let now = match export.write_begins() {
                Ok(guard) => export.volume.write_now(req.offset, data).map(|r| (r, guard)),
                Err((errno, _)) => {
                    wr.simple(errno, req.handle, Some(permit)).await;
                    continue;
                }
            };
            if let Some((r, guard)) = now {
                drop(guard);
                observe(&export, req.kind, started);
                match r {
                    Ok(()) => wr.simple(0, req.handle, Some(permit)).await,
                    Err(e) => wr.simple(nbd_errno(&e), req.handle, Some(permit)).await,
                }
                continue;
            }
        }
        let (export, wr) = (export.clone(), wr.clone());
        // Other writes with nothing else in flight are usually memory
        // copies too: poll them once here, which saves a task hand-off when
        // they finish at once. One that has to wait (for a fetch, for dirty
        // memory, for a FUA commit) moves to its own task, so this loop
        // goes on reading requests and never waits for the store.
        let inline = matches!(req.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES | proto::CMD_TRIM);
        let mut work = Box::pin(handle(req, payload, export, wr, neg, permit, started));
        if tasks.is_empty() && inline && futures::poll!(work.as_mut()).is_ready() {
            continue;
        }
        tasks.spawn(work);
    };
    while tasks.join_next().await.is_some() {}
    if !export.read_only
        && let Err(e) = export.flush().await
    {
        tracing::warn!(error = %e, "flush at disconnect failed");
    }
    drop(wr);
    let _ = writer.await;
    result
}

/// Record a request's latency in its volume's histogram for its command
/// (a short lock on that one histogram, never a global one).
fn observe(export: &Export, kind: u16, started: std::time::Instant) {
    use crate::metrics::NbdCommand;
    let command = match kind {
        proto::CMD_READ => NbdCommand::Read,
        proto::CMD_WRITE => NbdCommand::Write,
        proto::CMD_FLUSH => NbdCommand::Flush,
        proto::CMD_TRIM => NbdCommand::Trim,
        proto::CMD_WRITE_ZEROES => NbdCommand::WriteZeroes,
        proto::CMD_CACHE => NbdCommand::Cache,
        proto::CMD_BLOCK_STATUS => NbdCommand::BlockStatus,
        _ => NbdCommand::Other,
    };
    export.volume.metrics().nbd(command).observe(started.elapsed().as_secs_f64());
}

/// Command flags this server did not advertise or does not know (DF,
/// FAST_ZERO, extended headers...), or one used on a command it does not
/// belong to, get EINVAL (after the payload has been read).
fn flags_ok(req: &Request) -> bool {
    let allowed = proto::CMD_FLAG_FUA
        | match req.kind {
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    req.flags & !allowed == 0
}

async fn handle<W: AsyncWrite + Unpin>(
    req: Request,
    payload: Option<Vec<u8>>,
    export: Arc<Export>,
    wr: Replies<W>,
    neg: Negotiated,
    permit: Permit,
    started: std::time::Instant,
) {
    let structured = neg.structured;
    let vol = &export.volume;
    let done = || observe(&export, req.kind, started);
    if !flags_ok(&req) {
        tracing::debug!(kind = req.kind, flags = req.flags, "request with unsupported flags");
        done();
        // Once structured replies are on, a READ (or block status) gets
        // none but structured ones, errors included.
        if structured && matches!(req.kind, proto::CMD_READ | proto::CMD_BLOCK_STATUS) {
            let msg = "unsupported command flags";
            return wr
                .send(vec![Bytes::from(proto::structured_error(req.handle, proto::EINVAL, msg))], Some(permit))
                .await;
        }
        return wr.simple(proto::EINVAL, req.handle, Some(permit)).await;
    }
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let writes = matches!(req.kind, proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES);
    if writes && export.read_only {
        done();
        return wr.simple(proto::EPERM, req.handle, Some(permit)).await;
    }
    let len = req.length as u64;
    let result = match req.kind {
        proto::CMD_READ => {
            if req.length > proto::MAX_PAYLOAD {
                Err((proto::EINVAL, "read larger than the maximum block size".to_string()))
            } else {
                match vol.read_bytes(req.offset, len).await {
                    Ok(data) => {
                        done();
                        return send_read(&wr, req, data, structured, permit).await;
                    }
                    Err(e) => Err((nbd_errno(&e), e.to_string())),
                }
            }
        }
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => match export.write_begins() {
            Ok(guard) => {
                let r = if req.kind == proto::CMD_WRITE {
                    vol.write_vec(req.offset, payload.unwrap_or_default()).await
                } else {
                    vol.write_zeroes(req.offset, len).await
                };
                drop(guard);
                finish(r, fua, &export).await
            }
            Err(e) => Err(e),
        },
        proto::CMD_FLUSH => export.flush().await.map_err(|e| (nbd_errno(&e), e.to_string())),
        proto::CMD_CACHE => vol.prefetch(req.offset, len).await.map_err(|e| (nbd_errno(&e), e.to_string())),
        proto::CMD_BLOCK_STATUS if neg.base_allocation => match block_status(vol, req) {
            Ok(reply) => {
                done();
                return wr.send(vec![Bytes::from(reply)], Some(permit)).await;
            }
            Err(e) => Err(e),
        },
        other => Err((proto::EINVAL, format!("command {other} is not supported"))),
    };
    done();
    match result {
        Ok(()) => wr.simple(0, req.handle, Some(permit)).await,
        Err((errno, msg)) => {
            tracing::debug!(kind = req.kind, offset = req.offset, len, errno, error = %msg, "request failed");
            if structured && matches!(req.kind, proto::CMD_READ | proto::CMD_BLOCK_STATUS) {
                wr.send(vec![Bytes::from(proto::structured_error(req.handle, errno, &msg))], Some(permit)).await
            } else {
                wr.simple(errno, req.handle, Some(permit)).await
            }
        }
    }
}

/// Extents reported per BLOCK_STATUS reply at most; the client asks again
/// for the rest.
const MAX_EXTENTS: usize = 1024;

/// The base:allocation answer: unmapped and all-zero chunks are holes that
/// read as zeros; everything else (stored or dirty data) is allocated.
fn block_status(vol: &Volume, req: Request) -> Result<Vec<u8>, (u32, String)> {
    if req.length == 0 {
        return Err((proto::EINVAL, "block status of zero bytes".into()));
    }
    let size = vol.size();
    if req.offset >= size {
        return Err((proto::EINVAL, format!("block status at {} is past the end ({size})", req.offset)));
    }
    // A request running past the end is answered up to the end.
    let len = (req.length as u64).min(size - req.offset);
    let max = if req.flags & proto::CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
    let runs = vol.allocation(req.offset, len, max).map_err(|e| (nbd_errno(&e), e.to_string()))?;
    let mut body = Vec::with_capacity(4 + runs.len() * 8);
    body.extend_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
    for (n, zero) in runs {
        let flags = if zero { proto::STATE_HOLE | proto::STATE_ZERO } else { 0 };
        // The request's length is 32-bit, so every run fits.
        body.extend_from_slice(&(n as u32).to_be_bytes());
        body.extend_from_slice(&flags.to_be_bytes());
    }
    let header =
        proto::structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, req.handle, body.len() as u32);
    let mut out = header.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

async fn finish(r: VolumeResult<()>, fua: bool, export: &Export) -> Result<(), (u32, String)> {
    let r = match r {
        Ok(()) if fua => export.flush().await,
        other => other,
    };
    r.map_err(|e| match e {
        // A write past the end: ENOSPC, as the spec recommends.
        crate::volume::VolumeError::OutOfRange { .. } => (proto::ENOSPC, e.to_string()),
        e => (nbd_errno(&e), e.to_string()),
    })
}

async fn send_read<W: AsyncWrite + Unpin>(
    wr: &Replies<W>,
    req: Request,
    data: Bytes,
    structured: bool,
    permit: Permit,
) {
    if !structured {
        let header = Bytes::copy_from_slice(&proto::simple_reply(0, req.handle));
        return wr.send(vec![header, data], Some(permit)).await;
    }
    let pieces = proto::split_holes(&data, 4096, is_zero);
    let last = pieces.len().saturating_sub(1);
    let mut parts = Vec::with_capacity(pieces.len() * 2 + 1);
    for (i, (pos, len, hole)) in pieces.iter().enumerate() {
        let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
        let offset = req.offset + *pos as u64;
        if *hole {
            let mut f = proto::structured_header(flags, proto::REPLY_TYPE_OFFSET_HOLE, req.handle, 12).to_vec();
            f.extend_from_slice(&offset.to_be_bytes());
            f.extend_from_slice(&(*len as u32).to_be_bytes());
            parts.push(Bytes::from(f));
        } else {
            let mut f =
                proto::structured_header(flags, proto::REPLY_TYPE_OFFSET_DATA, req.handle, 8 + *len as u32).to_vec();
            f.extend_from_slice(&offset.to_be_bytes());
            parts.push(Bytes::from(f));
            parts.push(data.slice(*pos..*pos + *len));
        }
    }
    if pieces.is_empty() {
        let f = proto::structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, req.handle, 0);
        parts.push(Bytes::copy_from_slice(&f));
    }
    wr.send(parts, Some(permit)).await;
}

#[cfg(test)]
mod poller_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Polling adapts: a client whose requests arrive within the budget
    /// keeps it polling; one paced slower than the budget (each poll would
    /// spin in vain) turns it off at once, and the next wait returns
    /// without spinning.
    #[test]
    fn polling_stops_for_clients_slower_than_the_budget() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let budget = Duration::from_millis(2);
        let mut p = Poller::new(a.as_raw_fd(), budget);
        p.wait();
        p.arrived();
        assert!(p.hot, "back-to-back requests must keep polling on");
        p.wait();
        std::thread::sleep(budget * 2);
        p.arrived();
        assert!(!p.hot, "a client paced at twice the budget still made the server poll");
        let start = Instant::now();
        p.wait();
        assert!(start.elapsed() < budget, "a cold connection spun");
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A payload whose client waited for the server-wide budget (held by
    /// other connections) gets its whole deadline for the rest once the
    /// budget is granted. The wait was counted in, so the first read after
    /// it timed out at once and the connection (the kernel's only one)
    /// was cut.
    #[tokio::test]
    async fn a_wait_for_the_budget_does_not_count_against_the_payload() {
        let (mut client, mut server_end) = tokio::io::duplex(8 << 10);
        let limits = Limits::new(0, 1, Duration::from_secs(1));
        let server = limits.inflight.clone();
        let all = server.available_permits() as u32;
        let others = server.clone().acquire_many_owned(all).await.expect("the others' share");
        let mut held = server.clone().acquire_many_owned(0).await.expect("none");
        let len = 2 * FIRST_BYTES;
        let data = vec![7u8; len];
        let deadline = Duration::from_millis(300);
        let feed = tokio::spawn(async move {
            client.write_all(&data[..FIRST_BYTES]).await.expect("first bytes");
            // The budget comes back after more than the deadline; the
            // rest of the payload follows soon after.
            tokio::time::sleep(Duration::from_millis(800)).await;
            drop(others);
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&data[FIRST_BYTES..]).await.expect("the rest");
            client
        });
        let mut buf = Vec::new();
        let r = read_payload(&mut server_end, &mut buf, len, deadline, &limits, &AtomicUsize::new(0), &mut held).await;
        assert!(matches!(r, Ok(true)), "the payload was cut off: {r:?}");
        assert_eq!(buf.len(), len);
        drop(feed.await.expect("feeder"));
    }
}
