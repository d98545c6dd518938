//! Prometheus metrics, served on `/metrics`. Every name is documented in the README.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::k8s::ManagedKind;

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
    /// `ok`, `unavailable` or `refused`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub index: u32,
    pub count: u32,
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
}

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
        let shard = Family::<ShardLabels, Gauge>::default();
        registry.register(
            "shard_info",
            "1, labelled with this operator's --shard-index and --shard-count",
            shard.clone(),
        );
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
        Metrics {
            registry,
            decision_log_write_failures,
            decision_log_writable,
            decision_log_deferred,
            shard,
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

impl Metrics {
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
