//! The built-in rules: what no AccessGuardrail can allow.

use ipnet::IpNet;

use super::{Reason, vault_path};
use crate::api::VaultCapability;

type Refusal = (Reason, String);

/// Verbs that let a holder grant themselves more than they have.
pub const ESCALATION_VERBS: [&str; 5] = ["escalate", "bind", "impersonate", "approve", "sign"];

/// Subresources that run code in, or reach into, other workloads, or mint tokens.
const FORBIDDEN_SUBRESOURCES: [&str; 5] = [
    "pods/exec",
    "pods/attach",
    "pods/portforward",
    "pods/ephemeralcontainers",
    "serviceaccounts/token",
];

/// API groups whose writes change who may do what in the cluster.
const PRIVILEGED_WRITE_GROUPS: [&str; 3] = [
    "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
];

/// Verbs that change objects.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// Cluster-scoped resources of the built-in API groups, as (group, resource).
pub const CLUSTER_SCOPED: [(&str, &str); 24] = [
    ("", "namespaces"),
    ("", "nodes"),
    ("", "persistentvolumes"),
    ("", "componentstatuses"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("apiregistration.k8s.io", "apiservices"),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    ),
    (
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
    ),
    (
        "admissionregistration.k8s.io",
        "validatingadmissionpolicies",
    ),
    (
        "admissionregistration.k8s.io",
        "validatingadmissionpolicybindings",
    ),
    ("storage.k8s.io", "storageclasses"),
    ("storage.k8s.io", "csidrivers"),
    ("storage.k8s.io", "csinodes"),
    ("storage.k8s.io", "volumeattachments"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("node.k8s.io", "runtimeclasses"),
    ("networking.k8s.io", "ingressclasses"),
    ("certificates.k8s.io", "certificatesigningrequests"),
    ("authentication.k8s.io", "tokenreviews"),
    ("authorization.k8s.io", "subjectaccessreviews"),
    ("flowcontrol.apiserver.k8s.io", "flowschemas"),
    (
        "flowcontrol.apiserver.k8s.io",
        "prioritylevelconfigurations",
    ),
];

/// Cloud instance metadata addresses: credentials of the node live behind them.
/// The IPv4 address is also listed in its IPv4-mapped IPv6 form.
const METADATA_ADDRESSES: [&str; 3] = [
    "169.254.169.254/32",
    "fd00:ec2::254/128",
    "::ffff:169.254.169.254/128",
];

/// Vault mounts that administer Vault itself.
const VAULT_SYSTEM_MOUNTS: [&str; 3] = ["sys", "auth", "identity"];

/// The resource without its subresource: `pods/log` -> `pods`.
pub(crate) fn resource_base(resource: &str) -> &str {
    resource.split('/').next().unwrap_or(resource)
}

/// The floor for one verb on one resource.
pub(crate) fn kubernetes(
    group: &str,
    resource: &str,
    verb: &str,
    names: &[String],
) -> Result<(), Refusal> {
    if group == "*"
        || resource.contains('*')
        || verb == "*"
        || names.iter().any(|n| n.contains('*'))
    {
        return Err((
            Reason::WildcardForbidden,
            "'*' grants everything that exists now and everything added later; list the API groups, resources and verbs the stage uses".into(),
        ));
    }
    if ESCALATION_VERBS.contains(&verb) {
        return Err((
            Reason::EscalationVerb,
            format!(
                "{verb} lets a stage grant itself or act as others beyond its own rights; no stage gets it"
            ),
        ));
    }
    if FORBIDDEN_SUBRESOURCES.contains(&resource) || resource.ends_with("/proxy") {
        return Err((
            Reason::ForbiddenSubresource,
            format!(
                "{resource} runs commands in, tunnels into or mints tokens for other workloads; no stage gets it"
            ),
        ));
    }
    let base = resource_base(resource);
    if CLUSTER_SCOPED
        .iter()
        .any(|(g, r)| *g == group && *r == base)
    {
        return Err((
            Reason::ClusterScoped,
            format!(
                "{base} is cluster-scoped; a stage only gets access inside its pipeline's namespace"
            ),
        ));
    }
    if WRITE_VERBS.contains(&verb) && PRIVILEGED_WRITE_GROUPS.contains(&group) {
        return Err((
            Reason::PrivilegedWrite,
            format!("{verb} on {group} {base} changes who may do what; no stage gets it"),
        ));
    }
    Ok(())
}

/// [`METADATA_ADDRESSES`], parsed once.
fn metadata_nets() -> &'static [IpNet; 3] {
    static NETS: std::sync::OnceLock<[IpNet; 3]> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        METADATA_ADDRESSES.map(|m| m.parse().expect("the metadata addresses are valid CIDRs"))
    })
}

/// The floor for one egress address range.
pub(crate) fn egress(net: &IpNet) -> Result<(), Refusal> {
    for meta in metadata_nets() {
        if meta.contains(net) {
            return Err((
                Reason::MetadataEndpoint,
                format!(
                    "{net} is the cloud metadata address, which hands out the node's credentials; no stage may reach it"
                ),
            ));
        }
    }
    Ok(())
}

/// The metadata addresses inside `net`, cut out of it with `except` in the NetworkPolicy.
pub(crate) fn metadata_excepts(net: &IpNet) -> Vec<String> {
    METADATA_ADDRESSES
        .iter()
        .zip(metadata_nets())
        .filter(|(_, m)| net.contains(*m) && net != *m)
        .map(|(text, _)| text.to_string())
        .collect()
}

/// The floor for one capability on one Vault path.
pub(crate) fn vault_path(path: &str, capability: VaultCapability) -> Result<(), Refusal> {
    let Some(mount) = vault_path::mount(path) else {
        return Err((
            Reason::WildcardForbidden,
            format!(
                "{path} has a glob in its mount, which would reach every secrets engine, sys/ and auth/ included; name the mount"
            ),
        ));
    };
    if VAULT_SYSTEM_MOUNTS.contains(&mount) {
        return Err((
            Reason::VaultSystemPath,
            format!("{path} administers Vault itself; workloads never get {mount}/ paths"),
        ));
    }
    if capability == VaultCapability::Sudo {
        return Err((
            Reason::SudoCapability,
            format!("sudo on {path} reaches root-protected Vault endpoints; no stage gets it"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(group: &str, resource: &str, verb: &str, names: &[&str]) -> Result<(), Reason> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        kubernetes(group, resource, verb, &names).map_err(|(r, _)| r)
    }

    #[test]
    fn wildcards_are_denied_everywhere() {
        assert_eq!(k("*", "pods", "get", &[]), Err(Reason::WildcardForbidden));
        assert_eq!(k("", "*", "get", &[]), Err(Reason::WildcardForbidden));
        assert_eq!(k("", "pods/*", "get", &[]), Err(Reason::WildcardForbidden));
        assert_eq!(k("", "pods", "*", &[]), Err(Reason::WildcardForbidden));
        assert_eq!(
            k("", "configmaps", "get", &["*"]),
            Err(Reason::WildcardForbidden)
        );
    }

    #[test]
    fn escalation_verbs_are_denied() {
        for verb in ESCALATION_VERBS {
            assert_eq!(
                k("rbac.authorization.k8s.io", "roles", verb, &[]),
                Err(Reason::EscalationVerb)
            );
        }
        assert_eq!(
            k("", "serviceaccounts", "impersonate", &[]),
            Err(Reason::EscalationVerb)
        );
    }

    #[test]
    fn exec_proxy_and_token_minting_are_denied() {
        for r in [
            "pods/exec",
            "pods/attach",
            "pods/portforward",
            "pods/ephemeralcontainers",
            "services/proxy",
            "serviceaccounts/token",
        ] {
            assert_eq!(
                k("", r, "create", &[]),
                Err(Reason::ForbiddenSubresource),
                "{r}"
            );
        }
        assert_eq!(k("", "pods/log", "get", &[]), Ok(()));
    }

    #[test]
    fn cluster_scoped_resources_are_denied() {
        assert_eq!(k("", "nodes", "get", &[]), Err(Reason::ClusterScoped));
        assert_eq!(k("", "namespaces", "get", &[]), Err(Reason::ClusterScoped));
        assert_eq!(
            k("rbac.authorization.k8s.io", "clusterroles", "list", &[]),
            Err(Reason::ClusterScoped)
        );
        assert_eq!(k("apps", "deployments", "get", &[]), Ok(()));
    }

    #[test]
    fn writes_to_rbac_are_denied_reads_are_not() {
        assert_eq!(
            k("rbac.authorization.k8s.io", "roles", "create", &[]),
            Err(Reason::PrivilegedWrite)
        );
        assert_eq!(
            k("rbac.authorization.k8s.io", "rolebindings", "patch", &[]),
            Err(Reason::PrivilegedWrite)
        );
        assert_eq!(k("rbac.authorization.k8s.io", "roles", "get", &[]), Ok(()));
    }

    #[test]
    fn metadata_address_is_denied_and_cut_out() {
        let meta: IpNet = "169.254.169.254/32".parse().unwrap();
        assert_eq!(
            egress(&meta).map_err(|(r, _)| r),
            Err(Reason::MetadataEndpoint)
        );
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(egress(&all).is_ok());
        assert_eq!(
            metadata_excepts(&all),
            vec!["169.254.169.254/32".to_string()]
        );
        let private: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(metadata_excepts(&private).is_empty());
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert_eq!(metadata_excepts(&v6), vec!["fd00:ec2::254/128".to_string()]);
    }

    #[test]
    fn vault_system_paths_globbed_mounts_and_sudo_are_denied() {
        let v = |p: &str, c| vault_path(p, c).map_err(|(r, _)| r);
        assert_eq!(
            v("sys/policies/acl/x", VaultCapability::Read),
            Err(Reason::VaultSystemPath)
        );
        assert_eq!(
            v("auth/kubernetes/role/x", VaultCapability::Read),
            Err(Reason::VaultSystemPath)
        );
        assert_eq!(
            v("identity/entity", VaultCapability::Read),
            Err(Reason::VaultSystemPath)
        );
        assert_eq!(
            v("+/data/x", VaultCapability::Read),
            Err(Reason::WildcardForbidden)
        );
        assert_eq!(
            v("s*", VaultCapability::Read),
            Err(Reason::WildcardForbidden)
        );
        assert_eq!(
            v("kv/data/x", VaultCapability::Sudo),
            Err(Reason::SudoCapability)
        );
        assert_eq!(v("kv/data/x", VaultCapability::Read), Ok(()));
    }
}
