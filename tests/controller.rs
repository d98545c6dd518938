//! The operator against a real API server: every example gets exactly its allowed access (the
//! API server's RBAC authorizer is the judge), drift is reverted, stale objects are pruned,
//! deletion cleans up, tightened guardrails take effect, foreign objects are not adopted, a
//! killed operator converges on restart, and only the leader writes.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom, as the user would go"
)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use portcullis::api::{AIPipeline, AccessGuardrail};
use portcullis::plan::{self, Plan};
use portcullis::policy::Item;
use serde_json::{Value, json};
use support::admission::Refusal;
use support::{
    Operator, WAIT, condition, create_pipeline, example, guarded_namespace, wait_converged,
    wait_ready, with_pipeline,
};

/// Runs the binary as the kubectl plugin (`kubectl-portcullis`, through a symlink) with `args`.
fn plugin(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("dir");
    let link = dir.path().join("kubectl-portcullis");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_portcullis"), &link).expect("symlink");
    let out = Command::new(&link)
        .args(args)
        .output()
        .expect("plugin runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `kubectl portcullis can-i <pipeline> -n <ns> [more...]` against the control plane.
fn plugin_can_i(pipeline: &str, ns: &str, more: &[&str]) -> (i32, String) {
    let kubeconfig = support::control_plane().kubeconfig().display().to_string();
    let mut args = vec!["can-i", pipeline, "-n", ns, "--kubeconfig", &kubeconfig];
    args.extend(more);
    plugin(&args)
}

/// (verb, group, resource, subresource, name, namespace)
type Forbidden<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<String>,
    Option<&'a str>,
);

fn expected(pipeline: &AIPipeline, guardrails: &[AccessGuardrail]) -> Plan {
    let ns = pipeline.metadata.namespace.clone().expect("namespace");
    let labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.clone())]);
    plan::validate_and_build(pipeline, &ns, &labels, guardrails).expect("example plans")
}

#[tokio::test]
async fn every_example_stage_gets_exactly_what_is_allowed() {
    let (client, ns, guardrails) = guarded_namespace("examples").await;
    let pipelines: Vec<AIPipeline> = ["fraud-detector", "llm-finetune", "rag-assistant"]
        .iter()
        .map(|f| example(&format!("examples/pipelines/{f}.yaml"), &ns))
        .collect();
    let op = Operator::start("operator-examples", &ns, None);
    for p in &pipelines {
        create_pipeline(&client, p).await;
    }
    for p in &pipelines {
        let live = wait_converged(&client, &ns, &p.name_any(), &op).await;
        let plan = expected(p, &guardrails);
        // The examples' own namespace names (ml-rag, ...) differ from this test's namespace, so a
        // flow to "the pipeline's namespace by name" may be denied here: the status says exactly
        // what the plan denies.
        assert_eq!(
            live.status.as_ref().map(|s| s.denied as usize),
            Some(plan.denied())
        );
        let secrets: BTreeMap<String, String> = plan
            .vault
            .credentials
            .iter()
            .map(|c| (c.secret_name.clone(), c.stage.clone()))
            .collect();
        for stage in &plan.stages {
            let sa = &stage.service_account;
            // Everything allowed, one verb at a time.
            for d in plan
                .decisions
                .iter()
                .filter(|d| d.stage == stage.name && d.is_allowed())
            {
                if let Item::Kubernetes {
                    api_group,
                    resource,
                    verb,
                    resource_names,
                } = &d.item
                {
                    let (res, sub) = resource
                        .split_once('/')
                        .map_or((resource.as_str(), None), |(r, s)| (r, Some(s)));
                    let names: Vec<Option<&str>> = if resource_names.is_empty() {
                        vec![None]
                    } else {
                        resource_names.iter().map(|n| Some(n.as_str())).collect()
                    };
                    for name in names {
                        assert!(
                            support::can_i(
                                &client,
                                &ns,
                                sa,
                                verb,
                                api_group,
                                res,
                                sub,
                                name,
                                Some(&ns)
                            )
                            .await,
                            "{sa} should be allowed {d:?}"
                        );
                    }
                }
            }
            // And nothing of the forbidden matrix.
            let mut forbidden: Vec<Forbidden<'_>> = vec![
                ("get", "", "secrets", None, None, Some(ns.as_str())),
                ("list", "", "secrets", None, None, Some(ns.as_str())),
                (
                    "escalate",
                    "rbac.authorization.k8s.io",
                    "roles",
                    None,
                    None,
                    Some(ns.as_str()),
                ),
                (
                    "bind",
                    "rbac.authorization.k8s.io",
                    "roles",
                    None,
                    None,
                    Some(ns.as_str()),
                ),
                (
                    "create",
                    "rbac.authorization.k8s.io",
                    "rolebindings",
                    None,
                    None,
                    Some(ns.as_str()),
                ),
                ("create", "", "pods", Some("exec"), None, Some(ns.as_str())),
                (
                    "create",
                    "",
                    "pods",
                    Some("portforward"),
                    None,
                    Some(ns.as_str()),
                ),
                ("list", "", "nodes", None, None, None),
                ("list", "", "namespaces", None, None, None),
                ("get", "", "configmaps", None, None, Some("kube-system")),
                (
                    "impersonate",
                    "",
                    "serviceaccounts",
                    None,
                    None,
                    Some(ns.as_str()),
                ),
                (
                    "create",
                    "",
                    "serviceaccounts",
                    Some("token"),
                    None,
                    Some(ns.as_str()),
                ),
            ];
            for (secret, owner) in &secrets {
                if *owner != stage.name {
                    forbidden.push((
                        "get",
                        "",
                        "secrets",
                        None,
                        Some(secret.clone()),
                        Some(ns.as_str()),
                    ));
                }
            }
            for (verb, group, resource, sub, name, namespace) in forbidden {
                assert!(
                    !support::can_i(
                        &client,
                        &ns,
                        sa,
                        verb,
                        group,
                        resource,
                        sub,
                        name.as_deref(),
                        namespace
                    )
                    .await,
                    "{sa} must not {verb} {group}/{resource}/{sub:?} {name:?} in {namespace:?}"
                );
            }
        }
    }
    // Probes: alive, and ready once the caches are synced.
    assert_eq!(op.http_status("/healthz").await, 200);
    support::wait_for("/readyz to answer 200", WAIT, || {
        let op = &op;
        async move { (op.http_status("/readyz").await == 200).then_some(()) }
    })
    .await;
    assert_eq!(op.http_status("/nope").await, 404);

    // The kubectl plugin agrees: every grant allowed, nothing of the matrix.
    let (code, out) = plugin_can_i("fraud-detector", &ns, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("yes   get configmaps ingest-config in {ns}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("no    create pods/exec in {ns}")),
        "{out}"
    );
    let (_, help) = plugin(&["--help"]);
    assert!(help.contains("Usage: kubectl portcullis"), "{help}");

    let records = op.records();
    let grants = records
        .iter()
        .filter(|r| r["action"] == "grant" || r["action"] == "deny")
        .count();
    let expected_grants: usize = pipelines
        .iter()
        .map(|p| expected(p, &guardrails).decisions.len())
        .sum();
    assert_eq!(
        grants, expected_grants,
        "one grant or deny record per decision"
    );
    assert!(op.verify().0, "{}", op.verify().1);
}

#[tokio::test]
async fn drift_is_reverted_and_recorded() {
    let f = with_pipeline("drift", "examples/pipelines/fraud-detector.yaml").await;
    let (client, ns, op) = (&f.client, &f.ns, &f.op);
    f.wait_converged().await;

    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let original = roles
        .get("fraud-detector-ingest")
        .await
        .expect("role exists")
        .rules;
    let widened =
        json!({"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]});
    roles
        .patch(
            "fraud-detector-ingest",
            &PatchParams::default(),
            &Patch::Merge(&widened),
        )
        .await
        .expect("a person widens the Role");
    support::wait_for("the Role's rules to be put back", WAIT, || {
        let roles = roles.clone();
        let original = original.clone();
        async move { (roles.get("fraud-detector-ingest").await.ok()?.rules == original).then_some(()) }
    })
    .await;

    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    policies
        .delete("fraud-detector-serve", &DeleteParams::default())
        .await
        .expect("a person deletes the NetworkPolicy");
    support::wait_for("the NetworkPolicy to be recreated", WAIT, || {
        let policies = policies.clone();
        async move {
            policies
                .get_opt("fraud-detector-serve")
                .await
                .ok()?
                .filter(|p| p.metadata.deletion_timestamp.is_none())
        }
    })
    .await;

    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    sa.patch(
        "fraud-detector-train",
        &PatchParams::default(),
        &Patch::Merge(&json!({"automountServiceAccountToken": true})),
    )
    .await
    .expect("a person turns token mounting on");
    support::wait_for(
        "automountServiceAccountToken to be false again",
        WAIT,
        || {
            let sa = sa.clone();
            async move {
                (sa.get("fraud-detector-train")
                    .await
                    .ok()?
                    .automount_service_account_token
                    == Some(false))
                .then_some(())
            }
        },
    )
    .await;

    let reverted: BTreeSet<String> =
        support::wait_for("three drift-reverted records", WAIT, || {
            let records = op.records();
            async move {
                let objects: BTreeSet<String> = records
                    .iter()
                    .filter(|r| r["action"] == "drift-reverted")
                    .filter_map(|r| r["object"].as_str().map(String::from))
                    .collect();
                (objects.len() >= 3).then_some(objects)
            }
        })
        .await;
    for object in [
        "Role {ns}/fraud-detector-ingest",
        "NetworkPolicy {ns}/fraud-detector-serve",
        "ServiceAccount {ns}/fraud-detector-train",
    ] {
        let object = object.replace("{ns}", ns);
        assert!(reverted.contains(&object), "{object}: {reverted:?}");
    }
    assert!(op.metric("portcullis_drift_reverts_total").await >= 3.0);
    assert!(op.verify().0, "{}", op.verify().1);
}

#[tokio::test]
async fn removed_stages_are_pruned_and_deletion_removes_everything() {
    let f = with_pipeline("prune", "examples/pipelines/fraud-detector.yaml").await;
    let (client, ns, op) = (&f.client, &f.ns, &f.op);
    let mut pipeline = example("examples/pipelines/fraud-detector.yaml", ns);
    f.wait_converged().await;

    let api: Api<AIPipeline> = Api::namespaced(client.clone(), ns);
    let live = api.get("fraud-detector").await.expect("pipeline");
    pipeline.metadata.resource_version = live.metadata.resource_version.clone();
    pipeline.spec.stages.retain(|s| s.name != "train");
    api.replace("fraud-detector", &PostParams::default(), &pipeline)
        .await
        .expect("stage removed");
    wait_converged(client, ns, "fraud-detector", op).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    support::wait_for("the train stage's objects to be pruned", WAIT, || {
        let (sas, roles) = (sas.clone(), roles.clone());
        async move {
            let sa = sas.get_opt("fraud-detector-train").await.ok()?;
            let role = roles.get_opt("fraud-detector-train").await.ok()?;
            (sa.is_none() && role.is_none()).then_some(())
        }
    })
    .await;
    assert!(
        sas.get_opt("fraud-detector-ingest")
            .await
            .expect("get")
            .is_some(),
        "other stages stay"
    );
    assert!(op.records().iter().any(|r| r["action"] == "prune"
        && r["object"] == format!("ServiceAccount {ns}/fraud-detector-train")));

    api.delete("fraud-detector", &DeleteParams::default())
        .await
        .expect("pipeline deleted");
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=portcullis");
    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    support::wait_for("garbage collection of every managed object", WAIT, || {
        let (sas, roles, rbs, nps, selector) = (
            sas.clone(),
            roles.clone(),
            rbs.clone(),
            nps.clone(),
            selector.clone(),
        );
        async move {
            let left = sas.list(&selector).await.ok()?.items.len()
                + roles.list(&selector).await.ok()?.items.len()
                + rbs.list(&selector).await.ok()?.items.len()
                + nps.list(&selector).await.ok()?.items.len();
            (left == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_tightened_guardrail_removes_what_it_no_longer_allows() {
    let f = with_pipeline("tighten", "examples/pipelines/llm-finetune.yaml").await;
    let (client, ns, op) = (&f.client, &f.ns, &f.op);
    assert_eq!(f.name(), "support-llm");
    f.wait_converged().await;
    // Whether the finetune stage may `verb` pods in the namespace.
    let pods = |verb: &'static str| {
        support::can_i(
            client,
            ns,
            "support-llm-finetune",
            verb,
            "",
            "pods",
            None,
            None,
            Some(ns),
        )
    };
    assert!(pods("list").await);

    // The platform team drops `list` from the training ceiling.
    let api: Api<AccessGuardrail> = Api::all(client.clone());
    let name = format!("{ns}-training");
    let patch = json!({"spec": {"roles": {"training": {"kubernetes": [
        {"apiGroups": [""], "resources": ["configmaps", "secrets", "pods", "pods/log"], "verbs": ["get", "watch"]}
    ]}}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("guardrail tightened");
    support::wait_for("list pods to be revoked", WAIT, || async {
        (!pods("list").await).then_some(())
    })
    .await;
    assert!(pods("get").await, "get stays");
    let live = Api::<AIPipeline>::namespaced(client.clone(), ns)
        .get("support-llm")
        .await
        .expect("pipeline");
    let satisfied = condition(&live, "GuardrailsSatisfied").expect("condition");
    assert_eq!(satisfied.status, "False");
    assert!(
        satisfied.message.contains("denied"),
        "{}",
        satisfied.message
    );
    assert!(
        op.records()
            .iter()
            .any(|r| r["action"] == "deny" && r["reason"] == "OutsideGuardrail")
    );
}

#[tokio::test]
async fn an_existing_service_account_is_not_adopted() {
    let (client, ns, _) = guarded_namespace("adopt").await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let foreign: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "fraud-detector-train", "labels": {"team": "someone-else"}}}),
    )
    .expect("sa");
    sas.create(&PostParams::default(), &foreign)
        .await
        .expect("someone's ServiceAccount");
    let op = Operator::start("operator-adopt", &ns, None);
    create_pipeline(
        &client,
        &example("examples/pipelines/fraud-detector.yaml", &ns),
    )
    .await;
    let live = wait_ready(&client, &ns, "fraud-detector", "False", &op).await;
    let ready = condition(&live, "Ready").expect("Ready");
    assert_eq!(ready.reason, "AdoptionRefused");
    assert!(
        ready
            .message
            .contains(&format!("ServiceAccount {ns}/fraud-detector-train")),
        "{}",
        ready.message
    );
    // Nothing of that stage is bound to the foreign ServiceAccount; the other stages work.
    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
    support::wait_for("the other stages' bindings", WAIT, || {
        let rbs = rbs.clone();
        async move { rbs.get_opt("fraud-detector-ingest").await.ok()?.map(|_| ()) }
    })
    .await;
    assert!(
        rbs.get_opt("fraud-detector-train")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        !support::can_i(
            &client,
            &ns,
            "fraud-detector-train",
            "get",
            "",
            "configmaps",
            None,
            Some("training-params"),
            Some(&ns)
        )
        .await
    );
    let untouched = sas.get("fraud-detector-train").await.expect("still there");
    assert!(
        untouched
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "not taken over"
    );
    assert!(
        op.records()
            .iter()
            .any(|r| r["action"] == "adoption-refused")
    );
    // can-i shows the stage lacks what its plan grants, and exits 1.
    let (code, out) = plugin_can_i("fraud-detector", &ns, &["--stage", "train"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("granted by the plan but not by the cluster"),
        "{out}"
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_once_and_waits() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "invalid", &[]).await;
    let op = Operator::start("operator-invalid", &ns, None);
    let mut pipeline = example("examples/pipelines/fraud-detector.yaml", &ns);
    // A CIDR with host bits set: the CRD's schema admits it (a pattern cannot see host bits),
    // the operator's validation does not.
    pipeline.spec.stages[0]
        .network
        .as_mut()
        .expect("network")
        .egress[0]
        .cidr = Some("10.20.0.1/16".into());
    create_pipeline(&client, &pipeline).await;
    let live = wait_ready(&client, &ns, "fraud-detector", "False", &op).await;
    let ready = condition(&live, "Ready").expect("Ready");
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(
        ready.message.contains("spec.stages[0].network.egress[0]"),
        "{}",
        ready.message
    );
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    assert!(
        sas.get_opt("fraud-detector-ingest")
            .await
            .expect("get")
            .is_none(),
        "nothing applied"
    );
    // It does not hot-loop: the reconcile count settles.
    let settled = op.metric("portcullis_reconciles_total").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        op.metric("portcullis_reconciles_total").await <= settled + 1.0,
        "an invalid pipeline is not retried in a loop"
    );
}

#[tokio::test]
async fn a_killed_operator_converges_on_restart() {
    let (client, ns, _) = guarded_namespace("restart").await;
    let template = example("examples/pipelines/rag-assistant.yaml", &ns);
    let count = 24;
    for i in 0..count {
        let mut p = template.clone();
        p.metadata.name = Some(format!("rag-{i}"));
        for stage in &mut p.spec.stages {
            for cred in stage
                .vault
                .iter_mut()
                .flat_map(|v| v.credentials.iter_mut())
            {
                cred.secret_name = format!("{}-{i}", cred.secret_name);
            }
            for rule in &mut stage.permissions {
                for n in &mut rule.resource_names {
                    if n == "rag-answer-db" {
                        *n = format!("rag-answer-db-{i}");
                    }
                }
            }
        }
        create_pipeline(&client, &p).await;
    }
    let dir = tempfile::tempdir().expect("dir");
    let audit = dir.path().join("audit.log");
    let mut first = Operator::start_with("operator-restart", &ns, None, dir, &[]);
    // Kill it in the middle: some objects are written, not all.
    support::wait_for("the first objects to be created", WAIT, || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        async move { (text.matches("\"action\":\"create\"").count() >= 8).then_some(()) }
    })
    .await;
    first.kill();
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().expect("dir"));
    let second = Operator::start_with("operator-restart", &ns, None, dir, &[]);
    for i in 0..count {
        wait_converged(&client, &ns, &format!("rag-{i}"), &second).await;
    }
    // Every planned object exists once, owned by its pipeline; nothing managed is orphaned.
    let pipelines = Api::<AIPipeline>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("list")
        .items;
    let uids: BTreeSet<String> = pipelines
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=portcullis");
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .list(&selector)
        .await
        .expect("list")
        .items;
    let rbs = Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .list(&selector)
        .await
        .expect("list")
        .items;
    assert_eq!(sas.len(), count * 2);
    assert_eq!(rbs.len(), count * 2);
    for sa in &sas {
        let owners = sa.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{}", sa.name_any());
        assert!(
            uids.contains(&owners[0].uid),
            "{} is orphaned",
            sa.name_any()
        );
    }
    let (ok, report) = second.verify();
    assert!(ok, "the decision log survives a kill: {report}");

    // A restart of a converged operator does not record the same grants again, nor anything.
    let records_before = second.records().len();
    let mut second = second;
    second.stop();
    let dir = std::mem::replace(&mut second.dir, tempfile::tempdir().expect("dir"));
    let third = Operator::start_with("operator-restart", &ns, None, dir, &[]);
    support::wait_for("every pipeline reconciled after the restart", WAIT, || {
        let third = &third;
        async move {
            let reconciled = third
                .metric("portcullis_reconciles_total{result=\"ok\"}")
                .await;
            (reconciled >= count as f64).then_some(())
        }
    })
    .await;
    let records = third.records();
    let after: Vec<&Value> = records.iter().skip(records_before).collect();
    assert!(
        after.is_empty(),
        "a restart of a converged operator records nothing: {after:?}"
    );
}

#[tokio::test]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let (client, ns, _) = guarded_namespace("leader").await;
    let mut a = Operator::start("operator-a", &ns, Some(&ns));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = support::wait_for("a leader", WAIT, || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("portcullis-leader")
                .await
                .ok()??
                .spec?
                .holder_identity
        }
    })
    .await;
    assert_eq!(holder, "operator-a");
    let b = Operator::start("operator-b", &ns, Some(&ns));
    let first = example("examples/pipelines/fraud-detector.yaml", &ns);
    create_pipeline(&client, &first).await;
    wait_converged(&client, &ns, "fraud-detector", &a).await;
    assert!(!a.records().is_empty());
    assert!(
        b.records().is_empty(),
        "the standby wrote: {:?}",
        b.records()
    );

    a.stop();
    support::wait_for("operator-b to take the lease", WAIT, || {
        let leases = leases.clone();
        async move {
            let h = leases
                .get_opt("portcullis-leader")
                .await
                .ok()??
                .spec?
                .holder_identity?;
            (h == "operator-b").then_some(())
        }
    })
    .await;
    let second = example("examples/pipelines/llm-finetune.yaml", &ns);
    create_pipeline(&client, &second).await;
    wait_converged(&client, &ns, "support-llm", &b).await;
    assert!(b.records().iter().any(|r| r["pipeline"] == "support-llm"));
    assert!(b.verify().0, "{}", b.verify().1);
}

#[tokio::test]
async fn a_leader_that_cannot_renew_its_lease_stops_writing_before_it_expires() {
    let (client, ns, _) = guarded_namespace("renew").await;
    let mut a = Operator::start("operator-a", &ns, Some(&ns));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease =
        |leases: Api<Lease>| async move { leases.get_opt("portcullis-leader").await.ok()??.spec };
    support::wait_for("operator-a to lead", WAIT, || {
        let leases = leases.clone();
        async move { (lease(leases).await?.holder_identity? == "operator-a").then_some(()) }
    })
    .await;
    create_pipeline(
        &client,
        &example("examples/pipelines/fraud-detector.yaml", &ns),
    )
    .await;
    wait_converged(&client, &ns, "fraud-detector", &a).await;

    // The API server refuses every renewal of the Lease from now on.
    let refusal = Refusal::install(
        &client,
        ("coordination.k8s.io", "leases"),
        &ns,
        "object.metadata.name == 'portcullis-leader'",
        "the lease is frozen",
        &leases,
        "portcullis-leader",
    )
    .await;
    // The leader stops on its own, before the Lease it last renewed could be taken.
    let stopped_at = support::wait_for("operator-a to stop", WAIT, || {
        let exited = a.exited();
        async move { exited.then(chrono::Utc::now) }
    })
    .await;
    let spec = lease(leases.clone()).await.expect("the lease");
    let renewed = spec.renew_time.expect("renewed").0;
    let expires = renewed
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
            spec.lease_duration_seconds.expect("a duration"),
        )))
        .unwrap();
    let stopped =
        k8s_openapi::jiff::Timestamp::from_millisecond(stopped_at.timestamp_millis()).unwrap();
    assert!(
        stopped < expires,
        "the leader stopped at {stopped}, after its lease could be taken at {expires}"
    );
    assert!(
        a.full_log().contains("can no longer count on"),
        "{}",
        a.log()
    );
    refusal.lift().await;
    let (ok, out) = a.verify();
    assert!(ok, "{out}");
}

#[tokio::test]
async fn the_reconcile_annotation_puts_a_tampered_status_right_and_is_recorded_once_per_value() {
    let f = support::with_pipeline("annotate", "examples/pipelines/rag-assistant.yaml").await;
    let mut pipeline = f.pipeline.clone();
    for stage in &mut pipeline.spec.stages {
        stage.vault = None;
    }
    let api: Api<AIPipeline> = Api::namespaced(f.client.clone(), &f.ns);
    let name = f.name();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            &json!({"spec": {"stages": serde_json::to_value(&pipeline.spec.stages).unwrap()}}),
        ),
    )
    .await
    .unwrap();
    f.wait_ready("True").await;

    // Someone rewrites the status: the operator does not watch status edits.
    let live = api.get_status(&name).await.unwrap();
    let mut tampered = serde_json::to_value(live.status.unwrap()).unwrap();
    for c in tampered["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Ready" {
            c["status"] = json!("False");
            c["reason"] = json!("Tampered");
        }
    }
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": tampered})),
    )
    .await
    .unwrap();
    let requests = |f: &support::Fixture| {
        f.op.records()
            .iter()
            .filter(|r| r["action"] == "reconcile-requested")
            .count()
    };
    for (value, expected) in [("1", 1), ("1", 1), ("2", 2)] {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"metadata": {"annotations": {"portcullis.dev/reconcile": value}}}),
            ),
        )
        .await
        .unwrap();
        support::wait_for("the request to be recorded", WAIT, || async {
            (requests(&f) == expected).then_some(())
        })
        .await;
        let p = f.wait_ready("True").await;
        assert_eq!(
            support::condition(&p, "Ready").unwrap().reason,
            "Reconciled"
        );
    }
    let events = f
        .client
        .request::<Value>(
            kube::core::Request::new(format!("/apis/events.k8s.io/v1/namespaces/{}/events", f.ns))
                .list(&ListParams::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let asked = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "ReconcileRequested" && e["type"] == "Normal")
        .count();
    assert!(asked >= 1, "{events}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(requests(&f), 2, "the same value is not recorded again");
}
