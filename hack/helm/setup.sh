#!/usr/bin/env bash
# Creates (once) a Python virtualenv with helm-sdkpy (Helm's own Go library behind a Python API)
# and PyYAML (for values files), for the chart tests (tests/chart.rs) and hack/helm/chart.py.
# Prints the venv's python on stdout, and nothing else there; progress goes to stderr.
#
#   PORTCULLIS_HELM_VENV   where the venv lives (default ~/.cache/portcullis/helm-venv)
#   PYTHON                 the interpreter to build it with (default python3; 3.11 works)
#
# helm-sdkpy declares a newer Python than 3.11, but its wheel is a cffi wrapper around a Go
# shared library (Helm v4) and runs on 3.11: hence --ignore-requires-python. Idempotent: when the
# venv already imports both packages at the pinned versions, it returns at once.
set -euo pipefail

HELM_SDKPY_VERSION="${HELM_SDKPY_VERSION:-0.1.32}"
PYYAML_VERSION="${PYYAML_VERSION:-6.0.3}"
VENV="${PORTCULLIS_HELM_VENV:-$HOME/.cache/portcullis/helm-venv}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"

installed() {
    [ -x "$PY" ] && "$PY" - "$HELM_SDKPY_VERSION" "$PYYAML_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import helm_sdkpy  # noqa: F401
import yaml  # noqa: F401
sys.exit(0 if (version("helm-sdkpy"), version("PyYAML")) == (sys.argv[1], sys.argv[2]) else 1)
PYEOF
}

if installed; then
    echo "$PY"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
# Two test binaries may set it up at once: one at a time.
exec 9>"$VENV.lock"
flock 9
if ! installed; then
    echo "hack/helm/setup.sh: installing helm-sdkpy $HELM_SDKPY_VERSION and PyYAML $PYYAML_VERSION into $VENV" >&2
    if [ ! -x "$PY" ]; then
        "$PYTHON" -m venv "$VENV" >&2 || {
            echo "hack/helm/setup.sh: '$PYTHON -m venv' failed; on Debian: apt-get install python3-venv" >&2
            exit 1
        }
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check --ignore-requires-python \
        "helm-sdkpy==$HELM_SDKPY_VERSION" "PyYAML==$PYYAML_VERSION" >&2
    installed || {
        echo "hack/helm/setup.sh: helm_sdkpy or yaml does not import in $VENV after pip install" >&2
        exit 1
    }
fi
echo "$PY"
