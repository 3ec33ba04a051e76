//! The headers that tell a function who called it and how: `X-Forwarded-For` and
//! `Forwarded` (appended to, so the client's address is never lost), `X-Forwarded-Proto`
//! and `X-Forwarded-Host` (set: synwake is the edge and knows them, a client does not
//! get to choose them).

use std::fmt::Write;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::hosts::ConnInfo;

pub const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The forwarded headers a request on a connection gets; they replace any of these four
/// the request has (the client's own `X-Forwarded-For` and `Forwarded` are kept in front).
pub struct Forwarded {
    pub xff: String,
    pub proto: &'static str,
    /// `None`: no `X-Forwarded-Host` (the client's is removed).
    pub host: Option<HeaderValue>,
    pub forwarded: String,
}

impl Forwarded {
    /// The values for a request with `headers` that came in on `conn`: two allocations
    /// when the client sent no forwarded headers of its own.
    pub fn of(headers: &HeaderMap, conn: &ConnInfo) -> Forwarded {
        let ip = conn.peer.ip();
        let host = headers
            .get(http::header::HOST)
            .filter(|v| v.to_str().is_ok())
            .cloned()
            .or_else(|| {
                let name = conn.server_name.as_deref()?;
                HeaderValue::from_str(name).ok()
            });
        let mut xff = String::with_capacity(48);
        join_prior(headers, &XFF, &mut xff);
        let _ = write!(xff, "{ip}");
        let mut forwarded = String::with_capacity(64);
        join_prior(headers, &http::header::FORWARDED, &mut forwarded);
        let _ = match ip {
            IpAddr::V4(v4) => write!(forwarded, "for={v4};proto={}", conn.scheme()),
            IpAddr::V6(v6) => write!(forwarded, "for=\"[{v6}]\";proto={}", conn.scheme()),
        };
        let h = host.as_ref().and_then(|v| v.to_str().ok());
        if let Some(h) = h.filter(|h| !h.contains(['"', '\\'])) {
            let _ = write!(forwarded, ";host=\"{h}\"");
        }
        Forwarded {
            xff,
            proto: conn.scheme(),
            host,
            forwarded,
        }
    }

    /// One of the four names these values replace.
    pub fn replaces(name: &HeaderName) -> bool {
        name == XFF || name == XFP || name == XFH || name == http::header::FORWARDED
    }
}

/// Adds the forwarded headers for a request that came in on `conn`.
pub fn set_forwarded(headers: &mut HeaderMap, conn: &ConnInfo) {
    let f = Forwarded::of(headers, conn);
    // From the Strings themselves: no copy.
    if let Ok(v) = HeaderValue::try_from(f.xff) {
        headers.insert(XFF, v);
    }
    headers.insert(XFP, HeaderValue::from_static(f.proto));
    match f.host {
        Some(v) => {
            headers.insert(XFH, v);
        }
        None => {
            headers.remove(XFH);
        }
    }
    if let Ok(v) = HeaderValue::try_from(f.forwarded) {
        headers.insert(http::header::FORWARDED, v);
    }
}

/// The values a comma-separated header already has, joined, with ", " after them.
fn join_prior(headers: &HeaderMap, name: &HeaderName, out: &mut String) {
    for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
        out.push_str(v);
        out.push_str(", ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn tls_request_gets_all_four() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.example.com:8443"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.9"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        let conn = ConnInfo::tls(
            "192.0.2.7:5555".parse().unwrap(),
            Some(Arc::from("a.example.com")),
        );
        set_forwarded(&mut h, &conn);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.example.com:8443");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=\"a.example.com:8443\""
        );
    }

    #[test]
    fn ipv6_peer_is_quoted_and_forwarded_appends() {
        let mut h = HeaderMap::new();
        h.insert("forwarded", HeaderValue::from_static("for=198.51.100.1"));
        set_forwarded(&mut h, &ConnInfo::plain("[::1]:80".parse().unwrap()));
        assert_eq!(h["forwarded"], "for=198.51.100.1, for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-forwarded-host").is_none());
    }
}
