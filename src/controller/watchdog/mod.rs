//! The effective-permission watchdog: RoleBindings and ClusterRoleBindings (and the roles they
//! refer to) that reach a stage's ServiceAccount other than Portcullis's own ([`grants`]).
//!
//! Once a second it indexes the bindings by subject and looks up every stage of every cached
//! pipeline. A binding that newly reaches a stage is a `foreign-grant` decision record (with
//! the rules it adds) and a Warning Event on the AIPipeline; the pipeline's condition
//! `ExclusiveAccess` is `False` naming the bindings while any remains, and `True` again once
//! they are removed; `portcullis_foreign_grants` counts them now. It reads only: it never
//! edits or deletes someone else's object.

pub(crate) mod grants;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::json;
use tracing::{info, warn};

use super::Context;
use super::events::{self, EventReason};
use super::status;
use crate::api::AIPipeline;
use crate::audit::{Action, Entry};
use crate::k8s::{
    Api, Client, Patch, PatchParams, Resource, ResourceExt, Role, RoleBinding, Store,
    WatchStreamExt, now, reflector, watcher,
};
use crate::plan::names;
use grants::{ForeignGrant, Index, Rbac};

/// The field manager of the `ExclusiveAccess` condition, beside the reconcile's `portcullis`.
const FIELD_MANAGER: &str = "portcullis-watchdog";

/// The caches the watchdog reads.
struct Caches {
    role_bindings: Store<RoleBinding>,
    cluster_role_bindings: Store<ClusterRoleBinding>,
    roles: Store<Role>,
    cluster_roles: Store<ClusterRole>,
}

/// A cache of `api`'s objects; each event it takes (once the cache holds it) is counted in
/// `events`.
fn cache<K>(api: Api<K>, events: &Arc<AtomicU64>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|o| o.meta_mut().managed_fields = None),
    )
    .default_backoff()
    .touched_objects();
    let events = events.clone();
    tokio::spawn(stream.for_each(move |event| {
        events.fetch_add(1, Ordering::Release);
        if let Err(error) = event {
            // Retried with backoff; lacking RBAC to list the kind is the usual cause.
            warn!(%error, kind = K::kind(&()).as_ref(), "the foreign-grant watchdog cannot watch this kind");
        }
        futures::future::ready(())
    }));
    store
}

/// Watches the RBAC objects (RoleBindings and Roles of `namespace`, or of every namespace) and
/// checks the pipelines' stages against them until the process ends.
pub(crate) async fn watch(
    ctx: Arc<Context>,
    pipelines: Store<AIPipeline>,
    namespace: Option<String>,
) {
    let client: &Client = &ctx.client;
    let namespaced = |c: &Client| match &namespace {
        Some(ns) => (
            Api::namespaced(c.clone(), ns),
            Api::namespaced(c.clone(), ns),
        ),
        None => (Api::all(c.clone()), Api::all(c.clone())),
    };
    let (rb_api, role_api): (Api<RoleBinding>, Api<Role>) = namespaced(client);
    let rbac_events = Arc::new(AtomicU64::new(0));
    let caches = Caches {
        role_bindings: cache(rb_api, &rbac_events),
        cluster_role_bindings: cache(Api::all(client.clone()), &rbac_events),
        roles: cache(role_api, &rbac_events),
        cluster_roles: cache(Api::all(client.clone()), &rbac_events),
    };
    for ready in [
        caches.role_bindings.wait_until_ready().await,
        caches.cluster_role_bindings.wait_until_ready().await,
        caches.roles.wait_until_ready().await,
        caches.cluster_roles.wait_until_ready().await,
    ] {
        if ready.is_err() {
            return;
        }
    }
    info!("watching RoleBindings and ClusterRoleBindings for foreign grants to stages");
    let mut seen: HashMap<String, BTreeSet<(String, ForeignGrant)>> = HashMap::new();
    // The RBAC and pipeline caches' event counts at the last round that wrote all it had to:
    // while they stand, nothing can have changed, and no pipeline is looked at.
    let mut last: Option<(u64, [u64; 3])> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !ctx.synced.load(Ordering::Acquire) {
            continue;
        }
        let now = (rbac_events.load(Ordering::Acquire), ctx.events.snapshot());
        if last == Some(now) {
            continue;
        }
        let done = round(&ctx, &pipelines, &caches, &mut seen).await;
        last = done.then_some(now);
    }
}

/// One check of every pipeline; whether every report and condition it had to write was
/// written.
async fn round(
    ctx: &Context,
    pipelines: &Store<AIPipeline>,
    caches: &Caches,
    seen: &mut HashMap<String, BTreeSet<(String, ForeignGrant)>>,
) -> bool {
    let (rb, crb, roles, crs) = (
        caches.role_bindings.state(),
        caches.cluster_role_bindings.state(),
        caches.roles.state(),
        caches.cluster_roles.state(),
    );
    let rbac = Rbac {
        role_bindings: rb.iter().map(AsRef::as_ref).collect(),
        cluster_role_bindings: crb.iter().map(AsRef::as_ref).collect(),
        roles: roles.iter().map(AsRef::as_ref).collect(),
        cluster_roles: crs.iter().map(AsRef::as_ref).collect(),
    };
    let index = Index::new(&rbac);
    let mut total = 0usize;
    let mut done = true;
    let mut live = BTreeSet::new();
    for pipeline in pipelines.state() {
        let (Some(uid), Some(namespace)) = (pipeline.uid(), pipeline.namespace()) else {
            continue;
        };
        if pipeline.metadata.deletion_timestamp.is_some() {
            continue;
        }
        live.insert(uid.clone());
        let name = pipeline.name_any();
        let now_found: BTreeSet<(String, ForeignGrant)> = pipeline
            .spec
            .stages
            .iter()
            .flat_map(|stage| {
                let sa = names::stage_object(&namespace, &name, &stage.name);
                index
                    .grants(&namespace, &sa)
                    .into_iter()
                    .map(move |g| (stage.name.clone(), g))
            })
            .collect();
        total += now_found.len();
        let before = seen.get(&uid).cloned().unwrap_or_default();
        if now_found == before && !stale_condition(&pipeline, &now_found) {
            continue;
        }
        let new: Vec<&(String, ForeignGrant)> = now_found.difference(&before).collect();
        if !report(ctx, &pipeline, &namespace, &name, &new).await {
            done = false;
            continue;
        }
        // A condition that could not be written is stale in the cache next round, and
        // written again then; the grants are not reported again.
        done &= write_condition(ctx, &pipeline, &namespace, &name, &now_found).await;
        seen.insert(uid, now_found);
    }
    seen.retain(|uid, _| live.contains(uid));
    ctx.metrics
        .admission
        .foreign_grants
        .set(i64::try_from(total).unwrap_or(i64::MAX));
    done
}

/// Whether the pipeline's `ExclusiveAccess` condition says otherwise than `found` (after a
/// restart, or when someone changed it).
fn stale_condition(pipeline: &AIPipeline, found: &BTreeSet<(String, ForeignGrant)>) -> bool {
    let condition = pipeline.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == status::types::EXCLUSIVE_ACCESS)
    });
    match condition {
        Some(c) => (c.status == "True") != found.is_empty() || c.message != message(found),
        None => !found.is_empty(),
    }
}

/// The bindings, for the condition.
fn described(found: &BTreeSet<(String, ForeignGrant)>) -> Vec<String> {
    found
        .iter()
        .map(|(stage, g)| format!("{} ({}) to stage {stage} via {}", g.binding, g.role, g.via))
        .collect()
}

fn message(found: &BTreeSet<(String, ForeignGrant)>) -> String {
    status::exclusive_access(&described(found), None, &[], now()).message
}

/// Records and announces the grants that newly appeared. `false` when the record could not
/// be written (tried again next round).
async fn report(
    ctx: &Context,
    pipeline: &AIPipeline,
    namespace: &str,
    name: &str,
    new: &[&(String, ForeignGrant)],
) -> bool {
    if new.is_empty() {
        return true;
    }
    let entries = new
        .iter()
        .map(|(stage, g)| {
            let sa = names::stage_object(namespace, name, stage);
            let message = format!(
                "{} grants {} to the ServiceAccount {namespace}/{sa} of stage {stage} via {}, beside what Portcullis decided: {}",
                g.binding,
                g.role,
                g.via,
                if g.rules.is_empty() { "no rules".to_string() } else { g.rules.join("; ") }
            );
            let mut entry = Entry::new(Action::ForeignGrant, namespace, name, message);
            entry.stage = Some(stage.clone());
            entry.subject = Some(format!("system:serviceaccount:{namespace}:{sa}"));
            entry.object = Some(g.binding.clone());
            entry.reason = Some("ForeignGrant".into());
            entry.pipeline_uid = pipeline.uid();
            entry.generation = pipeline.metadata.generation;
            entry.item = Some(json!({"binding": g.binding, "role": g.role, "via": g.via, "rules": g.rules}));
            entry
        })
        .collect::<Vec<_>>();
    let notes: Vec<String> = entries.iter().map(|e| e.message.clone()).collect();
    if let Err(error) = ctx.record(entries).await {
        warn!(%error, %namespace, pipeline = %name, "cannot record a foreign grant; retrying");
        return false;
    }
    let recorder = ctx.recorder();
    let reference = pipeline.object_ref(&());
    for note in notes {
        warn!(%namespace, pipeline = %name, grant = %note, "foreign grant to a stage");
        events::warn(&recorder, &reference, EventReason::ForeignGrant, note).await;
    }
    true
}

/// Sets `ExclusiveAccess` from `found`.
async fn write_condition(
    ctx: &Context,
    pipeline: &AIPipeline,
    namespace: &str,
    name: &str,
    found: &BTreeSet<(String, ForeignGrant)>,
) -> bool {
    let old = pipeline
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition =
        status::exclusive_access(&described(found), pipeline.metadata.generation, old, now());
    let patch = json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "status": {"conditions": [condition]},
    });
    if let Err(error) = Api::<AIPipeline>::namespaced(ctx.client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        warn!(%error, %namespace, pipeline = %name, "cannot set ExclusiveAccess; retrying");
        return false;
    }
    true
}
