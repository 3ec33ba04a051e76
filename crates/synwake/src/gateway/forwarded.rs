//! The headers that tell a function who called it and how: `X-Forwarded-For` and
//! `Forwarded` (appended to, so the client's address is never lost), `X-Forwarded-Proto`
//! and `X-Forwarded-Host` (set: synwake is the edge and knows them, a client does not
//! get to choose them).

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::hosts::{ConnInfo, PeerText};

pub const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The forwarded headers a request on a connection gets; they replace any of these four
/// the request has (the client's own `X-Forwarded-For` and `Forwarded` are kept in front).
/// Kept as parts and written straight into a request head: no allocation when the client
/// sent no forwarded headers of its own.
pub struct Forwarded {
    ip: PeerText,
    pub proto: &'static str,
    /// `None`: no `X-Forwarded-Host` (the client's is removed).
    pub host: Option<HeaderValue>,
    /// The client's own values, joined, each followed by ", ".
    prior_xff: Vec<u8>,
    prior_forwarded: Vec<u8>,
}

impl Forwarded {
    /// The values for a request with `headers` that came in on `conn`.
    pub fn of(headers: &HeaderMap, conn: &ConnInfo) -> Forwarded {
        let host = headers
            .get(http::header::HOST)
            .filter(|v| v.to_str().is_ok())
            .cloned()
            .or_else(|| {
                let name = conn.server_name.as_deref()?;
                HeaderValue::from_str(name).ok()
            });
        Forwarded {
            ip: conn.peer_text,
            proto: conn.scheme(),
            host,
            prior_xff: join_prior(headers, &XFF),
            prior_forwarded: join_prior(headers, &http::header::FORWARDED),
        }
    }

    /// The `X-Forwarded-For` value: the client's, then the peer's address.
    pub fn write_xff(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prior_xff);
        out.extend_from_slice(self.ip.as_bytes());
    }

    /// The `Forwarded` value (RFC 7239): the client's, then this hop's element.
    pub fn write_forwarded(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prior_forwarded);
        if self.ip.is_ipv6() {
            out.extend_from_slice(b"for=\"[");
            out.extend_from_slice(self.ip.as_bytes());
            out.extend_from_slice(b"]\"");
        } else {
            out.extend_from_slice(b"for=");
            out.extend_from_slice(self.ip.as_bytes());
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(self.proto.as_bytes());
        let h = self.host.as_ref().and_then(|v| v.to_str().ok());
        if let Some(h) = h.filter(|h| !h.contains(['"', '\\'])) {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(h.as_bytes());
            out.push(b'"');
        }
    }

    /// One of the four names these values replace.
    pub fn replaces(name: &HeaderName) -> bool {
        name == XFF || name == XFP || name == XFH || name == http::header::FORWARDED
    }
}

/// A value written by `write` as a header value (the parts are visible ASCII already).
fn value(write: impl FnOnce(&mut Vec<u8>)) -> Option<HeaderValue> {
    let mut v = Vec::with_capacity(64);
    write(&mut v);
    HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
}

/// Adds the forwarded headers for a request that came in on `conn`.
pub fn set_forwarded(headers: &mut HeaderMap, conn: &ConnInfo) {
    let f = Forwarded::of(headers, conn);
    if let Some(v) = value(|out| f.write_xff(out)) {
        headers.insert(XFF, v);
    }
    headers.insert(XFP, HeaderValue::from_static(f.proto));
    match &f.host {
        Some(v) => {
            headers.insert(XFH, v.clone());
        }
        None => {
            headers.remove(XFH);
        }
    }
    if let Some(v) = value(|out| f.write_forwarded(out)) {
        headers.insert(http::header::FORWARDED, v);
    }
}

/// The values a comma-separated header already has, joined, with ", " after them (no
/// allocation without any).
fn join_prior(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut out = Vec::new();
    for v in headers.get_all(name).iter().filter(|v| v.to_str().is_ok()) {
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b", ");
    }
    out
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
