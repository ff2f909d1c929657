//! Attaching volumes to the kernel's NBD driver through its generic
//! netlink interface.
//!
//! The plugin connects to its own per-volume NBD socket, performs the
//! client handshake itself, and hands the connected socket to the kernel
//! (`NBD_CMD_CONNECT`) with a dead-connection timeout. If the plugin
//! restarts, the kernel holds I/O for that long; the new plugin serves the
//! volume again and gives the kernel a fresh socket (`NBD_CMD_RECONFIGURE`),
//! and the mounted filesystem never sees an error.

pub mod handshake;
pub mod netlink;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

pub use netlink::NbdNetlink;

/// How long the kernel keeps I/O waiting for a new connection when the
/// serving process goes away (plugin restart or upgrade).
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("NBD handshake with {0}: {1}")]
    Handshake(String, String),
    #[error("nbd netlink: {0}")]
    Netlink(std::io::Error),
    #[error("{0} did not reach the expected size within {1:?}")]
    Timeout(String, Duration),
}

fn index_of(dev: &str) -> Result<u32, AttachError> {
    dev.trim_start_matches("/dev/nbd")
        .parse()
        .map_err(|_| AttachError::Netlink(std::io::Error::other(format!("{dev} is not an nbd device"))))
}

async fn wait_size(dev: &str, cond: impl Fn(u64) -> bool) -> Result<(), AttachError> {
    let limit = Duration::from_secs(20);
    let start = std::time::Instant::now();
    while !cond(crate::csi::mount::device_size(dev)) {
        if start.elapsed() > limit {
            return Err(AttachError::Timeout(dev.to_string(), limit));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Run blocking socket and netlink work off the async workers: the NBD
/// server answering the handshake may be a task of this very runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AttachError> + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AttachError::Netlink(std::io::Error::other(format!("attach worker: {e}"))))?
}

/// Connect `dev` to the export on `socket`.
pub async fn connect(socket: &Path, export: &str, dev: &str) -> Result<(), AttachError> {
    let index = index_of(dev)?;
    let (socket, export) = (socket.to_path_buf(), export.to_string());
    blocking(move || {
        let conn = handshake::client(&socket, &export)?;
        let mut nl = NbdNetlink::open().map_err(AttachError::Netlink)?;
        nl.connect(index, conn.stream.as_raw_fd(), conn.size, 4096, conn.flags as u64, DEAD_CONN_TIMEOUT.as_secs())
            .map_err(AttachError::Netlink)
        // The kernel holds its own reference to the socket; ours closes here.
    })
    .await?;
    wait_size(dev, |s| s > 0).await
}

/// Give a connected device a fresh socket (after the server restarted).
pub async fn reconnect(socket: &Path, export: &str, dev: &str) -> Result<(), AttachError> {
    let index = index_of(dev)?;
    let (socket, export) = (socket.to_path_buf(), export.to_string());
    blocking(move || {
        let conn = handshake::client(&socket, &export)?;
        let mut nl = NbdNetlink::open().map_err(AttachError::Netlink)?;
        nl.reconfigure(index, Some(conn.stream.as_raw_fd()), None).map_err(AttachError::Netlink)
    })
    .await
}

/// Tell the kernel the device grew.
pub async fn resize(dev: &str, size: u64) -> Result<(), AttachError> {
    let index = index_of(dev)?;
    blocking(move || {
        let mut nl = NbdNetlink::open().map_err(AttachError::Netlink)?;
        nl.reconfigure(index, None, Some(size)).map_err(AttachError::Netlink)
    })
    .await
}

pub async fn disconnect(dev: &str) -> Result<(), AttachError> {
    if crate::csi::mount::device_size(dev) == 0 {
        return Ok(());
    }
    let index = index_of(dev)?;
    blocking(move || {
        let mut nl = NbdNetlink::open().map_err(AttachError::Netlink)?;
        nl.disconnect(index).map_err(AttachError::Netlink)
    })
    .await?;
    wait_size(dev, |s| s == 0).await
}
