//! The chart's values for installing it anywhere (charts/portcullis), rendered and linted with
//! Helm's own library (helm-sdkpy, through hack/helm/chart.py; no cluster): security contexts
//! that the `restricted` Pod Security profile and OpenShift accept, the extra arguments,
//! environment and volumes, spreading and priority, `global` from a parent chart, the `helm test`
//! Pod, and a decision-log key that the operator generates (identical renders for GitOps tools).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use support::root;

fn chart_dir() -> PathBuf {
    root().join("charts/portcullis")
}

/// The python of the helm-sdkpy venv (hack/helm/setup.sh), set up once per test binary.
fn helm_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("hack/helm/setup.sh"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run hack/helm/setup.sh");
        assert!(
            out.status.success(),
            "hack/helm/setup.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// `hack/helm/chart.py <command> charts/portcullis -f <values>`: (succeeded, stdout, stderr).
fn chart_py(command: &str, values: &Value) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.json");
    std::fs::write(&file, serde_json::to_vec(values).unwrap()).unwrap();
    let mut cmd = Command::new(helm_python());
    cmd.arg(root().join("hack/helm/chart.py"))
        .arg(command)
        .arg(chart_dir());
    if command == "template" {
        cmd.args([
            "--release",
            "portcullis",
            "--namespace",
            "portcullis-system",
        ]);
    }
    for (var, sub) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        cmd.env(var, dir.path().join(sub));
    }
    let out = cmd
        .arg("-f")
        .arg(&file)
        .current_dir(root())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run hack/helm/chart.py");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rendered objects, hooks included (as `helm template`), after `helm lint` passed.
fn render(values: &Value) -> Vec<Value> {
    let (ok, stdout, stderr) = chart_py("lint", values);
    assert!(ok, "helm lint with {values}:\n{stdout}{stderr}");
    let (ok, stdout, stderr) = chart_py("template", values);
    assert!(ok, "helm template with {values}:\n{stderr}");
    serde_saphyr::from_multiple::<Value>(&stdout)
        .unwrap_or_else(|e| panic!("not YAML: {e}\n{stdout}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn render_error(values: &Value) -> String {
    let (ok, _, stderr) = chart_py("template", values);
    assert!(!ok, "rendering with {values} should fail");
    stderr
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

fn args(deployment: &Value) -> Vec<&str> {
    pod_spec(deployment)["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string argument"))
        .collect()
}

/// What the Pod Security Standards' `restricted` profile requires of a Pod spec, and what
/// OpenShift's `restricted-v2` SCC rejects (a fixed user).
fn assert_restricted(what: &str, pod: &Value) {
    let psc = &pod["securityContext"];
    for container in pod["containers"].as_array().expect("containers") {
        let sc = &container["securityContext"];
        let name = &container["name"];
        assert!(
            psc["runAsNonRoot"] == true || sc["runAsNonRoot"] == true,
            "{what}/{name}: runAsNonRoot"
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}/{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}/{name}");
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{what}/{name}: no capability added"
        );
        assert!(
            psc["seccompProfile"]["type"] == "RuntimeDefault"
                || sc["seccompProfile"]["type"] == "RuntimeDefault",
            "{what}/{name}: seccomp RuntimeDefault"
        );
        assert!(sc["privileged"] != true, "{what}/{name}: not privileged");
        assert!(
            sc["runAsUser"].is_null() && psc["runAsUser"].is_null(),
            "{what}/{name}: no runAsUser pin, which OpenShift's restricted-v2 rejects"
        );
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let kinds: Vec<&String> = volume
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "name")
            .collect();
        assert!(
            kinds.iter().all(|k| [
                "emptyDir",
                "secret",
                "configMap",
                "projected",
                "persistentVolumeClaim",
                "downwardAPI"
            ]
            .contains(&k.as_str())),
            "{what}: volume types the restricted profile allows: {volume}"
        );
    }
}

#[test]
fn the_defaults_pass_the_restricted_profile_and_openshift_can_drop_fs_group() {
    let objects = render(&json!({}));
    let deployment = named(&objects, "Deployment", "portcullis");
    assert_restricted("Deployment", pod_spec(deployment));
    assert_eq!(
        pod_spec(deployment)["securityContext"]["fsGroup"],
        65532,
        "the key Secret and a decision-log PVC are readable by the image's user"
    );
    let test_pod = named(&objects, "Pod", "portcullis-test-readyz");
    assert_restricted("helm test Pod", &test_pod["spec"]);

    // OpenShift: no fsGroup (restricted-v2 assigns the namespace's), the rest unchanged.
    let objects = render(&json!({"podSecurityContext": {"fsGroup": null}}));
    let pod = pod_spec(named(&objects, "Deployment", "portcullis"));
    assert_restricted("Deployment (OpenShift)", pod);
    assert!(pod["securityContext"]["fsGroup"].is_null(), "{pod}");

    // Overridden whole, as a user would for a stricter profile of their own.
    let objects = render(&json!({
        "securityContext": {
            "allowPrivilegeEscalation": false, "runAsNonRoot": true, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "Localhost", "localhostProfile": "portcullis.json"}
        },
    }));
    let container = &pod_spec(named(&objects, "Deployment", "portcullis"))["containers"][0];
    assert_eq!(
        container["securityContext"]["seccompProfile"]["localhostProfile"],
        "portcullis.json"
    );
}

#[test]
fn extra_args_env_volumes_spread_and_priority_reach_every_shard() {
    let spread = json!([{
        "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "portcullis"}}
    }]);
    let objects = render(&json!({
        "sharding": {"count": 2},
        "extraArgs": ["--vault-resync", "10m"],
        "extraEnv": [
            {"name": "HTTPS_PROXY", "value": "http://proxy.corp.example:3128"},
            {"name": "NO_PROXY", "value": ".svc,.cluster.local"}
        ],
        "extraVolumes": [{"name": "proxy-ca", "configMap": {"name": "proxy-ca"}}],
        "extraVolumeMounts": [{"name": "proxy-ca", "mountPath": "/etc/proxy-ca", "readOnly": true}],
        "topologySpreadConstraints": spread,
        "priorityClassName": "platform-critical",
    }));
    let deployments = find(&objects, "Deployment");
    assert_eq!(deployments.len(), 2);
    for deployment in deployments {
        let pod = pod_spec(deployment);
        let args = args(deployment);
        assert_eq!(
            &args[args.len() - 2..],
            ["--vault-resync", "10m"],
            "extraArgs come last, so they override the chart's: {args:?}"
        );
        assert_eq!(args[0], "run");
        let env = &pod["containers"][0]["env"];
        assert!(
            env.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "HTTPS_PROXY"
                    && e["value"] == "http://proxy.corp.example:3128"),
            "{env}"
        );
        assert!(
            env.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "POD_NAMESPACE"),
            "the chart's own variables stay: {env}"
        );
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "proxy-ca" && v["configMap"]["name"] == "proxy-ca")
        );
        assert!(
            pod["containers"][0]["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "proxy-ca" && m["mountPath"] == "/etc/proxy-ca")
        );
        assert_eq!(pod["topologySpreadConstraints"], spread);
        assert_eq!(pod["priorityClassName"], "platform-critical");
    }
}

#[test]
fn the_schema_accepts_global_and_still_rejects_mistakes() {
    // A parent chart's globals reach every subchart: they must not fail the schema.
    render(&json!({"global": {"imageRegistry": "registry.corp.example", "imagePullSecrets": []}}));
    for (values, at) in [
        (json!({"extraEnv": [{"value": "no name"}]}), "extraEnv"),
        (json!({"extraArgs": [7]}), "extraArgs"),
        (
            json!({"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "ScheduleAnyway"}]}),
            "topologySpreadConstraints",
        ),
        (json!({"auditLog": {"generateKey": "vault"}}), "generateKey"),
        (
            json!({"podSecurityContext": {"runAsUsr": 1000}}),
            "podSecurityContext",
        ),
        (json!({"globals": {}}), "globals"),
    ] {
        let error = render_error(&values);
        assert!(
            error.contains(at),
            "{values}: the schema error names {at}:\n{error}"
        );
    }
}

#[test]
fn the_helm_test_pod_asks_the_metrics_service_for_readyz_and_is_selected_by_nothing_else() {
    let objects = render(&json!({
        "metrics": {"port": 9443},
        "networkPolicy": {"enabled": true},
        "image": {"repository": "registry.corp.example/portcullis", "tag": "1.2.3"},
    }));
    let pod = named(&objects, "Pod", "portcullis-test-readyz");
    assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.corp.example/portcullis:1.2.3");
    assert_eq!(
        container["args"],
        json!([
            "probe",
            "http://portcullis-metrics.portcullis-system.svc:9443/readyz",
            "--timeout",
            "10"
        ])
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);

    let labels = pod["metadata"]["labels"].as_object().unwrap();
    let selects_pod = |selector: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    let service = named(&objects, "Service", "portcullis-metrics");
    assert!(
        !selects_pod(&service["spec"]["selector"]),
        "the metrics Service must not send traffic to the test Pod"
    );
    let deployment = named(&objects, "Deployment", "portcullis");
    assert!(!selects_pod(&deployment["spec"]["selector"]["matchLabels"]));
    let policy = named(&objects, "NetworkPolicy", "portcullis");
    assert!(!selects_pod(&policy["spec"]["podSelector"]["matchLabels"]));
    let peers = &policy["spec"]["ingress"][0]["from"];
    assert!(
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| selects_pod(&p["podSelector"]["matchLabels"])),
        "the operator's NetworkPolicy lets the test Pod in: {peers}"
    );
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], 9443);

    let objects = render(&json!({"helmTest": {"enabled": false}}));
    assert!(find(&objects, "Pod").is_empty());
}

#[test]
fn an_operator_generated_key_renders_the_same_every_time_and_grants_only_that_secret() {
    // The chart's own key: every render without a cluster (`helm template`, as Argo CD renders)
    // makes a new one.
    let secret_of =
        |objects: &[Value]| named(objects, "Secret", "portcullis-audit-key")["data"]["key"].clone();
    assert_ne!(
        secret_of(&render(&json!({}))),
        secret_of(&render(&json!({}))),
        "generateKey: helm cannot keep a key without lookup"
    );

    let values = json!({"auditLog": {"generateKey": "operator"}});
    let first = render(&values);
    assert_eq!(first, render(&values), "two renders are identical");
    assert!(find(&first, "Secret").is_empty(), "no Secret in the chart");
    let deployment = named(&first, "Deployment", "portcullis");
    let operator_args = args(deployment);
    let flag = |name: &str| {
        operator_args
            .iter()
            .position(|a| *a == name)
            .map(|i| operator_args[i + 1])
            .unwrap_or_else(|| panic!("no {name} in {operator_args:?}"))
    };
    assert_eq!(flag("--audit-key-secret"), "portcullis-audit-key");
    assert_eq!(flag("--audit-key"), "/var/run/portcullis/audit-key/key");
    let pod = pod_spec(deployment);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "audit-key")
        .unwrap();
    assert_eq!(
        volume["emptyDir"]["medium"], "Memory",
        "the key is never on disk: {volume}"
    );
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "audit-key")
        .unwrap();
    assert_eq!(mount["mountPath"], "/var/run/portcullis/audit-key");

    let role = named(&first, "Role", "portcullis-audit-key");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["portcullis-audit-key"], "verbs": ["get"]}
        ])
    );
    let binding = named(&first, "RoleBinding", "portcullis-audit-key");
    assert_eq!(binding["subjects"][0]["name"], "portcullis");

    // An existing Secret wins: mounted as before, and no access to Secrets.
    let objects =
        render(&json!({"auditLog": {"generateKey": "operator", "existingSecret": "mine"}}));
    assert!(
        find(&objects, "Role")
            .iter()
            .all(|r| r["metadata"]["name"] != "portcullis-audit-key")
    );
    let deployment = named(&objects, "Deployment", "portcullis");
    assert!(!args(deployment).contains(&"--audit-key-secret"));
    assert!(args(deployment).contains(&"/etc/portcullis/audit-key/key"));
}

/// promtool, from hack/promtool.sh (Debian's `prometheus` package, installed when missing).
fn promtool() -> PathBuf {
    let out = Command::new("bash")
        .arg(root().join("hack/promtool.sh"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run hack/promtool.sh");
    assert!(
        out.status.success(),
        "hack/promtool.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn the_prometheus_rules_fire_as_promtool_tests_say_and_the_dashboard_loads() {
    let objects = render(&json!({
        "metrics": {
            "prometheusRule": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
            "grafanaDashboard": {"enabled": true, "namespace": "monitoring"},
        },
    }));
    let rule = named(&objects, "PrometheusRule", "portcullis");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["metadata"]["labels"]["release"], "kube-prometheus-stack",
        "the labels Prometheus selects rules by"
    );
    let alerts: BTreeSet<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        BTreeSet::from([
            "PortcullisCredentialExpiringWithoutRenewal",
            "PortcullisPipelineNotReady",
            "PortcullisVaultFailing",
            "PortcullisDecisionLogFailing",
            "PortcullisReconcileErrors",
            "PortcullisNoLeader",
        ])
    );

    // promtool checks the rules and runs tests/data/prometheus-rules-test.yaml on them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.json"),
        serde_json::to_vec(&json!({"groups": rule["spec"]["groups"]})).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("tests/data/prometheus-rules-test.yaml"),
        dir.path().join("rules-test.yaml"),
    )
    .unwrap();
    let promtool = promtool();
    for args in [
        ["check", "rules", "rules.json"],
        ["test", "rules", "rules-test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The dashboard: a ConfigMap where Grafana's sidecar looks, with the chart's JSON in it.
    let dashboard = named(&objects, "ConfigMap", "portcullis-dashboard");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(
        dashboard["data"]["portcullis.json"]
            .as_str()
            .expect("the dashboard JSON"),
    )
    .expect("the dashboard is JSON");
    assert_eq!(
        json,
        serde_json::from_str::<Value>(
            &std::fs::read_to_string(chart_dir().join("dashboards/portcullis.json")).unwrap()
        )
        .unwrap(),
        "the ConfigMap carries the file unchanged"
    );
    assert!(json["panels"].as_array().unwrap().len() >= 10);

    let objects = render(&json!({}));
    assert!(
        find(&objects, "PrometheusRule").is_empty(),
        "off by default"
    );
    assert!(find(&objects, "ConfigMap").is_empty());
}

/// The chart's Pods pass the `restricted` Pod Security profile as the API server enforces it:
/// the operator's Pod template and the `helm test` Pod, created (dry run) in a namespace that
/// enforces the profile, with the defaults and with OpenShift's values.
#[tokio::test]
async fn the_api_server_admits_the_pods_under_the_restricted_profile() {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    use kube::api::{Api, PostParams};

    let client = support::control_plane().client().await;
    let ns = support::temp_namespace(
        &client,
        "chart-restricted",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await;
    let service_account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "portcullis", "namespace": ns}}))
            .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service_account)
        .await
        .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    for values in [
        json!({}),
        json!({"podSecurityContext": {"fsGroup": null}}),
        json!({"auditLog": {"generateKey": "operator"}, "vault": {"address": "https://vault.example:8200"}}),
    ] {
        let objects = tokio::task::spawn_blocking({
            let values = values.clone();
            move || render(&values)
        })
        .await
        .unwrap();
        let deployment = named(&objects, "Deployment", "portcullis");
        let test_pod = named(&objects, "Pod", "portcullis-test-readyz");
        for (what, spec) in [
            ("the operator's Pod", pod_spec(deployment).clone()),
            ("the helm test Pod", test_pod["spec"].clone()),
        ] {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "dry-run", "namespace": ns},
                "spec": spec,
            }))
            .unwrap();
            Api::<Pod>::namespaced(client.clone(), &ns)
                .create(&dry_run, &pod)
                .await
                .unwrap_or_else(|e| panic!("{what} with {values}: {e}"));
        }
    }
}

/// Both sources enabled, with the alerts.
fn runtime_access_values() -> Value {
    json!({
        "replicaCount": 1,
        "metrics": {"prometheusRule": {"enabled": true}},
        "runtimeAccess": {
            "auditWebhook": {"enabled": true, "tokenSecret": "audit-webhook-token", "tlsSecret": "audit-webhook-tls"},
            "vaultAuditSocket": {"enabled": true, "from": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
            }},
            "thresholds": {"learningWindow": "12h", "spikeFactor": 2.5},
        },
    })
}

/// Runtime access: the audit Service has the enabled ports, the flags reach the operator, and
/// only Vault may reach the Vault socket.
#[test]
fn runtime_access_opens_its_ports_to_whom_it_should() {
    let objects = render(&runtime_access_values());
    let service = named(&objects, "Service", "portcullis-audit");
    let ports: Vec<(&str, u64)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports, vec![("audit-webhook", 8443), ("vault-audit", 9090)]);
    let deployment = named(&objects, "Deployment", "portcullis");
    let container = &pod_spec(deployment)["containers"][0];
    let container_ports: BTreeSet<&str> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        container_ports,
        BTreeSet::from(["metrics", "audit-webhook", "vault-audit"])
    );
    let operator_args = args(deployment);
    let flag = |name: &str| {
        let at = operator_args
            .iter()
            .position(|a| *a == name)
            .unwrap_or_else(|| panic!("{name} in {operator_args:?}"));
        operator_args[at + 1]
    };
    assert_eq!(flag("--audit-webhook-addr"), "0.0.0.0:8443");
    assert_eq!(flag("--vault-audit-addr"), "0.0.0.0:9090");
    assert_eq!(flag("--audit-max-body-bytes"), "8388608");
    assert_eq!(flag("--access-learning-window"), "12h");
    assert_eq!(flag("--access-spike-factor"), "2.5");
    let mounted: BTreeSet<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for file in [
        flag("--audit-webhook-token-file"),
        flag("--audit-webhook-tls-cert-file"),
        flag("--audit-webhook-tls-key-file"),
    ] {
        assert!(
            mounted.iter().any(|m| file.starts_with(&format!("{m}/"))),
            "{file} is mounted"
        );
    }

    // Only Vault reaches the socket; the webhook (token over TLS) and, without
    // networkPolicy.enabled, the metrics port stay open as they were.
    let policy = named(&objects, "NetworkPolicy", "portcullis-audit");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let rule_for = |port: u64| {
        rules
            .iter()
            .find(|r| r["ports"][0]["port"] == port)
            .unwrap_or_else(|| panic!("a rule for port {port}: {rules:?}"))
    };
    assert_eq!(
        rule_for(9090)["from"],
        json!([{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
        }]),
        "one peer: Vault's Pods in Vault's namespace"
    );
    assert!(rule_for(8443).get("from").is_none());
    assert!(rule_for(8080).get("from").is_none());
    assert_eq!(rules.len(), 3);
    let with_policy = render(&json!({
        "replicaCount": 1,
        "networkPolicy": {"enabled": true},
        "runtimeAccess": {"vaultAuditSocket": {"enabled": true, "from": {"cidrs": ["10.40.0.0/24"]}}},
    }));
    let rules = named(&with_policy, "NetworkPolicy", "portcullis-audit")["spec"]["ingress"].clone();
    assert_eq!(
        rules,
        json!([{"ports": [{"port": 9090, "protocol": "TCP"}], "from": [{"ipBlock": {"cidr": "10.40.0.0/24"}}]}]),
        "with networkPolicy.enabled, metricsFrom alone says who scrapes"
    );
}

/// Runtime access: the Pod watch is granted only with it, and values that cannot work are
/// refused.
#[test]
fn runtime_access_adds_its_service_policy_and_alerts_only_when_on_and_refuses_what_cannot_work() {
    let objects = render(&runtime_access_values());
    // The Pod watch: the operator's own rules always hold list + watch on pods (the coverage
    // check reads them too), cluster-wide or in watchNamespace only; runtime access adds no
    // RBAC object of its own for them.
    let pods_rule = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]});
    let grants_pods = |objects: &[Value], kind: &str| {
        find(objects, kind).iter().any(|r| {
            r["rules"]
                .as_array()
                .is_some_and(|rules| rules.contains(&pods_rule))
        })
    };
    let stage_pods_objects = |objects: &[Value]| {
        objects
            .iter()
            .filter(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("stage-pods"))
            })
            .count()
    };
    assert!(grants_pods(&objects, "ClusterRole"));
    assert_eq!(stage_pods_objects(&objects), 0);
    let scoped = render(&json!({
        "replicaCount": 1,
        "watchNamespace": "ml",
        "runtimeAccess": {"vaultAuditSocket": {"enabled": true, "from": {"cidrs": ["10.40.0.0/24"]}}},
    }));
    assert!(grants_pods(&scoped, "Role") && !grants_pods(&scoped, "ClusterRole"));
    let off = render(&json!({"metrics": {"prometheusRule": {"enabled": true}}}));
    assert!(
        grants_pods(&off, "ClusterRole"),
        "the coverage check reads pods"
    );
    assert!(
        find(&off, "Service")
            .iter()
            .all(|s| s["metadata"]["name"] != "portcullis-audit")
    );
    assert!(!args(named(&off, "Deployment", "portcullis")).contains(&"--vault-audit-addr"));
    assert!(
        find(&off, "PrometheusRule")
            .iter()
            .all(|r| r["metadata"]["name"] != "portcullis-access-anomalies"),
        "no anomaly alerts without runtime access"
    );
    let unwatched = render(&json!({
        "replicaCount": 1,
        "runtimeAccess": {"watchStagePods": false, "vaultAuditSocket": {"enabled": true, "from": {"cidrs": ["10.40.0.0/24"]}}},
    }));
    assert!(args(named(&unwatched, "Deployment", "portcullis")).contains(&"--no-watch-stage-pods"));

    // Values that cannot work.
    for (values, says) in [
        (
            json!({"runtimeAccess": {"vaultAuditSocket": {"enabled": true, "from": {"cidrs": ["10.40.0.0/24"]}}}}),
            "runtimeAccess needs replicaCount: 1",
        ),
        (
            json!({"replicaCount": 1, "runtimeAccess": {"vaultAuditSocket": {"enabled": true}}}),
            "runtimeAccess.vaultAuditSocket.from",
        ),
        (
            json!({"replicaCount": 1, "runtimeAccess": {"auditWebhook": {"enabled": true, "tlsSecret": "tls"}}}),
            "runtimeAccess.auditWebhook.tokenSecret",
        ),
    ] {
        let error = render_error(&values);
        assert!(error.contains(says), "{values}: {error}");
    }
}

/// Runtime access: the anomaly alerts fire as deploy/prometheus/access-anomalies.test.yaml says.
#[test]
fn runtime_access_alerts_on_anomalies_as_promtool_tests_say() {
    let objects = render(&runtime_access_values());
    // The anomaly alerts: the same rules as deploy/prometheus/access-anomalies.yaml, run through
    // its promtool tests.
    let rule = named(&objects, "PrometheusRule", "portcullis-access-anomalies");
    let deployed: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/access-anomalies.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], deployed["spec"]["groups"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("access-anomalies.rules.yaml"),
        serde_json::to_vec(&json!({"groups": rule["spec"]["groups"]})).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("deploy/prometheus/access-anomalies.test.yaml"),
        dir.path().join("access-anomalies.test.yaml"),
    )
    .unwrap();
    let promtool = promtool();
    for args in [
        ["check", "rules", "access-anomalies.rules.yaml"],
        ["test", "rules", "access-anomalies.test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
