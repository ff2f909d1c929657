//! The leader's pass over `--store` in Kubernetes mode: volumes there that
//! no PersistentVolume names are reported as orphans (a log line each and
//! the `s3blk_orphan_volumes` gauge), never deleted or compacted; deleted
//! volumes still kept for their snapshots or clones (tombstoned, so no PV
//! can name them) are compacted and reaped as in standalone mode.

use std::collections::{BTreeSet, HashMap};

use crate::clock::Clock;
use crate::csi::common::Stores;
use crate::location::Location;
use crate::volume::VolumeError;
use crate::volume::catalog::{self, CatalogError, EntryState};
use crate::volume::compact::{self, CompactOptions};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("store {store}: {message}")]
    Store { store: String, message: String },
    #[error("store {store}: {source}")]
    Catalog { store: String, source: CatalogError },
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreScan {
    /// Live volumes no PV names (canonical volume URLs, sorted).
    pub orphans: Vec<String>,
    /// Deleted volumes compacted.
    pub deleted_compacted: u64,
    /// Deleted volumes reaped (all their objects gone).
    pub reaped: u64,
}

/// The canonical form of a PV's volume handle, as the controller makes
/// volume ids (`Location::url`); `None` when it names no volume.
pub fn canonical_handle(handle: &str) -> Option<String> {
    Location::parse(handle, true).ok().map(|l| l.url())
}

/// One pass over `root`. `handles`: the canonical volume handles of this
/// driver's PVs.
pub async fn scan_store(
    root: &Location,
    stores: &Stores,
    handles: &BTreeSet<String>,
    opts: &CompactOptions,
    clock: &dyn Clock,
) -> Result<StoreScan, ScanError> {
    let store = stores
        .get(root, &HashMap::new())
        .await
        .map_err(|e| ScanError::Store { store: root.url(), message: e.message().to_string() })?;
    let entries =
        catalog::list(&store, &root.prefix).await.map_err(|source| ScanError::Catalog { store: root.url(), source })?;
    let mut scan = StoreScan::default();
    for e in entries {
        let loc = Location { store: root.store.clone(), prefix: e.prefix };
        match e.state {
            EntryState::Other => {}
            EntryState::Live => {
                let url = loc.url();
                if !handles.contains(&url) {
                    tracing::warn!(volume = %url, "orphan volume: no PersistentVolume of this driver names it; left alone");
                    scan.orphans.push(url);
                }
            }
            EntryState::Deleted => {
                if !opts.dry_run {
                    let age = catalog::ReapAge { safety_age: opts.safety_age };
                    match catalog::reap(&store, &loc.prefix, Some(age)).await {
                        Ok(Some(_)) => {
                            scan.reaped += 1;
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(volume = %loc.url(), error = %e, "reaping a deleted volume failed"),
                    }
                }
                match compact::compact(&store, &loc.prefix, opts, clock).await {
                    Ok(_) => scan.deleted_compacted += 1,
                    // Encrypted: this scan has no key (no PersistentVolume names
                    // a deleted volume's secret); it is reaped all the same.
                    Err(VolumeError::NotFound(_) | VolumeError::Key(_)) => {}
                    Err(e) => {
                        crate::metrics::global().compaction.failures.inc();
                        tracing::warn!(volume = %loc.url(), error = %e, "compacting a deleted volume failed");
                    }
                }
            }
        }
    }
    scan.orphans.sort();
    crate::metrics::global().compaction.orphan_volumes.set(scan.orphans.len() as i64);
    Ok(scan)
}
