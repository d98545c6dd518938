//! The AIPipeline admission webhook over TLS, called by the real API server: an over-asking
//! pipeline refused under an enforcing guardrail and accepted under an auditing one, accepted
//! with the operator down (failure policy Ignore), and certificates rotated without a refusal
//! being missed.
//!
//! The ValidatingWebhookConfiguration `portcullis` is one per cluster, so these tests take
//! turns ([`SERIAL`]).

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::{AIPipeline, AccessGuardrail, Enforcement};
use serde_json::json;
use support::{Operator, WAIT, example, guarded_namespace, temp_namespace, wait_for};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "portcullis-webhook-tls";

fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The fraud detector asking its ingest stage for `delete` on its ConfigMap, which the
/// example Ingestion guardrail does not allow.
fn over_asking(ns: &str) -> AIPipeline {
    let mut p = example("examples/pipelines/fraud-detector.yaml", ns);
    p.spec.stages[0].permissions[0].verbs.push("delete".into());
    p
}

async fn set_enforcement(client: &Client, guardrails: &[AccessGuardrail], e: Enforcement) {
    let api: Api<AccessGuardrail> = Api::all(client.clone());
    for g in guardrails {
        api.patch(
            &g.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"enforcement": e}})),
        )
        .await
        .expect("guardrail patched");
    }
}

/// What the API server says to a create of `pipeline`: `Ok` or the refusal's message.
async fn create(client: &Client, pipeline: &AIPipeline, dry_run: bool) -> Result<(), String> {
    let params = PostParams {
        dry_run,
        ..PostParams::default()
    };
    let ns = pipeline.namespace().unwrap();
    match Api::<AIPipeline>::namespaced(client.clone(), &ns)
        .create(&params, pipeline)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(e.message),
        Err(e) => panic!("create: {e}"),
    }
}

/// A namespace with the example guardrails set to `enforcement`, and an operator serving the
/// webhook (its own namespace holds the certificate Secret), once the API server calls it:
/// until a dry-run of the over-asking pipeline is refused when enforcing.
async fn serving(
    prefix: &str,
    enforcement: Enforcement,
    extra: &[&str],
) -> (Client, String, String, Vec<AccessGuardrail>, Operator) {
    let (client, ns, guardrails) = guarded_namespace(prefix).await;
    let op_ns = temp_namespace(&client, &format!("{prefix}-op"), &[]).await;
    let port = free_port();
    let mut args: Vec<String> = vec![
        "--lease-namespace".into(),
        op_ns.clone(),
        "--webhook-addr".into(),
        format!("127.0.0.1:{port}"),
        "--webhook-url".into(),
        format!("https://127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let op = Operator::start_with("operator", &ns, None, tempfile::tempdir().unwrap(), &args);
    set_enforcement(&client, &guardrails, Enforcement::Enforce).await;
    let probe = over_asking(&ns);
    wait_for("the API server to call the webhook", WAIT, || {
        let (client, probe) = (client.clone(), probe.clone());
        async move { create(&client, &probe, true).await.err().map(|_| ()) }
    })
    .await;
    set_enforcement(&client, &guardrails, enforcement).await;
    (client, ns, op_ns, guardrails, op)
}

#[tokio::test]
async fn an_enforcing_guardrail_refuses_an_over_asking_pipeline_and_an_auditing_one_accepts_it() {
    let _turn = SERIAL.lock().await;
    let (client, ns, _, guardrails, op) = serving("webhook", Enforcement::Enforce, &[]).await;
    let metric = "portcullis_admission_refusals_total{reason=\"EnforcedGuardrail\"}";
    // The dry runs that waited for the webhook were refused (and counted) but not recorded.
    let before = op.metric(metric).await;
    assert!(
        !op.records()
            .iter()
            .any(|r| r["action"] == "admission-denied"),
        "dry runs are not recorded"
    );

    let refused = create(&client, &over_asking(&ns), false)
        .await
        .expect_err("refused under an enforcing guardrail");
    assert!(
        refused.contains("enforcement: Enforce")
            && refused.contains("delete configmaps/ingest-config"),
        "{refused}"
    );
    let records = op.records();
    let record = records
        .iter()
        .find(|r| r["action"] == "admission-denied")
        .unwrap_or_else(|| panic!("an admission-denied record: {records:?}"));
    assert_eq!(record["pipeline"], "fraud-detector");
    assert_eq!(record["reason"], "EnforcedGuardrail");
    assert_eq!(
        op.metric(metric).await,
        before + 1.0,
        "the refusal is counted"
    );

    // An invalid pipeline is refused whatever the guardrails say, naming the error.
    let mut invalid = example("examples/pipelines/fraud-detector.yaml", &ns);
    invalid.spec.stages[1].name = invalid.spec.stages[0].name.clone();
    let refused = create(&client, &invalid, false)
        .await
        .expect_err("an invalid pipeline is refused");
    assert!(refused.contains("is invalid"), "{refused}");

    set_enforcement(&client, &guardrails, Enforcement::Audit).await;
    wait_for("an auditing guardrail to accept the pipeline", WAIT, || {
        let (client, pipeline) = (client.clone(), over_asking(&ns));
        async move { create(&client, &pipeline, false).await.ok() }
    })
    .await;

    // Enforcing again: the accepted pipeline's labels can still change, its spec cannot.
    set_enforcement(&client, &guardrails, Enforcement::Enforce).await;
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let mut probe = over_asking(&ns);
    probe.metadata.name = Some("probe".into());
    wait_for(
        "the operator to see the guardrails enforcing again",
        WAIT,
        || {
            let (client, probe) = (client.clone(), probe.clone());
            async move { create(&client, &probe, true).await.err().map(|_| ()) }
        },
    )
    .await;
    let reordered: Vec<_> = over_asking(&ns).spec.stages.into_iter().rev().collect();
    pipelines
        .patch(
            "fraud-detector",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stages": reordered}})),
        )
        .await
        .expect_err("a new spec asking for denied items is refused");
    pipelines
        .patch(
            "fraud-detector",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "fraud"}}})),
        )
        .await
        .expect("a label change is not reviewed");
}

#[tokio::test]
async fn with_the_operator_down_pipelines_are_accepted() {
    let _turn = SERIAL.lock().await;
    let (client, ns, _, _, mut op) = serving("webhook-down", Enforcement::Enforce, &[]).await;
    op.kill();
    create(&client, &over_asking(&ns), false)
        .await
        .expect("with the webhook unreachable the failure policy Ignore accepts the pipeline");
}

#[tokio::test]
async fn certificates_rotate_and_the_api_server_keeps_trusting_the_webhook() {
    let _turn = SERIAL.lock().await;
    let (client, ns, op_ns, _, _op) = serving(
        "webhook-rotate",
        Enforcement::Enforce,
        &["--webhook-cert-validity", "15s"],
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &op_ns);
    let ca = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    let first = ca(&secrets.get(SECRET).await.expect("the certificate Secret"));

    let rotated = wait_for("the certificates to rotate", WAIT, || {
        let (secrets, first) = (secrets.clone(), first.clone());
        async move {
            let s = secrets.get(SECRET).await.ok()?;
            (ca(&s) != first).then_some(ca(&s))
        }
    })
    .await;
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    wait_for("the CA bundle to name the new CA", WAIT, || {
        let (configurations, rotated) = (configurations.clone(), rotated.clone());
        async move {
            let c = configurations.get("portcullis").await.ok()?;
            let bundle = c.webhooks?.first()?.client_config.ca_bundle.clone()?.0;
            String::from_utf8(bundle)
                .ok()?
                .contains(std::str::from_utf8(&rotated).ok()?)
                .then_some(())
        }
    })
    .await;
    // Served with the new certificate, the webhook still refuses.
    wait_for("a refusal after the rotation", WAIT, || {
        let (client, pipeline) = (client.clone(), over_asking(&ns));
        async move { create(&client, &pipeline, true).await.err().map(|_| ()) }
    })
    .await;
}
