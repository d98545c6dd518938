//! Housekeeping: what is remembered per pipeline is forgotten once the pipeline is gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::api::AIPipeline;
use crate::controller::Context;
use crate::k8s::{ResourceExt, Store};

/// Every five minutes, once the caches are synced, forgets deleted pipelines' per-pipeline
/// memory. Runs until the process ends.
pub(crate) async fn forget_deleted_pipelines(ctx: Arc<Context>, pipelines: Store<AIPipeline>) {
    let mut every = tokio::time::interval(Duration::from_secs(300));
    every.tick().await;
    loop {
        every.tick().await;
        if !ctx.synced.load(Ordering::Acquire) {
            continue;
        }
        let live = pipelines
            .state()
            .iter()
            .filter_map(|p| p.uid())
            .collect::<HashSet<_>>();
        ctx.forget_deleted(&live).await;
    }
}
