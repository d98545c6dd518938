#!/usr/bin/env bash
# hack/postgres.sh — make sure PostgreSQL's server programs are present, for the database
# secrets engine of the Vault tests and `make demo`.
#
# Prints on stdout, as its only output there, one line: the absolute path of a directory
# holding `initdb`, `postgres` and `psql` (PostgreSQL 15 from Debian bookworm by default).
# Progress messages go to stderr. The tests start their own throwaway cluster from it, on
# loopback, as the `postgres` user when they run as root (PostgreSQL refuses to run as root).
#
# How the directory is found, in order:
#   1. $PORTCULLIS_PG_BIN, if set and it holds initdb and postgres.
#   2. `pg_config --bindir`, then /usr/lib/postgresql/<newest>/bin.
#   3. Otherwise `apt-get install -y postgresql` (as root; Debian's package, with apt's own
#      sources), then 2 again. Installing runs under an exclusive flock, so concurrent callers
#      do it once. Debian's package starts a `main` cluster of its own; the tests never use it.
set -euo pipefail

LOCK_PARENT="${PORTCULLIS_OPENBAO_CACHE:-${HOME}/.cache/portcullis/openbao}"

log() {
    printf 'postgres: %s\n' "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

has_server() {
    [[ -n "$1" && -x "$1/initdb" && -x "$1/postgres" && -x "$1/psql" ]]
}

find_bindir() {
    local dir
    if [[ -n "${PORTCULLIS_PG_BIN:-}" ]]; then
        has_server "${PORTCULLIS_PG_BIN}" || die "PORTCULLIS_PG_BIN=${PORTCULLIS_PG_BIN} lacks initdb, postgres or psql"
        printf '%s\n' "${PORTCULLIS_PG_BIN}"
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if has_server "${dir}"; then
            printf '%s\n' "${dir}"
            return 0
        fi
    fi
    # Debian keeps the server programs out of PATH, one directory per major version.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
        if has_server "${dir}"; then
            printf '%s\n' "${dir}"
            return 0
        fi
    done
    return 1
}

if dir="$(find_bindir)"; then
    printf '%s\n' "$(cd "${dir}" && pwd -P)"
    exit 0
fi

[[ ${EUID} -eq 0 ]] || die "PostgreSQL's server programs are missing: install Debian's postgresql (needs root), or set PORTCULLIS_PG_BIN"
mkdir -p "${LOCK_PARENT}"
exec {lock_fd}>"${LOCK_PARENT}/postgres.lock"
flock "${lock_fd}"
if ! dir="$(find_bindir)"; then
    export DEBIAN_FRONTEND=noninteractive
    log "installing Debian's postgresql"
    if ! apt-get install -y --no-install-recommends postgresql >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends postgresql >&2
    fi
    dir="$(find_bindir)" || die "no initdb/postgres/psql after installing postgresql"
fi
printf '%s\n' "$(cd "${dir}" && pwd -P)"
