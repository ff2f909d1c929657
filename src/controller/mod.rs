//! The Kubernetes side of the CSI controller: compaction as a kube-runtime
//! reconcile loop over this driver's PersistentVolumes, run by one replica
//! at a time under a Lease.
//!
//! Owns: choosing the compaction mode, connecting to the API, the election
//! loop that starts the reconcile loop when this replica leads and stops it
//! when it no longer does. The CSI gRPC services run on every replica
//! regardless (`csi::server`); the sidecars elect their own leaders.
//!
//! - `reconcile.rs`: per PV, compact when due, Events and annotations.
//! - `lease.rs`: the `coordination.k8s.io/v1` Lease.
//! - `orphans.rs`: volumes under `--store` that no PV names.

pub mod lease;
pub mod orphans;
pub mod reconcile;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};

use crate::clock::{Clock, SystemClock};
use crate::csi::common::Stores;
use crate::location::Location;
use crate::volume::compact::CompactOptions;
use lease::{LeaseLock, LeaseTiming, Round};
use reconcile::{Context, Schedule};

/// How the CSI controller compacts (`--compaction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompactionMode {
    /// Kubernetes when an API configuration is found, else store.
    #[default]
    Auto,
    /// The reconcile loop over PVs under a Lease; fails without an API.
    Kubernetes,
    /// A pass over `--store` every interval in every replica (standalone).
    Store,
    Off,
}

/// Settings of the Kubernetes mode.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub driver_name: String,
    pub default_store: Option<Location>,
    /// Per volume, between compactions.
    pub interval: Duration,
    pub compact: CompactOptions,
    pub lease: LeaseTiming,
    /// This replica's name in the Lease and in Events.
    pub identity: String,
}

/// The API client from the in-cluster configuration or KUBECONFIG
/// (`~/.kube/config`); an error when there is neither.
pub async fn connect() -> Result<kube::Client, String> {
    let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// This replica's identity: the pod name (its hostname) and a random part,
/// so a restarted process never mistakes its predecessor's term for its own.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "s3blk".to_string());
    format!("{host}_{:08x}", rand::random::<u32>())
}

/// The Lease's name for a driver name (`csi.s3blk.dev` → `csi-s3blk-dev-compaction`).
pub fn lease_name(driver_name: &str) -> String {
    let base: String =
        driver_name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    format!("{}-compaction", base.trim_matches('-'))
}

/// A task aborted when its handle is dropped: the leader's work must not
/// outlive the election loop (on shutdown the loop is dropped).
struct Leading(tokio::task::JoinHandle<()>);

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run the election until `shutdown` completes: while this replica leads,
/// `work()` runs; when it stops leading (another holder, or no renewal
/// within the renew deadline), or this loop is dropped, the work is
/// aborted. When `shutdown` completes (a graceful shutdown), the work is
/// stopped first and then the Lease handed back, so another replica takes
/// over within a retry period.
pub async fn elect_and_run<F, Fut>(mut lock: LeaseLock, mut work: F, shutdown: impl Future<Output = ()>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut shutdown = std::pin::pin!(shutdown);
    let timing = lock.timing();
    let mut running: Option<Leading> = None;
    let stop = |running: &mut Option<Leading>, why: &str| {
        if running.take().is_some() {
            crate::metrics::global().compaction.leader.set(0);
            tracing::warn!(why, "stopped leading: compaction stopped in this replica");
        }
    };
    loop {
        let now = tokio::time::Instant::now();
        // A round never outlasts the renew deadline: one that hangs (the API
        // server unreachable with the connection still open) would keep a
        // leader working long after another replica may take over.
        let limit = match lock.leading_until() {
            Some(until) if until > now => until - now,
            _ => timing.renew_deadline,
        };
        let round = match tokio::time::timeout(limit, lock.try_acquire_or_renew(now)).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(format!("no answer from the API server within {limit:?}").into())),
        };
        match round {
            Ok(Round::Leading) => {
                if running.as_ref().is_none_or(|t| t.0.is_finished()) {
                    tracing::info!(identity = lock.identity(), "leading: compaction runs in this replica");
                    crate::metrics::global().compaction.leader.set(1);
                    running = Some(Leading(tokio::spawn(work())));
                }
            }
            Ok(Round::Following { holder }) => {
                stop(&mut running, "another replica holds the lease");
                tracing::debug!(%holder, "following");
            }
            Ok(Round::Conflict) => {
                if !lock.still_leading(tokio::time::Instant::now()) {
                    stop(&mut running, "the lease was written by another replica");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease round failed");
                if !lock.still_leading(tokio::time::Instant::now()) {
                    stop(&mut running, "could not renew the lease within the renew deadline");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(timing.retry_period) => {}
            _ = &mut shutdown => break,
        }
    }
    if let Some(mut leading) = running.take() {
        leading.0.abort();
        let _ = (&mut leading.0).await;
        crate::metrics::global().compaction.leader.set(0);
    }
    match tokio::time::timeout(timing.retry_period * 2, lock.release()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the lease; another replica takes over once it expires")
        }
        Err(_) => tracing::warn!("releasing the lease timed out; another replica takes over once it expires"),
    }
}

/// Volumes the leader compacts at once: few, as they share the
/// controller's memory limit and its store requests with its CSI calls.
const COMPACTIONS_AT_ONCE: u16 = 4;

/// The work of the leader: the reconcile loop over PVs and, with a
/// `--store`, the orphan pass over it every interval.
pub async fn lead(client: kube::Client, stores: Arc<Stores>, s: KubeSettings) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let reporter = Reporter { controller: "s3blk-compaction".to_string(), instance: Some(s.identity.clone()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        driver_name: s.driver_name.clone(),
        stores: stores.clone(),
        default_store: s.default_store.clone(),
        schedule: Schedule { interval: s.interval, first_backoff: first_backoff(s.interval) },
        compact: s.compact.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        clock: clock.clone(),
        unrecorded: Default::default(),
    });
    // A few compactions at once: every PV is due at a first leadership,
    // and the controller's CSI calls share the store's request limit.
    let controller = Controller::new(Api::<PersistentVolume>::all(client), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(COMPACTIONS_AT_ONCE));
    let reader = controller.store();
    let reconciles = controller.run(reconcile::reconcile, reconcile::error_policy, ctx).for_each(|r| async move {
        if let Err(e) = r {
            tracing::warn!(error = %e, "compaction controller");
        }
    });
    let orphan_pass = async {
        let Some(root) = s.default_store.clone() else { return };
        if reader.wait_until_ready().await.is_err() {
            return;
        }
        loop {
            let handles: BTreeSet<String> = reader
                .state()
                .iter()
                .filter_map(|pv| reconcile::our_volume(pv, &s.driver_name))
                .filter_map(orphans::canonical_handle)
                .collect();
            match orphans::scan_store(&root, &stores, &handles, &s.compact, clock.as_ref()).await {
                Ok(scan) => tracing::info!(
                    store = %root.url(),
                    orphans = scan.orphans.len(),
                    deleted_compacted = scan.deleted_compacted,
                    reaped = scan.reaped,
                    "store pass done"
                ),
                Err(e) => tracing::warn!(error = %e, "store pass failed; retried next interval"),
            }
            tokio::time::sleep(s.interval).await;
        }
    };
    futures::join!(reconciles, orphan_pass);
}

/// The first retry after a failed compaction: a fraction of the interval,
/// between 10 s and 5 minutes.
pub fn first_backoff(interval: Duration) -> Duration {
    (interval / 60).clamp(Duration::from_secs(10), Duration::from_secs(300)).min(interval.max(Duration::from_secs(1)))
}

/// Kubernetes mode: elect, and lead while elected, until `stop` completes
/// (then the Lease is handed back) or this future is dropped.
pub async fn run(client: kube::Client, stores: Arc<Stores>, s: KubeSettings, stop: impl Future<Output = ()>) {
    let name = lease_name(&s.driver_name);
    let namespace = client.default_namespace().to_string();
    tracing::info!(
        lease = %format!("{namespace}/{name}"),
        identity = %s.identity,
        driver = %s.driver_name,
        interval_seconds = s.interval.as_secs(),
        "compaction mode: kubernetes (PersistentVolumes of this driver, one replica at a time)"
    );
    let lock = LeaseLock::new(Api::<Lease>::namespaced(client.clone(), &namespace), &name, &s.identity, s.lease);
    elect_and_run(lock, move || lead(client.clone(), stores.clone(), s.clone()), stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_dns_labels() {
        assert_eq!(lease_name("csi.s3blk.dev"), "csi-s3blk-dev-compaction");
        assert_eq!(lease_name("My_Driver.io"), "my-driver-io-compaction");
    }

    #[test]
    fn first_backoff_is_bounded() {
        assert_eq!(first_backoff(Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(first_backoff(Duration::from_secs(60)), Duration::from_secs(10));
        assert_eq!(first_backoff(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(first_backoff(Duration::from_secs(86400)), Duration::from_secs(300));
    }
}
