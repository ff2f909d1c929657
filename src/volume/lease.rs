//! The writer lease: a courtesy that keeps commands from cutting off a live
//! writer by accident. A writer outside Kubernetes (`s3blk serve`, `volume
//! import`, `volume resize`) holds `<volume>/lease.json` and rewrites it
//! every `LEASE_TTL / 3`; a lease is live while the store's clock says it
//! was written less than `LEASE_TTL` ago. Commands that would open the
//! volume for writing (and so fence the live writer) or delete it refuse
//! while another holder's lease is live, or while a CSI attachment record
//! names a node, unless told to take over.
//!
//! The lease is not what keeps data safe: two writers that both ignore it
//! (or race past it) are still kept apart by journal fencing. It turns an
//! accident into a clear refusal that names the holder.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::catalog;
use super::compact::store_now;
use super::{VolumeError, VolumeResult};
use crate::clock::Clock;
use crate::store::{DynStore, PutMode, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("in use by {0}")]
    Busy(Occupant),
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// A lease not rewritten for this long is dead, by default. Each lease
/// records its own lifetime, so holders and checkers need not agree on it.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// The object's name under the volume's prefix.
pub const LEASE_NAME: &str = "lease.json";

pub fn lease_key(vol: &str) -> String {
    format!("{vol}{LEASE_NAME}")
}

/// What the lease object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// What holds it: "serve", "import", "resize".
    pub command: String,
    /// When this holder first took the lease (holder's clock, Unix seconds).
    pub since_unix: i64,
    /// Tells this holder's rewrites from another's.
    pub token: u64,
    /// The lease is dead when not rewritten for this long; it is rewritten
    /// every third of it.
    pub ttl_secs: u64,
    /// The holding process as its kernel knows it: what tells a holder that
    /// is gone (killed, crashed) from one this process cannot see. Leases
    /// written by earlier versions have none; they live out their TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessId>,
}

/// A process, told apart from every other: the boot of the kernel it runs
/// on, its pid namespace, and its start time (so that a pid reused by a
/// later process is not taken for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub boot: String,
    pub pid_ns: String,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start: u64,
}

impl ProcessId {
    /// This process, when /proc tells.
    pub fn current() -> Option<Self> {
        let boot = crate::volume::engine::log::boot_id().ok()??;
        let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned();
        let start = start_time_of("self").ok()??;
        Some(Self { boot, pid_ns, start })
    }
}

/// Is there a process `pid` in this pid namespace? Asked of the kernel, not
/// of /proc, which may hide other users' processes (`hidepid`): only
/// ESRCH means none.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 sends nothing; kill only checks the process exists
    // and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The start time of process `pid` in this pid namespace (`None`: /proc
/// shows no such process).
fn start_time(pid: u32) -> std::io::Result<Option<u64>> {
    start_time_of(&pid.to_string())
}

fn start_time_of(pid: &str) -> std::io::Result<Option<u64>> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // The command name (field 2) is in parentheses and may hold anything;
    // the fields after its last ')' start at field 3.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    after
        .split_whitespace()
        .nth(22 - 3)
        .and_then(|f| f.parse().ok())
        .map(Some)
        .ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/stat: no start time")))
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` (pid {}) on {}, since {}", self.command, self.pid, self.host, format_unix(self.since_unix))
    }
}

/// Who else writes the volume right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupant {
    /// Another process holds a live lease; it was last renewed `age` ago.
    Lease { holder: Holder, age: Duration },
    /// A CSI attachment record names this node (the volume is published
    /// to it for writing).
    Node(String),
}

impl std::fmt::Display for Occupant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Occupant::Lease { holder, age } => write!(f, "{holder}, renewed {}s ago", age.as_secs()),
            Occupant::Node(node) => write!(f, "Kubernetes node {node} (CSI attachment)"),
        }
    }
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss UTC`.
pub fn format_unix(t: i64) -> String {
    // Seconds are enough for people; UTC, no time-zone database needed.
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The lease as the store holds it, with its age on the store's clock.
async fn read_lease(store: &DynStore, vol: &str) -> VolumeResult<Option<(Holder, Option<Duration>)>> {
    let key = lease_key(vol);
    let page = store
        .list(crate::store::ListRequest { prefix: &key, start_after: None, delimiter: false, max_keys: 1 })
        .await?;
    let Some(info) = page.objects.into_iter().find(|o| o.key == key) else { return Ok(None) };
    let Some(holder) = read_holder(store, vol).await? else { return Ok(None) };
    // Reading the store's clock writes a probe: with credentials that may
    // only read (`volume inspect`), or a store refusing it, the age is
    // unknown and the lease counts as live (the safe side).
    let now = match store_now(store, vol).await {
        Ok(now) => now,
        Err(e) => {
            tracing::debug!(volume = vol, error = %e, "the store's clock cannot be read; the lease's age is unknown");
            None
        }
    };
    let age = match (info.modified_unix, now) {
        (Some(m), Some(now)) => Some(Duration::from_secs(now.saturating_sub(m).max(0) as u64)),
        _ => None,
    };
    Ok(Some((holder, age)))
}

/// Who the lease object names, without its age: what the holder itself
/// needs to see whether it still holds it (one GET, no clock probe).
async fn read_holder(store: &DynStore, vol: &str) -> VolumeResult<Option<Holder>> {
    let key = lease_key(vol);
    let body = match store.get(&key, None).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match serde_json::from_slice::<Holder>(&body) {
        Ok(h) => Ok(Some(h)),
        Err(_) => {
            tracing::warn!(key = %key, "unreadable lease object; treated as no lease");
            Ok(None)
        }
    }
}

/// Who, besides `me`, writes the volume now: a live lease or a CSI
/// attachment for writing.
pub async fn occupant(store: &DynStore, vol: &str, me: Option<u64>) -> VolumeResult<Option<Occupant>> {
    if let Some((holder, age)) = read_lease(store, vol).await? {
        // A store that keeps no modification times: the lease counts as
        // live (refusing is the safe side; --takeover overrides).
        let age_known = age.unwrap_or_default();
        let ttl = Duration::from_secs(holder.ttl_secs.max(1));
        if Some(holder.token) != me && (age.is_none() || age_known < ttl) && !holder_is_gone(&holder) {
            return Ok(Some(Occupant::Lease { holder, age: age_known }));
        }
    }
    let attached = catalog::attachments(store, vol).await.map_err(|e| match e {
        catalog::CatalogError::Volume(v) => v,
        catalog::CatalogError::Store(s) => VolumeError::Store(s),
        other => VolumeError::InvalidArgument(other.to_string()),
    })?;
    Ok(attached.into_iter().find(|a| !a.readonly).map(|a| Occupant::Node(a.node_id)))
}

/// A refusal that names the occupant and the way out.
pub fn refusal(volume: &str, what: &str, occ: &Occupant) -> String {
    format!(
        "{volume} is in use by {occ}; {what} would cut that writer off (its unflushed writes would be lost). \
         Stop it first, or pass --takeover to {what} anyway"
    )
}

/// A held lease: rewritten in the background until released or dropped.
pub struct Lease {
    store: DynStore,
    vol: String,
    holder: Holder,
    /// The token of the holder this one took the lease from, if any.
    displaced: Option<u64>,
    stop: watch::Sender<bool>,
    lost: watch::Receiver<Option<String>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// Take the lease for `command`. Refuses (naming the occupant) while
    /// another writer is live, unless `takeover`.
    pub async fn acquire(
        store: &DynStore,
        vol: &str,
        command: &str,
        takeover: bool,
        ttl: Duration,
        clock: &dyn Clock,
    ) -> Result<Lease, LeaseError> {
        if !takeover && let Some(occ) = occupant(store, vol, None).await? {
            return Err(LeaseError::Busy(occ));
        }
        let holder = Holder {
            host: hostname(),
            pid: std::process::id(),
            command: command.to_string(),
            since_unix: clock.now_unix(),
            token: rand::random::<u64>() | 1,
            ttl_secs: ttl.as_secs().max(3),
            process: ProcessId::current(),
        };
        let every = Duration::from_secs(holder.ttl_secs) / 3;
        // The holder this one replaces (on a takeover, or one whose lease
        // expired): a renewal of its that was on its way (retried through
        // an outage) may land after ours; that is no takeover of ours.
        let displaced = read_holder(store, vol).await?.map(|h| h.token);
        write(store, vol, &holder).await?;
        let (stop, mut stop_rx) = watch::channel(false);
        let (lost_tx, lost) = watch::channel(None);
        let (s, v, h) = (store.clone(), vol.to_string(), holder.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = stop_rx.changed() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match read_holder(&s, &v).await {
                    Ok(Some(other)) if Some(other.token) == displaced => {
                        tracing::warn!(volume = %v, holder = %other, "a late renewal of the writer this one took over landed; taken back");
                    }
                    Ok(Some(other)) if other.token != h.token => {
                        let why = format!("the writer lease was taken over by {other}");
                        tracing::error!(volume = %v, "{why}");
                        let _ = lost_tx.send(Some(why));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(volume = %v, error = %e, "cannot read the writer lease; renewing"),
                }
                if let Err(e) = write(&s, &v, &h).await {
                    tracing::warn!(volume = %v, error = %e, "cannot renew the writer lease; retrying");
                }
            }
        });
        Ok(Lease { store: store.clone(), vol: vol.to_string(), holder, displaced, stop, lost, renewer: Some(renewer) })
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Resolves (with the reason) once another writer took the lease over.
    pub fn lost(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let rx = self.lost.clone();
        wait_lost(rx)
    }

    /// Stop renewing and remove the lease, if it is still ours.
    pub async fn release(mut self) {
        let _ = self.stop.send(true);
        // No renewal may land after the delete.
        if let Some(r) = self.renewer.take() {
            let _ = r.await;
        }
        match read_holder(&self.store, &self.vol).await {
            // Ours, or a late renewal of the holder ours replaced.
            Ok(Some(h)) if h.token == self.holder.token || Some(h.token) == self.displaced => {
                if let Err(e) = self.store.delete(&lease_key(&self.vol)).await {
                    tracing::warn!(volume = %self.vol, error = %e, "cannot remove the writer lease; it expires by itself");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(volume = %self.vol, error = %e, "cannot read the writer lease at release"),
        }
    }
}

async fn wait_lost(mut rx: watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(why) = rx.borrow_and_update().clone() {
            return why;
        }
        if rx.changed().await.is_err() {
            // The renewal task ended without a takeover (released).
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn write(store: &DynStore, vol: &str, h: &Holder) -> VolumeResult<()> {
    let body = serde_json::to_vec(h).map_err(|e| VolumeError::InvalidArgument(e.to_string()))?;
    store.put(&lease_key(vol), Bytes::from(body), PutMode::Overwrite).await?;
    Ok(())
}

/// A holder whose process is gone (killed, crashed) holds nothing: a
/// restart after a crash need not wait out the lease. Gone only when this
/// process can tell: the holder ran on this host, in this boot of it, in
/// this pid namespace, and no process with its pid and start time is
/// there (the kernel says no process has its pid, or /proc shows the one
/// that has it started at another time). A holder this process cannot see (a container with its own pid
/// namespace on a host-network pod or container, which shares the host's
/// name; another machine of the same name) is live until its lease expires.
fn holder_is_gone(h: &Holder) -> bool {
    let (Some(theirs), Some(ours)) = (&h.process, ProcessId::current()) else {
        return false;
    };
    if h.host != hostname() || theirs.boot != ours.boot || theirs.pid_ns != ours.pid_ns {
        return false;
    }
    if !process_exists(h.pid) {
        return true;
    }
    // A process has that pid: the holder only if it started when the
    // holder did (/proc hiding it, or unreadable: it may be the holder).
    matches!(start_time(h.pid), Ok(Some(start)) if start != theirs.start)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(pid: u32, process: Option<ProcessId>) -> Holder {
        Holder { host: hostname(), pid, command: "serve".into(), since_unix: 0, token: 3, ttl_secs: 30, process }
    }

    /// A holder is gone only when this process can see it is: same boot,
    /// same pid namespace, and its pid names no process or a later one.
    #[test]
    fn only_a_holder_this_process_can_see_is_judged_gone() {
        let Some(me) = ProcessId::current() else {
            panic!("/proc does not tell this process's identity");
        };
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = child.id();
        let start = start_time(pid).expect("stat").expect("the child runs");
        let alive = ProcessId { start, ..me.clone() };
        assert!(!holder_is_gone(&holder(pid, Some(alive.clone()))), "a live holder was judged gone");
        // Its pid now names a later process: the holder is gone.
        let reused = ProcessId { start: start.wrapping_add(1), ..me.clone() };
        assert!(holder_is_gone(&holder(pid, Some(reused))));
        // Another pid namespace (a container sharing the host's name), or
        // another boot: nothing here tells, so it is live.
        let elsewhere = ProcessId { pid_ns: "pid:[1]".into(), ..alive.clone() };
        assert!(!holder_is_gone(&holder(4_194_000, Some(elsewhere))));
        let other_boot = ProcessId { boot: "another boot".into(), ..alive.clone() };
        assert!(!holder_is_gone(&holder(4_194_000, Some(other_boot))));
        // A lease of an earlier version, which names no process identity.
        assert!(!holder_is_gone(&holder(4_194_000, None)));
        // Whether a pid is in use is the kernel's answer: pid 1 is, also
        // for a process that may not signal it (EPERM), and a pid past the
        // kernel's limit is not.
        assert!(process_exists(1));
        assert!(!process_exists(4_194_000));
        let _ = child.kill();
        let _ = child.wait();
        assert!(holder_is_gone(&holder(pid, Some(alive))), "a holder whose process exited is live");
    }

    /// A renewal of the holder that was taken over, landing late (retried
    /// through an outage), does not make the new holder give up: it writes
    /// its lease again. It stopped serving, and the old holder, unaware,
    /// kept the volume looking busy.
    /// A lease taken over from another, and a late renewal of that other
    /// landed after the takeover (its process cut off: its renewals stop,
    /// one lands late).
    async fn taken_over_then_late_renewal(store: &DynStore, ttl: Duration) -> Lease {
        let clock = crate::clock::SystemClock;
        let old = Lease::acquire(store, "v/", "serve", false, ttl, &clock).await.expect("the first holder");
        let new = Lease::acquire(store, "v/", "serve", true, ttl, &clock).await.expect("the takeover");
        let late = old.holder().clone();
        drop(old);
        write(store, "v/", &late).await.expect("the late renewal");
        new
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_renewal_of_the_displaced_holder_is_no_takeover() {
        let store: DynStore = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let clock = crate::clock::SystemClock;
        let ttl = Duration::from_secs(3);
        let new = taken_over_then_late_renewal(&store, ttl).await;
        let lost = new.lost();
        tokio::pin!(lost);
        let gave_up = tokio::time::timeout(ttl * 3, &mut lost).await;
        assert!(gave_up.is_err(), "the new holder gave up: {gave_up:?}");
        let now = read_holder(&store, "v/").await.expect("read").expect("a holder");
        assert_eq!(now.token, new.holder().token, "the lease names the displaced holder");
        // A third holder's takeover is still one.
        let third = Lease::acquire(&store, "v/", "serve", true, ttl, &clock).await.expect("a third");
        let why = tokio::time::timeout(ttl * 3, &mut lost).await.expect("the takeover seen");
        assert!(why.contains("taken over"), "{why}");
        drop(third);
    }

    /// A store that refuses the clock probe's PUT (read-only credentials,
    /// as `volume inspect` may have) still tells who holds the lease: its
    /// age is unknown, so it counts as live. It failed the whole call.
    #[tokio::test]
    async fn a_lease_is_seen_without_writing_to_the_store() {
        use crate::store::fault::{Fault, FaultStore, Op, Rule};
        let mem: DynStore = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let held = Lease::acquire(&mem, "v/", "serve", false, Duration::from_secs(30), &crate::clock::SystemClock)
            .await
            .expect("lease");
        let fault = std::sync::Arc::new(FaultStore::new(mem.clone()));
        fault.add_rule(Rule { op: Some(Op::Put), key_contains: None, fault: Fault::ServerError, times: u64::MAX });
        let read_only: DynStore = fault;
        let occ = occupant(&read_only, "v/", None).await.expect("the occupant, read without writing");
        assert!(matches!(&occ, Some(Occupant::Lease { holder, .. }) if holder.token == held.holder().token), "{occ:?}");
    }

    /// A late renewal of the displaced holder that lands just before a
    /// clean release goes with it: the volume is not left looking busy.
    #[tokio::test(start_paused = true)]
    async fn a_release_removes_a_late_renewal_of_the_displaced_holder() {
        let store: DynStore = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let new = taken_over_then_late_renewal(&store, Duration::from_secs(3)).await;
        new.release().await;
        assert!(read_holder(&store, "v/").await.expect("read").is_none(), "the lease outlived a clean release");
    }

    #[test]
    fn dates_are_readable() {
        assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix(1_795_996_800), "2026-11-30 00:00:00 UTC");
        assert_eq!(format_unix(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
