//! What each route does, following Vault 1.15 and its plugins (token store, Kubernetes auth
//! 0.17, database, kv-v2): field handling, validation messages, response shapes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde_json::{Map, Value, json};

use super::hcl;
use super::routes::{Kind, MountNames};
use super::state::{
    DatabaseRole, KubernetesAuthConfig, KubernetesRole, KvSecret, KvVersion, Lease, LeaseInfo,
    LeaseState, NewToken, RevokeCause, State, StoredPolicy, Token, TokenInfo, end_lease,
};
use super::util::{
    self, bool_field, duration_field, slice_field, string_field, string_slice_field,
};

/// A successful answer in Vault's logical-response shape.
#[derive(Debug, Default)]
pub(crate) struct Logical {
    /// Defaults to 200 with a body, 204 without.
    pub status: Option<u16>,
    pub data: Option<Value>,
    pub auth: Option<Value>,
    /// `(lease_id, lease_duration, renewable)`.
    pub lease: Option<(String, u64, bool)>,
    pub warnings: Vec<String>,
}

pub(crate) enum Reply {
    Logical(Logical),
    /// A body outside the logical envelope (`sys/health`).
    Raw(u16, Value),
}

/// An error answer: `{"errors": [...]}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub errors: Vec<String>,
}

pub(crate) type Handled = Result<Reply, ApiError>;

pub(crate) fn error(status: u16, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        errors: vec![message.into()],
    }
}

pub(crate) fn bad(message: impl Into<String>) -> ApiError {
    error(400, message)
}

pub(crate) fn denied() -> ApiError {
    error(403, "permission denied")
}

pub(crate) fn not_found() -> ApiError {
    ApiError {
        status: 404,
        errors: Vec::new(),
    }
}

fn data(value: Value) -> Handled {
    Ok(Reply::Logical(Logical {
        data: Some(value),
        ..Logical::default()
    }))
}

fn no_content() -> Handled {
    Ok(Reply::Logical(Logical::default()))
}

fn with_warnings(warnings: Vec<String>) -> Handled {
    Ok(Reply::Logical(Logical {
        warnings,
        ..Logical::default()
    }))
}

fn list(keys: Vec<String>) -> Handled {
    if keys.is_empty() {
        return Err(not_found());
    }
    data(json!({ "keys": keys }))
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// What a handler sees of the request.
pub(crate) struct Ctx<'a> {
    pub params: &'a HashMap<String, String>,
    pub body: &'a Map<String, Value>,
    pub query: &'a HashMap<String, String>,
    /// The calling token (active), if any.
    pub token: Option<Token>,
    /// The logical path (no `/v1/`).
    pub path: &'a str,
    pub now: DateTime<Utc>,
    pub mounts: &'a MountNames,
    /// The caller has `sudo` (or root) on the path.
    pub sudo: bool,
}

impl Ctx<'_> {
    fn param(&self, name: &str) -> &str {
        self.params.get(name).map(String::as_str).unwrap_or("")
    }

    fn caller(&self) -> Result<&Token, ApiError> {
        self.token.as_ref().ok_or_else(denied)
    }
}

/// Whether the item a write to this route targets exists (for create vs update).
pub(crate) fn exists(kind: Kind, state: &State, params: &HashMap<String, String>) -> bool {
    let param = |n: &str| params.get(n).map(String::as_str).unwrap_or("");
    match kind {
        Kind::KubeRoleWrite => state.kube_roles.contains_key(&param("name").to_lowercase()),
        Kind::DbRoleWrite => state.db_roles.contains_key(param("name")),
        Kind::KvWrite => state.kv.contains_key(param("path")),
        _ => true,
    }
}

/// Runs a synchronous route (every one but `sys/health` and the Kubernetes login).
pub(crate) fn handle(kind: Kind, state: &mut State, ctx: &Ctx<'_>) -> Handled {
    match kind {
        Kind::Health | Kind::KubeLogin => Err(error(500, "routed elsewhere")),
        Kind::PolicyList => {
            let mut keys: Vec<String> = state.policies.keys().cloned().collect();
            keys.push("root".into());
            data(json!({ "keys": keys, "policies": keys }))
        }
        Kind::PolicyRead => policy_read(state, ctx),
        Kind::PolicyWrite => policy_write(state, ctx),
        Kind::PolicyDelete => policy_delete(state, ctx),
        Kind::CapabilitiesSelf => capabilities_self(state, ctx),
        Kind::LeaseRenew | Kind::LeaseRenewUrl => lease_renew(state, ctx),
        Kind::LeaseRevoke | Kind::LeaseRevokeUrl => lease_revoke(state, ctx),
        Kind::LeaseLookup => lease_lookup(state, ctx),
        Kind::TokenCreate => token_create(state, ctx),
        Kind::TokenLookupSelf => token_lookup_self(ctx),
        Kind::TokenRenewSelf => token_renew_self(state, ctx),
        Kind::TokenRevokeSelf => {
            let id = ctx.caller()?.info.id.clone();
            state.revoke_token(&id, ctx.now);
            no_content()
        }
        Kind::KubeConfigRead => kube_config_read(state),
        Kind::KubeConfigWrite => kube_config_write(state, ctx),
        Kind::KubeRoleList => list(state.kube_roles.keys().cloned().collect()),
        Kind::KubeRoleRead => kube_role_read(state, ctx),
        Kind::KubeRoleWrite => kube_role_write(state, ctx),
        Kind::KubeRoleDelete => {
            state.kube_roles.remove(&ctx.param("name").to_lowercase());
            no_content()
        }
        Kind::DbRoleList => list(state.db_roles.keys().cloned().collect()),
        Kind::DbRoleRead => db_role_read(state, ctx),
        Kind::DbRoleWrite => db_role_write(state, ctx),
        Kind::DbRoleDelete => {
            state.db_roles.remove(ctx.param("name"));
            no_content()
        }
        Kind::DbCreds => db_creds(state, ctx),
        Kind::KvRead => kv_read(state, ctx),
        Kind::KvWrite => kv_write(state, ctx),
        Kind::KvDelete => {
            if let Some(secret) = state.kv.get_mut(ctx.param("path")) {
                let current = secret.current;
                if let Some(v) = secret.versions.get_mut(&current)
                    && v.deleted.is_none()
                {
                    v.deleted = Some(ctx.now);
                    secret.updated = ctx.now;
                }
            }
            no_content()
        }
        Kind::KvMetadataRead => kv_metadata_read(state, ctx),
        Kind::KvMetadataList => kv_list(state, ctx),
        Kind::KvMetadataDelete => {
            state.kv.remove(ctx.param("path"));
            no_content()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sys/health

pub(crate) fn health(
    sealed: bool,
    query: &HashMap<String, String>,
    version: &str,
    cluster_id: &str,
    now: DateTime<Utc>,
) -> Handled {
    let code = |name: &str, default: u16| {
        query
            .get(name)
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(default)
    };
    let mut body = json!({
        "initialized": true,
        "sealed": sealed,
        "standby": sealed,
        "performance_standby": false,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": now.timestamp(),
        "version": version,
    });
    if sealed {
        return Ok(Reply::Raw(code("sealedcode", 503), body));
    }
    body["cluster_name"] = json!("vault-cluster-double");
    body["cluster_id"] = json!(cluster_id);
    Ok(Reply::Raw(code("activecode", 200), body))
}

// ---------------------------------------------------------------------------------------------
// sys/policies/acl, sys/capabilities-self

fn policy_read(state: &State, ctx: &Ctx<'_>) -> Handled {
    let name = ctx.param("name").trim().to_lowercase();
    if name == "root" {
        return data(json!({ "name": "root", "policy": "" }));
    }
    let policy = state.policies.get(&name).ok_or_else(not_found)?;
    data(json!({ "name": name, "policy": policy.raw }))
}

fn policy_write(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let name = ctx.param("name").trim().to_lowercase();
    let text = string_field(ctx.body, "policy")
        .map_err(bad)?
        .unwrap_or_default();
    if name == "root" {
        return Err(bad("cannot update \"root\" policy"));
    }
    if text.trim().is_empty() {
        return Err(bad("'policy' parameter not supplied or empty"));
    }
    let parsed =
        hcl::parse_policy(&text).map_err(|e| bad(format!("failed to parse policy: {e}")))?;
    state
        .policies
        .insert(name, StoredPolicy { raw: text, parsed });
    no_content()
}

fn policy_delete(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let name = ctx.param("name").trim().to_lowercase();
    if name == "root" || name == "default" {
        return Err(bad(format!("cannot delete {name:?} policy")));
    }
    state.policies.remove(&name);
    no_content()
}

fn capabilities_self(state: &State, ctx: &Ctx<'_>) -> Handled {
    let token = ctx.caller()?;
    let mut paths = slice_field(ctx.body, "paths")
        .map_err(bad)?
        .unwrap_or_default();
    if paths.is_empty() {
        paths = slice_field(ctx.body, "path")
            .map_err(bad)?
            .unwrap_or_default();
    }
    if paths.is_empty() {
        return Err(bad("paths must be supplied"));
    }
    let acl = state.acl_for(token);
    let mut out = Map::new();
    for path in &paths {
        out.insert(path.clone(), json!(acl.capabilities(path)));
    }
    if paths.len() == 1 {
        out.insert("capabilities".into(), out[&paths[0]].clone());
    }
    data(Value::Object(out))
}

// ---------------------------------------------------------------------------------------------
// sys/leases

fn lease_id(ctx: &Ctx<'_>) -> Result<String, ApiError> {
    let from_url = ctx.param("url_lease_id");
    if !from_url.is_empty() {
        return Ok(from_url.to_string());
    }
    Ok(string_field(ctx.body, "lease_id")
        .map_err(bad)?
        .unwrap_or_default())
}

fn lease_renew(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let id = lease_id(ctx)?;
    if id.is_empty() {
        return Err(bad("lease_id must be specified"));
    }
    let increment = duration_field(ctx.body, "increment")
        .map_err(bad)?
        .unwrap_or_default();
    let (issued_at, renewable, role_name) = match state.lease_mut(&id) {
        Some(l) if l.info.state == LeaseState::Active => {
            (l.info.issued_at, l.info.renewable, l.info.role.clone())
        }
        _ => return Err(bad("lease not found")),
    };
    if !renewable {
        return Err(bad("lease is not renewable"));
    }
    let role = state.db_roles.get(&role_name).cloned().ok_or_else(|| {
        error(
            500,
            format!("error during renew: could not find role with name {role_name:?}"),
        )
    })?;
    let (ttl, warnings) = state
        .calculate_ttl(
            increment,
            role.default_ttl,
            Duration::ZERO,
            role.max_ttl,
            Duration::ZERO,
            issued_at,
            ctx.now,
        )
        .map_err(bad)?;
    let cap = state.hard_cap(issued_at, Duration::ZERO, role.max_ttl, Duration::ZERO);
    let lease = state.lease_mut(&id).expect("checked above");
    let mut expires = util::add(ctx.now, ttl);
    if let Some(cap) = cap
        && cap < expires
    {
        expires = cap;
    }
    lease.info.expires_at = expires;
    lease.info.last_renewal = Some(ctx.now);
    lease.info.renewals += 1;
    Ok(Reply::Logical(Logical {
        lease: Some((id, secs(ttl), true)),
        warnings,
        ..Logical::default()
    }))
}

fn lease_revoke(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let id = lease_id(ctx)?;
    if id.is_empty() {
        return Err(bad("lease_id must be specified"));
    }
    bool_field(ctx.body, "sync").map_err(bad)?;
    if let Some(lease) = state.lease_mut(&id) {
        end_lease(&mut lease.info, ctx.now, RevokeCause::Api);
    }
    no_content()
}

fn lease_lookup(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let id = string_field(ctx.body, "lease_id")
        .map_err(bad)?
        .unwrap_or_default();
    if id.is_empty() {
        return Err(bad("missing 'lease_id'"));
    }
    let now = ctx.now;
    let lease = match state.lease_mut(&id) {
        Some(l) if l.info.state == LeaseState::Active => &l.info,
        _ => return Err(bad("invalid lease")),
    };
    data(json!({
        "id": lease.lease_id,
        "issue_time": util::rfc3339(lease.issued_at),
        "expire_time": util::rfc3339(lease.expires_at),
        "last_renewal": lease.last_renewal.map(util::rfc3339),
        "renewable": lease.renewable,
        "ttl": util::until(lease.expires_at, now).as_secs(),
    }))
}

// ---------------------------------------------------------------------------------------------
// auth/token

fn auth_block(token: &TokenInfo, ttl: Duration, entity_id: &str) -> Value {
    json!({
        "client_token": token.id,
        "accessor": token.accessor,
        "policies": token.policies,
        "token_policies": token.policies,
        "metadata": if token.meta.is_empty() { Value::Null } else { json!(token.meta) },
        "lease_duration": secs(ttl),
        "renewable": token.renewable,
        "entity_id": entity_id,
        "token_type": "service",
        "orphan": token.orphan,
        "mfa_requirement": Value::Null,
        "num_uses": 0,
    })
}

fn entity_id(token: &TokenInfo) -> String {
    match &token.role {
        Some(_) => util::uuid(Some(&format!(
            "{}/{}",
            token
                .meta
                .get("service_account_namespace")
                .map(String::as_str)
                .unwrap_or(""),
            token
                .meta
                .get("service_account_name")
                .map(String::as_str)
                .unwrap_or("")
        ))),
        None => String::new(),
    }
}

fn token_create(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let parent = ctx.caller()?.clone();
    let body = ctx.body;
    let requested = slice_field(body, "policies").map_err(bad)?;
    let no_parent = bool_field(body, "no_parent").map_err(bad)?.unwrap_or(false);
    let no_default = bool_field(body, "no_default_policy")
        .map_err(bad)?
        .unwrap_or(false);
    let renewable = bool_field(body, "renewable").map_err(bad)?.unwrap_or(true);
    let ttl = match duration_field(body, "ttl").map_err(bad)? {
        Some(t) => t,
        None => duration_field(body, "lease")
            .map_err(bad)?
            .unwrap_or_default(),
    };
    let explicit_max = duration_field(body, "explicit_max_ttl")
        .map_err(bad)?
        .unwrap_or_default();
    let period = duration_field(body, "period")
        .map_err(bad)?
        .unwrap_or_default();
    let display = string_field(body, "display_name")
        .map_err(bad)?
        .unwrap_or_default();
    let meta: BTreeMap<String, String> = match body.get("meta") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(bad(format!(
                    "error converting input {other} for field \"meta\": not a string"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(format!(
                "error converting input {other} for field \"meta\": not a map"
            )));
        }
    };

    let is_sudo = parent.info.policies.iter().any(|p| p == "root") || ctx.sudo;
    if no_parent && !is_sudo {
        return Err(bad(
            "root or sudo privileges required to create orphan token",
        ));
    }
    if !period.is_zero() && !is_sudo {
        return Err(bad(
            "root or sudo privileges required to create periodic token",
        ));
    }
    let requested = match requested {
        Some(p) if !p.is_empty() => p,
        _ => parent.info.policies.clone(),
    };
    if !is_sudo {
        let child = util::sanitize_policies(&requested, false);
        let parents = util::sanitize_policies(&parent.info.policies, false);
        if !child.iter().all(|p| parents.contains(p)) {
            return Err(bad("child policies must be subset of parent"));
        }
    }
    let policies = util::sanitize_policies(&requested, !no_default);
    let never_expires = ttl.is_zero() && period.is_zero() && policies == ["root"];
    let (ttl, warnings) = if never_expires {
        (Duration::ZERO, Vec::new())
    } else {
        state
            .calculate_ttl(
                Duration::ZERO,
                ttl,
                period,
                Duration::ZERO,
                explicit_max,
                ctx.now,
                ctx.now,
            )
            .map_err(bad)?
    };
    let display_name = if display.is_empty() {
        "token".to_string()
    } else {
        let full: String = format!("token-{display}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        full.trim_end_matches('-').to_string()
    };
    let token = state.issue_token(
        NewToken {
            policies,
            display_name,
            path: "auth/token/create".into(),
            meta,
            parent: (!no_parent).then(|| parent.info.id.clone()),
            ttl,
            backend_ttl: ttl,
            backend_max_ttl: Duration::ZERO,
            period: (!period.is_zero()).then_some(period),
            explicit_max_ttl: (!explicit_max.is_zero()).then_some(explicit_max),
            renewable,
            role: None,
            never_expires,
        },
        ctx.now,
    );
    Ok(Reply::Logical(Logical {
        auth: Some(auth_block(&token.info, ttl, "")),
        warnings,
        ..Logical::default()
    }))
}

fn token_lookup_self(ctx: &Ctx<'_>) -> Handled {
    let t = &ctx.caller()?.info;
    let ttl = t
        .expires_at
        .map(|e| util::until(e, ctx.now).as_secs())
        .unwrap_or(0);
    let mut out = json!({
        "accessor": t.accessor,
        "creation_time": t.issued_at.timestamp(),
        "creation_ttl": secs(t.creation_ttl),
        "display_name": t.display_name,
        "entity_id": entity_id(t),
        "expire_time": t.expires_at.map(util::rfc3339),
        "explicit_max_ttl": t.explicit_max_ttl.map(secs).unwrap_or(0),
        "id": t.id,
        "issue_time": util::rfc3339(t.issued_at),
        "meta": if t.meta.is_empty() { Value::Null } else { json!(t.meta) },
        "num_uses": 0,
        "orphan": t.orphan,
        "path": t.path,
        "policies": t.policies,
        "renewable": t.renewable,
        "ttl": ttl,
        "type": "service",
    });
    if let Some(period) = t.period {
        out["period"] = json!(secs(period));
    }
    if let Some(last) = t.last_renewal {
        out["last_renewal"] = json!(util::rfc3339(last));
        out["last_renewal_time"] = json!(last.timestamp());
    }
    if let Some(role) = &t.role {
        out["role"] = json!(role);
    }
    data(out)
}

fn token_renew_self(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let token = ctx.caller()?.clone();
    if token.info.expires_at.is_none() || !token.info.renewable {
        return Err(bad("lease is not renewable"));
    }
    let increment = duration_field(ctx.body, "increment")
        .map_err(bad)?
        .unwrap_or_default();
    let (backend_ttl, backend_max, period) = match &token.info.role {
        Some(role_name) => {
            let role = state.kube_roles.get(role_name).ok_or_else(|| {
                error(
                    500,
                    format!("role {role_name} does not exist during renewal"),
                )
            })?;
            (role.token_ttl, role.token_max_ttl, role.token_period)
        }
        None => (
            token.backend_ttl,
            token.backend_max_ttl,
            token.info.period.unwrap_or_default(),
        ),
    };
    let explicit = token.info.explicit_max_ttl.unwrap_or_default();
    let (ttl, warnings) = state
        .calculate_ttl(
            increment,
            backend_ttl,
            period,
            backend_max,
            explicit,
            token.info.issued_at,
            ctx.now,
        )
        .map_err(bad)?;
    let cap = state.hard_cap(token.info.issued_at, period, backend_max, explicit);
    let mut expires = util::add(ctx.now, ttl);
    if let Some(cap) = cap
        && cap < expires
    {
        expires = cap;
    }
    let stored = state
        .tokens
        .get_mut(&token.info.id)
        .expect("the caller exists");
    stored.info.expires_at = Some(expires);
    stored.info.last_renewal = Some(ctx.now);
    stored.info.renewals += 1;
    let info = stored.info.clone();
    Ok(Reply::Logical(Logical {
        auth: Some(auth_block(&info, ttl, &entity_id(&info))),
        warnings,
        ..Logical::default()
    }))
}

// ---------------------------------------------------------------------------------------------
// auth/<kubernetes>/config, role

fn kube_config_read(state: &State) -> Handled {
    let c = state.kube_config.as_ref().ok_or_else(not_found)?;
    data(json!({
        "kubernetes_host": c.kubernetes_host,
        "kubernetes_ca_cert": c.kubernetes_ca_cert,
        "pem_keys": c.pem_keys,
        "issuer": c.issuer,
        "disable_iss_validation": c.disable_iss_validation,
        "disable_local_ca_jwt": c.disable_local_ca_jwt,
    }))
}

fn kube_config_write(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let b = ctx.body;
    let host = string_field(b, "kubernetes_host")
        .map_err(bad)?
        .unwrap_or_default();
    if host.is_empty() {
        return Err(bad("no host provided"));
    }
    let config = KubernetesAuthConfig {
        kubernetes_host: host,
        kubernetes_ca_cert: string_field(b, "kubernetes_ca_cert")
            .map_err(bad)?
            .unwrap_or_default(),
        token_reviewer_jwt: string_field(b, "token_reviewer_jwt")
            .map_err(bad)?
            .unwrap_or_default(),
        pem_keys: slice_field(b, "pem_keys").map_err(bad)?.unwrap_or_default(),
        issuer: string_field(b, "issuer").map_err(bad)?.unwrap_or_default(),
        disable_iss_validation: bool_field(b, "disable_iss_validation")
            .map_err(bad)?
            .unwrap_or(true),
        disable_local_ca_jwt: bool_field(b, "disable_local_ca_jwt")
            .map_err(bad)?
            .unwrap_or(false),
    };
    state.kube_config = Some(config);
    no_content()
}

fn kube_role_read(state: &State, ctx: &Ctx<'_>) -> Handled {
    let role = state
        .kube_roles
        .get(&ctx.param("name").to_lowercase())
        .ok_or_else(not_found)?;
    let mut out = json!({
        "bound_service_account_names": role.bound_service_account_names,
        "bound_service_account_namespaces": role.bound_service_account_namespaces,
        "alias_name_source": role.alias_name_source,
        "token_bound_cidrs": [],
        "token_explicit_max_ttl": secs(role.token_explicit_max_ttl),
        "token_max_ttl": secs(role.token_max_ttl),
        "token_no_default_policy": role.token_no_default_policy,
        "token_num_uses": 0,
        "token_period": secs(role.token_period),
        "token_policies": role.token_policies,
        "token_ttl": secs(role.token_ttl),
        "token_type": "default",
    });
    if !role.audience.is_empty() {
        out["audience"] = json!(role.audience);
    }
    for legacy in &role.legacy_fields {
        let value = match legacy.as_str() {
            "policies" => json!(role.token_policies),
            "ttl" => json!(secs(role.token_ttl)),
            "max_ttl" => json!(secs(role.token_max_ttl)),
            "period" => json!(secs(role.token_period)),
            _ => continue,
        };
        out[legacy.as_str()] = value;
    }
    data(out)
}

fn glob_match(pattern: &str, value: &str) -> bool {
    if pattern.len() < 2 {
        return pattern == value;
    }
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(_), Some(_)) => value.contains(&pattern[1..pattern.len() - 1]),
        (Some(suffix), None) => value.ends_with(suffix),
        (None, Some(prefix)) => value.starts_with(prefix),
        (None, None) => pattern == value,
    }
}

fn kube_role_write(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let b = ctx.body;
    let name = ctx.param("name").to_lowercase();
    let mut role = state
        .kube_roles
        .get(&name)
        .cloned()
        .unwrap_or_else(|| KubernetesRole {
            name: name.clone(),
            alias_name_source: "serviceaccount_uid".into(),
            ..KubernetesRole::default()
        });
    let mut warnings = Vec::new();

    // tokenutil.ParseTokenFields, then the deprecated names (tokenutil.UpgradeValue).
    if let Some(p) = slice_field(b, "token_policies").map_err(bad)? {
        role.token_policies = p;
    }
    if let Some(d) = duration_field(b, "token_ttl").map_err(bad)? {
        role.token_ttl = d;
    }
    if let Some(d) = duration_field(b, "token_max_ttl").map_err(bad)? {
        role.token_max_ttl = d;
    }
    if let Some(d) = duration_field(b, "token_period").map_err(bad)? {
        role.token_period = d;
    }
    if let Some(d) = duration_field(b, "token_explicit_max_ttl").map_err(bad)? {
        role.token_explicit_max_ttl = d;
    }
    if let Some(v) = bool_field(b, "token_no_default_policy").map_err(bad)? {
        role.token_no_default_policy = v;
    }
    for (old, new) in [
        ("policies", "token_policies"),
        ("ttl", "token_ttl"),
        ("max_ttl", "token_max_ttl"),
        ("period", "token_period"),
    ] {
        if !b.contains_key(old) {
            continue;
        }
        if b.contains_key(new) {
            return Err(bad(format!(
                "Cannot specify values for both {old:?} and {new:?}"
            )));
        }
        match old {
            "policies" => {
                role.token_policies = slice_field(b, old).map_err(bad)?.unwrap_or_default()
            }
            "ttl" => role.token_ttl = duration_field(b, old).map_err(bad)?.unwrap_or_default(),
            "max_ttl" => {
                role.token_max_ttl = duration_field(b, old).map_err(bad)?.unwrap_or_default()
            }
            _ => role.token_period = duration_field(b, old).map_err(bad)?.unwrap_or_default(),
        }
        if !role.legacy_fields.iter().any(|f| f == old) {
            role.legacy_fields.push(old.to_string());
        }
    }
    let max_lease = state.settings.max_lease_ttl;
    if role.token_period > max_lease {
        return Err(bad(format!(
            "token period of '{:?}' is greater than the backend's maximum lease TTL of '{:?}'",
            util::human_duration(role.token_period),
            util::human_duration(max_lease)
        )));
    }
    if !role.token_max_ttl.is_zero() && role.token_ttl > role.token_max_ttl {
        return Err(bad("token ttl should not be greater than token max ttl"));
    }
    if role.token_max_ttl > max_lease {
        warnings.push("max_ttl is greater than the system or backend mount's maximum TTL value; issued tokens' max TTL value will be truncated".to_string());
    }

    if let Some(names) = slice_field(b, "bound_service_account_names").map_err(bad)? {
        role.bound_service_account_names = names;
    }
    if role.bound_service_account_names.is_empty() {
        return Err(bad("\"bound_service_account_names\" can not be empty"));
    }
    if role.bound_service_account_names.len() > 1
        && role.bound_service_account_names.iter().any(|n| n == "*")
    {
        return Err(bad("can not mix \"*\" with values"));
    }
    if let Some(namespaces) = slice_field(b, "bound_service_account_namespaces").map_err(bad)? {
        role.bound_service_account_namespaces = namespaces;
    }
    if role.bound_service_account_namespaces.is_empty() {
        return Err(bad("\"bound_service_account_namespaces\" can not be empty"));
    }
    if role.bound_service_account_namespaces.len() > 1
        && role
            .bound_service_account_namespaces
            .iter()
            .any(|n| n == "*")
    {
        return Err(bad("can not mix \"*\" with values"));
    }
    if let Some(audience) = string_field(b, "audience").map_err(bad)? {
        role.audience = audience;
    }
    if role.audience.trim().is_empty() {
        warnings.push("This role does not specify an audience. In a future version of Vault, specifying an audience will be required.".to_string());
    }
    if let Some(source) = string_field(b, "alias_name_source").map_err(bad)? {
        role.alias_name_source = if source.is_empty() {
            "serviceaccount_uid".into()
        } else {
            source
        };
    }
    if !["serviceaccount_uid", "serviceaccount_name"].contains(&role.alias_name_source.as_str()) {
        return Err(bad(format!(
            "invalid alias_name_source {:?}, must be one of [\"serviceaccount_uid\" \"serviceaccount_name\"]",
            role.alias_name_source
        )));
    }
    state.kube_roles.insert(name, role);
    if warnings.is_empty() {
        no_content()
    } else {
        with_warnings(warnings)
    }
}

// ---------------------------------------------------------------------------------------------
// auth/<kubernetes>/login

/// What the synchronous part of a login found: the JWT's claims, checked against the role.
pub(crate) struct LoginPlan {
    role: KubernetesRole,
    jwt: String,
    audiences: Vec<String>,
    name: String,
    namespace: String,
    uid: String,
}

/// The ServiceAccount a TokenReview authenticated.
pub(crate) struct Reviewed {
    name: String,
    namespace: String,
    uid: String,
}

const ALLOWED_ALGS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

fn forbidden(message: impl Into<String>) -> ApiError {
    error(403, message)
}

/// Vault's `parseAndValidateJWT` without signature verification (the plugin's behaviour when no
/// `pem_keys` are configured): claims, issuer (when configured), audience, bound names and
/// namespaces.
pub(crate) fn login_prepare(state: &State, ctx: &Ctx<'_>) -> Result<LoginPlan, ApiError> {
    let role_name = string_field(ctx.body, "role")
        .map_err(bad)?
        .unwrap_or_default();
    if role_name.is_empty() {
        return Err(bad("missing role"));
    }
    let jwt = string_field(ctx.body, "jwt")
        .map_err(bad)?
        .unwrap_or_default();
    if jwt.is_empty() {
        return Err(bad("missing jwt"));
    }
    let role = state
        .kube_roles
        .get(&role_name.to_lowercase())
        .cloned()
        .ok_or_else(|| bad(format!("invalid role name {role_name:?}")))?;
    let config = state
        .kube_config
        .clone()
        .ok_or_else(|| error(500, "could not load backend configuration"))?;

    let claims = decode_jwt(&jwt).map_err(forbidden)?;
    if !config.disable_iss_validation && !config.issuer.is_empty() {
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if iss != config.issuer {
            return Err(forbidden("invalid issuer (iss) claim"));
        }
    }
    let token_audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    if !role.audience.trim().is_empty() && !token_audiences.contains(&role.audience) {
        return Err(forbidden(
            "invalid audience (aud) claim: audience claim does not match any expected audience",
        ));
    }
    if let Some(exp) = claims.get("exp").and_then(Value::as_i64)
        && exp + 150 < ctx.now.timestamp()
    {
        return Err(forbidden("token is expired (exp)"));
    }
    let projected = claims.get("kubernetes.io");
    let (name, namespace, uid) = match projected {
        Some(k) => (
            k.pointer("/serviceaccount/name")
                .and_then(Value::as_str)
                .unwrap_or(""),
            k.get("namespace").and_then(Value::as_str).unwrap_or(""),
            k.pointer("/serviceaccount/uid")
                .and_then(Value::as_str)
                .unwrap_or(""),
        ),
        None => (
            claims
                .get("kubernetes.io/serviceaccount/service-account.name")
                .and_then(Value::as_str)
                .unwrap_or(""),
            claims
                .get("kubernetes.io/serviceaccount/namespace")
                .and_then(Value::as_str)
                .unwrap_or(""),
            claims
                .get("kubernetes.io/serviceaccount/service-account.uid")
                .and_then(Value::as_str)
                .unwrap_or(""),
        ),
    };
    let names = &role.bound_service_account_names;
    if (names.len() > 1 || names.first().map(String::as_str) != Some("*"))
        && !names.iter().any(|n| glob_match(n, name))
    {
        return Err(forbidden("service account name not authorized"));
    }
    let namespaces = &role.bound_service_account_namespaces;
    let allowed = namespaces.first().map(String::as_str) == Some("*")
        || namespaces.iter().any(|n| glob_match(n, namespace));
    if !allowed {
        return Err(forbidden("namespace not authorized"));
    }
    let audiences = if role.audience.trim().is_empty() {
        token_audiences
    } else {
        vec![role.audience.clone()]
    };
    Ok(LoginPlan {
        name: name.to_string(),
        namespace: namespace.to_string(),
        uid: uid.to_string(),
        role,
        jwt,
        audiences,
    })
}

fn decode_jwt(jwt: &str) -> Result<Map<String, Value>, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("error validating token: compact JWS format must have three parts".into());
    }
    let header: Value = util::base64url_decode(parts[0])
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("error validating token: malformed JWS header")?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(format!(
            "error validating token: unexpected signature algorithm {alg:?}"
        ));
    }
    let payload: Value = util::base64url_decode(parts[1])
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("error validating token: malformed JWT claims")?;
    match payload {
        Value::Object(m) => Ok(m),
        _ => Err("error validating token: malformed JWT claims".into()),
    }
}

/// Vault's `tokenReviewAPI.Review`: a real `TokenReview`, then the user name parsed as
/// `system:serviceaccount:NS:NAME`.
pub(crate) async fn token_review(
    client: &kube::Client,
    plan: &LoginPlan,
) -> Result<Reviewed, String> {
    let review = TokenReview {
        metadata: Default::default(),
        spec: TokenReviewSpec {
            token: Some(plan.jwt.clone()),
            audiences: (!plan.audiences.is_empty()).then(|| plan.audiences.clone()),
        },
        status: None,
    };
    let api = Api::<TokenReview>::all(client.clone());
    let created = tokio::time::timeout(
        Duration::from_secs(15),
        api.create(&PostParams::default(), &review),
    )
    .await
    .map_err(|_| "TokenReview timed out".to_string())?
    .map_err(|e| format!("TokenReview failed: {e}"))?;
    let status = created.status.ok_or("TokenReview has no status")?;
    if let Some(e) = status.error.filter(|e| !e.is_empty()) {
        return Err(format!("lookup failed: {e}"));
    }
    if status.authenticated != Some(true) {
        return Err("lookup failed: service account unauthorized; this could mean it has been deleted or recreated with a new token".into());
    }
    let user = status.user.ok_or("TokenReview has no user")?;
    let username = user.username.unwrap_or_default();
    let parts: Vec<&str> = username.split(':').collect();
    if parts.len() != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
        return Err("lookup failed: unexpected username format".into());
    }
    Ok(Reviewed {
        namespace: parts[2].to_string(),
        name: parts[3].to_string(),
        uid: user.uid.unwrap_or_default(),
    })
}

/// Compares the review with the claims and issues the token.
pub(crate) fn login_finish(
    state: &mut State,
    ctx: &Ctx<'_>,
    plan: LoginPlan,
    reviewed: Reviewed,
) -> Handled {
    if plan.name != reviewed.name
        || plan.namespace != reviewed.namespace
        || plan.uid != reviewed.uid
    {
        return Err(denied());
    }
    let role = plan.role;
    let policies = util::sanitize_policies(&role.token_policies, !role.token_no_default_policy);
    let (ttl, warnings) = state
        .calculate_ttl(
            Duration::ZERO,
            role.token_ttl,
            role.token_period,
            role.token_max_ttl,
            role.token_explicit_max_ttl,
            ctx.now,
            ctx.now,
        )
        .map_err(|e| error(500, e))?;
    let meta: BTreeMap<String, String> = [
        ("role", role.name.clone()),
        ("service_account_name", plan.name.clone()),
        ("service_account_namespace", plan.namespace.clone()),
        ("service_account_secret_name", String::new()),
        ("service_account_uid", plan.uid.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let token = state.issue_token(
        NewToken {
            policies,
            display_name: format!("{}-{}-{}", ctx.mounts.kubernetes, plan.namespace, plan.name),
            path: format!("auth/{}/login", ctx.mounts.kubernetes),
            meta,
            parent: None,
            ttl,
            backend_ttl: role.token_ttl,
            backend_max_ttl: role.token_max_ttl,
            period: (!role.token_period.is_zero()).then_some(role.token_period),
            explicit_max_ttl: (!role.token_explicit_max_ttl.is_zero())
                .then_some(role.token_explicit_max_ttl),
            renewable: true,
            role: Some(role.name.clone()),
            never_expires: false,
        },
        ctx.now,
    );
    let entity = entity_id(&token.info);
    Ok(Reply::Logical(Logical {
        auth: Some(auth_block(&token.info, ttl, &entity)),
        warnings,
        ..Logical::default()
    }))
}

// ---------------------------------------------------------------------------------------------
// database

fn db_role_read(state: &State, ctx: &Ctx<'_>) -> Handled {
    let role = state
        .db_roles
        .get(ctx.param("name"))
        .ok_or_else(not_found)?;
    data(json!({
        "db_name": role.db_name,
        "creation_statements": role.creation_statements,
        "revocation_statements": role.revocation_statements,
        "rollback_statements": role.rollback_statements,
        "renew_statements": role.renew_statements,
        "default_ttl": secs(role.default_ttl),
        "max_ttl": secs(role.max_ttl),
        "credential_type": "password",
    }))
}

fn db_role_write(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let b = ctx.body;
    let name = ctx.param("name").to_string();
    let mut role = state
        .db_roles
        .get(&name)
        .cloned()
        .unwrap_or_else(|| DatabaseRole {
            name: name.clone(),
            ..DatabaseRole::default()
        });
    if let Some(db) = string_field(b, "db_name").map_err(bad)? {
        role.db_name = db;
    }
    if role.db_name.is_empty() {
        return Err(bad("empty database name attribute"));
    }
    for (field, target) in [
        ("creation_statements", &mut role.creation_statements),
        ("revocation_statements", &mut role.revocation_statements),
        ("rollback_statements", &mut role.rollback_statements),
        ("renew_statements", &mut role.renew_statements),
    ] {
        if let Some(v) = string_slice_field(b, field).map_err(bad)? {
            *target = v;
        }
    }
    if let Some(d) = duration_field(b, "default_ttl").map_err(bad)? {
        role.default_ttl = d;
    }
    if let Some(d) = duration_field(b, "max_ttl").map_err(bad)? {
        role.max_ttl = d;
    }
    if !role.max_ttl.is_zero() && role.default_ttl > role.max_ttl {
        return Err(bad("ttl cannot be greater than max_ttl"));
    }
    state.db_roles.insert(name, role);
    no_content()
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn db_creds(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let caller = ctx.caller()?.clone();
    let name = ctx.param("name");
    let role = state
        .db_roles
        .get(name)
        .cloned()
        .ok_or_else(|| bad(format!("unknown role: {name}")))?;
    let (ttl, warnings) = state
        .calculate_ttl(
            Duration::ZERO,
            role.default_ttl,
            Duration::ZERO,
            role.max_ttl,
            Duration::ZERO,
            ctx.now,
            ctx.now,
        )
        .map_err(|e| error(500, e))?;
    let cap = state.hard_cap(ctx.now, Duration::ZERO, role.max_ttl, Duration::ZERO);
    let mut expires = util::add(ctx.now, ttl);
    if let Some(cap) = cap
        && cap < expires
    {
        expires = cap;
    }
    let lease_id = format!(
        "{}/{}",
        ctx.path.trim_end_matches('/'),
        util::random_base62(24)
    );
    let username = truncate(
        &format!(
            "v-{}-{}-{}-{}",
            truncate(&caller.info.display_name, 8),
            truncate(name, 8),
            util::random_base62(20),
            ctx.now.timestamp()
        ),
        63,
    );
    let password = util::random_password();
    state.add_lease(Lease {
        info: LeaseInfo {
            lease_id: lease_id.clone(),
            path: ctx.path.to_string(),
            role: name.to_string(),
            token_accessor: caller.info.accessor.clone(),
            issued_at: ctx.now,
            expires_at: expires,
            last_renewal: None,
            renewals: 0,
            renewable: true,
            state: LeaseState::Active,
            ended_at: None,
            revoked_by: None,
            username: username.clone(),
        },
        owner: caller.info.id.clone(),
    });
    Ok(Reply::Logical(Logical {
        data: Some(json!({ "username": username, "password": password })),
        lease: Some((lease_id, secs(ttl), true)),
        warnings,
        ..Logical::default()
    }))
}

// ---------------------------------------------------------------------------------------------
// kv-v2

const KV_MAX_VERSIONS: usize = 10;

fn version_metadata(version: u64, v: &KvVersion) -> Value {
    json!({
        "created_time": util::rfc3339(v.created),
        "custom_metadata": Value::Null,
        "deletion_time": v.deleted.map(util::rfc3339).unwrap_or_default(),
        "destroyed": v.destroyed,
        "version": version,
    })
}

fn kv_read(state: &State, ctx: &Ctx<'_>) -> Handled {
    let secret = state.kv.get(ctx.param("path")).ok_or_else(not_found)?;
    let wanted = match ctx.query.get("version") {
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| bad(format!("error converting input {v} for field \"version\"")))?,
        None => 0,
    };
    let number = if wanted == 0 { secret.current } else { wanted };
    let version = secret.versions.get(&number).ok_or_else(not_found)?;
    let metadata = version_metadata(number, version);
    if version.deleted.is_some() || version.destroyed {
        return Ok(Reply::Logical(Logical {
            status: Some(404),
            data: Some(json!({ "data": Value::Null, "metadata": metadata })),
            ..Logical::default()
        }));
    }
    data(json!({ "data": version.data, "metadata": metadata }))
}

fn kv_write(state: &mut State, ctx: &Ctx<'_>) -> Handled {
    let path = ctx.param("path").to_string();
    let payload = match ctx.body.get("data") {
        Some(Value::Object(m)) => m.clone(),
        _ => return Err(bad("no data provided")),
    };
    let cas = match ctx.body.get("options") {
        Some(Value::Object(o)) => match o.get("cas") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| bad("invalid cas value"))?,
            ),
        },
        _ => None,
    };
    let now = ctx.now;
    let secret = state.kv.entry(path).or_insert_with(|| KvSecret {
        versions: BTreeMap::new(),
        current: 0,
        created: now,
        updated: now,
    });
    if let Some(cas) = cas
        && cas != secret.current
    {
        return Err(bad(
            "check-and-set parameter did not match the current version",
        ));
    }
    secret.current += 1;
    let version = KvVersion {
        data: payload,
        created: now,
        deleted: None,
        destroyed: false,
    };
    let metadata = version_metadata(secret.current, &version);
    secret.versions.insert(secret.current, version);
    secret.updated = now;
    while secret.versions.len() > KV_MAX_VERSIONS {
        let oldest = *secret.versions.keys().next().expect("non-empty");
        secret.versions.remove(&oldest);
    }
    data(metadata)
}

fn kv_metadata_read(state: &State, ctx: &Ctx<'_>) -> Handled {
    let secret = state.kv.get(ctx.param("path")).ok_or_else(not_found)?;
    let versions: Map<String, Value> = secret
        .versions
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                json!({
                    "created_time": util::rfc3339(v.created),
                    "deletion_time": v.deleted.map(util::rfc3339).unwrap_or_default(),
                    "destroyed": v.destroyed,
                }),
            )
        })
        .collect();
    data(json!({
        "cas_required": false,
        "created_time": util::rfc3339(secret.created),
        "current_version": secret.current,
        "custom_metadata": Value::Null,
        "delete_version_after": "0s",
        "max_versions": 0,
        "oldest_version": secret.versions.keys().next().copied().unwrap_or(0),
        "updated_time": util::rfc3339(secret.updated),
        "versions": versions,
    }))
}

fn kv_list(state: &State, ctx: &Ctx<'_>) -> Handled {
    let folder = ctx.param("path").trim_end_matches('/');
    let prefix = if folder.is_empty() {
        String::new()
    } else {
        format!("{folder}/")
    };
    let keys: BTreeSet<String> = state
        .kv
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter(|rest| !rest.is_empty())
        .map(|rest| match rest.find('/') {
            Some(i) => rest[..=i].to_string(),
            None => rest.to_string(),
        })
        .collect();
    list(keys.into_iter().collect())
}
