//! Starting etcd, kube-apiserver and kube-controller-manager (Kubernetes 1.36 by default) on loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;

use super::process::{Server, spawn_reaper};

/// How long the API server may take to answer `/readyz` with `ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long etcd may take to report itself healthy.
const ETCD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the CRDs may take to become Established, and the controller manager to create the
/// `default` ServiceAccount.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Start-up attempts; a retry happens only when a port picked as free was taken meanwhile.
const ATTEMPTS: usize = 3;
/// Log lines shown per server when start-up fails.
const TAIL_LINES: usize = 40;

/// The `--service-account-issuer` and API audience of the test control plane.
pub(crate) const ISSUER: &str = "https://kubernetes.default.svc";

/// A running control plane: etcd, kube-apiserver and kube-controller-manager (garbage collector,
/// namespace, serviceaccount and serviceaccount-token controllers), with the portcullis CRDs
/// installed. There is no kubelet and no scheduler: Pods never run.
pub(crate) struct ControlPlane {
    /// Data, certificates, keys, logs and the kubeconfig; removed by the reaper after the test
    /// process exits (kept when `PORTCULLIS_ENVTEST_KEEP` is set).
    dir: PathBuf,
    kubeconfig: PathBuf,
    server_url: String,
    assets: PathBuf,
    config: kube::Config,
    startup: Duration,
    /// Held so the servers are never stopped by a destructor; their watchdogs stop them.
    _servers: Vec<Server>,
    _tempdir: TempDir,
}

/// An audit webhook for the API server of this test binary (default: none).
pub(crate) struct AuditWebhook {
    /// Events go to `https://127.0.0.1:<port>/audit/kubernetes`.
    pub port: u16,
    /// The bearer token the API server sends.
    pub token: String,
    /// The audit policy file.
    pub policy: PathBuf,
    /// The CA of the webhook's serving certificate (PEM).
    pub ca: PathBuf,
}

static AUDIT_WEBHOOK: OnceLock<AuditWebhook> = OnceLock::new();

/// Makes the API server of this test binary send its audit events to `webhook`, in batches
/// that wait at most 200 ms. Call it before the binary's first [`control_plane`]; other test
/// binaries are unaffected.
pub(crate) fn with_audit_webhook(webhook: AuditWebhook) {
    let _ = AUDIT_WEBHOOK.set(webhook);
}

fn audit_webhook_args(dir: &Path) -> Result<Vec<String>, Failure> {
    let Some(webhook) = AUDIT_WEBHOOK.get() else {
        return Ok(Vec::new());
    };
    let config = dir.join("audit-webhook.kubeconfig");
    write(
        &config,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: portcullis\n  cluster:\n    server: https://127.0.0.1:{}/audit/kubernetes\n    certificate-authority: {}\ncontexts:\n- name: portcullis\n  context: {{cluster: portcullis, user: kube-apiserver}}\ncurrent-context: portcullis\nusers:\n- name: kube-apiserver\n  user:\n    token: {}\n",
            webhook.port,
            webhook.ca.display(),
            webhook.token
        ),
    )?;
    Ok(vec![
        format!("--audit-policy-file={}", webhook.policy.display()),
        format!("--audit-webhook-config-file={}", config.display()),
        "--audit-webhook-batch-max-wait=200ms".into(),
        // The operator starts after the API server: retry soon, not after the default 10 s.
        "--audit-webhook-initial-backoff=200ms".into(),
    ])
}

/// The control plane of this test binary, started on first use and shared by every test in the
/// binary (each test works in its own namespace, see [`super::temp_namespace`]).
///
/// Panics, in every test that calls it, if the control plane cannot be started; the message
/// holds the tails of the servers' logs.
pub(crate) fn control_plane() -> &'static ControlPlane {
    static CONTROL_PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    let started = CONTROL_PLANE.get_or_init(|| {
        // The start-up is async (readiness, CRDs) and callers are usually inside a tokio
        // runtime, which cannot block on another future: run it on a thread with its own
        // runtime. Nothing runtime-bound (connections, clients) outlives that thread.
        std::thread::Builder::new()
            .name("envtest-start".into())
            .spawn(start)
            .map_err(|e| format!("spawn the start-up thread: {e}"))
            .and_then(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("the start-up thread panicked".to_string()))
            })
    });
    match started {
        Ok(control_plane) => control_plane,
        Err(message) => panic!("envtest: the control plane did not start:\n{message}"),
    }
}

impl ControlPlane {
    /// A client authenticated as `admin` (group `system:masters`).
    pub(crate) async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config.clone()).expect("build the admin kube client")
    }

    /// A client that impersonates `user` with `groups` (the admin is allowed to impersonate
    /// anyone). For a ServiceAccount: `user` `system:serviceaccount:NS:NAME` and groups
    /// `system:serviceaccounts`, `system:serviceaccounts:NS`.
    pub(crate) async fn client_as(&self, user: &str, groups: &[&str]) -> kube::Client {
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = if groups.is_empty() {
            None
        } else {
            Some(groups.iter().map(|g| g.to_string()).collect())
        };
        kube::Client::try_from(config).expect("build an impersonating kube client")
    }

    /// A client that authenticates with the bearer `token` (e.g. from
    /// [`super::service_account_token`]) instead of the admin token.
    pub(crate) async fn client_with_token(&self, token: &str) -> kube::Client {
        let mut config = self.config.clone();
        config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
            .expect("an AuthInfo with a token");
        kube::Client::try_from(config).expect("build a token kube client")
    }

    /// The admin kubeconfig (server, `insecure-skip-tls-verify`, bearer token), for tools and
    /// for code under test that loads a kubeconfig.
    pub(crate) fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub(crate) fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The directory with the servers' logs (`etcd.log`, `kube-apiserver.log`,
    /// `kube-controller-manager.log`), certificates and the kubeconfig.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory `hack/envtest.sh` provided the binaries from.
    pub(crate) fn assets(&self) -> &Path {
        &self.assets
    }

    /// How long the start-up took, from running `hack/envtest.sh` to the CRDs being Established.
    pub(crate) fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The API server's Prometheus metrics (`GET /metrics`), as text.
    pub(crate) async fn apiserver_metrics(&self) -> String {
        get_text(&self.client().await, "metrics")
            .await
            .expect("GET /metrics")
    }
}

/// `GET /<path>` (one path segment) as text.
async fn get_text(client: &kube::Client, path: &str) -> Result<String, kube::Error> {
    let request = kube::core::Request::new("")
        .get(path, &Default::default())
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(request).await
}

/// A start-up failure: the message, and whether a retry may help (a port was taken).
struct Failure {
    message: String,
    retry: bool,
}

impl Failure {
    fn fatal(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retry: false,
        }
    }
}

fn start() -> Result<ControlPlane, String> {
    let begin = Instant::now();
    let assets = envtest_assets()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("build a tokio runtime: {e}"))?;
    let mut failures = Vec::new();
    for attempt in 1..=ATTEMPTS {
        match runtime.block_on(start_once(&assets, begin)) {
            Ok(control_plane) => return Ok(control_plane),
            Err(failure) => {
                let retry = failure.retry && attempt < ATTEMPTS;
                failures.push(format!("attempt {attempt}: {}", failure.message));
                if !retry {
                    break;
                }
                eprintln!("envtest: a port was taken meanwhile; starting again");
            }
        }
    }
    Err(failures.join("\n\n"))
}

/// Runs `bash hack/envtest.sh` and returns the directory it prints.
fn envtest_assets() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("bash")
        .arg(root.join("hack/envtest.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run hack/envtest.sh: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "hack/envtest.sh failed ({}); its messages are on stderr above",
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.trim();
    if dir.is_empty() || dir.contains('\n') {
        return Err(format!(
            "hack/envtest.sh printed {stdout:?}, not one directory"
        ));
    }
    let dir = PathBuf::from(dir);
    for binary in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !dir.join(binary).is_file() {
            return Err(format!(
                "hack/envtest.sh printed {}, which has no {binary}",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

async fn start_once(assets: &Path, begin: Instant) -> Result<ControlPlane, Failure> {
    let tempdir = tempfile::Builder::new()
        .prefix("portcullis-envtest-")
        .tempdir()
        .map_err(|e| Failure::fatal(format!("create a temp dir: {e}")))?;
    let dir = tempdir.path().to_path_buf();
    spawn_reaper(&dir).map_err(Failure::fatal)?;

    let key = dir.join("sa.key");
    let mut phases = Phases::new(begin);
    openssl_genrsa(&key).map_err(Failure::fatal)?;
    phases.mark("key");
    let token = random_hex(16).map_err(Failure::fatal)?;
    let tokens = dir.join("tokens.csv");
    write(&tokens, &format!("{token},admin,admin,system:masters\n"))?;
    let certs = dir.join("certs");
    std::fs::create_dir(&certs).map_err(|e| Failure::fatal(format!("mkdir certs: {e}")))?;

    let [etcd_port, peer_port, secure_port] = free_ports()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let server_url = format!("https://127.0.0.1:{secure_port}");

    let mut servers = Vec::new();

    // etcd. `--unsafe-no-fsync` is accepted by etcd 3.4.23 (hidden from --help) and saves the
    // fsyncs a throw-away test store does not need.
    let etcd_data = dir.join("etcd");
    servers.push(spawn(
        "etcd",
        &dir,
        &assets.join("etcd"),
        &[
            "--name=envtest".into(),
            format!("--data-dir={}", etcd_data.display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=envtest={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--logger=zap".into(),
            "--log-level=warn".into(),
        ],
    )?);
    wait_etcd(&mut servers, etcd_port).await?;
    phases.mark("etcd");

    let mut apiserver_args = audit_webhook_args(&dir)?;
    apiserver_args.extend([
        format!("--etcd-servers={etcd_url}"),
        format!("--secure-port={secure_port}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--cert-dir={}", certs.display()),
        format!("--token-auth-file={}", tokens.display()),
        "--authorization-mode=RBAC".into(),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        format!("--service-account-key-file={}", key.display()),
        format!("--service-account-signing-key-file={}", key.display()),
        format!("--service-account-issuer={ISSUER}"),
        format!("--api-audiences={ISSUER}"),
        // Only one API server, on loopback: the `kubernetes` Service's endpoints would point
        // nowhere, and the reconciler logs an error about it every 10 seconds.
        "--endpoint-reconciler-type=none".into(),
    ]);
    servers.push(spawn(
        "kube-apiserver",
        &dir,
        &assets.join("kube-apiserver"),
        &apiserver_args,
    )?);

    let kubeconfig = dir.join("kubeconfig");
    write(&kubeconfig, &kubeconfig_yaml(&server_url, &token))?;
    let config = load_config(&kubeconfig).await.map_err(Failure::fatal)?;
    let client = kube::Client::try_from(config.clone())
        .map_err(|e| Failure::fatal(format!("build the admin client: {e}")))?;
    wait_ready(&mut servers, &client).await?;
    phases.mark("apiserver");

    let mut kcm_args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--controllers=garbagecollector,namespace,serviceaccount-token,serviceaccount".into(),
        format!("--service-account-private-key-file={}", key.display()),
        "--leader-elect=false".into(),
        "--secure-port=0".into(),
        "--use-service-account-credentials=false".into(),
    ];
    // The serving certificate the API server generated (with its CA): published as `ca.crt`
    // in ServiceAccount token Secrets.
    let serving_cert = certs.join("apiserver.crt");
    if serving_cert.is_file() {
        kcm_args.push(format!("--root-ca-file={}", serving_cert.display()));
    }
    servers.push(spawn(
        "kube-controller-manager",
        &dir,
        &assets.join("kube-controller-manager"),
        &kcm_args,
    )?);

    install_crds(&mut servers, &client).await?;
    phases.mark("crds");
    wait_default_service_account(&mut servers, &client).await?;
    phases.mark("controller-manager");

    for server in &mut servers {
        server.detach();
    }
    let startup = begin.elapsed();
    eprintln!(
        "envtest: control plane at {server_url} up in {:.1}s ({}; logs in {})",
        startup.as_secs_f64(),
        phases,
        dir.display()
    );
    Ok(ControlPlane {
        dir,
        kubeconfig,
        server_url,
        assets: assets.to_path_buf(),
        config,
        startup,
        _servers: servers,
        _tempdir: tempdir,
    })
}

/// How long each start-up phase took, for the start-up message.
struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    /// The first phase (running `hack/envtest.sh`, making the temp dir) started at `begin`.
    fn new(begin: Instant) -> Phases {
        let now = Instant::now();
        Phases {
            last: now,
            done: vec![("envtest.sh", now - begin)],
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.done.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{phase} {:.2}s", took.as_secs_f64())?;
        }
        Ok(())
    }
}

fn spawn(
    name: &'static str,
    dir: &Path,
    program: &Path,
    args: &[String],
) -> Result<Server, Failure> {
    Server::spawn(name, dir, program, args).map_err(Failure::fatal)
}

fn write(path: &Path, text: &str) -> Result<(), Failure> {
    std::fs::write(path, text).map_err(|e| Failure::fatal(format!("write {}: {e}", path.display())))
}

/// Three distinct loopback ports that were free a moment ago.
fn free_ports() -> Result<[u16; 3], Failure> {
    let listeners = (0..3)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::fatal(format!("bind 127.0.0.1:0: {e}")))?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::fatal(format!("read a bound port: {e}")))?;
    Ok([ports[0], ports[1], ports[2]])
}

fn openssl_genrsa(key: &Path) -> Result<(), String> {
    let output = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(key)
        .arg("2048")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run openssl genrsa: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl genrsa failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// `bytes` random bytes from the kernel, hex-encoded.
fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("read /dev/urandom: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn kubeconfig_yaml(server_url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {server_url}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: {token}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: admin
    namespace: default
current-context: envtest
"
    )
}

async fn load_config(kubeconfig: &Path) -> Result<kube::Config, String> {
    let file = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("read {}: {e}", kubeconfig.display()))?;
    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("load {}: {e}", kubeconfig.display()))
}

/// The failure message for `what`, with the tails of every server's log. A server log that says
/// a port is in use makes it retryable.
fn failure(servers: &[Server], what: &str) -> Failure {
    let mut message = format!("{what}\n");
    let mut retry = false;
    for server in servers {
        // A Go crash ends with thousands of goroutine stacks: show where it starts instead.
        if let Some(crash) = crash_excerpt(&server.log) {
            message.push_str(&format!(
                "\n--- {} crashed; from {} ---\n{crash}\n",
                server.name,
                server.log.display()
            ));
            continue;
        }
        let log = server.log_tail(TAIL_LINES);
        // A port picked as free was taken by someone else meanwhile: worth another attempt.
        retry |= log.contains("address already in use");
        message.push_str(&format!(
            "\n--- last {TAIL_LINES} lines of {} ---\n{log}\n",
            server.log.display()
        ));
    }
    Failure { message, retry }
}

/// The first `panic:` or `fatal error:` in the log at `path`, with the lines around it.
fn crash_excerpt(path: &Path) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(path).ok()?).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("panic: ") || l.starts_with("fatal error: "))?;
    Some(lines[at.saturating_sub(3)..(at + 30).min(lines.len())].join("\n"))
}

/// Fails if any server has exited.
fn check_alive(servers: &mut [Server]) -> Result<(), Failure> {
    let exited: Vec<&str> = servers
        .iter_mut()
        .filter_map(|s| s.exited().then_some(s.name))
        .collect();
    if exited.is_empty() {
        Ok(())
    } else {
        Err(failure(
            servers,
            &format!("{} exited during start-up", exited.join(", ")),
        ))
    }
}

fn etcd_healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains(r#""health":"true""#)
}

async fn wait_etcd(servers: &mut [Server], port: u16) -> Result<(), Failure> {
    let deadline = Instant::now() + ETCD_TIMEOUT;
    loop {
        check_alive(servers)?;
        if etcd_healthy(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(failure(
                servers,
                &format!("etcd was not healthy within {ETCD_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ready(servers: &mut [Server], client: &kube::Client) -> Result<(), Failure> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        check_alive(servers)?;
        let last =
            match tokio::time::timeout(Duration::from_secs(2), get_text(client, "readyz")).await {
                Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
                Ok(Ok(body)) => body,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "GET /readyz took more than 2s".into(),
            };
        if Instant::now() >= deadline {
            return Err(failure(
                servers,
                &format!(
                    "kube-apiserver was not ready within {READY_TIMEOUT:?}; last /readyz: {last}"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the CRDs of `crds/portcullis.yaml` and waits until each is Established.
async fn install_crds(servers: &mut [Server], client: &kube::Client) -> Result<(), Failure> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/portcullis.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure::fatal(format!("read {}: {e}", path.display())))?;
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| Failure::fatal(format!("parse {}: {e}", path.display())))?;
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    for document in documents.into_iter().filter(|d| !d.is_null()) {
        let crd: CustomResourceDefinition = serde_json::from_value(document)
            .map_err(|e| Failure::fatal(format!("a CRD in {}: {e}", path.display())))?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(e) => return Err(failure(servers, &format!("create CRD {name}: {e}"))),
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(Failure::fatal(format!("no CRD in {}", path.display())));
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    for name in &names {
        loop {
            check_alive(servers)?;
            let established = api.get_opt(name).await.ok().flatten().is_some_and(|crd| {
                crd.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if Instant::now() >= deadline {
                return Err(failure(
                    servers,
                    &format!("CRD {name} was not Established within {SETTLE_TIMEOUT:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Waits until the controller manager's serviceaccount controller has created
/// `default/default`: the controller manager is up and talking to the API server.
async fn wait_default_service_account(
    servers: &mut [Server],
    client: &kube::Client,
) -> Result<(), Failure> {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), "default");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        check_alive(servers)?;
        if let Ok(Some(_)) = api.get_opt("default").await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(failure(
                servers,
                &format!(
                    "kube-controller-manager did not create ServiceAccount default/default \
                     within {SETTLE_TIMEOUT:?}"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
