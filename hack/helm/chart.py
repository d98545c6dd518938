#!/usr/bin/env python3
"""Helm, through Helm's own Go library (helm-sdkpy), for the Portcullis chart.

Run it with the venv's python from hack/helm/setup.sh:

    PY=$(bash hack/helm/setup.sh)
    $PY hack/helm/chart.py lint charts/portcullis [-f my-values.yaml]
    $PY hack/helm/chart.py template charts/portcullis -f my-values.yaml [--kube-version 1.30.0]
    $PY hack/helm/chart.py install charts/portcullis --release portcullis -n portcullis-system \
        --kubeconfig ~/.kube/config [-f values.yaml] [--take-ownership]
    $PY hack/helm/chart.py upgrade   ... (same options)
    $PY hack/helm/chart.py uninstall --release portcullis -n portcullis-system --kubeconfig ...

`lint` prints Helm's lint result as JSON and exits 1 on a warning or an error; with `-f` or
`--set-json` it lints a copy of the chart whose values.yaml has those values merged in. `template` prints
the rendered manifests (YAML, one document per object, CRDs of crds/ excluded, as `helm template`
does). install/upgrade/uninstall print a JSON summary (name, namespace, revision, status,
manifest, notes) and never wait for Pods (`wait=False`): they return once the API server has
accepted every object.

helm-sdkpy has no `helm template` (client-only install). `template` therefore runs a real Helm
install against a stand-in API server on 127.0.0.1 that this script serves for the duration of
the call: it answers discovery for the kinds the chart uses (as Kubernetes `--kube-version` would),
says every object is absent (so `lookup` finds nothing, exactly as under `helm template`), reports
the CRDs of crds/ as already installed, accepts every create without storing anything, and keeps
the release in memory (HELM_DRIVER=memory). Nothing reaches a real cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Resource lists served by the stand-in API server: (group, version, kind, plural, namespaced),
# and the Kubernetes minor version a group/version first appeared in (and last, if removed).
RESOURCES: list[tuple[str, str, str, str, bool, int, int | None]] = [
    ("", "v1", "Namespace", "namespaces", False, 0, None),
    ("", "v1", "ServiceAccount", "serviceaccounts", True, 0, None),
    ("", "v1", "Secret", "secrets", True, 0, None),
    ("", "v1", "ConfigMap", "configmaps", True, 0, None),
    ("", "v1", "Service", "services", True, 0, None),
    ("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", True, 0, None),
    ("", "v1", "Pod", "pods", True, 0, None),
    ("apps", "v1", "Deployment", "deployments", True, 9, None),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", True, 21, None),
    ("policy", "v1beta1", "PodDisruptionBudget", "poddisruptionbudgets", True, 5, 24),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False, 8, None),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False, 8, None),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles", True, 8, None),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True, 8, None),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", True, 7, None),
    ("coordination.k8s.io", "v1", "Lease", "leases", True, 14, None),
    ("events.k8s.io", "v1", "Event", "events", True, 19, None),
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        False,
        16,
        None,
    ),
    ("portcullis.dev", "v1alpha1", "AIPipeline", "aipipelines", True, 0, None),
    ("portcullis.dev", "v1alpha1", "AccessGuardrail", "accessguardrails", False, 0, None),
    ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors", True, 0, None),
    ("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules", True, 0, None),
]


def die(message: str, code: int = 1) -> None:
    print(f"chart.py: {message}", file=sys.stderr)
    sys.exit(code)


def load_values(paths: list[str], sets: list[str]) -> dict[str, Any]:
    """Merges the values files (YAML or JSON) in order, then --set-json PATH=JSON overrides."""
    merged: dict[str, Any] = {}
    for path in paths:
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                die(f"{path} is not JSON and PyYAML is missing (run hack/helm/setup.sh)")
            data = yaml.safe_load(text)
        if data is None:
            continue
        if not isinstance(data, dict):
            die(f"{path}: values must be a mapping")
        deep_merge(merged, data)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            die(f"--set-json {item!r}: expected PATH=JSON")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            die(f"--set-json {item!r}: {e}")
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return merged


def deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


# --- the stand-in API server for `template` -------------------------------------------------


def stand_in_server(minor: int, git_version: str) -> ThreadingHTTPServer:
    served = [r for r in RESOURCES if r[5] <= minor and (r[6] is None or minor <= r[6])]
    groups: dict[str, list[str]] = {}
    for group, version, *_ in served:
        versions = groups.setdefault(group, [])
        if version not in versions:
            versions.append(version)

    def resource_list(group: str, version: str) -> dict[str, Any] | None:
        items = [r for r in served if r[0] == group and r[1] == version]
        if not items:
            return None
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
                for (_, _, kind, plural, namespaced, _, _) in items
            ],
        }

    def group_list() -> dict[str, Any]:
        out = []
        for group, versions in groups.items():
            if not group:
                continue
            # The newest version is preferred (listed first by the real server too).
            entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
            out.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            if os.environ.get("PORTCULLIS_HELM_DEBUG"):
                sys.stderr.write("stand-in API server: " + (format % args) + "\n")

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def status(self, code: int, reason: str, message: str) -> None:
            self.reply(
                code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": reason,
                    "message": message,
                    "code": code,
                },
            )

        def body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def echo(self, code: int) -> None:
            # The object as sent (JSON, or the protobuf client-go uses for built-in kinds), as a
            # real server would return it after a create.
            data = self.body()
            self.send_response(code)
            self.send_header("Content-Type", self.headers.get("Content-Type") or "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/version":
                self.reply(
                    200,
                    {
                        "major": "1",
                        "minor": str(minor),
                        "gitVersion": git_version,
                        "platform": "linux/amd64",
                    },
                )
            elif path == "/api":
                self.reply(
                    200,
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
                        ],
                    },
                )
            elif path == "/apis":
                self.reply(200, group_list())
            elif path == "/api/v1":
                self.reply(200, resource_list("", "v1"))
            elif path.startswith("/apis/") and path.count("/") == 3:
                _, _, group, version = path.split("/")
                found = resource_list(group, version)
                if found is None:
                    self.status(404, "NotFound", f"the server could not find {path}")
                else:
                    self.reply(200, found)
            else:
                # Every object is absent: Helm finds nothing to conflict with, `lookup` nothing.
                self.status(404, "NotFound", f"{path} not found")

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0].rstrip("/")
            if path.endswith("/customresourcedefinitions"):
                data = self.body()
                # A CRD of crds/ (Helm creates those raw, before rendering, without its ownership
                # annotations): report it as already installed, as on a cluster running
                # Portcullis, so that Helm does not wait for it. A templated CRD is accepted.
                if b"meta.helm.sh/release-name" not in data:
                    self.status(409, "AlreadyExists", "customresourcedefinitions already exists")
                    return
                self.send_response(201)
                self.send_header("Content-Type", self.headers.get("Content-Type") or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.echo(201)

        def do_PUT(self) -> None:  # noqa: N802
            self.echo(200)

        def do_PATCH(self) -> None:  # noqa: N802
            self.status(404, "NotFound", "nothing exists on the stand-in API server")

        def do_DELETE(self) -> None:  # noqa: N802
            self.status(404, "NotFound", "nothing exists on the stand-in API server")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="stand-in-apiserver", daemon=True).start()
    return server


def kube_version(text: str) -> tuple[int, str]:
    parts = text.lstrip("v").split(".")
    if len(parts) < 2 or not parts[0] == "1" or not parts[1].isdigit():
        die(f"--kube-version {text!r}: expected 1.MINOR[.PATCH]")
    patch = parts[2] if len(parts) > 2 else "0"
    return int(parts[1]), f"v1.{parts[1]}.{patch}"


# --- commands -------------------------------------------------------------------------------


def helm():
    try:
        import helm_sdkpy
    except ImportError:
        die("helm_sdkpy is not importable: run this with the python that hack/helm/setup.sh prints")
    return helm_sdkpy


def summary(release: dict[str, Any]) -> dict[str, Any]:
    info = release.get("info") or {}
    return {
        "name": release.get("name"),
        "namespace": release.get("namespace"),
        "revision": release.get("version"),
        "status": info.get("status"),
        "description": info.get("description"),
        "manifest": release.get("manifest", ""),
        "hooks": [h.get("manifest", "") for h in release.get("hooks") or []],
        "notes": info.get("notes", ""),
    }


def cmd_lint(args: argparse.Namespace) -> int:
    h = helm()
    config = h.Configuration(namespace="default")
    values = load_values(args.values, args.set_json)
    with tempfile.TemporaryDirectory(prefix="portcullis-helm-lint-") as tmp:
        chart = Path(args.chart).resolve()
        if values:
            # helm-sdkpy's Lint takes no values: lint a copy of the chart whose values.yaml is
            # the chart's own with these merged in (as `helm lint -f` merges them).
            import yaml  # type: ignore[import-untyped]

            copy = Path(tmp) / chart.name
            shutil.copytree(chart, copy)
            merged = yaml.safe_load((chart / "values.yaml").read_text()) or {}
            deep_merge(merged, values)
            (copy / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
            chart = copy
        result = asyncio.run(h.Lint(config).run(str(chart)))
    # helm-sdkpy serializes each message's error as {}: only severity and path survive.
    # Severities: 1 info, 2 warning, 3 error.
    messages = result.get("Messages") or []
    worst = max((m.get("Severity", 0) for m in messages), default=0)
    print(json.dumps({"messages": messages, "worst_severity": worst}))
    return 1 if worst >= 2 else 0


def cmd_template(args: argparse.Namespace) -> int:
    values = load_values(args.values, args.set_json)
    minor, git_version = kube_version(args.kube_version)
    server = stand_in_server(minor, git_version)
    with tempfile.TemporaryDirectory(prefix="portcullis-helm-template-") as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "stand-in",
                            "cluster": {"server": f"http://127.0.0.1:{server.server_port}"},
                        }
                    ],
                    "users": [{"name": "stand-in", "user": {"token": "stand-in"}}],
                    "contexts": [
                        {
                            "name": "stand-in",
                            "context": {"cluster": "stand-in", "user": "stand-in"},
                        }
                    ],
                    "current-context": "stand-in",
                }
            )
        )
        # Helm's caches and config go to the temp dir, not the user's home.
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            os.environ.setdefault(var, str(Path(tmp) / var.lower()))
        h = helm()
        config = h.Configuration(namespace=args.namespace, kubeconfig=str(kubeconfig))
        try:
            release = asyncio.run(
                h.Install(config).run(
                    args.release, str(Path(args.chart).resolve()), values=values, wait=False
                )
            )
        except h.HelmError as e:
            print(f"chart.py template: {e}", file=sys.stderr)
            return 1
        finally:
            server.shutdown()
    out = summary(release)
    if args.json:
        print(json.dumps(out))
    else:
        # As `helm template` prints them: the manifests, then the hooks (`helm test` Pods).
        docs = [out["manifest"].rstrip("\n")] + [h.strip("\n") for h in out["hooks"] if h.strip()]
        sys.stdout.write("\n---\n".join(d for d in docs if d) + "\n")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """install, upgrade and uninstall, against the cluster of --kubeconfig."""
    command = args.command
    values = load_values(args.values, args.set_json) if command != "uninstall" else {}
    h = helm()
    config = h.Configuration(namespace=args.namespace, kubeconfig=args.kubeconfig)

    async def act() -> Any:
        if command == "uninstall":
            return await h.Uninstall(config).run(args.release, wait=False)
        options: dict[str, Any] = {
            "values": values,
            "wait": False,
            "timeout": args.timeout,
            "take_ownership": args.take_ownership,
        }
        if command == "upgrade":
            options["reset_values"] = True
        action = h.Install(config) if command == "install" else h.Upgrade(config)
        return await action.run(args.release, str(Path(args.chart).resolve()), **options)

    try:
        result = asyncio.run(act())
    except h.HelmError as e:
        print(f"chart.py {command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result if command == "uninstall" else summary(result)))
    return 0


# --- arguments ------------------------------------------------------------------------------
# Each subcommand takes some of these option groups; `cluster` says whether it acts on a real
# cluster (--release, --namespace and --kubeconfig required) or renders only (defaults).


def chart_options(p: argparse.ArgumentParser, cluster: bool) -> None:
    p.add_argument("chart")


def values_options(p: argparse.ArgumentParser, cluster: bool) -> None:
    p.add_argument("-f", "--values", action="append", default=[], help="values file (YAML/JSON)")
    p.add_argument(
        "--set-json", action="append", default=[], metavar="PATH=JSON", help="a.b.c=<json>"
    )


def release_options(p: argparse.ArgumentParser, cluster: bool) -> None:
    if cluster:
        p.add_argument("--release", required=True)
        p.add_argument("-n", "--namespace", required=True)
        p.add_argument("--kubeconfig", required=True)
    else:
        p.add_argument("--release", default="portcullis")
        p.add_argument("-n", "--namespace", default="portcullis-system")


def apply_options(p: argparse.ArgumentParser, cluster: bool) -> None:
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument(
        "--take-ownership",
        action="store_true",
        help="adopt existing objects without Helm's ownership metadata (e.g. the CRDs)",
    )


def template_options(p: argparse.ArgumentParser, cluster: bool) -> None:
    p.add_argument("--kube-version", default="1.30.0", help="Kubernetes version to render for")
    p.add_argument("--json", action="store_true", help="print a JSON summary (manifest, notes)")


RENDER = (chart_options, release_options, template_options, values_options)
APPLY = (chart_options, release_options, apply_options, values_options)

# name, help, what it runs, whether it needs a cluster, its option groups.
COMMANDS = [
    ("lint", "helm lint", cmd_lint, False, (chart_options, values_options)),
    ("template", "render without a cluster", cmd_template, False, RENDER),
    ("install", "helm install (wait=False)", cmd_release, True, APPLY),
    ("upgrade", "helm upgrade (wait=False)", cmd_release, True, APPLY),
    ("uninstall", "helm uninstall (wait=False)", cmd_release, True, (release_options,)),
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chart.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, about, run, cluster, groups in COMMANDS:
        p = sub.add_parser(name, help=about)
        for group in groups:
            group(p, cluster)
        p.set_defaults(run=run)

    args = parser.parse_args(argv)
    if args.command == "template":
        # The release lives in memory only; read by Helm when its library starts, so set first.
        os.environ["HELM_DRIVER"] = "memory"
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
