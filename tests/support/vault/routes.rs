//! The routes the double serves, each named by its OpenAPI path template (Vault 1.15's document,
//! with the mount parameters `{kubernetes_mount_path}`, `{database_mount_path}`,
//! `{kv_v2_mount_path}` standing for the configured mounts), and the matcher.

use std::collections::HashMap;

/// Which handler serves a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Health,
    PolicyList,
    PolicyRead,
    PolicyWrite,
    PolicyDelete,
    CapabilitiesSelf,
    LeaseRenew,
    LeaseRenewUrl,
    LeaseRevoke,
    LeaseRevokeUrl,
    LeaseLookup,
    TokenCreate,
    TokenLookupSelf,
    TokenRenewSelf,
    TokenRevokeSelf,
    KubeConfigRead,
    KubeConfigWrite,
    KubeRoleList,
    KubeRoleRead,
    KubeRoleWrite,
    KubeRoleDelete,
    KubeLogin,
    DbRoleList,
    DbRoleRead,
    DbRoleWrite,
    DbRoleDelete,
    DbCreds,
    KvRead,
    KvWrite,
    KvDelete,
    KvMetadataRead,
    KvMetadataList,
    KvMetadataDelete,
}

/// One route: the method as Vault's HTTP layer sees it (`GET`, `LIST` — also `GET ?list=true` —,
/// `POST` — also `PUT` —, `DELETE`), the OpenAPI path template, and the body fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteSpec {
    pub kind: Kind,
    pub method: &'static str,
    pub path: &'static str,
    /// Body fields the double reads and acts on.
    pub fields: &'static [&'static str],
    /// Body fields declared in the OpenAPI document that the double accepts without acting on
    /// them (a request using one is recorded in [`super::RecordedRequest::ignored_fields`]).
    pub ignored: &'static [&'static str],
    /// The path has an existence check (`x-vault-createSupported`): a write needs `create` when
    /// the item does not exist yet and `update` when it does. Without one a write needs `update`.
    pub create_supported: bool,
    /// No token needed (`x-vault-unauthenticated`).
    pub unauthenticated: bool,
    pub summary: &'static str,
}

const fn route(
    kind: Kind,
    method: &'static str,
    path: &'static str,
    fields: &'static [&'static str],
    summary: &'static str,
) -> RouteSpec {
    RouteSpec {
        kind,
        method,
        path,
        fields,
        ignored: &[],
        create_supported: false,
        unauthenticated: false,
        summary,
    }
}

const fn ignoring(mut r: RouteSpec, ignored: &'static [&'static str]) -> RouteSpec {
    r.ignored = ignored;
    r
}

const fn creatable(mut r: RouteSpec) -> RouteSpec {
    r.create_supported = true;
    r
}

const fn unauthenticated(mut r: RouteSpec) -> RouteSpec {
    r.unauthenticated = true;
    r
}

const KUBE_ROLE_FIELDS: &[&str] = &[
    "bound_service_account_names",
    "bound_service_account_namespaces",
    "audience",
    "alias_name_source",
    "token_policies",
    "policies",
    "token_ttl",
    "ttl",
    "token_max_ttl",
    "max_ttl",
    "token_period",
    "period",
    "token_explicit_max_ttl",
    "token_no_default_policy",
];

const KUBE_CONFIG_FIELDS: &[&str] = &[
    "kubernetes_host",
    "kubernetes_ca_cert",
    "token_reviewer_jwt",
    "pem_keys",
    "issuer",
    "disable_iss_validation",
    "disable_local_ca_jwt",
];

const TOKEN_CREATE_FIELDS: &[&str] = &[
    "policies",
    "ttl",
    "lease",
    "period",
    "explicit_max_ttl",
    "no_parent",
    "no_default_policy",
    "renewable",
    "display_name",
    "meta",
];

const DB_ROLE_FIELDS: &[&str] = &[
    "db_name",
    "creation_statements",
    "revocation_statements",
    "rollback_statements",
    "renew_statements",
    "default_ttl",
    "max_ttl",
];

/// Every route the double serves.
pub(crate) static ROUTES: &[RouteSpec] = &[
    unauthenticated(route(
        Kind::Health,
        "GET",
        "/sys/health",
        &[],
        "health: initialized, sealed, standby, version",
    )),
    route(
        Kind::PolicyList,
        "LIST",
        "/sys/policies/acl/",
        &[],
        "ACL policy names (keys, policies)",
    ),
    route(
        Kind::PolicyRead,
        "GET",
        "/sys/policies/acl/{name}",
        &[],
        "one ACL policy (name, policy, rules)",
    ),
    route(
        Kind::PolicyWrite,
        "POST",
        "/sys/policies/acl/{name}",
        &["policy"],
        "write an ACL policy, parsed as HCL (400 when invalid)",
    ),
    route(
        Kind::PolicyDelete,
        "DELETE",
        "/sys/policies/acl/{name}",
        &[],
        "delete an ACL policy (not root, not default)",
    ),
    ignoring(
        route(
            Kind::CapabilitiesSelf,
            "POST",
            "/sys/capabilities-self",
            &["paths", "path"],
            "the calling token's capabilities on paths",
        ),
        &["token"],
    ),
    route(
        Kind::LeaseRenew,
        "POST",
        "/sys/leases/renew",
        &["lease_id", "increment"],
        "renew a lease, capped at its max TTL",
    ),
    route(
        Kind::LeaseRenewUrl,
        "POST",
        "/sys/leases/renew/{url_lease_id}",
        &["increment"],
        "renew a lease named in the path",
    ),
    route(
        Kind::LeaseRevoke,
        "POST",
        "/sys/leases/revoke",
        &["lease_id", "sync"],
        "revoke a lease (idempotent)",
    ),
    route(
        Kind::LeaseRevokeUrl,
        "POST",
        "/sys/leases/revoke/{url_lease_id}",
        &["sync"],
        "revoke a lease named in the path",
    ),
    route(
        Kind::LeaseLookup,
        "POST",
        "/sys/leases/lookup",
        &["lease_id"],
        "id, issue_time, expire_time, ttl, renewable, last_renewal",
    ),
    ignoring(
        route(
            Kind::TokenCreate,
            "POST",
            "/auth/token/create",
            TOKEN_CREATE_FIELDS,
            "a child (or, with root/sudo, orphan or periodic) token",
        ),
        &["entity_alias", "id", "num_uses", "type"],
    ),
    route(
        Kind::TokenLookupSelf,
        "GET",
        "/auth/token/lookup-self",
        &[],
        "the calling token's properties",
    ),
    ignoring(
        route(
            Kind::TokenRenewSelf,
            "POST",
            "/auth/token/renew-self",
            &["increment"],
            "renew the calling token (period, max TTL)",
        ),
        &["token"],
    ),
    route(
        Kind::TokenRevokeSelf,
        "POST",
        "/auth/token/revoke-self",
        &[],
        "revoke the calling token, its children and their leases",
    ),
    route(
        Kind::KubeConfigRead,
        "GET",
        "/auth/{kubernetes_mount_path}/config",
        &[],
        "the Kubernetes auth configuration (without the reviewer JWT)",
    ),
    route(
        Kind::KubeConfigWrite,
        "POST",
        "/auth/{kubernetes_mount_path}/config",
        KUBE_CONFIG_FIELDS,
        "configure Kubernetes auth (recorded; TokenReview goes through the kube::Client)",
    ),
    route(
        Kind::KubeRoleList,
        "LIST",
        "/auth/{kubernetes_mount_path}/role/",
        &[],
        "Kubernetes auth role names",
    ),
    route(
        Kind::KubeRoleRead,
        "GET",
        "/auth/{kubernetes_mount_path}/role/{name}",
        &[],
        "one Kubernetes auth role",
    ),
    creatable(ignoring(
        route(
            Kind::KubeRoleWrite,
            "POST",
            "/auth/{kubernetes_mount_path}/role/{name}",
            KUBE_ROLE_FIELDS,
            "write a Kubernetes auth role",
        ),
        &[
            "bound_cidrs",
            "token_bound_cidrs",
            "num_uses",
            "token_num_uses",
            "token_type",
        ],
    )),
    route(
        Kind::KubeRoleDelete,
        "DELETE",
        "/auth/{kubernetes_mount_path}/role/{name}",
        &[],
        "delete a Kubernetes auth role",
    ),
    unauthenticated(route(
        Kind::KubeLogin,
        "POST",
        "/auth/{kubernetes_mount_path}/login",
        &["role", "jwt"],
        "log in with a ServiceAccount JWT (real TokenReview)",
    )),
    route(
        Kind::DbRoleList,
        "LIST",
        "/{database_mount_path}/roles/",
        &[],
        "database role names",
    ),
    route(
        Kind::DbRoleRead,
        "GET",
        "/{database_mount_path}/roles/{name}",
        &[],
        "one database role",
    ),
    creatable(ignoring(
        route(
            Kind::DbRoleWrite,
            "POST",
            "/{database_mount_path}/roles/{name}",
            DB_ROLE_FIELDS,
            "write a database role (db_name, statements, default_ttl, max_ttl)",
        ),
        &["credential_config", "credential_type"],
    )),
    route(
        Kind::DbRoleDelete,
        "DELETE",
        "/{database_mount_path}/roles/{name}",
        &[],
        "delete a database role",
    ),
    route(
        Kind::DbCreds,
        "GET",
        "/{database_mount_path}/creds/{name}",
        &[],
        "dynamic credentials with a lease owned by the calling token",
    ),
    route(
        Kind::KvRead,
        "GET",
        "/{kv_v2_mount_path}/data/{path}",
        &[],
        "read a kv-v2 secret (?version=N)",
    ),
    creatable(ignoring(
        route(
            Kind::KvWrite,
            "POST",
            "/{kv_v2_mount_path}/data/{path}",
            &["data", "options"],
            "write a kv-v2 secret version (options.cas)",
        ),
        &["version"],
    )),
    route(
        Kind::KvDelete,
        "DELETE",
        "/{kv_v2_mount_path}/data/{path}",
        &[],
        "soft-delete the latest version",
    ),
    route(
        Kind::KvMetadataRead,
        "GET",
        "/{kv_v2_mount_path}/metadata/{path}",
        &[],
        "a kv-v2 secret's metadata and versions",
    ),
    route(
        Kind::KvMetadataList,
        "LIST",
        "/{kv_v2_mount_path}/metadata/{path}/",
        &[],
        "keys under a kv-v2 folder",
    ),
    route(
        Kind::KvMetadataDelete,
        "DELETE",
        "/{kv_v2_mount_path}/metadata/{path}",
        &[],
        "delete a kv-v2 secret and all its versions",
    ),
];

/// Path parameters that may span several segments.
pub(crate) const MULTI_SEGMENT_PARAMS: [&str; 3] = ["path", "prefix", "url_lease_id"];

/// Matches `path` (segments, without a leading `/`) against `template` segments, filling
/// `params`. `{name}` matches one non-empty segment; the multi-segment parameters match one or
/// more (zero or more just before a trailing `/`).
pub(crate) fn match_segments(
    template: &[&str],
    path: &[&str],
    params: &mut HashMap<String, String>,
) -> bool {
    let Some((first, rest)) = template.split_first() else {
        return path.is_empty();
    };
    if let Some(name) = first.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        if MULTI_SEGMENT_PARAMS.contains(&name) {
            // Zero segments only when what follows is the trailing empty segment of a list path.
            let min = if rest == [""] { 0 } else { 1 };
            for take in (min..=path.len()).rev() {
                let value = path[..take].join("/");
                if take > 0 && value.is_empty() {
                    continue;
                }
                let mut attempt = params.clone();
                if match_segments(rest, &path[take..], &mut attempt) {
                    attempt.insert(name.to_string(), value);
                    *params = attempt;
                    return true;
                }
            }
            return false;
        }
        let Some((segment, path_rest)) = path.split_first() else {
            return false;
        };
        if segment.is_empty() {
            return false;
        }
        if match_segments(rest, path_rest, params) {
            params.insert(name.to_string(), segment.to_string());
            return true;
        }
        return false;
    }
    match path.split_first() {
        Some((segment, path_rest)) if segment == first => match_segments(rest, path_rest, params),
        _ => false,
    }
}

/// The configured mounts, substituted into the templates.
#[derive(Debug, Clone)]
pub(crate) struct MountNames {
    pub kubernetes: String,
    pub database: String,
    pub kv: String,
}

impl MountNames {
    /// The template with the mount parameters replaced.
    pub(crate) fn concrete(&self, template: &str) -> String {
        template
            .replace("{kubernetes_mount_path}", &self.kubernetes)
            .replace("{database_mount_path}", &self.database)
            .replace("{kv_v2_mount_path}", &self.kv)
    }

    /// Whether `path` (logical, no leading `/`) is under a mount the double serves.
    pub(crate) fn is_mounted(&self, path: &str) -> bool {
        let under = |mount: &str| path == mount || path.starts_with(&format!("{mount}/"));
        under("sys")
            || under("auth/token")
            || under(&format!("auth/{}", self.kubernetes))
            || under(&self.database)
            || under(&self.kv)
    }
}

/// Every route whose path template matches `path` (logical: no `/v1/`, and for a list
/// operation ending in `/`), with its parameters.
pub(crate) fn matching(
    mounts: &MountNames,
    path: &str,
) -> Vec<(&'static RouteSpec, HashMap<String, String>)> {
    let segments: Vec<&str> = path.split('/').collect();
    let mut out = Vec::new();
    for spec in ROUTES {
        let concrete = mounts.concrete(spec.path);
        let template: Vec<&str> = concrete.trim_start_matches('/').split('/').collect();
        let mut params = HashMap::new();
        if match_segments(&template, &segments, &mut params) {
            out.push((spec, params));
        }
    }
    out
}
