//! GET /system/logs: newline-delimited JSON of a function's recent output, optionally
//! followed live until the client goes away.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::broadcast;

use super::{query_param, NAMESPACE};
use crate::gateway::{text_response, ProxyBody};
use crate::lifecycle::Lifecycle;
use crate::logs::LogLine;

fn to_json(l: &LogLine) -> Bytes {
    let ts = humantime::format_rfc3339_nanos(l.time).to_string();
    let mut v = serde_json::to_vec(&serde_json::json!({
        "name": l.name,
        "namespace": NAMESPACE,
        "instance": l.instance,
        "timestamp": ts,
        "text": l.text,
    }))
    .expect("json");
    v.push(b'\n');
    Bytes::from(v)
}

/// RFC 3339 with `Z` or a numeric offset (Go clients send local time, e.g. `+01:00`;
/// an unescaped `+` arrives as a space).
fn parse_since(s: &str) -> Result<SystemTime, String> {
    let b = s.as_bytes();
    let offset = (b.len() > 6 && b[b.len() - 3] == b':')
        .then(|| {
            let sign = match b[b.len() - 6] {
                b'+' | b' ' => 1i64,
                b'-' => -1,
                _ => return None,
            };
            let hh: u64 = s.get(b.len() - 5..b.len() - 3)?.parse().ok()?;
            let mm: u64 = s.get(b.len() - 2..)?.parse().ok()?;
            Some((sign, Duration::from_secs(hh * 3600 + mm * 60)))
        })
        .flatten();
    match offset {
        None => humantime::parse_rfc3339_weak(s).map_err(|e| e.to_string()),
        Some((sign, off)) => {
            let local =
                humantime::parse_rfc3339_weak(&s[..s.len() - 6]).map_err(|e| e.to_string())?;
            // local = UTC + offset
            Ok(if sign > 0 { local - off } else { local + off })
        }
    }
}

pub fn serve(lc: &Lifecycle, query: Option<&str>) -> Response<ProxyBody> {
    let Some(name) = query_param(query, "name").filter(|n| !n.is_empty()) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "invalid query parameter `name`: required",
        );
    };
    if lc.get(&name).is_none() {
        return text_response(StatusCode::NOT_FOUND, format!("function {name} not found"));
    }
    let instance = query_param(query, "instance").filter(|s| !s.is_empty());
    let tail: Option<usize> = match query_param(query, "tail").filter(|s| !s.is_empty()) {
        None => None,
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n < 0 => None,
            Ok(n) => Some(n as usize),
            Err(_) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid query parameter `tail`: {t:?} is not a number"),
                )
            }
        },
    };
    let since = match query_param(query, "since").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match parse_since(&s) {
            Ok(t) => Some(t),
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid query parameter `since`: {s:?}: {e}"),
                )
            }
        },
    };
    let follow = matches!(
        query_param(query, "follow").as_deref(),
        Some("true" | "1" | "")
    );
    let wanted = move |l: &LogLine| {
        l.name == name
            && instance.as_ref().is_none_or(|i| &l.instance == i)
            && since.is_none_or(|s| l.time >= s)
    };
    // Subscribe before reading the buffer so no line falls between the two.
    let live = follow.then(|| lc.logs().subscribe());
    let mut lines: Vec<LogLine> = lc
        .logs()
        .recent(&query_param(query, "name").unwrap_or_default())
        .into_iter()
        .filter(|l| wanted(l))
        .collect();
    if let Some(t) = tail {
        let skip = lines.len().saturating_sub(t);
        lines.drain(..skip);
    }
    let last_time = lines.last().map(|l| l.time);
    let initial: Vec<Bytes> = lines.iter().map(to_json).collect();
    let state = (initial.into_iter(), live, wanted, last_time);
    let stream =
        futures_util::stream::unfold(state, |(mut initial, mut live, wanted, last)| async move {
            if let Some(b) = initial.next() {
                return Some((
                    Ok::<_, crate::gateway::BodyError>(Frame::data(b)),
                    (initial, live, wanted, last),
                ));
            }
            let rx: &mut broadcast::Receiver<LogLine> = live.as_mut()?;
            loop {
                match rx.recv().await {
                    Ok(l) if wanted(&l) && last.is_none_or(|t| l.time > t) => {
                        let b = to_json(&l);
                        return Some((Ok(Frame::data(b)), (initial, live, wanted, last)));
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(ProxyBody::boxed(StreamBody::new(stream)))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_takes_z_and_offsets() {
        let z = parse_since("2026-11-28T06:04:04.5Z").unwrap();
        assert_eq!(parse_since("2026-11-28T07:04:04.5+01:00").unwrap(), z);
        assert_eq!(parse_since("2026-11-28T07:04:04.5 01:00").unwrap(), z);
        assert_eq!(parse_since("2026-11-28T00:34:04.5-05:30").unwrap(), z);
        assert_eq!(parse_since("2026-11-28T06:04:04.5").unwrap(), z);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("2026-11-28T07:04:04+1x:00").is_err());
    }
}
