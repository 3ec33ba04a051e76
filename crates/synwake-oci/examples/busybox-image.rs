//! Writes the busybox HTTP function image (busybox httpd on port 8080, from Debian's
//! busybox-static) as an OCI archive, or a docker archive with `--docker`:
//!
//!     cargo run -p synwake-oci --example busybox-image -- images/busybox.tar [--docker]

use std::path::PathBuf;

use synwake_oci::fixture;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: busybox-image OUT.tar [--docker]");
        std::process::exit(2);
    };
    let docker = args.any(|a| a == "--docker");
    let layer = match fixture::busybox_layer() {
        Ok(l) => fixture::Layer::new(l, true),
        Err(e) => {
            eprintln!(
                "reading {}: {e} (apt-get install busybox-static)",
                fixture::BUSYBOX
            );
            std::process::exit(1);
        }
    };
    let layers = [layer];
    let config = fixture::function_config(&layers);
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let written = if docker {
        fixture::write_docker_archive(&out, &layers, &config)
    } else {
        fixture::write_oci_archive(&out, &layers, &config)
    };
    match written {
        Ok(digest) => println!(
            "{}: {} archive, image {digest}",
            out.display(),
            if docker { "docker" } else { "oci" }
        ),
        Err(e) => {
            eprintln!("writing {}: {e}", out.display());
            std::process::exit(1);
        }
    }
}
