//! The runtime side's metrics (registered by `Metrics::default`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SourceLabels {
    /// `kubernetes` or `vault`.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DroppedLabels {
    pub source: String,
    /// `not_a_stage`, `not_final` (a request's earlier stage), `rate_limited` or `queue_full`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub source: String,
    /// `Allow` or `Deny`.
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AnomalyLabels {
    /// `AccessDenied`, `TokenUsedOutsidePods`, `NewBehaviour` or `VolumeSpike`.
    pub anomaly: String,
    pub namespace: String,
    pub pipeline: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RejectedLabels {
    pub source: String,
    /// `unauthorized`, `too_large`, `malformed` or `not_found`.
    pub reason: String,
}

/// See the README's metrics table.
#[derive(Debug, Default)]
pub(crate) struct AccessMetrics {
    pub events: Family<SourceLabels, Counter>,
    pub dropped: Family<DroppedLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub anomalies: Family<AnomalyLabels, Counter>,
    pub rejected: Family<RejectedLabels, Counter>,
}

impl AccessMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> AccessMetrics {
        let m = AccessMetrics::default();
        registry.register(
            "audit_events",
            "Audit events received from the API server's webhook or Vault's audit device, by source",
            m.events.clone(),
        );
        registry.register(
            "audit_events_dropped",
            "Audit events not turned into access records, by source and reason (not_a_stage is the normal case: only stages' identities are recorded)",
            m.dropped.clone(),
        );
        registry.register(
            "access_requests",
            "Requests by managed stages' identities, by source and verdict",
            m.requests.clone(),
        );
        registry.register(
            "access_anomalies",
            "Runtime access anomalies, by kind and stage",
            m.anomalies.clone(),
        );
        registry.register(
            "audit_requests_rejected",
            "Audit deliveries refused before reading their events, by source and reason",
            m.rejected.clone(),
        );
        m
    }

    /// One series in each family, so that each shows in the exposition (for tests).
    #[cfg(test)]
    pub(crate) fn touch_all(&self) {
        use crate::access::Source;
        self.events
            .get_or_create(&SourceLabels {
                source: "kubernetes".into(),
            })
            .inc();
        self.dropped(Source::Kubernetes, "not_a_stage");
        self.rejected(Source::Kubernetes, "unauthorized");
        self.requests
            .get_or_create(&RequestLabels {
                source: "kubernetes".into(),
                verdict: "Allow".into(),
            })
            .inc();
        self.anomalies
            .get_or_create(&AnomalyLabels {
                anomaly: "AccessDenied".into(),
                namespace: "ns".into(),
                pipeline: "p".into(),
                stage: "s".into(),
            })
            .inc();
    }

    pub(crate) fn dropped(&self, source: crate::access::Source, reason: &str) {
        self.dropped
            .get_or_create(&DroppedLabels {
                source: source.as_str().into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub(crate) fn rejected(&self, source: crate::access::Source, reason: &str) {
        self.rejected
            .get_or_create(&RejectedLabels {
                source: source.as_str().into(),
                reason: reason.into(),
            })
            .inc();
    }
}
