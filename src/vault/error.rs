//! How a Vault call, the operator's login, or keeping its token fails.

use std::path::PathBuf;

use vaultrs::error::ClientError;

/// A [`TokenStore`](super::TokenStore) that failed: what it was doing, and why.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}")]
pub struct TokenStoreError {
    /// Such as `reading Secret portcullis-system/portcullis-vault-token`.
    pub action: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}
/// A failed Vault call, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Vault could not be reached or timed out: retry later.
    #[error("Vault is unavailable: {operation}: {}", chain(source))]
    Unreachable {
        operation: String,
        #[source]
        source: ClientError,
    },
    /// Vault answered with a server error (5xx, such as sealed): retry later.
    #[error("Vault is unavailable: {operation}: HTTP {code}: {}", errors.join("; "))]
    ServerError {
        operation: String,
        code: u16,
        errors: Vec<String>,
    },
    /// Vault refused the request (4xx): a permission or configuration problem.
    #[error("Vault refused the request: {operation}: HTTP {code}: {}", errors.join("; "))]
    Refused {
        operation: String,
        code: u16,
        errors: Vec<String>,
    },
    /// The operator's ServiceAccount token, which it logs in with, cannot be read.
    #[error(
        "cannot log in to Vault: reading the ServiceAccount token {}: {source}; set --vault-auth-token-path",
        path.display()
    )]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Vault refused the operator's login.
    #[error(
        "cannot log in to Vault: auth/{mount}/login as role {role}: HTTP {code}: {}; check the role's bound ServiceAccount names and namespaces",
        errors.join("; ")
    )]
    LoginRefused {
        mount: String,
        role: String,
        code: u16,
        errors: Vec<String>,
    },
    /// Keeping the operator's token in its [`TokenStore`](super::TokenStore) failed.
    #[error("keeping the operator's Vault token: {0}")]
    TokenStore(#[source] TokenStoreError),
    /// The call was not made: every slot it may take (of `--vault-max-concurrent-requests`)
    /// stayed busy with other, slow calls for as long as one call may take.
    #[error(
        "waiting for a Vault call slot: {operation} was not sent, all {slots} slots it may take stayed busy for {}s (Vault answers slowly); it is retried. If Vault can take more at once, raise --vault-max-concurrent-requests",
        waited.as_secs()
    )]
    Busy {
        operation: String,
        /// How many slots the call could have taken.
        slots: usize,
        /// How long it waited.
        waited: std::time::Duration,
    },
}

/// What a [`VaultError`] means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultErrorKind {
    /// Vault is unreachable or failing: retry later.
    Unavailable,
    /// Vault refused the request.
    Refused,
    /// The operator cannot log in.
    Login,
    /// The token store failed.
    TokenStore,
    /// The call waited for a free slot for too long and was not made.
    Busy,
}

impl VaultError {
    pub fn from_client(operation: &str, e: ClientError) -> VaultError {
        let operation = operation.to_string();
        match e {
            // 429: rate-limited (or a performance standby): wait, as for an outage; it is not a
            // refusal anyone must act on.
            ClientError::APIError { code, errors } if code < 500 && code != 429 => {
                VaultError::Refused {
                    operation,
                    code,
                    errors,
                }
            }
            ClientError::APIError { code, errors } => VaultError::ServerError {
                operation,
                code,
                errors,
            },
            source => VaultError::Unreachable { operation, source },
        }
    }

    pub fn kind(&self) -> VaultErrorKind {
        match self {
            VaultError::Unreachable { .. } | VaultError::ServerError { .. } => {
                VaultErrorKind::Unavailable
            }
            VaultError::Refused { .. } => VaultErrorKind::Refused,
            VaultError::TokenFile { .. } | VaultError::LoginRefused { .. } => VaultErrorKind::Login,
            VaultError::TokenStore(_) => VaultErrorKind::TokenStore,
            VaultError::Busy { .. } => VaultErrorKind::Busy,
        }
    }

    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self.kind() {
            VaultErrorKind::Unavailable => "unavailable",
            VaultErrorKind::Refused => "refused",
            VaultErrorKind::Login => "login_failed",
            // The token store is a Kubernetes Secret; the label predates the trait.
            VaultErrorKind::TokenStore => "kube_error",
            VaultErrorKind::Busy => "busy",
        }
    }
}

/// An error with its sources, on one line.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
/// The Vault client cannot be built from the settings.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("--vault-address {address}: {source}")]
    Settings {
        address: String,
        #[source]
        source: vaultrs::client::VaultClientSettingsBuilderError,
    },
    #[error("--vault-address {address}: {}", chain(source))]
    Client {
        address: String,
        #[source]
        source: ClientError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> ClientError {
        ClientError::APIError {
            code,
            errors: vec!["permission denied".into(), "twice".into()],
        }
    }

    #[test]
    fn client_errors_are_sorted_by_what_to_do_and_say_what_failed() {
        let refused = VaultError::from_client("policy_write", api(403));
        assert_eq!(refused.kind(), VaultErrorKind::Refused);
        assert_eq!(refused.label(), "refused");
        assert_eq!(
            refused.to_string(),
            "Vault refused the request: policy_write: HTTP 403: permission denied; twice"
        );
        let sealed = VaultError::from_client("issue", api(503));
        assert_eq!(sealed.kind(), VaultErrorKind::Unavailable);
        assert_eq!(sealed.label(), "unavailable");
        assert_eq!(
            sealed.to_string(),
            "Vault is unavailable: issue: HTTP 503: permission denied; twice"
        );
        let limited = VaultError::from_client("renew", api(429));
        assert_eq!(limited.kind(), VaultErrorKind::Unavailable);
        assert_eq!(limited.label(), "unavailable");
        let unreachable = VaultError::from_client("renew", ClientError::ResponseEmptyError);
        assert_eq!(unreachable.kind(), VaultErrorKind::Unavailable);
        assert_eq!(
            unreachable.to_string(),
            "Vault is unavailable: renew: The request returned an empty response"
        );
        let store = VaultError::TokenStore(TokenStoreError {
            action: "reading the token".into(),
            source: "gone".into(),
        });
        assert_eq!(store.label(), "kube_error");
        assert!(std::error::Error::source(&store).is_some());
    }
}
