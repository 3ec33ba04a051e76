//! Test images made by the real tools (Debian's `buildah`, `podman`, `skopeo`), not by our
//! own fixture code: a busybox image built from scratch, saved and copied in every format
//! a user brings. Each [`ToolStore`] keeps its own container storage in a temporary
//! directory (removed on drop), so tests never touch the host's image storage.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixture::BUSYBOX;

/// The tools a real-tool test needs; the first one missing, if any.
pub fn missing_tool() -> Option<&'static str> {
    ["buildah", "podman", "skopeo"].into_iter().find(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    })
}

/// A private buildah/podman storage (vfs driver) under a temporary directory.
pub struct ToolStore {
    dir: tempfile::TempDir,
}

/// A tool run failed: the command and its stderr.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {stderr}")]
pub struct ToolError {
    /// The command line that failed.
    pub command: String,
    /// What it printed on stderr (or the spawn error).
    pub stderr: String,
}

fn run(cmd: &mut Command) -> Result<String, ToolError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ToolError {
        command: command.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ToolError {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// How a [`ToolStore::build`] image differs from plain busybox.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec<'a> {
    /// Start from this already built image (`localhost/name:tag`) instead of `scratch`
    /// plus busybox; the base's layers are then shared.
    pub from: Option<&'a str>,
    /// Files added in a layer of their own: (path in the image, mode, content).
    pub files: Vec<(&'a str, u32, &'a [u8])>,
    /// `Cmd`; the entrypoint is `/bin/busybox`. Default: `httpd -f -p 8080 -h /www`.
    pub cmd: Option<Vec<&'a str>>,
    /// `OS/arch` to record in the config (default: this host's).
    pub arch: Option<&'a str>,
}

impl ToolStore {
    /// A new empty storage.
    pub fn new() -> std::io::Result<Self> {
        Ok(ToolStore {
            dir: tempfile::Builder::new()
                .prefix("swk-images-tools-")
                .tempdir()?,
        })
    }

    /// Where the storage lives (for building further paths next to it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn storage_args(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            "--root".into(),
            d.join("root").display().to_string(),
            "--runroot".into(),
            d.join("run").display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
        ]
    }

    fn buildah(&self) -> Command {
        let mut c = Command::new("buildah");
        c.args(self.storage_args());
        c
    }

    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.args(self.storage_args());
        c
    }

    /// Builds `name` (e.g. `localhost/fn:1`) with buildah: from scratch with Debian's
    /// static busybox copied in (or from `spec.from`), plus `spec.files`, entrypoint
    /// `/bin/busybox`, port 8080.
    pub fn build(&self, name: &str, spec: &BuildSpec) -> Result<(), ToolError> {
        let base = spec.from.unwrap_or("scratch");
        let mut from = self.buildah();
        from.args(["from", "--pull-never"]);
        if let Some(arch) = spec.arch {
            from.args(["--arch", arch]);
        }
        let c = run(from.arg(base))?;
        let result = (|| {
            if spec.from.is_none() {
                run(self.buildah().args(["copy", &c, BUSYBOX, "/bin/busybox"]))?;
                let www = self.dir.path().join("www");
                std::fs::create_dir_all(&www).map_err(|e| ToolError {
                    command: format!("mkdir {}", www.display()),
                    stderr: e.to_string(),
                })?;
                std::fs::write(www.join("index.html"), "hello from a buildah image\n").map_err(
                    |e| ToolError {
                        command: "write index.html".into(),
                        stderr: e.to_string(),
                    },
                )?;
                run(self
                    .buildah()
                    .args(["copy", &c])
                    .arg(www.join("index.html"))
                    .arg("/www/index.html"))?;
            }
            if !spec.files.is_empty() {
                let staging = tempfile::tempdir_in(self.dir.path()).map_err(|e| ToolError {
                    command: "staging dir".into(),
                    stderr: e.to_string(),
                })?;
                for (path, mode, data) in &spec.files {
                    let host = staging.path().join(path.trim_start_matches('/'));
                    std::fs::create_dir_all(host.parent().unwrap()).ok();
                    std::fs::write(&host, data).ok();
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(*mode)).ok();
                }
                // One `copy` of the staging dir: all files land in one layer.
                run(self
                    .buildah()
                    .args(["copy", &c])
                    .arg(format!("{}/", staging.path().display()))
                    .arg("/"))?;
            }
            let cmd = spec
                .cmd
                .clone()
                .unwrap_or_else(|| vec!["httpd", "-f", "-p", "8080", "-h", "/www"]);
            let cmd_json = serde_json::to_string(&cmd).expect("strings serialize");
            let mut config = self.buildah();
            config.args([
                "config",
                "--entrypoint",
                r#"["/bin/busybox"]"#,
                "--cmd",
                &cmd_json,
                "--port",
                "8080",
            ]);
            if let Some(arch) = spec.arch {
                config.args(["--arch", arch]);
            }
            run(config.arg(&c))?;
            run(self.buildah().args(["commit", "-q", &c, name]))?;
            Ok(())
        })();
        let _ = run(self.buildah().args(["rm", &c]));
        result
    }

    /// `buildah push NAME DEST` (e.g. `oci-archive:/x.tar`, `docker-archive:/x.tar:n:t`,
    /// `oci:/dir:tag`).
    pub fn buildah_push(&self, name: &str, dest: &str) -> Result<(), ToolError> {
        run(self.buildah().args(["push", "-q", name, dest])).map(drop)
    }

    /// `podman save --format FORMAT -o FILE NAME` (`oci-archive` or `docker-archive`).
    pub fn podman_save(&self, name: &str, format: &str, file: &Path) -> Result<(), ToolError> {
        run(self
            .podman()
            .args(["save", "-q", "--format", format, "-o"])
            .arg(file)
            .arg(name))
        .map(drop)
    }

    /// `skopeo copy [ARGS...] SRC DEST`, with this store's storage for `containers-storage:`.
    pub fn skopeo_copy(&self, args: &[&str], src: &str, dest: &str) -> Result<(), ToolError> {
        run(Command::new("skopeo")
            .args(["copy", "-q"])
            .args(args)
            .arg(src)
            .arg(dest))
        .map(drop)
    }

    /// The path of a file next to the storage (removed with it).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
