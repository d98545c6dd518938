//! Turns what a stage requests into one [`Decision`] per requested item, allow or deny, with a
//! stable reason. Pure: no I/O, no clock.
//!
//! Two layers decide. The built-in floor ([`floor`]) denies what no guardrail may allow
//! (wildcards, escalation verbs, exec, cluster-scoped resources, Secrets not delivered to the
//! stage, the cloud metadata address, Vault `sudo` and `sys/`). Then every AccessGuardrail that
//! applies to the stage must allow the item: the stage gets the intersection. A guardrail applies
//! when its namespaceSelector matches the pipeline's namespace and it sets a ceiling for the
//! stage's role. When none applies, the built-in defaults ([`defaults::ceiling`]) are the ceiling.

pub mod defaults;
pub mod floor;
pub mod vault_path;

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::api::validate::{format_duration, parse_cidr, parse_duration};
use crate::api::{
    AIPipelineSpec, AccessGuardrail, Ceiling, EgressRule, IngressRule, NetworkPort, Stage,
    StageRole, VaultCapability,
};

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
    /// Egress to the cloud metadata address.
    MetadataEndpoint,
    /// A credential or token lifetime longer than the guardrail's maxTTL.
    TtlTooLong,
    /// The Vault `sudo` capability.
    SudoCapability,
    /// Vault `sys/`, `auth/` or `identity/` paths.
    VaultSystemPath,
}

impl Reason {
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
    Egress(EgressRule),
    /// One ingress rule.
    Ingress(IngressRule),
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
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// The ceilings that bind one stage: the applicable guardrails, or the built-in defaults.
///
/// A scope depends only on the pipeline's namespace labels and the stage's role, so the planner
/// builds it once per (pipeline, role) and shares it between the stages of that role. What every
/// decision of those stages needs (the allow message, the guardrails' egress CIDRs) is worked
/// out here once.
#[derive(Debug)]
pub struct Scope<'a> {
    /// The guardrails' ceilings for the stage's role, sorted by guardrail name.
    ceilings: Vec<Bound<'a>>,
    /// True when no guardrail applies and the defaults are the ceiling.
    pub defaults: bool,
    /// Whether the stage gets DNS egress.
    pub dns_egress: bool,
    /// The longest Vault token or credential lifetime, in seconds.
    pub max_ttl: u64,
    /// The message of every allowed decision (but DNS) in this scope.
    allowed_message: String,
}

/// One ceiling that binds a stage, with what its checks need parsed once.
#[derive(Debug)]
struct Bound<'a> {
    /// The guardrail's name, or "built-in defaults".
    name: &'a str,
    ceiling: &'a Ceiling,
    /// `ceiling.network.egressCIDRs`, parsed (entries that do not parse allow nothing).
    egress_cidrs: Vec<IpNet>,
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
pub fn applicable_guardrails<'a>(
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &'a [AccessGuardrail],
) -> Vec<&'a AccessGuardrail> {
    let mut applicable: Vec<&'a AccessGuardrail> = guardrails
        .iter()
        .filter(|g| selects(&g.spec.namespace_selector, namespace_labels))
        .collect();
    applicable.sort_by(|a, b| guardrail_name(a).cmp(guardrail_name(b)));
    applicable
}

fn guardrail_name(g: &AccessGuardrail) -> &str {
    g.metadata.name.as_deref().unwrap_or("")
}

impl<'a> Scope<'a> {
    /// The guardrails that apply to a stage of `role` in a namespace with `namespace_labels`.
    pub fn new(
        role: StageRole,
        namespace_labels: &BTreeMap<String, String>,
        guardrails: &'a [AccessGuardrail],
    ) -> Scope<'a> {
        Scope::from_applicable(role, &applicable_guardrails(namespace_labels, guardrails))
    }

    /// The scope of a stage of `role`, from the guardrails that select its namespace, as
    /// [`applicable_guardrails`] returns them.
    pub fn from_applicable(role: StageRole, applicable: &[&'a AccessGuardrail]) -> Scope<'a> {
        let applicable: Vec<(&'a AccessGuardrail, &'a Ceiling)> = applicable
            .iter()
            .filter_map(|g| Some((*g, g.spec.roles.get(role)?)))
            .collect();
        if applicable.is_empty() {
            let ceiling = defaults::ceiling();
            return Scope {
                ceilings: vec![Bound::new("built-in defaults", ceiling)],
                defaults: true,
                dns_egress: true,
                max_ttl: ttl_of(ceiling),
                allowed_message: format!(
                    "no AccessGuardrail sets a ceiling for {} stages in this namespace; the built-in defaults allow it",
                    role.as_str()
                ),
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
            ceilings,
            defaults: false,
        }
    }

    /// The names of the AccessGuardrails that bind the stage; empty when the defaults apply.
    pub fn guardrail_names(&self) -> Vec<String> {
        if self.defaults {
            return Vec::new();
        }
        self.ceilings.iter().map(|b| b.name.to_string()).collect()
    }

    fn allowed_reason(&self) -> Reason {
        if self.defaults {
            Reason::WithinDefaults
        } else {
            Reason::WithinGuardrail
        }
    }

    /// The first ceiling that does not allow the item, by `allows` (given the ceiling's
    /// position and the ceiling).
    fn first_refusal(&self, allows: impl Fn(usize, &Bound<'a>) -> bool) -> Option<&'a str> {
        self.ceilings
            .iter()
            .enumerate()
            .find(|(i, b)| !allows(*i, b))
            .map(|(_, b)| b.name)
    }

    fn refusal_source(&self, name: &str, role: StageRole, section: &str) -> String {
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
pub fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    use kube::core::SelectorExt;
    kube::core::Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// Names a stage is known by, given by the caller (the plan owns naming).
#[derive(Debug, Clone, Copy)]
pub struct StageContext<'a> {
    pub namespace: &'a str,
    pub pipeline: &'a str,
    pub index: usize,
}

/// Decides every item that stage `ctx.index` of `spec` requests, in spec order.
pub fn evaluate_stage(
    ctx: StageContext<'_>,
    spec: &AIPipelineSpec,
    scope: &Scope<'_>,
) -> Vec<Decision> {
    let mut out = Vec::new();
    evaluate_stage_into(ctx, spec, scope, &mut out);
    out
}

/// As [`evaluate_stage`], but appends the decisions to `out` (the planner collects the
/// decisions of all stages in one vector).
pub fn evaluate_stage_into(
    ctx: StageContext<'_>,
    spec: &AIPipelineSpec,
    scope: &Scope<'_>,
    out: &mut Vec<Decision>,
) {
    let stage = &spec.stages[ctx.index];
    out.reserve(decision_count(stage));
    let start = out.len();
    let vault_patterns = if stage.vault.is_some() {
        scope
            .ceilings
            .iter()
            .map(|b| {
                b.ceiling
                    .vault
                    .paths
                    .iter()
                    .map(|p| placeholders(&p.pattern, ctx, &stage.name))
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut ev = Evaluator {
        ctx,
        spec,
        stage,
        scope,
        decisions: out,
        start,
        delivered: Vec::new(),
        vault_patterns,
    };
    // Credentials are decided first: only the Secrets of allowed credentials are delivered, and
    // only those may the stage read. Their decisions still come last, in spec order.
    let credentials = ev.credentials();
    ev.delivered = credentials
        .iter()
        .filter(|d| d.is_allowed())
        .filter_map(|d| match &d.item {
            Item::Credential { secret_name, .. } => Some(secret_name.clone()),
            _ => None,
        })
        .collect();
    ev.permissions();
    ev.network();
    ev.vault();
    ev.decisions.extend(credentials);
}

/// How many decisions [`evaluate_stage`] makes for `stage` (at most): one per verb, resource
/// and group (and, for Secrets, per name), DNS, each network rule, each Vault path and
/// capability, the token lifetime, each credential.
pub fn decision_count(stage: &Stage) -> usize {
    let permissions: usize = stage
        .permissions
        .iter()
        .map(|rule| {
            let per_resource: usize = rule
                .api_groups
                .iter()
                .flat_map(|g| rule.resources.iter().map(move |r| (g, r)))
                .map(|(g, r)| {
                    if g.is_empty() && floor::resource_base(r) == "secrets" {
                        rule.resource_names.len().max(1)
                    } else {
                        1
                    }
                })
                .sum();
            per_resource * rule.verbs.len()
        })
        .sum();
    let network = stage
        .network
        .as_ref()
        .map_or(0, |n| n.egress.len() + n.ingress.len());
    let vault = stage.vault.as_ref().map_or(0, |v| {
        v.policies
            .iter()
            .map(|p| p.capabilities.len())
            .sum::<usize>()
            + 1
            + v.credentials.len()
    });
    permissions + 1 + network + vault
}

/// A guardrail's Vault path pattern with `{namespace}`, `{pipeline}` and `{stage}` filled in,
/// one after the other.
fn placeholders(pattern: &str, ctx: StageContext<'_>, stage: &str) -> String {
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

/// What an item's check returns: allowed, or denied with the reason and the message.
type Outcome = Result<(), (Reason, String)>;

struct Evaluator<'a, 's> {
    ctx: StageContext<'a>,
    spec: &'a AIPipelineSpec,
    stage: &'a Stage,
    scope: &'a Scope<'s>,
    /// The decisions of earlier stages, then this stage's from `start` on.
    decisions: &'a mut Vec<Decision>,
    start: usize,
    /// The Secrets this stage's allowed credentials are delivered to.
    delivered: Vec<String>,
    /// Per ceiling of the scope, its Vault path patterns with the placeholders filled in for
    /// this stage (empty when the stage asks for nothing from Vault).
    vault_patterns: Vec<Vec<String>>,
}

impl Evaluator<'_, '_> {
    fn push(&mut self, field: String, item: Item, outcome: Outcome) {
        let (verdict, reason, message) = match outcome {
            Ok(()) => (
                Verdict::Allow,
                self.scope.allowed_reason(),
                self.scope.allowed_message.clone(),
            ),
            Err((reason, message)) => (Verdict::Deny, reason, message),
        };
        self.decisions.push(Decision {
            stage: self.stage.name.clone(),
            field,
            item,
            verdict,
            reason,
            message,
        });
    }

    /// Whether every ceiling allows the item; `what` names it in the message of a refusal.
    fn guardrail(
        &self,
        section: &str,
        allows: impl Fn(usize, &Bound<'_>) -> bool,
        what: fmt::Arguments<'_>,
    ) -> Outcome {
        match self.scope.first_refusal(allows) {
            None => Ok(()),
            Some(name) => Err((
                Reason::OutsideGuardrail,
                format!(
                    "{what} is {}; ask the platform team to extend the guardrail, or remove it from the stage",
                    self.scope.refusal_source(name, self.stage.role, section)
                ),
            )),
        }
    }

    /// Whether every ceiling allows `capability` on `path` (as a covering Vault path pattern).
    fn vault_allows(
        &self,
        index: usize,
        ceiling: &Ceiling,
        capability: VaultCapability,
        path: &str,
    ) -> bool {
        ceiling
            .vault
            .paths
            .iter()
            .zip(&self.vault_patterns[index])
            .any(|(p, pattern)| {
                p.capabilities.contains(&capability) && vault_path::covers(pattern, path)
            })
    }

    /// The Secrets delivered to each stage, by stage name.
    fn secret_owner(&self, secret: &str) -> Option<&str> {
        self.spec.stages.iter().find_map(|s| {
            s.vault
                .iter()
                .flat_map(|v| &v.credentials)
                .any(|c| c.secret_name == secret)
                .then_some(s.name.as_str())
        })
    }

    fn permissions(&mut self) {
        let stage = self.stage;
        for (i, rule) in stage.permissions.iter().enumerate() {
            let field = format!("spec.stages[{}].permissions[{i}]", self.ctx.index);
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    // Secrets are decided one name at a time: some names may be this stage's
                    // and others not.
                    let per_name = group.is_empty()
                        && floor::resource_base(resource) == "secrets"
                        && !rule.resource_names.is_empty();
                    for verb in &rule.verbs {
                        if per_name {
                            for name in &rule.resource_names {
                                let names = std::slice::from_ref(name);
                                let outcome = self.decide_kubernetes(group, resource, verb, names);
                                self.push_kubernetes(
                                    &field,
                                    group,
                                    resource,
                                    verb,
                                    names.to_vec(),
                                    outcome,
                                );
                            }
                        } else {
                            let names = &rule.resource_names;
                            let outcome = self.decide_kubernetes(group, resource, verb, names);
                            self.push_kubernetes(
                                &field,
                                group,
                                resource,
                                verb,
                                names.clone(),
                                outcome,
                            );
                        }
                    }
                }
            }
        }
    }

    fn push_kubernetes(
        &mut self,
        field: &str,
        group: &str,
        resource: &str,
        verb: &str,
        resource_names: Vec<String>,
        outcome: Outcome,
    ) {
        let item = Item::Kubernetes {
            api_group: group.to_string(),
            resource: resource.to_string(),
            verb: verb.to_string(),
            resource_names,
        };
        self.push(field.to_string(), item, outcome);
    }

    fn decide_kubernetes(
        &self,
        group: &str,
        resource: &str,
        verb: &str,
        names: &[String],
    ) -> Outcome {
        floor::kubernetes(group, resource, verb, names)?;
        if group.is_empty() && floor::resource_base(resource) == "secrets" {
            if names.is_empty() {
                return Err((
                    Reason::SecretNotOwned,
                    "secrets without resourceNames would reach every Secret in the namespace; list the Secrets this stage's credentials are delivered to".into(),
                ));
            }
            let name = &names[0];
            match self.secret_owner(name) {
                Some(_) if self.delivered.contains(name) => {}
                Some(owner) if owner == self.stage.name => {
                    return Err((
                        Reason::SecretNotOwned,
                        format!(
                            "Secret {name:?} would hold this stage's credentials, but they are denied, so Portcullis does not deliver it; fix the credential's decision first"
                        ),
                    ));
                }
                Some(owner) => {
                    return Err((
                        Reason::CrossStageCredential,
                        format!(
                            "Secret {name:?} holds the credentials of stage {owner:?}; a stage only reads its own credentials"
                        ),
                    ));
                }
                None => {
                    return Err((
                        Reason::SecretNotOwned,
                        format!(
                            "Secret {name:?} is not delivered to this stage; declare it as a credential's secretName in spec.stages[{}].vault.credentials, or remove it",
                            self.ctx.index
                        ),
                    ));
                }
            }
        }
        self.guardrail(
            "kubernetes",
            |_, b| {
                b.ceiling.kubernetes.iter().any(|k| {
                    k.api_groups.iter().any(|g| g == group)
                        && k.resources.iter().any(|r| r == resource)
                        && k.verbs.iter().any(|v| v == verb)
                })
            },
            format_args!("{verb} on {resource}"),
        )
    }

    fn network(&mut self) {
        if self.scope.dns_egress {
            self.decisions.push(Decision {
                stage: self.stage.name.clone(),
                field: format!("spec.stages[{}]", self.ctx.index),
                item: Item::Dns,
                verdict: Verdict::Allow,
                reason: Reason::DnsByDefault,
                message: "every stage may resolve names through kube-dns unless an AccessGuardrail sets dnsEgress: false".into(),
            });
        }
        let Some(network) = &self.stage.network else {
            return;
        };
        for (i, rule) in network.egress.iter().enumerate() {
            let field = format!("spec.stages[{}].network.egress[{i}]", self.ctx.index);
            let outcome = self.decide_egress(rule);
            self.push(field, Item::Egress(rule.clone()), outcome);
        }
        for (i, rule) in network.ingress.iter().enumerate() {
            let field = format!("spec.stages[{}].network.ingress[{i}]", self.ctx.index);
            let outcome = self.guardrail(
                "network.allowIngress",
                |_, b| b.ceiling.network.allow_ingress,
                format_args!("ingress"),
            );
            self.push(field, Item::Ingress(rule.clone()), outcome);
        }
    }

    fn decide_egress(&self, rule: &EgressRule) -> Outcome {
        if let Some(cidr) = &rule.cidr {
            let net = parse_cidr(cidr).map_err(|e| (Reason::OutsideGuardrail, e))?;
            floor::egress(&net)?;
            return self.guardrail(
                "network.egressCIDRs",
                |_, b| b.egress_cidrs.iter().any(|a| a.contains(&net)),
                format_args!("egress to {cidr}"),
            );
        }
        let ns = rule.namespace.as_deref().unwrap_or_default();
        self.guardrail(
            "network.egressNamespaces",
            |_, b| {
                b.ceiling
                    .network
                    .egress_namespaces
                    .iter()
                    .any(|n| n == ns || (n == "{namespace}" && ns == self.ctx.namespace))
            },
            format_args!("egress to namespace {ns}"),
        )
    }

    fn vault(&mut self) {
        let stage = self.stage;
        let Some(vault) = &stage.vault else {
            return;
        };
        for (i, rule) in vault.policies.iter().enumerate() {
            let field = format!("spec.stages[{}].vault.policies[{i}]", self.ctx.index);
            for &capability in &rule.capabilities {
                let outcome = self.decide_vault_path(&rule.path, capability);
                self.push(
                    field.clone(),
                    Item::VaultPath {
                        path: rule.path.clone(),
                        capability,
                    },
                    outcome,
                );
            }
        }
        // The token lifetime matters only when the stage gets a Vault role, that is when some
        // path was allowed.
        let any_path_allowed = self.decisions[self.start..]
            .iter()
            .any(|d| d.is_allowed() && matches!(d.item, Item::VaultPath { .. }));
        if any_path_allowed {
            let field = format!("spec.stages[{}].vault.tokenTTL", self.ctx.index);
            let seconds = vault
                .token_ttl
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or(defaults::TOKEN_TTL_SECONDS.min(self.scope.max_ttl));
            let outcome = self.decide_ttl(seconds, "the Vault token lifetime");
            self.push(field, Item::VaultTokenTtl { seconds }, outcome);
        }
    }

    /// The decisions on the stage's credentials.
    fn credentials(&mut self) -> Vec<Decision> {
        let stage = self.stage;
        let Some(vault) = &stage.vault else {
            return Vec::new();
        };
        let before = self.decisions.len();
        for (i, cred) in vault.credentials.iter().enumerate() {
            let field = format!("spec.stages[{}].vault.credentials[{i}]", self.ctx.index);
            let ttl_seconds = parse_duration(&cred.ttl).unwrap_or(0);
            let outcome = self.decide_credential(&cred.path, ttl_seconds);
            let item = Item::Credential {
                name: cred.name.clone(),
                path: cred.path.clone(),
                ttl_seconds,
                secret_name: cred.secret_name.clone(),
            };
            self.push(field, item, outcome);
        }
        self.decisions.split_off(before)
    }

    /// Credential paths of the other stages, with the stage that declares them first.
    fn other_credential(&self, covers: impl Fn(&str) -> bool) -> Option<(&str, &str)> {
        self.spec
            .stages
            .iter()
            .filter(|s| s.name != self.stage.name)
            .find_map(|s| {
                s.vault
                    .iter()
                    .flat_map(|v| &v.credentials)
                    .find(|c| covers(&c.path))
                    .map(|c| (s.name.as_str(), c.path.as_str()))
            })
    }

    fn decide_vault_path(&self, path: &str, capability: VaultCapability) -> Outcome {
        floor::vault_path(path, capability)?;
        if let Some((owner, cred)) = self.other_credential(|c| vault_path::matches(path, c)) {
            return Err((
                Reason::CrossStageCredential,
                format!(
                    "{path} reaches {cred}, the credentials of stage {owner:?}; narrow the path so it leaves other stages' credentials out"
                ),
            ));
        }
        self.guardrail(
            "vault.paths",
            |i, b| self.vault_allows(i, b.ceiling, capability, path),
            format_args!("{} on {path}", capability.as_str()),
        )
    }

    fn decide_ttl(&self, seconds: u64, what: &str) -> Outcome {
        if seconds > self.scope.max_ttl {
            let max = format_duration(self.scope.max_ttl);
            return Err((
                Reason::TtlTooLong,
                format!(
                    "{what} {} is longer than the guardrail's maxTTL {max}; ask for {max} or less",
                    format_duration(seconds)
                ),
            ));
        }
        Ok(())
    }

    fn decide_credential(&self, path: &str, ttl_seconds: u64) -> Outcome {
        floor::vault_path(path, VaultCapability::Read)?;
        // The first stage to declare a credential path owns it; a later stage is refused, so
        // that no two stages ever share one set of dynamic credentials.
        let first_owner = self.spec.stages[..self.ctx.index].iter().find(|s| {
            s.vault
                .iter()
                .flat_map(|v| &v.credentials)
                .any(|c| c.path == path)
        });
        if let Some(owner) = first_owner {
            return Err((
                Reason::CrossStageCredential,
                format!(
                    "{path} already issues the credentials of stage {:?}; ask Vault for a separate role for this stage",
                    owner.name
                ),
            ));
        }
        self.decide_ttl(ttl_seconds, "the credential lifetime")?;
        if self.scope.defaults {
            return Err((
                Reason::OutsideGuardrail,
                format!(
                    "no AccessGuardrail sets a ceiling for {} stages in this namespace, and the built-in defaults issue no dynamic credentials; ask the platform team for a guardrail that allows reading {path}",
                    self.stage.role.as_str()
                ),
            ));
        }
        self.guardrail(
            "vault.paths",
            |i, b| self.vault_allows(i, b.ceiling, VaultCapability::Read, path),
            format_args!("reading credentials from {path}"),
        )
    }
}

#[cfg(test)]
mod tests;
