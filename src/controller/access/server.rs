//! The two doors audit events come in by: `POST /audit/kubernetes` (the API server's audit
//! webhook backend) and a TCP socket for Vault's `socket` audit device.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::intake::{Intake, constant_time_eq};
use crate::access::Source;
use crate::access::kube_audit::EventList;

/// The path the API server's webhook kubeconfig points at.
pub(crate) const WEBHOOK_PATH: &str = "/audit/kubernetes";

/// The webhook's settings.
pub(crate) struct Webhook {
    pub intake: Arc<Intake>,
    /// The bearer token the API server's webhook kubeconfig carries.
    pub token: String,
    pub max_body_bytes: usize,
}

fn respond(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

async fn route(
    req: Request<Incoming>,
    hook: Arc<Webhook>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let metrics = &hook.intake.metrics.access;
    if req.uri().path() != WEBHOOK_PATH || req.method() != Method::POST {
        metrics.rejected(Source::Kubernetes, "not_found");
        return Ok(respond(
            StatusCode::NOT_FOUND,
            "POST audit events to /audit/kubernetes\n",
        ));
    }
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|t| constant_time_eq(t, hook.token.as_bytes()));
    if !authorized {
        metrics.rejected(Source::Kubernetes, "unauthorized");
        return Ok(respond(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required\n",
        ));
    }
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > hook.max_body_bytes) {
        metrics.rejected(Source::Kubernetes, "too_large");
        return Ok(too_large(hook.max_body_bytes));
    }
    let body = match Limited::new(req.into_body(), hook.max_body_bytes)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            metrics.rejected(Source::Kubernetes, "too_large");
            return Ok(too_large(hook.max_body_bytes));
        }
    };
    let list: EventList = match serde_json::from_slice(&body) {
        Ok(list) => list,
        Err(e) => {
            metrics.rejected(Source::Kubernetes, "malformed");
            return Ok(respond(
                StatusCode::BAD_REQUEST,
                &format!("the body is not an audit.k8s.io/v1 EventList: {e}\n"),
            ));
        }
    };
    hook.intake
        .received(Source::Kubernetes, list.items.len() as u64);
    for event in list.items {
        hook.intake.kubernetes_event(event);
    }
    Ok(respond(StatusCode::OK, ""))
}

fn too_large(max: usize) -> Response<Full<Bytes>> {
    respond(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "at most {max} bytes per request; lower the webhook's --audit-webhook-batch-max-size\n"
        ),
    )
}

/// The TLS settings of the webhook from a PEM certificate chain and key.
pub(crate) fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("--audit-webhook-tls-cert-file {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--audit-webhook-tls-key-file {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| {
        format!("the audit webhook's certificate and key do not make a TLS identity: {e}")
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the webhook on `listener` over TLS, for ever.
pub(crate) async fn serve_webhook(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    hook: Arc<Webhook>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                warn!(%error, "accepting an audit webhook connection failed");
                continue;
            }
        };
        let hook = hook.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream = match tls.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(%error, %peer, "audit webhook TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| route(req, hook.clone()));
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, %peer, "audit webhook connection ended");
            }
        });
    }
}

/// The longest line read from Vault's audit socket; a longer one is skipped whole.
pub(crate) const MAX_VAULT_LINE: usize = 256 * 1024;

/// Reads Vault audit lines from every connection on `listener`, for ever.
pub(crate) async fn serve_vault(listener: TcpListener, intake: Arc<Intake>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                warn!(%error, "accepting a Vault audit connection failed");
                continue;
            }
        };
        let intake = intake.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match read_line(&mut reader, &mut line).await {
                    Ok(None) => break,
                    Ok(Some(false)) => {
                        intake.metrics.access.rejected(Source::Vault, "too_large");
                    }
                    Ok(Some(true)) => vault_line(&intake, &line),
                    Err(error) => {
                        debug!(%error, %peer, "Vault audit connection ended");
                        break;
                    }
                }
            }
        });
    }
}

/// One line of a Vault audit device.
pub(crate) fn vault_line(intake: &Intake, line: &[u8]) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    intake.received(Source::Vault, 1);
    match serde_json::from_slice::<crate::access::vault_audit::Entry>(line) {
        Ok(entry) => intake.vault_entry(entry),
        Err(_) => intake.metrics.access.rejected(Source::Vault, "malformed"),
    }
}

/// Reads one line into `line`: None at the end, Some(false) when it was too long (skipped).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty() || too_long).then_some(!too_long));
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        let found = done <= buf.len() && buf.get(done - 1) == Some(&b'\n');
        if !too_long {
            if line.len() + chunk.len() > MAX_VAULT_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(done);
        if found {
            return Ok(Some(!too_long));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_over_the_bound_is_skipped_whole_and_the_next_one_read() {
        let mut input = b"first\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_VAULT_LINE + 10));
        input.extend(b"\nlast");
        // A small buffer, so that lines span many reads.
        let mut reader = BufReader::with_capacity(1024, input.as_slice());
        let mut line = Vec::new();
        let mut read = Vec::new();
        while let Some(ok) = read_line(&mut reader, &mut line).await.unwrap() {
            read.push((ok, String::from_utf8_lossy(&line).into_owned()));
            line.clear();
        }
        assert_eq!(
            read,
            vec![
                (true, "first".to_string()),
                (false, String::new()),
                (true, "last".to_string())
            ]
        );
    }
}
