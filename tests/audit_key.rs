//! `portcullis run --audit-key-secret`: with no key file, the decision log's key comes from a
//! Secret in the operator's namespace, which the operator creates when it is missing (the
//! chart's `auditLog.generateKey: operator`, for GitOps tools whose renders cannot keep a key).

mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use portcullis::cli::run::{AUDIT_KEY_SECRET_KEY, ensure_audit_key};
use support::{control_plane, temp_namespace};

#[tokio::test]
async fn a_missing_key_secret_is_created_once_and_reused_by_every_start() {
    let client = control_plane().client().await;
    let ns = temp_namespace(&client, "audit-key", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first/key");

    assert!(
        ensure_audit_key(&client, &ns, "portcullis-audit-key", &first)
            .await
            .unwrap(),
        "the Secret is created"
    );
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("portcullis-audit-key")
        .await
        .expect("the generated Secret");
    let stored = secret.data.unwrap()[AUDIT_KEY_SECRET_KEY].0.clone();
    assert_eq!(stored.len(), 64, "32 random bytes, hex");
    assert_eq!(secret.immutable, Some(true));
    let written = std::fs::read(&first).unwrap();
    assert_eq!(written, stored, "the file holds the Secret's key");
    portcullis::audit::load_key(&first).expect("a key the decision log accepts");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&first).unwrap().permissions().mode() & 0o777,
        0o400
    );

    // A new Pod (a new emptyDir): the same key, no new Secret.
    let second = dir.path().join("second/key");
    assert!(
        !ensure_audit_key(&client, &ns, "portcullis-audit-key", &second)
            .await
            .unwrap()
    );
    assert_eq!(std::fs::read(&second).unwrap(), stored);

    // A key file that exists wins: nothing is read or created.
    assert!(
        !ensure_audit_key(&client, &ns, "another-key", &second)
            .await
            .unwrap()
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt("another-key")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_key_secret_with_a_short_key_is_refused_with_the_fix() {
    let client = control_plane().client().await;
    let ns = temp_namespace(&client, "audit-key-short", &[]).await;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "short", "namespace": ns},
        "stringData": {"key": "too-short"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let error = ensure_audit_key(&client, &ns, "short", &path)
        .await
        .unwrap_err();
    assert!(
        error.contains(&format!("Secret {ns}/short")) && error.contains("at least 32 bytes"),
        "{error}"
    );
    assert!(!path.exists(), "no key file is written");
}

/// `portcullis run --audit-key-secret` with no key file: the operator makes the Secret, writes
/// the key where `--audit-key` says, and starts with it (its decision log opens with that key,
/// and /readyz answers).
#[tokio::test]
async fn the_operator_makes_its_key_at_start_and_starts_with_it() {
    use support::process::Server;

    let client = control_plane().client().await;
    let ns = temp_namespace(&client, "audit-key-run", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("keys/key");
    let log = dir.path().join("decisions.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args: Vec<String> = [
        "run",
        "--no-leader-election",
        "--watch-namespace",
        &ns,
        "--lease-namespace",
        &ns,
        "--audit-key-secret",
        "portcullis-audit-key",
        "--audit-key",
        key.to_str().unwrap(),
        "--audit-log",
        log.to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--kubeconfig",
        control_plane().kubeconfig().to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut operator = Server::spawn(
        "operator",
        dir.path(),
        std::path::Path::new(env!("CARGO_BIN_EXE_portcullis")),
        &args,
    )
    .expect("the operator starts");
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let secret = support::wait_for(
        "the operator to create its key Secret",
        support::WAIT,
        || {
            let secrets = secrets.clone();
            async move { secrets.get_opt("portcullis-audit-key").await.ok().flatten() }
        },
    )
    .await;
    let stored = secret.data.unwrap()[AUDIT_KEY_SECRET_KEY].0.clone();
    support::wait_for("the key file", support::WAIT, || {
        let key = key.clone();
        async move { std::fs::read(&key).ok().filter(|k| !k.is_empty()) }
    })
    .await;
    assert_eq!(std::fs::read(&key).unwrap(), stored);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    support::wait_for("the operator to be ready", support::WAIT, || {
        let readyz = readyz.clone();
        async move {
            std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["probe", &readyz, "--timeout", "2"])
                .output()
                .ok()
                .filter(|o| o.status.success())
        }
    })
    .await;
    operator.stop();
    assert!(
        !operator
            .log_tail(50)
            .contains("no key for the decision log"),
        "{}",
        operator.log_tail(50)
    );
}
