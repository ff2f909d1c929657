//! The listener: a unix socket (default) or TCP, one session per
//! connection, graceful shutdown.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::session::{self, Export};
use super::tls::{Policy, Tls};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl Listen {
    /// `unix:PATH`, a path containing `/` or ending in `.sock`, or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(hp) = s.strip_prefix("tcp://") {
            return match hp.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Listen::Tcp(hp.to_string()))
                }
                _ => Err(format!("--listen {s:?}: expected tcp://HOST:PORT")),
            };
        }
        if let Some(p) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if s.contains('/') || s.ends_with(".sock") {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        match s.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => Ok(Listen::Tcp(s.to_string())),
            _ => Err(format!("--listen {s:?}: expected unix:PATH or HOST:PORT")),
        }
    }
}

enum Acceptor {
    /// The listener, its path, and the identity of the socket file we made.
    Unix(UnixListener, PathBuf, (u64, u64)),
    Tcp(TcpListener),
}

impl Drop for Acceptor {
    /// A socket file goes with its listener, whether it served or not (a
    /// server that binds and then refuses to start leaves nothing behind);
    /// only our own: another server may have taken the path since.
    fn drop(&mut self) {
        if let Acceptor::Unix(_, path, owned) = self
            && socket_identity(path).is_ok_and(|id| id == *owned)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A bound listener; `serve` runs it.
pub struct Bound {
    acceptor: Acceptor,
    tls: Option<Arc<Tls>>,
    /// The address clients use (`unix:/abs/path` or `host:port`).
    pub address: String,
}

/// Bind without serving yet, so the caller can print the address first.
/// A unix socket is created with mode 0600 (whatever the umask) and never
/// replaces a socket another server still answers on. `tls`: the TLS setup
/// every connection is offered (or required to use).
pub async fn bind(listen: &Listen, tls: Option<Arc<Tls>>) -> std::io::Result<Bound> {
    match listen {
        Listen::Unix(path) => {
            let path = std::path::absolute(path)?;
            remove_stale_socket(&path).await?;
            let l = bind_private(&path)?;
            let owned = socket_identity(&path)?;
            Ok(Bound { address: format!("unix:{}", path.display()), acceptor: Acceptor::Unix(l, path, owned), tls })
        }
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr).await?;
            let local = l.local_addr()?;
            if !local.ip().is_loopback() {
                match tls.as_deref().map(|t| t.policy) {
                    None => tracing::warn!(
                        address = %local,
                        "serving on a non-loopback address without TLS or authentication: anyone who can reach it can read and write the volume (see --tls-cert, --tls-psk)"
                    ),
                    Some(Policy::Offer) => tracing::warn!(
                        address = %local,
                        "serving on a non-loopback address with TLS optional (--tls=on): clients that skip TLS are served in plaintext, unauthenticated"
                    ),
                    Some(Policy::Require) => {}
                }
            }
            Ok(Bound { address: local.to_string(), acceptor: Acceptor::Tcp(l), tls })
        }
    }
}

/// Bind the socket in a fresh private directory beside `path`, make it
/// 0600, then move it into place: no moment exists at which another user
/// could connect to it.
fn bind_private(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().ok_or_else(|| std::io::Error::other("socket path has no parent directory"))?;
    let tmp = dir.join(format!(".s3blk-sock-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let inner = tmp.join("sock");
    let result = (|| {
        let l = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&tmp);
    result
}

/// (device, inode) of the socket file: at exit only our own is removed.
fn socket_identity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Remove a socket file left by a previous run. Refuse anything else, and a
/// socket that another server still accepts connections on.
async fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "{} is the socket of a server that is running; stop it first or pick another path",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Turn on TCP keepalive, so a peer that vanished without a word is noticed.
fn keepalive(fd: std::os::fd::RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor we own, with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Serve until `shutdown` turns true: then stop accepting, commit what the
/// volume holds, let sessions finish their in-flight requests (they stop
/// reading new ones), and commit again.
pub async fn serve(bound: Bound, export: Arc<Export>, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let mut sessions = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let spawn_session = |sessions: &mut JoinSet<()>, peer: String, fut: SessionFuture| {
            let _ = sessions.spawn(async move {
                tracing::info!(%peer, "client connected");
                match fut.await {
                    Ok(()) => tracing::info!(%peer, "client disconnected"),
                    Err(e) => tracing::warn!(%peer, error = %e, "session ended with an error"),
                }
            });
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            r = accept(&bound.acceptor) => {
                let conn = match r {
                    Ok(c) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        c
                    }
                    Err(e) => {
                        // Out of descriptors, say: back off instead of spinning.
                        tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                };
                if sessions.len() >= export.limits.max_connections {
                    tracing::warn!(limit = export.limits.max_connections, "connection refused: too many connections");
                    drop(conn);
                    continue;
                }
                let tls = bound.tls.clone();
                match conn {
                    Conn::Unix(s) => {
                        let fd = s.as_raw_fd();
                        let f = session::run(s, export.clone(), shutdown.clone(), Some(fd), tls);
                        spawn_session(&mut sessions, "unix".into(), Box::pin(f))
                    }
                    Conn::Tcp(s, peer) => {
                        let _ = s.set_nodelay(true);
                        let fd = s.as_raw_fd();
                        keepalive(fd);
                        let f = session::run(s, export.clone(), shutdown.clone(), Some(fd), tls);
                        spawn_session(&mut sessions, peer, Box::pin(f))
                    }
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    tracing::info!("shutting down: committing, then finishing in-flight requests");
    let first = if export.read_only { Ok(()) } else { export.flush().await };
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, drain).await.is_err() {
        tracing::warn!("sessions did not finish within {DRAIN:?}");
    }
    let last = if export.read_only { Ok(()) } else { export.flush().await };
    drop(bound);
    first.and(last).map_err(std::io::Error::other)
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long shutdown waits for sessions to finish their in-flight requests.
const DRAIN: Duration = Duration::from_secs(20);

type SessionFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), session::SessionError>> + Send>>;

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, String),
}

async fn accept(a: &Acceptor) -> std::io::Result<Conn> {
    match a {
        Acceptor::Unix(l, _, _) => Ok(Conn::Unix(l.accept().await?.0)),
        Acceptor::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok(Conn::Tcp(s, peer.to_string()))
        }
    }
}
