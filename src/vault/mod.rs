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
pub mod leases;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;
use tracing::{info, warn};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

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
    /// The operator's own namespace: its token Secret and the lease state Secrets live there
    /// (the controller's business; the session only hands it back).
    pub state_namespace: String,
}

/// Where the operator's token is kept across restarts and leader changes, so that a new leader
/// resumes the token (and with it every lease it made) instead of logging in again.
pub trait TokenStore: Send + Sync + 'static {
    /// The kept token, if there is one.
    fn load(&self) -> impl Future<Output = Result<Option<String>, TokenStoreError>> + Send;
    /// Keeps `token`, replacing the one kept before.
    fn save(&self, token: &str) -> impl Future<Output = Result<(), TokenStoreError>> + Send;
}

/// A [`TokenStore`] that failed: what it was doing, and why.
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
    /// Keeping the operator's token in its [`TokenStore`] failed.
    #[error("keeping the operator's Vault token: {0}")]
    TokenStore(#[source] TokenStoreError),
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
}

impl VaultError {
    pub fn from_client(operation: &str, e: ClientError) -> VaultError {
        let operation = operation.to_string();
        match e {
            ClientError::APIError { code, errors } if code < 500 => VaultError::Refused {
                operation,
                code,
                errors,
            },
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
        }
    }
}

/// An error with its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The operator's Vault session: a client with a valid token, renewed in the background, kept
/// in `S`.
pub struct Session<S> {
    config: VaultConfig,
    store: S,
    client: RwLock<VaultClient>,
    /// Seconds the token had left at its last login, lookup or renewal, and whether it can be
    /// renewed.
    token_ttl: std::sync::Mutex<Option<(u64, bool)>>,
}

impl<S: TokenStore> Session<S> {
    /// A session without a token yet: the first call logs in (or resumes the token kept in
    /// `store`).
    pub fn new(config: VaultConfig, store: S) -> Result<Arc<Session<S>>, ClientBuildError> {
        let client = build_client(&config, "")?;
        Ok(Arc::new(Session {
            config,
            store,
            client: RwLock::new(client),
            token_ttl: std::sync::Mutex::new(None),
        }))
    }

    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// The client, with a token: resumes the kept token or logs in when there is none.
    pub async fn client(
        &self,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, VaultClient>, VaultError> {
        {
            let guard = self.client.read().await;
            if endpoints::has_token(&guard) {
                return Ok(guard);
            }
        }
        {
            let mut guard = self.client.write().await;
            if !endpoints::has_token(&guard) {
                self.establish(&mut guard).await?;
            }
        }
        Ok(self.client.read().await)
    }

    /// Forgets the token when Vault no longer knows it (the next call logs in again).
    pub async fn check_token(&self) {
        let invalid = {
            let guard = self.client.read().await;
            endpoints::has_token(&guard)
                && matches!(
                    endpoints::token_lookup_self(&guard).await,
                    Err(ClientError::APIError { code: 403, .. })
                )
        };
        if invalid {
            warn!("the operator's Vault token is no longer valid; logging in again");
            let mut guard = self.client.write().await;
            vaultrs::client::Client::set_token(&mut *guard, "");
        }
    }

    async fn establish(&self, client: &mut VaultClient) -> Result<(), VaultError> {
        // 1. The kept token, if Vault still knows it.
        let kept = self.store.load().await.map_err(VaultError::TokenStore)?;
        if let Some(token) = kept.filter(|t| !t.is_empty()) {
            vaultrs::client::Client::set_token(client, &token);
            match endpoints::token_lookup_self(client).await {
                Ok(lookup) if lookup.ttl > 0 => {
                    info!(
                        ttl_seconds = lookup.ttl,
                        period_seconds = lookup.period.unwrap_or(0),
                        "resumed the operator's kept Vault token"
                    );
                    *self.token_ttl.lock().expect("ttl lock") =
                        Some((lookup.ttl, lookup.renewable));
                    return Ok(());
                }
                Ok(_) | Err(ClientError::APIError { code: 403, .. }) => {
                    info!("the kept Vault token is no longer valid; logging in");
                }
                Err(e) => {
                    vaultrs::client::Client::set_token(client, "");
                    return Err(VaultError::from_client("auth/token/lookup-self", e));
                }
            }
            vaultrs::client::Client::set_token(client, "");
        }
        // 2. Log in with the ServiceAccount token.
        let jwt = std::fs::read_to_string(&self.config.auth_token_path).map_err(|source| {
            VaultError::TokenFile {
                path: self.config.auth_token_path.clone(),
                source,
            }
        })?;
        let auth = endpoints::kubernetes_login(
            client,
            &self.config.auth_mount,
            &self.config.auth_role,
            jwt.trim(),
        )
        .await
        .map_err(|e| match e {
            ClientError::APIError { code, errors } if code < 500 => VaultError::LoginRefused {
                mount: self.config.auth_mount.clone(),
                role: self.config.auth_role.clone(),
                code,
                errors,
            },
            other => {
                VaultError::from_client(&format!("auth/{}/login", self.config.auth_mount), other)
            }
        })?;
        vaultrs::client::Client::set_token(client, &auth.client_token);
        let lookup = endpoints::token_lookup_self(client)
            .await
            .map_err(|e| VaultError::from_client("auth/token/lookup-self", e))?;
        if lookup.period.unwrap_or(0) == 0 {
            warn!(
                role = %self.config.auth_role,
                ttl_seconds = lookup.ttl,
                "the operator's Vault token is not periodic: every credential lease ends when it reaches its max TTL; set token_period on the operator's role"
            );
        }
        info!(policies = ?auth.policies, ttl_seconds = auth.lease_duration, period_seconds = lookup.period.unwrap_or(0), "logged in to Vault");
        *self.token_ttl.lock().expect("ttl lock") = Some((auth.lease_duration, auth.renewable));
        self.store
            .save(&auth.client_token)
            .await
            .map_err(VaultError::TokenStore)
    }

    /// Renews the token at half its TTL, forever; a token Vault no longer knows is replaced by a
    /// new login at the next call.
    pub async fn keep_renewed(self: Arc<Self>) {
        loop {
            let wait = match *self.token_ttl.lock().expect("ttl lock") {
                Some((ttl, true)) => Duration::from_secs((ttl / 2).max(1)),
                // Not renewable: log in again at two thirds of its life.
                Some((ttl, false)) => Duration::from_secs((ttl * 2 / 3).max(1)),
                None => Duration::from_secs(2),
            };
            tokio::time::sleep(wait).await;
            let state = *self.token_ttl.lock().expect("ttl lock");
            match state {
                None => {}
                Some((_, false)) => {
                    let mut guard = self.client.write().await;
                    vaultrs::client::Client::set_token(&mut *guard, "");
                    *self.token_ttl.lock().expect("ttl lock") = None;
                }
                Some((_, true)) => {
                    let result = {
                        let guard = self.client.read().await;
                        endpoints::token_renew_self(&guard).await
                    };
                    match result {
                        Ok(ttl) => {
                            tracing::debug!(
                                ttl_seconds = ttl,
                                "renewed the operator's Vault token"
                            );
                            *self.token_ttl.lock().expect("ttl lock") = Some((ttl, true));
                        }
                        Err(ClientError::APIError {
                            code: 400 | 403,
                            errors,
                        }) => {
                            warn!(errors = ?errors, "renewing the operator's Vault token was refused; logging in again at the next call");
                            let mut guard = self.client.write().await;
                            vaultrs::client::Client::set_token(&mut *guard, "");
                            *self.token_ttl.lock().expect("ttl lock") = None;
                        }
                        Err(e) => {
                            warn!(error = %chain(&e), "renewing the operator's Vault token failed; retrying");
                            let mut state = self.token_ttl.lock().expect("ttl lock");
                            if let Some((ttl, _)) = state.as_mut() {
                                // Retry well before the token runs out.
                                *ttl = (*ttl / 4).max(2);
                            }
                        }
                    }
                }
            }
        }
    }
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

fn build_client(config: &VaultConfig, token: &str) -> Result<VaultClient, ClientBuildError> {
    // One TLS crypto provider in the process: ring, which kube uses too. vaultrs's HTTP client
    // is built without a provider of its own (feature `rustls-no-provider`) and takes this one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut settings = VaultClientSettingsBuilder::default();
    settings
        .address(&config.address)
        .token(token)
        .timeout(Some(config.request_timeout))
        .ca_certs(
            config
                .ca_cert
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        )
        .verify(true)
        .namespace(config.namespace.clone());
    let settings = settings
        .build()
        .map_err(|source| ClientBuildError::Settings {
            address: config.address.clone(),
            source,
        })?;
    VaultClient::new(settings).map_err(|source| ClientBuildError::Client {
        address: config.address.clone(),
        source,
    })
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
