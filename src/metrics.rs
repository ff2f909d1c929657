//! Prometheus metrics: a small registry of counters and an HTTP endpoint
//! (`/metrics`, `/healthz`) on its own port.
//!
//! Counters are keyed by name and label set; they sit on paths that are
//! slow anyway (store calls, commits, CSI RPCs), never on the per-request
//! NBD path.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

static COUNTERS: Mutex<BTreeMap<(&'static str, String), f64>> = Mutex::new(BTreeMap::new());

const HELP: &[(&str, &str)] = &[
    ("s3blk_store_requests_total", "Store calls by operation (each attempt)."),
    ("s3blk_store_retries_total", "Store calls retried after a transient failure."),
    ("s3blk_store_failures_total", "Store calls that failed after all retries or permanently."),
    ("s3blk_commits_total", "Journal records committed."),
    ("s3blk_commit_seconds_total", "Time spent in commits (flushes)."),
    ("s3blk_fenced_total", "Writers that found themselves fenced."),
    ("s3blk_csi_requests_total", "CSI RPCs by method."),
    ("s3blk_compactions_total", "Volume compactions completed."),
    ("s3blk_compaction_deleted_chunks_total", "Chunk objects deleted by compaction."),
    ("s3blk_compaction_failures_total", "Volume compactions that failed (retried next pass)."),
    (
        "s3blk_volume_compactions_total",
        "Compactions of PersistentVolumes' volumes by outcome (changed, unchanged, failed).",
    ),
    (
        "s3blk_compaction_freed_bytes_total",
        "Bytes of chunk objects deleted by compactions of PersistentVolumes' volumes.",
    ),
    ("s3blk_compaction_fenced_writers_total", "Compactions that found journal records of a fenced writer."),
];

/// Gauges: set, not added to.
const GAUGE_HELP: &[(&str, &str)] = &[
    ("s3blk_orphan_volumes", "Volumes under --store that no PersistentVolume names (last scan)."),
    ("s3blk_compaction_leader", "1 while this replica holds the compaction Lease, else 0."),
];

/// Add `v` to a counter. `labels` is a Prometheus label body, e.g. `op="GET"`.
pub fn add(name: &'static str, labels: &str, v: f64) {
    let mut c = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    *c.entry((name, labels.to_string())).or_insert(0.0) += v;
}

pub fn inc(name: &'static str, labels: &str) {
    add(name, labels, 1.0);
}

/// Set a gauge (one listed in `GAUGE_HELP`).
pub fn set(name: &'static str, labels: &str, v: f64) {
    let mut c = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    c.insert((name, labels.to_string()), v);
}

/// The text exposition format.
pub fn render() -> String {
    let c = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    let typed = HELP.iter().map(|(n, h)| (n, h, "counter")).chain(GAUGE_HELP.iter().map(|(n, h)| (n, h, "gauge")));
    for (name, help, kind) in typed {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for ((n, labels), v) in c.iter().filter(|((n, _), _)| n == name) {
            if labels.is_empty() {
                out.push_str(&format!("{n} {v}\n"));
            } else {
                out.push_str(&format!("{n}{{{labels}}} {v}\n"));
            }
        }
    }
    out
}

/// Serve `/metrics` and `/healthz` until the task is dropped.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render())
            } else if req.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_in_text_format() {
        inc("s3blk_commits_total", "");
        add("s3blk_store_requests_total", "op=\"GET\"", 2.0);
        let text = render();
        assert!(text.contains("# TYPE s3blk_commits_total counter"));
        assert!(text.contains("s3blk_store_requests_total{op=\"GET\"} "), "{text}");
        set("s3blk_orphan_volumes", "", 3.0);
        set("s3blk_orphan_volumes", "", 2.0);
        let text = render();
        assert!(text.contains("# TYPE s3blk_orphan_volumes gauge\ns3blk_orphan_volumes 2\n"), "{text}");
    }
}
