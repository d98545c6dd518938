//! Keeps each AccessGuardrail's status, and the namespace isolation guardrails ask for
//! (`spec.isolateUnselectedPods`, [`isolation`]).
//!
//! A small loop of its own beside the pipeline controller (it never holds up a reconcile),
//! driven by the caches: every 2 seconds it fingerprints the guardrails (name, uid, generation),
//! the namespaces' labels and the pipelines (uid, generation), and does its work only when that
//! changed (or every 5 minutes, to repair what someone else changed): a burst of changes is one
//! round. Then:
//!
//! - each pipeline whose generation or applicable guardrails changed is planned again, on a
//!   blocking thread, with the same pure core as the reconciles (`plan::build`); the others'
//!   results are kept ([`summary::PipelineFacts`]);
//! - per guardrail, what it bounds and denies is added up, and its status is built and compared
//!   with the one it has: it is written (server-side apply of the status subresource) only when
//!   it differs, so a steady state makes no write;
//! - per namespace with AIPipelines, the default-deny NetworkPolicy is applied or deleted as the
//!   guardrails selecting it ask, and re-applied when someone deletes or changes it.
//!
//! Statuses are written only by an operator that sees every pipeline (no `--watch-namespace`,
//! one shard): one that sees a part would report a part, and two such operators would
//! overwrite each other's counts for ever.

mod isolation;
mod summary;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tracing::{info, warn};

use super::Context;
use crate::api::validate::validate;
use crate::api::{AIPipeline, AccessGuardrail, AccessGuardrailStatus};
use crate::k8s::{
    Api, FIELD_MANAGER, ManagedKind, Namespace, PartialObjectMeta, Patch, PatchParams, Resource,
    ResourceExt, Store,
};
use summary::{FirstSeen, PipelineFacts};

const PAUSE: Duration = Duration::from_secs(2);
const MAX_PAUSE: Duration = Duration::from_secs(60);
const RESYNC: Duration = Duration::from_secs(300);
/// How long the echo of a NetworkPolicy write may take to reach the index before the policy is
/// taken for changed by someone else.
const ECHO_WAIT: Duration = Duration::from_secs(10);

/// See the README's metrics table.
#[derive(Debug, Default)]
pub(crate) struct GuardrailMetrics {
    pub status_writes: Counter,
    pub invalid: Gauge,
    pub selecting_nothing: Gauge,
    pub isolated_namespaces: Gauge,
}

impl GuardrailMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> GuardrailMetrics {
        let m = GuardrailMetrics::default();
        registry.register(
            "guardrail_status_writes",
            "Writes of an AccessGuardrail's status (made only when it changed: none in a steady state)",
            m.status_writes.clone(),
        );
        registry.register(
            "guardrails_invalid",
            "AccessGuardrails whose Valid condition is False (they deny everything where they apply)",
            m.invalid.clone(),
        );
        registry.register(
            "guardrails_selecting_no_namespace",
            "AccessGuardrails whose namespace selector selects no namespace",
            m.selecting_nothing.clone(),
        );
        registry.register(
            "isolated_namespaces",
            "Namespaces with the default-deny NetworkPolicy of isolateUnselectedPods",
            m.isolated_namespaces.clone(),
        );
        m
    }
}

/// What the loop is to do.
pub(crate) struct Settings {
    /// Write the guardrails' statuses (only an operator that sees every pipeline).
    pub statuses: bool,
    /// The operator's own namespace, never isolated.
    pub operator_namespace: String,
    /// `--watch-namespace`, for listing the NetworkPolicies at start.
    pub watch_namespace: Option<String>,
    /// Which namespaces are this operator's (its watch scope and shard).
    pub owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// What the loop remembers between rounds.
#[derive(Default)]
struct State {
    fingerprint: Option<u64>,
    resync_at: Option<Instant>,
    /// Per AIPipeline uid: what its plan was computed from, and what it gave.
    planned: HashMap<String, (u64, Arc<PipelineFacts>)>,
    /// Per guardrail uid: when its current denials were first seen.
    first_seen: HashMap<String, FirstSeen>,
    /// Per guardrail uid: the status last written (the cache may not show it yet).
    written: HashMap<String, AccessGuardrailStatus>,
    /// The namespaces that have the NetworkPolicy, with the resourceVersion written or
    /// listed and when it was written; None until listed at start.
    isolated: Option<BTreeMap<String, (String, Option<Instant>)>>,
    /// The namespaces that should have it, with the guardrails asking.
    isolate: BTreeMap<String, Vec<String>>,
    /// Namespaces where an object of the name is someone else's, and when that was found: not
    /// looked at again for a minute (a lasting refusal must not slow the other namespaces).
    refused: HashMap<String, Instant>,
    /// The caches' event counts at the last round that worked.
    seen: Option<[u64; 3]>,
}

/// Keeps the guardrails' statuses and the namespace isolation until the process ends.
pub(crate) async fn keep(ctx: Arc<Context>, pipelines: Store<AIPipeline>, settings: Settings) {
    if !settings.statuses {
        info!(
            "this operator sees only some namespaces (--watch-namespace or sharding): it keeps the isolation of its namespaces, and leaves AccessGuardrail statuses to an operator that watches every namespace"
        );
    }
    let mut state = State::default();
    let mut pause = PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        if !ctx.synced.load(Ordering::Acquire) {
            continue;
        }
        let ok = round(&ctx, &pipelines, &settings, &mut state).await;
        pause = if ok {
            PAUSE
        } else {
            (pause * 2).min(MAX_PAUSE)
        };
    }
}

/// One round; whether everything it tried worked (a failure is retried at the next round, with
/// a longer pause).
async fn round(
    ctx: &Arc<Context>,
    pipelines: &Store<AIPipeline>,
    settings: &Settings,
    state: &mut State,
) -> bool {
    let resync = state.resync_at.is_none_or(|at| at.elapsed() >= RESYNC);
    // No cache took an event since the last round that worked: nothing to work out.
    let seen = ctx.events.snapshot();
    if state.seen == Some(seen) && !resync {
        return keep_isolation(ctx, settings, state).await;
    }
    let guardrails = ctx.guardrails.state();
    let all = pipelines.state();
    let fingerprint = fingerprint(&guardrails, &ctx.namespaces.state(), &all);
    let mut ok = true;
    if state.fingerprint != Some(fingerprint) || resync {
        if resync {
            // Compare with the cluster, not with what was last written.
            state.written.clear();
            state.resync_at = Some(Instant::now());
        }
        let input = Input {
            guardrails: guardrails.clone(),
            pipelines: all,
            namespaces: ctx.namespaces.clone(),
            statuses: settings.statuses,
            operator_namespace: settings.operator_namespace.clone(),
            owns: settings.owns.clone(),
            planned: std::mem::take(&mut state.planned),
        };
        let started = Instant::now();
        let Ok(output) = tokio::task::spawn_blocking(move || compute(input)).await else {
            warn!("working out the guardrails' statuses failed; retrying");
            return false;
        };
        if output.replanned > 0 {
            info!(
                pipelines = output.planned.len(),
                replanned = output.replanned,
                elapsed_ms = started.elapsed().as_millis(),
                "guardrail statuses worked out"
            );
        }
        state.planned = output.planned;
        state.isolate = output.isolate;
        if settings.statuses {
            ok &= write_statuses(ctx, &guardrails, &output.tallies, state).await;
        }
        if ok {
            state.fingerprint = Some(fingerprint);
        }
    }
    ok &= keep_isolation(ctx, settings, state).await;
    if ok {
        state.seen = Some(seen);
    }
    ok
}

/// A hash of everything the statuses and the isolation are computed from. Order does not
/// matter (the hashes of the parts are added), so nothing is sorted.
fn fingerprint(
    guardrails: &[Arc<AccessGuardrail>],
    namespaces: &[Arc<PartialObjectMeta<Namespace>>],
    pipelines: &[Arc<AIPipeline>],
) -> u64 {
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let mut sum = 0u64;
    let mut add = |h: u64| sum = sum.wrapping_add(h);
    for g in guardrails {
        add(hasher.hash_one((
            "g",
            g.metadata.name.as_deref(),
            g.metadata.uid.as_deref(),
            g.metadata.generation,
        )));
    }
    for n in namespaces {
        add(hasher.hash_one(("n", n.metadata.name.as_deref(), &n.metadata.labels)));
    }
    for p in pipelines {
        add(hasher.hash_one((
            "p",
            p.metadata.uid.as_deref(),
            p.metadata.generation,
            p.metadata.deletion_timestamp.is_some(),
        )));
    }
    sum
}

struct Input {
    guardrails: Vec<Arc<AccessGuardrail>>,
    pipelines: Vec<Arc<AIPipeline>>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    statuses: bool,
    operator_namespace: String,
    owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    planned: HashMap<String, (u64, Arc<PipelineFacts>)>,
}

struct Output {
    planned: HashMap<String, (u64, Arc<PipelineFacts>)>,
    /// How many pipelines were planned again (the others' results were kept).
    replanned: usize,
    tallies: BTreeMap<String, summary::Tally>,
    isolate: BTreeMap<String, Vec<String>>,
}

/// The guardrails' tallies and the namespaces to isolate (synchronous: run on a blocking
/// thread, as planning every pipeline after a guardrail change takes a while at 10,000).
fn compute(input: Input) -> Output {
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let selectors: Vec<(&AccessGuardrail, Option<kube::core::Selector>)> = input
        .guardrails
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none())
        .map(|g| {
            let parsed = kube::core::Selector::try_from(g.spec.namespace_selector.clone()).ok();
            (&**g, parsed)
        })
        .collect();
    // A selector that does not parse applies everywhere (and denies): the policy's rule.
    let selects = |selector: &Option<kube::core::Selector>, labels: &BTreeMap<String, String>| {
        use kube::core::SelectorExt;
        selector.as_ref().is_none_or(|s| s.matches(labels))
    };

    let mut selected: BTreeMap<String, u32> =
        selectors.iter().map(|(g, _)| (g.name_any(), 0)).collect();
    for ns in input.namespaces.state() {
        let name = ns.name_any();
        let labels = crate::k8s::with_name_label(ns.labels().clone(), &name);
        for (g, selector) in &selectors {
            if selects(selector, &labels)
                && let Some(n) = selected.get_mut(&g.name_any())
            {
                *n += 1;
            }
        }
    }

    let mut by_namespace: BTreeMap<String, Vec<&AIPipeline>> = BTreeMap::new();
    for p in &input.pipelines {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if let Some(ns) = p.metadata.namespace.as_deref() {
            by_namespace.entry(ns.to_string()).or_default().push(p);
        }
    }

    let mut planned = HashMap::with_capacity(input.pipelines.len());
    let mut old = input.planned;
    let mut isolate = BTreeMap::new();
    let mut replanned = 0;
    for (namespace, members) in &by_namespace {
        let labels = crate::k8s::namespace_labels(&input.namespaces, namespace);
        let applicable: Vec<&AccessGuardrail> = selectors
            .iter()
            .filter(|(_, s)| selects(s, &labels))
            .map(|(g, _)| *g)
            .collect();
        if (input.owns)(namespace) && !isolation::exempt(namespace, &input.operator_namespace) {
            let asking: Vec<String> = applicable
                .iter()
                .filter(|g| g.spec.isolate_unselected_pods)
                .map(|g| g.name_any())
                .collect();
            if !asking.is_empty() {
                isolate.insert(namespace.clone(), asking);
            }
        }
        if !input.statuses {
            continue;
        }
        let scope_key = hasher.hash_one((
            &labels,
            applicable
                .iter()
                .map(|g| {
                    (
                        g.metadata.name.as_deref(),
                        g.metadata.uid.as_deref(),
                        g.metadata.generation,
                    )
                })
                .collect::<Vec<_>>(),
        ));
        let mut owned: Option<Vec<AccessGuardrail>> = None;
        for p in members {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let key = hasher.hash_one((scope_key, &uid, p.metadata.generation));
            let facts = match old.remove(&uid) {
                Some((k, facts)) if k == key => facts,
                _ => {
                    replanned += 1;
                    let guardrails = owned
                        .get_or_insert_with(|| applicable.iter().map(|g| (*g).clone()).collect());
                    Arc::new(facts_of(p, namespace, &labels, guardrails))
                }
            };
            planned.insert(uid, (key, facts));
        }
    }
    let tallies = summary::tally(&selected, planned.values().map(|(_, f)| &**f));
    Output {
        planned,
        replanned,
        tallies,
        isolate,
    }
}

/// What a pipeline contributes: nothing when it is invalid (it is granted nothing either).
fn facts_of(
    pipeline: &AIPipeline,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    guardrails: &[AccessGuardrail],
) -> PipelineFacts {
    match validate(pipeline) {
        Ok(valid) => PipelineFacts::of(&crate::plan::build(&valid, namespace, labels, guardrails)),
        Err(_) => PipelineFacts::default(),
    }
}

/// Builds each guardrail's status and writes those that changed.
async fn write_statuses(
    ctx: &Context,
    guardrails: &[Arc<AccessGuardrail>],
    tallies: &BTreeMap<String, summary::Tally>,
    state: &mut State,
) -> bool {
    let api = Api::<AccessGuardrail>::all(ctx.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let now = summary::now_seconds();
    let mut ok = true;
    let (mut invalid, mut nothing) = (0i64, 0i64);
    let live: Vec<String> = guardrails
        .iter()
        .filter_map(|g| g.metadata.uid.clone())
        .collect();
    state.first_seen.retain(|uid, _| live.contains(uid));
    state.written.retain(|uid, _| live.contains(uid));
    for g in guardrails {
        let name = g.name_any();
        let (Some(uid), Some(tally)) = (g.metadata.uid.clone(), tallies.get(&name)) else {
            continue;
        };
        let old = state.written.get(&uid).or(g.status.as_ref());
        let seen = state.first_seen.entry(uid.clone()).or_default();
        let new = summary::status(g, tally, old, seen, now);
        let condition = |t: &str| new.conditions.iter().find(|c| c.type_ == t);
        if condition(summary::VALID).is_some_and(|c| c.status == "False") {
            invalid += 1;
        }
        if condition(summary::SELECTS_NO_NAMESPACE).is_some_and(|c| c.status == "True") {
            nothing += 1;
        }
        if old == Some(&new) || g.status.as_ref() == Some(&new) {
            state.written.insert(uid, new);
            continue;
        }
        let was_valid = old
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == summary::VALID))
            .map(|c| c.status.clone());
        let patch = json!({
            "apiVersion": AccessGuardrail::api_version(&()),
            "kind": AccessGuardrail::kind(&()),
            "status": new,
        });
        match api
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                ctx.metrics.guardrails.status_writes.inc();
                if let Some(c) = condition(summary::VALID)
                    && c.status == "False"
                    && was_valid.as_deref() != Some("False")
                {
                    warn!(guardrail = %name, message = %c.message, "AccessGuardrail is invalid");
                }
                state.written.insert(uid, new);
            }
            Err(error) => {
                ok = false;
                warn!(guardrail = %name, %error, "cannot write the AccessGuardrail's status; retrying");
            }
        }
    }
    ctx.metrics.guardrails.invalid.set(invalid);
    ctx.metrics.guardrails.selecting_nothing.set(nothing);
    ok
}

/// Applies the default-deny NetworkPolicy where it is asked for and missing or changed, and
/// deletes it where it is no longer asked for.
async fn keep_isolation(ctx: &Context, settings: &Settings, state: &mut State) -> bool {
    let isolated = match &mut state.isolated {
        Some(isolated) => isolated,
        None => {
            match isolation::existing(ctx, settings.watch_namespace.as_deref(), &*settings.owns)
                .await
            {
                Ok(found) => state.isolated.insert(
                    found
                        .into_iter()
                        .map(|(ns, version)| (ns, (version, None)))
                        .collect(),
                ),
                Err(error) => {
                    warn!(%error, "cannot list the namespace isolation NetworkPolicies; retrying");
                    return false;
                }
            }
        }
    };
    let mut ok = true;
    state.refused.retain(|_, at| at.elapsed() < MAX_PAUSE);
    for (namespace, guardrails) in &state.isolate {
        if state.refused.contains_key(namespace) {
            continue;
        }
        let current = ctx
            .children
            .get(ManagedKind::NetworkPolicy, namespace, isolation::NAME)
            .map(|i| i.resource_version.to_string());
        // Written by us and unchanged since (the index shows the version the write returned),
        // or written so recently that the index may not show it yet: nothing to do. A deleted
        // or edited one is applied again.
        if let Some((version, at)) = isolated.get(namespace)
            && (current.as_ref() == Some(version) || at.is_some_and(|at| at.elapsed() < ECHO_WAIT))
        {
            continue;
        }
        match isolation::apply(ctx, namespace, guardrails).await {
            Ok(isolation::Applied::Written(version)) => {
                isolated.insert(namespace.clone(), (version, Some(Instant::now())));
            }
            Ok(isolation::Applied::Refused) => {
                isolated.remove(namespace);
                state.refused.insert(namespace.clone(), Instant::now());
            }
            Err(error) => {
                ok = false;
                warn!(%namespace, %error, "cannot write the namespace isolation NetworkPolicy; retrying");
            }
        }
    }
    let gone: Vec<String> = isolated
        .keys()
        .filter(|ns| !state.isolate.contains_key(*ns))
        .cloned()
        .collect();
    for namespace in gone {
        match isolation::delete(ctx, &namespace).await {
            Ok(()) => {
                isolated.remove(&namespace);
            }
            Err(error) => {
                ok = false;
                warn!(%namespace, %error, "cannot delete the namespace isolation NetworkPolicy; retrying");
            }
        }
    }
    ctx.metrics
        .guardrails
        .isolated_namespaces
        .set(i64::try_from(isolated.len()).unwrap_or(i64::MAX));
    ok
}
