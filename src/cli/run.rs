//! `portcullis run`: the operator process.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::controller::{self, RunConfig};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The decision log: every decision, apply, prune, drift revert and refused adoption as
    /// one hash-chained JSON line, written and flushed before the change it describes.
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_AUDIT_LOG")]
    pub audit_log: PathBuf,

    /// The file holding the decision log's HMAC key (at least 32 bytes).
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_AUDIT_KEY")]
    pub audit_key: PathBuf,

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

    /// The kubeconfig to use; in a pod the in-cluster configuration is used when unset.
    #[arg(long, value_name = "PATH", env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// How many AIPipelines are reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .try_init();
}

/// Runs the operator; returns the process exit code.
pub fn run(args: &RunArgs) -> u8 {
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
        metrics_addr: args.metrics_addr,
        leader_election: !args.no_leader_election,
        lease_namespace: args.lease_namespace.clone(),
        lease_name: args.lease_name.clone(),
        identity,
        concurrency: args.concurrency.max(1),
        watch_namespace: args.watch_namespace.clone(),
        echo_decisions: true,
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
