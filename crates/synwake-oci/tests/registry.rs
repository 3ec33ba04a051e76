//! Registry pull against a real registry (Debian's docker-registry, started here on
//! loopback): plain HTTP for an insecure registry, TLS with a test CA and htpasswd auth,
//! multi-platform indexes, a corrupted blob refused by digest, layers shared between
//! images fetched once, an interrupted layer download resumed with a ranged request.
//! Images are built by buildah and pushed by skopeo.
//! With CI=true a missing tool fails the tests, otherwise they are skipped loudly.

use std::path::Path;
use std::sync::{Arc, Mutex};

use synwake_oci::tools::{self, BuildSpec, Registry, ToolStore};
use synwake_oci::{ImageStore, Progress, PullError, RegistryConfig};

fn can_run(test: &str) -> bool {
    let missing = tools::missing_tool()
        .map(|t| format!("{t} is not installed"))
        .or_else(|| {
            (!Path::new("/usr/bin/docker-registry").exists())
                .then(|| "docker-registry is not installed".to_string())
        })
        .or_else(|| (unsafe { libc::geteuid() } != 0).then(|| "buildah needs root here".into()));
    let Some(reason) = missing else {
        return true;
    };
    let msg = format!("!!! SKIPPING registry test `{test}`: {reason} !!!");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: these tests must run)");
    }
    eprintln!("{msg}");
    false
}

fn collect() -> (Progress, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    (Arc::new(move |s: String| l2.lock().unwrap().push(s)), lines)
}

fn insecure(reg: &Registry) -> RegistryConfig {
    RegistryConfig {
        insecure_registries: vec![reg.addr.clone()],
        ..RegistryConfig::default()
    }
}

/// Builds `localhost/<name>` and pushes it as `<repo_tag>`.
fn build_and_push(t: &ToolStore, reg: &Registry, name: &str, spec: &BuildSpec, repo_tag: &str) {
    t.build(name, spec).unwrap();
    let archive = t.path(&format!("{}.tar", name.replace(['/', ':'], "_")));
    t.buildah_push(name, &format!("oci-archive:{}", archive.display()))
        .unwrap();
    reg.push(&format!("oci-archive:{}", archive.display()), repo_tag, &[])
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_registry_pull_by_tag_and_digest_shares_layers() {
    if !can_run("plain_http_registry_pull_by_tag_and_digest_shares_layers") {
        return;
    }
    let reg = Registry::start(false).unwrap();
    let t = ToolStore::new().unwrap();
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images-base:1",
        &BuildSpec::default(),
        "fn/base:1",
    );
    let derived = BuildSpec {
        from: Some("localhost/swk-images-base:1"),
        files: vec![("www/extra.txt", 0o644, b"derived\n")],
        ..BuildSpec::default()
    };
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images-derived:1",
        &derived,
        "fn/derived:1",
    );

    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let (progress, lines) = collect();
    let reference = format!("{}/fn/base:1", reg.addr);
    let (img, report) = store
        .pull(&reference, &insecure(&reg), progress.clone())
        .await
        .unwrap();
    assert!(img.rootfs.join("bin/busybox").is_file());
    assert_eq!(img.config.entrypoint, vec!["/bin/busybox"]);
    assert_eq!(report.layers, 1, "buildah commits one layer");
    assert_eq!(
        (report.fetched_blobs, report.reused_blobs),
        (2, 0),
        "config + layer"
    );
    assert!(report.fetched_bytes > 500_000, "{report:?}");
    assert_eq!(img.digest.as_deref(), Some(report.digest.as_str()));
    assert_eq!(report.digest, reg.digest("fn/base:1").unwrap());
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("layer 1/1")),
        "{:?}",
        lines.lock().unwrap()
    );

    // The derived image shares the base's layers: only its own layer and config come.
    let (dimg, dreport) = store
        .pull(
            &format!("{}/fn/derived:1", reg.addr),
            &insecure(&reg),
            progress.clone(),
        )
        .await
        .unwrap();
    assert_eq!(dreport.layers, 2);
    assert_eq!(
        (dreport.fetched_blobs, dreport.reused_blobs),
        (2, 1),
        "{dreport:?}"
    );
    assert_eq!(
        std::fs::read(dimg.rootfs.join("www/extra.txt")).unwrap(),
        b"derived\n"
    );

    // By digest: nothing fetched, same image.
    let by_digest = format!("{}/fn/base@{}", reg.addr, report.digest);
    let (again, r2) = store
        .pull(&by_digest, &insecure(&reg), progress.clone())
        .await
        .unwrap();
    assert_eq!(again, img);
    assert_eq!(r2.fetched_blobs, 0);

    // A registry not listed as insecure is spoken to over HTTPS only: refused.
    let err = store
        .pull(&reference, &RegistryConfig::default(), progress.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::Registry { .. }), "{err:?}");
    assert!(err.to_string().contains(&reference), "{err}");

    // Unknown tag: the registry's reason (MANIFEST_UNKNOWN) is in the error.
    let err = store
        .pull(
            &format!("{}/fn/base:nope", reg.addr),
            &insecure(&reg),
            progress,
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.to_lowercase().contains("manifest unknown"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_with_htpasswd_needs_the_ca_and_the_credentials() {
    if !can_run("tls_registry_with_htpasswd_needs_the_ca_and_the_credentials") {
        return;
    }
    let reg = Registry::start(true).unwrap();
    let t = ToolStore::new().unwrap();
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images-tls:1",
        &BuildSpec::default(),
        "team/fn:1.2",
    );
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let (progress, _) = collect();
    let (user, password) = reg.credentials.clone().unwrap();
    let auth_file = dir.path().join("config.json");
    let b64 = base64_of(&format!("{user}:{password}"));
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths": {{"{}": {{"auth": "{b64}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let reference = format!("{}/team/fn:1.2", reg.addr);
    let good = RegistryConfig {
        auth_file: Some(auth_file.clone()),
        ca_file: reg.ca_file.clone(),
        ..RegistryConfig::default()
    };
    let (img, _) = store
        .pull(&reference, &good, progress.clone())
        .await
        .unwrap();
    assert!(img.rootfs.join("www/index.html").is_file());

    // Without the CA: the certificate is not trusted.
    let no_ca = RegistryConfig {
        ca_file: None,
        ..good.clone()
    };
    let msg = store
        .pull(&reference, &no_ca, progress.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&reference) && msg.to_lowercase().contains("certificate"),
        "{msg}"
    );

    // Without credentials, and with a wrong password: the registry's 401 reason.
    for cfg in [
        RegistryConfig {
            auth_file: None,
            ..good.clone()
        },
        {
            let bad = dir.path().join("bad.json");
            std::fs::write(
                &bad,
                format!(
                    r#"{{"auths": {{"{}": {{"username": "{user}", "password": "wrong"}}}}}}"#,
                    reg.addr
                ),
            )
            .unwrap();
            RegistryConfig {
                auth_file: Some(bad),
                ..good.clone()
            }
        },
    ] {
        let err = store
            .pull(&reference, &cfg, progress.clone())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PullError::Registry { .. }), "{err:?}");
        assert!(msg.to_lowercase().contains("not authorized"), "{msg}");
        assert!(!msg.contains(&password), "password echoed: {msg}");
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_resolves_to_this_platform_or_names_what_it_has() {
    if !can_run("multi_platform_index_resolves_to_this_platform_or_names_what_it_has") {
        return;
    }
    let reg = Registry::start(false).unwrap();
    let t = ToolStore::new().unwrap();
    let amd = BuildSpec {
        arch: Some("amd64"),
        files: vec![("www/arch", 0o644, b"amd64")],
        ..BuildSpec::default()
    };
    let arm = BuildSpec {
        arch: Some("arm64"),
        files: vec![("www/arch", 0o644, b"arm64")],
        ..BuildSpec::default()
    };
    t.build("localhost/swk-images-amd:1", &amd).unwrap();
    t.build("localhost/swk-images-arm:1", &arm).unwrap();
    reg.push_index(
        &t,
        &["localhost/swk-images-arm:1", "localhost/swk-images-amd:1"],
        "multi/fn:1",
    )
    .unwrap();
    reg.push_index(&t, &["localhost/swk-images-arm:1"], "multi/armonly:1")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let (progress, _) = collect();
    let (img, report) = store
        .pull(
            &format!("{}/multi/fn:1", reg.addr),
            &insecure(&reg),
            progress.clone(),
        )
        .await
        .unwrap();
    assert_ne!(
        report.digest,
        reg.digest("multi/fn:1").unwrap(),
        "the index itself is not the image"
    );
    let want = if std::env::consts::ARCH == "aarch64" {
        "arm64"
    } else {
        "amd64"
    };
    assert_eq!(
        std::fs::read_to_string(img.rootfs.join("www/arch")).unwrap(),
        want
    );

    let err = store
        .pull(
            &format!("{}/multi/armonly:1", reg.addr),
            &insecure(&reg),
            progress,
        )
        .await
        .unwrap_err();
    if want == "amd64" {
        assert!(matches!(err, PullError::NoPlatform { .. }), "{err:?}");
        assert!(err.to_string().contains("linux/arm64"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_blob_in_the_registry_is_refused_by_digest_and_not_kept() {
    if !can_run("a_corrupted_blob_in_the_registry_is_refused_by_digest_and_not_kept") {
        return;
    }
    let reg = Registry::start(false).unwrap();
    let t = ToolStore::new().unwrap();
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images-bad:1",
        &BuildSpec::default(),
        "bad/fn:1",
    );
    // Find the busybox layer (the big blob) and flip bytes in the registry's storage.
    let raw = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/bad/fn:1", reg.addr))
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let data = reg.blob_data(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&data, &bytes).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let (progress, _) = collect();
    let err = store
        .pull(&format!("{}/bad/fn:1", reg.addr), &insecure(&reg), progress)
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::DigestMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&layer), "{err}");
    let kept: Vec<String> = std::fs::read_dir(store.blobs_dir().join("sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !kept
            .iter()
            .any(|k| layer.ends_with(k.as_str()) || k.starts_with(".partial")),
        "corrupt blob or partial kept: {kept:?}"
    );
    // No image was unpacked.
    assert!(store.images().is_empty());
    let usage = store.usage();
    assert_eq!((usage.images, usage.layers), (0, 0), "{usage:?}");
}

/// A TCP proxy in front of a registry that cuts the first blob response larger than
/// `cut_after` bytes at that point (the connection closes mid-body), and records the
/// requests it forwarded.
struct CuttingProxy {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: &str, cut_after: u64) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let cut_done = Arc::new(AtomicBool::new(false));
        let (reqs, s, up) = (requests.clone(), stop.clone(), upstream.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = std::net::TcpStream::connect(&up).unwrap();
                // Bytes of the current response so far, or u64::MAX when no blob GET is
                // in flight on this connection.
                let since_blob = Arc::new(AtomicU64::new(u64::MAX));
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                let (reqs, armed) = (reqs.clone(), since_blob.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]).to_string();
                        if text.contains("/blobs/") {
                            armed.store(0, Ordering::SeqCst);
                        }
                        reqs.lock().unwrap().push(text);
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let cut = cut_done.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let so_far = since_blob.load(Ordering::SeqCst);
                        let mut end = n;
                        let mut cutting = false;
                        if so_far != u64::MAX && !cut.load(Ordering::SeqCst) {
                            if so_far + n as u64 > cut_after {
                                end = (cut_after - so_far) as usize;
                                cutting = true;
                                cut.store(true, Ordering::SeqCst);
                            } else {
                                since_blob.store(so_far + n as u64, Ordering::SeqCst);
                            }
                        }
                        if c_write.write_all(&buf[..end]).is_err() {
                            break;
                        }
                        if cutting {
                            let _ = c_write.shutdown(std::net::Shutdown::Both);
                            let _ = s_read.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CuttingProxy {
            addr,
            requests,
            stop,
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A layer download cut mid-way is resumed with a ranged request (not fetched again
/// from the start), reported in the progress, and the image is complete and verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_layer_download_resumes_with_a_range_request() {
    if !can_run("an_interrupted_layer_download_resumes_with_a_range_request") {
        return;
    }
    let reg = Registry::start(false).unwrap();
    let t = ToolStore::new().unwrap();
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images2-resume:1",
        &BuildSpec::default(),
        "fn/resume:1",
    );
    const CUT: u64 = 256 << 10;
    let proxy = CuttingProxy::start(&reg.addr, CUT);
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let (progress, lines) = collect();
    let cfg = RegistryConfig {
        insecure_registries: vec![proxy.addr.clone()],
        ..RegistryConfig::default()
    };
    let (img, report) = store
        .pull(&format!("{}/fn/resume:1", proxy.addr), &cfg, progress)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{:?}", lines.lock().unwrap()));
    assert!(img.rootfs.join("bin/busybox").is_file());
    let lines = lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("interrupted at") && l.contains("resuming")),
        "no resume in the progress: {lines:?}"
    );
    let requests = proxy.requests.lock().unwrap().clone();
    let ranged: Vec<&String> = requests
        .iter()
        .filter(|r| r.to_ascii_lowercase().contains("range: bytes="))
        .collect();
    assert_eq!(ranged.len(), 1, "one ranged blob request: {requests:?}");
    // The cut part was not fetched twice: the bytes written are the blobs' sizes.
    let layer_and_config: u64 = std::fs::read_dir(store.blobs_dir().join("sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        report.fetched_bytes <= layer_and_config,
        "fetched {} bytes for {layer_and_config} stored",
        report.fetched_bytes
    );
}

/// A pull records which image its reference resolved to: `stored` finds it (for a tag
/// after it moved, the image it was last pulled as), a reference never pulled finds
/// nothing, and a prune that drops the image drops the record too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_reference_is_recorded_and_pruned_with_its_image() {
    if !can_run("a_pulled_reference_is_recorded_and_pruned_with_its_image") {
        return;
    }
    let reg = Registry::start(false).unwrap();
    let t = ToolStore::new().unwrap();
    let v2 = BuildSpec {
        files: vec![("www/v.txt", 0o644, b"2\n")],
        ..BuildSpec::default()
    };
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images3-ref:1",
        &BuildSpec::default(),
        "fn/ref:latest",
    );
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(store_dir.path().join("images"));
    let latest = format!("{}/fn/ref:latest", reg.addr);
    assert!(store.stored(&latest).is_none());
    let (p, _) = collect();
    let (first, _) = store
        .pull(&latest, &insecure(&reg), p.clone())
        .await
        .unwrap();
    assert_eq!(store.stored(&latest), Some(first.clone()));
    // The tag moves; until it is pulled again the record names the first image.
    build_and_push(
        &t,
        &reg,
        "localhost/swk-images3-ref:2",
        &v2,
        "fn/ref:latest",
    );
    assert_eq!(store.stored(&latest), Some(first.clone()));
    let (second, _) = store.pull(&latest, &insecure(&reg), p).await.unwrap();
    assert_ne!(first.digest, second.digest);
    assert_eq!(store.stored(&latest), Some(second.clone()));
    assert!(store
        .stored(&format!("{}/fn/ref:other", reg.addr))
        .is_none());
    // Keeping only the first image drops the tag's record (it names the second).
    store.prune(&[first]).unwrap();
    assert!(store.stored(&latest).is_none());
    let refs = std::fs::read_dir(store_dir.path().join("images").join("refs"))
        .unwrap()
        .count();
    assert_eq!(refs, 0, "a reference record of a pruned image is left");
}
