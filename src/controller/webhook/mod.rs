//! The validating admission webhook for AIPipelines: `kubectl apply` and Argo CD are told at
//! once when a pipeline is invalid, or asks for what an enforcing guardrail denies
//! ([`review`]).
//!
//! The operator serves AdmissionReview v1 over TLS on `--webhook-addr`, with a CA and serving
//! certificate it creates and rotates in a Secret of its own namespace ([`certs`]), and keeps
//! the `ValidatingWebhookConfiguration` named `portcullis` pointing at itself (by
//! `--webhook-url`, or through the Service `--webhook-service` of its namespace) with the CA
//! bundle. The failure policy is `Ignore`: with the operator down, pipelines are accepted, and
//! the reconcile still plans them (nothing denied is granted) and records the denials.
//!
//! Every refusal is an `admission-denied` decision record and counts in
//! `portcullis_admission_refusals_total{reason}`. Dry-run requests are answered the same way
//! but not recorded (the webhook declares `sideEffects: NoneOnDryRun`).

pub(crate) mod certs;
pub(crate) mod review;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::Context;
use super::metrics::ReasonLabels;
use crate::api::AIPipeline;
use crate::audit::{Action, Entry};
use crate::k8s::{
    Api, FIELD_MANAGER, KubeResult, MANAGED_BY, Patch, PatchParams, Secret, Timestamp,
    ValidatingWebhookConfiguration,
};
use certs::{Bundle, CurrentCert};
use review::Review;

/// The name of the ValidatingWebhookConfiguration the operator keeps.
pub const CONFIGURATION_NAME: &str = "portcullis";
/// The path the webhook answers on.
pub const PATH: &str = "/validate-aipipelines";

/// Settings of the webhook.
#[derive(Debug, Clone)]
pub struct WebhookRunConfig {
    /// Where to serve AdmissionReviews over TLS.
    pub addr: SocketAddr,
    /// Register by this URL (`https://HOST:PORT`): for runs outside the cluster.
    pub url: Option<String>,
    /// Otherwise through this Service of `namespace` (port 443).
    pub service: String,
    /// The operator's namespace: the Service's and the certificate Secret's.
    pub namespace: String,
    /// The Secret holding the CA and serving certificate.
    pub secret: String,
    /// How long certificates are valid; they are rotated with a third of it left.
    pub cert_validity: Duration,
}

impl WebhookRunConfig {
    /// The hosts the serving certificate must name.
    fn hosts(&self) -> Vec<String> {
        match &self.url {
            Some(url) => vec![url_host(url)],
            None => {
                let (svc, ns) = (&self.service, &self.namespace);
                vec![
                    format!("{svc}.{ns}.svc"),
                    format!("{svc}.{ns}.svc.cluster.local"),
                ]
            }
        }
    }

    /// How the API server reaches the webhook.
    fn client_config(&self, ca_bundle: &str) -> Value {
        let ca = crate::k8s::ByteString(ca_bundle.as_bytes().to_vec());
        match &self.url {
            Some(url) => json!({
                "url": format!("{}{PATH}", url.trim_end_matches('/')),
                "caBundle": ca,
            }),
            None => json!({
                "service": {"namespace": self.namespace, "name": self.service, "path": PATH, "port": 443},
                "caBundle": ca,
            }),
        }
    }
}

/// The host of `https://HOST:PORT/...` (an IPv6 address without its brackets).
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default().to_string();
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .to_string()
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {address} for the admission webhook: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--webhook-url {0:?} must be https://HOST:PORT")]
    Url(String),
}

/// Binds the webhook's address and starts serving it, keeping its certificate and
/// registration up to date in the background.
/// `owns` says which namespaces' pipelines are this operator's: the others are allowed (their
/// namespaces are not in its caches).
pub(crate) async fn start(
    ctx: Arc<Context>,
    config: WebhookRunConfig,
    owns: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> Result<(), WebhookError> {
    if let Some(url) = &config.url
        && (!url.starts_with("https://") || url_host(url).is_empty())
    {
        return Err(WebhookError::Url(url.clone()));
    }
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| WebhookError::Listen {
            address: config.addr,
            source,
        })?;
    info!(address = %config.addr, url = ?config.url, "serving the AIPipeline admission webhook");
    let current = Arc::new(CurrentCert::default());
    tokio::spawn(keep_certificate(ctx.clone(), config, current.clone()));
    tokio::spawn(serve(listener, ctx, current, Arc::new(owns)));
    Ok(())
}

fn unix_now() -> i64 {
    Timestamp::now().as_second()
}

/// Loads or creates the certificate, registers the webhook, and rotates both when due.
async fn keep_certificate(ctx: Arc<Context>, config: WebhookRunConfig, current: Arc<CurrentCert>) {
    let hosts = config.hosts();
    let every = (config.cert_validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &config.namespace);
    let mut served: Option<Bundle> = None;
    loop {
        match step(&ctx, &config, &hosts, &secrets, served.as_ref()).await {
            Ok(bundle) => {
                if served.as_ref() != Some(&bundle) {
                    match bundle.certified_key() {
                        Ok(key) => {
                            current.set(key);
                            info!(
                                not_after = bundle.not_after,
                                "the webhook serves a new certificate"
                            );
                            served = Some(bundle);
                        }
                        Err(error) => warn!(%error, "the webhook's certificate cannot be served"),
                    }
                }
            }
            Err(error) => {
                warn!(%error, "cannot keep the webhook's certificate and registration; retrying")
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// One round: the bundle in the Secret (a new one when missing or due), and the registration
/// naming its CA. Returns the bundle to serve.
async fn step(
    ctx: &Context,
    config: &WebhookRunConfig,
    hosts: &[String],
    secrets: &Api<Secret>,
    served: Option<&Bundle>,
) -> KubeResult<Bundle> {
    let now = unix_now();
    let stored = secrets
        .get_opt(&config.secret)
        .await?
        .and_then(|s| Bundle::from_secret(&s));
    let bundle = match stored {
        Some(b) if !b.due(now, config.cert_validity, hosts) => b,
        previous => {
            let previous = previous.as_ref().or(served);
            let bundle = Bundle::generate(hosts, config.cert_validity, now, previous)
                .map_err(|e| kube::Error::Service(Box::new(e)))?;
            // The registration trusts the new CA before the new certificate is served.
            register(ctx, config, &bundle).await?;
            secrets
                .patch(
                    &config.secret,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&bundle.to_secret(&config.namespace, &config.secret)),
                )
                .await?;
            info!(secret = %config.secret, namespace = %config.namespace, "created the webhook's CA and serving certificate");
            return Ok(bundle);
        }
    };
    register(ctx, config, &bundle).await?;
    Ok(bundle)
}

/// Applies the ValidatingWebhookConfiguration with `bundle`'s CAs.
async fn register(ctx: &Context, config: &WebhookRunConfig, bundle: &Bundle) -> KubeResult<()> {
    let object: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME, "labels": {MANAGED_BY.0: MANAGED_BY.1}},
        "webhooks": [{
            "name": "aipipelines.portcullis.dev",
            "clientConfig": config.client_config(&bundle.ca_bundle()),
            "rules": [{
                "apiGroups": ["portcullis.dev"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": ["aipipelines"], "scope": "Namespaced",
            }],
            // With the operator down, pipelines are accepted and audited by the reconcile.
            "failurePolicy": "Ignore",
            "matchPolicy": "Equivalent",
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }],
    }))
    .expect("a ValidatingWebhookConfiguration");
    Api::<ValidatingWebhookConfiguration>::all(ctx.client.clone())
        .patch(
            CONFIGURATION_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    Ok(())
}

/// Accepts TLS connections forever.
async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    current: Arc<CurrentCert>,
    owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) {
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(current);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, ctx, owns) = (acceptor.clone(), ctx.clone(), owns.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::debug!(%error, "webhook TLS handshake failed");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |req| handle(req, ctx.clone(), owns.clone()));
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "webhook connection ended with an error");
            }
        });
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<Context>,
    owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != PATH {
        return Ok(respond(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("not found; AdmissionReviews go to {PATH}")}),
        ));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(respond(
                StatusCode::BAD_REQUEST,
                &json!({"error": "unreadable body"}),
            ));
        }
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return Ok(respond(
            StatusCode::BAD_REQUEST,
            &json!({"error": "the body is not an AdmissionReview"}),
        ));
    };
    let request = &review["request"];
    let uid = request["uid"].clone();
    let namespace = request["namespace"].as_str().unwrap_or_default();
    let mine = owns(namespace);
    let verdict = if mine {
        answer(&ctx, request).await
    } else {
        None
    };
    let response = match verdict {
        None => json!({"uid": uid, "allowed": true}),
        Some(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 403, "reason": "Forbidden", "message": message},
        }),
    };
    Ok(respond(
        StatusCode::OK,
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    ))
}

/// `None` to allow, else the refusal's message.
async fn answer(ctx: &Context, request: &Value) -> Option<String> {
    let namespace = request["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !ctx.synced.load(Ordering::Acquire) {
        // Without full caches the guardrails are not known: accept, as the failure policy
        // would; the reconcile audits it.
        return None;
    }
    let object = &request["object"];
    // An update that leaves the spec as it is (labels, annotations, the operator's own
    // finalizer removed during a deletion) is not reviewed: only new specs are.
    let unchanged =
        request["operation"] == "UPDATE" && object["spec"] == request["oldObject"]["spec"];
    if unchanged || !object["metadata"]["deletionTimestamp"].is_null() {
        return None;
    }
    let pipeline: AIPipeline = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        // The schema the API server checked first makes this rare: a field of the wrong type.
        Err(error) => return Some(format!("the AIPipeline cannot be read: {error}")),
    };
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    let guardrails: Vec<_> = ctx
        .guardrails
        .state()
        .iter()
        .map(|g| (**g).clone())
        .collect();
    let verdict = review::review(
        &pipeline,
        &namespace,
        &ctx.namespace_labels(&namespace),
        &guardrails,
    );
    if verdict == Review::Allowed {
        return None;
    }
    let message = verdict.message(&namespace, &name);
    ctx.metrics
        .admission
        .refusals
        .get_or_create(&ReasonLabels {
            reason: verdict.reason().into(),
        })
        .inc();
    let dry_run = request["dryRun"].as_bool().unwrap_or(false);
    if !dry_run {
        let mut entry = Entry::new(Action::AdmissionDenied, &namespace, &name, &message);
        entry.verdict = Some("Deny".into());
        entry.reason = Some(verdict.reason().into());
        entry.subject = request["userInfo"]["username"].as_str().map(String::from);
        entry.generation = pipeline.metadata.generation;
        if let Err(error) = ctx.record(vec![entry]).await {
            // The refusal stands: refusing grants nothing.
            warn!(%error, %namespace, pipeline = %name, "cannot record an admission refusal");
        }
    }
    info!(%namespace, pipeline = %name, reason = verdict.reason(), "refused an AIPipeline at admission");
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(url_host("https://127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(url_host("https://webhook.example:443/x"), "webhook.example");
        assert_eq!(url_host("https://[::1]:8443"), "::1");
        assert_eq!(url_host("https://host"), "host");
    }
}
