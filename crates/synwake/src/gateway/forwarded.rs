//! The headers that tell a function who called it and how: `X-Forwarded-For` and
//! `Forwarded` (appended to, so the client's address is never lost), `X-Forwarded-Proto`
//! and `X-Forwarded-Host` (set: synwake is the edge and knows them, a client does not
//! get to choose them).

use std::fmt::Write;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::hosts::ConnInfo;

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds the forwarded headers for a request that came in on `conn`. On every request's
/// path: two allocations when the client sent no forwarded headers of its own.
pub fn set_forwarded(headers: &mut HeaderMap, conn: &ConnInfo) {
    let ip = conn.peer.ip();
    let host = headers
        .get(http::header::HOST)
        .filter(|v| v.to_str().is_ok())
        .cloned()
        .or_else(|| {
            let name = conn.server_name.as_deref()?;
            HeaderValue::from_str(name).ok()
        });
    append(headers, XFF, ip.to_string());
    headers.insert(XFP, HeaderValue::from_static(conn.scheme()));
    match &host {
        Some(v) => {
            headers.insert(XFH, v.clone());
        }
        None => {
            headers.remove(XFH);
        }
    }
    let mut element = String::with_capacity(64);
    let _ = match ip {
        IpAddr::V4(v4) => write!(element, "for={v4};proto={}", conn.scheme()),
        IpAddr::V6(v6) => write!(element, "for=\"[{v6}]\";proto={}", conn.scheme()),
    };
    let host = host.as_ref().and_then(|v| v.to_str().ok());
    if let Some(h) = host.filter(|h| !h.contains(['"', '\\'])) {
        let _ = write!(element, ";host=\"{h}\"");
    }
    append(headers, http::header::FORWARDED, element);
}

/// Appends `value` to a comma-separated header, joining repeated fields into one.
fn append(headers: &mut HeaderMap, name: HeaderName, value: String) {
    let prev: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let joined = if prev.is_empty() {
        value
    } else {
        format!("{}, {value}", prev.join(", "))
    };
    // From the String itself: no copy.
    if let Ok(v) = HeaderValue::try_from(joined) {
        headers.insert(name, v);
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
