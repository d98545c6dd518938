//! The Vault HTTP double (`tests/support/vault`): its routes against Vault 1.15's OpenAPI
//! document, policy parsing and enforcement, Kubernetes login with a real TokenReview, tokens and
//! leases with real expiry, kv-v2, and fault injection.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom, as the user would go"
)]

mod support;
use support::vault;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::{control_plane, service_account_token, temp_namespace};
use vault::acl::{Acl, Operation};
use vault::hcl;
use vault::{
    ClientError, LeaseState, Mounts, RevokeCause, VaultClient, VaultDouble, VaultDoubleConfig,
    VaultResponse,
};

async fn start() -> VaultDouble {
    VaultDouble::start(VaultDoubleConfig::default()).await
}

/// Sends and unwraps the transport result.
async fn call(
    client: &VaultClient,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> VaultResponse {
    client
        .send(method, path, body.as_ref())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[track_caller]
fn expect(response: &VaultResponse, status: u16) {
    assert_eq!(
        response.status, status,
        "expected {status}, got {} with {}",
        response.status, response.body
    );
}

#[track_caller]
fn assert_conforms(double: &VaultDouble) {
    let violations = double.openapi_violations();
    assert!(
        violations.is_empty(),
        "requests not in the OpenAPI document:\n{violations:#?}"
    );
}

/// A token created by root with `policies` and `ttl`.
async fn token_with(double: &VaultDouble, policies: &[&str], ttl: &str) -> String {
    let r = call(
        &double.client(),
        "POST",
        "auth/token/create",
        Some(json!({ "policies": if policies.is_empty() { &["default"] } else { policies }, "ttl": ttl })),
    )
    .await;
    expect(&r, 200);
    r.auth()["client_token"]
        .as_str()
        .expect("a client_token")
        .to_string()
}

async fn put_policy(double: &VaultDouble, name: &str, text: &str) {
    let r = call(
        &double.client(),
        "PUT",
        &format!("sys/policies/acl/{name}"),
        Some(json!({ "policy": text })),
    )
    .await;
    expect(&r, 204);
}

/// Calls `f` every 100 ms until it is true; panics after `timeout`.
async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document

#[test]
fn every_route_exists_in_the_openapi_document_with_its_method_and_fields() {
    let problems = vault::check_route_table();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(vault::ROUTES.len() >= 30);
    // And through the request-level checker, with the default mounts substituted.
    for route in vault::ROUTES {
        let path = route
            .path
            .replace("{kubernetes_mount_path}", "kubernetes")
            .replace("{database_mount_path}", "database")
            .replace("{kv_v2_mount_path}", "kv")
            .replace("{name}", "x")
            .replace("{path}", "a/b")
            .replace("{url_lease_id}", "database/creds/x/abc");
        vault::openapi_check(route.method, &format!("/v1{path}"), route.fields)
            .unwrap_or_else(|e| panic!("{} {}: {e}", route.method, route.path));
    }
}

#[test]
fn the_route_table_in_the_module_docs_lists_every_route() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/vault/mod.rs"
    ))
    .expect("read mod.rs");
    let rows: Vec<&str> = source
        .lines()
        .filter(|l| {
            l.starts_with("//! | ") && !l.starts_with("//! | method") && !l.starts_with("//! |---")
        })
        .collect();
    assert_eq!(rows.len(), vault::ROUTES.len(), "{rows:#?}");
    for route in vault::ROUTES {
        let fields = if route.fields.is_empty() {
            String::new()
        } else {
            format!(" {}", route.fields.join(", "))
        };
        let row = format!("//! | {} | `{}` |{fields} |", route.method, route.path);
        assert!(
            rows.iter().any(|r| r.starts_with(&row)),
            "no doc row starting with {row:?}"
        );
    }
}

#[test]
fn openapi_check_accepts_documented_calls_and_explains_the_rest() {
    let ok: &[(&str, &str, &[&str])] = &[
        ("LIST", "/v1/sys/policies/acl", &[]),
        ("GET", "/v1/sys/policies/acl?list=true", &[]),
        ("PUT", "/v1/sys/policies/acl/reader", &["policy"]),
        ("POST", "sys/leases/renew", &["lease_id", "increment"]),
        ("PUT", "/v1/sys/leases/revoke", &["lease_id"]),
        ("POST", "/v1/sys/leases/lookup", &["lease_id"]),
        ("POST", "/v1/auth/kubernetes/login", &["role", "jwt"]),
        (
            "POST",
            "/v1/auth/kubernetes/role/r",
            &["bound_service_account_names", "token_ttl"],
        ),
        (
            "POST",
            "/v1/auth/token/create",
            &["policies", "ttl", "period", "no_parent"],
        ),
        ("GET", "/v1/database/creds/reader", &[]),
        ("GET", "/v1/kv/data/a/b/c", &[]),
        ("POST", "/v1/kv/data/a/b/c", &["data", "options"]),
        ("LIST", "/v1/kv/metadata/a/b", &[]),
        ("LIST", "/v1/kv/metadata/", &[]),
        ("GET", "/v1/sys/health", &[]),
    ];
    for (method, path, fields) in ok {
        vault::openapi_check(method, path, *fields)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }
    let bad: &[(&str, &str, &[&str], &str)] = &[
        ("POST", "/v1/database/creds/reader", &[], "has no post"),
        (
            "PUT",
            "/v1/sys/policies/acl/reader",
            &["rules"],
            "does not declare",
        ),
        ("GET", "/v1/sys/policies/acl/", &[], "is a LIST"),
        ("LIST", "/v1/kv/data/a", &[], "is not a LIST"),
        ("GET", "/v1/kv/nothing/here", &[], "no such path"),
        ("GET", "/v1/nope/x", &[], "no mount"),
        (
            "POST",
            "/v1/auth/kubernetes/role/r",
            &["bound_service_account_namespace_selector"],
            "does not declare",
        ),
        ("GET", "/v1/sys/leases/renew", &[], "has no get"),
        ("DELETE", "/v1/auth/token/lookup-self", &[], "has no delete"),
        ("HEAD", "/v1/sys/health", &[], "not a method"),
    ];
    for (method, path, fields, expected) in bad {
        let e = vault::openapi_check(method, path, *fields)
            .err()
            .unwrap_or_else(|| panic!("{method} {path} {fields:?} should not conform"));
        assert!(e.contains(expected), "{method} {path}: {e}");
    }
    // A Kubernetes auth method mounted elsewhere.
    let mounts = Mounts::default().auth("k8s-workloads", "kubernetes");
    vault::openapi_check_with(
        &mounts,
        "POST",
        "/v1/auth/k8s-workloads/login",
        ["role", "jwt"],
    )
    .expect("a login on another mount");
}

// ---------------------------------------------------------------------------------------------
// Policies

const READER: &str = r#"
# Stage policy.
path "kv/data/a/*" {
  capabilities = ["read"] // read only
}
"#;

#[tokio::test]
async fn policies_are_written_read_listed_deleted_and_parsed_as_hcl() {
    let double = start().await;
    let root = double.client();

    let r = call(&root, "LIST", "sys/policies/acl", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["keys"], json!(["default", "root"]));
    assert_eq!(r.data()["policies"], r.data()["keys"]);

    put_policy(&double, "Reader", READER).await;
    let r = call(&root, "GET", "sys/policies/acl/reader", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["name"], "reader");
    assert_eq!(r.data()["policy"], READER);
    let r = call(&root, "GET", "sys/policies/acl?list=true", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["keys"], json!(["default", "reader", "root"]));
    let parsed = double.parsed_policy("reader").expect("stored");
    assert_eq!(parsed.paths[0].path, "kv/data/a/");
    assert!(parsed.paths[0].is_prefix);

    let rejected = [
        (
            r#"path "kv/*" { capabilities = ["read" }"#,
            "error parsing list",
        ),
        (
            r#"path "kv/*" { capabilities = ["reed"] }"#,
            r#"invalid capability "reed""#,
        ),
        (
            "path \"kv/*\" {\n  capabilitie = [\"read\"]\n}",
            r#"invalid key "capabilitie" on line 2"#,
        ),
        (
            r#"paths "kv/*" { capabilities = ["read"] }"#,
            r#"invalid key "paths""#,
        ),
        (
            r#"path "kv/+*" { capabilities = ["read"] }"#,
            "'+*' is forbidden",
        ),
        (
            "path \"kv/*\" { capabilities = [\"read\"]",
            "expected: RBRACE got: EOF",
        ),
        ("path \"kv/* { }", "literal not terminated"),
    ];
    for (text, message) in rejected {
        let r = call(
            &root,
            "PUT",
            "sys/policies/acl/bad",
            Some(json!({ "policy": text })),
        )
        .await;
        expect(&r, 400);
        let error = &r.errors()[0];
        assert!(
            error.starts_with("failed to parse policy: ") && error.contains(message),
            "{text:?}: {error}"
        );
    }
    assert!(double.policy("bad").is_none());

    let r = call(&root, "PUT", "sys/policies/acl/empty", Some(json!({}))).await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["'policy' parameter not supplied or empty"]);
    for (method, name) in [("PUT", "root"), ("DELETE", "root"), ("DELETE", "default")] {
        let body = (method == "PUT").then(|| json!({ "policy": READER }));
        let r = call(&root, method, &format!("sys/policies/acl/{name}"), body).await;
        expect(&r, 400);
    }

    let r = call(&root, "DELETE", "sys/policies/acl/reader", None).await;
    expect(&r, 204);
    let r = call(&root, "GET", "sys/policies/acl/reader", None).await;
    expect(&r, 404);
    assert_eq!(r.body, json!({ "errors": [] }));
    assert_conforms(&double);

    // A field the route does not declare: Vault's warning, and the checker flags the call.
    let r = call(
        &root,
        "PUT",
        "sys/policies/acl/reader",
        Some(json!({ "policy": READER, "rules": "x" })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(
        r.warnings(),
        ["Endpoint ignored these unrecognized parameters: [rules]"]
    );
    let violations = double.openapi_violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].contains("\"rules\""), "{violations:#?}");
}

#[test]
fn the_hcl_parser_handles_the_policy_subset() {
    let text = r#"
        # hash comment
        // slash comment
        /* block
           comment */
        name = "demo"
        path "/kv/data/esc\"aped\u0041" {
          capabilities = ["read", "list",]   # trailing comma
          comment = "line\tbreak"
        }
        path "kv/data/old" { policy = "write" }
        path "kv/data/deny" { capabilities = ["read", "deny"] }
        path "kv/+/x/*" { capabilities = ["update"] }
        path "doc" {
          capabilities = ["read"]
          allowed_parameters = { "ttl" = [] }
          min_wrapping_ttl = "1m"
        }
        path "kv/heredoc" {
          comment = <<EOF
  multi
  line
EOF
          capabilities = ["read"]
        }
    "#;
    let policy = hcl::parse_policy(text).expect("parses");
    assert_eq!(policy.name.as_deref(), Some("demo"));
    let paths: Vec<&str> = policy.paths.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "kv/data/esc\"apedA",
            "kv/data/old",
            "kv/data/deny",
            "kv/+/x/*",
            "doc",
            "kv/heredoc"
        ]
    );
    assert_eq!(policy.paths[0].capabilities, ["read", "list"]);
    assert_eq!(
        policy.paths[1].capabilities,
        ["create", "read", "update", "delete", "list"]
    );
    assert_eq!(policy.paths[2].capabilities, ["deny"]);
    assert!(policy.paths[3].has_segment_wildcards && policy.paths[3].is_prefix);
    assert_eq!(
        policy.paths[4].unenforced,
        ["allowed_parameters", "min_wrapping_ttl"]
    );
    assert_eq!(policy.paths[5].capabilities, ["read"]);

    // JSON is HCL too.
    let json_policy = hcl::parse_policy(
        r#"{"path": {"kv/data/j/*": {"capabilities": ["read"]}, "kv/data/k": {"capabilities": ["list"]}}}"#,
    )
    .expect("JSON parses");
    assert_eq!(json_policy.paths.len(), 2);

    for (bad, message) in [
        (
            "path \"a\" {\n  capabilities = [\"read\" \"list\"]\n}",
            "At 2:",
        ),
        ("path \"a\" { capabilities = \"read\" }", "expected a list"),
        ("/* open", "comment not terminated"),
        (
            "path \"a\" { capabilities = [\"\\q\"] }",
            "illegal char escape",
        ),
        (
            "path \"a\" { policy = \"admin\" }",
            "invalid policy \"admin\"",
        ),
        ("path = 3", "path: expected"),
        (
            "path \"a\" { capabilities = [\"read\"] } }",
            "expected: IDENT | STRING got: RBRACE",
        ),
    ] {
        let e = hcl::parse_policy(bad).expect_err(bad);
        assert!(e.contains(message), "{bad:?}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Enforcement

#[tokio::test]
async fn a_token_reads_its_paths_and_nothing_else() {
    let double = start().await;
    let root = double.client();
    for path in ["kv/data/a/x", "kv/data/b/x"] {
        let r = call(&root, "POST", path, Some(json!({ "data": { "k": path } }))).await;
        expect(&r, 200);
    }
    put_policy(&double, "a-reader", READER).await;
    let token = token_with(&double, &["a-reader"], "1h").await;
    let reader = double.client().with_token(&token);

    let r = call(&reader, "GET", "kv/data/a/x", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["data"]["k"], "kv/data/a/x");
    let r = call(
        &reader,
        "POST",
        "kv/data/a/x",
        Some(json!({ "data": { "k": "w" } })),
    )
    .await;
    expect(&r, 403);
    assert_eq!(r.errors(), ["permission denied"]);
    expect(&call(&reader, "GET", "kv/data/b/x", None).await, 403);
    expect(&call(&reader, "LIST", "kv/metadata/a", None).await, 403);
    expect(&call(&reader, "DELETE", "kv/data/a/x", None).await, 403);
    expect(&call(&reader, "GET", "kv/data/a", None).await, 403);
    expect(&call(&reader, "LIST", "sys/policies/acl", None).await, 403);
    // The default policy.
    expect(
        &call(&reader, "GET", "auth/token/lookup-self", None).await,
        200,
    );
    let r = call(
        &reader,
        "POST",
        "sys/capabilities-self",
        Some(json!({ "paths": ["kv/data/a/x", "kv/data/b/x"] })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.data()["kv/data/a/x"], json!(["read"]));
    assert_eq!(r.data()["kv/data/b/x"], json!(["deny"]));
    // No token, a made-up token.
    expect(
        &call(&double.anonymous_client(), "GET", "kv/data/a/x", None).await,
        403,
    );
    expect(
        &call(&root.with_token("hvs.madeup"), "GET", "kv/data/a/x", None).await,
        403,
    );

    // create vs update: a write to a new item needs create, to an existing one update.
    put_policy(
        &double,
        "c-creator",
        r#"path "kv/data/c/*" { capabilities = ["create"] }"#,
    )
    .await;
    let creator = double
        .client()
        .with_token(token_with(&double, &["c-creator"], "1h").await);
    let r = call(
        &creator,
        "POST",
        "kv/data/c/new",
        Some(json!({ "data": { "v": 1 } })),
    )
    .await;
    expect(&r, 200);
    let r = call(
        &creator,
        "POST",
        "kv/data/c/new",
        Some(json!({ "data": { "v": 2 } })),
    )
    .await;
    expect(&r, 403);
    // sys/policies/acl has no existence check: a write is always an update.
    put_policy(
        &double,
        "policy-creator",
        r#"path "sys/policies/acl/*" { capabilities = ["create"] }"#,
    )
    .await;
    let policy_creator = double
        .client()
        .with_token(token_with(&double, &["policy-creator"], "1h").await);
    let r = call(
        &policy_creator,
        "PUT",
        "sys/policies/acl/fresh",
        Some(json!({ "policy": READER })),
    )
    .await;
    expect(&r, 403);
    assert_conforms(&double);
}

#[tokio::test]
async fn unknown_routes_and_methods_need_permission_first() {
    let double = start().await;
    let root = double.client();
    let reader = root.with_token(token_with(&double, &[], "1h").await);
    expect(&call(&reader, "GET", "nope/x", None).await, 403);
    expect(&call(&reader, "GET", "sys/mounts", None).await, 403);
    let r = call(&root, "GET", "nope/x", None).await;
    expect(&r, 404);
    assert!(
        r.errors()[0].contains("no handler for route"),
        "{:?}",
        r.body
    );
    let r = call(&root, "GET", "sys/mounts", None).await;
    expect(&r, 404);
    assert_eq!(r.errors(), ["unsupported path"]);
    let r = call(&root, "PATCH", "kv/data/a/x", Some(json!({ "data": {} }))).await;
    expect(&r, 405);
    assert_eq!(r.errors(), ["unsupported operation"]);
    let r = call(&root, "GET", "database/creds", None).await;
    expect(&r, 404);
    let violations = double.openapi_violations();
    assert!(
        violations
            .iter()
            .any(|v| v.contains("GET /v1/nope/x: no mount")),
        "{violations:#?}"
    );
    assert!(
        violations
            .iter()
            .any(|v| v.contains("PATCH /v1/kv/data/a/x")),
        "{violations:#?}"
    );
}

#[tokio::test]
async fn the_most_specific_rule_wins_as_in_vault() {
    let double = start().await;
    /// (policy, name, [(path, capabilities)])
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static [&'static str])],
    );
    let cases: &[Case] = &[
        // exact beats glob
        (
            r#"path "secret/foo" { capabilities = ["deny"] }
               path "secret/*" { capabilities = ["read"] }"#,
            "exact",
            &[
                ("secret/foo", &["deny"]),
                ("secret/bar", &["read"]),
                ("secret/foo/x", &["read"]),
            ],
        ),
        // the longer prefix wins, and alone decides
        (
            r#"path "secret/*" { capabilities = ["read", "list"] }
               path "secret/team/*" { capabilities = ["create", "update"] }"#,
            "prefix",
            &[
                ("secret/team/x", &["update", "create"]),
                ("secret/other", &["read", "list"]),
            ],
        ),
        // `+` over `*` at the same position; fewer `+` wins; a later first wildcard wins
        (
            r#"path "secret/*" { capabilities = ["list"] }
               path "secret/+/config" { capabilities = ["read"] }
               path "secret/+/+/x" { capabilities = ["read"] }
               path "secret/+/b/x" { capabilities = ["update"] }
               path "secret/a/+" { capabilities = ["delete"] }
               path "secret/+/b" { capabilities = ["update"] }"#,
            "wildcards",
            &[
                ("secret/z/config", &["read"]),
                ("secret/a/config", &["delete"]),
                ("secret/a/b/x", &["update"]),
                ("secret/z/c/x", &["read"]),
                ("secret/a/b", &["delete"]),
                ("secret/z/b", &["update"]),
                ("secret/a/b/c/d", &["list"]),
            ],
        ),
        // a glob inside a segment starts later than a `+` at that segment
        (
            r#"path "team/+" { capabilities = ["read"] }
               path "team/ab*" { capabilities = ["update"] }"#,
            "midglob",
            &[("team/abc", &["update"]), ("team/xyz", &["read"])],
        ),
        // list: an exact rule without the trailing slash covers the folder
        (
            r#"path "kv/metadata/a" { capabilities = ["list"] }"#,
            "list",
            &[("kv/metadata/a/", &["list"])],
        ),
    ];
    for (text, name, expectations) in cases {
        put_policy(&double, name, text).await;
        let token = token_with(&double, &[name], "1h").await;
        for (path, caps) in *expectations {
            assert_eq!(
                double.capabilities(&token, path),
                caps.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "policy {name}, path {path}"
            );
        }
    }

    // Merging across policies: union, and deny wins.
    let a = hcl::parse_policy(r#"path "m/x" { capabilities = ["read"] }"#).unwrap();
    let b = hcl::parse_policy(r#"path "m/x" { capabilities = ["update"] }"#).unwrap();
    let d = hcl::parse_policy(r#"path "m/x" { capabilities = ["deny"] }"#).unwrap();
    let union = Acl::new([("a", &a), ("b", &b)]);
    assert!(union.allows(Operation::Read, "m/x") && union.allows(Operation::Update, "m/x"));
    let denied = Acl::new([("a", &a), ("d", &d)]);
    assert!(!denied.allows(Operation::Read, "m/x"));
    assert_eq!(denied.capabilities("m/x"), ["deny"]);
    assert!(Acl::root().allows(Operation::Delete, "anything/at/all"));

    // The root token and the default policy.
    let default_only = token_with(&double, &[], "1h").await;
    assert_eq!(double.capabilities(double.root_token(), "sys/x"), ["root"]);
    for (path, caps) in [
        ("auth/token/lookup-self", vec!["read"]),
        ("auth/token/renew-self", vec!["update"]),
        ("auth/token/revoke-self", vec!["update"]),
        ("sys/capabilities-self", vec!["update"]),
        ("sys/leases/renew", vec!["update"]),
        ("sys/policies/acl/x", vec!["deny"]),
    ] {
        assert_eq!(double.capabilities(&default_only, path), caps, "{path}");
    }
    assert_conforms(&double);
}

// ---------------------------------------------------------------------------------------------
// Kubernetes auth

async fn service_account(client: &kube::Client, ns: &str, name: &str) {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("create ServiceAccount {ns}/{name}: {e}"));
}

#[tokio::test]
async fn kubernetes_login_checks_the_jwt_with_a_real_token_review() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = temp_namespace(&client, "vault-login", &[]).await;
    let elsewhere = temp_namespace(&client, "vault-elsewhere", &[]).await;
    service_account(&client, &ns, "trainer").await;
    service_account(&client, &ns, "other").await;
    service_account(&client, &elsewhere, "trainer").await;

    let double =
        VaultDouble::start(VaultDoubleConfig::default().with_kube_client(client.clone())).await;
    let root = double.client();
    let anonymous = double.anonymous_client();
    let jwt = service_account_token(&client, &ns, "trainer").await;

    put_policy(
        &double,
        "stage",
        r#"path "kv/data/stage/*" { capabilities = ["read"] }"#,
    )
    .await;
    let r = call(
        &root,
        "POST",
        "auth/kubernetes/role/Stage",
        Some(json!({
            "bound_service_account_names": ["trainer"],
            "bound_service_account_namespaces": ns,
            "token_policies": "stage",
            "token_ttl": "20m",
            "token_max_ttl": 3600,
            "audience": support::ISSUER,
        })),
    )
    .await;
    expect(&r, 204);

    // Not configured yet: as in Vault.
    let login = |role: &str, jwt: &str| json!({ "role": role, "jwt": jwt });
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("stage", &jwt)),
    )
    .await;
    expect(&r, 500);
    assert_eq!(r.errors(), ["could not load backend configuration"]);
    let r = call(
        &root,
        "POST",
        "auth/kubernetes/config",
        Some(json!({
            "kubernetes_host": cp.server_url(),
            "kubernetes_ca_cert": "-----BEGIN CERTIFICATE-----\n...",
            "token_reviewer_jwt": "reviewer",
        })),
    )
    .await;
    expect(&r, 204);
    let config = double.kubernetes_config().expect("recorded");
    assert_eq!(config.kubernetes_host, cp.server_url());
    assert_eq!(config.token_reviewer_jwt, "reviewer");
    let r = call(&root, "GET", "auth/kubernetes/config", None).await;
    expect(&r, 200);
    assert!(r.data().get("token_reviewer_jwt").is_none());

    let r = call(&root, "GET", "auth/kubernetes/role/stage", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["token_ttl"], 1200);
    assert_eq!(r.data()["token_max_ttl"], 3600);
    assert_eq!(r.data()["token_policies"], json!(["stage"]));
    assert_eq!(r.data()["bound_service_account_namespaces"], json!([ns]));
    assert_eq!(r.data()["alias_name_source"], "serviceaccount_uid");
    let r = call(&root, "LIST", "auth/kubernetes/role", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["keys"], json!(["stage"]));

    // The bound ServiceAccount logs in.
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("stage", &jwt)),
    )
    .await;
    expect(&r, 200);
    let auth = r.auth();
    assert_eq!(auth["policies"], json!(["default", "stage"]));
    assert_eq!(auth["token_policies"], json!(["default", "stage"]));
    assert_eq!(auth["lease_duration"], 1200);
    assert_eq!(auth["renewable"], true);
    assert_eq!(auth["orphan"], true);
    assert_eq!(auth["metadata"]["role"], "stage");
    assert_eq!(auth["metadata"]["service_account_name"], "trainer");
    assert_eq!(auth["metadata"]["service_account_namespace"], ns.as_str());
    let token = auth["client_token"].as_str().unwrap().to_string();
    let workload = double.client().with_token(&token);
    let r = call(&workload, "GET", "auth/token/lookup-self", None).await;
    expect(&r, 200);
    assert!(r.data()["ttl"].as_u64().unwrap() <= 1200);
    assert_eq!(r.data()["path"], "auth/kubernetes/login");
    assert_eq!(
        r.data()["display_name"],
        format!("kubernetes-{ns}-trainer").as_str()
    );
    let info = double.token(&token).unwrap();
    assert_eq!(info.role.as_deref(), Some("stage"));
    // And reads exactly its paths.
    call(
        &root,
        "POST",
        "kv/data/stage/x",
        Some(json!({ "data": { "a": 1 } })),
    )
    .await;
    call(
        &root,
        "POST",
        "kv/data/other/x",
        Some(json!({ "data": { "a": 1 } })),
    )
    .await;
    expect(&call(&workload, "GET", "kv/data/stage/x", None).await, 200);
    expect(&call(&workload, "GET", "kv/data/other/x", None).await, 403);
    // Renewal stays within token_max_ttl.
    let r = call(
        &workload,
        "POST",
        "auth/token/renew-self",
        Some(json!({ "increment": "2h" })),
    )
    .await;
    expect(&r, 200);
    assert!(r.auth()["lease_duration"].as_u64().unwrap() <= 3600);
    assert!(!r.warnings().is_empty());

    // Wrong name, wrong namespace, garbage, a forged signature, an unknown role.
    let other = service_account_token(&client, &ns, "other").await;
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("stage", &other)),
    )
    .await;
    expect(&r, 403);
    assert_eq!(r.errors(), ["service account name not authorized"]);
    let foreign = service_account_token(&client, &elsewhere, "trainer").await;
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("stage", &foreign)),
    )
    .await;
    expect(&r, 403);
    assert_eq!(r.errors(), ["namespace not authorized"]);
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("stage", "garbage")),
    )
    .await;
    expect(&r, 403);
    let mut forged: Vec<&str> = jwt.split('.').collect();
    forged[2] = "c2lnbmF0dXJl";
    let forged = forged.join(".");
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("stage", &forged)),
    )
    .await;
    expect(&r, 403);
    assert_eq!(r.errors(), ["permission denied"]);
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("nope", &jwt)),
    )
    .await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["invalid role name \"nope\""]);
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(json!({ "role": "stage" })),
    )
    .await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["missing jwt"]);

    // An audience the token does not carry.
    let r = call(
        &root,
        "POST",
        "auth/kubernetes/role/vault-aud",
        Some(json!({
            "bound_service_account_names": "trainer",
            "bound_service_account_namespaces": "*",
            "audience": "vault",
        })),
    )
    .await;
    expect(&r, 204);
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("vault-aud", &jwt)),
    )
    .await;
    expect(&r, 403);

    // Globs, `*`, no audience (Vault's warning), deprecated field names.
    let r = call(
        &root,
        "POST",
        "auth/kubernetes/role/globbed",
        Some(json!({
            "bound_service_account_names": ["*"],
            "bound_service_account_namespaces": ["vault-login-*"],
            "policies": ["stage"],
            "ttl": "90s",
        })),
    )
    .await;
    expect(&r, 200);
    assert!(
        r.warnings()[0].contains("does not specify an audience"),
        "{:?}",
        r.body
    );
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("globbed", &other)),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.auth()["lease_duration"], 90);
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("globbed", &foreign)),
    )
    .await;
    expect(&r, 403);
    let r = call(&root, "GET", "auth/kubernetes/role/globbed", None).await;
    assert_eq!(r.data()["policies"], json!(["stage"]));
    assert_eq!(r.data()["ttl"], 90);

    // Role validation.
    for (body, message) in [
        (
            json!({ "bound_service_account_namespaces": ["a"] }),
            "\"bound_service_account_names\" can not be empty",
        ),
        (
            json!({ "bound_service_account_names": ["a"] }),
            "\"bound_service_account_namespaces\" can not be empty",
        ),
        (
            json!({ "bound_service_account_names": ["*", "a"], "bound_service_account_namespaces": ["a"] }),
            "can not mix \"*\" with values",
        ),
        (
            json!({ "bound_service_account_names": ["a"], "bound_service_account_namespaces": ["a"], "token_ttl": "2h", "token_max_ttl": "1h" }),
            "token ttl should not be greater than token max ttl",
        ),
        (
            json!({ "bound_service_account_names": ["a"], "bound_service_account_namespaces": ["a"], "token_ttl": "soon" }),
            "time: invalid duration",
        ),
        (
            json!({ "bound_service_account_names": ["a"], "bound_service_account_namespaces": ["a"], "alias_name_source": "x" }),
            "invalid alias_name_source",
        ),
    ] {
        let r = call(&root, "POST", "auth/kubernetes/role/invalid", Some(body)).await;
        expect(&r, 400);
        assert!(r.errors()[0].contains(message), "{}", r.body);
    }
    let r = call(&root, "DELETE", "auth/kubernetes/role/globbed", None).await;
    expect(&r, 204);
    let r = call(
        &anonymous,
        "POST",
        "auth/kubernetes/login",
        Some(login("globbed", &other)),
    )
    .await;
    expect(&r, 400);
    assert_conforms(&double);
}

#[tokio::test]
async fn a_login_without_a_kube_client_is_a_setup_error() {
    let double = start().await;
    let root = double.client();
    call(
        &root,
        "POST",
        "auth/kubernetes/config",
        Some(json!({ "kubernetes_host": "https://x" })),
    )
    .await;
    call(
        &root,
        "POST",
        "auth/kubernetes/role/r",
        Some(
            json!({ "bound_service_account_names": "a", "bound_service_account_namespaces": "b" }),
        ),
    )
    .await;
    let header = vault::util::base64url_encode(br#"{"alg":"RS256"}"#);
    let claims = vault::util::base64url_encode(
        br#"{"kubernetes.io":{"namespace":"b","serviceaccount":{"name":"a","uid":"u"}}}"#,
    );
    let jwt = format!("{header}.{claims}.sig");
    let r = call(
        &double.anonymous_client(),
        "POST",
        "auth/kubernetes/login",
        Some(json!({ "role": "r", "jwt": jwt })),
    )
    .await;
    expect(&r, 500);
    assert!(r.errors()[0].contains("kube::Client"), "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Tokens

#[tokio::test]
async fn tokens_expire_by_the_wall_clock() {
    let double = start().await;
    let token = token_with(&double, &[], "2s").await;
    let client = double.client().with_token(&token);
    let created = Instant::now();
    let r = call(&client, "GET", "auth/token/lookup-self", None).await;
    expect(&r, 200);
    assert!(r.data()["ttl"].as_u64().unwrap() <= 2);
    assert_eq!(r.data()["creation_ttl"], 2);
    assert_eq!(r.data()["policies"], json!(["default"]));
    poll_until("the token to expire", Duration::from_secs(6), || async {
        call(&client, "GET", "auth/token/lookup-self", None)
            .await
            .status
            == 403
    })
    .await;
    assert!(
        created.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        created.elapsed()
    );
    let info = double.token(&token).unwrap();
    assert_eq!(info.state, LeaseState::Expired);
    assert_eq!(info.ended_at, info.expires_at);
    expect(
        &call(&client, "POST", "auth/token/renew-self", Some(json!({}))).await,
        403,
    );
    assert_conforms(&double);
}

#[tokio::test]
async fn token_renewal_follows_period_and_max_ttl() {
    let double = start().await;
    let root = double.client();

    // explicit_max_ttl caps renewals, with Vault's warning.
    let r = call(
        &root,
        "POST",
        "auth/token/create",
        Some(json!({ "ttl": "2s", "explicit_max_ttl": "4s", "policies": ["default"] })),
    )
    .await;
    expect(&r, 200);
    let capped = root.with_token(r.auth()["client_token"].as_str().unwrap());
    let r = call(
        &capped,
        "POST",
        "auth/token/renew-self",
        Some(json!({ "increment": "1h" })),
    )
    .await;
    expect(&r, 200);
    assert!(r.auth()["lease_duration"].as_u64().unwrap() <= 4);
    assert!(
        r.warnings()[0].contains("exceeded the effective max_ttl"),
        "{:?}",
        r.body
    );

    // A periodic token renews back to its period, forever.
    let r = call(
        &root,
        "POST",
        "auth/token/create",
        Some(json!({ "period": "3s", "policies": ["default"], "no_parent": true })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.auth()["lease_duration"], 3);
    assert_eq!(r.auth()["orphan"], true);
    let id = r.auth()["client_token"].as_str().unwrap().to_string();
    let periodic = root.with_token(&id);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let r = call(
            &periodic,
            "POST",
            "auth/token/renew-self",
            Some(json!({ "increment": "1h" })),
        )
        .await;
        expect(&r, 200);
        assert_eq!(r.auth()["lease_duration"], 3);
    }
    let info = double.token(&id).unwrap();
    assert_eq!(info.state, LeaseState::Active);
    assert!(info.expires_at.unwrap() > info.issued_at + chrono::Duration::seconds(4));
    assert_eq!(info.renewals, 3);
    let r = call(&periodic, "GET", "auth/token/lookup-self", None).await;
    assert_eq!(r.data()["period"], 3);

    // Only root or sudo may create periodic or orphan tokens; children only subsets.
    put_policy(
        &double,
        "creator",
        r#"path "auth/token/create" { capabilities = ["update"] }"#,
    )
    .await;
    let creator = root.with_token(token_with(&double, &["creator"], "1h").await);
    for (body, message) in [
        (
            json!({ "period": "1h" }),
            "root or sudo privileges required to create periodic token",
        ),
        (
            json!({ "no_parent": true }),
            "root or sudo privileges required to create orphan token",
        ),
        (
            json!({ "policies": ["other"] }),
            "child policies must be subset of parent",
        ),
        (
            json!({ "policies": ["root"] }),
            "child policies must be subset of parent",
        ),
        (json!({ "ttl": "soon" }), "time: invalid duration"),
    ] {
        let r = call(&creator, "POST", "auth/token/create", Some(body)).await;
        expect(&r, 400);
        assert!(r.errors()[0].contains(message), "{}", r.body);
    }
    let r = call(
        &creator,
        "POST",
        "auth/token/create",
        Some(json!({ "ttl": "1m" })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.auth()["policies"], json!(["creator", "default"]));
    assert_eq!(r.auth()["orphan"], false);

    // The root token never expires and is not renewable.
    let r = call(&root, "GET", "auth/token/lookup-self", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["ttl"], 0);
    assert_eq!(r.data()["expire_time"], Value::Null);
    expect(
        &call(&root, "POST", "auth/token/renew-self", Some(json!({}))).await,
        400,
    );
    assert_conforms(&double);
}

// ---------------------------------------------------------------------------------------------
// Database credentials and leases

const DB_USER: &str = r#"
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "auth/token/create" { capabilities = ["update"] }
"#;

async fn db_role(double: &VaultDouble, default_ttl: Value, max_ttl: Value) {
    let r = call(
        &double.client(),
        "POST",
        "database/roles/app",
        Some(json!({
            "db_name": "pg",
            "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
            "default_ttl": default_ttl,
            "max_ttl": max_ttl,
        })),
    )
    .await;
    expect(&r, 204);
}

#[tokio::test]
async fn database_leases_are_issued_renewed_capped_looked_up_revoked_and_expire() {
    let double = start().await;
    let root = double.client();
    db_role(&double, json!("2s"), json!(5)).await;
    put_policy(&double, "db", DB_USER).await;
    let user = root.with_token(token_with(&double, &["db"], "1h").await);

    let r = call(&root, "GET", "database/roles/app", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["default_ttl"], 2);
    assert_eq!(r.data()["max_ttl"], 5);
    assert_eq!(r.data()["db_name"], "pg");
    let r = call(&root, "LIST", "database/roles", None).await;
    assert_eq!(r.data()["keys"], json!(["app"]));

    let r = call(&user, "GET", "database/creds/app", None).await;
    expect(&r, 200);
    let lease_id = r.body["lease_id"].as_str().unwrap().to_string();
    assert!(lease_id.starts_with("database/creds/app/"), "{lease_id}");
    assert_eq!(lease_id.len(), "database/creds/app/".len() + 24);
    assert_eq!(r.body["lease_duration"], 2);
    assert_eq!(r.body["renewable"], true);
    assert!(
        r.data()["username"]
            .as_str()
            .unwrap()
            .starts_with("v-token-app-")
    );
    assert!(r.data()["password"].as_str().unwrap().len() >= 20);
    let lease = double.lease(&lease_id).unwrap();
    assert_eq!(lease.state, LeaseState::Active);
    assert_eq!(
        lease.token_accessor,
        double.token(user.token().unwrap()).unwrap().accessor
    );

    // The default policy allows lookup and renew.
    let r = call(
        &user,
        "PUT",
        "sys/leases/lookup",
        Some(json!({ "lease_id": lease_id })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.data()["id"], lease_id.as_str());
    assert!(r.data()["ttl"].as_u64().unwrap() <= 2);
    assert_eq!(r.data()["last_renewal"], Value::Null);
    assert_eq!(r.data()["renewable"], true);
    chrono::DateTime::parse_from_rfc3339(r.data()["expire_time"].as_str().unwrap()).unwrap();

    let r = call(
        &user,
        "PUT",
        "sys/leases/renew",
        Some(json!({ "lease_id": lease_id, "increment": 3 })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.body["lease_id"], lease_id.as_str());
    assert_eq!(r.body["lease_duration"], 3);
    // Past max_ttl: capped to what is left, with Vault's warning.
    let r = call(
        &user,
        "PUT",
        "sys/leases/renew",
        Some(json!({ "lease_id": lease_id, "increment": "1h" })),
    )
    .await;
    expect(&r, 200);
    let capped = r.body["lease_duration"].as_u64().unwrap();
    assert!((3..=5).contains(&capped), "{capped}");
    assert!(
        r.warnings()[0].contains("exceeded the effective max_ttl"),
        "{:?}",
        r.body
    );
    let lease = double.lease(&lease_id).unwrap();
    assert!(lease.expires_at <= lease.issued_at + chrono::Duration::seconds(5));
    assert_eq!(lease.renewals, 2);
    let r = call(
        &user,
        "PUT",
        "sys/leases/lookup",
        Some(json!({ "lease_id": lease_id })),
    )
    .await;
    assert!(r.data()["last_renewal"].is_string());

    // Real expiry.
    poll_until("the lease to expire", Duration::from_secs(8), || async {
        double.lease(&lease_id).unwrap().state == LeaseState::Expired
    })
    .await;
    let lease = double.lease(&lease_id).unwrap();
    assert_eq!(lease.ended_at, Some(lease.expires_at));
    assert_eq!(lease.revoked_by, None);
    let r = call(
        &user,
        "PUT",
        "sys/leases/renew",
        Some(json!({ "lease_id": lease_id })),
    )
    .await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["lease not found"]);
    let r = call(
        &user,
        "PUT",
        "sys/leases/lookup",
        Some(json!({ "lease_id": lease_id })),
    )
    .await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["invalid lease"]);

    // Revocation, idempotent.
    let r = call(&user, "GET", "database/creds/app", None).await;
    let second = r.body["lease_id"].as_str().unwrap().to_string();
    let r = call(
        &user,
        "PUT",
        "sys/leases/revoke",
        Some(json!({ "lease_id": second })),
    )
    .await;
    expect(&r, 204);
    let lease = double.lease(&second).unwrap();
    assert_eq!(lease.state, LeaseState::Revoked);
    assert_eq!(lease.revoked_by, Some(RevokeCause::Api));
    expect(
        &call(
            &user,
            "PUT",
            "sys/leases/revoke",
            Some(json!({ "lease_id": second })),
        )
        .await,
        204,
    );
    expect(
        &call(
            &user,
            "PUT",
            "sys/leases/renew",
            Some(json!({ "lease_id": second })),
        )
        .await,
        400,
    );
    assert!(double.active_leases().is_empty());
    assert_eq!(double.leases().len(), 2);

    // Not allowed without sys/leases/revoke; the url form; errors.
    let other = root.with_token(token_with(&double, &["default"], "1h").await);
    expect(
        &call(
            &other,
            "PUT",
            "sys/leases/revoke",
            Some(json!({ "lease_id": second })),
        )
        .await,
        403,
    );
    expect(&call(&other, "GET", "database/creds/app", None).await, 403);
    let r = call(&root, "GET", "database/creds/app", None).await;
    let third = r.body["lease_id"].as_str().unwrap().to_string();
    expect(
        &call(
            &root,
            "PUT",
            &format!("sys/leases/revoke/{third}"),
            Some(json!({})),
        )
        .await,
        204,
    );
    assert_eq!(double.lease(&third).unwrap().state, LeaseState::Revoked);
    let r = call(&root, "GET", "database/creds/nope", None).await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["unknown role: nope"]);
    let r = call(
        &root,
        "POST",
        "database/roles/bad",
        Some(json!({ "db_name": "pg", "default_ttl": "2h", "max_ttl": "1h" })),
    )
    .await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["ttl cannot be greater than max_ttl"]);
    expect(
        &call(&root, "PUT", "sys/leases/renew", Some(json!({}))).await,
        400,
    );
    assert_conforms(&double);
}

#[tokio::test]
async fn revoking_a_token_revokes_its_leases_and_children() {
    let double = start().await;
    let root = double.client();
    db_role(&double, json!("1h"), json!("2h")).await;
    put_policy(&double, "db", DB_USER).await;

    let parent_id = token_with(&double, &["db"], "1h").await;
    let parent = root.with_token(&parent_id);
    let r = call(
        &parent,
        "POST",
        "auth/token/create",
        Some(json!({ "ttl": "30m" })),
    )
    .await;
    expect(&r, 200);
    let child_id = r.auth()["client_token"].as_str().unwrap().to_string();
    let child = root.with_token(&child_id);
    let r = call(
        &root,
        "POST",
        "auth/token/create",
        Some(json!({ "policies": ["db"], "no_parent": true })),
    )
    .await;
    let orphan = root.with_token(r.auth()["client_token"].as_str().unwrap());

    let mut parent_leases = Vec::new();
    for _ in 0..2 {
        let r = call(&parent, "GET", "database/creds/app", None).await;
        expect(&r, 200);
        parent_leases.push(r.body["lease_id"].as_str().unwrap().to_string());
    }
    let r = call(&child, "GET", "database/creds/app", None).await;
    let child_lease = r.body["lease_id"].as_str().unwrap().to_string();
    let r = call(&orphan, "GET", "database/creds/app", None).await;
    let orphan_lease = r.body["lease_id"].as_str().unwrap().to_string();
    assert_eq!(double.active_leases().len(), 4);

    expect(
        &call(&parent, "POST", "auth/token/revoke-self", None).await,
        204,
    );
    for id in parent_leases.iter().chain([&child_lease]) {
        let lease = double.lease(id).unwrap();
        assert_eq!(lease.state, LeaseState::Revoked, "{id}");
        assert_eq!(lease.revoked_by, Some(RevokeCause::TokenRevoked));
    }
    assert_eq!(double.token(&child_id).unwrap().state, LeaseState::Revoked);
    expect(
        &call(&child, "GET", "auth/token/lookup-self", None).await,
        403,
    );
    let active = double.active_leases();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].lease_id, orphan_lease);

    // An expiring token takes its leases with it (the trap of issue #285).
    let short = root.with_token(token_with(&double, &["db"], "2s").await);
    let r = call(&short, "GET", "database/creds/app", None).await;
    assert_eq!(r.body["lease_duration"], 3600);
    let lease_id = r.body["lease_id"].as_str().unwrap().to_string();
    poll_until(
        "the token's lease to go",
        Duration::from_secs(6),
        || async { double.lease(&lease_id).unwrap().state != LeaseState::Active },
    )
    .await;
    let lease = double.lease(&lease_id).unwrap();
    let token = double.token(short.token().unwrap()).unwrap();
    assert_eq!(lease.state, LeaseState::Revoked);
    assert_eq!(lease.revoked_by, Some(RevokeCause::TokenExpired));
    assert_eq!(lease.ended_at, token.expires_at);
    assert_conforms(&double);
}

// ---------------------------------------------------------------------------------------------
// kv-v2

#[tokio::test]
async fn kv_v2_writes_reads_versions_lists_and_deletes() {
    let double = start().await;
    let root = double.client();
    let r = call(
        &root,
        "POST",
        "kv/data/app/config",
        Some(json!({ "data": { "a": "1" } })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.data()["version"], 1);
    let r = call(
        &root,
        "PUT",
        "kv/data/app/config",
        Some(json!({ "data": { "a": "2" }, "options": { "cas": 1 } })),
    )
    .await;
    expect(&r, 200);
    assert_eq!(r.data()["version"], 2);
    let r = call(
        &root,
        "PUT",
        "kv/data/app/config",
        Some(json!({ "data": { "a": "3" }, "options": { "cas": 1 } })),
    )
    .await;
    expect(&r, 400);
    assert_eq!(
        r.errors(),
        ["check-and-set parameter did not match the current version"]
    );
    call(
        &root,
        "POST",
        "kv/data/app/sub/deep",
        Some(json!({ "data": { "x": true } })),
    )
    .await;

    let r = call(&root, "GET", "kv/data/app/config", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["data"], json!({ "a": "2" }));
    assert_eq!(r.data()["metadata"]["version"], 2);
    assert_eq!(r.data()["metadata"]["deletion_time"], "");
    let r = call(&root, "GET", "kv/data/app/config?version=1", None).await;
    assert_eq!(r.data()["data"], json!({ "a": "1" }));
    assert_eq!(double.kv("app/config").unwrap()["a"], "2");

    let r = call(&root, "LIST", "kv/metadata/app", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["keys"], json!(["config", "sub/"]));
    let r = call(&root, "GET", "kv/metadata/?list=true", None).await;
    assert_eq!(r.data()["keys"], json!(["app/"]));
    expect(&call(&root, "LIST", "kv/metadata/none", None).await, 404);
    let r = call(&root, "GET", "kv/metadata/app/config", None).await;
    expect(&r, 200);
    assert_eq!(r.data()["current_version"], 2);
    assert_eq!(r.data()["versions"].as_object().unwrap().len(), 2);

    expect(
        &call(&root, "DELETE", "kv/data/app/config", None).await,
        204,
    );
    let r = call(&root, "GET", "kv/data/app/config", None).await;
    expect(&r, 404);
    assert_eq!(r.data()["data"], Value::Null);
    assert!(
        r.data()["metadata"]["deletion_time"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
    assert!(double.kv("app/config").is_none());
    expect(
        &call(&root, "DELETE", "kv/metadata/app/config", None).await,
        204,
    );
    expect(
        &call(&root, "GET", "kv/metadata/app/config", None).await,
        404,
    );
    expect(&call(&root, "GET", "kv/data/app/config", None).await, 404);

    let r = call(&root, "POST", "kv/data/app/x", Some(json!({ "value": 1 }))).await;
    expect(&r, 400);
    assert_eq!(r.errors(), ["no data provided"]);
    let r = call(&root, "POST", "kv/data/app/x", None).await;
    expect(&r, 400);
    let r = root.send("POST", "kv/data/app/x", None).await.unwrap();
    expect(&r, 400);
    // Invalid JSON never reaches the ACL.
    let raw = root
        .send("POST", "kv/data/app/x", Some(&Value::String("{".into())))
        .await
        .unwrap();
    expect(&raw, 400);
}

// ---------------------------------------------------------------------------------------------
// Health and faults

#[tokio::test]
async fn sealed_answers_503_everywhere_but_health_reports_it() {
    let double = start().await;
    let root = double.client();
    let r = call(&double.anonymous_client(), "GET", "sys/health", None).await;
    expect(&r, 200);
    assert_eq!(r.body["initialized"], true);
    assert_eq!(r.body["sealed"], false);
    assert_eq!(r.body["standby"], false);
    assert_eq!(r.body["version"], "1.15.0");

    double.seal();
    assert!(double.is_sealed());
    let r = call(&root, "GET", "sys/health", None).await;
    expect(&r, 503);
    assert_eq!(r.body["sealed"], true);
    let r = call(&root, "GET", "sys/health?sealedcode=200", None).await;
    expect(&r, 200);
    for (method, path) in [
        ("GET", "kv/data/x"),
        ("LIST", "sys/policies/acl"),
        ("POST", "auth/kubernetes/login"),
        ("GET", "auth/token/lookup-self"),
    ] {
        let r = call(&root, method, path, Some(json!({}))).await;
        expect(&r, 503);
        assert_eq!(r.errors(), ["Vault is sealed"]);
    }
    double.unseal();
    expect(
        &call(&root, "GET", "auth/token/lookup-self", None).await,
        200,
    );
    expect(&call(&root, "GET", "sys/health", None).await, 200);
}

#[tokio::test]
async fn fail_next_answers_errors_then_recovers() {
    let double = start().await;
    let root = double.client();
    double.fail_next(2, 500);
    for _ in 0..2 {
        let r = call(
            &root,
            "POST",
            "kv/data/x",
            Some(json!({ "data": { "a": 1 } })),
        )
        .await;
        expect(&r, 500);
        assert_eq!(r.errors(), ["injected failure (Vault HTTP double)"]);
    }
    assert!(
        double.kv("x").is_none(),
        "an injected failure changes nothing"
    );
    expect(
        &call(
            &root,
            "POST",
            "kv/data/x",
            Some(json!({ "data": { "a": 1 } })),
        )
        .await,
        200,
    );
    double.fail_next(1, 503);
    expect(&call(&root, "GET", "sys/health", None).await, 503);
    expect(&call(&root, "GET", "sys/health", None).await, 200);
    let statuses: Vec<Option<u16>> = double.request_log().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Some(500), Some(500), Some(200), Some(503), Some(200)]
    );
    let requests = double.requests();
    assert_eq!(requests[0].0, hyper::Method::POST);
    assert_eq!(requests[0].1, "/v1/kv/data/x");
    assert_eq!(requests[0].2, ["data"]);
    assert_conforms(&double);
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let double = start().await;
    let root = double.client();
    double.set_latency(Duration::from_millis(400));
    let started = Instant::now();
    expect(&call(&root, "GET", "sys/health", None).await, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    double.set_latency(Duration::ZERO);
    let started = Instant::now();
    expect(&call(&root, "GET", "sys/health", None).await, 200);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_hung_double_makes_clients_time_out_until_released() {
    let double = start().await;
    let root = double.client();
    double.hang(true);
    let short = root.with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let e = short
        .get("auth/token/lookup-self")
        .await
        .expect_err("no answer");
    assert_eq!(e, ClientError::Timeout(Duration::from_millis(300)));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        double.request_log()[0].status,
        None,
        "logged, still pending"
    );

    let patient = root.with_timeout(Duration::from_secs(10));
    let pending = tokio::spawn(async move { patient.get("sys/health").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished());
    double.hang(false);
    let r = pending.await.unwrap().expect("answered once released");
    expect(&r, 200);
    expect(&call(&root, "GET", "sys/health", None).await, 200);
}

/// A raw HTTP/1.1 exchange with blocking std I/O: the status line, or the I/O error.
fn blocking_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn the_double_answers_while_the_test_thread_blocks_and_stops_when_dropped() {
    let double = start().await;
    let addr = double.socket_addr();
    // This thread blocks (no await) while another thread talks to the double.
    let status = std::thread::spawn(move || blocking_get(addr, "/v1/sys/health"))
        .join()
        .unwrap()
        .expect("an answer");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(double.address().starts_with("http://127.0.0.1:"));
    let clone = double.clone();
    drop(double);
    assert_eq!(
        blocking_get(addr, "/v1/sys/health").unwrap(),
        "HTTP/1.1 200 OK",
        "a clone keeps it running"
    );
    drop(clone);
    poll_until("the listener to close", Duration::from_secs(5), || async {
        blocking_get(addr, "/v1/sys/health").is_err()
    })
    .await;
}
