//! Command-line interface. `anyhow` lives here and nowhere else.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clock::SystemClock;
use crate::crypto::{self, Kek};
use crate::location::{Location, open_existing_store, open_store};
use crate::size::{format_size, parse_size};
use crate::store::retry::RetryPolicy;
use crate::store::{self, DynStore};
use crate::volume::catalog::{self, DeleteOutcome, EntryState, OnDependants};
use crate::volume::engine::{CreateOptions, is_zero};
use crate::volume::format::{self, DEFAULT_CHUNK_SIZE};
use crate::volume::keys::{self, NewKeys};
use crate::volume::{OpenOptions, Volume, VolumeError, compact, fsck, lease, replay};

#[derive(Parser, Debug)]
#[command(name = "s3blk", version, about = "Block volumes on S3: NBD server, CLI and Kubernetes CSI driver")]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options of every command, shown apart from each command's own.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Global options")]
struct Global {
    /// Attempts per store call before giving up (retries use exponential backoff with jitter).
    #[arg(long, global = true, env = "S3BLK_RETRY_ATTEMPTS", default_value_t = 10)]
    retry_attempts: u32,
    /// Seconds one store call may take before it is abandoned and retried.
    #[arg(long, global = true, env = "S3BLK_ATTEMPT_TIMEOUT", default_value_t = 30)]
    attempt_timeout: u64,
    /// Dirty data held in memory before background uploads start and writers wait (per volume; the CSI node
    /// plugin shares one --memory-budget, and uses this only without a memory limit to size it from). Whole
    /// pages that only the write-back log holds count 128 bytes each.
    #[arg(long, global = true, env = "S3BLK_DIRTY_LIMIT", default_value = "256MiB", value_parser = parse_size)]
    dirty_limit: u64,
    /// Clean chunk data cached in memory for reads (per volume; see --dirty-limit for the CSI node plugin).
    #[arg(long, global = true, env = "S3BLK_CACHE_SIZE", default_value = "128MiB", value_parser = parse_size)]
    cache_size: u64,
    /// NBD: microseconds a connection answering requests back to back polls
    /// for the next one before sleeping (saves a wakeup per request; 0 = off).
    #[arg(long, global = true, env = "S3BLK_BUSY_POLL_US", default_value_t = 50)]
    busy_poll_us: u64,
    /// `serve` and the CSI node plugin: a volume's local write-back log
    /// holding more than this starts a flush (which empties it).
    #[arg(long, global = true, env = "S3BLK_WRITE_LOG_LIMIT", default_value = "1GiB", value_parser = parse_size)]
    write_log_limit: u64,
    /// Writers: a flush sends a chunk's few dirty pages inside its journal
    /// record (one PUT) instead of uploading the chunk, while the volume
    /// holds at most this much in such pages (in memory, and in each
    /// checkpoint); past half of it they are folded back into whole chunks
    /// in the background. 0 = upload every dirty chunk, writing only
    /// format-1 records (which s3blk releases without format 2 can read).
    #[arg(long, global = true, env = "S3BLK_PATCH_LIMIT", default_value = "16MiB", value_parser = parse_size)]
    patch_limit: u64,
    /// `serve` and the CSI controller: compact the volume(s) this often
    /// (folds the journal, deletes unreferenced chunk generations; 0 = never).
    #[arg(long, global = true, env = "S3BLK_COMPACT_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    compact_interval: Duration,
    /// Compaction (`compact`, and the compaction `serve` and the CSI
    /// controller run) leaves objects younger than this alone (e.g. 300, 90s, 5m, 1h). Under 120s is safe only
    /// while no writer has the volume open: the CSI controller refuses it, the others warn.
    #[arg(
        long,
        global = true,
        visible_alias = "safety-age",
        env = "S3BLK_COMPACT_SAFETY_AGE",
        default_value = "5m",
        value_parser = parse_duration
    )]
    compact_safety_age: Duration,
    /// Writers: a commit is sent only while its oldest chunk upload is
    /// younger than this; then it is abandoned and its chunks uploaded
    /// again. Keep it well below every compactor's safety age.
    #[arg(long, global = true, env = "S3BLK_COMMIT_DEADLINE", default_value = "75s", value_parser = parse_duration)]
    commit_deadline: Duration,
    /// Writers outside Kubernetes (serve, import, resize) hold a lease on
    /// the volume, rewritten every third of this; other commands refuse to
    /// take the volume over while it is live (see --takeover).
    #[arg(long, global = true, env = "S3BLK_LEASE_TTL", default_value = "30s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// The key of encrypted volumes: a file holding 32 bytes as 64 hex digits or in base64 (make one with `head
    /// -c 32 /dev/urandom | base64`). Needed to create one (--encrypt) and to read, write, snapshot, clone,
    /// check or compact it; never stored in the store (it wraps each volume's own data key).
    #[arg(long, global = true, env = "S3BLK_KEY_FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a volume over NBD (unix socket by default, TCP when asked).
    Serve(ServeArgs),
    /// Run the Kubernetes CSI driver (gRPC on a unix socket).
    Csi {
        /// What to run: the controller service, the node service, or both (for tests and single-node clusters).
        #[arg(long, value_enum, default_value = "controller")]
        mode: CsiMode,
        /// The gRPC endpoint the sidecars and kubelet talk to: unix:///path/to/csi.sock.
        #[arg(long, default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        /// The name the driver registers under; StorageClasses name it as their provisioner.
        #[arg(long, default_value = "csi.s3blk.dev")]
        driver_name: String,
        /// This node's id (node mode).
        #[arg(long, env = "S3BLK_NODE_ID")]
        node_id: Option<String>,
        /// Store for volumes whose StorageClass names none; the root listing starts from, and where nodes register (s3://bucket/prefix).
        #[arg(long, env = "S3BLK_STORE")]
        store: Option<String>,
        /// Capacity reported by GetCapacity (object stores are bottomless).
        #[arg(long, default_value = "1PiB", value_parser = parse_size)]
        capacity: u64,
        /// Advertise GET_CAPACITY: only together with the provisioner's
        /// capacity tracking (`--enable-capacity`).
        #[arg(long)]
        capacity_tracking: bool,
        /// Node mode: stage records and per-volume NBD sockets.
        #[arg(long, default_value = "/var/lib/s3blk")]
        state_dir: PathBuf,
        /// Node mode: where stage secrets are kept so a restarted plugin can serve its volumes again. Must be a
        /// tmpfs (never persistent disk); after a reboot it is empty and such volumes need staging again.
        #[arg(long, default_value = "/run/s3blk")]
        secrets_dir: PathBuf,
        /// Node mode: volumes this node can attach (nbd devices).
        #[arg(long, default_value_t = 16)]
        max_volumes: i64,
        /// Node mode: memory for dirty data plus chunk cache, shared by every staged volume (half each). Default:
        /// half of the container's memory limit (--memory-limit, else cgroups); without a limit, --dirty-limit
        /// plus --cache-size. A StorageClass's cacheSize caps one volume's cache inside it.
        #[arg(long, env = "S3BLK_MEMORY_BUDGET", value_parser = parse_size)]
        memory_budget: Option<u64>,
        /// Node mode: the container's memory limit (the chart passes it from the downward API); default: read
        /// from cgroups.
        #[arg(long, env = "S3BLK_MEMORY_LIMIT", value_parser = parse_size)]
        memory_limit: Option<u64>,
        /// S3 requests in flight at once across every volume this process serves, whatever their bucket
        /// (more wait their turn, so a busy volume cannot starve the others' connections).
        #[arg(long, env = "S3BLK_REQUESTS_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
        requests_in_flight: u16,
        /// Serve Prometheus metrics (/metrics) and /healthz on this address, e.g. 0.0.0.0:9808.
        #[arg(long)]
        metrics_address: Option<String>,
        /// Controller: how volumes are compacted. kubernetes: a reconcile loop over this driver's
        /// PersistentVolumes in one replica at a time (Lease), with Events and annotations; store: every
        /// replica compacts every volume under --store each interval; auto: kubernetes when an API
        /// configuration (in-cluster or KUBECONFIG) is found, else store.
        #[arg(long, value_enum, env = "S3BLK_COMPACTION", default_value = "auto")]
        compaction: CompactionArg,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `s3blk completions bash > /etc/bash_completion.d/s3blk`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `s3blk manpage > s3blk.1; man ./s3blk.1`.
    Manpage,
    /// Flush every volume the node plugin serves (the node pod's preStop
    /// hook): asks each volume's NBD socket under --state-dir for a FLUSH and
    /// waits for it. Exits non-zero when any volume could not be flushed.
    CsiFlush {
        /// The node plugin's --state-dir.
        #[arg(long, default_value = "/var/lib/s3blk")]
        state_dir: PathBuf,
        /// Give up after this long (durations: 90s, 5m).
        #[arg(long, default_value = "240s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Fold the journal into a checkpoint and delete chunk generations,
    /// journal records and checkpoints nothing references any more. Safe
    /// while a writer is live: nothing younger than --compact-safety-age (alias
    /// --safety-age) is touched.
    Compact {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// Report what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every invariant of a stored volume; exit code 2 when it is damaged.
    Fsck {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// Check chunk presence and size only, without reading their bytes.
        #[arg(long)]
        quick: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum CompactionArg {
    Auto,
    Kubernetes,
    Store,
    Off,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum CsiMode {
    Controller,
    Node,
    All,
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// The volume's snapshots.
    List {
        /// The store: s3://bucket/prefix, file:///dir or a directory.
        url: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot. Volumes cloned or restored from it keep what they
    /// read (they hold pins of their own).
    Delete {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// The snapshot's name.
        name: String,
    },
}

/// A `--compression` value (`None`: none).
#[derive(Debug, Clone, Copy)]
struct Compression(Option<format::Codec>);

fn parse_compression(s: &str) -> std::result::Result<Compression, String> {
    format::Codec::parse(s).map(Compression)
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create an empty (sparse) volume.
    Create {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// Its size, e.g. 10GiB (rounded up to a multiple of 4096 bytes).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Chunk size of a new volume: a power of two from 64KiB to 64MiB.
        #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CHUNK_SIZE as u64)]
        chunk_size: u64,
        /// Accept a store that ignores conditional writes: no protection against two writers.
        #[arg(long)]
        single_writer: bool,
        /// Compress chunks: lz4, zstd or none. Each chunk is stored compressed
        /// block by block where that saves at least an eighth, else as it is.
        /// Earlier s3blk versions cannot open a compressed volume.
        #[arg(long, value_parser = parse_compression, default_value = "none")]
        compression: Compression,
        /// Encrypt the volume with a data key of its own, wrapped by the key of --key-file (or S3BLK_KEY_FILE).
        #[arg(long)]
        encrypt: bool,
    },
    /// Change the key that opens an encrypted volume: its data key is wrapped again by the key of
    /// --new-key-file (the data stays as it is); the key of --key-file no longer opens it.
    Rekey {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// The new key, in the form --key-file takes.
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// List the volumes under a store URL (s3://bucket/prefix, file:///dir or a directory).
    List {
        /// The store: s3://bucket/prefix, file:///dir or a directory.
        url: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's parameters and state.
    Inspect {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and every object s3blk wrote under its prefix (its
    /// snapshots too). A prefix that is no s3blk volume, or that also holds
    /// anything else (another volume, other files), is left whole.
    Delete {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// Delete even when clones still read through this volume's snapshots (they break), it is published to a
        /// node, or a live writer holds its lease.
        #[arg(long)]
        force: bool,
    },
    /// Copy a file (or `-` for stdin) into a volume.
    Import {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// The file to read, or `-` for stdin.
        file: String,
        /// Create the volume first, sized to the input unless --size is given.
        #[arg(long)]
        create: bool,
        /// With --create: the size of the new volume (default: the input's size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Chunk size of a new volume: a power of two from 64KiB to 64MiB.
        #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CHUNK_SIZE as u64)]
        chunk_size: u64,
        /// With --create: compress the new volume's chunks (lz4, zstd or none).
        #[arg(long, value_parser = parse_compression, default_value = "none")]
        compression: Compression,
        /// With --create: encrypt the new volume (with the key of --key-file).
        #[arg(long)]
        encrypt: bool,
        /// Import even while another writer holds the volume (it is fenced and loses its unflushed writes).
        #[arg(long)]
        takeover: bool,
    },
    /// Copy a volume (or one of its snapshots) to a file (or `-` for stdout).
    Export {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// The target file, or `-` for stdout.
        file: String,
        /// Export this snapshot instead of the volume's committed state.
        #[arg(long)]
        snapshot: Option<String>,
        /// Write every byte. By default a file target is written sparse:
        /// ranges that read as zeros are skipped (holes), as `cp
        /// --sparse` does; stdout always gets every byte.
        #[arg(long)]
        dense: bool,
    },
    /// Record a snapshot of the volume's committed state (`snapshot <URL>
    /// <NAME>`), or list or delete snapshots.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Snapshot {
        #[command(subcommand)]
        action: Option<SnapshotCmd>,
        /// The volume.
        #[arg(required = true)]
        url: Option<String>,
        /// The new snapshot's name: letters, digits, `-`, `_`, `.`.
        #[arg(required = true)]
        name: Option<String>,
    },
    /// Make a new volume that reads through a snapshot of another
    /// (`<VOLUME>@<SNAPSHOT>`) or through its committed state now
    /// (`<VOLUME>`); it stores only what is written to it afterwards.
    Clone {
        /// `<VOLUME-URL>@<SNAPSHOT>` or `<VOLUME-URL>`.
        source: String,
        /// The new volume, in the same store.
        url: String,
        /// Its size (default: the source's).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Make a clone stand alone: copy into it the chunks it still reads
    /// through its parent, then let go of the parent, which can then be
    /// deleted (takes over the volume as its writer while it copies). A
    /// clone with snapshots taken before keeps its parent until they are
    /// deleted; run it again then.
    Flatten {
        /// The clone: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// Flatten even while another writer holds the volume (it is fenced and loses its unflushed writes).
        #[arg(long)]
        takeover: bool,
    },
    /// Grow a volume (takes over the volume as its writer while it runs).
    Resize {
        /// The volume: s3://bucket/prefix/name, file:///dir/name or a directory path.
        url: String,
        /// The new size (volumes only grow).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Resize even while another writer holds the volume (it is fenced and loses its unflushed writes).
        #[arg(long)]
        takeover: bool,
    },
}

pub fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Csi { .. }) { "info" } else { "warn" };
    // rustls warns about every client that sends an IP address as its TLS
    // server name (libnbd and qemu do for nbds://127.0.0.1): not ours to act on.
    let filter = tracing_subscriber::EnvFilter::try_from_env("S3BLK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default_level},rustls=error")));
    // Colour only on a terminal: container runtimes and log files keep the
    // escape codes verbatim.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Global {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_attempts.max(1),
            attempt_timeout: Duration::from_secs(self.attempt_timeout.max(1)),
            ..RetryPolicy::default()
        }
    }
    /// The key of --key-file, when one is given.
    fn kek(&self) -> Result<Option<Kek>> {
        let Some(p) = &self.key_file else { return Ok(None) };
        let raw = std::fs::read(p).with_context(|| format!("cannot read the key file {}", p.display()))?;
        Kek::parse(&raw).map(Some).map_err(|e| anyhow::anyhow!("key file {}: {e}", p.display()))
    }

    /// The keys of a new volume: `None` unless `encrypt`, which needs a key.
    fn new_keys(&self, encrypt: bool) -> Result<Option<NewKeys>> {
        if !encrypt {
            return Ok(None);
        }
        let kek = self.kek()?.ok_or_else(|| {
            anyhow::anyhow!("--encrypt needs a key: --key-file FILE or S3BLK_KEY_FILE ({})", crypto::KEY_FORMAT_HELP)
        })?;
        Ok(Some(NewKeys::fresh(kek)))
    }

    fn open_options(&self, read_only: bool) -> OpenOptions {
        OpenOptions {
            read_only,
            dirty_limit: self.dirty_limit,
            cache_limit: self.cache_size,
            commit_deadline: self.commit_deadline,
            // Chunks older than this go up again before a commit names them,
            // so a commit starts with most of its deadline left.
            restage_after: self.commit_deadline * 2 / 5,
            patch_limit: self.patch_limit,
            ..OpenOptions::default()
        }
    }
}

/// Parse the URL and open its store; a local store's directory must exist
/// (commands other than create never create anything).
async fn connect(url: &str, g: &Global, need_name: bool) -> Result<(Location, DynStore)> {
    let (loc, store) = connect_to(url, g, need_name, false).await?;
    if !need_name {
        return Ok((loc, store));
    }
    let store = unlock(store, &loc, g).await?;
    Ok((loc, store))
}

/// Refuse an encrypted volume whose key was not given (before anything
/// takes it over).
async fn need_key(store: &DynStore, loc: &Location) -> Result<()> {
    match replay::read_meta(store.as_ref(), &loc.prefix).await {
        Ok(meta) => keys::require(store.as_ref(), &loc.prefix, &meta).map_err(Into::into),
        // What opens it next says so.
        Err(_) => Ok(()),
    }
}

/// The store through which the volume at `loc` reads in the clear:
/// unlocked with the key of --key-file when the volume is encrypted. A
/// wrong key is refused here. Without a key an encrypted volume's store
/// comes back as it is: what needs the key then says so (a delete or a
/// listing of snapshots does not).
async fn unlock(store: DynStore, loc: &Location, g: &Global) -> Result<DynStore> {
    let kek = g.kek()?;
    match keys::unlock(&store, &loc.prefix, kek.as_ref()).await {
        Ok(s) => {
            if kek.is_some() && !keys::seals(s.as_ref(), &loc.prefix) {
                eprintln!("note: {} is not encrypted; the key is not used", loc.display());
            }
            Ok(s)
        }
        Err(VolumeError::NotFound(_)) => Ok(store),
        Err(VolumeError::Key(_)) if kek.is_none() => Ok(store),
        Err(e) => Err(e).with_context(|| format!("cannot open {}", loc.display())),
    }
}

async fn connect_to(url: &str, g: &Global, need_name: bool, create: bool) -> Result<(Location, DynStore)> {
    let loc = Location::parse(url, need_name)?;
    let store = if create {
        open_store(&loc.store, g.policy()).await
    } else {
        open_existing_store(&loc.store, g.policy()).await
    };
    let store = store.with_context(|| format!("cannot open the store for {url}"))?;
    Ok((loc, store))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let g = cli.global;
    match cli.command {
        Command::Serve(a) => {
            serve(a, &g).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Csi {
            mode,
            endpoint,
            driver_name,
            node_id,
            store,
            capacity,
            capacity_tracking,
            state_dir,
            secrets_dir,
            max_volumes,
            memory_budget,
            memory_limit,
            requests_in_flight,
            metrics_address,
            compaction,
        } => {
            use crate::csi::server::{CsiConfig, Mode};
            let default_store = store.map(|s| Location::parse(&s, false)).transpose()?;
            let mode = match mode {
                CsiMode::Controller => Mode::Controller,
                CsiMode::Node => Mode::Node,
                CsiMode::All => Mode::All,
            };
            let cfg = CsiConfig {
                mode,
                endpoint,
                driver_name,
                node_id,
                default_store,
                capacity,
                capacity_tracking,
                state_dir,
                secrets_dir,
                max_volumes,
                dirty_limit: g.dirty_limit,
                cache_limit: g.cache_size,
                memory_budget,
                memory_limit,
                busy_poll: Duration::from_micros(g.busy_poll_us),
                write_log_limit: g.write_log_limit,
                patch_limit: g.patch_limit,
                compact_interval: g.compact_interval,
                compact_safety_age: g.compact_safety_age,
                allow_short_safety_age: false,
                compaction: match compaction {
                    CompactionArg::Auto => crate::controller::CompactionMode::Auto,
                    CompactionArg::Kubernetes => crate::controller::CompactionMode::Kubernetes,
                    CompactionArg::Store => crate::controller::CompactionMode::Store,
                    CompactionArg::Off => crate::controller::CompactionMode::Off,
                },
                metrics_address,
            };
            let stores = Arc::new(crate::csi::common::Stores::with_limit(
                g.policy(),
                Default::default(),
                requests_in_flight.into(),
            ));
            crate::csi::server::run(cfg, stores, wait_for_signal()).await?;
            eprintln!("CSI driver stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::CsiFlush { state_dir, timeout } => csi_flush(&state_dir, timeout).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "s3blk", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
            // Each subcommand's arguments too, a section each, on the one page.
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                out.extend_from_slice(format!(".SH \"S3BLK {}\"\n", sub.get_name().to_uppercase()).as_bytes());
                if let Some(about) = sub.get_about() {
                    out.extend_from_slice(format!("{about}\n").as_bytes());
                }
                clap_mangen::Man::new(sub.clone()).render_options_section(&mut out)?;
            }
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Volume(cmd) => volume_cmd(cmd, &g).await,
        Command::Compact { url, dry_run, json } => {
            let safety_age = g.compact_safety_age;
            warn_short_safety_age(safety_age);
            let (loc, store) = connect(&url, &g, true).await?;
            let opts = compact::CompactOptions { safety_age, dry_run, ..compact::CompactOptions::default() };
            let rep = compact::compact(&store, &loc.prefix, &opts, &SystemClock)
                .await
                .with_context(|| format!("cannot compact {}", loc.display()))?;
            if json {
                let mut v = serde_json::to_value(&rep)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("volume".into(), serde_json::Value::String(loc.display()));
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!("volume:      {}", loc.display());
                match rep.folded_seq {
                    Some(x) => println!("journal:     head seq {}, folded up to seq {x}", rep.head_seq),
                    None => println!("journal:     head seq {}, nothing old enough to fold", rep.head_seq),
                }
                println!(
                    "{verb}: {} journal records, {} checkpoints ({} part objects), {} chunk objects ({})",
                    rep.journal_records_deleted,
                    rep.checkpoints_deleted,
                    rep.checkpoint_parts_deleted,
                    rep.chunks_deleted,
                    format_size(rep.chunk_bytes_deleted)
                );
                println!(
                    "kept:        {} live chunks, {} unreferenced but younger than {}s, {} snapshots",
                    rep.chunks_live,
                    rep.chunks_kept_young,
                    safety_age.as_secs(),
                    rep.snapshots
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck { url, quick, json } => {
            let (loc, store) = connect(&url, &g, true).await?;
            let show = !json && std::io::stderr().is_terminal();
            let progress = move |done: u64, total: u64| {
                if show && (done.is_multiple_of(64) || done == total) {
                    eprint!("\rverifying chunks: {done}/{total}");
                    if done == total {
                        eprintln!();
                    }
                }
            };
            let rep = fsck::fsck(store.as_ref(), &loc.prefix, !quick, &progress).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!("volume:     {}", loc.display());
                println!("size:       {} ({} bytes)", format_size(rep.size), rep.size);
                println!("journal:    {} records, head seq {}", rep.journal_records, rep.head_seq);
                match rep.checkpoint_parts {
                    0 => println!("checkpoints {}, snapshots {}", rep.checkpoints, rep.snapshots),
                    n => println!("checkpoints {} ({n} part objects), snapshots {}", rep.checkpoints, rep.snapshots),
                }
                println!(
                    "chunks:     {} referenced, {} verified, {} garbage",
                    rep.referenced_chunks, rep.verified_chunks, rep.garbage_chunks
                );
                for w in &rep.warnings {
                    println!("warning: {w}");
                }
                for e in &rep.errors {
                    println!("ERROR: {e}");
                }
                println!("{}", if rep.clean { "clean" } else { "DAMAGED" });
            }
            Ok(if rep.clean { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
    }
}

async fn volume_cmd(cmd: VolumeCmd, g: &Global) -> Result<ExitCode> {
    let clock = SystemClock;
    match cmd {
        VolumeCmd::Create { url, size, chunk_size, single_writer, compression, encrypt } => {
            let encryption = g.new_keys(encrypt)?;
            let (loc, store) = connect_to(&url, g, true, true).await?;
            catalog::check_name_free(&store, &loc.prefix).await?;
            let chunk_size = chunk_size_arg(chunk_size)?;
            let size = crate::size::round_to_blocks(size, format::BLOCK_SIZE as u64);
            let meta = Volume::create(
                store,
                &loc.prefix,
                CreateOptions { size, chunk_size, parent: None, single_writer, compression: compression.0, encryption },
                &clock,
            )
            .await
            .with_context(|| format!("cannot create {}", loc.display()))?;
            println!(
                "created {} ({}, chunk size {})",
                loc.display(),
                format_size(meta.size),
                format_size(meta.chunk_size as u64)
            );
            if let Some(e) = &meta.encryption {
                println!("encrypted with key {} (data key {})", e.key_id, e.data_key_id);
            }
            if meta.single_writer {
                eprintln!(
                    "warning: the store ignores conditional writes; the volume is in single-writer mode (no fencing)"
                );
            }
        }
        VolumeCmd::Rekey { url, new_key_file } => {
            let (loc, store) = connect_to(&url, g, true, false).await?;
            let old =
                g.kek()?.ok_or_else(|| anyhow::anyhow!("rekey needs the current key: --key-file or S3BLK_KEY_FILE"))?;
            let raw = std::fs::read(&new_key_file)
                .with_context(|| format!("cannot read the key file {}", new_key_file.display()))?;
            let new = Kek::parse(&raw).map_err(|e| anyhow::anyhow!("key file {}: {e}", new_key_file.display()))?;
            let id = keys::rekey(&store, &loc.prefix, &old, &new)
                .await
                .with_context(|| format!("cannot change the key of {}", loc.display()))?;
            println!("{} now opens with key {id} only (key {} no longer opens it)", loc.display(), old.id());
        }
        VolumeCmd::List { url, json } => {
            let (loc, store) = connect(&url, g, false).await?;
            let vols = list_volumes(&store, &loc.prefix).await?;
            if json {
                let v: Vec<_> = vols.iter().map(|(n, m)| serde_json::json!({"name": n, "size": m.size, "chunk_size": m.chunk_size, "created_unix": m.created_unix, "uuid": m.uuid})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<40} {:>12} {:>10}", "NAME", "SIZE", "CHUNK");
                for (n, m) in &vols {
                    println!("{:<40} {:>12} {:>10}", n, format_size(m.size), format_size(m.chunk_size as u64));
                }
            }
        }
        VolumeCmd::Inspect { url, json } => {
            let (loc, store) = connect(&url, g, true).await?;
            let meta = replay::read_meta(store.as_ref(), &loc.prefix).await?;
            // Without its key an encrypted volume's state is unreadable: the
            // error names the volume's key id.
            keys::require(store.as_ref(), &loc.prefix, &meta)?;
            let st = replay::replay(store.as_ref(), &loc.prefix, meta.chunk_size as u64, None).await?;
            let snaps = store::list_all(store.as_ref(), &format::snapshot_prefix(&loc.prefix)).await?;
            let snaps: Vec<String> = snaps
                .iter()
                .filter_map(|o| {
                    o.key.strip_prefix(&format::snapshot_prefix(&loc.prefix))?.strip_suffix(".json").map(str::to_string)
                })
                .collect();
            let stored = st.map.values().filter(|r| matches!(r, format::ChunkRef::Stored { .. })).count() as u64;
            // Chunk objects with a table (format 4) serve small reads by range.
            let tabled = st.map.values().filter(|r| r.has_table()).count() as u64;
            // Compressed block by block (format 5).
            let packed = st
                .map
                .values()
                .filter(|r| matches!(r, format::ChunkRef::Stored { layout: format::Layout::Packed(_), .. }))
                .count() as u64;
            let patch_bytes: u64 = st.patches.values().map(|p| p.bytes()).sum();
            // What the mapped chunks' objects take in the store (packed and
            // sealed as they are), from one listing of them.
            let sizes: std::collections::HashMap<(u64, u64), u64> =
                store::list_all(keys::base(&store).as_ref(), &format::chunk_prefix(&loc.prefix))
                    .await?
                    .into_iter()
                    .filter_map(|o| format::parse_chunk_key(&loc.prefix, &o.key).map(|ig| (ig, o.size)))
                    .collect();
            let stored_bytes: u64 = st
                .map
                .iter()
                .filter_map(|(i, r)| match r {
                    format::ChunkRef::Stored { generation, .. } => sizes.get(&(*i, *generation)).copied(),
                    format::ChunkRef::Zero => None,
                })
                .sum();
            let occupant = lease::occupant(&store, &loc.prefix, None).await?;
            if json {
                let writer = occupant.as_ref().map(|o| match o {
                    lease::Occupant::Lease { holder, age } => serde_json::json!({
                        "host": holder.host, "pid": holder.pid, "command": holder.command,
                        "since_unix": holder.since_unix, "renewed_secs_ago": age.as_secs(),
                    }),
                    lease::Occupant::Node(node) => serde_json::json!({ "node": node }),
                });
                let v = serde_json::json!({
                    "volume": loc.display(), "meta": meta, "size": st.size, "head_seq": st.head, "epoch": st.epoch,
                    "checkpoint": st.checkpoint, "mapped_chunks": st.map.len(), "stored_chunks": stored,
                    "stored_bytes": stored_bytes, "chunks_with_table": tabled,
                    "compression": meta.compression.map_or("none", |c| c.name()), "packed_chunks": packed,
                    "encrypted": meta.encryption.is_some(),
                    "key_id": meta.encryption.as_ref().map(|e| e.key_id.clone()),
                    "patched_chunks": st.patches.len(),
                    "patch_bytes": patch_bytes, "format_version": meta.format_version,
                    "snapshots": snaps, "writer": writer,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("volume:        {}", loc.display());
                println!("uuid:          {}", meta.uuid);
                println!("size:          {} ({} bytes)", format_size(st.size), st.size);
                println!("chunk size:    {}", format_size(meta.chunk_size as u64));
                println!("format:        {}", meta.format_version);
                match meta.compression {
                    Some(c) => println!("compression:   {} ({packed} of the stored chunks compressed)", c.name()),
                    None if packed > 0 => println!("compression:   none ({packed} stored chunks compressed)"),
                    None => println!("compression:   none"),
                }
                match &meta.encryption {
                    Some(e) => println!("encryption:    {} (key {}, data key {})", e.cipher, e.key_id, e.data_key_id),
                    None => println!("encryption:    none"),
                }
                println!(
                    "stored chunks: {} ({} of data, {} in the store)",
                    stored,
                    format_size(stored * meta.chunk_size as u64),
                    format_size(stored_bytes)
                );
                if tabled < stored {
                    println!(
                        "               {} of them whole (format 3: a read fetches the whole chunk)",
                        stored - tabled
                    );
                }
                if !st.patches.is_empty() {
                    println!(
                        "patched:       {} chunks ({} of pages not yet folded)",
                        st.patches.len(),
                        format_size(patch_bytes)
                    );
                }
                println!("journal head:  {} (writer epoch {})", st.head, st.epoch);
                match &occupant {
                    Some(o) => println!("in use by:     {o}"),
                    None => println!("in use by:     - (no live writer)"),
                }
                if let Some(p) = &meta.parent {
                    println!("parent:        {} @ {}", p.volume, p.snapshot);
                }
                match (&meta.parent, &meta.flattened) {
                    (None, Some(f)) => println!(
                        "parent:        none (flattened at seq {}; was {} @ {})",
                        f.seq, f.parent.volume, f.parent.snapshot
                    ),
                    (Some(_), Some(f)) => println!(
                        "flatten:       copied, covered from seq {}; the parent is kept for snapshots before it",
                        f.seq
                    ),
                    _ => {}
                }
                println!("snapshots:     {}", if snaps.is_empty() { "-".to_string() } else { snaps.join(", ") });
                if meta.single_writer {
                    println!("mode:          single writer (store without conditional writes)");
                }
            }
        }
        VolumeCmd::Delete { url, force } => {
            let (loc, store) = connect(&url, g, true).await?;
            if !force
                && let Some(occ @ lease::Occupant::Lease { .. }) = lease::occupant(&store, &loc.prefix, None).await?
            {
                bail!("{}", lease::refusal(&loc.display(), "delete", &occ).replace("--takeover", "--force"));
            }
            let rule = if force { OnDependants::Break } else { OnDependants::RefuseClones };
            match catalog::delete_volume(&store, &loc.prefix, rule, &clock).await? {
                DeleteOutcome::Deleted { objects } => println!("deleted {} ({objects} objects)", loc.display()),
                DeleteOutcome::Absent => bail!("volume {} does not exist", loc.display()),
                DeleteOutcome::Probes { objects } => {
                    println!("no volume at {}; deleted the {objects} objects a failed create left there", loc.display())
                }
                DeleteOutcome::Kept => bail!("volume {} is kept for its clones", loc.display()),
            }
        }
        VolumeCmd::Import { url, file, create, size, chunk_size, compression, encrypt, takeover } => {
            let (loc, store) = connect_to(&url, g, true, create).await?;
            let a = ImportArgs { create, size, chunk_size, compression, encrypt, takeover };
            import(&loc, store, &file, a, g).await?;
        }
        VolumeCmd::Export { url, file, snapshot, dense } => {
            let (loc, store) = connect(&url, g, true).await?;
            let mut opts = g.open_options(true);
            opts.snapshot = snapshot;
            let vol = Volume::open(store, &loc.prefix, opts)
                .await
                .with_context(|| format!("cannot open {}", loc.display()))?;
            if export(&vol, &file, !dense).await? == Exported::ReaderGone {
                // The reading end of a pipe went away (`| head`): stop
                // quietly, as Unix tools do (the status of SIGPIPE).
                return Ok(ExitCode::from(141));
            }
        }
        VolumeCmd::Snapshot { action: Some(SnapshotCmd::List { url, json }), .. } => {
            let (loc, store) = connect(&url, g, true).await?;
            replay::read_meta(store.as_ref(), &loc.prefix).await?;
            let mut snaps = Vec::new();
            let mut pins = 0;
            for o in store::list_all(store.as_ref(), &format::snapshot_prefix(&loc.prefix)).await? {
                let Some(name) =
                    o.key.strip_prefix(&format::snapshot_prefix(&loc.prefix)).and_then(|n| n.strip_suffix(".json"))
                else {
                    continue;
                };
                // Pins that keep what clones read are not the user's.
                if name.starts_with("clone-") {
                    pins += 1;
                    continue;
                }
                match crate::volume::engine::read_snapshot(&store, &loc.prefix, name).await {
                    Ok(r) => snaps.push(r),
                    Err(VolumeError::NotFound(_)) => {}
                    Err(e) => return Err(e).with_context(|| format!("snapshot {name} of {}", loc.display())),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&snaps)?);
            } else {
                println!("{:<40} {:>10} {:>12}  CREATED", "NAME", "SEQ", "SIZE");
                for r in &snaps {
                    println!(
                        "{:<40} {:>10} {:>12}  {}",
                        r.name,
                        r.seq,
                        format_size(r.size),
                        lease::format_unix(r.created_unix)
                    );
                }
                if pins > 0 {
                    println!("({pins} more kept for clones and restored volumes)");
                }
            }
        }
        VolumeCmd::Snapshot { action: Some(SnapshotCmd::Delete { url, name }), .. } => {
            let (loc, store) = connect(&url, g, true).await?;
            if name.starts_with("clone-") {
                bail!("{name} keeps what a clone reads; it goes when that clone is deleted");
            }
            crate::volume::engine::read_snapshot(&store, &loc.prefix, &name)
                .await
                .with_context(|| format!("snapshot {name} of {}", loc.display()))?;
            store.delete(&format::snapshot_key(&loc.prefix, &name)).await?;
            println!("deleted snapshot {name} of {}", loc.display());
        }
        VolumeCmd::Snapshot { action: None, url, name } => {
            let (Some(url), Some(name)) = (url, name) else { bail!("usage: s3blk volume snapshot <URL> <NAME>") };
            if name.starts_with("clone-") {
                bail!("snapshot names starting with clone- are reserved for the pins that keep what clones read");
            }
            let (loc, store) = connect(&url, g, true).await?;
            let rec = crate::volume::engine::snapshot_committed(&store, &loc.prefix, &name, None, &clock).await?;
            println!("snapshot {name} of {} pins journal seq {} ({})", loc.display(), rec.seq, format_size(rec.size));
        }
        VolumeCmd::Clone { source, url, size } => {
            let (src, snapshot) = match source.rsplit_once('@') {
                Some((v, s)) if format::validate_snapshot_name(s).is_ok() => (v.to_string(), Some(s.to_string())),
                _ => (source.clone(), None),
            };
            let (sloc, store) = connect(&src, g, true).await?;
            let loc = Location::parse(&url, true)?;
            if loc.store != sloc.store {
                bail!("a clone lives in its source's store: {} is not in the store of {}", url, sloc.display());
            }
            let size = size.map(|s| crate::size::round_to_blocks(s, format::BLOCK_SIZE as u64));
            let meta =
                catalog::clone_volume(&store, &sloc.prefix, snapshot.as_deref(), &loc.prefix, &loc.url(), size, &clock)
                    .await
                    .with_context(|| format!("cannot clone {source} into {}", loc.display()))?;
            println!(
                "created {} ({}) reading through {}{}",
                loc.display(),
                format_size(meta.size),
                sloc.display(),
                snapshot.map(|s| format!("@{s}")).unwrap_or_default()
            );
        }
        VolumeCmd::Flatten { url, takeover } => flatten(&url, takeover, g).await?,
        VolumeCmd::Resize { url, size, takeover } => {
            let (loc, store) = connect(&url, g, true).await?;
            // Checked before the lease: a resize refused must not have
            // taken the volume from its writer on the way.
            let size = crate::size::round_to_blocks(size, format::BLOCK_SIZE as u64);
            format::check_size(size).map_err(anyhow::Error::msg)?;
            let meta = replay::read_meta(store.as_ref(), &loc.prefix).await?;
            let now = catalog::current_size(&store, &loc.prefix, &meta).await?;
            if size < now {
                bail!(
                    "cannot resize {}: shrinking from {} to {} is not supported",
                    loc.display(),
                    format_size(now),
                    format_size(size)
                );
            }
            need_key(&store, &loc).await?;
            let held = take_lease(&store, &loc, "resize", takeover, g).await?;
            let done = async {
                let vol = Volume::open(store.clone(), &loc.prefix, g.open_options(false)).await?;
                vol.resize(size).await.with_context(|| format!("cannot resize {}", loc.display()))
            }
            .await;
            held.release().await;
            done?;
            println!("{} is now {}", loc.display(), format_size(size));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `s3blk volume flatten`: the copy under the writer lease, then the
/// parent let go of (also when an earlier run copied and stopped).
async fn flatten(url: &str, takeover: bool, g: &Global) -> Result<()> {
    let (loc, store) = connect(url, g, true).await?;
    let meta = replay::read_meta(store.as_ref(), &loc.prefix).await?;
    if meta.parent.is_none() && meta.flattened.is_none() {
        bail!("{} is not a clone: it reads through no parent, there is nothing to flatten", loc.display());
    }
    need_key(&store, &loc).await?;
    // Copied before (`flattened` beside `parent`): only the letting go is left.
    let mut seq = None;
    if meta.parent.is_some() && meta.flattened.is_none() {
        let held = take_lease(&store, &loc, "flatten", takeover, g).await?;
        let done = async {
            let vol = Volume::open(store.clone(), &loc.prefix, g.open_options(false)).await?;
            let cs = vol.chunk_size();
            let shown: std::sync::Mutex<Option<Progress>> = std::sync::Mutex::new(None);
            let progress = |done: u64, total: u64| {
                let mut p = shown.lock().unwrap_or_else(|p| p.into_inner());
                p.get_or_insert_with(|| Progress::new("copied", Some(total * cs))).update(done * cs);
            };
            let c = vol.copy_parents(&progress).await?;
            println!(
                "copied {} chunks of its parent's ({} of them within the store, {} zeros with no object); {} were its \
                 own already",
                c.copied,
                c.in_store,
                c.zero,
                c.inherited.saturating_sub(c.copied)
            );
            Ok::<_, anyhow::Error>(c.seq)
        }
        .await;
        held.release().await;
        seq = Some(done.with_context(|| format!("cannot flatten {}", loc.display()))?);
    }
    let out = catalog::let_go_of_parent(&store, &loc.prefix, seq)
        .await
        .with_context(|| format!("cannot let go of the parent of {}", loc.display()))?;
    match out {
        catalog::ParentOutcome::LetGo { parent } => {
            let parent = Location { prefix: parent, ..loc.clone() };
            println!("{} no longer reads through {}", loc.display(), parent.display());
        }
        catalog::ParentOutcome::Kept { snapshots } => bail!(
            "{} has its own copy of every chunk now, but keeps its parent: snapshots taken before ({}) read through \
             it; delete them (a clone-* pin goes with its clone, or when that clone is flattened) and run \
             flatten again",
            loc.display(),
            snapshots.join(", ")
        ),
        catalog::ParentOutcome::NotAClone => {
            bail!("{} is not a clone: it reads through no parent, there is nothing to flatten", loc.display())
        }
    }
    Ok(())
}

/// Live volumes directly under a prefix: `(name, meta)`.
pub async fn list_volumes(store: &DynStore, prefix: &str) -> Result<Vec<(String, format::VolumeMeta)>> {
    let mut out = Vec::new();
    for e in catalog::list(store, prefix).await? {
        if e.state != EntryState::Live {
            continue;
        }
        match replay::read_meta(store.as_ref(), &e.prefix).await {
            // The size now (after any resize), not the size at creation.
            Ok(mut m) => {
                m.size = catalog::current_size(store, &e.prefix, &m).await?;
                out.push((e.name, m))
            }
            Err(VolumeError::NotFound(_)) => {}
            Err(err) => tracing::warn!(prefix = %e.prefix, error = %err, "unreadable volume"),
        }
    }
    Ok(out)
}

/// Progress on stderr: a live line on a terminal, a line every 10% otherwise.
struct Progress {
    what: &'static str,
    total: Option<u64>,
    start: Instant,
    last: Instant,
    last_decile: u64,
    tty: bool,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Self {
        let now = Instant::now();
        Self { what, total, start: now, last: now, last_decile: 0, tty: std::io::stderr().is_terminal() }
    }
    fn rate(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let mut r = format!("{}/s", format_size((done as f64 / secs) as u64));
        if let Some(t) = self.total.filter(|t| *t > done && done > 0) {
            let eta = (t - done) as f64 * secs / done as f64;
            r.push_str(&format!(", {:.0}s left", eta.ceil()));
        }
        r
    }
    fn update(&mut self, done: u64) {
        if self.tty {
            if self.last.elapsed() >= Duration::from_millis(500) {
                self.last = Instant::now();
                match self.total {
                    Some(t) if t > 0 => eprint!(
                        "\r{} {} / {} ({}%), {}   ",
                        self.what,
                        format_size(done),
                        format_size(t),
                        done * 100 / t,
                        self.rate(done)
                    ),
                    _ => eprint!("\r{} {}, {}   ", self.what, format_size(done), self.rate(done)),
                }
            }
        } else if let Some(t) = self.total.filter(|t| *t > 0) {
            let decile = done * 10 / t;
            if decile > self.last_decile {
                self.last_decile = decile;
                eprintln!(
                    "{} {}% ({} of {}, {})",
                    self.what,
                    decile * 10,
                    format_size(done),
                    format_size(t),
                    self.rate(done)
                );
            }
        }
    }
    fn finish(&self, done: u64) {
        if self.tty {
            eprintln!();
        }
        eprintln!(
            "{} {} in {:.1}s ({})",
            self.what,
            format_size(done),
            self.start.elapsed().as_secs_f64(),
            self.rate(done)
        );
    }
}

struct ImportArgs {
    create: bool,
    size: Option<u64>,
    chunk_size: u64,
    compression: Compression,
    encrypt: bool,
    takeover: bool,
}

async fn import(loc: &Location, store: DynStore, file: &str, a: ImportArgs, g: &Global) -> Result<()> {
    let ImportArgs { create, size, chunk_size, compression, encrypt, takeover } = a;
    if !create && compression.0.is_some() {
        bail!(
            "--compression applies to a volume --create makes; the compression of an existing volume cannot be changed"
        );
    }
    if !create && encrypt {
        bail!("--encrypt applies to a volume --create makes; an existing volume cannot be encrypted in place");
    }
    let encryption = g.new_keys(encrypt)?;
    let (input, input_len): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, Option<u64>) = if file == "-" {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let f = tokio::fs::File::open(file).await.with_context(|| format!("cannot open {file}"))?;
        let len = f.metadata().await?.len();
        (Box::new(f), Some(len))
    };
    if create {
        let size = match (size, input_len) {
            (Some(s), _) => crate::size::round_to_blocks(s, format::BLOCK_SIZE as u64),
            (None, Some(l)) => l.div_ceil(format::BLOCK_SIZE as u64).max(1) * format::BLOCK_SIZE as u64,
            (None, None) => bail!("--create from stdin needs --size"),
        };
        let chunk_size = chunk_size_arg(chunk_size)?;
        catalog::check_name_free(&store, &loc.prefix).await?;
        Volume::create(
            store.clone(),
            &loc.prefix,
            CreateOptions {
                size,
                chunk_size,
                parent: None,
                single_writer: false,
                compression: compression.0,
                encryption,
            },
            &SystemClock,
        )
        .await?;
    }
    let store = unlock(store, loc, g).await?;
    // Check the input against the volume before taking it over: a refused
    // import must not have fenced a server that is using the volume.
    let vsize = Volume::open(store.clone(), &loc.prefix, g.open_options(true))
        .await
        .with_context(|| format!("cannot open {}", loc.display()))?
        .size();
    if let Some(l) = input_len
        && l > vsize
    {
        bail!("{file} has {l} bytes, more than the volume's {vsize}; grow it with `s3blk volume resize`");
    }
    let held = take_lease(&store, loc, "import", takeover, g).await?;
    let done = import_into(loc, store, file, input, input_len, g).await;
    held.release().await;
    done
}

/// Of the `written` bytes handed to the volume, those committed to the
/// store (what is still in memory, dirty or uploaded but not yet in a
/// journal record, does not count).
fn committed(vol: &Volume, written: u64) -> u64 {
    let st = vol.stats();
    written.saturating_sub((st.dirty_chunks + st.staged_chunks) * u64::from(st.chunk_size))
}

async fn import_into(
    loc: &Location,
    store: DynStore,
    file: &str,
    mut input: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    input_len: Option<u64>,
    g: &Global,
) -> Result<()> {
    let vol = Volume::open(store, &loc.prefix, g.open_options(false))
        .await
        .with_context(|| format!("cannot open {}", loc.display()))?;
    let vsize = vol.size();
    let cs = vol.chunk_size() as usize;
    let mut buf = vec![0u8; cs];
    let mut offset = 0u64;
    let mut progress = Progress::new("committed", input_len);
    loop {
        let mut filled = 0;
        while filled < cs {
            let n = input.read(&mut buf[filled..]).await.with_context(|| format!("reading {file}"))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if offset + filled as u64 > vsize {
            bail!("the input is larger than the volume ({vsize} bytes); nothing past the last flush was committed");
        }
        // Whole-block writes keep the volume's block alignment; a short
        // tail is written as is.
        let piece = &buf[..filled];
        if is_zero(piece) {
            vol.write_zeroes(offset, filled as u64).await?;
        } else {
            vol.write(offset, piece).await?;
        }
        offset += filled as u64;
        progress.update(committed(&vol, offset));
        if filled < cs {
            break;
        }
    }
    // The last part goes up now: keep the progress moving meanwhile.
    let flush = vol.flush();
    tokio::pin!(flush);
    loop {
        tokio::select! {
            r = &mut flush => {
                r.context("final flush failed: the import is not committed")?;
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => progress.update(committed(&vol, offset)),
        }
    }
    progress.finish(offset);
    println!("imported {} into {}", format_size(offset), loc.display());
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Exported {
    All,
    /// stdout was a pipe whose reader left before the end.
    ReaderGone,
}

/// Sparse targets skip zeros in granules of this size.
const SPARSE_GRANULE: usize = 64 << 10;

async fn export(vol: &Volume, file: &str, sparse: bool) -> Result<Exported> {
    use tokio::io::AsyncSeekExt;
    enum Out {
        File(tokio::fs::File),
        Stdout(tokio::io::Stdout),
    }
    let mut out = if file == "-" {
        Out::Stdout(tokio::io::stdout())
    } else {
        Out::File(tokio::fs::File::create(PathBuf::from(file)).await.with_context(|| format!("cannot create {file}"))?)
    };
    // Only a regular file (created empty above) reads back zeros where it
    // was skipped: a block device or a FIFO keeps, or never gets, them.
    let regular = match &out {
        Out::File(f) => f.metadata().await.is_ok_and(|m| m.is_file()),
        Out::Stdout(_) => false,
    };
    let sparse = sparse && regular;
    let size = vol.size();
    let step = (vol.chunk_size() * 8).min(64 << 20);
    let mut progress = Progress::new("exported", Some(size));
    let mut offset = 0u64;
    // Keep one read in flight while the previous block is being written.
    let mut next = Some(tokio::spawn({
        let v = vol.clone();
        async move { v.read(0, step.min(size)).await }
    }));
    while let Some(h) = next.take() {
        let data = h.await.context("read task failed")??;
        let len = data.len() as u64;
        let following = offset + len;
        if following < size {
            let v = vol.clone();
            let n = step.min(size - following);
            next = Some(tokio::spawn(async move { v.read(following, n).await }));
        }
        match &mut out {
            Out::Stdout(o) => match o.write_all(&data).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(Exported::ReaderGone),
                Err(e) => return Err(e).context("writing to stdout"),
            },
            Out::File(f) => {
                for piece in data.chunks(SPARSE_GRANULE) {
                    if sparse && is_zero(piece) {
                        f.seek(std::io::SeekFrom::Current(piece.len() as i64)).await?;
                    } else {
                        f.write_all(piece).await.with_context(|| format!("writing {file}"))?;
                    }
                }
            }
        }
        offset = following;
        progress.update(offset);
    }
    match &mut out {
        Out::Stdout(o) => match o.flush().await {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(Exported::ReaderGone),
            r => r.context("writing to stdout")?,
        },
        Out::File(f) => {
            if sparse {
                // Trailing holes: the file still has the volume's size.
                f.set_len(size).await.with_context(|| format!("writing {file}"))?;
            }
            f.flush().await?;
            if regular {
                f.sync_all().await.with_context(|| format!("syncing {file}"))?;
            }
        }
    }
    progress.finish(offset);
    Ok(Exported::All)
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The volume: s3://bucket/prefix/name, file:///dir/name, or a directory path.
    url: String,
    /// `unix:PATH` or `HOST:PORT`; default: a unix socket named after the volume in the current directory.
    #[arg(long)]
    listen: Option<String>,
    /// Create the volume if it does not exist yet (needs --size).
    #[arg(long)]
    create: bool,
    /// Size of a volume --create makes, e.g. 1GiB (rounded up to a multiple of 4096 bytes).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Chunk size of a volume --create makes: 64KiB to 64MiB, a power of two.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CHUNK_SIZE as u64)]
    chunk_size: u64,
    /// Compression of a volume --create makes: lz4, zstd or none.
    #[arg(long, value_parser = parse_compression, default_value = "none")]
    compression: Compression,
    /// Encrypt a volume --create makes (with the key of --key-file).
    #[arg(long)]
    encrypt: bool,
    /// Serve without taking over the volume: writes are refused.
    #[arg(long)]
    read_only: bool,
    /// Export name clients ask for (default: the volume's name).
    #[arg(long)]
    export_name: Option<String>,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address, e.g. 127.0.0.1:9808.
    #[arg(long)]
    metrics_address: Option<String>,
    /// Clients served at once; further connections are closed at once.
    #[arg(long, default_value_t = crate::nbd::session::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Serve even while another writer holds the volume: that writer is
    /// fenced and loses its unflushed writes.
    #[arg(long)]
    takeover: bool,
    /// TLS: `require` (the default once credentials are given) refuses
    /// everything but STARTTLS before TLS is up; `on` offers TLS and still
    /// serves plaintext clients; `off` never offers it.
    #[arg(long, value_enum)]
    tls: Option<TlsMode>,
    /// The server's certificate (PEM; its chain may follow it) for NBD over TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM): clients must present a certificate signed by one of them.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Pre-shared keys for NBD over TLS instead of certificates: a file of
    /// USERNAME:HEXKEY lines (as GnuTLS's psktool writes them).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    tls_psk: Option<PathBuf>,
    /// Directory of the local write-back logs: every acknowledged write
    /// stays there until a flush commits it, so `serve` started again on
    /// this host after a crash carries on with them (default:
    /// $XDG_STATE_HOME/s3blk/write-log, else ~/.local/state/s3blk/write-log).
    #[arg(long, env = "S3BLK_WRITE_LOG_DIR", conflicts_with = "no_write_log")]
    write_log_dir: Option<PathBuf>,
    /// Keep unflushed writes in memory only: a crash of this process loses
    /// every write acknowledged since the last flush.
    #[arg(long)]
    no_write_log: bool,
}

impl ServeArgs {
    /// Where this writer keeps its write-back log (`None`: no log; always
    /// so for a memory store, which a crash takes along).
    fn write_log_dir(&self, loc: &Location) -> Result<Option<PathBuf>> {
        if self.no_write_log || self.read_only || loc.store == crate::location::StoreSpec::Memory {
            return Ok(None);
        }
        if let Some(d) = &self.write_log_dir {
            return Ok(Some(d.clone()));
        }
        let state = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(h) => PathBuf::from(h).join(".local/state"),
                None => bail!(
                    "no --write-log-dir given and neither XDG_STATE_HOME nor HOME is set (or pass --no-write-log)"
                ),
            },
        };
        Ok(Some(state.join("s3blk/write-log")))
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Off,
    On,
    Require,
}

/// The TLS setup `serve` asked for, loaded and checked (every file read)
/// before anything else happens.
fn tls_setup(a: &ServeArgs) -> Result<Option<Arc<crate::nbd::tls::Tls>>> {
    use crate::nbd::tls::{Policy, Tls, X509Files};
    let x509 = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            Some(X509Files { cert: cert.clone(), key: key.clone(), client_ca: a.tls_client_ca.clone() })
        }
        _ => None,
    };
    let has_credentials = x509.is_some() || a.tls_psk.is_some();
    let policy = match (a.tls, has_credentials) {
        (None | Some(TlsMode::Off), false) => return Ok(None),
        (Some(TlsMode::Off), true) => bail!("--tls=off contradicts the TLS credentials given: drop one or the other"),
        (Some(mode), false) => bail!("--tls={mode:?} needs credentials: --tls-cert and --tls-key, or --tls-psk"),
        (Some(TlsMode::On), true) => Policy::Offer,
        (None | Some(TlsMode::Require), true) => Policy::Require,
    };
    let tls = match (x509, &a.tls_psk) {
        (Some(f), _) => Tls::x509(&f, policy)?,
        (None, Some(psk)) => Tls::psk(psk, policy)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(Arc::new(tls)))
}

async fn serve(a: ServeArgs, g: &Global) -> Result<()> {
    use crate::nbd::{Export, Listen, server};
    // Bad TLS files are reported before the store is even looked at.
    let tls = tls_setup(&a)?;
    let (loc, store) = connect_to(&a.url, g, true, a.create).await?;
    let name = format::volume_name(&loc.prefix).to_string();
    // The address first: a server that cannot listen must not have taken
    // the volume over from a live one.
    let listen = match &a.listen {
        Some(l) => Listen::parse(l).map_err(anyhow::Error::msg)?,
        None => Listen::Unix(PathBuf::from(format!("{name}.sock"))),
    };
    let secured = tls.is_some();
    let bound = server::bind(&listen, tls).await.with_context(|| format!("cannot listen on {listen:?}"))?;
    if a.create {
        match replay::read_meta(store.as_ref(), &loc.prefix).await {
            Ok(meta) => {
                if a.size.is_some_and(|s| s != meta.size) {
                    eprintln!("note: {} already exists ({}); --size is ignored", loc.display(), format_size(meta.size));
                }
                if a.encrypt != meta.encryption.is_some() {
                    eprintln!(
                        "note: {} already exists {}; --encrypt is ignored",
                        loc.display(),
                        if meta.encryption.is_some() { "encrypted" } else { "unencrypted" }
                    );
                }
                if a.compression.0 != meta.compression {
                    let name = |c: Option<format::Codec>| c.map_or("none", |c| c.name());
                    eprintln!(
                        "note: {} already exists with compression {}; --compression {} is ignored",
                        loc.display(),
                        name(meta.compression),
                        name(a.compression.0)
                    );
                }
            }
            Err(VolumeError::NotFound(_)) => {
                let size = a.size.ok_or_else(|| anyhow::anyhow!("--create needs --size for a new volume"))?;
                let size = crate::size::round_to_blocks(size, format::BLOCK_SIZE as u64);
                let chunk_size = chunk_size_arg(a.chunk_size)?;
                let opts = CreateOptions {
                    size,
                    chunk_size,
                    parent: None,
                    single_writer: false,
                    compression: a.compression.0,
                    encryption: g.new_keys(a.encrypt)?,
                };
                catalog::check_name_free(&store, &loc.prefix).await?;
                Volume::create(store.clone(), &loc.prefix, opts, &SystemClock).await?;
                eprintln!("created {} ({})", loc.display(), format_size(size));
            }
            Err(e) => return Err(e.into()),
        }
    }
    // The key before the lease: a server refused for its key must not have
    // taken the volume from a live one.
    let store = unlock(store, &loc, g).await?;
    need_key(&store, &loc).await?;
    let held = match a.read_only {
        true => None,
        false => Some(take_lease(&store, &loc, "serve", a.takeover, g).await?),
    };
    let mut opts = g.open_options(a.read_only);
    opts.log_dir = a.write_log_dir(&loc)?;
    opts.log_limit = g.write_log_limit;
    if let Some(d) = &opts.log_dir {
        // Logs of earlier boots are never replayed: nothing else removes
        // those of volumes that never come back to this host.
        if let Err(e) = crate::volume::engine::log::sweep_other_boots(d) {
            tracing::warn!(dir = %d.display(), error = %e, "removing write-back logs of earlier boots failed");
        }
    }
    let vol = match Volume::open(store.clone(), &loc.prefix, opts).await {
        Ok(v) => v,
        Err(e) => {
            if let Some(l) = held {
                l.release().await;
            }
            return Err(e).with_context(|| format!("cannot open {}", loc.display()));
        }
    };
    if !a.read_only && !g.compact_interval.is_zero() {
        warn_short_safety_age(g.compact_safety_age);
        let (prefix, every) = (loc.prefix.clone(), g.compact_interval);
        let opts = compact::CompactOptions { safety_age: g.compact_safety_age, ..compact::CompactOptions::default() };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = compact::compact(&store, &prefix, &opts, &SystemClock).await {
                    tracing::warn!(error = %e, "compaction failed; retried next interval");
                }
            }
        });
    }
    let export_name = a.export_name.unwrap_or_else(|| name.clone());
    if let Some(addr) = &a.metrics_address {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(address = %addr, "metrics at /metrics");
        tokio::spawn(crate::metrics::serve(l));
    }
    if let Some(r) = vol.log_recovery().filter(|r| r.adopted && r.entries > 0) {
        eprintln!(
            "replayed {} unflushed writes ({}) from the write-back log of the previous server",
            r.entries,
            format_size(r.bytes)
        );
    }
    let size = vol.size();
    let export = Arc::new(Export {
        name: export_name.clone(),
        description: format!("s3blk volume {}", loc.display()),
        volume: vol,
        read_only: a.read_only,
        busy_poll: Duration::from_micros(g.busy_poll_us),
        limits: crate::nbd::session::Limits::new(
            crate::nbd::session::DEFAULT_SERVER_INFLIGHT,
            a.max_connections,
            crate::nbd::session::DEFAULT_IO_DEADLINE,
        ),
        unflushed: None,
    });
    // Before the first line that tells anyone the server is up.
    let signals = wait_for_signal();
    println!(
        "serving {} ({}{}) on {}, export \"{export_name}\"",
        loc.display(),
        format_size(size),
        if a.read_only { ", read-only" } else { "" },
        bound.address
    );
    match bound.address.strip_prefix("unix:") {
        Some(path) => {
            println!("  attach:  nbd-client -unix {path} -N {export_name} /dev/nbd0");
            println!("  inspect: qemu-img info \"nbd+unix:///{export_name}?socket={path}\"");
            println!("           nbdinfo \"nbd+unix:///{export_name}?socket={path}\"");
        }
        None if secured => {
            println!("  inspect: nbdinfo \"nbds://{}/{export_name}?tls-certificates=DIR\"", bound.address);
        }
        None => {
            let (host, port) = bound.address.rsplit_once(':').unwrap_or((&bound.address, "10809"));
            println!("  attach:  nbd-client {host} {port} -N {export_name} /dev/nbd0");
            println!("  inspect: qemu-img info nbd://{}/{export_name}", bound.address);
        }
    }
    println!("stop with Ctrl-C: in-flight requests finish and everything is flushed to the store");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (taken_tx, mut taken_rx) = tokio::sync::watch::channel(None::<String>);
    let signalled = signals;
    let lost = held.as_ref().map(|l| l.lost());
    let watched = export.volume.clone();
    tokio::spawn(async move {
        let lost = async {
            match lost {
                Some(l) => l.await,
                None => std::future::pending().await,
            }
        };
        // A writer fenced by one that took no lease (a CSI node, another
        // --takeover racing a renewal) stops too.
        let fenced = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(why) = watched.fenced() {
                    break format!("this server was fenced ({why})");
                }
            }
        };
        let lost = async {
            tokio::select! {
                why = lost => why,
                why = fenced => why,
            }
        };
        tokio::select! {
            _ = signalled => tracing::info!("signal received, shutting down"),
            why = lost => {
                // Another writer took the volume over: stop serving rather
                // than answer from memory that will never be committed.
                tracing::error!("{why}; stopping");
                let _ = taken_tx.send(Some(why));
            }
        }
        let _ = tx.send(true);
    });
    let served = server::serve(bound, export, rx).await;
    let taken = taken_rx.borrow_and_update().clone();
    if let Some(l) = held {
        l.release().await;
    }
    if let Some(why) = taken {
        bail!("stopped serving {}: {why}", loc.display());
    }
    served.context("serving failed")?;
    eprintln!("stopped; all acknowledged writes are committed");
    Ok(())
}

/// SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: a signal that arrives right after the
/// server says it is serving must find them in place (the default action
/// would kill the process without its final flush).
fn wait_for_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Chunk buffers are large (1 MiB by default) and short-lived. glibc serves
/// such allocations with mmap and returns them with munmap, so every new
/// buffer is page-faulted in again; keeping them on the heap instead makes
/// reuse free. Memory stays bounded by the dirty limit and cache size.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// `300`, `90s`, `5m`, `1h`: a duration in whole seconds.
/// Flush every served volume recorded under `state_dir`, all at once.
async fn csi_flush(state_dir: &Path, timeout: Duration) -> Result<ExitCode> {
    let served = crate::csi::flush::served_volumes(state_dir)
        .with_context(|| format!("reading the node state directory {}", state_dir.display()))?;
    if served.is_empty() {
        eprintln!("no staged volumes under {}", state_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let results = crate::csi::flush::flush_all(&served, timeout).await;
    let mut failed = 0;
    for (v, r) in served.iter().zip(results) {
        match r {
            Ok(()) => eprintln!("flushed {}", v.volume_id),
            Err(e) => {
                failed += 1;
                eprintln!("could not flush {}: {e}", v.volume_id);
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A `--chunk-size` as the format takes it, or an error that gives the range.
fn chunk_size_arg(bytes: u64) -> Result<u32> {
    let out_of_range = || {
        anyhow::anyhow!(
            "chunk size {} is out of range: a power of two from {} to {}",
            format_size(bytes),
            format_size(u64::from(format::MIN_CHUNK_SIZE)),
            format_size(u64::from(format::MAX_CHUNK_SIZE))
        )
    };
    let cs = u32::try_from(bytes).map_err(|_| out_of_range())?;
    format::check_chunk_size(cs).map_err(|_| out_of_range())?;
    Ok(cs)
}

/// Take the volume's writer lease for `command`, or refuse naming who
/// holds it.
async fn take_lease(
    store: &DynStore,
    loc: &Location,
    command: &str,
    takeover: bool,
    g: &Global,
) -> Result<lease::Lease> {
    // A prefix that holds no volume gets no lease: lease.json there may be
    // an object of someone else's, which the lease would overwrite and its
    // release delete.
    replay::read_meta(store.as_ref(), &loc.prefix).await?;
    match lease::Lease::acquire(store, &loc.prefix, command, takeover, g.lease_ttl, &SystemClock).await {
        Ok(l) => Ok(l),
        Err(lease::LeaseError::Busy(occ)) => bail!("{}", lease::refusal(&loc.display(), command, &occ)),
        Err(lease::LeaseError::Volume(e)) => {
            Err(e).with_context(|| format!("cannot take the writer lease of {}", loc.display()))
        }
    }
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a duration like 300, 90s, 5m or 1h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m or h)")),
    };
    // Ten years: longer is no setting anyone means, and arithmetic on
    // it (a cutoff in Unix seconds, a fraction of a deadline) must not
    // overflow.
    const MAX_SECS: u64 = 10 * 365 * 24 * 3600;
    match n.checked_mul(mult) {
        Some(secs) if secs <= MAX_SECS => Ok(Duration::from_secs(secs)),
        _ => Err(format!("{s:?}: too large (at most 10 years, {MAX_SECS}s)")),
    }
}

fn warn_short_safety_age(age: Duration) {
    if age < compact::MIN_LIVE_SAFETY_AGE {
        eprintln!(
            "warning: a compaction safety age under {}s is safe only while no writer has the volume open",
            compact::MIN_LIVE_SAFETY_AGE.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` explains every argument of every command.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<Cli as clap::CommandFactory>::command(), "s3blk", &mut missing);
        assert!(missing.is_empty(), "arguments without help:\n{}", missing.join("\n"));
    }
}
