//! Routing by host name: the functions' `hosts` claims, and what a connection or request
//! says its host is (SNI on TLS, the Host header on plain HTTP).

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::upstream::PrivateConns;
use crate::spec::FunctionSpec;

/// What the listener knows about a connection; handed to every request on it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as text, written once per connection (every request's
    /// forwarded fields carry it).
    pub peer_text: PeerText,
    /// The connection is TLS (the client spoke HTTPS to synwake).
    pub tls: bool,
    /// The TLS SNI server name, lowercase.
    pub server_name: Option<Arc<str>>,
    /// Upstream connections only this connection's requests use (requests with a body).
    pub private: Arc<PrivateConns>,
}

impl ConnInfo {
    pub fn plain(peer: SocketAddr) -> ConnInfo {
        ConnInfo {
            peer,
            peer_text: PeerText::of(peer.ip()),
            tls: false,
            server_name: None,
            private: Arc::default(),
        }
    }

    pub fn tls(peer: SocketAddr, server_name: Option<Arc<str>>) -> ConnInfo {
        ConnInfo {
            peer,
            peer_text: PeerText::of(peer.ip()),
            tls: true,
            server_name,
            private: Arc::default(),
        }
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// An IP address as text, kept inline (an IPv6 address is at most 45 characters).
#[derive(Clone, Copy)]
pub struct PeerText {
    len: u8,
    v6: bool,
    buf: [u8; 45],
}

impl PeerText {
    pub fn of(ip: IpAddr) -> PeerText {
        let mut buf = [0u8; 45];
        let mut w = &mut buf[..];
        // Cannot fail: the longest IPv6 text fits.
        let _ = write!(w, "{ip}");
        let len = 45 - w.len();
        PeerText {
            len: len as u8,
            v6: ip.is_ipv6(),
            buf,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    pub fn is_ipv6(&self) -> bool {
        self.v6
    }
}

impl std::fmt::Debug for PeerText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(self.as_bytes()).unwrap_or("?"))
    }
}

/// Host claim -> function, rebuilt when the functions change.
#[derive(Debug, Default)]
pub struct HostTable {
    exact: HashMap<String, Arc<str>>,
    /// `example.com` for a `*.example.com` claim.
    wild: HashMap<String, Arc<str>>,
}

impl HostTable {
    pub fn build<'a>(specs: impl IntoIterator<Item = &'a FunctionSpec>) -> HostTable {
        let mut t = HostTable::default();
        for s in specs {
            let name: Arc<str> = Arc::from(s.name.as_str());
            for h in &s.hosts {
                match h.strip_prefix("*.") {
                    Some(parent) => t.wild.insert(parent.to_string(), name.clone()),
                    None => t.exact.insert(h.clone(), name.clone()),
                };
            }
        }
        t
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wild.is_empty()
    }

    /// The function claiming `host` (lowercase, no port): an exact claim first, then a
    /// wildcard one label up.
    pub fn lookup(&self, host: &str) -> Option<&Arc<str>> {
        if let Some(f) = self.exact.get(host) {
            return Some(f);
        }
        let (_, parent) = host.split_once('.')?;
        self.wild.get(parent)
    }
}

/// The host a request names: the Host header, else the URI's authority (HTTP/2), without
/// the port, lowercase, no trailing dot.
pub fn request_host(req: &http::Request<impl Sized>) -> Option<String> {
    let raw = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))?;
    let host = match raw.strip_prefix('[') {
        // [v6]:port — never a claimable name, but keep it whole for X-Forwarded-Host.
        Some(rest) => format!("[{}", rest.split(']').next().unwrap_or("")) + "]",
        None => raw.split(':').next().unwrap_or("").to_string(),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_the_address_as_displayed_up_to_the_longest_ipv6() {
        for ip in [
            "192.0.2.7",
            "255.255.255.255",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "1:2:3:4:5:6:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let t = PeerText::of(ip);
            assert_eq!(t.as_bytes(), ip.to_string().as_bytes());
            assert_eq!(t.is_ipv6(), ip.is_ipv6());
        }
    }

    #[test]
    fn exact_then_wildcard() {
        let mut a = crate::config::Config::parse(
            "[[function]]\nname = \"a\"\ncommand = [\"x\"]\nhosts = [\"a.example.com\", \"*.example.com\"]\n[[function]]\nname = \"b\"\ncommand = [\"x\"]\nhosts = [\"b.example.com\"]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let t = HostTable::build(a.functions.iter());
        assert_eq!(t.lookup("a.example.com").map(|s| &**s), Some("a"));
        assert_eq!(t.lookup("b.example.com").map(|s| &**s), Some("b"));
        assert_eq!(t.lookup("zz.example.com").map(|s| &**s), Some("a"));
        assert_eq!(t.lookup("x.zz.example.com"), None);
        assert_eq!(t.lookup("example.com"), None);
        a.functions.clear();
        assert!(HostTable::build(a.functions.iter()).is_empty());
    }

    #[test]
    fn host_header_without_port() {
        let r = http::Request::builder()
            .header("host", "Hello.Example.com:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("hello.example.com"));
        let r = http::Request::builder()
            .uri("https://x.example.com/p")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("x.example.com"));
        let r = http::Request::builder()
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("[::1]"));
    }
}
