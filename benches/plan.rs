//! Planning throughput and memory: 10,000 AIPipelines of three stages each, planned against the
//! example AccessGuardrails, measured two ways, each in processes of its own:
//!
//! - **(a) one at a time**, as the controller plans and as `portcullis plan -o table|yaml` plans
//!   and prints: each plan is built (validation included, as `plan::validate_and_build` does
//!   it), consumed (its decisions and objects counted) and dropped. Its time and peak RSS are the figures
//!   checked against the targets: under 1 s and under 200 MiB on one core.
//! - **(b) all kept**, as `portcullis plan -o json` does it: every plan is kept, then the JSON
//!   document is streamed into a sink that counts bytes. Reported as information.
//!
//! Run: `cargo bench --bench plan` (release profile). No criterion: a plain `main` that prints
//! its figures and the targets with PASS or MISS; it never fails on a miss.
//!
//! For steadier numbers pin it to one core with `taskset` (util-linux; no dependency needed):
//! `make bench` runs `taskset -c 0 cargo bench --bench plan`. Pinning `cargo` also pins the
//! build, so a cold build is quicker done first with `cargo bench --bench plan --no-run`.
//!
//! The benchmark prints a note when it finds itself allowed on more than one CPU.
//!
//! Generating the input is not timed. Each measurement runs three times, each time in a fresh
//! process (this binary re-runs itself with `--one-run stream` or `--one-run keep`): every run
//! then starts cold, as the CLI does, one run's freed heap cannot distort the next run's
//! timing, and the peak RSS of (a) and (b) are measured apart. The best and the median times
//! are reported. Peak RSS is the run's `VmHWM`, so it covers the input (about 100 MiB of
//! generated pipelines, held for the whole run) and the planning together.
//!
//! `--write-input DIR` writes the generated pipelines as YAML files (100 to a file) instead, so
//! that `portcullis plan -f DIR --guardrails examples/guardrails --namespace-labels
//! portcullis.dev/tier=ml` can be timed on the same input.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

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
const TARGET_PLAN_S: f64 = 1.0;
const TARGET_PEAK_MIB: f64 = 200.0;

/// A deterministic pseudo-random stream per pipeline (splitmix64), so that the input varies by
/// index but is the same on every run.
struct Mix(u64);

impl Mix {
    fn new(index: usize) -> Mix {
        Mix(index as u64 ^ 0x5eed_0fc0_ffee)
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
        let n = u64::try_from(n).expect("a usize fits a u64 here");
        usize::try_from(self.next() % n).expect("below n, a usize")
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
                "{}/creds/{}_{}_{}",
                mix.pick(&["database", "aws"]),
                n.namespace,
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
        produces: Vec::new(),
    }
}

fn training(mix: &mut Mix, n: &Names<'_>, bad: Overreach) -> Stage {
    let name = mix.pick(&["train", "finetune", "fit"]);
    let cred = mix.chance(50).then(|| {
        credential(
            "artifacts",
            format!("aws/creds/{}_{}_artifacts-writer", n.namespace, n.pipeline),
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
        produces: Vec::new(),
    }
}

fn deployment(mix: &mut Mix, n: &Names<'_>) -> Stage {
    let name = mix.pick(&["serve", "answer", "evaluate"]);
    let cred = mix.chance(40).then(|| {
        credential(
            "feedback-db",
            format!(
                "database/creds/{}_{}_feedback-writer",
                n.namespace, n.pipeline
            ),
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
        produces: Vec::new(),
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

/// Minor page faults of this process so far (/proc/self/stat field 10).
fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; count from the ')' that ends it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(7)?.parse().ok()
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

/// What one run measured. A run is one process, printed as one `key=value` line.
#[derive(Debug, Default, Clone)]
struct Run {
    generate_s: f64,
    input_mib: f64,
    plan_s: f64,
    plan_faults: u64,
    /// (b) only: streaming the JSON document.
    json_s: f64,
    json_mib: f64,
    /// Peak RSS after planning (before the JSON, in (b)).
    peak_plans_mib: f64,
    peak_mib: f64,
    pipelines: usize,
    failed: usize,
    stages: usize,
    decisions: usize,
    denied: usize,
    objects: usize,
}

impl Run {
    fn to_line(&self) -> String {
        format!(
            "run generate_s={} input_mib={} plan_s={} plan_faults={} json_s={} json_mib={} peak_plans_mib={} peak_mib={} pipelines={} failed={} stages={} decisions={} denied={} objects={}",
            self.generate_s,
            self.input_mib,
            self.plan_s,
            self.plan_faults,
            self.json_s,
            self.json_mib,
            self.peak_plans_mib,
            self.peak_mib,
            self.pipelines,
            self.failed,
            self.stages,
            self.decisions,
            self.denied,
            self.objects
        )
    }

    fn from_line(line: &str) -> Option<Run> {
        let fields: BTreeMap<&str, &str> = line
            .strip_prefix("run ")?
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let f = |k: &str| fields.get(k)?.parse::<f64>().ok();
        let n = |k: &str| fields.get(k)?.parse::<usize>().ok();
        Some(Run {
            generate_s: f("generate_s")?,
            input_mib: f("input_mib")?,
            plan_s: f("plan_s")?,
            plan_faults: fields.get("plan_faults")?.parse().ok()?,
            json_s: f("json_s")?,
            json_mib: f("json_mib")?,
            peak_plans_mib: f("peak_plans_mib")?,
            peak_mib: f("peak_mib")?,
            pipelines: n("pipelines")?,
            failed: n("failed")?,
            stages: n("stages")?,
            decisions: n("decisions")?,
            denied: n("denied")?,
            objects: n("objects")?,
        })
    }

    /// Counts what `plan` holds.
    fn count(&mut self, plan: &Plan) {
        self.pipelines += 1;
        self.stages += plan.stages.len();
        self.decisions += plan.decisions.len();
        self.denied += plan.denied();
        self.objects += plan.objects.len();
    }
}

/// The two ways of planning that are measured.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// (a) Plan, consume and drop one pipeline at a time.
    Stream,
    /// (b) Plan all and keep them, then stream the JSON document.
    Keep,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Keep => "keep",
        }
    }
}

/// The benchmark's input, generated and checked (not timed).
struct Input {
    guardrails: Vec<AccessGuardrail>,
    labels: BTreeMap<String, String>,
    pipelines: Vec<AIPipeline>,
}

fn input() -> Input {
    let pipelines: Vec<AIPipeline> = (0..PIPELINES).map(pipeline).collect();
    for p in &pipelines {
        let errors = validate_pipeline(p);
        assert!(
            errors.is_empty(),
            "the benchmark generated an invalid pipeline {:?}: {errors:?}",
            p.metadata.name
        );
    }
    Input {
        guardrails: guardrails(),
        labels: BTreeMap::from([("portcullis.dev/tier".to_string(), "ml".to_string())]),
        pipelines,
    }
}

/// A writer that only counts the bytes written to it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One run, in this process: generate (not timed), then plan as `mode` says.
fn run_once(mode: Mode) -> Run {
    let started = Instant::now();
    let input = input();
    let mut run = Run {
        generate_s: started.elapsed().as_secs_f64(),
        input_mib: status_mib("VmRSS:").unwrap_or(0.0),
        ..Run::default()
    };
    let faults = minor_faults();
    let started = Instant::now();
    let plans = match mode {
        Mode::Stream => {
            // Timed: each plan is built, consumed and dropped before the next.
            for p in &input.pipelines {
                match plan::validate_and_build(
                    black_box(p),
                    "default",
                    &input.labels,
                    &input.guardrails,
                ) {
                    Ok(plan) => run.count(black_box(&plan)),
                    Err(_) => run.failed += 1,
                }
            }
            Vec::new()
        }
        Mode::Keep => {
            // Timed: every plan is kept, as `portcullis plan -o json` keeps them.
            let mut plans: Vec<Plan> = Vec::with_capacity(input.pipelines.len());
            for p in &input.pipelines {
                match plan::validate_and_build(
                    black_box(p),
                    "default",
                    &input.labels,
                    &input.guardrails,
                ) {
                    Ok(plan) => plans.push(plan),
                    Err(_) => run.failed += 1,
                }
            }
            plans
        }
    };
    run.plan_s = started.elapsed().as_secs_f64();
    run.plan_faults = minor_faults()
        .zip(faults)
        .map_or(0, |(after, before)| after - before);
    run.peak_plans_mib = status_mib("VmHWM:").unwrap_or(0.0);

    if mode == Mode::Keep {
        // Timed separately: the JSON document of all plans, streamed into a counting sink.
        let started = Instant::now();
        let mut sink = Counting {
            inner: std::io::sink(),
            bytes: 0,
        };
        portcullis::cli::output::write_json(black_box(&plans), &mut sink)
            .expect("writing to a sink does not fail");
        run.json_s = started.elapsed().as_secs_f64();
        run.json_mib = sink.bytes as f64 / (1024.0 * 1024.0);
        for plan in &plans {
            run.count(plan);
        }
    }
    run.peak_mib = status_mib("VmHWM:").unwrap_or(0.0);
    run
}

/// Writes the generated pipelines as YAML files into `dir`, 100 to a file.
fn write_input(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let pipelines: Vec<AIPipeline> = (0..PIPELINES).map(pipeline).collect();
    for (i, chunk) in pipelines.chunks(100).enumerate() {
        let mut text = String::new();
        for p in chunk {
            text.push_str("---\n");
            text.push_str(&serde_saphyr::to_string(p).expect("pipelines serialize to YAML"));
        }
        let file = dir.join(format!("pipelines-{i:03}.yaml"));
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    }
    println!(
        "wrote {PIPELINES} pipelines to {}; plan them with: portcullis plan -f {} --guardrails examples/guardrails --namespace-labels portcullis.dev/tier=ml",
        dir.display(),
        dir.display()
    );
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// (best, median) of `values`.
fn best_and_median(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    (sorted[0], sorted[sorted.len() / 2])
}

/// Runs `mode` RUNS times, each in a process of its own, and prints each run.
fn runs(mode: Mode, label: &str) -> Vec<Run> {
    let exe = std::env::current_exe().expect("the benchmark knows its own path");
    let mut runs = Vec::new();
    for i in 1..=RUNS {
        let out = Command::new(&exe)
            .args(["--one-run", mode.arg()])
            .stderr(Stdio::inherit())
            .output()
            .expect("the benchmark can run itself");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(run) = stdout.lines().find_map(Run::from_line) else {
            println!("{label} run {i}: failed ({}); output: {stdout}", out.status);
            continue;
        };
        match mode {
            Mode::Stream => println!(
                "{label} run {i}: plan {:.3} s ({} page faults), peak RSS {:.1} MiB",
                run.plan_s, run.plan_faults, run.peak_mib
            ),
            Mode::Keep => println!(
                "{label} run {i}: plan {:.3} s ({} page faults), json {:.3} s, peak RSS {:.1} MiB ({:.1} MiB after planning)",
                run.plan_s, run.plan_faults, run.json_s, run.peak_mib, run.peak_plans_mib
            ),
        }
        if run.failed > 0 {
            println!("warning: {} pipelines did not plan", run.failed);
        }
        runs.push(run);
    }
    runs
}

/// Each run is its own process (this binary, run again with `--one-run MODE`), so every run
/// starts cold like the CLI does, one run's freed heap cannot slow down or speed up the next,
/// and each mode's peak RSS is its own.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench (and the runs this binary starts pass --one-run);
    // `cargo test --benches` passes neither: then there is nothing to do.
    if !args
        .iter()
        .any(|a| a == "--bench" || a == "--one-run" || a == "--write-input")
    {
        println!("plan: a benchmark; run it with `make bench`");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--one-run") {
        let mode = match args.get(i + 1).map(String::as_str) {
            Some("keep") => Mode::Keep,
            _ => Mode::Stream,
        };
        println!("{}", run_once(mode).to_line());
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--write-input") {
        let dir = args.get(i + 1).expect("--write-input takes a folder");
        write_input(Path::new(dir));
        return;
    }
    if let Some((list, n)) = allowed_cpus()
        && n > 1
    {
        println!(
            "note: not pinned to one CPU (Cpus_allowed_list {list}: {n} CPUs); for steadier numbers run `taskset -c 0 cargo bench --bench plan`"
        );
    }

    let stream = runs(Mode::Stream, "(a) one at a time,");
    let keep = runs(Mode::Keep, "(b) all kept + JSON,");
    let Some(last) = stream.last().or(keep.last()).cloned() else {
        println!("no run finished; nothing to report");
        return;
    };
    println!();
    println!(
        "input:        {PIPELINES} pipelines x 3 stages in {NAMESPACES} namespaces, generated in {:.2} s (not timed); RSS {:.1} MiB",
        last.generate_s, last.input_mib
    );
    println!("pipelines:    {}", last.pipelines);
    println!("stages:       {}", last.stages);
    println!("decisions:    {} ({} denied)", last.decisions, last.denied);
    println!("objects:      {}", last.objects);

    let mut a = None;
    if !stream.is_empty() {
        let (best, median) = best_and_median(stream.iter().map(|r| r.plan_s));
        let peak = stream.iter().map(|r| r.peak_mib).fold(0.0, f64::max);
        let planned = last.pipelines as f64;
        println!();
        println!("(a) one at a time (controller, plan -o table|yaml): checked against the targets");
        println!(
            "  plan time:  best {best:.3} s, median {median:.3} s ({:.0} pipelines/s at best, {:.0} at median)",
            planned / best,
            planned / median
        );
        println!(
            "  peak RSS:   {peak:.1} MiB (input alone {:.1} MiB)",
            last.input_mib
        );
        a = Some((median, peak));
    }
    if !keep.is_empty() {
        let (best, median) = best_and_median(keep.iter().map(|r| r.plan_s));
        let (json_best, json_median) = best_and_median(keep.iter().map(|r| r.json_s));
        let peak = keep.iter().map(|r| r.peak_mib).fold(0.0, f64::max);
        let peak_plans = keep.iter().map(|r| r.peak_plans_mib).fold(0.0, f64::max);
        let k = keep.last().expect("not empty");
        println!();
        println!("(b) all kept, then JSON streamed to a sink (plan -o json): information");
        println!(
            "  plan time:  best {best:.3} s, median {median:.3} s ({:.0} pipelines/s at median)",
            k.pipelines as f64 / median
        );
        println!(
            "  json:       best {json_best:.3} s, median {json_median:.3} s ({:.1} MiB of JSON)",
            k.json_mib
        );
        println!(
            "  peak RSS:   {peak:.1} MiB (input alone {:.1} MiB; input + plans {peak_plans:.1} MiB)",
            k.input_mib
        );
    }
    println!();
    println!("target for (a): plan < 1 s, peak < 200 MiB");
    match a {
        Some((median, peak)) => {
            println!(
                "  plan < 1 s:      {} (median {median:.3} s)",
                verdict(median < TARGET_PLAN_S)
            );
            println!(
                "  peak < 200 MiB:  {} ({peak:.1} MiB)",
                verdict(peak < TARGET_PEAK_MIB)
            );
        }
        None => println!("  no run of (a) finished"),
    }
}
