//! The node's `/dev/nbdX` devices as the kernel reports them in sysfs, and
//! the choice of a free one.
//!
//! Choosing must be safe against everything else on the node: another
//! stage in this process, another s3blk process (a plugin being replaced),
//! and tools that do not know about s3blk (`nbd-client`, an administrator).
//! A node-wide lock (`flock` on a file in the host's state directory)
//! serialises s3blk's own choices from "which device is free" until the
//! chosen device shows its size. Foreign users are caught by what the
//! kernel reports: a device with a size or a client pid is attached, one
//! with holders (device-mapper, md) or a mounted filesystem is in use even
//! when its connection is gone. A stale mount on a disconnected device is
//! the dangerous case: attaching another volume there would let the old
//! filesystem write into it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn sys_block(dev: &str) -> PathBuf {
    PathBuf::from("/sys/block").join(dev.trim_start_matches("/dev/"))
}

/// Size in bytes the kernel reports for an nbd device (0 = not connected).
pub fn device_size(dev: &str) -> u64 {
    std::fs::read_to_string(sys_block(dev).join("size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .unwrap_or(0)
}

/// The device's `major:minor` as sysfs reports it.
pub fn dev_t(dev: &str) -> Option<String> {
    std::fs::read_to_string(sys_block(dev).join("dev")).ok().map(|s| s.trim().to_string())
}

/// Every nbd device the kernel has, in numeric order.
pub fn nbd_devices() -> Vec<String> {
    let mut devs: Vec<(u32, String)> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_prefix("nbd").and_then(|i| i.parse::<u32>().ok()).map(|i| (i, n)))
                .collect()
        })
        .unwrap_or_default();
    devs.sort();
    devs.into_iter().map(|(_, n)| format!("/dev/{n}")).collect()
}

/// Is the nbd driver in the kernel (loaded as a module or built in)?
pub fn driver_present() -> bool {
    Path::new("/sys/module/nbd").exists() || !nbd_devices().is_empty()
}

/// The number in `/dev/nbdN`.
pub fn index_of(dev: &str) -> Option<u32> {
    dev.strip_prefix("/dev/nbd").and_then(|i| i.parse().ok())
}

/// Why a device cannot be used; `None` when it looks free.
pub fn in_use(dev: &str) -> Option<String> {
    let sys = sys_block(dev);
    if device_size(dev) != 0 {
        return Some("attached (it has a size)".into());
    }
    if sys.join("pid").exists() {
        return Some("a client process holds it".into());
    }
    if std::fs::read_dir(sys.join("holders")).is_ok_and(|mut d| d.next().is_some()) {
        return Some("another block device is stacked on it (holders)".into());
    }
    if let Some(dev_t) = std::fs::read_to_string(sys.join("dev")).ok().map(|s| s.trim().to_string())
        && mounted(&dev_t)
    {
        return Some(format!("a filesystem on it is still mounted ({dev_t})"));
    }
    None
}

/// Is a filesystem on the device `major:minor` mounted in this mount
/// namespace? (Mounts in other namespaces are caught by [`claim_probe`].)
fn mounted(dev_t: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|info| info.lines().any(|l| l.split(' ').nth(2) == Some(dev_t)))
}

/// Open the device exclusively for a moment: the kernel refuses
/// (`EBUSY`) while any filesystem in any mount namespace, or a stacked
/// device, holds it. Read-only, so closing it does not make udev rescan.
pub fn claim_probe(dev: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(dev).map(drop)
}

/// Devices that look free, in numeric order, minus those in `taken`.
pub fn candidates(taken: &[String]) -> Vec<String> {
    nbd_devices().into_iter().filter(|d| !taken.contains(d) && in_use(d).is_none()).collect()
}

/// The node-wide allocation lock: held from choosing a device until it
/// shows its size, released on drop. `flock` locks belong to the open file,
/// so two opens in one process exclude each other as two processes do.
#[derive(Debug)]
pub struct AllocationLock {
    _file: File,
}

impl AllocationLock {
    /// Wait up to `limit` for the lock.
    pub fn acquire(path: &Path, limit: Duration) -> io::Result<Self> {
        let start = Instant::now();
        loop {
            if let Some(lock) = Self::try_acquire(path)? {
                return Ok(lock);
            }
            if start.elapsed() > limit {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("held by another attach for more than {limit:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The lock if nobody holds it, `None` otherwise.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: flock on a descriptor we own for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Self { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(e) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_of_accepts_only_nbd_devices() {
        assert_eq!(index_of("/dev/nbd0"), Some(0));
        assert_eq!(index_of("/dev/nbd15"), Some(15));
        assert_eq!(index_of("/dev/sda"), None);
        assert_eq!(index_of("/dev/nbd"), None);
        assert_eq!(index_of("/dev/nbd1p1"), None);
    }

    #[test]
    fn the_allocation_lock_excludes_a_second_opener_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("attach.lock");
        let held = AllocationLock::acquire(&path, Duration::from_secs(1)).expect("lock");
        assert!(AllocationLock::try_acquire(&path).expect("try").is_none(), "a second open got the lock");
        // Another thread blocks until the first holder lets go.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let lock = AllocationLock::acquire(&p, Duration::from_secs(10)).expect("lock in thread");
            tx.send(()).expect("send");
            drop(lock);
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "the lock was not exclusive");
        drop(held);
        rx.recv_timeout(Duration::from_secs(5)).expect("the waiter got the lock after the drop");
        waiter.join().expect("join");
        let _again = AllocationLock::acquire(&path, Duration::from_secs(1)).expect("free again");
        let e = AllocationLock::acquire(&path, Duration::from_millis(100)).expect_err("held");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
