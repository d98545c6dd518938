//! The decision vocabulary: what was asked for ([`Item`]), the verdict on it ([`Verdict`],
//! [`Reason`]) and the [`Decision`] that holds all three with the message for the user.

use std::fmt;
use std::ops::Deref;

use ipnet::IpNet;
use serde::Serialize;

use crate::api::validate::format_duration;
use crate::api::{EgressRule, IngressRule, NetworkPort, VaultCapability, WorkloadKind};

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "Allow",
            Verdict::Deny => "Deny",
        }
    }
}

/// Why a decision went the way it did. The names are stable: alerts, dashboards and the
/// decision log match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Reason {
    /// Allowed: every applicable AccessGuardrail allows it.
    WithinGuardrail,
    /// Allowed: no AccessGuardrail applies, and the built-in defaults allow it.
    WithinDefaults,
    /// Allowed: name resolution through kube-dns, which every stage gets unless a guardrail
    /// turns it off.
    DnsByDefault,
    /// `*` in an API group, resource, verb, resource name or Vault mount.
    WildcardForbidden,
    /// escalate, bind, impersonate, approve or sign.
    EscalationVerb,
    /// pods/exec, pods/attach, pods/portforward, any `/proxy`, serviceaccounts/token.
    ForbiddenSubresource,
    /// A cluster-scoped resource: a Role in the pipeline's namespace cannot grant it.
    ClusterScoped,
    /// A write to RBAC, admission webhooks, CRDs or namespaces.
    PrivilegedWrite,
    /// Secrets without resourceNames, or a Secret not delivered to this stage.
    SecretNotOwned,
    /// Another stage's credentials.
    CrossStageCredential,
    /// Not allowed by an applicable AccessGuardrail (or by the defaults).
    OutsideGuardrail,
    /// An address range inside a credential endpoint: cloud metadata (169.254.169.254), task-role
    /// and workload-identity services, all of 169.254.0.0/16 and fe80::/10, and any range an
    /// AccessGuardrail adds.
    MetadataEndpoint,
    /// A credential or token lifetime longer than the guardrail's maxTTL.
    TtlTooLong,
    /// The Vault `sudo` capability.
    SudoCapability,
    /// Vault `sys/`, `auth/` or `identity/` paths, at any depth (Vault namespaces).
    VaultSystemPath,
    /// A write to Portcullis's own kinds or to NetworkPolicies: the stage would rewrite its limits.
    SelfAdministration,
    /// create/update/patch on pods or workloads (or a pod-creating custom resource a guardrail
    /// names) without a guardrail that allows workload creation for the role.
    WorkloadCreation,
    /// A write to a ConfigMap or Secret another stage of the pipeline reads, not declared in the
    /// writer's `produces`.
    CrossStageWrite,
    /// A Vault path with `.`, `..` or empty segments, or a percent-encoding.
    PathTraversal,
    /// A credential path another pipeline claimed first (cluster-wide).
    CrossTenantCredential,
    /// The stage's role is not among the roles the namespace's guardrails allow.
    RoleNotAllowed,
    /// An AccessGuardrail that selects the namespace is invalid: it allows nothing until fixed.
    InvalidGuardrail,
    /// A Secret that exists and is not this pipeline's (no owner reference to it): another
    /// pipeline's credentials, a Helm release, anything created outside Portcullis.
    ForeignSecret,
    /// A restart target whose pod template does not run as one of the pipeline's stages.
    ForeignWorkload,
}

impl Reason {
    /// Every reason a denial can carry, in declaration order: the floor and the guardrails.
    pub const DENIALS: [Reason; 21] = [
        Reason::WildcardForbidden,
        Reason::EscalationVerb,
        Reason::ForbiddenSubresource,
        Reason::ClusterScoped,
        Reason::PrivilegedWrite,
        Reason::SecretNotOwned,
        Reason::CrossStageCredential,
        Reason::OutsideGuardrail,
        Reason::MetadataEndpoint,
        Reason::TtlTooLong,
        Reason::SudoCapability,
        Reason::VaultSystemPath,
        Reason::SelfAdministration,
        Reason::WorkloadCreation,
        Reason::CrossStageWrite,
        Reason::PathTraversal,
        Reason::CrossTenantCredential,
        Reason::RoleNotAllowed,
        Reason::InvalidGuardrail,
        Reason::ForeignSecret,
        Reason::ForeignWorkload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WithinGuardrail => "WithinGuardrail",
            Reason::WithinDefaults => "WithinDefaults",
            Reason::DnsByDefault => "DnsByDefault",
            Reason::WildcardForbidden => "WildcardForbidden",
            Reason::EscalationVerb => "EscalationVerb",
            Reason::ForbiddenSubresource => "ForbiddenSubresource",
            Reason::ClusterScoped => "ClusterScoped",
            Reason::PrivilegedWrite => "PrivilegedWrite",
            Reason::SecretNotOwned => "SecretNotOwned",
            Reason::CrossStageCredential => "CrossStageCredential",
            Reason::OutsideGuardrail => "OutsideGuardrail",
            Reason::MetadataEndpoint => "MetadataEndpoint",
            Reason::TtlTooLong => "TtlTooLong",
            Reason::SudoCapability => "SudoCapability",
            Reason::VaultSystemPath => "VaultSystemPath",
            Reason::SelfAdministration => "SelfAdministration",
            Reason::WorkloadCreation => "WorkloadCreation",
            Reason::CrossStageWrite => "CrossStageWrite",
            Reason::PathTraversal => "PathTraversal",
            Reason::CrossTenantCredential => "CrossTenantCredential",
            Reason::RoleNotAllowed => "RoleNotAllowed",
            Reason::InvalidGuardrail => "InvalidGuardrail",
            Reason::ForeignSecret => "ForeignSecret",
            Reason::ForeignWorkload => "ForeignWorkload",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One requested item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// One verb on one resource (for Secrets: on one named Secret).
    Kubernetes {
        api_group: String,
        resource: String,
        verb: String,
        resource_names: Vec<String>,
    },
    /// DNS to kube-dns; not requested, granted by default.
    Dns,
    /// One egress rule.
    Egress(WithCidr<EgressRule>),
    /// One ingress rule.
    Ingress(WithCidr<IngressRule>),
    /// One capability on one Vault path.
    VaultPath {
        path: String,
        capability: VaultCapability,
    },
    /// The lifetime of the stage's Vault tokens.
    VaultTokenTtl { seconds: u64 },
    /// One dynamic credential.
    Credential {
        name: String,
        path: String,
        ttl_seconds: u64,
        secret_name: String,
    },
    /// One workload a credential's rotation restarts.
    RestartTarget {
        credential: String,
        kind: WorkloadKind,
        name: String,
    },
}

/// A network rule and the CIDR it names (`cidr`, `fromCIDR`), as validation parsed it; None
/// when the rule names no CIDR. Reads as the rule itself through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct WithCidr<R> {
    pub rule: R,
    /// The CIDR, parsed. (Not named `cidr`: the field would hide `EgressRule::cidr`, the text.)
    pub net: Option<IpNet>,
}

impl<R> Deref for WithCidr<R> {
    type Target = R;

    fn deref(&self) -> &R {
        &self.rule
    }
}

fn ports_text(ports: &[NetworkPort]) -> String {
    if ports.is_empty() {
        return "all ports".into();
    }
    ports
        .iter()
        .map(|p| format!("{}/{}", p.protocol.as_str(), p.port))
        .collect::<Vec<_>>()
        .join(",")
}

fn selector_text(s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> String {
    match kube::core::Selector::try_from(s.clone()) {
        Ok(sel) if sel.selects_all() => "all".into(),
        Ok(sel) => sel.to_string(),
        Err(_) => "invalid selector".into(),
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Kubernetes {
                api_group,
                resource,
                verb,
                resource_names,
            } => {
                let group = if api_group.is_empty() {
                    String::new()
                } else {
                    format!(".{api_group}")
                };
                write!(f, "{verb} {resource}{group}")?;
                if !resource_names.is_empty() {
                    write!(f, "/{}", resource_names.join(","))?;
                }
                Ok(())
            }
            Item::Dns => write!(f, "egress dns kube-system/kube-dns UDP/53,TCP/53"),
            Item::Egress(rule) => {
                write!(f, "egress ")?;
                match (&rule.cidr, &rule.namespace) {
                    (Some(cidr), _) => write!(f, "{cidr}")?,
                    (None, Some(ns)) => {
                        write!(f, "namespace {ns}")?;
                        if let Some(pods) = &rule.pod_selector {
                            write!(f, " pods {}", selector_text(pods))?;
                        }
                    }
                    (None, None) => write!(f, "nowhere")?,
                }
                write!(f, " {}", ports_text(&rule.ports))
            }
            Item::Ingress(rule) => {
                write!(f, "ingress from ")?;
                if let Some(cidr) = &rule.from_cidr {
                    write!(f, "{cidr}")?;
                }
                if let Some(ns) = &rule.from_namespace_selector {
                    write!(f, "namespaces {}", selector_text(ns))?;
                }
                if let Some(pods) = &rule.from_pod_selector {
                    let sep = if rule.from_namespace_selector.is_some() {
                        " "
                    } else {
                        ""
                    };
                    write!(f, "{sep}pods {}", selector_text(pods))?;
                }
                write!(f, " {}", ports_text(&rule.ports))
            }
            Item::VaultPath { path, capability } => {
                write!(f, "vault {} {path}", capability.as_str())
            }
            Item::VaultTokenTtl { seconds } => {
                write!(f, "vault token ttl {}", format_duration(*seconds))
            }
            Item::Credential {
                name,
                path,
                ttl_seconds,
                ..
            } => {
                write!(
                    f,
                    "credential {name} from {path} ttl {}",
                    format_duration(*ttl_seconds)
                )
            }
            Item::RestartTarget {
                credential,
                kind,
                name,
            } => write!(f, "restart {kind:?} {name} for credential {credential}"),
        }
    }
}

impl Item {
    /// A short word for the kind of item, for tables and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Item::Kubernetes { .. } => "rbac",
            Item::Dns | Item::Egress(_) | Item::Ingress(_) => "network",
            Item::VaultPath { .. } | Item::VaultTokenTtl { .. } => "vault",
            Item::Credential { .. } => "credential",
            Item::RestartTarget { .. } => "restart",
        }
    }
}

/// The verdict on one requested item of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The stage's name.
    pub stage: String,
    /// Where the item was asked for, such as `spec.stages[0].permissions[1]`.
    pub field: String,
    pub item: Item,
    pub verdict: Verdict,
    pub reason: Reason,
    /// What happened and, for a denial, what to do about it.
    pub message: String,
    /// The AccessGuardrail that decided: for an item within the guardrails, the first (by
    /// name) of those that bound the stage; for one outside them, the first that refused it;
    /// for `InvalidGuardrail` and `RoleNotAllowed`, the invalid guardrail or the one whose
    /// `allowedRoles` leaves the role out. None when the built-in floor or defaults decided.
    pub guardrail: Option<String>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's table of denial reasons is the user's reference: every reason is in it.
    #[test]
    fn every_denial_reason_is_documented_and_named_once() {
        let readme = include_str!("../../README.md");
        let mut names: Vec<&str> = Reason::DENIALS.iter().map(|r| r.as_str()).collect();
        for name in &names {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "{name} is missing from the README's table of reasons"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::DENIALS.len());
    }
}
