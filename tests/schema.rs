//! The CRD schemas: the committed CRDs match the code, the schema's patterns and the Rust
//! validators agree, the schema says what `kubectl explain` and `kubectl get` need, and the CEL
//! rules, as a real API server runs them, accept and refuse what `validate_pipeline` accepts and
//! refuses.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom, as the user would go"
)]

mod support;

use std::path::Path;
use std::sync::OnceLock;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use portcullis::api::validate::{
    FieldError, is_dns_label, is_dns_subdomain, parse_duration, validate_guardrail,
    validate_pipeline,
};
use portcullis::api::{
    AIPipeline, AIPipelineSpec, AccessGuardrail, AccessGuardrailSpec, Ceiling, EgressRule,
    IngressRule, KubernetesCeiling, NetworkCeiling, PermissionRule, RestartTarget, RoleCeilings,
    Stage, StageNetwork, StageRole, StageVault, VaultCapability, VaultCeiling, VaultCredential,
    VaultPathCeiling, VaultPathRule, WorkloadKind, patterns,
};
use proptest::prelude::*;
use regex::Regex;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The committed CRDs
// ---------------------------------------------------------------------------------------------

#[test]
fn committed_crds_match_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/portcullis.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run `make crds` and commit the result",
            path.display()
        )
    });
    let generated = portcullis::api::crds_yaml();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "crds/portcullis.yaml is out of date with src/api (first difference at line {}); run `make crds` and commit the result\n{}",
            line + 1,
            pretty_assertions::StrComparison::new(&committed, &generated)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the generated schema
// ---------------------------------------------------------------------------------------------

fn crd(kind: &str) -> Value {
    portcullis::api::crds()
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn version(kind: &str) -> Value {
    let crd = crd(kind);
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "one served version");
    versions[0].clone()
}

fn root_schema(kind: &str) -> Value {
    version(kind)["schema"]["openAPIV3Schema"].clone()
}

/// The schema at `path`: property names, with `[]` for the items of a list.
fn schema_at(kind: &str, path: &str) -> Value {
    let mut node = root_schema(kind);
    for part in path.split('.') {
        node = if part == "[]" {
            node["items"].clone()
        } else {
            node["properties"][part].clone()
        };
        assert!(!node.is_null(), "{kind}: no schema at {path} ({part})");
    }
    node
}

#[test]
fn aipipeline_crd_has_names_columns_and_status() {
    let crd = crd("AIPipeline");
    let names = &crd["spec"]["names"];
    assert_eq!(crd["spec"]["group"], "portcullis.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(names["plural"], "aipipelines");
    assert_eq!(names["shortNames"], json!(["aip"]));
    assert_eq!(names["categories"], json!(["portcullis"]));
    let v = version("AIPipeline");
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(v["served"], true);
    assert_eq!(v["storage"], true);
    assert_eq!(v["subresources"]["status"], json!({}), "status subresource");
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Ready", "Stages", "Denied", "Uncovered", "Age"]);
    for c in v["additionalPrinterColumns"].as_array().unwrap() {
        assert!(
            c["jsonPath"].as_str().is_some_and(|p| p.starts_with('.')),
            "{c}"
        );
    }
}

#[test]
fn aipipeline_stages_are_a_map_keyed_by_name() {
    let stages = schema_at("AIPipeline", "spec.stages");
    assert_eq!(stages["type"], "array");
    assert_eq!(stages["x-kubernetes-list-type"], "map");
    assert_eq!(stages["x-kubernetes-list-map-keys"], json!(["name"]));
    assert_eq!(stages["maxItems"], 16);
    assert_eq!(stages["minItems"], 1);
    let required = stages["items"]["required"].as_array().unwrap();
    assert!(
        required.contains(&json!("name")),
        "a list-map key must be required"
    );

    let name = schema_at("AIPipeline", "spec.stages.[].name");
    assert_eq!(name["pattern"], patterns::DNS_LABEL);
    assert_eq!(name["maxLength"], 40);
    assert_eq!(name["minLength"], 1);

    let role = schema_at("AIPipeline", "spec.stages.[].role");
    assert_eq!(role["enum"], json!(["Ingestion", "Training", "Deployment"]));

    for path in [
        "spec.stages.[].network.egress.[].ports.[].port",
        "spec.stages.[].network.ingress.[].ports.[].port",
    ] {
        let port = schema_at("AIPipeline", path);
        assert_eq!(port["minimum"].as_f64(), Some(1.0), "{path}");
        assert_eq!(port["maximum"].as_f64(), Some(65535.0), "{path}");
    }
    let credentials = schema_at("AIPipeline", "spec.stages.[].vault.credentials");
    assert_eq!(credentials["x-kubernetes-list-type"], "map");
    assert_eq!(credentials["x-kubernetes-list-map-keys"], json!(["name"]));
}

#[test]
fn access_guardrail_is_cluster_scoped() {
    let crd = crd("AccessGuardrail");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["agr"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["portcullis"]));
}

/// Fields whose schema comes from k8s-openapi (LabelSelector, Condition), not from src/api.
const UPSTREAM_TYPES: &[&str] = &[
    "podSelector",
    "fromNamespaceSelector",
    "fromPodSelector",
    "namespaceSelector",
    "conditions",
];

fn walk_descriptions(
    node: &Value,
    path: &str,
    upstream: bool,
    missing: &mut Vec<String>,
    skipped: &mut Vec<String>,
) {
    if let Some(props) = node["properties"].as_object() {
        for (name, prop) in props {
            let p = format!("{path}.{name}");
            let described = prop["description"]
                .as_str()
                .is_some_and(|d| !d.trim().is_empty());
            if !described {
                if upstream {
                    skipped.push(p.clone());
                } else {
                    missing.push(p.clone());
                }
            }
            walk_descriptions(
                prop,
                &p,
                upstream || UPSTREAM_TYPES.contains(&name.as_str()),
                missing,
                skipped,
            );
        }
    }
    if node["items"].is_object() {
        walk_descriptions(
            &node["items"],
            &format!("{path}[]"),
            upstream,
            missing,
            skipped,
        );
    }
    if node["additionalProperties"].is_object() {
        walk_descriptions(
            &node["additionalProperties"],
            &format!("{path}{{}}"),
            upstream,
            missing,
            skipped,
        );
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    for kind in ["AIPipeline", "AccessGuardrail"] {
        let root = root_schema(kind);
        assert!(
            root["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{kind} has no description"
        );
        let (mut missing, mut skipped) = (Vec::new(), Vec::new());
        walk_descriptions(&root, kind, false, &mut missing, &mut skipped);
        if !skipped.is_empty() {
            eprintln!(
                "{kind}: fields of k8s-openapi types without a description (skipped): {skipped:?}"
            );
        }
        assert!(
            missing.is_empty(),
            "{kind}: fields without a description (add a doc comment in src/api): {missing:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Schema patterns and Rust validators agree
// ---------------------------------------------------------------------------------------------

fn base_pipeline() -> AIPipeline {
    let stage = Stage {
        name: "train".into(),
        role: StageRole::Training,
        pod_selector: None,
        automount_service_account_token: None,
        permissions: vec![PermissionRule {
            api_groups: vec![String::new()],
            resources: vec!["configmaps".into()],
            resource_names: vec![],
            verbs: vec!["get".into()],
        }],
        network: Some(StageNetwork {
            egress: vec![
                EgressRule {
                    cidr: Some("10.0.0.0/8".into()),
                    ..EgressRule::default()
                },
                EgressRule {
                    namespace: Some("ml-platform".into()),
                    ..EgressRule::default()
                },
            ],
            ingress: vec![IngressRule {
                from_cidr: Some("10.0.0.0/8".into()),
                ..IngressRule::default()
            }],
        }),
        vault: Some(StageVault {
            policies: vec![VaultPathRule {
                path: "kv/data/x/*".into(),
                capabilities: vec![VaultCapability::Read],
            }],
            token_ttl: Some("10m".into()),
            credentials: vec![VaultCredential {
                name: "db".into(),
                path: "database/creds/x".into(),
                ttl: "10m".into(),
                secret_name: "train-db".into(),
                restart_targets: vec![RestartTarget {
                    kind: WorkloadKind::Deployment,
                    name: "trainer".into(),
                }],
            }],
        }),
        produces: vec!["configmaps/features".into()],
    };
    let mut p = AIPipeline::new(
        "fraud",
        AIPipelineSpec {
            stages: vec![stage],
        },
    );
    p.metadata.namespace = Some("ml".into());
    assert_eq!(validate_pipeline(&p), vec![], "the base pipeline is valid");
    p
}

fn base_guardrail() -> AccessGuardrail {
    let g = AccessGuardrail::new(
        "g",
        AccessGuardrailSpec {
            namespace_selector: Default::default(),
            dns_egress: true,
            enforcement: Default::default(),
            isolate_unselected_pods: false,
            roles: RoleCeilings {
                training: Some(Ceiling {
                    kubernetes: vec![KubernetesCeiling {
                        api_groups: vec![String::new()],
                        resources: vec!["configmaps".into()],
                        verbs: vec!["get".into()],
                    }],
                    network: NetworkCeiling {
                        egress_cidrs: vec!["10.0.0.0/8".into()],
                        egress_namespaces: vec!["ml-platform".into()],
                        allow_ingress: false,
                        ingress_cidrs: vec!["10.0.0.0/8".into()],
                        ingress_namespaces: vec!["{namespace}".into()],
                    },
                    vault: VaultCeiling {
                        paths: vec![VaultPathCeiling {
                            pattern: "kv/*".into(),
                            capabilities: vec![VaultCapability::Read],
                        }],
                        max_ttl: Some("1h".into()),
                    },
                    allow_workload_creation: false,
                }),
                ..RoleCeilings::default()
            },
            allowed_roles: vec![StageRole::Training],
            credential_endpoints: vec!["10.96.0.10/32".into()],
            pod_creating_resources: vec!["workflows.argoproj.io".into()],
        },
    );
    assert_eq!(
        validate_guardrail(&g),
        vec![],
        "the base guardrail is valid"
    );
    g
}

fn stage(p: &mut AIPipeline) -> &mut Stage {
    &mut p.spec.stages[0]
}

fn vault(p: &mut AIPipeline) -> &mut StageVault {
    stage(p).vault.as_mut().unwrap()
}

fn network(p: &mut AIPipeline) -> &mut StageNetwork {
    stage(p).network.as_mut().unwrap()
}

fn ceiling(g: &mut AccessGuardrail) -> &mut Ceiling {
    g.spec.roles.training.as_mut().unwrap()
}

fn names_field(errors: &[FieldError], field: &str) -> bool {
    errors.iter().any(|e| e.field == field)
}

/// Whether `validate_pipeline` accepts `value` in the field that `set` writes it to.
fn pipeline_accepts(field: &str, set: fn(&mut AIPipeline, &str), value: &str) -> bool {
    let mut p = base_pipeline();
    set(&mut p, value);
    !names_field(&validate_pipeline(&p), field)
}

/// Whether `validate_guardrail` accepts `value` in the field that `set` writes it to.
fn guardrail_accepts(field: &str, set: fn(&mut AccessGuardrail, &str), value: &str) -> bool {
    let mut g = base_guardrail();
    set(&mut g, value);
    !names_field(&validate_guardrail(&g), field)
}

/// How the schema and the Rust check must relate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Agreement {
    /// They accept exactly the same values.
    Same,
    /// The schema is knowingly looser; whatever Rust accepts, the schema accepts.
    RustWithinSchema,
    /// As `RustWithinSchema`, and the schema's surplus is only zero durations.
    DurationButZero,
}

type RustCheck = Box<dyn Fn(&str) -> bool + Sync + Send>;

struct Location {
    /// The constant in `patterns`, by name.
    constant: &'static str,
    pattern: &'static str,
    /// The CRD and the schema path holding the pattern.
    kind: &'static str,
    schema_path: &'static str,
    /// What the Rust check is, for messages.
    rust: &'static str,
    check: RustCheck,
    agreement: Agreement,
}

fn pipeline_field(field: &'static str, set: fn(&mut AIPipeline, &str)) -> RustCheck {
    Box::new(move |v| pipeline_accepts(field, set, v))
}

fn guardrail_field(field: &'static str, set: fn(&mut AccessGuardrail, &str)) -> RustCheck {
    Box::new(move |v| guardrail_accepts(field, set, v))
}

fn locations() -> &'static [Location] {
    static LOCATIONS: OnceLock<Vec<Location>> = OnceLock::new();
    LOCATIONS.get_or_init(|| {
        use Agreement::*;
        vec![
            Location {
                constant: "DNS_LABEL",
                pattern: patterns::DNS_LABEL,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].network.egress.[].namespace",
                rust: "is_dns_label",
                check: Box::new(is_dns_label),
                agreement: Same,
            },
            Location {
                constant: "DNS_LABEL",
                pattern: patterns::DNS_LABEL,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].name",
                rust: "validate_pipeline spec.stages[0].name",
                check: pipeline_field("spec.stages[0].name", |p, v| stage(p).name = v.into()),
                agreement: Same,
            },
            Location {
                constant: "DNS_LABEL",
                pattern: patterns::DNS_LABEL,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].network.egress.[].namespace",
                rust: "validate_pipeline spec.stages[0].network.egress[1].namespace",
                check: pipeline_field("spec.stages[0].network.egress[1].namespace", |p, v| {
                    network(p).egress[1].namespace = Some(v.into())
                }),
                agreement: Same,
            },
            Location {
                constant: "DNS_LABEL",
                pattern: patterns::DNS_LABEL,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.credentials.[].name",
                rust: "validate_pipeline spec.stages[0].vault.credentials[0].name",
                check: pipeline_field("spec.stages[0].vault.credentials[0].name", |p, v| {
                    vault(p).credentials[0].name = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "DNS_SUBDOMAIN",
                pattern: patterns::DNS_SUBDOMAIN,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.credentials.[].secretName",
                rust: "is_dns_subdomain",
                check: Box::new(is_dns_subdomain),
                agreement: Same,
            },
            Location {
                constant: "DNS_SUBDOMAIN",
                pattern: patterns::DNS_SUBDOMAIN,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.credentials.[].secretName",
                rust: "validate_pipeline spec.stages[0].vault.credentials[0].secretName",
                check: pipeline_field("spec.stages[0].vault.credentials[0].secretName", |p, v| {
                    vault(p).credentials[0].secret_name = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "DNS_SUBDOMAIN",
                pattern: patterns::DNS_SUBDOMAIN,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.credentials.[].restartTargets.[].name",
                rust: "validate_pipeline spec.stages[0].vault.credentials[0].restartTargets[0].name",
                check: pipeline_field(
                    "spec.stages[0].vault.credentials[0].restartTargets[0].name",
                    |p, v| vault(p).credentials[0].restart_targets[0].name = v.into(),
                ),
                agreement: Same,
            },
            Location {
                constant: "API_GROUP",
                pattern: patterns::API_GROUP,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].permissions.[].apiGroups.[]",
                rust: "validate_pipeline spec.stages[0].permissions[0].apiGroups[0]",
                check: pipeline_field("spec.stages[0].permissions[0].apiGroups[0]", |p, v| {
                    stage(p).permissions[0].api_groups[0] = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "API_GROUP",
                pattern: patterns::API_GROUP,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.kubernetes.[].apiGroups.[]",
                rust: "validate_guardrail spec.roles.training.kubernetes[0].apiGroups[0]",
                check: guardrail_field("spec.roles.training.kubernetes[0].apiGroups[0]", |g, v| {
                    ceiling(g).kubernetes[0].api_groups[0] = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "RESOURCE",
                pattern: patterns::RESOURCE,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].permissions.[].resources.[]",
                rust: "validate_pipeline spec.stages[0].permissions[0].resources[0]",
                check: pipeline_field("spec.stages[0].permissions[0].resources[0]", |p, v| {
                    stage(p).permissions[0].resources[0] = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "RESOURCE",
                pattern: patterns::RESOURCE,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.kubernetes.[].resources.[]",
                rust: "validate_guardrail spec.roles.training.kubernetes[0].resources[0]",
                check: guardrail_field("spec.roles.training.kubernetes[0].resources[0]", |g, v| {
                    ceiling(g).kubernetes[0].resources[0] = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "VERB",
                pattern: patterns::VERB,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].permissions.[].verbs.[]",
                rust: "validate_pipeline spec.stages[0].permissions[0].verbs[0]",
                check: pipeline_field("spec.stages[0].permissions[0].verbs[0]", |p, v| {
                    stage(p).permissions[0].verbs[0] = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "VERB",
                pattern: patterns::VERB,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.kubernetes.[].verbs.[]",
                rust: "validate_guardrail spec.roles.training.kubernetes[0].verbs[0]",
                check: guardrail_field("spec.roles.training.kubernetes[0].verbs[0]", |g, v| {
                    ceiling(g).kubernetes[0].verbs[0] = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "CIDR",
                pattern: patterns::CIDR,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].network.egress.[].cidr",
                rust: "validate_pipeline spec.stages[0].network.egress[0].cidr",
                check: pipeline_field("spec.stages[0].network.egress[0].cidr", |p, v| {
                    network(p).egress[0].cidr = Some(v.into())
                }),
                agreement: RustWithinSchema,
            },
            Location {
                constant: "CIDR",
                pattern: patterns::CIDR,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].network.ingress.[].fromCIDR",
                rust: "validate_pipeline spec.stages[0].network.ingress[0].fromCIDR",
                check: pipeline_field("spec.stages[0].network.ingress[0].fromCIDR", |p, v| {
                    network(p).ingress[0].from_cidr = Some(v.into())
                }),
                agreement: RustWithinSchema,
            },
            Location {
                constant: "CIDR",
                pattern: patterns::CIDR,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.network.egressCIDRs.[]",
                rust: "validate_guardrail spec.roles.training.network.egressCIDRs[0]",
                check: guardrail_field("spec.roles.training.network.egressCIDRs[0]", |g, v| {
                    ceiling(g).network.egress_cidrs[0] = v.into()
                }),
                agreement: RustWithinSchema,
            },
            Location {
                constant: "DURATION",
                pattern: patterns::DURATION,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.tokenTTL",
                rust: "validate_pipeline spec.stages[0].vault.tokenTTL",
                check: pipeline_field("spec.stages[0].vault.tokenTTL", |p, v| {
                    vault(p).token_ttl = Some(v.into())
                }),
                agreement: DurationButZero,
            },
            Location {
                constant: "DURATION",
                pattern: patterns::DURATION,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.credentials.[].ttl",
                rust: "validate_pipeline spec.stages[0].vault.credentials[0].ttl",
                check: pipeline_field("spec.stages[0].vault.credentials[0].ttl", |p, v| {
                    vault(p).credentials[0].ttl = v.into()
                }),
                agreement: DurationButZero,
            },
            Location {
                constant: "DURATION",
                pattern: patterns::DURATION,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.vault.maxTTL",
                rust: "validate_guardrail spec.roles.training.vault.maxTTL",
                check: guardrail_field("spec.roles.training.vault.maxTTL", |g, v| {
                    ceiling(g).vault.max_ttl = Some(v.into())
                }),
                agreement: DurationButZero,
            },
            Location {
                constant: "VAULT_POLICY_PATH",
                pattern: patterns::VAULT_POLICY_PATH,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.policies.[].path",
                rust: "validate_pipeline spec.stages[0].vault.policies[0].path",
                check: pipeline_field("spec.stages[0].vault.policies[0].path", |p, v| {
                    vault(p).policies[0].path = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "VAULT_SECRET_PATH",
                pattern: patterns::VAULT_SECRET_PATH,
                kind: "AIPipeline",
                schema_path: "spec.stages.[].vault.credentials.[].path",
                rust: "validate_pipeline spec.stages[0].vault.credentials[0].path",
                check: pipeline_field("spec.stages[0].vault.credentials[0].path", |p, v| {
                    vault(p).credentials[0].path = v.into()
                }),
                agreement: Same,
            },
            Location {
                constant: "VAULT_PATH_PATTERN",
                pattern: patterns::VAULT_PATH_PATTERN,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.vault.paths.[].pattern",
                rust: "validate_guardrail spec.roles.training.vault.paths[0].pattern",
                check: guardrail_field("spec.roles.training.vault.paths[0].pattern", |g, v| {
                    ceiling(g).vault.paths[0].pattern = v.into()
                }),
                agreement: RustWithinSchema,
            },
            Location {
                constant: "NAMESPACE_PATTERN",
                pattern: patterns::NAMESPACE_PATTERN,
                kind: "AccessGuardrail",
                schema_path: "spec.roles.training.network.egressNamespaces.[]",
                rust: "validate_guardrail spec.roles.training.network.egressNamespaces[0]",
                check: guardrail_field(
                    "spec.roles.training.network.egressNamespaces[0]",
                    |g, v| ceiling(g).network.egress_namespaces[0] = v.into(),
                ),
                agreement: Same,
            },
        ]
    })
}

/// Every constant of `patterns`; a new one must get a location above.
const ALL_CONSTANTS: &[&str] = &[
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "API_GROUP",
    "RESOURCE",
    "VERB",
    "CIDR",
    "DURATION",
    "VAULT_POLICY_PATH",
    "VAULT_SECRET_PATH",
    "VAULT_PATH_PATTERN",
    "NAMESPACE_PATTERN",
];

/// The schema of a location, compiled: the pattern and the length bounds.
struct SchemaCheck {
    regex: Regex,
    min: Option<usize>,
    max: Option<usize>,
}

impl SchemaCheck {
    fn accepts(&self, v: &str) -> bool {
        // OpenAPI lengths count characters, not bytes.
        let n = v.chars().count();
        self.regex.is_match(v) && self.min.is_none_or(|m| n >= m) && self.max.is_none_or(|m| n <= m)
    }
}

fn schema_checks() -> &'static [SchemaCheck] {
    static CHECKS: OnceLock<Vec<SchemaCheck>> = OnceLock::new();
    CHECKS.get_or_init(|| {
        locations()
            .iter()
            .map(|l| {
                let schema = schema_at(l.kind, l.schema_path);
                assert_eq!(
                    schema["pattern"], l.pattern,
                    "{} {} does not carry patterns::{}",
                    l.kind, l.schema_path, l.constant
                );
                let len = |k: &str| schema[k].as_u64().and_then(|n| usize::try_from(n).ok());
                SchemaCheck {
                    regex: Regex::new(l.pattern).unwrap(),
                    min: len("minLength"),
                    max: len("maxLength"),
                }
            })
            .collect()
    })
}

fn shown(value: &str) -> String {
    let n = value.chars().count();
    if n <= 40 {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(24).collect();
        format!("{head:?}... ({n} characters)")
    }
}

/// Where the schema and the Rust check disagree on `value`, in the direction that matters:
/// one line per location.
fn disagreements(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (l, schema) in locations().iter().zip(schema_checks()) {
        let by_schema = schema.accepts(value);
        let by_rust = (l.check)(value);
        let wrong = match l.agreement {
            Agreement::Same => by_schema != by_rust,
            Agreement::RustWithinSchema => by_rust && !by_schema,
            Agreement::DurationButZero => {
                (by_rust && !by_schema)
                    || (by_schema && !by_rust && parse_duration(value) != Some(0))
            }
        };
        if wrong {
            out.push(format!(
                "{}: the schema at {} {} (patterns::{}, length {}..={}) {} it, {} {} it",
                shown(value),
                l.kind,
                l.schema_path,
                l.constant,
                schema.min.unwrap_or(0),
                schema.max.map_or("".to_string(), |m| m.to_string()),
                if by_schema { "accepts" } else { "refuses" },
                l.rust,
                if by_rust { "accepts" } else { "refuses" },
            ));
        }
    }
    out
}

#[test]
fn every_pattern_constant_is_checked() {
    let checked: Vec<&str> = locations().iter().map(|l| l.constant).collect();
    for c in ALL_CONSTANTS {
        assert!(
            checked.contains(c),
            "patterns::{c} is not compared with Rust"
        );
    }
    // Compiles every pattern and checks it against the CRDs.
    assert_eq!(schema_checks().len(), locations().len());
}

fn edge_cases() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "a",
        "0",
        "-",
        "a-",
        "-a",
        "a-b",
        "a--b",
        "A",
        "aB",
        "a.b",
        "a..b",
        ".a",
        "a.",
        "a_b",
        "a b",
        " a",
        "a\t",
        "a\n",
        "\u{a0}",
        "\u{b}",
        "é",
        "ａ",
        "*",
        "**",
        "a*",
        "*a",
        "*/*",
        "pods/*",
        "*/proxy",
        "pods/log",
        "a/b/c",
        "pods/",
        "/pods",
        "get",
        "getPods",
        "get-pods",
        "{namespace}",
        "{namespace",
        "namespace}",
        "{stage}",
        "{pipeline}",
        "{other}",
        "{}",
        "kv/{namespace}/{pipeline}/{stage}/*",
        "kv/{x}/*",
        "kv/*",
        "kv/**",
        "*kv",
        "/kv",
        "kv/",
        "kv/+/x",
        "+",
        "+/x",
        "kv*",
        "kv/a*b",
        "a\"b",
        "kv/a\\b",
        "kv/${x}",
        "10.0.0.0/8",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0/8",
        "256.0.0.0/8",
        "010.0.0.0/8",
        "1.2.3.4/32",
        "0.0.0.0/0",
        "::/0",
        "fd00::/8",
        "fd00::1/8",
        "FD00::/8",
        "::ffff:10.0.0.0/104",
        "2001:db8::/129",
        ":/0",
        "1h",
        "0s",
        "0h0m",
        "1h30m",
        "15",
        "m",
        "1d",
        "1.5h",
        "1H",
        "999999999999999h",
        "9999999999999999h",
        "00000000000001s",
        "1h1h",
        "1s1h",
        "99999999999999999999s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for n in [39, 40, 41, 62, 63, 64, 252, 253, 254, 255, 511, 512, 513] {
        v.push("a".repeat(n));
    }
    // Subdomains near 253 characters, and one with a label longer than 63.
    v.push(format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    ));
    v.push(format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62)
    ));
    v.push(format!("{}.example", "a".repeat(64)));
    v.push(format!("pods/{}", "a".repeat(64)));
    v.push("a".repeat(33));
    v.push("a".repeat(32));
    // The longest IPv6 CIDRs.
    v.push("0000:0000:0000:0000:0000:0000:0000:0000/128".into());
    v.push("0000:0000:0000:0000:0000:ffff:255.255.255.255/128".into());
    v.push(format!("kv/{}*", "x".repeat(508)));
    v.push(format!("kv/{}*", "x".repeat(509)));
    v
}

#[test]
fn patterns_and_rust_agree_on_edge_cases() {
    // One example per location and direction.
    let mut first: std::collections::BTreeMap<String, String> = Default::default();
    for v in edge_cases() {
        for d in disagreements(&v) {
            let key = d
                .split_once(": the schema at ")
                .map(|(_, k)| k.to_string())
                .unwrap();
            first.entry(key).or_insert(d);
        }
    }
    assert!(
        first.is_empty(),
        "the CRD schema and src/api/validate.rs disagree ({} kinds of disagreement):\n{}",
        first.len(),
        first.values().cloned().collect::<Vec<_>>().join("\n")
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures are reported, not written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::with_cases(512)
    })]

    #[test]
    fn patterns_and_rust_agree_on_random_strings(value in prop_oneof![
        4 => "[a-z0-9.*/+{}-]{0,24}",
        2 => "[a-zA-Z0-9.*/+{}: -]{0,16}",
        1 => "([0-9]{1,3}\\.){3}[0-9]{1,3}/[0-9]{1,2}",
        1 => "[0-9a-f:]{0,12}/[0-9]{1,3}",
        1 => "([0-9]{1,4}[hms]){1,4}",
        1 => "(kv|sys|\\+|\\{namespace\\}|\\{stage\\}|\\{x\\}|a\\*)(/(data|\\+|\\{pipeline\\}|\\{stage|b)){0,4}\\*?",
        1 => "[a-z][-a-z0-9.]{55,70}[a-z]",
        1 => "[a-z][-a-z0-9]{58,66}[a-z]",
    ]) {
        let found = disagreements(&value);
        prop_assert!(found.is_empty(), "the CRD schema and src/api/validate.rs disagree:\n{}", found.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// CEL rules
// ---------------------------------------------------------------------------------------------

/// A client of this binary's control plane, on a runtime of its own so that plain `#[test]`s
/// and proptest can ask the API server, and a namespace for the dry runs.
struct Server {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    namespace: String,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let cp = support::control_plane();
        let (client, namespace) = runtime.block_on(async {
            let client = cp.client().await;
            let namespace = support::temp_namespace(&client, "schema", &[]).await;
            (client, namespace)
        });
        Server {
            runtime,
            client,
            namespace,
        }
    })
}

/// What the API server refuses when `object` (an AIPipeline or AccessGuardrail) is created, as a
/// dry run: one `field: message` per cause, CEL rules and schema alike. Empty: it would be stored.
fn cel_errors(kind: &str, object: &Value) -> Vec<String> {
    let server = server();
    let (plural, namespaced) = match kind {
        "AIPipeline" => ("aipipelines", true),
        "AccessGuardrail" => ("accessguardrails", false),
        _ => unreachable!("{kind}"),
    };
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("portcullis.dev", "v1alpha1", kind),
        plural,
    );
    let mut object: DynamicObject =
        serde_json::from_value(object.clone()).expect("a Kubernetes object");
    let api: Api<DynamicObject> = if namespaced {
        object.metadata.namespace = Some(server.namespace.clone());
        Api::namespaced_with(server.client.clone(), &server.namespace, &resource)
    } else {
        Api::all_with(server.client.clone(), &resource)
    };
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match server.runtime.block_on(api.create(&params, &object)) {
        Ok(_) => Vec::new(),
        Err(kube::Error::Api(status)) if status.code == 422 => status
            .details
            .map(|d| d.causes)
            .unwrap_or_default()
            .into_iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect(),
        Err(e) => panic!("a dry-run create of a {kind}: {e}"),
    }
}

fn rust_errors(object: &Value) -> Vec<FieldError> {
    let p: AIPipeline = serde_json::from_value(object.clone()).expect("the object is typed");
    validate_pipeline(&p)
}

fn pipeline_json(stages: Value) -> Value {
    json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "fraud", "namespace": "ml"},
        "spec": {"stages": stages},
    })
}

fn with_egress(rule: Value) -> Value {
    pipeline_json(json!([{"name": "ingest", "role": "Ingestion", "network": {"egress": [rule]}}]))
}

fn with_ingress(rule: Value) -> Value {
    pipeline_json(json!([{"name": "serve", "role": "Deployment", "network": {"ingress": [rule]}}]))
}

fn credential(name: &str, secret: &str) -> Value {
    json!({"name": name, "path": format!("database/creds/{name}"), "ttl": "15m", "secretName": secret})
}

/// Checks that the CEL rules refuse `object` with a message containing `message` (or accept it
/// when `message` is None), and that `validate_pipeline` refuses or accepts it too.
fn expect(object: &Value, message: Option<&str>) {
    let cel = cel_errors("AIPipeline", object);
    let rust = rust_errors(object);
    match message {
        Some(m) => {
            assert!(
                cel.iter().any(|e| e.contains(m)),
                "the CEL rules should refuse with {m:?}, they say {cel:?}\n{object:#}"
            );
            assert!(
                !rust.is_empty(),
                "CEL refuses ({cel:?}) but validate_pipeline accepts\n{object:#}"
            );
        }
        None => {
            assert_eq!(
                cel,
                Vec::<String>::new(),
                "the CEL rules should accept\n{object:#}"
            );
            assert_eq!(rust, vec![], "validate_pipeline should accept\n{object:#}");
        }
    }
}

/// Words Kubernetes CEL does not let a rule use as a field name: a property with such a name is
/// exposed as `__name__` (see "Escaping" in the Kubernetes CRD validation rules docs), so
/// `self.namespace` does not reach a property called `namespace`.
const CEL_RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

fn collect_rules(node: &Value, path: &str, out: &mut Vec<(String, String)>) {
    for rule in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push((
            path.to_string(),
            rule["rule"].as_str().unwrap_or_default().to_string(),
        ));
    }
    if let Some(props) = node["properties"].as_object() {
        for (name, prop) in props {
            collect_rules(prop, &format!("{path}.{name}"), out);
        }
    }
    if node["items"].is_object() {
        collect_rules(&node["items"], &format!("{path}[]"), out);
    }
}

#[test]
fn cel_rules_select_fields_by_their_escaped_names() {
    let select = Regex::new(r"\.\s*([A-Za-z_][A-Za-z0-9_]*)").unwrap();
    let mut wrong = Vec::new();
    let mut count = 0;
    for kind in ["AIPipeline", "AccessGuardrail"] {
        let mut rules = Vec::new();
        collect_rules(&root_schema(kind), kind, &mut rules);
        count += rules.len();
        for (path, rule) in rules {
            for c in select.captures_iter(&rule) {
                let field = &c[1];
                if CEL_RESERVED.contains(&field) {
                    wrong.push(format!(
                        "{path}: rule {rule:?} selects `.{field}`, but Kubernetes CEL exposes the property {field:?} as `__{field}__`"
                    ));
                }
            }
        }
    }
    assert!(count >= 5, "the CEL rules were found");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn cel_egress_needs_exactly_one_destination() {
    expect(
        &with_egress(json!({"cidr": "10.0.0.0/8", "namespace": "ml-platform"})),
        Some("set exactly one of cidr or namespace"),
    );
    expect(
        &with_egress(json!({"ports": [{"port": 443}]})),
        Some("set exactly one of cidr or namespace"),
    );
    expect(&with_egress(json!({"cidr": "10.0.0.0/8"})), None);
    expect(&with_egress(json!({"namespace": "ml-platform"})), None);
    expect(
        &with_egress(
            json!({"namespace": "ml-platform", "podSelector": {"matchLabels": {"app": "db"}}}),
        ),
        None,
    );
    let rust = rust_errors(&with_egress(
        json!({"cidr": "10.0.0.0/8", "namespace": "ml-platform"}),
    ));
    assert!(
        rust.iter()
            .any(|e| e.field == "spec.stages[0].network.egress[0]"
                && e.message.contains("set exactly one of cidr or namespace")),
        "{rust:?}"
    );
}

#[test]
fn cel_pod_selector_needs_a_namespace() {
    expect(
        &with_egress(json!({"cidr": "10.0.0.0/8", "podSelector": {"matchLabels": {"app": "db"}}})),
        Some("podSelector narrows a namespace destination"),
    );
    let rust = rust_errors(&with_egress(
        json!({"cidr": "10.0.0.0/8", "podSelector": {"matchLabels": {"app": "db"}}}),
    ));
    assert!(
        rust.iter()
            .any(|e| e.field == "spec.stages[0].network.egress[0].podSelector"),
        "{rust:?}"
    );
    let both = with_egress(json!({"podSelector": {}}));
    expect(&both, Some("set exactly one of cidr or namespace"));
    expect(&both, Some("podSelector narrows a namespace destination"));
}

#[test]
fn cel_ingress_is_by_address_or_by_labels() {
    let msg = "set fromCIDR, or fromNamespaceSelector and/or fromPodSelector";
    expect(
        &with_ingress(
            json!({"fromCIDR": "10.0.0.0/8", "fromPodSelector": {"matchLabels": {"app": "x"}}}),
        ),
        Some(msg),
    );
    expect(
        &with_ingress(json!({"fromCIDR": "10.0.0.0/8", "fromNamespaceSelector": {}})),
        Some(msg),
    );
    expect(&with_ingress(json!({"ports": [{"port": 80}]})), Some(msg));
    expect(
        &with_ingress(json!({"fromPodSelector": {"matchLabels": {"app": "x"}}})),
        None,
    );
    expect(&with_ingress(json!({"fromNamespaceSelector": {}})), None);
    expect(
        &with_ingress(json!({"fromNamespaceSelector": {}, "fromPodSelector": {}})),
        None,
    );
    expect(&with_ingress(json!({"fromCIDR": "10.0.0.0/8"})), None);
}

#[test]
fn cel_credentials_of_a_stage_need_their_own_secrets() {
    expect(
        &pipeline_json(json!([{
            "name": "ingest", "role": "Ingestion",
            "vault": {"credentials": [credential("a", "shared"), credential("b", "shared")]},
        }])),
        Some("each credential needs its own secretName"),
    );
    expect(
        &pipeline_json(json!([{
            "name": "ingest", "role": "Ingestion",
            "vault": {"credentials": [credential("a", "first"), credential("b", "second")]},
        }])),
        None,
    );
}

#[test]
fn cel_stages_need_their_own_secrets() {
    let object = pipeline_json(json!([
        {"name": "ingest", "role": "Ingestion", "vault": {"credentials": [credential("a", "shared")]}},
        {"name": "train", "role": "Training", "vault": {"credentials": [credential("b", "shared")]}},
    ]));
    expect(
        &object,
        Some("two stages deliver credentials to the same secretName"),
    );
    let cel = cel_errors("AIPipeline", &object);
    assert!(
        cel.iter().any(|e| e.starts_with("spec.stages: ")),
        "the rule on the stages list refuses it: {cel:?}"
    );
    assert!(
        cel.iter()
            .all(|e| !e.contains("each credential needs its own secretName")),
        "the per-stage rule does not fire across stages: {cel:?}"
    );
    // A stage without vault, and one without credentials, next to one with.
    expect(
        &pipeline_json(json!([
            {"name": "ingest", "role": "Ingestion", "vault": {"credentials": [credential("a", "one")]}},
            {"name": "train", "role": "Training", "vault": {"policies": [{"path": "kv/x", "capabilities": ["read"]}]}},
            {"name": "serve", "role": "Deployment"},
            {"name": "eval", "role": "Deployment", "vault": {"credentials": [credential("a", "two")]}},
        ])),
        None,
    );
}

fn example_documents(dir: &str) -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            if !doc.is_null() {
                out.push((f.display().to_string(), doc));
            }
        }
    }
    out
}

#[test]
fn cel_accepts_the_examples() {
    let mut seen = 0;
    for dir in ["examples/pipelines", "examples/denied"] {
        for (file, doc) in example_documents(dir) {
            assert_eq!(doc["kind"], "AIPipeline", "{file}");
            let cel = cel_errors("AIPipeline", &doc);
            assert!(cel.is_empty(), "{file}: {cel:?}");
            let rust = rust_errors(&doc);
            assert!(rust.is_empty(), "{file}: {rust:?}");
            seen += 1;
        }
    }
    assert!(seen >= 3, "the pipeline examples were found");
    for (file, doc) in example_documents("examples/guardrails") {
        let cel = cel_errors("AccessGuardrail", &doc);
        assert!(cel.is_empty(), "{file}: {cel:?}");
        let g: AccessGuardrail = serde_json::from_value(doc).unwrap();
        assert_eq!(validate_guardrail(&g), vec![], "{file}");
    }
}

// Random cross-field shapes: CEL and Rust refuse the same ones.

fn egress_shape() -> impl Strategy<Value = Value> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(cidr, ns, pods)| {
        let mut rule = serde_json::Map::new();
        if cidr {
            rule.insert("cidr".into(), json!("10.0.0.0/8"));
        }
        if ns {
            rule.insert("namespace".into(), json!("ml-platform"));
        }
        if pods {
            rule.insert("podSelector".into(), json!({"matchLabels": {"app": "db"}}));
        }
        Value::Object(rule)
    })
}

fn ingress_shape() -> impl Strategy<Value = Value> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(cidr, ns, pods)| {
        let mut rule = serde_json::Map::new();
        if cidr {
            rule.insert("fromCIDR".into(), json!("10.0.0.0/8"));
        }
        if ns {
            rule.insert("fromNamespaceSelector".into(), json!({}));
        }
        if pods {
            rule.insert(
                "fromPodSelector".into(),
                json!({"matchLabels": {"app": "x"}}),
            );
        }
        Value::Object(rule)
    })
}

fn stage_shape(name: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(egress_shape(), 0..=2),
        prop::collection::vec(ingress_shape(), 0..=2),
        prop::option::of(prop::collection::vec(
            prop::sample::select(&["s1", "s2", "s3"][..]),
            0..=3,
        )),
    )
        .prop_map(move |(egress, ingress, secrets)| {
            let mut stage = json!({"name": name, "role": "Training", "network": {"egress": egress, "ingress": ingress}});
            if let Some(secrets) = secrets {
                let credentials: Vec<Value> = secrets
                    .iter()
                    .enumerate()
                    .map(|(i, s)| credential(&format!("c{i}"), s))
                    .collect();
                stage["vault"] = json!({"credentials": credentials});
            }
            stage
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures are reported, not written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::with_cases(128)
    })]

    #[test]
    fn cel_and_rust_refuse_the_same_shapes(
        a in stage_shape("ingest"),
        b in prop::option::of(stage_shape("train")),
    ) {
        let stages: Vec<Value> = std::iter::once(a).chain(b).collect();
        let object = pipeline_json(Value::Array(stages));
        let cel = cel_errors("AIPipeline", &object);
        let rust = rust_errors(&object);
        prop_assert_eq!(
            cel.is_empty(),
            rust.is_empty(),
            "CEL says {:?}, validate_pipeline says {:?}\n{:#}",
            cel,
            rust,
            object
        );
    }
}

#[test]
fn rust_errors_name_fields_the_schema_has() {
    // Every field path validate_pipeline reports exists in the schema.
    let mut p = base_pipeline();
    stage(&mut p).name = "Bad".into();
    network(&mut p).egress[0].cidr = Some("x".into());
    vault(&mut p).credentials[0].ttl = "0s".into();
    let errors = validate_pipeline(&p);
    assert!(errors.len() >= 3, "{errors:?}");
    for e in &errors {
        let path: String = e
            .field
            .split('.')
            .map(|part| match part.split_once('[') {
                Some((name, _)) => format!("{name}.[]"),
                None => part.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".");
        let _ = schema_at("AIPipeline", &path);
    }
}
