//! The ceiling used when no AccessGuardrail applies to a stage: identity only.
//!
//! A stage in a namespace no guardrail covers gets its ServiceAccount and a NetworkPolicy that
//! denies every flow, DNS included, and nothing else: no Kubernetes API access, no Vault paths,
//! no credentials. Access is granted by writing a guardrail, never by forgetting to.
//! Lifetimes: at most 1h ([`MAX_TTL_SECONDS`]); tokens 20m unless asked ([`TOKEN_TTL_SECONDS`]).

use std::sync::OnceLock;

use crate::api::Ceiling;

/// The longest lifetime when no guardrail says otherwise.
pub(crate) const MAX_TTL_SECONDS: u64 = 3600;

/// The Vault token lifetime a stage gets when it does not ask for one (capped by maxTTL).
pub(crate) const TOKEN_TTL_SECONDS: u64 = 20 * 60;

/// The built-in ceiling: empty.
pub(crate) fn ceiling() -> &'static Ceiling {
    static CEILING: OnceLock<Ceiling> = OnceLock::new();
    CEILING.get_or_init(Ceiling::default)
}
