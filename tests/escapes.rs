//! The classes of escape of issue 11, judged by the real RBAC authorizer: generated tenants
//! (namespaces, pipelines and stages whose names collide when joined, stages that ask for each
//! other's Secrets, inputs, ServiceAccounts, Roles, workloads and NetworkPolicies) are planned
//! with the cluster-wide claims, their Roles and RoleBindings applied to a real API server, and
//! SubjectAccessReviews ask, for every ordered pair of (namespace, pipeline, stage) triples,
//! whether one may touch anything the other owns. The answer must always be no.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams};
use portcullis::api::{AIPipeline, AccessGuardrail};
use portcullis::plan::{self, Object, Plan, PlanOptions};
use portcullis::policy::{CredentialClaims, Item};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use support::{
    Operator, WAIT, can_i, control_plane, create_pipeline, guarded_namespace, temp_namespace,
    wait_for,
};

const PIPELINES: &[&str] = &["fraud", "fraud-v2", "a", "a-b", "prod-scorer"];
const STAGES: &[&str] = &["b", "b-c", "c", "serve"];
/// Secret and ConfigMap names every stage draws from, so that stages ask for each other's.
const SECRETS: &[&str] = &["db", "s3"];
const CONFIGMAPS: &[&str] = &["params", "features"];

#[derive(Debug, Clone)]
struct StageAsk {
    name: String,
    credential_secret: Option<String>,
    /// Whose credential path the stage asks for: its own pipeline's (None) or another's.
    credential_of: Option<usize>,
    read_secrets: Vec<String>,
    read_configmaps: Vec<String>,
    write_configmaps: Vec<String>,
    produces: bool,
}

#[derive(Debug, Clone)]
struct PipelineAsk {
    namespace: usize,
    name: String,
    stages: Vec<StageAsk>,
}

fn pick(v: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(v).prop_map(str::to_string)
}

fn stage_ask() -> impl Strategy<Value = StageAsk> {
    (
        pick(STAGES),
        prop::option::of(pick(SECRETS)),
        prop::option::weighted(0.3, 0usize..4),
        prop::collection::vec(pick(SECRETS), 0..=2),
        prop::collection::vec(pick(CONFIGMAPS), 0..=1),
        prop::collection::vec(pick(CONFIGMAPS), 0..=1),
        any::<bool>(),
    )
        .prop_map(
            |(
                name,
                credential_secret,
                credential_of,
                read_secrets,
                read_configmaps,
                write_configmaps,
                produces,
            )| {
                StageAsk {
                    name,
                    credential_secret,
                    credential_of,
                    read_secrets,
                    read_configmaps,
                    write_configmaps,
                    produces,
                }
            },
        )
}

fn scenario() -> impl Strategy<Value = Vec<PipelineAsk>> {
    prop::collection::vec(
        (
            0usize..2,
            pick(PIPELINES),
            prop::collection::vec(stage_ask(), 1..=2),
        ),
        2..=5,
    )
    .prop_map(|ps| {
        let mut seen = BTreeSet::new();
        ps.into_iter()
            .filter(|(ns, name, _)| seen.insert((*ns, name.clone())))
            .map(|(namespace, name, mut stages)| {
                let mut names = BTreeSet::new();
                stages.retain(|s| names.insert(s.name.clone()));
                // Within one pipeline each credential has its own Secret (validation says so).
                let mut secrets = BTreeSet::new();
                for s in &mut stages {
                    if let Some(secret) = &s.credential_secret
                        && !secrets.insert(secret.clone())
                    {
                        s.credential_secret = None;
                    }
                }
                PipelineAsk {
                    namespace,
                    name,
                    stages,
                }
            })
            .collect()
    })
}

/// A permissive guardrail: everything the stages ask for is within it, so only the floor and
/// the design (names, claims, produces) stand between tenants.
fn guardrail() -> AccessGuardrail {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AccessGuardrail",
        "metadata": {"name": "permissive"},
        "spec": {"roles": {"training": {
            "kubernetes": [
                {"apiGroups": [""], "resources": ["configmaps", "secrets", "pods", "serviceaccounts", "serviceaccounts/token"],
                 "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                {"apiGroups": ["apps", "batch"], "resources": ["deployments", "jobs"], "verbs": ["create", "patch"]},
                {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["patch"]},
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["patch"]},
                {"apiGroups": ["portcullis.dev"], "resources": ["aipipelines"], "verbs": ["patch"]},
            ],
            "vault": {"paths": [{"pattern": "database/creds/{namespace}_{pipeline}_*", "capabilities": ["read"]}]},
        }}},
    }))
    .expect("the guardrail")
}

fn pipeline(ask: &PipelineAsk, all: &[PipelineAsk], namespaces: &[String]) -> AIPipeline {
    let ns = &namespaces[ask.namespace];
    let stages: Vec<_> = ask
        .stages
        .iter()
        .map(|s| {
            // A credential path of this pipeline, or (an attack) of another.
            let of = s.credential_of.map_or(ask, |i| &all[i % all.len()]);
            let path = format!(
                "database/creds/{}_{}_{}",
                namespaces[of.namespace], of.name, s.name
            );
            let mut permissions = vec![json!({
                "apiGroups": [""], "resources": ["pods"], "verbs": ["create"],
            }), json!({
                "apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["patch"],
            }), json!({
                "apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["patch"],
            }), json!({
                "apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["patch"],
            }), json!({
                "apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"],
            })];
            if !s.read_secrets.is_empty() {
                permissions.push(json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": s.read_secrets, "verbs": ["get"]}));
            }
            if !s.read_configmaps.is_empty() {
                permissions.push(json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": s.read_configmaps, "verbs": ["get"]}));
            }
            if !s.write_configmaps.is_empty() {
                permissions.push(json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": s.write_configmaps, "verbs": ["update", "patch"]}));
            }
            let produces: Vec<String> = if s.produces {
                s.write_configmaps.iter().map(|c| format!("configmaps/{c}")).collect()
            } else {
                Vec::new()
            };
            let mut stage = json!({
                "name": s.name, "role": "Training", "permissions": permissions, "produces": produces,
            });
            if let Some(secret) = &s.credential_secret {
                stage["vault"] = json!({"credentials": [{
                    "name": "db", "path": path, "ttl": "10m", "secretName": secret,
                }]});
            }
            stage
        })
        .collect();
    let mut p: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": ask.name, "namespace": ns},
        "spec": {"stages": stages},
    }))
    .expect("a pipeline");
    // Later pipelines in the list were created later: the first claim wins.
    let index = all.iter().position(|a| std::ptr::eq(a, ask)).unwrap_or(0);
    p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(
            1_700_000_000 + i64::try_from(index).unwrap_or(0),
        )
        .expect("a timestamp"),
    ));
    p
}

/// What one triple owns in the cluster.
#[derive(Debug, Default)]
struct Owned {
    namespace: String,
    pipeline: String,
    stage: String,
    service_account: String,
    /// The Secrets its allowed credentials are delivered to.
    secrets: BTreeSet<String>,
    /// The ConfigMaps it reads by name (its inputs).
    inputs: BTreeSet<String>,
    /// What it declares it produces for the other stages of its pipeline.
    produces: BTreeSet<String>,
}

fn owned(plan: &Plan, pipeline: &AIPipeline) -> Vec<Owned> {
    plan.stages
        .iter()
        .map(|s| {
            let spec = pipeline
                .spec
                .stages
                .iter()
                .find(|st| st.name == s.name)
                .expect("the stage");
            Owned {
                namespace: plan.namespace.clone(),
                pipeline: plan.pipeline.clone(),
                stage: s.name.clone(),
                service_account: s.service_account.clone(),
                secrets: plan
                    .vault
                    .credentials
                    .iter()
                    .filter(|c| c.stage == s.name)
                    .map(|c| c.secret_name.clone())
                    .collect(),
                inputs: plan
                    .decisions
                    .iter()
                    .filter(|d| d.stage == s.name && d.is_allowed())
                    .filter_map(|d| match &d.item {
                        Item::Kubernetes {
                            resource,
                            verb,
                            resource_names,
                            ..
                        } if resource == "configmaps" && verb == "get" => {
                            Some(resource_names.clone())
                        }
                        _ => None,
                    })
                    .flatten()
                    .collect(),
                produces: spec.produces.iter().cloned().collect(),
            }
        })
        .collect()
}

async fn apply(client: &kube::Client, plan: &Plan) {
    let pp = PostParams::default();
    for object in &plan.objects {
        let ns = &plan.namespace;
        match object {
            Object::ServiceAccount(o) => {
                Api::<ServiceAccount>::namespaced(client.clone(), ns)
                    .create(&pp, o)
                    .await
                    .expect("create the ServiceAccount");
            }
            Object::Role(o) => {
                Api::<Role>::namespaced(client.clone(), ns)
                    .create(&pp, o)
                    .await
                    .expect("create the Role");
            }
            Object::RoleBinding(o) => {
                Api::<RoleBinding>::namespaced(client.clone(), ns)
                    .create(&pp, o)
                    .await
                    .expect("create the RoleBinding");
            }
            Object::NetworkPolicy(_) => {}
        }
    }
}

/// One request `a` must not be allowed: (verb, group, resource, subresource, name, namespace).
type Request = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<String>,
    String,
);

/// Everything of `b` that `a` must not be able to touch.
fn forbidden(a: &Owned, b: &Owned) -> Vec<Request> {
    let ns = b.namespace.clone();
    let mut out: Vec<Request> = Vec::new();
    for secret in &b.secrets {
        for verb in ["get", "update", "patch", "delete"] {
            out.push((verb, "", "secrets", None, Some(secret.clone()), ns.clone()));
        }
    }
    out.push((
        "create",
        "",
        "serviceaccounts",
        Some("token"),
        Some(b.service_account.clone()),
        ns.clone(),
    ));
    out.push((
        "impersonate",
        "",
        "serviceaccounts",
        None,
        Some(b.service_account.clone()),
        ns.clone(),
    ));
    for resource in ["roles", "rolebindings"] {
        for verb in ["update", "patch", "delete"] {
            out.push((
                verb,
                "rbac.authorization.k8s.io",
                resource,
                None,
                Some(b.service_account.clone()),
                ns.clone(),
            ));
        }
    }
    // A stage that can start or rewrite pods runs as any ServiceAccount of the namespace.
    out.push(("create", "", "pods", None, None, ns.clone()));
    out.push(("patch", "apps", "deployments", None, None, ns.clone()));
    out.push((
        "patch",
        "networking.k8s.io",
        "networkpolicies",
        None,
        None,
        ns.clone(),
    ));
    out.push((
        "patch",
        "portcullis.dev",
        "aipipelines",
        None,
        None,
        ns.clone(),
    ));
    // Another stage's inputs, unless the writer declares the flow (same pipeline only).
    if a.namespace == b.namespace && a.pipeline == b.pipeline {
        for input in &b.inputs {
            if a.produces.contains(&format!("configmaps/{input}")) {
                continue;
            }
            for verb in ["update", "patch"] {
                out.push((
                    verb,
                    "",
                    "configmaps",
                    None,
                    Some(input.clone()),
                    ns.clone(),
                ));
            }
        }
    }
    out
}

async fn check(asks: Vec<PipelineAsk>) -> Result<(), TestCaseError> {
    let client = control_plane().client().await;
    let namespaces = vec![
        temp_namespace(&client, "escapes", &[("tier", "ml")]).await,
        temp_namespace(&client, "escapes", &[("tier", "ml")]).await,
    ];
    let pipelines: Vec<AIPipeline> = asks
        .iter()
        .map(|a| pipeline(a, &asks, &namespaces))
        .collect();
    let claims = CredentialClaims::from_pipelines(&pipelines, "default");
    let guardrails = [guardrail()];
    let mut triples: Vec<Owned> = Vec::new();
    // Stage objects are named <pipeline>-<stage>: a pipeline whose names another already took
    // in the namespace is refused (as `plan` refuses it), not applied.
    let mut taken: BTreeMap<(String, String), String> = BTreeMap::new();
    for p in &pipelines {
        let plan = plan::validate_and_build_with(
            p,
            "default",
            &BTreeMap::from([("tier".to_string(), "ml".to_string())]),
            &guardrails,
            PlanOptions {
                claims: Some(&claims),
                ..PlanOptions::default()
            },
        )
        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let clash = plan.stages.iter().any(|s| {
            taken
                .get(&(plan.namespace.clone(), s.service_account.clone()))
                .is_some_and(|owner| *owner != plan.pipeline)
        });
        if clash {
            continue;
        }
        for s in &plan.stages {
            taken.insert(
                (plan.namespace.clone(), s.service_account.clone()),
                plan.pipeline.clone(),
            );
        }
        apply(&client, &plan).await;
        triples.extend(owned(&plan, p));
    }
    for a in &triples {
        for b in &triples {
            if std::ptr::eq(a, b) {
                continue;
            }
            for (verb, group, resource, sub, name, ns) in forbidden(a, b) {
                let allowed = can_i(
                    &client,
                    &a.namespace,
                    &a.service_account,
                    verb,
                    group,
                    resource,
                    sub,
                    name.as_deref(),
                    Some(&ns),
                )
                .await;
                prop_assert!(
                    !allowed,
                    "{}/{}/{} may {verb} {resource}{} {} in {ns}, which belongs to {}/{}/{}",
                    a.namespace,
                    a.pipeline,
                    a.stage,
                    sub.map(|s| format!("/{s}")).unwrap_or_default(),
                    name.as_deref().unwrap_or("(any)"),
                    b.namespace,
                    b.pipeline,
                    b.stage
                );
            }
        }
    }
    Ok(())
}

#[test]
fn no_triple_gets_anything_another_triple_owns() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        // Each case builds a cluster scenario; shrinking re-runs it many times.
        max_shrink_iters: 16,
        ..Config::default()
    });
    let result = runner.run(&scenario(), |asks| runtime.block_on(check(asks)));
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn claiming(ns: &str, name: &str) -> AIPipeline {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"stages": [{
            "name": "train",
            "role": "Training",
            "permissions": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["shared-db"], "verbs": ["get"]}],
            "vault": {"credentials": [{
                "name": "s3", "path": format!("aws/creds/{ns}_{name}_s3"), "ttl": "10m", "secretName": "shared-db",
            }]},
        }]},
    }))
    .expect("a pipeline")
}

/// Class 9 through the operator: two pipelines of one namespace name the same credential
/// Secret. The first keeps it; the second is denied (`CrossTenantCredential`, naming the first)
/// and the authorizer gives its ServiceAccount nothing on that Secret.
#[tokio::test]
async fn the_operator_gives_a_credential_secret_only_to_the_pipeline_that_claimed_it_first() {
    let (client, ns, _) = guarded_namespace("escapes-claims").await;
    let _op = Operator::start("operator", &ns, None);
    create_pipeline(&client, &claiming(&ns, "first")).await;
    let reader = |sa: &'static str| {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            can_i(
                &client,
                &ns,
                sa,
                "get",
                "",
                "secrets",
                None,
                Some("shared-db"),
                Some(&ns),
            )
            .await
        }
    };
    wait_for(
        "the first pipeline's stage reads its Secret",
        WAIT,
        || async { reader("first-train").await.then_some(()) },
    )
    .await;
    create_pipeline(&client, &claiming(&ns, "second")).await;
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let denied = wait_for("the second pipeline's credential denied", WAIT, || async {
        let p = api.get("second").await.ok()?;
        p.status?
            .stages
            .iter()
            .flat_map(|s| s.denied_items.clone())
            .find(|d| d.reason == "CrossTenantCredential")
    })
    .await;
    assert!(
        denied.message.contains(&format!("{ns}/first")),
        "{}",
        denied.message
    );
    assert!(
        !reader("second-train").await,
        "the second pipeline reads the first's Secret"
    );
    assert!(
        reader("first-train").await,
        "the first pipeline keeps its Secret"
    );
    // can-i plans with the same claims: the second pipeline's plan holds no grant on the
    // Secret, so the cluster agrees with it.
    let kubeconfig = control_plane().kubeconfig().display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["can-i", "second", "-n", &ns, "--kubeconfig", &kubeconfig])
        .output()
        .expect("can-i runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains("shared-db in"), "{text}");
}
