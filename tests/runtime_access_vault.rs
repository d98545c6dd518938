//! Runtime access records from real OpenBao: its `socket` audit device (declared in its
//! configuration file, as OpenBao 2.x requires) sends every entry to the operator's
//! `--vault-audit-addr`. A stage logs in with Kubernetes auth and reads a path it was granted
//! and one it was not: the records, the anomaly (record, Event, metric) and the stage's usage
//! follow, nothing secret is copied into the decision log, and the log verifies.

mod support;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::openbao::{OpenBao, OperatorSetup};
use support::{
    Operator, WAIT, control_plane, create_pipeline, free_port, guarded_namespace,
    service_account_token, temp_namespace, wait_for, wait_ready,
};

const PIPELINE: &str = "vault-reader";

fn records_where(op: &Operator, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    op.records().into_iter().filter(|r| f(r)).collect()
}

#[tokio::test]
async fn a_stage_reading_vault_is_recorded_through_the_socket_audit_device() {
    let _ = control_plane();
    let (client, ns, guardrails) = guarded_namespace("vault-access").await;
    let ops = temp_namespace(&client, "vault-access-ops", &[]).await;
    let (_jwt_dir, jwt_path) = support::openbao::operator_identity(&client, &ops).await;

    let audit = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let bao = OpenBao::start_with_audit_socket(audit).await;
    assert!(
        bao.audit_test_line().contains("sys/audit/test"),
        "OpenBao tests its socket device on start: {}",
        bao.audit_test_line()
    );
    bao.set_up_for_operator(
        &client,
        &OperatorSetup {
            namespace: &ops,
            service_account: "portcullis",
            audience: None,
            period: "1h",
            database_roles: &[],
            database_ttl: "1h",
            database_max_ttl: "2h",
        },
    )
    .await;
    let args: Vec<String> = [
        "--vault-address",
        &bao.address(),
        "--vault-auth-token-path",
        &jwt_path.display().to_string(),
        "--vault-state-namespace",
        &ops,
        "--vault-audit-addr",
        &audit.to_string(),
        "--access-window",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let op = Operator::start_with("operator", &ns, None, tempfile::tempdir().unwrap(), &args);
    let granted = format!("kv/data/{ns}/{PIPELINE}/ingest/*");
    let pipeline: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": PIPELINE, "namespace": ns},
        "spec": {"stages": [{
            "name": "ingest",
            "role": "Ingestion",
            "vault": {"policies": [{"path": granted, "capabilities": ["read"]}]},
        }]},
    }))
    .unwrap();
    create_pipeline(&client, &pipeline).await;
    let live = wait_ready(&client, &ns, PIPELINE, "True", &op).await;
    let sa = live.status.as_ref().unwrap().stages[0]
        .service_account
        .clone()
        .expect("the stage's ServiceAccount");
    let role = portcullis::plan::names::vault_object(
        portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX,
        &ns,
        PIPELINE,
        "ingest",
    );
    wait_for("the stage's Vault role", WAIT, || async {
        bao.kubernetes_roles().await.contains(&role).then_some(())
    })
    .await;

    // Something to read where the stage may, and where it may not.
    let secret_value = "a-database-password-that-must-never-reach-the-log";
    let allowed = format!("kv/data/{ns}/{PIPELINE}/ingest/config");
    let denied = format!("kv/data/{ns}/{PIPELINE}/train/config");
    for path in [&allowed, &denied] {
        let r = bao
            .client()
            .post(path, &json!({"data": {"password": secret_value}}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {:?}", r.errors());
    }

    // The stage logs in as its pods would, reads its path, then tries another stage's.
    let jwt = service_account_token(&client, &ns, &sa).await;
    let login = bao.login(&role, &jwt).await;
    assert_eq!(login.status, 200, "{:?}", login.errors());
    let token = login.auth()["client_token"].as_str().unwrap().to_string();
    let accessor = login.auth()["accessor"].as_str().unwrap().to_string();
    let stage = bao.anonymous_client().with_token(&token);
    let r = stage.get(&allowed).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.errors());
    assert_eq!(r.data()["data"]["password"], secret_value);
    let r = stage.get(&denied).await.unwrap();
    assert_eq!(r.status, 403, "the stage may not read another stage's path");

    let user = format!("system:serviceaccount:{ns}:{sa}");
    // The refusal: its own record at once, an AccessDenied anomaly (record, Event, metric).
    let refused = wait_for("the refused Vault read's record", WAIT, || async {
        records_where(&op, |r| {
            r["action"] == "access"
                && r["verdict"] == "Deny"
                && r["object"] == format!("vault read {denied}")
        })
        .pop()
    })
    .await;
    assert_eq!(refused["stage"], "ingest");
    assert_eq!(refused["subject"], user.as_str());
    assert_eq!(refused["reason"], "Refused");
    assert_eq!(refused["item"]["source"], "vault");
    assert_eq!(refused["item"]["sourceIPs"][0], "127.0.0.1");
    let anomaly = wait_for("the AccessDenied anomaly record", WAIT, || async {
        records_where(&op, |r| {
            r["action"] == "anomaly" && r["reason"] == "AccessDenied"
        })
        .pop()
    })
    .await;
    let message = anomaly["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("vault read {denied}"))
            && message.contains(&format!("the closest grant is `vault read {granted}`")),
        "the anomaly names the request and the closest grant: {message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let event = wait_for("the AccessDenied Event on the AIPipeline", WAIT, || {
        let events = events.clone();
        let denied = denied.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("AccessDenied")
                        && e.note.as_deref().is_some_and(|n| n.contains(&denied))
                })
        }
    })
    .await;
    assert_eq!(
        event.regarding.as_ref().unwrap().name.as_deref(),
        Some(PIPELINE)
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let metric = format!(
        "portcullis_access_anomalies_total{{anomaly=\"AccessDenied\",namespace=\"{ns}\",pipeline=\"{PIPELINE}\",stage=\"ingest\"}}"
    );
    assert_eq!(op.metric(&metric).await, 1.0);
    assert!(
        op.metric("portcullis_access_requests_total{source=\"vault\",verdict=\"Deny\"}")
            .await
            >= 1.0
    );

    // The allowed read: counted at the window's end with the grant that covered it.
    let used = wait_for("the allowed Vault read's count record", WAIT, || async {
        records_where(&op, |r| {
            r["action"] == "access"
                && r["verdict"] == "Allow"
                && r["object"] == format!("vault read {allowed}")
        })
        .pop()
    })
    .await;
    assert_eq!(used["reason"], "Used");
    assert_eq!(used["item"]["grant"], format!("vault read {granted}"));
    assert_eq!(used["item"]["count"], 1);
    assert!(
        records_where(&op, |r| r["action"] == "access")
            .iter()
            .all(|r| r["subject"] == user.as_str()),
        "only the stage's requests are recorded: not the operator's, nor root's"
    );

    // Its usage in the status.
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let status = wait_for("the stage's usage in its status", WAIT, || {
        let pipelines = pipelines.clone();
        async move {
            let stage = pipelines
                .get(PIPELINE)
                .await
                .ok()?
                .status?
                .stages
                .first()?
                .clone();
            stage.usage.iter().any(|u| u.used).then_some(stage)
        }
    })
    .await;
    let usage = status
        .usage
        .iter()
        .find(|u| u.grant == format!("vault read {granted}"))
        .expect("the granted path's usage");
    assert!(
        usage.used && usage.count == 1 && usage.last_used.is_some(),
        "{usage:?}"
    );
    assert!(status.usage_since.is_some());

    // Nothing secret reached the log: not the secret, the tokens, the accessor, nor any of
    // Vault's HMACs.
    let log = std::fs::read_to_string(op.audit_log()).unwrap();
    for (what, secret) in [
        ("the secret's value", secret_value),
        ("the stage's Vault token", token.as_str()),
        ("the token's accessor", accessor.as_str()),
        ("the ServiceAccount JWT", jwt.as_str()),
        ("the root token", bao.root_token()),
        ("an HMAC'd field", "hmac-sha256"),
    ] {
        assert!(!log.contains(secret), "{what} is in the decision log");
    }
    // OpenBao's own file device has the same requests (HMAC'd): the socket's are not extra.
    let file = std::fs::read_to_string(bao.file_audit_log()).unwrap();
    assert!(file.contains(&denied) && file.contains("hmac-sha256"));

    let (ok, report) = op.verify();
    assert!(ok, "{report}");

    let live = pipelines.get(PIPELINE).await.unwrap();
    ingest_reads_the_file_device(&bao, &live, &guardrails, &allowed, &denied);
}

/// `portcullis audit ingest --vault` on OpenBao's own `file` device output: the same refusal
/// and the same allowed read as the operator recorded from the socket.
fn ingest_reads_the_file_device(
    bao: &OpenBao,
    pipeline: &AIPipeline,
    guardrails: &[portcullis::api::AccessGuardrail],
    allowed: &str,
    denied: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    // JSON is YAML: the files are read as `kubectl apply -f` would.
    std::fs::write(
        path("pipeline.yaml"),
        serde_json::to_string(pipeline).unwrap(),
    )
    .unwrap();
    std::fs::create_dir(path("guardrails")).unwrap();
    for (i, g) in guardrails.iter().enumerate() {
        std::fs::write(
            path(&format!("guardrails/{i}.yaml")),
            serde_json::to_string(g).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(path("key"), "a-key-for-the-ingest-of-openbao-0123456789").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["audit", "ingest", "-f"])
        .arg(path("pipeline.yaml"))
        .arg("--guardrails")
        .arg(path("guardrails"))
        .arg("--vault")
        .arg(bao.file_audit_log())
        .arg("--audit-log")
        .arg(path("decisions.log"))
        .arg("--audit-key")
        .arg(path("key"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("anomaly AccessDenied: 1"), "{stdout}");
    let records: Vec<Value> = std::fs::read_to_string(path("decisions.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |verdict: &str, path: &str| {
        records.iter().any(|r| {
            r["action"] == "access"
                && r["verdict"] == verdict
                && r["object"] == format!("vault read {path}")
                && r["stage"] == "ingest"
        })
    };
    assert!(
        find("Deny", denied) && find("Allow", allowed),
        "{records:?}"
    );
    assert!(
        !std::fs::read_to_string(path("decisions.log"))
            .unwrap()
            .contains("hmac-sha256"),
        "nothing HMAC'd is copied"
    );
}
