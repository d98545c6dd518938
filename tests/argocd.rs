//! The Argo CD health check for AIPipelines (`deploy/argocd/health.lua`), run by a real Lua 5.1
//! interpreter (Debian's `lua5.1`, the dialect Argo CD's gopher-lua speaks) in a sandbox with
//! only the libraries Argo CD gives health scripts: on hand-written statuses, on the statuses the
//! operator really writes against a real API server, and byte for byte in the `argocd-cm`
//! snippet and the README.

mod support;

use support::{get_raw, pipelines_request, read, root, wait_ready_raw};

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, GetParams, Patch, PatchParams, PostParams};
use kube::core::Request;
use serde_json::{Value, json};

/// The `argocd-cm` key Argo CD reads the AIPipeline health check from.
const HEALTH_KEY: &str = "resource.customizations.health.portcullis.dev_AIPipeline";

// ---------------------------------------------------------------------------------------------
// The interpreter and the harness.

fn lua_runs(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn apt_get(args: &[&str]) -> (bool, String) {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    match out {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("apt-get could not be run: {e}")),
    }
}

/// `lua5.1`, installed from Debian when it is missing (`apt-get update` only when the first
/// install fails).
fn lua() -> &'static str {
    static LUA: OnceLock<Result<&'static str, String>> = OnceLock::new();
    let found = LUA.get_or_init(|| {
        const PROGRAM: &str = "lua5.1";
        if lua_runs(PROGRAM) {
            return Ok(PROGRAM);
        }
        let (ok, first) = apt_get(&["install", "-y", "lua5.1"]);
        if ok && lua_runs(PROGRAM) {
            return Ok(PROGRAM);
        }
        let (_, update) = apt_get(&["update"]);
        let (ok, second) = apt_get(&["install", "-y", "lua5.1"]);
        if ok && lua_runs(PROGRAM) {
            return Ok(PROGRAM);
        }
        Err(format!(
            "lua5.1 is missing and could not be installed.\napt-get install:\n{first}\napt-get update:\n{update}\napt-get install:\n{second}"
        ))
    });
    match found {
        Ok(program) => program,
        Err(message) => panic!("{message}"),
    }
}

/// A Lua string literal for `s`: quotes, backslashes and control characters escaped (as `\ddd`,
/// three digits, so a following digit is never read into the escape); other bytes as they are.
fn lua_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\{:03}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A Lua table constructor for a JSON value, as Argo CD hands objects to Lua: objects and
/// arrays become tables (arrays 1-based), `null` becomes `nil`.
fn lua_value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&format!(
                    "{:?}",
                    n.as_f64().expect("a JSON number is finite")
                ));
            }
        }
        Value::String(s) => lua_string(s, out),
        Value::Array(items) => {
            out.push('{');
            for item in items {
                lua_value(item, out);
                out.push_str(", ");
            }
            out.push('}');
        }
        Value::Object(fields) => {
            out.push('{');
            for (key, value) in fields {
                out.push('[');
                lua_string(key, out);
                out.push_str("] = ");
                lua_value(value, out);
                out.push_str(", ");
            }
            out.push('}');
        }
    }
}

/// Argo CD's verdict on `object`: (`hs.status`, `hs.message`), from `script` run by `lua5.1`
/// with `obj` set and nothing but the base functions, `string`, `table` and `math` in reach.
fn health_of(script: &Path, object: &Value) -> (String, String) {
    let mut harness = String::from("local obj = ");
    lua_value(object, &mut harness);
    harness.push_str("\nlocal chunk = assert(loadfile(");
    lua_string(&script.display().to_string(), &mut harness);
    harness.push_str(
        r#"))
local env = {
  obj = obj, ipairs = ipairs, pairs = pairs, next = next, type = type, tostring = tostring,
  tonumber = tonumber, select = select, unpack = unpack, error = error, pcall = pcall,
  assert = assert, string = string, table = table, math = math,
}
setfenv(chunk, env)
local hs = chunk()
if type(hs) ~= "table" then error("the health script returned " .. type(hs) .. ", not a table") end
io.write(tostring(hs.status), "\n", tostring(hs.message))
"#,
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("harness.lua");
    std::fs::write(&path, &harness).expect("harness written");
    let out = Command::new(lua())
        .arg(&path)
        .output()
        .expect("lua5.1 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the health script failed on {object:#}:\n{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, message) = stdout
        .split_once('\n')
        .unwrap_or_else(|| panic!("no status and message in {stdout:?}"));
    assert!(
        [
            "Healthy",
            "Progressing",
            "Degraded",
            "Suspended",
            "Missing",
            "Unknown"
        ]
        .contains(&status),
        "{status:?} is not an Argo CD health status"
    );
    (status.to_string(), message.to_string())
}

fn health(object: &Value) -> (String, String) {
    health_of(&root().join("deploy/argocd/health.lua"), object)
}

// ---------------------------------------------------------------------------------------------
// Hand-written statuses, shaped as `src/controller/status.rs` writes them.

fn condition(type_: &str, status: &str, reason: &str, message: &str, generation: i64) -> Value {
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    })
}

fn pipeline(generation: i64, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {
            "name": "fraud-detector",
            "namespace": "ml-fraud",
            "generation": generation,
            "labels": {"app.kubernetes.io/instance": "pipelines"},
            "annotations": {"argocd.argoproj.io/tracking-id": "pipelines:portcullis.dev/AIPipeline:ml-fraud/fraud-detector"},
        },
        "spec": {"stages": [{"name": "serve", "role": "Deployment", "network": {"egress": [
            {"cidr": "10.30.0.0/16", "ports": [{"port": 443, "protocol": "TCP"}]}
        ]}}]},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

const RECONCILED: &str = "3 stages have their identities, RBAC and network policies";

fn healthy_conditions(generation: i64) -> Vec<Value> {
    vec![
        condition("Ready", "True", "Reconciled", RECONCILED, generation),
        condition(
            "GuardrailsSatisfied",
            "True",
            "AllAllowed",
            "everything requested is allowed",
            generation,
        ),
        condition(
            "Degraded",
            "False",
            "Healthy",
            "nothing is wrong",
            generation,
        ),
    ]
}

fn status(observed: Option<i64>, conditions: Vec<Value>) -> Value {
    let mut s = json!({"denied": 0, "conditions": conditions});
    if let Some(g) = observed {
        s["observedGeneration"] = json!(g);
    }
    s
}

#[test]
fn ready_and_current_is_healthy() {
    let (s, m) = health(&pipeline(3, Some(status(Some(3), healthy_conditions(3)))));
    assert_eq!(s, "Healthy", "{m}");
    assert!(m.contains(RECONCILED), "{m}");
}

#[test]
fn ready_for_an_older_generation_is_progressing() {
    let (s, m) = health(&pipeline(4, Some(status(Some(3), healthy_conditions(3)))));
    assert_eq!(s, "Progressing", "{m}");
    assert!(
        m.contains("generation 4") && m.contains("generation 3"),
        "{m}"
    );
}

#[test]
fn a_ready_condition_for_an_older_generation_is_progressing() {
    // status.observedGeneration is current but the Ready condition is not (a partial write).
    let (s, m) = health(&pipeline(4, Some(status(Some(4), healthy_conditions(3)))));
    assert_eq!(s, "Progressing", "{m}");
    assert!(m.contains("generation 4"), "{m}");
}

#[test]
fn no_status_is_progressing() {
    let (s, m) = health(&pipeline(1, None));
    assert_eq!(s, "Progressing", "{m}");
    assert!(m.contains("no status"), "{m}");
}

#[test]
fn no_observed_generation_is_progressing() {
    let (s, m) = health(&pipeline(1, Some(status(None, healthy_conditions(1)))));
    assert_eq!(s, "Progressing", "{m}");
    assert!(m.contains("observedGeneration"), "{m}");
}

#[test]
fn no_conditions_is_progressing() {
    let (s, m) = health(&pipeline(
        2,
        Some(json!({"observedGeneration": 2, "denied": 0})),
    ));
    assert_eq!(s, "Progressing", "{m}");
    assert!(m.contains("no Ready or Degraded condition"), "{m}");
    let (s, m) = health(&pipeline(2, Some(status(Some(2), Vec::new()))));
    assert_eq!(s, "Progressing", "{m}");
}

#[test]
fn degraded_true_is_degraded_with_the_ready_message() {
    let message = "create Role ml-fraud/fraud-detector-serve: forbidden";
    let (s, m) = health(&pipeline(
        2,
        Some(status(
            Some(2),
            vec![
                condition("Ready", "False", "ApplyFailed", message, 2),
                condition(
                    "GuardrailsSatisfied",
                    "True",
                    "AllAllowed",
                    "everything requested is allowed",
                    2,
                ),
                condition(
                    "Degraded",
                    "True",
                    "ApplyFailed",
                    "see the Ready condition",
                    2,
                ),
            ],
        )),
    ));
    assert_eq!(s, "Degraded", "{m}");
    assert_eq!(m, format!("ApplyFailed: {message}"));
}

#[test]
fn degraded_true_alone_is_degraded_with_its_own_message() {
    let (s, m) = health(&pipeline(
        2,
        Some(status(
            Some(2),
            vec![condition(
                "Degraded",
                "True",
                "ApplyFailed",
                "the API server refused a NetworkPolicy",
                2,
            )],
        )),
    ));
    assert_eq!(s, "Degraded", "{m}");
    assert_eq!(m, "ApplyFailed: the API server refused a NetworkPolicy");
}

#[test]
fn an_invalid_spec_is_degraded_with_the_message() {
    let message = "the spec is invalid, nothing was changed: spec.stages[0].network.egress[0]: set exactly one of cidr or namespace; write two rules for two destinations";
    let (s, m) = health(&pipeline(
        5,
        Some(status(
            Some(5),
            vec![
                condition("Ready", "False", "InvalidSpec", message, 5),
                condition("Degraded", "True", "InvalidSpec", message, 5),
            ],
        )),
    ));
    assert_eq!(s, "Degraded", "{m}");
    assert_eq!(m, format!("InvalidSpec: {message}"));
}

#[test]
fn credentials_not_delivered_are_degraded_or_progressing() {
    // Vault not configured: someone must act.
    let message = "the stages ask for Vault access, but the operator runs without --vault-address; nothing was written to Vault";
    let mut conditions = healthy_conditions(3);
    conditions[0] = condition("Ready", "False", "VaultNotConfigured", message, 3);
    conditions[2] = condition(
        "Degraded",
        "True",
        "VaultNotConfigured",
        "see the Ready condition",
        3,
    );
    let (s, m) = health(&pipeline(3, Some(status(Some(3), conditions))));
    assert_eq!(s, "Degraded", "{m}");
    assert_eq!(m, format!("VaultNotConfigured: {message}"));
    // Being issued: nothing wrong yet, wait.
    let message = "the stages have their identities, RBAC and network policies; 1 of 2 credentials are delivered, the rest are being issued";
    let mut conditions = healthy_conditions(3);
    conditions[0] = condition("Ready", "False", "Issuing", message, 3);
    let (s, m) = health(&pipeline(3, Some(status(Some(3), conditions))));
    assert_eq!(s, "Progressing", "{m}");
    assert!(m.contains("Issuing"), "{m}");
}

#[test]
fn refused_adoption_is_degraded() {
    let message = "ServiceAccount ml-fraud/fraud-detector-train (stage train) already exist and are not Portcullis's; nothing of those stages is bound to them. Delete or rename them, or rename the stage";
    let mut conditions = healthy_conditions(1);
    conditions[0] = condition("Ready", "False", "AdoptionRefused", message, 1);
    conditions[2] = condition(
        "Degraded",
        "True",
        "AdoptionRefused",
        "see the Ready condition",
        1,
    );
    let (s, m) = health(&pipeline(1, Some(status(Some(1), conditions.clone()))));
    assert_eq!(s, "Degraded", "{m}");
    assert_eq!(m, format!("AdoptionRefused: {message}"));
    // Also when only Ready says so.
    conditions.remove(2);
    let (s, m) = health(&pipeline(1, Some(status(Some(1), conditions))));
    assert_eq!(s, "Degraded", "{m}");
    assert_eq!(m, format!("AdoptionRefused: {message}"));
}

#[test]
fn denied_items_are_not_a_failure() {
    let denied = "2 requested items are denied and not granted; first: stage serve get secrets [CrossStageCredential]; see status.stages[].deniedItems";
    let mut conditions = healthy_conditions(1);
    conditions[1] = condition("GuardrailsSatisfied", "False", "ItemsDenied", denied, 1);
    let (s, m) = health(&pipeline(1, Some(status(Some(1), conditions))));
    assert_eq!(s, "Healthy", "{m}");
    assert!(m.contains(RECONCILED) && m.contains(denied), "{m}");
}

#[test]
fn ready_false_for_another_reason_or_unknown_is_progressing() {
    let mut conditions = healthy_conditions(1);
    conditions[0] = condition("Ready", "Unknown", "Reconciling", "planning", 1);
    let (s, m) = health(&pipeline(1, Some(status(Some(1), conditions.clone()))));
    assert_eq!(s, "Progressing", "{m}");
    assert!(
        m.contains("Ready is Unknown") && m.contains("planning"),
        "{m}"
    );
    conditions[0] = condition("Ready", "False", "Waiting", "the caches are filling", 1);
    let (s, m) = health(&pipeline(1, Some(status(Some(1), conditions))));
    assert_eq!(s, "Progressing", "{m}");
}

#[test]
fn the_serializer_keeps_awkward_strings_intact() {
    // Messages with quotes, backslashes, newlines, control characters and non-ASCII text reach
    // Lua unchanged (the Healthy message carries the Ready message through).
    let tricky = "a \"quoted\" \\path\\ with\nnew lines,\ttabs, \u{1} and ünïcødé 10.0.0.0/8";
    let mut conditions = healthy_conditions(1);
    conditions[0] = condition("Ready", "True", "Reconciled", tricky, 1);
    let (s, m) = health(&pipeline(1, Some(status(Some(1), conditions))));
    assert_eq!(s, "Healthy");
    assert_eq!(m, format!("Reconciled: {tricky}"));
}

// ---------------------------------------------------------------------------------------------
// The same Lua in the argocd-cm snippet and in the README.

#[test]
fn the_snippet_carries_health_lua_byte_for_byte() {
    let lua = read("deploy/argocd/health.lua");
    let snippet: Value = serde_saphyr::from_str(&read("deploy/argocd/argocd-cm-snippet.yaml"))
        .expect("the snippet is YAML");
    let embedded = snippet["configs"]["cm"][HEALTH_KEY]
        .as_str()
        .expect("configs.cm carries the health check key");
    assert!(
        embedded == lua,
        "deploy/argocd/argocd-cm-snippet.yaml differs from health.lua; regenerate it (README.md)"
    );
}

#[test]
fn the_readme_configmap_carries_health_lua_byte_for_byte() {
    let lua = read("deploy/argocd/health.lua");
    let readme = read("deploy/argocd/README.md");
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("\n```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.contains("kind: ConfigMap") && yaml.contains(HEALTH_KEY))
        .expect("README.md shows the argocd-cm ConfigMap form");
    let config_map: Value = serde_saphyr::from_str(block).expect("the ConfigMap is YAML");
    assert_eq!(config_map["metadata"]["name"], "argocd-cm");
    let embedded = config_map["data"][HEALTH_KEY]
        .as_str()
        .expect("data carries the health check key");
    assert!(
        embedded == lua,
        "the ConfigMap in deploy/argocd/README.md differs from health.lua"
    );
}

#[test]
fn the_application_manifests_parse_and_say_what_the_readme_says() {
    let chart: Value =
        serde_saphyr::from_str(&read("deploy/argocd/application-chart.yaml")).expect("YAML");
    assert_eq!(chart["kind"], "Application");
    assert_eq!(
        chart["spec"]["source"]["repoURL"],
        "https://git.example.com/platform/portcullis.git"
    );
    assert_eq!(chart["spec"]["source"]["path"], "charts/portcullis");
    assert_eq!(
        chart["spec"]["source"]["helm"]["valuesObject"]["auditLog"]["generateKey"], "operator",
        "under Argo CD the chart cannot keep a key it generates (no lookup): the operator makes it"
    );
    let options: Vec<&str> = chart["spec"]["syncPolicy"]["syncOptions"]
        .as_array()
        .expect("syncOptions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(options.contains(&"ServerSideApply=true"), "{options:?}");

    let pipelines: Value =
        serde_saphyr::from_str(&read("deploy/argocd/application-pipelines.yaml")).expect("YAML");
    assert_eq!(pipelines["kind"], "Application");
    let automated = &pipelines["spec"]["syncPolicy"]["automated"];
    assert_eq!(automated["prune"], true);
    assert_eq!(automated["selfHeal"], true);
}

// ---------------------------------------------------------------------------------------------
// Real statuses, written by the operator against a real API server.

async fn create_pipeline(client: &Client, ns: &str, manifest: &Value) {
    let request = pipelines_request(ns)
        .create(
            &PostParams::default(),
            serde_json::to_vec(manifest).expect("JSON"),
        )
        .expect("request");
    client
        .request::<Value>(request)
        .await
        .unwrap_or_else(|e| panic!("create AIPipeline {}: {e}", manifest["metadata"]["name"]));
}

fn fraud_detector(ns: &str) -> Value {
    let mut p: Value = serde_saphyr::from_str(&read("examples/pipelines/fraud-detector.yaml"))
        .expect("example parses");
    p["metadata"]["namespace"] = json!(ns);
    p
}

#[tokio::test]
async fn the_operators_real_statuses_are_judged_right() {
    let (client, ns, _) = support::guarded_namespace("argocd-health").await;

    // Healthy: the example, without its Vault part (this operator runs without Vault).
    let mut good = fraud_detector(&ns);
    for stage in good["spec"]["stages"].as_array_mut().unwrap() {
        stage.as_object_mut().unwrap().remove("vault");
    }

    // Degraded, InvalidSpec: an egress CIDR with host bits set, which the CRD's schema admits
    // (a pattern cannot see host bits) and the operator's validation refuses.
    let mut invalid = fraud_detector(&ns);
    invalid["metadata"]["name"] = json!("host-bits");
    invalid["spec"]["stages"][0]["network"]["egress"][0]["cidr"] = json!("10.20.0.1/16");
    for (stage, credential) in [(0, "host-bits-ingest-db"), (1, "host-bits-train-artifacts")] {
        invalid["spec"]["stages"][stage]["vault"]["credentials"][0]["secretName"] =
            json!(credential);
    }
    // Degraded, AdoptionRefused: the stage's ServiceAccount already exists and is someone
    // else's.
    let taken = json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "taken", "namespace": ns},
        "spec": {"stages": [{"name": "serve", "role": "Deployment"}]},
    });
    let foreign: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "taken-serve"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &foreign)
        .await
        .expect("someone else's ServiceAccount");

    for manifest in [&good, &invalid, &taken] {
        create_pipeline(&client, &ns, manifest).await;
    }
    // Before any operator has seen them: no status, Progressing.
    let (s, m) = health(&get_raw(&client, &ns, "fraud-detector").await);
    assert_eq!(s, "Progressing", "{m}");

    let mut op = support::Operator::start("operator-argocd", &ns, None);
    let live = wait_ready_raw(&client, &ns, "fraud-detector", "True", &op).await;
    let (s, m) = health(&live);
    assert_eq!(s, "Healthy", "{m}\n{live:#}");

    let live = wait_ready_raw(&client, &ns, "host-bits", "False", &op).await;
    let (s, m) = health(&live);
    assert_eq!(s, "Degraded", "{m}\n{live:#}");
    assert!(m.starts_with("InvalidSpec: the spec is invalid"), "{m}");
    assert!(m.contains("has host bits set"), "{m}");

    let live = wait_ready_raw(&client, &ns, "taken", "False", &op).await;
    let (s, m) = health(&live);
    assert_eq!(s, "Degraded", "{m}\n{live:#}");
    assert!(
        m.starts_with("AdoptionRefused: ")
            && m.contains(&format!("ServiceAccount {ns}/taken-serve")),
        "{m}"
    );

    // A new spec the operator has not reconciled yet (it is stopped): Progressing until it has.
    op.stop();
    let api = pipelines_request(&ns);
    let patch = json!({"spec": {"stages": [{"name": "serve", "role": "Deployment", "automountServiceAccountToken": false}]}});
    let request = api
        .patch("taken", &PatchParams::default(), &Patch::Merge(&patch))
        .expect("request");
    client
        .request::<Value>(request)
        .await
        .expect("spec changed");
    let live = get_raw(&client, &ns, "taken").await;
    assert_eq!(live["metadata"]["generation"], 2);
    let (s, m) = health(&live);
    assert_eq!(s, "Progressing", "{m}");
    assert!(m.contains("generation 2"), "{m}");
}

/// The API server keeps the CRDs as `crds/portcullis.yaml` writes them, CEL rules
/// (`x-kubernetes-validations`) included, so Argo CD sees no difference between the chart and
/// the live CRDs. (Servers before 1.25 dropped the CEL rules; 1.30 is the oldest supported.)
#[tokio::test]
async fn the_api_server_keeps_the_crds_as_written() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let file: Vec<Value> =
        serde_saphyr::from_multiple(&read("crds/portcullis.yaml")).expect("CRDs parse");
    let mut rules = 0;
    for mut crd in file.into_iter().filter(|d| !d.is_null()) {
        let name = crd["metadata"]["name"].as_str().expect("name").to_string();
        let request = Request::new("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
            .get(&name, &GetParams::default())
            .expect("request");
        let live: Value = client.request(request).await.expect("live CRD");
        let mut differences = Vec::new();
        missing_in(&crd["spec"], &live["spec"], "spec", &mut differences);
        assert!(
            differences.is_empty(),
            "CRD {name}: the API server changed {differences:#?}"
        );
        let mut live_spec = live["spec"].clone();
        let kept = strip_key(&mut live_spec, "x-kubernetes-validations");
        let written = strip_key(&mut crd["spec"], "x-kubernetes-validations");
        assert_eq!(
            kept, written,
            "CRD {name}: CEL rules kept by the API server"
        );
        rules += kept;
        // What the API server adds are defaults in objects (not in lists), which Argo CD's
        // diffs do not report.
        let mut added = Vec::new();
        missing_in(&live_spec, &crd["spec"], "spec", &mut added);
        added.sort();
        assert_eq!(
            added,
            ["spec.conversion: absent", "spec.names.listKind: absent"],
            "CRD {name}"
        );
    }
    assert!(rules > 0, "the CRDs carry CEL rules");
}

/// Removes `key` everywhere under `v`; returns how many were removed.
fn strip_key(v: &mut Value, key: &str) -> usize {
    match v {
        Value::Object(fields) => {
            let removed = usize::from(fields.remove(key).is_some());
            removed
                + fields
                    .values_mut()
                    .map(|f| strip_key(f, key))
                    .sum::<usize>()
        }
        Value::Array(items) => items.iter_mut().map(|i| strip_key(i, key)).sum(),
        _ => 0,
    }
}

/// Paths where `want` has something `live` does not have ("absent"), or has differently (numbers
/// compared as numbers: YAML `1.0` and JSON `1` are the same schema value).
fn missing_in(want: &Value, live: &Value, path: &str, out: &mut Vec<String>) {
    match (want, live) {
        (Value::Object(w), Value::Object(l)) => {
            for (k, wv) in w {
                match l.get(k) {
                    Some(lv) => missing_in(wv, lv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: absent")),
                }
            }
        }
        (Value::Array(w), Value::Array(l)) if w.len() == l.len() => {
            for (i, (wv, lv)) in w.iter().zip(l).enumerate() {
                missing_in(wv, lv, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(w), Value::Number(l)) if w.as_f64() == l.as_f64() => {}
        (w, l) if w == l => {}
        (w, l) => out.push(format!("{path}: {w}, not {l}")),
    }
}
