//! Where audit events come in: the bounds every sender is held to (a token bucket on the
//! stages' events, a bounded queue), then hand-over to the processor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::metrics::{AccessMetrics, RequestLabels, SourceLabels};
use crate::access::{Directory, Observation, Source, StageInfo};

/// A stage's request, for the processor.
pub(crate) type Work = (Arc<StageInfo>, Observation);

/// At most this many requests wait for the processor; beyond, they are dropped and counted.
pub(crate) const QUEUE: usize = 65_536;

/// A token bucket: `rate` a second, bursts of up to one second's worth.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new(per_second: u32) -> TokenBucket {
        let rate = f64::from(per_second.max(1));
        TokenBucket {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&self) -> bool {
        let mut state = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            true
        } else {
            *state = (tokens, now);
            false
        }
    }
}

/// Shared by the webhook and the Vault socket.
pub(crate) struct Intake {
    pub directory: Arc<Directory>,
    pub metrics: Arc<super::super::metrics::Metrics>,
    bucket: TokenBucket,
    queue: mpsc::Sender<Work>,
    /// Per stage user: its requests not examined (over the rate or the queue), for the count
    /// record at the window's end.
    pub(crate) not_examined: Mutex<HashMap<String, (Arc<StageInfo>, u64)>>,
}

impl Intake {
    pub(crate) fn new(
        directory: Arc<Directory>,
        metrics: Arc<super::super::metrics::Metrics>,
        per_second: u32,
        queue: mpsc::Sender<Work>,
    ) -> Intake {
        Intake {
            directory,
            metrics,
            bucket: TokenBucket::new(per_second),
            queue,
            not_examined: Mutex::default(),
        }
    }

    fn access(&self) -> &AccessMetrics {
        &self.metrics.access
    }

    pub(crate) fn received(&self, source: Source, count: u64) {
        self.access()
            .events
            .get_or_create(&SourceLabels {
                source: source.as_str().into(),
            })
            .inc_by(count);
    }

    /// Hands over `obs` of `stage`, within the bounds.
    pub(crate) fn offer(&self, stage: Arc<StageInfo>, obs: Observation) {
        let source = obs.source;
        let reason = if !self.bucket.take() {
            "rate_limited"
        } else {
            self.access()
                .requests
                .get_or_create(&RequestLabels {
                    source: source.as_str().into(),
                    verdict: obs.verdict.as_str().into(),
                })
                .inc();
            match self.queue.try_send((stage.clone(), obs)) {
                Ok(()) => return,
                Err(_) => "queue_full",
            }
        };
        self.access().dropped(source, reason);
        let mut counts = self.not_examined.lock().expect("not examined lock");
        counts
            .entry(stage.user.clone())
            .or_insert_with(|| (stage, 0))
            .1 += 1;
    }

    /// Takes the counts of requests not examined since the last call.
    pub(crate) fn take_not_examined(&self) -> Vec<(Arc<StageInfo>, u64)> {
        let mut counts = self.not_examined.lock().expect("not examined lock");
        let mut taken: Vec<_> = counts.drain().map(|(_, v)| v).collect();
        taken.sort_by(|a, b| a.0.user.cmp(&b.0.user));
        taken
    }

    /// One Kubernetes audit event: dropped at once unless it is the final event of a managed
    /// stage's request.
    pub(crate) fn kubernetes_event(&self, event: crate::access::kube_audit::Event) {
        if !event.is_service_account() {
            self.access().dropped(Source::Kubernetes, "not_a_stage");
            return;
        }
        if !event.is_final() {
            self.access().dropped(Source::Kubernetes, "not_final");
            return;
        }
        let Some(stage) = self.directory.lookup(&event.user.username) else {
            self.access().dropped(Source::Kubernetes, "not_a_stage");
            return;
        };
        self.offer(stage, event.into_observation(chrono::Utc::now()));
    }

    /// One Vault audit entry.
    pub(crate) fn vault_entry(&self, entry: crate::access::vault_audit::Entry) {
        let Some(stage) = entry
            .service_account()
            .and_then(|(ns, name)| self.directory.by_service_account(ns, name))
        else {
            self.access().dropped(Source::Vault, "not_a_stage");
            return;
        };
        match entry.into_observation(stage.user.clone(), chrono::Utc::now()) {
            Some(obs) => self.offer(stage, obs),
            None => self.access().dropped(Source::Vault, "not_final"),
        }
    }
}

/// Compares without stopping at the first difference, so that the time taken does not tell
/// how much of a guessed token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_second_worth_then_refuses() {
        let bucket = TokenBucket::new(100);
        let taken = (0..1000).filter(|_| bucket.take()).count();
        // 100 at once, and whatever refilled while the loop ran (far less than 900).
        assert!((100..200).contains(&taken), "{taken}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokem"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }
}
