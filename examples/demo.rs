//! `make demo`: Portcullis against a real API server, start to finish.
//!
//! Starts etcd, kube-apiserver and kube-controller-manager on loopback (built once by
//! hack/envtest.sh), installs the CRDs, applies the example namespaces, guardrails and pipelines
//! (the clean ones and the ones that ask for too much), runs the operator until every pipeline
//! is reconciled, then prints what each stage was granted and denied, a can-i matrix that the
//! API server's own RBAC authorizer answers, and the tail of the decision log. Then it runs the
//! operator with Vault on one more pipeline, against real OpenBao (hack/openbao.sh) with a
//! throwaway PostgreSQL behind its database engine, and shows the policy, the role, a stage's
//! login and what it may read, its delivered credentials logging into PostgreSQL, the lease
//! renewed (VALID UNTIL moves) and, once the pipeline is deleted, the role dropped.
//! Everything it started stops when it exits.
#![allow(
    clippy::too_many_lines,
    reason = "the demo is one story, told in order"
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::{AIPipeline, AccessGuardrail};
use portcullis::controller::{self, RunConfig};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn documents(path: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .expect("readable folder")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
        .flat_map(|f| {
            serde_saphyr::from_multiple::<Value>(
                &std::fs::read_to_string(f).expect("readable file"),
            )
            .expect("valid YAML")
        })
        .filter(|d| !d.is_null())
        .collect()
}

async fn apply_examples(client: &Client) -> Vec<AIPipeline> {
    for doc in documents(&root().join("examples/namespaces.yaml")) {
        let ns: Namespace = serde_json::from_value(doc).expect("a Namespace");
        let mut ns = ns;
        let name = ns.name_any();
        ns.metadata
            .labels
            .get_or_insert_default()
            .insert("kubernetes.io/metadata.name".into(), name);
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
    }
    for doc in documents(&root().join("examples/guardrails")) {
        let g: AccessGuardrail = serde_json::from_value(doc).expect("an AccessGuardrail");
        Api::<AccessGuardrail>::all(client.clone())
            .create(&PostParams::default(), &g)
            .await
            .expect("guardrail created");
    }
    let mut pipelines = Vec::new();
    for dir in ["examples/pipelines", "examples/denied"] {
        for doc in documents(&root().join(dir)) {
            let p: AIPipeline = serde_json::from_value(doc).expect("an AIPipeline");
            let api: Api<AIPipeline> =
                Api::namespaced(client.clone(), &p.namespace().expect("namespaced"));
            pipelines.push(
                api.create(&PostParams::default(), &p)
                    .await
                    .expect("pipeline created"),
            );
        }
    }
    pipelines
}

/// (verb, API group, resource, subresource, name)
type Check<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);

#[tokio::main]
async fn main() {
    let begin = Instant::now();
    println!(
        "== Starting a Kubernetes 1.36 control plane on loopback (hack/envtest.sh provides it) ..."
    );
    let cp = support::control_plane();
    let client = cp.client().await;
    println!("   up in {:.1?}; CRDs installed", cp.startup_time());

    let work = tempfile::tempdir().expect("temp dir");
    let key = work.path().join("audit.key");
    std::fs::write(&key, "demo-hmac-key-0123456789abcdef0123456789abcdef").expect("key written");
    let audit = work.path().join("decisions.log");

    println!(
        "== Applying examples/namespaces.yaml, examples/guardrails, examples/pipelines and examples/denied"
    );
    let pipelines = apply_examples(&client).await;

    println!(
        "== Running the operator (portcullis run, in this process; decision records on stdout are not shown)"
    );
    let config = RunConfig {
        audit_log: audit.clone(),
        audit_key: key.clone(),
        audit_previous_keys: Vec::new(),
        audit_segment_bytes: 64 * 1024 * 1024,
        audit_keep_segments: 0,
        metrics_addr: "127.0.0.1:0".parse().expect("address"),
        leader_election: false,
        lease_namespace: "default".into(),
        lease_name: "portcullis-leader".into(),
        identity: "demo".into(),
        concurrency: 4,
        shard: Default::default(),
        watch_namespace: None,
        echo_decisions: false,
        policy_reports: false,
        admission_policies: true,
        webhook: None,
        foreign_grants: true,
        vault: None,
        access: None,
    };
    let operator = tokio::spawn(controller::run(client.clone(), config));

    let mut reconciled = Vec::new();
    for p in &pipelines {
        let api: Api<AIPipeline> =
            Api::namespaced(client.clone(), &p.namespace().expect("namespaced"));
        let name = p.name_any();
        let live = support::wait_for(
            &format!("AIPipeline {name} to be reconciled"),
            Duration::from_secs(120),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let live = api.get(&name).await.ok()?;
                    let status = live.status.as_ref()?;
                    (status.observed_generation == live.metadata.generation
                        && !status.conditions.is_empty())
                    .then_some(live)
                }
            },
        )
        .await;
        reconciled.push(live);
    }

    println!();
    for p in &reconciled {
        let status = p.status.as_ref().expect("status");
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.as_str())
            .unwrap_or("?");
        println!(
            "AIPipeline {}/{}  Ready={ready}  denied={}",
            p.namespace().unwrap_or_default(),
            p.name_any(),
            status.denied
        );
        for stage in &status.stages {
            println!(
                "  stage {:<10} ServiceAccount {:<32} granted {:>2}  denied {:>2}",
                stage.name,
                stage.service_account.as_deref().unwrap_or("-"),
                stage.granted,
                stage.denied
            );
            for d in &stage.denied_items {
                println!("      DENY {}  [{}]", d.item, d.reason);
            }
        }
    }

    println!();
    println!("== can-i, answered by the API server's RBAC authorizer (SubjectAccessReview)");
    let checks: [Check<'_>; 6] = [
        ("get", "", "configmaps", None, Some("ingest-config")),
        ("get", "", "secrets", None, Some("fraud-train-artifacts")),
        ("list", "", "secrets", None, None),
        ("create", "", "pods", Some("exec"), None),
        ("escalate", "rbac.authorization.k8s.io", "roles", None, None),
        ("list", "", "nodes", None, None),
    ];
    let stages = ["ingest", "train", "serve"];
    println!(
        "{:<40} {}",
        "ServiceAccount fraud-detector-<stage> may",
        stages.map(|s| format!("{s:<8}")).join("")
    );
    for (verb, group, resource, sub, name) in &checks {
        let what = format!(
            "{verb} {resource}{}{}",
            sub.map(|s| format!("/{s}")).unwrap_or_default(),
            name.map(|n| format!(" {n}")).unwrap_or_default()
        );
        print!("  {what:<38} ");
        for stage in stages {
            let sa = format!("fraud-detector-{stage}");
            let namespace = if *resource == "nodes" {
                None
            } else {
                Some("ml-fraud")
            };
            let allowed = support::can_i(
                &client, "ml-fraud", &sa, verb, group, resource, *sub, *name, namespace,
            )
            .await;
            print!("{:<8}", if allowed { "yes" } else { "no" });
        }
        println!();
    }
    println!();
    println!("== The decision log ({}), last 8 records", audit.display());
    let text = std::fs::read_to_string(&audit).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(8)..] {
        let r: Value = serde_json::from_str(line).expect("JSON record");
        println!(
            "  #{:<4} {:<16} {:<22} {}",
            r["seq"],
            r["action"].as_str().unwrap_or_default(),
            format!(
                "{}/{}",
                r["pipeline"].as_str().unwrap_or_default(),
                r["stage"].as_str().unwrap_or("-")
            ),
            r["object"].as_str().unwrap_or_default()
        );
    }
    match portcullis::audit::verify(&audit, &portcullis::audit::load_key(&key).expect("key")) {
        Ok(summary) => println!("  audit verify: {} records, chain intact", summary.records),
        Err(e) => println!("  audit verify FAILED: {e}"),
    }
    operator.abort();

    vault_scene(&client, work.path()).await;

    println!();
    println!(
        "== Done in {:.1?}; stopping the control plane.",
        begin.elapsed()
    );
}

/// The Vault side: a pipeline in its own namespace, reconciled by an operator configured with
/// Vault. Vault here is real OpenBao 2.7 (from `hack/openbao.sh`), with a throwaway PostgreSQL
/// behind its database secrets engine: the credentials the operator delivers are real
/// PostgreSQL roles.
async fn vault_scene(client: &Client, work: &Path) {
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    use serde_json::json;
    use support::openbao::{OpenBao, OperatorSetup};
    use support::postgres::postgres;

    println!();
    println!(
        "== Vault: the operator again, now with --vault-address, against real OpenBao with PostgreSQL behind it"
    );
    let ns = "ml-vault-demo";
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns, "labels": {
        "portcullis.dev/tier": "ml", "kubernetes.io/metadata.name": ns}}}))
    .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace created");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "portcullis"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sa)
        .await
        .expect("operator ServiceAccount");
    let jwt_path = work.join("operator-token");
    std::fs::write(
        &jwt_path,
        support::service_account_token(client, "default", "portcullis").await,
    )
    .expect("token written");

    let pg = postgres();
    let bao = OpenBao::start().await;
    println!(
        "   OpenBao {} (bao server -dev) and PostgreSQL on 127.0.0.1:{}, up in {:.1}s and {:.1}s",
        bao.direct_address(),
        pg.port(),
        bao.startup_time().as_secs_f64(),
        pg.startup_time().as_secs_f64()
    );
    println!(
        "   set up as the README says: Kubernetes auth against this API server, the database engine, deploy/vault/portcullis-operator.hcl, a periodic role for the operator"
    );
    bao.set_up_for_operator(
        client,
        &OperatorSetup {
            namespace: "default",
            service_account: "portcullis",
            audience: None,
            period: "1h",
            database_roles: &[&format!("{ns}_fraud-detector_features-writer")],
            database_ttl: "6s",
            database_max_ttl: "1h",
        },
    )
    .await;
    support::restart_target(client, ns, "fraud-ingest", "fraud-detector-ingest").await;
    let pipeline: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "fraud-detector", "namespace": ns},
        "spec": {"stages": [
            {"name": "ingest", "role": "Ingestion", "vault": {
                "policies": [{"path": format!("kv/data/{ns}/fraud-detector/ingest/*"), "capabilities": ["read"]}],
                "credentials": [{
                    "name": "feature-db",
                    "path": format!("database/creds/{ns}_fraud-detector_features-writer"),
                    "ttl": "6s",
                    "secretName": "fraud-ingest-db",
                    "restartTargets": [{"kind": "Deployment", "name": "fraud-ingest"}],
                }],
            }},
            {"name": "train", "role": "Training", "vault": {
                "policies": [{"path": format!("kv/data/{ns}/fraud-detector/train/*"), "capabilities": ["read"]}],
            }},
        ]},
    }))
    .expect("pipeline");
    let pipelines = Api::<AIPipeline>::namespaced(client.clone(), ns);
    pipelines
        .create(&PostParams::default(), &pipeline)
        .await
        .expect("pipeline created");

    let key = work.join("audit.key");
    let audit = work.join("vault-decisions.log");
    let config = RunConfig {
        audit_log: audit.clone(),
        audit_key: key,
        audit_previous_keys: Vec::new(),
        audit_segment_bytes: 64 * 1024 * 1024,
        audit_keep_segments: 0,
        metrics_addr: "127.0.0.1:0".parse().expect("address"),
        leader_election: false,
        lease_namespace: "default".into(),
        lease_name: "portcullis-leader".into(),
        identity: "demo-vault".into(),
        concurrency: 4,
        shard: Default::default(),
        watch_namespace: Some(ns.into()),
        echo_decisions: false,
        policy_reports: false,
        admission_policies: true,
        webhook: None,
        foreign_grants: true,
        vault: Some(controller::VaultRunConfig {
            connection: portcullis::vault::VaultConfig {
                address: bao.address(),
                ca_cert: None,
                namespace: None,
                auth_mount: "kubernetes".into(),
                auth_role: "portcullis-operator".into(),
                auth_token_path: jwt_path,
                workload_auth_mount: "kubernetes".into(),
                request_timeout: Duration::from_secs(5),
                max_concurrent_requests: portcullis::vault::DEFAULT_MAX_CONCURRENT_REQUESTS,
                reserved_requests: portcullis::vault::DEFAULT_RESERVED_REQUESTS,
            },
            state_namespace: "default".into(),
            revoke_grace: Duration::from_secs(1),
            restart_min_interval: Duration::from_secs(60),
            max_restarts_per_minute: 10,
            resync: Duration::from_secs(300),
            name_prefix: portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX.into(),
        }),
        access: None,
    };
    let operator = tokio::spawn(controller::run(client.clone(), config));

    let secret = support::wait_for("the credential Secret", Duration::from_secs(60), || async {
        Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt("fraud-ingest-db")
            .await
            .ok()
            .flatten()
    })
    .await;
    let role_name = portcullis::plan::names::vault_object(
        portcullis::plan::names::DEFAULT_VAULT_NAME_PREFIX,
        ns,
        "fraud-detector",
        "ingest",
    );
    println!();
    println!("Vault policy {role_name}:");
    for line in bao.policy(&role_name).await.unwrap_or_default().lines() {
        println!("   {line}");
    }
    let role = bao.kubernetes_role(&role_name).await.expect("role written");
    println!(
        "Vault role auth/kubernetes/role/{role_name}: bound to {}/{}, token_policies {}, token_ttl {}s",
        role["bound_service_account_namespaces"],
        role["bound_service_account_names"],
        role["token_policies"],
        role["token_ttl"]
    );

    // The stage's own identity, as its pods would use it.
    let root = bao.client();
    for stage in ["ingest", "train"] {
        root.post(
            &format!("kv/data/{ns}/fraud-detector/{stage}/config"),
            &json!({"data": {"model": format!("{stage}-v1")}}),
        )
        .await
        .expect("kv write");
    }
    let jwt = support::service_account_token(client, ns, "fraud-detector-ingest").await;
    let login = bao.login(&role_name, &jwt).await;
    let token = login.auth()["client_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!(
        "ServiceAccount fraud-detector-ingest logs in to OpenBao (a real TokenReview checks its token), policies {}; reads:",
        login.auth()["token_policies"]
    );
    let as_stage = bao.anonymous_client().with_token(&token);
    let creds = &format!("database/creds/{ns}_fraud-detector_features-writer");
    for path in [
        format!("kv/data/{ns}/fraud-detector/ingest/config"),
        format!("kv/data/{ns}/fraud-detector/train/config"),
        creds.to_string(),
    ] {
        let r = as_stage.get(&path).await.expect("OpenBao answers");
        let said = match r.status {
            200 => "200 allowed".to_string(),
            403 => "403 permission denied".to_string(),
            other => format!("{other} {:?}", r.errors()),
        };
        println!("   GET {path:<55} {said}");
    }

    let field = |s: &Secret, key: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .unwrap_or_default()
    };
    let (user, password) = (field(&secret, "username"), field(&secret, "password"));
    let leases = bao.leases().await;
    println!(
        "Secret {ns}/fraud-ingest-db: username {user}, lease {} (OpenBao holds {} lease(s) under database/creds/)",
        secret
            .annotations()
            .get("portcullis.dev/lease-hash")
            .cloned()
            .unwrap_or_default(),
        leases.len()
    );
    match pg.log_in(&user, &password) {
        Ok(who) => println!("   psql with the Secret's username and password: logged in as {who}"),
        Err(e) => println!("   psql with the Secret's username and password: REFUSED: {e}"),
    }
    let before = pg.role(&user).and_then(|r| r.valid_until);
    println!(
        "   pg_roles: {user} VALID UNTIL {}",
        before.as_deref().unwrap_or("-")
    );
    // The 6 s lease is renewed in place before it runs out: same Secret, later VALID UNTIL.
    let after = support::wait_for("a renewal", Duration::from_secs(60), || async {
        pg.role(&user)
            .and_then(|r| r.valid_until)
            .filter(|v| Some(v) != before.as_ref())
    })
    .await;
    println!("   renewed by the operator: VALID UNTIL {after} (same Secret, same login)");

    // Deleting the pipeline revokes its lease: OpenBao drops the PostgreSQL role.
    pipelines
        .delete("fraud-detector", &Default::default())
        .await
        .expect("pipeline deleted");
    support::wait_for("the pipeline gone", Duration::from_secs(60), || async {
        pipelines
            .get_opt("fraud-detector")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    println!(
        "Pipeline deleted: OpenBao holds {} lease(s); pg_roles has {user}: {}; psql with the old password: {}",
        bao.leases().await.len(),
        if pg.role(&user).is_some() {
            "yes"
        } else {
            "no"
        },
        match pg.log_in(&user, &password) {
            Ok(_) => "still logs in".to_string(),
            Err(e) => format!(
                "refused ({})",
                e.rsplit("FATAL:").next().unwrap_or_default().trim()
            ),
        }
    );

    let text = std::fs::read_to_string(&audit).unwrap_or_default();
    println!("Vault actions in the decision log ({}):", audit.display());
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).expect("JSON record");
        let action = r["action"].as_str().unwrap_or_default();
        if [
            "policy-written",
            "role-written",
            "credential-issued",
            "credential-renewed",
            "credential-revoked",
        ]
        .contains(&action)
        {
            println!(
                "   {action:<18} {}",
                r["message"].as_str().unwrap_or_default()
            );
        }
    }
    operator.abort();
}
