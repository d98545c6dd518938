//! Decisions published as `wgpolicyk8s.io/v1alpha2` PolicyReports when the API server serves
//! them (the CRD Kyverno and Policy Reporter install): one per pipeline, a result per decision.

mod support;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use portcullis::api::AIPipeline;
use serde_json::json;
use support::{Operator, WAIT, create_pipeline, example, guarded_namespace, wait_for, wait_ready};

/// The PolicyReport kind as the reporting working group's CRD serves it (its schema trimmed to
/// what the API server needs: the report's fields are kept as they are sent).
async fn install_policy_report_crd(client: &kube::Client) {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "policyreports.wgpolicyk8s.io"},
        "spec": {
            "group": "wgpolicyk8s.io",
            "names": {"kind": "PolicyReport", "listKind": "PolicyReportList", "plural": "policyreports", "singular": "policyreport", "shortNames": ["polr"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1alpha2", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating the PolicyReport CRD: {e}"),
    }
    wait_for("PolicyReports to be served", WAIT, || async {
        client
            .list_api_group_resources("wgpolicyk8s.io/v1alpha2")
            .await
            .ok()
            .filter(|l| l.resources.iter().any(|r| r.name == "policyreports"))
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn each_pipeline_gets_a_policy_report_of_its_decisions() {
    let (client, ns, _) = guarded_namespace("reports").await;
    install_policy_report_crd(&client).await;
    let mut op = Operator::start_with(
        "operator",
        &ns,
        None,
        tempfile::tempdir().unwrap(),
        &["--policy-reports".into()],
    );
    let mut pipeline = example("examples/pipelines/fraud-detector.yaml", &ns);
    for stage in &mut pipeline.spec.stages {
        stage.vault = None;
    }
    create_pipeline(&client, &pipeline).await;
    let live = wait_ready(&client, &ns, "fraud-detector", "True", &op).await;
    let status = live.status.unwrap();

    let resource = ApiResource {
        group: "wgpolicyk8s.io".into(),
        version: "v1alpha2".into(),
        api_version: "wgpolicyk8s.io/v1alpha2".into(),
        kind: "PolicyReport".into(),
        plural: "policyreports".into(),
    };
    let reports: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let report = wait_for("the PolicyReport", WAIT, || {
        let reports = reports.clone();
        async move { reports.get_opt("portcullis-fraud-detector").await.ok()? }
    })
    .await;
    let data = &report.data;
    let results = data["results"].as_array().unwrap();
    let fails: Vec<_> = results.iter().filter(|r| r["result"] == "fail").collect();
    assert_eq!(data["summary"]["fail"], status.denied);
    assert_eq!(fails.len(), status.denied as usize);
    assert!(
        !fails.is_empty(),
        "the example asks for a Secret it does not own"
    );
    let granted: u32 = status.stages.iter().map(|s| s.granted).sum();
    assert_eq!(data["summary"]["pass"], granted);
    for f in &fails {
        assert_eq!(f["source"], "portcullis");
        assert!(
            f["rule"]
                .as_str()
                .unwrap()
                .chars()
                .all(char::is_alphanumeric),
            "{f}"
        );
        assert!(!f["message"].as_str().unwrap().is_empty());
        assert!(f["properties"]["stage"].is_string());
    }
    assert_eq!(data["scope"]["kind"], "AIPipeline");
    assert_eq!(
        data["scope"]["uid"],
        live.metadata.uid.clone().unwrap().as_str()
    );

    // The report goes with the pipeline.
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    pipelines
        .delete("fraud-detector", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the report to be collected", WAIT, || {
        let reports = reports.clone();
        async move {
            match reports.get_opt("portcullis-fraud-detector").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    op.stop();
}
