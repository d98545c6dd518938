//! Which RoleBindings and ClusterRoleBindings reach a stage's ServiceAccount besides the one
//! Portcullis plans, and what they add (pure).
//!
//! A binding reaches the ServiceAccount `ns/sa` when a subject is the ServiceAccount, the user
//! `system:serviceaccount:ns:sa`, or one of its groups `system:serviceaccounts`,
//! `system:serviceaccounts:ns` and `system:authenticated`. Known, and so not foreign: the
//! stage's own RoleBinding exactly as planned (named as the ServiceAccount, in its namespace,
//! binding the Role of that name to that ServiceAccount only), and the API server's bootstrap
//! defaults (label `kubernetes.io/bootstrapping=rbac-defaults` and a name starting `system:`,
//! such as `system:basic-user` and `system:discovery` for `system:authenticated`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const BOOTSTRAP: (&str, &str) = ("kubernetes.io/bootstrapping", "rbac-defaults");

/// One binding reaching one stage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ForeignGrant {
    /// `ClusterRoleBinding NAME` or `RoleBinding NS/NAME`.
    pub binding: String,
    /// How it reaches the stage: `ServiceAccount ns/sa`, `Group system:authenticated`, ...
    pub via: String,
    /// `ClusterRole NAME` or `Role NS/NAME`.
    pub role: String,
    /// The rules it adds, as `verbs on resources`, in the binding's namespace or cluster-wide.
    pub rules: Vec<String>,
}

/// The RBAC objects, as the watchdog's caches hold them.
#[derive(Debug, Default)]
pub(crate) struct Rbac<'a> {
    pub role_bindings: Vec<&'a RoleBinding>,
    pub cluster_role_bindings: Vec<&'a ClusterRoleBinding>,
    pub roles: Vec<&'a Role>,
    pub cluster_roles: Vec<&'a ClusterRole>,
}

/// A binding as indexed: its description, its namespace (none for a ClusterRoleBinding), and
/// the role it refers to.
type Bound<'a> = (String, Option<String>, &'a RoleRef);

/// Bindings indexed by subject, built once per round.
pub(crate) struct Index<'a> {
    rbac: &'a Rbac<'a>,
    /// Key: `sa:ns/name`, `user:name` or `group:name` -> (binding, its namespace, role ref).
    by_subject: HashMap<String, Vec<Bound<'a>>>,
}

fn bootstrap(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(BOOTSTRAP.0))
        .is_some_and(|v| v == BOOTSTRAP.1)
        && meta
            .name
            .as_deref()
            .unwrap_or_default()
            .starts_with("system:")
}

fn subject_key(subject: &Subject, binding_namespace: Option<&str>) -> Option<String> {
    match subject.kind.as_str() {
        "ServiceAccount" => {
            let ns = subject.namespace.as_deref().or(binding_namespace)?;
            Some(format!("sa:{ns}/{}", subject.name))
        }
        "User" => Some(format!("user:{}", subject.name)),
        "Group" => Some(format!("group:{}", subject.name)),
        _ => None,
    }
}

impl<'a> Index<'a> {
    pub(crate) fn new(rbac: &'a Rbac<'a>) -> Index<'a> {
        let mut by_subject: HashMap<String, Vec<Bound<'a>>> = HashMap::new();
        for b in &rbac.role_bindings {
            if bootstrap(&b.metadata) {
                continue;
            }
            let ns = b.metadata.namespace.clone();
            let name = format!(
                "RoleBinding {}/{}",
                ns.as_deref().unwrap_or_default(),
                b.metadata.name.as_deref().unwrap_or_default()
            );
            for s in b.subjects.iter().flatten() {
                if let Some(key) = subject_key(s, ns.as_deref()) {
                    by_subject.entry(key).or_default().push((
                        name.clone(),
                        ns.clone(),
                        &b.role_ref,
                    ));
                }
            }
        }
        for b in &rbac.cluster_role_bindings {
            if bootstrap(&b.metadata) {
                continue;
            }
            let name = format!(
                "ClusterRoleBinding {}",
                b.metadata.name.as_deref().unwrap_or_default()
            );
            for s in b.subjects.iter().flatten() {
                if let Some(key) = subject_key(s, None) {
                    by_subject
                        .entry(key)
                        .or_default()
                        .push((name.clone(), None, &b.role_ref));
                }
            }
        }
        Index { rbac, by_subject }
    }

    /// The foreign grants reaching the ServiceAccount `namespace/sa`.
    pub(crate) fn grants(&self, namespace: &str, sa: &str) -> Vec<ForeignGrant> {
        let own = format!("RoleBinding {namespace}/{sa}");
        let keys = [
            (
                format!("sa:{namespace}/{sa}"),
                format!("ServiceAccount {namespace}/{sa}"),
            ),
            (
                format!("user:system:serviceaccount:{namespace}:{sa}"),
                format!("User system:serviceaccount:{namespace}:{sa}"),
            ),
            (
                "group:system:serviceaccounts".into(),
                "Group system:serviceaccounts".into(),
            ),
            (
                format!("group:system:serviceaccounts:{namespace}"),
                format!("Group system:serviceaccounts:{namespace}"),
            ),
            (
                "group:system:authenticated".into(),
                "Group system:authenticated".into(),
            ),
        ];
        let mut out = BTreeSet::new();
        for (key, via) in keys {
            for (binding, binding_ns, role_ref) in self.by_subject.get(&key).into_iter().flatten() {
                if *binding == own && self.is_planned(namespace, sa) {
                    continue;
                }
                let (role, rules) = self.rules(role_ref, binding_ns.as_deref());
                out.insert(ForeignGrant {
                    binding: binding.clone(),
                    via: via.clone(),
                    role,
                    rules: rules_text(&rules),
                });
            }
        }
        out.into_iter().collect()
    }

    /// Whether the stage's own RoleBinding is exactly what Portcullis plans: the Role of the
    /// ServiceAccount's name, bound to that ServiceAccount alone.
    fn is_planned(&self, namespace: &str, sa: &str) -> bool {
        self.rbac.role_bindings.iter().any(|b| {
            b.metadata.namespace.as_deref() == Some(namespace)
                && b.metadata.name.as_deref() == Some(sa)
                && b.role_ref.kind == "Role"
                && b.role_ref.name == sa
                && b.subjects.as_deref().is_some_and(|s| {
                    s.len() == 1
                        && s[0].kind == "ServiceAccount"
                        && s[0].name == sa
                        && s[0].namespace.as_deref().is_none_or(|n| n == namespace)
                })
        })
    }

    /// The role a binding refers to and its rules (an aggregated ClusterRole's from the
    /// ClusterRoles its selectors pick, as the aggregation controller would fill them).
    fn rules(&self, role_ref: &RoleRef, namespace: Option<&str>) -> (String, Vec<PolicyRule>) {
        if role_ref.kind == "Role" {
            let ns = namespace.unwrap_or_default();
            let rules = self
                .rbac
                .roles
                .iter()
                .find(|r| {
                    r.metadata.namespace.as_deref() == Some(ns)
                        && r.metadata.name.as_deref() == Some(&role_ref.name)
                })
                .and_then(|r| r.rules.clone())
                .unwrap_or_default();
            return (format!("Role {ns}/{}", role_ref.name), rules);
        }
        let mut rules = Vec::new();
        if let Some(role) = self.cluster_role(&role_ref.name) {
            rules.extend(role.rules.clone().unwrap_or_default());
            for selector in role
                .aggregation_rule
                .iter()
                .flat_map(|a| a.cluster_role_selectors.iter().flatten())
            {
                for other in &self.rbac.cluster_roles {
                    let labels: BTreeMap<String, String> =
                        other.metadata.labels.clone().unwrap_or_default();
                    if other.metadata.name != role.metadata.name
                        && crate::policy::selects(selector, &labels)
                    {
                        rules.extend(other.rules.clone().unwrap_or_default());
                    }
                }
            }
        }
        (format!("ClusterRole {}", role_ref.name), rules)
    }

    fn cluster_role(&self, name: &str) -> Option<&ClusterRole> {
        self.rbac
            .cluster_roles
            .iter()
            .copied()
            .find(|r| r.metadata.name.as_deref() == Some(name))
    }
}

/// Rules as `verbs on resources` lines, deduplicated and sorted.
fn rules_text(rules: &[PolicyRule]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for r in rules {
        let verbs = r.verbs.join(",");
        if let Some(urls) = &r.non_resource_urls {
            out.insert(format!("{verbs} on {}", urls.join(",")));
            continue;
        }
        let groups = r.api_groups.clone().unwrap_or_default();
        let names = r.resource_names.clone().unwrap_or_default();
        for resource in r.resources.iter().flatten() {
            for group in &groups {
                let resource = if group.is_empty() {
                    resource.clone()
                } else {
                    format!("{resource}.{group}")
                };
                if names.is_empty() {
                    out.insert(format!("{verbs} on {resource}"));
                } else {
                    out.insert(format!("{verbs} on {resource}/{}", names.join(",")));
                }
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rb(ns: &str, name: &str, role: (&str, &str), subjects: serde_json::Value) -> RoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role.0, "name": role.1},
            "subjects": subjects,
        }))
        .unwrap()
    }

    fn crb(
        name: &str,
        labels: serde_json::Value,
        role: &str,
        subjects: serde_json::Value,
    ) -> ClusterRoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subjects,
        }))
        .unwrap()
    }

    fn cr(
        name: &str,
        labels: serde_json::Value,
        rules: serde_json::Value,
        aggregate: Option<serde_json::Value>,
    ) -> ClusterRole {
        let mut v = json!({"metadata": {"name": name, "labels": labels}, "rules": rules});
        if let Some(a) = aggregate {
            v["aggregationRule"] = json!({"clusterRoleSelectors": [{"matchLabels": a}]});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn own_planned_bindings_and_bootstrap_defaults_are_known_everything_else_is_foreign() {
        let own = rb(
            "ml",
            "p-train",
            ("Role", "p-train"),
            json!([{"kind": "ServiceAccount", "name": "p-train", "namespace": "ml"}]),
        );
        let extra = rb(
            "ml",
            "extra",
            ("ClusterRole", "edit"),
            json!([{"kind": "ServiceAccount", "name": "p-train", "namespace": "ml"}]),
        );
        let other_ns = rb(
            "prod",
            "reach",
            ("ClusterRole", "view"),
            json!([{"kind": "Group", "name": "system:serviceaccounts:ml"}]),
        );
        let basic = crb(
            "system:basic-user",
            json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            "system:basic-user",
            json!([{"kind": "Group", "name": "system:authenticated"}]),
        );
        let forged = crb(
            "everyone-view",
            json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            "view",
            json!([{"kind": "Group", "name": "system:authenticated"}]),
        );
        let unrelated = crb(
            "ops",
            json!({}),
            "view",
            json!([{"kind": "User", "name": "alice"}]),
        );
        let edit = cr(
            "edit",
            json!({}),
            json!([]),
            Some(json!({"rbac.authorization.k8s.io/aggregate-to-edit": "true"})),
        );
        let edit_part = cr(
            "aggregate-edit",
            json!({"rbac.authorization.k8s.io/aggregate-to-edit": "true"}),
            json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]}]),
            None,
        );
        let view = cr(
            "view",
            json!({}),
            json!([{"apiGroups": ["", "apps"], "resources": ["pods"], "verbs": ["get"]}]),
            None,
        );
        let rbac = Rbac {
            role_bindings: vec![&own, &extra, &other_ns],
            cluster_role_bindings: vec![&basic, &forged, &unrelated],
            roles: vec![],
            cluster_roles: vec![&edit, &edit_part, &view],
        };
        let grants = Index::new(&rbac).grants("ml", "p-train");
        let bindings: Vec<&str> = grants.iter().map(|g| g.binding.as_str()).collect();
        assert_eq!(
            bindings,
            [
                "ClusterRoleBinding everyone-view",
                "RoleBinding ml/extra",
                "RoleBinding prod/reach"
            ]
        );
        let extra = &grants[1];
        assert_eq!(extra.via, "ServiceAccount ml/p-train");
        assert_eq!(extra.rules, ["create,delete on secrets"]);
        assert_eq!(grants[2].rules, ["get on pods", "get on pods.apps"]);
    }

    #[test]
    fn a_binding_named_like_the_stage_but_granting_more_is_foreign() {
        let widened = rb(
            "ml",
            "p-train",
            ("ClusterRole", "admin"),
            json!([{"kind": "ServiceAccount", "name": "p-train", "namespace": "ml"}]),
        );
        let rbac = Rbac {
            role_bindings: vec![&widened],
            ..Rbac::default()
        };
        assert_eq!(Index::new(&rbac).grants("ml", "p-train").len(), 1);
    }
}
