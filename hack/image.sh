#!/usr/bin/env bash
# hack/image.sh — `make image`: build the operator's OCI image without Docker and without any
# registry, and write it as an OCI archive.
#
#   1. The binary: `cargo build --release` for <arch>-unknown-linux-musl, statically linked
#      (the Rust target is added with rustup, musl-gcc compiles ring's C and assembly parts).
#   2. A root filesystem: the binary, the CA bundle of the machine's ca-certificates package,
#      and /etc/passwd and /etc/group naming the one user, nonroot (65532). No shell, no libc.
#   3. The image: the repository's Dockerfile (FROM scratch) built by podman with the `vfs`
#      storage driver in target/image/storage (no daemon, no overlay mounts, no registry).
#   4. The archive: `podman save --format oci-archive`, which `kind load image-archive`,
#      `ctr images import`, `skopeo copy oci-archive:...` and `podman load` accept.
#
# Missing tools (podman, musl-gcc, the CA bundle, and skopeo for the test) are installed with
# apt-get (as root).
# Prints the archive's path, the image's size and the build time; tests/image.rs
# (`make test-image`) inspects the archive.
#
# Environment: IMAGE (default portcullis:<version>), IMAGE_ARCHIVE (default
# target/image/portcullis-<version>-<arch>.oci.tar), CARGO_TARGET_DIR (default target).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "${REPO}"
started=$(date +%s)

log() { printf 'image: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) die "no image for $(uname -m): build on x86_64 or aarch64" ;;
esac
target="$(uname -m)-unknown-linux-musl"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
image="${IMAGE:-portcullis:${version}}"
out_dir="${REPO}/target/image"
archive="${IMAGE_ARCHIVE:-${out_dir}/portcullis-${version}-${arch}.oci.tar}"
cargo_target="${CARGO_TARGET_DIR:-${REPO}/target}"

# The Debian packages that provide the tools, installed when a tool is missing.
need=()
command -v podman >/dev/null || need+=(podman)
# Not for the build: tests/image.rs copies the archive with skopeo, as a user would.
command -v skopeo >/dev/null || need+=(skopeo)
command -v musl-gcc >/dev/null || need+=(musl-tools)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "${target}"; then
    log "adding the Rust target ${target}"
    rustup target add "${target}" >&2
fi

log "building portcullis ${version} for ${target}"
export "CC_${target//-/_}=musl-gcc"
cargo build --release --locked --bin portcullis --target "${target}" >&2
binary="${cargo_target}/${target}/release/portcullis"
# A static binary has no program interpreter (PT_INTERP): it needs nothing from the image.
if readelf -l "${binary}" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "${binary} is dynamically linked; the image has no libc"
fi

context="${out_dir}/context"
rootfs="${context}/rootfs-${arch}"
rm -rf "${context}"
mkdir -p "${rootfs}/etc/ssl/certs" "${rootfs}/tmp"
install -m 0755 "${binary}" "${rootfs}/portcullis"
# Debug line tables stay in the file for backtraces; the symbol table is not needed.
strip --strip-unneeded "${rootfs}/portcullis" 2>/dev/null || true
install -m 0644 /etc/ssl/certs/ca-certificates.crt "${rootfs}/etc/ssl/certs/ca-certificates.crt"
printf 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' >"${rootfs}/etc/passwd"
printf 'nonroot:x:65532:\n' >"${rootfs}/etc/group"
chmod 1777 "${rootfs}/tmp"

# podman's own storage under target/: vfs needs no kernel overlay support, and nothing is
# written to the machine's container storage.
podman_() {
    podman --root "${out_dir}/storage" --runroot "${out_dir}/run" --storage-driver vfs \
        --cgroup-manager cgroupfs --events-backend none "$@"
}
log "building ${image}"
podman_ build --quiet --pull=never --no-cache --platform "linux/${arch}" \
    --build-arg "TARGETARCH=${arch}" --build-arg "VERSION=${version}" \
    --file "${REPO}/Dockerfile" --tag "${image}" "${context}" >&2
rm -f "${archive}"
podman_ save --format oci-archive --output "${archive}" "${image}" >&2
# The previous build's image, untagged by this one, is not kept.
podman_ image prune --force >/dev/null 2>&1 || true

elapsed=$(($(date +%s) - started))
size=$(podman_ image inspect --format '{{.Size}}' "${image}")
log "image ${image}: $((size / 1024)) KiB unpacked; archive $(($(stat -c %s "${archive}") / 1024)) KiB; built in ${elapsed} s"
echo "${archive}"
