//! A Vault HTTP double for tests: an in-process HTTP server on `127.0.0.1` that follows Vault
//! 1.15's published HTTP API (the OpenAPI document in `tests/data/vault-openapi-1.15.json`)
//! route by route — same paths, methods, body field names, response envelope
//! (`{"data", "lease_id", "lease_duration", "renewable", "auth", "warnings", ...}`), error shape
//! (`{"errors": [...]}`) and status codes (400 bad request, 403 permission denied, 404 not found,
//! 405 unsupported operation, 503 sealed). It is NOT Vault: it implements the handful of routes
//! Portcullis needs, with Vault's semantics for those. The production path is always vaultrs
//! against a real Vault.
//!
//! ```ignore
//! let double = VaultDouble::start(VaultDoubleConfig::default().with_kube_client(client)).await;
//! let root = double.client();                        // a VaultClient with the root token
//! root.post("sys/policies/acl/reader", &json!({"policy": "path \"kv/data/a/*\" { capabilities = [\"read\"] }"})).await?;
//! let violations = double.openapi_violations();      // every request made, checked against the document
//! ```
//!
//! # Routes
//!
//! Methods as Vault's HTTP layer sees them: `LIST` is also `GET ?list=true` (the path gets a
//! trailing `/`), `POST` is also `PUT`. Mount parameters stand for the configured mounts
//! (defaults `kubernetes`, `database`, `kv`). "auth" is what the token needs: `-` none, else the
//! capability on the request path (`create` instead of `update` when the path has an existence
//! check and the item does not exist yet).
//!
//! | method | OpenAPI path | body fields read | auth |
//! |---|---|---|---|
//! | GET | `/sys/health` | | - |
//! | LIST | `/sys/policies/acl/` | | list |
//! | GET | `/sys/policies/acl/{name}` | | read |
//! | POST | `/sys/policies/acl/{name}` | policy | update |
//! | DELETE | `/sys/policies/acl/{name}` | | delete |
//! | POST | `/sys/capabilities-self` | paths, path | update |
//! | POST | `/sys/leases/renew` | lease_id, increment | update |
//! | POST | `/sys/leases/renew/{url_lease_id}` | increment | update |
//! | POST | `/sys/leases/revoke` | lease_id, sync | update |
//! | POST | `/sys/leases/revoke/{url_lease_id}` | sync | update |
//! | POST | `/sys/leases/lookup` | lease_id | update |
//! | POST | `/auth/token/create` | policies, ttl, lease, period, explicit_max_ttl, no_parent, no_default_policy, renewable, display_name, meta | update |
//! | GET | `/auth/token/lookup-self` | | read |
//! | POST | `/auth/token/renew-self` | increment | update |
//! | POST | `/auth/token/revoke-self` | | update |
//! | GET | `/auth/{kubernetes_mount_path}/config` | | read |
//! | POST | `/auth/{kubernetes_mount_path}/config` | kubernetes_host, kubernetes_ca_cert, token_reviewer_jwt, pem_keys, issuer, disable_iss_validation, disable_local_ca_jwt | update |
//! | LIST | `/auth/{kubernetes_mount_path}/role/` | | list |
//! | GET | `/auth/{kubernetes_mount_path}/role/{name}` | | read |
//! | POST | `/auth/{kubernetes_mount_path}/role/{name}` | bound_service_account_names, bound_service_account_namespaces, audience, alias_name_source, token_policies, policies, token_ttl, ttl, token_max_ttl, max_ttl, token_period, period, token_explicit_max_ttl, token_no_default_policy | create/update |
//! | DELETE | `/auth/{kubernetes_mount_path}/role/{name}` | | delete |
//! | POST | `/auth/{kubernetes_mount_path}/login` | role, jwt | - |
//! | LIST | `/{database_mount_path}/roles/` | | list |
//! | GET | `/{database_mount_path}/roles/{name}` | | read |
//! | POST | `/{database_mount_path}/roles/{name}` | db_name, creation_statements, revocation_statements, rollback_statements, renew_statements, default_ttl, max_ttl | create/update |
//! | DELETE | `/{database_mount_path}/roles/{name}` | | delete |
//! | GET | `/{database_mount_path}/creds/{name}` | | read |
//! | GET | `/{kv_v2_mount_path}/data/{path}` | | read |
//! | POST | `/{kv_v2_mount_path}/data/{path}` | data, options | create/update |
//! | DELETE | `/{kv_v2_mount_path}/data/{path}` | | delete |
//! | GET | `/{kv_v2_mount_path}/metadata/{path}` | | read |
//! | LIST | `/{kv_v2_mount_path}/metadata/{path}/` | | list |
//! | DELETE | `/{kv_v2_mount_path}/metadata/{path}` | | delete |
//!
//! Declared-but-ignored body fields (accepted, recorded in [`RecordedRequest::ignored_fields`]):
//! `token` (capabilities-self, renew-self); `entity_alias`, `id`, `num_uses`, `type`
//! (token/create); `bound_cidrs`, `token_bound_cidrs`, `num_uses`, `token_num_uses`, `token_type`
//! (Kubernetes role); `credential_config`, `credential_type` (database role); `version` (kv
//! write). Any other unknown field gets Vault's warning "Endpoint ignored these unrecognized
//! parameters: [...]" (and a 204 becomes a 200 carrying it).
//!
//! # Semantics
//!
//! - **Policies** are parsed as HCL ([`hcl`]) and enforced on every request with a token
//!   ([`acl`]: exact > most specific glob by Vault's priority rules; `deny` wins; `root` allows
//!   all; `default` is built in and attached to every token unless `no_default_policy`).
//!   Requests without a valid token get 403 `permission denied`, before any 404/405.
//! - **Tokens**: the root token ([`VaultDouble::root_token`]) never expires. Others expire by
//!   the wall clock (`expires_at`); TTLs follow Vault's `CalculateTTL` (default and max lease TTL
//!   768h unless configured; `period` tokens renew to the period with no max; `explicit_max_ttl`
//!   caps everything). Revoking or expiring a token revokes its child tokens (not orphans) and
//!   every lease it created. Kubernetes-login tokens are orphans.
//! - **Kubernetes login**: the JWT's claims are read without verifying the signature (as the
//!   plugin does without `pem_keys`), the role's audience, bound names and namespaces are checked
//!   (globs `*`, `prefix*`, `*suffix`), then a real `authentication.k8s.io/v1 TokenReview` is
//!   created with the configured `kube::Client`, and its user (`system:serviceaccount:NS:NAME`,
//!   UID) must match the claims. The auth mount must have been configured
//!   (`POST auth/<mount>/config`), as in Vault; `kubernetes_host` etc. are recorded only.
//! - **Database creds** issue a lease `database/creds/<role>/<24 chars>` owned by the calling
//!   token, TTL `default_ttl` capped by `max_ttl`; `sys/leases/renew` extends up to `max_ttl`
//!   (the last renewals shrink, with Vault's warning). No database is involved: the username and
//!   password are made up. Every lease ever issued stays in [`VaultDouble::leases`] with its
//!   state (active, expired, revoked) and when/why it ended. Expiry is checked on every request,
//!   on every inspection call and by a background sweep.
//! - **kv-v2**: versions (10 kept), soft delete, metadata, list.
//! - **Faults** (thread-safe, at runtime): [`VaultDouble::seal`] (503 `Vault is sealed` on every
//!   route but `sys/health`, which reports `sealed: true` with 503), [`VaultDouble::fail_next`],
//!   [`VaultDouble::set_latency`], [`VaultDouble::hang`]. Every request is logged before faults
//!   apply ([`VaultDouble::request_log`]).
//!
//! Not implemented (fidelity limits): response wrapping, namespaces, entities and identity
//! templating, batch tokens, `num_uses`, CIDR bindings, policy parameter constraints
//! (`allowed_parameters` etc. are parsed, not enforced), database connection configuration
//! (`database/config/*`), token roles, the `bound_service_account_namespace_selector` (not in
//! 1.15's document).
#![allow(
    clippy::too_many_lines,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "the Vault double is retired by issue 10 (real OpenBao); not worth reshaping first"
)]
#![allow(dead_code)]

pub(crate) mod acl;
pub(crate) mod client;
mod handlers;
pub(crate) mod hcl;
pub(crate) mod openapi;
pub(crate) mod routes;
mod server;
mod state;
pub(crate) mod util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hyper::Method;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[allow(unused_imports)]
pub(crate) use acl::Operation;
#[allow(unused_imports)]
pub(crate) use client::{ClientError, VaultClient, VaultResponse};
#[allow(unused_imports)]
pub(crate) use openapi::{
    Mounts, check_requests, check_route_table, openapi_check, openapi_check_with,
};
#[allow(unused_imports)]
pub(crate) use routes::{Kind, ROUTES, RouteSpec};
#[allow(unused_imports)]
pub(crate) use state::{
    DatabaseRole, KubernetesAuthConfig, KubernetesRole, LeaseInfo, LeaseState, RevokeCause,
    TokenInfo,
};

use server::{Shared, lock};
use state::{NewToken, Settings, State, StoredPolicy};

/// How to start a double.
#[derive(Clone)]
pub(crate) struct VaultDoubleConfig {
    /// The client the Kubernetes login creates `TokenReview`s with (the test API server's
    /// admin client). Without it, logins answer 500.
    pub kube_client: Option<kube::Client>,
    /// The Kubernetes auth mount (`auth/<this>/...`).
    pub kubernetes_mount: String,
    /// The database secrets mount.
    pub database_mount: String,
    /// The kv-v2 mount.
    pub kv_mount: String,
    /// The root token; random (`hvs.` + 24 characters) when `None`.
    pub root_token: Option<String>,
    /// The system default lease TTL (Vault's default: 768h).
    pub default_lease_ttl: Duration,
    /// The system max lease TTL (Vault's default: 768h).
    pub max_lease_ttl: Duration,
    /// How often the background sweep expires tokens and leases.
    pub sweep_interval: Duration,
    /// What `sys/health` reports as `version`.
    pub version: String,
}

impl Default for VaultDoubleConfig {
    fn default() -> Self {
        VaultDoubleConfig {
            kube_client: None,
            kubernetes_mount: "kubernetes".into(),
            database_mount: "database".into(),
            kv_mount: "kv".into(),
            root_token: None,
            default_lease_ttl: Duration::from_secs(768 * 3600),
            max_lease_ttl: Duration::from_secs(768 * 3600),
            sweep_interval: Duration::from_millis(100),
            version: "1.15.0".into(),
        }
    }
}

impl VaultDoubleConfig {
    pub(crate) fn with_kube_client(mut self, client: kube::Client) -> Self {
        self.kube_client = Some(client);
        self
    }

    pub(crate) fn with_root_token(mut self, token: impl Into<String>) -> Self {
        self.root_token = Some(token.into());
        self
    }

    pub(crate) fn with_mounts(mut self, kubernetes: &str, database: &str, kv: &str) -> Self {
        self.kubernetes_mount = kubernetes.trim_matches('/').into();
        self.database_mount = database.trim_matches('/').into();
        self.kv_mount = kv.trim_matches('/').into();
        self
    }

    pub(crate) fn with_lease_ttls(mut self, default_ttl: Duration, max_ttl: Duration) -> Self {
        self.default_lease_ttl = default_ttl;
        self.max_lease_ttl = max_ttl;
        self
    }
}

/// One request the double received.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecordedRequest {
    /// As received (`LIST`, or `GET` with `?list=true` in `path`; `PUT` stays `PUT`).
    pub method: Method,
    /// The path with its query string, e.g. `/v1/sys/policies/acl?list=true`.
    pub path: String,
    /// The top-level keys of the JSON body.
    pub body_fields: Vec<String>,
    /// Body fields the document declares for the route but the double does not act on.
    pub ignored_fields: Vec<String>,
    /// The status answered; `None` while the request is still pending (e.g. hung).
    pub status: Option<u16>,
    pub received_at: DateTime<Utc>,
    /// The accessor of the (valid) token it carried.
    pub token_accessor: Option<String>,
}

struct Inner {
    addr: SocketAddr,
    root_token: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        // Let hung requests go so their connections close.
        self.shared.hang.send_replace(false);
    }
}

/// A running double. Cloning shares it; it stops when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct VaultDouble {
    inner: Arc<Inner>,
}

impl VaultDouble {
    /// Binds `127.0.0.1:0` and serves from a thread of its own (with its own tokio runtime), so
    /// the double keeps answering while the test's thread is busy or blocked. The Kubernetes
    /// login still uses `config.kube_client`, which lives on the runtime that created it.
    pub(crate) async fn start(config: VaultDoubleConfig) -> VaultDouble {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind the Vault HTTP double on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the double's address");
        let root_token = config
            .root_token
            .clone()
            .unwrap_or_else(|| format!("hvs.{}", util::random_base62(24)));
        let now = Utc::now();
        let state = State::new(
            Settings {
                default_lease_ttl: config.default_lease_ttl,
                max_lease_ttl: config.max_lease_ttl,
            },
            &root_token,
            now,
        );
        let (hang, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            log: Mutex::new(Vec::new()),
            sealed: AtomicBool::new(false),
            fail_next: Mutex::new((0, 500)),
            latency: Mutex::new(Duration::ZERO),
            hang,
            kube: config.kube_client.clone(),
            mounts: routes::MountNames {
                kubernetes: config.kubernetes_mount.clone(),
                database: config.database_mount.clone(),
                kv: config.kv_mount.clone(),
            },
            version: config.version.clone(),
            cluster_id: util::uuid(None),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let server_shared = shared.clone();
        let sweep_interval = config.sweep_interval;
        std::thread::Builder::new()
            .name(format!("vault-double-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the Vault HTTP double");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("register the listener");
                    let sweeper = tokio::spawn(server::sweep(
                        server_shared.clone(),
                        sweep_interval,
                        shutdown_rx.clone(),
                    ));
                    server::serve(listener, server_shared, shutdown_rx).await;
                    sweeper.abort();
                });
            })
            .expect("spawn the Vault HTTP double's thread");
        VaultDouble {
            inner: Arc::new(Inner {
                addr,
                root_token,
                shared,
                shutdown,
            }),
        }
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared().state_at(Utc::now())
    }

    /// `http://127.0.0.1:PORT` (what `VAULT_ADDR` would be).
    pub(crate) fn address(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub(crate) fn socket_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub(crate) fn root_token(&self) -> &str {
        &self.inner.root_token
    }

    /// A client with the root token.
    pub(crate) fn client(&self) -> VaultClient {
        VaultClient::new(self.inner.addr).with_token(self.root_token())
    }

    /// A client without a token.
    pub(crate) fn anonymous_client(&self) -> VaultClient {
        VaultClient::new(self.inner.addr)
    }

    /// The mounts, for [`openapi_check_with`].
    pub(crate) fn mounts(&self) -> Mounts {
        let m = &self.shared().mounts;
        Mounts::empty()
            .secrets(&m.kv, "kv_v2")
            .secrets(&m.database, "database")
            .auth(&m.kubernetes, "kubernetes")
    }

    // -----------------------------------------------------------------------------------------
    // Inspection

    /// Every lease ever issued, in issue order, with its current state.
    pub(crate) fn leases(&self) -> Vec<LeaseInfo> {
        self.state().leases.iter().map(|l| l.info.clone()).collect()
    }

    /// The leases that are neither expired nor revoked.
    pub(crate) fn active_leases(&self) -> Vec<LeaseInfo> {
        self.leases()
            .into_iter()
            .filter(|l| l.state == LeaseState::Active)
            .collect()
    }

    pub(crate) fn lease(&self, lease_id: &str) -> Option<LeaseInfo> {
        let mut state = self.state();
        state.lease_mut(lease_id).map(|l| l.info.clone())
    }

    /// Every token ever issued (the root token included), oldest first.
    pub(crate) fn tokens(&self) -> Vec<TokenInfo> {
        let mut tokens: Vec<TokenInfo> = self
            .state()
            .tokens
            .values()
            .map(|t| t.info.clone())
            .collect();
        tokens.sort_by_key(|t| t.issued_at);
        tokens
    }

    /// A token by id or accessor.
    pub(crate) fn token(&self, id_or_accessor: &str) -> Option<TokenInfo> {
        let state = self.state();
        let id = state
            .by_accessor
            .get(id_or_accessor)
            .map(String::as_str)
            .unwrap_or(id_or_accessor);
        state.tokens.get(id).map(|t| t.info.clone())
    }

    /// Policy name → raw text (`default` included; `root` has no text and is not listed).
    pub(crate) fn policies(&self) -> BTreeMap<String, String> {
        self.state()
            .policies
            .iter()
            .map(|(k, v)| (k.clone(), v.raw.clone()))
            .collect()
    }

    pub(crate) fn policy(&self, name: &str) -> Option<String> {
        self.state().policies.get(name).map(|p| p.raw.clone())
    }

    /// The parsed policy.
    pub(crate) fn parsed_policy(&self, name: &str) -> Option<hcl::Policy> {
        self.state().policies.get(name).map(|p| p.parsed.clone())
    }

    pub(crate) fn kubernetes_config(&self) -> Option<KubernetesAuthConfig> {
        self.state().kube_config.clone()
    }

    pub(crate) fn kubernetes_roles(&self) -> BTreeMap<String, KubernetesRole> {
        self.state().kube_roles.clone()
    }

    pub(crate) fn database_roles(&self) -> BTreeMap<String, DatabaseRole> {
        self.state().db_roles.clone()
    }

    /// The current, not deleted, version of a kv secret (path below the mount, no `data/`).
    pub(crate) fn kv(&self, path: &str) -> Option<Map<String, Value>> {
        let state = self.state();
        let secret = state.kv.get(path)?;
        let v = secret.versions.get(&secret.current)?;
        (v.deleted.is_none() && !v.destroyed).then(|| v.data.clone())
    }

    /// What `sys/capabilities-self` would answer for `token` on `path` (`["deny"]` for an
    /// invalid token).
    pub(crate) fn capabilities(&self, token: &str, path: &str) -> Vec<String> {
        let state = self.state();
        match state.active_token(token) {
            Some(t) => state.acl_for(t).capabilities(path),
            None => vec!["deny".into()],
        }
    }

    /// Whether `token` may do `op` on `path` (ACL only; create vs update is the caller's choice).
    pub(crate) fn allows(&self, token: &str, op: Operation, path: &str) -> bool {
        let state = self.state();
        state
            .active_token(token)
            .is_some_and(|t| state.acl_for(t).allows(op, path))
    }

    // -----------------------------------------------------------------------------------------
    // Seeding without HTTP (not logged)

    /// An orphan token with `policies` (plus `default`) and `ttl` (zero: the 768h default);
    /// returns its id.
    pub(crate) fn create_token(&self, policies: &[&str], ttl: Duration) -> String {
        let mut state = self.state();
        let now = Utc::now();
        let requested: Vec<String> = policies.iter().map(|p| p.to_string()).collect();
        let policies = util::sanitize_policies(&requested, true);
        let never_expires = ttl.is_zero() && policies == ["root"];
        let (ttl, _) = if never_expires {
            (Duration::ZERO, Vec::new())
        } else {
            state
                .calculate_ttl(
                    Duration::ZERO,
                    ttl,
                    Duration::ZERO,
                    Duration::ZERO,
                    Duration::ZERO,
                    now,
                    now,
                )
                .expect("a valid TTL")
        };
        state
            .issue_token(
                NewToken {
                    policies,
                    display_name: "token".into(),
                    path: "auth/token/create".into(),
                    meta: BTreeMap::new(),
                    parent: None,
                    ttl,
                    backend_ttl: ttl,
                    backend_max_ttl: Duration::ZERO,
                    period: None,
                    explicit_max_ttl: None,
                    renewable: true,
                    role: None,
                    never_expires,
                },
                now,
            )
            .info
            .id
    }

    /// Writes a policy (parsed as HCL; the error is the parser's).
    pub(crate) fn put_policy(&self, name: &str, text: &str) -> Result<(), String> {
        let parsed = hcl::parse_policy(text)?;
        self.state().policies.insert(
            name.to_lowercase(),
            StoredPolicy {
                raw: text.to_string(),
                parsed,
            },
        );
        Ok(())
    }

    /// Revokes a token (and its children and leases) now.
    pub(crate) fn revoke_token(&self, id_or_accessor: &str) {
        let mut state = self.state();
        let id = state
            .by_accessor
            .get(id_or_accessor)
            .cloned()
            .unwrap_or_else(|| id_or_accessor.to_string());
        state.revoke_token(&id, Utc::now());
    }

    // -----------------------------------------------------------------------------------------
    // Faults

    /// Every route but `sys/health` answers 503 `Vault is sealed`; `sys/health` reports sealed.
    pub(crate) fn seal(&self) {
        self.shared().sealed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn unseal(&self) {
        self.shared().sealed.store(false, Ordering::SeqCst);
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.shared().sealed.load(Ordering::SeqCst)
    }

    /// The next `n` requests (any route) are answered `status` with
    /// `{"errors": ["injected failure (Vault HTTP double)"]}`, without touching the state.
    pub(crate) fn fail_next(&self, n: u32, status: u16) {
        *lock(&self.shared().fail_next) = (n, status);
    }

    /// Every request waits `latency` before being handled (zero: none).
    pub(crate) fn set_latency(&self, latency: Duration) {
        *lock(&self.shared().latency) = latency;
    }

    /// While `true`, requests get no answer (they are logged, then wait); `false` lets them go.
    pub(crate) fn hang(&self, hang: bool) {
        self.shared().hang.send_replace(hang);
    }

    // -----------------------------------------------------------------------------------------
    // Request log

    /// `(method, path with query, body field names)` of every request, oldest first.
    pub(crate) fn requests(&self) -> Vec<(Method, String, Vec<String>)> {
        lock(&self.shared().log)
            .iter()
            .map(|r| (r.method.clone(), r.path.clone(), r.body_fields.clone()))
            .collect()
    }

    /// Every request with its status, ignored fields, time and token accessor.
    pub(crate) fn request_log(&self) -> Vec<RecordedRequest> {
        lock(&self.shared().log).clone()
    }

    pub(crate) fn clear_requests(&self) {
        lock(&self.shared().log).clear();
    }

    /// Every logged request checked against the OpenAPI document with this double's mounts;
    /// one message per request that is not in the document as sent.
    pub(crate) fn openapi_violations(&self) -> Vec<String> {
        check_requests(&self.mounts(), &self.request_log())
    }
}

/// How the operator's side of the double is set up, as the README's "Setting up Vault" says.
pub(crate) struct OperatorSetup<'a> {
    /// The operator's ServiceAccount, `namespace/name`.
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The audience its login token carries, if the role checks one.
    pub audience: Option<&'a str>,
    /// The operator token's `token_period`.
    pub period: &'a str,
    /// Database roles to create, with their default and max TTL.
    pub database_roles: &'a [&'a str],
    pub database_ttl: &'a str,
    pub database_max_ttl: &'a str,
}

impl VaultDouble {
    /// Kubernetes auth (against the test control plane), the operator's policy from
    /// `deploy/vault/portcullis-operator.hcl`, a periodic role for the operator's
    /// ServiceAccount, and the database roles.
    pub(crate) async fn set_up_for_operator(&self, setup: &OperatorSetup<'_>) {
        let policy = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/vault/portcullis-operator.hcl"),
        )
        .expect("the operator's Vault policy");
        let mut role = serde_json::json!({
            "bound_service_account_names": [setup.service_account],
            "bound_service_account_namespaces": [setup.namespace],
            "token_policies": ["portcullis-operator"],
            "token_period": setup.period,
        });
        if let Some(audience) = setup.audience {
            role["audience"] = audience.into();
        }
        let mut writes = vec![
            (
                "auth/kubernetes/config".to_string(),
                serde_json::json!({"kubernetes_host": super::control_plane().server_url()}),
            ),
            (
                "sys/policies/acl/portcullis-operator".to_string(),
                serde_json::json!({"policy": policy}),
            ),
            ("auth/kubernetes/role/portcullis-operator".to_string(), role),
        ];
        for name in setup.database_roles {
            writes.push((
                format!("database/roles/{name}"),
                serde_json::json!({
                    "db_name": "features",
                    "creation_statements": ["CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}';"],
                    "default_ttl": setup.database_ttl,
                    "max_ttl": setup.database_max_ttl,
                }),
            ));
        }
        let root = self.client();
        for (path, body) in writes {
            let r = root
                .post(&path, &body)
                .await
                .expect("the Vault double answers");
            assert!(r.status < 300, "{path}: {} {:?}", r.status, r.errors());
        }
    }
}
