//! Enforcement at admission through the real API server: the ValidatingAdmissionPolicy the
//! operator keeps per namespace with AIPipelines refuses pods and workloads that borrow a
//! stage's identity, and allows the others.

mod support;

use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::{Operator, WAIT, create_pipeline, example, guarded_namespace, wait_for};

const INGEST: &str = "fraud-detector-ingest";
const SERVE: &str = "fraud-detector-serve";

/// The labels a pod of the fraud detector's ingest stage carries.
fn ingest_labels() -> Value {
    json!({"app": "fraud-ingest", "portcullis.dev/pipeline": "fraud-detector", "portcullis.dev/stage": "ingest"})
}

/// The labels a pod of the fraud detector's serve stage carries.
fn serve_labels() -> Value {
    json!({"app": "fraud-scorer", "portcullis.dev/pipeline": "fraud-detector", "portcullis.dev/stage": "serve"})
}

fn pod_spec(service_account: &str, extra: Value) -> Value {
    let mut spec = json!({
        "serviceAccountName": service_account,
        "containers": [{"name": "main", "image": "registry.example/worker:1"}],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    spec
}

fn pod(name: &str, labels: Value, service_account: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": pod_spec(service_account, json!({})),
    }))
    .unwrap()
}

fn deployment(name: &str, labels: Value, spec: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"run": name}},
            "template": {"metadata": {"labels": merged(&labels, json!({"run": name}))}, "spec": spec},
        },
    }))
    .unwrap()
}

fn merged(a: &Value, b: Value) -> Value {
    let mut out = a.as_object().cloned().unwrap_or_default();
    out.extend(b.as_object().cloned().unwrap_or_default());
    Value::Object(out)
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

/// What the API server says to a dry-run create: `Ok(())` or the refusal's message.
async fn admit<K>(api: &Api<K>, object: &K) -> Result<(), String>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&dry_run(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} ({})", e.message, e.code)),
        Err(e) => panic!("dry-run create: {e}"),
    }
}

/// A namespace with the example guardrails, an operator and the fraud detector in it, once the
/// API server enforces the operator's policy there.
async fn enforced(prefix: &str) -> (Client, String, Operator) {
    let (client, ns, _) = guarded_namespace(prefix).await;
    let op = Operator::start_with(
        "operator",
        &ns,
        None,
        tempfile::tempdir().unwrap(),
        &["--admission-policies".to_string()],
    );
    // The example's Vault paths name its own namespace (as the guardrails' placeholders expect):
    // moved to this one, so that its credentials (and their Secrets) are allowed here.
    let mut example = example("examples/pipelines/fraud-detector.yaml", &ns);
    let moved = serde_json::to_string(&example.spec)
        .unwrap()
        .replace("ml-fraud", &ns);
    example.spec = serde_json::from_str(&moved).unwrap();
    create_pipeline(&client, &example).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let unlabelled = pod("probe", json!({}), INGEST);
    wait_for(
        "the API server to enforce the namespace's policy",
        WAIT,
        || {
            let (pods, unlabelled) = (pods.clone(), unlabelled.clone());
            async move {
                admit(&pods, &unlabelled)
                    .await
                    .err()
                    .filter(|m| m.contains("ValidatingAdmissionPolicy"))
                    .map(|_| ())
            }
        },
    )
    .await;
    (client, ns, op)
}

/// A client acting as the stage ServiceAccount `sa` of `ns`, which a Role lets create pods and
/// deployments (as a guardrail allowing workload creation would).
async fn as_stage(client: &Client, ns: &str, sa: &str) -> Client {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": format!("test-workloads-{sa}")},
        "rules": [{"apiGroups": ["", "apps"], "resources": ["pods", "deployments"], "verbs": ["create", "update", "patch"]}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("test-workloads-{sa}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("test-workloads-{sa}")},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    support::control_plane()
        .client_as(
            &format!("system:serviceaccount:{ns}:{sa}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{ns}"),
            ],
        )
        .await
}

#[tokio::test]
async fn a_pod_running_as_a_stage_account_must_carry_the_stage_labels() {
    let (client, ns, _op) = enforced("adm-labels").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let refused = admit(&pods, &pod("bare", json!({"app": "fraud-ingest"}), INGEST))
        .await
        .expect_err("a pod as the ingest account without the stage labels is refused");
    assert!(
        refused.contains(INGEST) && refused.contains("portcullis.dev/stage=ingest"),
        "{refused}"
    );
    admit(&pods, &pod("labelled", ingest_labels(), INGEST))
        .await
        .expect("a pod as the ingest account with the stage labels is allowed");

    // The same for a workload's pod template, and a CronJob's nested one.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let refused = admit(
        &deployments,
        &deployment("unlabelled", json!({}), pod_spec(INGEST, json!({}))),
    )
    .await
    .expect_err("a Deployment as the ingest account without the labels is refused");
    assert!(
        refused.contains("must carry that stage's labels"),
        "{refused}"
    );
    admit(
        &deployments,
        &deployment("labelled", ingest_labels(), pod_spec(INGEST, json!({}))),
    )
    .await
    .expect("a Deployment as the ingest account with the labels is allowed");
    let cron: CronJob = serde_json::from_value(json!({
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {
            "spec": merged(&pod_spec(INGEST, json!({})), json!({"restartPolicy": "Never"})),
        }}}},
    }))
    .unwrap();
    admit(&Api::namespaced(client.clone(), &ns), &cron)
        .await
        .expect_err("a CronJob as the ingest account without the labels is refused");

    // Other accounts are not concerned.
    admit(&pods, &pod("plain", json!({"app": "other"}), "default"))
        .await
        .expect("a pod of no stage is allowed");
}

#[tokio::test]
async fn a_pod_with_a_stage_labels_must_run_as_the_stage_account() {
    let (client, ns, _op) = enforced("adm-identity").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // Selected by the ingest stage's NetworkPolicy (its podSelector), running as someone else.
    let refused = admit(&pods, &pod("borrower", ingest_labels(), "default"))
        .await
        .expect_err("a pod matching the ingest stage's podSelector as `default` is refused");
    assert!(
        refused.contains(INGEST) && refused.contains("runs as default"),
        "{refused}"
    );
    // The ingest stage's identity labels alone.
    let identity =
        json!({"portcullis.dev/pipeline": "fraud-detector", "portcullis.dev/stage": "ingest"});
    let refused = admit(&pods, &pod("relabelled", identity, "default"))
        .await
        .expect_err("a pod with the ingest stage's identity labels as `default` is refused");
    assert!(refused.contains(INGEST), "{refused}");
    admit(&pods, &pod("own", ingest_labels(), INGEST))
        .await
        .expect("the stage's own pod is allowed");

    // Relabelling a pod into a stage is an update the policy checks.
    let created = pods
        .create(
            &PostParams::default(),
            &pod("later", json!({"app": "other"}), "default"),
        )
        .await
        .expect("a pod of no stage is created");
    let mut relabelled = created.clone();
    relabelled.metadata.labels = Some(serde_json::from_value(ingest_labels()).unwrap());
    let refused = pods
        .replace("later", &PostParams::default(), &relabelled)
        .await
        .expect_err("relabelling a pod into the ingest stage is refused");
    assert!(refused.to_string().contains(INGEST), "{refused}");
    pods.delete("later", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stage_creates_workloads_only_as_itself_with_its_own_secrets() {
    let (client, ns, _op) = enforced("adm-actor").await;
    let ingest = as_stage(&client, &ns, INGEST).await;
    let deployments: Api<Deployment> = Api::namespaced(ingest.clone(), &ns);

    admit(
        &deployments,
        &deployment("mine", ingest_labels(), pod_spec(INGEST, json!({}))),
    )
    .await
    .expect("the ingest stage may create its own Deployment");
    let refused = admit(
        &deployments,
        &deployment("theirs", serve_labels(), pod_spec(SERVE, json!({}))),
    )
    .await
    .expect_err("the ingest stage may not create a Deployment running as the serve account");
    assert!(
        refused.contains(&format!("must run as {INGEST}, not as {SERVE}")),
        "{refused}"
    );
    let refused = admit(
        &deployments,
        &deployment("as-default", json!({}), pod_spec("default", json!({}))),
    )
    .await
    .expect_err("the ingest stage may not create a Deployment running as `default`");
    assert!(refused.contains("not as default"), "{refused}");

    // Secrets: the stage's own credential Secret, and another stage's.
    let with_secret = |secret: &str| {
        pod_spec(
            INGEST,
            json!({"volumes": [{"name": "creds", "secret": {"secretName": secret}}]}),
        )
    };
    admit(
        &deployments,
        &deployment(
            "own-secret",
            ingest_labels(),
            with_secret("fraud-ingest-db"),
        ),
    )
    .await
    .expect("the ingest stage may mount its own credential Secret");
    let refused = admit(
        &deployments,
        &deployment(
            "foreign-secret",
            ingest_labels(),
            with_secret("fraud-train-artifacts"),
        ),
    )
    .await
    .expect_err("the ingest stage may not mount the train stage's Secret");
    assert!(refused.contains("fraud-train-artifacts"), "{refused}");
    let env_secret = pod_spec(
        INGEST,
        json!({"containers": [{"name": "main", "image": "registry.example/worker:1",
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "helm-release", "key": "token"}}}]}]}),
    );
    let refused = admit(
        &deployments,
        &deployment("env-secret", ingest_labels(), env_secret),
    )
    .await
    .expect_err("the ingest stage may not read another Secret through env");
    assert!(refused.contains("env of container main"), "{refused}");

    // The admin is not a stage: the same Deployment is allowed to it.
    admit(
        &Api::namespaced(client.clone(), &ns),
        &deployment(
            "admin",
            ingest_labels(),
            with_secret("fraud-train-artifacts"),
        ),
    )
    .await
    .expect(
        "a Deployment created by someone who is not a stage is not limited to a stage's Secrets",
    );
}

#[tokio::test]
async fn a_namespace_without_pipelines_keeps_no_policy() {
    let (client, ns, _op) = enforced("adm-prune").await;
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let name = format!("portcullis-workloads-{ns}");
    policies
        .get(&name)
        .await
        .expect("the namespace's policy exists");

    Api::<AIPipeline>::namespaced(client.clone(), &ns)
        .delete("fraud-detector", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the namespace's policy to be deleted", WAIT, || {
        let (policies, name) = (policies.clone(), name.clone());
        async move { policies.get_opt(&name).await.ok()?.is_none().then_some(()) }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_for("the API server to stop enforcing it", WAIT, || {
        let pods = pods.clone();
        async move {
            admit(&pods, &pod("free", ingest_labels(), "default"))
                .await
                .ok()
        }
    })
    .await;
}
