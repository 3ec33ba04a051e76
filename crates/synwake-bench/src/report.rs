//! Results: JSON records, the markdown table with hidden fractions, and one SVG per init.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::{hidden_fraction, Summary};
use crate::{Mode, Protocol, RuntimeKind};

/// One cell of the sweep: a mode at one RTT and init time. This is the published JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub mode: Mode,
    /// What the client spoke (older records without it were plain HTTP).
    #[serde(default)]
    pub protocol: Protocol,
    pub runtime: RuntimeKind,
    pub rtt_ms: u64,
    pub init_ms: u64,
    pub runs: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Record {
    pub fn new(mode: Mode, runtime: RuntimeKind, rtt_ms: u64, init_ms: u64, s: Summary) -> Self {
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        Record {
            mode,
            protocol: Protocol::Http,
            runtime,
            rtt_ms,
            init_ms,
            runs: s.runs,
            p50_ms: r3(s.p50),
            p90_ms: r3(s.p90),
            p99_ms: r3(s.p99),
            min_ms: r3(s.min),
            max_ms: r3(s.max),
        }
    }
}

fn find(records: &[Record], mode: Mode, rtt: u64, init: u64) -> Option<&Record> {
    records
        .iter()
        .find(|r| r.mode == mode && r.rtt_ms == rtt && r.init_ms == init)
}

fn modes_in(records: &[Record]) -> Vec<Mode> {
    let set: BTreeSet<Mode> = records.iter().map(|r| r.mode).collect();
    set.into_iter().collect()
}

/// Hidden fraction of one cell from the p50s of request, syn and warm; `None` if a mode is
/// missing or the baseline paid nothing.
pub fn cell_hidden_fraction(records: &[Record], rtt: u64, init: u64) -> Option<f64> {
    let p = |m| find(records, m, rtt, init).map(|r| r.p50_ms);
    hidden_fraction(p(Mode::Request)?, p(Mode::Syn)?, p(Mode::Warm)?)
}

/// Markdown table: one row per (init, RTT), `p50 / p90` ms per mode, and the hidden fraction.
pub fn markdown_table(records: &[Record]) -> String {
    let modes = modes_in(records);
    let cells: BTreeSet<(u64, u64)> = records.iter().map(|r| (r.init_ms, r.rtt_ms)).collect();
    let mut out = String::from("| init ms | RTT ms |");
    for m in &modes {
        let _ = write!(out, " {m} p50 / p90 ms |");
    }
    out.push_str(" hidden fraction |\n|---:|---:|");
    for _ in &modes {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");
    for (init, rtt) in cells {
        let _ = write!(out, "| {init} | {rtt} |");
        for &m in &modes {
            match find(records, m, rtt, init) {
                Some(r) => {
                    let _ = write!(out, " {:.1} / {:.1} |", r.p50_ms, r.p90_ms);
                }
                None => out.push_str(" – |"),
            }
        }
        match cell_hidden_fraction(records, rtt, init) {
            Some(h) => {
                let _ = write!(out, " {h:.2} |");
            }
            None => out.push_str(" n/a |"),
        }
        out.push('\n');
    }
    out
}

fn mode_style(mode: Mode) -> (&'static str, &'static str) {
    match mode {
        Mode::Request => ("#d62728", ""),
        Mode::Accept => ("#ff7f0e", ""),
        Mode::Syn => ("#2ca02c", ""),
        Mode::Sni => ("#1f77b4", ""),
        Mode::Warm => ("#555555", " stroke-dasharray=\"6 4\""),
        Mode::Tagged => ("#9467bd", ""),
        Mode::Affinity => ("#8c564b", "4,2"),
    }
}

/// A "nice" axis step (1, 2 or 5 times a power of ten) giving about `target` ticks.
fn nice_step(max: f64, target: f64) -> f64 {
    let raw = (max / target).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// SVG line plot for one init time: p50 latency against RTT, one line per mode (warm
/// dashed as the reference). Hand-written so the harness needs no plotting dependency.
pub fn svg_plot(records: &[Record], init: u64, runtime: RuntimeKind) -> String {
    let rows: Vec<&Record> = records.iter().filter(|r| r.init_ms == init).collect();
    let (w, h) = (740.0, 440.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 55.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_x = rows.iter().map(|r| r.rtt_ms).max().unwrap_or(1).max(1) as f64;
    let max_y_raw = rows.iter().map(|r| r.p50_ms).fold(1.0, f64::max);
    let ystep = nice_step(max_y_raw, 6.0);
    let max_y = (max_y_raw / ystep).ceil() * ystep;
    let xstep = nice_step(max_x, 8.0);
    let max_x = (max_x / xstep).ceil() * xstep;
    let sx = |x: f64| left + x / max_x * pw;
    let sy = |y: f64| top + ph - y / max_y * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Cold-start latency vs RTT — init {init} ms, runtime {runtime} (p50)</text>",
        left + pw / 2.0
    );
    // Grid and ticks.
    let mut y = 0.0;
    while y <= max_y + 1e-9 {
        let py = sy(y);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e5e5e5\"/>",
            left + pw
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            py + 4.0,
            fmt_tick(y)
        );
        y += ystep;
    }
    let mut x = 0.0;
    while x <= max_x + 1e-9 {
        let px = sx(x);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{top}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#f0f0f0\"/>",
            top + ph
        );
        let _ = writeln!(
            s,
            "<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + ph + 18.0,
            fmt_tick(x)
        );
        x += xstep;
    }
    let _ = writeln!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">emulated RTT (ms)</text>",
        left + pw / 2.0,
        h - 12.0
    );
    let _ = writeln!(s, "<text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">client latency, connect to last byte (ms)</text>", top + ph / 2.0);

    for (i, mode) in modes_in(&rows.iter().map(|r| (*r).clone()).collect::<Vec<_>>())
        .into_iter()
        .enumerate()
    {
        let (color, dash) = mode_style(mode);
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| (r.rtt_ms as f64, r.p50_ms))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in &pts {
            let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{mode} RTT {x} ms: p50 {y:.2} ms</title></circle>", sx(*x), sy(*y));
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = left + pw + 15.0;
        let _ = writeln!(s, "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>", lx + 24.0);
        let label = if mode == Mode::Warm {
            "warm (reference)".to_string()
        } else {
            mode.to_string()
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">{label}</text>",
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_the_protocol_and_old_ones_read_as_http() {
        let s = Summary::from_durations(&[std::time::Duration::from_millis(5)]).unwrap();
        let mut r = Record::new(Mode::Sni, RuntimeKind::Process, 50, 75, s);
        r.protocol = Protocol::Tls13;
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"protocol\":\"tls1.3\""), "{json}");
        assert!(json.contains("\"mode\":\"sni\""), "{json}");
        let old = json.replace("\"protocol\":\"tls1.3\",", "");
        let back: Record = serde_json::from_str(&old).unwrap();
        assert_eq!(back.protocol, Protocol::Http);
    }

    fn rec(mode: Mode, rtt: u64, p50: f64) -> Record {
        Record::new(
            mode,
            RuntimeKind::Process,
            rtt,
            50,
            Summary::from_ms(&[p50]).unwrap(),
        )
    }

    #[test]
    fn json_record_has_exactly_the_published_fields() {
        let r = Record::new(
            Mode::Syn,
            RuntimeKind::OciPool,
            20,
            50,
            Summary::from_ms(&[1.0, 2.0, 3.0]).unwrap(),
        );
        let v = serde_json::to_value(&r).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "init_ms", "max_ms", "min_ms", "mode", "p50_ms", "p90_ms", "p99_ms", "protocol",
                "rtt_ms", "runs", "runtime"
            ]
        );
        assert_eq!(obj["mode"], "syn");
        assert_eq!(obj["runtime"], "oci-pool");
        assert!(obj["rtt_ms"].is_u64() && obj["init_ms"].is_u64() && obj["runs"].is_u64());
        for k in ["p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms"] {
            assert!(obj[k].is_f64(), "{k} should be a number");
        }
        assert_eq!(obj["p50_ms"], 2.0);
        let back: Record = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn json_rejects_unknown_modes_and_fields() {
        let good = r#"{"mode":"warm","runtime":"process","rtt_ms":0,"init_ms":0,"runs":1,"p50_ms":1,"p90_ms":1,"p99_ms":1,"min_ms":1,"max_ms":1}"#;
        assert!(serde_json::from_str::<Record>(good).is_ok());
        assert!(serde_json::from_str::<Record>(&good.replace("warm", "lukewarm")).is_err());
        assert!(
            serde_json::from_str::<Record>(&good.replace("\"runs\"", "\"extra\":1,\"runs\""))
                .is_err()
        );
    }

    #[test]
    fn table_has_a_row_per_cell_and_the_hidden_fraction() {
        let records = vec![
            rec(Mode::Request, 100, 260.0),
            rec(Mode::Syn, 100, 210.0),
            rec(Mode::Warm, 100, 210.0),
            rec(Mode::Request, 0, 60.0),
            rec(Mode::Warm, 0, 1.0),
        ];
        let t = markdown_table(&records);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("request p50 / p90 ms") && lines[0].contains("hidden fraction"));
        assert!(
            lines[2].starts_with("| 50 | 0 |") && lines[2].ends_with("n/a |"),
            "{t}"
        );
        assert!(
            lines[3]
                .starts_with("| 50 | 100 | 260.0 / 260.0 | 210.0 / 210.0 | 210.0 / 210.0 | 1.00 |"),
            "{t}"
        );
    }

    #[test]
    fn svg_has_one_line_per_mode() {
        let records = vec![
            rec(Mode::Request, 0, 60.0),
            rec(Mode::Request, 10, 80.0),
            rec(Mode::Warm, 0, 1.0),
            rec(Mode::Warm, 10, 21.0),
        ];
        let svg = svg_plot(&records, 50, RuntimeKind::Process);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("warm (reference)"));
    }
}
