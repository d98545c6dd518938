//! `portcullis audit ingest`: an exported audit log becomes the records the operator would
//! have written, in a chain `audit verify` accepts.

use std::process::Command;

use serde_json::Value;

const KEY: &str = "a-key-for-the-ingest-test-0123456789abcdef";

const PIPELINE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ml, labels: {portcullis.dev/tier: ml}}
---
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages:
    - name: ingest
      role: Ingestion
      permissions:
        - apiGroups: [""]
          resources: [configmaps]
          resourceNames: [ingest-config]
          verbs: [get, watch]
"#;

fn event(
    user: &str,
    verb: &str,
    resource: &str,
    name: Option<&str>,
    decision: &str,
    at: &str,
) -> String {
    serde_json::json!({
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
        "stage": "ResponseComplete", "verb": verb,
        "user": {"username": user},
        "sourceIPs": ["10.1.2.3"], "userAgent": "probe/1.0",
        "objectRef": {"resource": resource, "namespace": "ml", "name": name, "apiVersion": "v1"},
        "stageTimestamp": at,
        "annotations": {"authorization.k8s.io/decision": decision},
    })
    .to_string()
}

#[test]
fn an_exported_audit_log_becomes_verified_runtime_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("pipeline.yaml"), PIPELINE).unwrap();
    std::fs::write(path("key"), KEY).unwrap();
    // The stage's ServiceAccount: `<pipeline>-<stage>`.
    let sa = "fraud-ingest";
    let user = format!("system:serviceaccount:ml:{sa}");
    let lines = [
        event(
            &user,
            "get",
            "configmaps",
            Some("ingest-config"),
            "allow",
            "2026-11-27T08:00:01Z",
        ),
        event(
            &user,
            "get",
            "configmaps",
            Some("ingest-config"),
            "allow",
            "2026-11-27T08:00:05Z",
        ),
        event(
            &user,
            "list",
            "secrets",
            None,
            "forbid",
            "2026-11-27T08:00:07Z",
        ),
        event(
            "alice",
            "list",
            "secrets",
            None,
            "allow",
            "2026-11-27T08:00:08Z",
        ),
        "not an audit event".to_string(),
    ];
    std::fs::write(path("audit.jsonl"), lines.join("\n")).unwrap();
    let vault = serde_json::json!({
        "time": "2026-11-27T08:00:09Z", "type": "response",
        "auth": {"client_token": "hmac-sha256:0123", "metadata": {"service_account_name": sa, "service_account_namespace": "ml"}},
        "request": {"operation": "read", "path": "kv/data/ml/other", "remote_address": "10.1.2.3", "client_token": "hmac-sha256:0123"},
        "error": "1 error occurred:\n\t* permission denied\n\n",
    });
    std::fs::write(path("vault.jsonl"), format!("{vault}\n")).unwrap();

    let bin = env!("CARGO_BIN_EXE_portcullis");
    let output = Command::new(bin)
        .args(["audit", "ingest", "-f"])
        .arg(path("pipeline.yaml"))
        .arg("--guardrails")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guardrails"))
        .arg("--kubernetes")
        .arg(path("audit.jsonl"))
        .arg("--vault")
        .arg(path("vault.jsonl"))
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
    assert!(stdout.contains("4 requests of managed stages"), "{stdout}");
    assert!(
        stdout.contains("skipped 1 lines that are not audit events (lines 5)"),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 2 grants used"), "{stdout}");

    let records: Vec<Value> = std::fs::read_to_string(path("decisions.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |f: &dyn Fn(&Value) -> bool| records.iter().find(|r| f(r)).cloned();
    let counted =
        find(&|r| r["action"] == "access" && r["object"] == "get configmaps/ingest-config")
            .unwrap();
    assert_eq!(counted["item"]["count"], 2);
    assert_eq!(counted["item"]["firstTime"], "2026-11-27T08:00:01.000Z");
    assert!(
        find(&|r| r["action"] == "access"
            && r["verdict"] == "Deny"
            && r["object"] == "list secrets")
        .is_some()
    );
    assert!(find(&|r| r["action"] == "anomaly" && r["reason"] == "AccessDenied").is_some());
    let vault_denied =
        find(&|r| r["action"] == "access" && r["object"] == "vault read kv/data/ml/other").unwrap();
    assert_eq!(vault_denied["verdict"], "Deny");
    assert!(
        records.iter().all(|r| r["subject"] == user.as_str()),
        "only the stage is recorded"
    );
    let log = std::fs::read_to_string(path("decisions.log")).unwrap();
    assert!(
        !log.contains("hmac-sha256"),
        "nothing HMAC'd is copied into the log"
    );

    let verify = Command::new(bin)
        .args(["audit", "verify"])
        .arg(path("decisions.log"))
        .arg("--key")
        .arg(path("key"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
