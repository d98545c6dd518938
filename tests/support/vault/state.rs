//! The double's state: policies, tokens, leases, the Kubernetes auth mount, the database and kv
//! mounts; Vault's TTL arithmetic; expiry.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::acl::Acl;
use super::hcl::{self, Policy};
use super::util;

/// Vault 1.15's built-in `default` policy (the identity-templated paths never match here: tokens
/// of the double have no entity).
pub(super) const DEFAULT_POLICY: &str = r#"
# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own entity by id or name
path "identity/entity/id/{{identity.entity.id}}" {
  capabilities = ["read"]
}
path "identity/entity/name/{{identity.entity.name}}" {
  capabilities = ["read"]
}


# Allow a token to look up its resultant ACL from all policies. This is useful
# for UIs. It is an internal path because the format may change at any time
# based on how the internal ACL features and capabilities change.
path "sys/internal/ui/resultant-acl" {
    capabilities = ["read"]
}

# Allow a token to renew a lease via lease_id in the request body; old path for
# old clients, new path for newer
path "sys/renew" {
    capabilities = ["update"]
}
path "sys/leases/renew" {
    capabilities = ["update"]
}

# Allow looking up lease properties. This requires knowing the lease ID ahead
# of time and does not divulge any sensitive information.
path "sys/leases/lookup" {
    capabilities = ["update"]
}

# Allow a token to manage its own cubbyhole
path "cubbyhole/*" {
    capabilities = ["create", "read", "update", "delete", "list"]
}

# Allow a token to wrap arbitrary values in a response-wrapping token
path "sys/wrapping/wrap" {
    capabilities = ["update"]
}

# Allow a token to look up the creation time and TTL of a given
# response-wrapping token
path "sys/wrapping/lookup" {
    capabilities = ["update"]
}

# Allow a token to unwrap a response-wrapping token. This is a convenience to
# avoid client token swapping since this is also part of the response wrapping
# policy.
path "sys/wrapping/unwrap" {
    capabilities = ["update"]
}

# Allow general purpose tools
path "sys/tools/hash" {
    capabilities = ["update"]
}
path "sys/tools/hash/*" {
    capabilities = ["update"]
}

# Allow checking the status of a Control Group request if the user has the
# accessor
path "sys/control-group/request" {
    capabilities = ["update"]
}

# Allow a token to make requests to the Authorization Endpoint for OIDC providers.
path "identity/oidc/provider/+/authorize" {
    capabilities = ["read", "update"]
}
"#;

/// Where a lease or token is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    Active,
    /// Reached its expiry time.
    Expired,
    /// Revoked before its expiry.
    Revoked,
}

/// Why a lease was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RevokeCause {
    /// `sys/leases/revoke` (or the `/{url_lease_id}` form).
    Api,
    /// The token that created it was revoked (revoke-self, or a parent's revocation).
    TokenRevoked,
    /// The token that created it expired.
    TokenExpired,
}

/// A dynamic-secret lease, as the double keeps it (every lease ever issued stays listed).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LeaseInfo {
    pub lease_id: String,
    /// The path read to issue it, e.g. `database/creds/reader`.
    pub path: String,
    pub role: String,
    /// The accessor of the token that read the credentials (and owns the lease).
    pub token_accessor: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub last_renewal: Option<DateTime<Utc>>,
    pub renewals: u32,
    pub renewable: bool,
    pub state: LeaseState,
    /// When it expired or was revoked.
    pub ended_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<RevokeCause>,
    /// The `username` handed out with it.
    pub username: String,
}

/// A token, as the double keeps it (revoked and expired tokens stay listed).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenInfo {
    pub id: String,
    pub accessor: String,
    pub policies: Vec<String>,
    pub display_name: String,
    /// The path that created it: `auth/token/root`, `auth/token/create`, `auth/<mount>/login`.
    pub path: String,
    pub meta: BTreeMap<String, String>,
    pub orphan: bool,
    pub parent_accessor: Option<String>,
    pub issued_at: DateTime<Utc>,
    /// `None`: never expires (root).
    pub expires_at: Option<DateTime<Utc>>,
    pub last_renewal: Option<DateTime<Utc>>,
    pub renewals: u32,
    /// The TTL it was created with.
    pub creation_ttl: Duration,
    pub period: Option<Duration>,
    pub explicit_max_ttl: Option<Duration>,
    pub renewable: bool,
    /// The Kubernetes auth role it logged in with.
    pub role: Option<String>,
    pub state: LeaseState,
    pub ended_at: Option<DateTime<Utc>>,
}

/// What `POST auth/<mount>/config` recorded.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct KubernetesAuthConfig {
    pub kubernetes_host: String,
    pub kubernetes_ca_cert: String,
    pub token_reviewer_jwt: String,
    pub pem_keys: Vec<String>,
    pub issuer: String,
    pub disable_iss_validation: bool,
    pub disable_local_ca_jwt: bool,
}

/// A Kubernetes auth role.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct KubernetesRole {
    pub name: String,
    pub bound_service_account_names: Vec<String>,
    pub bound_service_account_namespaces: Vec<String>,
    pub audience: String,
    pub alias_name_source: String,
    pub token_policies: Vec<String>,
    pub token_ttl: Duration,
    pub token_max_ttl: Duration,
    pub token_period: Duration,
    pub token_explicit_max_ttl: Duration,
    pub token_no_default_policy: bool,
    /// Deprecated field names the role was written with (`policies`, `ttl`, `max_ttl`,
    /// `period`), echoed on read as Vault does.
    pub legacy_fields: Vec<String>,
}

/// A database role.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct DatabaseRole {
    pub name: String,
    pub db_name: String,
    pub creation_statements: Vec<String>,
    pub revocation_statements: Vec<String>,
    pub rollback_statements: Vec<String>,
    pub renew_statements: Vec<String>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct StoredPolicy {
    pub raw: String,
    pub parsed: Policy,
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub info: TokenInfo,
    /// Token id of the parent (`None` for orphans).
    pub parent: Option<String>,
    /// The TTL a renewal without increment gives (`auth.TTL`).
    pub backend_ttl: Duration,
    /// The max TTL from the role (`auth.MaxTTL`), zero for none.
    pub backend_max_ttl: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub info: LeaseInfo,
    /// Token id of the owner.
    pub owner: String,
}

#[derive(Debug, Clone)]
pub(crate) struct KvVersion {
    pub data: Map<String, Value>,
    pub created: DateTime<Utc>,
    pub deleted: Option<DateTime<Utc>>,
    pub destroyed: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct KvSecret {
    pub versions: BTreeMap<u64, KvVersion>,
    pub current: u64,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
}

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub default_lease_ttl: Duration,
    pub max_lease_ttl: Duration,
}

pub(crate) struct State {
    pub settings: Settings,
    pub policies: BTreeMap<String, StoredPolicy>,
    pub tokens: HashMap<String, Token>,
    pub by_accessor: HashMap<String, String>,
    pub leases: Vec<Lease>,
    pub lease_index: HashMap<String, usize>,
    pub kube_config: Option<KubernetesAuthConfig>,
    pub kube_roles: BTreeMap<String, KubernetesRole>,
    pub db_roles: BTreeMap<String, DatabaseRole>,
    pub kv: BTreeMap<String, KvSecret>,
}

/// What a new token gets.
pub(crate) struct NewToken {
    pub policies: Vec<String>,
    pub display_name: String,
    pub path: String,
    pub meta: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub ttl: Duration,
    pub backend_ttl: Duration,
    pub backend_max_ttl: Duration,
    pub period: Option<Duration>,
    pub explicit_max_ttl: Option<Duration>,
    pub renewable: bool,
    pub role: Option<String>,
    pub never_expires: bool,
}

impl State {
    pub(super) fn new(settings: Settings, root_token: &str, now: DateTime<Utc>) -> State {
        let mut state = State {
            settings,
            policies: BTreeMap::new(),
            tokens: HashMap::new(),
            by_accessor: HashMap::new(),
            leases: Vec::new(),
            lease_index: HashMap::new(),
            kube_config: None,
            kube_roles: BTreeMap::new(),
            db_roles: BTreeMap::new(),
            kv: BTreeMap::new(),
        };
        let parsed = hcl::parse_policy(DEFAULT_POLICY).expect("the default policy parses");
        state.policies.insert(
            "default".into(),
            StoredPolicy {
                raw: DEFAULT_POLICY.trim_start().to_string(),
                parsed,
            },
        );
        let accessor = util::random_base62(24);
        state
            .by_accessor
            .insert(accessor.clone(), root_token.into());
        state.tokens.insert(
            root_token.into(),
            Token {
                info: TokenInfo {
                    id: root_token.into(),
                    accessor,
                    policies: vec!["root".into()],
                    display_name: "root".into(),
                    path: "auth/token/root".into(),
                    meta: BTreeMap::new(),
                    orphan: true,
                    parent_accessor: None,
                    issued_at: now,
                    expires_at: None,
                    last_renewal: None,
                    renewals: 0,
                    creation_ttl: Duration::ZERO,
                    period: None,
                    explicit_max_ttl: None,
                    renewable: false,
                    role: None,
                    state: LeaseState::Active,
                    ended_at: None,
                },
                parent: None,
                backend_ttl: Duration::ZERO,
                backend_max_ttl: Duration::ZERO,
            },
        );
        state
    }

    /// The token `id` if it is active (call [`State::sweep`] first).
    pub(super) fn active_token(&self, id: &str) -> Option<&Token> {
        self.tokens
            .get(id)
            .filter(|t| t.info.state == LeaseState::Active)
    }

    /// The merged ACL of a token's policies (missing policies are skipped, as Vault does).
    pub(super) fn acl_for(&self, token: &Token) -> Acl {
        if token.info.policies.iter().any(|p| p == "root") {
            return Acl::root();
        }
        Acl::new(
            token
                .info
                .policies
                .iter()
                .filter_map(|name| self.policies.get(name).map(|p| (name.as_str(), &p.parsed))),
        )
    }

    /// `framework.CalculateTTL`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn calculate_ttl(
        &self,
        increment: Duration,
        backend_ttl: Duration,
        period: Duration,
        backend_max_ttl: Duration,
        explicit_max_ttl: Duration,
        start: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(Duration, Vec<String>), String> {
        let now_s = util::trunc_secs(now);
        let start_s = util::trunc_secs(start);
        let mut warnings = Vec::new();
        let mut max_ttl = self.settings.max_lease_ttl;
        if !backend_max_ttl.is_zero() && backend_max_ttl < max_ttl {
            max_ttl = backend_max_ttl;
        }
        if !explicit_max_ttl.is_zero() && explicit_max_ttl < max_ttl {
            max_ttl = explicit_max_ttl;
        }
        if max_ttl.is_zero() {
            return Err("max TTL must be greater than zero".into());
        }
        let mut ttl;
        let max_valid: Option<DateTime<Utc>>;
        if !period.is_zero() {
            let mut period = period;
            if period > max_ttl {
                warnings.push(format!(
                    "period of {:?} exceeded the effective max_ttl of {:?}; period value is capped accordingly",
                    util::human_duration(period),
                    util::human_duration(max_ttl)
                ));
                period = max_ttl;
            }
            ttl = period;
            max_valid = (!explicit_max_ttl.is_zero()).then(|| util::add(start_s, explicit_max_ttl));
        } else {
            ttl = if !increment.is_zero() {
                increment
            } else if !backend_ttl.is_zero() {
                backend_ttl
            } else {
                self.settings.default_lease_ttl
            };
            max_valid = Some(util::add(start_s, max_ttl));
        }
        if let Some(max_valid) = max_valid {
            if max_valid <= now_s {
                return Err("past the max TTL, cannot renew".into());
            }
            let max_valid_ttl = util::until(max_valid, now_s);
            if max_valid_ttl < ttl {
                warnings.push(format!(
                    "TTL of {:?} exceeded the effective max_ttl of {:?}; TTL value is capped accordingly",
                    util::human_duration(ttl),
                    util::human_duration(max_valid_ttl)
                ));
                ttl = max_valid_ttl;
            }
        }
        Ok((ttl, warnings))
    }

    /// The latest time something issued at `start` with these limits may live (the double never
    /// lets a lease or token outlive it, even by the sub-second rounding of Vault's arithmetic).
    pub(super) fn hard_cap(
        &self,
        start: DateTime<Utc>,
        period: Duration,
        backend_max_ttl: Duration,
        explicit_max_ttl: Duration,
    ) -> Option<DateTime<Utc>> {
        if !period.is_zero() {
            return (!explicit_max_ttl.is_zero()).then(|| util::add(start, explicit_max_ttl));
        }
        let mut max_ttl = self.settings.max_lease_ttl;
        if !backend_max_ttl.is_zero() && backend_max_ttl < max_ttl {
            max_ttl = backend_max_ttl;
        }
        if !explicit_max_ttl.is_zero() && explicit_max_ttl < max_ttl {
            max_ttl = explicit_max_ttl;
        }
        Some(util::add(start, max_ttl))
    }

    pub(super) fn issue_token(&mut self, spec: NewToken, now: DateTime<Utc>) -> Token {
        let id = format!("hvs.{}", util::random_base62(24));
        let accessor = util::random_base62(24);
        let parent_accessor = spec
            .parent
            .as_ref()
            .and_then(|p| self.tokens.get(p))
            .map(|p| p.info.accessor.clone());
        let expires_at = if spec.never_expires {
            None
        } else {
            let cap = self.hard_cap(
                now,
                spec.period.unwrap_or_default(),
                spec.backend_max_ttl,
                spec.explicit_max_ttl.unwrap_or_default(),
            );
            let mut at = util::add(now, spec.ttl);
            if let Some(cap) = cap
                && cap < at
            {
                at = cap;
            }
            Some(at)
        };
        let token = Token {
            info: TokenInfo {
                id: id.clone(),
                accessor: accessor.clone(),
                policies: spec.policies,
                display_name: spec.display_name,
                path: spec.path,
                meta: spec.meta,
                orphan: spec.parent.is_none(),
                parent_accessor,
                issued_at: now,
                expires_at,
                last_renewal: None,
                renewals: 0,
                creation_ttl: if spec.never_expires {
                    Duration::ZERO
                } else {
                    spec.ttl
                },
                period: spec.period,
                explicit_max_ttl: spec.explicit_max_ttl,
                renewable: spec.renewable && !spec.never_expires,
                role: spec.role,
                state: LeaseState::Active,
                ended_at: None,
            },
            parent: spec.parent,
            backend_ttl: spec.backend_ttl,
            backend_max_ttl: spec.backend_max_ttl,
        };
        self.by_accessor.insert(accessor, id.clone());
        self.tokens.insert(id, token.clone());
        token
    }

    /// Revokes token `id` at `at`, its child tokens (not orphans) and every lease they own. Parts
    /// whose own expiry came before `at` are marked expired at that time instead.
    pub(super) fn revoke_token(&mut self, id: &str, at: DateTime<Utc>) {
        let Some(token) = self.tokens.get_mut(id) else {
            return;
        };
        if token.info.state != LeaseState::Active {
            return;
        }
        let (end, expired) = match token.info.expires_at {
            Some(exp) if exp <= at => (exp, true),
            _ => (at, false),
        };
        token.info.state = if expired {
            LeaseState::Expired
        } else {
            LeaseState::Revoked
        };
        token.info.ended_at = Some(end);
        let cause = if expired {
            RevokeCause::TokenExpired
        } else {
            RevokeCause::TokenRevoked
        };
        for lease in self.leases.iter_mut().filter(|l| l.owner == id) {
            end_lease(&mut lease.info, end, cause);
        }
        let children: Vec<String> = self
            .tokens
            .values()
            .filter(|t| t.parent.as_deref() == Some(id) && t.info.state == LeaseState::Active)
            .map(|t| t.info.id.clone())
            .collect();
        for child in children {
            self.revoke_token(&child, end);
        }
    }

    /// Expires what is due at `now`: tokens (with their children and leases), then leases.
    pub(super) fn sweep(&mut self, now: DateTime<Utc>) {
        let mut due: Vec<(DateTime<Utc>, String)> = self
            .tokens
            .values()
            .filter(|t| t.info.state == LeaseState::Active)
            .filter_map(|t| {
                t.info
                    .expires_at
                    .filter(|e| *e <= now)
                    .map(|e| (e, t.info.id.clone()))
            })
            .collect();
        due.sort();
        for (at, id) in due {
            self.revoke_token(&id, at);
        }
        for lease in &mut self.leases {
            if lease.info.state == LeaseState::Active && lease.info.expires_at <= now {
                lease.info.state = LeaseState::Expired;
                lease.info.ended_at = Some(lease.info.expires_at);
            }
        }
    }

    pub(super) fn lease_mut(&mut self, id: &str) -> Option<&mut Lease> {
        let index = *self.lease_index.get(id)?;
        self.leases.get_mut(index)
    }

    pub(super) fn add_lease(&mut self, lease: Lease) {
        self.lease_index
            .insert(lease.info.lease_id.clone(), self.leases.len());
        self.leases.push(lease);
    }
}

/// Ends an active lease at `at`: expired if its own expiry came first, else revoked by `cause`.
pub(crate) fn end_lease(lease: &mut LeaseInfo, at: DateTime<Utc>, cause: RevokeCause) {
    if lease.state != LeaseState::Active {
        return;
    }
    if lease.expires_at <= at {
        lease.state = LeaseState::Expired;
        lease.ended_at = Some(lease.expires_at);
    } else {
        lease.state = LeaseState::Revoked;
        lease.ended_at = Some(at);
        lease.revoked_by = Some(cause);
    }
}
