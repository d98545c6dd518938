//! The runtime side in the operator: audit events in ([`server`], bounded by [`intake`]),
//! records, anomalies and usage out, through the pure [`crate::access::Tracker`].
//!
//! # How runtime records reach the decision log
//!
//! Runtime records go through the controller's journal with **keep-alive** semantics
//! (`Journal::record_keepalive`): they describe what already happened, so there is nothing to
//! gate; when the log cannot be written they are held (within the journal's bound) and appended,
//! marked late, once it can. They are sent by one processor task, never by a reconcile, and in
//! batches (one per window of count records, and refusals grouped as they arrive), so a
//! reconcile waits at most for the one fsync it shares with a batch; a flood of audit events
//! never queues in front of a reconcile's records, because the intake bounds it first (token
//! bucket, bounded queue) and the tracker bounds what it emits per window.

pub(crate) mod intake;
pub(crate) mod metrics;
pub(crate) mod pods;
pub(crate) mod server;
pub(crate) mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub(crate) use metrics::AccessMetrics;

use super::journal::Journal;
use super::metrics::Metrics;
use crate::access::{Anomaly, Directory, Output, PodIps, StageInfo, Thresholds, Tracker};
use crate::audit::{Action, Entry};
use crate::k8s::{Client, Event, EventType, ObjectReference, Recorder, Reporter};
use intake::{Intake, Work};
use pods::PodAddresses;
use usage::UsageWriter;

/// Settings of the runtime side of `portcullis run`.
#[derive(Debug, Clone)]
pub struct AccessRunConfig {
    /// Where to serve `POST /audit/kubernetes`.
    pub webhook_addr: Option<SocketAddr>,
    /// The bearer token the API server sends.
    pub webhook_token: Option<String>,
    /// The webhook's TLS certificate chain and key (PEM).
    pub webhook_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Where to accept Vault's socket audit device.
    pub vault_audit_addr: Option<SocketAddr>,
    /// The largest webhook body read.
    pub max_body_bytes: usize,
    /// Stages' requests examined per second, over both sources.
    pub events_per_second: u32,
    /// Check where a stage's token is used from against its pods' addresses.
    pub watch_pods: bool,
    pub thresholds: Thresholds,
}

/// Why the runtime side could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot listen on {address} for {what}: {source}")]
    Listen {
        address: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--audit-webhook-addr needs --audit-webhook-token-file: the audit webhook accepts events only from the API server, which sends the token of its webhook kubeconfig"
    )]
    NoToken,
    #[error(
        "--audit-webhook-addr needs --audit-webhook-tls-cert-file and --audit-webhook-tls-key-file: the API server sends its webhook kubeconfig's token only over HTTPS"
    )]
    NoTls,
    #[error("{0}")]
    Tls(String),
}

/// Starts the runtime side when `config` asks for it, feeding `ctx`'s journal and filling its
/// directory.
pub(crate) async fn start_for(
    client: &Client,
    config: &super::RunConfig,
    ctx: &super::Context,
) -> Result<(), AccessError> {
    let (Some(access), Some(directory)) = (&config.access, &ctx.access) else {
        return Ok(());
    };
    start(
        client,
        access,
        directory.clone(),
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.reporter.clone(),
        config.watch_namespace.as_deref(),
    )
    .await
}

/// Starts the runtime side: its listeners, the pods' addresses, and the processor. The
/// returned directory is kept up to date by the reconciler.
pub(crate) async fn start(
    client: &Client,
    config: &AccessRunConfig,
    directory: Arc<Directory>,
    journal: Journal,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    watch_namespace: Option<&str>,
) -> Result<(), AccessError> {
    let (queue, work) = mpsc::channel::<Work>(intake::QUEUE);
    let intake = Arc::new(Intake::new(
        directory,
        metrics.clone(),
        config.events_per_second,
        queue,
    ));
    if let Some(address) = config.webhook_addr {
        let token = config.webhook_token.clone().ok_or(AccessError::NoToken)?;
        let (cert, key) = config.webhook_tls.as_ref().ok_or(AccessError::NoTls)?;
        let tls = server::tls_acceptor(cert, key).map_err(AccessError::Tls)?;
        let listener = bind(address, "the audit webhook").await?;
        info!(%address, path = server::WEBHOOK_PATH, "serving the Kubernetes audit webhook");
        tokio::spawn(server::serve_webhook(
            listener,
            tls,
            Arc::new(server::Webhook {
                intake: intake.clone(),
                token,
                max_body_bytes: config.max_body_bytes,
            }),
        ));
    }
    if let Some(address) = config.vault_audit_addr {
        let listener = bind(address, "Vault's audit socket").await?;
        info!(%address, "accepting Vault's socket audit device");
        tokio::spawn(server::serve_vault(listener, intake.clone()));
    }
    let pods = config
        .watch_pods
        .then(|| PodAddresses::start(client, watch_namespace));
    let sink = Sink {
        usage: UsageWriter::start(client.clone()),
        journal,
        metrics,
        recorder: Recorder::new(client.clone(), reporter),
    };
    tokio::spawn(process(
        work,
        Tracker::new(config.thresholds.clone()),
        intake,
        pods,
        sink,
    ));
    Ok(())
}

async fn bind(address: SocketAddr, what: &'static str) -> Result<TcpListener, AccessError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AccessError::Listen {
            address,
            what,
            source,
        })
}

/// Most requests taken per batch before the outputs are written.
const BATCH: usize = 4096;

async fn process(
    mut work: mpsc::Receiver<Work>,
    mut tracker: Tracker,
    intake: Arc<Intake>,
    pods: Option<Arc<PodAddresses>>,
    sink: Sink,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut out = Vec::new();
        tokio::select! {
            got = work.recv() => {
                let Some(first) = got else { return };
                observe(&mut tracker, pods.as_deref(), first, &mut out);
                for _ in 1..BATCH {
                    match work.try_recv() {
                        Ok(next) => observe(&mut tracker, pods.as_deref(), next, &mut out),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => {
                let now = chrono::Utc::now();
                let changes = intake.directory.take_changes();
                for stage in &changes.removed {
                    tracker.forget(&stage.user);
                }
                sink.rewrite(&tracker, &intake.directory, changes.rewrite.iter());
                if tracker.due(now) {
                    tracker.flush(now, &mut out);
                    out.extend(intake.take_not_examined().into_iter().map(|(stage, n)| {
                        Output::Record(not_examined(&stage, n, tracker.thresholds().window))
                    }));
                }
            }
        }
        sink.emit(out, &tracker, &intake.directory).await;
    }
}

fn observe(
    tracker: &mut Tracker,
    pods: Option<&PodAddresses>,
    (stage, obs): Work,
    out: &mut Vec<Output>,
) {
    let ips = pods
        .map(|p| p.of(&stage.namespace, &stage.service_account))
        .unwrap_or_default();
    let known = if ips.is_empty() {
        PodIps::Unknown
    } else {
        PodIps::Known(&ips)
    };
    tracker.observe(stage, obs, known, out);
}

/// The record of requests that were not examined (over the rate or the queue).
pub(crate) fn not_examined(stage: &StageInfo, count: u64, window: Duration) -> Entry {
    let mut entry = Entry::new(
        Action::Access,
        &stage.namespace,
        &stage.pipeline,
        format!(
            "{count} requests of stage {} in the last {}s were not examined: over --audit-events-per-second, or the queue was full",
            stage.stage,
            window.as_secs()
        ),
    );
    entry.stage = Some(stage.stage.clone());
    entry.subject = Some(stage.user.clone());
    entry.pipeline_uid = Some(stage.pipeline_uid.clone());
    entry.object = Some(format!("{count} requests"));
    entry.reason = Some("NotExamined".into());
    entry.item = Some(json!({"kind": "requests-not-examined", "count": count}));
    entry
}

/// Where the tracker's outputs go.
struct Sink {
    usage: UsageWriter,
    journal: Journal,
    metrics: Arc<Metrics>,
    recorder: Recorder,
}

impl Sink {
    async fn emit(&self, out: Vec<Output>, tracker: &Tracker, directory: &Directory) {
        if out.is_empty() {
            return;
        }
        let mut entries = Vec::new();
        let mut changed = std::collections::BTreeSet::new();
        for output in out {
            match output {
                Output::Record(entry) => entries.push(entry),
                Output::Anomaly(anomaly, entry) => {
                    entries.push(entry);
                    self.anomaly(anomaly);
                }
                Output::Usage(update) => {
                    changed.insert(update.stage.pipeline_uid.clone());
                }
            }
        }
        self.rewrite(tracker, directory, changed.iter());
        if !entries.is_empty()
            && let Err(error) = self.journal.record_keepalive(entries).await
        {
            warn!(%error, "runtime access records could not be written");
        }
    }

    /// Queues the usage of every stage of each pipeline in `uids` for writing: one pipeline's
    /// stages are written together, so a stage the pipeline no longer has drops out.
    fn rewrite<'a>(
        &self,
        tracker: &Tracker,
        directory: &Directory,
        uids: impl Iterator<Item = &'a String>,
    ) {
        for uid in uids {
            let stages = directory.stages_of(uid);
            let Some(first) = stages.first() else {
                continue;
            };
            let usage = stages
                .iter()
                .filter_map(|s| {
                    let (usage, since) = tracker.usage(s)?;
                    Some(usage::StageUsage {
                        stage: s.stage.clone(),
                        usage,
                        since,
                    })
                })
                .collect();
            self.usage.queue(usage::PipelineUsage {
                namespace: first.namespace.clone(),
                pipeline: first.pipeline.clone(),
                uid: uid.clone(),
                stages: usage,
            });
        }
    }

    fn anomaly(&self, anomaly: Anomaly) {
        let stage = &anomaly.stage;
        self.metrics
            .access
            .anomalies
            .get_or_create(&metrics::AnomalyLabels {
                anomaly: anomaly.kind.as_str().into(),
                namespace: stage.namespace.clone(),
                pipeline: stage.pipeline.clone(),
                stage: stage.stage.clone(),
            })
            .inc();
        warn!(anomaly = anomaly.kind.as_str(), namespace = %stage.namespace, pipeline = %stage.pipeline, stage = %stage.stage, message = %anomaly.message, "runtime access anomaly");
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            let reference = pipeline_reference(&anomaly.stage);
            let mut note = anomaly.message;
            if note.len() > 1000 {
                note.truncate(note.floor_char_boundary(990));
                note.push_str(" ...");
            }
            let event = Event {
                type_: EventType::Warning,
                reason: anomaly.kind.as_str().into(),
                note: Some(note),
                action: "Access".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%error, "publishing an anomaly event failed");
            }
        });
    }
}

fn pipeline_reference(stage: &StageInfo) -> ObjectReference {
    ObjectReference {
        api_version: Some("portcullis.dev/v1alpha1".into()),
        kind: Some("AIPipeline".into()),
        name: Some(stage.pipeline.clone()),
        namespace: Some(stage.namespace.clone()),
        uid: Some(stage.pipeline_uid.clone()),
        ..ObjectReference::default()
    }
}
