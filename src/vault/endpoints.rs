//! Typed Vault endpoints that vaultrs 0.8 lacks or gets wrong, on vaultrs's own client (its TLS
//! settings, token and namespace headers, and error parsing):
//!
//! - `sys/policies/acl/{name}`: vaultrs only speaks the older `sys/policy/{name}`;
//! - `sys/leases/renew`, `sys/leases/revoke`, `sys/leases/lookup` (and its LIST by prefix):
//!   vaultrs has none;
//! - reading a dynamic-secret path with its lease (`lease_id`, `lease_duration`, `renewable`):
//!   vaultrs's database call keeps only `data`;
//! - `auth/token/renew-self` and `lookup-self`: vaultrs's renew-self path starts with a tab;
//! - Kubernetes-auth roles, read back with every field Portcullis compares.
//!
//! Every route and body field here is in Vault 1.15's OpenAPI document; `tests/vault.rs` checks
//! the operator's calls against it.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use vaultrs::api::EndpointResult;
use vaultrs::client::{Client, VaultClient};
use vaultrs::error::ClientError;

/// One call: a method, a path under `/v1`, and an optional JSON body.
struct Call<R> {
    method: RequestMethod,
    path: String,
    body: Option<Value>,
    response: PhantomData<fn() -> R>,
}

impl<R> Call<R> {
    fn new(method: RequestMethod, path: String, body: Option<Value>) -> Self {
        Call {
            method,
            path,
            body,
            response: PhantomData,
        }
    }
}

impl<R: DeserializeOwned + Send + Sync> Endpoint for Call<R> {
    type Response = R;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        self.method.clone()
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        self.body
            .as_ref()
            .map(|b| {
                serde_json::to_vec(b)
                    .map_err(|e| rustify::errors::ClientError::DataParseError { source: e.into() })
            })
            .transpose()
    }
}

/// The whole response envelope (`data`, `lease_id`, `auth`, ...).
async fn envelope<T: DeserializeOwned + Send + Sync>(
    client: &VaultClient,
    method: RequestMethod,
    path: String,
    body: Option<Value>,
) -> Result<EndpointResult<T>, ClientError> {
    vaultrs::api::exec_with_no_result(client, Call::<EndpointResult<T>>::new(method, path, body))
        .await
}

/// A call whose answer is empty (204).
async fn empty(
    client: &VaultClient,
    method: RequestMethod,
    path: String,
    body: Option<Value>,
) -> Result<(), ClientError> {
    vaultrs::api::exec_with_empty(client, Call::<()>::new(method, path, body)).await
}

/// `None` for a 404.
fn found<T>(result: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::APIError { code: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Deserialize)]
struct PolicyBody {
    #[serde(default)]
    policy: String,
}

/// `GET sys/policies/acl/{name}`: the policy's HCL, or `None`.
pub async fn policy_read(client: &VaultClient, name: &str) -> Result<Option<String>, ClientError> {
    let r = found(
        envelope::<PolicyBody>(
            client,
            RequestMethod::GET,
            format!("/sys/policies/acl/{name}"),
            None,
        )
        .await,
    )?;
    Ok(r.and_then(|e| e.data).map(|d| d.policy))
}

/// `POST sys/policies/acl/{name}`.
pub async fn policy_write(client: &VaultClient, name: &str, hcl: &str) -> Result<(), ClientError> {
    empty(
        client,
        RequestMethod::POST,
        format!("/sys/policies/acl/{name}"),
        Some(json!({ "policy": hcl })),
    )
    .await
}

/// `DELETE sys/policies/acl/{name}` (deleting a missing policy succeeds).
pub async fn policy_delete(client: &VaultClient, name: &str) -> Result<(), ClientError> {
    found(
        empty(
            client,
            RequestMethod::DELETE,
            format!("/sys/policies/acl/{name}"),
            None,
        )
        .await,
    )
    .map(|_| ())
}

/// A Kubernetes-auth role, as Portcullis writes and compares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct KubernetesRole {
    pub bound_service_account_names: Vec<String>,
    pub bound_service_account_namespaces: Vec<String>,
    pub token_policies: Vec<String>,
    /// Seconds.
    pub token_ttl: u64,
    /// Seconds.
    pub token_max_ttl: u64,
    #[serde(default)]
    pub token_no_default_policy: bool,
}

/// `GET auth/{mount}/role/{name}`.
pub async fn role_read(
    client: &VaultClient,
    mount: &str,
    name: &str,
) -> Result<Option<KubernetesRole>, ClientError> {
    let r = found(
        envelope::<KubernetesRole>(
            client,
            RequestMethod::GET,
            format!("/auth/{mount}/role/{name}"),
            None,
        )
        .await,
    )?;
    Ok(r.and_then(|e| e.data))
}

/// `POST auth/{mount}/role/{name}`.
///
/// `token_policies` goes as one comma-separated string, which Vault also accepts: Vault's
/// `allowed_parameters` globs (`"token_policies" = ["portcullis-*"]`, the operator's own policy)
/// match strings only, never lists.
pub async fn role_write(
    client: &VaultClient,
    mount: &str,
    name: &str,
    role: &KubernetesRole,
) -> Result<(), ClientError> {
    let mut body = serde_json::to_value(role).expect("a role serializes");
    body["token_policies"] = serde_json::Value::String(role.token_policies.join(","));
    empty(
        client,
        RequestMethod::POST,
        format!("/auth/{mount}/role/{name}"),
        Some(body),
    )
    .await
}

/// `DELETE auth/{mount}/role/{name}` (deleting a missing role succeeds).
pub async fn role_delete(client: &VaultClient, mount: &str, name: &str) -> Result<(), ClientError> {
    found(
        empty(
            client,
            RequestMethod::DELETE,
            format!("/auth/{mount}/role/{name}"),
            None,
        )
        .await,
    )
    .map(|_| ())
}

/// Credentials read from a dynamic-secret path, with their lease.
#[derive(Debug, Clone)]
pub struct Issued {
    pub lease_id: String,
    /// Seconds.
    pub lease_duration: u64,
    pub renewable: bool,
    pub data: Map<String, Value>,
}

/// `GET {path}` on a dynamic-secret engine, such as `database/creds/<role>`.
pub async fn read_credentials(client: &VaultClient, path: &str) -> Result<Issued, ClientError> {
    let e = envelope::<Map<String, Value>>(
        client,
        RequestMethod::GET,
        format!("/{}", path.trim_start_matches('/')),
        None,
    )
    .await?;
    Ok(Issued {
        lease_id: e.lease_id,
        lease_duration: u64::from(e.lease_duration),
        renewable: e.renewable,
        data: e.data.ok_or(ClientError::ResponseDataEmptyError)?,
    })
}

/// What a renewal granted.
#[derive(Debug, Clone, Copy)]
pub struct Renewed {
    /// Seconds. Shorter than asked when the lease nears its max TTL.
    pub lease_duration: u64,
    pub renewable: bool,
}

/// `POST sys/leases/renew`.
pub async fn lease_renew(
    client: &VaultClient,
    lease_id: &str,
    increment_seconds: u64,
) -> Result<Renewed, ClientError> {
    let e = envelope::<Value>(
        client,
        RequestMethod::POST,
        "/sys/leases/renew".into(),
        Some(json!({ "lease_id": lease_id, "increment": increment_seconds })),
    )
    .await?;
    Ok(Renewed {
        lease_duration: u64::from(e.lease_duration),
        renewable: e.renewable,
    })
}

/// `POST sys/leases/revoke` (revoking an unknown or expired lease succeeds, as in Vault).
pub async fn lease_revoke(client: &VaultClient, lease_id: &str) -> Result<(), ClientError> {
    empty(
        client,
        RequestMethod::POST,
        "/sys/leases/revoke".into(),
        Some(json!({ "lease_id": lease_id })),
    )
    .await
}

/// A lease's state, from `sys/leases/lookup`.
#[derive(Debug, Clone, Deserialize)]
pub struct LeaseLookup {
    /// Seconds left.
    #[serde(default)]
    pub ttl: i64,
    #[serde(default)]
    pub renewable: bool,
    /// When Vault issued it (RFC 3339).
    #[serde(default)]
    pub issue_time: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Keys {
    #[serde(default)]
    keys: Vec<String>,
}

/// `LIST sys/leases/lookup/{prefix}/`: the ids of the live leases issued from `prefix` (a
/// credentials path such as `database/creds/writer`); none when Vault has none (404).
pub async fn lease_list(client: &VaultClient, prefix: &str) -> Result<Vec<String>, ClientError> {
    let prefix = prefix.trim_matches('/');
    let listed = found(
        envelope::<Keys>(
            client,
            RequestMethod::LIST,
            format!("/sys/leases/lookup/{prefix}/"),
            None,
        )
        .await,
    )?;
    Ok(listed
        .and_then(|e| e.data)
        .map(|d| d.keys)
        .unwrap_or_default()
        .into_iter()
        .filter(|k| !k.ends_with('/'))
        .map(|k| format!("{prefix}/{k}"))
        .collect())
}

/// `POST sys/leases/lookup`: `None` when the lease is gone (Vault answers 400 "invalid lease").
pub async fn lease_lookup(
    client: &VaultClient,
    lease_id: &str,
) -> Result<Option<LeaseLookup>, ClientError> {
    match envelope::<LeaseLookup>(
        client,
        RequestMethod::POST,
        "/sys/leases/lookup".into(),
        Some(json!({ "lease_id": lease_id })),
    )
    .await
    {
        Ok(e) => Ok(e.data),
        Err(ClientError::APIError {
            code: 400 | 404, ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The operator's own token, from `auth/token/lookup-self`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenLookup {
    /// Seconds left.
    #[serde(default)]
    pub ttl: u64,
    /// Seconds; non-zero for a periodic token.
    #[serde(default)]
    pub period: Option<u64>,
    #[serde(default)]
    pub renewable: bool,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    /// The token's accessor: which leases it issued are recorded with.
    #[serde(default)]
    pub accessor: String,
}

/// `GET auth/token/lookup-self`.
pub async fn token_lookup_self(client: &VaultClient) -> Result<TokenLookup, ClientError> {
    envelope::<TokenLookup>(
        client,
        RequestMethod::GET,
        "/auth/token/lookup-self".into(),
        None,
    )
    .await?
    .data
    .ok_or(ClientError::ResponseDataEmptyError)
}

/// `POST auth/token/renew-self`; the token's new TTL in seconds.
pub async fn token_renew_self(client: &VaultClient) -> Result<u64, ClientError> {
    let e = envelope::<Value>(
        client,
        RequestMethod::POST,
        "/auth/token/renew-self".into(),
        Some(json!({})),
    )
    .await?;
    e.auth
        .map(|a| a.lease_duration)
        .ok_or(ClientError::ResponseEmptyError)
}

/// `POST auth/{mount}/login` with a Kubernetes ServiceAccount token; vaultrs's own call.
pub async fn kubernetes_login(
    client: &VaultClient,
    mount: &str,
    role: &str,
    jwt: &str,
) -> Result<vaultrs::api::AuthInfo, ClientError> {
    vaultrs::auth::kubernetes::login(client, mount, role, jwt).await
}

/// Whether the client's token is set (for logs).
pub fn has_token(client: &VaultClient) -> bool {
    !client.settings().token.is_empty()
}
