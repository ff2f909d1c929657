//! The NBD server against hostile and broken clients, black-box: `s3blk
//! serve` as a separate process, raw sockets as clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use s3blk::nbd::proto;

struct Server {
    child: Child,
    sock: PathBuf,
    stderr: PathBuf,
}

fn serve(dir: &Path, name: &str, extra: &[&str]) -> Server {
    serve_on(dir, name, name, extra)
}

/// Serve the volume `name` on the socket `<sock>.sock`.
fn serve_on(dir: &Path, name: &str, sock: &str, extra: &[&str]) -> Server {
    let stderr = dir.join(format!("{sock}.log"));
    let sock = dir.join(format!("{sock}.sock"));
    let mut child = Command::new(common::s3blk_bin())
        .arg("serve")
        .arg(dir.join(name))
        .args(["--create", "--size", "64MiB", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("log file"))
        .spawn()
        .expect("spawn serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.starts_with("serving "), "serve did not start: {first:?}");
    std::thread::spawn(move || for _ in lines {});
    Server { child, sock, stderr }
}

impl Server {
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, and how long the server took to exit.
    fn stop(&mut self) -> Duration {
        let start = Instant::now();
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        let st = self.child.wait().expect("wait");
        assert!(
            st.success(),
            "serve exited with {st:?}; log: {}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
        start.elapsed()
    }
}

/// A server a test did not stop (it failed, or only dropped it) is killed,
/// not left running after the test.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Finish the handshake with GO; the stream is then in transmission.
fn handshake(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
    let payload = common::nbd_client::go_payload("");
    let mut f = proto::IHAVEOPT.to_be_bytes().to_vec();
    f.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&payload);
    s.write_all(&f).expect("GO");
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).expect("option data");
        if kind == proto::REP_ACK {
            return s;
        }
    }
}

/// Closed by the server within `limit`?
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Headers of maximum-size WRITEs with no payload behind them pin budget,
/// not memory; the server keeps serving an honest client meanwhile.
#[test]
fn header_only_writes_do_not_pin_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = serve(dir.path(), "mem", &[]);
    let before = srv.rss_kib();
    let mut hostile = Vec::new();
    for i in 0..20u64 {
        let mut s = handshake(&srv.sock);
        let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: i, offset: 0, length: proto::MAX_PAYLOAD };
        s.write_all(&proto::encode_request(&r)).expect("header");
        hostile.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = srv.rss_kib().saturating_sub(before);
    eprintln!("RSS grew by {} MiB with 20 header-only 32 MiB writes pending", grown >> 10);
    assert!(grown < 64 << 10, "RSS grew by {} MiB", grown >> 10);
    drop(hostile);
    drop(srv);
}

/// Header-only WRITEs hold no share of the server-wide budget: with more
/// of them pending than the budget holds (20 x 32 MiB against 256 MiB), an
/// honest client's write and read are answered at once, not after the
/// handshake deadline has dropped the hostile connections.
#[test]
fn header_only_writes_do_not_starve_honest_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = serve(dir.path(), "starve", &[]);
    let mut hostile = Vec::new();
    for i in 0..20u64 {
        let mut s = handshake(&srv.sock);
        let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: i, offset: 0, length: proto::MAX_PAYLOAD };
        s.write_all(&proto::encode_request(&r)).expect("header");
        hostile.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    honest_round_trip(&srv.sock);
    eprintln!("honest write + read answered in {:?}", start.elapsed());
    drop(hostile);
}

/// An honest client's write and read on a fresh connection are answered
/// within 3 s.
fn honest_round_trip(sock: &Path) {
    let mut honest = handshake(sock);
    honest.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let data = common::pattern(6, 64 << 10);
    let w = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 1, offset: 2 << 20, length: data.len() as u32 };
    honest.write_all(&proto::encode_request(&w)).expect("write header");
    honest.write_all(&data).expect("write payload");
    let mut reply = [0u8; 16];
    honest.read_exact(&mut reply).expect("no reply to an honest write within 3 s");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write failed");
    let r = proto::Request { flags: 0, kind: proto::CMD_READ, handle: 2, offset: 2 << 20, length: data.len() as u32 };
    honest.write_all(&proto::encode_request(&r)).expect("read header");
    honest.read_exact(&mut reply).expect("no reply to an honest read within 3 s");
    let mut back = vec![0u8; data.len()];
    honest.read_exact(&mut back).expect("read data");
    assert!(back == data, "read back different data");
}

/// WRITE headers longer than any payload (answered EINVAL once their bytes
/// are skipped) hold none of the server's in-flight budget meanwhile.
#[test]
fn oversized_write_headers_do_not_pin_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = serve(dir.path(), "oversized", &[]);
    let mut hostile = Vec::new();
    for i in 0..8u64 {
        let mut s = handshake(&srv.sock);
        let r = proto::Request {
            flags: 0,
            kind: proto::CMD_WRITE,
            handle: i,
            offset: 0,
            length: proto::MAX_PAYLOAD + 4096,
        };
        s.write_all(&proto::encode_request(&r)).expect("header");
        hostile.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    honest_round_trip(&srv.sock);
    drop(hostile);
    srv.stop();
}

/// More maximum-size WRITEs streaming at once than the server-wide budget
/// (256 MiB) holds all get their answers: a connection waiting for its share
/// holds none of it, so the writes cannot wait on each other for ever.
#[test]
fn many_large_writes_at_once_all_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = serve(dir.path(), "stream", &[]);
    let writers: Vec<_> = (0..10u64)
        .map(|i| {
            let sock = srv.sock.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut s = handshake(&sock);
                s.set_write_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
                let len = proto::MAX_PAYLOAD;
                let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: i, offset: 0, length: len };
                s.write_all(&proto::encode_request(&r)).map_err(|e| format!("header {i}: {e}"))?;
                let data = vec![i as u8 + 1; len as usize];
                s.write_all(&data).map_err(|e| format!("payload {i} not taken: {e}"))?;
                let mut reply = [0u8; 16];
                s.read_exact(&mut reply).map_err(|e| format!("no reply to write {i}: {e}"))?;
                if reply[4..8] != [0, 0, 0, 0] {
                    return Err(format!("write {i} failed: {reply:?}"));
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread").expect("every large write is answered");
    }
    honest_round_trip(&srv.sock);
    srv.stop();
}

/// A client that connects and says nothing is dropped at the handshake
/// deadline; one that stops sending a payload is dropped too.
#[test]
fn silent_clients_are_dropped_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = serve(dir.path(), "idle", &[]);
    let mut silent = UnixStream::connect(&srv.sock).expect("connect");
    let mut g = [0u8; 18];
    silent.read_exact(&mut g).expect("greeting");
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(20)), "a silent client was kept past 20 s");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(8), "dropped after {took:?}, before the 10 s deadline");
    let mut stalled = handshake(&srv.sock);
    let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 1, offset: 0, length: 1 << 20 };
    stalled.write_all(&proto::encode_request(&r)).expect("header");
    stalled.write_all(&[0u8; 1000]).expect("some payload");
    assert!(closed_within(&mut stalled, Duration::from_secs(20)), "a stalled payload was waited for past 20 s");
    srv.stop();
}

/// SIGTERM with an idle stranger connected mid-handshake exits promptly
/// (well inside Kubernetes' 30 s grace period) and commits first.
#[test]
fn shutdown_does_not_wait_for_idle_strangers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = serve(dir.path(), "term", &[]);
    let mut writer = handshake(&srv.sock);
    let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 1, offset: 4096, length: 4096 };
    writer.write_all(&proto::encode_request(&r)).expect("header");
    writer.write_all(&[0x5a; 4096]).expect("payload");
    let mut reply = [0u8; 16];
    writer.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the write failed");
    let _stranger = UnixStream::connect(&srv.sock).expect("connect");
    let _idle = handshake(&srv.sock);
    let took = srv.stop();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let out = Command::new(common::s3blk_bin())
        .args(["volume", "export"])
        .arg(dir.path().join("term"))
        .arg("-")
        .output()
        .expect("export");
    assert!(out.stdout[4096..8192].iter().all(|&b| b == 0x5a), "the acknowledged write was not committed");
}

/// A second server refuses a socket path a live server answers on (and the
/// first keeps serving); the socket is 0600 whatever the umask.
#[test]
fn a_live_socket_is_never_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    // SAFETY: umask only changes this process's file creation mask; the child inherits it.
    let old = unsafe { libc::umask(0) };
    let mut first = serve(dir.path(), "live", &[]);
    unsafe { libc::umask(old) };
    let mode = std::fs::metadata(&first.sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let second = Command::new(common::s3blk_bin())
        .arg("serve")
        .arg(dir.path().join("other"))
        .args(["--create", "--size", "1MiB", "--listen"])
        .arg(format!("unix:{}", first.sock.display()))
        .output()
        .expect("second serve");
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("server that is running"), "{err}");
    assert!(!dir.path().join("other").join("volume.json").exists(), "the refused server created its volume anyway");
    let _ = handshake(&first.sock);
    first.stop();
    assert!(!first.sock.exists(), "socket left behind");
}

/// Connections past --max-connections are closed at once.
#[test]
fn connections_past_the_limit_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = serve(dir.path(), "max", &["--max-connections", "2"]);
    let _a = handshake(&srv.sock);
    let _b = handshake(&srv.sock);
    let mut c = UnixStream::connect(&srv.sock).expect("connect");
    assert!(closed_within(&mut c, Duration::from_secs(5)), "a third connection was served");
    srv.stop();
}

/// An import refused for its size does not take the volume from the
/// server that is using it.
#[test]
fn a_refused_import_does_not_fence_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut srv = serve(dir.path(), "busy", &[]);
    let mut client = handshake(&srv.sock);
    let big = dir.path().join("big.img");
    std::fs::File::create(&big).and_then(|f| f.set_len(65 << 20)).expect("big file");
    let out = Command::new(common::s3blk_bin())
        .args(["volume", "import"])
        .arg(dir.path().join("busy"))
        .arg(&big)
        .output()
        .expect("import");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than the volume"), "{out:?}");
    let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 7, offset: 0, length: 4096 };
    client.write_all(&proto::encode_request(&r)).expect("header");
    client.write_all(&[1u8; 4096]).expect("payload");
    let f = proto::Request { flags: 0, kind: proto::CMD_FLUSH, handle: 8, offset: 0, length: 0 };
    client.write_all(&proto::encode_request(&f)).expect("flush");
    for _ in 0..2 {
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).expect("reply");
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the server was fenced by the refused import");
    }
    srv.stop();
}

/// The node pod's preStop hook: `s3blk csi-flush` finds the served volumes
/// in the state directory and makes their acknowledged writes durable over
/// an extra NBD connection, so that a plugin killed right after loses
/// nothing. A record whose socket is dead fails the hook by name.
#[test]
fn csi_flush_makes_acknowledged_writes_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let mut srv = serve(dir.path(), "live", &[]);
    let record = |id: &str, sock: &Path| {
        serde_json::json!({"volume_id": id, "socket": sock, "export": "", "readonly": false, "device": "/dev/nbd0"})
            .to_string()
    };
    std::fs::write(state.join("live.json"), record("vol-live", &srv.sock)).expect("record");
    // Not a stage record: skipped.
    std::fs::write(state.join("notes.json"), "{\"something\": 1}").expect("other");

    let data = common::pattern(7, 64 << 10);
    let mut s = handshake(&srv.sock);
    let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 1, offset: 1 << 20, length: data.len() as u32 };
    s.write_all(&proto::encode_request(&r)).expect("header");
    s.write_all(&data).expect("payload");
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).expect("write acknowledged");
    assert_eq!(u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]), 0, "write failed");

    let out = Command::new(common::s3blk_bin())
        .args(["csi-flush", "--timeout", "60s", "--state-dir"])
        .arg(&state)
        .output()
        .expect("run csi-flush");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "csi-flush failed: {text}");
    assert!(text.contains("flushed vol-live"), "{text}");

    // The plugin dies without a word; the flushed write must be there.
    srv.child.kill().expect("SIGKILL");
    srv.child.wait().expect("wait");
    let exported = dir.path().join("live.bin");
    let st = Command::new(common::s3blk_bin())
        .args(["volume", "export"])
        .arg(dir.path().join("live"))
        .arg(&exported)
        .status()
        .expect("export");
    assert!(st.success());
    let back = std::fs::read(&exported).expect("read export");
    assert!(back[1 << 20..(1 << 20) + data.len()] == data[..], "the acknowledged write was not made durable");

    // The socket is gone now: the hook fails and names the volume.
    let out = Command::new(common::s3blk_bin())
        .args(["csi-flush", "--timeout", "10s", "--state-dir"])
        .arg(&state)
        .output()
        .expect("run csi-flush");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "csi-flush succeeded against a dead socket: {text}");
    assert!(text.contains("could not flush vol-live"), "{text}");
}

fn s3blk_out(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(common::s3blk_bin()).args(args).output().expect("run s3blk");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// No command cuts off a live writer by accident: while `serve` holds the
/// volume's lease, a second serve, import, resize and delete refuse and
/// name the holder; inspect shows it. `--takeover` takes the volume, and
/// the server that lost it stops (it does not answer from memory); once
/// the holder stops cleanly the lease is gone.
#[test]
fn a_served_volume_is_not_taken_over_by_accident() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("held");
    let vol_os = vol.as_os_str();
    let mut first = serve(dir.path(), "held", &["--lease-ttl", "3s"]);
    let pid = first.child.id().to_string();
    let held_by = format!("`serve` (pid {pid})");

    let other_sock = dir.path().join("other.sock");
    let listen = format!("unix:{}", other_sock.display());
    let (ok, _, err) = s3blk_out(&["serve".as_ref(), vol_os, "--listen".as_ref(), listen.as_ref()]);
    assert!(!ok && err.contains(&held_by) && err.contains("--takeover"), "second serve: {err}");
    assert!(!other_sock.exists(), "the refused server left its socket behind");

    let input = dir.path().join("in.img");
    std::fs::write(&input, vec![9u8; 4096]).expect("input");
    let (ok, _, err) = s3blk_out(&["volume".as_ref(), "import".as_ref(), vol_os, input.as_os_str()]);
    assert!(!ok && err.contains(&held_by), "import: {err}");
    let (ok, _, err) = s3blk_out(&["volume".as_ref(), "resize".as_ref(), vol_os, "--size".as_ref(), "128MiB".as_ref()]);
    assert!(!ok && err.contains(&held_by), "resize: {err}");
    let (ok, _, err) = s3blk_out(&["volume".as_ref(), "delete".as_ref(), vol_os]);
    assert!(!ok && err.contains(&held_by) && err.contains("--force"), "delete: {err}");
    assert!(vol.join("volume.json").exists(), "the refused delete deleted");
    let (ok, out, _) = s3blk_out(&["volume".as_ref(), "inspect".as_ref(), vol_os]);
    assert!(ok && out.contains(&format!("in use by:     {held_by}")), "inspect: {out}");
    // A takeover refused for its size refuses before it takes anything.
    let (ok, _, err) = s3blk_out(&[
        "volume".as_ref(),
        "resize".as_ref(),
        vol_os,
        "--size".as_ref(),
        "64KiB".as_ref(),
        "--takeover".as_ref(),
    ]);
    assert!(!ok && err.contains("shrinking"), "resize --takeover to a smaller size: {err}");

    // The first server still serves: a write and a flush succeed.
    let mut client = handshake(&first.sock);
    let r = proto::Request { flags: 0, kind: proto::CMD_WRITE, handle: 1, offset: 0, length: 4096 };
    client.write_all(&proto::encode_request(&r)).expect("header");
    client.write_all(&[5u8; 4096]).expect("payload");
    let f = proto::Request { flags: 0, kind: proto::CMD_FLUSH, handle: 2, offset: 0, length: 0 };
    client.write_all(&proto::encode_request(&f)).expect("flush");
    for _ in 0..2 {
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).expect("reply");
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the first server was disturbed by refused commands");
    }
    drop(client);

    // An explicit takeover: the first server learns it lost the volume and
    // stops with an error that says why.
    let mut second = serve_on(dir.path(), "held", "second", &["--takeover"]);
    let status = wait_exit(&mut first.child, Duration::from_secs(20)).expect("the overtaken server kept serving");
    assert!(!status.success());
    let log = std::fs::read_to_string(&first.stderr).unwrap_or_default();
    assert!(log.contains("taken over by `serve`"), "{log}");
    second.stop();
    // Stopped cleanly: the lease is released, nothing refuses.
    let (ok, out, err) =
        s3blk_out(&["volume".as_ref(), "resize".as_ref(), vol_os, "--size".as_ref(), "128MiB".as_ref()]);
    assert!(ok, "resize after the holder stopped: {out}{err}");
    let (ok, out, _) = s3blk_out(&["volume".as_ref(), "inspect".as_ref(), vol_os]);
    assert!(ok && out.contains("no live writer"), "{out}");
    // A server killed outright leaves its lease behind; a restart on the
    // same host sees its process is gone and starts at once.
    let mut crashed = serve_on(dir.path(), "held", "crashed", &[]);
    crashed.child.kill().expect("SIGKILL");
    crashed.child.wait().expect("wait");
    let mut restarted = serve_on(dir.path(), "held", "restarted", &[]);
    restarted.stop();
}

/// A lease whose holder this process cannot see is live: a `serve` in a
/// container with its own pid namespace on a host that shares its name
/// (host networking) shows, from another such container, a pid that names
/// no process. Such a holder was judged gone, and `volume delete` without
/// `--force` deleted the served volume. Shown here by rewriting the live
/// server's lease as it would read from another pid namespace.
#[test]
fn a_lease_held_in_another_pid_namespace_is_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("ns");
    let vol_os = vol.as_os_str();
    let mut server = serve(dir.path(), "ns", &["--lease-ttl", "60s"]);
    let lease = vol.join("lease.json");
    let mut holder: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lease).expect("the server's lease")).expect("lease json");
    assert!(holder["process"]["pid_ns"].is_string(), "the lease names no pid namespace: {holder}");
    holder["pid"] = 4_194_000.into();
    holder["process"]["pid_ns"] = "pid:[1]".into();
    std::fs::write(&lease, serde_json::to_vec(&holder).expect("json")).expect("rewrite the lease");
    let (ok, _, err) = s3blk_out(&["volume".as_ref(), "delete".as_ref(), vol_os]);
    assert!(!ok && err.contains("pid 4194000") && err.contains("--force"), "delete: {err}");
    assert!(vol.join("volume.json").exists(), "the refused delete deleted");
    server.stop();
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
