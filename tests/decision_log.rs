//! The decision log on a disk that fills up: nothing new is granted while it cannot be written,
//! the operator and the pipeline say so, and everything resumes, with the chain intact, once
//! there is room again.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, Patch, PatchParams};
use portcullis::api::AIPipeline;
use serde_json::json;
use support::admission::Refusal;
use support::{
    Operator, WAIT, condition, create_pipeline, example, guarded_namespace, wait_for, wait_ready,
};

/// A small tmpfs, unmounted when dropped (also when the test panics).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} (the test needs root, as `make test` has)",
            at.display()
        );
        SmallDisk(at.to_path_buf())
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_stops_new_grants_says_so_and_resumes() {
    let (client, ns, _) = guarded_namespace("log-full").await;
    // The operator's decision log lives on a 1 MiB disk of its own; its folder (process log,
    // pid file) does not.
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "1m");
    std::os::unix::fs::symlink(disk.0.join("audit.log"), dir.path().join("audit.log")).unwrap();
    let mut op = Operator::start_with("operator", &ns, None, dir, &[]);

    // A pipeline without Vault, so that Ready depends on the Kubernetes side only.
    let mut pipeline = example("examples/pipelines/fraud-detector.yaml", &ns);
    for stage in &mut pipeline.spec.stages {
        stage.vault = None;
    }
    let name = create_pipeline(&client, &pipeline)
        .await
        .metadata
        .name
        .unwrap();
    wait_ready(&client, &ns, &name, "True", &op).await;
    let before = op.records().len();

    disk.fill();
    // A change asks for a new grant: it is not made without its record.
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"stages": [
        serde_json::to_value(&pipeline.spec.stages[0]).unwrap(),
        serde_json::to_value(&pipeline.spec.stages[1]).unwrap(),
        serde_json::to_value(&pipeline.spec.stages[2]).unwrap(),
    ]}});
    let mut patch = patch;
    patch["spec"]["stages"][0]["permissions"][0]["resourceNames"] =
        json!(["ingest-config", "ingest-extra"]);
    pipelines
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let p = wait_for("Ready=False, DecisionLogUnavailable", WAIT, || {
        let pipelines = pipelines.clone();
        let name = name.clone();
        async move {
            let p = pipelines.get(&name).await.ok()?;
            let ready = condition(&p, "Ready")?;
            (ready.status == "False" && ready.reason == "DecisionLogUnavailable").then_some(p)
        }
    })
    .await;
    let degraded = condition(&p, "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "DecisionLogUnavailable")
    );
    assert!(
        degraded.message.contains("No space left on device"),
        "{}",
        degraded.message
    );
    // The operator is not ready, and says why; the metrics say so too.
    let reply = op.http_get("/readyz").await;
    assert!(reply.contains(" 503 Service Unavailable"), "{reply}");
    assert!(
        reply.contains("the decision log cannot be written"),
        "{reply}"
    );
    assert_eq!(op.metric("portcullis_decision_log_writable ").await, 0.0);
    assert!(
        op.metric("portcullis_decision_log_write_failures_total")
            .await
            >= 1.0
    );
    // Nothing new was granted.
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let role = roles.get(&format!("{name}-ingest")).await.unwrap();
    let names = role.rules.unwrap_or_default()[0]
        .resource_names
        .clone()
        .unwrap_or_default();
    assert_eq!(names, ["ingest-config"]);
    assert_eq!(
        op.records().len(),
        before,
        "no record appeared on a full disk"
    );

    // Room again: the change is recorded, then made, and the chain verifies.
    disk.free();
    wait_ready(&client, &ns, &name, "True", &op).await;
    let role = roles.get(&format!("{name}-ingest")).await.unwrap();
    let names = role.rules.unwrap_or_default()[0]
        .resource_names
        .clone()
        .unwrap_or_default();
    assert_eq!(names, ["ingest-config", "ingest-extra"]);
    assert_eq!(op.http_status("/readyz").await, 200);
    assert_eq!(op.metric("portcullis_decision_log_writable ").await, 1.0);
    let (ok, out) = op.verify();
    assert!(ok, "{out}");
    assert!(op.records().len() > before);
    op.stop();
}

#[tokio::test]
async fn a_change_the_api_server_keeps_refusing_is_recorded_once() {
    let (client, ns, _) = guarded_namespace("log-repeat").await;
    let mut op = Operator::start("operator", &ns, None);
    let mut pipeline = example("examples/pipelines/fraud-detector.yaml", &ns);
    for stage in &mut pipeline.spec.stages {
        stage.vault = None;
    }
    let name = create_pipeline(&client, &pipeline)
        .await
        .metadata
        .name
        .unwrap();
    wait_ready(&client, &ns, &name, "True", &op).await;

    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let refusal = Refusal::install(
        &client,
        ("rbac.authorization.k8s.io", "roles"),
        &ns,
        "true",
        "role changes are frozen",
        &roles,
        &format!("{name}-ingest"),
    )
    .await;
    let pipelines: Api<AIPipeline> = Api::namespaced(client.clone(), &ns);
    let mut stages = serde_json::to_value(&pipeline.spec.stages).unwrap();
    stages[0]["permissions"][0]["resourceNames"] = json!(["ingest-config", "ingest-extra"]);
    pipelines
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"stages": stages}})),
        )
        .await
        .unwrap();
    let role = format!("Role {ns}/{name}-ingest");
    let updates = |op: &Operator| {
        op.records()
            .iter()
            .filter(|r| r["action"] == "update" && r["object"] == role.as_str())
            .count()
    };
    // The write is refused again and again (the policy can take a moment to apply; then each
    // retry fails): the reconciles that fail are counted, the record is written once.
    let waited = tokio::time::timeout(
        WAIT,
        wait_for("the Role update to fail three times", WAIT, || async {
            let failed = op
                .metric("portcullis_reconciles_total{result=\"kube_error\"}")
                .await
                + op.metric("portcullis_reconciles_total{result=\"apply_error\"}")
                    .await;
            (failed >= 3.0).then_some(())
        }),
    )
    .await;
    if waited.is_err() {
        let p = pipelines.get(&name).await.unwrap();
        panic!(
            "no three failures: {:?}\n{}\n{}",
            p.status,
            op.http_get("/metrics").await,
            op.log()
        );
    }
    let p = pipelines.get(&name).await.unwrap();
    let ready = condition(&p, "Ready").unwrap();
    assert_eq!(ready.reason, "ApplyFailed", "{}", ready.message);
    assert!(
        ready.message.contains("role changes are frozen"),
        "{}",
        ready.message
    );
    assert_eq!(
        updates(&op),
        1,
        "one update record for one change, however often it is retried"
    );

    // Allowed again: the change is made under the record already written.
    refusal.lift().await;
    wait_ready(&client, &ns, &name, "True", &op).await;
    assert_eq!(updates(&op), 1);
    let (ok, out) = op.verify();
    assert!(ok, "{out}");
    op.stop();
}
