//! The NBD server against real clients (libnbd's nbdinfo/nbdcopy/nbdsh,
//! QEMU's qemu-img/qemu-io, fio's nbd engine) and protocol edge cases over a
//! raw socket.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nbd_client::{self, Client};
use s3blk::nbd::{Export, Listen, proto, server};
use s3blk::store::DynStore;
use s3blk::store::memory::MemoryStore;
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::{OpenOptions, Volume};

/// `s3blk serve` running as a separate process, as users run it.
struct Served {
    child: Option<Child>,
    sock: PathBuf,
    vol: PathBuf,
    name: String,
}

impl Served {
    fn start(dir: &Path, name: &str, size: &str, extra: &[&str]) -> Served {
        let vol = dir.join(name);
        let sock = dir.join(format!("{name}.sock"));
        let mut child = Command::new(common::s3blk_bin())
            .arg("serve")
            .arg(&vol)
            .args(["--create", "--size", size, "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("serve printed nothing").expect("read");
        assert!(first.starts_with("serving ") && first.contains(&sock.display().to_string()), "{first}");
        let attach = lines.next().expect("attach line").expect("read");
        assert!(attach.contains("nbd-client -unix") && attach.contains(name), "{attach}");
        std::thread::spawn(move || for _ in lines {});
        Served { child: Some(child), sock, vol, name: name.to_string() }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.name, self.sock.display())
    }

    fn signal(&mut self, sig: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill");
        child.wait().expect("wait")
    }

    /// SIGTERM: the server finishes in-flight requests, flushes, exits 0.
    fn stop(&mut self) {
        let st = self.signal("-TERM");
        assert!(st.success(), "serve exited with {st:?} after SIGTERM");
        assert!(!self.sock.exists(), "socket left behind");
    }

    /// The volume's bytes as the store holds them (only committed data).
    fn export(&self, len: usize) -> Vec<u8> {
        let out = Command::new(common::s3blk_bin())
            .args(["volume", "export"])
            .arg(&self.vol)
            .arg("-")
            .output()
            .expect("export");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout[..len.min(out.stdout.len())].to_vec()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tools(names: &[&str]) -> bool {
    names.iter().all(|n| common::require_tool(n))
}

#[test]
fn nbdinfo_reports_size_block_sizes_and_flags() {
    if !tools(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = Served::start(dir.path(), "info", "96MiB", &["--chunk-size", "256KiB"]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(srv.uri()));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "info");
    assert_eq!(e["export-size"], 96u64 << 20);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 256 << 10);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["is_rotational"], false);
    assert_eq!(j["structured"], true);
    let list = run(Command::new("nbdinfo").arg("--list").arg(format!("nbd+unix:///?socket={}", srv.sock.display())));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("export=\"info\""), "{text}");
    drop(srv);

    let srv = Served::start(dir.path(), "info", "96MiB", &["--read-only"]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(srv.uri()));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    assert_eq!(j["exports"][0]["is_read_only"], true);
    assert_eq!(j["exports"][0]["can_trim"], false);
}

#[test]
fn nbdcopy_round_trip_256mib_survives_restart() {
    if !tools(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.bin");
    let mut data = common::pattern(77, 256 << 20);
    data[(100 << 20)..(140 << 20)].fill(0);
    std::fs::write(&src, &data).expect("write src");
    let mut srv = Served::start(dir.path(), "copy", "256MiB", &[]);
    run(Command::new("nbdcopy").arg("--flush").arg(&src).arg(srv.uri()));
    let back = dir.path().join("back.bin");
    run(Command::new("nbdcopy").arg(srv.uri()).arg(&back));
    assert!(std::fs::read(&back).expect("read") == data, "nbdcopy out differs from what went in");
    srv.stop();
    assert!(srv.export(data.len()) == data, "data not durable after a clean stop");
}

#[test]
fn qemu_img_convert_and_compare() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, common::pattern(5, 64 << 20)).expect("write");
    let srv = Served::start(dir.path(), "qimg", "64MiB", &[]);
    let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(srv.uri()));
    let j: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(j["virtual-size"], 64 << 20);
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(srv.uri()));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(srv.uri()));
}

/// A compressed volume (`serve --create --compression zstd`) through NBD:
/// qemu-img writes text and noise into it and compares, and again after a
/// restart (cold reads of packed chunks, by range where qemu-io reads a
/// few KiB); the text takes less room in the store than it reads as.
#[test]
fn a_compressed_volume_through_nbd() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let line = b"2026-12-03 10:00:00 INFO request served in 3 ms by worker 7 of pool main\n";
    let mut data: Vec<u8> = line.iter().cycle().take(8 << 20).copied().collect();
    data[2 << 20..3 << 20].copy_from_slice(&common::pattern(5, 1 << 20));
    std::fs::write(&src, &data).expect("write");
    let extra = ["--compression", "zstd", "--chunk-size", "256KiB"];
    let mut srv = Served::start(dir.path(), "packed", "8MiB", &extra);
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(srv.uri()));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(srv.uri()));
    srv.stop();
    let chunks = srv.vol.join("chunks");
    let stored: u64 = std::fs::read_dir(&chunks)
        .expect("chunks")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).expect("chunk dir").flatten())
        .map(|f| f.metadata().expect("meta").len())
        .sum();
    assert!(stored < 3 << 20, "8 MiB (7 of text) stored in {stored} bytes");
    let mut srv = Served::start(dir.path(), "packed", "8MiB", &extra);
    // Small cold reads first, then everything.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-c", "read -P 0x31 5000000 1", "-c", "read -P 0x71 100 1"]);
    run(c.arg(srv.uri()));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(srv.uri()));
    srv.stop();
    assert!(srv.export(data.len()) == data);
}

/// An encrypted volume through NBD: qemu-img writes a text image through
/// `serve --create --encrypt`, reads it back before and after a restart
/// (cold ranged reads open only the frames they need), and no file of the
/// store holds the text. Without the key, serve refuses the volume.
#[test]
fn an_encrypted_volume_through_nbd() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key");
    std::fs::write(&key, "c3".repeat(32)).expect("key");
    let key = key.display().to_string();
    let src = dir.path().join("src.raw");
    let line = b"2026-12-03 10:00:00 SECRET ledger row 17 balance 1234.56 account alice\n";
    let mut data: Vec<u8> = line.iter().cycle().take(8 << 20).copied().collect();
    data[2 << 20..3 << 20].copy_from_slice(&common::pattern(6, 1 << 20));
    std::fs::write(&src, &data).expect("write");
    let extra = ["--encrypt", "--key-file", &key, "--compression", "lz4", "--chunk-size", "256KiB"];
    let mut srv = Served::start(dir.path(), "sealed", "8MiB", &extra);
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(srv.uri()));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(srv.uri()));
    srv.stop();
    let mut holding = Vec::new();
    let mut files = vec![srv.vol.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).expect("read_dir").flatten().map(|e| e.path()));
        } else if std::fs::read(&p).expect("read").windows(6).any(|w| w == b"SECRET") {
            holding.push(p);
        }
    }
    assert!(holding.is_empty(), "plaintext in {holding:?}");
    let mut srv = Served::start(dir.path(), "sealed", "8MiB", &["--key-file", &key]);
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-c", "read -P 0x63 5000020 1", "-c", "read -P 0x67 30 1"]);
    run(c.arg(srv.uri()));
    // A second server without the key, even with --takeover, is refused
    // before it takes the volume: the first keeps its lease and serves on.
    let token = || {
        let lease: serde_json::Value =
            serde_json::from_slice(&std::fs::read(srv.vol.join("lease.json")).expect("lease")).expect("json");
        lease["token"].clone()
    };
    let held = token();
    let out = Command::new(common::s3blk_bin())
        .args(["serve", "--takeover"])
        .arg(&srv.vol)
        .args(["--listen", &format!("unix:{}", dir.path().join("nokey.sock").display())])
        .env_remove("S3BLK_KEY_FILE")
        .output()
        .expect("serve without the key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is encrypted") && err.contains("--key-file"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(token(), held, "the lease is the first server's");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(srv.uri()));
    srv.stop();
}

#[test]
fn qemu_io_unaligned_io_trim_zero_flush_fua() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = Served::start(dir.path(), "qio", "16MiB", &["--chunk-size", "64KiB"]);
    let cmds = [
        "write -P 0xab 1000 3000",
        "read -P 0xab 1000 3000",
        "write -P 0xcd 65530 20",
        "read -P 0xcd 65530 20",
        "write -f -P 0x11 5M 12345",
        "read -P 0x11 5M 12345",
        "write -z 2M 1M",
        "read -P 0 2M 1M",
        "write -P 0x22 3M 1M",
        "discard 3M 512K",
        "read -P 0 3M 512K",
        "read -P 0x22 3584K 512K",
        "flush",
    ];
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(srv.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("verification failed") && !text.contains("error"), "{text}");
    assert_eq!(text.matches("read ").count(), 6, "{text}");
    srv.stop();
    let img = srv.export(16 << 20);
    assert!(img[1000..4000].iter().all(|&b| b == 0xab));
    assert!(img[5 << 20..(5 << 20) + 12345].iter().all(|&b| b == 0x11));
    assert!(img[3 << 20..(3 << 20) + (512 << 10)].iter().all(|&b| b == 0));
}

#[test]
fn serve_compacts_its_volume_in_the_background() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = ["--chunk-size", "64KiB", "--compact-interval", "1", "--compact-safety-age", "0"];
    let mut srv = Served::start(dir.path(), "gc", "1MiB", &extra);
    // Three clients in turn rewrite chunk 0; each disconnect commits.
    for pattern in ["0x11", "0x22", "0x33"] {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 64k"), "-c", "flush"])
            .arg(srv.uri()));
    }
    let gens = || std::fs::read_dir(srv.vol.join("chunks").join(format!("{:016x}", 0))).map(|d| d.count()).unwrap_or(0);
    let mut left = gens();
    for _ in 0..900 {
        if left == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = gens();
    }
    assert_eq!(left, 1, "superseded generations of chunk 0 were not collected");
    srv.stop();
    assert!(srv.export(65536).iter().all(|&b| b == 0x33));
}

/// One sample of a scraped exposition: `series` is the name with its
/// labels as printed (`s3blk_x{volume="v"}`); `None` when absent.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn scrape(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Writes three chunks, waits for a line on stdin, flushes, waits again.
const METRICS_CLIENT: &str = r#"
import nbd, os, sys
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
for i in range(3):
    h.pwrite(b"\x5a" * 4096, i * 65536)
print("written", flush=True)
sys.stdin.readline()
h.flush()
print("flushed", flush=True)
sys.stdin.readline()
h.shutdown()
"#;

/// Issue 12, "metrics users can act on": `s3blk serve` exports, per
/// volume, NBD latency by command, commit latency, the engine's dirty and
/// staged figures (dirty before a flush, none after) and store call
/// latency, all on `/metrics`, scraped over HTTP while a real client
/// (libnbd) holds the volume.
#[test]
fn serve_exports_per_volume_metrics() {
    if !tools(&["nbdsh"]) || !python_libnbd() {
        return;
    }
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let log_dir = dir.path().join("write-log").display().to_string();
    let mut srv = Served::start(
        dir.path(),
        "met",
        "1MiB",
        &["--chunk-size", "64KiB", "--metrics-address", &addr, "--write-log-dir", &log_dir],
    );
    let mut client = Command::new("/usr/bin/python3")
        .env("URI", srv.uri())
        .args(["-c", METRICS_CLIENT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the libnbd client");
    let mut stdin = client.stdin.take().expect("stdin");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let mut next_line = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next_line(), "written");

    let v = |name: &str| format!("{name}{{volume=\"met\"}}");
    let nbd = |cmd: &str| format!("s3blk_nbd_request_duration_seconds_count{{volume=\"met\",command=\"{cmd}\"}}");
    let before = scrape(&addr, "/metrics");
    assert!(before.starts_with("HTTP/1.1 200 OK"), "{before}");
    assert_eq!(sample(&before, &nbd("write")), Some(3.0), "{before}");
    // Three chunks written, none uploaded: a page each, whose bytes only
    // the write-back log keeps; the dirty budget counts their entries (128
    // bytes) and their slots (1 KiB, and a bit a page of the chunk).
    let slot = 1024.0 + f64::from(64u32 << 10) / 4096.0 / 8.0;
    assert_eq!(sample(&before, &v("s3blk_volume_dirty_bytes")), Some(3.0 * (128.0 + slot)), "{before}");
    assert_eq!(sample(&before, &v("s3blk_volume_staged_chunks")), Some(0.0), "{before}");
    // The write-back log: a segment header, then three 4 KiB writes of 17 bytes of header each.
    assert_eq!(sample(&before, &v("s3blk_volume_write_log_bytes")), Some((16 + 3 * (17 + 4096)) as f64), "{before}");
    let journal_before = sample(&before, &v("s3blk_volume_journal_records_since_checkpoint")).expect("journal gauge");

    writeln!(stdin).expect("tell the client to flush");
    assert_eq!(next_line(), "flushed");
    let after = scrape(&addr, "/metrics");
    assert_eq!(sample(&after, &nbd("write")), Some(3.0), "{after}");
    assert_eq!(sample(&after, &nbd("flush")), Some(1.0), "{after}");
    assert_eq!(sample(&after, &v("s3blk_volume_dirty_bytes")), Some(0.0), "{after}");
    assert_eq!(sample(&after, &v("s3blk_volume_staged_chunks")), Some(0.0), "{after}");
    // Committed: only the new segment's header is left.
    assert_eq!(sample(&after, &v("s3blk_volume_write_log_bytes")), Some(16.0), "{after}");
    // A page in each of three chunks: committed inside the record, as patches.
    assert_eq!(sample(&before, &v("s3blk_volume_patch_bytes")), Some(0.0), "{before}");
    assert_eq!(sample(&after, &v("s3blk_volume_patch_bytes")), Some(3.0 * 4096.0), "{after}");
    // The flush committed one journal record.
    assert_eq!(
        sample(&after, &v("s3blk_volume_journal_records_since_checkpoint")),
        Some(journal_before + 1.0),
        "{after}"
    );
    assert_eq!(sample(&after, &v("s3blk_commits_total")), Some(1.0), "{after}");
    assert!(sample(&after, &v("s3blk_commit_duration_seconds_count")).is_some_and(|n| n >= 1.0), "{after}");
    // Whole pages over chunks never read: committed inline, so nothing
    // was fetched and nothing is cached.
    assert_eq!(sample(&after, &v("s3blk_volume_cache_bytes")), Some(0.0), "{after}");
    // The journal record (and the open record, the lease) went to the
    // store, each attempt timed; nothing failed.
    let puts = sample(&after, "s3blk_store_request_duration_seconds_count{op=\"PUT\",outcome=\"ok\"}");
    assert!(puts.is_some_and(|n| n >= 2.0), "{after}");
    assert!(sample(&after, "s3blk_store_requests_total{op=\"PUT\"}").is_some_and(|n| n >= 2.0), "{after}");
    assert!(!after.contains("s3blk_store_failures_total{"), "{after}");
    assert!(after.contains("# TYPE s3blk_compactions_total counter"), "{after}");
    assert!(scrape(&addr, "/healthz").ends_with("ok\n"));

    writeln!(stdin).expect("tell the client to disconnect");
    assert!(client.wait().expect("wait").success());
    srv.stop();
}

const NBDSH_SCRIPT: &str = r#"
import errno, os
uri = os.environ["URI"]
h.set_strict_mode(0)            # send unaligned and out-of-range requests as they are
h.connect_uri(uri)
size = h.get_size()
h.pwrite(b"\xab" * 3000, 1001)
assert h.pread(3000, 1001) == b"\xab" * 3000
assert h.pread(10, 996) == b"\0" * 5 + b"\xab" * 5
h.pwrite(b"\x11" * 12345, 5 * 2**20 + 7, nbd.CMD_FLAG_FUA)
h.zero(1002, 100)                              # unaligned WRITE_ZEROES of 100..1102 (count, offset)
assert h.pread(3, 1100) == b"\0\0\xab"          # zeroed range ends at 1102
assert h.pread(1002, 100) == b"\0" * 1002
h.zero(2**20, 2**20, nbd.CMD_FLAG_NO_HOLE)
h.trim(2**20, 2**21)
h.cache(2**22, 0)
h.flush()
# Structured read of data followed by a megabyte of holes.
chunk = h.pread(2**20 + 12345, 5 * 2**20 + 7)
assert chunk[:12345] == b"\x11" * 12345
assert chunk[12345:] == b"\0" * 2**20
for bad in [(4096, size), (1, size), (2**20, size - 2**19)]:
    try:
        h.pread(*bad)
        raise SystemExit("read past the end succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"x" * 10, size - 5)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
# A second connection sees the first one's completed writes (multi-conn).
h2 = nbd.NBD()
h2.set_strict_mode(0)
h2.connect_uri(uri)
h.pwrite(b"conn-one", 8 * 2**20)
assert h2.pread(8, 8 * 2**20) == b"conn-one"
h2.flush()
print("NBDSH-OK")
"#;

fn python_libnbd() -> bool {
    let ok = Command::new("/usr/bin/python3").args(["-c", "import nbd"]).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(!common::in_ci(), "python3-libnbd is required (tests/run.sh installs it)");
        eprintln!("\n*** SKIPPING: python3-libnbd is not installed ***\n");
    }
    ok
}

#[test]
fn nbdsh_unaligned_holes_errors_and_multi_conn_flush() {
    if !tools(&["nbdsh"]) || !python_libnbd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = Served::start(dir.path(), "sh", "16MiB", &[]);
    // libnbd's Python bindings (what nbdsh runs on) load only in Debian's interpreter.
    let script = format!("import nbd\nh = nbd.NBD()\n{NBDSH_SCRIPT}");
    let out = run(Command::new("/usr/bin/python3").env("URI", srv.uri()).args(["-c", &script]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("NBDSH-OK"));
    // The flush on connection 2 covered connection 1's write: it survives
    // a crash (SIGKILL, no shutdown flush).
    srv.signal("-KILL");
    let img = srv.export(16 << 20);
    assert_eq!(&img[8 << 20..(8 << 20) + 8], b"conn-one");
    assert!(img[1102..4001].iter().all(|&b| b == 0xab));
    assert!(img[100..1102].iter().all(|&b| b == 0));
}

#[test]
fn fio_verify_qd32_four_connections() {
    if !tools(&["fio"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = Served::start(dir.path(), "fio", "128MiB", &["--chunk-size", "256KiB"]);
    let job = format!(
        "[global]\nioengine=nbd\nuri={}\nrw=randwrite\nbs=4k\nsize=32m\niodepth=32\nverify=crc32c\nverify_fatal=1\n\
         do_verify=1\nnumjobs=4\noffset_increment=32m\ngroup_reporting=1\n[verify]\n",
        srv.uri()
    );
    let jobfile = dir.path().join("verify.fio");
    std::fs::write(&jobfile, job).expect("write job");
    let report = dir.path().join("fio.json");
    run(Command::new("fio")
        .current_dir(dir.path())
        .arg("--output-format=json")
        .arg(format!("--output={}", report.display()))
        .arg(&jobfile));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("fio json");
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 4 * (32 << 20), "{job}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 4 * (32 << 20), "verify pass did not read: {job}");
}

// ------------------------------------------------------------------ raw protocol edge cases (in-process server)

struct InProcess {
    sock: PathBuf,
    _dir: tempfile::TempDir,
    store: DynStore,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn in_process(read_only: bool) -> InProcess {
    in_process_with(read_only, 4 << 20, s3blk::nbd::session::Limits::default()).await
}

async fn in_process_with(read_only: bool, size: u64, limits: s3blk::nbd::session::Limits) -> InProcess {
    let store: DynStore = Arc::new(MemoryStore::new());
    let opts = CreateOptions::new(size, 64 << 10);
    Volume::create(store.clone(), "v/", opts, &s3blk::clock::SystemClock).await.expect("create");
    let volume =
        Volume::open(store.clone(), "v/", OpenOptions { read_only, ..OpenOptions::default() }).await.expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let bound = server::bind(&Listen::Unix(sock.clone()), None).await.expect("bind");
    let export = Arc::new(Export {
        name: "v".into(),
        description: "test".into(),
        volume,
        read_only,
        busy_poll: std::time::Duration::from_micros(50),
        limits,
        unflushed: None,
    });
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(server::serve(bound, export, rx));
    InProcess { sock, _dir: dir, store, shutdown, task }
}

/// With the smallest in-flight budget a node gives (32 MiB, one largest
/// payload), a TRIM or WRITE_ZEROES of more than that (mkfs.xfs discards
/// the whole device in such requests) and a READ larger than any payload
/// are answered, and requests behind them too: charged by their length,
/// they waited for more than the whole budget, for good, and every
/// request after them on every connection with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_hold_no_memory_are_not_charged_by_their_range() {
    let limits = s3blk::nbd::session::Limits::new(proto::MAX_PAYLOAD as usize, 8, std::time::Duration::from_secs(10));
    let srv = in_process_with(false, 256 << 20, limits).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    let answered = async {
        assert_eq!(c.write(1, 0, b"kept").await, 0);
        c.send(proto::CMD_TRIM, 0, 2, 4096, 64 << 20, &[]).await;
        assert_eq!(c.reply().await, (0, 2), "a 64 MiB TRIM");
        c.send(proto::CMD_WRITE_ZEROES, 0, 3, 128 << 20, 128 << 20, &[]).await;
        assert_eq!(c.reply().await, (0, 3), "a 128 MiB WRITE_ZEROES");
        c.send(proto::CMD_READ, 0, 4, 0, proto::MAX_PAYLOAD + 4096, &[]).await;
        assert_eq!(c.reply().await, (proto::EINVAL, 4), "a READ larger than any payload");
        c.read(5, 0, 4).await.expect("a read after them")
    };
    let back = tokio::time::timeout(std::time::Duration::from_secs(20), answered).await.expect("requests hung");
    assert_eq!(back, b"kept");
}

/// A client that sends READs and never reads their replies holds the
/// server-wide budget only until its replies make no progress for the
/// deadline while another request waits for that budget: the connection is
/// then closed and what it held is given back, so another client's
/// requests go on. They waited for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_replies_gives_the_budget_back() {
    // The smallest server-wide budget: one largest payload (32 MiB).
    let limits = s3blk::nbd::session::Limits::new(0, 8, std::time::Duration::from_secs(1));
    let srv = in_process_with(false, 64 << 20, limits).await;
    let mut hog = Client::connect(&srv.sock, "v").await;
    for handle in 0..40 {
        hog.send(proto::CMD_READ, 0, handle, 0, 1 << 20, &[]).await;
    }
    let mut other = Client::connect(&srv.sock, "v").await;
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), other.read(100, 0, 4096)).await;
    assert!(read.is_ok_and(|r| r.is_ok()), "another client's read waited behind one that reads no replies");
    drop(hog);
}

/// On a server with `limits`: one client sends 40 reads of 1 MiB and reads
/// no reply for 3 s (longer than the deadline), then reads them all: each
/// arrives whole, and the connection goes on.
async fn a_slow_reader_gets_every_reply(limits: s3blk::nbd::session::Limits) {
    let srv = in_process_with(false, 64 << 20, limits).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    let data = common::pattern(12, 1 << 20);
    assert_eq!(c.write(1, 0, &data).await, 0);
    for handle in 0..40 {
        c.send(proto::CMD_READ, 0, 100 + handle, 0, 1 << 20, &[]).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let all = async {
        let mut handles = Vec::new();
        for _ in 0..40 {
            let (err, handle) = c.reply().await;
            assert_eq!(err, 0);
            assert_eq!(c.read_payload(1 << 20).await, data, "reply {handle}");
            handles.push(handle);
        }
        handles.sort();
        handles
    };
    let handles = tokio::time::timeout(std::time::Duration::from_secs(30), all).await.expect("replies stopped");
    assert_eq!(handles, (100..140).collect::<Vec<u64>>());
    assert_eq!(c.read(200, 0, 4096).await.expect("the connection goes on"), data[..4096]);
}

/// A client alone on a server whose budget is smaller than what it keeps
/// in flight (the kernel's only connection on a node with a small budget):
/// its own requests wait behind its unread replies, which is no reason to
/// cut it. Every reply arrives once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_alone_on_a_small_budget_keeps_its_connection() {
    // The smallest server-wide budget (32 MiB), less than 40 × 1 MiB.
    let limits = s3blk::nbd::session::Limits::new(0, 8, std::time::Duration::from_secs(1));
    a_slow_reader_gets_every_reply(limits).await;
}

/// A client that stops reading its replies for longer than the deadline
/// while nothing else waits for the budget (a paused machine, a busy
/// reader) keeps its connection: every reply arrives whole once it reads
/// again (replies to concurrent reads may come in any order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_nobody_waits_for_keeps_its_connection() {
    let limits = s3blk::nbd::session::Limits::new(256 << 20, 8, std::time::Duration::from_secs(1));
    a_slow_reader_gets_every_reply(limits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_options_get_errors_not_a_dropped_connection() {
    let srv = in_process(false).await;
    let mut s = nbd_client::greet(&srv.sock).await;
    for (code, data, want) in [
        (99u32, &b"whatever"[..], proto::REP_ERR_UNSUP),
        (proto::OPT_STARTTLS, &b""[..], proto::REP_ERR_UNSUP),
        (proto::OPT_LIST, &b"junk"[..], proto::REP_ERR_INVALID),
        (proto::OPT_GO, &b"\0\0"[..], proto::REP_ERR_INVALID),
        (proto::OPT_STRUCTURED_REPLY, &b"x"[..], proto::REP_ERR_INVALID),
        (proto::OPT_SET_META_CONTEXT, &b""[..], proto::REP_ERR_INVALID),
    ] {
        nbd_client::send_option(&mut s, code, data).await;
        let (opt, kind, _) = nbd_client::read_option_reply(&mut s).await;
        assert_eq!((opt, kind), (code, want), "option {code}");
    }
    nbd_client::send_option(&mut s, proto::OPT_INFO, &nbd_client::go_payload("no-such-export")).await;
    assert_eq!(nbd_client::read_option_reply(&mut s).await.1, proto::REP_ERR_UNKNOWN);
    // An option claiming 4 GiB: refused without the server buffering it.
    let mut hdr = proto::IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&(proto::MAX_OPTION_LEN + 1).to_be_bytes());
    tokio::io::AsyncWriteExt::write_all(&mut s, &hdr).await.expect("hdr");
    tokio::io::AsyncWriteExt::write_all(&mut s, &vec![0u8; proto::MAX_OPTION_LEN as usize + 1]).await.expect("body");
    assert_eq!(nbd_client::read_option_reply(&mut s).await.1, proto::REP_ERR_TOO_BIG);
    // The connection is still good.
    let mut c = nbd_client::go(s, "v").await;
    assert_eq!(c.size, 4 << 20);
    assert_eq!(c.write(1, 0, b"still here").await, 0);
    assert_eq!(c.read(2, 0, 10).await.expect("read"), b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errnos_and_the_connection_survives() {
    let srv = in_process(false).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    let size = c.size;
    assert_eq!(c.read(1, size, 1).await, Err(proto::EINVAL));
    assert_eq!(c.read(2, u64::MAX - 10, 100).await, Err(proto::EINVAL));
    assert_eq!(c.write(3, size - 2, b"abc").await, proto::ENOSPC, "a write past the end");
    // A WRITE longer than the maximum block size: EINVAL, payload skipped.
    let big = vec![7u8; proto::MAX_PAYLOAD as usize + 4096];
    c.send(proto::CMD_WRITE, 0, 4, 0, big.len() as u32, &big).await;
    assert_eq!(c.reply().await, (proto::EINVAL, 4));
    assert_eq!(c.read(5, 0, 4).await.expect("read"), vec![0; 4], "the oversized write changed data");
    c.send(99, 0, 6, 0, 0, &[]).await;
    assert_eq!(c.reply().await, (proto::EINVAL, 6));
    assert_eq!(c.flush(7).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_out_of_order_by_handle() {
    let srv = in_process(false).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    // Pipeline 64 writes to distinct chunks, then read them all back.
    for i in 0..64u64 {
        let data = common::pattern(i, 1000);
        c.send(proto::CMD_WRITE, 0, 1000 + i, i * 65536 + 17, 1000, &data).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (err, h) = c.reply().await;
        assert_eq!(err, 0);
        assert!(seen.insert(h), "handle {h} answered twice");
    }
    assert_eq!(seen.len(), 64);
    for i in 0..64u64 {
        assert_eq!(c.read(i, i * 65536 + 17, 1000).await.expect("read"), common::pattern(i, 1000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let srv = in_process(true).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    assert_ne!(c.flags & proto::TF_READ_ONLY, 0);
    assert_eq!(c.write(1, 0, b"no").await, proto::EPERM);
    c.send(proto::CMD_TRIM, 0, 2, 0, 4096, &[]).await;
    assert_eq!(c.reply().await, (proto::EPERM, 2));
    assert_eq!(c.flush(3).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writer_answers_eshutdown() {
    let srv = in_process(false).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    assert_eq!(c.write(1, 0, b"before").await, 0);
    assert_eq!(c.flush(2).await, 0);
    // Another writer takes over the volume.
    let other = Volume::open(srv.store.clone(), "v/", OpenOptions::default()).await.expect("open");
    other.write(0, b"takeover").await.expect("write");
    other.flush().await.expect("flush");
    assert_eq!(c.write(3, 100, b"stale").await, 0, "the write is only buffered");
    assert_eq!(c.flush(4).await, proto::ESHUTDOWN);
    assert_eq!(c.write(5, 100, b"stale").await, proto::ESHUTDOWN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_request_loses_no_acknowledged_data() {
    let srv = in_process(false).await;
    let mut c = Client::connect(&srv.sock, "v").await;
    assert_eq!(c.write(1, 0, b"acknowledged").await, 0);
    // Half a write request, then the socket closes.
    let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 2, offset: 4096, length: 8192 };
    tokio::io::AsyncWriteExt::write_all(&mut c.s, &proto::encode_request(&r)).await.expect("hdr");
    tokio::io::AsyncWriteExt::write_all(&mut c.s, &[9u8; 100]).await.expect("part");
    drop(c);
    // The server stays up; the acknowledged write was flushed at disconnect.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = Volume::open(srv.store.clone(), "v/", OpenOptions { read_only: true, ..OpenOptions::default() })
            .await
            .expect("open");
        if v.read(0, 12).await.expect("read") == b"acknowledged" {
            assert_eq!(v.read(4096, 100).await.expect("read"), vec![0; 100], "a torn request was applied");
            break;
        }
        assert!(Instant::now() < deadline, "acknowledged write never committed after disconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c2 = Client::connect(&srv.sock, "v").await;
    assert_eq!(c2.read(1, 0, 12).await.expect("read"), b"acknowledged");
    let _ = srv.shutdown.send(true);
    srv.task.await.expect("join").expect("server stopped cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_never_crash_a_session() {
    use tokio::io::AsyncWriteExt;
    let srv = in_process(false).await;
    for seed in 0..64u64 {
        let mut s = tokio::net::UnixStream::connect(&srv.sock).await.expect("connect");
        let mut junk = common::pattern(seed, 200 + (seed as usize * 37) % 3000);
        if seed % 2 == 0 {
            // Valid greeting reply, then junk options.
            junk[..4].copy_from_slice(&1u32.to_be_bytes());
            junk[4..12].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
        }
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink))
            .await
            .expect("session must end, not hang");
    }
    let mut c = Client::connect(&srv.sock, "v").await;
    assert_eq!(c.write(1, 0, b"alive").await, 0);
}

#[test]
fn fuzz_corpus_replays_cleanly() {
    let dir = common::repo_root().join("fuzz/corpus/nbd_proto");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        s3blk::nbd::proto::fuzz_one(&data);
        n += 1;
    }
    assert!(n >= 8, "corpus has only {n} inputs");
}

/// A write that has to wait for the store (here: a partial write whose
/// chunk must be fetched first, and the fetch hangs) does not stop the
/// connection from reading and answering the requests behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_the_store_does_not_stall_its_connection() {
    use s3blk::store::fault::{Fault, FaultStore, Op, Rule};
    let mem: DynStore = Arc::new(MemoryStore::new());
    let fault = Arc::new(FaultStore::new(mem.clone()));
    let opts = CreateOptions::new(4 << 20, 64 << 10);
    Volume::create(mem.clone(), "v/", opts, &s3blk::clock::SystemClock).await.expect("create");
    let seed = Volume::open(mem.clone(), "v/", OpenOptions::default()).await.expect("open");
    seed.write(64 << 10, &common::pattern(3, 64 << 10)).await.expect("write");
    seed.flush().await.expect("flush");
    drop(seed);
    let volume = Volume::open(fault.clone(), "v/", OpenOptions::default()).await.expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let bound = server::bind(&Listen::Unix(sock.clone()), None).await.expect("bind");
    let export = Arc::new(Export {
        name: "v".into(),
        description: "test".into(),
        volume,
        read_only: false,
        busy_poll: Duration::ZERO,
        limits: s3blk::nbd::session::Limits::default(),
        unflushed: None,
    });
    let (_shutdown, rx) = tokio::sync::watch::channel(false);
    let _task = tokio::spawn(server::serve(bound, export, rx));
    let mut c = Client::connect(&sock, "v").await;
    fault.add_rule(Rule { op: Some(Op::Get), key_contains: Some("chunks/".into()), fault: Fault::Hang, times: 1 });
    // 100 bytes into chunk 1: the engine needs the chunk's stored bytes.
    c.send(proto::CMD_WRITE, 0, 1, (64 << 10) + 10, 100, &[7u8; 100]).await;
    c.send(proto::CMD_READ, 0, 2, 2 << 20, 4096, &[]).await;
    let (err, handle) = tokio::time::timeout(Duration::from_secs(5), c.reply())
        .await
        .expect("the read behind a waiting write was not answered");
    assert_eq!((err, handle), (0, 2));
    assert!(c.read_payload(4096).await.iter().all(|&b| b == 0));
}

/// Sparse, as NBD tools expect: the base:allocation metadata context.
/// `nbdinfo --map` shows unmapped and zeroed chunks as holes and written
/// ones as data; nbdcopy and qemu-img then
/// skip the holes, so a copy of a mostly empty volume stays sparse.
#[test]
fn block_status_reports_holes_and_copies_stay_sparse() {
    if !tools(&["nbdinfo", "nbdcopy", "qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = Served::start(dir.path(), "sparse", "64MiB", &["--chunk-size", "1MiB"]);
    let image = format!("nbd+unix:///sparse?socket={}", srv.sock.display());
    // Data at [3 MiB, 5 MiB), then zeroes over [4 MiB, 5 MiB), then a
    // small write at 40 MiB.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xab 3M 2M", "-c", "flush"]).arg(&image));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 4M 1M", "-c", "flush"]).arg(&image));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xcd 40M 4k"]).arg(&image));

    let out = run(Command::new("nbdinfo").args(["--map", "--json"]).arg(&image));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map json");
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (e["offset"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0), e["type"].as_u64().unwrap_or(9))
        })
        .collect();
    const M: u64 = 1 << 20;
    assert_eq!(
        extents,
        vec![(0, 3 * M, 3), (3 * M, M, 0), (4 * M, 36 * M, 3), (40 * M, M, 0), (41 * M, 23 * M, 3)],
        "nbdinfo --map: {map}"
    );

    // nbdcopy to a file: only the data is written, the rest stays a hole.
    let copy = dir.path().join("copy.img");
    std::fs::File::create(&copy).and_then(|f| f.set_len(64 * M)).expect("target");
    run(Command::new("nbdcopy").arg(&image).arg(&copy));
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&copy).expect("copy").blocks() * 512
    };
    assert!(allocated <= 4 * M, "the copy allocated {allocated} bytes for 2 MiB of data");
    let bytes = std::fs::read(&copy).expect("read copy");
    assert!(bytes[3 * M as usize..4 * M as usize].iter().all(|&b| b == 0xab));
    assert!(bytes[4 * M as usize..5 * M as usize].iter().all(|&b| b == 0));
    assert!(bytes[40 * M as usize..40 * M as usize + 4096].iter().all(|&b| b == 0xcd));
    // qemu-img sees the same map.
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(&image));
    let qmap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img map json");
    let data: Vec<(u64, u64)> = qmap
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(data, vec![(3 * M, M), (40 * M, M)], "qemu-img map: {qmap}");
}

/// Metadata context negotiation over a raw socket: LIST offers
/// base:allocation, SET selects it (exact names only), unknown contexts
/// are not selected, and BLOCK_STATUS without a selected context is
/// refused with EINVAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_contexts_are_negotiated_by_the_spec() {
    fn request(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }
    async fn contexts(s: &mut tokio::net::UnixStream, code: u32) -> (Vec<String>, u32) {
        let mut names = Vec::new();
        loop {
            let (opt, kind, d) = nbd_client::read_option_reply(s).await;
            assert_eq!(opt, code);
            match kind {
                proto::REP_META_CONTEXT => names.push(String::from_utf8_lossy(&d[4..]).into_owned()),
                other => return (names, other),
            }
        }
    }
    let srv = in_process(false).await;
    let mut s = nbd_client::greet(&srv.sock).await;
    // Before structured replies: refused.
    nbd_client::send_option(&mut s, proto::OPT_LIST_META_CONTEXT, &request("v", &[])).await;
    assert_eq!(contexts(&mut s, proto::OPT_LIST_META_CONTEXT).await, (vec![], proto::REP_ERR_INVALID));
    nbd_client::send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(nbd_client::read_option_reply(&mut s).await.1, proto::REP_ACK);
    for (code, queries, want) in [
        (proto::OPT_LIST_META_CONTEXT, vec![], vec!["base:allocation"]),
        (proto::OPT_LIST_META_CONTEXT, vec!["base:"], vec!["base:allocation"]),
        (proto::OPT_LIST_META_CONTEXT, vec!["qemu:dirty-bitmap:x"], vec![]),
        (proto::OPT_SET_META_CONTEXT, vec!["base:"], vec![]),
        (proto::OPT_SET_META_CONTEXT, vec!["nope:x", "base:allocation"], vec!["base:allocation"]),
    ] {
        nbd_client::send_option(&mut s, code, &request("v", &queries)).await;
        let want: Vec<String> = want.into_iter().map(String::from).collect();
        assert_eq!(contexts(&mut s, code).await, (want, proto::REP_ACK), "{code} {queries:?}");
    }
    nbd_client::send_option(&mut s, proto::OPT_SET_META_CONTEXT, &request("other", &["base:allocation"])).await;
    assert_eq!(contexts(&mut s, proto::OPT_SET_META_CONTEXT).await.1, proto::REP_ERR_UNKNOWN);
    let mut bad = request("v", &["base:allocation"]);
    bad.push(0);
    nbd_client::send_option(&mut s, proto::OPT_SET_META_CONTEXT, &bad).await;
    assert_eq!(contexts(&mut s, proto::OPT_SET_META_CONTEXT).await.1, proto::REP_ERR_INVALID);
    // The last good SET selected base:allocation: a block status of the
    // whole (empty) volume is one hole.
    let mut c = nbd_client::go(s, "v").await;
    c.send(proto::CMD_BLOCK_STATUS, 0, 9, 0, 4 << 20, &[]).await;
    let mut h = [0u8; 20];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut h).await.expect("reply header");
    assert_eq!(u32::from_be_bytes([h[0], h[1], h[2], h[3]]), proto::STRUCTURED_REPLY_MAGIC);
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), proto::REPLY_TYPE_BLOCK_STATUS);
    let mut body = vec![0u8; u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut body).await.expect("reply body");
    assert_eq!(body, [1u32, 4 << 20, 3].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<u8>>());

    // Without a selected context, BLOCK_STATUS is refused.
    let mut s = nbd_client::greet(&srv.sock).await;
    nbd_client::send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(nbd_client::read_option_reply(&mut s).await.1, proto::REP_ACK);
    let mut c = nbd_client::go(s, "v").await;
    c.send(proto::CMD_BLOCK_STATUS, 0, 10, 0, 4096, &[]).await;
    let mut h = [0u8; 20];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut h).await.expect("reply header");
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), proto::REPLY_TYPE_ERROR);
}

/// With structured replies on, a READ with flags it may not carry gets a
/// structured error (a simple reply to a READ is out of protocol then, and
/// strict clients drop the connection), and the stream stays in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_bad_flags_gets_a_structured_error_once_they_are_on() {
    let srv = in_process(false).await;
    let mut s = nbd_client::greet(&srv.sock).await;
    nbd_client::send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(nbd_client::read_option_reply(&mut s).await.1, proto::REP_ACK);
    let mut c = nbd_client::go(s, "v").await;
    c.send(proto::CMD_READ, proto::CMD_FLAG_DF, 7, 0, 512, &[]).await;
    let mut h = [0u8; 20];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut h).await.expect("reply header");
    assert_eq!(u32::from_be_bytes([h[0], h[1], h[2], h[3]]), proto::STRUCTURED_REPLY_MAGIC, "a simple reply");
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), proto::REPLY_TYPE_ERROR);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().expect("handle")), 7);
    let mut body = vec![0u8; u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize];
    tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut body).await.expect("reply body");
    assert_eq!(u32::from_be_bytes([body[0], body[1], body[2], body[3]]), proto::EINVAL);
    // In step: a write and its simple reply.
    assert_eq!(c.write(8, 0, &[3u8; 512]).await, 0);
}

/// The MUSTs and SHOULDs of the protocol the server once skipped: unknown
/// handshake flags drop the connection; a bad option magic is not trusted
/// for its length; unknown or unadvertised command flags get EINVAL (and
/// the stream stays in step); a write past the end gets ENOSPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_musts_flags_magic_and_enospc() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn closed(s: &mut tokio::net::UnixStream) -> bool {
        let mut b = [0u8; 64];
        matches!(tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
    let srv = in_process(false).await;
    // Unknown client flags.
    let mut s = tokio::net::UnixStream::connect(&srv.sock).await.expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | 1 << 7).to_be_bytes()).await.expect("flags");
    assert!(closed(&mut s).await, "unknown client flags were accepted");
    // A bad option magic claiming 4 GiB: closed at once, nothing drained.
    let mut s = nbd_client::greet(&srv.sock).await;
    let mut hdr = 0x1234_5678_9abc_def0u64.to_be_bytes().to_vec();
    hdr.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&hdr).await.expect("bad option");
    assert!(closed(&mut s).await, "a bad option magic was trusted");

    let mut c = Client::connect(&srv.sock, "v").await;
    c.send(proto::CMD_READ, proto::CMD_FLAG_DF, 1, 0, 512, &[]).await;
    assert_eq!(c.reply().await, (proto::EINVAL, 1), "DF was never advertised");
    c.send(proto::CMD_READ, proto::CMD_FLAG_REQ_ONE, 2, 0, 512, &[]).await;
    assert_eq!(c.reply().await, (proto::EINVAL, 2), "REQ_ONE belongs to BLOCK_STATUS");
    c.send(proto::CMD_WRITE, 1 << 4, 3, 0, 4096, &[7u8; 4096]).await;
    assert_eq!(c.reply().await, (proto::EINVAL, 3), "FAST_ZERO was never advertised");
    // The payload of the refused write was consumed: the stream is in step.
    assert_eq!(c.write(4, 0, &[9u8; 4096]).await, 0);
    assert_eq!(c.read(5, 0, 4096).await.expect("read"), vec![9u8; 4096]);
    c.send(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 6, 0, 4096, &[]).await;
    assert_eq!(c.reply().await, (0, 6));
    let end = c.size;
    assert_eq!(c.write(7, end - 512, &[1u8; 4096]).await, proto::ENOSPC, "a write past the end");
    c.send(proto::CMD_WRITE_ZEROES, 0, 8, end, 4096, &[]).await;
    assert_eq!(c.reply().await, (proto::ENOSPC, 8));
    c.send(proto::CMD_READ, 0, 9, end, 512, &[]).await;
    assert_eq!(c.reply().await, (proto::EINVAL, 9), "a read past the end stays EINVAL");
}
