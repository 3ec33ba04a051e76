//! `synwake tag`: the client side of trigger `tcp_option`. A sockops program on a cgroup v2
//! puts the synwake option (the function's id) into the SYNs its processes send to the
//! configured destinations, so synwake's probe wakes that function on the SYN, on any port.
//!
//! Two forms: `synwake tag --function NAME --dest ADDR:PORT -- COMMAND` runs COMMAND in a
//! fresh cgroup and exits with its status; `synwake tag --config FILE` tags a cgroup (by
//! default every process on the host) until SIGINT/SIGTERM. Both hold the attachment as a
//! bpf_link, so it is gone when the process is, kill -9 included.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use serde::Deserialize;
use synwake_ebpf::cgroup::{self, TagCgroup};
use synwake_ebpf::{TagDestination, TagError, TagStats, Tagger};
use toml::Spanned;

use crate::config::ConfigError;
use crate::spec::{function_id, validate_name};

/// Errors of `synwake tag`.
#[derive(Debug, thiserror::Error)]
pub enum TagCommandError {
    #[error("--function: {0}")]
    Function(String),
    #[error("--dest is required (at least one ADDR:PORT whose SYNs are tagged)")]
    NoDestination,
    #[error("no COMMAND after `--`")]
    NoCommand,
    /// The `--config` file: the same error shape as the daemon's config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tagger(#[from] TagError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("cannot run {command:?}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for signals failed")]
    Signals {
        #[source]
        source: std::io::Error,
    },
}

/// One destination whose SYNs name a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    pub destination: TagDestination,
    pub function: String,
}

/// The `--config` file, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagConfig {
    /// The cgroup v2 directory to tag (`None`: the hierarchy's root, every process).
    pub cgroup: Option<PathBuf>,
    pub rules: Vec<TagRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTagConfig {
    cgroup: Option<Spanned<String>>,
    #[serde(default)]
    destination: Vec<RawDestination>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    dest: Spanned<String>,
    function: Spanned<String>,
}

impl TagConfig {
    /// Reads and checks a tag config; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Self, TagCommandError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::parse(path, &text)?)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawTagConfig = crate::config::parse_toml(text, path)?;
        let invalid = |span: std::ops::Range<usize>, key: &str, message: String| {
            crate::config::invalid_at(text, path, span, key, message)
        };
        let cgroup = match raw.cgroup {
            Some(c) => {
                let value = c.get_ref();
                if value.is_empty() || value.split('/').any(|part| part == "..") {
                    return Err(invalid(
                        c.span(),
                        "cgroup",
                        "must be a cgroup v2 directory, without `..`".into(),
                    ));
                }
                Some(PathBuf::from(value))
            }
            None => None,
        };
        if raw.destination.is_empty() {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: "no [[destination]]: nothing to tag".into(),
            });
        }
        let mut rules = Vec::new();
        for d in raw.destination {
            validate_name(d.function.get_ref())
                .map_err(|m| invalid(d.function.span(), "destination.function", m))?;
            let destination: TagDestination =
                d.dest
                    .get_ref()
                    .parse()
                    .map_err(|e: synwake_ebpf::DestinationError| {
                        invalid(d.dest.span(), "destination.dest", e.to_string())
                    })?;
            if let Some(first) = rules
                .iter()
                .find(|r: &&TagRule| r.destination == destination)
            {
                return Err(invalid(
                    d.dest.span(),
                    "destination.dest",
                    format!("{destination} is already tagged for {}", first.function),
                ));
            }
            rules.push(TagRule {
                destination,
                function: d.function.into_inner(),
            });
        }
        Ok(Self { cgroup, rules })
    }
}

/// Signals the tagger waits for instead of handling them (blocked, then `sigwaitinfo`).
fn waited_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the waited signals in the calling thread; returns the previous mask. Called
/// while the process has one thread, so the mask is the process's.
fn block_signals() -> libc::sigset_t {
    let set = waited_signals();
    // SAFETY: valid sets; pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// The next waited signal, or `None` after `timeout` (or an interruption).
fn wait_signal(timeout: Option<std::time::Duration>) -> Result<Option<i32>, TagCommandError> {
    let set = waited_signals();
    // SAFETY: valid set and timespec; siginfo is an out-parameter we ignore.
    let rc = unsafe {
        match timeout {
            Some(t) => {
                let ts = libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: t.subsec_nanos() as libc::c_long,
                };
                libc::sigtimedwait(&set, std::ptr::null_mut(), &ts)
            }
            None => libc::sigwaitinfo(&set, std::ptr::null_mut()),
        }
    };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(TagCommandError::Signals { source: error }),
        };
    }
    Ok(Some(rc))
}

fn loaded_tagger(rules: &[TagRule]) -> Result<Tagger, TagCommandError> {
    let mut tagger = Tagger::load()?;
    for rule in rules {
        tagger.tag(&rule.destination, function_id(&rule.function))?;
    }
    Ok(tagger)
}

fn report_stats(stats: TagStats) {
    if stats.untagged_full > 0 {
        eprintln!(
            "synwake tag: {} connection(s) went out untagged: the SYN's 40 option bytes were full",
            stats.untagged_full
        );
    }
}

/// `synwake tag --function NAME --dest ADDR:PORT ... -- COMMAND ARGS...`: runs COMMAND in a
/// fresh cgroup whose SYNs to `destinations` carry NAME's id; returns COMMAND's exit code
/// (128 + signal when a signal ended it). The cgroup, with anything COMMAND left running
/// in it, is removed before returning. Call it while the process has a single thread.
pub fn run_command(
    function: &str,
    destinations: &[TagDestination],
    command: &[OsString],
) -> Result<i32, TagCommandError> {
    validate_name(function).map_err(TagCommandError::Function)?;
    if destinations.is_empty() {
        return Err(TagCommandError::NoDestination);
    }
    let (program, args) = command.split_first().ok_or(TagCommandError::NoCommand)?;
    let rules: Vec<TagRule> = destinations
        .iter()
        .map(|d| TagRule {
            destination: *d,
            function: function.to_string(),
        })
        .collect();
    let old_mask = block_signals();
    let root = cgroup::cgroup2_root()?;
    let group = TagCgroup::create(&root)?;
    let mut tagger = loaded_tagger(&rules)?;
    tagger.attach_cgroup(group.path())?;
    let procs = group.procs_file()?;
    let procs_fd = procs.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    let mut child = Command::new(program);
    child.args(args);
    // SAFETY: only async-signal-safe calls (prctl, getppid, write, sigprocmask) between
    // fork and exec.
    unsafe {
        child.pre_exec(move || {
            // The command dies with the tagger (kill -9 too): never left running untagged.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = child.spawn().map_err(|source| TagCommandError::Spawn {
        command: program.to_string_lossy().chars().take(200).collect(),
        source,
    })?;
    drop(procs);
    let status: ExitStatus = loop {
        match wait_signal(None)? {
            Some(libc::SIGCHLD) | None => {
                if let Ok(Some(status)) = child.try_wait() {
                    break status;
                }
            }
            // Forwarded: COMMAND decides how to stop; we exit when it does.
            Some(signal) => {
                // SAFETY: kill(2) of our own child.
                unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            }
        }
    };
    report_stats(tagger.stats()?);
    drop(tagger);
    drop(group);
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    })
}

/// `synwake tag --config FILE`: tags the configured cgroup until SIGINT or SIGTERM.
/// Call it while the process has a single thread.
pub fn run_daemon(config: &TagConfig) -> Result<(), TagCommandError> {
    block_signals();
    let root = cgroup::cgroup2_root()?;
    let target = match &config.cgroup {
        None => root.clone(),
        Some(path) if path.is_absolute() => path.clone(),
        Some(path) => root.join(path),
    };
    let mut tagger = loaded_tagger(&config.rules)?;
    tagger.attach_cgroup(&target)?;
    for rule in &config.rules {
        eprintln!(
            "synwake tag: SYNs from cgroup {} to {} carry function {} (id {:08x})",
            target.display(),
            rule.destination,
            rule.function,
            function_id(&rule.function)
        );
    }
    let mut last = TagStats::default();
    loop {
        match wait_signal(Some(std::time::Duration::from_secs(60)))? {
            Some(libc::SIGINT) | Some(libc::SIGTERM) | Some(libc::SIGQUIT) => break,
            _ => {
                let stats = tagger.stats()?;
                if stats != last {
                    eprintln!(
                        "synwake tag: {} SYNs tagged, {} connections untagged (option space full)",
                        stats.tagged_syns, stats.untagged_full
                    );
                    last = stats;
                }
            }
        }
    }
    let stats = tagger.stats()?;
    eprintln!(
        "synwake tag: stopping; {} SYNs tagged, {} connections untagged (option space full)",
        stats.tagged_syns, stats.untagged_full
    );
    Ok(())
}

/// The tagging section of `synwake doctor`.
pub fn doctor() -> String {
    let mut out = String::new();
    let mut line = |ok: bool, what: &str, detail: String| {
        out.push_str(&format!(
            "  [{}] {what}: {detail}\n",
            if ok { " ok " } else { "MISS" }
        ));
    };
    let mounted = cgroup::mounted_cgroup2();
    line(
        true,
        "cgroup2 hierarchy",
        match &mounted {
            Some(path) => format!("mounted at {}", path.display()),
            None => format!(
                "not mounted here; `synwake tag` mounts one at {}",
                cgroup::PRIVATE_CGROUP2_MOUNT
            ),
        },
    );
    let tagger = Tagger::load();
    line(
        tagger.is_ok(),
        "sockops tagger verified",
        match &tagger {
            Ok(_) => "synwake_tag loaded (bpf_reserve_hdr_opt/bpf_store_hdr_opt, kernel >= 5.10)"
                .to_string(),
            Err(e) => crate::error_chain(e),
        },
    );
    if let (Ok(mut tagger), Some(root)) = (tagger, mounted) {
        // Attach to a throwaway cgroup for real: what `synwake tag -- COMMAND` does.
        let name = format!("{}doctor-{}", cgroup::TAG_CGROUP_PREFIX, std::process::id());
        let attached = TagCgroup::create_named(&root, &name)
            .map_err(TagError::from)
            .and_then(|group| tagger.attach_cgroup(group.path()));
        line(
            attached.is_ok(),
            "attach to a cgroup v2 (bpf_link)",
            match attached {
                Ok(()) => "works; detached again".into(),
                Err(e) => crate::error_chain(&e),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TagConfig, ConfigError> {
        TagConfig::parse(Path::new("tag.toml"), text)
    }

    #[test]
    fn config_maps_destinations_to_functions() {
        let config = parse(
            "cgroup = \"services/api\"\n\
             [[destination]]\ndest = \"10.1.2.3:8080\"\nfunction = \"hello\"\n\
             [[destination]]\ndest = \"[fd00::/64]:443\"\nfunction = \"img-resize\"\n",
        )
        .unwrap();
        assert_eq!(config.cgroup, Some(PathBuf::from("services/api")));
        assert_eq!(config.rules.len(), 2);
        assert_eq!(config.rules[1].destination.to_string(), "[fd00::/64]:443");
        assert_eq!(config.rules[1].function, "img-resize");
        assert_eq!(
            parse("[[destination]]\ndest = \"10.0.0.1:80\"\nfunction = \"a\"\n")
                .unwrap()
                .cgroup,
            None
        );
    }

    #[test]
    fn config_errors_name_line_and_key() {
        let e = parse("[[destination]]\ndest = \"10.1.2.3\"\nfunction = \"hello\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tag.toml:2: destination.dest: "), "{e}");
        let e = parse("[[destination]]\ndest = \"10.1.2.3:1\"\nfunction = \"Hello\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tag.toml:3: destination.function: "), "{e}");
        let e = parse(
            "[[destination]]\ndest = \"10.1.2.3:1\"\nfunction = \"a\"\n\
             [[destination]]\ndest = \"10.1.2.3:1\"\nfunction = \"b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":5:") && e.contains("already tagged for a"),
            "{e}"
        );
        let e =
            parse("cgroup = \"../x\"\n[[destination]]\ndest = \"10.1.2.3:1\"\nfunction = \"a\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("tag.toml:1: cgroup: "), "{e}");
        let e = parse("").unwrap_err().to_string();
        assert!(e.contains("no [[destination]]"), "{e}");
        let e = parse("[[destination]]\ndest = \"10.1.2.3:1\"\nfunction = \"a\"\nport = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("port"), "{e}");
    }
}
