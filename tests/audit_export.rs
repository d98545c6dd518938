//! `portcullis audit export --format ecs`: a decision log as Elastic Common Schema documents, one
//! a line, with the ECS fields a SIEM's rules read and the whole record under `portcullis`.

use std::io::Write;
use std::process::{Command, Stdio};

use chrono::{TimeZone, Utc};
use portcullis::audit::{Action, AuditLog, Entry};
use portcullis::policy::{Decision, Item, Reason, Verdict};
use serde_json::{Value, json};

const KEY: &[u8] = b"k7Qm2VxP9sLr4TbN8wYc3JfH6dGa5ZeU";
const SA: &str = "system:serviceaccount:ml-fraud:fraud-detector-ingest";

fn decision(verdict: Verdict, reason: Reason, resource: &str) -> Decision {
    Decision {
        stage: "ingest".into(),
        field: "spec.stages[0].permissions[0]".into(),
        item: Item::Kubernetes {
            api_group: String::new(),
            resource: resource.into(),
            verb: "get".into(),
            resource_names: vec![],
        },
        verdict,
        reason,
        message: format!("about {resource}"),
        guardrail: Some("ml-ingestion".into()),
    }
}

/// A log with a grant, a denial, a refused runtime request and an anomaly.
fn write_log(path: &std::path::Path) -> Vec<Value> {
    let mut refused = Entry::new(
        Action::Access,
        "ml-fraud",
        "fraud-detector",
        "refused: stage ingest asked for list secrets from 10.0.3.7",
    );
    refused.stage = Some("ingest".into());
    refused.subject = Some(SA.into());
    refused.object = Some("list secrets".into());
    refused.verdict = Some("Deny".into());
    refused.reason = Some("Refused".into());
    refused.item = Some(
        json!({"kind": "request", "verb": "list", "resource": "secrets",
        "sourceIPs": ["10.0.3.7"], "userAgent": "kubectl/v1.36.2"}),
    );
    let mut anomaly = Entry::new(
        Action::Anomaly,
        "ml-fraud",
        "fraud-detector",
        "stage ingest was refused list secrets",
    );
    anomaly.stage = Some("ingest".into());
    anomaly.subject = Some(SA.into());
    anomaly.reason = Some("AccessDenied".into());
    let entries = vec![
        Entry::from_decision(
            "ml-fraud",
            "fraud-detector",
            Some(3),
            SA,
            &decision(Verdict::Allow, Reason::WithinGuardrail, "configmaps"),
        ),
        Entry::from_decision(
            "ml-fraud",
            "fraud-detector",
            Some(3),
            SA,
            &decision(Verdict::Deny, Reason::OutsideGuardrail, "pods"),
        ),
        refused,
        anomaly,
    ];
    let mut log = AuditLog::open(path, KEY).unwrap();
    log.append(&entries, Utc.timestamp_opt(1_750_000_000, 0).unwrap())
        .unwrap();
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn export(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["audit", "export"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("portcullis runs");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_log_exports_as_ecs_documents_with_every_record_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.log");
    let records = write_log(&path);
    let (code, out, err) = export(&["--format", "ecs", path.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    let docs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document a line"))
        .collect();
    assert_eq!(docs.len(), records.len());

    let grant = &docs[0];
    assert_eq!(grant["@timestamp"], "2025-06-15T15:06:40.000Z");
    assert_eq!(grant["ecs"]["version"], "8.11.0");
    assert_eq!(grant["event"]["kind"], "event");
    assert_eq!(grant["event"]["category"], json!(["iam"]));
    assert_eq!(grant["event"]["type"], json!(["allowed"]));
    assert_eq!(grant["event"]["action"], "grant");
    assert_eq!(grant["event"]["outcome"], "success");
    assert_eq!(grant["event"]["sequence"], 1);
    assert_eq!(grant["user"]["name"], SA);
    assert_eq!(grant["rule"]["name"], "WithinGuardrail");
    assert_eq!(grant["rule"]["ruleset"], "ml-ingestion");
    assert_eq!(grant["orchestrator"]["namespace"], "ml-fraud");
    assert_eq!(grant["orchestrator"]["resource"]["name"], "fraud-detector");
    assert_eq!(grant["message"], records[0]["message"]);

    let deny = &docs[1];
    assert_eq!(deny["event"]["type"], json!(["denied"]));
    assert_eq!(deny["event"]["outcome"], "failure");
    assert_eq!(deny["event"]["reason"], "OutsideGuardrail");

    let refused = &docs[2];
    assert_eq!(refused["event"]["action"], "access");
    assert_eq!(refused["event"]["type"], json!(["denied"]));
    assert_eq!(refused["source"]["ip"], "10.0.3.7");
    assert_eq!(refused["user_agent"]["original"], "kubectl/v1.36.2");

    let anomaly = &docs[3];
    assert_eq!(anomaly["event"]["kind"], "alert");
    assert_eq!(anomaly["event"]["category"], json!(["intrusion_detection"]));
    assert_eq!(anomaly["rule"]["name"], "AccessDenied");

    // Nothing of a record is lost: its fields, hash chain included, are under `portcullis`.
    for (doc, record) in docs.iter().zip(&records) {
        let kept = doc["portcullis"].as_object().unwrap();
        for (field, value) in record.as_object().unwrap() {
            if field == "time" || field == "message" {
                continue; // @timestamp and message
            }
            assert_eq!(kept.get(field), Some(value), "{field} of {record}");
        }
        assert_eq!(doc["event"]["id"], record["hash"]);
    }

    // The same from standard input.
    let bytes = std::fs::read(&path).unwrap();
    let (code, from_stdin, err) = export(&["-"], Some(&bytes));
    assert_eq!(code, 0, "{err}");
    assert_eq!(from_stdin, out);
}

#[test]
fn a_line_that_is_no_record_is_named_and_fails() {
    let (code, out, err) = export(&["-"], Some(b"{\"seq\": 1}\n"));
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.contains("(standard input):1: not a decision-log record"),
        "{err}"
    );
}
