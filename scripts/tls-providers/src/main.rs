//! Measures the server-side CPU cost of full TLS handshakes, ring vs aws-lc-rs, in memory (no sockets).
use std::sync::Arc;
use std::time::{Duration, Instant};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

fn run(name: &str, p: CryptoProvider, v: &'static rustls::SupportedProtocolVersion, n: usize) {
    let p = Arc::new(p);
    let kp = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let cert = rcgen::CertificateParams::new(vec!["bench.test".into()]).unwrap().self_signed(&kp).unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der()));
    let sc = Arc::new(ServerConfig::builder_with_provider(p.clone()).with_protocol_versions(&[v]).unwrap()
        .with_no_client_auth().with_single_cert(vec![der.clone()], key).unwrap());
    let mut roots = RootCertStore::empty(); roots.add(der).unwrap();
    let cc = Arc::new(ClientConfig::builder_with_provider(p.clone()).with_protocol_versions(&[v]).unwrap()
        .with_root_certificates(roots).with_no_client_auth());
    let cc = { let mut c = (*cc).clone(); c.resumption = rustls::client::Resumption::disabled(); Arc::new(c) };
    let mut server_time = Duration::ZERO;
    for _ in 0..n {
        let mut c = ClientConnection::new(cc.clone(), ServerName::try_from("bench.test").unwrap()).unwrap();
        let mut s = ServerConnection::new(sc.clone()).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut buf = Vec::new();
            while c.wants_write() { c.write_tls(&mut buf).unwrap(); }
            if !buf.is_empty() {
                let t = Instant::now();
                let mut r = &buf[..];
                while !r.is_empty() { s.read_tls(&mut r).unwrap(); }
                s.process_new_packets().unwrap();
                server_time += t.elapsed();
            }
            let mut buf = Vec::new();
            let t = Instant::now();
            while s.wants_write() { s.write_tls(&mut buf).unwrap(); }
            server_time += t.elapsed();
            if !buf.is_empty() {
                let mut r = &buf[..];
                while !r.is_empty() { c.read_tls(&mut r).unwrap(); }
                c.process_new_packets().unwrap();
            }
        }
    }
    println!("{name:10} {:?} {}: {:.0} server handshakes/s of CPU ({:.1} us each)", v.version, "p256",
        n as f64 / server_time.as_secs_f64(), server_time.as_secs_f64() * 1e6 / n as f64);
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        run("ring", rustls::crypto::ring::default_provider(), v, n);
        run("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider(), v, n);
    }
}
