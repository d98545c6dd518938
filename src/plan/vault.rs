//! The Vault side of a plan: per stage, one ACL policy and one Kubernetes-auth role, and the
//! dynamic credentials the operator issues. A policy is a small typed model (its rules, each a
//! path and capabilities); [`VaultPolicy::hcl`] is the one place it becomes HCL.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::api::{VaultCapability, WorkloadKind};

/// Everything the plan asks of Vault, stage by stage in spec order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VaultPlan {
    /// One ACL policy per stage that was allowed some Vault path.
    pub policies: Vec<VaultPolicy>,
    /// One Kubernetes-auth role per such stage, bound to the stage's ServiceAccount.
    pub roles: Vec<VaultRole>,
    /// The allowed dynamic credentials.
    pub credentials: Vec<CredentialRequest>,
}

impl VaultPlan {
    /// The policies, roles and credentials of the stages `keep` names (such as the stages whose
    /// identity was applied).
    pub fn for_stages(&self, keep: impl Fn(&str) -> bool) -> VaultPlan {
        VaultPlan {
            policies: self
                .policies
                .iter()
                .filter(|p| keep(&p.stage))
                .cloned()
                .collect(),
            roles: self
                .roles
                .iter()
                .filter(|r| keep(&r.stage))
                .cloned()
                .collect(),
            credentials: self
                .credentials
                .iter()
                .filter(|c| keep(&c.stage))
                .cloned()
                .collect(),
        }
    }
}

/// A Vault ACL policy: what one stage may do in Vault.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultPolicy {
    /// The policy's name in Vault: the operator's prefix, the readable triple and its hash
    /// ([`super::names::vault_object`]).
    pub name: String,
    pub namespace: String,
    pub pipeline: String,
    pub stage: String,
    /// Sorted by path, one rule per path.
    pub rules: Vec<AclRule>,
}

/// One `path` block of a Vault ACL policy.
#[derive(Debug, Clone, PartialEq)]
pub struct AclRule {
    pub path: String,
    pub capabilities: BTreeSet<VaultCapability>,
}

impl VaultPolicy {
    /// The first line of the policy: who it belongs to. The operator writes it into every
    /// policy it creates, and touches (rewrites, deletes) only policies that start with it, so
    /// a policy someone else created under the same name is never taken over.
    pub fn ownership_header(&self) -> String {
        format!(
            "# Managed by Portcullis: pipeline {}/{}, stage {}. Do not edit; changes are reverted.",
            self.namespace, self.pipeline, self.stage
        )
    }

    /// Whether `existing`, a policy read from Vault under this policy's name, was written by
    /// Portcullis for this same stage (its first line is [`Self::ownership_header`]).
    pub fn owns(&self, existing: &str) -> bool {
        existing.lines().next() == Some(self.ownership_header().as_str())
    }

    /// The policy as HCL, as it is written to Vault and shown by `portcullis plan`.
    pub fn hcl(&self) -> String {
        let mut hcl = self.ownership_header();
        hcl.push('\n');
        for rule in &self.rules {
            hcl.push_str("\npath ");
            hcl_string_into(&rule.path, &mut hcl);
            hcl.push_str(" {\n  capabilities = [");
            for (i, c) in rule.capabilities.iter().enumerate() {
                if i > 0 {
                    hcl.push_str(", ");
                }
                hcl.push('"');
                hcl.push_str(c.as_str());
                hcl.push('"');
            }
            hcl.push_str("]\n}\n");
        }
        hcl
    }
}

/// `s` as an HCL string literal (tests).
#[cfg(test)]
fn hcl_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    hcl_string_into(s, &mut out);
    out
}

/// Appends `s` as an HCL string literal to `out`. Validation already keeps quotes, backslashes
/// and template markers out of Vault paths; escaping them here as well means no path can ever
/// close the string and add rules of its own.
fn hcl_string_into(s: &str, out: &mut String) {
    out.push('"');
    if s.contains(['\\', '"', '{']) {
        let escaped = s
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace("${", "$${")
            .replace("%{", "%%{");
        out.push_str(&escaped);
    } else {
        out.push_str(s);
    }
    out.push('"');
}

/// A role on the workloads' Kubernetes auth mount, with Vault's field names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VaultRole {
    pub name: String,
    pub stage: String,
    pub bound_service_account_names: Vec<String>,
    pub bound_service_account_namespaces: Vec<String>,
    pub token_policies: Vec<String>,
    /// Seconds.
    pub token_ttl: u64,
    /// Seconds.
    pub token_max_ttl: u64,
}

impl VaultRole {
    /// Whether a role read from Vault under this role's name, with `existing_policies` as its
    /// `token_policies`, is Portcullis's own for this stage: it carries exactly this stage's
    /// policy (whose name holds the hash of the stage's triple, and whose text the operator
    /// checks with [`VaultPolicy::owns`]). Anything else was created by someone else and is
    /// left alone.
    pub fn owns(&self, existing_policies: &[String]) -> bool {
        existing_policies == self.token_policies.as_slice()
    }
}

/// Dynamic credentials the operator issues for a stage and delivers as a Secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRequest {
    pub stage: String,
    pub name: String,
    pub path: String,
    /// Seconds; at most [`crate::api::validate::TTL_LIMIT_SECONDS`].
    pub ttl: u64,
    pub secret_name: String,
    pub restart_targets: Vec<RestartRef>,
}

/// A workload restarted when credentials change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartRef {
    pub kind: WorkloadKind,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_strings_cannot_be_closed_from_inside() {
        assert_eq!(hcl_string("kv/data/x/*"), "\"kv/data/x/*\"");
        let hostile = r#"kv/x"{capabilities=["sudo"]}path"sys/*"#;
        let quoted = hcl_string(hostile);
        // Every quote inside is escaped, so the literal ends only at the last character.
        let inner = &quoted[1..quoted.len() - 1];
        assert!(!inner.replace("\\\"", "").contains('"'), "{quoted}");
        assert_eq!(hcl_string("a${b}%{c}\\"), "\"a$${b}%%{c}\\\\\"");
    }

    #[test]
    fn a_policy_renders_one_block_per_rule() {
        let policy = VaultPolicy {
            name: "ml-fraud-train".into(),
            namespace: "ml".into(),
            pipeline: "fraud".into(),
            stage: "train".into(),
            rules: vec![AclRule {
                path: "kv/data/ml/*".into(),
                capabilities: BTreeSet::from([VaultCapability::Read, VaultCapability::List]),
            }],
        };
        let hcl = policy.hcl();
        assert!(
            hcl.starts_with("# Managed by Portcullis: pipeline ml/fraud, stage train."),
            "{hcl}"
        );
        assert!(
            hcl.contains("\npath \"kv/data/ml/*\" {\n  capabilities = ["),
            "{hcl}"
        );
        assert!(hcl.ends_with("]\n}\n"), "{hcl}");
        assert!(policy.owns(&hcl));
        assert!(!policy.owns("path \"kv/*\" { capabilities = [\"read\"] }"));
        let other = VaultPolicy {
            pipeline: "fraud2".into(),
            ..policy.clone()
        };
        assert!(
            !policy.owns(&other.hcl()),
            "another stage's policy is not ours"
        );
    }
}
