//! Prometheus metrics: one process-wide registry (`prometheus-client`) and
//! the HTTP endpoint (`/metrics`, `/healthz`) on its own port.
//!
//! What is measured where:
//! - store calls: [`crate::store::metered`], a wrapper around the store
//!   (each attempt below the retry wrapper, each call's outcome above it);
//! - per volume ([`VolumeMetrics`], one per open [`crate::volume::Volume`]):
//!   commit latency, commits, fencing, NBD request latency by command, and
//!   the engine's figures (dirty and cached bytes, staged chunks, journal
//!   records since the last checkpoint), read from the engine at scrape
//!   time by a collector, so the write path pays nothing for them;
//! - the CSI RPCs and compaction, where they happen.
//!
//! The `volume` label is the volume's prefix in its store (`k8s/pvc-1`,
//! `demo-volume`). A node serves a handful of volumes, so per-volume series
//! are cheap there; the series of a volume go away when its last open
//! handle in the process closes.
//!
//! Counters are registered without their `_total` suffix: the encoder adds
//! it. The exposition is the Prometheus text format 0.0.4 (what the
//! endpoint has always served; every Prometheus version reads it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOutcomeLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub volume: String,
    pub command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompactionLabels {
    pub volume: String,
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Store calls. No `volume` label: a store is shared by every volume under
/// its bucket (the CSI plugins cache one per bucket and credentials), and
/// the controller's compaction touches every volume of the driver, where
/// `op × outcome × buckets × volumes` histogram series would grow with the
/// cluster. Per-volume latency is visible in the commit and NBD histograms.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Each attempt, by operation.
    pub requests: Family<OpLabels, Counter>,
    /// Attempts after a call's first, by operation.
    pub retries: Family<OpLabels, Counter>,
    /// Calls that failed after all retries or permanently.
    pub failures: Family<OpLabels, Counter>,
    /// The latency of each attempt, by operation and outcome.
    pub request_seconds: HistogramFamily<OpOutcomeLabels>,
}

impl StoreMetrics {
    /// Fresh, registered nowhere (the process's are in [`global`]).
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            retries: Family::default(),
            failures: Family::default(),
            request_seconds: Family::new_with_constructor(store_latency),
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register("s3blk_store_requests", "Store calls by operation (each attempt)", self.requests.clone());
        r.register("s3blk_store_retries", "Store calls retried after a transient failure", self.retries.clone());
        r.register(
            "s3blk_store_failures",
            "Store calls that failed after all retries or permanently",
            self.failures.clone(),
        );
        r.register(
            "s3blk_store_request_duration_seconds",
            "Latency of each store attempt by operation and outcome (ok, not_found, exists, transient, permanent, abandoned)",
            self.request_seconds.clone(),
        );
    }
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone)]
pub struct CompactionMetrics {
    pub compactions: Counter,
    pub deleted_chunks: Counter,
    pub failures: Counter,
    pub unreadable_snapshots: Counter,
    /// Compactions of PersistentVolumes' volumes, by volume and outcome:
    /// one compaction per volume per interval, three outcomes, no
    /// histogram, so per-volume series stay few even with many volumes.
    pub volume_compactions: Family<CompactionLabels, Counter>,
    pub freed_bytes: Family<VolumeLabels, Counter>,
    pub fenced_writers: Family<VolumeLabels, Counter>,
    pub orphan_volumes: Gauge,
    pub leader: Gauge,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub store: StoreMetrics,
    pub compaction: CompactionMetrics,
    pub csi_requests: Family<MethodLabels, Counter>,
    commits: Family<VolumeLabels, Counter>,
    commit_seconds: HistogramFamily<VolumeLabels>,
    fenced: Family<VolumeLabels, Counter>,
    nbd_seconds: HistogramFamily<CommandLabels>,
    volumes: Arc<OpenVolumes>,
}

fn store_latency() -> Histogram {
    // 1 ms .. 33 s: a first byte from S3 takes tens of milliseconds, an
    // attempt is abandoned after its timeout (30 s by default).
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn commit_latency() -> Histogram {
    // 5 ms .. 10 s: one journal PUT at best, many chunk uploads at worst.
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

fn nbd_latency() -> Histogram {
    // 50 µs (a write into memory) .. 27 s (a flush behind a slow store).
    Histogram::new(exponential_buckets(0.00005, 3.0, 14))
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let store = StoreMetrics::new();
        store.register(&mut r);
        let commits = Family::default();
        let commit_seconds: HistogramFamily<VolumeLabels> = Family::new_with_constructor(commit_latency);
        let fenced = Family::default();
        let nbd_seconds: HistogramFamily<CommandLabels> = Family::new_with_constructor(nbd_latency);
        r.register("s3blk_commits", "Journal records committed", commits.clone());
        r.register(
            "s3blk_commit_duration_seconds",
            "Time a commit (flush) took: uploading dirty chunks, the journal PUT and its proof",
            commit_seconds.clone(),
        );
        r.register("s3blk_fenced", "Writers that found themselves fenced", fenced.clone());
        r.register(
            "s3blk_nbd_request_duration_seconds",
            "NBD requests by command: from the request fully received to its reply queued",
            nbd_seconds.clone(),
        );
        let csi_requests = Family::default();
        r.register("s3blk_csi_requests", "CSI RPCs by method", csi_requests.clone());
        let compaction = CompactionMetrics {
            compactions: Counter::default(),
            deleted_chunks: Counter::default(),
            failures: Counter::default(),
            unreadable_snapshots: Counter::default(),
            volume_compactions: Family::default(),
            freed_bytes: Family::default(),
            fenced_writers: Family::default(),
            orphan_volumes: Gauge::default(),
            leader: Gauge::default(),
        };
        let c = &compaction;
        r.register("s3blk_compactions", "Volume compactions completed", c.compactions.clone());
        r.register("s3blk_compaction_deleted_chunks", "Chunk objects deleted by compaction", c.deleted_chunks.clone());
        r.register(
            "s3blk_compaction_failures",
            "Volume compactions that failed (retried next pass)",
            c.failures.clone(),
        );
        r.register(
            "s3blk_compaction_unreadable_snapshots",
            "Snapshot records compaction could not read (it deletes nothing of their volume then)",
            c.unreadable_snapshots.clone(),
        );
        r.register(
            "s3blk_volume_compactions",
            "Compactions of PersistentVolumes' volumes by outcome (changed, unchanged, failed)",
            c.volume_compactions.clone(),
        );
        r.register(
            "s3blk_compaction_freed_bytes",
            "Bytes of chunk objects deleted by compactions of PersistentVolumes' volumes",
            c.freed_bytes.clone(),
        );
        r.register(
            "s3blk_compaction_fenced_writers",
            "Compactions that found journal records of a fenced writer",
            c.fenced_writers.clone(),
        );
        r.register(
            "s3blk_orphan_volumes",
            "Volumes under --store that no PersistentVolume names (last scan)",
            c.orphan_volumes.clone(),
        );
        r.register(
            "s3blk_compaction_leader",
            "1 while this replica holds the compaction Lease, else 0",
            c.leader.clone(),
        );
        let volumes = Arc::new(OpenVolumes::default());
        r.register_collector(Box::new(volumes.clone()));
        Self { registry: r, store, compaction, csi_requests, commits, commit_seconds, fenced, nbd_seconds, volumes }
    }

    /// The metrics of one open volume; see [`VolumeMetrics`].
    pub fn volume(&'static self, prefix: &str, figures: Weak<dyn VolumeFigures>) -> VolumeMetrics {
        let volume = volume_label(prefix);
        // Registered and resolved under the lock that closing takes: a
        // handle opening while the volume's last one closes never holds
        // series that closing is removing.
        let _open = self.volumes.open(&volume, figures);
        let labels = VolumeLabels { volume: volume.clone() };
        let nbd = NbdCommand::ALL.map(|c| {
            self.nbd_seconds.get_or_create_owned(&CommandLabels { volume: volume.clone(), command: c.label() })
        });
        VolumeMetrics {
            commits: self.commits.get_or_create_owned(&labels),
            commit_seconds: self.commit_seconds.get_or_create_owned(&labels),
            fenced: self.fenced.get_or_create_owned(&labels),
            nbd,
            volume,
            metrics: self,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a
        // bug in a collector, and a partial page is the most useful answer.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Drop the series of a volume no handle of this process has open.
    fn forget_volume(&self, volume: &str) {
        let labels = VolumeLabels { volume: volume.to_string() };
        self.commits.remove(&labels);
        self.commit_seconds.remove(&labels);
        self.fenced.remove(&labels);
        for c in NbdCommand::ALL {
            self.nbd_seconds.remove(&CommandLabels { volume: volume.to_string(), command: c.label() });
        }
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The text exposition of [`global`].
pub fn render() -> String {
    global().render()
}

/// The `volume` label of the volume under `prefix`.
pub fn volume_label(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

/// NBD commands, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdCommand {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
    Other,
}

impl NbdCommand {
    pub const ALL: [NbdCommand; 8] = [
        NbdCommand::Read,
        NbdCommand::Write,
        NbdCommand::Flush,
        NbdCommand::Trim,
        NbdCommand::WriteZeroes,
        NbdCommand::Cache,
        NbdCommand::BlockStatus,
        NbdCommand::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            NbdCommand::Read => "read",
            NbdCommand::Write => "write",
            NbdCommand::Flush => "flush",
            NbdCommand::Trim => "trim",
            NbdCommand::WriteZeroes => "write_zeroes",
            NbdCommand::Cache => "cache",
            NbdCommand::BlockStatus => "block_status",
            NbdCommand::Other => "other",
        }
    }
}

/// The figures of an open volume, read at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Chunks written in memory and not uploaded yet, in bytes (whole
    /// chunks: the unit the dirty limit counts).
    pub dirty_bytes: u64,
    /// Clean chunk bytes cached for reads.
    pub cache_bytes: u64,
    /// Chunks uploaded that no commit refers to yet.
    pub staged_chunks: u64,
    /// Journal records since the newest checkpoint this handle knows of.
    pub journal_records: u64,
    /// Bytes of the local write-back log on disk.
    pub write_log_bytes: u64,
    /// Bytes of committed pages laid over chunks, waiting to be folded.
    pub patch_bytes: u64,
}

/// Something whose [`Figures`] can be read (an open volume).
pub trait VolumeFigures: Send + Sync {
    fn figures(&self) -> Figures;
}

/// The metrics of one open volume: handles resolved once, so recording a
/// request is an atomic add or a short per-histogram lock, never a lookup.
/// Dropped with the volume; the last one of a volume removes its series.
#[derive(Debug)]
pub struct VolumeMetrics {
    pub volume: String,
    pub commits: Counter,
    pub commit_seconds: Histogram,
    pub fenced: Counter,
    nbd: [Histogram; 8],
    metrics: &'static Metrics,
}

impl VolumeMetrics {
    pub fn nbd(&self, c: NbdCommand) -> &Histogram {
        // `ALL` lists the commands in declaration order.
        &self.nbd[c as usize]
    }
}

impl Drop for VolumeMetrics {
    fn drop(&mut self) {
        let (last, _open) = self.metrics.volumes.close(&self.volume);
        if last {
            self.metrics.forget_volume(&self.volume);
        }
    }
}

type OpenGuard<'a> = std::sync::MutexGuard<'a, HashMap<String, Vec<Weak<dyn VolumeFigures>>>>;

/// The open volumes, by label, for the gauges read at scrape time.
#[derive(Default)]
struct OpenVolumes {
    open: Mutex<HashMap<String, Vec<Weak<dyn VolumeFigures>>>>,
}

impl std::fmt::Debug for OpenVolumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenVolumes").finish_non_exhaustive()
    }
}

impl OpenVolumes {
    /// Note a handle of `volume`; the guard returned holds the list.
    fn open(&self, volume: &str, figures: Weak<dyn VolumeFigures>) -> OpenGuard<'_> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.entry(volume.to_string()).or_default().push(figures);
        open
    }

    /// One handle of `volume` closed (its figures are gone already or
    /// going): true when it was the last.
    fn close(&self, volume: &str) -> (bool, OpenGuard<'_>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some(handles) = open.get_mut(volume) else { return (true, open) };
        // The closing handle's entry is dead (its engine is being dropped,
        // its metrics with it); remove a dead one, or any if none is.
        let dead = handles.iter().position(|w| w.strong_count() == 0).unwrap_or(0);
        if !handles.is_empty() {
            handles.remove(dead);
        }
        let last = handles.is_empty();
        if last {
            open.remove(volume);
        }
        (last, open)
    }

    /// Figures by volume, summed over the handles open in this process.
    fn snapshot(&self) -> Vec<(String, Figures)> {
        let handles: Vec<(String, Vec<Arc<dyn VolumeFigures>>)> = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.iter().map(|(v, hs)| (v.clone(), hs.iter().filter_map(Weak::upgrade).collect())).collect()
        };
        let mut out: Vec<(String, Figures)> = handles
            .into_iter()
            .filter(|(_, hs)| !hs.is_empty())
            .map(|(v, hs)| {
                let sum = hs.iter().map(|h| h.figures()).fold(Figures::default(), |a, f| Figures {
                    dirty_bytes: a.dirty_bytes + f.dirty_bytes,
                    cache_bytes: a.cache_bytes + f.cache_bytes,
                    staged_chunks: a.staged_chunks + f.staged_chunks,
                    journal_records: a.journal_records.max(f.journal_records),
                    write_log_bytes: a.write_log_bytes + f.write_log_bytes,
                    patch_bytes: a.patch_bytes.max(f.patch_bytes),
                });
                (v, sum)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A gauge read from [`Figures`]: name, help, which figure.
type Gauged = (&'static str, &'static str, fn(&Figures) -> u64);

impl Collector for OpenVolumes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let volumes = self.snapshot();
        let gauges: [Gauged; 6] = [
            (
                "s3blk_volume_dirty_bytes",
                "Bytes of chunks written and not yet uploaded (whole chunks); 0 after a flush",
                |f| f.dirty_bytes,
            ),
            ("s3blk_volume_cache_bytes", "Clean chunk bytes cached in memory for reads", |f| f.cache_bytes),
            (
                "s3blk_volume_staged_chunks",
                "Chunks uploaded that no journal record refers to yet (committed at the next flush or commit interval)",
                |f| f.staged_chunks,
            ),
            (
                "s3blk_volume_journal_records_since_checkpoint",
                "Journal records after the newest checkpoint this writer knows of (opening replays them)",
                |f| f.journal_records,
            ),
            (
                "s3blk_volume_write_log_bytes",
                "Bytes of the local write-back log: writes acknowledged since the last flush (and segment headers)",
                |f| f.write_log_bytes,
            ),
            (
                "s3blk_volume_patch_bytes",
                "Bytes of 4 KiB pages committed inside journal records and laid over chunks, not yet folded into whole chunks",
                |f| f.patch_bytes,
            ),
        ];
        for (name, help, get) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (volume, figures) in &volumes {
                let labels = VolumeLabels { volume: volume.clone() };
                let value = i64::try_from(get(figures)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
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
                "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Figures);
    impl VolumeFigures for Fixed {
        fn figures(&self) -> Figures {
            self.0
        }
    }

    #[test]
    fn metrics_render_in_text_format() {
        let m = global();
        m.compaction.compactions.inc();
        m.store.requests.get_or_create(&OpLabels { op: "GET" }).inc_by(2);
        let text = render();
        assert!(text.contains("# TYPE s3blk_compactions_total counter"), "{text}");
        assert!(text.contains("s3blk_store_requests_total{op=\"GET\"} "), "{text}");
    }

    #[test]
    fn a_volume_series_live_as_long_as_its_last_handle() {
        let f = Figures {
            dirty_bytes: 4096,
            cache_bytes: 8192,
            staged_chunks: 2,
            journal_records: 7,
            write_log_bytes: 99,
            patch_bytes: 0,
        };
        let engine: Arc<dyn VolumeFigures> = Arc::new(Fixed(f));
        let a = global().volume("unit/vol-a/", Arc::downgrade(&engine));
        let b = global().volume("unit/vol-a/", Arc::downgrade(&engine));
        a.nbd(NbdCommand::Write).observe(0.001);
        let text = render();
        assert!(text.contains("s3blk_volume_dirty_bytes{volume=\"unit/vol-a\"} 8192\n"), "{text}");
        assert!(text.contains("s3blk_volume_journal_records_since_checkpoint{volume=\"unit/vol-a\"} 7\n"), "{text}");
        assert!(
            text.contains("s3blk_nbd_request_duration_seconds_count{volume=\"unit/vol-a\",command=\"write\"} 1\n"),
            "{text}"
        );
        drop(a);
        assert!(render().contains("command=\"write\"} 1\n"), "one handle is still open");
        drop(b);
        drop(engine);
        let text = render();
        assert!(!text.contains("unit/vol-a"), "{text}");
    }
}
