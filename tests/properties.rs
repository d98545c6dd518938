//! Property tests of the pure core: random but schema-valid AIPipelines and AccessGuardrails,
//! drawn from a vocabulary that deliberately includes what the built-in floor must deny, go
//! through `plan::build`, and the objects that come out are checked against the decisions and
//! the floor. Malformed input goes through the loader and must never panic.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom, as the user would go"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use portcullis::api::validate::{parse_duration, validate_guardrail, validate_pipeline};
use portcullis::api::{
    AIPipeline, AIPipelineSpec, AccessGuardrail, AccessGuardrailSpec, Ceiling, EgressRule,
    IngressRule, KubernetesCeiling, NetworkCeiling, NetworkPort, PermissionRule, Protocol,
    RestartTarget, RoleCeilings, Stage, StageNetwork, StageRole, StageVault, VaultCapability,
    VaultCeiling, VaultCredential, VaultPathCeiling, VaultPathRule, WorkloadKind,
};
use portcullis::cli::load::{Expect, Inputs};
use portcullis::plan::{self, Object, Plan};
use portcullis::policy::{Decision, Item, floor};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::TestCaseError;
use regex::Regex;

// ---------------------------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------------------------

const STAGE_LABEL: &str = "portcullis.dev/stage";

/// API groups: the common ones most of the time, the dangerous ones often enough.
const API_GROUPS: &[&str] = &[
    "",
    "apps",
    "batch",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
];
const RISKY_API_GROUPS: &[&str] = &[
    "*",
    "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "storage.k8s.io",
    "certificates.k8s.io",
];

const RESOURCES: &[&str] = &[
    "configmaps",
    "secrets",
    "pods",
    "pods/log",
    "services",
    "serviceaccounts",
    "deployments",
    "jobs",
    "roles",
    "rolebindings",
    "networkpolicies",
];
const RISKY_RESOURCES: &[&str] = &[
    "secrets",
    "pods/exec",
    "pods/attach",
    "pods/portforward",
    "pods/*",
    "services/proxy",
    "nodes/proxy",
    "*/proxy",
    "serviceaccounts/token",
    "nodes",
    "namespaces",
    "namespaces/status",
    "persistentvolumes",
    "clusterroles",
    "clusterrolebindings",
    "customresourcedefinitions",
    "mutatingwebhookconfigurations",
    "validatingwebhookconfigurations",
    "storageclasses",
    "certificatesigningrequests",
    "*",
];

const VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];
const RISKY_VERBS: &[&str] = &[
    "escalate",
    "bind",
    "impersonate",
    "approve",
    "sign",
    "use",
    "*",
];

/// Secret names credentials deliver to. Every stage draws from the same list, so a stage's
/// permissions often name another stage's Secret.
const SECRET_NAMES: &[&str] = &["cred-a", "cred-b", "cred-c", "cred-d", "cred.e"];

/// resourceNames: other stages' credential Secrets, Secrets no stage owns, and `*`.
const RESOURCE_NAMES: &[&str] = &[
    "cred-a",
    "cred-b",
    "cred-c",
    "cred-d",
    "cred.e",
    "orphan",
    "prod-db-admin",
    "app-config",
    "*",
];

const CIDRS: &[&str] = &[
    "169.254.169.254/32",
    "169.254.0.0/16",
    "169.254.169.254/31",
    "169.254.170.0/24",
    "100.64.0.0/10",
    "168.63.129.0/24",
    "fe80::/10",
    "fe80::/64",
    "::ffff:0.0.0.0/96",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.20.0.0/16",
    "10.20.5.0/24",
    "10.30.0.0/16",
    "10.99.0.0/16",
    "192.168.1.0/24",
    "fd00::/8",
    "fd00:ec2::254/128",
    "::/0",
    "2001:db8::/32",
];

const EGRESS_NAMESPACES: &[&str] = &["ml-platform", "kube-system", "payments", "<ns>"];

/// Vault policy paths; `<ns>`, `<p>` and `<s>` are replaced by the pipeline's namespace, name
/// and the stage's name.
const VAULT_POLICY_PATHS: &[&str] = &[
    "kv/data/<ns>/<p>/<s>/*",
    "kv/metadata/<ns>/<p>/<s>/*",
    "kv/data/<ns>/<p>/<s>/config",
    "kv/data/<ns>/*",
    "kv/*",
    "kv/data/+/x",
    "database/creds/*",
    "database/creds/reader",
    "database/creds/+",
    "aws/creds/<ns>_<p>_*",
    "aws/creds/+",
];
const RISKY_VAULT_POLICY_PATHS: &[&str] = &[
    "sys/policies/acl/*",
    "sys/*",
    "sys",
    "auth/kubernetes/role/x",
    "auth/*",
    "identity/entity/*",
    "+/data/x",
    "+/*",
    "s*",
];

/// Credential paths: shared between stages, under system mounts, and under the stage's kv.
const CREDENTIAL_PATHS: &[&str] = &[
    "database/creds/reader",
    "database/creds/writer",
    "aws/creds/<ns>_<p>_train",
    "aws/creds/other",
    "kv/data/<ns>/<p>/<s>/db",
];
const RISKY_CREDENTIAL_PATHS: &[&str] = &[
    "sys/leases/lookup",
    "auth/token/create",
    "identity/oidc/token/x",
];

const TTLS: &[&str] = &["90s", "15m", "20m", "30m", "45m", "1h", "3600s"];
const LONG_TTLS: &[&str] = &["1h30m", "2h", "4h", "24h"];

/// Vault policy paths that end or escape the HCL string they are written into.
const HCL_BREAKING_PATHS: &[&str] = &[
    r#"kv/data/<ns>/<p>/<s>/x"{capabilities=["sudo","read"]}path"sys/*"#,
    r#"kv/data/<ns>/<p>/<s>/a\"b"#,
    r#"kv/data/<ns>/<p>/<s>/${x}"#,
];

const MAX_TTLS: &[&str] = &["15m", "30m", "1h", "2h", "4h", "90s"];

const GUARDRAIL_CIDRS: &[&str] = &[
    "0.0.0.0/0",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "168.63.0.0/16",
    "fe80::/10",
    "10.0.0.0/8",
    "10.20.0.0/16",
    "10.30.0.0/16",
    "::/0",
    "fd00::/8",
];

const GUARDRAIL_NAMESPACES: &[&str] = &["{namespace}", "ml-platform", "kube-system"];

const GUARDRAIL_PATTERNS: &[&str] = &[
    "kv/data/{namespace}/{pipeline}/{stage}/*",
    "kv/metadata/{namespace}/{pipeline}/{stage}/*",
    "kv/data/{namespace}/*",
    "kv/*",
    "database/creds/*",
    "database/creds/+",
    "aws/creds/{namespace}_{pipeline}_*",
    "aws/creds/{namespace}_*",
    "sys/*",
    "auth/*",
    "identity/*",
    "+/*",
];

const CAPABILITIES: &[VaultCapability] = &[
    VaultCapability::Create,
    VaultCapability::Read,
    VaultCapability::Read,
    VaultCapability::Update,
    VaultCapability::Patch,
    VaultCapability::Delete,
    VaultCapability::List,
    VaultCapability::Sudo,
];

fn s(v: &'static [&'static str]) -> impl Strategy<Value = String> {
    select(v).prop_map(str::to_string)
}

/// Mostly `common`, sometimes `risky`.
fn mostly(
    common: &'static [&'static str],
    risky: &'static [&'static str],
) -> impl Strategy<Value = String> {
    prop_oneof![5 => s(common), 1 => s(risky)]
}

fn strings(
    v: &'static [&'static str],
    len: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(s(v), len)
}

/// Everything of both lists, or a random part of them.
fn ceiling_list(
    common: &'static [&'static str],
    risky: &'static [&'static str],
) -> impl Strategy<Value = Vec<String>> {
    let all: Vec<String> = common.iter().chain(risky).map(|s| s.to_string()).collect();
    let n = all.len();
    prop_oneof![
        1 => Just(all.clone()),
        2 => prop::sample::subsequence(all, 1..=n),
    ]
}

/// A DNS-1123 label of 1 to `max` characters.
fn dns_label(max: usize) -> impl Strategy<Value = String> {
    assert!(max >= 2);
    prop_oneof![
        3 => proptest::string::string_regex(&format!("[a-z0-9]([-a-z0-9]{{0,{}}}[a-z0-9])?", max.min(12) - 2)).unwrap(),
        1 => proptest::string::string_regex(&format!("[a-z0-9]([-a-z0-9]{{0,{}}}[a-z0-9])?", max - 2)).unwrap(),
        1 => proptest::string::string_regex(&format!("[a-z][-a-z0-9]{{{}}}[a-z0-9]", max - 2)).unwrap(),
    ]
}

/// A pipeline name: a DNS-1123 subdomain of up to 253 characters, often with dots.
fn pipeline_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => dns_label(20),
        1 => prop::collection::vec(dns_label(12), 2..4).prop_map(|l| l.join(".")),
        1 => prop::collection::vec(dns_label(63), 1..8).prop_map(|labels| {
            let mut out = String::new();
            for l in labels {
                if out.len() + 1 + l.len() > 253 {
                    break;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&l);
            }
            out
        }),
        1 => Just(format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61))),
    ]
}

fn namespace_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("ml-fraud".to_string()),
        1 => Just("kube-system".to_string()),
        2 => dns_label(63),
    ]
}

fn stage_name() -> impl Strategy<Value = String> {
    dns_label(40)
}

fn role() -> impl Strategy<Value = StageRole> {
    select(&StageRole::ALL[..])
}

fn capabilities() -> impl Strategy<Value = Vec<VaultCapability>> {
    prop::collection::vec(select(CAPABILITIES), 1..=3)
}

fn ports() -> impl Strategy<Value = Vec<NetworkPort>> {
    prop::collection::vec(
        (
            prop_oneof![Just(53u16), Just(443), Just(5432), 1u16..=65535],
            select(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp][..]),
        )
            .prop_map(|(port, protocol)| NetworkPort { port, protocol }),
        0..=2,
    )
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        s(&["vector-db", "model-registry", "feature-store"]).prop_map(|app| LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_string(), app)])),
            ..LabelSelector::default()
        }),
        Just(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["web".into(), "api".into()]),
            }]),
            ..LabelSelector::default()
        }),
    ]
}

fn permission() -> impl Strategy<Value = PermissionRule> {
    (
        prop::collection::vec(mostly(API_GROUPS, RISKY_API_GROUPS), 1..=2),
        prop::collection::vec(mostly(RESOURCES, RISKY_RESOURCES), 1..=3),
        prop_oneof![1 => Just(Vec::new()), 2 => strings(RESOURCE_NAMES, 1..=3)],
        prop::collection::vec(mostly(VERBS, RISKY_VERBS), 1..=3),
    )
        .prop_map(
            |(api_groups, resources, resource_names, verbs)| PermissionRule {
                api_groups,
                resources,
                resource_names,
                verbs,
            },
        )
}

fn egress() -> impl Strategy<Value = EgressRule> {
    prop_oneof![
        (s(CIDRS), ports()).prop_map(|(cidr, ports)| EgressRule {
            cidr: Some(cidr),
            ports,
            ..EgressRule::default()
        }),
        (s(EGRESS_NAMESPACES), prop::option::of(selector()), ports()).prop_map(
            |(ns, pod_selector, ports)| EgressRule {
                namespace: Some(ns),
                pod_selector,
                ports,
                ..EgressRule::default()
            }
        ),
    ]
}

fn ingress() -> impl Strategy<Value = IngressRule> {
    prop_oneof![
        (s(CIDRS), ports()).prop_map(|(cidr, ports)| IngressRule {
            from_cidr: Some(cidr),
            ports,
            ..IngressRule::default()
        }),
        (
            prop::option::of(selector()),
            prop::option::of(selector()),
            ports()
        )
            .prop_map(|(ns, pods, ports)| IngressRule {
                from_namespace_selector: ns.clone().or(if pods.is_none() {
                    Some(LabelSelector::default())
                } else {
                    None
                }),
                from_pod_selector: pods,
                ports,
                ..IngressRule::default()
            }),
    ]
}

fn credential() -> impl Strategy<Value = VaultCredential> {
    (
        s(&["db", "s3", "registry", "feature-db"]),
        mostly(CREDENTIAL_PATHS, RISKY_CREDENTIAL_PATHS),
        mostly(TTLS, LONG_TTLS),
        s(SECRET_NAMES),
        prop::collection::vec(
            (
                select(
                    &[
                        WorkloadKind::Deployment,
                        WorkloadKind::StatefulSet,
                        WorkloadKind::DaemonSet,
                    ][..],
                ),
                s(&["worker", "api.v2"]),
            )
                .prop_map(|(kind, name)| RestartTarget { kind, name }),
            0..=1,
        ),
    )
        .prop_map(
            |(name, path, ttl, secret_name, restart_targets)| VaultCredential {
                name,
                path,
                ttl,
                secret_name,
                restart_targets,
            },
        )
}

fn stage_vault(risky_paths: &'static [&'static str]) -> impl Strategy<Value = Option<StageVault>> {
    prop::option::weighted(
        0.8,
        (
            prop::collection::vec(
                (mostly(VAULT_POLICY_PATHS, risky_paths), capabilities())
                    .prop_map(|(path, capabilities)| VaultPathRule { path, capabilities }),
                0..=4,
            ),
            prop::option::of(mostly(TTLS, LONG_TTLS)),
            prop::collection::vec(credential(), 0..=3),
        )
            .prop_map(|(policies, token_ttl, credentials)| StageVault {
                policies,
                token_ttl,
                credentials,
            }),
    )
}

/// A stage with a placeholder name; the name is set by [`pipeline`].
fn stage_body(risky_paths: &'static [&'static str]) -> impl Strategy<Value = Stage> {
    (
        role(),
        prop::option::of(any::<bool>()),
        prop::option::weighted(0.2, selector()),
        prop::collection::vec(permission(), 0..=4),
        prop::option::weighted(
            0.8,
            (
                prop::collection::vec(egress(), 0..=4),
                prop::collection::vec(ingress(), 0..=2),
            )
                .prop_map(|(egress, ingress)| StageNetwork { egress, ingress }),
        ),
        stage_vault(risky_paths),
    )
        .prop_map(
            |(role, automount, pod_selector, permissions, network, vault)| Stage {
                name: String::new(),
                role,
                pod_selector,
                automount_service_account_token: automount,
                permissions,
                network,
                vault,
                produces: Vec::new(),
            },
        )
}

fn substitute(text: &str, ns: &str, pipeline: &str, stage: &str) -> String {
    text.replace("<ns>", ns)
        .replace("<p>", pipeline)
        .replace("<s>", stage)
}

/// A schema-valid pipeline: 1 to 6 stages with unique names, secretNames unique in the pipeline
/// and credential names unique in their stage.
fn pipeline() -> impl Strategy<Value = AIPipeline> {
    pipeline_with(RISKY_VAULT_POLICY_PATHS)
}

/// A pipeline whose stages' dangerous Vault policy paths come from `risky_paths`.
fn pipeline_with(risky_paths: &'static [&'static str]) -> impl Strategy<Value = AIPipeline> {
    (
        pipeline_name(),
        namespace_name(),
        prop::collection::btree_set(stage_name(), 1..=6),
    )
        .prop_flat_map(move |(name, ns, names)| {
            let n = names.len();
            (
                Just(name),
                Just(ns),
                Just(names.into_iter().collect::<Vec<_>>()).prop_shuffle(),
                prop::collection::vec(stage_body(risky_paths), n),
            )
        })
        .prop_map(|(name, ns, names, bodies)| {
            let mut used_secrets = BTreeSet::new();
            let stages = names
                .into_iter()
                .zip(bodies)
                .map(|(stage_name, mut stage)| {
                    stage.name = stage_name;
                    if let Some(net) = &mut stage.network {
                        for e in &mut net.egress {
                            if let Some(n) = &mut e.namespace {
                                *n = substitute(n, &ns, &name, &stage.name);
                            }
                        }
                    }
                    if let Some(vault) = &mut stage.vault {
                        for p in &mut vault.policies {
                            p.path = substitute(&p.path, &ns, &name, &stage.name);
                        }
                        let mut cred_names = BTreeSet::new();
                        vault.credentials.retain(|c| {
                            cred_names.insert(c.name.clone())
                                && used_secrets.insert(c.secret_name.clone())
                        });
                        for c in &mut vault.credentials {
                            c.path = substitute(&c.path, &ns, &name, &stage.name);
                        }
                    }
                    stage
                })
                .collect();
            let mut p = AIPipeline::new(&name, AIPipelineSpec { stages });
            p.metadata.namespace = Some(ns);
            p
        })
}

fn kubernetes_ceiling() -> impl Strategy<Value = KubernetesCeiling> {
    (
        ceiling_list(API_GROUPS, RISKY_API_GROUPS),
        ceiling_list(RESOURCES, RISKY_RESOURCES),
        ceiling_list(VERBS, RISKY_VERBS),
    )
        .prop_map(|(api_groups, resources, verbs)| KubernetesCeiling {
            api_groups,
            resources,
            verbs,
        })
}

fn ceiling() -> impl Strategy<Value = Ceiling> {
    (
        prop::collection::vec(kubernetes_ceiling(), 0..=3),
        strings(GUARDRAIL_CIDRS, 0..=3),
        strings(GUARDRAIL_NAMESPACES, 0..=2),
        any::<bool>(),
        prop_oneof![
            1 => Just(
                GUARDRAIL_PATTERNS
                    .iter()
                    .map(|p| VaultPathCeiling {
                        pattern: p.to_string(),
                        capabilities: vec![
                            VaultCapability::Create,
                            VaultCapability::Read,
                            VaultCapability::Update,
                            VaultCapability::Patch,
                            VaultCapability::Delete,
                            VaultCapability::List,
                            VaultCapability::Sudo,
                        ],
                    })
                    .collect::<Vec<_>>()
            ),
            2 => prop::collection::vec(
                (s(GUARDRAIL_PATTERNS), capabilities())
                    .prop_map(|(pattern, capabilities)| VaultPathCeiling {
                        pattern,
                        capabilities,
                    }),
                0..=4,
            ),
        ],
        prop::option::of(s(MAX_TTLS)),
    )
        .prop_map(
            |(kubernetes, egress_cidrs, egress_namespaces, allow_ingress, paths, max_ttl)| {
                Ceiling {
                    kubernetes,
                    network: NetworkCeiling {
                        egress_cidrs,
                        egress_namespaces,
                        allow_ingress,
                        ingress_cidrs: Vec::new(),
                        ingress_namespaces: Vec::new(),
                    },
                    vault: VaultCeiling { paths, max_ttl },
                    allow_workload_creation: false,
                }
            },
        )
}

fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..LabelSelector::default()
    }
}

/// Namespace selectors: some select the test namespace (labelled `tier: ml`), some do not.
fn namespace_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        Just(labels(&[("tier", "ml")])),
        Just(labels(&[("tier", "dev")])),
        Just(labels(&[("kubernetes.io/metadata.name", "ml-fraud")])),
        Just(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Exists".into(),
                values: None,
            }]),
            ..LabelSelector::default()
        }),
    ]
}

fn guardrail_from(
    name: String,
    namespace_selector: LabelSelector,
    dns_egress: bool,
    roles: RoleCeilings,
) -> AccessGuardrail {
    AccessGuardrail::new(
        &name,
        AccessGuardrailSpec {
            namespace_selector,
            dns_egress,
            roles,
            allowed_roles: Vec::new(),
            credential_endpoints: Vec::new(),
            pod_creating_resources: Vec::new(),
            enforcement: Default::default(),
            isolate_unselected_pods: false,
        },
    )
}

/// 0 to 4 guardrails with unique names (as in a cluster).
fn guardrails() -> impl Strategy<Value = Vec<AccessGuardrail>> {
    prop::collection::vec(
        (
            namespace_selector(),
            prop::option::weighted(0.9, any::<bool>()),
            prop::option::weighted(0.7, ceiling()),
            prop::option::weighted(0.7, ceiling()),
            prop::option::weighted(0.7, ceiling()),
        ),
        0..=4,
    )
    .prop_map(|gs| {
        gs.into_iter()
            .enumerate()
            .map(|(i, (sel, dns, ingestion, training, deployment))| {
                guardrail_from(
                    format!(
                        "guardrail-{}",
                        char::from(b'a' + u8::try_from(7 * i % 26).expect("below 26"))
                    ),
                    sel,
                    dns.unwrap_or(true),
                    RoleCeilings {
                        ingestion,
                        training,
                        deployment,
                    },
                )
            })
            .collect()
    })
}

/// 1 to 4 guardrails that all select the namespace and all set a ceiling for every role.
fn binding_guardrails() -> impl Strategy<Value = Vec<AccessGuardrail>> {
    prop::collection::vec(
        (
            prop_oneof![
                Just(LabelSelector::default()),
                Just(labels(&[("tier", "ml")]))
            ],
            any::<bool>(),
            ceiling(),
            ceiling(),
            ceiling(),
        ),
        1..=4,
    )
    .prop_map(|gs| {
        gs.into_iter()
            .enumerate()
            .map(|(i, (sel, dns, ingestion, training, deployment))| {
                guardrail_from(
                    format!("binding-{i}"),
                    sel,
                    dns,
                    RoleCeilings {
                        ingestion: Some(ingestion),
                        training: Some(training),
                        deployment: Some(deployment),
                    },
                )
            })
            .collect()
    })
}

fn namespace_labels() -> BTreeMap<String, String> {
    BTreeMap::from([("tier".to_string(), "ml".to_string())])
}

/// Checks that the generators only make schema-valid input, then plans it.
fn plan_of(pipeline: &AIPipeline, guardrails: &[AccessGuardrail]) -> Result<Plan, TestCaseError> {
    let errors = validate_pipeline(pipeline);
    prop_assert!(
        errors.is_empty(),
        "the generator made an invalid pipeline: {errors:?}"
    );
    for g in guardrails {
        let errors = validate_guardrail(g);
        prop_assert!(
            errors.is_empty(),
            "the generator made an invalid guardrail: {errors:?}"
        );
    }
    match plan::validate_and_build(pipeline, "default", &namespace_labels(), guardrails) {
        Ok(plan) => Ok(plan),
        Err(errors) => Err(TestCaseError::fail(format!(
            "a valid pipeline was refused: {errors:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading plans
// ---------------------------------------------------------------------------------------------

fn stage_of(object: &Object) -> String {
    object
        .metadata()
        .labels
        .as_ref()
        .and_then(|l| l.get(STAGE_LABEL))
        .cloned()
        .unwrap_or_default()
}

fn roles_of<'a>(plan: &'a Plan, stage: &str) -> Vec<&'a Role> {
    plan.objects
        .iter()
        .filter(|o| stage_of(o) == stage)
        .filter_map(|o| match o {
            Object::Role(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn network_policies_of<'a>(plan: &'a Plan, stage: &str) -> Vec<&'a NetworkPolicy> {
    plan.objects
        .iter()
        .filter(|o| stage_of(o) == stage)
        .filter_map(|o| match o {
            Object::NetworkPolicy(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// One granted (group, resource, verb, names) of a Role rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
}

fn grants(role: &Role) -> Vec<Grant> {
    let mut out = Vec::new();
    for rule in role.rules.iter().flatten() {
        let names = rule.resource_names.clone().unwrap_or_default();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.push(Grant {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                        names: names.clone(),
                    });
                }
            }
        }
    }
    out
}

/// (peer, ports) of a NetworkPolicy's egress or ingress rules.
fn peers(np: &NetworkPolicy, egress: bool) -> Vec<(NetworkPolicyPeer, Vec<NetworkPort>)> {
    let spec = np.spec.clone().unwrap_or_default();
    let rules: Vec<(Option<Vec<NetworkPolicyPeer>>, _)> = if egress {
        spec.egress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.to, r.ports))
            .collect()
    } else {
        spec.ingress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.from, r.ports))
            .collect()
    };
    let mut out = Vec::new();
    for (peers, ports) in rules {
        let ports: Vec<NetworkPort> = ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| NetworkPort {
                port: match p.port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        u16::try_from(n).unwrap_or(0)
                    }
                    _ => 0,
                },
                protocol: match p.protocol.as_deref() {
                    Some("UDP") => Protocol::Udp,
                    Some("SCTP") => Protocol::Sctp,
                    _ => Protocol::Tcp,
                },
            })
            .collect();
        for peer in peers.unwrap_or_default() {
            out.push((peer, ports.clone()));
        }
    }
    out
}

fn by_name(ns: &str) -> LabelSelector {
    labels(&[("kubernetes.io/metadata.name", ns)])
}

fn is_dns_peer(peer: &NetworkPolicyPeer, ports: &[NetworkPort]) -> bool {
    peer.namespace_selector == Some(by_name("kube-system"))
        && peer.pod_selector == Some(labels(&[("k8s-app", "kube-dns")]))
        && peer.ip_block.is_none()
        && ports
            == [
                NetworkPort {
                    port: 53,
                    protocol: Protocol::Udp,
                },
                NetworkPort {
                    port: 53,
                    protocol: Protocol::Tcp,
                },
            ]
}

/// The peer an egress rule asks for, without `except`.
fn egress_matches(rule: &EgressRule, peer: &NetworkPolicyPeer, ports: &[NetworkPort]) -> bool {
    if rule.ports != ports {
        return false;
    }
    match (&rule.cidr, &rule.namespace) {
        (Some(cidr), _) => {
            peer.namespace_selector.is_none()
                && peer.pod_selector.is_none()
                && peer.ip_block.as_ref().is_some_and(|b| b.cidr == *cidr)
        }
        (None, Some(ns)) => {
            peer.ip_block.is_none()
                && peer.namespace_selector.as_ref() == Some(&by_name(ns))
                && peer.pod_selector == rule.pod_selector
        }
        (None, None) => false,
    }
}

fn ingress_matches(rule: &IngressRule, peer: &NetworkPolicyPeer, ports: &[NetworkPort]) -> bool {
    if rule.ports != ports {
        return false;
    }
    match &rule.from_cidr {
        Some(cidr) => {
            peer.namespace_selector.is_none()
                && peer.pod_selector.is_none()
                && peer.ip_block.as_ref().is_some_and(|b| b.cidr == *cidr)
        }
        None => {
            peer.ip_block.is_none()
                && peer.namespace_selector == rule.from_namespace_selector
                && peer.pod_selector == rule.from_pod_selector
        }
    }
}

/// Parses the HCL Portcullis writes, strictly: comment lines, then blocks of
/// `path "<path>" {` / `  capabilities = ["a", "b"]` / `}`. A path holding a character that ends
/// or escapes an HCL string is an error: it would change what the policy says.
fn parse_hcl(hcl: &str) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    static BLOCK: OnceLock<Regex> = OnceLock::new();
    static CAPS: OnceLock<Regex> = OnceLock::new();
    let block = BLOCK.get_or_init(|| Regex::new(r#"^path "([^"\\\n]*)" \{$"#).unwrap());
    let caps_re = CAPS
        .get_or_init(|| Regex::new(r#"^  capabilities = \[("[a-z]+"(, "[a-z]+")*)\]$"#).unwrap());
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut lines = hcl.lines().peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let path = block
            .captures(line)
            .ok_or_else(|| format!("not a path block: {line:?}"))?[1]
            .to_string();
        let caps_line = lines.next().unwrap_or_default();
        let caps = caps_re
            .captures(caps_line)
            .ok_or_else(|| format!("not a capabilities line: {caps_line:?}"))?[1]
            .split(", ")
            .map(|c| c.trim_matches('"').to_string())
            .collect::<BTreeSet<_>>();
        if lines.next() != Some("}") {
            return Err(format!("block of {path:?} is not closed"));
        }
        if out.insert(path.clone(), caps).is_some() {
            return Err(format!("path {path:?} appears twice"));
        }
    }
    Ok(out)
}

fn allowed<'a>(plan: &'a Plan, stage: &'a str) -> impl Iterator<Item = &'a Decision> + 'a {
    plan.decisions
        .iter()
        .filter(move |d| d.stage == stage && d.is_allowed())
}

fn denied<'a>(plan: &'a Plan, stage: &'a str) -> impl Iterator<Item = &'a Decision> + 'a {
    plan.decisions
        .iter()
        .filter(move |d| d.stage == stage && !d.is_allowed())
}

fn secret_names_of(pipeline: &AIPipeline, stage: &str) -> BTreeSet<String> {
    pipeline
        .spec
        .stages
        .iter()
        .filter(|s| s.name == stage)
        .flat_map(|s| s.vault.iter().flat_map(|v| &v.credentials))
        .map(|c| c.secret_name.clone())
        .collect()
}

fn is_dns_label_63(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(portcullis::api::patterns::DNS_LABEL).unwrap());
    s.len() <= 63 && re.is_match(s)
}

/// A label value as Kubernetes validates it.
fn is_label_value(s: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re =
        RE.get_or_init(|| Regex::new(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").unwrap());
    s.len() <= 63 && re.is_match(s)
}

/// Credential endpoints of the clouds (issue 11, class 4): no granted range may reach them.
fn metadata_addresses() -> Vec<std::net::IpAddr> {
    [
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "169.254.0.23",
        "100.100.100.200",
        "168.63.129.16",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "fe80::1",
        "::ffff:169.254.169.254",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Properties over plans
// ---------------------------------------------------------------------------------------------

fn check_role_rules_obey_floor(pipeline: &AIPipeline, plan: &Plan) -> Result<(), TestCaseError> {
    for stage in &pipeline.spec.stages {
        let own_secrets = secret_names_of(pipeline, &stage.name);
        for role in roles_of(plan, &stage.name) {
            for rule in role.rules.iter().flatten() {
                let names = rule.resource_names.clone().unwrap_or_default();
                let groups = rule.api_groups.clone().unwrap_or_default();
                let resources = rule.resources.clone().unwrap_or_default();
                prop_assert!(
                    rule.non_resource_urls.is_none(),
                    "non-resource URLs in {rule:?}"
                );
                for text in groups
                    .iter()
                    .chain(&resources)
                    .chain(&rule.verbs)
                    .chain(&names)
                {
                    prop_assert!(!text.contains('*'), "wildcard in {rule:?}");
                }
                for verb in &rule.verbs {
                    prop_assert!(
                        !floor::ESCALATION_VERBS.contains(&verb.as_str()),
                        "escalation verb in {rule:?}"
                    );
                }
                for resource in &resources {
                    prop_assert!(
                        !matches!(
                            resource.as_str(),
                            "pods/exec"
                                | "pods/attach"
                                | "pods/portforward"
                                | "serviceaccounts/token"
                        ) && !resource.ends_with("/proxy"),
                        "forbidden subresource in {rule:?}"
                    );
                    let base = resource.split('/').next().unwrap_or_default();
                    for group in &groups {
                        prop_assert!(
                            !floor::CLUSTER_SCOPED
                                .iter()
                                .any(|(g, r)| g == group && *r == base),
                            "cluster-scoped resource in {rule:?}"
                        );
                        if group.is_empty() && base == "secrets" {
                            prop_assert!(!names.is_empty(), "secrets without names: {rule:?}");
                            for n in &names {
                                prop_assert!(
                                    own_secrets.contains(n),
                                    "stage {} may read Secret {n:?}, which none of its credentials deliver to ({own_secrets:?}): {rule:?}",
                                    stage.name
                                );
                            }
                        }
                    }
                }
                for group in &groups {
                    if matches!(
                        group.as_str(),
                        "rbac.authorization.k8s.io"
                            | "admissionregistration.k8s.io"
                            | "apiextensions.k8s.io"
                    ) {
                        for verb in &rule.verbs {
                            prop_assert!(
                                !matches!(
                                    verb.as_str(),
                                    "create" | "update" | "patch" | "delete" | "deletecollection"
                                ),
                                "write on {group} in {rule:?}"
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Stronger than the floor check: a Secret may be read only when this stage's credential is
/// actually delivered to it (the credential is granted). A Secret named by a denied credential
/// is not managed by Portcullis, so it may hold anything.
fn check_secrets_only_when_delivered(plan: &Plan) -> Result<(), TestCaseError> {
    for summary in &plan.stages {
        let delivered: BTreeSet<&str> = plan
            .vault
            .credentials
            .iter()
            .filter(|c| c.stage == summary.name)
            .map(|c| c.secret_name.as_str())
            .collect();
        for role in roles_of(plan, &summary.name) {
            for g in grants(role) {
                if g.group.is_empty() && g.resource.split('/').next() == Some("secrets") {
                    for n in &g.names {
                        prop_assert!(
                            delivered.contains(n.as_str()),
                            "stage {} may {} Secret {n:?}, but no credential is delivered to it (delivered: {delivered:?})",
                            summary.name,
                            g.verb
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_decisions_match_objects(pipeline: &AIPipeline, plan: &Plan) -> Result<(), TestCaseError> {
    for stage in &pipeline.spec.stages {
        let name = stage.name.as_str();
        let role_grants: Vec<Grant> = roles_of(plan, name).into_iter().flat_map(grants).collect();
        let nps = network_policies_of(plan, name);
        prop_assert_eq!(nps.len(), 1, "one NetworkPolicy per stage");
        let np = nps[0];
        let egress = peers(np, true);
        let ingress = peers(np, false);
        let hcl: BTreeMap<String, BTreeSet<String>> = {
            let policies: Vec<_> = plan
                .vault
                .policies
                .iter()
                .filter(|p| p.stage == name)
                .collect();
            prop_assert!(policies.len() <= 1);
            match policies.first() {
                Some(p) => parse_hcl(&p.hcl()).map_err(|e| {
                    TestCaseError::fail(format!(
                        "the Vault policy of stage {name} does not say what was decided: {e}\n{}",
                        p.hcl()
                    ))
                })?,
                None => BTreeMap::new(),
            }
        };
        let creds: Vec<_> = plan
            .vault
            .credentials
            .iter()
            .filter(|c| c.stage == name)
            .collect();

        // A denied item reaches no object.
        for d in denied(plan, name) {
            match &d.item {
                Item::Kubernetes {
                    api_group,
                    resource,
                    verb,
                    resource_names,
                } => {
                    let wildcard_name = resource_names.iter().any(|n| n.contains('*'));
                    for g in &role_grants {
                        let same =
                            g.group == *api_group && g.resource == *resource && g.verb == *verb;
                        let covers = if wildcard_name {
                            g.names == *resource_names
                        } else {
                            g.names.is_empty() || resource_names.iter().all(|n| g.names.contains(n))
                        };
                        prop_assert!(
                            !(same && covers),
                            "denied {} ({}) but the Role of stage {name} grants {g:?}",
                            d.item,
                            d.reason
                        );
                    }
                }
                Item::Egress(rule) => {
                    if let Some(cidr) = &rule.cidr {
                        let net: IpNet = cidr.parse().unwrap();
                        for (peer, _) in &egress {
                            if let Some(block) = &peer.ip_block {
                                let b: IpNet = block.cidr.parse().unwrap();
                                let cut =
                                    block.except.iter().flatten().any(|e| {
                                        e.parse::<IpNet>().is_ok_and(|e| e.contains(&net))
                                    });
                                prop_assert!(
                                    !b.contains(&net) || cut,
                                    "denied egress to {cidr} ({}) but stage {name} may reach {}",
                                    d.reason,
                                    block.cidr
                                );
                            }
                        }
                    } else if let Some(ns) = &rule.namespace {
                        for (peer, ports) in &egress {
                            prop_assert!(
                                peer.namespace_selector.as_ref() != Some(&by_name(ns))
                                    || is_dns_peer(peer, ports),
                                "denied egress to namespace {ns} but stage {name} may reach it: {peer:?}"
                            );
                        }
                    }
                }
                Item::Ingress(rule) => {
                    for (peer, ports) in &ingress {
                        prop_assert!(
                            !ingress_matches(rule, peer, ports),
                            "denied {} but stage {name} accepts it",
                            d.item
                        );
                    }
                }
                Item::VaultPath { path, capability } => {
                    prop_assert!(
                        !hcl.get(path)
                            .is_some_and(|c| c.contains(capability.as_str())),
                        "denied {} ({}) but stage {name}'s Vault policy grants it",
                        d.item,
                        d.reason
                    );
                }
                Item::Credential { name: cred, .. } => {
                    prop_assert!(
                        !creds.iter().any(|c| c.name == *cred),
                        "denied credential {cred} of stage {name} is issued"
                    );
                }
                Item::RestartTarget {
                    credential,
                    kind,
                    name: target,
                } => {
                    prop_assert!(
                        !creds.iter().any(|c| c.name == *credential
                            && c.restart_targets
                                .iter()
                                .any(|t| t.kind == *kind && t.name == *target)),
                        "denied restart of {target} of stage {name} is planned"
                    );
                }
                Item::Dns => {
                    prop_assert!(false, "DNS is never denied, only left out");
                }
                Item::VaultTokenTtl { seconds } => {
                    for r in plan.vault.roles.iter().filter(|r| r.stage == name) {
                        prop_assert!(r.token_ttl < *seconds, "denied token TTL {seconds} is used");
                    }
                }
            }
        }

        // Every granted item has its allow decision.
        for g in &role_grants {
            prop_assert!(
                allowed(plan, name).any(|d| matches!(&d.item, Item::Kubernetes { api_group, resource, verb, resource_names }
                    if *api_group == g.group && *resource == g.resource && *verb == g.verb && *resource_names == g.names)),
                "the Role of stage {name} grants {g:?} without an allow decision"
            );
        }
        for (peer, ports) in &egress {
            let ok = allowed(plan, name).any(|d| match &d.item {
                Item::Dns => is_dns_peer(peer, ports),
                Item::Egress(rule) => egress_matches(rule, peer, ports),
                _ => false,
            });
            prop_assert!(
                ok,
                "egress peer of stage {name} without an allow decision: {peer:?} {ports:?}"
            );
        }
        for (peer, ports) in &ingress {
            let ok = allowed(plan, name).any(
                |d| matches!(&d.item, Item::Ingress(rule) if ingress_matches(rule, peer, ports)),
            );
            prop_assert!(
                ok,
                "ingress peer of stage {name} without an allow decision: {peer:?}"
            );
        }
        for (path, caps) in &hcl {
            for cap in caps {
                let ok = allowed(plan, name).any(|d| {
                    matches!(&d.item, Item::VaultPath { path: p, capability }
                    if p == path && capability.as_str() == cap)
                });
                prop_assert!(
                    ok,
                    "Vault policy of stage {name} grants {cap} on {path} without an allow decision"
                );
            }
        }
        for c in &creds {
            let ok = allowed(plan, name).any(|d| matches!(&d.item, Item::Credential { name, path, ttl_seconds, secret_name }
                if *name == c.name && *path == c.path && *ttl_seconds == c.ttl && *secret_name == c.secret_name));
            prop_assert!(
                ok,
                "credential {} of stage {name} is issued without an allow decision",
                c.name
            );
        }

        // And every allow decision is in the objects.
        for d in allowed(plan, name) {
            let present = match &d.item {
                Item::Kubernetes {
                    api_group,
                    resource,
                    verb,
                    resource_names,
                } => role_grants.iter().any(|g| {
                    g.group == *api_group
                        && g.resource == *resource
                        && g.verb == *verb
                        && g.names == *resource_names
                }),
                Item::Dns => egress.iter().any(|(p, ports)| is_dns_peer(p, ports)),
                Item::Egress(rule) => egress
                    .iter()
                    .any(|(p, ports)| egress_matches(rule, p, ports)),
                Item::Ingress(rule) => ingress
                    .iter()
                    .any(|(p, ports)| ingress_matches(rule, p, ports)),
                Item::VaultPath { path, capability } => hcl
                    .get(path)
                    .is_some_and(|c| c.contains(capability.as_str())),
                Item::VaultTokenTtl { seconds } => {
                    hcl.is_empty()
                        || plan
                            .vault
                            .roles
                            .iter()
                            .any(|r| r.stage == name && r.token_ttl == *seconds)
                }
                Item::Credential { name: cred, .. } => creds.iter().any(|c| c.name == *cred),
                // A restart target of a denied credential restarts nothing.
                Item::RestartTarget {
                    credential,
                    kind,
                    name: target,
                } => {
                    !creds.iter().any(|c| c.name == *credential)
                        || creds.iter().any(|c| {
                            c.name == *credential
                                && c.restart_targets
                                    .iter()
                                    .any(|t| t.kind == *kind && t.name == *target)
                        })
                }
            };
            prop_assert!(
                present,
                "allowed {} of stage {name} is in no object",
                d.item
            );
        }
    }
    Ok(())
}

fn check_metadata_cut_out(plan: &Plan) -> Result<(), TestCaseError> {
    for object in &plan.objects {
        let Object::NetworkPolicy(np) = object else {
            continue;
        };
        for (peer, _) in peers(np, true) {
            let Some(block) = &peer.ip_block else {
                continue;
            };
            let net: IpNet = block
                .cidr
                .parse()
                .map_err(|e| TestCaseError::fail(format!("{}: {e}", block.cidr)))?;
            for meta in metadata_addresses() {
                if net.contains(&meta) {
                    let cut = block
                        .except
                        .iter()
                        .flatten()
                        .filter_map(|e| e.parse::<IpNet>().ok())
                        .any(|e| e.contains(&meta));
                    prop_assert!(
                        cut,
                        "{} reaches the metadata address {meta} in {}",
                        block.cidr,
                        object.name()
                    );
                }
            }
        }
    }
    Ok(())
}

fn check_names(plan: &Plan) -> Result<(), TestCaseError> {
    for object in &plan.objects {
        let name = object.name();
        prop_assert!(
            is_dns_label_63(name),
            "{} name {name:?} is not a DNS-1123 label",
            object.kind()
        );
        for (k, v) in object.metadata().labels.iter().flatten() {
            prop_assert!(
                is_label_value(v),
                "label {k}={v:?} is not a valid label value"
            );
        }
    }
    for p in &plan.vault.policies {
        prop_assert!(is_dns_label_63(&p.name), "Vault policy {:?}", p.name);
    }
    for r in &plan.vault.roles {
        prop_assert!(is_dns_label_63(&r.name), "Vault role {:?}", r.name);
        for sa in &r.bound_service_account_names {
            prop_assert!(is_dns_label_63(sa), "bound service account {sa:?}");
        }
    }
    let mut sa_names = BTreeSet::new();
    for s in &plan.stages {
        prop_assert!(
            sa_names.insert(s.service_account.as_str()),
            "two stages are named {}",
            s.service_account
        );
    }
    let mut vault_names = BTreeSet::new();
    for p in &plan.vault.policies {
        prop_assert!(
            vault_names.insert(p.name.as_str()),
            "two Vault policies {}",
            p.name
        );
    }
    // Objects of one kind never share a name.
    let mut seen = BTreeSet::new();
    for o in &plan.objects {
        prop_assert!(
            seen.insert((o.kind(), o.name())),
            "{} {} twice",
            o.kind(),
            o.name()
        );
    }
    Ok(())
}

fn smallest_max_ttl(guardrails: &[AccessGuardrail], role: StageRole) -> u64 {
    guardrails
        .iter()
        .filter_map(|g| g.spec.roles.get(role))
        .map(|c| {
            c.vault
                .max_ttl
                .as_deref()
                .map(|t| parse_duration(t).unwrap())
                .unwrap_or(3600)
        })
        .min()
        .unwrap_or(3600)
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures are reported, not written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    })]

    #[test]
    fn role_rules_obey_the_floor(pipeline in pipeline(), guardrails in guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        check_role_rules_obey_floor(&pipeline, &plan)?;
    }

    #[test]
    fn secrets_are_readable_only_when_delivered(pipeline in pipeline(), guardrails in guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        check_secrets_only_when_delivered(&plan)?;
    }

    #[test]
    fn objects_hold_exactly_the_allowed_items(pipeline in pipeline(), guardrails in guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        check_decisions_match_objects(&pipeline, &plan)?;
    }

    /// Vault policy paths that would end the HCL string they are written into (`"`, `\\`,
    /// `${`) are refused by validation, naming the field, so they never reach a policy.
    #[test]
    fn vault_paths_that_break_hcl_are_refused(pipeline in pipeline_with(HCL_BREAKING_PATHS)) {
        let hostile: Vec<(usize, usize)> = pipeline.spec.stages.iter().enumerate().flat_map(|(i, s)| {
            s.vault.iter().flat_map(|v| &v.policies).enumerate()
                .filter(|(_, r)| r.path.contains(['"', '\\', '$', '{', '}']))
                .map(move |(j, _)| (i, j))
        }).collect();
        let errors = validate_pipeline(&pipeline);
        for (i, j) in &hostile {
            let field = format!("spec.stages[{i}].vault.policies[{j}].path");
            prop_assert!(errors.iter().any(|e| e.field == field), "{field} was not refused: {errors:?}");
        }
        if !hostile.is_empty() {
            prop_assert!(plan::validate_and_build(&pipeline, "default", &namespace_labels(), &[]).is_err());
        }
    }

    #[test]
    fn egress_never_reaches_the_metadata_address(pipeline in pipeline(), guardrails in guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        check_metadata_cut_out(&plan)?;
    }

    #[test]
    fn object_names_are_short_labels_and_unique(pipeline in pipeline(), guardrails in guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        check_names(&plan)?;
    }

    #[test]
    fn plans_are_deterministic(pipeline in pipeline(), guardrails in guardrails()) {
        let first = plan_of(&pipeline, &guardrails)?;
        let second = plan_of(&pipeline, &guardrails)?;
        prop_assert_eq!(&first, &second);
        let mut reversed = guardrails.clone();
        reversed.reverse();
        let third = plan_of(&pipeline, &reversed)?;
        let a = portcullis::cli::output::json(std::slice::from_ref(&first));
        let b = portcullis::cli::output::json(std::slice::from_ref(&third));
        prop_assert!(a == b, "reversing the guardrails changed the output:\n{}", pretty_assertions::StrComparison::new(&a, &b));
    }

    #[test]
    fn vault_lifetimes_stay_under_every_max_ttl(pipeline in pipeline(), guardrails in binding_guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        for summary in &plan.stages {
            let max = smallest_max_ttl(&guardrails, summary.role);
            for r in plan.vault.roles.iter().filter(|r| r.stage == summary.name) {
                prop_assert!(r.token_ttl <= r.token_max_ttl, "{r:?}");
                prop_assert!(r.token_max_ttl <= max, "{r:?} exceeds the smallest maxTTL {max}");
                prop_assert!(r.token_ttl > 0, "{r:?}");
            }
            for c in plan.vault.credentials.iter().filter(|c| c.stage == summary.name) {
                prop_assert!(c.ttl <= max && c.ttl > 0, "{c:?} exceeds the smallest maxTTL {max}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------------------------

fn example_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            example_files(&e, out);
        } else if e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(e);
        }
    }
}

fn examples() -> &'static [String] {
    static EXAMPLES: OnceLock<Vec<String>> = OnceLock::new();
    EXAMPLES.get_or_init(|| {
        let mut files = Vec::new();
        example_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
            &mut files,
        );
        assert!(!files.is_empty(), "no examples found");
        files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect()
    })
}

fn example_guardrails() -> &'static [AccessGuardrail] {
    static GUARDRAILS: OnceLock<Vec<AccessGuardrail>> = OnceLock::new();
    GUARDRAILS.get_or_init(|| {
        let mut inputs = Inputs::default();
        for text in examples() {
            inputs.read_str(Path::new("examples.yaml"), text, Expect::Guardrails);
        }
        inputs.guardrails.into_iter().map(|(_, g)| g).collect()
    })
}

/// Reads `text` the way `portcullis plan -f` does, plans what loads, and also types every
/// document on its own (without the loader's validation) and validates and plans it.
fn digest(text: &str) {
    let mut inputs = Inputs::default();
    inputs.read_str(Path::new("x.yaml"), text, Expect::Anything);
    let mut guardrails: Vec<AccessGuardrail> =
        inputs.guardrails.iter().map(|(_, g)| g.clone()).collect();
    guardrails.extend(example_guardrails().iter().cloned());
    for (_, ns_labels) in inputs.namespaces.iter().take(1) {
        for (_, p) in &inputs.pipelines {
            let _ = plan::validate_and_build(p, "default", ns_labels, &guardrails);
        }
    }
    for (_, p) in &inputs.pipelines {
        let plan = plan::validate_and_build(p, "default", &namespace_labels(), &guardrails);
        assert!(plan.is_ok(), "a loaded pipeline does not plan: {plan:?}");
        let plan = plan.unwrap();
        let _ = portcullis::cli::output::json(std::slice::from_ref(&plan));
        let _ = portcullis::cli::output::yaml(std::slice::from_ref(&plan));
        let _ = portcullis::cli::output::table(std::slice::from_ref(&plan));
    }
    let mut inputs = Inputs::default();
    inputs.read_str(Path::new("x.yaml"), text, Expect::Guardrails);

    // Typed without the loader: invalid objects reach the validators and the planner.
    let Ok(docs) = serde_saphyr::from_multiple::<serde_json::Value>(text) else {
        return;
    };
    let mut typed_guardrails = Vec::new();
    let mut typed_pipelines = Vec::new();
    for doc in docs {
        if let Ok(g) = serde_json::from_value::<AccessGuardrail>(doc.clone()) {
            let _ = validate_guardrail(&g);
            typed_guardrails.push(g);
        }
        if let Ok(p) = serde_json::from_value::<AIPipeline>(doc) {
            typed_pipelines.push(p);
        }
    }
    typed_guardrails.extend(example_guardrails().iter().cloned());
    for p in typed_pipelines {
        let errors = validate_pipeline(&p);
        let plan = plan::validate_and_build(&p, "default", &namespace_labels(), &typed_guardrails);
        assert_eq!(
            plan.is_ok(),
            errors.is_empty(),
            "plan::build and validate_pipeline disagree"
        );
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    DeleteChars(Index, usize),
    ReplaceChar(Index, char),
    InsertText(Index, &'static str),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    Truncate(Index),
}

const INSERTS: &[&str] = &[
    "*",
    "\"*\"",
    "- ",
    ": ",
    "\n",
    "  ",
    "{",
    "}",
    "[",
    "]",
    "&a ",
    "*a",
    "!!binary ",
    "~",
    "null",
    "0",
    "-1",
    "65536",
    "99999999999999999999h",
    "0s",
    "169.254.169.254/32",
    "sudo",
    "sys/",
    "+/",
    "escalate",
    "pods/exec",
    "\u{0}",
    "é",
    "\t",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "<<: *a\n",
    "apiVersion: v1\nkind: List\nitems: [",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1usize..20).prop_map(|(i, n)| Mutation::DeleteChars(i, n)),
        (
            any::<Index>(),
            prop_oneof![
                select(
                    &[
                        ':', '-', ' ', '*', '{', '[', '"', '\'', '&', '!', '|', '>', '#', '\n',
                        '/', '0', '9', 'Z'
                    ][..]
                ),
                any::<char>()
            ]
        )
            .prop_map(|(i, c)| Mutation::ReplaceChar(i, c)),
        (any::<Index>(), select(INSERTS)).prop_map(|(i, t)| Mutation::InsertText(i, t)),
        any::<Index>().prop_map(Mutation::DeleteLine),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in mutations {
        let n = chars.len().max(1);
        match m {
            Mutation::DeleteChars(i, k) => {
                let at = i.index(n).min(chars.len());
                let end = (at + k).min(chars.len());
                chars.drain(at..end);
            }
            Mutation::ReplaceChar(i, c) => {
                if !chars.is_empty() {
                    let at = i.index(chars.len());
                    chars[at] = *c;
                }
            }
            Mutation::InsertText(i, t) => {
                let at = i.index(n + 1).min(chars.len());
                chars.splice(at..at, t.chars());
            }
            Mutation::DeleteLine(_)
            | Mutation::DuplicateLine(_)
            | Mutation::SwapLines(..)
            | Mutation::Truncate(_) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<String> = s.split('\n').map(str::to_string).collect();
                let len = lines.len();
                match m {
                    Mutation::DeleteLine(i) => {
                        lines.remove(i.index(len));
                    }
                    Mutation::DuplicateLine(i) => {
                        let at = i.index(len);
                        let line = lines[at].clone();
                        lines.insert(at, line);
                    }
                    Mutation::SwapLines(a, b) => lines.swap(a.index(len), b.index(len)),
                    Mutation::Truncate(i) => lines.truncate(i.index(len) + 1),
                    _ => unreachable!(),
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures are reported, not written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    })]

    #[test]
    fn random_text_never_panics(text in prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9:{}\\[\\],'\"*&!|>#~ \n-]{0,200}",
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]) {
        digest(&text);
    }

    #[test]
    fn mutated_examples_never_panic(
        file in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let examples = examples();
        let text = apply(&examples[file.index(examples.len())], &mutations);
        digest(&text);
    }
}

fn json_paths(v: &serde_json::Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(path.clone());
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let mut p = path.clone();
                p.push(k.clone());
                json_paths(v, p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let mut p = path.clone();
                p.push(i.to_string());
                json_paths(v, p, out);
            }
        }
        _ => {}
    }
}

/// Every document of the examples, with every path into it.
fn example_documents() -> &'static [(serde_json::Value, Vec<Vec<String>>)] {
    static DOCS: OnceLock<Vec<(serde_json::Value, Vec<Vec<String>>)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut out = Vec::new();
        for text in examples() {
            for doc in serde_saphyr::from_multiple::<serde_json::Value>(text).unwrap() {
                if doc.is_null() {
                    continue;
                }
                let mut paths = Vec::new();
                json_paths(&doc, Vec::new(), &mut paths);
                out.push((doc, paths));
            }
        }
        out
    })
}

fn odd_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(65536)),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
        Just(json!(true)),
        Just(json!("")),
        Just(json!("*")),
        Just(json!(["*"])),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"": ""})),
        Just(json!("169.254.169.254/32")),
        Just(json!("0s")),
        Just(json!("99999999999999999999h")),
        Just(json!("sys/*")),
        Just(json!("x".repeat(300))),
        any::<String>().prop_map(|s| json!(s)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures are reported, not written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    })]

    /// Example documents with one field (or object, or list) replaced by a value of the wrong
    /// type, out of range, or dangerous.
    #[test]
    fn wrong_values_in_any_field_never_panic(
        doc in any::<Index>(),
        path in any::<Index>(),
        value in odd_value(),
    ) {
        let docs = example_documents();
        let (doc, paths) = &docs[doc.index(docs.len())];
        let path = &paths[path.index(paths.len())];
        let mut doc = doc.clone();
        let mut at = &mut doc;
        for p in path {
            at = match at {
                serde_json::Value::Object(m) => m.get_mut(p).unwrap(),
                serde_json::Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
                _ => unreachable!(),
            };
        }
        *at = value;
        digest(&serde_json::to_string(&doc).unwrap());
    }
}

/// Deep nesting and alias expansion ("billion laughs") end in an error, not a stack overflow
/// or a hang.
#[test]
fn deep_and_aliased_yaml_never_panics() {
    for open in ["[", "{a: ", "- ", "a:\n "] {
        digest(&open.repeat(20_000));
    }
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h"])
    {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    let started = std::time::Instant::now();
    let mut inputs = Inputs::default();
    inputs.read_str(Path::new("bomb.yaml"), &bomb, Expect::Anything);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "an alias bomb took {:?}",
        started.elapsed()
    );
    assert!(!inputs.errors.is_empty(), "the alias bomb is refused");
}

// ---------------------------------------------------------------------------------------------
// Classes of escape (issue 11): each property generates attacks of one shape
// ---------------------------------------------------------------------------------------------

/// Names chosen to collide when joined with '-' or cut at a prefix: `team` + `prod-scorer` and
/// `team-prod` + `scorer`, `fraud` and `fraud-v2`, dotted pipeline names.
const TENANT_NAMESPACES: &[&str] = &["team", "team-prod", "ml", "ml-fraud", "a", "a-b"];
const TENANT_PIPELINES: &[&str] = &[
    "scorer",
    "prod-scorer",
    "fraud",
    "fraud-v2",
    "fraud-detector",
    "fraud-fraud-detector",
    "a.b",
    "a-b",
    "b",
];
const TENANT_STAGES: &[&str] = &["serve", "x", "x-y", "y", "detector-serve", "b-x"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Triple {
    namespace: String,
    pipeline: String,
    stage: String,
}

fn triple() -> impl Strategy<Value = Triple> {
    (s(TENANT_NAMESPACES), s(TENANT_PIPELINES), s(TENANT_STAGES)).prop_map(
        |(namespace, pipeline, stage)| Triple {
            namespace,
            pipeline,
            stage,
        },
    )
}

/// Guardrail Vault path patterns: literal segments and placeholders joined by separators,
/// some of which (`-`, `.`, nothing) can occur inside names and make a pattern ambiguous.
fn templated_pattern() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{namespace}"),
        Just("{pipeline}"),
        Just("{stage}"),
        Just("creds"),
        Just("x"),
    ];
    let sep = prop_oneof![
        3 => Just("/"),
        2 => Just("_"),
        2 => Just("-"),
        1 => Just("."),
        1 => Just(""),
        1 => Just("@"),
    ];
    (
        s(&["database", "kv/data", "aws"]),
        prop::collection::vec((sep, piece), 1..=4),
        s(&["", "*", "/*", "_*", "-*"]),
    )
        .prop_map(|(mount, pieces, tail)| {
            let mut out = mount;
            out.push('/');
            for (i, (sep, piece)) in pieces.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                out.push_str(piece);
            }
            out.push_str(&tail);
            out
        })
}

fn fill(pattern: &str, t: &Triple) -> String {
    pattern
        .replace("{namespace}", &t.namespace)
        .replace("{pipeline}", &t.pipeline)
        .replace("{stage}", &t.stage)
}

/// The concrete path `pattern` gives `t`, with its trailing `*` standing for `suffix`.
fn concrete(pattern: &str, t: &Triple, suffix: &str) -> String {
    let filled = fill(pattern, t);
    match filled.strip_suffix('*') {
        Some(body) => format!("{body}{suffix}"),
        None => filled,
    }
}

fn one_stage_pipeline(t: &Triple, vault_path: &str) -> AIPipeline {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": t.pipeline, "namespace": t.namespace},
        "spec": {"stages": [{
            "name": t.stage,
            "role": "Training",
            "vault": {"policies": [{"path": vault_path, "capabilities": ["read"]}]},
        }]},
    }))
    .expect("a pipeline")
}

fn guardrail_with_pattern(pattern: &str) -> AccessGuardrail {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AccessGuardrail",
        "metadata": {"name": "tenants"},
        "spec": {"roles": {"training": {"vault": {"paths": [
            {"pattern": pattern, "capabilities": ["read"]},
        ]}}}},
    }))
    .expect("a guardrail")
}

fn vault_path_allowed(plan: &Plan) -> bool {
    plan.decisions
        .iter()
        .any(|d| d.is_allowed() && matches!(d.item, Item::VaultPath { .. }))
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(512)
    })]

    /// Class 1: a path a guardrail pattern gives triple `owner` is never granted to a triple
    /// that differs from it in a placeholder the pattern uses. Ambiguous patterns are refused
    /// (the guardrail then allows nothing), so no joining or prefix trick reaches another
    /// tenant's credentials.
    #[test]
    fn guardrail_patterns_never_give_two_triples_one_path(
        pattern in templated_pattern(),
        owner in triple(),
        attacker in triple(),
        suffix in s(&["", "x", "-v2", "_z", "/y", ".b"]),
    ) {
        let target = concrete(&pattern, &owner, &suffix);
        prop_assume!(portcullis::api::validate::validate_pipeline(&one_stage_pipeline(&attacker, &target)).is_empty());
        let guardrail = guardrail_with_pattern(&pattern);
        let plan = plan::validate_and_build(
            &one_stage_pipeline(&attacker, &target), "default", &BTreeMap::new(), std::slice::from_ref(&guardrail),
        ).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let ambiguous = portcullis::api::validate::ambiguous_placeholders(&pattern);
        let uses = |p: &str| pattern.contains(p);
        let same_tenant = (!uses("{namespace}") || owner.namespace == attacker.namespace)
            && (!uses("{pipeline}") || owner.pipeline == attacker.pipeline)
            && (!uses("{stage}") || owner.stage == attacker.stage);
        if ambiguous.is_some() {
            prop_assert!(!vault_path_allowed(&plan), "{pattern} is refused, yet {target} was granted");
        } else if !same_tenant {
            prop_assert!(
                !vault_path_allowed(&plan),
                "{pattern}: {target} of {owner:?} was granted to {attacker:?}"
            );
        }
    }

    /// Class 2: Vault names are injective over (namespace, pipeline, stage), whatever the
    /// names spell when joined.
    #[test]
    fn vault_names_are_injective(a in triple(), b in triple()) {
        let name = |t: &Triple| plan::names::vault_object(
            plan::names::DEFAULT_VAULT_NAME_PREFIX, &t.namespace, &t.pipeline, &t.stage,
        );
        prop_assert_eq!(name(&a) == name(&b), a == b, "{:?} {:?}", name(&a), name(&b));
        prop_assert!(name(&a).starts_with("portcullis-"));
        prop_assert!(name(&a).len() <= 63);
    }

    /// Class 3: every stage's NetworkPolicy selects only pods with that stage's pipeline and
    /// stage labels, whatever podSelector the stage wrote, so no two stages' policies select
    /// one pod.
    #[test]
    fn network_policies_select_only_their_own_stage(pipeline in pipeline(), guardrails in guardrails()) {
        let plan = plan_of(&pipeline, &guardrails)?;
        let selectors: Vec<BTreeMap<String, String>> = plan.objects.iter().filter_map(|o| match o {
            Object::NetworkPolicy(np) => np.spec.as_ref()?.pod_selector.clone()?.match_labels,
            _ => None,
        }).collect();
        prop_assert_eq!(selectors.len(), pipeline.spec.stages.len());
        for (stage, labels) in pipeline.spec.stages.iter().zip(&selectors) {
            prop_assert_eq!(labels.get(STAGE_LABEL), Some(&stage.name));
            prop_assert!(labels.contains_key("portcullis.dev/pipeline"));
        }
        for (i, a) in selectors.iter().enumerate() {
            for b in &selectors[i + 1..] {
                prop_assert!(a.iter().any(|(k, v)| b.get(k).is_some_and(|w| w != v)), "{a:?} and {b:?} can select one pod");
            }
        }
    }

    /// Classes 5 and 6: no Role lets a stage write pods or workloads unless every guardrail
    /// that binds it allows workload creation, and no Role writes Portcullis's kinds or
    /// NetworkPolicies.
    #[test]
    fn roles_never_create_workloads_or_administer_themselves(
        pipeline in pipeline_writing_workloads(),
        allow in any::<bool>(),
        guardrails in guardrails(),
    ) {
        let mut guardrails = guardrails;
        for g in &mut guardrails {
            for c in [&mut g.spec.roles.ingestion, &mut g.spec.roles.training, &mut g.spec.roles.deployment].into_iter().flatten() {
                c.allow_workload_creation = allow;
                c.kubernetes.push(KubernetesCeiling {
                    api_groups: vec![String::new(), "apps".into(), "batch".into(), "portcullis.dev".into(), "networking.k8s.io".into()],
                    resources: vec!["pods".into(), "deployments".into(), "jobs".into(), "aipipelines".into(), "networkpolicies".into()],
                    verbs: vec!["create".into(), "patch".into(), "update".into()],
                });
            }
        }
        let plan = plan_of(&pipeline, &guardrails)?;
        for object in &plan.objects {
            let Object::Role(role) = object else { continue };
            for rule in role.rules.iter().flatten() {
                let writes = rule.verbs.iter().any(|v| floor::WORKLOAD_VERBS.contains(&v.as_str()));
                for g in rule.api_groups.iter().flatten() {
                    for r in rule.resources.iter().flatten() {
                        prop_assert!(!(writes && (g == "portcullis.dev" || r == "networkpolicies")), "{} writes {r}.{g}", object.name());
                        let workload = floor::WORKLOAD_RESOURCES.iter().any(|(wg, wr)| wg == g && wr == r);
                        prop_assert!(!(writes && workload && !allow), "{} writes {r}.{g} without allowWorkloadCreation", object.name());
                    }
                }
            }
        }
    }

    /// Class 8: Vault paths with `.`, `..`, empty segments or percent-encodings, and system
    /// mounts under a Vault namespace, are never granted, whatever the guardrail allows.
    #[test]
    fn vault_path_tricks_are_never_granted(
        t in triple(),
        trick in s(&["..", ".", "", "%2e%2e", "sys", "auth", "identity"]),
        depth in 1usize..4,
    ) {
        let mut segments = vec!["kv".to_string(), "data".into(), t.namespace.clone(), t.pipeline.clone(), t.stage.clone()];
        segments.insert(depth.min(segments.len()), trick.clone());
        let path = format!("{}/*", segments.join("/"));
        prop_assume!(validate_pipeline(&one_stage_pipeline(&t, &path)).is_empty());
        let plan = plan::validate_and_build(
            &one_stage_pipeline(&t, &path), "default", &BTreeMap::new(),
            &[guardrail_with_pattern("kv/*")],
        ).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert!(!vault_path_allowed(&plan), "{path} was granted");
    }

    /// Class 7: a stage whose role no guardrail with allowedRoles lists gets its identity and
    /// nothing else.
    #[test]
    fn roles_a_namespace_may_not_use_get_identity_only(
        pipeline in pipeline(),
        guardrails in guardrails(),
        allowed in prop::collection::vec(select(StageRole::ALL.to_vec()), 1..=2),
    ) {
        let mut guardrails = guardrails;
        for g in &mut guardrails {
            g.spec.allowed_roles.clone_from(&allowed);
        }
        let plan = plan_of(&pipeline, &guardrails)?;
        let selecting = guardrails.iter().any(|g| portcullis::policy::selects_namespace(&g.spec.namespace_selector, &plan.namespace, &namespace_labels()));
        for stage in &pipeline.spec.stages {
            if !selecting || allowed.contains(&stage.role) {
                continue;
            }
            prop_assert!(
                plan.decisions.iter().filter(|d| d.stage == stage.name).all(|d| !d.is_allowed()),
                "stage {} ({:?}) was granted something", stage.name, stage.role
            );
        }
    }
}

/// Pipelines whose stages ask to write workloads and their own limits.
fn pipeline_writing_workloads() -> impl Strategy<Value = AIPipeline> {
    (
        pipeline(),
        prop::collection::vec(
            (
                s(&["", "apps", "batch", "portcullis.dev", "networking.k8s.io"]),
                s(&[
                    "pods",
                    "deployments",
                    "jobs",
                    "aipipelines",
                    "networkpolicies",
                ]),
                s(&["create", "patch", "update"]),
            ),
            1..=4,
        ),
    )
        .prop_map(|(mut p, asks)| {
            for (i, (group, resource, verb)) in asks.into_iter().enumerate() {
                let n = p.spec.stages.len();
                p.spec.stages[i % n].permissions.push(PermissionRule {
                    api_groups: vec![group],
                    resources: vec![resource],
                    resource_names: Vec::new(),
                    verbs: vec![verb],
                });
            }
            p
        })
}
