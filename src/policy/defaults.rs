//! The ceiling used when no AccessGuardrail applies to a stage: deliberately small.
//!
//! - Kubernetes: get, list and watch on ConfigMaps and (by name, only the stage's own) Secrets.
//! - Network: DNS only; no other egress, no ingress.
//! - Vault: read and list under `kv/data/{namespace}/{pipeline}/{stage}/*` and
//!   `kv/metadata/{namespace}/{pipeline}/{stage}/*`; no dynamic credentials.
//! - Lifetimes: at most 1h ([`MAX_TTL_SECONDS`]); tokens 20m unless asked ([`TOKEN_TTL_SECONDS`]).

use std::sync::OnceLock;

use crate::api::{
    Ceiling, KubernetesCeiling, NetworkCeiling, VaultCapability, VaultCeiling, VaultPathCeiling,
};

/// The longest lifetime when no guardrail says otherwise.
pub(crate) const MAX_TTL_SECONDS: u64 = 3600;

/// The Vault token lifetime a stage gets when it does not ask for one (capped by maxTTL).
pub(crate) const TOKEN_TTL_SECONDS: u64 = 20 * 60;

/// The built-in ceiling.
pub(crate) fn ceiling() -> &'static Ceiling {
    static CEILING: OnceLock<Ceiling> = OnceLock::new();
    CEILING.get_or_init(|| Ceiling {
        kubernetes: vec![KubernetesCeiling {
            api_groups: vec![String::new()],
            resources: vec!["configmaps".into(), "secrets".into()],
            verbs: vec!["get".into(), "list".into(), "watch".into()],
        }],
        network: NetworkCeiling::default(),
        vault: VaultCeiling {
            paths: vec![
                VaultPathCeiling {
                    pattern: "kv/data/{namespace}/{pipeline}/{stage}/*".into(),
                    capabilities: vec![VaultCapability::Read, VaultCapability::List],
                },
                VaultPathCeiling {
                    pattern: "kv/metadata/{namespace}/{pipeline}/{stage}/*".into(),
                    capabilities: vec![VaultCapability::Read, VaultCapability::List],
                },
            ],
            max_ttl: Some("1h".into()),
        },
    })
}
