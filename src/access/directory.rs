//! Which identities are managed stages, and what each was granted.
//!
//! The reconciler keeps it up to date: each plan replaces its pipeline's stages
//! ([`Directory::set_pipeline`]), a deleted pipeline's go ([`Directory::retain_pipelines`]). An
//! audit event is dropped unless its user is a key here: one hash lookup under a read lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::api::{AIPipelineStatus, GrantUsage};
use crate::plan::Plan;
use crate::policy::Item;

use super::{Observation, Source};

/// One granted permission: a verb on a resource (Kubernetes), or a capability on a path
/// (Vault).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    pub source: Source,
    /// The API group; empty for the core group and for Vault.
    pub api_group: String,
    /// The resource (`pods/log` with a subresource), or the Vault path pattern.
    pub resource: String,
    /// The verb, or the Vault capability.
    pub verb: String,
    pub resource_names: Vec<String>,
    /// As the decision log names the grant, such as `get configmaps/ingest-config`.
    pub text: String,
}

impl Grant {
    /// Whether this grant allows `obs`.
    pub fn covers(&self, obs: &Observation) -> bool {
        if self.source != obs.source {
            return false;
        }
        match self.source {
            Source::Kubernetes => {
                (self.verb == obs.verb || self.verb == "*")
                    && (self.api_group == obs.api_group || self.api_group == "*")
                    && (self.resource == obs.full_resource() || self.resource == "*")
                    && (self.resource_names.is_empty()
                        || obs
                            .name
                            .as_ref()
                            .is_some_and(|n| self.resource_names.contains(n)))
            }
            Source::Vault => {
                self.verb == obs.verb
                    && crate::access::vault_audit::path_matches(&self.resource, &obs.resource)
            }
        }
    }

    /// How close this grant comes to covering `obs`, higher is closer; 0 is not at all.
    pub fn closeness(&self, obs: &Observation) -> u8 {
        if self.source != obs.source {
            return 0;
        }
        let same_resource = match self.source {
            Source::Kubernetes => {
                self.api_group == obs.api_group && self.resource == obs.full_resource()
            }
            Source::Vault => {
                crate::access::vault_audit::path_matches(&self.resource, &obs.resource)
            }
        };
        let same_verb = self.verb == obs.verb;
        match (same_resource, same_verb) {
            (true, true) => 3,
            (true, false) => 2,
            (false, true) => 1,
            (false, false) => 0,
        }
    }
}

/// A managed stage's identity and grants.
#[derive(Debug, Clone, PartialEq)]
pub struct StageInfo {
    pub namespace: String,
    pub pipeline: String,
    pub pipeline_uid: String,
    pub stage: String,
    /// The username its requests carry, `system:serviceaccount:<namespace>:<name>`.
    pub user: String,
    /// The ServiceAccount's name.
    pub service_account: String,
    /// What was granted (allowed decisions), in plan order.
    pub grants: Vec<Grant>,
    /// Usage as the status last showed it, to continue counting from after a restart.
    pub seed: Vec<GrantUsage>,
}

impl StageInfo {
    /// The stages of `plan`, with what they were granted; `status` seeds their usage.
    pub fn from_plan(
        plan: &Plan,
        pipeline_uid: &str,
        status: Option<&AIPipelineStatus>,
    ) -> Vec<StageInfo> {
        plan.stages
            .iter()
            .map(|summary| {
                let grants = plan
                    .decisions
                    .iter()
                    .filter(|d| d.stage == summary.name && d.is_allowed())
                    .filter_map(|d| grant(&d.item))
                    .collect();
                let seed = status
                    .and_then(|s| s.stages.iter().find(|s| s.name == summary.name))
                    .map(|s| s.usage.clone())
                    .unwrap_or_default();
                StageInfo {
                    namespace: plan.namespace.clone(),
                    pipeline: plan.pipeline.clone(),
                    pipeline_uid: pipeline_uid.to_string(),
                    stage: summary.name.clone(),
                    user: format!(
                        "{}{}:{}",
                        super::kube_audit::SERVICE_ACCOUNT_PREFIX,
                        plan.namespace,
                        summary.service_account
                    ),
                    service_account: summary.service_account.clone(),
                    grants,
                    seed,
                }
            })
            .collect()
    }

    /// The grant that covers `obs`, if any.
    pub fn covering(&self, obs: &Observation) -> Option<(usize, &Grant)> {
        // Kubernetes grants are in the pipeline's own namespace only.
        if obs.source == Source::Kubernetes && obs.namespace.as_deref() != Some(&self.namespace) {
            return None;
        }
        self.grants.iter().enumerate().find(|(_, g)| g.covers(obs))
    }

    /// The grant that comes closest to covering `obs` (none when none is near).
    pub fn closest(&self, obs: &Observation) -> Option<&Grant> {
        self.grants
            .iter()
            .map(|g| (g.closeness(obs), g))
            .filter(|(c, _)| *c > 0)
            .max_by_key(|(c, _)| *c)
            .map(|(_, g)| g)
    }
}

fn grant(item: &Item) -> Option<Grant> {
    match item {
        Item::Kubernetes {
            api_group,
            resource,
            verb,
            resource_names,
        } => Some(Grant {
            source: Source::Kubernetes,
            api_group: api_group.clone(),
            resource: resource.clone(),
            verb: verb.clone(),
            resource_names: resource_names.clone(),
            text: item.to_string(),
        }),
        Item::VaultPath { path, capability } => Some(Grant {
            source: Source::Vault,
            api_group: String::new(),
            resource: path.clone(),
            verb: capability.as_str().to_string(),
            resource_names: Vec::new(),
            text: item.to_string(),
        }),
        _ => None,
    }
}

/// The managed stages by username (and, for Vault, by ServiceAccount).
#[derive(Debug, Default)]
pub struct Directory {
    by_user: RwLock<HashMap<String, Arc<StageInfo>>>,
}

impl Directory {
    /// The stage whose identity is `user`, if it is one.
    pub fn lookup(&self, user: &str) -> Option<Arc<StageInfo>> {
        self.by_user
            .read()
            .expect("directory lock")
            .get(user)
            .cloned()
    }

    /// Replaces the stages of the pipeline `uid` with `stages`. Unchanged stages keep their
    /// entry (so a reconcile that changes nothing changes nothing here).
    pub fn set_pipeline(&self, uid: &str, stages: Vec<StageInfo>) {
        let mut by_user = self.by_user.write().expect("directory lock");
        let users: HashSet<&str> = stages.iter().map(|s| s.user.as_str()).collect();
        by_user.retain(|user, s| s.pipeline_uid != uid || users.contains(user.as_str()));
        for stage in stages {
            match by_user.get(&stage.user) {
                // Another pipeline's stage of the same name (refused at adoption): the first
                // keeps it.
                Some(old) if old.pipeline_uid != uid => {}
                Some(old) if **old == stage => {}
                _ => {
                    by_user.insert(stage.user.clone(), Arc::new(stage));
                }
            }
        }
    }

    /// Forgets the stages of pipelines whose uid is not in `live`.
    pub fn retain_pipelines(&self, live: &HashSet<String>) {
        self.by_user
            .write()
            .expect("directory lock")
            .retain(|_, s| live.contains(&s.pipeline_uid));
    }

    /// Every stage, for usage reports.
    pub fn stages(&self) -> Vec<Arc<StageInfo>> {
        self.by_user
            .read()
            .expect("directory lock")
            .values()
            .cloned()
            .collect()
    }

    /// The stage of the ServiceAccount `name` in `namespace`.
    pub fn by_service_account(&self, namespace: &str, name: &str) -> Option<Arc<StageInfo>> {
        self.lookup(&format!(
            "{}{namespace}:{name}",
            super::kube_audit::SERVICE_ACCOUNT_PREFIX
        ))
    }

    pub fn len(&self) -> usize {
        self.by_user.read().expect("directory lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
