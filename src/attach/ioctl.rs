//! The kernel's older NBD interface: ioctls on `/dev/nbdX` (what
//! `nbd-client -L` does). The fallback where the nbd netlink family is not
//! reachable: before Linux 6.4 it exists only in the host's network
//! namespace, so a node plugin in a pod's own namespace cannot see it.
//!
//! What this interface cannot do: the kernel's side of the connection
//! lives only as long as the `NBD_DO_IT` ioctl, which blocks in a thread of
//! this process. When the process exits, the kernel shuts the connection
//! down and I/O on the device fails (a mounted device keeps its size, so it
//! stays taken until it is detached); there is no dead-connection timeout
//! and no way to hand the kernel a fresh socket (`NBD_CMD_RECONFIGURE` is
//! netlink only).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::handshake::Connected;

// linux/nbd.h: _IO(0xab, n).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_SET_SIZE: libc::c_ulong = 0xab02;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

pub const BLOCK_SIZE: u64 = 4096;

fn ioctl(fd: RawFd, what: &str, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every NBD ioctl used here takes its argument by value; the
    // descriptor is open for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, request as _, arg) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn open(dev: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(dev)
}

/// How an ioctl attach attempt ended before the device came up.
#[derive(Debug)]
pub enum SetupError {
    /// Another task is setting the device up (`EBUSY` on `NBD_SET_SOCK`):
    /// try the next one.
    Busy,
    Failed(io::Error),
}

/// A device attached through ioctls: the thread blocked in `NBD_DO_IT`.
#[derive(Debug)]
pub struct Link {
    pub device: String,
    thread: JoinHandle<io::Result<()>>,
}

impl Link {
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Wait for the `NBD_DO_IT` thread to end (after a disconnect or when
    /// the server went away); its result says why it ended.
    pub fn join(self) -> io::Result<()> {
        self.thread.join().unwrap_or_else(|_| Err(io::Error::other("the NBD_DO_IT thread panicked")))
    }
}

/// Attach `dev` to the handshaken connection. Returns once the kernel took
/// the socket and the device configuration; the device shows its size a
/// moment later, when `NBD_DO_IT` has started in the link's thread.
pub fn attach(dev: &str, conn: &Connected) -> Result<Link, SetupError> {
    if !conn.size.is_multiple_of(BLOCK_SIZE) {
        return Err(SetupError::Failed(io::Error::other(format!(
            "export size {} is not a multiple of {BLOCK_SIZE}",
            conn.size
        ))));
    }
    let file = open(dev).map_err(|e| SetupError::Failed(io::Error::new(e.kind(), format!("open {dev}: {e}"))))?;
    // The kernel takes its own reference to the socket on NBD_SET_SOCK.
    let sock = conn.stream.try_clone().map_err(SetupError::Failed)?;
    let (blocks, flags) = (conn.size / BLOCK_SIZE, conn.flags as libc::c_ulong);
    let (setup_tx, setup_rx) = mpsc::channel::<Result<(), SetupError>>();
    let name = format!("nbd-do-it-{}", dev.trim_start_matches("/dev/"));
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // A signal delivered to this thread would interrupt NBD_DO_IT,
            // and the kernel tears the device down when it is interrupted.
            // The process gets signals (SIGCHLD from mkfs and mount,
            // SIGTERM) on its other threads.
            block_all_signals();
            let fd = file.as_raw_fd();
            // NBD_SET_SOCK first: it makes this thread the device's only
            // setup task, so no other task's configuration can mix with ours.
            if let Err(e) = ioctl(fd, "NBD_SET_SOCK", NBD_SET_SOCK, sock.as_raw_fd() as libc::c_ulong) {
                let busy = e.raw_os_error() == Some(libc::EBUSY);
                let _ = setup_tx.send(Err(if busy { SetupError::Busy } else { SetupError::Failed(e) }));
                return Ok(());
            }
            drop(sock);
            let setup = ioctl(fd, "NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, BLOCK_SIZE as libc::c_ulong)
                .and_then(|()| ioctl(fd, "NBD_SET_SIZE_BLOCKS", NBD_SET_SIZE_BLOCKS, blocks as libc::c_ulong))
                .and_then(|()| ioctl(fd, "NBD_SET_FLAGS", NBD_SET_FLAGS, flags))
                // No request timeout, as on the netlink path: a slow store
                // makes I/O wait, it never fails it (a timeout on the only
                // connection would mark it dead, and nothing can replace it).
                // Set explicitly: the device may keep a previous user's value.
                .and_then(|()| ioctl(fd, "NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, 0));
            if let Err(e) = setup {
                let _ = ioctl(fd, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
                let _ = setup_tx.send(Err(SetupError::Failed(e)));
                return Ok(());
            }
            let _ = setup_tx.send(Ok(()));
            // Blocks while the device is attached; returns after
            // NBD_DISCONNECT or when the server closes the connection.
            let done = ioctl(fd, "NBD_DO_IT", NBD_DO_IT, 0);
            let _ = ioctl(fd, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
            done
            // Closing `file` drops the device's configuration.
        })
        .map_err(SetupError::Failed)?;
    match setup_rx.recv() {
        Ok(Ok(())) => Ok(Link { device: dev.to_string(), thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(SetupError::Failed(match thread.join() {
            Ok(Err(e)) => e,
            _ => io::Error::other("the NBD_DO_IT thread ended during setup"),
        })),
    }
}

/// Ask the kernel to disconnect `dev`: it sends the server NBD_CMD_DISC
/// and the `NBD_DO_IT` call returns. Works on a netlink-attached device too.
pub fn disconnect(dev: &str) -> io::Result<()> {
    let file = open(dev).map_err(|e| io::Error::new(e.kind(), format!("open {dev}: {e}")))?;
    ioctl(file.as_raw_fd(), "NBD_DISCONNECT", NBD_DISCONNECT, 0)?;
    ioctl(file.as_raw_fd(), "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0)
}

/// Tell the kernel an ioctl-attached device grew (`NBD_SET_SIZE`).
pub fn set_size(dev: &str, bytes: u64) -> io::Result<()> {
    let file = open(dev).map_err(|e| io::Error::new(e.kind(), format!("open {dev}: {e}")))?;
    ioctl(file.as_raw_fd(), "NBD_SET_SIZE", NBD_SET_SIZE, bytes as libc::c_ulong)
}

fn block_all_signals() {
    // SAFETY: sigfillset initialises the set we own; pthread_sigmask only
    // changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
