//! Writing `status.stages[].usage` and `usageSince`: one task, one server-side apply per
//! pipeline under [`USAGE_FIELD_MANAGER`], with every stage of the pipeline in it.
//!
//! Why a whole pipeline per apply: server-side apply removes the fields a manager set before
//! and leaves out now. An apply of one stage's usage would remove the usage of the pipeline's
//! other stages; an apply of the pipeline's current stages removes exactly the usage of a stage
//! the pipeline no longer has (the reconciler, another manager, drops the rest of its entry).
//! Writes are coalesced per pipeline (the latest wins) and made one after the other, so an
//! older write never lands after a newer one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::Notify;
use tracing::warn;

use crate::api::{AIPipeline, GrantUsage};
use crate::audit::format_time;
use crate::k8s::{Api, Client, Patch, PatchParams};

/// The field manager of the usage the runtime side writes to `status.stages[].usage`.
pub(crate) const USAGE_FIELD_MANAGER: &str = "portcullis-access";

/// One stage's usage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StageUsage {
    pub stage: String,
    pub usage: Vec<GrantUsage>,
    pub since: Option<DateTime<Utc>>,
}

/// The usage of all stages of one pipeline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PipelineUsage {
    pub namespace: String,
    pub pipeline: String,
    pub uid: String,
    pub stages: Vec<StageUsage>,
}

impl PipelineUsage {
    /// The apply configuration: the pipeline's stages with their usage, and nothing else.
    pub(crate) fn patch(&self) -> serde_json::Value {
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| {
                let mut stage = json!({"name": s.stage, "usage": s.usage});
                if let Some(since) = s.since {
                    stage["usageSince"] = format_time(since).into();
                }
                stage
            })
            .collect();
        json!({
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "AIPipeline",
            "metadata": {"name": self.pipeline, "namespace": self.namespace},
            "status": {"stages": stages},
        })
    }
}

/// The writer: [`UsageWriter::queue`] replaces what waits for the pipeline; one task writes.
#[derive(Clone)]
pub(crate) struct UsageWriter {
    pending: Arc<Mutex<HashMap<String, PipelineUsage>>>,
    wake: Arc<Notify>,
}

impl UsageWriter {
    pub(crate) fn start(client: Client) -> UsageWriter {
        let writer = UsageWriter {
            pending: Arc::default(),
            wake: Arc::new(Notify::new()),
        };
        tokio::spawn(writer.clone().run(client));
        writer
    }

    pub(crate) fn queue(&self, usage: PipelineUsage) {
        self.pending
            .lock()
            .expect("usage lock")
            .insert(usage.uid.clone(), usage);
        self.wake.notify_one();
    }

    async fn run(self, client: Client) {
        loop {
            self.wake.notified().await;
            loop {
                let next = {
                    let mut pending = self.pending.lock().expect("usage lock");
                    let uid = pending.keys().next().cloned();
                    uid.and_then(|uid| pending.remove(&uid))
                };
                let Some(usage) = next else { break };
                write(&client, &usage).await;
            }
        }
    }
}

/// Writes one pipeline's usage with server-side apply under [`USAGE_FIELD_MANAGER`]: the
/// reconciler's status writes (another manager) leave it alone.
async fn write(client: &Client, usage: &PipelineUsage) {
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), &usage.namespace);
    if let Err(error) = api
        .patch_status(
            &usage.pipeline,
            &PatchParams::apply(USAGE_FIELD_MANAGER).force(),
            &Patch::Apply(&usage.patch()),
        )
        .await
    {
        warn!(%error, pipeline = %usage.pipeline, namespace = %usage.namespace, "writing the stages' usage failed; it is written again at its next change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_has_every_stage_and_only_usage() {
        let usage = PipelineUsage {
            namespace: "ml".into(),
            pipeline: "fraud".into(),
            uid: "u".into(),
            stages: vec![
                StageUsage {
                    stage: "ingest".into(),
                    usage: vec![GrantUsage {
                        grant: "get configmaps/cfg".into(),
                        used: true,
                        count: 2,
                        last_used: Some("2026-11-27T10:00:00Z".into()),
                    }],
                    since: DateTime::from_timestamp(1_800_000_000, 0),
                },
                StageUsage {
                    stage: "train".into(),
                    usage: Vec::new(),
                    since: None,
                },
            ],
        };
        let patch = usage.patch();
        let stages = patch["status"]["stages"].as_array().unwrap();
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0]["name"], "ingest");
        assert_eq!(stages[0]["usage"][0]["count"], 2);
        assert!(
            stages[0]["usageSince"]
                .as_str()
                .unwrap()
                .starts_with("2027-01-15")
        );
        assert_eq!(
            stages[1].as_object().unwrap().len(),
            2,
            "name and usage only"
        );
        assert_eq!(
            patch["status"].as_object().unwrap().len(),
            1,
            "nothing of the status but the stages"
        );
    }
}
