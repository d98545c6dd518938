//! The `portcullis.dev/vault-cleanup` finalizer: added before anything is written to Vault for a
//! pipeline, and removed once a deleted pipeline's leases are revoked and its roles and policies
//! deleted.

use serde_json::json;
use vaultrs::client::VaultClient;

use super::state::VaultState;
use super::{VaultProblem, VaultSide, Work, credentials, policies};
use crate::api::AIPipeline;
use crate::controller::{Context, Error, Result};
use crate::k8s::{Api, Patch, PatchParams, ResourceExt, merge_patch_if_present};

/// Held on every AIPipeline with Vault state until that state is gone from Vault.
pub(crate) const FINALIZER: &str = "portcullis.dev/vault-cleanup";

/// Whether the pipeline holds the finalizer.
pub(crate) fn holds(pipeline: &AIPipeline) -> bool {
    pipeline.finalizers().iter().any(|f| f == FINALIZER)
}

fn api(ctx: &Context, pipeline: &AIPipeline) -> Api<AIPipeline> {
    Api::namespaced(
        ctx.client.clone(),
        &pipeline.namespace().unwrap_or_default(),
    )
}

/// Adds the finalizer (guarded by the resourceVersion: a stale pipeline is retried).
pub(super) async fn add(ctx: &Context, pipeline: &AIPipeline) -> Result<()> {
    let mut finalizers = pipeline.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": pipeline.resource_version()}});
    api(ctx, pipeline)
        .patch(
            &pipeline.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// A deleted pipeline: revoke its leases, delete its roles and policies, forget its state, and
/// let the deletion go on. Fails with [`Error::Vault`] while that waits for Vault (retried).
pub(crate) async fn finalize(ctx: &Context, pipeline: &AIPipeline) -> Result<()> {
    if !holds(pipeline) {
        return Ok(());
    }
    let Some(vault) = ctx.vault.as_ref() else {
        // Removing the finalizer now would abandon live leases, policies and roles: keep it
        // and say what to do.
        return Err(Error::Vault(VaultProblem::CleanupNotConfigured));
    };
    let work = Work::new(ctx, vault, pipeline);
    let mut state = work.load().await?;
    if !state.is_empty() {
        let client = match vault.session.client().await {
            Ok(client) => client,
            Err(e) => return Err(work.failed("login", None, "Vault session".into(), e).await),
        };
        clean(&work, &client, &mut state).await?;
    }
    work.forget().await?;
    let finalizers: Vec<&String> = pipeline
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": pipeline.resource_version()}});
    merge_patch_if_present(&api(ctx, pipeline), &pipeline.name_any(), &patch)
        .await
        .map_err(Error::Kube)
}

/// Revokes every lease, then deletes every role and policy.
async fn clean(work: &Work<'_>, client: &VaultClient, state: &mut VaultState) -> Result<()> {
    let ids: Vec<String> = state.leases.iter().map(|l| l.lease_id.clone()).collect();
    for id in ids {
        credentials::revoke(work, client, state, &id, "the pipeline is deleted", None).await?;
    }
    policies::delete_unplanned(
        work,
        client,
        state,
        &VaultSide::default(),
        "the pipeline is deleted",
    )
    .await
}
