//! The foreign-grant watchdog against the real API server: `view`, `edit` and a custom
//! ClusterRole bound to a stage's ServiceAccount and to its groups show up as the condition
//! `ExclusiveAccess=False`, Warning Events, `foreign-grant` records and the metric, and clear
//! when the bindings are removed.

mod support;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::{Operator, WAIT, condition, create_pipeline, example, guarded_namespace, wait_for};

fn binding(kind: &str, ns: Option<&str>, name: &str, role: &str, subject: Value) -> Value {
    let mut metadata = json!({"name": name});
    if let Some(ns) = ns {
        metadata["namespace"] = json!(ns);
    }
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": metadata,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [subject],
    })
}

/// The `foreign-grant` records: one per binding and stage, with the rules they add.
fn check_records(op: &Operator, ns: &str, everyone_name: &str, expected: usize) {
    let records = op.records();
    let foreign: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "foreign-grant")
        .collect();
    assert_eq!(foreign.len(), expected, "{foreign:?}");
    let custom_record = foreign
        .iter()
        .find(|r| {
            r["object"] == format!("ClusterRoleBinding {everyone_name}") && r["stage"] == "train"
        })
        .expect("a record of the custom role's binding for the train stage");
    assert_eq!(
        custom_record["item"]["rules"],
        json!(["get,list on secrets"])
    );
    assert_eq!(
        custom_record["subject"],
        format!("system:serviceaccount:{ns}:fraud-detector-train")
    );
    let view_record = foreign
        .iter()
        .find(|r| r["object"] == format!("RoleBinding {ns}/view-ingest"))
        .expect("a record of the view binding");
    assert!(
        view_record["message"].as_str().unwrap().contains("on pods"),
        "{view_record}"
    );
}

/// The three bindings' names and the custom ClusterRole's.
struct Bindings {
    custom: String,
    edit_name: String,
    everyone_name: String,
}

/// `view` bound to the ingest stage's ServiceAccount in `ns`, `edit` to the namespace's
/// ServiceAccounts group, and a custom ClusterRole to `system:authenticated`.
async fn bind(client: &kube::Client, ns: &str) -> Bindings {
    let custom = format!("custom-{ns}");
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": custom},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}],
    }))
    .unwrap();
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    cluster_roles
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());
    let view: RoleBinding = serde_json::from_value(binding(
        "RoleBinding",
        Some(ns),
        "view-ingest",
        "view",
        json!({"kind": "ServiceAccount", "name": "fraud-detector-ingest", "namespace": ns}),
    ))
    .unwrap();
    let edit_name = format!("edit-{ns}");
    let edit: ClusterRoleBinding = serde_json::from_value(binding(
        "ClusterRoleBinding",
        None,
        &edit_name,
        "edit",
        json!({"kind": "Group", "name": format!("system:serviceaccounts:{ns}"), "apiGroup": "rbac.authorization.k8s.io"}),
    ))
    .unwrap();
    let everyone_name = format!("everyone-{ns}");
    let everyone: ClusterRoleBinding = serde_json::from_value(binding(
        "ClusterRoleBinding",
        None,
        &everyone_name,
        &custom,
        json!({"kind": "Group", "name": "system:authenticated", "apiGroup": "rbac.authorization.k8s.io"}),
    ))
    .unwrap();
    rbs.create(&PostParams::default(), &view).await.unwrap();
    crbs.create(&PostParams::default(), &edit).await.unwrap();
    crbs.create(&PostParams::default(), &everyone)
        .await
        .unwrap();

    Bindings {
        custom,
        edit_name,
        everyone_name,
    }
}

#[tokio::test]
async fn bindings_reaching_a_stage_are_reported_and_cleared_on_removal() {
    let (client, ns, _) = guarded_namespace("foreign").await;
    let op = Operator::start_with(
        "operator",
        &ns,
        None,
        tempfile::tempdir().unwrap(),
        &["--foreign-grant-watch".to_string()],
    );
    let mut pipeline = example("examples/pipelines/fraud-detector.yaml", &ns);
    for stage in &mut pipeline.spec.stages {
        stage.vault = None;
    }
    create_pipeline(&client, &pipeline).await;
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    wait_for("the pipeline to be reconciled", WAIT, || {
        let pipelines = pipelines.clone();
        async move { condition(&pipelines.get("fraud-detector").await.ok()?, "Ready").map(|_| ()) }
    })
    .await;

    let Bindings {
        custom,
        edit_name,
        everyone_name,
    } = bind(&client, &ns).await;
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
    let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());

    // One per binding and stage it reaches: view reaches ingest; the other two every stage.
    let expected = 1 + 3 + 3;
    let message = wait_for("ExclusiveAccess=False naming the bindings", WAIT, || {
        let pipelines = pipelines.clone();
        async move {
            let p = pipelines.get("fraud-detector").await.ok()?;
            let c = condition(&p, "ExclusiveAccess")?;
            (c.status == "False" && c.message.matches(" via ").count() == expected)
                .then(|| c.message.clone())
        }
    })
    .await;
    for name in [
        format!("RoleBinding {ns}/view-ingest"),
        format!("ClusterRoleBinding {edit_name}"),
        format!("ClusterRoleBinding {everyone_name}"),
    ] {
        assert!(message.contains(&name), "{name} in {message}");
    }
    assert_eq!(
        op.metric("portcullis_foreign_grants").await,
        expected as f64
    );
    check_records(&op, &ns, &everyone_name, expected);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("Warning Events on the pipeline", WAIT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let n = list
                .items
                .iter()
                .filter(|e| {
                    e.reason.as_deref() == Some("ForeignGrant")
                        && e.type_.as_deref() == Some("Warning")
                        && e.involved_object.name.as_deref() == Some("fraud-detector")
                })
                .count();
            (n > 0).then_some(())
        }
    })
    .await;

    rbs.delete("view-ingest", &DeleteParams::default())
        .await
        .unwrap();
    crbs.delete(&edit_name, &DeleteParams::default())
        .await
        .unwrap();
    crbs.delete(&everyone_name, &DeleteParams::default())
        .await
        .unwrap();
    cluster_roles
        .delete(&custom, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "ExclusiveAccess=True once the bindings are gone",
        WAIT,
        || {
            let pipelines = pipelines.clone();
            async move {
                let p = pipelines.get("fraud-detector").await.ok()?;
                (condition(&p, "ExclusiveAccess")?.status == "True").then_some(())
            }
        },
    )
    .await;
    wait_for("the metric to drop to 0", WAIT, || async {
        (op.metric("portcullis_foreign_grants").await == 0.0).then_some(())
    })
    .await;
    // The other conditions, written by the reconcile, are still there.
    let p = pipelines.get("fraud-detector").await.unwrap();
    assert!(condition(&p, "Ready").is_some(), "{:?}", p.status);
}
