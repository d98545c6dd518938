//! The AIPipeline's status, built from the plan and what applying it did. Pure: it is handed
//! plain data ([`Outcome`], [`VaultSummary`], [`Problem`]) and imports nothing of the steps
//! that produce it.
//!
//! Conditions follow the Kubernetes API conventions: `lastTransitionTime` changes only when a
//! condition's status changes, so an unchanged pipeline's status is byte-identical and is not
//! written again.

use crate::api::{AIPipelineStatus, CredentialStatus, DeniedItem, StageStatus};
use crate::k8s::{Condition, Time, Timestamp};
use crate::plan::Plan;

/// Denied items listed per stage in the status; the rest are counted, and all are in the
/// decision log.
pub const MAX_DENIED_ITEMS: usize = 50;

/// What applying the plan came to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Objects Portcullis refused to take over, as `Kind namespace/name`, with the stage.
    pub refused: Vec<(String, String)>,
    /// Errors while applying or pruning, as messages.
    pub errors: Vec<String>,
    /// The Vault side, when the pipeline involves Vault.
    pub vault: Option<VaultSummary>,
}

/// What the Vault side came to, as the status shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VaultSummary {
    /// Why Vault is not in the state the plan asks for.
    pub problem: Option<Problem>,
    /// Per stage, its delivered credentials.
    pub credentials: Vec<(String, CredentialStatus)>,
    /// How many credentials are requested.
    pub requested: usize,
    /// How many of them are delivered with a lease that has not expired.
    pub live: usize,
}

/// Something wrong, as a condition shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

/// The reasons of the conditions Portcullis sets, as they appear in `reason:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Reconciled,
    AdoptionRefused,
    ApplyFailed,
    InvalidSpec,
    AllAllowed,
    ItemsDenied,
    Healthy,
    Synced,
    Delivered,
    Issuing,
    VaultCleanupPending,
    VaultUnavailable,
    VaultBusy,
    VaultRefused,
    VaultLoginFailed,
    VaultNotConfigured,
    SecretNotOwned,
    KubernetesError,
    DecisionLogUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Reconciled => "Reconciled",
            Reason::AdoptionRefused => "AdoptionRefused",
            Reason::ApplyFailed => "ApplyFailed",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::AllAllowed => "AllAllowed",
            Reason::ItemsDenied => "ItemsDenied",
            Reason::Healthy => "Healthy",
            Reason::Synced => "Synced",
            Reason::Delivered => "Delivered",
            Reason::Issuing => "Issuing",
            Reason::VaultCleanupPending => "VaultCleanupPending",
            Reason::VaultUnavailable => "VaultUnavailable",
            Reason::VaultBusy => "VaultBusy",
            Reason::VaultRefused => "VaultRefused",
            Reason::VaultLoginFailed => "VaultLoginFailed",
            Reason::VaultNotConfigured => "VaultNotConfigured",
            Reason::SecretNotOwned => "SecretNotOwned",
            Reason::KubernetesError => "KubernetesError",
            Reason::DecisionLogUnavailable => "DecisionLogUnavailable",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The condition types Portcullis sets.
pub mod types {
    pub const READY: &str = "Ready";
    pub const GUARDRAILS_SATISFIED: &str = "GuardrailsSatisfied";
    pub const DEGRADED: &str = "Degraded";
    pub const CREDENTIALS_READY: &str = "CredentialsReady";
    pub const VAULT_SYNCED: &str = "VaultSynced";
    pub const EXCLUSIVE_ACCESS: &str = "ExclusiveAccess";
}

/// `ExclusiveAccess`: whether the stages' ServiceAccounts hold only what Portcullis grants;
/// `False` names the other RoleBindings and ClusterRoleBindings that reach them. Written by the
/// foreign-grant watchdog under its own field manager, beside the reconcile's conditions.
pub fn exclusive_access(
    foreign: &[String],
    generation: Option<i64>,
    old: &[Condition],
    now: Time,
) -> Condition {
    let mut c = Condition {
        type_: types::EXCLUSIVE_ACCESS.into(),
        status: if foreign.is_empty() { "True" } else { "False" }.into(),
        reason: if foreign.is_empty() {
            "NoForeignGrants"
        } else {
            "ForeignGrants"
        }
        .into(),
        message: if foreign.is_empty() {
            "no RoleBinding or ClusterRoleBinding but Portcullis's reaches the stages' ServiceAccounts".into()
        } else {
            format!(
                "bindings Portcullis does not manage also grant to the stages' ServiceAccounts: {}",
                foreign.join("; ")
            )
        },
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    carry_transitions(std::slice::from_mut(&mut c), old, now);
    c
}

fn condition(
    type_: &str,
    ok: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.as_str().into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// The part of a status the reconcile writes: without what other writers keep beside it under
/// their own field managers (the watchdog's `ExclusiveAccess`, the runtime side's
/// `stages[].usage` and `usageSince`, the coverage check's `uncoveredPods`). A status read
/// back from the API server is compared with a new one through
/// this, so that their parts never make the reconcile write again (after a restart, say).
pub fn reconciled_part(status: &AIPipelineStatus) -> AIPipelineStatus {
    let mut status = status.clone();
    status
        .conditions
        .retain(|c| c.type_ != types::EXCLUSIVE_ACCESS);
    for stage in &mut status.stages {
        stage.usage.clear();
        stage.usage_since = None;
    }
    status.uncovered_pods = None;
    status
}

/// Keeps `lastTransitionTime` of conditions whose status did not change; stamps `now` on the
/// others.
pub fn carry_transitions(new: &mut [Condition], old: &[Condition], now: Time) {
    for c in new.iter_mut() {
        c.last_transition_time = match old.iter().find(|o| o.type_ == c.type_) {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => now.clone(),
        };
    }
}

/// [`carry_transitions`] from the status last written, if any.
fn carry_transitions_from(new: &mut [Condition], old: Option<&AIPipelineStatus>, now: Time) {
    carry_transitions(
        new,
        old.map(|s| s.conditions.as_slice()).unwrap_or_default(),
        now,
    );
}

/// The status for a plan that was applied with `outcome`.
pub fn for_plan(
    plan: &Plan,
    outcome: &Outcome,
    generation: Option<i64>,
    old: Option<&AIPipelineStatus>,
    now: Time,
) -> AIPipelineStatus {
    let denied = u32::try_from(plan.denied()).unwrap_or(u32::MAX);
    let stages = stage_statuses(plan, outcome);
    // Ready means everything asked for is in place, the credentials included: Vault refusing,
    // down or not configured all make it False (Degraded says something is wrong), and
    // credentials still being issued make it False too (not Degraded: in progress).
    let vault_problem = outcome.vault.as_ref().and_then(|v| v.problem.as_ref());
    let healthy =
        outcome.refused.is_empty() && outcome.errors.is_empty() && vault_problem.is_none();
    let mut conditions = vec![
        ready_condition(plan, outcome, vault_problem, generation),
        guardrails_condition(plan, denied, generation),
        degraded_condition(outcome, healthy, vault_problem, generation),
    ];
    conditions.extend(vault_conditions(outcome, generation));
    carry_transitions_from(&mut conditions, old, now);
    AIPipelineStatus {
        observed_generation: generation,
        conditions,
        denied,
        stages,
        recorded_decisions: None,
        // Written by the coverage check under its own field manager, never by the reconcile.
        uncovered_pods: None,
    }
}

/// Each stage's status: its ServiceAccount (unless refused), counts, denied items, credentials.
fn stage_statuses(plan: &Plan, outcome: &Outcome) -> Vec<StageStatus> {
    plan.stages
        .iter()
        .map(|s| {
            let denied_items: Vec<DeniedItem> = plan
                .decisions
                .iter()
                .filter(|d| d.stage == s.name && !d.is_allowed())
                .take(MAX_DENIED_ITEMS)
                .map(|d| DeniedItem {
                    item: d.item.to_string(),
                    reason: d.reason.as_str().into(),
                    message: d.message.clone(),
                })
                .collect();
            let refused = outcome.refused.iter().any(|(stage, _)| *stage == s.name);
            StageStatus {
                name: s.name.clone(),
                service_account: (!refused).then(|| s.service_account.clone()),
                granted: s.granted,
                denied: s.denied,
                denied_items,
                credentials: outcome
                    .vault
                    .iter()
                    .flat_map(|v| &v.credentials)
                    .filter(|(stage, _)| *stage == s.name)
                    .map(|(_, c)| c.clone())
                    .collect(),
                // Written by the runtime side under its own field manager (`controller::access`).
                usage: Vec::new(),
                usage_since: None,
            }
        })
        .collect()
}

/// `Ready`: a Vault problem, refused adoptions or failed writes make it False, in that order.
fn ready_condition(
    plan: &Plan,
    outcome: &Outcome,
    vault_problem: Option<&Problem>,
    generation: Option<i64>,
) -> Condition {
    if let (true, Some(p)) = (
        outcome.refused.is_empty() && outcome.errors.is_empty(),
        vault_problem,
    ) {
        condition(types::READY, false, p.reason, p.message.clone(), generation)
    } else if !outcome.refused.is_empty() {
        let objects: Vec<String> = outcome
            .refused
            .iter()
            .map(|(stage, o)| format!("{o} (stage {stage})"))
            .collect();
        condition(
            types::READY,
            false,
            Reason::AdoptionRefused,
            format!(
                "{} already exist and are not Portcullis's; nothing of those stages is bound to them. Delete or rename them, or rename the stage",
                objects.join(", ")
            ),
            generation,
        )
    } else if !outcome.errors.is_empty() {
        condition(
            types::READY,
            false,
            Reason::ApplyFailed,
            outcome.errors.join("; "),
            generation,
        )
    } else if let Some(v) = outcome.vault.as_ref().filter(|v| v.live < v.requested) {
        condition(
            types::READY,
            false,
            Reason::Issuing,
            format!(
                "the stages have their identities, RBAC and network policies; {} of {} credentials are delivered, the rest are being issued",
                v.live, v.requested
            ),
            generation,
        )
    } else {
        condition(
            types::READY,
            true,
            Reason::Reconciled,
            format!(
                "{} stages have their identities, RBAC and network policies",
                plan.stages.len()
            ),
            generation,
        )
    }
}

/// `GuardrailsSatisfied`: True when nothing requested was denied.
fn guardrails_condition(plan: &Plan, denied: u32, generation: Option<i64>) -> Condition {
    if denied == 0 {
        condition(
            types::GUARDRAILS_SATISFIED,
            true,
            Reason::AllAllowed,
            "everything requested is allowed".into(),
            generation,
        )
    } else {
        let first = plan
            .decisions
            .iter()
            .find(|d| !d.is_allowed())
            .map(|d| format!("; first: stage {} {} [{}]", d.stage, d.item, d.reason))
            .unwrap_or_default();
        condition(
            types::GUARDRAILS_SATISFIED,
            false,
            Reason::ItemsDenied,
            format!(
                "{denied} requested items are denied and not granted{first}; see status.stages[].deniedItems"
            ),
            generation,
        )
    }
}

/// `Degraded`: something is wrong (not merely in progress), with the reason.
fn degraded_condition(
    outcome: &Outcome,
    ready: bool,
    vault_problem: Option<&Problem>,
    generation: Option<i64>,
) -> Condition {
    condition(
        types::DEGRADED,
        !ready,
        if ready {
            Reason::Healthy
        } else if !outcome.refused.is_empty() {
            Reason::AdoptionRefused
        } else if !outcome.errors.is_empty() {
            Reason::ApplyFailed
        } else {
            vault_problem.map_or(Reason::ApplyFailed, |p| p.reason)
        },
        if ready {
            "nothing is wrong".into()
        } else {
            "see the Ready condition".into()
        },
        generation,
    )
}

/// `VaultSynced` and `CredentialsReady`, when the pipeline involves Vault.
fn vault_conditions(outcome: &Outcome, generation: Option<i64>) -> Vec<Condition> {
    let mut conditions = Vec::new();
    let vault_note = outcome.vault.as_ref().and_then(|v| v.problem.as_ref());
    if outcome.vault.is_some() {
        conditions.push(match vault_note {
            None => condition(
                types::VAULT_SYNCED,
                true,
                Reason::Synced,
                "the stages' Vault policies and roles are written as planned".into(),
                generation,
            ),
            Some(p) => condition(
                types::VAULT_SYNCED,
                false,
                p.reason,
                p.message.clone(),
                generation,
            ),
        });
    }
    if let Some(v) = outcome.vault.as_ref().filter(|v| v.requested > 0) {
        let vault_problem = vault_note;
        let delivered = v.live;
        conditions.push(if delivered == v.requested {
            condition(
                types::CREDENTIALS_READY,
                true,
                Reason::Delivered,
                match vault_problem {
                    None => format!("{delivered} credentials are delivered and their leases are current"),
                    Some(p) => format!(
                        "{delivered} credentials are delivered; their Secrets are kept until their leases expire, but renewing them fails: {}",
                        p.message
                    ),
                },
                generation,
            )
        } else {
            condition(
                types::CREDENTIALS_READY,
                false,
                vault_problem.map_or(Reason::Issuing, |p| p.reason),
                format!(
                    "{delivered} of {} credentials are delivered{}",
                    v.requested,
                    vault_problem.map(|p| format!(": {}", p.message)).unwrap_or_default()
                ),
                generation,
            )
        });
    }
    conditions
}

/// The status of a deleted pipeline whose Vault clean-up waits for Vault.
pub fn cleanup_pending(
    problem: &Problem,
    generation: Option<i64>,
    old: Option<&AIPipelineStatus>,
    now: Time,
) -> AIPipelineStatus {
    let message = format!(
        "the pipeline is deleted; revoking its leases and deleting its Vault policies and roles waits for Vault, and the deletion waits for that (retried with backoff): {}",
        problem.message
    );
    let mut conditions = vec![
        condition(
            types::READY,
            false,
            Reason::VaultCleanupPending,
            message.clone(),
            generation,
        ),
        condition(types::DEGRADED, true, problem.reason, message, generation),
    ];
    carry_transitions_from(&mut conditions, old, now);
    let mut status = old.cloned().unwrap_or_default();
    status.conditions = conditions;
    status
}

/// The status of a pipeline whose changes wait because the decision log cannot be written:
/// what was there is kept (and renewals go on), nothing new is granted.
pub fn log_unavailable(
    error: &str,
    generation: Option<i64>,
    old: Option<&AIPipelineStatus>,
    now: Time,
) -> AIPipelineStatus {
    let message = format!(
        "the decision log cannot be written, so nothing new is granted or changed until it can (credentials already delivered are still renewed): {error}"
    );
    let mut conditions = vec![
        condition(
            types::READY,
            false,
            Reason::DecisionLogUnavailable,
            message.clone(),
            generation,
        ),
        condition(
            types::DEGRADED,
            true,
            Reason::DecisionLogUnavailable,
            message,
            generation,
        ),
    ];
    carry_transitions_from(&mut conditions, old, now);
    let mut status = old.cloned().unwrap_or_default();
    // The other conditions (GuardrailsSatisfied, the Vault ones) stay as they were.
    status
        .conditions
        .retain(|c| c.type_ != types::READY && c.type_ != types::DEGRADED);
    conditions.extend(status.conditions);
    status.conditions = conditions;
    status
}

/// The status of a pipeline whose spec is invalid: nothing was applied.
pub fn invalid(
    errors: &[String],
    generation: Option<i64>,
    old: Option<&AIPipelineStatus>,
    now: Time,
) -> AIPipelineStatus {
    let message = format!(
        "the spec is invalid, nothing was changed: {}",
        errors.join("; ")
    );
    let mut conditions = vec![
        condition(
            types::READY,
            false,
            Reason::InvalidSpec,
            message.clone(),
            generation,
        ),
        condition(
            types::DEGRADED,
            true,
            Reason::InvalidSpec,
            message,
            generation,
        ),
    ];
    carry_transitions_from(&mut conditions, old, now);
    AIPipelineStatus {
        observed_generation: generation,
        conditions,
        denied: old.map(|s| s.denied).unwrap_or_default(),
        stages: old.map(|s| s.stages.clone()).unwrap_or_default(),
        recorded_decisions: old.and_then(|s| s.recorded_decisions.clone()),
        uncovered_pods: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let old = vec![condition(
            "Ready",
            true,
            Reason::Reconciled,
            "a".into(),
            Some(1),
        )];
        let mut old = old;
        old[0].last_transition_time = t(100);
        let mut same = vec![condition(
            "Ready",
            true,
            Reason::Reconciled,
            "b".into(),
            Some(2),
        )];
        carry_transitions(&mut same, &old, t(200));
        assert_eq!(same[0].last_transition_time, t(100));
        let mut flipped = vec![condition(
            "Ready",
            false,
            Reason::ApplyFailed,
            "c".into(),
            Some(2),
        )];
        carry_transitions(&mut flipped, &old, t(300));
        assert_eq!(flipped[0].last_transition_time, t(300));
    }

    #[test]
    fn what_other_writers_keep_beside_the_status_does_not_make_it_differ() {
        let ours = AIPipelineStatus {
            observed_generation: Some(3),
            conditions: vec![condition(
                types::READY,
                true,
                Reason::Reconciled,
                "ok".into(),
                Some(3),
            )],
            stages: vec![crate::api::StageStatus {
                name: "train".into(),
                granted: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        // As read back: the watchdog's condition, the runtime side's usage and the coverage
        // check's uncovered pods beside ours.
        let mut read_back = ours.clone();
        read_back.uncovered_pods = Some(crate::api::UncoveredPods {
            count: 1,
            names: vec!["forgot-its-label".into()],
        });
        read_back
            .conditions
            .push(exclusive_access(&["rb/view".into()], Some(3), &[], t(1)));
        read_back.stages[0].usage.push(crate::api::GrantUsage {
            grant: "get configmaps/x".into(),
            used: true,
            count: 4,
            last_used: None,
        });
        read_back.stages[0].usage_since = Some("2026-11-27T10:00:00Z".into());
        assert_ne!(read_back, ours);
        assert_eq!(reconciled_part(&read_back), ours);
        // A change of our own is still a change.
        let mut changed = read_back.clone();
        changed.stages[0].granted = 1;
        assert_ne!(reconciled_part(&changed), ours);
    }
}

#[cfg(test)]
mod vault_conditions {
    use super::*;
    use crate::api::CredentialStatus;

    fn status_with(vault: VaultSummary) -> AIPipelineStatus {
        let outcome = Outcome {
            vault: Some(vault),
            ..Outcome::default()
        };
        for_plan(
            &Plan::default(),
            &outcome,
            Some(1),
            None,
            Time(Timestamp::UNIX_EPOCH),
        )
    }

    fn get(s: &AIPipelineStatus, type_: &str) -> (String, String) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition"));
        (c.status.clone(), c.reason.clone())
    }

    fn problem(reason: Reason) -> Option<Problem> {
        Some(Problem {
            reason,
            message: "x".into(),
        })
    }

    fn delivered() -> Vec<(String, CredentialStatus)> {
        vec![("ingest".into(), CredentialStatus::default())]
    }

    #[test]
    fn credentials_not_delivered_are_not_ready_whatever_the_reason() {
        // Vault not configured: not Ready, and Degraded (someone must act).
        let s = status_with(VaultSummary {
            problem: problem(Reason::VaultNotConfigured),
            requested: 1,
            ..VaultSummary::default()
        });
        assert_eq!(
            get(&s, "Ready"),
            ("False".into(), "VaultNotConfigured".into())
        );
        assert_eq!(
            get(&s, "Degraded"),
            ("True".into(), "VaultNotConfigured".into())
        );
        // Still being issued, nothing wrong: not Ready, not Degraded.
        let s = status_with(VaultSummary {
            requested: 2,
            live: 1,
            credentials: delivered(),
            ..VaultSummary::default()
        });
        assert_eq!(get(&s, "Ready"), ("False".into(), "Issuing".into()));
        assert_eq!(get(&s, "Degraded"), ("False".into(), "Healthy".into()));
        // All delivered: Ready.
        let s = status_with(VaultSummary {
            requested: 1,
            live: 1,
            credentials: delivered(),
            ..VaultSummary::default()
        });
        assert_eq!(get(&s, "Ready"), ("True".into(), "Reconciled".into()));
        let s = status_with(VaultSummary {
            problem: problem(Reason::VaultNotConfigured),
            requested: 1,
            ..VaultSummary::default()
        });
        assert_eq!(
            get(&s, "VaultSynced"),
            ("False".into(), "VaultNotConfigured".into())
        );
        assert_eq!(
            get(&s, "CredentialsReady"),
            ("False".into(), "VaultNotConfigured".into())
        );
    }

    #[test]
    fn an_outage_degrades_but_live_credentials_stay_delivered() {
        let s = status_with(VaultSummary {
            problem: problem(Reason::VaultUnavailable),
            credentials: delivered(),
            requested: 1,
            live: 1,
        });
        assert_eq!(
            get(&s, "Ready"),
            ("False".into(), "VaultUnavailable".into())
        );
        assert_eq!(
            get(&s, "Degraded"),
            ("True".into(), "VaultUnavailable".into())
        );
        assert_eq!(
            get(&s, "CredentialsReady"),
            ("True".into(), "Delivered".into())
        );
        // Once the lease has expired, the credentials are no longer ready.
        let s = status_with(VaultSummary {
            problem: problem(Reason::VaultUnavailable),
            credentials: delivered(),
            requested: 1,
            live: 0,
        });
        assert_eq!(
            get(&s, "CredentialsReady"),
            ("False".into(), "VaultUnavailable".into())
        );
    }

    #[test]
    fn a_healthy_vault_side_is_synced_and_without_credentials_has_no_credentials_condition() {
        let s = status_with(VaultSummary::default());
        assert_eq!(get(&s, "Ready").0, "True");
        assert_eq!(get(&s, "VaultSynced"), ("True".into(), "Synced".into()));
        assert!(s.conditions.iter().all(|c| c.type_ != "CredentialsReady"));
    }
}
