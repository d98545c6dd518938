#!/usr/bin/env bash
# hack/envtest.sh — provide a real Kubernetes test control plane's binaries.
#
# Prints on stdout, as its only output there, one line: the absolute path of
# a directory holding executable `etcd`, `kube-apiserver` and
# `kube-controller-manager` (Kubernetes 1.36.2 by default). Progress messages
# go to stderr. Typical use:
#
#     KUBEBUILDER_ASSETS="$(bash hack/envtest.sh)"
#
# How the binaries are found, in order:
#   1. $KUBEBUILDER_ASSETS, if set and it holds all three executables (e.g.
#      binaries fetched by controller-runtime's setup-envtest): used as is.
#   2. The cache dir ${PORTCULLIS_ENVTEST_CACHE:-$HOME/.cache/portcullis/envtest}/1.36.2,
#      if it holds all three and `kube-apiserver --version` runs: fast path.
#   3. Otherwise the cache is filled:
#        - etcd is copied from Debian's `etcd-server` package (installed with
#          apt-get when missing; needs root);
#        - kube-apiserver and kube-controller-manager are unpacked from the
#          archive kubernetes-v1.36.2-linux-amd64.tar.xz, checked against its
#          pinned SHA-256. The archive is looked for at $PORTCULLIS_K8S_ARCHIVE,
#          then in the `shared/kubernetes/` folder beside this repository (where
#          the team's machines and CI keep it; its README says how it was built).
#      Without the archive, the script stops and says how to get binaries with
#      setup-envtest instead.
#      Filling the cache runs under an exclusive flock on <cache parent>/build.lock,
#      so concurrent callers do it once.
#
# Environment variables honoured:
#   KUBEBUILDER_ASSETS        dir with prebuilt binaries; skips everything else
#   PORTCULLIS_ENVTEST_CACHE  cache parent dir (default ~/.cache/portcullis/envtest)
#   PORTCULLIS_K8S_ARCHIVE    path of kubernetes-v1.36.2-linux-amd64.tar.xz
set -euo pipefail

readonly K8S_VERSION="1.36.2"
readonly ARCHIVE_NAME="kubernetes-v${K8S_VERSION}-linux-amd64.tar.xz"
readonly ARCHIVE_SHA256="4cd9d8c26e0a7ff080cdac4d18915ef6df201ecaf72634d184e606e8db122a70"
readonly BINARIES=(etcd kube-apiserver kube-controller-manager)

CACHE_PARENT="${PORTCULLIS_ENVTEST_CACHE:-${HOME}/.cache/portcullis/envtest}"
CACHE_DIR="${CACHE_PARENT}/${K8S_VERSION}"
LOCK_FILE="${CACHE_PARENT}/build.lock"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

log() {
    printf 'envtest: %s\n' "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

# has_binaries DIR: DIR holds all three executables.
has_binaries() {
    local dir="$1" bin
    [[ -n "${dir}" && -d "${dir}" ]] || return 1
    for bin in "${BINARIES[@]}"; do
        [[ -f "${dir}/${bin}" && -x "${dir}/${bin}" ]] || return 1
    done
}

# cache_ok DIR: the binaries are there and kube-apiserver actually runs.
cache_ok() {
    local dir="$1"
    has_binaries "${dir}" || return 1
    timeout 30 "${dir}/kube-apiserver" --version 2>/dev/null | grep -q "v${K8S_VERSION}" || return 1
}

print_dir() {
    (cd "$1" && pwd -P)
}

# find_archive: the path of the pinned control-plane archive, or nothing.
find_archive() {
    local candidate
    for candidate in "${PORTCULLIS_K8S_ARCHIVE:-}" \
        "${REPO}/../shared/kubernetes/${ARCHIVE_NAME}"; do
        if [[ -n "${candidate}" && -f "${candidate}" ]]; then
            printf '%s\n' "${candidate}"
            return 0
        fi
    done
    return 1
}

install_etcd() {
    [[ -x /usr/bin/etcd ]] && return 0
    [[ ${EUID} -eq 0 ]] || die "etcd is missing: install Debian's etcd-server (needs root), or set KUBEBUILDER_ASSETS"
    export DEBIAN_FRONTEND=noninteractive
    log "installing Debian's etcd-server"
    if ! apt-get install -y --no-install-recommends etcd-server >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends etcd-server >&2
    fi
    [[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd not found after installing etcd-server"
}

fill_cache() {
    local archive want got staging
    archive="$(find_archive)" || die "no ${ARCHIVE_NAME}: set PORTCULLIS_K8S_ARCHIVE to it, or point KUBEBUILDER_ASSETS at envtest binaries (for example: setup-envtest use 1.36.x -p path)"
    want="${ARCHIVE_SHA256}"
    got="$(sha256sum "${archive}" | awk '{ print $1 }')"
    [[ "${got}" == "${want}" ]] || die "${archive}: SHA-256 ${got} is not the pinned ${want}"
    install_etcd

    staging="$(mktemp -d "${CACHE_PARENT}/fill.XXXXXX")"
    trap 'rm -rf "${staging}"' EXIT
    log "unpacking ${archive}"
    tar -xJf "${archive}" -C "${staging}"
    local bin found
    for bin in kube-apiserver kube-controller-manager; do
        found="$(find "${staging}" -type f -name "${bin}" | head -n 1)"
        [[ -n "${found}" ]] || die "${archive} holds no ${bin}"
        [[ "${found}" == "${staging}/${bin}" ]] || mv "${found}" "${staging}/${bin}"
    done
    cp /usr/bin/etcd "${staging}/etcd"
    chmod 0755 "${staging}/etcd" "${staging}/kube-apiserver" "${staging}/kube-controller-manager"
    cache_ok "${staging}" || die "the unpacked kube-apiserver does not run (--version failed)"
    rm -rf "${CACHE_DIR}"
    mkdir -p "${CACHE_DIR}"
    mv "${staging}/etcd" "${staging}/kube-apiserver" "${staging}/kube-controller-manager" "${CACHE_DIR}/"
    rm -rf "${staging}"
    trap - EXIT
    log "cached in ${CACHE_DIR}"
}

# --- 1. $KUBEBUILDER_ASSETS -------------------------------------------------
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    if has_binaries "${KUBEBUILDER_ASSETS}"; then
        log "using KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS}"
        print_dir "${KUBEBUILDER_ASSETS}"
        exit 0
    fi
    log "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS} lacks one of: ${BINARIES[*]}; ignoring it"
fi

# --- 2. cache fast path -----------------------------------------------------
if cache_ok "${CACHE_DIR}"; then
    print_dir "${CACHE_DIR}"
    exit 0
fi

# --- 3. fill the cache, once ------------------------------------------------
mkdir -p "${CACHE_PARENT}" || die "cannot create ${CACHE_PARENT}"
exec {lock_fd}>"${LOCK_FILE}"
flock "${lock_fd}"
cache_ok "${CACHE_DIR}" || fill_cache
print_dir "${CACHE_DIR}"
