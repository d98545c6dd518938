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
    /// When the `--audit-key` file does not exist: take the key from this Secret (its `key`)
    /// in the operator's namespace (`--lease-namespace`), creating the Secret with 32 random
    /// bytes when it is missing, and write it to the `--audit-key` file (which must then be
    /// writable, e.g. a memory emptyDir). Lets GitOps tools install the chart without a key.
    #[arg(long, value_name = "NAME", env = "PORTCULLIS_AUDIT_KEY_SECRET")]
    pub audit_key_secret: Option<String>,

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

    /// The cluster: `--kubeconfig`, `--context`, else KUBECONFIG (several files merged), else
    /// ~/.kube/config, else the in-cluster configuration of the pod.
    #[command(flatten)]
    pub kube: super::kubeconfig::KubeArgs,

    /// Publish each pipeline's decisions as a `wgpolicyk8s.io/v1alpha2` PolicyReport in its
    /// namespace (for Policy Reporter), when the API server serves that kind. Needs get, create
    /// and patch on policyreports (the chart's `policyReports.enabled`).
    #[arg(long)]
    pub policy_reports: bool,

    /// How many AIPipelines are reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,

    #[command(flatten)]
    pub vault: VaultArgs,

    #[command(flatten)]
    pub access: super::ingest::AccessArgs,

    #[command(flatten)]
    pub admission: AdmissionArgs,
}

/// Enforcement at admission.
#[derive(Debug, clap::Args)]
pub struct AdmissionArgs {
    /// Keep a ValidatingAdmissionPolicy per namespace with AIPipelines: the API server then
    /// refuses pods and workloads that borrow a stage's ServiceAccount or labels. Needs RBAC on
    /// validatingadmissionpolicies and their bindings (see the README).
    #[arg(long)]
    pub admission_policies: bool,

    /// Watch for RoleBindings and ClusterRoleBindings that reach a stage's ServiceAccount
    /// besides Portcullis's own (the `ExclusiveAccess` condition). Needs get, list and watch on
    /// rolebindings, roles, clusterrolebindings and clusterroles (see the README).
    #[arg(long)]
    pub foreign_grant_watch: bool,

    /// Serve the AIPipeline admission webhook (AdmissionReview v1 over TLS) on this address, and
    /// keep the ValidatingWebhookConfiguration `portcullis` pointing at it. Not with
    /// `--shard-count` above 1.
    #[arg(long, value_name = "ADDR")]
    pub webhook_addr: Option<SocketAddr>,

    /// Register the webhook by this URL (`https://HOST:PORT`, for runs outside the cluster);
    /// by default through the Service `--webhook-service` of the operator's namespace.
    #[arg(long, value_name = "URL", requires = "webhook_addr")]
    pub webhook_url: Option<String>,

    /// The Service (port 443) in the operator's namespace that reaches `--webhook-addr`.
    #[arg(long, value_name = "NAME", default_value = "portcullis-webhook")]
    pub webhook_service: String,

    /// The Secret in the operator's namespace that holds the webhook's CA and certificate.
    #[arg(long, value_name = "NAME", default_value = "portcullis-webhook-tls")]
    pub webhook_secret: String,

    /// How long the webhook's certificates are valid; they are rotated with a third left.
    #[arg(long, value_name = "DURATION", default_value = "2160h", value_parser = duration)]
    pub webhook_cert_validity: std::time::Duration,
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

    /// The prefix of every Vault policy and role the operator writes; its own Vault policy is
    /// narrowed to names with this prefix (deploy/vault/portcullis-operator.hcl).
    #[arg(long, value_name = "PREFIX", default_value = crate::plan::names::DEFAULT_VAULT_NAME_PREFIX, value_parser = vault_name_prefix)]
    pub vault_name_prefix: String,

    /// The namespace of the operator's Vault token Secret and lease state Secrets (default:
    /// the leader Lease's namespace, the operator's own).
    #[arg(long, value_name = "NAMESPACE")]
    pub vault_state_namespace: Option<String>,

    /// How long one request to Vault may take.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub vault_request_timeout: std::time::Duration,

    /// How many calls to Vault may be in flight at once, over all pipelines. A call that finds
    /// no free slot for as long as one request may take (`--vault-request-timeout`) is not made:
    /// its credential shows the problem `waiting for a Vault call slot` (reason `VaultBusy`) and
    /// it is retried.
    #[arg(long, value_name = "N", default_value_t = crate::vault::DEFAULT_MAX_CONCURRENT_REQUESTS)]
    pub vault_max_concurrent_requests: usize,

    /// Of `--vault-max-concurrent-requests`, how many slots only renewals, revocations and lease
    /// lookups may take, so that slow issues and policy writes never hold up what keeps
    /// delivered credentials alive.
    #[arg(long, value_name = "N", default_value_t = crate::vault::DEFAULT_RESERVED_REQUESTS)]
    pub vault_reserved_requests: usize,

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

/// Flags that exclude each other, or do not fit together.
fn exclusive_flags(args: &RunArgs, shard: Shard) -> Result<(), String> {
    crate::vault::check_call_slots(
        args.vault.vault_max_concurrent_requests,
        args.vault.vault_reserved_requests,
    )?;
    if shard.is_sharded() && args.watch_namespace.is_some() {
        return Err(format!(
            "--watch-namespace and --shard-count {} exclude each other: one namespace is never split across shards",
            shard.count()
        ));
    }
    if shard.is_sharded() && args.admission.webhook_addr.is_some() {
        return Err(format!(
            "--webhook-addr and --shard-count {} exclude each other: one ValidatingWebhookConfiguration cannot reach every shard",
            shard.count()
        ));
    }
    Ok(())
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
    if let Err(e) = exclusive_flags(args, shard) {
        eprintln!("error: {e}");
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
        policy_reports: args.policy_reports,
        admission_policies: args.admission.admission_policies,
        foreign_grants: args.admission.foreign_grant_watch,
        webhook: args
            .admission
            .webhook_addr
            .map(|addr| controller::WebhookRunConfig {
                addr,
                url: args.admission.webhook_url.clone(),
                service: args.admission.webhook_service.clone(),
                namespace: args.lease_namespace.clone(),
                secret: args.admission.webhook_secret.clone(),
                cert_validity: args.admission.webhook_cert_validity,
            }),
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
                    max_concurrent_requests: args.vault.vault_max_concurrent_requests,
                    reserved_requests: args.vault.vault_reserved_requests,
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
                name_prefix: args.vault.vault_name_prefix.clone(),
            }),
        access,
    };
    runtime.block_on(async {
        let client = match args.kube.client().await {
            Ok((c, _)) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the Kubernetes API; set KUBECONFIG or run in a pod");
                return super::EXIT_FAILURE;
            }
        };
        if let Some(secret) = &args.audit_key_secret
            && let Err(e) =
                ensure_audit_key(&client, &args.lease_namespace, secret, &args.audit_key).await
        {
            tracing::error!(error = %e, "no key for the decision log");
            return super::EXIT_FAILURE;
        }
        match controller::run(client, config).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "portcullis stopped");
                super::EXIT_FAILURE
            }
        }
    })
}

/// The key in a key Secret.
pub const AUDIT_KEY_SECRET_KEY: &str = "key";

/// Makes the `path` file hold the decision log's key, unless it exists: the key of Secret
/// `namespace/name`, which is created with 32 random bytes (64 hex characters) when missing.
/// Two replicas starting at once both end with the key of the one Secret that was created
/// (the loser of the race reads the winner's). Returns whether a Secret was created.
pub async fn ensure_audit_key(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    path: &std::path::Path,
) -> Result<bool, String> {
    use crate::k8s::{Api, ByteString, ObjectMeta, Secret};
    if path.exists() {
        return Ok(false);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let object = format!("Secret {namespace}/{name}");
    let mut created = false;
    let secret = match secrets.get_opt(name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            let mut random = [0_u8; 32];
            std::io::Read::read_exact(
                &mut std::fs::File::open("/dev/urandom")
                    .map_err(|e| format!("/dev/urandom: {e}"))?,
                &mut random,
            )
            .map_err(|e| format!("/dev/urandom: {e}"))?;
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    labels: Some(
                        [("app.kubernetes.io/managed-by".to_string(), "portcullis".to_string())]
                            .into(),
                    ),
                    annotations: Some(
                        [(
                            "portcullis.dev/purpose".to_string(),
                            "The HMAC key of the operator's decision log: keep it to verify the log (portcullis audit verify)".to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                immutable: Some(true),
                type_: Some("Opaque".into()),
                data: Some(
                    [(
                        AUDIT_KEY_SECRET_KEY.to_string(),
                        ByteString(hex::encode(random).into_bytes()),
                    )]
                    .into(),
                ),
                ..Secret::default()
            };
            match secrets.create(&Default::default(), &new).await {
                Ok(secret) => {
                    created = true;
                    tracing::info!(secret = %object, "generated the decision log's key");
                    secret
                }
                Err(kube::Error::Api(e)) if e.code == 409 => secrets
                    .get(name)
                    .await
                    .map_err(|e| format!("{object}: {e}"))?,
                Err(e) => {
                    return Err(format!(
                        "cannot create {object}: {e}; grant the operator `create` on secrets in {namespace}, or create the Secret yourself"
                    ));
                }
            }
        }
        Err(e) => return Err(format!("cannot read {object}: {e}")),
    };
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get(AUDIT_KEY_SECRET_KEY))
        .map(|k| k.0.clone())
        .unwrap_or_default();
    if key.trim_ascii().len() < 32 {
        return Err(format!(
            "{object} has no `{AUDIT_KEY_SECRET_KEY}` of at least 32 bytes; put one there (`head -c 32 /dev/urandom | base64`), or delete the Secret to have one generated"
        ));
    }
    write_private(path, &key).map_err(|e| {
        format!(
            "cannot write the key to {}: {e}; --audit-key must be a writable path",
            path.display()
        )
    })?;
    Ok(created)
}

/// Writes `bytes` to a new file readable by its owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn vault_name_prefix(s: &str) -> Result<String, String> {
    crate::plan::names::check_vault_name_prefix(s).map(|()| s.to_string())
}
