//! `portcullis run`: the controller that applies plans to the cluster.
//!
//! - `run/`: the process around the reconciles: leader election, the caches and watches that
//!   feed them, and housekeeping;
//! - `reconcile`: one AIPipeline, as the steps
//!   `cleanup | plan -> record -> apply -> vault -> status`;
//! - `apply` (managed objects), `record` (the decision log), `vault/` (the Vault side),
//!   [`status`] (pure: the status from what the steps came to);
//! - [`Error`]: everything a reconcile can fail with, by [`Category`].
//!
//! It watches AIPipelines, AccessGuardrails and Namespaces (their labels), and the metadata of
//! the objects it manages. A guardrail or namespace change re-reconciles exactly the pipelines
//! it affects. Only the replica holding the leader Lease watches and writes; a replica that loses
//! the lease exits, and its restart waits as a standby. With `--shard-count N`, each shard
//! watches and writes only the namespaces it owns ([`crate::shard`]), under its own Lease.

pub(crate) mod access;
mod admission;
mod apply;
mod claims;
mod coverage;
mod error;
mod events;
mod guardrails;
mod http;
mod index;
mod journal;
mod metrics;
pub(crate) mod ownership;
mod reconcile;
mod record;
mod reports;
mod run;
pub mod status;
pub(crate) mod vault;
mod watchdog;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use access::{AccessError, AccessRunConfig};
use apply::AppliedState;
pub use apply::json_subset;
pub use error::{ApplyFailure, ApplyFailures, Category, Error, Result};
use index::ManagedIndex;
use metrics::Metrics;
pub use run::{RunError, run};
pub use webhook::WebhookRunConfig;

use crate::api::{AIPipeline, AIPipelineStatus, AccessGuardrail};
use crate::audit::Entry;
pub use crate::k8s::FIELD_MANAGER;
use crate::k8s::{Client, Namespace, PartialObjectMeta, Recorder, Reporter, Store};
use crate::shard::Shard;

/// Settings of `portcullis run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub audit_log: PathBuf,
    pub audit_key: PathBuf,
    /// Earlier keys, whose records the log still holds after a key rotation.
    pub audit_previous_keys: Vec<PathBuf>,
    /// Seal the active log file past this many bytes (0: never).
    pub audit_segment_bytes: u64,
    /// Sealed segments kept (0: all).
    pub audit_keep_segments: usize,
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub concurrency: u16,
    /// Watch and manage only this namespace.
    pub watch_namespace: Option<String>,
    /// Of the watched namespaces, reconcile only those this shard owns. With more than one
    /// shard, the leader Lease, the decision log file and the Vault token Secret get the
    /// shard's suffix (see [`Shard::name`], [`Shard::path`]).
    pub shard: Shard,
    /// Also write each decision record to stdout.
    pub echo_decisions: bool,
    /// Publish each pipeline's decisions as a `wgpolicyk8s.io` PolicyReport (when the API
    /// server serves the kind).
    pub policy_reports: bool,
    /// Vault, when configured.
    pub vault: Option<VaultRunConfig>,
    /// Keep a ValidatingAdmissionPolicy per namespace with AIPipelines (see `admission`).
    pub admission_policies: bool,
    /// The AIPipeline admission webhook, when served.
    pub webhook: Option<WebhookRunConfig>,
    /// Watch for RoleBindings and ClusterRoleBindings that reach a stage's ServiceAccount.
    pub foreign_grants: bool,
    /// Runtime access records, when an audit source is configured.
    pub access: Option<AccessRunConfig>,
}

/// Vault settings of `portcullis run`.
#[derive(Debug, Clone)]
pub struct VaultRunConfig {
    pub connection: crate::vault::VaultConfig,
    /// The operator's own namespace: its Vault token Secret and the pipelines' Vault state
    /// Secrets live there.
    pub state_namespace: String,
    /// How long replaced credentials stay valid after their consumers restart.
    pub revoke_grace: Duration,
    /// A workload is restarted at most once per this interval.
    pub restart_min_interval: Duration,
    /// At most this many workload restarts per minute, over all pipelines.
    pub max_restarts_per_minute: usize,
    /// Policies and roles are compared with Vault at least this often.
    pub resync: Duration,
    /// The prefix of every Vault policy and role name the operator writes.
    pub name_prefix: String,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// The AIPipelines the operator watches: who claimed a credential path or Secret first.
    pub pipelines: Store<AIPipeline>,
    /// Which watched pipelines name each credential path and Secret (kept by the pipeline watch).
    claims: Arc<claims::ClaimIndex>,
    /// How many watch events the pipeline, guardrail and namespace caches have taken.
    events: Arc<run::caches::CacheEvents>,
    pub guardrails: Store<AccessGuardrail>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Every managed object of the watched namespaces, compactly.
    children: Arc<ManagedIndex>,
    applied: Arc<AppliedState>,
    pub metrics: Arc<Metrics>,
    journal: journal::Journal,
    reporter: Reporter,
    /// Set once the guardrail, namespace and managed-object caches hold a full list. Until then
    /// a reconcile would plan against missing guardrails (and prune what they allow), so it
    /// waits.
    synced: Arc<AtomicBool>,
    /// Woken when `synced` is set, so that reconciles waiting for it go on at once.
    synced_notify: Arc<tokio::sync::Notify>,
    /// Whether the API server serves PolicyReports (looked up once the caches are synced).
    policy_reports: AtomicBool,
    /// The digest of the decisions last recorded per AIPipeline uid. The status holds it too
    /// (for restarts), but the cached AIPipeline a reconcile gets may predate our last status
    /// write.
    recorded: Mutex<HashMap<String, String>>,
    /// The status last written per AIPipeline uid, for the same reason.
    statuses: Mutex<HashMap<String, AIPipelineStatus>>,
    /// Failed reconciles in a row per AIPipeline uid, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Per AIPipeline uid, failures already recorded, so that a failure that persists is
    /// recorded once per change of outcome, not at every retry.
    repeats: Mutex<HashMap<String, record::Repeats>>,
    /// Vault, when the operator is configured with it.
    vault: Option<vault::VaultCtx>,
    /// The stages' identities and grants, for runtime access records (when they are on).
    access: Option<Arc<crate::access::Directory>>,
}

impl Context {
    /// Reads and writes the managed objects.
    fn applier(&self) -> apply::Applier<'_> {
        apply::Applier {
            client: &self.client,
            index: &self.children,
            applied: &self.applied,
        }
    }

    fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// A namespace's labels as selectors see them.
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        crate::k8s::namespace_labels(&self.namespaces, namespace)
    }

    /// Drops what is remembered per AIPipeline for those no longer in `live` (uids): deleted
    /// pipelines leave nothing behind in memory.
    async fn forget_deleted(&self, live: &std::collections::HashSet<String>) {
        self.recorded
            .lock()
            .expect("recorded lock")
            .retain(|uid, _| live.contains(uid));
        self.statuses
            .lock()
            .expect("status lock")
            .retain(|uid, _| live.contains(uid));
        self.failures
            .lock()
            .expect("failures lock")
            .retain(|uid, _| live.contains(uid));
        self.repeats
            .lock()
            .expect("repeats lock")
            .retain(|uid, _| live.contains(uid));
        self.applied.forget_gone(&self.children);
        if let Some(directory) = &self.access {
            directory.retain_pipelines(live);
        }
        self.metrics.forget_deleted(live);
        if let Some(vault) = &self.vault {
            vault.forget_deleted(live).await;
        }
    }

    /// Appends to the decision log and waits until the records are on disk.
    async fn record(&self, entries: Vec<Entry>) -> Result<()> {
        Ok(self.journal.record(entries).await?)
    }

    /// Records a renewal, revocation or failure: when the log cannot be written, the records
    /// are held and the change goes ahead (see [`journal`]).
    async fn record_keepalive(&self, entries: Vec<Entry>) -> Result<()> {
        Ok(self.journal.record_keepalive(entries).await?)
    }
}
