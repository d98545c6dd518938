//! The operator's Vault session: login (or the kept token), renewal, and the client every call
//! goes through.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;
use tracing::{info, warn};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::endpoints;
use super::error::{ClientBuildError, VaultError, chain};
use super::{TokenStore, VaultConfig};

/// The operator's Vault session: a client with a valid token, renewed in the background, kept
/// in `S`.
pub struct Session<S> {
    config: VaultConfig,
    store: S,
    client: RwLock<VaultClient>,
    /// Seconds the token had left at its last login, lookup or renewal, and whether it can be
    /// renewed.
    token_ttl: std::sync::Mutex<Option<(u64, bool)>>,
    /// Counts the tokens the session has taken up (a kept one resumed, or a new login): when it
    /// changes, the leases issued before may be gone with the token that created them.
    generation: std::sync::atomic::AtomicU64,
    /// The current token's accessor (empty before the first token).
    accessor: std::sync::Mutex<String>,
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
            generation: std::sync::atomic::AtomicU64::new(0),
            accessor: std::sync::Mutex::default(),
        }))
    }

    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// How many tokens the session has taken up so far (0: none yet). A pipeline whose leases
    /// were last looked up under another generation looks them up again.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current token's accessor (empty before the first token).
    pub fn accessor(&self) -> String {
        self.accessor.lock().expect("accessor lock").clone()
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
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        Ok(self.client.read().await)
    }

    /// Forgets the token when Vault no longer knows it (the next call logs in again). Whether
    /// the caller's token is gone: Vault said so now, or another caller already dropped it.
    pub async fn check_token(&self) -> bool {
        let invalid = {
            let guard = self.client.read().await;
            if !endpoints::has_token(&guard) {
                return true;
            }
            matches!(
                endpoints::token_lookup_self(&guard).await,
                Err(ClientError::APIError { code: 403, .. })
            )
        };
        if invalid {
            warn!("the operator's Vault token is no longer valid; logging in again");
            let mut guard = self.client.write().await;
            vaultrs::client::Client::set_token(&mut *guard, "");
        }
        invalid
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
                    *self.accessor.lock().expect("accessor lock") = lookup.accessor;
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
        // Kept before it is used: a crash after its first lease must not lose the token that
        // lease lives and dies with.
        self.store
            .save(&auth.client_token)
            .await
            .map_err(VaultError::TokenStore)?;
        vaultrs::client::Client::set_token(client, &auth.client_token);
        let lookup = match endpoints::token_lookup_self(client).await {
            Ok(lookup) => lookup,
            Err(e) => {
                vaultrs::client::Client::set_token(client, "");
                return Err(VaultError::from_client("auth/token/lookup-self", e));
            }
        };
        if lookup.period.unwrap_or(0) == 0 {
            warn!(
                role = %self.config.auth_role,
                ttl_seconds = lookup.ttl,
                "the operator's Vault token is not periodic: every credential lease ends when it reaches its max TTL; set token_period on the operator's role"
            );
        }
        info!(policies = ?auth.policies, ttl_seconds = auth.lease_duration, period_seconds = lookup.period.unwrap_or(0), "logged in to Vault");
        *self.token_ttl.lock().expect("ttl lock") = Some((auth.lease_duration, auth.renewable));
        *self.accessor.lock().expect("accessor lock") = lookup.accessor;
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
