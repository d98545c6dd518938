//! Planning throughput and memory: 10,000 AIPipelines of three stages each, planned against the
//! example AccessGuardrails, the way `portcullis plan -o json` does it (every plan kept in memory,
//! then one JSON document).
//!
//! Run: `cargo bench --bench plan` (release profile). No criterion: a plain `main` that prints
//! its figures and the targets with PASS or MISS; it never fails on a miss.
//!
//! For steadier numbers pin it to one core. Pinning `cargo` also pins the build, so build first:
//!
//! ```text
//! cargo bench --bench plan --no-run
//! taskset -c 0 cargo bench --bench plan
//! ```
//!
//! Generating the input is not timed. The timed section (plan all, then render JSON, each timed
//! on its own) runs three times; the best and the median are reported. Peak RSS is the process's
//! `VmHWM`, so it covers the input, the plans and the JSON document together, as in the CLI.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use portcullis::api::validate::validate_pipeline;
use portcullis::api::{
    AIPipeline, AIPipelineSpec, AccessGuardrail, EgressRule, IngressRule, NetworkPort,
    PermissionRule, Protocol, RestartTarget, Stage, StageNetwork, StageRole, StageVault,
    VaultCapability, VaultCredential, VaultPathRule, WorkloadKind,
};
use portcullis::plan::{self, Plan};

const PIPELINES: usize = 10_000;
const NAMESPACES: usize = 100;
const RUNS: usize = 3;
const TARGET_PLAN: Duration = Duration::from_secs(1);
const TARGET_PEAK_MIB: f64 = 200.0;

/// A deterministic pseudo-random stream per pipeline (splitmix64), so that the input varies by
/// index but is the same on every run.
struct Mix(u64);

impl Mix {
    fn new(index: usize) -> Mix {
        Mix(index as u64 ^ 0x5eed_0f_c0ffee)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, options: &[T]) -> T {
        options[self.below(options.len())]
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..LabelSelector::default()
    }
}

fn tcp(port: u16) -> NetworkPort {
    NetworkPort {
        port,
        protocol: Protocol::Tcp,
    }
}

fn rule(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> PermissionRule {
    PermissionRule {
        api_groups: strings(groups),
        resources: strings(resources),
        resource_names: strings(names),
        verbs: strings(verbs),
    }
}

fn cidr(range: &str, port: u16) -> EgressRule {
    EgressRule {
        cidr: Some(range.into()),
        ports: vec![tcp(port)],
        ..EgressRule::default()
    }
}

fn to_namespace(ns: &str, app: &str, port: u16) -> EgressRule {
    EgressRule {
        namespace: Some(ns.into()),
        pod_selector: Some(selector(&[("app", app)])),
        ports: vec![tcp(port)],
        ..EgressRule::default()
    }
}

/// What goes wrong in the pipelines that overreach (one in twenty), by kind.
#[derive(Clone, Copy, PartialEq)]
enum Overreach {
    None,
    /// Egress to the cloud metadata address (MetadataEndpoint).
    Metadata,
    /// Egress to the internet (OutsideGuardrail).
    Internet,
    /// `*` in a permission (WildcardForbidden) and `list secrets` without names (SecretNotOwned).
    Wildcard,
    /// `sudo` on the stage's kv path (SudoCapability) and `sys/` (VaultSystemPath).
    Vault,
    /// A credential lifetime over the guardrail's maxTTL (TtlTooLong).
    LongTtl,
    /// `delete pods` in training (OutsideGuardrail) and ingress to training (OutsideGuardrail).
    Training,
}

impl Overreach {
    fn of(index: usize) -> Overreach {
        if index % 20 != 7 {
            return Overreach::None;
        }
        match index / 20 % 6 {
            0 => Overreach::Metadata,
            1 => Overreach::Internet,
            2 => Overreach::Wildcard,
            3 => Overreach::Vault,
            4 => Overreach::LongTtl,
            _ => Overreach::Training,
        }
    }
}

struct Names<'a> {
    namespace: &'a str,
    pipeline: &'a str,
}

impl Names<'_> {
    fn kv(&self, stage: &str) -> String {
        format!("kv/data/{}/{}/{stage}/*", self.namespace, self.pipeline)
    }

    fn secret(&self, stage: &str, what: &str) -> String {
        format!("{}-{stage}-{what}", self.pipeline)
    }
}

fn credential(
    name: &str,
    path: String,
    ttl: &str,
    secret_name: String,
    restart: Option<(WorkloadKind, String)>,
) -> VaultCredential {
    VaultCredential {
        name: name.into(),
        path,
        ttl: ttl.into(),
        secret_name,
        restart_targets: restart
            .map(|(kind, name)| RestartTarget { kind, name })
            .into_iter()
            .collect(),
    }
}

fn ingestion(mix: &mut Mix, n: &Names<'_>, bad: Overreach) -> Stage {
    let name = mix.pick(&["ingest", "curate", "index"]);
    let cred = mix.chance(60).then(|| {
        credential(
            mix.pick(&["feature-db", "raw-db", "object-store"]),
            format!(
                "{}/creds/{}-{}",
                mix.pick(&["database", "aws"]),
                n.pipeline,
                mix.pick(&["features-writer", "raw-reader", "datasets-reader"])
            ),
            if bad == Overreach::LongTtl {
                "4h"
            } else {
                mix.pick(&["15m", "30m", "1h"])
            },
            n.secret(name, "db"),
            Some((WorkloadKind::Deployment, format!("{}-{name}", n.pipeline))),
        )
    });
    let mut permissions = vec![rule(
        &[""],
        &["configmaps"],
        &[mix.pick(&["ingest-config", "chunking-config", "sources"])],
        &["get", "watch"],
    )];
    if mix.chance(50) {
        permissions.push(rule(&["batch"], &["jobs"], &[], &["get", "list", "watch"]));
    }
    if let Some(c) = &cred
        && mix.chance(70)
    {
        permissions.push(rule(&[""], &["secrets"], &[&c.secret_name], &["get"]));
    }
    if bad == Overreach::Wildcard {
        permissions.push(rule(&["*"], &["deployments"], &[], &["get"]));
        permissions.push(rule(&[""], &["secrets"], &[], &["list"]));
    }
    let mut egress = vec![cidr(
        &format!("10.20.{}.0/24", mix.below(256)),
        mix.pick(&[5432, 3306, 9000]),
    )];
    if mix.chance(50) {
        egress.push(cidr("10.30.0.0/16", 443));
    }
    if mix.chance(50) {
        egress.push(to_namespace("ml-platform", "embedder", 8080));
    }
    if mix.chance(40) {
        egress.push(to_namespace(n.namespace, "vector-db", 6333));
    }
    match bad {
        Overreach::Metadata => egress.push(cidr("169.254.169.254/32", 80)),
        Overreach::Internet => egress.push(cidr("0.0.0.0/0", 443)),
        _ => {}
    }
    let mut capabilities = vec![VaultCapability::Read, VaultCapability::List];
    let mut policies = Vec::new();
    if bad == Overreach::Vault {
        capabilities.push(VaultCapability::Sudo);
        policies.push(VaultPathRule {
            path: "sys/policies/acl/*".into(),
            capabilities: vec![VaultCapability::Read],
        });
    }
    policies.insert(
        0,
        VaultPathRule {
            path: n.kv(name),
            capabilities,
        },
    );
    Stage {
        name: name.into(),
        role: StageRole::Ingestion,
        pod_selector: mix
            .chance(50)
            .then(|| selector(&[("app", &format!("{}-{name}", n.pipeline))])),
        automount_service_account_token: None,
        permissions,
        network: Some(StageNetwork {
            egress,
            ingress: Vec::new(),
        }),
        vault: Some(StageVault {
            policies,
            token_ttl: mix.chance(30).then(|| "15m".into()),
            credentials: cred.into_iter().collect(),
        }),
    }
}

fn training(mix: &mut Mix, n: &Names<'_>, bad: Overreach) -> Stage {
    let name = mix.pick(&["train", "finetune", "fit"]);
    let cred = mix.chance(50).then(|| {
        credential(
            "artifacts",
            format!("aws/creds/{}-artifacts-writer", n.pipeline),
            mix.pick(&["1h", "2h", "45m"]),
            n.secret(name, "artifacts"),
            mix.chance(50)
                .then(|| (WorkloadKind::StatefulSet, format!("{}-{name}", n.pipeline))),
        )
    });
    let mut permissions = vec![rule(
        &[""],
        &["pods", "pods/log"],
        &[],
        if bad == Overreach::Training {
            &["get", "list", "watch", "delete"]
        } else {
            &["get", "list", "watch"]
        },
    )];
    if mix.chance(50) {
        permissions.push(rule(&[""], &["configmaps"], &["training-params"], &["get"]));
    }
    if let Some(c) = &cred
        && mix.chance(70)
    {
        permissions.push(rule(&[""], &["secrets"], &[&c.secret_name], &["get"]));
    }
    let mut egress = vec![cidr(&format!("10.30.{}.0/24", mix.below(256)), 443)];
    if mix.chance(60) {
        egress.push(to_namespace("ml-platform", "model-registry", 5000));
    }
    let ingress = if bad == Overreach::Training {
        vec![IngressRule {
            from_namespace_selector: Some(LabelSelector::default()),
            ports: vec![tcp(22)],
            ..IngressRule::default()
        }]
    } else {
        Vec::new()
    };
    Stage {
        name: name.into(),
        role: StageRole::Training,
        pod_selector: mix
            .chance(50)
            .then(|| selector(&[("app", &format!("{}-{name}", n.pipeline))])),
        automount_service_account_token: Some(true),
        permissions,
        network: Some(StageNetwork { egress, ingress }),
        vault: Some(StageVault {
            policies: vec![VaultPathRule {
                path: n.kv(name),
                capabilities: vec![VaultCapability::Read],
            }],
            token_ttl: mix.chance(40).then(|| "1h".into()),
            credentials: cred.into_iter().collect(),
        }),
    }
}

fn deployment(mix: &mut Mix, n: &Names<'_>) -> Stage {
    let name = mix.pick(&["serve", "answer", "evaluate"]);
    let cred = mix.chance(40).then(|| {
        credential(
            "feedback-db",
            format!("database/creds/{}-feedback-writer", n.pipeline),
            mix.pick(&["10m", "20m", "30m"]),
            n.secret(name, "db"),
            Some((WorkloadKind::Deployment, format!("{}-{name}", n.pipeline))),
        )
    });
    let mut permissions = vec![rule(
        &[""],
        &["configmaps"],
        &[mix.pick(&["prompt-templates", "serving-config", "thresholds"])],
        &["get", "watch"],
    )];
    if let Some(c) = &cred {
        permissions.push(rule(&[""], &["secrets"], &[&c.secret_name], &["get"]));
    }
    let mut egress = vec![to_namespace(
        mix.pick(&["ml-platform", n.namespace]),
        mix.pick(&["feature-store", "vector-db", "model-registry"]),
        mix.pick(&[6379, 6333, 5000]),
    )];
    if mix.chance(50) {
        egress.push(cidr(&format!("10.40.{}.0/24", mix.below(256)), 443));
    }
    let ingress = match mix.below(3) {
        0 => IngressRule {
            from_namespace_selector: Some(selector(&[(
                "kubernetes.io/metadata.name",
                "ingress-nginx",
            )])),
            from_pod_selector: Some(selector(&[("app.kubernetes.io/name", "ingress-nginx")])),
            ports: vec![tcp(8080)],
            ..IngressRule::default()
        },
        1 => IngressRule {
            from_pod_selector: Some(selector(&[("app", "eval-harness")])),
            ports: vec![tcp(8000)],
            ..IngressRule::default()
        },
        _ => IngressRule {
            from_cidr: Some(format!("10.0.{}.0/24", mix.below(256))),
            ports: vec![tcp(8443)],
            ..IngressRule::default()
        },
    };
    Stage {
        name: name.into(),
        role: StageRole::Deployment,
        pod_selector: mix
            .chance(60)
            .then(|| selector(&[("app", &format!("{}-{name}", n.pipeline))])),
        automount_service_account_token: mix.chance(30).then_some(true),
        permissions,
        network: Some(StageNetwork {
            egress,
            ingress: vec![ingress],
        }),
        vault: Some(StageVault {
            policies: vec![VaultPathRule {
                path: n.kv(name),
                capabilities: vec![VaultCapability::Read],
            }],
            token_ttl: mix.chance(50).then(|| "10m".into()),
            credentials: cred.into_iter().collect(),
        }),
    }
}

fn pipeline(index: usize) -> AIPipeline {
    let mut mix = Mix::new(index);
    let namespace = format!("ml-team-{:02}", index % NAMESPACES);
    let kind = mix.pick(&[
        "fraud-detector",
        "support-llm",
        "rag-assistant",
        "churn-model",
        "recommender",
        "vision-qa",
        "forecast",
        "search-ranker",
    ]);
    let name = format!("{kind}-{index}");
    let n = Names {
        namespace: &namespace,
        pipeline: &name,
    };
    let bad = Overreach::of(index);
    let stages = vec![
        ingestion(&mut mix, &n, bad),
        training(&mut mix, &n, bad),
        deployment(&mut mix, &n),
    ];
    let mut p = AIPipeline::new(&name, AIPipelineSpec { stages });
    p.metadata.namespace = Some(namespace);
    p
}

fn guardrails() -> Vec<AccessGuardrail> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guardrails");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", f.display()))
        })
        .collect()
}

/// A `kB` field of /proc/self/status, in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// How many CPUs a `Cpus_allowed_list` such as `0-3,8` names.
fn allowed_cpus() -> Option<(String, usize)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim()
        .to_string();
    let mut count = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1,
            None => 1,
        };
    }
    Some((list, count))
}

fn mib(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.1} MiB"))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn best_and_median(times: &[Duration]) -> (Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    (sorted[0], sorted[sorted.len() / 2])
}

fn main() {
    if let Some((list, n)) = allowed_cpus()
        && n > 1
    {
        println!(
            "note: not pinned (Cpus_allowed_list {list}, {n} CPUs); for steadier numbers run `taskset -c 0 cargo bench --bench plan`"
        );
    }

    // Input: not timed.
    let started = Instant::now();
    let guardrails = guardrails();
    let labels = BTreeMap::from([("portcullis.dev/tier".to_string(), "ml".to_string())]);
    let pipelines: Vec<AIPipeline> = (0..PIPELINES).map(pipeline).collect();
    for p in &pipelines {
        let errors = validate_pipeline(p);
        assert!(
            errors.is_empty(),
            "the benchmark generated an invalid pipeline {:?}: {errors:?}",
            p.metadata.name
        );
    }
    println!(
        "generated {} pipelines in {} namespaces and {} guardrails in {:.2} s; RSS {}",
        pipelines.len(),
        NAMESPACES,
        guardrails.len(),
        started.elapsed().as_secs_f64(),
        mib(status_mib("VmRSS:"))
    );

    let mut plan_times = Vec::new();
    let mut json_times = Vec::new();
    let mut counts = (0, 0, 0, 0, 0);
    let mut json_bytes = 0;
    let mut peak_after_plan = None;
    for run in 0..RUNS {
        let started = Instant::now();
        let mut plans: Vec<Plan> = Vec::with_capacity(pipelines.len());
        let mut failed = 0;
        for p in &pipelines {
            match plan::build(black_box(p), "default", &labels, &guardrails) {
                Ok(plan) => plans.push(plan),
                Err(_) => failed += 1,
            }
        }
        let plan_time = started.elapsed();
        if run == 0 {
            peak_after_plan = status_mib("VmHWM:");
        }

        let started = Instant::now();
        let json = portcullis::cli::output::json(black_box(&plans));
        let json_time = started.elapsed();
        black_box(&json);

        println!(
            "run {}: plan {:.3} s, json {:.3} s",
            run + 1,
            plan_time.as_secs_f64(),
            json_time.as_secs_f64()
        );
        if failed > 0 {
            println!("warning: {failed} pipelines did not plan");
        }
        plan_times.push(plan_time);
        json_times.push(json_time);
        json_bytes = json.len();
        counts = (
            plans.len(),
            plans.iter().map(|p| p.stages.len()).sum::<usize>(),
            plans.iter().map(|p| p.decisions.len()).sum::<usize>(),
            plans.iter().map(Plan::denied).sum::<usize>(),
            plans.iter().map(|p| p.objects.len()).sum::<usize>(),
        );
        // Plans and JSON are dropped here, before the next run.
    }

    let (pipelines_planned, stages, decisions, denied, objects) = counts;
    let (plan_best, plan_median) = best_and_median(&plan_times);
    let (json_best, json_median) = best_and_median(&json_times);
    let peak = status_mib("VmHWM:");
    println!();
    println!("pipelines:    {pipelines_planned}");
    println!("stages:       {stages}");
    println!("decisions:    {decisions} ({denied} denied)");
    println!("objects:      {objects}");
    println!(
        "plan time:    best {:.3} s, median {:.3} s ({:.0} pipelines/s at best, {:.0} at median)",
        plan_best.as_secs_f64(),
        plan_median.as_secs_f64(),
        pipelines_planned as f64 / plan_best.as_secs_f64(),
        pipelines_planned as f64 / plan_median.as_secs_f64()
    );
    println!(
        "json render:  best {:.3} s, median {:.3} s ({:.1} MiB of JSON)",
        json_best.as_secs_f64(),
        json_median.as_secs_f64(),
        json_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "peak RSS:     {} (input + plans: {})",
        mib(peak),
        mib(peak_after_plan)
    );
    println!();
    println!("target: plan < 1 s, peak < 200 MiB");
    println!(
        "  plan < 1 s:       {} (median {:.3} s)",
        verdict(plan_median < TARGET_PLAN),
        plan_median.as_secs_f64()
    );
    println!(
        "  peak < 200 MiB:   {} ({})",
        peak.map_or("n/a", |p| verdict(p < TARGET_PEAK_MIB)),
        mib(peak)
    );
}
