//! Which identities are managed stages, and what each was granted.
//!
//! The reconciler keeps it up to date: each plan replaces its pipeline's stages
//! ([`Directory::set_pipeline`]), a deleted pipeline's go ([`Directory::retain_pipelines`]). An
//! audit event is dropped unless its user is a key here: one hash lookup under a read lock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

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
    /// `usageSince` as the status last showed it: the learning window's start.
    pub seed_since: Option<DateTime<Utc>>,
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
                let persisted =
                    status.and_then(|s| s.stages.iter().find(|s| s.name == summary.name));
                let seed = persisted.map(|s| s.usage.clone()).unwrap_or_default();
                let seed_since = persisted
                    .and_then(|s| s.usage_since.as_deref())
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
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
                    seed_since,
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
    changes: Mutex<Changes>,
}

/// What changed in the directory since [`Directory::take_changes`] was last called, for the
/// runtime side to forget removed stages and rewrite the usage of their pipelines.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Stages that are gone: removed from their pipeline, or their pipeline deleted.
    pub removed: Vec<Arc<StageInfo>>,
    /// Pipelines (uids) whose `status.stages[].usage` names a stage they no longer have, or lost
    /// a stage: their usage is to be written again, without it.
    pub rewrite: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.rewrite.is_empty()
    }
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
        let mut removed = Vec::new();
        by_user.retain(|user, s| {
            let keep = s.pipeline_uid != uid || users.contains(user.as_str());
            if !keep {
                removed.push(s.clone());
            }
            keep
        });
        if !removed.is_empty() {
            let mut changes = self.changes.lock().expect("directory changes lock");
            changes.rewrite.insert(uid.to_string());
            changes.removed.extend(removed);
        }
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

    /// Replaces the stages of the pipeline `uid` with those of `plan` (see
    /// [`Directory::set_pipeline`]); `status`, the pipeline's as last read, seeds their usage and
    /// says whether it lists usage of a stage the plan no longer has (removed while the operator
    /// was down, say), which is then written again without it.
    pub fn set_plan(&self, plan: &Plan, uid: &str, status: Option<&AIPipelineStatus>) {
        self.set_pipeline(uid, StageInfo::from_plan(plan, uid, status));
        let stale = status.is_some_and(|status| {
            status.stages.iter().any(|s| {
                (!s.usage.is_empty() || s.usage_since.is_some())
                    && !plan.stages.iter().any(|p| p.name == s.name)
            })
        });
        if stale {
            self.changes
                .lock()
                .expect("directory changes lock")
                .rewrite
                .insert(uid.to_string());
        }
    }

    /// Forgets the stages of pipelines whose uid is not in `live`.
    pub fn retain_pipelines(&self, live: &HashSet<String>) {
        let mut removed = Vec::new();
        self.by_user
            .write()
            .expect("directory lock")
            .retain(|_, s| {
                let keep = live.contains(&s.pipeline_uid);
                if !keep {
                    removed.push(s.clone());
                }
                keep
            });
        if !removed.is_empty() {
            // The pipelines are gone: nothing to rewrite.
            self.changes
                .lock()
                .expect("directory changes lock")
                .removed
                .extend(removed);
        }
    }

    /// What changed since the last call.
    pub fn take_changes(&self) -> Changes {
        std::mem::take(&mut *self.changes.lock().expect("directory changes lock"))
    }

    /// The stages of the pipeline `uid`, by stage name.
    pub fn stages_of(&self, uid: &str) -> Vec<Arc<StageInfo>> {
        let mut stages: Vec<Arc<StageInfo>> = self
            .by_user
            .read()
            .expect("directory lock")
            .values()
            .filter(|s| s.pipeline_uid == uid)
            .cloned()
            .collect();
        stages.sort_by(|a, b| a.stage.cmp(&b.stage));
        stages
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(stages: &[&str], usage_of: &[&str]) -> (crate::api::AIPipeline, Plan) {
        let stages: Vec<serde_json::Value> = stages
            .iter()
            .map(|s| {
                serde_json::json!({"name": s, "role": "Ingestion", "permissions": [
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]})
            })
            .collect();
        let status: Vec<serde_json::Value> = usage_of
            .iter()
            .map(|s| serde_json::json!({"name": s, "usage": [{"grant": "get configmaps", "used": true, "count": 1}], "usageSince": "2026-11-27T10:00:00Z"}))
            .collect();
        let p: crate::api::AIPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AIPipeline",
            "metadata": {"name": "fraud", "namespace": "ml", "uid": "uid-1"},
            "spec": {"stages": stages},
            "status": {"stages": status},
        }))
        .unwrap();
        let validated = crate::api::validate::validate(&p).expect("a valid pipeline");
        let plan = crate::plan::build(&validated, "ml", &Default::default(), &[]);
        (p, plan)
    }

    #[test]
    fn a_removed_stage_is_reported_once_and_its_pipeline_rewritten() {
        let directory = Directory::default();
        let (p, plan) = pipeline(&["ingest", "train"], &["ingest", "train"]);
        directory.set_plan(&plan, "uid-1", p.status.as_ref());
        assert!(directory.take_changes().is_empty(), "nothing removed");
        let ingest = directory.stages_of("uid-1")[0].clone();
        assert_eq!(ingest.seed.len(), 1);
        assert!(ingest.seed_since.is_some());

        let (p, plan) = pipeline(&["ingest"], &["ingest", "train"]);
        directory.set_plan(&plan, "uid-1", p.status.as_ref());
        let changes = directory.take_changes();
        assert_eq!(changes.removed.len(), 1);
        assert_eq!(changes.removed[0].stage, "train");
        assert_eq!(changes.rewrite, BTreeSet::from(["uid-1".to_string()]));
        assert_eq!(directory.stages_of("uid-1").len(), 1);
        assert!(directory.take_changes().is_empty(), "taken");
    }

    #[test]
    fn usage_of_a_stage_removed_while_the_operator_was_down_is_rewritten() {
        let directory = Directory::default();
        // The status still lists train's usage; the spec has no train.
        let (p, plan) = pipeline(&["ingest"], &["ingest", "train"]);
        directory.set_plan(&plan, "uid-1", p.status.as_ref());
        let changes = directory.take_changes();
        assert!(changes.removed.is_empty());
        assert_eq!(changes.rewrite, BTreeSet::from(["uid-1".to_string()]));
        // Once the status has no train, nothing more.
        let (p, plan) = pipeline(&["ingest"], &["ingest"]);
        directory.set_plan(&plan, "uid-1", p.status.as_ref());
        assert!(directory.take_changes().is_empty());
    }

    #[test]
    fn a_deleted_pipeline_is_reported_removed_without_a_rewrite() {
        let directory = Directory::default();
        let (p, plan) = pipeline(&["ingest"], &[]);
        directory.set_plan(&plan, "uid-1", p.status.as_ref());
        directory.retain_pipelines(&HashSet::new());
        let changes = directory.take_changes();
        assert_eq!(changes.removed.len(), 1);
        assert!(changes.rewrite.is_empty());
        assert!(directory.is_empty());
    }
}
