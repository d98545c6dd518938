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

/// Credential endpoints: link-local and provider addresses that hand out the node's (or the
/// cloud account's) credentials to whoever asks. No stage may reach them, and every wide address
/// range a stage is granted has them cut out with `except`. IPv4 addresses are also listed in
/// their IPv4-mapped IPv6 form. Guardrails add more (`network.credentialEndpoints`).
pub const CREDENTIAL_ENDPOINTS: [&str; 11] = [
    // All of IPv4 link-local: AWS/GCP/Azure/OpenStack metadata 169.254.169.254, ECS task roles
    // 169.254.170.2, EKS Pod Identity 169.254.170.23, Tencent 169.254.0.23.
    "169.254.0.0/16",
    // Alibaba Cloud metadata.
    "100.100.100.200/32",
    // Azure WireServer.
    "168.63.129.16/32",
    // IPv6 link-local.
    "fe80::/10",
    // AWS IMDS over IPv6.
    "fd00:ec2::254/128",
    // EKS Pod Identity over IPv6.
    "fd00:ec2::23/128",
    // The IPv4 ranges above, IPv4-mapped.
    "::ffff:169.254.0.0/112",
    "::ffff:100.100.100.200/128",
    "::ffff:168.63.129.16/128",
    // IPv4-compatible (deprecated, still routed by some stacks) form of link-local.
    "::169.254.0.0/112",
    // NAT64 well-known prefix form of link-local.
    "64:ff9b::a9fe:0/112",
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
    if WRITE_VERBS.contains(&verb) && is_self_administration(group, resource) {
        return Err((
            Reason::SelfAdministration,
            format!(
                "{verb} on {base} ({}) would let the stage rewrite the limits Portcullis sets on it or on other stages; no stage gets it",
                if group.is_empty() { "core" } else { group }
            ),
        ));
    }
    Ok(())
}

/// [`CREDENTIAL_ENDPOINTS`], parsed once.
pub(crate) fn credential_endpoints() -> &'static [IpNet] {
    static NETS: std::sync::OnceLock<Vec<IpNet>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        CREDENTIAL_ENDPOINTS
            .iter()
            .map(|m| m.parse().expect("the credential endpoints are valid CIDRs"))
            .collect()
    })
}

/// The floor for one address range (egress destination or ingress source): refused when it lies
/// inside a credential endpoint, built in or added by a guardrail (`extra`).
pub(crate) fn egress(net: &IpNet, extra: &[IpNet]) -> Result<(), Refusal> {
    for endpoint in credential_endpoints().iter().chain(extra) {
        if endpoint.contains(net) {
            return Err((
                Reason::MetadataEndpoint,
                format!(
                    "{net} lies in {endpoint}, a credential endpoint (cloud metadata, task-role or workload-identity service) that hands out the node's or the account's credentials; no stage may reach it"
                ),
            ));
        }
    }
    Ok(())
}

/// The credential endpoints inside `net` (built in and `extra`), cut out of it with `except` in
/// the NetworkPolicy. Only ranges strictly inside `net` of the same address family: Kubernetes
/// requires that of `except`. Ranges that contain another listed range are listed once.
pub(crate) fn credential_excepts(net: &IpNet, extra: &[IpNet]) -> Vec<String> {
    let inside: Vec<IpNet> = credential_endpoints()
        .iter()
        .chain(extra)
        .filter(|e| net.contains(*e) && net != *e)
        .copied()
        .collect();
    let mut out: Vec<IpNet> = inside
        .iter()
        .filter(|e| !inside.iter().any(|o| o != *e && o.contains(*e)))
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out.iter().map(ToString::to_string).collect()
}

/// Whether a Vault path (policy path or credential path) holds a segment that is `.`, `..` or
/// empty, or a percent-encoding: Vault cleans such paths before it matches policies, so the
/// path Portcullis checked would not be the path Vault grants.
fn path_trick(path: &str) -> Option<&'static str> {
    let body = path.strip_suffix('*').unwrap_or(path);
    if path.contains('%') {
        return Some("a percent-encoding");
    }
    if path.starts_with('/') {
        return Some("a leading '/'");
    }
    let segments: Vec<&str> = body.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." | ".." => return Some("a '.' or '..' segment"),
            // `kv/data/x/` and `kv/data/x/*` end in an empty segment; only inner ones are tricks.
            "" if !last => return Some("an empty segment ('//')"),
            _ => {}
        }
    }
    None
}

/// Workload kinds whose create/update/patch lets the writer pick a pod's ServiceAccount,
/// Secrets and labels: (group, resource).
pub const WORKLOAD_RESOURCES: [(&str, &str); 8] = [
    ("", "pods"),
    ("", "replicationcontrollers"),
    ("apps", "deployments"),
    ("apps", "replicasets"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
];

/// Verbs that create or change a workload's pod template.
pub const WORKLOAD_VERBS: [&str; 3] = ["create", "update", "patch"];

/// Whether `verb` on `group`/`resource` creates or changes pods: a built-in workload kind, or one
/// of the pod-creating custom resources a guardrail names (`resource.group`, such as
/// `workflows.argoproj.io`). Subresources (`deployments/scale`, `pods/status`) do not change
/// a pod template.
pub(crate) fn is_workload_write(
    group: &str,
    resource: &str,
    verb: &str,
    pod_creating: &[String],
) -> bool {
    if !WORKLOAD_VERBS.contains(&verb) || resource.contains('/') {
        return false;
    }
    WORKLOAD_RESOURCES
        .iter()
        .any(|(g, r)| *g == group && *r == resource)
        || pod_creating.iter().any(|named| {
            named
                .split_once('.')
                .is_some_and(|(r, g)| r == resource && g == group)
                || (group.is_empty() && named == resource)
        })
}

/// API groups and resources that set a stage's own limits: Portcullis's kinds, and
/// NetworkPolicies. Writing them lets a stage rewrite what confines it.
/// NetworkPolicies by resource name, in any group (`networking.k8s.io` today, `extensions` on
/// old clusters, and any aggregated API that serves the same name).
fn is_self_administration(group: &str, resource: &str) -> bool {
    group == "portcullis.dev" || resource_base(resource) == "networkpolicies"
}

/// The floor for one capability on one Vault path.
pub(crate) fn vault_path(path: &str, capability: VaultCapability) -> Result<(), Refusal> {
    if let Some(trick) = path_trick(path) {
        return Err((
            Reason::PathTraversal,
            format!(
                "{path} holds {trick}; Vault normalises such paths, so the path checked here would not be the path granted. Write the path plainly"
            ),
        ));
    }
    // On Vault Enterprise (and OpenBao) namespaces, `<ns>/sys/...` administers namespace `<ns>`:
    // the system mounts are refused at any depth, not only as the first segment.
    let body = path.strip_suffix('*').unwrap_or(path);
    if let Some(system) = body
        .split('/')
        .skip(1)
        .find(|seg| VAULT_SYSTEM_MOUNTS.contains(seg))
    {
        return Err((
            Reason::VaultSystemPath,
            format!(
                "{path} has a {system}/ segment: under a Vault namespace that administers Vault itself. Workloads never get {system}/ paths at any depth; rename the secret if it only looks like one"
            ),
        ));
    }
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
    fn credential_endpoints_are_denied_and_cut_out() {
        for endpoint in [
            "169.254.169.254/32",
            "169.254.170.2/32",
            "169.254.170.23/32",
            "169.254.0.23/32",
            "100.100.100.200/32",
            "168.63.129.16/32",
            "fd00:ec2::23/128",
            "fe80::1/128",
        ] {
            let net: IpNet = endpoint.parse().unwrap();
            assert_eq!(
                egress(&net, &[]).map_err(|(r, _)| r),
                Err(Reason::MetadataEndpoint),
                "{endpoint}"
            );
        }
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(egress(&all, &[]).is_ok());
        assert_eq!(
            credential_excepts(&all, &[]),
            ["100.100.100.200/32", "168.63.129.16/32", "169.254.0.0/16"]
        );
        let private: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(credential_excepts(&private, &[]).is_empty());
        let extra: IpNet = "10.1.2.3/32".parse().unwrap();
        assert_eq!(credential_excepts(&private, &[extra]), ["10.1.2.3/32"]);
        assert!(egress(&extra, &[extra]).is_err());
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert_eq!(
            credential_excepts(&v6, &[]),
            ["fd00:ec2::23/128", "fd00:ec2::254/128"]
        );
        let v6all: IpNet = "::/0".parse().unwrap();
        let cut = credential_excepts(&v6all, &[]);
        assert!(cut.contains(&"fe80::/10".to_string()), "{cut:?}");
        assert!(
            cut.contains(&"::ffff:169.254.0.0/112".to_string()),
            "{cut:?}"
        );
    }

    #[test]
    fn vault_path_tricks_are_refused() {
        let v = |p: &str| vault_path(p, VaultCapability::Read).map_err(|(r, _)| r);
        for trick in [
            "kv/data/ml/../../sys/policies/acl/x",
            "kv/data/ml/./x",
            "kv/data//x",
            "kv/data/ml/%2e%2e/x",
            "kv/data/ml/..",
        ] {
            assert_eq!(v(trick), Err(Reason::PathTraversal), "{trick}");
        }
        for system in [
            "team/sys/policies/acl/x",
            "a/b/auth/token/create",
            "ns/identity/*",
        ] {
            assert_eq!(v(system), Err(Reason::VaultSystemPath), "{system}");
        }
        assert_eq!(v("kv/data/ml/"), Ok(()));
        assert_eq!(v("kv/data/ml/*"), Ok(()));
        assert_eq!(v("kv/data/ml.v2/x"), Ok(()));
    }

    #[test]
    fn workload_writes_and_self_administration_are_recognised() {
        assert!(is_workload_write("apps", "deployments", "patch", &[]));
        assert!(is_workload_write("", "pods", "create", &[]));
        assert!(!is_workload_write(
            "apps",
            "deployments/scale",
            "patch",
            &[]
        ));
        assert!(!is_workload_write("apps", "deployments", "get", &[]));
        let argo = vec!["workflows.argoproj.io".to_string()];
        assert!(is_workload_write(
            "argoproj.io",
            "workflows",
            "create",
            &argo
        ));
        assert!(!is_workload_write(
            "argoproj.io",
            "workflows",
            "create",
            &[]
        ));
        assert_eq!(
            k("portcullis.dev", "aipipelines", "patch", &[]),
            Err(Reason::SelfAdministration)
        );
        assert_eq!(
            k("networking.k8s.io", "networkpolicies", "update", &[]),
            Err(Reason::SelfAdministration)
        );
        assert_eq!(
            k("networking.k8s.io", "networkpolicies", "get", &[]),
            Ok(())
        );
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
