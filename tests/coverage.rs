//! Uncovered pods against the real API server: a pod labelled `portcullis.dev/pipeline` that
//! matches no stage's NetworkPolicy podSelector shows in the pipeline's `status.uncoveredPods`
//! and gets one `PodNotCovered` Warning Event, and clears when it is labelled or gone. Pods are
//! created as a Deployment would make them (nothing runs them here: there is no kubelet).

mod support;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, GetParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::Request;
use portcullis::api::{AIPipeline, UncoveredPods};
use serde_json::{Value, json};
use support::{WAIT, read, wait_for, with_pipeline};

/// The pod template of the example workload `file` (examples/workloads/), as a Pod named `name`
/// in `ns`.
fn example_pod(file: &str, name: &str, ns: &str) -> Value {
    let workload: Value = serde_saphyr::from_str(&read(&format!("examples/workloads/{file}")))
        .expect("the example workload parses");
    let template = &workload["spec"]["template"];
    let mut metadata = template["metadata"].clone();
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(ns);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
}

async fn create(pods: &Api<Pod>, pod: Value) {
    let pod: Pod = serde_json::from_value(pod).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

async fn uncovered(pipelines: &Api<AIPipeline>) -> Option<UncoveredPods> {
    pipelines
        .get("fraud-detector")
        .await
        .ok()?
        .status?
        .uncovered_pods
}

/// The `PodNotCovered` Events on the pipeline, by the pod they name.
async fn events_for(events: &Api<Event>, pod: &str) -> Vec<Event> {
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("PodNotCovered")
                && e.involved_object.name.as_deref() == Some("fraud-detector")
                && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        })
        .collect()
}

/// Waits until the pipeline lists exactly `names` as uncovered.
async fn wait_uncovered(pipelines: &Api<AIPipeline>, names: &[&str]) {
    let expected = UncoveredPods {
        count: u32::try_from(names.len()).unwrap(),
        names: names.iter().map(|n| (*n).to_string()).collect(),
    };
    wait_for(
        &format!("status.uncoveredPods to name {names:?}"),
        WAIT,
        || {
            let (pipelines, expected) = (pipelines.clone(), expected.clone());
            async move { (uncovered(&pipelines).await? == expected).then_some(()) }
        },
    )
    .await;
}

/// Waits for the `PodNotCovered` Event naming `pod`, and returns its message.
async fn wait_event(events: &Api<Event>, pod: &str) -> String {
    let event = wait_for(&format!("a PodNotCovered Event for {pod}"), WAIT, || {
        let events = events.clone();
        async move { events_for(&events, pod).await.pop() }
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    event.message.unwrap_or_default()
}

/// The example pod `file` named `name`, without `label`, running as `default`.
fn unlabelled(file: &str, name: &str, ns: &str, label: &str) -> Value {
    let mut pod = example_pod(file, name, ns);
    pod["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(label);
    pod["spec"]["serviceAccountName"] = json!("default");
    pod
}

/// Status writes of AIPipelines the API server has answered, from its own metrics.
async fn status_writes(client: &kube::Client) -> f64 {
    // GET /metrics ("" + "/" + "metrics").
    let request = Request::new("")
        .get("metrics", &GetParams::default())
        .expect("a GET of /metrics");
    let text = client
        .request_text(request)
        .await
        .expect("the API server's metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"aipipelines\"")
                && l.contains("subresource=\"status\"")
                && (l.contains("verb=\"APPLY\"") || l.contains("verb=\"PATCH\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_pipeline_pod_outside_every_stage_is_reported_once_and_cleared() {
    let f = with_pipeline("coverage", "examples/pipelines/fraud-detector.yaml").await;
    f.wait_converged().await;
    let (client, ns) = (f.client.clone(), f.ns.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);

    // As examples/workloads/ label them: covered.
    create(&pods, example_pod("ingest.yaml", "ingest-ok", &ns)).await;
    // The stage label forgotten (and the stage's ServiceAccount with it).
    create(
        &pods,
        unlabelled("ingest.yaml", "ingest-forgot", &ns, "portcullis.dev/stage"),
    )
    .await;
    // No pipeline label: not the pipeline's pod, not judged.
    create(
        &pods,
        json!({"metadata": {"name": "bystander", "labels": {"app": "other"}},
               "spec": {"containers": [{"name": "main", "image": "registry.example/worker:1"}]}}),
    )
    .await;
    wait_uncovered(&pipelines, &["ingest-forgot"]).await;
    let note = wait_event(&events, "ingest-forgot").await;
    assert!(
        note.contains("pod ingest-forgot carries portcullis.dev/pipeline=fraud-detector")
            && note.contains("ingest (app=fraud-ingest, portcullis.dev/pipeline=fraud-detector, portcullis.dev/stage=ingest)"),
        "the Event says which labels make it a stage's: {note}"
    );

    // More changes (a relabelled covered pod, a reconcile asked for, a second uncovered pod):
    // the first pod is not announced again, and only the second pod's appearance writes the
    // status.
    let writes = status_writes(&client).await;
    pods.patch(
        "ingest-ok",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .unwrap();
    pipelines
        .patch(
            "fraud-detector",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"portcullis.dev/reconcile": "1"}}})),
        )
        .await
        .unwrap();
    wait_for("the requested reconcile", WAIT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("ReconcileRequested"))
                .then_some(())
        }
    })
    .await;
    create(&pods, unlabelled("train.yaml", "train-late", &ns, "app")).await;
    wait_uncovered(&pipelines, &["ingest-forgot", "train-late"]).await;
    let late_note = wait_event(&events, "train-late").await;
    assert!(
        late_note.contains("for stage train of pipeline fraud-detector it lacks app=fraud-train"),
        "{late_note}"
    );
    assert_eq!(
        status_writes(&client).await - writes,
        1.0,
        "one status write: the second pod's appearance (the label edit and the reconcile write nothing)"
    );
    let first = events_for(&events, "ingest-forgot").await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        first[0].count.unwrap_or(1),
        1,
        "announced once: {:?}",
        first[0]
    );

    // Labelled, and gone: the field clears; the reconcile's status stays.
    pods.patch(
        "ingest-forgot",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"portcullis.dev/stage": "ingest"}}})),
    )
    .await
    .unwrap();
    pods.delete("train-late", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_for("status.uncoveredPods to clear", WAIT, || {
        let pipelines = pipelines.clone();
        async move {
            let p = pipelines.get("fraud-detector").await.ok()?;
            p.status
                .as_ref()
                .is_some_and(|s| s.uncovered_pods.is_none())
                .then_some(p)
        }
    })
    .await;
    let p = pipelines.get("fraud-detector").await.unwrap();
    let status = p.status.expect("a status");
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Ready"),
        "the reconcile's conditions stay: {status:?}"
    );
    assert_eq!(status.stages.len(), 3);
}
