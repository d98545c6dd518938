//! A real Kubernetes control plane (1.36 by default) for integration tests: etcd, kube-apiserver and
//! kube-controller-manager from `hack/envtest.sh`, on loopback, one per test binary.
//!
//! ```ignore
//! mod support;
//!
//! #[tokio::test]
//! async fn something() {
//!     let cp = support::control_plane();
//!     let client = cp.client().await;
//!     let ns = support::temp_namespace(&client, "something", &[]).await;
//!     // ...
//! }
//!
//! #[tokio::test]
//! async fn an_operator_on_an_example() {
//!     // A namespace with the example guardrails, the pipeline created, an operator watching.
//!     let f = support::with_pipeline("drift", "examples/pipelines/fraud-detector.yaml").await;
//!     let live = f.wait_ready("True").await;
//!     // ... f.client, f.ns, f.op.records(), f.op.verify() ...
//! }
//! ```
//!
//! The one way to start the operator is [`Operator::launch`] (any arguments, optionally a
//! kubeconfig other than the admin's); [`Operator::start`] and [`Operator::start_with`] build the
//! usual arguments for it.
//!
//! Every server runs under a watchdog that stops it when the test process exits, also when it
//! panics or is killed; the temporary directory (data, certificates, logs) is removed then too,
//! unless `PORTCULLIS_ENVTEST_KEEP` is set. Each test should work in its own namespace.
#![allow(dead_code)]

/// ValidatingAdmissionPolicies that make the API server refuse a write ([`admission::Refusal`]).
pub(crate) mod admission;
mod control_plane;
mod fixture;
mod helpers;
/// A real OpenBao (Vault API) per test, behind a fault-injecting proxy.
pub(crate) mod openbao;
pub(crate) mod operator;
/// A throwaway PostgreSQL cluster per test process, for the database secrets engine.
pub(crate) mod postgres;
/// Processes under a watchdog that stops them when the test process exits; also for the
/// operator under test (`process::Server::spawn`, `stop`, `log_tail`).
pub(crate) mod process;

#[allow(unused_imports)]
pub(crate) use control_plane::{
    AuditWebhook, ControlPlane, ISSUER, control_plane, with_audit_webhook,
};
#[allow(unused_imports)]
pub(crate) use fixture::{
    Fixture, WAIT, condition, create_pipeline, example, get_raw, guarded_namespace,
    pipelines_request, wait_converged, wait_converged_raw, wait_ready, wait_ready_raw,
    with_pipeline,
};
#[allow(unused_imports)]
pub(crate) use helpers::{
    can_i, read, restart_target, root, service_account_token, service_account_token_with,
    serving_certificate, temp_namespace, wait_for,
};
#[allow(unused_imports)]
pub(crate) use operator::{Operator, create_guardrails, free_port, guardrails_for};
