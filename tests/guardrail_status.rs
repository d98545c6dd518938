//! AccessGuardrail status and namespace isolation, against the real API server: one operator
//! watching every namespace (the one that writes guardrail statuses) serves every test; each
//! test has its own namespace and guardrails.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::{AIPipeline, AccessGuardrail, AccessGuardrailStatus};
use serde_json::{Value, json};
use support::{
    Operator, WAIT, create_guardrails, create_pipeline, example, guarded_namespace, temp_namespace,
    wait_for,
};

/// The operator every test shares: it watches every namespace, with one shard.
fn operator() -> &'static Operator {
    static OPERATOR: OnceLock<Operator> = OnceLock::new();
    OPERATOR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        Operator::start_with("operator", "", None, dir, &[])
    })
}

fn guardrails(client: &Client) -> Api<AccessGuardrail> {
    Api::all(client.clone())
}

/// Waits until guardrail `name` has a status for its current generation that `accept`s.
async fn wait_status(
    client: &Client,
    name: &str,
    what: &str,
    accept: impl Fn(&AccessGuardrailStatus) -> bool,
) -> AccessGuardrail {
    let api = guardrails(client);
    let what = format!("AccessGuardrail {name}: {what}");
    let found = tokio::time::timeout(
        WAIT,
        wait_for(&what, WAIT, || {
            let api = api.clone();
            let accept = &accept;
            async move {
                let g = api.get(name).await.ok()?;
                let s = g.status.as_ref()?;
                (s.observed_generation == g.metadata.generation && accept(s)).then_some(g)
            }
        }),
    )
    .await;
    found.unwrap_or_else(|_| panic!("{what} timed out; operator log:\n{}", operator().log()))
}

fn condition<'a>(s: &'a AccessGuardrailStatus, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

/// A pipeline of one training stage asking for `get` on each of `resources` (by name).
fn training_pipeline(namespace: &str, name: &str, resources: &[&str]) -> AIPipeline {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"stages": [{
            "name": "train",
            "role": "Training",
            "podSelector": {"matchLabels": {"app": name}},
            "permissions": resources.iter().map(|r| json!({
                "apiGroups": [""], "resources": [r], "resourceNames": ["params"], "verbs": ["get"]
            })).collect::<Vec<_>>(),
        }]}
    }))
    .expect("pipeline")
}

async fn merge_guardrail(client: &Client, name: &str, patch: Value) {
    guardrails(client)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("patch AccessGuardrail {name}: {e}"));
}

/// Each example guardrail counts the namespace, the pipeline and the one stage of its role, says
/// it is valid and selects a namespace; once converged, its status is not written again.
#[tokio::test]
async fn the_status_counts_what_a_guardrail_bounds_and_is_written_once() {
    operator();
    let (client, ns, examples) = guarded_namespace("agr-counts").await;
    create_pipeline(
        &client,
        &example("examples/pipelines/fraud-detector.yaml", &ns),
    )
    .await;
    let mut versions = Vec::new();
    for g in &examples {
        let name = g.name_any();
        let converged = wait_status(&client, &name, "1 namespace, 1 pipeline, 1 stage", |s| {
            (s.namespaces, s.pipelines, s.stages) == (1, 1, 1)
        })
        .await;
        let s = converged.status.as_ref().expect("status");
        assert_eq!(condition(s, "Valid").map(|c| c.0), Some("True"), "{s:?}");
        assert_eq!(
            condition(s, "SelectsNoNamespace").map(|c| (c.0, c.1)),
            Some(("False", "NamespacesSelected")),
            "{s:?}"
        );
        versions.push((name, converged.resource_version()));
    }
    // Steady state: several rounds of the operator (one every 2 s), and other tests changing
    // their own pipelines meanwhile, write nothing to these guardrails.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for (name, version) in versions {
        let now = guardrails(&client).get(&name).await.expect("guardrail");
        assert_eq!(
            now.resource_version(),
            version,
            "AccessGuardrail {name} was written again with nothing changed: {:?}",
            now.status
        );
    }
}

/// A denied item shows in the guardrail's last denials, with its pipeline, stage, item and
/// reason, and leaves when the pipeline stops asking for it.
#[tokio::test]
async fn a_denial_is_listed_until_the_pipeline_is_fixed() {
    operator();
    let (client, ns, _) = guarded_namespace("agr-denials").await;
    let training = format!("{ns}-training");
    let pipeline = training_pipeline(&ns, "tuner", &["configmaps", "services"]);
    create_pipeline(&client, &pipeline).await;
    let denied = wait_status(&client, &training, "a denial of services", |s| {
        s.last_denials.iter().any(|d| d.item.contains("services"))
    })
    .await;
    let s = denied.status.as_ref().expect("status");
    assert_eq!(s.denied, 1, "only services is outside the guardrail: {s:?}");
    let d = &s.last_denials[0];
    assert_eq!(
        (d.namespace.as_str(), d.pipeline.as_str(), d.stage.as_str()),
        (ns.as_str(), "tuner", "train")
    );
    assert_eq!(d.reason, "OutsideGuardrail");

    let fixed = json!({"spec": {"stages": [{
        "name": "train",
        "role": "Training",
        "podSelector": {"matchLabels": {"app": "tuner"}},
        "permissions": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["params"], "verbs": ["get"]}],
    }]}});
    Api::<AIPipeline>::namespaced(client.clone(), &ns)
        .patch("tuner", &PatchParams::default(), &Patch::Merge(&fixed))
        .await
        .expect("pipeline fixed");
    let clean = wait_status(&client, &training, "no denial", |s| {
        s.last_denials.is_empty() && s.denied == 0
    })
    .await;
    assert_eq!(clean.status.as_ref().map(|s| s.pipelines), Some(1));
}

/// A selector with a label typo selects nothing: the guardrail says so, and stops saying so
/// once a namespace carries the label.
#[tokio::test]
async fn a_selector_that_selects_nothing_is_reported() {
    operator();
    let client = support::control_plane().client().await;
    let ns = temp_namespace(&client, "agr-typo", &[]).await;
    let label = format!("{ns}-team");
    let name = format!("{ns}-typo");
    let mut g = support::guardrails_for(&ns).remove(1);
    g.metadata.name = Some(name.clone());
    g.spec.namespace_selector =
        serde_json::from_value(json!({"matchLabels": {"team": label}})).expect("selector");
    create_guardrails(&client, &[g]).await;
    let nothing = wait_status(&client, &name, "SelectsNoNamespace=True", |s| {
        condition(s, "SelectsNoNamespace").is_some_and(|c| c.0 == "True")
    })
    .await;
    let s = nothing.status.as_ref().expect("status");
    let (_, reason, message) = condition(s, "SelectsNoNamespace").expect("condition");
    assert_eq!(reason, "NoNamespaceMatches");
    assert!(
        message.contains(&name) && message.contains(&format!("team={label}")),
        "the message names the guardrail and its selector: {message}"
    );
    assert_eq!(s.namespaces, 0);

    temp_namespace(&client, "agr-typo-fixed", &[("team", &label)]).await;
    wait_status(&client, &name, "one namespace selected", |s| {
        s.namespaces == 1 && condition(s, "SelectsNoNamespace").is_some_and(|c| c.0 == "False")
    })
    .await;
}

/// A guardrail the validator refuses (an ambiguous Vault pattern, which the schema accepts)
/// says Valid=False naming the field; the stages it applies to are denied, and those denials are
/// its own.
#[tokio::test]
async fn an_invalid_guardrail_says_why_in_its_status() {
    operator();
    let (client, ns, _) = guarded_namespace("agr-invalid").await;
    let training = format!("{ns}-training");
    merge_guardrail(
        &client,
        &training,
        json!({"spec": {"roles": {"training": {"vault": {"paths": [
            {"pattern": "database/creds/{pipeline}-*", "capabilities": ["read"]}
        ]}}}}}),
    )
    .await;
    create_pipeline(&client, &training_pipeline(&ns, "tuner", &["configmaps"])).await;
    let invalid = wait_status(&client, &training, "Valid=False and its denials", |s| {
        condition(s, "Valid").is_some_and(|c| c.0 == "False") && !s.last_denials.is_empty()
    })
    .await;
    let s = invalid.status.as_ref().expect("status");
    let (_, reason, message) = condition(s, "Valid").expect("Valid");
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.contains(&training)
            && message.contains("spec.roles.training.vault.paths[0].pattern")
            && message.contains("database/creds/{namespace}_{pipeline}_{stage}"),
        "the message names the guardrail, the field and the fix: {message}"
    );
    assert!(
        s.last_denials
            .iter()
            .all(|d| d.reason == "InvalidGuardrail"),
        "{:?}",
        s.last_denials
    );
}

/// `isolateUnselectedPods` keeps a default-deny NetworkPolicy over every pod of a namespace
/// with pipelines; it comes back when deleted, and goes when the option is turned off or the
/// last pipeline goes.
#[tokio::test]
async fn isolation_keeps_a_default_deny_policy_while_asked_for() {
    operator();
    let (client, ns, _) = guarded_namespace("agr-isolate").await;
    let training = format!("{ns}-training");
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let present = || {
        let policies = policies.clone();
        async move { policies.get_opt("portcullis-default-deny").await.ok() }
    };

    merge_guardrail(
        &client,
        &training,
        json!({"spec": {"isolateUnselectedPods": true}}),
    )
    .await;
    create_pipeline(&client, &training_pipeline(&ns, "tuner", &["configmaps"])).await;
    let np = wait_for("the default-deny NetworkPolicy", WAIT, || async {
        present().await.flatten()
    })
    .await;
    let spec = np.spec.as_ref().expect("spec");
    assert_eq!(
        spec.pod_selector
            .as_ref()
            .map(|s| (s.match_labels.is_none(), s.match_expressions.is_none())),
        Some((true, true)),
        "it selects every pod: {spec:?}"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string(), "Egress".to_string()][..])
    );
    assert!(
        spec.ingress.is_none() && spec.egress.is_none(),
        "no rule: {spec:?}"
    );
    let labels = np.labels();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("portcullis")
    );
    assert_eq!(
        labels.get("portcullis.dev/isolation").map(String::as_str),
        Some("namespace")
    );

    // Deleted by someone: it comes back.
    let first_uid = np.uid();
    policies
        .delete("portcullis-default-deny", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for("the NetworkPolicy re-created", WAIT, || async {
        present()
            .await
            .flatten()
            .filter(|np| np.uid() != first_uid)
            .map(|_| ())
    })
    .await;

    // Turned off: it goes.
    merge_guardrail(
        &client,
        &training,
        json!({"spec": {"isolateUnselectedPods": null}}),
    )
    .await;
    wait_for("the NetworkPolicy gone (option off)", WAIT, || async {
        present().await.filter(Option::is_none).map(|_| ())
    })
    .await;

    // On again, then the last pipeline goes: it goes too.
    merge_guardrail(
        &client,
        &training,
        json!({"spec": {"isolateUnselectedPods": true}}),
    )
    .await;
    wait_for("the NetworkPolicy back", WAIT, || async {
        present().await.flatten().map(|_| ())
    })
    .await;
    Api::<AIPipeline>::namespaced(client.clone(), &ns)
        .delete("tuner", &DeleteParams::default())
        .await
        .expect("pipeline deleted");
    wait_for("the NetworkPolicy gone (no pipeline)", WAIT, || async {
        present().await.filter(Option::is_none).map(|_| ())
    })
    .await;
}

/// A NetworkPolicy of the isolation's name that the operator did not write is never touched.
#[tokio::test]
async fn someone_elses_policy_of_the_name_is_left_alone() {
    operator();
    let (client, ns, _) = guarded_namespace("agr-foreign").await;
    let training = format!("{ns}-training");
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let theirs: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "portcullis-default-deny", "labels": {"owner": "platform"}},
        "spec": {"podSelector": {"matchLabels": {"app": "legacy"}}, "policyTypes": ["Ingress"]},
    }))
    .expect("policy");
    let created = policies
        .create(&PostParams::default(), &theirs)
        .await
        .expect("created");
    merge_guardrail(
        &client,
        &training,
        json!({"spec": {"isolateUnselectedPods": true}}),
    )
    .await;
    create_pipeline(&client, &training_pipeline(&ns, "tuner", &["configmaps"])).await;
    // The operator has seen the pipeline once the guardrail counts it.
    wait_status(&client, &training, "the pipeline counted", |s| {
        s.pipelines == 1
    })
    .await;
    wait_for("the refusal in the operator's log", WAIT, || async {
        operator()
            .full_log()
            .lines()
            .any(|l| l.contains(&ns) && l.contains("is not Portcullis's namespace isolation"))
            .then_some(())
    })
    .await;
    let after = policies
        .get("portcullis-default-deny")
        .await
        .expect("still there");
    assert_eq!(
        after.resource_version(),
        created.resource_version(),
        "untouched"
    );
}
