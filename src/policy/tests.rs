//! One test per rule and reason, through `evaluate_stage` as the planner calls it.

use std::collections::BTreeMap;

use super::scope::placeholders;
use super::*;
use crate::api::validate::validate;
use crate::api::{AIPipeline, AccessGuardrail, StageRole};

fn pipeline(yaml: &str) -> AIPipeline {
    serde_saphyr::from_str(yaml).expect("test pipeline parses")
}

fn guardrail(yaml: &str) -> AccessGuardrail {
    serde_saphyr::from_str(yaml).expect("test guardrail parses")
}

const TIER_ML: &str = "portcullis.dev/tier";

fn labels(tier: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TIER_ML.to_string(), tier.to_string()),
        ("kubernetes.io/metadata.name".to_string(), "ml".to_string()),
    ])
}

/// Decisions of stage `index`, as (item text, reason).
fn decide(
    p: &AIPipeline,
    index: usize,
    guardrails: &[AccessGuardrail],
    tier: &str,
) -> Vec<(String, Reason)> {
    let stage = &p.spec.stages[index];
    let labels = labels(tier);
    let scope = Scope::new(stage.role, &labels, guardrails);
    let ctx = StageContext {
        namespace: "ml",
        pipeline: "fraud",
        index,
        claims: None,
        cluster: None,
    };
    evaluate_stage(ctx, &validate(p).expect("test pipeline is valid"), &scope)
        .into_iter()
        .map(|d| (d.item.to_string(), d.reason))
        .collect()
}

fn reason_of(decisions: &[(String, Reason)], item: &str) -> Reason {
    decisions
        .iter()
        .find(|(i, _)| i == item)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| panic!("no decision for {item:?} in {decisions:#?}"))
}

const TRAINING_GUARDRAIL: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AccessGuardrail
metadata: {name: training}
spec:
  namespaceSelector: {matchLabels: {portcullis.dev/tier: ml}}
  roles:
    training:
      kubernetes:
        - apiGroups: [""]
          resources: [configmaps, secrets, pods]
          verbs: [get, list]
      network:
        egressCIDRs: [10.0.0.0/8, 0.0.0.0/0]
        egressNamespaces: ["{namespace}"]
      vault:
        paths:
          - pattern: kv/data/{namespace}/{pipeline}/{stage}/*
            capabilities: [read]
          - pattern: database/creds/{namespace}_{pipeline}_*
            capabilities: [read]
        maxTTL: 1h
"#;

const TWO_STAGES: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages:
    - name: train
      role: Training
      permissions:
        - apiGroups: [""]
          resources: [configmaps, secrets]
          resourceNames: [train-db, serve-db, nobodys]
          verbs: [get, delete]
        - apiGroups: [""]
          resources: [secrets]
          verbs: [get]
      network:
        egress:
          - cidr: 10.1.0.0/16
          - cidr: 172.16.0.0/12
            ports: [{port: 443}]
          - cidr: 0.0.0.0/0
          - namespace: ml
          - namespace: other
        ingress:
          - fromPodSelector: {matchLabels: {app: x}}
      vault:
        policies:
          - path: kv/data/ml/fraud/train/*
            capabilities: [read, update]
          - path: database/creds/*
            capabilities: [read]
        tokenTTL: 2h
        credentials:
          - {name: db, path: database/creds/ml_fraud_train, ttl: 30m, secretName: train-db}
          - {name: long, path: database/creds/ml_fraud_long, ttl: 3h, secretName: train-long}
          - {name: shared, path: database/creds/ml_fraud_serve, ttl: 10m, secretName: train-shared}
    - name: serve
      role: Training
      vault:
        credentials:
          - {name: db, path: database/creds/ml_fraud_serve, ttl: 10m, secretName: serve-db}
"#;

#[test]
fn allowed_items_name_the_guardrail() {
    let p = pipeline(TWO_STAGES);
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(
        reason_of(&d, "get configmaps/train-db,serve-db,nobodys"),
        Reason::WithinGuardrail
    );
    assert_eq!(
        reason_of(&d, "egress 10.1.0.0/16 all ports"),
        Reason::WithinGuardrail
    );
    assert_eq!(
        reason_of(&d, "egress namespace ml all ports"),
        Reason::WithinGuardrail
    );
    assert_eq!(
        reason_of(&d, "vault read kv/data/ml/fraud/train/*"),
        Reason::WithinGuardrail
    );
    assert_eq!(
        reason_of(
            &d,
            "credential db from database/creds/ml_fraud_train ttl 30m"
        ),
        Reason::WithinGuardrail
    );
}

#[test]
fn outside_the_guardrail_is_denied_per_item() {
    let p = pipeline(TWO_STAGES);
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(
        reason_of(&d, "delete configmaps/train-db,serve-db,nobodys"),
        Reason::OutsideGuardrail
    );
    assert_eq!(
        reason_of(&d, "egress 172.16.0.0/12 TCP/443"),
        Reason::WithinGuardrail,
        "inside 0.0.0.0/0"
    );
    assert_eq!(
        reason_of(&d, "egress namespace other all ports"),
        Reason::OutsideGuardrail
    );
    assert_eq!(
        reason_of(&d, "ingress from pods app=x all ports"),
        Reason::OutsideGuardrail
    );
    assert_eq!(
        reason_of(&d, "vault update kv/data/ml/fraud/train/*"),
        Reason::OutsideGuardrail
    );
}

#[test]
fn secrets_are_decided_by_name_and_owner() {
    let p = pipeline(TWO_STAGES);
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(
        reason_of(&d, "get secrets/train-db"),
        Reason::WithinGuardrail
    );
    assert_eq!(
        reason_of(&d, "get secrets/serve-db"),
        Reason::CrossStageCredential
    );
    assert_eq!(reason_of(&d, "get secrets/nobodys"), Reason::SecretNotOwned);
    assert_eq!(reason_of(&d, "get secrets"), Reason::SecretNotOwned);
}

#[test]
fn other_stages_credentials_are_out_of_reach() {
    let p = pipeline(TWO_STAGES);
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    // database/creds/* reaches the serve stage's database/creds/ml_fraud_serve.
    assert_eq!(
        reason_of(&d, "vault read database/creds/*"),
        Reason::CrossStageCredential
    );
    // The first stage to declare a credential path owns it: train declares fraud-serve first.
    assert_eq!(
        reason_of(
            &d,
            "credential shared from database/creds/ml_fraud_serve ttl 10m"
        ),
        Reason::WithinGuardrail
    );
    let serve = decide(&p, 1, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(
        reason_of(
            &serve,
            "credential db from database/creds/ml_fraud_serve ttl 10m"
        ),
        Reason::CrossStageCredential
    );
}

#[test]
fn lifetimes_above_max_ttl_are_too_long() {
    let p = pipeline(TWO_STAGES);
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(
        reason_of(
            &d,
            "credential long from database/creds/ml_fraud_long ttl 3h"
        ),
        Reason::TtlTooLong
    );
    assert_eq!(reason_of(&d, "vault token ttl 2h"), Reason::TtlTooLong);
}

#[test]
fn dns_is_granted_unless_a_guardrail_turns_it_off() {
    let p = pipeline(TWO_STAGES);
    let d = decide(&p, 1, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(
        reason_of(&d, "egress dns kube-system/kube-dns UDP/53,TCP/53"),
        Reason::DnsByDefault
    );
    let no_dns = guardrail(&TRAINING_GUARDRAIL.replace("spec:\n", "spec:\n  dnsEgress: false\n"));
    let d = decide(&p, 1, &[guardrail(TRAINING_GUARDRAIL), no_dns], "ml");
    assert!(d.iter().all(|(i, _)| !i.contains("dns")), "{d:#?}");
}

#[test]
fn no_applicable_guardrail_means_identity_only() {
    let p = pipeline(TWO_STAGES);
    // The namespace is not selected: every requested item is denied, DNS is not granted.
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "web");
    assert!(!d.is_empty());
    assert!(
        d.iter()
            .all(|(_, r)| *r != Reason::WithinDefaults && *r != Reason::DnsByDefault),
        "{d:#?}"
    );
    assert_eq!(
        reason_of(&d, "get configmaps/train-db,serve-db,nobodys"),
        Reason::OutsideGuardrail
    );
    assert_eq!(
        reason_of(&d, "vault read kv/data/ml/fraud/train/*"),
        Reason::OutsideGuardrail
    );
    assert_eq!(
        reason_of(
            &d,
            "credential db from database/creds/ml_fraud_train ttl 30m"
        ),
        Reason::OutsideGuardrail
    );
    // A guardrail that selects the namespace but sets no ceiling for Training does not apply.
    let serving_only = guardrail(&TRAINING_GUARDRAIL.replace("    training:", "    deployment:"));
    let d = decide(&p, 0, &[serving_only], "ml");
    assert_eq!(
        reason_of(&d, "get configmaps/train-db,serve-db,nobodys"),
        Reason::OutsideGuardrail
    );
}

#[test]
fn a_role_the_namespace_may_not_use_gets_identity_only() {
    let p = pipeline(TWO_STAGES);
    let restricted =
        guardrail(&TRAINING_GUARDRAIL.replace("spec:\n", "spec:\n  allowedRoles: [Ingestion]\n"));
    let d = decide(&p, 0, &[restricted], "ml");
    assert!(
        d.iter()
            .all(|(_, r)| *r != Reason::WithinGuardrail && *r != Reason::DnsByDefault)
    );
    assert_eq!(
        reason_of(&d, "get configmaps/train-db,serve-db,nobodys"),
        Reason::RoleNotAllowed
    );
}

#[test]
fn an_invalid_guardrail_fails_closed() {
    let p = pipeline(TWO_STAGES);
    // The old, ambiguous pattern: the guardrail is invalid, and denies instead of allowing.
    let ambiguous = guardrail(&TRAINING_GUARDRAIL.replace(
        "database/creds/{namespace}_{pipeline}_*",
        "database/creds/{pipeline}-*",
    ));
    let d = decide(&p, 0, &[ambiguous], "ml");
    assert_eq!(
        reason_of(&d, "get configmaps/train-db,serve-db,nobodys"),
        Reason::InvalidGuardrail
    );
    // A namespaceSelector that does not parse applies everywhere, and denies.
    let broken = guardrail(&TRAINING_GUARDRAIL.replace(
        "namespaceSelector: {matchLabels: {portcullis.dev/tier: ml}}",
        "namespaceSelector: {matchExpressions: [{key: tier, operator: Bogus}]}",
    ));
    let d = decide(&p, 0, &[broken], "web");
    assert_eq!(
        reason_of(&d, "get configmaps/train-db,serve-db,nobodys"),
        Reason::InvalidGuardrail
    );
}

#[test]
fn several_guardrails_intersect_and_the_refusing_one_is_named() {
    let p = pipeline(TWO_STAGES);
    let strict = guardrail(
        &TRAINING_GUARDRAIL
            .replace("name: training", "name: strict")
            .replace("[10.0.0.0/8, 0.0.0.0/0]", "[10.0.0.0/8]")
            .replace("maxTTL: 1h", "maxTTL: 20m"),
    );
    let labels = labels("ml");
    let guardrails = [guardrail(TRAINING_GUARDRAIL), strict];
    let scope = Scope::new(StageRole::Training, &labels, &guardrails);
    assert_eq!(scope.max_ttl, 20 * 60, "the smallest maxTTL wins");
    let ctx = StageContext {
        namespace: "ml",
        pipeline: "fraud",
        index: 0,
        claims: None,
        cluster: None,
    };
    let decisions = evaluate_stage(ctx, &validate(p).expect("test pipeline is valid"), &scope);
    let wide = decisions
        .iter()
        .find(|d| d.item.to_string() == "egress 0.0.0.0/0 all ports")
        .expect("decided");
    assert_eq!(wide.reason, Reason::OutsideGuardrail);
    assert!(
        wide.message
            .contains("AccessGuardrail strict (spec.roles.training.network.egressCIDRs)"),
        "{}",
        wide.message
    );
    let db = decisions
        .iter()
        .find(|d| d.item.to_string().starts_with("credential db"))
        .expect("decided");
    assert_eq!(db.reason, Reason::TtlTooLong);
    assert!(db.message.contains("maxTTL 20m"), "{}", db.message);
}

#[test]
fn every_floor_reason_reaches_the_decisions() {
    let p = pipeline(
        r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages:
    - name: train
      role: Training
      permissions:
        - {apiGroups: ["*"], resources: [pods], verbs: [get]}
        - {apiGroups: [""], resources: [pods], verbs: [impersonate]}
        - {apiGroups: [""], resources: [pods/exec], verbs: [create]}
        - {apiGroups: [""], resources: [nodes], verbs: [get]}
        - {apiGroups: [rbac.authorization.k8s.io], resources: [roles], verbs: [create]}
      network:
        egress:
          - cidr: 169.254.169.254/32
      vault:
        policies:
          - {path: sys/mounts, capabilities: [read]}
          - {path: kv/data/ml/fraud/train/x, capabilities: [sudo]}
          - {path: +/data/x, capabilities: [read]}
"#,
    );
    let d = decide(&p, 0, &[guardrail(TRAINING_GUARDRAIL)], "ml");
    assert_eq!(reason_of(&d, "get pods.*"), Reason::WildcardForbidden);
    assert_eq!(reason_of(&d, "impersonate pods"), Reason::EscalationVerb);
    assert_eq!(
        reason_of(&d, "create pods/exec"),
        Reason::ForbiddenSubresource
    );
    assert_eq!(reason_of(&d, "get nodes"), Reason::ClusterScoped);
    assert_eq!(
        reason_of(&d, "create roles.rbac.authorization.k8s.io"),
        Reason::PrivilegedWrite
    );
    assert_eq!(
        reason_of(&d, "egress 169.254.169.254/32 all ports"),
        Reason::MetadataEndpoint
    );
    assert_eq!(
        reason_of(&d, "vault read sys/mounts"),
        Reason::VaultSystemPath
    );
    assert_eq!(
        reason_of(&d, "vault sudo kv/data/ml/fraud/train/x"),
        Reason::SudoCapability
    );
    assert_eq!(
        reason_of(&d, "vault read +/data/x"),
        Reason::WildcardForbidden
    );
    assert!(
        d.iter().all(|(i, _)| !i.starts_with("vault token")),
        "no path allowed, so no token: {d:#?}"
    );
}

#[test]
fn a_secret_of_a_denied_credential_is_not_readable() {
    // The credential is denied (no guardrail: the defaults issue none), so its Secret is never
    // delivered; naming it must not open an existing Secret of that name.
    let p = pipeline(
        r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: nb, namespace: ml}
spec:
  stages:
    - name: explore
      role: Training
      permissions:
        - {apiGroups: [""], resources: [secrets], resourceNames: [prod-db-admin], verbs: [get]}
      vault:
        credentials:
          - {name: db, path: database/creds/warehouse-reader, ttl: 30m, secretName: prod-db-admin}
"#,
    );
    let d = decide(&p, 0, &[], "none");
    assert_eq!(
        reason_of(
            &d,
            "credential db from database/creds/warehouse-reader ttl 30m"
        ),
        Reason::OutsideGuardrail
    );
    assert_eq!(
        reason_of(&d, "get secrets/prod-db-admin"),
        Reason::SecretNotOwned
    );
}

#[test]
fn the_defaults_issue_no_credentials_even_under_the_stages_kv_path() {
    let p = pipeline(
        r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages:
    - name: train
      role: Training
      vault:
        credentials:
          - {name: kv, path: kv/data/ml/fraud/train/db, ttl: 10m, secretName: train-kv}
"#,
    );
    let d = decide(&p, 0, &[], "none");
    assert_eq!(
        reason_of(&d, "credential kv from kv/data/ml/fraud/train/db ttl 10m"),
        Reason::OutsideGuardrail
    );
}

#[test]
fn placeholders_fill_in_as_three_replacements_would() {
    let ctx = |namespace, pipeline| StageContext {
        namespace,
        pipeline,
        index: 0,
        claims: None,
        cluster: None,
    };
    let sequential = |pattern: &str, c: StageContext<'_>, stage: &str| {
        pattern
            .replace("{namespace}", c.namespace)
            .replace("{pipeline}", c.pipeline)
            .replace("{stage}", stage)
    };
    let patterns = [
        "kv/data/{namespace}/{pipeline}/{stage}/*",
        "kv/metadata/{stage}/{stage}-{pipeline}",
        "database/creds/{namespace}_{pipeline}_*",
        "no/placeholders/*",
        "{namespace}{pipeline}{stage}",
        // Not valid in a guardrail, but filled in the same way all the same.
        "kv/{unknown}/{namespace}",
        "kv/{{namespace}}/x",
        "kv/{pipe{namespace}}/x",
        "kv/{namespace",
        "kv/}{stage}{",
    ];
    let contexts = [
        (ctx("ml", "fraud.v2"), "train"),
        (ctx("ml", "fraud"), "ingest"),
        // Values that hold braces (a namespace from -n is not validated).
        (ctx("pipeline}", "x"), "s"),
        (ctx("{stage}", "{namespace}"), "s"),
    ];
    for pattern in patterns {
        for (c, stage) in contexts {
            assert_eq!(
                placeholders(pattern, c, stage),
                sequential(pattern, c, stage),
                "{pattern} in {c:?}, stage {stage}"
            );
        }
    }
}

#[test]
fn ingress_sources_are_bounded_by_the_ceiling() {
    let p = pipeline(
        r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages:
    - name: serve
      role: Training
      network:
        ingress:
          - fromNamespaceSelector: {matchLabels: {kubernetes.io/metadata.name: payments}}
          - fromNamespaceSelector: {matchLabels: {kubernetes.io/metadata.name: attacker}}
          - fromNamespaceSelector: {}
          - fromPodSelector: {matchLabels: {app: x}}
          - fromCIDR: 10.1.0.0/16
          - fromCIDR: 0.0.0.0/0
"#,
    );
    let bounded = guardrail(&TRAINING_GUARDRAIL.replace(
        "        egressNamespaces: [\"{namespace}\"]\n",
        "        egressNamespaces: [\"{namespace}\"]\n        allowIngress: true\n        ingressNamespaces: [\"{namespace}\", payments]\n        ingressCIDRs: [10.0.0.0/8]\n",
    ));
    let d = decide(&p, 0, &[bounded], "ml");
    let reasons: Vec<Reason> = d
        .iter()
        .filter(|(i, _)| i.starts_with("ingress"))
        .map(|(_, r)| *r)
        .collect();
    assert_eq!(
        reasons,
        [
            Reason::WithinGuardrail,
            Reason::OutsideGuardrail,
            Reason::OutsideGuardrail,
            Reason::WithinGuardrail,
            Reason::WithinGuardrail,
            Reason::OutsideGuardrail,
        ],
        "{d:#?}"
    );
}

#[test]
fn each_decision_names_the_guardrail_that_decided_it() {
    let p = pipeline(TWO_STAGES);
    let labels = labels("ml");
    let guardrails = [guardrail(TRAINING_GUARDRAIL)];
    let scope = Scope::new(p.spec.stages[0].role, &labels, &guardrails);
    let ctx = StageContext {
        namespace: "ml",
        pipeline: "fraud",
        index: 0,
        claims: None,
        cluster: None,
    };
    let decisions = evaluate_stage(ctx, &validate(&p).expect("valid"), &scope);
    let by_item = |item: &str| {
        decisions
            .iter()
            .find(|d| d.item.to_string() == item)
            .unwrap_or_else(|| panic!("no decision for {item}"))
    };
    for item in [
        "get configmaps/train-db,serve-db,nobodys",
        "delete configmaps/train-db,serve-db,nobodys",
    ] {
        assert_eq!(
            by_item(item).guardrail.as_deref(),
            Some("training"),
            "{item}"
        );
    }
    // The floor and the built-in DNS grant are no guardrail's.
    for d in &decisions {
        if !matches!(d.reason, Reason::WithinGuardrail | Reason::OutsideGuardrail) {
            assert_eq!(d.guardrail, None, "{d:?}");
        }
    }
}

const RESTARTING: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages:
    - name: train
      role: Training
      permissions:
        - {apiGroups: [""], resources: [secrets], resourceNames: [train-db], verbs: [get]}
      vault:
        credentials:
          - name: db
            path: database/creds/ml_fraud_train
            ttl: 30m
            secretName: train-db
            restartTargets:
              - {kind: Deployment, name: trainer}
              - {kind: Deployment, name: scorer}
              - {kind: StatefulSet, name: gone}
"#;

fn plan_with(p: &AIPipeline, facts: Option<&ClusterFacts>) -> crate::plan::Plan {
    crate::plan::validate_and_build_with(
        p,
        "ml",
        &labels("ml"),
        &[guardrail(TRAINING_GUARDRAIL)],
        crate::plan::PlanOptions {
            cluster: facts,
            ..crate::plan::PlanOptions::default()
        },
    )
    .expect("valid")
}

fn facts(secret: SecretFact, trainer_runs_as: &str) -> ClusterFacts {
    use crate::api::WorkloadKind;
    ClusterFacts {
        secrets: BTreeMap::from([("train-db".to_string(), secret)]),
        workloads: BTreeMap::from([
            (
                (WorkloadKind::Deployment, "trainer".to_string()),
                WorkloadFact::RunsAs(trainer_runs_as.into()),
            ),
            (
                (WorkloadKind::Deployment, "scorer".to_string()),
                WorkloadFact::RunsAs("other-serve".into()),
            ),
            (
                (WorkloadKind::StatefulSet, "gone".to_string()),
                WorkloadFact::Absent,
            ),
        ]),
    }
}

#[test]
fn a_secret_that_exists_and_is_not_the_pipelines_is_refused_with_its_owner_named() {
    let p = pipeline(RESTARTING);
    let foreign = SecretFact::Foreign("a Helm release Secret (release \"vault\")".into());
    let plan = plan_with(&p, Some(&facts(foreign, "fraud-train")));
    for item in [
        "get secrets/train-db",
        "credential db from database/creds/ml_fraud_train ttl 30m",
    ] {
        let d = plan
            .decisions
            .iter()
            .find(|d| d.item.to_string() == item)
            .unwrap_or_else(|| panic!("no decision for {item}"));
        assert_eq!(d.reason, Reason::ForeignSecret, "{item}");
        assert!(d.message.contains("Helm release"), "{}", d.message);
    }
    let rules = plan.objects.iter().any(|o| o.kind() == "Role");
    assert!(!rules, "a Role was planned for a foreign Secret");
    assert!(plan.vault.credentials.is_empty());

    // The pipeline's own Secret, or none yet: granted, and verified.
    for fact in [SecretFact::Owned, SecretFact::Absent] {
        let plan = plan_with(&p, Some(&facts(fact, "fraud-train")));
        let d = plan
            .decisions
            .iter()
            .find(|d| d.item.to_string() == "get secrets/train-db")
            .expect("decided");
        assert!(d.is_allowed(), "{}", d.message);
        assert_eq!(plan.unverified(d), None);
    }
    // A name the controller could not look up, or did not, is refused, not granted.
    let forbidden = SecretFact::Unknown("the operator may not read Secrets in ml".into());
    let mut missing = facts(SecretFact::Owned, "fraud-train");
    missing.secrets.clear();
    for unknown in [facts(forbidden, "fraud-train"), missing] {
        let plan = plan_with(&p, Some(&unknown));
        let secret_items: Vec<_> = plan
            .decisions
            .iter()
            .filter(|d| matches!(d.item, Item::Kubernetes { .. } | Item::Credential { .. }))
            .collect();
        assert_eq!(secret_items.len(), 2);
        assert!(
            secret_items
                .iter()
                .all(|d| d.reason == Reason::ForeignSecret),
            "{secret_items:?}"
        );
    }
}

#[test]
fn restart_targets_are_decided_and_only_the_pipelines_own_are_planned() {
    let p = pipeline(RESTARTING);
    let plan = plan_with(&p, Some(&facts(SecretFact::Owned, "fraud-train")));
    let reason = |item: &str| {
        plan.decisions
            .iter()
            .find(|d| d.item.to_string() == item)
            .map(|d| (d.reason, d.field.clone()))
            .unwrap_or_else(|| panic!("no decision for {item}"))
    };
    assert_eq!(
        reason("restart Deployment trainer for credential db"),
        (
            Reason::WithinGuardrail,
            "spec.stages[0].vault.credentials[0].restartTargets[0]".into()
        )
    );
    let (r, _) = reason("restart Deployment scorer for credential db");
    assert_eq!(r, Reason::ForeignWorkload);
    let (r, _) = reason("restart StatefulSet gone for credential db");
    assert_eq!(r, Reason::WithinGuardrail);
    let targets: Vec<&str> = plan.vault.credentials[0]
        .restart_targets
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(targets, ["trainer", "gone"]);

    // A workload running as `default` (anyone's) is not the pipeline's either.
    let plan = plan_with(&p, Some(&facts(SecretFact::Owned, "default")));
    assert!(
        plan.vault.credentials[0]
            .restart_targets
            .iter()
            .all(|t| t.name == "gone")
    );
}

#[test]
fn offline_grants_on_named_secrets_and_restart_targets_are_unverified() {
    let p = pipeline(RESTARTING);
    let plan = plan_with(&p, None);
    let unverified: Vec<String> = plan
        .decisions
        .iter()
        .filter(|d| plan.unverified(d).is_some())
        .map(|d| d.item.to_string())
        .collect();
    assert_eq!(
        unverified,
        [
            "get secrets/train-db",
            "credential db from database/creds/ml_fraud_train ttl 30m",
            "restart Deployment trainer for credential db",
            "restart Deployment scorer for credential db",
            "restart StatefulSet gone for credential db",
        ]
    );
    assert!(plan.decisions.iter().all(|d| d.is_allowed()));
}
