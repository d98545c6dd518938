//! `make demo`: Portcullis against a real API server, start to finish.
//!
//! Starts etcd, kube-apiserver and kube-controller-manager on loopback (built once by
//! hack/envtest.sh), installs the CRDs, applies the example namespaces, guardrails and pipelines
//! (the clean ones and the ones that ask for too much), runs the operator until every pipeline
//! is reconciled, then prints what each stage was granted and denied, a can-i matrix that the
//! API server's own RBAC authorizer answers, and the tail of the decision log. Then it runs the
//! operator with Vault on one more pipeline, against the Vault HTTP double of the tests (not
//! Vault), and shows the policy, the role, a stage's login and its delivered credentials.
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
/// Vault. Vault here is the HTTP double the tests use (tests/support/vault): it follows Vault
/// 1.15's HTTP API for the routes Portcullis calls, checks logins with a real TokenReview and
/// keeps leases with real expiry, but it is not Vault.
async fn vault_scene(client: &Client, work: &Path) {
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    use serde_json::json;
    use support::vault::{Operation, VaultDouble, VaultDoubleConfig};

    println!();
    println!(
        "== Vault: the operator again, now with --vault-address, against the Vault HTTP double of the tests (not Vault)"
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

    let double =
        VaultDouble::start(VaultDoubleConfig::default().with_kube_client(client.clone())).await;
    println!(
        "   set up as the README says: Kubernetes auth, deploy/vault/portcullis-operator.hcl, a periodic role for the operator, a database role"
    );
    double
        .set_up_for_operator(&support::vault::OperatorSetup {
            namespace: "default",
            service_account: "portcullis",
            audience: None,
            period: "1h",
            database_roles: &["fraud-detector-features-writer"],
            database_ttl: "15m",
            database_max_ttl: "1h",
        })
        .await;
    support::restart_target(client, ns, "fraud-ingest").await;
    let pipeline: AIPipeline = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "metadata": {"name": "fraud-detector", "namespace": ns},
        "spec": {"stages": [
            {"name": "ingest", "role": "Ingestion", "vault": {
                "policies": [{"path": format!("kv/data/{ns}/fraud-detector/ingest/*"), "capabilities": ["read"]}],
                "credentials": [{
                    "name": "feature-db",
                    "path": "database/creds/fraud-detector-features-writer",
                    "ttl": "15m",
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
    Api::<AIPipeline>::namespaced(client.clone(), ns)
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
        vault: Some(controller::VaultRunConfig {
            connection: portcullis::vault::VaultConfig {
                address: double.address(),
                ca_cert: None,
                namespace: None,
                auth_mount: "kubernetes".into(),
                auth_role: "portcullis-operator".into(),
                auth_token_path: jwt_path,
                workload_auth_mount: "kubernetes".into(),
                request_timeout: Duration::from_secs(5),
            },
            state_namespace: "default".into(),
            revoke_grace: Duration::from_secs(120),
            restart_min_interval: Duration::from_secs(60),
            max_restarts_per_minute: 10,
            resync: Duration::from_secs(300),
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
    let role_name = format!("{ns}-fraud-detector-ingest");
    println!();
    println!("Vault policy {role_name}:");
    for line in double.policy(&role_name).unwrap_or_default().lines() {
        println!("   {line}");
    }
    let role = double
        .kubernetes_roles()
        .remove(&role_name)
        .expect("role written");
    println!(
        "Vault role auth/kubernetes/role/{role_name}: bound to {}/{}, token_policies {:?}, token_ttl {:?}",
        role.bound_service_account_namespaces.join(","),
        role.bound_service_account_names.join(","),
        role.token_policies,
        role.token_ttl
    );
    let jwt = support::service_account_token(client, ns, "fraud-detector-ingest").await;
    let login = double
        .anonymous_client()
        .post(
            "auth/kubernetes/login",
            &json!({"role": role_name, "jwt": jwt}),
        )
        .await
        .expect("login");
    let token = login.auth()["client_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!(
        "ServiceAccount fraud-detector-ingest logs in (a real TokenReview checks its token); its token may:"
    );
    for stage in ["ingest", "train"] {
        let path = format!("kv/data/{ns}/fraud-detector/{stage}/config");
        let yes = double.allows(&token, Operation::Read, &path);
        println!("   read {path:<55} {}", if yes { "yes" } else { "no" });
    }
    let creds = "database/creds/fraud-detector-features-writer";
    println!(
        "   read {creds:<55} {}",
        if double.allows(&token, Operation::Read, creds) {
            "yes"
        } else {
            "no (the operator reads it and delivers a Secret)"
        }
    );
    let mut keys: Vec<&String> = secret
        .data
        .as_ref()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    keys.sort();
    println!(
        "Secret {ns}/fraud-ingest-db: keys {keys:?}, lease {} expires {}; Vault holds {} active lease(s)",
        secret
            .annotations()
            .get("portcullis.dev/lease-hash")
            .cloned()
            .unwrap_or_default(),
        secret
            .annotations()
            .get("portcullis.dev/lease-expires-at")
            .cloned()
            .unwrap_or_default(),
        double.active_leases().len()
    );
    let text = std::fs::read_to_string(&audit).unwrap_or_default();
    println!("Vault actions in the decision log ({}):", audit.display());
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).expect("JSON record");
        let action = r["action"].as_str().unwrap_or_default();
        if ["policy-written", "role-written", "credential-issued"].contains(&action) {
            println!(
                "   {action:<18} {}",
                r["object"].as_str().unwrap_or_default()
            );
        }
    }
    operator.abort();
}
