//! Runtime access records on the command line: the flags `portcullis run` takes for them
//! ([`AccessArgs`]), and `portcullis audit ingest`, which turns an exported audit log (a managed
//! cluster's, or a Vault `file` audit device's) into the same records the operator writes.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::load::{Expect, Inputs};
use super::{EXIT_ALLOWED, EXIT_FAILURE, EXIT_INVALID};
use crate::access::kube_audit::{Event, EventList};
use crate::access::{Directory, Output, PodIps, StageInfo, Thresholds, Tracker};
use crate::audit::{AuditLog, Entry, Keys, LogOptions};
use crate::controller::AccessRunConfig;

/// The thresholds of runtime access records and their anomalies.
#[derive(Debug, Clone, clap::Args)]
pub struct ThresholdArgs {
    /// Identical requests (stage, verb, resource, name, verdict) within this window become one
    /// `access` record with their count; it is also the VolumeSpike window.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    pub access_window: Duration,

    /// Refused requests recorded one by one, per stage and minute; beyond, they are counted in
    /// the window's records.
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub access_deny_records_per_minute: u32,

    /// A granted permission a stage first uses this long after Portcullis first saw the stage
    /// is a NewBehaviour anomaly.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = duration)]
    pub access_learning_window: Duration,

    /// A window with this many times the stage's baseline of requests is a VolumeSpike...
    #[arg(long, value_name = "FACTOR", default_value_t = 10.0)]
    pub access_spike_factor: f64,

    /// ... when it has at least this many requests...
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub access_spike_min_requests: u64,

    /// ... and the baseline was learnt over at least this many windows.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub access_baseline_windows: u32,
}

impl ThresholdArgs {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            window: self.access_window.max(Duration::from_secs(1)),
            deny_records_per_minute: self.access_deny_records_per_minute,
            learning_window: self.access_learning_window,
            spike_factor: self.access_spike_factor,
            spike_min_requests: self.access_spike_min_requests,
            baseline_windows: self.access_baseline_windows,
            ..Thresholds::default()
        }
    }
}

/// Runtime access records: without `--audit-webhook-addr` or `--vault-audit-addr`, none are
/// made.
#[derive(Debug, clap::Args)]
pub struct AccessArgs {
    /// Serve `POST /audit/kubernetes` here for the API server's audit webhook backend
    /// (`--audit-webhook-config-file`). Needs `--audit-webhook-token-file`.
    #[arg(long, value_name = "ADDR")]
    pub audit_webhook_addr: Option<SocketAddr>,

    /// The file with the bearer token the API server's webhook kubeconfig sends (`users[].user.token`).
    #[arg(long, value_name = "FILE")]
    pub audit_webhook_token_file: Option<PathBuf>,

    /// The webhook's TLS certificate chain (PEM). The API server sends its webhook
    /// kubeconfig's token only over HTTPS; give it this certificate's CA as the kubeconfig's
    /// `certificate-authority`.
    #[arg(long, value_name = "FILE", requires = "audit_webhook_tls_key_file")]
    pub audit_webhook_tls_cert_file: Option<PathBuf>,

    /// The webhook's TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "audit_webhook_tls_cert_file")]
    pub audit_webhook_tls_key_file: Option<PathBuf>,

    /// Accept Vault's (OpenBao's) `socket` audit device here: TCP, one JSON line per entry.
    /// Anyone who can connect can send entries: let only Vault reach it (a NetworkPolicy).
    #[arg(long, value_name = "ADDR")]
    pub vault_audit_addr: Option<SocketAddr>,

    /// The largest audit webhook request read, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024 * 1024)]
    pub audit_max_body_bytes: usize,

    /// Stages' requests examined per second, over both sources; beyond, they are counted (in
    /// `portcullis_audit_events_dropped_total{reason="rate_limited"}` and one record per stage and
    /// window) but not examined.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub audit_events_per_second: u32,

    /// Do not watch the stages' pods' addresses (TokenUsedOutsidePods is then never checked).
    #[arg(long)]
    pub no_watch_stage_pods: bool,

    #[command(flatten)]
    pub thresholds: ThresholdArgs,
}

impl AccessArgs {
    /// The runtime side's settings, when a source is configured.
    pub fn config(&self) -> Result<Option<AccessRunConfig>, String> {
        if self.audit_webhook_addr.is_none() && self.vault_audit_addr.is_none() {
            return Ok(None);
        }
        let webhook_token = match (&self.audit_webhook_addr, &self.audit_webhook_token_file) {
            (Some(_), None) => {
                return Err("--audit-webhook-addr needs --audit-webhook-token-file: the audit webhook accepts events only from the API server, which sends the token of its webhook kubeconfig".into());
            }
            (_, Some(path)) => {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| format!("--audit-webhook-token-file {}: {e}", path.display()))?
                    .trim()
                    .to_string();
                if token.len() < 16 {
                    return Err(format!(
                        "--audit-webhook-token-file {}: the token is {} characters; use at least 16 random ones (`head -c 32 /dev/urandom | base64`)",
                        path.display(),
                        token.len()
                    ));
                }
                Some(token)
            }
            (None, None) => None,
        };
        Ok(Some(AccessRunConfig {
            webhook_addr: self.audit_webhook_addr,
            webhook_token,
            webhook_tls: self
                .audit_webhook_tls_cert_file
                .clone()
                .zip(self.audit_webhook_tls_key_file.clone()),
            vault_audit_addr: self.vault_audit_addr,
            max_body_bytes: self.audit_max_body_bytes.max(1024),
            events_per_second: self.audit_events_per_second,
            watch_pods: !self.no_watch_stage_pods,
            thresholds: self.thresholds.thresholds(),
        }))
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::api::validate::parse_duration(s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration; write it like 30s, 2m or 1h"))
}

/// `portcullis audit ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Kubernetes audit events, one JSON object per line (a log backend's file, or an export of
    /// a managed cluster's audit log); lines holding a whole EventList are read too. `-` reads
    /// standard input.
    #[arg(long, value_name = "FILE", required_unless_present = "vault")]
    pub kubernetes: Option<PathBuf>,

    /// A Vault (OpenBao) `file` audit device's output. `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub vault: Option<PathBuf>,

    /// The AIPipelines whose stages are recorded (files or directories, as for `plan`).
    #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,

    /// AccessGuardrails, to know what each stage was granted.
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1..)]
    pub guardrails: Vec<PathBuf>,

    /// The namespace of pipelines that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,

    /// The decision log to append the records to (created when missing).
    #[arg(long, value_name = "PATH")]
    pub audit_log: PathBuf,

    /// The decision log's key.
    #[arg(long, value_name = "PATH")]
    pub audit_key: PathBuf,

    #[command(flatten)]
    pub thresholds: ThresholdArgs,
}

/// Runs `audit ingest`; prints a summary to `out`.
pub fn run(args: &IngestArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let directory = match directory(args) {
        Ok(d) => d,
        Err(messages) => {
            for m in messages {
                let _ = writeln!(err, "error: {m}");
            }
            return EXIT_INVALID;
        }
    };
    let mut log = match crate::audit::load_key(&args.audit_key).and_then(|key| {
        AuditLog::open_with(&args.audit_log, &Keys::one(&key), LogOptions::default())
    }) {
        Ok(log) => log,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_INVALID;
        }
    };
    let mut ingest = Ingest {
        tracker: Tracker::new(args.thresholds.thresholds()),
        directory,
        pending: Vec::new(),
        summary: Summary::default(),
        last: None,
    };
    let sources = [
        (args.kubernetes.as_deref(), true),
        (args.vault.as_deref(), false),
    ];
    for (path, kubernetes) in sources {
        let Some(path) = path else { continue };
        let read = with_reader(path, |reader| ingest.read(reader, kubernetes, &mut log));
        if let Err(e) = read {
            let _ = writeln!(err, "error: {}: {e}", path.display());
            return EXIT_FAILURE;
        }
    }
    if let Err(e) = ingest.finish(&mut log) {
        let _ = writeln!(err, "error: {e}");
        return EXIT_FAILURE;
    }
    let _ = ingest.summary.print(out, &args.audit_log);
    EXIT_ALLOWED
}

fn with_reader(
    path: &Path,
    f: impl FnOnce(&mut dyn BufRead) -> Result<(), String>,
) -> Result<(), String> {
    if path == Path::new("-") {
        return f(&mut std::io::stdin().lock());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f(&mut std::io::BufReader::new(file))
}

/// The stages of the pipelines in `args.files`, planned against `args.guardrails`.
fn directory(args: &IngestArgs) -> Result<Directory, Vec<String>> {
    let mut inputs = Inputs::default();
    inputs.read(&args.files, Expect::Anything);
    inputs.read(&args.guardrails, Expect::Guardrails);
    if !inputs.errors.is_empty() {
        return Err(inputs.errors.iter().map(ToString::to_string).collect());
    }
    let guardrails: Vec<_> = inputs.guardrails.iter().map(|(_, g)| g.clone()).collect();
    let directory = Directory::default();
    for (_, pipeline) in &inputs.pipelines {
        let namespace = pipeline
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone());
        let labels: BTreeMap<String, String> = inputs
            .namespaces
            .get(&namespace)
            .cloned()
            .unwrap_or_default();
        let plan = crate::plan::build(pipeline, &namespace, &labels, &guardrails);
        let uid = pipeline
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("{namespace}/{}", plan.pipeline));
        directory.set_pipeline(
            &uid,
            StageInfo::from_plan(&plan, &uid, pipeline.status.as_ref()),
        );
    }
    if directory.is_empty() {
        return Err(vec![
            "no AIPipeline stages in the files given with -f: give the pipelines whose stages' requests to record".into(),
        ]);
    }
    Ok(directory)
}

#[derive(Debug, Default)]
struct Summary {
    lines: u64,
    malformed: Vec<usize>,
    stage_requests: u64,
    records: u64,
    anomalies: BTreeMap<&'static str, u64>,
    usage: BTreeMap<(String, String, String), Vec<crate::api::GrantUsage>>,
}

impl Summary {
    fn print(&self, out: &mut dyn Write, log: &Path) -> std::io::Result<()> {
        writeln!(
            out,
            "read {} lines: {} requests of managed stages; appended {} records to {}",
            self.lines,
            self.stage_requests,
            self.records,
            log.display()
        )?;
        if !self.malformed.is_empty() {
            let shown: Vec<String> = self
                .malformed
                .iter()
                .take(5)
                .map(ToString::to_string)
                .collect();
            writeln!(
                out,
                "skipped {} lines that are not audit events (lines {}{})",
                self.malformed.len(),
                shown.join(", "),
                if self.malformed.len() > 5 {
                    ", ..."
                } else {
                    ""
                }
            )?;
        }
        for (kind, n) in &self.anomalies {
            writeln!(out, "anomaly {kind}: {n}")?;
        }
        writeln!(
            out,
            "TokenUsedOutsidePods is not checked here: an exported log has no pod addresses"
        )?;
        for ((ns, pipeline, stage), usage) in &self.usage {
            let used = usage.iter().filter(|u| u.used).count();
            writeln!(
                out,
                "{ns}/{pipeline} stage {stage}: {used} of {} grants used",
                usage.len()
            )?;
        }
        Ok(())
    }
}

struct Ingest {
    tracker: Tracker,
    directory: Directory,
    pending: Vec<Entry>,
    summary: Summary,
    last: Option<DateTime<Utc>>,
}

impl Ingest {
    fn read(
        &mut self,
        reader: &mut dyn BufRead,
        kubernetes: bool,
        log: &mut AuditLog,
    ) -> Result<(), String> {
        let mut line = String::new();
        let mut number = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Ok(());
            }
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            self.summary.lines += 1;
            let ok = if kubernetes {
                self.kubernetes_line(&line)
            } else {
                self.vault_line(&line)
            };
            if !ok {
                self.summary.malformed.push(number);
            }
            if self.pending.len() >= 1000 {
                self.write(log)?;
            }
        }
    }

    fn kubernetes_line(&mut self, line: &str) -> bool {
        let events = match serde_json::from_str::<Event>(line) {
            Ok(event) if !event.stage.is_empty() => vec![event],
            _ => match serde_json::from_str::<EventList>(line) {
                Ok(list) if !list.items.is_empty() => list.items,
                _ => return false,
            },
        };
        for event in events {
            if !event.is_service_account() || !event.is_final() {
                continue;
            }
            let Some(stage) = self.directory.lookup(&event.user.username) else {
                continue;
            };
            let obs = event.into_observation(self.last.unwrap_or_else(Utc::now));
            self.observe(stage, obs);
        }
        true
    }

    fn vault_line(&mut self, line: &str) -> bool {
        let Ok(entry) = serde_json::from_str::<crate::access::vault_audit::Entry>(line) else {
            return false;
        };
        let Some(stage) = entry
            .service_account()
            .and_then(|(ns, name)| self.directory.by_service_account(ns, name))
        else {
            return true;
        };
        if let Some(obs) =
            entry.into_observation(stage.user.clone(), self.last.unwrap_or_else(Utc::now))
        {
            self.observe(stage, obs);
        }
        true
    }

    fn observe(&mut self, stage: std::sync::Arc<StageInfo>, obs: crate::access::Observation) {
        let mut out = Vec::new();
        // The windows follow the events' own times.
        while let Some(end) = self.tracker.window_end().filter(|end| obs.time >= *end) {
            self.tracker.flush(end, &mut out);
        }
        self.last = Some(self.last.map_or(obs.time, |l| l.max(obs.time)));
        self.summary.stage_requests += 1;
        self.tracker.observe(stage, obs, PodIps::Unknown, &mut out);
        self.take(out);
    }

    fn take(&mut self, out: Vec<Output>) {
        for output in out {
            match output {
                Output::Record(entry) => self.pending.push(entry),
                Output::Anomaly(anomaly, entry) => {
                    *self
                        .summary
                        .anomalies
                        .entry(anomaly.kind.as_str())
                        .or_default() += 1;
                    self.pending.push(entry);
                }
                Output::Usage(update) => {
                    let s = &update.stage;
                    self.summary.usage.insert(
                        (s.namespace.clone(), s.pipeline.clone(), s.stage.clone()),
                        update.usage,
                    );
                }
            }
        }
    }

    fn write(&mut self, log: &mut AuditLog) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        log.append(&self.pending, Utc::now())
            .map_err(|e| e.to_string())?;
        self.summary.records += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn finish(&mut self, log: &mut AuditLog) -> Result<(), String> {
        let mut out = Vec::new();
        if let Some(last) = self.last {
            self.tracker.flush(last, &mut out);
        }
        self.take(out);
        self.write(log)
    }
}
