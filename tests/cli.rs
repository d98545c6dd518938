//! The command line as a user meets it: exit codes, and errors that name the file, the
//! document, the object, the field and the fix, with no Rust internals.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("portcullis runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// Writes `yaml` to a temporary file and plans it with the example guardrails.
fn plan_yaml(yaml: &str) -> (i32, String, String) {
    plan_yaml_with(yaml, &[])
}

/// [`plan_yaml`] with more arguments, such as `-o yaml`.
fn plan_yaml_with(yaml: &str, more: &[&str]) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!(
        "portcullis-cli-{}-{}",
        std::process::id(),
        fastrand()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("input.yaml");
    std::fs::File::create(&file)
        .and_then(|mut f| f.write_all(yaml.as_bytes()))
        .expect("input written");
    let mut args = vec![
        "plan",
        "-f",
        file.to_str().expect("UTF-8 path"),
        "examples/namespaces.yaml",
        "--guardrails",
        "examples/guardrails",
    ];
    args.extend_from_slice(more);
    let out = portcullis(&args);
    std::fs::remove_dir_all(&dir).expect("temp dir removed");
    (
        out.status.code().expect("exit code"),
        text(&out.stdout),
        text(&out.stderr),
    )
}

fn fastrand() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

fn assert_no_internals(stderr: &str) {
    for leak in ["panicked", "RUST_BACKTRACE", "Error {", "Some(", "\\n"] {
        assert!(
            !stderr.contains(leak),
            "stderr shows Rust internals ({leak}):\n{stderr}"
        );
    }
}

const VALID: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: scorer, namespace: ml-fraud}
spec:
  stages:
    - name: serve
      role: Deployment
      permissions:
        - apiGroups: [""]
          resources: [configmaps]
          verbs: [get]
"#;

#[test]
fn a_valid_pipeline_exits_0() {
    let (code, stdout, stderr) = plan_yaml(VALID);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("GRANT get configmaps"), "{stdout}");
}

#[test]
fn a_bad_cidr_names_file_document_object_field_and_fix() {
    let yaml = format!("{VALID}      network:\n        egress:\n          - cidr: 10.20.1.0/16\n");
    let (code, stdout, stderr) = plan_yaml(&yaml);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stdout.is_empty(),
        "nothing is planned on invalid input: {stdout}"
    );
    assert!(
        stderr.contains("input.yaml: document 1 (AIPipeline ml-fraud/scorer)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.stages[0].network.egress[0].cidr"),
        "{stderr}"
    );
    assert!(
        stderr.contains("write the network address, 10.20.0.0/16"),
        "{stderr}"
    );
    assert_no_internals(&stderr);
}

#[test]
fn a_lifetime_too_long_to_schedule_names_the_field_and_the_limit() {
    // The CRD schema accepts it (16 characters); no clock arithmetic can hold it.
    let yaml = format!("{VALID}      vault:\n        tokenTTL: 999999999999999h\n");
    let (code, stdout, stderr) = plan_yaml(&yaml);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "nothing is planned: {stdout}");
    assert!(stderr.contains("spec.stages[0].vault.tokenTTL"), "{stderr}");
    assert!(stderr.contains("87600h or less"), "{stderr}");
    assert_no_internals(&stderr);
}

#[test]
fn an_unknown_role_and_an_unknown_field_are_named() {
    let (code, _, stderr) = plan_yaml(&VALID.replace("role: Deployment", "role: Serving"));
    assert_eq!(code, 2);
    assert!(stderr.contains("spec.stages[0].role"), "{stderr}");
    assert!(
        stderr.contains("Ingestion") && stderr.contains("Deployment"),
        "lists the valid roles: {stderr}"
    );
    assert_no_internals(&stderr);

    let (code, _, stderr) = plan_yaml(&VALID.replace("permissions:", "permisions:"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("spec.stages[0].permisions: unknown field"),
        "{stderr}"
    );
}

#[test]
fn the_second_document_is_named_and_every_error_is_reported() {
    let yaml = format!(
        "{VALID}---\n{}",
        VALID
            .replace("name: scorer", "name: other")
            .replace("name: serve", "name: Serve")
            .replace("verbs: [get]", "verbs: []")
    );
    let (code, _, stderr) = plan_yaml(&yaml);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("document 2 (AIPipeline ml-fraud/other): spec.stages[0].name"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.stages[0].permissions[0].verbs: empty"),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}

#[test]
fn the_same_pipeline_twice_is_an_error() {
    let (code, _, stderr) = plan_yaml(&format!("{VALID}---\n{VALID}"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("document 2") && stderr.contains("also defined in"),
        "{stderr}"
    );
}

#[test]
fn problems_across_pipelines_stop_every_format_before_anything_is_printed() {
    // A valid pipeline, two whose stage objects would share a name, then the first again. The
    // table and the YAML are written pipeline by pipeline, but only once every check passed.
    let a = VALID
        .replace("name: scorer", "name: a")
        .replace("name: serve", "name: b-c");
    let b = VALID
        .replace("name: scorer", "name: a-b")
        .replace("name: serve", "name: c");
    let yaml = format!("{VALID}---\n{a}---\n{b}---\n{VALID}");
    for format in ["table", "yaml", "json"] {
        let (code, stdout, stderr) = plan_yaml_with(&yaml, &["-o", format]);
        assert_eq!(code, 2, "-o {format}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "-o {format} printed: {stdout}");
        assert_no_internals(&stderr);
        for expected in [
            "document 3 (AIPipeline ml-fraud/a-b): spec.stages: stage \"c\" would be named a-b-c like stage \"b-c\" of pipeline \"a\" in the same namespace",
            "document 4 (AIPipeline ml-fraud/scorer): metadata.name: the same pipeline is also defined in",
            "2 error(s); nothing was planned.",
        ] {
            assert!(stderr.contains(expected), "-o {format}: {stderr}");
        }
    }
}

#[test]
fn other_kinds_are_skipped_with_a_note() {
    let yaml = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: ml-fraud}}\n---\n{VALID}"
    );
    let (code, stdout, stderr) = plan_yaml(&yaml);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("note:") && stderr.contains("skipped Deployment ml-fraud/web"),
        "{stderr}"
    );
    assert!(stdout.contains("AIPipeline ml-fraud/scorer"));
}

#[test]
fn a_wrong_api_version_says_which_is_served() {
    let (code, _, stderr) = plan_yaml(&VALID.replace("v1alpha1", "v1"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("portcullis.dev/v1 is not served; use portcullis.dev/v1alpha1"),
        "{stderr}"
    );
}

#[test]
fn broken_yaml_is_an_input_error_not_a_crash() {
    let (code, _, stderr) = plan_yaml("apiVersion: [unclosed\nkind: : :\n");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("input.yaml: document 1: not valid YAML"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_file_is_an_input_error() {
    let out = portcullis(&["plan", "-f", "no/such/file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read no/such/file.yaml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn namespace_labels_select_guardrails() {
    // ml-other has no Namespace object: without labels no guardrail applies and the defaults
    // deny ingress; with the label the deployment guardrail applies and allows it.
    let yaml = VALID.replace("namespace: ml-fraud", "namespace: ml-other").replace(
        "      permissions:",
        "      network:\n        ingress:\n          - fromPodSelector: {matchLabels: {app: web}}\n      permissions:",
    );
    let (code, stdout, _) = plan_yaml(&yaml);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("built-in defaults"), "{stdout}");

    let dir = std::env::temp_dir().join(format!("portcullis-cli-labels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("p.yaml");
    std::fs::write(&file, &yaml).expect("written");
    let out = portcullis(&[
        "plan",
        "-f",
        file.to_str().expect("path"),
        "--guardrails",
        "examples/guardrails",
        "--namespace-labels",
        "portcullis.dev/tier=ml",
    ]);
    std::fs::remove_dir_all(&dir).expect("removed");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("bound by AccessGuardrail ml-deployment"));
}

#[test]
fn help_is_there_for_every_command() {
    for args in [
        vec!["--help"],
        vec!["plan", "--help"],
        vec!["crds", "--help"],
    ] {
        let out = portcullis(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(text(&out.stdout).contains("Usage: portcullis"), "{args:?}");
    }
    let out = portcullis(&["plan", "--help"]);
    let help = text(&out.stdout);
    for flag in [
        "--filename",
        "--guardrails",
        "--namespace-labels",
        "--output",
    ] {
        assert!(help.contains(flag), "plan --help lacks {flag}");
    }
}

#[test]
fn bad_flags_exit_2_with_usage() {
    let out = portcullis(&["plan", "-f", "examples/pipelines", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("possible values: table, yaml, json"),
        "{}",
        text(&out.stderr)
    );
    let out = portcullis(&[
        "plan",
        "-f",
        "examples/pipelines",
        "--namespace-labels",
        "novalue",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("write labels as tier=ml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_shard_flags_exit_2_naming_the_flag() {
    let base = [
        "run",
        "--audit-log",
        "/nonexistent/log",
        "--audit-key",
        "/nonexistent/key",
    ];
    let run = |more: &[&str]| {
        let args: Vec<&str> = base.iter().chain(more).copied().collect();
        let out = portcullis(&args);
        (out.status.code(), text(&out.stderr))
    };
    let (code, err) = run(&["--shard-count", "2", "--shard-index", "2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "--shard-index 2 is out of range: with --shard-count 2 it must be from 0 to 1"
        ),
        "{err}"
    );
    let (code, err) = run(&["--shard-count", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--shard-count"), "{err}");
    let (code, err) = run(&["--shard-count", "2", "--watch-namespace", "team-a"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--watch-namespace and --shard-count 2"),
        "{err}"
    );
    assert_no_internals(&err);
}

#[test]
fn crds_prints_the_committed_crds() {
    let out = portcullis(&["crds"]);
    assert_eq!(out.status.code(), Some(0));
    let committed = std::fs::read_to_string(root().join("crds/portcullis.yaml"))
        .expect("crds/portcullis.yaml exists");
    assert_eq!(
        text(&out.stdout),
        committed,
        "crds/ is stale: run `make crds`"
    );
}

// ---- kubectl's conventions: kubeconfig, context, namespace, stdin, completion, version ----

/// A pipeline that names no namespace: it goes to the default namespace.
const NO_NAMESPACE: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: tiny}
spec:
  stages:
    - name: train
      role: Training
      podSelector:
        matchLabels: {app: tiny-train}
"#;

/// Two kubeconfig files, as `KUBECONFIG=contexts.yaml:clusters.yaml`: the first has the
/// contexts (current: `ml`, namespace `team-ml`; `fraud`, namespace `team-fraud`), the second
/// the cluster (an address where nothing listens) and the user. Neither works alone.
fn split_kubeconfig(dir: &std::path::Path) -> String {
    let contexts = dir.join("contexts.yaml");
    let clusters = dir.join("clusters.yaml");
    std::fs::write(
        &contexts,
        "apiVersion: v1\nkind: Config\ncurrent-context: ml\ncontexts:\n\
         - name: ml\n  context: {cluster: local, user: me, namespace: team-ml}\n\
         - name: fraud\n  context: {cluster: local, user: me, namespace: team-fraud}\n",
    )
    .unwrap();
    std::fs::write(
        &clusters,
        "apiVersion: v1\nkind: Config\nclusters:\n\
         - name: local\n  cluster: {server: \"https://127.0.0.1:9\"}\n\
         users:\n- name: me\n  user: {token: not-a-real-token}\n",
    )
    .unwrap();
    format!("{}:{}", contexts.display(), clusters.display())
}

/// Runs portcullis with `KUBECONFIG` set to `kubeconfig` (unset when None, with a HOME that
/// has no ~/.kube/config) and `stdin` on standard input.
fn portcullis_with(kubeconfig: Option<&str>, stdin: &str, args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command
        .current_dir(root())
        .args(args)
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(kubeconfig) = kubeconfig {
        command.env("KUBECONFIG", kubeconfig);
    }
    let mut child = command.spawn().expect("portcullis runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().expect("exit code"),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// The namespaces of the ServiceAccounts `plan -o yaml` prints.
fn planned_namespaces(yaml: &str) -> Vec<String> {
    yaml.split("\n---")
        .filter(|doc| doc.contains("kind: ServiceAccount"))
        .filter_map(|doc| {
            doc.lines()
                .find_map(|l| l.trim().strip_prefix("namespace: ").map(String::from))
        })
        .collect()
}

#[test]
fn plan_reads_standard_input_with_dash_f_dash() {
    let file =
        std::fs::read_to_string(root().join("examples/pipelines/fraud-detector.yaml")).unwrap();
    let from_file = portcullis(&[
        "plan",
        "-f",
        "examples/pipelines/fraud-detector.yaml",
        "examples/namespaces.yaml",
        "--guardrails",
        "examples/guardrails",
        "-o",
        "yaml",
    ]);
    let (code, stdout, stderr) = portcullis_with(
        None,
        &file,
        &[
            "plan",
            "-f",
            "-",
            "examples/namespaces.yaml",
            "--guardrails",
            "examples/guardrails",
            "-o",
            "yaml",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("fraud-detector"), "{stdout}");
    assert_eq!(
        stdout,
        text(&from_file.stdout),
        "the same plan from stdin as from the file"
    );
}

#[test]
fn an_error_in_standard_input_is_named_as_stdin() {
    let broken = NO_NAMESPACE.replace("role: Training", "role: Trainer");
    let (code, _, stderr) = portcullis_with(None, &broken, &["plan", "-f", "-"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("<stdin>"), "{stderr}");
    assert!(stderr.contains("spec.stages[0].role"), "{stderr}");
    assert_no_internals(&stderr);
}

#[test]
fn plan_puts_pipelines_without_a_namespace_in_the_contexts_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = split_kubeconfig(dir.path());
    let plan = |kubeconfig: Option<&str>, more: &[&str]| {
        let mut args = vec!["plan", "-f", "-", "-o", "yaml"];
        args.extend_from_slice(more);
        let (_, stdout, stderr) = portcullis_with(kubeconfig, NO_NAMESPACE, &args);
        let namespaces = planned_namespaces(&stdout);
        assert!(
            !namespaces.is_empty(),
            "no ServiceAccount planned: {stderr}"
        );
        namespaces
    };
    assert_eq!(plan(None, &[]), ["default"], "no kubeconfig: default");
    assert_eq!(
        plan(Some(&kubeconfig), &[]),
        ["team-ml"],
        "the current context's"
    );
    assert_eq!(
        plan(Some(&kubeconfig), &["--context", "fraud"]),
        ["team-fraud"]
    );
    assert_eq!(
        plan(Some(&kubeconfig), &["--context", "fraud", "-n", "sandbox"]),
        ["sandbox"],
        "-n wins over the context"
    );
}

#[test]
fn can_i_asks_in_the_contexts_namespace_of_merged_kubeconfig_files() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = split_kubeconfig(dir.path());
    // Nothing listens at the cluster's address: the error names the object that was asked
    // for, which shows the namespace chosen and that both files were read (the cluster and
    // the user are only in the second).
    let can_i = |more: &[&str]| {
        let mut args = vec!["can-i", "scorer"];
        args.extend_from_slice(more);
        let (code, _, stderr) = portcullis_with(Some(&kubeconfig), "", &args);
        assert_eq!(code, 2, "{stderr}");
        stderr
    };
    assert!(
        can_i(&[]).contains("AIPipeline team-ml/scorer"),
        "{}",
        can_i(&[])
    );
    let fraud = can_i(&["--context", "fraud"]);
    assert!(fraud.contains("AIPipeline team-fraud/scorer"), "{fraud}");
    let explicit = can_i(&["-n", "sandbox"]);
    assert!(explicit.contains("AIPipeline sandbox/scorer"), "{explicit}");
    let unknown = can_i(&["--context", "staging"]);
    assert!(
        unknown.contains("no context \"staging\"") && unknown.contains("\"fraud\""),
        "an unknown context is named with the known ones: {unknown}"
    );
}

#[test]
fn completion_scripts_know_the_commands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let out = portcullis(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in [
            "can-i",
            "plan",
            "audit",
            "completion",
            "guardrails",
            "context",
        ] {
            assert!(script.contains(word), "the {shell} script lacks {word}");
        }
    }
    assert!(text(&portcullis(&["completion", "bash"]).stdout).contains("complete -F _portcullis"));
    let out = portcullis(&["completion", "powershell-core"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("bash"), "the shells are listed");
}

#[test]
fn version_is_the_crates() {
    let out = portcullis(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Serves one HTTP answer with `status` on 127.0.0.1, and returns the URL and the request it got.
fn serve_once(status: &'static str) -> (String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        // The rest of the request, to its blank line.
        let mut header = String::new();
        while reader.read_line(&mut header).unwrap() > 2 {
            header.clear();
        }
        write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").unwrap();
        request_line
    });
    (url, server)
}

#[test]
fn probe_exits_0_only_when_the_operator_answers_200() {
    let (url, server) = serve_once("200 OK");
    let out = portcullis(&["probe", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.join().unwrap().trim(), "GET /readyz HTTP/1.1");

    let (url, server) = serve_once("503 Service Unavailable");
    let out = portcullis(&["probe", &url]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("answered 503"),
        "{}",
        text(&out.stderr)
    );

    // Nothing listens: refused, exit 1, the address named.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", closed.local_addr().unwrap());
    drop(closed);
    let out = portcullis(&["probe", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
    assert_no_internals(&text(&out.stderr));
}
