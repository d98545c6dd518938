//! Pods a stage should cover and does not: a forgotten label made visible.
//!
//! A pod is a pipeline's when it carries `portcullis.dev/pipeline: <pipeline>` (as the
//! examples' workloads do) in the pipeline's namespace. It is *covered* when its labels match
//! the pod selector of one of the pipeline's stages' NetworkPolicies, as planned: the stage's
//! `podSelector` plus `portcullis.dev/pipeline` and `portcullis.dev/stage`. A pipeline's pod
//! that no stage covers runs outside every stage's default-deny NetworkPolicy and, unless it
//! runs as a stage's ServiceAccount, without any stage's access: almost always a label someone
//! forgot. The pipeline then shows it in `status.uncoveredPods` (the count and the first ten
//! names), and each such pod gets one Warning Event `PodNotCovered` on the pipeline (once per
//! appearance, not once per check); both clear when the pod is labelled or gone.
//!
//! The pods are watched as metadata only, with the server-side label selector
//! `portcullis.dev/pipeline` (only pods that claim a pipeline are sent, however large the
//! cluster), and the cache keeps their names and labels. Once a second, and only when a pod or a
//! pipeline changed, every pipeline's pods are checked against its stages' selectors, which are
//! planned once per pipeline generation. The status is written only when it changes (server-side
//! apply, field manager `portcullis-coverage`), so the steady state makes no API writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::core::{Selector, SelectorExt};
use serde_json::json;
use tracing::{info, warn};

use super::Context;
use crate::api::{AIPipeline, AccessGuardrail, UncoveredPods};
use crate::k8s::{
    Api, Event, EventType, ObjectMeta, ObjectReference, PIPELINE_LABEL, PartialObjectMeta, Patch,
    PatchParams, Pod, Resource, ResourceExt, STAGE_LABEL, Store, WatchStreamExt, reflector,
    watcher,
};
use crate::plan::{self, Object, names};

/// The field manager of `status.uncoveredPods`, beside the reconcile's `portcullis`.
pub(crate) const FIELD_MANAGER: &str = "portcullis-coverage";

/// The Event reason.
pub(crate) const REASON: &str = "PodNotCovered";

/// How many pod names the status lists.
const MAX_NAMES: usize = 10;

/// One stage's pods, as its NetworkPolicy selects them.
#[derive(Debug, Clone)]
struct StageSelector {
    stage: String,
    selector: Selector,
    /// The selector's `matchLabels`, to tell a pod which labels it lacks.
    match_labels: BTreeMap<String, String>,
}

/// What a pipeline's pods are checked against: its stages' selectors, planned for one
/// generation.
#[derive(Debug, Clone)]
struct Stages {
    generation: Option<i64>,
    /// The value of `portcullis.dev/pipeline` on the pipeline's objects and pods.
    pipeline_label: String,
    /// `None` when the spec cannot be planned (it is reported as `InvalidSpec`; its pods are
    /// not judged until it can be).
    selectors: Option<Vec<StageSelector>>,
}

impl Stages {
    /// The stages' selectors from the pipeline's plan: exactly the podSelectors of the
    /// NetworkPolicies the operator applies.
    fn plan(
        pipeline: &AIPipeline,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        guardrails: &[AccessGuardrail],
    ) -> Stages {
        let selectors = plan::validate_and_build(pipeline, namespace, namespace_labels, guardrails)
            .ok()
            .map(|plan| {
                plan.objects
                    .iter()
                    .filter_map(|object| match object {
                        Object::NetworkPolicy(np) => {
                            let selector = np.spec.as_ref()?.pod_selector.clone()?;
                            let stage = np.metadata.labels.as_ref()?.get(STAGE_LABEL)?.clone();
                            Some(StageSelector {
                                stage,
                                match_labels: selector.match_labels.clone().unwrap_or_default(),
                                selector: Selector::try_from(selector).ok()?,
                            })
                        }
                        _ => None,
                    })
                    .collect()
            });
        Stages {
            generation: pipeline.metadata.generation,
            pipeline_label: names::label_value(&pipeline.name_any()),
            selectors,
        }
    }
}

/// A pod as the coverage check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodLabels {
    name: String,
    uid: Option<String>,
    labels: BTreeMap<String, String>,
}

/// The pods of `pods` that no selector of `stages` matches, by name.
fn uncovered<'a>(pods: &'a [PodLabels], stages: &[StageSelector]) -> Vec<&'a PodLabels> {
    let mut out: Vec<&PodLabels> = pods
        .iter()
        .filter(|pod| !stages.iter().any(|s| s.selector.matches(&pod.labels)))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The status field for `pods` (the uncovered ones, sorted): `None` when there is none.
fn status_of(pods: &[&PodLabels]) -> Option<UncoveredPods> {
    (!pods.is_empty()).then(|| UncoveredPods {
        count: u32::try_from(pods.len()).unwrap_or(u32::MAX),
        names: pods
            .iter()
            .take(MAX_NAMES)
            .map(|p| p.name.clone())
            .collect(),
    })
}

/// What the Event says about one uncovered pod: what it lacks, when its
/// `portcullis.dev/stage` label names a stage, else which labels a stage needs.
fn note(pipeline: &str, pod: &PodLabels, stages: &[StageSelector]) -> String {
    let head = format!(
        "pod {} carries {PIPELINE_LABEL}={} but matches no stage's pod selector: it runs outside every stage's NetworkPolicy (no default deny) and gets no stage's access",
        pod.name,
        pod.labels.get(PIPELINE_LABEL).map_or("", String::as_str)
    );
    let missing = |s: &StageSelector| -> Vec<String> {
        s.match_labels
            .iter()
            .filter(|(k, v)| pod.labels.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    };
    let claimed = pod
        .labels
        .get(STAGE_LABEL)
        .and_then(|name| stages.iter().find(|s| &s.stage == name));
    match claimed {
        Some(stage) => {
            let lacks = missing(stage);
            if lacks.is_empty() {
                format!(
                    "{head}; its labels fail the matchExpressions of stage {}'s podSelector in pipeline {pipeline}",
                    stage.stage
                )
            } else {
                format!(
                    "{head}; for stage {} of pipeline {pipeline} it lacks {}",
                    stage.stage,
                    lacks.join(", ")
                )
            }
        }
        None => {
            let options: Vec<String> = stages
                .iter()
                .map(|s| {
                    format!(
                        "{} ({})",
                        s.stage,
                        s.match_labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .collect();
            format!(
                "{head}; label it for one of the stages of pipeline {pipeline}: {}",
                options.join("; ")
            )
        }
    }
}

/// Only what the check reads is kept of a pod: its name, uid and labels.
fn trim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.creation_timestamp = None;
}

/// Watches the pipelines' pods (of `namespace`, or of every namespace, and of those only the
/// namespaces `owns` accepts) and keeps the pipelines' `status.uncoveredPods` until the process
/// ends.
pub(crate) async fn watch(
    ctx: Arc<Context>,
    pipelines: Store<AIPipeline>,
    namespace: Option<String>,
    owns: impl Fn(&str) -> bool + Send + Sync + 'static,
) {
    let api: Api<PartialObjectMeta<Pod>> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let changes = Arc::new(AtomicU64::new(0));
    let (pods, writer) = reflector::store::<PartialObjectMeta<Pod>>();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().labels(PIPELINE_LABEL))
            .filter(move |event| {
                futures::future::ready(match event {
                    Ok(
                        watcher::Event::Apply(p)
                        | watcher::Event::InitApply(p)
                        | watcher::Event::Delete(p),
                    ) => p.namespace().is_some_and(|ns| owns(&ns)),
                    _ => true,
                })
            })
            .modify(|p| trim(&mut p.metadata)),
    )
    .default_backoff();
    let counter = changes.clone();
    tokio::spawn(stream.for_each(move |event| {
        match event {
            Ok(_) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            // Retried with backoff; lacking RBAC to list pods is the usual cause.
            Err(error) => {
                warn!(%error, "watching the pipelines' pods failed; uncovered pods are not reported until it works again");
            }
        }
        futures::future::ready(())
    }));
    if pods.wait_until_ready().await.is_err() {
        return;
    }
    info!("checking that every pod labelled {PIPELINE_LABEL} is covered by a stage");
    let mut state = Coverage::default();
    let mut last: Option<[u64; 4]> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !ctx.synced.load(Ordering::Acquire) {
            continue;
        }
        let fingerprint = fingerprint(changes.load(Ordering::Relaxed), &ctx);
        if last == Some(fingerprint) {
            continue;
        }
        // A failed write leaves `last` unset: the next second tries again.
        last = state
            .round(&ctx, &pipelines, &pods)
            .await
            .then_some(fingerprint);
    }
}

/// What a round depends on: the pod events seen, and the pipeline, guardrail and namespace
/// caches' events (a new spec, and also a status someone else changed). Taken every second, so
/// it is a few counters, not a walk over every pipeline.
fn fingerprint(pod_changes: u64, ctx: &Context) -> [u64; 4] {
    let [pipelines, guardrails, namespaces] = ctx.events.snapshot();
    [pod_changes, pipelines, guardrails, namespaces]
}

/// What the check remembers per pipeline uid.
#[derive(Default)]
struct Coverage {
    stages: HashMap<String, Stages>,
    /// The `status.uncoveredPods` last written (or found in place).
    written: HashMap<String, Option<UncoveredPods>>,
    /// The pods already announced with an Event.
    announced: HashMap<String, BTreeSet<String>>,
}

impl Coverage {
    /// Checks every pipeline. `false` if a status could not be written.
    async fn round(
        &mut self,
        ctx: &Context,
        pipelines: &Store<AIPipeline>,
        pods: &Store<PartialObjectMeta<Pod>>,
    ) -> bool {
        // The pods by (namespace, pipeline label).
        let mut by_pipeline: HashMap<(String, String), Vec<PodLabels>> = HashMap::new();
        for pod in pods.state() {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (Some(ns), Some(pipeline)) =
                (pod.namespace(), pod.labels().get(PIPELINE_LABEL).cloned())
            else {
                continue;
            };
            by_pipeline
                .entry((ns, pipeline))
                .or_default()
                .push(PodLabels {
                    name: pod.name_any(),
                    uid: pod.uid(),
                    labels: pod.labels().clone(),
                });
        }
        let mut guardrails: Option<Vec<AccessGuardrail>> = None;
        let mut ok = true;
        let mut live = BTreeSet::new();
        for pipeline in pipelines.state() {
            let (Some(uid), Some(namespace)) = (pipeline.uid(), pipeline.namespace()) else {
                continue;
            };
            if pipeline.metadata.deletion_timestamp.is_some() {
                continue;
            }
            live.insert(uid.clone());
            let stale = self
                .stages
                .get(&uid)
                .is_none_or(|s| s.generation != pipeline.metadata.generation);
            if stale {
                let guardrails = guardrails.get_or_insert_with(|| {
                    ctx.guardrails
                        .state()
                        .iter()
                        .map(|g| (**g).clone())
                        .collect()
                });
                let labels = ctx.namespace_labels(&namespace);
                self.stages.insert(
                    uid.clone(),
                    Stages::plan(&pipeline, &namespace, &labels, guardrails),
                );
            }
            let stages = &self.stages[&uid];
            let Some(selectors) = &stages.selectors else {
                continue;
            };
            let own = by_pipeline
                .get(&(namespace.clone(), stages.pipeline_label.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let found = uncovered(own, selectors);
            let wanted = status_of(&found);
            let in_place = pipeline
                .status
                .as_ref()
                .and_then(|s| s.uncovered_pods.clone());
            let written = self
                .written
                .entry(uid.clone())
                .or_insert_with(|| in_place.clone());
            // Announced before: what this process announced, or (after a restart) the names
            // the status already lists.
            let announced = self.announced.entry(uid.clone()).or_insert_with(|| {
                in_place
                    .as_ref()
                    .map(|u| u.names.iter().cloned().collect())
                    .unwrap_or_default()
            });
            let name = pipeline.name_any();
            for pod in found.iter().filter(|p| !announced.contains(&p.name)) {
                warn!(%namespace, pipeline = %name, pod = %pod.name, "a pod of the pipeline matches no stage's pod selector");
                publish(ctx, &pipeline, &namespace, pod, note(&name, pod, selectors)).await;
            }
            *announced = found.iter().map(|p| p.name.clone()).collect();
            if *written == wanted && in_place == wanted {
                continue;
            }
            if write(ctx, &namespace, &name, wanted.as_ref()).await {
                *written = wanted;
            } else {
                ok = false;
            }
        }
        self.stages.retain(|uid, _| live.contains(uid));
        self.written.retain(|uid, _| live.contains(uid));
        self.announced.retain(|uid, _| live.contains(uid));
        ok
    }
}

/// The Warning Event `PodNotCovered` on the pipeline, naming the pod as the related object.
async fn publish(
    ctx: &Context,
    pipeline: &AIPipeline,
    namespace: &str,
    pod: &PodLabels,
    note: String,
) {
    let mut note = note;
    if note.len() > 1000 {
        note.truncate(note.floor_char_boundary(990));
        note.push_str(" ...");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: REASON.into(),
        note: Some(note),
        action: "Watch".into(),
        secondary: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(namespace.into()),
            uid: pod.uid.clone(),
            ..ObjectReference::default()
        }),
    };
    if let Err(error) = ctx
        .recorder()
        .publish(&event, &pipeline.object_ref(&()))
        .await
    {
        warn!(%error, reason = REASON, "publishing an event failed");
    }
}

/// Writes `status.uncoveredPods` (removes it for `None`: the field manager then owns nothing).
async fn write(ctx: &Context, namespace: &str, name: &str, wanted: Option<&UncoveredPods>) -> bool {
    let status = match wanted {
        Some(u) => json!({"uncoveredPods": u}),
        None => json!({}),
    };
    let patch = json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "status": status,
    });
    match Api::<AIPipeline>::namespaced(ctx.client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => true,
        Err(error) => {
            warn!(%error, %namespace, pipeline = %name, "cannot write status.uncoveredPods; retrying");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> PodLabels {
        PodLabels {
            name: name.into(),
            uid: None,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        }
    }

    /// The fraud detector's stages, as its plan selects their pods.
    fn fraud_detector() -> Stages {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/pipelines/fraud-detector.yaml"
        ))
        .unwrap();
        let pipeline: AIPipeline = serde_saphyr::from_str(&text).unwrap();
        let labels = crate::k8s::with_name_label(BTreeMap::new(), "ml-fraud");
        Stages::plan(&pipeline, "ml-fraud", &labels, &[])
    }

    #[test]
    fn a_pod_is_covered_only_with_its_stage_labels_and_its_podselector() {
        let stages = fraud_detector();
        assert_eq!(stages.pipeline_label, "fraud-detector");
        let selectors = stages.selectors.expect("the example plans");
        assert_eq!(selectors.len(), 3, "one per stage");
        let pods = [
            // As examples/workloads/ label them.
            pod(
                "ingest-1",
                &[
                    ("app", "fraud-ingest"),
                    (PIPELINE_LABEL, "fraud-detector"),
                    (STAGE_LABEL, "ingest"),
                    ("pod-template-hash", "abc"),
                ],
            ),
            // The stage label forgotten.
            pod(
                "ingest-2",
                &[("app", "fraud-ingest"), (PIPELINE_LABEL, "fraud-detector")],
            ),
            // The podSelector's label forgotten.
            pod(
                "train-1",
                &[(PIPELINE_LABEL, "fraud-detector"), (STAGE_LABEL, "train")],
            ),
            // A stage label of no stage, the app label of another.
            pod(
                "debug",
                &[
                    ("app", "fraud-scorer"),
                    (PIPELINE_LABEL, "fraud-detector"),
                    (STAGE_LABEL, "debug"),
                ],
            ),
        ];
        let found = uncovered(&pods, &selectors);
        let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["debug", "ingest-2", "train-1"]);

        let status = status_of(&found).unwrap();
        assert_eq!(status.count, 3);
        assert_eq!(status.names, ["debug", "ingest-2", "train-1"]);
        assert_eq!(status_of(&[]), None, "nothing uncovered: no field");

        let train = note("fraud-detector", found[2], &selectors);
        assert!(
            train.contains("for stage train of pipeline fraud-detector it lacks app=fraud-train"),
            "{train}"
        );
        let unlabelled = note("fraud-detector", found[1], &selectors);
        assert!(
            unlabelled.contains("label it for one of the stages")
                && unlabelled.contains("ingest (app=fraud-ingest, portcullis.dev/pipeline=fraud-detector, portcullis.dev/stage=ingest)"),
            "{unlabelled}"
        );
    }

    #[test]
    fn the_status_lists_ten_names_and_counts_all() {
        let stages = fraud_detector().selectors.unwrap();
        let pods: Vec<PodLabels> = (0..25)
            .map(|i| pod(&format!("p{i:02}"), &[(PIPELINE_LABEL, "fraud-detector")]))
            .collect();
        let status = status_of(&uncovered(&pods, &stages)).unwrap();
        assert_eq!(status.count, 25);
        assert_eq!(status.names.len(), MAX_NAMES);
        assert_eq!(status.names.first().map(String::as_str), Some("p00"));
        assert_eq!(status.names.last().map(String::as_str), Some("p09"));
    }

    #[test]
    fn an_invalid_spec_judges_no_pod() {
        let mut pipeline: AIPipeline = serde_saphyr::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/pipelines/fraud-detector.yaml"
            ))
            .unwrap(),
        )
        .unwrap();
        pipeline.spec.stages[0].network.as_mut().unwrap().egress[0].cidr =
            Some("10.20.0.1/16".into());
        let labels = crate::k8s::with_name_label(BTreeMap::new(), "ml-fraud");
        assert!(
            Stages::plan(&pipeline, "ml-fraud", &labels, &[])
                .selectors
                .is_none()
        );
    }
}
