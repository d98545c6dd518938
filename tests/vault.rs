//! The operator's Vault side against a real API server and the Vault HTTP double
//! (`tests/support/vault`, not Vault): each stage's identity logs in and reads exactly its own
//! paths, TTLs stay within the guardrail, credentials are delivered, renewed and rotated with
//! their consumers restarted (at most once per interval) and the old lease revoked after them,
//! a Vault outage degrades without losing
//! the Secret or any lease, a restart or token renewal re-issues nothing, a kill mid-rotation
//! leaks nothing, and deleting the pipeline revokes and removes everything. Every call the
//! operator makes is checked against Vault 1.15's OpenAPI document.

mod support;

use support::root;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::AIPipeline;
use serde_json::{Value, json};
use support::vault::{
    LeaseState, Operation, OperatorSetup, RevokeCause, VaultDouble, VaultDoubleConfig,
};
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

/// A namespace with the example guardrails, the double set up as the README says (Kubernetes
/// auth, the operator's policy from `deploy/vault`, its periodic role, a database role), and the
/// operator logged in with its own ServiceAccount's token.
struct Setup {
    client: Client,
    ns: String,
    ops: String,
    double: VaultDouble,
    operator: Option<Operator>,
    jwt_path: PathBuf,
    _jwt_dir: tempfile::TempDir,
    grace: &'static str,
    restart_min_interval: &'static str,
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
}

/// Leases of 6 s, renewed about every 4 s, replaced as their 30 s max TTL nears.
const FAST: Options = Options {
    period: "1h",
    db_ttl: "6s",
    db_max_ttl: "30s",
    credential_ttl: "6s",
    grace: "1s",
    restart_min_interval: "1s",
};

/// Leases that outlive the test.
const SLOW: Options = Options {
    period: "1h",
    db_ttl: "1h",
    db_max_ttl: "2h",
    credential_ttl: "1h",
    grace: "4s",
    restart_min_interval: "1s",
};

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(op) = &self.operator
        {
            eprintln!("--- operator log (tail) ---\n{}", op.log());
        }
    }
}

impl Setup {
    async fn new(name: &str, options: &Options) -> Setup {
        let (client, ns, _) = guarded_namespace(name).await;
        let ops = temp_namespace(&client, &format!("{name}-ops"), &[]).await;
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "portcullis"}})).unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), &ops)
            .create(&PostParams::default(), &sa)
            .await
            .expect("operator ServiceAccount");
        let jwt = support::service_account_token(&client, &ops, "portcullis").await;
        let jwt_dir = tempfile::tempdir().unwrap();
        let jwt_path = jwt_dir.path().join("token");
        std::fs::write(&jwt_path, jwt).unwrap();

        let double =
            VaultDouble::start(VaultDoubleConfig::default().with_kube_client(client.clone())).await;
        double
            .set_up_for_operator(&OperatorSetup {
                namespace: &ops,
                service_account: "portcullis",
                audience: None,
                period: options.period,
                database_roles: &[&db_role(&ns), &db_role_2(&ns)],
                database_ttl: options.db_ttl,
                database_max_ttl: options.db_max_ttl,
            })
            .await;
        let mut setup = Setup {
            client,
            ns,
            ops,
            double,
            operator: None,
            jwt_path,
            _jwt_dir: jwt_dir,
            grace: options.grace,
            restart_min_interval: options.restart_min_interval,
        };
        setup.start_operator(tempfile::tempdir().unwrap());
        setup
    }

    fn start_operator(&mut self, dir: tempfile::TempDir) {
        let args: Vec<String> = [
            "--vault-address",
            &self.double.address(),
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
        support::restart_target(&self.client, &self.ns, "fraud-ingest").await;
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

    fn active_leases(&self) -> BTreeSet<String> {
        self.double
            .active_leases()
            .into_iter()
            .map(|l| l.lease_id)
            .collect()
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

    fn assert_conformant(&self) {
        let violations = self.double.openapi_violations();
        assert!(
            violations.is_empty(),
            "calls outside Vault 1.15's OpenAPI document: {violations:#?}"
        );
        let (ok, out) = self.operator().verify();
        assert!(ok, "the decision log verifies: {out}");
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
        let roles = setup.double.kubernetes_roles();
        (roles.contains_key(&role("ingest")) && roles.contains_key(&role("train"))).then_some(())
    })
    .await;

    let roles = setup.double.kubernetes_roles();
    let ingest = &roles[&role("ingest")];
    assert_eq!(
        ingest.bound_service_account_names,
        [format!("{PIPELINE}-ingest")]
    );
    assert_eq!(
        ingest.bound_service_account_namespaces,
        std::slice::from_ref(ns)
    );
    assert_eq!(ingest.token_policies, [role("ingest")]);
    // The stage asked for 2h tokens; the ingestion guardrail's ceiling is 1h.
    assert_eq!(ingest.token_ttl, Duration::from_secs(3600));
    assert_eq!(ingest.token_max_ttl, Duration::from_secs(3600));
    assert!(roles[&role("train")].token_max_ttl <= Duration::from_secs(7200));

    let anonymous = setup.double.anonymous_client();
    let mut tokens = Vec::new();
    for stage in ["ingest", "train"] {
        let jwt =
            support::service_account_token(&setup.client, ns, &format!("{PIPELINE}-{stage}")).await;
        let r = anonymous
            .post(
                "auth/kubernetes/login",
                &json!({"role": role(stage), "jwt": jwt}),
            )
            .await
            .unwrap();
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
        let r = anonymous
            .post(
                "auth/kubernetes/login",
                &json!({"role": role(other), "jwt": jwt}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{stage} must not log in as {other}");
    }
    for (stage, token) in &tokens {
        for other in ["ingest", "train"] {
            let path = format!("kv/data/{ns}/{PIPELINE}/{other}/model-config");
            assert_eq!(
                setup.double.allows(token, Operation::Read, &path),
                *stage == other,
                "{stage} reading {path}"
            );
        }
        assert!(!setup.double.allows(
            token,
            Operation::Update,
            &format!("kv/data/{ns}/{PIPELINE}/{stage}/x")
        ));
        assert!(!setup.double.allows(
            token,
            Operation::Read,
            &format!("database/creds/{}", db_role(ns))
        ));
        assert!(
            !setup
                .double
                .allows(token, Operation::Update, "sys/policies/acl/anything")
        );
    }

    // Drift in Vault is reverted at the next resync; a changed spec re-writes at once.
    let hcl = setup.double.policy(&role("train")).expect("train policy");
    setup
        .double
        .put_policy(
            &role("train"),
            r#"path "*" { capabilities = ["sudo", "read"] }"#,
        )
        .unwrap();
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
        let p = setup.double.policy(&role("train"))?;
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
    let before = setup.double.requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes: Vec<_> = setup.double.requests()[before..]
        .iter()
        .filter(|(m, _, _)| m.as_str() != "GET")
        .cloned()
        .collect();
    assert!(
        writes.is_empty(),
        "steady state writes to Vault: {writes:?}"
    );

    // The train stage goes, and the ingest stage drops its credential: the train policy and
    // role are deleted, the lease is revoked, the Secret deleted.
    let lease = setup.active_leases();
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
        let gone = setup.double.policy(&role("train")).is_none()
            && !setup.double.kubernetes_roles().contains_key(&role("train"));
        gone.then_some(())
    })
    .await;
    wait_for(
        "the credential revoked and its Secret deleted",
        WAIT,
        || async {
            let done = setup.active_leases().is_empty() && setup.secret().await.is_none();
            done.then_some(())
        },
    )
    .await;
    assert!(setup.double.policy(&role("ingest")).is_some());
    let revoked = setup.double.lease(lease.iter().next().unwrap()).unwrap();
    assert_eq!(revoked.revoked_by, Some(RevokeCause::Api));
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

#[tokio::test]
async fn credentials_are_renewed_then_rotated_with_a_restart_and_the_old_lease_revoked() {
    let setup = Setup::new("vault-rotate", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    let (secret, first_hash) = setup.wait_for_secret().await;
    let data = secret.data.clone().unwrap_or_default();
    assert!(
        data.contains_key("username") && data.contains_key("password"),
        "{data:?}"
    );
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AIPipeline", PIPELINE)
    );
    let leases = setup.double.active_leases();
    assert_eq!(leases.len(), 1);
    let first = leases[0].clone();
    // Lease ids are kept where only the operator reads them, not in the pipeline's namespace.
    let text = serde_json::to_string(&secret).unwrap();
    assert!(!text.contains(&first.lease_id));
    assert_eq!(
        setup.tracked_leases().await,
        BTreeSet::from([first.lease_id.clone()])
    );

    // Renewed before it expires (the lease outlives its first 6 s).
    wait_for("a renewal", WAIT, || async {
        (setup.double.lease(&first.lease_id)?.renewals > 0).then_some(())
    })
    .await;
    assert_eq!(
        setup.double.lease(&first.lease_id).unwrap().state,
        LeaseState::Active
    );

    // Near its 14 s max TTL the lease is replaced: new Secret, target restarted, old revoked.
    let (rotated, new_hash) = wait_for("rotated credentials", WAIT, || async {
        let (s, hash) = setup.wait_for_secret().await;
        (hash != first_hash).then_some((s, hash))
    })
    .await;
    assert_ne!(rotated.data, secret.data, "new credentials");
    let restarted = wait_for("the restart target restarted", WAIT, || async {
        Setup::restarted_at(&setup.deployment().await)
    })
    .await;
    assert!(!restarted.is_empty());
    // The operator revokes the replaced lease after the grace period. The rotation happened
    // because the lease nears its max TTL (seconds away), so Vault's own expiry may come first;
    // either way the revocation is recorded and the lease is never active past its expiry.
    let old_hash = portcullis::vault::leases::lease_hash(&first.lease_id);
    let old = wait_for("the old lease revoked", WAIT, || async {
        let recorded = setup
            .records("credential-revoked")
            .iter()
            .any(|r| r["message"].as_str().is_some_and(|m| m.contains(&old_hash)));
        let l = setup.double.lease(&first.lease_id)?;
        (recorded && l.state != LeaseState::Active).then_some(l)
    })
    .await;
    assert!(
        old.revoked_by == Some(RevokeCause::Api) || old.state == LeaseState::Expired,
        "{old:?}"
    );
    assert!(old.ended_at.unwrap() <= old.expires_at);

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
    // Every lease that ended was revoked by the operator (recorded), and every live one is
    // tracked.
    let revoked = setup.records("credential-revoked");
    for l in setup
        .double
        .leases()
        .iter()
        .filter(|l| l.state != LeaseState::Active)
    {
        let hash = portcullis::vault::leases::lease_hash(&l.lease_id);
        assert!(
            revoked
                .iter()
                .any(|r| r["message"].as_str().is_some_and(|m| m.contains(&hash))),
            "lease {hash} ended without the operator revoking it: {l:?}"
        );
    }
    assert!(
        setup
            .active_leases()
            .is_subset(&setup.tracked_leases().await)
    );
    setup.assert_conformant();
}

#[tokio::test]
async fn a_vault_outage_degrades_keeps_the_secret_and_recovers_without_leaking_a_lease() {
    let setup = Setup::new("vault-outage", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    setup.double.seal();
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
    // Once its 6 s lease has run out, the credentials are no longer ready (the Secret stays).
    wait_for("CredentialsReady: False", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "CredentialsReady")? == ("False".into(), "VaultUnavailable".into()))
            .then_some(())
    })
    .await;
    assert!(setup.secret().await.is_some());

    setup.double.unseal();
    wait_for("recovered", WAIT, || async {
        let p = setup.get_pipeline().await?;
        let ok = Setup::condition(&p, "Degraded")?.0 == "False"
            && Setup::condition(&p, "CredentialsReady")?.0 == "True";
        ok.then_some(())
    })
    .await;
    // Every lease is either tracked and live, or revoked; wait out the grace period.
    let settled = wait_for("one live lease, tracked", WAIT, || async {
        let active = setup.active_leases();
        (active.len() == 1 && active == setup.tracked_leases().await).then_some(active)
    })
    .await;
    let secret = setup.secret().await.unwrap();
    let hash = secret.annotations()["portcullis.dev/lease-hash"].clone();
    let live = settled.iter().next().unwrap();
    assert_eq!(hash, portcullis::vault::leases::lease_hash(live));

    // Server errors: recorded, retried, recovered.
    let failures = setup.records("vault-failed").len();
    setup.double.fail_next(3, 500);
    wait_for("the 500s recorded", WAIT, || async {
        let new = setup.records("vault-failed");
        (new.len() > failures
            && new.iter().any(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("HTTP 500"))
            }))
        .then_some(())
    })
    .await;
    wait_for("recovered from the 500s", WAIT, || async {
        let p = setup.get_pipeline().await?;
        (Setup::condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    setup.assert_conformant();
}

#[tokio::test]
async fn a_restart_or_a_token_renewal_neither_revokes_nor_reissues_credentials() {
    let options = Options {
        period: "4s",
        ..SLOW
    };
    let mut setup = Setup::new("vault-restart", &options).await;
    setup.create(options.credential_ttl).await;
    let (secret, _) = setup.wait_for_secret().await;
    let leases = setup.active_leases();
    assert_eq!(leases.len(), 1);
    let logins = |d: &VaultDouble| {
        d.tokens()
            .into_iter()
            .filter(|t| t.path.ends_with("/login"))
            .count()
    };
    assert_eq!(logins(&setup.double), 1);

    // The 4 s periodic token is renewed (several times), and leases live on.
    wait_for("the operator's token renewed", WAIT, || async {
        let t = setup
            .double
            .tokens()
            .into_iter()
            .find(|t| t.role.as_deref() == Some("portcullis-operator"))?;
        (t.renewals >= 2).then_some(())
    })
    .await;
    assert_eq!(setup.active_leases(), leases);

    setup.kill_and_restart();
    // The restarted operator resumes the kept token: no login, no new lease, same Secret.
    wait_for("the restarted operator reconciled", WAIT, || async {
        let r = setup.operator().http_status("/readyz").await;
        (r == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(logins(&setup.double), 1, "a restart must not log in again");
    assert_eq!(
        setup.active_leases(),
        leases,
        "nothing revoked, nothing re-issued"
    );
    assert_eq!(setup.double.leases().len(), 1);
    assert_eq!(setup.secret().await.unwrap().data, secret.data);
    let operator_token = setup
        .double
        .tokens()
        .into_iter()
        .find(|t| t.role.as_deref() == Some("portcullis-operator"))
        .unwrap();
    assert_eq!(operator_token.state, LeaseState::Active);
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
        let active = setup.active_leases();
        (active.len() == 1).then_some(active)
    })
    .await;
    // A second rotation right after: new credentials at once, but the restart waits for the
    // interval, and so does the revocation of the lease its pods still use.
    move_to(&db_role(&setup.ns)).await;
    wait_for("the second rotation's credentials", WAIT, || async {
        (!setup.active_leases().is_subset(&before)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        Setup::restarted_at(&setup.deployment().await).as_deref(),
        Some(first.as_str()),
        "restarted again within the interval"
    );
    assert!(
        before.is_subset(&setup.active_leases()),
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
        || async { (setup.active_leases().len() == 1).then_some(()) },
    )
    .await;
    setup.assert_conformant();
}

#[tokio::test]
async fn an_operator_killed_mid_rotation_leaks_no_lease() {
    let mut setup = Setup::new("vault-kill", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    let (_, first_hash) = setup.wait_for_secret().await;
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
        (hash != first_hash && setup.active_leases().len() == 2).then_some(())
    })
    .await;
    setup.kill_and_restart();
    wait_for("one live lease, tracked", WAIT, || async {
        let active = setup.active_leases();
        (active.len() == 1 && active == setup.tracked_leases().await).then_some(())
    })
    .await;
    // The replaced lease was revoked, not abandoned to expire.
    let revoked: Vec<_> = setup
        .double
        .leases()
        .into_iter()
        .filter(|l| l.state != LeaseState::Active)
        .collect();
    assert!(!revoked.is_empty());
    for l in &revoked {
        assert_eq!(l.revoked_by, Some(RevokeCause::Api), "{l:?}");
    }
    setup.assert_conformant();
}

#[tokio::test]
async fn an_operator_without_vault_keeps_the_finalizer_instead_of_abandoning_leases() {
    let mut setup = Setup::new("vault-off", &SLOW).await;
    setup.create(SLOW.credential_ttl).await;
    setup.wait_for_secret().await;
    let leases = setup.active_leases();
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
        setup.active_leases(),
        leases,
        "nothing abandoned, nothing revoked"
    );
    // With Vault again, the clean-up completes.
    let mut old = setup.operator.take().expect("operator running");
    old.stop();
    let Operator { dir, .. } = old;
    setup.start_operator(dir);
    wait_for("the pipeline gone", WAIT, || async {
        setup.get_pipeline().await.is_none().then_some(())
    })
    .await;
    assert!(setup.active_leases().is_empty());
    setup.assert_conformant();
}

#[tokio::test]
async fn deleting_the_pipeline_waits_for_vault_then_revokes_and_removes_everything() {
    let setup = Setup::new("vault-delete", &FAST).await;
    setup.create(FAST.credential_ttl).await;
    setup.wait_for_secret().await;
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
    assert_eq!(
        setup
            .double
            .policies()
            .keys()
            .filter(|k| names.contains(k))
            .count(),
        2
    );

    // Vault down: the finalizer holds the deletion and the status says why.
    setup.double.seal();
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

    setup.double.unseal();
    wait_for("the pipeline gone", WAIT, || async {
        setup.get_pipeline().await.is_none().then_some(())
    })
    .await;
    assert!(
        setup.double.active_leases().is_empty(),
        "every lease revoked"
    );
    assert!(
        setup
            .double
            .leases()
            .iter()
            .all(|l| l.revoked_by == Some(RevokeCause::Api))
    );
    assert_eq!(
        setup
            .double
            .policies()
            .keys()
            .filter(|k| names.contains(k))
            .count(),
        0
    );
    assert_eq!(
        setup
            .double
            .kubernetes_roles()
            .keys()
            .filter(|k| names.contains(k))
            .count(),
        0
    );
    assert!(setup.tracked_leases().await.is_empty());
    assert!(!setup.records("credential-revoked").is_empty());
    setup.assert_conformant();
}
