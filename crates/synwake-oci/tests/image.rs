//! Image import: both archive formats, layer semantics, cache reuse, and every refusal.
//! Needs no runc and no namespaces (ownership is kept when not root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use synwake_oci::fixture::{self, Layer, OciFaults, TarBuilder};
use synwake_oci::{ImageError, ImageStore};

fn busybox_present() -> bool {
    if Path::new(fixture::BUSYBOX).exists() {
        return true;
    }
    let msg = format!(
        "!!! SKIPPING image test: {} missing (apt-get install busybox-static) !!!",
        fixture::BUSYBOX
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("{msg}");
    false
}

/// Layer 1: busybox function + files to delete/hide/link. Layer 2: whiteouts and additions.
fn layered_image() -> Vec<Layer> {
    let mut t = TarBuilder::new();
    t.dir("data")
        .file("data/a", 0o640, b"alpha")
        .hardlink("data/a-link", "data/a")
        .file("gone", 0o644, b"to be whited out")
        .dir("opq")
        .file("opq/x", 0o644, b"x")
        .file("opq/y", 0o644, b"y")
        .symlink("abs", "/www")
        .symlink("rel", "data/a");
    let l1 = t.finish();
    let mut t = TarBuilder::new();
    t.file(".wh.gone", 0o644, b"")
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/z", 0o644, b"z")
        .file("data/c", 0o600, b"gamma");
    let l2 = t.finish();
    vec![
        Layer::new(fixture::busybox_layer().unwrap(), true),
        Layer::new(l1, false),
        Layer::new(l2, true),
    ]
}

fn check_rootfs(rootfs: &Path) {
    assert!(rootfs.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
        PathBuf::from("busybox")
    );
    assert!(!rootfs.join("gone").exists(), "whiteout removed the file");
    assert!(
        !rootfs.join("opq/x").exists(),
        "opaque dir hid lower entries"
    );
    assert!(!rootfs.join("opq/y").exists());
    assert_eq!(std::fs::read(rootfs.join("opq/z")).unwrap(), b"z");
    let a = std::fs::metadata(rootfs.join("data/a")).unwrap();
    let l = std::fs::metadata(rootfs.join("data/a-link")).unwrap();
    assert_eq!(a.ino(), l.ino(), "hard link shares the inode");
    assert_eq!(a.mode() & 0o7777, 0o640);
    assert_eq!(std::fs::read(rootfs.join("data/c")).unwrap(), b"gamma");
    assert_eq!(
        std::fs::read_link(rootfs.join("abs")).unwrap(),
        PathBuf::from("/www")
    );
    assert_eq!(std::fs::read(rootfs.join("rel")).unwrap(), b"alpha");
}

#[test]
fn oci_and_docker_archives_unpack_with_layer_semantics_and_cache() {
    if !busybox_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let layers = layered_image();
    let config = fixture::function_config(&layers);

    let oci = dir.path().join("fn.oci.tar");
    let manifest_digest = fixture::write_oci_archive(&oci, &layers, &config).unwrap();
    let img = store.import(&oci).unwrap();
    assert_eq!(img.digest.as_deref(), Some(manifest_digest.as_str()));
    assert!(img.rootfs.starts_with(store.dir()));
    check_rootfs(&img.rootfs);
    assert_eq!(img.config.entrypoint, vec!["/bin/busybox"]);
    assert_eq!(img.config.cmd[0], "httpd");
    assert_eq!(img.config.working_dir.as_deref(), Some("/www"));
    assert_eq!(img.config.user.as_deref(), Some("root"));
    assert!(img.config.env.contains(&"GREETING=hello".to_string()));

    // Second import: same cached rootfs, not unpacked again (marker survives).
    std::fs::write(img.rootfs.join("marker"), b"cached").unwrap();
    let again = store.import(&oci).unwrap();
    assert_eq!(again, img);
    assert!(again.rootfs.join("marker").exists());

    let docker = dir.path().join("fn.docker.tar");
    let image_id = fixture::write_docker_archive(&docker, &layers, &config).unwrap();
    let dimg = store.import(&docker).unwrap();
    assert_eq!(dimg.digest.as_deref(), Some(image_id.as_str()));
    check_rootfs(&dimg.rootfs);
    assert_eq!(dimg.config, img.config);

    // The docker-archive has the same layers (same diff ids): its chain is the oci one's,
    // nothing unpacked twice.
    assert_eq!(dimg.layers, img.layers);
    assert_eq!(dimg.rootfs, img.rootfs);
    assert_eq!(img.layers.len(), layers.len());

    // Exactly the two images and their layer chains, no temporary directories left.
    assert_eq!(store.images().len(), 2);
    assert_eq!(store.usage().layers, layers.len() as u64);
    let mut names: Vec<String> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["images", "layers"]);
}

#[test]
fn absolute_symlinks_are_never_followed_out_of_the_rootfs() {
    if !busybox_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("images"));
    let target = outside.path().to_str().unwrap().to_string();
    let mut t = TarBuilder::new();
    t.symlink("hostlink", &target)
        .file("hostlink/pwned", 0o644, b"x");
    let layers = vec![Layer::new(t.finish(), false)];
    let archive = dir.path().join("abs.tar");
    fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();
    let img = store.import(&archive).unwrap();
    assert!(
        !outside.path().join("pwned").exists(),
        "wrote through a symlink to the host"
    );
    let inside = img
        .rootfs
        .join(target.trim_start_matches('/'))
        .join("pwned");
    assert!(inside.is_file(), "{} should exist", inside.display());
}

/// Imports a bad archive and checks the refusal names the archive and `entry_part`, and
/// that nothing was left in (or outside) the cache.
fn refused(
    store: &ImageStore,
    archive: &Path,
    entry_part: &str,
    check: impl Fn(&ImageError) -> bool,
) -> ImageError {
    let err = store
        .import(archive)
        .expect_err("bad archive must be refused");
    let msg = err.to_string();
    assert!(check(&err), "unexpected error kind: {err:?}");
    assert!(
        msg.contains(archive.to_str().unwrap()),
        "error does not name the archive: {msg}"
    );
    assert!(
        msg.contains(entry_part),
        "error does not name the entry {entry_part:?}: {msg}"
    );
    assert!(
        leftovers(store).is_empty(),
        "cache not clean after refusal: {:?}",
        leftovers(store)
    );
    err
}

/// What the store holds besides its (empty) `images/` and `layers/` directories.
fn leftovers(store: &ImageStore) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for e in std::fs::read_dir(store.dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name();
        if name == "images" || name == "layers" {
            left.extend(
                std::fs::read_dir(e.path())
                    .unwrap()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else {
            left.push(e.path());
        }
    }
    left
}

fn single_layer_oci(dir: &Path, name: &str, tar: Vec<u8>) -> (PathBuf, String) {
    let layers = vec![Layer::new(tar, false)];
    let archive = dir.join(name);
    fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();
    let blob = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&layers[0].tar));
    (archive, format!("blobs/sha256/{blob}"))
}

#[test]
fn bad_archives_are_refused_naming_archive_and_entry() {
    if !busybox_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = ImageStore::new(d.join("images"));
    let good_layers = vec![Layer::new(fixture::busybox_layer().unwrap(), true)];
    let config = fixture::function_config(&good_layers);

    // Truncated: cut a valid archive in the middle of its (large) layer blob.
    let truncated = d.join("truncated.tar");
    fixture::write_oci_archive(&truncated, &good_layers, &config).unwrap();
    let len = std::fs::metadata(&truncated).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap();
    f.set_len(len / 2).unwrap();
    refused(&store, &truncated, "blobs/sha256/", |e| {
        matches!(e, ImageError::Truncated { .. } | ImageError::Missing { .. })
    });

    // Corrupt: flip bytes inside the gzip stream of the layer.
    let corrupt = d.join("corrupt.tar");
    fixture::write_oci_archive(&corrupt, &good_layers, &config).unwrap();
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let gz = bytes
        .windows(3)
        .position(|w| w == [0x1f, 0x8b, 0x08])
        .expect("gzip blob in archive");
    for b in &mut bytes[gz + 4000..gz + 4064] {
        *b ^= 0x5a;
    }
    std::fs::write(&corrupt, &bytes).unwrap();
    refused(&store, &corrupt, "blobs/sha256/", |e| {
        matches!(
            e,
            ImageError::Corrupt { .. }
                | ImageError::DigestMismatch { .. }
                | ImageError::Truncated { .. }
        )
    });

    // Missing manifest: neither index.json nor manifest.json.
    let no_index = d.join("no-index.tar");
    let faults = OciFaults {
        no_index: true,
        ..Default::default()
    };
    fixture::write_oci_archive_with(&no_index, &good_layers, &config, faults).unwrap();
    refused(&store, &no_index, "index.json", |e| {
        matches!(e, ImageError::UnknownFormat { .. })
    });

    // Missing config blob.
    let no_config = d.join("no-config.tar");
    let faults = OciFaults {
        no_config: true,
        ..Default::default()
    };
    fixture::write_oci_archive_with(&no_config, &good_layers, &config, faults).unwrap();
    refused(&store, &no_config, "blobs/sha256/", |e| {
        matches!(e, ImageError::Missing { .. })
    });

    // Missing config in a docker-archive.
    let docker_no_config = d.join("docker-no-config.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&docker_no_config).unwrap());
        let manifest = br#"[{"Config":"deadbeef.json","Layers":["0/layer.tar"]}]"#;
        let mut h = tar::Header::new_gnu();
        h.set_path("manifest.json").unwrap();
        h.set_size(manifest.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &manifest[..]).unwrap();
        b.finish().unwrap();
    }
    refused(&store, &docker_no_config, "deadbeef.json", |e| {
        matches!(e, ImageError::Missing { .. })
    });

    // A gzip blob labelled zstd is corrupt (bad zstd magic), not silently accepted.
    let zstd = d.join("zstd.tar");
    let mut zl = good_layers.clone();
    zl[0].media_type = Some("application/vnd.oci.image.layer.v1.tar+zstd".into());
    fixture::write_oci_archive(&zstd, &zl, &config).unwrap();
    refused(&store, &zstd, "zstd frame header", |e| {
        matches!(e, ImageError::Corrupt { .. })
    });
    // Unknown media types: a bzip2 layer, and a config of an unknown kind.
    let bz = d.join("bzip2.tar");
    let mut bl = good_layers.clone();
    bl[0].media_type = Some("application/vnd.oci.image.layer.v1.tar+bzip2".into());
    fixture::write_oci_archive(&bz, &bl, &config).unwrap();
    let e = refused(&store, &bz, "blobs/sha256/", |e| {
        matches!(e, ImageError::UnknownMediaType { .. })
    });
    assert!(e.to_string().contains("tar+bzip2"));
    let bad_cfg = d.join("bad-config-type.tar");
    let faults = OciFaults {
        bad_config_media_type: true,
        ..Default::default()
    };
    fixture::write_oci_archive_with(&bad_cfg, &good_layers, &config, faults).unwrap();
    refused(&store, &bad_cfg, "blobs/sha256/", |e| {
        matches!(e, ImageError::UnknownMediaType { .. })
    });

    // `..` in a layer path: nothing may appear next to the cache.
    let escape_name = format!("escaped-{}", std::process::id());
    let mut t = TarBuilder::new();
    t.file("ok", 0o644, b"fine")
        .file(&format!("../../../{escape_name}"), 0o644, b"evil");
    let (dotdot, layer) = single_layer_oci(d, "dotdot.tar", t.finish());
    refused(
        &store,
        &dotdot,
        &format!("{layer}!/../../../{escape_name}"),
        |e| matches!(e, ImageError::UnsafePath { .. }),
    );
    for up in [
        d.to_path_buf(),
        d.join("images"),
        d.parent().unwrap().to_path_buf(),
    ] {
        assert!(!up.join(&escape_name).exists());
    }

    // The same in a docker-archive layer.
    let mut t = TarBuilder::new();
    t.file(&format!("a/../../{escape_name}"), 0o644, b"evil");
    let dl = vec![Layer::new(t.finish(), false)];
    let docker_dotdot = d.join("docker-dotdot.tar");
    fixture::write_docker_archive(&docker_dotdot, &dl, &fixture::function_config(&dl)).unwrap();
    refused(
        &store,
        &docker_dotdot,
        &format!("layer.tar!/a/../../{escape_name}"),
        |e| matches!(e, ImageError::UnsafePath { .. }),
    );

    // Absolute layer path.
    let mut t = TarBuilder::new();
    t.file(&format!("/tmp/{escape_name}"), 0o644, b"evil");
    let (absolute, layer) = single_layer_oci(d, "absolute.tar", t.finish());
    refused(
        &store,
        &absolute,
        &format!("{layer}!//tmp/{escape_name}"),
        |e| matches!(e, ImageError::UnsafePath { .. }),
    );
    assert!(!Path::new("/tmp").join(&escape_name).exists());

    // Symlink pointing outside the rootfs.
    let mut t = TarBuilder::new();
    t.dir("etc").symlink("etc/evil", "../../../../etc/shadow");
    let (symlink, layer) = single_layer_oci(d, "symlink.tar", t.finish());
    let e = refused(&store, &symlink, &format!("{layer}!/etc/evil"), |e| {
        matches!(e, ImageError::SymlinkEscape { .. })
    });
    assert!(e.to_string().contains("../../../../etc/shadow"));

    // Device node.
    let mut t = TarBuilder::new();
    t.dir("dev").char_device("dev/kmem", 1, 2);
    let (device, layer) = single_layer_oci(d, "device.tar", t.finish());
    refused(&store, &device, &format!("{layer}!/dev/kmem"), |e| {
        matches!(e, ImageError::DeviceNode { .. })
    });

    // Not an archive at all.
    let garbage = d.join("garbage.tar");
    std::fs::write(&garbage, vec![0x42u8; 3000]).unwrap();
    let err = store.import(&garbage).expect_err("garbage refused");
    assert!(err.to_string().contains(garbage.to_str().unwrap()), "{err}");
}

#[test]
fn rootfs_directory_is_used_in_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
    let img = ImageStore::from_rootfs(&dir.path().join("link")).unwrap();
    // runc refuses symlinked rootfs paths: the image carries the resolved path.
    assert_eq!(img.rootfs, dir.path().join("real").canonicalize().unwrap());
    assert!(img.digest.is_none());
    assert!(ImageStore::from_rootfs(&dir.path().join("nope")).is_err());
}

/// Ten images on one busybox base layer: the base is unpacked once (every image's
/// `bin/busybox` is the same inode) and its data is on disk once; a prune keeping some
/// of them removes exactly the others' records and top layers, and the kept ones still
/// import from the store.
#[test]
fn images_sharing_a_base_layer_store_it_once_and_prune_removes_only_unused_layers() {
    if !busybox_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path().join("store"));
    let base = Layer::new(fixture::busybox_layer().unwrap(), true);
    let mut archives = Vec::new();
    let mut images = Vec::new();
    for i in 0..10 {
        let mut t = TarBuilder::new();
        t.dir("www")
            .file("www/index.html", 0o644, format!("function {i}").as_bytes());
        let layers = vec![base.clone(), Layer::new(t.finish(), true)];
        let archive = dir.path().join(format!("fn{i}.tar"));
        fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();
        let img = store.import(&archive).unwrap();
        assert_eq!(
            std::fs::read(img.rootfs.join("www/index.html")).unwrap(),
            format!("function {i}").as_bytes()
        );
        archives.push(archive);
        images.push(img);
    }
    let base_chain = &images[0].layers[0];
    let base_ino = std::fs::metadata(
        store
            .dir()
            .join("layers")
            .join(base_chain)
            .join("bin/busybox"),
    )
    .unwrap()
    .ino();
    for img in &images {
        assert_eq!(&img.layers[0], base_chain, "one chain for the shared base");
        let ino = std::fs::metadata(img.rootfs.join("bin/busybox"))
            .unwrap()
            .ino();
        assert_eq!(
            ino,
            base_ino,
            "{}: base unpacked again",
            img.rootfs.display()
        );
    }
    let usage = store.usage();
    assert_eq!((usage.images, usage.layers), (10, 11), "{usage:?}");
    let busybox_bytes = std::fs::metadata(fixture::BUSYBOX).unwrap().len();
    assert!(
        usage.bytes < 2 * busybox_bytes,
        "ten images on one base take {} bytes; busybox alone is {busybox_bytes}",
        usage.bytes
    );

    // Keep images 0..3: the other seven records and top chains go, the base stays.
    let report = store.prune(&images[..3]).unwrap();
    assert_eq!(report.images.len(), 7, "{report:?}");
    assert_eq!(report.layers, 7, "{report:?}");
    assert!(report.freed_bytes > 0, "{report:?}");
    let usage = store.usage();
    assert_eq!((usage.images, usage.layers), (3, 4), "{usage:?}");
    for img in &images[3..] {
        assert!(!img.rootfs.exists(), "{} not removed", img.rootfs.display());
    }
    for (img, archive) in images[..3].iter().zip(&archives) {
        let again = store.import(archive).unwrap();
        assert_eq!(&again, img);
        assert!(again.rootfs.join("bin/busybox").is_file());
    }
    // A removed image imports again, reusing the kept base.
    let back = store.import(&archives[5]).unwrap();
    assert_eq!(back.layers[0], *base_chain);
    assert_eq!(store.usage().layers, 5);

    // Nothing kept: the store is empty (besides its directories), leftovers of the old
    // cache layout and crashed imports included.
    std::fs::create_dir_all(store.dir().join(format!("{:064x}", 7)).join("rootfs")).unwrap();
    std::fs::create_dir_all(store.dir().join(".tmp-layer-crashed")).unwrap();
    store.prune(&[]).unwrap();
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
}

/// Import cost and disk use of ten images on one base layer (busybox plus 16 MiB in 256
/// files), into one shared store vs each into a store of its own (what the pre-layer-store
/// cache did: every image unpacked whole). Run with `--ignored --nocapture`.
#[test]
#[ignore = "benchmark"]
fn layer_store_import_benchmark() {
    if !busybox_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut base = tar::Builder::new(Vec::new());
    {
        let bb = fixture::busybox_layer().unwrap();
        let mut a = tar::Archive::new(&bb[..]);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            base.append(&h, &data[..]).unwrap();
        }
    }
    let mut seed = 0x9e3779b97f4a7c15u64;
    for i in 0..256 {
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        base.append_data(&mut h, format!("usr/lib/data/f{i}"), &data[..])
            .unwrap();
    }
    let base = Layer::new(base.into_inner().unwrap(), true);
    let archives: Vec<PathBuf> = (0..10)
        .map(|i| {
            let mut t = TarBuilder::new();
            t.dir("www")
                .file("www/index.html", 0o644, format!("fn {i}").as_bytes());
            let layers = vec![base.clone(), Layer::new(t.finish(), true)];
            let a = dir.path().join(format!("fn{i}.tar"));
            fixture::write_oci_archive(&a, &layers, &fixture::function_config(&layers)).unwrap();
            a
        })
        .collect();
    let shared = ImageStore::new(dir.path().join("shared"));
    let mut shared_ms = Vec::new();
    for a in &archives {
        let t = std::time::Instant::now();
        shared.import(a).unwrap();
        shared_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut own_ms = Vec::new();
    let mut own_bytes = 0;
    for (i, a) in archives.iter().enumerate() {
        let s = ImageStore::new(dir.path().join(format!("own{i}")));
        let t = std::time::Instant::now();
        s.import(a).unwrap();
        own_ms.push(t.elapsed().as_secs_f64() * 1e3);
        own_bytes += s.usage().bytes;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut later = shared_ms[1..].to_vec();
    later.sort_by(f64::total_cmp);
    let mut own = own_ms.clone();
    own.sort_by(f64::total_cmp);
    println!("load average: {}", load.trim());
    println!(
        "shared store: first import {:.1} ms, next nine median {:.1} ms; disk {} KiB",
        shared_ms[0],
        later[later.len() / 2],
        shared.usage().bytes / 1024
    );
    println!(
        "a store per image: import median {:.1} ms; disk {} KiB in total",
        own[own.len() / 2],
        own_bytes / 1024
    );
}
