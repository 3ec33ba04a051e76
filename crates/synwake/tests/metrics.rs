//! GET /metrics read by real parsers (Python prometheus_client, Debian
//! python3-prometheus-client): its strict OpenMetrics parser for what Prometheus negotiates,
//! and its Prometheus text parser for every other client (curl, Telegraf).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

/// What Prometheus 2.x/3.x sends when scraping.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Parses `text` with prometheus_client (`openmetrics` or the text parser) and returns
/// "F <family> <type>" and "S <sample>{<sorted labels>} <value>" lines; panics when the
/// parser rejects the document.
const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families as text
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
parse = om if sys.argv[1] == "openmetrics" else text
for f in parse(sys.stdin.read()):
    print("F", f.name, f.type)
    for s in f.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print("S", s.name + "{" + labels + "}", float(s.value))
"#;

fn parse(py: &str, format: &str, text: &str) -> BTreeSet<String> {
    let mut child = Command::new(py)
        .args(["-c", PARSE, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn metrics_parse_as_openmetrics_for_prometheus_and_as_text_for_other_clients() {
    let Some(py) = gate::python_with("metrics", "prometheus_client", "python3-prometheus-client")
    else {
        return;
    };
    let d = Daemon::start(&function("f", ""));
    assert_eq!(d.call("f", "/pid").status, 200);
    let auth = d.auth();
    let get = |accept: Option<&str>| {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(accept.map(|a| ("accept", a)));
        let r = request(loopback(d.api), "GET", "/metrics", &headers, None).expect("GET /metrics");
        assert_eq!(r.status, 200);
        (r.header("content-type").unwrap_or("").to_string(), r.text())
    };

    let (ct, om) = get(Some(PROMETHEUS_ACCEPT));
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    assert!(om.ends_with("# EOF\n"));
    let from_om = parse(py, "openmetrics", &om);

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (ct, text) = get(accept);
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "{accept:?}: {ct}"
        );
        assert!(!text.contains("# EOF"));
        // The same families, types and samples as the OpenMetrics document: a counter's
        // TYPE line names its samples, or the text parser would call it untyped.
        assert_eq!(parse(py, "text", &text), from_om, "{accept:?}:\n{text}");
    }

    for line in [
        "F synwake_function_invocations counter",
        "S synwake_function_invocations_total{code=\"200\",function=\"f\"} 1.0",
        "F synwake_function_request_duration_seconds histogram",
        "S synwake_function_request_duration_seconds_count{function=\"f\"} 1.0",
        "S synwake_function_request_duration_seconds_bucket{function=\"f\",le=\"+Inf\"} 1.0",
        "F synwake_cold_starts counter",
        "S synwake_cold_starts_total{function=\"f\",trigger=\"request\"} 1.0",
        "F synwake_instances gauge",
        "S synwake_instances{function=\"f\"} 1.0",
        "F synwake_probe_events counter",
        "S synwake_probe_events_total{} 0.0",
        "F synwake_async_queued_bytes gauge",
        "F synwake_async_log_syncs counter",
    ] {
        assert!(from_om.contains(line), "{line} not parsed from\n{om}");
    }
}
