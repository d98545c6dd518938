//! `portcullis can-i`: what a pipeline stage's ServiceAccount may do, as the API server's RBAC
//! authorizer answers it (SubjectAccessReview). Every planned grant should be allowed and
//! nothing of a matrix of dangerous requests should be.

use std::collections::BTreeMap;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

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

    #[command(flatten)]
    pub kube: super::kubeconfig::KubeArgs,
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
            Ok(true) => 0,
            Ok(false) => 1,
            Err(message) => {
                eprintln!("error: {message}");
                super::EXIT_INVALID
            }
        }
    })
}

async fn check_pipeline(args: &CanIArgs) -> Result<bool, String> {
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
    let plan = plan::validate_and_build(&pipeline, ns, &labels, &guardrails).map_err(|errors| {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        format!(
            "AIPipeline {ns}/{} is invalid: {}",
            args.pipeline,
            errors.join("; ")
        )
    })?;

    let mut agrees = true;
    for stage in plan
        .stages
        .iter()
        .filter(|s| args.stage.as_deref().is_none_or(|n| n == s.name))
    {
        let sa = &stage.service_account;
        println!("stage {} (ServiceAccount {ns}/{sa})", stage.name);
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
                let yes = allowed(&client, ns, sa, &check)
                    .await
                    .map_err(|e| format!("SubjectAccessReview: {e}"))?;
                agrees &= yes;
                println!(
                    "  {:<5} {}{}",
                    if yes { "yes" } else { "NO" },
                    check.describe(),
                    if yes {
                        ""
                    } else {
                        "   <- granted by the plan but not by the cluster"
                    }
                );
            }
        }
        let others: Vec<String> = plan
            .vault
            .credentials
            .iter()
            .filter(|c| c.stage != stage.name)
            .map(|c| c.secret_name.clone())
            .collect();
        for check in forbidden(ns, &others) {
            let yes = allowed(&client, ns, sa, &check)
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?;
            agrees &= !yes;
            println!(
                "  {:<5} {}{}",
                if yes { "YES" } else { "no" },
                check.describe(),
                if yes { "   <- must not be allowed" } else { "" }
            );
        }
    }
    if agrees {
        println!("The cluster grants exactly what the plan allows for these checks.");
    } else {
        println!("The cluster does not match the plan: see the lines marked <-.");
    }
    Ok(agrees)
}
