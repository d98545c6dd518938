//! Turns what a stage requests into one [`Decision`] per requested item, allow or deny, with a
//! stable reason. Pure: no I/O, no clock.
//!
//! Two layers decide. The built-in floor ([`floor`]) denies what no guardrail may allow
//! (wildcards, escalation verbs, exec, cluster-scoped resources, Secrets not delivered to the
//! stage, the cloud metadata address, Vault `sudo` and `sys/`). Then every AccessGuardrail that
//! applies to the stage must allow the item: the stage gets the intersection. A guardrail applies
//! when its namespaceSelector matches the pipeline's namespace and it sets a ceiling for the
//! stage's role. When none applies, the built-in defaults (`defaults::ceiling`) are the ceiling.
//!
//! By concern: `decision` is the vocabulary ([`Item`], [`Verdict`], [`Reason`], [`Decision`]);
//! `scope` finds the guardrails that bind a stage and fills in their Vault path templates;
//! `evaluate` runs every requested item of a [validated](crate::api::validate::Validated) stage
//! through the floor and the scope.

pub mod claims;
pub mod cluster;
pub(crate) mod defaults;
pub mod floor;
pub(crate) mod vault_path;

mod decision;
mod evaluate;
mod scope;

pub use claims::{Claimant, CredentialClaims};
pub use cluster::{ClusterFacts, SecretFact, WorkloadFact};
pub use decision::{Decision, Item, Reason, Verdict, WithCidr};
#[cfg(test)]
pub(crate) use evaluate::evaluate_stage;
pub(crate) use evaluate::{decision_count, evaluate_stage_into};
pub use scope::selects_namespace;
pub(crate) use scope::{Scope, StageContext, applicable_guardrails, selects};

#[cfg(test)]
mod tests;
