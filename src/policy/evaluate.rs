//! Evaluation: every item a stage requests, through the floor and the stage's [`Scope`], to one
//! [`Decision`] each.

use std::borrow::Borrow;
use std::fmt;

use ipnet::IpNet;

use crate::api::validate::{ValidStage, Validated, format_duration};
use crate::api::{
    AIPipeline, AIPipelineSpec, Ceiling, EgressRule, IngressRule, Stage, VaultCapability,
    WorkloadKind,
};

use super::scope::{Bound, placeholders};
use super::{
    Claimant, Decision, Item, Reason, Scope, SecretFact, StageContext, Verdict, WithCidr,
    WorkloadFact, cluster, defaults, floor, vault_path,
};

/// Decides every item that stage `ctx.index` of `pipeline` requests, in spec order.
#[cfg(test)]
pub(crate) fn evaluate_stage(
    ctx: StageContext<'_>,
    pipeline: &Validated<impl Borrow<AIPipeline>>,
    scope: &Scope<'_>,
) -> Vec<Decision> {
    let mut out = Vec::new();
    evaluate_stage_into(ctx, pipeline, scope, &mut out);
    out
}

/// As `evaluate_stage`, but appends the decisions to `out` (the planner collects the
/// decisions of all stages in one vector).
pub(crate) fn evaluate_stage_into(
    ctx: StageContext<'_>,
    pipeline: &Validated<impl Borrow<AIPipeline>>,
    scope: &Scope<'_>,
    out: &mut Vec<Decision>,
) {
    let spec = &pipeline.pipeline().spec;
    let stage = pipeline.stage(ctx.index);
    out.reserve(decision_count(stage.get()));
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
        refused_by: std::cell::Cell::new(None),
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

/// How many decisions `evaluate_stage` makes for `stage` (at most): one per verb, resource
/// and group (and, for Secrets, per name), DNS, each network rule, each Vault path and
/// capability, the token lifetime, each credential.
pub(crate) fn decision_count(stage: &Stage) -> usize {
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
            + v.credentials
                .iter()
                .map(|c| 1 + c.restart_targets.len())
                .sum::<usize>()
    });
    permissions + 1 + network + vault
}

/// What an item's check returns: allowed, or denied with the reason and the message.
type Outcome = Result<(), (Reason, String)>;

struct Evaluator<'a, 's> {
    ctx: StageContext<'a>,
    spec: &'a AIPipelineSpec,
    stage: ValidStage<'a>,
    scope: &'a Scope<'s>,
    /// The decisions of earlier stages, then this stage's from `start` on.
    decisions: &'a mut Vec<Decision>,
    start: usize,
    /// The Secrets this stage's allowed credentials are delivered to.
    delivered: Vec<String>,
    /// Per ceiling of the scope, its Vault path patterns with the placeholders filled in for
    /// this stage (empty when the stage asks for nothing from Vault).
    vault_patterns: Vec<Vec<String>>,
    /// The guardrail that refused the item being decided, if one did (set by `guardrail`,
    /// taken by `push`).
    refused_by: std::cell::Cell<Option<&'a str>>,
}

impl Evaluator<'_, '_> {
    fn push(&mut self, field: String, item: Item, outcome: Outcome) {
        // A refused role or an invalid guardrail turns every allow into a denial: nothing of
        // the stage can pass by a path this check forgot.
        let outcome = match (&self.scope.refusal, outcome) {
            (Some(refusal), Ok(())) => Err(refusal.clone()),
            (_, outcome) => outcome,
        };
        let (verdict, reason, message) = match outcome {
            Ok(()) => (
                Verdict::Allow,
                self.scope.allowed_reason(),
                self.scope.allowed_message.clone(),
            ),
            Err((reason, message)) => (Verdict::Deny, reason, message),
        };
        let refused_by = self.refused_by.take();
        let guardrail = match reason {
            Reason::WithinGuardrail => self.scope.ceilings.first().map(|b| b.name.to_string()),
            Reason::OutsideGuardrail if !self.scope.defaults => refused_by.map(str::to_string),
            Reason::InvalidGuardrail | Reason::RoleNotAllowed => {
                self.scope.refused_by.map(str::to_string)
            }
            _ => None,
        };
        self.decisions.push(Decision {
            stage: self.stage.name.clone(),
            field,
            item,
            verdict,
            reason,
            message,
            guardrail,
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
            Some(name) => {
                self.refused_by.set(Some(name));
                Err((
                    Reason::OutsideGuardrail,
                    format!(
                        "{what} is {}; ask the platform team to extend the guardrail, or remove it from the stage",
                        self.scope.refusal_source(name, self.stage.role, section)
                    ),
                ))
            }
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
                    let decided: Vec<&[String]> = if per_name {
                        rule.resource_names
                            .iter()
                            .map(std::slice::from_ref)
                            .collect()
                    } else {
                        vec![rule.resource_names.as_slice()]
                    };
                    for verb in &rule.verbs {
                        for names in &decided {
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
            self.cluster_secret(name)?;
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
        if floor::is_workload_write(group, resource, verb, &self.scope.pod_creating)
            && !self.scope.workload_creation
        {
            return Err((
                Reason::WorkloadCreation,
                format!(
                    "{verb} on {resource} lets the stage start pods as any ServiceAccount of the namespace with any of its Secrets, borrowing other stages' identities; it needs a guardrail whose ceiling for {} stages sets allowWorkloadCreation: true",
                    self.stage.role.as_str()
                ),
            ));
        }
        self.cross_stage_write(group, resource, verb, names)?;
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

    /// A write on ConfigMaps or Secrets that another stage of the pipeline reads poisons that
    /// stage's inputs, unless the writer declares the flow in `produces`.
    fn cross_stage_write(
        &self,
        group: &str,
        resource: &str,
        verb: &str,
        names: &[String],
    ) -> Outcome {
        const WRITES: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];
        const READS: [&str; 3] = ["get", "list", "watch"];
        if !group.is_empty()
            || !matches!(resource, "configmaps" | "secrets")
            || !WRITES.contains(&verb)
        {
            return Ok(());
        }
        // The other stages' reads of `resource`: None for a read of every object, else the names.
        let reads = self
            .spec
            .stages
            .iter()
            .filter(|s| s.name != self.stage.name)
            .flat_map(|s| s.permissions.iter().map(move |p| (s.name.as_str(), p)))
            .filter(|(_, p)| {
                p.api_groups.iter().any(String::is_empty)
                    && p.resources.iter().any(|r| r == resource)
                    && p.verbs.iter().any(|v| READS.contains(&v.as_str()))
            });
        for (reader, rule) in reads {
            if names.is_empty() {
                return Err((
                    Reason::CrossStageWrite,
                    format!(
                        "{verb} on every {resource} includes the ones stage {reader:?} reads; list the names this stage writes in resourceNames and declare them in produces"
                    ),
                ));
            }
            let read_name = names.iter().find(|n| {
                (rule.resource_names.is_empty() || rule.resource_names.contains(n))
                    && !self
                        .stage
                        .produces
                        .iter()
                        .any(|p| p.split_once('/') == Some((resource, n.as_str())))
            });
            if let Some(name) = read_name {
                return Err((
                    Reason::CrossStageWrite,
                    format!(
                        "stage {reader:?} reads {resource}/{name}; writing it would change that stage's inputs. Declare the flow with produces: [{resource}/{name}] on this stage, or write another object"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn network(&mut self) {
        if self.scope.dns_egress && self.scope.refusal.is_none() {
            self.decisions.push(Decision {
                stage: self.stage.name.clone(),
                field: format!("spec.stages[{}]", self.ctx.index),
                item: Item::Dns,
                verdict: Verdict::Allow,
                reason: Reason::DnsByDefault,
                message: "every stage may resolve names through kube-dns unless an AccessGuardrail sets dnsEgress: false".into(),
                guardrail: None,
            });
        }
        let stage = self.stage;
        for (i, (rule, cidr)) in stage.egress().enumerate() {
            let field = format!("spec.stages[{}].network.egress[{i}]", self.ctx.index);
            let outcome = self.decide_egress(rule, cidr);
            let item = Item::Egress(WithCidr {
                rule: rule.clone(),
                net: cidr,
            });
            self.push(field, item, outcome);
        }
        for (i, (rule, cidr)) in stage.ingress().enumerate() {
            let field = format!("spec.stages[{}].network.ingress[{i}]", self.ctx.index);
            let outcome = self
                .guardrail(
                    "network.allowIngress",
                    |_, b| b.ceiling.network.allow_ingress,
                    format_args!("ingress"),
                )
                .and_then(|()| self.decide_ingress_source(rule, cidr));
            let item = Item::Ingress(WithCidr {
                rule: rule.clone(),
                net: cidr,
            });
            self.push(field, item, outcome);
        }
    }

    /// Whether every ceiling that bounds ingress sources (`ingressCIDRs`, `ingressNamespaces`)
    /// admits the rule's source. `net` is `rule.from_cidr`, parsed by validation.
    fn decide_ingress_source(&self, rule: &IngressRule, net: Option<IpNet>) -> Outcome {
        const NAME: &str = "kubernetes.io/metadata.name";
        // The one namespace the rule's source is in, when it says so exactly.
        let source_namespace = match (&rule.from_namespace_selector, &rule.from_pod_selector) {
            (None, Some(_)) => Some(self.ctx.namespace),
            (Some(sel), _) => sel
                .match_labels
                .as_ref()
                .filter(|l| {
                    l.len() == 1
                        && sel
                            .match_expressions
                            .as_deref()
                            .unwrap_or_default()
                            .is_empty()
                })
                .and_then(|l| l.get(NAME))
                .map(String::as_str),
            (None, None) => None,
        };
        self.guardrail(
            "network.ingressCIDRs/ingressNamespaces",
            |_, b| {
                let n = &b.ceiling.network;
                if n.ingress_cidrs.is_empty() && n.ingress_namespaces.is_empty() {
                    return true;
                }
                match (net, source_namespace) {
                    (Some(net), _) => n
                        .ingress_cidrs
                        .iter()
                        .filter_map(|c| c.parse::<IpNet>().ok())
                        .any(|c| c.contains(&net)),
                    (None, Some(ns)) => n.ingress_namespaces.iter().any(|allowed| {
                        allowed == ns || (allowed == "{namespace}" && ns == self.ctx.namespace)
                    }),
                    (None, None) => false,
                }
            },
            format_args!("ingress from this source"),
        )
    }

    /// `net` is `rule.cidr`, parsed by validation.
    fn decide_egress(&self, rule: &EgressRule, net: Option<IpNet>) -> Outcome {
        if let (Some(cidr), Some(net)) = (&rule.cidr, net) {
            floor::egress(&net, &self.scope.credential_endpoints)?;
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
        let Some(vault) = &stage.get().vault else {
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
            let seconds = stage
                .token_ttl()
                .unwrap_or(defaults::TOKEN_TTL_SECONDS.min(self.scope.max_ttl));
            let outcome = self.decide_ttl(seconds, "the Vault token lifetime");
            self.push(field, Item::VaultTokenTtl { seconds }, outcome);
        }
    }

    /// The decisions on the stage's credentials.
    fn credentials(&mut self) -> Vec<Decision> {
        let stage = self.stage;
        let before = self.decisions.len();
        for (i, (cred, ttl_seconds)) in stage.credentials().enumerate() {
            let field = format!("spec.stages[{}].vault.credentials[{i}]", self.ctx.index);
            let outcome = self.decide_credential(&cred.path, &cred.secret_name, ttl_seconds);
            let item = Item::Credential {
                name: cred.name.clone(),
                path: cred.path.clone(),
                ttl_seconds,
                secret_name: cred.secret_name.clone(),
            };
            self.push(field.clone(), item, outcome);
            for (k, target) in cred.restart_targets.iter().enumerate() {
                let outcome = self.decide_restart_target(target.kind, &target.name);
                let item = Item::RestartTarget {
                    credential: cred.name.clone(),
                    kind: target.kind,
                    name: target.name.clone(),
                };
                self.push(format!("{field}.restartTargets[{k}]"), item, outcome);
            }
        }
        self.decisions.split_off(before)
    }

    /// A Secret the stage would read or receive credentials in: refused when it exists and is
    /// not this pipeline's. Offline (no cluster facts) it passes, and the plan marks the grant
    /// unverified; in the cluster a name that was not looked up is refused.
    fn cluster_secret(&self, name: &str) -> Outcome {
        let Some(cluster) = self.ctx.cluster else {
            return Ok(());
        };
        match cluster.secrets.get(name) {
            Some(SecretFact::Absent | SecretFact::Owned) => Ok(()),
            Some(SecretFact::Foreign(owner)) => Err((
                Reason::ForeignSecret,
                format!(
                    "Secret {name:?} exists and is not this pipeline's ({owner}); a stage only gets Secrets Portcullis delivers to its pipeline. Choose a secretName no other object uses"
                ),
            )),
            Some(SecretFact::Unknown(why)) => Err((
                Reason::ForeignSecret,
                format!(
                    "Secret {name:?} could not be looked up ({why}), so Portcullis cannot tell whose it is; it is refused until it can"
                ),
            )),
            None => Err((
                Reason::ForeignSecret,
                format!(
                    "Secret {name:?} was not looked up, so Portcullis cannot tell whose it is; it is refused until it can"
                ),
            )),
        }
    }

    /// A workload a credential's rotation restarts: only the pipeline's own, that is one whose
    /// pod template runs as one of the pipeline's stage ServiceAccounts. Offline it passes
    /// (marked unverified); the controller checks it again before each restart.
    fn decide_restart_target(&self, kind: WorkloadKind, name: &str) -> Outcome {
        let Some(cluster) = self.ctx.cluster else {
            return Ok(());
        };
        let service_account = match cluster.workloads.get(&(kind, name.to_string())) {
            Some(WorkloadFact::Absent) => return Ok(()),
            Some(WorkloadFact::RunsAs(sa)) => sa,
            Some(WorkloadFact::Unknown(why)) => {
                return Err((
                    Reason::ForeignWorkload,
                    format!(
                        "{kind:?} {name} could not be looked up ({why}), so Portcullis cannot tell whose it is; it is not restarted until it can"
                    ),
                ));
            }
            None => {
                return Err((
                    Reason::ForeignWorkload,
                    format!(
                        "{kind:?} {name} was not looked up, so Portcullis cannot tell whose it is; it is not restarted until it can"
                    ),
                ));
            }
        };
        if cluster::runs_as_stage(
            self.ctx.namespace,
            self.ctx.pipeline,
            self.spec,
            service_account,
        ) {
            return Ok(());
        }
        let own = crate::plan::names::stage_object(
            self.ctx.namespace,
            self.ctx.pipeline,
            &self.stage.name,
        );
        Err((
            Reason::ForeignWorkload,
            format!(
                "{kind:?} {name} runs as ServiceAccount {service_account:?}, not as a stage of this pipeline; Portcullis restarts only the pipeline's own workloads. Run it as {own:?} or remove it from restartTargets"
            ),
        ))
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

    /// A credential path another pipeline claimed first, reached by `path` (a credential path,
    /// or a policy path that matches it).
    fn other_tenant(&self, path: &str, exact: bool) -> Outcome {
        let Some(claims) = self.ctx.claims else {
            return Ok(());
        };
        let ours = |owner: &Claimant| {
            owner.namespace == self.ctx.namespace && owner.pipeline == self.ctx.pipeline
        };
        let found = if exact {
            claims.owner(path).filter(|o| !ours(o)).map(|o| (path, o))
        } else {
            let literal = &path[..path.find(['+', '*']).unwrap_or(path.len())];
            claims.find_under(literal, |claimed, owner| {
                !ours(owner) && vault_path::matches(path, claimed)
            })
        };
        match found {
            None => Ok(()),
            Some((claimed, owner)) => Err((
                Reason::CrossTenantCredential,
                format!(
                    "{claimed} issues the credentials of pipeline {owner}, which claimed it first; a credential path belongs to one pipeline cluster-wide. Ask the Vault team for a role of this pipeline's own"
                ),
            )),
        }
    }

    fn decide_vault_path(&self, path: &str, capability: VaultCapability) -> Outcome {
        floor::vault_path(path, capability)?;
        self.other_tenant(path, false)?;
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

    /// A credential Secret another pipeline of the namespace claimed first: delivering to it
    /// would give this stage RBAC on the other pipeline's credentials.
    fn foreign_secret(&self, secret_name: &str) -> Outcome {
        let owner = self
            .ctx
            .claims
            .and_then(|c| c.secret_owner(self.ctx.namespace, secret_name))
            .filter(|o| o.pipeline != self.ctx.pipeline);
        match owner {
            None => Ok(()),
            Some(owner) => Err((
                Reason::CrossTenantCredential,
                format!(
                    "Secret {secret_name:?} receives the credentials of pipeline {owner}, which claimed it first; choose a secretName of this pipeline's own"
                ),
            )),
        }
    }

    fn decide_credential(&self, path: &str, secret_name: &str, ttl_seconds: u64) -> Outcome {
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
        self.other_tenant(path, true)?;
        self.foreign_secret(secret_name)?;
        self.cluster_secret(secret_name)?;
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
