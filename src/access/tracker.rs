//! From observations to records, anomalies and usage: the runtime side's state machine.
//!
//! - **Volume.** Identical (stage, verb, resource, name, verdict) requests in one window (60 s by
//!   default) become one `access` record with their count and first and last time. Every
//!   refused request is recorded on its own, up to a per-stage rate (60 a minute by default,
//!   refilled continuously); beyond it, refused requests are folded into the window's count
//!   records like allowed ones, marked `overRate`.
//! - **Anomalies** ([`AnomalyKind`]), at most one per stage, kind and subject per window.
//! - **Usage**: per grant, how often and when last a request it covers was made.
//! - **After a restart** a stage's state is rebuilt from its persisted usage
//!   ([`StageInfo::seed`], [`StageInfo::seed_since`]): its learning window keeps its start,
//!   the grants it used are not new, counts continue, and its volume baseline is the average of
//!   its counted requests per window since then, so neither detector starts over.
//!
//! The tracker is given the time with each observation and at each [`Tracker::flush`]; it reads
//! no clock, so `portcullis audit ingest` replays an exported log with the events' own times.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{Observation, Source, StageInfo, Verdict, bounded};
use crate::api::GrantUsage;
use crate::audit::{Action, Entry, format_time};

/// The thresholds of the volume bounds and anomaly detectors.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Identical requests within a window become one record.
    pub window: Duration,
    /// Refused requests recorded individually per stage and minute; beyond, they are counted.
    pub deny_records_per_minute: u32,
    /// A permission first used this long after the stage was first seen is `NewBehaviour`.
    pub learning_window: Duration,
    /// A window with this many times the stage's baseline requests is a `VolumeSpike`...
    pub spike_factor: f64,
    /// ... when it also has at least this many requests...
    pub spike_min_requests: u64,
    /// ... and the baseline has been learnt over at least this many windows.
    pub baseline_windows: u32,
    /// At most this many distinct request tuples are kept per window; further ones are counted
    /// per stage in one record.
    pub max_tuples: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            window: Duration::from_secs(60),
            deny_records_per_minute: 60,
            learning_window: Duration::from_secs(24 * 3600),
            spike_factor: 10.0,
            spike_min_requests: 100,
            baseline_windows: 5,
            max_tuples: 50_000,
        }
    }
}

/// Grants listed in `status.stages[].usage` at most.
pub const MAX_USAGE_ENTRIES: usize = 64;

/// Permissions remembered per stage for `NewBehaviour`; beyond, new ones are not reported.
const MAX_SEEN: usize = 4096;

/// Source addresses kept per count record.
const MAX_SOURCE_IPS: usize = 8;

/// What is anomalous about a stage's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnomalyKind {
    /// A request the stage was not granted was refused.
    AccessDenied,
    /// The stage's token was used from an address none of its pods has.
    TokenUsedOutsidePods,
    /// A granted permission was first used after the learning window.
    NewBehaviour,
    /// Far more requests in a window than the stage's baseline.
    VolumeSpike,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 4] = [
        AnomalyKind::AccessDenied,
        AnomalyKind::TokenUsedOutsidePods,
        AnomalyKind::NewBehaviour,
        AnomalyKind::VolumeSpike,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::AccessDenied => "AccessDenied",
            AnomalyKind::TokenUsedOutsidePods => "TokenUsedOutsidePods",
            AnomalyKind::NewBehaviour => "NewBehaviour",
            AnomalyKind::VolumeSpike => "VolumeSpike",
        }
    }
}

/// One anomaly: its kind, the stage, and what to say (the Event's note).
#[derive(Debug, Clone)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub stage: Arc<StageInfo>,
    pub message: String,
}

/// A stage's usage, to write to its status.
#[derive(Debug, Clone)]
pub struct UsageUpdate {
    pub stage: Arc<StageInfo>,
    pub usage: Vec<GrantUsage>,
    /// When the stage was first seen (`usageSince`).
    pub since: DateTime<Utc>,
}

/// What the tracker produces.
#[derive(Debug, Clone)]
pub enum Output {
    /// An `access` record.
    Record(Entry),
    /// An anomaly and its `anomaly` record.
    Anomaly(Anomaly, Entry),
    /// A stage's usage changed.
    Usage(UsageUpdate),
}

/// Whether the stage's pods' addresses are known, to check where a token is used from.
#[derive(Debug, Clone, Copy)]
pub enum PodIps<'a> {
    /// No pod of the stage has an address yet (or the pods are not watched): not checked.
    Unknown,
    Known(&'a [String]),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Tuple {
    user: String,
    verdict: Verdict,
    source: Source,
    verb: String,
    api_group: String,
    resource: String,
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug)]
struct Aggregate {
    stage: Arc<StageInfo>,
    sample: Observation,
    count: u64,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    source_ips: BTreeSet<String>,
    over_rate: bool,
    grant: Option<String>,
    source_check: &'static str,
}

#[derive(Debug)]
struct StageState {
    info: Arc<StageInfo>,
    /// When the tracker first saw the stage: the learning window starts here.
    since: DateTime<Utc>,
    deny_tokens: f64,
    deny_refilled: DateTime<Utc>,
    /// The grants used so far (their text): the first use of another after the learning window
    /// is `NewBehaviour`.
    seen: HashSet<String>,
    window_count: u64,
    baseline: Option<f64>,
    windows: u32,
    /// Grant text -> (count, last used).
    usage: HashMap<String, (u64, Option<DateTime<Utc>>)>,
    usage_dirty: bool,
    alerted: HashSet<(AnomalyKind, String)>,
    overflow: u64,
}

/// The state machine; see the module documentation.
#[derive(Debug)]
pub struct Tracker {
    thresholds: Thresholds,
    window_start: Option<DateTime<Utc>>,
    aggregates: HashMap<Tuple, Aggregate>,
    stages: HashMap<String, StageState>,
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Tracker {
    pub fn new(thresholds: Thresholds) -> Tracker {
        Tracker {
            thresholds,
            window_start: None,
            aggregates: HashMap::new(),
            stages: HashMap::new(),
        }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// When the current window ends (none before the first observation).
    pub fn window_end(&self) -> Option<DateTime<Utc>> {
        self.window_start
            .map(|s| s + chrono(self.thresholds.window))
    }

    /// Takes one request of `stage`.
    pub fn observe(
        &mut self,
        stage: Arc<StageInfo>,
        obs: Observation,
        pods: PodIps<'_>,
        out: &mut Vec<Output>,
    ) {
        let now = obs.time;
        self.window_start.get_or_insert(now);
        let per_minute = f64::from(self.thresholds.deny_records_per_minute);
        let thresholds = &self.thresholds;
        let state = self
            .stages
            .entry(obs.user.clone())
            .or_insert_with(|| StageState::new(stage.clone(), now, thresholds));
        if !Arc::ptr_eq(&state.info, &stage) {
            state.info = stage.clone();
        }
        state.window_count += 1;
        let grant = stage.covering(&obs).map(|(_, g)| g.text.clone());
        let source_check = match (pods, &obs.source_ip) {
            (PodIps::Known(ips), Some(ip)) if !ips.is_empty() => {
                if ips.iter().any(|p| p == ip) {
                    "inside-pods"
                } else {
                    let key = (AnomalyKind::TokenUsedOutsidePods, ip.clone());
                    if state.alerted.insert(key) {
                        let message = format!(
                            "the token of stage {} (ServiceAccount {}/{}) was used from {ip}, which is not an address of any of the stage's pods ({}): {obs}. Was the token copied out of a pod?",
                            stage.stage,
                            stage.namespace,
                            stage.service_account,
                            ips.join(", ")
                        );
                        out.push(anomaly(
                            &stage,
                            AnomalyKind::TokenUsedOutsidePods,
                            &obs,
                            message,
                            json!({"podIPs": ips}),
                        ));
                    }
                    "outside-pods"
                }
            }
            _ => "pod-ips-unknown",
        };
        let mut over_rate = false;
        match obs.verdict {
            Verdict::Allow => {
                if let Some(text) = &grant {
                    let used = state.usage.entry(text.clone()).or_default();
                    used.0 += 1;
                    used.1 = Some(used.1.map_or(now, |l| l.max(now)));
                    state.usage_dirty = true;
                }
                // Only a granted permission is new behaviour: requests allowed by something
                // else (discovery, a binding outside Portcullis) have no grant to learn.
                if let Some(text) = &grant
                    && state.seen.len() < MAX_SEEN
                    && state.seen.insert(text.clone())
                    && now >= state.since + chrono(self.thresholds.learning_window)
                {
                    let message = format!(
                        "stage {} used {} for the first time, {} after Portcullis first saw the stage (learning window {}s); it is granted by `{text}`, but was not used before",
                        stage.stage,
                        obs,
                        humanize(now - state.since),
                        self.thresholds.learning_window.as_secs(),
                    );
                    out.push(anomaly(
                        &stage,
                        AnomalyKind::NewBehaviour,
                        &obs,
                        message,
                        json!({"grant": grant}),
                    ));
                }
            }
            Verdict::Deny => {
                state.refill(now, per_minute);
                if state.deny_tokens >= 1.0 {
                    state.deny_tokens -= 1.0;
                    out.push(Output::Record(refused_entry(
                        &stage,
                        &obs,
                        grant.as_deref(),
                        source_check,
                    )));
                } else {
                    over_rate = true;
                }
                if state
                    .alerted
                    .insert((AnomalyKind::AccessDenied, obs.to_string()))
                {
                    out.push(access_denied(&stage, &obs));
                }
            }
        }
        if obs.verdict == Verdict::Allow || over_rate {
            self.aggregate(stage, obs, grant, over_rate, source_check);
        }
    }

    fn aggregate(
        &mut self,
        stage: Arc<StageInfo>,
        obs: Observation,
        grant: Option<String>,
        over_rate: bool,
        source_check: &'static str,
    ) {
        let tuple = Tuple {
            user: obs.user.clone(),
            verdict: obs.verdict,
            source: obs.source,
            verb: obs.verb.clone(),
            api_group: obs.api_group.clone(),
            resource: obs.full_resource(),
            name: obs.name.clone(),
            namespace: obs.namespace.clone(),
        };
        if let Some(agg) = self.aggregates.get_mut(&tuple) {
            agg.count += 1;
            agg.first = agg.first.min(obs.time);
            agg.last = agg.last.max(obs.time);
            if let Some(ip) = &obs.source_ip
                && agg.source_ips.len() < MAX_SOURCE_IPS
            {
                agg.source_ips.insert(bounded(ip));
            }
            agg.over_rate |= over_rate;
            agg.source_check = source_check;
            return;
        }
        if self.aggregates.len() >= self.thresholds.max_tuples {
            if let Some(state) = self.stages.get_mut(&obs.user) {
                state.overflow += 1;
            }
            return;
        }
        let source_ips = obs.source_ip.iter().map(|ip| bounded(ip)).collect();
        self.aggregates.insert(
            tuple,
            Aggregate {
                stage,
                first: obs.time,
                last: obs.time,
                sample: obs,
                count: 1,
                source_ips,
                over_rate,
                grant,
                source_check,
            },
        );
    }

    /// Forgets the stage of `user` (removed from its pipeline, or the pipeline deleted): its
    /// learning, baseline and usage. Requests already counted in this window are still
    /// recorded at its end.
    pub fn forget(&mut self, user: &str) {
        self.stages.remove(user);
    }

    /// Whether the tracker has state for `user`.
    pub fn knows(&self, user: &str) -> bool {
        self.stages.contains_key(user)
    }

    /// The usage of `stage` to show in its status, and since when it is counted: the tracker's
    /// when it has seen the stage, else what the status last showed (`None` when it showed
    /// nothing).
    pub fn usage(&self, stage: &StageInfo) -> Option<(Vec<GrantUsage>, Option<DateTime<Utc>>)> {
        match self.stages.get(&stage.user) {
            Some(state) => Some((usage_of(stage, &state.usage), Some(state.since))),
            None if stage.seed.is_empty() && stage.seed_since.is_none() => None,
            None => Some((usage_of(stage, &seeded_usage(stage)), stage.seed_since)),
        }
    }

    /// Whether the window has ended at `now`.
    pub fn due(&self, now: DateTime<Utc>) -> bool {
        self.window_end().is_some_and(|end| now >= end)
    }

    /// Ends the window at `now`: its count records, `VolumeSpike`s and usage changes.
    pub fn flush(&mut self, now: DateTime<Utc>, out: &mut Vec<Output>) {
        let mut aggregates: Vec<Aggregate> = self.aggregates.drain().map(|(_, a)| a).collect();
        aggregates.sort_by_key(|a| (a.first, a.sample.to_string()));
        out.extend(
            aggregates
                .into_iter()
                .map(|a| Output::Record(count_entry(&a))),
        );
        let mut users: Vec<&String> = self.stages.keys().collect();
        users.sort();
        let users: Vec<String> = users.into_iter().cloned().collect();
        for user in users {
            let state = self.stages.get_mut(&user).expect("listed");
            state.end_window(&self.thresholds, now, out);
        }
        self.window_start = Some(now);
    }
}

/// The usage the status last showed for `info`: grant text -> (count, last used).
fn seeded_usage(info: &StageInfo) -> HashMap<String, (u64, Option<DateTime<Utc>>)> {
    info.seed
        .iter()
        .map(|u| {
            let last = u
                .last_used
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            (u.grant.clone(), (u.count, last))
        })
        .collect()
}

impl StageState {
    /// A stage first seen (in this process) at `now`; from its persisted usage when it has some.
    fn new(info: Arc<StageInfo>, now: DateTime<Utc>, t: &Thresholds) -> StageState {
        let per_minute = f64::from(t.deny_records_per_minute);
        let usage = seeded_usage(&info);
        let seen = usage
            .iter()
            .filter(|(_, (count, _))| *count > 0)
            .map(|(grant, _)| grant.clone())
            .collect();
        let since = info.seed_since.map_or(now, |s| s.min(now));
        // The baseline from before: the counted requests per window since the stage was first
        // seen (downtime included, which can only make it lower, so more sensitive).
        let elapsed = (now - since).num_milliseconds().max(0).unsigned_abs()
            / u64::try_from(t.window.as_millis().max(1)).unwrap_or(u64::MAX);
        let (baseline, windows) = if elapsed == 0 {
            (None, 0)
        } else {
            let counted: u64 = usage.values().map(|(count, _)| *count).sum();
            #[allow(clippy::cast_precision_loss, reason = "counts, far below 2^52")]
            let baseline = counted as f64 / elapsed as f64;
            (Some(baseline), u32::try_from(elapsed).unwrap_or(u32::MAX))
        };
        StageState {
            since,
            deny_tokens: per_minute,
            deny_refilled: now,
            seen,
            window_count: 0,
            baseline,
            windows,
            usage,
            // A stage seen for the first time: its `usageSince` is written at the window's end.
            usage_dirty: info.seed_since.is_none(),
            info,
            alerted: HashSet::new(),
            overflow: 0,
        }
    }

    fn refill(&mut self, now: DateTime<Utc>, per_minute: f64) {
        let elapsed = (now - self.deny_refilled).num_milliseconds();
        if elapsed > 0 {
            #[allow(clippy::cast_precision_loss, reason = "milliseconds, far below 2^52")]
            let add = elapsed as f64 / 60_000.0 * per_minute;
            self.deny_tokens = (self.deny_tokens + add).min(per_minute);
            self.deny_refilled = now;
        }
    }

    fn end_window(&mut self, t: &Thresholds, now: DateTime<Utc>, out: &mut Vec<Output>) {
        let info = self.info.clone();
        if self.overflow > 0 {
            let mut entry = stage_entry(
                &info,
                Action::Access,
                format!(
                    "{} further requests of stage {} in this window were counted but not itemised: more than {} distinct requests were seen in one window",
                    self.overflow, info.stage, t.max_tuples
                ),
            );
            entry.object = Some(format!("{} requests", self.overflow));
            entry.reason = Some("Overflow".into());
            entry.item = Some(json!({"kind": "request-overflow", "count": self.overflow}));
            out.push(Output::Record(entry));
            self.overflow = 0;
        }
        let count = self.window_count;
        #[allow(clippy::cast_precision_loss, reason = "request counts, far below 2^52")]
        let c = count as f64;
        let mut spiked = false;
        if self.windows >= t.baseline_windows && count >= t.spike_min_requests {
            let baseline = self.baseline.unwrap_or(0.0);
            if c > t.spike_factor * baseline.max(1.0) {
                spiked = true;
                let message = format!(
                    "stage {} made {count} requests in {}s, {:.0} times its baseline of {baseline:.1} per window (threshold: {}x and at least {})",
                    info.stage,
                    t.window.as_secs(),
                    c / baseline.max(1.0),
                    t.spike_factor,
                    t.spike_min_requests,
                );
                let mut entry = stage_entry(&info, Action::Anomaly, message.clone());
                entry.object = Some(format!("{count} requests"));
                entry.reason = Some(AnomalyKind::VolumeSpike.as_str().into());
                // Two decimals: a float of that many digits reads back as the same number, so
                // the record's hash (over the parsed record) verifies; a float such as
                // 7.190000000000001 may not (serde_json's default parser is not exact).
                let baseline = (baseline * 100.0).round() / 100.0;
                entry.item = Some(
                    json!({"anomaly": "VolumeSpike", "count": count, "baseline": baseline, "windowSeconds": t.window.as_secs()}),
                );
                out.push(Output::Anomaly(
                    Anomaly {
                        kind: AnomalyKind::VolumeSpike,
                        stage: info.clone(),
                        message,
                    },
                    entry,
                ));
            }
        }
        // A spike does not raise the baseline: a sustained flood keeps being one.
        if !spiked {
            self.baseline = Some(match self.baseline {
                None => c,
                Some(b) => b * 0.7 + c * 0.3,
            });
        }
        self.windows = self.windows.saturating_add(1);
        self.window_count = 0;
        self.alerted.clear();
        if self.usage_dirty {
            self.usage_dirty = false;
            out.push(Output::Usage(UsageUpdate {
                stage: info.clone(),
                usage: usage_of(&info, &self.usage),
                since: self.since,
            }));
        }
        let _ = now;
    }
}

/// Usage per grant of the stage, in grant order, at most [`MAX_USAGE_ENTRIES`].
fn usage_of(
    info: &StageInfo,
    counts: &HashMap<String, (u64, Option<DateTime<Utc>>)>,
) -> Vec<GrantUsage> {
    let mut seen = HashSet::new();
    info.grants
        .iter()
        .filter(|g| seen.insert(g.text.as_str()))
        .take(MAX_USAGE_ENTRIES)
        .map(|g| {
            let (count, last) = counts.get(&g.text).copied().unwrap_or_default();
            GrantUsage {
                grant: g.text.clone(),
                used: count > 0,
                count,
                last_used: last.map(format_time),
            }
        })
        .collect()
}

fn stage_entry(info: &StageInfo, action: Action, message: String) -> Entry {
    let mut entry = Entry::new(action, &info.namespace, &info.pipeline, message);
    entry.stage = Some(info.stage.clone());
    entry.subject = Some(info.user.clone());
    entry.pipeline_uid = Some(info.pipeline_uid.clone());
    entry
}

fn request_item(obs: &Observation) -> Value {
    json!({
        "kind": "request",
        "source": obs.source.as_str(),
        "verb": bounded(&obs.verb),
        "apiGroup": bounded(&obs.api_group),
        "resource": bounded(&obs.resource),
        "subresource": obs.subresource.as_deref().map(bounded),
        "name": obs.name.as_deref().map(bounded),
        "namespace": obs.namespace.as_deref().map(bounded),
        "userAgent": obs.user_agent.as_deref().map(bounded),
    })
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}

fn object_text(obs: &Observation) -> String {
    bounded(&obs.to_string())
}

fn refused_entry(
    info: &StageInfo,
    obs: &Observation,
    grant: Option<&str>,
    source_check: &str,
) -> Entry {
    let mut entry = stage_entry(
        info,
        Action::Access,
        format!(
            "refused: stage {} asked for {} from {}",
            info.stage,
            obs,
            obs.source_ip.as_deref().unwrap_or("an unknown address")
        ),
    );
    entry.object = Some(object_text(obs));
    entry.verdict = Some(Verdict::Deny.as_str().into());
    entry.reason = Some("Refused".into());
    entry.item = Some(merge(
        request_item(obs),
        json!({
            "count": 1,
            "firstTime": format_time(obs.time),
            "lastTime": format_time(obs.time),
            "sourceIPs": obs.source_ip.as_deref().map(|ip| vec![bounded(ip)]).unwrap_or_default(),
            "grant": grant,
            "sourceCheck": source_check,
        }),
    ));
    entry
}

fn count_entry(a: &Aggregate) -> Entry {
    let obs = &a.sample;
    let what = if a.sample.verdict == Verdict::Allow {
        "made"
    } else {
        "refused (over the rate of individually recorded refusals)"
    };
    let mut entry = stage_entry(
        &a.stage,
        Action::Access,
        format!(
            "{} {what} {} time{} between {} and {}",
            obs,
            a.count,
            if a.count == 1 { "" } else { "s" },
            format_time(a.first),
            format_time(a.last)
        ),
    );
    entry.object = Some(object_text(obs));
    entry.verdict = Some(obs.verdict.as_str().into());
    entry.reason = Some(
        if a.over_rate {
            "RefusedOverRate"
        } else {
            "Used"
        }
        .into(),
    );
    entry.item = Some(merge(
        request_item(obs),
        json!({
            "count": a.count,
            "firstTime": format_time(a.first),
            "lastTime": format_time(a.last),
            "sourceIPs": a.source_ips,
            "grant": a.grant,
            "sourceCheck": a.source_check,
        }),
    ));
    entry
}

fn anomaly(
    info: &Arc<StageInfo>,
    kind: AnomalyKind,
    obs: &Observation,
    message: String,
    extra: Value,
) -> Output {
    let mut entry = stage_entry(info, Action::Anomaly, message.clone());
    entry.object = Some(object_text(obs));
    entry.verdict = Some(obs.verdict.as_str().into());
    entry.reason = Some(kind.as_str().into());
    entry.item = Some(merge(
        merge(
            request_item(obs),
            json!({"anomaly": kind.as_str(), "time": format_time(obs.time), "sourceIP": obs.source_ip.as_deref().map(bounded)}),
        ),
        extra,
    ));
    Output::Anomaly(
        Anomaly {
            kind,
            stage: info.clone(),
            message,
        },
        entry,
    )
}

/// The rule that would allow `obs`, as it would be written in the stage's spec.
pub fn suggested_rule(obs: &Observation) -> String {
    match obs.source {
        Source::Kubernetes => {
            let names = obs
                .name
                .as_deref()
                .map(|n| format!(", resourceNames: [{n}]"))
                .unwrap_or_default();
            format!(
                "permissions: [{{apiGroups: [\"{}\"], resources: [{}], verbs: [{}]{names}}}]",
                obs.api_group,
                obs.full_resource(),
                obs.verb
            )
        }
        Source::Vault => format!(
            "vault.policies: [{{path: {}, capabilities: [{}]}}]",
            obs.resource, obs.verb
        ),
    }
}

fn access_denied(info: &Arc<StageInfo>, obs: &Observation) -> Output {
    let closest = info.closest(obs);
    let outside =
        obs.source == Source::Kubernetes && obs.namespace.as_deref() != Some(&info.namespace);
    let closest_text = match closest {
        Some(g) => format!("the closest grant is `{}`", g.text),
        None => "no grant of the stage comes close".to_string(),
    };
    let cover = if outside {
        format!(
            "the stage can be granted access only in its own namespace {}, and this request is {}",
            info.namespace,
            obs.namespace
                .as_deref()
                .map_or("cluster-wide".to_string(), |n| format!("in {n}"))
        )
    } else {
        format!("the grant that would cover it: {}", suggested_rule(obs))
    };
    let message = format!(
        "stage {} was refused {} (from {}, {}): not granted; {closest_text}; {cover}. A probe, a compromised workload, or a missing grant",
        info.stage,
        obs,
        obs.source_ip.as_deref().unwrap_or("an unknown address"),
        obs.user_agent
            .as_deref()
            .map(bounded)
            .unwrap_or_else(|| "no user agent".into()),
    );
    anomaly(
        info,
        AnomalyKind::AccessDenied,
        obs,
        message,
        json!({
            "closestGrant": closest.map(|g| g.text.clone()),
            "suggestedGrant": if outside { None } else { Some(suggested_rule(obs)) },
        }),
    )
}

fn humanize(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    if s >= 86_400 {
        format!("{}d", s / 86_400)
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else if s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests;
