//! `POST|PUT /system/functions?progress=true`: the deploy's pull progress streamed while
//! it happens, as NDJSON, then the deploy's outcome. Plain deploys (faas-cli) are unchanged.
//!
//! Lines: `{"progress": "<text>"}` for each progress line of this function's pull, then
//! one `{"status": <HTTP status of the deploy>, "message": "<its answer>"}`. The HTTP
//! status of the stream itself is 200.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::broadcast;

use crate::gateway::ProxyBody;
use crate::logs::LogLine;

fn line(v: serde_json::Value) -> Bytes {
    let mut b = serde_json::to_vec(&v).expect("json");
    b.push(b'\n');
    Bytes::from(b)
}

/// Streams `function`'s pull lines from `logs` (subscribed before the deploy began) until
/// `deploy` finishes, then its outcome. The deploy runs to its end even if the client
/// goes away.
pub fn stream(
    function: String,
    mut logs: broadcast::Receiver<LogLine>,
    deploy: tokio::task::JoinHandle<Response<ProxyBody>>,
) -> Response<ProxyBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut deploy = deploy;
        let progress = |l: &LogLine| {
            (l.name == function && l.instance == "pull")
                .then(|| line(serde_json::json!({ "progress": l.text })))
        };
        let outcome = loop {
            tokio::select! {
                r = &mut deploy => break r,
                l = logs.recv() => match l {
                    Ok(l) => {
                        if let Some(b) = progress(&l) {
                            // A client that went away stops the stream, not the deploy.
                            let _ = tx.send(b).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break (&mut deploy).await,
                },
            }
        };
        while let Ok(l) = logs.try_recv() {
            if let Some(b) = progress(&l) {
                let _ = tx.send(b).await;
            }
        }
        let (status, message) = match outcome {
            Ok(resp) => {
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                (status, String::from_utf8_lossy(&body).trim().to_string())
            }
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("deploy failed: {e}"),
            ),
        };
        let _ = tx
            .send(line(
                serde_json::json!({ "status": status.as_u16(), "message": message }),
            ))
            .await;
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let b = rx.recv().await?;
        Some((Ok::<_, crate::gateway::BodyError>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(ProxyBody::boxed(StreamBody::new(body)))
        .unwrap()
}
