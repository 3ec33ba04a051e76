//! TLS termination: certificates from PEM files picked by SNI, reloaded live, and the
//! handshake phase of a TLS connection (ClientHello -> `sni` wake -> handshake), bounded
//! by `tls_handshake_timeout`.
//!
//! The ClientHello is read before the server answers it ([`LazyConfigAcceptor`]), so the
//! function named by the server name starts while the rest of the handshake is on the
//! wire. Connections in flight keep the certificate they were handshaken with; reloads
//! only change what new handshakes get.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::config::CertificateConfig;

/// ALPN protocols offered, most preferred first (the auto server tells them apart by the
/// HTTP/2 preface).
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// How often certificate and key files are checked for changes (certbot rewrites them).
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Why a certificate could not be loaded. Never carries file content.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "private key {path} is readable by group or others (mode {mode:04o}); run chmod 600 on it"
    )]
    KeyReadableByOthers { path: PathBuf, mode: u32 },
    #[error("{path}: no PEM certificate found (expected the leaf first, then the chain)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("key {key} does not belong to certificate {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{path}: the leaf certificate names no DNS host (subjectAltName)")]
    NoNames { path: PathBuf },
}

/// One loaded `[[certificate]]`.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// SAN DNS names of the leaf, lowercase (wildcards as `*.example.com`).
    names: Vec<String>,
    stamp: Stamp,
}

/// What identifies a file's version: certbot replaces files (new inode), editors rewrite
/// in place (new mtime/size).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<(u64, u64, u64, Option<SystemTime>)>);

fn stamp(paths: &[&Path]) -> io::Result<Stamp> {
    let mut v = Vec::new();
    for p in paths {
        let m = std::fs::metadata(p)?;
        v.push((m.dev(), m.ino(), m.len(), m.modified().ok()));
    }
    Ok(Stamp(v))
}

/// The certificates currently served and the name index over them.
#[derive(Debug, Default)]
struct CertSet {
    certs: Vec<Arc<Loaded>>,
    exact: HashMap<String, usize>,
    /// `example.com` for a `*.example.com` SAN.
    wild: HashMap<String, usize>,
    default: usize,
}

impl CertSet {
    fn build(certs: Vec<Arc<Loaded>>, default: usize) -> CertSet {
        let mut exact = HashMap::new();
        let mut wild = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for n in &c.names {
                match n.strip_prefix("*.") {
                    Some(parent) => wild.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(n.clone()).or_insert(i),
                };
            }
        }
        CertSet {
            certs,
            exact,
            wild,
            default,
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(name) {
            return Some(*i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wild.get(parent).copied()
    }
}

/// The `[[certificate]]` tables, loaded and kept current. Answers rustls's question
/// "which certificate for this ClientHello".
#[derive(Debug)]
pub struct CertStore {
    configs: Vec<CertificateConfig>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertSet>>,
    /// Serialises reloads (SIGHUP and the poller may overlap).
    reloading: Mutex<()>,
}

impl CertStore {
    /// Loads every certificate; any failure is an error (synwake does not start half-TLS).
    pub fn load(configs: Vec<CertificateConfig>) -> Result<Arc<CertStore>, CertError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut certs = Vec::new();
        for c in &configs {
            certs.push(Arc::new(load_pair(c, &provider)?));
        }
        let default = configs.iter().position(|c| c.default).unwrap_or(0);
        Ok(Arc::new(CertStore {
            configs,
            provider,
            current: RwLock::new(Arc::new(CertSet::build(certs, default))),
            reloading: Mutex::new(()),
        }))
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// True when a certificate covers `name` (lowercase), exactly or by a wildcard.
    pub fn covers(&self, name: &str) -> bool {
        self.current.read().unwrap().find(name).is_some()
    }

    /// Re-reads certificate pairs whose files changed (all of them when `force`). A pair
    /// that fails to load keeps its previous certificate; the reason is logged. Returns
    /// how many pairs were replaced.
    pub fn reload(&self, force: bool) -> usize {
        let _one = self.reloading.lock().unwrap();
        let old = self.current.read().unwrap().clone();
        let mut certs = old.certs.clone();
        let mut replaced = 0;
        for (i, c) in self.configs.iter().enumerate() {
            let now = stamp(&[&c.cert, &c.key]);
            if !force && now.as_ref().ok() == Some(&certs[i].stamp) {
                continue;
            }
            match load_pair(c, &self.provider) {
                Ok(l) => {
                    if force || l.stamp != certs[i].stamp {
                        tracing::info!(
                            "certificate {} reloaded (names: {})",
                            c.cert.display(),
                            l.names.join(", ")
                        );
                    }
                    certs[i] = Arc::new(l);
                    replaced += 1;
                }
                Err(e) => {
                    tracing::warn!(
                        "certificate {}: reload failed, keeping the previous one: {e}",
                        c.cert.display()
                    );
                    // Do not retry the same broken files every poll.
                    if let Ok(s) = now {
                        let prev = &certs[i];
                        certs[i] = Arc::new(Loaded {
                            key: prev.key.clone(),
                            names: prev.names.clone(),
                            stamp: s,
                        });
                    }
                }
            }
        }
        *self.current.write().unwrap() = Arc::new(CertSet::build(certs, old.default));
        replaced
    }

    /// Polls the files every [`RELOAD_POLL`] until the task is dropped.
    pub async fn watch_files(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELOAD_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let store = self.clone();
            // File reads off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(move || store.reload(false)).await;
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.read().unwrap();
        let i = match hello.server_name() {
            Some(name) => set.find(&name.to_ascii_lowercase()).unwrap_or(set.default),
            None => set.default,
        };
        set.certs.get(i).map(|c| c.key.clone())
    }
}

/// Refuses every ClientHello: rustls then answers with a fatal alert.
#[derive(Debug)]
struct Refuse;

impl ResolvesServerCert for Refuse {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

fn load_pair(c: &CertificateConfig, provider: &CryptoProvider) -> Result<Loaded, CertError> {
    // Stamp first: a file that changes while we read it is read again on the next poll.
    let stamp = stamp(&[&c.cert, &c.key]).map_err(|source| CertError::Read {
        what: "certificate or key",
        path: c.cert.clone(),
        source,
    })?;
    check_key_mode(&c.key)?;
    let chain = read_chain(&c.cert)?;
    let key_der = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(source) => CertError::Read {
            what: "private key",
            path: c.key.clone(),
            source,
        },
        e => CertError::BadKey {
            path: c.key.clone(),
            reason: pem_reason(&e),
        },
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| CertError::BadKey {
            path: c.key.clone(),
            reason: e.to_string(),
        })?;
    let names = dns_names(&c.cert, &chain[0])?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| CertError::KeyMismatch {
        cert: c.cert.clone(),
        key: c.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        names,
        stamp,
    })
}

fn check_key_mode(path: &Path) -> Result<(), CertError> {
    let m = std::fs::metadata(path).map_err(|source| CertError::Read {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o044 != 0 {
        return Err(CertError::KeyReadableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(source) => CertError::Read {
            what: "certificate",
            path: path.to_path_buf(),
            source,
        },
        e => CertError::BadCertificate {
            path: path.to_path_buf(),
            reason: pem_reason(&e),
        },
    })?;
    let chain = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: path.to_path_buf(),
            reason: pem_reason(&e),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// The error's kind only: pem errors may quote file bytes.
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        E::IllegalSectionStart { .. } => "malformed BEGIN line".into(),
        E::Base64Decode(_) => "invalid base64 in a PEM section".into(),
        E::Io(e) => e.to_string(),
        E::NoItemsFound => "no matching PEM section".into(),
        _ => "malformed PEM".into(),
    }
}

fn dns_names(path: &Path, leaf: &CertificateDer<'_>) -> Result<Vec<String>, CertError> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::BadCertificate {
        path: path.to_path_buf(),
        reason: format!("leaf certificate: {e}"),
    })?;
    let names: Vec<String> = cert
        .valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    if names.is_empty() {
        return Err(CertError::NoNames {
            path: path.to_path_buf(),
        });
    }
    Ok(names)
}

/// Why a TLS connection ended before HTTP. Logged at debug: clients cause these at will.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("closed before the ClientHello")]
    Closed,
    #[error("no handshake within {0:?} (tls_handshake_timeout)")]
    Timeout(Duration),
    #[error("plain HTTP on a TLS port (answered 400)")]
    PlainHttp,
    #[error("server name {0:?} is not served here (alert sent, nothing woken)")]
    UnknownName(String),
    #[error("handshake failed: {0}")]
    Failed(io::Error),
}

/// What the handshake phase learned about the connection.
pub struct Handshaken {
    pub stream: TlsStream<TcpStream>,
    /// The SNI server name, lowercase.
    pub server_name: Option<Arc<str>>,
}

/// TLS settings shared by every TLS listener.
pub struct TlsEdge {
    config: Arc<ServerConfig>,
    refuse: Arc<ServerConfig>,
    pub certs: Arc<CertStore>,
    pub handshake_timeout: Duration,
}

impl TlsEdge {
    pub fn new(certs: Arc<CertStore>, handshake_timeout: Duration) -> Arc<TlsEdge> {
        let builder = || {
            ServerConfig::builder_with_provider(certs.provider().clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("the provider supports TLS 1.2 and 1.3")
                .with_no_client_auth()
        };
        let mut config = builder().with_cert_resolver(certs.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let refuse = builder().with_cert_resolver(Arc::new(Refuse));
        Arc::new(TlsEdge {
            config: Arc::new(config),
            refuse: Arc::new(refuse),
            certs,
            handshake_timeout,
        })
    }

    /// Runs the handshake phase. `on_hello` sees the server name (lowercase) before the
    /// server answers and says whether the name is served; a refused name gets a fatal
    /// alert. The whole phase, from accept, is bounded by the handshake timeout.
    pub async fn handshake(
        &self,
        stream: TcpStream,
        accepted: Instant,
        on_hello: impl FnOnce(Option<&str>) -> bool,
    ) -> Result<Handshaken, HandshakeError> {
        let deadline = accepted + self.handshake_timeout;
        let timeout = HandshakeError::Timeout(self.handshake_timeout);
        let mut stream = stream;
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Err(_) => return Err(timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(HandshakeError::Closed),
            Ok(Ok(_)) => {}
        }
        // 0x16: a TLS handshake record. An ASCII letter: an HTTP method.
        if first[0].is_ascii_uppercase() {
            let body = "this port speaks HTTPS; use an https:// URL\n";
            let resp = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout_at(deadline, stream.write_all(resp.as_bytes())).await;
            let _ = stream.shutdown().await;
            return Err(HandshakeError::PlainHttp);
        }
        let acceptor = LazyConfigAcceptor::new(Acceptor::default(), stream);
        let start = match tokio::time::timeout_at(deadline, acceptor).await {
            Err(_) => return Err(timeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(HandshakeError::Closed)
            }
            Ok(Err(e)) => return Err(HandshakeError::Failed(e)),
            Ok(Ok(s)) => s,
        };
        let server_name: Option<Arc<str>> = start
            .client_hello()
            .server_name()
            .map(|n| Arc::from(n.trim_end_matches('.').to_ascii_lowercase()));
        if !on_hello(server_name.as_deref()) {
            let name = server_name.as_deref().unwrap_or_default().to_string();
            let _ = tokio::time::timeout_at(deadline, start.into_stream(self.refuse.clone())).await;
            return Err(HandshakeError::UnknownName(name));
        }
        match tokio::time::timeout_at(deadline, start.into_stream(self.config.clone())).await {
            Err(_) => Err(timeout),
            Ok(Err(e)) => Err(HandshakeError::Failed(e)),
            Ok(Ok(stream)) => Ok(Handshaken {
                stream,
                server_name,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(names: &[&str]) -> Arc<Loaded> {
        // Any key will do for the index; reuse a tiny fake CertifiedKey.
        #[derive(Debug)]
        struct NoKey;
        impl rustls::sign::SigningKey for NoKey {
            fn choose_scheme(
                &self,
                _: &[rustls::SignatureScheme],
            ) -> Option<Box<dyn rustls::sign::Signer>> {
                None
            }
            fn algorithm(&self) -> rustls::SignatureAlgorithm {
                rustls::SignatureAlgorithm::ECDSA
            }
        }
        Arc::new(Loaded {
            key: Arc::new(CertifiedKey::new(vec![], Arc::new(NoKey))),
            names: names.iter().map(|s| s.to_string()).collect(),
            stamp: Stamp(vec![]),
        })
    }

    #[test]
    fn exact_beats_wildcard_and_wildcard_is_one_label() {
        let set = CertSet::build(
            vec![
                loaded(&["*.example.com"]),
                loaded(&["a.example.com", "other.org"]),
            ],
            1,
        );
        assert_eq!(set.find("a.example.com"), Some(1));
        assert_eq!(set.find("b.example.com"), Some(0));
        assert_eq!(set.find("x.b.example.com"), None);
        assert_eq!(set.find("example.com"), None);
        assert_eq!(set.find("other.org"), Some(1));
    }
}
