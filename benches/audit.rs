//! The operator's cost per 10,000 audit events per second: what one core spends reading the API
//! server's audit webhook batches (400 events each, as `--audit-webhook-batch-max-size` sends
//! by default), dropping the events of users that are not stages, and turning the stages'
//! requests into records, anomalies and usage with the tracker; and the memory that takes.
//!
//! The mix: 80 % of the events are of other users (controllers, people), 20 % of 200 stages'
//! ServiceAccounts, 5 % of those refused, over 40 distinct objects per stage. Measured: the
//! JSON parse of the batches, the stage lookup, the tracker (one window flushed per 60 s of
//! event time). Not measured: TLS and HTTP (hyper, rustls: a few µs per batch, not per event),
//! and the decision log's fsyncs (one per batch of records: count records once a window, and
//! refusals up to 60 a minute per stage).
//!
//! Run: `make bench-audit` (`cargo bench --bench audit`). Prints figures; never fails.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use portcullis::access::kube_audit::EventList;
use portcullis::access::{Directory, Grant, PodIps, Source, StageInfo, Thresholds, Tracker};
use serde_json::json;

const STAGES: usize = 200;
const BATCH: usize = 400;
const EVENTS: usize = 1_000_000;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 a second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn directory() -> Directory {
    let directory = Directory::default();
    for i in 0..STAGES {
        let ns = format!("team-{}", i % 20);
        let user = format!("system:serviceaccount:{ns}:pipe-{i}-ingest");
        let grants = (0..8)
            .map(|g| Grant {
                source: Source::Kubernetes,
                api_group: String::new(),
                resource: "configmaps".into(),
                verb: "get".into(),
                resource_names: vec![format!("cfg-{g}")],
                text: format!("get configmaps/cfg-{g}"),
            })
            .collect();
        directory.set_pipeline(
            &format!("uid-{i}"),
            vec![StageInfo {
                namespace: ns,
                pipeline: format!("pipe-{i}"),
                pipeline_uid: format!("uid-{i}"),
                stage: "ingest".into(),
                user,
                service_account: format!("pipe-{i}-ingest"),
                grants,
                seed: Vec::new(),
                seed_since: None,
            }],
        );
    }
    directory
}

/// Batches of audit events, as the webhook sends them; `per_second` sets the event times.
fn batches(per_second: usize) -> Vec<Vec<u8>> {
    let start = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
    (0..EVENTS / BATCH)
        .map(|b| {
            let items: Vec<_> = (0..BATCH)
                .map(|j| {
                    let n = b * BATCH + j;
                    let at = start + chrono::Duration::microseconds(i64::try_from(n * 1_000_000 / per_second).unwrap());
                    let stage = n.is_multiple_of(5);
                    let i = (n / 5) % STAGES;
                    let (user, ns) = if stage {
                        (format!("system:serviceaccount:team-{}:pipe-{i}-ingest", i % 20), format!("team-{}", i % 20))
                    } else if n.is_multiple_of(2) {
                        ("system:serviceaccount:kube-system:replicaset-controller".to_string(), "kube-system".to_string())
                    } else {
                        ("alice@example.com".to_string(), "team-1".to_string())
                    };
                    let denied = stage && n.is_multiple_of(100);
                    json!({
                        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
                        "auditID": format!("{n:032x}"), "stage": "ResponseComplete",
                        "requestURI": format!("/api/v1/namespaces/{ns}/configmaps/cfg-{}", n % 40),
                        "verb": if denied { "list" } else { "get" },
                        "user": {"username": user, "groups": ["system:serviceaccounts", "system:authenticated"]},
                        "sourceIPs": ["10.0.3.7"], "userAgent": "python-requests/2.32",
                        "objectRef": {"resource": if denied { "secrets" } else { "configmaps" }, "namespace": ns, "name": format!("cfg-{}", n % 40), "apiVersion": "v1"},
                        "responseStatus": {"metadata": {}, "code": if denied { 403 } else { 200 }},
                        "requestReceivedTimestamp": at, "stageTimestamp": at,
                        "annotations": {"authorization.k8s.io/decision": if denied { "forbid" } else { "allow" }, "authorization.k8s.io/reason": ""},
                    })
                })
                .collect();
            serde_json::to_vec(&json!({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": items})).unwrap()
        })
        .collect()
}

fn main() {
    let directory = directory();
    let per_second = 10_000;
    let input = batches(per_second);
    let bytes: usize = input.iter().map(Vec::len).sum();
    let rss_before = rss_kib("VmRSS:");
    let mut tracker = Tracker::new(Thresholds::default());
    let (mut stage_events, mut records, mut anomalies) = (0u64, 0u64, 0u64);
    let cpu_start = cpu_seconds();
    let wall = Instant::now();
    let mut out = Vec::new();
    for body in &input {
        let list: EventList = serde_json::from_slice(body).unwrap();
        for event in list.items {
            if !event.is_service_account() || !event.is_final() {
                continue;
            }
            let Some(stage) = directory.lookup(&event.user.username) else {
                continue;
            };
            stage_events += 1;
            let obs = event.into_observation(Utc::now());
            while let Some(end) = tracker.window_end().filter(|end| obs.time >= *end) {
                tracker.flush(end, &mut out);
            }
            tracker.observe(Arc::clone(&stage), obs, PodIps::Unknown, &mut out);
        }
        for o in out.drain(..) {
            match o {
                portcullis::access::Output::Record(_) => records += 1,
                portcullis::access::Output::Anomaly(..) => anomalies += 1,
                portcullis::access::Output::Usage(_) => {}
            }
        }
    }
    let elapsed = wall.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    let rss_after = rss_kib("VmRSS:");
    #[allow(clippy::cast_precision_loss, reason = "figures")]
    let (events, throughput) = (EVENTS as f64, EVENTS as f64 / elapsed);
    let event_seconds = events / f64::from(u32::try_from(per_second).unwrap());
    println!(
        "audit events: {EVENTS} in batches of {BATCH} ({:.0} MiB of JSON), {stage_events} of them stages' ({STAGES} stages); {event_seconds:.0} s of events at {per_second}/s",
        bytes as f64 / 1_048_576.0
    );
    println!(
        "processed in {elapsed:.2} s wall, {cpu:.2} s CPU: {throughput:.0} events/s on one core"
    );
    println!(
        "cost per 10,000 events/s: {:.1} % of one core; memory {} MiB more RSS (tracker state, {} records and {anomalies} anomalies emitted)",
        cpu / event_seconds * 100.0,
        rss_after.saturating_sub(rss_before) / 1024,
        records
    );
    println!(
        "peak RSS of the benchmark (input included): {} MiB",
        rss_kib("VmHWM:") / 1024
    );
}
