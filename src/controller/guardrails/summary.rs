//! What each guardrail bounds and denies now, and the status that says so (pure).
//!
//! A pipeline's part is worked out from its plan ([`PipelineFacts::of`]): the guardrails that
//! bound each stage, and the denials whose deciding guardrail (`Decision::guardrail`) is known.
//! [`tally`] adds the parts up per guardrail, and [`status`] turns a guardrail's tally into its
//! status, keeping the times already known (`firstSeen`, `lastTransitionTime`) so that the same
//! situation always gives the same status, and nothing is written for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::api::validate::{guardrail_warnings, validate_guardrail};
use crate::api::{AccessGuardrail, AccessGuardrailStatus, GuardrailDenial};
use crate::k8s::{Condition, ResourceExt, Time, Timestamp};
use crate::plan::Plan;

/// How many denials a guardrail's status lists.
pub(crate) const LAST_DENIALS: usize = 10;

/// The condition that says whether the guardrail is valid.
pub(crate) const VALID: &str = "Valid";
/// The condition that says the namespace selector selects nothing (a warning when True).
pub(crate) const SELECTS_NO_NAMESPACE: &str = "SelectsNoNamespace";

/// One denial, as the status lists it (without the time it was first seen).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct DenialKey {
    pub namespace: String,
    pub pipeline: String,
    pub stage: String,
    pub item: String,
    pub reason: &'static str,
}

/// What one pipeline contributes to the guardrails' status.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct PipelineFacts {
    /// Per stage, the names of the guardrails that bound it.
    pub stages: Vec<BTreeSet<String>>,
    /// The denials with a deciding guardrail, and its name.
    pub denials: Vec<(String, DenialKey)>,
}

impl PipelineFacts {
    /// From the pipeline's plan: a stage is bound by the guardrails whose ceiling applies to it
    /// and by those that denied it something (a refused role, an invalid guardrail).
    pub(crate) fn of(plan: &Plan) -> PipelineFacts {
        let mut stages: Vec<BTreeSet<String>> = plan
            .stages
            .iter()
            .map(|s| s.guardrails.iter().cloned().collect())
            .collect();
        let mut denials = Vec::new();
        for d in plan.decisions.iter().filter(|d| !d.is_allowed()) {
            let Some(guardrail) = &d.guardrail else {
                continue;
            };
            if let Some(at) = plan.stages.iter().position(|s| s.name == d.stage) {
                stages[at].insert(guardrail.clone());
            }
            denials.push((
                guardrail.clone(),
                DenialKey {
                    namespace: plan.namespace.clone(),
                    pipeline: plan.pipeline.clone(),
                    stage: d.stage.clone(),
                    item: d.item.to_string(),
                    reason: d.reason.as_str(),
                },
            ));
        }
        PipelineFacts { stages, denials }
    }
}

/// What one guardrail bounds and denies now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Tally {
    pub namespaces: u32,
    pub pipelines: u32,
    pub stages: u32,
    pub denials: BTreeSet<DenialKey>,
}

/// Adds up the pipelines' parts per guardrail. `selected` is, per guardrail, how many
/// namespaces its selector selects; every guardrail named there has a tally.
pub(crate) fn tally<'a>(
    selected: &BTreeMap<String, u32>,
    pipelines: impl IntoIterator<Item = &'a PipelineFacts>,
) -> BTreeMap<String, Tally> {
    let mut out: BTreeMap<String, Tally> = selected
        .iter()
        .map(|(name, n)| {
            (
                name.clone(),
                Tally {
                    namespaces: *n,
                    ..Tally::default()
                },
            )
        })
        .collect();
    for facts in pipelines {
        let mut bounding: BTreeSet<&str> = BTreeSet::new();
        for stage in &facts.stages {
            for name in stage {
                if let Some(t) = out.get_mut(name) {
                    t.stages += 1;
                }
                bounding.insert(name);
            }
        }
        for name in bounding {
            if let Some(t) = out.get_mut(name) {
                t.pipelines += 1;
            }
        }
        for (name, denial) in &facts.denials {
            if let Some(t) = out.get_mut(name) {
                t.denials.insert(denial.clone());
            }
        }
    }
    out
}

/// When each denial of one guardrail was first seen, kept between rounds.
#[derive(Debug, Default)]
pub(crate) struct FirstSeen {
    times: HashMap<DenialKey, Timestamp>,
    /// Whether the times were taken from the status yet (once, after a start).
    seeded: bool,
}

/// The status of `guardrail` for `tally`, at `now` (whole seconds, as the API server keeps
/// times), given the status it has (`old`) and the times already known (`seen`, updated).
pub(crate) fn status(
    guardrail: &AccessGuardrail,
    tally: &Tally,
    old: Option<&AccessGuardrailStatus>,
    seen: &mut FirstSeen,
    now: Timestamp,
) -> AccessGuardrailStatus {
    let generation = guardrail.metadata.generation;
    let mut conditions = vec![
        valid_condition(guardrail, generation),
        selection_condition(guardrail, tally.namespaces, generation),
    ];
    crate::controller::status::carry_transitions(
        &mut conditions,
        old.map(|s| s.conditions.as_slice()).unwrap_or_default(),
        Time(now),
    );
    AccessGuardrailStatus {
        observed_generation: generation,
        conditions,
        namespaces: tally.namespaces,
        pipelines: tally.pipelines,
        stages: tally.stages,
        denied: u32::try_from(tally.denials.len()).unwrap_or(u32::MAX),
        last_denials: last_denials(&tally.denials, old, seen, now),
    }
}

/// The newest denials (at most [`LAST_DENIALS`]), newest first, then in key order.
///
/// A denial's first time comes from memory, else from the status (an operator that restarted),
/// else it is new: `now`. Right after a start, memory is empty, and a denial missing from a full
/// list was cut off it before (it is older than every listed one) rather than new, so it gets
/// the oldest listed time: a restart alone changes nothing.
fn last_denials(
    current: &BTreeSet<DenialKey>,
    old: Option<&AccessGuardrailStatus>,
    seen: &mut FirstSeen,
    now: Timestamp,
) -> Vec<GuardrailDenial> {
    let listed: HashMap<DenialKey, Timestamp> = old
        .map(|s| s.last_denials.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|d| Some((key_of(d)?, d.first_seen.0)))
        .collect();
    let cut_off = (!seen.seeded && listed.len() >= LAST_DENIALS)
        .then(|| listed.values().min().copied())
        .flatten();
    seen.seeded = true;
    seen.times.retain(|k, _| current.contains(k));
    for key in current {
        if !seen.times.contains_key(key) {
            let at = listed.get(key).copied().or(cut_off).unwrap_or(now);
            seen.times.insert(key.clone(), at);
        }
    }
    let mut all: Vec<(&DenialKey, Timestamp)> = current
        .iter()
        .filter_map(|k| Some((k, *seen.times.get(k)?)))
        .collect();
    all.sort_by(|(ka, ta), (kb, tb)| tb.cmp(ta).then_with(|| ka.cmp(kb)));
    all.into_iter()
        .take(LAST_DENIALS)
        .map(|(k, at)| GuardrailDenial {
            namespace: k.namespace.clone(),
            pipeline: k.pipeline.clone(),
            stage: k.stage.clone(),
            item: k.item.clone(),
            reason: k.reason.to_string(),
            first_seen: Time(at),
        })
        .collect()
}

/// The key of a listed denial; None for a reason this version does not know.
fn key_of(d: &GuardrailDenial) -> Option<DenialKey> {
    let reason = crate::policy::Reason::DENIALS
        .iter()
        .find(|r| r.as_str() == d.reason)?
        .as_str();
    Some(DenialKey {
        namespace: d.namespace.clone(),
        pipeline: d.pipeline.clone(),
        stage: d.stage.clone(),
        item: d.item.clone(),
        reason,
    })
}

fn valid_condition(guardrail: &AccessGuardrail, generation: Option<i64>) -> Condition {
    let name = guardrail.name_any();
    let errors = validate_guardrail(guardrail);
    let (status, reason, message) = if errors.is_empty() {
        let warnings = guardrail_warnings(guardrail);
        let message = if warnings.is_empty() {
            format!("AccessGuardrail {name} is valid")
        } else {
            format!(
                "AccessGuardrail {name} is valid; warnings: {}",
                warnings.join("; ")
            )
        };
        ("True", "Valid", message)
    } else {
        let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
        (
            "False",
            "InvalidSpec",
            format!(
                "AccessGuardrail {name} is invalid, so every stage it applies to is denied everything but its identity (InvalidGuardrail) until it is fixed: {}",
                problems.join("; ")
            ),
        )
    };
    condition(VALID, status, reason, message, generation)
}

fn selection_condition(
    guardrail: &AccessGuardrail,
    namespaces: u32,
    generation: Option<i64>,
) -> Condition {
    let name = guardrail.name_any();
    let selector = &guardrail.spec.namespace_selector;
    let text = match kube::core::Selector::try_from(selector.clone()) {
        Ok(s) if s.selects_all() => "{} (every namespace)".to_string(),
        Ok(s) => s.to_string(),
        Err(_) => "an invalid selector (it applies everywhere and denies)".to_string(),
    };
    if namespaces == 0 {
        condition(
            SELECTS_NO_NAMESPACE,
            "True",
            "NoNamespaceMatches",
            format!(
                "AccessGuardrail {name}: spec.namespaceSelector {text} selects no namespace, so it bounds no pipeline; check its labels for a typo (`kubectl get namespaces -l '{text}'` lists what it selects) or delete the guardrail"
            ),
            generation,
        )
    } else {
        condition(
            SELECTS_NO_NAMESPACE,
            "False",
            "NamespacesSelected",
            format!(
                "AccessGuardrail {name}: spec.namespaceSelector {text} selects {namespaces} namespace(s)"
            ),
            generation,
        )
    }
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// The current time in whole seconds, as the API server stores times: a status compared with
/// the one read back must not differ by a fraction of a second.
pub(crate) fn now_seconds() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests;
