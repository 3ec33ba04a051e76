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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How a [`ToolStore::build`] image differs from plain busybox.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec<'a> {
    /// Start from this already built image (`localhost/name:tag`) instead of `scratch`
    /// plus busybox; the base's layers are then shared.
    pub from: Option<&'a str>,
    /// Files added in a layer of their own: (path in the image, mode, content).
    pub files: Vec<(&'a str, u32, &'a [u8])>,
    /// `Cmd`. Default: `httpd -f -p 8080 -h /www`.
    pub cmd: Option<Vec<&'a str>>,
    /// `Entrypoint`. Default: `/bin/busybox`.
    pub entrypoint: Option<Vec<&'a str>>,
    /// `Env` entries (`KEY`, `value`).
    pub env: Vec<(&'a str, &'a str)>,
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
        let c = run(from.arg(base))?.trim().to_string();
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
            let entrypoint = spec
                .entrypoint
                .clone()
                .unwrap_or_else(|| vec!["/bin/busybox"]);
            let entrypoint_json = serde_json::to_string(&entrypoint).expect("strings serialize");
            let mut config = self.buildah();
            config.args([
                "config",
                "--entrypoint",
                &entrypoint_json,
                "--cmd",
                &cmd_json,
                "--port",
                "8080",
            ]);
            for (k, v) in &spec.env {
                config.arg("--env").arg(format!("{k}={v}"));
            }
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

/// A real registry: Debian's `docker-registry` (distribution 2.8) on `127.0.0.1:<free
/// port>`, plain HTTP or TLS with a test CA and htpasswd (bcrypt) auth. Killed and its
/// storage removed on drop.
pub struct Registry {
    child: std::process::Child,
    dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The test CA (PEM), for TLS registries.
    pub ca_file: Option<PathBuf>,
    /// `(user, password)` accepted by a TLS registry.
    pub credentials: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry; `tls_auth` adds TLS (a fresh CA and a certificate for
    /// 127.0.0.1) and htpasswd auth for user `synwake`.
    pub fn start(tls_auth: bool) -> Result<Self, ToolError> {
        let dir = tempfile::Builder::new()
            .prefix("swk-images-registry-")
            .tempdir()
            .map_err(|e| tool_err("tempdir", e))?;
        let d = dir.path();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| tool_err("free port", e))?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            d.join("storage").display()
        );
        let (mut ca_file, mut credentials) = (None, None);
        if tls_auth {
            let ca_key = d.join("ca.key");
            let ca = d.join("ca.pem");
            run(Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=synwake test CA",
                    "-keyout",
                ])
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca))?;
            let key = d.join("server.key");
            let csr = d.join("server.csr");
            run(Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&csr))?;
            let ext = d.join("ext.cnf");
            std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
                .map_err(|e| tool_err("ext.cnf", e))?;
            let cert = d.join("server.pem");
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert))?;
            let password = format!("pw-{}", std::process::id());
            // bcrypt cost 4: the registry checks it on every request.
            let hash = run(Command::new("/usr/bin/python3").args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
                &password,
            ]))?
            .trim()
            .to_string();
            let htpasswd = d.join("htpasswd");
            std::fs::write(&htpasswd, format!("synwake:{hash}\n"))
                .map_err(|e| tool_err("htpasswd", e))?;
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: synwake-test\n    path: {}\n",
                cert.display(),
                key.display(),
                htpasswd.display()
            ));
            ca_file = Some(ca);
            credentials = Some(("synwake".to_string(), password));
        }
        let cfg_path = d.join("config.yml");
        std::fs::write(&cfg_path, cfg).map_err(|e| tool_err("config.yml", e))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.join("registry.log")).map_err(|e| tool_err("log", e))?)
            .spawn()
            .map_err(|e| tool_err("docker-registry serve", e))?;
        let reg = Registry {
            child,
            dir,
            addr,
            ca_file,
            credentials,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&reg.addr).is_ok() {
                return Ok(reg);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Err(ToolError {
            command: "docker-registry serve".into(),
            stderr: std::fs::read_to_string(reg.dir.path().join("registry.log"))
                .unwrap_or_default(),
        })
    }

    /// The registry's storage root (to corrupt blobs in tests).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn dest_args(&self) -> Vec<String> {
        let mut a = vec!["--dest-tls-verify=false".to_string()];
        if let Some((u, p)) = &self.credentials {
            a.push(format!("--dest-creds={u}:{p}"));
        }
        a
    }

    /// `skopeo copy SRC docker://<addr>/<repo_tag>` (e.g. SRC = `oci-archive:/x.tar`).
    pub fn push(&self, src: &str, repo_tag: &str, extra: &[&str]) -> Result<(), ToolError> {
        run(Command::new("skopeo")
            .args(["copy", "-q"])
            .args(self.dest_args())
            .args(extra)
            .arg(src)
            .arg(format!("docker://{}/{repo_tag}", self.addr)))
        .map(drop)
    }

    /// Pushes a multi-platform index made of `images` (built in `store`) as `repo_tag`.
    pub fn push_index(
        &self,
        store: &ToolStore,
        images: &[&str],
        repo_tag: &str,
    ) -> Result<(), ToolError> {
        let list = format!("localhost/swk-images-list-{}", std::process::id());
        let _ = run(store.buildah().args(["manifest", "rm", &list]));
        run(store.buildah().args(["manifest", "create", &list]))?;
        for i in images {
            run(store.buildah().args(["manifest", "add", &list, i]))?;
        }
        let mut push = store.buildah();
        push.args(["manifest", "push", "-q", "--all", "--tls-verify=false"]);
        if let Some((u, p)) = &self.credentials {
            push.arg(format!("--creds={u}:{p}"));
        }
        run(push
            .arg(&list)
            .arg(format!("docker://{}/{repo_tag}", self.addr)))
        .map(drop)
    }

    /// The manifest digest skopeo sees for `repo_tag` (no platform resolution: an index's
    /// own digest for an index).
    pub fn digest(&self, repo_tag: &str) -> Result<String, ToolError> {
        let mut c = Command::new("skopeo");
        c.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some((u, p)) = &self.credentials {
            c.arg(format!("--creds={u}:{p}"));
        }
        let raw = run(c.arg(format!("docker://{}/{repo_tag}", self.addr)))?;
        Ok(format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(raw.as_bytes()))
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool_err(what: &str, e: std::io::Error) -> ToolError {
    ToolError {
        command: what.to_string(),
        stderr: e.to_string(),
    }
}
