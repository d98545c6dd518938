//! A fault-injecting HTTP proxy in front of the real OpenBao: the faults a real server cannot be
//! asked for, driven by the tests at run time. It serves from a thread of its own (with its own
//! tokio runtime), so it keeps answering while a test's thread is busy.
//!
//! Every request is recorded (method, path, body field names, the status answered, the
//! warnings OpenBao answered with) before faults apply; requests that pass are forwarded on a
//! fresh connection to the server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One request the proxy received.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecordedRequest {
    /// As received (`LIST`, `GET`, `POST`, `PUT`, `DELETE`).
    pub method: String,
    /// The path with its query string, e.g. `/v1/sys/policies/acl/x`.
    pub path: String,
    /// The top-level keys of the JSON body.
    pub body_fields: Vec<String>,
    /// What the client got: a status, or `None` for a dropped connection or one still waiting.
    pub status: Option<u16>,
    /// `warnings` in OpenBao's answer.
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Faults {
    /// The next `n` requests are answered with this status.
    fail_next: (u32, u16),
    /// The next `n` requests get their connection closed without an answer.
    reset_next: u32,
    /// Every request waits this long first.
    latency: Duration,
    /// Every request is answered as a sealed server would.
    sealed: bool,
    /// Requests whose path starts with one of these prefixes get that fault, every time.
    on_paths: Vec<(String, PathFault)>,
}

/// A fault for every request to some paths.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PathFault {
    /// Answered with this status.
    Fail(u16),
    /// No answer, ever: the client's own timeout ends the call.
    BlackHole,
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    log: Mutex<Vec<RecordedRequest>>,
    /// While `true`, requests get no answer: a black hole.
    black_hole: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running proxy; it stops when dropped.
pub(crate) struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.shared.black_hole.send_replace(false);
    }
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and forwards to `upstream`.
    pub(crate) fn start(upstream: SocketAddr) -> FaultProxy {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy on 127.0.0.1");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("the proxy's address");
        let (black_hole, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            black_hole,
        });
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let serving = shared.clone();
        std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the fault proxy");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("register the listener");
                    loop {
                        let accepted = tokio::select! {
                            a = listener.accept() => a,
                            _ = shutdown_rx.changed() => break,
                        };
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = serving.clone();
                        let mut stop = shutdown_rx.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                handle(shared.clone(), request)
                            });
                            let connection = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service);
                            tokio::select! {
                                _ = connection => {}
                                _ = stop.changed() => {}
                            }
                        });
                    }
                });
            })
            .expect("spawn the fault proxy's thread");
        FaultProxy {
            addr,
            shared,
            shutdown,
        }
    }

    /// `http://127.0.0.1:PORT`: the address to give the operator.
    pub(crate) fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request is answered 503 `Vault is sealed` (and `sys/health` says sealed), as a
    /// sealed server does, until [`FaultProxy::unseal`].
    pub(crate) fn seal(&self) {
        lock(&self.shared.faults).sealed = true;
    }

    pub(crate) fn unseal(&self) {
        lock(&self.shared.faults).sealed = false;
    }

    /// The next `n` requests are answered `status` with `{"errors": ["injected failure"]}`.
    pub(crate) fn fail_next(&self, n: u32, status: u16) {
        lock(&self.shared.faults).fail_next = (n, status);
    }

    /// The next `n` requests have their connection closed without an answer.
    pub(crate) fn reset_next(&self, n: u32) {
        lock(&self.shared.faults).reset_next = n;
    }

    /// Every request waits `latency` first (zero: none).
    pub(crate) fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// While `true`, requests get no answer (they wait); `false` closes their connections.
    /// From now on, every request whose path (`/v1/...`) starts with `prefix` gets `fault`.
    pub(crate) fn fault_path(&self, prefix: &str, fault: PathFault) {
        lock(&self.shared.faults)
            .on_paths
            .push((prefix.to_string(), fault));
    }

    /// Ends every [`FaultProxy::fault_path`].
    pub(crate) fn clear_path_faults(&self) {
        lock(&self.shared.faults).on_paths.clear();
    }

    pub(crate) fn black_hole(&self, on: bool) {
        self.shared.black_hole.send_replace(on);
    }

    /// Every request so far, oldest first.
    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).clone()
    }

    pub(crate) fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }
}

type Answer = Response<Full<Bytes>>;

fn json_answer(status: u16, body: &Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// What to do with one request, decided (and counted down) when it arrives.
enum Verdict {
    Forward,
    Fail(u16),
    Reset,
    Sealed,
    Silent,
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Answer, Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body_fields = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let index = {
        let mut log = lock(&shared.log);
        log.push(RecordedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            body_fields,
            status: None,
            warnings: Vec::new(),
        });
        log.len() - 1
    };
    let (verdict, latency) = {
        let mut faults = lock(&shared.faults);
        let on_path = faults
            .on_paths
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, fault)| *fault);
        let verdict = if faults.sealed {
            Verdict::Sealed
        } else if let Some(fault) = on_path {
            match fault {
                PathFault::Fail(status) => Verdict::Fail(status),
                PathFault::BlackHole => Verdict::Silent,
            }
        } else if faults.reset_next > 0 {
            faults.reset_next -= 1;
            Verdict::Reset
        } else if faults.fail_next.0 > 0 {
            faults.fail_next.0 -= 1;
            Verdict::Fail(faults.fail_next.1)
        } else {
            Verdict::Forward
        };
        (verdict, faults.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut hole = shared.black_hole.subscribe();
    if *hole.borrow_and_update() {
        while *hole.borrow_and_update() {
            if hole.changed().await.is_err() {
                break;
            }
        }
        return Ok(closed());
    }
    let answer = match verdict {
        Verdict::Reset => return Ok(closed()),
        Verdict::Silent => {
            // Long past any client's timeout; the client gives up first.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(closed());
        }
        Verdict::Fail(status) => {
            json_answer(status, &serde_json::json!({"errors": ["injected failure"]}))
        }
        Verdict::Sealed if path.starts_with("/v1/sys/health") => json_answer(
            503,
            &serde_json::json!({"initialized": true, "sealed": true, "standby": false}),
        ),
        Verdict::Sealed => json_answer(503, &serde_json::json!({"errors": ["Vault is sealed"]})),
        Verdict::Forward => match forward(shared.upstream, parts, bytes).await {
            Ok(answer) => answer,
            Err(e) => json_answer(
                502,
                &serde_json::json!({"errors": [format!("fault proxy: {e}")]}),
            ),
        },
    };
    let warnings = answer_warnings(&answer);
    if let Some(entry) = lock(&shared.log).get_mut(index) {
        entry.status = Some(answer.status().as_u16());
        entry.warnings = warnings;
    }
    Ok(answer)
}

/// An answer hyper cannot send: a `Connection: close` with a body shorter than announced, so
/// the client sees the connection end mid-answer (as with a reset).
fn closed() -> Answer {
    let mut response = Response::new(Full::new(Bytes::new()));
    response.headers_mut().insert(
        "content-length",
        hyper::header::HeaderValue::from_static("100"),
    );
    response.headers_mut().insert(
        "connection",
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

fn answer_warnings(answer: &Answer) -> Vec<String> {
    // The body is a `Full`: its bytes are at hand without polling.
    let Some(bytes) = full_bytes(answer.body()) else {
        return Vec::new();
    };
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| {
            v["warnings"].as_array().map(|w| {
                w.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn full_bytes(body: &Full<Bytes>) -> Option<Bytes> {
    use hyper::body::Body;
    let mut body = body.clone();
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    match std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
        _ => None,
    }
}

async fn forward(
    upstream: SocketAddr,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Result<Answer, String> {
    let stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connect {upstream}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::from_parts(parts, Full::new(body));
    request.headers_mut().insert(
        "host",
        hyper::header::HeaderValue::from_str(&upstream.to_string()).map_err(|e| e.to_string())?,
    );
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Response::from_parts(parts, Full::new(bytes)))
    }
    .await;
    driver.abort();
    result
}
