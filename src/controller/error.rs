//! The one error a reconcile can fail with, and what each kind of failure means for retrying.

use std::time::Duration;

use super::journal::JournalError;
use super::vault::VaultProblem;
use crate::k8s::KubeError;

/// What kind of failure an [`Error`] is, which decides how it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The Kubernetes API failed in a way that usually passes (a conflict, a timeout, a
    /// restarting API server): retried soon, at a fixed short delay.
    Transient,
    /// A dependency is unavailable (Vault unreachable, sealed or failing): retried with
    /// exponential backoff, so that an outage is not hammered.
    Unavailable,
    /// A dependency refused what was asked (Vault denied a call or the login, a Secret of the
    /// name is someone else's): someone must change a permission or a name; retried with the
    /// same backoff, since that change is not watched.
    Refused,
    /// The input cannot be acted on as it is (an AIPipeline without a namespace, Vault work for
    /// an operator run without Vault): retried rarely.
    Invalid,
    /// The operator cannot go on safely (the decision log cannot be written, its Vault state is
    /// unreadable): nothing is changed, and it is retried slowly.
    Internal,
}

impl Category {
    /// How long to wait before retrying, after `failures` failures in a row.
    pub fn retry_after(self, failures: u32) -> Duration {
        match self {
            Category::Transient => Duration::from_secs(5),
            // 2 s, doubling up to 2 minutes.
            Category::Unavailable | Category::Refused => Duration::from_secs(
                2u64.saturating_mul(1 << failures.clamp(1, 7).saturating_sub(1))
                    .min(120),
            ),
            Category::Invalid => Duration::from_secs(300),
            Category::Internal => Duration::from_secs(30),
        }
    }
}

/// Everything a reconcile can fail with. Each has a stable label for metrics and a
/// [`Category`] for retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] KubeError),
    #[error("decision log: {0}")]
    Audit(#[from] JournalError),
    #[error("applying the plan: {0}")]
    Apply(ApplyFailures),
    #[error("the AIPipeline has no namespace")]
    NotNamespaced,
    /// Vault is not in the state the plan asks for; the status says why.
    #[error("Vault: {0}")]
    Vault(#[from] VaultProblem),
    #[error(
        "the Vault state Secret {secret} is unreadable ({source}); restore it from a backup, or delete it and revoke this pipeline's leases by hand"
    )]
    VaultState {
        secret: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable label for the `result` of `portcullis_reconciles_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_error",
            Error::Audit(_) => "audit_error",
            // An unreadable state Secret stops the apply, as it always has.
            Error::Apply(_) | Error::VaultState { .. } => "apply_error",
            Error::NotNamespaced => "not_namespaced",
            Error::Vault(_) => "vault_error",
        }
    }

    pub fn category(&self) -> Category {
        match self {
            Error::Kube(_) | Error::Apply(_) => Category::Transient,
            Error::Audit(_) | Error::VaultState { .. } => Category::Internal,
            Error::NotNamespaced => Category::Invalid,
            Error::Vault(problem) => problem.category(),
        }
    }

    /// How long to wait before retrying, after `failures` failures in a row.
    pub fn retry_after(&self, failures: u32) -> Duration {
        self.category().retry_after(failures)
    }
}

/// Managed objects that could not be written (the others were).
#[derive(Debug, Default)]
pub struct ApplyFailures(pub Vec<ApplyFailure>);

/// One managed object that could not be written.
#[derive(Debug)]
pub struct ApplyFailure {
    /// The decision-log action: `create`, `update`, `drift-reverted` or `prune`.
    pub action: &'static str,
    /// `Kind namespace/name`.
    pub object: String,
    pub source: KubeError,
}

impl std::fmt::Display for ApplyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.action, self.object, self.source)
    }
}

impl std::fmt::Display for ApplyFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            failure.fmt(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_back_off_exponentially_and_the_rest_wait_by_category() {
        let secs = |c: Category, n| c.retry_after(n).as_secs();
        assert_eq!(
            (1..=8)
                .map(|n| secs(Category::Unavailable, n))
                .collect::<Vec<_>>(),
            [2, 4, 8, 16, 32, 64, 120, 120]
        );
        assert_eq!(secs(Category::Refused, 3), 8);
        assert_eq!(secs(Category::Transient, 9), 5);
        assert_eq!(secs(Category::Internal, 1), 30);
        assert_eq!(secs(Category::Invalid, 1), 300);
    }
}
