//! The `[probe]` section of the daemon's config.

use serde::Deserialize;

/// How the probe attaches to an interface (`[probe] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native XDP, else TC (TCX, else netlink clsact), else generic (SKB) XDP, per interface.
    #[default]
    Auto,
    /// XDP only: native, else generic.
    Xdp,
    /// TC ingress only: TCX, else netlink clsact.
    Tc,
    /// No probe: the daemon wakes on `accept` and `request` only.
    Off,
}

/// Where and how to attach the probe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Attach mode; default `auto`.
    #[serde(default)]
    pub mode: AttachMode,
    /// Interfaces to attach to; `None` (the default) means every interface that is up,
    /// `lo` included. Named interfaces must all attach; of the default set, those that
    /// cannot are skipped with a warning.
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_lowercase_modes_and_defaults() {
        let config: ProbeConfig =
            serde_json::from_str(r#"{"mode":"tc","interfaces":["lo"]}"#).unwrap();
        assert_eq!(config.mode, AttachMode::Tc);
        assert_eq!(config.interfaces, Some(vec!["lo".to_string()]));
        let config: ProbeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, ProbeConfig::default());
        assert_eq!(config.mode, AttachMode::Auto);
        for (text, mode) in [
            ("\"auto\"", AttachMode::Auto),
            ("\"xdp\"", AttachMode::Xdp),
            ("\"off\"", AttachMode::Off),
        ] {
            assert_eq!(serde_json::from_str::<AttachMode>(text).unwrap(), mode);
        }
        assert!(serde_json::from_str::<AttachMode>("\"XDP\"").is_err());
    }
}
