//! `--tls`: a test CA made for the run, the server certificate the daemon serves, and the
//! verifying client config of the timed requests (no resumption: every request is a new
//! client's full handshake).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::Protocol;

/// Every function's host name is `<name>.<DOMAIN>`; the certificate covers `*.<DOMAIN>`.
pub const DOMAIN: &str = "bench.test";

/// Files of the run's test PKI (private key mode 0600).
pub struct TestPki {
    pub cert: PathBuf,
    pub key: PathBuf,
    ca_der: Vec<u8>,
}

impl TestPki {
    /// Makes a CA and a `*.bench.test` certificate signed by it, written into `dir`.
    pub fn create(dir: &Path) -> anyhow::Result<TestPki> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "synwake-bench test CA");
        let ca_key = rcgen::KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let mut leaf_params = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")])?;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("*.{DOMAIN}"));
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;
        let cert = dir.join("bench-cert.pem");
        let key = dir.join("bench-key.pem");
        std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem()))
            .with_context(|| format!("write {}", cert.display()))?;
        let _ = std::fs::remove_file(&key);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| format!("create {}", key.display()))?;
        std::io::Write::write_all(&mut f, leaf_key.serialize_pem().as_bytes())?;
        Ok(TestPki {
            cert,
            key,
            ca_der: ca.der().to_vec(),
        })
    }

    /// A client that trusts only the test CA, speaks only `protocol`'s TLS version and
    /// never resumes a session.
    pub fn client(&self, protocol: Protocol) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let version = match protocol {
            Protocol::Tls12 => &rustls::version::TLS12,
            _ => &rustls::version::TLS13,
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The host name of function `name`.
pub fn host_of(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}
