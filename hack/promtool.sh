#!/usr/bin/env bash
# Prints the path of promtool (Prometheus's rule checker), installing Debian's `prometheus`
# package (which ships it) when it is missing; needs root then. Nothing is started: the tests
# run `promtool check rules` and `promtool test rules` on files only.
set -euo pipefail
if ! command -v promtool >/dev/null; then
    [[ ${EUID} -eq 0 ]] || { echo "hack/promtool.sh: promtool is missing; apt-get install prometheus (as root)" >&2; exit 1; }
    echo "hack/promtool.sh: installing Debian's prometheus package for promtool" >&2
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the package's service is not started by the install.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d.portcullis
    chmod +x /usr/sbin/policy-rc.d.portcullis
    trap 'rm -f /usr/sbin/policy-rc.d.portcullis' EXIT
    install_() { apt-get install -y --no-install-recommends prometheus >&2; }
    if [[ -e /usr/sbin/policy-rc.d ]]; then
        install_ || { apt-get update >&2 && install_; }
    else
        cp /usr/sbin/policy-rc.d.portcullis /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d /usr/sbin/policy-rc.d.portcullis' EXIT
        install_ || { apt-get update >&2 && install_; }
    fi
fi
command -v promtool
