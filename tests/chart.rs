//! The Helm chart (charts/portcullis), with Helm's own library (helm-sdkpy, through
//! hack/helm/chart.py) against the test control plane: it lints; it renders for several sets of
//! values, and every rendered object passes a server-side dry run; its CRDs are the repository's;
//! installed, the operator's ServiceAccount can do exactly what the operator needs and nothing
//! more (SubjectAccessReviews), and the real operator, running as that ServiceAccount, makes an
//! example pipeline Ready; an upgrade changes the Deployment and keeps the audit key; an uninstall
//! leaves the CRDs and the key behind.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom, as the user would go"
)]

mod support;

use support::{WAIT, root};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::Operator;

/// The control plane's Kubernetes version: renders meant for it use its API versions.
const KUBE_VERSION: &str = "1.36.2";
/// The field manager of the dry runs.
const DRY_RUN_MANAGER: &str = "portcullis-chart-test";
/// Where the chart mounts the operator's projected ServiceAccount token for Vault.
const VAULT_TOKEN_PATH: &str = "/var/run/secrets/portcullis/vault/token";
/// Where the chart mounts Vault's CA bundle (vault.caCert).
const VAULT_CA_PATH: &str = "/etc/portcullis/vault-ca/ca.crt";

fn chart_dir() -> PathBuf {
    root().join("charts/portcullis")
}

// --- Helm, through hack/helm/chart.py ----------------------------------------------------------

/// The python of the helm-sdkpy venv, set up (once per test binary) by hack/helm/setup.sh.
fn helm_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("hack/helm/setup.sh"))
            .current_dir(root())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run hack/helm/setup.sh");
        assert!(
            out.status.success(),
            "hack/helm/setup.sh failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            python.is_file(),
            "hack/helm/setup.sh printed {python:?}, not a python"
        );
        python
    })
}

/// What a chart.py run printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `hack/helm/chart.py ARGS` (blocking), with `values` in a temporary JSON file (`-f`).
fn chart_py(args: &[&str], values: Option<&Value>) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(helm_python());
    command.arg(root().join("hack/helm/chart.py")).args(args);
    if let Some(values) = values {
        let file = dir.path().join("values.json");
        std::fs::write(
            &file,
            serde_json::to_vec_pretty(values).expect("values serialize"),
        )
        .expect("values file written");
        command.arg("-f").arg(&file);
    }
    // Helm's caches and config stay in the temp dir.
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        command.env(var, dir.path().join(sub));
    }
    let out = command
        .current_dir(root())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run hack/helm/chart.py");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `chart_py` on the blocking pool, for async tests.
async fn chart_py_async(args: Vec<String>, values: Option<Value>) -> Run {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        chart_py(&args, values.as_ref())
    })
    .await
    .expect("chart.py thread")
}

/// The objects of a manifest (multi-document YAML).
fn objects(manifest: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(manifest)
        .unwrap_or_else(|e| panic!("the rendered manifest is not YAML: {e}\n{manifest}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm lint` of the chart, with `values` merged into its values.yaml.
fn lint(values: Option<&Value>) -> Run {
    chart_py(&["lint", chart_dir().to_str().expect("utf-8 path")], values)
}

/// Renders the chart (Helm's template engine, no cluster) for Kubernetes `kube_version`.
fn render(release: &str, namespace: &str, values: &Value, kube_version: &str) -> Vec<Value> {
    let run = chart_py(
        &[
            "template",
            chart_dir().to_str().expect("utf-8 path"),
            "--release",
            release,
            "--namespace",
            namespace,
            "--kube-version",
            kube_version,
        ],
        Some(values),
    );
    assert!(
        run.ok,
        "rendering with {values} failed:\n{}{}",
        run.stderr, run.stdout
    );
    objects(&run.stdout)
}

/// The error Helm gives when rendering with `values` (which must fail).
fn render_error(values: &Value) -> String {
    let run = chart_py(
        &[
            "template",
            chart_dir().to_str().expect("utf-8 path"),
            "--kube-version",
            KUBE_VERSION,
        ],
        Some(values),
    );
    assert!(
        !run.ok,
        "rendering with {values} should fail, and printed:\n{}",
        run.stdout
    );
    run.stderr
}

/// A release action (install/upgrade/uninstall) against the test control plane; returns its JSON
/// summary.
async fn helm(action: &str, release: &str, namespace: &str, values: Option<Value>) -> Value {
    helm_with(action, release, namespace, values, &[]).await
}

async fn helm_with(
    action: &str,
    release: &str,
    namespace: &str,
    values: Option<Value>,
    extra: &[&str],
) -> Value {
    let cp = support::control_plane();
    let mut args = vec![action.to_string()];
    if action != "uninstall" {
        args.push(chart_dir().display().to_string());
    }
    args.extend([
        "--release".into(),
        release.into(),
        "--namespace".into(),
        namespace.into(),
        "--kubeconfig".into(),
        cp.kubeconfig().display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = chart_py_async(args, values).await;
    assert!(
        run.ok,
        "helm {action} {release} in {namespace} failed:\n{}",
        run.stderr
    );
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("chart.py {action} printed no JSON ({e}): {}", run.stdout))
}

/// Installs the chart with `values` as `release` in `namespace`; returns the objects of its
/// manifest, checked with `check_common`.
async fn install(release: &str, namespace: &str, values: Value) -> Vec<Value> {
    let installed = helm("install", release, namespace, Some(values.clone())).await;
    assert_eq!(installed["status"], json!("deployed"), "{installed}");
    let manifest = objects(installed["manifest"].as_str().expect("manifest"));
    check_common(&manifest, &values);
    manifest
}

// --- rendered objects ------------------------------------------------------------------------------

fn kind_of(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn name_of(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind_of(o) == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn operator_container(objects: &[Value]) -> &Value {
    let deployment = one(objects, "Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

fn args_of(objects: &[Value]) -> Vec<String> {
    strings(&operator_container(objects)["args"])
}

/// Every RBAC rule of every ClusterRole and Role, with the object it is in.
fn rules(objects: &[Value]) -> Vec<(String, Value)> {
    objects
        .iter()
        .filter(|o| matches!(kind_of(o), "ClusterRole" | "Role"))
        .flat_map(|o| {
            let at = format!(
                "{} {}/{}",
                kind_of(o),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                name_of(o)
            );
            o["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (at.clone(), r))
        })
        .collect()
}

/// Checks what holds for every set of values.
fn check_common(objects: &[Value], values: &Value) {
    // Every object but the templated CRDs (which are crds/portcullis.yaml as it is) is labelled.
    for o in objects
        .iter()
        .filter(|o| kind_of(o) != "CustomResourceDefinition")
    {
        let labels = &o["metadata"]["labels"];
        for label in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ] {
            assert!(
                labels[label].is_string(),
                "{} {} lacks label {label}",
                kind_of(o),
                name_of(o)
            );
        }
    }
    // No wildcard in any rule, and escalate/bind only on Roles.
    for (at, rule) in rules(objects) {
        for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
            assert!(
                !strings(&rule[field]).iter().any(|s| s.contains('*')),
                "{at} has a wildcard in {field}: {rule}"
            );
        }
        let verbs = strings(&rule["verbs"]);
        if verbs.iter().any(|v| v == "escalate" || v == "bind") {
            assert_eq!(
                (
                    strings(&rule["apiGroups"]),
                    strings(&rule["resources"]),
                    verbs.len()
                ),
                (
                    vec!["rbac.authorization.k8s.io".to_string()],
                    vec!["roles".to_string()],
                    2
                ),
                "{at}: escalate and bind only on roles, alone in their rule: {rule}"
            );
        }
        assert!(
            !verbs.iter().any(|v| v == "impersonate" || v == "update")
                || strings(&rule["resources"]) == ["aipipelines/finalizers"],
            "{at}: no impersonate, and update only on aipipelines/finalizers: {rule}"
        );
    }

    let deployment = one(objects, "Deployment");
    let replicas = values["replicaCount"].as_i64().unwrap_or(2);
    assert_eq!(deployment["spec"]["replicas"], json!(replicas));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], json!(true));
    assert_eq!(
        pod["securityContext"]["runAsUser"],
        Value::Null,
        "no pin (OpenShift)"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        json!("RuntimeDefault")
    );
    let container = operator_container(objects);
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], json!(false));
    assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
    assert_eq!(sc["runAsNonRoot"], json!(true));
    assert_eq!(sc["runAsUser"], Value::Null, "the image's USER 65532");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], json!("RuntimeDefault"));
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"],
        json!("/healthz")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"],
        json!("/readyz")
    );
    assert_eq!(container["ports"][0]["containerPort"], json!(8080));
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    let env: BTreeMap<String, String> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()?
                    .to_string(),
            ))
        })
        .collect();
    assert_eq!(
        env.get("POD_NAMESPACE").map(String::as_str),
        Some("metadata.namespace")
    );
    assert_eq!(
        env.get("POD_NAME").map(String::as_str),
        Some("metadata.name")
    );

    let mut expected_args: Vec<String> = [
        "run",
        "--audit-log",
        "/var/lib/portcullis/decisions.log",
        "--audit-key",
        "/etc/portcullis/audit-key/key",
        "--metrics-addr",
        "0.0.0.0:8080",
        "--lease-namespace",
        "$(POD_NAMESPACE)",
        "--lease-name",
        "portcullis-leader",
        "--identity",
        "$(POD_NAME)",
        "--concurrency",
        "8",
    ]
    .map(String::from)
    .to_vec();
    if values["admission"]["policies"]["enabled"] != json!(false) {
        expected_args.push("--admission-policies".into());
    }
    let webhook = values["admission"]["webhook"]["enabled"] == json!(true);
    if webhook {
        let port = values["admission"]["webhook"]["port"]
            .as_u64()
            .unwrap_or(9443);
        expected_args.extend([
            "--webhook-addr".to_string(),
            format!("0.0.0.0:{port}"),
            "--webhook-service".into(),
            format!("{}-webhook", fullname(objects)),
            "--webhook-secret".into(),
            format!("{}-webhook-tls", fullname(objects)),
            "--webhook-cert-validity".into(),
            "2160h".into(),
        ]);
    }
    if let Some(ns) = values["watchNamespace"].as_str() {
        expected_args.extend(["--watch-namespace".to_string(), ns.to_string()]);
    }
    expected_args.extend(expected_vault_args(values));
    assert_eq!(args_of(objects), expected_args);
    check_vault_volumes(objects, values);
    if !vault_on(values) {
        // Without Vault: no Secret (but the webhook's own, in its Role), no workload, and no
        // write on an AIPipeline but its status.
        for (at, rule) in rules(objects) {
            if webhook && at.ends_with(&format!("/{}-webhook", fullname(objects))) {
                continue;
            }
            let resources = strings(&rule["resources"]);
            let secrets = resources.iter().any(|r| r == "secrets");
            let workloads = strings(&rule["apiGroups"]).iter().any(|g| g == "apps");
            let pipeline_patch = resources.iter().any(|r| r == "aipipelines")
                && strings(&rule["verbs"]).iter().any(|v| v == "patch");
            assert!(
                !(secrets || workloads || pipeline_patch),
                "{at}: a Vault rule without vault.address: {rule}"
            );
        }
    }

    let pdbs = find(objects, "PodDisruptionBudget");
    if replicas > 1 {
        assert_eq!(
            pdbs.len(),
            1,
            "a PodDisruptionBudget with {replicas} replicas"
        );
        assert_eq!(pdbs[0]["spec"]["minAvailable"], json!(1));
    } else {
        assert!(pdbs.is_empty(), "no PodDisruptionBudget with one replica");
    }
    assert_eq!(
        find(objects, "Service").len(),
        1 + usize::from(webhook),
        "the metrics Service, and the webhook's when it is on"
    );
    let monitors = find(objects, "ServiceMonitor");
    let network_policies = find(objects, "NetworkPolicy");
    assert_eq!(
        monitors.len(),
        usize::from(values["metrics"]["serviceMonitor"]["enabled"] == json!(true))
    );
    assert_eq!(
        network_policies.len(),
        usize::from(values["networkPolicy"]["enabled"] == json!(true))
    );
}

/// The release's object name prefix, from its Deployment's name.
fn fullname(objects: &[Value]) -> String {
    name_of(one(objects, "Deployment")).to_string()
}

/// Whether `values` turn the Vault integration on.
fn vault_on(values: &Value) -> bool {
    values["vault"]["address"]
        .as_str()
        .is_some_and(|a| !a.is_empty())
}

/// The CA bundle's source with vault.caCert: ("secret" | "configMap", name, key).
fn vault_ca(values: &Value) -> Option<(&'static str, String, String)> {
    let ca = &values["vault"]["caCert"];
    let key = ca["key"].as_str().unwrap_or("ca.crt").to_string();
    ["secret", "configMap"].into_iter().find_map(|source| {
        ca[source]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(|n| (source, n.to_string(), key.clone()))
    })
}

/// The Vault arguments the Deployment must pass for `values` (the chart's defaults where unset):
/// none without vault.address.
fn expected_vault_args(values: &Value) -> Vec<String> {
    if !vault_on(values) {
        return Vec::new();
    }
    let vault = &values["vault"];
    let get = |key: &str, default: &str| vault[key].as_str().unwrap_or(default).to_string();
    let mut args = vec!["--vault-address".to_string(), get("address", "")];
    if vault_ca(values).is_some() {
        args.extend(["--vault-ca-cert".to_string(), VAULT_CA_PATH.to_string()]);
    }
    if let Some(ns) = vault["namespace"].as_str().filter(|n| !n.is_empty()) {
        args.extend(["--vault-namespace".to_string(), ns.to_string()]);
    }
    for (flag, value) in [
        ("--vault-auth-mount", get("authMount", "kubernetes")),
        ("--vault-auth-role", get("authRole", "portcullis-operator")),
        ("--vault-auth-token-path", VAULT_TOKEN_PATH.to_string()),
        (
            "--vault-workload-auth-mount",
            get("workloadAuthMount", "kubernetes"),
        ),
        // The token and state Secrets stay where the chart's RBAC allows them.
        ("--vault-state-namespace", "$(POD_NAMESPACE)".to_string()),
        ("--vault-request-timeout", get("requestTimeout", "10s")),
        ("--credential-revoke-grace", get("revokeGrace", "2m")),
        ("--restart-min-interval", get("restartMinInterval", "1m")),
        (
            "--max-restarts-per-minute",
            vault["maxRestartsPerMinute"]
                .as_u64()
                .unwrap_or(10)
                .to_string(),
        ),
        ("--vault-resync", get("resync", "5m")),
        (
            "--vault-max-concurrent-requests",
            vault["maxConcurrentRequests"]
                .as_u64()
                .unwrap_or(16)
                .to_string(),
        ),
        (
            "--vault-reserved-requests",
            vault["reservedRequests"].as_u64().unwrap_or(4).to_string(),
        ),
    ] {
        args.extend([flag.to_string(), value]);
    }
    args
}

/// With Vault, the Pod has a projected ServiceAccount token for Vault's audience where
/// --vault-auth-token-path points, and the CA bundle where --vault-ca-cert points; without it,
/// neither.
fn check_vault_volumes(objects: &[Value], values: &Value) {
    let pod = &one(objects, "Deployment")["spec"]["template"]["spec"];
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == json!(name))
            .cloned()
    };
    let mount = |name: &str| {
        operator_container(objects)["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == json!(name))
            .cloned()
    };
    if !vault_on(values) {
        for name in ["vault-token", "vault-ca"] {
            assert!(
                volume(name).is_none() && mount(name).is_none(),
                "volume {name} without vault.address"
            );
        }
        return;
    }
    let audience = values["vault"]["tokenAudience"].as_str().unwrap_or("vault");
    assert_eq!(
        volume("vault-token").expect("the Vault token volume")["projected"],
        json!({"sources": [{"serviceAccountToken": {"audience": audience, "expirationSeconds": 600, "path": "token"}}]}),
        "a short-lived token for Vault's audience only"
    );
    // The file --vault-auth-token-path names is that token, read-only.
    let token_mount = mount("vault-token").expect("the Vault token mount");
    assert_eq!(token_mount["readOnly"], json!(true));
    assert_eq!(
        format!(
            "{}/token",
            token_mount["mountPath"].as_str().unwrap_or_default()
        ),
        VAULT_TOKEN_PATH
    );
    match vault_ca(values) {
        None => assert!(volume("vault-ca").is_none() && mount("vault-ca").is_none()),
        Some((source, name, key)) => {
            let items = json!([{"key": key, "path": "ca.crt"}]);
            let expected = if source == "secret" {
                json!({"name": "vault-ca", "secret": {"secretName": name, "items": items}})
            } else {
                json!({"name": "vault-ca", "configMap": {"name": name, "items": items}})
            };
            assert_eq!(volume("vault-ca").expect("the CA volume"), expected);
            // The file --vault-ca-cert names is that key, read-only.
            let ca_mount = mount("vault-ca").expect("the CA mount");
            assert_eq!(ca_mount["readOnly"], json!(true));
            assert_eq!(
                format!(
                    "{}/ca.crt",
                    ca_mount["mountPath"].as_str().unwrap_or_default()
                ),
                VAULT_CA_PATH
            );
        }
    }
}

/// (group, resource, verb) triples of RBAC rules.
type Rules = BTreeSet<(String, String, String)>;

/// RBAC needs as a table: (group, resources, verbs).
type Needs = &'static [(&'static str, Strs, Strs)];
type Strs = &'static [&'static str];

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

/// What the operator needs in every namespace it watches, wherever the rules are (ClusterRole
/// or Role).
const NAMESPACED: Needs = &[
    ("portcullis.dev", &["aipipelines"], READ),
    ("portcullis.dev", &["aipipelines/status"], &["patch"]),
    ("portcullis.dev", &["aipipelines/finalizers"], &["update"]),
    ("", &["serviceaccounts"], WRITE),
    (
        "rbac.authorization.k8s.io",
        &["roles", "rolebindings"],
        WRITE,
    ),
    (
        "rbac.authorization.k8s.io",
        &["roles"],
        &["escalate", "bind"],
    ),
    ("networking.k8s.io", &["networkpolicies"], WRITE),
    ("", &["pods"], &["list", "watch"]),
    ("events.k8s.io", &["events"], &["create", "patch"]),
];

/// The per-namespace ValidatingAdmissionPolicies (`admission.policies.enabled`, on by default):
/// cluster-scoped, so in the ClusterRole even with `watchNamespace`.
const ADMISSION_POLICIES: Needs = &[(
    "admissionregistration.k8s.io",
    &[
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
    ],
    &["get", "list", "create", "patch", "delete"],
)];

/// What Vault (vault.address) adds to [`NAMESPACED`].
const VAULT: Needs = &[
    ("", &["secrets"], WRITE),
    (
        "apps",
        &["deployments", "statefulsets", "daemonsets"],
        &["get", "patch"],
    ),
    ("portcullis.dev", &["aipipelines"], &["patch"]),
];

/// Every verb on every resource of `group`.
fn rule_set(group: &str, resources: &[&str], verbs: &[&str]) -> Rules {
    let mut set = Rules::new();
    for r in resources {
        for v in verbs {
            set.insert((group.to_string(), r.to_string(), v.to_string()));
        }
    }
    set
}

/// The rules of a table of needs.
fn rules_of(needs: Needs) -> Rules {
    needs
        .iter()
        .flat_map(|(group, resources, verbs)| rule_set(group, resources, verbs))
        .collect()
}

/// The cluster-wide rules every install with the default `admission` values has: the reads of
/// guardrails and namespaces, the guardrails' status written, and the admission policies.
fn cluster_read_set() -> Rules {
    let mut set = rule_set("portcullis.dev", &["accessguardrails"], READ);
    set.extend(rule_set(
        "portcullis.dev",
        &["accessguardrails/status"],
        &["patch"],
    ));
    set.extend(rule_set("", &["namespaces"], READ));
    set.extend(rules_of(ADMISSION_POLICIES));
    set
}

/// (group, resource, verb) of the rules of one object, asserting none has resourceNames unless
/// `named`.
fn flatten(o: &Value) -> Rules {
    let mut set = Rules::new();
    for rule in o["rules"].as_array().expect("rules") {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    set.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    set
}

// --- tests without a cluster -------------------------------------------------------------------------

/// The chart's crds/ copy, and the templated copy, are the repository's crds/portcullis.yaml.
#[test]
fn chart_crds_are_the_repository_crds() {
    let repo = std::fs::read(root().join("crds/portcullis.yaml")).expect("crds/portcullis.yaml");
    let copy = std::fs::read(chart_dir().join("crds/portcullis.yaml"))
        .expect("charts/portcullis/crds/portcullis.yaml");
    assert!(
        repo == copy,
        "charts/portcullis/crds/portcullis.yaml differs from crds/portcullis.yaml: run `make chart-crds`"
    );
    let expected = objects(&String::from_utf8(repo).expect("utf-8"));
    assert_eq!(expected.len(), 2, "two CRDs");

    // Not templated by default.
    let plain = render("portcullis", "portcullis-system", &json!({}), KUBE_VERSION);
    assert!(find(&plain, "CustomResourceDefinition").is_empty());

    let templated = render(
        "portcullis",
        "portcullis-system",
        &json!({"crds": {"templated": true}}),
        KUBE_VERSION,
    );
    let mut crds: Vec<Value> = find(&templated, "CustomResourceDefinition")
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(
        crds.len(),
        expected.len(),
        "the templated copy has every CRD"
    );
    for crd in &mut crds {
        let annotations = crd["metadata"]["annotations"]
            .as_object_mut()
            .expect("the templated CRDs are annotated");
        assert_eq!(
            annotations.remove("helm.sh/resource-policy"),
            Some(json!("keep")),
            "templated CRDs are kept on uninstall"
        );
        assert!(annotations.is_empty(), "only the keep annotation is added");
        crd["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("annotations");
    }
    assert!(
        crds == expected,
        "templates/crds.yaml does not render crds/portcullis.yaml (plus the keep annotation)"
    );
}

#[test]
fn chart_lints_and_validates_its_values() {
    let run = lint(None);
    assert!(
        run.ok,
        "helm lint found warnings or errors (helm-sdkpy keeps only the file of each message):\n{}{}",
        run.stdout, run.stderr
    );
    let result: Value = serde_json::from_str(&run.stdout).expect("lint JSON");
    assert!(
        result["worst_severity"].as_i64().unwrap_or(9) <= 1,
        "{result}"
    );

    // values.schema.json rejects what the chart does not know or cannot use.
    for (values, expected) in [
        (
            json!({"replicas": 3}),
            "additional properties 'replicas' not allowed",
        ),
        (json!({"replicaCount": "two"}), "/replicaCount"),
        (json!({"replicaCount": 0}), "/replicaCount"),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (
            json!({"watchNamespace": "Not_A_Namespace"}),
            "/watchNamespace",
        ),
        (
            json!({"vault": {"adress": "https://vault:8200"}}),
            "additional properties 'adress' not allowed",
        ),
        (
            json!({"vault": {"address": "vault:8200"}}),
            "/vault/address",
        ),
        // The operator reads hours, minutes and seconds only.
        (
            json!({"vault": {"revokeGrace": "500ms"}}),
            "/vault/revokeGrace",
        ),
        (
            json!({"vault": {"maxRestartsPerMinute": 0}}),
            "/vault/maxRestartsPerMinute",
        ),
        (
            json!({"vault": {"tokenAudience": ""}}),
            "/vault/tokenAudience",
        ),
        (
            json!({"vault": {"caCert": {"secret": "ca", "name": "ca"}}}),
            "/vault/caCert",
        ),
        (
            json!({"networkPolicy": {"vault": {"ports": []}}}),
            "/networkPolicy/vault/ports",
        ),
        (
            json!({"auditLog": {"persistence": {"sise": "1Gi"}}}),
            "/auditLog/persistence",
        ),
        (
            json!({"metrics": {"serviceMonitor": {"interval": "often"}}}),
            "/metrics/serviceMonitor/interval",
        ),
        (
            json!({"networkPolicy": {"apiServer": {"ports": [0]}}}),
            "/networkPolicy/apiServer/ports/0",
        ),
        (
            json!({"resources": {"limits": {"gpu": 1}}}),
            "/resources/limits",
        ),
    ] {
        let error = render_error(&values);
        assert!(
            error.contains("values don't meet the specifications of the schema")
                && error.contains(expected),
            "{values}: expected a schema error at {expected}, got:\n{error}"
        );
    }
    // And what the schema cannot say, the templates do.
    let error = render_error(&json!({"auditLog": {"persistence": {"enabled": true}}}));
    assert!(
        error.contains("auditLog.persistence.enabled needs replicaCount: 1"),
        "{error}"
    );
    let error = render_error(&json!({"serviceAccount": {"create": false}}));
    assert!(error.contains("serviceAccount.name must name"), "{error}");
    let error = render_error(&json!({
        "vault": {"address": "https://vault:8200", "caCert": {"secret": "ca", "configMap": "ca"}},
    }));
    assert!(
        error.contains("vault.caCert: set secret or configMap, not both"),
        "{error}"
    );

    // Lint passes with Vault on, cluster-wide and with watchNamespace; the values do reach the
    // linter (a misspelled Vault key fails it).
    for values in [
        json!({"vault": {"address": "https://vault.vault.svc:8200", "caCert": {"secret": "vault-ca"}}}),
        json!({
            "watchNamespace": "ml",
            "vault": {"address": "https://vault.vault.svc:8200", "caCert": {"configMap": "vault-ca"}},
            "networkPolicy": {"enabled": true, "vault": {"cidrs": ["10.40.0.0/24"]}},
        }),
    ] {
        let run = lint(Some(&values));
        assert!(
            run.ok,
            "helm lint with {values} found warnings or errors:\n{}{}",
            run.stdout, run.stderr
        );
    }
    let run = lint(Some(&json!({"vault": {"adress": "https://vault:8200"}})));
    assert!(
        !run.ok,
        "helm lint accepted a misspelled vault key:\n{}",
        run.stdout
    );

    // Supported clusters (1.30 and newer) get policy/v1 PodDisruptionBudgets; older ones are
    // refused by the chart's kubeVersion instead of failing later.
    let new = render("portcullis", "portcullis-system", &json!({}), "1.30.0");
    assert_eq!(
        one(&new, "PodDisruptionBudget")["apiVersion"],
        json!("policy/v1")
    );
    let old = chart_py(
        &[
            "template",
            chart_dir().to_str().expect("utf-8 path"),
            "--kube-version",
            "1.29.9",
        ],
        None,
    );
    assert!(
        !old.ok && old.stderr.contains("kubeVersion"),
        "a 1.29 cluster is refused: {}{}",
        old.stdout,
        old.stderr
    );
}

/// `sharding.count: 3` renders one Deployment per shard with its flags, labels and PodDisruptionBudget
/// (and, with persistence, decision-log PVC), and the leader-election Role names each shard's
/// Lease; `watchNamespace` is refused with it.
#[test]
fn chart_renders_one_deployment_per_shard() {
    let values = json!({"sharding": {"count": 3}});
    let objects = render("portcullis", "portcullis-system", &values, KUBE_VERSION);
    let deployments = find(&objects, "Deployment");
    assert_eq!(deployments.len(), 3);
    for (i, d) in deployments.iter().enumerate() {
        assert_eq!(name_of(d), format!("portcullis-shard-{i}"));
        let args = strings(&d["spec"]["template"]["spec"]["containers"][0]["args"]);
        let flags: Vec<&[String]> = args.windows(2).collect();
        assert!(
            flags.contains(&&["--shard-count".to_string(), "3".to_string()][..])
                && flags.contains(&&["--shard-index".to_string(), i.to_string()][..]),
            "shard {i}: {args:?}"
        );
        let selector = &d["spec"]["selector"]["matchLabels"];
        assert_eq!(selector["portcullis.dev/shard"], i.to_string());
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["portcullis.dev/shard"],
            i.to_string()
        );
    }
    let pdbs = find(&objects, "PodDisruptionBudget");
    assert_eq!(
        pdbs.iter().map(|p| name_of(p)).collect::<Vec<_>>(),
        [
            "portcullis-shard-0",
            "portcullis-shard-1",
            "portcullis-shard-2"
        ]
    );
    // The metrics Service selects every shard's Pods.
    let service = one(&objects, "Service");
    assert!(service["spec"]["selector"]["portcullis.dev/shard"].is_null());
    let leases: Vec<String> = rules(&objects)
        .iter()
        .filter(|(_, r)| strings(&r["resources"]) == ["leases"])
        .flat_map(|(_, r)| strings(&r["resourceNames"]))
        .collect();
    assert_eq!(
        leases,
        [
            "portcullis-leader-shard-0-of-3",
            "portcullis-leader-shard-1-of-3",
            "portcullis-leader-shard-2-of-3"
        ]
    );

    let persistent = json!({
        "sharding": {"count": 2},
        "replicaCount": 1,
        "auditLog": {"persistence": {"enabled": true}},
    });
    let objects = render("portcullis", "portcullis-system", &persistent, KUBE_VERSION);
    let claims: Vec<&str> = find(&objects, "PersistentVolumeClaim")
        .into_iter()
        .map(name_of)
        .collect();
    assert_eq!(
        claims,
        [
            "portcullis-decision-log-shard-0",
            "portcullis-decision-log-shard-1"
        ]
    );
    for (i, d) in find(&objects, "Deployment").iter().enumerate() {
        let volumes = d["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes");
        assert!(
            volumes
                .iter()
                .any(|v| v["persistentVolumeClaim"]["claimName"]
                    == format!("portcullis-decision-log-shard-{i}")),
            "shard {i} mounts its own PVC"
        );
    }

    let error = render_error(&json!({"sharding": {"count": 2}, "watchNamespace": "team-a"}));
    assert!(
        error.contains("watchNamespace and sharding.count > 1 exclude each other"),
        "{error}"
    );
}

// --- tests against the control plane -------------------------------------------------------------

/// A server-side dry run of `object`: a dry-run server-side apply, which also refuses fields the
/// server does not know.
async fn dry_run(client: &Client, object: &Value) -> Result<(), String> {
    let (group, version) = match object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            object["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, kind_of(object));
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("discovery of {gvk:?}: {e}"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"]
                .as_str()
                .ok_or("a namespaced object without a namespace")?,
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let name = name_of(object);
    api.patch(
        name,
        &PatchParams::apply(DRY_RUN_MANAGER).dry_run(),
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Renders the chart for several sets of values, checks what each must hold, checks that the
/// operator binary accepts the Deployment's arguments, and dry-runs every object against the API
/// server (the ServiceMonitor only renders: its CRD is not on the test server).
#[tokio::test]
async fn chart_renders_and_the_api_server_accepts_every_object() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-render", &[]).await;
    let watched = support::temp_namespace(&client, "chart-render-watched", &[]).await;

    let sets: Vec<(&str, Value)> = vec![
        ("defaults", json!({})),
        ("watch", json!({"watchNamespace": watched.clone()})),
        (
            "persist",
            json!({
                "replicaCount": 1,
                "auditLog": {"persistence": {"enabled": true, "size": "5Gi", "storageClass": "fast"}},
            }),
        ),
        (
            "extras",
            json!({
                "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}},
                "networkPolicy": {
                    "enabled": true,
                    "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                    "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
                },
                "crds": {"templated": true},
                "auditLog": {"existingSecret": "my-audit-key", "existingSecretKey": "hmac"},
                "image": {"digest": format!("sha256:{}", "a".repeat(64))},
                // Vault settings without an address: Vault stays off.
                "vault": {"caCert": {"secret": "vault-ca"}, "authRole": "ops"},
            }),
        ),
        (
            "vault",
            json!({
                "vault": {
                    "address": "https://vault.vault.svc:8200",
                    "caCert": {"secret": "vault-ca"},
                    "namespace": "team-a",
                },
                "networkPolicy": {
                    "enabled": true,
                    "vault": {
                        "cidrs": ["10.40.0.0/24"],
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
                        "ports": [8200, 8201],
                    },
                },
            }),
        ),
        (
            "vault-watch",
            json!({
                "watchNamespace": watched.clone(),
                "vault": {
                    "address": "http://vault.example:8200",
                    "caCert": {"configMap": "vault-ca", "key": "bundle.pem"},
                    "authMount": "k8s/prod",
                    "authRole": "ops",
                    "tokenAudience": "https://vault.example",
                    "workloadAuthMount": "k8s-workloads",
                    "revokeGrace": "30s",
                    "restartMinInterval": "5m",
                    "maxRestartsPerMinute": 3,
                    "maxConcurrentRequests": 8,
                    "reservedRequests": 2,
                    "resync": "1h",
                    "requestTimeout": "3s",
                },
                "networkPolicy": {"enabled": true},
            }),
        ),
        (
            "vault-self",
            json!({"watchNamespace": ns.clone(), "vault": {"address": "https://vault:8200"}}),
        ),
        (
            "admission",
            json!({
                "admission": {"policies": {"enabled": false}, "webhook": {"enabled": true, "port": 9444}},
                "networkPolicy": {"enabled": true},
            }),
        ),
    ];

    let rendered: Vec<(String, Value, Vec<Value>)> = {
        let ns = ns.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                let handles: Vec<_> = sets
                    .into_iter()
                    .map(|(release, values)| {
                        let ns = ns.clone();
                        scope.spawn(move || {
                            let objects = render(release, &ns, &values, KUBE_VERSION);
                            (release.to_string(), values, objects)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("render thread"))
                    .collect()
            })
        })
        .await
        .expect("render threads")
    };

    let mut failures = Vec::new();
    for (release, values, objects) in &rendered {
        check_common(objects, values);

        // The binary accepts every argument the chart passes (clap stops at the first unknown
        // one, before --help).
        let mut args = args_of(objects);
        args.push("--help".into());
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(&args)
            .output()
            .expect("portcullis runs");
        assert!(
            out.status.success(),
            "{release}: `portcullis {}` refused: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );

        for object in objects {
            if kind_of(object) == "ServiceMonitor" {
                continue;
            }
            if let Err(e) = dry_run(&client, object).await {
                failures.push(format!(
                    "{release}: {} {}: {e}",
                    kind_of(object),
                    name_of(object)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "dry runs failed:\n{}",
        failures.join("\n")
    );

    let by_release: BTreeMap<&str, &Vec<Value>> =
        rendered.iter().map(|(r, _, o)| (r.as_str(), o)).collect();

    // Defaults: everything namespaced in the ClusterRole; leases only in the release namespace.
    let defaults = by_release["defaults"];
    let cluster_role = one(defaults, "ClusterRole");
    let mut expected = rules_of(NAMESPACED);
    expected.extend(cluster_read_set());
    assert_eq!(flatten(cluster_role), expected, "the ClusterRole's rules");
    let roles = find(defaults, "Role");
    assert_eq!(roles.len(), 1, "only the leader-election Role");
    assert_eq!(roles[0]["metadata"]["namespace"], json!(ns));
    assert_eq!(
        flatten(roles[0]),
        rule_set(
            "coordination.k8s.io",
            &["leases"],
            &["create", "get", "patch"]
        ),
    );
    let deployment = one(defaults, "Deployment");
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["emptyDir"], json!({}), "emptyDir by default");
    assert_eq!(
        volumes[1]["secret"]["secretName"],
        json!("defaults-portcullis-audit-key")
    );
    let secret = one(defaults, "Secret");
    let key = secret["data"]["key"].as_str().expect("a generated key");
    assert_eq!(key.len(), 64, "48 random characters, base64-encoded");
    assert_eq!(
        secret["metadata"]["annotations"]["helm.sh/resource-policy"],
        json!("keep")
    );

    // watchNamespace: the namespaced rules in a Role there; the ClusterRole reads only.
    let watch = by_release["watch"];
    let cluster_role = one(watch, "ClusterRole");
    assert_eq!(flatten(cluster_role), cluster_read_set());
    let namespace_rule = cluster_role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| strings(&r["resources"]) == ["namespaces"])
        .expect("a namespaces rule");
    assert_eq!(namespace_rule["resourceNames"], json!([watched]));
    let watched_role = find(watch, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == json!(watched))
        .expect("a Role in the watched namespace");
    assert_eq!(flatten(watched_role), rules_of(NAMESPACED));
    assert!(
        find(watch, "RoleBinding")
            .iter()
            .any(|b| b["metadata"]["namespace"] == json!(watched))
    );

    check_admission_release(by_release["admission"], &ns);

    // Persistence: a PVC, the Recreate strategy.
    let persist = by_release["persist"];
    let pvc = one(persist, "PersistentVolumeClaim");
    assert_eq!(
        pvc["spec"]["resources"]["requests"]["storage"],
        json!("5Gi")
    );
    assert_eq!(pvc["spec"]["storageClassName"], json!("fast"));
    let deployment = one(persist, "Deployment");
    assert_eq!(deployment["spec"]["strategy"]["type"], json!("Recreate"));
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        json!("persist-portcullis-decision-log")
    );

    // Extras: an existing Secret is used, not generated; the operator's own NetworkPolicy.
    let extras = by_release["extras"];
    assert!(find(extras, "Secret").is_empty());
    let volumes = &one(extras, "Deployment")["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[1]["secret"],
        json!({"secretName": "my-audit-key", "defaultMode": 288, "items": [{"key": "hmac", "path": "key"}]})
    );
    assert_eq!(
        operator_container(extras)["image"],
        json!(format!(
            "registry.example.com/portcullis@sha256:{}",
            "a".repeat(64)
        ))
    );
    let policy = one(extras, "NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"],
        json!([{"port": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        policy["spec"]["egress"][0],
        json!({"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]})
    );
    assert_eq!(
        policy["spec"]["egress"].as_array().map(Vec::len),
        Some(2),
        "without vault.address, egress to the API server and DNS only"
    );
    let monitor = one(extras, "ServiceMonitor");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        json!("prometheus")
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], json!("metrics"));
    assert_eq!(find(extras, "CustomResourceDefinition").len(), 2);

    let cluster_reads = |watched: Option<&str>| {
        let mut set = cluster_read_set();
        if watched.is_none() {
            set.extend(rules_of(NAMESPACED));
            set.extend(rules_of(VAULT));
        }
        set
    };
    let roles_in = |objects: &[Value], namespace: &str| -> BTreeMap<String, Value> {
        find(objects, "Role")
            .into_iter()
            .filter(|r| r["metadata"]["namespace"] == json!(namespace))
            .map(|r| (name_of(r).to_string(), r.clone()))
            .collect()
    };
    let mut vault_namespaced = rules_of(NAMESPACED);
    vault_namespaced.extend(rules_of(VAULT));

    // Vault, every namespace: the Vault rules join the ClusterRole, which also covers the release
    // namespace's token and state Secrets (no Role of its own); egress to Vault.
    let vault = by_release["vault"];
    assert_eq!(
        flatten(one(vault, "ClusterRole")),
        cluster_reads(None),
        "the ClusterRole's rules with Vault"
    );
    assert_eq!(
        roles_in(vault, &ns).into_keys().collect::<Vec<_>>(),
        ["vault-portcullis-leader-election"],
        "no Vault Role when the ClusterRole reaches the release namespace"
    );
    let policy = one(vault, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["egress"][2],
        json!({
            "ports": [{"port": 8200, "protocol": "TCP"}, {"port": 8201, "protocol": "TCP"}],
            "to": [
                {"ipBlock": {"cidr": "10.40.0.0/24"}},
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
                },
            ],
        })
    );

    // Vault with watchNamespace: the Vault rules in the watched namespace's Role; in the release
    // namespace a Role for the token and state Secrets only (no list or watch there); the
    // ClusterRole unchanged.
    let vault_watch = by_release["vault-watch"];
    assert_eq!(
        flatten(one(vault_watch, "ClusterRole")),
        cluster_reads(Some(&watched))
    );
    let watched_roles = roles_in(vault_watch, &watched);
    assert_eq!(
        flatten(&watched_roles["vault-watch-portcullis"]),
        vault_namespaced
    );
    let release_roles = roles_in(vault_watch, &ns);
    let state_role = &release_roles["vault-watch-portcullis-vault-state"];
    assert_eq!(
        state_role["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch", "delete"]}])
    );
    let state_binding = find(vault_watch, "RoleBinding")
        .into_iter()
        .find(|b| name_of(b) == "vault-watch-portcullis-vault-state")
        .expect("the Vault state RoleBinding");
    assert_eq!(state_binding["metadata"]["namespace"], json!(ns));
    assert_eq!(
        state_binding["roleRef"]["name"],
        json!("vault-watch-portcullis-vault-state")
    );
    assert_eq!(
        state_binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "vault-watch-portcullis", "namespace": ns}])
    );
    // No CIDR and no selector: Vault on any address, on its port.
    assert_eq!(
        one(vault_watch, "NetworkPolicy")["spec"]["egress"][2],
        json!({"ports": [{"port": 8200, "protocol": "TCP"}]})
    );

    // Vault, watching the release namespace itself: one Role there holds it all.
    let vault_self = by_release["vault-self"];
    let roles = roles_in(vault_self, &ns);
    assert_eq!(
        roles.keys().collect::<Vec<_>>(),
        [
            "vault-self-portcullis",
            "vault-self-portcullis-leader-election"
        ]
    );
    assert_eq!(flatten(&roles["vault-self-portcullis"]), vault_namespaced);
}

/// Admission policies off and the webhook on: no policy rules; the webhook's configuration
/// (by name but for create), its Secret (by name but for create), Service and port.
fn check_admission_release(objects: &[Value], ns: &str) {
    let mut expected = rules_of(NAMESPACED);
    expected.extend(rule_set("portcullis.dev", &["accessguardrails"], READ));
    expected.extend(rule_set(
        "portcullis.dev",
        &["accessguardrails/status"],
        &["patch"],
    ));
    expected.extend(rule_set("", &["namespaces"], READ));
    expected.extend(rule_set(
        "admissionregistration.k8s.io",
        &["validatingwebhookconfigurations"],
        &["create", "get", "patch"],
    ));
    let cluster_role = one(objects, "ClusterRole");
    assert_eq!(flatten(cluster_role), expected, "no policy rules when off");
    let named: Vec<&Value> = cluster_role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| strings(&r["resources"]) == ["validatingwebhookconfigurations"])
        .collect();
    assert_eq!(
        named
            .iter()
            .map(|r| r["resourceNames"].clone())
            .collect::<Vec<_>>(),
        [Value::Null, json!(["portcullis"])],
        "get and patch only on the configuration portcullis"
    );
    let role = find(objects, "Role")
        .into_iter()
        .find(|r| name_of(r) == "admission-portcullis-webhook")
        .expect("the webhook's Role");
    assert_eq!(role["metadata"]["namespace"], json!(ns));
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["admission-portcullis-webhook-tls"], "verbs": ["get", "patch"]},
        ])
    );
    let service = find(objects, "Service")
        .into_iter()
        .find(|s| name_of(s) == "admission-portcullis-webhook")
        .expect("the webhook's Service");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}])
    );
    assert!(
        operator_container(objects)["ports"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "webhook", "containerPort": 9444, "protocol": "TCP"}))
    );
    let policy = one(objects, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["ingress"][0],
        json!({"ports": [{"port": 9444, "protocol": "TCP"}]}),
        "the API server reaches the webhook port"
    );
}

/// The operator, started as in its Pod: the Deployment's own arguments, with the Pod's namespace
/// and name filled in, and run by the one launcher (`support::Operator::launch`), which puts
/// this machine's paths and address after the chart's `--audit-log`, `--audit-key` and
/// `--metrics-addr`, with `key` as the audit key and `kubeconfig` instead of the in-cluster
/// configuration. `files` replaces the value after each of those flags (paths in the Pod: the
/// projected Vault token, say) with a path on this machine.
fn start_as_deployed(
    manifest_objects: &[Value],
    namespace: &str,
    key: &[u8],
    kubeconfig: &Path,
    files: &[(&str, &Path)],
) -> Operator {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("audit.key"), key).expect("key written");
    let mut args = args_of(manifest_objects);
    let mut replace_after = |flag: &str, value: Option<String>| {
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the chart passes {flag}"));
        if let Some(value) = value {
            args[at + 1] = value;
        }
    };
    // The launcher sets these three; the chart must pass them.
    for flag in ["--audit-log", "--audit-key", "--metrics-addr"] {
        replace_after(flag, None);
    }
    for (flag, path) in files {
        replace_after(flag, Some(path.display().to_string()));
    }
    for arg in &mut args {
        *arg = arg
            .replace("$(POD_NAMESPACE)", namespace)
            .replace("$(POD_NAME)", "portcullis-0");
    }
    Operator::launch("operator", dir, args, Some(kubeconfig))
}

/// A kubeconfig that authenticates as the admin and impersonates ServiceAccount `ns/sa`: every
/// request is authorized as that ServiceAccount alone.
fn impersonating_kubeconfig(dir: &Path, ns: &str, sa: &str) -> PathBuf {
    let cp = support::control_plane();
    let admin: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(cp.kubeconfig()).expect("kubeconfig"))
            .expect("kubeconfig YAML");
    let token = admin["users"][0]["user"]["token"]
        .as_str()
        .expect("the admin token");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": cp.server_url(), "insecure-skip-tls-verify": true}}],
        "users": [{"name": sa, "user": {
            "token": token,
            "as": format!("system:serviceaccount:{ns}:{sa}"),
            "as-groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
        }}],
        "contexts": [{"name": sa, "context": {"cluster": "envtest", "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("written");
    path
}

/// The operator's own log shows no refused request.
fn assert_no_forbidden(op: &Operator) {
    let log = op.full_log();
    for line in log.lines() {
        let lower = line.to_lowercase();
        assert!(
            !lower.contains("forbidden") && !lower.contains("publishing an event failed"),
            "the operator was refused something:\n{line}\n\nfull log:\n{log}"
        );
    }
}

/// The generated audit key of the release whose manifest this is.
async fn audit_key(client: &Client, manifest: &[Value], release_ns: &str) -> Vec<u8> {
    let secret_name = one(manifest, "Deployment")["spec"]["template"]["spec"]["volumes"][1]
        ["secret"]["secretName"]
        .as_str()
        .expect("the key Secret")
        .to_string();
    let secret = Api::<Secret>::namespaced(client.clone(), release_ns)
        .get(&secret_name)
        .await
        .expect("the key Secret exists");
    let key = secret.data.expect("data")["key"].0.clone();
    assert!(
        key.len() >= 32,
        "the generated key is long enough for the operator"
    );
    key
}

/// Waits until the operator holds the Lease of the release namespace (create, get, patch).
async fn wait_for_lease(client: &Client, release_ns: &str, op: &Operator) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), release_ns);
    wait_logged(op, "the operator to take the Lease", WAIT, || async {
        let holder = leases
            .get_opt("portcullis-leader")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity);
        (holder.as_deref() == Some("portcullis-0")).then_some(())
    })
    .await;
}

/// Runs the operator as the release's ServiceAccount (leader election in the release namespace,
/// as in its Pod) on the fraud-detector example in `pipeline_ns`, until it is Ready; then removes
/// a stage and waits for its objects to be pruned. Returns the operator, still running.
async fn operator_makes_the_example_ready(
    client: &Client,
    manifest: &[Value],
    release_ns: &str,
    sa: &str,
    pipeline_ns: &str,
) -> Operator {
    let key = audit_key(client, manifest, release_ns).await;

    let kubeconfig_dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = impersonating_kubeconfig(kubeconfig_dir.path(), release_ns, sa);
    let op = start_as_deployed(manifest, release_ns, &key, &kubeconfig, &[]);
    wait_for_lease(client, release_ns, &op).await;

    support::create_guardrails(client, &support::guardrails_for(pipeline_ns)).await;
    let example = support::example("examples/pipelines/fraud-detector.yaml", pipeline_ns);
    let pipeline = support::create_pipeline(client, &example).await;
    let name = pipeline.name_any();
    let ready = support::wait_converged(client, pipeline_ns, &name, &op).await;
    let stages = &ready.status.as_ref().expect("status").stages;
    assert_eq!(stages.len(), 3, "three stages");
    // It wrote Events (for the items the guardrails deny here): events.k8s.io create.
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), pipeline_ns)
            .list(&Default::default())
            .await
            .expect("list events");
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reporting_controller.as_deref() == Some("portcullis")),
        "the operator published no Event (the example is expected to have denied items here); \
         its log:\n{}",
        op.full_log()
    );
    // Its Roles and RoleBindings exist: escalate and bind worked.
    let roles: Api<Role> = Api::namespaced(client.clone(), pipeline_ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), pipeline_ns);
    for stage in ["ingest", "train"] {
        let object = format!("{name}-{stage}");
        assert!(
            roles.get_opt(&object).await.expect("get").is_some(),
            "Role {object}"
        );
        assert!(
            bindings.get_opt(&object).await.expect("get").is_some(),
            "RoleBinding {object}"
        );
    }

    // Remove the train stage: its four objects are pruned (delete). A merge patch replaces the
    // whole list.
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), pipeline_ns);
    let mut stages = serde_json::to_value(&pipeline.spec.stages).expect("stages serialize");
    stages.as_array_mut().expect("a list").remove(1);
    pipelines
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stages": stages}})),
        )
        .await
        .expect("a stage removed");
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), pipeline_ns);
    let network_policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), pipeline_ns);
    let train = format!("{name}-train");
    let start = Instant::now();
    loop {
        let left = [
            service_accounts
                .get_opt(&train)
                .await
                .expect("get")
                .is_some(),
            roles.get_opt(&train).await.expect("get").is_some(),
            bindings.get_opt(&train).await.expect("get").is_some(),
            network_policies
                .get_opt(&train)
                .await
                .expect("get")
                .is_some(),
        ];
        if left == [false; 4] {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the removed stage was not pruned (ServiceAccount, Role, RoleBinding, NetworkPolicy \
             left: {left:?}); operator log:\n{}",
            op.full_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    support::wait_converged(client, pipeline_ns, &name, &op).await;

    // admission.policies (on by default): the namespace's ValidatingAdmissionPolicy and binding,
    // written under the chart's RBAC.
    let policy = format!("portcullis-workloads-{pipeline_ns}");
    wait_logged(
        &op,
        "the namespace's ValidatingAdmissionPolicy",
        WAIT,
        || {
            let (client, policy) = (client.clone(), policy.clone());
            async move {
                let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
                let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client);
                (policies
                    .get_opt(&policy)
                    .await
                    .ok()??
                    .metadata
                    .name
                    .is_some()
                    && bindings
                        .get_opt(&policy)
                        .await
                        .ok()??
                        .metadata
                        .name
                        .is_some())
                .then_some(())
            }
        },
    )
    .await;

    assert_no_forbidden(&op);
    let (ok, out) = op.verify();
    assert!(ok, "the decision log verifies with the chart's key: {out}");
    op
}

/// One SubjectAccessReview expectation.
struct Access<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    subresource: Option<&'a str>,
    name: Option<&'a str>,
    namespace: Option<&'a str>,
}

fn access<'a>(verb: &'a str, group: &'a str, resource: &'a str) -> Access<'a> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    Access {
        verb,
        group,
        resource,
        subresource,
        name: None,
        namespace: None,
    }
}

impl<'a> Access<'a> {
    fn named(mut self, name: &'a str) -> Self {
        self.name = Some(name);
        self
    }

    fn r#in(mut self, namespace: &'a str) -> Self {
        self.namespace = Some(namespace);
        self
    }

    fn describe(&self) -> String {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!("{}/", self.group)
        };
        let sub = self
            .subresource
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        let name = self.name.map(|n| format!(" {n}")).unwrap_or_default();
        let scope = self.namespace.unwrap_or("every namespace / the cluster");
        format!(
            "{} {group}{}{sub}{name} in {scope}",
            self.verb, self.resource
        )
    }
}

/// Asks the API server's authorizer about every entry; panics listing each one whose answer is
/// not `expected`.
async fn expect_access(client: &Client, ns: &str, sa: &str, checks: &[Access<'_>], expected: bool) {
    let answers = allowed(client, ns, sa, checks).await;
    let wrong: Vec<String> = checks
        .iter()
        .zip(answers)
        .filter(|(_, allowed)| *allowed != expected)
        .map(|(c, _)| c.describe())
        .collect();
    assert!(
        wrong.is_empty(),
        "ServiceAccount {ns}/{sa} should {}be allowed to:\n  {}",
        if expected { "" } else { "NOT " },
        wrong.join("\n  ")
    );
}

/// The authorizer's answer to each of `checks` for ServiceAccount `ns/sa`.
async fn allowed(client: &Client, ns: &str, sa: &str, checks: &[Access<'_>]) -> Vec<bool> {
    futures::future::join_all(checks.iter().map(|c| {
        support::can_i(
            client,
            ns,
            sa,
            c.verb,
            c.group,
            c.resource,
            c.subresource,
            c.name,
            c.namespace,
        )
    }))
    .await
}

/// The SubjectAccessReview checks of a table of needs, in `scope` (a namespace, or cluster-wide
/// with None).
fn checks_of(needs: Needs, scope: Option<&str>) -> Vec<Access<'_>> {
    let mut out = Vec::new();
    for (group, resources, verbs) in needs {
        for resource in *resources {
            for verb in *verbs {
                let mut a = access(verb, group, resource);
                a.namespace = scope;
                out.push(a);
            }
        }
    }
    out
}

/// What the operator must never do (in `ns`, another namespace `other`, or cluster-wide).
fn never<'a>(ns: &'a str, other: &'a str) -> Vec<Access<'a>> {
    let rbac = "rbac.authorization.k8s.io";
    vec![
        // Secrets: nowhere, not even its own namespace (the audit key reaches it as a volume).
        access("get", "", "secrets"),
        access("list", "", "secrets"),
        access("watch", "", "secrets"),
        access("get", "", "secrets").r#in(ns),
        access("list", "", "secrets").r#in(ns),
        access("get", "", "secrets")
            .r#in(ns)
            .named("portcullis-audit-key"),
        access("create", "", "secrets").r#in(other),
        // Cluster-wide RBAC.
        access("create", rbac, "clusterroles"),
        access("patch", rbac, "clusterroles"),
        access("create", rbac, "clusterrolebindings"),
        access("escalate", rbac, "clusterroles"),
        access("bind", rbac, "clusterroles"),
        access("bind", rbac, "clusterroles").named("cluster-admin"),
        access("update", rbac, "roles").r#in(other),
        access("update", rbac, "rolebindings").r#in(other),
        access("escalate", rbac, "rolebindings").r#in(other),
        // The AIPipeline itself: RBAC cannot split spec from status, so no write on it at all.
        access("update", "portcullis.dev", "aipipelines").r#in(other),
        access("patch", "portcullis.dev", "aipipelines").r#in(other),
        access("create", "portcullis.dev", "aipipelines").r#in(other),
        access("delete", "portcullis.dev", "aipipelines").r#in(other),
        access("update", "portcullis.dev", "aipipelines/status").r#in(other),
        // Guardrails and CRDs are read only.
        access("create", "portcullis.dev", "accessguardrails"),
        access("patch", "portcullis.dev", "accessguardrails"),
        access("delete", "portcullis.dev", "accessguardrails"),
        access("update", "portcullis.dev", "accessguardrails/status"),
        access(
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
        ),
        access("patch", "apiextensions.k8s.io", "customresourcedefinitions"),
        access(
            "delete",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
        ),
        // Namespaces are read only.
        access("delete", "", "namespaces").named(other),
        access("create", "", "namespaces"),
        access("patch", "", "namespaces").named(other),
        // Nobody else's identity.
        access("impersonate", "", "users"),
        access("impersonate", "", "groups"),
        access("impersonate", "", "serviceaccounts").r#in(other),
        access("create", "", "serviceaccounts/token").r#in(other),
        // No workloads, no way into them.
        access("create", "", "pods").r#in(other),
        access("create", "", "pods/exec").r#in(other),
        access("create", "", "pods/attach").r#in(other),
        access("create", "apps", "deployments").r#in(other),
        access("get", "", "configmaps").r#in(other),
        access("list", "", "nodes"),
        access("get", "", "nodes/proxy"),
        // Events only through events.k8s.io, and never deleted.
        access("create", "", "events").r#in(other),
        access("delete", "events.k8s.io", "events").r#in(other),
        // No update on managed objects: server-side apply is a patch.
        access("update", "", "serviceaccounts").r#in(other),
        access("update", "networking.k8s.io", "networkpolicies").r#in(other),
        // Leases: only its own, only in its namespace.
        access("get", "coordination.k8s.io", "leases")
            .r#in(other)
            .named("portcullis-leader"),
        access("patch", "coordination.k8s.io", "leases")
            .r#in(other)
            .named("portcullis-leader"),
        access("create", "coordination.k8s.io", "leases").r#in(other),
        access("get", "coordination.k8s.io", "leases")
            .r#in(ns)
            .named("someone-elses-lease"),
        access("patch", "coordination.k8s.io", "leases")
            .r#in(ns)
            .named("someone-elses-lease"),
        access("list", "coordination.k8s.io", "leases").r#in(ns),
        access("update", "coordination.k8s.io", "leases")
            .r#in(ns)
            .named("portcullis-leader"),
        access("delete", "coordination.k8s.io", "leases")
            .r#in(ns)
            .named("portcullis-leader"),
        access("get", "coordination.k8s.io", "leases").named("portcullis-leader"),
    ]
}

/// Only one operator runs at a time in this test binary: a cluster-wide one would reconcile the
/// other test's pipeline too.
fn operator_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// Install (defaults, every namespace), least privilege proven by the authorizer, sufficiency
/// proven by the real operator running as the ServiceAccount, upgrade, uninstall.
#[tokio::test]
async fn chart_installs_least_privilege_that_is_enough_upgrades_and_uninstalls() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-install", &[]).await;
    let other = support::temp_namespace(&client, "chart-other", &[]).await;
    let release = "portcullis";
    let sa = "portcullis";

    let manifest = install(release, &ns, json!({})).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = deployments.get("portcullis").await.expect("the Deployment");
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2));
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get(sa)
        .await
        .expect("the ServiceAccount");
    Api::<Service>::namespaced(client.clone(), &ns)
        .get("portcullis-metrics")
        .await
        .expect("the metrics Service");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let key_before = secrets
        .get("portcullis-audit-key")
        .await
        .expect("the generated key Secret")
        .data
        .expect("data")["key"]
        .clone();
    let pdbs = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "policy",
            "v1",
            "PodDisruptionBudget",
        )),
    );
    pdbs.get("portcullis")
        .await
        .expect("the PodDisruptionBudget");

    // Least privilege: what it needs, cluster-wide and in any namespace ...
    let mut needs = checks_of(NAMESPACED, None);
    needs.extend(checks_of(NAMESPACED, Some(other.as_str())));
    needs.extend(cluster_and_lease_needs(&ns, None));
    expect_access(&client, &ns, sa, &needs, true).await;
    // ... and nothing else.
    expect_access(&client, &ns, sa, &never(&ns, &other), false).await;

    // Enough: the real operator, as that ServiceAccount, makes the example Ready.
    {
        let _one_operator = operator_lock().lock().await;
        let pipeline_ns = support::temp_namespace(&client, "chart-pipeline", &[]).await;
        let mut op =
            operator_makes_the_example_ready(&client, &manifest, &ns, sa, &pipeline_ns).await;
        op.stop();
    }

    // Upgrade: one replica, other resources; the PodDisruptionBudget goes, the key stays.
    let upgraded = helm(
        "upgrade",
        release,
        &ns,
        Some(json!({
            "replicaCount": 1,
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        })),
    )
    .await;
    assert_eq!(upgraded["revision"], json!(2), "{upgraded}");
    let deployment = deployments.get("portcullis").await.expect("the Deployment");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let limits = spec.template.spec.expect("pod spec").containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .expect("limits");
    assert_eq!(limits["cpu"].0, "1");
    assert_eq!(limits["memory"].0, "512Mi");
    support::wait_for("the PodDisruptionBudget to go", WAIT, || {
        let pdbs = pdbs.clone();
        async move {
            pdbs.get_opt("portcullis")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let key_after = secrets
        .get("portcullis-audit-key")
        .await
        .expect("the key Secret")
        .data
        .expect("data")["key"]
        .clone();
    assert_eq!(
        key_before, key_after,
        "an upgrade keeps the audit key (lookup)"
    );

    // Uninstall: the release's objects go; the CRDs (crds/ is never deleted) and the audit key
    // (resource-policy keep) stay.
    helm("uninstall", release, &ns, None).await;
    support::wait_for("the release's objects to go", WAIT, || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let gone = Api::<Deployment>::namespaced(client.clone(), &ns)
                .get_opt("portcullis")
                .await
                .ok()?
                .is_none()
                && Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                    .get_opt("portcullis")
                    .await
                    .ok()?
                    .is_none()
                && Api::<Role>::namespaced(client.clone(), &ns)
                    .get_opt("portcullis-leader-election")
                    .await
                    .ok()?
                    .is_none()
                && Api::<ClusterRole>::all(client.clone())
                    .get_opt(&format!("{ns}-portcullis"))
                    .await
                    .ok()?
                    .is_none()
                && Api::<ClusterRoleBinding>::all(client.clone())
                    .get_opt(&format!("{ns}-portcullis"))
                    .await
                    .ok()?
                    .is_none();
            gone.then_some(())
        }
    })
    .await;
    assert!(
        secrets
            .get_opt("portcullis-audit-key")
            .await
            .expect("get")
            .is_some(),
        "the generated audit key is kept"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "aipipelines.portcullis.dev",
        "accessguardrails.portcullis.dev",
    ] {
        assert!(
            crds.get_opt(name).await.expect("get").is_some(),
            "CRD {name} stays"
        );
    }

    // The templated CRDs: installed (adopting the existing CRDs), annotated keep, and still
    // there after uninstall.
    let crd_ns = support::temp_namespace(&client, "chart-crds", &[]).await;
    helm_with(
        "install",
        "portcullis-crds",
        &crd_ns,
        Some(json!({"crds": {"templated": true}})),
        &["--take-ownership"],
    )
    .await;
    for name in [
        "aipipelines.portcullis.dev",
        "accessguardrails.portcullis.dev",
    ] {
        let crd = crds.get(name).await.expect("CRD");
        let annotations = crd.annotations();
        assert_eq!(
            annotations
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep")
        );
        assert_eq!(
            annotations
                .get("meta.helm.sh/release-name")
                .map(String::as_str),
            Some("portcullis-crds"),
            "the release owns CRD {name}"
        );
    }
    helm("uninstall", "portcullis-crds", &crd_ns, None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for name in [
        "aipipelines.portcullis.dev",
        "accessguardrails.portcullis.dev",
    ] {
        let crd = crds
            .get_opt(name)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("CRD {name} was deleted by helm uninstall"));
        assert!(
            crd.metadata.deletion_timestamp.is_none(),
            "CRD {name} is being deleted"
        );
    }
}

/// With watchNamespace, the operator's namespaced access exists in that namespace only, and it
/// is still enough.
#[tokio::test]
async fn chart_with_watch_namespace_grants_one_namespace_and_is_enough() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-ns-release", &[]).await;
    let watched = support::temp_namespace(&client, "chart-ns-watched", &[]).await;
    let other = support::temp_namespace(&client, "chart-ns-other", &[]).await;
    let release = "pc";
    let sa = "pc-portcullis";

    let manifest = install(release, &ns, json!({"watchNamespace": watched})).await;

    expect_access(
        &client,
        &ns,
        sa,
        &checks_of(NAMESPACED, Some(watched.as_str())),
        true,
    )
    .await;
    let cluster_and_lease = cluster_and_lease_needs(&ns, Some(&watched));
    expect_access(&client, &ns, sa, &cluster_and_lease, true).await;

    let mut denied = checks_of(NAMESPACED, Some(other.as_str()));
    denied.extend(checks_of(NAMESPACED, None));
    denied.extend(checks_of(NAMESPACED, Some(ns.as_str())));
    for verb in ["get", "list", "watch"] {
        denied.push(access(verb, "", "namespaces"));
        denied.push(access(verb, "", "namespaces").named(&other));
    }
    denied.extend(never(&ns, &other));
    expect_access(&client, &ns, sa, &denied, false).await;

    {
        let _one_operator = operator_lock().lock().await;
        let mut op = operator_makes_the_example_ready(&client, &manifest, &ns, sa, &watched).await;
        op.stop();
    }

    helm("uninstall", release, &ns, None).await;
    support::wait_for("the watched namespace's Role to go", WAIT, || {
        let roles: Api<Role> = Api::namespaced(client.clone(), &watched);
        async move {
            roles
                .get_opt("pc-portcullis")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
}

/// `admission.webhook.enabled`: the ServiceAccount may write the configuration `portcullis` and
/// the webhook's Secret, and nothing of their kinds beyond; the operator, run as deployed (the
/// chart's arguments, its RBAC), creates both while it makes the example Ready.
#[tokio::test]
async fn chart_with_the_webhook_grants_its_secret_and_configuration_and_is_enough() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-webhook", &[]).await;
    let pipeline_ns = support::temp_namespace(&client, "chart-webhook-ml", &[]).await;
    let (release, sa) = ("pw", "pw-portcullis");
    // A port free on this machine: the operator listens on it as in its Pod.
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let manifest = install(
        release,
        &ns,
        json!({"admission": {"webhook": {"enabled": true, "port": port}}}),
    )
    .await;
    let registration = "admissionregistration.k8s.io";
    let secret = "pw-portcullis-webhook-tls";
    let allowed = vec![
        access("create", registration, "validatingwebhookconfigurations"),
        access("get", registration, "validatingwebhookconfigurations").named("portcullis"),
        access("patch", registration, "validatingwebhookconfigurations").named("portcullis"),
        access("create", "", "secrets").r#in(&ns),
        access("get", "", "secrets").r#in(&ns).named(secret),
        access("patch", "", "secrets").r#in(&ns).named(secret),
    ];
    expect_access(&client, &ns, sa, &allowed, true).await;
    let denied = vec![
        access("patch", registration, "validatingwebhookconfigurations").named("kyverno"),
        access("delete", registration, "validatingwebhookconfigurations").named("portcullis"),
        access("list", registration, "validatingwebhookconfigurations"),
        access("patch", registration, "mutatingwebhookconfigurations").named("portcullis"),
        access("get", "", "secrets")
            .r#in(&ns)
            .named("pw-portcullis-audit-key"),
        access("list", "", "secrets").r#in(&ns),
        access("create", "", "secrets").r#in(&pipeline_ns),
    ];
    expect_access(&client, &ns, sa, &denied, false).await;

    {
        let _one_operator = operator_lock().lock().await;
        let mut op =
            operator_makes_the_example_ready(&client, &manifest, &ns, sa, &pipeline_ns).await;
        let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let configuration = wait_logged(&op, "the webhook's registration", WAIT, || {
            let configurations = configurations.clone();
            async move { configurations.get_opt("portcullis").await.ok()? }
        })
        .await;
        let service = &configuration.webhooks.expect("webhooks")[0]
            .client_config
            .service
            .clone()
            .expect("registered through the chart's Service");
        assert_eq!(
            (service.name.as_str(), service.namespace.as_str()),
            ("pw-portcullis-webhook", ns.as_str())
        );
        let tls = secrets.get(secret).await.expect("the webhook's Secret");
        assert!(tls.data.is_some_and(|d| d.contains_key("tls.crt")));
        assert_no_forbidden(&op);
        op.stop();
        // The configuration outlives the operator (by design): removed, as after an uninstall.
        configurations
            .delete("portcullis", &Default::default())
            .await
            .expect("the configuration deleted");
    }
    helm("uninstall", release, &ns, None).await;
}

/// A sharded release installs (two Deployments the API server accepts), and its ServiceAccount
/// may get and patch each shard's Lease and no other.
#[tokio::test]
async fn chart_with_shards_installs_and_grants_each_shard_its_lease() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-shards", &[]).await;
    let (release, sa) = ("ps", "ps-portcullis");
    let installed = helm(
        "install",
        release,
        &ns,
        Some(json!({"sharding": {"count": 2}})),
    )
    .await;
    let manifest = objects(installed["manifest"].as_str().expect("manifest"));
    let deployments: Vec<&str> = find(&manifest, "Deployment")
        .into_iter()
        .map(name_of)
        .collect();
    assert_eq!(
        deployments,
        ["ps-portcullis-shard-0", "ps-portcullis-shard-1"]
    );
    let live = Api::<Deployment>::namespaced(client.clone(), &ns);
    for name in &deployments {
        live.get(name).await.expect("the shard's Deployment exists");
    }
    let leases = [
        "portcullis-leader-shard-0-of-2",
        "portcullis-leader-shard-1-of-2",
    ];
    let mut allowed = vec![access("create", "coordination.k8s.io", "leases").r#in(&ns)];
    for lease in leases {
        for verb in ["get", "patch"] {
            allowed.push(
                access(verb, "coordination.k8s.io", "leases")
                    .named(lease)
                    .r#in(&ns),
            );
        }
    }
    expect_access(&client, &ns, sa, &allowed, true).await;
    let mut denied = vec![];
    for lease in ["portcullis-leader", "portcullis-leader-shard-2-of-3"] {
        for verb in ["get", "patch"] {
            denied.push(
                access(verb, "coordination.k8s.io", "leases")
                    .named(lease)
                    .r#in(&ns),
            );
        }
    }
    expect_access(&client, &ns, sa, &denied, false).await;
    helm("uninstall", release, &ns, None).await;
}

// --- Vault ------------------------------------------------------------------------------------------

/// What the operator still must not do with Vault on, in `scope`: no other verb on Secrets or
/// workloads, no other workload, nothing else on AIPipelines.
fn vault_never(scope: Option<&str>) -> Vec<Access<'_>> {
    const NEVER: Needs = &[
        ("", &["secrets"], &["update", "deletecollection"]),
        (
            "apps",
            &["deployments", "statefulsets", "daemonsets"],
            &["create", "update", "delete", "list", "watch"],
        ),
        ("apps", &["deployments/scale", "replicasets"], &["patch"]),
        ("", &["pods"], &["patch", "delete"]),
        ("portcullis.dev", &["aipipelines"], &["update", "delete"]),
        ("portcullis.dev", &["aipipelines/status"], &["update"]),
    ];
    checks_of(NEVER, scope)
}

/// The cluster-scoped reads and the Lease, which every install needs.
fn cluster_and_lease_needs<'a>(release_ns: &'a str, watched: Option<&'a str>) -> Vec<Access<'a>> {
    let mut needs = Vec::new();
    for verb in ["get", "list", "watch"] {
        needs.push(access(verb, "portcullis.dev", "accessguardrails"));
        let namespaces = access(verb, "", "namespaces");
        needs.push(match watched {
            Some(ns) => namespaces.named(ns),
            None => namespaces,
        });
    }
    needs.push(access("patch", "portcullis.dev", "accessguardrails/status"));
    // admission.policies (on by default): cluster-scoped.
    needs.extend(checks_of(ADMISSION_POLICIES, None));
    needs.push(access("create", "coordination.k8s.io", "leases").r#in(release_ns));
    for verb in ["get", "patch"] {
        needs.push(
            access(verb, "coordination.k8s.io", "leases")
                .r#in(release_ns)
                .named("portcullis-leader"),
        );
    }
    needs
}

/// Vault on, every namespace: the ServiceAccount gains exactly the Vault rules everywhere, and
/// still none of the cluster-wide RBAC, CRD, guardrail or namespace writes; upgraded with Vault
/// off, it loses them again.
#[tokio::test]
async fn chart_with_vault_grants_what_vault_needs_and_loses_it_when_vault_is_off() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-vault", &[]).await;
    let other = support::temp_namespace(&client, "chart-vault-other", &[]).await;
    let release = "vc";
    let sa = "vc-portcullis";

    let values = json!({"vault": {"address": "https://vault.vault.svc:8200"}});
    install(release, &ns, values.clone()).await;

    let mut needs = checks_of(NAMESPACED, None);
    needs.extend(checks_of(NAMESPACED, Some(other.as_str())));
    needs.extend(checks_of(VAULT, None));
    needs.extend(checks_of(VAULT, Some(other.as_str())));
    // Its token and state Secrets in its own namespace.
    needs.extend(checks_of(VAULT, Some(ns.as_str())));
    for verb in ["get", "patch", "delete"] {
        needs.push(
            access(verb, "", "secrets")
                .r#in(&ns)
                .named("portcullis-vault-token"),
        );
    }
    needs.extend(cluster_and_lease_needs(&ns, None));
    expect_access(&client, &ns, sa, &needs, true).await;

    // Everything else stays denied: the default install's list, but for the Secrets and the
    // AIPipeline patch that Vault needs.
    let mut denied: Vec<Access> = never(&ns, &other)
        .into_iter()
        .filter(|a| {
            a.resource != "secrets"
                && !(a.verb == "patch" && a.resource == "aipipelines" && a.subresource.is_none())
        })
        .collect();
    assert!(
        denied.len() + 8 == never(&ns, &other).len(),
        "only the 7 Secret checks and the AIPipeline patch are lifted"
    );
    denied.extend(vault_never(None));
    denied.extend(vault_never(Some(other.as_str())));
    expect_access(&client, &ns, sa, &denied, false).await;

    // Vault off again: the Vault rules go.
    let upgraded = helm("upgrade", release, &ns, Some(json!({}))).await;
    assert_eq!(upgraded["revision"], json!(2), "{upgraded}");
    let mut gone = checks_of(VAULT, None);
    gone.extend(checks_of(VAULT, Some(other.as_str())));
    gone.extend(checks_of(VAULT, Some(ns.as_str())));
    support::wait_for("the Vault rules to go", WAIT, || async {
        let answers = allowed(&client, &ns, sa, &gone).await;
        (!answers.contains(&true)).then_some(())
    })
    .await;
    expect_access(&client, &ns, sa, &never(&ns, &other), false).await;
    helm("uninstall", release, &ns, None).await;
}

/// `support::wait_for`, with the operator's log in the panic.
async fn wait_logged<T, F, Fut>(op: &Operator, what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; operator log:\n{}",
            op.full_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Real OpenBao (behind the tests' fault proxy, with PostgreSQL behind its database engine), set
/// up as the README's "Setting up Vault" says: Kubernetes auth against the test API server, the
/// operator's policy from deploy/vault, a periodic role for the operator's ServiceAccount `ns/sa`
/// bound to `audience`, and two database roles.
async fn vault_for_operator(
    client: &Client,
    ns: &str,
    sa: &str,
    audience: &str,
    watched: &str,
) -> support::openbao::OpenBao {
    let bao = support::openbao::OpenBao::start().await;
    bao.set_up_for_operator(
        client,
        &support::openbao::OperatorSetup {
            namespace: ns,
            service_account: sa,
            audience: Some(audience),
            period: "1h",
            // `<namespace>_<pipeline>_<name>`, as the example guardrails allow.
            database_roles: &[
                &format!("{watched}_fraud_writer"),
                &format!("{watched}_fraud_writer-2"),
            ],
            database_ttl: "1h",
            database_max_ttl: "2h",
        },
    )
    .await;
    bao
}

/// A pipeline whose ingest stage reads a database credential from Vault into Secret
/// fraud-ingest-db and restarts Deployment fraud-ingest when it changes.
fn vault_pipeline(ns: &str, db_role: &str) -> AIPipeline {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "fraud", "namespace": ns},
        "spec": {"stages": [{
            "name": "ingest",
            "role": "Ingestion",
            "vault": {
                "policies": [{"path": format!("kv/data/{ns}/fraud/ingest/*"), "capabilities": ["read"]}],
                "credentials": [{
                    "name": "feature-db",
                    "path": format!("database/creds/{ns}_fraud_{db_role}"),
                    "ttl": "1h",
                    "secretName": "fraud-ingest-db",
                    "restartTargets": [{"kind": "Deployment", "name": "fraud-ingest"}],
                }],
            },
        }]},
    }))
    .expect("the pipeline")
}

/// Vault on, with watchNamespace: the ServiceAccount gets the Vault rules in the watched namespace
/// only, and in its own namespace just what its token and state Secrets need; the real operator,
/// running as that ServiceAccount with the Deployment's arguments and logging in to real OpenBao
/// with the projected token the chart asks for, delivers a credential that logs into PostgreSQL,
/// rotates it with a restart, deletes the Secret of a credential no longer requested, and cleans
/// Vault up when the pipeline is deleted (the PostgreSQL roles dropped), without being refused
/// anything.
#[tokio::test]
async fn chart_with_vault_and_watch_namespace_is_least_privilege_and_enough() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "chart-vw-release", &[]).await;
    let watched = support::temp_namespace(&client, "chart-vw-watched", &[]).await;
    let other = support::temp_namespace(&client, "chart-vw-other", &[]).await;
    let release = "vw";
    let sa = "vw-portcullis";
    let audience = "vault";

    let bao = vault_for_operator(&client, &ns, sa, audience, &watched).await;
    let values = json!({
        "watchNamespace": watched,
        "replicaCount": 1,
        "vault": {
            "address": bao.address(),
            "tokenAudience": audience,
            "requestTimeout": "5s",
            "revokeGrace": "1s",
            "restartMinInterval": "1s",
        },
    });
    let manifest = install(release, &ns, values.clone()).await;

    // Least privilege, asked of the authorizer.
    let mut needs = checks_of(NAMESPACED, Some(watched.as_str()));
    needs.extend(checks_of(VAULT, Some(watched.as_str())));
    for verb in ["get", "create", "patch", "delete"] {
        needs.push(access(verb, "", "secrets").r#in(&ns));
    }
    for verb in ["get", "patch", "delete"] {
        needs.push(
            access(verb, "", "secrets")
                .r#in(&ns)
                .named("portcullis-vault-token"),
        );
    }
    needs.extend(cluster_and_lease_needs(&ns, Some(&watched)));
    expect_access(&client, &ns, sa, &needs, true).await;

    let mut denied = checks_of(NAMESPACED, Some(other.as_str()));
    denied.extend(checks_of(NAMESPACED, None));
    denied.extend(checks_of(NAMESPACED, Some(ns.as_str())));
    denied.extend(checks_of(VAULT, Some(other.as_str())));
    denied.extend(checks_of(VAULT, None));
    denied.extend(vault_never(Some(watched.as_str())));
    // In its own namespace: no list or watch of Secrets, no workloads, no AIPipelines.
    denied.extend(checks_of(VAULT, Some(ns.as_str())).into_iter().filter(|a| {
        !(a.resource == "secrets" && ["get", "create", "patch", "delete"].contains(&a.verb))
    }));
    denied.push(access("update", "", "secrets").r#in(&ns));
    // The default install's list, but reading a Secret of its own namespace by name (the state
    // Secrets' names are not known in advance).
    denied.extend(never(&ns, &other).into_iter().filter(|a| {
        !(a.resource == "secrets" && a.verb == "get" && a.namespace == Some(ns.as_str()))
    }));
    expect_access(&client, &ns, sa, &denied, false).await;

    // Enough: the real operator, as that ServiceAccount.
    let _one_operator = operator_lock().lock().await;
    let token_dir = tempfile::tempdir().expect("temp dir");
    let token_file = token_dir.path().join("token");
    std::fs::write(
        &token_file,
        // Valid 10 minutes, for the chart's audience, as the projected Vault token volume.
        support::service_account_token_with(&client, &ns, sa, &[audience], 600).await,
    )
    .expect("token written");
    let key = audit_key(&client, &manifest, &ns).await;
    let kubeconfig = impersonating_kubeconfig(token_dir.path(), &ns, sa);
    let mut op = start_as_deployed(
        &manifest,
        &ns,
        &key,
        &kubeconfig,
        &[("--vault-auth-token-path", token_file.as_path())],
    );
    wait_for_lease(&client, &ns, &op).await;

    support::create_guardrails(&client, &support::guardrails_for(&watched)).await;
    support::restart_target(&client, &watched, "fraud-ingest", "fraud-ingest").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &watched);
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &watched);
    let pipeline = pipelines
        .create(&PostParams::default(), &vault_pipeline(&watched, "writer"))
        .await
        .expect("the pipeline");
    let uid = pipeline.uid().expect("a uid");

    // The credential arrives as a Secret of the pipeline (Secrets: get, create, patch in the
    // watched namespace; the operator logged in with the projected token and kept its Vault token
    // and the pipeline's state in its own namespace).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &watched);
    let (first_hash, first_user) = wait_logged(&op, "the credential Secret", WAIT, || async {
        let secret = secrets.get_opt("fraud-ingest-db").await.ok()??;
        let hash = secret
            .annotations()
            .get("portcullis.dev/lease-hash")?
            .clone();
        let data = secret.data.as_ref()?;
        let field = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        let (user, password) = (field("username")?, field("password")?);
        let owned = secret.owner_references().iter().any(|o| o.uid == uid);
        // Delivered: the credentials log into PostgreSQL.
        let login = support::postgres::postgres().log_in(&user, &password);
        (login.as_deref() == Ok(user.as_str()) && owned).then_some((hash, user))
    })
    .await;
    let own: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let state_secret = format!("portcullis-vault-{uid}");
    for name in ["portcullis-vault-token", state_secret.as_str()] {
        assert!(
            own.get_opt(name).await.expect("get").is_some(),
            "Secret {ns}/{name}; operator log:\n{}",
            op.full_log()
        );
    }
    assert!(
        pipelines
            .get("fraud")
            .await
            .expect("the pipeline")
            .finalizers()
            .iter()
            .any(|f| f == "portcullis.dev/vault-cleanup"),
        "the Vault finalizer is set (patch on aipipelines)"
    );
    let stage_role = portcullis::plan::names::vault_object(
        portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX,
        &watched,
        "fraud",
        "ingest",
    );
    assert!(
        bao.kubernetes_roles().await.contains(&stage_role)
            && bao.policy(&stage_role).await.is_some(),
        "the stage's Vault role and policy are written"
    );

    // Rotate: a new path issues new credentials and restarts the consumer (apps get, patch).
    let stages =
        serde_json::to_value(&vault_pipeline(&watched, "writer-2").spec.stages).expect("stages");
    pipelines
        .patch(
            "fraud",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stages": stages}})),
        )
        .await
        .expect("the credential's path changed");
    wait_logged(
        &op,
        "the rotated credential and the restart",
        WAIT,
        || async {
            let secret = secrets.get_opt("fraud-ingest-db").await.ok()??;
            let hash = secret.annotations().get("portcullis.dev/lease-hash")?;
            let restarted = deployments
                .get("fraud-ingest")
                .await
                .ok()?
                .spec?
                .template
                .metadata?
                .annotations?
                .contains_key("portcullis.dev/restarted-at");
            (*hash != first_hash && restarted).then_some(())
        },
    )
    .await;
    // The replaced lease is revoked after the grace period (1 s).
    wait_logged(&op, "one active lease", WAIT, || async {
        let replaced_gone = support::postgres::postgres().role(&first_user).is_none();
        (bao.leases().await.len() == 1 && replaced_gone).then_some(())
    })
    .await;

    // No credential any more: its lease is revoked and its Secret deleted (Secrets: delete).
    let mut without = vault_pipeline(&watched, "writer-2");
    without.spec.stages[0]
        .vault
        .as_mut()
        .expect("vault")
        .credentials
        .clear();
    let stages = serde_json::to_value(&without.spec.stages).expect("stages");
    pipelines
        .patch(
            "fraud",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stages": stages}})),
        )
        .await
        .expect("the credential removed");
    wait_logged(&op, "the credential Secret to be deleted", WAIT, || async {
        secrets
            .get_opt("fraud-ingest-db")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // Delete the pipeline: the operator cleans Vault, deletes its state Secret and removes its
    // finalizer (patch), so the pipeline goes.
    pipelines
        .delete("fraud", &Default::default())
        .await
        .expect("the pipeline deleted");
    wait_logged(
        &op,
        "the pipeline and its Vault state to go",
        WAIT,
        || async {
            let pipeline_gone = pipelines.get_opt("fraud").await.ok()?.is_none();
            let state_gone = own.get_opt(&state_secret).await.ok()?.is_none();
            let vault_clean = !bao.kubernetes_roles().await.contains(&stage_role)
                && bao.policy(&stage_role).await.is_none()
                && bao.leases().await.is_empty();
            (pipeline_gone && state_gone && vault_clean).then_some(())
        },
    )
    .await;

    assert_no_forbidden(&op);
    let (ok, out) = op.verify();
    assert!(ok, "the decision log verifies with the chart's key: {out}");
    op.stop();
    helm("uninstall", release, &ns, None).await;
}
