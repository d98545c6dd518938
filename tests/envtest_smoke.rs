//! The envtest harness works: a real Kubernetes control plane (1.36 by default) with the CRDs installed,
//! server-side apply, RBAC seen through SubjectAccessReview and impersonation, garbage
//! collection by the controller manager, and TokenRequest/TokenReview. Each test uses its own
//! namespace on the control plane shared by this test binary.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use portcullis::api::AIPipeline;
use support::{can_i, control_plane, service_account_token, temp_namespace, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    }
}

async fn create_service_account(client: &kube::Client, ns: &str, name: &str) {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta(name, ns),
                ..Default::default()
            },
        )
        .await
        .expect("create the ServiceAccount");
}

fn forbidden(result: Result<impl std::fmt::Debug, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test]
async fn crds_are_installed_and_a_pipeline_round_trips() {
    let cp = control_plane();
    let client = cp.client().await;

    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in [
        "aipipelines.portcullis.dev",
        "accessguardrails.portcullis.dev",
    ] {
        let crd = crds.get(name).await.expect("the CRD is installed");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "CRD {name} is Established");
    }

    let ns = temp_namespace(&client, "smoke-crd", &[("portcullis.dev/tier", "ml")]).await;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/pipelines/fraud-detector.yaml"
    );
    let text = std::fs::read_to_string(path).expect("read the example pipeline");
    let mut pipeline: AIPipeline = serde_saphyr::from_str(&text).expect("parse the example");
    pipeline.metadata.namespace = Some(ns.clone());

    let api = Api::<AIPipeline>::namespaced(client.clone(), &ns);
    let created = api
        .create(&PostParams::default(), &pipeline)
        .await
        .expect("create the AIPipeline (plain create)");
    assert!(created.metadata.uid.is_some());

    let read = api
        .get("fraud-detector")
        .await
        .expect("read the AIPipeline");
    assert_eq!(read.metadata.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(read.spec, pipeline.spec, "the spec round-trips unchanged");
    let stages: Vec<&str> = read.spec.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(stages, ["ingest", "train", "serve"]);
}

#[tokio::test]
async fn server_side_apply_of_a_configmap() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = temp_namespace(&client, "smoke-ssa", &[]).await;
    let api = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let params = PatchParams::apply("portcullis-envtest").force();

    for value in ["1", "2"] {
        let config_map = ConfigMap {
            metadata: meta("applied", &ns),
            data: Some(BTreeMap::from([("key".to_string(), value.to_string())])),
            ..Default::default()
        };
        let applied = api
            .patch("applied", &params, &Patch::Apply(&config_map))
            .await
            .expect("server-side apply the ConfigMap");
        assert_eq!(
            applied
                .data
                .as_ref()
                .and_then(|d| d.get("key"))
                .map(String::as_str),
            Some(value)
        );
    }

    let read = api.get("applied").await.expect("read the ConfigMap");
    assert_eq!(read.data.unwrap()["key"], "2");
    let managers: Vec<String> = read
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "portcullis-envtest"),
        "the field manager is recorded: {managers:?}"
    );
}

#[tokio::test]
async fn subject_access_review_follows_rbac() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = temp_namespace(&client, "smoke-sar", &[]).await;
    create_service_account(&client, &ns, "reader").await;

    let can = |verb: &'static str, resource: &'static str| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            can_i(
                &client,
                &ns,
                "reader",
                verb,
                "",
                resource,
                None,
                None,
                Some(&ns),
            )
            .await
        }
    };
    assert!(
        !can("get", "secrets").await,
        "a fresh ServiceAccount cannot get secrets"
    );
    assert!(!can("get", "configmaps").await);

    Api::<Role>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("read-configmaps", &ns),
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec!["".into()]),
                    resources: Some(vec!["configmaps".into()]),
                    verbs: vec!["get".into()],
                    ..Default::default()
                }]),
            },
        )
        .await
        .expect("create the Role");
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("reader-reads-configmaps", &ns),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "read-configmaps".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "reader".into(),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                }]),
            },
        )
        .await
        .expect("create the RoleBinding");

    // The RBAC authorizer reads Roles from an informer cache: wait for it to catch up.
    wait_for(
        "the RoleBinding to allow get configmaps",
        TIMEOUT,
        || async { can("get", "configmaps").await.then_some(()) },
    )
    .await;
    assert!(!can("get", "secrets").await, "still no secrets");
    assert!(
        !can("list", "configmaps").await,
        "only the granted verb is allowed"
    );
    let other = temp_namespace(&client, "smoke-sar-other", &[]).await;
    assert!(
        !can_i(
            &client,
            &ns,
            "reader",
            "get",
            "",
            "configmaps",
            None,
            None,
            Some(&other)
        )
        .await,
        "a Role grants nothing in another namespace"
    );
}

#[tokio::test]
async fn impersonating_a_service_account_is_forbidden_from_secrets() {
    let cp = control_plane();
    let admin = cp.client().await;
    let ns = temp_namespace(&admin, "smoke-imp", &[]).await;
    create_service_account(&admin, &ns, "nobody").await;

    let user = format!("system:serviceaccount:{ns}:nobody");
    let group = format!("system:serviceaccounts:{ns}");
    let as_sa = cp
        .client_as(&user, &["system:serviceaccounts", &group])
        .await;
    let secrets = Api::<Secret>::namespaced(as_sa, &ns);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status.message.contains(&user),
                "the denial names the impersonated user: {}",
                status.message
            );
        }
        other => panic!("listing secrets as {user} must be forbidden, got {other:?}"),
    }
    // The admin itself may list them.
    Api::<Secret>::namespaced(admin, &ns)
        .list(&ListParams::default())
        .await
        .expect("the admin lists secrets");
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = temp_namespace(&client, "smoke-gc", &[]).await;
    let api = Api::<ConfigMap>::namespaced(client.clone(), &ns);

    let owner = api
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("owner", &ns),
                ..Default::default()
            },
        )
        .await
        .expect("create the owner");
    let mut dependent_meta = meta("dependent", &ns);
    dependent_meta.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().expect("the owner has a uid"),
        controller: Some(true),
        block_owner_deletion: Some(false),
    }]);
    api.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: dependent_meta,
            ..Default::default()
        },
    )
    .await
    .expect("create the dependent");

    api.delete("owner", &DeleteParams::default())
        .await
        .expect("delete the owner");
    wait_for(
        "the garbage collector to delete the dependent ConfigMap",
        TIMEOUT,
        || async { api.get_opt("dependent").await.ok()?.is_none().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn token_request_yields_a_token_that_token_review_authenticates() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = temp_namespace(&client, "smoke-token", &[]).await;
    create_service_account(&client, &ns, "pipeline").await;

    let token = service_account_token(&client, &ns, "pipeline").await;
    let review = Api::<TokenReview>::all(client.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                metadata: ObjectMeta::default(),
                spec: TokenReviewSpec {
                    token: Some(token.clone()),
                    audiences: None,
                },
                status: None,
            },
        )
        .await
        .expect("create the TokenReview");
    let status = review.status.expect("the TokenReview has a status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.expect("the TokenReview names the user");
    let expected = format!("system:serviceaccount:{ns}:pipeline");
    assert_eq!(user.username.as_deref(), Some(expected.as_str()));
    let groups = user.groups.unwrap_or_default();
    assert!(
        groups.contains(&format!("system:serviceaccounts:{ns}")),
        "{groups:?}"
    );

    // The token works as a bearer token; the ServiceAccount has no RBAC, so it is refused
    // by authorization (403), not by authentication (401).
    let as_sa = cp.client_with_token(&token).await;
    assert!(forbidden(
        Api::<ConfigMap>::namespaced(as_sa, &ns)
            .list(&ListParams::default())
            .await
    ));
}

#[tokio::test]
async fn apiserver_metrics_and_kubeconfig_are_available() {
    let cp = control_plane();
    assert!(cp.server_url().starts_with("https://127.0.0.1:"));
    let kubeconfig = std::fs::read_to_string(cp.kubeconfig()).expect("read the kubeconfig");
    assert!(kubeconfig.contains(cp.server_url()));

    let metrics = cp.apiserver_metrics().await;
    assert!(
        metrics.contains("apiserver_request_total"),
        "the metrics text has apiserver_request_total"
    );
}
