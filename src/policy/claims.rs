//! Cluster-wide ownership of dynamic-credential paths: a Vault path that issues credentials
//! belongs to one pipeline, the first to claim it. Pure: the controller (or `plan` offline)
//! gathers the pipelines and passes them in; this module only decides.

use std::collections::BTreeMap;

use crate::api::AIPipeline;

/// A pipeline that claims a credential path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claimant {
    pub namespace: String,
    pub pipeline: String,
}

impl std::fmt::Display for Claimant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.pipeline)
    }
}

/// Which pipeline owns each credential path, cluster-wide, and each credential Secret, per
/// namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CredentialClaims {
    owners: BTreeMap<String, Claimant>,
    /// (namespace, Secret name) -> the pipeline whose credentials it receives.
    secrets: BTreeMap<(String, String), Claimant>,
}

impl CredentialClaims {
    /// The claims of `pipelines`: each credential path is owned by the pipeline that was created
    /// first (`metadata.creationTimestamp`; pipelines without one, as in files, come after, and
    /// ties go by namespace, then name). The order of `pipelines` does not matter.
    pub fn from_pipelines<'a>(
        pipelines: impl IntoIterator<Item = &'a AIPipeline>,
        default_namespace: &str,
    ) -> CredentialClaims {
        let mut ordered: Vec<(Option<_>, Claimant, &AIPipeline)> = pipelines
            .into_iter()
            .map(|p| {
                let claimant = Claimant {
                    namespace: p
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| default_namespace.to_string()),
                    pipeline: p.metadata.name.clone().unwrap_or_default(),
                };
                (
                    p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    claimant,
                    p,
                )
            })
            .collect();
        ordered.sort_by(|a, b| match (&a.0, &b.0) {
            (Some(x), Some(y)) => x.cmp(y).then_with(|| a.1.cmp(&b.1)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.1.cmp(&b.1),
        });
        let mut owners = BTreeMap::new();
        let mut secrets = BTreeMap::new();
        for (_, claimant, pipeline) in ordered {
            for stage in &pipeline.spec.stages {
                for cred in stage.vault.iter().flat_map(|v| &v.credentials) {
                    owners
                        .entry(cred.path.clone())
                        .or_insert_with(|| claimant.clone());
                    secrets
                        .entry((claimant.namespace.clone(), cred.secret_name.clone()))
                        .or_insert_with(|| claimant.clone());
                }
            }
        }
        CredentialClaims { owners, secrets }
    }

    /// The pipeline whose credentials Secret `name` in `namespace` receives, if any claims it.
    pub fn secret_owner(&self, namespace: &str, name: &str) -> Option<&Claimant> {
        self.secrets.get(&(namespace.to_string(), name.to_string()))
    }

    /// The owner of credential path `path`, if any pipeline claims it.
    pub fn owner(&self, path: &str) -> Option<&Claimant> {
        self.owners.get(path)
    }

    /// The first claimed credential path (and its owner) that `matches` accepts, among the paths
    /// that start with `literal_prefix` (the part of a Vault ACL path before its first glob).
    pub(crate) fn find_under(
        &self,
        literal_prefix: &str,
        matches: impl Fn(&str, &Claimant) -> bool,
    ) -> Option<(&str, &Claimant)> {
        self.owners
            .range(literal_prefix.to_string()..)
            .take_while(|(path, _)| path.starts_with(literal_prefix))
            .find(|(path, owner)| matches(path, owner))
            .map(|(path, owner)| (path.as_str(), owner))
    }

    /// How many paths are claimed.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}
