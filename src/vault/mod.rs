//! Vault: the operator's session (login, token renewal) and the typed calls it makes. Vault
//! HTTP only: this module knows nothing of Kubernetes or of the controller. Where the session
//! keeps its token between restarts is a [`TokenStore`] it is given (the controller's is a
//! Secret in the operator's namespace).
//!
//! The production path is [vaultrs] against a real Vault; [`endpoints`] adds the few routes
//! vaultrs 0.8 lacks, on vaultrs's own client.
//!
//! # The operator's token
//!
//! Vault revokes every lease a token created when that token is revoked or expires. The
//! workloads' credentials are created with the operator's token, so its lifetime must never cap
//! theirs. Portcullis therefore:
//! - logs in through Kubernetes auth with a role that gives a **periodic** token (`token_period`),
//!   which has no max TTL and lives as long as it is renewed; it renews at half its TTL;
//! - keeps the token in its [`TokenStore`] (a Secret in its own namespace), so a restarted or new leader goes on
//!   with the same token (after `lookup-self` shows it is still valid) instead of logging in
//!   again and leaving the old token, and every lease it made, to expire: the failure of Vault
//!   Secrets Operator's issue #285;
//! - logs in afresh only when that token is gone; then the leases of the old one are gone too,
//!   and each credential is replaced once, as its lease lookup fails.
//!
//! A token that is not periodic is accepted with a warning: its max TTL then caps every
//! credential.

pub mod endpoints;
mod error;
pub mod leases;
mod session;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use error::{ClientBuildError, TokenStoreError, VaultError, VaultErrorKind};
pub use session::Session;

/// How to reach Vault and log in.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub address: String,
    pub ca_cert: Option<PathBuf>,
    pub namespace: Option<String>,
    /// The Kubernetes auth mount the operator logs in with.
    pub auth_mount: String,
    /// The role the operator logs in with.
    pub auth_role: String,
    /// The operator's ServiceAccount token (a projected token in the pod).
    pub auth_token_path: PathBuf,
    /// The Kubernetes auth mount on which the workloads' roles are written.
    pub workload_auth_mount: String,
    pub request_timeout: Duration,
    /// How many calls to Vault may be in flight at once, across all pipelines
    /// (`--vault-max-concurrent-requests`).
    pub max_concurrent_requests: usize,
    /// Of [`VaultConfig::max_concurrent_requests`], how many only renewals, revocations and
    /// lease lookups may take (`--vault-reserved-requests`): however many slow policy writes,
    /// issues or sweeps wait, what keeps delivered credentials alive (or ends them) gets through.
    pub reserved_requests: usize,
}

/// The default of `--vault-max-concurrent-requests`.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 16;
/// The default of `--vault-reserved-requests`.
pub const DEFAULT_RESERVED_REQUESTS: usize = 4;

/// Whether `max` concurrent Vault calls with `reserved` of them kept for renewals and
/// revocations can work: at least one slot of each kind.
pub fn check_call_slots(max: usize, reserved: usize) -> Result<(), String> {
    if reserved == 0 {
        return Err("--vault-reserved-requests is 0: renewals and revocations would have no slot of their own and could wait behind slow issues; set it to 1 or more".into());
    }
    if reserved >= max {
        return Err(format!(
            "--vault-reserved-requests ({reserved}) must be less than --vault-max-concurrent-requests ({max}): policy writes, issues and sweeps need at least one slot; raise --vault-max-concurrent-requests or lower --vault-reserved-requests"
        ));
    }
    Ok(())
}

/// Where the operator's token is kept across restarts and leader changes, so that a new leader
/// resumes the token (and with it every lease it made) instead of logging in again.
pub trait TokenStore: Send + Sync + 'static {
    /// The kept token, if there is one.
    fn load(&self) -> impl Future<Output = Result<Option<String>, TokenStoreError>> + Send;
    /// Keeps `token`, replacing the one kept before.
    fn save(&self, token: &str) -> impl Future<Output = Result<(), TokenStoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_slots_need_one_of_each_kind_and_say_which_flag_to_change() {
        assert_eq!(
            check_call_slots(DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_RESERVED_REQUESTS),
            Ok(())
        );
        assert_eq!(check_call_slots(2, 1), Ok(()));
        let none_reserved = check_call_slots(16, 0).unwrap_err();
        assert!(
            none_reserved.starts_with("--vault-reserved-requests is 0"),
            "{none_reserved}"
        );
        for (max, reserved) in [(4, 4), (1, 1), (4, 9)] {
            let e = check_call_slots(max, reserved).unwrap_err();
            assert!(
                e.contains(&format!("--vault-reserved-requests ({reserved}) must be less than --vault-max-concurrent-requests ({max})")),
                "{e}"
            );
        }
    }
}
