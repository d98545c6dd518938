//! The `portcullis` command line.

pub mod audit;
pub mod can_i;
pub mod ingest;
pub mod kubeconfig;
pub mod load;
pub mod output;
pub mod probe;
pub mod run;
pub mod usage;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::AccessGuardrail;
use crate::plan::{self, Plan};
use load::{Expect, InputError, Inputs};

/// Exit code when every requested item is allowed.
pub(crate) const EXIT_ALLOWED: u8 = 0;
/// Exit code for a failure that is not the input's fault.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code for input that is not valid.
pub(crate) const EXIT_INVALID: u8 = 2;
/// Exit code when anything requested is denied.
pub(crate) const EXIT_DENIED: u8 = 3;

/// Least privilege for the stages of AI pipelines on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show what each pipeline stage would be granted and denied, without a cluster.
    ///
    /// Exit status: 0 when everything requested is allowed, 3 when anything is denied, 2 when
    /// the input is not valid. A GitOps repository can gate merges on it.
    Plan(PlanArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run(Box<run::RunArgs>),
    /// Work with the decision log.
    Audit(audit::AuditArgs),
    /// Ask the cluster what each stage's ServiceAccount may do, and compare with the plan.
    ///
    /// Every planned grant must be allowed by the API server's RBAC authorizer, and nothing of a
    /// matrix of dangerous requests (other stages' Secrets, escalate, bind, exec, cluster-wide
    /// reads, other namespaces, impersonation) may be. Exit 0 when the cluster agrees, 1 when
    /// it does not.
    #[command(name = "can-i")]
    CanI(can_i::CanIArgs),
    /// Per stage, the grants it used at runtime; `--suggest` prints the narrowed spec.
    Usage(usage::UsageArgs),
    /// Ask a running operator whether it answers: GET `URL` (plain HTTP, such as
    /// `http://portcullis-metrics.portcullis-system.svc:8080/readyz`), exit 0 on 200 OK and 1
    /// otherwise. The chart's `helm test` runs it; the image has no shell and no curl.
    Probe {
        /// The URL: `http://HOST[:PORT]/PATH`.
        url: String,
        /// How long to wait for the answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        timeout: u64,
    },
    /// Print a shell completion script: `source <(portcullis completion bash)`.
    ///
    /// zsh: `portcullis completion zsh > "${fpath[1]}/_portcullis"`; fish: `portcullis
    /// completion fish > ~/.config/fish/completions/portcullis.fish`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// Shells `completion` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Output formats of `plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Per stage, what is granted and what is denied with the reason.
    Table,
    /// The Kubernetes objects, ready for `kubectl apply`, then the Vault policies and roles as comments.
    Yaml,
    /// Objects, Vault policies and roles, credentials and every decision.
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PlanArgs {
    /// Files or folders with AIPipelines (and AccessGuardrails and Namespaces). Folders are
    /// searched for .yaml, .yml and .json files; other kinds of object are skipped. `-` reads
    /// standard input: `kustomize build overlays/prod | portcullis plan -f -`.
    #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,

    /// Files or folders with the AccessGuardrails that apply.
    #[arg(long, value_name = "FILE_OR_DIR", num_args = 1..)]
    pub guardrails: Vec<PathBuf>,

    /// Labels of the pipelines' namespaces, as k=v,k=v (added to those of Namespace objects
    /// in the input). `kubernetes.io/metadata.name` is always set to the namespace's name.
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels)]
    pub namespace_labels: Option<BTreeMap<String, String>>,

    /// The namespace of pipelines that name none (default: the namespace of the kubeconfig's
    /// context, as kubectl; `default` when there is no kubeconfig or it sets none).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,

    /// Only for the default namespace: no cluster is contacted.
    #[command(flatten)]
    pub kube: kubeconfig::KubeArgs,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    /// The prefix of the Vault policy and role names shown, as the operator's
    /// `--vault-name-prefix`.
    #[arg(long, default_value = plan::names::DEFAULT_VAULT_NAME_PREFIX, value_parser = parse_vault_name_prefix)]
    pub vault_name_prefix: String,
}

fn parse_vault_name_prefix(s: &str) -> Result<String, String> {
    plan::names::check_vault_name_prefix(s).map(|()| s.to_string())
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!(
                "{pair:?} is not k=v; write labels as tier=ml,team=fraud"
            )),
        })
        .collect()
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    // Installed as `kubectl-portcullis`, the binary is a kubectl plugin: `kubectl portcullis ...`.
    let as_plugin = std::env::args_os()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|f| f.to_string_lossy().starts_with("kubectl-portcullis"))
        })
        .unwrap_or(false);
    let mut command = <Cli as clap::CommandFactory>::command();
    if as_plugin {
        command = command
            .name("kubectl portcullis")
            .bin_name("kubectl portcullis");
    }
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let code = match cli.command {
        Command::Crds => {
            print!("{}", crate::api::crds_yaml());
            EXIT_ALLOWED
        }
        Command::Plan(args) => run_plan(&args),
        Command::Run(args) => run::run(&args),
        Command::Audit(args) => audit::run(&args),
        Command::CanI(args) => can_i::run(&args),
        Command::Completion { shell } => completion(shell, as_plugin),
        Command::Probe { url, timeout } => {
            match probe::get(&url, std::time::Duration::from_secs(timeout)) {
                Ok(200) => {
                    println!("{url}: 200 OK");
                    EXIT_ALLOWED
                }
                Ok(status) => {
                    eprintln!("error: {url} answered {status}, not 200");
                    EXIT_FAILURE
                }
                Err(e) => {
                    eprintln!("error: {url}: {e}");
                    EXIT_FAILURE
                }
            }
        }
        Command::Usage(args) => usage::run(&args),
    };
    ExitCode::from(code)
}

/// `portcullis completion`: the script for `shell`, for the name the binary was called by.
fn completion(shell: Shell, as_plugin: bool) -> u8 {
    let mut command = <Cli as clap::CommandFactory>::command();
    let name = if as_plugin {
        "kubectl-portcullis"
    } else {
        "portcullis"
    };
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(generator, &mut command, name, &mut script);
    match std::io::stdout().write_all(&script) {
        Ok(()) => EXIT_ALLOWED,
        Err(_) => EXIT_FAILURE,
    }
}

fn report(errors: &[InputError]) -> u8 {
    let mut stderr = std::io::stderr().lock();
    for e in errors {
        let _ = writeln!(stderr, "error: {e}");
    }
    let _ = writeln!(stderr, "{} error(s); nothing was planned.", errors.len());
    EXIT_INVALID
}

/// `portcullis plan`: reads, checks, plans, prints, and returns the exit code.
///
/// Everything that can make the input invalid is found before anything is printed: the
/// pipelines are validated as they are read, and the checks across pipelines need only names.
/// The table and the YAML are then written one pipeline at a time, each plan dropped once it is
/// written; the JSON document needs every plan at once.
fn run_plan(args: &PlanArgs) -> u8 {
    let namespace = match &args.namespace {
        Some(namespace) => namespace.clone(),
        None => match args.kube.context_namespace() {
            Ok(namespace) => namespace.unwrap_or_else(|| "default".into()),
            Err(e) => {
                eprintln!("error: {e}; or name the namespace with -n");
                return EXIT_INVALID;
            }
        },
    };
    let mut inputs = Inputs::default();
    // With --guardrails, the pipeline files cannot bring guardrails of their own.
    let from_files = if args.guardrails.is_empty() {
        Expect::Anything
    } else {
        Expect::Pipelines
    };
    read_files(&mut inputs, &args.files, from_files);
    read_files(&mut inputs, &args.guardrails, Expect::Guardrails);
    for note in &inputs.notes {
        eprintln!("note: {note}");
    }
    for (_, guardrail) in &inputs.guardrails {
        for warning in crate::api::validate::guardrail_warnings(guardrail) {
            eprintln!("warning: {warning}");
        }
    }
    if !inputs.errors.is_empty() {
        return report(&inputs.errors);
    }
    let (guardrails, errors) = check_all(&inputs, &namespace);
    if !errors.is_empty() {
        return report(&errors);
    }
    let mut stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut denied = false;
    let written = match args.output {
        Format::Table => {
            let mut table = output::TableWriter::new(&mut stdout);
            plan_each(&inputs, &namespace, args, &guardrails, |plan| {
                denied |= plan.denied() > 0;
                table.plan(&plan)
            })
            .and_then(|()| table.finish().map(drop))
        }
        Format::Yaml => {
            let mut yaml = output::YamlWriter::new(&mut stdout);
            plan_each(&inputs, &namespace, args, &guardrails, |plan| {
                denied |= plan.denied() > 0;
                yaml.plan(&plan)
            })
            .and_then(|()| yaml.finish().map(drop))
        }
        Format::Json => {
            let mut plans = Vec::with_capacity(inputs.pipelines.len());
            let _ = plan_each(&inputs, &namespace, args, &guardrails, |plan| {
                plans.push(plan);
                Ok(())
            });
            denied = plans.iter().any(|p| p.denied() > 0);
            output::write_json(&plans, &mut stdout)
        }
    };
    if written.and_then(|()| stdout.flush()).is_err() {
        return EXIT_FAILURE;
    }
    if denied { EXIT_DENIED } else { EXIT_ALLOWED }
}

/// Reads `paths` into `inputs`; `-` is standard input, read once even if named twice.
fn read_files(inputs: &mut Inputs, paths: &[PathBuf], expect: Expect) {
    let stdin = std::path::Path::new("-");
    let (from_stdin, files): (Vec<PathBuf>, Vec<PathBuf>) =
        paths.iter().cloned().partition(|p| p == stdin);
    inputs.read(&files, expect);
    if !from_stdin.is_empty() {
        let mut text = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text) {
            Ok(_) => inputs.read_str(std::path::Path::new("<stdin>"), &text, expect),
            Err(e) => inputs.errors.push(InputError {
                origin: None,
                object: None,
                field: None,
                message: format!(
                    "cannot read standard input (-f -): {e}; pipe YAML into it, e.g. `kustomize build | portcullis plan -f -`"
                ),
            }),
        }
    }
}

/// Plans the pipelines read, in input order, and gives each plan to `each`, stopping at the
/// first error `each` returns. Every pipeline in `inputs` has been validated by the loader, and
/// [`check_all`] has passed: planning cannot fail.
fn plan_each(
    inputs: &Inputs,
    default_namespace: &str,
    args: &PlanArgs,
    guardrails: &[AccessGuardrail],
    mut each: impl FnMut(Plan) -> std::io::Result<()>,
) -> std::io::Result<()> {
    // Credential paths and Secrets belong to the pipeline that claims them first; offline, all
    // pipelines read are the cluster.
    let claims = crate::policy::CredentialClaims::from_pipelines(
        inputs.pipelines.iter().map(|(_, p)| p.pipeline()),
        default_namespace,
    );
    let options = plan::PlanOptions {
        vault_name_prefix: &args.vault_name_prefix,
        claims: Some(&claims),
        // Offline: which Secrets and workloads exist is known only in the cluster.
        cluster: None,
    };
    // Namespace labels, by namespace: many pipelines share a namespace.
    let mut labels_of: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    for (_, pipeline) in &inputs.pipelines {
        let namespace = pipeline
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(default_namespace);
        let labels = labels_of.entry(namespace).or_insert_with(|| {
            let mut labels = inputs
                .namespaces
                .get(namespace)
                .cloned()
                .unwrap_or_default();
            labels.extend(args.namespace_labels.clone().unwrap_or_default());
            labels
        });
        each(plan::build_with(
            pipeline,
            default_namespace,
            labels,
            guardrails,
            options,
        ))?;
    }
    Ok(())
}

/// Checks what only shows across pipelines, from names alone (nothing is planned): the same
/// pipeline twice, and two pipelines whose stage objects would share a name. Returns the
/// guardrails by name, and the errors.
fn check_all(inputs: &Inputs, default_namespace: &str) -> (Vec<AccessGuardrail>, Vec<InputError>) {
    let mut errors = Vec::new();
    let guardrails = unique_guardrails(inputs, &mut errors);
    let mut seen: BTreeMap<(&str, &str), &load::Origin> = BTreeMap::new();
    let mut owners: BTreeMap<(&str, String), (&str, &str)> = BTreeMap::new();
    for (origin, pipeline) in &inputs.pipelines {
        let namespace = pipeline
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(default_namespace);
        let name = pipeline.metadata.name.as_deref().unwrap_or_default();
        let object = || format!("AIPipeline {namespace}/{name}");
        if let Some(first) = seen.insert((namespace, name), origin) {
            errors.push(InputError {
                origin: Some(origin.clone()),
                object: Some(object()),
                field: Some("metadata.name".into()),
                message: format!("the same pipeline is also defined in {first}; keep one of them"),
            });
            continue;
        }
        for stage in &pipeline.spec.stages {
            // The name plan::build gives the stage's ServiceAccount, Role, RoleBinding and
            // NetworkPolicy.
            let service_account = plan::names::stage_object(namespace, name, &stage.name);
            let this = (name, stage.name.as_str());
            match owners.entry((namespace, service_account)) {
                Entry::Vacant(e) => {
                    e.insert(this);
                }
                Entry::Occupied(mut e) => {
                    let (p, s) = e.insert(this);
                    if (p, s) != this {
                        errors.push(InputError {
                            origin: Some(origin.clone()),
                            object: Some(object()),
                            field: Some("spec.stages".into()),
                            message: format!(
                                "stage {:?} would be named {} like stage {s:?} of pipeline {p:?} in the same namespace; rename a stage or a pipeline",
                                stage.name,
                                e.key().1
                            ),
                        });
                    }
                }
            }
        }
    }
    (guardrails, errors)
}

/// Guardrails by name. The same guardrail read twice (once with -f, once with --guardrails)
/// counts once; two different guardrails with one name are an error, as in a cluster.
fn unique_guardrails(inputs: &Inputs, errors: &mut Vec<InputError>) -> Vec<AccessGuardrail> {
    let mut by_name: BTreeMap<&str, (&load::Origin, &AccessGuardrail)> = BTreeMap::new();
    for (origin, g) in &inputs.guardrails {
        let name = g.metadata.name.as_deref().unwrap_or_default();
        match by_name.get(name) {
            Some((first, other)) if other.spec != g.spec => errors.push(InputError {
                origin: Some(origin.clone()),
                object: Some(format!("AccessGuardrail {name}")),
                field: Some("metadata.name".into()),
                message: format!(
                    "a different AccessGuardrail {name} is defined in {first}; rename one of them"
                ),
            }),
            Some(_) => {}
            None => {
                by_name.insert(name, (origin, g));
            }
        }
    }
    by_name.into_values().map(|(_, g)| g.clone()).collect()
}
