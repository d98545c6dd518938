//! `AccessGuardrail`: the cluster-wide ceiling that no pipeline stage may exceed.
#![allow(
    unreachable_pub,
    reason = "re-exported by api; the lint misreads the items kube's KubeSchema derive expands"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{StageRole, VaultCapability, patterns};

/// What platform teams allow the AI pipelines in the selected namespaces, per stage role. A
/// stage gets what it asks for only where every guardrail that applies to it allows it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "AccessGuardrail",
    plural = "accessguardrails",
    singular = "accessguardrail",
    shortname = "agr",
    category = "portcullis",
    derive = "PartialEq",
    doc = "A ceiling on what the AI pipeline stages in the selected namespaces may be granted, per stage role.",
    printcolumn = r#"{"name":"DNS","type":"boolean","jsonPath":".spec.dnsEgress","description":"Whether stages may resolve names through kube-dns"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AccessGuardrailSpec {
    /// The namespaces whose pipelines this guardrail applies to. Empty selects every namespace.
    /// Every namespace carries `kubernetes.io/metadata.name: <name>`, so one namespace can be
    /// selected by name.
    #[serde(default)]
    pub namespace_selector: LabelSelector,

    /// Let stages resolve names through kube-dns (UDP and TCP 53 to `k8s-app: kube-dns` in
    /// kube-system). On by default; turn it off for stages that must reach nothing by name.
    #[serde(default = "default_true")]
    pub dns_egress: bool,

    /// The ceiling per stage role. A guardrail that leaves a role out does not apply to that
    /// role's stages.
    #[serde(default)]
    pub roles: RoleCeilings,

    /// The stage roles pipelines in the selected namespaces may use. Empty: every role. A stage
    /// whose role is not listed (by every guardrail that lists roles) gets its identity and
    /// nothing else, so a tenant cannot pick the role with the widest ceiling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub allowed_roles: Vec<StageRole>,

    /// More credential endpoints to cut out of every address range a stage is granted, in CIDR
    /// notation, on top of the built-in list (169.254.0.0/16, fe80::/10, 100.100.100.200,
    /// 168.63.129.16, fd00:ec2::254 and fd00:ec2::23). Use it for a cluster's own token or
    /// metadata services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(max = 43), pattern(patterns::CIDR)))]
    pub credential_endpoints: Vec<String>,

    /// Custom resources that create pods, as `<plural>.<group>` (such as
    /// `workflows.argoproj.io` or `pytorchjobs.kubeflow.org`). Writing them is workload creation,
    /// like writing Deployments or Jobs: denied unless the role's ceiling sets
    /// `allowWorkloadCreation`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(min = 1, max = 253), pattern(patterns::DNS_SUBDOMAIN)))]
    pub pod_creating_resources: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// The ceiling per stage role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoleCeilings {
    /// The ceiling for stages with role Ingestion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingestion: Option<Ceiling>,
    /// The ceiling for stages with role Training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Ceiling>,
    /// The ceiling for stages with role Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Ceiling>,
}

impl RoleCeilings {
    pub fn get(&self, role: StageRole) -> Option<&Ceiling> {
        match role {
            StageRole::Ingestion => self.ingestion.as_ref(),
            StageRole::Training => self.training.as_ref(),
            StageRole::Deployment => self.deployment.as_ref(),
        }
    }
}

/// The most a stage of one role may be granted. Anything not listed is denied.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Ceiling {
    /// Kubernetes API access a stage may be granted in its namespace. The built-in rules still
    /// apply: no wildcards, no escalation verbs, Secrets only by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub kubernetes: Vec<KubernetesCeiling>,

    /// Network flows a stage may be granted.
    #[serde(default)]
    pub network: NetworkCeiling,

    /// Vault access a stage may be granted.
    #[serde(default)]
    pub vault: VaultCeiling,

    /// Let stages of this role create, update and patch pods and workloads (Deployments,
    /// ReplicaSets, StatefulSets, DaemonSets, Jobs, CronJobs, ReplicationControllers and the
    /// guardrail's `podCreatingResources`) when `kubernetes` lists them too. Off by default:
    /// whoever writes a pod template picks its ServiceAccount and Secrets, so it borrows the
    /// identity of any stage in the namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_workload_creation: bool,
}

/// API groups, resources and verbs a stage may be granted. A requested verb on a resource is
/// allowed when one entry lists its group, its resource and the verb.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesCeiling {
    /// API groups; "" is the core group.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(inner(length(max = 253), pattern(patterns::API_GROUP)))]
    pub api_groups: Vec<String>,
    /// Resources by plural name, with subresource where needed (`pods/log`).
    #[schemars(length(min = 1, max = 32))]
    #[schemars(inner(length(min = 1, max = 253), pattern(patterns::RESOURCE)))]
    pub resources: Vec<String>,
    /// Verbs.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(inner(length(min = 1, max = 32), pattern(patterns::VERB)))]
    pub verbs: Vec<String>,
}

/// Network flows a stage may be granted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkCeiling {
    /// Address ranges a stage may connect to; a requested CIDR must lie inside one of them.
    #[serde(default, rename = "egressCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(max = 43), pattern(patterns::CIDR)))]
    pub egress_cidrs: Vec<String>,

    /// Namespaces a stage may connect to, by name. `{namespace}` stands for the pipeline's own
    /// namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(min = 1, max = 63), pattern(patterns::NAMESPACE_PATTERN)))]
    pub egress_namespaces: Vec<String>,

    /// Whether a stage may accept connections at all.
    #[serde(default)]
    pub allow_ingress: bool,

    /// With allowIngress, the address ranges connections may come from: a requested fromCIDR
    /// must lie inside one of them. Empty (and ingressNamespaces empty): any source.
    #[serde(
        default,
        rename = "ingressCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(max = 43), pattern(patterns::CIDR)))]
    pub ingress_cidrs: Vec<String>,

    /// With allowIngress, the namespaces connections may come from, by name (`{namespace}` for
    /// the pipeline's own). A requested source must then name its namespace with
    /// `fromNamespaceSelector: {matchLabels: {kubernetes.io/metadata.name: <name>}}`, or be
    /// `fromPodSelector` alone (the pipeline's namespace). Empty (and ingressCIDRs empty): any
    /// source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(min = 1, max = 63), pattern(patterns::NAMESPACE_PATTERN)))]
    pub ingress_namespaces: Vec<String>,
}

/// Vault access a stage may be granted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VaultCeiling {
    /// Vault paths and capabilities a stage may be granted. Dynamic credentials are read, so
    /// their paths need `read` here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub paths: Vec<VaultPathCeiling>,

    /// The longest lifetime of a stage's Vault tokens and dynamic credentials, such as `1h`.
    /// Defaults to 1h.
    #[serde(default, rename = "maxTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), pattern(patterns::DURATION))]
    pub max_ttl: Option<String>,
}

/// A Vault path pattern with the capabilities allowed under it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaultPathCeiling {
    /// A Vault ACL path that may hold `{namespace}`, `{pipeline}` and `{stage}`, such as
    /// `kv/data/{namespace}/{pipeline}/{stage}/*`. A requested path is allowed when every path it
    /// matches is matched here too.
    #[schemars(length(min = 1, max = 512), pattern(patterns::VAULT_PATH_PATTERN))]
    pub pattern: String,
    /// Capabilities allowed under the pattern.
    #[schemars(length(min = 1, max = 7))]
    pub capabilities: Vec<VaultCapability>,
}
