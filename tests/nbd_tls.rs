//! NBD over TLS, black-box: `s3blk serve` with certificates made at test
//! time by `openssl`, against real clients (libnbd's nbdinfo and Python
//! binding, qemu-img and qemu-io) and raw sockets.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use s3blk::nbd::proto;

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, plus the directories libnbd and qemu read them from.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`: what libnbd's
    /// tls-certificates and qemu's tls-creds-x509 directory hold.
    fn client_dir(&self) -> PathBuf {
        self.path("client")
    }
    /// The CA only: a client with no certificate of its own.
    fn anonymous_dir(&self) -> PathBuf {
        self.path("anonymous")
    }
    /// A client certificate from a CA the server does not trust.
    fn stranger_dir(&self) -> PathBuf {
        self.path("stranger")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Make a CA and a certificate it signs (`name`-cert.pem, `name`-key.pem).
fn issue(dir: &Path, ca: &str, name: &str, extensions: &str) {
    let (key, csr, cert, ext) =
        (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}-cert.pem"), format!("{name}.ext"));
    openssl(
        dir,
        &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", &key, "-out", &csr]
            .into_iter()
            .chain(["-subj", &format!("/CN={name}")])
            .collect::<Vec<_>>(),
    );
    std::fs::write(dir.join(&ext), extensions).expect("extensions");
    let (ca_cert, ca_key) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
    );
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

/// `None` (after a loud skip) when openssl is missing outside CI.
fn pki(dir: &Path) -> Option<Pki> {
    if !common::require_tool("openssl") {
        return None;
    }
    let dir = dir.join("pki");
    std::fs::create_dir_all(&dir).expect("pki dir");
    make_ca(&dir, "ca");
    issue(&dir, "ca", "server", SERVER_EXT);
    issue(&dir, "ca", "client", CLIENT_EXT);
    make_ca(&dir, "other-ca");
    issue(&dir, "other-ca", "stranger", CLIENT_EXT);
    let copy = |from: &str, to: &str, name: &str| {
        std::fs::create_dir_all(dir.join(to)).expect("dir");
        std::fs::copy(dir.join(from), dir.join(to).join(name)).expect("copy");
    };
    copy("ca-cert.pem", "client", "ca-cert.pem");
    copy("client-cert.pem", "client", "client-cert.pem");
    copy("client-key.pem", "client", "client-key.pem");
    copy("ca-cert.pem", "anonymous", "ca-cert.pem");
    copy("ca-cert.pem", "stranger", "ca-cert.pem");
    copy("stranger-cert.pem", "stranger", "client-cert.pem");
    copy("stranger-key.pem", "stranger", "client-key.pem");
    Some(Pki { dir })
}

struct Server {
    child: Child,
    /// `127.0.0.1:PORT`
    address: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn port(&self) -> &str {
        self.address.rsplit_once(':').map(|(_, p)| p).unwrap_or_default()
    }
    fn uri(&self, scheme: &str, certs: &Path) -> String {
        format!("{scheme}://{}/vol?tls-certificates={}", self.address, certs.display())
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `s3blk serve` on an ephemeral loopback port with the server certificate.
fn serve(dir: &Path, pki: &Pki, extra: &[&str]) -> Server {
    let (cert, key) = (pki.path("server-cert.pem"), pki.path("server-key.pem"));
    let tls = ["--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")];
    serve_with(dir, "vol", "127.0.0.1:0", &[&tls[..], extra].concat())
}

fn serve_with(dir: &Path, name: &str, listen: &str, args: &[&str]) -> Server {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(common::s3blk_bin())
        .arg("serve")
        .arg(dir.join(name))
        .args(["--create", "--size", "64MiB", "--listen", listen])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(
        first.starts_with("serving "),
        "serve did not start: {first:?}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    std::thread::spawn(move || for _ in lines {});
    let address = first.split(" on ").nth(1).and_then(|r| r.split(',').next()).unwrap_or_default().to_string();
    Server { child, address, log }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn libnbd_python() -> bool {
    let ok = Command::new("/usr/bin/python3").args(["-c", "import nbd"]).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(!common::in_ci(), "python3-libnbd is required (tests/run.sh installs it)");
        eprintln!("\n*** SKIPPING: python3-libnbd is not installed ***\n");
    }
    ok
}

/// Write through one TLS connection, read back through another; both must
/// have negotiated TLS.
const LIBNBD_ROUND_TRIP: &str = r#"
import nbd, os
data = os.urandom(3 << 20)
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
assert h.get_tls_negotiated(), "no TLS"
h.pwrite(data, 12345 * 512)
h.flush()
h.shutdown()
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
assert h.get_tls_negotiated(), "no TLS"
assert h.pread(len(data), 12345 * 512) == data, "read back different data"
h.shutdown()
print("round trip ok")
"#;

#[test]
fn libnbd_writes_and_reads_back_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    if !common::require_tool("nbdinfo") || !libnbd_python() {
        return;
    }
    let srv = serve(dir.path(), &pki, &[]);
    let info = run(Command::new("nbdinfo").arg(srv.uri("nbds", &pki.client_dir())));
    assert!(info.status.success(), "nbdinfo over TLS failed: {}\nserver: {}", text(&info), srv.log());
    assert!(text(&info).contains("with TLS"), "{}", text(&info));
    let out = run(Command::new("/usr/bin/python3")
        .env("URI", srv.uri("nbds", &pki.client_dir()))
        .args(["-c", LIBNBD_ROUND_TRIP]));
    assert!(out.status.success(), "libnbd over TLS: {}\nserver: {}", text(&out), srv.log());
}

/// qemu's NBD client over TLS, with a client certificate the server
/// verifies: random data written by qemu-img comes back identical, and
/// qemu-io's pattern check passes.
#[test]
fn qemu_writes_and_reads_back_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    if !common::require_tool("qemu-img") || !common::require_tool("qemu-io") {
        return;
    }
    let ca = pki.path("ca-cert.pem");
    let srv = serve(dir.path(), &pki, &["--tls-client-ca", ca.to_str().expect("utf-8 path")]);
    let creds = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.client_dir().display());
    let opts = format!("driver=nbd,host=127.0.0.1,port={},export=vol,tls-creds=tls0", srv.port());
    let data = common::pattern(7, 3 << 20);
    let input = dir.path().join("in.raw");
    std::fs::write(&input, &data).expect("input");
    let w = run(Command::new("qemu-img")
        .args(["convert", "-n", "--object", &creds, "-f", "raw"])
        .arg(&input)
        .args(["--target-image-opts", &opts]));
    assert!(w.status.success(), "qemu-img write over TLS: {}\nserver: {}", text(&w), srv.log());
    let output = dir.path().join("out.raw");
    let r = run(Command::new("qemu-img")
        .args(["convert", "--object", &creds, "--image-opts", &opts, "-O", "raw"])
        .arg(&output));
    assert!(r.status.success(), "qemu-img read over TLS: {}\nserver: {}", text(&r), srv.log());
    let back = std::fs::read(&output).expect("output");
    assert_eq!(back.len(), 64 << 20);
    assert!(back[..data.len()] == data[..], "qemu-img read back different data");
    assert!(back[data.len()..].iter().all(|&b| b == 0), "bytes past the written range are not zero");
    let io = run(Command::new("qemu-io").args([
        "--object",
        &creds,
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x5a 40M 1M",
        "-c",
        "read -P 0x5a 40M 1M",
    ]));
    let t = text(&io);
    assert!(io.status.success() && t.contains("read 1048576/1048576") && !t.contains("fail"), "qemu-io: {t}");
}

/// Connect over TCP and read the greeting; send the client flags.
fn greet(srv: &Server) -> TcpStream {
    let mut s = TcpStream::connect(&srv.address).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
    s
}

fn send_option<S: Write>(s: &mut S, code: u32, data: &[u8]) {
    let mut f = proto::IHAVEOPT.to_be_bytes().to_vec();
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(&(data.len() as u32).to_be_bytes());
    f.extend_from_slice(data);
    s.write_all(&f).expect("option");
}

/// (option, reply type) of the next option reply.
fn option_reply<S: Read>(s: &mut S) -> std::io::Result<(u32, u32)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
    let mut d = vec![0u8; len];
    s.read_exact(&mut d)?;
    Ok((option, kind))
}

fn closed(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// With TLS required (the default once a certificate is given) every
/// option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, EXPORT_NAME
/// ends the connection, and real plaintext clients get nothing.
#[test]
fn plaintext_clients_are_refused_when_tls_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    if !common::require_tool("nbdinfo") || !common::require_tool("qemu-img") {
        return;
    }
    let srv = serve(dir.path(), &pki, &[]);
    let mut s = greet(&srv);
    let go = common::nbd_client::go_payload("vol");
    for (code, data) in [
        (proto::OPT_LIST, &[][..]),
        (proto::OPT_STRUCTURED_REPLY, &[][..]),
        (proto::OPT_INFO, &go[..]),
        (proto::OPT_GO, &go[..]),
    ] {
        send_option(&mut s, code, data);
        assert_eq!(option_reply(&mut s).expect("reply"), (code, proto::REP_ERR_TLS_REQD), "option {code}");
    }
    send_option(&mut s, proto::OPT_EXPORT_NAME, b"vol");
    assert!(closed(&mut s, Duration::from_secs(5)), "EXPORT_NAME without TLS was not refused by closing");

    let info = run(Command::new("nbdinfo").arg(format!("nbd://{}/vol", srv.address)));
    assert!(!info.status.success(), "a plaintext nbdinfo was served: {}", text(&info));
    let qemu = run(Command::new("qemu-img").args(["info", &format!("nbd://{}/vol", srv.address)]));
    assert!(!qemu.status.success(), "a plaintext qemu-img was served: {}", text(&qemu));
}

/// `--tls=on` offers TLS and still serves plaintext clients.
#[test]
fn tls_on_serves_both_plaintext_and_tls_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    if !common::require_tool("nbdinfo") {
        return;
    }
    let srv = serve(dir.path(), &pki, &["--tls=on"]);
    let plain = run(Command::new("nbdinfo").arg(format!("nbd://{}/vol", srv.address)));
    assert!(plain.status.success() && text(&plain).contains("without TLS"), "{}", text(&plain));
    let tls = run(Command::new("nbdinfo").arg(srv.uri("nbds", &pki.client_dir())));
    assert!(tls.status.success() && text(&tls).contains("with TLS"), "{}", text(&tls));
}

/// With `--tls-client-ca` a client must present a certificate that CA
/// signed: none, or one from another CA, fails the TLS handshake.
#[test]
fn clients_without_a_trusted_certificate_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    if !common::require_tool("nbdinfo") {
        return;
    }
    let ca = pki.path("ca-cert.pem");
    let srv = serve(dir.path(), &pki, &["--tls-client-ca", ca.to_str().expect("utf-8 path")]);
    for (who, certs) in [("no certificate", pki.anonymous_dir()), ("another CA's certificate", pki.stranger_dir())] {
        let o = run(Command::new("nbdinfo").arg("--size").arg(srv.uri("nbds", &certs)));
        assert!(!o.status.success(), "a client with {who} was served: {}", text(&o));
    }
    let ok = run(Command::new("nbdinfo").arg("--size").arg(srv.uri("nbds", &pki.client_dir())));
    assert!(ok.status.success(), "the trusted client was refused: {}\nserver: {}", text(&ok), srv.log());
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), (64u64 << 20).to_string());
    assert!(srv.log().contains("TLS handshake failed"), "refusals not logged: {}", srv.log());
}

/// The handshake deadline covers the TLS handshake: a client that asks
/// for STARTTLS and then says nothing is dropped.
#[test]
fn a_stalled_tls_handshake_is_dropped_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    let srv = serve(dir.path(), &pki, &[]);
    let mut s = greet(&srv);
    send_option(&mut s, proto::OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).expect("reply"), (proto::OPT_STARTTLS, proto::REP_ACK));
    let start = Instant::now();
    assert!(closed(&mut s, Duration::from_secs(20)), "a stalled TLS handshake was kept open");
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(8) && took < Duration::from_secs(15), "dropped after {took:?}");
}

/// Missing, empty or mismatched TLS files are reported before anything
/// else happens: `--create` has not created the volume.
#[test]
fn bad_tls_files_are_refused_before_the_volume_is_touched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("junk");
    let p = |n: &str| pki.path(n).to_string_lossy().into_owned();
    let missing = dir.path().join("missing.pem").to_string_lossy().into_owned();
    let junk = junk.to_string_lossy().into_owned();
    let bad_psk = dir.path().join("bad.psk");
    std::fs::write(&bad_psk, "alice:00ff\nbob=1234\n").expect("bad psk");
    let bad_psk = bad_psk.to_string_lossy().into_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--tls-cert".into(), missing.clone(), "--tls-key".into(), p("server-key.pem")],
            "cannot read certificate",
        ),
        (vec!["--tls-cert".into(), p("server-cert.pem"), "--tls-key".into(), missing], "cannot read key"),
        (vec!["--tls-cert".into(), junk.clone(), "--tls-key".into(), p("server-key.pem")], "holds no PEM CERTIFICATE"),
        (
            vec!["--tls-cert".into(), p("server-cert.pem"), "--tls-key".into(), p("server-cert.pem")],
            "holds no PEM PRIVATE KEY",
        ),
        (
            vec!["--tls-cert".into(), p("server-cert.pem"), "--tls-key".into(), p("client-key.pem")],
            "do not work together",
        ),
        (
            vec![
                "--tls-cert".into(),
                p("server-cert.pem"),
                "--tls-key".into(),
                p("server-key.pem"),
                "--tls-client-ca".into(),
                junk,
            ],
            "holds no PEM CERTIFICATE",
        ),
        (vec!["--tls=require".into()], "needs credentials"),
        (
            vec![
                "--tls=off".into(),
                "--tls-cert".into(),
                p("server-cert.pem"),
                "--tls-key".into(),
                p("server-key.pem"),
            ],
            "contradicts",
        ),
        (vec!["--tls-cert".into(), p("server-cert.pem")], "--tls-key"),
        (
            vec!["--tls-psk".into(), dir.path().join("missing.psk").to_string_lossy().into_owned()],
            "cannot read PSK file",
        ),
        (vec!["--tls-psk".into(), bad_psk.clone()], "line 2"),
        (vec!["--tls-psk".into(), bad_psk, "--tls-cert".into(), p("server-cert.pem")], "cannot be used with"),
    ];
    for (args, expected) in cases {
        let o = run(Command::new(common::s3blk_bin())
            .arg("serve")
            .arg(dir.path().join("new"))
            .args(["--create", "--size", "1MiB", "--listen", "127.0.0.1:0"])
            .args(&args)
            .stdin(Stdio::null()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(err.contains(expected), "{args:?}: expected {expected:?} in: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!dir.path().join("new").exists(), "{args:?}: the volume was created before the TLS files were checked");
    }
}

/// A listener on a non-loopback address warns at startup unless TLS is
/// required.
#[test]
fn non_loopback_listeners_warn_unless_tls_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    let (cert, key) = (pki.path("server-cert.pem"), pki.path("server-key.pem"));
    let tls = ["--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")];
    for (name, args, warns) in [
        ("plain", vec![], Some("without TLS")),
        ("optional", [&tls[..], &["--tls=on"]].concat(), Some("TLS optional")),
        ("required", tls.to_vec(), None),
    ] {
        let srv = serve_with(dir.path(), name, "0.0.0.0:0", &args);
        let log = srv.log();
        let warned = log.lines().find(|l| l.contains("WARN") && l.contains("non-loopback"));
        match warns {
            Some(what) => assert!(warned.is_some_and(|l| l.contains(what)), "{name}: no warning: {log}"),
            None => assert!(warned.is_none(), "{name}: warned although TLS is required: {log}"),
        }
    }
}

/// Nothing negotiated in plaintext survives STARTTLS (a man in the middle
/// could have chosen it): structured replies asked for before TLS are off
/// after it, so a READ gets a simple reply.
#[test]
fn options_negotiated_before_starttls_are_forgotten() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    let srv = serve(dir.path(), &pki, &["--tls=on"]);
    let mut s = greet(&srv);
    send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut s).expect("reply"), (proto::OPT_STRUCTURED_REPLY, proto::REP_ACK));
    send_option(&mut s, proto::OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).expect("reply"), (proto::OPT_STARTTLS, proto::REP_ACK));

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("ca-cert.pem")).expect("CA");
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, s);

    let go = common::nbd_client::go_payload("vol");
    let mut f = proto::IHAVEOPT.to_be_bytes().to_vec();
    f.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    f.extend_from_slice(&(go.len() as u32).to_be_bytes());
    f.extend_from_slice(&go);
    tls.write_all(&f).expect("GO over TLS");
    loop {
        let mut h = [0u8; 20];
        tls.read_exact(&mut h).expect("option reply over TLS");
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let mut d = vec![0u8; u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize];
        tls.read_exact(&mut d).expect("option data");
        assert!(kind == proto::REP_ACK || kind == proto::REP_INFO, "GO over TLS got reply {kind:#x}");
        if kind == proto::REP_ACK {
            break;
        }
    }
    let read = proto::Request { flags: 0, kind: proto::CMD_READ, handle: 7, offset: 0, length: 4096 };
    tls.write_all(&proto::encode_request(&read)).expect("READ");
    let mut magic = [0u8; 4];
    tls.read_exact(&mut magic).expect("reply");
    assert_eq!(
        u32::from_be_bytes(magic),
        proto::SIMPLE_REPLY_MAGIC,
        "structured replies negotiated before STARTTLS were still in force after it"
    );
}

/// Pre-shared keys (`--tls-psk`, psktool's USERNAME:HEXKEY lines): libnbd
/// and qemu write and read back over TLS; a wrong key, an unknown username
/// and a plaintext client are refused.
#[test]
fn libnbd_and_qemu_work_with_a_pre_shared_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    if !common::require_tool("nbdinfo") || !common::require_tool("qemu-io") || !libnbd_python() {
        return;
    }
    let key = |seed: u64| common::pattern(seed, 32).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let write = |name: &str, text: String| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("keys.psk"), text).expect("psk");
        d.join("keys.psk")
    };
    let server_keys = write("server", format!("carol:{}\nalice:{}\n", key(1), key(2)));
    let alice = write("alice", format!("alice:{}\n", key(2)));
    let wrong = write("wrong", format!("alice:{}\n", key(3)));
    let bob = write("bob", format!("bob:{}\n", key(2)));
    let srv = serve_with(dir.path(), "vol", "127.0.0.1:0", &["--tls-psk", server_keys.to_str().expect("utf-8")]);
    let uri = |user: &str, file: &Path| format!("nbds://{user}@{}/vol?tls-psk-file={}", srv.address, file.display());

    let out = run(Command::new("/usr/bin/python3").env("URI", uri("alice", &alice)).args(["-c", LIBNBD_ROUND_TRIP]));
    assert!(out.status.success(), "libnbd with a PSK: {}\nserver: {}", text(&out), srv.log());
    let creds =
        format!("tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice", dir.path().join("alice").display());
    let opts = format!("driver=nbd,host=127.0.0.1,port={},export=vol,tls-creds=tls0", srv.port());
    let io = run(Command::new("qemu-io").args([
        "--object",
        &creds,
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x33 20M 1M",
        "-c",
        "read -P 0x33 20M 1M",
    ]));
    let t = text(&io);
    assert!(
        io.status.success() && t.contains("read 1048576/1048576") && !t.contains("fail"),
        "qemu-io with a PSK: {t}"
    );

    for (who, u) in [("a wrong key", uri("alice", &wrong)), ("an unknown username", uri("bob", &bob))] {
        let o = run(Command::new("nbdinfo").arg("--size").arg(&u));
        assert!(!o.status.success(), "a client with {who} was served: {}", text(&o));
    }
    let plain = run(Command::new("nbdinfo").arg("--size").arg(format!("nbd://{}/vol", srv.address)));
    assert!(!plain.status.success(), "a plaintext client was served: {}", text(&plain));
    assert!(srv.log().contains("unknown PSK username"), "{}", srv.log());
}

/// GO for `name` on a connection in its option phase (plain or TLS).
fn go_on<S: Read + Write>(s: &mut S, name: &str) -> std::io::Result<()> {
    send_option(s, proto::OPT_GO, &common::nbd_client::go_payload(name));
    loop {
        match option_reply(s)? {
            (_, proto::REP_ACK) => return Ok(()),
            (_, proto::REP_INFO) => {}
            (_, kind) => return Err(std::io::Error::other(format!("GO refused: reply {kind:#x}"))),
        }
    }
}

/// A plaintext client in its transmission phase (`Err` when refused).
fn plain_client(address: &str, name: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(address)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())?;
    go_on(&mut s, name)?;
    Ok(s)
}

fn read_request(handle: u64, length: u32) -> [u8; proto::REQUEST_HEADER_LEN] {
    proto::encode_request(&proto::Request { flags: 0, kind: proto::CMD_READ, handle, offset: 0, length })
}

/// One 4 KiB read, answered.
fn read_4k<S: Read + Write>(s: &mut S) -> std::io::Result<()> {
    s.write_all(&read_request(1, 4096))?;
    let mut reply = [0u8; 16 + 4096];
    s.read_exact(&mut reply)?;
    let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    if error != 0 {
        return Err(std::io::Error::other(format!("read failed: error {error}")));
    }
    Ok(())
}

/// A TLS client that stops reading its replies while another client waits
/// for the budget it holds is cut, and its session ends: ending TLS
/// cleanly (close_notify) is not tried on a connection whose socket takes
/// no more bytes. Tried, it waited for good, and the session kept its
/// place among the connections the server allows (and its volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_reads_no_replies_is_cut_and_its_session_ends() {
    use s3blk::nbd::server::{self, Listen};
    use s3blk::nbd::session::{Export, Limits};
    use s3blk::nbd::tls::{Policy, Tls, X509Files};
    use s3blk::store::DynStore;
    use s3blk::volume::engine::CreateOptions;
    use s3blk::volume::{OpenOptions, Volume};
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pki) = pki(dir.path()) else { return };
    let files = X509Files { cert: pki.path("server-cert.pem"), key: pki.path("server-key.pem"), client_ca: None };
    let tls = Tls::x509(&files, Policy::Offer).expect("tls");
    let store: DynStore = Arc::new(s3blk::store::memory::MemoryStore::new());
    let opts = CreateOptions::new(64 << 20, 64 << 10);
    Volume::create(store.clone(), "v/", opts, &s3blk::clock::SystemClock).await.expect("create");
    let volume = Volume::open(store, "v/", OpenOptions::default()).await.expect("open");
    let export = Arc::new(Export {
        name: "v".into(),
        description: "test".into(),
        volume,
        read_only: false,
        busy_poll: Duration::ZERO,
        // The smallest budget (32 MiB), two connections at most.
        limits: Limits::new(0, 2, Duration::from_secs(1)),
        unflushed: None,
    });
    let bound = server::bind(&Listen::Tcp("127.0.0.1:0".into()), Some(Arc::new(tls))).await.expect("bind");
    let address = bound.address.clone();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(server::serve(bound, export, stopped));
    let ca = pki.path("ca-cert.pem");
    let clients = tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(&address).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut g = [0u8; 18];
        tcp.read_exact(&mut g).expect("greeting");
        tcp.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
        send_option(&mut tcp, proto::OPT_STARTTLS, &[]);
        assert_eq!(option_reply(&mut tcp).expect("STARTTLS reply").1, proto::REP_ACK);
        let mut connector = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).expect("connector");
        connector.set_ca_file(&ca).expect("CA");
        let mut hog = connector.build().connect("localhost", tcp).expect("TLS handshake");
        go_on(&mut hog, "v").expect("GO over TLS");
        // Far more than the budget and the sockets' buffers hold; no
        // reply is ever read.
        for handle in 0..100 {
            hog.write_all(&read_request(handle, 1 << 20)).expect("request");
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut other = plain_client(&address, "v").expect("another client");
        read_4k(&mut other).expect("another client's read waited behind a client that reads no replies");
        drop(other);
        // Both places are free again once the TLS client's session ended.
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let both = plain_client(&address, "v").and_then(|mut a| {
                let mut b = plain_client(&address, "v")?;
                read_4k(&mut a)?;
                read_4k(&mut b)
            });
            match both {
                Ok(()) => break,
                Err(_) if Instant::now() < give_up => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => panic!("a place stayed taken by the cut TLS client's session: {e}"),
            }
        }
        drop(hog);
    });
    tokio::time::timeout(Duration::from_secs(120), clients).await.expect("the clients hung").expect("clients");
}
