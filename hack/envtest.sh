#!/usr/bin/env bash
# hack/envtest.sh — provide a real Kubernetes test control plane's binaries.
#
# Prints on stdout, as its only output there, one line: the absolute path of
# a directory holding executable `etcd`, `kube-apiserver` and
# `kube-controller-manager` (Kubernetes 1.20.2, etcd 3.4). Progress messages
# go to stderr. Typical use:
#
#     KUBEBUILDER_ASSETS="$(bash hack/envtest.sh)"
#
# How the binaries are found, in order:
#   1. $KUBEBUILDER_ASSETS, if set and it holds all three executables (e.g.
#      binaries fetched by controller-runtime's setup-envtest): used as is.
#   2. The cache dir ${PORTCULLIS_ENVTEST_CACHE:-$HOME/.cache/portcullis/envtest}/1.20.2-p2,
#      if it holds all three and `kube-apiserver --version` runs: fast path.
#   3. Otherwise they are built (needs root and Debian bookworm's package
#      archive; takes roughly 5 minutes on 2 cores):
#        - etcd is copied from Debian's `etcd-server` package;
#        - kube-apiserver and kube-controller-manager are compiled from
#          Debian bookworm's `kubernetes` source package
#          (1.20.5+really1.20.2-1.1+deb12u1) with Debian's `golang-go` (1.19),
#          in GOPATH mode, under `nice -n 10`.
#      The build runs under an exclusive flock on <cache parent>/build.lock,
#      so concurrent callers build once. Its log is <cache parent>/build.log;
#      its tail is printed on failure. The source tree is deleted afterwards.
#
# Environment variables honoured:
#   KUBEBUILDER_ASSETS        dir with prebuilt binaries; skips everything else
#   PORTCULLIS_ENVTEST_CACHE  cache parent dir (default ~/.cache/portcullis/envtest)
set -euo pipefail

readonly K8S_VERSION="1.20.2"
readonly K8S_GIT_COMMIT="faecb196815e248d3ecfb03c680a4507229c2a56" # tag v1.20.2
readonly K8S_SRC_PKG="kubernetes"
readonly K8S_SRC_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
readonly K8S_ORIG_TARBALL="kubernetes_1.20.5+really1.20.2.orig.tar.gz"
readonly APT_PACKAGES=(etcd-server golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev)
readonly SRC_LIST="/etc/apt/sources.list.d/portcullis-envtest-bookworm-src.sources"
readonly DEFAULT_DEBIAN_URI="http://deb.debian.org/debian"
readonly BINARIES=(etcd kube-apiserver kube-controller-manager)

CACHE_PARENT="${PORTCULLIS_ENVTEST_CACHE:-${HOME}/.cache/portcullis/envtest}"
# The build recipe's revision: bump it whenever the patches below change, so caches of
# binaries built the old way are not used.
readonly BUILD_REVISION="p2"
CACHE_DIR="${CACHE_PARENT}/${K8S_VERSION}-${BUILD_REVISION}"
LOCK_FILE="${CACHE_PARENT}/build.lock"
BUILD_LOG="${CACHE_PARENT}/build.log"
WORK_DIR=""
STEP="start"

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
    timeout 30 "${dir}/kube-apiserver" --version >/dev/null 2>&1 || return 1
}

print_dir() {
    (cd "$1" && pwd -P)
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

# --- 3. build -----------------------------------------------------------------
cleanup() {
    if [[ -n "${WORK_DIR}" && -d "${WORK_DIR}" ]]; then
        chmod -R u+w "${WORK_DIR}" 2>/dev/null || true
        rm -rf "${WORK_DIR}"
    fi
}

on_exit() {
    local rc=$?
    cleanup
    if [[ ${rc} -ne 0 ]]; then
        log "FAILED at step: ${STEP} (exit ${rc})"
        if [[ -f "${BUILD_LOG}" ]]; then
            log "last lines of ${BUILD_LOG}:"
            tail -n 40 "${BUILD_LOG}" >&2 || true
        fi
    fi
}
trap on_exit EXIT

# run STEP_NAME CMD...: run CMD with its output appended to the build log.
run() {
    STEP="$1"
    shift
    log "${STEP}..."
    {
        printf '\n=== %s: %s\n' "$(date -u +%FT%TZ)" "${STEP}"
        printf '+ %s\n' "$*"
    } >>"${BUILD_LOG}"
    "$@" >>"${BUILD_LOG}" 2>&1 || die "step '${STEP}' failed (see ${BUILD_LOG})"
}

# debian_uri: the archive URI the machine's own Debian apt sources use.
debian_uri() {
    local uri="" f
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ "${f}" == "${SRC_LIST}" ]] && continue
        # deb822: take URIs of the first stanza whose Suites has plain "bookworm".
        uri="$(awk '
            function flush() {
                if (suite_ok && u != "" && out == "") out = u
                suite_ok = 0; u = ""
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            tolower($1) == "uris:"   { u = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite_ok = 1 }
            END { flush(); if (out != "") print out }
        ' "${f}")"
        [[ -n "${uri}" ]] && break
    done
    if [[ -z "${uri}" ]]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f "${f}" ]] || continue
            # one-line style: deb [opts] URI SUITE COMPONENTS...
            uri="$(awk '
                $1 != "deb" { next }
                {
                    i = 2
                    if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == "bookworm") { print $i; exit }
                }
            ' "${f}")"
            [[ -n "${uri}" ]] && break
        done
    fi
    shopt -u nullglob
    if [[ -z "${uri}" ]]; then
        log "no Debian bookworm apt source found; falling back to ${DEFAULT_DEBIAN_URI}"
        uri="${DEFAULT_DEBIAN_URI}"
    fi
    printf '%s\n' "${uri%/}"
}

apt_has_candidate() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }')"
    [[ -n "${cand}" && "${cand}" != "(none)" ]]
}

install_packages() {
    local pkg missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("${pkg}")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "apt packages already installed: ${APT_PACKAGES[*]}"
        return 0
    fi
    local need_update=0
    for pkg in "${missing[@]}"; do
        apt_has_candidate "${pkg}" || need_update=1
    done
    if [[ ${need_update} -eq 1 ]]; then
        run "apt-get update" apt-get update
    fi
    run "apt-get install ${missing[*]}" \
        apt-get install -y --no-install-recommends "${missing[@]}"
}

add_deb_src() {
    local uri want
    uri="$(debian_uri)"
    want="Types: deb-src
URIs: ${uri}
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    if [[ ! -f "${SRC_LIST}" || "$(cat "${SRC_LIST}")" != "${want}" ]]; then
        STEP="write ${SRC_LIST}"
        log "adding deb-src source ${uri} bookworm main (${SRC_LIST})"
        printf '%s\n' "${want}" >"${SRC_LIST}"
        run "apt-get update (deb-src)" apt-get update
    elif ! apt-cache showsrc "${K8S_SRC_PKG}" 2>/dev/null \
        | grep -qx "Version: ${K8S_SRC_VERSION}"; then
        run "apt-get update (deb-src)" apt-get update
    fi
}

build() {
    mkdir -p "${CACHE_PARENT}"
    : >"${BUILD_LOG}"
    export DEBIAN_FRONTEND=noninteractive

    STEP="check root"
    [[ ${EUID} -eq 0 ]] || die "building needs root (apt-get); or set KUBEBUILDER_ASSETS"

    install_packages
    command -v go >/dev/null || die "go not found after installing golang-go"
    [[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd not found after installing etcd-server"

    add_deb_src

    WORK_DIR="$(mktemp -d "${CACHE_PARENT}/build.XXXXXX")"
    local staging="${WORK_DIR}/out"
    mkdir -p "${staging}"

    run "copy etcd" cp /usr/bin/etcd "${staging}/etcd"

    run "apt-get source ${K8S_SRC_PKG}=${K8S_SRC_VERSION}" \
        env -C "${WORK_DIR}" apt-get source --download-only "${K8S_SRC_PKG}=${K8S_SRC_VERSION}"
    [[ -f "${WORK_DIR}/${K8S_ORIG_TARBALL}" ]] \
        || die "step 'apt-get source' did not produce ${K8S_ORIG_TARBALL}"

    local tree="${WORK_DIR}/src"
    mkdir -p "${tree}"
    run "untar ${K8S_ORIG_TARBALL}" \
        tar -xzf "${WORK_DIR}/${K8S_ORIG_TARBALL}" -C "${tree}" --strip-components=1
    [[ -f "${tree}/Makefile" ]] || die "step 'untar' gave no Makefile in ${tree}"

    # Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, whose map iteration
    # corrupts memory under Go >= 1.18 (SIGSEGV in mapiterinit when the API server encodes
    # an unstructured object, e.g. on every custom resource create). Use Debian's v1.0.2.
    run "vendor reflect2 v1.0.2" rsync -a --delete \
        /usr/share/gocode/src/github.com/modern-go/reflect2/ "${tree}/vendor/github.com/modern-go/reflect2/"

    # kube-openapi's type validator tests "is data the zero value" with
    # reflect.DeepEqual(reflect.Zero(T), reflect.ValueOf(data)), which compares reflect.Value
    # internals; since Go 1.16 reflect.Zero shares one zero buffer, so an empty string in a
    # custom resource is taken for null ("must be of type string: \"null\""). Before Go 1.16
    # that expression was always false: make it so (go-openapi/validate#137).
    local typego="${tree}/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"
    STEP="patch ${typego##*/vendor/}"
    grep -q 'data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))' "${typego}" \
        || die "step '${STEP}': the expected zero-value check is not in ${typego}"
    sed -i 's/data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))/data == nil/' "${typego}"

    # GOPATH layout as Debian's build uses: .go/src/k8s.io/kubernetes -> tree.
    # (make -C resolves the symlink and hack/lib/golang.sh then sets up its own
    # GOPATH under _output/local/go; GO111MODULE=off builds the vendored tree.)
    STEP="GOPATH layout"
    mkdir -p "${tree}/.go/src/k8s.io"
    ln -sfn ../../.. "${tree}/.go/src/k8s.io/kubernetes"

    # The tarball has no .git: hand hack/lib/version.sh the version so the
    # binaries report v1.20.2 and git is never consulted (it could otherwise
    # pick up an enclosing repository, e.g. when the cache is inside one).
    log "compiling kube-apiserver and kube-controller-manager (several minutes; log: ${BUILD_LOG})"
    run "make kube-apiserver kube-controller-manager" \
        env GOPATH="${tree}/.go" GOCACHE="${WORK_DIR}/gocache" CGO_ENABLED=0 \
        GO111MODULE=off GOFLAGS= \
        KUBE_GIT_VERSION="v${K8S_VERSION}" KUBE_GIT_COMMIT="${K8S_GIT_COMMIT}" \
        KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR="${K8S_VERSION%%.*}" \
        KUBE_GIT_MINOR="$(cut -d. -f2 <<<"${K8S_VERSION}")" \
        nice -n 10 make -C "${tree}/.go/src/k8s.io/kubernetes" \
        WHAT="cmd/kube-apiserver cmd/kube-controller-manager"

    local bin
    for bin in kube-apiserver kube-controller-manager; do
        run "copy ${bin}" cp "${tree}/_output/local/bin/linux/amd64/${bin}" "${staging}/${bin}"
    done
    chmod 0755 "${staging}"/*

    STEP="verify built binaries"
    cache_ok "${staging}" || die "built kube-apiserver does not run (--version failed)"

    # Publish atomically-ish: replace the cache dir with the staged one.
    STEP="install into ${CACHE_DIR}"
    rm -rf "${CACHE_DIR}"
    mv "${staging}" "${CACHE_DIR}"

    STEP="cleanup"
    cleanup
    WORK_DIR=""
    log "built into ${CACHE_DIR}"
}

STEP="lock"
mkdir -p "${CACHE_PARENT}" || die "cannot create ${CACHE_PARENT}"
exec {lock_fd}>"${LOCK_FILE}"
if ! flock -n "${lock_fd}"; then
    log "another envtest build holds ${LOCK_FILE}; waiting for it..."
    flock "${lock_fd}"
fi

# Re-check: a concurrent caller may have finished the build meanwhile.
if cache_ok "${CACHE_DIR}"; then
    print_dir "${CACHE_DIR}"
    exit 0
fi

log "no usable binaries in ${CACHE_DIR}; building them (about 5 minutes)"
start_s=${SECONDS}
build
log "build took $((SECONDS - start_s))s"
print_dir "${CACHE_DIR}"
