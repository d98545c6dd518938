//! The HTTP side: hyper on loopback, Vault's method and path handling, fault injection, the
//! request log, authentication and ACL checks, and the response envelope.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::RecordedRequest;
use super::acl::Operation;
use super::handlers::{self, ApiError, Ctx, Handled, Logical, Reply, bad, denied, error};
use super::routes::{self, Kind, MountNames, RouteSpec};
use super::state::State;
use super::util;

/// Everything the server tasks and the handle share.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub log: Mutex<Vec<RecordedRequest>>,
    pub sealed: AtomicBool,
    /// `(remaining, status)`.
    pub fail_next: Mutex<(u32, u16)>,
    pub latency: Mutex<Duration>,
    pub hang: watch::Sender<bool>,
    pub kube: Option<kube::Client>,
    pub mounts: MountNames,
    pub version: String,
    pub cluster_id: String,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The state with everything due at `now` expired.
    pub(super) fn state_at(&self, now: DateTime<Utc>) -> MutexGuard<'_, State> {
        let mut state = lock(&self.state);
        state.sweep(now);
        state
    }
}

/// Accepts connections until `shutdown` flips; one task per connection.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let mut conn_shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_shutdown.changed() => {}
                    }
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Expires what is due every `interval` until `shutdown` flips.
pub(crate) async fn sweep(
    shared: Arc<Shared>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {
                drop(shared.state_at(Utc::now()));
            }
            _ = shutdown.changed() => return,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn json_response(status: u16, body: Option<Value>) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let builder = Response::builder()
        .status(status)
        .header("cache-control", "no-store");
    match body {
        Some(body) => builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string() + "\n"))),
        None => builder.body(Full::new(Bytes::new())),
    }
    .expect("a valid response")
}

fn error_body(e: &ApiError) -> Value {
    json!({ "errors": e.errors })
}

/// Handles one request end to end, recording it in the log.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query_string = req.uri().query().unwrap_or("").to_string();
    let headers = req.headers().clone();
    let token = headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .filter(|t| !t.is_empty());
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body: Result<Map<String, Value>, String> = if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(Map::new())
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("failed to parse JSON input: body is not a JSON object".into()),
            Err(e) => Err(format!("failed to parse JSON input: {e}")),
        }
    };
    let body_fields: Vec<String> = body
        .as_ref()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let index = {
        let mut log = lock(&shared.log);
        log.push(RecordedRequest {
            method: method.clone(),
            path: if query_string.is_empty() {
                path.clone()
            } else {
                format!("{path}?{query_string}")
            },
            body_fields,
            ignored_fields: Vec::new(),
            status: None,
            received_at: Utc::now(),
            token_accessor: None,
        });
        log.len() - 1
    };

    // Fault injection, in this order: hang, latency, injected failure.
    let mut hang = shared.hang.subscribe();
    if *hang.borrow_and_update() {
        let _ = hang.wait_for(|h| !*h).await;
    }
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let injected = {
        let mut f = lock(&shared.fail_next);
        if f.0 > 0 {
            f.0 -= 1;
            Some(f.1)
        } else {
            None
        }
    };
    let outcome = match injected {
        Some(status) => Outcome::error(error(status, "injected failure (Vault HTTP double)")),
        None => {
            respond(
                &shared,
                &method,
                &path,
                &parse_query(&query_string),
                token.as_deref(),
                body,
            )
            .await
        }
    };
    {
        let mut log = lock(&shared.log);
        if let Some(record) = log.get_mut(index) {
            record.status = Some(outcome.status);
            record.ignored_fields = outcome.ignored;
            record.token_accessor = outcome.accessor;
        }
    }
    json_response(outcome.status, outcome.body)
}

struct Outcome {
    status: u16,
    body: Option<Value>,
    ignored: Vec<String>,
    accessor: Option<String>,
}

impl Outcome {
    fn error(e: ApiError) -> Outcome {
        Outcome {
            status: e.status,
            body: Some(error_body(&e)),
            ignored: Vec::new(),
            accessor: None,
        }
    }
}

fn mount_type(mounts: &MountNames, path: &str) -> &'static str {
    let under = |m: &str| path == m || path.starts_with(&format!("{m}/"));
    if under("sys") {
        "system"
    } else if under("auth/token") {
        "token"
    } else if under(&format!("auth/{}", mounts.kubernetes)) {
        "kubernetes"
    } else if under(&mounts.database) {
        "database"
    } else {
        "kv"
    }
}

fn render(result: Handled, mut warnings: Vec<String>, mount_type: &str) -> (u16, Option<Value>) {
    match result {
        Err(e) => (e.status, Some(error_body(&e))),
        Ok(Reply::Raw(status, body)) => (status, Some(body)),
        Ok(Reply::Logical(Logical {
            status,
            data,
            auth,
            lease,
            warnings: own,
        })) => {
            warnings.extend(own);
            if status.is_none()
                && data.is_none()
                && auth.is_none()
                && lease.is_none()
                && warnings.is_empty()
            {
                return (204, None);
            }
            let (lease_id, lease_duration, renewable) = lease.unwrap_or((String::new(), 0, false));
            let body = json!({
                "request_id": util::uuid(None),
                "lease_id": lease_id,
                "renewable": renewable,
                "lease_duration": lease_duration,
                "data": data,
                "wrap_info": Value::Null,
                "warnings": if warnings.is_empty() { Value::Null } else { json!(warnings) },
                "auth": auth,
                "mount_type": mount_type,
            });
            (status.unwrap_or(200), Some(body))
        }
    }
}

/// Vault's request handling after the HTTP layer: method → operation, list paths, sealed,
/// routing, token and ACL check, handler, envelope.
async fn respond(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    token: Option<&str>,
    body: Result<Map<String, Value>, String>,
) -> Outcome {
    let fail = Outcome::error;
    let Some(rest) = path.strip_prefix("/v1/") else {
        return fail(handlers::not_found());
    };
    let mut logical = rest.to_string();
    let (op_method, mut op) = match method.as_str() {
        "GET" => {
            let list = query
                .get("list")
                .and_then(|v| parse_bool(v))
                .unwrap_or(false);
            if list {
                ("LIST", Operation::List)
            } else {
                ("GET", Operation::Read)
            }
        }
        "LIST" => ("LIST", Operation::List),
        "POST" | "PUT" => ("POST", Operation::Update),
        "DELETE" => ("DELETE", Operation::Delete),
        "PATCH" => ("PATCH", Operation::Patch),
        _ => {
            return fail(ApiError {
                status: 405,
                errors: Vec::new(),
            });
        }
    };
    if op == Operation::List && !logical.ends_with('/') {
        logical.push('/');
    }
    let body = match (op, body) {
        (Operation::Update | Operation::Patch, Err(e)) => return fail(bad(e)),
        (_, Ok(b)) => b,
        (_, Err(_)) => Map::new(),
    };
    let now = Utc::now();
    let sealed = shared.sealed.load(Ordering::SeqCst);
    if logical == "sys/health" && op == Operation::Read {
        let (status, body) = render(
            handlers::health(sealed, query, &shared.version, &shared.cluster_id, now),
            Vec::new(),
            "system",
        );
        return Outcome {
            status,
            body,
            ignored: Vec::new(),
            accessor: None,
        };
    }
    if sealed {
        return fail(error(503, "Vault is sealed"));
    }

    let candidates = routes::matching(&shared.mounts, &logical);
    let chosen: Option<(&'static RouteSpec, HashMap<String, String>)> = candidates
        .iter()
        .find(|(spec, _)| spec.method == op_method)
        .map(|(spec, params)| (*spec, params.clone()));

    let (unknown, ignored) = match &chosen {
        Some((spec, _)) => body
            .keys()
            .filter(|k| !spec.fields.contains(&k.as_str()))
            .fold((Vec::new(), Vec::new()), |(mut u, mut i), k| {
                if spec.ignored.contains(&k.as_str()) {
                    i.push(k.clone());
                } else {
                    u.push(k.clone());
                }
                (u, i)
            }),
        None => (Vec::new(), Vec::new()),
    };
    let warnings = if unknown.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "Endpoint ignored these unrecognized parameters: [{}]",
            unknown.join(" ")
        )]
    };
    let mount_type = mount_type(&shared.mounts, &logical);
    let finish = |result: Handled, accessor: Option<String>| {
        let (status, body) = render(result, warnings.clone(), mount_type);
        Outcome {
            status,
            body,
            ignored: ignored.clone(),
            accessor,
        }
    };

    // The Kubernetes login: unauthenticated, and its TokenReview is awaited without the lock.
    if let Some((spec, params)) = &chosen
        && spec.kind == Kind::KubeLogin
    {
        let ctx = Ctx {
            params,
            body: &body,
            query,
            token: None,
            path: &logical,
            now,
            mounts: &shared.mounts,
            sudo: false,
        };
        let plan = {
            let state = shared.state_at(now);
            handlers::login_prepare(&state, &ctx)
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => return finish(Err(e), None),
        };
        let Some(client) = &shared.kube else {
            return finish(
                Err(error(
                    500,
                    "the Vault HTTP double was started without a kube::Client for TokenReview",
                )),
                None,
            );
        };
        let reviewed = match handlers::token_review(client, &plan).await {
            Ok(r) => r,
            Err(_) => return finish(Err(denied()), None),
        };
        let now = Utc::now();
        let ctx = Ctx { now, ..ctx };
        let mut state = shared.state_at(now);
        let result = handlers::login_finish(&mut state, &ctx, plan, reviewed);
        return finish(result, None);
    }

    let mut state = shared.state_at(now);
    let caller = match chosen {
        Some((spec, _)) if spec.unauthenticated => None,
        _ => {
            let Some(t) = token.and_then(|t| state.active_token(t)).cloned() else {
                return finish(Err(denied()), None);
            };
            Some(t)
        }
    };
    let accessor = caller.as_ref().map(|t| t.info.accessor.clone());
    let mut sudo = false;
    if let Some(caller) = &caller {
        if op == Operation::Update
            && let Some((spec, params)) = &chosen
            && spec.create_supported
            && !handlers::exists(spec.kind, &state, params)
        {
            op = Operation::Create;
        }
        let acl = state.acl_for(caller);
        if !acl.allows(op, &logical) {
            return finish(Err(denied()), accessor);
        }
        sudo = acl.has_sudo(&logical);
    }
    let Some((spec, params)) = chosen else {
        let e = if !candidates.is_empty() {
            error(405, "unsupported operation")
        } else if shared.mounts.is_mounted(&logical) {
            error(404, "unsupported path")
        } else {
            error(
                404,
                format!("no handler for route {logical:?}. route entry not found."),
            )
        };
        return finish(Err(e), accessor);
    };
    let ctx = Ctx {
        params: &params,
        body: &body,
        query,
        token: caller,
        path: &logical,
        now,
        mounts: &shared.mounts,
        sudo,
    };
    let result = handlers::handle(spec.kind, &mut state, &ctx);
    finish(result, accessor)
}
