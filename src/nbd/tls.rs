//! TLS for NBD connections (`NBD_OPT_STARTTLS`): the server's credentials,
//! loaded and checked once at startup, and the policy a session applies
//! before TLS is up. The option haggling itself lives in the session; this
//! module only turns a plain stream into an encrypted one.
//!
//! Certificates use rustls on the aws-lc-rs provider (the one the S3 and
//! Kubernetes clients already bring). Pre-shared keys use the system's
//! OpenSSL: rustls implements no external PSKs.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a server without TLS up yet lets a client do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// STARTTLS is offered; plaintext clients are served too.
    Offer,
    /// Every option but STARTTLS and ABORT is refused until TLS is up.
    Require,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("{what} {path} is not valid PEM: {detail}")]
    Pem { what: &'static str, path: PathBuf, detail: String },
    #[error("client CA {path}: {detail}")]
    ClientCa { path: PathBuf, detail: String },
    #[error("certificate {cert} and key {key} do not work together: {source}")]
    Credentials { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("PSK file {path} line {line}: {detail} (expected USERNAME:HEXKEY)")]
    PskLine { path: PathBuf, line: usize, detail: &'static str },
    #[error("PSK file {path} holds no keys (expected USERNAME:HEXKEY lines)")]
    PskEmpty { path: PathBuf },
    #[error("cannot set up TLS with pre-shared keys: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
}

/// The server's side of TLS: its credentials and its policy.
pub struct Tls {
    pub policy: Policy,
    acceptor: Acceptor,
    /// Whether clients must present a certificate signed by the client CA.
    pub verifies_clients: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("policy", &self.policy).field("verifies_clients", &self.verifies_clients).finish()
    }
}

/// Files of an x509 setup.
#[derive(Debug, Clone)]
pub struct X509Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

impl Tls {
    /// Load and check certificate, key and client CA: every problem (a
    /// missing file, no PEM inside, a key that is not the certificate's)
    /// is reported here, before anything is served.
    pub fn x509(files: &X509Files, policy: Policy) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = read_pem_all::<CertificateDer>(&files.cert, "certificate", "CERTIFICATE")?;
        let key_pem = read(&files.key, "key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                TlsError::Empty { what: "key", path: files.key.clone(), expected: "PRIVATE KEY" }
            }
            e => TlsError::Pem { what: "key", path: files.key.clone(), detail: e.to_string() },
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Credentials { cert: files.cert.clone(), key: files.key.clone(), source })?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_pem_all::<CertificateDer>(ca, "client CA", "CERTIFICATE")? {
                    roots.add(c).map_err(|e| TlsError::ClientCa { path: ca.clone(), detail: e.to_string() })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::ClientCa { path: ca.clone(), detail: e.to_string() })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key).map_err(|source| TlsError::Credentials {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
        Ok(Tls {
            policy,
            acceptor: Acceptor::X509(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            verifies_clients: files.client_ca.is_some(),
        })
    }

    /// Pre-shared keys from a file of `USERNAME:HEXKEY` lines (the format
    /// of GnuTLS's psktool, which nbdkit, qemu and libnbd read). A client
    /// whose username is not in the file, or whose key differs, fails the
    /// TLS handshake.
    pub fn psk(path: &Path, policy: Policy) -> Result<Tls, TlsError> {
        use openssl::ssl::{SslContext, SslMethod, SslVersion};
        let text = read(path, "PSK file")?;
        let keys = parse_psk_file(path, &text)?;
        let mut ctx = SslContext::builder(SslMethod::tls_server())?;
        ctx.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        // TLS 1.2: key exchanges authenticated by the PSK alone, forward
        // secret ones first. TLS 1.3 uses its default suites.
        ctx.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!eNULL:!aNULL:@STRENGTH")?;
        ctx.set_psk_server_callback(move |_, identity, out| {
            let key = identity.and_then(|id| keys.iter().find(|(name, _)| name.as_bytes() == id)).map(|(_, k)| k);
            match key {
                Some(k) if k.len() <= out.len() => {
                    tracing::info!(
                        username = %identity.map(crate::nbd::printable).unwrap_or_default(),
                        "TLS client names a known PSK username"
                    );
                    out[..k.len()].copy_from_slice(k);
                    Ok(k.len())
                }
                // Zero: no such user; the handshake fails.
                _ => {
                    tracing::info!(
                        username = %identity.map(crate::nbd::printable).unwrap_or_default(),
                        "TLS client with an unknown PSK username"
                    );
                    Ok(0)
                }
            }
        });
        Ok(Tls { policy, acceptor: Acceptor::Psk(ctx.build()), verifies_clients: true })
    }

    /// Run the TLS handshake on a stream whose STARTTLS was just
    /// acknowledged. A client that fails it (no certificate, a wrong one,
    /// no common cipher) gets an error here.
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<Secured<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match &self.acceptor {
            Acceptor::X509(a) => {
                let s = a.accept(stream).await?;
                let (_, conn) = s.get_ref();
                tracing::info!(
                    version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
                    cipher = conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
                    client_certificate = conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                    "TLS established"
                );
                Ok(Secured::X509(Box::new(s)))
            }
            Acceptor::Psk(ctx) => {
                let ssl = openssl::ssl::Ssl::new(ctx).map_err(std::io::Error::other)?;
                let mut s = tokio_openssl::SslStream::new(ssl, stream).map_err(std::io::Error::other)?;
                Pin::new(&mut s).accept().await.map_err(|e| match e.into_io_error() {
                    Ok(io) => io,
                    Err(e) => std::io::Error::other(e),
                })?;
                let ssl = s.ssl();
                tracing::info!(
                    version = ssl.version_str(),
                    cipher = ssl.current_cipher().map(|c| c.name()).unwrap_or_default(),
                    "TLS established with a pre-shared key"
                );
                Ok(Secured::Psk(Box::new(s)))
            }
        }
    }
}

enum Acceptor {
    X509(tokio_rustls::TlsAcceptor),
    Psk(openssl::ssl::SslContext),
}

/// `USERNAME:HEXKEY` lines; blank lines are skipped. Errors name the line,
/// never its key.
fn parse_psk_file(path: &Path, text: &[u8]) -> Result<Vec<(String, Vec<u8>)>, TlsError> {
    let bad = |line: usize, detail: &'static str| TlsError::PskLine { path: path.to_path_buf(), line, detail };
    let text = std::str::from_utf8(text).map_err(|_| bad(0, "the file is not text"))?;
    let mut keys = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let (name, hex) = line.split_once(':').ok_or_else(|| bad(i + 1, "no ':'"))?;
        if name.is_empty() {
            return Err(bad(i + 1, "empty username"));
        }
        if hex.is_empty() || hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(i + 1, "the key is not an even number of hex digits"));
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).map_err(|_| bad(i + 1, "the key is not hex")))
            .collect::<Result<Vec<u8>, _>>()?;
        keys.push((name.to_string(), key));
    }
    if keys.is_empty() {
        return Err(TlsError::PskEmpty { path: path.to_path_buf() });
    }
    Ok(keys)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn read_pem_all<T: PemObject>(path: &Path, what: &'static str, expected: &'static str) -> Result<Vec<T>, TlsError> {
    let pem = read(path, what)?;
    let items = T::pem_slice_iter(&pem).collect::<Result<Vec<T>, _>>().map_err(|e| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if items.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf(), expected });
    }
    Ok(items)
}

/// An encrypted connection.
pub enum Secured<S> {
    X509(Box<tokio_rustls::server::TlsStream<S>>),
    Psk(Box<tokio_openssl::SslStream<S>>),
}

/// Both streams, as one thing to delegate to.
trait Stream: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Stream for T {}

impl<S: AsyncRead + AsyncWrite + Unpin> Secured<S> {
    fn stream(&mut self) -> Pin<&mut (dyn Stream + '_)> {
        match self {
            Secured::X509(s) => Pin::new(&mut **s),
            Secured::Psk(s) => Pin::new(&mut **s),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Secured<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Secured<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_and_bad_lines_are_named_without_their_key() {
        let p = Path::new("keys.psk");
        let keys = parse_psk_file(p, b"alice:0123abCD\n\nbob:ff\n").expect("valid");
        assert_eq!(keys, vec![("alice".to_string(), vec![0x01, 0x23, 0xab, 0xcd]), ("bob".to_string(), vec![0xff])]);
        for (text, line) in [
            (&b"alice\n"[..], 1),
            (b"alice:12\n:34\n", 2),
            (b"alice:123\n", 1),
            (b"alice:zz99secret\n", 1),
            (b"alice:\n", 1),
        ] {
            let e = parse_psk_file(p, text).expect_err("invalid").to_string();
            assert!(e.contains(&format!("line {line}")) && !e.contains("secret"), "{e}");
        }
        assert!(matches!(parse_psk_file(p, b"\n\n"), Err(TlsError::PskEmpty { .. })));
    }
}
