//! The operator under test: `portcullis run` as its own process, under the harness's watchdog,
//! and the example guardrails scoped to one test namespace.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::Client;
use kube::api::{Api, PostParams};
use portcullis::api::AccessGuardrail;
use serde_json::{Value, json};

use super::helpers::root;
use super::process::Server;

/// The `portcullis` binary: cargo names it for tests and benchmarks; other users of the
/// harness (the demo example) never start an operator process. `PORTCULLIS_OPERATOR_BIN`
/// runs another build instead, such as the image's static musl binary in a benchmark.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_OPERATOR_BIN") {
        return PathBuf::from(path);
    }
    match option_env!("CARGO_BIN_EXE_portcullis") {
        Some(path) => PathBuf::from(path),
        None => root().join("target/debug/portcullis"),
    }
}

/// A `portcullis run` process under the harness's watchdog.
pub(crate) struct Operator {
    server: Server,
    /// The operator's folder: decision log, key, pid file and log.
    pub dir: tempfile::TempDir,
    name: &'static str,
    port: u16,
    /// The decision log's file name in `dir` (a shard's has the shard's suffix).
    audit_file: PathBuf,
}

/// A free TCP port on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The test's HMAC key for the decision log, unless the caller put one in the operator's folder.
const TEST_KEY: &str = "an-hmac-key-for-tests-that-is-long-enough-0123456789";

/// Sets `flag` to `value` in `args`: replaces the value after it, or appends both.
fn set_flag(args: &mut Vec<String>, flag: &str, value: String) {
    match args.iter().position(|a| a == flag) {
        Some(at) if at + 1 < args.len() => args[at + 1] = value,
        _ => args.extend([flag.to_string(), value]),
    }
}

impl Operator {
    /// Starts an operator watching `namespace`; with `lease`, under leader election with that
    /// Lease namespace and this identity.
    pub(crate) fn start(name: &'static str, namespace: &str, lease: Option<&str>) -> Operator {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_with(name, namespace, lease, dir, &[])
    }

    /// As [`Operator::start`], in `dir` (an earlier operator's, to restart on its decision log)
    /// and with more arguments (Vault settings, say). An empty `namespace` watches every
    /// namespace.
    pub(crate) fn start_with(
        name: &'static str,
        namespace: &str,
        lease: Option<&str>,
        dir: tempfile::TempDir,
        extra: &[String],
    ) -> Operator {
        let mut args: Vec<String> = vec!["run".into(), "--identity".into(), name.into()];
        if !namespace.is_empty() {
            args.extend(["--watch-namespace".to_string(), namespace.to_string()]);
        }
        match lease {
            Some(lease_namespace) => {
                args.extend(["--lease-namespace".to_string(), lease_namespace.to_string()])
            }
            None => args.push("--no-leader-election".into()),
        }
        args.extend(extra.iter().cloned());
        Self::launch(name, dir, args, None)
    }

    /// The one launcher: `portcullis <args>` under the harness's watchdog, in `dir`, with what
    /// only this machine knows set whether `args` has the flag or not: `--audit-log
    /// <dir>/audit.log`, `--audit-key <dir>/audit.key` (the test key unless that file exists),
    /// `--metrics-addr 127.0.0.1:<a free port>` and `--kubeconfig` (`kubeconfig`, else the
    /// control plane's admin). With `--shard-count`/`--shard-index` in `args`,
    /// [`Operator::audit_log`] is that shard's file.
    pub(crate) fn launch(
        name: &'static str,
        dir: tempfile::TempDir,
        mut args: Vec<String>,
        kubeconfig: Option<&Path>,
    ) -> Operator {
        let key = dir.path().join("audit.key");
        if !key.exists() {
            std::fs::write(&key, TEST_KEY).expect("key written");
        }
        let port = free_port();
        let kubeconfig = match kubeconfig {
            Some(path) => path.to_path_buf(),
            None => super::control_plane().kubeconfig().to_path_buf(),
        };
        set_flag(&mut args, "--kubeconfig", kubeconfig.display().to_string());
        let log = dir.path().join("audit.log");
        set_flag(&mut args, "--audit-log", log.display().to_string());
        set_flag(&mut args, "--audit-key", key.display().to_string());
        set_flag(&mut args, "--metrics-addr", format!("127.0.0.1:{port}"));
        let flag = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1)?.parse::<u32>().ok())
        };
        let shard = portcullis::shard::Shard::new(
            flag("--shard-index").unwrap_or(0),
            flag("--shard-count").unwrap_or(1),
        )
        .expect("a valid shard");
        let audit_file = shard.path(Path::new("audit.log"));
        // `PORTCULLIS_OPERATOR_WRAPPER` runs the operator under a profiler (for example
        // `heaptrack -o /tmp/operator`): its words, then the binary and its arguments.
        let wrapper = std::env::var("PORTCULLIS_OPERATOR_WRAPPER").unwrap_or_default();
        let mut words: Vec<String> = wrapper.split_whitespace().map(String::from).collect();
        let program = if words.is_empty() {
            binary()
        } else {
            words.push(binary().display().to_string());
            words.append(&mut args);
            args = words.split_off(1);
            PathBuf::from(&words[0])
        };
        let server = Server::spawn(name, dir.path(), &program, &args).expect("operator starts");
        Operator {
            server,
            dir,
            name,
            port,
            audit_file,
        }
    }

    pub(crate) fn audit_log(&self) -> PathBuf {
        self.dir.path().join(&self.audit_file)
    }

    pub(crate) fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each decision-log line is JSON"))
            .collect()
    }

    pub(crate) fn verify(&self) -> (bool, String) {
        let out = Command::new(binary())
            .args(["audit", "verify"])
            .arg(self.audit_log())
            .arg("--key")
            .arg(self.dir.path().join("audit.key"))
            .output()
            .expect("audit verify runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The reply (status line, headers, body) to `GET path` on the operator's HTTP port, or
    /// an empty string when it does not answer.
    pub(crate) async fn http_get(&self, path: &str) -> String {
        let (port, request) = (self.port, format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n"));
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return String::new();
            };
            let _ = s.write_all(request.as_bytes());
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            reply
        })
        .await
        .unwrap_or_default()
    }

    /// The HTTP status code of `GET path`, or 0 when the operator does not answer.
    pub(crate) async fn http_status(&self, path: &str) -> u16 {
        let reply = self.http_get(path).await;
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// The sum of the samples of the metrics whose line starts with `prefix`.
    pub(crate) async fn metric(&self, prefix: &str) -> f64 {
        self.http_get("/metrics")
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILL, as a crashed node would.
    pub(crate) fn kill(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("{}.pid", self.name)))
            .expect("operator pid file");
        let status = Command::new("kill")
            .arg("-KILL")
            .arg(pid.trim())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -9 the operator");
        self.server.stop();
    }

    /// SIGTERM and wait.
    pub(crate) fn stop(&mut self) {
        self.server.stop();
    }

    /// Whether the operator process has exited (on its own, or stopped).
    pub(crate) fn exited(&mut self) -> bool {
        self.server.exited()
    }

    /// The last 60 lines of the operator's log.
    pub(crate) fn log(&self) -> String {
        self.server.log_tail(60)
    }

    /// The operator's whole log.
    pub(crate) fn full_log(&self) -> String {
        std::fs::read_to_string(&self.server.log).unwrap_or_default()
    }
}

/// The example guardrails, renamed for `namespace` and selecting only it.
pub(crate) fn guardrails_for(namespace: &str) -> Vec<AccessGuardrail> {
    ["ingestion", "training", "deployment"]
        .iter()
        .map(|role| {
            let text =
                std::fs::read_to_string(root().join(format!("examples/guardrails/{role}.yaml")))
                    .expect("guardrail readable");
            let mut g: AccessGuardrail = serde_saphyr::from_str(&text).expect("guardrail parses");
            g.metadata.name = Some(format!("{namespace}-{role}"));
            g.spec.namespace_selector = serde_json::from_value(
                json!({"matchLabels": {"kubernetes.io/metadata.name": namespace}}),
            )
            .expect("selector");
            g
        })
        .collect()
}

pub(crate) async fn create_guardrails(client: &Client, guardrails: &[AccessGuardrail]) {
    let api: Api<AccessGuardrail> = Api::all(client.clone());
    for g in guardrails {
        api.create(&PostParams::default(), g)
            .await
            .expect("guardrail created");
    }
}
