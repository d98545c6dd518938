//! Golden tests: `portcullis plan` on every example, in every output format, against reviewed
//! output kept in tests/golden/. Run with UPDATE_GOLDEN=1 to rewrite them after a deliberate
//! change, then review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples").join(dir))
        .expect("examples folder exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in examples/{dir}");
    files
}

fn plan(example: &Path, format: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(root())
        .arg("plan")
        .arg("-f")
        .arg(
            example
                .strip_prefix(root())
                .expect("example under the crate"),
        )
        .arg("examples/namespaces.yaml")
        .args(["--guardrails", "examples/guardrails", "-o", format])
        .output()
        .expect("portcullis runs");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    )
}

fn check_golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("golden file written");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing; run UPDATE_GOLDEN=1 cargo test --test golden and review it",
            path.display()
        )
    });
    pretty_assertions::assert_eq!(
        expected,
        actual,
        "{name} differs from the reviewed output; if the change is intended, run UPDATE_GOLDEN=1 cargo test --test golden and review the diff"
    );
}

fn run_examples(dir: &str, expected_exit: i32) {
    for example in examples(dir) {
        let stem = example
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        for (format, ext) in [("table", "txt"), ("json", "json"), ("yaml", "yaml")] {
            let (code, stdout, stderr) = plan(&example, format);
            assert_eq!(
                code, expected_exit,
                "{stem} -o {format}: exit {code}\n{stderr}"
            );
            assert!(stderr.is_empty(), "{stem}: unexpected stderr: {stderr}");
            check_golden(&format!("{dir}-{stem}.{ext}"), &stdout);
        }
    }
}

#[test]
fn clean_examples_plan_without_denials() {
    run_examples("pipelines", 0);
}

#[test]
fn denied_examples_exit_3_and_say_why() {
    run_examples("denied", 3);
}

#[test]
fn every_golden_file_belongs_to_an_example() {
    for entry in std::fs::read_dir(root().join("tests/golden")).expect("golden folder") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let (dir, rest) = name
            .split_once('-')
            .expect("golden files are named <dir>-<example>.<ext>");
        let stem = rest.rsplit_once('.').map(|(s, _)| s).unwrap_or(rest);
        let example = root()
            .join("examples")
            .join(dir)
            .join(format!("{stem}.yaml"));
        assert!(
            example.exists(),
            "{name} is left over: {} does not exist; delete it",
            example.display()
        );
    }
}

#[test]
fn the_yaml_output_parses_back_into_the_json_objects() {
    for example in examples("pipelines") {
        let (_, yaml, _) = plan(&example, "yaml");
        let (_, json, _) = plan(&example, "json");
        let from_yaml: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&yaml).expect("YAML output parses");
        let from_yaml: Vec<serde_json::Value> =
            from_yaml.into_iter().filter(|v| !v.is_null()).collect();
        let doc: serde_json::Value = serde_json::from_str(&json).expect("JSON output parses");
        assert_eq!(
            serde_json::Value::Array(from_yaml),
            doc["objects"],
            "{}",
            example.display()
        );
    }
}
