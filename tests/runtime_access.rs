//! Runtime access records against the real API server: its audit webhook sends every request
//! of a stage's ServiceAccount to the operator, which records it, raises anomalies (records,
//! Events, metrics) and writes the stage's usage.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::{
    AuditWebhook, Operator, WAIT, control_plane, create_pipeline, free_port, guarded_namespace,
    root, service_account_token, serving_certificate, wait_for, wait_ready, with_audit_webhook,
};

const KEY: &str = "a-key-for-the-runtime-access-test-0123456789";

fn records_where(op: &Operator, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    op.records().into_iter().filter(|r| f(r)).collect()
}

#[tokio::test]
async fn a_stage_that_probes_for_secrets_is_recorded_and_alerted_and_its_usage_shown() {
    let port = free_port();
    let token = "audit-webhook-token-for-the-test-0123456789".to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = serving_certificate(dir.path());
    with_audit_webhook(AuditWebhook {
        port,
        token: token.clone(),
        policy: root().join("deploy/audit/policy.yaml"),
        ca: cert.clone(),
    });
    let cp = control_plane();
    let (client, ns, _) = guarded_namespace("access").await;

    std::fs::write(dir.path().join("audit.key"), KEY).unwrap();
    let token_file = dir.path().join("webhook.token");
    std::fs::write(&token_file, &token).unwrap();
    let op = Operator::start_with(
        "operator",
        &ns,
        None,
        dir,
        &[
            "--audit-webhook-addr".into(),
            format!("127.0.0.1:{port}"),
            "--audit-webhook-token-file".into(),
            token_file.display().to_string(),
            "--audit-webhook-tls-cert-file".into(),
            cert.display().to_string(),
            "--audit-webhook-tls-key-file".into(),
            key.display().to_string(),
            "--access-window".into(),
            "2s".into(),
        ],
    );
    let pipeline: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {"stages": [{
            "name": "ingest",
            "role": "Ingestion",
            "automountServiceAccountToken": true,
            "permissions": [{
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": ["ingest-config"],
                "verbs": ["get", "watch"],
            }],
        }]},
    }))
    .unwrap();
    create_pipeline(&client, &pipeline).await;
    let live = wait_ready(&client, &ns, "probe", "True", &op).await;
    let sa = live.status.as_ref().unwrap().stages[0]
        .service_account
        .clone()
        .expect("the stage's ServiceAccount");
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    configmaps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "ingest-config"}})).unwrap(),
        )
        .await
        .unwrap();

    // The stage does its work, then probes for Secrets.
    let stage = cp
        .client_with_token(&service_account_token(&client, &ns, &sa).await)
        .await;
    Api::<ConfigMap>::namespaced(stage.clone(), &ns)
        .get("ingest-config")
        .await
        .expect("the stage may read its ConfigMap");
    let refused = Api::<Secret>::namespaced(stage.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect_err("the stage may not list Secrets");
    assert!(refused.to_string().contains("forbidden"), "{refused}");

    refusal_is_recorded_and_alerted(&client, &ns, &user, &op).await;
    allowed_requests_are_counted_and_usage_shown(&client, &ns, &user, &op).await;
    token_used_outside_pods(&client, &stage, &ns, &sa, &op).await;
    runtime_records_are_chained(&op);
    the_webhook_bounds_who_sends_and_how_much(port, &token, &op).await;
}

/// POSTs `body` (a file) to the webhook with curl, with `token` if any; the HTTP status.
fn post(port: u16, token: Option<&str>, body: &std::path::Path) -> String {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("https://127.0.0.1:{port}/audit/kubernetes"));
    if let Some(token) = token {
        curl.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = curl.output().expect("run curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Without the token, nothing is read; a body over the bound and one that is not an EventList
/// are refused; each is counted.
async fn the_webhook_bounds_who_sends_and_how_much(port: u16, token: &str, op: &Operator) {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(
        &empty,
        r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[]}"#,
    )
    .unwrap();
    let huge = dir.path().join("huge.json");
    std::fs::write(&huge, vec![b' '; 9 * 1024 * 1024]).unwrap();
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "not an event list").unwrap();
    assert_eq!(post(port, None, &empty), "401");
    assert_eq!(
        post(
            port,
            Some("a-guessed-token-of-the-same-size-0123456789"),
            &empty
        ),
        "401"
    );
    assert_eq!(post(port, Some(token), &empty), "200");
    assert_eq!(post(port, Some(token), &huge), "413");
    assert_eq!(post(port, Some(token), &garbage), "400");
    let rejected = |reason: &str| {
        format!(
            "portcullis_audit_requests_rejected_total{{source=\"kubernetes\",reason=\"{reason}\"}}"
        )
    };
    assert_eq!(op.metric(&rejected("unauthorized")).await, 2.0);
    assert_eq!(op.metric(&rejected("too_large")).await, 1.0);
    assert_eq!(op.metric(&rejected("malformed")).await, 1.0);
}

/// A pod of the stage at 10.99.0.7 (no kubelet here: its status is written by the test), and
/// the stage's token used from 127.0.0.1.
async fn token_used_outside_pods(
    client: &kube::Client,
    stage: &kube::Client,
    ns: &str,
    sa: &str,
    op: &Operator,
) {
    let ns = ns.to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "ingest-0"},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "main", "image": "registry.invalid/ingest"}]},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    pods.patch_status(
        "ingest-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"podIP": "10.99.0.7", "podIPs": [{"ip": "10.99.0.7"}]}})),
    )
    .await
    .unwrap();
    let outside = wait_for("the TokenUsedOutsidePods anomaly", WAIT, || {
        let stage = stage.clone();
        let ns = ns.clone();

        async move {
            let _ = Api::<ConfigMap>::namespaced(stage, &ns)
                .get("ingest-config")
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            records_where(op, |r| {
                r["action"] == "anomaly" && r["reason"] == "TokenUsedOutsidePods"
            })
            .pop()
        }
    })
    .await;
    let message = outside["message"].as_str().unwrap();
    assert!(
        message.contains("127.0.0.1") && message.contains("10.99.0.7"),
        "{message}"
    );
}

/// The runtime records are in the chain: it verifies, and a changed count is found.
fn runtime_records_are_chained(op: &Operator) {
    let (ok, report) = op.verify();
    assert!(ok, "{report}");
    let text = std::fs::read_to_string(op.audit_log()).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let target = lines
        .iter()
        .position(|r| r["action"] == "access" && r["verdict"] == "Allow")
        .unwrap();
    lines[target]["item"]["count"] = json!(0);
    let tampered: String = lines.iter().map(|r| format!("{r}\n")).collect();
    let bad = portcullis::audit::verify_bytes(tampered.as_bytes(), KEY.as_bytes())
        .expect_err("a changed runtime record is found");
    assert_eq!(
        bad.seq,
        lines[target]["seq"].as_u64(),
        "the changed record is the one named: {bad}"
    );
}

/// The refusal: its own record, at once, an AccessDenied anomaly (record, Event, metric).
async fn refusal_is_recorded_and_alerted(
    client: &kube::Client,
    ns: &str,
    user: &str,
    op: &Operator,
) {
    let ns = ns.to_string();
    let denied = wait_for("the refused request's record", WAIT, || async {
        records_where(op, |r| {
            r["action"] == "access" && r["verdict"] == "Deny" && r["object"] == "list secrets"
        })
        .pop()
    })
    .await;
    assert_eq!(denied["stage"], "ingest");
    assert_eq!(denied["subject"], user);
    assert_eq!(denied["reason"], "Refused");
    assert_eq!(denied["item"]["namespace"], ns.as_str());
    assert_eq!(denied["item"]["sourceIPs"][0], "127.0.0.1");
    let anomaly = wait_for("the AccessDenied anomaly record", WAIT, || async {
        records_where(op, |r| {
            r["action"] == "anomaly" && r["reason"] == "AccessDenied"
        })
        .pop()
    })
    .await;
    let message = anomaly["message"].as_str().unwrap();
    assert!(message.contains("list secrets"), "{message}");
    assert!(
        message.contains("resources: [secrets], verbs: [list]"),
        "the anomaly names the grant that would cover the request: {message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let event = wait_for("the AccessDenied Event on the AIPipeline", WAIT, || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("AccessDenied")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("list secrets"))
                })
        }
    })
    .await;
    assert_eq!(
        event.regarding.as_ref().unwrap().name.as_deref(),
        Some("probe")
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let metric = format!(
        "portcullis_access_anomalies_total{{anomaly=\"AccessDenied\",namespace=\"{ns}\",pipeline=\"probe\",stage=\"ingest\"}}"
    );
    assert_eq!(
        op.metric(&metric).await,
        1.0,
        "{}",
        op.http_get("/metrics").await
    );
}

/// The allowed request: counted at the window's end with the grant that covered it, and the
/// stage's usage in its status.
async fn allowed_requests_are_counted_and_usage_shown(
    client: &kube::Client,
    ns: &str,
    user: &str,
    op: &Operator,
) {
    let ns = ns.to_string();
    let allowed = wait_for("the allowed request's count record", WAIT, || async {
        records_where(op, |r| {
            r["action"] == "access"
                && r["verdict"] == "Allow"
                && r["object"] == "get configmaps/ingest-config"
        })
        .pop()
    })
    .await;
    assert_eq!(allowed["reason"], "Used");
    assert_eq!(allowed["item"]["grant"], "get configmaps/ingest-config");
    assert!(allowed["item"]["count"].as_u64().unwrap() >= 1);
    // Only the stage's identity is recorded: the admin's requests and the controllers' are not.
    assert!(
        records_where(op, |r| r["action"] == "access")
            .iter()
            .all(|r| r["subject"] == user),
        "only the stage's requests are recorded"
    );

    // Usage: the grant it used, and the one it did not.
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let usage = wait_for("the stage's usage in its status", WAIT, || {
        let pipelines = pipelines.clone();
        async move {
            let p = pipelines.get("probe").await.ok()?;
            let usage = p.status?.stages.first()?.usage.clone();
            (!usage.is_empty()).then_some(usage)
        }
    })
    .await;
    let of = |grant: &str| usage.iter().find(|u| u.grant == grant).cloned().unwrap();
    assert!(of("get configmaps/ingest-config").used);
    assert!(of("get configmaps/ingest-config").last_used.is_some());
    assert!(!of("watch configmaps/ingest-config").used);

    // `usage` shows it; `--suggest` drops the unused watch and keeps the used get.
    let usage_cli = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["usage", "probe", "-n", &ns, "--kubeconfig"])
            .arg(control_plane().kubeconfig())
            .args(extra)
            .output()
            .expect("run portcullis usage");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let table = usage_cli(&[]);
    let row = |grant: &str| {
        table
            .lines()
            .find(|l| l.contains(grant))
            .unwrap_or_else(|| panic!("{grant} in\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("get configmaps/ingest-config")[3], "yes", "{table}");
    assert_eq!(row("watch configmaps/ingest-config")[3], "no", "{table}");
    let suggestion = usage_cli(&["--suggest"]);
    let narrowed: AIPipeline =
        serde_saphyr::from_str(&suggestion).expect("the suggestion is an AIPipeline");
    assert_eq!(
        narrowed.spec.stages[0].permissions[0].verbs,
        vec!["get".to_string()],
        "{suggestion}"
    );
    assert!(
        suggestion.contains("removed watch configmaps/ingest-config"),
        "{suggestion}"
    );
}
