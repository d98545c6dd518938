//! Helpers for tests against the control plane.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

/// Creates a namespace with a unique name starting with `prefix` and the given labels (the API
/// server adds `kubernetes.io/metadata.name: <name>` itself), and returns its name. `prefix` must be a DNS-1123 label of at most 40 characters.
pub(crate) async fn temp_namespace(
    client: &kube::Client,
    prefix: &str,
    labels: &[(&str, &str)],
) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    assert!(
        !prefix.is_empty()
            && prefix.len() <= 40
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "namespace prefix {prefix:?} must be a DNS-1123 label of at most 40 characters"
    );
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!(
        "{}-{n}-{:05x}",
        prefix.trim_end_matches('-'),
        (nanos ^ std::process::id().rotate_left(13)) & 0xfffff
    );
    let all_labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(all_labels),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    name
}

/// Calls `f` every 100 ms until it returns `Some`, and returns that value. Panics with `what`
/// if that does not happen within `timeout`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = f().await {
            return value;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether ServiceAccount `namespace_of_sa/sa_name` may `verb` the `resource` (of API `group`,
/// `""` for core; optionally its `subresource`, the object `name`, in `namespace` or
/// cluster-wide when `None`), according to a `SubjectAccessReview` the admin `client` creates.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn can_i(
    client: &kube::Client,
    namespace_of_sa: &str,
    sa_name: &str,
    verb: &str,
    group: &str,
    resource: &str,
    subresource: Option<&str>,
    name: Option<&str>,
    namespace: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        metadata: ObjectMeta::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{namespace_of_sa}:{sa_name}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace_of_sa}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(Into::into),
                name: name.map(Into::into),
                namespace: namespace.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    };
    let created = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap_or_else(|e| panic!("create a SubjectAccessReview: {e}"));
    created.status.is_some_and(|s| s.allowed)
}

/// A bound token (one hour, the API server's audience) for ServiceAccount `ns/sa`, from a
/// `TokenRequest`.
pub(crate) async fn service_account_token(client: &kube::Client, ns: &str, sa: &str) -> String {
    service_account_token_with(client, ns, sa, &[], 3600).await
}

/// A token for ServiceAccount `ns/sa` for `audiences` (none: the API server's), valid `seconds`:
/// what the kubelet writes into a projected token volume.
pub(crate) async fn service_account_token_with(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    audiences: &[&str],
    seconds: i64,
) -> String {
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(seconds),
            bound_object_ref: None,
        },
        status: None,
    };
    let created = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("create a token for ServiceAccount {ns}/{sa}: {e}"));
    created
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("the TokenRequest for {ns}/{sa} returned no token"))
}

/// A Deployment `name` in `ns` that a credential's `restartTargets` can name (nothing runs its
/// pods: the test control plane has no scheduler).
pub(crate) async fn restart_target(
    client: &kube::Client,
    ns: &str,
    name: &str,
    service_account: &str,
) {
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    // The operator restarts only workloads that run as one of the pipeline's
                    // stages (ForeignWorkload).
                    "spec": {
                        "serviceAccountName": service_account,
                        "containers": [{"name": "app", "image": "example.invalid/app:1"}],
                    },
                },
            },
        }))
        .expect("a Deployment");
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap_or_else(|e| panic!("create Deployment {ns}/{name}: {e}"));
}

/// The repository's root.
pub(crate) fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the repository, as text.
pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A self-signed serving certificate for 127.0.0.1: (certificate, key).
pub(crate) fn serving_certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("webhook.crt"), dir.join("webhook.key"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=portcullis-audit-webhook"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl req");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}
