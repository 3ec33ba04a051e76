//! Where an async call's `X-Callback-Url` may point (`[gateway] callback_allow`).
//!
//! A callback is a request synwake (root) makes on behalf of an unauthenticated caller,
//! so by default it may not reach anything a remote client could not: loopback,
//! private, link-local, shared (CGNAT), unspecified and multicast addresses are refused,
//! and so are synwake's own listeners on any local address. `callback_allow` names hosts
//! or CIDRs that are allowed anyway (never synwake's own listeners). The check runs on
//! the URL when the call is accepted and again on the resolved address the callback
//! actually connects to, so a DNS answer that changes in between (rebinding) gains
//! nothing. Redirects are not followed.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::lifecycle::Lifecycle;

/// One `callback_allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// A host name, matched case-insensitively against the URL's host.
    Host(String),
    /// An address range; a bare address is a /32 or /128.
    Net(IpAddr, u8),
}

impl AllowRule {
    /// Parses `hooks.example.com`, `127.0.0.1`, `10.0.0.0/8` or `fd00::/8`.
    pub fn parse(s: &str) -> Result<AllowRule, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty entry".into());
        }
        if let Some((addr, len)) = s.split_once('/') {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("{s:?} is not an address/prefix"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?;
            return Ok(AllowRule::Net(ip, len));
        }
        if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(AllowRule::Net(ip, len));
        }
        let valid = s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{s:?} is neither a host name nor an address/prefix"
            ));
        }
        Ok(AllowRule::Host(s.to_ascii_lowercase()))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let AllowRule::Net(net, len) = *self else {
            return false;
        };
        match (canonical(net), canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(len.min(32)))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(len.min(128)))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A v4-mapped IPv6 address is the IPv4 address it maps.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Which default rule refuses `ip`, if any.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_loopback() {
                Some("loopback (127.0.0.0/8)")
            } else if a.is_private() {
                Some("private (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)")
            } else if a.is_link_local() {
                Some("link-local (169.254.0.0/16)")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared address space (100.64.0.0/10)")
            } else if o[0] == 0 || a.is_broadcast() {
                Some("unspecified (0.0.0.0/8)")
            } else if a.is_multicast() || o[0] >= 240 {
                Some("multicast or reserved (224.0.0.0/3)")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a == Ipv6Addr::LOCALHOST {
                Some("loopback (::1)")
            } else if a.is_unspecified() {
                Some("unspecified (::)")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("unique local (fc00::/7)")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local (fe80::/10)")
            } else if (s[0] & 0xff00) == 0xff00 {
                Some("multicast (ff00::/8)")
            } else {
                None
            }
        }
    }
}

/// Why a callback was refused; every message names the rule.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("X-Callback-Url must be an http:// URL with a host")]
    NotHttp,
    #[error(
        "X-Callback-Url {host} -> {addr} is {range}, refused (not in [gateway] callback_allow)"
    )]
    Internal {
        host: String,
        addr: IpAddr,
        range: &'static str,
    },
    #[error("X-Callback-Url {host} -> {addr} is one of synwake's own listeners, refused")]
    OwnListener { host: String, addr: SocketAddr },
    #[error("X-Callback-Url {host}: cannot resolve: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("X-Callback-Url {host}: no address")]
    NoAddress { host: String },
}

/// The callback rules of one daemon.
#[derive(Clone)]
pub struct CallbackPolicy {
    allow: Vec<AllowRule>,
    /// Ports of the gateway's, the API's and the TLS listener.
    own_ports: Vec<u16>,
    lc: Option<Lifecycle>,
}

impl CallbackPolicy {
    pub fn new(allow: Vec<AllowRule>, own_ports: Vec<u16>, lc: Option<Lifecycle>) -> Self {
        CallbackPolicy {
            allow,
            own_ports,
            lc,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allow
            .iter()
            .any(|r| matches!(r, AllowRule::Host(h) if *h == host))
    }

    fn is_own_port(&self, port: u16) -> bool {
        self.own_ports.contains(&port)
            || self.lc.as_ref().is_some_and(|lc| {
                lc.specs()
                    .iter()
                    .any(|s| s.port == Some(port) || s.tls_port == Some(port))
            })
    }

    /// Checks one resolved address the callback would connect to.
    pub fn check_addr(&self, host: &str, addr: SocketAddr) -> Result<(), CallbackError> {
        let ip = canonical(addr.ip());
        if self.is_own_port(addr.port()) && is_local_address(ip) {
            return Err(CallbackError::OwnListener {
                host: host.into(),
                addr,
            });
        }
        if self.host_allowed(host) || self.allow.iter().any(|r| r.contains(ip)) {
            return Ok(());
        }
        match internal_range(ip) {
            Some(range) => Err(CallbackError::Internal {
                host: host.into(),
                addr: ip,
                range,
            }),
            None => Ok(()),
        }
    }

    /// At accept time: the URL's shape, and its host when it is an address literal (a
    /// name is checked on every address it resolves to when the callback is sent).
    pub fn check_url(&self, url: &str) -> Result<(), CallbackError> {
        let (host, port) = host_port(url)?;
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            self.check_addr(&host, SocketAddr::new(ip, port))?;
        }
        Ok(())
    }

    /// Resolves the URL's host, checks every address and connects to the first allowed
    /// one; the request then goes over exactly that connection.
    pub async fn send(
        &self,
        url: &str,
        mut req: Request<Full<Bytes>>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
        let (host, port) = host_port(url)?;
        // Over a connection of our own the request line takes the origin form.
        let uri: Uri = url.parse()?;
        if let Some(authority) = uri.authority() {
            let authority = http::HeaderValue::from_str(authority.as_str())?;
            req.headers_mut().insert(http::header::HOST, authority);
        }
        let origin = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        *req.uri_mut() = origin.parse()?;
        let bare = host.trim_matches(['[', ']']).to_string();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|source| CallbackError::Resolve {
                host: host.clone(),
                source,
            })?
            .collect();
        let mut refused = None;
        let mut target = None;
        for a in addrs {
            match self.check_addr(&host, a) {
                Ok(()) => {
                    target = Some(a);
                    break;
                }
                Err(e) => refused = Some(e),
            }
        }
        let Some(addr) = target else {
            return Err(Box::new(
                refused.unwrap_or(CallbackError::NoAddress { host }),
            ));
        };
        let stream =
            tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr)).await??;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender.send_request(req).await?)
    }
}

fn host_port(url: &str) -> Result<(String, u16), CallbackError> {
    let uri: Uri = url.parse().map_err(|_| CallbackError::NotHttp)?;
    if uri.scheme_str() != Some("http") {
        return Err(CallbackError::NotHttp);
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or(CallbackError::NotHttp)?;
    Ok((host.to_string(), uri.port_u16().unwrap_or(80)))
}

/// Whether `ip` is an address of this host (binding to it succeeds only then).
fn is_local_address(ip: IpAddr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], own: &[u16]) -> CallbackPolicy {
        CallbackPolicy::new(
            allow.iter().map(|a| AllowRule::parse(a).unwrap()).collect(),
            own.to_vec(),
            None,
        )
    }

    #[test]
    fn internal_ranges_are_refused_by_default() {
        let p = policy(&[], &[]);
        for url in [
            "http://127.0.0.1/x",
            "http://127.8.9.10:9000/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://0.0.0.0:8081/",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            let e = p.check_url(url).unwrap_err();
            assert!(e.to_string().contains("callback_allow"), "{url}: {e}");
        }
        assert!(p.check_url("http://93.184.216.34/").is_ok());
        assert!(
            p.check_url("http://hooks.example.com/").is_ok(),
            "names wait for connect"
        );
        assert!(matches!(
            p.check_url("ftp://93.184.216.34/"),
            Err(CallbackError::NotHttp)
        ));
    }

    #[test]
    fn allow_rules_open_hosts_and_ranges_but_never_own_listeners() {
        let p = policy(&["127.0.0.1", "10.0.0.0/8", "Hooks.Internal"], &[8081]);
        assert!(p.check_url("http://127.0.0.1:9000/").is_ok());
        assert!(p.check_url("http://10.200.3.4/").is_ok());
        assert!(p.check_url("http://11.0.0.1/").is_ok());
        assert!(p.check_url("http://192.168.0.1/").is_err());
        assert!(matches!(
            p.check_url("http://127.0.0.1:8081/system/functions"),
            Err(CallbackError::OwnListener { .. })
        ));
        let a: SocketAddr = "192.168.7.7:80".parse().unwrap();
        assert!(p.check_addr("hooks.internal", a).is_ok());
        assert!(p.check_addr("other.internal", a).is_err());
    }

    #[test]
    fn rules_parse_or_say_why() {
        assert_eq!(
            AllowRule::parse("10.0.0.0/8").unwrap(),
            AllowRule::Net("10.0.0.0".parse().unwrap(), 8)
        );
        assert!(AllowRule::parse("10.0.0.0/33").is_err());
        assert!(AllowRule::parse("").is_err());
        assert!(AllowRule::parse("a b").is_err());
        assert!(AllowRule::parse("fd00::/8").is_ok());
    }
}
