//! A real Vault-API server for the tests and the demo: OpenBao 2.7 (the `bao` binary from
//! `hack/openbao.sh`, or `BAO_BIN`/`VAULT_BIN`) on `127.0.0.1`, one per test, under the same
//! watchdog as etcd, with a fault-injecting proxy in front ([`FaultProxy`]) that the operator
//! is pointed at, and PostgreSQL behind its database secrets engine ([`super::postgres`]).
//!
//! ```ignore
//! let bao = OpenBao::start().await;                    // `bao server -dev`, in memory
//! bao.set_up_for_operator(&client, &setup).await;      // as the README's "Setting up Vault"
//! let address = bao.address();                         // the proxy: give this to the operator
//! bao.faults().seal();                                 // 503 "Vault is sealed" from now on
//! let leases = bao.leases().await;                     // LIST sys/leases/lookup/database/creds/...
//! ```
//!
//! For restarts, [`OpenBao::start_persistent`] runs a server with persistent storage (one-node
//! Raft; OpenBao 2 dropped the `file` backend), initialised and unsealed through `sys/init` and
//! `sys/unseal`; [`OpenBao::restart`] stops it and unseals it again on the same port (tokens and
//! leases survive, as in production).

pub(crate) mod client;
pub(crate) mod openapi;
pub(crate) mod proxy;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

#[allow(unused_imports)]
pub(crate) use client::{ClientError, VaultClient, VaultResponse};
#[allow(unused_imports)]
pub(crate) use proxy::{FaultProxy, PathFault, RecordedRequest};

use super::postgres::{SUPERUSER, free_port, postgres, random_hex};
use super::process::{Server, spawn_reaper};

/// How long the server may take to answer `sys/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The database connection every role uses.
pub(crate) const DB_CONNECTION: &str = "features";
/// The ServiceAccount whose token OpenBao reviews Kubernetes logins with.
const REVIEWER: &str = "openbao-token-reviewer";

/// The `bao` binary `hack/openbao.sh` provides, and how long providing it took.
pub(crate) fn bao_binary() -> &'static (PathBuf, Duration) {
    static BAO: OnceLock<Result<(PathBuf, Duration), String>> = OnceLock::new();
    let found = BAO.get_or_init(|| {
        let begin = Instant::now();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let output = Command::new("bash")
            .arg(root.join("hack/openbao.sh"))
            .current_dir(root)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("run hack/openbao.sh: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "hack/openbao.sh failed ({}); its messages are on stderr above",
                output.status
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if !path.is_file() {
            return Err(format!(
                "hack/openbao.sh printed {}, not a file",
                path.display()
            ));
        }
        Ok((path, begin.elapsed()))
    });
    match found {
        Ok(found) => found,
        Err(message) => panic!("openbao: no bao binary: {message}"),
    }
}

/// How the operator's side is set up, as the README's "Setting up Vault" says.
pub(crate) struct OperatorSetup<'a> {
    /// The operator's ServiceAccount, `namespace/name`.
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The audience its login token carries, if the role checks one.
    pub audience: Option<&'a str>,
    /// The operator token's `token_period`.
    pub period: &'a str,
    /// Database roles to create, with their default and max TTL.
    pub database_roles: &'a [&'a str],
    pub database_ttl: &'a str,
    pub database_max_ttl: &'a str,
}

/// Storage and how the server was unsealed.
enum Storage {
    /// `-dev`: in memory, unsealed, root token chosen.
    Dev,
    /// `storage "raft"` (one node): the config file and the unseal key.
    Persistent { config: PathBuf, unseal_key: String },
}

/// A running OpenBao. It stops (and its folder goes) when dropped, or when the test process
/// exits, whichever comes first.
pub(crate) struct OpenBao {
    server: Server,
    direct: SocketAddr,
    root_token: String,
    proxy: FaultProxy,
    storage: Storage,
    dir: PathBuf,
    startup: Duration,
    _tempdir: tempfile::TempDir,
}

/// Which OpenBao server [`OpenBao::launch`] starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `bao server -dev` (in-memory storage).
    Dev,
    /// Raft storage, initialised and unsealed.
    Persistent,
    /// A dev server with a `socket` audit device at the address and a `file` one.
    DevWithAudit(SocketAddr),
}

impl OpenBao {
    /// `bao server -dev` on a free loopback port (in-memory storage).
    pub(crate) async fn start() -> OpenBao {
        Self::launch(Kind::Dev).await
    }

    /// OpenBao with persistent storage (a one-node Raft cluster: OpenBao 2 has no `file`
    /// backend), initialised (one key share) and unsealed.
    pub(crate) async fn start_persistent() -> OpenBao {
        Self::launch(Kind::Persistent).await
    }

    async fn launch(kind: Kind) -> OpenBao {
        let begin = Instant::now();
        let (bao, _) = bao_binary();
        let tempdir = tempfile::Builder::new()
            .prefix("portcullis-openbao-")
            .tempdir()
            .expect("a temp dir for OpenBao");
        let dir = tempdir.path().to_path_buf();
        spawn_reaper(&dir).expect("the OpenBao folder's reaper");
        let mut stand_in = None;
        if let Kind::DevWithAudit(audit) = kind {
            std::fs::write(dir.join("audit.hcl"), audit_config(&dir, audit))
                .expect("write audit.hcl");
            stand_in = Some(StandIn::listen(audit));
        }
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port().expect("a free port");
            let direct = SocketAddr::from(([127, 0, 0, 1], port));
            let root_token = format!("root-{}", random_hex(12).expect("random"));
            let (args, config) = if kind == Kind::Persistent {
                let config = dir.join("openbao.hcl");
                std::fs::create_dir_all(dir.join("data")).expect("mkdir data");
                let cluster_port = free_port().expect("a free port");
                std::fs::write(&config, raft_config(&dir, port, cluster_port))
                    .expect("write openbao.hcl");
                (
                    vec!["server".into(), format!("-config={}", config.display())],
                    Some(config),
                )
            } else {
                let mut args = vec![
                    "server".into(),
                    "-dev".into(),
                    format!("-dev-root-token-id={root_token}"),
                    format!("-dev-listen-address={direct}"),
                    "-dev-no-store-token".into(),
                ];
                if stand_in.is_some() {
                    args.push(format!("-config={}", dir.join("audit.hcl").display()));
                }
                (args, None)
            };
            let mut server = spawn_bao(&dir, bao, &args);
            match wait_health(&mut server, direct).await {
                Ok(_) => {
                    if let Some(stand_in) = stand_in.take() {
                        std::fs::write(dir.join("audit-test-line.json"), stand_in.close())
                            .expect("keep the test line");
                    }
                    let proxy = FaultProxy::start(direct);
                    let (storage, root_token) = match config {
                        None => (Storage::Dev, root_token),
                        Some(config) => {
                            let (unseal_key, root) = init(direct).await;
                            unseal(direct, &unseal_key).await;
                            (Storage::Persistent { config, unseal_key }, root)
                        }
                    };
                    let startup = begin.elapsed();
                    eprintln!(
                        "openbao: {} at {direct} (proxy {}) up in {:.1}s; log in {}",
                        match kind {
                            Kind::Persistent => "raft storage".to_string(),
                            Kind::Dev => "dev server".to_string(),
                            Kind::DevWithAudit(audit) =>
                                format!("dev server with audit devices (socket {audit})"),
                        },
                        proxy.address(),
                        startup.as_secs_f64(),
                        server.log.display()
                    );
                    return OpenBao {
                        server,
                        direct,
                        root_token,
                        proxy,
                        storage,
                        dir,
                        startup,
                        _tempdir: tempdir,
                    };
                }
                Err(log) => {
                    let retry = log.contains("address already in use");
                    failures.push(format!("port {port}:\n{log}"));
                    server.stop();
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("openbao did not start:\n{}", failures.join("\n"));
    }

    /// Stops the server (SIGTERM) and starts it again on the same port and storage, then
    /// unseals it. Only for [`OpenBao::start_persistent`]: a dev server forgets everything.
    /// Requests meanwhile find the port closed (the proxy answers 502).
    pub(crate) async fn restart(&mut self) {
        let Storage::Persistent { config, unseal_key } = &self.storage else {
            panic!("OpenBao::restart needs persistent storage (OpenBao::start_persistent)");
        };
        self.server.stop();
        let (bao, _) = bao_binary();
        let args = vec![
            "server".to_string(),
            format!("-config={}", config.display()),
        ];
        self.server = spawn_bao(&self.dir, bao, &args);
        wait_health(&mut self.server, self.direct)
            .await
            .unwrap_or_else(|log| panic!("openbao did not come back:\n{log}"));
        unseal(self.direct, unseal_key).await;
    }

    /// The proxy's address, `http://127.0.0.1:PORT`: what the operator is given.
    pub(crate) fn address(&self) -> String {
        self.proxy.address()
    }

    /// The server's own address, past the proxy.
    pub(crate) fn direct_address(&self) -> String {
        format!("http://{}", self.direct)
    }

    /// The fault proxy in front of the server (and its request log).
    pub(crate) fn faults(&self) -> &FaultProxy {
        &self.proxy
    }

    pub(crate) fn root_token(&self) -> &str {
        &self.root_token
    }

    /// How long the start took (binary, server up, unsealed).
    pub(crate) fn startup_time(&self) -> Duration {
        self.startup
    }

    /// A client with the root token, straight to the server.
    pub(crate) fn client(&self) -> VaultClient {
        VaultClient::new(self.direct).with_token(&self.root_token)
    }

    /// A client without a token, straight to the server.
    pub(crate) fn anonymous_client(&self) -> VaultClient {
        VaultClient::new(self.direct)
    }

    /// The server's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }

    /// Kubernetes auth against the test control plane (its host, its serving certificate as CA,
    /// a reviewer token of a ServiceAccount bound to `system:auth-delegator`), the database
    /// engine against the test PostgreSQL with `setup.database_roles`, a kv-v2 engine at `kv`,
    /// the operator's policy from `deploy/vault/portcullis-operator.hcl` and a periodic role
    /// for the operator's ServiceAccount.
    pub(crate) async fn set_up_for_operator(
        &self,
        client: &kube::Client,
        setup: &OperatorSetup<'_>,
    ) {
        let cp = super::control_plane();
        let reviewer = reviewer_token(client, setup.namespace).await;
        let ca = std::fs::read_to_string(cp.dir().join("certs/apiserver.crt"))
            .expect("the API server's serving certificate");
        let policy = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/vault/portcullis-operator.hcl"),
        )
        .expect("the operator's Vault policy");
        let pg = postgres();
        let mut role = json!({
            "bound_service_account_names": [setup.service_account],
            "bound_service_account_namespaces": [setup.namespace],
            "token_policies": ["portcullis-operator"],
            "token_period": setup.period,
        });
        if let Some(audience) = setup.audience {
            role["audience"] = audience.into();
        }
        let mut writes = vec![
            (
                "sys/auth/kubernetes".to_string(),
                json!({"type": "kubernetes"}),
            ),
            (
                "auth/kubernetes/config".to_string(),
                json!({
                    "kubernetes_host": cp.server_url(),
                    "kubernetes_ca_cert": ca,
                    "token_reviewer_jwt": reviewer,
                }),
            ),
            (
                "sys/mounts/kv".to_string(),
                json!({"type": "kv", "options": {"version": "2"}}),
            ),
            (
                "sys/mounts/database".to_string(),
                json!({"type": "database"}),
            ),
            (
                format!("database/config/{DB_CONNECTION}"),
                json!({
                    "plugin_name": "postgresql-database-plugin",
                    "connection_url": pg.connection_url(),
                    "allowed_roles": "*",
                    "username": SUPERUSER,
                    "password": pg.password(),
                }),
            ),
            (
                "sys/policies/acl/portcullis-operator".to_string(),
                json!({"policy": policy}),
            ),
            ("auth/kubernetes/role/portcullis-operator".to_string(), role),
        ];
        for name in setup.database_roles {
            writes.push((
                format!("database/roles/{name}"),
                json!({
                    "db_name": DB_CONNECTION,
                    "creation_statements": [
                        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
                    ],
                    "default_ttl": setup.database_ttl,
                    "max_ttl": setup.database_max_ttl,
                }),
            ));
        }
        let root = self.client();
        for (path, body) in writes {
            let r = root.post(&path, &body).await.expect("OpenBao answers");
            assert!(r.status < 300, "{path}: {} {:?}", r.status, r.errors());
        }
    }

    /// `GET` with the root token; `None` on 404.
    async fn read(&self, path: &str) -> Option<Value> {
        let r = self.client().get(path).await.expect("OpenBao answers");
        match r.status {
            404 => None,
            200 => Some(r.data().clone()),
            other => panic!("GET {path}: {other} {:?}", r.errors()),
        }
    }

    /// `LIST` with the root token: the keys (none on 404).
    pub(crate) async fn list(&self, path: &str) -> Vec<String> {
        let r = self.client().list(path).await.expect("OpenBao answers");
        match r.status {
            404 => Vec::new(),
            200 => r.data()["keys"]
                .as_array()
                .map(|k| {
                    k.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            other => panic!("LIST {path}: {other} {:?}", r.errors()),
        }
    }

    /// The ACL policy `name`'s text.
    pub(crate) async fn policy(&self, name: &str) -> Option<String> {
        self.read(&format!("sys/policies/acl/{name}"))
            .await
            .and_then(|d| d["policy"].as_str().map(String::from))
    }

    /// Writes the ACL policy `name`, as someone editing Vault by hand would.
    pub(crate) async fn put_policy(&self, name: &str, text: &str) {
        let r = self
            .client()
            .post(
                &format!("sys/policies/acl/{name}"),
                &json!({"policy": text}),
            )
            .await
            .expect("OpenBao answers");
        assert!(r.status < 300, "write policy {name}: {:?}", r.errors());
    }

    /// The Kubernetes auth role `name` (`auth/kubernetes/role/<name>`).
    pub(crate) async fn kubernetes_role(&self, name: &str) -> Option<Value> {
        self.read(&format!("auth/kubernetes/role/{name}")).await
    }

    /// The names of the Kubernetes auth roles.
    pub(crate) async fn kubernetes_roles(&self) -> BTreeSet<String> {
        self.list("auth/kubernetes/role")
            .await
            .into_iter()
            .collect()
    }

    /// The live leases under `database/creds/`, as full lease ids
    /// (`LIST sys/leases/lookup/database/creds/<role>/`).
    pub(crate) async fn leases(&self) -> BTreeSet<String> {
        let mut leases = BTreeSet::new();
        for role in self.list("sys/leases/lookup/database/creds/").await {
            let role = role.trim_end_matches('/');
            for id in self
                .list(&format!("sys/leases/lookup/database/creds/{role}/"))
                .await
            {
                leases.insert(format!("database/creds/{role}/{id}"));
            }
        }
        leases
    }

    /// `sys/leases/lookup` of `lease_id` (`expire_time`, `last_renewal`, `ttl`, ...), or `None`
    /// once it is revoked or expired.
    pub(crate) async fn lease(&self, lease_id: &str) -> Option<Value> {
        let r = self
            .client()
            .put("sys/leases/lookup", &json!({"lease_id": lease_id}))
            .await
            .expect("OpenBao answers");
        (r.status == 200).then(|| r.data().clone())
    }

    /// Every token created by a Kubernetes login with the auth role `role`
    /// (`auth/token/lookup-accessor` of each accessor), oldest first.
    pub(crate) async fn login_tokens(&self, role: &str) -> Vec<Value> {
        let mut tokens = Vec::new();
        for accessor in self.list("auth/token/accessors").await {
            let r = self
                .client()
                .post("auth/token/lookup-accessor", &json!({"accessor": accessor}))
                .await
                .expect("OpenBao answers");
            if r.status != 200 {
                continue;
            }
            let data = r.data().clone();
            if data["path"] == "auth/kubernetes/login" && data["meta"]["role"] == role {
                tokens.push(data);
            }
        }
        tokens.sort_by_key(|t| t["creation_time"].as_i64().unwrap_or_default());
        tokens
    }

    /// Revokes the token with `accessor` (and every lease it created), as an administrator
    /// would.
    pub(crate) async fn revoke_accessor(&self, accessor: &str) {
        let r = self
            .client()
            .post("auth/token/revoke-accessor", &json!({"accessor": accessor}))
            .await
            .expect("OpenBao answers");
        assert!(r.status < 300, "revoke-accessor: {:?}", r.errors());
    }

    /// Logs ServiceAccount token `jwt` in with auth role `role`.
    pub(crate) async fn login(&self, role: &str, jwt: &str) -> VaultResponse {
        self.anonymous_client()
            .post("auth/kubernetes/login", &json!({"role": role, "jwt": jwt}))
            .await
            .expect("OpenBao answers")
    }

    /// The operator's calls (through the proxy) that are not in Vault 1.15's OpenAPI document as
    /// sent, or that OpenBao warned ignored a parameter of. (OpenBao's other warnings, such as a
    /// renewal capped at the max TTL, are answers the operator handles.)
    pub(crate) fn operator_call_problems(&self) -> Vec<String> {
        let requests = self.proxy.requests();
        let mut problems = openapi::check_requests(&openapi::Mounts::default(), &requests);
        problems.extend(
            requests
                .iter()
                .filter(|r| r.warnings.iter().any(|w| w.contains("ignored")))
                .map(|r| format!("{} {}: OpenBao warned {:?}", r.method, r.path, r.warnings)),
        );
        problems
    }
}

/// `bao args...` under the watchdog; stopped by Drop, or once the test process is gone.
fn spawn_bao(dir: &Path, bao: &Path, args: &[String]) -> Server {
    Server::spawn("openbao", dir, bao, args).expect("start bao")
}

/// A one-node Raft cluster's configuration (OpenBao 2 dropped the `file` backend; Raft is its
/// persistent storage), on `port` and `port`'s cluster port `cluster_port`.
fn raft_config(dir: &Path, port: u16, cluster_port: u16) -> String {
    format!(
        r#"storage "raft" {{
  path    = "{data}"
  node_id = "portcullis-test"
}}
listener "tcp" {{
  address         = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable     = true
}}
api_addr     = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"#,
        data = dir.join("data").display()
    )
}

/// Waits until `sys/health` answers at all (200 unsealed, 501 uninitialised, 503 sealed).
async fn wait_health(server: &mut Server, addr: SocketAddr) -> Result<u16, String> {
    let client = VaultClient::new(addr).with_timeout(Duration::from_secs(2));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if server.exited() {
            return Err(server.log_tail(30));
        }
        if let Ok(r) = client.get("sys/health").await
            && matches!(r.status, 200 | 501 | 503)
        {
            return Ok(r.status);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no answer from sys/health within {READY_TIMEOUT:?}\n{}",
                server.log_tail(30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `sys/init` with one key share: (the unseal key, the root token).
async fn init(addr: SocketAddr) -> (String, String) {
    let r = VaultClient::new(addr)
        .put(
            "sys/init",
            &json!({"secret_shares": 1, "secret_threshold": 1}),
        )
        .await
        .expect("sys/init answers");
    assert_eq!(r.status, 200, "sys/init: {:?}", r.errors());
    (
        r.body["keys"][0]
            .as_str()
            .expect("an unseal key")
            .to_string(),
        r.body["root_token"]
            .as_str()
            .expect("a root token")
            .to_string(),
    )
}

/// `sys/unseal` with `key`, then waits until `sys/health` says active and unsealed.
async fn unseal(addr: SocketAddr, key: &str) {
    let client = VaultClient::new(addr);
    let r = client
        .put("sys/unseal", &json!({"key": key}))
        .await
        .expect("sys/unseal answers");
    assert_eq!(r.status, 200, "sys/unseal: {:?}", r.errors());
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if client
            .get("sys/health")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "OpenBao did not become active after unsealing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A token of ServiceAccount `ns/openbao-token-reviewer`, bound to `system:auth-delegator`
/// (it may create TokenReviews): OpenBao's `token_reviewer_jwt`.
async fn reviewer_token(client: &kube::Client, ns: &str) -> String {
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": REVIEWER}})).expect("sa");
    match Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.is_already_exists() => {}
        Err(e) => panic!("create ServiceAccount {ns}/{REVIEWER}: {e}"),
    }
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{REVIEWER}-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": [{"kind": "ServiceAccount", "name": REVIEWER, "namespace": ns}],
    }))
    .expect("binding");
    match Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.is_already_exists() => {}
        Err(e) => panic!("create ClusterRoleBinding {REVIEWER}-{ns}: {e}"),
    }
    super::service_account_token_with(client, ns, REVIEWER, &[], 6 * 3600).await
}

/// The operator's own ServiceAccount, `portcullis` in `ops`, and a file holding a token of it:
/// what `--vault-auth-token-path` points the operator at. The file's folder is removed when the
/// returned directory is dropped.
pub(crate) async fn operator_identity(
    client: &kube::Client,
    ops: &str,
) -> (tempfile::TempDir, PathBuf) {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "portcullis"}}))
        .expect("a ServiceAccount");
    Api::<ServiceAccount>::namespaced(client.clone(), ops)
        .create(&PostParams::default(), &sa)
        .await
        .expect("operator ServiceAccount");
    let jwt = super::service_account_token(client, ops, "portcullis").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("token");
    std::fs::write(&path, jwt).expect("token written");
    (dir, path)
}

/// OpenBao with audit devices, for runtime access records.
impl OpenBao {
    /// `bao server -dev` (as [`OpenBao::start`]) with two audit devices declared in a `-config`
    /// file next to `-dev` (OpenBao 2.x refuses to enable them through the API): a `socket`
    /// device named `portcullis` that sends every entry, one JSON line each, over TCP to
    /// `audit` (the operator's `--vault-audit-addr`), and a `file` device
    /// ([`OpenBao::file_audit_log`]).
    ///
    /// What OpenBao does, measured: it refuses to start unless something accepts the socket
    /// device's test entry (`sys/audit/test`), so while it starts a stand-in listens at `audit`
    /// and keeps that line ([`OpenBao::audit_test_line`]); the stand-in is closed before this
    /// returns, and the operator may listen there from then on. With no device able to write,
    /// OpenBao answers every request with a 500; the `file` device keeps it serving while
    /// nothing listens at `audit`. The socket device connects again at its next entry after
    /// the connection is lost (the entry in flight is lost with it).
    pub(crate) async fn start_with_audit_socket(audit: SocketAddr) -> OpenBao {
        Self::launch(Kind::DevWithAudit(audit)).await
    }

    /// The socket device's first entry, sent while the server started (to the stand-in of
    /// [`OpenBao::start_with_audit_socket`]); empty for other servers.
    pub(crate) fn audit_test_line(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit-test-line.json")).unwrap_or_default()
    }

    /// The `file` audit device's output (JSON lines) of [`OpenBao::start_with_audit_socket`].
    pub(crate) fn file_audit_log(&self) -> PathBuf {
        self.dir.join("file-audit.log")
    }
}

/// The audit devices of [`OpenBao::start_with_audit_socket`].
fn audit_config(dir: &Path, audit: SocketAddr) -> String {
    format!(
        r#"audit "file" "local" {{
  options {{
    file_path = "{file}"
  }}
}}
audit "socket" "portcullis" {{
  options {{
    address     = "{audit}"
    socket_type = "tcp"
  }}
}}
"#,
        file = dir.join("file-audit.log").display()
    )
}

/// A listener that takes OpenBao's start-up test entry in the operator's place.
struct StandIn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<String>,
}

impl StandIn {
    fn listen(address: SocketAddr) -> StandIn {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(address)
            .unwrap_or_else(|e| panic!("the audit stand-in cannot listen on {address}: {e}"));
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut received = Vec::new();
            let mut connections = Vec::new();
            while !stopped.load(Ordering::Acquire) {
                if let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true).expect("non-blocking");
                    connections.push(stream);
                }
                for c in &mut connections {
                    let mut buf = [0u8; 65536];
                    if let Ok(n) = c.read(&mut buf) {
                        received.extend_from_slice(&buf[..n]);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            String::from_utf8_lossy(&received).into_owned()
        });
        StandIn { stop, thread }
    }

    /// Closes the listener and its connections: what was received.
    fn close(self) -> String {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().expect("the audit stand-in")
    }
}
