//! Cold convergence of N pipelines × 3 stages (300 by default) against a real API server,
//! compared with the floor: a plain concurrent server-side apply of the same planned objects
//! (owner references to their AIPipelines included, as the operator writes them).
//!
//! Prints the time to converge, the API writes it took (from the API server's
//! `apiserver_request_total`), the apply → Ready latency of new pipelines while N are managed,
//! the writes and the operator's CPU during a window of steady state, and the operator's peak
//! RSS. Targets: convergence within 1.2× the floor, new pipeline Ready p99 ≤ 100 ms, zero writes
//! and under 1% of a core in steady state. Nothing is asserted: this prints figures
//! (`make bench-converge`; `make bench-scale` runs it at 1,000 and 10,000 pipelines).
//!
//! Settings (environment): `PORTCULLIS_BENCH_PIPELINES` (default 300), `PORTCULLIS_BENCH_FLOOR`
//! (`0` skips the floor, for sizes where only memory and latency matter), `PORTCULLIS_BENCH_NEW`
//! (new pipelines timed one at a time after convergence, default 50) and
//! `PORTCULLIS_BENCH_STEADY` (seconds of steady state, default 60) and
//! `PORTCULLIS_BENCH_CONCURRENCY` (the operator's `--concurrency`, default 8 as the operator's own),
//! `PORTCULLIS_BENCH_STATUS_PATCH` (`merge`: the statuses beside the floor as merge patches)
//! `PORTCULLIS_BENCH_ALL_NAMESPACES` (`1`: the operator watches every namespace, so it also
//! keeps the AccessGuardrails' statuses, and reconciles the floor's pipelines as well) and
//! `PORTCULLIS_BENCH_NO_CEL` (`1`: the AIPipeline CRD without its `x-kubernetes-validations`, to
//! measure what the CEL rules cost each write). `PORTCULLIS_OPERATOR_BIN` runs another build of
//! the operator (the image's static musl binary, for example), `PORTCULLIS_OPERATOR_WRAPPER` runs
//! it under a profiler (`heaptrack -o /tmp/op`).
//!
//! Writes are counted cluster-wide, so both windows include what kube-controller-manager does
//! in reaction (on 1.20 a token Secret per new ServiceAccount; not since 1.24); both windows create the same
//! number of ServiceAccounts, so the comparison stays fair, and the breakdown by resource shows
//! it.
#![allow(
    clippy::too_many_lines,
    reason = "the benchmark is one run, phase after phase"
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use portcullis::api::{AIPipeline, AccessGuardrail};
use portcullis::controller::status;
use portcullis::plan::{self, Object};
use serde_json::json;

/// A numeric setting from the environment.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Write requests (create, update, patch, apply, delete) by "VERB resource", from /metrics.
async fn writes(cp: &support::ControlPlane) -> BTreeMap<String, f64> {
    write_series(
        &cp.apiserver_metrics().await,
        "apiserver_request_total{",
        false,
    )
}

/// Seconds the API server spent answering write requests, by "VERB resource[/subresource]".
async fn write_seconds(cp: &support::ControlPlane) -> BTreeMap<String, f64> {
    write_series(
        &cp.apiserver_metrics().await,
        "apiserver_request_duration_seconds_sum{",
        true,
    )
}

/// A series of write requests summed by verb and resource (and subresource, if asked).
fn write_series(text: &str, series: &str, subresource: bool) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(series)) {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        let verb = label("verb");
        if !matches!(
            verb.as_str(),
            "POST"
                | "PUT"
                | "PATCH"
                | "APPLY"
                | "DELETE"
                | "DELETECOLLECTION"
                | "CREATE"
                | "UPDATE"
        ) {
            continue;
        }
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        let sub = label("subresource");
        let key = if subresource && !sub.is_empty() {
            format!("{verb} {}/{sub}", label("resource"))
        } else {
            format!("{verb} {}", label("resource"))
        };
        *out.entry(key).or_default() += value;
    }
    out
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or_default()))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// The writes the operator makes: server-side applies, patches, deletes, and Events. The
/// controller manager's reactions (on old clusters, token Secrets) are POSTs
/// and PUTs of other resources.
fn by_operator(d: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    d.iter()
        .filter(|(k, _)| {
            k.starts_with("APPLY ")
                || k.starts_with("PATCH ")
                || k.starts_with("DELETE ")
                || k.as_str() == "POST events"
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn total(d: &BTreeMap<String, f64>) -> f64 {
    d.values().sum::<f64>().max(0.0)
}

fn pipelines(namespace: &str, range: std::ops::Range<usize>) -> Vec<AIPipeline> {
    let text = std::fs::read_to_string(root().join("examples/pipelines/fraud-detector.yaml"))
        .expect("example");
    let template: AIPipeline = serde_saphyr::from_str(&text).expect("example parses");
    range
        .map(|i| {
            let mut p = template.clone();
            p.metadata.name = Some(format!("fraud-{i}"));
            p.metadata.namespace = Some(namespace.into());
            for stage in &mut p.spec.stages {
                // Without a Vault (this benchmark runs none; `make bench-vault` measures Vault),
                // requested credentials keep a pipeline from Ready (`VaultNotConfigured`): the
                // Kubernetes objects are what is compared with the floor.
                stage.vault = None;
                // Nor the reads of the credential Secrets it would deliver (denied without them).
                stage
                    .permissions
                    .retain(|rule| !rule.resources.iter().any(|r| r == "secrets"));
            }
            p
        })
        .collect()
}

fn guardrails(namespaces: &[&str]) -> Vec<AccessGuardrail> {
    ["ingestion", "training", "deployment"]
        .iter()
        .map(|role| {
            let text =
                std::fs::read_to_string(root().join(format!("examples/guardrails/{role}.yaml")))
                    .expect("guardrail");
            let mut g: AccessGuardrail = serde_saphyr::from_str(&text).expect("guardrail parses");
            g.metadata.name = Some(format!("bench-{role}"));
            g.spec.namespace_selector = serde_json::from_value(json!({"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
            ]}))
            .expect("selector");
            g
        })
        .collect()
}

/// The pipelines that own the floor's objects, created before its clock starts and its writes
/// are counted (the operator's are too).
async fn owners(client: &Client, namespace: &str, count: usize) -> Vec<AIPipeline> {
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(pipelines(namespace, 0..count))
        .map(|p| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &p)
                    .await
                    .expect("owner created")
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// The same objects as the operator's, owner references included, by concurrent server-side
/// apply.
async fn floor(
    client: &Client,
    namespace: &str,
    guardrails: &[AccessGuardrail],
    owners: &[AIPipeline],
) -> (Duration, usize) {
    let labels = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    )]);
    let objects: Vec<(Object, serde_json::Value)> = owners
        .iter()
        .flat_map(|p| {
            let mut owner = p.controller_owner_ref(&()).expect("an owner reference");
            owner.block_owner_deletion = Some(true);
            plan::validate_and_build(p, namespace, &labels, guardrails)
                .expect("plans")
                .objects
                .into_iter()
                .map(move |o| {
                    let mut value = serde_json::to_value(&o).expect("object serializes");
                    value["metadata"]["ownerReferences"] = json!([owner]);
                    (o, value)
                })
        })
        .collect();
    let count = objects.len();
    let start = Instant::now();
    futures::stream::iter(objects)
        .map(|(o, value)| {
            let client = client.clone();
            let namespace = namespace.to_string();
            async move {
                let params = PatchParams::apply("floor").force();
                let name = o.name().to_string();
                let result = match o {
                    Object::ServiceAccount(_) => {
                        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
                            client, &namespace,
                        )
                        .patch(&name, &params, &Patch::Apply(&value))
                        .await
                        .map(|_| ())
                    }
                    Object::Role(_) => {
                        Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client, &namespace)
                            .patch(&name, &params, &Patch::Apply(&value))
                            .await
                            .map(|_| ())
                    }
                    Object::RoleBinding(_) => {
                        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(
                            client, &namespace,
                        )
                        .patch(&name, &params, &Patch::Apply(&value))
                        .await
                        .map(|_| ())
                    }
                    Object::NetworkPolicy(_) => {
                        Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
                            client, &namespace,
                        )
                        .patch(&name, &params, &Patch::Apply(&value))
                        .await
                        .map(|_| ())
                    }
                };
                result.expect("floor apply");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    (start.elapsed(), count)
}

/// Writes to each of `owners` the status the operator would (server-side apply, 16 in flight):
/// how long that took.
async fn statuses(
    client: &Client,
    namespace: &str,
    guardrails: &[AccessGuardrail],
    owners: &[AIPipeline],
) -> Duration {
    let labels = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    )]);
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), namespace);
    let patches: Vec<(String, serde_json::Value)> = owners
        .iter()
        .map(|p| {
            let plan = plan::validate_and_build(p, namespace, &labels, guardrails).expect("plans");
            let status = status::for_plan(
                &plan,
                &status::Outcome::default(),
                p.metadata.generation,
                None,
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
            );
            let patch = json!({
                "apiVersion": "portcullis.dev/v1alpha1",
                "kind": "AIPipeline",
                "status": status,
            });
            (p.metadata.name.clone().unwrap_or_default(), patch)
        })
        .collect();
    // `PORTCULLIS_BENCH_STATUS_PATCH=merge` writes them as JSON merge patches instead, to
    // compare what the field manager's apply costs.
    let merge = std::env::var("PORTCULLIS_BENCH_STATUS_PATCH").is_ok_and(|v| v == "merge");
    let start = Instant::now();
    futures::stream::iter(patches)
        .map(|(name, patch)| {
            let api = api.clone();
            async move {
                if merge {
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                } else {
                    api.patch_status(
                        &name,
                        &PatchParams::apply("floor").force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                }
                .expect("status written");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    start.elapsed()
}

/// Removes every CEL rule (`x-kubernetes-validations`) from the AIPipeline CRD, for
/// `PORTCULLIS_BENCH_NO_CEL`.
async fn without_cel(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("x-kubernetes-validations");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds
        .get("aipipelines.portcullis.dev")
        .await
        .expect("the CRD");
    let mut value = serde_json::to_value(&crd).expect("JSON");
    strip(&mut value["spec"]);
    let crd: CustomResourceDefinition = serde_json::from_value(value).expect("a CRD");
    crds.replace("aipipelines.portcullis.dev", &PostParams::default(), &crd)
        .await
        .expect("the CRD without CEL rules");
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("the AIPipeline CRD without its CEL rules (PORTCULLIS_BENCH_NO_CEL)");
}

/// The CPU time the control plane (this run's kube-apiserver and etcd, found by the run's
/// directory in their command lines) has used so far.
fn control_plane_cpu(cp: &support::ControlPlane) -> Duration {
    let dir = cp.dir().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            ((cmdline.contains("kube-apiserver") || cmdline.contains("etcd"))
                && cmdline.contains(&dir))
            .then(|| cpu_of(&pid))
            .flatten()
        })
        .sum()
}

/// The CPU time (user + system) the process has used so far, from /proc.
fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

fn rss_of(pid: &str) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

/// A figure in KiB from the process's `/proc/<pid>/status`.
fn status_field(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then there is nothing to do.
    if !std::env::args().any(|a| a == "--bench") {
        println!("converge: a benchmark; run it with `make bench-converge`");
        return;
    }
    let count = usize::try_from(setting("PORTCULLIS_BENCH_PIPELINES", 300)).expect("a count");
    let with_floor = setting("PORTCULLIS_BENCH_FLOOR", 1) != 0;
    let new_samples = usize::try_from(setting("PORTCULLIS_BENCH_NEW", 50)).expect("a count");
    let steady = Duration::from_secs(setting("PORTCULLIS_BENCH_STEADY", 60));
    let cp = support::control_plane();
    let client = cp.client().await;
    println!(
        "control plane up in {:.1?}; {count} pipelines",
        cp.startup_time()
    );
    if setting("PORTCULLIS_BENCH_NO_CEL", 0) == 1 {
        without_cel(&client).await;
    }
    let floor_ns = support::temp_namespace(&client, "bench-floor", &[]).await;
    let op_ns = support::temp_namespace(&client, "bench-operator", &[]).await;
    let guardrails = guardrails(&[&floor_ns, &op_ns]);
    for g in &guardrails {
        Api::<AccessGuardrail>::all(client.clone())
            .create(&PostParams::default(), g)
            .await
            .expect("guardrail");
    }

    // The floor.
    let floor_time = if with_floor {
        let owners = owners(&client, &floor_ns, count).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = writes(cp).await;
        let seconds_before = write_seconds(cp).await;
        let cp_cpu = control_plane_cpu(cp);
        let (floor_time, objects) = floor(&client, &floor_ns, &guardrails, &owners).await;
        println!(
            "control plane CPU while the floor applied: {:.2?}",
            control_plane_cpu(cp) - cp_cpu
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let floor_writes = delta(&writes(cp).await, &before);
        println!(
            "floor: {objects} objects by concurrent server-side apply in {floor_time:.2?}; {} API writes",
            total(&floor_writes)
        );
        println!("API server time answering the floor's writes, by request:");
        for (request, seconds) in delta(&write_seconds(cp).await, &seconds_before) {
            println!("    {request}: {seconds:.2} s");
        }
        // Not part of the floor, for the accounting: what the pipelines' statuses alone cost.
        let cp_cpu = control_plane_cpu(cp);
        let statuses = statuses(&client, &floor_ns, &guardrails, &owners).await;
        println!(
            "beside the floor, the {count} pipelines' statuses alone: {statuses:.2?}, control plane CPU {:.2?}",
            control_plane_cpu(cp) - cp_cpu
        );
        Some((floor_time, statuses))
    } else {
        None
    };

    // The operator, cold.
    let api: Api<AIPipeline> = Api::namespaced(client.clone(), &op_ns);
    futures::stream::iter(pipelines(&op_ns, 0..count))
        .map(|p| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &p)
                    .await
                    .expect("pipeline created");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().expect("dir");
    let concurrency = [
        "--concurrency".to_string(),
        setting("PORTCULLIS_BENCH_CONCURRENCY", 8).to_string(),
    ];
    let before = writes(cp).await;
    let seconds_before = write_seconds(cp).await;
    let cp_cpu = control_plane_cpu(cp);
    let start = Instant::now();
    let watched = if setting("PORTCULLIS_BENCH_ALL_NAMESPACES", 0) == 1 {
        ""
    } else {
        op_ns.as_str()
    };
    let mut operator = support::Operator::start_with("operator", watched, None, dir, &concurrency);
    // Start-up (process, client, caches) measured apart: /readyz answers once caches are synced.
    let synced = support::wait_for(
        "the operator's caches synced",
        Duration::from_secs(300),
        || async { (operator.http_status("/readyz").await == 200).then(|| start.elapsed()) },
    )
    .await;
    // Watched, not polled: listing every pipeline every 100 ms would load the API server that
    // the operator is racing against, which the floor does not have to bear.
    let ready = |p: &AIPipeline| {
        p.status.as_ref().is_some_and(|s| {
            s.observed_generation == p.metadata.generation
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    };
    let mut done = std::collections::HashSet::new();
    let mut events = std::pin::pin!(
        kube::runtime::watcher(api.clone(), kube::runtime::watcher::Config::default())
            .default_backoff()
            .applied_objects()
    );
    tokio::time::timeout(Duration::from_secs(3600), async {
        while let Some(Ok(p)) = events.next().await {
            if ready(&p) {
                done.insert(p.metadata.name.clone().unwrap_or_default());
            }
            if done.len() == count {
                return;
            }
        }
    })
    .await
    .expect("every pipeline Ready within an hour");
    let converge_time = start.elapsed();
    let pid = std::fs::read_to_string(operator.dir.path().join("operator.pid")).unwrap_or_default();
    println!(
        "CPU while converging: control plane {:.2?}, operator {:.2?}",
        control_plane_cpu(cp) - cp_cpu,
        cpu_of(&pid).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let converge_writes = delta(&writes(cp).await, &before);
    println!("API server time answering the writes while converging, by request:");
    for (request, seconds) in delta(&write_seconds(cp).await, &seconds_before) {
        println!("    {request}: {seconds:.2} s");
    }
    println!(
        "operator: {count} pipelines × 3 stages converged in {converge_time:.2?} from process start ({synced:.2?} of start-up and cache sync, {:.2?} after); {} API writes, {} of them by the operator",
        converge_time - synced,
        total(&converge_writes),
        total(&by_operator(&converge_writes))
    );
    let rss_converged = rss_of(&pid);

    // New pipelines, one at a time, while `count` are managed: apply -> Ready.
    let mut latencies = Vec::with_capacity(new_samples);
    for p in pipelines(&op_ns, count..count + new_samples) {
        let name = p.metadata.name.clone().unwrap_or_default();
        let created = Instant::now();
        api.create(&PostParams::default(), &p)
            .await
            .expect("new pipeline created");
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(Ok(p)) = events.next().await {
                if p.metadata.name.as_deref() == Some(name.as_str()) && ready(&p) {
                    return;
                }
            }
        })
        .await
        .expect("a new pipeline Ready within a minute");
        latencies.push(created.elapsed());
    }
    latencies.sort();
    // The q-th percentile (q in percent), nearest rank.
    let percentile = |q: usize| {
        latencies
            .get((latencies.len() * q).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    if !latencies.is_empty() {
        let p99 = percentile(99);
        println!(
            "new pipeline apply -> Ready with {count} managed ({new_samples} samples): p50 {:.0?}, p99 {p99:.0?}, max {:.0?} (target p99 ≤ 100 ms: {})",
            percentile(50),
            latencies.last().copied().unwrap_or_default(),
            if p99 <= Duration::from_millis(100) {
                "PASS"
            } else {
                "MISS"
            }
        );
    }

    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = writes(cp).await;
    let cpu_before = cpu_of(&pid);
    tokio::time::sleep(steady).await;
    let cpu_after = cpu_of(&pid);
    let steady_writes = delta(&writes(cp).await, &before);
    let rss = rss_of(&pid);
    let rss_parts = status_field(&pid, "RssAnon:").zip(status_field(&pid, "RssFile:"));
    operator.stop();

    println!(
        "steady state: {} API writes in {steady:?} (all sources)",
        total(&steady_writes)
    );
    for (what, n) in &steady_writes {
        println!("    {what}: {n}");
    }
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        let share = (b - a).as_secs_f64() / steady.as_secs_f64() * 100.0;
        println!(
            "steady-state CPU of the operator: {share:.2}% of a core (target < 1%: {})",
            if share < 1.0 { "PASS" } else { "MISS" }
        );
    }
    println!("writes while converging, by verb and resource:");
    for (what, n) in &converge_writes {
        println!("    {what}: {n}");
    }
    match (rss_converged, rss) {
        (Some(at), Some(kib)) => println!(
            "operator peak RSS: {:.1} MiB once converged, {:.1} MiB at the end",
            at as f64 / 1024.0,
            kib as f64 / 1024.0
        ),
        _ => println!("operator peak RSS: unavailable"),
    }
    // What the resident pages are now: the heap and stacks (anonymous) and the binary's code
    // and data read from its file (shared with the page cache, dropped first under pressure).
    if let Some((anon, file)) = rss_parts {
        println!(
            "operator RSS now: {:.1} MiB anonymous (heap, stacks), {:.1} MiB from the binary's file",
            anon as f64 / 1024.0,
            file as f64 / 1024.0
        );
    }
    if let Some((floor_time, statuses)) = floor_time {
        let ratio = converge_time.as_secs_f64() / floor_time.as_secs_f64();
        println!(
            "convergence / floor: {ratio:.2}× from process start (target ≤ 1.2×: {})",
            if ratio <= 1.2 { "PASS" } else { "MISS" }
        );
        let warm = (converge_time - synced).as_secs_f64() / floor_time.as_secs_f64();
        println!("convergence / floor once the caches are synced: {warm:.2}×");
        // The floor writes no status; the operator must write one per pipeline.
        println!(
            "convergence / (floor + the pipelines' statuses alone): {:.2}×",
            converge_time.as_secs_f64() / (floor_time + statuses).as_secs_f64()
        );
    }
    let operator_steady = total(&by_operator(&steady_writes));
    println!(
        "steady-state writes by the operator (apply, patch, delete, events): {operator_steady} (target 0: {})",
        if operator_steady == 0.0 {
            "PASS"
        } else {
            "MISS"
        }
    );
}
