//! `portcullis can-i`: what a pipeline stage's ServiceAccount may do, as the API server's RBAC
//! authorizer answers it, planned against effective, per stage:
//!
//! - every planned grant, asked with a SubjectAccessReview: one the cluster refuses is planned
//!   but not effective (not applied yet, or taken away);
//! - a matrix of dangerous requests, none of which may be allowed;
//! - the rules the cluster grants the ServiceAccount in the namespace (a SelfSubjectRulesReview
//!   made as the ServiceAccount, by impersonation) that the plan does not: effective but not
//!   planned, a grant made outside Portcullis (someone else's RoleBinding), with the bindings
//!   that reach the ServiceAccount.

use std::collections::BTreeMap;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, ResourceRule, SelfSubjectRulesReview, SelfSubjectRulesReviewSpec,
    SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, Subject};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Serialize;

use crate::api::{AIPipeline, AccessGuardrail};
use crate::plan;
use crate::policy::Item;

#[derive(Debug, clap::Args)]
pub(crate) struct CanIArgs {
    /// The AIPipeline.
    pub pipeline: String,

    /// Only this stage.
    #[arg(long)]
    pub stage: Option<String>,

    /// The pipeline's namespace (default: the namespace of the kubeconfig's context).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,

    /// `table` for people, `json` for tools.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: CanIOutput,

    #[command(flatten)]
    pub kube: super::kubeconfig::KubeArgs,
}

/// How `can-i` writes its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CanIOutput {
    Table,
    Json,
}

/// One access question: may the subject `verb` the `resource` (`/subresource`), optionally the
/// object `name`, in `namespace` (None: cluster-wide)?
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

impl Check {
    fn new(verb: &str, group: &str, resource: &str, namespace: Option<&str>) -> Check {
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, s)) => (r.to_string(), Some(s.to_string())),
            None => (resource.to_string(), None),
        };
        Check {
            verb: verb.into(),
            group: group.into(),
            resource,
            subresource,
            name: None,
            namespace: namespace.map(Into::into),
        }
    }

    fn named(mut self, name: &str) -> Check {
        self.name = Some(name.into());
        self
    }

    /// `get secrets/db in ml-fraud`
    pub(crate) fn describe(&self) -> String {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        let sub = self
            .subresource
            .as_deref()
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        let name = self
            .name
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        let scope = self
            .namespace
            .as_deref()
            .map(|n| format!(" in {n}"))
            .unwrap_or_else(|| " cluster-wide".into());
        format!("{} {}{group}{sub}{name}{scope}", self.verb, self.resource)
    }
}

/// Requests no stage may make: other stages' Secrets, escalation, exec, cluster-scoped reads,
/// other namespaces, impersonation, token minting.
pub(crate) fn forbidden(namespace: &str, other_stages_secrets: &[String]) -> Vec<Check> {
    let ns = Some(namespace);
    let mut checks = vec![
        Check::new("list", "", "secrets", ns),
        Check::new("get", "", "secrets", ns),
        Check::new("escalate", "rbac.authorization.k8s.io", "roles", ns),
        Check::new("bind", "rbac.authorization.k8s.io", "roles", ns),
        Check::new("create", "rbac.authorization.k8s.io", "rolebindings", ns),
        Check::new("create", "", "pods/exec", ns),
        Check::new("create", "", "pods/portforward", ns),
        Check::new("create", "", "serviceaccounts/token", ns),
        Check::new("impersonate", "", "serviceaccounts", ns),
        Check::new("list", "", "nodes", None),
        Check::new("list", "", "namespaces", None),
        Check::new("get", "", "configmaps", Some("kube-system")),
    ];
    checks.extend(
        other_stages_secrets
            .iter()
            .map(|s| Check::new("get", "", "secrets", ns).named(s)),
    );
    checks
}

/// Asks the API server whether ServiceAccount `namespace/service_account` may do `check`.
pub(crate) async fn allowed(
    client: &Client,
    namespace: &str,
    service_account: &str,
    check: &Check,
) -> kube::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{namespace}:{service_account}"
            )),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(check.verb.clone()),
                group: Some(check.group.clone()),
                resource: Some(check.resource.clone()),
                subresource: check.subresource.clone(),
                name: check.name.clone(),
                namespace: check.namespace.clone(),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// One question and the cluster's answer.
#[derive(Debug, Serialize)]
struct Answer {
    access: String,
    allowed: bool,
}

/// A rule the cluster grants and the plan does not (only the resources of it not planned).
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ForeignRule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    pub verbs: Vec<String>,
}

impl ForeignRule {
    /// `get,list,watch pods,configmaps` (`.group` when not core, `/names` when named).
    fn describe(&self) -> String {
        let groups: Vec<&str> = self
            .api_groups
            .iter()
            .filter(|g| !g.is_empty())
            .map(String::as_str)
            .collect();
        let group = if groups.is_empty() {
            String::new()
        } else {
            format!(" in group {}", groups.join(","))
        };
        let names = if self.resource_names.is_empty() {
            String::new()
        } else {
            format!(" named {}", self.resource_names.join(","))
        };
        format!(
            "{} {}{names}{group}",
            self.verbs.join(","),
            self.resources.join(",")
        )
    }
}

/// Planned against effective access of one stage.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StageReport {
    stage: String,
    service_account: String,
    /// Every planned grant, with whether the cluster allows it.
    planned: Vec<Answer>,
    /// The planned grants the cluster refuses: not applied yet, or taken away.
    planned_not_effective: Vec<String>,
    /// What the cluster grants the ServiceAccount in the namespace beyond the plan.
    effective_not_planned: Vec<ForeignRule>,
    /// Bindings other than Portcullis's that reach the ServiceAccount (by name or group).
    foreign_bindings: Vec<String>,
    /// The dangerous requests, with whether the cluster allows them (it must not).
    forbidden: Vec<Answer>,
    /// The API server's rules review was incomplete (an authorizer that cannot list rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    rules_incomplete: Option<String>,
}

impl StageReport {
    fn agrees(&self) -> bool {
        self.planned_not_effective.is_empty()
            && self.effective_not_planned.is_empty()
            && self.forbidden.iter().all(|a| !a.allowed)
    }
}

#[derive(Debug, Serialize)]
struct Report {
    namespace: String,
    pipeline: String,
    /// Whether the cluster grants exactly what the plan allows, for these checks.
    agrees: bool,
    stages: Vec<StageReport>,
}

/// Runs `can-i`; exit 0 when the API server agrees with the plan, 1 when it does not, 2 when
/// the pipeline cannot be read.
pub(crate) fn run(args: &CanIArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return super::EXIT_FAILURE;
        }
    };
    runtime.block_on(async {
        match check_pipeline(args).await {
            Ok(report) => {
                match args.output {
                    CanIOutput::Table => print!("{}", table(&report)),
                    CanIOutput::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&report).expect("the report serializes")
                    ),
                }
                u8::from(!report.agrees)
            }
            Err(message) => {
                eprintln!("error: {message}");
                super::EXIT_INVALID
            }
        }
    })
}

fn table(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let ns = &report.namespace;
    let _ = writeln!(out, "AIPipeline {ns}/{}", report.pipeline);
    for stage in &report.stages {
        let _ = writeln!(
            out,
            "stage {} (ServiceAccount {ns}/{})",
            stage.stage, stage.service_account
        );
        for a in &stage.planned {
            let _ = writeln!(
                out,
                "  {:<5} {}{}",
                if a.allowed { "yes" } else { "NO" },
                a.access,
                if a.allowed {
                    ""
                } else {
                    "   <- granted by the plan but not by the cluster"
                }
            );
        }
        for a in &stage.forbidden {
            let _ = writeln!(
                out,
                "  {:<5} {}{}",
                if a.allowed { "YES" } else { "no" },
                a.access,
                if a.allowed {
                    "   <- must not be allowed"
                } else {
                    ""
                }
            );
        }
        if stage.effective_not_planned.is_empty() {
            let _ = writeln!(out, "  effective but not planned: nothing");
        } else {
            let _ = writeln!(
                out,
                "  effective but not planned (granted outside Portcullis):"
            );
            for rule in &stage.effective_not_planned {
                let _ = writeln!(
                    out,
                    "  FOREIGN {} in {ns}   <- not in the plan",
                    rule.describe()
                );
            }
        }
        for binding in &stage.foreign_bindings {
            let _ = writeln!(out, "  reached by {binding}");
        }
        if let Some(why) = &stage.rules_incomplete {
            let _ = writeln!(out, "  (the rules review is incomplete: {why})");
        }
    }
    if report.agrees {
        let _ = writeln!(
            out,
            "The cluster grants exactly what the plan allows for these checks."
        );
    } else {
        let _ = writeln!(
            out,
            "The cluster does not match the plan: see the lines marked <-."
        );
    }
    out
}

/// What Kubernetes grants every authenticated user (ClusterRole `system:basic-user`): asking
/// the API server about one's own access. Not a foreign grant.
fn built_in(group: &str, resource: &str) -> bool {
    matches!(
        (group, resource),
        (
            "authorization.k8s.io",
            "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
        ) | ("authentication.k8s.io", "selfsubjectreviews")
    )
}

/// The rules of `effective` the planned grants (`planned`: group, resource, verb, names; no
/// names: every object) do not cover, each cut down to its resources not planned.
pub(crate) fn not_planned(
    effective: &[ResourceRule],
    planned: &[(String, String, String, Vec<String>)],
) -> Vec<ForeignRule> {
    let covered = |group: &str, resource: &str, verb: &str, name: Option<&str>| {
        planned.iter().any(|(g, r, v, names)| {
            g == group
                && r == resource
                && v == verb
                && (names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n)))
        })
    };
    let mut out = Vec::new();
    for rule in effective {
        let resources = rule.resources.as_deref().unwrap_or_default();
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let names = rule.resource_names.as_deref().unwrap_or_default();
        let unplanned: Vec<String> = resources
            .iter()
            .filter(|resource| {
                groups.iter().any(|group| {
                    !built_in(group, resource)
                        && rule.verbs.iter().any(|verb| {
                            if names.is_empty() {
                                !covered(group, resource, verb, None)
                            } else {
                                names
                                    .iter()
                                    .any(|n| !covered(group, resource, verb, Some(n)))
                            }
                        })
                })
            })
            .cloned()
            .collect();
        if !unplanned.is_empty() {
            out.push(ForeignRule {
                api_groups: groups.to_vec(),
                resources: unplanned,
                resource_names: names.to_vec(),
                verbs: rule.verbs.clone(),
            });
        }
    }
    out
}

/// The resource rules the cluster grants `service_account` in `namespace`: a
/// SelfSubjectRulesReview made as the ServiceAccount (the caller needs `impersonate` on it).
async fn effective_rules(
    client: &Client,
    namespace: &str,
    service_account: &str,
) -> Result<(Vec<ResourceRule>, Option<String>), String> {
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(namespace.into()),
        },
        ..SelfSubjectRulesReview::default()
    };
    let user = format!("system:serviceaccount:{namespace}:{service_account}");
    let request = hyper::Request::post("/apis/authorization.k8s.io/v1/selfsubjectrulesreviews")
        .header("Content-Type", "application/json")
        .header("Impersonate-User", &user)
        .body(serde_json::to_vec(&review).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let answer: SelfSubjectRulesReview = client.request(request).await.map_err(|e| {
        format!(
            "SelfSubjectRulesReview as {user}: {e} (reading a stage's effective access needs `impersonate` on serviceaccounts {namespace}/{service_account})"
        )
    })?;
    let status = answer.status.unwrap_or_default();
    let incomplete = status
        .incomplete
        .then(|| status.evaluation_error.clone().unwrap_or_default());
    Ok((status.resource_rules, incomplete))
}

/// Whether binding subject `s` is `namespace/service_account` or one of its groups.
fn reaches(s: &Subject, binding_namespace: Option<&str>, namespace: &str, sa: &str) -> bool {
    match s.kind.as_str() {
        "ServiceAccount" => {
            s.name == sa && s.namespace.as_deref().or(binding_namespace) == Some(namespace)
        }
        "Group" => {
            s.name == "system:serviceaccounts"
                || s.name == format!("system:serviceaccounts:{namespace}")
                || s.name == "system:authenticated"
        }
        "User" => s.name == format!("system:serviceaccount:{namespace}:{sa}"),
        _ => false,
    }
}

/// The RoleBindings of `namespace` and the ClusterRoleBindings, other than Portcullis's, that
/// reach the ServiceAccount, as `RoleBinding ns/name -> ClusterRole view`. Kubernetes's own
/// `system:` ClusterRoleBindings are left out. Empty when the caller may not list them.
async fn foreign_bindings(client: &Client, namespace: &str, sa: &str) -> Vec<String> {
    let ours = |labels: &BTreeMap<String, String>| {
        labels.get(plan::names::MANAGED_BY.0).map(String::as_str) == Some(plan::names::MANAGED_BY.1)
    };
    let mut out = Vec::new();
    if let Ok(list) = Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        for b in list.items.iter().filter(|b| !ours(b.labels())) {
            let hit = b
                .subjects
                .iter()
                .flatten()
                .any(|s| reaches(s, Some(namespace), namespace, sa));
            if hit {
                out.push(format!(
                    "RoleBinding {namespace}/{} -> {} {}",
                    b.name_any(),
                    b.role_ref.kind,
                    b.role_ref.name
                ));
            }
        }
    }
    if let Ok(list) = Api::<ClusterRoleBinding>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        for b in list
            .items
            .iter()
            .filter(|b| !ours(b.labels()) && !b.name_any().starts_with("system:"))
        {
            if b.subjects
                .iter()
                .flatten()
                .any(|s| reaches(s, None, namespace, sa))
            {
                out.push(format!(
                    "ClusterRoleBinding {} -> {} {}",
                    b.name_any(),
                    b.role_ref.kind,
                    b.role_ref.name
                ));
            }
        }
    }
    out
}

async fn check_pipeline(args: &CanIArgs) -> Result<Report, String> {
    let (client, context_namespace) = args.kube.client().await?;
    let ns = args.namespace.as_ref().unwrap_or(&context_namespace);
    let pipeline = Api::<AIPipeline>::namespaced(client.clone(), ns)
        .get(&args.pipeline)
        .await
        .map_err(|e| format!("AIPipeline {ns}/{}: {e}", args.pipeline))?;
    let guardrails = Api::<AccessGuardrail>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing AccessGuardrails: {e}"))?
        .items;
    let mut labels: BTreeMap<String, String> = Api::<Namespace>::all(client.clone())
        .get_metadata(ns)
        .await
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), ns.clone());
    // As the operator plans it: with the Secrets and restart targets the cluster holds (when
    // they can be read; else as `plan` offline would).
    let uid = pipeline.uid().unwrap_or_default();
    let facts = crate::controller::ownership::cluster_facts(&client, &pipeline, ns, &uid)
        .await
        .ok()
        // A name the caller may not look up would be refused here but not by the operator.
        .filter(crate::policy::ClusterFacts::complete);
    // Who claimed which credential path and Secret first, cluster-wide, as the operator
    // decides it (when the pipelines can be listed).
    let all = Api::<AIPipeline>::all(client.clone())
        .list(&ListParams::default())
        .await
        .ok();
    let claims = all
        .as_ref()
        .map(|list| crate::policy::CredentialClaims::from_pipelines(&list.items, ns));
    let options = plan::PlanOptions {
        cluster: facts.as_ref(),
        claims: claims.as_ref(),
        ..plan::PlanOptions::default()
    };
    let plan = plan::validate_and_build_with(&pipeline, ns, &labels, &guardrails, options)
        .map_err(|errors| {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            format!(
                "AIPipeline {ns}/{} is invalid: {}",
                args.pipeline,
                errors.join("; ")
            )
        })?;

    let mut stages = Vec::new();
    for stage in plan
        .stages
        .iter()
        .filter(|s| args.stage.as_deref().is_none_or(|n| n == s.name))
    {
        stages.push(check_stage(&client, ns, &plan, stage).await?);
    }
    Ok(Report {
        namespace: ns.clone(),
        pipeline: args.pipeline.clone(),
        agrees: stages.iter().all(StageReport::agrees),
        stages,
    })
}

async fn check_stage(
    client: &Client,
    ns: &str,
    plan: &plan::Plan,
    stage: &plan::StageSummary,
) -> Result<StageReport, String> {
    let sa = &stage.service_account;
    let mut planned_grants = Vec::new();
    let mut planned = Vec::new();
    for d in plan
        .decisions
        .iter()
        .filter(|d| d.stage == stage.name && d.is_allowed())
    {
        let Item::Kubernetes {
            api_group,
            resource,
            verb,
            resource_names,
        } = &d.item
        else {
            continue;
        };
        planned_grants.push((
            api_group.clone(),
            resource.clone(),
            verb.clone(),
            resource_names.clone(),
        ));
        let base = Check::new(verb, api_group, resource, Some(ns));
        let checks: Vec<Check> = if resource_names.is_empty() {
            vec![base]
        } else {
            resource_names
                .iter()
                .map(|n| base.clone().named(n))
                .collect()
        };
        for check in checks {
            let yes = allowed(client, ns, sa, &check)
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?;
            planned.push(Answer {
                access: check.describe(),
                allowed: yes,
            });
        }
    }
    let others: Vec<String> = plan
        .vault
        .credentials
        .iter()
        .filter(|c| c.stage != stage.name)
        .map(|c| c.secret_name.clone())
        .collect();
    let mut forbidden_answers = Vec::new();
    for check in forbidden(ns, &others) {
        let yes = allowed(client, ns, sa, &check)
            .await
            .map_err(|e| format!("SubjectAccessReview: {e}"))?;
        forbidden_answers.push(Answer {
            access: check.describe(),
            allowed: yes,
        });
    }
    let (rules, rules_incomplete) = effective_rules(client, ns, sa).await?;
    Ok(StageReport {
        stage: stage.name.clone(),
        service_account: sa.clone(),
        planned_not_effective: planned
            .iter()
            .filter(|a| !a.allowed)
            .map(|a| a.access.clone())
            .collect(),
        planned,
        effective_not_planned: not_planned(&rules, &planned_grants),
        foreign_bindings: foreign_bindings(client, ns, sa).await,
        forbidden: forbidden_answers,
        rules_incomplete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]) -> ResourceRule {
        let v = |x: &[&str]| Some(x.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        ResourceRule {
            api_groups: v(groups),
            resources: v(resources),
            resource_names: (!names.is_empty()).then(|| v(names).unwrap_or_default()),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_what_the_plan_does_not_grant_is_foreign() {
        let planned = vec![
            (
                "".to_string(),
                "configmaps".to_string(),
                "get".to_string(),
                vec!["params".to_string()],
            ),
            (
                "".to_string(),
                "pods".to_string(),
                "get".to_string(),
                vec![],
            ),
        ];
        let effective = vec![
            // The plan's own Role.
            rule(&[""], &["configmaps"], &["get"], &["params"]),
            rule(&[""], &["pods"], &["get"], &[]),
            // Every authenticated user's.
            rule(
                &["authorization.k8s.io"],
                &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                &["create"],
                &[],
            ),
            // `view`, bound by hand: only its resources beyond the plan.
            rule(
                &[""],
                &["pods", "configmaps", "services"],
                &["get", "list"],
                &[],
            ),
        ];
        let foreign = not_planned(&effective, &planned);
        assert_eq!(
            foreign,
            vec![ForeignRule {
                api_groups: vec![String::new()],
                resources: vec!["pods".into(), "configmaps".into(), "services".into()],
                resource_names: vec![],
                verbs: vec!["get".into(), "list".into()],
            }]
        );
        assert_eq!(foreign[0].describe(), "get,list pods,configmaps,services");
        // A named grant wider than the plan's names is foreign too.
        let wider = vec![rule(&[""], &["configmaps"], &["get"], &["params", "other"])];
        assert_eq!(not_planned(&wider, &planned).len(), 1);
        assert!(not_planned(&effective[..3], &planned).is_empty());
    }
}
