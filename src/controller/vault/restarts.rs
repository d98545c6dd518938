//! Restarts of the workloads that consume replaced credentials (a pod-template annotation, as
//! `kubectl rollout restart` does), at most once per workload per minimum interval and within a
//! global budget per minute.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::json;
use tracing::{info, warn};

use super::state::VaultState;
use super::{VaultSide, Work, earliest, rfc3339};
use crate::controller::ownership::{template_service_account, workload_api};
use crate::controller::{Error, Result};
use crate::k8s::{Api, DynamicObject, Patch, PatchParams, is_not_found};
use crate::plan::CredentialRequest;

/// The pod-template annotation that restarts a workload.
pub(crate) const RESTARTED_AT: &str = "portcullis.dev/restarted-at";

/// The limits on restarts, and the global budget's window.
pub(super) struct Restarts {
    /// A workload is restarted at most once per this interval.
    min_interval: chrono::Duration,
    /// At most this many workload restarts per minute, over all pipelines.
    max_per_minute: usize,
    window: Mutex<VecDeque<Instant>>,
}

impl Restarts {
    pub(super) fn new(min_interval: chrono::Duration, max_per_minute: usize) -> Restarts {
        Restarts {
            min_interval,
            max_per_minute,
            window: Mutex::default(),
        }
    }

    /// Takes one restart from the global budget, if any is left this minute.
    fn take(&self) -> bool {
        let mut window = self.window.lock().expect("restart lock");
        let now = Instant::now();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) > std::time::Duration::from_secs(60))
        {
            window.pop_front();
        }
        if window.len() >= self.max_per_minute {
            return false;
        }
        window.push_back(now);
        true
    }
}

/// Restarts the consumers of replaced credentials whose restart is pending. Returns the
/// earliest of `wake` and when a deferred restart may be tried again.
pub(super) async fn converge(
    work: &Work<'_>,
    side: &VaultSide,
    state: &mut VaultState,
    mut wake: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>> {
    let pending: Vec<usize> = state
        .leases
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_current() && l.restart_pending)
        .map(|(i, _)| i)
        .collect();
    for i in pending {
        let lease = &state.leases[i];
        let Some(r) = side
            .vault
            .credentials
            .iter()
            .find(|r| r.stage == lease.stage && r.name == lease.credential)
        else {
            continue;
        };
        match restart_targets(work, side, r).await? {
            None => {
                state.leases[i].restart_pending = false;
                work.save(state).await?;
            }
            Some(retry_at) => wake = earliest(wake, retry_at),
        }
    }
    Ok(wake)
}

/// Whether `workload` is the pipeline's: its pod template runs as one of the stages'
/// ServiceAccounts (`side`'s subjects). The plan decided each target so when it was made; this
/// is checked again right before the patch, as the workload may have changed since.
fn is_pipelines(side: &VaultSide, namespace: &str, workload: &DynamicObject) -> bool {
    let user = format!(
        "system:serviceaccount:{namespace}:{}",
        template_service_account(workload)
    );
    side.subjects.values().any(|s| *s == user)
}

/// Restarts a credential's restart targets (those the plan decided are the pipeline's),
/// unless one was restarted less than the minimum interval ago or the minute's budget is spent:
/// then `Some(when to try again)`. Missing targets, and targets that no longer run as one of
/// the pipeline's stages, are skipped.
async fn restart_targets(
    work: &Work<'_>,
    side: &VaultSide,
    r: &CredentialRequest,
) -> Result<Option<DateTime<Utc>>> {
    let limits = &work.vault.restarts;
    let now = Utc::now();
    let apis: Vec<(String, Api<DynamicObject>)> = r
        .restart_targets
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                workload_api(&work.ctx.client, &work.namespace, t.kind),
            )
        })
        .collect();
    // Wait for the slowest target's interval, so that all restart together.
    let mut present = Vec::new();
    for ((name, api), target) in apis.iter().zip(&r.restart_targets) {
        let Some(object) = api.get_opt(name).await? else {
            warn!(kind = ?target.kind, name, "a restart target does not exist; skipping it");
            continue;
        };
        if !is_pipelines(side, &work.namespace, &object) {
            warn!(kind = ?target.kind, name, service_account = %template_service_account(&object), "a restart target no longer runs as one of the pipeline's stages; not restarting it");
            continue;
        }
        let last = object.data["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        if let Some(last) = last
            && last + limits.min_interval > now
        {
            return Ok(Some(last + limits.min_interval));
        }
        present.push((name, api, target));
    }
    for (name, api, target) in present {
        if !limits.take() {
            return Ok(Some(now + chrono::Duration::seconds(10)));
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: rfc3339(now)}}}}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::Kube(e)),
        }
        work.ctx.metrics.workload_restarts.inc();
        info!(kind = ?target.kind, name, stage = %r.stage, credential = %r.name, "restarted a workload for its new credentials");
    }
    Ok(None)
}
