//! `AccessGuardrail`: the cluster-wide ceiling that no pipeline stage may exceed.
#![allow(
    unreachable_pub,
    reason = "re-exported by api; the lint misreads the items kube's KubeSchema derive expands"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
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
    status = "AccessGuardrailStatus",
    doc = "A ceiling on what the AI pipeline stages in the selected namespaces may be granted, per stage role.",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status","description":"Whether the guardrail is valid (an invalid one allows nothing where it applies)"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"integer","jsonPath":".status.namespaces","description":"How many namespaces the selector selects now"}"#,
    printcolumn = r#"{"name":"Pipelines","type":"integer","jsonPath":".status.pipelines","description":"How many pipelines it bounds now"}"#,
    printcolumn = r#"{"name":"Denied","type":"integer","jsonPath":".status.denied","description":"How many requested items it denies now"}"#,
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
    /// `Audit` (the default): a pipeline asking for more than this guardrail allows is accepted,
    /// and what is denied is recorded and reported in its status. `Enforce`: the admission
    /// webhook (when the operator runs it) refuses such a pipeline at `kubectl apply`, quoting
    /// the denials. Either way nothing denied is ever granted.
    #[serde(default)]
    pub enforcement: Enforcement,

    /// Isolate the pods no stage selects: in every selected namespace that has AIPipelines, the
    /// operator keeps a NetworkPolicy `portcullis-default-deny` that selects every pod and
    /// allows no traffic in or out. NetworkPolicies add up, so stage pods keep the flows their
    /// stage was granted; every other pod (a forgotten label, a sidecar deployment) is cut off,
    /// DNS included. Off by default. Turning it off, or the namespace's last pipeline going,
    /// removes the NetworkPolicy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate_unselected_pods: bool,
}

/// What the operator found of a guardrail. Written by the operator only (the one that watches
/// every namespace, with one shard), and only when something changed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessGuardrailStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Valid` (False, reason `InvalidSpec`, when the guardrail is refused: it then allows
    /// nothing where it applies; the message names the field and the fix) and
    /// `SelectsNoNamespace` (True, reason `NoNamespaceMatches`, when the namespace selector
    /// selects no namespace at all: usually a typo in a label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// How many namespaces the selector selects now.
    #[serde(default)]
    pub namespaces: u32,

    /// How many AIPipelines have a stage this guardrail bounds now (a ceiling for the stage's
    /// role, or a refusal of it).
    #[serde(default)]
    pub pipelines: u32,

    /// How many stages this guardrail bounds now.
    #[serde(default)]
    pub stages: u32,

    /// How many requested items this guardrail denies now, over every pipeline.
    #[serde(default)]
    pub denied: u32,

    /// The newest denials this guardrail causes now (at most 10, newest first): a denial leaves
    /// the list when the pipeline stops asking for the item or the guardrail allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub last_denials: Vec<GuardrailDenial>,
}

/// One item a guardrail denies.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GuardrailDenial {
    /// The pipeline's namespace.
    pub namespace: String,
    /// The pipeline.
    pub pipeline: String,
    /// The stage that asked.
    pub stage: String,
    /// The item, as `portcullis plan` prints it (`get secrets/db`, `egress 0.0.0.0/0 TCP/443`).
    pub item: String,
    /// The decision's reason code (`OutsideGuardrail`, `RoleNotAllowed`, `InvalidGuardrail`).
    pub reason: String,
    /// When the operator first saw the denial.
    pub first_seen: Time,
}

/// What happens to a pipeline that asks for more than a guardrail allows.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Enforcement {
    /// Accepted; the denials are recorded and reported.
    #[default]
    Audit,
    /// Refused at admission by the operator's webhook.
    Enforce,
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
