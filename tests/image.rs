//! The operator's OCI image as `make image` writes it (target/image/*.oci.tar): what a cluster
//! would run. `make test-image` builds the archive and runs this test (`--features image`).
//!
//! The archive is unpacked as a registry or `ctr import` would read it: index, manifest, config,
//! each blob checked against its digest; skopeo copies it to a docker-archive and to a plain
//! directory (`dir:`). Then the layers are unpacked into a root filesystem and the binary is run
//! from it, under chroot as user 65532 when the test runs as root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

const NONROOT: &str = "65532:65532";

fn archive() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_IMAGE_ARCHIVE") {
        return PathBuf::from(path);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no image is built for {other}"),
    };
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "target/image/portcullis-{}-{arch}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

fn run(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A blob of the unpacked archive, after checking that its content has its digest.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"]
        .as_str()
        .expect("a descriptor has a digest");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{digest} is not a sha256 digest"));
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest}: {e}"));
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        hex,
        "blob {digest} does not have its digest"
    );
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "blob {digest} does not have the size its descriptor says"
    );
    bytes
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("a JSON blob")
}

/// Every path under `root`, relative, with a trailing `/` on directories.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("a readable directory") {
            let path = entry.expect("a directory entry").path();
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(format!("{relative}/"));
                walk(root, &path, out);
            } else {
                out.insert(relative);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Whether an ELF64 little-endian file names a program interpreter (PT_INTERP): a dynamically
/// linked binary, which would need a libc the image does not have.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF file");
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([elf[at], elf[at + 1]]));
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap())).unwrap();
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// skopeo reads the archive as registries and `docker load` (what `kind load docker-image`
/// feeds) would get it: copied to a docker-archive, the image keeps its user, entry point and
/// layers.
fn skopeo_copies_it(archive: &Path, dir: &Path, config: &Value) {
    let docker_archive = dir.join("docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg("--quiet")
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!(
            "docker-archive:{}:portcullis:{}",
            docker_archive.display(),
            env!("CARGO_PKG_VERSION")
        )));
    let copied = json(
        &run(Command::new("skopeo")
            .arg("inspect")
            .arg("--config")
            .arg(format!("docker-archive:{}", docker_archive.display())))
        .stdout,
    );
    assert_eq!(copied["config"]["User"], NONROOT);
    assert_eq!(
        copied["config"]["Entrypoint"],
        config["config"]["Entrypoint"]
    );
    assert_eq!(copied["rootfs"]["diff_ids"], config["rootfs"]["diff_ids"]);
}

/// `skopeo copy oci-archive:<archive> dir:<tmp>` accepts the archive, as it does on its way
/// to a registry: the directory's manifest names a config blob (checked against its digest)
/// whose user is 65532 and whose entry point is the operator. (`kind load image-archive` and
/// `ctr import` are not available here; they read the same OCI layout.)
fn skopeo_copies_it_to_a_directory(archive: &Path, dir: &Path) {
    let target = dir.join("skopeo-dir");
    run(Command::new("skopeo")
        .arg("copy")
        .arg("--quiet")
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("dir:{}", target.display())));
    let manifest = json(&std::fs::read(target.join("manifest.json")).expect("dir:manifest.json"));
    let digest = manifest["config"]["digest"]
        .as_str()
        .expect("the manifest names its config");
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    // skopeo's dir: transport keeps each blob under its hex digest.
    let bytes = std::fs::read(target.join(hex)).expect("the config blob in the directory");
    assert_eq!(hex::encode(Sha256::digest(&bytes)), hex);
    let config = json(&bytes);
    assert_eq!(config["config"]["User"], NONROOT);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/portcullis"])
    );
    assert!(
        manifest["layers"].as_array().is_some_and(|l| !l.is_empty()),
        "the copy has the image's layers: {manifest}"
    );
}

#[test]
fn the_image_is_one_static_binary_run_as_nonroot_with_ca_certificates_and_no_shell() {
    let archive = archive();
    assert!(
        archive.is_file(),
        "{} is missing: run `make image` first (`make test-image` does both)",
        archive.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));

    let layout_file = json(&std::fs::read(layout.join("oci-layout")).expect("an oci-layout file"));
    assert_eq!(layout_file["imageLayoutVersion"], "1.0.0");
    let index = json(&std::fs::read(layout.join("index.json")).expect("an index.json"));
    let manifests = index["manifests"].as_array().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("localhost/portcullis:{}", env!("CARGO_PKG_VERSION")),
        "the archive names the image, so `podman load` and `kind load image-archive` tag it"
    );
    let manifest = json(&blob(&layout, &manifests[0]));
    let config = json(&blob(&layout, &manifest["config"]));

    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["config"]["User"], NONROOT,
        "a numeric non-root user, which runAsNonRoot can check"
    );
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/portcullis"])
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let layers = manifest["layers"].as_array().expect("manifest.layers");
    for layer in layers {
        let bytes = blob(&layout, layer);
        let file = dir.path().join("layer.tar");
        std::fs::write(&file, bytes).unwrap();
        // GNU tar recognises a gzip-compressed layer by itself.
        run(Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(&rootfs)
            .arg("--no-same-owner"));
    }

    // Exactly these files: no shell, no package manager, no libc, nothing to exec but the
    // operator itself.
    let files: BTreeSet<String> = tree(&rootfs)
        .into_iter()
        .filter(|p| !p.ends_with('/'))
        .collect();
    let expected: BTreeSet<String> = [
        "etc/group",
        "etc/passwd",
        "etc/ssl/certs/ca-certificates.crt",
        "portcullis",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files, expected, "the image's files");
    assert!(!rootfs.join("bin/sh").exists());

    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "/etc/passwd names 65532: {passwd}"
    );
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let certificates = bundle.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(
        certificates > 50,
        "the CA bundle holds the public roots, not {certificates} certificates"
    );

    let binary = std::fs::read(rootfs.join("portcullis")).unwrap();
    assert!(
        !has_interpreter(&binary),
        "/portcullis is dynamically linked; the image has no libc"
    );

    skopeo_copies_it(&archive, dir.path(), &config);
    skopeo_copies_it_to_a_directory(&archive, dir.path());

    // Run it from the image's root filesystem: under chroot nothing of the host is reachable,
    // so this also proves the binary needs nothing the image lacks.
    let version = if is_root() {
        run(Command::new("chroot")
            .arg(format!("--userspec={NONROOT}"))
            .arg(&rootfs)
            .arg("/portcullis")
            .arg("--version"))
    } else {
        run(Command::new(rootfs.join("portcullis")).arg("--version"))
    };
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
}
