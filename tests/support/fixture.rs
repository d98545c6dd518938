//! The set-up most cluster tests share: a namespace with the example guardrails, an example
//! pipeline in it and an operator watching it ([`with_pipeline`]), and the waits and
//! conditions they then look at.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, GetParams, PostParams};
use kube::core::Request;
use kube::{Client, ResourceExt};
use portcullis::api::{AIPipeline, AccessGuardrail};
use serde_json::Value;

use super::helpers::{read, temp_namespace, wait_for};
use super::operator::{Operator, create_guardrails, guardrails_for};

/// How long a test waits for the operator to converge.
pub(crate) const WAIT: Duration = Duration::from_secs(90);

/// A running operator on one example pipeline in a namespace of its own.
pub(crate) struct Fixture {
    pub client: Client,
    /// The test's namespace: the example guardrails select it, the operator watches it.
    pub ns: String,
    /// The example guardrails, renamed for `ns`.
    pub guardrails: Vec<AccessGuardrail>,
    /// The pipeline as the API server returned it on creation.
    pub pipeline: AIPipeline,
    pub op: Operator,
}

/// A new namespace starting with `ns_prefix`, the example guardrails for it, an operator
/// watching it (no leader election) and the example pipeline at `example_path` (relative to the
/// repository) created in it. It does not wait: see [`Fixture::wait_ready`].
pub(crate) async fn with_pipeline(ns_prefix: &str, example_path: &str) -> Fixture {
    let (client, ns, guardrails) = guarded_namespace(ns_prefix).await;
    let op = Operator::start("operator", &ns, None);
    let pipeline = create_pipeline(&client, &example(example_path, &ns)).await;
    Fixture {
        client,
        ns,
        guardrails,
        pipeline,
        op,
    }
}

/// A client, and a new namespace starting with `ns_prefix` with the example guardrails (returned
/// too) selecting it.
pub(crate) async fn guarded_namespace(ns_prefix: &str) -> (Client, String, Vec<AccessGuardrail>) {
    let client = super::control_plane().client().await;
    let ns = temp_namespace(&client, ns_prefix, &[]).await;
    let guardrails = guardrails_for(&ns);
    create_guardrails(&client, &guardrails).await;
    (client, ns, guardrails)
}

impl Fixture {
    /// The pipeline's name.
    pub(crate) fn name(&self) -> String {
        self.pipeline.name_any()
    }

    /// Waits until the pipeline describes its current generation with Ready = `ready`.
    pub(crate) async fn wait_ready(&self, ready: &str) -> AIPipeline {
        wait_ready(&self.client, &self.ns, &self.name(), ready, &self.op).await
    }

    /// [`wait_converged`] for the pipeline (the fixture's operator runs without Vault).
    pub(crate) async fn wait_converged(&self) -> AIPipeline {
        wait_converged(&self.client, &self.ns, &self.name(), &self.op).await
    }
}

/// The example pipeline at `path` (relative to the repository), in `namespace`.
pub(crate) fn example(path: &str, namespace: &str) -> AIPipeline {
    let mut p: AIPipeline = serde_saphyr::from_str(&read(path)).expect("example parses");
    p.metadata.namespace = Some(namespace.into());
    p
}

/// Creates `pipeline` in its namespace and returns what the API server stored.
pub(crate) async fn create_pipeline(client: &Client, pipeline: &AIPipeline) -> AIPipeline {
    let api: Api<AIPipeline> = Api::namespaced(
        client.clone(),
        pipeline.metadata.namespace.as_deref().expect("namespace"),
    );
    api.create(&PostParams::default(), pipeline)
        .await
        .expect("pipeline created")
}

/// The pipeline's condition of type `type_`.
pub(crate) fn condition<'a>(p: &'a AIPipeline, type_: &str) -> Option<&'a Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits (at most [`WAIT`]) until AIPipeline `namespace/name` describes its current generation
/// with Ready = `ready`; panics with the tail of `op`'s log otherwise.
pub(crate) async fn wait_ready(
    client: &Client,
    namespace: &str,
    name: &str,
    ready: &str,
    op: &Operator,
) -> AIPipeline {
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), namespace);
    let what = format!("AIPipeline {namespace}/{name} Ready={ready}");
    let found = tokio::time::timeout(
        WAIT,
        wait_for(&what, WAIT, || {
            let api = api.clone();
            async move {
                let p = api.get(name).await.ok()?;
                let current = p.status.as_ref()?.observed_generation == p.metadata.generation;
                (current && condition(&p, "Ready").is_some_and(|c| c.status == ready)).then_some(p)
            }
        }),
    )
    .await;
    found.unwrap_or_else(|_| panic!("{what} timed out; operator log:\n{}", op.log()))
}

/// Requests on the AIPipelines of namespace `ns`, for tests that look at a pipeline exactly as
/// the API server serves it (JSON, not the typed [`AIPipeline`]), as Argo CD sees it.
pub(crate) fn pipelines_request(ns: &str) -> Request {
    Request::new(format!(
        "/apis/portcullis.dev/v1alpha1/namespaces/{ns}/aipipelines"
    ))
}

/// AIPipeline `ns/name` as the API server serves it.
pub(crate) async fn get_raw(client: &Client, ns: &str, name: &str) -> Value {
    let request = pipelines_request(ns)
        .get(name, &GetParams::default())
        .expect("request");
    client
        .request::<Value>(request)
        .await
        .unwrap_or_else(|e| panic!("get AIPipeline {ns}/{name}: {e}"))
}

/// Waits (at most [`WAIT`]) until AIPipeline `ns/name`, reconciled by an operator that runs
/// without Vault, has converged for its current generation: `Ready=True`, or, when its plan
/// involves Vault (the status has a `VaultSynced` condition), `Ready=False` with reason
/// `VaultNotConfigured` (Ready means the credentials are delivered too). Returns it as the API
/// server serves it.
pub(crate) async fn wait_converged_raw(
    client: &Client,
    ns: &str,
    name: &str,
    op: &Operator,
) -> Value {
    let what = format!("AIPipeline {ns}/{name} converged without Vault");
    let found = tokio::time::timeout(
        WAIT,
        wait_for(&what, WAIT, || async move {
            let p = get_raw(client, ns, name).await;
            let current = p["status"]["observedGeneration"] == p["metadata"]["generation"];
            let conditions = p["status"]["conditions"].as_array()?;
            let involves_vault = conditions.iter().any(|c| c["type"] == "VaultSynced");
            let (status, reason) = if involves_vault {
                ("False", "VaultNotConfigured")
            } else {
                ("True", "Reconciled")
            };
            let is = conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == status && c["reason"] == reason);
            (current && is).then_some(p)
        }),
    )
    .await;
    found.unwrap_or_else(|_| panic!("{what} timed out; operator log:\n{}", op.log()))
}

/// [`wait_converged_raw`], typed.
pub(crate) async fn wait_converged(
    client: &Client,
    ns: &str,
    name: &str,
    op: &Operator,
) -> AIPipeline {
    serde_json::from_value(wait_converged_raw(client, ns, name, op).await).expect("an AIPipeline")
}

/// [`wait_ready`], returning the pipeline as the API server serves it.
pub(crate) async fn wait_ready_raw(
    client: &Client,
    ns: &str,
    name: &str,
    ready: &str,
    op: &Operator,
) -> Value {
    let what = format!("AIPipeline {ns}/{name} Ready={ready}");
    let found = tokio::time::timeout(
        WAIT,
        wait_for(&what, WAIT, || async move {
            let p = get_raw(client, ns, name).await;
            let current = p["status"]["observedGeneration"] == p["metadata"]["generation"];
            let is = p["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == ready);
            (current && is).then_some(p)
        }),
    )
    .await;
    found.unwrap_or_else(|_| panic!("{what} timed out; operator log:\n{}", op.log()))
}
