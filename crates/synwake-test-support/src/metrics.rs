//! Reading the Prometheus text of GET /metrics.

/// The value of an unlabelled-or-labelled metric line `name{labels} value`, if present;
/// `series` is matched exactly as rendered.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The text of GET /metrics.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of one series, `name{labels}` exactly as rendered; 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        metric(&self.0, series).unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exact_series_only() {
        let text = "# HELP x\nsynwake_a 3\nsynwake_a_total 4\nsynwake_b{function=\"f\"} 2.5\n";
        assert_eq!(metric(text, "synwake_a"), Some(3.0));
        assert_eq!(metric(text, "synwake_b{function=\"f\"}"), Some(2.5));
        assert_eq!(Metrics(text.into()).get("synwake_c"), 0.0);
    }
}
