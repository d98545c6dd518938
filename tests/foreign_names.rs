//! Issue 11, class 9 (foreign Secrets by name) and the restart targets of class 11, through the
//! real operator and the real RBAC authorizer: generated Secrets that exist under the names a
//! pipeline asks for (another pipeline's, nobody's, a Helm release's, one labelled as this
//! pipeline's without being it) are refused with `ForeignSecret`, and a SubjectAccessReview for
//! the stage's ServiceAccount says no; a Secret that does not exist yet is granted. A restart
//! target that runs as another pipeline's ServiceAccount is refused with `ForeignWorkload` and
//! left untouched; one that runs as the stage is the pipeline's.

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use portcullis::api::{AIPipeline, AccessGuardrail};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use support::{
    Operator, WAIT, can_i, control_plane, create_guardrails, create_pipeline, restart_target,
    temp_namespace, wait_for,
};

/// Who a Secret under a name the pipeline asks for belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// No such Secret: Portcullis would create it as the pipeline's.
    Nobody,
    /// Another AIPipeline of the namespace (an owner reference to it).
    OtherPipeline,
    /// Created by hand, no owner.
    Unowned,
    /// A Helm release Secret (`sh.helm.release.v1.<release>.v<n>`, `owner: helm`).
    Helm,
    /// Portcullis's labels for this very pipeline, but no owner reference: labels prove nothing.
    ForgedLabels,
}

fn holder() -> impl Strategy<Value = Holder> {
    prop_oneof![
        Just(Holder::Nobody),
        Just(Holder::OtherPipeline),
        Just(Holder::Unowned),
        Just(Holder::Helm),
        Just(Holder::ForgedLabels),
    ]
}

/// Up to four Secret names, each held by someone; Helm's get a release Secret's name.
fn secrets() -> impl Strategy<Value = Vec<(String, Holder)>> {
    prop::collection::vec((holder(), "[a-z]{1,6}", 1u8..4), 1..=4).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (h, stem, version))| {
                let name = match h {
                    Holder::Helm => format!("sh.helm.release.v1.{stem}.v{version}"),
                    _ => format!("{stem}-{i}"),
                };
                (name, h)
            })
            .collect()
    })
}

/// A guardrail for `ns` only that allows everything the test pipelines ask for.
fn guardrail(ns: &str) -> AccessGuardrail {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AccessGuardrail",
        "metadata": {"name": format!("{ns}-training")},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "roles": {"training": {
                "kubernetes": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
                "vault": {"paths": [{"pattern": "database/creds/{namespace}_{pipeline}_*", "capabilities": ["read"]}]},
            }},
        },
    }))
    .expect("the guardrail")
}

/// Pipeline `name` with one Training stage `train` that receives a credential in each of
/// `secrets` and reads them, restarting `restart` (Deployments) on rotation.
fn pipeline(ns: &str, name: &str, secrets: &[String], restart: &[&str]) -> AIPipeline {
    let credentials: Vec<_> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "name": format!("c{i}"), "path": format!("database/creds/{ns}_{name}_{i}"),
                "ttl": "10m", "secretName": s,
                "restartTargets": restart.iter().map(|d| json!({"kind": "Deployment", "name": d})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut stage = json!({"name": "train", "role": "Training"});
    if !secrets.is_empty() {
        stage["permissions"] = json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets, "verbs": ["get"]}]);
        stage["vault"] = json!({"credentials": credentials});
    }
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"stages": [stage]},
    }))
    .expect("a pipeline")
}

async fn create_secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
    holder: Holder,
    other: &AIPipeline,
) {
    let mut metadata = json!({"name": name});
    let mut secret_type = "Opaque";
    match holder {
        Holder::Nobody => return,
        Holder::OtherPipeline => {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "AIPipeline",
                "name": other.metadata.name, "uid": other.metadata.uid, "controller": true,
            }]);
            metadata["labels"] = json!({"app.kubernetes.io/managed-by": "portcullis", "portcullis.dev/pipeline": "other"});
        }
        Holder::Unowned => {}
        Holder::Helm => {
            metadata["labels"] = json!({"owner": "helm", "name": "release", "status": "deployed"});
            secret_type = "helm.sh/release.v1";
        }
        Holder::ForgedLabels => {
            metadata["labels"] = json!({"app.kubernetes.io/managed-by": "portcullis", "portcullis.dev/pipeline": "victim"});
        }
    }
    let secret: Secret = serde_json::from_value(json!({
        "metadata": metadata, "type": secret_type, "stringData": {"password": "not-yours"},
    }))
    .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("create Secret {ns}/{name}: {e}"));
}

/// The reasons of the denied items of `pipeline`'s status, by item, once the operator has
/// written a status for its generation.
async fn denied_items(client: &kube::Client, ns: &str, pipeline: &str) -> BTreeMap<String, String> {
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), ns);
    wait_for("the pipeline's status", WAIT, || async {
        let p = api.get(pipeline).await.ok()?;
        let status = p.status?;
        (status.observed_generation == p.metadata.generation && !status.stages.is_empty()).then(
            || {
                status
                    .stages
                    .iter()
                    .flat_map(|s| s.denied_items.iter())
                    .map(|d| (d.item.clone(), d.reason.clone()))
                    .collect()
            },
        )
    })
    .await
}

async fn check(secrets: Vec<(String, Holder)>) -> Result<(), TestCaseError> {
    let client = control_plane().client().await;
    let ns = temp_namespace(&client, "foreign-secrets", &[]).await;
    create_guardrails(&client, &[guardrail(&ns)]).await;
    let other = create_pipeline(&client, &pipeline(&ns, "other", &[], &[])).await;
    for (name, holder) in &secrets {
        create_secret(&client, &ns, name, *holder, &other).await;
    }
    let _op = Operator::start("operator", &ns, None);
    let names: Vec<String> = secrets.iter().map(|(n, _)| n.clone()).collect();
    create_pipeline(&client, &pipeline(&ns, "victim", &names, &[])).await;
    let denied = denied_items(&client, &ns, "victim").await;
    for (name, holder) in &secrets {
        let item = format!("get secrets/{name}");
        let may_read = can_i(
            &client,
            &ns,
            "victim-train",
            "get",
            "",
            "secrets",
            None,
            Some(name),
            Some(&ns),
        )
        .await;
        if *holder == Holder::Nobody {
            prop_assert!(
                !denied.contains_key(&item),
                "{item} (no such Secret) was denied: {denied:?}"
            );
            // The Role is applied after the status is written, so this may take a moment.
            wait_for("the stage may read its own Secret", WAIT, || async {
                can_i(
                    &client,
                    &ns,
                    "victim-train",
                    "get",
                    "",
                    "secrets",
                    None,
                    Some(name),
                    Some(&ns),
                )
                .await
                .then_some(())
            })
            .await;
        } else {
            prop_assert_eq!(
                denied.get(&item).map(String::as_str),
                Some("ForeignSecret"),
                "{} held by {:?}: {:?}",
                item,
                holder,
                denied
            );
            prop_assert!(
                !may_read,
                "the stage may read Secret {name}, held by {holder:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_stage_never_gets_a_secret_that_exists_and_is_not_its_pipelines() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut runner = TestRunner::new(Config {
        cases: 8,
        failure_persistence: None,
        // Each case starts an operator; shrinking re-runs it.
        max_shrink_iters: 4,
        ..Config::default()
    });
    let result = runner.run(&secrets(), |s| runtime.block_on(check(s)));
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A credential of pipeline `victim` names two restart targets: its own Deployment (running as
/// its stage) and one of pipeline `other` (running as `other`'s stage). The other is refused
/// (`ForeignWorkload`, in the status) and never touched; the own one is not refused.
#[tokio::test]
async fn a_restart_target_of_another_pipeline_is_denied_and_left_alone() {
    let client = control_plane().client().await;
    let ns = temp_namespace(&client, "foreign-restarts", &[]).await;
    create_guardrails(&client, &[guardrail(&ns)]).await;
    create_pipeline(&client, &pipeline(&ns, "other", &[], &[])).await;
    restart_target(&client, &ns, "other-serving", "other-train").await;
    restart_target(&client, &ns, "victim-worker", "victim-train").await;
    let _op = Operator::start("operator", &ns, None);
    create_pipeline(
        &client,
        &pipeline(
            &ns,
            "victim",
            &["victim-db".to_string()],
            &["victim-worker", "other-serving"],
        ),
    )
    .await;
    let denied = denied_items(&client, &ns, "victim").await;
    assert_eq!(
        denied
            .get("restart Deployment other-serving for credential c0")
            .map(String::as_str),
        Some("ForeignWorkload"),
        "{denied:?}"
    );
    assert!(
        !denied.contains_key("restart Deployment victim-worker for credential c0"),
        "{denied:?}"
    );
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("other-serving")
        .await
        .expect("the other pipeline's Deployment");
    let annotations = deployment
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert!(
        !annotations.contains_key("portcullis.dev/restarted-at"),
        "the other pipeline's Deployment was restarted: {annotations:?}"
    );
}

/// `kubectl portcullis can-i <pipeline> -n <ns> [more...]`: exit code and stdout + stderr.
fn plugin_can_i(pipeline: &str, ns: &str, more: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("dir");
    let link = dir.path().join("kubectl-portcullis");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_portcullis"), &link).expect("symlink");
    let kubeconfig = control_plane().kubeconfig().display().to_string();
    let mut args = vec!["can-i", pipeline, "-n", ns, "--kubeconfig", &kubeconfig];
    args.extend(more);
    let out = std::process::Command::new(&link)
        .args(&args)
        .output()
        .expect("the plugin runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `can-i` shows planned against effective access per stage: once the operator applied the
/// plan they agree; `view` bound to the stage's ServiceAccount by hand is effective but not
/// planned, with the binding named, in the table and in `-o json`, and can-i exits 1.
#[tokio::test]
async fn can_i_shows_a_grant_made_outside_portcullis_as_effective_but_not_planned() {
    let client = control_plane().client().await;
    let ns = temp_namespace(&client, "can-i-effective", &[]).await;
    create_guardrails(&client, &[guardrail(&ns)]).await;
    let _op = Operator::start("operator", &ns, None);
    create_pipeline(
        &client,
        &pipeline(&ns, "victim", &["victim-db".to_string()], &[]),
    )
    .await;
    let (code, out) = wait_for("the plan applied", WAIT, || async {
        let (code, out) = plugin_can_i("victim", &ns, &[]);
        (code == 0).then_some((code, out))
    })
    .await;
    assert!(out.contains("effective but not planned: nothing"), "{out}");
    assert_eq!(code, 0);

    // `view` as a real cluster has it: the test control plane runs no clusterrole-aggregation
    // controller, so its own `view` has no rules. The same read-only rules, under a name of
    // this test's, bound by hand; and `view` itself, to see the binding named.
    let reader: k8s_openapi::api::rbac::v1::ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": format!("{ns}-view")},
        "rules": [{"apiGroups": [""], "resources": ["pods", "configmaps", "services"], "verbs": ["get", "list", "watch"]}],
    }))
    .expect("a ClusterRole");
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &reader)
        .await
        .expect("create the ClusterRole");
    for (name, role) in [
        ("hand-made-view", "view".to_string()),
        ("hand-made-reader", format!("{ns}-view")),
    ] {
        let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "victim-train", "namespace": ns}],
        }))
        .expect("a RoleBinding");
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("bind by hand");
    }

    let (code, out) = plugin_can_i("victim", &ns, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FOREIGN get,list,watch") && out.contains("configmaps"),
        "{out}"
    );
    for binding in [
        format!("reached by RoleBinding {ns}/hand-made-view -> ClusterRole view"),
        format!("reached by RoleBinding {ns}/hand-made-reader -> ClusterRole {ns}-view"),
    ] {
        assert!(out.contains(&binding), "{out}");
    }
    // The planned grant is still effective; only the extra is reported.
    assert!(
        out.contains(&format!("yes   get secrets victim-db in {ns}")),
        "{out}"
    );

    let (code, out) = plugin_can_i("victim", &ns, &["-o", "json"]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["agrees"], false);
    let stage = &report["stages"][0];
    assert_eq!(stage["stage"], "train");
    assert_eq!(stage["plannedNotEffective"], json!([]));
    let foreign = stage["effectiveNotPlanned"].as_array().expect("a list");
    assert!(
        foreign.iter().any(|r| r["resources"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|x| x == "pods"))
            && r["verbs"]
                .as_array()
                .is_some_and(|vs| vs.iter().any(|v| v == "list"))),
        "{foreign:?}"
    );
    assert_eq!(stage["foreignBindings"].as_array().map(Vec::len), Some(2));
    // The reader has nothing on Secrets: nothing reported is about the stage's own Secret.
    assert!(
        foreign.iter().all(|r| r["resources"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|x| x != "secrets"))),
        "{foreign:?}"
    );
}

mod pure {
    //! The same invariants without a cluster, over many more cases: whatever the cluster holds
    //! under the names a pipeline uses, the plan's Role never names a Secret that is not the
    //! pipeline's (or whose owner is unknown), no credential is delivered into one, and only
    //! workloads that run as one of the pipeline's stages are restart targets.

    use std::collections::BTreeMap;

    use k8s_openapi::api::rbac::v1::Role;
    use portcullis::api::WorkloadKind;
    use portcullis::plan::{self, Object, PlanOptions};
    use portcullis::policy::{ClusterFacts, SecretFact, WorkloadFact};
    use proptest::prelude::*;

    const SECRETS: &[&str] = &["db", "s3", "sh.helm.release.v1.vault.v1", "other-db"];
    const WORKLOADS: &[&str] = &["ingest", "serving", "trainer"];
    const ACCOUNTS: &[&str] = &["fraud-train", "fraud-serve", "other-train", "default"];

    fn secret_fact() -> impl Strategy<Value = Option<SecretFact>> {
        prop_oneof![
            Just(None),
            Just(Some(SecretFact::Absent)),
            Just(Some(SecretFact::Owned)),
            Just(Some(SecretFact::Foreign(
                "owned by AIPipeline other".into()
            ))),
            Just(Some(SecretFact::Unknown("forbidden".into()))),
        ]
    }

    fn workload_fact() -> impl Strategy<Value = Option<WorkloadFact>> {
        prop_oneof![
            Just(None),
            Just(Some(WorkloadFact::Absent)),
            prop::sample::select(ACCOUNTS).prop_map(|a| Some(WorkloadFact::RunsAs(a.into()))),
            Just(Some(WorkloadFact::Unknown("forbidden".into()))),
        ]
    }

    /// Per stage (train, serve): the Secret of its credential, the Secrets it reads, its
    /// credential's restart targets.
    type Ask = Vec<(usize, Vec<usize>, Vec<usize>)>;

    fn ask() -> impl Strategy<Value = Ask> {
        prop::collection::vec(
            (
                0..SECRETS.len(),
                prop::collection::vec(0..SECRETS.len(), 0..=3),
                prop::collection::vec(0..WORKLOADS.len(), 0..=3),
            ),
            2,
        )
    }

    fn pipeline(ask: &Ask) -> Option<portcullis::api::AIPipeline> {
        // Validation wants one Secret per credential across the pipeline.
        if ask[0].0 == ask[1].0 {
            return None;
        }
        let stages: Vec<_> = ["train", "serve"]
            .iter()
            .zip(ask)
            .map(|(name, (credential, reads, restarts))| {
                let mut reads: Vec<&str> = reads.iter().map(|i| SECRETS[*i]).collect();
                reads.sort_unstable();
                reads.dedup();
                let mut restarts: Vec<&str> = restarts.iter().map(|i| WORKLOADS[*i]).collect();
                restarts.sort_unstable();
                restarts.dedup();
                let mut stage = serde_json::json!({
                    "name": name, "role": "Training",
                    "vault": {"credentials": [{
                        "name": "db", "path": format!("database/creds/ml_fraud_{name}"), "ttl": "10m",
                        "secretName": SECRETS[*credential],
                        "restartTargets": restarts.iter().map(|w| serde_json::json!({"kind": "Deployment", "name": w})).collect::<Vec<_>>(),
                    }]},
                });
                if !reads.is_empty() {
                    stage["permissions"] = serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": reads, "verbs": ["get"]}]);
                }
                stage
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AIPipeline",
            "metadata": {"name": "fraud", "namespace": "ml"},
            "spec": {"stages": stages},
        }))
        .ok()
    }

    fn guardrail() -> portcullis::api::AccessGuardrail {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGuardrail",
            "metadata": {"name": "ml"},
            "spec": {"roles": {"training": {
                "kubernetes": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
                "vault": {"paths": [{"pattern": "database/creds/{namespace}_{pipeline}_*", "capabilities": ["read"]}]},
            }}},
        }))
        .expect("a guardrail")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn nothing_foreign_reaches_a_role_a_credential_or_a_restart(
            ask in ask(),
            secrets in prop::collection::vec(secret_fact(), SECRETS.len()),
            workloads in prop::collection::vec(workload_fact(), WORKLOADS.len()),
        ) {
            let Some(p) = pipeline(&ask) else { return Ok(()) };
            let mut facts = ClusterFacts::default();
            for (name, fact) in SECRETS.iter().zip(&secrets) {
                if let Some(f) = fact {
                    facts.secrets.insert((*name).to_string(), f.clone());
                }
            }
            for (name, fact) in WORKLOADS.iter().zip(&workloads) {
                if let Some(f) = fact {
                    facts.workloads.insert((WorkloadKind::Deployment, (*name).to_string()), f.clone());
                }
            }
            let plan = plan::validate_and_build_with(
                &p, "ml", &BTreeMap::new(), &[guardrail()],
                PlanOptions { cluster: Some(&facts), ..PlanOptions::default() },
            ).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let pipelines = |name: &str| {
                matches!(facts.secrets.get(name), Some(SecretFact::Absent | SecretFact::Owned))
            };
            for object in &plan.objects {
                if let Object::Role(Role { rules, .. }) = object {
                    for rule in rules.iter().flatten() {
                        if rule.resources.iter().flatten().any(|r| r == "secrets") {
                            for name in rule.resource_names.iter().flatten() {
                                prop_assert!(pipelines(name), "Role {} names Secret {name}: {:?}", object.name(), facts.secrets.get(name));
                            }
                        }
                    }
                }
            }
            for c in &plan.vault.credentials {
                prop_assert!(pipelines(&c.secret_name), "credential {} delivered into {}", c.name, c.secret_name);
                for t in &c.restart_targets {
                    let fact = facts.workloads.get(&(t.kind, t.name.clone()));
                    let own = match fact {
                        Some(WorkloadFact::Absent) => true,
                        Some(WorkloadFact::RunsAs(sa)) => sa == "fraud-train" || sa == "fraud-serve",
                        _ => false,
                    };
                    prop_assert!(own, "{} restarts {} ({fact:?})", c.stage, t.name);
                }
            }
            // And nothing is unverified: the cluster was asked.
            prop_assert!(plan.decisions.iter().all(|d| plan.unverified(d).is_none()));
        }
    }
}
