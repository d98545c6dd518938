//! Vault: the operator's session (login, token renewal) and the typed calls it makes.
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
//! - keeps the token in a Secret in its own namespace, so a restarted or new leader goes on
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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::sync::RwLock;
use tracing::{info, warn};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

/// Where the operator's Vault token is kept, in its own namespace.
pub const TOKEN_SECRET: &str = "portcullis-vault-token";

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
    /// The operator's own namespace: its token Secret and the lease state Secrets live there.
    pub state_namespace: String,
}

/// A failed Vault call, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Vault could not be reached, timed out, is sealed, or failed (5xx): retry later.
    #[error("Vault is unavailable: {0}")]
    Unavailable(String),
    /// Vault refused the request (4xx): a permission or configuration problem.
    #[error("Vault refused the request: {0}")]
    Refused(String),
    /// The operator cannot log in.
    #[error("cannot log in to Vault: {0}")]
    Login(String),
    /// Keeping the operator's token in its Secret failed.
    #[error("Kubernetes API while keeping the Vault token: {0}")]
    Kube(String),
}

impl VaultError {
    pub fn from_client(operation: &str, e: ClientError) -> VaultError {
        match e {
            ClientError::APIError { code, errors } if code < 500 => {
                VaultError::Refused(format!("{operation}: HTTP {code}: {}", errors.join("; ")))
            }
            ClientError::APIError { code, errors } => {
                VaultError::Unavailable(format!("{operation}: HTTP {code}: {}", errors.join("; ")))
            }
            other => VaultError::Unavailable(format!("{operation}: {}", chain(&other))),
        }
    }

    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            VaultError::Unavailable(_) => "unavailable",
            VaultError::Refused(_) => "refused",
            VaultError::Login(_) => "login_failed",
            VaultError::Kube(_) => "kube_error",
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

/// The operator's Vault session: a client with a valid token, renewed in the background.
pub struct Session {
    config: VaultConfig,
    kube: kube::Client,
    client: RwLock<VaultClient>,
    /// Seconds the token had left at its last login, lookup or renewal, and whether it can be
    /// renewed.
    token_ttl: std::sync::Mutex<Option<(u64, bool)>>,
}

impl Session {
    /// A session without a token yet: the first call logs in (or resumes the kept token).
    pub fn new(config: VaultConfig, kube: kube::Client) -> Result<Arc<Session>, String> {
        let client = build_client(&config, "")?;
        Ok(Arc::new(Session {
            config,
            kube,
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
        if let Some(token) = self.kept_token().await? {
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
        let jwt = std::fs::read_to_string(&self.config.auth_token_path).map_err(|e| {
            VaultError::Login(format!(
                "reading the ServiceAccount token {}: {e}; set --vault-auth-token-path",
                self.config.auth_token_path.display()
            ))
        })?;
        let auth = endpoints::kubernetes_login(
            client,
            &self.config.auth_mount,
            &self.config.auth_role,
            jwt.trim(),
        )
        .await
        .map_err(|e| match e {
            ClientError::APIError { code, errors } if code < 500 => VaultError::Login(format!(
                "auth/{}/login as role {}: HTTP {code}: {}; check the role's bound ServiceAccount names and namespaces",
                self.config.auth_mount,
                self.config.auth_role,
                errors.join("; ")
            )),
            other => VaultError::from_client(&format!("auth/{}/login", self.config.auth_mount), other),
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
        self.keep_token(&auth.client_token).await
    }

    async fn kept_token(&self) -> Result<Option<String>, VaultError> {
        let api: Api<Secret> = Api::namespaced(self.kube.clone(), &self.config.state_namespace);
        let secret = api.get_opt(TOKEN_SECRET).await.map_err(|e| {
            VaultError::Kube(format!(
                "reading Secret {}/{TOKEN_SECRET}: {e}",
                self.config.state_namespace
            ))
        })?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|d| d.get("token").cloned())
            .and_then(|b| String::from_utf8(b.0).ok())
            .filter(|t| !t.is_empty()))
    }

    async fn keep_token(&self, token: &str) -> Result<(), VaultError> {
        let api: Api<Secret> = Api::namespaced(self.kube.clone(), &self.config.state_namespace);
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": TOKEN_SECRET,
                "labels": {"app.kubernetes.io/managed-by": "portcullis"},
            },
            "type": "Opaque",
            "stringData": {"token": token},
        });
        api.patch(
            TOKEN_SECRET,
            &PatchParams::apply(crate::k8s::FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| {
            VaultError::Kube(format!(
                "writing Secret {}/{TOKEN_SECRET}: {e}",
                self.config.state_namespace
            ))
        })?;
        Ok(())
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

fn build_client(config: &VaultConfig, token: &str) -> Result<VaultClient, String> {
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
        .map_err(|e| format!("--vault-address {}: {e}", config.address))?;
    VaultClient::new(settings)
        .map_err(|e| format!("--vault-address {}: {}", config.address, chain(&e)))
}
