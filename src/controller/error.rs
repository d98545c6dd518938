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
    /// How long to wait before retrying, after `failures` failures in a row: doubling from a
    /// first delay up to a ceiling that depends on the category, then spread by up to a fifth
    /// either way ([`jitter`]) so that pipelines that failed together do not retry together.
    pub fn retry_after(self, failures: u32) -> Duration {
        jitter(self.base_delay(failures), failures)
    }

    /// [`Category::retry_after`] before the jitter.
    pub fn base_delay(self, failures: u32) -> Duration {
        let (first, ceiling): (u64, u64) = match self {
            // A conflict or a restarting API server: soon, then less often.
            Category::Transient => (1, 60),
            Category::Unavailable | Category::Refused => (2, 120),
            Category::Invalid => (300, 300),
            // The decision log or a state Secret: often enough to notice the fix quickly.
            Category::Internal => (2, 60),
        };
        let doublings = failures.clamp(1, 8) - 1;
        Duration::from_secs(first.saturating_mul(1u64 << doublings).min(ceiling))
    }
}

/// `delay` spread uniformly over ±20 %, from a per-process random state.
fn jitter(delay: Duration, failures: u32) -> Duration {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new()
        .hash_one((failures, std::time::SystemTime::now()));
    // In thousandths: 800 to 1200.
    let factor = 800 + random % 401;
    delay * u32::try_from(factor).expect("at most 1200") / 1000
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
    fn failures_back_off_exponentially_up_to_a_ceiling_by_category() {
        let secs = |c: Category, n| c.base_delay(n).as_secs();
        assert_eq!(
            (1..=9)
                .map(|n| secs(Category::Unavailable, n))
                .collect::<Vec<_>>(),
            [2, 4, 8, 16, 32, 64, 120, 120, 120]
        );
        assert_eq!(secs(Category::Refused, 3), 8);
        assert_eq!(
            (1..=8)
                .map(|n| secs(Category::Transient, n))
                .collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 60, 60]
        );
        assert_eq!(secs(Category::Internal, 1), 2);
        assert_eq!(secs(Category::Internal, 20), 60);
        assert_eq!(secs(Category::Invalid, 1), 300);
        assert_eq!(secs(Category::Transient, u32::MAX), 60);
    }

    #[test]
    fn retries_are_spread_so_that_pipelines_do_not_retry_in_step() {
        let delays: Vec<Duration> = (0..200)
            .map(|_| Category::Unavailable.retry_after(4))
            .collect();
        for d in &delays {
            assert!(
                (Duration::from_millis(12_800)..=Duration::from_millis(19_200)).contains(d),
                "{d:?}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 50,
            "{} distinct delays of 200",
            distinct.len()
        );
    }
}
