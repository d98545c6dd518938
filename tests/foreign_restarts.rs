//! Restart targets decided like any other item, with real Vault credentials (OpenBao and
//! PostgreSQL, as tests/vault.rs runs them): when a credential is rotated, the operator restarts
//! only the pipeline's own workloads. Another pipeline's Deployment named as a restart target
//! is refused (`ForeignWorkload`, in the status) and never patched, and a workload that stopped
//! running as the pipeline's stage after it was planned is not patched either.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use portcullis::api::AIPipeline;
use serde_json::json;
use support::openbao::{OpenBao, OperatorSetup};
use support::{Operator, guarded_namespace, restart_target, temp_namespace, wait_for};

const WAIT: Duration = Duration::from_secs(90);

fn restarted_at(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("portcullis.dev/restarted-at")
        .cloned()
}

#[tokio::test]
async fn a_rotation_restarts_only_the_pipelines_own_workloads() {
    let (client, ns, _) = guarded_namespace("foreign-restarts-vault").await;
    let ops = temp_namespace(&client, "foreign-restarts-ops", &[]).await;
    let (_jwt_dir, jwt_path) = support::openbao::operator_identity(&client, &ops).await;
    let bao = OpenBao::start().await;
    let role = format!("{ns}_fraud_writer");
    bao.set_up_for_operator(
        &client,
        &OperatorSetup {
            namespace: &ops,
            service_account: "portcullis",
            audience: None,
            period: "1h",
            database_roles: &[&role],
            // Leases of 6 s replaced as their 20 s max TTL nears: a rotation within the test.
            database_ttl: "6s",
            database_max_ttl: "20s",
        },
    )
    .await;
    // The pipeline's own consumer, one that will stop being its own, and another pipeline's.
    restart_target(&client, &ns, "fraud-ingest", "fraud-ingest").await;
    restart_target(&client, &ns, "fraud-hijacked", "fraud-ingest").await;
    restart_target(&client, &ns, "other-serving", "other-train").await;
    let args: Vec<String> = [
        "--vault-address",
        &bao.address(),
        "--vault-auth-token-path",
        &jwt_path.display().to_string(),
        "--vault-state-namespace",
        &ops,
        "--credential-revoke-grace",
        "1s",
        "--restart-min-interval",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let op = Operator::start_with("portcullis", &ns, None, tempfile::tempdir().unwrap(), &args);
    let pipeline: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "fraud", "namespace": ns},
        "spec": {"stages": [{
            "name": "ingest",
            "role": "Ingestion",
            "vault": {"credentials": [{
                "name": "feature-db",
                "path": format!("database/creds/{role}"),
                "ttl": "6s",
                "secretName": "fraud-ingest-db",
                "restartTargets": [
                    {"kind": "Deployment", "name": "fraud-ingest"},
                    {"kind": "Deployment", "name": "fraud-hijacked"},
                    {"kind": "Deployment", "name": "other-serving"},
                ],
            }]},
        }]},
    }))
    .expect("a pipeline");
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    pipelines
        .create(&PostParams::default(), &pipeline)
        .await
        .expect("pipeline created");

    let denied = wait_for("the foreign restart target denied", WAIT, || async {
        let p = pipelines.get("fraud").await.ok()?;
        p.status?
            .stages
            .iter()
            .flat_map(|s| s.denied_items.clone())
            .find(|d| d.item == "restart Deployment other-serving for credential feature-db")
    })
    .await;
    assert_eq!(denied.reason, "ForeignWorkload", "{}", denied.message);
    assert!(denied.message.contains("other-train"), "{}", denied.message);

    // After it was planned, fraud-hijacked is changed to run as another pipeline's stage.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .patch(
            "fraud-hijacked",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"spec": {"serviceAccountName": "other-train"}}}}),
            ),
        )
        .await
        .expect("patch fraud-hijacked");

    let patched = chrono::Utc::now();
    let after_patch = |d: &Deployment| {
        restarted_at(d)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .is_some_and(|t| t > patched)
    };

    // The credential is rotated and its own consumer restarted after the change: the operator
    // had its chance to restart the others too.
    let get = |name: &'static str| {
        let deployments = deployments.clone();
        async move { deployments.get(name).await.expect("a Deployment") }
    };
    wait_for(
        "the pipeline's own consumer restarted after the change",
        WAIT,
        || async { after_patch(&get("fraud-ingest").await).then_some(()) },
    )
    .await;
    assert_eq!(
        restarted_at(&get("other-serving").await),
        None,
        "another pipeline's Deployment was restarted; operator log:\n{}",
        op.log()
    );
    // Restarted at most while it still ran as the stage, never since.
    assert!(
        !after_patch(&get("fraud-hijacked").await),
        "a Deployment that no longer runs as the stage was restarted; operator log:\n{}",
        op.log()
    );
}
