//! The node pod's preStop hook: flush every volume the plugin serves, by
//! sending an NBD FLUSH to each volume's socket (`s3blk csi-flush`). Reads
//! only the stage records' socket and export fields, so it works against a
//! plugin of a neighbouring version during a rolling update.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::nbd::client::{self, ClientError};

/// A volume the node plugin serves, as its stage record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub volume_id: String,
    pub socket: PathBuf,
    pub export: String,
}

/// Every writable volume recorded in `state_dir`. Files that are not stage
/// records (or are damaged) are skipped: the plugin reports those itself.
pub fn served_volumes(state_dir: &Path) -> std::io::Result<Vec<Served>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state_dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else { continue };
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&text) else { continue };
        let field = |k: &str| record.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let (Some(volume_id), Some(socket), Some(export)) = (field("volume_id"), field("socket"), field("export"))
        else {
            continue;
        };
        if record.get("readonly").and_then(|v| v.as_bool()) == Some(true) {
            continue;
        }
        out.push(Served { volume_id, socket: PathBuf::from(socket), export });
    }
    out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    Ok(out)
}

/// Flush all of them concurrently; one result per volume, in order.
pub async fn flush_all(served: &[Served], limit: Duration) -> Vec<Result<(), ClientError>> {
    let work = served.iter().map(|v| client::flush_unix(&v.socket, &v.export, limit));
    futures::future::join_all(work).await
}
