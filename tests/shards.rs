//! Two operators sharding the namespaces (`--shard-count 2`, `--shard-index 0|1`) against a real
//! API server: every pipeline becomes Ready, each is written by exactly the shard that owns its
//! namespace (`portcullis::shard`), each shard holds its own Lease, and with one shard stopped
//! the other keeps reconciling its namespaces while the stopped shard's wait for it.
//!
//! Its own test binary, so its own control plane: the operators here watch every namespace.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom, as the user would go"
)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::AIPipeline;
use portcullis::shard::Shard;
use serde_json::Value;
use support::{Operator, create_guardrails, guardrails_for, root};

fn example(path: &str, namespace: &str) -> AIPipeline {
    let text = std::fs::read_to_string(root().join(path)).expect("example readable");
    let mut p: AIPipeline = serde_saphyr::from_str(&text).expect("example parses");
    p.metadata.namespace = Some(namespace.into());
    p
}

async fn create_pipeline(client: &Client, pipeline: &AIPipeline) {
    let api: Api<AIPipeline> = Api::namespaced(
        client.clone(),
        pipeline.metadata.namespace.as_deref().expect("namespace"),
    );
    api.create(&PostParams::default(), pipeline)
        .await
        .expect("pipeline created");
}

/// Waits until `namespace/name` has converged for its current generation (the shards run
/// without Vault).
async fn wait_ready(client: &Client, namespace: &str, name: &str, op: &Operator) {
    support::wait_converged(client, namespace, name, op).await;
}

/// The namespaces a decision log has records of.
fn namespaces_in(records: &[Value]) -> BTreeSet<String> {
    records
        .iter()
        .filter_map(|r| r["namespace"].as_str().map(String::from))
        .collect()
}

fn shard_args(index: u32) -> Vec<String> {
    ["--shard-count", "2", "--shard-index", &index.to_string()]
        .map(String::from)
        .to_vec()
}

async fn lease_holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

#[tokio::test]
async fn two_shards_split_the_namespaces_and_each_runs_on_its_own() {
    let cp = support::control_plane();
    let client = cp.client().await;

    // At least two namespaces per shard (the shard of a name is fixed: see portcullis::shard).
    let mut owned: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..40 {
        if owned.iter().all(|o| o.len() >= 2) {
            break;
        }
        let ns = support::temp_namespace(&client, "shard", &[]).await;
        owned[Shard::bucket(&ns, 2) as usize].push(ns);
    }
    assert!(
        owned.iter().all(|o| o.len() >= 2),
        "two namespaces per shard: {owned:?}"
    );
    let all: Vec<String> = owned.iter().flatten().cloned().collect();
    for ns in &all {
        create_guardrails(&client, &guardrails_for(ns)).await;
    }
    let lease_ns = support::temp_namespace(&client, "shard-leases", &[]).await;

    let shard0 = Operator::start_with(
        "operator-shard-0",
        "",
        Some(&lease_ns),
        tempfile::tempdir().expect("dir"),
        &shard_args(0),
    );
    let mut shard1 = Operator::start_with(
        "operator-shard-1",
        "",
        Some(&lease_ns),
        tempfile::tempdir().expect("dir"),
        &shard_args(1),
    );
    let shard_of = |ns: &str| -> &Operator {
        if Shard::bucket(ns, 2) == 0 {
            &shard0
        } else {
            &shard1
        }
    };

    for ns in &all {
        create_pipeline(
            &client,
            &example("examples/pipelines/fraud-detector.yaml", ns),
        )
        .await;
    }
    for ns in &all {
        wait_ready(&client, ns, "fraud-detector", shard_of(ns)).await;
    }

    // Each shard holds its own Lease.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease_ns);
    assert_eq!(
        lease_holder(&leases, "portcullis-leader-shard-0-of-2")
            .await
            .as_deref(),
        Some("operator-shard-0")
    );
    assert_eq!(
        lease_holder(&leases, "portcullis-leader-shard-1-of-2")
            .await
            .as_deref(),
        Some("operator-shard-1")
    );
    assert!(
        leases
            .get_opt("portcullis-leader")
            .await
            .expect("get")
            .is_none(),
        "no shard uses the unsharded Lease"
    );

    // Each pipeline was written by exactly one shard: each decision log (the shard's own file)
    // holds records of its own namespaces, all of them, and of no other.
    for (index, op) in [(0usize, &shard0), (1, &shard1)] {
        assert!(
            op.audit_log()
                .ends_with(format!("audit-shard-{index}-of-2.log")),
            "{}",
            op.audit_log().display()
        );
        let mine: BTreeSet<String> = owned[index].iter().cloned().collect();
        assert_eq!(
            namespaces_in(&op.records()),
            mine,
            "shard {index} recorded exactly its own namespaces"
        );
        let (ok, report) = op.verify();
        assert!(ok, "shard {index}'s decision log verifies: {report}");
        assert_eq!(
            op.metric(&format!(
                "portcullis_shard_info{{index=\"{index}\",count=\"2\"}}"
            ))
            .await,
            1.0,
            "shard {index} says which shard it is"
        );
    }

    // With shard 1 stopped, shard 0 still reconciles its namespaces; a pipeline in a namespace
    // of shard 1 waits, with no status, until shard 1 is back.
    shard1.stop();
    let later0 = example("examples/pipelines/llm-finetune.yaml", &owned[0][0]);
    let later1 = example("examples/pipelines/llm-finetune.yaml", &owned[1][0]);
    let later_name = later0.name_any();
    create_pipeline(&client, &later1).await;
    create_pipeline(&client, &later0).await;
    wait_ready(&client, &owned[0][0], &later_name, &shard0).await;
    for ns in &owned[0] {
        wait_ready(&client, ns, "fraud-detector", &shard0).await;
    }
    // Shard 0 just reconciled a pipeline created after the other: give it a moment more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = Api::<AIPipeline>::namespaced(client.clone(), &owned[1][0])
        .get(&later_name)
        .await
        .expect("get");
    assert!(
        waiting.status.is_none(),
        "no shard but shard 1 touches its namespaces: {:?}",
        waiting.status
    );
    assert!(
        !namespaces_in(&shard0.records()).contains(&owned[1][0]),
        "shard 0 recorded nothing of shard 1's namespaces"
    );

    let dir = std::mem::replace(&mut shard1.dir, tempfile::tempdir().expect("dir"));
    let shard1 = Operator::start_with("operator-shard-1", "", Some(&lease_ns), dir, &shard_args(1));
    wait_ready(&client, &owned[1][0], &later_name, &shard1).await;
    let mine: BTreeSet<String> = owned[1].iter().cloned().collect();
    assert_eq!(namespaces_in(&shard1.records()), mine);
    let (ok, report) = shard1.verify();
    assert!(
        ok,
        "shard 1's decision log verifies after its restart: {report}"
    );
}
