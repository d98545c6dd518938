//! Prometheus metrics, served on `/metrics`. Every name is documented in the README.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::AIPipelineStatus;
use crate::k8s::ManagedKind;
use crate::vault::leases::LeaseRecord;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, or the error's stable label (`Error::metric_label`).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VaultLabels {
    /// `policy_write`, `role_write`, `issue`, `renew`, `revoke`, ...
    pub operation: String,
    /// `ok`, `unavailable`, `refused`, `login_failed`, `kube_error`, or `busy` (no call slot
    /// came free in time: the call was not made).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The Vault operation, as in [`VaultLabels`].
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub namespace: String,
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    pub namespace: String,
    pub pipeline: String,
    pub stage: String,
    pub credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub index: u32,
    pub count: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// The operator's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub decisions: Family<DecisionLabels, Counter>,
    pub applied: Family<KindLabels, Counter>,
    pub pruned: Family<KindLabels, Counter>,
    pub drift_reverts: Family<KindLabels, Counter>,
    pub adoptions_refused: Family<KindLabels, Counter>,
    pub leader: Gauge,
    pub vault_operations: Family<VaultLabels, Counter>,
    pub credential_leases: Gauge,
    /// Writes of a Vault state Secret refused because it changed since it was read.
    pub vault_state_conflicts: Counter,
    pub workload_restarts: Counter,
    pub shard: Family<ShardLabels, Gauge>,
    /// Appends to the decision log that failed.
    pub decision_log_write_failures: Counter,
    /// 1 while the decision log can be written, 0 while it cannot.
    pub decision_log_writable: Gauge,
    /// Records of renewals and revocations made while the log could not be written, waiting
    /// to be appended.
    pub decision_log_deferred: Gauge,
    /// Runtime access records (`controller::access`).
    pub(crate) access: super::access::AccessMetrics,
    pub vault_request_duration: Family<OperationLabels, Histogram>,
    /// The waits for the bounded Vault call slots.
    pub vault_slots: VaultSlotMetrics,
    pub pipeline_ready: Family<PipelineLabels, Gauge>,
    pub pipeline_denied: Family<PipelineLabels, Gauge>,
    pub lease_expiry: Family<CredentialLabels, Gauge>,
    pub build_info: Family<BuildLabels, Gauge>,
    /// The label sets of each pipeline's series, by pipeline UID, so a deleted pipeline's
    /// series go with it.
    series: Mutex<HashMap<String, PipelineSeries>>,
    pub admission: AdmissionMetrics,
    /// AccessGuardrail statuses and namespace isolation (`controller::guardrails`).
    pub(crate) guardrails: super::guardrails::GuardrailMetrics,
}

/// Enforcement at admission.
pub struct AdmissionMetrics {
    /// Namespaces with a ValidatingAdmissionPolicy Portcullis keeps.
    pub policies: Gauge,
    /// AIPipelines the admission webhook refused, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Foreign bindings reaching a stage's ServiceAccount now (one per binding and stage).
    pub foreign_grants: Gauge,
}

impl AdmissionMetrics {
    fn register(registry: &mut Registry) -> AdmissionMetrics {
        let policies = Gauge::default();
        registry.register(
            "admission_policies",
            "Namespaces with a ValidatingAdmissionPolicy Portcullis keeps (pods and workloads must not borrow a stage's identity)",
            policies.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "admission_refusals",
            "AIPipelines the admission webhook refused, by reason (InvalidSpec, EnforcedGuardrail)",
            refusals.clone(),
        );
        let foreign_grants = Gauge::default();
        registry.register(
            "foreign_grants",
            "RoleBindings and ClusterRoleBindings Portcullis does not manage that reach a stage's ServiceAccount now, counted per binding and stage",
            foreign_grants.clone(),
        );
        AdmissionMetrics {
            policies,
            refusals,
            foreign_grants,
        }
    }
}

/// The series one pipeline has.
#[derive(Debug, Default)]
struct PipelineSeries {
    pipeline: Option<PipelineLabels>,
    leases: HashSet<CredentialLabels>,
}

/// The buckets of Vault request durations, in seconds: a healthy Vault answers in milliseconds;
/// `--vault-request-timeout` (10 s by default) ends the slowest.
const VAULT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "AIPipeline reconciles by result",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "reconcile_duration_seconds",
            "Time one AIPipeline reconcile takes",
            reconcile_duration.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Access decisions recorded in the decision log, by verdict and reason",
            decisions.clone(),
        );
        let applied = Family::<KindLabels, Counter>::default();
        registry.register(
            "objects_applied",
            "Objects created or updated, by kind",
            applied.clone(),
        );
        let pruned = Family::<KindLabels, Counter>::default();
        registry.register(
            "objects_pruned",
            "Objects deleted because they are no longer planned",
            pruned.clone(),
        );
        let drift_reverts = Family::<KindLabels, Counter>::default();
        registry.register(
            "drift_reverts",
            "Managed objects changed or deleted by someone else and put back, by kind",
            drift_reverts.clone(),
        );
        let adoptions_refused = Family::<KindLabels, Counter>::default();
        registry.register(
            "adoptions_refused",
            "Existing objects Portcullis would not take over, by kind",
            adoptions_refused.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let vault_operations = Family::<VaultLabels, Counter>::default();
        registry.register(
            "vault_operations",
            "Calls to Vault, by operation and result",
            vault_operations.clone(),
        );
        let credential_leases = Gauge::default();
        registry.register(
            "credential_leases",
            "Credential leases the operator holds (current and awaiting revocation)",
            credential_leases.clone(),
        );
        let vault_state_conflicts = Counter::default();
        registry.register(
            "vault_state_conflicts",
            "Writes of a pipeline's Vault state Secret refused because another writer (a newer leader) changed it since it was read; the state is read again",
            vault_state_conflicts.clone(),
        );
        let workload_restarts = Counter::default();
        registry.register(
            "workload_restarts",
            "Restart targets restarted because their credentials changed",
            workload_restarts.clone(),
        );
        let shard = register_shard(&mut registry);
        let (decision_log_write_failures, decision_log_writable, decision_log_deferred) =
            register_decision_log(&mut registry);
        let Later {
            vault_request_duration,
            pipeline_ready,
            pipeline_denied,
            lease_expiry,
            build_info,
        } = Later::register(&mut registry);
        let admission = AdmissionMetrics::register(&mut registry);
        let access = super::access::AccessMetrics::register(&mut registry);
        Metrics {
            guardrails: super::guardrails::GuardrailMetrics::register(&mut registry),
            vault_slots: VaultSlotMetrics::register(&mut registry),
            access,
            registry,
            admission,
            decision_log_write_failures,
            decision_log_writable,
            decision_log_deferred,
            shard,
            vault_request_duration,
            pipeline_ready,
            pipeline_denied,
            lease_expiry,
            build_info,
            series: Mutex::new(HashMap::new()),
            vault_operations,
            credential_leases,
            vault_state_conflicts,
            workload_restarts,
            reconciles,
            reconcile_duration,
            decisions,
            applied,
            pruned,
            drift_reverts,
            adoptions_refused,
            leader,
        }
    }
}

/// `portcullis_shard_info`.
fn register_shard(registry: &mut Registry) -> Family<ShardLabels, Gauge> {
    let shard = Family::<ShardLabels, Gauge>::default();
    registry.register(
        "shard_info",
        "1, labelled with this operator's --shard-index and --shard-count",
        shard.clone(),
    );
    shard
}

/// The waits for the bounded Vault call slots (`--vault-max-concurrent-requests`).
pub struct VaultSlotMetrics {
    /// How long Vault calls waited for a slot, by operation.
    pub wait: Family<OperationLabels, Histogram>,
    /// Vault calls waiting for a slot now.
    pub waiting: Gauge,
}

impl VaultSlotMetrics {
    fn register(registry: &mut Registry) -> VaultSlotMetrics {
        let wait = Family::<OperationLabels, Histogram>::new_with_constructor(
            vault_histogram as fn() -> Histogram,
        );
        registry.register(
            "vault_slot_wait_seconds",
            "Time a Vault call waited for one of the bounded call slots (--vault-max-concurrent-requests) before it was sent, or gave up, by operation",
            wait.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "vault_slot_waiting",
            "Vault calls waiting for a call slot now (all the slots they may take are busy)",
            waiting.clone(),
        );
        VaultSlotMetrics { wait, waiting }
    }
}

/// The per-pipeline, per-credential, Vault timing and build families.
/// The decision log's health: failed appends, whether it can be written, records held.
fn register_decision_log(registry: &mut Registry) -> (Counter, Gauge, Gauge) {
    let decision_log_write_failures = Counter::default();
    registry.register(
            "decision_log_write_failures",
            "Appends to the decision log that failed (disk full, I/O error); nothing new is granted while it fails",
            decision_log_write_failures.clone(),
        );
    let decision_log_writable = Gauge::default();
    decision_log_writable.set(1);
    registry.register(
        "decision_log_writable",
        "1 while the decision log can be written, 0 while appends fail",
        decision_log_writable.clone(),
    );
    let decision_log_deferred = Gauge::default();
    registry.register(
            "decision_log_deferred_records",
            "Records of renewals and revocations made while the log could not be written, waiting to be appended",
            decision_log_deferred.clone(),
        );
    (
        decision_log_write_failures,
        decision_log_writable,
        decision_log_deferred,
    )
}

struct Later {
    vault_request_duration: Family<OperationLabels, Histogram>,
    pipeline_ready: Family<PipelineLabels, Gauge>,
    pipeline_denied: Family<PipelineLabels, Gauge>,
    lease_expiry: Family<CredentialLabels, Gauge>,
    build_info: Family<BuildLabels, Gauge>,
}

impl Later {
    fn register(registry: &mut Registry) -> Later {
        let vault_request_duration = Family::<OperationLabels, Histogram>::new_with_constructor(
            vault_histogram as fn() -> Histogram,
        );
        registry.register(
            "vault_request_duration_seconds",
            "Time one call to Vault takes, answered or failed, by operation",
            vault_request_duration.clone(),
        );
        let pipeline_ready = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "pipeline_ready",
            "1 while the AIPipeline's Ready condition is True, else 0",
            pipeline_ready.clone(),
        );
        let pipeline_denied = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "pipeline_denied_items",
            "Requested items the guardrails denied, per AIPipeline (its status.denied)",
            pipeline_denied.clone(),
        );
        let lease_expiry = Family::<CredentialLabels, Gauge>::default();
        registry.register(
                "credential_lease_expiry_timestamp_seconds",
                "When the current lease of each delivered credential ends (Unix time); renewal moves it",
                lease_expiry.clone(),
            );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "1, labelled with the operator's version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        Later {
            vault_request_duration,
            pipeline_ready,
            pipeline_denied,
            lease_expiry,
            build_info,
        }
    }
}

fn vault_histogram() -> Histogram {
    Histogram::new(VAULT_BUCKETS)
}

impl Metrics {
    /// Observes how long one Vault call took.
    pub fn observe_vault(&self, operation: &str, took: Duration) {
        self.vault_request_duration
            .get_or_create(&OperationLabels {
                operation: operation.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Sets the pipeline's ready and denied gauges from the status it is given.
    pub fn observe_pipeline(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        status: &AIPipelineStatus,
    ) {
        let labels = PipelineLabels {
            namespace: namespace.into(),
            pipeline: name.into(),
        };
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        self.pipeline_ready
            .get_or_create(&labels)
            .set(i64::from(ready));
        self.pipeline_denied
            .get_or_create(&labels)
            .set(i64::from(status.denied));
        self.series
            .lock()
            .expect("series lock")
            .entry(uid.into())
            .or_default()
            .pipeline = Some(labels);
    }

    /// Sets the expiry of each credential's current lease (the latest of those not being
    /// retired), and removes the series of credentials that have no lease any more.
    pub fn observe_leases(&self, uid: &str, namespace: &str, name: &str, leases: &[LeaseRecord]) {
        let mut current: HashMap<CredentialLabels, i64> = HashMap::new();
        for lease in leases.iter().filter(|l| l.retire_at.is_none()) {
            let labels = CredentialLabels {
                namespace: namespace.into(),
                pipeline: name.into(),
                stage: lease.stage.clone(),
                credential: lease.credential.clone(),
            };
            let expiry = current.entry(labels).or_insert(i64::MIN);
            *expiry = (*expiry).max(lease.expires_at.timestamp());
        }
        let mut series = self.series.lock().expect("series lock");
        let kept = &mut series.entry(uid.into()).or_default().leases;
        for gone in kept.iter().filter(|l| !current.contains_key(*l)) {
            self.lease_expiry.remove(gone);
        }
        kept.clear();
        for (labels, expiry) in current {
            self.lease_expiry.get_or_create(&labels).set(expiry);
            kept.insert(labels);
        }
    }

    /// Removes the series of pipelines whose UID is not in `live`.
    pub fn forget_deleted(&self, live: &HashSet<String>) {
        self.series
            .lock()
            .expect("series lock")
            .retain(|uid, series| {
                if live.contains(uid) {
                    return true;
                }
                if let Some(labels) = &series.pipeline {
                    self.pipeline_ready.remove(labels);
                    self.pipeline_denied.remove(labels);
                }
                for labels in &series.leases {
                    self.lease_expiry.remove(labels);
                }
                false
            });
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Says which shard this operator is (`portcullis_shard_info{index,count} 1`).
    pub fn set_shard(&self, shard: crate::shard::Shard) {
        self.shard
            .get_or_create(&ShardLabels {
                index: shard.index(),
                count: shard.count(),
            })
            .set(1);
    }

    pub fn kind(family: &Family<KindLabels, Counter>, kind: ManagedKind) {
        family
            .get_or_create(&KindLabels {
                kind: kind.as_str().into(),
            })
            .inc();
    }

    /// Starts timing a reconcile; the duration is observed when the timer is dropped.
    pub fn time_reconcile(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.reconcile_duration,
        }
    }
}

/// Observes the reconcile duration when dropped, whatever way the reconcile ends.
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every metric name the operator exposes: `# TYPE` lines, with the suffixes a sample of
    /// that type has (`_total`; a histogram's own name and `_bucket`/`_sum`/`_count`).
    fn exposed() -> BTreeSet<String> {
        // A family shows in the exposition once it has a series: one in each.
        let m = Metrics::default();
        m.reconciles
            .get_or_create(&ResultLabels {
                result: "ok".into(),
            })
            .inc();
        m.decisions
            .get_or_create(&DecisionLabels {
                verdict: "allow".into(),
                reason: "x".into(),
            })
            .inc();
        for family in [
            &m.applied,
            &m.pruned,
            &m.drift_reverts,
            &m.adoptions_refused,
        ] {
            Metrics::kind(family, ManagedKind::Role);
        }
        m.vault_operations
            .get_or_create(&VaultLabels {
                operation: "issue".into(),
                result: "ok".into(),
            })
            .inc();
        m.vault_slots
            .wait
            .get_or_create(&OperationLabels {
                operation: "issue".into(),
            })
            .observe(0.001);
        m.set_shard(crate::shard::Shard::new(0, 1).unwrap());
        m.admission
            .refusals
            .get_or_create(&ReasonLabels {
                reason: "InvalidSpec".into(),
            })
            .inc();
        m.access.touch_all();
        m.observe_vault("issue", Duration::from_millis(3));
        m.observe_pipeline("uid", "ns", "p", &AIPipelineStatus::default());
        m.observe_leases("uid", "ns", "p", &[lease("s", "c", 10, false)]);
        drop(m.time_reconcile());
        let text = m.encode();
        let mut names = BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["", "_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        }
        names
    }

    /// The `portcullis_*` names a file mentions.
    fn mentioned(path: &str) -> BTreeSet<String> {
        let text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut names = BTreeSet::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("portcullis_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            // `kubectl-portcullis`, `portcullis_0.1.0_linux` and the like are not metrics.
            let before = rest[..at].chars().last();
            if !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '/') {
                names.insert(tail[..end].trim_end_matches('_').to_string());
            }
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn the_new_families_are_exposed_with_their_help() {
        let names = exposed();
        for name in [
            "portcullis_build_info",
            "portcullis_pipeline_ready",
            "portcullis_pipeline_denied_items",
            "portcullis_credential_lease_expiry_timestamp_seconds",
            "portcullis_vault_request_duration_seconds_bucket",
        ] {
            assert!(names.contains(name), "{name} in {names:?}");
        }
        let text = Metrics::default().encode();
        assert!(
            text.contains(&format!(
                "portcullis_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn every_metric_is_documented_and_the_rules_and_dashboard_use_only_real_ones() {
        let exposed = exposed();
        let readme = mentioned("README.md");
        for name in &exposed {
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                readme.contains(name) || readme.contains(base),
                "{name} is not documented in README.md"
            );
        }
        for file in [
            "README.md",
            "charts/portcullis/templates/prometheusrule.yaml",
            "charts/portcullis/dashboards/portcullis.json",
        ] {
            for name in mentioned(file) {
                assert!(
                    exposed.contains(&name),
                    "{file} uses {name}, which the operator does not expose"
                );
            }
        }
    }

    fn lease(stage: &str, credential: &str, expires: i64, retiring: bool) -> LeaseRecord {
        let at = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap();
        LeaseRecord {
            stage: stage.into(),
            credential: credential.into(),
            path: "database/creds/x".into(),
            secret_name: "x".into(),
            lease_id: format!("database/creds/x/{expires}"),
            issued_at: at(0),
            expires_at: at(expires),
            renew_at: at(expires / 2),
            renewable: true,
            granted_seconds: 900,
            replace_next: false,
            retire_at: retiring.then(|| at(expires)),
            restart_pending: false,
            token_accessor: None,
            orphaned: false,
            rotate_requested: false,
        }
    }

    #[test]
    fn lease_expiry_follows_the_current_lease_and_goes_with_the_pipeline() {
        let metrics = Metrics::default();
        // The replaced lease (being retired) does not count; the newest current one does.
        metrics.observe_leases(
            "uid-1",
            "ml",
            "fraud",
            &[
                lease("ingest", "db", 1_000, true),
                lease("ingest", "db", 2_000, false),
                lease("train", "s3", 3_000, false),
            ],
        );
        let text = metrics.encode();
        assert!(text.contains("portcullis_credential_lease_expiry_timestamp_seconds{namespace=\"ml\",pipeline=\"fraud\",stage=\"ingest\",credential=\"db\"} 2000"), "{text}");
        assert!(
            text.contains("stage=\"train\",credential=\"s3\"} 3000"),
            "{text}"
        );

        // The train credential is no longer requested: its series goes.
        metrics.observe_leases(
            "uid-1",
            "ml",
            "fraud",
            &[lease("ingest", "db", 2_500, false)],
        );
        let text = metrics.encode();
        assert!(text.contains("credential=\"db\"} 2500"), "{text}");
        assert!(!text.contains("credential=\"s3\""), "{text}");

        let mut status = AIPipelineStatus {
            denied: 2,
            ..AIPipelineStatus::default()
        };
        status.conditions.push(crate::k8s::Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Ready".into(),
            message: String::new(),
            last_transition_time: crate::k8s::Time(crate::k8s::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        });
        metrics.observe_pipeline("uid-1", "ml", "fraud", &status);
        let text = metrics.encode();
        assert!(
            text.contains("portcullis_pipeline_ready{namespace=\"ml\",pipeline=\"fraud\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "portcullis_pipeline_denied_items{namespace=\"ml\",pipeline=\"fraud\"} 2"
            ),
            "{text}"
        );

        // The pipeline is deleted: every series of it goes.
        metrics.forget_deleted(&HashSet::from(["uid-2".to_string()]));
        let text = metrics.encode();
        assert!(!text.contains("pipeline=\"fraud\""), "{text}");
    }
}
