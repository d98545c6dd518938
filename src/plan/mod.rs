//! (pipeline, namespace labels, guardrails) -> [`Plan`]: the Kubernetes objects, the Vault
//! configuration and the decisions behind them. Pure and deterministic: the same input gives
//! byte-identical output, whatever the order of the guardrails.
//!
//! Objects are built only from allowed decisions, so a denied item can never reach an object,
//! and every granted item has its allow decision.

pub mod names;
mod vault;

pub use vault::{AclRule, CredentialRequest, RestartRef, VaultPlan, VaultPolicy, VaultRole};

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::api::validate::{FieldError, Validated, validate};
use crate::api::{AIPipeline, AccessGuardrail, NetworkPort, StageRole, VaultCapability};
use crate::policy::{self, Decision, Item, Scope, StageContext, floor};

/// A Kubernetes object the plan asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::ServiceAccount(o) => &o.metadata,
            Object::Role(o) => &o.metadata,
            Object::RoleBinding(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }
}

/// One stage's identity and the count of what it was granted and denied.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageSummary {
    pub name: String,
    pub role: StageRole,
    pub service_account: String,
    pub granted: u32,
    pub denied: u32,
    /// Names of the AccessGuardrails that bind the stage; empty when the defaults apply.
    pub guardrails: Vec<String>,
}

/// Everything one pipeline turns into.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub pipeline: String,
    pub namespace: String,
    pub stages: Vec<StageSummary>,
    pub objects: Vec<Object>,
    pub vault: VaultPlan,
    pub decisions: Vec<Decision>,
    /// Whether the Secrets and workloads the pipeline names were looked up in the cluster
    /// ([`PlanOptions::cluster`]); when not (`plan` offline), grants on them are unverified.
    pub cluster_checked: bool,
}

impl Plan {
    pub fn denied(&self) -> usize {
        self.decisions.iter().filter(|d| !d.is_allowed()).count()
    }

    /// Why an allowed decision could not be verified: in a plan made without the cluster, a
    /// grant on a named Secret (who owns it is known only in the cluster) or a restart target
    /// (whose workload it is, likewise). None for everything else.
    pub fn unverified(&self, d: &Decision) -> Option<&'static str> {
        if self.cluster_checked || !d.is_allowed() {
            return None;
        }
        match &d.item {
            Item::Kubernetes {
                api_group,
                resource,
                resource_names,
                ..
            } if api_group.is_empty()
                && floor::resource_base(resource) == "secrets"
                && !resource_names.is_empty() =>
            {
                Some(
                    "unverified offline: the operator refuses it if the Secret exists and is not this pipeline's",
                )
            }
            Item::Credential { .. } => Some(
                "unverified offline: the operator refuses it if its Secret exists and is not this pipeline's",
            ),
            Item::RestartTarget { .. } => Some(
                "unverified offline: the operator restarts it only if it runs as one of this pipeline's stages",
            ),
            _ => None,
        }
    }
}

/// What a plan depends on beyond the pipeline, its namespace and the guardrails.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions<'a> {
    /// The prefix of every Vault policy and role name (`--vault-name-prefix`).
    pub vault_name_prefix: &'a str,
    /// Who owns which credential path cluster-wide; None when not known (then a credential path
    /// is only compared with the pipeline's own stages).
    pub claims: Option<&'a policy::CredentialClaims>,
    /// The Secrets and workloads the pipeline names, as the cluster has them
    /// ([`policy::cluster::named_secrets`], [`policy::cluster::named_workloads`]); None when
    /// not known (`plan` offline): then grants on them are allowed and marked unverified.
    pub cluster: Option<&'a policy::ClusterFacts>,
}

impl Default for PlanOptions<'_> {
    fn default() -> Self {
        PlanOptions {
            vault_name_prefix: names::DEFAULT_VAULT_NAME_PREFIX,
            claims: None,
            cluster: None,
        }
    }
}

/// Validates `pipeline` ([`validate`]) and plans it ([`build`]).
pub fn validate_and_build(
    pipeline: &AIPipeline,
    default_namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[AccessGuardrail],
) -> Result<Plan, Vec<FieldError>> {
    validate_and_build_with(
        pipeline,
        default_namespace,
        namespace_labels,
        guardrails,
        PlanOptions::default(),
    )
}

/// [`validate_and_build`] with [`PlanOptions`].
pub fn validate_and_build_with(
    pipeline: &AIPipeline,
    default_namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[AccessGuardrail],
    options: PlanOptions<'_>,
) -> Result<Plan, Vec<FieldError>> {
    let pipeline = validate(pipeline)?;
    Ok(build_with(
        &pipeline,
        default_namespace,
        namespace_labels,
        guardrails,
        options,
    ))
}

/// Plans `pipeline` in its namespace (`metadata.namespace`, else `default_namespace`), whose
/// labels are `namespace_labels` (the `kubernetes.io/metadata.name` label is added here).
/// Only a [`Validated`] pipeline can be planned, so planning cannot fail.
pub fn build(
    validated: &Validated<impl Borrow<AIPipeline>>,
    default_namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[AccessGuardrail],
) -> Plan {
    build_with(
        validated,
        default_namespace,
        namespace_labels,
        guardrails,
        PlanOptions::default(),
    )
}

/// [`build`] with [`PlanOptions`].
pub fn build_with(
    validated: &Validated<impl Borrow<AIPipeline>>,
    default_namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[AccessGuardrail],
    options: PlanOptions<'_>,
) -> Plan {
    let pipeline = validated.pipeline();
    let name = pipeline.metadata.name.as_deref().unwrap_or_default();
    let namespace = pipeline
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(default_namespace);
    let mut labels = namespace_labels.clone();
    labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
    // Every stage is in the same namespace: the guardrails that select it are found once, and
    // each role's scope is built once, for the first stage of that role.
    let applicable = policy::applicable_guardrails(&labels, guardrails);
    let mut scopes: [Option<Scope<'_>>; 3] = [None, None, None];

    let stages = &pipeline.spec.stages;
    let credentials = stages
        .iter()
        .flat_map(|s| s.vault.iter().flat_map(|v| &v.credentials))
        .count();
    let mut plan = Plan {
        pipeline: name.into(),
        namespace: namespace.into(),
        stages: Vec::with_capacity(stages.len()),
        objects: Vec::with_capacity(stages.len() * 4),
        vault: VaultPlan {
            policies: Vec::with_capacity(stages.len()),
            roles: Vec::with_capacity(stages.len()),
            credentials: Vec::with_capacity(credentials),
        },
        decisions: Vec::with_capacity(stages.iter().map(policy::decision_count).sum()),
        cluster_checked: options.cluster.is_some(),
    };
    let pipeline_label = names::label_value(name);
    for (index, stage) in validated.stages().enumerate() {
        let scope: &Scope<'_> = scopes[role_index(stage.role)]
            .get_or_insert_with(|| Scope::from_applicable(stage.role, &applicable));
        let ctx = StageContext {
            namespace,
            pipeline: name,
            index,
            claims: options.claims,
            cluster: options.cluster,
        };
        let start = plan.decisions.len();
        policy::evaluate_stage_into(ctx, validated, scope, &mut plan.decisions);
        let decisions = &plan.decisions[start..];
        let builder = StageBuilder {
            namespace,
            pipeline: name,
            stage: &stage.name,
            scope,
            vault_name_prefix: options.vault_name_prefix,
            labels: BTreeMap::from([
                (
                    names::MANAGED_BY.0.to_string(),
                    names::MANAGED_BY.1.to_string(),
                ),
                (names::PIPELINE_LABEL.to_string(), pipeline_label.clone()),
                (names::STAGE_LABEL.to_string(), stage.name.clone()),
            ]),
        };
        let sa = names::stage_object(namespace, name, &stage.name);
        builder.objects(&sa, &stage, decisions, &mut plan.objects);
        builder.vault(&sa, decisions, &mut plan.vault);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let granted = count(decisions.iter().filter(|d| d.is_allowed()).count());
        let denied = count(decisions.len()).saturating_sub(granted);
        for (cred, ttl) in stage.credentials() {
            let allowed = decisions.iter().any(|d| {
                d.is_allowed()
                    && matches!(&d.item, Item::Credential { name, .. } if *name == cred.name)
            });
            if allowed {
                plan.vault.credentials.push(CredentialRequest {
                    stage: stage.name.clone(),
                    name: cred.name.clone(),
                    path: cred.path.clone(),
                    ttl,
                    secret_name: cred.secret_name.clone(),
                    // Only the targets decided as the pipeline's own.
                    restart_targets: cred
                        .restart_targets
                        .iter()
                        .filter(|t| {
                            decisions.iter().any(|d| {
                                d.is_allowed()
                                    && matches!(&d.item, Item::RestartTarget { credential, kind, name }
                                        if *credential == cred.name && *kind == t.kind && *name == t.name)
                            })
                        })
                        .map(|t| RestartRef {
                            kind: t.kind,
                            name: t.name.clone(),
                        })
                        .collect(),
                });
            }
        }
        plan.stages.push(StageSummary {
            name: stage.name.clone(),
            role: stage.role,
            service_account: sa,
            granted,
            denied,
            guardrails: scope.guardrail_names(),
        });
    }
    plan
}

fn role_index(role: StageRole) -> usize {
    match role {
        StageRole::Ingestion => 0,
        StageRole::Training => 1,
        StageRole::Deployment => 2,
    }
}

struct StageBuilder<'a> {
    namespace: &'a str,
    pipeline: &'a str,
    stage: &'a str,
    scope: &'a Scope<'a>,
    vault_name_prefix: &'a str,
    /// The labels every object of the stage carries.
    labels: BTreeMap<String, String>,
}

impl StageBuilder<'_> {
    fn metadata(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.namespace.into()),
            labels: Some(self.labels.clone()),
            ..ObjectMeta::default()
        }
    }

    fn objects(
        &self,
        sa: &str,
        stage: &crate::api::Stage,
        decisions: &[Decision],
        out: &mut Vec<Object>,
    ) {
        out.push(Object::ServiceAccount(ServiceAccount {
            metadata: self.metadata(sa),
            automount_service_account_token: Some(
                stage.automount_service_account_token.unwrap_or(false),
            ),
            ..ServiceAccount::default()
        }));
        let rules = role_rules(decisions);
        if !rules.is_empty() {
            out.push(Object::Role(Role {
                metadata: self.metadata(sa),
                rules: Some(rules),
            }));
            out.push(Object::RoleBinding(RoleBinding {
                metadata: self.metadata(sa),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: sa.into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: sa.into(),
                    namespace: Some(self.namespace.into()),
                    ..Subject::default()
                }]),
            }));
        }
        out.push(Object::NetworkPolicy(NetworkPolicy {
            metadata: self.metadata(sa),
            spec: Some(network_spec(
                self.pod_selector(stage),
                decisions,
                &self.scope.credential_endpoints,
            )),
        }));
    }

    /// The stage's pods: the stage's `podSelector` with the operator's pipeline and stage labels
    /// always added (they win over the same keys in the stage's `matchLabels`). Two stages
    /// differ in one of these labels, so no stage's NetworkPolicy can select another stage's
    /// pods, and `podSelector: {}` selects the stage's own pods only.
    fn pod_selector(&self, stage: &crate::api::Stage) -> LabelSelector {
        let mut selector = stage.pod_selector.clone().unwrap_or_default();
        let labels = selector.match_labels.get_or_insert_with(BTreeMap::new);
        for (k, v) in &self.labels {
            if k == names::PIPELINE_LABEL || k == names::STAGE_LABEL {
                labels.insert(k.clone(), v.clone());
            }
        }
        selector
    }

    fn vault(&self, sa: &str, decisions: &[Decision], out: &mut VaultPlan) {
        let mut paths: BTreeMap<&str, BTreeSet<VaultCapability>> = BTreeMap::new();
        let mut token_ttl = None;
        for d in decisions {
            match &d.item {
                Item::VaultPath { path, capability } if d.is_allowed() => {
                    paths.entry(path).or_default().insert(*capability);
                }
                // A token lifetime over the ceiling is denied; tokens then get the ceiling.
                Item::VaultTokenTtl { seconds } => {
                    token_ttl = Some(if d.is_allowed() {
                        *seconds
                    } else {
                        self.scope.max_ttl
                    });
                }
                _ => {}
            }
        }
        if paths.is_empty() {
            return;
        }
        let name = names::vault_object(
            self.vault_name_prefix,
            self.namespace,
            self.pipeline,
            self.stage,
        );
        out.policies.push(VaultPolicy {
            name: name.clone(),
            namespace: self.namespace.into(),
            pipeline: self.pipeline.into(),
            stage: self.stage.into(),
            rules: paths
                .into_iter()
                .map(|(path, capabilities)| AclRule {
                    path: path.into(),
                    capabilities,
                })
                .collect(),
        });
        out.roles.push(VaultRole {
            name: name.clone(),
            stage: self.stage.into(),
            bound_service_account_names: vec![sa.into()],
            bound_service_account_namespaces: vec![self.namespace.into()],
            token_policies: vec![name],
            token_ttl: token_ttl.unwrap_or(self.scope.max_ttl),
            token_max_ttl: self.scope.max_ttl,
        });
    }
}

/// resource -> verbs
type VerbsByResource<'a> = BTreeMap<&'a str, BTreeSet<&'a str>>;

/// The Role's rules from the allowed Kubernetes decisions, merged and sorted: resources of one
/// group with the same names and verbs share a rule.
fn role_rules(decisions: &[Decision]) -> Vec<PolicyRule> {
    let mut by_resource: BTreeMap<(&str, &[String]), VerbsByResource<'_>> = BTreeMap::new();
    for d in decisions.iter().filter(|d| d.is_allowed()) {
        if let Item::Kubernetes {
            api_group,
            resource,
            verb,
            resource_names,
        } = &d.item
        {
            by_resource
                .entry((api_group, resource_names))
                .or_default()
                .entry(resource)
                .or_default()
                .insert(verb);
        }
    }
    let mut rules = Vec::new();
    for ((group, names), resources) in by_resource {
        // verbs -> resources
        let mut by_verbs: BTreeMap<Vec<&str>, Vec<&str>> = BTreeMap::new();
        for (resource, verbs) in resources {
            by_verbs
                .entry(verbs.into_iter().collect())
                .or_default()
                .push(resource);
        }
        for (verbs, resources) in by_verbs {
            rules.push(PolicyRule {
                api_groups: Some(vec![group.to_string()]),
                resources: Some(resources.iter().map(|r| r.to_string()).collect()),
                resource_names: (!names.is_empty()).then(|| names.to_vec()),
                verbs: verbs.iter().map(|v| v.to_string()).collect(),
                non_resource_urls: None,
            });
        }
    }
    rules
}

fn policy_ports(ports: &[NetworkPort]) -> Option<Vec<NetworkPolicyPort>> {
    (!ports.is_empty()).then(|| {
        ports
            .iter()
            .map(|p| NetworkPolicyPort {
                port: Some(IntOrString::Int(p.port.into())),
                protocol: Some(p.protocol.as_str().into()),
                end_port: None,
            })
            .collect()
    })
}

fn namespace_by_name(ns: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            ns.to_string(),
        )])),
        ..LabelSelector::default()
    }
}

/// Default deny in and out, then DNS (when allowed) and the allowed flows.
fn network_spec(
    pod_selector: LabelSelector,
    decisions: &[Decision],
    credential_endpoints: &[ipnet::IpNet],
) -> NetworkPolicySpec {
    let mut egress = Vec::new();
    let mut ingress = Vec::new();
    for d in decisions.iter().filter(|d| d.is_allowed()) {
        match &d.item {
            Item::Dns => egress.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(namespace_by_name("kube-system")),
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "k8s-app".to_string(),
                            "kube-dns".to_string(),
                        )])),
                        ..LabelSelector::default()
                    }),
                    ip_block: None,
                }]),
                ports: policy_ports(&[
                    NetworkPort {
                        port: 53,
                        protocol: crate::api::Protocol::Udp,
                    },
                    NetworkPort {
                        port: 53,
                        protocol: crate::api::Protocol::Tcp,
                    },
                ]),
            }),
            Item::Egress(rule) => {
                let peer = match (&rule.cidr, &rule.namespace, rule.net) {
                    (Some(cidr), _, Some(net)) => {
                        let except = floor::credential_excepts(&net, credential_endpoints);
                        NetworkPolicyPeer {
                            ip_block: Some(IPBlock {
                                cidr: cidr.clone(),
                                except: (!except.is_empty()).then_some(except),
                            }),
                            ..NetworkPolicyPeer::default()
                        }
                    }
                    (None, Some(ns), _) => NetworkPolicyPeer {
                        namespace_selector: Some(namespace_by_name(ns)),
                        pod_selector: rule.pod_selector.clone(),
                        ip_block: None,
                    },
                    _ => continue,
                };
                egress.push(NetworkPolicyEgressRule {
                    to: Some(vec![peer]),
                    ports: policy_ports(&rule.ports),
                });
            }
            Item::Ingress(rule) => {
                let peer = match (&rule.from_cidr, rule.net) {
                    (Some(cidr), Some(net)) => {
                        let except = floor::credential_excepts(&net, credential_endpoints);
                        NetworkPolicyPeer {
                            ip_block: Some(IPBlock {
                                cidr: cidr.clone(),
                                except: (!except.is_empty()).then_some(except),
                            }),
                            ..NetworkPolicyPeer::default()
                        }
                    }
                    _ => NetworkPolicyPeer {
                        namespace_selector: rule.from_namespace_selector.clone(),
                        pod_selector: rule.from_pod_selector.clone(),
                        ip_block: None,
                    },
                };
                ingress.push(NetworkPolicyIngressRule {
                    from: Some(vec![peer]),
                    ports: policy_ports(&rule.ports),
                });
            }
            _ => {}
        }
    }
    NetworkPolicySpec {
        pod_selector: Some(pod_selector),
        policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
        ingress: (!ingress.is_empty()).then_some(ingress),
        egress: (!egress.is_empty()).then_some(egress),
    }
}
