//! GitOps safety: an AIPipeline applied the way Argo CD applies it (server-side apply, field
//! manager `argocd-controller`, tracking labels and annotations) stays exactly as applied while
//! the operator reconciles it. The operator owns the status subresource and nothing else, so a
//! re-apply never conflicts and Argo CD's diff sees the object in sync. The one server-side
//! change to a spec is a schema default (`protocol: TCP` on a port without a protocol), shown
//! here precisely, with what Server-Side Diff makes of it.

mod support;

use support::{get_raw, pipelines_request, read, wait_converged_raw};

use std::collections::BTreeSet;
use std::time::Duration;

use kube::Client;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

const ARGOCD: &str = "argocd-controller";
const OPERATOR: &str = "portcullis";

/// `examples/pipelines/fraud-detector.yaml` in `ns`, labelled and annotated as Argo CD tracks
/// what it applies.
fn argocd_manifest(ns: &str) -> Value {
    let mut p: Value = serde_saphyr::from_str(&read("examples/pipelines/fraud-detector.yaml"))
        .expect("example parses");
    p["metadata"]["namespace"] = json!(ns);
    p["metadata"]["labels"] = json!({
        "app.kubernetes.io/instance": "ai-pipelines",
        "app.kubernetes.io/part-of": "fraud-detection",
        "team": "fraud",
    });
    p["metadata"]["annotations"] = json!({
        "argocd.argoproj.io/tracking-id": format!("ai-pipelines:portcullis.dev/AIPipeline:{ns}/fraud-detector"),
        "argocd.argoproj.io/sync-wave": "1",
        "fraud.example.com/owner": "fraud-ml@example.com",
    });
    p
}

/// The JSON pointers of the ports in `spec` that do not say their protocol.
fn ports_without_protocol(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (s, stage) in spec["stages"].as_array().into_iter().flatten().enumerate() {
        for direction in ["egress", "ingress"] {
            let rules = stage["network"][direction].as_array().into_iter().flatten();
            for (r, rule) in rules.enumerate() {
                for (p, port) in rule["ports"].as_array().into_iter().flatten().enumerate() {
                    if port.get("protocol").is_none() {
                        out.push(format!(
                            "/stages/{s}/network/{direction}/{r}/ports/{p}/protocol"
                        ));
                    }
                }
            }
        }
    }
    out
}

/// `manifest` with `protocol: TCP` written out on every port, as Git should hold it.
fn with_explicit_protocols(mut manifest: Value) -> Value {
    for pointer in ports_without_protocol(&manifest["spec"]) {
        let port = pointer.trim_end_matches("/protocol").to_string();
        manifest["spec"]
            .pointer_mut(&port)
            .and_then(Value::as_object_mut)
            .expect("port")
            .insert("protocol".into(), json!("TCP"));
    }
    manifest
}

/// Server-side apply of `manifest` by `manager`, never forcing, as Argo CD's
/// `ServerSideApply=true` sync does; with `dry_run`, as its Server-Side Diff does.
async fn apply(
    client: &Client,
    manifest: &Value,
    manager: &str,
    dry_run: bool,
) -> Result<Value, kube::Error> {
    let ns = manifest["metadata"]["namespace"].as_str().expect("ns");
    let name = manifest["metadata"]["name"].as_str().expect("name");
    let mut params = PatchParams::apply(manager);
    params.dry_run = dry_run;
    let request = pipelines_request(ns)
        .patch(name, &params, &Patch::Apply(manifest))
        .expect("request");
    client.request::<Value>(request).await
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every managedFields entry as (manager, operation, subresource, top-level fields).
fn managed_fields(object: &Value) -> Vec<(String, String, String, BTreeSet<String>)> {
    object["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or_default().to_string(),
                e["operation"].as_str().unwrap_or_default().to_string(),
                e["subresource"].as_str().unwrap_or_default().to_string(),
                keys(&e["fieldsV1"]),
            )
        })
        .collect()
}

/// What Argo CD compares: labels, annotations and spec are exactly what was applied.
fn assert_as_applied(manifest: &Value, live: &Value, when: &str) {
    for field in ["labels", "annotations"] {
        assert_eq!(
            live["metadata"][field], manifest["metadata"][field],
            "{when}: metadata.{field} differs from what Argo CD applied"
        );
    }
    pretty_assertions::assert_eq!(
        &live["spec"],
        &manifest["spec"],
        "{when}: the live spec differs from the applied spec"
    );
}

#[tokio::test]
async fn the_operator_leaves_an_argocd_applied_pipeline_as_applied() {
    let (client, ns, _) = support::guarded_namespace("gitops").await;
    let op = support::Operator::start("operator-gitops", &ns, None);

    // As Git should hold it: every port says its protocol (see the next test for why).
    let manifest = with_explicit_protocols(argocd_manifest(&ns));
    let applied = apply(&client, &manifest, ARGOCD, false)
        .await
        .expect("Argo CD's server-side apply");
    let generation = applied["metadata"]["generation"].clone();
    assert_eq!(generation, 1);
    // No defaulting, no mutation: what the API server stored is what was applied.
    assert_as_applied(&manifest, &applied, "as stored");

    let live = wait_converged_raw(&client, &ns, "fraud-detector", &op).await;
    // Let the operator finish whatever it does after Ready; nothing more should be written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = get_raw(&client, &ns, "fraud-detector").await;
    assert_eq!(
        settled["metadata"]["resourceVersion"], live["metadata"]["resourceVersion"],
        "the operator keeps writing to a reconciled pipeline"
    );
    assert_eq!(
        settled["metadata"]["generation"], generation,
        "the spec was written"
    );
    assert_as_applied(&manifest, &settled, "after the operator reconciled it");
    for field in ["finalizers", "ownerReferences"] {
        assert!(
            settled["metadata"].get(field).is_none(),
            "the operator set metadata.{field}: {}",
            settled["metadata"][field]
        );
    }

    // Who owns what: Argo CD the labels, annotations and spec; the operator the status only.
    let entries = managed_fields(&settled);
    let managers: BTreeSet<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        managers,
        BTreeSet::from([ARGOCD, OPERATOR]),
        "{:#}",
        settled["metadata"]["managedFields"]
    );
    for (manager, operation, subresource, fields) in &entries {
        match manager.as_str() {
            ARGOCD => {
                assert_eq!(operation, "Apply");
                assert!(subresource.is_empty(), "{subresource}");
                assert_eq!(
                    *fields,
                    BTreeSet::from(["f:metadata".to_string(), "f:spec".to_string()])
                );
            }
            _ => {
                // Kubernetes before 1.22 does not record the subresource; the fields say it.
                assert!(
                    subresource.is_empty() || subresource == "status",
                    "the operator manages fields through /{subresource}"
                );
                assert_eq!(
                    *fields,
                    BTreeSet::from(["f:status".to_string()]),
                    "the operator manages more than the status: {:#}",
                    settled["metadata"]["managedFields"]
                );
            }
        }
    }
    let argocd_metadata = settled["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .find(|e| e["manager"] == ARGOCD)
        .map(|e| keys(&e["fieldsV1"]["f:metadata"]))
        .expect("Argo CD's entry");
    assert_eq!(
        argocd_metadata,
        BTreeSet::from(["f:annotations".to_string(), "f:labels".to_string()])
    );

    // Argo CD syncs again (self-heal, a refresh, the next commit with no change here): the same
    // apply, not forced, succeeds without a conflict and changes nothing.
    let reapplied = apply(&client, &manifest, ARGOCD, false)
        .await
        .expect("re-applying without force does not conflict with the operator");
    assert_eq!(reapplied["metadata"]["generation"], generation);
    assert_eq!(
        reapplied["metadata"]["resourceVersion"], settled["metadata"]["resourceVersion"],
        "an unchanged apply wrote the object"
    );
    assert_as_applied(&manifest, &reapplied, "after the re-apply");
    // What Server-Side Diff predicts is what is live.
    let predicted = apply(&client, &manifest, ARGOCD, true)
        .await
        .expect("dry-run apply");
    assert_as_applied(&manifest, &predicted, "the dry-run apply");
    assert_eq!(predicted["metadata"]["generation"], generation);
    // And the operator does not react to it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = get_raw(&client, &ns, "fraud-detector").await;
    assert_eq!(last["metadata"]["generation"], generation);
    assert_eq!(last["status"], settled["status"], "the status changed");
    assert_as_applied(&manifest, &last, "at the end");
}

/// The CRDs carry no defaults under `spec` (`portcullis::api::crds` strips them), so a port
/// written without a protocol is stored exactly as written: Argo CD's legacy and
/// structured-merge diffs, which compare the atomic `ports` list whole, see no difference.
#[tokio::test]
async fn a_port_without_protocol_is_stored_as_written() {
    let cp = support::control_plane();
    let client = cp.client().await;
    let ns = support::temp_namespace(&client, "gitops-defaults", &[]).await;
    // As the example is written: three ports without a protocol.
    let manifest = argocd_manifest(&ns);
    let missing = ports_without_protocol(&manifest["spec"]);
    assert_eq!(missing.len(), 3, "{missing:?}");

    let live = apply(&client, &manifest, ARGOCD, false)
        .await
        .expect("Argo CD's server-side apply");
    assert_eq!(
        live["spec"], manifest["spec"],
        "the API server added defaults"
    );
    assert_eq!(ports_without_protocol(&live["spec"]), missing);
    for field in ["labels", "annotations"] {
        assert_eq!(live["metadata"][field], manifest["metadata"][field]);
    }
    // A sync applies it again: no conflict, no change; Server-Side Diff's prediction agrees.
    let again = apply(&client, &manifest, ARGOCD, false)
        .await
        .expect("re-apply");
    assert_eq!(
        again["metadata"]["generation"],
        live["metadata"]["generation"]
    );
    assert_eq!(again["spec"], manifest["spec"]);
    let predicted = apply(&client, &manifest, ARGOCD, true)
        .await
        .expect("dry-run apply");
    assert_eq!(predicted["spec"], manifest["spec"]);
}
