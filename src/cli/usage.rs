//! `portcullis usage NAME -n NS`: per stage, what it was granted and what it used (from
//! `status.stages[].usage`, which runtime access records keep); `--suggest` prints the spec
//! narrowed to what was used.

use std::collections::BTreeMap;
use std::io::Write;

use super::{EXIT_ALLOWED, EXIT_FAILURE, EXIT_INVALID};
use crate::api::{AIPipeline, AIPipelineSpec, GrantUsage, PermissionRule, Stage, VaultPathRule};

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// The AIPipeline.
    pub name: String,

    /// The pipeline's namespace (default: the namespace of the kubeconfig's context).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,

    /// Print the AIPipeline with the grants its stages did not use removed, as YAML ready to
    /// commit. Only grants the status shows as unused are removed: a stage without recorded
    /// usage keeps everything.
    #[arg(long)]
    pub suggest: bool,

    #[command(flatten)]
    pub kube: super::kubeconfig::KubeArgs,
}

/// Runs `usage`; returns the exit code.
pub fn run(args: &UsageArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let pipeline = runtime.block_on(async {
        let (client, context_namespace) = args.kube.client().await?;
        let ns = args.namespace.clone().unwrap_or(context_namespace);
        let api: kube::Api<AIPipeline> = kube::Api::namespaced(client, &ns);
        api.get(&args.name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => format!(
                "AIPipeline {ns}/{} not found; check the name and -n",
                args.name
            ),
            e => format!("cannot read AIPipeline {ns}/{}: {e}", args.name),
        })
    });
    let pipeline = match pipeline {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let mut out = std::io::stdout().lock();
    let written = if args.suggest {
        write_suggestion(&pipeline, &mut out)
    } else {
        write_table(&pipeline, &mut out)
    };
    if written.is_err() {
        return EXIT_FAILURE;
    }
    EXIT_ALLOWED
}

fn usage_of<'a>(pipeline: &'a AIPipeline, stage: &str) -> &'a [GrantUsage] {
    pipeline
        .status
        .as_ref()
        .and_then(|s| s.stages.iter().find(|s| s.name == stage))
        .map_or(&[], |s| s.usage.as_slice())
}

/// Granted vs used, per stage.
pub fn write_table(pipeline: &AIPipeline, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16} {:<48} {:<5} {:>8}  LAST USED",
        "STAGE", "GRANT", "USED", "COUNT"
    )?;
    for stage in &pipeline.spec.stages {
        let usage = usage_of(pipeline, &stage.name);
        if usage.is_empty() {
            writeln!(
                out,
                "{:<16} (no usage recorded: runtime access records are off, or the stage has made no request yet)",
                stage.name
            )?;
            continue;
        }
        for u in usage {
            writeln!(
                out,
                "{:<16} {:<48} {:<5} {:>8}  {}",
                stage.name,
                u.grant,
                if u.used { "yes" } else { "no" },
                u.count,
                u.last_used.as_deref().unwrap_or("-")
            )?;
        }
    }
    Ok(())
}

/// Whether the status shows the grant named `text` as unused (an entry, with `used: false`).
fn unused(usage: &[GrantUsage], text: &str) -> bool {
    usage.iter().any(|u| u.grant == text && !u.used)
}

fn kubernetes_text(verb: &str, resource: &str, group: &str, names: &[String]) -> String {
    crate::policy::Item::Kubernetes {
        api_group: group.to_string(),
        resource: resource.to_string(),
        verb: verb.to_string(),
        resource_names: names.to_vec(),
    }
    .to_string()
}

/// `rule` without the verbs (per resource and group) and names the status shows as unused.
fn narrow_rule(
    rule: &PermissionRule,
    usage: &[GrantUsage],
    removed: &mut Vec<String>,
) -> Vec<PermissionRule> {
    // (resource, names) -> verbs kept; rules are rebuilt from it, keeping the rule's groups.
    let mut kept: BTreeMap<(String, Vec<String>), Vec<String>> = BTreeMap::new();
    for resource in &rule.resources {
        for verb in &rule.verbs {
            let every_group_unused = |names: &[String]| {
                rule.api_groups
                    .iter()
                    .all(|g| unused(usage, &kubernetes_text(verb, resource, g, names)))
            };
            let known = |names: &[String]| {
                rule.api_groups.iter().any(|g| {
                    let text = kubernetes_text(verb, resource, g, names);
                    usage.iter().any(|u| u.grant == text)
                })
            };
            let names: Vec<String> =
                if rule.resource_names.len() > 1 && !known(&rule.resource_names) {
                    // Planned per name (Secrets): keep the names not shown unused.
                    rule.resource_names
                        .iter()
                        .filter(|n| !every_group_unused(std::slice::from_ref(n)))
                        .cloned()
                        .collect()
                } else if every_group_unused(&rule.resource_names) {
                    Vec::new()
                } else {
                    rule.resource_names.clone()
                };
            if names.is_empty() && (!rule.resource_names.is_empty() || every_group_unused(&[])) {
                removed.push(kubernetes_text(
                    verb,
                    resource,
                    &rule.api_groups.join(","),
                    &rule.resource_names,
                ));
                continue;
            }
            if names.len() < rule.resource_names.len() {
                removed.push(format!("{verb} {resource} of names not used"));
            }
            kept.entry((resource.clone(), names))
                .or_default()
                .push(verb.clone());
        }
    }
    // Resources with the same names and verbs share a rule.
    let mut merged: BTreeMap<(Vec<String>, Vec<String>), Vec<String>> = BTreeMap::new();
    for ((resource, names), verbs) in kept {
        merged.entry((names, verbs)).or_default().push(resource);
    }
    merged
        .into_iter()
        .map(|((names, verbs), resources)| PermissionRule {
            api_groups: rule.api_groups.clone(),
            resources,
            resource_names: names,
            verbs,
        })
        .collect()
}

fn narrow_vault(
    rule: &VaultPathRule,
    usage: &[GrantUsage],
    removed: &mut Vec<String>,
) -> Option<VaultPathRule> {
    let capabilities: Vec<_> = rule
        .capabilities
        .iter()
        .copied()
        .filter(|c| {
            let text = format!("vault {} {}", c.as_str(), rule.path);
            let drop = unused(usage, &text);
            if drop {
                removed.push(text);
            }
            !drop
        })
        .collect();
    (!capabilities.is_empty()).then(|| VaultPathRule {
        path: rule.path.clone(),
        capabilities,
    })
}

/// The stage without the grants its usage shows as unused.
pub fn narrow_stage(stage: &Stage, usage: &[GrantUsage], removed: &mut Vec<String>) -> Stage {
    let mut narrowed = stage.clone();
    narrowed.permissions = stage
        .permissions
        .iter()
        .flat_map(|r| narrow_rule(r, usage, removed))
        .collect();
    if let Some(vault) = narrowed.vault.as_mut() {
        vault.policies = vault
            .policies
            .iter()
            .filter_map(|r| narrow_vault(r, usage, removed))
            .collect();
    }
    narrowed
}

/// The narrowed AIPipeline as YAML, with a comment saying what was removed.
pub fn write_suggestion(pipeline: &AIPipeline, out: &mut dyn Write) -> std::io::Result<()> {
    let mut removed_by_stage = Vec::new();
    let stages = pipeline
        .spec
        .stages
        .iter()
        .map(|s| {
            let mut removed = Vec::new();
            let narrowed = narrow_stage(s, usage_of(pipeline, &s.name), &mut removed);
            removed_by_stage.push((
                s.name.clone(),
                removed,
                usage_of(pipeline, &s.name).is_empty(),
            ));
            narrowed
        })
        .collect();
    let mut narrowed = AIPipeline::new(
        pipeline.metadata.name.as_deref().unwrap_or_default(),
        AIPipelineSpec { stages },
    );
    narrowed.metadata.namespace = pipeline.metadata.namespace.clone();
    narrowed.metadata.labels = pipeline.metadata.labels.clone();
    writeln!(
        out,
        "# {} narrowed to the grants its stages used (kubectl portcullis usage --suggest).",
        pipeline.metadata.name.as_deref().unwrap_or_default()
    )?;
    for (stage, removed, no_usage) in &removed_by_stage {
        if *no_usage {
            writeln!(out, "# stage {stage}: no usage recorded; kept as it is")?;
        } else if removed.is_empty() {
            writeln!(out, "# stage {stage}: every grant was used; kept as it is")?;
        } else {
            writeln!(out, "# stage {stage}: removed {}", removed.join("; "))?;
        }
    }
    let yaml = serde_saphyr::to_string(&narrowed).map_err(std::io::Error::other)?;
    out.write_all(yaml.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(grant: &str, used: bool) -> GrantUsage {
        GrantUsage {
            grant: grant.into(),
            used,
            count: u64::from(used),
            last_used: None,
        }
    }

    fn stage() -> Stage {
        serde_json::from_value(serde_json::json!({
            "name": "ingest",
            "role": "Ingestion",
            "permissions": [
                {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["ingest-config"], "verbs": ["get", "watch"]},
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["a", "b"], "verbs": ["get"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]},
            ],
            "vault": {"policies": [{"path": "kv/data/x/*", "capabilities": ["read", "list"]}]},
        }))
        .unwrap()
    }

    #[test]
    fn only_grants_shown_unused_are_removed() {
        let usage = vec![
            used("get configmaps/ingest-config", true),
            used("watch configmaps/ingest-config", false),
            used("get secrets/a", true),
            used("get secrets/b", false),
            // deployments: no entry (the list was cut at 64): kept.
            used("vault read kv/data/x/*", true),
            used("vault list kv/data/x/*", false),
        ];
        let mut removed = Vec::new();
        let narrowed = narrow_stage(&stage(), &usage, &mut removed);
        let rules: Vec<(Vec<String>, Vec<String>, Vec<String>)> = narrowed
            .permissions
            .iter()
            .map(|r| {
                (
                    r.resources.clone(),
                    r.resource_names.clone(),
                    r.verbs.clone(),
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rules,
            vec![
                (s(&["configmaps"]), s(&["ingest-config"]), s(&["get"])),
                (s(&["secrets"]), s(&["a"]), s(&["get"])),
                (s(&["deployments"]), vec![], s(&["list"])),
            ]
        );
        let vault = &narrowed.vault.as_ref().unwrap().policies;
        assert_eq!(vault.len(), 1);
        assert_eq!(
            vault[0].capabilities,
            vec![crate::api::VaultCapability::Read]
        );
        assert!(
            removed.iter().any(|r| r.contains("watch configmaps")),
            "{removed:?}"
        );
    }

    #[test]
    fn a_stage_without_usage_keeps_everything() {
        let mut removed = Vec::new();
        assert_eq!(narrow_stage(&stage(), &[], &mut removed), stage());
        assert!(removed.is_empty());
    }
}
