use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::api::AIPipeline;
use crate::api::validate::validate;

fn guardrail(name: &str, spec: serde_json::Value) -> AccessGuardrail {
    let mut g: AccessGuardrail = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AccessGuardrail",
        "metadata": {"name": name, "generation": 1},
        "spec": spec,
    }))
    .expect("guardrail");
    g.metadata.uid = Some(format!("uid-{name}"));
    g
}

/// Training may read ConfigMaps in namespace `ml`.
fn configmaps_only() -> AccessGuardrail {
    guardrail(
        "ml-training",
        json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml"}},
            "roles": {"training": {"kubernetes": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
            ]}}
        }),
    )
}

/// A pipeline of one training stage asking for `resources`, get.
fn pipeline(name: &str, resources: &[&str]) -> AIPipeline {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}"), "generation": 1},
        "spec": {"stages": [{
            "name": "train",
            "role": "Training",
            "permissions": resources.iter().map(|r| json!({
                "apiGroups": [""], "resources": [r], "resourceNames": ["x"], "verbs": ["get"]
            })).collect::<Vec<_>>(),
        }]}
    }))
    .expect("pipeline")
}

fn facts(p: &AIPipeline, guardrails: &[AccessGuardrail]) -> PipelineFacts {
    let labels = crate::k8s::with_name_label(BTreeMap::new(), "ml");
    let valid = validate(p).expect("valid pipeline");
    PipelineFacts::of(&crate::plan::build(&valid, "ml", &labels, guardrails))
}

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(second).expect("time")
}

fn selected(names: &[(&str, u32)]) -> BTreeMap<String, u32> {
    names.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

#[test]
fn a_denial_is_attributed_to_the_guardrail_that_decided_it() {
    let g = configmaps_only();
    let f = facts(&pipeline("p", &["configmaps", "services"]), &[g]);
    assert_eq!(f.stages, vec![BTreeSet::from(["ml-training".to_string()])]);
    assert_eq!(f.denials.len(), 1, "{:?}", f.denials);
    let (by, denial) = &f.denials[0];
    assert_eq!(by, "ml-training");
    assert_eq!(
        (
            denial.pipeline.as_str(),
            denial.stage.as_str(),
            denial.reason
        ),
        ("p", "train", "OutsideGuardrail")
    );
    assert!(denial.item.contains("services"), "{}", denial.item);
}

#[test]
fn a_refused_role_is_the_refusing_guardrails_denial() {
    let g = guardrail(
        "serving-only",
        json!({
            "namespaceSelector": {},
            "allowedRoles": ["Deployment"],
            "roles": {"training": {"kubernetes": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
            ]}}
        }),
    );
    let f = facts(&pipeline("p", &["configmaps"]), &[g]);
    assert_eq!(f.stages, vec![BTreeSet::from(["serving-only".to_string()])]);
    assert!(
        f.denials
            .iter()
            .all(|(by, d)| by == "serving-only" && d.reason == "RoleNotAllowed"),
        "{:?}",
        f.denials
    );
    assert!(!f.denials.is_empty());
}

#[test]
fn counts_are_per_guardrail() {
    let g = configmaps_only();
    let a = facts(&pipeline("a", &["configmaps"]), std::slice::from_ref(&g));
    let b = facts(&pipeline("b", &["services"]), &[g]);
    let t = tally(&selected(&[("ml-training", 1), ("elsewhere", 0)]), [&a, &b]);
    let ml = &t["ml-training"];
    assert_eq!((ml.namespaces, ml.pipelines, ml.stages), (1, 2, 2));
    assert_eq!(ml.denials.len(), 1);
    assert_eq!(t["elsewhere"], Tally::default());
}

#[test]
fn an_invalid_guardrail_says_which_field_and_how_to_fix_it() {
    let g = guardrail(
        "bad-cidr",
        json!({"roles": {"training": {"network": {"egressCIDRs": ["10.0.0.0/33"]}}}}),
    );
    let s = status(
        &g,
        &Tally::default(),
        None,
        &mut FirstSeen::default(),
        at(100),
    );
    let valid = s
        .conditions
        .iter()
        .find(|c| c.type_ == VALID)
        .expect("Valid");
    assert_eq!(
        (valid.status.as_str(), valid.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(valid.message.contains("bad-cidr"), "{}", valid.message);
    assert!(
        valid
            .message
            .contains("spec.roles.training.network.egressCIDRs[0]"),
        "{}",
        valid.message
    );
    let good = status(
        &configmaps_only(),
        &Tally::default(),
        None,
        &mut FirstSeen::default(),
        at(100),
    );
    let valid = good
        .conditions
        .iter()
        .find(|c| c.type_ == VALID)
        .expect("Valid");
    assert_eq!(valid.status, "True");
}

#[test]
fn a_selector_that_selects_nothing_is_a_warning_condition() {
    let g = configmaps_only();
    let none = status(
        &g,
        &Tally::default(),
        None,
        &mut FirstSeen::default(),
        at(100),
    );
    let c = none
        .conditions
        .iter()
        .find(|c| c.type_ == SELECTS_NO_NAMESPACE)
        .expect("condition");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "NoNamespaceMatches")
    );
    assert!(
        c.message.contains("kubernetes.io/metadata.name=ml"),
        "{}",
        c.message
    );
    let some = Tally {
        namespaces: 2,
        ..Tally::default()
    };
    let s = status(&g, &some, Some(&none), &mut FirstSeen::default(), at(200));
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == SELECTS_NO_NAMESPACE)
        .expect("condition");
    assert_eq!(c.status, "False");
    assert_eq!(c.last_transition_time, Time(at(200)), "it changed");
    let valid = s
        .conditions
        .iter()
        .find(|c| c.type_ == VALID)
        .expect("Valid");
    assert_eq!(
        valid.last_transition_time,
        Time(at(100)),
        "it did not change"
    );
}

fn key(pipeline: &str, item: &str) -> DenialKey {
    DenialKey {
        namespace: "ml".into(),
        pipeline: pipeline.into(),
        stage: "train".into(),
        item: item.into(),
        reason: "OutsideGuardrail",
    }
}

fn with_denials(keys: &[DenialKey]) -> Tally {
    Tally {
        namespaces: 1,
        pipelines: 1,
        stages: 1,
        denials: keys.iter().cloned().collect(),
    }
}

#[test]
fn the_same_situation_gives_the_same_status_later() {
    let g = configmaps_only();
    let t = with_denials(&[key("a", "get secrets/x")]);
    let mut seen = FirstSeen::default();
    let first = status(&g, &t, None, &mut seen, at(100));
    assert_eq!(first.last_denials[0].first_seen, Time(at(100)));
    let again = status(&g, &t, Some(&first), &mut seen, at(500));
    assert_eq!(first, again, "nothing changed: nothing to write");
    // After a restart, the times come from the status.
    let restarted = status(&g, &t, Some(&first), &mut FirstSeen::default(), at(900));
    assert_eq!(first, restarted);
}

#[test]
fn the_newest_denials_are_listed_and_fixed_ones_leave() {
    let g = configmaps_only();
    let mut seen = FirstSeen::default();
    let old: Vec<DenialKey> = (0..12)
        .map(|i| key(&format!("p{i:02}"), "get secrets/x"))
        .collect();
    let s1 = status(&g, &with_denials(&old), None, &mut seen, at(100));
    assert_eq!(s1.denied, 12);
    assert_eq!(s1.last_denials.len(), LAST_DENIALS);
    let mut now = old.clone();
    now.push(key("new", "get secrets/x"));
    let s2 = status(&g, &with_denials(&now), Some(&s1), &mut seen, at(200));
    assert_eq!(s2.last_denials[0].pipeline, "new", "newest first");
    assert_eq!(s2.last_denials[0].first_seen, Time(at(200)));
    assert_eq!(s2.last_denials.len(), LAST_DENIALS);
    assert_eq!(s2.denied, 13);
    // Fixed: it leaves the list; the others keep their times.
    let s3 = status(&g, &with_denials(&old), Some(&s2), &mut seen, at(300));
    assert!(s3.last_denials.iter().all(|d| d.pipeline != "new"));
    assert!(
        s3.last_denials
            .iter()
            .all(|d| d.first_seen == Time(at(100)))
    );
    // A restart with a full list: the denials cut off it stay cut off.
    let restarted = status(
        &g,
        &with_denials(&old),
        Some(&s3),
        &mut FirstSeen::default(),
        at(400),
    );
    assert_eq!(s3, restarted);
}
