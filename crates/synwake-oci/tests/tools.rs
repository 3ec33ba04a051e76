//! Archives made by the real tools (buildah, podman, skopeo from Debian) import and keep
//! their config: docker-archive and oci-archive, gzip, zstd and uncompressed layers.
//! Foreign layers are refused by name. Needs the tools (scripts/deps.sh installs them);
//! with CI=true a missing tool fails the test, otherwise it is skipped loudly.

use std::path::Path;

use synwake_oci::fixture::{self, Layer};
use synwake_oci::tools::{self, BuildSpec, ToolStore};
use synwake_oci::{Image, ImageError, ImageStore};

fn tools_present(test: &str) -> bool {
    let missing = tools::missing_tool()
        .map(|t| format!("{t} is not installed"))
        .or_else(|| {
            (!Path::new(fixture::BUSYBOX).exists()).then(|| "busybox-static missing".into())
        })
        .or_else(|| (unsafe { libc::geteuid() } != 0).then(|| "buildah needs root here".into()));
    let Some(reason) = missing else {
        return true;
    };
    let msg = format!("!!! SKIPPING real-tool image test `{test}`: {reason} !!!");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: these tests must run)");
    }
    eprintln!("{msg}");
    false
}

fn check_busybox(img: &Image) {
    let root = &img.rootfs;
    assert!(root.join("bin/busybox").is_file(), "{}", root.display());
    assert_eq!(
        std::fs::read_to_string(root.join("www/index.html")).unwrap(),
        "hello from a buildah image\n"
    );
    assert_eq!(img.config.entrypoint, vec!["/bin/busybox"]);
    assert_eq!(
        img.config.cmd,
        vec!["httpd", "-f", "-p", "8080", "-h", "/www"]
    );
}

fn layer_media_types(oci_archive: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .arg("xf")
        .arg(oci_archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = dir.path().join("blobs/sha256").join(&d[7..]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap().to_string())
        .collect()
}

fn first_layer_is_plain_tar(docker_archive: &Path) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .arg("xf")
        .arg(docker_archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let layer = dir.path().join(m[0]["Layers"][0].as_str().unwrap());
    let bytes = std::fs::read(layer).unwrap();
    bytes.len() > 512 && &bytes[257..262] == b"ustar"
}

#[test]
fn archives_from_buildah_podman_and_skopeo_import_in_every_format() {
    if !tools_present("archives_from_buildah_podman_and_skopeo_import_in_every_format") {
        return;
    }
    let t = ToolStore::new().unwrap();
    t.build("localhost/swk-images-fn:1", &BuildSpec::default())
        .unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(store_dir.path().join("images"));

    let buildah_oci = t.path("buildah.oci.tar");
    t.buildah_push(
        "localhost/swk-images-fn:1",
        &format!("oci-archive:{}", buildah_oci.display()),
    )
    .unwrap();
    let buildah_docker = t.path("buildah.docker.tar");
    t.buildah_push(
        "localhost/swk-images-fn:1",
        &format!(
            "docker-archive:{}:swk-images-fn:1",
            buildah_docker.display()
        ),
    )
    .unwrap();
    let podman_oci = t.path("podman.oci.tar");
    t.podman_save("localhost/swk-images-fn:1", "oci-archive", &podman_oci)
        .unwrap();
    let podman_docker = t.path("podman.docker.tar");
    t.podman_save(
        "localhost/swk-images-fn:1",
        "docker-archive",
        &podman_docker,
    )
    .unwrap();
    let src = format!("oci-archive:{}", buildah_oci.display());
    let zstd = t.path("skopeo.zstd.tar");
    t.skopeo_copy(
        &["--dest-compress", "--dest-compress-format", "zstd"],
        &src,
        &format!("oci-archive:{}", zstd.display()),
    )
    .unwrap();
    let skopeo_docker = t.path("skopeo.docker.tar");
    t.skopeo_copy(
        &[],
        &src,
        &format!("docker-archive:{}:swk-images-fn:1", skopeo_docker.display()),
    )
    .unwrap();

    assert!(layer_media_types(&buildah_oci)
        .iter()
        .all(|m| m.ends_with("+gzip")));
    assert!(layer_media_types(&zstd)
        .iter()
        .all(|m| m.ends_with("+zstd")));
    // docker-archive layers are plain tars (skopeo 1.9 recompresses oci layouts anyway).
    assert!(first_layer_is_plain_tar(&podman_docker));

    let mut digests = Vec::new();
    for archive in [
        &buildah_oci,
        &buildah_docker,
        &podman_oci,
        &podman_docker,
        &zstd,
        &skopeo_docker,
    ] {
        let img = store
            .import(archive)
            .unwrap_or_else(|e| panic!("{}: {e}", archive.display()));
        check_busybox(&img);
        digests.push(img.digest.unwrap());
    }
    // The same image from buildah and podman (oci-archive) is one cache entry.
    assert_eq!(digests[0], digests[2]);
}

#[test]
fn foreign_and_non_distributable_layers_are_refused_by_name() {
    if !tools_present("foreign_and_non_distributable_layers_are_refused_by_name") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    for mt in [
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ] {
        let mut layer = Layer::new(fixture::busybox_layer().unwrap(), true);
        layer.media_type = Some(mt.into());
        let layers = vec![layer];
        let archive = dir.path().join("foreign.tar");
        fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();
        let err = store
            .import(&archive)
            .expect_err("foreign layer must be refused");
        assert!(matches!(err, ImageError::ForeignLayer { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("foreign") && msg.contains(mt), "{msg}");
    }
}
