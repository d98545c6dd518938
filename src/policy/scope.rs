//! Which guardrails bind a stage ([`applicable_guardrails`], [`Scope`]) and the templating of
//! their Vault path patterns ([`placeholders`]).

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::Reason;
use super::defaults;
use crate::api::validate::{parse_duration, validate_guardrail};
use crate::api::{AccessGuardrail, Ceiling, StageRole};

/// The ceilings that bind one stage: the applicable guardrails, or the built-in defaults.
///
/// A scope depends only on the pipeline's namespace labels and the stage's role, so the planner
/// builds it once per (pipeline, role) and shares it between the stages of that role. What every
/// decision of those stages needs (the allow message, the guardrails' egress CIDRs) is worked
/// out here once.
#[derive(Debug)]
pub(crate) struct Scope<'a> {
    /// The guardrails' ceilings for the stage's role, sorted by guardrail name.
    pub(super) ceilings: Vec<Bound<'a>>,
    /// True when no guardrail applies and the defaults are the ceiling.
    pub defaults: bool,
    /// Whether the stage gets DNS egress.
    pub dns_egress: bool,
    /// The longest Vault token or credential lifetime, in seconds.
    pub max_ttl: u64,
    /// The message of every allowed decision (but DNS) in this scope.
    pub(super) allowed_message: String,
    /// When set, every item of the stage is denied with this reason and message, whatever the
    /// ceilings say: the stage's role is not allowed in the namespace, or a guardrail that
    /// selects the namespace is invalid (which fails closed, not open).
    pub(super) refusal: Option<(Reason, String)>,
    /// The guardrail behind `refusal` (the invalid one, or the one whose `allowedRoles` leaves
    /// the role out): the deciding guardrail of every decision it turns into a denial.
    pub(super) refused_by: Option<&'a str>,
    /// Credential endpoints the applicable guardrails add to the built-in list.
    pub credential_endpoints: Vec<IpNet>,
    /// Pod-creating custom resources the applicable guardrails name (`<plural>.<group>`).
    pub(super) pod_creating: Vec<String>,
    /// Whether every ceiling of the scope allows workload creation (never under the defaults).
    pub(super) workload_creation: bool,
}

/// One ceiling that binds a stage, with what its checks need parsed once.
#[derive(Debug)]
pub(super) struct Bound<'a> {
    /// The guardrail's name, or "built-in defaults".
    pub(super) name: &'a str,
    pub(super) ceiling: &'a Ceiling,
    /// `ceiling.network.egressCIDRs`, parsed (entries that do not parse allow nothing).
    pub(super) egress_cidrs: Vec<IpNet>,
}

impl<'a> Bound<'a> {
    fn new(name: &'a str, ceiling: &'a Ceiling) -> Bound<'a> {
        Bound {
            name,
            ceiling,
            egress_cidrs: ceiling
                .network
                .egress_cidrs
                .iter()
                .filter_map(|a| a.parse::<IpNet>().ok())
                .collect(),
        }
    }
}

/// The guardrails whose namespaceSelector selects a namespace with `namespace_labels`, sorted
/// by name (stable: guardrails of one name keep their order). A pipeline's stages all live in
/// one namespace, so this is worked out once per pipeline; [`Scope::from_applicable`] then
/// picks the ceilings of one role.
pub(crate) fn applicable_guardrails<'a>(
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &'a [AccessGuardrail],
) -> Vec<&'a AccessGuardrail> {
    // A selector that does not parse applies everywhere: the guardrail is then invalid, and an
    // invalid guardrail denies (see `Scope::from_applicable`) instead of silently selecting
    // nothing.
    let mut applicable: Vec<&'a AccessGuardrail> = guardrails
        .iter()
        .filter(|g| {
            selects(&g.spec.namespace_selector, namespace_labels)
                || kube::core::Selector::try_from(g.spec.namespace_selector.clone()).is_err()
        })
        .collect();
    applicable.sort_by(|a, b| guardrail_name(a).cmp(guardrail_name(b)));
    applicable
}

fn guardrail_name(g: &AccessGuardrail) -> &str {
    g.metadata.name.as_deref().unwrap_or("")
}

impl<'a> Scope<'a> {
    /// The guardrails that apply to a stage of `role` in a namespace with `namespace_labels`.
    #[cfg(test)]
    pub(crate) fn new(
        role: StageRole,
        namespace_labels: &BTreeMap<String, String>,
        guardrails: &'a [AccessGuardrail],
    ) -> Scope<'a> {
        Scope::from_applicable(role, &applicable_guardrails(namespace_labels, guardrails))
    }

    /// The scope of a stage of `role`, from the guardrails that select its namespace, as
    /// [`applicable_guardrails`] returns them.
    pub(crate) fn from_applicable(role: StageRole, selecting: &[&'a AccessGuardrail]) -> Scope<'a> {
        let (refusal, refused_by) = match refusal(role, selecting) {
            Some((reason, message, by)) => (Some((reason, message)), Some(by)),
            None => (None, None),
        };
        let mut credential_endpoints: Vec<IpNet> = selecting
            .iter()
            .flat_map(|g| &g.spec.credential_endpoints)
            .filter_map(|c| c.parse::<IpNet>().ok())
            .collect();
        credential_endpoints.sort();
        credential_endpoints.dedup();
        let mut pod_creating: Vec<String> = selecting
            .iter()
            .flat_map(|g| g.spec.pod_creating_resources.iter().cloned())
            .collect();
        pod_creating.sort();
        pod_creating.dedup();
        let applicable: Vec<(&'a AccessGuardrail, &'a Ceiling)> = selecting
            .iter()
            .filter_map(|g| Some((*g, g.spec.roles.get(role)?)))
            .collect();
        if applicable.is_empty() {
            let ceiling = defaults::ceiling();
            return Scope {
                ceilings: vec![Bound::new("built-in defaults", ceiling)],
                defaults: true,
                dns_egress: false,
                max_ttl: ttl_of(ceiling),
                allowed_message: format!(
                    "no AccessGuardrail sets a ceiling for {} stages in this namespace; the built-in defaults allow it",
                    role.as_str()
                ),
                refusal,
                refused_by,
                credential_endpoints,
                pod_creating,
                workload_creation: false,
            };
        }
        let ceilings: Vec<Bound<'a>> = applicable
            .iter()
            .map(|(g, c)| Bound::new(guardrail_name(g), c))
            .collect();
        let names: Vec<&str> = ceilings.iter().map(|b| b.name).collect();
        Scope {
            dns_egress: applicable.iter().all(|(g, _)| g.spec.dns_egress),
            max_ttl: applicable
                .iter()
                .map(|(_, c)| ttl_of(c))
                .min()
                .unwrap_or(defaults::MAX_TTL_SECONDS),
            allowed_message: format!("allowed by AccessGuardrail {}", names.join(", ")),
            workload_creation: applicable.iter().all(|(_, c)| c.allow_workload_creation),
            ceilings,
            defaults: false,
            refusal,
            refused_by,
            credential_endpoints,
            pod_creating,
        }
    }

    /// The names of the AccessGuardrails that bind the stage; empty when the defaults apply.
    pub(crate) fn guardrail_names(&self) -> Vec<String> {
        if self.defaults {
            return Vec::new();
        }
        self.ceilings.iter().map(|b| b.name.to_string()).collect()
    }

    pub(super) fn allowed_reason(&self) -> Reason {
        if self.defaults {
            Reason::WithinDefaults
        } else {
            Reason::WithinGuardrail
        }
    }

    /// The first ceiling that does not allow the item, by `allows` (given the ceiling's
    /// position and the ceiling).
    pub(super) fn first_refusal(
        &self,
        allows: impl Fn(usize, &Bound<'a>) -> bool,
    ) -> Option<&'a str> {
        self.ceilings
            .iter()
            .enumerate()
            .find(|(i, b)| !allows(*i, b))
            .map(|(_, b)| b.name)
    }

    pub(super) fn refusal_source(&self, name: &str, role: StageRole, section: &str) -> String {
        if self.defaults {
            format!(
                "outside the built-in defaults for {} stages (no AccessGuardrail applies)",
                role.as_str()
            )
        } else {
            format!(
                "outside AccessGuardrail {name} (spec.roles.{}.{section})",
                role.guardrail_field()
            )
        }
    }
}

/// Why every item of a stage of `role` is denied, if it is: an invalid guardrail among those
/// that select the namespace (fail closed), or a role no selecting guardrail with
/// `allowedRoles` lists.
fn refusal<'a>(
    role: StageRole,
    selecting: &[&'a AccessGuardrail],
) -> Option<(Reason, String, &'a str)> {
    for g in selecting {
        let problems = validate_guardrail(g);
        if let Some(first) = problems.first() {
            return Some((
                Reason::InvalidGuardrail,
                format!(
                    "AccessGuardrail {} selects this namespace but is invalid ({first}); until it is fixed it allows nothing here",
                    guardrail_name(g)
                ),
                guardrail_name(g),
            ));
        }
    }
    let refusing = selecting
        .iter()
        .find(|g| !g.spec.allowed_roles.is_empty() && !g.spec.allowed_roles.contains(&role))?;
    let allowed: Vec<&str> = refusing
        .spec
        .allowed_roles
        .iter()
        .map(|r| r.as_str())
        .collect();
    Some((
        Reason::RoleNotAllowed,
        format!(
            "AccessGuardrail {} allows only {} stages in this namespace (spec.allowedRoles), not {}; the stage keeps its identity and nothing else. Use an allowed role, or ask the platform team",
            guardrail_name(refusing),
            allowed.join(", "),
            role.as_str()
        ),
        guardrail_name(refusing),
    ))
}

fn ttl_of(ceiling: &Ceiling) -> u64 {
    ceiling
        .vault
        .max_ttl
        .as_deref()
        .and_then(parse_duration)
        .unwrap_or(defaults::MAX_TTL_SECONDS)
}

/// Whether a namespace selector selects a namespace with these labels. An invalid selector
/// selects nothing (validation reports it).
pub(crate) fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    use kube::core::SelectorExt;
    kube::core::Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// Whether a guardrail with `selector` applies to pipelines in `namespace` (with `labels`): it
/// selects the namespace (`kubernetes.io/metadata.name` included), or its selector does not
/// parse, which applies everywhere and fails closed.
pub fn selects_namespace(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let mut labels = labels.clone();
    labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
    selects(selector, &labels) || kube::core::Selector::try_from(selector.clone()).is_err()
}

/// Names a stage is known by, given by the caller (the plan owns naming).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StageContext<'a> {
    pub namespace: &'a str,
    pub pipeline: &'a str,
    pub index: usize,
    /// Who owns which credential path cluster-wide; None when unknown (then only the pipeline's
    /// own stages are compared).
    pub claims: Option<&'a super::CredentialClaims>,
    /// The Secrets and workloads the pipeline names, as the cluster has them; None offline
    /// (then grants on them are allowed, and the plan marks them unverified).
    pub cluster: Option<&'a super::ClusterFacts>,
}

/// A guardrail's Vault path pattern with `{namespace}`, `{pipeline}` and `{stage}` filled in,
/// one after the other.
pub(super) fn placeholders(pattern: &str, ctx: StageContext<'_>, stage: &str) -> String {
    if !pattern.contains('{') {
        return pattern.to_string();
    }
    let plain = |v: &str| !v.contains(['{', '}']);
    if plain(ctx.namespace)
        && plain(ctx.pipeline)
        && plain(stage)
        && let Some(filled) = placeholders_one_pass(pattern, ctx, stage)
    {
        return filled;
    }
    pattern
        .replace("{namespace}", ctx.namespace)
        .replace("{pipeline}", ctx.pipeline)
        .replace("{stage}", stage)
}

/// [`placeholders`] in one pass, when every `{` of `pattern` opens a placeholder (as in every
/// valid guardrail) and the values hold no braces: then filling one placeholder cannot make or
/// break another, and one pass gives what three replacements give. None otherwise.
fn placeholders_one_pass(pattern: &str, ctx: StageContext<'_>, stage: &str) -> Option<String> {
    let mut out = String::with_capacity(pattern.len() + 64);
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let (value, len) = [
            ("{namespace}", ctx.namespace),
            ("{pipeline}", ctx.pipeline),
            ("{stage}", stage),
        ]
        .into_iter()
        .find(|(placeholder, _)| tail.starts_with(placeholder))
        .map(|(placeholder, value)| (value, placeholder.len()))?;
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    Some(out)
}
