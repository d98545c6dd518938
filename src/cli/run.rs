//! `portcullis run`: the operator process.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::controller::{self, RunConfig};
use crate::shard::Shard;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The decision log: every decision, apply, prune, drift revert and refused adoption as
    /// one hash-chained JSON line, written and flushed before the change it describes.
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_AUDIT_LOG")]
    pub audit_log: PathBuf,

    /// The file holding the decision log's HMAC key (at least 32 bytes).
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_AUDIT_KEY")]
    pub audit_key: PathBuf,

    /// An earlier key of the decision log, after a key rotation: the records it signed are still
    /// checked when the log is opened (each record names its key by `keyId`). Repeatable.
    #[arg(long, value_name = "PATH")]
    pub audit_previous_key: Vec<PathBuf>,

    /// When an append would take the active decision-log file past this many bytes, it is sealed
    /// as `<audit-log>.<first seq>` and a new one begun (the chain goes on across segments). Only
    /// the active file is read on start. 0: never.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    pub audit_segment_bytes: u64,

    /// Sealed decision-log segments to keep; older ones are deleted. 0 keeps every one (ship the
    /// stdout copy of the log elsewhere before lowering this).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub audit_keep_segments: usize,

    /// Where to serve /healthz, /readyz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Run without leader election (one replica only).
    #[arg(long)]
    pub no_leader_election: bool,

    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
    pub lease_namespace: String,

    /// Name of the leader Lease.
    #[arg(long, default_value = "portcullis-leader")]
    pub lease_name: String,

    /// This replica's name in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Reconcile only the AIPipelines of this namespace (and manage objects only there). By
    /// default every namespace is watched.
    #[arg(long, value_name = "NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Run as one of this many shards: each reconciles only the AIPipelines of the namespaces
    /// it owns (the first 8 bytes of the SHA-256 of the namespace's name, big-endian, modulo
    /// the count), under its own leader Lease. All shards need the same count.
    #[arg(
        long,
        value_name = "N",
        env = "PORTCULLIS_SHARD_COUNT",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub shard_count: u32,

    /// Which shard this operator is, from 0 to `--shard-count` - 1.
    #[arg(
        long,
        value_name = "I",
        env = "PORTCULLIS_SHARD_INDEX",
        default_value_t = 0
    )]
    pub shard_index: u32,

    /// The kubeconfig to use; in a pod the in-cluster configuration is used when unset.
    #[arg(long, value_name = "PATH", env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// How many AIPipelines are reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,

    #[command(flatten)]
    pub vault: VaultArgs,

    #[command(flatten)]
    pub access: super::ingest::AccessArgs,
}

/// Vault: without `--vault-address`, Portcullis writes nothing to Vault and reports the stages
/// that ask for it as `VaultNotConfigured`.
#[derive(Debug, clap::Args)]
pub struct VaultArgs {
    /// Vault's address, such as `https://vault.vault.svc:8200`.
    #[arg(long, value_name = "URL", env = "VAULT_ADDR")]
    pub vault_address: Option<String>,

    /// A PEM bundle of the CAs that sign Vault's certificate (default: the system's roots).
    #[arg(long, value_name = "PATH", env = "VAULT_CACERT")]
    pub vault_ca_cert: Option<PathBuf>,

    /// The Vault Enterprise namespace to work in.
    #[arg(long, value_name = "NAMESPACE", env = "VAULT_NAMESPACE")]
    pub vault_namespace: Option<String>,

    /// The Kubernetes auth mount the operator logs in with.
    #[arg(long, value_name = "MOUNT", default_value = "kubernetes")]
    pub vault_auth_mount: String,

    /// The Vault role the operator logs in as; give it a `token_period` (see the README).
    #[arg(long, value_name = "ROLE", default_value = "portcullis-operator")]
    pub vault_auth_role: String,

    /// The operator's ServiceAccount token for the login (a projected token in the pod).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub vault_auth_token_path: PathBuf,

    /// The Kubernetes auth mount on which Portcullis writes the stages' roles.
    #[arg(long, value_name = "MOUNT", default_value = "kubernetes")]
    pub vault_workload_auth_mount: String,

    /// The namespace of the operator's Vault token Secret and lease state Secrets (default:
    /// the leader Lease's namespace, the operator's own).
    #[arg(long, value_name = "NAMESPACE")]
    pub vault_state_namespace: Option<String>,

    /// How long one request to Vault may take.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub vault_request_timeout: std::time::Duration,

    /// How long replaced credentials stay valid after their consumers restart, before their
    /// lease is revoked.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = duration)]
    pub credential_revoke_grace: std::time::Duration,

    /// A restart target is restarted at most once per this interval.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = duration)]
    pub restart_min_interval: std::time::Duration,

    /// At most this many workload restarts per minute, over all pipelines.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_restarts_per_minute: usize,

    /// Vault policies and roles are compared with what is planned at least this often (drift
    /// made in Vault is reverted then).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    pub vault_resync: std::time::Duration,
}

/// A duration such as `90s`, `2m` or `1h`.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    crate::api::validate::parse_duration(s)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration; write it like 30s, 2m or 1h"))
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,rustify=off,vaultrs=off"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .try_init();
}

/// Runs the operator; returns the process exit code.
pub fn run(args: &RunArgs) -> u8 {
    let shard = match Shard::new(args.shard_index, args.shard_count) {
        Ok(shard) => shard,
        Err(e) => {
            eprintln!("error: {e}");
            return super::EXIT_INVALID;
        }
    };
    if shard.is_sharded() && args.watch_namespace.is_some() {
        eprintln!(
            "error: --watch-namespace and --shard-count {} exclude each other: one namespace is never split across shards",
            shard.count()
        );
        return super::EXIT_INVALID;
    }
    let access = match args.access.config() {
        Ok(access) => access,
        Err(e) => {
            eprintln!("error: {e}");
            return super::EXIT_INVALID;
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return super::EXIT_FAILURE;
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| format!("portcullis-{}", std::process::id()))
    });
    let config = RunConfig {
        audit_log: args.audit_log.clone(),
        audit_key: args.audit_key.clone(),
        audit_previous_keys: args.audit_previous_key.clone(),
        audit_segment_bytes: args.audit_segment_bytes,
        audit_keep_segments: args.audit_keep_segments,
        metrics_addr: args.metrics_addr,
        leader_election: !args.no_leader_election,
        lease_namespace: args.lease_namespace.clone(),
        lease_name: args.lease_name.clone(),
        identity,
        concurrency: args.concurrency.max(1),
        watch_namespace: args.watch_namespace.clone(),
        shard,
        echo_decisions: true,
        vault: args
            .vault
            .vault_address
            .as_ref()
            .map(|address| controller::VaultRunConfig {
                connection: crate::vault::VaultConfig {
                    address: address.clone(),
                    ca_cert: args.vault.vault_ca_cert.clone(),
                    namespace: args.vault.vault_namespace.clone(),
                    auth_mount: args.vault.vault_auth_mount.clone(),
                    auth_role: args.vault.vault_auth_role.clone(),
                    auth_token_path: args.vault.vault_auth_token_path.clone(),
                    workload_auth_mount: args.vault.vault_workload_auth_mount.clone(),
                    request_timeout: args.vault.vault_request_timeout,
                },
                state_namespace: args
                    .vault
                    .vault_state_namespace
                    .clone()
                    .unwrap_or_else(|| args.lease_namespace.clone()),
                revoke_grace: args.vault.credential_revoke_grace,
                restart_min_interval: args.vault.restart_min_interval,
                max_restarts_per_minute: args.vault.max_restarts_per_minute.max(1),
                resync: args.vault.vault_resync,
            }),
        access,
    };
    runtime.block_on(async {
        let client = match client(args.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the Kubernetes API; set KUBECONFIG or run in a pod");
                return super::EXIT_FAILURE;
            }
        };
        match controller::run(client, config).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "portcullis stopped");
                super::EXIT_FAILURE
            }
        }
    })
}

pub(crate) async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
