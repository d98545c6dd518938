//! `AIPipeline`: one object per pipeline, in the namespace its workloads run in.
#![allow(
    unreachable_pub,
    reason = "re-exported by api; the lint misreads the items kube's KubeSchema derive expands"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::patterns;

/// What an AI pipeline's stages need: for each stage its Kubernetes permissions, its network flows
/// and its Vault access. Portcullis grants each stage what it asks for and the AccessGuardrails
/// allow, and nothing else.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "AIPipeline",
    plural = "aipipelines",
    singular = "aipipeline",
    shortname = "aip",
    category = "portcullis",
    namespaced,
    status = "AIPipelineStatus",
    derive = "PartialEq",
    doc = "An AI pipeline whose stages Portcullis gives least-privilege identities, RBAC, network policy and Vault access.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether every stage's objects are in place"}"#,
    printcolumn = r#"{"name":"Stages","type":"string","jsonPath":".spec.stages[*].name","description":"The pipeline's stages"}"#,
    printcolumn = r#"{"name":"Denied","type":"integer","jsonPath":".status.denied","description":"How many requested items the guardrails denied"}"#,
    printcolumn = r#"{"name":"Uncovered","type":"integer","jsonPath":".status.uncoveredPods.count","description":"Pods of the pipeline that no stage's pod selector matches"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AIPipelineSpec {
    /// The pipeline's stages. Each stage gets its own ServiceAccount, Role, RoleBinding,
    /// NetworkPolicy and Vault identity. Stage names are unique within the pipeline.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(s, !has(s.vault) || !has(s.vault.credentials) || s.vault.credentials.all(c, self.all(t, t.name == s.name || !has(t.vault) || !has(t.vault.credentials) || t.vault.credentials.all(d, d.secretName != c.secretName))))"
    ).message("two stages deliver credentials to the same secretName; give each stage's credentials their own Secret"))]
    pub stages: Vec<Stage>,
}

/// One stage of the pipeline and what it asks for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    /// The stage's name, unique in the pipeline: a DNS-1123 label (lower-case letters, digits and
    /// '-'). It is part of every object name made for the stage.
    #[schemars(length(min = 1, max = 40), pattern(patterns::DNS_LABEL))]
    pub name: String,

    /// What the stage does. The AccessGuardrails set a ceiling per role.
    pub role: StageRole,

    /// Narrows the stage's pods. The NetworkPolicy selects pods that match it and always also
    /// carry `portcullis.dev/pipeline: <pipeline>` and `portcullis.dev/stage: <stage>` (the
    /// operator adds them to the selector), so a stage's policy never applies to another
    /// stage's pods: label the stage's workloads with both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Mount the ServiceAccount's API token into the stage's pods. Off unless the stage talks to
    /// the Kubernetes API (it needs `permissions` then) or logs in to Vault with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,

    /// Kubernetes API access, always in the pipeline's own namespace. Each verb on each resource
    /// is decided on its own; what is allowed becomes the stage's Role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub permissions: Vec<PermissionRule>,

    /// Network flows the stage needs beyond DNS. Everything else is denied by the stage's
    /// NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<StageNetwork>,

    /// Vault access for the stage's identity, and dynamic credentials Portcullis delivers to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<StageVault>,

    /// ConfigMaps and Secrets this stage writes for later stages to read, as
    /// `configmaps/<name>` or `secrets/<name>`. A write to an object another stage of the
    /// pipeline reads is denied unless the writer declares it here: the flow of data between
    /// stages is then written down, and no stage can poison another's inputs by surprise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(inner(length(min = 1, max = 270)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub produces: Vec<String>,
}

/// What a stage does in the pipeline. Guardrails give each role its own ceiling.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
pub enum StageRole {
    /// Reads raw data and writes features or documents.
    Ingestion,
    /// Trains or fine-tunes a model from prepared data.
    Training,
    /// Serves a model to its callers.
    Deployment,
}

impl StageRole {
    pub const ALL: [StageRole; 3] = [
        StageRole::Ingestion,
        StageRole::Training,
        StageRole::Deployment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageRole::Ingestion => "Ingestion",
            StageRole::Training => "Training",
            StageRole::Deployment => "Deployment",
        }
    }

    /// The field of `AccessGuardrail.spec.roles` that holds this role's ceiling.
    pub fn guardrail_field(self) -> &'static str {
        match self {
            StageRole::Ingestion => "ingestion",
            StageRole::Training => "training",
            StageRole::Deployment => "deployment",
        }
    }
}

/// Kubernetes API access in the pipeline's namespace, written like a Role rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PermissionRule {
    /// API groups of the resources; "" is the core group.
    #[schemars(length(min = 1, max = 8))]
    #[schemars(inner(length(max = 253), pattern(patterns::API_GROUP)))]
    pub api_groups: Vec<String>,

    /// Resources by plural name, optionally with a subresource (`pods/log`).
    #[schemars(length(min = 1, max = 16))]
    #[schemars(inner(length(min = 1, max = 253), pattern(patterns::RESOURCE)))]
    pub resources: Vec<String>,

    /// Restricts the rule to objects with these names. Required for `secrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub resource_names: Vec<String>,

    /// Verbs such as get, list, watch, create, update, patch, delete.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(inner(length(min = 1, max = 32), pattern(patterns::VERB)))]
    pub verbs: Vec<String>,
}

/// The stage's network flows. Traffic not listed here is denied.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StageNetwork {
    /// Connections the stage's pods may open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub egress: Vec<EgressRule>,

    /// Connections the stage's pods accept. Empty: nothing may connect to the stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub ingress: Vec<IngressRule>,
}

/// One outbound flow: to an address range, or to pods in a namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.cidr) != has(self.__namespace__)").message("set exactly one of cidr or namespace"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.podSelector) || has(self.__namespace__)").message("podSelector narrows a namespace destination; set namespace too, or remove podSelector"))]
pub struct EgressRule {
    /// Destination address range in CIDR notation, such as 10.20.0.0/16. Credential endpoints
    /// (all of 169.254.0.0/16 and fe80::/10, the clouds' metadata and identity addresses, and
    /// those the guardrails add) are always cut out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 43), pattern(patterns::CIDR))]
    pub cidr: Option<String>,

    /// Destination namespace by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(patterns::DNS_LABEL))]
    pub namespace: Option<String>,

    /// Narrows a namespace destination to these pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Destination ports. Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub ports: Vec<NetworkPort>,
}

/// One inbound flow: from an address range, or from pods selected by namespace and pod labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.fromCIDR) ? !has(self.fromNamespaceSelector) && !has(self.fromPodSelector) : (has(self.fromNamespaceSelector) || has(self.fromPodSelector))"
).message("set fromCIDR, or fromNamespaceSelector and/or fromPodSelector"))]
pub struct IngressRule {
    /// Source address range in CIDR notation.
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 43), pattern(patterns::CIDR))]
    pub from_cidr: Option<String>,

    /// Source namespaces by label, such as `kubernetes.io/metadata.name: ingress-nginx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_namespace_selector: Option<LabelSelector>,

    /// Source pods by label; in the pipeline's namespace unless fromNamespaceSelector is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_pod_selector: Option<LabelSelector>,

    /// Ports on the stage's pods. Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub ports: Vec<NetworkPort>,
}

/// A port and its protocol.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPort {
    /// Port number, 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// TCP (the default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A transport protocol.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// Vault access for the stage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StageVault {
    /// Paths the stage's identity may use, with their capabilities. They become the stage's
    /// Vault ACL policy; the stage logs in with its ServiceAccount through Kubernetes auth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub policies: Vec<VaultPathRule>,

    /// Lifetime of the Vault tokens the stage gets at login, such as `20m`. Defaults to 20m,
    /// or to the guardrail's maxTTL when that is shorter.
    #[serde(default, rename = "tokenTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), pattern(patterns::DURATION))]
    pub token_ttl: Option<String>,

    /// Dynamic credentials (database users, cloud keys) that Portcullis reads from Vault and
    /// delivers to the stage as a Secret, renewing or re-issuing them before they expire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, self.exists_one(d, d.secretName == c.secretName))")
        .message("each credential needs its own secretName"))]
    pub credentials: Vec<VaultCredential>,
}

/// A Vault path with capabilities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaultPathRule {
    /// A Vault ACL path such as `kv/data/ml-fraud/ingest/*`. `+` matches one path segment and a
    /// trailing `*` matches any suffix, as in Vault policies.
    #[schemars(length(min = 1, max = 512), pattern(patterns::VAULT_POLICY_PATH))]
    pub path: String,

    /// Vault capabilities on the path.
    #[schemars(length(min = 1, max = 7))]
    pub capabilities: Vec<VaultCapability>,
}

/// A Vault ACL capability.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum VaultCapability {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
    Sudo,
}

impl VaultCapability {
    pub fn as_str(self) -> &'static str {
        match self {
            VaultCapability::Create => "create",
            VaultCapability::Read => "read",
            VaultCapability::Update => "update",
            VaultCapability::Patch => "patch",
            VaultCapability::Delete => "delete",
            VaultCapability::List => "list",
            VaultCapability::Sudo => "sudo",
        }
    }
}

/// Dynamic credentials delivered to the stage as a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaultCredential {
    /// Name of the credential within the stage.
    #[schemars(length(min = 1, max = 63), pattern(patterns::DNS_LABEL))]
    pub name: String,

    /// The Vault path that issues the credentials, such as `database/creds/fraud-raw-writer`.
    #[schemars(length(min = 1, max = 512), pattern(patterns::VAULT_SECRET_PATH))]
    pub path: String,

    /// The lease lifetime to ask for, such as `15m`. The guardrail's maxTTL is the ceiling.
    #[schemars(length(max = 16), pattern(patterns::DURATION))]
    pub ttl: String,

    /// The Secret in the pipeline's namespace that receives the credentials.
    #[schemars(length(min = 1, max = 253), pattern(patterns::DNS_SUBDOMAIN))]
    pub secret_name: String,

    /// Workloads restarted (through a pod-template annotation) when the credentials change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub restart_targets: Vec<RestartTarget>,
}

/// A workload in the pipeline's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct RestartTarget {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: WorkloadKind,
    /// The workload's name.
    #[schemars(length(min = 1, max = 253), pattern(patterns::DNS_SUBDOMAIN))]
    pub name: String,
}

/// A kind of workload that can be restarted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// What Portcullis last did for the pipeline. Written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AIPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, GuardrailsSatisfied, CredentialsReady and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// How many requested items were denied, over all stages.
    #[serde(default)]
    pub denied: u32,

    /// SHA-256 prefix of the decisions last written to the decision log. The operator records
    /// a pipeline's decisions again only when they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_decisions: Option<String>,

    /// Per stage: its identity and what it was granted and denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub stages: Vec<StageStatus>,

    /// Pods of this pipeline that no stage covers: pods in the pipeline's namespace labelled
    /// `portcullis.dev/pipeline: <this pipeline>` whose labels match no stage's NetworkPolicy
    /// podSelector (the stage's `podSelector` plus `portcullis.dev/pipeline` and
    /// `portcullis.dev/stage`). Such a pod runs outside every stage's network policy: usually a
    /// forgotten `portcullis.dev/stage` or podSelector label. Absent when there is none.
    /// Written by the operator's coverage check (field manager `portcullis-coverage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncovered_pods: Option<UncoveredPods>,
}

/// The pods of a pipeline that match no stage's pod selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UncoveredPods {
    /// How many there are.
    pub count: u32,
    /// The names of the first ten, in alphabetical order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub names: Vec<String>,
}

/// What one stage was given.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// The stage's name.
    pub name: String,
    /// The ServiceAccount the stage's pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// How many requested items were granted.
    #[serde(default)]
    pub granted: u32,
    /// How many requested items were denied.
    #[serde(default)]
    pub denied: u32,
    /// Each denied item and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_items: Vec<DeniedItem>,
    /// The stage's delivered credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialStatus>,
    /// Per grant (at most 64), whether the stage's identity used it at runtime, as seen in the
    /// API server's and Vault's audit events. Written only when runtime access records are on
    /// (`--audit-webhook-addr`, `--vault-audit-addr`); `kubectl portcullis usage --suggest`
    /// narrows the spec to what was used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub usage: Vec<GrantUsage>,
    /// When Portcullis first saw a request of the stage's identity (RFC 3339): `usage` counts
    /// from here, and a grant first used more than `--access-learning-window` after it is a
    /// NewBehaviour anomaly. Kept across operator restarts, like `usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_since: Option<String>,
}

/// How a stage used one of its grants.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GrantUsage {
    /// The grant as the decision log names it, such as `get configmaps/ingest-config` or
    /// `vault read kv/data/ml/*`.
    pub grant: String,
    /// Whether any request it covers was seen.
    pub used: bool,
    /// How many requests it covered.
    #[serde(default)]
    pub count: u64,
    /// When it was last used (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
}

/// A requested item that was not granted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeniedItem {
    /// The item, such as `get secrets` or `egress 169.254.169.254/32`.
    pub item: String,
    /// A stable reason code such as WildcardForbidden or OutsideGuardrail.
    pub reason: String,
    /// What was wrong and what to do about it.
    pub message: String,
}

/// A credential: delivered, or failing (`problem`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// The credential's name in the stage.
    pub name: String,
    /// The Secret holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When the current lease expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<String>,
    /// When the credentials were last issued (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<String>,
    /// A SHA-256 prefix of the lease id, to match against the decision log without showing the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_hash: Option<String>,
    /// Why this credential's last Vault call (issue, renewal, revocation) failed, while it
    /// fails; the pipeline's other credentials are renewed and issued regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}
