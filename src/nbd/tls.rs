//! TLS for NBD connections (`NBD_OPT_STARTTLS`): the server's credentials,
//! loaded and checked once at startup, and the policy a session applies
//! before TLS is up. The option haggling itself lives in the session; this
//! module only turns a plain stream into an encrypted one.
//!
//! Certificates use rustls on the aws-lc-rs provider (the one the S3 and
//! Kubernetes clients already bring).

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
}

/// The server's side of TLS: its credentials and its policy.
pub struct Tls {
    pub policy: Policy,
    acceptor: tokio_rustls::TlsAcceptor,
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
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            verifies_clients: files.client_ca.is_some(),
        })
    }

    /// Run the TLS handshake on a stream whose STARTTLS was just
    /// acknowledged. A client that fails it (no certificate, a wrong one,
    /// no common cipher) gets an error here.
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<Secured<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let s = self.acceptor.accept(stream).await?;
        let (_, conn) = s.get_ref();
        tracing::info!(
            version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
            cipher = conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
            client_certificate = conn.peer_certificates().is_some_and(|c| !c.is_empty()),
            "TLS established"
        );
        Ok(Secured { inner: Box::new(s) })
    }
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
pub struct Secured<S> {
    inner: Box<tokio_rustls::server::TlsStream<S>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Secured<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Secured<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
