//! NewBehaviour and VolumeSpike end to end, and what survives a restart of the operator, against
//! the real API server's audit webhook (as `tests/runtime_access.rs`), with the thresholds'
//! flags making the windows short: a stage learns its permissions, the operator restarts, the
//! stage uses a permission it used before (nothing) and one it never used (NewBehaviour: record,
//! Event, metric), then floods the API server (VolumeSpike). A stage removed from the pipeline
//! takes its usage entry with it.

mod support;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use portcullis::api::{AIPipeline, StageStatus};
use serde_json::{Value, json};
use support::{
    AuditWebhook, Operator, WAIT, control_plane, create_pipeline, free_port, guarded_namespace,
    root, service_account_token, serving_certificate, wait_for, wait_ready, with_audit_webhook,
};

const PIPELINE: &str = "learner";
const LEARNING_SECONDS: i64 = 8;

/// Records of `op`'s log from line `from` on that `f` accepts.
fn records_from(op: &Operator, from: usize, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    op.records()
        .into_iter()
        .skip(from)
        .filter(|r| f(r))
        .collect()
}

fn is_anomaly(r: &Value, kind: &str) -> bool {
    r["action"] == "anomaly" && r["reason"] == kind
}

async fn stage_statuses(client: &kube::Client, ns: &str) -> Vec<StageStatus> {
    Api::<AIPipeline>::namespaced(client.clone(), ns)
        .get(PIPELINE)
        .await
        .ok()
        .and_then(|p| p.status)
        .map(|s| s.stages)
        .unwrap_or_default()
}

async fn event_with(client: &kube::Client, ns: &str, reason: &str, text: &str) -> Event {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("the {reason} Event on the AIPipeline"),
        WAIT,
        || {
            let events = events.clone();
            async move {
                events
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some(reason)
                            && e.note.as_deref().is_some_and(|n| n.contains(text))
                    })
            }
        },
    )
    .await
}

/// The test's pipeline, stages and operator.
struct Scene {
    client: kube::Client,
    ns: String,
    args: Vec<String>,
    pipeline: AIPipeline,
    as_ingest: kube::Client,
    as_train: kube::Client,
    _certs: tempfile::TempDir,
}

fn used(stages: &[StageStatus], stage: &str, grant: &str) -> bool {
    stages
        .iter()
        .find(|s| s.name == stage)
        .and_then(|s| s.usage.iter().find(|u| u.grant == grant))
        .is_some_and(|u| u.used)
}

fn anomaly_metric(ns: &str, kind: &str) -> String {
    format!(
        "portcullis_access_anomalies_total{{anomaly=\"{kind}\",namespace=\"{ns}\",pipeline=\"{PIPELINE}\",stage=\"ingest\"}}"
    )
}

#[tokio::test]
async fn a_stage_learns_survives_a_restart_then_shows_new_behaviour_and_a_volume_spike() {
    let (scene, op) = set_up().await;
    let since = learn(&scene, &op).await;
    remove_a_stage(&scene).await;

    // Past the learning window, the operator restarts.
    wait_for("the end of the learning window", WAIT, || async {
        (chrono::Utc::now() > since + chrono::Duration::seconds(LEARNING_SECONDS + 1)).then_some(())
    })
    .await;
    let mut op = op;
    op.stop();
    let Operator { dir, .. } = op;
    let restart_at = std::fs::read_to_string(dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .count();
    let op = Operator::start_with("operator", &scene.ns, None, dir, &scene.args);

    new_behaviour_after_the_restart(&scene, &op, restart_at).await;
    volume_spike(&scene, &op, restart_at).await;
    let Scene { client, ns, .. } = &scene;
    // The usage written since did not bring the removed stage back; the log verifies.
    let stages = wait_for("the flood's usage", WAIT, || async {
        let stages = stage_statuses(client, ns).await;
        let ingest = stages.iter().find(|s| s.name == "ingest")?;
        ingest
            .usage
            .iter()
            .any(|u| u.grant == "get configmaps/cm-a" && u.count > 300)
            .then_some(stages)
    })
    .await;
    assert!(stages.iter().all(|s| s.name != "train"), "{stages:?}");
    let (ok, report) = op.verify();
    assert!(ok, "{report}");
}

/// The operator with short windows, and the pipeline: ingest (two grants) and train (one).
async fn set_up() -> (Scene, Operator) {
    let port = free_port();
    let token = "audit-webhook-token-for-the-anomaly-test-0123".to_string();
    let certs = tempfile::tempdir().expect("temp dir");
    let (cert, key) = serving_certificate(certs.path());
    with_audit_webhook(AuditWebhook {
        port,
        token: token.clone(),
        policy: root().join("deploy/audit/policy.yaml"),
        ca: cert.clone(),
    });
    let cp = control_plane();
    let (client, ns, _) = guarded_namespace("anomalies").await;
    let token_file = certs.path().join("webhook.token");
    std::fs::write(&token_file, &token).unwrap();
    let args: Vec<String> = [
        "--audit-webhook-addr",
        &format!("127.0.0.1:{port}"),
        "--audit-webhook-token-file",
        &token_file.display().to_string(),
        "--audit-webhook-tls-cert-file",
        &cert.display().to_string(),
        "--audit-webhook-tls-key-file",
        &key.display().to_string(),
        "--access-window",
        "2s",
        "--access-learning-window",
        &format!("{LEARNING_SECONDS}s"),
        "--access-baseline-windows",
        "2",
        "--access-spike-min-requests",
        "40",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let op = Operator::start_with("operator", &ns, None, tempfile::tempdir().unwrap(), &args);

    let stage = |name: &str, permissions: Value| json!({"name": name, "role": "Ingestion", "automountServiceAccountToken": true, "permissions": permissions});
    let ingest = stage(
        "ingest",
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cm-a"], "verbs": ["get"]},
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list"]},
        ]),
    );
    let train = stage(
        "train",
        json!([{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cm-t"], "verbs": ["get"]}]),
    );
    let pipeline: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": PIPELINE, "namespace": ns},
        "spec": {"stages": [ingest, train]},
    }))
    .unwrap();
    create_pipeline(&client, &pipeline).await;
    let live = wait_ready(&client, &ns, PIPELINE, "True", &op).await;
    let account = |stage: &str| {
        live.status
            .as_ref()
            .unwrap()
            .stages
            .iter()
            .find(|s| s.name == stage)
            .unwrap()
            .service_account
            .clone()
            .expect("the stage's ServiceAccount")
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for name in ["cm-a", "cm-t"] {
        configmaps
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let as_ingest = cp
        .client_with_token(&service_account_token(&client, &ns, &account("ingest")).await)
        .await;
    let as_train = cp
        .client_with_token(&service_account_token(&client, &ns, &account("train")).await)
        .await;

    (
        Scene {
            client,
            ns,
            args,
            pipeline,
            as_ingest,
            as_train,
            _certs: certs,
        },
        op,
    )
}

/// Each stage uses one grant; both stages' usage shows, side by side. The learning window's
/// start.
async fn learn(scene: &Scene, op: &Operator) -> chrono::DateTime<chrono::FixedOffset> {
    let Scene {
        client,
        ns,
        as_ingest,
        as_train,
        ..
    } = scene;
    Api::<ConfigMap>::namespaced(as_ingest.clone(), ns)
        .get("cm-a")
        .await
        .expect("ingest may read cm-a");
    Api::<ConfigMap>::namespaced(as_train.clone(), ns)
        .get("cm-t")
        .await
        .expect("train may read cm-t");
    let stages = wait_for("both stages' usage in the status", WAIT, || async {
        let stages = stage_statuses(client, ns).await;
        (used(&stages, "ingest", "get configmaps/cm-a")
            && used(&stages, "train", "get configmaps/cm-t"))
        .then_some(stages)
    })
    .await;
    let ingest_status = stages.iter().find(|s| s.name == "ingest").unwrap();
    assert!(
        !used(&stages, "ingest", "list jobs.batch"),
        "{:?}",
        ingest_status.usage
    );
    let since = chrono::DateTime::parse_from_rfc3339(
        ingest_status
            .usage_since
            .as_deref()
            .expect("usageSince: the learning window's start"),
    )
    .unwrap();
    assert!(
        records_from(op, 0, |r| is_anomaly(r, "NewBehaviour")).is_empty(),
        "nothing is new while learning"
    );

    since
}

/// A removed stage takes its usage entry with it.
async fn remove_a_stage(scene: &Scene) {
    let Scene {
        client,
        ns,
        pipeline,
        ..
    } = scene;
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), ns);
    pipelines
        .patch(
            PIPELINE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stages": [pipeline.spec.stages[0]]}})),
        )
        .await
        .unwrap();
    wait_for("the removed stage's status entry to go", WAIT, || async {
        let stages = stage_statuses(client, ns).await;
        (!stages.is_empty() && stages.iter().all(|s| s.name != "train")).then_some(())
    })
    .await;
    assert!(used(
        &stage_statuses(client, ns).await,
        "ingest",
        "get configmaps/cm-a"
    ));
}

/// The grant ingest used before the restart is not new; the one it never used is.
async fn new_behaviour_after_the_restart(scene: &Scene, op: &Operator, restart_at: usize) {
    let Scene {
        client,
        ns,
        as_ingest,
        ..
    } = scene;
    let a_again = wait_for(
        "ingest's cm-a read counted by the restarted operator",
        WAIT,
        || {
            let as_ingest = as_ingest.clone();
            let ns = ns.clone();
            async move {
                let _ = Api::<ConfigMap>::namespaced(as_ingest, &ns)
                    .get("cm-a")
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                records_from(op, restart_at, |r| {
                    r["action"] == "access" && r["object"] == "get configmaps/cm-a"
                })
                .pop()
            }
        },
    )
    .await;
    assert_eq!(a_again["verdict"], "Allow");
    let new = wait_for("the NewBehaviour anomaly record", WAIT, || {
        let as_ingest = as_ingest.clone();
        let ns = ns.clone();
        async move {
            let _ = Api::<Job>::namespaced(as_ingest, &ns)
                .list(&ListParams::default())
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            records_from(op, restart_at, |r| is_anomaly(r, "NewBehaviour")).pop()
        }
    })
    .await;
    let message = new["message"].as_str().unwrap();
    assert!(
        message.contains("list jobs.batch") && message.contains("granted by `list jobs.batch`"),
        "{message}"
    );
    assert_eq!(new["stage"], "ingest");
    assert_eq!(
        records_from(op, 0, |r| is_anomaly(r, "NewBehaviour")).len(),
        1,
        "only the never used grant is new, once: the restart did not restart the learning"
    );
    let event = event_with(client, ns, "NewBehaviour", "list jobs.batch").await;
    assert_eq!(
        event.regarding.as_ref().unwrap().name.as_deref(),
        Some(PIPELINE)
    );
    assert_eq!(op.metric(&anomaly_metric(ns, "NewBehaviour")).await, 1.0);
}

/// A flood: far above the stage's baseline.
async fn volume_spike(scene: &Scene, op: &Operator, restart_at: usize) {
    let Scene {
        client,
        ns,
        as_ingest,
        ..
    } = scene;
    let reads = Api::<ConfigMap>::namespaced(as_ingest.clone(), ns);
    let ok = futures::stream::iter(0..300)
        .map(|_| {
            let reads = reads.clone();
            async move { reads.get("cm-a").await.is_ok() }
        })
        .buffer_unordered(30)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, 300);
    let spike = wait_for("the VolumeSpike anomaly record", WAIT, || async {
        records_from(op, restart_at, |r| is_anomaly(r, "VolumeSpike")).pop()
    })
    .await;
    assert_eq!(spike["stage"], "ingest");
    assert!(spike["item"]["count"].as_u64().unwrap() >= 40, "{spike}");
    let event = event_with(client, ns, "VolumeSpike", "times its baseline").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(op.metric(&anomaly_metric(ns, "VolumeSpike")).await >= 1.0);
}
