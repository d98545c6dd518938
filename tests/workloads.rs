//! examples/workloads/ runs the stages of examples/pipelines/fraud-detector.yaml: each workload
//! must use the ServiceAccount, carry the labels and read the credential Secrets that the
//! operator makes for its stage, and nothing of another stage's, or the README walkthrough
//! breaks (a Pod without its stage's labels is outside its NetworkPolicy; a wrong
//! ServiceAccount has none of the stage's access). Checked against the plan the operator applies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use portcullis::api::{AIPipeline, AccessGuardrail};
use portcullis::plan::{self, Object};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn guardrails() -> Vec<AccessGuardrail> {
    yaml_files(&root().join("examples/guardrails"))
        .iter()
        .map(|f| serde_saphyr::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
        .collect()
}

/// The workloads, by file.
fn workloads() -> Vec<(String, Value)> {
    yaml_files(&root().join("examples/workloads"))
        .iter()
        .flat_map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            serde_saphyr::from_multiple::<Value>(&std::fs::read_to_string(f).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .into_iter()
                .filter(|d| !d.is_null())
                .map(move |d| (name.clone(), d))
        })
        .collect()
}

/// The names of the Secrets a Pod template reads: env, envFrom and volumes.
fn secrets_read(pod: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let containers = pod["containers"]
        .as_array()
        .into_iter()
        .chain(pod["initContainers"].as_array())
        .flatten();
    for container in containers {
        for env in container["env"].as_array().into_iter().flatten() {
            if let Some(name) = env["valueFrom"]["secretKeyRef"]["name"].as_str() {
                names.insert(name.to_string());
            }
        }
        for from in container["envFrom"].as_array().into_iter().flatten() {
            if let Some(name) = from["secretRef"]["name"].as_str() {
                names.insert(name.to_string());
            }
        }
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        if let Some(name) = volume["secret"]["secretName"].as_str() {
            names.insert(name.to_string());
        }
        for source in volume["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(name) = source["secret"]["name"].as_str() {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn matches(selector: &BTreeMap<String, String>, labels: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels[k].as_str() == Some(v.as_str()))
}

#[test]
fn each_stage_has_one_workload_with_its_service_account_labels_and_secrets() {
    let file = root().join("examples/pipelines/fraud-detector.yaml");
    let pipeline: AIPipeline =
        serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let namespace = pipeline.metadata.namespace.clone().unwrap();
    let labels = BTreeMap::from([
        ("kubernetes.io/metadata.name".to_string(), namespace.clone()),
        ("portcullis.dev/tier".to_string(), "ml".to_string()),
    ]);
    let plan = plan::validate_and_build(&pipeline, "default", &labels, &guardrails())
        .expect("the example plans");
    assert_eq!(plan.denied(), 0, "the example is allowed whole");

    // What the operator makes per stage: the ServiceAccount (by its stage label), and the
    // pods its NetworkPolicy selects.
    let stage_of = |labels: &Option<BTreeMap<String, String>>| {
        labels.as_ref().unwrap()["portcullis.dev/stage"].clone()
    };
    let mut service_accounts = BTreeMap::new();
    let mut pod_selectors = BTreeMap::new();
    for object in &plan.objects {
        match object {
            Object::ServiceAccount(sa) => {
                service_accounts.insert(
                    stage_of(&sa.metadata.labels),
                    sa.metadata.name.clone().unwrap(),
                );
            }
            Object::NetworkPolicy(np) => {
                let selector = np.spec.as_ref().unwrap().pod_selector.clone();
                pod_selectors.insert(
                    stage_of(&np.metadata.labels),
                    selector
                        .unwrap_or_default()
                        .match_labels
                        .unwrap_or_default(),
                );
            }
            _ => {}
        }
    }

    let workloads = workloads();
    let mut covered = BTreeSet::new();
    for stage in &pipeline.spec.stages {
        let selector = &pod_selectors[&stage.name];
        assert!(
            !selector.is_empty(),
            "stage {} selects its pods",
            stage.name
        );
        let mine: Vec<&(String, Value)> = workloads
            .iter()
            .filter(|(_, w)| matches(selector, &w["spec"]["template"]["metadata"]["labels"]))
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "one workload in examples/workloads carries stage {}'s labels {selector:?}",
            stage.name
        );
        let (file, workload) = mine[0];
        covered.insert(file.clone());
        let at = format!("examples/workloads/{file} (stage {})", stage.name);
        assert_eq!(
            workload["metadata"]["namespace"],
            namespace.as_str(),
            "{at}"
        );
        let pod = &workload["spec"]["template"]["spec"];
        assert_eq!(
            pod["serviceAccountName"],
            service_accounts[&stage.name].as_str(),
            "{at}: the stage's ServiceAccount"
        );
        // The Deployment's own selector must select the labelled template.
        let own: BTreeMap<String, String> =
            serde_json::from_value(workload["spec"]["selector"]["matchLabels"].clone()).unwrap();
        assert!(
            matches(&own, &workload["spec"]["template"]["metadata"]["labels"]),
            "{at}"
        );
        for other in pipeline.spec.stages.iter().filter(|s| s.name != stage.name) {
            assert!(
                !matches(
                    &pod_selectors[&other.name],
                    &workload["spec"]["template"]["metadata"]["labels"]
                ),
                "{at} also carries stage {}'s labels",
                other.name
            );
        }

        let credentials = stage
            .vault
            .as_ref()
            .map(|v| v.credentials.clone())
            .unwrap_or_default();
        let delivered: BTreeSet<String> =
            credentials.iter().map(|c| c.secret_name.clone()).collect();
        assert_eq!(
            secrets_read(pod),
            delivered,
            "{at}: reads exactly its stage's credential Secrets"
        );
        // The workload is what the credentials' restartTargets restart.
        for credential in &credentials {
            for target in &credential.restart_targets {
                assert_eq!(
                    (format!("{:?}", target.kind), target.name.as_str()),
                    (
                        workload["kind"].as_str().unwrap().to_string(),
                        workload["metadata"]["name"].as_str().unwrap()
                    ),
                    "{at}: credential {} restarts this workload",
                    credential.name
                );
            }
        }
    }
    assert_eq!(
        covered.len(),
        workloads.len(),
        "every workload in examples/workloads runs a stage"
    );
}

#[cfg(feature = "envtest")]
mod support;

/// The API server accepts every workload as written (a server-side dry run), and the Pods
/// they make pass the `restricted` Pod Security profile, enforced on the namespace.
#[cfg(feature = "envtest")]
#[tokio::test]
async fn the_api_server_accepts_the_workloads_and_their_pods_under_the_restricted_profile() {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};

    let client = support::control_plane().client().await;
    let ns = support::temp_namespace(
        &client,
        "workloads",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    for (file, workload) in workloads() {
        let mut workload = workload.clone();
        workload["metadata"]["namespace"] = Value::String(ns.clone());
        let kind = workload["kind"].as_str().unwrap().to_string();
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", &kind));
        let object: DynamicObject = serde_json::from_value(workload.clone()).unwrap();
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource)
            .create(&dry_run, &object)
            .await
            .unwrap_or_else(|e| {
                panic!("examples/workloads/{file}: the API server refuses it: {e}")
            });

        // The ServiceAccount the operator would have made for the stage.
        let service_account: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": workload["spec"]["template"]["spec"]["serviceAccountName"], "namespace": ns},
                "automountServiceAccountToken": false,
            }))
            .unwrap();
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &service_account)
            .await
            .expect("the stage's ServiceAccount");
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{}-dry-run", workload["metadata"]["name"].as_str().unwrap()), "namespace": ns},
            "spec": workload["spec"]["template"]["spec"],
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
            .create(&dry_run, &pod)
            .await
            .unwrap_or_else(|e| {
                panic!("examples/workloads/{file}: its Pod fails the restricted profile: {e}")
            });
    }
}
