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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl Listen {
    /// `unix:PATH`, a path containing `/` or ending in `.sock`, or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
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
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound listener; `serve` runs it.
pub struct Bound {
    acceptor: Acceptor,
    /// The address clients use (`unix:/abs/path` or `host:port`).
    pub address: String,
}

/// Bind without serving yet, so the caller can print the address first.
pub async fn bind(listen: &Listen) -> std::io::Result<Bound> {
    match listen {
        Listen::Unix(path) => {
            let path = std::path::absolute(path)?;
            remove_stale_socket(&path)?;
            let l = UnixListener::bind(&path)?;
            Ok(Bound { address: format!("unix:{}", path.display()), acceptor: Acceptor::Unix(l, path) })
        }
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr).await?;
            let local = l.local_addr()?;
            Ok(Bound { address: local.to_string(), acceptor: Acceptor::Tcp(l) })
        }
    }
}

/// Remove a socket file left by a previous run; refuse to remove anything else.
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Serve until `shutdown` turns true: then stop accepting, let sessions
/// finish their in-flight requests, and flush the volume.
pub async fn serve(bound: Bound, export: Arc<Export>, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let mut sessions = JoinSet::new();
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
            r = accept(&bound.acceptor) => match r {
                Ok(Conn::Unix(s)) => {
                    let fd = s.as_raw_fd();
                    let (r, w) = s.into_split();
                    let f = session::run(r, w, export.clone(), shutdown.clone(), Some(fd));
                    spawn_session(&mut sessions, "unix".into(), Box::pin(f))
                }
                Ok(Conn::Tcp(s, peer)) => {
                    let _ = s.set_nodelay(true);
                    let fd = s.as_raw_fd();
                    let (r, w) = s.into_split();
                    let f = session::run(r, w, export.clone(), shutdown.clone(), Some(fd));
                    spawn_session(&mut sessions, peer, Box::pin(f))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(60), drain).await.is_err() {
        tracing::warn!("sessions did not finish within 60s");
    }
    if !export.read_only {
        export.volume.flush().await.map_err(std::io::Error::other)?;
    }
    if let Acceptor::Unix(_, path) = &bound.acceptor {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

type SessionFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), session::SessionError>> + Send>>;

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, String),
}

async fn accept(a: &Acceptor) -> std::io::Result<Conn> {
    match a {
        Acceptor::Unix(l, _) => Ok(Conn::Unix(l.accept().await?.0)),
        Acceptor::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok(Conn::Tcp(s, peer.to_string()))
        }
    }
}
