//! Tiny test images written from Rust: Debian's static busybox plus an HTTP function
//! (`busybox httpd` serving CGI shell scripts), as oci-archive or docker-archive. Used by
//! this crate's tests and benchmark, and usable by the daemon's tests.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where Debian's `busybox-static` puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Port the fixture function listens on.
pub const FUNCTION_PORT: u16 = 8080;

/// CGI: prints this process' mount and network namespace ids.
pub const CGI_NS: &str = "#!/bin/sh\n\
echo 'Content-Type: text/plain'\n\
echo\n\
echo \"mnt=$(/bin/busybox readlink /proc/self/ns/mnt)\"\n\
echo \"net=$(/bin/busybox readlink /proc/self/ns/net)\"\n";

/// CGI: allocates and touches 256 MiB (dd's block buffer), to trip a memory limit.
pub const CGI_EAT: &str = "#!/bin/sh\n\
echo 'Content-Type: text/plain'\n\
echo\n\
/bin/busybox dd if=/dev/zero of=/dev/null bs=256M count=4 2>&1\n\
echo survived\n";

/// One layer of an archive.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// Store it gzip-compressed.
    pub gzip: bool,
    /// Override the descriptor's media type (oci-archive), e.g. to test refusal.
    pub media_type: Option<String>,
}

impl Layer {
    /// A layer from an uncompressed tar.
    pub fn new(tar: Vec<u8>, gzip: bool) -> Self {
        Layer {
            tar,
            gzip,
            media_type: None,
        }
    }

    fn blob(&self) -> io::Result<Vec<u8>> {
        if self.gzip {
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&self.tar)?;
            gz.finish()
        } else {
            Ok(self.tar.clone())
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    let _ = h.set_path(path);
    h
}

/// Builds layer tars entry by entry, including entries `tar::Builder` would refuse
/// (`..`, absolute paths), so refusal can be tested.
#[derive(Default)]
pub struct TarBuilder {
    out: Vec<u8>,
}

impl TarBuilder {
    /// An empty tar.
    pub fn new() -> Self {
        Self::default()
    }

    fn raw(&mut self, mut h: tar::Header, path: &str, data: &[u8]) -> &mut Self {
        // Write the name bytes directly: set_path refuses `..` and absolute paths.
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// A directory.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        let h = header("x", tar::EntryType::Directory, 0o755, 0);
        self.raw(h, path, &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let h = header("x", tar::EntryType::Regular, mode, data.len() as u64);
        self.raw(h, path, data)
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header("x", tar::EntryType::Symlink, 0o777, 0);
        let link = &mut h.as_old_mut().linkname;
        link[..target.len()].copy_from_slice(target.as_bytes());
        self.raw(h, path, &[])
    }

    /// A hard link to an earlier entry.
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header("x", tar::EntryType::Link, 0o644, 0);
        let link = &mut h.as_old_mut().linkname;
        link[..target.len()].copy_from_slice(target.as_bytes());
        self.raw(h, path, &[])
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header("x", tar::EntryType::Char, 0o666, 0);
        let _ = h.set_device_major(major);
        let _ = h.set_device_minor(minor);
        self.raw(h, path, &[])
    }

    /// The finished tar (with the two zero end blocks).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// The busybox HTTP function layer: `/bin/busybox`, `/bin/sh`, `/etc/passwd`, `/www` with
/// `index.html` and the CGIs `/cgi-bin/ns` and `/cgi-bin/eat`.
pub fn busybox_layer() -> io::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX)?;
    let mut t = TarBuilder::new();
    t.dir("bin")
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .dir("etc")
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .dir("tmp")
        .dir("www")
        .file("www/index.html", 0o644, b"hello from synwake-oci\n")
        .dir("www/cgi-bin")
        .file("www/cgi-bin/ns", 0o755, CGI_NS.as_bytes())
        .file("www/cgi-bin/eat", 0o755, CGI_EAT.as_bytes());
    Ok(t.finish())
}

/// The image config for `layers`: busybox httpd in the foreground on [`FUNCTION_PORT`].
pub fn function_config(layers: &[Layer]) -> Value {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256(&l.tar)))
        .collect();
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["httpd", "-f", "-p", FUNCTION_PORT.to_string(), "-h", "/www"],
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/www",
            "User": "root"
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids }
    })
}

fn add_file(b: &mut tar::Builder<std::fs::File>, path: &str, data: &[u8]) -> io::Result<()> {
    let mut h = header(path, tar::EntryType::Regular, 0o644, data.len() as u64);
    h.set_cksum();
    b.append(&h, data)
}

/// What an OCI archive should leave out or break, for refusal tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct OciFaults {
    /// Omit `index.json`.
    pub no_index: bool,
    /// Omit the config blob.
    pub no_config: bool,
    /// Config descriptor media type replaced by a bogus one.
    pub bad_config_media_type: bool,
}

/// Writes an oci-archive (oci-layout, index.json, blobs/sha256/...). Returns the
/// manifest digest.
pub fn write_oci_archive(path: &Path, layers: &[Layer], config: &Value) -> io::Result<String> {
    write_oci_archive_with(path, layers, config, OciFaults::default())
}

/// [`write_oci_archive`] with deliberate faults.
pub fn write_oci_archive_with(
    path: &Path,
    layers: &[Layer],
    config: &Value,
    faults: OciFaults,
) -> io::Result<String> {
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    add_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut descs = Vec::new();
    for l in layers {
        let blob = l.blob()?;
        let digest = sha256(&blob);
        add_file(&mut b, &format!("blobs/sha256/{digest}"), &blob)?;
        let mt = l.media_type.clone().unwrap_or_else(|| {
            if l.gzip {
                "application/vnd.oci.image.layer.v1.tar+gzip".into()
            } else {
                "application/vnd.oci.image.layer.v1.tar".into()
            }
        });
        descs.push(
            json!({ "mediaType": mt, "digest": format!("sha256:{digest}"), "size": blob.len() }),
        );
    }
    let config_bytes = serde_json::to_vec(config)?;
    let config_digest = sha256(&config_bytes);
    if !faults.no_config {
        add_file(
            &mut b,
            &format!("blobs/sha256/{config_digest}"),
            &config_bytes,
        )?;
    }
    let config_mt = if faults.bad_config_media_type {
        "application/vnd.example.unknown+json"
    } else {
        "application/vnd.oci.image.config.v1+json"
    };
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": config_mt, "digest": format!("sha256:{config_digest}"), "size": config_bytes.len() },
        "layers": descs,
    }))?;
    let manifest_digest = sha256(&manifest);
    add_file(
        &mut b,
        &format!("blobs/sha256/{manifest_digest}"),
        &manifest,
    )?;
    if !faults.no_index {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": "latest" }
            }]
        }))?;
        add_file(&mut b, "index.json", &index)?;
    }
    b.into_inner()?.sync_all()?;
    Ok(format!("sha256:{manifest_digest}"))
}

/// Writes a docker-archive (`docker save` layout: manifest.json, `<id>.json`,
/// `<n>/layer.tar`). Returns the image id (config digest).
pub fn write_docker_archive(path: &Path, layers: &[Layer], config: &Value) -> io::Result<String> {
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    let config_bytes = serde_json::to_vec(config)?;
    let config_digest = sha256(&config_bytes);
    let mut layer_paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let p = format!("{i:064x}/layer.tar");
        add_file(&mut b, &p, &l.blob()?)?;
        layer_paths.push(p);
    }
    add_file(&mut b, &format!("{config_digest}.json"), &config_bytes)?;
    let manifest = serde_json::to_vec(&json!([{
        "Config": format!("{config_digest}.json"),
        "RepoTags": ["synwake/fixture:latest"],
        "Layers": layer_paths,
    }]))?;
    add_file(&mut b, "manifest.json", &manifest)?;
    b.into_inner()?.sync_all()?;
    Ok(format!("sha256:{config_digest}"))
}

/// One HTTP/1.0 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: fixture\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not HTTP: {text:?}")))?;
    // CGI responses pass the script's own header block through, often with bare \n.
    let crlf = text.find("\r\n\r\n").map(|i| (i, 4));
    let lf = text.find("\n\n").map(|i| (i, 2));
    let body = match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
    .map(|(i, n)| text[i + n..].to_string())
    .unwrap_or_default();
    Ok((status, body))
}

/// Polls `addr` (connect refused = not ready yet) until GET `path` answers 200 or
/// `timeout` passes. Returns the time it took.
pub async fn wait_http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let attempt = Instant::now();
        let r = http_get(addr, path).await;
        if attempt.elapsed() > Duration::from_millis(100) {
            tracing::debug!(%addr, attempt_ms = attempt.elapsed().as_millis() as u64, "slow attempt: {:?}", r.as_ref().map(|x| x.0));
        }
        match r {
            Ok((200, _)) => return Ok(t0.elapsed()),
            Ok((code, body)) if t0.elapsed() >= timeout => {
                return Err(io::Error::other(format!("status {code}: {body}")))
            }
            Err(e) if t0.elapsed() >= timeout => return Err(e),
            r => {
                if t0.elapsed() > Duration::from_millis(100) {
                    tracing::debug!(%addr, elapsed_ms = t0.elapsed().as_millis() as u64, "not ready: {:?}", r.map(|x| x.0));
                }
                tokio::time::sleep(Duration::from_micros(250)).await
            }
        }
    }
}
