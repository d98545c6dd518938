//! The operator's Vault side against a real API server, real OpenBao and real PostgreSQL
//! (`tests/support/openbao`, `tests/support/postgres`): each stage's identity logs in and reads
//! exactly its own paths, TTLs stay within the guardrail, credentials are delivered (they log
//! into PostgreSQL), renewed (their `VALID UNTIL` moves) and rotated with their consumers
//! restarted (at most once per interval) and the old lease revoked after them (its role gone
//! from `pg_roles`), a Vault outage (sealed answers, 5xx, resets, a black hole from the fault
//! proxy) degrades without losing the Secret or any lease, a restart of the operator or of
//! OpenBao or a token renewal re-issues nothing, a kill mid-rotation leaks nothing, and deleting
//! the pipeline revokes and removes everything. Every call the operator makes is checked
//! against Vault 1.15's OpenAPI document and must draw no warning from OpenBao.

mod support;

use support::root;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::openbao::{OpenBao, OperatorSetup, PathFault};
use support::postgres::postgres;
use support::{Operator, guarded_namespace, temp_namespace, wait_for};

const WAIT: Duration = Duration::from_secs(60);
const PIPELINE: &str = "fraud";
/// The database roles of the pipeline: `<namespace>_<pipeline>_<name>`, the form the example
/// guardrails allow (placeholders stand between delimiters no name can hold).
fn db_role(ns: &str) -> String {
    format!("{ns}_{PIPELINE}_writer")
}
fn db_role_2(ns: &str) -> String {
    format!("{ns}_{PIPELINE}_writer-2")
}

/// A namespace with the example guardrails, OpenBao set up as the README says (Kubernetes
/// auth against the test API server, the database engine against PostgreSQL, the operator's
/// policy from `deploy/vault`, its periodic role, two database roles), and the operator logged
/// in with its own ServiceAccount's token, through the fault proxy.
struct Setup {
    client: Client,
    ns: String,
    ops: String,
    bao: OpenBao,
    operator: Option<Operator>,
    jwt_path: PathBuf,
    _jwt_dir: tempfile::TempDir,
    grace: &'static str,
    restart_min_interval: &'static str,
    resync: &'static str,
}

struct Options {
    /// The operator token's period.
    period: &'static str,
    /// The database role's default and max TTL.
    db_ttl: &'static str,
    db_max_ttl: &'static str,
    /// The credential's ttl in the pipeline.
    credential_ttl: &'static str,
    /// How long replaced credentials stay valid.
    grace: &'static str,
    /// How often one workload may be restarted.
    restart_min_interval: &'static str,
    /// OpenBao with persistent storage, so it can be restarted.
    persistent: bool,
    /// `--vault-resync`: how often policies are compared and credentials paths swept.
    resync: &'static str,
}

/// Leases of 6 s, renewed about every 4 s, replaced as their 30 s max TTL nears.
const FAST: Options = Options {
    period: "1h",
    db_ttl: "6s",
    db_max_ttl: "30s",
    credential_ttl: "6s",
    grace: "1s",
    restart_min_interval: "1s",
    persistent: false,
    resync: "5m",
};

/// Leases that outlive the test.
const SLOW: Options = Options {
    period: "1h",
    db_ttl: "1h",
    db_max_ttl: "2h",
    credential_ttl: "1h",
    grace: "4s",
    restart_min_interval: "1s",
    persistent: false,
    resync: "5m",
};

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(op) = &self.operator {
                eprintln!("--- operator log (tail) ---\n{}", op.log());
            }
            eprintln!("--- OpenBao log (tail) ---\n{}", self.bao.log_tail(30));
        }
    }
}

impl Setup {
    async fn new(name: &str, options: &Options) -> Setup {
        let (client, ns, _) = guarded_namespace(name).await;
        let ops = temp_namespace(&client, &format!("{name}-ops"), &[]).await;
        let (jwt_dir, jwt_path) = support::openbao::operator_identity(&client, &ops).await;

        let bao = if options.persistent {
            OpenBao::start_persistent().await
        } else {
            OpenBao::start().await
        };
        bao.set_up_for_operator(
            &client,
            &OperatorSetup {
                namespace: &ops,
                service_account: "portcullis",
                audience: None,
                period: options.period,
                database_roles: &[&db_role(&ns), &db_role_2(&ns)],
                database_ttl: options.db_ttl,
                database_max_ttl: options.db_max_ttl,
            },
        )
        .await;
        let mut setup = Setup {
            client,
            ns,
            ops,
            bao,
            operator: None,
            jwt_path,
            _jwt_dir: jwt_dir,
            grace: options.grace,
            restart_min_interval: options.restart_min_interval,
            resync: options.resync,
        };
        setup.start_operator(tempfile::tempdir().unwrap());
        setup
    }

    fn start_operator(&mut self, dir: tempfile::TempDir) {
        let args: Vec<String> = [
            "--vault-address",
            &self.bao.address(),
            "--vault-auth-token-path",
            &self.jwt_path.display().to_string(),
            "--vault-state-namespace",
            &self.ops,
            "--vault-request-timeout",
            "2s",
            "--credential-revoke-grace",
            self.grace,
            "--restart-min-interval",
            self.restart_min_interval,
            "--vault-resync",
            self.resync,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.operator = Some(Operator::start_with(
            "portcullis",
            &self.ns,
            None,
            dir,
            &args,
        ));
    }

    fn operator(&self) -> &Operator {
        self.operator.as_ref().expect("operator running")
    }

    /// Kills the operator (SIGKILL) and starts a new one on the same decision log.
    fn kill_and_restart(&mut self) {
        let mut old = self.operator.take().expect("operator running");
        old.kill();
        let Operator { dir, .. } = old;
        self.start_operator(dir);
    }

    fn pipeline(&self, credential_ttl: &str) -> AIPipeline {
        self.pipeline_from(credential_ttl, &db_role(&self.ns))
    }

    fn pipeline_from(&self, credential_ttl: &str, db_role: &str) -> AIPipeline {
        let ns = &self.ns;
        serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "AIPipeline",
            "metadata": {"name": PIPELINE, "namespace": ns},
            "spec": {"stages": [
                {
                    "name": "ingest",
                    "role": "Ingestion",
                    "vault": {
                        "policies": [{"path": format!("kv/data/{ns}/{PIPELINE}/ingest/*"), "capabilities": ["read"]}],
                        "tokenTTL": "2h",
                        "credentials": [{
                            "name": "feature-db",
                            "path": format!("database/creds/{db_role}"),
                            "ttl": credential_ttl,
                            "secretName": "fraud-ingest-db",
                            "restartTargets": [{"kind": "Deployment", "name": "fraud-ingest"}],
                        }],
                    },
                },
                {
                    "name": "train",
                    "role": "Training",
                    "vault": {
                        "policies": [{"path": format!("kv/data/{ns}/{PIPELINE}/train/*"), "capabilities": ["read"]}],
                    },
                },
            ]},
        }))
        .expect("pipeline")
    }

    async fn create(&self, credential_ttl: &str) {
        support::restart_target(
            &self.client,
            &self.ns,
            "fraud-ingest",
            &format!("{PIPELINE}-ingest"),
        )
        .await;
        Api::<AIPipeline>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &self.pipeline(credential_ttl))
            .await
            .expect("pipeline created");
    }

    async fn get_pipeline(&self) -> Option<AIPipeline> {
        Api::<AIPipeline>::namespaced(self.client.clone(), &self.ns)
            .get_opt(PIPELINE)
            .await
            .expect("get pipeline")
    }

    async fn secret(&self) -> Option<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .get_opt("fraud-ingest-db")
            .await
            .expect("get Secret")
    }

    async fn secret_named(&self, name: &str) -> Option<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .expect("get Secret")
    }

    /// The credential Secret's lease hash, once it is there.
    async fn wait_for_secret(&self) -> (Secret, String) {
        wait_for("the credential Secret", WAIT, || async {
            let s = self.secret().await?;
            let hash = s.annotations().get("portcullis.dev/lease-hash")?.clone();
            Some((s, hash))
        })
        .await
    }

    fn restarted_at(deployment: &Deployment) -> Option<String> {
        deployment
            .spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get("portcullis.dev/restarted-at")
            .cloned()
    }

    async fn deployment(&self) -> Deployment {
        Api::<Deployment>::namespaced(self.client.clone(), &self.ns)
            .get("fraud-ingest")
            .await
            .expect("deployment")
    }

    /// The lease ids the operator keeps in its state Secret.
    async fn tracked_leases(&self) -> BTreeSet<String> {
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.ops)
            .list(&Default::default())
            .await
            .expect("list state Secrets");
        secrets
            .items
            .iter()
            .filter(|s| s.name_any().starts_with("portcullis-vault-"))
            .filter_map(|s| s.data.as_ref()?.get("state.json").cloned())
            .flat_map(|b| {
                let v: Value = serde_json::from_slice(&b.0).expect("state JSON");
                v["leases"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|l| l["leaseId"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The live leases in OpenBao (`LIST sys/leases/lookup/database/creds/...`).
    async fn active_leases(&self) -> BTreeSet<String> {
        self.bao.leases().await
    }

    fn condition(p: &AIPipeline, type_: &str) -> Option<(String, String)> {
        p.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    }

    fn records(&self, action: &str) -> Vec<Value> {
        self.operator()
            .records()
            .into_iter()
            .filter(|r| r["action"] == action)
            .collect()
    }

    /// Whether a `credential-revoked` record names the lease `lease_id` (by its hash).
    fn revocation_recorded(&self, lease_id: &str) -> bool {
        let hash = portcullis::vault::leases::lease_hash(lease_id);
        self.records("credential-revoked")
            .iter()
            .any(|r| r["message"].as_str().is_some_and(|m| m.contains(&hash)))
    }

    fn assert_conformant(&self) {
        let problems = self.bao.operator_call_problems();
        assert!(
            problems.is_empty(),
            "calls outside Vault 1.15's OpenAPI document, or that OpenBao warned about: {problems:#?}"
        );
        let (ok, out) = self.operator().verify();
        assert!(ok, "the decision log verifies: {out}");
    }
}

/// The delivered username and password of a credential Secret.
fn credentials(secret: &Secret) -> (String, String) {
    let data = secret.data.as_ref().expect("Secret data");
    let field = |key: &str| {
        String::from_utf8(
            data.get(key)
                .unwrap_or_else(|| panic!("no {key} in {data:?}"))
                .0
                .clone(),
        )
        .expect("UTF-8")
    };
    (field("username"), field("password"))
}

/// Each stage's Vault token reads its own kv path and nothing else: not another stage's, not its
/// own for writing, not the database credentials the operator issues, not Vault's policies.
async fn assert_reads_only_its_own_paths(setup: &Setup, tokens: &[(&str, String)]) {
    let ns = &setup.ns;
    for (stage, token) in tokens {
        let as_stage = setup.bao.anonymous_client().with_token(token);
        for other in ["ingest", "train"] {
            let path = format!("kv/data/{ns}/{PIPELINE}/{other}/model-config");
            let r = as_stage.get(&path).await.unwrap();
            if *stage == other {
                assert_eq!(r.status, 200, "{stage} reads {path}: {:?}", r.errors());
                assert_eq!(r.data()["data"]["stage"], *stage);
            } else {
                assert_eq!(r.status, 403, "{stage} must not read {path}");
            }
        }
        let write = as_stage
            .post(
                &format!("kv/data/{ns}/{PIPELINE}/{stage}/x"),
                &json!({"data": {"a": "b"}}),
            )
            .await
            .unwrap();
        assert_eq!(write.status, 403, "{stage} must not write its own path");
        let creds = as_stage
            .get(&format!("database/creds/{}", db_role(ns)))
            .await
            .unwrap();
        assert_eq!(
            creds.status, 403,
            "{stage} must not issue credentials itself"
        );
        let policy = as_stage
            .post("sys/policies/acl/anything", &json!({"policy": ""}))
            .await
            .unwrap();
        assert_eq!(policy.status, 403, "{stage} must not write policies");
    }
}

#[tokio::test]
async fn each_stage_logs_in_and_reads_exactly_its_own_paths() {
    let setup = Setup::new("vault-paths", &SLOW).await;
    // The database role grants 1h leases; the credential asks for 30m: 30m it is.
    setup.create("30m").await;
    let (secret, _) = setup.wait_for_secret().await;
    let time = |key: &str| {
        chrono::DateTime::parse_from_rfc3339(&secret.annotations()[key]).expect("an RFC 3339 time")
    };
    let kept = time("portcullis.dev/lease-expires-at") - time("portcullis.dev/issued-at");
    assert!(
        kept <= chrono::Duration::minutes(30) && kept > chrono::Duration::minutes(29),
        "lease kept for {kept}"
    );
    // The delivered credentials are a real PostgreSQL login.
    let (username, password) = credentials(&secret);
    assert_eq!(
        postgres().log_in(&username, &password),
        Ok(username.clone())
    );
    assert!(
        postgres().log_in(&username, "not-the-password").is_err(),
        "PostgreSQL checks the password"
    );

    let ns = &setup.ns;
    let role = |stage: &str| {
        portcullis::plan::names::vault_object(
            portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX,
            ns,
            PIPELINE,
            stage,
        )
    };
    wait_for("both stages' roles", WAIT, || async {
        let roles = setup.bao.kubernetes_roles().await;
        (roles.contains(&role("ingest")) && roles.contains(&role("train"))).then_some(())
    })
    .await;

    let ingest = setup.bao.kubernetes_role(&role("ingest")).await.unwrap();
    assert_eq!(
        ingest["bound_service_account_names"],
        json!([format!("{PIPELINE}-ingest")])
    );
    assert_eq!(ingest["bound_service_account_namespaces"], json!([ns]));
    assert_eq!(ingest["token_policies"], json!([role("ingest")]));
    // The stage asked for 2h tokens; the ingestion guardrail's ceiling is 1h.
    assert_eq!(ingest["token_ttl"], 3600);
    assert_eq!(ingest["token_max_ttl"], 3600);
    let train = setup.bao.kubernetes_role(&role("train")).await.unwrap();
    assert!(train["token_max_ttl"].as_u64().unwrap() <= 7200);

    // Something to read at each stage's path.
    let root_client = setup.bao.client();
    for stage in ["ingest", "train"] {
        let r = root_client
            .post(
                &format!("kv/data/{ns}/{PIPELINE}/{stage}/model-config"),
                &json!({"data": {"stage": stage}}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.errors());
    }

    let mut tokens = Vec::new();
    for stage in ["ingest", "train"] {
        let jwt =
            support::service_account_token(&setup.client, ns, &format!("{PIPELINE}-{stage}")).await;
        let r = setup.bao.login(&role(stage), &jwt).await;
        assert_eq!(r.status, 200, "{stage} logs in: {:?}", r.errors());
        assert_eq!(
            r.auth()["token_policies"],
            json!([role(stage)]),
            "only its own policy, not even default"
        );
        tokens.push((
            stage,
            r.auth()["client_token"].as_str().unwrap().to_string(),
        ));
        // Another stage's role refuses this identity.
        let other = if stage == "ingest" { "train" } else { "ingest" };
        let r = setup.bao.login(&role(other), &jwt).await;
        assert!(
            (400..500).contains(&r.status),
            "{stage} must not log in as {other}: {} {:?}",
            r.status,
            r.body
        );
    }
    assert_reads_only_its_own_paths(&setup, &tokens).await;

    // Drift in Vault is reverted at the next resync; a changed spec re-writes at once.
    let hcl = setup
        .bao
        .policy(&role("train"))
        .await
        .expect("train policy");
    setup
        .bao
        .put_policy(
            &role("train"),
            r#"path "*" { capabilities = ["sudo", "read"] }"#,
        )
        .await;
    let api: Api<AIPipeline> = Api::namespaced(setup.client.clone(), ns);
    let patch = json!({"spec": {"stages": [setup.pipeline("1h").spec.stages[0], {
        "name": "train", "role": "Training",
        "vault": {"policies": [
            {"path": format!("kv/data/{ns}/{PIPELINE}/train/*"), "capabilities": ["read"]},
            {"path": format!("kv/data/{ns}/{PIPELINE}/train/features/*"), "capabilities": ["read"]},
        ]},
    }]}});
    api.patch(
        PIPELINE,
        &Default::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let rewritten = wait_for("the train policy rewritten", WAIT, || async {
        let p = setup.bao.policy(&role("train")).await?;
        p.contains("train/features/*").then_some(p)
    })
    .await;
    assert_ne!(rewritten, hcl);
    assert!(!rewritten.contains("sudo"));

    let written = setup.records("policy-written");
    assert!(written.len() >= 3, "{written:#?}");
    assert!(!setup.records("role-written").is_empty());
    // Steady state writes nothing more to Vault.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = setup.bao.faults().requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes: Vec<_> = setup.bao.faults().requests()[before..]
        .iter()
        .filter(|r| r.method != "GET" && r.method != "LIST")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        writes.is_empty(),
        "steady state writes to Vault: {writes:?}"
    );

    // The train stage goes, and the ingest stage drops its credential: the train policy and
    // role are deleted, the lease is revoked (its PostgreSQL role dropped), the Secret deleted.
    let lease = setup.active_leases().await;
    assert_eq!(lease.len(), 1);
    let mut ingest_only = setup.pipeline("30m").spec.stages[0].clone();
    ingest_only
        .vault
        .as_mut()
        .expect("ingest has Vault access")
        .credentials
        .clear();
    api.patch(
        PIPELINE,
        &Default::default(),
        &kube::api::Patch::Merge(&json!({"spec": {"stages": [ingest_only]}})),
    )
    .await
    .unwrap();
    wait_for("the train stage's Vault objects deleted", WAIT, || async {
        let gone = setup.bao.policy(&role("train")).await.is_none()
            && !setup.bao.kubernetes_roles().await.contains(&role("train"));
        gone.then_some(())
    })
    .await;
    wait_for(
        "the credential revoked and its Secret deleted",
        WAIT,
        || async {
            let done = setup.active_leases().await.is_empty() && setup.secret().await.is_none();
            done.then_some(())
        },
    )
    .await;
    assert!(setup.bao.policy(&role("ingest")).await.is_some());
    assert!(setup.revocation_recorded(lease.iter().next().unwrap()));
    assert_eq!(
        postgres().role(&username),
        None,
        "the revoked role is dropped"
    );
    assert!(postgres().log_in(&username, &password).is_err());
    let pruned: Vec<String> = setup
        .records("prune")
        .iter()
        .filter_map(|r| r["object"].as_str().map(str::to_string))
        .collect();
    for object in [
        format!("Vault policy {}", role("train")),
        format!("Vault role auth/kubernetes/role/{}", role("train")),
        format!("Secret {ns}/fraud-ingest-db"),
    ] {
        assert!(
            pruned.contains(&object),
            "no prune record for {object}: {pruned:?}"
        );
    }
    assert!(setup.tracked_leases().await.is_empty());
    setup.assert_conformant();
}

/// vaultrs is built without a crypto provider of its own, so the tree holds one rustls
/// provider: ring, which kube uses.
#[test]
fn the_tree_has_one_tls_crypto_provider() {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).expect("Cargo.lock");
    let packages: Vec<&str> = lock
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|l| l.trim_end_matches('"'))
        .collect();
    assert!(packages.contains(&"ring"), "ring is the provider");
    assert!(packages.contains(&"vaultrs"));
    for other in [
        "aws-lc-rs",
        "aws-lc-sys",
        "openssl",
        "openssl-sys",
        "native-tls",
    ] {
        assert!(
            !packages.contains(&other),
            "{other} is in Cargo.lock: a second TLS stack"
        );
    }
}

/// Policies and roles are compared with Vault when the plan changes or `--vault-resync` has
/// passed, not at every reconcile: renewals every few seconds reconcile the pipeline, yet its
/// policies are read about once per resync (Vault's load does not grow with the reconciles).
/// A policy changed by hand in Vault is put back at the next resync, with no spec change.
#[tokio::test]
async fn policies_are_compared_at_each_resync_not_each_reconcile_and_drift_is_put_back() {
    let options = Options {
        resync: "20s",
        ..FAST
    };
    let setup = Setup::new("vault-resync", &options).await;
    setup.create(FAST.credential_ttl).await;
    setup.wait_for_secret().await;
    let policy = portcullis::plan::names::vault_object(
        portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX,
        &setup.ns,
        PIPELINE,
        "train",
    );
    let planned = wait_for("the train policy", WAIT, || setup.bao.policy(&policy)).await;
    let reads = |from: usize| {
        setup.bao.faults().requests()[from..]
            .iter()
            .filter(|r| {
                r.method == "GET" && r.path.ends_with(&format!("/sys/policies/acl/{policy}"))
            })
            .count()
    };
    let renewals = || {
        setup
            .operator()
            .metric(r#"portcullis_vault_operations_total{operation="renew",result="ok"}"#)
    };
    let (from, renewed_before) = (setup.bao.faults().requests().len(), renewals().await);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (read, renewed) = (reads(from), renewals().await - renewed_before);
    println!("in 15 s with a 20 s resync: {renewed} renewals, {read} reads of the policy");
    assert!(renewed >= 2.0, "the 6 s lease is renewed every few seconds");
    assert!(
        read <= 1,
        "the policy is read once per resync, not at each of the {renewed} renewals' reconciles: {read} reads"
    );

    let written_before = setup.records("policy-written").len();
    setup
        .bao
        .put_policy(&policy, r#"path "*" { capabilities = ["sudo", "read"] }"#)
        .await;
    wait_for("the hand-edited policy put back", WAIT, || async {
        (setup.bao.policy(&policy).await? == planned).then_some(())
    })
    .await;
    let written = setup.records("policy-written");
    assert_eq!(written.len(), written_before + 1, "{written:#?}");
    let message = written.last().unwrap()["message"].as_str().unwrap();
    assert!(message.contains("changed outside Portcullis"), "{message}");
}

#[tokio::test]
async fn credentials_are_renewed_then_rotated_with_a_restart_and_the_old_lease_revoked() {
    let setup = Setup::new("vault-rotate", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    let (secret, first_hash) = setup.wait_for_secret().await;
    let (username, password) = credentials(&secret);
    assert_eq!(
        postgres().log_in(&username, &password),
        Ok(username.clone())
    );
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AIPipeline", PIPELINE)
    );
    let leases = setup.active_leases().await;
    assert_eq!(leases.len(), 1);
    let first = leases.iter().next().unwrap().clone();
    // Lease ids are kept where only the operator reads them, not in the pipeline's namespace.
    let text = serde_json::to_string(&secret).unwrap();
    assert!(!text.contains(&first));
    assert_eq!(
        setup.tracked_leases().await,
        BTreeSet::from([first.clone()])
    );

    // Renewed before it expires: OpenBao records the renewal, and PostgreSQL's VALID UNTIL
    // moves with it.
    let valid_until = postgres()
        .role(&username)
        .and_then(|r| r.valid_until)
        .expect("the role has a VALID UNTIL");
    wait_for("a renewal", WAIT, || async {
        let lease = setup.bao.lease(&first).await?;
        let renewed = !lease["last_renewal"].is_null();
        let moved = postgres()
            .role(&username)
            .and_then(|r| r.valid_until)
            .is_some_and(|v| v != valid_until);
        (renewed && moved).then_some(())
    })
    .await;
    assert_eq!(
        postgres().log_in(&username, &password),
        Ok(username.clone())
    );

    // Near its 30 s max TTL the lease is replaced: new Secret, target restarted, old revoked.
    let (rotated, new_hash) = wait_for("rotated credentials", WAIT, || async {
        let (s, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some((s, hash))
    })
    .await;
    assert_ne!(rotated.data, secret.data, "new credentials");
    let (new_user, new_password) = credentials(&rotated);
    assert_eq!(
        postgres().log_in(&new_user, &new_password),
        Ok(new_user.clone())
    );
    let restarted = wait_for("the target restarted", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    assert!(!restarted.is_empty());
    // The operator revokes the replaced lease after the grace period. The rotation happened
    // because the lease nears its max TTL (seconds away), so Vault's own expiry may come first;
    // either way the revocation is recorded and the old role is gone from PostgreSQL.
    wait_for("the old lease revoked", WAIT, || async {
        let gone = setup.bao.lease(&first).await.is_none() && postgres().role(&username).is_none();
        (setup.revocation_recorded(&first) && gone).then_some(())
    })
    .await;
    assert!(postgres().log_in(&username, &password).is_err());

    let p = setup.get_pipeline().await.unwrap();
    let creds = &p.status.as_ref().unwrap().stages[0].credentials;
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].lease_hash.as_deref(), Some(new_hash.as_str()));
    assert_eq!(Setup::condition(&p, "CredentialsReady").unwrap().0, "True");
    for action in [
        "credential-issued",
        "credential-renewed",
        "credential-rotated",
        "credential-revoked",
    ] {
        assert!(!setup.records(action).is_empty(), "no {action} record");
    }
    // Every live lease is tracked.
    assert!(
        setup
            .active_leases()
            .await
            .is_subset(&setup.tracked_leases().await)
    );
    setup.assert_conformant();
}

#[tokio::test]
async fn a_vault_outage_degrades_keeps_the_secret_and_recovers_without_leaking_a_lease() {
    let setup = Setup::new("vault-outage", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    let (username, _) = credentials(&secret);
    setup.bao.faults().seal();
    wait_for("Degraded: VaultUnavailable", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "Degraded")? == ("True".into(), "VaultUnavailable".into()))
            .then_some(())
    })
    .await;
    // The Secret delivered before the outage stays.
    let kept = setup
        .secret()
        .await
        .expect("the Secret is kept during the outage");
    assert_eq!(kept.data, secret.data);
    assert!(!setup.records("vault-failed").is_empty());
    // Once its 6 s lease has run out, the credentials are no longer ready (the Secret stays),
    // and OpenBao itself has revoked the lease: the role is gone from PostgreSQL.
    wait_for("CredentialsReady: False", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "CredentialsReady")? == ("False".into(), "VaultUnavailable".into()))
            .then_some(())
    })
    .await;
    assert!(setup.secret().await.is_some());
    wait_for("the expired role dropped", WAIT, || async {
        postgres().role(&username).is_none().then_some(())
    })
    .await;

    setup.bao.faults().unseal();
    wait_for("recovered", WAIT, || async {
        let p = setup.get_pipeline().await?;
        let ok = Setup::condition(&p, "Degraded")?.0 == "False"
            && Setup::condition(&p, "CredentialsReady")?.0 == "True";
        ok.then_some(())
    })
    .await;
    // Every lease is either tracked and live, or revoked; wait out the grace period.
    let settled = wait_for("one live lease, tracked", WAIT, || async {
        let active = setup.active_leases().await;
        (active.len() == 1 && active == setup.tracked_leases().await).then_some(active)
    })
    .await;
    let secret = setup.secret().await.unwrap();
    let hash = secret.annotations()["portcullis.dev/lease-hash"].clone();
    let live = settled.iter().next().unwrap();
    assert_eq!(hash, portcullis::vault::leases::lease_hash(live));
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));

    // Server errors, then connections closed without an answer: recorded, retried, recovered.
    for (fault, what) in [("500", "HTTP 500"), ("reset", "")] {
        let failures = setup.records("vault-failed").len();
        match fault {
            "500" => setup.bao.faults().fail_next(3, 500),
            _ => setup.bao.faults().reset_next(3),
        }
        wait_for(&format!("the {fault} faults recorded"), WAIT, || async {
            let new = setup.records("vault-failed");
            (new.len() > failures
                && new[failures..]
                    .iter()
                    .any(|r| r["message"].as_str().is_some_and(|m| m.contains(what))))
            .then_some(())
        })
        .await;
        wait_for(
            &format!("recovered from the {fault} faults"),
            WAIT,
            || async {
                let p = setup.get_pipeline().await?;
                let ok = Setup::condition(&p, "Degraded")?.0 == "False"
                    && Setup::condition(&p, "CredentialsReady")?.0 == "True";
                ok.then_some(())
            },
        )
        .await;
    }
    wait_for(
        "one live lease, tracked, after the faults",
        WAIT,
        || async {
            let active = setup.active_leases().await;
            (active.len() == 1 && active == setup.tracked_leases().await).then_some(())
        },
    )
    .await;
    setup.assert_conformant();
}

#[tokio::test]
async fn a_black_hole_longer_than_the_request_timeout_degrades_and_recovers() {
    let setup = Setup::new("vault-hole", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    setup.wait_for_secret().await;
    setup.bao.faults().black_hole(true);
    wait_for("Degraded: VaultUnavailable", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "Degraded")? == ("True".into(), "VaultUnavailable".into()))
            .then_some(())
    })
    .await;
    assert!(setup.secret().await.is_some(), "the Secret is kept");
    setup.bao.faults().black_hole(false);
    let settled = wait_for("recovered with one live lease, tracked", WAIT, || async {
        let p = setup.get_pipeline().await?;
        let ok = Setup::condition(&p, "Degraded")?.0 == "False"
            && Setup::condition(&p, "CredentialsReady")?.0 == "True";
        let active = setup.active_leases().await;
        (ok && active.len() == 1 && active == setup.tracked_leases().await).then_some(active)
    })
    .await;
    let secret = setup.secret().await.unwrap();
    assert_eq!(
        secret.annotations()["portcullis.dev/lease-hash"],
        portcullis::vault::leases::lease_hash(settled.iter().next().unwrap())
    );
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    setup.assert_conformant();
}

#[tokio::test]
async fn a_restart_or_a_token_renewal_neither_revokes_nor_reissues_credentials() {
    let options = Options {
        period: "4s",
        persistent: true,
        ..SLOW
    };
    let mut setup = Setup::new("vault-restart", &options).await;
    setup.create(options.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    let leases = setup.active_leases().await;
    assert_eq!(leases.len(), 1);
    assert_eq!(setup.bao.login_tokens("portcullis-operator").await.len(), 1);

    // The 4 s periodic token is renewed (several times), and leases live on.
    wait_for("the operator's token renewed", WAIT, || async {
        let renewals = setup
            .bao
            .faults()
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("auth/token/renew-self") && r.status == Some(200))
            .count();
        (renewals >= 2).then_some(())
    })
    .await;
    assert_eq!(setup.active_leases().await, leases);

    setup.kill_and_restart();
    // The restarted operator resumes the kept token: no login, no new lease, same Secret.
    wait_for("the restarted operator reconciled", WAIT, || async {
        let r = setup.operator().http_status("/readyz").await;
        (r == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let logins = setup.bao.login_tokens("portcullis-operator").await;
    assert_eq!(logins.len(), 1, "a restart must not log in again");
    assert_eq!(
        setup.active_leases().await,
        leases,
        "nothing revoked, nothing re-issued"
    );
    assert_eq!(setup.secret().await.unwrap().data, secret.data);

    // OpenBao itself restarts (Raft storage, unsealed again): tokens and leases survive, and
    // the operator carries on with them.
    setup.bao.restart().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        setup.bao.login_tokens("portcullis-operator").await.len(),
        1,
        "OpenBao's restart must not make the operator log in again"
    );
    assert_eq!(setup.active_leases().await, leases);
    assert_eq!(setup.secret().await.unwrap().data, secret.data);
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    let p = setup.get_pipeline().await.unwrap();
    assert_eq!(Setup::condition(&p, "CredentialsReady").unwrap().0, "True");
    setup.assert_conformant();
}

#[tokio::test]
async fn a_workload_is_restarted_at_most_once_per_interval_and_old_leases_wait_for_it() {
    let options = Options {
        restart_min_interval: "12s",
        grace: "1s",
        ..SLOW
    };
    let setup = Setup::new("vault-storm", &options).await;
    setup.create(options.credential_ttl).await;
    setup.wait_for_secret().await;
    let api: Api<AIPipeline> = Api::namespaced(setup.client.clone(), &setup.ns);
    let move_to = |role: &str| {
        let spec = setup.pipeline_from(options.credential_ttl, role).spec;
        let api = api.clone();
        async move {
            api.patch(
                PIPELINE,
                &Default::default(),
                &kube::api::Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .unwrap();
        }
    };
    // A first rotation restarts the target at once.
    move_to(&db_role_2(&setup.ns)).await;
    let first = wait_for("the first restart", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    let before = wait_for("the first replaced lease revoked", WAIT, || async {
        let active = setup.active_leases().await;
        (active.len() == 1).then_some(active)
    })
    .await;
    // A second rotation right after: new credentials at once, but the restart waits for the
    // interval, and so does the revocation of the lease its pods still use.
    move_to(&db_role(&setup.ns)).await;
    wait_for("the second rotation's credentials", WAIT, || async {
        (!setup.active_leases().await.is_subset(&before)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        Setup::restarted_at(&setup.deployment().await).as_deref(),
        Some(first.as_str()),
        "restarted again within the interval"
    );
    assert!(
        before.is_subset(&setup.active_leases().await),
        "a lease in use was revoked before its consumers restarted"
    );
    let second = wait_for("the deferred restart", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await).filter(|t| *t != first)
    })
    .await;
    let gap = chrono::DateTime::parse_from_rfc3339(&second).unwrap()
        - chrono::DateTime::parse_from_rfc3339(&first).unwrap();
    assert!(gap >= chrono::Duration::seconds(12), "restarts {gap} apart");
    wait_for(
        "the replaced lease revoked after the restart",
        WAIT,
        || async { (setup.active_leases().await.len() == 1).then_some(()) },
    )
    .await;
    setup.assert_conformant();
}

#[tokio::test]
async fn an_operator_killed_mid_rotation_leaks_no_lease() {
    let mut setup = Setup::new("vault-kill", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    let (first_secret, first_hash) = setup.wait_for_secret().await;
    let (first_user, _) = credentials(&first_secret);
    let first_leases = setup.active_leases().await;
    // The credential moves to another database role: new credentials are issued at once.
    let api: Api<AIPipeline> = Api::namespaced(setup.client.clone(), &setup.ns);
    let moved = setup.pipeline_from(SLOW.credential_ttl, &db_role_2(&setup.ns));
    api.patch(
        PIPELINE,
        &Default::default(),
        &kube::api::Patch::Merge(&json!({"spec": moved.spec})),
    )
    .await
    .unwrap();
    // Mid-rotation: new credentials issued, the old lease waiting out its grace period.
    wait_for("a rotation under way", WAIT, || async {
        let (_, hash) = setup.wait_for_secret().await;
        (hash != first_hash && setup.active_leases().await.len() == 2).then_some(())
    })
    .await;
    setup.kill_and_restart();
    wait_for("one live lease, tracked", WAIT, || async {
        let active = setup.active_leases().await;
        (active.len() == 1 && active == setup.tracked_leases().await).then_some(())
    })
    .await;
    // The replaced lease (1 h left) was revoked by the operator, not abandoned to expire: the
    // revocation is recorded and its role is gone from PostgreSQL.
    for lease in &first_leases {
        assert!(
            setup.revocation_recorded(lease),
            "{lease} revoked unrecorded"
        );
    }
    assert_eq!(postgres().role(&first_user), None);
    setup.assert_conformant();
}

#[tokio::test]
async fn an_operator_without_vault_keeps_the_finalizer_instead_of_abandoning_leases() {
    let mut setup = Setup::new("vault-off", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    let (user, _) = credentials(&secret);
    let leases = setup.active_leases().await;
    // The same operator, restarted without Vault.
    let mut old = setup.operator.take().expect("operator running");
    old.stop();
    let Operator { dir, .. } = old;
    setup.operator = Some(Operator::start_with(
        "portcullis",
        &setup.ns,
        None,
        dir,
        &[],
    ));
    Api::<AIPipeline>::namespaced(setup.client.clone(), &setup.ns)
        .delete(PIPELINE, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("Degraded: VaultNotConfigured", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "Ready")?.1 == "VaultCleanupPending"
            && Setup::condition(&p, "Degraded")? == ("True".into(), "VaultNotConfigured".into()))
            .then_some(())
    })
    .await;
    assert_eq!(
        setup.active_leases().await,
        leases,
        "nothing abandoned, nothing revoked"
    );
    assert!(postgres().role(&user).is_some());
    // With Vault again, the clean-up completes.
    let mut old = setup.operator.take().expect("operator running");
    old.stop();
    let Operator { dir, .. } = old;
    setup.start_operator(dir);
    wait_for("the pipeline gone", WAIT, || async {
        setup.get_pipeline().await.is_none().then_some(())
    })
    .await;
    assert!(setup.active_leases().await.is_empty());
    assert_eq!(postgres().role(&user), None);
    setup.assert_conformant();
}

#[tokio::test]
async fn deleting_the_pipeline_waits_for_vault_then_revokes_and_removes_everything() {
    let setup = Setup::new("vault-delete", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    let (user, _) = credentials(&secret);
    let names: Vec<String> = ["ingest", "train"]
        .iter()
        .map(|stage| {
            portcullis::plan::names::vault_object(
                portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX,
                &setup.ns,
                PIPELINE,
                stage,
            )
        })
        .collect();
    let ours = |found: Vec<String>| found.into_iter().filter(|k| names.contains(k)).count();
    assert_eq!(ours(setup.bao.list("sys/policies/acl").await), 2);

    // Vault down: the finalizer holds the deletion and the status says why.
    setup.bao.faults().seal();
    Api::<AIPipeline>::namespaced(setup.client.clone(), &setup.ns)
        .delete(PIPELINE, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("VaultCleanupPending", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "Ready")?.1 == "VaultCleanupPending").then_some(())
    })
    .await;
    assert!(setup.get_pipeline().await.is_some());

    setup.bao.faults().unseal();
    wait_for("the pipeline gone", WAIT, || async {
        setup.get_pipeline().await.is_none().then_some(())
    })
    .await;
    assert!(
        setup.active_leases().await.is_empty(),
        "every lease revoked"
    );
    assert_eq!(ours(setup.bao.list("sys/policies/acl").await), 0);
    assert_eq!(ours(setup.bao.list("auth/kubernetes/role").await), 0);
    assert!(setup.tracked_leases().await.is_empty());
    assert!(!setup.records("credential-revoked").is_empty());
    assert!(postgres().roles_starting_with(&user).is_empty());
    setup.assert_conformant();
}

/// Issue 10, hole 1: a rotation cut short between saving the new lease and writing the Secret
/// (a SIGKILL, or one failed Secret write) leaves the old credentials in the Secret while their
/// lease is retired. The Secret is put back to what it held before the rotation, as if the write
/// never happened: the operator notices that it holds another lease than the current one and
/// repairs it, so the Secret ends up with live credentials that log into PostgreSQL.
#[tokio::test]
async fn a_secret_left_with_replaced_credentials_is_repaired_before_they_are_revoked() {
    let options = Options {
        grace: "2s",
        ..SLOW
    };
    let setup = Setup::new("vault-stale", &options).await;
    setup.create(SLOW.credential_ttl).await;
    let (before, first_hash) = setup.wait_for_secret().await;
    let api: Api<AIPipeline> = Api::namespaced(setup.client.clone(), &setup.ns);
    let moved = setup.pipeline_from(SLOW.credential_ttl, &db_role_2(&setup.ns));
    api.patch(
        PIPELINE,
        &Default::default(),
        &kube::api::Patch::Merge(&json!({"spec": moved.spec})),
    )
    .await
    .unwrap();
    wait_for("the rotation", WAIT, || async {
        let (_, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some(())
    })
    .await;
    // The Secret as it was before the rotation: old data, old lease hash.
    let secrets: Api<Secret> = Api::namespaced(setup.client.clone(), &setup.ns);
    let annotations = before.annotations().clone();
    secrets
        .patch(
            "fraud-ingest-db",
            &Default::default(),
            &kube::api::Patch::Merge(&json!({
                "metadata": {"annotations": annotations},
                "data": before.data,
            })),
        )
        .await
        .expect("the Secret put back");
    // Well past the grace period, the Secret holds the current live lease again.
    let repaired = wait_for("the Secret repaired", WAIT, || async {
        let (secret, hash) = setup.wait_for_secret().await;
        let live = setup.active_leases().await;
        let current = live
            .iter()
            .any(|l| portcullis::vault::leases::lease_hash(l) == hash);
        (hash != first_hash && current).then_some(secret)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let secret = setup.secret().await.unwrap();
    assert_eq!(secret.data, repaired.data, "repaired once, then left alone");
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    let p = setup.get_pipeline().await.unwrap();
    assert_eq!(
        p.status.as_ref().unwrap().stages[0].credentials[0]
            .lease_hash
            .as_deref(),
        secret
            .annotations()
            .get("portcullis.dev/lease-hash")
            .map(String::as_str),
        "the status names the lease the Secret holds"
    );
    wait_for("one live lease, tracked", WAIT, || async {
        let active = setup.active_leases().await;
        (active.len() == 1 && active == setup.tracked_leases().await).then_some(())
    })
    .await;
    setup.assert_conformant();
}

/// Issue 10, hole 2: a lease nobody tracks (issued, then the operator died before recording it,
/// or the answer was lost) would live its engine's `default_ttl`. Here one is issued straight
/// from the credentials path, as such a lost issue leaves it: the sweep finds it under the path,
/// records and revokes it (its PostgreSQL role is dropped), and leaves the pipeline's own lease
/// alone.
#[tokio::test]
async fn a_lease_no_pipeline_recorded_is_swept_and_the_sweep_recorded() {
    let options = Options {
        grace: "2s",
        resync: "2s",
        ..SLOW
    };
    let setup = Setup::new("vault-sweep", &options).await;
    setup.create(SLOW.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    let ours = setup.active_leases().await;
    assert_eq!(ours.len(), 1);
    let stray = setup
        .bao
        .client()
        .get(&format!("database/creds/{}", db_role(&setup.ns)))
        .await
        .unwrap();
    assert_eq!(stray.status, 200, "{:?}", stray.errors());
    let stray_lease = stray.body["lease_id"].as_str().unwrap().to_string();
    let stray_user = stray.data()["username"].as_str().unwrap().to_string();
    assert!(postgres().role(&stray_user).is_some());

    wait_for("the stray lease swept", WAIT, || async {
        let gone = !setup.active_leases().await.contains(&stray_lease)
            && postgres().role(&stray_user).is_none();
        (gone && setup.revocation_recorded(&stray_lease)).then_some(())
    })
    .await;
    let record = setup
        .records("credential-revoked")
        .into_iter()
        .find(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains(&portcullis::vault::leases::lease_hash(&stray_lease)))
        })
        .unwrap();
    assert!(
        record["message"].as_str().unwrap().starts_with("sweep:"),
        "{record}"
    );
    // The pipeline's own lease stays, and still logs in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(setup.active_leases().await, ours);
    assert_eq!(setup.tracked_leases().await, ours);
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    setup.assert_conformant();
}

/// Issue 10, hole 4: the operator's token dies while it is down (an administrator revokes it),
/// and Vault revokes every lease it created: the delivered credentials no longer log in. The
/// restarted operator logs in again, looks its leases up, finds them gone, issues new
/// credentials and restarts their consumers; the status names the new lease.
#[tokio::test]
async fn a_lost_operator_token_is_noticed_on_resume_and_the_credentials_reissued() {
    let mut setup = Setup::new("vault-token", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    let (secret, first_hash) = setup.wait_for_secret().await;
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));

    let mut old = setup.operator.take().expect("operator running");
    old.kill();
    let tokens = setup.bao.login_tokens("portcullis-operator").await;
    assert_eq!(tokens.len(), 1);
    setup
        .bao
        .revoke_accessor(tokens[0]["accessor"].as_str().unwrap())
        .await;
    wait_for("the leases revoked with the token", WAIT, || async {
        (setup.active_leases().await.is_empty() && postgres().role(&user).is_none()).then_some(())
    })
    .await;
    let Operator { dir, .. } = old;
    setup.start_operator(dir);

    let (renewed, new_hash) = wait_for("new credentials", WAIT, || async {
        let (s, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some((s, hash))
    })
    .await;
    let (new_user, new_password) = credentials(&renewed);
    assert_eq!(
        postgres().log_in(&new_user, &new_password),
        Ok(new_user.clone())
    );
    wait_for("the consumer restarted", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    wait_for("the status names the new lease", WAIT, || async {
        let p = setup.get_pipeline().await?;
        let creds = &p.status.as_ref()?.stages[0].credentials;
        let ready = Setup::condition(&p, "CredentialsReady")?.0 == "True";
        (ready && creds[0].lease_hash.as_deref() == Some(new_hash.as_str())).then_some(())
    })
    .await;
    assert!(
        setup.records("vault-failed").iter().any(|r| r["message"]
            .as_str()
            .is_some_and(|m| m.contains("gone from Vault"))),
        "the lost lease is recorded"
    );
    wait_for("one live lease, tracked", WAIT, || async {
        let active = setup.active_leases().await;
        (active.len() == 1 && active == setup.tracked_leases().await).then_some(())
    })
    .await;
    assert_eq!(setup.bao.login_tokens("portcullis-operator").await.len(), 1);
    setup.assert_conformant();
}

/// Issue 10, hole 4, the other way to lose the token: its Secret is deleted while the operator is
/// down. The restarted operator logs in anew; the old token, which nobody renews any more, dies
/// at the end of its 4 s period and takes its leases with it. The operator replaces those leases
/// at once (their consumers restarted), so the Secret keeps credentials that log in.
#[tokio::test]
async fn a_lost_token_secret_gets_the_leases_it_issued_replaced() {
    let options = Options {
        period: "4s",
        grace: "1s",
        ..SLOW
    };
    let mut setup = Setup::new("vault-token-secret", &options).await;
    setup.create(options.credential_ttl).await;
    let (secret, first_hash) = setup.wait_for_secret().await;
    let (user, _) = credentials(&secret);
    let mut old = setup.operator.take().expect("operator running");
    old.kill();
    Api::<Secret>::namespaced(setup.client.clone(), &setup.ops)
        .delete("portcullis-vault-token", &DeleteParams::default())
        .await
        .expect("the token Secret deleted");
    let Operator { dir, .. } = old;
    setup.start_operator(dir);

    let (renewed, _) = wait_for("new credentials", WAIT, || async {
        let (s, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some((s, hash))
    })
    .await;
    wait_for("the old role gone", WAIT, || async {
        postgres().role(&user).is_none().then_some(())
    })
    .await;
    // Well past the old token's period: the new credentials still log in.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (new_user, new_password) = credentials(&renewed);
    assert_eq!(
        postgres().log_in(&new_user, &new_password),
        Ok(new_user.clone())
    );
    assert_eq!(setup.secret().await.unwrap().data, renewed.data);
    wait_for("the consumer restarted", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    let p = setup.get_pipeline().await.unwrap();
    assert_eq!(Setup::condition(&p, "CredentialsReady").unwrap().0, "True");
    let active = setup.active_leases().await;
    assert_eq!(active.len(), 1);
    assert_eq!(active, setup.tracked_leases().await);
    setup.assert_conformant();
}

/// Issue 10, hole 3: a writer whose copy of a pipeline's state is stale (an old leader still
/// running while a newer one has moved on) must fail rather than overwrite the newer state.
/// Here another writer, as a newer leader would, records in the state Secret a lease it issued
/// and replaced (due for revocation now). The running operator's next write (its next renewal)
/// is made on the version it read: it is refused, the operator reads the state again and acts
/// on it, revoking that lease and recording it, instead of dropping the record and leaving the
/// lease to live untracked.
#[tokio::test]
async fn a_stale_state_writer_fails_reads_again_and_acts_on_the_newer_state() {
    let setup = Setup::new("vault-stale", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    setup.wait_for_secret().await;
    assert_eq!(setup.active_leases().await.len(), 1);

    let other = setup
        .bao
        .client()
        .get(&format!("database/creds/{}", db_role(&setup.ns)))
        .await
        .unwrap();
    assert_eq!(other.status, 200, "{:?}", other.errors());
    let other_lease = other.body["lease_id"].as_str().unwrap().to_string();
    let other_user = other.data()["username"].as_str().unwrap().to_string();

    let states: Api<Secret> = Api::namespaced(setup.client.clone(), &setup.ops);
    let mut state_secret = states
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|s| s.name_any().starts_with("portcullis-vault-"))
        .expect("the pipeline's state Secret");
    let data = state_secret.data.as_mut().unwrap();
    let mut state: Value = serde_json::from_slice(&data["state.json"].0).unwrap();
    let mut replaced = state["leases"][0].clone();
    replaced["leaseId"] = json!(other_lease);
    replaced["retireAt"] = json!(chrono::Utc::now().to_rfc3339());
    replaced["restartPending"] = json!(false);
    state["leases"].as_array_mut().unwrap().push(replaced);
    data.insert(
        "state.json".into(),
        k8s_openapi::ByteString(serde_json::to_vec(&state).unwrap()),
    );
    states
        .replace(
            &state_secret.name_any(),
            &PostParams::default(),
            &state_secret,
        )
        .await
        .expect("the other writer's state written");

    wait_for("the other writer's lease revoked", WAIT, || async {
        let gone = !setup.active_leases().await.contains(&other_lease)
            && postgres().role(&other_user).is_none();
        (gone && setup.revocation_recorded(&other_lease)).then_some(())
    })
    .await;
    assert!(
        setup
            .operator()
            .full_log()
            .contains("changed since it was read"),
        "the refused write is logged"
    );
    // The pipeline's own credentials were not disturbed: its Secret's credentials log in, and
    // every live lease is tracked.
    let (secret, _) = setup.wait_for_secret().await;
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    assert!(
        setup
            .active_leases()
            .await
            .is_subset(&setup.tracked_leases().await)
    );
    setup.assert_conformant();
}

/// Issue 10, hole 5: one failing call must not block a whole pipeline. The stage's role writes
/// are refused (403) and a second credential, added with the change, comes from a path where
/// Vault never answers (a black hole past the request timeout). The first credential is still
/// renewed: long after its 6 s TTL its credentials log into PostgreSQL, and its lease's
/// renewals go on; the status names the failing credential, with its own problem, and keeps
/// the other delivered. When the faults end, the second credential is issued too.
#[tokio::test]
async fn a_refused_role_write_and_a_silent_credential_path_do_not_stop_other_renewals() {
    let setup = Setup::new("vault-isolated", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    let (secret, first_hash) = setup.wait_for_secret().await;
    let (user, password) = credentials(&secret);

    setup
        .bao
        .faults()
        .fault_path("/v1/auth/kubernetes/role/", PathFault::Fail(403));
    setup.bao.faults().fault_path(
        &format!("/v1/database/creds/{}", db_role_2(&setup.ns)),
        PathFault::BlackHole,
    );
    let mut changed = setup.pipeline(FAST.credential_ttl);
    let ingest = &mut changed.spec.stages[0];
    let vault = ingest.vault.as_mut().unwrap();
    vault.token_ttl = Some("1h".into());
    let mut second = vault.credentials[0].clone();
    second.name = "second-db".into();
    second.path = format!("database/creds/{}", db_role_2(&setup.ns));
    second.secret_name = "fraud-ingest-db-2".into();
    second.restart_targets.clear();
    vault.credentials.push(second);
    Api::<AIPipeline>::namespaced(setup.client.clone(), &setup.ns)
        .patch(
            PIPELINE,
            &Default::default(),
            &kube::api::Patch::Merge(&json!({"spec": changed.spec})),
        )
        .await
        .unwrap();

    // The second credential's problem is shown on it; the first stays delivered.
    wait_for("the second credential's problem shown", WAIT, || async {
        let p = setup.get_pipeline().await?;
        let creds = &p.status.as_ref()?.stages[0].credentials;
        let second = creds.iter().find(|c| c.name == "second-db")?;
        let first = creds.iter().find(|c| c.name == "feature-db")?;
        (second.problem.is_some() && second.lease_hash.is_none() && first.lease_hash.is_some())
            .then_some(())
    })
    .await;
    // Renewals of the first credential go on: three of its 6 s TTLs later, the same
    // credentials (or, past its 30 s max TTL, their replacement) still log in.
    let renewals_before = setup.records("credential-renewed").len();
    tokio::time::sleep(Duration::from_secs(18)).await;
    assert!(
        setup.records("credential-renewed").len() >= renewals_before + 2,
        "renewals went on while the role write and the second credential failed"
    );
    let (secret, hash) = setup.wait_for_secret().await;
    let (now_user, now_password) = credentials(&secret);
    assert_eq!(
        postgres().log_in(&now_user, &now_password),
        Ok(now_user.clone())
    );
    if hash == first_hash {
        assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    }
    let p = setup.get_pipeline().await.unwrap();
    let second = p.status.as_ref().unwrap().stages[0]
        .credentials
        .iter()
        .find(|c| c.name == "second-db")
        .cloned()
        .unwrap();
    assert!(second.lease_hash.is_none());
    assert!(
        setup.secret_named("fraud-ingest-db-2").await.is_none(),
        "no Secret for credentials never issued"
    );

    setup.bao.faults().clear_path_faults();
    wait_for("both credentials delivered", WAIT, || async {
        let p = setup.get_pipeline().await?;
        let creds = &p.status.as_ref()?.stages[0].credentials;
        (creds.len() == 2
            && creds
                .iter()
                .all(|c| c.lease_hash.is_some() && c.problem.is_none())
            && Setup::condition(&p, "CredentialsReady")?.0 == "True")
            .then_some(())
    })
    .await;
    let second = setup.secret_named("fraud-ingest-db-2").await.unwrap();
    let (u2, p2) = credentials(&second);
    assert_eq!(postgres().log_in(&u2, &p2), Ok(u2.clone()));
    assert!(
        setup
            .active_leases()
            .await
            .is_subset(&setup.tracked_leases().await)
    );
    setup.assert_conformant();
}

/// Issue 10, hole 6: the pipeline's state Secret is lost (deleted while the operator was down).
/// The operator must not silently issue new credentials next to the old, still-live lease: it
/// records the loss, issues new credentials, restarts their consumers, and one grace period
/// later the sweep revokes the old lease (its PostgreSQL role is dropped).
#[tokio::test]
async fn a_lost_state_secret_leads_to_a_recorded_reissue_a_restart_and_a_sweep() {
    let mut setup = Setup::new("vault-lost-state", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    let (first_secret, first_hash) = setup.wait_for_secret().await;
    let (first_user, _) = credentials(&first_secret);
    let first_leases = setup.active_leases().await;
    assert_eq!(first_leases.len(), 1);
    assert!(Setup::restarted_at(&setup.deployment().await).is_none());

    let states: Api<Secret> = Api::namespaced(setup.client.clone(), &setup.ops);
    let state_secret = states
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|s| s.name_any().starts_with("portcullis-vault-"))
        .expect("the pipeline's state Secret");
    let mut old = setup.operator.take().expect("operator running");
    old.kill();
    states
        .delete(&state_secret.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let support::Operator { dir, .. } = old;
    setup.start_operator(dir);

    let (secret, hash) = wait_for("new credentials", WAIT, || async {
        let (s, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some((s, hash))
    })
    .await;
    let restarted = wait_for("the consumers restarted", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    assert!(!restarted.is_empty());
    wait_for("the old lease swept", WAIT, || async {
        let gone = first_leases.iter().all(|l| setup.revocation_recorded(l))
            && postgres().role(&first_user).is_none();
        gone.then_some(())
    })
    .await;
    assert!(
        setup.records("vault-failed").iter().any(|r| r["message"]
            .as_str()
            .is_some_and(|m| m.contains("state Secret is gone"))),
        "the loss is recorded"
    );
    let (user, password) = credentials(&secret);
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    let active = setup.active_leases().await;
    assert_eq!(active, setup.tracked_leases().await);
    assert_eq!(
        hash,
        portcullis::vault::leases::lease_hash(active.iter().next().unwrap())
    );
    setup.assert_conformant();
}

/// The Events of the pipeline's Vault side, one per publication: (reason, type, note).
async fn vault_events(setup: &Setup) -> Vec<(String, String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(setup.client.clone(), &setup.ns)
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.action.as_deref() == Some("Vault"))
        // An Event published again is one Event with a series: one entry per publication.
        .flat_map(|e| {
            let times = e.series.as_ref().map_or(1, |s| s.count.max(1));
            std::iter::repeat_n(e, usize::try_from(times).unwrap_or(1))
        })
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// Issue 13: a new value of `portcullis.dev/rotate-now` rotates the pipeline's credentials at
/// once (new credentials, consumers restarted, the old lease revoked), recorded as asked for,
/// with a Normal Event; the same value again, or a restart of the operator, rotates nothing
/// more; a failing Vault call is a Warning Event, published once while it repeats.
#[tokio::test]
async fn rotate_now_rotates_once_per_value_with_events() {
    let mut setup = Setup::new("vault-rotate-now", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    let (first, first_hash) = setup.wait_for_secret().await;
    let (first_user, _) = credentials(&first);
    let first_leases = setup.active_leases().await;
    wait_for("a CredentialsIssued Event", WAIT, || async {
        vault_events(&setup)
            .await
            .iter()
            .any(|(reason, type_, _)| reason == "CredentialsIssued" && type_ == "Normal")
            .then_some(())
    })
    .await;

    let api: Api<AIPipeline> = Api::namespaced(setup.client.clone(), &setup.ns);
    let annotate = |key: &'static str, value: &'static str| {
        let api = api.clone();
        async move {
            api.patch(
                PIPELINE,
                &Default::default(),
                &kube::api::Patch::Merge(&json!({"metadata": {"annotations": {key: value}}})),
            )
            .await
            .unwrap();
        }
    };
    annotate("portcullis.dev/rotate-now", "2026-11-27-a").await;
    let (_, second_hash) = wait_for("rotated credentials", WAIT, || async {
        let (s, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some((s, hash))
    })
    .await;
    let rotated = setup.records("credential-rotated");
    assert_eq!(rotated.len(), 1, "{rotated:#?}");
    assert!(
        rotated[0]["message"]
            .as_str()
            .unwrap()
            .contains("rotation was asked for with the portcullis.dev/rotate-now annotation"),
        "{}",
        rotated[0]
    );
    wait_for("the consumers restarted", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    wait_for("the old lease revoked", WAIT, || async {
        (first_leases.iter().all(|l| setup.revocation_recorded(l))
            && postgres().role(&first_user).is_none())
        .then_some(())
    })
    .await;
    wait_for("a CredentialsRotated Event", WAIT, || async {
        vault_events(&setup)
            .await
            .iter()
            .any(|(reason, type_, note)| {
                reason == "CredentialsRotated" && type_ == "Normal" && note.contains("asked for")
            })
            .then_some(())
    })
    .await;

    // The same value again (another reconcile asked for), then a restart: nothing more.
    annotate("portcullis.dev/reconcile", "again").await;
    wait_for("the reconcile asked for recorded", WAIT, || async {
        (!setup.records("reconcile-requested").is_empty()).then_some(())
    })
    .await;
    setup.kill_and_restart();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, hash) = setup.wait_for_secret().await;
    assert_eq!(hash, second_hash, "one rotation per value");
    assert_eq!(setup.records("credential-rotated").len(), 1);

    // A failing Vault call: one Warning Event while it repeats.
    setup.bao.faults().fault_path(
        &format!("/v1/database/creds/{}", db_role(&setup.ns)),
        PathFault::Fail(500),
    );
    annotate("portcullis.dev/rotate-now", "2026-11-27-b").await;
    wait_for("a VaultFailed Event", WAIT, || async {
        vault_events(&setup)
            .await
            .iter()
            .any(|(reason, type_, _)| reason == "VaultFailed" && type_ == "Warning")
            .then_some(())
    })
    .await;
    // Several retries later, still one.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let failed: Vec<_> = vault_events(&setup)
        .await
        .into_iter()
        .filter(|(reason, _, _)| reason == "VaultFailed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    setup.bao.faults().clear_path_faults();
    wait_for("the second rotation", WAIT, || async {
        let (_, hash) = setup.wait_for_secret().await;
        (hash != second_hash).then_some(())
    })
    .await;
    // The second rotation's intent is recorded once, at its first attempt, and its outcome once
    // more, with the attempt it took; all of them say why.
    let rotated = setup.records("credential-rotated");
    assert_eq!(rotated.len(), 3, "{rotated:#?}");
    assert!(
        rotated[2]["message"]
            .as_str()
            .unwrap()
            .contains(") at attempt "),
        "{rotated:#?}"
    );
    assert!(
        rotated
            .iter()
            .all(|r| r["message"].as_str().unwrap().contains("asked for")),
        "{rotated:#?}"
    );
    setup.assert_conformant();
}

/// Issue 10, hole 8, for issues: while issuing a credential keeps failing (its credentials path
/// answers 503), every retry is a new attempt but not a new record. The intent is recorded
/// once, at the first attempt, the failure once; when the path answers again, one record says
/// the credentials were issued, at which attempt. The first decision is never lost, and the
/// log verifies.
#[tokio::test]
async fn a_failing_issue_is_recorded_once_then_counted_not_once_per_retry() {
    let setup = Setup::new("vault-issue-repeats", &SLOW).await;
    let path = format!("/v1/database/creds/{}", db_role(&setup.ns));
    setup.bao.faults().fault_path(&path, PathFault::Fail(503));
    setup.create(SLOW.credential_ttl).await;
    let failed_attempts = || async {
        setup
            .operator()
            .metric(r#"portcullis_vault_operations_total{operation="issue",result="unavailable"}"#)
            .await
    };
    wait_for("five failed attempts", Duration::from_secs(120), || async {
        (failed_attempts().await >= 5.0).then_some(())
    })
    .await;
    let refused_requests = setup
        .bao
        .faults()
        .requests()
        .iter()
        .filter(|r| r.path.starts_with(&path) && r.status == Some(503))
        .count();
    assert!(
        refused_requests >= 5,
        "each attempt reached the credentials path: {refused_requests}"
    );
    let object = format!(
        "credential ingest/feature-db (database/creds/{})",
        db_role(&setup.ns)
    );
    let about = |action: &str| -> Vec<Value> {
        setup
            .records(action)
            .into_iter()
            .filter(|r| r["object"] == object.as_str())
            .collect()
    };
    assert_eq!(
        about("credential-issued").len(),
        1,
        "the intent is recorded once, not per retry: {:#?}",
        about("credential-issued")
    );
    assert_eq!(
        about("vault-failed").len(),
        1,
        "the failure is recorded once: {:#?}",
        about("vault-failed")
    );

    setup.bao.faults().clear_path_faults();
    setup.wait_for_secret().await;
    let failed = failed_attempts().await;
    let issued = about("credential-issued");
    assert_eq!(issued.len(), 2, "the intent, then its outcome: {issued:#?}");
    assert!(
        issued[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("issuing credentials"),
        "the first decision is kept: {issued:#?}"
    );
    let outcome = issued[1]["message"].as_str().unwrap();
    assert!(
        outcome.contains(&format!("at attempt {}", failed + 1.0)),
        "the outcome counts the attempts ({failed} failed): {outcome}"
    );
    // In the log: the intent before the failure, the failure before the outcome.
    let records = setup.operator().records();
    let position = |action: &str, nth: usize| {
        records
            .iter()
            .enumerate()
            .filter(|(_, r)| r["action"] == action && r["object"] == object.as_str())
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap()
    };
    assert!(position("credential-issued", 0) < position("vault-failed", 0));
    assert!(position("vault-failed", 0) < position("credential-issued", 1));
    let (user, password) = credentials(&setup.secret().await.unwrap());
    assert_eq!(postgres().log_in(&user, &password), Ok(user.clone()));
    setup.assert_conformant();
}
