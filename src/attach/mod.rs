//! Attaching volumes to the kernel's NBD driver: choosing a free
//! `/dev/nbdX`, connecting it to the volume's NBD socket, reconnecting it
//! after a plugin restart, growing it, and letting it go.
//!
//! The plugin connects to its own per-volume NBD socket, performs the
//! client handshake itself, and hands the connected socket to the kernel
//! through one of two interfaces:
//!
//! - **netlink** (first choice, `netlink.rs`): `NBD_CMD_CONNECT` with a
//!   dead-connection timeout. If the plugin restarts, the kernel holds I/O
//!   for that long; the new plugin serves the volume again and gives the
//!   kernel a fresh socket (`NBD_CMD_RECONFIGURE`), and the mounted
//!   filesystem never sees an error. Before Linux 6.4 the kernel offers
//!   the nbd netlink family only in the host's network namespace.
//! - **ioctl** (fallback, `ioctl.rs`): used when the netlink family is not
//!   reachable but the driver is loaded, i.e. a plugin in a pod's own
//!   network namespace on a kernel before 6.4. Attach, detach and resize
//!   work; a restart of the plugin does not: the device lives as long as a
//!   thread of this process, so its I/O fails when the process exits.
//!
//! Devices are chosen under a node-wide lock (`devices.rs`).

pub mod devices;
pub mod handshake;
pub mod ioctl;
pub mod netlink;

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use netlink::NbdNetlink;

use devices::{AllocationLock, device_size};
use handshake::Connected;

/// How long the kernel keeps I/O waiting for a new connection when the
/// serving process goes away (plugin restart or upgrade); netlink only.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long an attach may wait for another one to finish choosing.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// The kernel interface a device was attached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Netlink,
    Ioctl,
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interface::Netlink => "netlink",
            Interface::Ioctl => "ioctl",
        })
    }
}

/// What the fix is when a volume must survive a plugin restart.
const KEEP_ACROSS_RESTARTS: &str = "run the node plugin in the host's network namespace (hostNetwork: true, as the chart does) or on Linux 6.4 or later";

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("NBD handshake with {0}: {1}")]
    Handshake(String, String),
    #[error(
        "the nbd kernel driver is not loaded: run `modprobe nbd nbds_max=64` on the node (the chart's load-nbd init \
         container does this; it needs the host's /lib/modules)"
    )]
    DriverMissing,
    #[error(
        "no free /dev/nbd device ({detail}): load the nbd module with more devices (modprobe nbd nbds_max=N; the \
         chart's node.nbdsMax, applied when the module is next loaded) or attach fewer volumes per node \
         (node.maxVolumes)"
    )]
    NoFreeDevice { detail: String },
    #[error("nbd netlink: {0}")]
    Netlink(io::Error),
    #[error("nbd ioctl on {0}: {1}")]
    Ioctl(String, io::Error),
    #[error("{device} needs a new connection after the plugin restarted, which only netlink can give: {why}")]
    NoReconnect { device: String, why: String },
    #[error("node-wide attach lock {0}: {1}")]
    Lock(PathBuf, io::Error),
    #[error("{0} is not an nbd device")]
    NotNbd(String),
    #[error("{0} is held or being set up by another task")]
    DeviceBusy(String),
    #[error("{0} did not reach the expected size within {1:?}")]
    Timeout(String, Duration),
    #[error("attach worker: {0}")]
    Worker(String),
}

/// A device connected to a volume's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub device: String,
    pub interface: Interface,
}

/// `(major, minor, release)` of the running kernel, from uname.
pub fn kernel_version() -> Option<(u32, u32, String)> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u lives across the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let release: String = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect();
    let (major, minor) = version_of(&release)?;
    Some((major, minor, release))
}

/// `(major, minor)` of a kernel release string such as `6.1.0-28-amd64`.
fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Why the netlink family is missing although the driver is loaded.
fn netlink_unreachable_reason() -> String {
    match kernel_version() {
        Some((major, minor, release)) if (major, minor) < (6, 4) => format!(
            "Linux {release} offers the nbd netlink family only in the host's network namespace (from 6.4 on, in \
             every one), and this process runs in another one"
        ),
        Some((_, _, release)) => {
            format!("Linux {release} does not offer the nbd netlink family to this process's network namespace")
        }
        None => "the nbd netlink family is not reachable from this process's network namespace".into(),
    }
}

/// The interface to use now: netlink when the family is reachable.
enum Route {
    Netlink(NbdNetlink),
    Ioctl,
}

fn route() -> Result<Route, AttachError> {
    match NbdNetlink::open() {
        Ok(nl) => Ok(Route::Netlink(nl)),
        Err(netlink::OpenError::FamilyMissing) if !devices::driver_present() => Err(AttachError::DriverMissing),
        Err(netlink::OpenError::FamilyMissing) => Ok(Route::Ioctl),
        Err(netlink::OpenError::Io(e)) => Err(AttachError::Netlink(e)),
    }
}

/// How connecting one device went.
enum Connect {
    /// The kernel took the socket; it holds its own reference to it.
    Netlink,
    /// Attached; the link's thread keeps the device connected.
    Ioctl(ioctl::Link),
    /// Another task holds the device or is setting it up.
    Busy,
}

fn connect_device(route: &mut Route, dev: &str, conn: &Connected) -> Result<Connect, AttachError> {
    let index = devices::index_of(dev).ok_or_else(|| AttachError::NotNbd(dev.to_string()))?;
    match route {
        Route::Netlink(nl) => {
            let flags = conn.flags as u64;
            let r = nl.connect(index, conn.stream.as_raw_fd(), conn.size, 4096, flags, DEAD_CONN_TIMEOUT.as_secs());
            match r {
                Ok(()) => Ok(Connect::Netlink),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(Connect::Busy),
                Err(e) => Err(AttachError::Netlink(e)),
            }
        }
        Route::Ioctl => match ioctl::attach(dev, conn) {
            Ok(link) => Ok(Connect::Ioctl(link)),
            Err(ioctl::SetupError::Busy) => Ok(Connect::Busy),
            Err(ioctl::SetupError::Failed(e)) => Err(AttachError::Ioctl(dev.to_string(), e)),
        },
    }
}

/// Run blocking socket, netlink and ioctl work off the async workers: the
/// NBD server answering the handshake may be a task of this very runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AttachError> + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AttachError::Worker(e.to_string()))?
}

async fn wait_size(dev: &str, cond: impl Fn(u64) -> bool) -> Result<(), AttachError> {
    let limit = Duration::from_secs(20);
    let start = std::time::Instant::now();
    while !cond(device_size(dev)) {
        if start.elapsed() > limit {
            return Err(AttachError::Timeout(dev.to_string(), limit));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Which device to connect: any free one, or a given one (a device this
/// node already recorded as the volume's, after a restart).
enum Target {
    AnyFree { taken: Vec<String> },
    Device(String),
}

/// Attaches, reconnects, resizes and detaches devices for one node plugin.
/// Keeps the threads of ioctl-attached devices.
#[derive(Debug)]
pub struct Attacher {
    lock_path: PathBuf,
    links: Mutex<HashMap<String, ioctl::Link>>,
    explained_ioctl: AtomicBool,
}

impl Attacher {
    /// `state_dir` is on the host and shared by every plugin process of
    /// this node: the allocation lock lives there.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            lock_path: state_dir.join("attach.lock"),
            links: Mutex::new(HashMap::new()),
            explained_ioctl: AtomicBool::new(false),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, ioctl::Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Devices attached through ioctls by this process: their I/O fails
    /// when it exits.
    pub fn ioctl_devices(&self) -> Vec<String> {
        let mut v: Vec<String> = self.links().keys().cloned().collect();
        v.sort();
        v
    }

    /// Choose a free device (none of `taken`) and connect it to the export
    /// on `socket`.
    pub async fn attach(&self, socket: &Path, export: &str, taken: &[String]) -> Result<Attached, AttachError> {
        self.attach_to(socket, export, Target::AnyFree { taken: taken.to_vec() }).await
    }

    /// Connect a given, unconnected device again (its record says it is
    /// this volume's, e.g. after a restart on the ioctl interface).
    pub async fn attach_device(&self, socket: &Path, export: &str, device: &str) -> Result<Attached, AttachError> {
        self.attach_to(socket, export, Target::Device(device.to_string())).await
    }

    async fn attach_to(&self, socket: &Path, export: &str, target: Target) -> Result<Attached, AttachError> {
        let (socket, export, lock_path) = (socket.to_path_buf(), export.to_string(), self.lock_path.clone());
        let (lock, device, link) = blocking(move || {
            let lock = AllocationLock::acquire(&lock_path, LOCK_WAIT).map_err(|e| AttachError::Lock(lock_path, e))?;
            let mut route = route()?;
            let conn = handshake::client(&socket, &export)?;
            // A given device is this volume's own (its stale mount may
            // still hold it); any other must be proven free.
            let (candidates, in_use, probe) = match target {
                Target::Device(d) => (vec![d], 0, false),
                Target::AnyFree { taken } => {
                    let free = devices::candidates(&taken);
                    let in_use = devices::nbd_devices().len().saturating_sub(free.len());
                    (free, in_use, true)
                }
            };
            let mut busy = 0;
            for dev in &candidates {
                // The netlink CONNECT refuses a device anybody holds open;
                // the ioctls do not, so check first: a filesystem mounted in
                // another mount namespace, or a stacked device, holds the
                // device exclusively.
                if probe
                    && matches!(route, Route::Ioctl)
                    && let Err(e) = devices::claim_probe(dev)
                {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        busy += 1;
                        tracing::debug!(device = %dev, "held exclusively (mounted elsewhere?): skipped");
                        continue;
                    }
                    return Err(AttachError::Ioctl(dev.clone(), e));
                }
                match connect_device(&mut route, dev, &conn)? {
                    Connect::Netlink => return Ok((lock, dev.clone(), None)),
                    Connect::Ioctl(link) => return Ok((lock, dev.clone(), Some(link))),
                    Connect::Busy => {
                        busy += 1;
                        tracing::debug!(device = %dev, "another task holds it or is setting it up: skipped");
                    }
                }
            }
            if !probe {
                return Err(AttachError::DeviceBusy(candidates.join(", ")));
            }
            let detail = if candidates.is_empty() && in_use == 0 {
                "the nbd driver has no devices".to_string()
            } else {
                format!("{} in use, {busy} held or being set up by another task", in_use)
            };
            Err(AttachError::NoFreeDevice { detail })
        })
        .await?;
        let interface = if link.is_some() { Interface::Ioctl } else { Interface::Netlink };
        if let Some(link) = link {
            self.links().insert(device.clone(), link);
        }
        // The lock is held until the device shows its size, so the next
        // attach sees it as taken.
        let up = self.wait_attached(&device).await;
        drop(lock);
        if let Err(e) = up {
            if let Err(d) = self.detach(&device).await {
                tracing::warn!(device = %device, error = %d, "letting go of a device that never came up failed");
            }
            return Err(e);
        }
        match interface {
            Interface::Netlink => tracing::info!(
                device = %device, interface = "netlink",
                "attached; survives a plugin restart for {}s", DEAD_CONN_TIMEOUT.as_secs()
            ),
            Interface::Ioctl => {
                if !self.explained_ioctl.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "attaching through the NBD ioctl interface: {}. Attach, detach and expansion work; what is \
                         lost is reconnecting after a plugin restart (netlink only): when this plugin exits, I/O on \
                         every volume it attached fails until the volume is staged again. To keep volumes across \
                         restarts, {KEEP_ACROSS_RESTARTS}",
                        netlink_unreachable_reason()
                    );
                }
                tracing::warn!(
                    device = %device, interface = "ioctl",
                    "attached; its I/O fails if the plugin restarts (no reconnect without netlink)"
                );
            }
        }
        Ok(Attached { device, interface })
    }

    /// Wait for the device's size; an ioctl link that ended early says why.
    async fn wait_attached(&self, dev: &str) -> Result<(), AttachError> {
        let limit = Duration::from_secs(20);
        let start = std::time::Instant::now();
        while device_size(dev) == 0 {
            let ended = self.links().get(dev).is_some_and(|l| l.is_finished());
            if ended {
                let link = self.links().remove(dev);
                let why = match link.map(|l| l.join()) {
                    Some(Err(e)) => e,
                    _ => io::Error::other("NBD_DO_IT returned before the device came up"),
                };
                return Err(AttachError::Ioctl(dev.to_string(), why));
            }
            if start.elapsed() > limit {
                return Err(AttachError::Timeout(dev.to_string(), limit));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Give a connected device a fresh socket (after the server restarted).
    pub async fn reconnect(&self, socket: &Path, export: &str, dev: &str) -> Result<(), AttachError> {
        let index = devices::index_of(dev).ok_or_else(|| AttachError::NotNbd(dev.to_string()))?;
        let (socket, export, device) = (socket.to_path_buf(), export.to_string(), dev.to_string());
        blocking(move || {
            let mut nl = match NbdNetlink::open() {
                Ok(nl) => nl,
                Err(netlink::OpenError::FamilyMissing) => {
                    let why = if devices::driver_present() {
                        format!(
                            "{}. Unstage and stage the volume again (restart the pods using it); to keep volumes \
                             across restarts, {KEEP_ACROSS_RESTARTS}",
                            netlink_unreachable_reason()
                        )
                    } else {
                        AttachError::DriverMissing.to_string()
                    };
                    return Err(AttachError::NoReconnect { device, why });
                }
                Err(netlink::OpenError::Io(e)) => return Err(AttachError::Netlink(e)),
            };
            let conn = handshake::client(&socket, &export)?;
            nl.reconfigure(index, Some(conn.stream.as_raw_fd()), None).map_err(AttachError::Netlink)
        })
        .await
    }

    /// Tell the kernel the device grew.
    pub async fn resize(&self, dev: &str, size: u64) -> Result<(), AttachError> {
        let index = devices::index_of(dev).ok_or_else(|| AttachError::NotNbd(dev.to_string()))?;
        let by_ioctl = self.links().contains_key(dev);
        let device = dev.to_string();
        blocking(move || {
            if by_ioctl {
                return ioctl::set_size(&device, size).map_err(|e| AttachError::Ioctl(device, e));
            }
            let mut nl = NbdNetlink::open().map_err(|e| match e {
                netlink::OpenError::FamilyMissing => AttachError::Netlink(io::Error::other(format!(
                    "cannot resize a netlink-attached device: {}",
                    netlink_unreachable_reason()
                ))),
                netlink::OpenError::Io(e) => AttachError::Netlink(e),
            })?;
            nl.reconfigure(index, None, Some(size)).map_err(AttachError::Netlink)
        })
        .await
    }

    /// Cut the device's connection without waiting for the kernel to let
    /// it go (a mounted filesystem holds it until unmounted): the I/O the
    /// kernel holds for a reconnect, and every later request, fail. For a
    /// device this process did not attach (after a restart).
    pub async fn disconnect(&self, dev: &str) -> Result<(), AttachError> {
        let index = devices::index_of(dev).ok_or_else(|| AttachError::NotNbd(dev.to_string()))?;
        let device = dev.to_string();
        blocking(move || match NbdNetlink::open() {
            Ok(mut nl) => nl.disconnect(index).map_err(AttachError::Netlink),
            // Netlink unreachable here: NBD_DISCONNECT works on either kind.
            Err(_) => ioctl::disconnect(&device).map_err(|e| AttachError::Ioctl(device, e)),
        })
        .await
    }

    /// Disconnect the device and wait until the kernel let it go.
    pub async fn detach(&self, dev: &str) -> Result<(), AttachError> {
        let index = devices::index_of(dev).ok_or_else(|| AttachError::NotNbd(dev.to_string()))?;
        let link = self.links().remove(dev);
        if link.is_none() && device_size(dev) == 0 {
            return Ok(());
        }
        let device = dev.to_string();
        let work = move || -> Result<(), (Option<ioctl::Link>, AttachError)> {
            if let Some(link) = link {
                if !link.is_finished()
                    && let Err(e) = ioctl::disconnect(&device)
                {
                    return Err((Some(link), AttachError::Ioctl(device, e)));
                }
                // NBD_DO_IT returns once the connection is shut down.
                if let Err(e) = link.join() {
                    tracing::debug!(device = %device, error = %e, "NBD_DO_IT ended");
                }
                return Ok(());
            }
            match NbdNetlink::open() {
                Ok(mut nl) => nl.disconnect(index).map_err(|e| (None, AttachError::Netlink(e))),
                // Attached by another process through ioctls, or netlink
                // unreachable here: NBD_DISCONNECT works on either kind.
                Err(_) => ioctl::disconnect(&device).map_err(|e| (None, AttachError::Ioctl(device, e))),
            }
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(())) => {}
            Ok(Err((link, e))) => {
                if let Some(link) = link {
                    self.links().insert(dev.to_string(), link);
                }
                return Err(e);
            }
            Err(e) => return Err(AttachError::Worker(e.to_string())),
        }
        wait_size(dev, |s| s == 0).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(version_of("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(version_of("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(version_of("5.15.0"), Some((5, 15)));
        assert_eq!(version_of("6"), None);
        assert_eq!(version_of("linux"), None);
        assert!(version_of("6.4.0").is_some_and(|v| v >= (6, 4)));
    }

    #[test]
    fn errors_name_the_cause_and_the_fix() {
        let driver = AttachError::DriverMissing.to_string();
        assert!(driver.contains("driver is not loaded") && driver.contains("modprobe nbd"), "{driver}");
        let full = AttachError::NoFreeDevice { detail: "16 in use, 0 held or being set up by another task".into() };
        let full = full.to_string();
        assert!(full.contains("no free /dev/nbd device (16 in use") && full.contains("nbds_max"), "{full}");
        let why = netlink_unreachable_reason();
        let running = kernel_version().expect("uname");
        if (running.0, running.1) < (6, 4) {
            assert!(why.contains("only in the host's network namespace"), "{why}");
        }
        assert!(why.contains(&running.2), "the reason does not name the kernel: {why}");
    }
}
