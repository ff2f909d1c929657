//! Node registration: at start-up the node plugin writes its record
//! (`.s3blk-nodes/<node-id>.json`: id, hostname, start time, version) under
//! the store root it was given with `--store`, and ControllerPublishVolume
//! accepts only node ids with a record under the controller's `--store`.
//! Node and controller are therefore given the same `--store` (the chart
//! does). A node plugin without `--store` registers nowhere; its
//! credentials need to reach that one store only, whatever buckets its
//! volumes live in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::common::Stores;
use crate::clock::Clock;
use crate::location::Location;
use crate::volume::catalog::{self, NodeRecord};

/// How long start-up waits for the first attempt before serving anyway
/// (later attempts continue in the background).
pub const FIRST_ATTEMPT: Duration = Duration::from_secs(3);
/// The longest wait between background attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub fn record(node_id: &str, clock: &dyn Clock) -> NodeRecord {
    NodeRecord {
        node_id: node_id.to_string(),
        hostname: hostname(),
        started_unix: clock.now_unix(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Register the node under `root`: one attempt bounded by
/// [`FIRST_ATTEMPT`], then (if that failed) retries with backoff in a
/// background task, so an unreachable store never keeps the CSI socket
/// from coming up. Returns the background task, if one was needed.
pub async fn register(stores: Arc<Stores>, root: Location, rec: NodeRecord) -> Option<tokio::task::JoinHandle<()>> {
    // Each attempt runs as a task of its own: whatever goes wrong inside
    // the store client (even a panic) fails the attempt, never the plugin.
    let attempt = {
        let (stores, root, rec) = (stores.clone(), root.clone(), rec.clone());
        move || {
            let (stores, root, rec) = (stores.clone(), root.clone(), rec.clone());
            async move {
                let task = tokio::spawn(async move {
                    let store = stores.get(&root, &HashMap::new()).await.map_err(|s| s.message().to_string())?;
                    catalog::register_node(&store, &root.prefix, &rec).await.map_err(|e| e.to_string())
                });
                task.await.map_err(|e| format!("the attempt failed: {e}"))?
            }
        }
    };
    let first = tokio::time::timeout(FIRST_ATTEMPT, attempt()).await;
    match first {
        Ok(Ok(())) => {
            tracing::info!(node = %rec.node_id, store = %root.url(), "node registered");
            return None;
        }
        Ok(Err(e)) => {
            tracing::warn!(node = %rec.node_id, store = %root.url(), error = %e, "node registration failed; retrying")
        }
        Err(_) => {
            tracing::warn!(node = %rec.node_id, store = %root.url(), "node registration is slow; retrying in the background")
        }
    }
    Some(tokio::spawn(async move {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            match attempt().await {
                Ok(()) => {
                    tracing::info!(node = %rec.node_id, store = %root.url(), "node registered");
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = %rec.node_id, store = %root.url(), error = %e, "node registration failed; retrying")
                }
            }
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }))
}
