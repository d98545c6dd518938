//! A minimal HTTP/1.1 client for tests to talk to OpenBao (or anything Vault-shaped): one
//! connection per request, `X-Vault-Token`, JSON bodies, a timeout, and `LIST` as a method.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientError {
    /// No complete answer within the client's timeout.
    Timeout(Duration),
    /// Connecting, writing or reading failed.
    Transport(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Timeout(d) => write!(f, "no answer within {d:?}"),
            ClientError::Transport(e) => write!(f, "transport error: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// An answer: the status and the JSON body (`Null` when empty, a string when not JSON).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VaultResponse {
    pub status: u16,
    pub body: Value,
}

impl VaultResponse {
    /// `body.data`.
    pub(crate) fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// `body.auth`.
    pub(crate) fn auth(&self) -> &Value {
        &self.body["auth"]
    }

    /// `body.errors` as strings.
    pub(crate) fn errors(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `body.warnings` as strings.
    pub(crate) fn warnings(&self) -> Vec<String> {
        self.body["warnings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client for one server address, optionally with a token.
#[derive(Debug, Clone)]
pub(crate) struct VaultClient {
    addr: SocketAddr,
    token: Option<String>,
    timeout: Duration,
}

impl VaultClient {
    /// No token, a 10 s timeout.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        VaultClient {
            addr,
            token: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// The same client sending `token` as `X-Vault-Token`.
    pub(crate) fn with_token(&self, token: impl Into<String>) -> Self {
        VaultClient {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The same client without a token.
    pub(crate) fn without_token(&self) -> Self {
        VaultClient {
            token: None,
            ..self.clone()
        }
    }

    /// The same client with another timeout.
    pub(crate) fn with_timeout(&self, timeout: Duration) -> Self {
        VaultClient {
            timeout,
            ..self.clone()
        }
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Sends `method` (any token, `LIST` included) to `path` (`sys/health`, `/v1/sys/health`,
    /// optionally with a query) with an optional JSON body.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<VaultResponse, ClientError> {
        let uri = if path.starts_with("/v1/") {
            path.to_string()
        } else {
            format!("/v1/{}", path.trim_start_matches('/'))
        };
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Transport(format!("method {method:?}: {e}")))?;
        let addr = self.addr;
        let token = self.token.clone();
        let payload = body.map(|b| b.to_string());
        let exchange = async move {
            let transport = |e: &dyn fmt::Display| ClientError::Transport(e.to_string());
            let stream = TcpStream::connect(addr).await.map_err(|e| transport(&e))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| transport(&e))?;
            let _driver = AbortOnDrop(tokio::spawn(async move {
                let _ = connection.await;
            }));
            let mut builder = Request::builder()
                .method(method)
                .uri(uri)
                .header("host", addr.to_string());
            if let Some(token) = &token {
                builder = builder.header("x-vault-token", token);
            }
            if payload.is_some() {
                builder = builder.header("content-type", "application/json");
            }
            let request = builder
                .body(Full::new(Bytes::from(payload.unwrap_or_default())))
                .map_err(|e| transport(&e))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport(&e))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(&e))?
                .to_bytes();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
            };
            Ok(VaultResponse { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    pub(crate) async fn get(&self, path: &str) -> Result<VaultResponse, ClientError> {
        self.send("GET", path, None).await
    }

    pub(crate) async fn list(&self, path: &str) -> Result<VaultResponse, ClientError> {
        self.send("LIST", path, None).await
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<VaultResponse, ClientError> {
        self.send("POST", path, Some(body)).await
    }

    pub(crate) async fn put(&self, path: &str, body: &Value) -> Result<VaultResponse, ClientError> {
        self.send("PUT", path, Some(body)).await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<VaultResponse, ClientError> {
        self.send("DELETE", path, None).await
    }
}
