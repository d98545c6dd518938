//! The README's tour, step 6 ("A stage probes for Secrets, and the alert fires"): the Event it
//! shows is, word for word, what the operator says when the example pipeline's ingest stage is
//! refused `list secrets`. (tests/runtime_access.rs makes the same refusal against a real API
//! server; deploy/prometheus/access-anomalies.test.yaml fires the alert on the same series.)

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use portcullis::access::{
    Observation, Output, PodIps, Source, StageInfo, Thresholds, Tracker, Verdict,
};
use portcullis::api::{AIPipeline, AccessGuardrail};
use support::{read, root};

#[test]
fn the_tours_access_denied_event_is_what_the_operator_says_for_the_example() {
    let pipeline: AIPipeline =
        serde_saphyr::from_str(&read("examples/pipelines/fraud-detector.yaml")).unwrap();
    let guardrails: Vec<AccessGuardrail> = ["ingestion", "training", "deployment"]
        .iter()
        .map(|g| serde_saphyr::from_str(&read(&format!("examples/guardrails/{g}.yaml"))).unwrap())
        .collect();
    // examples/namespaces.yaml labels ml-fraud so.
    assert!(
        read("examples/namespaces.yaml")
            .contains("name: ml-fraud\n  labels:\n    portcullis.dev/tier: ml")
    );
    let labels = BTreeMap::from([("portcullis.dev/tier".to_string(), "ml".to_string())]);
    let validated = portcullis::api::validate::validate(&pipeline).expect("the example is valid");
    let plan = portcullis::plan::build(&validated, "ml-fraud", &labels, &guardrails);
    let ingest = StageInfo::from_plan(&plan, "uid", None)
        .into_iter()
        .find(|s| s.stage == "ingest")
        .expect("the ingest stage");

    let mut tracker = Tracker::new(Thresholds::default());
    let mut out = Vec::new();
    let user = ingest.user.clone();
    tracker.observe(
        Arc::new(ingest),
        Observation {
            source: Source::Kubernetes,
            user,
            verb: "list".into(),
            api_group: String::new(),
            resource: "secrets".into(),
            subresource: None,
            name: None,
            namespace: Some("ml-fraud".into()),
            verdict: Verdict::Deny,
            source_ip: Some("10.0.3.7".into()),
            user_agent: Some("kubectl/v1.36.2".into()),
            time: chrono::Utc::now(),
        },
        PodIps::Unknown,
        &mut out,
    );
    let message = out
        .iter()
        .find_map(|o| match o {
            Output::Anomaly(a, _) => Some(a.message.clone()),
            _ => None,
        })
        .expect("an AccessDenied anomaly");

    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let step = readme
        .split("**6. A stage probes for Secrets, and the alert fires.**")
        .nth(1)
        .expect("the tour's step 6");
    let event = step
        .lines()
        .find(|l| l.contains("Warning   AccessDenied   aipipeline/fraud-detector"))
        .expect("the Event in step 6");
    let shown = event
        .split("aipipeline/fraud-detector")
        .nth(1)
        .unwrap()
        .trim();
    assert_eq!(shown, message);
    assert!(step.contains("PortcullisStageAccessDenied"));
}
