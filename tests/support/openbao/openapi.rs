//! Checking Vault calls against Vault 1.15's OpenAPI document
//! (`tests/data/vault-openapi-1.15.json`, or the file `VAULT_OPENAPI_JSON` names).
//!
//! How the document represents things:
//! - There is no `list` method: a LIST is `get` on the path with a trailing `/` and a required
//!   query parameter `list` (enum `["true"]`). So `LIST /v1/sys/policies/acl` and
//!   `GET /v1/sys/policies/acl?list=true` both check against `/sys/policies/acl/` `get`.
//! - There is no `put` either: Vault treats PUT as POST, and the document only has `post`.
//! - Mounts are path parameters named `{<engine>_mount_path}` whose `default` is the usual mount
//!   (`kubernetes`, `database`, and `kv-v2` — not `kv` — for kv version 2), so the checker needs
//!   to know which engine is mounted where: [`Mounts`].
//! - Request bodies are `$ref`s into `components.schemas`; every body field sent must be one of
//!   that schema's `properties`. Query parameters other than `list` are not checked (the
//!   document declares none for `sys/health`, for example, although Vault reads some).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;

use super::RecordedRequest;

/// Where the document is read from.
pub(crate) fn document_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VAULT_OPENAPI_JSON") {
        return PathBuf::from(p);
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/vault-openapi-1.15.json"
    ))
}

/// The parsed document, read once per process.
pub(crate) fn document() -> Result<&'static Value, String> {
    static DOC: OnceLock<Result<Value, String>> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = document_path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("read the Vault OpenAPI document {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("parse the Vault OpenAPI document {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// One mount: its path (`kv`, `database`, `auth/kubernetes`) and the engine whose
/// `{<engine>_mount_path}` templates apply (`kv_v2`, `database`, `kubernetes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub path: String,
    pub engine: String,
}

/// The mounts to resolve paths with. `sys/` and `auth/token/` are always there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mounts(pub Vec<Mount>);

impl Default for Mounts {
    /// `kv` (kv-v2), `database`, `auth/kubernetes`.
    fn default() -> Self {
        Mounts::empty()
            .secrets("kv", "kv_v2")
            .secrets("database", "database")
            .auth("kubernetes", "kubernetes")
    }
}

impl Mounts {
    pub(crate) fn empty() -> Self {
        Mounts(Vec::new())
    }

    /// A secrets engine mounted at `path`.
    pub(crate) fn secrets(mut self, path: &str, engine: &str) -> Self {
        self.0.push(Mount {
            path: path.trim_matches('/').to_string(),
            engine: engine.to_string(),
        });
        self
    }

    /// An auth method mounted at `auth/<path>`.
    pub(crate) fn auth(mut self, path: &str, engine: &str) -> Self {
        self.0.push(Mount {
            path: format!("auth/{}", path.trim_matches('/')),
            engine: engine.to_string(),
        });
        self
    }
}

fn resolve_ref<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix("#/")
            .map(|p| {
                p.split('/')
                    .fold(doc, |v, seg| v.get(seg).unwrap_or(&Value::Null))
            })
            .unwrap_or(&Value::Null),
        None => schema,
    }
}

/// The body fields an operation declares (`None`: it has no request body).
pub(crate) fn declared_fields(doc: &Value, operation: &Value) -> Option<BTreeSet<String>> {
    let schema = operation.pointer("/requestBody/content/application~1json/schema")?;
    let schema = resolve_ref(doc, schema);
    Some(
        schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default(),
    )
}

/// Whether an operation is a LIST (a required `list` query parameter).
pub(crate) fn is_list_operation(operation: &Value) -> bool {
    operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|ps| {
            ps.iter().any(|p| {
                p.get("name").and_then(Value::as_str) == Some("list")
                    && p.get("in").and_then(Value::as_str) == Some("query")
            })
        })
}

fn doc_method(method: &str) -> Result<&'static str, String> {
    match method {
        "GET" | "LIST" => Ok("get"),
        "POST" | "PUT" => Ok("post"),
        "DELETE" => Ok("delete"),
        "PATCH" => Ok("patch"),
        other => Err(format!("{other}: not a method Vault's HTTP API accepts")),
    }
}

/// [`openapi_check_with`] with the default mounts (`kv` kv-v2, `database`, `auth/kubernetes`).
pub(crate) fn openapi_check<I, S>(
    method: impl AsRef<str>,
    path: &str,
    body_fields: I,
) -> Result<(), String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    openapi_check_with(&Mounts::default(), method, path, body_fields)
}

/// Checks that a call exists in the document: `method` (`GET`, `LIST`, `POST`, `PUT`, `DELETE`,
/// `PATCH`) on `path` (with or without `/v1`, optionally with `?list=true`), sending
/// `body_fields`. The error says what does not match.
pub(crate) fn openapi_check_with<I, S>(
    mounts: &Mounts,
    method: impl AsRef<str>,
    path: &str,
    body_fields: I,
) -> Result<(), String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let doc = document()?;
    let method = method.as_ref().to_ascii_uppercase();
    let fields: Vec<String> = body_fields
        .into_iter()
        .map(|f| f.as_ref().to_string())
        .collect();
    let (raw_path, query) = path.split_once('?').unwrap_or((path, ""));
    let list_query = query.split('&').any(|kv| {
        matches!(kv.split_once('='), Some(("list", v)) if v.eq_ignore_ascii_case("true") || v == "1")
    });
    let mut p = raw_path.trim_start_matches('/');
    p = p.strip_prefix("v1/").unwrap_or(p);
    let list = method == "LIST" || (method == "GET" && list_query);
    let mut p = p.to_string();
    if list && !p.ends_with('/') {
        p.push('/');
    }
    let what = format!("{method} /v1/{p}");
    let op_name = doc_method(&method).map_err(|e| format!("{what}: {e}"))?;
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .ok_or("the OpenAPI document has no paths")?;

    // Which templates apply: literal sys/ and auth/token/ ones, or the mounted engine's.
    let under = |prefix: &str| p == prefix || p.starts_with(&format!("{prefix}/"));
    let (template_prefix, mount): (String, Option<&Mount>) = if under("sys") {
        ("/sys/".into(), None)
    } else if under("auth/token") {
        ("/auth/token/".into(), None)
    } else {
        let mount = mounts
            .0
            .iter()
            .filter(|m| under(&m.path))
            .max_by_key(|m| m.path.len())
            .ok_or_else(|| {
                format!(
                    "{what}: no mount for this path (known: sys, auth/token, {})",
                    mounts
                        .0
                        .iter()
                        .map(|m| m.path.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let prefix = if mount.path.starts_with("auth/") {
            format!("/auth/{{{}_mount_path}}/", mount.engine)
        } else {
            format!("/{{{}_mount_path}}/", mount.engine)
        };
        (prefix, Some(mount))
    };
    let segments: Vec<&str> = p.split('/').collect();
    let mut problems = Vec::new();
    let mut matched_any = false;
    for (template, item) in paths
        .iter()
        .filter(|(t, _)| t.starts_with(&template_prefix))
    {
        let concrete = match mount {
            Some(m) => {
                let param = format!("{{{}_mount_path}}", m.engine);
                let mount_name = m.path.strip_prefix("auth/").unwrap_or(&m.path);
                template.replacen(&param, mount_name, 1)
            }
            None => template.clone(),
        };
        let template_segments: Vec<&str> = concrete.trim_start_matches('/').split('/').collect();
        let mut params = Default::default();
        if !match_segments(&template_segments, &segments, &mut params) {
            continue;
        }
        matched_any = true;
        let Some(operation) = item.get(op_name) else {
            let has: Vec<&str> = ["get", "post", "delete", "patch"]
                .into_iter()
                .filter(|m| item.get(*m).is_some())
                .collect();
            problems.push(format!(
                "{template} has no {op_name} (it has: {})",
                has.join(", ")
            ));
            continue;
        };
        let is_list = is_list_operation(operation);
        if is_list && !list {
            problems.push(format!(
                "{template} {op_name} is a LIST: use LIST or GET ?list=true"
            ));
            continue;
        }
        if list && !is_list {
            problems.push(format!("{template} {op_name} is not a LIST"));
            continue;
        }
        match declared_fields(doc, operation) {
            None if !fields.is_empty() => {
                problems.push(format!(
                    "{template} {op_name} declares no request body, but the call sends {fields:?}"
                ));
                continue;
            }
            Some(declared) => {
                let undeclared: Vec<&String> =
                    fields.iter().filter(|f| !declared.contains(*f)).collect();
                if !undeclared.is_empty() {
                    problems.push(format!(
                        "{template} {op_name} does not declare body field(s) {undeclared:?} (declared: {declared:?})"
                    ));
                    continue;
                }
            }
            None => {}
        }
        return Ok(());
    }
    if !matched_any {
        return Err(format!("{what}: no such path in the OpenAPI document"));
    }
    Err(format!("{what}: {}", problems.join("; ")))
}

/// Checks every recorded request; one message per request that does not conform.
pub(crate) fn check_requests(mounts: &Mounts, requests: &[RecordedRequest]) -> Vec<String> {
    requests
        .iter()
        .filter_map(|r| {
            openapi_check_with(mounts, r.method.as_str(), &r.path, &r.body_fields).err()
        })
        .collect()
}

/// The path parameters that stand for one or more segments.
const MULTI_SEGMENT_PARAMS: [&str; 3] = ["path", "prefix", "url_lease_id"];

/// Matches `path` (segments, without a leading `/`) against `template` segments, filling
/// `params`. `{name}` matches one non-empty segment; the multi-segment parameters match one or
/// more (zero or more just before a trailing `/`).
fn match_segments(template: &[&str], path: &[&str], params: &mut HashMap<String, String>) -> bool {
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
