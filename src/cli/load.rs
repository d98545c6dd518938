//! Reads AIPipelines, AccessGuardrails and Namespaces from files and folders of YAML or JSON.
//!
//! Every error names the file, the document, the object, the field and the fix. Documents of
//! other kinds are skipped with a note, so a whole GitOps folder can be passed as it is.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::validate::{FieldError, Validated, validate, validate_guardrail};
use crate::api::{AIPipeline, AccessGuardrail};

const API_VERSION: &str = "portcullis.dev/v1alpha1";

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)
    }
}

/// Something wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub origin: Option<Origin>,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}")?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
            write!(f, ": ")?;
        } else if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// What the files held.
#[derive(Debug, Default)]
pub struct Inputs {
    /// The pipelines, validated.
    pub pipelines: Vec<(Origin, Validated<AIPipeline>)>,
    pub guardrails: Vec<(Origin, AccessGuardrail)>,
    /// Labels of the Namespaces found, by name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Where each Namespace was read first, to name it when another file relabels it.
    namespace_origins: BTreeMap<String, Origin>,
    /// Documents that were skipped, and why.
    pub notes: Vec<String>,
    pub errors: Vec<InputError>,
}

/// Which kinds a set of files may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `-f`: pipelines, guardrails and namespaces.
    Anything,
    /// `--guardrails`: guardrails (and namespaces); anything else is skipped with a note.
    Guardrails,
    /// `-f` when `--guardrails` is given: pipelines and namespaces. Guardrails are skipped with a
    /// note: the CI gate takes them only from the platform team's folder, never from the
    /// tenant's.
    Pipelines,
}

/// The files under `paths`: files as given, folders searched recursively for .yaml, .yml and
/// .json files, in name order.
fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut out = Vec::new();
    for path in paths {
        collect(path, &mut out, true)?;
    }
    Ok(out)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>, explicit: bool) -> Result<(), InputError> {
    let io_error = |e: std::io::Error| InputError {
        origin: None,
        object: None,
        field: None,
        message: format!("cannot read {}: {e}; check the path", path.display()),
    };
    let meta = std::fs::metadata(path).map_err(io_error)?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io_error)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            collect(&entry, out, false)?;
        }
    } else if explicit
        || path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
    {
        out.push(path.to_path_buf());
    }
    Ok(())
}

impl Inputs {
    /// Reads every document of every file under `paths`.
    pub(crate) fn read(&mut self, paths: &[PathBuf], expect: Expect) {
        match files(paths) {
            Ok(files) => {
                for file in files {
                    self.read_file(&file, expect);
                }
            }
            Err(e) => self.errors.push(e),
        }
    }

    fn read_file(&mut self, file: &Path, expect: Expect) {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(InputError {
                    origin: Some(Origin {
                        file: file.into(),
                        document: 1,
                    }),
                    object: None,
                    field: None,
                    message: format!("cannot read the file: {e}"),
                });
                return;
            }
        };
        self.read_str(file, &text, expect);
    }

    /// Reads the documents of one file's text.
    pub fn read_str(&mut self, file: &Path, text: &str, expect: Expect) {
        let documents: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(docs) => docs,
            Err(e) => {
                self.errors.push(InputError {
                    origin: Some(Origin {
                        file: file.into(),
                        document: 1,
                    }),
                    object: None,
                    field: None,
                    message: format!("not valid YAML: {e}"),
                });
                return;
            }
        };
        let mut position = 0;
        for doc in documents {
            if doc.is_null() {
                continue;
            }
            position += 1;
            let origin = Origin {
                file: file.into(),
                document: position,
            };
            self.read_document(origin, doc, expect);
        }
    }

    fn read_document(&mut self, origin: Origin, doc: Value, expect: Expect) {
        let Value::Object(map) = &doc else {
            self.errors.push(InputError {
                origin: Some(origin),
                object: None,
                field: None,
                message: "not a Kubernetes object; a document needs apiVersion, kind and metadata"
                    .into(),
            });
            return;
        };
        let text = |k: &str| {
            map.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let namespace = map
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str);
        let object = match namespace {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        };
        let error = |field: Option<String>, message: String| InputError {
            origin: Some(origin.clone()),
            object: Some(object.clone()),
            field,
            message,
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "List") => {
                let items = map.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
                for item in items {
                    self.read_document(origin.clone(), item, expect);
                }
            }
            ("v1", "Namespace") => {
                let labels = map
                    .get("metadata")
                    .and_then(|m| m.get("labels"))
                    .and_then(Value::as_object)
                    .map(|l| {
                        l.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()
                    })
                    .unwrap_or_default();
                match self.namespaces.get(name) {
                    Some(first) if *first != labels => {
                        let first_origin = self
                            .namespace_origins
                            .get(name)
                            .map_or_else(|| "another document".to_string(), ToString::to_string);
                        self.errors.push(error(
                            Some("metadata.labels".into()),
                            format!(
                                "Namespace {name} is also defined in {first_origin} with other labels; guardrails select on them, so keep one definition"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.namespace_origins.insert(name.to_string(), origin.clone());
                        self.namespaces.insert(name.to_string(), labels);
                    }
                }
            }
            (API_VERSION, "AIPipeline") if expect != Expect::Guardrails => match typed::<AIPipeline>(doc) {
                Ok(p) => match validate(p) {
                    Ok(p) => self.pipelines.push((origin.clone(), p)),
                    Err(problems) => {
                        for p in problems {
                            self.errors.push(error(Some(p.field), p.message));
                        }
                    }
                },
                Err(e) => self.errors.push(error(Some(e.field), e.message)),
            },
            (API_VERSION, "AccessGuardrail") if expect == Expect::Pipelines => self.notes.push(format!(
                "{origin}: skipped {object}: with --guardrails, guardrails come only from there"
            )),
            (API_VERSION, "AccessGuardrail") => match typed::<AccessGuardrail>(doc) {
                Ok(g) => {
                    let problems = validate_guardrail(&g);
                    if problems.is_empty() {
                        self.guardrails.push((origin.clone(), g));
                    }
                    for p in problems {
                        self.errors.push(error(Some(p.field), p.message));
                    }
                }
                Err(e) => self.errors.push(error(Some(e.field), e.message)),
            },
            (v, "AIPipeline" | "AccessGuardrail") if v != API_VERSION && v.starts_with("portcullis.dev/") => {
                self.errors.push(error(
                    Some("apiVersion".into()),
                    format!("{v} is not served; use {API_VERSION}"),
                ));
            }
            ("", _) | (_, "") => self.errors.push(error(
                None,
                "missing apiVersion or kind; every document needs both, such as apiVersion: portcullis.dev/v1alpha1 and kind: AIPipeline".into(),
            )),
            _ => self.notes.push(format!("{origin}: skipped {object} ({api_version}): not an input of this command")),
        }
    }
}

/// Deserializes `doc`, naming the field of the first type error and every unknown field.
fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, FieldError> {
    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
    let result: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(doc, &mut note_unknown));
    match result {
        Err(e) => {
            let field = e.path().to_string();
            let message = e.into_inner().to_string();
            Err(FieldError { field: if field == "." { "(document)".into() } else { field }, message: fix_hint(&message) })
        }
        Ok(value) => match unknown.into_iter().find(|p| is_schema_field(p)) {
            Some(path) => Err(FieldError {
                field: path,
                message: "unknown field; check its spelling and place against `kubectl explain` (the API server would refuse it under server-side apply)".into(),
            }),
            None => Ok(value),
        },
    }
}

/// A path as Kubernetes writes it: `spec.stages[0].name`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Whether an ignored field is one the CRD schema would prune or refuse. apiVersion and kind are
/// read before typing; status is the operator's; metadata is the API server's.
fn is_schema_field(path: &str) -> bool {
    let top = path.split(['.', '[']).next().unwrap_or(path);
    !matches!(top, "apiVersion" | "kind" | "metadata" | "status")
}

/// serde's messages, with what to do added where it is clear.
fn fix_hint(message: &str) -> String {
    if message.starts_with("unknown variant") {
        format!("{message}; use one of the listed values (they are case-sensitive)")
    } else if message.starts_with("missing field") {
        format!("{message}; add it")
    } else if message.starts_with("invalid type") {
        format!("{message}; check the field's type with `kubectl explain`")
    } else {
        message.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT_FOLDER: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AIPipeline
metadata: {name: fraud, namespace: ml}
spec:
  stages: [{name: train, role: Training}]
---
apiVersion: portcullis.dev/v1alpha1
kind: AccessGuardrail
metadata: {name: everything}
spec:
  roles:
    training:
      kubernetes: [{apiGroups: [""], resources: [secrets], verbs: [get]}]
---
apiVersion: v1
kind: Namespace
metadata: {name: ml, labels: {portcullis.dev/tier: prod}}
"#;

    #[test]
    fn with_guardrails_given_the_tenant_files_bring_none() {
        let mut inputs = Inputs::default();
        inputs.read_str(Path::new("tenant.yaml"), TENANT_FOLDER, Expect::Pipelines);
        assert_eq!(inputs.pipelines.len(), 1);
        assert!(inputs.guardrails.is_empty(), "{:?}", inputs.guardrails);
        assert!(
            inputs
                .notes
                .iter()
                .any(|n| n.contains("AccessGuardrail everything") && n.contains("--guardrails")),
            "{:?}",
            inputs.notes
        );
        // Without --guardrails, the same files do bring them (a local try-out).
        let mut inputs = Inputs::default();
        inputs.read_str(Path::new("tenant.yaml"), TENANT_FOLDER, Expect::Anything);
        assert_eq!(inputs.guardrails.len(), 1);
    }

    #[test]
    fn a_namespace_relabelled_by_another_file_is_an_error_naming_both() {
        let mut inputs = Inputs::default();
        inputs.read_str(
            Path::new("platform/namespaces.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ml, labels: {portcullis.dev/tier: ml}}\n",
            Expect::Guardrails,
        );
        inputs.read_str(Path::new("tenant.yaml"), TENANT_FOLDER, Expect::Pipelines);
        let error = inputs
            .errors
            .iter()
            .find(|e| e.field.as_deref() == Some("metadata.labels"))
            .expect("a relabelled namespace is an error");
        let text = error.to_string();
        assert!(text.contains("tenant.yaml"), "{text}");
        assert!(text.contains("platform/namespaces.yaml"), "{text}");
        // The first definition stands.
        assert_eq!(
            inputs.namespaces["ml"].get("portcullis.dev/tier"),
            Some(&"ml".to_string())
        );
        // The same labels twice are fine.
        let mut inputs = Inputs::default();
        let same = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ml, labels: {a: b}}\n";
        inputs.read_str(Path::new("one.yaml"), same, Expect::Anything);
        inputs.read_str(Path::new("two.yaml"), same, Expect::Anything);
        assert!(inputs.errors.is_empty(), "{:?}", inputs.errors);
    }
}
